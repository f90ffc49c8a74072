"""Semantic mIoU: identical to detectron2's SemSegEvaluator maths, 100 on the real ADE20K identity case,
ignore/"no class" handling, the detectron2 convention for classes absent from the ground truth, and errors
that name the file."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.metrics.semantic import (
    IGNORE_LABEL,
    SemanticError,
    confusion_matrix,
    evaluate_semantic_folders,
    reduce_zero_label,
    semseg_report,
)

ADE = Path(__file__).parent / "fixtures" / "sceneparsing"
ADE_GT = ADE / "sampleData" / "annotations"
ADE_PRED = ADE / "sampleData" / "predictions"


def ade_class_names() -> list[str]:
    with open(ADE / "objectInfo150.csv", newline="") as f:
        return [row["Name"] for row in csv.DictReader(f)]


def copy_predictions(tmp_path: Path) -> Path:
    folder = tmp_path / "pred"
    shutil.copytree(ADE_PRED, folder)
    return folder


def d2_sem_seg_metrics(pairs: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> dict:
    """Direct transcription of detectron2 SemSegEvaluator.process + evaluate (float64 for np.float)."""
    conf_matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for pred, gt in pairs:
        pred = np.array(pred, dtype=int)
        gt = np.array(gt, dtype=int)
        gt[gt == 255] = num_classes
        conf_matrix += np.bincount(
            (num_classes + 1) * pred.reshape(-1) + gt.reshape(-1), minlength=conf_matrix.size
        ).reshape(conf_matrix.shape)
    acc = np.full(num_classes, np.nan, dtype=np.float64)
    iou = np.full(num_classes, np.nan, dtype=np.float64)
    tp = conf_matrix.diagonal()[:-1].astype(np.float64)
    pos_gt = np.sum(conf_matrix[:-1, :-1], axis=0).astype(np.float64)
    class_weights = pos_gt / np.sum(pos_gt)
    pos_pred = np.sum(conf_matrix[:-1, :-1], axis=1).astype(np.float64)
    acc_valid = pos_gt > 0
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    union = pos_gt + pos_pred - tp
    iou_valid = np.logical_and(acc_valid, union > 0)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    macc = np.sum(acc[acc_valid]) / np.sum(acc_valid)
    miou = np.sum(iou[iou_valid]) / np.sum(iou_valid)
    fiou = np.sum(iou[iou_valid] * class_weights[iou_valid])
    pacc = np.sum(tp) / np.sum(pos_gt)
    return {"conf": conf_matrix, "mIoU": 100 * miou, "fwIoU": 100 * fiou, "mACC": 100 * macc,
            "pACC": 100 * pacc, "IoU": 100 * iou, "ACC": 100 * acc}


# --- the real ADE20K fixture -------------------------------------------------------------------------


def test_ade_identity_predictions_score_100():
    report = evaluate_semantic_folders(str(ADE_GT), str(ADE_PRED), num_classes=150, reduce_zero_label=True,
                                       class_names=ade_class_names())
    assert report.miou == 100.0
    assert report.macc == 100.0
    assert report.pacc == 100.0
    # fwIoU sums IoU * pos_gt / sum(pos_gt) over classes: exact 1 only up to float rounding.
    assert report.fwiou == pytest.approx(100.0, abs=1e-9)
    assert report.per_class[0].name == "wall" and report.per_class[0].iou == 100.0


def test_ade_valid_classes_are_the_distinct_nonzero_gt_labels():
    present = set()
    for path in ADE_GT.glob("*.png"):
        present |= set(np.unique(np.array(Image.open(path))).tolist())
    present.discard(0)  # "other" is not a class
    report = evaluate_semantic_folders(str(ADE_GT), str(ADE_PRED), num_classes=150, reduce_zero_label=True)
    valid = {c.index for c in report.per_class if c.iou is not None}
    assert valid == {v - 1 for v in present}  # class v is stored at index v - 1 after the shift
    assert len(valid) == 15
    assert all((c.iou is None) == (c.acc is None) for c in report.per_class)


def test_ade_other_pixels_never_count(tmp_path):
    # Predict a real class (varying per image) wherever the ground truth says 0 = "other": still 100.
    pred_folder = tmp_path / "pred"
    pred_folder.mkdir()
    for i, path in enumerate(sorted(ADE_GT.glob("*.png"))):
        labels = np.array(Image.open(path))
        labels[labels == 0] = 7 + 40 * i
        Image.fromarray(labels).save(pred_folder / path.name)
    report = evaluate_semantic_folders(str(ADE_GT), str(pred_folder), num_classes=150, reduce_zero_label=True)
    assert (report.miou, report.macc, report.pacc) == (100.0, 100.0, 100.0)
    assert report.fwiou == pytest.approx(100.0, abs=1e-9)


# --- hand-computed cases -----------------------------------------------------------------------------


def test_predicted_class_absent_from_gt_is_left_out_but_its_false_positives_cost():
    gt = np.array([[0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
    pred = np.array([[0, 0, 0, 0, 2, 2, 1, 1, 0, 1]])
    report = semseg_report(confusion_matrix(pred, gt, num_classes=3), ["a", "b", "c"])
    # class 0: tp 4, pos_gt 6, pos_pred 5 (four hits + one gt-1 pixel) -> union 6+5-4 = 7, IoU 4/7, ACC 4/6
    # class 1: tp 3, pos_gt 4, pos_pred 3 -> union 4, IoU 3/4, ACC 3/4
    # class 2: predicted twice but never in gt -> no IoU; its 2 pixels are class 0's misses
    assert report.per_class[0].iou == pytest.approx(100 * 4 / 7)
    assert report.per_class[1].iou == pytest.approx(75.0)
    assert report.per_class[2].iou is None and report.per_class[2].acc is None
    assert report.miou == pytest.approx(100 * 37 / 56)  # (4/7 + 3/4) / 2 = (16 + 21) / 56 = 66.07
    assert report.fwiou == pytest.approx(100 * 9 / 14)  # 6/10 * 4/7 + 4/10 * 3/4 = 2.4/7 + 2.1/7 = 64.29
    assert report.macc == pytest.approx(100 * 17 / 24)  # (4/6 + 3/4) / 2 = (8 + 9) / 24 = 70.83
    assert report.pacc == pytest.approx(70.0)  # 7 of 10 pixels right


def test_gt_ignore_never_counts():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 1])
    base = semseg_report(confusion_matrix(pred, gt, num_classes=2))
    # Extra ignored gt pixels, predicted as every class: nothing changes.
    gt_ign = np.concatenate([gt, [IGNORE_LABEL] * 3])
    pred_ign = np.concatenate([pred, [0, 1, IGNORE_LABEL]])
    ignored = semseg_report(confusion_matrix(pred_ign, gt_ign, num_classes=2))
    assert ignored.to_json() == base.to_json()
    assert base.miou == 100.0


def test_pred_no_class_counts_as_a_miss():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, IGNORE_LABEL, 1, 1])
    report = semseg_report(confusion_matrix(pred, gt, num_classes=2))
    # class 0: tp 1, pos_gt 2 (the unpredicted pixel included), pos_pred 1 -> union 2, IoU 1/2, ACC 1/2
    # class 1: perfect
    assert report.per_class[0].iou == 50.0 and report.per_class[0].acc == 50.0
    assert report.miou == 75.0  # (1/2 + 1) / 2
    assert report.macc == 75.0
    assert report.pacc == 75.0  # 3 of 4
    assert report.fwiou == 75.0  # 1/2 * 1/2 + 1/2 * 1


def test_all_ignored_gives_none_metrics():
    report = semseg_report(confusion_matrix(np.array([0, 1]), np.array([255, 255]), num_classes=2))
    assert (report.miou, report.fwiou, report.macc, report.pacc) == (None, None, None, None)
    assert report.to_json()["per_class"] == {"0": {"IoU": None, "ACC": None}, "1": {"IoU": None, "ACC": None}}


def test_reduce_zero_label_ade_convention():
    labels = np.array([[0, 1, 2], [150, 255, 0]], dtype=np.uint8)
    reduced = reduce_zero_label(labels)
    assert reduced.dtype == np.uint8
    assert reduced.tolist() == [[255, 0, 1], [149, 255, 255]]
    assert labels.tolist() == [[0, 1, 2], [150, 255, 0]]  # input untouched


def test_report_json_and_table():
    report = semseg_report(confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 0]), num_classes=3),
                           ["wall", "sky", "tree"])
    # class 0: tp 1, pos_gt 2, pos_pred 1 -> IoU 1/2; class 1: tp 1, pos_gt 1, pos_pred 2 -> IoU 1/2
    out = report.to_json()
    assert out["mIoU"] == 50.0 and out["pACC"] == pytest.approx(100 * 2 / 3)
    assert out["per_class"]["tree"] == {"IoU": None, "ACC": None}
    assert out["per_class"]["sky"] == {"IoU": 50.0, "ACC": 100.0}
    table = report.table().splitlines()
    assert table[0] == "| class | IoU | ACC |"
    assert table[2:] == ["| wall | 50.00 | 50.00 |", "| sky | 50.00 | 100.00 |", "| tree | - | - |"]


# --- equivalence with detectron2 ---------------------------------------------------------------------


def test_equals_detectron2_sem_seg_evaluator_on_random_data():
    rng = np.random.default_rng(0)
    num_classes = 9
    pairs = []
    for shape in [(31, 47), (20, 20), (64, 15)]:
        gt = rng.integers(0, num_classes - 2, size=shape)  # classes 7 and 8 never in gt: NaN in detectron2
        gt[rng.random(shape) < 0.1] = IGNORE_LABEL
        pred = np.where(rng.random(shape) < 0.6, gt % num_classes, rng.integers(0, num_classes, size=shape))
        pred[gt == IGNORE_LABEL] = rng.integers(0, num_classes, size=int((gt == IGNORE_LABEL).sum()))
        pairs.append((pred, gt.astype(np.uint8)))
    expected = d2_sem_seg_metrics(pairs, num_classes)
    conf = sum(confusion_matrix(p, g, num_classes) for p, g in pairs)
    np.testing.assert_array_equal(conf, expected["conf"])
    report = semseg_report(conf)
    # Same integer counts, same float operations: equal to the last bit.
    assert (report.miou, report.fwiou, report.macc, report.pacc) == (
        expected["mIoU"], expected["fwIoU"], expected["mACC"], expected["pACC"])
    ours_iou = np.array([np.nan if c.iou is None else c.iou for c in report.per_class])
    ours_acc = np.array([np.nan if c.acc is None else c.acc for c in report.per_class])
    np.testing.assert_array_equal(ours_iou, expected["IoU"])
    np.testing.assert_array_equal(ours_acc, expected["ACC"])
    assert np.isnan(expected["IoU"][7:]).all()


# --- errors ------------------------------------------------------------------------------------------


def test_wrong_size_prediction_names_file_and_both_sizes(tmp_path):
    pred_folder = copy_predictions(tmp_path)
    bad = pred_folder / "ADE_val_00000002.png"
    Image.open(bad).crop((0, 0, 100, 50)).save(bad)
    with pytest.raises(SemanticError) as err:
        evaluate_semantic_folders(str(ADE_GT), str(pred_folder), num_classes=150, reduce_zero_label=True)
    message = str(err.value)
    assert "ADE_val_00000002.png" in message
    assert "(50, 100)" in message and "(364, 500)" in message
    assert "\n" not in message


def test_out_of_range_values_name_image_and_value():
    with pytest.raises(SemanticError, match=r"img7: prediction has value 5 .*\[0, 5\)"):
        confusion_matrix(np.array([0, 5]), np.array([0, 1]), num_classes=5, name="img7")
    with pytest.raises(SemanticError, match="img7: ground truth has value -1"):
        confusion_matrix(np.array([0, 1]), np.array([0, -1]), num_classes=5, name="img7")
    with pytest.raises(SemanticError, match="must hold integer labels"):
        confusion_matrix(np.array([0.0, 1.0]), np.array([0, 1]), num_classes=5)


def test_out_of_range_value_in_folder_names_file(tmp_path):
    pred_folder = copy_predictions(tmp_path)
    bad = pred_folder / "ADE_val_00000001.png"
    labels = np.array(Image.open(bad))
    labels[10, 10] = 200  # no ADE class: 200 - 1 = 199 >= 150 after the shift
    Image.fromarray(labels).save(bad)
    with pytest.raises(SemanticError, match=r"ADE_val_00000001.png.*after reduce_zero_label.*value 199"):
        evaluate_semantic_folders(str(ADE_GT), str(pred_folder), num_classes=150, reduce_zero_label=True)


def test_missing_prediction_file_is_named(tmp_path):
    pred_folder = copy_predictions(tmp_path)
    (pred_folder / "ADE_val_00000003.png").unlink()
    with pytest.raises(SemanticError, match=r"no prediction for ground truth .*ADE_val_00000003.png"):
        evaluate_semantic_folders(str(ADE_GT), str(pred_folder), num_classes=150, reduce_zero_label=True)


def test_prediction_without_gt_is_named(tmp_path):
    pred_folder = copy_predictions(tmp_path)
    shutil.copy(pred_folder / "ADE_val_00000003.png", pred_folder / "ADE_val_00000099.png")
    with pytest.raises(SemanticError, match=r"ADE_val_00000099.png has no ground truth"):
        evaluate_semantic_folders(str(ADE_GT), str(pred_folder), num_classes=150, reduce_zero_label=True)


def test_rgb_label_map_is_rejected(tmp_path):
    pred_folder = copy_predictions(tmp_path)
    path = pred_folder / "ADE_val_00000001.png"
    Image.open(path).convert("RGB").save(path)
    with pytest.raises(SemanticError, match=r"ADE_val_00000001.png: expected a single-channel label map"):
        evaluate_semantic_folders(str(ADE_GT), str(pred_folder), num_classes=150, reduce_zero_label=True)


def test_shape_mismatch_and_bad_arguments():
    with pytest.raises(SemanticError, match=r"x: prediction shape \(2, 3\) differs from ground truth shape \(3, 2\)"):
        confusion_matrix(np.zeros((2, 3), int), np.zeros((3, 2), int), num_classes=2, name="x")
    with pytest.raises(ValueError, match="2 class names for a confusion matrix of 3 classes"):
        semseg_report(np.zeros((4, 4), np.int64), ["a", "b"])
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(np.zeros(2, int), np.zeros(2, int), num_classes=256)
