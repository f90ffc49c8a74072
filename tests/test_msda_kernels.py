"""Multi-scale deformable attention kernels (csrc/ms_deform_attn) against the PyTorch reference.

The C++ extension is built once per machine into csrc.build's cache folder (~30 s the first time;
later sessions and CI runs on the same machine reuse it), and loaded once per test session.
Covers: C++ forward/backward vs the reference on random shapes (locations outside [0, 1],
non-square levels, 1-5 levels, 1-4 points, 1-8 heads), float64 gradcheck through the autograd
Function, the fallback to the reference (with exactly one warning) when the build fails, backend
selection by env var / set_backend, the CUDA kernel in fp32/fp16/bf16 (gpu marker), and that
cuda.cu compiles with nvcc (slow marker).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import model.msda_dispatch as dispatch
from csrc import build
from model.msda_reference import ms_deform_attn_reference

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()

# (N, spatial shapes, heads M, channels D, queries Lq, points P, how far locations stray outside [0, 1])
CONFIGS = [
    (1, [(4, 6)], 1, 4, 5, 1, 0.0),
    (2, [(8, 8), (4, 4)], 2, 8, 7, 2, 0.1),
    (1, [(7, 3), (5, 9), (2, 2)], 4, 16, 11, 3, 0.3),
    (2, [(6, 10), (3, 5), (2, 3), (1, 2)], 8, 8, 9, 4, 0.2),
    (1, [(12, 7), (6, 4), (3, 2), (2, 1), (1, 1)], 3, 32, 13, 4, 0.5),
    (3, [(1, 16), (16, 1)], 5, 3, 4, 2, 1.0),
]
IDS = [f"N{c[0]}-L{len(c[1])}-M{c[2]}-D{c[3]}-P{c[5]}" for c in CONFIGS]


def make_inputs(n: int, shapes: list[tuple[int, int]], heads: int, channels: int, queries: int,
                points: int, spread: float, dtype: torch.dtype = torch.float32,
                device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights).

    Locations are uniform in [-spread, 1 + spread], so some fall partly or wholly off the map.
    """
    gen = torch.Generator().manual_seed(seed)
    hw = torch.tensor(shapes, dtype=torch.long)
    sizes = hw.prod(1)
    start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(shapes)
    value = torch.randn(n, int(sizes.sum()), heads, channels, generator=gen, dtype=torch.float64)
    loc = torch.rand(n, queries, heads, levels, points, 2, generator=gen, dtype=torch.float64)
    loc = loc * (1 + 2 * spread) - spread
    attn = torch.rand(n, queries, heads, levels, points, generator=gen, dtype=torch.float64)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    cast = [t.to(device=device, dtype=dtype) for t in (value, loc, attn)]
    return cast[0], hw.to(device), start.to(device), cast[1], cast[2]


def reference_grads(value, hw, loc, attn, grad_out) -> tuple[torch.Tensor, ...]:
    """Autograd gradients of the reference for the upstream gradient `grad_out`."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    out = ms_deform_attn_reference(leaves[0], hw, leaves[1], leaves[2])
    return torch.autograd.grad(out, leaves, grad_out)


@pytest.fixture(scope="session")
def ext():
    """The CPU extension, built (or found in the cache) once per session."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed build must fail these tests, not fall back
        module = build.load_extension(cuda=False)
    assert module is not None
    return module


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch):
    """Each test decides the backend afresh and leaves no override behind."""
    monkeypatch.setattr(dispatch, "_override", None)
    monkeypatch.setattr(dispatch, "_chosen", {})
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_cpp_forward_matches_reference(ext, cfg):
    value, hw, start, loc, attn = make_inputs(*cfg)
    out = ext.forward(value, hw, start, loc, attn)
    assert out.shape == (cfg[0], cfg[4], cfg[2] * cfg[3])
    torch.testing.assert_close(out, ms_deform_attn_reference(value, hw, loc, attn),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_cpp_backward_matches_reference(ext, cfg, dtype, tol):
    value, hw, start, loc, attn = make_inputs(*cfg, dtype=dtype, seed=1)
    grad_out = torch.randn(cfg[0], cfg[4], cfg[2] * cfg[3], dtype=dtype)
    got = ext.backward(value, hw, start, loc, attn, grad_out)
    want = reference_grads(value, hw, loc, attn, grad_out)
    for name, g, w in zip(("value", "sampling_loc", "attn_weight"), got, want):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=lambda m, n=name: f"grad {n}: {m}")


