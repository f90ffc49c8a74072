"""Reading state dicts from weights files: the one reader behind ImageNet backbone weights, official
checkpoints and converted models.

`.safetensors`, or torch files loaded with `torch.load(weights_only=True)` only (tensors and plain
containers; never an unrestricted unpickle). Files nesting the weights under "model" (detectron2/fvcore)
or "state_dict" are unwrapped. Local paths or bytes the caller fetched (model/ does no storage I/O).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load, load_file
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the key and what to do."""


def unwrap_state_dict(obj: Mapping) -> Mapping:
    """Checkpoint files often nest the weights under "model" or "state_dict"."""
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            return obj[key]
    return obj


def read_state_dict(source: str | Path | bytes, name: str = "") -> dict[str, Tensor]:
    """Tensors of a weights file given by local path, or by its bytes (`name` = where they came from,
    used for the format and in messages). Raises CheckpointError with what to do."""
    name = name or str(source if not isinstance(source, bytes) else "<bytes>")
    if name.endswith(".pkl"):
        raise CheckpointError(f"{name}: .pkl checkpoints need an unrestricted unpickle; convert it to a .pth "
                              "state_dict with detectron2 (torch.save(ckpt['model'], 'x.pth')) and pass that")
    if name.endswith(".safetensors"):
        return dict(load(source) if isinstance(source, bytes) else load_file(str(source), device="cpu"))
    try:
        obj = torch.load(io.BytesIO(source) if isinstance(source, bytes) else str(source), map_location="cpu",
                         weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError or RuntimeError; both mean the same to the user
        raise CheckpointError(f"{name}: not a weights-only torch checkpoint ({str(exc).splitlines()[0]})") from exc
    state = unwrap_state_dict(obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{name}: expected a state_dict or a dict with a 'model' state_dict")
    return dict(state)
