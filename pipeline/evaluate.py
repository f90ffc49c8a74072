"""`maskdino evaluate`: a model on a shard manifest -> `report.json` and `per_class.md` in an output folder.

Each rank evaluates its block of the manifest (pipeline/eval_data.py) and the evaluators' partial states
are gathered on rank 0, which alone computes and writes the report. Run it as one process, or with
`torchrun --nproc-per-node N -m cli evaluate ...` for N ranks.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from core.manifest import Manifest, load_manifest
from core.shard_sample import ShardSample
from core.storage import Storage, join
from model.structures import ImageResult
from pipeline.distributed import gather_to_rank0, rank_and_world
from pipeline.eval_data import iter_eval_samples, num_batches
from pipeline.eval_settings import EvalSettings
from pipeline.evaluators import EvalInputError, Evaluator, TaskReport, make_evaluator
from pipeline.model_bundle import ModelBundle, build_bundle_model
from pipeline.transforms import image_tensor, resize_for_test

# Test-time resize (short side, max long side) per dataset, as the official configs evaluate.
TEST_RESIZE = {"coco_instances": (800, 1333), "coco_panoptic": (800, 1333), "ade20k": (512, 2048),
               "objects365_v1": (800, 1333), "objects365_v2": (800, 1333)}

# The number a task is judged by (registry promotion, summaries): (metrics key path, display name).
PRIMARY_METRIC = {"instance": (("segm", "AP"), "mask AP"), "detection": (("bbox", "AP"), "box AP"),
                  "panoptic": (("panoptic", "All", "pq"), "PQ"), "semantic": (("semantic", "mIoU"), "mIoU")}

Predictor = Callable[[list[np.ndarray]], list[ImageResult]]


@dataclass(frozen=True)
class EvalReport:
    task: str
    dataset: str
    split: str
    manifest: str
    model: str
    num_images: int
    world_size: int
    batches_per_rank: int
    seconds: float
    metrics: dict[str, Any]

    def primary(self) -> tuple[str, float | None]:
        """(display name, value) of the task's headline metric; AP and PQ are fractions, mIoU percent."""
        path, name = PRIMARY_METRIC[self.task]
        value: Any = self.metrics
        for key in path:
            value = value[key]
        return name, value

    def to_json(self) -> dict[str, Any]:
        name, value = self.primary()
        return {**asdict(self), "primary_metric": {"name": name, "value": value}}

    def headline(self) -> str:
        name, value = self.primary()
        return (f"{name} {format_metric(name, value)} on {self.num_images} {self.dataset}/{self.split} images "
                f"({self.world_size} rank{'s' if self.world_size > 1 else ''}, {self.seconds:.1f} s)")


def format_metric(name: str, value: float | None) -> str:
    """A headline metric in percent, as reports print it (AP and PQ are stored as fractions, mIoU in percent)."""
    if value is None:
        return "n/a"
    return f"{value:.2f}" if name == "mIoU" else f"{100 * value:.2f}"


