"""The pixel decoder (`MaskDINOEncoder`): a multi-scale deformable transformer encoder over backbone levels
plus extra stride-2 levels, and one FPN step that makes the 1/4-resolution mask features (docs/model.md#pixel-decoder).

Level order is the official one and easy to get wrong: with `feature_order="low2high"` the encoder token
sequence is high resolution first ([1/8, 1/16, 1/32, 1/64] for R50) despite the name; with "high2low" it is
extra levels (lowest first) then [1/32, 1/16, 1/8].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.layers import ConvNorm, c2_xavier_fill, group_norm
from model.ms_deform_attn import MSDeformAttn
from model.position import sine_position_map
from model.structures import EncoderOutput


@dataclass
class PixelDecoderConfig:
    """SEM_SEG_HEAD.* of the official config (names in comments)."""

    conv_dim: int = 256  # CONVS_DIM (= encoder d_model)
    mask_dim: int = 256  # MASK_DIM
    norm: str = "GN"  # NORM
    dim_feedforward: int = 2048  # DIM_FEEDFORWARD
    enc_layers: int = 6  # TRANSFORMER_ENC_LAYERS
    in_features: list[str] = field(default_factory=lambda: ["res3", "res4", "res5"])  # ..._ENCODER_IN_FEATURES
    total_num_feature_levels: int = 4  # TOTAL_NUM_FEATURE_LEVELS
    feature_order: str = "low2high"  # FEATURE_ORDER: low2high | high2low
    common_stride: int = 4  # COMMON_STRIDE
    n_points: int = 4  # DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS
    # The official encoder takes its head count from MaskDINO.NHEADS, not from
    # DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS (which is unused); 8 in every released config.
    n_heads: int = 8
    dropout: float = 0.0


class EncoderLayer(nn.Module):
    """Post-norm deformable self-attention layer: norm1(src + attn(src+pos)), norm2(src + FFN(src))."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor) -> Tensor:
        """src, pos [B, S, C]; reference_points [B, S, L, 2] -> [B, S, C]."""
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index)
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


def encoder_reference_points(spatial_shapes: list[tuple[int, int]], batch: int, device: torch.device) -> Tensor:
    """Pixel centres ((i + 0.5) / H, (j + 0.5) / W) of every level, repeated for every level
    (valid ratios are 1: the official head never passes padding masks). -> [B, S, L, 2] (x, y)."""
    points = []
    for h, w in spatial_shapes:
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
            torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        points.append(torch.stack((ref_x.reshape(-1) / w, ref_y.reshape(-1) / h), -1))
    ref = torch.cat(points, 0)
    return ref[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)


class DeformableEncoder(nn.Module):
    """`MSDeformAttnTransformerEncoderOnly`: flattens the levels, adds level embeddings to the positions,
    runs the layers."""

    def __init__(self, d_model: int, n_heads: int, num_layers: int, dim_feedforward: int, dropout: float,
                 n_levels: int, n_points: int):
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, dim_feedforward, dropout, n_levels, n_heads, n_points) for _ in range(num_layers)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[Tensor], pos_embeds: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """srcs, pos_embeds: per level [B, C, h, w] -> memory [B, S, C] and the level shapes."""
        shapes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos_flat = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1) for lvl, p in enumerate(pos_embeds)], 1
        )
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flat.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        reference_points = encoder_reference_points(shapes, src_flat.shape[0], src_flat.device)
        out = src_flat
        for layer in self.layers:
            out = layer(out, pos_flat, reference_points, spatial_shapes, level_start_index)
        return out, shapes


