"""Image transforms. Test time: detectron2's ResizeShortestEdge (COCO 800/1333, ADE20K 512/2048).
Training: the official recipes (LSJ, ADE20K semantic, shortest-edge resize) applied to a shard sample,
giving the augmented image and its targets (see the "training" section)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from model.structures import Targets
from pipeline.color_aug import apply_color_jitter, sample_color_jitter
from pipeline.metrics.semantic import reduce_zero_label
from pipeline.targets import (
    IGNORE_LABEL,
    TrainSample,
    decode_label_map,
    decode_panoptic_ids,
    decode_rle_masks,
    detection_targets,
    instance_targets,
    non_crowd,
    panoptic_targets,
    semantic_targets,
)


def shortest_edge_size(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """(new_h, new_w) as detectron2's ResizeShortestEdge.get_output_shape: scale the short side to
    `short`, then shrink so the long side is at most `max_size`, rounding half up."""
    scale = short / min(height, width)
    new_h, new_w = (short, scale * width) if height < width else (scale * height, short)
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_for_test(image: np.ndarray, short: int, max_size: int) -> np.ndarray:
    """[H, W, 3] uint8 -> resized [h, w, 3] uint8 (PIL bilinear, as detectron2 for uint8 images).
    short <= 0 keeps the image as it is."""
    if short <= 0:
        return image
    h, w = shortest_edge_size(image.shape[0], image.shape[1], short, max_size)
    if (h, w) == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def image_tensor(image: np.ndarray) -> Tensor:
    """[H, W, 3] uint8 RGB -> [3, H, W] uint8, as detectron2's mappers hand images to the model.

    Kept uint8 on purpose: MaskDINO.preprocess converts on the model's device (exactly: every value is an
    integer 0..255), so DataLoader workers send, and the host copies to the accelerator, a quarter of the
    bytes of a float32 image. Measured on this CPU (LSJ 512, 2 workers): 147.6 vs 122.5 samples/s."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


# =============================================================================================== training
# Training-time augmentation, as the official dataset mappers (detectron2 / Mask2Former / MaskDINO):
#   lsj          COCOInstanceNewBaselineDatasetMapper / COCOPanopticNewBaselineDatasetMapper:
#                RandomFlip -> ResizeScale -> FixedSizeCrop (pads to image_size x image_size)
#   ade_semantic MaskFormerSemanticDatasetMapper: ResizeShortestEdge("choice") -> RandomCrop("absolute")
#                -> ColorAugSSDTransform -> RandomFlip, then the mapper's pad to SIZE_DIVISIBILITY
#   resize       Objects365 boxes (no official config): RandomFlip -> ResizeShortestEdge("choice"), the
#                detrex DINO recipe without its random-crop branch
#   none         no augmentation (debugging)
# Randomness comes only from the `np.random.Generator` passed in, so a resumed run replays the same draws.

Recipe = Literal["lsj", "ade_semantic", "resize", "none"]
ADE_SHORT_EDGES: tuple[int, ...] = tuple(int(0.1 * 512 * x) for x in range(5, 21))  # 256..1024
IMAGE_PAD_VALUE = 128  # detectron2 FixedSizeCrop pad_value, and the semantic mapper's F.pad value


@dataclass(frozen=True)
class AugConfig:
    """Training augmentation. Defaults are the COCO LSJ recipe; ADE20K sets recipe ade_semantic."""

    recipe: Recipe = "lsj"
    image_size: int = 1024  # lsj: ResizeScale target and FixedSizeCrop size
    min_scale: float = 0.1
    max_scale: float = 2.0
    short_edges: tuple[int, ...] = ADE_SHORT_EDGES  # ade_semantic / resize: shortest-edge choices
    max_size: int = 2048  # ade_semantic / resize: long-side cap
    crop_size: int = 512  # ade_semantic: absolute random crop
    color_aug_ssd: bool = True  # ade_semantic only
    flip: bool = True
    # instance / detection: drop samples without any non-crowd annotation (detectron2
    # FILTER_EMPTY_ANNOTATIONS: a dataset-level filter, so samples emptied by the crop are kept)
    filter_empty: bool = True
    # ade_semantic: pad image (128) and labels (255) bottom/right to a multiple of this, as the official
    # semantic mapper (INPUT.SIZE_DIVISIBILITY 512 = the crop); targets are normalised by the padded size
    size_divisibility: int = 512
    # panoptic: keep segments the crop removed entirely (empty mask, zero box), as the official mapper
    keep_cropped_segments: bool = True

    def __post_init__(self) -> None:
        if self.recipe not in get_args(Recipe):
            raise ValueError(f"recipe must be one of {get_args(Recipe)}, got {self.recipe!r}")
        if self.image_size < 1 or self.max_size < 1 or self.crop_size < 1 or self.size_divisibility < 0:
            raise ValueError("image_size, max_size and crop_size must be >= 1 and size_divisibility >= 0")
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {self.min_scale}, {self.max_scale}")
        if not self.short_edges or min(self.short_edges) < 1:
            raise ValueError(f"short_edges must be a non-empty list of sizes >= 1, got {self.short_edges}")


