"""What a pipeline run does: stage keys, outputs, success markers and the plan (``run`` and ``run --dry-run``).

**Stage key.** ``sha256`` of canonical JSON (sorted keys) of the stage's *key material*::

    {"kind": ..., "code": code_version(), "inputs": {role: upstream stage KEY}, "config": ..., ["source": ...]}

``config`` is plain data, per kind:

* shard: the loaded ``ShardJobConfig`` (file + overrides) without ``output``, ``source.split``,
  ``executor``, ``storage``, ``progress`` (where and how it runs, not what it makes), plus ``splits``;
  ``source`` is the raw-data fingerprint below.
* train: the fully loaded ``TrainConfig`` (``config_to_dict``) without ``storage`` and ``faults``
  (test-only fault injection: a crashed and resumed run makes the same model), whose wiring keys
  hold placeholders, not paths: ``run_dir`` = ``<output>``, ``data.manifest`` =
  ``<inputs.data>/<split>/manifest.json``, ``init_from`` = ``<inputs.init>/model``; the upstream keys sit
  in ``inputs``. Moving ``run_root`` (or renaming an upstream stage) therefore keeps every key. Plus the
  effective Ray Train ``workers`` and ``use_gpu`` (they change the global batch and the numerics;
  ``cpus_per_worker`` does not). An ``init_from`` or backbone weight path that the file itself names
  (not an ``init`` input) is keyed by its path only.
* evaluate: ``split``, ``batch_size``, ``min_size``, ``max_size``, ``limit``.
* register: ``name``, ``task``, ``promote`` and the configured ``tracking_uri`` (another registry
  means registering again).

Input keys chain: a fine-tune's key covers the pretrain's key, which covers the Objects365 shard
key, which covers its config and raw-data fingerprint. So a change anywhere gives new keys to that
stage and exactly its descendants.

**Raw-data fingerprint (shard stages).** Per split, the files that carry the labels, as the readers
in data_prep/sources locate them: the COCO / COCO panoptic / Objects365 annotation JSON, or for ADE20K
the ``objectInfo150`` file plus the annotation PNG folder summarised as (file count, total bytes).
Each file contributes its size (one ``stat``: a HEAD on S3), and also its sha256 when it is at most
``DIGEST_MAX_BYTES`` (32 MiB: demo data, COCO val; not COCO train's 450 MB or Objects365's GBs). Images
and panoptic PNGs are not fingerprinted (listing or hashing hundreds of thousands of objects per plan
is too slow). So an in-place edit of a big annotation file that keeps its size, or of images, is not
seen: ``--force`` the shard stage. A file that does not exist yet is recorded as missing (and noted in
the plan): the key changes once it appears, so a dry run before ``make-synthetic`` shows other keys
than the run after it.

**Code version.** :func:`code_version` is a sha256 over the sorted relative paths and contents of the
source files (``.py``, C/C++/CUDA) under core/, data_prep/, model/, pipeline/, orchestration/, csrc/: the code
that makes a stage's outputs (cli/, the command line on top, is left out: a help text changes no output). It does
not use git on purpose: a Ray Jobs ``working_dir`` upload has no ``.git``, and keys computed on the
laptop (``--dry-run``, ``maskdino submit``) must equal those computed in the job; and a commit that
only touches docs, tests or configs/ must not invalidate stages (configs are keyed by content anyway).
Any edit to those source trees changes every key: all stages rerun. That is expected; keep long runs
on a fixed checkout. :func:`git_revision` (commit, ``-dirty``) is recorded in markers for humans only.

**Outputs.** Stage ``S`` with key ``K`` writes under ``<run_root>/stages/S/<K[:12]>/``
(:func:`stage_output`): shard ``<out>/<split>/manifest.json``; train: ``<out>`` is the ``run_dir``
(bundle ``<out>/model``); evaluate ``<out>/report.json``; register: only its marker, whose ``result`` holds the
registered name, version and champion.

**Markers.** ``<out>/_SUCCESS.json`` = ``{stage, kind, key, finished_at, code_version, git, result,
material}``, written last (atomic ``Storage.write_bytes``), then a copy at
``<run_root>/stages/S/LATEST.json`` that only serves to explain *why* a key changed. A stage is skipped
when its output has a marker with its full key.

**Plan** (:func:`make_plan`), per stage in topological order: ``run`` or ``skip`` and why:

* ``forced (--force)`` / ``forced: downstream of X``: ``--force X`` reruns X and every descendant.
  Keys do not change, so force must propagate explicitly; these stages are ``fresh``: the executor
  clears their output folder first (a train stage would otherwise "resume" its finished run).
* ``cached: _SUCCESS with key ...``: skipped, *even if an upstream stage runs*: an upstream that runs
  with an unchanged key (its marker was deleted, or it failed last time after this stage succeeded)
  is recomputing the same configuration into the same folder, and keys describe configuration, not
  bytes. Use ``--force`` on the upstream to rebuild downstream from new bytes (e.g. a
  nondeterministic retrain). The reason then says ``(upstream X reruns with the same key)``.
* ``new: no earlier success`` / ``new key: <what changed>``: the changed parts of the key material
  relative to ``LATEST.json`` (``config schedule.max_steps``, ``upstream pretrain``, ``code version``,
  ``source files``).
* ``same key as the last success, but its _SUCCESS is missing``: rerun into the same folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from core.config import ConfigError, config_to_dict, with_values
from core.storage import Storage, StorageError, join
from data_prep.shard_config import ShardJobConfig, split_configs
from data_prep.sources.layout import source_layout
from orchestration.pipeline_config import (
    EvaluateStage,
    LoadedStage,
    Pipeline,
    ShardStage,
    TrainStage,
    owned_keys,
    stage_names,
)

if TYPE_CHECKING:  # annotations only: importing it at run time pulls in torch
    from pipeline.train_config import TrainConfig

__all__ = [
    "CODE_DIRS",
    "DIGEST_MAX_BYTES",
    "Plan",
    "PlannedStage",
    "bundle_uri",
    "clear_success",
    "code_version",
    "format_plan",
    "git_revision",
    "input_bundle",
    "input_manifest",
    "input_report",
    "make_plan",
    "read_success",
    "report_uri",
    "shard_configs",
    "shard_manifest",
    "source_fingerprint",
    "stage_key",
    "stage_output",
    "train_config",
    "write_success",
]

CODE_DIRS = ("core", "data_prep", "model", "pipeline", "orchestration", "csrc")
CODE_SUFFIXES = (".py", ".c", ".cc", ".cpp", ".cu", ".cuh", ".h", ".hpp")
DIGEST_MAX_BYTES = 32 * 2**20
SUCCESS_NAME = "_SUCCESS.json"
LATEST_NAME = "LATEST.json"
KEY_CHARS = 12  # of the key in folder names and tables
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ code version


def code_version(root: str | None = None) -> str:
    """sha256 (hex) over sorted relative paths + contents of the source files of :data:`CODE_DIRS`
    under ``root`` (default: this checkout). Needs no git, so it is the same in a Ray Jobs working_dir."""
    root = root or _REPO_ROOT
    digest = hashlib.sha256()
    files = []
    for top in CODE_DIRS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
            files += [os.path.join(dirpath, f) for f in filenames if f.endswith(CODE_SUFFIXES)]
    for path in sorted(files, key=lambda p: os.path.relpath(p, root).replace(os.sep, "/")):
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        with open(path, "rb") as f:
            content = f.read()
        digest.update(f"{rel}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()


def git_revision(root: str | None = None) -> str:
    """``<commit>`` or ``<commit>-dirty``; "" outside a git checkout. For markers and tags, not keys."""
    root = root or _REPO_ROOT
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *CODE_DIRS], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{commit}-dirty" if dirty else commit


# ------------------------------------------------------------------------------ outputs


def stage_output(run_root: str, stage: str, key: str) -> str:
    return join(run_root, "stages", stage, key[:KEY_CHARS])


def shard_manifest(output: str, split: str) -> str:
    return join(output, split, "manifest.json")


def bundle_uri(output: str) -> str:
    return join(output, "model")


def report_uri(output: str) -> str:
    return join(output, "report.json")


# ------------------------------------------------------------------------------ raw-data fingerprint


def _label_files(cfg: ShardJobConfig, split: str) -> tuple[list[str], list[str]]:
    """(files, folders) that carry the labels of ``split``, located as data_prep/sources reads them."""
    layout = source_layout(replace(cfg.source, split=split))
    if cfg.source.format == "ade20k":
        return list(layout.categories), [layout.labels]
    return [layout.annotation], []


def source_fingerprint(cfg: ShardJobConfig, splits: Iterable[str], storage: Storage
                       ) -> tuple[dict[str, Any], list[str]]:
    """(fingerprint, notes): per split, each label file's size (+ sha256 when small) and each label
    folder's (count, bytes); a missing file or empty folder is recorded as missing and noted."""
    fingerprint: dict[str, Any] = {}
    notes: list[str] = []
    for split in splits:
        files, folders = _label_files(cfg, split)
        entry: dict[str, Any] = {}
        for uri in files:
            info = storage.stat(uri)
            if info is None:
                entry[uri] = "missing"
                if not (cfg.source.format == "ade20k" and not cfg.source.categories):  # one of csv/txt suffices
                    notes.append(f"source file missing: {uri}")
                continue
            item: dict[str, Any] = {"bytes": info.size}
            if info.size <= DIGEST_MAX_BYTES:
                item["sha256"] = hashlib.sha256(storage.read_bytes(uri)).hexdigest()
            entry[uri] = item
        if cfg.source.format == "ade20k" and not cfg.source.categories and all(
                entry[u] == "missing" for u in files):
            notes.append(f"source file missing: {files[0]} (or .txt)")
        for uri in folders:
            listing = list(storage.list(uri))
            if not listing:
                notes.append(f"source folder missing or empty: {uri}")
            entry[uri] = {"files": len(listing), "bytes": sum(o.size for o in listing)} if listing else "missing"
        fingerprint[split] = entry
    return fingerprint, list(dict.fromkeys(notes))


