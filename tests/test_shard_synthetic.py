"""Acceptance 2 and 3: synthetic sets in all four layouts shard; stock webdataset and `tar -tf`
read them; members of a sample are adjacent; identical input gives identical manifests and shard
bytes; a run killed midway and re-run equals an uninterrupted run; Ray gives the same bytes."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.synthetic import SyntheticSpec, make_synthetic
from tests.shard_helpers import read_manifest, read_samples, run_shard, tar_member_names

LAYOUTS = {
    "coco_instances": dict(format="coco_instances", sub="coco"),
    "coco_panoptic": dict(format="coco_panoptic", sub="coco"),
    "ade20k": dict(format="ade20k", sub="ADEChallengeData2016"),
    "objects365_v1": dict(format="objects365", sub="objects365_v1", version="v1"),
    "objects365_v2": dict(format="objects365", sub="objects365_v2", version="v2"),
}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    make_synthetic(root, SyntheticSpec(train_images=12, val_images=4, min_size=96, max_size=160, seed=3))
    return root


def _source(raw: Path, layout: str, split: str = "train") -> dict:
    spec = dict(LAYOUTS[layout])
    sub = spec.pop("sub")
    return dict(root=str(raw / sub), split=split, **spec)


def _shard_hashes(output: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(output.glob("*.tar"))}


def _assert_adjacent(names: list[str]) -> None:
    keys = [n.split(".", 1)[0] for n in names]
    runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    assert len(runs) == len(set(runs)), "a sample's members are split across the tar"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_shards_and_stock_readers_read_it(raw, tmp_path, layout):
    source = _source(raw, layout)
    summary = run_shard(tmp_path, _extra={"shard.maxcount": 5}, **source)
    manifest = read_manifest(tmp_path)
    assert summary.shards == len(manifest.shards) >= 2
    samples = read_samples(tmp_path)  # stock webdataset.WebDataset
    assert len(samples) == manifest.counts.samples == summary.samples > 0
    for entry in manifest.shards:
        path = tmp_path / entry.url
        listed = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True).stdout.split()
        assert listed == tar_member_names(path)
        _assert_adjacent(listed)
        assert entry.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry.bytes == path.stat().st_size
    expected_members = {"coco_panoptic": {"jpg", "json", "png"}, "ade20k": {"jpg", "json", "png"}}
    for sample in samples.values():
        members = {k for k in sample if not k.startswith("__")}
        assert members == expected_members.get(layout, {"jpg", "json"})
    cat_ids = {c.id for c in manifest.categories}
    for sample in samples.values():
        for ann in sample["json"].get("annotations", []):
            assert ann["category_id"] in cat_ids  # dataset ids kept, not contiguous ids


def test_categories_keep_dataset_ids_and_define_contiguous_order(raw, tmp_path):
    run_shard(tmp_path, **_source(raw, "coco_panoptic"))
    manifest = read_manifest(tmp_path)
    ids = [c.id for c in manifest.categories]
    assert ids == sorted(ids) and ids != list(range(1, len(ids) + 1))  # gaps kept
    assert max(ids) >= 92 and any(not c.isthing for c in manifest.categories)
    assert manifest.contiguous_ids()[ids[-1]] == len(ids) - 1


def test_objects365_v2_categories_unsorted_in_source_sorted_in_manifest(raw, tmp_path):
    src = json.loads((raw / "objects365_v2" / "annotations" / "zhiyuan_objv2_train.json").read_text())
    listed = [c["id"] for c in src["categories"]]
    assert listed != sorted(listed)
    run_shard(tmp_path, **_source(raw, "objects365_v2"))
    manifest = read_manifest(tmp_path)
    assert [c.id for c in manifest.categories] == sorted(listed)
    names = {c["id"]: c["name"] for c in src["categories"]}
    assert all(c.name == names[c.id] for c in manifest.categories)
    assert manifest.counts.rejects_by_reason.get("missing_file", 0) >= 1
    assert manifest.counts.rejects_by_reason.get("duplicate_annotation", 0) >= 1


def test_same_input_twice_gives_identical_manifest_and_shards(raw, tmp_path):
    for out in ("a", "b"):
        run_shard(tmp_path / out, _extra={"shard.maxcount": 4}, **_source(raw, "coco_instances"))
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    assert (tmp_path / "a" / "rejects.jsonl").read_bytes() == (tmp_path / "b" / "rejects.jsonl").read_bytes()
    assert _shard_hashes(tmp_path / "a") == _shard_hashes(tmp_path / "b")


def test_rerun_skips_published_shards_and_rewrites_a_corrupted_one(raw, tmp_path):
    source = _source(raw, "coco_panoptic")
    first = run_shard(tmp_path, _extra={"shard.maxcount": 4}, **source)
    hashes = _shard_hashes(tmp_path)
    second = run_shard(tmp_path, _extra={"shard.maxcount": 4}, **source)
    assert second.shards_reused == second.shards == first.shards
    victim = tmp_path / "shard-000001.tar"
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF  # same size, wrong checksum
    victim.write_bytes(bytes(data))
    third = run_shard(tmp_path, _extra={"shard.maxcount": 4}, **source)
    assert third.shards_reused == third.shards - 1
    assert _shard_hashes(tmp_path) == hashes


def test_killed_run_rerun_equals_uninterrupted_run(tmp_path):
    raw = tmp_path / "raw"
    make_synthetic(raw, SyntheticSpec(train_images=60, val_images=0, min_size=96, max_size=128, seed=5,
                                      formats=("coco_instances",)))
    args = ["shard", "--inline", "source.format=coco_instances", f"source.root={raw / 'coco'}",
            "source.split=train", "shard.maxcount=1", "progress=false"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    cli = [sys.executable, "-m", "cli"]
    subprocess.run(cli + args + [f"output={clean}"], check=True, capture_output=True)

    proc = subprocess.Popen(cli + args + [f"output={killed}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = killed / "_parts"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(parts.glob("*.json")) if parts.exists() else []) < 3:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(parts.glob("*.json")))
    assert 3 <= done < 60, "the run should have been killed midway"
    assert not (killed / "manifest.json").exists()
    # A torn write from the killed process (temp name) must never be taken for a shard.
    (killed / ".shard-000059.tar.tmp-deadbeef").write_bytes(b"partial")
    subprocess.run(cli + args + [f"output={killed}"], check=True, capture_output=True)
    assert (killed / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()
    assert _shard_hashes(killed) == _shard_hashes(clean)
    assert len(_shard_hashes(clean)) == 60


@pytest.mark.ray
def test_ray_fanout_writes_the_same_bytes_as_inline(raw, tmp_path, ray_local):
    source = _source(raw, "coco_panoptic")
    ray_summary = run_shard(tmp_path / "ray", executor="ray", _extra={"shard.maxcount": 3}, **source)
    run_shard(tmp_path / "inline", _extra={"shard.maxcount": 3}, **source)
    assert ray_summary.shards == 4
    assert (tmp_path / "ray" / "manifest.json").read_bytes() == (tmp_path / "inline" / "manifest.json").read_bytes()
    assert _shard_hashes(tmp_path / "ray") == _shard_hashes(tmp_path / "inline")


def test_damaged_sidecar_means_rewrite_not_crash(raw, tmp_path):
    source = _source(raw, "objects365_v1")
    first = run_shard(tmp_path, _extra={"shard.maxcount": 5}, **source)
    hashes = _shard_hashes(tmp_path)
    (tmp_path / "_parts" / "shard-000000.tar.json").write_text("{not json")
    second = run_shard(tmp_path, _extra={"shard.maxcount": 5}, **source)
    assert second.shards_reused == first.shards - 1
    assert _shard_hashes(tmp_path) == hashes
