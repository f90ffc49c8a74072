"""The training loader (pipeline/loader.py): the shard split, exact resume with and without
DataLoader workers, and what happens to undecodable samples, failing shards and cut S3 reads."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pipeline.loader as loader_mod
from core.manifest import Manifest, ShardEntry
from core.shard_sample import ShardSample
from core.storage import Storage, StorageError
from data_prep.synthetic import SyntheticSpec, make_synthetic
from pipeline.loader import (
    Cursor,
    LoaderConfig,
    LoaderError,
    ShardReadError,
    TrainLoader,
    assign_shards,
    shuffle_order,
)
from tests.shard_helpers import run_shard

LOCAL = Storage()  # the shards of most tests are on local disk

def _transform(sample: ShardSample, rng: np.random.Generator) -> tuple[str, int, int]:
    """Key, an augmentation draw, and a pixel checksum: equal outputs mean equal samples and rngs."""
    assert sample.image.dtype == np.uint8 and sample.image.ndim == 3 and sample.image.shape[2] == 3
    return sample.key, int(rng.integers(2**31)), int(sample.image.sum())


def _drop_odd(sample: ShardSample, rng: np.random.Generator) -> tuple[str, int, int] | None:
    return None if sample.meta["image_id"] % 2 else _transform(sample, rng)


def _config(manifest: str | Path, **overrides: Any) -> LoaderConfig:
    base: dict[str, Any] = {"batch_size": 3, "num_workers": 0, "shuffle_buffer": 4, "retry_backoff_s": 0.0}
    return LoaderConfig(manifest=str(manifest), **{**base, **overrides})


def _take(loader: TrainLoader, n: int) -> list[Any]:
    it = iter(loader)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()  # stops the DataLoader workers now, not at garbage collection


def _keys(batches: list[list[tuple]]) -> list[str]:
    return [s[0] for b in batches for s in b]


def _shard_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))


def _sample_offsets(path: Path) -> list[int]:
    """Byte offset of each sample's first tar header."""
    with tarfile.open(path) as tar:
        firsts: dict[str, int] = {}
        for m in tar.getmembers():
            firsts.setdefault(m.name.split(".", 1)[0], m.offset)
    return list(firsts.values())


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    make_synthetic(root, SyntheticSpec(train_images=12, val_images=0, min_size=96, max_size=128, seed=5,
                                       formats=("coco_panoptic",)))
    return root / "coco"


@pytest.fixture(scope="module")
def shards(raw, tmp_path_factory) -> Path:
    """12 samples in 6 shards of 2."""
    out = tmp_path_factory.mktemp("shards")
    run_shard(out, _extra={"shard.maxcount": 2}, format="coco_panoptic", root=str(raw), split="train")
    return out


@pytest.fixture()
def shards_copy(shards, tmp_path) -> Path:
    """A copy a test may damage."""
    return Path(shutil.copytree(shards, tmp_path / "shards"))


def _all_keys(root: Path) -> list[str]:
    return sorted(k for p in sorted(root.glob("*.tar")) for k in _shard_keys(p))


# --------------------------------------------------------------------------- split rule


def test_assign_shards_reads_every_shard_once_per_epoch_when_consumers_divide_them():
    urls = [f"s{i}" for i in range(12)]
    for epoch in range(3):
        parts = [assign_shards(urls, r, 2, w, 3, seed=7, epoch=epoch) for r in range(2) for w in range(3)]
        assert [len(p) for p in parts] == [2] * 6
        assert sorted(u for p in parts for u in p) == sorted(urls)
        assert parts == [assign_shards(urls, r, 2, w, 3, seed=7, epoch=epoch) for r in range(2) for w in range(3)]
    orders = {tuple(assign_shards(urls, 0, 1, 0, 0, seed=7, epoch=e)) for e in range(4)}
    assert len(orders) == 4  # the permutation changes with the epoch
    assert sorted(assign_shards(urls, 0, 1, 0, 0, seed=7, epoch=0)) == sorted(urls)  # 0 workers = 1 consumer