# ------------------------------------------------------------------------------ keys


def _without(data: dict[str, Any], *dotted: str) -> dict[str, Any]:
    out = json.loads(json.dumps(data))  # deep copy of plain data
    for key in dotted:
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(last, None)
    return out


def _config_material(pipeline: Pipeline, stage: LoadedStage) -> dict[str, Any]:
    c = stage.cfg
    if isinstance(c, ShardStage):
        data = _without(config_to_dict(stage.run_config), "output", "source.split", "executor", "storage", "progress")
        return {**data, "splits": list(c.splits)}
    if isinstance(c, TrainStage):
        scaling = pipeline.scaling(stage.name)
        return {**_without(config_to_dict(stage.run_config), "storage", "faults"),
                "scaling": {"workers": scaling.workers, "use_gpu": scaling.use_gpu}}
    if isinstance(c, EvaluateStage):
        return {"split": c.split, **config_to_dict(c.settings)}  # batch_size, min_size, max_size, limit
    return {"name": c.name, "task": c.task, "promote": c.promote, "tracking_uri": pipeline.cfg.tracking_uri}


def stage_key(material: Mapping[str, Any]) -> str:
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------ markers


def _read_json(storage: Storage, uri: str) -> dict[str, Any] | None:
    try:
        if not storage.exists(uri):
            return None
        data = json.loads(storage.read_bytes(uri))
    except (StorageError, ValueError):
        return None  # unreadable or torn: as good as absent
    return data if isinstance(data, dict) and isinstance(data.get("key"), str) else None


