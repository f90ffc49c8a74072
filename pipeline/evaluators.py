"""Per-task evaluators: turn (ground-truth sample, model result) pairs into a rank's partial state, and
partial states from all ranks into a report.

Each evaluator's partial state is plain picklable data (COCO dicts, PQ count arrays, a confusion matrix),
so gathering is one `gather_object` and the metric maths (pipeline/metrics/) never sees a process group.
Contiguous class ids from the model are mapped back to the manifest's dataset category ids here.
"""
from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from core.manifest import Manifest
from core.shard_sample import ShardSample
from model.structures import ImageResult
from pipeline.metrics import coco, panoptic, semantic


@dataclass(frozen=True)
class TaskReport:
    """What one task's evaluation produced: JSON metrics, a markdown per-class table, extra files."""

    metrics: dict[str, Any]
    table: str
    files: dict[str, bytes]  # name -> content, written next to report.json


class Evaluator(Protocol):
    def process(self, sample: ShardSample, result: ImageResult) -> None: ...
    def partial(self) -> Any: ...
    def finish(self, partials: Sequence[Any]) -> TaskReport: ...


class EvalInputError(ValueError):
    """The model's outputs do not fit the dataset's task (e.g. no instance head for a COCO manifest)."""


def _needs(sample: ShardSample, part: object, what: str, label: bool = False) -> bool:
    """False for padding samples (skipped); raises when the model or the sample lacks what the task needs."""
    if sample.is_padding:
        return False
    if part is None:
        raise EvalInputError(f"the model produces no {what} results; enable inference.{what}_on to evaluate "
                             "it on this manifest")
    if label and sample.label_png is None:
        raise EvalInputError(f"sample {sample.key} has no label PNG, which {what} evaluation needs")
    return True


def _decode_png(data: bytes, mode: str | None = None) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    return np.asarray(image.convert(mode) if mode else image)


# ---------------------------------------------------------------- COCO box / mask AP
class InstanceEvaluator:
    """COCO AP: `bbox` for detection manifests (Objects365), `bbox` and `segm` for instance manifests.
    Ground truth is rebuilt from the shards as a COCO dict (annotation ids 1..N)."""

    def __init__(self, manifest: Manifest):
        self.iou_types = ("bbox",) if manifest.task == "detection" else ("bbox", "segm")
        self.categories = manifest.categories
        self.category_ids = [c.id for c in manifest.categories]
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []

    def process(self, sample: ShardSample, result: ImageResult) -> None:
        if not _needs(sample, result.instances, "instance"):
            return
        meta = sample.meta
        self.images.append({"id": meta["image_id"], "width": meta["width"], "height": meta["height"],
                            "file_name": meta.get("file_name", sample.key)})
        for ann in meta.get("annotations", []):
            x0, y0, x1, y1 = ann["bbox"]
            gt = {"image_id": meta["image_id"], "category_id": ann["category_id"], "iscrowd": ann["iscrowd"],
                  "area": ann["area"], "bbox": [x0, y0, x1 - x0, y1 - y0]}
            if "segmentation" in ann:
                gt["segmentation"] = ann["segmentation"]
            self.annotations.append(gt)
        inst = result.instances
        masks = inst.masks.cpu().numpy() if "segm" in self.iou_types else None
        self.results += coco.instance_results(meta["image_id"], inst.scores.cpu().numpy(),
                                              inst.classes.cpu().numpy(), inst.boxes.cpu().numpy(), masks,
                                              self.category_ids)

    def partial(self) -> tuple[list, list, list]:
        return self.images, self.annotations, self.results

    def finish(self, partials: Sequence[tuple[list, list, list]]) -> TaskReport:
        images = [img for p in partials for img in p[0]]
        annotations = [dict(a, id=i) for i, a in enumerate((a for p in partials for a in p[1]), start=1)]
        results = [r for p in partials for r in p[2]]
        gt_json = {"images": images, "annotations": annotations,
                   "categories": [{"id": c.id, "name": c.name} for c in self.categories]}
        gt = coco.load_coco_gt(gt_json)
        reports = {t: coco.evaluate_coco(gt, results, t) for t in self.iou_types}
        files = {"coco_ground_truth.json": json.dumps(gt_json).encode(),
                 "coco_results.json": json.dumps(results).encode()}
        tables = "\n\n".join(r.table() for r in reports.values())
        return TaskReport({t: r.to_json() for t, r in reports.items()}, tables, files)


# ---------------------------------------------------------------- panoptic quality
class PanopticEvaluator:
    """PQ on COCO panoptic shards: the shard's id PNG and segments against the model's segment map."""

    def __init__(self, manifest: Manifest):
        self.categories = manifest.categories
        self.category_ids = [c.id for c in manifest.categories]
        self.stats = panoptic.PQStats.zeros(self.category_ids)

    def process(self, sample: ShardSample, result: ImageResult) -> None:
        if not _needs(sample, result.panoptic, "panoptic", label=True):
            return
        gt_ids = panoptic.rgb2id(_decode_png(sample.label_png, "RGB"))
        gt_segments = [panoptic.SegmentInfo(s["id"], s["category_id"], s["iscrowd"], s.get("area"))
                       for s in sample.meta["segments"]]
        pred = result.panoptic
        pred_segments = [panoptic.SegmentInfo(s.id, self.category_ids[s.category_id]) for s in pred.segments]
        self.stats = self.stats + panoptic.pq_image_stats(
            sample.image_id, gt_ids, gt_segments, pred.segment_map.cpu().numpy().astype(np.int64), pred_segments,
            self.category_ids)

    def partial(self) -> panoptic.PQStats:
        return self.stats

    def finish(self, partials: Sequence[panoptic.PQStats]) -> TaskReport:
        report = panoptic.pq_report(panoptic.combine_stats(partials), self.categories)
        return TaskReport({"panoptic": report.to_json()}, report.table(), {})


# ---------------------------------------------------------------- semantic mIoU
class SemanticEvaluator:
    """mIoU on semantic shards; ADE20K label maps (label_format ade_label_uint8) drop their 0 = other."""

    def __init__(self, manifest: Manifest):
        self.names = [c.name for c in manifest.categories]
        self.reduce_zero_label = manifest.label_format == "ade_label_uint8"
        k = len(self.names)
        self.confusion = np.zeros((k + 1, k + 1), np.int64)

    def process(self, sample: ShardSample, result: ImageResult) -> None:
        if not _needs(sample, result.semantic, "semantic", label=True):
            return
        gt = _decode_png(sample.label_png)
        if self.reduce_zero_label:
            gt = semantic.reduce_zero_label(gt)
        pred = result.semantic.labels.cpu().numpy()
        self.confusion += semantic.confusion_matrix(pred, gt, len(self.names), name=sample.key)

    def partial(self) -> np.ndarray:
        return self.confusion

    def finish(self, partials: Sequence[np.ndarray]) -> TaskReport:
        report = semantic.semseg_report(np.sum(partials, axis=0), self.names)
        return TaskReport({"semantic": report.to_json()}, report.table(), {})


EVALUATORS = {"instance": InstanceEvaluator, "detection": InstanceEvaluator, "panoptic": PanopticEvaluator,
              "semantic": SemanticEvaluator}


def make_evaluator(manifest: Manifest) -> Evaluator:
    try:
        return EVALUATORS[manifest.task](manifest)
    except KeyError:
        raise EvalInputError(f"no evaluator for task {manifest.task!r}; known: {sorted(EVALUATORS)}") from None
