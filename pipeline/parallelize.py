"""Everything that wraps the model for training, in one place: parameter groups, optimizer, LR schedule
and the DeepSpeed engine. The model code never sees any of it.

Order (each step needs the previous one): model on its device -> parameter groups (need module types
and names) -> torch AdamW over the groups -> LambdaLR (per-group LRs survive; DeepSpeed's WarmupLR
would set every group to one LR and lose the backbone's x0.1) -> `deepspeed.initialize` with ZeRO stage,
micro-batch, accumulation and full-model gradient clipping from config (precision is autocast in the trainer).

Parameter groups follow the official `build_optimizer` (docs/model.md#optimizer): lr x backbone_multiplier for any
module whose name contains "backbone"; weight decay 0 for norm layers, nn.Embedding, and Swin's
`relative_position_bias_table` / `absolute_pos_embed`; biases keep weight decay (BIAS_LR_FACTOR 1, no
bias exemption). The official code makes one group per tensor; tensors with equal (lr, weight decay)
are merged here, which changes nothing in AdamW's maths.
"""
from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from core.config import InvalidValue

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm)
NO_DECAY_PARAM_NAMES = ("relative_position_bias_table", "absolute_pos_embed")
ZERO_STAGES = (0, 1, 2, 3)
Precision = Literal["fp32", "bf16"]
WarmupMethod = Literal["linear", "constant"]


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    backbone_multiplier: float = 0.1
    weight_decay_norm: float = 0.0
    weight_decay_embed: float = 0.0
    clip_grad_norm: float = 0.01  # official CLIP_TYPE full_model, CLIP_VALUE 0.01 (L2 over all parameters)


@dataclass(frozen=True)
class ScheduleConfig:
    """detectron2 WarmupMultiStepLR: factor = warmup(step) x gamma ** (number of milestones <= step)."""

    max_steps: int = 368_750
    milestones: list[int] = field(default_factory=lambda: [327_778, 355_092])
    gamma: float = 0.1
    warmup_steps: int = 10
    warmup_factor: float = 1.0  # official: 1.0, i.e. no warmup in effect
    warmup_method: WarmupMethod = "linear"


@dataclass(frozen=True)
class EngineConfig:
    zero_stage: int = 2
    # fp32, or bf16: the official AMP recipe with bfloat16 (no loss scaling needed): the forward runs
    # under torch.autocast while weights, gradients and optimizer state stay fp32; the pixel-decoder
    # encoder, decoder layers and matcher turn autocast off themselves, as the official code does.
    precision: Precision = "fp32"
    micro_batch_size: int = 2  # per rank
    grad_accumulation: int = 1

    def __post_init__(self) -> None:
        if self.zero_stage not in ZERO_STAGES:
            raise InvalidValue("zero_stage", self.zero_stage, f"one of {ZERO_STAGES}")
        if self.micro_batch_size < 1:
            raise InvalidValue("micro_batch_size", self.micro_batch_size, ">= 1 (samples per rank and micro-batch)")
        if self.grad_accumulation < 1:
            raise InvalidValue("grad_accumulation", self.grad_accumulation, ">= 1 (micro-batches per step)")


@dataclass(frozen=True)
class ParamGroup:
    """Tensors sharing one (lr multiplier, weight decay); `name` is for logs ("backbone", "head_no_decay")."""

    name: str
    lr_multiplier: float
    weight_decay: float
    param_names: list[str]


