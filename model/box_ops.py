"""Box utilities: format conversion, (generalised) IoU, inverse sigmoid and mask -> box conversions.

Definitions follow the official Mask DINO `maskdino/utils/box_ops.py` (DETR's box ops with a 1e-6 guard in
the IoU / GIoU denominators) and `utils.inverse_sigmoid`. Two mask -> box conversions are provided because
the official decoder uses both, and they differ by one pixel on the max side:

* `masks_to_boxes_official` — DINO's `box_ops.masks_to_boxes` (INITIALIZE_BOX_TYPE 'mask2box'): max is the
  last pixel index (no +1) and an empty mask gives x_min = y_min = 1e8, x_max = y_max = 0.
* `bitmask_boxes` — detectron2 `BitMasks.get_bounding_boxes` (INITIALIZE_BOX_TYPE 'bitmask'):
  [x_first, y_first, x_last + 1, y_last + 1], all zeros for an empty mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Fill value the official masks_to_boxes uses for pixels outside the mask when taking the min.
_EMPTY_MIN_FILL = 1e8


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """[N, 4] xyxy -> [N] areas (torchvision definition, no clamping)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and union of [N, 4] and [M, 4] xyxy boxes -> ([N, M], [N, M]).

    The 1e-6 in the denominator is the official Mask DINO guard (plain DETR has none).
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2 - inter
    return inter / (union + 1e-6), union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise GIoU of [N, 4] and [M, 4] xyxy boxes -> [N, M] (https://giou.stanford.edu/).

    The official code asserts x1 >= x0 here; we skip the check because it forces a host sync every call
    (boxes from sigmoid(cxcywh) are never degenerate).
    """
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / (enclosing + 1e-6)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped to [0, 1] and both numerator and denominator clamped to >= eps."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def masks_to_boxes_official(masks: Tensor) -> Tensor:
    """DINO's `masks_to_boxes`: [N, H, W] bool -> [N, 4] float xyxy, max side WITHOUT +1.

    Empty masks give (1e8, 1e8, 0, 0), as in the official code (the decoder clamps it later).
    """
    if masks.numel() == 0:
        return torch.zeros((masks.shape[0], 4), device=masks.device)
    masks = masks.bool()
    h, w = masks.shape[-2:]
    y = torch.arange(h, dtype=torch.float, device=masks.device)
    x = torch.arange(w, dtype=torch.float, device=masks.device)
    y, x = torch.meshgrid(y, x, indexing="ij")
    x_mask = masks * x.unsqueeze(0)
    y_mask = masks * y.unsqueeze(0)
    x_max = x_mask.flatten(1).max(-1)[0]
    y_max = y_mask.flatten(1).max(-1)[0]
    x_min = x_mask.masked_fill(~masks, _EMPTY_MIN_FILL).flatten(1).min(-1)[0]
    y_min = y_mask.masked_fill(~masks, _EMPTY_MIN_FILL).flatten(1).min(-1)[0]
    return torch.stack([x_min, y_min, x_max, y_max], 1)


def _first_last_true(any_along: Tensor) -> tuple[Tensor, Tensor]:
    """[N, L] bool -> index of the first and last True per row (0 for rows without any)."""
    length = any_along.shape[1]
    as_int = any_along.to(torch.uint8)
    first = as_int.argmax(1)
    last = length - 1 - as_int.flip(1).argmax(1)
    return first, last


def bitmask_boxes(masks: Tensor) -> Tensor:
    """detectron2 `BitMasks.get_bounding_boxes`: [N, H, W] -> [N, 4] float32 xyxy.

    Box = [x_first, y_first, x_last + 1, y_last + 1]; zeros for empty masks. Vectorised (detectron2 loops).
    Returned on the masks' device (detectron2 returns CPU and the decoder moves it back).
    """
    n = masks.shape[0]
    if n == 0 or masks.shape[1] == 0 or masks.shape[2] == 0:
        return torch.zeros((n, 4), dtype=torch.float32, device=masks.device)
    masks = masks.bool()
    x_any = masks.any(dim=1)  # [N, W]
    y_any = masks.any(dim=2)  # [N, H]
    x_first, x_last = _first_last_true(x_any)
    y_first, y_last = _first_last_true(y_any)
    boxes = torch.stack([x_first, y_first, x_last + 1, y_last + 1], dim=1).to(torch.float32)
    non_empty = x_any.any(dim=1) & y_any.any(dim=1)
    return boxes * non_empty[:, None].to(boxes.dtype)
