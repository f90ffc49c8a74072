"""`maskdino` command line: thin entrypoints (load config -> build -> run -> close).

Problems the user must fix (config, storage, bad source data under --strict) end as one line on
stderr and exit code 2; bugs keep their traceback."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from core.config import ConfigError, load_config

EXIT_USER_ERROR = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from data_prep.shard import StrictRejectError
    from data_prep.sources import SourceError
    from core.storage import StorageError
    from model.weights_file import CheckpointError
    from pipeline.checkpoint import CheckpointPublishError
    from pipeline.evaluators import EvalInputError
    from pipeline.loader import LoaderError
    from pipeline.metrics.coco import CocoEvalError
    from pipeline.metrics.panoptic import PanopticError
    from pipeline.metrics.semantic import SemanticError
    from pipeline.predict import PredictInputError
    from pipeline.trainer import TrainError
    from pipeline.transfer import TransferError

    return (ConfigError, SourceError, StorageError, StrictRejectError, CheckpointError, EvalInputError,
            CocoEvalError, PanopticError, SemanticError, PredictInputError, TrainError, TransferError,
            LoaderError, CheckpointPublishError)


# ---------------------------------------------------------------- make-synthetic
def _add_make_synthetic(sub) -> None:
    p = sub.add_parser("make-synthetic", help="write small synthetic datasets in the raw COCO, COCO panoptic, "
                                              "ADE20K and Objects365 layouts")
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
    p.set_defaults(run=_run_make_synthetic)


def _run_make_synthetic(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from data_prep.synthetic import FORMATS, SyntheticSpec, make_synthetic

    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip()) or FORMATS
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
def _add_shard(sub) -> None:
    p = sub.add_parser("shard", help="shard one raw dataset split into WebDataset tars + manifest (Ray)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. source.format=coco_panoptic source.root=/data/coco "
                        "source.split=val output=s3://bucket/coco/val shard.maxcount=500")
    p.add_argument("--config", help="YAML config (supports _base_)")
    p.add_argument("--strict", action="store_true", help="any rejected record is an error (exit 2, no manifest)")
    p.add_argument("--address", help="Ray cluster address (default: start local Ray)")
    p.add_argument("--inline", action="store_true", help="run shard tasks in this process instead of Ray")
    p.add_argument("--splits", default="", help="comma-separated splits to shard in one Ray session, each into "
                                                "OUTPUT/SPLIT (default: the single source.split into OUTPUT)")
    p.set_defaults(run=_run_shard)


def _run_shard(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from data_prep.fanout import ray_session
    from data_prep.shard import shard_dataset
    from data_prep.shard_config import ShardJobConfig
    from core.storage import join

    overrides = list(args.overrides)
    if args.strict:
        overrides.append("validate.strict=true")
    if args.address:
        overrides.append(f"executor.address={args.address}")
    if args.inline:
        overrides.append("executor.kind=inline")
    cfg = load_config(ShardJobConfig, args.config, overrides)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    configs = [replace(cfg, source=replace(cfg.source, split=s), output=join(cfg.output, s)) for s in splits]
    with ray_session(cfg.executor):  # one Ray start for all splits
        for split_cfg in configs or [cfg]:
            print(shard_dataset(split_cfg).paragraph())
    return 0


# ---------------------------------------------------------------- verify-shards
def _add_verify(sub) -> None:
    p = sub.add_parser("verify-shards", help="re-read every shard of a manifest: checksums, counts, "
                                             "member adjacency, decodability")
    p.add_argument("manifest", help="manifest.json path or s3:// URI")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="storage settings, e.g. endpoint_url=http://...")
    p.add_argument("--workers", type=int, default=4, help="shards checked at once (threads)")
    p.set_defaults(run=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from core.manifest import load_manifest
    from core.storage import Storage, StorageConfig
    from data_prep.verify import verify_shards

    storage = Storage(load_config(StorageConfig, None, args.overrides))
    manifest = load_manifest(storage, args.manifest)
    started = time.perf_counter()
    with tqdm(total=manifest.counts.samples, unit="samples", desc="verify-shards", disable=None) as bar:
        report = verify_shards(storage, args.manifest, on_shard=lambda c: bar.update(c.samples),
                               workers=args.workers)
    seconds = time.perf_counter() - started
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    verdict = "all checks passed" if report.ok else f"{len(report.problems)} problems found (listed above)"
    print(f"Verified {len(report.shards)} shards with {report.samples:,} samples of {manifest.dataset}/"
          f"{manifest.split} from {args.manifest} in {seconds:.1f} s: sha256, sizes, sample counts, member "
          f"adjacency and image/label decodability; {verdict}.")
    return 0 if report.ok else 1


# ---------------------------------------------------------------- model-info
def _add_model_info(sub) -> None:
    p = sub.add_parser("model-info", help="parameter count per top-level module and in total, feature levels "
                                          "and query counts of a model config")
    p.add_argument("config", help="model config YAML (configs/model/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. num_classes=365")
    p.set_defaults(run=_run_model_info)


def _run_model_info(args: argparse.Namespace) -> int:
    from pipeline.model_tools import load_model_config, model_info

    info = model_info(load_model_config(args.config, args.overrides))
    print(f"{args.config}:")
    for line in info.lines():
        print(f"  {line}")
    return 0


# ---------------------------------------------------------------- convert-checkpoint
def _add_convert_checkpoint(sub) -> None:
    p = sub.add_parser("convert-checkpoint", help="convert an official Mask DINO .pth (detectron2 format) to "
                                                  "our safetensors names")
    p.add_argument("input", help="official checkpoint (.pth: {'model': state_dict} or a bare state_dict)")
    p.add_argument("output", help="output .safetensors path")
    p.add_argument("--config", default="", help="model config to check shapes against and report missing keys")
    p.set_defaults(run=_run_convert_checkpoint)


def _run_convert_checkpoint(args: argparse.Namespace) -> int:
    from pipeline.model_tools import convert_checkpoint, load_model_config

    cfg = load_model_config(args.config) if args.config else None
    summary = convert_checkpoint(args.input, args.output, cfg)
    print(summary.line(args.output))
    return 0


# ---------------------------------------------------------------- metrics
def _add_metrics(sub) -> None:
    p = sub.add_parser("metrics", help="score prediction files in the standard formats (from any codebase); "
                                       "prints one JSON object")
    kinds = p.add_subparsers(dest="metric", metavar="METRIC", required=True)
    pq = kinds.add_parser("pq", help="panoptic quality: COCO panoptic JSON + PNG folders (panopticapi rules)")
    pq.add_argument("--gt-json", required=True)
    pq.add_argument("--gt-folder", required=True)
    pq.add_argument("--pred-json", required=True)
    pq.add_argument("--pred-folder", required=True)
    pq.add_argument("--workers", type=int, default=2, help="images scored at once (threads)")
    pq.set_defaults(run=_run_metrics_pq)
    miou = kinds.add_parser("miou", help="mIoU, fwIoU, mACC, pACC of label-map PNGs matched by file name "
                                         "(detectron2 convention, 255 = ignore)")
    miou.add_argument("--gt-folder", required=True)
    miou.add_argument("--pred-folder", required=True)
    miou.add_argument("--num-classes", type=int, required=True)
    miou.add_argument("--reduce-zero-label", action="store_true",
                      help="ADE20K format: 0 = other (ignored), classes 1..K become 0..K-1, in both folders")
    miou.add_argument("--class-names", default="", help="text file with one class name per line (optional)")
    miou.set_defaults(run=_run_metrics_miou)
    cc = kinds.add_parser("coco", help="COCO box or mask AP through pycocotools COCOeval")
    cc.add_argument("--gt-json", required=True, help="COCO instances JSON")
    cc.add_argument("--results", required=True, help="COCO results JSON (a list of detections)")
    cc.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox")
    cc.set_defaults(run=_run_metrics_coco)


def _print_json(report: dict) -> None:
    import json

    print(json.dumps(report, indent=None, sort_keys=False))


def _run_metrics_pq(args: argparse.Namespace) -> int:
    from pipeline.metrics.panoptic import evaluate_panoptic_folders

    report = evaluate_panoptic_folders(args.gt_json, args.gt_folder, args.pred_json, args.pred_folder,
                                       workers=args.workers, progress=True)
    _print_json(report.to_json())
    return 0


def _run_metrics_miou(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.metrics.semantic import evaluate_semantic_folders

    names = None
    if args.class_names:
        names = [line.strip() for line in Path(args.class_names).read_text().splitlines() if line.strip()]
        if len(names) != args.num_classes:
            raise ConfigError(f"--class-names {args.class_names} has {len(names)} names for --num-classes "
                              f"{args.num_classes}")
    report = evaluate_semantic_folders(args.gt_folder, args.pred_folder, args.num_classes,
                                       reduce_zero_label=args.reduce_zero_label, class_names=names, progress=True)
    _print_json(report.to_json())
    return 0


def _run_metrics_coco(args: argparse.Namespace) -> int:
    from pipeline.metrics.coco import evaluate_coco_files

    report = evaluate_coco_files(args.gt_json, args.results, args.iou_type)
    _print_json(report.to_json())
    return 0


# ---------------------------------------------------------------- evaluate / predict
def _add_model_args(p) -> None:
    p.add_argument("--model", default="", help="model bundle folder (local or s3://) with config.yaml, "
                                               "model.safetensors and categories.json")
    p.add_argument("--config", default="", help="model config YAML, instead of --model")
    p.add_argument("--weights", default="", help="with --config: .safetensors (ours) or the authors' .pth")
    p.add_argument("--categories", default="", help="with --config: categories.json for class names/ids")
    p.add_argument("--set", dest="model_overrides", action="append", default=[], metavar="key=value",
                   help="model config override, e.g. --set inference.test_topk_per_image=50 (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--storage", dest="storage_overrides", action="append", default=[], metavar="key=value",
                   help="storage setting, e.g. --storage endpoint_url=http://127.0.0.1:9000 (repeatable)")


def _storage(args: argparse.Namespace):
    from core.storage import Storage, StorageConfig

    return Storage(load_config(StorageConfig, None, args.storage_overrides))


def _bundle(args: argparse.Namespace, storage):
    from pipeline.model_bundle import open_bundle

    return open_bundle(storage, model=args.model, config=args.config, weights=args.weights,
                       categories=args.categories, overrides=args.model_overrides)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a model on a shard manifest: COCO AP, PQ or mIoU by the "
                                        "manifest's task; writes report.json and per_class.md")
    p.add_argument("manifest", help="manifest.json of the evaluation split (local or s3://)")
    p.add_argument("--output", required=True, help="folder for report.json, per_class.md (local or s3://)")
    _add_model_args(p)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--min-size", type=int, default=-1, help="test-time short side (default: the dataset's "
                                                           "official value; 0 = no resize)")
    p.add_argument("--max-size", type=int, default=-1)
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N samples")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from pipeline.distributed import init_from_env
    from pipeline.evaluate import EvalSettings, evaluate, write_report

    storage = _storage(args)
    bundle = _bundle(args, storage)
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


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="run a model on images and draw boxes, masks, panoptic and semantic "
                                       "colours with class names as PNGs")
    p.add_argument("images", nargs="+", help="image files (local or s3://)")
    p.add_argument("--output", default="predictions", help="folder for the pictures (default: predictions)")
    _add_model_args(p)
    p.add_argument("--score-threshold", type=float, default=0.5, help="instances drawn from this score up")
    p.add_argument("--min-size", type=int, default=800, help="test-time short side (0 = keep)")
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--kinds", default="instances,panoptic,semantic", help="pictures to draw (comma-separated)")
    p.set_defaults(run=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from pipeline.predict import PredictSettings, predict_images

    storage = _storage(args)
    bundle = _bundle(args, storage)
    settings = PredictSettings(output=args.output, score_threshold=args.score_threshold, min_size=args.min_size,
                               max_size=args.max_size, device=args.device,
                               kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()))
    written = predict_images(bundle, args.images, storage, settings)
    for uri in written:
        print(uri)
    print(f"Drew {len(written)} pictures for {len(args.images)} images with {bundle.source} into {args.output}.")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune with DeepSpeed on a shard manifest; one process here, "
                                     "several under torchrun / the deepspeed launcher with the same arguments")
    p.add_argument("config", help="run config (configs/train/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. schedule.max_steps=100 "
                                                                     "data.manifest=s3://bucket/shards/manifest.json")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from pipeline.train_config import load_train_config
    from pipeline.trainer import train

    cfg = load_train_config(args.config, args.overrides)
    result = train(cfg)
    if result.rank == 0:
        stats = result.loader_stats
        print(f"trained {result.steps} steps into {result.run_dir}; last checkpoint "
              f"{result.checkpoints[-1] if result.checkpoints else 'none'}; model {result.bundle or 'not exported'}; "
              f"samples {stats.samples}, undecodable skipped {stats.skipped_undecodable}, "
              f"shard retries {stats.shard_retries}, shards skipped {stats.shards_skipped}")
    return 0


# ---------------------------------------------------------------- promote
def _add_promote(sub) -> None:
    p = sub.add_parser("promote", help="manually move the `champion` alias of a registered model to VERSION "
                                       "(MLflow registry); the reason is recorded on the version")
    p.add_argument("name", help="registered model name")
    p.add_argument("version", help="model version number")
    p.add_argument("--reason", required=True, help="why (stored as the version tag promotion_reason)")
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.set_defaults(run=_run_promote)


def _run_promote(args: argparse.Namespace) -> int:
    from pipeline.registry import promote

    result = promote(args.tracking_uri or None, args.name, args.version, args.reason)
    print(f"models:/{args.name}@champion -> version {result.champion_version} ({result.reason})")
    return 0


# ---------------------------------------------------------------- submit / jobs (Ray Jobs API)
_JOBS_EPILOG = ("exit codes: 0 SUCCEEDED (or still PENDING/RUNNING for `jobs status`, or not waited for), 1 FAILED, "
                "2 user error (no address, no Ray head answering, unknown job, bad argument), 3 STOPPED, "
                "4 still PENDING after --pending-timeout (the cluster lacks the requested resources?), "
                "5 still running after --timeout. Address: --address, else $RAY_API_SERVER_ADDRESS, else "
                "$RAY_ADDRESS (the head's dashboard, http://HOST:8265; keep it on 127.0.0.1 behind an SSH tunnel).")


def _add_address(p) -> None:
    p.add_argument("--address", default="", help="Ray dashboard URL, e.g. http://127.0.0.1:8265 "
                                                 "(default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")


class _SubmitParser(argparse.ArgumentParser):
    """Everything after `--` goes to `extra` (a `nargs="*"` positional after the pipeline would match empty
    before the options and leave `-- ARGS` unrecognised)."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        extra = args[args.index("--") + 1:] if "--" in args else []
        args = args[:args.index("--")] if "--" in args else args
        namespace, rest = super().parse_known_args(args, namespace)
        namespace.extra = extra
        return namespace, rest


