"""pipeline.metrics.panoptic: COCO panoptic quality equal to cocodataset/panopticapi's pq_compute.

Three kinds of checks:
* the real COCO panoptic sample (tests/fixtures/panopticapi) scored against itself, and against
  perturbed predictions compared with `_reference_image_stats`, a direct transcription of
  panopticapi's per-image loop (pq_compute_single_core) and of its pq_average;
* 10x10 hand-made images pinning each rule, expected values worked out in the comments;
* one error test per inconsistent-input case.
"""
from __future__ import annotations

import json
import pickle
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.metrics.panoptic import (
    VOID,
    PanopticCategory,
    PanopticError,
    PQStats,
    SegmentInfo,
    categories_from_json,
    combine_stats,
    evaluate_panoptic_folders,
    id2rgb,
    pq_image_stats,
    pq_report,
    rgb2id,
    segments_from_json,
)

SAMPLE = Path(__file__).parent / "fixtures" / "panopticapi" / "sample_data"
GT_JSON = SAMPLE / "panoptic_examples.json"
GT_FOLDER = SAMPLE / "panoptic_examples"


# ----------------------------------------------------------------------------- panopticapi transcription


def _reference_image_stats(image_id, pan_gt, gt_segments_info, pan_pred, pred_segments_info, categories):
    """panopticapi pq_compute_single_core for one image, kept as close to the original as possible
    (dicts, np.unique over gt * OFFSET + pred). Returns {category_id: [iou, tp, fp, fn]}."""
    offset = 256 * 256 * 256
    pq_stat = defaultdict(lambda: [0.0, 0, 0, 0])
    gt_segms = {el["id"]: dict(el) for el in gt_segments_info}
    pred_segms = {el["id"]: dict(el) for el in pred_segments_info}

    pred_labels_set = {el["id"] for el in pred_segments_info}
    labels, labels_cnt = np.unique(pan_pred, return_counts=True)
    for label, label_cnt in zip(labels, labels_cnt):
        if label not in pred_segms:
            if label == VOID:
                continue
            raise KeyError(f"{image_id}: segment {label} in PNG, not in JSON")
        pred_segms[label]["area"] = label_cnt
        pred_labels_set.remove(label)
        assert pred_segms[label]["category_id"] in categories
    assert not pred_labels_set

    pan_gt_pred = pan_gt.astype(np.uint64) * offset + pan_pred.astype(np.uint64)
    gt_pred_map = {}
    labels, labels_cnt = np.unique(pan_gt_pred, return_counts=True)
    for label, intersection in zip(labels, labels_cnt):
        gt_pred_map[(label // offset, label % offset)] = intersection

    gt_matched, pred_matched = set(), set()
    for (gt_label, pred_label), intersection in gt_pred_map.items():
        if gt_label not in gt_segms or pred_label not in pred_segms:
            continue
        if gt_segms[gt_label]["iscrowd"] == 1:
            continue
        if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
            continue
        union = (pred_segms[pred_label]["area"] + gt_segms[gt_label]["area"] - intersection
                 - gt_pred_map.get((VOID, pred_label), 0))
        iou = intersection / union
        if iou > 0.5:
            pq_stat[gt_segms[gt_label]["category_id"]][1] += 1
            pq_stat[gt_segms[gt_label]["category_id"]][0] += iou
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)

    crowd_labels_dict = {}
    for gt_label, gt_info in gt_segms.items():
        if gt_label in gt_matched:
            continue
        if gt_info["iscrowd"] == 1:
            crowd_labels_dict[gt_info["category_id"]] = gt_label
            continue
        pq_stat[gt_info["category_id"]][3] += 1

    for pred_label, pred_info in pred_segms.items():
        if pred_label in pred_matched:
            continue
        intersection = gt_pred_map.get((VOID, pred_label), 0)
        if pred_info["category_id"] in crowd_labels_dict:
            intersection += gt_pred_map.get((crowd_labels_dict[pred_info["category_id"]], pred_label), 0)
        if intersection / pred_info["area"] > 0.5:
            continue
        pq_stat[pred_info["category_id"]][2] += 1
    return pq_stat


def _reference_average(pq_stat, categories, isthing):
    """panopticapi PQStat.pq_average (without its division by zero when n == 0)."""
    pq, sq, rq, n = 0, 0, 0, 0
    for label, info in categories.items():
        if isthing is not None and (info["isthing"] == 1) != isthing:
            continue
        iou, tp, fp, fn = pq_stat[label]
        if tp + fp + fn == 0:
            continue
        n += 1
        pq += iou / (tp + 0.5 * fp + 0.5 * fn)
        sq += iou / tp if tp != 0 else 0
        rq += tp / (tp + 0.5 * fp + 0.5 * fn)
    return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}


