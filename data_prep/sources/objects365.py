"""Objects365 v1 and v2 (COCO-style JSON, boxes only).

v1: `annotations/objects365_{split}.json`, images in `{split}/`.
v2: `annotations/zhiyuan_objv2_{split}.json`; file names carry `images/v1/patchN/...` or
`images/v2/patchN/...` while the files sit at `{split}/patchN/...`: the prefix is stripped.
Categories come unsorted and are mapped by id; extra keys (`isfake`, `isreflected`) are ignored;
missing images and duplicate rows become rejects (see coco_style.py)."""
from __future__ import annotations

import re

from core.storage import Storage
from data_prep.shard_config import SourceConfig
from data_prep.sources.coco_style import CocoStyleIndex
from data_prep.sources.coco_style_build import build_coco_style
from data_prep.sources.layout import source_layout

_V2_PREFIX = re.compile(r"^images/v\d+/")


def v2_relative_path(file_name: str) -> str:
    """`images/v1/patch8/objects365_v1_00420917.jpg` -> `patch8/objects365_v1_00420917.jpg`."""
    return _V2_PREFIX.sub("", file_name, count=1)


def build(cfg: SourceConfig, storage: Storage, workdir: str) -> CocoStyleIndex:
    layout = source_layout(cfg)
    return build_coco_style(
        dataset=f"objects365_{cfg.version}", task="detection", split=cfg.split, annotation=layout.annotation,
        images_dir=layout.images, storage=storage, workdir=workdir, with_segmentation=False,
        rel_path_of=v2_relative_path if cfg.version == "v2" else (lambda name: name),
    )
