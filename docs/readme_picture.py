"""Make the README's `maskdino predict` picture: the tiny model trained for a minute on CPU on the
synthetic shapes set (as tests/test_learns.py does), saved as a model bundle, then `maskdino predict`
on one of its six training images (six images teach it those, not shapes in general). Run from the repository root: `.venv/bin/python docs/readme_picture.py`."""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.records import Category
from core.storage import Storage
from model.maskdino import MaskDINO
from cli import main
from pipeline.model_bundle import save_bundle
from pipeline.model_tools import load_model_config
from tests.learning_helpers import make_shapes_dataset, train_steps

OUT = ROOT / "docs" / "images" / "predict_shapes.png"


def main_picture(steps: int = 300) -> None:
    torch.manual_seed(0)
    data = make_shapes_dataset(6, size=128, seed=0)
    cfg = load_model_config(str(ROOT / "configs/model/tiny_instance.yaml"), ["num_classes=2"])
    model = MaskDINO(cfg)
    train_steps(model, data, steps=steps, lr=4e-4)
    work = Path(tempfile.mkdtemp(prefix="readme-picture-"))
    try:
        categories = [Category(1, "rectangle", True), Category(2, "ellipse", True)]
        save_bundle(Storage(), str(work / "bundle"), cfg, model.state_dict(), categories)
        shown = data[1][0]
        image = Image.fromarray(shown.permute(1, 2, 0).numpy().astype(np.uint8)).resize((384, 384), Image.NEAREST)
        image.save(work / "shapes.png")
        code = main(["predict", str(work / "shapes.png"), "--model", str(work / "bundle"), "--output",
                     str(work / "out"), "--kinds", "instances", "--min-size", "128", "--max-size", "128",
                     "--score-threshold", "0.3"])
        if code != 0:
            raise SystemExit(code)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(work / "out" / "shapes.instances.png", OUT)
        print(f"wrote {OUT}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main_picture()
