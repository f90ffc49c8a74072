"""Index for COCO-style box/instance files (COCO instances, Objects365 v1/v2).

Validation here is vectorised over the whole split (numpy), so 25M Objects365 boxes are checked in
seconds; the few rows that fail become `Reject`s. Order of checks (a row gets the first that fails):
unknown image, malformed row, unknown category, duplicate id, degenerate box, box outside image.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from core import records as R
from core.records import AnnotationRecord, Category, Reject, SampleRecord
from data_prep.sources.box_rules import box_text, check_boxes
from data_prep.sources.coco_json import AnnotationTable, ImageTable
from data_prep.sources.index import ANNOTATION_BYTES, SAMPLE_OVERHEAD_BYTES, SourceIndex, image_key


@dataclass
class ImageSelection:
    """Images that survive validation, sorted by key. rows: (S,) row numbers into the ImageTable."""

    rows: np.ndarray
    keys: list[str]
    rel_paths: list[str]
    rejects: list[Reject]


def select_images(
    images: ImageTable, listing: dict[str, int], rel_path_of: Callable[[str], str]
) -> ImageSelection:
    """Drop duplicate image ids (keep the first) and images whose file is not on disk."""
    rejects: list[Reject] = []
    _, first = np.unique(images.ids, return_index=True)
    keep = np.zeros(len(images.ids), dtype=bool)
    keep[first] = True
    for row in np.flatnonzero(~keep):
        rejects.append(Reject(image_key(int(images.ids[row])), R.DUPLICATE_IMAGE,
                              f"image id {int(images.ids[row])} is listed more than once; the first entry is kept"))
    rel_paths_all: dict[int, str] = {}
    for row in np.flatnonzero(keep):
        rel = rel_path_of(images.file_names[row])
        key = image_key(int(images.ids[row]))
        if rel not in listing:
            keep[row] = False
            rejects.append(Reject(key, R.MISSING_FILE, f"image file '{rel}' is not in the image folder"))
        elif images.widths[row] <= 0 or images.heights[row] <= 0:
            keep[row] = False
            rejects.append(Reject(key, R.SIZE_MISMATCH, "the JSON gives no positive width/height for this image"))
        else:
            rel_paths_all[int(row)] = rel
    rows = np.flatnonzero(keep)
    rows = rows[np.argsort(images.ids[rows], kind="stable")]
    keys = [image_key(int(i)) for i in images.ids[rows]]
    # Zero-padded non-negative ids sort like their keys; negative ids would not, so sort by key.
    order = sorted(range(len(keys)), key=keys.__getitem__)
    rows = rows[order]
    keys = [keys[i] for i in order]
    return ImageSelection(rows=rows, keys=keys, rel_paths=[rel_paths_all[int(r)] for r in rows], rejects=rejects)


def _rows_identical(anns: AnnotationTable, rows: np.ndarray) -> bool:
    first = rows[0]
    same = (
        np.all(anns.image_ids[rows] == anns.image_ids[first])
        and np.all(anns.category_ids[rows] == anns.category_ids[first])
        and np.array_equal(anns.bboxes[rows], np.repeat(anns.bboxes[first:first + 1], len(rows), 0), equal_nan=True)
        and np.all(anns.iscrowd[rows] == anns.iscrowd[first])
        and np.array_equal(anns.areas[rows], np.repeat(anns.areas[first:first + 1], len(rows)), equal_nan=True)
    )
    if same and anns.segmentations is not None:
        same = all(anns.segmentations[r] == anns.segmentations[first] for r in rows)
    return bool(same)


@dataclass
class AnnotationSelection:
    """Annotations kept, grouped by sample. order: kept rows sorted by sample position;
    offsets: (S+1,) so sample s owns order[offsets[s]:offsets[s+1]]; clipped_xywh: (N, 4) for all rows."""

    order: np.ndarray
    offsets: np.ndarray
    clipped_xywh: np.ndarray
    rejects: list[Reject]
    boxes_clipped: int


# Rows per vectorised step: bounds numpy temporaries to a few tens of MB however large the split
# (the full Objects365 train set has ~25M boxes; see benchmarks/annotation_memory.py).
_CHUNK = 1 << 16


def _chunks(n: int):
    for lo in range(0, n, _CHUNK):
        yield slice(lo, min(n, lo + _CHUNK))


def _index_dtype(n: int) -> type:
    return np.int32 if n < 2**31 - 1 else np.int64


def _positions(values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """For each value, its position in `keys` (unique, any order), or -1. (N,) int32/int64."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    out = np.full(len(values), -1, dtype=_index_dtype(len(keys)))
    if len(keys) == 0:
        return out
    for sl in _chunks(len(values)):
        pos = np.minimum(np.searchsorted(sorted_keys, values[sl]), len(keys) - 1)
        hit = sorted_keys[pos] == values[sl]
        out[sl][hit] = order[pos[hit]]
    return out


