"""MLflow as a training-log backend (docs/pipeline.md#mlflow): experiments, runs, and a Logger on a run.

Everything goes through ``mlflow.tracking.MlflowClient`` on an explicit tracking URI and run id,
never through MLflow's fluent globals (``mlflow.start_run``/``set_experiment``), so several loggers
(a pipeline's parent run, a stage's child run, other processes) coexist in one process.

Backends: ``sqlite:///ABS/mlflow.db`` (:func:`default_tracking_uri`) for a single machine; an
``mlflow server`` (``http://...``) wherever several processes or hosts log. A bare file store is
refused by MLflow >= 3.13.

Rules learnt from MLflow 3.17 (docs/pipeline.md#mlflow):
- Create the experiment once, in the driver (:func:`ensure_experiment`), and hand its id to the
  workers: two processes calling ``set_experiment`` on a new name race, and the loser's runs land in
  experiment 0 ("Default").
- Names of params and metrics may hold only alphanumerics, ``_ - . / :`` and spaces, up to 250 chars,
  and must be normalised paths (no ``//``, no leading ``/``): :func:`mlflow_key` maps anything else.
- Param values are at most 6000 chars and can never change once logged on a run.
"""
from __future__ import annotations

import logging
import os
import posixpath
import re
import tempfile
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from core.config import ConfigError
from pipeline.tracking import _artifact_path, _Closing, _safe_params

if TYPE_CHECKING:
    from mlflow.entities import Metric  # lazy: mlflow costs seconds to import
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

__all__ = ["MlflowLogger", "default_tracking_uri", "enable_system_metrics", "end_run", "ensure_experiment",
           "mlflow_key", "start_run"]

MAX_KEY_LENGTH = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
MAX_PARAM_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_BATCH = 1000  # metrics per log_batch call (MAX_METRICS_PER_BATCH)
MAX_PARAMS_BATCH = 100  # params per log_batch call (MAX_PARAMS_TAGS_PER_BATCH)
TRUNCATED = "...[truncated]"
PARENT_TAG = "mlflow.parentRunId"
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def client(tracking_uri: str) -> MlflowClient:
    """A client bound to ``tracking_uri``."""
    from mlflow.tracking import MlflowClient  # lazy: `import mlflow` costs seconds (here and below)

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def default_tracking_uri(run_root: str) -> str:
    """``sqlite:///<abs run_root>/mlflow.db``: the single-machine default, next to the run's outputs."""
    if "://" in run_root:
        raise ConfigError(f"{run_root}: a sqlite tracking store needs a local folder; for s3:// runs start "
                          "`mlflow server --artifacts-destination s3://...` and pass its http:// URI")
    root = os.path.abspath(run_root)
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db"


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    """Get-or-create; returns the experiment id. Race-safe: a lost create is read back by name.

    With a sqlite store and no ``artifact_location`` the artifacts go to ``mlartifacts/`` beside the
    database: MLflow's own default is ``./mlruns`` under whatever the current directory happens to be."""
    from mlflow.exceptions import MlflowException  # lazy: mlflow costs seconds to import

    mc = client(tracking_uri)
    if artifact_location is None and tracking_uri.startswith("sqlite:///"):
        db = tracking_uri.removeprefix("sqlite:///")
        artifact_location = os.path.join(os.path.dirname("/" + db.lstrip("/")), "mlartifacts")
    found = mc.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return mc.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        found = mc.get_experiment_by_name(name)  # another process created it between our two calls
        if found is None:
            raise
        return found.experiment_id


