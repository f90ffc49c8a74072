"""Multi-scale deformable attention (Deformable DETR): the module with the official parameter names and
initialisation.

The core (`value` sampled bilinearly at `sampling_locations`, weighted by `attention_weights`) runs through
`model.msda_dispatch`, which picks the C++/CUDA kernels from `csrc/` or the PyTorch reference
(`model/msda_reference.py`). Which one is chosen per module (`MSDeformAttn.backend`, set for a whole model by
`set_msda_backend`), never as a process-wide side effect of building a model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.msda_dispatch import check_backend, ms_deform_attn_core


class MSDeformAttn(nn.Module):
    """Deformable attention over L feature levels with M heads and P points per head and level.

    Parameter names equal the official module's (`sampling_offsets`, `attention_weights`, `value_proj`,
    `output_proj`) so official state-dict keys map one to one.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 backend: str = "auto"):
        super().__init__()
        self.backend = check_backend(backend)  # not state: checkpoints do not carry it
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: offsets start on 8 (or M) head directions, scaled by point index 1..P."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query: Tensor, reference_points: Tensor, value_input: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """query [N, Lq, C]; reference_points [N, Lq, L, 2] (x, y) or [N, Lq, L, 4] (cx, cy, w, h), normalised;
        value_input [N, S, C]; spatial_shapes [L, 2]; level_start_index [L]; padding_mask [N, S] (True = pad)
        -> [N, Lq, C]."""
        N, Lq, _ = query.shape
        S = value_input.shape[1]
        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(N, S, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(N, Lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(N, Lq, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(N, Lq, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points last dim must be 2 or 4, got {reference_points.shape[-1]}")
        output = ms_deform_attn_core(value, spatial_shapes, level_start_index, locations, weights, self.backend)
        return self.output_proj(output)


def set_msda_backend(model: nn.Module, backend: str) -> None:
    """Use ``backend`` ("auto", "reference", "cpp" or "cuda") in every MSDeformAttn of ``model``;
    "auto" defers to the process's request (msda_dispatch.set_backend, $MASKDINO_MSDA_BACKEND)."""
    backend = check_backend(backend)
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.backend = backend