def _member_of(values: np.ndarray, members: np.ndarray) -> np.ndarray:
    """(N,) bool: values[i] in members; chunked so no N-sized sort is made."""
    members = np.unique(members)
    out = np.zeros(len(values), dtype=bool)
    if len(members) == 0:
        return out
    for sl in _chunks(len(values)):
        pos = np.minimum(np.searchsorted(members, values[sl]), len(members) - 1)
        out[sl] = members[pos] == values[sl]
    return out


def select_annotations(
    anns: AnnotationTable, images: ImageTable, selection: ImageSelection, categories: list[Category],
    dropped_image_ids: np.ndarray,
) -> AnnotationSelection:
    """Validate every row; boxes of kept rows are clipped IN PLACE in `anns.bboxes` (a second
    (N, 4) array would cost 32 bytes per box), after the rejects that quote raw boxes are made."""
    rejects: list[Reject] = []
    sample_pos = _positions(anns.image_ids, images.ids[selection.rows])
    found = sample_pos >= 0
    alive = found.copy()

    def reject_rows(mask: np.ndarray, reason: str, detail: Callable[[int], str]) -> None:
        for row in np.flatnonzero(mask):
            rejects.append(Reject(image_key(int(anns.image_ids[row])), reason, detail(int(row)),
                                  annotation_id=int(anns.ids[row])))
        alive[mask] = False

    # Annotations of images dropped for a reason already reported go silently with their image.
    lost = np.flatnonzero(~found)
    unknown = np.zeros(len(anns), dtype=bool)
    unknown[lost[~_member_of(anns.image_ids[lost], dropped_image_ids)]] = True
    reject_rows(unknown, R.UNKNOWN_IMAGE, lambda r: f"image_id {int(anns.image_ids[r])} is not in the 'images' list")
    reject_rows(alive & ((anns.ids < 0) | (anns.category_ids < 0)), R.INVALID_ANNOTATION,
                lambda r: "annotation lacks an integer 'id' or 'category_id'")
    cat_ids = np.array([c.id for c in categories], dtype=np.int64)
    reject_rows(alive & ~_member_of(anns.category_ids, cat_ids), R.UNKNOWN_CATEGORY,
                lambda r: f"category_id {int(anns.category_ids[r])} is not in the category list")
    _reject_duplicate_ids(anns, alive, reject_rows)
    boxes_clipped = _check_and_clip_boxes(anns, images, selection, sample_pos, alive, reject_rows)

    kept = np.flatnonzero(alive).astype(sample_pos.dtype)
    kept_pos = sample_pos[kept]
    del sample_pos, found
    order = kept[np.argsort(kept_pos, kind="stable")]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(kept_pos, minlength=len(selection.rows)))]).astype(np.int64)
    return AnnotationSelection(order=order, offsets=offsets, clipped_xywh=anns.bboxes, rejects=rejects,
                               boxes_clipped=boxes_clipped)


def _check_and_clip_boxes(anns: AnnotationTable, images: ImageTable, selection: ImageSelection,
                          sample_pos: np.ndarray, alive: np.ndarray, reject_rows) -> int:
    """Reject degenerate/outside boxes, then clip the kept ones in place; returns how many were clipped."""
    n = len(anns)
    degenerate, outside, was_clipped = (np.zeros(n, dtype=bool) for _ in range(3))
    image_rows = lambda sl: selection.rows[np.maximum(sample_pos[sl], 0)]  # noqa: E731
    for sl in _chunks(n):
        rows = image_rows(sl)
        check = check_boxes(anns.bboxes[sl], images.widths[rows], images.heights[rows])
        degenerate[sl], outside[sl], was_clipped[sl] = check.degenerate, check.outside, check.was_clipped
    degenerate &= alive
    outside &= alive
    reject_rows(degenerate, R.DEGENERATE_BOX,
                lambda r: f"bbox {box_text(anns.bboxes[r])} is not finite or has non-positive size")
    reject_rows(outside, R.BOX_OUTSIDE_IMAGE,
                lambda r: f"bbox {box_text(anns.bboxes[r])} lies outside the {int(images.widths[image_rows(r)])}"
                          f"x{int(images.heights[image_rows(r)])} image")
    was_clipped &= alive
    for sl in _chunks(n):
        rows = image_rows(sl)
        clip = was_clipped[sl]
        if clip.any():
            clipped = check_boxes(anns.bboxes[sl][clip], images.widths[rows][clip], images.heights[rows][clip]).clipped
            anns.bboxes[sl][clip] = clipped
    return int(np.count_nonzero(was_clipped))


