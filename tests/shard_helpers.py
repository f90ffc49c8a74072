"""Helpers shared by the sharding tests: build configs, run sharding inline, read shards back."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import webdataset as wds

from core.manifest import Manifest
from data_prep.shard import ShardSummary, shard_dataset
from data_prep.shard_config import ShardJobConfig
from core.config import config_from_dict

FIXTURES = Path(__file__).parent / "fixtures"


def shard_config(output: str | Path, executor: str = "inline", **source: Any) -> ShardJobConfig:
    extra = source.pop("_extra", {})
    data = {"source": source, "output": str(output), "executor": {"kind": executor}, "progress": False}
    for dotted, value in extra.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config_from_dict(ShardJobConfig, data, source="test")


def run_shard(output: str | Path, executor: str = "inline", **source: Any) -> ShardSummary:
    return shard_dataset(shard_config(output, executor, **source))


def read_manifest(output: str | Path) -> Manifest:
    return Manifest.from_json((Path(output) / "manifest.json").read_text())


def read_samples(output: str | Path) -> dict[str, dict[str, Any]]:
    """All samples by key, read with stock webdataset (not our reader); `json` decoded."""
    manifest = read_manifest(output)
    urls = [str(Path(output) / s.url) for s in manifest.shards]
    out: dict[str, dict[str, Any]] = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        sample = dict(sample)
        sample["json"] = json.loads(sample["json"])
        out[sample["__key__"]] = sample
    return out


def tar_member_names(path: str | Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()
