"""`maskdino run PIPELINE.yaml`: execute the plan (orchestration/plan.py) on Ray, tracked in MLflow.

Order of work: load + validate every stage config -> plan (keys, cached stages) -> print the plan ->
(--dry-run stops here) -> Ray up -> MLflow parent run -> stages as their inputs finish -> summary.

Scheduling: a stage starts once every input stage has finished, as soon as the CPUs it needs are
free (train, evaluate: workers x cpus_per_worker; others: 1), so independent fine-tunes run side by
side on a cluster and one after another on a laptop. Each stage runs in a driver thread that only
launches Ray work: sharding fans out as Ray tasks; training and evaluation (the trained model, then
the same architecture untrained as the baseline) run under Ray Train (orchestration/ray_train.py).
A stage that fails stops the pipeline after the running ones finish; its success marker is not
written, so the next run retries it (a train stage resumes from its newest complete checkpoint).

MLflow: the experiment is created once here (never by workers: see pipeline/mlflow_tracking.py);
one parent run per invocation and one nested run per stage that runs, with its resolved config as
params, metrics from rank 0 (training) or the evaluation report, and artifacts: the run config,
manifests, eval report and per-class table, prediction pictures, the loss curve.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import io
import itertools
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from typing_extensions import Self

from core.config import ConfigError, config_to_dict
from core.storage import Storage, is_s3, join
from data_prep.fanout import quiet_local_ray_auth_notice
from orchestration import plan as planning
from orchestration.pipeline_config import EvaluateStage, Pipeline, RegisterStage, load_pipeline, stage_names
from pipeline.eval_data import iter_eval_samples
from pipeline.mlflow_tracking import (
    MlflowLogger,
    default_tracking_uri,
    end_run,
    ensure_experiment,
    start_run,
)
from pipeline.tracking import flatten_config


@dataclass
class StageOutcome:
    name: str
    kind: str
    status: str  # ran | skipped | failed | not run (a failure stopped the pipeline first)
    seconds: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass
class PipelineOutcome:
    plan: planning.Plan
    tracking_uri: str
    parent_run_id: str
    stages: dict[str, StageOutcome]

    @property
    def ok(self) -> bool:
        return all(s.status in ("ran", "skipped") for s in self.stages.values())


# --------------------------------------------------------------------------------------- entrypoint


def run_pipeline(path: str, force: tuple[str, ...] = (), dry_run: bool = False,
                 overrides: tuple[str, ...] = ()) -> PipelineOutcome | None:
    pipeline = load_pipeline(path, overrides)  # every stage's config validated here
    root = pipeline.cfg.run_root
    if not is_s3(root) and not os.path.isabs(root):
        # Ray Train workers run in their own folders: every location they get must be absolute.
        # (Keys do not depend on run_root, so this changes no plan.)
        pipeline = load_pipeline(path, (*overrides, f"run_root={os.path.abspath(root)}"))
    storage = Storage(pipeline.cfg.storage)
    plan = planning.make_plan(pipeline, storage, force=stage_names(pipeline, force))
    print(planning.format_plan(plan), flush=True)
    if dry_run:
        return None
    tracking_uri = _tracking_uri(pipeline)
    experiment = ensure_experiment(tracking_uri, pipeline.cfg.experiment or pipeline.cfg.name)
    parent = start_run(tracking_uri, experiment, pipeline.cfg.name,
                       tags={"code_version": plan.code_version, "pipeline": os.path.abspath(path)})
    outcome = PipelineOutcome(plan, tracking_uri, parent, {})
    work = any(st.status == "run" for st in plan.stages.values())
    with _ray(pipeline) if work else contextlib.nullcontext():  # all cached: no cluster needed
        _Scheduler(plan, storage, outcome, experiment).run()
    end_run(tracking_uri, parent, "FINISHED" if outcome.ok else "FAILED")
    print(summary(outcome), flush=True)
    return outcome


def _tracking_uri(pipeline: Pipeline) -> str:
    if pipeline.cfg.tracking_uri:
        return pipeline.cfg.tracking_uri
    if is_s3(pipeline.cfg.run_root):
        raise ConfigError("tracking_uri: an s3:// run_root needs an MLflow server (tracking_uri: http://HOST:5000)")
    os.makedirs(pipeline.cfg.run_root, exist_ok=True)
    return default_tracking_uri(pipeline.cfg.run_root)


class _ray:
    """ray.init for the pipeline unless already up: a cluster's address, or a local Ray whose dashboard
    listens on 127.0.0.1 only (Ray Train's placement-group cleaner polls the state API it serves;
    without it every worker group logs "State API may be temporarily unavailable" each second)."""

    def __init__(self, pipeline: Pipeline):
        self.cfg = pipeline.cfg.ray
        self.started = False

    def __enter__(self) -> Self:
        import ray  # heavy: only when stages run, never for --dry-run

        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"runtime_env": self.cfg.runtime_env or None}
            if self.cfg.address:
                kwargs["address"] = self.cfg.address
            else:
                kwargs.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=self.cfg.dashboard_port)
                if self.cfg.num_cpus:
                    kwargs["num_cpus"] = self.cfg.num_cpus
                quiet_local_ray_auth_notice()
            ray.init(**kwargs)  # Ray prints the dashboard's URL
            self.started = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            import ray  # heavy: only when stages run, never for --dry-run

            ray.shutdown()


# --------------------------------------------------------------------------------------- scheduling


class _Scheduler:
    def __init__(self, plan: planning.Plan, storage: Storage, outcome: PipelineOutcome, experiment: str):
        self.plan, self.storage, self.outcome, self.experiment = plan, storage, outcome, experiment

    def _cpus(self) -> float:
        import ray  # heavy: only when stages run, never for --dry-run

        return float(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1.0

    def _demand(self, name: str) -> float:
        if self.plan.stages[name].kind not in ("train", "evaluate"):  # Ray Train stages
            return 1.0
        s = self.plan.pipeline.scaling(name)
        return float(s.workers * s.cpus_per_worker)

    def run(self) -> None:
        pending = dict(self.plan.stages)
        done: set[str] = set()
        running: dict[cf.Future, str] = {}
        failed = False
        capacity = self._cpus()
        with cf.ThreadPoolExecutor(max_workers=max(1, len(pending))) as pool:
            while pending or running:
                in_use = sum(self._demand(n) for n in running.values())
                for name, stage in list(pending.items()):
                    if failed or not set(stage.inputs.values()) <= done:
                        continue
                    if stage.status == "skip":
                        self.outcome.stages[name] = StageOutcome(name, stage.kind, "skipped",
                                                                 result=dict((stage.marker or {}).get("result", {})))
                        done.add(name)
                        del pending[name]
                        continue
                    if running and in_use + self._demand(name) > capacity:
                        continue
                    in_use += self._demand(name)
                    running[pool.submit(self._run_stage, name)] = name
                    del pending[name]
                if not running:
                    # Nothing runs and nothing could start: done, stopped by a failure, or (a bug)
                    # stages whose inputs can never finish.
                    for name in pending:
                        self.outcome.stages[name] = StageOutcome(name, self.plan.stages[name].kind, "not run")
                    break
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    name = running.pop(fut)
                    result = fut.result()
                    self.outcome.stages[name] = result
                    if result.status == "failed":
                        failed = True
                    else:
                        done.add(name)

    def _run_stage(self, name: str) -> StageOutcome:
        stage = self.plan.stages[name]
        started = time.perf_counter()
        run_id = start_run(self.outcome.tracking_uri, self.experiment, name, parent_run_id=self.outcome.parent_run_id,
                           tags={"stage_kind": stage.kind, "stage_key": stage.key})
        print(f"[{name}] {stage.kind} -> {stage.output} ({stage.reason})", flush=True)
        try:
            planning.clear_success(self.storage, self.plan, name)
            if stage.fresh:
                _clear(self.storage, stage.output)
            result = RUNNERS[stage.kind](self, name, run_id)
            planning.write_success(self.storage, self.plan, name, result)
        except Exception as exc:  # noqa: BLE001 - reported, recorded on the run, and the pipeline stops
            end_run(self.outcome.tracking_uri, run_id, "FAILED")
            message = _last_line(exc)
            print(f"[{name}] FAILED: {message}", flush=True)
            return StageOutcome(name, stage.kind, "failed", time.perf_counter() - started, error=message)
        end_run(self.outcome.tracking_uri, run_id, "FINISHED")
        seconds = time.perf_counter() - started
        print(f"[{name}] done in {seconds:.0f} s", flush=True)
        return StageOutcome(name, stage.kind, "ran", seconds, result)

    def logger(self, run_id: str) -> MlflowLogger:
        return MlflowLogger(self.outcome.tracking_uri, run_id)


def _last_line(exc: BaseException) -> str:
    """The error's own last line: Ray wraps a worker's error with its whole traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:500]