def start_run(tracking_uri: str, experiment_id: str, name: str, parent_run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> str:
    """Create a RUNNING run and return its id; a child of ``parent_run_id`` when given (the MLflow UI
    nests runs by the ``mlflow.parentRunId`` tag)."""
    all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    return client(tracking_uri).create_run(experiment_id, run_name=name, tags=all_tags).info.run_id


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run FINISHED, FAILED or KILLED."""
    client(tracking_uri).set_terminated(run_id, status=status)


def enable_system_metrics(tracking_uri: str, run_id: str, sampling_interval_s: float = 10.0,
                          node_id: str | None = None) -> Any:
    """Start MLflow's system-metrics thread (CPU, memory, disk, network, GPU; ``system/...`` metrics,
    ``system/<node_id>/...`` with a node id) on ``run_id``; returns the monitor, whose ``finish()``
    stops it. It stops by itself once the run is no longer RUNNING. Steps continue after those already
    logged (a restarted process appends). ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides the
    interval."""
    # lazy: mlflow costs seconds to import
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval_s, tracking_uri=tracking_uri,
                                   node_id=node_id, resume_logging=True)
    monitor.start()
    return monitor


def mlflow_key(name: str) -> str:
    """``name`` as a valid MLflow param/metric key: ``/`` kept, other bad characters -> ``_``, empty path
    parts and leading/trailing ``/`` dropped, cut to 250 characters."""
    key = _BAD_KEY_CHARS.sub("_", str(name))
    parts = [p if p not in (".", "..") else p.replace(".", "_") for p in key.split("/") if p]
    key = "/".join(parts)[:MAX_KEY_LENGTH].rstrip("/")
    return key or "_"


def param_value(value: Any) -> str:
    """A param value as MLflow stores it; longer than 6000 characters: cut, ending in a marker."""
    text = "None" if value is None else str(value)
    if len(text) <= MAX_PARAM_LENGTH:
        return text
    return text[:MAX_PARAM_LENGTH - len(TRUNCATED)] + TRUNCATED


class MlflowLogger(_Closing):
    """The Logger protocol on an existing MLflow run (see :func:`start_run`).

    Params are flattened and redacted like every other backend's; a param already logged with another
    value (MLflow forbids changes; e.g. a resumed run with an override) is skipped with a warning rather
    than failing training. Metrics are buffered and sent with ``log_batch`` on :meth:`flush`, when
    ``flush_every_records`` are waiting, or ``flush_every_s`` after the last send. NaN and +-inf are
    sent as they are: MLflow stores them (the UI shows them as NaN / Infinity).
    """

    def __init__(self, tracking_uri: str, run_id: str, flush_every_s: float = 10.0,
                 flush_every_records: int = MAX_BATCH) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.flush_every_s = flush_every_s
        self.flush_every_records = min(flush_every_records, MAX_BATCH)
        self._client = client(tracking_uri)
        self._params: dict[str, str] = {}
        self._pending: list[Metric] = []
        self._last_flush = time.monotonic()
        self._closed = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param  # lazy: mlflow costs seconds to import

        fresh: dict[str, str] = {}
        for name, value in _safe_params(params).items():
            key, text = mlflow_key(name), param_value(value)
            if self._params.get(key, text) != text:
                log.warning("MLflow run %s: param %s already logged as %r; not changed to %r", self.run_id, key,
                            self._params[key], text)
            elif key not in self._params:
                fresh[key] = text
        items = [Param(k, v) for k, v in fresh.items()]
        for start in range(0, len(items), MAX_PARAMS_BATCH):
            self._client.log_batch(self.run_id, params=items[start:start + MAX_PARAMS_BATCH], synchronous=True)
        self._params.update(fresh)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric  # lazy: mlflow costs seconds to import

        now_ms = int(time.time() * 1000)
        for name, value in metrics.items():
            self._pending.append(Metric(mlflow_key(name), _metric_value(value), now_ms, int(step)))
        due = time.monotonic() - self._last_flush >= self.flush_every_s
        if due or len(self._pending) >= self.flush_every_records:
            self.flush()

    def log_artifact(self, name: str, data: bytes) -> None:
        """Stored as ``name`` in the run's artifacts (subfolders allowed, no ``..``)."""
        path = _artifact_path(name)
        folder, base = posixpath.split(path)
        with tempfile.TemporaryDirectory(prefix="maskdino-mlflow-") as tmp:
            local = os.path.join(tmp, base)
            with open(local, "wb") as f:
                f.write(data)
            self._client.log_artifact(self.run_id, local, artifact_path=folder or None)

    def flush(self) -> None:
        """Send the buffered metrics, at most 1000 per request."""
        self._last_flush = time.monotonic()
        while self._pending:
            batch = self._pending[:MAX_BATCH]
            self._client.log_batch(self.run_id, metrics=batch, synchronous=True)
            del self._pending[:len(batch)]  # only once sent: a failed send is retried on the next flush

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True


def _metric_value(value: Any) -> float:
    return float(value)  # also 0-d tensors, numpy scalars and bools; NaN and inf pass through
