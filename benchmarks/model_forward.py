"""Mask DINO R50 (official instance config, 52.1 M parameters, random init) on the CPU: one eval forward
and one training step at 320x320, 2 threads, time and peak memory.

What is measured
----------------
* Model: configs/model/r50_instance.yaml (300 queries, 9 decoder layers, DN 100, 12544 mask points),
  msda backend "auto" (the C++ kernel).
* Eval forward: `model.predict([image])` on one 320x320 image (includes post-processing).
* Training step: forward + backward of the summed weighted losses for one 320x320 image with 3 objects
  (masks and boxes), DN on (no optimizer step: the authors' figure was forward + backward).
* Each phase runs in its own fresh process (so peak RSS is that phase's: `ru_maxrss`), `--warmup`
  untimed runs then `--repeats` timed runs; medians.
* Baseline: the authors' code cannot run in this repository (detectron2, CUDA-only ops), so the
  baseline is the figures the issue gives for it on a machine like this one, quiet: 2.2 s eval
  forward, 10.2 s training step, 2.4 GB peak RSS.

Output: a human summary on stderr, then LAST on stdout one JSON line
`{"bench": "model_forward", "ratio": worst of (ours / authors') over the three figures, "goal": 0.8, ...}`.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AUTHORS = {"eval_s": 2.2, "train_step_s": 10.2, "peak_rss_gb": 2.4}
SIZE = 320


def _phase(phase: str, warmup: int, repeats: int, threads: int) -> dict:
    import torch

    from model.maskdino import MaskDINO
    from model.structures import Targets
    from pipeline.model_tools import load_model_config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = MaskDINO(load_model_config(str(ROOT / "configs/model/r50_instance.yaml")))
    image = torch.rand(3, SIZE, SIZE) * 255
    masks = torch.zeros(3, SIZE, SIZE, dtype=torch.bool)
    masks[0, 20:140, 30:200] = True
    masks[1, 150:300, 60:160] = True
    masks[2, 40:120, 220:310] = True
    boxes = torch.tensor([[115, 80, 170, 120], [110, 225, 100, 150], [265, 80, 90, 80]], dtype=torch.float32) / SIZE
    target = Targets(torch.tensor([1, 5, 17]), boxes, masks)

    def eval_forward() -> None:
        model.eval()
        model.predict([image])

    def train_step() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        sum(model([image], [target]).values()).backward()

    run = eval_forward if phase == "eval" else train_step
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    from model import msda_dispatch

    return {"median_s": statistics.median(times), "runs_s": [round(t, 3) for t in times],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "msda_backend": msda_dispatch.selected_backend(torch.device("cpu"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--phase", choices=["eval", "train"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(_phase(args.phase, args.warmup, args.repeats, args.threads)))
        return
    results = {}
    for phase in ("eval", "train"):
        print(f"running {phase} phase in a fresh process ...", file=sys.stderr)
        out = subprocess.run([sys.executable, __file__, "--phase", phase, "--warmup", str(args.warmup),
                              "--repeats", str(args.repeats), "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True, cwd=ROOT)
        results[phase] = json.loads(out.stdout.strip().splitlines()[-1])
    ratios = {
        "eval_ratio": results["eval"]["median_s"] / AUTHORS["eval_s"],
        "train_ratio": results["train"]["median_s"] / AUTHORS["train_step_s"],
        "rss_ratio": max(results["eval"]["peak_rss_gb"], results["train"]["peak_rss_gb"]) / AUTHORS["peak_rss_gb"],
    }
    print(f"eval forward {results['eval']['median_s']:.2f} s (authors 2.2 s), training step "
          f"{results['train']['median_s']:.2f} s (authors 10.2 s), peak RSS eval "
          f"{results['eval']['peak_rss_gb']:.2f} GB / train {results['train']['peak_rss_gb']:.2f} GB (authors 2.4 GB)",
          file=sys.stderr)
    print(json.dumps({"bench": "model_forward", "ratio": round(max(ratios.values()), 3), "goal": 0.8,
                      **{k: round(v, 3) for k, v in ratios.items()},
                      "eval_s": round(results["eval"]["median_s"], 3),
                      "train_step_s": round(results["train"]["median_s"], 3),
                      "eval_peak_rss_gb": round(results["eval"]["peak_rss_gb"], 3),
                      "train_peak_rss_gb": round(results["train"]["peak_rss_gb"], 3),
                      "eval_runs_s": results["eval"]["runs_s"], "train_runs_s": results["train"]["runs_s"],
                      "msda_backend": results["eval"]["msda_backend"], "threads": args.threads, "size": SIZE,
                      "authors": AUTHORS}))


if __name__ == "__main__":
    main()
