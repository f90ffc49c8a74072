"""Sharding throughput: images/s of `data_prep.shard.shard_dataset` against a single-tar I/O ceiling.

What is measured
----------------
* Data: `data_prep.synthetic.make_synthetic` writes `--images` Objects365 v2 images (layout
  `objects365_v2/train/patchN/*.jpg` + `annotations/zhiyuan_objv2_train.json`, with the v2 quirks:
  ~5 % of the listed images are missing on disk, some rows are repeated). Sides are drawn in
  [`--min-size`, `--max-size`]; the mean JPEG size is reported (`mean_image_bytes`).
* Ours: one full `shard_dataset(cfg)` call per repetition (annotation parse + listing +
  validation + plan + shard tasks + rejects + manifest), `executor.kind="ray"` on a local Ray
  started by this script with `--workers` CPUs (shard_dataset reuses it), or `--executor inline`.
  Progress bars off, a fresh output folder every time. Ray workers are warmed up first by an
  untimed sharding run of a tiny dataset, so worker start-up and imports are not measured. The
  time spent in `build_index` (listing + JSON parsing + validation; the parse and the listing are
  also reported on their own) and in the task phase (`run_jobs`) is recorded by thin wrappers
  around those functions (their behaviour is unchanged).
* Ceiling: the same samples (every listed image that exists on disk) written by ONE process into
  ONE tar with Python's `tarfile` (PAX format): each image read with open()/read() like
  `Storage.read_bytes`, plus a JSON member shaped like ours (key, image id, file name, size,
  boxes; precomputed, not timed), no PNG (Objects365 has none), one fsync at the end (ours fsyncs
  every shard). No parsing, validation, hashing or sidecars: it is the cost of moving the bytes.
* Both read images from the page cache (all images are read once before timing). Each
  repetition runs the ceiling and then ours for every maxcount in `--sweep` (plus `--maxcount`),
  in a rotating order; figures are medians over `--repeats` repetitions.

* After the warm-up, one probe task per Ray CPU reports each worker's RSS and whether torch got
  imported (`ray_worker_rss_bytes`): `data_prep.writer` imports webdataset, which imports torch.

Output: a human summary on stderr, then LAST on stdout one JSON line
`{"bench": "shard_throughput", "ratio": ours/ceiling images/s (medians), "goal": 0.7, ...}`;
`paired_ratio_median` is the median of the per-repetition ratios, `by_maxcount` the same figures
for every maxcount measured. `--profile` adds one untimed inline run under cProfile and prints its
top functions on stderr. Temporary data, outputs and this run's Ray session folder are removed.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data_prep import shard as shard_mod
from data_prep.shard import shard_dataset
from data_prep.shard_config import (
    ExecutorConfig,
    ShardJobConfig,
    ShardLimits,
    SourceConfig,
)
from data_prep.sources import coco_style_build
from data_prep.synthetic import SyntheticSpec, make_synthetic

GOAL = 0.7


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data


@dataclass
class Sample:
    path: str
    key: str
    meta: bytes  # the JSON member the ceiling writes


def prepare_dataset(root: Path, args: argparse.Namespace) -> float:
    """Generate the synthetic Objects365 v2 split unless `root` already holds one; returns seconds."""
    ann = root / "objects365_v2" / "annotations" / "zhiyuan_objv2_train.json"
    if ann.exists():
        log(f"reusing dataset at {root}")
        return 0.0
    spec = SyntheticSpec(train_images=listed_images(args.images), val_images=0, min_size=args.min_size, max_size=args.max_size,
                         seed=args.seed, formats=("objects365_v2",), jpeg_quality=args.jpeg_quality)
    t = time.perf_counter()
    summary = make_synthetic(root, spec)
    secs = time.perf_counter() - t
    log(f"generated {summary.images_written} images / {summary.annotations_written} boxes in {secs:.1f} s")
    return secs


def listed_images(on_disk: int) -> int:
    """Images to list in the JSON so that >= `on_disk` exist: the v2 generator leaves about 1 in 20
    listed images off the disk (its `missing image` quirk, round(n / 20) of n, at least 1 from 8)."""
    n = on_disk
    while n - min(n, max(int(n >= 8), round(n / 20))) < on_disk:
        n += 1
    return n


def ceiling_samples(root: Path) -> tuple[list[Sample], int]:
    """Every listed image present on disk, in key order, with a JSON member shaped like ours;
    and how many images the JSON lists."""
    base = root / "objects365_v2"
    doc = json.loads((base / "annotations" / "zhiyuan_objv2_train.json").read_bytes())
    boxes: dict[int, list[dict]] = {}
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        boxes.setdefault(a["image_id"], []).append(
            {"id": a["id"], "category_id": a["category_id"], "bbox": [x, y, x + w, y + h],
             "iscrowd": a["iscrowd"], "area": a["area"]})
    out = []
    for im in sorted(doc["images"], key=lambda i: i["id"]):
        rel = im["file_name"].split("/", 2)[2]  # images/vK/patchN/x.jpg -> patchN/x.jpg
        path = base / "train" / rel
        if not path.exists():
            continue
        key = f"{im['id']:012d}"
        meta = {"key": key, "image_id": im["id"], "file_name": im["file_name"], "width": im["width"],
                "height": im["height"], "image_member": "jpg", "annotations": boxes.get(im["id"], [])}
        out.append(Sample(str(path), key, json.dumps(meta, separators=(",", ":")).encode()))
    return out, len(doc["images"])


def warm_page_cache(samples: list[Sample]) -> None:
    for s in samples:
        with open(s.path, "rb") as f:
            f.read()


# ----------------------------------------------------------------------------- ceiling


def _member(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    return info


def run_ceiling(samples: list[Sample], out_path: str) -> tuple[float, int]:
    """Seconds and bytes to write every sample into one tar, one process."""
    t = time.perf_counter()
    with open(out_path, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for s in samples:
                with open(s.path, "rb") as f:
                    image = f.read()
                tar.addfile(_member(s.key + ".jpg", image), io.BytesIO(image))
                tar.addfile(_member(s.key + ".json", s.meta), io.BytesIO(s.meta))
        raw.flush()
        os.fsync(raw.fileno())
        size = raw.tell()
    return time.perf_counter() - t, size


# ----------------------------------------------------------------------------- ours


@dataclass
class Phases:
    """Seconds spent in the wrapped driver phases during one shard_dataset call."""

    index: float = 0.0
    listing: float = 0.0
    parse: float = 0.0
    tasks: float = 0.0


@contextlib.contextmanager
def phase_timers(phases: Phases):
    """Time build_index / listing / JSON parsing / the task phase through thin wrappers."""
    originals = {
        (shard_mod, "build_index"): shard_mod.build_index,
        (shard_mod, "run_jobs"): shard_mod.run_jobs,
        (coco_style_build, "list_folder"): coco_style_build.list_folder,
        (coco_style_build, "parse_images"): coco_style_build.parse_images,
        (coco_style_build, "parse_annotations"): coco_style_build.parse_annotations,
        (coco_style_build, "parse_categories"): coco_style_build.parse_categories,
    }

    def timed(fn, attr):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                setattr(phases, attr, getattr(phases, attr) + time.perf_counter() - t)
        return wrapper

    def timed_gen(fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                yield from fn(*a, **kw)
            finally:
                phases.tasks += time.perf_counter() - t
        return wrapper

    shard_mod.build_index = timed(originals[(shard_mod, "build_index")], "index")
    shard_mod.run_jobs = timed_gen(originals[(shard_mod, "run_jobs")])
    coco_style_build.list_folder = timed(originals[(coco_style_build, "list_folder")], "listing")
    for name in ("parse_images", "parse_annotations", "parse_categories"):
        setattr(coco_style_build, name, timed(originals[(coco_style_build, name)], "parse"))
    try:
        yield phases
    finally:
        for (mod, name), fn in originals.items():
            setattr(mod, name, fn)


def shard_cfg(root: Path, output: str, maxcount: int, args: argparse.Namespace) -> ShardJobConfig:
    return ShardJobConfig(
        source=SourceConfig(format="objects365", version="v2", root=str(root / "objects365_v2"), split="train"),
        output=output,
        shard=ShardLimits(maxcount=maxcount),
        executor=ExecutorConfig(kind=args.executor, num_cpus=args.workers,
                                object_store_bytes=args.object_store_bytes),
        progress=False,
    )


@dataclass
class OursRun:
    seconds: float
    samples: int
    shards: int
    bytes: int
    phases: Phases


def run_ours(root: Path, output: str, maxcount: int, args: argparse.Namespace) -> OursRun:
    phases = Phases()
    with phase_timers(phases):
        t = time.perf_counter()
        summary = shard_dataset(shard_cfg(root, output, maxcount, args))
        secs = time.perf_counter() - t
    return OursRun(secs, summary.samples, summary.shards, summary.bytes, phases)


def warm_up(tmp: Path, args: argparse.Namespace) -> None:
    """An untimed sharding of a tiny dataset: starts the Ray workers and imports the task code."""
    root = tmp / "warmup-data"
    make_synthetic(root, SyntheticSpec(train_images=16, val_images=0, min_size=96, max_size=128,
                                       formats=("objects365_v2",)))
    for i in range(2):
        run_ours(root, str(tmp / f"warmup-out-{i}"), 2, args)
    shutil.rmtree(root, ignore_errors=True)
    for i in range(2):
        shutil.rmtree(tmp / f"warmup-out-{i}", ignore_errors=True)


def _worker_probe(hold: float) -> tuple[int, int, bool]:
    import psutil

    time.sleep(hold)  # keep this worker busy so the other probes land on the other workers
    return os.getpid(), psutil.Process().memory_info().rss, "torch" in sys.modules


def probe_ray_workers(n: int) -> list[tuple[int, int, bool]]:
    """(pid, RSS, torch imported?) of the warmed-up Ray workers, one probe task per CPU."""
    import ray

    probe = ray.remote(num_cpus=1)(_worker_probe)
    found = {pid: (pid, rss, torch) for pid, rss, torch in ray.get([probe.remote(0.5) for _ in range(n)])}
    return sorted(found.values())


def profile_inline(root: Path, tmp: Path, maxcount: int, args: argparse.Namespace, top: int = 25) -> None:
    inline = argparse.Namespace(**{**vars(args), "executor": "inline"})
    out = tmp / "profile-out"
    prof = cProfile.Profile()
    prof.enable()
    t = time.perf_counter()
    shard_dataset(shard_cfg(root, str(out), maxcount, inline))
    secs = time.perf_counter() - t
    prof.disable()
    shutil.rmtree(out, ignore_errors=True)
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    log(f"--- cProfile of one inline run (maxcount={maxcount}, {secs:.2f} s under the profiler) ---")
    log(buf.getvalue())


# ----------------------------------------------------------------------------- main


@dataclass
class Series:
    seconds: list[float] = field(default_factory=list)
    runs: list[OursRun] = field(default_factory=list)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=2000,
                   help="synthetic images on disk (= samples sharded); ~5%% more are listed in the JSON but missing")
    p.add_argument("--min-size", type=int, default=480, help="smallest image side")
    p.add_argument("--max-size", type=int, default=640, help="largest image side")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--executor", choices=("ray", "inline"), default="ray")
    p.add_argument("--workers", type=int, default=2, help="Ray CPUs (= concurrent shard tasks)")
    p.add_argument("--object-store-bytes", type=int, default=300_000_000)
    p.add_argument("--maxcount", type=int, default=250, help="samples per shard for the headline figure")
    p.add_argument("--sweep", default="100,1000",
                   help="extra maxcount values measured in the same repetitions ('' for none)")
    p.add_argument("--repeats", type=int, default=5, help="repetitions (>= 3 advised); medians are reported")
    p.add_argument("--tmp", default=None, help="parent folder for temporary files (default: system temp)")
    p.add_argument("--data-dir", default=None,
                   help="keep/reuse the generated dataset here instead of a temp dir (not deleted)")
    p.add_argument("--profile", action="store_true", help="also cProfile one untimed inline run (stderr)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.images < 1:
        p.error("--repeats and --images must be >= 1")
    maxcounts = [args.maxcount] + [int(v) for v in args.sweep.split(",") if v.strip() and int(v) != args.maxcount]

    ray = None
    ray_session_dir = None
    with tempfile.TemporaryDirectory(prefix="bench-shard-", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        data_root = Path(args.data_dir) if args.data_dir else tmp / "data"
        try:
            gen_s = prepare_dataset(data_root, args)
            samples, n_listed = ceiling_samples(data_root)
            warm_page_cache(samples)
            image_bytes = [os.path.getsize(s.path) for s in samples]
            mean_image = statistics.mean(image_bytes)
            mean_json = statistics.mean(len(s.meta) for s in samples)
            log(f"{len(samples)} samples on disk, mean image {mean_image / 1e3:.1f} kB, "
                f"mean JSON member {mean_json:.0f} B, {sum(image_bytes) / 1e6:.1f} MB of images")

            if args.executor == "ray":
                import ray

                context = ray.init(num_cpus=args.workers, include_dashboard=False,
                                   object_store_memory=args.object_store_bytes, logging_level="WARNING")
                ray_session_dir = context.address_info.get("session_dir")
            t = time.perf_counter()
            warm_up(tmp, args)
            log(f"warm-up ({args.executor}) {time.perf_counter() - t:.1f} s")
            workers = probe_ray_workers(args.workers) if args.executor == "ray" else []
            for pid, rss, torch in workers:
                log(f"Ray worker pid {pid}: RSS {rss / 2**20:.0f} MiB, torch imported: {torch}")
            if args.profile:
                profile_inline(data_root, tmp, args.maxcount, args)

            ceiling = Series()
            ceiling_bytes = 0
            ours = {mc: Series() for mc in maxcounts}
            paired: dict[int, list[float]] = {mc: [] for mc in maxcounts}
            for rep in range(args.repeats):
                order = ["ceiling", *maxcounts]
                k = rep % len(order)
                order = order[k:] + order[:k]  # rotate so no variant always runs first
                c_secs = None
                this_rep: dict[int, float] = {}
                for item in order:
                    out = tmp / f"out-{rep}-{item}"
                    if item == "ceiling":
                        out.mkdir()
                        c_secs, ceiling_bytes = run_ceiling(samples, str(out / "all.tar"))
                        ceiling.seconds.append(c_secs)
                        log(f"rep {rep}: ceiling {c_secs:.2f} s ({len(samples) / c_secs:,.0f} img/s)")
                    else:
                        run = run_ours(data_root, str(out), item, args)
                        if run.samples != len(samples):
                            log(f"WARNING: ours wrote {run.samples} samples, ceiling {len(samples)}")
                        ours[item].seconds.append(run.seconds)
                        ours[item].runs.append(run)
                        this_rep[item] = run.seconds
                        ph = run.phases
                        log(f"rep {rep}: ours maxcount={item} {run.seconds:.2f} s ({run.samples / run.seconds:,.0f} img/s; "
                            f"index {ph.index:.2f} s [listing {ph.listing:.2f}, parse {ph.parse:.2f}], "
                            f"tasks {ph.tasks:.2f} s, {run.shards} shards)")
                    shutil.rmtree(out, ignore_errors=True)
                for mc, secs in this_rep.items():
                    paired[mc].append(c_secs / secs)
        finally:
            if ray is not None and ray.is_initialized():
                ray.shutdown()
            if ray_session_dir:  # this run's own Ray session folder (logs, sockets) under Ray's temp dir
                shutil.rmtree(ray_session_dir, ignore_errors=True)

    n = len(samples)
    c_med = median(ceiling.seconds)
    ceiling_ips = n / c_med

    def figures(mc: int) -> dict:
        s = ours[mc]
        med = median(s.seconds)
        runs = s.runs
        return {
            "maxcount": mc, "shards": runs[0].shards, "seconds": round(med, 3),
            "images_per_s": round(n / med, 1), "ratio": round(c_med / med, 3),
            "paired_ratio_median": round(median(paired[mc]), 3),
            "index_seconds": round(median([r.phases.index for r in runs]), 3),
            "tasks_seconds": round(median([r.phases.tasks for r in runs]), 3),
        }

    head = ours[args.maxcount]
    head_runs = head.runs
    main_fig = figures(args.maxcount)
    result = {
        "bench": "shard_throughput",
        "ratio": main_fig["ratio"],
        "goal": GOAL,
        "executor": args.executor,
        "workers": args.workers if args.executor == "ray" else 1,
        "images_per_s": main_fig["images_per_s"],
        "ceiling_images_per_s": round(ceiling_ips, 1),
        "seconds": main_fig["seconds"],
        "ceiling_seconds": round(c_med, 3),
        "samples": n,
        "images_listed": n_listed,
        "mean_image_bytes": round(mean_image),
        "mean_json_bytes": round(mean_json),
        "maxcount": args.maxcount,
        "shards": main_fig["shards"],
        "shard_bytes_mean": round(head_runs[0].bytes / head_runs[0].shards),
        "output_bytes": head_runs[0].bytes,
        "ceiling_bytes": ceiling_bytes,
        "index_seconds": main_fig["index_seconds"],
        "listing_seconds": round(median([r.phases.listing for r in head_runs]), 3),
        "parse_seconds": round(median([r.phases.parse for r in head_runs]), 3),
        "tasks_seconds": main_fig["tasks_seconds"],
        "paired_ratio_median": main_fig["paired_ratio_median"],
        "repeats": args.repeats,
        "runs_seconds": [round(s, 3) for s in head.seconds],
        "ceiling_runs_seconds": [round(s, 3) for s in ceiling.seconds],
        "by_maxcount": {str(mc): figures(mc) for mc in sorted(maxcounts)},
        "ray_worker_rss_bytes": [w[1] for w in workers],
        "generate_seconds": round(gen_s, 1),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    log(f"ours {result['images_per_s']:,.0f} img/s vs ceiling {result['ceiling_images_per_s']:,.0f} img/s "
        f"-> ratio {result['ratio']:.3f} (goal {GOAL})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
