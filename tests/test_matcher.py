"""Hungarian matcher (docs/model.md#matcher) and the box / point-sampling helpers it relies on."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from model.box_ops import (
    bitmask_boxes,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    inverse_sigmoid,
    masks_to_boxes_official,
)
from model.matcher import HungarianMatcher, MatcherConfig
from model.point_sampling import (
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from model.structures import Predictions, Targets


def _square_masks(n: int, size: int) -> torch.Tensor:
    """n non-overlapping-ish bool masks [n, size, size]: mask i is a block at a different place."""
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    step = size // (n + 1)
    for i in range(n):
        masks[i, i * step : i * step + step + 2, i * step : (i + 1) * step + 2] = True
    return masks


def _perfect_predictions(targets: Targets, perm: list[int], num_queries: int, num_classes: int) -> Predictions:
    """Query perm[j] reproduces target j exactly; the other queries are confident background."""
    n = len(targets)
    size = targets.masks.shape[-1]
    logits = torch.full((1, num_queries, num_classes), -10.0)
    boxes = torch.tensor([[0.9, 0.9, 0.05, 0.05]]).repeat(num_queries, 1)[None].clone()
    masks = torch.full((1, num_queries, size, size), -10.0)
    for j in range(n):
        q = perm[j]
        logits[0, q, targets.labels[j]] = 10.0
        boxes[0, q] = targets.boxes[j]
        masks[0, q] = torch.where(targets.masks[j], 10.0, -10.0)
    return Predictions(logits=logits, boxes=boxes, masks=masks)


def test_perfect_predictions_recover_the_permutation():
    torch.manual_seed(0)
    masks = _square_masks(3, 16)
    targets = Targets(
        labels=torch.tensor([2, 0, 1]),
        boxes=torch.tensor([[0.2, 0.2, 0.2, 0.3], [0.5, 0.5, 0.3, 0.2], [0.7, 0.6, 0.1, 0.1]]),
        masks=masks,
    )
    perm = [4, 0, 2]
    pred = _perfect_predictions(targets, perm, num_queries=5, num_classes=3)
    matcher = HungarianMatcher(MatcherConfig(num_points=64))
    (rows, cols), = matcher.match(pred, [targets])
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64
    assert {int(c): int(r) for r, c in zip(rows, cols)} == {0: 4, 1: 0, 2: 2}


def test_gt_masks_at_4x_resolution_are_matched_by_normalised_points():
    torch.manual_seed(1)
    masks = _square_masks(2, 8)
    targets = Targets(labels=torch.tensor([0, 0]), boxes=torch.tensor([[0.3, 0.3, 0.2, 0.2]] * 2), masks=masks)
    pred = _perfect_predictions(targets, [1, 2], num_queries=3, num_classes=1)
    # Same label and box: only the mask terms can tell the two targets apart. GT at 4x the prediction size.
    big_masks = masks.repeat_interleave(4, 1).repeat_interleave(4, 2)
    big_targets = Targets(labels=targets.labels, boxes=targets.boxes, masks=big_masks)
    (rows, cols), = HungarianMatcher(MatcherConfig(num_points=256)).match(pred, [big_targets])
    assert {int(c): int(r) for r, c in zip(rows, cols)} == {0: 1, 1: 2}


def _focal_cost(p: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    pos = alpha * (1 - p) ** gamma * (-math.log(p + 1e-8))
    neg = (1 - alpha) * p**gamma * (-math.log(1 - p + 1e-8))
    return pos - neg


def _giou(a: list[float], b: list[float]) -> float:
    """GIoU of two xyxy boxes, written out by hand (official 1e-6 guards)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / (union + 1e-6) - (enclosing - union) / (enclosing + 1e-6)


def _brute_force_cost(pred: Predictions, tgt: Targets, cfg: MatcherConfig, points: torch.Tensor) -> torch.Tensor:
    """C[q, j] term by term with python loops; `points` [P, 2] are the matcher's shared random points."""
    grid = (2 * points - 1).view(1, 1, -1, 2)
    pm = F.grid_sample(pred.masks[0][:, None], grid.expand(pred.masks.shape[1], -1, -1, -1), align_corners=False)
    tm = F.grid_sample(tgt.masks.float()[:, None], grid.expand(len(tgt), -1, -1, -1), align_corners=False)
    pm, tm = pm.flatten(1), tm.flatten(1)
    num_q, num_t, num_p = pm.shape[0], tm.shape[0], pm.shape[1]
    cost = torch.zeros(num_q, num_t, dtype=torch.float64)
    for q in range(num_q):
        for j in range(num_t):
            p = torch.sigmoid(pred.logits[0, q, tgt.labels[j]]).item()
            box_q, box_j = pred.boxes[0, q].tolist(), tgt.boxes[j].tolist()
            l1 = sum(abs(a - b) for a, b in zip(box_q, box_j))
            giou = _giou(box_cxcywh_to_xyxy(pred.boxes[0, q]).tolist(), box_cxcywh_to_xyxy(tgt.boxes[j]).tolist())
            bce = sum(
                F.binary_cross_entropy_with_logits(pm[q, k], tm[j, k]).item() for k in range(num_p)
            ) / num_p
            sig = torch.sigmoid(pm[q])
            dice = 1 - (2 * (sig * tm[j]).sum().item() + 1) / (sig.sum().item() + tm[j].sum().item() + 1)
            cost[q, j] = (
                cfg.cost_class * _focal_cost(p) + cfg.cost_box * l1 + cfg.cost_giou * (-giou)
                + cfg.cost_mask * bce + cfg.cost_dice * dice
            )
    return cost


