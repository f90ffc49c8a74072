"""`maskdino shard --dry-run`: everything a sharding run needs, checked without doing the work (no
annotation parsed, no Ray started, nothing written): the source's annotation file, class list and folders
exist where the layout puts them, and the output location can be written."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from core.storage import Storage
from core.storage.location import check_writable
from data_prep.shard_config import ShardJobConfig
from data_prep.sources import SourceError
from data_prep.sources.layout import SourceLayout, require_output, require_source, source_layout


@dataclass(frozen=True)
class SplitCheck:
    """What one split would read and where it would write."""

    split: str
    output: str
    inputs: list[str]  # one line per input found: "URI (N bytes)" / "URI/ (at least one object)"


def _check_file(storage: Storage, uri: str, what: str, setting: str) -> str:
    info = storage.stat(uri)
    if info is None:
        raise SourceError(f"{what} {uri} not found; set {setting} or check source.root")
    return f"{uri} ({info.size:,} bytes)"


def _check_folder(storage: Storage, uri: str, what: str, setting: str) -> str:
    if next(iter(storage.list(uri)), None) is None:  # the first object is enough (S3: one page)
        raise SourceError(f"{what} folder {uri} is empty or missing; set {setting} or check source.root")
    return f"{uri}/ (not empty)"


def _check_inputs(cfg: ShardJobConfig, layout: SourceLayout, storage: Storage) -> list[str]:
    found = []
    if layout.annotation:
        found.append(_check_file(storage, layout.annotation, "annotation file", "source.annotation"))
    if layout.categories:
        existing = [uri for uri in layout.categories if storage.stat(uri) is not None]
        if not existing:
            raise SourceError(f"class list not found: {' or '.join(layout.categories)}; set source.categories "
                              "or check source.root")
        found.append(_check_file(storage, existing[0], "class list", "source.categories"))
    found.append(_check_folder(storage, layout.images, "image", "source.images"))
    if layout.labels:
        what = "panoptic PNG" if cfg.source.format == "coco_panoptic" else "annotation"
        found.append(_check_folder(storage, layout.labels, what, "source.labels"))
    return found


def _executor(cfg: ShardJobConfig) -> str:
    if cfg.executor.kind == "inline":
        return "shard tasks in this process, one after another"
    return f"one Ray task per shard on {cfg.executor.address or 'a local Ray started for the run'}"


@dataclass(frozen=True)
class ShardDryRun:
    """What `maskdino shard` would do with this config."""

    cfg: ShardJobConfig
    splits: list[SplitCheck]
    output: str  # what the output location check found

    def lines(self) -> list[str]:
        cfg = self.cfg
        out = [f"dry run: would shard {cfg.source.format} split {s.split} into {s.output}, reading "
               + ", ".join(s.inputs) for s in self.splits]
        out.append(f"output: {self.output}")
        decode = "image headers checked" if cfg.validate.decode == "header" else "images fully decoded"
        rejects = "any reject is an error (--strict)" if cfg.validate.strict else "rejects listed in rejects.jsonl"
        out.append(f"shards of at most {cfg.shard.maxcount:,} samples / {cfg.shard.maxsize / 1e9:,.1f} GB; {decode}; "
                   f"{rejects}")
        out.append(f"executor: {_executor(cfg)}")
        out.append("checked: config, source files and folders, output location; nothing parsed, written or started")
        return out


def check_shard_job(cfg: ShardJobConfig, split_cfgs: Sequence[ShardJobConfig]) -> ShardDryRun:
    """Every split's inputs and the output location; SourceError / StorageError (one line) at the first
    problem. `split_cfgs`: the per-split configs `cfg` expands to (data_prep.shard_config.split_configs)."""
    require_source(cfg.source)
    require_output(cfg.output)
    storage = Storage(cfg.storage)
    splits = [SplitCheck(c.source.split, c.output, _check_inputs(c, source_layout(c.source), storage))
              for c in split_cfgs]
    return ShardDryRun(cfg, splits, check_writable(storage, cfg.output))