def _add_submit(sub) -> None:
    p = sub.add_parser("submit", help="submit `maskdino run PIPELINE` to a Ray cluster as a Ray job (the project "
                                      "folder is uploaded as its working_dir); prints the job id",
                       usage="maskdino submit PIPELINE.yaml [--address URL] [--wait] [options] [-- RUN_ARGS ...]",
                       epilog=_JOBS_EPILOG)
    p.__class__ = _SubmitParser
    p.add_argument("pipeline", help="pipeline YAML inside the working_dir (default: the project folder); "
                                    "arguments after -- go to `maskdino run`")
    _add_address(p)
    p.add_argument("--wait", action="store_true", help="wait for the end, print the job's logs, exit with its code")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up after S seconds (exit 5)")
    p.add_argument("--pending-timeout", type=float, default=300.0,
                   help="with --wait: give up when the job is still PENDING after S seconds (exit 4; default 300)")
    p.add_argument("--stop-on-timeout", action="store_true", help="stop the job when a timeout gives up on it")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="job environment (repeatable)")
    p.add_argument("--pip", action="append", default=[], metavar="PKG", help="pip package for the job (repeatable)")
    p.add_argument("--working-dir", default="", help="folder to upload instead of the project folder")
    p.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks one)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the driver")
    p.add_argument("--entrypoint-num-gpus", type=float, default=None, help="GPUs reserved for the driver")
    p.add_argument("--entrypoint-resources", default="", help='custom resources for the driver, JSON: \'{"x": 1}\'')
    p.set_defaults(run=_run_submit)


