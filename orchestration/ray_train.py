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
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from core.config import config_from_dict, config_to_dict
from pipeline.train_config import TrainConfig


@dataclass(frozen=True)
class Scaling:
    """Ray Train's ScalingConfig, from the pipeline config."""

    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1


@dataclass(frozen=True)
class RayTrainOutcome:
    steps: int
    run_dir: str
    bundle: str | None


def _worker(payload: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: the plain trainer, with rank 0 also logging to MLflow."""
    import ray.train

    from pipeline.tracking import MultiLogger, make_logger
    from pipeline.trainer import train

    os.environ.update(payload.get("env", {}))
    cfg = config_from_dict(TrainConfig, payload["train"], source=payload.get("source", "pipeline"))
    context = ray.train.get_context()
    tracking_uri, run_id = payload.get("tracking_uri", ""), payload.get("mlflow_run_id", "")
    logger = None
    if context.get_world_rank() == 0 and run_id:
        from core.storage import Storage
        from pipeline.mlflow_tracking import MlflowLogger

        local = make_logger(cfg.run_dir, cfg.schedule.max_steps, Storage(cfg.storage), cfg.log.print_every)
        logger = MultiLogger(local, MlflowLogger(tracking_uri, run_id))
    monitor = _system_metrics(context, tracking_uri, run_id)
    try:
        train(cfg, logger=logger)
    finally:
        if monitor is not None:
            monitor.finish()


def _system_metrics(context: Any, tracking_uri: str, run_id: str) -> Any:
    """MLflow system metrics (CPU, memory, disk, network, GPU with nvidia-ml-py) from one worker per
    node, the one with local rank 0; on several nodes each logs under ``system/node_<rank>/...``. A
    restarted worker group continues the metrics' step count (resume_logging)."""
    if not run_id or context.get_local_rank() != 0:
        return None
    from pipeline.mlflow_tracking import enable_system_metrics

    several_nodes = context.get_world_size() > context.get_local_world_size()
    return enable_system_metrics(tracking_uri, run_id, node_id=f"node_{context.get_node_rank()}" if several_nodes else None)


def run_training(cfg: TrainConfig, scaling: Scaling, max_failures: int, storage_path: str, name: str,
                 tracking_uri: str = "", mlflow_run_id: str = "", env: dict[str, str] | None = None
                 ) -> RayTrainOutcome:
    """Train `cfg` on a Ray cluster (ray.init done by the caller). Raises the workers' error when
    Ray Train gives up after `max_failures` restarts."""
    payload = {"train": config_to_dict(cfg), "tracking_uri": tracking_uri, "mlflow_run_id": mlflow_run_id,
               "env": dict(env or {}), "source": name}
    _fit(_worker, payload, scaling, max_failures, storage_path, name)
    return _outcome(cfg)


def _fit(worker: Any, payload: dict[str, Any], scaling: Scaling, max_failures: int, storage_path: str,
         name: str) -> None:
    """Run ``worker(payload)`` on every worker of a TorchTrainer; raises the workers' error when Ray
    Train gives up."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        worker, train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures)))
    result = trainer.fit()
    if result.error is not None:
        raise result.error


def _outcome(cfg: TrainConfig) -> RayTrainOutcome:
    """Read from the run itself (Ray Train v2 keeps no metrics reported without a checkpoint)."""
    from core.storage import Storage, join
    from pipeline.checkpoint import latest_complete
    from pipeline.model_bundle import WEIGHTS_NAME
    from pipeline.trainer import BUNDLE_DIR

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
    settings: dict[str, Any]  # EvalSettings keywords except device / progress
    storage: Any  # StorageConfig


def _eval_worker(payload: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: evaluate the bundle, then the untrained model of its config
    (seeded: the same random weights on every rank and in every run)."""
    import torch

    from core.storage import Storage, join
    from pipeline.evaluate import EvalSettings, evaluate, write_report
    from pipeline.model_bundle import CONFIG_NAME, open_bundle

    job: EvalJob = payload["job"]
    storage = Storage(job.storage)
    device = "cpu"
    if payload["use_gpu"]:
        import ray.train.torch

        device = str(ray.train.torch.get_device())
    settings = EvalSettings(device=device, progress=False, **job.settings)

    def run(bundle: Any, output: str) -> None:
        out = evaluate(bundle, job.manifest, storage, settings)  # builds the model: draws its init from torch's RNG
        if out is not None:  # rank 0
            write_report(storage, output, *out)

    run(open_bundle(storage, model=job.bundle), job.output)
    torch.manual_seed(0)  # here, not earlier: building the trained model above draws from the RNG too
    run(open_bundle(storage, config=join(job.bundle, CONFIG_NAME)), join(job.output, UNTRAINED_DIR))


def run_evaluation(job: EvalJob, scaling: Scaling, max_failures: int, storage_path: str, name: str
                   ) -> tuple[dict, dict]:
    """Evaluate under Ray Train (ray.init done by the caller; a restarted worker group evaluates
    again from the start); returns the trained and the untrained model's report.json contents."""
    import json

    from core.storage import Storage, join

    _fit(_eval_worker, {"job": job, "use_gpu": scaling.use_gpu}, scaling, max_failures, storage_path, name)
    storage = Storage(job.storage)
    return tuple(json.loads(storage.read_bytes(join(out, "report.json")))  # type: ignore[return-value]
                 for out in (job.output, join(job.output, UNTRAINED_DIR)))