def _random_case(seed: int, num_queries: int = 3, num_targets: int = 2) -> tuple[Predictions, Targets]:
    g = torch.Generator().manual_seed(seed)
    pred = Predictions(
        logits=torch.randn(1, num_queries, 4, generator=g),
        boxes=torch.rand(1, num_queries, 4, generator=g) * 0.4 + 0.2,
        masks=torch.randn(1, num_queries, 6, 6, generator=g) * 3,
    )
    tgt = Targets(
        labels=torch.tensor([3, 1, 0, 2][:num_targets]),
        boxes=torch.rand(num_targets, 4, generator=g) * 0.4 + 0.2,
        masks=torch.rand(num_targets, 12, 12, generator=g) > 0.5,
    )
    return pred, tgt


def test_cost_matrix_combines_terms_with_configured_weights():
    pred, tgt = _random_case(seed=3)
    cfg = MatcherConfig(cost_class=1.5, cost_mask=0.7, cost_dice=2.5, cost_box=3.0, cost_giou=0.4, num_points=8)
    matcher = HungarianMatcher(cfg)
    torch.manual_seed(123)
    cost = matcher._cost_matrix(pred, 0, tgt, ("cls", "box", "mask"))
    torch.manual_seed(123)
    points = torch.rand(1, cfg.num_points, 2)[0]  # the matcher's single draw, shared by all pairs
    expected = _brute_force_cost(pred, tgt, cfg, points)
    torch.testing.assert_close(cost.double(), expected, rtol=1e-5, atol=1e-5)


def test_assignment_minimises_the_total_cost():
    pred, tgt = _random_case(seed=5, num_queries=4, num_targets=3)
    cfg = MatcherConfig(num_points=16)
    matcher = HungarianMatcher(cfg)
    torch.manual_seed(7)
    cost = matcher._cost_matrix(pred, 0, tgt, ("cls", "box", "mask"))
    torch.manual_seed(7)
    (rows, cols), = matcher.match(pred, [tgt])
    best = min(
        itertools.permutations(range(4), 3), key=lambda qs: sum(cost[q, j].item() for j, q in enumerate(qs))
    )
    assert [int(rows[list(cols).index(j)]) for j in range(3)] == list(best)


def test_empty_targets_give_empty_int64_indices_in_a_mixed_batch():
    torch.manual_seed(0)
    masks = _square_masks(2, 8)
    full = Targets(labels=torch.tensor([0, 1]), boxes=torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.2, 0.2]]), masks=masks)
    empty = Targets(labels=torch.zeros(0, dtype=torch.int64), boxes=torch.zeros(0, 4), masks=torch.zeros(0, 8, 8, dtype=torch.bool))
    pred = Predictions(logits=torch.randn(2, 4, 2), boxes=torch.rand(2, 4, 4) * 0.5 + 0.1, masks=torch.randn(2, 4, 8, 8))
    indices = HungarianMatcher(MatcherConfig(num_points=16)).match(pred, [empty, full])
    assert indices[0][0].numel() == 0 and indices[0][1].numel() == 0
    assert indices[0][0].dtype == torch.int64 and indices[0][1].dtype == torch.int64
    assert sorted(indices[1][1].tolist()) == [0, 1]


def test_detection_only_predictions_without_masks_match_on_class_and_box():
    targets = Targets(labels=torch.tensor([1, 0]), boxes=torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]]))
    logits = torch.full((1, 3, 2), -8.0)
    logits[0, 2, 1] = 8.0
    logits[0, 0, 0] = 8.0
    boxes = torch.tensor([[[0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.5, 0.5], [0.2, 0.2, 0.1, 0.1]]])
    pred = Predictions(logits=logits, boxes=boxes, masks=None)
    matcher = HungarianMatcher(MatcherConfig(num_points=16))
    (rows, cols), = matcher.match(pred, [targets], costs=("cls", "box"))
    assert {int(c): int(r) for r, c in zip(rows, cols)} == {0: 2, 1: 0}
    # Mask cost requested but no masks anywhere: that term is simply 0.
    (rows2, cols2), = matcher.match(pred, [targets])
    assert rows2.tolist() == rows.tolist() and cols2.tolist() == cols.tolist()


def test_unrequested_cost_terms_are_zero():
    pred, tgt = _random_case(seed=11)
    matcher = HungarianMatcher(MatcherConfig(num_points=8))
    cls_only = matcher._cost_matrix(pred, 0, tgt, ("cls",))
    expected = torch.tensor(
        [[4.0 * _focal_cost(torch.sigmoid(pred.logits[0, q, lab]).item()) for lab in tgt.labels] for q in range(3)]
    )
    torch.testing.assert_close(cls_only, expected, rtol=1e-5, atol=1e-6)


