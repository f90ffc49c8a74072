"""Multi-scale deformable attention core: picks the C++, CUDA or PyTorch-reference implementation.

`ms_deform_attn_core(value, spatial_shapes, level_start_index, sampling_locations,
attention_weights, backend)` is what `model/ms_deform_attn.py` calls; it returns [N, Lq, M*D] and is
differentiable with respect to value, sampling_locations and attention_weights.

Backends (see `selected_backend`; the decision per device type and request is made, and a native
kernel built, once per process):

* ``"cpp"``: the C++/OpenMP kernel (csrc/ms_deform_attn/cpu.cpp) on CPU tensors,
* ``"cuda"``: the CUDA kernel (csrc/ms_deform_attn/cuda.cu) on CUDA tensors,
* ``"reference"``: `model.msda_reference.ms_deform_attn_reference` (per-level F.grid_sample).

The request comes per call: each MSDeformAttn module passes its own ``backend`` (a model's config
sets it on all of its modules). A call's "auto" defers to the process-wide request: `set_backend(name)`
if it named a backend (tests, benchmarks), else the env var ``MASKDINO_MSDA_BACKEND``, else ``"auto"``.
Building a model never changes the process-wide request. ``auto`` uses the native
kernel of the tensors' device, and the reference on other devices or when the kernel failed to
build (csrc.build then warns once). ``cpp`` / ``cuda`` name one kernel: it is used on its own
device and the reference on the other one (so ``cuda`` on CPU tensors runs the reference; useful
for comparisons). ``reference`` always uses the reference.

dtypes: value, sampling_locations and attention_weights are first promoted to one dtype
(`torch.promote_types`, e.g. float16 value + float32 locations -> float32); the result has that
dtype. The CUDA kernel takes float16/bfloat16/float32/float64 (arithmetic in float32, or float64).
The CPU kernel takes float32/float64 only: other dtypes (float16/bfloat16 under CPU autocast) are
cast to float32 for the kernel and the result cast back, so they cost two extra copies but get
float32 accuracy. The casts sit outside the autograd Function, so gradients flow back in the
inputs' dtypes.
"""
from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from csrc.build import load_extension
from model.msda_reference import ms_deform_attn_reference

BACKENDS = ("auto", "reference", "cpp", "cuda")
ENV_VAR = "MASKDINO_MSDA_BACKEND"

_override: str | None = None  # set by set_backend(); wins over the env var
_chosen: dict[tuple[str, str], str] = {}  # (device type, request) -> backend, decided on first use
_CPU_KERNEL_DTYPES = (torch.float32, torch.float64)


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown MSDeformAttn backend {name!r}; expected one of {BACKENDS}")
    return name


def set_backend(name: str) -> None:
    """Request a backend for this process ("auto", "reference", "cpp" or "cuda"): what modules whose
    own backend is "auto" (the config's default) use.

    A named backend wins over $MASKDINO_MSDA_BACKEND; "auto" clears the request, so the env var
    applies again.
    """
    global _override
    _override = None if check_backend(name) == "auto" else name


def requested_backend() -> str:
    """What was asked for: `set_backend`'s argument, else $MASKDINO_MSDA_BACKEND, else "auto"."""
    name = _override or os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not one of {BACKENDS}")
    return name


def selected_backend(device: torch.device | str, backend: str = "auto") -> str:
    """The backend used for tensors on `device` when a call asks for `backend`: "cpp", "cuda" or
    "reference". "auto" defers to the process-wide request (`requested_backend`).

    Decided (and, for a native kernel, built) on the first call per device type and request.
    """
    kind = torch.device(device).type
    request = check_backend(backend) if backend != "auto" else requested_backend()
    if (kind, request) not in _chosen:
        _chosen[(kind, request)] = _choose(kind, request)
    return _chosen[(kind, request)]


def ms_deform_attn_core(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                        sampling_locations: Tensor, attention_weights: Tensor, backend: str = "auto") -> Tensor:
    """Multi-scale deformable attention with the requested `backend` (see the module docstring).

    value [N, S, M, D]; spatial_shapes [L, 2] int (H, W); level_start_index [L] int;
    sampling_locations [N, Lq, M, L, P, 2] (x, y normalised to 0..1); attention_weights
    [N, Lq, M, L, P]  ->  [N, Lq, M*D].
    """
    dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype),
                                attention_weights.dtype)
    value, sampling_locations, attention_weights = (
        t.to(dtype) for t in (value, sampling_locations, attention_weights))
    backend = selected_backend(value.device, backend)
    if backend == "reference":
        return ms_deform_attn_reference(value, spatial_shapes, sampling_locations,
                                        attention_weights)
    ext = _extension(backend)
    assert ext is not None  # _choose only picks a kernel that loaded
    kernel_dtype = dtype if backend == "cuda" or dtype in _CPU_KERNEL_DTYPES else torch.float32
    index_opts = {"device": value.device, "dtype": torch.long}
    out = _MSDeformAttnFunction.apply(
        ext, value.to(kernel_dtype), spatial_shapes.to(**index_opts),
        level_start_index.to(**index_opts), sampling_locations.to(kernel_dtype),
        attention_weights.to(kernel_dtype))
    return out.to(dtype)


class _MSDeformAttnFunction(torch.autograd.Function):
    """Autograd wrapper of one kernel module (`forward` / `backward` of csrc/ms_deform_attn)."""

    @staticmethod
    def forward(ctx: FunctionCtx, ext: ModuleType, value: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, sampling_locations: Tensor,
                attention_weights: Tensor) -> Tensor:
        ctx.ext = ext
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights)
        return ext.forward(value, spatial_shapes, level_start_index, sampling_locations,
                           attention_weights)

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
            ctx.saved_tensors)
        grad_value, grad_loc, grad_attn = ctx.ext.backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            grad_output.contiguous())
        return None, grad_value, None, None, grad_loc, grad_attn


def _choose(kind: str, requested: str) -> str:
    native = {"cpu": "cpp", "cuda": "cuda"}.get(kind)
    if native is None or requested == "reference":
        return "reference"
    if requested not in ("auto", native):  # a kernel for the other device was named
        return "reference"
    return native if _extension(native) is not None else "reference"


def _extension(backend: str) -> ModuleType | None:
    # csrc.build caches the module per process and warns once if the build fails.
    return load_extension(cuda=backend == "cuda")
