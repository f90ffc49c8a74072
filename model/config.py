"""The model's typed config: one dataclass tree whose defaults are the official R50 COCO instance values
(configs/model/*.yaml override per task and backbone). Loaded through pipeline.config like every run config."""

from __future__ import annotations

from dataclasses import dataclass, field

from model.backbone import BackboneConfig
from model.matcher import MatcherConfig
from model.pixel_decoder import PixelDecoderConfig
from model.postprocess import InferenceConfig
from model.predictor import DecoderConfig


@dataclass
class LossSettings:
    """Loss weights and options (MODEL.MaskDINO.*_WEIGHT etc.); the criterion's derived fields (classes,
    DN mode, layers) come from the rest of the model config."""

    class_weight: float = 4.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    box_weight: float = 5.0
    giou_weight: float = 2.0
    no_object_weight: float = 0.1
    focal_alpha: float = 0.25
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    box_loss: bool = True
    # The paper's decoupled box prediction: no box loss and no box matching cost for stuff classes
    # (labels >= num_thing_classes; official PANO_BOX_LOSS; off in every released config).
    stuff_box_loss_masked: bool = False
    num_thing_classes: int = 80
    # False = detection-only (Objects365 pretraining): no mask losses and no mask targets.
    mask_losses: bool = True
    deep_supervision: bool = True


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
    msda_backend: str = "auto"