def read_success(storage: Storage, output: str) -> dict[str, Any] | None:
    """The marker in ``output`` (None if absent or unreadable)."""
    return _read_json(storage, join(output, SUCCESS_NAME))


def _latest_uri(run_root: str, stage: str) -> str:
    return join(run_root, "stages", stage, LATEST_NAME)


def write_success(storage: Storage, plan: Plan, stage: str, result: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Publish ``stage``'s marker (call it last, after every output is written) and LATEST.json."""
    p = plan.stages[stage]
    marker = {"stage": p.name, "kind": p.kind, "key": p.key, "output": p.output,
              "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "code_version": plan.code_version, "git": git_revision(), "result": dict(result or {}),
              "material": p.material}
    data = (json.dumps(marker, indent=1, sort_keys=False, default=str) + "\n").encode()
    storage.write_bytes(join(p.output, SUCCESS_NAME), data)
    storage.write_bytes(_latest_uri(plan.pipeline.run_root, p.name), data)
    return marker


def clear_success(storage: Storage, plan: Plan, stage: str) -> None:
    """Remove ``stage``'s marker before it runs, so a crash mid-run never leaves a stale one."""
    storage.delete(join(plan.stages[stage].output, SUCCESS_NAME))


# ------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class PlannedStage:
    name: str
    kind: str
    key: str
    output: str
    status: str  # "run" | "skip"
    reason: str
    inputs: dict[str, str]  # role -> upstream stage
    level: int
    fresh: bool = False  # forced: clear `output` before running (do not resume)
    material: dict[str, Any] = field(default_factory=dict, repr=False)
    notes: tuple[str, ...] = ()
    marker: dict[str, Any] | None = field(default=None, repr=False)  # the cached marker, when skipped

    @property
    def runs(self) -> bool:
        return self.status == "run"


@dataclass(frozen=True)
class Plan:
    pipeline: Pipeline
    stages: dict[str, PlannedStage]  # topological order
    levels: tuple[tuple[str, ...], ...]
    code_version: str
    forced: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> PlannedStage:
        return self.stages[name]

    @property
    def to_run(self) -> tuple[str, ...]:
        return tuple(n for n, s in self.stages.items() if s.runs)

    @property
    def skipped(self) -> tuple[str, ...]:
        return tuple(n for n, s in self.stages.items() if not s.runs)


def _changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(dict.fromkeys([*old, *new])):
            out += _changes(old.get(k, "<unset>"), new.get(k, "<unset>"), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [prefix]


def _describe_changes(old: Mapping[str, Any], new: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    shown: list[str] = []
    for path in _changes(dict(old), dict(new)):
        top, _, rest = path.partition(".")
        if top == "code":
            text = "code version"
        elif top == "inputs":
            text = f"upstream {inputs.get(rest.partition('.')[0], rest)}"
        elif top == "source":
            text = "source files"
        elif top == "config":
            text = f"config {rest}"
        else:
            text = path
        if text not in shown:
            shown.append(text)
    if not shown:
        return "new key"
    more = f" (+{len(shown) - 4} more)" if len(shown) > 4 else ""
    return "new key: " + ", ".join(shown[:4]) + more + " changed"


def make_plan(pipeline: Pipeline, storage: Storage, force: Iterable[str] = (), code: str | None = None) -> Plan:
    """Key every stage (topological order), look up markers, decide run/skip. ``force``: stage names
    to rerun with all their descendants. ``code``: the code version (default :func:`code_version`)."""
    forced = stage_names(pipeline, force)
    code = code or code_version()
    graph = pipeline.graph
    levels = graph.levels
    level_of = {n: i for i, names in enumerate(levels) for n in names}
    forced_by: dict[str, list[str]] = {}
    for root in forced:
        for d in graph.descendants(root):
            forced_by.setdefault(d, []).append(root)
    planned: dict[str, PlannedStage] = {}
    for name, stage in pipeline.stages.items():
        material: dict[str, Any] = {"kind": stage.kind, "code": code,
                                    "inputs": {role: planned[up].key for role, up in sorted(stage.inputs.items())},
                                    "config": _config_material(pipeline, stage)}
        notes: list[str] = []
        if isinstance(stage.cfg, ShardStage):
            material["source"], notes = source_fingerprint(_shard_config(stage), stage.cfg.splits, storage)
        key = stage_key(material)
        output = stage_output(pipeline.run_root, name, key)
        marker = None
        fresh = False
        if name in forced:
            status, reason, fresh = "run", "forced (--force)", True
        elif name in forced_by:
            status, reason, fresh = "run", f"forced: downstream of {', '.join(forced_by[name])}", True
        else:
            marker = read_success(storage, output)
            if marker is not None and marker["key"] == key:
                status = "skip"
                reason = f"cached: _SUCCESS with key {key[:KEY_CHARS]} ({marker.get('finished_at', '?')})"
                rerunning = [up for up in graph.upstream[name] if planned[up].runs]
                if rerunning:
                    reason += f" (upstream {', '.join(rerunning)} reruns with the same key)"
            else:
                marker = None
                status = "run"
                latest = _read_json(storage, _latest_uri(pipeline.run_root, name))
                if latest is None:
                    reason = "new: no earlier success"
                elif latest["key"] == key:
                    reason = "same key as the last success, but its _SUCCESS is missing"
                else:
                    reason = _describe_changes(latest.get("material") or {}, material, stage.inputs)
                    reason += f" (last success {latest['key'][:KEY_CHARS]})"
        planned[name] = PlannedStage(name, stage.kind, key, output, status, reason, stage.inputs, level_of[name],
                                     fresh, material, tuple(notes), marker)
    return Plan(pipeline, planned, levels, code, forced)


def format_plan(plan: Plan) -> str:
    """The table ``maskdino run --dry-run`` prints."""
    cfg = plan.pipeline.cfg
    header = (f"pipeline {cfg.name}: {len(plan.stages)} stages, {len(plan.to_run)} to run, "
              f"{len(plan.skipped)} cached; run_root {cfg.run_root}; code {plan.code_version[:KEY_CHARS]}")
    rows = [("level", "stage", "kind", "key", "status", "reason")]
    rows += [(str(s.level), s.name, s.kind, s.key[:KEY_CHARS], s.status, s.reason) for s in plan.stages.values()]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [header, ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows]
    notes = [f"  {s.name}: {n}" for s in plan.stages.values() for n in s.notes]
    if notes:
        lines += ["", "notes:", *notes]
    lines += ["", f"outputs: {join(cfg.run_root, 'stages', '<stage>', '<key>')}/"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ wiring for the executor


def _input(plan: Plan, stage: str, role: str) -> PlannedStage:
    try:
        return plan.stages[plan.stages[stage].inputs[role]]
    except KeyError:
        raise ConfigError(f"stage '{stage}' has no input '{role}'") from None


def input_manifest(plan: Plan, stage: str, split: str | None = None, role: str = "data") -> str:
    """manifest.json of ``stage``'s data input, for ``split`` (default: the split a train or evaluate
    stage reads)."""
    if split is None:
        cfg = plan.pipeline.stages[stage].cfg
        if not isinstance(cfg, (TrainStage, EvaluateStage)):
            raise ConfigError(f"stage '{stage}' reads no split of a data input")
        split = cfg.split
    return shard_manifest(_input(plan, stage, role).output, split)


def input_bundle(plan: Plan, stage: str, role: str | None = None) -> str:
    """Model bundle of the ``model`` input (evaluate/register) or the ``init`` input (train)."""
    role = role or ("init" if plan.stages[stage].kind == "train" else "model")
    return bundle_uri(_input(plan, stage, role).output)


def input_report(plan: Plan, stage: str) -> str:
    return report_uri(_input(plan, stage, "report").output)


def _real_wiring(plan: Plan, stage: str) -> dict[str, str]:
    loaded = plan.pipeline.stages[stage]
    values = {}
    for key, placeholder in owned_keys(loaded).items():
        if key in ("run_dir", "output"):
            values[key] = plan.stages[stage].output
        elif key == "data.manifest":
            values[key] = input_manifest(plan, stage)
        elif key == "init_from":
            values[key] = input_bundle(plan, stage, "init")
        else:  # pragma: no cover - owned_keys and this function change together
            raise AssertionError(f"unwired key {key} ({placeholder})")
    return values


def _shard_config(stage: LoadedStage) -> ShardJobConfig:
    assert isinstance(stage.run_config, ShardJobConfig), stage.name
    return stage.run_config


def train_config(plan: Plan, stage: str) -> TrainConfig:
    """The ``TrainConfig`` the pipeline loaded (and keyed) for the stage, with its real locations:
    run_dir = its output, data.manifest and init_from from its inputs (set by ``dataclasses.replace``:
    nothing is parsed again). Storage, resume and scaling are left to the executor."""
    cfg = plan.pipeline.stages[stage].run_config
    assert cfg is not None and not isinstance(cfg, ShardJobConfig), stage
    return with_values(cfg, _real_wiring(plan, stage))


def shard_configs(plan: Plan, stage: str) -> list[ShardJobConfig]:
    """One ``ShardJobConfig`` per split, each writing ``<output>/<split>/`` (as ``maskdino shard --splits``):
    the config the pipeline loaded (and keyed) for the stage, with its real locations."""
    loaded = plan.pipeline.stages[stage]
    assert isinstance(loaded.cfg, ShardStage)
    return split_configs(with_values(_shard_config(loaded), _real_wiring(plan, stage)), loaded.cfg.splits)
