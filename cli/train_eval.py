"""Model runs: `train` (DeepSpeed on a shard manifest), `evaluate` (COCO AP, PQ or mIoU on a shard
manifest) and `predict` (pictures of what a model finds in images)."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cli.args import add_command, add_model_args, add_overrides, comma_list, storage_from
from core.storage import Storage
from pipeline.eval_settings import EvalSettings

if TYPE_CHECKING:
    from pipeline.model_bundle import ModelBundle


# ---------------------------------------------------------------- train
def add_train(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "train", "train or fine-tune with DeepSpeed on a shard manifest; one process here, several "
                    "under a distributed launcher with the same arguments",
                    details=[("run_dir is required: where checkpoints/, metrics.jsonl and the exported model/ go (a "
                              "local folder or an s3:// prefix); set it in CONFIG or as the override run_dir=PATH. A "
                              "run_dir that already has a complete checkpoint is resumed from it (resume=auto)."),
                             ("--dry-run checks the config, that the manifest is readable and its categories match "
                              "model.num_classes, the checkpoint to resume, that init_from is a model bundle and that "
                              "run_dir can be written (the bucket exists), then prints what would be trained: no "
                              "process group, no model, nothing written."),
                             ("Several processes: torchrun --nproc-per-node 8 -m cli train CONFIG ..., or deepspeed "
                              "--num_gpus 8 --module cli train CONFIG ...")],
                    required="CONFIG (configs/train/*.yaml); run_dir and data.manifest, in CONFIG or as overrides",
                    example="maskdino train configs/train/tiny_instance.yaml run_dir=demo_out/runs/tiny_instance "
                            "data.manifest=demo_out/shards/coco_instances/train/manifest.json")
    p.add_argument("config", help="run config (configs/train/*.yaml)")
    add_overrides(p, "config overrides", "schedule.max_steps=100 data.manifest=s3://bucket/shards/manifest.json")
    p.add_argument("--dry-run", action="store_true", help="check the config, the manifest, the checkpoint to resume, "
                                                          "init_from and run_dir, print what would be trained; "
                                                          "train and write nothing")
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from pipeline.train_config import load_train_config  # heavy: torch
    from pipeline.train_dry_run import check_training  # heavy: torch, deepspeed
    from pipeline.trainer import train  # heavy: torch, deepspeed

    cfg = load_train_config(args.config, args.overrides)
    if args.dry_run:
        print("\n".join(check_training(cfg, Storage(cfg.storage)).lines()))
        return 0
    result = train(cfg, Storage(cfg.storage))
    if result.rank == 0:
        stats = result.loader_stats
        print(f"trained {result.steps} steps into {result.run_dir}; last checkpoint "
              f"{result.checkpoints[-1] if result.checkpoints else 'none'}; model {result.bundle or 'not exported'}; "
              f"samples {stats.samples}, undecodable skipped {stats.skipped_undecodable}, "
              f"shard retries {stats.shard_retries}, shards skipped {stats.shards_skipped}")
    return 0


# ---------------------------------------------------------------- evaluate
def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "evaluate", "evaluate a model on a shard manifest: COCO AP, PQ or mIoU by the manifest's "
                    "task; writes report.json and per_class.md",
                    details=[("The model is a bundle (--model: a training run's model/ folder, or "
                              "models:/NAME@ALIAS from the MLflow registry) or a config with weights (--config "
                              "--weights). torchrun --nproc-per-node N -m cli evaluate ... splits the shards over N "
                              "ranks.")],
                    required="MANIFEST, --output DIR, and --model BUNDLE or --config CONFIG",
                    example="maskdino evaluate demo_out/shards/coco_instances/val/manifest.json "
                            "--model demo_out/runs/tiny_instance/model --output demo_out/eval/tiny_instance")
    p.add_argument("manifest", help="manifest.json of the evaluation split (local or s3://)")
    p.add_argument("--output", required=True, help="folder for report.json, per_class.md (local or s3://)")
    add_model_args(p)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--min-size", type=int, default=-1, help="test-time short side (default: the dataset's "
                                                           "official value; 0 = no resize)")
    p.add_argument("--max-size", type=int, default=-1)
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N samples")
    p.set_defaults(run=run_evaluate)


def open_model_bundle(args: argparse.Namespace, storage: Storage) -> ModelBundle:
    """The bundle named by --model, or by --config [--weights --categories --set]."""
    from pipeline.model_bundle import open_bundle  # heavy: torch, safetensors

    return open_bundle(storage, model=args.model, config=args.config, weights=args.weights,
                       categories=args.categories, overrides=args.model_overrides)


def run_evaluate(args: argparse.Namespace) -> int:
    from pipeline.distributed import init_from_env  # heavy: torch
    from pipeline.evaluate import evaluate, write_report  # heavy: torch, pycocotools

    storage = storage_from(args.storage_overrides)
    bundle = open_model_bundle(args, storage)
    init_from_env()  # under torchrun / the deepspeed launcher: one rank per process
    settings = EvalSettings(batch_size=args.batch_size, min_size=args.min_size, max_size=args.max_size,
                            limit=args.limit)
    out = evaluate(bundle, args.manifest, storage, settings, device=args.device)
    if out is None:  # not rank 0
        return 0
    report, task_report = out
    written = write_report(storage, args.output, report, task_report)
    print(task_report.table)
    print(f"{report.headline()}; wrote {', '.join(written)}")
    return 0


# ---------------------------------------------------------------- predict
def add_predict(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "predict", "run a model on images and draw boxes, masks, panoptic and semantic colours with "
                    "class names as PNGs",
                    details=[("One picture per image and result kind: OUTPUT/<stem>.instances.png, "
                              "<stem>.panoptic.png, <stem>.semantic.png.")],
                    required="IMAGE... (local or s3://), and --model BUNDLE or --config CONFIG",
                    example="maskdino predict demo_out/raw/coco/val2017/000000000025.jpg "
                            "--model demo_out/runs/tiny_instance/model --output demo_out/predictions")
    p.add_argument("images", nargs="+", help="image files (local or s3://)")
    p.add_argument("--output", default="predictions", help="folder for the pictures (default: predictions)")
    add_model_args(p)
    p.add_argument("--score-threshold", type=float, default=0.5, help="instances drawn from this score up")
    p.add_argument("--min-size", type=int, default=800, help="test-time short side (0 = keep)")
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--kinds", default="instances,panoptic,semantic", help="pictures to draw (comma-separated)")
    p.set_defaults(run=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from pipeline.predict import PredictSettings, predict_images  # heavy: torch

    storage = storage_from(args.storage_overrides)
    bundle = open_model_bundle(args, storage)
    settings = PredictSettings(output=args.output, score_threshold=args.score_threshold, min_size=args.min_size,
                               max_size=args.max_size, device=args.device, kinds=tuple(comma_list(args.kinds)))
    written = predict_images(bundle, args.images, storage, settings)
    for uri in written:
        print(uri)
    print(f"Drew {len(written)} pictures for {len(args.images)} images with {bundle.source} into {args.output}.")
    return 0
