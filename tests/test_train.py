"""Training end to end (pipeline/trainer.py): two-process DeepSpeed runs on moto S3 for ZeRO 0-3,
exact resume after a hard kill, a 2-rank checkpoint resumed on 1 rank, the learning rates and weight
decays actually applied, stage transfer from a detection-only Objects365 pretrain, and the faults a
multi-day run must survive or refuse up front.

Every run uses the tiny model on 96-128 px synthetic images (LSJ at 128). Two-process runs go through
`torchrun -m cli train` as a user would; single-process runs build the Trainer here so the
test can look inside (applied hyper-parameters, weights after a resume, sample keys)."""
from __future__ import annotations

import io
import json
import math
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors

from core.storage import Storage
from data_prep.synthetic import SyntheticSpec, make_synthetic
from model.config import ModelConfig
from model.maskdino import MaskDINO
from pipeline import checkpoint as ckpt
from cli import main
from core.config import config_to_dict
from pipeline.train_config import TrainConfig, load_train_config
from pipeline.trainer import Trainer, train
from pipeline.transfer import read_transfer_report
from tests.s3_fixtures import create_bucket, make_storage
from tests.shard_helpers import run_shard

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "train" / "tiny_instance.yaml"
COMMON = ["data.num_workers=0", "log.print_every=1000", "schedule.warmup_steps=0", "schedule.milestones=[1000]"]
# The two-process acceptance runs: 20 steps, a checkpoint every 5 (stage 2 is also the resume baseline).
STEPS, EVERY = 20, 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_train(overrides: list[str], nproc: int = 2, env: dict[str, str] | None = None
                   ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "cli", "train", str(CONFIG),
           *COMMON, *overrides]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=900, check=False)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def read_metrics(storage: Storage, run_dir: str) -> dict[int, dict[str, Any]]:
    """step -> metrics; a step logged twice (before a kill and after the resume) keeps the last record."""
    rows = [json.loads(line) for line in storage.read_bytes(f"{run_dir}/metrics.jsonl").decode().splitlines()]
    return {r["step"]: r for r in rows}


def losses(storage: Storage, run_dir: str) -> dict[int, float]:
    return {s: float(r["loss/total"]) for s, r in read_metrics(storage, run_dir).items()}


def bundle_weights(storage: Storage, run_dir: str) -> dict[str, torch.Tensor]:
    return load_safetensors(storage.read_bytes(f"{run_dir}/model/model.safetensors"))


def config(tmp_path: Path, *overrides: str) -> TrainConfig:
    return load_train_config(CONFIG, [*COMMON, f"checkpoint.local_dir={tmp_path / 'local'}", *overrides])


# --------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    make_synthetic(root, SyntheticSpec(train_images=8, val_images=0, min_size=96, max_size=128, seed=1,
                                       formats=("coco_instances", "objects365_v2"), o365_categories=365))
    return root


@pytest.fixture(scope="module")
def shards(raw, tmp_path_factory) -> Path:
    """8 instance samples in 2 shards of 4."""
    out = tmp_path_factory.mktemp("instance_shards")
    run_shard(out, _extra={"shard.maxcount": 4}, format="coco_instances", root=str(raw / "coco"), split="train")
    return out


@pytest.fixture(scope="module")
def s3(s3_server, shards) -> tuple[Storage, str]:
    """(storage, bucket URI) with the instance shards under shards/."""
    storage = make_storage(s3_server)
    bucket = f"s3://{create_bucket(s3_server, 'train')}"
    for path in [shards / "manifest.json", *sorted(shards.glob("*.tar"))]:
        storage.write_bytes(f"{bucket}/shards/{path.name}", path.read_bytes())
    return storage, bucket


def _s3_args(s3_server: str, bucket: str, run: str) -> list[str]:
    return [f"run_dir={bucket}/runs/{run}", f"data.manifest={bucket}/shards/manifest.json",
            f"storage.endpoint_url={s3_server}", "storage.region=us-east-1"]