def _clear(storage: Storage, uri: str) -> None:
    if is_s3(uri):
        for info in list(storage.list(uri)):
            storage.delete(info.uri)
    else:
        shutil.rmtree(uri, ignore_errors=True)


# --------------------------------------------------------------------------------------- stages


def _run_shard(s: _Scheduler, name: str, run_id: str) -> dict[str, Any]:
    from data_prep.shard import shard_dataset  # pulls in ray (the shard fan-out): only when a shard stage runs

    configs = planning.shard_configs(s.plan, name)
    counts = {}
    with s.logger(run_id) as log:
        log.log_params(flatten_config(configs[0]))
        for cfg in configs:
            summary = shard_dataset(cfg)
            print(f"[{name}] {summary.paragraph()}", flush=True)
            manifest = join(cfg.output, "manifest.json")
            log.log_artifact(f"manifests/{cfg.source.split}/manifest.json", s.storage.read_bytes(manifest))
            counts[cfg.source.split] = _manifest_samples(s.storage, manifest)
        log.log_metrics({f"samples/{k}": v for k, v in counts.items()}, 0)
    return {"samples": counts}


def _manifest_samples(storage: Storage, uri: str) -> int:
    return int(json.loads(storage.read_bytes(uri))["counts"]["samples"])


def _run_train(s: _Scheduler, name: str, run_id: str) -> dict[str, Any]:
    # ray, torch and the trainer: only once a train stage runs
    from orchestration.ray_train import TrainJob, run_training

    job = TrainJob(planning.train_config(s.plan, name), s.outcome.tracking_uri, run_id)
    cfg = job.config
    outcome = run_training(job, s.plan.pipeline.scaling(name), s.plan.pipeline.cfg.failure.max_failures,
                           _ray_storage_path(s), name)
    with s.logger(run_id) as log:
        log.log_artifact("config.yaml", s.storage.read_bytes(join(cfg.run_dir, "config.yaml")))
        curve = loss_curve_png(s.storage, cfg.run_dir)
        if curve is not None:
            log.log_artifact("loss_curve.png", curve)
    return {"steps": outcome.steps, "bundle": outcome.bundle}


