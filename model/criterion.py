"""Mask DINO training losses (official `SetCriterion`), weight dict, docs/model.md#criterion.

`SetCriterion.forward` returns UNWEIGHTED losses under the official names (`loss_ce`, `loss_mask`,
`loss_dice`, `loss_bbox`, `loss_giou`, with suffixes `_dn`, `_interm`, `_{i}`, `_dn_{i}`); the caller
multiplies by `build_weight_dict(cfg)` and drops keys that are not in it, exactly as the official
meta-architecture does. `num_masks` (the cross-rank-averaged number of ground truths, clamped to >= 1) is
passed in, so nothing here needs a process group.

The order of the computations (final match and losses, DN, aux layers with their DN, interm) follows the
official code so the global RNG (matcher points, PointRend sampling) is consumed in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from model.matcher import HungarianMatcher, MatcherConfig
from model.point_sampling import (
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from model.structures import DenoisingGroups, HeadOutput, Predictions, Targets

Indices = list[tuple[Tensor, Tensor]]
BASE_LOSS_KEYS: tuple[str, ...] = ("loss_ce", "loss_mask", "loss_dice", "loss_bbox", "loss_giou")


@dataclass
class LossSettings:
    """Loss weights and options a config sets (MODEL.MaskDINO.*_WEIGHT etc. in the official config).

    mask_losses=False is detection-only mode (Objects365 pretraining): no mask losses, targets need no
    masks and the matcher uses class + box costs only. stuff_box_loss_masked is the paper's decoupled box
    prediction (official PANO_BOX_LOSS): box losses only on labels < num_thing_classes (off in the
    released configs).
    """

    class_weight: float = 4.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    box_weight: float = 5.0
    giou_weight: float = 2.0
    no_object_weight: float = 0.1
    focal_alpha: float = 0.25
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    box_loss: bool = True
    stuff_box_loss_masked: bool = False
    num_thing_classes: int = 80
    mask_losses: bool = True
    deep_supervision: bool = True


@dataclass(kw_only=True)
class LossConfig(LossSettings):
    """The criterion's full config: the settings plus what the rest of the model config implies."""

    num_classes: int
    semantic_ce_loss: bool = False
    dn: Literal["seg", "standard", "no"] = "seg"
    two_stage: bool = True
    dec_layers: int = 9

    def __post_init__(self) -> None:
        if self.dn not in ("seg", "standard", "no"):
            raise ValueError(f"dn must be one of 'seg', 'standard', 'no', got {self.dn!r}")


def build_weight_dict(cfg: LossConfig) -> dict[str, float]:
    """Loss name -> weight, built in the official order (base, _interm, _dn, _{i}).

    "standard" DN excludes exactly the keys `loss_mask` and `loss_dice` (as the official code, so
    `loss_mask_interm_dn` is present but never produced).
    """
    weights = {"loss_ce": cfg.class_weight}
    if cfg.mask_losses:
        weights.update({"loss_mask": cfg.mask_weight, "loss_dice": cfg.dice_weight})
    if cfg.box_loss:
        weights.update({"loss_bbox": cfg.box_weight, "loss_giou": cfg.giou_weight})
    if cfg.two_stage:
        weights.update({f"{k}_interm": v for k, v in weights.items()})
    if cfg.dn == "seg":
        weights.update({f"{k}_dn": v for k, v in weights.items()})
    elif cfg.dn == "standard":
        weights.update({f"{k}_dn": v for k, v in weights.items() if k not in ("loss_mask", "loss_dice")})
    if cfg.deep_supervision:
        aux = {f"{k}_{i}": v for i in range(cfg.dec_layers) for k, v in weights.items()}
        weights.update(aux)
    return weights


def sigmoid_focal_loss(
    inputs: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25, gamma: float = 2
) -> Tensor:
    """RetinaNet focal loss: inputs/targets [B, Q, K] -> scalar = mean over queries, sum, / num_boxes."""
    prob = inputs.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss.mean(1).sum() / num_boxes