@pytest.fixture(scope="module")
def zero_runs(s3_server, s3, tmp_path_factory):
    """run name -> rank-averaged losses of two-process runs on S3, started on first use."""
    storage, bucket = s3
    done: dict[str, dict[int, float]] = {}

    def run(stage: int) -> dict[int, float]:
        name = f"zero{stage}"
        if name not in done:
            local = tmp_path_factory.mktemp(name)
            _ok(torchrun_train([*_s3_args(s3_server, bucket, name), f"engine.zero_stage={stage}",
                                f"schedule.max_steps={STEPS}", f"checkpoint.every_steps={EVERY}",
                                "checkpoint.keep_last=0", f"checkpoint.local_dir={local}"]))
            done[name] = losses(storage, f"{bucket}/runs/{name}")
        return done[name]

    return run


# --------------------------------------------------------------------------------------------- 1. ZeRO


@pytest.mark.s3
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_process_training_on_s3_decreases_the_loss(zero_runs, s3, stage):
    storage, bucket = s3
    curve = zero_runs(stage)
    assert sorted(curve) == list(range(1, STEPS + 1))
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (18, 19, 20)) / 3
    print(f"ZeRO-{stage}: mean loss of steps 1-3 {first:.1f}, of steps 18-20 {last:.1f}")
    assert last < 0.75 * first, curve
    run = f"{bucket}/runs/zero{stage}"
    assert [s for s, _ in ckpt.complete_checkpoints(storage, run)] == [5, 10, 15, 20]
    marker = ckpt.read_marker(storage, ckpt.checkpoint_uri(run, 20))
    assert marker.world_size == 2 and marker.meta["zero_stage"] == stage
    names = {f.name for f in marker.files}
    assert {"trainer_state/rank_0.pt", "trainer_state/rank_1.pt"} <= names
    assert len(bundle_weights(storage, run)) == len(MaskDINO(load_train_config(CONFIG).model).state_dict())


@pytest.mark.s3
def test_zero2_gives_the_losses_of_stage0(zero_runs):
    """Same seed, data and model: ZeRO-2 partitions the optimizer and reduce-scatters gradients, which only
    changes float summation order. Stated tolerance: 1e-4 relative over the first 10 steps."""
    plain, zero2 = zero_runs(0), zero_runs(2)
    worst = max(abs(zero2[s] - plain[s]) / abs(plain[s]) for s in range(1, 11))
    print(f"ZeRO-2 vs stage 0, steps 1-10: max relative loss difference {worst:.2e}")
    for step in range(1, 11):
        assert zero2[step] == pytest.approx(plain[step], rel=1e-4), step


# --------------------------------------------------------------------------------------------- 2. resume


@pytest.mark.s3
def test_killed_at_step_12_and_resumed_repeats_steps_11_to_20(zero_runs, s3_server, s3, tmp_path):
    """The uninterrupted run is the ZeRO-2 run above. The killed run exits hard (no clean-up) right after
    step 12; `resume: auto` finds step 10 (the newest complete checkpoint) and trains 11..20. Stated
    tolerance 1e-9 relative (the CPU run is bit-identical: same data order, RNG and optimizer state)."""
    storage, bucket = s3
    args = [*_s3_args(s3_server, bucket, "killed"), "engine.zero_stage=2", f"schedule.max_steps={STEPS}",
            f"checkpoint.every_steps={EVERY}", f"checkpoint.local_dir={tmp_path}"]
    killed = torchrun_train([*args, "faults.crash_after_step=12"])
    assert killed.returncode != 0
    run = f"{bucket}/runs/killed"
    assert ckpt.latest_complete(storage, run)[0] == 10
    resumed = _ok(torchrun_train(args))
    assert f"resumed from {run}/checkpoints/step_00000010 at step 10" in resumed.stdout
    baseline, after = zero_runs(2), losses(storage, run)
    worst = max(abs(after[s] - baseline[s]) for s in range(11, STEPS + 1))
    print(f"resume after a kill at step 12: steps 11-20 max absolute loss difference {worst:.3g}")
    for step in range(11, STEPS + 1):
        assert after[step] == pytest.approx(baseline[step], rel=1e-9), step
    metrics = read_metrics(storage, run)
    assert metrics[STEPS]["data/samples"] == read_metrics(storage, f"{bucket}/runs/zero2")[STEPS]["data/samples"]