def _ray_storage_path(s: _Scheduler) -> str:
    """Ray Train's own experiment state (our checkpoints live in each run_dir): beside the stages for a
    local run_root, in the temp folder for an S3 one."""
    root = s.plan.pipeline.cfg.run_root
    return os.path.abspath(join(root, "ray") if not is_s3(root) else os.path.join(tempfile.gettempdir(), "maskdino-ray"))


def loss_curve_png(storage: Storage, run_dir: str) -> bytes | None:
    """loss/total per step (the last record of a replayed step wins) as a PNG."""
    import matplotlib  # heavy: only when a train stage has finished

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy, as above

    uri = join(run_dir, "metrics.jsonl")
    if not storage.exists(uri):
        return None
    by_step = {}
    for line in storage.read_bytes(uri).decode().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = float(record["loss/total"])
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, [by_step[k] for k in steps])
    ax.set_xlabel("step")
    ax.set_ylabel("loss/total")
    ax.set_title(run_dir.rstrip("/").rsplit("/", 1)[-1])
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _run_evaluate(s: _Scheduler, name: str, run_id: str) -> dict[str, Any]:
    # ray, torch and the evaluators: only once an evaluate stage runs
    from orchestration.ray_train import UNTRAINED_DIR, EvalJob, run_evaluation
    from pipeline.evaluate import format_metric  # the model code and pycocotools, as above

    stage = s.plan.stages[name]
    cfg = s.plan.pipeline.stages[name].cfg
    assert isinstance(cfg, EvaluateStage)
    job = EvalJob(bundle=planning.input_bundle(s.plan, name), manifest=planning.input_manifest(s.plan, name),
                  output=stage.output, settings=cfg.settings, storage=s.plan.pipeline.cfg.storage)
    trained, untrained = run_evaluation(job, s.plan.pipeline.scaling(name), s.plan.pipeline.cfg.failure.max_failures,
                                        _ray_storage_path(s), name)
    metric_name, value = trained.primary()
    _, untrained_value = untrained.primary()
    pictures = _pictures(s, name, job.bundle, job.manifest)
    with s.logger(run_id) as log:
        log.log_params({"manifest": job.manifest, "model": job.bundle, "world_size": trained.world_size,
                        **config_to_dict(job.settings)})
        log.log_metrics({metric_name: value or 0.0, f"untrained/{metric_name}": untrained_value or 0.0}, 0)
        for part in ("report.json", "per_class.md"):
            log.log_artifact(part, s.storage.read_bytes(join(stage.output, part)))
            log.log_artifact(f"{UNTRAINED_DIR}/{part}", s.storage.read_bytes(join(stage.output, UNTRAINED_DIR, part)))
        for uri in pictures:
            log.log_artifact(f"pictures/{uri.rsplit('/', 1)[-1]}", s.storage.read_bytes(uri))
    print(f"[{name}] {metric_name} {format_metric(metric_name, value)} on {trained.num_images} images "
          f"({trained.world_size} rank(s)); untrained model: {format_metric(metric_name, untrained_value)}", flush=True)
    return {"metric_name": metric_name, "metric": value, "untrained_metric": untrained_value,
            "task": trained.task, "pictures": pictures}


