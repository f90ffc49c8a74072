"""DINO's deformable transformer decoder: post-norm layers (self-attn -> deformable cross-attn -> FFN) over
4-d anchor boxes, refined layer by layer through the shared box head (docs/model.md#decoder)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.box_ops import inverse_sigmoid
from model.layers import MLP
from model.ms_deform_attn import MSDeformAttn
from model.position import sine_embed_anchors


class DecoderLayer(nn.Module):
    """`DeformableTransformerDecoderLayer` with the official order sa -> ca -> ffn, each post-norm."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, self_attn_mask: Tensor | None) -> Tensor:
        """tgt, query_pos [Q, B, C] (sequence first, as nn.MultiheadAttention); reference_points
        [Q, B, L, 4]; memory [S, B, C]; self_attn_mask [Q, Q] bool (True = blocked) -> [Q, B, C]."""
        q = k = tgt + query_pos
        sa = self.self_attn(q, k, tgt, attn_mask=self_attn_mask)[0]
        tgt = self.norm2(tgt + self.dropout2(sa))
        ca = self.cross_attn((tgt + query_pos).transpose(0, 1), reference_points.transpose(0, 1).contiguous(),
                             memory.transpose(0, 1), spatial_shapes, level_start_index).transpose(0, 1)
        tgt = self.norm1(tgt + self.dropout1(ca))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class TransformerDecoder(nn.Module):
    """The layer stack with iterative anchor refinement.

    The box head and the output norm are owned by the predictor and passed in (the official code attaches
    the same objects to the decoder, which is why they appear several times in official state dicts).
    """

    def __init__(self, num_layers: int, d_model: int, dim_feedforward: int, dropout: float, n_levels: int,
                 n_heads: int, n_points: int):
        super().__init__()
        if d_model != 256:
            # The anchor sine embedding is hard-coded to 4 x 128 features feeding MLP(2 * d_model, ...).
            raise ValueError(f"decoder hidden_dim must be 256 (the official anchor embedding is fixed), got {d_model}")
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, dim_feedforward, dropout, n_levels, n_heads, n_points) for _ in range(num_layers)
        )
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()

    def forward(self, tgt: Tensor, memory: Tensor, anchors_unsigmoid: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, self_attn_mask: Tensor | None, box_head: nn.Module,
                norm: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """tgt [Q, B, C]; memory [S, B, C]; anchors_unsigmoid [Q, B, 4].

        Returns (hs, references): hs = norm(output) of every layer, each [B, Q, C]; references =
        [sigmoid(anchors)] + the UNdetached refined boxes of every layer, each [B, Q, 4]. The next layer
        consumes the detached refinement; the undetached ones serve look-forward-twice.
        """
        n_levels = int(spatial_shapes.shape[0])
        output = tgt
        reference = anchors_unsigmoid.sigmoid()
        references = [reference]
        intermediate = []
        with torch.autocast(device_type=tgt.device.type, enabled=False):  # official: decoder layers in fp32
            output = output.float()
            memory = memory.float()
            for layer in self.layers:
                # valid ratios are all 1 (no padding masks), so every level sees the same anchor.
                ref_input = reference[:, :, None].expand(-1, -1, n_levels, -1)
                query_pos = self.ref_point_head(sine_embed_anchors(ref_input[:, :, 0, :]))
                output = layer(output, query_pos, ref_input, memory, spatial_shapes, level_start_index,
                               self_attn_mask)
                refined = (box_head(output) + inverse_sigmoid(reference)).sigmoid()
                reference = refined.detach()
                references.append(refined)
                intermediate.append(norm(output))
        return [h.transpose(0, 1) for h in intermediate], [r.transpose(0, 1) for r in references]
