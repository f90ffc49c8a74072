"""Deterministic synthetic datasets in the raw on-disk layouts of COCO, ADE20K and Objects365.

Everything downstream of data preparation (sharding, training, evaluation) expects the
real datasets' files. This module writes small stand-ins in exactly those layouts so the
whole pipeline runs offline and in tests:

* COCO 2017 instances (polygons, multi-part polygons, compressed RLE, crowd regions as
  uncompressed RLE) and COCO panoptic (RGB-encoded segment PNGs), sharing one image set;
* ADE20K SceneParsing (``ADEChallengeData2016``) with ``objectInfo150.txt``/``.csv``;
* Objects365 v1 and v2, including the v2 quirks (``images/vK/`` prefixes that are not on
  disk, shuffled categories, ``isfake``/``isreflected`` keys, missing images, duplicate rows).

Scenes are simple shapes on a background of "stuff" regions. A thing category is a
(shape, colour) pair, so a small detector/segmenter can actually learn it. Output is
byte-identical for the same :class:`SyntheticSpec`: all randomness comes from numpy
Generators seeded from ``(seed, stream, split, image)``, JSON keys are written in a
fixed order, and images are encoded with fixed options.

This module imports nothing else of the project (the data_prep layer is standalone).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

FORMATS: tuple[str, ...] = ("coco_instances", "coco_panoptic", "ade20k", "objects365_v1", "objects365_v2")
SPLITS: tuple[str, ...] = ("train", "val")

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)

# Void border width (pixels). Real panoptic/ADE masks leave unlabelled pixels; a border
# plus the seams between stuff regions guarantees some exist in every image.
_BORDER = 2
# Minimum gap between thing boxes, so instance masks never touch or overlap and a
# thing's polygon is exactly its visible mask.
_GAP = 3
# Per-(seed, stream) RNG streams keep formats independent: dropping a format from
# spec.formats does not change the bytes of the others.
_STREAM_COCO, _STREAM_ADE, _STREAM_O365_V1, _STREAM_O365_V2 = 1, 2, 3, 4


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. Image sides are drawn independently in [min_size, max_size]."""

    train_images: int = 24
    val_images: int = 8
    min_size: int = 160
    max_size: int = 320
    seed: int = 0
    formats: tuple[str, ...] = FORMATS
    jpeg_quality: int = 90
    # Objects365 category list length: the 12 drawn classes, then ids 13..N that no box uses (real
    # Objects365 lists 365, and a model pretrained on it has 365 class logits).
    o365_categories: int = 12

    def __post_init__(self) -> None:
        if self.o365_categories < 12:
            raise ValueError(f"o365_categories={self.o365_categories}: the synthetic Objects365 draws 12 classes, "
                             "so it lists at least 12")


@dataclass(frozen=True)
class SyntheticSummary:
    """What was written: JPEG images (shared COCO images counted once) and annotation rows."""

    root: str
    images_written: int
    annotations_written: int
    formats: tuple[str, ...]


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
_COCO_THINGS: tuple[_Thing, ...] = (
    _Thing(1, "red rectangle", "rectangle", (220, 30, 30), 13),
    _Thing(2, "yellow ellipse", "ellipse", (245, 220, 40), 16),
    _Thing(3, "blue triangle", "triangle", (30, 50, 230), 20),
    _Thing(5, "magenta ellipse", "ellipse", (220, 40, 200), 21),
    _Thing(7, "orange triangle", "triangle", (250, 140, 20), 24),
    _Thing(8, "cyan rectangle", "rectangle", (30, 225, 225), 32),
    _Thing(11, "white triangle", "triangle", (250, 250, 250), 37),
    _Thing(13, "purple pair", "pair", (120, 40, 160), 43),
)

_STUFF: tuple[_Stuff, ...] = (
    _Stuff(149, "road", "ground", 7, "road, route", (95, 95, 100), "bottom"),
    _Stuff(154, "sand", "ground", 47, "sand", (215, 195, 140), "bottom"),
    _Stuff(155, "sea", "water", 27, "sea", (40, 95, 150), "bottom"),
    _Stuff(187, "sky-other-merged", "sky", 3, "sky", (135, 190, 235), "top"),
    _Stuff(193, "grass-merged", "plant", 10, "grass", (70, 140, 60), "bottom"),
    _Stuff(199, "wall-other-merged", "wall", 1, "wall", (196, 184, 160), "top"),
)

# Objects365 v1 and v2 share one contiguous category set (ids 1..12).
_O365_THINGS: tuple[_Thing, ...] = (
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
class _Scene:
    image: np.ndarray  # uint8 HxWx3
    stuff: np.ndarray  # int16 HxW: index into _STUFF, -1 = void (before things are painted)
    instances: list[_Instance] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[1], self.image.shape[0]


@dataclass(frozen=True)
class _SceneOptions:
    things: tuple[_Thing, ...]
    crowd_prob: float = 0.0
    rle_prob: float = 0.0
    max_things: int = 5
    force: frozenset[str] = frozenset()  # subset of {"crowd", "pair", "rle"}


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _stuff_layout(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Top/bottom stuff split at a horizon, optionally a vertical band; seams and border void."""
    tops = [i for i, s in enumerate(_STUFF) if s.zone == "top"]
    bottoms = [i for i, s in enumerate(_STUFF) if s.zone == "bottom"]
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
    palette = np.array([s.colour for s in _STUFF] + [_VOID_COLOUR], dtype=np.float32)
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


def _plan(rng: np.random.Generator, opts: _SceneOptions) -> list[tuple[_Thing, str, bool]]:
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


def _make_scene(rng: np.random.Generator, spec: SyntheticSpec, opts: _SceneOptions) -> _Scene:
    w = int(rng.integers(spec.min_size, spec.max_size + 1))
    h = int(rng.integers(spec.min_size, spec.max_size + 1))
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
    return _Scene(image, stuff, instances)


def _coco_scene_options(index: int) -> _SceneOptions:
    """Cycle forced features so every split with >= 3 images holds every annotation kind."""
    force = {0: {"crowd"}, 1: {"pair"}, 2: {"rle"}, 3: set()}[index % 4]
    return _SceneOptions(_COCO_THINGS, crowd_prob=0.15, rle_prob=0.15, force=frozenset(force))


# --------------------------------------------------------------------------- encoding


def _mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
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


def _segmentation(inst: _Instance) -> Any:
    if inst.kind == "crowd":
        return _uncompressed_rle(inst.mask)
    if inst.kind == "rle":
        return _compressed_rle(inst.mask)
    return inst.parts


def _encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False)
    return buf.getvalue()


def _encode_png(array: np.ndarray) -> bytes:
    """uint8 HxWx3 becomes an RGB PNG, uint8 HxW an "L" PNG (Pillow infers the mode)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)


def _write_json(path: Path, obj: Any) -> None:
    _write(path, json.dumps(obj, sort_keys=False))


def _image_entry(image_id: int, file_name: str, size: tuple[int, int]) -> dict[str, Any]:
    return {"id": image_id, "file_name": file_name, "width": size[0], "height": size[1], "license": 1}


_INFO = {
    "description": "Synthetic shapes dataset (maskdino-pipeline data_prep.synthetic)",
    "url": "",
    "version": "1.0",
    "year": 2017,
    "contributor": "data_prep.synthetic",
    "date_created": "2017/09/01",
}
_LICENSES = [{"id": 1, "name": "CC0 1.0 (synthetic)", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}]


# ------------------------------------------------------------------------------- COCO


@dataclass
class _Counter:
    """Running totals reported in the summary and through the progress callback."""

    progress: Callable[[int], None] | None
    images: int = 0
    annotations: int = 0

    def image_written(self) -> None:
        self.images += 1
        if self.progress is not None:
            self.progress(1)


def _split_sizes(spec: SyntheticSpec) -> dict[str, int]:
    return {"train": spec.train_images, "val": spec.val_images}


def _image_ids(spec: SyntheticSpec) -> dict[str, range]:
    """Train ids 1..N, val ids continue after, so ids are unique across splits."""
    n_train, n_val = spec.train_images, spec.val_images
    return {"train": range(1, n_train + 1), "val": range(n_train + 1, n_train + n_val + 1)}


def _instance_annotations(scene: _Scene, image_id: int, next_id: int) -> list[dict[str, Any]]:
    anns = []
    for k, inst in enumerate(scene.instances):
        x, y, w, h = _mask_bbox(inst.mask)
        anns.append(
            {
                "id": next_id + k,
                "image_id": image_id,
                "category_id": inst.thing.cat_id,
                "segmentation": _segmentation(inst),
                "area": float(inst.mask.sum()),
                "bbox": [float(x), float(y), float(w), float(h)],
                "iscrowd": int(inst.kind == "crowd"),
            }
        )
    return anns


def _unique_segment_ids(rng: np.random.Generator, n: int) -> list[int]:
    """Random ids in [1, 2**24-1] so the G and B channels of the PNG are exercised too."""
    ids: list[int] = []
    while len(ids) < n:
        candidate = int(rng.integers(1, 2**24))
        if candidate not in ids:
            ids.append(candidate)
    return ids


def _panoptic(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """RGB id PNG and segments_info: one segment per thing, one per visible stuff class."""
    w, h = scene.size
    things = np.zeros((h, w), dtype=bool)
    regions: list[tuple[np.ndarray, int, int]] = []  # mask, category id, iscrowd
    for inst in scene.instances:
        regions.append((inst.mask, inst.thing.cat_id, int(inst.kind == "crowd")))
        things |= inst.mask
    for k, stuff in enumerate(_STUFF):
        region = (scene.stuff == k) & ~things
        if region.any():
            regions.append((region, stuff.cat_id, 0))
    ids = np.zeros((h, w), dtype=np.uint32)
    segments = []
    for (mask, cat_id, crowd), seg_id in zip(regions, _unique_segment_ids(rng, len(regions))):
        ids[mask] = seg_id
        x, y, bw, bh = _mask_bbox(mask)
        segments.append(
            {"id": seg_id, "category_id": cat_id, "iscrowd": crowd, "bbox": [x, y, bw, bh], "area": int(mask.sum())}
        )
    rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)
    return rgb, segments


def _coco_categories(panoptic: bool) -> list[dict[str, Any]]:
    cats: list[dict[str, Any]] = []
    for t in _COCO_THINGS:
        cat: dict[str, Any] = {"id": t.cat_id, "name": t.name, "supercategory": t.shape}
        if panoptic:
            cat.update(isthing=1, color=list(t.colour))
        cats.append(cat)
    if panoptic:
        for s in _STUFF:
            cat = {"id": s.cat_id, "name": s.name, "supercategory": s.supercategory, "isthing": 0}
            cats.append({**cat, "color": list(s.colour)})
    return sorted(cats, key=lambda c: c["id"])


def _coco_doc(images: list[Any], annotations: list[Any], categories: list[Any]) -> dict[str, Any]:
    doc = {"info": _INFO, "licenses": _LICENSES, "images": images}
    return {**doc, "annotations": annotations, "categories": categories}


def _write_coco(root: Path, spec: SyntheticSpec, counter: _Counter) -> None:
    """COCO 2017: shared images, instances JSON and/or panoptic JSON + PNGs per split."""
    want_inst, want_pan = "coco_instances" in spec.formats, "coco_panoptic" in spec.formats
    base = root / "coco"
    for split_idx, split in enumerate(SPLITS):
        images, anns, pan_anns = [], [], []
        for i, image_id in enumerate(_image_ids(spec)[split]):
            rng = _rng(spec.seed, _STREAM_COCO, split_idx, i + 1)
            scene = _make_scene(rng, spec, _coco_scene_options(i))
            name = f"{image_id:012d}"
            _write(base / f"{split}2017" / f"{name}.jpg", _encode_jpeg(scene.image, spec.jpeg_quality))
            counter.image_written()
            images.append(_image_entry(image_id, f"{name}.jpg", scene.size))
            anns.extend(_instance_annotations(scene, image_id, len(anns) + 1))
            png, segments = _panoptic(scene, rng)
            if want_pan:
                _write(base / "annotations" / f"panoptic_{split}2017" / f"{name}.png", _encode_png(png))
            pan_anns.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": segments})
        if want_inst:
            doc = _coco_doc(images, anns, _coco_categories(False))
            _write_json(base / "annotations" / f"instances_{split}2017.json", doc)
            counter.annotations += len(anns)
        if want_pan:
            doc = _coco_doc(images, pan_anns, _coco_categories(True))
            _write_json(base / "annotations" / f"panoptic_{split}2017.json", doc)
            counter.annotations += sum(len(a["segments_info"]) for a in pan_anns)


# ----------------------------------------------------------------------------- ADE20K


def _ade_label(scene: _Scene) -> np.ndarray:
    """uint8 label map: 0 = unlabelled (border, seams), stuff and thing classes in 1..150."""
    lut = np.array([s.ade_idx for s in _STUFF] + [0], dtype=np.uint8)
    label = lut[scene.stuff]  # -1 (void) picks the trailing 0
    for inst in scene.instances:
        label[inst.mask] = inst.thing.ade_idx
    return label


def _ade_class_names() -> dict[int, tuple[str, int]]:
    """ADE index -> (name, stuff flag) for the classes our scenes use."""
    names = {s.ade_idx: (s.ade_name, 1) for s in _STUFF}
    names.update({t.ade_idx: (t.name, 0) for t in _COCO_THINGS})
    return names


def _write_object_info(base: Path, pixels: np.ndarray, total_pixels: int, presence: dict[str, np.ndarray]) -> None:
    """objectInfo150.txt/.csv as in the real release, with statistics of the generated data."""
    names = _ade_class_names()
    txt = ["Idx\tRatio\tTrain\tVal\tName"]
    csv = ["Idx,Ratio,Train,Val,Stuff,Name"]
    for idx in range(1, 151):
        name, stuff = names.get(idx, (f"synthetic class {idx}", 0))
        ratio = pixels[idx] / total_pixels if total_pixels else 0.0
        train, val = int(presence["train"][idx]), int(presence["val"][idx])
        txt.append(f"{idx}\t{ratio:.4f}\t{train}\t{val}\t{name}")
        csv.append(f"{idx},{ratio:.4f},{train},{val},{stuff},{name.replace(', ', ';')}")
    _write(base / "objectInfo150.txt", "\n".join(txt) + "\n")
    _write(base / "objectInfo150.csv", "\n".join(csv) + "\n")


def _write_ade(root: Path, spec: SyntheticSpec, counter: _Counter) -> None:
    base = root / "ADEChallengeData2016"
    opts = _SceneOptions(_COCO_THINGS, max_things=6)
    pixels, total = np.zeros(256, dtype=np.int64), 0  # ratio is over training pixels
    presence = {split: np.zeros(256, dtype=np.int64) for split in SPLITS}
    for split_idx, (split, folder) in enumerate(zip(SPLITS, ("training", "validation"))):
        for i in range(_split_sizes(spec)[split]):
            scene = _make_scene(_rng(spec.seed, _STREAM_ADE, split_idx, i + 1), spec, opts)
            label = _ade_label(scene)
            name = f"ADE_{split}_{i + 1:08d}"
            _write(base / "images" / folder / f"{name}.jpg", _encode_jpeg(scene.image, spec.jpeg_quality))
            _write(base / "annotations" / folder / f"{name}.png", _encode_png(label))
            counter.image_written()
            counts = np.bincount(label.ravel(), minlength=256)
            presence[split] += counts > 0
            if split == "train":
                pixels += counts
                total += label.size
    _write_object_info(base, pixels, total, presence)


# ------------------------------------------------------------------------- Objects365


def _box_annotations(
    scene: _Scene, image_id: int, next_id: int, rng: np.random.Generator | None
) -> list[dict[str, Any]]:
    """Box-only rows; with an rng, adds the v2 isfake/isreflected flags."""
    anns = []
    for k, inst in enumerate(scene.instances):
        x, y, w, h = _mask_bbox(inst.mask)
        ann: dict[str, Any] = {
            "id": next_id + k,
            "image_id": image_id,
            "category_id": inst.thing.cat_id,
            "bbox": [float(x), float(y), float(w), float(h)],
            "area": float(w * h),  # Objects365 reports box area, not mask area
            "iscrowd": 0,
        }
        if rng is not None:
            ann["isfake"] = int(rng.random() < 0.05)
            ann["isreflected"] = int(rng.random() < 0.05)
        anns.append(ann)
    return anns


def _o365_categories(count: int) -> list[dict[str, Any]]:
    drawn = [{"id": t.cat_id, "name": t.name} for t in _O365_THINGS]
    return drawn + [{"id": k, "name": f"unused class {k}"} for k in range(len(drawn) + 1, count + 1)]


def _write_o365_v1(root: Path, spec: SyntheticSpec, counter: _Counter) -> None:
    base = root / "objects365_v1"
    opts = _SceneOptions(_O365_THINGS, max_things=6)
    for split_idx, split in enumerate(SPLITS):
        images, anns = [], []
        for i, image_id in enumerate(_image_ids(spec)[split]):
            scene = _make_scene(_rng(spec.seed, _STREAM_O365_V1, split_idx, i + 1), spec, opts)
            name = f"obj365_{split}_{image_id:012d}.jpg"
            _write(base / split / name, _encode_jpeg(scene.image, spec.jpeg_quality))
            counter.image_written()
            images.append({"id": image_id, "file_name": name, "width": scene.size[0], "height": scene.size[1]})
            anns.extend(_box_annotations(scene, image_id, len(anns) + 1, None))
        doc = {"images": images, "annotations": anns, "categories": _o365_categories(spec.o365_categories)}
        _write_json(base / "annotations" / f"objects365_{split}.json", doc)
        counter.annotations += len(anns)


def _v2_name(i: int, image_id: int) -> tuple[int, int, str]:
    """(patch, version, file name): patches 0-1 hold v1 images, patch 2 holds v2 images."""
    patch = i % 3
    version = 1 if patch < 2 else 2
    return patch, version, f"objects365_v{version}_{image_id:08d}.jpg"


def _quirk_count(n_items: int, n_images: int, per: int) -> int:
    """How many rows get a quirk: about 1 in `per`, at least one once a split has 8 images."""
    return min(n_items, max(int(n_images >= 8), round(n_items / per)))


def _with_duplicates(rng: np.random.Generator, anns: list[dict[str, Any]], n_images: int) -> list[dict[str, Any]]:
    """Real zhiyuan_objv2 files repeat some rows verbatim (same id); readers must cope."""
    dup = set(rng.choice(len(anns), _quirk_count(len(anns), n_images, 50), replace=False).tolist()) if anns else set()
    out = []
    for k, ann in enumerate(anns):
        out.append(ann)
        if k in dup:
            out.append(dict(ann))
    return out


def _shuffled_categories(rng: np.random.Generator, count: int) -> list[dict[str, Any]]:
    cats = _o365_categories(count)
    order = rng.permutation(len(cats)).tolist()
    if order == sorted(order):  # guarantee the quirk: never sorted by id
        order.reverse()
    return [cats[k] for k in order]


def _write_o365_v2(root: Path, spec: SyntheticSpec, counter: _Counter) -> None:
    base = root / "objects365_v2"
    opts = _SceneOptions(_O365_THINGS, max_things=6)
    # one order for both splits
    categories = _shuffled_categories(_rng(spec.seed, _STREAM_O365_V2, len(SPLITS), 0), spec.o365_categories)
    for split_idx, split in enumerate(SPLITS):
        split_rng = _rng(spec.seed, _STREAM_O365_V2, split_idx, 0)
        n = _split_sizes(spec)[split]
        missing = set(split_rng.choice(n, _quirk_count(n, n, 20), replace=False).tolist()) if n else set()
        images, anns = [], []
        for i, image_id in enumerate(_image_ids(spec)[split]):
            rng = _rng(spec.seed, _STREAM_O365_V2, split_idx, i + 1)
            scene = _make_scene(rng, spec, opts)
            patch, version, name = _v2_name(i, image_id)
            if i not in missing:  # listed in the JSON but absent on disk, as in the real release
                _write(base / split / f"patch{patch}" / name, _encode_jpeg(scene.image, spec.jpeg_quality))
                counter.image_written()
            images.append(
                {
                    "height": scene.size[1],
                    "id": image_id,
                    "license": 1,
                    "width": scene.size[0],
                    "file_name": f"images/v{version}/patch{patch}/{name}",
                    "url": "",
                }
            )
            anns.extend(_box_annotations(scene, image_id, len(anns) + 1, rng))
        anns = _with_duplicates(split_rng, anns, n)
        doc = {"images": images, "annotations": anns, "categories": categories, "licenses": _LICENSES}
        _write_json(base / "annotations" / f"zhiyuan_objv2_{split}.json", doc)
        counter.annotations += len(anns)


# ------------------------------------------------------------------------------ entry


def _validate(spec: SyntheticSpec) -> None:
    unknown = [f for f in spec.formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown formats {unknown}; expected a subset of {FORMATS}")
    if spec.train_images < 0 or spec.val_images < 0:
        raise ValueError("image counts must be >= 0")
    if not 96 <= spec.min_size <= spec.max_size:
        raise ValueError("need 96 <= min_size <= max_size (smaller images cannot hold the forced shapes)")
    if spec.seed < 0:
        raise ValueError("seed must be >= 0")
    if not 1 <= spec.jpeg_quality <= 100:
        raise ValueError("jpeg_quality must be in 1..100")


def make_synthetic(
    root: str | os.PathLike[str], spec: SyntheticSpec, progress: Callable[[int], None] | None = None
) -> SyntheticSummary:
    """Write the requested formats under `root`; `progress(n)` gets each batch of images written."""
    _validate(spec)
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    counter = _Counter(progress)
    if "coco_instances" in spec.formats or "coco_panoptic" in spec.formats:
        _write_coco(out, spec, counter)
    if "ade20k" in spec.formats:
        _write_ade(out, spec, counter)
    if "objects365_v1" in spec.formats:
        _write_o365_v1(out, spec, counter)
    if "objects365_v2" in spec.formats:
        _write_o365_v2(out, spec, counter)
    formats = tuple(f for f in FORMATS if f in spec.formats)
    return SyntheticSummary(str(out), counter.images, counter.annotations, formats)


__all__ = ("FORMATS", "SyntheticSpec", "SyntheticSummary", "make_synthetic")
