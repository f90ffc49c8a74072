"""Model-level commands: load a model config, build the model (with ImageNet backbone weights from a local
or s3:// path), describe it (`maskdino model-info`) and convert official checkpoints
(`maskdino convert-checkpoint`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from core.config import load_config
from core.storage import Storage, is_s3
from model.backbone import load_pretrained_backbone
from model.config import ModelConfig
from model.maskdino import MaskDINO
from model.official_checkpoint import check_against, convert_official_state_dict
from model.weights_file import read_state_dict


def load_model_config(path: str, overrides: Sequence[str] = ()) -> ModelConfig:
    return load_config(ModelConfig, path, list(overrides))


def read_weights(uri: str, storage: Storage) -> dict[str, torch.Tensor]:
    """A state dict from a local path or s3:// URI (.safetensors or a weights-only torch file)."""
    if not is_s3(uri):
        return read_state_dict(uri)
    return read_state_dict(storage.read_bytes(uri), name=uri)


def build_model(cfg: ModelConfig, device: str | torch.device, storage: Storage) -> MaskDINO:
    """The model with `backbone.pretrained` loaded if set (nothing is ever downloaded); `storage` reads
    it from a local path or s3://."""
    model = MaskDINO(cfg)
    if cfg.backbone.pretrained:
        load_pretrained_backbone(model.backbone, read_weights(cfg.backbone.pretrained, storage))
    return model.to(device)


@dataclass
class ModelInfo:
    params_by_module: dict[str, int]
    total_params: int
    trainable_params: int
    encoder_levels: list[str]
    decoder_levels: list[str]
    num_queries: int
    dn_num: int
    prediction_sets: int

    def lines(self) -> list[str]:
        width = max(len(k) for k in self.params_by_module)
        out = [f"{name:<{width}}  {n:>13,}" for name, n in self.params_by_module.items()]
        out.append(f"{'total':<{width}}  {self.total_params:>13,}  ({self.trainable_params:,} trainable)")
        out.append(f"encoder levels (token order): {', '.join(self.encoder_levels)}")
        out.append(f"decoder memory levels:        {', '.join(self.decoder_levels)}")
        out.append(f"queries: {self.num_queries} matching + up to {self.dn_num} denoising; "
                   f"{self.prediction_sets} supervised prediction sets")
        return out


def _encoder_strides(model) -> list[int]:
    pd = model.pixel_decoder
    backbone = [model.backbone.strides[f] for f in pd.transformer_in_features[::-1]]
    n_extra = pd.cfg.total_num_feature_levels - len(backbone)
    extra = [max(backbone) * 2 ** (i + 1) for i in range(n_extra)][::-1]
    return backbone + extra if pd.cfg.feature_order == "low2high" else extra + backbone


def model_info(cfg: ModelConfig) -> ModelInfo:
    """Parameter counts and geometry; the model is built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = MaskDINO(cfg)
    by_module = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    strides = _encoder_strides(model)
    d = cfg.decoder
    return ModelInfo(
        params_by_module=by_module,
        total_params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        encoder_levels=[f"1/{s}" for s in strides],
        decoder_levels=[f"1/{s}" for s in strides[::-1]],
        num_queries=d.num_queries,
        dn_num=d.dn_num if d.dn != "no" else 0,
        prediction_sets=d.dec_layers + int(d.initial_pred) + int(d.two_stage),
    )


@dataclass
class ConversionSummary:
    tensors: int
    aliases_resolved: int
    recomputed: int
    unmatched: list[str]
    missing: list[str]

    def line(self, out_path: str) -> str:
        text = (f"wrote {self.tensors} tensors to {out_path}; {self.aliases_resolved} aliased copies resolved, "
                f"{self.recomputed} recomputed buffers dropped")
        if self.unmatched:
            text += f"; {len(self.unmatched)} official keys without a counterpart: {', '.join(self.unmatched[:5])}"
        if self.missing:
            text += f"; {len(self.missing)} model keys not in the checkpoint: {', '.join(self.missing[:5])}"
        return text


def convert_checkpoint(in_path: str, out_path: str, cfg: ModelConfig | None = None) -> ConversionSummary:
    """Official .pth -> our safetensors. With a model config, shapes are checked against the model
    (a mismatch names the key and both shapes) and missing keys are reported."""
    conv = convert_official_state_dict(read_state_dict(in_path))
    missing: list[str] = []
    unmatched = list(conv.unmatched)
    if cfg is not None:
        with torch.device("meta"):
            ours = MaskDINO(cfg).state_dict()
        missing, unmatched = check_against(conv, ours)
    tensors = {k: v.detach().contiguous() for k, v in conv.state_dict.items()}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_path, metadata={"format": "maskdino-pipeline", "source": Path(in_path).name})
    return ConversionSummary(len(tensors), conv.aliases_resolved, len(conv.recomputed), unmatched, missing)
