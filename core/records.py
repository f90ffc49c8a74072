"""Typed records that cross the driver -> shard-task boundary and land in the shards.

The driver turns a raw dataset into `SampleRecord`s (one per image, only for the shard being
written, so memory stays bounded); a shard task turns each record into tar members.
Rejects found anywhere become `Reject` lines in `rejects.jsonl`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

CONVERTER_VERSION = "1"

@dataclass(frozen=True)
class Category:
    """One dataset category; the manifest's ordered list defines contiguous training ids."""

    id: int
    name: str
    isthing: bool


@dataclass(frozen=True)
class AnnotationRecord:
    """One raw annotation as the dataset gives it (validated on the driver, converted in the task).

    bbox_xywh: absolute pixels, already clipped to the image by the driver.
    segmentation_json: the raw COCO `segmentation` value re-serialised (polygons, uncompressed or
    compressed RLE), or None for boxes-only datasets.
    """

    id: int
    category_id: int
    bbox_xywh: tuple[float, float, float, float]
    iscrowd: int
    area: float
    segmentation_json: str | None = None


@dataclass(frozen=True)
class SegmentRecord:
    """One panoptic segment (`segments_info` entry); `bbox_xywh` clipped like boxes."""

    id: int
    category_id: int
    iscrowd: int
    bbox_xywh: tuple[float, float, float, float]
    area: int


@dataclass(frozen=True)
class SampleRecord:
    """Everything a shard task needs to write one sample; `key` names the tar members."""

    key: str
    image_id: int | str
    file_name: str
    image_uri: str
    width: int | None  # from the dataset JSON; None where the dataset has none (ADE20K)
    height: int | None
    annotations: tuple[AnnotationRecord, ...] = ()
    label_uri: str | None = None  # panoptic id PNG or semantic label PNG
    segments: tuple[SegmentRecord, ...] | None = None


@dataclass(frozen=True)
class Reject:
    """One rejected record: a whole sample (annotation_id None) or a single annotation."""

    key: str
    reason: str
    detail: str
    annotation_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def sort_key(self) -> tuple[str, int, str, str]:
        return (self.key, -1 if self.annotation_id is None else self.annotation_id, self.reason, self.detail)


# Reject reasons, one per corruption class (README "Validation rules" documents each).
UNDECODABLE_IMAGE = "undecodable_image"
TRUNCATED_IMAGE = "truncated_image"
SIZE_MISMATCH = "size_mismatch"
MISSING_FILE = "missing_file"
UNKNOWN_CATEGORY = "unknown_category"
DUPLICATE_ANNOTATION_ID = "duplicate_annotation_id"
DUPLICATE_ANNOTATION = "duplicate_annotation"
DEGENERATE_BOX = "degenerate_box"
BOX_OUTSIDE_IMAGE = "box_outside_image"
INVALID_SEGMENTATION = "invalid_segmentation"
INVALID_ANNOTATION = "invalid_annotation"
UNKNOWN_IMAGE = "unknown_image"
DUPLICATE_IMAGE = "duplicate_image"
PNG_ID_WITHOUT_SEGMENT = "png_id_without_segment"
SEGMENT_WITHOUT_PIXELS = "segment_without_pixels"
UNDECODABLE_LABEL = "undecodable_label"
