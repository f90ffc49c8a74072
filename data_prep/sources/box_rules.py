"""The box rule, shared by every source (documented in README "Validation rules").

A box is `[x, y, w, h]` in absolute pixels. It is rejected as `degenerate_box` when any value is
not finite or when w <= 0 or h <= 0; otherwise it is clipped to the image `[0, W] x [0, H]`, and
rejected as `box_outside_image` when nothing of positive area remains. A box that was partly outside
is kept, clipped, and counted in the manifest (`boxes_clipped`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BoxCheck:
    """Result for N boxes. clipped: (N, 4) xywh; degenerate, outside, was_clipped: (N,) bool."""

    clipped: np.ndarray
    degenerate: np.ndarray
    outside: np.ndarray
    was_clipped: np.ndarray


def check_boxes(xywh: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> BoxCheck:
    """xywh: (N, 4) float64; widths, heights: (N,) image size per box."""
    xywh = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(xywh).all(axis=1)
        degenerate = ~finite | (xywh[:, 2] <= 0) | (xywh[:, 3] <= 0)
        x1 = np.clip(xywh[:, 0], 0, widths)
        y1 = np.clip(xywh[:, 1], 0, heights)
        x2 = np.clip(xywh[:, 0] + xywh[:, 2], 0, widths)
        y2 = np.clip(xywh[:, 1] + xywh[:, 3], 0, heights)
        clipped = np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)
        outside = ~degenerate & ((clipped[:, 2] <= 0) | (clipped[:, 3] <= 0))
        was_clipped = ~degenerate & ~outside & np.any(clipped != xywh, axis=1)
    return BoxCheck(clipped=clipped, degenerate=degenerate, outside=outside, was_clipped=was_clipped)


def box_text(xywh: np.ndarray | tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in xywh) + "]"