# ------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """One sample's geometric augmentation, shared by the image and all its labels so they stay aligned.

    Applied in this order: horizontal flip of the source (`flip_source`), resize (h, w) `source` ->
    `resized`, crop window `crop` = (y0, x0, h, w) of the resized image, horizontal flip of the crop
    (`flip_crop`), bottom/right padding to `canvas` (h, w). The two flip slots exist because the official
    recipes flip at different points (LSJ first, ADE last) and nearest / bilinear resizing does not
    commute exactly with flipping.
    """

    source: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int, int, int]
    canvas: tuple[int, int]
    flip_source: bool = False
    flip_crop: bool = False


def resize_scale_size(height: int, width: int, scale: float, target_h: int, target_w: int) -> tuple[int, int]:
    """detectron2 ResizeScale: fit (height, width) inside the target scaled by `scale`, keeping the aspect
    ratio; np.round (half to even), as detectron2. Clamped to >= 1 (detectron2 would fail on 0)."""
    target_scale_size = np.multiply((target_h, target_w), scale)
    output_scale = np.minimum(target_scale_size[0] / height, target_scale_size[1] / width)
    out_h, out_w = np.round(np.multiply((height, width), output_scale)).astype(int)
    return max(int(out_h), 1), max(int(out_w), 1)


def fixed_size_crop_offset(height: int, width: int, crop_h: int, crop_w: int, u: float) -> tuple[int, int]:
    """detectron2 FixedSizeCrop: (y0, x0) = round(max(size - crop, 0) * u) with ONE uniform u shared by
    both axes (detectron2 draws a single np.random.uniform), half to even."""
    max_offset = np.maximum(np.subtract((height, width), (crop_h, crop_w)), 0)
    y0, x0 = np.round(np.multiply(max_offset, u)).astype(int)
    return int(y0), int(x0)


def _draw_flip(cfg: AugConfig, rng: np.random.Generator) -> bool:
    # detectron2 RandomFlip(prob=0.5): flip when uniform(0, 1) < prob
    return cfg.flip and bool(rng.uniform() < 0.5)


def _round_up(size: int, divisor: int) -> int:
    return -(-size // divisor) * divisor


def plan_lsj(height: int, width: int, cfg: AugConfig, rng: np.random.Generator) -> Geometry:
    """RandomFlip -> ResizeScale(min_scale, max_scale, image_size) -> FixedSizeCrop(image_size, pad)."""
    flip = _draw_flip(cfg, rng)
    size = cfg.image_size
    rh, rw = resize_scale_size(height, width, rng.uniform(cfg.min_scale, cfg.max_scale), size, size)
    y0, x0 = fixed_size_crop_offset(rh, rw, size, size, rng.uniform())
    return Geometry((height, width), (rh, rw), (y0, x0, min(rh, size), min(rw, size)), (size, size),
                    flip_source=flip)


def plan_ade(height: int, width: int, cfg: AugConfig, rng: np.random.Generator) -> Geometry:
    """ResizeShortestEdge(short_edges, max_size, "choice") -> RandomCrop("absolute", crop_size) -> RandomFlip,
    then the semantic mapper's padding. RandomCrop_CategoryAreaConstraint with single_category_max_area 1.0
    is exactly RandomCrop (detectron2 returns the plain crop before looking at the labels)."""
    rh, rw = shortest_edge_size(height, width, int(rng.choice(cfg.short_edges)), cfg.max_size)
    ch, cw = min(cfg.crop_size, rh), min(cfg.crop_size, rw)
    y0 = int(rng.integers(rh - ch + 1))  # detectron2 RandomCrop: np.random.randint(h - croph + 1)
    x0 = int(rng.integers(rw - cw + 1))
    d = cfg.size_divisibility
    canvas = (_round_up(ch, d), _round_up(cw, d)) if d else (ch, cw)
    return Geometry((height, width), (rh, rw), (y0, x0, ch, cw), canvas, flip_crop=_draw_flip(cfg, rng))


def plan_resize(height: int, width: int, cfg: AugConfig, rng: np.random.Generator) -> Geometry:
    """RandomFlip -> ResizeShortestEdge(short_edges, max_size, "choice"); no crop, no padding."""
    flip = _draw_flip(cfg, rng)
    rh, rw = shortest_edge_size(height, width, int(rng.choice(cfg.short_edges)), cfg.max_size)
    return Geometry((height, width), (rh, rw), (0, 0, rh, rw), (rh, rw), flip_source=flip)


def plan_geometry(height: int, width: int, cfg: AugConfig, rng: np.random.Generator) -> Geometry:
    if cfg.recipe == "lsj":
        return plan_lsj(height, width, cfg, rng)
    if cfg.recipe == "ade_semantic":
        return plan_ade(height, width, cfg, rng)
    if cfg.recipe == "resize":
        return plan_resize(height, width, cfg, rng)
    return Geometry((height, width), (height, width), (0, 0, height, width), (height, width))


# ------------------------------------------------------------------------------------- applying it
def warp_image(image: np.ndarray, g: Geometry) -> np.ndarray:
    """[H, W, 3] uint8 -> [crop_h, crop_w, 3] uint8, not yet padded (colour augmentation comes first).
    Resized with PIL bilinear, as detectron2's ResizeTransform does for uint8 images."""
    if g.flip_source:
        image = image[:, ::-1]
    if g.resized != g.source:
        image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(g.resized[::-1], Image.BILINEAR))
    y0, x0, ch, cw = g.crop
    image = image[y0:y0 + ch, x0:x0 + cw]
    return image[:, ::-1] if g.flip_crop else image


