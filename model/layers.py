"""Small building blocks shared by the pixel decoder and the decoder: detectron2-style conv+norm, the DETR
MLP, and the initialisations the official code applies."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn


class ConvNorm(nn.Conv2d):
    """detectron2's `Conv2d` with an optional `norm` submodule and activation (keeps the official
    state-dict layout `<name>.weight`, `<name>.norm.weight`)."""

    def __init__(self, *args, norm: nn.Module | None = None,
                 activation: Callable[[Tensor], Tensor] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def c2_xavier_fill(module: nn.Conv2d) -> None:
    """detectron2 `c2_xavier_fill`: kaiming-uniform with a=1, zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


def group_norm(channels: int, norm: str) -> nn.Module | None:
    """The pixel decoder's norm: "GN" (32 groups, as all released configs) or "" for none."""
    if norm == "GN":
        return nn.GroupNorm(32, channels)
    if norm == "":
        return None
    raise ValueError(f"pixel_decoder.norm must be 'GN' or '', got {norm!r}")


class MLP(nn.Module):
    """DETR's MLP: `num_layers` linear layers with ReLU between them (not after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
