"""The `maskdino` command line: the parser of every command, and `main`, which runs the chosen one.

Each command lives in the file of its group (data, model, train_eval, pipeline_jobs, registry, metrics)
as `add_<command>(sub)`, which declares its arguments, and `run_<command>(args)`, which is thin:
load config -> build -> run -> close."""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence

from cli import data, metrics, model, pipeline_jobs, registry, train_eval
from cli.args import CommandParser
from cli.errors import run_command

# The order of `maskdino --help`: the pipeline first (the main entry), then its steps in the order a user
# runs them by hand, then the cluster commands, then the tools.
SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    pipeline_jobs.add_run,
    data.add_make_synthetic, data.add_shard, data.add_verify_shards,
    train_eval.add_train, train_eval.add_evaluate, train_eval.add_predict, registry.add_promote,
    pipeline_jobs.add_submit, pipeline_jobs.add_jobs,
    model.add_model_info, model.add_convert_checkpoint, metrics.add_metrics)

QUICK_START = """\
Mask DINO pipeline: shard raw datasets, pretrain and fine-tune with DeepSpeed, evaluate, register in
MLflow; on one machine or on a Ray cluster, with local or s3:// storage.

quick start on a fresh clone (CPU is enough; everything goes under demo_out/):
  maskdino make-synthetic demo_out/raw
  maskdino shard --config configs/data/demo_coco_instances.yaml --splits train,val output=demo_out/shards/coco_instances
  maskdino train configs/train/tiny_instance.yaml run_dir=demo_out/runs/tiny_instance \\
      data.manifest=demo_out/shards/coco_instances/train/manifest.json
  maskdino evaluate demo_out/shards/coco_instances/val/manifest.json --model demo_out/runs/tiny_instance/model \\
      --output demo_out/eval/tiny_instance

or the whole staged pipeline (shard, pretrain, fine-tune, evaluate, register), as `make demo` runs it:
  maskdino make-synthetic demo_out/raw --train-images 48 --val-images 16 --o365-categories 365
  maskdino run configs/pipeline/demo.yaml
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskdino", description=QUICK_START,
                                     epilog="`maskdino COMMAND --help`: what a command does, what it needs, and an "
                                            "example.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The deepspeed launcher passes --local_rank=N before the command; the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=CommandParser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_command(args)
