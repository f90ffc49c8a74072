"""The shard plan: a pure function of the sorted sample keys and the limits.

Same keys + same sizes + same limits -> same shards, which is what makes re-runs byte-identical and
lets a resumed run skip finished shards."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PlannedShard:
    index: int
    name: str
    start: int  # positions [start, stop) in key order
    stop: int


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def plan_shards(keys: Sequence[str], est_bytes: Sequence[int], maxcount: int, maxsize: int) -> list[PlannedShard]:
    """Greedy packing in key order: a shard closes before a sample that would take it past
    `maxcount` samples or `maxsize` estimated bytes; one oversized sample gets a shard of its own.
    `keys` must be sorted and unique (the index guarantees it; checked here because the plan's
    determinism rests on it)."""
    if any(a >= b for a, b in zip(keys, keys[1:])):
        raise ValueError("shard plan needs keys sorted and unique")
    if len(keys) != len(est_bytes):
        raise ValueError("keys and est_bytes differ in length")
    shards: list[PlannedShard] = []
    start, size = 0, 0
    for pos, nbytes in enumerate(est_bytes):
        count = pos - start
        if count > 0 and (count >= maxcount or size + int(nbytes) > maxsize):
            shards.append(PlannedShard(len(shards), shard_name(len(shards)), start, pos))
            start, size = pos, 0
        size += int(nbytes)
    if start < len(keys):
        shards.append(PlannedShard(len(shards), shard_name(len(shards)), start, len(keys)))
    return shards
