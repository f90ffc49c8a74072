"""One shard sample, both ways: the members a sample is written as, the schema of its JSON member,
and the decoding back to a typed :class:`ShardSample` (docs/data_formats.md#shards).

Sharding (data_prep/writer.py) encodes with :func:`encode_members`; the training loader
(pipeline/loader.py), evaluation (pipeline/eval_data.py) and verification (data_prep/verify.py) decode
with :func:`decode_sample` / :func:`parse_meta`, so the format is written down once.

Members of sample ``KEY``:

* ``KEY.jpg`` (or ``KEY.<ext>``, named by ``image_member``): the original image bytes, never re-encoded;
* ``KEY.json``: :class:`SampleMeta`, compact JSON;
* ``KEY.png``: the panoptic id PNG (COCO rgb2id) or the semantic label map, byte-identical to the source.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
from PIL import Image, ImageOps

META_MEMBER = "json"
LABEL_MEMBER = "png"
DEFAULT_IMAGE_MEMBER = "jpg"


class AnnotationJson(TypedDict, total=False):
    """One instance or box: ``bbox`` xyxy absolute pixels; ``segmentation`` COCO compressed RLE with
    string counts (absent for boxes-only datasets); ``category_id`` is the dataset's own id."""

    id: int
    category_id: int
    bbox: list[float]
    iscrowd: int
    area: float
    segmentation: dict[str, Any]


class SegmentJson(TypedDict):
    """One panoptic segment (``segments_info`` entry) with its bbox as xyxy absolute pixels."""

    id: int
    category_id: int
    iscrowd: int
    bbox: list[float]
    area: int


class SampleMeta(TypedDict, total=False):
    """The JSON member. ``annotations`` is absent for semantic datasets, ``segments`` present only
    for panoptic ones."""

    key: str
    image_id: int | str
    file_name: str
    width: int
    height: int
    image_member: str
    annotations: list[AnnotationJson]
    segments: list[SegmentJson]


@dataclass(frozen=True)
class ShardSample:
    """One decoded sample. image [H, W, 3] uint8 RGB; meta = the JSON member; label_png = the panoptic
    id PNG or semantic label PNG, undecoded. ``is_padding`` marks evaluation padding (a copy of a real
    sample that evaluators skip; pipeline/eval_data.py)."""

    key: str
    image: np.ndarray
    meta: SampleMeta
    label_png: bytes | None
    is_padding: bool = False

    @property
    def image_id(self) -> int | str:
        return self.meta["image_id"]


# ------------------------------------------------------------------------------------ encoding


def xywh_to_xyxy(box: Sequence[float]) -> list[float]:
    x, y, w, h = box
    return [x, y, x + w, y + h]


def annotation_json(ann_id: int, category_id: int, bbox_xywh: Sequence[float], iscrowd: int, area: float,
                    segmentation: dict[str, Any] | None) -> AnnotationJson:
    out: AnnotationJson = {"id": ann_id, "category_id": category_id, "bbox": xywh_to_xyxy(bbox_xywh),
                           "iscrowd": iscrowd, "area": area}
    if segmentation is not None:
        out["segmentation"] = segmentation
    return out


def segment_json(seg_id: int, category_id: int, iscrowd: int, bbox_xywh: Sequence[float], area: int
                 ) -> SegmentJson:
    return {"id": seg_id, "category_id": category_id, "iscrowd": iscrowd, "bbox": xywh_to_xyxy(bbox_xywh),
            "area": area}


def encode_members(meta: SampleMeta, image: bytes, label_png: bytes | None = None) -> dict[str, bytes]:
    """Extension -> bytes of one sample (the tar writer adds the key). ``meta["image_member"]`` names
    the image's member; the JSON is compact, in the key order given."""
    members = {meta["image_member"]: image}
    if label_png is not None:
        members[LABEL_MEMBER] = label_png
    members[META_MEMBER] = json.dumps(meta, separators=(",", ":")).encode()
    return members


# ------------------------------------------------------------------------------------ decoding


def parse_meta(members: Mapping[str, bytes]) -> SampleMeta:
    """The JSON member of a sample's members (KeyError when there is none)."""
    return json.loads(members[META_MEMBER])


def image_member(meta: SampleMeta) -> str:
    return meta.get("image_member", DEFAULT_IMAGE_MEMBER)


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image -> [H, W, 3] uint8 RGB. detectron2 reads images with PIL and applies the EXIF
    orientation; shards keep the original bytes, so it is applied here."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def decode_sample(members: Mapping[str, Any]) -> ShardSample:
    """Members as core.shard_tar.iter_tar_samples yields them (with ``__key__``) -> ShardSample."""
    meta = parse_meta(members)
    image = decode_image(members[image_member(meta)])
    return ShardSample(key=members["__key__"], image=image, meta=meta, label_png=members.get(LABEL_MEMBER))
