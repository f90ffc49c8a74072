"""The model registry (docs/pipeline.md#registry): register fine-tuned bundles, promote a champion, resolve
``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` back to a bundle folder.

A registered version is an MLflow pyfunc "model from code" (``pipeline/registry_pyfunc.py``) whose
artifacts are the bundle's own files (config.yaml, model.safetensors, categories.json): no pickle,
the weights load with ``weights_only``-safe safetensors through our code. Its version tags carry
``task``, ``metric_name``, ``metric_value`` and the lineage (``lineage.<key>``: pretrain run, data
manifest digests, code version). A new version gets the alias ``candidate``.

Promotion moves the alias ``champion``. Every metric we rank by (mask AP, box AP, PQ, mIoU) is higher
is better; a candidate must beat the champion strictly, on the same metric name.

Concurrency. An alias is single-valued, but setting one is last-writer-wins, so "read champion,
compare, set" in two processes can leave the worse one. Promotions therefore run under a lock, and
the only atomic primitive every MLflow backend (sqlite, an ``mlflow server``) offers is that creating
a registered model whose name exists fails: the lock is the registered model ``NAME.promotion-lock``,
created to acquire (tagged with its owner and expiry) and deleted to release. Guarantees:
- while each holder finishes within ``LOCK_TTL_S`` (60 s; a promotion takes well under a second),
  promotions on one NAME are serialised, so after any set of concurrent ``promote_if_better`` calls
  the champion is the best of the old champion and all candidates (ties keep the earlier one);
- a holder that died leaves the lock behind; it is broken once expired. Two waiters breaking the same
  expired lock at once could both proceed: each re-reads the champion under what it believes is its
  lock, so the result is still a version that beat the champion it read, but not necessarily the best;
- ``promote`` (manual) takes the same lock, so it never interleaves with an automatic promotion.

The tracking URI is the argument when given, else ``MLFLOW_TRACKING_URI``
(``sqlite:///ABS/mlflow.db`` or ``http://HOST:PORT`` of an ``mlflow server``).
"""
from __future__ import annotations

import getpass
import math
import os
import random
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from core.config import ConfigError
from core.storage import Storage, join
from pipeline.bundle_files import CATEGORIES_NAME, CONFIG_NAME, WEIGHTS_NAME
from pipeline.mlflow_tracking import client

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient
    from typing_extensions import Self

__all__ = ["PromotionResult", "RegistryError", "promote", "promote_if_better", "register_bundle",
           "resolve_model_uri", "tracking_uri_or_env"]

CANDIDATE = "candidate"
CHAMPION = "champion"
MODEL_SUBDIR = "model"  # where the pyfunc lives in the registering run's artifacts
LOCK_SUFFIX = ".promotion-lock"
LOCK_TTL_S = 60.0
LOCK_WAIT_S = 120.0
_PYFUNC_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "registry_pyfunc.py")
_MODEL_URI_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))/?$")


class RegistryError(ConfigError):
    """A registry problem the user fixes (no tracking URI, unknown model/alias/version, lock held)."""


@dataclass(frozen=True)
class PromotionResult:
    promoted: bool
    champion_version: str | None
    reason: str


