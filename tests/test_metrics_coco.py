"""COCO box/mask AP: our wrapper equals pycocotools run directly, and fixes what pycocotools gets wrong
silently (annotation id 0, box area deciding mask-AP size ranges, results naming unknown items)."""
from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.metrics.coco import (
    STAT_NAMES,
    CocoEvalError,
    encode_masks,
    evaluate_coco,
    evaluate_coco_files,
    instance_results,
    load_coco_gt,
)

FIXTURES = Path(__file__).parent / "fixtures"
PANOPTIC_DETECTION_JSON = FIXTURES / "panopticapi/sample_data/panoptic_coco_detection_format.json"
COCO_DUMMY_JSON = FIXTURES / "mmdetection/tests/data/coco_dummy/annotations/instances_val2017.json"


def _direct_pycocotools(gt_json: dict, results: list[dict], iou_type: str) -> COCOeval:
    """pycocotools exactly as its README runs it, with detectron2's one change for masks (bbox dropped)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(gt_json)
        gt.createIndex()
        results = copy.deepcopy(results)
        if iou_type == "segm":
            for r in results:
                r.pop("bbox", None)
        ev = COCOeval(gt, gt.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _gt_as_results(gt_json: dict, iou_type: str) -> list[dict]:
    coco = load_coco_gt(gt_json)
    results = []
    for ann in gt_json["annotations"]:
        if ann["iscrowd"]:
            continue
        r = {"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0, "bbox": ann["bbox"]}
        if iou_type == "segm":
            rle = coco.annToRLE(ann)
            r["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode() if isinstance(
                rle["counts"], bytes) else rle["counts"]}
        results.append(r)
    return results


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_panopticapi_ground_truth_against_itself_gives_ap_1(iou_type):
    gt_json = json.loads(PANOPTIC_DETECTION_JSON.read_text())
    report = evaluate_coco(load_coco_gt(gt_json), _gt_as_results(gt_json, iou_type), iou_type)
    for name in ("AP", "AP50", "AP75"):
        assert report.stats[name] == 1.0, name
    # every size range that has ground truth is perfect too; the others are None (COCOeval's -1)
    assert {report.stats[n] for n in ("APs", "APm", "APl")} <= {1.0, None}
    scored = [c for c in report.per_category if c.ap is not None]
    non_crowd_categories = {a["category_id"] for a in gt_json["annotations"] if not a["iscrowd"]}
    assert {c.category_id for c in scored} == non_crowd_categories
    assert all(c.ap == pytest.approx(1.0, abs=1e-12) for c in scored)  # COCOeval divides by tp + fp + np.spacing(1)


def test_annotation_id_zero_is_renumbered_where_pycocotools_would_miss_it():
    """The fixture's first annotation has id 0: run directly, pycocotools counts its perfect match as a
    false positive (it stores matched GT ids and 0 means unmatched)."""
    gt_json = json.loads(PANOPTIC_DETECTION_JSON.read_text())
    assert gt_json["annotations"][0]["id"] == 0
    results = _gt_as_results(gt_json, "bbox")
    direct = _direct_pycocotools(gt_json, results, "bbox")
    assert direct.stats[0] < 1.0
    ours = evaluate_coco(load_coco_gt(gt_json), results, "bbox")
    assert ours.stats["AP"] == 1.0


def _perturbed_results(gt_json: dict, iou_type: str, seed: int = 0) -> list[dict]:
    """Detections of varying quality: jittered and shifted copies of the ground truth, some dropped,
    some relabelled, plus random false positives; seeded."""
    rng = np.random.default_rng(seed)
    coco = load_coco_gt(gt_json)
    images = {img["id"]: img for img in gt_json["images"]}
    category_ids = [c["id"] for c in gt_json["categories"]]
    results = []
    for ann in gt_json["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
        box = [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])]
        category = ann["category_id"] if rng.random() > 0.1 else int(rng.choice(category_ids))
        r = {"image_id": ann["image_id"], "category_id": category, "score": float(rng.random()), "bbox": box}
        if iou_type == "segm":
            mask = coco.annToMask(ann)
            mask = np.roll(mask, (round(jitter[1]), round(jitter[0])), axis=(0, 1))
            r["segmentation"] = encode_masks(mask[None].astype(bool))[0]
        results.append(r)
    for _ in range(15):
        image = images[int(rng.choice(list(images)))]
        H, W = image["height"], image["width"]
        x0, y0 = rng.uniform(0, W - 60), rng.uniform(0, H - 60)
        w, h = rng.uniform(5, 60), rng.uniform(5, 60)
        r = {"image_id": image["id"], "category_id": int(rng.choice(category_ids)), "score": float(rng.random()),
             "bbox": [x0, y0, w, h]}
        if iou_type == "segm":
            mask = np.zeros((H, W), bool)
            mask[int(y0):int(y0 + h), int(x0):int(x0 + w)] = True
            r["segmentation"] = encode_masks(mask[None])[0]
        results.append(r)
    return results


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ap_equals_pycocotools_run_directly(tmp_path, iou_type):
    gt_json = json.loads(COCO_DUMMY_JSON.read_text())  # ids already >= 1: nothing renumbered
    results = _perturbed_results(gt_json, iou_type)
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(results))

    direct = _direct_pycocotools(gt_json, results, iou_type)
    ours = evaluate_coco_files(str(COCO_DUMMY_JSON), str(results_path), iou_type)

    assert 0.05 < ours.stats["AP"] < 0.95  # a non-trivial case
    for name, value in zip(STAT_NAMES, direct.stats):
        assert ours.stats[name] == (None if value < 0 else value), name
    precision = direct.eval["precision"]
    for k, cat in enumerate(ours.per_category):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        assert cat.ap == (p.mean() if p.size else None)
    assert ours.num_results == len(results)
    assert "Average Precision" in ours.summary_text


def _square(H: int, W: int, y: int, x: int, size: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y:y + size, x:x + size] = True
    return mask


def test_mask_ap_size_ranges_use_mask_area_not_result_bbox():
    """A small false-positive mask reported with a large bbox: with the bbox kept, pycocotools would take
    the box area, file the false positive under 'large' and report APs 1.0; by mask area it is small."""
    H = W = 200
    small_gt, large_gt = _square(H, W, 10, 10, 20), _square(H, W, 60, 60, 120)
    gt_json = {"images": [{"id": 1, "height": H, "width": W}],
               "categories": [{"id": 1, "name": "thing"}],
               "annotations": [
                   {"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": float(m.sum()),
                    "bbox": list(mask_utils.toBbox(encode_masks(m[None])[0])), "segmentation": encode_masks(m[None])[0]}
                   for i, m in enumerate((small_gt, large_gt))]}
    false_positive = _square(H, W, 10, 150, 20)  # 400 px: 'small'
    results = [
        {"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [0, 0, 200, 200],
         "segmentation": encode_masks(false_positive[None])[0]},
        {"image_id": 1, "category_id": 1, "score": 0.8, "bbox": [10, 10, 20, 20],
         "segmentation": encode_masks(small_gt[None])[0]},
        {"image_id": 1, "category_id": 1, "score": 0.7, "bbox": [60, 60, 120, 120],
         "segmentation": encode_masks(large_gt[None])[0]},
    ]
    report = evaluate_coco(load_coco_gt(gt_json), results, "segm")
    # small range: FP (0.9) then TP (0.8): precision 0.5 at every recall level -> AP 0.5
    assert report.stats["APs"] == pytest.approx(0.5)
    assert report.stats["APl"] == pytest.approx(1.0)

    with contextlib.redirect_stdout(io.StringIO()):
        gt = load_coco_gt(gt_json)
        kept_bbox = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "segm")
        kept_bbox.evaluate()
        kept_bbox.accumulate()
        kept_bbox.summarize()
    assert kept_bbox.stats[3] == pytest.approx(1.0)  # the pitfall this wrapper avoids


def test_no_results_score_zero_where_ground_truth_exists():
    gt_json = json.loads(COCO_DUMMY_JSON.read_text())
    report = evaluate_coco(load_coco_gt(gt_json), [], "bbox")
    assert report.stats["AP"] == 0.0 and report.stats["AR100"] == 0.0
    assert report.num_results == 0


def test_instance_results_are_coco_json_with_compressed_rle():
    masks = np.zeros((2, 6, 8), bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 4:6, 0:8] = True
    results = instance_results(
        image_id=7, scores=np.array([0.9, 0.4]), classes=np.array([1, 0]),
        boxes_xyxy=np.array([[2.0, 1.0, 5.0, 3.0], [0.0, 4.0, 8.0, 6.0]]), masks=masks, category_ids=[3, 9])
    json.dumps(results)  # serialisable: counts are str
    assert [r["category_id"] for r in results] == [9, 3]
    assert results[0]["bbox"] == [2.0, 1.0, 3.0, 2.0]
    for r, m in zip(results, masks):
        assert isinstance(r["segmentation"]["counts"], str)
        assert r["segmentation"]["size"] == [6, 8]
        decoded = mask_utils.decode({"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"]})
        assert np.array_equal(decoded.astype(bool), m)
    boxes_only = instance_results(7, np.array([0.5]), np.array([0]), np.array([[0, 0, 1, 1.0]]), None, [3])
    assert "segmentation" not in boxes_only[0]


@pytest.mark.parametrize("bad, message", [
    ({"image_id": 424242}, "result 1: image_id 424242 is not in the ground truth"),
    ({"category_id": 999}, "result 1: category_id 999 is not in the ground truth"),
    ({"segmentation": {"size": [10, 10], "counts": "PPYo0"}}, "result 1: mask of size 10x10 (HxW) for image 139"),
])
def test_results_naming_unknown_items_are_refused_by_name(bad, message):
    gt_json = json.loads(COCO_DUMMY_JSON.read_text())
    results = _perturbed_results(gt_json, "segm")[:2]
    results[1] = {**results[1], "image_id": 139, **bad}
    with pytest.raises(CocoEvalError) as err:
        evaluate_coco(load_coco_gt(gt_json), results, "segm")
    assert message in str(err.value)


def test_results_without_the_field_the_iou_type_needs_are_refused():
    gt_json = json.loads(COCO_DUMMY_JSON.read_text())
    results = _perturbed_results(gt_json, "bbox")[:1]
    with pytest.raises(CocoEvalError, match="result 0: missing segmentation"):
        evaluate_coco(load_coco_gt(gt_json), results, "segm")


def test_ground_truth_annotation_naming_an_unknown_category_is_refused():
    gt_json = json.loads(COCO_DUMMY_JSON.read_text())
    gt_json["annotations"][3]["category_id"] = 4242
    with pytest.raises(CocoEvalError, match="names category_id 4242"):
        load_coco_gt(gt_json)
