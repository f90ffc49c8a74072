"""Training transforms and targets (pipeline/transforms.py, pipeline/targets.py) against the official
dataset mappers: detectron2's ResizeScale / FixedSizeCrop / ResizeShortestEdge / RandomCrop formulas on
hand-worked sizes, nearest resizing exactly as detectron2 (PIL for uint8 masks, torch for the float
sem_seg), boxes recomputed from the augmented masks and normalised by the canvas, crowd / emptied instances
dropped, ADE20K label handling and OpenCV-exact SSD colour jitter, panoptic and detection targets, and
reproducibility from the generator. Real fixtures (COCO panoptic sample, ADE20K sample) are sharded once."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from core.manifest import Manifest, load_manifest
from core.storage import Storage
from pipeline.color_aug import ColorJitter, apply_color_jitter, bgr_to_hsv, hsv_to_bgr
from core.config import ConfigError, config_from_dict
from core.shard_sample import ShardSample
from pipeline.eval_data import iter_eval_samples
from pipeline.metrics.panoptic import rgb2id
from pipeline.targets import TrainSample, detection_targets
from pipeline.transforms import (
    AugConfig,
    Geometry,
    collate,
    fixed_size_crop_offset,
    pad_to,
    plan_ade,
    resize_scale_size,
    train_transform,
    warp_boxes,
    warp_image,
    warp_label_map,
    warp_masks,
)
from tests.shard_helpers import FIXTURES, run_shard

PANOPTIC = FIXTURES / "panopticapi" / "sample_data"
ADE = FIXTURES / "sceneparsing"
CONTIGUOUS = {1: 0, 2: 1}


# ---------------------------------------------------------------- helpers and fixtures
def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode()}


def annotation(mask: np.ndarray, category_id: int = 1, iscrowd: int = 0) -> dict:
    ys, xs = np.nonzero(mask)
    bbox = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    return {"category_id": category_id, "iscrowd": iscrowd, "bbox": bbox, "segmentation": rle(mask)}


def instance_sample(image: np.ndarray, masks: list[tuple[np.ndarray, int, int]], cfg: AugConfig, seed: int
                    ) -> TrainSample | None:
    meta = {"annotations": [annotation(m, c, crowd) for m, c, crowd in masks]}
    return train_transform(image, meta, None, "instance", None, CONTIGUOUS, cfg, np.random.default_rng(seed))


def tight_cxcywh(mask: np.ndarray) -> list[float]:
    """Independent tight box of a mask ([x0, y0, x1 + 1, y1 + 1]) as cxcywh / canvas."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return [(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h]


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _decoded(manifest_uri: str) -> tuple[Manifest, list[ShardSample]]:
    return load_manifest(Storage(), manifest_uri), list(iter_eval_samples(Storage(), manifest_uri))


@pytest.fixture(scope="module")
def panoptic_data(tmp_path_factory) -> tuple[Manifest, list[ShardSample]]:
    out = tmp_path_factory.mktemp("pan")
    run_shard(out, format="coco_panoptic", root=str(PANOPTIC), split="val",
              annotation=str(PANOPTIC / "panoptic_examples.json"), images=str(PANOPTIC / "input_images"),
              labels=str(PANOPTIC / "panoptic_examples"))
    return _decoded(str(out / "manifest.json"))


@pytest.fixture(scope="module")
def instance_data(tmp_path_factory) -> tuple[Manifest, list[ShardSample]]:
    out = tmp_path_factory.mktemp("inst")
    run_shard(out, format="coco_instances", root=str(PANOPTIC), split="val",
              annotation=str(PANOPTIC / "panoptic_coco_detection_format.json"), images=str(PANOPTIC / "input_images"))
    return _decoded(str(out / "manifest.json"))


@pytest.fixture(scope="module")
def ade_data(tmp_path_factory) -> tuple[Manifest, list[ShardSample]]:
    out = tmp_path_factory.mktemp("ade")
    run_shard(out, format="ade20k", root=str(ADE), split="val", images=str(ADE / "sampleData" / "images"),
              labels=str(ADE / "sampleData" / "annotations"), categories=str(ADE / "objectInfo150.csv"))
    return _decoded(str(out / "manifest.json"))


