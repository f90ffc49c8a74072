"""`maskdino verify-shards MANIFEST`: re-read every shard of a manifest and check checksums,
counts, member adjacency, required members and decodability. Reads through the storage layer, so a
manifest on s3:// is verified the same way as one on disk."""
from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from core.manifest import Manifest, load_manifest, shard_urls
from core.shard_sample import LABEL_MEMBER, META_MEMBER, image_member, parse_meta
from core.shard_tar import iter_tar_samples
from core.storage import Storage
from data_prep.validate import SampleProblem, check_panoptic_png, check_semantic_png, inspect_image


@dataclass
class ShardCheck:
    url: str
    samples: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    manifest_uri: str
    shards: list[ShardCheck]
    samples: int

    @property
    def problems(self) -> list[str]:
        return [f"{s.url}: {p}" for s in self.shards for p in s.problems]

    @property
    def ok(self) -> bool:
        return not self.problems


class _HashingReader:
    def __init__(self, source) -> None:
        self._source, self.sha256, self.size = source, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self._source.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data


def _check_sample(key: str, members: dict[str, bytes], manifest: Manifest) -> None:
    if META_MEMBER not in members:
        raise SampleProblem("missing_member", f"sample {key} has no .json member")
    meta = parse_meta(members)
    image_ext = image_member(meta)
    if image_ext not in members:
        raise SampleProblem("missing_member", f"sample {key} has no .{image_ext} image member")
    info = inspect_image(members[image_ext], "header")
    if (info.width, info.height) != (meta["width"], meta["height"]):
        raise SampleProblem("size_mismatch", f"sample {key}: image size differs from its JSON")
    if manifest.label_format is not None:
        if LABEL_MEMBER not in members:
            raise SampleProblem("missing_member", f"sample {key} has no .png label member")
        if manifest.label_format == "coco_rgb2id":
            check_panoptic_png(members[LABEL_MEMBER], info.width, info.height, [s["id"] for s in meta["segments"]])
        else:
            check_semantic_png(members[LABEL_MEMBER], info.width, info.height, len(manifest.categories))


def verify_shard(storage: Storage, url: str, manifest: Manifest, expected) -> ShardCheck:
    """Stream one tar once: hash it and check each sample as its members go by."""
    check = ShardCheck(url=url)
    seen: set[str] = set()
    with storage.open_read(url) as raw:
        reader = _HashingReader(raw)
        try:
            for _index, members, _offset in iter_tar_samples(reader):
                key = members["__key__"]  # type: ignore[index]  # every sample is wanted
                if key in seen:
                    check.problems.append(f"members of sample {key} are not adjacent")
                seen.add(key)
                try:
                    _check_sample(key, members, manifest)  # type: ignore[arg-type]
                except (SampleProblem, ValueError, KeyError) as exc:
                    check.problems.append(str(exc))
                check.samples += 1
        except tarfile.TarError as exc:
            check.problems.append(f"not a readable tar ({exc})")
        while reader.read(1 << 20):  # hash any padding tarfile did not consume
            pass
    if reader.sha256.hexdigest() != expected.sha256:
        check.problems.append(f"sha256 {reader.sha256.hexdigest()[:12]}... differs from the manifest's {expected.sha256[:12]}...")
    if reader.size != expected.bytes:
        check.problems.append(f"{reader.size} bytes, manifest says {expected.bytes}")
    if check.samples != expected.samples:
        check.problems.append(f"{check.samples} samples, manifest says {expected.samples}")
    return check


def _check_one(storage: Storage, url: str, manifest: Manifest, entry) -> ShardCheck:
    if storage.stat(url) is None:
        return ShardCheck(url=url, problems=["shard file is missing"])
    return verify_shard(storage, url, manifest, entry)


def verify_shards(storage: Storage, manifest_uri: str, on_shard: Callable[[ShardCheck], None] | None = None,
                  workers: int = 4, manifest: Manifest | None = None) -> VerifyReport:
    """Check every shard, `workers` at a time (threads: reads and sha256 release the GIL, and on
    S3 the time is spent waiting for bytes). Checks come back in manifest order."""
    manifest = manifest or load_manifest(storage, manifest_uri)  # the caller's parsed copy, when it has one
    pairs = list(zip(shard_urls(manifest, manifest_uri), manifest.shards))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(_check_one, storage, url, manifest, entry) for url, entry in pairs]
        if on_shard is not None:
            for future in as_completed(futures):
                on_shard(future.result())
        checks = [f.result() for f in futures]
    total = sum(c.samples for c in checks)
    if checks and total != manifest.counts.samples and all(not c.problems for c in checks):
        checks[-1].problems.append(f"{total} samples in all shards, manifest counts {manifest.counts.samples}")
    return VerifyReport(manifest_uri=manifest_uri, shards=checks, samples=total)
