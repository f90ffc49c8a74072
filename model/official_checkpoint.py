"""Adapter for the authors' checkpoints (detectron2 format): official state-dict names -> ours.

Official files are `{"model": state_dict, ...}` or a bare state_dict, loaded with
`torch.load(weights_only=True)` only. What the adapter resolves (docs/model.md#state-dict-keys):
- aliases: the shared box head appears 19 times (`_bbox_embed`, `bbox_embed.{i}`, `decoder.bbox_embed.{i}`)
  and the decoder norm twice (`decoder_norm`, `decoder.norm`); copies must be identical and become one tensor;
- renames: `pixel_decoder.transformer.*` -> `pixel_decoder.encoder.*`, `adapter_k`/`layer_k` ->
  `lateral_convs.{k-1}`/`output_convs.{k-1}`, `_bbox_embed` -> `box_head`, `sem_seg_head.` dropped;
- backbone keys (FrozenBN buffers, Swin's downsample placement and per-level norms) via
  `model.backbone.official_backbone_key`; Swin's `relative_position_index` buffers are recomputed, not loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from model.backbone import official_backbone_key
from model.weights_file import CheckpointError, read_state_dict

_BOX_ALIAS = re.compile(r"^sem_seg_head\.predictor\.(?:decoder\.)?bbox_embed\.\d+\.(.+)$")
_NORM_ALIAS = re.compile(r"^sem_seg_head\.predictor\.decoder\.norm\.(.+)$")
_RENAMES = [
    (re.compile(r"^sem_seg_head\.pixel_decoder\.transformer\.level_embed$"), "pixel_decoder.encoder.level_embed"),
    (re.compile(r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(.+)$"), r"pixel_decoder.encoder.layers.\1"),
    (re.compile(r"^sem_seg_head\.pixel_decoder\.adapter_(\d+)\.(.+)$"), None),
    (re.compile(r"^sem_seg_head\.pixel_decoder\.layer_(\d+)\.(.+)$"), None),
    (re.compile(r"^sem_seg_head\.pixel_decoder\.((?:input_proj|mask_features)\..+)$"), r"pixel_decoder.\1"),
    (re.compile(r"^sem_seg_head\.predictor\._bbox_embed\.(.+)$"), r"predictor.box_head.\1"),
    (re.compile(r"^sem_seg_head\.predictor\.(.+)$"), r"predictor.\1"),
    (re.compile(r"^criterion\.empty_weight$"), "criterion.empty_weight"),
]
_RECOMPUTED = re.compile(r"(^|\.)relative_position_index$")


@dataclass
class Conversion:
    """Result of mapping an official state dict to our names."""

    state_dict: dict[str, Tensor]
    aliases_resolved: int = 0
    recomputed: list[str] = field(default_factory=list)  # official buffers we rebuild instead of loading
    unmatched: list[str] = field(default_factory=list)  # official keys with no counterpart here


def _rename(key: str) -> str | None:
    if key.startswith("backbone."):
        ours = official_backbone_key(key[len("backbone."):])
        return None if ours is None else "backbone." + ours
    for pattern, target in _RENAMES:
        m = pattern.match(key)
        if not m:
            continue
        if target is None:  # adapter_k / layer_k, 1-based in official names
            kind = "lateral_convs" if ".adapter_" in key else "output_convs"
            return f"pixel_decoder.{kind}.{int(m.group(1)) - 1}.{m.group(2)}"
        return m.expand(target)
    return None


def _canonical(key: str) -> str | None:
    """The official key an alias copies, or None if `key` is not an alias."""
    m = _BOX_ALIAS.match(key)
    if m:
        return "sem_seg_head.predictor._bbox_embed." + m.group(1)
    m = _NORM_ALIAS.match(key)
    if m:
        return "sem_seg_head.predictor.decoder_norm." + m.group(1)
    return None


def convert_official_state_dict(official: Mapping[str, Tensor]) -> Conversion:
    """Rename official keys to ours; aliased copies are checked equal and become one tensor."""
    official = {k.removeprefix("module."): v for k, v in official.items()}
    groups: dict[str, list[str]] = {}  # canonical official key -> every key storing that tensor
    for key in official:
        groups.setdefault(_canonical(key) or key, []).append(key)
    conv = Conversion(state_dict={})
    for canonical, keys in groups.items():
        value = official[canonical] if canonical in official else official[keys[0]]
        for key in keys:
            if not torch.equal(official[key], value):
                raise CheckpointError(f"{key} should be a copy of the shared {canonical} but differs; "
                                      "the checkpoint is not an official Mask DINO state_dict")
        conv.aliases_resolved += len(keys) - 1
        if _RECOMPUTED.search(canonical):
            conv.recomputed.append(canonical)
            continue
        ours = _rename(canonical)
        if ours is None:
            conv.unmatched.append(canonical)
        else:
            conv.state_dict[ours] = value
    return conv


@dataclass
class LoadReport:
    missing: list[str]  # our keys the checkpoint did not provide
    unmatched: list[str]  # official keys with no counterpart
    aliases_resolved: int
    recomputed: int

    def summary(self) -> str:
        return (f"loaded with {len(self.missing)} missing and {len(self.unmatched)} unmatched keys; "
                f"{self.aliases_resolved} aliased copies resolved, {self.recomputed} buffers recomputed")


def check_against(conv: Conversion, ours: Mapping[str, Tensor]) -> tuple[list[str], list[str]]:
    """Compare a conversion with our model's state dict: raises on a shape mismatch (naming the key and
    both shapes); returns (our keys missing from the checkpoint, checkpoint keys without a place here)."""
    for key, value in conv.state_dict.items():
        if key in ours and tuple(ours[key].shape) != tuple(value.shape):
            raise CheckpointError(f"shape mismatch for {key}: checkpoint {tuple(value.shape)} vs model "
                                  f"{tuple(ours[key].shape)} (wrong config for this checkpoint? check num_classes, "
                                  "num_queries and the backbone)")
    unmatched = conv.unmatched + [k for k in conv.state_dict if k not in ours]
    missing = [k for k in ours if k not in conv.state_dict]
    return missing, unmatched


def load_official_weights(model: nn.Module, official: Mapping[str, Tensor] | str | Path,
                          strict: bool = True) -> LoadReport:
    """Load an official state dict (or file) into our model.

    Shape mismatches always fail, naming the key and both shapes. With strict=True any missing or
    unmatched key fails too (listing the first few)."""
    state = read_state_dict(official) if isinstance(official, (str, Path)) else official
    conv = convert_official_state_dict(state)
    ours = model.state_dict()
    missing, unmatched = check_against(conv, ours)
    report = LoadReport(missing, unmatched, conv.aliases_resolved, len(conv.recomputed))
    if strict and (missing or unmatched):
        raise CheckpointError(f"checkpoint does not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
                              f", unmatched {unmatched[:5]}{'...' if len(unmatched) > 5 else ''} "
                              "(pass strict=False to load the rest)")
    loadable = {k: v for k, v in conv.state_dict.items() if k in ours}
    model.load_state_dict(loadable, strict=False)
    return report
