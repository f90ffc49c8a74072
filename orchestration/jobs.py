"""Ray Jobs: submit a pipeline (or any command) to a Ray cluster, follow it, stop it.

Built on `ray.job_submission.JobSubmissionClient`, which talks HTTP to the head's dashboard
(``http://HOST:8265``). The project folder is shipped as the job's `working_dir` (zipped and uploaded
by the client, at most Ray's ~500 MiB per package) minus `DEFAULT_EXCLUDES` (virtualenv, git history,
demo/run outputs, caches, data and weights folders).

Exit codes of `maskdino submit --wait`, `maskdino jobs status|stop --wait` (see `EXIT_CODES`):
SUCCEEDED 0, FAILED 1, user error (bad address, no head answering, unknown job, bad argument) 2,
STOPPED 3, still PENDING after --pending-timeout 4, still running after --timeout 5.

Security. The dashboard port accepts job submissions, i.e. runs any command as the Ray user, and
token authentication is the only guard (on by default in our Ray 2.60; ``RAY_AUTH_MODE``).
- Our local Rays bind what they serve to 127.0.0.1: `maskdino run` starts its dashboard with
  ``dashboard_host="127.0.0.1"`` (Ray Train needs its state API), `maskdino shard` and the tests start
  theirs with ``include_dashboard=False``.
- A head that receives `maskdino submit` should be started with ``--dashboard-host=127.0.0.1`` (the
  default; never 0.0.0.0) and be reached through an SSH tunnel
  (``ssh -N -L 8265:127.0.0.1:8265 head-node``, then ``--address http://127.0.0.1:8265``) or an
  authenticating ingress, with token authentication left on.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import shlex
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import requests

from core.config import ConfigError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# gitignore-style patterns relative to the working_dir (Ray's `excludes`). Leading "/" anchors a pattern
# at the root: `configs/data` must travel, a top-level `data/` must not. Ray also honours .gitignore.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git", ".venv", "venv", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".ruff_cache",
    ".mypy_cache", ".ci",
    "/demo_out/", "/runs/", "/out/", "/build/", "/mlruns/", "mlflow.db",
    "/data/", "/datasets/", "/weights/", "/checkpoints/", "/predictions/", "/tests/fixtures/",
    "*.pth", "*.pt", "*.ckpt", "*.safetensors", "*.tar", "*.zip", "*.tar.gz",
)

# Ray's per-package upload limit (the gRPC message size).
UPLOAD_LIMIT_BYTES = 500 * 1024 * 1024

PENDING_TIMEOUT = "PENDING_TIMEOUT"
TIMEOUT = "TIMEOUT"
EXIT_CODES: dict[str, int] = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3, PENDING_TIMEOUT: 4, TIMEOUT: 5,
                              "RUNNING": 0, "PENDING": 0}
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
DEFAULT_DASHBOARD_PORT = 8265


class JobsError(ConfigError):
    """A problem the user must fix (no head answering, unknown job, bad argument); one line."""

    def __init__(self, message: str) -> None:
        ValueError.__init__(self, re.sub(r"\s*\n\s*", " ", message.strip()))


@dataclasses.dataclass(frozen=True)
class JobOutcome:
    """How `wait_job` ended: a Ray JobStatus value or PENDING_TIMEOUT / TIMEOUT."""

    job_id: str
    status: str
    message: str = ""

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    def line(self) -> str:
        return f"job {self.job_id}: {self.status}" + (f" ({self.message})" if self.message else "")


@dataclasses.dataclass(frozen=True)
class JobsConfig:
    """Where and what to submit; `runtime_env()` is exactly what goes to Ray."""

    address: str
    entrypoint: str = ""
    working_dir: str | None = None  # None: the project root
    excludes: tuple[str, ...] = DEFAULT_EXCLUDES
    env_vars: Mapping[str, str] = dataclasses.field(default_factory=dict)
    pip: tuple[str, ...] = ()
    extra_runtime_env: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def runtime_env(self) -> dict[str, Any]:
        return build_runtime_env(self.extra_runtime_env, working_dir=self.working_dir, excludes=self.excludes,
                                 env_vars=self.env_vars, pip=self.pip)


# ---------------------------------------------------------------- address and connection
def resolve_address(address: str | None) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS; `host:port` gets http://."""
    if not address:
        for var in ADDRESS_ENV_VARS:
            if os.environ.get(var):
                address = os.environ[var]
                break
    if not address:
        raise JobsError(f"no Ray address: pass --address http://HOST:{DEFAULT_DASHBOARD_PORT} (the head's "
                        f"dashboard) or set RAY_ADDRESS")
    address = address.strip().rstrip("/")
    if address.startswith(("ray://", "auto")) or address == "local":
        raise JobsError(f"Ray address {address!r} is not a dashboard URL: jobs are submitted over HTTP to "
                        f"http://HOST:{DEFAULT_DASHBOARD_PORT}")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise JobsError(f"Ray address {address!r}: expected http://HOST:PORT (the head's dashboard)")
    return address


