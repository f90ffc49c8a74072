"""The Mask DINO decoder head (`MaskDINODecoder`): query selection, denoising queries, the DINO decoder and
the shared prediction heads (class, mask via dot product with the 1/4 mask features, box).

Shared modules are owned once here: `box_head` is the official `_bbox_embed` (also reachable there as
`bbox_embed.{i}` and `decoder.bbox_embed.{i}`) and `decoder_norm` is also the official `decoder.norm`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.box_ops import inverse_sigmoid
from model.decoder import TransformerDecoder
from model.denoising import DenoisingQueries, make_denoising_queries, split_denoising
from model.layers import MLP, c2_xavier_fill
from model.query_selection import (
    BOX_INIT_TYPES,
    encoder_proposals,
    gather_tokens,
    mask_enhanced_anchors,
    select_topk,
)
from model.structures import DenoisingOutput, HeadOutput, Predictions, Targets

DN_MODES = ("seg", "standard", "no")


@dataclass
class DecoderConfig:
    """MODEL.MaskDINO.* of the official config."""

    hidden_dim: int = 256  # HIDDEN_DIM
    num_queries: int = 300  # NUM_OBJECT_QUERIES
    dec_layers: int = 9  # DEC_LAYERS
    dim_feedforward: int = 2048  # DIM_FEEDFORWARD
    # The official MaskDINODecoder builds its layers with its `nhead=8` default, not with NHEADS.
    n_heads: int = 8
    n_points: int = 4
    dropout: float = 0.0  # DROPOUT
    two_stage: bool = True  # TWO_STAGE
    initial_pred: bool = True  # INITIAL_PRED
    initialize_box_type: str = "mask2box"  # INITIALIZE_BOX_TYPE: mask2box | bitmask | no
    dn: str = "seg"  # DN: seg | standard | no
    dn_num: int = 100  # DN_NUM
    dn_noise_scale: float = 0.4  # DN_NOISE_SCALE
    learn_tgt: bool = False  # LEARN_TGT
    enforce_input_proj: bool = False  # ENFORCE_INPUT_PROJ
    semantic_ce_loss: bool = False  # SEMANTIC_CE_LOSS (class head gets K + 1 outputs)
    # "official": proposal size 0.05 * 2**(decoder level index), inverted for low2high encoders.
    proposal_size_by_level: str = "official"


class MaskDINOPredictor(nn.Module):
    def __init__(self, cfg: DecoderConfig, num_classes: int, in_channels: int, mask_dim: int, n_levels: int):
        super().__init__()
        if cfg.initialize_box_type not in BOX_INIT_TYPES:
            raise ValueError(f"decoder.initialize_box_type must be one of {BOX_INIT_TYPES}, got {cfg.initialize_box_type!r}")
        if cfg.dn not in DN_MODES:
            raise ValueError(f"decoder.dn must be one of {DN_MODES}, got {cfg.dn!r}")
        if cfg.initialize_box_type != "no" and not (cfg.two_stage and cfg.initial_pred):
            raise ValueError("mask-enhanced box init needs decoder.two_stage and decoder.initial_pred")
        self.cfg, self.num_classes, self.n_levels = cfg, num_classes, n_levels
        d = cfg.hidden_dim
        if not cfg.two_stage or cfg.learn_tgt:
            self.query_feat = nn.Embedding(cfg.num_queries, d)
        if not cfg.two_stage and cfg.initialize_box_type == "no":
            self.query_embed = nn.Embedding(cfg.num_queries, 4)
        if cfg.two_stage:
            self.enc_output = nn.Linear(d, d)
            self.enc_output_norm = nn.LayerNorm(d)
        self.input_proj = nn.ModuleList(self._input_projection(in_channels) for _ in range(n_levels))
        self.class_embed = nn.Linear(d, num_classes + 1 if cfg.semantic_ce_loss else num_classes)
        self.label_enc = nn.Embedding(num_classes, d)
        self.mask_embed = MLP(d, d, mask_dim, 3)
        self.decoder_norm = nn.LayerNorm(d)
        self.decoder = TransformerDecoder(cfg.dec_layers, d, cfg.dim_feedforward, cfg.dropout, n_levels,
                                          cfg.n_heads, cfg.n_points)
        self.box_head = MLP(d, d, 4, 3)
        nn.init.constant_(self.box_head.layers[-1].weight, 0)
        nn.init.constant_(self.box_head.layers[-1].bias, 0)

    def _input_projection(self, in_channels: int) -> nn.Module:
        if in_channels != self.cfg.hidden_dim or self.cfg.enforce_input_proj:
            conv = nn.Conv2d(in_channels, self.cfg.hidden_dim, kernel_size=1)
            c2_xavier_fill(conv)
            return conv
        return nn.Identity()

    def prediction_heads(self, output: Tensor, mask_features: Tensor, with_masks: bool) -> tuple[Tensor, Tensor | None]:
        """output [B, Q, C] -> class logits [B, Q, K] and mask logits [B, Q, H/4, W/4] (or None).

        decoder_norm is applied here even to decoder outputs that already went through decoder.norm:
        the official code normalises twice, and parity needs it."""
        out = self.decoder_norm(output)
        logits = self.class_embed(out)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(out), mask_features) if with_masks else None
        return logits, masks

    def _memory(self, multi_scale: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Decoder memory [B, S, C] with the encoder's level order REVERSED (level i = x[L-1-i])."""
        if len(multi_scale) != self.n_levels:
            raise ValueError(f"decoder expects {self.n_levels} feature levels, got {len(multi_scale)}")
        flat, shapes = [], []
        for i in range(self.n_levels):
            idx = self.n_levels - 1 - i
            x = self.input_proj[idx](multi_scale[idx])
            shapes.append((int(x.shape[2]), int(x.shape[3])))
            flat.append(x.flatten(2).transpose(1, 2))
        return torch.cat(flat, 1), shapes

    def _two_stage_queries(self, memory: Tensor, shapes: list[tuple[int, int]], mask_features: Tensor
                           ) -> tuple[Tensor, Tensor, Predictions]:
        """-> content queries [B, Q, C], anchors (unsigmoided) [B, Q, 4] and the interm predictions."""
        out_memory, proposals = encoder_proposals(memory, shapes, self.cfg.proposal_size_by_level)
        out_memory = self.enc_output_norm(self.enc_output(out_memory))
        enc_class = self.class_embed(out_memory)
        enc_coord = self.box_head(out_memory) + proposals
        topk = select_topk(enc_class, self.cfg.num_queries)
        anchors_undetached = gather_tokens(enc_coord, topk)
        tgt_undetached = gather_tokens(out_memory, topk)
        logits, masks = self.prediction_heads(tgt_undetached, mask_features, with_masks=True)
        interm = Predictions(logits, anchors_undetached.sigmoid(), masks)
        tgt = tgt_undetached.detach()
        if self.cfg.learn_tgt:
            tgt = self.query_feat.weight[None].expand(memory.shape[0], -1, -1)
        anchors = anchors_undetached.detach()
        if self.cfg.initialize_box_type != "no":
            anchors = mask_enhanced_anchors(masks, self.cfg.initialize_box_type)
        return tgt, anchors, interm

    def forward(self, multi_scale: list[Tensor], mask_features: Tensor,
                targets: list[Targets] | None = None) -> HeadOutput:
        """multi_scale: encoder maps in encoder order; mask_features [B, D, H/4, W/4]; targets needed for
        denoising in training."""
        memory, shapes = self._memory(multi_scale)
        batch = memory.shape[0]
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=memory.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        interm = None
        if self.cfg.two_stage:
            tgt, anchors, interm = self._two_stage_queries(memory, shapes, mask_features)
        else:
            tgt = self.query_feat.weight[None].expand(batch, -1, -1)
            anchors = self.query_embed.weight[None].expand(batch, -1, -1)
        dn = None
        if self.training and self.cfg.dn != "no":
            if targets is None:
                raise ValueError("training with denoising needs targets")
            dn = make_denoising_queries(targets, self.cfg.dn_num, self.cfg.dn_noise_scale, self.num_classes,
                                        self.label_enc, self.cfg.num_queries)
        if dn is not None:
            tgt = torch.cat([dn.content, tgt], dim=1)
            anchors = torch.cat([dn.anchors, anchors], dim=1)
        return self._decode(tgt, anchors, memory, spatial_shapes, level_start_index, mask_features, interm, dn)

    def _decode(self, tgt: Tensor, anchors: Tensor, memory: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, mask_features: Tensor, interm: Predictions | None,
                dn: DenoisingQueries | None) -> HeadOutput:
        sets_logits, sets_masks = [], []
        if self.cfg.initial_pred:
            logits, masks = self.prediction_heads(tgt, mask_features, with_masks=self.training)
            sets_logits.append(logits)
            sets_masks.append(masks)
        hs, references = self.decoder(
            tgt.transpose(0, 1), memory.transpose(0, 1), anchors.transpose(0, 1), spatial_shapes,
            level_start_index, None if dn is None else dn.groups.attn_mask, self.box_head, self.decoder_norm)
        for i, output in enumerate(hs):
            logits, masks = self.prediction_heads(output, mask_features,
                                                  with_masks=self.training or i == len(hs) - 1)
            sets_logits.append(logits)
            sets_masks.append(masks)
        boxes = self._look_forward_twice(references, hs, anchors.sigmoid() if self.cfg.initial_pred else None)
        sets = [Predictions(lg, bx, mk) for lg, bx, mk in zip(sets_logits, boxes, sets_masks)]
        if self.training and dn is None:
            # Keeps label_enc in the graph when a batch has no DN (DDP needs every parameter used).
            sets[-1].logits = sets[-1].logits + 0.0 * self.label_enc.weight.sum()
        dn_output = None
        if dn is not None:
            split = [split_denoising(s, dn.groups.pad_size) for s in sets]
            dn_output = DenoisingOutput(dn.groups, final=split[-1][0], aux=[d for d, _ in split[:-1]])
            sets = [m for _, m in split]
        return HeadOutput(final=sets[-1], aux=sets[:-1], interm=interm, dn=dn_output)

    def _look_forward_twice(self, references: list[Tensor], hs: list[Tensor], ref0: Tensor | None) -> list[Tensor]:
        """Box of layer l = sigmoid(box_head(hs_l) + inverse_sigmoid(ref_l)), ref_l the UNdetached refinement
        of layer l-1, so layer l's box loss reaches layer l-1 (DINO)."""
        boxes = [] if ref0 is None else [ref0]
        for ref, h in zip(references[:-1], hs):
            boxes.append((self.box_head(h) + inverse_sigmoid(ref)).sigmoid())
        return boxes
