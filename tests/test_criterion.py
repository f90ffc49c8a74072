"""SetCriterion, losses and the weight dict (docs/model.md#criterion)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.criterion import (
    LossConfig,
    SetCriterion,
    build_weight_dict,
    dn_indices,
    sigmoid_focal_loss,
)
from model.matcher import HungarianMatcher, MatcherConfig
from model.structures import (
    DenoisingGroups,
    DenoisingOutput,
    HeadOutput,
    Predictions,
    Targets,
)

NUM_CLASSES = 5
MASK_HW = 8
GT_HW = 32
POINTS = 16


def _targets(counts: list[int], with_masks: bool = True, seed: int = 0) -> list[Targets]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        centres = torch.rand(n, 2, generator=g) * 0.5 + 0.25
        sizes = torch.rand(n, 2, generator=g) * 0.2 + 0.1
        masks = torch.rand(n, GT_HW, GT_HW, generator=g) > 0.5 if with_masks else None
        out.append(Targets(labels=torch.randint(0, NUM_CLASSES, (n,), generator=g), boxes=torch.cat([centres, sizes], 1), masks=masks))
    return out


def _predictions(batch: int, queries: int, g: torch.Generator, with_masks: bool = True, k: int = NUM_CLASSES) -> Predictions:
    return Predictions(
        logits=torch.randn(batch, queries, k, generator=g).requires_grad_(),
        boxes=torch.rand(batch, queries, 4, generator=g).mul(0.3).add(0.2).requires_grad_(),
        masks=torch.randn(batch, queries, MASK_HW, MASK_HW, generator=g).requires_grad_() if with_masks else None,
    )


def _head_output(
    batch: int,
    counts: list[int],
    num_aux: int = 9,
    queries: int = 6,
    interm: bool = True,
    dn: bool = True,
    with_masks: bool = True,
    seed: int = 0,
) -> HeadOutput:
    """A HeadOutput shaped like the official R50 training forward (scaled down)."""
    g = torch.Generator().manual_seed(seed)
    dn_out = None
    if dn:
        single_pad = max(max(counts), 1)
        num_groups = 3
        pad = single_pad * num_groups
        groups = DenoisingGroups(num_groups=num_groups, single_pad=single_pad, attn_mask=torch.zeros(pad + queries, pad + queries, dtype=torch.bool))
        dn_out = DenoisingOutput(
            groups=groups,
            final=_predictions(batch, pad, g, with_masks),
            aux=[_predictions(batch, pad, g, with_masks) for _ in range(num_aux)],
        )
    return HeadOutput(
        final=_predictions(batch, queries, g, with_masks),
        aux=[_predictions(batch, queries, g, with_masks) for _ in range(num_aux)],
        interm=_predictions(batch, queries, g, with_masks) if interm else None,
        dn=dn_out,
    )


def _criterion(**overrides) -> SetCriterion:
    cfg = LossConfig(num_classes=NUM_CLASSES, train_num_points=POINTS, **overrides)
    return SetCriterion(cfg, HungarianMatcher(MatcherConfig(num_points=POINTS)))


def _weighted(criterion: SetCriterion, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the caller does: multiply by the weight dict, drop the rest (official meta-arch)."""
    return {k: v * criterion.weight_dict[k] for k, v in losses.items() if k in criterion.weight_dict}


# ---------------------------------------------------------------------------------------- weight dict
def test_weight_dict_r50_instance_has_200_keys_in_official_order():
    weights = build_weight_dict(LossConfig(num_classes=80))
    assert len(weights) == 200
    assert list(weights)[:10] == [
        "loss_ce", "loss_mask", "loss_dice", "loss_bbox", "loss_giou",
        "loss_ce_interm", "loss_mask_interm", "loss_dice_interm", "loss_bbox_interm", "loss_giou_interm",
    ]
    assert weights["loss_ce_dn_8"] == 4.0 and weights["loss_giou_interm_dn_3"] == 2.0
    assert weights["loss_mask_7"] == 5.0 and "loss_ce_9" not in weights