def _run_submit(args: argparse.Namespace) -> int:
    import json

    from orchestration import jobs

    address = jobs.resolve_address(args.address)
    client = jobs.connect(address)
    try:
        resources = json.loads(args.entrypoint_resources) if args.entrypoint_resources else None
    except ValueError as exc:
        raise jobs.JobsError(f"--entrypoint-resources: not JSON ({exc})") from None
    runtime_env = {"working_dir": args.working_dir} if args.working_dir else None
    job_id = jobs.submit_pipeline(address, args.pipeline, args.extra, runtime_env, client=client,
                                  env_vars=jobs.parse_env_pairs(args.env), pip=args.pip,
                                  submission_id=args.submission_id, entrypoint_num_cpus=args.entrypoint_num_cpus,
                                  entrypoint_num_gpus=args.entrypoint_num_gpus, entrypoint_resources=resources)
    print(job_id, flush=True)
    if not args.wait:
        return 0
    outcome = jobs.wait_job(address, job_id, timeout_s=args.timeout, pending_timeout_s=args.pending_timeout,
                            stop_on_timeout=args.stop_on_timeout, client=client)
    if outcome.status != jobs.PENDING_TIMEOUT:
        for chunk in jobs.job_logs(address, job_id, client=client):
            print(chunk, end="" if chunk.endswith("\n") or not chunk else "\n")
    print(outcome.line(), flush=True)
    return outcome.exit_code


