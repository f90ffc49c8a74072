"""Mask2Former's ColorAugSSDTransform (ADE20K training), without OpenCV: brightness, contrast,
saturation and hue jitter, with OpenCV's uint8 HSV conversions reproduced bit for bit (the golden values
are in tests/test_transforms.py). Random draws come from the generator the caller passes in."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# ------------------------------------------------------------------------------------- colour (SSD)
@dataclass(frozen=True)
class ColorJitter:
    """One draw of Mask2Former's ColorAugSSDTransform (detectron2 PointRend color_augmentation.py).
    None = that step skipped (each is applied with probability 1/2)."""

    brightness: float | None = None  # beta added, U(-32, 32)
    contrast_first: bool = True  # contrast before saturation and hue, or after them
    contrast: float | None = None  # alpha, U(0.5, 1.5)
    saturation: float | None = None  # alpha on the HSV S channel, U(0.5, 1.5)
    hue: int | None = None  # shift of the OpenCV hue (0..179), randint(-18, 18)


def sample_color_jitter(rng: np.random.Generator) -> ColorJitter:
    def maybe(draw):
        return draw() if rng.integers(2) else None

    return ColorJitter(
        brightness=maybe(lambda: float(rng.uniform(-32, 32))),
        contrast_first=bool(rng.integers(2)),
        contrast=maybe(lambda: float(rng.uniform(0.5, 1.5))),
        saturation=maybe(lambda: float(rng.uniform(0.5, 1.5))),
        hue=maybe(lambda: int(rng.integers(-18, 19))),
    )


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # float32 arithmetic, clip, truncate to uint8: ColorAugSSDTransform.convert
    return np.clip(img.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)


def apply_color_jitter(image: np.ndarray, jitter: ColorJitter) -> np.ndarray:
    """[H, W, 3] uint8 RGB -> jittered uint8 RGB. The official transform swaps to BGR (img_format RGB)
    and uses OpenCV's uint8 HSV conversion; we reproduce both without OpenCV."""
    img = np.ascontiguousarray(image[:, :, ::-1])
    if jitter.brightness is not None:
        img = _convert(img, beta=jitter.brightness)
    if jitter.contrast_first:
        img = _saturation_hue(_contrast(img, jitter), jitter)
    else:
        img = _contrast(_saturation_hue(img, jitter), jitter)
    return np.ascontiguousarray(img[:, :, ::-1])


def _contrast(img: np.ndarray, jitter: ColorJitter) -> np.ndarray:
    return img if jitter.contrast is None else _convert(img, alpha=jitter.contrast)


def _saturation_hue(img: np.ndarray, jitter: ColorJitter) -> np.ndarray:
    # Two separate BGR->HSV->BGR round trips, as the official code (the uint8 round trip is lossy).
    if jitter.saturation is not None:
        hsv = bgr_to_hsv(img)
        hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=jitter.saturation)
        img = hsv_to_bgr(hsv)
    if jitter.hue is not None:
        hsv = bgr_to_hsv(img)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int64) + jitter.hue) % 180
        img = hsv_to_bgr(hsv)
    return img


_HSV_SHIFT = 12
_DIVISORS = np.arange(1, 256, dtype=np.float64)
# OpenCV RGB2HSV_b tables: saturate_cast<int> rounds half to even, as np.rint
_SDIV = np.concatenate([[0], np.rint((255 << _HSV_SHIFT) / _DIVISORS)]).astype(np.int64)
_HDIV = np.concatenate([[0], np.rint((180 << _HSV_SHIFT) / (6.0 * _DIVISORS))]).astype(np.int64)
_HSV_SECTORS = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])


def bgr_to_hsv(img: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(img, COLOR_BGR2HSV) for uint8 [H, W, 3] (H in 0..179): OpenCV's fixed-point RGB2HSV_b.
    Equal to OpenCV 4.10 / 5.0 on all 2^24 colours."""
    b, g, r = (img[..., k].astype(np.int64) for k in range(3))
    v = np.maximum(np.maximum(b, g), r)
    diff = v - np.minimum(np.minimum(b, g), r)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + half) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


def hsv_to_bgr(img: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(img, COLOR_HSV2BGR) for uint8 [H, W, 3]: OpenCV's HSV2RGB_b vector path (float32 maths,
    fused multiply-adds in its AVX2/AVX-512 builds, truncation to uint8). Equal to OpenCV 4.10 / 5.0 on all
    180*256*256 inputs except the last (width mod 32 or 64) pixels of each row, which OpenCV's scalar tail
    rounds instead of truncating (off by at most 1)."""
    one = np.float32(1)
    h = img[..., 0].astype(np.float32) * np.float32(6.0 / 180)
    s = img[..., 1].astype(np.float32) * np.float32(1.0 / 255)
    v = img[..., 2].astype(np.float32) * np.float32(1.0 / 255)
    sector = np.floor(h)
    h = h - sector

    def one_minus(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # 1 - a*b rounded once (fused)
        return (1.0 - a.astype(np.float64) * b.astype(np.float64)).astype(np.float32)

    table = np.stack([v, v * (one - s), v * one_minus(s, h), v * one_minus(s, one - h)], axis=-1)
    bgr = np.take_along_axis(table, _HSV_SECTORS[sector.astype(np.int64) % 6], axis=-1)
    return np.clip(np.trunc(bgr * np.float32(255)), 0, 255).astype(np.uint8)


