"""Unified denoising (DN-DETR style, no contrastive negatives): noised ground-truth labels and boxes become
extra decoder queries, grouped so that groups cannot see each other and matching queries cannot see any of
them (docs/model.md#denoising). Training only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.box_ops import inverse_sigmoid
from model.structures import DenoisingGroups, Predictions, Targets


@dataclass
class DenoisingQueries:
    """content [B, pad_size, C] and anchors [B, pad_size, 4] (unsigmoided) of the DN queries."""

    content: Tensor
    anchors: Tensor
    groups: DenoisingGroups


def denoising_attn_mask(num_groups: int, single_pad: int, num_queries: int, device: torch.device) -> Tensor:
    """[pad + Q, pad + Q] bool, True = blocked: matching queries cannot see DN queries; DN groups are
    mutually invisible."""
    pad_size = num_groups * single_pad
    size = pad_size + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[pad_size:, :pad_size] = True
    for i in range(num_groups):
        rows = slice(single_pad * i, single_pad * (i + 1))
        mask[rows, single_pad * (i + 1):pad_size] = True
        mask[rows, : single_pad * i] = True
    return mask


def make_denoising_queries(targets: list[Targets], dn_num: int, noise_scale: float, num_classes: int,
                           label_embed: nn.Embedding, num_queries: int,
                           generator: torch.Generator | None = None) -> DenoisingQueries | None:
    """Noised copies of every image's ground truth, `dn_num // max(#GT)` groups of them.

    Returns None when no DN happens (no ground truth in the batch, or more GT than dn_num).
    Label noise: with probability noise_scale/2 a label is replaced by a uniform random class.
    Box noise (cxcywh): += U(-1, 1) * [w/2, h/2, w, h] * noise_scale, clamped to [0, 1].
    """
    known_num = [len(t) for t in targets]
    max_known = max(known_num) if known_num else 0
    if max_known == 0 or dn_num // max_known == 0:
        return None
    num_groups = dn_num // max_known
    device = label_embed.weight.device
    labels = torch.cat([t.labels for t in targets]).to(device).long()
    boxes = torch.cat([t.boxes for t in targets]).to(device).float()
    batch_idx = torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(known_num)])
    known_labels = labels.repeat(num_groups, 1).view(-1)
    known_bid = batch_idx.repeat(num_groups, 1).view(-1)
    known_boxes = boxes.repeat(num_groups, 1)
    noised_labels = known_labels.clone()
    noised_boxes = known_boxes.clone()
    if noise_scale > 0:
        p = torch.rand(noised_labels.shape, device=device, generator=generator)
        chosen = torch.nonzero(p < noise_scale * 0.5).view(-1)
        new_labels = torch.randint(0, num_classes, chosen.shape, device=device, generator=generator)
        noised_labels.scatter_(0, chosen, new_labels)
        diff = torch.zeros_like(noised_boxes)
        diff[:, :2] = noised_boxes[:, 2:] / 2
        diff[:, 2:] = noised_boxes[:, 2:]
        uniform = torch.rand(noised_boxes.shape, device=device, generator=generator) * 2 - 1.0
        noised_boxes = (noised_boxes + uniform * diff * noise_scale).clamp(min=0.0, max=1.0)
    single_pad = max_known
    pad_size = single_pad * num_groups
    batch = len(targets)
    content = torch.zeros(batch, pad_size, label_embed.embedding_dim, device=device)
    anchors = torch.zeros(batch, pad_size, 4, device=device)
    slot = torch.cat([torch.arange(n, device=device) for n in known_num])
    slot = torch.cat([slot + single_pad * i for i in range(num_groups)]).long()
    content[(known_bid, slot)] = label_embed(noised_labels).to(content.dtype)
    anchors[(known_bid, slot)] = inverse_sigmoid(noised_boxes)
    mask = denoising_attn_mask(num_groups, single_pad, num_queries, device)
    return DenoisingQueries(content, anchors, DenoisingGroups(num_groups, single_pad, mask))


def split_denoising(pred: Predictions, pad_size: int) -> tuple[Predictions, Predictions]:
    """Split one prediction set [B, pad + Q, ...] into (DN part, matching part)."""
    def part(t: Tensor | None, sl: slice) -> Tensor | None:
        return None if t is None else t[:, sl]

    dn, match = slice(0, pad_size), slice(pad_size, None)
    return (Predictions(part(pred.logits, dn), part(pred.boxes, dn), part(pred.masks, dn)),
            Predictions(part(pred.logits, match), part(pred.boxes, match), part(pred.masks, match)))