def test_cpp_kernel_is_deterministic_across_thread_counts(ext):
    value, hw, start, loc, attn = make_inputs(*CONFIGS[3], seed=2)
    grad_out = torch.randn(2, 9, 64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.backward(value, hw, start, loc, attn, grad_out)
        torch.set_num_threads(2)
        two = ext.backward(value, hw, start, loc, attn, grad_out)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_cpp_kernel_rejects_bad_inputs(ext):
    value, hw, start, loc, attn = make_inputs(*CONFIGS[1])
    with pytest.raises(RuntimeError, match="share one dtype"):
        ext.forward(value, hw, start, loc.double(), attn)
    with pytest.raises(RuntimeError, match="does not fit"):
        ext.forward(value[:, :10], hw, start, loc, attn)
    with pytest.raises(RuntimeError, match="attn_weight"):
        ext.forward(value, hw, start, loc, attn[..., :1])


def test_gradcheck_through_autograd_function(ext):
    dispatch.set_backend("cpp")
    value, hw, start, loc, attn = make_inputs(1, [(3, 4), (2, 2)], 2, 3, 3, 2, 0.2,
                                              dtype=torch.float64, seed=3)
    inputs = tuple(t.requires_grad_(True) for t in (value, loc, attn))

    def core(v, sl, aw):
        return dispatch.ms_deform_attn_core(v, hw, start, sl, aw)

    assert torch.autograd.gradcheck(core, inputs, eps=1e-6, atol=1e-6)
    assert dispatch.selected_backend(torch.device("cpu")) == "cpp"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dispatch_forward_backward_matches_reference(ext, dtype):
    """The autograd path on CPU; half/bf16 run the kernel in float32 and come back in their dtype."""
    value, hw, start, loc, attn = make_inputs(*CONFIGS[2], dtype=dtype, seed=4)
    leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    out = dispatch.ms_deform_attn_core(leaves[0], hw, start, leaves[1], leaves[2])
    assert dispatch.selected_backend("cpu") == "cpp" and out.dtype == dtype
    grad_out = torch.randn(out.shape).to(dtype)
    out.backward(grad_out)
    ref_inputs = [t.float() for t in (value, loc, attn)]
    ref = ms_deform_attn_reference(ref_inputs[0], hw, ref_inputs[1], ref_inputs[2])
    want = reference_grads(ref_inputs[0], hw, ref_inputs[1], ref_inputs[2], grad_out.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    for leaf, w in zip(leaves, want):
        assert leaf.grad.dtype == dtype
        torch.testing.assert_close(leaf.grad.float(), w, atol=tol, rtol=tol)


def test_mixed_dtypes_are_promoted(ext):
    value, hw, start, loc, attn = make_inputs(*CONFIGS[1], seed=5)
    out = dispatch.ms_deform_attn_core(value.half(), hw, start, loc, attn)
    assert out.dtype == torch.float32
    ref = ms_deform_attn_reference(value.half().float(), hw, loc, attn)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("env,expected", [("reference", "reference"), ("cpp", "cpp"),
                                          ("auto", "cpp"), ("cuda", "reference"), ("", "cpp")])
def test_env_var_selects_backend(ext, monkeypatch, env, expected):
    monkeypatch.setenv(dispatch.ENV_VAR, env)
    assert dispatch.selected_backend(torch.device("cpu")) == expected


def test_set_backend_wins_over_env_and_auto_defers_to_it(ext, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    dispatch.set_backend("cpp")
    assert dispatch.selected_backend("cpu") == "cpp"
    dispatch.set_backend("auto")  # the config default: the env var applies again
    assert dispatch.selected_backend("cpu") == "reference"
    with pytest.raises(ValueError, match="unknown MSDeformAttn backend"):
        dispatch.set_backend("triton")
    monkeypatch.setenv(dispatch.ENV_VAR, "nope")
    dispatch.set_backend("auto")
    with pytest.raises(ValueError, match="MASKDINO_MSDA_BACKEND"):
        dispatch.selected_backend("cpu")


def test_a_models_backend_is_its_own_and_leaves_the_process_request_alone(ext, monkeypatch):
    """Two models with different msda_backend in one process each use their own; building them
    changes nothing for code that asks the process (set_backend / the env var)."""
    from model.maskdino import MaskDINO
    from model.ms_deform_attn import MSDeformAttn
    from pipeline.model_tools import load_model_config

    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    cfg = load_model_config("configs/model/tiny_instance.yaml")
    cpp_model = MaskDINO(dataclasses.replace(cfg, msda_backend="cpp"))
    auto_model = MaskDINO(cfg)
    assert dispatch.requested_backend() == "reference"
    cpp_modules = [m for m in cpp_model.modules() if isinstance(m, MSDeformAttn)]
    assert cpp_modules and all(m.backend == "cpp" for m in cpp_modules)
    assert all(m.backend == "auto" for m in auto_model.modules() if isinstance(m, MSDeformAttn))
    assert dispatch.selected_backend("cpu", "cpp") == "cpp"
    assert dispatch.selected_backend("cpu", "auto") == "reference"
    value, hw, start, loc, attn = make_inputs(*CONFIGS[2], seed=8)
    calls = []
    real = ext.forward
    monkeypatch.setattr(ext, "forward", lambda *a: calls.append(1) or real(*a))
    dispatch.ms_deform_attn_core(value, hw, start, loc, attn, "auto")  # the process request: reference
    assert not calls
    dispatch.ms_deform_attn_core(value, hw, start, loc, attn, "cpp")
    assert calls == [1]


def test_reference_backend_gives_same_result(ext, monkeypatch):
    value, hw, start, loc, attn = make_inputs(*CONFIGS[4], seed=6)
    out_cpp = dispatch.ms_deform_attn_core(value, hw, start, loc, attn)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    dispatch.set_backend("auto")
    out_ref = dispatch.ms_deform_attn_core(value, hw, start, loc, attn)
    assert dispatch.selected_backend("cpu") == "reference"
    torch.testing.assert_close(out_cpp, out_ref, atol=1e-5, rtol=1e-5)


@pytest.fixture
def no_loaded_extension(monkeypatch, tmp_path):
    """csrc.build as in a fresh process, building into a throw-away folder."""
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_warned", False)
    monkeypatch.setenv("MASKDINO_EXT_DIR", str(tmp_path / "ext"))


def _build_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "MSDeformAttn" in str(w.message)]


def test_failed_build_falls_back_to_reference_and_warns_once(no_loaded_extension, monkeypatch):
    def broken_build(cuda: bool):
        raise RuntimeError("Error building extension 'maskdino_msda_cpu'\n"
                           "cpu.cpp:1:1: error: something is wrong")

    monkeypatch.setattr(build, "_build", broken_build)
    value, hw, start, loc, attn = make_inputs(*CONFIGS[1], seed=7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = dispatch.ms_deform_attn_core(value, hw, start, loc, attn)
        dispatch._chosen.clear()  # a second decision in the same process must not warn again
        out2 = dispatch.ms_deform_attn_core(value, hw, start, loc, attn)
        assert build.load_extension(cuda=False) is None
    messages = _build_warnings(caught)
    assert len(messages) == 1, messages
    assert "Error building extension 'maskdino_msda_cpu'" in messages[0]
    assert "error: something is wrong" in messages[0]
    assert "PyTorch reference" in messages[0]
    assert dispatch.selected_backend("cpu") == "reference"
    want = ms_deform_attn_reference(value, hw, loc, attn)
    assert torch.equal(out, want) and torch.equal(out2, want)


def test_broken_source_file_fails_the_real_build_cleanly(no_loaded_extension, monkeypatch, tmp_path):
    """A real compiler error (no monkeypatched loader) ends in None and one warning naming it."""
    sources = tmp_path / "src"
    sources.mkdir()
    for name in ("cpu.cpp", "bindings.cpp"):
        (sources / name).write_text("this is not C++;\n")
    monkeypatch.setattr(build, "SOURCE_DIR", sources)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert build.load_extension(cuda=False) is None
        assert build.load_extension(cuda=False) is None
    messages = _build_warnings(caught)
    assert len(messages) == 1, messages
    assert "maskdino_msda_cpu" in messages[0] and "PyTorch reference" in messages[0]


def test_cuda_load_is_none_without_gpu(monkeypatch):
    if HAS_CUDA:
        pytest.skip("a GPU is visible")
    monkeypatch.delenv("MASKDINO_FORCE_CUDA_BUILD", raising=False)
    monkeypatch.setattr(build, "_loaded", {})
    assert build.load_extension(cuda=True) is None


def test_model_package_stays_light():
    """model/ must not pull in the distributed/cloud stack, and never calls .cuda()."""
    code = "\n".join(p.read_text() for p in [ROOT / "model" / "msda_dispatch.py",
                                             ROOT / "csrc" / "build.py"])
    for banned in ("deepspeed", "ray", "mlflow", "boto3", "webdataset", "torch.distributed"):
        assert not re.search(rf"^\s*(import|from)\s+{re.escape(banned)}\b", code, re.MULTILINE), banned
    assert ".cuda()" not in code


# --- CUDA ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cuda_ext():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = build.load_extension(cuda=True)
    assert module is not None and module.with_cuda
    return module


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3),
                                       (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_forward_matches_reference(cuda_ext, cfg, dtype, tol):
    value, hw, start, loc, attn = make_inputs(*cfg, dtype=dtype, device="cuda", seed=8)
    out = cuda_ext.forward(value, hw, start, loc, attn)
    assert out.dtype == dtype
    # The reference in float32 on the same (rounded) inputs: what remains is the kernel's rounding.
    ref = ms_deform_attn_reference(value.float(), hw, loc.float(), attn.float())
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4),
                                       (torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_backward_matches_reference(cuda_ext, cfg, dtype, tol):
    value, hw, start, loc, attn = make_inputs(*cfg, dtype=dtype, device="cuda", seed=9)
    grad_out = torch.randn(cfg[0], cfg[4], cfg[2] * cfg[3], device="cuda").to(dtype)
    got = cuda_ext.backward(value, hw, start, loc, attn, grad_out)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    want = reference_grads(*(t.to(ref_dtype) if t.is_floating_point() else t
                             for t in (value, hw, loc, attn)), grad_out.to(ref_dtype))
    for name, g, w in zip(("value", "sampling_loc", "attn_weight"), got, want):
        assert g.dtype == dtype
        # Location gradients scale with the map size (x W): compare relative to their magnitude.
        scale = max(1.0, w.abs().max().item()) if name == "sampling_loc" else 1.0
        torch.testing.assert_close(g.to(ref_dtype) / scale, w / scale, atol=tol, rtol=tol,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_dispatch_and_gradcheck(cuda_ext):
    assert dispatch.selected_backend(torch.device("cuda")) == "cuda"
    value, hw, start, loc, attn = make_inputs(1, [(3, 4), (2, 2)], 2, 3, 3, 2, 0.2,
                                              dtype=torch.float64, device="cuda", seed=10)
    inputs = tuple(t.requires_grad_(True) for t in (value, loc, attn))
    assert torch.autograd.gradcheck(
        lambda v, sl, aw: dispatch.ms_deform_attn_core(v, hw, start, sl, aw), inputs,
        eps=1e-6, atol=1e-6)


def _nvcc_skip_reason() -> str | None:
    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "nvcc not found on PATH"
    found = re.search(r"release (\d+)\.(\d+)", subprocess.run([nvcc, "--version"], text=True,
                                                             capture_output=True, check=False).stdout)
    if found is None:
        return "could not read nvcc's version"
    if found.group(1) != torch.version.cuda.split(".")[0]:
        return f"nvcc is CUDA {found.group(1)}.x, torch was built with CUDA {torch.version.cuda}"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_nvcc_skip_reason() is not None, reason=str(_nvcc_skip_reason()))
def test_cuda_sources_compile_with_nvcc():
    """Builds the CUDA variant (once per machine: csrc.build's cache) in a subprocess."""
    env = dict(os.environ, MASKDINO_FORCE_CUDA_BUILD="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    if "CUDA_HOME" not in env:  # torch guesses it from nvcc's path, wrong for a wrapper script
        nvcc_home = Path(os.path.realpath(shutil.which("nvcc") or "")).parents[1]
        has_headers = (nvcc_home / "include" / "cuda_runtime.h").exists()
        env["CUDA_HOME"] = str(nvcc_home if has_headers else Path("/usr/local/cuda"))
    script = ("import warnings, csrc.build as b; warnings.simplefilter('error'); "
              "m = b.load_extension(cuda=True); print('WITH_CUDA', m.with_cuda)")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=3000, check=False)
    assert done.returncode == 0 and "WITH_CUDA True" in done.stdout, done.stderr[-4000:]
