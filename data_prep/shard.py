"""The sharding driver: source -> validated index -> shard plan -> shard tasks -> rejects -> manifest.

Ordering constraint: shards and their sidecars first, then `rejects.jsonl`, then `manifest.json`
last; a reader that sees the manifest sees a complete dataset."""
from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from core.manifest import MANIFEST_NAME, REJECTS_NAME, Counts, Manifest, ShardEntry, rejects_jsonl
from core.records import CONVERTER_VERSION, Reject
from core.storage import Storage, join
from data_prep.fanout import run_jobs
from data_prep.plan import plan_shards
from data_prep.shard_config import ShardJobConfig
from data_prep.sources import SourceIndex, build_index
from data_prep.sources.layout import require_output
from data_prep.writer import ShardJob, ShardResult

log = logging.getLogger(__name__)


class StrictRejectError(RuntimeError):
    """--strict and at least one reject: the manifest is not written."""


@dataclass
class ShardSummary:
    dataset: str
    split: str
    output: str
    manifest_uri: str | None
    samples: int
    annotations: int
    shards: int
    shards_reused: int
    bytes: int
    seconds: float
    boxes_clipped: int
    rejects_by_reason: dict[str, int] = field(default_factory=dict)

    def paragraph(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        rejected = sum(self.rejects_by_reason.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.rejects_by_reason.items()))
        text = (f"Sharded {self.samples:,} samples ({self.annotations:,} annotations) of {self.dataset}/{self.split} "
                f"into {self.shards} shards ({self.bytes / 1e6:,.1f} MB) at {self.output} in {self.seconds:.1f} s "
                f"({rate:,.0f} samples/s); {self.shards - self.shards_reused} written, {self.shards_reused} reused "
                f"from an earlier run. ")
        text += (f"{rejected:,} records rejected ({reasons}), listed in {join(self.output, REJECTS_NAME)}. "
                 if rejected else "No records rejected. ")
        if self.boxes_clipped:
            text += f"{self.boxes_clipped:,} boxes partly outside their image were clipped. "
        text += f"Manifest: {self.manifest_uri}." if self.manifest_uri else "No manifest written."
        return text


def _strict_message(rejects: list[Reject], output: str, stage: str) -> str:
    by_reason = Counter(r.reason for r in rejects)
    first = rejects[0]
    return (f"strict: {len(rejects)} records rejected {stage} ({', '.join(f'{k}: {v}' for k, v in sorted(by_reason.items()))}); "
            f"first: {first.key} {first.reason}: {first.detail}; all in {join(output, REJECTS_NAME)}; "
            f"manifest not written")


def _jobs(index: SourceIndex, cfg: ShardJobConfig, storage: Storage):
    plan = plan_shards(index.keys, index.est_bytes, cfg.shard.maxcount, cfg.shard.maxsize)
    num_classes = len(index.categories)
    category_ids = tuple(c.id for c in index.categories)
    jobs = (
        ShardJob(index=p.index, name=p.name, output=cfg.output, records=index.records(p.start, p.stop),
                 dataset=index.dataset, task=index.task, num_classes=num_classes, category_ids=category_ids,
                 decode=cfg.validate.decode, storage=storage)
        for p in plan
    )
    return plan, jobs


def shard_dataset(cfg: ShardJobConfig) -> ShardSummary:
    """Shard one split as configured; raises SourceError/StorageError/StrictRejectError with one-line
    messages for problems the user must fix."""
    require_output(cfg.output)
    started = time.perf_counter()
    storage = Storage(cfg.storage)
    with tempfile.TemporaryDirectory(prefix="maskdino-shard-") as workdir:
        index = build_index(cfg.source, storage, workdir)
    rejects = list(index.driver_rejects)
    if cfg.validate.strict and rejects:
        rejects.sort(key=Reject.sort_key)
        storage.write_bytes(join(cfg.output, REJECTS_NAME), rejects_jsonl(rejects))
        raise StrictRejectError(_strict_message(rejects, cfg.output, "while reading the annotations"))
    plan, jobs = _jobs(index, cfg, storage)
    results: list[ShardResult] = []
    with tqdm(total=len(index), unit="samples", desc=f"shard {index.dataset}/{index.split}",
              disable=None if cfg.progress else True, dynamic_ncols=True) as bar:  # None: only on a TTY
        for result in run_jobs(jobs, cfg.executor):
            results.append(result)
            bar.update(plan[result.index].stop - plan[result.index].start)
            bar.set_postfix(shards=f"{len(results)}/{len(plan)}")
    results.sort(key=lambda r: r.index)
    rejects = sorted(rejects + [r for res in results for r in res.rejects], key=Reject.sort_key)
    storage.write_bytes(join(cfg.output, REJECTS_NAME), rejects_jsonl(rejects))
    if cfg.validate.strict and rejects:
        raise StrictRejectError(_strict_message(rejects, cfg.output, "while writing shards"))
    by_reason = dict(sorted(Counter(r.reason for r in rejects).items()))
    manifest = Manifest(
        dataset=index.dataset, task=index.task, split=index.split, categories=index.categories,
        converter_version=CONVERTER_VERSION, source_fingerprint=index.fingerprint,
        label_format=index.label_format,
        shards=[ShardEntry(url=r.name, samples=r.samples, bytes=r.bytes, sha256=r.sha256) for r in results],
        counts=Counts(samples=sum(r.samples for r in results), annotations=sum(r.annotations for r in results),
                      rejected_samples=sum(1 for r in rejects if r.annotation_id is None),
                      rejected_annotations=sum(1 for r in rejects if r.annotation_id is not None),
                      boxes_clipped=index.boxes_clipped, rejects_by_reason=by_reason),
    )
    manifest_uri = join(cfg.output, MANIFEST_NAME)
    _warn_stale_shards(storage, cfg.output, {r.name for r in results})
    storage.write_bytes(manifest_uri, manifest.to_json().encode())
    return ShardSummary(
        dataset=index.dataset, split=index.split, output=cfg.output, manifest_uri=manifest_uri,
        samples=manifest.counts.samples, annotations=manifest.counts.annotations, shards=len(results),
        shards_reused=sum(r.reused for r in results), bytes=sum(r.bytes for r in results),
        seconds=time.perf_counter() - started, boxes_clipped=index.boxes_clipped, rejects_by_reason=by_reason,
    )


def _warn_stale_shards(storage: Storage, output: str, current: set[str]) -> None:
    base = output.rstrip("/") + "/"
    stale = [i.uri for i in storage.list(output)
             if i.uri.startswith(base) and "/" not in i.uri[len(base):]
             and i.uri[len(base):].endswith(".tar") and i.uri[len(base):] not in current]
    if stale:
        log.warning("%d shard files in %s are not part of this plan (an earlier run with other limits?): %s",
                    len(stale), output, ", ".join(stale[:3]))
