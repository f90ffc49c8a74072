"""The synthetic scenes behind data_prep/synthetic.py: thing and stuff categories, scenes of coloured
shapes on stuff regions (a thing category is a (shape, colour) pair, so a small model can learn it),
and the encodings the raw layouts need (masks as polygons or RLE, JPEG/PNG bytes, JSON files).

All randomness comes from numpy Generators (`seeded_rng`), so a scene is a pure function of its seed."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)

# Void border width (pixels). Real panoptic/ADE masks leave unlabelled pixels; a border
# plus the seams between stuff regions guarantees some exist in every image.
_BORDER = 2
# Minimum gap between thing boxes, so instance masks never touch or overlap and a
# thing's polygon is exactly its visible mask.
_GAP = 3


# --------------------------------------------------------------------------- categories


@dataclass(frozen=True)
class _Thing:
    cat_id: int
    name: str
    shape: str  # rectangle | ellipse | triangle | pair
    colour: RGB
    ade_idx: int = 0


@dataclass(frozen=True)
class _Stuff:
    cat_id: int  # COCO panoptic id (>= 92)
    name: str  # COCO panoptic name
    supercategory: str
    ade_idx: int
    ade_name: str
    colour: RGB
    zone: str  # top | bottom: where the layout may place it


# COCO-like gapped ids (the real COCO thing ids skip 12, 26, 29, ...).
COCO_THINGS: tuple[_Thing, ...] = (
    _Thing(1, "red rectangle", "rectangle", (220, 30, 30), 13),
    _Thing(2, "yellow ellipse", "ellipse", (245, 220, 40), 16),
    _Thing(3, "blue triangle", "triangle", (30, 50, 230), 20),
    _Thing(5, "magenta ellipse", "ellipse", (220, 40, 200), 21),
    _Thing(7, "orange triangle", "triangle", (250, 140, 20), 24),
    _Thing(8, "cyan rectangle", "rectangle", (30, 225, 225), 32),
    _Thing(11, "white triangle", "triangle", (250, 250, 250), 37),
    _Thing(13, "purple pair", "pair", (120, 40, 160), 43),
)

STUFF: tuple[_Stuff, ...] = (
    _Stuff(149, "road", "ground", 7, "road, route", (95, 95, 100), "bottom"),
    _Stuff(154, "sand", "ground", 47, "sand", (215, 195, 140), "bottom"),
    _Stuff(155, "sea", "water", 27, "sea", (40, 95, 150), "bottom"),
    _Stuff(187, "sky-other-merged", "sky", 3, "sky", (135, 190, 235), "top"),
    _Stuff(193, "grass-merged", "plant", 10, "grass", (70, 140, 60), "bottom"),
    _Stuff(199, "wall-other-merged", "wall", 1, "wall", (196, 184, 160), "top"),
)

# Objects365 v1 and v2 share one contiguous category set (ids 1..12).
O365_THINGS: tuple[_Thing, ...] = (
    _Thing(1, "red rectangle", "rectangle", (220, 30, 30)),
    _Thing(2, "yellow ellipse", "ellipse", (245, 220, 40)),
    _Thing(3, "blue triangle", "triangle", (30, 50, 230)),
    _Thing(4, "magenta ellipse", "ellipse", (220, 40, 200)),
    _Thing(5, "orange triangle", "triangle", (250, 140, 20)),
    _Thing(6, "cyan rectangle", "rectangle", (30, 225, 225)),
    _Thing(7, "white triangle", "triangle", (250, 250, 250)),
    _Thing(8, "black rectangle", "rectangle", (20, 20, 20)),
    _Thing(9, "lime ellipse", "ellipse", (160, 245, 60)),
    _Thing(10, "pink triangle", "triangle", (250, 150, 185)),
    _Thing(11, "brown rectangle", "rectangle", (130, 80, 30)),
    _Thing(12, "white ellipse", "ellipse", (250, 250, 250)),
)

_VOID_COLOUR: RGB = (35, 35, 35)

# ----------------------------------------------------------------------------- scenes


@dataclass(eq=False)
class _Instance:
    thing: _Thing
    parts: list[list[float]]  # polygons exactly as stored in JSON
    mask: np.ndarray  # bool HxW, rasterised by pycocotools from `parts`
    kind: str  # polygon | rle | crowd


@dataclass(eq=False)
class Scene:
    image: np.ndarray  # uint8 HxWx3
    stuff: np.ndarray  # int16 HxW: index into STUFF, -1 = void (before things are painted)
    instances: list[_Instance] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[1], self.image.shape[0]


@dataclass(frozen=True)
class SceneOptions:
    things: tuple[_Thing, ...]
    crowd_prob: float = 0.0
    rle_prob: float = 0.0
    max_things: int = 5
    force: frozenset[str] = frozenset()  # subset of {"crowd", "pair", "rle"}


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _stuff_layout(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Top/bottom stuff split at a horizon, optionally a vertical band; seams and border void."""
    tops = [i for i, s in enumerate(STUFF) if s.zone == "top"]
    bottoms = [i for i, s in enumerate(STUFF) if s.zone == "bottom"]
    stuff = np.full((h, w), -1, dtype=np.int16)
    horizon = int(rng.integers(int(0.3 * h), int(0.6 * h) + 1))
    bottom = int(rng.choice(bottoms))
    stuff[:horizon] = int(rng.choice(tops))
    stuff[horizon:] = bottom
    stuff[horizon - 1 : horizon + 1] = -1  # seam between regions is unlabelled, as in real masks
    if rng.random() < 0.5:
        band = int(rng.choice([b for b in bottoms if b != bottom]))
        bw = int(rng.integers(int(0.2 * w), int(0.4 * w) + 1))
        x0 = int(rng.integers(0, w - bw + 1))
        stuff[horizon + 1 :, x0 : x0 + bw] = band
        stuff[horizon + 1 :, max(x0 - 1, 0) : x0 + 1] = -1
        stuff[horizon + 1 :, x0 + bw - 1 : x0 + bw + 1] = -1
    stuff[:_BORDER] = stuff[-_BORDER:] = -1
    stuff[:, :_BORDER] = stuff[:, -_BORDER:] = -1
    return stuff


