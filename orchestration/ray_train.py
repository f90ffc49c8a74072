"""Training and evaluation stages under Ray Train: `TorchTrainer` starts one process per worker; for
training each runs `pipeline.trainer.train`, the same entrypoint as `maskdino train`, for evaluation
`pipeline.evaluate.evaluate`, the same as `maskdino evaluate` (each rank its block of the manifest,
rank 0 writes the report).

Fault tolerance comes from two layers that already exist, not from Ray's own checkpoint store:
`FailureConfig(max_failures)` restarts the whole worker group after a worker dies, and the restarted
`train` finds the newest *complete* checkpoint in the run's `run_dir` (`resume: auto`) with every
rank's data position and RNG, so the stage continues exactly where its last checkpoint left it. Ray's
`RunConfig.storage_path` only holds Ray's own experiment state.

Ray Train makes the process group (gloo on CPU, nccl with GPUs) and sets RANK / LOCAL_RANK /
WORLD_SIZE / MASTER_ADDR (the node IP, not 127.0.0.1); the trainer joins that group and leaves it to Ray.
Rank 0 logs to the console, the run's JSONL and, when a tracking URI and run id are given, to MLflow.

The driver hands the workers typed jobs (:class:`TrainJob`, :class:`EvalJob`): the same frozen
dataclasses it validated, bound to the worker function (Ray pickles them), not dicts or ``key=value``
strings. Importing this module imports Ray and the training stack: the pipeline does so only when a
train or evaluate stage runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray.train import FailureConfig, RunConfig
from ray.train import ScalingConfig as RayScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from core.storage import Storage, StorageConfig, join
from orchestration.pipeline_config import ScalingConfig
from pipeline.bundle_files import CONFIG_NAME, WEIGHTS_NAME
from pipeline.checkpoint import latest_complete
from pipeline.eval_settings import EvalSettings
from pipeline.evaluate import EvalReport, evaluate, read_report, write_report
from pipeline.mlflow_tracking import MlflowLogger, enable_system_metrics
from pipeline.model_bundle import ModelBundle, open_bundle
from pipeline.tracking import Logger, MultiLogger, make_logger
from pipeline.train_config import TrainConfig
from pipeline.trainer import BUNDLE_DIR, train

Scaling = ScalingConfig  # Ray Train's scaling: the pipeline's `scaling` section (or a stage's own)


# ------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainJob:
    """One train stage for the Ray Train workers: the run config the driver validated, with its real
    locations, and the MLflow run that rank 0 logs to (none when ``mlflow_run_id`` is "")."""

    config: TrainConfig
    tracking_uri: str = ""
    mlflow_run_id: str = ""
    system_metrics_interval_s: float = 10.0  # MLflow system metrics: seconds between samples


@dataclass(frozen=True)
class RayTrainOutcome:
    steps: int
    run_dir: str
    bundle: str | None


def _train_worker(job: TrainJob) -> None:
    """Runs in every Ray Train worker: the plain trainer, with rank 0 also logging to MLflow."""
    cfg = job.config
    context = ray.train.get_context()
    storage = Storage(cfg.storage)
    logger: Logger | None = None
    if context.get_world_rank() == 0 and job.mlflow_run_id:
        local = make_logger(cfg.run_dir, cfg.schedule.max_steps, storage, cfg.log.print_every)
        logger = MultiLogger(local, MlflowLogger(job.tracking_uri, job.mlflow_run_id))
    monitor = _system_metrics(context, job)
    try:
        train(cfg, storage, logger)
    finally:
        if monitor is not None:
            monitor.finish()


def _system_metrics(context: Any, job: TrainJob) -> Any:
    """MLflow system metrics (CPU, memory, disk, network, GPU with nvidia-ml-py) from one worker per
    node, the one with local rank 0; on several nodes each logs under ``system/node_<rank>/...``. A
    restarted worker group continues the metrics' step count (resume_logging)."""
    if not job.mlflow_run_id or context.get_local_rank() != 0:
        return None
    several_nodes = context.get_world_size() > context.get_local_world_size()
    return enable_system_metrics(job.tracking_uri, job.mlflow_run_id, job.system_metrics_interval_s,
                                 node_id=f"node_{context.get_node_rank()}" if several_nodes else None)


