"""Pictures of predictions: instance, panoptic and semantic results drawn onto the image, in the manner
of detectron2's Visualizer (translucent masks, contours, boxes, class labels), with numpy and Pillow only.

Every function takes an [H, W, 3] uint8 RGB image and returns a new one of the same shape; the input is
never modified, and pixels that no mask, contour, box or label covers keep their exact values.
Class ids are contiguous indices into `class_names`; an index outside it is labelled "class {i}".
"""

from __future__ import annotations

import colorsys
import functools
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from model.structures import InstanceResult, PanopticResult

__all__ = ["ALPHA", "color_for", "draw_instances", "draw_panoptic", "draw_semantic", "png_bytes", "save_png"]

ALPHA = 0.5  # mask opacity
MIN_LABEL_AREA_FRACTION = 0.001  # segments smaller than this share of the image get no label (clutter)
_LABEL_PAD = 2  # pixels between label text and the edge of its background box
_GOLDEN = 0.618033988749895  # hue step: consecutive indices land far apart on the colour wheel

Color = tuple[int, int, int]


def color_for(index: int) -> Color:
    """A bright RGB colour for `index`; the same index always gives the same colour, and nearby indices
    differ strongly in hue (saturation and value alternate too, so far-apart hues repeat less alike)."""
    hue = (0.1 + index * _GOLDEN) % 1.0
    saturation = 0.85 if index % 2 == 0 else 0.6
    value = 0.95 if (index // 2) % 2 == 0 else 0.8
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return round(r * 255), round(g * 255), round(b * 255)


def draw_instances(
    image: np.ndarray,
    instances: InstanceResult,
    class_names: Sequence[str],
    score_threshold: float = 0.5,
    max_instances: int = 100,
) -> np.ndarray:
    """Instances with score >= `score_threshold` (at most `max_instances`, highest scores first), each in
    its own colour (color_for(rank), rank 0 = best score): mask blended at ALPHA, mask contour, box
    outline (clipped to the image) and a "name 87%" label at the box's top-left corner.

    image [H, W, 3] uint8; instances: scores [N], classes [N], boxes [N, 4] xyxy pixels, masks [N, H, W].
    Returns a new [H, W, 3] uint8 image.
    """
    _check_image(image)
    height, width = image.shape[:2]
    scores = _to_numpy(instances.scores).astype(np.float64).reshape(-1)
    masks = _to_numpy(instances.masks).astype(bool)
    if masks.shape[1:] != (height, width):
        raise ValueError(f"instance masks {masks.shape} do not match the image size {(height, width)}")
    ranked = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] >= score_threshold]
    ranked = ranked[:max_instances]
    if not ranked:
        return image.copy()
    classes = _to_numpy(instances.classes).reshape(-1)
    boxes = _to_numpy(instances.boxes).astype(np.float64).reshape(-1, 4)
    colors = [color_for(rank) for rank in range(len(ranked))]
    line = _line_width(height, width)

    canvas = Image.fromarray(_paint_masks(image, masks[ranked], colors, line))
    draw, font = ImageDraw.Draw(canvas), _font(_font_size(height, width))
    corners = [_draw_box(draw, boxes[i], colors[rank], line, (width, height)) for rank, i in enumerate(ranked)]
    # Labels last, lowest score first, so the best instance's label ends up on top.
    for rank in reversed(range(len(ranked))):
        i = ranked[rank]
        text = f"{_class_name(class_names, int(classes[i]))} {scores[i] * 100:.0f}%"
        _draw_label(draw, font, text, corners[rank], colors[rank], (width, height), centred=False)
    return np.asarray(canvas).copy()


def _paint_masks(image: np.ndarray, masks: np.ndarray, colors: list[Color], line: int) -> np.ndarray:
    """`masks` [n, H, W] blended at ALPHA in their colours, each with its inner contour `line` px wide."""
    out = image.astype(np.float32)
    # Largest masks first, so that small objects lying on big ones stay visible.
    for k in np.argsort(-masks.reshape(len(masks), -1).sum(axis=1), kind="stable"):
        _blend(out, masks[k], colors[k])
        out[_edges(masks[k].astype(np.uint8), line) & masks[k]] = colors[k]
    return _to_uint8(out)


def draw_panoptic(image: np.ndarray, panoptic: PanopticResult, class_names: Sequence[str]) -> np.ndarray:
    """Panoptic segments blended at ALPHA with their boundaries drawn: stuff in its class colour, each thing
    segment in its class colour jittered per segment (neighbouring people stay apart, yet look related).
    Segments of at least MIN_LABEL_AREA_FRACTION of the image get their class name at their most interior
    point. Void (id 0) is left untouched.

    image [H, W, 3] uint8; panoptic.segment_map [H, W] ids. Returns a new [H, W, 3] uint8 image.
    """
    _check_image(image)
    height, width = image.shape[:2]
    ids = _to_numpy(panoptic.segment_map).astype(np.int64)
    if ids.shape != (height, width):
        raise ValueError(f"panoptic segment_map {ids.shape} does not match the image size {(height, width)}")
    present = [int(i) for i in np.unique(ids) if i != 0]
    if not present:
        return image.copy()
    segments = {s.id: s for s in panoptic.segments}
    missing = [i for i in present if i not in segments]
    if missing:
        raise ValueError(f"segment ids {missing} appear in segment_map but have no PanopticSegment entry")
    colors = {i: _segment_color(segments[i].category_id, i, segments[i].isthing) for i in present}
    labels = {i: _class_name(class_names, segments[i].category_id) for i in present}
    return _draw_regions(image, ids, colors, labels, boundaries=True)


def draw_semantic(
    image: np.ndarray, labels: np.ndarray, class_names: Sequence[str], ignore_label: int = 255
) -> np.ndarray:
    """A semantic label map blended at ALPHA, one colour per class (color_for(class)); each class is named
    once, on its largest connected region (if that region has at least MIN_LABEL_AREA_FRACTION of the
    image). Pixels equal to `ignore_label` are left untouched.

    image [H, W, 3] uint8; labels [H, W] integer class ids (numpy or torch). Returns a new image.
    """
    _check_image(image)
    height, width = image.shape[:2]
    labels = _to_numpy(labels).astype(np.int64)
    if labels.shape != (height, width):
        raise ValueError(f"semantic labels {labels.shape} do not match the image size {(height, width)}")
    # Region ids must avoid 0 (= untouched); ignore_label pixels become 0.
    classes = [int(c) for c in np.unique(labels) if c != ignore_label]
    if not classes:
        return image.copy()
    ids = np.zeros(labels.shape, dtype=np.int64)
    for region, cls in enumerate(classes, start=1):
        ids[labels == cls] = region
    colors = {r: color_for(c) for r, c in enumerate(classes, start=1)}
    names = {r: _class_name(class_names, c) for r, c in enumerate(classes, start=1)}
    return _draw_regions(image, ids, colors, names, boundaries=False, largest_component=True)


def png_bytes(image: np.ndarray) -> bytes:
    """An [H, W, 3] (or [H, W]) uint8 image encoded as PNG."""
    if image.dtype != np.uint8:
        raise ValueError(f"PNG pictures need uint8 pixels, got {image.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(image: np.ndarray, path: str) -> None:
    """Write an [H, W, 3] (or [H, W]) uint8 image as PNG, creating the parent folder."""
    data = png_bytes(image)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)


# --- regions (panoptic and semantic) ------------------------------------------------------------------


def _draw_regions(
    image: np.ndarray,
    ids: np.ndarray,
    colors: dict[int, Color],
    names: dict[int, str],
    boundaries: bool,
    largest_component: bool = False,
) -> np.ndarray:
    """Blend every region id > 0 of `ids` [H, W] in its colour, optionally outline it, then name it."""
    height, width = ids.shape
    # Colour lookup by position among the present ids: panoptic ids can be large (R + 256 G + 256^2 B).
    present, dense = np.unique(ids, return_inverse=True)
    dense = dense.reshape(ids.shape)
    lut = np.array([colors.get(int(i), (0, 0, 0)) for i in present], dtype=np.float32)
    out = image.astype(np.float32)
    inside = ids > 0
    out[inside] = out[inside] * (1 - ALPHA) + lut[dense[inside]] * ALPHA
    if boundaries:
        edge = _edges(ids, _line_width(height, width)) & inside
        out[edge] = lut[dense[edge]]
    canvas = Image.fromarray(_to_uint8(out))
    draw, font = ImageDraw.Draw(canvas), _font(_font_size(height, width))
    min_area = MIN_LABEL_AREA_FRACTION * height * width
    for region, name in names.items():
        mask = ids == region
        if largest_component:
            mask = _largest_component(mask)
        if mask.sum() >= min_area:
            _draw_label(draw, font, name, _interior_point(mask), colors[region], (width, height), centred=True)
    return np.asarray(canvas).copy()


def _segment_color(category_id: int, segment_id: int, isthing: bool) -> Color:
    base = color_for(category_id)
    return _jitter(base, seed=segment_id) if isthing else base