def pad_to(array: np.ndarray, canvas: tuple[int, int], value: float, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Pad the two `axes` at the bottom/right up to `canvas` (detectron2 PadTransform)."""
    pad = [(0, 0)] * array.ndim
    pad[axes[0]] = (0, canvas[0] - array.shape[axes[0]])
    pad[axes[1]] = (0, canvas[1] - array.shape[axes[1]])
    return np.pad(array, pad, constant_values=value)


def _nearest_index(src: int, dst: int, style: str) -> np.ndarray:
    """Source index sampled by each of `dst` outputs when resizing `src` pixels with nearest neighbour.

    "pil": PIL NEAREST (what detectron2 uses for uint8 segmentation: instance and panoptic masks);
    "torch": F.interpolate(mode="nearest") (detectron2's path for non-uint8 segmentation: the semantic
    mapper's float64 sem_seg). Nearest resizing is separable, so a 1-D index per axis reproduces the 2-D
    resize exactly."""
    if style == "pil":
        row = Image.fromarray(np.arange(src, dtype=np.int32)[None, :])  # mode "I"
        return np.asarray(row.resize((dst, 1), Image.NEAREST))[0].astype(np.int64)
    grid = torch.arange(src, dtype=torch.float64)[None, None]
    return F.interpolate(grid, size=dst, mode="nearest")[0, 0].long().numpy()


def source_pixels(g: Geometry, style: str = "pil") -> tuple[np.ndarray, np.ndarray]:
    """(rows [crop_h], cols [crop_w]): the source pixel each un-padded output pixel comes from."""
    (h, w), (rh, rw) = g.source, g.resized
    y0, x0, ch, cw = g.crop
    rows = _nearest_index(h, rh, style)[y0:y0 + ch]
    cols = _nearest_index(w, rw, style)[x0:x0 + cw]
    if g.flip_source:
        cols = w - 1 - cols
    return rows, (cols[::-1] if g.flip_crop else cols)


def warp_masks(masks: np.ndarray, g: Geometry) -> np.ndarray:
    """[N, H, W] bool/uint8 instance masks -> [N, canvas_h, canvas_w] bool, nearest, padding False."""
    rows, cols = source_pixels(g, "pil")
    out = np.zeros((masks.shape[0], *g.canvas), dtype=bool)
    out[:, : len(rows), : len(cols)] = masks[:, rows][:, :, cols] != 0
    return out


def warp_label_map(labels: np.ndarray, g: Geometry, pad_value: int, style: str = "pil") -> np.ndarray:
    """[H, W] integer label / segment-id map -> [canvas_h, canvas_w] (same dtype), nearest, padded."""
    rows, cols = source_pixels(g, style)
    return pad_to(labels[rows][:, cols], g.canvas, pad_value)


def warp_boxes(boxes: np.ndarray, g: Geometry) -> np.ndarray:
    """[N, 4] xyxy source pixels -> [N, 4] xyxy canvas pixels, clipped to the canvas (detectron2
    transform_instance_annotations: transform the corners, then clip to the output image)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    (h, w), (rh, rw) = g.source, g.resized
    y0, x0, _, cw = g.crop
    if g.flip_source:
        b[:, [0, 2]] = w - b[:, [2, 0]]
    b[:, [0, 2]] = b[:, [0, 2]] * (rw / w) - x0
    b[:, [1, 3]] = b[:, [1, 3]] * (rh / h) - y0
    if g.flip_crop:
        b[:, [0, 2]] = cw - b[:, [2, 0]]
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, g.canvas[1])
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, g.canvas[0])
    return b


