"""What an evaluation computes: the one settings struct that `maskdino evaluate`'s flags fill, that a
pipeline's evaluate stage holds (its YAML keys ``batch_size``, ``min_size``, ``max_size``, ``limit``, part
of the stage's key) and that a Ray Train evaluation worker receives. Where the evaluation runs (device)
and whether it draws a progress bar are the caller's arguments, not settings.

Light on purpose (no torch): validating a pipeline imports it."""
from __future__ import annotations

from dataclasses import dataclass

from core.config import InvalidValue


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int = 1  # images per forward pass
    min_size: int = -1  # test-time short side; -1 = the dataset's official value, 0 = no resize
    max_size: int = -1  # test-time cap of the long side; -1 = the dataset's official value
    limit: int = 0  # evaluate only the first N samples of the manifest (0 = all)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InvalidValue("batch_size", self.batch_size, ">= 1")
        if self.limit < 0:
            raise InvalidValue("limit", self.limit, ">= 0 (0 = all)")