def test_stuff_box_cost_masked_replaces_stuff_columns_by_thing_mean():
    pred, _ = _random_case(seed=2, num_queries=3)
    tgt = Targets(
        labels=torch.tensor([3, 85, 7, 100]),
        boxes=torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9], [0.6, 0.4, 0.2, 0.3], [0.5, 0.2, 0.4, 0.2]]),
    )
    pred.logits = torch.randn(1, 3, 120)
    plain = HungarianMatcher(MatcherConfig(cost_class=1.0, cost_giou=0.0, num_points=8))
    masked = HungarianMatcher(MatcherConfig(cost_class=1.0, cost_giou=0.0, num_points=8, stuff_box_cost_masked=True))
    c_plain = plain._cost_matrix(pred, 0, tgt, ("cls", "box"))
    c_masked = masked._cost_matrix(pred, 0, tgt, ("cls", "box"))
    cls = plain._cost_matrix(pred, 0, tgt, ("cls",))
    box_plain = (c_plain - cls) / 5.0
    box_masked = (c_masked - cls) / 5.0
    thing_mean = box_plain[:, [0, 2]].mean()
    torch.testing.assert_close(box_masked[:, [0, 2]], box_plain[:, [0, 2]])
    torch.testing.assert_close(box_masked[:, [1, 3]], torch.full((3, 2), thing_mean.item()), rtol=1e-5, atol=1e-6)

    all_stuff = Targets(labels=torch.tensor([85, 90]), boxes=tgt.boxes[:2])
    c_all = masked._cost_matrix(pred, 0, all_stuff, ("cls", "box"))
    torch.testing.assert_close(c_all, masked._cost_matrix(pred, 0, all_stuff, ("cls",)))  # NaN mean -> 0


def test_matcher_is_under_no_grad():
    pred, tgt = _random_case(seed=4)
    pred.logits.requires_grad_(True)
    cost = HungarianMatcher(MatcherConfig(num_points=8)).match(pred, [tgt])
    assert not cost[0][0].requires_grad


# ----------------------------------------------------------------------------- helpers used by matching
def test_box_roundtrip_and_giou_of_identical_boxes_carries_the_official_1e6_guard():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.1, 0.1]])
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes)
    xyxy = box_cxcywh_to_xyxy(boxes)
    areas = torch.tensor([0.08, 0.01])
    # official MaskDINO box_ops: inter / (union + 1e-6), so identical boxes give area / (area + 1e-6), not 1
    torch.testing.assert_close(torch.diag(generalized_box_iou(xyxy, xyxy)), areas / (areas + 1e-6))


def test_inverse_sigmoid_clamps_with_eps():
    x = torch.tensor([-0.5, 0.0, 0.25, 1.0, 2.0])
    expected = torch.tensor([math.log(1e-5), math.log(1e-5), math.log(1 / 3), math.log(1 / 1e-5), math.log(1 / 1e-5)])
    torch.testing.assert_close(inverse_sigmoid(x), expected)


def test_masks_to_boxes_official_has_no_plus_one_and_empty_gives_1e8():
    masks = torch.zeros(2, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True  # rows 1..2, cols 2..4
    boxes = masks_to_boxes_official(masks)
    torch.testing.assert_close(boxes[0], torch.tensor([2.0, 1.0, 4.0, 2.0]))
    torch.testing.assert_close(boxes[1], torch.tensor([1e8, 1e8, 0.0, 0.0]))


def test_bitmask_boxes_add_one_on_max_side_and_zero_for_empty():
    masks = torch.zeros(3, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[2, 4, 0] = True
    boxes = bitmask_boxes(masks)
    torch.testing.assert_close(boxes, torch.tensor([[2.0, 1.0, 5.0, 3.0], [0.0, 0.0, 0.0, 0.0], [0.0, 4.0, 1.0, 5.0]]))


def test_point_sample_reads_pixel_centres():
    img = torch.arange(12.0).view(1, 1, 3, 4)
    coords = torch.tensor([[[0.5 / 4, 0.5 / 3], [3.5 / 4, 2.5 / 3]]])  # centres of (0,0) and (2,3)
    torch.testing.assert_close(point_sample(img, coords), torch.tensor([[[0.0, 11.0]]]))


def test_uncertain_points_concentrate_where_logits_are_near_zero():
    logits = torch.full((2, 1, 16, 16), 10.0)
    logits[:, :, :, 8:] = -10.0  # boundary at x = 0.5
    gen = torch.Generator().manual_seed(0)
    coords = get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 40, 3.0, 0.75, generator=gen)
    assert coords.shape == (2, 40, 2)
    uncertain_x = coords[:, :30, 0]
    assert (uncertain_x - 0.5).abs().mean() < (coords[:, 30:, 0] - 0.5).abs().mean()
    with pytest.raises(AssertionError):
        calculate_uncertainty(torch.zeros(1, 2, 3, 3))