# ------------------------------------------------------------------------------------- one sample
def train_transform(image: np.ndarray, meta: dict[str, Any], label_png: bytes | None, task: str,
                    label_format: str | None, contiguous_ids: dict[int, int], cfg: AugConfig,
                    rng: np.random.Generator, key: str = "") -> TrainSample | None:
    """Augment one decoded shard sample and build its targets.

    image [H, W, 3] uint8 RGB; meta = the shard JSON (annotations with xyxy boxes and compressed RLE,
    panoptic segments); label_png = panoptic id PNG or semantic label PNG. Returns None when
    `cfg.filter_empty` drops the sample (instance / detection without any non-crowd annotation); a sample
    whose instances were all cropped away is kept with empty targets, as in the official training.
    """
    annotations = non_crowd(meta.get("annotations") or [])
    if cfg.filter_empty and task in ("instance", "detection") and not annotations:
        return None
    g = plan_geometry(image.shape[0], image.shape[1], cfg, rng)
    pixels = warp_image(image, g)
    if cfg.recipe == "ade_semantic" and cfg.color_aug_ssd:
        pixels = apply_color_jitter(pixels, sample_color_jitter(rng))
    pixels = pad_to(pixels, g.canvas, IMAGE_PAD_VALUE)
    classes = [contiguous_ids[int(a["category_id"])] for a in annotations]
    if task == "instance":
        masks = warp_masks(decode_rle_masks(annotations, *g.source), g)
        targets = instance_targets(masks, classes)
    elif task == "detection":
        boxes = warp_boxes(np.array([a["bbox"] for a in annotations], dtype=np.float64), g)
        targets = detection_targets(boxes, classes, *g.canvas)
    elif task == "panoptic":
        ids = warp_label_map(decode_panoptic_ids(_need(label_png, key)), g, -1)  # -1: no segment has it
        segments = [(int(s["id"]), contiguous_ids[int(s["category_id"])]) for s in non_crowd(meta["segments"])]
        targets = panoptic_targets(ids, segments, keep_empty=cfg.keep_cropped_segments)
    elif task == "semantic":
        labels = decode_label_map(_need(label_png, key))
        if label_format == "ade_label_uint8":
            labels = reduce_zero_label(labels)  # ADE 0 "other" -> 255 ignore, class v -> v - 1
        # torch nearest: the official mapper resizes the label map as float64, which detectron2 does with
        # F.interpolate rather than PIL
        targets = semantic_targets(warp_label_map(labels, g, IGNORE_LABEL, "torch"))
    else:
        raise ValueError(f"unknown task {task!r}; expected instance, detection, panoptic or semantic")
    return TrainSample(image_tensor(pixels), targets, key)


def _need(label_png: bytes | None, key: str) -> bytes:
    if label_png is None:
        raise ValueError(f"sample {key!r} has no label PNG")
    return label_png


def collate(samples: list[TrainSample]) -> tuple[list[Tensor], list[Targets]]:
    """Batch of samples -> (images, targets) lists for MaskDINO.losses (it pads the images itself)."""
    return [s.image for s in samples], [s.targets for s in samples]
