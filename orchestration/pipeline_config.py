"""The staged pipeline's declarative side: the ``PIPELINE.yaml`` schema, its validation, the stage graph.

``maskdino run PIPELINE.yaml [key=value ...]`` (and ``--dry-run``) reads one file (docs/pipeline.md#stage-graph)::

    name: demo                          # MLflow parent run name; experiment defaults to it
    run_root: demo_out/pipeline         # local folder or s3:// prefix; relative = to the working directory
    tracking_uri: ""                    # "" = sqlite:///<run_root>/mlflow.db (local run_root only)
    ray: {address: "", num_cpus: 0, dashboard_port: 0, runtime_env: {}}
    scaling: {workers: 1, use_gpu: false, cpus_per_worker: 2}   # Ray Train, for train and evaluate stages
    failure: {max_failures: 1}
    stages:                             # file order = tie-break order of the topological sort
      shard_coco:   {kind: shard, config: ../data/demo_coco_instances.yaml, splits: [train, val]}
      pretrain:     {kind: train, config: ../train/tiny_o365_pretrain.yaml, inputs: {data: shard_o365}}
      finetune:     {kind: train, config: ../train/tiny_instance.yaml, overrides: [optim.lr=2e-4],
                     inputs: {data: shard_coco, init: pretrain}}
      evaluate:     {kind: evaluate, split: val, inputs: {model: finetune, data: shard_coco}}
      register:     {kind: register, name: maskdino-instance, inputs: {model: finetune, report: evaluate}}

Stage kinds, their roles (``inputs``: role -> upstream stage of the given kind) and their own fields;
each kind is its own dataclass (:class:`ShardStage`, :class:`TrainStage`, :class:`EvaluateStage`,
:class:`RegisterStage`), picked by ``kind``, with exactly these fields:

=========  ==========================================  =============================================
kind       inputs                                      fields (besides kind / inputs)
=========  ==========================================  =============================================
shard      (none)                                      ``config``, ``overrides``, ``splits`` (default
                                                       [train, val])
train      data: shard (required), init: train         ``config``, ``overrides``, ``split`` (of the
                                                       data, default train), ``scaling``
evaluate   model: train, data: shard (both required)   ``split`` (default val), ``scaling``, and the
                                                       ``EvalSettings`` keys ``batch_size``,
                                                       ``min_size``, ``max_size``, ``limit``
register   model: train, report: evaluate (required)   ``name`` (required), ``task`` ("" = the report's),
                                                       ``promote`` (move ``champion`` if better)
=========  ==========================================  =============================================

``config`` is the run config file, *relative to the pipeline file* (like ``_base_``): a
``ShardJobConfig`` YAML for shard stages and a ``TrainConfig`` YAML for train stages (required for
both); evaluate and register stages have no config file, their few settings are the typed fields above
(so ``config`` / ``overrides`` are refused there). ``overrides`` are ``key=value`` strings applied to
the run config exactly as on the ``maskdino shard`` / ``maskdino train`` command lines. The pipeline
owns the wiring keys: ``output`` and ``source.split`` of shard configs, ``run_dir``, ``data.manifest``
and (with an ``init`` input) ``init_from`` of train configs; overriding them in a stage is an error.
The run config is loaded once, here, with placeholders in the wiring keys (they feed the stage key,
which must not depend on locations); the executor sets the real locations on that same dataclass
(``dataclasses.replace``, orchestration/plan.py) and hands it to the workers.
Relative paths *inside* run configs (``source.root``, ``run_dir``...) stay relative to the working
directory, as everywhere else in the project.

Validation (:func:`load_pipeline`) happens completely before anything runs and raises a one-line
:class:`~core.config.ConfigError` naming the stage and the key: unknown kind (by the schema,
``stages.NAME.kind``), a field that does not apply to the kind, an unknown or missing role, an input
naming a stage that does not exist or has the wrong kind, a split the upstream shard stage does not
produce, a register whose report evaluates another model, a cycle (with its path), a missing run
config file, and any run config that does not load with its schema *after* the stage's overrides and
the pipeline's wiring placeholders are applied (so a bad override fails at plan time, not after the
pretrain). Two stages cannot write the same place: every stage writes under
``<run_root>/stages/<stage name>/<key12>/`` and names are unique keys of a mapping (duplicate YAML keys
are refused by the loader).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from core.config import OVERRIDE_SOURCE, ConfigError, Tagged, inline, load_config, parse_overrides
from core.storage import StorageConfig
from data_prep.shard_config import ShardJobConfig
from pipeline.eval_settings import EvalSettings

if TYPE_CHECKING:  # annotations only: importing it at run time pulls in torch
    from pipeline.train_config import TrainConfig

__all__ = [
    "OUTPUT_PLACEHOLDER",
    "ROLES",
    "AnyStage",
    "EvaluateStage",
    "FailureConfig",
    "LoadedStage",
    "Pipeline",
    "PipelineConfig",
    "RayConfig",
    "RegisterStage",
    "ScalingConfig",
    "ShardStage",
    "StageConfig",
    "StageGraph",
    "TrainStage",
    "input_placeholder",
    "load_pipeline",
    "owned_keys",
    "stage_names",
]

# kind -> role -> (upstream kind, required)
ROLES: dict[str, dict[str, tuple[str, bool]]] = {
    "shard": {},
    "train": {"data": ("shard", True), "init": ("train", False)},
    "evaluate": {"model": ("train", True), "data": ("shard", True)},
    "register": {"model": ("train", True), "report": ("evaluate", True)},
}
_STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

# Stand-ins for the wiring keys while a run config is loaded for validation and keying: the real
# locations depend on keys (and run_root), which must not feed back into keys.
OUTPUT_PLACEHOLDER = "<output>"


def input_placeholder(role: str) -> str:
    return f"<inputs.{role}>"


# ------------------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # "" = local ray.init() (inside a Ray Job: the job's cluster)
    num_cpus: int = 0  # local Ray only; 0 = all cores
    # Local Ray only: the dashboard, always on 127.0.0.1 (never 0.0.0.0: it runs any submitted job);
    # Ray Train's clean-up actor polls the state API it serves. 0 = any free port (Ray prints the URL).
    dashboard_port: int = 0
    runtime_env: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_cpus < 0:
            raise ValueError(f"num_cpus={self.num_cpus} must be >= 0")
        if not 0 <= self.dashboard_port < 65536:
            raise ValueError(f"dashboard_port={self.dashboard_port} must be a port number (0 = any free port)")


@dataclass(frozen=True)
class ScalingConfig:
    """Ray Train's ScalingConfig for train and evaluate stages: one process per worker."""

    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1

    def __post_init__(self) -> None:
        if self.workers < 1 or self.cpus_per_worker < 1:
            raise ValueError(f"need workers >= 1 and cpus_per_worker >= 1, got {self.workers}, "
                             f"{self.cpus_per_worker}")


