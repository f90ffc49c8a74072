"""Acceptance 4: sharding to s3:// against a moto server on 127.0.0.1 (started by the fixture):
boto3 lists the shards, `maskdino verify-shards` passes on the S3 manifest, and injected transient
S3 errors (503 on upload, a body cut mid-read) are retried without changing a byte."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from core.manifest import load_manifest
from data_prep.shard import shard_dataset
from data_prep.synthetic import SyntheticSpec, make_synthetic
from tests.s3_fixtures import TEST_REGION
from tests.shard_helpers import run_shard, shard_config

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    make_synthetic(root, SyntheticSpec(train_images=10, val_images=0, min_size=96, max_size=128, seed=7,
                                       formats=("coco_panoptic",)))
    return root


def _upload_tree(storage, local: Path, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_bytes(f"{prefix}/{path.relative_to(local).as_posix()}", path.read_bytes())


def _s3_config(output: str, endpoint: str, executor: str = "inline", **source):
    return shard_config(output, executor, _extra={"shard.maxcount": 3, "storage.endpoint_url": endpoint,
                                                  "storage.region": TEST_REGION,
                                                  "storage.backoff_base_s": 0.01}, **source)


@pytest.mark.ray
def test_shard_to_s3_on_ray_lists_and_verifies(raw, tmp_path, s3_server, s3_bucket, ray_local):
    storage, bucket = s3_bucket
    output = f"{bucket}/shards/coco_panoptic/train"
    summary = shard_dataset(_s3_config(output, s3_server, "ray", format="coco_panoptic",
                                       root=str(raw / "coco"), split="train"))
    assert summary.shards == 4 and summary.samples == 10
    client = boto3.client("s3", endpoint_url=s3_server, region_name=TEST_REGION)
    listed = client.list_objects_v2(Bucket=bucket[5:], Prefix="shards/coco_panoptic/train/")
    keys = {o["Key"].rsplit("/", 1)[-1]: o["Size"] for o in listed["Contents"]}
    manifest = load_manifest(storage, f"{output}/manifest.json")
    for entry in manifest.shards:
        assert keys[entry.url] == entry.bytes
        body = client.get_object(Bucket=bucket[5:], Key=f"shards/coco_panoptic/train/{entry.url}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry.sha256
    assert "manifest.json" in keys and "rejects.jsonl" in keys
    # Same bytes as a local run of the same input.
    local = run_shard(tmp_path / "local", _extra={"shard.maxcount": 3}, format="coco_panoptic",
                      root=str(raw / "coco"), split="train")
    assert local.samples == summary.samples
    assert (tmp_path / "local" / "manifest.json").read_bytes() == storage.read_bytes(f"{output}/manifest.json")

    verify = subprocess.run([sys.executable, "-m", "cli", "verify-shards", f"{output}/manifest.json",
                             f"endpoint_url={s3_server}", f"region={TEST_REGION}"],
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stderr
    assert "all checks passed" in verify.stdout and "10 samples" in verify.stdout


def test_verify_shards_reports_a_damaged_s3_shard(raw, s3_server, s3_bucket):
    storage, bucket = s3_bucket
    output = f"{bucket}/damaged"
    shard_dataset(_s3_config(output, s3_server, format="coco_panoptic", root=str(raw / "coco"), split="train"))
    victim = f"{output}/shard-000002.tar"
    data = bytearray(storage.read_bytes(victim))
    data[700] ^= 0x55
    storage.write_bytes(victim, bytes(data))
    verify = subprocess.run([sys.executable, "-m", "cli", "verify-shards", f"{output}/manifest.json",
                             f"endpoint_url={s3_server}", f"region={TEST_REGION}"],
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 1
    assert "shard-000002.tar" in verify.stderr and "sha256" in verify.stderr


def test_s3_source_and_output_survive_injected_transient_errors(raw, tmp_path, fault_proxy, s3_server, s3_bucket):
    storage, bucket = s3_bucket
    _upload_tree(storage, raw / "coco", f"{bucket}/raw/coco")
    clean = run_shard(tmp_path / "clean", _extra={"shard.maxcount": 3}, format="coco_panoptic",
                      root=str(raw / "coco"), split="train")
    # 503 SlowDown on the first two uploads of one shard, and an image body cut after 100 bytes.
    fault_proxy.fail_next(2, "PUT", path_contains="shard-000001.tar")
    image = sorted((raw / "coco" / "train2017").iterdir())[4].name
    fault_proxy.cut_next(1, after_bytes=100, path_contains=image)
    output = f"{bucket}/through-proxy"
    summary = shard_dataset(_s3_config(output, fault_proxy.endpoint_url, format="coco_panoptic",
                                       root=f"{bucket}/raw/coco", split="train"))
    assert fault_proxy.faults == 2 and fault_proxy.cuts == 1
    assert summary.samples == clean.samples and summary.rejects_by_reason == {}
    manifest = load_manifest(storage, f"{output}/manifest.json")
    local_manifest = (tmp_path / "clean" / "manifest.json").read_bytes()
    assert storage.read_bytes(f"{output}/manifest.json") == local_manifest
    assert all(storage.stat(f"{output}/{s.url}").size == s.bytes for s in manifest.shards)
