"""COCO box and mask AP through pycocotools' `COCOeval`, the official implementation.

What this file adds around COCOeval is only what makes its numbers trustworthy:
- results are checked before pycocotools sees them, so an image id or category absent from the
  ground truth is an error naming the offending result (pycocotools asserts without saying which);
- for mask evaluation each result's `bbox` is dropped, so `loadRes` takes the area from the mask and
  the mask area decides small/medium/large (as detectron2 does);
- ground-truth annotation ids are renumbered from 1 when any is < 1 or repeated: COCOeval records
  matches by annotation id and treats id 0 as "unmatched";
- results are compressed RLE with string counts, the format every COCO tool reads.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class CocoEvalError(ValueError):
    """Ground truth or results that COCOeval cannot score meaningfully; the message names the item."""


@dataclass(frozen=True)
class CocoCategoryAP:
    category_id: int
    name: str
    ap: float | None  # None: the category has no ground truth (COCOeval's -1)


@dataclass(frozen=True)
class CocoReport:
    """COCOeval's 12 summary numbers as fractions (None where COCOeval says -1: nothing to score)."""

    iou_type: str
    stats: dict[str, float | None]
    per_category: list[CocoCategoryAP]
    num_images: int
    num_results: int
    summary_text: str  # COCOeval.summarize()'s own printout

    def to_json(self) -> dict[str, Any]:
        return {"iou_type": self.iou_type, **self.stats, "num_images": self.num_images,
                "num_results": self.num_results,
                "per_category": {c.name: c.ap for c in self.per_category}}

    def table(self) -> str:
        lines = [f"| category ({self.iou_type}) | id | AP |", "|---|---:|---:|"]
        for c in self.per_category:
            lines.append(f"| {c.name} | {c.category_id} | {_percent(c.ap)} |")
        return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _none_if_negative(value: float) -> float | None:
    return None if value < 0 else float(value)


# ---------------------------------------------------------------- ground truth
def load_coco_gt(source: str | dict[str, Any]) -> COCO:
    """A pycocotools COCO object from a COCO instances JSON path or an already-parsed dict.

    The dict is copied; annotation ids are renumbered 1..N (in file order) when any id is < 1 or
    repeated, because COCOeval would otherwise silently count matches to id 0 as misses."""
    if isinstance(source, str):
        with open(source, encoding="utf-8") as f:
            dataset = json.load(f)
        name = source
    else:
        dataset, name = copy.deepcopy(source), "ground truth"
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            raise CocoEvalError(f"{name}: not a COCO instances file (no '{key}' list)")
    annotations = dataset["annotations"]
    ids = [a.get("id", 0) for a in annotations]
    if any(not isinstance(i, int) or i < 1 for i in ids) or len(set(ids)) != len(ids):
        log.warning("%s: annotation ids renumbered 1..%d (ids < 1 or repeated break COCOeval matching)",
                    name, len(annotations))
        for new_id, ann in enumerate(annotations, start=1):
            ann["id"] = new_id
    image_ids = {img["id"] for img in dataset["images"]}
    category_ids = {c["id"] for c in dataset["categories"]}
    for ann in annotations:
        if ann.get("image_id") not in image_ids:
            raise CocoEvalError(f"{name}: annotation {ann['id']} names image_id {ann.get('image_id')!r}, "
                                f"which is not in 'images'")
        if ann.get("category_id") not in category_ids:
            raise CocoEvalError(f"{name}: annotation {ann['id']} names category_id {ann.get('category_id')!r}, "
                                f"which is not in 'categories'")
        ann.setdefault("iscrowd", 0)
    gt = COCO()
    gt.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        gt.createIndex()
    return gt