def test_weight_dict_variants_key_counts():
    assert len(build_weight_dict(LossConfig(num_classes=80, mask_losses=False))) == 120  # (3 -> 6 -> 12) x 10
    standard = build_weight_dict(LossConfig(num_classes=80, dn="standard"))
    assert len(standard) == 180  # (5 -> 10 -> 18) x 10
    # official filter excludes only the exact keys loss_mask / loss_dice
    assert "loss_mask_dn" not in standard and "loss_mask_interm_dn" in standard
    assert len(build_weight_dict(LossConfig(num_classes=80, two_stage=False))) == 100  # (5 -> 10) x 10
    assert len(build_weight_dict(LossConfig(num_classes=80, dn="no", deep_supervision=False))) == 10
    assert set(build_weight_dict(LossConfig(num_classes=80, box_loss=False, two_stage=False, dn="no", deep_supervision=False))) == {
        "loss_ce", "loss_mask", "loss_dice"
    }


def test_r50_instance_forward_yields_exactly_105_weighted_terms():
    torch.manual_seed(0)
    criterion = _criterion()
    losses = criterion(_head_output(2, [3, 2]), _targets([3, 2]), num_masks=5.0)
    weighted = _weighted(criterion, losses)
    assert len(weighted) == 105
    base = ["loss_ce", "loss_mask", "loss_dice", "loss_bbox", "loss_giou"]
    expected = set(base) | {f"{k}_dn" for k in base} | {f"{k}_interm" for k in base}
    expected |= {f"{k}_{i}" for k in base for i in range(9)} | {f"{k}_dn_{i}" for k in base for i in range(9)}
    assert set(weighted) == expected


@pytest.mark.parametrize(
    "overrides, head_kwargs, count",
    [
        ({"mask_losses": False}, {"with_masks": False}, 3 + 3 + 3 + 27 + 27),
        ({"dn": "standard"}, {}, 5 + 3 + 5 + 45 + 27),
        ({"two_stage": False}, {"interm": False}, 5 + 5 + 45 + 40),  # DN aux from layer 1 only
    ],
    ids=["detection_only", "dn_standard", "no_two_stage"],
)
def test_weighted_term_counts_of_variants(overrides, head_kwargs, count):
    torch.manual_seed(0)
    criterion = _criterion(**overrides)
    with_masks = head_kwargs.get("with_masks", True)
    losses = criterion(_head_output(2, [3, 2], **head_kwargs), _targets([3, 2], with_masks=with_masks), num_masks=5.0)
    assert len(_weighted(criterion, losses)) == count


# ------------------------------------------------------------------------------------------ DN layout
def test_dn_indices_repeat_targets_in_every_group():
    groups = DenoisingGroups(num_groups=3, single_pad=4, attn_mask=torch.zeros(1, 1, dtype=torch.bool))
    idx = dn_indices(_targets([2, 0], with_masks=False), groups)
    assert idx[0][0].tolist() == [0, 1, 4, 5, 8, 9] and idx[0][1].tolist() == [0, 1, 0, 1, 0, 1]
    assert idx[1][0].numel() == 0 and idx[1][0].dtype == torch.int64


def test_dn_losses_are_normalised_by_num_masks_times_groups():
    torch.manual_seed(0)
    criterion = _criterion()
    out = _head_output(1, [2], num_aux=0, interm=False)
    targets = _targets([2])
    losses = criterion(out, targets, num_masks=2.0)
    idx = dn_indices(targets, out.dn.groups)
    direct = criterion.loss_boxes(out.dn.final, targets, idx, 2.0 * 3)
    torch.testing.assert_close(losses["loss_bbox_dn"], direct["loss_bbox"])
    torch.testing.assert_close(losses["loss_giou_dn"], direct["loss_giou"])


def test_no_dn_this_iteration_gives_zero_dn_losses():
    torch.manual_seed(0)
    criterion = _criterion()
    losses = criterion(_head_output(2, [3, 2], dn=False), _targets([3, 2]), num_masks=5.0)
    dn_keys = [k for k in losses if "_dn" in k]
    assert len(dn_keys) == 5 + 45
    for k in dn_keys:
        assert losses[k].item() == 0.0 and losses[k].device == torch.device("cpu")
    standard = _criterion(dn="standard")(_head_output(2, [3, 2], dn=False), _targets([3, 2]), num_masks=5.0)
    assert sorted(k for k in standard if k.endswith("_dn")) == ["loss_bbox_dn", "loss_ce_dn", "loss_giou_dn"]
    no_dn = _criterion(dn="no")(_head_output(2, [3, 2], dn=False), _targets([3, 2]), num_masks=5.0)
    assert not any("_dn" in k for k in no_dn)


