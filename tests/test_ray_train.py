"""Training under Ray Train (orchestration/ray_train.py): two workers on local Ray run the same trainer
as `maskdino train`; a worker killed mid-training is restarted by Ray Train, the stage completes from its
last complete checkpoint, and the MLflow run holds one continuous step history."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.synthetic import SyntheticSpec, make_synthetic
from orchestration.ray_train import Scaling, TrainJob, run_training
from pipeline.mlflow_tracking import (
    client,
    default_tracking_uri,
    ensure_experiment,
    start_run,
)
from pipeline.train_config import load_train_config
from tests.shard_helpers import run_shard

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300_000_000)
    yield
    ray.shutdown()


def test_a_killed_worker_is_restarted_and_the_stage_completes_from_its_checkpoint(local_ray, tmp_path):
    raw = tmp_path / "raw"
    make_synthetic(raw, SyntheticSpec(train_images=8, val_images=0, min_size=96, max_size=128, seed=1,
                                      formats=("coco_instances",)))
    shards = tmp_path / "shards"
    run_shard(shards, _extra={"shard.maxcount": 4}, format="coco_instances", root=str(raw / "coco"), split="train")
    run_dir = tmp_path / "run"
    cfg = load_train_config(ROOT / "configs" / "train" / "tiny_instance.yaml", [
        f"run_dir={run_dir}", f"data.manifest={shards / 'manifest.json'}", "data.num_workers=0",
        "schedule.max_steps=8", "checkpoint.every_steps=3", f"checkpoint.local_dir={tmp_path / 'local'}",
        "faults.crash_after_step=5"])
    uri = default_tracking_uri(str(tmp_path))
    run_id = start_run(uri, ensure_experiment(uri, "ray-train-test"), "finetune_instance")

    # Every worker exits hard after step 5 in the first attempt; the restarted group resumes from step 3.
    job = TrainJob(cfg, tracking_uri=uri, mlflow_run_id=run_id, system_metrics_interval_s=1.0)
    outcome = run_training(job, Scaling(workers=2), max_failures=1, storage_path=str(tmp_path / "ray"),
                           name="finetune_instance")

    assert outcome.steps == 8 and outcome.bundle == f"{run_dir}/model"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in records]
    assert logged[:5] == [1, 2, 3, 4, 5] and logged[5:] == [4, 5, 6, 7, 8]  # the restart replays 4-5
    first, replay = {r["step"]: r["loss/total"] for r in records[:5]}, {r["step"]: r["loss/total"] for r in records[5:]}
    assert replay[4] == first[4] and replay[5] == first[5]  # exact resume under Ray Train too
    history = client(uri).get_metric_history(run_id, "loss/total")
    by_step: dict[int, set[float]] = {}
    for m in history:
        by_step.setdefault(m.step, set()).add(m.value)
    assert sorted(by_step) == list(range(1, 9))  # one continuous history, no gap
    assert all(len(values) == 1 for values in by_step.values())  # a replayed step repeats its value
    # system metrics from the one node, continued (not restarted at step 0) by the restarted worker group
    cpu = client(uri).get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and all(0 <= m.value <= 100 * 64 for m in cpu)
    assert len({m.step for m in cpu}) == len(cpu)
    assert client(uri).get_metric_history(run_id, "system/system_memory_usage_megabytes")
