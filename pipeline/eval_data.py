"""Evaluation samples from a shard manifest, split over ranks so every rank runs the same number of batches.

Rank r of W takes the contiguous block [r·P, (r+1)·P) of the manifest's samples, P = ceil(N / W); it opens
only the shards that overlap its block. A rank whose block runs past the end is topped up with padding
samples (copies of a real one, `is_padding=True`) that the evaluators skip: collectives in the model or
the final gather then never wait on a rank that ran out of data.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from core.manifest import Manifest, load_manifest, shard_urls
from core.shard_sample import ShardSample, decode_sample
from core.shard_tar import iter_tar_samples
from core.storage import Storage


@dataclass(frozen=True)
class RankShare:
    """Global sample indices [start, stop) of one rank, and how many samples every rank yields."""

    start: int
    stop: int
    per_rank: int

    @property
    def padding(self) -> int:
        return self.per_rank - (self.stop - self.start)


def rank_share(num_samples: int, rank: int, world_size: int) -> RankShare:
    """Contiguous, balanced blocks; pure function of (N, rank, world)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    per_rank = math.ceil(num_samples / world_size)
    start = min(rank * per_rank, num_samples)
    return RankShare(start, min(start + per_rank, num_samples), per_rank)


def num_batches(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches each rank runs (the same on every rank)."""
    return math.ceil(rank_share(num_samples, 0, world_size).per_rank / batch_size)


def _iter_shard_members(storage: Storage, url: str) -> Iterator[dict[str, Any]]:
    with storage.open_read(url) as stream:
        for _index, members, _offset in iter_tar_samples(stream):
            assert members is not None  # every sample is wanted
            yield members


def iter_eval_samples(storage: Storage, manifest_uri: str, rank: int = 0, world_size: int = 1,
                      limit: int = 0, manifest: Manifest | None = None) -> Iterator[ShardSample]:
    """This rank's samples in manifest order, padded to the common per-rank count.

    limit > 0 evaluates only the first `limit` samples of the manifest (for quick looks)."""
    manifest = manifest or load_manifest(storage, manifest_uri)
    total = manifest.counts.samples if not limit else min(limit, manifest.counts.samples)
    share = rank_share(total, rank, world_size)
    last: ShardSample | None = None
    index = 0
    for url, entry in zip(shard_urls(manifest, manifest_uri), manifest.shards):
        if index + entry.samples <= share.start:  # shard entirely before this rank's block: not opened
            index += entry.samples
            continue
        if index >= share.stop:
            break
        for members in _iter_shard_members(storage, url):
            if share.start <= index < share.stop:
                last = decode_sample(members)
                yield last
            index += 1
            if index >= share.stop:
                break
    for _ in range(share.padding):
        last = last or _first_sample(storage, manifest, manifest_uri)
        yield replace(last, is_padding=True)


def _first_sample(storage: Storage, manifest: Manifest, manifest_uri: str) -> ShardSample:
    """Padding for a rank with no real samples at all (more ranks than samples)."""
    return decode_sample(next(_iter_shard_members(storage, shard_urls(manifest, manifest_uri)[0])))
