"""Hungarian matcher of Mask DINO ("hybrid matching": class + box + mask costs), docs/model.md#matcher.

Per image the cost matrix C [Q, n] is a weighted sum of a focal classification cost, an L1 and a -GIoU box
cost, and point-sampled mask BCE and dice costs; scipy's linear_sum_assignment solves it. Reproduces
the official `HungarianMatcher.memory_efficient_forward` including the order of RNG draws (one
`torch.rand(1, num_points, 2)` per image, only when the mask cost is used).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from model.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from model.point_sampling import point_sample
from model.structures import Predictions, Targets

ALL_COSTS: tuple[str, ...] = ("cls", "box", "mask")


@dataclass
class MatcherConfig:
    """Cost weights (COST_*_WEIGHT) and options.

    stuff_box_cost_masked: official PANO_BOX_LOSS matcher variant — box costs of "stuff" targets
    (label >= num_thing_classes) are replaced by the mean over thing targets, so stuff is matched on
    class and mask only. The released configs leave it off.
    """

    cost_class: float = 4.0
    cost_mask: float = 5.0
    cost_dice: float = 5.0
    cost_box: float = 5.0
    cost_giou: float = 2.0
    num_points: int = 12544
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    stuff_box_cost_masked: bool = False
    num_thing_classes: int = 80


def batch_sigmoid_ce_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Pairwise mean sigmoid BCE: inputs [N, P] logits, targets [M, P] in {0,1} -> [N, M].

    Uses BCE(x, 1) @ t + BCE(x, 0) @ (1 - t) so all N*M pairs cost two matmuls.
    """
    num_points = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    loss = pos @ targets.T + neg @ (1 - targets).T
    return loss / num_points


def batch_dice_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Pairwise dice cost with +1 smoothing: inputs [N, P] logits, targets [M, P] -> [N, M]."""
    probs = inputs.sigmoid().flatten(1)
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
    """Focal classification cost: logits [Q, K], labels [n] -> [Q, n] (official epsilons 1e-8)."""
    prob = logits.sigmoid()
    neg_cost = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
    pos_cost = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
    return pos_cost[:, labels] - neg_cost[:, labels]


class HungarianMatcher:
    """One-to-one assignment between queries and ground truths, per image (no parameters, no grad)."""

    def __init__(self, cfg: MatcherConfig | None = None) -> None:
        self.cfg = cfg or MatcherConfig()
        if self.cfg.cost_class == 0 and self.cfg.cost_mask == 0 and self.cfg.cost_dice == 0:
            raise ValueError("cost_class, cost_mask and cost_dice cannot all be 0")

    def __call__(
        self, pred: Predictions, targets: list[Targets], costs: tuple[str, ...] = ALL_COSTS
    ) -> list[tuple[Tensor, Tensor]]:
        return self.match(pred, targets, costs)

    @torch.no_grad()
    def match(
        self, pred: Predictions, targets: list[Targets], costs: tuple[str, ...] = ALL_COSTS
    ) -> list[tuple[Tensor, Tensor]]:
        """Match each image's queries to its targets.

        pred: logits [B, Q, K], boxes [B, Q, 4] cxcywh, masks [B, Q, h, w] or None.
        Returns per image (query_idx [m], target_idx [m]) int64 CPU tensors, m = min(Q, n_b).
        """
        unknown = set(costs) - set(ALL_COSTS)
        if unknown:
            raise ValueError(f"unknown matching costs {sorted(unknown)}; allowed {ALL_COSTS}")
        indices = []
        for b, tgt in enumerate(targets):
            cost = self._cost_matrix(pred, b, tgt, costs)
            rows, cols = linear_sum_assignment(cost.cpu())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    def _cost_matrix(self, pred: Predictions, b: int, tgt: Targets, costs: tuple[str, ...]) -> Tensor:
        """C [Q, n_b] for image b."""
        cfg = self.cfg
        out_bbox = pred.boxes[b]
        cost_class = focal_class_cost(pred.logits[b], tgt.labels, cfg.focal_alpha, cfg.focal_gamma)
        zero = torch.zeros((), dtype=out_bbox.dtype, device=out_bbox.device)
        cost_bbox, cost_giou = zero, zero
        if "box" in costs:
            cost_bbox, cost_giou = self._box_costs(out_bbox, tgt)
        cost_mask, cost_dice = zero, zero
        if "mask" in costs and pred.masks is not None and tgt.masks is not None:
            cost_mask, cost_dice = self._mask_costs(pred.masks[b], tgt.masks)
        total = (
            cfg.cost_mask * cost_mask
            + cfg.cost_class * cost_class
            + cfg.cost_dice * cost_dice
            + cfg.cost_box * cost_bbox
            + cfg.cost_giou * cost_giou
        )
        return total.reshape(pred.logits.shape[1], -1)

    def _box_costs(self, out_bbox: Tensor, tgt: Targets) -> tuple[Tensor, Tensor]:
        """L1 (cdist p=1 on cxcywh) and -GIoU (xyxy) costs, [Q, n] each."""
        tgt_bbox = tgt.boxes.to(out_bbox)
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
        if self.cfg.stuff_box_cost_masked:
            cost_bbox = self._mask_stuff_columns(cost_bbox, tgt.labels)
            cost_giou = self._mask_stuff_columns(cost_giou, tgt.labels)
        return cost_bbox, cost_giou

    def _mask_stuff_columns(self, cost: Tensor, labels: Tensor) -> Tensor:
        """Stuff columns := mean over thing columns (NaN when there are none -> 0), as PANO_BOX_LOSS."""
        isthing = labels < self.cfg.num_thing_classes
        cost = cost.clone()
        cost[:, ~isthing] = cost[:, isthing].mean()
        return torch.nan_to_num(cost, nan=0.0)

    def _mask_costs(self, out_mask: Tensor, tgt_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Mask BCE and dice costs on one shared set of uniform random points.

        out_mask [Q, h, w] logits (1/4 res); tgt_mask [n, H, W] at padded input res. Same normalised
        points on both, so the resolutions need not match. Computed in float32 with autocast off (the
        official code does the same to keep half precision out of the log/sigmoid terms).
        """
        tgt_mask = tgt_mask.to(out_mask)
        point_coords = torch.rand(1, self.cfg.num_points, 2, device=out_mask.device)
        tgt_points = point_sample(
            tgt_mask[:, None], point_coords.repeat(tgt_mask.shape[0], 1, 1), align_corners=False
        ).squeeze(1)
        out_points = point_sample(
            out_mask[:, None], point_coords.repeat(out_mask.shape[0], 1, 1), align_corners=False
        ).squeeze(1)
        with torch.autocast(device_type=out_mask.device.type, enabled=False):
            out_points = out_points.float()
            tgt_points = tgt_points.float()
            return batch_sigmoid_ce_cost(out_points, tgt_points), batch_dice_cost(out_points, tgt_points)
