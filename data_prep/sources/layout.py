"""Where a raw split's inputs are: the `source.*` paths that are set, else the dataset's standard layout
under `source.root` (README "Raw layouts"). The readers build from it, and `shard --dry-run` checks
that what it names exists before anything is read."""
from __future__ import annotations

from dataclasses import dataclass

from core.storage import join
from data_prep.shard_config import SourceConfig
from data_prep.sources.coco_json import SourceError

ADE20K_SPLIT_DIRS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}


@dataclass(frozen=True)
class SourceLayout:
    """One split's inputs, each a local path or s3:// URI; "" where the format has none."""

    annotation: str = ""  # COCO-style JSON
    images: str = ""  # image folder
    labels: str = ""  # panoptic PNG folder / ADE20K label-map folder
    categories: tuple[str, ...] = ()  # ADE20K class list: the first of these that exists is read


def require_source(cfg: SourceConfig) -> None:
    """SourceError (naming the fix) when the config says nothing about where the raw split is."""
    if not cfg.root and not (cfg.annotation or cfg.images):
        raise SourceError("source.root is empty; pass source.root=PATH (a local folder or s3:// URI)")


def require_output(output: str) -> None:
    """SourceError (naming the fix) when a sharding run has no output location."""
    if not output:
        raise SourceError("output is empty; pass output=PATH (a local folder or s3:// URI)")


def source_layout(cfg: SourceConfig) -> SourceLayout:
    """The inputs of `cfg.split`; SourceError for a split the format does not have."""
    root, split = cfg.root, cfg.split
    if cfg.format == "coco_instances":
        return SourceLayout(annotation=cfg.annotation or join(root, "annotations", f"instances_{split}2017.json"),
                            images=cfg.images or join(root, f"{split}2017"))
    if cfg.format == "coco_panoptic":
        return SourceLayout(annotation=cfg.annotation or join(root, "annotations", f"panoptic_{split}2017.json"),
                            images=cfg.images or join(root, f"{split}2017"),
                            labels=cfg.labels or join(root, "annotations", f"panoptic_{split}2017"))
    if cfg.format == "objects365":
        name = f"zhiyuan_objv2_{split}.json" if cfg.version == "v2" else f"objects365_{split}.json"
        return SourceLayout(annotation=cfg.annotation or join(root, "annotations", name),
                            images=cfg.images or join(root, split))
    split_dir = ADE20K_SPLIT_DIRS.get(split)
    if split_dir is None:
        raise SourceError(f"ADE20K split '{split}' is unknown; use one of {sorted(ADE20K_SPLIT_DIRS)}")
    standard = tuple(join(root, f"objectInfo150.{ext}") for ext in ("csv", "txt"))
    categories = (cfg.categories,) if cfg.categories else standard
    return SourceLayout(images=cfg.images or join(root, "images", split_dir),
                        labels=cfg.labels or join(root, "annotations", split_dir), categories=categories)
