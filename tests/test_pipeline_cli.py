"""`maskdino run` refuses a bad pipeline before anything starts (issue 6, acceptance 7): an unknown stage
kind, a missing run config and a cycle each exit 2 with one line, in `--dry-run` and in a real run, and
leave no run folder, MLflow database or Ray session behind."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CFG = os.path.join(ROOT, "configs", "train", "tiny_instance.yaml")
SHARD_CFG = os.path.join(ROOT, "configs", "data", "demo_coco_instances.yaml")


def _shard() -> dict:
    return {"kind": "shard", "config": SHARD_CFG}


def _train(**kw) -> dict:
    return {"kind": "train", "config": TRAIN_CFG, "inputs": {"data": "shard"}, **kw}


BAD = {
    "unknown_kind": ({"shard": _shard(), "ft": _train(), "polish": {"kind": "polish", "inputs": {"model": "ft"}}},
                     "stages.polish.kind"),
    "missing_run_config": ({"shard": _shard(), "ft": _train(config="nowhere/tiny.yaml")},
                           "run config file nowhere/tiny.yaml not found"),
    "cycle": ({"shard": _shard(), "a": _train(inputs={"data": "shard", "init": "b"}),
               "b": _train(inputs={"data": "shard", "init": "a"})}, "cycle: a -> b -> a"),
}


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_pipeline_fails_before_anything_starts(tmp_path, case, dry_run):
    stages, needle = BAD[case]
    run_root = tmp_path / "run"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "run_root": str(run_root), "stages": stages}, sort_keys=False))
    ray_sessions = set(os.listdir("/tmp/ray")) if os.path.isdir("/tmp/ray") else set()

    args = [sys.executable, "-m", "cli", "run", str(path), *(["--dry-run"] if dry_run else [])]
    done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)

    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config error: ") and needle in lines[0], done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stdout == ""  # not even the plan: validation comes first
    assert not run_root.exists()  # no stage folder, no mlflow.db
    now = set(os.listdir("/tmp/ray")) if os.path.isdir("/tmp/ray") else set()
    assert now == ray_sessions  # no Ray session was started
