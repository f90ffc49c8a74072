"""The pipeline scheduler (orchestration/run_pipeline.py) with stand-in stage runners: independent
fine-tunes run side by side when the cluster has the CPUs for both, one after another when it does not,
and a failed stage stops the pipeline (what runs finishes, nothing new starts). No Ray, no training: the runners only record."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from core.storage import Storage, StorageConfig
from orchestration import run_pipeline as executor
from orchestration.pipeline_config import load_pipeline
from orchestration.plan import make_plan
from pipeline.mlflow_tracking import default_tracking_uri, ensure_experiment, start_run

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "pipeline" / "demo.yaml")


class Recorder:
    """Stand-in runners: count the train and evaluate stages running at once (each needs
    workers x cpus_per_worker = 2 CPUs in demo.yaml)."""

    def __init__(self, parallel: bool = False, fail: str = ""):
        self.lock = threading.Lock()
        self.running: set[str] = set()
        self.peak = 0
        self.order: list[str] = []
        self.fail = fail
        self.parallel = parallel
        self.both_finetunes = threading.Barrier(2, timeout=20)

    def runner(self, s, name, run_id):
        with self.lock:
            self.order.append(name)
            if s.plan.stages[name].kind in ("train", "evaluate"):
                self.running.add(name)
            self.peak = max(self.peak, len(self.running))
        try:
            if name == self.fail:
                raise RuntimeError(f"{name} broke\nat the last line")
            if self.parallel and name in ("finetune_instance", "finetune_panoptic"):
                self.both_finetunes.wait()  # returns only when the other fine-tune is running too
            return {"ran": name}
        finally:
            with self.lock:
                self.running.discard(name)


def _schedule(tmp_path, monkeypatch, cpus: float, recorder: Recorder) -> executor.PipelineOutcome:
    monkeypatch.chdir(tmp_path)
    pipeline = load_pipeline(DEMO, [f"run_root={tmp_path / 'run'}"])
    storage = Storage(StorageConfig())
    plan = make_plan(pipeline, storage)
    uri = default_tracking_uri(str(tmp_path))
    experiment = ensure_experiment(uri, "scheduler-test")
    outcome = executor.PipelineOutcome(plan, uri, start_run(uri, experiment, "parent"), {})
    monkeypatch.setattr(executor, "RUNNERS", dict.fromkeys(("shard", "train", "evaluate", "register"), recorder.runner))
    monkeypatch.setattr(executor._Scheduler, "_cpus", lambda self: cpus)
    executor._Scheduler(plan, storage, outcome, experiment).run()
    return outcome


def test_independent_finetunes_run_side_by_side_when_cpus_allow(tmp_path, monkeypatch):
    recorder = Recorder(parallel=True)
    outcome = _schedule(tmp_path, monkeypatch, cpus=4, recorder=recorder)
    assert outcome.ok and all(s.status == "ran" for s in outcome.stages.values())
    assert recorder.peak == 2  # two 2-CPU stages on 4 CPUs, never three
    order = recorder.order
    assert order.index("pretrain") < min(order.index("finetune_instance"), order.index("finetune_panoptic"))


def test_one_stage_at_a_time_when_each_needs_every_cpu(tmp_path, monkeypatch):
    recorder = Recorder()
    outcome = _schedule(tmp_path, monkeypatch, cpus=2, recorder=recorder)
    assert outcome.ok
    assert recorder.peak == 1


@pytest.mark.parametrize("broken", ["finetune_panoptic"])
def test_a_failed_stage_stops_the_pipeline_and_reports_its_last_line(tmp_path, monkeypatch, broken):
    recorder = Recorder(fail=broken)
    outcome = _schedule(tmp_path, monkeypatch, cpus=2, recorder=recorder)
    assert not outcome.ok
    assert outcome.stages[broken].status == "failed" and outcome.stages[broken].error == "at the last line"
    for after in ("evaluate_panoptic", "register_panoptic"):
        assert outcome.stages[after].status == "not run"
    assert "FAILED finetune_panoptic: at the last line" in executor.summary(outcome)
    assert not (tmp_path / "run" / "stages" / broken / "LATEST.json").exists()  # retried next time
