"""Semantic segmentation metrics (mIoU, fwIoU, mACC, pACC) exactly as detectron2's ``SemSegEvaluator``.

The state is one confusion matrix of shape [K+1, K+1] (rows = prediction, columns = ground truth), the
last row/column collecting "no class": ground truth equal to the ignore label, and predictions equal to
it (what ADE20K's label 0 "other" becomes under :func:`reduce_zero_label`). Matrices of several images
(or processes) simply add up, so :func:`semseg_report` is the only place where metrics are computed.

Numbers are reported in percent. A class absent from the ground truth has no IoU/ACC and is left out of
the means, as in detectron2, even when it was predicted (its false positives still lower the IoU of the
classes whose pixels it took).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

IGNORE_LABEL = 255

__all__ = [
    "IGNORE_LABEL",
    "SemSegClassResult",
    "SemSegReport",
    "SemanticError",
    "confusion_matrix",
    "evaluate_semantic_folders",
    "reduce_zero_label",
    "semseg_report",
]


class SemanticError(ValueError):
    """Label maps that cannot be scored: mismatched shapes or files, values that are no class."""


def reduce_zero_label(labels: np.ndarray) -> np.ndarray:
    """ADE20K convention: label 0 ("other") becomes IGNORE_LABEL and class v becomes v - 1.

    labels: [H, W] integer array (any integer dtype; the ADE toolkit stores uint8 0..150).
    Returns a new array of the same shape and dtype. An IGNORE_LABEL already present stays
    IGNORE_LABEL (as mmsegmentation does) rather than turning into class 254.
    """
    labels = np.asarray(labels)
    # Shift in int64 so that uint8 0 - 1 cannot wrap to 255 by accident and be mistaken for "ignore".
    shifted = labels.astype(np.int64) - 1
    shifted[(labels == 0) | (labels == IGNORE_LABEL)] = IGNORE_LABEL
    return shifted.astype(labels.dtype)


# evaluate_semantic_folders' `reduce_zero_label` flag shadows the function; it calls it by this name.
_reduce = reduce_zero_label


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, name: str = "") -> np.ndarray:
    """Confusion matrix of one label map pair, as detectron2's ``SemSegEvaluator.process``.

    pred, gt: integer arrays of the same shape (normally [H, W]); values in [0, K) are classes and
    IGNORE_LABEL means "no class" (gt: ignored pixel; pred: nothing predicted).
    Returns [K+1, K+1] int64, rows = prediction, columns = ground truth, index K = IGNORE_LABEL.
    Raises SemanticError (naming `name`) on a shape mismatch or a value that is neither a class nor
    IGNORE_LABEL.
    """
    _check_num_classes(num_classes)
    label = name or "image"
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise SemanticError(
            f"{label}: prediction shape {pred.shape} differs from ground truth shape {gt.shape}"
        )
    pred = _to_rows(pred, num_classes, f"{label}: prediction")
    gt = _to_rows(gt, num_classes, f"{label}: ground truth")
    size = num_classes + 1
    counts = np.bincount((size * pred + gt).reshape(-1), minlength=size * size)
    return counts.reshape(size, size).astype(np.int64)


def _check_num_classes(num_classes: int) -> None:
    # IGNORE_LABEL is reserved for "no class", so class 255 could never be scored.
    if not 1 <= num_classes <= IGNORE_LABEL:
        raise ValueError(f"num_classes must be in [1, {IGNORE_LABEL}], got {num_classes}")


def _to_rows(labels: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    """Validate one label map and return it as int64 with IGNORE_LABEL moved to index K."""
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise SemanticError(f"{what} must hold integer labels, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    ignored = labels == IGNORE_LABEL
    bad = ((labels < 0) | (labels >= num_classes)) & ~ignored
    if bad.any():
        value = int(labels[bad].flat[0])
        raise SemanticError(
            f"{what} has value {value} ({int(bad.sum())} pixels), outside [0, {num_classes}) "
            f"and not the ignore label {IGNORE_LABEL}"
        )
    labels[ignored] = num_classes
    return labels


@dataclass
class SemSegClassResult:
    """One class's IoU and accuracy in percent; None where the class is absent from the ground truth."""

    index: int
    name: str | None
    iou: float | None
    acc: float | None

    @property
    def key(self) -> str:
        """The class name, or its index where no names were given."""
        return self.name if self.name is not None else str(self.index)


