"""COCO panoptic quality (PQ / SQ / RQ), vectorised, with the exact semantics of panopticapi.

The reference is cocodataset/panopticapi ``evaluation.py`` (``pq_compute``): this module gives the
same TP / FP / FN counts and IoU sums per category, image by image, but without its Python
dictionaries and per-pair loop:

* the (gt id, pred id) pairs of all pixels are counted once, by run-length collapsing and sorting
  the 64-bit key ``gt << 24 | pred`` (see :func:`_pair_counts` for why this, rather than mapping
  every pixel with ``np.searchsorted`` + ``np.bincount``);
* the few hundred distinct pairs are mapped to compact segment indices with ``np.searchsorted``
  over the sorted known ids (VOID included), which also finds ids the JSON does not list, and fill
  the [n_gt + 1, n_pred + 1] intersection matrix (row / column 0 = VOID); segment areas are its
  row / column sums;
* matching, FN, FP and the crowd / VOID discounts are array operations on that small matrix, and
  per-category sums are ``np.bincount`` over category indices.

Rules (panopticapi's): a (gt, pred) pair matches iff the gt is not crowd, the categories agree and
``IoU > 0.5`` with ``union = pred_area + gt_area - inter - |pred ∩ VOID|``. Unmatched non-crowd gt
segments are FN; an unmatched prediction is an FP unless more than half of it lies on VOID plus the
crowd region of its own category. GT areas come from the JSON ``area`` field when it is given (as
panopticapi does), prediction areas always from the PNG.

Unlike panopticapi, inconsistent inputs are errors (:class:`PanopticError`, one line naming the
image and the segment or file) rather than being skipped silently.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from core.records import (
    Category as PanopticCategory,  # id, name, isthing: the manifest's own type
)

VOID = 0
_MAX_ID = 256**3  # ids are 24-bit: R + 256 G + 256² B


class PanopticError(ValueError):
    """Ground truth or predictions that PQ cannot be computed on; the message names the item."""


# ----------------------------------------------------------------------------- id maps


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] RGB (uint8, or any integer dtype) -> [H, W] int64 segment ids R + 256 G + 256² B."""
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb2id expects an [H, W, 3] array, got shape {rgb.shape}")
    if rgb.dtype == np.uint8:
        # Pad to 4 bytes and read them as one little-endian uint32: one pass, no int64 temporaries.
        rgba = np.zeros(rgb.shape[:2] + (4,), dtype=np.uint8)
        rgba[..., :3] = rgb
        return rgba.view("<u4")[..., 0].astype(np.int64)
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """[H, W] integer segment ids in [0, 256³) -> [H, W, 3] uint8 RGB; the inverse of :func:`rgb2id`."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= _MAX_ID):
        raise ValueError(f"segment ids must lie in [0, {_MAX_ID}), got [{ids.min()}, {ids.max()}]")
    ids = ids.astype("<u4")
    return ids[..., None].view(np.uint8)[..., :3].copy()


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class SegmentInfo:
    """One ``segments_info`` entry. ``iscrowd`` and ``area`` are read for ground truth only (area:
    the JSON's, used in the IoU as panopticapi does; None = count the PNG's pixels)."""

    id: int
    category_id: int
    iscrowd: int = 0
    area: int | None = None


def categories_from_json(categories: Iterable[dict[str, Any]]) -> list[PanopticCategory]:
    """COCO panoptic ``categories`` entries -> :class:`PanopticCategory` list, in JSON order."""
    return [PanopticCategory(int(c["id"]), str(c["name"]), bool(c["isthing"])) for c in categories]


def segments_from_json(segments_info: Iterable[dict[str, Any]]) -> list[SegmentInfo]:
    """COCO panoptic ``segments_info`` entries -> :class:`SegmentInfo` list, in JSON order."""
    return [SegmentInfo(int(s["id"]), int(s["category_id"]), int(s.get("iscrowd", 0)),
                        None if s.get("area") is None else int(s["area"])) for s in segments_info]


# ----------------------------------------------------------------------------- statistics


@dataclass(eq=False)
class PQStats:
    """Per-category PQ accumulators; every array is [C], indexed like ``category_ids``.

    Plain numpy and picklable: this is what distributed evaluation gathers from ranks and sums.
    """

    category_ids: np.ndarray  # [C] int64
    tp: np.ndarray  # [C] int64 matched pairs
    fp: np.ndarray  # [C] int64
    fn: np.ndarray  # [C] int64
    iou: np.ndarray  # [C] float64, sum of the matched pairs' IoU

    def __post_init__(self) -> None:
        self.category_ids = np.asarray(self.category_ids, dtype=np.int64)
        for name in ("tp", "fp", "fn"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.int64))
        self.iou = np.asarray(self.iou, dtype=np.float64)
        shape = self.category_ids.shape
        if len(shape) != 1 or any(getattr(self, n).shape != shape for n in ("tp", "fp", "fn", "iou")):
            raise ValueError("PQStats arrays must all be 1-D with one entry per category")

    @classmethod
    def zeros(cls, category_ids: Sequence[int] | np.ndarray) -> PQStats:
        """Empty accumulators for ``category_ids`` (in that order)."""
        c = len(category_ids)
        return cls(np.asarray(category_ids, dtype=np.int64), np.zeros(c, np.int64), np.zeros(c, np.int64),
                   np.zeros(c, np.int64), np.zeros(c, np.float64))

    def __add__(self, other: PQStats) -> PQStats:
        if not np.array_equal(self.category_ids, other.category_ids):
            raise ValueError("cannot add PQStats over different category lists")
        return PQStats(self.category_ids.copy(), self.tp + other.tp, self.fp + other.fp,
                       self.fn + other.fn, self.iou + other.iou)

    @classmethod
    def combine(cls, stats: Iterable[PQStats]) -> PQStats:
        """Sum of ``stats`` (at least one)."""
        return combine_stats(stats)


def combine_stats(stats: Iterable[PQStats]) -> PQStats:
    """Sum of ``stats``, which must share one category list and hold at least one element."""
    it = iter(stats)
    try:
        total = next(it)
    except StopIteration:
        raise ValueError("combine_stats needs at least one PQStats") from None
    for s in it:
        total = total + s
    return total


# ----------------------------------------------------------------------------- one image


@dataclass
class _Segments:
    """One side's segments_info as arrays, [S] each, in JSON order."""

    ids: np.ndarray  # int64 segment ids
    cat: np.ndarray  # int64 index into the category list
    crowd: np.ndarray  # bool
    json_area: np.ndarray  # int64, -1 where the JSON gives none