# ------------------------------------------------------------------------------------ individual losses
def test_focal_loss_equals_direct_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, generator=g)
    targets = [Targets(labels=torch.tensor([2]), boxes=torch.rand(1, 4)), Targets(labels=torch.tensor([0, 3]), boxes=torch.rand(2, 4))]
    indices = [(torch.tensor([1]), torch.tensor([0])), (torch.tensor([2, 0]), torch.tensor([0, 1]))]
    criterion = SetCriterion(LossConfig(num_classes=4))
    loss = criterion.loss_labels(Predictions(logits=logits, boxes=torch.rand(2, 3, 4)), targets, indices, 3.0)["loss_ce"]

    onehot = torch.zeros(2, 3, 4)
    onehot[0, 1, 2] = onehot[1, 2, 0] = onehot[1, 0, 3] = 1
    total = 0.0
    for b in range(2):
        for q in range(3):
            for c in range(4):
                x, t = logits[b, q, c].item(), onehot[b, q, c].item()
                p = 1 / (1 + math.exp(-x))
                ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
                p_t = p * t + (1 - p) * (1 - t)
                a_t = 0.25 * t + 0.75 * (1 - t)
                total += a_t * (1 - p_t) ** 2 * ce
    # mean over queries, sum, / num_boxes, then * Q == sum over everything / num_boxes
    assert loss.item() == pytest.approx(total / 3.0, rel=1e-5)
    assert sigmoid_focal_loss(logits, onehot, 3.0).item() * 3 == pytest.approx(total / 3.0, rel=1e-5)


def test_loss_boxes_hand_case():
    pred = Predictions(logits=torch.zeros(1, 2, 2), boxes=torch.tensor([[[0.9, 0.9, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]]]))
    targets = [Targets(labels=torch.tensor([0]), boxes=torch.tensor([[0.5, 0.5, 0.4, 0.4]]))]
    indices = [(torch.tensor([1]), torch.tensor([0]))]
    losses = SetCriterion(LossConfig(num_classes=2)).loss_boxes(pred, targets, indices, 2.0)
    assert losses["loss_bbox"].item() == pytest.approx(0.4 / 2.0, rel=1e-5)  # |0.2-0.4| * 2
    iou = 0.04 / (0.16 + 1e-6)  # small box inside the big one; enclosing box = big box -> GIoU = IoU
    assert losses["loss_giou"].item() == pytest.approx((1 - (iou - 0.0)) / 2.0, rel=1e-5)


def test_stuff_box_loss_masked_skips_stuff_but_keeps_normalisation():
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]]])
    pred = Predictions(logits=torch.zeros(1, 2, 100), boxes=boxes)
    targets = [Targets(labels=torch.tensor([5, 90]), boxes=torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.7, 0.7, 0.2, 0.2]]))]
    indices = [(torch.tensor([0, 1]), torch.tensor([0, 1]))]
    masked = SetCriterion(LossConfig(num_classes=100, stuff_box_loss_masked=True)).loss_boxes(pred, targets, indices, 4.0)
    assert masked["loss_bbox"].item() == pytest.approx(0.4 / 4.0, rel=1e-5)
    plain = SetCriterion(LossConfig(num_classes=100)).loss_boxes(pred, targets, indices, 4.0)
    assert plain["loss_bbox"].item() == pytest.approx((0.4 + 0.8) / 4.0, rel=1e-5)


def test_loss_masks_identical_confident_masks_give_near_zero_bce_and_dice():
    torch.manual_seed(0)
    gt = torch.zeros(2, GT_HW, GT_HW, dtype=torch.bool)
    gt[0, 4:28, 4:28] = True  # a square well inside the image; the other target is empty
    pred_masks = torch.full((1, 2, MASK_HW, MASK_HW), -50.0)
    pred_masks[0, 0, 1:7, 1:7] = 50.0  # the same square at 1/4 resolution
    pred = Predictions(logits=torch.zeros(1, 2, 2), boxes=torch.rand(1, 2, 4), masks=pred_masks)
    targets = [Targets(labels=torch.tensor([0, 1]), boxes=torch.rand(2, 4), masks=gt)]
    identity = [(torch.tensor([0, 1]), torch.tensor([0, 1]))]
    losses = _criterion().loss_masks(pred, targets, identity, 2.0)
    # Not exactly 0: importance sampling picks points in the one-pixel bilinear band of the 1/4-res
    # prediction, where logits pass through 0 while the 4x finer GT is still sharp.
    assert losses["loss_dice"].item() < 0.05
    swapped = _criterion().loss_masks(pred, targets, [(torch.tensor([0, 1]), torch.tensor([1, 0]))], 2.0)
    assert swapped["loss_dice"].item() > 0.5 and swapped["loss_mask"].item() > 10 * losses["loss_mask"].item()

    # An empty target with a confidently empty prediction has no band at all: exactly ~0.
    empty_only = [(torch.tensor([1]), torch.tensor([1]))]
    exact = _criterion().loss_masks(pred, targets, empty_only, 1.0)
    assert exact["loss_dice"].item() < 1e-6 and exact["loss_mask"].item() < 1e-6