def probe(address: str, timeout_s: float = 10.0) -> str:
    """GET {address}/api/version with a short timeout; the server's Ray version, or JobsError."""
    address = resolve_address(address)
    fix = (f"is the Ray head up with its dashboard there (`ray start --head --dashboard-host=127.0.0.1 "
           f"--dashboard-port={DEFAULT_DASHBOARD_PORT}`), or the SSH tunnel open?")
    try:
        r = requests.get(f"{address}/api/version", timeout=(min(3.0, timeout_s), timeout_s))
        if r.status_code in (401, 403) and (headers := _auth_headers()):  # importing ray costs seconds: only now
            r = requests.get(f"{address}/api/version", timeout=(min(3.0, timeout_s), timeout_s), headers=headers)
    except requests.exceptions.Timeout:
        raise JobsError(f"no answer from the Ray dashboard at {address} within {timeout_s:g} s: {fix}") from None
    except requests.exceptions.RequestException as exc:
        kind = "connection refused" if "refused" in str(exc).lower() else type(exc).__name__
        raise JobsError(f"cannot reach the Ray dashboard at {address} ({kind}): {fix}") from None
    if r.status_code in (401, 403):
        raise JobsError(f"the Ray dashboard at {address} refused us ({r.status_code}): token authentication is on; "
                        f"set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN or ~/.ray/auth_token)")
    try:
        r.raise_for_status()
        return str(r.json()["ray_version"])
    except (requests.exceptions.RequestException, ValueError, KeyError, TypeError):
        raise JobsError(f"{address} answered /api/version with HTTP {r.status_code} but is not a Ray dashboard: "
                        f"pass the dashboard port ({DEFAULT_DASHBOARD_PORT} by default), not the GCS port") from None


def _auth_headers() -> dict[str, str]:
    try:
        from ray._private.authentication import http_token_authentication as auth  # ray: seconds, only now

        return dict(auth.get_auth_headers_if_auth_enabled({}))
    except (ImportError, AttributeError, RuntimeError):  # another Ray: the client adds what it needs
        return {}


def connect(address: str | None, timeout_s: float = 10.0):
    """A JobSubmissionClient for `address`, after a quick probe (the client itself waits without a timeout)."""
    address = resolve_address(address)
    probe(address, timeout_s)
    from ray.job_submission import JobSubmissionClient  # ray takes seconds: only after the probe answered

    if not log.isEnabledFor(logging.DEBUG):  # Ray logs every packaging step at INFO on stderr
        logging.getLogger("ray").setLevel(logging.WARNING)
    with _ray_errors(address):
        return JobSubmissionClient(address)


class _ray_errors:
    """Turn the client's connection/HTTP failures into one-line JobsErrors naming the address."""

    def __init__(self, address: str, job_id: str | None = None) -> None:
        self.address, self.job_id = address, job_id

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, JobsError):
            return False
        from ray.exceptions import AuthenticationError  # ray: imported by connect() already, never at start-up

        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, AuthenticationError):
            raise JobsError(f"Ray dashboard at {self.address}: {text}") from None
        if isinstance(exc, (requests.exceptions.RequestException, ConnectionError)):
            raise JobsError(f"lost the Ray dashboard at {self.address}: {text}") from None
        if isinstance(exc, RuntimeError) and "does not exist" in str(exc) and self.job_id:
            raise JobsError(f"no job {self.job_id} on the Ray cluster at {self.address}") from None
        if isinstance(exc, RuntimeError) and "Request failed" in str(exc):
            raise JobsError(f"Ray dashboard at {self.address}: {text}") from None
        if isinstance(exc, ValueError) and "exceeds the maximum size" in str(exc):
            raise JobsError(f"working_dir too large to upload: {text}") from None
        return False


# ---------------------------------------------------------------- runtime_env
def build_runtime_env(runtime_env: Mapping[str, Any] | None = None, *, working_dir: str | os.PathLike | None = None,
                      excludes: Sequence[str] | None = None, env_vars: Mapping[str, str] | None = None,
                      pip: Sequence[str] | None = None) -> dict[str, Any]:
    """The caller's runtime_env with working_dir (argument > runtime_env > project root), our excludes
    added for a local working_dir, env_vars merged (arguments win) and pip packages appended."""
    env: dict[str, Any] = dict(runtime_env or {})
    wd = working_dir if working_dir is not None else env.get("working_dir", PROJECT_ROOT)
    wd = str(wd)
    if "://" not in wd:  # local folder (remote zip URIs are taken as they are)
        path = Path(wd).expanduser().resolve()
        if not path.is_dir():
            raise JobsError(f"working_dir {wd} is not a folder")
        wd = str(path)
        chosen = list(DEFAULT_EXCLUDES if excludes is None else excludes)
        env["excludes"] = list(dict.fromkeys([*chosen, *env.get("excludes", [])]))
    env["working_dir"] = wd
    if env_vars:
        env["env_vars"] = {**env.get("env_vars", {}), **{str(k): str(v) for k, v in env_vars.items()}}
    if pip:
        existing = env.get("pip") or []
        if isinstance(existing, dict):
            existing = {**existing, "packages": [*existing.get("packages", []), *pip]}
        else:
            existing = [*existing, *pip]
        env["pip"] = existing
    return env


