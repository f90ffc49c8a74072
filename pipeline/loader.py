"""Training batches from a shard manifest: an infinite, deterministic, exactly resumable stream.

Consumers.  Every rank runs `max(1, num_workers)` consumers (DataLoader workers; `num_workers=0`
is one consumer in the training process). Consumer c = rank * slots + worker, of C = world * slots.

Shard split rule (`assign_shards`, a pure function).  In epoch e all ranks permute the manifest's n
shards with the same rng seeded by (seed, e); consumer c takes the permuted positions i of
range(max(n, C)) with i % C == c, position i naming shard perm[i % n]. With n >= C every shard is
read exactly once per epoch (the usual split; when C divides n every consumer gets n / C shards).
With n < C each consumer gets exactly one shard and some shards are read by several consumers in
the same epoch (resampling, so that no consumer starves); which ones changes with the epoch.

Within a consumer.  Consumers loop epochs 0, 1, 2, ... independently (a consumer with fewer
samples simply turns its epochs faster: the stream is infinite and schedules count steps). In an
epoch a consumer streams its shards in order through a shuffle buffer of `shuffle_buffer`
undecoded samples (rng seeded by (seed, e, rank, worker)), then decodes each sample
(`core.shard_sample.decode_sample`) and calls `transform(sample, rng)` with an rng seeded by
(seed, e, consumer, k), k the sample's position in the shuffled epoch, so augmentations replay
exactly. Batches are built per consumer (the DataLoader gets whole batches and hands them out
round-robin, in order), so batch b of a rank comes from worker b % slots and the batch sequence
is a pure function of (manifest, seed, rank, world, slots).

Resume rule.  The shuffle buffer's decisions depend only on how many samples it has seen, so a
consumer's shuffled order of an epoch is computed up front from the manifest's per-shard counts
(`shuffle_order`) without reading anything. The loader state is the seed, the batches handed
out, and each consumer's cursor (epoch, k) just after the last sample of its last batch handed out.
Resuming recomputes the order, marks positions < k as consumed, and streams again: shards with
no unconsumed sample are not opened, consumed samples are skipped at the tar-member level (their
bytes are never copied, decoded or transformed), and DataLoader workers are rotated so that the
first batch comes from the worker whose turn it was. The next batch then equals the one an
uninterrupted run would have given.

Failures.  A cut S3 connection is resumed inside `Storage.open_read`. A shard that still fails
(a StorageError, a broken tar, fewer samples than the manifest says) is reopened at the byte
offset of the first sample not yet read, up to `max_shard_retries` times in a row without
progress; then `ShardReadError` (default) or, with `skip_failed_shards`, a warning and the
shard's remaining samples are skipped. A sample whose image does not decode is skipped, counted
and logged. Shards are streamed, never held in memory: at most `shuffle_buffer` undecoded samples
are held per consumer.
"""
from __future__ import annotations

import itertools
import logging
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from core.manifest import Manifest, load_manifest, shard_urls
from core.shard_sample import ShardSample, decode_sample
from core.shard_tar import iter_tar_samples
from core.storage import Storage, StorageError
from pipeline.distributed import rank_and_world

logger = logging.getLogger(__name__)

__all__ = [
    "LoaderConfig",
    "LoaderError",
    "LoaderStats",
    "ShardReadError",
    "TrainLoader",
    "assign_shards",
    "read_training_manifest",
    "shuffle_order",
]

B = TypeVar("B")
Transform = Callable[[ShardSample, np.random.Generator], Any]

STATE_VERSION = 1
# Domain tags keep the rng streams of shard permutation, shuffling and augmentation independent.
_TAG_SHARDS, _TAG_SHUFFLE, _TAG_SAMPLE = 1, 2, 3


class LoaderError(RuntimeError):
    """The training loader cannot go on; `str()` is one line naming what and what to do."""


class ShardReadError(LoaderError):
    """A shard kept failing after `max_shard_retries` retries; `url` names it."""

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(message)
        self.url = url


