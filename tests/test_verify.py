"""`verify-shards` finds what it promises to find: damaged bytes, missing shards, members of a
sample that are not adjacent, undecodable images, and count disagreements."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from core.manifest import Manifest
from core.storage import Storage
from data_prep.synthetic import SyntheticSpec, make_synthetic
from data_prep.verify import verify_shards
from tests.shard_helpers import run_shard


@pytest.fixture()
def sharded(tmp_path) -> Path:
    raw = tmp_path / "raw"
    make_synthetic(raw, SyntheticSpec(train_images=6, val_images=0, min_size=96, max_size=128,
                                      formats=("coco_panoptic",)))
    out = tmp_path / "out"
    run_shard(out, format="coco_panoptic", root=str(raw / "coco"), split="train", _extra={"shard.maxcount": 3})
    return out


def _rewrite_shard(out: Path, name: str, members: list[tuple[str, bytes]]) -> None:
    """Write a tar with the given members and update the manifest's checksum/size for it, so only
    the property under test is wrong."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for member_name, data in members:
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (out / name).write_bytes(buf.getvalue())
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    shards = [replace(s, sha256=hashlib.sha256(buf.getvalue()).hexdigest(), bytes=len(buf.getvalue()))
              if s.url == name else s for s in manifest.shards]
    (out / "manifest.json").write_text(replace(manifest, shards=shards).to_json())


def _members(out: Path, name: str) -> list[tuple[str, bytes]]:
    with tarfile.open(out / name) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_clean_shards_pass(sharded):
    report = verify_shards(Storage(), str(sharded / "manifest.json"))
    assert report.ok and report.samples == 6 and len(report.shards) == 2


def test_non_adjacent_members_are_reported(sharded):
    members = _members(sharded, "shard-000000.tar")
    first_json = next(i for i, (n, _) in enumerate(members) if n.endswith(".json"))
    moved = members[first_json]
    members = members[:first_json] + members[first_json + 1:] + [moved]
    _rewrite_shard(sharded, "shard-000000.tar", members)
    report = verify_shards(Storage(), str(sharded / "manifest.json"))
    assert any("not adjacent" in p for p in report.problems)


def test_undecodable_image_and_missing_member_are_reported(sharded):
    members = _members(sharded, "shard-000001.tar")
    first_key, last_key = members[0][0].split(".")[0], members[-1][0].split(".")[0]
    members = [(n, b"not a jpeg" if n == f"{first_key}.jpg" else d) for n, d in members if n != f"{last_key}.png"]
    _rewrite_shard(sharded, "shard-000001.tar", members)
    problems = verify_shards(Storage(), str(sharded / "manifest.json")).problems
    assert any("undecodable_image" in p or "not a readable image" in p for p in problems)
    assert any("no .png label member" in p for p in problems)


def test_missing_shard_and_count_mismatch_are_reported(sharded):
    (sharded / "shard-000001.tar").unlink()
    manifest = json.loads((sharded / "manifest.json").read_text())
    manifest["shards"][0]["samples"] += 1
    (sharded / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_shards(Storage(), str(sharded / "manifest.json")).problems
    assert any("shard-000001.tar: shard file is missing" in p for p in problems)
    assert any("3 samples, manifest says 4" in p for p in problems)


def test_cli_exit_codes(sharded):
    cli = [sys.executable, "-m", "cli", "verify-shards", str(sharded / "manifest.json")]
    ok = subprocess.run(cli, capture_output=True, text=True)
    assert ok.returncode == 0 and "all checks passed" in ok.stdout
    data = bytearray((sharded / "shard-000000.tar").read_bytes())
    data[600] ^= 1
    (sharded / "shard-000000.tar").write_bytes(bytes(data))
    bad = subprocess.run(cli, capture_output=True, text=True)
    assert bad.returncode == 1 and "sha256" in bad.stderr and "Traceback" not in bad.stderr
