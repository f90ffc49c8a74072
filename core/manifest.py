"""The split's manifest: written last, it is the commit marker of a sharded dataset.

Shard URLs are relative to the manifest's folder, so a dataset can be copied between a disk and a
bucket, and two runs of the same input into different folders produce identical manifests."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from core.records import Category, Reject
from core.storage import Storage, join

MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardEntry:
    url: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Counts:
    samples: int
    annotations: int
    rejected_samples: int
    rejected_annotations: int
    boxes_clipped: int
    rejects_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    dataset: str
    task: str
    split: str
    categories: list[Category]
    converter_version: str
    source_fingerprint: str
    label_format: str | None
    shards: list[ShardEntry]
    counts: Counts
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        d = json.loads(text)
        return cls(
            dataset=d["dataset"], task=d["task"], split=d["split"],
            categories=[Category(**c) for c in d["categories"]],
            converter_version=d["converter_version"], source_fingerprint=d["source_fingerprint"],
            label_format=d["label_format"], shards=[ShardEntry(**s) for s in d["shards"]],
            counts=Counts(**d["counts"]), format_version=d["format_version"],
        )

    def contiguous_ids(self) -> dict[int, int]:
        """Dataset category id -> contiguous training id (0..K-1), in the manifest's order."""
        return {c.id: i for i, c in enumerate(self.categories)}


def manifest_dir(manifest_uri: str) -> str:
    return manifest_uri.rsplit("/", 1)[0] if "/" in manifest_uri else "."


def shard_urls(manifest: Manifest, manifest_uri: str) -> list[str]:
    """Absolute URLs of the shards (relative entries resolved against the manifest's folder)."""
    base = manifest_dir(manifest_uri)
    return [s.url if "://" in s.url or s.url.startswith("/") else join(base, s.url) for s in manifest.shards]


def load_manifest(storage: Storage, uri: str) -> Manifest:
    return Manifest.from_json(storage.read_bytes(uri).decode("utf-8"))


def rejects_jsonl(rejects: list[Reject]) -> bytes:
    return "".join(json.dumps(r.to_json(), sort_keys=True) + "\n" for r in rejects).encode()
