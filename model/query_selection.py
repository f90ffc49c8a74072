"""Two-stage query selection: encoder-memory proposals, top-k by class score, and the mask-enhanced anchor
initialisation that turns the selected queries' predicted masks into boxes (docs/model.md#query-selection, docs/model.md#mask-enhanced-anchors)."""

from __future__ import annotations

import torch
from torch import Tensor

from model.box_ops import (
    bitmask_boxes,
    box_xyxy_to_cxcywh,
    inverse_sigmoid,
    masks_to_boxes_official,
)

BOX_INIT_TYPES = ("mask2box", "bitmask", "no")


def encoder_proposals(memory: Tensor, spatial_shapes: list[tuple[int, int]],
                      proposal_size_by_level: str = "official") -> tuple[Tensor, Tensor]:
    """`gen_encoder_output_proposals` without padding masks.

    memory [B, S, C] in decoder level order -> (memory with invalid positions zeroed [B, S, C],
    proposals as logits [B, S, 4] with +inf where invalid).

    Proposal size is 0.05 * 2**lvl where lvl is the DECODER level index. With the official low2high
    encoders the decoder's level 0 is the lowest resolution, so the sizes are inverted w.r.t. DINO
    ("official", the default, needed for parity); "by_stride" gives the finest level 0.05 as DINO meant.
    """
    b = memory.shape[0]
    proposals = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        grid_y, grid_x = torch.meshgrid(
            torch.linspace(0, h - 1, h, dtype=torch.float32, device=memory.device),
            torch.linspace(0, w - 1, w, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
        scale = torch.tensor([w, h], dtype=torch.float32, device=memory.device).view(1, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(b, -1, -1, -1) + 0.5) / scale
        size_level = lvl if proposal_size_by_level == "official" else _rank_by_resolution(spatial_shapes, lvl)
        wh = torch.ones_like(grid) * 0.05 * (2.0 ** size_level)
        proposals.append(torch.cat((grid, wh), -1).view(b, -1, 4))
    output_proposals = torch.cat(proposals, 1)
    valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
    output_proposals = torch.log(output_proposals / (1 - output_proposals))
    output_proposals = output_proposals.masked_fill(~valid, float("inf"))
    output_memory = memory.masked_fill(~valid, 0.0)
    return output_memory, output_proposals


def _rank_by_resolution(spatial_shapes: list[tuple[int, int]], lvl: int) -> int:
    """0 for the finest level, 1 for the next coarser, ..."""
    areas = [h * w for h, w in spatial_shapes]
    order = sorted(range(len(areas)), key=lambda i: -areas[i])
    return order.index(lvl)


def select_topk(class_logits: Tensor, k: int) -> Tensor:
    """Indices [B, k] of the k memory tokens with the highest max-over-classes logit (sorted, as official)."""
    return torch.topk(class_logits.max(-1)[0], k, dim=1)[1]


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x [B, S, C], index [B, k] -> [B, k, C]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def mask_enhanced_anchors(mask_logits: Tensor, box_init: str) -> Tensor:
    """Boxes from predicted masks (logits > 0) as unsigmoided anchors.

    mask_logits [B, Q, h, w] -> [B, Q, 4] inverse_sigmoid(cxcywh / [w, h, w, h]).
    "bitmask" = detectron2 BitMasks boxes (x2 = last column + 1); "mask2box" = DINO masks_to_boxes
    (x2 = last column, no +1; an empty mask gives a garbage box that inverse_sigmoid clamps), as official.
    """
    b, q, h, w = mask_logits.shape
    binary = mask_logits.detach().flatten(0, 1) > 0
    if box_init == "bitmask":
        boxes = bitmask_boxes(binary)
    elif box_init == "mask2box":
        boxes = masks_to_boxes_official(binary)
    else:
        raise ValueError(f"initialize_box_type must be one of {BOX_INIT_TYPES}, got {box_init!r}")
    scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=mask_logits.device)
    boxes = box_xyxy_to_cxcywh(boxes.float()) / scale
    return inverse_sigmoid(boxes.reshape(b, q, 4))