def is_excluded(relative_path: str, excludes: Sequence[str] = DEFAULT_EXCLUDES) -> bool:
    """Whether `relative_path` (inside the working_dir) matches an exclude pattern (Ray's own matcher)."""
    from ray._private.thirdparty.pathspec import PathSpec  # ray takes seconds to import: only when packaging

    spec = PathSpec.from_lines("gitwildmatch", list(excludes))
    parts = Path(relative_path).parts
    # Ray checks every folder on the way down (as "a/b/" for folders): a file under an excluded folder goes too.
    prefixes = ["/".join(parts[:i]) + "/" for i in range(1, len(parts))] + ["/".join(parts)]
    return any(spec.match_file(p) for p in prefixes)


def working_dir_size(working_dir: str | os.PathLike = PROJECT_ROOT,
                     excludes: Sequence[str] = DEFAULT_EXCLUDES) -> tuple[int, int]:
    """(files, bytes before zipping) that Ray would upload, walking the folder the way Ray does."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes  # ray: only when packaging

    root = Path(working_dir).resolve()
    totals = [0, 0]

    def count(path: Path) -> None:
        if path.is_file():
            totals[0] += 1
            totals[1] += path.stat().st_size

    _dir_travel(root, [_get_excludes(root, list(excludes))], count, include_gitignore=True)
    return totals[0], totals[1]


# ---------------------------------------------------------------- submit
def submit_job(address: str | None, entrypoint: str, runtime_env: Mapping[str, Any] | None = None,
               working_dir: str | os.PathLike | None = None, submission_id: str | None = None,
               metadata: Mapping[str, str] | None = None, *, client=None, env_vars: Mapping[str, str] | None = None,
               pip: Sequence[str] | None = None, entrypoint_num_cpus: float | None = None,
               entrypoint_num_gpus: float | None = None, entrypoint_memory: int | None = None,
               entrypoint_resources: Mapping[str, float] | None = None) -> str:
    """Submit `entrypoint` with the (merged) runtime_env; returns the job (submission) id."""
    if not entrypoint.strip():
        raise JobsError("empty entrypoint")
    env = build_runtime_env(runtime_env, working_dir=working_dir, env_vars=env_vars, pip=pip)
    address = resolve_address(address)
    client = client or connect(address)
    started = time.perf_counter()
    with _ray_errors(address):
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=submission_id,
                                   metadata=dict(metadata or {}), entrypoint_num_cpus=entrypoint_num_cpus,
                                   entrypoint_num_gpus=entrypoint_num_gpus, entrypoint_memory=entrypoint_memory,
                                   entrypoint_resources=dict(entrypoint_resources) if entrypoint_resources else None)
    log.info("submitted %s to %s in %.1f s (upload included)", job_id, address, time.perf_counter() - started)
    return job_id


def pipeline_entrypoint(pipeline_path: str | os.PathLike, extra_args: Sequence[str] = (),
                        working_dir: str | os.PathLike | None = None,
                        excludes: Sequence[str] = DEFAULT_EXCLUDES) -> str:
    """`python -m cli run REL ...` with REL the pipeline file relative to the working_dir."""
    root = Path(working_dir or PROJECT_ROOT).resolve()
    path = Path(pipeline_path).expanduser()
    path = (path if path.is_absolute() else Path.cwd() / path).resolve()
    if not path.is_file():
        raise JobsError(f"pipeline file {pipeline_path} not found")
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        raise JobsError(f"pipeline file {path} is outside the working_dir {root}, so it would not be uploaded: "
                        f"move it under {root}") from None
    if is_excluded(rel, excludes):
        raise JobsError(f"pipeline file {rel} matches an upload exclude pattern, so it would not be uploaded: "
                        f"move it elsewhere under {root}")
    return shlex.join(["python", "-m", "cli", "run", rel, *extra_args])


def submit_pipeline(address: str | None, pipeline_path: str | os.PathLike, extra_args: Sequence[str] = (),
                    runtime_env: Mapping[str, Any] | None = None, *, client=None, **submit_kwargs) -> str:
    """Submit `maskdino run PIPELINE` with the project (or runtime_env's working_dir) uploaded."""
    env = build_runtime_env(runtime_env)
    local = "://" not in env["working_dir"]
    entrypoint = pipeline_entrypoint(pipeline_path, extra_args, env["working_dir"] if local else None,
                                     env.get("excludes", DEFAULT_EXCLUDES))
    metadata = {"pipeline": str(pipeline_path), **(submit_kwargs.pop("metadata", None) or {})}
    return submit_job(address, entrypoint, env, client=client, metadata=metadata, **submit_kwargs)


# ---------------------------------------------------------------- inspect, follow, stop
def list_jobs(address: str | None, *, client=None) -> list:
    """JobDetails of every job the cluster knows, oldest first."""
    address = resolve_address(address)
    client = client or connect(address)
    with _ray_errors(address):
        jobs = client.list_jobs()
    return sorted(jobs, key=lambda j: (j.start_time or 0))


def job_info(address: str | None, job_id: str, *, client=None):
    address = resolve_address(address)
    client = client or connect(address)
    with _ray_errors(address, job_id):
        return client.get_job_info(job_id)


def job_status(address: str | None, job_id: str, *, client=None) -> str:
    """PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    address = resolve_address(address)
    client = client or connect(address)
    with _ray_errors(address, job_id):
        return str(client.get_job_status(job_id).value)


def job_logs(address: str | None, job_id: str, follow: bool = False, *, client=None) -> Iterator[str]:
    """The job's output so far (one chunk), or with follow every chunk until the job ends."""
    address = resolve_address(address)
    client = client or connect(address)
    if not follow:
        with _ray_errors(address, job_id):
            text = client.get_job_logs(job_id)
        yield text
        return
    with _ray_errors(address, job_id):
        client.get_job_status(job_id)  # unknown id: one-line error before streaming
    loop = asyncio.new_event_loop()
    stream = client.tail_job_logs(job_id)
    try:
        while True:
            try:
                with _ray_errors(address, job_id):
                    chunk = loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()


PENDING_STOP_NOTE = ("Ray stops a job only once its driver has started: a job still PENDING (no resources) keeps "
                     "PENDING and ends FAILED after the head's RAY_JOB_START_TIMEOUT_SECONDS (default 900 s)")


def stop_job(address: str | None, job_id: str, *, client=None) -> bool:
    """Ask Ray to stop the job (SIGTERM to the driver, SIGKILL after a grace period); False when it had
    already ended. See PENDING_STOP_NOTE: a PENDING job is not stopped until its driver starts."""
    address = resolve_address(address)
    client = client or connect(address)
    with _ray_errors(address, job_id):
        return bool(client.stop_job(job_id))


def wait_job(address: str | None, job_id: str, timeout_s: float | None = None, pending_timeout_s: float | None = None,
             *, poll_s: float = 0.5, stop_on_timeout: bool = False, client=None) -> JobOutcome:
    """Poll until the job ends. Never waits forever when given limits: PENDING for longer than
    `pending_timeout_s` gives PENDING_TIMEOUT, not ended after `timeout_s` gives TIMEOUT (the job is
    left running unless `stop_on_timeout`)."""
    address = resolve_address(address)
    client = client or connect(address)
    started = time.monotonic()
    while True:
        with _ray_errors(address, job_id):
            info = client.get_job_info(job_id)
        status = str(info.status.value)
        waited = time.monotonic() - started
        if status in TERMINAL:
            return JobOutcome(job_id, status, _first_line(info.message) if status != "SUCCEEDED" else "")
        if status == "PENDING" and pending_timeout_s is not None and waited >= pending_timeout_s:
            outcome = JobOutcome(job_id, PENDING_TIMEOUT, f"still PENDING after {waited:.0f} s: the cluster probably "
                                 f"lacks the resources it asks for (entrypoint CPUs/GPUs/memory/custom resources) or "
                                 f"its runtime_env is still being set up; Ray says: {_first_line(info.message)}")
            break
        if timeout_s is not None and waited >= timeout_s:
            outcome = JobOutcome(job_id, TIMEOUT, f"still {status} after {waited:.0f} s")
            break
        time.sleep(poll_s)
    if stop_on_timeout:
        stop_job(address, job_id, client=client)
        note = f" ({PENDING_STOP_NOTE})" if outcome.status == PENDING_TIMEOUT else ""
        outcome = dataclasses.replace(outcome, message=outcome.message + "; stop requested" + note)
    else:
        hint = f"; stop it with `maskdino jobs stop {job_id}`"
        outcome = dataclasses.replace(outcome, message=outcome.message + hint)
    return outcome


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def parse_env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """KEY=VALUE strings (--env) to a dict."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise JobsError(f"--env {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out