def _add_jobs(sub) -> None:
    p = sub.add_parser("jobs", help="list, inspect, follow and stop Ray jobs", epilog=_JOBS_EPILOG)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser("list", help="every job the cluster knows: id, status, start time, entrypoint")
    _add_address(ls)
    ls.set_defaults(run=_run_jobs_list)
    st = actions.add_parser("status", help="a job's status; exit code as in `maskdino submit --wait`",
                            epilog=_JOBS_EPILOG)
    st.add_argument("job_id")
    _add_address(st)
    st.set_defaults(run=_run_jobs_status)
    lg = actions.add_parser("logs", help="a job's output")
    lg.add_argument("job_id")
    _add_address(lg)
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    lg.set_defaults(run=_run_jobs_logs)
    sp = actions.add_parser("stop", help="stop a job", epilog=_JOBS_EPILOG)
    sp.add_argument("job_id")
    _add_address(sp)
    sp.add_argument("--wait", action="store_true", help="wait until it has ended; exit with its code (3 STOPPED)")
    sp.add_argument("--timeout", type=float, default=60.0, help="with --wait: give up after S seconds (exit 5)")
    sp.set_defaults(run=_run_jobs_stop)


def _run_jobs_list(args: argparse.Namespace) -> int:
    import datetime

    from orchestration.jobs import list_jobs

    for job in list_jobs(args.address):
        started = (datetime.datetime.fromtimestamp(job.start_time / 1000).isoformat(timespec="seconds")
                   if job.start_time else "-")
        entrypoint = job.entrypoint if len(job.entrypoint) <= 80 else job.entrypoint[:77] + "..."
        print(f"{job.submission_id or job.job_id}\t{job.status.value}\t{started}\t{entrypoint}")
    return 0