def _segment_table(image_id: Any, side: str, segments: Sequence[SegmentInfo],
                   cat_sorted: np.ndarray, cat_order: np.ndarray) -> _Segments:
    ids = np.array([s.id for s in segments], dtype=np.int64)
    cats = np.array([s.category_id for s in segments], dtype=np.int64)
    if (ids == VOID).any():
        raise PanopticError(f"image {image_id}: {side} segment id {VOID} is reserved for VOID")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise PanopticError(f"image {image_id}: {side} segment id {uniq[counts > 1][0]} "
                            f"appears more than once in segments_info")
    pos = np.minimum(np.searchsorted(cat_sorted, cats), len(cat_sorted) - 1)
    unknown = cat_sorted[pos] != cats if len(cat_sorted) else np.ones(len(cats), bool)
    if unknown.any():
        k = int(np.flatnonzero(unknown)[0])
        raise PanopticError(f"image {image_id}: {side} segment id {ids[k]} has unknown category_id {cats[k]}")
    crowd = np.array([bool(s.iscrowd) for s in segments], dtype=bool)
    area = np.array([-1 if s.area is None else s.area for s in segments], dtype=np.int64)
    return _Segments(ids, cat_order[pos], crowd, area)


def _run_starts(values: np.ndarray) -> np.ndarray:
    """[R] indices where a run of equal values starts in the non-empty 1-D ``values``."""
    change = np.empty(values.size, dtype=bool)
    change[0] = True
    np.not_equal(values[1:], values[:-1], out=change[1:])
    return np.flatnonzero(change)


