"""The definition of multi-scale deformable attention's sampling core in plain PyTorch: the reference the
C++/CUDA kernels (csrc/ms_deform_attn) are tested against, and the fallback where no kernel runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn_reference(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                             attention_weights: Tensor) -> Tensor:
    """The definition of the op: per level `grid_sample` (bilinear, zero padding, align_corners=False).

    value [N, S, M, D]; spatial_shapes [L, 2] (H, W); sampling_locations [N, Lq, M, L, P, 2] in [0, 1] (x, y);
    attention_weights [N, Lq, M, L, P]  ->  [N, Lq, M*D].
    """
    N, _, M, D = value.shape
    _, Lq, M, L, P, _ = sampling_locations.shape
    value_list = value.split([int(h) * int(w) for h, w in spatial_shapes.tolist()], dim=1)
    grids = 2 * sampling_locations - 1
    out = []
    for lid, (h, w) in enumerate(spatial_shapes.tolist()):
        v = value_list[lid].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        g = grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)  # [N*M, Lq, P, 2]
        out.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    attn = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    sampled = torch.stack(out, dim=-2).flatten(-2)  # [N*M, D, Lq, L*P]
    return (sampled * attn).sum(-1).view(N, M * D, Lq).transpose(1, 2).contiguous()