@dataclass(frozen=True)
class LoaderConfig:
    manifest: str
    batch_size: int
    num_workers: int = 2  # DataLoader worker processes; 0 = read in the training process
    seed: int = 0
    shuffle_buffer: int = 256  # undecoded samples held per consumer
    max_shard_retries: int = 3  # reopenings of a shard in a row without progress
    skip_failed_shards: bool = False
    prefetch_factor: int = 2  # batches in flight per worker
    retry_backoff_s: float = 1.0  # sleep before the k-th retry of a shard: k * retry_backoff_s

    def __post_init__(self) -> None:
        if not self.manifest:
            raise ValueError("manifest must name a manifest.json (local path or s3:// URI)")
        if self.batch_size < 1 or self.shuffle_buffer < 1 or self.prefetch_factor < 1:
            raise ValueError("batch_size, shuffle_buffer and prefetch_factor must be >= 1")
        if self.num_workers < 0 or self.max_shard_retries < 0 or self.retry_backoff_s < 0:
            raise ValueError("num_workers, max_shard_retries and retry_backoff_s must be >= 0")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0 (it seeds numpy SeedSequences)")


@dataclass
class LoaderStats:
    """Counts since the stream began (carried over a resume). `samples` went into batches."""

    samples: int = 0
    skipped_undecodable: int = 0
    dropped_by_transform: int = 0
    shard_retries: int = 0
    shards_skipped: int = 0

    def __add__(self, other: LoaderStats) -> LoaderStats:
        return LoaderStats(**{k: v + getattr(other, k) for k, v in asdict(self).items()})


class Cursor(NamedTuple):
    """A consumer's place: the next sample is position `position` of epoch `epoch`'s order."""

    epoch: int
    position: int


# --------------------------------------------------------------------------- pure functions


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(x) for x in entropy]))


def _assigned(num_shards: int, rank: int, world_size: int, worker: int, num_workers: int,
              seed: int, epoch: int) -> list[int]:
    slots = max(1, num_workers)
    if not (0 <= rank < world_size and 0 <= worker < slots):
        raise ValueError(f"rank {rank} / worker {worker} not in world {world_size} x {slots} workers")
    consumers = world_size * slots
    perm = _rng(seed, _TAG_SHARDS, epoch).permutation(num_shards)
    consumer = rank * slots + worker
    return [int(perm[i % num_shards]) for i in range(consumer, max(num_shards, consumers), consumers)]


def assign_shards(urls: list[str], rank: int, world_size: int, worker: int, num_workers: int,
                  seed: int, epoch: int) -> list[str]:
    """This consumer's shards of `epoch`, in reading order (the split rule in the module docstring).

    `num_workers` 0 counts as one consumer per rank."""
    if not urls:
        return []
    return [urls[i] for i in _assigned(len(urls), rank, world_size, worker, num_workers, seed, epoch)]


