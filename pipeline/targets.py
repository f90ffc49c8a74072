"""Training targets: shard annotations decoded to arrays, and arrays turned into the model's `Targets`.

The builders follow the official dataset mappers: boxes are detectron2 `BitMasks.get_bounding_boxes` of
the (augmented) masks, converted to cxcywh and then divided by the image size the mapper gives the
Instances (the augmented canvas), as MaskDINO's `prepare_targets` does. Classes are contiguous ids.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch import Tensor

from model.box_ops import bitmask_boxes, box_xyxy_to_cxcywh
from model.structures import Targets
from pipeline.metrics.panoptic import rgb2id

IGNORE_LABEL = 255
# detectron2 filter_empty_instances: a box is kept when both sides exceed this (Boxes.nonempty)
MIN_BOX_SIDE = 1e-5


@dataclass
class TrainSample:
    """One augmented training sample.

    image [3, H, W] uint8 RGB (MaskDINO.preprocess converts it on the model's device); targets with masks
    [N, H, W] bool at the image size (None for detection) and boxes normalised by (W, H); key = the shard
    sample key.
    """

    image: Tensor
    targets: Targets
    key: str


# ------------------------------------------------------------------------------------- decoding
def non_crowd(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Annotations / segments with iscrowd == 0 (the official mappers drop crowd regions)."""
    return [r for r in records if not r.get("iscrowd", 0)]


def decode_rle_masks(annotations: Sequence[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """Compressed-RLE `segmentation`s -> [N, height, width] uint8 (pycocotools)."""
    if not annotations:
        return np.zeros((0, height, width), dtype=np.uint8)
    masks = mask_utils.decode([a["segmentation"] for a in annotations])  # [H, W, N], Fortran order
    return np.ascontiguousarray(masks.transpose(2, 0, 1))


def decode_panoptic_ids(png: bytes) -> np.ndarray:
    """Panoptic RGB PNG -> [H, W] int64 segment ids (R + 256 G + 256² B; 0 = void)."""
    return rgb2id(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))


def decode_label_map(png: bytes) -> np.ndarray:
    """Single-channel label PNG -> [H, W] array as stored (uint8 for ADE20K)."""
    return np.asarray(Image.open(io.BytesIO(png)))


# ------------------------------------------------------------------------------------- targets
def normalised_boxes(xyxy: Tensor, height: int, width: int) -> Tensor:
    """[N, 4] xyxy pixels -> [N, 4] cxcywh / (W, H, W, H), in MaskDINO prepare_targets' order."""
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return box_xyxy_to_cxcywh(xyxy.float()) / scale


def mask_targets(masks: np.ndarray, classes: Sequence[int] | np.ndarray) -> Targets:
    """[N, H, W] bool masks + N contiguous classes -> Targets, boxes from the masks (zeros if empty)."""
    masks_t = torch.from_numpy(np.ascontiguousarray(masks, dtype=bool))
    h, w = masks_t.shape[-2:]
    boxes = normalised_boxes(bitmask_boxes(masks_t), h, w)
    return Targets(torch.as_tensor(np.asarray(classes, dtype=np.int64)).reshape(-1), boxes, masks_t)


def instance_targets(masks: np.ndarray, classes: Sequence[int] | np.ndarray) -> Targets:
    """Instances whose mask is empty after augmentation are dropped (detectron2 filter_empty_instances)."""
    keep = masks.any(axis=(1, 2))
    return mask_targets(masks[keep], np.asarray(classes, dtype=np.int64).reshape(-1)[keep])


def panoptic_targets(segment_ids: np.ndarray, segments: Sequence[tuple[int, int]], keep_empty: bool = True
                     ) -> Targets:
    """[H, W] segment-id map + (segment id, contiguous class) of every non-crowd segment -> one target
    per segment (things and stuff), mask = ids == id. keep_empty=True keeps segments absent from the map
    (empty mask, zero box) as Mask2Former's panoptic mapper does; False drops them."""
    ids = np.asarray([s for s, _ in segments], dtype=np.int64)
    classes = np.asarray([c for _, c in segments], dtype=np.int64)
    masks = segment_ids[None] == ids[:, None, None]
    return mask_targets(masks, classes) if keep_empty else instance_targets(masks, classes)


def semantic_targets(labels: np.ndarray, ignore_label: int = IGNORE_LABEL) -> Targets:
    """[H, W] contiguous class map -> one target per class present (ascending), ignore_label excluded."""
    classes = np.unique(labels)
    classes = classes[classes != ignore_label]
    return mask_targets(labels[None] == classes[:, None, None], classes)


def detection_targets(boxes: np.ndarray, classes: Sequence[int] | np.ndarray, height: int, width: int
                      ) -> Targets:
    """[N, 4] xyxy canvas pixels (already clipped) -> Targets without masks; boxes with a side <= 1e-5
    dropped (detectron2 filter_empty_instances)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    keep = ((boxes[:, 2] - boxes[:, 0]) > MIN_BOX_SIDE) & ((boxes[:, 3] - boxes[:, 1]) > MIN_BOX_SIDE)
    xyxy = torch.from_numpy(boxes[keep]).float()
    labels = torch.as_tensor(np.asarray(classes, dtype=np.int64).reshape(-1)[keep])
    return Targets(labels, normalised_boxes(xyxy, height, width), None)
