"""Loading the parity fixtures (made by running the authors' code, see tests/fixtures/parity/*/README.md)
into our model: the official config keys -> ModelConfig, a backbone that replays stored features, and the
official weights through our checkpoint adapter."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from model.backbone import BackboneConfig
from model.config import ModelConfig
from model.maskdino import MaskDINO
from model.official_checkpoint import load_official_weights
from model.pixel_decoder import PixelDecoderConfig
from model.postprocess import InferenceConfig
from model.predictor import DecoderConfig

PARITY = Path(__file__).parent / "fixtures" / "parity"
FEATURES = ("res2", "res3", "res4", "res5")


@dataclass
class Fixture:
    name: str
    effective: dict
    weights: dict[str, Tensor]
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    backbone_shapes: dict | None

    def geometry(self, key: str) -> tuple[int, int]:
        return tuple(int(v) for v in self.inputs[key])  # type: ignore[return-value]


def load_fixture(name: str) -> Fixture:
    d = PARITY / name
    cfg = json.loads((d / "config.json").read_text())
    with np.load(d / "weights.npz") as w:
        weights = {k: torch.from_numpy(w[k].copy()) for k in w.files}
    with np.load(d / "inputs.npz") as i:
        inputs = {k: i[k].copy() for k in i.files}
    with np.load(d / "outputs.npz") as o:
        outputs = {k: o[k].copy() for k in o.files}
    return Fixture(name, cfg["effective"], weights, inputs, outputs, cfg.get("fixture_backbone_shapes"))


class ReplayBackbone(nn.Module):
    """Stands in for the fixture's `FixtureFeatureBackbone`: ignores pixels, returns the stored features."""

    def __init__(self, features: dict[str, np.ndarray], shapes: dict):
        super().__init__()
        self.features = {k: torch.from_numpy(features[k]) for k in FEATURES}
        self.out_channels = {k: shapes[k]["channels"] for k in FEATURES}
        self.strides = {k: shapes[k]["stride"] for k in FEATURES}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return dict(self.features)


def model_config(fx: Fixture) -> ModelConfig:
    """The fixture's effective official config as our ModelConfig."""
    e = lambda k: fx.effective["MODEL." + k]
    backbone = BackboneConfig()
    if "MODEL.SWIN.EMBED_DIM" in fx.effective:
        backbone = BackboneConfig(name="swin", embed_dim=e("SWIN.EMBED_DIM"), depths=list(e("SWIN.DEPTHS")),
                                  num_heads=list(e("SWIN.NUM_HEADS")), window_size=e("SWIN.WINDOW_SIZE"),
                                  pretrain_img_size=e("SWIN.PRETRAIN_IMG_SIZE"), drop_path_rate=e("SWIN.DROP_PATH_RATE"))
    pixel = PixelDecoderConfig(
        conv_dim=e("SEM_SEG_HEAD.CONVS_DIM"), mask_dim=e("SEM_SEG_HEAD.MASK_DIM"),
        dim_feedforward=e("SEM_SEG_HEAD.DIM_FEEDFORWARD"), enc_layers=e("SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS"),
        in_features=list(e("SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES")),
        total_num_feature_levels=e("SEM_SEG_HEAD.TOTAL_NUM_FEATURE_LEVELS"),
        feature_order=e("SEM_SEG_HEAD.FEATURE_ORDER"), common_stride=e("SEM_SEG_HEAD.COMMON_STRIDE"),
        n_heads=e("MaskDINO.NHEADS"))
    decoder = DecoderConfig(
        hidden_dim=e("MaskDINO.HIDDEN_DIM"), num_queries=e("MaskDINO.NUM_OBJECT_QUERIES"),
        dec_layers=e("MaskDINO.DEC_LAYERS"), dim_feedforward=e("MaskDINO.DIM_FEEDFORWARD"),
        two_stage=e("MaskDINO.TWO_STAGE"), initial_pred=e("MaskDINO.INITIAL_PRED"),
        initialize_box_type=e("MaskDINO.INITIALIZE_BOX_TYPE"), dn=e("MaskDINO.DN"), dn_num=e("MaskDINO.DN_NUM"),
        dn_noise_scale=e("MaskDINO.DN_NOISE_SCALE"), learn_tgt=e("MaskDINO.LEARN_TGT"),
        semantic_ce_loss=e("MaskDINO.SEMANTIC_CE_LOSS"))
    test = lambda k: e("MaskDINO.TEST." + k)
    inference = InferenceConfig(
        instance_on=test("INSTANCE_ON"), panoptic_on=test("PANOPTIC_ON"), semantic_on=test("SEMANTIC_ON"),
        object_mask_threshold=test("OBJECT_MASK_THRESHOLD"), overlap_threshold=test("OVERLAP_THRESHOLD"),
        detections_per_image=fx.effective["TEST.DETECTIONS_PER_IMAGE"],
        pano_transform_eval=test("PANO_TRANSFORM_EVAL"), pano_temperature=test("PANO_TEMPERATURE"),
        focus_on_box=test("TEST_FOUCUS_ON_BOX"), semantic_ce_loss=e("MaskDINO.SEMANTIC_CE_LOSS"))
    return ModelConfig(num_classes=e("SEM_SEG_HEAD.NUM_CLASSES"), backbone=backbone, pixel_decoder=pixel,
                       decoder=decoder, inference=inference, pixel_mean=list(e("PIXEL_MEAN")),
                       pixel_std=list(e("PIXEL_STD")), size_divisibility=e("MaskDINO.SIZE_DIVISIBILITY"))


def build_fixture_model(fx: Fixture) -> MaskDINO:
    """Our model with the fixture's official weights loaded through the checkpoint adapter (strict)."""
    cfg = model_config(fx)
    backbone = ReplayBackbone(fx.inputs, fx.backbone_shapes) if fx.backbone_shapes else None
    model = MaskDINO(cfg, backbone=backbone)
    load_official_weights(model, fx.weights, strict=True)
    return model.eval()
