"""The `maskdino evaluate`, `predict` and `metrics` commands with a real (tiny, randomly initialised)
model bundle: files written, numbers consistent between commands, pictures drawn, user errors as one
line and exit code 2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.storage import Storage
from model.maskdino import MaskDINO
from cli import main
from pipeline.model_bundle import build_bundle_model, open_bundle, save_bundle
from pipeline.model_tools import load_model_config
from tests.shard_helpers import FIXTURES, read_manifest, run_shard

PANOPTIC = FIXTURES / "panopticapi" / "sample_data"
ADE = FIXTURES / "sceneparsing"
COCO_IMAGE = FIXTURES / "transformers-fixtures/tests/fixtures/tests_samples/COCO/000000039769.png"
SMALL = ["--min-size", "128", "--max-size", "256"]


@pytest.fixture(scope="module")
def instance_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inst")
    run_shard(out, format="coco_instances", root=str(PANOPTIC), split="val",
              annotation=str(PANOPTIC / "panoptic_coco_detection_format.json"), images=str(PANOPTIC / "input_images"))
    return out


@pytest.fixture(scope="module")
def ade_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ade")
    run_shard(out, format="ade20k", root=str(ADE), split="val", images=str(ADE / "sampleData" / "images"),
              labels=str(ADE / "sampleData" / "annotations"), categories=str(ADE / "objectInfo150.csv"))
    return out


def _bundle(tmp_path_factory, config: str, shards: Path) -> Path:
    manifest = read_manifest(shards)
    cfg = load_model_config(config, [f"num_classes={len(manifest.categories)}"])
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bundle")
    save_bundle(Storage(), str(folder), cfg, MaskDINO(cfg).state_dict(), manifest.categories)
    return folder


@pytest.fixture(scope="module")
def instance_bundle(tmp_path_factory, instance_shards) -> Path:
    return _bundle(tmp_path_factory, "configs/model/tiny_instance.yaml", instance_shards)


@pytest.fixture(scope="module")
def semantic_bundle(tmp_path_factory, ade_shards) -> Path:
    return _bundle(tmp_path_factory, "configs/model/tiny_semantic.yaml", ade_shards)


def test_bundle_round_trips_weights_config_and_categories(instance_bundle, instance_shards):
    storage = Storage()
    bundle = open_bundle(storage, model=str(instance_bundle))
    model = build_bundle_model(bundle, storage)
    torch.manual_seed(0)
    reference = MaskDINO(bundle.config).state_dict()
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    assert not model.training
    manifest = read_manifest(instance_shards)
    assert bundle.class_names() == [c.name for c in manifest.categories]
    assert bundle.dataset_category_ids() == [c.id for c in manifest.categories]


def test_evaluate_instance_writes_report_that_metrics_coco_rescores(instance_bundle, instance_shards, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate", str(instance_shards / "manifest.json"), "--model", str(instance_bundle),
                 "--output", str(out), *SMALL])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "instance" and report["num_images"] == 2
    assert set(report["metrics"]) == {"bbox", "segm"}
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
            "per_category"} <= set(report["metrics"]["segm"])
    assert report["primary_metric"]["name"] == "mask AP"
    table = (out / "per_class.md").read_text()
    assert "| person |" in table and "mask AP" in table
    results = json.loads((out / "coco_results.json").read_text())
    assert results and all(isinstance(r["segmentation"]["counts"], str) for r in results)
    capsys.readouterr()

    for iou_type in ("bbox", "segm"):
        assert main(["metrics", "coco", "--gt-json", str(out / "coco_ground_truth.json"),
                     "--results", str(out / "coco_results.json"), "--iou-type", iou_type]) == 0
        rescored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        for key in ("AP", "AP50", "AR100", "per_category"):
            assert rescored[key] == report["metrics"][iou_type][key], (iou_type, key)


def test_evaluate_semantic_with_config_and_weights(semantic_bundle, ade_shards, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate", str(ade_shards / "manifest.json"), "--config", str(semantic_bundle / "config.yaml"),
                 "--weights", str(semantic_bundle / "model.safetensors"), "--output", str(out), *SMALL])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "semantic" and report["num_images"] == 3
    sem = report["metrics"]["semantic"]
    assert 0.0 <= sem["mIoU"] < 100.0 and 0.0 <= sem["pACC"] <= 100.0
    assert "mIoU" in capsys.readouterr().out


def _changed_fraction(original: np.ndarray, drawn: np.ndarray) -> float:
    return float(np.any(original != drawn, axis=-1).mean())


def test_predict_draws_instances_and_semantic_pictures(instance_bundle, semantic_bundle, tmp_path, capsys):
    original = np.asarray(Image.open(COCO_IMAGE).convert("RGB"))
    out = tmp_path / "pictures"
    assert main(["predict", str(COCO_IMAGE), "--model", str(instance_bundle), "--output", str(out),
                 "--score-threshold", "0", *SMALL]) == 0
    assert main(["predict", str(COCO_IMAGE), "--model", str(semantic_bundle), "--output", str(out), *SMALL]) == 0
    for kind in ("instances", "semantic"):
        drawn = np.asarray(Image.open(out / f"000000039769.{kind}.png").convert("RGB"))
        assert drawn.shape == original.shape
        assert _changed_fraction(original, drawn) > 0.05, kind  # masks / colours cover the image
    printed = capsys.readouterr().out
    assert "000000039769.instances.png" in printed and "Drew 1 pictures" in printed


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "{ade}/manifest.json", "--model", "{inst}", "--output", "{tmp}/x"],
     "the model predicts 133 classes but the manifest (ade20k/val) has 150 categories"),
    (["evaluate", "{ade}/manifest.json", "--model", "{tmp}", "--output", "{tmp}/x"], "is not a model bundle"),
    (["predict", "{tmp}/missing.jpg", "--model", "{inst}"], "no such file"),
    (["metrics", "miou", "--gt-folder", "{ade_labels}", "--pred-folder", "{tmp}", "--num-classes", "150"],
     "no prediction for ground truth"),
])
def test_user_errors_are_one_line_with_exit_code_2(argv, message, instance_bundle, ade_shards, tmp_path, capsys):
    names = {"ade": ade_shards, "inst": instance_bundle, "tmp": tmp_path,
             "ade_labels": ADE / "sampleData" / "annotations"}
    assert main([a.format(**names) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


def test_predict_on_a_file_that_is_not_an_image_names_the_file(instance_bundle, tmp_path, capsys):
    notes = tmp_path / "notes.jpg"
    notes.write_text("not an image")
    assert main(["predict", str(notes), "--model", str(instance_bundle), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot read image {notes}: ") and "\n" not in err, err
    assert "BytesIO" not in err
    assert not (tmp_path / "out").exists()


def test_config_and_authors_pth_weights_load_through_the_adapter(tmp_path):
    """--config C --weights W accepts the authors' checkpoint format: keys recognised and converted."""
    from core.config import dump_config
    from tests.parity_fixtures import build_fixture_model, load_fixture, model_config

    fx = load_fixture("swin_small")
    (tmp_path / "model.yaml").write_text(dump_config(model_config(fx)))
    torch.save({"model": fx.weights}, tmp_path / "model_final.pth")
    storage = Storage()
    bundle = open_bundle(storage, config=str(tmp_path / "model.yaml"), weights=str(tmp_path / "model_final.pth"))
    loaded = build_bundle_model(bundle, storage).state_dict()
    expected = build_fixture_model(fx).state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert bundle.class_names()[0] == "class 0"  # no categories given: numbered names


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_metrics_pq_scores_the_panopticapi_fixture_against_itself(capsys):
    gt_json, gt_folder = PANOPTIC / "panoptic_examples.json", PANOPTIC / "panoptic_examples"
    assert main(["metrics", "pq", "--gt-json", str(gt_json), "--gt-folder", str(gt_folder),
                 "--pred-json", str(gt_json), "--pred-folder", str(gt_folder)]) == 0
    report = _last_json(capsys)
    for group in ("All", "Things", "Stuff"):
        assert {k: report[group][k] for k in ("pq", "sq", "rq")} == {"pq": 1.0, "sq": 1.0, "rq": 1.0}
    assert report["All"]["n"] == report["Things"]["n"] + report["Stuff"]["n"] > 0
    assert len(report["per_class"]) == 133


def test_metrics_miou_scores_the_ade_fixture_predictions(capsys):
    assert main(["metrics", "miou", "--gt-folder", str(ADE / "sampleData" / "annotations"),
                 "--pred-folder", str(ADE / "sampleData" / "predictions"), "--num-classes", "150",
                 "--reduce-zero-label"]) == 0
    report = _last_json(capsys)
    assert report["mIoU"] == report["mACC"] == report["pACC"] == 100.0
    assert report["fwIoU"] == pytest.approx(100.0, abs=1e-9)
