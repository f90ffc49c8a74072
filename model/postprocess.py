"""Inference post-processing of one image (official `MaskDINO.forward` eval branch), docs/model.md#post-processing.

From the final decoder outputs of one image (class logits, 1/4-resolution mask logits, normalised cxcywh
boxes) to instance, panoptic and semantic results in original-image pixels. Reproduces the official
quirks: boxes are scaled by padded / resized * original size (they are normalised to the padded tensor),
instance scores are class prob x mean mask prob, panoptic scores are sharpened with softmax(sigmoid / T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from model.box_ops import box_cxcywh_to_xyxy
from model.structures import (
    ImageResult,
    InstanceResult,
    PanopticResult,
    PanopticSegment,
    SemanticResult,
)

# Panoptic: a query's "original" region is where its mask probability reaches this value.
_PANOPTIC_MASK_PROB = 0.5


@dataclass
class InferenceConfig:
    """MODEL.MaskDINO.TEST.* and TEST.DETECTIONS_PER_IMAGE.

    sem_seg_postprocess_before_inference: None -> official rule (True iff instance_on or panoptic_on);
    False with instance_on/panoptic_on is rejected, since those results must be at the original size.
    semantic_ce_loss: the model was trained with softmax CE (K+1 logits, last = no object); inside a
    MaskDINO it is taken from decoder.semantic_ce_loss.
    """

    instance_on: bool = True
    panoptic_on: bool = False
    semantic_on: bool = False
    object_mask_threshold: float = 0.25
    overlap_threshold: float = 0.8
    detections_per_image: int = 100
    pano_transform_eval: bool = True
    pano_temperature: float = 0.06
    focus_on_box: bool = False
    semantic_ce_loss: bool = False
    sem_seg_postprocess_before_inference: bool | None = None

    def __post_init__(self) -> None:
        if self.sem_seg_postprocess_before_inference is False and (self.instance_on or self.panoptic_on):
            raise ValueError(
                "sem_seg_postprocess_before_inference=False only works for semantic-only inference: "
                "instance and panoptic results need masks at the original image size"
            )

    @property
    def postprocess_before_inference(self) -> bool:
        if self.sem_seg_postprocess_before_inference is None:
            return self.instance_on or self.panoptic_on
        return self.sem_seg_postprocess_before_inference


def sem_seg_postprocess(result: Tensor, img_size: tuple[int, int], out_h: int, out_w: int) -> Tensor:
    """detectron2 `sem_seg_postprocess`: [C, H_pad, W_pad] -> crop to img_size (h, w) -> bilinear to
    (out_h, out_w), align_corners=False."""
    result = result[:, : img_size[0], : img_size[1]].expand(1, -1, -1, -1)
    return F.interpolate(result, size=(int(out_h), int(out_w)), mode="bilinear", align_corners=False)[0]


def box_postprocess(boxes_cxcywh: Tensor, scale_h: float, scale_w: float) -> Tensor:
    """[Q, 4] normalised cxcywh -> [Q, 4] xyxy pixels (x * scale_w, y * scale_h); not clipped (official)."""
    scale = boxes_cxcywh.new_tensor([scale_w, scale_h, scale_w, scale_h])
    return box_cxcywh_to_xyxy(boxes_cxcywh) * scale


def _is_thing(label: int, thing_classes: set[int] | None) -> bool:
    """None = no stuff/thing metadata: every class counts as a thing."""
    return thing_classes is None or label in thing_classes


def instance_inference(
    logits: Tensor,
    mask_logits: Tensor,
    boxes_xyxy: Tensor,
    cfg: InferenceConfig,
    thing_classes: set[int] | None = None,
) -> InstanceResult:
    """Top-k (query, class) pairs by sigmoid score; score = class prob * mean mask prob inside the mask.

    logits [Q, K]; mask_logits [Q, H, W] at output size; boxes_xyxy [Q, 4] pixels. A query may appear
    with several classes. With panoptic_on only thing classes are kept. topk is `sorted=False`, as the
    official code, so the order of the instances is whatever torch.topk returns.
    """
    num_classes = logits.shape[-1]
    scores = logits.sigmoid()
    k = min(cfg.detections_per_image, scores.numel())
    scores_per_image, topk_indices = scores.flatten(0, 1).topk(k, sorted=False)
    labels = topk_indices % num_classes
    query = topk_indices // num_classes
    if cfg.panoptic_on and thing_classes is not None:
        keep = torch.isin(labels, torch.tensor(sorted(thing_classes), dtype=labels.dtype, device=labels.device))
        scores_per_image, labels, query = scores_per_image[keep], labels[keep], query[keep]
    masks = mask_logits[query]
    binary = (masks > 0).to(masks.dtype)
    mask_scores = (masks.sigmoid().flatten(1) * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    final_scores = scores_per_image if cfg.focus_on_box else scores_per_image * mask_scores
    return InstanceResult(
        scores=final_scores, classes=labels, boxes=boxes_xyxy[query], masks=masks > 0, query_index=query
    )


def _panoptic_scores(logits: Tensor, cfg: InferenceConfig) -> tuple[Tensor, Tensor, Tensor]:
    """(keep [Q] bool, scores [Q], labels [Q]): keep from the sigmoid max; scores/labels then optionally
    sharpened with softmax(sigmoid / T) (keep is NOT recomputed, as the official code)."""
    num_classes = logits.shape[-1] - 1 if cfg.semantic_ce_loss else logits.shape[-1]
    probs = logits.sigmoid()
    scores, labels = probs.max(-1)
    keep = labels.ne(num_classes) & (scores > cfg.object_mask_threshold)
    if cfg.pano_transform_eval:
        scores, labels = F.softmax(probs / cfg.pano_temperature, dim=-1).max(-1)
    return keep, scores, labels


def panoptic_inference(
    logits: Tensor, mask_logits: Tensor, cfg: InferenceConfig, thing_classes: set[int] | None = None
) -> PanopticResult:
    """Paint kept queries by per-pixel argmax of score * mask prob; ids from 1 in query order, 0 = void.

    logits [Q, K]; mask_logits [Q, H, W]. A query is dropped if its argmax region or its own >= 0.5
    region is empty, or if argmax_area / own_area < overlap_threshold. Painted pixels are argmax == k and
    own mask >= 0.5. Stuff queries of an already seen class reuse that class's segment id.
    """
    keep, scores, labels = _panoptic_scores(logits, cfg)
    mask_probs = mask_logits.sigmoid()
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_probs[keep]
    h, w = mask_logits.shape[-2:]
    segment_map = torch.zeros((h, w), dtype=torch.int32, device=mask_logits.device)
    segments: list[PanopticSegment] = []
    if cur_masks.shape[0] == 0:
        return PanopticResult(segment_map=segment_map, segments=segments)

    cur_mask_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    stuff_segment_of_class: dict[int, int] = {}
    current_id = 0
    for k, pred_class in enumerate(cur_classes.tolist()):
        isthing = _is_thing(pred_class, thing_classes)
        own = cur_masks[k] >= _PANOPTIC_MASK_PROB
        won = cur_mask_ids == k
        mask = won & own
        mask_area, original_area = int(won.sum()), int(own.sum())
        if mask_area == 0 or original_area == 0 or int(mask.sum()) == 0:
            continue
        if mask_area / original_area < cfg.overlap_threshold:
            continue
        if not isthing and pred_class in stuff_segment_of_class:
            segment_map[mask] = stuff_segment_of_class[pred_class]
            continue
        current_id += 1
        if not isthing:
            stuff_segment_of_class[pred_class] = current_id
        segment_map[mask] = current_id
        segments.append(PanopticSegment(id=current_id, category_id=int(pred_class), isthing=bool(isthing)))
    return PanopticResult(segment_map=segment_map, segments=segments)


def semantic_inference(logits: Tensor, mask_logits: Tensor, cfg: InferenceConfig) -> Tensor:
    """Per-class scores [C, H, W] = sum_q class_prob[q, c] * sigmoid(mask[q]).

    CE-trained: softmax over K+1 without the no-object column. Focal-trained: sigmoid, then (if
    pano_transform_eval) softmax(. / T) to sharpen it.
    """
    if cfg.semantic_ce_loss:
        class_probs = F.softmax(logits, dim=-1)[..., :-1]
    else:
        class_probs = logits.sigmoid()
        if cfg.pano_transform_eval:
            class_probs = F.softmax(class_probs / cfg.pano_temperature, dim=-1)
    return torch.einsum("qc,qhw->chw", class_probs, mask_logits.sigmoid())


def postprocess_image(
    logits: Tensor,
    mask_logits: Tensor,
    boxes: Tensor,
    padded_hw: tuple[int, int],
    image_hw: tuple[int, int],
    output_hw: tuple[int, int],
    cfg: InferenceConfig,
    thing_classes: set[int] | None = None,
) -> ImageResult:
    """Results of one image, as the official eval branch.

    logits [Q, K]; mask_logits [Q, h/4, w/4]; boxes [Q, 4] normalised cxcywh of the padded tensor;
    padded_hw: batch tensor size (multiple of 32); image_hw: this image's resized size before padding;
    output_hw: original image size (the requested output resolution).
    """
    masks = F.interpolate(mask_logits[None], size=tuple(padded_hw), mode="bilinear", align_corners=False)[0]
    before = cfg.postprocess_before_inference
    out_h, out_w = output_hw
    if before:
        masks = sem_seg_postprocess(masks, image_hw, out_h, out_w)
        logits = logits.to(masks)
    result = ImageResult()
    if cfg.semantic_on:
        probs = semantic_inference(logits, masks, cfg)
        if not before:
            probs = sem_seg_postprocess(probs, image_hw, out_h, out_w)
        result.semantic = SemanticResult(probabilities=probs)
    if cfg.panoptic_on:
        result.panoptic = panoptic_inference(logits, masks, cfg, thing_classes)
    if cfg.instance_on:
        # Boxes are normalised to the padded tensor: scale by padded/resized * original (official quirk).
        scale_h = padded_hw[0] / image_hw[0] * out_h
        scale_w = padded_hw[1] / image_hw[1] * out_w
        boxes_xyxy = box_postprocess(boxes.to(masks), scale_h, scale_w)
        result.instances = instance_inference(logits, masks, boxes_xyxy, cfg, thing_classes)
    return result
