"""Sine positional embeddings: the 2-d map embedding of the pixel decoder and the 4-d anchor embedding of
the decoder queries (both with temperature 10000 and scale 2*pi, as the official code)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sine_position_map(x: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Mask2Former's normalised `PositionEmbeddingSine` for an unmasked map.

    x [B, C, H, W] (only its shape is used) -> [B, 2*num_pos_feats, H, W], y channels first.
    Normalisation is cumsum / last value (no 0.5 offset), times 2*pi; eps 1e-6 as the official code.
    """
    b, _, h, w = x.shape
    not_mask = torch.ones((b, h, w), dtype=torch.bool, device=x.device)
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    eps, scale = 1e-6, 2 * math.pi
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = _interleave_sin_cos(x_embed[:, :, :, None] / dim_t)
    pos_y = _interleave_sin_cos(y_embed[:, :, :, None] / dim_t)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def _interleave_sin_cos(t: Tensor) -> Tensor:
    """[..., F] -> [..., F]: sin of even features and cos of odd ones, interleaved pairwise."""
    return torch.stack((t[..., 0::2].sin(), t[..., 1::2].cos()), dim=t.dim()).flatten(t.dim() - 1)


def sine_embed_anchors(anchors: Tensor) -> Tensor:
    """DINO's `gen_sineembed_for_position` for 4-d anchors.

    anchors [..., 4] (cx, cy, w, h) in [0, 1] -> [..., 512], concatenated in the order (y, x, w, h),
    128 features each. The 128 is hard-coded in the official code, which is why it only runs with
    hidden_dim 256.
    """
    scale = 2 * math.pi
    dim_t = torch.arange(128, dtype=torch.float32, device=anchors.device)
    dim_t = 10000 ** (2 * (dim_t // 2) / 128)
    parts = [_interleave_sin_cos(anchors[..., i, None] * scale / dim_t) for i in range(anchors.shape[-1])]
    if anchors.shape[-1] == 2:
        return torch.cat((parts[1], parts[0]), dim=-1)
    if anchors.shape[-1] == 4:
        return torch.cat((parts[1], parts[0], parts[2], parts[3]), dim=-1)
    raise ValueError(f"anchors must have 2 or 4 coordinates, got {anchors.shape[-1]}")
