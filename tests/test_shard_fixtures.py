"""Acceptance 1: the real fixtures (panopticapi sample, ADE20K sample, COCO polygons and crowd RLE)
shard and round-trip: masks pixel for pixel, label PNGs and images byte-identical, boxes and
categories as in the source."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from tests.shard_helpers import FIXTURES, read_manifest, read_samples, run_shard

PANOPTIC = FIXTURES / "panopticapi" / "sample_data"
ADE = FIXTURES / "sceneparsing"


def _rgb2id(png: bytes) -> np.ndarray:
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def _xyxy(bbox):
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def test_panoptic_sample_round_trips(tmp_path):
    summary = run_shard(tmp_path, format="coco_panoptic", root=str(PANOPTIC), split="val",
                        annotation=str(PANOPTIC / "panoptic_examples.json"),
                        images=str(PANOPTIC / "input_images"), labels=str(PANOPTIC / "panoptic_examples"))
    source = json.loads((PANOPTIC / "panoptic_examples.json").read_text())
    samples = read_samples(tmp_path)
    assert summary.samples == 2 and summary.rejects_by_reason == {}
    assert set(samples) == {"000000142238", "000000439180"}
    for ann in source["annotations"]:
        sample = samples[f"{ann['image_id']:012d}"]
        assert sample["png"] == (PANOPTIC / "panoptic_examples" / ann["file_name"]).read_bytes()
        image_name = ann["file_name"].replace(".png", ".jpg")
        assert sample["jpg"] == (PANOPTIC / "input_images" / image_name).read_bytes()
        got = {s["id"]: s for s in sample["json"]["segments"]}
        assert len(got) == len(ann["segments_info"])
        for seg in ann["segments_info"]:
            assert got[seg["id"]]["category_id"] == seg["category_id"]
            assert got[seg["id"]]["iscrowd"] == seg["iscrowd"]
            assert got[seg["id"]]["area"] == seg["area"]
            assert got[seg["id"]]["bbox"] == pytest.approx(_xyxy(seg["bbox"]))
    manifest = read_manifest(tmp_path)
    assert [c.id for c in manifest.categories] == sorted(c["id"] for c in source["categories"])
    assert sum(c.isthing for c in manifest.categories) == 80
    assert manifest.label_format == "coco_rgb2id" and manifest.task == "panoptic"
    assert manifest.counts.annotations == 50


def test_panoptic_sample_as_instances_masks_match_pixel_for_pixel(tmp_path):
    """The detection-format JSON holds the same segments as compressed RLE: stored RLE decodes to
    the source RLE's mask and to the panoptic PNG's segment, pixel for pixel."""
    run_shard(tmp_path, format="coco_instances", root=str(PANOPTIC), split="val",
              annotation=str(PANOPTIC / "panoptic_coco_detection_format.json"),
              images=str(PANOPTIC / "input_images"))
    source = json.loads((PANOPTIC / "panoptic_coco_detection_format.json").read_text())
    panoptic = json.loads((PANOPTIC / "panoptic_examples.json").read_text())
    seg_ids = {(a["image_id"], s["category_id"], tuple(s["bbox"])): s["id"]
               for a in panoptic["annotations"] for s in a["segments_info"]}
    samples = read_samples(tmp_path)
    stored = {a["id"]: a for s in samples.values() for a in s["json"]["annotations"]}
    assert len(stored) == len(source["annotations"]) == 50
    assert 0 in stored  # the fixture's first annotation has id 0; it is kept as is
    for ann in source["annotations"]:
        ours = stored[ann["id"]]
        assert ours["category_id"] == ann["category_id"] and ours["iscrowd"] == ann["iscrowd"]
        assert ours["bbox"] == pytest.approx(_xyxy(ann["bbox"]))
        ours_mask = mask_utils.decode({"size": ours["segmentation"]["size"],
                                       "counts": ours["segmentation"]["counts"].encode()})
        src_mask = mask_utils.decode({"size": ann["segmentation"]["size"],
                                      "counts": ann["segmentation"]["counts"].encode()})
        np.testing.assert_array_equal(ours_mask, src_mask)
        png = samples[f"{ann['image_id']:012d}"]
        png_ids = _rgb2id((PANOPTIC / "panoptic_examples" / f"{ann['image_id']:012d}.png").read_bytes())
        seg_id = seg_ids[(ann["image_id"], ann["category_id"], tuple(int(v) for v in ann["bbox"]))]
        np.testing.assert_array_equal(ours_mask, (png_ids == seg_id).astype(np.uint8))
        assert png["json"]["width"] == ours_mask.shape[1]


def _write_placeholder_images(images: list[dict], folder: Path) -> None:
    """The mmdetection fixture ships annotations only; the test draws images of the listed sizes."""
    folder.mkdir(parents=True)
    for im in images:
        Image.new("RGB", (im["width"], im["height"]), (90, 120, 150)).save(folder / im["file_name"], quality=90)


def test_coco_polygons_and_uncompressed_crowd_rle_match_pycocotools(tmp_path):
    """Real COCO val2017 annotations: multi-part polygons and an uncompressed crowd RLE are stored as
    compressed RLE whose masks equal pycocotools' own conversion (COCO.annToMask)."""
    from pycocotools.coco import COCO

    ann_file = FIXTURES / "mmdetection" / "tests" / "data" / "coco_dummy" / "annotations" / "instances_val2017.json"
    source = json.loads(ann_file.read_text())
    _write_placeholder_images(source["images"], tmp_path / "images")
    run_shard(tmp_path / "out", format="coco_instances", root=str(tmp_path), split="val",
              annotation=str(ann_file), images=str(tmp_path / "images"))
    coco = COCO(str(ann_file))
    samples = read_samples(tmp_path / "out")
    stored = {a["id"]: a for s in samples.values() for a in s["json"]["annotations"]}
    kinds = set()
    for ann in source["annotations"]:
        seg = ann["segmentation"]
        kinds.add("multipolygon" if isinstance(seg, list) and len(seg) > 1 else
                  "polygon" if isinstance(seg, list) else "uncompressed_rle")
        ours = stored[ann["id"]]
        assert isinstance(ours["segmentation"]["counts"], str)
        mask = mask_utils.decode({"size": ours["segmentation"]["size"],
                                  "counts": ours["segmentation"]["counts"].encode()})
        np.testing.assert_array_equal(mask, coco.annToMask(ann))
        assert ours["area"] == ann["area"] and ours["category_id"] == ann["category_id"]
    assert kinds == {"polygon", "multipolygon", "uncompressed_rle"}
    assert len(stored) == 37
    manifest = read_manifest(tmp_path / "out")
    assert [c.id for c in manifest.categories][:5] == [1, 2, 3, 4, 5] and manifest.categories[-1].id == 90


