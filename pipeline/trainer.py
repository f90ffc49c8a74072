"""The training run: DeepSpeed ZeRO on streamed shards, checkpointed and exactly resumable.

`train(cfg, storage)` is the one entrypoint; it runs the same in one process, under torchrun / the deepspeed
launcher, and (issue 6) under Ray Train. Order of the set-up (each step needs the one before):

1. `preflight`: every input is checked (manifest readable and matching the model's classes, the
   resume checkpoint complete, the init bundle present) before a process group or model exists.
2. Process group (gloo on CPU, nccl on GPU; a world of one when no launcher made one: DeepSpeed
   needs a group either way).
3. The model, built with `torch.manual_seed(seed)` so every rank starts from the same weights;
   stage transfer from `init_from` when starting afresh.
4. The DeepSpeed engine (pipeline/parallelize.py).
5. Resume: the checkpoint is fetched and verified, DeepSpeed loads model/optimizer/scheduler, then
   each rank restores its own state file: its loader position and its RNG. DeepSpeed's client
   state would keep only rank 0's, and every rank reads different shards and draws its own noise.
6. The loop. One step = `grad_accumulation` micro-batches then one optimizer step. `num_masks` is
   averaged over ranks as the official code does; loss terms and loader counters are averaged /
   summed over ranks in one all-reduce and logged by rank 0.
7. Checkpoints every `checkpoint.every_steps` and at the end: DeepSpeed saves locally, every rank
   publishes its files, rank 0 writes the completion marker last (pipeline/checkpoint.py).
8. Export: the fp32 weights as a model bundle in `run_dir/model` for evaluation and registration.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from core.config import ConfigError, dump_config
from core.manifest import Manifest
from core.records import Category
from core.shard_sample import ShardSample
from core.storage import Storage, StorageError, join
from model.structures import Targets
from pipeline import checkpoint as ckpt
from pipeline.distributed import gather_to_rank0, init_from_env, rank_and_world
from pipeline.loader import LoaderStats, TrainLoader, read_training_manifest
from pipeline.model_bundle import save_bundle
from pipeline.model_tools import build_model
from pipeline.parallelize import applied_hyperparams, build_engine
from pipeline.targets import TrainSample
from pipeline.tracking import (
    Logger,
    StepMetrics,
    flatten_config,
    make_logger,
    peak_memory_mb,
)
from pipeline.train_config import TrainConfig
from pipeline.transfer import TransferReport, save_transfer_report, transfer_from_bundle
from pipeline.transforms import AugConfig, collate, train_transform

log = logging.getLogger(__name__)

BUNDLE_DIR = "model"
TRANSFER_REPORT = "transfer.json"
STATE_DIR = "trainer_state"  # per-rank files `rank_<r>.pt` inside each checkpoint


class TrainError(RuntimeError):
    """The run cannot start or go on; `str()` is one line naming what and the fix."""


@dataclass
class TrainResult:
    rank: int
    run_dir: str
    steps: int  # optimizer steps done in total (including those before a resume)
    resumed_from: str | None
    checkpoints: list[str]  # published by this process's run, in order
    bundle: str | None
    transfer: TransferReport | None
    loader_stats: LoaderStats
    losses: dict[int, float] = field(default_factory=dict)  # step -> total loss (rank-averaged)


# --------------------------------------------------------------------------------------- data


class ShardTransform:
    """Picklable (DataLoader workers) shard sample -> TrainSample | None, the official recipe of the task."""

    def __init__(self, task: str, label_format: str | None, contiguous_ids: dict[int, int], aug: AugConfig):
        self.task, self.label_format, self.contiguous_ids, self.aug = task, label_format, contiguous_ids, aug

    def __call__(self, sample: ShardSample, rng: np.random.Generator) -> TrainSample | None:
        return train_transform(sample.image, sample.meta, sample.label_png, self.task, self.label_format,
                               self.contiguous_ids, self.aug, rng, sample.key)


@dataclass
class TrainBatch:
    """One micro-batch: raw images [3, H, W] (0..255), their targets and shard sample keys."""

    images: list[Tensor]
    targets: list[Targets]
    keys: list[str]


def collate_batch(samples: list[TrainSample]) -> TrainBatch:
    images, targets = collate(samples)
    return TrainBatch(images, targets, [s.key for s in samples])


OnBatch = Callable[[int, list[str]], None]


def training_task(manifest: Manifest, cfg: TrainConfig) -> str:
    """The target builder a run uses: the manifest's task, or boxes only for a detection-only model."""
    if manifest.task == "instance" and not cfg.model.loss.mask_losses:
        return "detection"
    return manifest.task