def transform(data: tuple[Manifest, list[ShardSample]], index: int, cfg: AugConfig, seed: int) -> TrainSample:
    manifest, samples = data
    s = samples[index]
    out = train_transform(s.image, s.meta, s.label_png, manifest.task, manifest.label_format,
                          manifest.contiguous_ids(), cfg, np.random.default_rng(seed), s.key)
    assert out is not None
    return out


def assert_same_sample(a: TrainSample, b: TrainSample) -> None:
    assert torch.equal(a.image, b.image)
    assert torch.equal(a.targets.labels, b.targets.labels)
    assert torch.equal(a.targets.boxes, b.targets.boxes)
    assert torch.equal(a.targets.masks, b.targets.masks)


# ---------------------------------------------------------------- config
def test_aug_config_loads_through_the_config_loader_and_rejects_bad_values():
    cfg = config_from_dict(AugConfig, {"recipe": "ade_semantic", "short_edges": [64, 96]}, source="test")
    assert cfg.short_edges == (64, 96) and cfg.recipe == "ade_semantic"
    assert AugConfig().short_edges == (256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870, 921,
                                       972, 1024)  # int(0.1 * 512 * x), x = 5..20
    with pytest.raises(ConfigError):
        config_from_dict(AugConfig, {"recipe": "mosaic"}, source="test")
    with pytest.raises(ValueError):
        AugConfig(min_scale=2.0, max_scale=1.0)


# ---------------------------------------------------------------- detectron2 size formulas
def test_resize_scale_size_matches_detectron2_on_hand_examples():
    # scale = min(target_h * s / h, target_w * s / w); size = np.round(size * scale)
    assert resize_scale_size(480, 640, 0.5, 1024, 1024) == (384, 512)  # min(512/480, 512/640) = 0.8
    assert resize_scale_size(480, 640, 2.0, 1024, 1024) == (1536, 2048)  # min(4.27, 3.2) = 3.2
    assert resize_scale_size(100, 50, 1.0, 40, 60) == (40, 20)  # min(0.4, 1.2) = 0.4
    assert resize_scale_size(3, 6, 1.0, 5, 5) == (2, 5)  # 3 * 5/6 = 2.5 rounds half to even (np.round)


def test_fixed_size_crop_offset_matches_detectron2_on_hand_examples():
    # offset = np.round(max(size - crop, 0) * u), ONE u for both axes
    assert fixed_size_crop_offset(1536, 2048, 1024, 1024, 0.25) == (128, 256)
    assert fixed_size_crop_offset(384, 512, 1024, 1024, 0.9) == (0, 0)  # smaller: no crop, padded later
    assert fixed_size_crop_offset(1030, 1024, 1024, 1024, 0.75) == (4, 0)  # 4.5 -> 4 (half to even)


def test_lsj_crop_window_and_canvas():
    cfg = AugConfig(image_size=64, min_scale=2.0, max_scale=2.0, flip=False)
    out = instance_sample(random_image(48, 32), [(np.ones((48, 32), bool), 1, 0)], cfg, seed=0)
    assert out.image.shape == (3, 64, 64)
    # 48x32 in 128x128: scale min(128/48, 128/32) = 2.667 -> 128 x 85; crop 64x64 of it, nothing padded
    assert resize_scale_size(48, 32, 2.0, 64, 64) == (128, 85)
    assert out.targets.masks.shape == (1, 64, 64) and bool(out.targets.masks.all())


# ---------------------------------------------------------------- LSJ
def test_lsj_output_is_canvas_sized_with_grey_padding_and_empty_masks_there():
    mask = np.zeros((40, 60), bool)
    mask[5:35, 10:50] = True
    cfg = AugConfig(image_size=64, min_scale=0.5, max_scale=0.5)
    out = instance_sample(random_image(40, 60), [(mask, 1, 0)], cfg, seed=3)
    rh, rw = resize_scale_size(40, 60, 0.5, 64, 64)
    assert (rh, rw) == (21, 32)
    assert out.image.shape == (3, 64, 64) and out.image.dtype == torch.uint8
    assert (out.image[:, rh:, :] == 128).all() and (out.image[:, :, rw:] == 128).all()
    assert not (out.image[:, :rh, :rw] == 128).all()
    masks = out.targets.masks
    assert masks.shape == (1, 64, 64) and masks.dtype == torch.bool
    assert not masks[:, rh:, :].any() and not masks[:, :, rw:].any() and masks.any()


