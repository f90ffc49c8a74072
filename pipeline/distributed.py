"""The few process-group operations the pipeline needs, in one place; everything else stays free of them.

Without an initialised process group every function acts as a world of one, so the same code runs
single-process, under torchrun / the deepspeed launcher, and under Ray Train."""
from __future__ import annotations

import os
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> bool:
    """Join the process group a launcher describes (WORLD_SIZE > 1 in the environment); gloo on CPU,
    nccl when this process has a GPU. Returns whether a group is active."""
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def gather_to_rank0(obj: T) -> list[T] | None:
    """Every rank's `obj` (picklable), in rank order, on rank 0; None on the other ranks."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered
