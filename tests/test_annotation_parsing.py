"""The two ways an annotation file is read — one `json.load` for small files, ijson streaming per
section for large ones — give the same shards, the same rejects and the same errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from data_prep.sources import SourceError
from data_prep.sources import coco_json
from data_prep.synthetic import SyntheticSpec, make_synthetic
from tests.shard_helpers import run_shard


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    make_synthetic(root, SyntheticSpec(train_images=8, val_images=0, min_size=96, max_size=128, seed=11,
                                       formats=("coco_instances", "coco_panoptic", "objects365_v2")))
    return root


@pytest.fixture(params=["load", "stream"])
def reading(request, monkeypatch) -> str:
    if request.param == "stream":
        monkeypatch.setattr(coco_json, "SMALL_FILE_BYTES", 0)
    return request.param


SOURCES = {
    "coco_instances": dict(format="coco_instances", sub="coco"),
    "coco_panoptic": dict(format="coco_panoptic", sub="coco"),
    "objects365_v2": dict(format="objects365", sub="objects365_v2", version="v2"),
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_streamed_and_loaded_files_shard_identically(raw, tmp_path, monkeypatch, name):
    spec = dict(SOURCES[name])
    root = raw / spec.pop("sub")
    outputs = {}
    for mode, limit in (("load", coco_json.SMALL_FILE_BYTES), ("stream", 0)):
        monkeypatch.setattr(coco_json, "SMALL_FILE_BYTES", limit)
        run_shard(tmp_path / mode, root=str(root), split="train", **spec)
        outputs[mode] = {p.name: p.read_bytes() for p in (tmp_path / mode).iterdir() if p.is_file()}
    assert outputs["load"] == outputs["stream"]
    assert {"manifest.json", "rejects.jsonl", "shard-000000.tar"} <= set(outputs["load"])


def _write_with_nan_box(raw: Path, tmp_path: Path) -> tuple[Path, int]:
    src = raw / "coco"
    doc = json.loads((src / "annotations" / "instances_train2017.json").read_text())
    doc["annotations"][0]["bbox"][2] = math.nan  # json.dumps writes a bare NaN, as Python tools do
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(doc))
    (root / "train2017").symlink_to(src / "train2017")
    return root, doc["annotations"][0]["id"]


def test_nan_literal_is_one_degenerate_box_either_way(raw, tmp_path, reading):
    root, ann_id = _write_with_nan_box(raw, tmp_path)
    summary = run_shard(tmp_path / "out", format="coco_instances", root=str(root), split="train")
    assert summary.rejects_by_reason == {"degenerate_box": 1}
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert rejects[0]["annotation_id"] == ann_id and "nan" in rejects[0]["detail"]


def test_broken_json_is_one_line_source_error_either_way(raw, tmp_path, reading):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train2017.json").write_text('{"images": [{"id": 1,\n"file_name": ')
    (root / "train2017").symlink_to(raw / "coco" / "train2017")
    with pytest.raises(SourceError) as err:
        run_shard(tmp_path / "out", format="coco_instances", root=str(root), split="train")
    message = str(err.value)
    assert "\n" not in message and "not valid JSON" in message and "instances_train2017.json" in message