def test_same_seed_gives_identical_output_and_another_seed_does_not(instance_data):
    cfg = AugConfig(image_size=128)
    a, b, c = (transform(instance_data, 0, cfg, seed) for seed in (5, 5, 6))
    assert_same_sample(a, b)
    assert not torch.equal(a.image, c.image)


def test_boxes_are_tight_boxes_of_the_cropped_masks_normalised_by_the_canvas():
    """A triangle cut by the crop: its tight box is not the transformed original box (official: boxes are
    recomputed from the cropped masks)."""
    y, x = np.mgrid[0:40, 0:80]
    triangle = x / 79 + y / 39 <= 1
    cfg = AugConfig(image_size=40, min_scale=2.0, max_scale=2.0)  # 40x80 stays 40x80, cropped to 40x40
    heights = []
    for seed in range(6):
        out = instance_sample(random_image(40, 80), [(triangle, 1, 0)], cfg, seed)
        mask = out.targets.masks[0].numpy()
        assert out.targets.boxes[0].tolist() == pytest.approx(tight_cxcywh(mask))
        heights.append(out.targets.boxes[0, 3].item())
    # the original box spans the full height, so a transformed-and-clipped box would always have h = 1
    assert min(heights) < 0.9


def test_flip_mirrors_masks_and_boxes():
    image = random_image(32, 48)
    mask = np.zeros((32, 48), bool)
    mask[4:20, 3:15] = True
    mask[4:8, 15:30] = True
    cfg = AugConfig(image_size=48, min_scale=1.0, max_scale=1.0)  # 32x48 fits 48x48 at scale 1: no resize
    plain = tight_cxcywh(mask)
    seen = set()
    for seed in range(12):
        out = instance_sample(image, [(mask, 1, 0)], cfg, seed)
        pixels = out.image[:, :32, :].permute(1, 2, 0).numpy().astype(np.uint8)
        flipped = np.array_equal(pixels, image[:, ::-1])
        assert flipped or np.array_equal(pixels, image)
        seen.add(flipped)
        got_mask = out.targets.masks[0, :32].numpy()
        cx, cy, w, h = out.targets.boxes[0].tolist()
        if flipped:
            assert np.array_equal(got_mask, mask[:, ::-1])
            assert [cx, cy * 48 / 32, w, h * 48 / 32] == pytest.approx([1 - plain[0], plain[1], plain[2], plain[3]])
        else:
            assert np.array_equal(got_mask, mask)
    assert seen == {True, False}


def test_crowd_and_instances_emptied_by_the_transform_are_dropped():
    crowd = np.zeros((40, 40), bool)
    crowd[20:40, 0:20] = True
    speck = np.zeros((40, 40), bool)
    speck[0, 0] = True  # row 0 is never sampled by a 2x nearest downscale (PIL samples rows 1, 3, ...)
    block = np.zeros((40, 40), bool)
    block[10:20, 10:20] = True
    cfg = AugConfig(image_size=40, min_scale=0.5, max_scale=0.5)
    for seed in range(3):
        out = instance_sample(random_image(40, 40), [(crowd, 1, 1), (speck, 1, 0), (block, 2, 0)], cfg, seed)
        assert out.targets.labels.tolist() == [1]
        assert out.targets.masks.shape == (1, 40, 40) and int(out.targets.masks.sum()) == 25


def test_filter_empty_drops_samples_without_non_crowd_annotations_only():
    crowd = np.zeros((40, 40), bool)
    crowd[20:40, 0:20] = True
    speck = np.zeros((40, 40), bool)
    speck[0, 0] = True
    cfg = AugConfig(image_size=40, min_scale=0.5, max_scale=0.5)
    assert instance_sample(random_image(40, 40), [(crowd, 1, 1)], cfg, 0) is None
    kept = instance_sample(random_image(40, 40), [(crowd, 1, 1)], AugConfig(image_size=40, filter_empty=False), 0)
    assert len(kept.targets) == 0 and kept.targets.masks.shape == (0, 40, 40)
    # emptied by the augmentation only: the official pipeline still trains on it (with no targets)
    emptied = instance_sample(random_image(40, 40), [(speck, 1, 0)], cfg, 0)
    assert emptied is not None and len(emptied.targets) == 0


def test_nearest_resizing_matches_pil_for_masks_and_torch_for_semantic_labels():
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 2, (3, 37, 53), dtype=np.uint8)
    g = Geometry(source=(37, 53), resized=(81, 64), crop=(7, 5, 50, 50), canvas=(64, 64), flip_source=True)
    expected = []
    for m in masks:
        resized = np.asarray(Image.fromarray(np.ascontiguousarray(m[:, ::-1])).resize((64, 81), Image.NEAREST))
        expected.append(pad_to(resized[7:57, 5:55], (64, 64), 0))
    assert np.array_equal(warp_masks(masks, g), np.stack(expected).astype(bool))
    labels = rng.integers(0, 150, (37, 53)).astype(np.uint8)
    g = Geometry(source=(37, 53), resized=(29, 90), crop=(0, 10, 29, 64), canvas=(32, 64), flip_crop=True)
    resized = F.interpolate(torch.from_numpy(labels.astype(np.float64))[None, None], size=(29, 90), mode="nearest")
    crop = resized[0, 0].numpy().astype(np.uint8)[:, 10:74][:, ::-1]
    assert np.array_equal(warp_label_map(labels, g, 255, "torch"), pad_to(crop, (32, 64), 255))


def test_image_is_flipped_then_resized_bilinear_then_cropped_as_detectron2():
    image = random_image(37, 53)
    g = Geometry(source=(37, 53), resized=(81, 64), crop=(7, 5, 50, 50), canvas=(64, 64), flip_source=True)
    flipped = Image.fromarray(np.ascontiguousarray(image[:, ::-1]))
    expected = np.asarray(flipped.resize((64, 81), Image.BILINEAR))[7:57, 5:55]
    assert np.array_equal(warp_image(image, g), expected)


# ---------------------------------------------------------------- ADE20K semantic
ADE_SMALL = AugConfig(recipe="ade_semantic", short_edges=(64, 96, 128), max_size=160, crop_size=80,
                      size_divisibility=0)


def test_ade_short_side_is_a_chosen_edge_unless_capped_and_crop_fits_crop_size(ade_data):
    _, samples = ade_data
    capped = 0
    for s in samples:
        h, w = s.image.shape[:2]
        for seed in range(8):
            g = plan_ade(h, w, ADE_SMALL, np.random.default_rng(seed))
            if max(g.resized) == 160 and min(g.resized) not in ADE_SMALL.short_edges:
                capped += 1  # the long side hit max_size, so the short side is below the chosen edge
            else:
                assert min(g.resized) in ADE_SMALL.short_edges
            assert g.crop[2] <= 80 and g.crop[3] <= 80 and g.canvas == g.crop[2:]
    assert capped > 0  # 512x683 with edge 128 -> 128x171 > 160 -> 120x160
    out = transform(ade_data, 0, ADE_SMALL, seed=1)
    assert out.image.shape[1] <= 80 and out.image.shape[2] <= 80


def test_ade_pads_image_grey_and_labels_to_size_divisibility(ade_data):
    cfg = AugConfig(recipe="ade_semantic", short_edges=(64,), max_size=1000, crop_size=80, size_divisibility=64)
    out = transform(ade_data, 0, cfg, seed=0)  # 512x683 -> 64x85 -> crop 64x80 -> padded 64x128
    assert out.image.shape == (3, 64, 128)
    assert (out.image[:, :, 80:] == 128).all() and not out.targets.masks[:, :, 80:].any()
    assert out.targets.boxes[:, 0].max() < 80 / 128  # centres normalised by the padded width


def test_ade_zero_label_is_ignored_and_one_target_per_present_class():
    labels = np.zeros((30, 40), np.uint8)
    labels[5:15, :] = 1
    labels[20:30, 10:30] = 7
    cfg = AugConfig(recipe="ade_semantic", short_edges=(30,), max_size=1000, crop_size=64, size_divisibility=0)
    for seed in range(4):  # no resize, no crop; flip and colour vary
        out = train_transform(random_image(30, 40), {}, png(labels), "semantic", "ade_label_uint8", {}, cfg,
                              np.random.default_rng(seed))
        t = out.targets
        assert t.labels.tolist() == [0, 6]
        assert int(t.masks.sum()) == int((labels > 0).sum())  # no "other" pixel in any mask
        assert int(t.masks.sum(0).max()) == 1  # one class per pixel
        assert t.boxes[0].tolist() == pytest.approx([0.5, 10 / 30, 1.0, 10 / 30])  # row band, any flip


