"""Backbones (docs/model.md#backbone): timm ResNet-50 and Swin wrapped to return {"res2".."res5"}.

Both are built with ``timm.create_model(..., features_only=True, pretrained=False)`` and return a dict of
NCHW feature maps ``[B, C_l, H/s_l, W/s_l]`` for strides 4/8/16/32, for any input whose H and W are
divisible by 32 (the meta-arch normalises and pads images before calling the backbone).

* ResNet-50 = detectron2 R50 with STRIDE_IN_1X1=False (timm's ``resnet50`` already puts the stride in the
  3x3 conv), frozen BatchNorm (eps 1e-5, ``y = x * w * rsqrt(rv + eps) + (b - rm * scale)``, same as
  detectron2's FrozenBatchNorm2d) and detectron2's FREEZE_AT semantics.
* Swin = the Swin v1 detection code used by ``D2SwinTransformer`` (Mask2Former / Mask DINO). timm's
  ``SwinTransformer`` has the same parameters, but its blocks roll *before* padding to the window grid;
  the official code pads first and rolls the padded map. Every block therefore gets an official-order
  ``_attn`` (see ``_OfficialOrderSwinBlock``). Windows are never shrunk and the shift never dropped for
  small stages (``always_partition=True``); the shifted-window mask is built per input size
  (``strict_img_size=False`` -> timm's dynamic mask). Each output passes through a per-level LayerNorm
  (official ``norm0..norm3``), which timm does not have, so the wrapper adds them (``out_norms``).

Checkpoint names: ``official_backbone_key`` maps an official (detectron2 / D2SwinTransformer) backbone key,
without its ``backbone.`` prefix, to our ``Backbone.state_dict()`` key. The Swin buffer
``relative_position_index`` maps to None: timm keeps it as a non-persistent buffer computed from the
window size, so it is not in our state_dict; ``relative_position_index_matches`` checks an official one
against ours instead of loading it.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import timm
import torch
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from timm.models.swin_transformer import (
    SwinTransformerBlock,
    WindowAttention,
    window_partition,
    window_reverse,
)
from torch import Tensor, nn

from model.weights_file import unwrap_state_dict

FEATURE_NAMES: tuple[str, ...] = ("res2", "res3", "res4", "res5")
FEATURE_STRIDES: tuple[int, ...] = (4, 8, 16, 32)
# resnet50 is the official one; the smaller ones serve tiny test/demo configs.
RESNETS: tuple[str, ...] = ("resnet50", "resnet34", "resnet18")


@dataclass
class BackboneConfig:
    """Backbone choice and hyper-parameters (defaults = official Swin-L values / official R50 settings)."""

    name: str = "resnet50"  # "resnet50" | "swin" (| "resnet18", "resnet34" for tiny configs)
    # swin options
    embed_dim: int = 192
    depths: list[int] = field(default_factory=lambda: [2, 2, 18, 2])
    num_heads: list[int] = field(default_factory=lambda: [6, 12, 24, 48])
    window_size: int = 12
    pretrain_img_size: int = 384
    drop_path_rate: float = 0.3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    patch_size: int = 4
    # resnet options
    norm: str = "frozen_bn"  # "frozen_bn" (official COCO/ADE) | "bn"
    freeze_at: int = 0  # detectron2 FREEZE_AT: 0 nothing, 1 stem, k>=2 stem + res2..res_k
    pretrained: str = ""  # ImageNet weights path; read by the caller, then load_pretrained_backbone()


class Backbone(nn.Module):
    """A timm feature extractor (``self.body``) returning ``{"res2": [B,C2,H/4,W/4], ..., "res5": [B,C5,H/32,W/32]}``."""

    size_divisibility: int = 32

    def __init__(self, body: nn.Module, channels: list[int]) -> None:
        super().__init__()
        self.body = body
        self.out_channels: dict[str, int] = dict(zip(FEATURE_NAMES, channels))
        self.strides: dict[str, int] = dict(zip(FEATURE_NAMES, FEATURE_STRIDES))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images: [B,3,H,W] normalised, H and W divisible by 32 -> {name: [B,C,H/s,W/s]}."""
        return dict(zip(FEATURE_NAMES, self.body(images)))


# ----------------------------------------------------------------------------------------------------
# ResNet-50


class ResNetBackbone(Backbone):
    """timm ``resnet50`` (features_only, out_indices 1..4); stem = conv7x7 s2 + BN + ReLU + maxpool 3x3 s2."""

    def __init__(self, cfg: BackboneConfig) -> None:
        if cfg.norm not in ("frozen_bn", "bn"):
            raise ValueError(f"unknown resnet norm {cfg.norm!r} (expected 'frozen_bn' or 'bn')")
        # zero_init_last=False: timm would zero the last BN gamma of each block, which, once frozen, would
        # switch every residual branch off for good when training without pretrained weights.
        body = timm.create_model(
            cfg.name, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4), zero_init_last=False
        )
        if cfg.norm == "frozen_bn":
            body = freeze_batch_norm_2d(body)
        super().__init__(body, body.feature_info.channels())
        self._freeze(cfg.freeze_at)

    def _freeze(self, freeze_at: int) -> None:
        """detectron2 FREEZE_AT: >=1 freezes the stem, >=k (k>=2) also res2..res_k (no grads, frozen BN)."""
        if freeze_at < 0 or freeze_at > 5:
            raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
        if freeze_at >= 1:
            self.body.bn1 = freeze_batch_norm_2d(self.body.bn1)
            self.body.conv1.requires_grad_(False)
        for stage in range(2, freeze_at + 1):
            layer = getattr(self.body, f"layer{stage - 1}")
            freeze_batch_norm_2d(layer)  # converts children in place
            layer.requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# Swin