# --------------------------------------------------------------------------------------- preflight


@dataclass(frozen=True)
class Plan:
    """What preflight found: the manifest, and where the run starts from."""

    manifest: Manifest
    resume_uri: str | None  # a complete checkpoint to resume from, or None to start afresh
    resume_marker: ckpt.CheckpointMarker | None = None

    @property
    def resume_step(self) -> int:
        return self.resume_marker.step if self.resume_marker else 0


def _fail(message: str) -> TrainError:
    return TrainError(message)


def preflight(cfg: TrainConfig, storage: Storage) -> Plan:
    """Every check that needs I/O but no process group: fails with one line before training starts."""
    manifest = read_training_manifest(storage, cfg.data.manifest)
    if len(manifest.categories) != cfg.model.num_classes:
        raise _fail(f"the model has num_classes={cfg.model.num_classes} but {cfg.data.manifest} "
                    f"({manifest.dataset}) has {len(manifest.categories)} categories; set "
                    f"model.num_classes={len(manifest.categories)}")
    if manifest.task == "detection" and cfg.model.loss.mask_losses:
        raise _fail(f"{manifest.dataset} has boxes only (task detection); train it detection-only with "
                    "model.loss.mask_losses=false")
    if manifest.task not in ("instance", "detection", "panoptic", "semantic"):
        raise _fail(f"{cfg.data.manifest}: task {manifest.task!r} cannot be trained")
    resume_uri, marker = _resume_point(cfg, storage)
    if marker is not None:
        _check_resumable(marker, resume_uri or "", cfg)
    if resume_uri is None and cfg.init_from and not storage.exists(join(cfg.init_from, "model.safetensors")):
        raise _fail(f"init_from={cfg.init_from} is not a model bundle (no model.safetensors); point it at "
                    "a finished run's model/ folder")
    return Plan(manifest, resume_uri, marker)


def _resume_point(cfg: TrainConfig, storage: Storage) -> tuple[str | None, ckpt.CheckpointMarker | None]:
    mode = cfg.resume_mode
    if mode == "uri":
        return cfg.resume, _readable_marker(storage, cfg.resume)
    existing = ckpt.complete_checkpoints(storage, cfg.run_dir)
    if mode == "never":
        if existing:
            raise _fail(f"{cfg.run_dir} already has checkpoints (newest step {existing[-1][0]}) and resume=never; "
                        "use resume=auto to continue it or another run_dir to start afresh")
        return None, None
    if not existing:
        return None, None
    _, uri = existing[-1]
    return uri, _readable_marker(storage, uri)


def _check_resumable(marker: ckpt.CheckpointMarker, uri: str, cfg: TrainConfig) -> None:
    saved_stage = int(marker.meta.get("zero_stage", cfg.engine.zero_stage))
    if (saved_stage == 0) != (cfg.engine.zero_stage == 0):
        raise _fail(f"{uri} was saved with ZeRO stage {saved_stage} and this run uses stage "
                    f"{cfg.engine.zero_stage}; DeepSpeed converts between stages 1-3 only: set "
                    f"engine.zero_stage={saved_stage} or start afresh (resume=never)")
    if marker.step >= cfg.schedule.max_steps:
        raise _fail(f"{uri} is at step {marker.step}, not before schedule.max_steps={cfg.schedule.max_steps}: "
                    "nothing to train; raise schedule.max_steps to continue the run")


def needs_universal(marker: ckpt.CheckpointMarker, world_size: int, zero_stage: int) -> bool:
    """ZeRO 1-3 partitions optimizer state by rank: another world size (or stage) loads through
    DeepSpeed's universal checkpoint. Stage 0 keeps whole states and loads directly."""
    saved_stage = int(marker.meta.get("zero_stage", zero_stage))
    return zero_stage > 0 and (marker.world_size != world_size or saved_stage != zero_stage)


