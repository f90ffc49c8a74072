"""The training run's typed config: what `maskdino train CONFIG [key=value ...]` reads.

One YAML file per run (configs/train/*.yaml). The model is embedded as a nested mapping that names its
model config file: ``model: {_base_: ../model/swinl_instance.yaml, num_classes: 80}``; every other
section has the official defaults (docs/model.md#training-recipe) and the files set what differs. Everything here is
checked before any process group, model or data stream exists, so a typo fails in a second, not after
a minute of start-up.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from core.config import InvalidValue, load_config
from core.storage import StorageConfig
from model.config import ModelConfig
from pipeline.loader import LoaderConfig
from pipeline.parallelize import EngineConfig, OptimConfig, ScheduleConfig
from pipeline.transforms import AugConfig

RESUME_MODES = ("auto", "never")


@dataclass(frozen=True)
class DataConfig:
    """The training stream (pipeline/loader.py); the batch size is `engine.micro_batch_size`."""

    manifest: str = ""  # manifest.json of the training shards, local or s3://
    num_workers: int = 2
    shuffle_buffer: int = 256
    max_shard_retries: int = 3
    skip_failed_shards: bool = False
    prefetch_factor: int = 2
    retry_backoff_s: float = 1.0
    aug: AugConfig = field(default_factory=AugConfig)

    def __post_init__(self) -> None:
        # pipeline/loader.py LoaderConfig checks these too; here the error names the key in the run config.
        for name in ("num_workers", "max_shard_retries", "retry_backoff_s"):
            if getattr(self, name) < 0:
                raise InvalidValue(name, getattr(self, name), ">= 0")
        for name in ("shuffle_buffer", "prefetch_factor"):
            if getattr(self, name) < 1:
                raise InvalidValue(name, getattr(self, name), ">= 1")


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 5000  # and always at the last step
    keep_last: int = 3  # complete checkpoints kept in the run; older ones are pruned (0 = keep all)
    # Where DeepSpeed writes before publishing to `run_dir` (each node's own disk); "" = a folder
    # under the system temp dir named after the run.
    local_dir: str = ""

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.keep_last < 0:
            raise ValueError(f"need every_steps >= 1 and keep_last >= 0, got {self.every_steps}, {self.keep_last}")


@dataclass(frozen=True)
class LogConfig:
    print_every: int = 20  # console lines; the JSONL gets every step
    flush_every_s: float = 30.0  # JSONL upload period when run_dir is on S3


@dataclass(frozen=True)
class FaultConfig:
    """Fault injection, for tests and fault drills only: real runs leave it at the defaults. Not part of
    a pipeline stage's key (orchestration/plan.py): a run that crashed and resumed makes the same model."""

    # Exit hard right after this step (os._exit: no clean-up, no flush, like a killed node), in a run
    # that did not resume, so that the restarted run (Ray Train, a test) goes on. 0 = never.
    crash_after_step: int = 0

    def __post_init__(self) -> None:
        if self.crash_after_step < 0:
            raise InvalidValue("crash_after_step", self.crash_after_step, ">= 0 (0 = never)")


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str  # local folder or s3:// prefix: checkpoints/, metrics.jsonl, params.json, model/
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    # Stage transfer: a model bundle (e.g. a pretrain run's `model/`) whose weights start this run;
    # tensors tied to the label set are re-initialised when the category lists differ.
    init_from: str = ""
    # auto: continue from the newest complete checkpoint in run_dir, if any; never: start afresh
    # (refused when run_dir already has checkpoints); or the URI of one checkpoint folder.
    resume: str = "auto"
    seed: int = 0
    export: bool = True  # write the fp32 model bundle to run_dir/model at the end
    faults: FaultConfig = field(default_factory=FaultConfig)  # tests and fault drills only

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ValueError("run_dir must name where the run writes (a local folder or s3:// prefix)")
        if not self.data.manifest:
            raise ValueError("data.manifest must name the training manifest.json")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")
        if self.schedule.max_steps < 1:
            raise ValueError(f"schedule.max_steps={self.schedule.max_steps} must be >= 1")

    def loader_config(self) -> LoaderConfig:
        d = self.data
        return LoaderConfig(manifest=d.manifest, batch_size=self.engine.micro_batch_size,
                            num_workers=d.num_workers, seed=self.seed, shuffle_buffer=d.shuffle_buffer,
                            max_shard_retries=d.max_shard_retries, skip_failed_shards=d.skip_failed_shards,
                            prefetch_factor=d.prefetch_factor, retry_backoff_s=d.retry_backoff_s)

    @property
    def resume_mode(self) -> str:
        """"auto", "never" or "uri"."""
        return self.resume if self.resume in RESUME_MODES else "uri"


def load_train_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """The run config from YAML + ``key=value`` overrides; ConfigError (one line) on any problem,
    naming the key (the loader's settings are checked by DataConfig and EngineConfig)."""
    return load_config(TrainConfig, path, list(overrides))
