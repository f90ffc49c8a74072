"""Pictures of predictions on a real COCO image: masks, contours, boxes and labels land where they should,
in the right colours, and nothing else in the image changes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.structures import InstanceResult, PanopticResult, PanopticSegment
from pipeline.drawing import (
    color_for,
    draw_instances,
    draw_panoptic,
    draw_semantic,
    save_png,
)

IMAGE_PATH = (Path(__file__).parent / "fixtures" / "transformers-fixtures" / "tests" / "fixtures"
              / "tests_samples" / "COCO" / "000000039769.png")
NAMES = [f"name{i}" for i in range(15)] + ["cat"]  # class 15 = "cat"
BLACK, WHITE = (0, 0, 0), (255, 255, 255)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    pixels = np.array(Image.open(IMAGE_PATH).convert("RGB"))
    assert pixels.shape == (480, 640, 3)
    return pixels


@pytest.fixture(scope="module")
def shapes() -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[:480, :640]
    low = np.zeros((480, 640), dtype=bool)
    low[430:470, 400:600] = True
    return {
        "left": (xx - 170) ** 2 / 120**2 + (yy - 240) ** 2 / 180**2 < 1,  # the left cat, box 50..290 x 60..420
        "right": (xx - 460) ** 2 / 130**2 + (yy - 200) ** 2 / 150**2 < 1,  # the right cat, 330..590 x 50..350
        "low": low,  # a low-score instance in an otherwise untouched corner
        "band": yy >= 420,
    }


@pytest.fixture(scope="module")
def instances(shapes) -> InstanceResult:
    return InstanceResult(
        scores=torch.tensor([0.87, 0.3, 0.9]),
        classes=torch.tensor([15, 2, 15]),
        # the right cat's box runs off the image on the right (x1 = 700 > 639): clipped when drawn
        boxes=torch.tensor([[330.0, 50.0, 700.0, 350.0], [400.0, 430.0, 600.0, 470.0], [50.0, 60.0, 290.0, 420.0]]),
        masks=torch.from_numpy(np.stack([shapes["right"], shapes["low"], shapes["left"]])),
        query_index=torch.tensor([4, 7, 1]),
    )


def changed(out: np.ndarray, image: np.ndarray) -> np.ndarray:
    return (out != image).any(axis=-1)


def has_color(pixels: np.ndarray, color: tuple[int, int, int]) -> bool:
    return bool((pixels.reshape(-1, 3) == color).all(axis=1).any())


def blended(image: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return np.rint(image.astype(np.float32) * 0.5 + np.array(color, np.float32) * 0.5)


def box_region(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    region = np.zeros((480, 640), dtype=bool)
    region[y0:y1 + 1, x0:x1 + 1] = True
    return region


# --- instances ---------------------------------------------------------------------------------------


def test_instances_keep_shape_dtype_and_input(image, instances):
    before = image.copy()
    out = draw_instances(image, instances, NAMES)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(image, before)


def test_instances_change_pixels_inside_masks(image, instances, shapes):
    out = draw_instances(image, instances, NAMES)
    for name in ("left", "right"):
        assert changed(out, image)[shapes[name]].mean() > 0.99


def test_instances_leave_pixels_outside_masks_boxes_labels_unchanged(image, instances, shapes):
    out = draw_instances(image, instances, NAMES)
    # Boxes as clipped; labels sit at each box's top-left corner, well within 150 x 30 px.
    allowed = (shapes["left"] | shapes["right"] | box_region(50, 60, 290, 420) | box_region(330, 50, 639, 350)
               | box_region(50, 60, 200, 90) | box_region(330, 50, 480, 80))
    assert changed(out, image)[allowed].any()
    assert not changed(out, image)[~allowed].any()


def test_instance_box_outline_has_instance_colour(image, instances):
    out = draw_instances(image, instances, NAMES)
    best, second = color_for(0), color_for(1)  # colours follow score rank: 0.9 (left), 0.87 (right)
    assert tuple(out[420, 60]) == best  # bottom edge of the left box, outside its mask
    assert tuple(out[300, 50]) == best  # left edge
    assert tuple(out[340, 639]) == second  # right edge of the right box, clipped to the last column
    assert tuple(out[50, 600]) == second  # top edge


def test_instance_contour_has_instance_colour(image, instances, shapes):
    out = draw_instances(image, instances, NAMES)
    top_of_left_mask = np.nonzero(shapes["left"][:, 170])[0].min()
    assert tuple(out[top_of_left_mask, 170]) == color_for(0)
    # the mask interior is a half/half blend of image and colour
    np.testing.assert_allclose(out[240, 170], blended(image, color_for(0))[240, 170], atol=1)


def test_instance_label_has_text_on_filled_background(image, instances):
    out = draw_instances(image, instances, NAMES)
    for (x0, y0), rank in (((50, 60), 0), ((330, 50), 1)):
        label = out[y0:y0 + 12, x0:x0 + 30]  # start of "cat 90%" / "cat 87%"
        assert has_color(label, color_for(rank))  # background box
        assert has_color(label, BLACK) or has_color(label, WHITE)  # the text


def test_instances_below_threshold_not_drawn(image, instances, shapes):
    low_box = box_region(400, 430, 600, 470)
    out = draw_instances(image, instances, NAMES)
    assert not changed(out, image)[low_box].any()
    out_low = draw_instances(image, instances, NAMES, score_threshold=0.2)
    assert changed(out_low, image)[shapes["low"]].mean() > 0.99


def test_max_instances_keeps_the_best(image, instances, shapes):
    out = draw_instances(image, instances, NAMES, max_instances=1)
    assert changed(out, image)[shapes["left"]].mean() > 0.99
    assert not changed(out, image)[shapes["right"] & ~box_region(50, 60, 290, 420)].any()


def test_empty_instances_return_image_unchanged(image, instances):
    empty = InstanceResult(torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, 4),
                           torch.zeros(0, 480, 640, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    for result in (empty, instances):
        out = draw_instances(image, result, NAMES, score_threshold=0.95)
        np.testing.assert_array_equal(out, image)
        assert out is not image


def test_unknown_class_index_is_drawn(image, instances):
    unknown = InstanceResult(instances.scores, torch.tensor([99, 99, 99]), instances.boxes, instances.masks,
                             instances.query_index)
    out = draw_instances(image, unknown, NAMES)  # labelled "class 99"
    assert has_color(out[60:72, 50:80], BLACK) or has_color(out[60:72, 50:80], WHITE)


def test_mask_size_mismatch_is_rejected(image, instances):
    small = InstanceResult(instances.scores, instances.classes, instances.boxes, instances.masks[:, :10],
                           instances.query_index)
    with pytest.raises(ValueError, match="do not match the image size"):
        draw_instances(image, small, NAMES)


# --- panoptic ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def panoptic(shapes) -> PanopticResult:
    segment_map = np.zeros((480, 640), dtype=np.int32)
    segment_map[shapes["left"]] = 1
    segment_map[shapes["right"]] = 3
    segment_map[shapes["band"]] = 2
    segment_map[300:305, 620:625] = 4  # 25 px: too small for a label
    return PanopticResult(torch.from_numpy(segment_map), [
        PanopticSegment(1, 15, True), PanopticSegment(2, 3, False), PanopticSegment(3, 15, True),
        PanopticSegment(4, 2, True)])


def test_panoptic_colours_segments_and_leaves_void(image, panoptic):
    segment_map = panoptic.segment_map.numpy()
    out = draw_panoptic(image, panoptic, NAMES)
    assert out.shape == image.shape and out.dtype == np.uint8
    for segment_id in (1, 2, 3, 4):
        assert changed(out, image)[segment_map == segment_id].mean() > 0.99
    # void stays untouched: labels sit inside their segments, the tiny segment has none
    assert not changed(out, image)[segment_map == 0].any()


def test_panoptic_stuff_in_class_colour_things_per_segment(image, panoptic, shapes):
    out = draw_panoptic(image, panoptic, NAMES)
    np.testing.assert_allclose(out[460, 100], blended(image, color_for(3))[460, 100], atol=1)  # stuff class 3
    top_left = np.nonzero(shapes["left"][:, 170])[0].min()
    top_right = np.nonzero(shapes["right"][:, 460])[0].min()
    # boundaries in the segment colour; two segments of one thing class get different colours
    assert tuple(out[top_left, 170]) != tuple(out[top_right, 460])
    boundary_color = out[top_left, 170].astype(np.float32)
    np.testing.assert_allclose(out[150, 170], np.rint(image[150, 170] * 0.5 + boundary_color * 0.5), atol=1)


def test_panoptic_labels_at_segment_interior(image, panoptic):
    out = draw_panoptic(image, panoptic, NAMES)
    for x, y in ((170, 240), (460, 200), (320, 450)):  # centres of the two ellipses and of the band
        region = out[y - 6:y + 6, x - 12:x + 12]
        assert has_color(region, BLACK) or has_color(region, WHITE)


def test_panoptic_empty_and_unknown_segments(image, panoptic):
    empty = PanopticResult(torch.zeros(480, 640, dtype=torch.int32), [])
    np.testing.assert_array_equal(draw_panoptic(image, empty, NAMES), image)
    with pytest.raises(ValueError, match=r"segment ids \[4\]"):
        draw_panoptic(image, PanopticResult(panoptic.segment_map, panoptic.segments[:3]), NAMES)


# --- semantic ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def semantic_labels(shapes) -> np.ndarray:
    labels = np.full((480, 640), 255, dtype=np.int64)
    labels[shapes["left"]] = 15
    labels[shapes["right"]] = 4
    labels[shapes["band"]] = 3
    labels[0:40, 300:330] = 3  # a second, smaller region of class 3: no label there
    return labels


def test_semantic_colours_per_class_and_leaves_ignore(image, semantic_labels):
    out = draw_semantic(image, torch.from_numpy(semantic_labels), NAMES)
    assert out.shape == image.shape and out.dtype == np.uint8
    for cls, (y, x) in ((15, (100, 170)), (4, (100, 460)), (3, (20, 315)), (3, (460, 100))):
        np.testing.assert_allclose(out[y, x], blended(image, color_for(cls))[y, x], atol=1)
    assert not changed(out, image)[semantic_labels == 255].any()


def test_semantic_label_on_largest_region_only(image, semantic_labels):
    out = draw_semantic(image, semantic_labels, NAMES)
    band_centre = out[444:456, 308:332]
    small_region = out[0:40, 300:330]
    assert has_color(band_centre, BLACK) or has_color(band_centre, WHITE)
    assert not (has_color(small_region, BLACK) or has_color(small_region, WHITE))


def test_semantic_all_ignored_and_unknown_class(image, semantic_labels):
    np.testing.assert_array_equal(draw_semantic(image, np.full((480, 640), 255), NAMES), image)
    unknown = np.where(semantic_labels == 15, 200, semantic_labels)  # labelled "class 200"
    out = draw_semantic(image, unknown, NAMES)
    np.testing.assert_allclose(out[100, 170], blended(image, color_for(200))[100, 170], atol=1)


# --- colours and files -------------------------------------------------------------------------------


def test_color_for_is_deterministic_distinct_and_bright():
    colors = [color_for(i) for i in range(150)]
    assert colors == [color_for(i) for i in range(150)]
    assert len(set(colors)) == 150
    assert all(max(c) >= 200 for c in colors)
    # consecutive indices are far apart
    assert min(sum(abs(a - b) for a, b in zip(colors[i], colors[i + 1])) for i in range(149)) > 60


def test_save_png_round_trips(tmp_path, image, instances):
    out = draw_instances(image, instances, NAMES)
    path = tmp_path / "nested" / "drawn.png"
    save_png(out, str(path))
    np.testing.assert_array_equal(np.array(Image.open(path)), out)
    with pytest.raises(ValueError, match="uint8"):
        save_png(out.astype(np.float32), str(path))