def _decay_for(module: nn.Module, param_name: str, cfg: OptimConfig) -> float:
    if isinstance(module, NORM_TYPES):
        return cfg.weight_decay_norm
    if isinstance(module, nn.Embedding):
        return cfg.weight_decay_embed
    if any(n in param_name for n in NO_DECAY_PARAM_NAMES):
        return 0.0
    return cfg.weight_decay


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[ParamGroup]:
    """The official per-tensor hyper-parameters, merged into groups of equal (lr multiplier, decay).
    Frozen tensors are left out; a tensor shared by several modules counts once (first name)."""
    groups: dict[tuple[float, float], ParamGroup] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            in_backbone = "backbone" in module_name
            lr_mult = cfg.backbone_multiplier if in_backbone else 1.0
            decay = _decay_for(module, param_name, cfg)
            key = (lr_mult, decay)
            if key not in groups:
                label = ("backbone" if in_backbone else "head") + ("" if decay else "_no_decay")
                groups[key] = ParamGroup(label, lr_mult, decay, [])
            groups[key].param_names.append(f"{module_name}.{param_name}" if module_name else param_name)
    return sorted(groups.values(), key=lambda g: g.name)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """torch AdamW over the groups; each torch group carries `name` and `lr_multiplier` for logging."""
    params = dict(model.named_parameters())
    torch_groups = [{"params": [params[n] for n in g.param_names], "lr": cfg.lr * g.lr_multiplier,
                     "weight_decay": g.weight_decay, "name": g.name, "lr_multiplier": g.lr_multiplier}
                    for g in param_groups(model, cfg)]
    return torch.optim.AdamW(torch_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: ScheduleConfig) -> float:
    """detectron2 WarmupMultiStepLR's multiplier at `step` (0-based)."""
    warmup = 1.0
    if step < cfg.warmup_steps:
        if cfg.warmup_method == "constant":
            warmup = cfg.warmup_factor
        else:
            alpha = step / cfg.warmup_steps
            warmup = cfg.warmup_factor * (1 - alpha) + alpha
    return warmup * cfg.gamma ** bisect.bisect_right(sorted(cfg.milestones), step)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    if cfg.warmup_method not in ("linear", "constant"):
        raise ValueError(f"warmup_method must be linear or constant, got {cfg.warmup_method!r}")
    factor: Callable[[int], float] = lambda step: lr_factor(step, cfg)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def deepspeed_config(engine: EngineConfig, optim: OptimConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config; the optimizer and scheduler are passed as objects, not named here."""
    return {
        "train_batch_size": engine.micro_batch_size * engine.grad_accumulation * world_size,
        "train_micro_batch_size_per_gpu": engine.micro_batch_size,
        "gradient_accumulation_steps": engine.grad_accumulation,
        "gradient_clipping": optim.clip_grad_norm,
        "zero_optimization": {"stage": engine.zero_stage},
        # bf16 is autocast in the trainer, not DeepSpeed's bf16 mode (bf16 weights and gradients).
        "bf16": {"enabled": False},
        "steps_per_print": 1 << 30,  # our logger reports; DeepSpeed's own prints would interleave
        "wall_clock_breakdown": False,
    }


# Saved with every checkpoint so DeepSpeed's ds_to_universal can convert it for another world size.
UNIVERSAL_CHECKPOINT_INFO = {"universal_checkpoint_version": 0.2}


class _DropNoCudaNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def quiet_cuda_probe_on_cpu() -> None:
    """deepspeed imports torch.utils.cpp_extension, which logs "No CUDA runtime is found" on a machine
    without a GPU: a warning about nothing a CPU run needs, printed on the stderr that a user reads for
    our one-line errors. Dropped there only; on a GPU machine nothing changes."""
    if torch.cuda.is_available():
        return
    probe_log = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _DropNoCudaNotice) for f in probe_log.filters):
        probe_log.addFilter(_DropNoCudaNotice())


def build_engine(model: nn.Module, optim: OptimConfig, schedule: ScheduleConfig, engine: EngineConfig,
                 world_size: int, load_universal: bool = False):
    """(DeepSpeed engine, its optimizer, its LR scheduler). The process group must exist already.
    load_universal: the checkpoint to be loaded is a universal one (written at another world size)."""
    quiet_cuda_probe_on_cpu()
    # deepspeed takes seconds to import: loading a train config (which imports this module) must not
    import deepspeed

    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, schedule)
    config = deepspeed_config(engine, optim, world_size)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    model.universal_checkpoint_info = dict(UNIVERSAL_CHECKPOINT_INFO)
    ds_engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False)
    return ds_engine, ds_optimizer, ds_scheduler


def applied_hyperparams(optimizer: torch.optim.Optimizer, model: nn.Module, cfg: OptimConfig
                        ) -> dict[str, tuple[float, float]]:
    """(lr, weight decay) the optimizer currently applies to each trainable parameter, by name.

    Matched through the group `name`: ZeRO optimizers keep the torch groups' keys but hold flattened
    partitions instead of the model's tensors, so a lookup by tensor identity would find nothing."""
    by_group = {g["name"]: (float(g["lr"]), float(g["weight_decay"])) for g in optimizer.param_groups}
    return {name: by_group[group.name] for group in param_groups(model, cfg) for name in group.param_names}