class _OfficialOrderSwinBlock(SwinTransformerBlock):
    """timm block whose window attention follows the official Swin detection order: pad, THEN roll.

    timm rolls the un-padded map and pads afterwards; the official code pads right/bottom with zeros to a
    multiple of the window first and rolls the padded map, so zero rows wrap to the top/left. The two differ
    whenever H or W is not a multiple of the window (e.g. stages of 56x72, 7x9 with window 12), so parity
    with official weights needs this order. Parameters and module names are timm's, untouched.
    """

    def _attn(self, x: Tensor) -> Tensor:
        """x: [B,H,W,C] (after norm1) -> [B,H,W,C]."""
        _, H, W, C = x.shape
        win_h, win_w = self.window_size
        x = F.pad(x, (0, 0, 0, (win_w - W % win_w) % win_w, 0, (win_h - H % win_h) % win_h))
        _, Hp, Wp, _ = x.shape
        has_shift = any(self.shift_size)
        mask = None
        if has_shift:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
            # mask on the padded (Hp, Wp) grid: slices (0,-ws), (-ws,-shift), (-shift,None), value -100
            mask = self.get_attn_mask(x)
        windows = window_partition(x, self.window_size).view(-1, self.window_area, C)
        windows = self.attn(windows, mask=mask).view(-1, win_h, win_w, C)
        x = window_reverse(windows, self.window_size, Hp, Wp)
        if has_shift:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x[:, :H, :W, :].contiguous()


class SwinBackbone(Backbone):
    """timm ``SwinTransformer`` (features_only) + official-order blocks + per-level output LayerNorms."""

    def __init__(self, cfg: BackboneConfig) -> None:
        if cfg.freeze_at != 0:
            raise ValueError("freeze_at is a ResNet option (official D2SwinTransformer freezes nothing)")
        body = timm.create_model(
            "swin_large_patch4_window12_384",  # only the class; every dim below overrides its defaults
            pretrained=False,
            features_only=True,
            embed_dim=cfg.embed_dim,
            depths=tuple(cfg.depths),
            num_heads=tuple(cfg.num_heads),
            window_size=cfg.window_size,
            patch_size=cfg.patch_size,
            img_size=cfg.pretrain_img_size,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias,
            drop_path_rate=cfg.drop_path_rate,  # linear over all blocks, as official
            strict_img_size=False,  # any input size; shifted-window mask built per forward
            always_partition=True,  # official keeps window and shift even when a stage is smaller
        )
        for module in body.modules():
            if type(module) is SwinTransformerBlock:
                module.__class__ = _OfficialOrderSwinBlock
        channels = body.feature_info.channels()
        super().__init__(body, channels)
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in channels)  # official norm0..norm3

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images: [B,3,H,W] normalised, H and W divisible by 32 -> {name: [B,C,H/s,W/s]}."""
        feats = self.body(images)  # stage outputs before the next downsample, NHWC
        return {
            name: norm(f).permute(0, 3, 1, 2).contiguous()
            for name, norm, f in zip(FEATURE_NAMES, self.out_norms, feats)
        }


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """Random-init backbone for ``cfg`` (``cfg.pretrained`` is read by the caller, see module docstring)."""
    if cfg.name in RESNETS:
        return ResNetBackbone(cfg)
    if cfg.name == "swin":
        return SwinBackbone(cfg)
    raise ValueError(f"unknown backbone {cfg.name!r} (expected one of {RESNETS + ('swin',)})")


# ----------------------------------------------------------------------------------------------------
# Official (detectron2 / D2SwinTransformer) key names

_R50_STEM = re.compile(r"stem\.conv1\.(weight|norm\.(?:weight|bias|running_mean|running_var))$")
_R50_BLOCK = re.compile(
    r"res([2-5])\.(\d+)\.(conv[123]|shortcut)\.(weight|norm\.(?:weight|bias|running_mean|running_var))$"
)
_SWIN_PATCH = re.compile(r"patch_embed\.((?:proj|norm)\.(?:weight|bias))$")
_SWIN_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_SWIN_DOWN = re.compile(r"layers\.(\d+)\.downsample\.((?:reduction|norm)\.(?:weight|bias))$")
_SWIN_OUT_NORM = re.compile(r"norm(\d+)\.(weight|bias)$")


def _r50_conv_key(conv: str, leaf: str) -> str:
    """('conv2', 'norm.bias') -> 'conv2.bn2' style suffix: 'conv2.weight' | 'bn2.bias'; shortcut -> downsample.{0,1}."""
    if conv == "shortcut":
        return "downsample.0.weight" if leaf == "weight" else "downsample.1." + leaf[len("norm.") :]
    if leaf == "weight":
        return f"{conv}.weight"
    return f"bn{conv[-1]}.{leaf[len('norm.'):]}"


def official_backbone_key(official_name: str) -> str | None:
    """Official backbone key without ``backbone.`` -> key in our ``Backbone.state_dict()``; None if none.

    R50: ``stem.conv1.*`` -> ``body.conv1`` / ``body.bn1``; ``res{k}.{i}.conv{j}`` -> ``body.layer{k-1}.{i}.conv{j}``
    (its ``.norm`` -> ``bn{j}``); ``res{k}.0.shortcut`` -> ``downsample.0`` (``.norm`` -> ``downsample.1``).
    Swin: ``layers.{i}.blocks.*`` -> ``body.layers_{i}.blocks.*``; official ``layers.{i}.downsample`` (end of
    stage i) -> ``body.layers_{i+1}.downsample`` (timm merges at the start of the next stage);
    ``norm{i}`` -> ``out_norms.{i}``; ``relative_position_index`` -> None (not persistent in timm).
    """
    if m := _R50_STEM.match(official_name):
        leaf = m.group(1)
        return "body.conv1.weight" if leaf == "weight" else "body.bn1." + leaf[len("norm.") :]
    if m := _R50_BLOCK.match(official_name):
        stage, block, conv, leaf = m.groups()
        return f"body.layer{int(stage) - 1}.{block}.{_r50_conv_key(conv, leaf)}"
    if m := _SWIN_PATCH.match(official_name):
        return "body.patch_embed." + m.group(1)
    if m := _SWIN_BLOCK.match(official_name):
        stage, block, rest = m.groups()
        if rest.endswith("relative_position_index"):
            return None
        return f"body.layers_{stage}.blocks.{block}.{rest}"
    if m := _SWIN_DOWN.match(official_name):
        return f"body.layers_{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    if m := _SWIN_OUT_NORM.match(official_name):
        return f"out_norms.{m.group(1)}.{m.group(2)}"
    return None


def relative_position_index_matches(official: Tensor, backbone: Backbone) -> bool:
    """True iff the official ``relative_position_index`` [ws*ws, ws*ws] equals every block's computed one."""
    indices = [m.relative_position_index for m in backbone.modules() if isinstance(m, WindowAttention)]
    return bool(indices) and all(
        idx.shape == official.shape and torch.equal(idx.cpu(), official.cpu().long()) for idx in indices
    )