def _run_jobs_status(args: argparse.Namespace) -> int:
    from orchestration.jobs import EXIT_CODES, job_info

    info = job_info(args.address, args.job_id)
    status = info.status.value
    message = (info.message or "").strip().splitlines()
    print(f"{args.job_id}\t{status}" + (f"\t{message[0]}" if message else ""))
    return EXIT_CODES[status]


def _run_jobs_logs(args: argparse.Namespace) -> int:
    from orchestration.jobs import job_logs

    for chunk in job_logs(args.address, args.job_id, follow=args.follow):
        print(chunk, end="", flush=True)
    return 0


def _run_jobs_stop(args: argparse.Namespace) -> int:
    from orchestration import jobs

    address = jobs.resolve_address(args.address)
    client = jobs.connect(address)
    pending = jobs.job_status(address, args.job_id, client=client) == "PENDING"
    requested = jobs.stop_job(address, args.job_id, client=client)
    if not args.wait or pending:
        print(f"job {args.job_id}: " + ("stop requested" if requested else "had already ended")
              + (f"; {jobs.PENDING_STOP_NOTE}" if pending else ""))
        return 0
    outcome = jobs.wait_job(address, args.job_id, timeout_s=args.timeout, client=client)
    print(outcome.line())
    return outcome.exit_code


# ---------------------------------------------------------------- run
def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run a staged pipeline (shard -> pretrain -> fine-tune -> evaluate -> register) "
                                   "on Ray, tracked in MLflow; cached stages are skipped")
    p.add_argument("pipeline", help="pipeline config (configs/pipeline/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pipeline overrides, e.g. run_root=/data/run")
    p.add_argument("--dry-run", action="store_true", help="validate every config and print the plan, run nothing")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="rerun STAGE and every stage after it (repeatable)")
    p.set_defaults(run=_run_run)


def _run_run(args: argparse.Namespace) -> int:
    from orchestration.run_pipeline import run_pipeline

    outcome = run_pipeline(args.pipeline, force=tuple(args.force), dry_run=args.dry_run,
                           overrides=tuple(args.overrides))
    return 0 if outcome is None or outcome.ok else 1


SUBCOMMANDS: tuple[Callable, ...] = (_add_make_synthetic, _add_shard, _add_verify, _add_model_info,
                                     _add_convert_checkpoint, _add_metrics, _add_evaluate, _add_predict, _add_train,
                                     _add_promote, _add_submit, _add_jobs, _add_run)


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
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not _is_user_error(exc):
            raise  # a bug: keep the traceback
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


def _is_user_error(exc: Exception) -> bool:
    # ConfigError first: building the full tuple imports torch (~5 s), too slow for a mistyped address.
    if isinstance(exc, ConfigError):
        return True
    return isinstance(exc, _user_errors())


if __name__ == "__main__":
    sys.exit(main())
