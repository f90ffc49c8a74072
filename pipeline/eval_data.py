"""Evaluation samples from a shard manifest, split over ranks so every rank runs the same number of batches.

Rank r of W takes the contiguous block [r·P, (r+1)·P) of the manifest's samples, P = ceil(N / W); it opens
only the shards that overlap its block. A rank whose block runs past the end is topped up with padding
samples (copies of a real one, `is_padding=True`) that the evaluators skip: collectives in the model or
the final gather then never wait on a rank that ran out of data.
"""
from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from webdataset.tariterators import group_by_keys, tar_file_iterator

from data_prep.manifest import Manifest, load_manifest, shard_urls
from data_prep.storage import Storage


@dataclass(frozen=True)
class EvalSample:
    """One decoded sample. image [H, W, 3] uint8 RGB; meta = the shard's `<key>.json` (image_id, width,
    height, annotations with xyxy boxes and compressed-RLE masks, panoptic segments); label_png = the
    panoptic id PNG or semantic label PNG, undecoded."""

    key: str
    image: np.ndarray
    meta: dict[str, Any]
    label_png: bytes | None
    is_padding: bool = False

    @property
    def image_id(self) -> int | str:
        return self.meta["image_id"]


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


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image -> [H, W, 3] uint8 RGB. detectron2 reads images with PIL and applies the EXIF
    orientation; shards keep the original bytes, so it is applied here."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def decode_sample(members: dict[str, Any]) -> EvalSample:
    meta = json.loads(members["json"])
    image = decode_image(members[meta.get("image_member", "jpg")])
    return EvalSample(key=members["__key__"], image=image, meta=meta, label_png=members.get("png"))


def _iter_shard_members(storage: Storage, url: str) -> Iterator[dict[str, Any]]:
    with storage.open_read(url) as stream:
        files = ({**f, "__url__": url} for f in tar_file_iterator(stream))  # group_by_keys wants the url
        yield from group_by_keys(files)


def iter_eval_samples(storage: Storage, manifest_uri: str, rank: int = 0, world_size: int = 1,
                      limit: int = 0, manifest: Manifest | None = None) -> Iterator[EvalSample]:
    """This rank's samples in manifest order, padded to the common per-rank count.

    limit > 0 evaluates only the first `limit` samples of the manifest (for quick looks)."""
    manifest = manifest or load_manifest(storage, manifest_uri)
    total = manifest.counts.samples if not limit else min(limit, manifest.counts.samples)
    share = rank_share(total, rank, world_size)
    last: EvalSample | None = None
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


def _first_sample(storage: Storage, manifest: Manifest, manifest_uri: str) -> EvalSample:
    """Padding for a rank with no real samples at all (more ranks than samples)."""
    return decode_sample(next(_iter_shard_members(storage, shard_urls(manifest, manifest_uri)[0])))