def test_ade_real_samples_give_one_nonempty_disjoint_mask_per_class(ade_data):
    for index in range(len(ade_data[1])):
        t = transform(ade_data, index, AugConfig(recipe="ade_semantic", crop_size=128), seed=index).targets
        assert t.labels.tolist() == sorted(set(t.labels.tolist()))
        assert t.labels.min() >= 0 and t.labels.max() < 150
        assert t.masks.flatten(1).any(1).all() and int(t.masks.sum(0).max()) == 1
        assert t.masks.shape[-2:] == (512, 512)  # padded to size_divisibility 512 like the official mapper


def test_color_aug_changes_pixels_but_not_targets(ade_data):
    plain = AugConfig(recipe="ade_semantic", crop_size=128, color_aug_ssd=False)
    jittered = AugConfig(recipe="ade_semantic", crop_size=128, color_aug_ssd=True)
    changed = 0
    for seed in range(4):
        a, b = transform(ade_data, 2, plain, seed), transform(ade_data, 2, jittered, seed)
        assert torch.equal(a.targets.labels, b.targets.labels) and torch.equal(a.targets.masks, b.targets.masks)
        assert torch.equal(a.targets.boxes, b.targets.boxes)
        changed += not torch.equal(a.image, b.image)
    assert changed >= 3


def test_color_jitter_steps_follow_color_aug_ssd():
    grey = np.full((2, 64, 3), 100, np.uint8)
    assert (apply_color_jitter(grey, ColorJitter(brightness=10.7)) == 110).all()  # float add, truncated
    assert (apply_color_jitter(grey, ColorJitter(contrast=1.5)) == 150).all()
    assert (apply_color_jitter(grey, ColorJitter(brightness=200.0)) == 255).all()  # clipped
    assert (apply_color_jitter(grey, ColorJitter(saturation=1.5, hue=10)) == 100).all()  # grey has no hue
    red = np.zeros((1, 64, 3), np.uint8)
    red[..., 0] = 255
    assert apply_color_jitter(red, ColorJitter(hue=10))[0, 0].tolist() == [255, 85, 0]  # H 0 -> 10 (of 180)


def test_hsv_conversions_equal_opencv_on_golden_values():
    """Golden values from cv2.cvtColor (OpenCV 4.10 and 5.0, 64-pixel rows: the vectorised path)."""
    hsv = np.array([[[1, 90, 85], [0, 1, 255], [1, 120, 255], [1, 170, 45], [10, 255, 255], [179, 200, 100],
                     [90, 0, 77], [45, 128, 200]]], np.uint8)
    assert hsv_to_bgr(hsv).tolist() == [[[55, 56, 85], [254, 254, 255], [134, 138, 255], [14, 16, 45],
                                         [0, 85, 255], [24, 21, 100], [77, 77, 77], [99, 200, 149]]]
    bgr = np.array([[[0, 0, 255], [255, 0, 0], [12, 200, 7], [100, 100, 100], [3, 2, 1], [200, 10, 250],
                     [0, 1, 0], [90, 180, 45]]], np.uint8)
    assert bgr_to_hsv(bgr).tolist() == [[[0, 255, 255], [120, 255, 255], [61, 246, 200], [0, 0, 100],
                                         [105, 170, 3], [156, 245, 250], [60, 255, 1], [70, 191, 180]]]


# ---------------------------------------------------------------- panoptic
def test_panoptic_targets_without_augmentation_are_one_per_non_crowd_segment(panoptic_data):
    manifest, samples = panoptic_data
    ids = rgb2id(np.asarray(Image.open(io.BytesIO(samples[0].label_png)).convert("RGB")))
    segments = [s for s in samples[0].meta["segments"] if not s["iscrowd"]]
    assert len(segments) < len(samples[0].meta["segments"])  # the sample has a crowd segment
    t = transform(panoptic_data, 0, AugConfig(recipe="none"), seed=0).targets
    contiguous = manifest.contiguous_ids()
    assert t.labels.tolist() == [contiguous[s["category_id"]] for s in segments]
    for mask, box, s in zip(t.masks, t.boxes, segments):
        assert np.array_equal(mask.numpy(), ids == s["id"])
        assert box.tolist() == pytest.approx(tight_cxcywh(ids == s["id"]))