# --------------------------------------------------------------------------------------------- 3. 2 -> 1 rank


@pytest.mark.s3
def test_two_rank_checkpoint_resumes_on_one_rank(zero_runs, s3_server, s3, tmp_path):
    storage, bucket = s3
    zero_runs(2)
    source = f"{bucket}/runs/zero2"
    cfg = config(tmp_path, *_s3_args(s3_server, bucket, "one_rank"), "engine.zero_stage=2",
                 f"resume={ckpt.checkpoint_uri(source, STEPS)}", f"schedule.max_steps={STEPS + 2}",
                 "engine.grad_accumulation=2")  # 1 rank x 2 micro-batches: the 2-rank global batch
    trainer = Trainer(cfg, storage)
    try:
        assert trainer.universal and trainer.step == STEPS
        loaded = trainer._full_state_dict()
        for name, tensor in bundle_weights(storage, source).items():
            assert torch.equal(loaded[name], tensor), name
        assert trainer.scheduler.last_epoch == STEPS
        result = trainer.run()
    finally:
        trainer.close()
    assert result.steps == STEPS + 2 and all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())


# --------------------------------------------------------------------------------------------- 4. param groups


def _pick(model: torch.nn.Module) -> dict[str, str]:
    """A backbone weight, a norm weight and a head weight of the tiny model."""
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm) and "backbone" not in n]
    return {"backbone": "backbone.body.patch_embed.proj.weight", "norm": f"{norms[0]}.weight",
            "head": "predictor.class_embed.weight"}


def test_applied_learning_rates_and_weight_decays_after_init_and_after_resume(shards, tmp_path):
    """lr 1e-4, backbone x0.1, weight decay 0.05 but 0 on norms; the LR drops x0.1 from step 1
    (milestones [1]), so after a resume at step 2 every group runs at a tenth."""
    args = [f"run_dir={tmp_path / 'run'}", f"data.manifest={shards / 'manifest.json'}", "schedule.max_steps=2",
            "checkpoint.every_steps=2", "schedule.milestones=[1]", "export=false"]
    trainer = Trainer(config(tmp_path, *args), Storage())
    try:
        names = _pick(trainer.engine.module)
        applied = trainer.applied_hyperparams()
        assert applied[names["backbone"]] == pytest.approx((1e-5, 0.05))
        assert applied[names["norm"]] == pytest.approx((1e-4, 0.0))
        assert applied[names["head"]] == pytest.approx((1e-4, 0.05))
        trainer.run()
    finally:
        trainer.close()
    resumed = Trainer(config(tmp_path, *args[:2], "schedule.max_steps=3", "schedule.milestones=[1]", "export=false"),
                      Storage())
    try:
        assert resumed.step == 2
        applied = resumed.applied_hyperparams()
        assert applied[names["backbone"]] == pytest.approx((1e-6, 0.05))
        assert applied[names["norm"]] == pytest.approx((1e-5, 0.0))
        assert applied[names["head"]] == pytest.approx((1e-5, 0.05))
    finally:
        resumed.close()


# --------------------------------------------------------------------------------------------- 5. transfer


def _label_shaped(cfg: ModelConfig) -> set[str]:
    """Oracle for "label-dependent": the tensors whose shape changes with num_classes."""
    small = {k: v.shape for k, v in MaskDINO(cfg).state_dict().items()}
    other = config_to_dict(cfg) | {"num_classes": cfg.num_classes + 3}
    from core.config import config_from_dict

    big = {k: v.shape for k, v in MaskDINO(config_from_dict(ModelConfig, other)).state_dict().items()}
    return {k for k in small if small[k] != big[k]}


