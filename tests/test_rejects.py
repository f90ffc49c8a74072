"""Bad raw data becomes rejects, never tracebacks.

Acceptance point pinned here: one test per corruption class -- the reject is reported in
`rejects.jsonl` with its reason (constants in core/records.py), the manifest counts it, and every
other sample/annotation still lands in the shards; `--strict` exits 2 with a one-line message and
writes no manifest. Each test builds a tiny synthetic raw dataset (data_prep.synthetic), corrupts it
on disk, shards it inline (never Ray) and reads the shards back with stock `webdataset`.
"""
from __future__ import annotations

import gc
import json
import math
import resource
import subprocess
import sys
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from core import records as R
from core.manifest import MANIFEST_NAME, REJECTS_NAME
from data_prep.shard import ShardSummary, shard_dataset
from data_prep.shard_config import ShardJobConfig
from data_prep.sources.box_rules import box_text
from data_prep.sources.index import image_key
from data_prep.sources.objects365 import v2_relative_path
from data_prep.synthetic import SyntheticSpec, make_synthetic
from core.config import config_from_dict


REPO = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).with_name("maskdino")
MASKDINO = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cli"]

TRAIN_IMAGES = 6


# ----------------------------------------------------------------------------- raw datasets


@dataclass
class Raw:
    """One synthetic raw split (train) in its on-disk layout, plus helpers to corrupt it."""

    fmt: str  # synthetic format name: coco_instances | coco_panoptic | ade20k | objects365_v1 | objects365_v2
    root: Path  # what source.root points at

    @property
    def source(self) -> dict[str, str]:
        fmt, extra = self.fmt, {}
        if fmt.startswith("objects365"):
            fmt, extra = "objects365", {"version": self.fmt.rsplit("_", 1)[1]}
        return {"format": fmt, "root": str(self.root), "split": "train", **extra}

    @property
    def annotation(self) -> Path:
        return {
            "coco_instances": self.root / "annotations" / "instances_train2017.json",
            "coco_panoptic": self.root / "annotations" / "panoptic_train2017.json",
            "objects365_v1": self.root / "annotations" / "objects365_train.json",
            "objects365_v2": self.root / "annotations" / "zhiyuan_objv2_train.json",
        }[self.fmt]

    @property
    def images_dir(self) -> Path:
        if self.fmt == "ade20k":
            return self.root / "images" / "training"
        return self.root / ("train2017" if self.fmt.startswith("coco") else "train")

    def load(self) -> dict[str, Any]:
        return json.loads(self.annotation.read_text())

    def save(self, doc: dict[str, Any]) -> None:
        self.annotation.write_text(json.dumps(doc))

    def image_entry(self, image_id: int) -> dict[str, Any]:
        return next(im for im in self.load()["images"] if im["id"] == image_id)

    def image_file(self, image_id: int) -> Path:
        if self.fmt == "ade20k":
            return self.images_dir / f"ADE_train_{image_id:08d}.jpg"
        name = self.image_entry(image_id)["file_name"]
        return self.images_dir / (v2_relative_path(name) if self.fmt == "objects365_v2" else name)

    def label_file(self, image_id: int) -> Path:
        if self.fmt == "ade20k":
            return self.root / "annotations" / "training" / f"ADE_train_{image_id:08d}.png"
        assert self.fmt == "coco_panoptic"
        return self.root / "annotations" / "panoptic_train2017" / f"{image_id:012d}.png"

    def expected(self) -> dict[str, set[int] | None]:
        """Sample key -> annotation ids (segment ids for panoptic; None for ADE20K) of the clean source."""
        if self.fmt == "ade20k":
            return {f"ADE_train_{i:08d}": None for i in range(1, TRAIN_IMAGES + 1)}
        doc = self.load()
        out: dict[str, set[int] | None] = {image_key(im["id"]): set() for im in doc["images"]}
        for a in doc["annotations"]:
            if self.fmt == "coco_panoptic":
                out[image_key(a["image_id"])] = {s["id"] for s in a["segments_info"]}
            else:
                out[image_key(a["image_id"])].add(a["id"])
        return out


@pytest.fixture
def make_raw(tmp_path: Path):
    def make(fmt: str) -> Raw:
        base = tmp_path / "raw"
        make_synthetic(base, SyntheticSpec(train_images=TRAIN_IMAGES, val_images=0, min_size=96, max_size=128,
                                           formats=(fmt,)))
        sub = {"coco_instances": "coco", "coco_panoptic": "coco", "ade20k": "ADEChallengeData2016"}.get(fmt, fmt)
        return Raw(fmt, base / sub)

    return make


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "shards"