def test_assign_shards_resamples_so_that_every_consumer_gets_a_shard():
    urls = ["a", "b", "c"]
    parts = [assign_shards(urls, r, 2, w, 4, seed=1, epoch=0) for r in range(2) for w in range(4)]
    assert all(len(p) == 1 for p in parts)
    assert {p[0] for p in parts} == set(urls)
    uneven = [assign_shards(urls + ["d", "e"], 0, 1, w, 4, seed=1, epoch=0) for w in range(4)]
    assert sorted(u for p in uneven for u in p) == sorted(urls + ["d", "e"])  # n >= C: still once each


def test_shuffle_order_is_a_bounded_deterministic_permutation():
    order = shuffle_order(50, 8, np.random.default_rng(3))
    assert sorted(order.tolist()) == list(range(50))
    assert all(i <= k + 8 for k, i in enumerate(order.tolist()))  # never more than 8 samples held
    assert order.tolist() == shuffle_order(50, 8, np.random.default_rng(3)).tolist()
    assert sorted(shuffle_order(5, 8, np.random.default_rng(0)).tolist()) == list(range(5))


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_once_per_epoch(shards, workers):
    loader = TrainLoader(_config(shards / "manifest.json", num_workers=workers), _transform, storage=LOCAL)
    # 1 consumer x 12 samples = 4 batches of 3; 2 consumers x 6 = 2 batches each, round-robin.
    batches = _take(loader, 4)
    assert sorted(_keys(batches)) == _all_keys(shards)
    assert loader.stats().samples == 12 and loader.batches == 4
    assert loader.last_wait_seconds >= 0 and loader.total_wait_seconds >= loader.last_wait_seconds


