"""The `maskdino` command line: the parser of every command, and `main`, which runs the chosen one.

Each command lives in the file of its group (data, model, train_eval, pipeline_jobs, registry, metrics)
as `add_<command>(sub)`, which declares its arguments, and `run_<command>(args)`, which is thin:
load config -> build -> run -> close."""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence

from cli import data, metrics, model, pipeline_jobs, registry, train_eval
from cli.errors import run_command

SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    data.add_make_synthetic, data.add_shard, data.add_verify_shards, model.add_model_info,
    model.add_convert_checkpoint, metrics.add_metrics, train_eval.add_evaluate, train_eval.add_predict,
    train_eval.add_train, registry.add_promote, pipeline_jobs.add_submit, pipeline_jobs.add_jobs,
    pipeline_jobs.add_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskdino", description="Mask DINO pipeline: shard, pretrain, "
                                     "fine-tune, evaluate, register.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The deepspeed launcher passes --local_rank=N before the command; the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_command(args)