def _readable_marker(storage: Storage, uri: str) -> ckpt.CheckpointMarker:
    """The marker of a checkpoint that can be resumed, or TrainError saying why not."""
    try:
        marker = ckpt.read_marker(storage, uri)
    except (StorageError, ValueError, KeyError, TypeError) as exc:
        raise _fail(f"cannot read checkpoint {uri}: {ckpt.MARKER_NAME} is unreadable ({exc}); resume from another "
                    "checkpoint (resume=URI) or start afresh (resume=never)") from exc
    if marker is None:
        raise _fail(f"cannot resume from {uri}: no {ckpt.MARKER_NAME}, so it is not a complete checkpoint; pick a "
                    f"complete one under {ckpt.CHECKPOINTS_DIR}/ or start afresh (resume=never)")
    if not any(f.name.endswith(f"{STATE_DIR}/rank_0.pt") for f in marker.files):
        raise _fail(f"cannot resume from {uri}: it has no {STATE_DIR}/ files, so it was not written by this trainer")
    return marker


def convert_to_universal(checkpoint_dir: str, output_dir: str) -> None:
    """DeepSpeed's ds_to_universal, in this process (one worker: no process pool on small machines)."""
    # deepspeed (seconds to import) comes with the engine (pipeline/parallelize.py), not with this module
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    shutil.rmtree(output_dir, ignore_errors=True)
    ds_to_universal(argparse.Namespace(input_folder=checkpoint_dir, output_folder=output_dir,
                                       num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                       strict=True, inject_missing_state=True))