@dataclass
class SemSegReport:
    """Dataset-level metrics in percent (None where no pixel made them defined) and per-class results."""

    miou: float | None
    fwiou: float | None
    macc: float | None
    pacc: float | None
    per_class: list[SemSegClassResult] = field(default_factory=list)

    def to_json(self) -> dict:
        """{"mIoU", "fwIoU", "mACC", "pACC", "per_class": {name_or_index: {"IoU", "ACC"}}}; None -> null."""
        return {
            "mIoU": self.miou,
            "fwIoU": self.fwiou,
            "mACC": self.macc,
            "pACC": self.pacc,
            "per_class": {c.key: {"IoU": c.iou, "ACC": c.acc} for c in self.per_class},
        }

    def table(self) -> str:
        """Markdown table with one row per class (IoU and ACC in percent, "-" where undefined)."""
        lines = ["| class | IoU | ACC |", "|:--|--:|--:|"]
        lines += [f"| {c.key} | {_fmt(c.iou)} | {_fmt(c.acc)} |" for c in self.per_class]
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def semseg_report(conf: np.ndarray, class_names: Sequence[str] | None = None) -> SemSegReport:
    """Metrics of a summed confusion matrix, as detectron2's ``SemSegEvaluator.evaluate``.

    conf: [K+1, K+1] from :func:`confusion_matrix` (rows = prediction, columns = ground truth).
    class_names: K names, or None to key classes by index.

    One deliberate difference: pixels predicted as IGNORE_LABEL (row K) count in ``pos_gt`` as misses of
    their ground-truth class; detectron2 never sees such predictions (its argmax always picks a class).
    For predictions that never contain IGNORE_LABEL, row K is all zero and every number equals
    detectron2's exactly.
    """
    conf = np.asarray(conf)
    num_classes = _check_conf(conf, class_names)
    tp = conf.diagonal()[:-1].astype(np.float64)
    pos_gt = conf[:, :-1].sum(axis=0).astype(np.float64)  # all rows: "predicted nothing" is a miss
    pos_pred = conf[:-1, :-1].sum(axis=1).astype(np.float64)
    acc_valid = pos_gt > 0
    union = pos_gt + pos_pred - tp
    iou_valid = acc_valid & (union > 0)
    acc = np.full(num_classes, np.nan)
    iou = np.full(num_classes, np.nan)
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    total_gt = pos_gt.sum()
    fwiou = None
    if iou_valid.any():
        class_weights = pos_gt / total_gt
        fwiou = _percent(np.sum(iou[iou_valid] * class_weights[iou_valid]))
    return SemSegReport(
        miou=_percent(np.sum(iou[iou_valid]) / iou_valid.sum()) if iou_valid.any() else None,
        fwiou=fwiou,
        macc=_percent(np.sum(acc[acc_valid]) / acc_valid.sum()) if acc_valid.any() else None,
        pacc=_percent(np.sum(tp) / total_gt) if total_gt > 0 else None,
        per_class=_per_class(iou, acc, class_names),
    )


def _check_conf(conf: np.ndarray, class_names: Sequence[str] | None) -> int:
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1] or conf.shape[0] < 2:
        raise ValueError(f"confusion matrix must be [K+1, K+1] with K >= 1, got shape {conf.shape}")
    num_classes = conf.shape[0] - 1
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a confusion matrix of {num_classes} classes")
    return num_classes


def _percent(value: float) -> float:
    return 100.0 * float(value)


def _per_class(iou: np.ndarray, acc: np.ndarray, names: Sequence[str] | None) -> list[SemSegClassResult]:
    def maybe(value: float) -> float | None:
        return None if math.isnan(value) else _percent(value)

    return [
        SemSegClassResult(i, None if names is None else str(names[i]), maybe(iou[i]), maybe(acc[i]))
        for i in range(len(iou))
    ]


def evaluate_semantic_folders(
    gt_folder: str,
    pred_folder: str,
    num_classes: int,
    reduce_zero_label: bool = False,
    class_names: Sequence[str] | None = None,
    progress: bool = False,
) -> SemSegReport:
    """Score a folder of predicted label-map PNGs against a folder of ground-truth PNGs.

    Files are matched by stem; every ground truth needs a prediction and vice versa. Each PNG decodes
    (PIL) to an [H, W] integer map; with `reduce_zero_label` BOTH maps are shifted (the ADE toolkit
    format, 0 = other and 1..150 = classes, for ground truth and prediction alike).
    Raises SemanticError naming the file on any mismatch (missing partner, size, values, channels).
    """
    _check_num_classes(num_classes)
    pairs = _pair_files(Path(gt_folder), Path(pred_folder))
    conf = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for gt_path, pred_path in _progress(pairs, progress):
        gt, pred = _read_label_map(gt_path), _read_label_map(pred_path)
        if reduce_zero_label:
            gt, pred = _reduce(gt), _reduce(pred)
        # Values in errors are post-shift when reducing; say so, or "150" would look like a wrong report.
        shifted = ", values after reduce_zero_label" if reduce_zero_label else ""
        conf += confusion_matrix(pred, gt, num_classes, name=f"{pred_path} (ground truth {gt_path}{shifted})")
    return semseg_report(conf, class_names)


def _pair_files(gt_folder: Path, pred_folder: Path) -> list[tuple[Path, Path]]:
    """(gt, pred) paths matched by stem, sorted; SemanticError naming any file without a partner."""
    gts, preds = _pngs(gt_folder, "ground truth"), _pngs(pred_folder, "prediction")
    if not gts:
        raise SemanticError(f"no ground-truth PNG label maps in {gt_folder}")
    for stem, path in gts.items():
        if stem not in preds:
            raise SemanticError(f"no prediction for ground truth {path} (expected {pred_folder / (stem + '.png')})")
    for stem, path in preds.items():
        if stem not in gts:
            raise SemanticError(f"prediction {path} has no ground truth in {gt_folder}")
    return [(gts[stem], preds[stem]) for stem in sorted(gts)]


def _pngs(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise SemanticError(f"{what} folder {folder} is not a directory")
    return {p.stem: p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file()}


def _read_label_map(path: Path) -> np.ndarray:
    """[H, W] integer labels; palette PNGs give their indices, which are the labels."""
    with Image.open(path) as image:
        labels = np.array(image)
        mode = image.mode
    if labels.ndim != 2:
        raise SemanticError(f"{path}: expected a single-channel label map, got PIL mode {mode} shape {labels.shape}")
    return labels


def _progress(pairs: list[tuple[Path, Path]], enabled: bool) -> tqdm:
    # disable=None: show the bar only on a terminal, so logs of batch jobs stay clean.
    return tqdm(pairs, desc="semantic eval", unit="img", disable=None if enabled else True)