def test_png_image_keeps_its_bytes_under_its_own_member(tmp_path):
    """A real COCO image stored as PNG (transformers fixture): bytes kept, member `image.png` so it
    cannot collide with a label PNG; polygons become RLE equal to pycocotools'."""
    src = FIXTURES / "transformers-fixtures" / "tests" / "fixtures" / "tests_samples" / "COCO"
    anns = json.loads((src / "coco_annotations.txt").read_text())
    for i, a in enumerate(anns, start=1):
        a["id"] = i
    images = tmp_path / "val2017"
    images.mkdir()
    shutil.copy(src / "000000039769.png", images / "000000039769.png")
    (tmp_path / "annotations").mkdir()
    coco_json = {"images": [{"id": 39769, "file_name": "000000039769.png", "width": 640, "height": 480}],
                 "annotations": anns,
                 "categories": [{"id": c, "name": f"c{c}"} for c in sorted({a["category_id"] for a in anns})]}
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(coco_json))
    run_shard(tmp_path / "out", format="coco_instances", root=str(tmp_path), split="val")
    sample = read_samples(tmp_path / "out")["000000039769"]
    assert sample["image.png"] == (src / "000000039769.png").read_bytes()
    assert sample["json"]["image_member"] == "image.png"
    for a, ours in zip(anns, sample["json"]["annotations"]):
        rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], 480, 640))
        np.testing.assert_array_equal(
            mask_utils.decode({"size": [480, 640], "counts": ours["segmentation"]["counts"].encode()}),
            mask_utils.decode(rle))


def test_ade20k_sample_round_trips(tmp_path):
    run_shard(tmp_path, format="ade20k", root=str(ADE), split="val",
              images=str(ADE / "sampleData" / "images"), labels=str(ADE / "sampleData" / "annotations"),
              categories=str(ADE / "objectInfo150.csv"))
    samples = read_samples(tmp_path)
    assert sorted(samples) == ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"]
    sizes = {"ADE_val_00000001": (683, 512), "ADE_val_00000002": (500, 364), "ADE_val_00000003": (400, 300)}
    for key, sample in samples.items():
        assert sample["png"] == (ADE / "sampleData" / "annotations" / f"{key}.png").read_bytes()
        assert sample["jpg"] == (ADE / "sampleData" / "images" / f"{key}.jpg").read_bytes()
        assert (sample["json"]["width"], sample["json"]["height"]) == sizes[key]
        assert "annotations" not in sample["json"]
    manifest = read_manifest(tmp_path)
    assert len(manifest.categories) == 150 and manifest.categories[0].name == "wall"
    assert manifest.categories[1].name == "building, edifice"
    assert manifest.label_format == "ade_label_uint8" and manifest.task == "semantic"


def test_ade20k_txt_category_list_is_read(tmp_path):
    run_shard(tmp_path, format="ade20k", root=str(ADE), split="val",
              images=str(ADE / "sampleData" / "images"), labels=str(ADE / "sampleData" / "annotations"),
              categories=str(ADE / "objectInfo150.txt"))
    manifest = read_manifest(tmp_path)
    assert [c.id for c in manifest.categories] == list(range(1, 151))
    assert manifest.categories[2].name == "sky"