def _as_reference(stats: PQStats) -> dict[int, list]:
    return {int(c): [float(stats.iou[i]), int(stats.tp[i]), int(stats.fp[i]), int(stats.fn[i])]
            for i, c in enumerate(stats.category_ids)}


def _assert_same(ours: PQStats, ref: dict, category_ids) -> None:
    for i, c in enumerate(category_ids):
        iou, tp, fp, fn = ref.get(c, [0.0, 0, 0, 0])
        assert (int(ours.tp[i]), int(ours.fp[i]), int(ours.fn[i])) == (tp, fp, fn), f"category {c}"
        assert ours.iou[i] == pytest.approx(iou, abs=1e-12), f"category {c}"


# ----------------------------------------------------------------------------- real fixture


@pytest.fixture(scope="module")
def gt_doc() -> dict:
    return json.loads(GT_JSON.read_text())


@pytest.fixture(scope="module")
def gt_maps(gt_doc) -> dict[int, np.ndarray]:
    return {a["image_id"]: rgb2id(np.asarray(Image.open(GT_FOLDER / a["file_name"]).convert("RGB")))
            for a in gt_doc["annotations"]}


def test_real_sample_against_itself_is_perfect_with_n_counting_non_crowd_categories(gt_doc):
    report = evaluate_panoptic_folders(str(GT_JSON), str(GT_FOLDER), str(GT_JSON), str(GT_FOLDER))
    isthing = {c["id"]: c["isthing"] for c in gt_doc["categories"]}
    scored = {s["category_id"] for a in gt_doc["annotations"] for s in a["segments_info"] if not s["iscrowd"]}
    # A crowd-only category would be left out (its self-prediction lies wholly on its own crowd
    # region, so it is no FP); here the crowd person / horse regions also have non-crowd segments.
    # person, truck, horse, sports ball (things); gravel, tree, sky, grass (stuff)
    assert sorted(scored) == [1, 8, 19, 37, 125, 184, 187, 193]
    for summary, n in [(report.all, len(scored)),
                       (report.things, sum(isthing[c] for c in scored)),
                       (report.stuff, sum(not isthing[c] for c in scored))]:
        assert (summary.pq, summary.sq, summary.rq, summary.n) == (1.0, 1.0, 1.0, n)
    assert report.things.n == 4 and report.stuff.n == 4
    person = next(c for c in report.per_class if c.category_id == 1)
    # 13 + 13 non-crowd persons over the two images; the two crowd persons are neither TP nor FP/FN.
    assert (person.tp, person.fp, person.fn) == (26, 0, 0)


def _relabel(ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[int, int]]:
    """Give every segment a new random id (so nothing can rely on gt and pred ids agreeing)."""
    old = np.unique(ids)
    old = old[old != VOID]
    new = rng.choice(np.arange(1, 256**3), size=len(old), replace=False)
    lut = dict(zip(old.tolist(), new.tolist()))
    out = np.zeros_like(ids)
    for o, n in lut.items():
        out[ids == o] = n
    return out, lut


