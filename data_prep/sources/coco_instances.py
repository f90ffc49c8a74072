"""COCO instances: `annotations/instances_{split}2017.json` + `{split}2017/` images.

Segmentations (polygons with several parts, crowd regions as uncompressed RLE, compressed RLE) are
carried raw to the shard tasks, which store every one as compressed RLE (pycocotools)."""
from __future__ import annotations

from core.storage import Storage, join
from data_prep.shard_config import SourceConfig
from data_prep.sources.coco_style import CocoStyleIndex
from data_prep.sources.coco_style_build import build_coco_style


def build(cfg: SourceConfig, storage: Storage, workdir: str) -> CocoStyleIndex:
    return build_coco_style(
        dataset="coco_instances", task="instance", split=cfg.split,
        annotation=cfg.annotation or join(cfg.root, "annotations", f"instances_{cfg.split}2017.json"),
        images_dir=cfg.images or join(cfg.root, f"{cfg.split}2017"),
        storage=storage, workdir=workdir, with_segmentation=True,
    )
