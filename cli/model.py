"""Model commands: `model-info` (parameters and geometry of a model config) and `convert-checkpoint`
(the authors' detectron2 .pth -> our safetensors names)."""
from __future__ import annotations

import argparse

from cli.args import add_command, add_overrides


def add_model_info(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "model-info", "parameter count per top-level module and in total, feature levels and query "
                    "counts of a model config",
                    details=["The model is built on the meta device: no weights are allocated or needed."],
                    required="CONFIG, a model config (configs/model/*.yaml)",
                    example="maskdino model-info configs/model/swinl_instance.yaml num_classes=365")
    p.add_argument("config", help="model config YAML (configs/model/*.yaml)")
    add_overrides(p, "config overrides", "num_classes=365")
    p.set_defaults(run=run_model_info)


def run_model_info(args: argparse.Namespace) -> int:
    from pipeline.model_tools import load_model_config, model_info  # heavy: torch

    info = model_info(load_model_config(args.config, args.overrides))
    print(f"{args.config}:")
    for line in info.lines():
        print(f"  {line}")
    return 0


def add_convert_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "convert-checkpoint", "convert an official Mask DINO .pth (detectron2 format) to our "
                    "safetensors names",
                    details=[("With --config the converted weights are checked against the model's shapes and the "
                              "keys it misses are reported.")],
                    required="INPUT (the authors' .pth) and OUTPUT (.safetensors path)",
                    example="maskdino convert-checkpoint model_final.pth weights/swinl_instance.safetensors "
                            "--config configs/model/swinl_instance.yaml")
    p.add_argument("input", help="official checkpoint (.pth: {'model': state_dict} or a bare state_dict)")
    p.add_argument("output", help="output .safetensors path")
    p.add_argument("--config", default="", help="model config to check shapes against and report missing keys")
    p.set_defaults(run=run_convert_checkpoint)


def run_convert_checkpoint(args: argparse.Namespace) -> int:
    from pipeline.model_tools import convert_checkpoint, load_model_config  # heavy: torch, safetensors

    cfg = load_model_config(args.config) if args.config else None
    summary = convert_checkpoint(args.input, args.output, cfg)
    print(summary.line(args.output))
    return 0
