"""Image transforms. Test time: detectron2's ResizeShortestEdge (COCO 800/1333, ADE20K 512/2048)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def shortest_edge_size(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """(new_h, new_w) as detectron2's ResizeShortestEdge.get_output_shape: scale the short side to
    `short`, then shrink so the long side is at most `max_size`, rounding half up."""
    scale = short / min(height, width)
    new_h, new_w = (short, scale * width) if height < width else (scale * height, short)
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_for_test(image: np.ndarray, short: int, max_size: int) -> np.ndarray:
    """[H, W, 3] uint8 -> resized [h, w, 3] uint8 (PIL bilinear, as detectron2 for uint8 images).
    short <= 0 keeps the image as it is."""
    if short <= 0:
        return image
    h, w = shortest_edge_size(image.shape[0], image.shape[1], short, max_size)
    if (h, w) == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def image_tensor(image: np.ndarray) -> Tensor:
    """[H, W, 3] uint8 RGB -> [3, H, W] float32 in 0..255, what MaskDINO.preprocess takes."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
