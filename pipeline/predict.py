"""`maskdino predict IMAGE... --model ...`: run a model on images and draw what it found as PNGs.

One picture per image and result kind the model produces: `<stem>.instances.png` (masks, boxes, class
names and scores), `<stem>.panoptic.png`, `<stem>.semantic.png`. Images and the output folder may be
local or s3://.
"""
from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from core.shard_sample import decode_image
from core.storage import Storage, join
from model.structures import ImageResult
from pipeline.drawing import draw_instances, draw_panoptic, draw_semantic, png_bytes
from pipeline.evaluate import model_predictor
from pipeline.model_bundle import ModelBundle, build_bundle_model

KINDS = ("instances", "panoptic", "semantic")


class PredictInputError(ValueError):
    """An image that cannot be read or a picture kind that does not exist; the message names it."""


@dataclass(frozen=True)
class PredictSettings:
    output: str
    score_threshold: float = 0.5
    min_size: int = 800  # test-time short side (0 = keep the image size)
    max_size: int = 1333
    kinds: tuple[str, ...] = KINDS
    device: str = "cpu"
    progress: bool = True


def read_image(storage: Storage, uri: str) -> np.ndarray:
    """[H, W, 3] uint8 RGB, EXIF orientation applied (as detectron2 reads images)."""
    data = storage.read_bytes(uri)
    try:
        return decode_image(data)
    except UnidentifiedImageError as exc:
        # PIL names the in-memory buffer (`<_io.BytesIO object at 0x...>`), not the file: say which file.
        raise PredictInputError(f"cannot read image {uri}: not an image format PIL knows (JPEG, PNG, ...); "
                                "pass image files") from exc
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise PredictInputError(f"cannot read image {uri}: {exc}; pass an intact image file") from exc


def draw_result(image: np.ndarray, result: ImageResult, class_names: Sequence[str],
                settings: PredictSettings) -> dict[str, np.ndarray]:
    """Pictures by kind, for the kinds the result has and the settings ask for."""
    pictures = {}
    if "instances" in settings.kinds and result.instances is not None:
        pictures["instances"] = draw_instances(image, result.instances, class_names, settings.score_threshold)
    if "panoptic" in settings.kinds and result.panoptic is not None:
        pictures["panoptic"] = draw_panoptic(image, result.panoptic, class_names)
    if "semantic" in settings.kinds and result.semantic is not None:
        pictures["semantic"] = draw_semantic(image, result.semantic.labels.cpu().numpy(), class_names)
    return pictures


def predict_images(bundle: ModelBundle, images: Sequence[str], storage: Storage,
                   settings: PredictSettings) -> list[str]:
    """Predict each image (one at a time: sizes differ) and write its pictures; returns the written URIs."""
    unknown = sorted(set(settings.kinds) - set(KINDS))
    if unknown:
        raise PredictInputError(f"unknown picture kinds {unknown}; choose from {', '.join(KINDS)}")
    model = build_bundle_model(bundle, storage, settings.device)
    predict = model_predictor(model, settings.min_size, settings.max_size)
    names = bundle.class_names()
    written = []
    for uri in tqdm(images, unit="images", desc="predict", disable=None if settings.progress else True):
        image = read_image(storage, uri)
        result = predict([image])[0]
        stem = posixpath.splitext(posixpath.basename(uri))[0]
        for kind, picture in draw_result(image, result, names, settings).items():
            out = join(settings.output, f"{stem}.{kind}.png")
            storage.write_bytes(out, png_bytes(picture))
            written.append(out)
    return written
