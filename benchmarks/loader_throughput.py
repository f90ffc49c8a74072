"""Training loader throughput: samples/s of `TrainLoader` (shards on disk and on S3) vs. loose files.

What is measured
----------------
* Data: `data_prep.synthetic.make_synthetic` writes `--images` COCO instances train images
  (`coco/train2017/*.jpg` + `annotations/instances_train2017.json`: polygons, multi-part polygons,
  compressed RLE, crowd regions as uncompressed RLE), sides in [`--min-size`, `--max-size`].
  `data_prep.shard.shard_dataset` (inline executor) shards them with `--maxcount` samples per
  shard into a local folder; the same files (shards + manifest) are then uploaded to a bucket of
  a moto S3 server this script starts in-process on 127.0.0.1 (dummy credentials).
* Every variant yields the same batches: `--batch-size` samples, `--workers` DataLoader worker
  processes, each sample decoded (PIL, EXIF transpose, RGB) and passed through
  `pipeline.transforms.train_transform` (COCO LSJ recipe: flip, ResizeScale 0.1-2.0,
  FixedSizeCrop to `--image-size`, masks decoded from RLE and warped, targets built), then
  `pipeline.transforms.collate`. `--image-size` defaults to 512 (the official recipe uses 1024)
  so the run stays short on CPU.
  - ours-disk: `pipeline.loader.TrainLoader` over the local manifest (LoaderConfig defaults
    otherwise: shuffle buffer 256, prefetch 2).
  - ours-S3: the same over `s3://<bucket>/train/manifest.json` on the moto server.
  - loose files on S3 (a second baseline, not the goal's): the loose-file reader with each JPEG
    fetched by one GET (a boto3 client per worker) from the same moto server, as a dataset kept
    as loose objects in a bucket is read; `ratio_s3_vs_loose_s3` = ours-S3 / this.
  - loose files (baseline, "as detectron2 reads"): a torch DataLoader (same workers, batch size,
    prefetch) over a map-style dataset with an infinite shuffled sampler, as detectron2's
    TrainingSampler. The raw COCO JSON is parsed once up front into per-image dataset dicts, and
    their annotations converted once to the shard `meta` format (xyxy boxes, compressed RLE from
    pycocotools); images with only crowd annotations are dropped, as detectron2 does (the
    baseline's annotations are checked to equal the shards': `meta_identical`). Per sample the
    worker deep-copies the dataset dict (as detectron2's mapper), opens the original JPEG, decodes
    it the same way, and runs the SAME transform and collate. (detectron2 keeps polygons and
    rasterises them per sample; converting once makes the baseline cheaper than detectron2.)
* Decode-only rates: the same four loaders with a trivial transform (returns the key and image
  shape) and a list collate, to show how much of the time is reading + JPEG decoding and how
  much is the augmentation.
* Each measurement starts fresh workers, discards `--warmup` batches, then times `--batches`
  batches; samples/s = batches x batch size / seconds. Each repetition runs all eight variants in
  a rotating order; figures are medians over `--repeats` repetitions. All images and shards are
  read once before timing, so disk variants read from the page cache; moto serves the objects
  from threads of THIS process (its CPU time competes with the workers on the same cores).
  `transform_share_*` = 1 - full rate / decode-only rate: the part of a sample's time that is
  augmentation + targets + collate.

Output: a human summary on stderr, then LAST on stdout one JSON line
`{"bench": "loader_throughput", "ratio": ours-disk / loose samples/s, "goal": 1.5,
"s3_over_disk": ours-S3 / ours-disk, "s3_goal": 0.8, ...}` (figures for every variant,
`paired_ratio_median` = median of per-repetition ratios, loadavg). Temporary data are removed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import itertools
import json
import logging
import os
import statistics
import sys
import tarfile
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, Dataset, Sampler

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.manifest import Manifest, load_manifest
from data_prep.shard import shard_dataset
from data_prep.shard_config import (
    ExecutorConfig,
    ShardJobConfig,
    ShardLimits,
    SourceConfig,
)
from core.storage import Storage, StorageConfig
from data_prep.synthetic import SyntheticSpec, make_synthetic
from core.shard_sample import ShardSample
from pipeline.loader import LoaderConfig, TrainLoader
from pipeline.transforms import AugConfig, collate, train_transform

GOAL = 1.5  # ours-disk over loose files
S3_GOAL = 0.8  # ours-S3 over ours-disk
REGION = "us-east-1"
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
_AWS_UNSET = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
VARIANTS = ("disk", "s3", "loose", "loose_s3", "disk_decode", "s3_decode", "loose_decode", "loose_s3_decode")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data


def prepare_data(tmp: Path, args: argparse.Namespace) -> tuple[Path, Path, float]:
    """Raw COCO instances under tmp/raw/coco and its shards under tmp/shards; returns the seconds."""
    t = time.perf_counter()
    make_synthetic(tmp / "raw", SyntheticSpec(train_images=args.images, val_images=0, min_size=args.min_size,
                                              max_size=args.max_size, seed=args.seed,
                                              formats=("coco_instances",)))
    coco, shards = tmp / "raw" / "coco", tmp / "shards"
    shard_dataset(ShardJobConfig(
        source=SourceConfig(format="coco_instances", root=str(coco), split="train"), output=str(shards),
        shard=ShardLimits(maxcount=args.maxcount), executor=ExecutorConfig(kind="inline"), progress=False))
    return coco, shards, time.perf_counter() - t


def read_all(folder: Path) -> int:
    """Read every file once (page cache), returning the bytes read."""
    return sum(len(p.read_bytes()) for p in folder.rglob("*") if p.is_file())


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """An in-process moto S3 server on 127.0.0.1 with dummy credentials; yields its endpoint URL."""
    saved = {k: os.environ.get(k) for k in (*_AWS_ENV, *_AWS_UNSET)}
    os.environ.update(_AWS_ENV)
    for k in _AWS_UNSET:
        os.environ.pop(k, None)
    from moto.server import ThreadedMotoServer  # slow to import: only here

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per GET otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload(endpoint: str, local: Path) -> tuple[Storage, str, int]:
    """A fresh bucket holding every file of `local` under train/; (storage, s3://bucket/train, bytes)."""
    import boto3

    bucket = f"bench-loader-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name=REGION).create_bucket(Bucket=bucket)
    storage = Storage(StorageConfig(endpoint_url=endpoint, region=REGION))
    sent = 0
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        data = path.read_bytes()
        storage.write_bytes(f"s3://{bucket}/train/{path.relative_to(local).as_posix()}", data)
        sent += len(data)
    return storage, f"s3://{bucket}/train", sent


# ----------------------------------------------------------------------------- transforms


def lsj_sample(sample: ShardSample, rng: np.random.Generator, *, task: str, label_format: str | None,
               ids: dict[int, int], cfg: AugConfig) -> Any:
    """The training transform a trainer would hand TrainLoader (picklable through functools.partial)."""
    return train_transform(sample.image, sample.meta, sample.label_png, task, label_format, ids, cfg, rng,
                           sample.key)


def decode_only(sample: ShardSample, rng: np.random.Generator) -> tuple[str, tuple[int, ...]]:
    return sample.key, sample.image.shape


# ----------------------------------------------------------------------------- baseline


@dataclass(frozen=True)
class LooseRecord:
    """A detectron2-style dataset dict: the image path and the annotations in shard `meta` form."""

    path: str
    meta: dict[str, Any]


def shard_style_annotation(a: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """A raw COCO annotation as the shards store it: xyxy box, compressed RLE with str counts."""
    x, y, w, h = a["bbox"]
    seg = a["segmentation"]
    if isinstance(seg, list):  # polygons; detectron2 also drops parts with < 3 points
        rle = mask_utils.merge(mask_utils.frPyObjects([p for p in seg if len(p) >= 6 and len(p) % 2 == 0],
                                                      height, width))
    elif isinstance(seg["counts"], list):  # uncompressed RLE (crowd)
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    counts = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
    return {"id": a["id"], "category_id": a["category_id"], "bbox": [x, y, x + w, y + h],
            "iscrowd": a.get("iscrowd", 0), "area": a["area"],
            "segmentation": {"size": [height, width], "counts": counts}}


def loose_records(coco: Path) -> tuple[list[LooseRecord], dict[int, int]]:
    """Parse the raw JSON once (detectron2 load_coco_json); drop images with only crowd annotations."""
    doc = json.loads((coco / "annotations" / "instances_train2017.json").read_text())
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for a in doc["annotations"]:
        by_image[a["image_id"]].append(a)
    records = []
    for im in doc["images"]:
        anns = [shard_style_annotation(a, im["height"], im["width"]) for a in by_image[im["id"]]]
        if all(a["iscrowd"] for a in anns):
            continue
        meta = {"image_id": im["id"], "file_name": im["file_name"], "width": im["width"],
                "height": im["height"], "annotations": anns}
        records.append(LooseRecord(str(coco / "train2017" / im["file_name"]), meta))
    ids = {c["id"]: i for i, c in enumerate(sorted(doc["categories"], key=lambda c: c["id"]))}
    return records, ids


def shard_metas(shards: Path) -> dict[str, dict[str, Any]]:
    """file_name -> the `meta` JSON stored in the local shards (to check the baseline builds the same)."""
    out = {}
    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())  # type: ignore[union-attr]
                    out[meta["file_name"]] = meta
    return out


def same_annotations(records: list[LooseRecord], metas: dict[str, dict[str, Any]]) -> bool:
    keys = ("id", "category_id", "bbox", "iscrowd", "segmentation")
    return len(records) == len(metas) and all(
        [{k: a[k] for k in keys} for a in r.meta["annotations"]]
        == [{k: a[k] for k in keys} for a in metas[r.meta["file_name"]]["annotations"]] for r in records)


class InfiniteShuffle(Sampler):
    """detectron2 TrainingSampler: an endless stream of shuffled epochs; yields (epoch, index)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for epoch in itertools.count():
            for i in np.random.default_rng([self.seed, epoch]).permutation(self.size).tolist():
                yield epoch, i


class LooseFiles(Dataset):
    """Per sample: copy the dataset dict (as detectron2's mapper), open + decode the JPEG, transform.
    With `s3_images` (s3://bucket/prefix) each JPEG is one GET from there instead of a file read."""

    def __init__(self, records: list[LooseRecord], transform: Callable, seed: int,
                 s3_images: tuple[Storage, str] | None = None) -> None:
        self.records, self.transform, self.seed, self.s3_images = records, transform, seed, s3_images

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: tuple[int, int]) -> Any:
        epoch, i = index
        record = copy.deepcopy(self.records[i])
        if self.s3_images is None:
            with open(record.path, "rb") as f:
                data = f.read()
        else:  # Storage keeps one boto3 client per process (each DataLoader worker gets its own)
            storage, prefix = self.s3_images
            data = storage.read_bytes(f"{prefix}/{Path(record.path).name}")
        # detectron2 utils.read_image: PIL, EXIF orientation, RGB
        image = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        sample = ShardSample(Path(record.path).stem, image, record.meta, None)
        return self.transform(sample, np.random.default_rng([self.seed, epoch, i]))


# ----------------------------------------------------------------------------- loaders


def ours_batches(manifest: str, storage: Storage, transform: Callable, collate_fn: Callable,
                 args: argparse.Namespace) -> Iterator[Any]:
    cfg = LoaderConfig(manifest=manifest, batch_size=args.batch_size, num_workers=args.workers, seed=args.seed)
    return iter(TrainLoader(cfg, transform, collate=collate_fn, storage=storage, rank=0, world_size=1))


def loose_batches(records: list[LooseRecord], transform: Callable, collate_fn: Callable,
                  args: argparse.Namespace, s3_images: tuple[Storage, str] | None = None) -> Iterator[Any]:
    loader = DataLoader(LooseFiles(records, transform, args.seed, s3_images), batch_size=args.batch_size,
                        sampler=InfiniteShuffle(len(records), args.seed), num_workers=args.workers,
                        collate_fn=collate_fn, prefetch_factor=2 if args.workers else None)
    batches = iter(loader)
    try:
        yield from batches
    finally:
        del batches  # shuts the workers down now


def time_batches(batches: Iterator[Any], warmup: int, n: int) -> float:
    """Seconds for `n` batches after `warmup` untimed ones (worker start-up and first reads)."""
    try:
        for _ in range(warmup):
            next(batches)
        t = time.perf_counter()
        for _ in range(n):
            next(batches)
        return time.perf_counter() - t
    finally:
        batches.close()  # type: ignore[attr-defined]


@dataclass
class Setup:
    local_manifest: str
    s3_manifest: str
    s3_storage: Storage
    s3_images: str  # s3://bucket/train: the loose JPEGs
    records: list[LooseRecord]
    full: Callable
    runs: dict[str, list[float]] = field(default_factory=lambda: {v: [] for v in VARIANTS})


def batches_for(variant: str, setup: Setup, args: argparse.Namespace) -> Iterator[Any]:
    decode = variant.endswith("_decode")
    transform, collate_fn = (decode_only, list) if decode else (setup.full, collate)
    source = variant.removesuffix("_decode")
    if source == "disk":
        return ours_batches(setup.local_manifest, Storage(), transform, collate_fn, args)
    if source == "s3":
        return ours_batches(setup.s3_manifest, setup.s3_storage, transform, collate_fn, args)
    if source == "loose_s3":
        return loose_batches(setup.records, transform, collate_fn, args, (setup.s3_storage, setup.s3_images))
    return loose_batches(setup.records, transform, collate_fn, args)


def run_all(setup: Setup, args: argparse.Namespace) -> None:
    for rep in range(args.repeats):
        k = rep % len(VARIANTS)
        for variant in VARIANTS[k:] + VARIANTS[:k]:  # rotated so that no variant always runs first
            n = args.decode_batches if variant.endswith("_decode") else args.batches
            secs = time_batches(batches_for(variant, setup, args), args.warmup, n)
            setup.runs[variant].append(secs)
            log(f"rep {rep}: {variant:<13} {n * args.batch_size / secs:8.1f} samples/s ({secs:.2f} s, {n} batches)")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=400, help="synthetic COCO instances train images")
    p.add_argument("--min-size", type=int, default=480, help="smallest image side")
    p.add_argument("--max-size", type=int, default=640, help="largest image side")
    p.add_argument("--maxcount", type=int, default=64, help="samples per shard")
    p.add_argument("--image-size", type=int, default=512, help="LSJ crop size (the official recipe: 1024)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes, every variant")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--batches", type=int, default=200, help="timed batches per measurement (full transform)")
    p.add_argument("--decode-batches", type=int, default=600, help="timed batches per decode-only measurement")
    p.add_argument("--warmup", type=int, default=10, help="untimed batches before each measurement")
    p.add_argument("--repeats", type=int, default=5, help="repetitions; medians are reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", default=None, help="parent folder for temporary files (default: system temp)")
    args = p.parse_args(argv)
    if min(args.images, args.maxcount, args.image_size, args.batch_size, args.batches, args.decode_batches,
           args.repeats) < 1 or args.workers < 0 or args.warmup < 0:
        p.error("counts and sizes must be >= 1 (workers and warmup >= 0)")
    return args


def rate(setup: Setup, variant: str, args: argparse.Namespace) -> float:
    n = args.decode_batches if variant.endswith("_decode") else args.batches
    return n * args.batch_size / statistics.median(setup.runs[variant])


def paired(setup: Setup, num: str, den: str) -> float:
    """Median of the per-repetition rate ratios num / den."""
    return statistics.median(d / n for n, d in zip(setup.runs[num], setup.runs[den]))


def summary(setup: Setup, manifest: Manifest, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    r = {v: rate(setup, v, args) for v in VARIANTS}

    def transform_share(source: str) -> float:  # fraction of a sample's time that is transform + collate
        return 1 - r[source] / r[f"{source}_decode"]

    return {
        "bench": "loader_throughput",
        "ratio": round(r["disk"] / r["loose"], 3), "goal": GOAL,
        "s3_over_disk": round(r["s3"] / r["disk"], 3), "s3_goal": S3_GOAL,
        "disk_samples_per_s": round(r["disk"], 1), "s3_samples_per_s": round(r["s3"], 1),
        "loose_samples_per_s": round(r["loose"], 1),
        "loose_s3_samples_per_s": round(r["loose_s3"], 1),
        "ratio_s3_vs_loose_s3": round(r["s3"] / r["loose_s3"], 3),
        "decode_only": {"disk_samples_per_s": round(r["disk_decode"], 1),
                        "s3_samples_per_s": round(r["s3_decode"], 1),
                        "loose_samples_per_s": round(r["loose_decode"], 1),
                        "loose_s3_samples_per_s": round(r["loose_s3_decode"], 1),
                        "ratio": round(r["disk_decode"] / r["loose_decode"], 3),
                        "ratio_s3_vs_loose_s3": round(r["s3_decode"] / r["loose_s3_decode"], 3),
                        "s3_over_disk": round(r["s3_decode"] / r["disk_decode"], 3)},
        "transform_share_disk": round(transform_share("disk"), 3),
        "transform_share_loose": round(transform_share("loose"), 3),
        "paired_ratio_median": round(paired(setup, "disk", "loose"), 3),
        "paired_s3_over_disk_median": round(paired(setup, "s3", "disk"), 3),
        "image_size": args.image_size, "recipe": "lsj", "workers": args.workers, "batch_size": args.batch_size,
        "batches": args.batches, "decode_batches": args.decode_batches, "warmup": args.warmup,
        "repeats": args.repeats, **data,
        "shards": len(manifest.shards), "maxcount": args.maxcount,
        "runs_seconds": {v: [round(s, 3) for s in setup.runs[v]] for v in VARIANTS},
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-loader-", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        coco, shards, prep_s = prepare_data(tmp, args)
        image_bytes = [p.stat().st_size for p in (coco / "train2017").iterdir()]
        read_all(coco), read_all(shards)  # page cache
        manifest = load_manifest(Storage(), str(shards / "manifest.json"))
        records, ids = loose_records(coco)
        meta_same = same_annotations(records, shard_metas(shards)) and ids == manifest.contiguous_ids()
        log(f"{len(records)} images ({statistics.mean(image_bytes) / 1e3:.1f} kB mean JPEG), "
            f"{manifest.counts.annotations} annotations, {len(manifest.shards)} shards; generated + sharded "
            f"in {prep_s:.1f} s; baseline meta identical to the shards': {meta_same}")
        if not meta_same:
            log("WARNING: the loose-file baseline builds different annotations than the shards hold")
        full = functools.partial(lsj_sample, task=manifest.task, label_format=manifest.label_format,
                                 ids=manifest.contiguous_ids(), cfg=AugConfig(image_size=args.image_size))
        with moto_s3() as endpoint:
            t = time.perf_counter()
            s3_storage, s3_shards, sent = upload(endpoint, shards)
            _, s3_images, sent_images = upload(endpoint, coco / "train2017")
            log(f"uploaded {sent / 1e6:.1f} MB of shards and {sent_images / 1e6:.1f} MB of loose JPEGs to moto S3 "
                f"in {time.perf_counter() - t:.1f} s")
            setup = Setup(str(shards / "manifest.json"), f"{s3_shards}/manifest.json", s3_storage, s3_images,
                          records, full)
            run_all(setup, args)
    data = {"images": len(records), "annotations": manifest.counts.annotations,
            "mean_image_bytes": round(statistics.mean(image_bytes)), "meta_identical": meta_same,
            "prepare_seconds": round(prep_s, 1), "loadavg_1m_start": round(load_start, 2)}
    result = summary(setup, manifest, data, args)
    d = result["decode_only"]
    log(f"full (LSJ {args.image_size}): disk {result['disk_samples_per_s']} / S3 {result['s3_samples_per_s']} / "
        f"loose {result['loose_samples_per_s']} / loose on S3 {result['loose_s3_samples_per_s']} samples/s -> "
        f"ratio {result['ratio']} (goal {GOAL}), S3/disk {result['s3_over_disk']} (goal {S3_GOAL}), "
        f"S3 shards / S3 loose {result['ratio_s3_vs_loose_s3']}")
    log(f"decode only: disk {d['disk_samples_per_s']} / S3 {d['s3_samples_per_s']} / loose "
        f"{d['loose_samples_per_s']} samples/s -> ratio {d['ratio']}, S3/disk {d['s3_over_disk']}; "
        f"transform share of a sample's time: {result['transform_share_disk']:.0%} (disk)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