@dataclass(frozen=True)
class FailureConfig:
    max_failures: int = 0  # Ray Train FailureConfig: retries resume from the last checkpoint

    def __post_init__(self) -> None:
        if self.max_failures < -1:
            raise ValueError(f"max_failures={self.max_failures} must be >= 0 (or -1 = unlimited)")


@dataclass(frozen=True)
class ShardStage:
    """Shard a raw dataset: one ``ShardJobConfig`` run per split, each into ``<output>/<split>/``."""

    kind: Literal["shard"]
    config: str = ""  # ShardJobConfig file, relative to the pipeline file (required)
    overrides: tuple[str, ...] = ()  # key=value, as on the `maskdino shard` command line
    inputs: dict[str, str] = field(default_factory=dict)  # none
    splits: tuple[str, ...] = ("train", "val")


@dataclass(frozen=True)
class TrainStage:
    """Train (or fine-tune) with the ``TrainConfig`` file under Ray Train; ``<output>`` is the run_dir."""

    kind: Literal["train"]
    config: str = ""  # TrainConfig file, relative to the pipeline file (required)
    overrides: tuple[str, ...] = ()  # key=value, as on the `maskdino train` command line
    inputs: dict[str, str] = field(default_factory=dict)  # data: a shard stage; init (optional): a train stage
    split: str = "train"  # the data input's split to train on
    scaling: ScalingConfig | None = None  # replaces the pipeline's `scaling`


@dataclass(frozen=True)
class EvaluateStage:
    """Evaluate the trained model (and the same architecture untrained, as the baseline) on a split."""

    kind: Literal["evaluate"]
    inputs: dict[str, str] = field(default_factory=dict)  # model: a train stage; data: a shard stage
    split: str = "val"  # the data input's split to evaluate on
    settings: EvalSettings = inline(EvalSettings)  # its keys batch_size, min_size, max_size, limit
    scaling: ScalingConfig | None = None  # replaces the pipeline's `scaling`