def _pair_counts(image_id: Any, gt_map: np.ndarray, pred_map: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (gt id, pred id) pixel pairs of two [H, W] maps and their pixel counts, [U] each.

    Pixels are keyed ``gt << 24 | pred``. Neighbouring pixels along a row mostly share their pair
    (~3 % of them start a new run on COCO-like maps), so the runs are collapsed first and only the
    run keys are sorted, each weighted by its length; noisy maps with many runs sort the pixel keys
    in place instead. Measured on the 2-core dev VM (numpy 2.4, AVX-512 sort), 640x480 with ~30
    segments a side: ~0.6 ms an image (1.0 ms sorting every pixel), against ~6 ms for mapping every
    pixel with np.searchsorted + one np.bincount (2 binary searches and 2 gathers over all pixels,
    and several fresh 2.4 MB arrays whose page faults dominate there; 19 ms on shuffled pixels,
    where binary search mispredicts).
    """
    for side, ids in (("ground-truth", gt_map), ("prediction", pred_map)):
        lo, hi = (int(ids.min()), int(ids.max())) if ids.size else (0, 0)
        if lo < 0 or hi >= _MAX_ID:
            raise PanopticError(f"image {image_id}: {side} PNG holds id {lo if lo < 0 else hi}, "
                                f"outside the 24-bit PNG id range")
    # Both ids are in [0, 2^24), so the key fits in int64 and splits back exactly.
    key = np.left_shift(gt_map.reshape(-1).astype(np.int64, copy=False), 24)
    np.bitwise_or(key, pred_map.reshape(-1).astype(np.int64, copy=False), out=key)
    if key.size == 0:
        return key, key, key
    starts = _run_starts(key)
    if starts.size * 8 > key.size:  # noisy: little to collapse
        key.sort()
        first = _run_starts(key)
        counts = np.diff(first, append=key.size)
        pairs = key[first]
    else:
        lengths = np.diff(starts, append=key.size)
        run_keys = key[starts]
        order = np.argsort(run_keys)
        run_keys = run_keys[order]
        first = _run_starts(run_keys)
        counts = np.add.reduceat(lengths[order], first)
        pairs = run_keys[first]
    return pairs >> 24, pairs & (_MAX_ID - 1), counts


def _lookup(image_id: Any, side: str, ids: np.ndarray, seg_ids: np.ndarray) -> np.ndarray:
    """Position of each of ``ids`` ([U]) in ``[VOID, *seg_ids]``; an id the JSON lacks is an error."""
    known = np.concatenate(([VOID], seg_ids))
    order = np.argsort(known, kind="stable")
    sorted_known = known[order]
    pos = np.minimum(np.searchsorted(sorted_known, ids), len(known) - 1)
    unknown = sorted_known[pos] != ids
    if unknown.any():
        missing = np.unique(ids[unknown])
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PanopticError(f"image {image_id}: segment id {missing[0]}{more} is in the {side} PNG "
                            f"but not in its segments_info")
    return order[pos]


def _intersections(image_id: Any, gt_map: np.ndarray, gt: _Segments,
                   pred_map: np.ndarray, pred: _Segments) -> np.ndarray:
    """[G + 1, P + 1] pixel counts of (gt, pred) pairs; index 0 is VOID, i + 1 is segment i."""
    gt_pair_ids, pred_pair_ids, counts = _pair_counts(image_id, gt_map, pred_map)
    rows = _lookup(image_id, "ground-truth", gt_pair_ids, gt.ids)
    cols = _lookup(image_id, "prediction", pred_pair_ids, pred.ids)
    matrix = np.zeros((len(gt.ids) + 1, len(pred.ids) + 1), dtype=np.int64)
    matrix[rows, cols] = counts  # each (gt id, pred id) pair occurs once: plain assignment
    return matrix


def _check_present(image_id: Any, side: str, ids: np.ndarray, pixels: np.ndarray) -> None:
    empty = np.flatnonzero(pixels == 0)
    if len(empty):
        raise PanopticError(f"image {image_id}: {side} segment id {ids[empty[0]]} is in segments_info "
                            f"but has no pixels in the PNG")


def _crowd_of_category(gt: _Segments, n_categories: int) -> np.ndarray:
    """[C] index of the crowd gt segment per category, -1 if none.

    panopticapi keeps one crowd segment per category (``crowd_labels_dict[cat] = gt_id`` in
    segments_info order), so when an image has several, the LAST one wins and the others do not
    discount predictions. COCO has at most one crowd region per category per image; we reproduce the
    rule anyway so scores equal panopticapi's on any input.
    """
    out = np.full(n_categories, -1, dtype=np.int64)
    crowd_idx = np.flatnonzero(gt.crowd)[::-1]  # reversed: the first hit per category is the last one
    cats, first = np.unique(gt.cat[crowd_idx], return_index=True)
    out[cats] = crowd_idx[first]
    return out


def pq_image_stats(image_id: Any, gt_ids: np.ndarray, gt_segments: Sequence[SegmentInfo],
                   pred_ids: np.ndarray, pred_segments: Sequence[SegmentInfo],
                   category_ids: Sequence[int] | np.ndarray) -> PQStats:
    """PQ accumulators of one image.

    ``gt_ids`` / ``pred_ids``: [H, W] integer segment-id maps (see :func:`rgb2id`), 0 = VOID.
    ``gt_segments`` / ``pred_segments``: the segments_info of each (pred ``iscrowd`` / ``area`` are
    ignored, as in panopticapi). ``category_ids``: [C], fixes the order of the returned arrays.
    ``image_id`` is used in error messages only.
    """
    gt_ids, pred_ids = np.asarray(gt_ids), np.asarray(pred_ids)
    if not (np.issubdtype(gt_ids.dtype, np.integer) and np.issubdtype(pred_ids.dtype, np.integer)):
        raise TypeError(f"id maps must be integer arrays, got {gt_ids.dtype} and {pred_ids.dtype}")
    if gt_ids.shape != pred_ids.shape:
        raise PanopticError(f"image {image_id}: ground-truth PNG is {_size(gt_ids)} but the prediction "
                            f"PNG is {_size(pred_ids)}")
    cat_ids = np.asarray(category_ids, dtype=np.int64)
    cat_order = np.argsort(cat_ids, kind="stable")
    cat_sorted = cat_ids[cat_order]
    if (np.diff(cat_sorted) == 0).any():
        raise ValueError("category_ids must be unique")
    gt = _segment_table(image_id, "ground-truth", gt_segments, cat_sorted, cat_order)
    pred = _segment_table(image_id, "prediction", pred_segments, cat_sorted, cat_order)

    matrix = _intersections(image_id, gt_ids, gt, pred_ids, pred)
    inter = matrix[1:, 1:]  # [G, P]
    pred_void = matrix[0, 1:]  # [P] prediction pixels on gt VOID
    pred_area = matrix[:, 1:].sum(axis=0)  # [P]
    gt_pixels = matrix[1:, :].sum(axis=1)  # [G]
    _check_present(image_id, "ground-truth", gt.ids, gt_pixels)
    _check_present(image_id, "prediction", pred.ids, pred_area)
    gt_area = np.where(gt.json_area >= 0, gt.json_area, gt_pixels)
    return _count(cat_ids, gt, pred, inter, pred_void, pred_area, gt_area)


def _count(cat_ids: np.ndarray, gt: _Segments, pred: _Segments, inter: np.ndarray,
           pred_void: np.ndarray, pred_area: np.ndarray, gt_area: np.ndarray) -> PQStats:
    """Matching, FN and FP on the [G, P] intersection matrix; per-category sums via bincount."""
    n_cat = len(cat_ids)
    # Only pairs that overlap are candidates: panopticapi walks the pairs present in the image.
    candidate = (~gt.crowd)[:, None] & (gt.cat[:, None] == pred.cat[None, :]) & (inter > 0)
    union = pred_area[None, :] + gt_area[:, None] - inter - pred_void[None, :]
    iou = np.zeros(inter.shape, dtype=np.float64)
    np.divide(inter, union, out=iou, where=candidate)
    matched = candidate & (iou > 0.5)
    rows, cols = np.nonzero(matched)
    tp = np.bincount(gt.cat[rows], minlength=n_cat)
    iou_sum = np.bincount(gt.cat[rows], weights=iou[rows, cols], minlength=n_cat).astype(np.float64)

    fn_mask = ~matched.any(axis=1) & ~gt.crowd
    fn = np.bincount(gt.cat[fn_mask], minlength=n_cat)

    crowd_row = _crowd_of_category(gt, n_cat)[pred.cat]  # [P], -1 where the category has no crowd
    on_crowd = np.where(crowd_row >= 0, inter[np.maximum(crowd_row, 0), np.arange(len(pred.ids))], 0)
    ignored = (pred_void + on_crowd) / pred_area
    fp_mask = ~matched.any(axis=0) & ~(ignored > 0.5)
    fp = np.bincount(pred.cat[fp_mask], minlength=n_cat)
    return PQStats(cat_ids.copy(), tp, fp, fn, iou_sum)


def _size(ids: np.ndarray) -> str:
    return "x".join(str(d) for d in ids.shape[::-1]) + " (WxH)" if ids.ndim == 2 else str(ids.shape)


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True)
class PQSummary:
    """Mean PQ / SQ / RQ (fractions) over the ``n`` categories with any TP, FP or FN; None if n == 0."""

    pq: float | None
    sq: float | None
    rq: float | None
    n: int

    def to_json(self) -> dict[str, Any]:
        return {"pq": self.pq, "sq": self.sq, "rq": self.rq, "n": self.n}


@dataclass(frozen=True)
class PQClassResult:
    """One category; pq / sq / rq are fractions, None when it has no TP, FP or FN (left out of the
    means; panopticapi prints 0.0 there)."""

    category_id: int
    name: str
    isthing: bool
    pq: float | None
    sq: float | None
    rq: float | None
    tp: int
    fp: int
    fn: int


@dataclass(frozen=True)
class PQReport:
    all: PQSummary
    things: PQSummary
    stuff: PQSummary
    per_class: list[PQClassResult]

    def to_json(self) -> dict[str, Any]:
        """panopticapi's result layout, fractions (not percent), None for undefined values."""
        return {"All": self.all.to_json(), "Things": self.things.to_json(), "Stuff": self.stuff.to_json(),
                "per_class": {str(c.category_id): {"name": c.name, "isthing": c.isthing, "pq": c.pq,
                                                   "sq": c.sq, "rq": c.rq, "tp": c.tp, "fp": c.fp, "fn": c.fn}
                              for c in self.per_class}}

    def table(self) -> str:
        """Markdown per-class table: PQ, SQ, RQ in percent (1 decimal; '-' when undefined), TP FP FN."""
        lines = ["| id | name | thing | PQ | SQ | RQ | TP | FP | FN |",
                 "|---:|---|:---:|---:|---:|---:|---:|---:|---:|"]
        for c in self.per_class:
            name = c.name.replace("|", "\\|")
            lines.append(f"| {c.category_id} | {name} | {'Y' if c.isthing else 'N'} | {_pct(c.pq)} | "
                         f"{_pct(c.sq)} | {_pct(c.rq)} | {c.tp} | {c.fp} | {c.fn} |")
        return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _class_result(cat: PanopticCategory, tp: int, fp: int, fn: int, iou: float) -> PQClassResult:
    if tp + fp + fn == 0:
        return PQClassResult(cat.id, cat.name, cat.isthing, None, None, None, 0, 0, 0)
    # Same expressions (and float order) as panopticapi's pq_average.
    denom = tp + 0.5 * fp + 0.5 * fn
    return PQClassResult(cat.id, cat.name, cat.isthing, iou / denom, iou / tp if tp != 0 else 0.0,
                         tp / denom, tp, fp, fn)


def _summary(classes: Sequence[PQClassResult]) -> PQSummary:
    included = [c for c in classes if c.pq is not None]
    n = len(included)
    if n == 0:
        return PQSummary(None, None, None, 0)
    pq = sq = rq = 0.0
    for c in included:  # sequential sums in category order, like panopticapi
        pq, sq, rq = pq + c.pq, sq + c.sq, rq + c.rq
    return PQSummary(pq / n, sq / n, rq / n, n)


def pq_report(stats: PQStats, categories: Sequence[PanopticCategory]) -> PQReport:
    """All / Things / Stuff means and per-class results, in ``categories`` order.

    Every category must be in ``stats``; a category of ``stats`` with counts but missing from
    ``categories`` is an error (its counts would be dropped silently).
    """
    where = {int(c): i for i, c in enumerate(stats.category_ids)}
    missing = [c.id for c in categories if c.id not in where]
    if missing:
        raise ValueError(f"categories {missing[:5]} are not in the PQStats category list")
    listed = {c.id for c in categories}
    counts = stats.tp + stats.fp + stats.fn
    dropped = [int(c) for c, k in zip(stats.category_ids, counts) if k and int(c) not in listed]
    if dropped:
        raise ValueError(f"PQStats has counts for categories {dropped[:5]} that are not in `categories`")
    per_class = []
    for cat in categories:
        i = where[cat.id]
        per_class.append(_class_result(cat, int(stats.tp[i]), int(stats.fp[i]), int(stats.fn[i]),
                                       float(stats.iou[i])))
    return PQReport(_summary(per_class), _summary([c for c in per_class if c.isthing]),
                    _summary([c for c in per_class if not c.isthing]), per_class)


# ----------------------------------------------------------------------------- folders


def _load_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _by_image_id(annotations: Iterable[dict[str, Any]], what: str) -> dict[Any, dict[str, Any]]:
    out: dict[Any, dict[str, Any]] = {}
    for ann in annotations:
        if ann["image_id"] in out:
            raise PanopticError(f"image {ann['image_id']}: more than one {what} annotation")
        out[ann["image_id"]] = ann
    return out


def _pair_annotations(gt_anns: list[dict[str, Any]], pred_anns: list[dict[str, Any]]
                      ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(gt, pred) annotation pairs in GT order, matched by image_id; both sides must cover the same images."""
    gt_by_id = _by_image_id(gt_anns, "ground-truth")
    pred_by_id = _by_image_id(pred_anns, "prediction")
    extra = [i for i in pred_by_id if i not in gt_by_id]
    if extra:
        raise PanopticError(f"image {extra[0]}: prediction for an image id absent from the ground truth "
                            f"({len(extra)} such images)")
    for image_id in gt_by_id:
        if image_id not in pred_by_id:
            raise PanopticError(f"image {image_id}: ground-truth image has no prediction")
    return [(g, pred_by_id[i]) for i, g in gt_by_id.items()]


def _read_id_map(image_id: Any, side: str, folder: str, file_name: str) -> np.ndarray:
    path = os.path.join(folder, file_name)
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise PanopticError(f"image {image_id}: {side} PNG file not found: {path}") from None
    return rgb2id(rgb)


def _score_pair(gt_ann: dict[str, Any], pred_ann: dict[str, Any], gt_folder: str, pred_folder: str,
                category_ids: np.ndarray) -> PQStats:
    image_id = gt_ann["image_id"]
    gt_map = _read_id_map(image_id, "ground-truth", gt_folder, gt_ann["file_name"])
    pred_map = _read_id_map(image_id, "prediction", pred_folder, pred_ann["file_name"])
    return pq_image_stats(image_id, gt_map, segments_from_json(gt_ann["segments_info"]),
                          pred_map, segments_from_json(pred_ann["segments_info"]), category_ids)


def evaluate_panoptic_folders(gt_json: str, gt_folder: str, pred_json: str, pred_folder: str,
                              workers: int = 1, progress: bool = False) -> PQReport:
    """PQ of COCO panoptic predictions (JSON + PNG folder) against the ground truth (JSON + folder).

    Images are matched by ``image_id``; categories come from the GT JSON. ``workers > 1`` decodes and
    scores images on a thread pool (PIL decoding and numpy release the GIL). ``progress`` shows a tqdm
    bar (only on a terminal).
    """
    gt, pred = _load_json(gt_json), _load_json(pred_json)
    categories = categories_from_json(gt["categories"])
    category_ids = np.array([c.id for c in categories], dtype=np.int64)
    pairs = _pair_annotations(gt["annotations"], pred["annotations"])

    def score(pair: tuple[dict[str, Any], dict[str, Any]]) -> PQStats:
        return _score_pair(pair[0], pair[1], gt_folder, pred_folder, category_ids)

    total = PQStats.zeros(category_ids)
    with contextlib.ExitStack() as stack:
        if workers > 1:
            results: Iterable[PQStats] = stack.enter_context(ThreadPoolExecutor(workers)).map(score, pairs)
        else:
            results = map(score, pairs)
        for stats in tqdm(results, total=len(pairs), desc="PQ", disable=None if progress else True):
            total = total + stats  # in GT order whatever the pool does: sums are reproducible
    return pq_report(total, categories)