def _reject_duplicate_ids(anns: AnnotationTable, alive: np.ndarray, reject_rows) -> None:
    """Identical repeated rows keep their first copy; an id shared by different rows is ambiguous:
    every row carrying it is rejected (we cannot tell which one is right)."""
    ids = anns.ids[alive]
    ids.sort()
    dup_ids = np.unique(ids[1:][ids[1:] == ids[:-1]])
    del ids
    if len(dup_ids) == 0:
        return
    rows_with_dup = np.flatnonzero(alive & _member_of(anns.ids, dup_ids))
    repeated = np.zeros(len(anns), dtype=bool)
    conflicting = np.zeros(len(anns), dtype=bool)
    for dup_id in dup_ids:
        rows = rows_with_dup[anns.ids[rows_with_dup] == dup_id]
        if _rows_identical(anns, rows):
            repeated[rows[1:]] = True
        else:
            conflicting[rows] = True
    reject_rows(repeated, R.DUPLICATE_ANNOTATION,
                lambda r: f"row repeats annotation id {int(anns.ids[r])} exactly; the first copy is kept")
    reject_rows(conflicting, R.DUPLICATE_ANNOTATION_ID,
                lambda r: f"annotation id {int(anns.ids[r])} is used by rows that differ; all are rejected")


class CocoStyleIndex(SourceIndex):
    """SourceIndex over the compact tables; records are built per shard on demand."""

    def __init__(self, *, images: ImageTable, anns: AnnotationTable, selection: ImageSelection,
                 ann_selection: AnnotationSelection, listing: dict[str, int], images_dir: str,
                 join: Callable[..., str], **fields) -> None:
        counts = np.diff(ann_selection.offsets)
        file_bytes = np.array([listing[p] for p in selection.rel_paths], dtype=np.int64)
        seg_bytes = _segmentation_bytes(anns, ann_selection) if anns.segmentations is not None else 0
        super().__init__(
            keys=selection.keys,
            est_bytes=file_bytes + SAMPLE_OVERHEAD_BYTES + ANNOTATION_BYTES * counts + seg_bytes,
            driver_rejects=selection.rejects + ann_selection.rejects,
            boxes_clipped=ann_selection.boxes_clipped,
            **fields,
        )
        self._images, self._anns = images, anns
        self._sel, self._ann_sel = selection, ann_selection
        self._images_dir, self._join = images_dir, join

    def records(self, start: int, stop: int) -> list[SampleRecord]:
        out = []
        for s in range(start, stop):
            row = int(self._sel.rows[s])
            ann_rows = self._ann_sel.order[self._ann_sel.offsets[s]:self._ann_sel.offsets[s + 1]]
            out.append(SampleRecord(
                key=self.keys[s],
                image_id=int(self._images.ids[row]),
                file_name=self._images.file_names[row],
                image_uri=self._join(self._images_dir, self._sel.rel_paths[s]),
                width=int(self._images.widths[row]),
                height=int(self._images.heights[row]),
                annotations=tuple(self._annotation(int(r)) for r in ann_rows),
            ))
        return out

    def _annotation(self, row: int) -> AnnotationRecord:
        a = self._anns
        area = float(a.areas[row])
        x, y, w, h = (float(v) for v in self._ann_sel.clipped_xywh[row])
        return AnnotationRecord(
            id=int(a.ids[row]), category_id=int(a.category_ids[row]), bbox_xywh=(x, y, w, h),
            iscrowd=int(a.iscrowd[row]), area=area if area == area else w * h,
            segmentation_json=None if a.segmentations is None else a.segmentations[row],
        )


def _segmentation_bytes(anns: AnnotationTable, sel: AnnotationSelection) -> np.ndarray:
    """Per-sample size of raw segmentation text: an upper-ish estimate of the RLE we will write."""
    lengths = np.array([len(anns.segmentations[r] or "") for r in sel.order], dtype=np.int64)
    sums = np.concatenate([[0], np.cumsum(lengths)])
    return (sums[sel.offsets[1:]] - sums[sel.offsets[:-1]]) // 2