def batched(samples: Iterable[ShardSample], batch_size: int) -> Iterator[list[ShardSample]]:
    batch: list[ShardSample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def model_predictor(model: torch.nn.Module, min_size: int, max_size: int) -> Predictor:
    """Images [H, W, 3] uint8 -> results at each image's original size (the model sees resized ones)."""
    device = next(model.parameters()).device

    def predict(images: list[np.ndarray]) -> list[ImageResult]:
        inputs = [image_tensor(resize_for_test(im, min_size, max_size)).to(device) for im in images]
        with torch.inference_mode():
            return model.predict(inputs, output_sizes=[im.shape[:2] for im in images])

    return predict


def run_evaluation(samples: Iterable[ShardSample], predict: Predictor, evaluator: Evaluator,
                   batch_size: int, bar: tqdm | None = None) -> int:
    """Feed every batch through `predict` into `evaluator`; returns the number of batches run."""
    count = 0
    for batch in batched(samples, batch_size):
        results = predict([s.image for s in batch])
        for sample, result in zip(batch, results):
            evaluator.process(sample, result)
        count += 1
        if bar is not None:
            bar.update(sum(not s.is_padding for s in batch))
    return count


def _test_resize(manifest: Manifest, settings: EvalSettings) -> tuple[int, int]:
    short, long = TEST_RESIZE.get(manifest.dataset, (800, 1333))
    return (short if settings.min_size < 0 else settings.min_size,
            long if settings.max_size < 0 else settings.max_size)


def _check_fits(bundle: ModelBundle, manifest: Manifest) -> None:
    if bundle.config.num_classes != len(manifest.categories):
        raise EvalInputError(f"the model predicts {bundle.config.num_classes} classes but the manifest "
                             f"({manifest.dataset}/{manifest.split}) has {len(manifest.categories)} categories")


def evaluate_predictor(predict: Predictor, manifest_uri: str, storage: Storage, settings: EvalSettings,
                       model_name: str = "", manifest: Manifest | None = None, progress: bool = True
                       ) -> tuple[EvalReport, TaskReport] | None:
    """Evaluate any predictor on this rank's share; the report on rank 0, None on the others.
    progress: a bar on rank 0's terminal."""
    rank, world = rank_and_world()
    manifest = manifest or load_manifest(storage, manifest_uri)
    evaluator = make_evaluator(manifest)
    total = min(settings.limit, manifest.counts.samples) if settings.limit else manifest.counts.samples
    started = time.perf_counter()
    samples = iter_eval_samples(storage, manifest_uri, rank, world, settings.limit, manifest)
    with tqdm(total=total, unit="images", desc=f"evaluate {manifest.dataset}/{manifest.split}",
              disable=None if progress and rank == 0 else True) as bar:
        batches = run_evaluation(samples, predict, evaluator, settings.batch_size, bar)
    expected = num_batches(total, world, settings.batch_size)
    if batches != expected:  # a rank that ran a different count would hang the collectives
        raise RuntimeError(f"rank {rank} ran {batches} batches, expected {expected}")
    partials = gather_to_rank0(evaluator.partial())
    if partials is None:
        return None
    task_report = evaluator.finish(partials)
    report = EvalReport(task=manifest.task, dataset=manifest.dataset, split=manifest.split, manifest=manifest_uri,
                        model=model_name, num_images=total, world_size=world, batches_per_rank=batches,
                        seconds=round(time.perf_counter() - started, 3), metrics=task_report.metrics)
    return report, task_report


def evaluate(bundle: ModelBundle, manifest_uri: str, storage: Storage, settings: EvalSettings,
             device: str = "cpu", progress: bool = True) -> tuple[EvalReport, TaskReport] | None:
    """Build the bundle's model on ``device`` and evaluate it on the manifest."""
    manifest = load_manifest(storage, manifest_uri)
    _check_fits(bundle, manifest)
    model = build_bundle_model(bundle, storage, device)
    min_size, max_size = _test_resize(manifest, settings)
    return evaluate_predictor(model_predictor(model, min_size, max_size), manifest_uri, storage, settings,
                              bundle.source, manifest, progress)


def write_report(storage: Storage, output: str, report: EvalReport, task_report: TaskReport) -> list[str]:
    """report.json, per_class.md and the task's extra files (COCO GT/results JSON); returns their URIs."""
    written = []
    files = {"report.json": (json.dumps(report.to_json(), indent=1) + "\n").encode(),
             "per_class.md": (f"# {report.dataset}/{report.split}: {report.headline()}\n\n"
                              f"{task_report.table}\n").encode(),
             **task_report.files}
    for name, data in files.items():
        uri = join(output, name)
        storage.write_bytes(uri, data)
        written.append(uri)
    return written


def read_report(storage: Storage, uri: str) -> EvalReport:
    """The :class:`EvalReport` in a report.json that :func:`write_report` wrote."""
    data = json.loads(storage.read_bytes(uri))
    return EvalReport(**{f.name: data[f.name] for f in fields(EvalReport)})
