"""The model's typed config: one dataclass tree whose defaults are the official R50 COCO instance values
(configs/model/*.yaml override per task and backbone). Loaded through core.config like every run config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from model.backbone import BackboneConfig
from model.criterion import LossSettings
from model.matcher import MatcherConfig
from model.pixel_decoder import PixelDecoderConfig
from model.postprocess import InferenceConfig
from model.predictor import DecoderConfig

# Multi-scale deformable attention kernels (model/msda_dispatch.py BACKENDS).
MsdaBackend = Literal["auto", "reference", "cpp", "cuda"]


@dataclass
class ModelConfig:
    num_classes: int = 80
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossSettings = field(default_factory=LossSettings)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    size_divisibility: int = 32
    # Contiguous ids of the thing classes (panoptic post-processing keeps only these as instances).
    thing_classes: list[int] = field(default_factory=list)
    # Multi-scale deformable attention kernels: auto | cpp | cuda | reference.
    msda_backend: MsdaBackend = "auto"