def _boundary(ids: np.ndarray) -> np.ndarray:
    b = np.zeros(ids.shape, bool)
    b[1:, :] |= ids[1:, :] != ids[:-1, :]
    b[:-1, :] |= ids[:-1, :] != ids[1:, :]
    b[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    b[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    return b


def _perturb(ids: np.ndarray, segments: list[dict], rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """A prediction derived from the GT: shifted, eroded, one segment relabelled to another category,
    two persons merged, one segment dropped to VOID, one grown over its neighbours, a void patch, a
    spurious segment, then new ids. Crowd regions become plain predictions of their category."""
    cat = {s["id"]: s["category_id"] for s in segments}
    pred = np.roll(ids, shift=(int(rng.integers(-6, 7)), int(rng.integers(-6, 7))), axis=(0, 1))
    for _ in range(2):  # erode twice: thin segments may fall below IoU 0.5
        pred = np.where(_boundary(pred), VOID, pred)
    persons = [s["id"] for s in segments if s["category_id"] == 1 and not s["iscrowd"]]
    others = [s["id"] for s in segments if s["id"] not in persons[:2]]
    pred[pred == persons[1]] = persons[0]  # merge two persons
    relabel, drop, grow = rng.choice(others, size=3, replace=False).tolist()
    cat[relabel] = 8 if cat[relabel] != 8 else 1  # relabel to another category (truck / person)
    pred[pred == drop] = VOID
    rows, cols = np.nonzero(ids == grow)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    pred[max(r0 - 8, 0):r1 + 8, max(c0 - 8, 0):c1 + 8] = grow  # grow: a bounding box around it
    h, w = ids.shape
    pred[h // 3:h // 3 + 40, w // 2:w // 2 + 60] = VOID
    pred[h - 30:h - 5, 5:60] = 1  # a spurious segment with a fresh id
    cat[1] = 125
    pred, lut = _relabel(pred, rng)
    info = [{"id": lut[o], "category_id": cat[o]} for o in lut]
    rng.shuffle(info)
    return pred, info


def test_perturbed_predictions_on_real_sample_equal_panopticapi_per_image(gt_doc, gt_maps):
    categories = {c["id"]: c for c in gt_doc["categories"]}
    cat_ids = [c["id"] for c in gt_doc["categories"]]
    rng = np.random.default_rng(0)
    seen_fp = seen_fn = 0
    for trial in range(3):
        for ann in gt_doc["annotations"]:
            gt = gt_maps[ann["image_id"]]
            pred, pred_info = _perturb(gt, ann["segments_info"], rng)
            ours = pq_image_stats(ann["image_id"], gt, segments_from_json(ann["segments_info"]),
                                  pred, segments_from_json(pred_info), cat_ids)
            ref = _reference_image_stats(ann["image_id"], gt, ann["segments_info"], pred, pred_info, categories)
            _assert_same(ours, ref, cat_ids)
            seen_fp += int(ours.fp.sum())
            seen_fn += int(ours.fn.sum())
    assert seen_fp > 0 and seen_fn > 0  # the perturbations do exercise FP and FN


def test_folder_scorer_on_perturbed_pngs_equals_panopticapi_averages(gt_doc, gt_maps, tmp_path):
    categories = {c["id"]: c for c in gt_doc["categories"]}
    rng = np.random.default_rng(1)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    anns, total = [], defaultdict(lambda: [0.0, 0, 0, 0])
    for ann in reversed(gt_doc["annotations"]):  # prediction order differs from GT order
        gt = gt_maps[ann["image_id"]]
        pred, info = _perturb(gt, ann["segments_info"], rng)
        name = f"pred_{ann['image_id']}.png"
        Image.fromarray(id2rgb(pred)).save(pred_dir / name)
        anns.append({"image_id": ann["image_id"], "file_name": name, "segments_info": info})
        for c, v in _reference_image_stats(ann["image_id"], gt, ann["segments_info"], pred, info,
                                           categories).items():
            total[c] = [a + b for a, b in zip(total[c], v)]
    (tmp_path / "pred.json").write_text(json.dumps({"annotations": anns}))

    report = evaluate_panoptic_folders(str(GT_JSON), str(GT_FOLDER), str(tmp_path / "pred.json"),
                                       str(pred_dir), workers=2)
    for summary, isthing in [(report.all, None), (report.things, True), (report.stuff, False)]:
        ref = _reference_average(total, categories, isthing)
        assert summary.n == ref["n"]
        for key in ("pq", "sq", "rq"):
            assert getattr(summary, key) == pytest.approx(ref[key], abs=1e-12)
    assert report.all.pq < 1.0
    doc = report.to_json()
    assert set(doc) == {"All", "Things", "Stuff", "per_class"}
    assert doc["per_class"]["1"]["tp"] == total[1][1]


@pytest.mark.parametrize("block", [1, 8], ids=["pixel_noise", "8px_blocks"])
def test_random_maps_equal_panopticapi(block):
    # Pixel noise takes the sort-every-pixel path of the pair counting, blocks the run-collapsing one.
    rng = np.random.default_rng(block)
    categories = {c: {"isthing": int(c < 3)} for c in (1, 2, 3, 4)}
    for _ in range(5):
        gt = np.repeat(np.repeat(rng.integers(0, 7, (12, 16)), block, 0), block, 1)
        pred = np.where(rng.random(gt.shape) < 0.7, gt + 100, rng.integers(100, 106, gt.shape))
        pred[pred == 100] = VOID
        gt_info = [{"id": int(i), "category_id": int(rng.integers(1, 5)), "iscrowd": int(rng.random() < 0.3),
                    "area": int((gt == i).sum())} for i in np.unique(gt) if i != VOID]
        pred_info = [{"id": int(i), "category_id": int(rng.integers(1, 5))} for i in np.unique(pred) if i != VOID]
        ours = pq_image_stats(0, gt, segments_from_json(gt_info), pred, segments_from_json(pred_info), [1, 2, 3, 4])
        _assert_same(ours, _reference_image_stats(0, gt, gt_info, pred, pred_info, categories), [1, 2, 3, 4])


# ----------------------------------------------------------------------------- hand-made 10x10 cases

CATS = [PanopticCategory(1, "person", True), PanopticCategory(2, "grass", False),
        PanopticCategory(3, "dog", True), PanopticCategory(4, "sky", False)]
CAT_IDS = [c.id for c in CATS]


def layout(*runs: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """10x10 gt and pred id maps from (gt_id, pred_id, pixels) runs in raster order: each run is
    the set of pixels where gt is gt_id and pred is pred_id, so intersections can be read off."""
    gt = np.concatenate([np.full(n, g) for g, _, n in runs])
    pred = np.concatenate([np.full(n, p) for _, p, n in runs])
    assert gt.size == 100
    return gt.reshape(10, 10), pred.reshape(10, 10)


def stats_of(runs, gt_segs, pred_segs, cat_ids=CAT_IDS) -> dict[int, tuple]:
    """{category_id: (tp, fp, fn, iou)} for categories with any count."""
    gt, pred = layout(*runs)
    s = pq_image_stats(7, gt, gt_segs, pred, pred_segs, cat_ids)
    return {int(c): (int(s.tp[i]), int(s.fp[i]), int(s.fn[i]), float(s.iou[i]))
            for i, c in enumerate(s.category_ids) if s.tp[i] + s.fp[i] + s.fn[i]}


GT_A_B = [SegmentInfo(1, 1), SegmentInfo(2, 2)]  # gt: person A (id 1), grass B (id 2)
PRED_A_B = [SegmentInfo(11, 1), SegmentInfo(12, 2)]


def test_iou_just_above_half_matches():
    # A = 20 px; pred A' = A + 19 px of B -> IoU 20 / (39 + 20 - 20) = 20/39 = 0.5128 > 0.5.
    # B = 80 px; B' = the other 61 px of B -> IoU 61 / (61 + 80 - 61) = 61/80.
    runs = [(1, 11, 20), (2, 11, 19), (2, 12, 61)]
    got = stats_of(runs, GT_A_B, PRED_A_B)
    assert got == {1: (1, 0, 0, pytest.approx(20 / 39, abs=1e-15)), 2: (1, 0, 0, pytest.approx(61 / 80))}


@pytest.mark.parametrize("extra", [20, 21], ids=["iou_exactly_half", "iou_just_below_half"])
def test_iou_exactly_half_or_below_is_fn_plus_fp(extra):
    # A' = A (20) + `extra` px of B: IoU 20/40 = 0.5 (not > 0.5) or 20/41 -> A is FN, A' is FP
    # (A' has no VOID and there is no crowd). B' = 80 - extra px inside B: IoU (80 - extra) / 80.
    runs = [(1, 11, 20), (2, 11, extra), (2, 12, 80 - extra)]
    got = stats_of(runs, GT_A_B, PRED_A_B)
    assert got == {1: (0, 1, 1, 0.0), 2: (1, 0, 0, pytest.approx((80 - extra) / 80))}


def test_prediction_pixels_on_void_are_discounted_from_the_union():
    # gt: A = 20 px, VOID 20 px, B 60 px. A' = 15 px on A + 10 px on VOID = 25 px.
    # Without the discount IoU = 15 / (25 + 20 - 15) = 15/30 = 0.5 -> no match;
    # with it union = 25 + 20 - 15 - 10 = 20 -> IoU 15/20 = 0.75 -> match.
    runs = [(1, 11, 15), (1, VOID, 5), (VOID, 11, 10), (VOID, VOID, 10), (2, 12, 60)]
    got = stats_of(runs, GT_A_B, PRED_A_B)
    assert got == {1: (1, 0, 0, 0.75), 2: (1, 0, 0, 1.0)}  # B' == B exactly


@pytest.mark.parametrize("on_void,on_b,is_fp", [(11, 10, False), (10, 10, True), (10, 11, True)],
                         ids=["11_of_21_void_ignored", "exactly_half_void_fp", "10_of_21_void_fp"])
def test_unmatched_prediction_mostly_on_void_is_not_fp(on_void, on_b, is_fp):
    # gt: VOID 30 px, B 70 px. P (dog, no dog in gt) = on_void px of VOID + on_b px of B.
    # Ignored fraction on_void / (on_void + on_b): 11/21 = 0.524 > 0.5 -> ignored; 10/20 = 0.5 and
    # 10/21 = 0.476 are not > 0.5 -> FP of dog. B' = the remaining 70 - on_b px of B: IoU (70 - on_b)/70.
    runs = [(VOID, VOID, 30 - on_void), (VOID, 13, on_void), (2, 13, on_b), (2, 12, 70 - on_b)]
    got = stats_of(runs, [SegmentInfo(2, 2)], [SegmentInfo(13, 3), SegmentInfo(12, 2)])
    expected = {2: (1, 0, 0, pytest.approx((70 - on_b) / 70))}
    if is_fp:
        expected[3] = (0, 1, 0, 0.0)
    assert got == expected


CROWD_GT = [SegmentInfo(5, 1, iscrowd=1), SegmentInfo(2, 2)]  # crowd person C (id 5), grass B


def test_prediction_over_same_category_crowd_is_not_fp_and_crowd_is_never_fn():
    # gt: crowd person C = 40 px, B = 60 px. P (person) = 30 px on C + 10 px on B: pairs with a
    # crowd gt never match; ignored = (0 void + 30 crowd) / 40 = 0.75 > 0.5 -> not FP.
    # C itself is no FN. B' = 10 px of C + 50 px of B: IoU 50 / (60 + 60 - 50) = 50/70.
    runs = [(5, 11, 30), (5, 12, 10), (2, 11, 10), (2, 12, 50)]
    got = stats_of(runs, CROWD_GT, PRED_A_B)
    assert got == {2: (1, 0, 0, pytest.approx(50 / 70))}


def test_prediction_over_other_category_crowd_is_fp():
    # Same pixels, but P is a dog: the crowd region is a person's, so only VOID (0 px) is ignored
    # -> 0/40 -> FP of dog. The crowd person is still no FN.
    runs = [(5, 13, 30), (5, 12, 10), (2, 13, 10), (2, 12, 50)]
    got = stats_of(runs, CROWD_GT, [SegmentInfo(13, 3), SegmentInfo(12, 2)])
    assert got == {2: (1, 0, 0, pytest.approx(50 / 70)), 3: (0, 1, 0, 0.0)}


@pytest.mark.parametrize("order,is_fp", [((5, 6), True), ((6, 5), False)], ids=["c2_last", "c1_last"])
def test_only_the_last_crowd_segment_of_a_category_discounts_like_panopticapi(order, is_fp):
    # Two crowd persons C1 (id 5, 30 px) and C2 (id 6, 10 px), B = 60 px. P (person) = 30 px on C1
    # + 10 px on B. panopticapi keeps the LAST crowd of a category: with C2 last, P's crowd overlap is
    # 0/40 -> FP; with C1 last, 30/40 = 0.75 -> ignored. B' = C2 + 50 px of B: IoU 50/(60+60-50).
    runs = [(5, 11, 30), (6, 12, 10), (2, 11, 10), (2, 12, 50)]
    gt_segs = [SegmentInfo(i, 1, iscrowd=1) for i in order] + [SegmentInfo(2, 2)]
    got = stats_of(runs, gt_segs, PRED_A_B)
    expected = {2: (1, 0, 0, pytest.approx(50 / 70))}
    if is_fp:
        expected[1] = (0, 1, 0, 0.0)
    assert got == expected


def test_merged_stuff_prediction_matches_the_larger_segment_only():
    # gt: A 20 px, grass B1 50 px, grass B2 30 px. pred: A' = A, M (grass) = B1 + B2 = 80 px.
    # IoU(B1, M) = 50 / (80 + 50 - 50) = 0.625 -> TP; IoU(B2, M) = 30/80 = 0.375 -> B2 FN; M matched.
    runs = [(1, 11, 20), (2, 12, 50), (3, 12, 30)]
    gt_segs = [SegmentInfo(1, 1), SegmentInfo(2, 2), SegmentInfo(3, 2)]
    got = stats_of(runs, gt_segs, PRED_A_B)
    assert got == {1: (1, 0, 0, 1.0), 2: (1, 0, 1, 0.625)}
    gt, pred = layout(*runs)
    report = pq_report(pq_image_stats(7, gt, gt_segs, pred, PRED_A_B, CAT_IDS), CATS)
    grass = report.per_class[1]
    # grass: PQ = 0.625 / (1 + 0.5 * 0 + 0.5 * 1) = 0.41666..., SQ = 0.625, RQ = 1 / 1.5
    assert (grass.pq, grass.sq, grass.rq) == (pytest.approx(0.625 / 1.5), 0.625, pytest.approx(1 / 1.5))


def _report_for(runs, gt_segs, pred_segs):
    gt, pred = layout(*runs)
    return pq_report(pq_image_stats(7, gt, gt_segs, pred, pred_segs, CAT_IDS), CATS)


def test_class_only_in_prediction_counts_as_fp_with_pq_zero_in_the_mean():
    # gt: A 20, B 80. pred: A' = A, D (dog) = 10 px of B, B' = 70 px of B (IoU 70/80 = 0.875).
    # person PQ 1, dog PQ 0/(0 + 0.5) = 0, grass PQ = SQ = 0.875, RQ 1; sky / no counts: left out.
    runs = [(1, 11, 20), (2, 13, 10), (2, 12, 70)]
    report = _report_for(runs, GT_A_B, PRED_A_B + [SegmentInfo(13, 3)])
    dog = report.per_class[2]
    assert (dog.pq, dog.sq, dog.rq, dog.tp, dog.fp, dog.fn) == (0.0, 0.0, 0.0, 0, 1, 0)
    # All: n = 3 (person, grass, dog); PQ = (1 + 0.875 + 0) / 3, SQ = (1 + 0.875 + 0) / 3,
    # RQ = (1 + 1 + 0) / 3. Things: person + dog: PQ = SQ = RQ = (1 + 0) / 2. Stuff: grass only.
    assert report.all.n == 3
    assert report.all.pq == pytest.approx(1.875 / 3) and report.all.rq == pytest.approx(2 / 3)
    assert (report.things.pq, report.things.sq, report.things.rq, report.things.n) == (0.5, 0.5, 0.5, 2)
    assert (report.stuff.pq, report.stuff.sq, report.stuff.rq, report.stuff.n) == (0.875, 0.875, 1.0, 1)


def test_class_without_tp_fp_fn_is_left_out_of_the_mean_and_reported_as_none():
    # person and grass perfect (IoU 1); dog and sky absent from both: n = 2, not 4.
    report = _report_for([(1, 11, 20), (2, 12, 80)], GT_A_B, PRED_A_B)
    assert (report.all.pq, report.all.n) == (1.0, 2)
    sky = report.per_class[3]
    assert (sky.pq, sky.sq, sky.rq, sky.tp, sky.fp, sky.fn) == (None, None, None, 0, 0, 0)
    assert report.to_json()["per_class"]["4"]["pq"] is None


def test_things_and_stuff_are_averaged_separately():
    # person: A' = 15 px of A (20) -> IoU 15/20 = 0.75; the other 5 px of A are predicted grass.
    # grass: B' = 5 px of A + 80 px of B -> IoU 80 / (85 + 80 - 80) = 80/85.
    runs = [(1, 11, 15), (1, 12, 5), (2, 12, 80)]
    report = _report_for(runs, GT_A_B, PRED_A_B)
    assert (report.things.pq, report.things.n) == (0.75, 1)
    assert report.stuff.pq == pytest.approx(80 / 85) and report.stuff.n == 1
    assert report.all.pq == pytest.approx((0.75 + 80 / 85) / 2)
    table = report.table().splitlines()
    assert table[2] == "| 1 | person | Y | 75.0 | 75.0 | 100.0 | 1 | 0 | 0 |"
    assert table[3] == "| 2 | grass | N | 94.1 | 94.1 | 100.0 | 1 | 0 | 0 |"  # 80/85 = 0.9412
    assert table[4] == "| 3 | dog | Y | - | - | - | 0 | 0 | 0 |"


def test_no_counted_class_gives_none_not_a_division_by_zero():
    report = pq_report(PQStats.zeros(CAT_IDS), CATS)
    for s in (report.all, report.things, report.stuff):
        assert (s.pq, s.sq, s.rq, s.n) == (None, None, None, 0)
    assert report.to_json()["All"] == {"pq": None, "sq": None, "rq": None, "n": 0}
    # Stuff only: Things stays None.
    only_stuff = _report_for([(2, 12, 100)], [SegmentInfo(2, 2)], [SegmentInfo(12, 2)])
    assert only_stuff.things.pq is None and only_stuff.stuff.pq == 1.0


def test_gt_area_comes_from_the_json_field_when_given():
    # A has 20 px but the JSON says area 30: A' = A -> IoU 20 / (20 + 30 - 20) = 2/3, as panopticapi.
    got = stats_of([(1, 11, 20), (2, 12, 80)], [SegmentInfo(1, 1, area=30), SegmentInfo(2, 2)], PRED_A_B)
    assert got[1] == (1, 0, 0, pytest.approx(2 / 3))


def test_stats_add_combine_and_pickle():
    a = PQStats([1, 2], [1, 0], [0, 2], [3, 0], [0.5, 0.0])
    b = PQStats([1, 2], [2, 1], [1, 0], [0, 1], [1.25, 0.75])
    for total in (a + b, combine_stats([a, b]), PQStats.combine(iter([a, b]))):
        assert total.tp.tolist() == [3, 1] and total.fp.tolist() == [1, 2] and total.fn.tolist() == [3, 1]
        assert total.iou.tolist() == [1.75, 0.75]
    with pytest.raises(ValueError):
        a + PQStats.zeros([2, 1])
    back = pickle.loads(pickle.dumps(a))  # what distributed evaluation gathers from ranks
    assert back.category_ids.tolist() == [1, 2] and back.iou.tolist() == [0.5, 0.0] and back.fn.tolist() == [3, 0]


def test_rgb2id_and_id2rgb_are_inverse():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256**3, size=(7, 9))
    assert np.array_equal(rgb2id(id2rgb(ids)), ids)
    # R + 256 G + 256² B: (1, 2, 3) -> 1 + 512 + 196608 = 197121
    assert rgb2id(np.array([[[1, 2, 3]]], np.uint8)).tolist() == [[197121]]
    assert rgb2id(np.array([[[1, 2, 3]]], np.uint32)).tolist() == [[197121]]
    assert id2rgb(np.array([[197121]])).tolist() == [[[1, 2, 3]]]


# ----------------------------------------------------------------------------- errors


def _raises(match: str, runs, gt_segs, pred_segs, gt=None, pred=None):
    if gt is None:
        gt, pred = layout(*runs)
    with pytest.raises(PanopticError, match=match) as info:
        pq_image_stats(7, gt, gt_segs, pred, pred_segs, CAT_IDS)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_id_in_png_missing_from_json_is_an_error_naming_image_and_segment():
    _raises(r"image 7: segment id 99 is in the prediction PNG", [(1, 11, 20), (2, 99, 80)], GT_A_B,
            PRED_A_B[:1])
    _raises(r"image 7: segment id 98 is in the ground-truth PNG", [(1, 11, 20), (98, 12, 80)], GT_A_B[:1],
            PRED_A_B)


def test_json_segment_missing_from_png_is_an_error():
    runs = [(1, 11, 20), (2, 12, 80)]
    _raises(r"image 7: prediction segment id 13 .*no pixels", runs, GT_A_B, PRED_A_B + [SegmentInfo(13, 3)])
    _raises(r"image 7: ground-truth segment id 3 .*no pixels", runs, GT_A_B + [SegmentInfo(3, 3)], PRED_A_B)


def test_unknown_category_is_an_error():
    runs = [(1, 11, 20), (2, 12, 80)]
    _raises(r"image 7: prediction segment id 12 has unknown category_id 77", runs, GT_A_B,
            [SegmentInfo(11, 1), SegmentInfo(12, 77)])
    _raises(r"image 7: ground-truth segment id 1 has unknown category_id 0", runs,
            [SegmentInfo(1, 0), SegmentInfo(2, 2)], PRED_A_B)


def test_duplicate_segment_id_is_an_error():
    runs = [(1, 11, 20), (2, 12, 80)]
    _raises(r"image 7: prediction segment id 12 appears more than once", runs, GT_A_B,
            PRED_A_B + [SegmentInfo(12, 3)])
    _raises(r"image 7: ground-truth segment id 1 appears more than once", runs,
            GT_A_B + [SegmentInfo(1, 1)], PRED_A_B)


def test_different_png_sizes_is_an_error_naming_both_sizes():
    gt = np.ones((10, 12), np.int64)
    pred = np.full((10, 10), 11)
    _raises(r"image 7: ground-truth PNG is 12x10 \(WxH\) but the prediction PNG is 10x10 \(WxH\)",
            None, [SegmentInfo(1, 1)], [SegmentInfo(11, 1)], gt=gt, pred=pred)


def test_id_outside_24_bit_range_is_an_error():
    gt, pred = layout((1, 11, 20), (2, 12, 80))
    _raises(r"image 7: prediction PNG holds id 16777216, outside the 24-bit", None, GT_A_B, PRED_A_B,
            gt=gt, pred=np.where(pred == 12, 256**3, pred))
    _raises(r"image 7: ground-truth PNG holds id -1", None, GT_A_B, PRED_A_B, gt=np.where(gt == 2, -1, gt),
            pred=pred)


def test_any_integer_dtype_gives_the_same_stats():
    # A' = A (IoU 1); B' = 79 px of B, the 80th pixel is predicted VOID: IoU 79/80.
    gt, pred = layout((1, 11, 20), (2, 12, 79), (2, VOID, 1))
    for dtype in (np.uint8, np.int16, np.uint32, np.int32, np.uint64):
        s = pq_image_stats(7, gt.astype(dtype), GT_A_B, pred.astype(dtype), PRED_A_B, CAT_IDS)
        assert s.tp.tolist() == [1, 1, 0, 0] and s.fp.sum() == 0 and s.fn.sum() == 0
        assert s.iou.tolist() == [1.0, 79 / 80, 0.0, 0.0]


def _copy_pred(tmp_path: Path, edit) -> tuple[str, str]:
    doc = json.loads(GT_JSON.read_text())
    edit(doc)
    folder = tmp_path / "pred"
    shutil.copytree(GT_FOLDER, folder)
    path = tmp_path / "pred.json"
    path.write_text(json.dumps({"annotations": doc["annotations"]}))
    return str(path), str(folder)


def test_folder_scorer_rejects_prediction_for_unknown_image(tmp_path):
    def add(doc):
        doc["annotations"].append({**doc["annotations"][0], "image_id": 123})
    with pytest.raises(PanopticError, match=r"image 123: prediction for an image id absent from the ground"):
        evaluate_panoptic_folders(str(GT_JSON), str(GT_FOLDER), *_copy_pred(tmp_path, add))


def test_folder_scorer_rejects_gt_image_without_prediction(tmp_path):
    def drop(doc):
        del doc["annotations"][1]
    with pytest.raises(PanopticError, match=r"image 439180: ground-truth image has no prediction"):
        evaluate_panoptic_folders(str(GT_JSON), str(GT_FOLDER), *_copy_pred(tmp_path, drop))


def test_folder_scorer_names_a_missing_png_file(tmp_path):
    def rename(doc):
        doc["annotations"][0]["file_name"] = "nope.png"
    with pytest.raises(PanopticError, match=r"image 142238: prediction PNG file not found: .*nope\.png"):
        evaluate_panoptic_folders(str(GT_JSON), str(GT_FOLDER), *_copy_pred(tmp_path, rename))


def test_categories_and_segments_from_json_keep_order_and_fields():
    cats = categories_from_json([{"id": 4, "name": "sky", "isthing": 0}, {"id": 1, "name": "p", "isthing": 1}])
    assert cats == [PanopticCategory(4, "sky", False), PanopticCategory(1, "p", True)]
    segs = segments_from_json([{"id": 3, "category_id": 1}, {"id": 2, "category_id": 4, "iscrowd": 1, "area": 9}])
    assert segs == [SegmentInfo(3, 1, 0, None), SegmentInfo(2, 4, 1, 9)]