def _ann(doc: dict[str, Any], image_id: int, k: int = 0) -> dict[str, Any]:
    """The k-th annotation of an image (by id order)."""
    return sorted((a for a in doc["annotations"] if a["image_id"] == image_id), key=lambda a: a["id"])[k]


def _image_with_annotations(doc: dict[str, Any], n: int = 2) -> int:
    counts = Counter(a["image_id"] for a in doc["annotations"])
    return min(i for i, c in counts.items() if c >= n)


# ----------------------------------------------------------------------------- run + read back


def shard(raw: Raw, out: Path, **validate: Any) -> ShardSummary:
    """Shard inline; any exception is bad data that did not become a reject, reported as a plain
    AssertionError (pytest cannot render the Cython frames of pycocotools tracebacks)."""
    cfg = config_from_dict(ShardJobConfig, {
        "source": raw.source, "output": str(out), "executor": {"kind": "inline"}, "progress": False,
        "validate": validate,
    })
    try:
        return shard_dataset(cfg)
    except Exception as exc:  # noqa: BLE001 - every exception here is the failure under test
        where = traceback.extract_tb(exc.__traceback__)[-1]
        failure = (f"bad data ended in an exception instead of a reject: "
                   f"{traceback.format_exception_only(exc)[-1].strip()} (raised at {where.filename}:{where.lineno})")
    gc.collect()  # outside the except block, so the dead task's objects are finalised in this test
    raise AssertionError(failure)


def read_rejects(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / REJECTS_NAME).read_text().splitlines()]


def read_manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / MANIFEST_NAME).read_text())


def read_samples(out: Path) -> dict[str, dict[str, Any]]:
    """key -> {"meta": the sample JSON, "members": member extensions}, via stock webdataset."""
    urls = [str(out / s["url"]) for s in read_manifest(out)["shards"]]
    samples: dict[str, dict[str, Any]] = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        key = sample["__key__"]
        assert key not in samples, f"sample {key} written twice"
        members = {k for k in sample if not k.startswith("__")}
        samples[key] = {"meta": json.loads(sample["json"]), "members": members}
    return samples


def _ids(meta: dict[str, Any]) -> list[int] | None:
    """Annotation (panoptic: segment) ids of a written sample, sorted, repeats kept; None for ADE20K."""
    if "segments" in meta:
        return sorted(s["id"] for s in meta["segments"])
    if "annotations" in meta:
        return sorted(a["id"] for a in meta["annotations"])
    return None


@dataclass(frozen=True)
class Expect:
    """One expected rejects.jsonl line; `detail` lists substrings the detail must contain."""

    key: str
    reason: str
    annotation_id: int | None = None
    detail: tuple[str, ...] = ()


def check_run(raw: Raw, out: Path, expected_rejects: list[Expect], *, source: dict[str, set[int] | None],
              drop_samples: set[str] = frozenset(), drop_annotations: set[int] = frozenset(),
              boxes_clipped: int = 0) -> dict[str, dict[str, Any]]:
    """rejects.jsonl holds exactly `expected_rejects` (in file order), the manifest counts them, and the
    shards hold every sample of `source` but `drop_samples`, each with all its annotation (segment) ids
    but `drop_annotations`. Returns the samples read back."""
    lines = read_rejects(out)
    got = [(r["key"], r["reason"], r["annotation_id"]) for r in lines]
    assert got == [(e.key, e.reason, e.annotation_id) for e in expected_rejects], lines
    for line, exp in zip(lines, expected_rejects):
        assert set(line) == {"key", "reason", "detail", "annotation_id"}
        for fragment in exp.detail:
            assert fragment in line["detail"], (fragment, line)

    manifest = read_manifest(out)
    counts = manifest["counts"]
    assert counts["rejects_by_reason"] == dict(Counter(e.reason for e in expected_rejects))
    assert counts["rejected_samples"] == sum(e.annotation_id is None for e in expected_rejects)
    assert counts["rejected_annotations"] == sum(e.annotation_id is not None for e in expected_rejects)
    assert counts["boxes_clipped"] == boxes_clipped

    samples = read_samples(out)
    want = {k: v for k, v in source.items() if k not in drop_samples}
    assert sorted(samples) == sorted(want)
    members = {"jpg", "json"} | ({"png"} if raw.fmt in ("coco_panoptic", "ade20k") else set())
    for key, ids in want.items():
        assert samples[key]["members"] == members, key
        got_ids = _ids(samples[key]["meta"])
        assert got_ids == (None if ids is None else sorted(ids - set(drop_annotations))), key
    assert counts["samples"] == len(want)
    assert counts["annotations"] == sum(len(_ids(s["meta"]) or ()) for s in samples.values())
    assert sum(s["samples"] for s in manifest["shards"]) == len(want)
    return samples


