"""Multi-scale deformable attention on the CPU: the C++ kernel against the PyTorch reference.

What is measured
----------------
* Shapes: the R50 Mask DINO encoder on a 512x512 image: levels at strides 8/16/32/64 ->
  spatial shapes (64, 64), (32, 32), (16, 16), (8, 8); N=1 image, M=8 heads, D=32 channels per
  head (d_model 256), L=4 levels, P=4 points, Lq = S = 5440 queries (every pixel of every level
  queries, as in the encoder). Locations uniform in [-0.05, 1.05] (a few fall off the map),
  attention weights softmaxed over the L*P samples, float32.
* Ours: `model.msda_dispatch.ms_deform_attn_core` with the "cpp" backend (the autograd Function
  around csrc/ms_deform_attn/cpu.cpp), forward + backward of `(out * grad).sum()`.
* Baseline: `model.ms_deform_attn.ms_deform_attn_reference` (per-level F.grid_sample), the same
  forward + backward through autograd.
* `torch.set_num_threads(--threads)` (2 by default); `--warmup` untimed runs, then `--repeats`
  timed runs of each, interleaved; medians. Forward alone is also timed.

Output: a human summary on stderr, then LAST on stdout one JSON line
`{"bench": "msdeform_attn", "ratio": reference / ours (forward+backward medians), "goal": 2.0, ...}`.
The extension is built on first use (~30 s, cached afterwards; see csrc/build.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import msda_dispatch
from model.msda_reference import ms_deform_attn_reference

SHAPES = [(64, 64), (32, 32), (16, 16), (8, 8)]


def make_inputs(heads: int, channels: int, points: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """value [1, S, M, D], spatial_shapes [L, 2], level_start_index [L], locations
    [1, S, M, L, P, 2], weights [1, S, M, L, P], grad [1, S, M*D]; Lq = S."""
    gen = torch.Generator().manual_seed(seed)
    hw = torch.tensor(SHAPES, dtype=torch.long)
    sizes = hw.prod(1)
    start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    s, levels = int(sizes.sum()), len(SHAPES)
    loc = torch.rand(1, s, heads, levels, points, 2, generator=gen) * 1.1 - 0.05
    logits = torch.randn(1, s, heads, levels * points, generator=gen)
    return {
        "value": torch.randn(1, s, heads, channels, generator=gen),
        "spatial_shapes": hw,
        "level_start_index": start,
        "sampling_locations": loc,
        "attention_weights": logits.softmax(-1).view(1, s, heads, levels, points),
        "grad": torch.randn(1, s, heads * channels, generator=gen),
    }


def run_cpp(x: dict[str, torch.Tensor], backward: bool) -> torch.Tensor:
    leaves = _leaves(x, backward)
    out = msda_dispatch.ms_deform_attn_core(leaves[0], x["spatial_shapes"],
                                            x["level_start_index"], leaves[1], leaves[2])
    if backward:
        out.backward(x["grad"])
    return out


def run_reference(x: dict[str, torch.Tensor], backward: bool) -> torch.Tensor:
    leaves = _leaves(x, backward)
    out = ms_deform_attn_reference(leaves[0], x["spatial_shapes"], leaves[1], leaves[2])
    if backward:
        out.backward(x["grad"])
    return out


def _leaves(x: dict[str, torch.Tensor], grad: bool) -> list[torch.Tensor]:
    names = ("value", "sampling_locations", "attention_weights")
    return [x[n].detach().requires_grad_(grad) for n in names]


def time_pair(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function; the functions alternate so drifts hit both alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--points", type=int, default=4)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    msda_dispatch.set_backend("cpp")
    if msda_dispatch.selected_backend("cpu") != "cpp":
        sys.exit("the C++ extension did not build (see the warning above); nothing to compare")
    x = make_inputs(args.heads, args.channels, args.points)
    err = (run_cpp(x, False) - run_reference(x, False)).abs().max().item()

    fwd = time_pair({"cpp": lambda: run_cpp(x, False), "ref": lambda: run_reference(x, False)},
                    args.warmup, args.repeats)
    both = time_pair({"cpp": lambda: run_cpp(x, True), "ref": lambda: run_reference(x, True)},
                     args.warmup, args.repeats)
    med = {f"{k}_{n}": statistics.median(v) for k, t in (("fwd", fwd), ("fwdbwd", both))
           for n, v in t.items()}
    ratio = med["fwdbwd_ref"] / med["fwdbwd_cpp"]
    lq = int(x["value"].shape[1])
    print(f"MSDeformAttn CPU, {args.threads} threads, Lq=S={lq}, M={args.heads}, D={args.channels}, "
          f"L={len(SHAPES)}, P={args.points}; medians of {args.repeats}", file=sys.stderr)
    print(f"  forward:            cpp {med['fwd_cpp'] * 1e3:8.2f} ms   reference "
          f"{med['fwd_ref'] * 1e3:8.2f} ms   x{med['fwd_ref'] / med['fwd_cpp']:.2f}", file=sys.stderr)
    print(f"  forward + backward: cpp {med['fwdbwd_cpp'] * 1e3:8.2f} ms   reference "
          f"{med['fwdbwd_ref'] * 1e3:8.2f} ms   x{ratio:.2f} (goal x2)", file=sys.stderr)
    print(f"  max |cpp - reference| of the output: {err:.2e}", file=sys.stderr)
    print(json.dumps({
        "bench": "msdeform_attn", "ratio": round(ratio, 2), "goal": 2.0,
        "forward_ratio": round(med["fwd_ref"] / med["fwd_cpp"], 2),
        "cpp_fwdbwd_ms": round(med["fwdbwd_cpp"] * 1e3, 2),
        "reference_fwdbwd_ms": round(med["fwdbwd_ref"] * 1e3, 2),
        "cpp_fwd_ms": round(med["fwd_cpp"] * 1e3, 2), "reference_fwd_ms": round(med["fwd_ref"] * 1e3, 2),
        "max_abs_diff": float(f"{err:.3g}"), "threads": args.threads, "queries": lq,
        "heads": args.heads, "channels": args.channels, "levels": len(SHAPES), "points": args.points,
        "repeats": args.repeats,
        "cpp_fwdbwd_runs_ms": [round(t * 1e3, 2) for t in both["cpp"]],
        "reference_fwdbwd_runs_ms": [round(t * 1e3, 2) for t in both["ref"]],
    }))


if __name__ == "__main__":
    main()
