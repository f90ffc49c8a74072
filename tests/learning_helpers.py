"""A tiny synthetic instance-segmentation set and a CPU training loop used by the "it learns" test and
the model benchmark: coloured rectangles (class 0) and ellipses (class 1) on a noisy background."""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from model.box_ops import bitmask_boxes, box_xyxy_to_cxcywh
from model.structures import Targets


def make_shapes_dataset(n_images: int, size: int = 128, seed: int = 0) -> list[tuple[torch.Tensor, Targets]]:
    """n images [3, size, size] (0..255) with 1-3 non-overlapping objects each, and their targets."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    data = []
    for _ in range(n_images):
        image = rng.normal(110, 20, (size, size, 3))
        masks, labels = [], []
        occupied = np.zeros((size, size), bool)
        for _ in range(int(rng.integers(1, 4))):
            for _attempt in range(20):
                h, w = rng.integers(size // 5, size // 2, 2)
                y0, x0 = rng.integers(0, size - h), rng.integers(0, size - w)
                label = int(rng.integers(0, 2))
                if label == 0:
                    m = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
                else:
                    cy, cx = y0 + h / 2, x0 + w / 2
                    m = ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1
                if not (m & occupied).any():
                    break
            else:
                continue
            occupied |= m
            image[m] = (230, 60, 40) if label == 0 else (40, 90, 230)
            masks.append(m)
            labels.append(label)
        masks_t = torch.from_numpy(np.stack(masks))
        boxes = box_xyxy_to_cxcywh(bitmask_boxes(masks_t)) / size
        image_t = torch.from_numpy(image.clip(0, 255).transpose(2, 0, 1).astype(np.float32))
        data.append((image_t, Targets(torch.tensor(labels), boxes, masks_t)))
    return data


def coco_mask_ap(data: list[tuple[torch.Tensor, Targets]], results: list) -> float:
    """Mask AP (pycocotools COCOeval, iouType segm) of instance results on the dataset itself."""
    images, annotations, detections = [], [], []
    for image_id, ((image, target), result) in enumerate(zip(data, results), start=1):
        h, w = image.shape[-2:]
        images.append({"id": image_id, "height": int(h), "width": int(w)})
        for label, m in zip(target.labels.tolist(), target.masks.numpy()):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                                "area": float(m.sum()), "bbox": list(mask_utils.toBbox(rle)), "iscrowd": 0})
        inst = result.instances
        for score, label, m in zip(inst.scores.tolist(), inst.classes.tolist(), inst.masks.numpy()):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            detections.append({"image_id": image_id, "category_id": label + 1, "score": score,
                               "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}]}
    gt.createIndex()
    if not detections:
        return 0.0
    evaluator = COCOeval(gt, gt.loadRes(detections), iouType="segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return float(evaluator.stats[0])


def train_steps(model: torch.nn.Module, data: list[tuple[torch.Tensor, Targets]], steps: int, lr: float = 4e-4,
                batch_size: int = 2, seed: int = 0, log_every: int = 0) -> list[float]:
    """Plain AdamW training on CPU; returns the total loss of every step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    model.train()
    history = []
    for step in range(steps):
        idx = torch.randperm(len(data), generator=generator)[:batch_size].tolist()
        losses = model([data[i][0] for i in idx], [data[i][1] for i in idx])
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append(float(total.detach()))
        if log_every and step % log_every == 0:
            print(f"step {step} loss {float(total):.2f}", flush=True)
    return history
