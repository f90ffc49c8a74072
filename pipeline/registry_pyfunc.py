"""The MLflow pyfunc of a registered bundle, as an MLflow "model from code" script.

MLflow copies this file into the logged model and executes it on ``mlflow.pyfunc.load_model``;
nothing is pickled. The model's artifacts are the bundle's own files (config.yaml,
model.safetensors, categories.json), loaded with our code (``open_bundle`` + ``build_bundle_model``),
so the ``maskdino-pipeline`` package must be installed where the model is loaded.

``predict`` takes a list of images, each ``[H, W, 3]`` uint8 RGB (a single array is taken as one
image), and returns one dict per image with whatever the model's tasks produce:
- ``boxes`` [N, 4] float32 xyxy pixels, ``scores`` [N] float32, ``classes`` [N] int64 contiguous ids,
  ``category_ids`` [N] dataset category ids, ``labels`` [N] class names (instance/detection models);
- ``semantic`` [H, W] int64 contiguous class per pixel (semantic models);
- ``panoptic`` [H, W] int32 segment ids and ``segments`` [{id, category_id, isthing}] (panoptic models).
Test-time resizing comes from the model config (``min_size``, ``max_size``; default 800 / 1333).
"""
from __future__ import annotations

import os
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

from core.storage import Storage
from pipeline.evaluate import model_predictor
from pipeline.model_bundle import build_bundle_model, open_bundle


class BundlePyfunc(PythonModel):
    """Loads the bundle from the model's artifacts and runs it on CPU."""

    def load_context(self, context) -> None:
        folder = os.path.dirname(context.artifacts["config"])
        storage = Storage()
        self.bundle = open_bundle(storage, model=folder)
        settings = context.model_config or {}
        model = build_bundle_model(self.bundle, storage, settings.get("device", "cpu"))
        self._predict = model_predictor(model, int(settings.get("min_size", 800)), int(settings.get("max_size", 1333)))

    def predict(self, context, model_input, params=None) -> list[dict[str, Any]]:
        images = [model_input] if isinstance(model_input, np.ndarray) else list(model_input)
        for image in images:
            if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
                raise ValueError("predict takes a list of [H, W, 3] uint8 RGB arrays")
        return [self._as_dict(result) for result in self._predict([np.asarray(im, np.uint8) for im in images])]

    def _as_dict(self, result) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if result.instances is not None:
            classes = result.instances.classes.cpu().numpy().astype(np.int64)
            ids, names = self.bundle.dataset_category_ids(), self.bundle.class_names()
            out.update(boxes=result.instances.boxes.cpu().numpy().astype(np.float32),
                       scores=result.instances.scores.cpu().numpy().astype(np.float32), classes=classes,
                       category_ids=np.asarray([ids[c] for c in classes], np.int64),
                       labels=[names[c] for c in classes])
        if result.semantic is not None:
            out["semantic"] = result.semantic.labels.cpu().numpy().astype(np.int64)
        if result.panoptic is not None:
            out["panoptic"] = result.panoptic.segment_map.cpu().numpy().astype(np.int32)
            out["segments"] = [vars(s).copy() for s in result.panoptic.segments]
        return out


mlflow.models.set_model(BundlePyfunc())