def _paint_background(rng: np.random.Generator, stuff: np.ndarray) -> np.ndarray:
    """Stuff colour plus a vertical gradient and noise, so regions are textured but separable."""
    h, w = stuff.shape
    palette = np.array([s.colour for s in STUFF] + [_VOID_COLOUR], dtype=np.float32)
    img = palette[stuff]  # index -1 picks the void colour (last row)
    img += np.linspace(-12.0, 12.0, h, dtype=np.float32)[:, None, None]
    img += rng.normal(0.0, 6.0, size=img.shape).astype(np.float32)
    return img


def _polygon(shape: str, rng: np.random.Generator, x: int, y: int, w: int, h: int) -> list[list[float]]:
    """Polygon parts of one shape filling the box (x, y, w, h), as floats the way COCO stores them."""
    return [[round(float(v), 1) for v in part] for part in _vertices(shape, rng, x, y, w, h)]


def _vertices(shape: str, rng: np.random.Generator, x: int, y: int, w: int, h: int) -> list[list[float]]:
    if shape == "rectangle":
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]
    if shape == "ellipse":
        t = np.linspace(0.0, 2.0 * np.pi, 24, endpoint=False)
        xs = x + w / 2.0 + (w / 2.0) * np.cos(t)
        ys = y + h / 2.0 + (h / 2.0) * np.sin(t)
        return [[v for xy in zip(xs, ys) for v in xy]]
    if shape == "triangle":
        apex = x + float(rng.uniform(0.2, 0.8)) * w
        if rng.random() < 0.5:  # apex up or down, for variety
            return [[apex, y, x + w, y + h, x, y + h]]
        return [[x, y, x + w, y, apex, y + h]]
    if shape == "pair":  # two equal squares along the longer side, a gap between them
        a = min(w, h)
        dx, dy = (w - a, 0) if w >= h else (0, h - a)
        return [_square(x, y, a), _square(x + dx, y + dy, a)]
    raise ValueError(f"unknown shape {shape!r}")


def _square(x: float, y: float, a: float) -> list[float]:
    return [x, y, x + a, y, x + a, y + a, x, y + a]


