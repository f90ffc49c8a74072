"""Data commands: `make-synthetic` (raw datasets to try things on), `shard` (raw split -> WebDataset
tars + manifest, on Ray) and `verify-shards` (re-read and check what a manifest lists)."""
from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from cli.args import add_command, add_overrides, comma_list, storage_from
from core.config import ConfigError, load_config
from core.manifest import load_manifest
from data_prep.shard_check import check_shard_job
from data_prep.shard_config import ShardJobConfig, split_configs


# ---------------------------------------------------------------- make-synthetic
def add_make_synthetic(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "make-synthetic", "write small synthetic datasets in the raw COCO, COCO panoptic, ADE20K and "
                    "Objects365 layouts",
                    details=[("Scenes of coloured shapes with stuff regions, each dataset in its official folder "
                              "layout: enough to try sharding, training, evaluation and the pipeline without "
                              "downloading anything.")],
                    required="OUT, the folder to write into (created)",
                    example="maskdino make-synthetic demo_out/raw")
    p.add_argument("out", help="folder to write into (created)")
    p.add_argument("--train-images", type=int, default=24)
    p.add_argument("--val-images", type=int, default=8)
    p.add_argument("--min-size", type=int, default=160, help="smallest image side (pixels)")
    p.add_argument("--max-size", type=int, default=320, help="largest image side (pixels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--o365-categories", type=int, default=12, help="Objects365 category list length (12 drawn "
                   "classes, the rest listed but unused; 365 as the real dataset)")
    p.add_argument("--formats", default="", help="comma-separated subset of: coco_instances, coco_panoptic, "
                                                  "ade20k, objects365_v1, objects365_v2 (default: all)")
    p.set_defaults(run=run_make_synthetic)


def run_make_synthetic(args: argparse.Namespace) -> int:
    from data_prep.synthetic import FORMATS, SyntheticSpec, make_synthetic  # heavy: pycocotools

    formats = tuple(comma_list(args.formats)) or FORMATS
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ConfigError(f"--formats: unknown {unknown}; allowed: {', '.join(FORMATS)}")
    spec = SyntheticSpec(train_images=args.train_images, val_images=args.val_images, min_size=args.min_size,
                         max_size=args.max_size, seed=args.seed, formats=formats,
                         o365_categories=args.o365_categories)
    started = time.perf_counter()
    with tqdm(unit="images", desc="make-synthetic", disable=None) as bar:  # None: only on a terminal
        summary = make_synthetic(args.out, spec, progress=bar.update)
    seconds = time.perf_counter() - started
    print(f"Wrote {summary.images_written:,} images and {summary.annotations_written:,} annotations in "
          f"{len(summary.formats)} raw layouts ({', '.join(summary.formats)}) under {summary.root} in "
          f"{seconds:.1f} s, seed {spec.seed}, {spec.train_images} train + {spec.val_images} val images per "
          f"dataset; shard them with `maskdino shard source.format=... source.root=... output=...`.")
    return 0


# ---------------------------------------------------------------- shard
def add_shard(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "shard", "shard one raw dataset split (or several with --splits) into WebDataset tars + "
                    "manifest, on Ray",
                    details=[("The config (--config, then key=value overrides) names the source (source.format, "
                              "source.root, or explicit source.annotation / source.images / source.labels paths) and "
                              "the output, each a local path or an s3:// URI. Records that fail validation are left "
                              "out and listed in OUTPUT/rejects.jsonl; with --strict any reject is an error."),
                             ("--dry-run checks the config, that the source's annotation file, class list and folders "
                              "exist, and that the output can be written (the bucket exists), then prints what would "
                              "be sharded: no Ray, nothing written.")],
                    required="source.root (or explicit source paths) and output, in the --config file or as overrides",
                    example="maskdino shard --config configs/data/demo_coco_instances.yaml --splits train,val "
                            "output=demo_out/shards/coco_instances")
    add_overrides(p, "config overrides", "source.format=coco_panoptic source.root=/data/coco source.split=val "
                                         "output=s3://bucket/coco/val shard.maxcount=500")
    p.add_argument("--config", help="YAML config (supports _base_)")
    p.add_argument("--strict", action="store_true", help="any rejected record is an error (exit 2, no manifest)")
    p.add_argument("--address", help="Ray cluster address (default: start local Ray)")
    p.add_argument("--inline", action="store_true", help="run shard tasks in this process instead of Ray")
    p.add_argument("--splits", default="", help="comma-separated splits to shard in one Ray session, each into "
                                                "OUTPUT/SPLIT (default: the single source.split into OUTPUT)")
    p.add_argument("--dry-run", action="store_true", help="check the config, the source's files and the output "
                                                          "location, print what would be sharded; start and write "
                                                          "nothing")
    p.set_defaults(run=run_shard)


def run_shard(args: argparse.Namespace) -> int:
    flags = {"validate.strict": "true" if args.strict else "", "executor.address": args.address or "",
             "executor.kind": "inline" if args.inline else ""}
    overrides = [*args.overrides, *(f"{key}={value}" for key, value in flags.items() if value)]
    cfg = load_config(ShardJobConfig, args.config, overrides)
    split_cfgs = split_configs(cfg, comma_list(args.splits))
    if args.dry_run:
        print("\n".join(check_shard_job(cfg, split_cfgs).lines()))
        return 0
    from data_prep.fanout import ray_session  # heavy: pycocotools (the shard writer), ray
    from data_prep.shard import shard_dataset  # heavy: pycocotools

    with ray_session(cfg.executor):  # one Ray start for all splits
        for split_cfg in split_cfgs:
            print(shard_dataset(split_cfg).paragraph())
    return 0


# ---------------------------------------------------------------- verify-shards
def add_verify_shards(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "verify-shards", "re-read every shard of a manifest: checksums, counts, member adjacency, "
                    "decodability",
                    details=[("Exit codes: 0 all checks passed, 1 problems found (each listed on stderr), 2 user error "
                              "(unreadable manifest, bad storage setting).")],
                    required="MANIFEST, a manifest.json path or s3:// URI",
                    example="maskdino verify-shards demo_out/shards/coco_instances/val/manifest.json")
    p.add_argument("manifest", help="manifest.json path or s3:// URI")
    add_overrides(p, "storage settings", "endpoint_url=http://...")
    p.add_argument("--workers", type=int, default=4, help="shards checked at once (threads)")
    p.set_defaults(run=run_verify_shards)


def run_verify_shards(args: argparse.Namespace) -> int:
    from data_prep.verify import verify_shards  # heavy: pycocotools

    storage = storage_from(args.overrides)
    manifest = load_manifest(storage, args.manifest)
    started = time.perf_counter()
    with tqdm(total=manifest.counts.samples, unit="samples", desc="verify-shards", disable=None) as bar:
        report = verify_shards(storage, args.manifest, on_shard=lambda c: bar.update(c.samples),
                               workers=args.workers, manifest=manifest)
    seconds = time.perf_counter() - started
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    verdict = "all checks passed" if report.ok else f"{len(report.problems)} problems found (listed above)"
    print(f"Verified {len(report.shards)} shards with {report.samples:,} samples of {manifest.dataset}/"
          f"{manifest.split} from {args.manifest} in {seconds:.1f} s: sha256, sizes, sample counts, member "
          f"adjacency and image/label decodability; {verdict}.")
    return 0 if report.ok else 1