# ----------------------------------------------------------------------------- the baseline


@pytest.mark.parametrize("fmt", ["coco_instances", "coco_panoptic", "ade20k", "objects365_v1", "objects365_v2"])
def test_clean_dataset_has_no_rejects(make_raw, out: Path, fmt: str) -> None:
    """The synthetic data the other tests corrupt is itself clean: every sample and annotation sharded."""
    raw = make_raw(fmt)
    summary = shard(raw, out)
    check_run(raw, out, [], source=raw.expected())
    assert summary.rejects_by_reason == {}


# ----------------------------------------------------------------------------- image files (task side)


@pytest.mark.parametrize("decode", ["header", "full"])
def test_reject_undecodable_image(make_raw, out: Path, decode: str) -> None:
    raw = make_raw("coco_instances")
    source = raw.expected()
    raw.image_file(3).write_bytes(np.random.default_rng(0).bytes(4000))  # random bytes under a .jpg name
    shard(raw, out, decode=decode)
    check_run(raw, out, [Expect("000000000003", R.UNDECODABLE_IMAGE, detail=("not a readable image",))],
              source=source, drop_samples={"000000000003"})


@pytest.mark.parametrize("decode", ["header", "full"])
@pytest.mark.parametrize("fmt", ["coco_instances", "objects365_v2", "ade20k"])
def test_reject_truncated_image(make_raw, out: Path, fmt: str, decode: str) -> None:
    raw = make_raw(fmt)
    source = raw.expected()
    path = raw.image_file(2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # JPEG cut in half: header intact, no EOI marker
    shard(raw, out, decode=decode)
    key = sorted(source)[1]  # image 2: ADE keys are names, COCO-style keys zero-padded ids
    check_run(raw, out, [Expect(key, R.TRUNCATED_IMAGE, detail=("truncated",))], source=source, drop_samples={key})


def test_reject_image_size_mismatch(make_raw, out: Path) -> None:
    raw = make_raw("coco_instances")
    source = raw.expected()
    doc = raw.load()
    im = next(i for i in doc["images"] if i["id"] == 4)
    w, h = im["width"], im["height"]
    im["width"] = w + 7
    raw.save(doc)
    shard(raw, out)
    detail = (f"image is {w}x{h}", f"JSON says {w + 7}x{h}")
    check_run(raw, out, [Expect("000000000004", R.SIZE_MISMATCH, detail=detail)], source=source,
              drop_samples={"000000000004"})


def test_reject_image_size_missing_in_json(make_raw, out: Path) -> None:
    raw = make_raw("objects365_v1")
    source = raw.expected()
    doc = raw.load()
    doc["images"][0]["height"] = 0
    raw.save(doc)
    shard(raw, out)
    check_run(raw, out, [Expect("000000000001", R.SIZE_MISMATCH, detail=("no positive width/height",))],
              source=source, drop_samples={"000000000001"})


@pytest.mark.parametrize("fmt", ["coco_instances", "objects365_v2"])
def test_reject_missing_image_file(make_raw, out: Path, fmt: str) -> None:
    raw = make_raw(fmt)
    source = raw.expected()
    path = raw.image_file(5)
    path.unlink()
    shard(raw, out)
    # The image's annotations go with it silently: one reject line, for the sample.
    check_run(raw, out, [Expect("000000000005", R.MISSING_FILE, detail=(path.name,))], source=source,
              drop_samples={"000000000005"})


def test_reject_duplicate_image_entry(make_raw, out: Path) -> None:
    raw = make_raw("coco_instances")
    source = raw.expected()
    doc = raw.load()
    doc["images"].append(dict(doc["images"][2]))  # image id 3 listed twice
    raw.save(doc)
    shard(raw, out)
    check_run(raw, out, [Expect("000000000003", R.DUPLICATE_IMAGE, detail=("image id 3",))], source=source)


# ----------------------------------------------------------------------------- boxes (driver side)


@pytest.mark.parametrize("fmt", ["coco_instances", "objects365_v1"])
@pytest.mark.parametrize("side", ["right", "top_left"])
def test_box_partly_outside_is_clipped_not_rejected(make_raw, out: Path, fmt: str, side: str) -> None:
    raw = make_raw(fmt)
    source = raw.expected()
    doc = raw.load()
    ann = _ann(doc, 2)
    im = raw.image_entry(2)
    w = im["width"]
    x, y, bw, bh = ann["bbox"]
    if side == "right":
        ann["bbox"] = [w - 10.0, y, 30.0, bh]
        clipped_xyxy = [w - 10.0, y, float(w), y + bh]
    else:
        ann["bbox"] = [-5.0, -4.0, 20.0, 30.0]
        clipped_xyxy = [0.0, 0.0, 15.0, 26.0]
    raw.save(doc)
    summary = shard(raw, out)
    samples = check_run(raw, out, [], source=source, boxes_clipped=1)
    written = next(a for a in samples["000000000002"]["meta"]["annotations"] if a["id"] == ann["id"])
    assert written["bbox"] == pytest.approx(clipped_xyxy)
    assert not (out / REJECTS_NAME).read_text()
    assert summary.boxes_clipped == 1 and "1 boxes partly outside their image were clipped" in summary.paragraph()


@pytest.mark.parametrize("fmt", ["coco_instances", "objects365_v2"])
def test_reject_box_outside_image(make_raw, out: Path, fmt: str) -> None:
    raw = make_raw(fmt)
    source = raw.expected()
    doc = raw.load()
    image_id = _image_with_annotations(doc)
    ann = _ann(doc, image_id, 1)
    im = raw.image_entry(image_id)
    ann["bbox"] = [im["width"] + 5.0, 3.0, 10.0, 10.0]
    raw.save(doc)
    shard(raw, out)
    detail = (box_text(ann["bbox"]), f"{im['width']}x{im['height']} image")
    check_run(raw, out, [Expect(image_key(image_id), R.BOX_OUTSIDE_IMAGE, ann["id"], detail)], source=source,
              drop_annotations={ann["id"]})


_DEGENERATE = {
    "zero_width": ([10.0, 10.0, 0.0, 5.0], "[10, 10, 0, 5]"),
    "negative_height": ([10.0, 10.0, 5.0, -3.0], "[10, 10, 5, -3]"),
    "null_coordinate": ([10.0, None, 5.0, 5.0], "nan"),  # JavaScript's JSON.stringify(NaN) writes null
    "nan_string": ([10.0, 10.0, "NaN", 5.0], "nan"),
    "three_values": ([10.0, 10.0, 5.0], "nan"),
    "nan_literal": ([10.0, 10.0, math.nan, 5.0], "nan"),  # what Python's json.dump writes for a NaN
    "infinity_literal": ([10.0, 10.0, math.inf, 5.0], "is not finite"),
}
@pytest.mark.parametrize("fmt", ["coco_instances", "objects365_v1"])
@pytest.mark.parametrize("case", list(_DEGENERATE))
def test_reject_degenerate_box(make_raw, out: Path, fmt: str, case: str) -> None:
    bbox, shown = _DEGENERATE[case]
    raw = make_raw(fmt)
    source = raw.expected()
    doc = raw.load()
    image_id = _image_with_annotations(doc)
    ann = _ann(doc, image_id, 0)
    ann["bbox"] = bbox
    raw.save(doc)
    shard(raw, out)
    check_run(raw, out, [Expect(image_key(image_id), R.DEGENERATE_BOX, ann["id"], (shown, "non-positive size"))],
              source=source, drop_annotations={ann["id"]})


@pytest.mark.parametrize("bbox", [
    pytest.param([10.0, 10.0, 0.0, 5.0], id="zero_width"),
    pytest.param([10.0, None, 5.0, 5.0], id="null_coordinate"),
    pytest.param([10.0, 10.0, 5.0], id="three_values"),
])
def test_reject_degenerate_box_panoptic_segment(make_raw, out: Path, bbox: list[Any]) -> None:
    """A bad segment box rejects the whole panoptic sample (PNG and segments_info must agree)."""
    raw = make_raw("coco_panoptic")
    source = raw.expected()
    doc = raw.load()
    seg = doc["annotations"][2]["segments_info"][0]
    seg["bbox"] = bbox
    raw.save(doc)
    shard(raw, out)
    check_run(raw, out, [Expect("000000000003", R.DEGENERATE_BOX, detail=(f"segment {seg['id']}",))],
              source=source, drop_samples={"000000000003"})


# ----------------------------------------------------------------------------- annotation rows (driver side)


@pytest.mark.parametrize("fmt", ["coco_instances", "objects365_v2"])
def test_reject_unknown_category(make_raw, out: Path, fmt: str) -> None:
    raw = make_raw(fmt)
    source = raw.expected()
    doc = raw.load()
    image_id = _image_with_annotations(doc)
    ann = _ann(doc, image_id, 1)
    ann["category_id"] = 999
    raw.save(doc)
    shard(raw, out)
    check_run(raw, out, [Expect(image_key(image_id), R.UNKNOWN_CATEGORY, ann["id"], ("category_id 999",))],
              source=source, drop_annotations={ann["id"]})


def test_reject_unknown_category_panoptic_segment(make_raw, out: Path) -> None:
    raw = make_raw("coco_panoptic")
    source = raw.expected()
    doc = raw.load()
    doc["annotations"][1]["segments_info"][0]["category_id"] = 999
    raw.save(doc)
    shard(raw, out)
    check_run(raw, out, [Expect("000000000002", R.UNKNOWN_CATEGORY, detail=("category_id 999",))], source=source,
              drop_samples={"000000000002"})


@pytest.mark.parametrize("fmt", ["coco_instances", "objects365_v1"])
def test_reject_duplicate_annotation_identical_row(make_raw, out: Path, fmt: str) -> None:
    """An identical repeated row (the Objects365 v2 quirk): the first copy is kept, the repeat reported."""
    raw = make_raw(fmt)
    source = raw.expected()
    doc = raw.load()
    image_id = _image_with_annotations(doc)
    ann = _ann(doc, image_id, 1)
    doc["annotations"].append(dict(ann))
    raw.save(doc)
    shard(raw, out)
    key = image_key(image_id)
    samples = check_run(raw, out, [Expect(key, R.DUPLICATE_ANNOTATION, ann["id"], (f"annotation id {ann['id']}",))],
                        source=source)
    assert [a["id"] for a in samples[key]["meta"]["annotations"]].count(ann["id"]) == 1


@pytest.mark.parametrize("fmt", ["coco_instances", "objects365_v1"])
def test_reject_duplicate_annotation_id(make_raw, out: Path, fmt: str) -> None:
    """One id on two different rows is ambiguous: every row carrying it is rejected."""
    raw = make_raw(fmt)
    source = raw.expected()
    doc = raw.load()
    first, second = sorted({a["image_id"] for a in doc["annotations"]})[:2]
    ann = _ann(doc, first, 0)
    doc["annotations"].append({**_ann(doc, second, 0), "id": ann["id"]})  # another image's row reusing the id
    raw.save(doc)
    shard(raw, out)
    detail = (f"annotation id {ann['id']}",)
    check_run(raw, out, [Expect(image_key(first), R.DUPLICATE_ANNOTATION_ID, ann["id"], detail),
                         Expect(image_key(second), R.DUPLICATE_ANNOTATION_ID, ann["id"], detail)],
              source=source, drop_annotations={ann["id"]})


def test_reject_duplicate_segment_id_panoptic(make_raw, out: Path) -> None:
    raw = make_raw("coco_panoptic")
    source = raw.expected()
    doc = raw.load()
    segs = doc["annotations"][4]["segments_info"]
    segs.append(dict(segs[0]))
    raw.save(doc)
    shard(raw, out)
    check_run(raw, out, [Expect("000000000005", R.DUPLICATE_ANNOTATION_ID, detail=("repeats a segment id",))],
              source=source, drop_samples={"000000000005"})


@pytest.mark.parametrize("fmt", ["coco_instances", "objects365_v2"])
def test_reject_unknown_image(make_raw, out: Path, fmt: str) -> None:
    raw = make_raw(fmt)
    source = raw.expected()
    doc = raw.load()
    orphan = {**_ann(doc, 1), "id": 777, "image_id": 9999}
    doc["annotations"].append(orphan)
    raw.save(doc)
    shard(raw, out)
    check_run(raw, out, [Expect("000000009999", R.UNKNOWN_IMAGE, 777, ("image_id 9999",))], source=source)


def test_reject_unknown_image_panoptic(make_raw, out: Path) -> None:
    raw = make_raw("coco_panoptic")
    source = raw.expected()
    doc = raw.load()
    doc["annotations"].append({**doc["annotations"][0], "image_id": 9999})
    raw.save(doc)
    shard(raw, out)
    check_run(raw, out, [Expect("000000009999", R.UNKNOWN_IMAGE, detail=("image_id 9999",))], source=source)


@pytest.mark.parametrize("field,value", [("id", None), ("id", "12"), ("category_id", None), ("category_id", 2.5)])
def test_reject_invalid_annotation(make_raw, out: Path, field: str, value: Any) -> None:
    raw = make_raw("coco_instances")
    source = raw.expected()
    doc = raw.load()
    ann = _ann(doc, 6, 1)
    ann_id = ann["id"]
    if value is None:
        del ann[field]
    else:
        ann[field] = value
    raw.save(doc)
    shard(raw, out)
    # Without a usable id the reject carries -1 as annotation_id.
    expected_id = -1 if field == "id" else ann_id
    check_run(raw, out, [Expect("000000000006", R.INVALID_ANNOTATION, expected_id, ("'id' or 'category_id'",))],
              source=source, drop_annotations={ann_id})


# ----------------------------------------------------------------------------- segmentations (task side)


def _image_size(raw: Raw, image_id: int) -> tuple[int, int]:
    im = raw.image_entry(image_id)
    return im["height"], im["width"]


_SEGMENTATIONS = {
    # name: (segmentation builder from (h, w), detail fragment builder)
    "polygon_two_points": (lambda h, w: [[10.0, 10.0, 20.0, 20.0]], lambda h, w: "3 or more points"),
    "polygon_empty": (lambda h, w: [], lambda h, w: "3 or more points"),
    "uncompressed_rle_size_mismatch": (lambda h, w: {"size": [h + 1, w], "counts": [(h + 1) * w]},
                                       lambda h, w: f"RLE size [{h + 1}, {w}] differs from the image's [{h}, {w}]"),
    "compressed_rle_size_mismatch": (lambda h, w: {"size": [h, w + 2], "counts": "PQ1"},
                                     lambda h, w: f"RLE size [{h}, {w + 2}] differs from the image's [{h}, {w}]"),
    "uncompressed_rle_wrong_total": (lambda h, w: {"size": [h, w], "counts": [h * w - 1]},
                                     lambda h, w: f"covers {h * w - 1} pixels, not {h * w}"),
    "not_polygon_or_rle": (lambda h, w: "garbage", lambda h, w: "neither polygons nor RLE"),
    # Malformed values inside an otherwise well-shaped segmentation.
    "polygon_non_numeric": (lambda h, w: [["a", "b", "c", "d", "e", "f"]], lambda h, w: ""),
    "rle_size_not_a_list": (lambda h, w: {"size": 5, "counts": [h * w]}, lambda h, w: ""),
    "rle_counts_null": (lambda h, w: {"size": [h, w], "counts": None}, lambda h, w: ""),
    "rle_counts_negative": (lambda h, w: {"size": [h, w], "counts": [h * w + 5, -5]}, lambda h, w: ""),
}
@pytest.mark.parametrize("case", list(_SEGMENTATIONS))
def test_reject_invalid_segmentation(make_raw, out: Path, case: str) -> None:
    make_seg, make_detail = _SEGMENTATIONS[case]
    raw = make_raw("coco_instances")
    source = raw.expected()
    doc = raw.load()
    ann = _ann(doc, 3, 2)
    h, w = _image_size(raw, 3)
    ann["segmentation"] = make_seg(h, w)
    raw.save(doc)
    shard(raw, out)
    samples = check_run(raw, out, [Expect("000000000003", R.INVALID_SEGMENTATION, ann["id"], (make_detail(h, w),))],
                        source=source, drop_annotations={ann["id"]})
    for sample in samples.values():  # every surviving annotation is stored as compressed RLE
        for a in sample["meta"]["annotations"]:
            assert set(a["segmentation"]) == {"size", "counts"} and isinstance(a["segmentation"]["counts"], str)


_LIMIT_AS_BYTES = 3 * 1024**3


def _limit_memory() -> None:  # runs in the child: a runaway allocation fails there, not on the machine
    resource.setrlimit(resource.RLIMIT_AS, (_LIMIT_AS_BYTES, _LIMIT_AS_BYTES))


@pytest.mark.parametrize("polygon", [
    pytest.param([[None, 10, 50, 10, 50, 50, 10, 50]], id="null_coordinate"),
    pytest.param([[1e9, 1e9, 50, 10, 50, 50, 10, 50]], id="huge_coordinate"),
])
def test_reject_invalid_segmentation_polygon_coordinates(polygon: list[list[Any]]) -> None:
    """Checked on validate.to_compressed_rle (what the shard task calls) in a memory-capped child
    process: in-process, today's behaviour would take the test runner (or the machine) down."""
    code = (
        "import json, sys\n"
        "from data_prep.validate import SampleProblem, to_compressed_rle\n"
        "try:\n"
        f"    to_compressed_rle(json.dumps({polygon!r}), 96, 96)\n"
        "except SampleProblem as p:\n"
        "    print(p.reason)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          preexec_fn=_limit_memory)
    assert (proc.returncode, proc.stdout.strip()) == (0, R.INVALID_SEGMENTATION), proc.stderr[-2000:]


# ----------------------------------------------------------------------------- panoptic PNGs (task side)


def test_reject_png_id_without_segment(make_raw, out: Path) -> None:
    raw = make_raw("coco_panoptic")
    source = raw.expected()
    doc = raw.load()
    dropped = doc["annotations"][3]["segments_info"].pop(1)  # image 4: its pixels stay in the PNG
    raw.save(doc)
    shard(raw, out)
    check_run(raw, out, [Expect("000000000004", R.PNG_ID_WITHOUT_SEGMENT, detail=(str(dropped["id"]),))],
              source=source, drop_samples={"000000000004"})


def test_reject_segment_without_pixels(make_raw, out: Path) -> None:
    raw = make_raw("coco_panoptic")
    source = raw.expected()
    doc = raw.load()
    used = {s["id"] for a in doc["annotations"] for s in a["segments_info"]}
    ghost = next(i for i in range(424242, 10**7) if i not in used)
    doc["annotations"][0]["segments_info"].append(
        {"id": ghost, "category_id": 1, "iscrowd": 0, "bbox": [4, 4, 8, 8], "area": 64})
    raw.save(doc)
    shard(raw, out)
    check_run(raw, out, [Expect("000000000001", R.SEGMENT_WITHOUT_PIXELS, detail=(str(ghost),))], source=source,
              drop_samples={"000000000001"})


def test_reject_missing_panoptic_png(make_raw, out: Path) -> None:
    raw = make_raw("coco_panoptic")
    source = raw.expected()
    raw.label_file(6).unlink()
    shard(raw, out)
    check_run(raw, out, [Expect("000000000006", R.MISSING_FILE, detail=("000000000006.png",))], source=source,
              drop_samples={"000000000006"})


@pytest.mark.parametrize("fmt", ["coco_panoptic", "ade20k"])
def test_reject_undecodable_label(make_raw, out: Path, fmt: str) -> None:
    raw = make_raw(fmt)
    source = raw.expected()
    raw.label_file(2).write_bytes(b"not a png at all")
    shard(raw, out)
    key = sorted(source)[1]
    check_run(raw, out, [Expect(key, R.UNDECODABLE_LABEL, detail=("cannot be decoded",))], source=source,
              drop_samples={key})


@pytest.mark.parametrize("fmt", ["coco_panoptic", "ade20k"])
def test_reject_label_size_mismatch(make_raw, out: Path, fmt: str) -> None:
    raw = make_raw(fmt)
    source = raw.expected()
    path = raw.label_file(5)
    with Image.open(path) as img:
        w, h = img.size
        img.crop((0, 0, w - 1, h)).save(path)
    shard(raw, out)
    key = sorted(source)[4]
    check_run(raw, out, [Expect(key, R.SIZE_MISMATCH, detail=(f"PNG is {w - 1}x{h}", f"image is {w}x{h}"))],
              source=source, drop_samples={key})


# ----------------------------------------------------------------------------- ADE20K


def test_reject_ade_label_above_150(make_raw, out: Path) -> None:
    raw = make_raw("ade20k")
    source = raw.expected()
    path = raw.label_file(3)
    label = np.array(Image.open(path))
    label[5, 7] = 200
    Image.fromarray(label).save(path)
    shard(raw, out)
    check_run(raw, out, [Expect("ADE_train_00000003", R.UNKNOWN_CATEGORY, detail=("label value 200", "150"))],
              source=source, drop_samples={"ADE_train_00000003"})


def test_reject_ade_image_without_label(make_raw, out: Path) -> None:
    raw = make_raw("ade20k")
    source = raw.expected()
    raw.label_file(4).unlink()
    shard(raw, out)
    check_run(raw, out, [Expect("ADE_train_00000004", R.MISSING_FILE, detail=("ADE_train_00000004.jpg",))],
              source=source, drop_samples={"ADE_train_00000004"})


def test_reject_ade_label_without_image(make_raw, out: Path) -> None:
    raw = make_raw("ade20k")
    source = raw.expected()
    raw.image_file(1).unlink()
    shard(raw, out)
    check_run(raw, out, [Expect("ADE_train_00000001", R.MISSING_FILE, detail=("ADE_train_00000001.png",))],
              source=source, drop_samples={"ADE_train_00000001"})


# ----------------------------------------------------------------------------- malformed panoptic entries


def test_reject_panoptic_segment_missing_category(make_raw, out: Path) -> None:
    raw = make_raw("coco_panoptic")
    source = raw.expected()
    doc = raw.load()
    del doc["annotations"][2]["segments_info"][0]["category_id"]
    raw.save(doc)
    shard(raw, out)
    check_run(raw, out, [Expect("000000000003", R.INVALID_ANNOTATION, detail=("category_id",))], source=source,
              drop_samples={"000000000003"})


# ----------------------------------------------------------------------------- CLI: --strict, malformed JSON


@dataclass(frozen=True)
class CliRun:
    returncode: int
    stdout: str
    stderr: str
    output: Path


def run_cli(raw: Raw, output: Path, *flags: str) -> CliRun:
    src = raw.source
    args = [*MASKDINO, "shard", "--inline", *flags, *(f"source.{k}={v}" for k, v in src.items()),
            f"output={output}"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=180)
    return CliRun(proc.returncode, proc.stdout, proc.stderr, output)


def assert_user_error(run: CliRun, prefix: str) -> str:
    """Exit 2, no traceback, no manifest; returns the stderr line that starts with `prefix`."""
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "Traceback" not in run.stdout + run.stderr
    assert not (run.output / MANIFEST_NAME).exists()
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(prefix), run.stderr
    return errors[0]


def test_strict_cli_driver_reject(make_raw, tmp_path: Path) -> None:
    """--strict with a reject found while reading the annotations (missing image file)."""
    raw = make_raw("coco_instances")
    raw.image_file(3).unlink()
    run = run_cli(raw, tmp_path / "shards", "--strict")
    line = assert_user_error(run, "error: strict:")
    assert run.stderr.splitlines() == [line]
    assert "missing_file: 1" in line and "000000000003" in line and "manifest not written" in line
    assert [r["reason"] for r in read_rejects(run.output)] == [R.MISSING_FILE]
    assert not list(run.output.glob("*.tar"))  # nothing was sharded


@pytest.fixture(scope="module")
def strict_task_run(tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    """--strict with a reject found by a shard task (truncated JPEG), run once for two tests."""
    base = tmp_path_factory.mktemp("strict_task")
    make_synthetic(base / "raw", SyntheticSpec(train_images=TRAIN_IMAGES, val_images=0, min_size=96, max_size=128,
                                               formats=("coco_instances",)))
    raw = Raw("coco_instances", base / "raw" / "coco")
    path = raw.image_file(2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return run_cli(raw, base / "shards", "--strict")


def test_strict_cli_task_reject(strict_task_run: CliRun) -> None:
    line = assert_user_error(strict_task_run, "error: strict:")
    assert "truncated_image: 1" in line and "000000000002" in line and "manifest not written" in line
    assert [r["reason"] for r in read_rejects(strict_task_run.output)] == [R.TRUNCATED_IMAGE]


def test_strict_cli_task_reject_stderr_is_one_line(strict_task_run: CliRun) -> None:
    assert strict_task_run.stderr.splitlines() == [strict_task_run.stderr.strip()]
    assert strict_task_run.stderr.startswith("error: strict:")


def test_cli_malformed_annotation_json(make_raw, tmp_path: Path) -> None:
    raw = make_raw("coco_instances")
    raw.annotation.write_text("this is not JSON {\n")
    run = run_cli(raw, tmp_path / "shards")
    line = assert_user_error(run, "error:")
    assert run.stderr.splitlines() == [line]
    assert str(raw.annotation) in line and "not valid JSON" in line