def test_stage_transfer_from_a_detection_only_objects365_pretrain(raw, shards, tmp_path):
    o365 = tmp_path / "o365_shards"
    run_shard(o365, _extra={"shard.maxcount": 4, "source.version": "v2"}, format="objects365",
              root=str(raw / "objects365_v2"),
              split="train")
    pretrain = tmp_path / "pretrain"
    pretrain_cfg = load_train_config(ROOT / "configs" / "train" / "tiny_o365_pretrain.yaml", [
        *COMMON, f"run_dir={pretrain}", f"data.manifest={o365 / 'manifest.json'}", "schedule.max_steps=2",
        "checkpoint.every_steps=2", f"checkpoint.local_dir={tmp_path / 'local'}"])
    assert pretrain_cfg.model.num_classes == 365 and not pretrain_cfg.model.loss.mask_losses
    result = train(pretrain_cfg, Storage())
    assert result.steps == 2
    logged = read_metrics(Storage(), str(pretrain))[2]
    assert "loss/loss_bbox" in logged and not any("mask" in k or "dice" in k for k in logged)  # boxes only
    source = load_safetensors((pretrain / "model" / "model.safetensors").read_bytes())
    assert source["predictor.class_embed.weight"].shape[0] == 365

    finetune = tmp_path / "finetune"
    cfg = config(tmp_path, f"run_dir={finetune}", f"data.manifest={shards / 'manifest.json'}",
                 f"init_from={pretrain / 'model'}", "schedule.max_steps=1", "checkpoint.every_steps=1")
    trainer = Trainer(cfg, Storage())
    try:
        start = trainer.engine.module.state_dict()
        expected = _label_shaped(cfg.model)
        report = read_transfer_report(Storage(), str(finetune / "transfer.json"))
        assert set(report.reinitialised) == expected and len(report.reinitialised) == len(expected)
        assert set(report.loaded) == set(start) - expected and not report.dropped
        for name in report.loaded:  # everything else starts from the pretrain
            assert torch.equal(start[name].cpu(), source[name]), name
        trainer.run()
    finally:
        trainer.close()


# --------------------------------------------------------------------------------------------- 6. faults


@pytest.mark.s3
def test_cut_s3_reads_are_resumed_and_every_sample_is_seen_once(s3, fault_proxy, tmp_path):
    _, bucket = s3
    for shard in ("shard-000000", "shard-000001"):  # the first GET of each shard dies mid-body
        fault_proxy.cut_next(1, after_bytes=9000, path_contains=shard)
    cfg = config(tmp_path, f"run_dir={bucket}/runs/cuts", f"data.manifest={bucket}/shards/manifest.json",
                 "schedule.max_steps=4", "checkpoint.every_steps=4", "export=false")
    seen: list[str] = []
    trainer = Trainer(cfg, fault_proxy.storage())
    try:
        result = trainer.run(on_batch=lambda step, keys: seen.extend(keys))
    finally:
        trainer.close()
    assert fault_proxy.cuts >= 1
    assert len(seen) == 8 and len(set(seen)) == 8  # 4 steps x 2 = one epoch: each sample exactly once
    assert result.loader_stats.samples == 8


def _shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.tar"))


@pytest.fixture()
def shards_copy(shards, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(shards, tmp_path / "shards"))