def test_loss_masks_with_nothing_matched_is_a_connected_zero():
    pred = _predictions(1, 3, torch.Generator().manual_seed(0))
    empty = [Targets(labels=torch.zeros(0, dtype=torch.int64), boxes=torch.zeros(0, 4), masks=torch.zeros(0, GT_HW, GT_HW, dtype=torch.bool))]
    losses = _criterion().loss_masks(pred, empty, [(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))], 1.0)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_mask"].requires_grad


def test_loss_masks_pads_targets_of_different_sizes():
    torch.manual_seed(0)
    pred = _predictions(2, 2, torch.Generator().manual_seed(0))
    targets = [
        Targets(labels=torch.tensor([0]), boxes=torch.rand(1, 4), masks=torch.ones(1, 16, 16, dtype=torch.bool)),
        Targets(labels=torch.tensor([1]), boxes=torch.rand(1, 4), masks=torch.ones(1, 32, 24, dtype=torch.bool)),
    ]
    losses = _criterion().loss_masks(pred, targets, [(torch.tensor([0]), torch.tensor([0]))] * 2, 2.0)
    assert all(torch.isfinite(v) for v in losses.values())


def test_ce_variant_uses_empty_weight_for_no_object():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, NUM_CLASSES + 1, generator=g)
    pred = Predictions(logits=logits, boxes=torch.rand(1, 3, 4))
    targets = [Targets(labels=torch.tensor([2]), boxes=torch.rand(1, 4))]
    indices = [(torch.tensor([1]), torch.tensor([0]))]
    criterion = SetCriterion(LossConfig(num_classes=NUM_CLASSES, semantic_ce_loss=True, no_object_weight=0.1))
    assert criterion.empty_weight.tolist() == pytest.approx([1.0] * NUM_CLASSES + [0.1])
    assert "empty_weight" in criterion.state_dict()
    loss = criterion.get_loss("labels", pred, targets, indices, 7.0)["loss_ce"]
    # weighted mean: (0.1 * nll(q0, no-obj) + 1 * nll(q1, 2) + 0.1 * nll(q2, no-obj)) / (0.1 + 1 + 0.1)
    nll = -F.log_softmax(logits[0], -1)
    expected = (0.1 * nll[0, NUM_CLASSES] + nll[1, 2] + 0.1 * nll[2, NUM_CLASSES]) / 1.2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------- robustness
def test_every_loss_finite_for_empty_image_and_mixed_batch():
    torch.manual_seed(0)
    criterion = _criterion()
    only_empty = criterion(_head_output(1, [0]), _targets([0]), num_masks=1.0)
    mixed = criterion(_head_output(2, [0, 3], seed=1), _targets([0, 3], seed=1), num_masks=3.0)
    for losses in (only_empty, mixed):
        assert len(_weighted(criterion, losses)) == 105
        for name, value in losses.items():
            assert torch.isfinite(value), name


def test_gradient_reaches_every_prediction_tensor():
    torch.manual_seed(0)
    criterion = _criterion()
    out = _head_output(2, [2, 1], num_aux=2)
    losses = _weighted(criterion, criterion(out, _targets([2, 1]), num_masks=3.0))
    sum(losses.values()).backward()
    sets = [out.final, out.interm, *out.aux, out.dn.final, *out.dn.aux]
    for pred in sets:
        for tensor in (pred.logits, pred.boxes, pred.masks):
            assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_detection_only_needs_no_masks():
    torch.manual_seed(0)
    criterion = _criterion(mask_losses=False)
    losses = criterion(_head_output(2, [2, 0], with_masks=False), _targets([2, 0], with_masks=False), num_masks=2.0)
    assert not any("mask" in k or "dice" in k for k in losses)
    assert all(torch.isfinite(v) for v in losses.values())