def _jitter(color: Color, seed: int) -> Color:
    """`color` moved by a fixed-length random step (seeded, so the same segment keeps its colour)."""
    step = np.random.default_rng(seed).uniform(-1.0, 1.0, 3)
    step = step / max(np.linalg.norm(step), 1e-6) * 60.0
    return tuple(int(v) for v in np.clip(np.array(color) + step, 0, 255).round())


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(components.reshape(-1))[1:]
    return components == (int(np.argmax(sizes)) + 1)


def _interior_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the pixel farthest from the mask's edge (the image border counts as edge): unlike the
    centroid it always lies inside, even for rings and crescents."""
    ys, xs = np.nonzero(mask)
    y0, x0 = ys.min(), xs.min()
    crop = np.pad(mask[y0:ys.max() + 1, x0:xs.max() + 1], 1)  # crop for speed; pad so borders are edges
    distance = ndimage.distance_transform_edt(crop)
    # Bands and rectangles have a whole ridge of equally interior pixels; of those take the one nearest
    # the centroid, or the label would sit at the ridge's first pixel (the far left of a band).
    ridge_y, ridge_x = np.nonzero(distance >= distance.max() - 0.5)
    centre_y, centre_x = ys.mean() - y0 + 1, xs.mean() - x0 + 1
    best = int(np.argmin((ridge_y - centre_y) ** 2 + (ridge_x - centre_x) ** 2))
    return float(x0 + ridge_x[best] - 1), float(y0 + ridge_y[best] - 1)


# --- pixels -------------------------------------------------------------------------------------------


def _blend(out: np.ndarray, mask: np.ndarray, color: Color) -> None:
    out[mask] = out[mask] * (1 - ALPHA) + np.asarray(color, dtype=np.float32) * ALPHA


def _edges(ids: np.ndarray, width: int) -> np.ndarray:
    """[H, W] bool: pixels with a different id within `width` steps up/down/left/right. The image border
    is not an edge (edge padding), so masks running off the image get no line along it."""
    height, cols = ids.shape
    padded = np.pad(ids, width, mode="edge")
    edge = np.zeros(ids.shape, dtype=bool)
    for d in range(1, width + 1):
        for dy, dx in ((d, 0), (-d, 0), (0, d), (0, -d)):
            edge |= padded[width + dy:width + dy + height, width + dx:width + dx + cols] != ids
    return edge


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


# --- boxes and labels ---------------------------------------------------------------------------------


def _draw_box(draw: ImageDraw.ImageDraw, box: np.ndarray, color: Color, line: int, size: tuple[int, int]):
    """Outline `box` (xyxy, may reach outside the image) clipped to the image; returns its clipped
    top-left corner, where the label goes."""
    width, height = size
    x0, x1 = sorted(np.clip(box[[0, 2]], 0, width - 1))
    y0, y1 = sorted(np.clip(box[[1, 3]], 0, height - 1))
    x0, y0, x1, y1 = (round(float(v)) for v in (x0, y0, x1, y1))
    draw.rectangle((x0, y0, x1, y1), outline=color, width=line)
    return float(x0), float(y0)


def _draw_label(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    text: str,
    anchor: tuple[float, float],
    color: Color,
    size: tuple[int, int],
    centred: bool,
) -> None:
    """`text` on a filled box of `color`, its top-left (or centre) at `anchor`, moved to fit inside an
    image of `size` (width, height)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    box_w, box_h = right - left + 2 * _LABEL_PAD, bottom - top + 2 * _LABEL_PAD
    x, y = anchor
    if centred:
        x, y = x - box_w / 2, y - box_h / 2
    width, height = size
    x = round(min(max(float(x), 0.0), max(width - box_w, 0)))
    y = round(min(max(float(y), 0.0), max(height - box_h, 0)))
    draw.rectangle((x, y, x + box_w - 1, y + box_h - 1), fill=color)
    draw.text((x + _LABEL_PAD - left, y + _LABEL_PAD - top), text, fill=_text_color(color), font=font)


def _text_color(background: Color) -> Color:
    """Black on light backgrounds, white on dark ones (ITU-R BT.601 luma)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _class_name(class_names: Sequence[str], index: int) -> str:
    return class_names[index] if 0 <= index < len(class_names) else f"class {index}"


def _line_width(height: int, width: int) -> int:
    return max(1, round(max(height, width) / 320))


def _font_size(height: int, width: int) -> int:
    return max(10, round(math.sqrt(height * width) / 40))


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable since Pillow 10.1
    except TypeError:  # older Pillow: fixed-size bitmap font
        return ImageFont.load_default()


# --- inputs -------------------------------------------------------------------------------------------


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"expected an [H, W, 3] uint8 RGB image, got {got}")


def _to_numpy(values) -> np.ndarray:
    """Result tensors (any device) or arrays as numpy."""
    if hasattr(values, "detach"):
        return values.detach().cpu().numpy()
    return np.asarray(values)
