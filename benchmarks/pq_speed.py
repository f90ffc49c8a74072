"""Panoptic quality speed: `pipeline.metrics.panoptic.pq_image_stats` against a per-segment loop.

What is measured
----------------
* Data, in memory (never timed): `--images` synthetic 640x480 (WxH) panoptic pairs. GT: 3-5 stuff
  bands of distinct stuff categories, then 20-35 thing rectangles / ellipses painted over them (later
  ones occlude earlier ones; ~8 % of things are crowd), small VOID rectangles and 1-px VOID bounding-box
  outlines around some things; segments occluded to nothing are dropped; ids are random 24-bit values and
  the JSON `area` is the pixel count. Prediction, derived from the GT: the whole map shifted by up to
  4 px, ~10 % of segments dropped to VOID, ~10 % relabelled to another category, some same-category
  pairs merged, 2-5 spurious blobs, fresh random ids. ~30 gt and ~30 pred segments per image.
* Ours: `pq_image_stats` (pixel pairs counted by run-collapsing + sorting the key gt << 24 | pred,
  searchsorted over the distinct pairs, array matching on the [G, P] intersection matrix) on every
  pair, from the [H, W] int64 id maps (no PNG decoding on any side).
* Baseline: the straightforward per-segment loop written below (`loop_image_stats`): one boolean
  mask per segment, and for each gt segment, for each pred segment of the same category, the
  intersection as `count_nonzero(gt_mask & pred_mask)`; VOID and crowd overlaps of unmatched
  predictions the same way. Same rules, same outputs.
* Also timed (figures only): `panopticapi_image_stats`, panopticapi's own algorithm (`np.unique`
  over gt * 2^24 + pred, Python dicts), the code this module replaces; and `ours_searchsorted`:
  `pq_image_stats` with its pair counting swapped for mapping every pixel with `np.searchsorted`
  and one `np.bincount` (`searchsorted_intersections`), the design the module was first written
  with, kept here to show why it was replaced.
* The per-image stats of ours and the baseline are summed in the same order and asserted equal
  (tp / fp / fn exactly, IoU sums to 1e-9; the largest IoU difference is reported). Each
  repetition times every implementation over all images, in a rotating order; figures are medians.

Output: a human summary on stderr, then LAST on stdout one JSON line
`{"bench": "pq_speed", "ratio": ours images/s / baseline images/s, "goal": 1.0, ...}`; the goal is
that ours is not slower than the loop (ratio >= 1).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.metrics import panoptic
from pipeline.metrics.panoptic import (
    VOID,
    PQStats,
    SegmentInfo,
    combine_stats,
    pq_image_stats,
)

GOAL = 1.0
H, W = 480, 640
THINGS = list(range(1, 41))  # 40 thing categories
STUFF = list(range(101, 121))  # 20 stuff categories
CATEGORY_IDS = THINGS + STUFF


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data


@dataclass
class Pair:
    gt: np.ndarray  # [H, W] int64
    gt_segments: list[SegmentInfo]
    pred: np.ndarray  # [H, W] int64
    pred_segments: list[SegmentInfo]


def _shape_mask(rng: np.random.Generator) -> tuple[slice, slice, np.ndarray | None]:
    """A random rectangle or ellipse: its bounding-box slices and, for an ellipse, the mask in it."""
    h, w = int(rng.integers(15, 160)), int(rng.integers(15, 200))
    y, x = int(rng.integers(0, H - h)), int(rng.integers(0, W - w))
    box = (slice(y, y + h), slice(x, x + w))
    if rng.random() < 0.5:
        return box[0], box[1], None
    yy, xx = np.ogrid[:h, :w]
    return box[0], box[1], ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2 <= 1.0


def _paint(canvas: np.ndarray, value: int, rs: slice, cs: slice, mask: np.ndarray | None) -> None:
    if mask is None:
        canvas[rs, cs] = value
    else:
        canvas[rs, cs][mask] = value


def _fresh_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice(np.arange(1, 256**3), size=n, replace=False) if n else np.zeros(0, np.int64)


def _relabel(labels: np.ndarray, cats: dict[int, int], rng: np.random.Generator,
             crowd: dict[int, int] | None = None) -> tuple[np.ndarray, list[SegmentInfo]]:
    """Replace the provisional labels 1..k of `labels` by random ids; segments_info of the present ones
    (area = pixel count), in a random order."""
    present, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    keep = present != VOID
    new = np.zeros(len(present), np.int64)
    new[keep] = _fresh_ids(rng, int(keep.sum()))
    ids = new[inverse].reshape(labels.shape)
    segs = [SegmentInfo(int(new[i]), cats[int(lab)], (crowd or {}).get(int(lab), 0), int(counts[i]))
            for i, lab in enumerate(present) if lab != VOID]
    order = rng.permutation(len(segs))
    return ids, [segs[i] for i in order]


def make_gt(rng: np.random.Generator) -> tuple[np.ndarray, dict[int, int], dict[int, int]]:
    """Provisional labels [H, W] (1..k), their categories and crowd flags."""
    labels = np.zeros((H, W), np.int64)
    cats: dict[int, int] = {}
    crowd: dict[int, int] = {}
    n_bands = int(rng.integers(3, 6))
    edges = np.sort(rng.choice(np.arange(40, H - 40), size=n_bands - 1, replace=False))
    band_cats = rng.choice(STUFF, size=n_bands, replace=False).tolist()  # one segment per stuff class
    for k, (a, b) in enumerate(zip([0, *edges], [*edges, H]), start=1):
        labels[a:b] = k
        cats[k] = band_cats[k - 1]
    label = len(cats)
    for _ in range(int(rng.integers(20, 36))):
        label += 1
        rs, cs, mask = _shape_mask(rng)
        _paint(labels, label, rs, cs, mask)
        cats[label] = int(rng.choice(THINGS))
        crowd[label] = int(rng.random() < 0.08)
        if rng.random() < 0.3:  # a 1-px VOID outline, as COCO leaves between touching things
            labels[rs.start, cs], labels[rs.stop - 1, cs] = VOID, VOID
            labels[rs, cs.start], labels[rs, cs.stop - 1] = VOID, VOID
    for _ in range(int(rng.integers(1, 5))):
        y, x = int(rng.integers(0, H - 30)), int(rng.integers(0, W - 30))
        labels[y:y + int(rng.integers(5, 30)), x:x + int(rng.integers(5, 30))] = VOID
    return labels, cats, crowd


def make_pred(gt_labels: np.ndarray, gt_cats: dict[int, int], rng: np.random.Generator
              ) -> tuple[np.ndarray, dict[int, int]]:
    """Provisional prediction labels derived from the GT labels, and their categories."""
    pred = np.roll(gt_labels, (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), axis=(0, 1))
    cats = dict(gt_cats)
    labels = [k for k in gt_cats if (pred == k).any()]
    lut = np.arange(max(gt_cats) + 1)
    for k in labels:
        u = rng.random()
        if u < 0.10:
            lut[k] = VOID  # missed segment
        elif u < 0.20:
            pool = THINGS if gt_cats[k] in THINGS else STUFF
            cats[k] = int(rng.choice([c for c in pool if c != gt_cats[k]]))  # wrong category
    same = [(a, b) for a in labels for b in labels if a < b and gt_cats[a] == gt_cats[b]]
    for a, b in [same[i] for i in rng.permutation(len(same))[:2]]:
        lut[b] = lut[a]  # two segments of one category predicted as one
    pred = lut[pred]
    label = max(gt_cats)
    for _ in range(int(rng.integers(2, 6))):  # spurious predictions
        label += 1
        rs, cs, mask = _shape_mask(rng)
        _paint(pred, label, rs, cs, mask)
        cats[label] = int(rng.choice(CATEGORY_IDS))
    return pred, cats


def make_pairs(n: int, seed: int) -> list[Pair]:
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        gt_labels, gt_cats, crowd = make_gt(rng)
        pred_labels, pred_cats = make_pred(gt_labels, gt_cats, rng)
        gt, gt_segs = _relabel(gt_labels, gt_cats, rng, crowd)
        pred, pred_segs = _relabel(pred_labels, pred_cats, rng)
        pred_segs = [SegmentInfo(s.id, s.category_id) for s in pred_segs]  # no area / crowd in predictions
        pairs.append(Pair(gt, gt_segs, pred, pred_segs))
    return pairs


# ----------------------------------------------------------------------------- baselines


def loop_image_stats(gt_ids: np.ndarray, gt_segs: Sequence[SegmentInfo], pred_ids: np.ndarray,
                     pred_segs: Sequence[SegmentInfo], category_ids: Sequence[int]) -> PQStats:
    """The straightforward implementation: boolean masks, every (gt, pred) pair of one category."""
    col = {c: i for i, c in enumerate(category_ids)}
    stats = PQStats.zeros(category_ids)
    void = gt_ids == VOID
    gt_mask = {s.id: gt_ids == s.id for s in gt_segs}
    pred_mask = {s.id: pred_ids == s.id for s in pred_segs}
    gt_area = {s.id: s.area if s.area is not None else int(np.count_nonzero(gt_mask[s.id])) for s in gt_segs}
    pred_area = {p: int(np.count_nonzero(m)) for p, m in pred_mask.items()}
    pred_void = {p: int(np.count_nonzero(m & void)) for p, m in pred_mask.items()}
    gt_matched, pred_matched = set(), set()
    for g in gt_segs:
        if g.iscrowd:
            continue
        for p in pred_segs:
            if p.category_id != g.category_id:
                continue
            inter = int(np.count_nonzero(gt_mask[g.id] & pred_mask[p.id]))
            if inter == 0:
                continue
            iou = inter / (pred_area[p.id] + gt_area[g.id] - inter - pred_void[p.id])
            if iou > 0.5:
                stats.tp[col[g.category_id]] += 1
                stats.iou[col[g.category_id]] += iou
                gt_matched.add(g.id)
                pred_matched.add(p.id)
    crowd = {g.category_id: g.id for g in gt_segs if g.iscrowd}  # last crowd per category wins
    for g in gt_segs:
        if not g.iscrowd and g.id not in gt_matched:
            stats.fn[col[g.category_id]] += 1
    for p in pred_segs:
        if p.id in pred_matched:
            continue
        ignored = pred_void[p.id]
        if p.category_id in crowd:
            ignored += int(np.count_nonzero(pred_mask[p.id] & gt_mask[crowd[p.category_id]]))
        if ignored / pred_area[p.id] <= 0.5:
            stats.fp[col[p.category_id]] += 1
    return stats


def panopticapi_image_stats(gt_ids: np.ndarray, gt_segs: Sequence[SegmentInfo], pred_ids: np.ndarray,
                            pred_segs: Sequence[SegmentInfo], category_ids: Sequence[int]) -> PQStats:
    """panopticapi's pq_compute_single_core algorithm for one image (np.unique + dicts)."""
    offset = 256**3
    col = {c: i for i, c in enumerate(category_ids)}
    stats = PQStats.zeros(category_ids)
    gt_info = {s.id: s for s in gt_segs}
    pred_cat = {s.id: s.category_id for s in pred_segs}
    labels, counts = np.unique(pred_ids, return_counts=True)
    pred_area = dict(zip(labels.tolist(), counts.tolist()))
    keys, counts = np.unique(gt_ids.astype(np.uint64) * offset + pred_ids.astype(np.uint64), return_counts=True)
    pairs = {(int(k) // offset, int(k) % offset): int(c) for k, c in zip(keys, counts)}
    gt_matched, pred_matched = set(), set()
    for (g, p), inter in pairs.items():
        if g not in gt_info or p not in pred_cat or gt_info[g].iscrowd or gt_info[g].category_id != pred_cat[p]:
            continue
        iou = inter / (pred_area[p] + gt_info[g].area - inter - pairs.get((VOID, p), 0))
        if iou > 0.5:
            stats.tp[col[pred_cat[p]]] += 1
            stats.iou[col[pred_cat[p]]] += iou
            gt_matched.add(g)
            pred_matched.add(p)
    crowd = {}
    for g, s in gt_info.items():
        if g in gt_matched:
            continue
        if s.iscrowd:
            crowd[s.category_id] = g
            continue
        stats.fn[col[s.category_id]] += 1
    for p, c in pred_cat.items():
        if p in pred_matched:
            continue
        ignored = pairs.get((VOID, p), 0) + (pairs.get((crowd[c], p), 0) if c in crowd else 0)
        if ignored / pred_area[p] <= 0.5:
            stats.fp[col[c]] += 1
    return stats


def searchsorted_intersections(image_id: object, gt_map: np.ndarray, gt: object, pred_map: np.ndarray,
                               pred: object) -> np.ndarray:
    """Drop-in for `panoptic._intersections`: every pixel mapped to a compact index with
    np.searchsorted over the sorted known ids, then one np.bincount of gi * n_pred + pi."""
    def compact(ids: np.ndarray, seg_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        known = np.concatenate(([VOID], seg_ids))
        order = np.argsort(known, kind="stable")
        sorted_known = known[order]
        flat = ids.reshape(-1)
        idx = np.minimum(np.searchsorted(sorted_known, flat), len(known) - 1)
        if not np.array_equal(sorted_known[idx], flat):  # the unknown-id check
            raise ValueError("id missing from segments_info")
        return idx, order

    gi, g_order = compact(gt_map, gt.ids)
    pi, p_order = compact(pred_map, pred.ids)
    kg, kp = len(g_order), len(p_order)
    hist = np.bincount(gi * kp + pi, minlength=kg * kp).reshape(kg, kp)
    matrix = np.empty_like(hist)
    matrix[np.ix_(g_order, p_order)] = hist
    return matrix


def ours_searchsorted(p: Pair) -> PQStats:
    original = panoptic._intersections
    panoptic._intersections = searchsorted_intersections
    try:
        return pq_image_stats(0, p.gt, p.gt_segments, p.pred, p.pred_segments, CATEGORY_IDS)
    finally:
        panoptic._intersections = original


# ----------------------------------------------------------------------------- timing


Scorer = Callable[[Pair], PQStats]

SCORERS: dict[str, Scorer] = {
    "ours": lambda p: pq_image_stats(0, p.gt, p.gt_segments, p.pred, p.pred_segments, CATEGORY_IDS),
    "loop": lambda p: loop_image_stats(p.gt, p.gt_segments, p.pred, p.pred_segments, CATEGORY_IDS),
    "panopticapi": lambda p: panopticapi_image_stats(p.gt, p.gt_segments, p.pred, p.pred_segments,
                                                     CATEGORY_IDS),
    "ours_searchsorted": ours_searchsorted,
}


def run(scorer: Scorer, pairs: list[Pair]) -> tuple[float, PQStats]:
    """Seconds to score every pair, and the summed stats (in image order)."""
    t = time.perf_counter()
    per_image = [scorer(p) for p in pairs]
    secs = time.perf_counter() - t
    return secs, combine_stats(per_image)


def check_equal(name: str, a: PQStats, b: PQStats) -> float:
    """Assert equal stats; returns the largest IoU-sum difference."""
    for field in ("tp", "fp", "fn"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), f"{name}: {field} differs"
    diff = float(np.abs(a.iou - b.iou).max())
    assert diff <= 1e-9, f"{name}: IoU sums differ by {diff}"
    return diff


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=200, help="synthetic 640x480 gt/pred pairs")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over all images; medians reported")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.images < 1 or args.repeats < 1:
        p.error("--images and --repeats must be >= 1")

    t = time.perf_counter()
    pairs = make_pairs(args.images, args.seed)
    gen_s = time.perf_counter() - t
    n_gt = statistics.mean(len(q.gt_segments) for q in pairs)
    n_pred = statistics.mean(len(q.pred_segments) for q in pairs)
    n_crowd = statistics.mean(sum(s.iscrowd for s in q.gt_segments) for q in pairs)
    log(f"{len(pairs)} pairs generated in {gen_s:.1f} s: {n_gt:.1f} gt segments ({n_crowd:.1f} crowd), "
        f"{n_pred:.1f} pred segments per image")

    names = list(SCORERS)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    totals: dict[str, PQStats] = {}
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate: nobody always runs first
        for name in order:
            secs, totals[name] = run(SCORERS[name], pairs)
            seconds[name].append(secs)
            log(f"rep {rep}: {name:17s} {secs:6.2f} s ({len(pairs) / secs:7.1f} images/s)")
    loop_diff = check_equal("loop", totals["ours"], totals["loop"])
    api_diff = check_equal("panopticapi", totals["ours"], totals["panopticapi"])
    check_equal("ours_searchsorted", totals["ours"], totals["ours_searchsorted"])
    s = totals["ours"]
    log(f"stats equal: tp {int(s.tp.sum())}, fp {int(s.fp.sum())}, fn {int(s.fn.sum())}, "
        f"IoU max diff {max(loop_diff, api_diff):.1e}")

    ips = {name: len(pairs) / statistics.median(seconds[name]) for name in names}
    result = {
        "bench": "pq_speed",
        "ratio": round(ips["ours"] / ips["loop"], 2),
        "goal": GOAL,  # ours must not be slower than the per-segment loop
        "images": len(pairs),
        "ours_images_per_s": round(ips["ours"], 1),
        "baseline_images_per_s": round(ips["loop"], 1),
        "panopticapi_images_per_s": round(ips["panopticapi"], 1),
        "ratio_vs_panopticapi": round(ips["ours"] / ips["panopticapi"], 2),
        "ours_searchsorted_images_per_s": round(ips["ours_searchsorted"], 1),
        "gt_segments_per_image": round(n_gt, 1),
        "pred_segments_per_image": round(n_pred, 1),
        "crowd_per_image": round(n_crowd, 2),
        "tp": int(s.tp.sum()), "fp": int(s.fp.sum()), "fn": int(s.fn.sum()),
        "iou_max_abs_diff": max(loop_diff, api_diff),
        "repeats": args.repeats,
        "runs_seconds": {name: [round(x, 3) for x in seconds[name]] for name in names},
        "generate_seconds": round(gen_s, 1),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    log(f"ours {ips['ours']:.0f} images/s vs loop {ips['loop']:.0f} images/s -> ratio {result['ratio']} "
        f"(goal >= {GOAL}); panopticapi algorithm {ips['panopticapi']:.0f} images/s, "
        f"ours with per-pixel searchsorted {ips['ours_searchsorted']:.0f} images/s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
