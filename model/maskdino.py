"""Mask DINO, composed: normalise and pad images, backbone -> pixel decoder -> decoder head; losses in
training, post-processed instance / panoptic / semantic results in eval (docs/model.md#composition and docs/model.md#post-processing).

Composition only: every part lives in its own module. No devices are chosen here (they follow the
inputs) and nothing distributed happens: `num_masks` is averaged across ranks by the trainer.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.backbone import Backbone, build_backbone
from model.config import ModelConfig
from model.criterion import LossConfig, SetCriterion
from model.matcher import HungarianMatcher, MatcherConfig
from model.ms_deform_attn import set_msda_backend
from model.pixel_decoder import PixelDecoder
from model.postprocess import postprocess_image
from model.predictor import MaskDINOPredictor
from model.structures import EncoderOutput, HeadOutput, ImageResult, Targets


def loss_config(cfg: ModelConfig) -> LossConfig:
    """The criterion's config: loss settings plus what the rest of the model config implies."""
    return LossConfig(**asdict(cfg.loss), num_classes=cfg.num_classes, semantic_ce_loss=cfg.decoder.semantic_ce_loss,
                      dn=cfg.decoder.dn, two_stage=cfg.decoder.two_stage, dec_layers=cfg.decoder.dec_layers)


def matcher_config(cfg: ModelConfig) -> MatcherConfig:
    """The matcher's config; `loss.stuff_box_loss_masked` (decoupled box prediction) also drops stuff box
    costs from matching, so one option switches the paper's variant on."""
    if not cfg.loss.stuff_box_loss_masked:
        return cfg.matcher
    return replace(cfg.matcher, stuff_box_cost_masked=True, num_thing_classes=cfg.loss.num_thing_classes)


class MaskDINO(nn.Module):
    """backbone + pixel_decoder + predictor (+ criterion, whose only state is `empty_weight`)."""

    def __init__(self, cfg: ModelConfig, backbone: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.backbone: Backbone = backbone if backbone is not None else build_backbone(cfg.backbone)
        self.pixel_decoder = PixelDecoder(cfg.pixel_decoder, self.backbone.out_channels, self.backbone.strides)
        self.predictor = MaskDINOPredictor(cfg.decoder, cfg.num_classes, cfg.pixel_decoder.conv_dim,
                                           cfg.pixel_decoder.mask_dim, cfg.pixel_decoder.total_num_feature_levels)
        losses = loss_config(cfg)
        self.criterion = SetCriterion(losses, HungarianMatcher(matcher_config(cfg)))
        set_msda_backend(self, cfg.msda_backend)  # this model's kernels; the process-wide default stays
        # Post-processing must read the class logits the way they were trained (softmax CE with a no-object
        # column, or sigmoid focal): that follows the decoder, whatever the inference section says.
        self.inference_cfg = replace(cfg.inference, semantic_ce_loss=cfg.decoder.semantic_ce_loss)
        # Not persistent: official checkpoints do not carry them either.
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(-1, 1, 1), persistent=False)

    def preprocess(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Raw RGB images [3, h, w] (0..255) -> normalised batch zero-padded to a multiple of
        size_divisibility [B, 3, H, W], and the un-padded sizes (padding comes after normalisation, as
        detectron2's ImageList)."""
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        d = self.cfg.size_divisibility
        h = -(-max(s[0] for s in sizes) // d) * d
        w = -(-max(s[1] for s in sizes) // d) * d
        batch = self.pixel_mean.new_zeros((len(images), 3, h, w))
        for i, im in enumerate(images):
            batch[i, :, : sizes[i][0], : sizes[i][1]] = (im.to(batch) - self.pixel_mean) / self.pixel_std
        return batch, sizes

    def forward_features(self, batch: Tensor, targets: list[Targets] | None = None
                         ) -> tuple[HeadOutput, EncoderOutput]:
        """Normalised padded batch [B, 3, H, W] -> head outputs and pixel-decoder outputs."""
        features = self.backbone(batch)
        encoded = self.pixel_decoder(features)
        head = self.predictor(encoded.multi_scale, encoded.mask_features, targets)
        return head, encoded

    def forward(self, images: list[Tensor], targets: list[Targets] | None = None,
                num_masks: float | None = None, output_sizes: list[tuple[int, int]] | None = None):
        """Training: weighted losses (dict name -> scalar). Eval: one ImageResult per image."""
        if self.training:
            if targets is None:
                raise ValueError("training needs targets")
            return self.losses(images, targets, num_masks)
        return self.predict(images, output_sizes)

    def losses(self, images: list[Tensor], targets: list[Targets], num_masks: float | None = None
               ) -> dict[str, Tensor]:
        """Weighted loss terms; terms absent from the weight dict are dropped (official behaviour).

        targets: boxes normalised cxcywh w.r.t. each un-padded image; masks at the image size or the padded
        size (padded here). num_masks: total GT masks averaged over ranks (default: this batch's count)."""
        batch, _ = self.preprocess(images)
        targets = [self._pad_target(t, batch.shape[-2:]) for t in targets]
        if num_masks is None:
            num_masks = max(float(sum(len(t) for t in targets)), 1.0)
        head, _ = self.forward_features(batch, targets)
        raw = self.criterion(head, targets, num_masks)
        weights = self.criterion.weight_dict
        return {k: v * weights[k] for k, v in raw.items() if k in weights}

    @staticmethod
    def _pad_target(t: Targets, padded_hw: torch.Size) -> Targets:
        if t.masks is None or tuple(t.masks.shape[-2:]) == tuple(padded_hw):
            return t
        h, w = t.masks.shape[-2:]
        masks = F.pad(t.masks, (0, int(padded_hw[1]) - w, 0, int(padded_hw[0]) - h))
        return Targets(t.labels, t.boxes, masks)

    @torch.no_grad()
    def predict(self, images: list[Tensor], output_sizes: list[tuple[int, int]] | None = None) -> list[ImageResult]:
        """Raw images -> results at `output_sizes` (default: each image's own size)."""
        batch, sizes = self.preprocess(images)
        head, _ = self.forward_features(batch)
        outs = output_sizes or sizes
        padded = (int(batch.shape[-2]), int(batch.shape[-1]))
        thing = set(self.cfg.thing_classes) if self.cfg.thing_classes else None
        return [
            postprocess_image(head.final.logits[i], head.final.masks[i], head.final.boxes[i], padded, sizes[i],
                              outs[i], self.inference_cfg, thing)
            for i in range(len(images))
        ]