def test_a_shard_that_keeps_failing_stops_the_run_naming_it(shards_copy, tmp_path, capsys):
    broken = _shard_files(shards_copy)[1]
    broken.unlink()
    code = main(["train", str(CONFIG), *COMMON, f"run_dir={tmp_path / 'run'}", "schedule.max_steps=6",
                 f"data.manifest={shards_copy / 'manifest.json'}", "data.retry_backoff_s=0",
                 f"checkpoint.local_dir={tmp_path / 'local'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and broken.name in err, err


def test_a_failing_shard_is_skipped_and_counted_when_the_config_says_so(shards_copy, tmp_path):
    _shard_files(shards_copy)[1].unlink()
    run = tmp_path / "run"
    result = train(config(tmp_path, f"run_dir={run}", f"data.manifest={shards_copy / 'manifest.json'}",
                          "data.retry_backoff_s=0", "data.skip_failed_shards=true", "schedule.max_steps=4",
                          "checkpoint.every_steps=4", "export=false"), Storage())
    assert result.steps == 4 and result.loader_stats.shards_skipped >= 1
    assert read_metrics(Storage(), str(run))[4]["data/shards_skipped"] >= 1


def _break_one_image(shard: Path) -> str:
    """Overwrite the first JPEG in the tar with zeros of the same length; returns its sample key."""
    data = bytearray(shard.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    data[member.offset_data: member.offset_data + member.size] = bytes(member.size)
    shard.write_bytes(bytes(data))
    return member.name.rsplit(".", 1)[0]


def test_an_undecodable_image_is_skipped_counted_and_logged(shards_copy, tmp_path, caplog):
    key = _break_one_image(_shard_files(shards_copy)[0])
    run = tmp_path / "run"
    seen: list[str] = []
    trainer = Trainer(config(tmp_path, f"run_dir={run}", f"data.manifest={shards_copy / 'manifest.json'}",
                             "schedule.max_steps=4", "checkpoint.every_steps=4", "export=false"), Storage())
    try:
        result = trainer.run(on_batch=lambda step, keys: seen.extend(keys))
    finally:
        trainer.close()
    assert result.steps == 4 and result.loader_stats.skipped_undecodable >= 1
    assert key not in seen and key in caplog.text
    assert read_metrics(Storage(), str(run))[4]["data/skipped_undecodable"] >= 1


@pytest.mark.parametrize("case", ["unknown key", "missing manifest", "no marker", "garbage marker",
                                  "checksum mismatch"])
def test_bad_inputs_fail_before_training_with_one_line(case, shards, tmp_path, capsys):
    run = tmp_path / "run"
    args = [f"run_dir={run}", f"data.manifest={shards / 'manifest.json'}", "schedule.max_steps=3",
            f"checkpoint.local_dir={tmp_path / 'local'}"]
    torn = tmp_path / "ckpt"
    torn.mkdir()
    if case == "unknown key":
        args.append("optim.learning_rate=0.1")
        expect = "optim.learning_rate"
    elif case == "missing manifest":
        args.append(f"data.manifest={tmp_path / 'nowhere' / 'manifest.json'}")
        expect = "nowhere"
    elif case == "no marker":
        args.append(f"resume={torn}")
        expect = "COMPLETE.json"
    elif case == "garbage marker":
        (torn / "COMPLETE.json").write_text("{not json")
        args.append(f"resume={torn}")
        expect = "unreadable"
    else:  # a complete-looking checkpoint whose file was changed after publishing
        assert train(config(tmp_path, f"run_dir={tmp_path / 'good'}", f"data.manifest={shards / 'manifest.json'}",
                            "schedule.max_steps=1", "checkpoint.every_steps=1", "export=false"), Storage()).steps == 1
        good = ckpt.checkpoint_uri(str(tmp_path / "good"), 1)
        state = Path(good) / "trainer_state" / "rank_0.pt"
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
        state.write_bytes(bytes(data))
        args.append(f"resume={good}")
        expect = "sha256"
        capsys.readouterr()  # the good run's progress lines
    code = main(["train", str(CONFIG), *COMMON, *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expect in err, err
    assert not (run / "metrics.jsonl").exists()  # nothing trained


def test_bf16_runs_the_forward_under_autocast_and_keeps_fp32_weights(shards, tmp_path):
    run = tmp_path / "run"
    result = train(config(tmp_path, f"run_dir={run}", f"data.manifest={shards / 'manifest.json'}",
                          "engine.precision=bf16", "schedule.max_steps=2", "checkpoint.every_steps=2"), Storage())
    assert result.steps == 2 and all(math.isfinite(v) for v in result.losses.values())
    weights = load_safetensors((run / "model" / "model.safetensors").read_bytes())
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_the_deepspeed_launcher_runs_the_same_entrypoint_on_two_ranks(shards, tmp_path):
    """`deepspeed --num_gpus 2` (on CPU it starts one rank unless told) passes --local_rank=N first."""
    run = tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "--module", "cli", "train", str(CONFIG), *COMMON,
           f"run_dir={run}", f"data.manifest={shards / 'manifest.json'}", "schedule.max_steps=2",
           "checkpoint.every_steps=2", f"checkpoint.local_dir={tmp_path / 'local'}"]
    _ok(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False))
    marker = ckpt.read_marker(Storage(), ckpt.checkpoint_uri(str(run), 2))
    assert marker.world_size == 2 and (run / "model" / "model.safetensors").exists()
    assert sorted(losses(Storage(), str(run))) == [1, 2]