def _pictures(s: _Scheduler, name: str, bundle: str, manifest: str, count: int = 2) -> list[str]:
    """Predictions drawn on the first `count` evaluation images."""
    # the model code (torch, scipy): only once an evaluate stage runs
    from pipeline.model_bundle import open_bundle
    from pipeline.predict import PredictSettings, predict_images  # the model code, as above

    out = s.plan.stages[name].output
    inputs = tempfile.mkdtemp(prefix="maskdino-pictures-")
    paths = []
    for sample in itertools.islice(iter_eval_samples(s.storage, manifest), count):
        path = os.path.join(inputs, f"{sample.key.replace('/', '_')}.png")
        Image.fromarray(sample.image).save(path)
        paths.append(path)
    settings = PredictSettings(output=join(out, "pictures"), score_threshold=0.3, min_size=0, max_size=4096,
                               device="cpu")
    try:
        return predict_images(open_bundle(s.storage, model=bundle), paths, s.storage, settings)
    finally:
        shutil.rmtree(inputs, ignore_errors=True)


def _run_register(s: _Scheduler, name: str, run_id: str) -> dict[str, Any]:
    from pipeline.evaluate import read_report  # the model code and pycocotools: only when a register stage runs
    from pipeline.registry import promote_if_better, register_bundle  # mlflow's registry, as above

    stage = s.plan.pipeline.stages[name].cfg
    assert isinstance(stage, RegisterStage)
    report = read_report(s.storage, planning.input_report(s.plan, name))
    bundle = planning.input_bundle(s.plan, name)
    metric_name, value = report.primary()
    lineage = _lineage(s, name)
    version = register_bundle(s.outcome.tracking_uri, run_id, bundle, stage.name, stage.task or report.task,
                              metric_name, float(value), lineage, s.storage)
    promotion = promote_if_better(s.outcome.tracking_uri, stage.name, version) if stage.promote else None
    print(f"[{name}] registered {stage.name} version {version} ({metric_name} {value}); "
          f"{promotion.reason if promotion else 'promotion off'}", flush=True)
    return {"name": stage.name, "version": version, "metric_name": metric_name, "metric": value,
            "champion": promotion.champion_version if promotion else None}


def _lineage(s: _Scheduler, name: str) -> dict[str, str]:
    """Where the registered model comes from: the training stage, its init (pretrain), the manifests."""
    lineage = {"code_version": s.plan.code_version}
    model_stage = s.plan.stages[name].inputs["model"]
    lineage["train_stage"] = f"{model_stage}:{s.plan.stages[model_stage].key[:12]}"
    train_inputs = s.plan.stages[model_stage].inputs
    if "init" in train_inputs:
        init = train_inputs["init"]
        lineage["pretrain_stage"] = f"{init}:{s.plan.stages[init].key[:12]}"
    manifest = planning.input_manifest(s.plan, model_stage)
    lineage["train_manifest_sha256"] = hashlib.sha256(s.storage.read_bytes(manifest)).hexdigest()
    return lineage


RUNNERS = {"shard": _run_shard, "train": _run_train, "evaluate": _run_evaluate, "register": _run_register}


# --------------------------------------------------------------------------------------- summary


def summary(outcome: PipelineOutcome) -> str:
    from pipeline.evaluate import format_metric  # the model code and pycocotools: not for --dry-run

    lines = [(f"pipeline {outcome.plan.pipeline.cfg.name}: "
             f"{sum(s.status == 'ran' for s in outcome.stages.values())} stages ran, "
             f"{sum(s.status == 'skipped' for s in outcome.stages.values())} skipped, "
             f"{sum(s.status == 'failed' for s in outcome.stages.values())} failed"),
             f"MLflow: {outcome.tracking_uri} (parent run {outcome.parent_run_id})"]
    for st in outcome.stages.values():
        if st.kind == "register" and st.result:
            r = st.result
            lines.append(f"champion models:/{r['name']}@champion = version {r.get('champion')} "
                         f"(this run: version {r['version']}, {r['metric_name']} {format_metric(r['metric_name'], r['metric'])})")
        if st.kind == "evaluate" and st.result:
            r = st.result
            lines.append(f"{st.name}: {r['metric_name']} {format_metric(r['metric_name'], r['metric'])} "
                         f"(untrained {format_metric(r['metric_name'], r['untrained_metric'])}); "
                         f"pictures: {', '.join(r.get('pictures', []))}")
        if st.status == "failed":
            lines.append(f"FAILED {st.name}: {st.error}")
    return "\n".join(lines)