def shuffle_order(num_samples: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a streaming shuffle buffer emits inputs 0..n-1 (a permutation).

    The buffer fills with the first `buffer` inputs; each later input first evicts a uniformly
    chosen held one; at the end the rest drains in random order. Input i is always emitted at a
    position >= i - buffer, so emitting in this order holds at most `buffer` read samples."""
    held = list(range(min(buffer, num_samples)))
    order = np.empty(num_samples, dtype=np.int64)
    picks = rng.integers(0, buffer, size=max(0, num_samples - buffer)).tolist()
    for k, (incoming, j) in enumerate(zip(range(buffer, num_samples), picks)):
        order[k] = held[j]
        held[j] = incoming
    order[num_samples - len(held):] = rng.permutation(np.asarray(held, dtype=np.int64))
    return order


class _ShortShard(Exception):
    pass


# --------------------------------------------------------------------------- one consumer


@dataclass
class _Batch:
    slot: int
    cursor: Cursor
    stats: LoaderStats
    batch: Any


@dataclass
class _Failure:
    slot: int
    stats: LoaderStats
    message: str
    url: str


def _identity(x: Any) -> Any:
    return x


@dataclass
class _Plan:
    """A consumer's epoch: its shards, their sample counts, and the shuffled order of samples."""

    urls: list[str]
    counts: list[int]
    firsts: list[int]  # global (within the epoch) index of each shard's first sample
    order: np.ndarray

    @property
    def size(self) -> int:
        return len(self.order)


@dataclass
class _ConsumerStream(IterableDataset):
    """The IterableDataset behind TrainLoader: each worker runs one consumer and yields batches."""

    config: LoaderConfig
    seed: int
    urls: list[str]
    counts: list[int]
    rank: int
    world_size: int
    cursors: list[Cursor]
    stats: list[LoaderStats]
    rotation: int  # torch worker j plays consumer slot (j + rotation) % slots (see TrainLoader)
    transform: Transform
    collate: Callable[[list[Any]], Any]
    storage: Storage

    @property
    def slots(self) -> int:
        return max(1, self.config.num_workers)

    def __iter__(self) -> Iterator[_Batch | _Failure]:
        info = get_worker_info()
        slot = ((info.id if info is not None else 0) + self.rotation) % self.slots
        stats = replace(self.stats[slot])
        try:
            yield from self._batches(slot, stats)
        except LoaderError as exc:  # sent as data: a re-raise through torch would be multi-line
            yield _Failure(slot, stats, str(exc), getattr(exc, "url", ""))

    def _batches(self, slot: int, stats: LoaderStats) -> Iterator[_Batch]:
        cursor, batch = self.cursors[slot], []
        for epoch in itertools.count(cursor.epoch):
            start = cursor.position if epoch == cursor.epoch else 0
            plan = self._plan(epoch, slot)
            usable = 0
            for position, out in self._epoch(plan, epoch, slot, start, stats):
                if out is None:
                    continue
                usable += 1
                batch.append(out)
                if len(batch) == self.config.batch_size:
                    stats.samples += len(batch)
                    yield _Batch(slot, Cursor(epoch, position + 1), replace(stats), self.collate(batch))
                    batch = []
            if start == 0 and usable == 0:  # otherwise the loop would spin forever
                raise LoaderError(
                    f"consumer {self.rank * self.slots + slot} got no usable sample in epoch {epoch} "
                    f"of {self.config.manifest} (shards {plan.urls}); check the shards and the transform")

    def _plan(self, epoch: int, slot: int) -> _Plan:
        ids = _assigned(len(self.urls), self.rank, self.world_size, slot, self.config.num_workers,
                        self.seed, epoch)
        counts = [self.counts[i] for i in ids]
        firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        rng = _rng(self.seed, _TAG_SHUFFLE, epoch, self.rank, slot)
        return _Plan([self.urls[i] for i in ids], counts, firsts,
                     shuffle_order(sum(counts), self.config.shuffle_buffer, rng))

    def _epoch(self, plan: _Plan, epoch: int, slot: int, start: int, stats: LoaderStats
               ) -> Iterator[tuple[int, Any]]:
        """(position, transformed sample or None) for positions start.. of the epoch."""
        done = np.zeros(plan.size, dtype=bool)
        done[plan.order[:start]] = True
        inputs = self._inputs(plan, done, stats)
        held: dict[int, dict[str, Any]] = {}
        read_upto = -1
        consumer = self.rank * self.slots + slot
        for position in range(start, plan.size):
            wanted = int(plan.order[position])
            while read_upto < wanted:  # read on, in shard order, until the wanted sample is in
                read_upto, members = next(inputs)
                if members is not None:
                    held[read_upto] = members
            members = held.pop(wanted, None)  # None: its shard was skipped
            out = None if members is None else self._process(members, epoch, consumer, position, stats)
            yield position, out
        inputs.close()

    def _inputs(self, plan: _Plan, done: np.ndarray, stats: LoaderStats
                ) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """(index, members or None if lost) for every index not done, in increasing order."""
        for url, count, first in zip(plan.urls, plan.counts, plan.firsts):
            todo = ~done[first:first + count]
            if not todo.any():
                continue  # every sample of this shard was consumed before the resume: not opened
            delivered = -1
            for i, members in self._shard(url, count, lambda i, t=todo: i < len(t) and bool(t[i]), stats):
                delivered = i
                yield first + i, members
            for i in np.flatnonzero(todo[delivered + 1:]) + delivered + 1:  # a skipped shard's rest
                yield first + int(i), None

    def _shard(self, url: str, count: int, want: Callable[[int], bool], stats: LoaderStats
               ) -> Iterator[tuple[int, dict[str, Any]]]:
        """The wanted samples of one shard, reopened after failures at the next unread sample."""
        next_index, offset, failures = 0, 0, 0
        while next_index < count:
            try:
                with self.storage.open_read(url, offset) as stream:
                    base = offset
                    for i, members, next_offset in iter_tar_samples(stream, next_index, want):
                        if i >= count:
                            break  # the manifest is the authority on what a shard holds
                        next_index, offset, failures = i + 1, base + next_offset, 0
                        if members is not None:
                            members["__url__"] = url
                            yield i, members
                if next_index < count:
                    raise _ShortShard(f"ended after {next_index} of {count} samples (manifest)")
            except (StorageError, tarfile.TarError, OSError, _ShortShard) as exc:
                failures += 1
                if not self._retry(url, next_index, failures, exc, stats):
                    return

    def _retry(self, url: str, next_index: int, failures: int, exc: Exception, stats: LoaderStats) -> bool:
        """Whether to reopen the shard; False = skip it; raises ShardReadError when out of retries."""
        why = " ".join(f"{type(exc).__name__}: {exc}".split())
        if failures <= self.config.max_shard_retries:
            stats.shard_retries += 1
            logger.warning("shard %s failed at sample %d (%s); retry %d/%d", url, next_index, why,
                           failures, self.config.max_shard_retries)
            time.sleep(self.config.retry_backoff_s * failures)
            return True
        if not self.config.skip_failed_shards:
            raise ShardReadError(
                f"shard {url} failed {failures} times in a row at sample {next_index} ({why}); check "
                "that it exists and is readable (maskdino verify-shards), or set skip_failed_shards", url)
        stats.shards_skipped += 1
        logger.warning("skipping the rest of shard %s from sample %d after %d failures (%s)",
                       url, next_index, failures, why)
        return False

    def _process(self, members: dict[str, Any], epoch: int, consumer: int, position: int,
                 stats: LoaderStats) -> Any:
        try:
            sample = decode_sample(members)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types; one bad image must not stop training
            stats.skipped_undecodable += 1
            logger.warning("skipping undecodable sample %s in shard %s: %s", members.get("__key__"),
                           members.get("__url__"), " ".join(f"{type(exc).__name__}: {exc}".split()))
            return None
        out = self.transform(sample, _rng(self.seed, _TAG_SAMPLE, epoch, consumer, position))
        if out is None:
            stats.dropped_by_transform += 1
        return out


# --------------------------------------------------------------------------- the loader


def read_training_manifest(storage: Storage, uri: str) -> Manifest:
    """The manifest of a training stream, or LoaderError (one line, with the fix) when it cannot be."""
    try:
        manifest = load_manifest(storage, uri)
    except StorageError as exc:
        raise LoaderError(f"cannot read the training manifest {uri} ({exc}); shard the dataset "
                          "first (maskdino shard) or fix data.manifest") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise LoaderError(f"{uri} is not a shard manifest ({type(exc).__name__}: {exc}); point "
                          "data.manifest at the manifest.json written by sharding") from exc
    if not manifest.shards or manifest.counts.samples == 0:
        raise LoaderError(f"manifest {uri} lists no samples; re-shard the dataset")
    return manifest


class TrainLoader(Generic[B]):
    """Infinite iterator of training batches (`collate(list of transform outputs)`, default a list).

    Iterating starts DataLoader workers at the current state; iterating again later continues
    where the batches handed out so far left off. One iteration at a time."""

    def __init__(self, config: LoaderConfig, transform: Transform, *,
                 storage: Storage, collate: Callable[[list[Any]], B] | None = None,
                 rank: int | None = None, world_size: int | None = None,
                 state: dict[str, Any] | None = None, manifest: Manifest | None = None) -> None:
        """manifest: the parsed `config.manifest`, when the caller has already read it."""
        self.config = config
        self.storage = storage
        self.transform = transform
        self.collate: Callable[[list[Any]], Any] = collate or list
        own_rank, own_world = rank_and_world()
        self.rank = own_rank if rank is None else rank
        self.world_size = own_world if world_size is None else world_size
        self.urls, self.counts = self._read_manifest(manifest)
        self.slots = max(1, config.num_workers)
        self.seed = config.seed
        self.batches = 0
        self.cursors = [Cursor(0, 0)] * self.slots
        self._stats = [LoaderStats() for _ in range(self.slots)]
        self.last_wait_seconds = 0.0  # time the last batch was waited for (the trainer logs the fraction)
        self.total_wait_seconds = 0.0
        if state is not None:
            self.load_state_dict(state)

    def _read_manifest(self, manifest: Manifest | None) -> tuple[list[str], list[int]]:
        manifest = manifest or read_training_manifest(self.storage, self.config.manifest)
        return shard_urls(manifest, self.config.manifest), [s.samples for s in manifest.shards]

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[B]:
        dataset = _ConsumerStream(
            self.config, self.seed, self.urls, self.counts, self.rank, self.world_size, list(self.cursors),
            list(self._stats), self.batches % self.slots, self.transform, self.collate, self.storage)
        workers = self.config.num_workers
        # batch_size=None: workers yield whole batches; the DataLoader takes them round-robin, in
        # order, so worker (j + rotation) % slots yields global batches b with b % slots == that slot.
        # A private generator: DataLoader draws its base seed when iterated, and from torch's global RNG
        # that would shift the model's noise (DN, point sampling) after a resume. Workers use our own rngs.
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity,
                            prefetch_factor=self.config.prefetch_factor if workers else None, in_order=True,
                            generator=torch.Generator().manual_seed(self.seed))
        items = iter(loader)
        try:
            while True:
                started = time.perf_counter()
                item = next(items)
                self.last_wait_seconds = time.perf_counter() - started
                self.total_wait_seconds += self.last_wait_seconds
                self._stats[item.slot] = item.stats
                if isinstance(item, _Failure):
                    raise ShardReadError(item.message, item.url) if item.url else LoaderError(item.message)
                self.cursors[item.slot] = item.cursor
                self.batches += 1
                yield item.batch
        finally:
            del items  # shuts the workers down

    def stats(self) -> LoaderStats:
        return sum(self._stats, LoaderStats())

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Plain data (JSON- and torch.save-able) for this rank's checkpoint."""
        return {
            "version": STATE_VERSION, "seed": self.seed, "batches": self.batches,
            "manifest": self.config.manifest, "num_shards": len(self.urls),
            "rank": self.rank, "world_size": self.world_size, "slots": self.slots,
            "consumers": [{"epoch": c.epoch, "position": c.position} for c in self.cursors],
            "stats": [asdict(s) for s in self._stats],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`. The saved seed wins over the config's. A different layout (rank,
        world size, workers, shard count) cannot resume exactly: it warns and starts every consumer
        at the epoch after the furthest saved one."""
        if state.get("version") != STATE_VERSION:
            raise LoaderError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}; "
                              "it comes from another version of pipeline/loader.py - start the data stream anew")
        if state["seed"] != self.config.seed:
            logger.warning("loader state has seed %d, config says %d: keeping the state's seed",
                           state["seed"], self.config.seed)
        self.seed = int(state["seed"])
        self.batches = int(state["batches"])
        cursors = [Cursor(int(c["epoch"]), int(c["position"])) for c in state["consumers"]]
        stats = [LoaderStats(**s) for s in state["stats"]]
        layout = (self.rank, self.world_size, self.slots, len(self.urls), self.config.manifest)
        saved = (state["rank"], state["world_size"], state["slots"], state["num_shards"], state["manifest"])
        if layout == saved:
            self.cursors, self._stats = cursors, stats
            return
        logger.warning("loader state was saved with (rank, world, workers, shards, manifest) = %s, now %s: "
                       "resuming at the next epoch, not at the exact sample", saved, layout)
        epoch = max(c.epoch for c in cursors) + 1
        self.cursors = [Cursor(epoch, 0)] * self.slots
        self._stats = [sum(stats, LoaderStats())] + [LoaderStats() for _ in range(self.slots - 1)]
