"""Inference post-processing (docs/model.md#post-processing): instance, panoptic, semantic and the per-image driver."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.postprocess import (
    InferenceConfig,
    box_postprocess,
    instance_inference,
    panoptic_inference,
    postprocess_image,
    sem_seg_postprocess,
    semantic_inference,
)

BIG = 10.0


def _logit(p: float) -> float:
    return float(torch.logit(torch.tensor(p)))


# ------------------------------------------------------------------------------------------ instance
def test_instance_topk_over_query_class_pairs_and_score_is_prob_times_mask_prob():
    # 3 queries x 2 classes; top-3 pairs: (q0,c1)=0.9, (q2,c0)=0.8, (q0,c0)=0.7 -> q0 appears twice.
    probs = torch.tensor([[0.7, 0.9], [0.1, 0.2], [0.8, 0.3]])
    logits = torch.logit(probs)
    masks = torch.full((3, 2, 2), -BIG)
    masks[0, 0, 0], masks[0, 0, 1] = _logit(0.6), _logit(0.8)  # q0: two foreground pixels, mean prob 0.7
    masks[2, 1, 1] = _logit(0.9)  # q2: one foreground pixel
    boxes = torch.arange(12.0).view(3, 4)
    result = instance_inference(logits, masks, boxes, InferenceConfig(detections_per_image=3))
    got = {(int(q), int(c)): float(s) for q, c, s in zip(result.query_index, result.classes, result.scores)}
    assert got.keys() == {(0, 1), (2, 0), (0, 0)}
    assert got[(0, 1)] == pytest.approx(0.9 * 0.7, rel=1e-4)
    assert got[(0, 0)] == pytest.approx(0.7 * 0.7, rel=1e-4)
    assert got[(2, 0)] == pytest.approx(0.8 * 0.9, rel=1e-4)
    for i, q in enumerate(result.query_index.tolist()):
        assert torch.equal(result.boxes[i], boxes[q])
        assert torch.equal(result.masks[i], masks[q] > 0) and result.masks.dtype == torch.bool

    boxed = instance_inference(logits, masks, boxes, InferenceConfig(detections_per_image=3, focus_on_box=True))
    assert sorted(boxed.scores.tolist()) == pytest.approx([0.7, 0.8, 0.9], rel=1e-5)


def test_instance_inference_keeps_only_things_when_panoptic_on():
    probs = torch.tensor([[0.9, 0.8], [0.7, 0.6]])
    masks = torch.full((2, 2, 2), BIG)
    cfg = InferenceConfig(detections_per_image=4, panoptic_on=True)
    result = instance_inference(torch.logit(probs), masks, torch.zeros(2, 4), cfg, thing_classes={1})
    assert result.classes.tolist() == [1, 1]
    assert sorted(result.query_index.tolist()) == [0, 1]


def test_box_postprocess_scales_xyxy_by_w_h():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    torch.testing.assert_close(box_postprocess(boxes, scale_h=100.0, scale_w=200.0), torch.tensor([[80.0, 30.0, 120.0, 70.0]]))


# ------------------------------------------------------------------------------------------ panoptic
def _panoptic_case() -> tuple[torch.Tensor, torch.Tensor]:
    """4x4 image, classes: 0 thing, 1 and 2 stuff.

    q0 thing c0 on columns 0-1; q1 and q2 stuff c1 on column 2 (top / bottom) -> one merged segment;
    q3 stuff c2 claims columns 0-1 weakly and column 3 strongly: it wins only column 3, 4 of its 12
    pixels < overlap 0.8 -> dropped; q4 covers column 3 but its best class prob 0.2 < 0.25 -> not kept.
    """
    logits = torch.full((5, 3), -5.0)
    logits[0, 0] = logits[1, 1] = logits[2, 1] = 5.0
    logits[3, 2] = 2.0
    logits[4, 2] = _logit(0.2)
    masks = torch.full((5, 4, 4), -BIG)
    masks[0, :, 0:2] = BIG
    masks[1, 0:2, 2] = BIG
    masks[2, 2:4, 2] = BIG
    masks[3, :, 0:2] = 3.0
    masks[3, :, 3] = BIG
    masks[4, :, 3] = BIG
    return logits, masks


@pytest.mark.parametrize("transform_eval", [True, False])
def test_panoptic_merges_stuff_and_drops_by_overlap_and_object_threshold(transform_eval):
    logits, masks = _panoptic_case()
    cfg = InferenceConfig(panoptic_on=True, pano_transform_eval=transform_eval)
    result = panoptic_inference(logits, masks, cfg, thing_classes={0})
    expected = torch.tensor([[1, 1, 2, 0]] * 4, dtype=torch.int32)
    assert torch.equal(result.segment_map, expected) and result.segment_map.dtype == torch.int32
    assert [(s.id, s.category_id, s.isthing) for s in result.segments] == [(1, 0, True), (2, 1, False)]


def test_panoptic_overlap_threshold_is_a_ratio_of_won_to_own_area():
    logits, masks = _panoptic_case()
    # q3 wins 4 of its 12 pixels: kept once the threshold is below 1/3, then column 3 becomes segment 3.
    result = panoptic_inference(logits, masks, InferenceConfig(panoptic_on=True, overlap_threshold=0.3), {0})
    assert result.segment_map[:, 3].tolist() == [3, 3, 3, 3]
    assert result.segments[-1].category_id == 2 and not result.segments[-1].isthing


def test_panoptic_with_nothing_kept_is_all_void():
    result = panoptic_inference(torch.full((2, 3), -5.0), torch.zeros(2, 3, 3), InferenceConfig(panoptic_on=True), {0})
    assert result.segments == [] and int(result.segment_map.abs().sum()) == 0


# ------------------------------------------------------------------------------------------ semantic
def test_semantic_ce_variant_softmax_without_no_object_times_sigmoid_masks():
    g = torch.Generator().manual_seed(0)
    logits, masks = torch.randn(3, 4, generator=g), torch.randn(3, 2, 2, generator=g)  # 3 classes + no-object
    out = semantic_inference(logits, masks, InferenceConfig(semantic_ce_loss=True))
    cls = torch.softmax(logits, -1)[:, :3]
    expected = sum(cls[q][:, None, None] * masks[q].sigmoid()[None] for q in range(3))
    torch.testing.assert_close(out, expected)


def test_semantic_focal_variant_with_and_without_temperature_softmax():
    g = torch.Generator().manual_seed(1)
    logits, masks = torch.randn(3, 4, generator=g), torch.randn(3, 2, 2, generator=g)
    sharp = semantic_inference(logits, masks, InferenceConfig(pano_temperature=0.06))
    cls = torch.softmax(logits.sigmoid() / 0.06, -1)
    torch.testing.assert_close(sharp, torch.einsum("qc,qhw->chw", cls, masks.sigmoid()))
    plain = semantic_inference(logits, masks, InferenceConfig(pano_transform_eval=False))
    torch.testing.assert_close(plain, torch.einsum("qc,qhw->chw", logits.sigmoid(), masks.sigmoid()))


# ------------------------------------------------------------------------------------------ resizing
def test_sem_seg_postprocess_crops_padding_before_resizing():
    result = torch.full((2, 8, 10), 100.0)
    result[0, :6, :7] = 1.0
    result[1, :6, :7] = torch.arange(42.0).view(6, 7)
    out = sem_seg_postprocess(result, (6, 7), 12, 14)
    assert out.shape == (2, 12, 14)
    torch.testing.assert_close(out[0], torch.ones(12, 14))  # no padding value leaks in
    expected = F.interpolate(result[None, 1:, :6, :7], size=(12, 14), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(out[1], expected)


def test_postprocess_image_instance_boxes_scaled_by_padded_over_resized_times_original():
    logits = torch.tensor([[5.0, -5.0]])
    masks = torch.full((1, 8, 8), BIG)  # 1/4 of the 32x32 padded tensor
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    # resized image 30x20 padded to 32x32, original 60x40
    result = postprocess_image(logits, masks, boxes, (32, 32), (30, 20), (60, 40), InferenceConfig(detections_per_image=1))
    inst = result.instances
    scale_h, scale_w = 32 / 30 * 60, 32 / 20 * 40
    torch.testing.assert_close(inst.boxes, torch.tensor([[0.25 * scale_w, 0.25 * scale_h, 0.75 * scale_w, 0.75 * scale_h]]))
    assert inst.masks.shape == (1, 60, 40) and bool(inst.masks.all())
    assert result.panoptic is None and result.semantic is None


def test_postprocess_image_semantic_only_resizes_after_inference():
    g = torch.Generator().manual_seed(0)
    logits, masks = torch.randn(3, 5, generator=g), torch.randn(3, 8, 8, generator=g)
    cfg = InferenceConfig(instance_on=False, semantic_on=True, semantic_ce_loss=True)
    assert cfg.postprocess_before_inference is False
    result = postprocess_image(logits, masks, torch.rand(3, 4), (32, 32), (30, 28), (15, 14), cfg)
    up = F.interpolate(masks[None], size=(32, 32), mode="bilinear", align_corners=False)[0]
    expected = sem_seg_postprocess(semantic_inference(logits, up, cfg), (30, 28), 15, 14)
    torch.testing.assert_close(result.semantic.probabilities, expected)
    assert result.semantic.labels.shape == (15, 14)


def test_postprocess_image_all_tasks_at_original_size():
    logits, masks = _panoptic_case()
    cfg = InferenceConfig(instance_on=True, panoptic_on=True, semantic_on=True, detections_per_image=5)
    assert cfg.postprocess_before_inference is True
    small = masks[:, ::2, ::2].contiguous()  # 2x2 at 1/4 of an 8x8 padded tensor
    result = postprocess_image(logits, small, torch.rand(5, 4), (8, 8), (8, 8), (16, 16), cfg, thing_classes={0})
    assert result.semantic.probabilities.shape == (3, 16, 16)
    assert result.panoptic.segment_map.shape == (16, 16)
    assert result.instances.masks.shape[1:] == (16, 16)
    assert set(result.instances.classes.tolist()) == {0}


def test_explicit_no_postprocess_before_inference_rejected_for_instances():
    with pytest.raises(ValueError, match="semantic-only"):
        InferenceConfig(instance_on=True, sem_seg_postprocess_before_inference=False)


# ------------------------------------------------------------------ parity with the official eval branch
PARITY = Path(__file__).parent / "fixtures" / "parity"


def _fixture(name: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    folder = PARITY / name
    if not (folder / "outputs.npz").exists():
        pytest.skip(f"parity fixture {name} not present")
    return dict(np.load(folder / "inputs.npz")), dict(np.load(folder / "outputs.npz"))


def _geometry(inputs: dict[str, np.ndarray]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    return tuple(inputs["padded_hw"].tolist()), tuple(inputs["image_size_hw"].tolist()), tuple(inputs["output_hw"].tolist())


def test_parity_instance_results_match_official_eval_branch():
    inputs, outputs = _fixture("instance_small")
    padded, image, out = _geometry(inputs)
    result = postprocess_image(
        torch.from_numpy(outputs["pred_logits"][0]), torch.from_numpy(outputs["pred_masks"][0]),
        torch.from_numpy(outputs["pred_boxes"][0]), padded, image, out, InferenceConfig(),
    ).instances
    # topk(sorted=False): compare as (query, class) -> values rather than by position.
    ours = {(int(q), int(c)): i for i, (q, c) in enumerate(zip(result.query_index, result.classes))}
    official = {(int(q), int(c)): i for i, (q, c) in enumerate(zip(outputs["inst_query_index"], outputs["inst_pred_classes"]))}
    assert ours.keys() == official.keys()
    order = [ours[key] for key in official]
    torch.testing.assert_close(result.scores[order], torch.from_numpy(outputs["inst_scores"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.boxes[order], torch.from_numpy(outputs["inst_boxes_xyxy"]), rtol=1e-5, atol=1e-4)
    masks = result.masks[order]
    assert torch.equal(masks.flatten(1).sum(1), torch.from_numpy(outputs["inst_mask_area"]))
    assert torch.equal(masks, torch.from_numpy(outputs["inst_masks"]))


def test_parity_semantic_ce_results_match_official_eval_branch():
    inputs, outputs = _fixture("semantic_small")
    padded, image, out = _geometry(inputs)
    cfg = InferenceConfig(instance_on=False, semantic_on=True, semantic_ce_loss=True,
                          object_mask_threshold=0.8)
    result = postprocess_image(
        torch.from_numpy(outputs["pred_logits"][0]), torch.from_numpy(outputs["pred_masks"][0]),
        torch.from_numpy(outputs["pred_boxes"][0]), padded, image, out, cfg,
    )
    torch.testing.assert_close(result.semantic.probabilities, torch.from_numpy(outputs["sem_seg"]), rtol=1e-5, atol=1e-5)
