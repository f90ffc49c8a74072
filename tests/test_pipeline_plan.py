"""The pipeline's declarative side (orchestration/pipeline_config.py, orchestration/plan.py): schema and
validation, stage graph, keys, markers, --force and the dry-run table. Fast: no Ray, no training."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

from core.storage import Storage, StorageConfig
from orchestration.pipeline_config import EvaluateStage, RegisterStage, ShardStage, TrainStage, load_pipeline
from orchestration.plan import (
    CODE_DIRS,
    code_version,
    format_plan,
    git_revision,
    input_bundle,
    input_manifest,
    input_report,
    make_plan,
    read_success,
    shard_configs,
    train_config,
    write_success,
)
from core.config import ConfigError
from pipeline.eval_settings import EvalSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "pipeline", "demo.yaml")
CLUSTER = os.path.join(ROOT, "configs", "pipeline", "cluster_example.yaml")
TRAIN_CFG = os.path.join(ROOT, "configs", "train", "tiny_instance.yaml")
SHARD_CFG = os.path.join(ROOT, "configs", "data", "demo_coco_instances.yaml")
CODE = "c0de" * 16  # a fixed code version keeps the key tests independent of concurrent edits

SHARDS = ("shard_objects365", "shard_coco_instances", "shard_coco_panoptic", "shard_ade20k")
FINETUNES = ("finetune_instance", "finetune_panoptic", "finetune_semantic")
FROM_PRETRAIN = ("finetune_instance", "finetune_panoptic")
EVALS = ("evaluate_instance", "evaluate_panoptic", "evaluate_semantic")
REGISTERS = ("register_instance", "register_panoptic", "register_semantic")
ORDER = (*SHARDS, "pretrain", *FINETUNES, *EVALS, *REGISTERS)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty folder: the demo's relative source roots then point at nothing (hermetic)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def storage():
    return Storage(StorageConfig())


def demo(workdir, *overrides):
    return load_pipeline(DEMO, [f"run_root={workdir / 'run'}", *overrides])


def plan_of(pipeline, storage, force=()):
    return make_plan(pipeline, storage, force=force, code=CODE)


def mark_all(plan, storage):
    for name in plan.to_run:
        write_success(storage, plan, name, {"metric": 1.0})


def runs(plan):
    return {n for n, s in plan.stages.items() if s.runs}


# ----------------------------------------------------------------------------- demo.yaml


def test_demo_plans_every_stage_in_order_with_the_fine_tunes_in_one_level(workdir, storage):
    pipeline = demo(workdir)
    plan = plan_of(pipeline, storage)
    assert tuple(plan.stages) == ORDER == pipeline.graph.order
    assert all(s.status == "run" and s.reason == "new: no earlier success" for s in plan.stages.values())
    # the semantic fine-tune starts from scratch (3 encoder levels, the pretrain has 4), so it runs beside
    # the pretrain; the two COCO fine-tunes wait for it and run side by side
    assert plan.levels == (SHARDS, ("pretrain", "finetune_semantic"),
                           ("finetune_instance", "finetune_panoptic", "evaluate_semantic"),
                           ("evaluate_instance", "evaluate_panoptic", "register_semantic"),
                           ("register_instance", "register_panoptic"))
    assert set(pipeline.graph.descendants("pretrain")) == {*FROM_PRETRAIN, *EVALS[:2], *REGISTERS[:2]}
    assert pipeline.graph.descendants("finetune_semantic") == ("evaluate_semantic", "register_semantic")
    # the raw data is absent here: recorded, and said in the table
    assert any("source file missing" in n for n in plan["shard_coco_instances"].notes)
    table = format_plan(plan)
    assert "14 stages, 14 to run, 0 cached" in table
    for name in ORDER:
        assert f"  {name} " in table
    for name, s in plan.stages.items():
        assert s.output == str(workdir / "run" / "stages" / name / s.key[:12])


def test_cluster_example_validates():
    pipeline = load_pipeline(CLUSTER)
    assert pipeline.cfg.run_root.startswith("s3://") and pipeline.cfg.scaling.workers == 8
    assert pipeline.cfg.scaling.use_gpu and pipeline.cfg.tracking_uri.startswith("http")
    assert set(pipeline.graph.descendants("pretrain")) >= {"finetune_instance", "finetune_panoptic"}


def test_wiring_helpers_point_at_upstream_outputs(workdir, storage):
    plan = plan_of(demo(workdir), storage)
    out = {n: s.output for n, s in plan.stages.items()}
    cfg = train_config(plan, "finetune_instance")
    assert cfg.run_dir == out["finetune_instance"]
    assert cfg.data.manifest == os.path.join(out["shard_coco_instances"], "train", "manifest.json")
    assert cfg.init_from == os.path.join(out["pretrain"], "model")
    assert train_config(plan, "pretrain").schedule.max_steps == 100  # the stage's override
    assert input_manifest(plan, "evaluate_panoptic") == os.path.join(out["shard_coco_panoptic"], "val", "manifest.json")
    assert input_bundle(plan, "register_semantic") == os.path.join(out["finetune_semantic"], "model")
    assert input_report(plan, "register_instance") == os.path.join(out["evaluate_instance"], "report.json")
    splits = shard_configs(plan, "shard_ade20k")
    assert [(c.source.split, c.output) for c in splits] == [
        ("train", os.path.join(out["shard_ade20k"], "train")), ("val", os.path.join(out["shard_ade20k"], "val"))]


# ----------------------------------------------------------------------------- keys


def test_keys_are_stable_and_a_changed_override_rekeys_only_that_stage_and_its_descendants(workdir, storage):
    a = plan_of(demo(workdir), storage)
    b = plan_of(demo(workdir), storage)
    assert {n: s.key for n, s in a.stages.items()} == {n: s.key for n, s in b.stages.items()}
    # moving run_root keeps every key (keys hold upstream keys, not paths)
    moved = make_plan(load_pipeline(DEMO, [f"run_root={workdir / 'elsewhere'}"]), storage, code=CODE)
    assert {n: s.key for n, s in moved.stages.items()} == {n: s.key for n, s in a.stages.items()}

    changed = plan_of(demo(workdir, "stages.finetune_panoptic.overrides=[optim.lr=2.0e-4]"), storage)
    rekeyed = {n for n in ORDER if changed[n].key != a[n].key}
    assert rekeyed == {"finetune_panoptic", "evaluate_panoptic", "register_panoptic"}
    # and the code version rekeys everything
    other_code = make_plan(demo(workdir), storage, code="f" * 64)
    assert all(other_code[n].key != a[n].key for n in ORDER)


def test_shard_key_follows_the_raw_annotation_file(workdir, storage):
    ann = workdir / "raw" / "coco" / "annotations"
    ann.mkdir(parents=True)
    over = "stages.shard_coco_instances.overrides=[source.root=raw/coco]"
    for split in ("train", "val"):
        (ann / f"instances_{split}2017.json").write_text('{"images": []}')
    before = plan_of(demo(workdir, over), storage)
    assert not before["shard_coco_instances"].notes
    (ann / "instances_val2017.json").write_text('{"images": [ ]}')  # one byte more
    after = plan_of(demo(workdir, over), storage)
    (ann / "instances_val2017.json").write_text('{"images": [1]}')  # as large as `after`, other bytes
    same_size = plan_of(demo(workdir, over), storage)
    keys = {before["shard_coco_instances"].key, after["shard_coco_instances"].key,
            same_size["shard_coco_instances"].key}
    assert len(keys) == 3  # small files are digested, not just sized
    assert after["finetune_instance"].key != before["finetune_instance"].key
    assert after["finetune_panoptic"].key == before["finetune_panoptic"].key


# ----------------------------------------------------------------------------- markers and --force


def test_markers_make_stages_skip_and_explain_new_keys(workdir, storage):
    plan = plan_of(demo(workdir), storage)
    mark_all(plan, storage)
    marker = read_success(storage, plan["evaluate_instance"].output)
    assert marker["key"] == plan["evaluate_instance"].key and marker["result"] == {"metric": 1.0}
    again = plan_of(demo(workdir), storage)
    assert runs(again) == set()
    assert all(s.reason.startswith("cached: _SUCCESS with key ") for s in again.stages.values())
    assert "0 to run, 14 cached" in format_plan(again)

    changed = plan_of(demo(workdir, "stages.finetune_instance.overrides=[schedule.max_steps=7]"), storage)
    assert runs(changed) == {"finetune_instance", "evaluate_instance", "register_instance"}
    assert "config schedule.max_steps" in changed["finetune_instance"].reason
    assert "upstream finetune_instance" in changed["evaluate_instance"].reason

    # a deleted marker: that stage reruns with the same key; its consumers keep theirs and stay cached
    os.remove(os.path.join(plan["pretrain"].output, "_SUCCESS.json"))
    lost = plan_of(demo(workdir), storage)
    assert runs(lost) == {"pretrain"}
    assert "_SUCCESS is missing" in lost["pretrain"].reason
    assert "upstream pretrain reruns with the same key" in lost["finetune_instance"].reason


def test_force_reruns_a_stage_and_its_descendants_only(workdir, storage):
    plan = plan_of(demo(workdir), storage)
    mark_all(plan, storage)
    forced = plan_of(demo(workdir), storage, force=["finetune_semantic"])
    assert runs(forced) == {"finetune_semantic", "evaluate_semantic", "register_semantic"}
    assert forced["finetune_semantic"].reason == "forced (--force)" and forced["finetune_semantic"].fresh
    assert forced["register_semantic"].reason == "forced: downstream of finetune_semantic"
    assert {n: s.key for n, s in forced.stages.items()} == {n: s.key for n, s in plan.stages.items()}
    pretrain = plan_of(demo(workdir), storage, force=["pretrain"])
    assert runs(pretrain) == {"pretrain", *FROM_PRETRAIN, *EVALS[:2], *REGISTERS[:2]}
    with pytest.raises(ConfigError, match="--force nope: no such stage"):
        plan_of(demo(workdir), storage, force=["nope"])


# ----------------------------------------------------------------------------- validation


def _write(tmp_path, stages, **top):
    doc = {"name": "t", "run_root": str(tmp_path / "run"), **top, "stages": stages}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _shard(**kw):
    return {"kind": "shard", "config": SHARD_CFG, **kw}


def _train(**kw):
    return {"kind": "train", "config": TRAIN_CFG, "inputs": {"data": "shard"}, **kw}


@pytest.mark.parametrize(("stages", "stage", "needle"), [
    ({"shard": _shard(), "x": {"kind": "trian"}}, "x", "stages.x.kind"),
    ({"shard": _shard(), "ft": _train(inputs={"data": "shard", "init": "pretrain"})}, "ft", "'pretrain', which does not exist"),
    ({"shard": _shard(), "ft": _train(config="missing/train.yaml")}, "ft", "run config file missing/train.yaml not found"),
    ({"shard": _shard(), "ft": _train(overrides=["schedule.max_stepz=3"])}, "ft", "unknown key 'schedule.max_stepz'"),
    ({"shard": _shard(overrides=["shard.maxcont=3"])}, "shard", "unknown key 'shard.maxcont'"),
    ({"shard": _shard(), "a": _train(inputs={"data": "shard", "init": "b"}),
      "b": _train(inputs={"data": "shard", "init": "a"})}, "a", "cycle: a -> b -> a"),
    ({"shard": _shard(), "ft": _train(inputs={"data": "shard", "model": "shard"})}, "ft", "train stages take data, init, not 'model'"),
    ({"shard": _shard(), "ft": _train(inputs={})}, "ft", "missing key 'stages.ft.inputs.data'"),
    ({"shard": _shard(), "ft": _train(inputs={"data": "shard", "init": "shard"})}, "ft", "must be a train stage"),
    ({"shard": _shard(), "ft": _train(overrides=["run_dir=/tmp/x"])}, "ft", "sets 'run_dir', which the pipeline wires"),
    ({"shard": _shard(splits=["val"]), "ft": _train()}, "ft", "'train' is not among the splits ['val']"),
    ({"shard": _shard(batch_size=4)}, "shard", "'stages.shard.batch_size' applies to evaluate stages"),
    ({"shard": _shard(), "ft": _train(), "ev": {"kind": "evaluate", "config": TRAIN_CFG,
                                                "inputs": {"model": "ft", "data": "shard"}}}, "ev", "not used by evaluate"),
    ({"shard": _shard(), "a": _train(), "b": _train(),
      "ev": {"kind": "evaluate", "inputs": {"model": "a", "data": "shard"}},
      "reg": {"kind": "register", "name": "m", "inputs": {"model": "b", "report": "ev"}}}, "reg", "evaluates 'a'"),
    ({"shard": _shard(), "ft": _train(), "ev": {"kind": "evaluate", "inputs": {"model": "ft", "data": "shard"}},
      "reg": {"kind": "register", "inputs": {"model": "ft", "report": "ev"}}}, "reg", "missing key 'stages.reg.name'"),
])
def test_bad_pipelines_fail_in_one_line_naming_the_stage(tmp_path, stages, stage, needle):
    with pytest.raises(ConfigError) as info:
        load_pipeline(_write(tmp_path, stages))
    message = str(info.value)
    assert "\n" not in message and message.startswith("config error: ")
    assert needle in message
    assert f"stage '{stage}'" in message or f"stages.{stage}." in message


def test_a_small_valid_pipeline_and_relative_config_paths(tmp_path, storage):
    with open(TRAIN_CFG) as f:
        text = f.read().replace("../model/", os.path.join(ROOT, "configs", "model") + "/")
    (tmp_path / "copied_train.yaml").write_text(text)
    pipeline = load_pipeline(_write(tmp_path, {"shard": _shard(), "ft": _train(config="copied_train.yaml")}))
    plan = make_plan(pipeline, storage, code=CODE)
    assert plan.levels == (("shard",), ("ft",)) and plan.to_run == ("shard", "ft")


def _small(tmp_path, **evaluate):
    return {"shard": _shard(), "ft": _train(), "ev": {"kind": "evaluate", "inputs": {"model": "ft", "data": "shard"},
                                                      **evaluate},
            "reg": {"kind": "register", "name": "m", "inputs": {"model": "ft", "report": "ev"}}}


def test_each_stage_kind_is_its_own_typed_config(tmp_path):
    pipeline = load_pipeline(_write(tmp_path, _small(tmp_path, batch_size=2, min_size=0)))
    cfg = {n: s.cfg for n, s in pipeline.stages.items()}
    assert [type(c) for c in cfg.values()] == [ShardStage, TrainStage, EvaluateStage, RegisterStage]
    assert cfg["ev"].settings == EvalSettings(batch_size=2, min_size=0)  # the stage's flat keys, one struct
    assert (cfg["ft"].split, cfg["ev"].split) == ("train", "val")  # each kind's own default


@pytest.mark.parametrize(("evaluate", "needle"), [
    ({"batch_size": 0}, "key 'stages.ev.batch_size' in {path} must be >= 1; got int 0"),
    ({"limit": -1}, "key 'stages.ev.limit' in {path} must be >= 0 (0 = all); got int -1"),
    ({"splits": ["val"]}, "key 'stages.ev.splits' applies to shard stages; it is not used by evaluate stages"),
    ({"promote": False}, "key 'stages.ev.promote' applies to register stages; it is not used by evaluate stages"),
])
def test_a_stage_key_is_checked_by_its_kind_and_named(tmp_path, evaluate, needle):
    path = _write(tmp_path, _small(tmp_path, **evaluate))
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    assert needle.format(path=path) in str(info.value)


def test_the_executor_wires_the_run_config_loaded_once_without_reading_it_again(tmp_path, storage):
    with open(TRAIN_CFG) as f:
        text = f.read().replace("../model/", os.path.join(ROOT, "configs", "model") + "/")
    (tmp_path / "copied_train.yaml").write_text(text)
    stages = {"shard": _shard(), "ft": _train(config="copied_train.yaml", overrides=["optim.lr=3e-4"])}
    pipeline = load_pipeline(_write(tmp_path, stages))
    plan = make_plan(pipeline, storage, code=CODE)
    loaded = pipeline.stages["ft"].run_config
    assert loaded.run_dir == "<output>" and loaded.data.manifest == "<inputs.data>/train/manifest.json"
    (tmp_path / "copied_train.yaml").unlink()  # the file is not read again
    cfg = train_config(plan, "ft")
    assert cfg.run_dir == plan["ft"].output and cfg.optim.lr == 3e-4
    assert cfg.data.manifest == os.path.join(plan["shard"].output, "train", "manifest.json")
    assert cfg.model is loaded.model  # the same validated sections, with only the wiring keys replaced


# ----------------------------------------------------------------------------- code version


def test_code_version_needs_no_git_and_follows_the_source(tmp_path):
    copy = tmp_path / "tree"
    for top in CODE_DIRS:
        shutil.copytree(os.path.join(ROOT, top), copy / top, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    assert not (copy / ".git").exists()
    assert code_version(str(copy)) == code_version(ROOT)
    assert git_revision(str(copy)) == ""
    (copy / "docs.md").write_text("not code")  # outside the code folders: no effect
    (copy / "pipeline" / "notes.md").write_text("not code either")
    assert code_version(str(copy)) == code_version(ROOT)
    with open(copy / "orchestration" / "plan.py", "a") as f:
        f.write("\n# an edit\n")
    assert code_version(str(copy)) != code_version(ROOT)


def test_marker_is_json_with_key_stage_time_and_result(workdir, storage):
    plan = plan_of(demo(workdir), storage)
    write_success(storage, plan, "shard_ade20k", {"samples": 64})
    with open(os.path.join(plan["shard_ade20k"].output, "_SUCCESS.json")) as f:
        marker = json.load(f)
    assert {"stage", "kind", "key", "finished_at", "code_version", "result", "material"} <= set(marker)
    assert marker["stage"] == "shard_ade20k" and marker["result"] == {"samples": 64}
    assert plan_of(demo(workdir), storage)["shard_ade20k"].status == "skip"
