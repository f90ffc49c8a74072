"""The files of a model bundle, the folder (local or s3://) in which a trained model travels between
training, evaluation, prediction and the registry (docs/pipeline.md#model-bundles):

- `config.yaml`       the resolved model config;
- `model.safetensors` the weights under our names;
- `categories.json`   the dataset categories in contiguous-id order: [{"id", "name", "isthing"}, ...].

Its own module because both pipeline/model_bundle.py (reading and writing bundles) and
pipeline/registry.py (registering them, and resolving `models:/` URIs back to one) need the names."""
from __future__ import annotations

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"
CATEGORIES_NAME = "categories.json"
BUNDLE_FILES = (CONFIG_NAME, WEIGHTS_NAME, CATEGORIES_NAME)