def tracking_uri_or_env(tracking_uri: str | None = None) -> str:
    """The given URI, else ``MLFLOW_TRACKING_URI``; one-line error naming the fix when neither is set."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise RegistryError("no MLflow tracking URI: set MLFLOW_TRACKING_URI=sqlite:///ABS/PATH/mlflow.db (or "
                            "http://HOST:PORT of an mlflow server) or pass --tracking-uri")
    return uri


def _client(tracking_uri: str | None) -> MlflowClient:
    return client(tracking_uri_or_env(tracking_uri))


# ---------------------------------------------------------------- register


def register_bundle(tracking_uri: str | None, run_id: str, bundle_uri: str, name: str, task: str,
                    metric_name: str, metric_value: float, lineage: Mapping[str, str], storage: Storage) -> str:
    """Log the bundle as a pyfunc in ``run_id``'s artifacts, register it as a new version of ``name``
    tagged with task, metric and lineage, and point ``candidate`` at it. Returns the version."""
    mc = _client(tracking_uri)
    # save_model copies each artifact with a progress bar of its own: three bars of noise per model in a
    # pipeline log. A user who wants them sets the variable.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="maskdino-register-") as tmp:
        model_dir = _save_pyfunc(_local_bundle_files(storage, bundle_uri, os.path.join(tmp, "bundle")), tmp)
        mc.log_artifacts(run_id, model_dir, artifact_path=MODEL_SUBDIR)
    _ensure_registered_model(mc, name)
    tags = {"task": task, "metric_name": metric_name, "metric_value": repr(float(metric_value)),
            "bundle_uri": bundle_uri, **{f"lineage.{k}": str(v) for k, v in lineage.items()}}
    source = f"{mc.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_SUBDIR}"
    version = mc.create_model_version(name, source=source, run_id=run_id, tags=tags).version
    mc.set_registered_model_alias(name, CANDIDATE, version)
    return str(version)


def _local_bundle_files(storage: Storage, bundle_uri: str, tmp: str) -> dict[str, str]:
    """Bundle part -> local path (local bundles are read in place, s3:// ones copied into ``tmp``)."""
    os.makedirs(tmp, exist_ok=True)
    files = {}
    for part in (CONFIG_NAME, WEIGHTS_NAME, CATEGORIES_NAME):
        uri = join(bundle_uri, part)
        if storage.exists(uri):
            files[part] = storage.copy_to_local(uri, os.path.join(tmp, part))
        elif part != CATEGORIES_NAME:
            raise RegistryError(f"{bundle_uri} is not a model bundle: no {part} in it (save it with save_bundle)")
    return files


def _save_pyfunc(files: Mapping[str, str], tmp: str) -> str:
    """The pyfunc folder (MLmodel, the code file, artifacts/<bundle files>). ``pip_requirements`` is
    given so MLflow does not spend ~9 s inferring it."""
    import mlflow.pyfunc  # mlflow: seconds to import, only when registering

    path = os.path.join(tmp, MODEL_SUBDIR)
    artifacts = {os.path.splitext(part)[0]: local for part, local in files.items()}
    # MLflow warns "Add type hints to the `predict` method" here, once per save: ours takes a list of
    # differently sized arrays, which no MLflow type hint describes. A caller's warnings filter cannot
    # hide it: MLflow's filter_user_warnings_once puts its own "once" filter in front.
    mlflow.pyfunc.save_model(path, python_model=_PYFUNC_CODE, artifacts=artifacts,
                             pip_requirements=[f"mlflow=={mlflow.__version__}", "maskdino-pipeline"])
    return path


def _ensure_registered_model(mc: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException  # mlflow: seconds to import, only when registering

    try:
        mc.get_registered_model(name)
    except MlflowException:
        try:
            mc.create_registered_model(name)
        except MlflowException:
            mc.get_registered_model(name)  # created by another process meanwhile; raises if truly failing


# ---------------------------------------------------------------- promote


def promote_if_better(tracking_uri: str | None, name: str, version: str) -> PromotionResult:
    """Move ``champion`` to ``version`` when its metric strictly beats the champion's (see the module
    docstring for what holds under concurrency)."""
    mc = _client(tracking_uri)
    with _PromotionLock(mc, name):
        candidate = _version(mc, name, version)
        champion = _alias_version(mc, name, CHAMPION)
        better, reason = _beats(candidate, champion)
        if not better:
            return PromotionResult(False, str(champion.version) if champion else None, reason)
        mc.set_registered_model_alias(name, CHAMPION, candidate.version)
        mc.set_model_version_tag(name, candidate.version, "promotion_reason", reason)
        mc.set_model_version_tag(name, candidate.version, "promoted_at", _now())
        return PromotionResult(True, str(candidate.version), reason)


def promote(tracking_uri: str | None, name: str, version: str, reason: str) -> PromotionResult:
    """Manual promotion: ``champion`` moves to ``version`` whatever the metrics; who, why and when are
    recorded as version tags (``promoted_by``, ``promotion_reason``, ``promoted_at``)."""
    if not reason.strip():
        raise RegistryError("a manual promotion needs a reason: pass --reason TEXT")
    mc = _client(tracking_uri)
    with _PromotionLock(mc, name):
        target = _version(mc, name, version)
        for key, value in (("promoted_by", _who()), ("promotion_reason", reason), ("promoted_at", _now())):
            mc.set_model_version_tag(name, target.version, key, value)
        mc.set_registered_model_alias(name, CHAMPION, target.version)
    return PromotionResult(True, str(target.version), f"manual: {reason}")


def _metric(mv: ModelVersion) -> tuple[str, float]:
    try:
        return mv.tags.get("metric_name", ""), float(mv.tags.get("metric_value", "nan"))
    except ValueError:
        return mv.tags.get("metric_name", ""), math.nan


def _beats(candidate: ModelVersion, champion: ModelVersion | None) -> tuple[bool, str]:
    name, value = _metric(candidate)
    if champion is None:
        return True, f"first champion ({name} {value:.4g})"
    if str(champion.version) == str(candidate.version):
        return False, f"version {candidate.version} is already the champion"
    champ_name, champ_value = _metric(champion)
    if math.isnan(value):
        return False, f"version {candidate.version} has no valid metric_value tag"
    if champ_name and champ_name != name:
        return False, (f"version {candidate.version} is scored by {name!r} but champion {champion.version} by "
                       f"{champ_name!r}; promote manually if intended")
    if math.isnan(champ_value) or value > champ_value:
        return True, f"{name} {value:.4g} beats champion {champion.version} ({champ_value:.4g})"
    return False, f"{name} {value:.4g} does not beat champion {champion.version} ({champ_value:.4g})"


class _PromotionLock:
    """Mutual exclusion per registered model name through an atomic create (module docstring)."""

    def __init__(self, mc: MlflowClient, name: str, ttl_s: float = LOCK_TTL_S, wait_s: float = LOCK_WAIT_S):
        self.mc, self.lock_name, self.ttl_s, self.wait_s = mc, name + LOCK_SUFFIX, ttl_s, wait_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Self:
        from mlflow.exceptions import MlflowException  # mlflow: seconds to import, only when registering

        deadline = time.monotonic() + self.wait_s
        while True:
            tags = {"owner": self.owner, "expires": repr(time.time() + self.ttl_s)}
            try:
                self.mc.create_registered_model(self.lock_name, tags=tags)
                return self
            except MlflowException:
                self._break_if_expired()
            if time.monotonic() > deadline:
                raise RegistryError(f"promotion lock {self.lock_name!r} held for over {self.wait_s:.0f} s; if its "
                                    "owner is gone, delete that registered model and retry")
            time.sleep(random.uniform(0.05, 0.25))

    def _break_if_expired(self) -> None:
        from mlflow.exceptions import MlflowException  # mlflow: seconds to import, only when registering

        try:
            held = self.mc.get_registered_model(self.lock_name)
            if float(held.tags.get("expires", "0")) < time.time():
                self.mc.delete_registered_model(self.lock_name)
        except (MlflowException, ValueError):
            pass  # released (or being broken) meanwhile: the next create decides

    def __exit__(self, *exc: object) -> None:
        from mlflow.exceptions import MlflowException  # mlflow: seconds to import, only when registering

        try:
            if self.mc.get_registered_model(self.lock_name).tags.get("owner") == self.owner:
                self.mc.delete_registered_model(self.lock_name)
        except MlflowException:
            pass


def _version(mc: MlflowClient, name: str, version: str) -> ModelVersion:
    from mlflow.exceptions import MlflowException  # mlflow: seconds to import, only when registering

    try:
        return mc.get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(f"models:/{name}/{version} not found ({_first_line(exc)}); list versions in the "
                            "MLflow UI or with MlflowClient.search_model_versions") from exc


def _alias_version(mc: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException  # mlflow: seconds to import, only when registering

    try:
        return mc.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _who() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (KeyError, OSError):
        return f"uid {os.getuid()}@{socket.gethostname()}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


# ---------------------------------------------------------------- resolve


def resolve_model_uri(tracking_uri: str | None, model_uri: str, dest_dir: str) -> str:
    """Download the bundle files of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` into
    ``dest_dir`` and return that local bundle folder (what ``open_bundle(model=...)`` reads)."""
    import mlflow.artifacts  # mlflow: seconds to import, only when resolving models:/ URIs

    match = _MODEL_URI_RE.match(model_uri)
    if match is None:
        raise RegistryError(f"{model_uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    uri = tracking_uri_or_env(tracking_uri)
    mc = _client(uri)
    name, alias = match["name"], match["alias"]
    if alias:
        mv = _alias_version(mc, name, alias)
        if mv is None:
            raise RegistryError(f"{model_uri}: no version of {name!r} has the alias {alias!r} in {uri} (promote one "
                                "with `maskdino promote NAME VERSION --reason ...`)")
    else:
        mv = _version(mc, name, match["version"])
    source = mc.get_model_version_download_uri(name, mv.version).rstrip("/")
    os.makedirs(dest_dir, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/artifacts", dst_path=dest_dir,
                                                tracking_uri=uri)
    return _bundle_folder(local, dest_dir)


def _bundle_folder(downloaded: str, dest_dir: str) -> str:
    """download_artifacts names the folder after the last path part ("artifacts"); keep it as is."""
    if not os.path.exists(os.path.join(downloaded, CONFIG_NAME)):
        shutil.rmtree(downloaded, ignore_errors=True)
        raise RegistryError(f"{downloaded}: the registered model has no {CONFIG_NAME}; it was not registered "
                            f"with register_bundle (dest {dest_dir})")
    return downloaded
