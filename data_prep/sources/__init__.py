"""Readers for the raw dataset layouts; `build_index` picks one from the source config."""
from __future__ import annotations

from core.storage import Storage
from data_prep.shard_config import SourceConfig
from data_prep.sources import ade20k, coco_instances, coco_panoptic, objects365
from data_prep.sources.coco_json import SourceError
from data_prep.sources.index import SourceIndex
from data_prep.sources.layout import require_source

__all__ = ["SourceError", "SourceIndex", "build_index"]


def build_index(cfg: SourceConfig, storage: Storage, workdir: str) -> SourceIndex:
    """Parse the split's annotations once and validate them; `workdir` holds local copies of s3:// JSON."""
    require_source(cfg)
    builders = {"coco_instances": coco_instances.build, "coco_panoptic": coco_panoptic.build,
                "ade20k": ade20k.build, "objects365": objects365.build}
    return builders[cfg.format](cfg, storage, workdir)
