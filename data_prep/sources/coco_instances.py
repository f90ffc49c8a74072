"""COCO instances: `annotations/instances_{split}2017.json` + `{split}2017/` images.

Segmentations (polygons with several parts, crowd regions as uncompressed RLE, compressed RLE) are
carried raw to the shard tasks, which store every one as compressed RLE (pycocotools)."""
from __future__ import annotations

from core.storage import Storage
from data_prep.shard_config import SourceConfig
from data_prep.sources.coco_style import CocoStyleIndex
from data_prep.sources.coco_style_build import build_coco_style
from data_prep.sources.layout import source_layout


def build(cfg: SourceConfig, storage: Storage, workdir: str) -> CocoStyleIndex:
    layout = source_layout(cfg)
    return build_coco_style(
        dataset="coco_instances", task="instance", split=cfg.split, annotation=layout.annotation,
        images_dir=layout.images, storage=storage, workdir=workdir, with_segmentation=True,
    )
