"""One shard task: records -> a deterministic POSIX tar, published atomically, plus a small
`_parts/<shard>.json` sidecar that lets a re-run skip the shard.

Ordering constraints: the tar is published (atomic rename / multipart completion) before its
sidecar, and the sidecar carries a digest of the task's inputs; a re-run trusts a shard only when
the sidecar digest matches its new inputs and the published bytes re-hash to the recorded sha256.
The tar is byte-identical for identical inputs: fixed mtime/owner/mode and members in a fixed order.
"""
from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
from dataclasses import asdict, dataclass, field

from core import records as R
from core.records import CONVERTER_VERSION, Reject, SampleRecord
from core.shard_sample import AnnotationJson, SampleMeta, annotation_json, encode_members, segment_json
from core.shard_tar import DeterministicTarWriter
from core.storage import Storage, StorageError, join
from data_prep.validate import (
    SampleProblem,
    check_image_size,
    check_panoptic_png,
    check_semantic_png,
    inspect_image,
    to_compressed_rle,
)

PARTS_DIR = "_parts"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardJob:
    """What the driver hands one task: its slice of records and how to write them."""

    index: int
    name: str  # file name of the shard, e.g. "shard-000003.tar"
    output: str  # the split's output folder (local or s3://)
    records: list[SampleRecord]
    dataset: str
    task: str
    num_classes: int
    category_ids: tuple[int, ...]
    decode: str
    storage: Storage

    def digest(self) -> str:
        """Digest of everything that determines the shard's bytes (dataclass reprs are stable)."""
        payload = repr((CONVERTER_VERSION, self.name, self.dataset, self.task, self.num_classes,
                        self.category_ids, self.decode, self.records))
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class ShardResult:
    index: int
    name: str
    samples: int
    bytes: int
    sha256: str
    annotations: int
    rejects: list[Reject] = field(default_factory=list)
    reused: bool = False


class _HashingSink:
    """File-like sink that coalesces tar output into 1 MiB blocks and hands them to a thread that
    hashes and writes them. sha256 and file writes release the GIL, so they overlap with reading
    and checking the next images (the task's main thread) instead of adding to it."""

    def __init__(self, sink, block_bytes: int = 1 << 20) -> None:
        self._sink, self._block_bytes = sink, block_bytes
        self.sha256, self.size = hashlib.sha256(), 0
        self._buffer = bytearray()
        self._blocks: queue.Queue[bytes | None] = queue.Queue(maxsize=8)  # bounds memory to ~9 MiB
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="shard-sink", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (block := self._blocks.get()) is not None:
            if self._error is None:  # after a failure keep consuming, so the producer never blocks
                try:
                    self.sha256.update(block)
                    self._sink.write(block)
                except BaseException as exc:  # re-raised in the task's thread by close()
                    self._error = exc

    def write(self, data: bytes) -> int:
        self._buffer += data
        self.size += len(data)
        if len(self._buffer) >= self._block_bytes:
            self._blocks.put(bytes(self._buffer))
            self._buffer.clear()
        return len(data)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        """Flush, stop the thread, and raise what it hit. Safe to call twice."""
        if not self._thread.is_alive():
            return
        if self._buffer:
            self._blocks.put(bytes(self._buffer))
            self._buffer.clear()
        self._blocks.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def _annotation_json(a: R.AnnotationRecord, height: int, width: int) -> AnnotationJson:
    rle = to_compressed_rle(a.segmentation_json, height, width) if a.segmentation_json is not None else None
    return annotation_json(a.id, a.category_id, a.bbox_xywh, a.iscrowd, a.area, rle)


def _sample_members(job: ShardJob, rec: SampleRecord, rejects: list[Reject]) -> tuple[dict[str, bytes], int]:
    """Tar members of one sample (raises SampleProblem for a bad sample; drops bad annotations)."""
    image = job.storage.read_bytes(rec.image_uri)
    info = inspect_image(image, job.decode)
    check_image_size(info, rec.width, rec.height)
    width, height = info.width, info.height
    meta: SampleMeta = {"key": rec.key, "image_id": rec.image_id, "file_name": rec.file_name,
                        "width": width, "height": height, "image_member": info.extension}
    label = None
    if rec.label_uri is not None:
        label = job.storage.read_bytes(rec.label_uri)
        if rec.segments is not None:
            check_panoptic_png(label, width, height, [s.id for s in rec.segments])
        else:
            check_semantic_png(label, width, height, job.num_classes)
    annotations = []
    for a in rec.annotations:
        try:
            annotations.append(_annotation_json(a, height, width))
        except SampleProblem as problem:
            rejects.append(Reject(rec.key, problem.reason, problem.detail, annotation_id=a.id))
    if job.task != "semantic":
        meta["annotations"] = annotations
    if rec.segments is not None:
        meta["segments"] = [segment_json(s.id, s.category_id, s.iscrowd, s.bbox_xywh, s.area) for s in rec.segments]
    return encode_members(meta, image, label), len(annotations) + len(rec.segments or ())


