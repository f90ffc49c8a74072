"""COCO panoptic: `annotations/panoptic_{split}2017.json` + PNG folder `annotations/panoptic_{split}2017/`
(RGB, id = R + 256 G + 256^2 B, 0 = void) + images `{split}2017/`.

A sample keeps its PNG byte-identical. Because the PNG and `segments_info` must agree, a problem with
one segment (unknown category, repeated id, degenerate box) rejects the whole sample; PNG ids without
a segment entry and entries without pixels are found by the shard task, which decodes the PNG."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core import records as R
from core.records import Reject, SampleRecord, SegmentRecord
from core.storage import Storage, join
from data_prep.shard_config import SourceConfig
from data_prep.sources.box_rules import box_text, check_boxes
from data_prep.sources.coco_json import (
    AnnotationFile,
    as_bbox,
    as_int,
    file_sha256,
    parse_categories,
    parse_images,
)
from data_prep.sources.coco_style import select_images
from data_prep.sources.coco_style_build import list_folder, local_copy
from data_prep.sources.index import (
    ANNOTATION_BYTES,
    SAMPLE_OVERHEAD_BYTES,
    SourceIndex,
    combine_fingerprints,
    image_key,
    listing_digest,
)
from data_prep.sources.layout import source_layout


@dataclass(frozen=True)
class PanopticEntry:
    png_name: str
    segments: tuple[SegmentRecord, ...]
    problem: str | None = None  # a malformed segments_info entry: the sample is rejected


def _segment(s: object) -> SegmentRecord | None:
    """One segments_info entry; None when it lacks an integer id/category_id (malformed values in
    bbox become NaN, rejected as degenerate_box like every other box)."""
    if not isinstance(s, dict) or as_int(s.get("id")) < 0 or as_int(s.get("category_id")) < 0:
        return None
    area = s.get("area", 0)
    return SegmentRecord(id=as_int(s["id"]), category_id=as_int(s["category_id"]),
                         iscrowd=1 if s.get("iscrowd") else 0, bbox_xywh=as_bbox(s.get("bbox")),
                         area=int(area) if isinstance(area, (int, float)) and area == area else 0)


class PanopticIndex(SourceIndex):
    def __init__(self, *, samples: list[SampleRecord], est_bytes: np.ndarray, **fields) -> None:
        super().__init__(keys=[s.key for s in samples], est_bytes=est_bytes, **fields)
        self._samples = samples

    def records(self, start: int, stop: int) -> list[SampleRecord]:
        return self._samples[start:stop]


def _parse_entries(source: AnnotationFile) -> tuple[dict[int, PanopticEntry], list[Reject]]:
    entries: dict[int, PanopticEntry] = {}
    rejects: list[Reject] = []
    for a in source.items("annotations"):
        image_id = as_int(a.get("image_id")) if isinstance(a, dict) else -1
        if image_id < 0 or not isinstance(a.get("file_name"), str):
            rejects.append(Reject(image_key(image_id), R.INVALID_ANNOTATION,
                                  "panoptic annotation lacks an integer 'image_id' or a 'file_name'"))
            continue
        raw_segments = a.get("segments_info", [])
        parsed = [_segment(s) for s in raw_segments] if isinstance(raw_segments, list) else [None]
        segments = tuple(s for s in parsed if s is not None)
        problem = (None if None not in parsed else
                   "a segments_info entry lacks an integer 'id' or 'category_id'")
        if image_id in entries:
            rejects.append(Reject(image_key(image_id), R.DUPLICATE_IMAGE,
                                  "image has more than one panoptic annotation; the first is kept"))
            continue
        entries[image_id] = PanopticEntry(png_name=a["file_name"], segments=segments, problem=problem)
    return entries, rejects


def _check_segments(key: str, entry: PanopticEntry, width: int, height: int, cat_ids: set[int]
                    ) -> tuple[tuple[SegmentRecord, ...] | None, Reject | None, int]:
    """Clipped segments, or a Reject for the whole sample; also how many boxes were clipped."""
    if entry.problem is not None:
        return None, Reject(key, R.INVALID_ANNOTATION, entry.problem), 0
    segs = entry.segments
    for s in segs:
        if s.category_id not in cat_ids:
            return None, Reject(key, R.UNKNOWN_CATEGORY,
                                f"segment {s.id} has category_id {s.category_id}, not in the category list"), 0
    ids = [s.id for s in segs]
    if len(set(ids)) != len(ids):
        return None, Reject(key, R.DUPLICATE_ANNOTATION_ID, "segments_info repeats a segment id"), 0
    if not segs:
        return (), None, 0
    xywh = np.array([s.bbox_xywh for s in segs], dtype=np.float64)
    check = check_boxes(xywh, np.full(len(segs), width), np.full(len(segs), height))
    for i, s in enumerate(segs):
        if check.degenerate[i] or check.outside[i]:
            reason = R.DEGENERATE_BOX if check.degenerate[i] else R.BOX_OUTSIDE_IMAGE
            return None, Reject(key, reason, f"segment {s.id} has bbox {box_text(xywh[i])}"), 0
    clipped = tuple(
        SegmentRecord(id=s.id, category_id=s.category_id, iscrowd=s.iscrowd,
                      bbox_xywh=tuple(float(v) for v in check.clipped[i]), area=s.area)
        for i, s in enumerate(segs)
    )
    return clipped, None, int(check.was_clipped.sum())


def build(cfg: SourceConfig, storage: Storage, workdir: str) -> PanopticIndex:
    layout = source_layout(cfg)
    annotation, images_dir, labels_dir = layout.annotation, layout.images, layout.labels
    path = local_copy(storage, annotation, workdir)
    source = AnnotationFile(path)
    categories = parse_categories(source)
    cat_ids = {c.id for c in categories}
    image_listing = list_folder(storage, images_dir, "image", "source.images")
    label_listing = list_folder(storage, labels_dir, "panoptic PNG", "source.labels")
    images = parse_images(source)
    selection = select_images(images, image_listing, lambda name: name)
    entries, rejects = _parse_entries(source)
    rejects = selection.rejects + rejects
    known_ids = set(int(i) for i in images.ids)
    for image_id in sorted(set(entries) - known_ids):
        rejects.append(Reject(image_key(image_id), R.UNKNOWN_IMAGE,
                              f"panoptic annotation for image_id {image_id}, which is not in 'images'"))
    samples: list[SampleRecord] = []
    sizes: list[int] = []
    clipped_total = 0
    for key, row, rel in zip(selection.keys, selection.rows, selection.rel_paths):
        image_id, width, height = int(images.ids[row]), int(images.widths[row]), int(images.heights[row])
        entry = entries.get(image_id)
        if entry is None:
            rejects.append(Reject(key, R.MISSING_FILE, "image has no entry in the panoptic 'annotations'"))
            continue
        if entry.png_name not in label_listing:
            rejects.append(Reject(key, R.MISSING_FILE, f"panoptic PNG '{entry.png_name}' is not in the PNG folder"))
            continue
        segments, reject, clipped = _check_segments(key, entry, width, height, cat_ids)
        if reject is not None:
            rejects.append(reject)
            continue
        clipped_total += clipped
        samples.append(SampleRecord(
            key=key, image_id=image_id, file_name=images.file_names[row],
            image_uri=join(images_dir, rel), width=width, height=height,
            label_uri=join(labels_dir, entry.png_name), segments=segments,
        ))
        sizes.append(image_listing[rel] + label_listing[entry.png_name] + SAMPLE_OVERHEAD_BYTES
                     + ANNOTATION_BYTES * len(segments))
    return PanopticIndex(
        samples=samples, est_bytes=np.array(sizes, dtype=np.int64),
        dataset="coco_panoptic", task="panoptic", split=cfg.split, categories=categories,
        label_format="coco_rgb2id", driver_rejects=rejects, boxes_clipped=clipped_total,
        fingerprint=combine_fingerprints(annotations=file_sha256(path), images=listing_digest(image_listing),
                                         labels=listing_digest(label_listing)),
    )
