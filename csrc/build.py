"""Build and load the multi-scale deformable attention extension on first use.

`load_extension(cuda)` compiles `csrc/ms_deform_attn/` with `torch.utils.cpp_extension.load` (ninja)
and imports it; later calls in the same process return the same module, and later processes reuse
the cached binary (torch rebuilds only when a source or a flag changed).

* CPU build (`cuda=False`): cpu.cpp + bindings.cpp, `-O3 -fopenmp`, no nvcc needed. Module
  `maskdino_msda_cpu`.
* CUDA build (`cuda=True`): cpu.cpp + cuda.cu + bindings.cpp with `-DWITH_CUDA`, module
  `maskdino_msda_cuda`; only when `torch.cuda.is_available()`, or when `MASKDINO_FORCE_CUDA_BUILD=1`
  (to check that cuda.cu compiles on a machine without a GPU; set `CUDA_HOME` if torch guesses it
  wrong). Without a visible GPU and without `TORCH_CUDA_ARCH_LIST`, it targets sm_80 only.

Cache: `$MASKDINO_EXT_DIR/<torch version>-<cpu|cuda>`, `MASKDINO_EXT_DIR` defaulting to
`~/.cache/maskdino/torch_extensions`. One folder per torch version and variant, because the binary
is tied to torch's ABI and both variants would otherwise share one `build.ninja`. Two processes
building at once are serialised by torch's lock file (FileBaton) in that folder.

A failed build is not fatal: `load_extension` returns None and warns ONCE per process, naming the
error, so the callers (model/msda_dispatch.py) fall back to the PyTorch reference implementation.
Set `MASKDINO_EXT_VERBOSE=1` to see the compiler's command lines.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

try:  # a declared dependency, but a GPU image may ship its own ninja binary instead of the package
    import ninja  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover
    ninja = None

SOURCE_DIR = Path(__file__).resolve().parent / "ms_deform_attn"
DEFAULT_CACHE_ROOT = Path("~/.cache/maskdino/torch_extensions")
EXTENSION_NAMES = {False: "maskdino_msda_cpu", True: "maskdino_msda_cuda"}

# Per process: variant -> module, or None after a failed build (so a failure is not retried).
_loaded: dict[bool, ModuleType | None] = {}
_warned = False
_lock = threading.Lock()


def cache_dir(cuda: bool) -> Path:
    """Build folder of one variant: `<root>/<torch version>-<cpu|cuda>`."""
    root = Path(os.environ.get("MASKDINO_EXT_DIR") or DEFAULT_CACHE_ROOT).expanduser()
    return root / f"{torch.__version__}-{'cuda' if cuda else 'cpu'}"


def cuda_build_wanted() -> bool:
    """Whether a CUDA build makes sense here: a GPU is visible, or the build is forced by env."""
    if torch.version.cuda is None:  # a CPU-only torch has no CUDA headers/libraries to link
        return False
    return torch.cuda.is_available() or os.environ.get("MASKDINO_FORCE_CUDA_BUILD") == "1"


def load_extension(cuda: bool) -> ModuleType | None:
    """The compiled extension (building it if needed), or None.

    None when `cuda=True` but `cuda_build_wanted()` is false (no warning: nothing failed), or when
    the build or the import failed (one `warnings.warn` per process says why).
    """
    with _lock:  # threads of one process: build once; other processes: torch's FileBaton
        if cuda in _loaded:
            return _loaded[cuda]
        if cuda and not cuda_build_wanted():
            return None
        try:
            module = _build(cuda)
        except Exception as exc:  # noqa: BLE001 - any failure means "use the reference", loudly
            _warn_build_failed(cuda, exc)
            module = None
        _loaded[cuda] = module
        return module


def _build(cuda: bool) -> ModuleType:
    if not cuda:
        # On import torch probes for CUDA and logs "No CUDA runtime is found" on CPU machines: noise for a
        # CPU build, which needs no CUDA.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension  # imported late: it probes the toolchain at import

    _put_ninja_on_path()
    build_dir = cache_dir(cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [SOURCE_DIR / "cpu.cpp", SOURCE_DIR / "bindings.cpp"]
    cflags = ["-O3", "-fopenmp"]
    cuda_cflags: list[str] = []
    if cuda:
        sources.append(SOURCE_DIR / "cuda.cu")
        cflags.append("-DWITH_CUDA")
        cuda_cflags = ["-O3", "-DWITH_CUDA", *_default_arch_flags()]
    return cpp_extension.load(
        name=EXTENSION_NAMES[cuda],
        sources=[str(s) for s in sources],
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_cflags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        with_cuda=cuda,
        verbose=os.environ.get("MASKDINO_EXT_VERBOSE") == "1",
    )


def _put_ninja_on_path() -> None:
    # torch runs plain `ninja`; the PyPI `ninja` package puts it next to the venv's python, which is
    # not on PATH when the venv is used without being activated (`.venv/bin/python -m pytest`).
    if shutil.which("ninja"):
        return
    candidates = [Path(sys.executable).parent]
    if ninja is not None and hasattr(ninja, "BIN_DIR"):
        candidates.append(Path(ninja.BIN_DIR))
    for folder in candidates:
        if (folder / "ninja").exists():
            os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
            return


def _default_arch_flags() -> list[str]:
    # torch derives the target archs from the visible GPUs and fails with none; a forced build on a
    # GPU-less machine (a compile check) therefore needs one named here, unless the user set one.
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.device_count() > 0:
        return []
    return ["-gencode=arch=compute_80,code=sm_80"]


def _warn_build_failed(cuda: bool, exc: BaseException) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"MSDeformAttn {'CUDA' if cuda else 'C++'} extension unavailable ({_summary(exc)}); "
        "using the PyTorch reference implementation (slower). Set MASKDINO_EXT_VERBOSE=1 for the "
        "full build log.",
        RuntimeWarning,
        stacklevel=3,
    )


def _summary(exc: BaseException) -> str:
    """`Type: first line` of the error, plus the compiler's first `error` line when there is one."""
    text = str(exc).strip()
    lines = text.splitlines() or [""]
    # torch glues ninja's first command line onto "Error building extension 'name'": drop it.
    first = re.sub(r"^(Error building extension '[^']*'):.*", r"\1", lines[0])[:300]
    summary = f"{type(exc).__name__}: {first}"
    compiler_error = next((ln.strip() for ln in lines[1:] if "error" in ln.lower()), None)
    if compiler_error:
        summary += f" | {compiler_error[:300]}"
    return summary
