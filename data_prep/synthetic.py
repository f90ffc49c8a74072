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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from data_prep.synthetic_scenes import (
    COCO_THINGS,
    O365_THINGS,
    STUFF,
    Scene,
    SceneOptions,
    coco_scene_options,
    encode_jpeg,
    encode_png,
    make_scene,
    mask_bbox,
    seeded_rng,
    segmentation,
    write,
    write_json,
)

FORMATS: tuple[str, ...] = ("coco_instances", "coco_panoptic", "ade20k", "objects365_v1", "objects365_v2")

SPLITS: tuple[str, ...] = ("train", "val")

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


def _instance_annotations(scene: Scene, image_id: int, next_id: int) -> list[dict[str, Any]]:
    anns = []
    for k, inst in enumerate(scene.instances):
        x, y, w, h = mask_bbox(inst.mask)
        anns.append(
            {
                "id": next_id + k,
                "image_id": image_id,
                "category_id": inst.thing.cat_id,
                "segmentation": segmentation(inst),
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


def _panoptic(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """RGB id PNG and segments_info: one segment per thing, one per visible stuff class."""
    w, h = scene.size
    things = np.zeros((h, w), dtype=bool)
    regions: list[tuple[np.ndarray, int, int]] = []  # mask, category id, iscrowd
    for inst in scene.instances:
        regions.append((inst.mask, inst.thing.cat_id, int(inst.kind == "crowd")))
        things |= inst.mask
    for k, stuff in enumerate(STUFF):
        region = (scene.stuff == k) & ~things
        if region.any():
            regions.append((region, stuff.cat_id, 0))
    ids = np.zeros((h, w), dtype=np.uint32)
    segments = []
    for (mask, cat_id, crowd), seg_id in zip(regions, _unique_segment_ids(rng, len(regions))):
        ids[mask] = seg_id
        x, y, bw, bh = mask_bbox(mask)
        segments.append(
            {"id": seg_id, "category_id": cat_id, "iscrowd": crowd, "bbox": [x, y, bw, bh], "area": int(mask.sum())}
        )
    rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)
    return rgb, segments


def _coco_categories(panoptic: bool) -> list[dict[str, Any]]:
    cats: list[dict[str, Any]] = []
    for t in COCO_THINGS:
        cat: dict[str, Any] = {"id": t.cat_id, "name": t.name, "supercategory": t.shape}
        if panoptic:
            cat.update(isthing=1, color=list(t.colour))
        cats.append(cat)
    if panoptic:
        for s in STUFF:
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
            rng = seeded_rng(spec.seed, _STREAM_COCO, split_idx, i + 1)
            scene = make_scene(rng, spec.min_size, spec.max_size, coco_scene_options(i))
            name = f"{image_id:012d}"
            write(base / f"{split}2017" / f"{name}.jpg", encode_jpeg(scene.image, spec.jpeg_quality))
            counter.image_written()
            images.append(_image_entry(image_id, f"{name}.jpg", scene.size))
            anns.extend(_instance_annotations(scene, image_id, len(anns) + 1))
            png, segments = _panoptic(scene, rng)
            if want_pan:
                write(base / "annotations" / f"panoptic_{split}2017" / f"{name}.png", encode_png(png))
            pan_anns.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": segments})
        if want_inst:
            doc = _coco_doc(images, anns, _coco_categories(False))
            write_json(base / "annotations" / f"instances_{split}2017.json", doc)
            counter.annotations += len(anns)
        if want_pan:
            doc = _coco_doc(images, pan_anns, _coco_categories(True))
            write_json(base / "annotations" / f"panoptic_{split}2017.json", doc)
            counter.annotations += sum(len(a["segments_info"]) for a in pan_anns)


# ----------------------------------------------------------------------------- ADE20K


def _ade_label(scene: Scene) -> np.ndarray:
    """uint8 label map: 0 = unlabelled (border, seams), stuff and thing classes in 1..150."""
    lut = np.array([s.ade_idx for s in STUFF] + [0], dtype=np.uint8)
    label = lut[scene.stuff]  # -1 (void) picks the trailing 0
    for inst in scene.instances:
        label[inst.mask] = inst.thing.ade_idx
    return label


def _ade_class_names() -> dict[int, tuple[str, int]]:
    """ADE index -> (name, stuff flag) for the classes our scenes use."""
    names = {s.ade_idx: (s.ade_name, 1) for s in STUFF}
    names.update({t.ade_idx: (t.name, 0) for t in COCO_THINGS})
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
    write(base / "objectInfo150.txt", "\n".join(txt) + "\n")
    write(base / "objectInfo150.csv", "\n".join(csv) + "\n")


def _write_ade(root: Path, spec: SyntheticSpec, counter: _Counter) -> None:
    base = root / "ADEChallengeData2016"
    opts = SceneOptions(COCO_THINGS, max_things=6)
    pixels, total = np.zeros(256, dtype=np.int64), 0  # ratio is over training pixels
    presence = {split: np.zeros(256, dtype=np.int64) for split in SPLITS}
    for split_idx, (split, folder) in enumerate(zip(SPLITS, ("training", "validation"))):
        for i in range(_split_sizes(spec)[split]):
            scene = make_scene(seeded_rng(spec.seed, _STREAM_ADE, split_idx, i + 1), spec.min_size, spec.max_size, opts)
            label = _ade_label(scene)
            name = f"ADE_{split}_{i + 1:08d}"
            write(base / "images" / folder / f"{name}.jpg", encode_jpeg(scene.image, spec.jpeg_quality))
            write(base / "annotations" / folder / f"{name}.png", encode_png(label))
            counter.image_written()
            counts = np.bincount(label.ravel(), minlength=256)
            presence[split] += counts > 0
            if split == "train":
                pixels += counts
                total += label.size
    _write_object_info(base, pixels, total, presence)


# ------------------------------------------------------------------------- Objects365


def _box_annotations(
    scene: Scene, image_id: int, next_id: int, rng: np.random.Generator | None
) -> list[dict[str, Any]]:
    """Box-only rows; with an rng, adds the v2 isfake/isreflected flags."""
    anns = []
    for k, inst in enumerate(scene.instances):
        x, y, w, h = mask_bbox(inst.mask)
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
    drawn = [{"id": t.cat_id, "name": t.name} for t in O365_THINGS]
    return drawn + [{"id": k, "name": f"unused class {k}"} for k in range(len(drawn) + 1, count + 1)]


def _write_o365_v1(root: Path, spec: SyntheticSpec, counter: _Counter) -> None:
    base = root / "objects365_v1"
    opts = SceneOptions(O365_THINGS, max_things=6)
    for split_idx, split in enumerate(SPLITS):
        images, anns = [], []
        for i, image_id in enumerate(_image_ids(spec)[split]):
            scene = make_scene(seeded_rng(spec.seed, _STREAM_O365_V1, split_idx, i + 1), spec.min_size, spec.max_size, opts)
            name = f"obj365_{split}_{image_id:012d}.jpg"
            write(base / split / name, encode_jpeg(scene.image, spec.jpeg_quality))
            counter.image_written()
            images.append({"id": image_id, "file_name": name, "width": scene.size[0], "height": scene.size[1]})
            anns.extend(_box_annotations(scene, image_id, len(anns) + 1, None))
        doc = {"images": images, "annotations": anns, "categories": _o365_categories(spec.o365_categories)}
        write_json(base / "annotations" / f"objects365_{split}.json", doc)
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
    opts = SceneOptions(O365_THINGS, max_things=6)
    # one order for both splits
    categories = _shuffled_categories(seeded_rng(spec.seed, _STREAM_O365_V2, len(SPLITS), 0), spec.o365_categories)
    for split_idx, split in enumerate(SPLITS):
        split_rng = seeded_rng(spec.seed, _STREAM_O365_V2, split_idx, 0)
        n = _split_sizes(spec)[split]
        missing = set(split_rng.choice(n, _quirk_count(n, n, 20), replace=False).tolist()) if n else set()
        images, anns = [], []
        for i, image_id in enumerate(_image_ids(spec)[split]):
            rng = seeded_rng(spec.seed, _STREAM_O365_V2, split_idx, i + 1)
            scene = make_scene(rng, spec.min_size, spec.max_size, opts)
            patch, version, name = _v2_name(i, image_id)
            if i not in missing:  # listed in the JSON but absent on disk, as in the real release
                write(base / split / f"patch{patch}" / name, encode_jpeg(scene.image, spec.jpeg_quality))
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
        write_json(base / "annotations" / f"zhiyuan_objv2_{split}.json", doc)
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