class PixelDecoder(nn.Module):
    """Backbone features -> encoder multi-scale maps and the 1/4 mask features."""

    def __init__(self, cfg: PixelDecoderConfig, in_channels: dict[str, int], in_strides: dict[str, int]):
        super().__init__()
        self.cfg = cfg
        by_stride = sorted(in_channels, key=lambda k: in_strides[k])
        self.fpn_in_features = by_stride  # "res2".."res5"
        unknown = [f for f in cfg.in_features if f not in in_channels]
        if unknown:
            raise ValueError(f"pixel_decoder.in_features {unknown} not produced by the backbone ({by_stride})")
        sign = -1 if cfg.feature_order == "low2high" else 1
        if cfg.feature_order not in ("low2high", "high2low"):
            raise ValueError(f"pixel_decoder.feature_order must be low2high or high2low, got {cfg.feature_order!r}")
        # Official `transformer_in_features`: sorted by -stride for low2high, by stride for high2low.
        self.transformer_in_features = sorted(cfg.in_features, key=lambda k: sign * in_strides[k])
        channels = [in_channels[k] for k in self.transformer_in_features]
        self.num_backbone_levels = len(channels)
        if cfg.total_num_feature_levels < self.num_backbone_levels:
            raise ValueError("pixel_decoder.total_num_feature_levels is smaller than len(in_features)")
        # The extra levels start from the backbone level with the most channels (res5).
        self.low_resolution_index = channels.index(max(channels))
        self.high_resolution_index = 0 if cfg.feature_order == "low2high" else -1
        self.input_proj = nn.ModuleList(self._input_projections(channels))
        self.encoder = DeformableEncoder(cfg.conv_dim, cfg.n_heads, cfg.enc_layers, cfg.dim_feedforward,
                                         cfg.dropout, cfg.total_num_feature_levels, cfg.n_points)
        self.mask_features = nn.Conv2d(cfg.conv_dim, cfg.mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)
        min_stride = min(in_strides[k] for k in self.transformer_in_features)
        self.num_fpn_levels = max(int(math.log2(min_stride) - math.log2(cfg.common_stride)), 1)
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        use_bias = cfg.norm == ""
        for feat in self.fpn_in_features[: self.num_fpn_levels]:
            lateral = ConvNorm(in_channels[feat], cfg.conv_dim, kernel_size=1, bias=use_bias,
                               norm=group_norm(cfg.conv_dim, cfg.norm))
            output = ConvNorm(cfg.conv_dim, cfg.conv_dim, kernel_size=3, padding=1, bias=use_bias,
                              norm=group_norm(cfg.conv_dim, cfg.norm), activation=F.relu)
            c2_xavier_fill(lateral)
            c2_xavier_fill(output)
            self.lateral_convs.append(lateral)
            self.output_convs.append(output)

    def _input_projections(self, channels: list[int]) -> list[nn.Module]:
        """Index 0..T-1: backbone levels in reversed `transformer_in_features` order; then extra levels,
        the first reading the raw lowest-resolution backbone map."""
        cfg = self.cfg
        projections = [nn.Sequential(nn.Conv2d(c, cfg.conv_dim, kernel_size=1), nn.GroupNorm(32, cfg.conv_dim))
                       for c in channels[::-1]]
        c_in = max(channels)
        for _ in range(cfg.total_num_feature_levels - len(channels)):
            projections.append(nn.Sequential(nn.Conv2d(c_in, cfg.conv_dim, kernel_size=3, stride=2, padding=1),
                                             nn.GroupNorm(32, cfg.conv_dim)))
            c_in = cfg.conv_dim
        for proj in projections:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        return projections

    def _encoder_inputs(self, features: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Projected maps and their sine positions in encoder order (positions from un-projected shapes)."""
        extra_srcs: list[Tensor] = []
        n_backbone = self.num_backbone_levels
        if self.cfg.total_num_feature_levels > n_backbone:
            x = features[self.transformer_in_features[self.low_resolution_index]].float()
            for lvl in range(n_backbone, self.cfg.total_num_feature_levels):
                x = self.input_proj[lvl](x)
                extra_srcs.append(x)
        extra_srcs = extra_srcs[::-1]
        extra_pos = [sine_position_map(s, self.cfg.conv_dim // 2) for s in extra_srcs]
        srcs, pos = [], []
        for idx, name in enumerate(self.transformer_in_features[::-1]):
            x = features[name].float()
            srcs.append(self.input_proj[idx](x))
            pos.append(sine_position_map(x, self.cfg.conv_dim // 2))
        if self.cfg.feature_order == "low2high":
            return srcs + extra_srcs, pos + extra_pos
        return extra_srcs + srcs, extra_pos + pos

    def forward(self, features: dict[str, Tensor]) -> EncoderOutput:
        """features: backbone maps {"res2": [B, C2, H/4, W/4], ...} -> EncoderOutput (float32)."""
        # The official forward_features runs with autocast disabled: deformable attention in fp32.
        with torch.autocast(device_type=next(iter(features.values())).device.type, enabled=False):
            srcs, pos = self._encoder_inputs(features)
            memory, shapes = self.encoder(srcs, pos)
            batch = memory.shape[0]
            sizes = [h * w for h, w in shapes]
            out = [z.transpose(1, 2).reshape(batch, -1, h, w) for z, (h, w) in zip(memory.split(sizes, 1), shapes)]
            multi_scale = out[: self.cfg.total_num_feature_levels]
            y = out[self.high_resolution_index]
            # Top-down from low to high resolution (only res2 in every released config).
            for idx, name in enumerate(self.fpn_in_features[: self.num_fpn_levels][::-1]):
                j = self.num_fpn_levels - 1 - idx
                lateral = self.lateral_convs[j](features[name].float())
                y = lateral + F.interpolate(out[self.high_resolution_index], size=lateral.shape[-2:],
                                            mode="bilinear", align_corners=False)
                y = self.output_convs[j](y)
            return EncoderOutput(mask_features=self.mask_features(y), multi_scale=multi_scale)
