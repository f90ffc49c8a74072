"""Parameter groups, LR schedule and the DeepSpeed engine: the learning rate and weight decay actually
applied to a backbone weight, a norm weight and a head weight are the official ones."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from model.maskdino import MaskDINO
from pipeline.model_tools import load_model_config
from pipeline.parallelize import (
    EngineConfig,
    OptimConfig,
    ScheduleConfig,
    build_optimizer,
    applied_hyperparams,
    build_scheduler,
    deepspeed_config,
    lr_factor,
    param_groups,
)

# (parameter, lr multiplier, weight decay) per the official build_optimizer (docs/model.md#optimizer)
PROBES = [
    ("backbone.body.patch_embed.proj.weight", 0.1, 0.05),                         # backbone conv
    ("backbone.body.layers_0.blocks.0.norm1.weight", 0.1, 0.0),                   # backbone LayerNorm
    ("backbone.body.layers_0.blocks.0.attn.relative_position_bias_table", 0.1, 0.0),  # Swin position table
    ("predictor.class_embed.weight", 1.0, 0.05),                                  # head linear
    ("predictor.decoder_norm.weight", 1.0, 0.0),                                  # head LayerNorm
    ("predictor.label_enc.weight", 1.0, 0.0),                                     # nn.Embedding (DN labels)
    ("pixel_decoder.input_proj.0.1.weight", 1.0, 0.0),                            # GroupNorm
]


@pytest.fixture(scope="module")
def tiny_model() -> MaskDINO:
    torch.manual_seed(0)
    return MaskDINO(load_model_config("configs/model/tiny_instance.yaml"))


def _applied(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """(lr, weight_decay) that the torch optimizer applies to each named parameter, by tensor identity."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]
            if id(p) in names}


def test_param_groups_follow_the_official_rules(tiny_model):
    names = dict(tiny_model.named_parameters())
    for probe, *_ in PROBES:
        assert probe in names, probe  # the probes name real parameters
    applied = _applied(build_optimizer(tiny_model, OptimConfig()), tiny_model)
    for probe, multiplier, decay in PROBES:
        assert applied[probe] == pytest.approx((1e-4 * multiplier, decay)), probe
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert set(applied) == trainable  # every trainable tensor exactly once
    assert applied_hyperparams(build_optimizer(tiny_model, OptimConfig()), tiny_model, OptimConfig()) == applied
    groups = param_groups(tiny_model, OptimConfig())
    assert [g.name for g in groups] == ["backbone", "backbone_no_decay", "head", "head_no_decay"]


def test_warmup_multistep_factors_match_detectron2_by_hand():
    cfg = ScheduleConfig(max_steps=30, milestones=[10, 20], gamma=0.1, warmup_steps=5, warmup_factor=0.001)
    # linear warmup: factor = 0.001 * (1 - s/5) + s/5
    assert lr_factor(0, cfg) == pytest.approx(0.001)
    assert lr_factor(1, cfg) == pytest.approx(0.001 * 0.8 + 0.2)
    assert lr_factor(5, cfg) == 1.0
    assert lr_factor(9, cfg) == 1.0
    assert lr_factor(10, cfg) == pytest.approx(0.1)  # bisect_right: the milestone step itself decays
    assert lr_factor(20, cfg) == pytest.approx(0.01)
    constant = ScheduleConfig(milestones=[], warmup_steps=3, warmup_factor=0.25, warmup_method="constant")
    assert [lr_factor(s, constant) for s in range(5)] == [0.25, 0.25, 0.25, 1.0, 1.0]


def test_scheduler_keeps_the_backbone_multiplier_per_group(tiny_model):
    optimizer = build_optimizer(tiny_model, OptimConfig())
    scheduler = build_scheduler(optimizer, ScheduleConfig(milestones=[2], warmup_steps=0))
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    applied = _applied(optimizer, tiny_model)
    assert applied["predictor.class_embed.weight"][0] == pytest.approx(1e-5)
    assert applied["backbone.body.patch_embed.proj.weight"][0] == pytest.approx(1e-6)


def test_deepspeed_config_carries_the_official_clipping_and_batch():
    cfg = deepspeed_config(EngineConfig(zero_stage=3, precision="bf16", micro_batch_size=2, grad_accumulation=4),
                           OptimConfig(), world_size=2)
    assert cfg["gradient_clipping"] == 0.01 and cfg["zero_optimization"] == {"stage": 3}
    assert cfg["train_batch_size"] == 16 and cfg["bf16"] == {"enabled": False}  # bf16 = autocast, fp32 weights
    with pytest.raises(ValueError, match="zero_stage must be one of"):
        EngineConfig(zero_stage=4)


def _engine_rank(rank: int, out: str, stage: int) -> None:
    import torch.distributed as dist

    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{out}.init", rank=0, world_size=1)
    try:
        from pipeline.parallelize import applied_hyperparams, build_engine

        torch.manual_seed(0)
        model = MaskDINO(load_model_config("configs/model/tiny_instance.yaml"))
        engine, optimizer, scheduler = build_engine(
            model, OptimConfig(), ScheduleConfig(milestones=[1], warmup_steps=0), EngineConfig(zero_stage=stage), 1)
        before = applied_hyperparams(optimizer, engine.module, OptimConfig())
        images = [torch.rand(3, 64, 64) * 255]
        from model.structures import Targets

        targets = [Targets(torch.tensor([1]), torch.tensor([[0.5, 0.5, 0.4, 0.4]]), torch.zeros(1, 64, 64, dtype=torch.bool))]
        targets[0].masks[0, 20:44, 20:44] = True
        for _ in range(2):
            loss = sum(engine(images, targets).values())
            engine.backward(loss)
            engine.step()
        after = applied_hyperparams(optimizer, engine.module, OptimConfig())
        Path(out).write_text(json.dumps({"before": {p: before[p] for p, *_ in PROBES},
                                         "after": {p: after[p] for p, *_ in PROBES}}))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_engine_applies_the_group_lrs_and_decays(tmp_path, stage):
    out = str(tmp_path / "applied.json")
    torch.multiprocessing.spawn(_engine_rank, args=(out, stage), nprocs=1)
    applied = json.loads(Path(out).read_text())
    for probe, multiplier, decay in PROBES:
        assert applied["before"][probe] == pytest.approx([1e-4 * multiplier, decay]), probe
        # two engine steps passed milestone 1: x0.1, per group
        assert applied["after"][probe] == pytest.approx([1e-5 * multiplier, decay]), probe
