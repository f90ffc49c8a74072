"""Typed config of a sharding run (loaded by core/config.py from YAML + overrides)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from core.storage import StorageConfig, join

SourceFormat = Literal["coco_instances", "coco_panoptic", "ade20k", "objects365"]


@dataclass(frozen=True)
class SourceConfig:
    """Where the raw split lives. Paths left empty follow the dataset's standard layout under root
    (README "Raw layouts"); each may be set explicitly, as a local path or s3:// URI."""

    format: SourceFormat = "coco_instances"
    root: str = ""
    split: str = "val"
    version: Literal["v1", "v2"] = "v2"  # Objects365 only
    annotation: str = ""  # COCO-style JSON
    images: str = ""  # image folder
    labels: str = ""  # panoptic PNG folder / ADE20K annotation folder
    categories: str = ""  # ADE20K objectInfo150.{csv,txt}


@dataclass(frozen=True)
class ShardLimits:
    """A shard closes when adding a sample would pass either limit (a single larger sample still
    gets a shard of its own)."""

    maxcount: int = 1000
    maxsize: int = 3_000_000_000

    def __post_init__(self) -> None:
        if self.maxcount < 1 or self.maxsize < 1:
            raise ValueError("maxcount and maxsize must be >= 1")


@dataclass(frozen=True)
class ValidateConfig:
    """decode: `header` checks the format, size and end-of-image marker without decoding pixels
    (fast: keeps sharding I/O-bound); `full` decodes every image completely."""

    decode: Literal["header", "full"] = "header"
    strict: bool = False


@dataclass(frozen=True)
class ExecutorConfig:
    """`ray`: one Ray task per shard (local `ray.init()` unless `address` names a cluster);
    `inline`: the same task function in this process, one shard after another (debugging, tests)."""

    kind: Literal["ray", "inline"] = "ray"
    address: str = ""
    num_cpus: int = 0  # local Ray only; 0 = all cores
    max_in_flight: int = 0  # shard slices held in the object store at once; 0 = 2 x cluster CPUs
    object_store_bytes: int = 500_000_000  # local Ray only; slices are small, the default 30% of RAM is not needed


@dataclass(frozen=True)
class ShardJobConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    output: str = ""
    shard: ShardLimits = field(default_factory=ShardLimits)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    progress: bool = True


def split_configs(cfg: ShardJobConfig, splits: Sequence[str]) -> list[ShardJobConfig]:
    """One config per split, each writing into OUTPUT/SPLIT (`shard --splits train,val`); no splits: [cfg]."""
    return [replace(cfg, source=replace(cfg.source, split=s), output=join(cfg.output, s)) for s in splits] or [cfg]