def _sidecar_uri(job: ShardJob) -> str:
    return join(job.output, PARTS_DIR, job.name + ".json")


def _read_sidecar(job: ShardJob) -> tuple[str, ShardResult] | None:
    """(input digest, recorded result) of the published shard, or None when there is no usable sidecar."""
    sidecar_uri = _sidecar_uri(job)
    if not job.storage.exists(sidecar_uri):
        return None
    try:
        side = json.loads(job.storage.read_bytes(sidecar_uri))
        result = ShardResult(index=job.index, name=job.name, samples=side["samples"], bytes=side["bytes"],
                             sha256=side["sha256"], annotations=side["annotations"],
                             rejects=[Reject(**r) for r in side["rejects"]], reused=True)
        return side["plan_digest"], result
    except (ValueError, KeyError, TypeError) as exc:  # a damaged sidecar: the shard is simply rewritten
        log.warning("ignoring unreadable %s (%s); rewriting %s", sidecar_uri, exc, job.name)
        return None


def _reuse(job: ShardJob, digest: str) -> ShardResult | None:
    """The published shard, if its sidecar matches these inputs and its bytes re-hash correctly."""
    recorded = _read_sidecar(job)
    if recorded is None or recorded[0] != digest:
        return None
    result = recorded[1]
    shard_uri = join(job.output, job.name)
    info = job.storage.stat(shard_uri)
    if info is None or info.size != result.bytes:
        return None
    sha = hashlib.sha256()
    with job.storage.open_read(shard_uri) as f:
        while block := f.read(1 << 22):
            sha.update(block)
    return result if sha.hexdigest() == result.sha256 else None


def _write_records(job: ShardJob, tar: DeterministicTarWriter, rejects: list[Reject]) -> tuple[int, int]:
    """Samples and annotations written; bad samples and annotations go to `rejects`."""
    samples = annotations = 0
    for rec in job.records:
        try:
            members, n = _sample_members(job, rec, rejects)
        except SampleProblem as problem:
            rejects.append(Reject(rec.key, problem.reason, problem.detail))
            continue
        except StorageError as exc:
            # A file listed at planning time and gone now is data; any other storage failure is not.
            if job.storage.exists(rec.image_uri) and (rec.label_uri is None or job.storage.exists(rec.label_uri)):
                raise
            rejects.append(Reject(rec.key, R.MISSING_FILE, f"file vanished during sharding ({exc})"))
            continue
        tar.write(rec.key, members)
        samples += 1
        annotations += n
    return samples, annotations


def write_shard(job: ShardJob) -> ShardResult:
    """Write (or reuse) one shard; per-sample problems become rejects, storage errors propagate."""
    digest = job.digest()
    reused = _reuse(job, digest)
    if reused is not None:
        return reused
    rejects: list[Reject] = []
    with job.storage.open_write(join(job.output, job.name)) as sink:
        hashing = _HashingSink(sink)
        try:
            tar = DeterministicTarWriter(hashing)
            try:
                samples, annotations = _write_records(job, tar, rejects)
            finally:
                tar.close()  # on an error the sink is discarded by open_write; closing keeps tarfile quiet
        finally:
            hashing.close()  # joins the writer thread before open_write publishes or discards
    rejects.sort(key=Reject.sort_key)
    result = ShardResult(index=job.index, name=job.name, samples=samples, bytes=hashing.size,
                         sha256=hashing.sha256.hexdigest(), annotations=annotations, rejects=rejects)
    side = {k: v for k, v in asdict(result).items() if k != "reused"}
    side["plan_digest"] = digest
    job.storage.write_bytes(_sidecar_uri(job), json.dumps(side, sort_keys=True).encode())
    return result