def test_panoptic_segments_cropped_out_are_kept_empty_or_dropped(panoptic_data):
    keep = AugConfig(image_size=128, min_scale=2.0, max_scale=2.0, keep_cropped_segments=True)
    drop = AugConfig(image_size=128, min_scale=2.0, max_scale=2.0, keep_cropped_segments=False)
    n_segments = sum(not s["iscrowd"] for s in panoptic_data[1][1].meta["segments"])
    dropped_any = False
    for seed in range(3):
        kept, dropped = transform(panoptic_data, 1, keep, seed).targets, transform(panoptic_data, 1, drop, seed).targets
        present = kept.masks.flatten(1).any(1)
        assert len(kept) == n_segments
        assert (kept.boxes[~present] == 0).all()  # official: empty mask -> zero box
        assert torch.equal(dropped.masks, kept.masks[present]) and torch.equal(dropped.labels, kept.labels[present])
        assert int(kept.masks.sum(0).max()) <= 1  # segments never overlap
        dropped_any |= len(dropped) < len(kept)
    assert dropped_any


# ---------------------------------------------------------------- detection (Objects365)
def test_detection_boxes_are_flipped_and_scaled_on_a_hand_example():
    meta = {"annotations": [
        {"category_id": 1, "iscrowd": 0, "bbox": [4.0, 2.0, 10.0, 8.0]},
        {"category_id": 2, "iscrowd": 1, "bbox": [0.0, 0.0, 20.0, 20.0]},  # crowd: dropped
        {"category_id": 2, "iscrowd": 0, "bbox": [5.0, 5.0, 5.0, 9.0]},  # zero width: dropped
    ]}
    cfg = AugConfig(recipe="resize", short_edges=(40,), max_size=1000)  # 20x40 -> 40x80 (x2)
    plain = [14 / 80, 10 / 40, 12 / 80, 12 / 40]  # [8, 4, 20, 16]
    mirrored = [66 / 80, 10 / 40, 12 / 80, 12 / 40]  # x -> 40 - x, then x2: [60, 4, 72, 16]
    seen = set()
    for seed in range(10):
        out = train_transform(random_image(20, 40), meta, None, "detection", None, CONTIGUOUS, cfg,
                              np.random.default_rng(seed))
        assert out.image.shape == (3, 40, 80) and out.targets.masks is None
        assert out.targets.labels.tolist() == [0]
        box = out.targets.boxes[0].tolist()
        seen.add(box == pytest.approx(mirrored))
        assert box == pytest.approx(mirrored) or box == pytest.approx(plain)
    assert seen == {True, False}


def test_detection_boxes_are_clipped_to_the_crop_and_degenerate_ones_dropped():
    g = Geometry(source=(20, 40), resized=(40, 80), crop=(0, 20, 40, 40), canvas=(40, 40), flip_source=True)
    boxes = warp_boxes(np.array([[4, 2, 10, 8], [20, 0, 30, 10]], dtype=float), g)
    # flip: [30, 2, 36, 8] / [10, 0, 20, 10]; x2: [60, 4, 72, 16] / [20, 0, 40, 20]; shift -20; clip to 40
    assert boxes.tolist() == [[40, 4, 40, 16], [0, 0, 20, 20]]
    t = detection_targets(boxes, [0, 1], 40, 40)
    assert t.labels.tolist() == [1] and t.boxes.tolist() == [[0.25, 0.25, 0.5, 0.5]] and t.masks is None


# ---------------------------------------------------------------- into the model
def test_collated_lsj_samples_feed_maskdino_losses(instance_data):
    from model.maskdino import MaskDINO
    from pipeline.model_tools import load_model_config

    cfg = AugConfig(image_size=64)
    samples = [transform(instance_data, i, cfg, seed=i) for i in range(2)]
    images, targets = collate(samples)
    assert [tuple(i.shape) for i in images] == [(3, 64, 64)] * 2 and targets[1] is samples[1].targets
    torch.manual_seed(0)
    model = MaskDINO(load_model_config("configs/model/tiny_instance.yaml", ["num_classes=133"])).train()
    losses = model.losses(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
