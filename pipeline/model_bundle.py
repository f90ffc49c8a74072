"""A trained model as files, the unit that evaluation, prediction and the registry pass around.

A bundle is a folder (local path or s3:// prefix) holding:
- `config.yaml`      the resolved model config (loads with `load_model_config`);
- `model.safetensors` the weights under our names (what training exports and `convert-checkpoint` writes);
- `categories.json`  the dataset categories in contiguous-id order: [{"id", "name", "isthing"}, ...],
                     so results carry dataset ids and pictures carry class names.
Without a bundle, `--config C [--weights W]` names the parts directly; W may also be an authors' .pth,
recognised by its key names and converted on load.
"""
from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from safetensors.torch import save
from torch import Tensor

from core.config import ConfigError, dump_config
from core.records import Category
from core.storage import Storage, is_s3, join
from model.config import ModelConfig
from model.maskdino import MaskDINO
from model.official_checkpoint import load_official_weights
from model.weights_file import CheckpointError
from pipeline.bundle_files import CATEGORIES_NAME, CONFIG_NAME, WEIGHTS_NAME
from pipeline.model_tools import build_model, load_model_config, read_weights
from pipeline.registry import resolve_model_uri

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ModelBundle:
    """Where a model's parts are; `weights` None = random initialisation (tests, smoke runs)."""

    config: ModelConfig
    weights: str | None
    categories: list[Category] | None
    source: str

    def class_names(self) -> list[str]:
        if self.categories:
            return [c.name for c in self.categories]
        return [f"class {i}" for i in range(self.config.num_classes)]

    def dataset_category_ids(self) -> list[int]:
        """Contiguous id -> dataset category id (identity when no categories are known)."""
        if self.categories:
            return [c.id for c in self.categories]
        return list(range(self.config.num_classes))


def save_bundle(storage: Storage, uri: str, cfg: ModelConfig, state_dict: Mapping[str, Tensor],
                categories: Sequence[Category] | None = None) -> None:
    """Write a bundle folder; weights are stored as contiguous fp32-or-native tensors in safetensors."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    storage.write_bytes(join(uri, WEIGHTS_NAME), save(tensors, metadata={"format": "maskdino-pipeline"}))
    storage.write_bytes(join(uri, CONFIG_NAME), dump_config(cfg).encode())
    if categories is not None:
        payload = [asdict(c) for c in categories]
        storage.write_bytes(join(uri, CATEGORIES_NAME), json.dumps(payload, indent=1).encode())


def read_categories(storage: Storage, uri: str) -> list[Category]:
    try:
        return [Category(int(c["id"]), str(c["name"]), bool(c["isthing"]))
                for c in json.loads(storage.read_bytes(uri))]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{uri}: expected a JSON list of {{id, name, isthing}} ({exc})") from exc


def _load_config(storage: Storage, uri: str, overrides: Sequence[str]) -> ModelConfig:
    """load_config reads local files (it follows _base_ paths); an s3:// config is copied to a temp folder
    that is removed once the config is parsed."""
    if not is_s3(uri):
        return load_model_config(uri, overrides)
    with tempfile.TemporaryDirectory(prefix="maskdino-config-") as folder:
        return load_model_config(storage.copy_to_local(uri, join(folder, CONFIG_NAME)), overrides)


def _download_registered(model_uri: str) -> str:
    """A `models:/` bundle downloaded into a temp folder that lives as long as this process: its weights
    are read later (build_bundle_model), so the folder is removed at exit, not here."""
    folder = tempfile.mkdtemp(prefix="maskdino-registry-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return resolve_model_uri(None, model_uri, folder)


def open_bundle(storage: Storage, model: str = "", config: str = "", weights: str = "",
                categories: str = "", overrides: Sequence[str] = ()) -> ModelBundle:
    """Resolve `--model FOLDER|models:/NAME@ALIAS|models:/NAME/VERSION` or `--config C [--weights W]
    [--categories J]` to a ModelBundle.

    `overrides` (key=value) apply to the model config, e.g. inference.test_topk_per_image=50."""
    if model and config:
        raise ConfigError("give either --model (a bundle folder) or --config [--weights], not both")
    source = model
    if model.startswith("models:/"):  # registered: downloaded from MLflow (tracking URI: MLFLOW_TRACKING_URI)
        model = _download_registered(model)
    if model:
        config = join(model, CONFIG_NAME)
        weights = join(model, WEIGHTS_NAME)
        if not storage.exists(config):
            raise ConfigError(f"{model} is not a model bundle: no {CONFIG_NAME} in it (expected {CONFIG_NAME}, "
                              f"{WEIGHTS_NAME}, {CATEGORIES_NAME})")
        categories = categories or join(model, CATEGORIES_NAME)
        if not storage.exists(categories):
            categories = ""
    if not config:
        raise ConfigError("no model given: pass --model BUNDLE_FOLDER, or --config MODEL.yaml [--weights W]")
    cfg = _load_config(storage, config, overrides)
    cats = read_categories(storage, categories) if categories else None
    if cats is not None and len(cats) != cfg.num_classes:
        raise ConfigError(f"{categories} lists {len(cats)} categories but the model predicts num_classes="
                          f"{cfg.num_classes}")
    return ModelBundle(config=cfg, weights=weights or None, categories=cats, source=source or config)


def load_weights(model: torch.nn.Module, weights: Mapping[str, Tensor], source: str) -> str:
    """Our names load strictly; otherwise the keys are taken as the authors' and converted (strict).
    Returns a one-line description of what was loaded."""
    ours = model.state_dict()
    if set(weights) == set(ours):
        for key, value in weights.items():
            if tuple(value.shape) != tuple(ours[key].shape):
                raise CheckpointError(f"{source}: shape mismatch for {key}: checkpoint {tuple(value.shape)} vs "
                                      f"model {tuple(ours[key].shape)} (wrong config for these weights?)")
        model.load_state_dict(weights, strict=True)
        return f"{source}: {len(weights)} tensors"
    report = load_official_weights(model, weights, strict=True)
    return f"{source} (authors' format): {report.summary()}"


def build_bundle_model(bundle: ModelBundle, storage: Storage, device: str | torch.device = "cpu") -> MaskDINO:
    """The model in eval mode with the bundle's weights (random init, with a warning, when it has none)."""
    cfg = bundle.config
    if bundle.weights is not None:  # the bundle's weights replace the ImageNet ones: don't read those
        cfg = replace(cfg, backbone=replace(cfg.backbone, pretrained=""))
    model = build_model(cfg, device="cpu", storage=storage)
    if bundle.weights is None:
        log.warning("%s: no weights given; the model is randomly initialised", bundle.source)
    else:
        log.info(load_weights(model, read_weights(bundle.weights, storage), bundle.weights))
    return model.to(device).eval()
