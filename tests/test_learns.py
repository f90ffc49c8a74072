"""It learns: the tiny model, trained on CPU on six synthetic images, segments them (pycocotools mask AP)."""

from __future__ import annotations

import pytest
import torch

from model.maskdino import MaskDINO
from pipeline.model_tools import load_model_config
from tests.learning_helpers import coco_mask_ap, make_shapes_dataset, train_steps


@pytest.mark.slow
def test_tiny_model_reaches_mask_ap_half_on_its_training_images():
    torch.manual_seed(0)
    data = make_shapes_dataset(6, size=128, seed=0)
    model = MaskDINO(load_model_config("configs/model/tiny_instance.yaml", ["num_classes=2"]))
    untrained_ap = coco_mask_ap(data, model.eval().predict([image for image, _ in data]))
    history = train_steps(model, data, steps=300, lr=4e-4)
    trained_ap = coco_mask_ap(data, model.eval().predict([image for image, _ in data]))
    print(f"mask AP untrained {untrained_ap:.3f} -> trained {trained_ap:.3f}; "
          f"loss {history[0]:.1f} -> {sum(history[-20:]) / 20:.1f}")
    assert trained_ap >= 0.5
    assert trained_ap > untrained_ap + 0.3
    assert sum(history[-20:]) / 20 < history[0] / 5