# --------------------------------------------------------------------------------------- process group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_process_group() -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the group, so that `close` must destroy it: not
    when the caller (Ray Train, a test) made it)."""
    existed = dist.is_initialized()
    if init_from_env():
        rank, world = rank_and_world()
        return rank, world, not existed  # a launcher's group joined here is ours to destroy at the end
    # DeepSpeed wants a group and the launcher's variables even for one process.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    # Kept for the life of the process: DeepSpeed caches its process groups, so a second run in the same
    # process (tests, notebooks) must find the same group alive.
    return 0, 1, False


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# --------------------------------------------------------------------------------------- state files


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _state_path(ckpt_dir: str, rank: int) -> str:
    return os.path.join(ckpt_dir, STATE_DIR, f"rank_{rank}.pt")


# --------------------------------------------------------------------------------------- the trainer


class Trainer:
    """One run of `cfg`. Use `run()`; `close()` releases the process group and the logger."""

    def __init__(self, cfg: TrainConfig, storage: Storage, logger: Logger | None = None):
        self.cfg = cfg
        self.storage = storage
        self.plan = preflight(cfg, self.storage)  # before anything expensive or collective
        self.rank, self.world, self._own_group = init_process_group()
        self.logger: Logger | None = logger
        self._fetch_error: TrainError | None = None  # set by _fetch on the rank that downloads
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        cfg = self.cfg
        self.device = _device()
        self.local_root = self._local_root()
        self.categories: list[Category] = list(self.plan.manifest.categories)
        self.transfer: TransferReport | None = None
        self.model = self._build_model()
        marker = self.plan.resume_marker
        self.universal = marker is not None and needs_universal(marker, self.world, cfg.engine.zero_stage)
        self.engine, self.optimizer, self.scheduler = build_engine(
            self.model, cfg.optim, cfg.schedule, cfg.engine, self.world, load_universal=self.universal)
        self.step = 0
        loader_state = self._resume() if self.plan.resume_uri else self._fresh_start()
        self.loader = TrainLoader(cfg.loader_config(), self._transform(), collate=collate_batch, storage=self.storage,
                                  rank=self.rank, world_size=self.world, state=loader_state,
                                  manifest=self.plan.manifest)  # read once, by preflight
        self.checkpoints: list[str] = []
        self._on_batch: OnBatch | None = None
        self._data_counts: dict[str, int] = {}
        # Last: a run that fails to start leaves no metrics file behind.
        if self.logger is None:
            self.logger = make_logger(cfg.run_dir, cfg.schedule.max_steps, self.storage, cfg.log.print_every)
        if self.rank == 0:
            self.storage.write_bytes(join(cfg.run_dir, "config.yaml"), dump_config(cfg).encode())
            self.logger.log_params(flatten_config(cfg))

    # ------------------------------------------------------------------ set-up

    def _local_root(self) -> str:
        if self.cfg.checkpoint.local_dir:
            return self.cfg.checkpoint.local_dir
        run = self.cfg.run_dir.replace("://", "_").replace("/", "_").strip("_")
        return os.path.join(tempfile.gettempdir(), "maskdino-train", run[-120:])

    def _build_model(self) -> torch.nn.Module:
        torch.manual_seed(self.cfg.seed)  # the same initial weights on every rank
        model = build_model(self.cfg.model, self.device, self.storage)
        if self.plan.resume_uri is None and self.cfg.init_from:
            self.transfer = transfer_from_bundle(model, self.storage, self.cfg.init_from, self.categories)
            if self.rank == 0:
                save_transfer_report(self.storage, join(self.cfg.run_dir, TRANSFER_REPORT), self.transfer)
                for line in self.transfer.lines():
                    print(line, flush=True)
        return model

    def _transform(self) -> ShardTransform:
        m = self.plan.manifest
        return ShardTransform(training_task(m, self.cfg), m.label_format, m.contiguous_ids(), self.cfg.data.aug)

    def _fresh_start(self) -> None:
        # Per-rank RNG for the training noise (DN, point sampling, drop path): ranks must differ.
        torch.manual_seed(self.cfg.seed * 1000 + 1 + self.rank)

    def _resume(self) -> dict[str, Any]:
        uri, step, marker = self.plan.resume_uri, self.plan.resume_step, self.plan.resume_marker
        assert uri is not None and marker is not None
        local = os.path.join(self.local_root, "resume", f"step_{step:08d}")
        tag = os.path.basename(local) + ("_universal" if self.universal else "")
        ok = True
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one download (and conversion) per node
            ok = self._fetch(uri, local)
        self._all_ok(ok, f"cannot resume from {uri}: another rank could not fetch it (see its log)")
        if marker.world_size != self.world:
            log.warning("checkpoint %s was written by %d ranks; resuming on %d through a universal checkpoint",
                        uri, marker.world_size, self.world)
        groups = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in self.optimizer.param_groups]
        self.engine.load_checkpoint(os.path.dirname(local), tag=tag, load_module_strict=True,
                                    load_optimizer_states=True, load_lr_scheduler_states=True)
        if self.universal and self.cfg.engine.zero_stage == 3:
            self._repair_zero3_groups(groups)
        self.step = step
        state_file = _state_path(local, self.rank)
        if not os.path.exists(state_file):  # a checkpoint from fewer ranks: no own state
            state_file = _state_path(local, 0)
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        if state["rank"] == self.rank and state["world_size"] == self.world:
            _set_rng_state(state["rng"])
        else:
            torch.manual_seed(self.cfg.seed * 1000 + 1 + self.rank + 7919 * step)
        dist.barrier()  # every rank has read the local copy
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            shutil.rmtree(local, ignore_errors=True)
            shutil.rmtree(local + "_universal", ignore_errors=True)
        if self.rank == 0:
            print(f"resumed from {uri} at step {step}", flush=True)
        return state["loader"]

    def _fetch(self, uri: str, local: str) -> bool:
        """Download and verify the checkpoint; convert it to a universal one when the layout changed.
        Returns False (after logging) on failure so the other ranks are told instead of left waiting."""
        shutil.rmtree(local, ignore_errors=True)
        try:
            ckpt.fetch(self.storage, uri, local)
            if self.universal:
                convert_to_universal(local, local + "_universal")
        except (ckpt.CheckpointPublishError, StorageError) as exc:
            self._fetch_error = _fail(f"cannot resume from {uri}: {exc}; resume from another checkpoint "
                                      "(resume=URI) or start afresh (resume=never)")
            if self.world > 1:  # the other ranks only learn that it failed
                log.error("%s", self._fetch_error)
            return False
        return True

    def _all_ok(self, ok: bool, message: str) -> None:
        """A collective check: raises on every rank when any rank failed (its own error where it has one)."""
        flag = torch.tensor([0.0 if ok else 1.0])
        if self.world > 1:
            dist.all_reduce(flag)
        if flag.item():
            raise self._fetch_error or _fail(message)

    def _repair_zero3_groups(self, groups: list[dict[str, Any]]) -> None:
        """DeepSpeed 0.19's ZeRO-3 universal load copies group 0's settings (name, lr, weight decay) into
        every group and shares one Adam `step` tensor between groups, which torch then increments once per
        group. Put back each group's own settings and the scheduler's LRs, and give each state its own step."""
        lrs = self.scheduler.get_last_lr()
        for group, saved, lr in zip(self.optimizer.param_groups, groups, lrs):
            group.update(saved)
            group["lr"] = lr
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    # ------------------------------------------------------------------ the loop

    def run(self, on_batch: OnBatch | None = None) -> TrainResult:
        """Train to `schedule.max_steps`. on_batch(step, keys) sees this rank's sample keys of every
        micro-batch (data-order audits, tests)."""
        cfg = self.cfg
        self._on_batch = on_batch
        losses: dict[int, float] = {}
        batches = iter(self.loader)
        # Only a run that started afresh crashes, so a restarted one (Ray Train, a test) gets through.
        crash_after = 0 if self.plan.resume_uri else cfg.faults.crash_after_step
        try:
            while self.step < cfg.schedule.max_steps:
                metrics = self._train_step(batches)  # step self.step + 1
                self.step += 1
                losses[self.step] = metrics.as_dict()["loss/total"]
                self._log(metrics)
                if self.step % cfg.checkpoint.every_steps == 0 or self.step == cfg.schedule.max_steps:
                    self.save_checkpoint()
                if crash_after and self.step == crash_after:
                    os._exit(17)  # a hard death: no finally blocks, no flush, as a killed node
        finally:
            batches.close()  # type: ignore[attr-defined]
        bundle = self.export() if cfg.export else None
        return TrainResult(self.rank, cfg.run_dir, self.step, self.plan.resume_uri, self.checkpoints, bundle, self.transfer,
                           self.loader.stats(), losses)

    def _train_step(self, batches: Iterator[TrainBatch]) -> StepMetrics:
        started = time.perf_counter()
        waited, images_seen = 0.0, 0
        terms: dict[str, Tensor] = {}
        self.engine.train()
        for _ in range(self.cfg.engine.grad_accumulation):
            batch = next(batches)
            waited += self.loader.last_wait_seconds
            images_seen += len(batch.images)
            if self._on_batch is not None:
                self._on_batch(self.step + 1, batch.keys)
            targets = [self._to_device(t) for t in batch.targets]
            num_masks = self._num_masks(targets)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.engine.precision == "bf16"):
                loss_terms = self.engine(batch.images, targets, num_masks=num_masks)
            total = sum(loss_terms.values())
            self.engine.backward(total)
            self.engine.step()
            for k, v in loss_terms.items():
                terms[k] = terms.get(k, 0) + v.detach().float() / self.cfg.engine.grad_accumulation
        reduced = self._reduce_terms(terms, images_seen)
        self._data_counts = reduced["data"]
        seconds = time.perf_counter() - started
        lrs = {g["name"]: float(g["lr"]) for g in self.optimizer.param_groups if "name" in g}
        norm = self.engine.get_global_grad_norm()
        return StepMetrics(
            losses=reduced["losses"], lr_by_group=lrs,
            grad_norm=float(norm) if norm is not None else None,
            images_per_s=reduced["images"] / max(seconds, 1e-9),
            data_wait_fraction=min(1.0, waited / max(seconds, 1e-9)),
            peak_memory_mb=peak_memory_mb(self.device))

    def _to_device(self, t: Targets) -> Targets:
        masks = t.masks.to(self.device) if t.masks is not None else None
        return Targets(t.labels.to(self.device), t.boxes.to(self.device), masks)

    def _num_masks(self, targets: list[Targets]) -> float:
        """Ground truths in the batch, averaged over ranks, at least 1 (official `num_masks`)."""
        count = torch.tensor([float(sum(len(t) for t in targets))], device=self.device)
        if self.world > 1:
            dist.all_reduce(count)
        return max(float(count.item()) / self.world, 1.0)

    def _reduce_terms(self, terms: dict[str, Tensor], images: int) -> dict[str, Any]:
        """Loss terms averaged over ranks; images and loader counters summed. One all-reduce (float64:
        counters stay exact past 2**24), keys in the criterion's fixed order so every rank packs the
        same vector even when a term is absent on one of them."""
        names = sorted(self.model.criterion.weight_dict)
        stats = asdict(self.loader.stats())
        # stacked on the device: one copy back for all terms (float() per term would sync once each)
        loss_values = torch.stack([terms[k] if k in terms else torch.zeros((), device=self.device) for k in names])
        count_values = torch.tensor([float(images), *(float(v) for v in stats.values())], dtype=torch.float64,
                                    device=self.device)
        packed = torch.cat([loss_values.double(), count_values])
        if self.world > 1:
            dist.all_reduce(packed)
        summed = packed.tolist()
        losses = {k: summed[i] / self.world for i, k in enumerate(names) if k in terms}
        counts = dict(zip(stats, (int(v) for v in summed[len(names) + 1:])))
        return {"losses": losses, "images": summed[len(names)], "data": counts}

    def _log(self, metrics: StepMetrics) -> None:
        values = metrics.as_dict()
        values.update({f"data/{k}": float(v) for k, v in self._data_counts.items()})
        self.logger.log_metrics(values, self.step)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> str:
        """Save through DeepSpeed (all ranks), publish to run_dir, then mark complete (rank 0, last)."""
        tag = f"step_{self.step:08d}"
        local = os.path.join(self.local_root, tag)
        self.engine.save_checkpoint(self.local_root, tag=tag, client_state={"step": self.step},
                                    save_latest=False)
        state = {"rank": self.rank, "world_size": self.world, "step": self.step,
                 "loader": self.loader.state_dict(), "rng": _rng_state()}
        os.makedirs(os.path.dirname(_state_path(local, self.rank)), exist_ok=True)
        torch.save(state, _state_path(local, self.rank))
        dist.barrier()  # every rank's files are on the local disk (shared per node)
        remote = ckpt.checkpoint_uri(self.cfg.run_dir, self.step)
        mine = ckpt.files_of_rank(ckpt.local_files(local), self.rank)
        entries = ckpt.upload_files(self.storage, local, remote, mine)
        gathered = gather_to_rank0(entries)
        if gathered is not None:
            files = sorted((e for part in gathered for e in part), key=lambda e: e.name)
            meta = {"zero_stage": self.cfg.engine.zero_stage, "precision": self.cfg.engine.precision}
            ckpt.write_marker(self.storage, remote, ckpt.CheckpointMarker(self.step, self.world, files, meta))
            if self.cfg.checkpoint.keep_last:
                ckpt.prune(self.storage, self.cfg.run_dir, self.cfg.checkpoint.keep_last)
            self.logger.flush()  # the metrics of the steps this checkpoint covers are durable with it
        dist.barrier()  # nobody deletes local files or moves on before the marker is written
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            for old in self.checkpoints:  # published: the local copies of older steps are not needed
                shutil.rmtree(os.path.join(self.local_root, os.path.basename(old)), ignore_errors=True)
        self.checkpoints.append(remote)
        return remote

    # ------------------------------------------------------------------ export

    def export(self) -> str | None:
        """fp32 weights of the final model as a bundle in run_dir/model (rank 0 writes)."""
        state = self._full_state_dict()
        uri = join(self.cfg.run_dir, BUNDLE_DIR)
        if self.rank == 0:
            save_bundle(self.storage, uri, self.cfg.model, state, self.categories)
            print(f"model bundle: {uri}", flush=True)
        dist.barrier()
        return uri

    def _full_state_dict(self) -> dict[str, Tensor]:
        """The model's full fp32 state dict on rank 0 (ZeRO-3 parameters gathered from all ranks)."""
        module = self.engine.module
        if self.cfg.engine.zero_stage == 3:
            import deepspeed  # seconds to import: with the engine, not with this module (see above)

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}

    def applied_hyperparams(self) -> dict[str, tuple[float, float]]:
        return applied_hyperparams(self.optimizer, self.engine.module, self.cfg.optim)

    # ------------------------------------------------------------------ close

    def close(self) -> None:
        try:
            if self.logger is not None:
                self.logger.close()
        finally:
            if self._own_group and dist.is_initialized():
                dist.destroy_process_group()


def train(cfg: TrainConfig, storage: Storage, logger: Logger | None = None) -> TrainResult:
    """The entrypoint: preflight -> build -> (resume) -> train -> checkpoint -> export -> close.
    logger: rank 0's logger (default console + JSONL in run_dir); other ranks should pass None."""
    trainer = Trainer(cfg, storage, logger)
    try:
        return trainer.run()
    finally:
        trainer.close()


__all__ = ["ConfigError", "ShardTransform", "TrainError", "TrainResult", "Trainer", "preflight", "train",
           "training_task"]