def run_training(job: TrainJob, scaling: ScalingConfig, max_failures: int, storage_path: str, name: str
                 ) -> RayTrainOutcome:
    """Train ``job.config`` on a Ray cluster (ray.init done by the caller). Raises the workers' error
    when Ray Train gives up after `max_failures` restarts."""
    _fit(functools.partial(_train_worker, job), scaling, max_failures, storage_path, name)
    return _outcome(job.config)


def _fit(worker: Callable[[], None], scaling: ScalingConfig, max_failures: int, storage_path: str,
         name: str) -> None:
    """Run ``worker()`` on every worker of a TorchTrainer; raises the workers' error when Ray Train
    gives up."""
    trainer = TorchTrainer(
        worker,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=RayScalingConfig(num_workers=scaling.workers, use_gpu=scaling.use_gpu,
                                        resources_per_worker={"CPU": scaling.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures)))
    result = trainer.fit()
    if result.error is not None:
        raise result.error


def _outcome(cfg: TrainConfig) -> RayTrainOutcome:
    """Read from the run itself (Ray Train v2 keeps no metrics reported without a checkpoint)."""
    storage = Storage(cfg.storage)
    latest = latest_complete(storage, cfg.run_dir)
    bundle = join(cfg.run_dir, BUNDLE_DIR)
    return RayTrainOutcome(steps=latest[0] if latest else 0, run_dir=cfg.run_dir,
                           bundle=bundle if storage.exists(join(bundle, WEIGHTS_NAME)) else None)


# ------------------------------------------------------------------------------------------- evaluation

UNTRAINED_DIR = "untrained"  # <evaluate output>/untrained/report.json: the baseline the metric is read against


@dataclass(frozen=True)
class EvalJob:
    """One evaluate stage: the trained bundle and, as baseline, the same architecture untrained."""

    bundle: str  # model bundle folder (local or s3://)
    manifest: str  # manifest.json of the evaluation split
    output: str  # report.json, per_class.md, ...; the baseline's under output/untrained/
    settings: EvalSettings  # the stage's, as the driver validated them
    storage: StorageConfig


def _eval_worker(job: EvalJob, use_gpu: bool) -> None:
    """Runs in every Ray Train worker: evaluate the bundle, then the untrained model of its config
    (seeded: the same random weights on every rank and in every run)."""
    storage = Storage(job.storage)
    device = str(ray.train.torch.get_device()) if use_gpu else "cpu"

    def run(bundle: ModelBundle, output: str) -> None:
        # builds the model: draws its init from torch's RNG
        out = evaluate(bundle, job.manifest, storage, job.settings, device=device, progress=False)
        if out is not None:  # rank 0
            write_report(storage, output, *out)

    run(open_bundle(storage, model=job.bundle), job.output)
    torch.manual_seed(0)  # here, not earlier: building the trained model above draws from the RNG too
    run(open_bundle(storage, config=join(job.bundle, CONFIG_NAME)), join(job.output, UNTRAINED_DIR))


def run_evaluation(job: EvalJob, scaling: ScalingConfig, max_failures: int, storage_path: str, name: str
                   ) -> tuple[EvalReport, EvalReport]:
    """Evaluate under Ray Train (ray.init done by the caller; a restarted worker group evaluates
    again from the start); returns the trained and the untrained model's reports."""
    _fit(functools.partial(_eval_worker, job, scaling.use_gpu), scaling, max_failures, storage_path, name)
    storage = Storage(job.storage)
    return (read_report(storage, join(job.output, "report.json")),
            read_report(storage, join(job.output, UNTRAINED_DIR, "report.json")))
