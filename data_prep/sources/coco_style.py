"""Index for COCO-style box/instance files (COCO instances, Objects365 v1/v2).

Validation here is vectorised over the whole split (numpy), so 25M Objects365 boxes are checked in
seconds; the few rows that fail become `Reject`s. Order of checks (a row gets the first that fails):
unknown image, malformed row, unknown category, duplicate id, degenerate box, box outside image.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from data_prep import records as R
from data_prep.records import AnnotationRecord, Category, Reject, SampleRecord
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


def select_annotations(
    anns: AnnotationTable, images: ImageTable, selection: ImageSelection, categories: list[Category],
    dropped_image_ids: np.ndarray,
) -> AnnotationSelection:
    n = len(anns)
    rejects: list[Reject] = []
    kept_ids = images.ids[selection.rows]
    id_order = np.argsort(kept_ids, kind="stable")
    sorted_ids = kept_ids[id_order]
    pos = np.searchsorted(sorted_ids, anns.image_ids)
    pos_clamped = np.minimum(pos, max(len(sorted_ids) - 1, 0))
    found = (len(sorted_ids) > 0) & (sorted_ids[pos_clamped] == anns.image_ids) if n else np.zeros(0, bool)
    sample_pos = np.where(found, id_order[pos_clamped] if len(id_order) else 0, -1)
    alive = found.copy()

    def reject_rows(mask: np.ndarray, reason: str, detail: Callable[[int], str]) -> None:
        for row in np.flatnonzero(mask):
            rejects.append(Reject(image_key(int(anns.image_ids[row])), reason, detail(int(row)),
                                  annotation_id=int(anns.ids[row])))
        alive[mask] = False

    # Annotations of images dropped for a reason already reported go silently with their image.
    on_dropped = ~found & np.isin(anns.image_ids, dropped_image_ids)
    reject_rows(~found & ~on_dropped, R.UNKNOWN_IMAGE,
                lambda r: f"image_id {int(anns.image_ids[r])} is not in the 'images' list")
    reject_rows(alive & ((anns.ids < 0) | (anns.category_ids < 0)), R.INVALID_ANNOTATION,
                lambda r: "annotation lacks an integer 'id' or 'category_id'")
    cat_ids = np.array(sorted(c.id for c in categories), dtype=np.int64)
    reject_rows(alive & ~np.isin(anns.category_ids, cat_ids), R.UNKNOWN_CATEGORY,
                lambda r: f"category_id {int(anns.category_ids[r])} is not in the category list")
    _reject_duplicate_ids(anns, alive, reject_rows)

    rows_img = selection.rows[np.maximum(sample_pos, 0)] if n else np.zeros(0, np.int64)
    check = check_boxes(anns.bboxes, images.widths[rows_img], images.heights[rows_img])
    reject_rows(alive & check.degenerate, R.DEGENERATE_BOX,
                lambda r: f"bbox {box_text(anns.bboxes[r])} is not finite or has non-positive size")
    reject_rows(alive & check.outside, R.BOX_OUTSIDE_IMAGE,
                lambda r: f"bbox {box_text(anns.bboxes[r])} lies outside the "
                          f"{int(images.widths[rows_img[r]])}x{int(images.heights[rows_img[r]])} image")
    kept = np.flatnonzero(alive)
    order = kept[np.argsort(sample_pos[kept], kind="stable")]
    counts = np.bincount(sample_pos[kept], minlength=len(selection.rows))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return AnnotationSelection(order=order, offsets=offsets, clipped_xywh=check.clipped, rejects=rejects,
                               boxes_clipped=int(np.count_nonzero(alive & check.was_clipped)))


def _reject_duplicate_ids(anns: AnnotationTable, alive: np.ndarray, reject_rows) -> None:
    """Identical repeated rows keep their first copy; an id shared by different rows is ambiguous:
    every row carrying it is rejected (we cannot tell which one is right)."""
    live = np.flatnonzero(alive)
    if len(live) < 2:
        return
    ids = anns.ids[live]
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    dup_start = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if len(dup_start) == 0:
        return
    repeated = np.zeros(len(anns), dtype=bool)
    conflicting = np.zeros(len(anns), dtype=bool)
    for dup_id in np.unique(sorted_ids[dup_start + 1]):
        lo, hi = np.searchsorted(sorted_ids, dup_id, "left"), np.searchsorted(sorted_ids, dup_id, "right")
        rows = np.sort(live[order[lo:hi]])
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
