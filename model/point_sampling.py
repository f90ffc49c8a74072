"""Point sampling of mask logits (detectron2 PointRend `point_features`), used by the matcher and mask losses.

Mask2Former / Mask DINO compute mask costs and losses on sampled points instead of full masks: the
matcher uses uniformly random points shared by all pairs, the loss uses PointRend's importance sampling
(mostly the points whose predicted logit is closest to 0, plus some uniform ones).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(input: Tensor, point_coords: Tensor, align_corners: bool = False) -> Tensor:
    """Bilinearly sample `input` at normalised points (detectron2 `point_sample`).

    input [N, C, H, W]; point_coords [N, P, 2] or [N, Hp, Wp, 2], (x, y) in [0, 1] over the whole map.
    Returns [N, C, P] (or [N, C, Hp, Wp]). grid_sample expects [-1, 1], hence `2 * coords - 1`.
    """
    add_dim = point_coords.dim() == 3
    if add_dim:
        point_coords = point_coords.unsqueeze(2)
    output = F.grid_sample(input, 2.0 * point_coords - 1.0, align_corners=align_corners)
    if add_dim:
        output = output.squeeze(3)
    return output


def calculate_uncertainty(logits: Tensor) -> Tensor:
    """Class-agnostic uncertainty -|logit|: [R, 1, ...] -> [R, 1, ...], highest where the logit is ~0."""
    assert logits.shape[1] == 1, "expects single-channel (class-agnostic) logits"
    return -torch.abs(logits)


def get_uncertain_point_coords_with_randomness(
    coarse_logits: Tensor,
    uncertainty_func: Callable[[Tensor], Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PointRend training point selection: coarse_logits [N, 1, h, w] -> coords [N, num_points, 2] in [0, 1].

    Draws int(num_points * oversample_ratio) uniform points, keeps the int(importance_sample_ratio *
    num_points) most uncertain ones (uncertainty computed on the *sampled* logits, as detectron2 insists)
    and appends the remaining count as fresh uniform points. RNG draws are in detectron2's order.
    """
    assert oversample_ratio >= 1
    assert 0 <= importance_sample_ratio <= 1
    num_boxes = coarse_logits.shape[0]
    device = coarse_logits.device
    num_sampled = int(num_points * oversample_ratio)
    point_coords = torch.rand(num_boxes, num_sampled, 2, device=device, generator=generator)
    point_logits = point_sample(coarse_logits, point_coords, align_corners=False)
    point_uncertainties = uncertainty_func(point_logits)
    num_uncertain_points = int(importance_sample_ratio * num_points)
    num_random_points = num_points - num_uncertain_points
    idx = torch.topk(point_uncertainties[:, 0, :], k=num_uncertain_points, dim=1)[1]
    shift = num_sampled * torch.arange(num_boxes, dtype=torch.long, device=device)
    idx = idx + shift[:, None]
    point_coords = point_coords.view(-1, 2)[idx.view(-1), :].view(num_boxes, num_uncertain_points, 2)
    if num_random_points > 0:
        random_coords = torch.rand(num_boxes, num_random_points, 2, device=device, generator=generator)
        point_coords = torch.cat([point_coords, random_coords], dim=1)
    return point_coords
