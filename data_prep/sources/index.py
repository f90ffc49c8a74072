"""What every source reader produces: a sorted, validated index of samples that hands out records
for one shard at a time, so the driver never materialises the whole dataset as Python objects."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from core.records import Category, Reject, SampleRecord
from core.storage import Storage

# Per-sample bytes we add to the image/label file sizes when estimating shard sizes: three tar
# headers (512 B each) plus the JSON member's base size; each annotation adds ANNOTATION_BYTES.
SAMPLE_OVERHEAD_BYTES = 3 * 512 + 256
ANNOTATION_BYTES = 96


@dataclass
class SourceIndex:
    """A validated dataset split, samples sorted by key.

    keys: (S,) sorted sample keys; est_bytes: (S,) int64 estimated tar bytes per sample, used by the
    shard plan; driver_rejects: what the driver rejected before any shard task ran.
    `records(start, stop)` builds the records of sorted positions [start, stop).
    """

    dataset: str
    task: str
    split: str
    categories: list[Category]
    fingerprint: str
    label_format: str | None
    keys: list[str]
    est_bytes: np.ndarray
    driver_rejects: list[Reject] = field(default_factory=list)
    boxes_clipped: int = 0

    def __len__(self) -> int:
        return len(self.keys)

    def records(self, start: int, stop: int) -> list[SampleRecord]:  # pragma: no cover - abstract
        raise NotImplementedError


def list_relative(storage: Storage, prefix: str) -> dict[str, int]:
    """{path relative to prefix: size} of every object below prefix (one list call, not N stats)."""
    base = prefix.rstrip("/") + "/"
    out: dict[str, int] = {}
    for info in storage.list(prefix):
        rel = info.uri[len(base):] if info.uri.startswith(base) else info.uri
        out[rel] = info.size
    return out


def listing_digest(listing: dict[str, int]) -> str:
    """Fingerprint of a folder by names and sizes (hashing every image would read the dataset twice)."""
    digest = hashlib.sha256()
    for name in sorted(listing):
        digest.update(f"{name}\t{listing[name]}\n".encode())
    return digest.hexdigest()


def combine_fingerprints(**parts: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(parts):
        digest.update(f"{name}={parts[name]}\n".encode())
    return "sha256:" + digest.hexdigest()


def image_key(image_id: int) -> str:
    """Tar key of a numeric image id: zero-padded so that key order is id order (COCO's own style)."""
    return f"{image_id:012d}"