# ---------------------------------------------------------------- results
def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """[N, H, W] bool -> N compressed RLEs with `counts` as str (JSON-serialisable)."""
    if masks.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def instance_results(image_id: int, scores: np.ndarray, classes: np.ndarray, boxes_xyxy: np.ndarray,
                     masks: np.ndarray | None, category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """COCO results of one image.

    scores [N]; classes [N] contiguous indices into `category_ids` (the dataset ids); boxes_xyxy
    [N, 4] pixels; masks [N, H, W] bool or None for box-only results."""
    rles = encode_masks(masks) if masks is not None else [None] * len(scores)
    results = []
    for score, cls, box, rle in zip(scores.tolist(), classes.tolist(), boxes_xyxy.tolist(), rles):
        x0, y0, x1, y1 = box
        result = {"image_id": image_id, "category_id": int(category_ids[cls]), "score": float(score),
                  "bbox": [x0, y0, x1 - x0, y1 - y0]}
        if rle is not None:
            result["segmentation"] = rle
        results.append(result)
    return results


def load_results(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    if not isinstance(results, list):
        raise CocoEvalError(f"{path}: COCO results must be a JSON list of detections, got {type(results).__name__}")
    return results


def check_results(gt: COCO, results: Sequence[dict[str, Any]], iou_type: str) -> None:
    """Raise CocoEvalError naming the first result pycocotools would reject or mis-score."""
    required = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    for i, r in enumerate(results):
        missing = [k for k in required if k not in r]
        if missing:
            raise CocoEvalError(f"result {i}: missing {', '.join(missing)} (needed for iou_type {iou_type})")
        if r["image_id"] not in gt.imgs:
            raise CocoEvalError(f"result {i}: image_id {r['image_id']!r} is not in the ground truth")
        if r["category_id"] not in gt.cats:
            raise CocoEvalError(f"result {i}: category_id {r['category_id']!r} is not in the ground truth")
        if iou_type == "segm":
            _check_mask_size(i, r, gt.imgs[r["image_id"]])
        elif len(r["bbox"]) != 4:
            raise CocoEvalError(f"result {i}: bbox must be [x, y, w, h], got {r['bbox']!r}")


def _check_mask_size(i: int, result: dict[str, Any], image: dict[str, Any]) -> None:
    seg = result["segmentation"]
    if isinstance(seg, dict) and "size" in seg:
        if list(seg["size"]) != [image["height"], image["width"]]:
            raise CocoEvalError(f"result {i}: mask of size {seg['size'][0]}x{seg['size'][1]} (HxW) for image "
                                f"{result['image_id']}, which is {image['height']}x{image['width']}")
    elif not isinstance(seg, list):
        raise CocoEvalError(f"result {i}: segmentation must be RLE {{size, counts}} or polygons")


def _results_coco(gt: COCO, results: Sequence[dict[str, Any]], iou_type: str) -> COCO:
    """`gt.loadRes` on a copy (it mutates the dicts); an empty result set becomes an empty COCO,
    which loadRes cannot build, so that AP is 0 where ground truth exists."""
    results = [dict(r) for r in results]
    if iou_type == "segm":
        for r in results:
            r.pop("bbox", None)  # mask area, not box area, decides small/medium/large
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return gt.loadRes(results)
    empty = COCO()
    empty.dataset = {"images": list(gt.dataset["images"]), "categories": copy.deepcopy(gt.dataset["categories"]),
                     "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        empty.createIndex()
    return empty


# ---------------------------------------------------------------- evaluation
def evaluate_coco(gt: COCO, results: Sequence[dict[str, Any]], iou_type: str) -> CocoReport:
    """COCOeval (evaluate, accumulate, summarize) over every ground-truth image."""
    if iou_type not in IOU_TYPES:
        raise CocoEvalError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    check_results(gt, results, iou_type)
    coco_eval = COCOeval(gt, _results_coco(gt, results, iou_type), iou_type)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = {name: _none_if_negative(v) for name, v in zip(STAT_NAMES, coco_eval.stats)}
    return CocoReport(iou_type=iou_type, stats=stats, per_category=_per_category_ap(gt, coco_eval),
                      num_images=len(gt.getImgIds()), num_results=len(results),
                      summary_text=_summary_lines(printed.getvalue()))


def _per_category_ap(gt: COCO, coco_eval: COCOeval) -> list[CocoCategoryAP]:
    """AP over IoU 0.50:0.95, area all, 100 detections, per category (as detectron2 reports it)."""
    precision = coco_eval.eval["precision"]  # [T IoUs, R recalls, K categories, A areas, M maxDets]
    out = []
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out.append(CocoCategoryAP(category_id=int(cat_id), name=gt.cats[cat_id].get("name", str(cat_id)),
                                  ap=float(p.mean()) if p.size else None))
    return out


def _summary_lines(printed: str) -> str:
    return "\n".join(line for line in printed.splitlines() if line.lstrip().startswith("Average"))


def evaluate_coco_files(gt_json: str, results_json: str, iou_type: str) -> CocoReport:
    """`maskdino metrics coco`: score a results file from any codebase against a COCO GT file."""
    return evaluate_coco(load_coco_gt(gt_json), load_results(results_json), iou_type)
