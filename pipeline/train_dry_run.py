"""`maskdino train --dry-run`: everything a training run checks before it starts, without starting it.

The trainer's own `preflight` (manifest readable and matching model.num_classes, the resume checkpoint
complete, init_from a model bundle) plus the run_dir location (a writable folder, or an existing bucket);
no process group, no model, nothing written."""
from __future__ import annotations

import os
from dataclasses import dataclass

from core.storage import Storage
from core.storage.location import check_writable
from pipeline.train_config import TrainConfig
from pipeline.trainer import Plan, preflight


@dataclass(frozen=True)
class TrainDryRun:
    """What `maskdino train` would do with this config."""

    cfg: TrainConfig
    plan: Plan
    run_dir: str  # what the location check found

    def _start(self) -> str:
        if self.plan.resume_uri:
            return f"resuming from {self.plan.resume_uri} at step {self.plan.resume_step}"
        if self.cfg.init_from:
            return f"from the model bundle {self.cfg.init_from} (init_from)"
        return f"from scratch (seed {self.cfg.seed})"

    def lines(self) -> list[str]:
        cfg, manifest = self.cfg, self.plan.manifest
        engine = cfg.engine
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return [
            (f"dry run: would train to step {cfg.schedule.max_steps:,} on {cfg.data.manifest} ({manifest.dataset}/"
             f"{manifest.split}, task {manifest.task}, {manifest.counts.samples:,} samples in {len(manifest.shards)} "
             f"shards, {len(manifest.categories)} categories = model.num_classes)"),
            f"start: {self._start()}",
            f"run_dir: {self.run_dir}",
            (f"engine: ZeRO stage {engine.zero_stage}, {engine.precision}, micro-batch {engine.micro_batch_size} x "
             f"{engine.grad_accumulation} accumulation per rank, {world} rank(s) (WORLD_SIZE)"),
            ("checked: config, manifest and its categories, resume checkpoint, init_from bundle, run_dir location; "
             "no process group, model or file created"),
        ]


def check_training(cfg: TrainConfig, storage: Storage) -> TrainDryRun:
    """The trainer's preflight and the run_dir location; TrainError / LoaderError / StorageError (one line)
    at the first problem."""
    plan = preflight(cfg, storage)
    return TrainDryRun(cfg, plan, check_writable(storage, cfg.run_dir))