def sigmoid_ce_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Point BCE: inputs logits [n, P], targets [n, P] -> scalar (mean over points, sum, / num_masks)."""
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Dice with +1 smoothing: inputs logits [n, P], targets [n, P] -> scalar (sum / num_masks)."""
    probs = inputs.sigmoid().flatten(1)
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def _src_permutation_idx(indices: Indices) -> tuple[Tensor, Tensor]:
    """(batch index, query index), each [m_total]."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx


def dn_indices(targets: list[Targets], groups: DenoisingGroups) -> Indices:
    """Fixed DN assignment: query group*single_pad + j <-> target j, for every group and image."""
    indices = []
    for tgt in targets:
        n = len(tgt)
        if n == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            indices.append((empty, empty.clone()))
            continue
        t = torch.arange(n, dtype=torch.int64).unsqueeze(0).repeat(groups.num_groups, 1)
        output_idx = (torch.arange(groups.num_groups, dtype=torch.int64) * groups.single_pad).unsqueeze(1) + t
        indices.append((output_idx.flatten(), t.flatten()))
    return indices


def _pad_masks(masks: list[Tensor]) -> list[Tensor]:
    """Zero-pad [n_i, H_i, W_i] masks to the largest H, W (official nested_tensor_from_tensor_list)."""
    max_h = max(m.shape[-2] for m in masks)
    max_w = max(m.shape[-1] for m in masks)
    padded = []
    for m in masks:
        if m.shape[-2:] != (max_h, max_w):
            m = F.pad(m, (0, max_w - m.shape[-1], 0, max_h - m.shape[-2]))
        padded.append(m)
    return padded


class SetCriterion(nn.Module):
    """Matching + losses for the final, aux, interm and DN prediction sets of `HeadOutput`.

    Holds `empty_weight` [num_classes + 1] (persistent buffer, official `criterion.empty_weight`), used by
    the CE classification variant only.
    """

    def __init__(self, cfg: LossConfig, matcher: HungarianMatcher | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.matcher = matcher or HungarianMatcher(MatcherConfig())
        self.weight_dict = build_weight_dict(cfg)
        empty_weight = torch.ones(cfg.num_classes + 1)
        empty_weight[-1] = cfg.no_object_weight
        self.register_buffer("empty_weight", empty_weight)
        self.losses = ["labels", "masks"] if cfg.mask_losses else ["labels"]
        if cfg.box_loss:
            self.losses.append("boxes")
        dn_losses = {"seg": ["labels", "masks", "boxes"], "standard": ["labels", "boxes"], "no": []}
        self.dn_losses = dn_losses[cfg.dn]
        if not cfg.mask_losses:
            self.dn_losses = [name for name in self.dn_losses if name != "masks"]
        self.match_costs = ("cls", "box", "mask") if cfg.mask_losses else ("cls", "box")

    # ----------------------------------------------------------------------------------------- losses
    def loss_labels(
        self, pred: Predictions, targets: list[Targets], indices: Indices, num_boxes: float
    ) -> dict[str, Tensor]:
        """Sigmoid focal loss over [B, Q, K] one-hot targets (unmatched queries: all zeros), times Q."""
        logits = pred.logits
        target_classes = self._target_classes(logits, targets, indices)
        onehot = torch.zeros(
            (*logits.shape[:2], logits.shape[2] + 1),
            dtype=logits.dtype,
            layout=logits.layout,
            device=logits.device,
        )
        onehot.scatter_(2, target_classes.unsqueeze(-1), 1)
        onehot = onehot[:, :, :-1]
        num_queries = logits.shape[1]
        loss = sigmoid_focal_loss(logits, onehot, num_boxes, alpha=self.cfg.focal_alpha, gamma=2) * num_queries
        return {"loss_ce": loss}

    def loss_labels_ce(
        self, pred: Predictions, targets: list[Targets], indices: Indices, num_boxes: float
    ) -> dict[str, Tensor]:
        """Softmax CE over K+1 classes weighted by empty_weight (semantic configs); num_boxes unused."""
        logits = pred.logits.float()
        target_classes = self._target_classes(logits, targets, indices)
        return {"loss_ce": F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)}

    def _target_classes(self, logits: Tensor, targets: list[Targets], indices: Indices) -> Tensor:
        """[B, Q] int64: num_classes (no object) everywhere except matched queries (their GT label)."""
        idx = _src_permutation_idx(indices)
        matched = torch.cat([t.labels[j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        target_classes = torch.full(
            logits.shape[:2], self.cfg.num_classes, dtype=torch.int64, device=logits.device
        )
        target_classes[idx] = matched.long()
        return target_classes

    def loss_boxes(
        self, pred: Predictions, targets: list[Targets], indices: Indices, num_boxes: float
    ) -> dict[str, Tensor]:
        """L1 on normalised cxcywh and 1 - GIoU, each summed / num_boxes (PANO_BOX_LOSS: things only)."""
        idx = _src_permutation_idx(indices)
        src_boxes = pred.boxes[idx]
        target_boxes = torch.cat([t.boxes[j] for t, (_, j) in zip(targets, indices)], dim=0).to(src_boxes)
        if self.cfg.stuff_box_loss_masked:
            labels = torch.cat([t.labels[j] for t, (_, j) in zip(targets, indices)], dim=0)
            isthing = labels.to(src_boxes.device) < self.cfg.num_thing_classes
            src_boxes, target_boxes = src_boxes[isthing], target_boxes[isthing]
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none").sum() / num_boxes
        giou = generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes))
        loss_giou = (1 - torch.diag(giou)).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def loss_masks(
        self, pred: Predictions, targets: list[Targets], indices: Indices, num_masks: float
    ) -> dict[str, Tensor]:
        """Point-sampled BCE and dice between matched predicted masks [n, h, w] and GT masks [n, H, W]."""
        if pred.masks is None:
            raise ValueError("mask losses need pred.masks (got None)")
        src_masks = pred.masks[_src_permutation_idx(indices)]
        if src_masks.shape[0] == 0:
            # Nothing matched: keep the graph connected (unused-parameter safety) with an exact zero.
            zero = 0.0 * pred.masks.sum()
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        target_masks = self._matched_target_masks(targets, indices).to(src_masks)
        src_masks, target_masks = src_masks[:, None], target_masks[:, None]
        with torch.no_grad():
            point_coords = get_uncertain_point_coords_with_randomness(
                src_masks,
                calculate_uncertainty,
                self.cfg.train_num_points,
                self.cfg.oversample_ratio,
                self.cfg.importance_sample_ratio,
            )
            point_labels = point_sample(target_masks, point_coords, align_corners=False).squeeze(1)
        point_logits = point_sample(src_masks, point_coords, align_corners=False).squeeze(1)
        return {
            "loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }

    def _matched_target_masks(self, targets: list[Targets], indices: Indices) -> Tensor:
        """GT masks of the matched targets in matching order, zero-padded to a common size -> [n, H, W]."""
        masks = []
        for t in targets:
            if t.masks is None:
                raise ValueError(
                    "mask losses need Targets.masks (got None); use mask_losses=False for detection-only"
                )
            masks.append(t.masks)
        masks = _pad_masks(masks)
        return torch.cat([m[j.to(m.device)] for m, (_, j) in zip(masks, indices)], dim=0)

    def get_loss(
        self, loss: str, pred: Predictions, targets: list[Targets], indices: Indices, num_masks: float
    ) -> dict[str, Tensor]:
        loss_map = {
            "labels": self.loss_labels_ce if self.cfg.semantic_ce_loss else self.loss_labels,
            "masks": self.loss_masks,
            "boxes": self.loss_boxes,
        }
        return loss_map[loss](pred, targets, indices, num_masks)

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, outputs: HeadOutput, targets: list[Targets], num_masks: float) -> dict[str, Tensor]:
        """All unweighted losses of one training forward.

        outputs: final / aux / interm / dn prediction sets; targets: one per image (boxes normalised
        cxcywh, masks at the padded input size); num_masks: clamp(total GT / world size, min=1).
        """
        device = outputs.final.logits.device
        use_dn = self.cfg.dn != "no" and outputs.dn is not None
        dn_idx = dn_indices(targets, outputs.dn.groups) if use_dn else None
        dn_norm = num_masks * outputs.dn.groups.num_groups if use_dn else num_masks

        losses: dict[str, Tensor] = {}
        losses.update(self._set_losses(outputs.final, targets, num_masks, suffix=""))
        if use_dn:
            losses.update(self._dn_losses(outputs.dn.final, targets, dn_idx, dn_norm, suffix="_dn"))
        elif self.cfg.dn != "no":
            losses.update(self._zero_dn_losses("_dn", device))

        dn_start = 0 if outputs.interm is not None else 1
        for i, aux in enumerate(outputs.aux):
            losses.update(self._set_losses(aux, targets, num_masks, suffix=f"_{i}"))
            if i < dn_start:
                continue
            if use_dn:
                losses.update(self._dn_losses(outputs.dn.aux[i], targets, dn_idx, dn_norm, suffix=f"_dn_{i}"))
            elif self.cfg.dn != "no":
                losses.update(self._zero_dn_losses(f"_dn_{i}", device))

        if outputs.interm is not None:
            losses.update(self._set_losses(outputs.interm, targets, num_masks, suffix="_interm"))
        return losses

    def _set_losses(
        self, pred: Predictions, targets: list[Targets], num_masks: float, suffix: str
    ) -> dict[str, Tensor]:
        """Hungarian-match one prediction set, then every configured loss with `suffix`."""
        indices = self.matcher.match(pred, targets, self.match_costs)
        out: dict[str, Tensor] = {}
        for loss in self.losses:
            out.update(self.get_loss(loss, pred, targets, indices, num_masks))
        return {k + suffix: v for k, v in out.items()}

    def _dn_losses(
        self, pred: Predictions, targets: list[Targets], indices: Indices, norm: float, suffix: str
    ) -> dict[str, Tensor]:
        """DN losses with the fixed assignment, normalised by num_masks * num_groups."""
        out: dict[str, Tensor] = {}
        for loss in self.dn_losses:
            out.update(self.get_loss(loss, pred, targets, indices, norm))
        return {k + suffix: v for k, v in out.items()}

    def _zero_dn_losses(self, suffix: str, device: torch.device) -> dict[str, Tensor]:
        """Zeros under the DN names when no DN happened this iteration (official behaviour)."""
        names = ["loss_bbox", "loss_giou", "loss_ce"]
        if "masks" in self.dn_losses:
            names += ["loss_mask", "loss_dice"]
        return {name + suffix: torch.zeros((), device=device) for name in names}