# ----------------------------------------------------------------------------------------------------
# ImageNet weights

# Keys a classification checkpoint may carry that have no place in a backbone: classifier heads, Swin's
# final norm (we use norm0..3 instead), non-persistent buffers, BN batch counters (absent in FrozenBN).
_DROPPABLE = re.compile(
    r"^(fc|head)\.|^norm\.(weight|bias)$|relative_position_index$|attn_mask$|num_batches_tracked$"
)


def _is_official_format(keys: set[str]) -> bool:
    """detectron2 R50 (``stem.*``) or Microsoft/D2 Swin (merge at the end of a stage: ``layers.0.downsample``)."""
    return "stem.conv1.weight" in keys or any(k.startswith("layers.0.downsample.") for k in keys)


def _timm_key(name: str) -> str:
    """timm/torchvision classification key -> our key (features_only flattens ``layers.i`` to ``layers_i``)."""
    return "body." + re.sub(r"^layers\.(\d+)\.", r"layers_\1.", name)


def load_pretrained_backbone(backbone: Backbone, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Load ImageNet weights into ``backbone``; return our state_dict keys the checkpoint did not provide.

    Accepts timm-format state_dicts (= torchvision format for ResNet-50), and also official-format ones
    (detectron2 R50, Microsoft / D2 Swin), recognised by their key names. Classifier heads and other
    ``_DROPPABLE`` keys are ignored; any other key without a counterpart raises ValueError, as does a shape
    mismatch (message names both keys and both shapes). ``num_batches_tracked`` is not reported missing.
    """
    state_dict = {k.removeprefix("module."): v for k, v in unwrap_state_dict(state_dict).items()}
    to_ours = official_backbone_key if _is_official_format(set(state_dict)) else _timm_key
    ours = backbone.state_dict()
    mapped: dict[str, Tensor] = {}
    for name, value in state_dict.items():
        key = to_ours(name)
        if key is None or key not in ours:
            if _DROPPABLE.search(name):
                continue
            raise ValueError(f"pretrained key {name!r} has no counterpart in the backbone (mapped to {key!r})")
        value = torch.as_tensor(value)
        if tuple(value.shape) != tuple(ours[key].shape):
            raise ValueError(
                f"shape mismatch for pretrained key {name!r} -> {key!r}: "
                f"checkpoint {tuple(value.shape)} vs model {tuple(ours[key].shape)}"
            )
        mapped[key] = value
    backbone.load_state_dict(mapped, strict=False)
    return [k for k in ours if k not in mapped and not k.endswith("num_batches_tracked")]