def _box_size(rng: np.random.Generator, thing: _Thing, kind: str, side: int, scale: float) -> tuple[int, int]:
    """Width/height of an instance's box; crowds are bigger since they hold many small shapes."""
    if kind == "crowd":
        lo, hi = max(20.0, 0.25 * side * scale), max(24.0, 0.4 * side * scale)
        return int(rng.uniform(lo, hi)), int(rng.uniform(lo, hi))
    lo, hi = max(12.0, 0.08 * side * scale), max(14.0, 0.28 * side * scale)
    if thing.shape == "pair":
        a = max(8, int(rng.uniform(lo * 0.6, hi * 0.5)))
        length = 2 * a + int(rng.integers(_GAP, max(_GAP, a // 2) + 1))
        return (length, a) if rng.random() < 0.5 else (a, length)
    s = rng.uniform(lo, hi)
    return max(10, int(s * rng.uniform(0.7, 1.3))), max(10, int(s * rng.uniform(0.7, 1.3)))


def _crowd_parts(rng: np.random.Generator, thing: _Thing, x: int, y: int, w: int, h: int) -> list[list[float]]:
    """Many small, possibly overlapping copies of the category's shape inside one box."""
    parts: list[list[float]] = []
    shape = "ellipse" if thing.shape == "pair" else thing.shape
    for _ in range(int(rng.integers(5, 10))):
        pw, ph = int(rng.integers(8, min(17, w) + 1)), int(rng.integers(8, min(17, h) + 1))
        px, py = int(rng.integers(x, x + w - pw + 1)), int(rng.integers(y, y + h - ph + 1))
        parts.extend(_polygon(shape, rng, px, py, pw, ph))
    return parts


def _rasterise(parts: list[list[float]], w: int, h: int) -> np.ndarray:
    """Mask exactly as pycocotools decodes the stored polygons, so JSON and pixels agree."""
    rle = mask_utils.merge(mask_utils.frPyObjects(parts, h, w))
    return mask_utils.decode(rle).astype(bool)


def _overlaps(box: Box, placed: list[Box]) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + _GAP and b[0] < x1 + _GAP and y0 < b[3] + _GAP and b[1] < y1 + _GAP for b in placed)


def _place(
    rng: np.random.Generator, thing: _Thing, kind: str, w: int, h: int, placed: list[Box], forced: bool
) -> _Instance | None:
    """Rejection-sample a non-overlapping box; forced items shrink until they fit."""
    side, margin = min(w, h), _BORDER + _GAP
    attempts = 200 if forced else 30
    for attempt in range(attempts):
        scale = 0.8 ** (attempt // 20)
        bw, bh = _box_size(rng, thing, kind, side, scale)
        if bw > w - 2 * margin or bh > h - 2 * margin:
            continue
        x = int(rng.integers(margin, w - margin - bw + 1))
        y = int(rng.integers(margin, h - margin - bh + 1))
        box = (x, y, x + bw, y + bh)
        if _overlaps(box, placed):
            continue
        if kind == "crowd":
            parts = _crowd_parts(rng, thing, x, y, bw, bh)
        else:
            parts = _polygon(thing.shape, rng, x, y, bw, bh)
        mask = _rasterise(parts, w, h)
        if not mask.any():
            continue
        placed.append(box)
        return _Instance(thing, parts, mask, kind)
    if forced:
        raise RuntimeError(f"could not place forced {kind} {thing.name!r} in a {w}x{h} image")
    return None


def _plan(rng: np.random.Generator, opts: SceneOptions) -> list[tuple[_Thing, str, bool]]:
    """(category, kind, forced) list; forced items first so they get the empty canvas."""
    singles = [t for t in opts.things if t.shape != "pair"]
    pairs = [t for t in opts.things if t.shape == "pair"]
    plan: list[tuple[_Thing, str, bool]] = []
    if "crowd" in opts.force or rng.random() < opts.crowd_prob:
        plan.append((singles[int(rng.integers(len(singles)))], "crowd", "crowd" in opts.force))
    if "pair" in opts.force and pairs:
        plan.append((pairs[int(rng.integers(len(pairs)))], "polygon", True))
    if "rle" in opts.force:
        plan.append((singles[int(rng.integers(len(singles)))], "rle", True))
    for _ in range(int(rng.integers(1, opts.max_things + 1))):
        thing = opts.things[int(rng.integers(len(opts.things)))]
        plan.append((thing, "rle" if rng.random() < opts.rle_prob else "polygon", False))
    return plan


def make_scene(rng: np.random.Generator, min_size: int, max_size: int, opts: SceneOptions) -> Scene:
    """One scene whose sides are drawn independently in [min_size, max_size]."""
    w = int(rng.integers(min_size, max_size + 1))
    h = int(rng.integers(min_size, max_size + 1))
    stuff = _stuff_layout(rng, w, h)
    img = _paint_background(rng, stuff)
    placed: list[Box] = []
    instances: list[_Instance] = []
    for thing, kind, forced in _plan(rng, opts):
        inst = _place(rng, thing, kind, w, h, placed, forced)
        if inst is not None:
            instances.append(inst)
    for inst in instances:
        n = int(inst.mask.sum())
        img[inst.mask] = np.array(inst.thing.colour, np.float32) + rng.normal(0.0, 5.0, (n, 3)).astype(np.float32)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Scene(image, stuff, instances)


def coco_scene_options(index: int) -> SceneOptions:
    """Cycle forced features so every split with >= 3 images holds every annotation kind."""
    force = {0: {"crowd"}, 1: {"pair"}, 2: {"rle"}, 3: set()}[index % 4]
    return SceneOptions(COCO_THINGS, crowd_prob=0.15, rle_prob=0.15, force=frozenset(force))


# --------------------------------------------------------------------------- encoding


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight [x, y, w, h] of a mask, the same as pycocotools toBbox."""
    ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE: column-major run lengths, starting with a (possibly 0) run of 0s."""
    flat = mask.ravel(order="F").astype(np.uint8)
    bounds = np.concatenate(([0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "size": [int(s) for s in rle["size"]]}


def segmentation(inst: _Instance) -> Any:
    if inst.kind == "crowd":
        return _uncompressed_rle(inst.mask)
    if inst.kind == "rle":
        return _compressed_rle(inst.mask)
    return inst.parts


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False)
    return buf.getvalue()


def encode_png(array: np.ndarray) -> bytes:
    """uint8 HxWx3 becomes an RGB PNG, uint8 HxW an "L" PNG (Pillow infers the mode)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)


def write_json(path: Path, obj: Any) -> None:
    write(path, json.dumps(obj, sort_keys=False))