@dataclass(frozen=True)
class RegisterStage:
    """Register the trained model in MLflow with the evaluation's metric; maybe move ``champion``."""

    kind: Literal["register"]
    inputs: dict[str, str] = field(default_factory=dict)  # model: a train stage; report: an evaluate stage
    name: str = ""  # registered model name (required)
    task: str = ""  # "" = the evaluation report's task
    promote: bool = True  # move the `champion` alias when the new version beats it


AnyStage = Union[ShardStage, TrainStage, EvaluateStage, RegisterStage]
# A stage in the pipeline file: its `kind` picks the class, so a key of another kind is named as such.
StageConfig = Annotated[AnyStage, Tagged("kind", "stages")]
RunStage = Union[ShardStage, TrainStage]  # the kinds with a run config file


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    run_root: str  # every stage writes under <run_root>/stages/<stage>/<key12>/
    stages: dict[str, StageConfig]  # name -> stage; file order
    tracking_uri: str = ""  # "" = sqlite:///<abs run_root>/mlflow.db (local run_root only)
    experiment: str = ""  # MLflow experiment; "" = name
    ray: RayConfig = field(default_factory=RayConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must not be empty")
        if not self.run_root:
            raise ValueError("run_root must name a local folder or s3:// prefix")
        if not self.stages:
            raise ValueError("stages must define at least one stage")

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name


# ------------------------------------------------------------------------------------- graph


@dataclass(frozen=True)
class StageGraph:
    """Stages and their input edges. ``order`` is topological, stable: among the stages whose inputs
    are all placed, the one earliest in the file goes first. ``levels`` groups stages by longest
    path from a source stage: a stage's inputs all lie in earlier levels, so each level's stages are
    independent of each other (e.g. the three fine-tunes)."""

    names: tuple[str, ...]  # file order
    upstream: Mapping[str, tuple[str, ...]]  # stage -> its direct input stages (file order, unique)

    @classmethod
    def build(cls, inputs: Mapping[str, Mapping[str, str]]) -> StageGraph:
        names = tuple(inputs)
        index = {n: i for i, n in enumerate(names)}
        upstream = {n: tuple(sorted(set(roles.values()), key=index.__getitem__)) for n, roles in inputs.items()}
        graph = cls(names, upstream)
        graph._check_acyclic()
        return graph

    def _check_acyclic(self) -> None:
        state: dict[str, int] = {}  # 1 = on the current path, 2 = done
        path: list[str] = []

        def visit(n: str) -> None:
            state[n] = 1
            path.append(n)
            for u in self.upstream[n]:
                if state.get(u) == 1:
                    # path holds consumers before producers; print it in data-flow order
                    cycle = path[path.index(u):] + [u]
                    raise ConfigError(f"stage '{u}': inputs form a cycle: {' -> '.join(reversed(cycle))}")
                if u not in state:
                    visit(u)
            path.pop()
            state[n] = 2

        for n in self.names:
            if n not in state:
                visit(n)

    @property
    def downstream(self) -> dict[str, tuple[str, ...]]:
        down: dict[str, list[str]] = {n: [] for n in self.names}
        for n in self.names:
            for u in self.upstream[n]:
                down[u].append(n)
        return {n: tuple(v) for n, v in down.items()}

    @property
    def order(self) -> tuple[str, ...]:
        placed: list[str] = []
        done: set[str] = set()
        while len(placed) < len(self.names):
            ready = next(n for n in self.names if n not in done and all(u in done for u in self.upstream[n]))
            placed.append(ready)
            done.add(ready)
        return tuple(placed)

    @property
    def levels(self) -> tuple[tuple[str, ...], ...]:
        level: dict[str, int] = {}
        for n in self.order:
            level[n] = 1 + max((level[u] for u in self.upstream[n]), default=-1)
        depth = max(level.values(), default=-1) + 1
        return tuple(tuple(n for n in self.order if level[n] == d) for d in range(depth))

    def descendants(self, name: str) -> tuple[str, ...]:
        """Every stage that reads ``name``'s output directly or transitively (topological order)."""
        down = self.downstream
        seen: set[str] = set()
        todo = [name]
        while todo:
            for d in down[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return tuple(n for n in self.order if n in seen)

    def ancestors(self, name: str) -> tuple[str, ...]:
        seen: set[str] = set()
        todo = [name]
        while todo:
            for u in self.upstream[todo.pop()]:
                if u not in seen:
                    seen.add(u)
                    todo.append(u)
        return tuple(n for n in self.order if n in seen)


# ------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadedStage:
    name: str
    cfg: AnyStage
    config_path: str  # the run config file resolved against the pipeline file's folder; "" = none
    # Shard/train: the run config, loaded once for validation and keys, with wiring placeholders
    # (OUTPUT_PLACEHOLDER, input_placeholder(role)) in the keys the pipeline owns; the executor sets
    # the real locations with dataclasses.replace (orchestration/plan.py).
    run_config: ShardJobConfig | TrainConfig | None = None

    @property
    def kind(self) -> str:
        return self.cfg.kind

    @property
    def inputs(self) -> dict[str, str]:
        return dict(self.cfg.inputs)


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline: config, the file it came from, stages in topological order, the graph."""

    cfg: PipelineConfig
    path: str
    stages: dict[str, LoadedStage]  # topological order
    graph: StageGraph

    @property
    def run_root(self) -> str:
        return self.cfg.run_root

    def scaling(self, stage: str) -> ScalingConfig:
        cfg = self.stages[stage].cfg
        own = cfg.scaling if isinstance(cfg, (TrainStage, EvaluateStage)) else None
        return own or self.cfg.scaling


def _stage_error(name: str, message: str) -> ConfigError:
    message = message.removeprefix("config error: ")
    return ConfigError(f"stage '{name}': {message}")


def _check_fields(name: str, stage: AnyStage) -> None:
    """What the schema cannot say: required strings, distinct splits. (A key of another kind is refused
    by the schema's tagged union, naming the kinds it applies to.)"""
    if isinstance(stage, (ShardStage, TrainStage)) and not stage.config:
        raise _stage_error(name, f"missing key 'stages.{name}.config': {stage.kind} stages need a run config file")
    if isinstance(stage, ShardStage) and (not stage.splits or len(set(stage.splits)) != len(stage.splits)
                                          or not all(stage.splits)):
        raise _stage_error(name, f"key 'stages.{name}.splits' must list distinct split names; "
                                 f"got {list(stage.splits)}")
    if isinstance(stage, RegisterStage) and not stage.name:
        raise _stage_error(name, f"missing key 'stages.{name}.name': the registered model name")


def _check_inputs(name: str, stage: AnyStage, stages: Mapping[str, AnyStage]) -> None:
    roles = ROLES[stage.kind]
    for role, upstream in stage.inputs.items():
        key = f"stages.{name}.inputs.{role}"
        if role not in roles:
            takes = ", ".join(roles) or "no inputs"
            raise _stage_error(name, f"key '{key}': {stage.kind} stages take {takes}, not '{role}'")
        if upstream not in stages:
            raise _stage_error(name, f"key '{key}' names stage '{upstream}', which does not exist; "
                                     f"stages: {', '.join(stages)}")
        want = roles[role][0]
        if stages[upstream].kind != want:
            raise _stage_error(name, f"key '{key}' names '{upstream}', a {stages[upstream].kind} stage; "
                                     f"the {role} input must be a {want} stage")
        if upstream == name:
            raise _stage_error(name, f"key '{key}': a stage cannot read its own output")
    for role, (want, required) in roles.items():
        if required and role not in stage.inputs:
            raise _stage_error(name, f"missing key 'stages.{name}.inputs.{role}' (a {want} stage)")


def _check_wiring(name: str, stage: AnyStage, stages: Mapping[str, AnyStage]) -> None:
    """Splits read from shard stages exist; a register's report evaluates the model it registers.
    (Inputs are checked first: each names a stage of the kind its role wants.)"""
    if isinstance(stage, (TrainStage, EvaluateStage)):
        data = stage.inputs["data"]
        produced = stages[data]
        assert isinstance(produced, ShardStage)
        if stage.split not in produced.splits:
            raise _stage_error(name, f"key 'stages.{name}.split': '{stage.split}' is not among the splits "
                                     f"{list(produced.splits)} of its data input '{data}'")
    if isinstance(stage, RegisterStage):
        evaluated = stages[stage.inputs["report"]].inputs["model"]
        if evaluated != stage.inputs["model"]:
            raise _stage_error(name, f"key 'stages.{name}.inputs.report': '{stage.inputs['report']}' evaluates "
                                     f"'{evaluated}', not the registered model '{stage.inputs['model']}'")


def _owned_keys(stage: AnyStage) -> dict[str, str]:
    """Wiring keys the pipeline sets in the run config -> their placeholder values."""
    if isinstance(stage, ShardStage):
        return {"output": OUTPUT_PLACEHOLDER}
    if isinstance(stage, TrainStage):
        owned = {"run_dir": OUTPUT_PLACEHOLDER,
                 "data.manifest": f"{input_placeholder('data')}/{stage.split}/manifest.json"}
        if "init" in stage.inputs:
            owned["init_from"] = f"{input_placeholder('init')}/model"
        return owned
    return {}


def _placeholder_overrides(values: Mapping[str, str]) -> list[str]:
    """``key=value`` overrides for the placeholders, values quoted so that YAML reads them as strings."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def _load_run_config(name: str, stage: RunStage, path: str) -> ShardJobConfig | TrainConfig:
    """The stage's run config: its file, the stage's overrides, the wiring placeholders on top."""
    if not os.path.isfile(path):
        raise _stage_error(name, f"key 'stages.{name}.config': run config file {stage.config} not found "
                                 f"(looked for {path})")
    try:
        user_keys = [key for key, _ in parse_overrides(list(stage.overrides))]
    except ConfigError as exc:
        raise _stage_error(name, f"key 'stages.{name}.overrides': {exc}") from exc
    owned = _owned_keys(stage)
    pinned = set(owned) | ({"source.split"} if isinstance(stage, ShardStage) else set())
    origin = {"output": "its output folder", "run_dir": "its output folder", "source.split": f"stages.{name}.splits",
              "data.manifest": f"stages.{name}.inputs.data", "init_from": f"stages.{name}.inputs.init"}
    for key in user_keys:
        clash = next((p for p in pinned if key == p or p.startswith(key + ".")), None)
        if clash is not None:
            raise _stage_error(name, f"key 'stages.{name}.overrides' sets '{key}', which the pipeline wires "
                                     f"({clash} comes from {origin[clash]})")
    overrides = list(stage.overrides) + _placeholder_overrides(owned)
    try:
        if isinstance(stage, ShardStage):
            return load_config(ShardJobConfig, path, overrides)
        # the train config embeds the model config: torch and the model code, only when a train stage exists
        from pipeline.train_config import TrainConfig

        return load_config(TrainConfig, path, overrides)
    except ConfigError as exc:
        message = str(exc).removeprefix("config error: ").replace(OVERRIDE_SOURCE, f"stages.{name}.overrides")
        raise _stage_error(name, f"run config {stage.config}: {message}") from exc


def load_pipeline(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Pipeline:
    """Load and validate ``path`` (+ ``key=value`` overrides, e.g. ``run_root=/tmp/x``) completely;
    raises a one-line :class:`ConfigError` naming the stage and key on the first problem."""
    path = os.fspath(path)
    cfg = load_config(PipelineConfig, path, list(overrides))
    for name in cfg.stages:
        if not isinstance(name, str) or not _STAGE_NAME.fullmatch(name):
            raise ConfigError(f"stage '{name}': stage names may use letters, digits, '_', '.', '-' "
                              "(they name folders under run_root/stages)")
    for name, stage in cfg.stages.items():
        _check_fields(name, stage)
        _check_inputs(name, stage, cfg.stages)
    graph = StageGraph.build({n: s.inputs for n, s in cfg.stages.items()})
    for name in graph.order:
        _check_wiring(name, cfg.stages[name], cfg.stages)
    here = os.path.dirname(os.path.abspath(path))
    loaded: dict[str, LoadedStage] = {}
    for name in graph.order:
        stage = cfg.stages[name]
        if isinstance(stage, (ShardStage, TrainStage)):
            config_path = os.path.normpath(os.path.join(here, os.path.expanduser(stage.config)))
            loaded[name] = LoadedStage(name, stage, config_path, _load_run_config(name, stage, config_path))
        else:
            loaded[name] = LoadedStage(name, stage, "")
    return Pipeline(cfg, path, loaded, graph)


def owned_keys(stage: LoadedStage) -> dict[str, str]:
    """The wiring keys of ``stage``'s run config and their placeholders."""
    return _owned_keys(stage.cfg)


def stage_names(pipeline: Pipeline, names: Iterable[str], what: str = "--force") -> tuple[str, ...]:
    """Check user-given stage names (e.g. ``--force``), with a did-you-mean style list on error."""
    out = []
    for n in names:
        if n not in pipeline.stages:
            raise ConfigError(f"{what} {n}: no such stage; stages: {', '.join(pipeline.stages)}")
        out.append(n)
    return tuple(dict.fromkeys(out))
