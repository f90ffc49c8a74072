"""`maskdino evaluate` end to end on shards of the real fixtures: an oracle predictor (the ground truth
itself) scores AP 1.0 / PQ 100 / mIoU 100 through the whole path (shards -> decode -> evaluator -> report);
two gloo ranks give the same report as one; the CLI writes report.json and per_class.md that
`maskdino metrics coco` re-scores to the same numbers."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from core.storage import Storage
from model.structures import (
    ImageResult,
    InstanceResult,
    PanopticResult,
    PanopticSegment,
    SemanticResult,
)
from pipeline.eval_data import iter_eval_samples, num_batches, rank_share
from pipeline.evaluate import EvalSettings, evaluate_predictor
from pipeline.metrics.panoptic import rgb2id
from tests.shard_helpers import FIXTURES, read_manifest, run_shard

PANOPTIC = FIXTURES / "panopticapi" / "sample_data"
ADE = FIXTURES / "sceneparsing"
SETTINGS = EvalSettings()


# ---------------------------------------------------------------- shards of the real fixtures
@pytest.fixture(scope="module")
def panoptic_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("pan")
    run_shard(out, format="coco_panoptic", root=str(PANOPTIC), split="val",
              annotation=str(PANOPTIC / "panoptic_examples.json"), images=str(PANOPTIC / "input_images"),
              labels=str(PANOPTIC / "panoptic_examples"))
    return str(out / "manifest.json")


@pytest.fixture(scope="module")
def instance_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("inst")
    run_shard(out, format="coco_instances", root=str(PANOPTIC), split="val",
              annotation=str(PANOPTIC / "panoptic_coco_detection_format.json"), images=str(PANOPTIC / "input_images"))
    return str(out / "manifest.json")


@pytest.fixture(scope="module")
def ade_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("ade")
    run_shard(out, format="ade20k", root=str(ADE), split="val", images=str(ADE / "sampleData" / "images"),
              labels=str(ADE / "sampleData" / "annotations"), categories=str(ADE / "objectInfo150.csv"),
              _extra={"shard.maxcount": 2})  # two shards: ranks open different ones
    return str(out / "manifest.json")


@pytest.fixture(scope="module")
def detection_shards(tmp_path_factory) -> str:
    """Synthetic Objects365 v1 (boxes only), the detection-pretraining layout."""
    from data_prep.synthetic import SyntheticSpec, make_synthetic

    raw, out = tmp_path_factory.mktemp("o365raw"), tmp_path_factory.mktemp("o365")
    make_synthetic(raw, SyntheticSpec(train_images=1, val_images=5, min_size=96, max_size=128,
                                      formats=("objects365_v1",)))
    run_shard(out, format="objects365", root=str(raw / "objects365_v1"), split="val", version="v1")
    return str(out / "manifest.json")


# ---------------------------------------------------------------- oracle predictors
def _image_key(image: np.ndarray) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


def _oracle(manifest_uri: str, to_result, perturb: int = 0):
    """A predictor that answers each image with its own ground truth (shifted by `perturb` pixels)."""
    manifest = read_manifest(Path(manifest_uri).parent)
    contiguous = manifest.contiguous_ids()
    answers = {_image_key(s.image): to_result(s, contiguous, perturb)
               for s in iter_eval_samples(Storage(), manifest_uri)}
    return lambda images: [answers[_image_key(im)] for im in images]


def _instance_answer(sample, contiguous, perturb) -> ImageResult:
    anns = [a for a in sample.meta["annotations"] if not a["iscrowd"]]
    masks = np.stack([mask_utils.decode({"size": a["segmentation"]["size"],
                                         "counts": a["segmentation"]["counts"].encode()}) for a in anns]).astype(bool)
    masks = np.roll(masks, perturb, axis=2)
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32) + torch.tensor([perturb, 0, perturb, 0])
    return ImageResult(instances=InstanceResult(
        scores=torch.linspace(1.0, 0.5, len(anns)), classes=torch.tensor([contiguous[a["category_id"]] for a in anns]),
        boxes=boxes, masks=torch.from_numpy(masks), query_index=torch.arange(len(anns))))


def _box_answer(sample, contiguous, perturb) -> ImageResult:
    anns = [a for a in sample.meta["annotations"] if not a["iscrowd"]]
    h, w = sample.image.shape[:2]
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    return ImageResult(instances=InstanceResult(
        scores=torch.ones(len(anns)), classes=torch.tensor([contiguous[a["category_id"]] for a in anns]),
        boxes=boxes + perturb, masks=torch.zeros(len(anns), h, w, dtype=torch.bool),
        query_index=torch.arange(len(anns))))


def _panoptic_answer(sample, contiguous, perturb) -> ImageResult:
    ids = rgb2id(np.asarray(Image.open(io.BytesIO(sample.label_png)).convert("RGB")))
    ids = np.roll(ids, perturb, axis=1)
    present = set(np.unique(ids).tolist())
    segments = [PanopticSegment(s["id"], contiguous[s["category_id"]], False)
                for s in sample.meta["segments"] if s["id"] in present]
    return ImageResult(panoptic=PanopticResult(torch.from_numpy(ids.astype(np.int32)), segments))


def _semantic_answer(sample, contiguous, perturb) -> ImageResult:
    labels = np.asarray(Image.open(io.BytesIO(sample.label_png))).astype(np.int64)
    labels = np.roll(labels, perturb, axis=1)
    # ADE: 0 = other -> predicted as class 0 ("wall"); those pixels are ignored in the ground truth anyway
    probabilities = torch.nn.functional.one_hot(torch.from_numpy(np.maximum(labels - 1, 0)), 150)
    return ImageResult(semantic=SemanticResult(probabilities.permute(2, 0, 1).float()))


# ---------------------------------------------------------------- acceptance: identity through the whole path
def test_instance_ground_truth_through_evaluate_gives_ap_1(instance_shards):
    report, task = evaluate_predictor(_oracle(instance_shards, _instance_answer), instance_shards, Storage(),
                                      SETTINGS)
    assert report.task == "instance" and report.num_images == 2
    for iou_type in ("bbox", "segm"):
        assert report.metrics[iou_type]["AP"] == 1.0
        assert report.metrics[iou_type]["AP50"] == 1.0
    assert report.primary() == ("mask AP", 1.0)
    gt = json.loads(task.files["coco_ground_truth.json"])
    assert [a["id"] for a in gt["annotations"]] == list(range(1, 51))  # the fixture's id 0 is not kept


def test_detection_manifest_scores_boxes_only(detection_shards):
    report, _ = evaluate_predictor(_oracle(detection_shards, _box_answer), detection_shards, Storage(), SETTINGS)
    assert report.task == "detection" and set(report.metrics) == {"bbox"}
    assert report.metrics["bbox"]["AP"] == 1.0
    assert report.primary() == ("box AP", 1.0)


def test_panoptic_ground_truth_through_evaluate_gives_pq_100(panoptic_shards):
    report, task = evaluate_predictor(_oracle(panoptic_shards, _panoptic_answer), panoptic_shards, Storage(),
                                      SETTINGS)
    pq = report.metrics["panoptic"]
    assert pq["All"]["pq"] == pq["Things"]["pq"] == pq["Stuff"]["pq"] == 1.0
    source = json.loads((PANOPTIC / "panoptic_examples.json").read_text())
    scored = {s["category_id"] for a in source["annotations"] for s in a["segments_info"] if not s["iscrowd"]}
    assert pq["All"]["n"] == len(scored)
    assert "| " in task.table


def test_semantic_ground_truth_through_evaluate_gives_miou_100(ade_shards):
    report, _ = evaluate_predictor(_oracle(ade_shards, _semantic_answer), ade_shards, Storage(), SETTINGS)
    sem = report.metrics["semantic"]
    assert sem["mIoU"] == sem["mACC"] == sem["pACC"] == 100.0
    assert sem["fwIoU"] == pytest.approx(100.0, abs=1e-9)  # a sum of IoU x frequency weights
    assert report.primary() == ("mIoU", 100.0)


def test_perturbed_predictions_score_below_identity(instance_shards, panoptic_shards, ade_shards):
    inst, _ = evaluate_predictor(_oracle(instance_shards, _instance_answer, 6), instance_shards, Storage(), SETTINGS)
    pan, _ = evaluate_predictor(_oracle(panoptic_shards, _panoptic_answer, 6), panoptic_shards, Storage(), SETTINGS)
    sem, _ = evaluate_predictor(_oracle(ade_shards, _semantic_answer, 6), ade_shards, Storage(), SETTINGS)
    assert inst.metrics["bbox"]["AP"] < 1.0 and inst.metrics["segm"]["AP"] < 1.0
    assert pan.metrics["panoptic"]["All"]["pq"] < 1.0
    assert sem.metrics["semantic"]["mIoU"] < 100.0


# ---------------------------------------------------------------- rank split
@pytest.mark.parametrize("n, world", [(0, 2), (1, 4), (3, 2), (10, 3), (12, 4)])
def test_rank_shares_cover_every_sample_once_with_equal_counts(n, world):
    shares = [rank_share(n, r, world) for r in range(world)]
    covered = [i for s in shares for i in range(s.start, s.stop)]
    assert covered == list(range(n))
    assert len({s.per_rank for s in shares}) == 1
    assert all(s.stop - s.start + s.padding == s.per_rank for s in shares)


def test_every_rank_yields_the_same_number_of_samples_with_padding_marked(ade_shards):
    storage = Storage()
    ranks = [list(iter_eval_samples(storage, ade_shards, r, 2)) for r in range(2)]
    assert [len(r) for r in ranks] == [2, 2]
    assert [s.key for s in ranks[0]] == ["ADE_val_00000001", "ADE_val_00000002"]
    assert [(s.key, s.is_padding) for s in ranks[1]] == [("ADE_val_00000003", False), ("ADE_val_00000003", True)]
    assert num_batches(3, 2, 1) == 2


# ---------------------------------------------------------------- two gloo ranks = one process
def _evaluate_rank(rank: int, world: int, init_file: str, manifest: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = evaluate_predictor(_oracle(manifest, _semantic_answer, 6), manifest, Storage(), SETTINGS)
        if rank == 0:
            report, _ = result
            Path(out).write_text(json.dumps(report.to_json()))
        else:
            assert result is None
    finally:
        dist.destroy_process_group()


def test_two_ranks_gather_to_the_single_process_report(ade_shards, tmp_path):
    single, _ = evaluate_predictor(_oracle(ade_shards, _semantic_answer, 6), ade_shards, Storage(), SETTINGS)
    out = tmp_path / "report.json"
    torch.multiprocessing.spawn(_evaluate_rank, args=(2, str(tmp_path / "init"), ade_shards, str(out)), nprocs=2)
    distributed = json.loads(out.read_text())
    assert distributed["world_size"] == 2 and distributed["batches_per_rank"] == 2
    assert distributed["num_images"] == single.num_images == 3
    assert distributed["metrics"] == json.loads(json.dumps(single.metrics))
    assert 0 < single.metrics["semantic"]["mIoU"] < 100