def test_ranks_split_the_shards(shards):
    per_rank = [_keys(_take(TrainLoader(_config(shards / "manifest.json", batch_size=2), _transform,
                                        storage=LOCAL, rank=r, world_size=2), 3)) for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == _all_keys(shards)


@pytest.mark.parametrize(("workers", "batch", "first", "then"), [(0, 3, 5, 4), (2, 2, 7, 5)])
def test_resume_continues_with_the_batches_of_an_uninterrupted_run(shards, monkeypatch, workers, batch, first, then):
    config = _config(shards / "manifest.json", num_workers=workers, batch_size=batch, seed=11)
    # Count samples whose bytes were read and samples decoded (seen in this process only: workers=0).
    read, decoded = Counter(), Counter()
    real_tar, real_decode = loader_mod.iter_tar_samples, loader_mod.decode_sample

    def counting_tar(*args: Any) -> Any:
        for item in real_tar(*args):
            read["n"] += item[1] is not None
            yield item

    monkeypatch.setattr(loader_mod, "iter_tar_samples", counting_tar)
    monkeypatch.setattr(loader_mod, "decode_sample", lambda m: decoded.update(n=1) or real_decode(m))
    full = _take(TrainLoader(config, _transform, storage=LOCAL), first + then)  # crosses an epoch boundary
    read_full = read["n"]

    stopped = TrainLoader(config, _transform, storage=LOCAL)
    assert _take(stopped, first) == full[:first]
    state = json.loads(json.dumps(stopped.state_dict()))  # plain data, as in a checkpoint

    read.clear(), decoded.clear()
    resumed = TrainLoader(config, _transform, storage=LOCAL, state=state)
    assert _take(resumed, then) == full[first:]
    if workers == 0:  # consumed samples were skipped in the tar: neither read nor decoded
        assert read_full - read["n"] == first * batch and decoded["n"] == then * batch
    assert resumed.stats().samples == (first + then) * batch
    assert _take(stopped, 2) == full[first:first + 2]  # iterating the same loader again continues too


def test_state_from_another_layout_restarts_at_the_next_epoch(shards, caplog):
    saved = TrainLoader(_config(shards / "manifest.json"), _transform, storage=LOCAL)
    _take(saved, 5)  # epoch 1
    moved = TrainLoader(_config(shards / "manifest.json", num_workers=2), _transform, storage=LOCAL)
    moved.load_state_dict(saved.state_dict())
    assert moved.cursors == [Cursor(2, 0), Cursor(2, 0)]
    assert "not at the exact sample" in caplog.text


# --------------------------------------------------------------------------- bad data


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _add_shard(root: Path, name: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    _write_tar(root / name, samples)
    manifest = Manifest.from_json((root / "manifest.json").read_text())
    entry = ShardEntry(url=name, samples=len(samples), bytes=(root / name).stat().st_size, sha256="")
    manifest = replace(manifest, shards=[*manifest.shards, entry],
                       counts=replace(manifest.counts, samples=manifest.counts.samples + len(samples)))
    (root / "manifest.json").write_text(manifest.to_json())


def test_undecodable_image_is_skipped_counted_and_logged(shards_copy, caplog):
    with tarfile.open(next(shards_copy.glob("*.tar"))) as tar:
        good = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()[:3]}
    before = _all_keys(shards_copy)
    _add_shard(shards_copy, "shard-bad.tar", [("broken", {**good, "jpg": b"\xff\xd8\xff\xe0 not a jpeg"}),
                                               ("copy", good)])
    loader = TrainLoader(_config(shards_copy / "manifest.json", batch_size=13), _transform, storage=LOCAL)
    (batch,) = _take(loader, 1)  # 14 samples, one of them broken: exactly one epoch
    assert sorted(s[0] for s in batch) == sorted(before + ["copy"])
    assert loader.stats().skipped_undecodable == 1
    assert "broken" in caplog.text and "shard-bad.tar" in caplog.text


def test_transform_returning_none_drops_the_sample(shards):
    loader = TrainLoader(_config(shards / "manifest.json", batch_size=2), _drop_odd, storage=LOCAL)
    batches = _take(loader, 3)
    stats = loader.stats()
    assert stats.samples == 6 and stats.dropped_by_transform > 0 and len(set(_keys(batches))) == 6


def test_missing_manifest_names_the_uri(tmp_path):
    with pytest.raises(LoaderError) as err:
        TrainLoader(_config(tmp_path / "nope" / "manifest.json"), _transform, storage=LOCAL)
    assert str(tmp_path / "nope" / "manifest.json") in str(err.value) and "\n" not in str(err.value)


def test_failing_shard_raises_a_one_line_error_naming_it(shards_copy):
    victim = sorted(shards_copy.glob("*.tar"))[2]
    victim.unlink()
    loader = TrainLoader(_config(shards_copy / "manifest.json", num_workers=2, max_shard_retries=2), _transform, storage=LOCAL)
    with pytest.raises(ShardReadError) as err:
        _take(loader, 8)
    assert err.value.url == str(victim) and str(victim) in str(err.value) and "\n" not in str(err.value)
    assert loader.stats().shard_retries == 2


def test_failing_shard_is_skipped_when_asked(shards_copy, caplog):
    victim = sorted(shards_copy.glob("*.tar"))[2]
    lost = _shard_keys(victim)
    victim.unlink()
    loader = TrainLoader(_config(shards_copy / "manifest.json", batch_size=2, skip_failed_shards=True), _transform, storage=LOCAL)
    keys = _keys(_take(loader, 5))  # the 10 samples left make one epoch
    assert sorted(keys) == sorted(set(_all_keys(shards_copy)) - set(lost)) == sorted(set(keys))
    stats = loader.stats()
    assert stats.shards_skipped == 1 and stats.shard_retries == 3
    assert "skipping the rest of shard" in caplog.text and str(victim) in caplog.text


class _CutAfter(io.RawIOBase):
    """A stream that fails like a dropped connection once `limit` bytes were read."""

    def __init__(self, inner: Any, limit: int) -> None:
        super().__init__()
        self.inner, self.left = inner, limit

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.left <= 0:
            raise StorageError("simulated: connection lost")
        n = self.inner.readinto(memoryview(b)[: min(len(b), self.left)])
        self.left -= n
        return n

    def close(self) -> None:
        self.inner.close()
        super().close()


class _FlakyStorage(Storage):
    """Local storage whose first read of one file breaks after `limit` bytes."""

    def __init__(self, url: str, limit: int) -> None:
        super().__init__()
        self.url, self.limit, self.opens = url, limit, []

    def open_read(self, uri: str, start: int = 0) -> Any:
        self.opens.append((uri, start))
        stream = super().open_read(uri, start)
        if uri == self.url and len([o for o in self.opens if o[0] == uri]) == 1:
            return _CutAfter(stream, self.limit)
        return stream


def test_failed_read_resumes_at_the_sample_after_the_last_one_read(shards):
    manifest = Manifest.from_json((shards / "manifest.json").read_text())
    urls = [str(shards / s.url) for s in manifest.shards]
    first = assign_shards(urls, 0, 1, 0, 0, seed=0, epoch=0)[0]  # the first shard read
    offsets = _sample_offsets(Path(first))
    storage = _FlakyStorage(first, limit=offsets[1] + 600)  # inside the second sample
    loader = TrainLoader(_config(shards / "manifest.json", shuffle_buffer=1), _transform, storage=storage)
    keys = _keys(_take(loader, 4))
    assert sorted(keys) == _all_keys(shards)  # each once
    assert [o for o in storage.opens if o[0] == first] == [(first, 0), (first, offsets[1])]
    assert loader.stats().shard_retries == 1


def test_config_is_checked():
    with pytest.raises(ValueError):
        LoaderConfig(manifest="m.json", batch_size=0)
    with pytest.raises(ValueError):
        LoaderConfig(manifest="", batch_size=2)


# --------------------------------------------------------------------------- S3


def _upload(storage: Storage, local: Path, prefix: str) -> None:
    for path in sorted(local.iterdir()):
        if path.is_file():
            storage.write_bytes(f"{prefix}/{path.name}", path.read_bytes())


@pytest.mark.s3
def test_s3_cut_connections_lose_and_duplicate_nothing(shards, s3_bucket, fault_proxy):
    storage, bucket = s3_bucket
    _upload(storage, shards, f"{bucket}/train")
    names = sorted(p.name for p in shards.glob("*.tar"))[:4]
    for name in names:  # each shard's first GET is cut; the ranged GET that resumes it is not
        fault_proxy.cut_next(1, after_bytes=7000, path_contains=name)
    loader = TrainLoader(_config(f"{bucket}/train/manifest.json"), _transform, storage=fault_proxy.storage())
    keys = _keys(_take(loader, 4))
    assert Counter(keys) == Counter(_all_keys(shards))
    assert fault_proxy.cuts == 4 and loader.stats().shard_retries == 0  # Storage resumed each body
    ranged = [r for r in fault_proxy.requests if r.method == "GET" and "Range" in r.headers]
    assert [r.headers["Range"] for r in ranged[:4]] == ["bytes=7000-"] * 4


@pytest.mark.s3
def test_s3_read_that_storage_gives_up_on_is_resumed_by_the_loader(raw, tmp_path, s3_bucket, fault_proxy):
    big = tmp_path / "big"  # 2 shards of 6: a cut late in a shard leaves several samples read
    run_shard(big, _extra={"shard.maxcount": 6}, format="coco_panoptic", root=str(raw), split="train")
    storage, bucket = s3_bucket
    _upload(storage, big, f"{bucket}/big")
    name = min(p.name for p in big.glob("*.tar"))
    offsets = _sample_offsets(big / name)
    fault_proxy.cut_next(1, after_bytes=offsets[-1] + 600, path_contains=name)
    # max_attempts=1: Storage gives up on the first cut, so the loader has to reopen the shard.
    loader = TrainLoader(_config(f"{bucket}/big/manifest.json", batch_size=4), _transform,
                         storage=fault_proxy.storage(max_attempts=1))
    keys = _keys(_take(loader, 3))
    assert Counter(keys) == Counter(_all_keys(big))
    gets = [r for r in fault_proxy.requests if r.method == "GET" and r.path.endswith(name)]
    assert len(gets) == 2 and gets[0].fault == "cut" and loader.stats().shard_retries == 1
    start = int(gets[1].headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert start in offsets[1:]  # a sample boundary after at least one sample was read


@pytest.mark.s3
def test_s3_deleted_shard_raises_shard_read_error(shards, s3_bucket):
    storage, bucket = s3_bucket
    _upload(storage, shards, f"{bucket}/train")
    victim = f"{bucket}/train/shard-000003.tar"
    storage.delete(victim)
    loader = TrainLoader(_config(f"{bucket}/train/manifest.json", max_shard_retries=1), _transform, storage=storage)
    with pytest.raises(ShardReadError) as err:
        _take(loader, 4)
    assert err.value.url == victim and victim in str(err.value) and "\n" not in str(err.value)
