"""The demo pipeline end to end on local Ray (issue 6, acceptance 1 and 2): `configs/pipeline/demo.yaml`
on the synthetic data `make demo` generates. Every stage runs; the three tasks get a `champion` whose
metric is clearly above the untrained model's on the same validation images (both printed); a second
run skips every stage without starting Ray; a changed fine-tune reruns only itself, its evaluation and
its registration."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

from data_prep.synthetic import SyntheticSpec, make_synthetic
from orchestration.run_pipeline import run_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "pipeline" / "demo.yaml")
SHARDS = ("shard_objects365", "shard_coco_instances", "shard_coco_panoptic", "shard_ade20k")
TASKS = {"instance": "maskdino-demo-instance", "panoptic": "maskdino-demo-panoptic",
         "semantic": "maskdino-demo-semantic"}
STAGES = (*SHARDS, "pretrain", *(f"{kind}_{task}" for kind in ("finetune", "evaluate", "register") for task in TASKS))
# "Clearly above": AP and PQ are fractions (0.05 = 5 points), mIoU is in percent.
MARGIN = {"mask AP": 0.05, "PQ": 0.05, "mIoU": 3.0}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The raw data exactly as `make demo` writes it, in a working directory of its own (demo.yaml names
    its source roots relative to the working directory), and the first run of the pipeline."""
    work = tmp_path_factory.mktemp("demo")
    make_synthetic(work / "demo_out" / "raw", SyntheticSpec(train_images=48, val_images=16, o365_categories=365))
    patch = pytest.MonkeyPatch()
    patch.chdir(work)
    run_root = work / "pipeline"
    started = time.perf_counter()
    outcome = run_pipeline(DEMO, overrides=(f"run_root={run_root}",))
    print(f"first run: {time.perf_counter() - started:.0f} s")
    yield outcome, run_root
    patch.undo()


def test_every_stage_runs_and_each_task_gets_a_champion_above_the_untrained_model(demo_run):
    outcome, run_root = demo_run
    assert {n: s.status for n, s in outcome.stages.items()} == dict.fromkeys(STAGES, "ran"), \
        {n: s.error for n, s in outcome.stages.items() if s.error}
    registry = MlflowClient(outcome.tracking_uri)
    for task, name in TASKS.items():
        evaluated = outcome.stages[f"evaluate_{task}"].result
        metric, trained, untrained = evaluated["metric_name"], evaluated["metric"], evaluated["untrained_metric"]
        print(f"{task}: {metric} trained {trained:.4f} vs untrained {untrained:.4f}")
        assert trained >= untrained + MARGIN[metric], (task, metric, trained, untrained)
        champion = registry.get_model_version_by_alias(name, "champion")
        assert int(champion.version) == int(outcome.stages[f"register_{task}"].result["version"]) == 1
        assert champion.tags["metric_name"] == metric and float(champion.tags["metric_value"]) == pytest.approx(trained)
        pictures = [Path(p) for p in evaluated["pictures"]]  # per image one picture per output kind
        assert len({p.name.split(".")[0] for p in pictures}) == 2 and all(p.stat().st_size > 0 for p in pictures)
    # one parent run with a nested run per stage; a training stage's run has its history, curve and system metrics
    runs = registry.search_runs([registry.get_run(outcome.parent_run_id).info.experiment_id])
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == outcome.parent_run_id}
    assert set(children) == set(STAGES)
    finetune = children["finetune_instance"].info.run_id
    assert sorted(m.step for m in registry.get_metric_history(finetune, "loss/total")) == list(range(1, 401))
    assert "loss_curve.png" in {a.path for a in registry.list_artifacts(finetune)}
    assert registry.get_metric_history(finetune, "system/cpu_utilization_percentage")
    evaluate_run = children["evaluate_panoptic"].info.run_id
    assert {"report.json", "per_class.md", "untrained", "pictures"} <= {a.path for a in registry.list_artifacts(evaluate_run)}
    assert (run_root / "mlflow.db").is_file()


def test_second_run_skips_everything_and_a_changed_finetune_reruns_only_its_branch(demo_run):
    first, run_root = demo_run
    started = time.perf_counter()
    again = run_pipeline(DEMO, overrides=(f"run_root={run_root}",))
    print(f"second run: every stage cached, {time.perf_counter() - started:.1f} s")
    assert {n: s.status for n, s in again.stages.items()} == dict.fromkeys(STAGES, "skipped")
    assert not ray.is_initialized()  # all cached: no cluster was started

    # The semantic fine-tune with fewer steps: it, its evaluation and its registration run, nothing else.
    changed = ("stages.finetune_semantic.overrides=[schedule.max_steps=20, 'schedule.milestones=[18]', "
               "checkpoint.every_steps=10, optim.lr=4e-4]")
    third = run_pipeline(DEMO, overrides=(f"run_root={run_root}", changed))
    branch = {"finetune_semantic", "evaluate_semantic", "register_semantic"}
    assert {n: s.status for n, s in third.stages.items()} == {n: "ran" if n in branch else "skipped" for n in STAGES}
    assert int(third.stages["register_semantic"].result["version"]) == 2
    before, after = first.stages["evaluate_semantic"].result["metric"], third.stages["evaluate_semantic"].result["metric"]
    champion = MlflowClient(third.tracking_uri).get_model_version_by_alias(TASKS["semantic"], "champion")
    assert int(champion.version) == (2 if after > before else 1)  # champion moves only to a better model
