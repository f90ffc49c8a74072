"""Training images/s and data-wait fraction on the CPU: the real trainer (DeepSpeed) vs. a plain PyTorch loop.

What is measured
----------------
* Data: `data_prep.synthetic.make_synthetic` writes `--images` COCO instances train images (sides
  `--min-size`..`--max-size`, 8 categories), sharded inline (`data_prep.shard.shard_dataset`) into a
  temp folder with `--maxcount` samples per shard. The same manifest feeds every run.
* Configs (`--configs`): configs/train/tiny_instance.yaml and configs/train/r50_instance.yaml, with
  `model.num_classes=8` (the synthetic label set), `model.backbone.pretrained=` (no weights here: random
  init), `engine.precision=fp32`, `engine.zero_stage=2` (ours), `engine.micro_batch_size=2`,
  `data.num_workers=--workers` (1), `data.aug.image_size=--image-size` (tiny 128; R50 256 instead of the
  recipe's 1024 LSJ, far too slow on this CPU), `schedule.max_steps=N`, only the final checkpoint,
  `export=false`, no console lines.
* Ours: `Trainer(cfg, storage).run()` then `.close()` in a fresh process (a gloo world of one, made by the
  trainer). Per-step figures come from `<run_dir>/metrics.jsonl` (`images_per_s`, `data_wait_fraction`,
  `loss/total`), timed by the trainer itself: from asking for the batch to the end of the optimizer step
  and the loss all-reduce.
* Baseline: the same model (`build_model`, `torch.manual_seed` as the trainer), optimizer and LR schedule
  (`build_optimizer`, `build_scheduler`), the same `TrainLoader` / `LoaderConfig` / `ShardTransform` /
  `collate_batch`, in a plain loop without DeepSpeed, in a fresh process: wait for the batch, forward
  (`model(images, targets, num_masks)`), sum of the weighted losses, zero_grad, backward,
  `clip_grad_norm_(0.01)`, optimizer and scheduler step, loss read back; each step timed the same way.
  Both sides start from the same weights, data order and noise seeds, so their per-step losses agree
  (`loss_max_rel_diff`, first run of each): the baseline does the same work.
* `--repeats` runs of each variant per config (tiny 3, R50 1), in a rotating order (ours, baseline,
  baseline, ours, ...): the machine is shared, and a neighbour's burst can slow a whole run. The first
  `--warmup` (2) steps of every run are left out; a variant's figures are the median images/s, median
  s/step and mean data-wait fraction over the measured steps of all its runs.
* `ratio` = ours / baseline images/s for the tiny config (goal 0.9: DeepSpeed's engine costs < 10%);
  `paired_ratios` per repeat, the R50 ratio and every figure are in the JSON too.

Output: progress and a table on stderr, then LAST on stdout one JSON line
`{"bench": "train_step", "ratio": R, "goal": 0.9, ...}`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL = 0.9  # ours / baseline images/s, tiny config
CONFIGS = {"tiny": "configs/train/tiny_instance.yaml", "r50": "configs/train/r50_instance.yaml"}
DEFAULT_SIZE = {"tiny": 128, "r50": 256}
DEFAULT_STEPS = {"tiny": 30, "r50": 8}  # per run; measured steps are these minus --warmup
DEFAULT_REPEATS = {"tiny": 3, "r50": 1}  # runs of each variant, in a rotating order
TAG = "[train_step]"  # child stderr lines with this prefix are shown live


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ data


def make_shards(tmp: Path, args: argparse.Namespace) -> tuple[str, int, float]:
    """(manifest path, categories, seconds)."""
    from core.manifest import Manifest
    from data_prep.shard import shard_dataset
    from data_prep.shard_config import (
        ExecutorConfig,
        ShardJobConfig,
        ShardLimits,
        SourceConfig,
    )
    from data_prep.synthetic import SyntheticSpec, make_synthetic

    t = time.perf_counter()
    make_synthetic(tmp / "raw", SyntheticSpec(train_images=args.images, val_images=0, min_size=args.min_size,
                                              max_size=args.max_size, seed=1, formats=("coco_instances",)))
    out = tmp / "shards"
    shard_dataset(ShardJobConfig(
        source=SourceConfig(format="coco_instances", root=str(tmp / "raw" / "coco"), split="train"),
        output=str(out), shard=ShardLimits(maxcount=args.maxcount), executor=ExecutorConfig(kind="inline"),
        progress=False))
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    return str(out / "manifest.json"), len(manifest.categories), time.perf_counter() - t


def overrides(run_dir: str, manifest: str, classes: int, steps: int, size: int, workers: int,
              zero_stage: int) -> list[str]:
    return [f"run_dir={run_dir}", f"data.manifest={manifest}", f"schedule.max_steps={steps}",
            f"checkpoint.every_steps={steps + 1_000_000}", f"checkpoint.local_dir={run_dir}_local",
            "export=false", f"data.num_workers={workers}", "log.print_every=1000000",
            "engine.precision=fp32", f"engine.zero_stage={zero_stage}", "model.backbone.pretrained=",
            "engine.micro_batch_size=2", "engine.grad_accumulation=1", f"data.aug.image_size={size}",
            f"model.num_classes={classes}"]


# ------------------------------------------------------------------------------------ children


def _show(step: int, steps: int) -> bool:
    """Progress lines: every step of a short run, about five of a long one."""
    return steps <= 10 or step % max(1, steps // 5) == 0 or step == steps


def _summary(rows: list[dict[str, float]], warmup: int) -> dict[str, Any]:
    kept = rows[warmup:] or rows
    ips = [r["images_per_s"] for r in kept]
    step_s = [r["seconds"] for r in kept]
    return {
        "images_per_s": statistics.median(ips),
        "s_per_step": statistics.median(step_s),
        "data_wait_fraction": statistics.fmean(r["data_wait_fraction"] for r in kept),
        "measured_steps": len(kept),
        "rows": kept,
        "losses": [round(r["loss"], 4) for r in rows],
    }


def child_ours(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from core.storage import Storage
    from pipeline.train_config import load_train_config
    from pipeline.trainer import Trainer

    cfg = load_train_config(ROOT / CONFIGS[args.config], json.loads(args.overrides))
    storage = Storage(cfg.storage)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, storage)
    setup_s = time.perf_counter() - t0
    steps = cfg.schedule.max_steps

    def progress(step: int, keys: list[str]) -> None:
        if _show(step, steps):
            _say(f"{TAG}   {args.config} ours: step {step}/{steps}")

    try:
        t1 = time.perf_counter()
        trainer.run(on_batch=progress)
        run_s = time.perf_counter() - t1
    finally:
        trainer.close()
    lines = Path(cfg.run_dir, "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    rows = [{"images_per_s": float(r["images_per_s"]), "data_wait_fraction": float(r["data_wait_fraction"]),
             "loss": float(r["loss/total"]),
             "seconds": cfg.engine.micro_batch_size * cfg.engine.grad_accumulation / float(r["images_per_s"])}
            for r in sorted(records, key=lambda r: r["step"])]
    return {**_summary(rows, args.warmup), "setup_s": setup_s, "run_s": run_s, "threads": torch.get_num_threads(),
            "steps": len(rows)}


def child_baseline(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from core.manifest import load_manifest
    from core.storage import Storage
    from model.structures import Targets
    from pipeline.loader import TrainLoader
    from pipeline.model_tools import build_model
    from pipeline.parallelize import build_optimizer, build_scheduler
    from pipeline.train_config import load_train_config
    from pipeline.trainer import ShardTransform, collate_batch, training_task

    cfg = load_train_config(ROOT / CONFIGS[args.config], json.loads(args.overrides))
    storage = Storage(cfg.storage)
    t0 = time.perf_counter()
    manifest = load_manifest(storage, cfg.data.manifest)
    device = torch.device("cpu")
    torch.manual_seed(cfg.seed)  # as the trainer: the same initial weights
    model = build_model(cfg.model, device, storage)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(cfg.seed * 1000 + 1)  # the trainer's fresh-start noise seed (rank 0)
    transform = ShardTransform(training_task(manifest, cfg), manifest.label_format, manifest.contiguous_ids(),
                               cfg.data.aug)
    loader = TrainLoader(cfg.loader_config(), transform, collate=collate_batch, storage=storage, rank=0,
                         world_size=1)
    setup_s = time.perf_counter() - t0
    steps = cfg.schedule.max_steps
    rows: list[dict[str, float]] = []
    batches = iter(loader)
    t1 = time.perf_counter()
    try:
        for step in range(1, steps + 1):
            started = time.perf_counter()
            model.train()
            batch = next(batches)
            waited = loader.last_wait_seconds
            if _show(step, steps):
                _say(f"{TAG}   {args.config} baseline: step {step}/{steps}")
            targets = [Targets(t.labels.to(device), t.boxes.to(device),
                               t.masks.to(device) if t.masks is not None else None) for t in batch.targets]
            num_masks = max(float(sum(len(t) for t in targets)), 1.0)
            terms = model(batch.images, targets, num_masks=num_masks)
            total = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            loss = float(total.detach())
            seconds = time.perf_counter() - started
            rows.append({"images_per_s": len(batch.images) / max(seconds, 1e-9),
                         "data_wait_fraction": min(1.0, waited / max(seconds, 1e-9)), "loss": loss,
                         "seconds": seconds})
    finally:
        batches.close()  # type: ignore[attr-defined]
    run_s = time.perf_counter() - t1
    return {**_summary(rows, args.warmup), "setup_s": setup_s, "run_s": run_s, "threads": torch.get_num_threads(),
            "steps": len(rows)}


def run_child(variant: str, name: str, ovr: list[str], warmup: int) -> dict[str, Any]:
    """One variant in a fresh process; its tagged stderr lines are echoed live, its JSON is the last stdout line."""
    cmd = [sys.executable, __file__, "--child", variant, "--config", name, "--overrides", json.dumps(ovr),
           "--warmup", str(warmup)]
    tail: deque[str] = deque(maxlen=60)
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith(TAG):
                print(line[len(TAG):].rstrip(), file=sys.stderr, flush=True)
            else:
                tail.append(line)
        rc = proc.wait()
        out.seek(0)
        stdout = out.read()
    jsons = [line for line in stdout.splitlines() if line.startswith("{")]
    if rc != 0 or not jsons:
        sys.stderr.write("".join(tail) + stdout[-3000:])
        raise SystemExit(f"{name} {variant} failed (exit {rc})")
    return json.loads(jsons[-1])


# ------------------------------------------------------------------------------------ main


def _parse_map(text: str | None, defaults: dict[str, int], names: list[str]) -> dict[str, int]:
    """"N" (all configs) or "tiny=N,r50=M"; missing names keep their defaults."""
    out = {n: defaults[n] for n in names}
    if not text:
        return out
    if "=" not in text:
        return {n: int(text) for n in names}
    for part in text.split(","):
        key, value = part.split("=")
        out[key.strip()] = int(value)
    return out


def _pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's figures over all its runs: medians / mean over the pooled measured steps."""
    rows = [r for run in runs for r in run["rows"]]
    return {"images_per_s": statistics.median(r["images_per_s"] for r in rows),
            "s_per_step": statistics.median(r["seconds"] for r in rows),
            "data_wait_fraction": statistics.fmean(r["data_wait_fraction"] for r in rows),
            "measured_steps": len(rows),
            "setup_s": statistics.median(run["setup_s"] for run in runs),
            "run_images_per_s": [round(run["images_per_s"], 3) for run in runs],
            "run_seconds": [round(run["run_s"], 1) for run in runs],
            "threads": runs[0]["threads"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,r50", help="comma-separated, of: tiny, r50")
    parser.add_argument("--steps", help="optimizer steps per run, warm-up included: N or tiny=N,r50=M "
                                        f"(default {DEFAULT_STEPS})")
    parser.add_argument("--image-size", help=f"LSJ crop size: N or tiny=N,r50=M (default {DEFAULT_SIZE})")
    parser.add_argument("--repeats", help=f"runs of each variant: N or tiny=N,r50=M (default {DEFAULT_REPEATS})")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the figures")
    parser.add_argument("--workers", type=int, default=1, help="data.num_workers")
    parser.add_argument("--zero-stage", type=int, default=2, help="engine.zero_stage for ours")
    parser.add_argument("--images", type=int, default=48, help="synthetic train images")
    parser.add_argument("--min-size", type=int, default=320)
    parser.add_argument("--max-size", type=int, default=640)
    parser.add_argument("--maxcount", type=int, default=16, help="samples per shard")
    parser.add_argument("--child", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child_ours(args) if args.child == "ours" else child_baseline(args)
        print(json.dumps(result), flush=True)
        return

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        parser.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
    steps = _parse_map(args.steps, DEFAULT_STEPS, names)
    sizes = _parse_map(args.image_size, DEFAULT_SIZE, names)
    repeats = _parse_map(args.repeats, DEFAULT_REPEATS, names)
    if any(steps[n] <= args.warmup for n in names) or any(repeats[n] < 1 for n in names):
        parser.error(f"need --steps > --warmup={args.warmup} and --repeats >= 1")
    started = time.perf_counter()
    loadavg_start = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_step_"))
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        _say(f"generating {args.images} synthetic images and sharding them ...")
        manifest, classes, prepare_s = make_shards(tmp, args)
        _say(f"  done in {prepare_s:.1f} s ({classes} categories)")
        for name in names:
            runs[name] = {"ours": [], "baseline": []}
            for rep in range(repeats[name]):
                order = ("ours", "baseline") if rep % 2 == 0 else ("baseline", "ours")
                for variant in order:
                    stage = args.zero_stage if variant == "ours" else 0  # no engine in the baseline: unused
                    run_dir = str(tmp / "runs" / f"{name}_{variant}_{rep}")
                    ovr = overrides(run_dir, manifest, classes, steps[name], sizes[name], args.workers, stage)
                    _say(f"{name} {variant} (run {rep + 1}/{repeats[name]}): {steps[name]} steps at "
                         f"{sizes[name]} px in a fresh process ...")
                    res = run_child(variant, name, ovr, args.warmup)
                    _say(f"  -> {res['images_per_s']:.2f} images/s, {res['s_per_step']:.3f} s/step, data wait "
                         f"{res['data_wait_fraction']:.1%} (set-up {res['setup_s']:.1f} s, run {res['run_s']:.1f} s)")
                    runs[name][variant].append(res)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall_s = time.perf_counter() - started

    results: dict[str, dict[str, Any]] = {}
    for name in names:
        ours, base = _pool(runs[name]["ours"]), _pool(runs[name]["baseline"])
        paired = [o["images_per_s"] / b["images_per_s"] for o, b in zip(runs[name]["ours"], runs[name]["baseline"])]
        # Same weights, data order and noise seeds: both sides must compute the same losses (a check
        # that the baseline does the same work; differences are float reassociation only).
        lo, lb = runs[name]["ours"][0]["losses"], runs[name]["baseline"][0]["losses"]
        loss_diff = max(abs(a - b) / max(abs(b), 1e-9) for a, b in zip(lo, lb))
        results[name] = {"ratio": ours["images_per_s"] / base["images_per_s"], "image_size": sizes[name],
                         "steps": steps[name], "repeats": repeats[name], "loss_max_rel_diff": loss_diff,
                         "paired_ratios": [round(x, 3) for x in paired], "ours": ours, "baseline": base}

    _say("")
    _say(f"{'config':<6} {'px':>4} {'variant':<9} {'images/s':>9} {'s/step':>8} {'data wait':>10} {'steps':>6}")
    for name in names:
        for variant in ("ours", "baseline"):
            r = results[name][variant]
            _say(f"{name:<6} {sizes[name]:>4} {variant:<9} {r['images_per_s']:>9.2f} {r['s_per_step']:>8.3f} "
                 f"{r['data_wait_fraction']:>10.1%} {r['measured_steps']:>6}")
        _say(f"{name:<6} {'':>4} {'ratio':<9} {results[name]['ratio']:>9.3f}   (per repeat: "
             f"{', '.join(f'{x:.2f}' for x in results[name]['paired_ratios'])}; losses agree to "
             f"{results[name]['loss_max_rel_diff']:.1e} relative)")
    _say(f"ours = Trainer, DeepSpeed ZeRO {args.zero_stage}, fp32, micro-batch 2, {args.workers} loader worker(s); "
         f"baseline = plain PyTorch loop, same model/data/loader; {args.warmup} warm-up steps per run left out; "
         f"wall {wall_s:.0f} s")

    def figures(r: dict[str, Any]) -> dict[str, Any]:
        return {"images_per_s": round(r["images_per_s"], 3), "s_per_step": round(r["s_per_step"], 4),
                "data_wait_fraction": round(r["data_wait_fraction"], 4), "measured_steps": r["measured_steps"],
                "setup_s": round(r["setup_s"], 2), "run_images_per_s": r["run_images_per_s"],
                "run_seconds": r["run_seconds"]}

    head = "tiny" if "tiny" in names else names[0]
    out: dict[str, Any] = {"bench": "train_step", "ratio": round(results[head]["ratio"], 3), "goal": GOAL}
    if head != "tiny":
        out["ratio_config"] = head
    for name in names:
        r = results[name]
        out[f"{name}_ratio"] = round(r["ratio"], 3)
    for name in names:
        r = results[name]
        out[name] = {"image_size": r["image_size"], "steps": r["steps"], "repeats": r["repeats"],
                     "paired_ratios": r["paired_ratios"], "loss_max_rel_diff": float(f"{r['loss_max_rel_diff']:.2g}"),
                     "ours": figures(r["ours"]),
                     "baseline": figures(r["baseline"])}
    out.update({"warmup_steps": args.warmup, "zero_stage": args.zero_stage, "precision": "fp32",
                "micro_batch_size": 2, "num_workers": args.workers, "threads": results[head]["ours"]["threads"],
                "images": args.images, "image_sides": [args.min_size, args.max_size], "classes": classes,
                "prepare_s": round(prepare_s, 1), "wall_s": round(wall_s, 1),
                "loadavg_1m_start": round(loadavg_start, 2), "loadavg_1m": round(os.getloadavg()[0], 2)})
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
