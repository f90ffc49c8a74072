"""The training logger interface: what the trainer reports each step, and where it goes.

The trainer talks to a :class:`Logger` only (``log_params``, ``log_metrics``, ``log_artifact``,
``close``), so the backends can change without touching it: today a tqdm progress bar plus plain
lines on stderr (:class:`ConsoleLogger`) and a JSON-lines file in the run directory
(:class:`JsonlLogger`, local or ``s3://``); an ``MlflowLogger`` (docs/pipeline.md#mlflow) will
implement the same four methods. Only rank 0 logs: :func:`make_logger` hands every other rank a
:class:`NullLogger`, so the trainer calls the logger unconditionally.

Params are always flattened to dotted keys and redacted (:func:`redact`) inside the loggers
themselves, so a secret cannot leak through a caller that forgot to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from tqdm import tqdm

from core.config import config_to_dict
from core.storage import Storage, is_s3, join
from pipeline.distributed import rank_and_world

if TYPE_CHECKING:  # typing.Self is 3.11+; the project supports 3.10 (annotations are lazy here)
    from typing_extensions import Self

__all__ = [
    "ConsoleLogger",
    "JsonlLogger",
    "Logger",
    "MultiLogger",
    "NullLogger",
    "StepMetrics",
    "flatten_config",
    "make_logger",
    "peak_memory_mb",
    "redact",
]

REDACTED = "***"
# Substrings of a (lower-cased, dotted) key whose value is never written anywhere. Matching the
# whole dotted key over-redacts a little (e.g. everything under a "credentials" block): the safe side.
_SECRET_KEY_PARTS = ("secret", "password", "token", "access_key", "credential")
# URL userinfo ("scheme://user:pass@host"): the password goes, the user name stays for debugging;
# userinfo without a colon is usually a bare token, so it goes whole.
_USERINFO_RE = re.compile(r"(?P<pre>//)(?P<user>[^/@\s:]*)(?P<pw>:[^/@\s]*)?@")


@runtime_checkable
class Logger(Protocol):
    """What the trainer calls; every backend implements exactly these."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, name: str, data: bytes) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class _Closing:
    """``with logger:`` closes it, also when training raises. ``flush`` (make everything logged so far
    durable; the trainer calls it with each checkpoint) is a no-op unless a backend buffers."""

    def flush(self) -> None:
        pass

    def close(self) -> None:  # overridden
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- params


def flatten_config(cfg: Any) -> dict[str, Any]:
    """A dataclass / mapping tree as ``{"a.b.c": value}``; lists as JSON strings.

    Scalars (str, int, float, bool, None) stay as they are; anything else becomes ``str``. An
    empty mapping is kept as ``"{}"`` so the key does not silently vanish. Idempotent on an
    already flat mapping.
    """
    flat: dict[str, Any] = {}
    _flatten_into(flat, "", config_to_dict(cfg))
    return flat


def _flatten_into(flat: dict[str, Any], prefix: str, value: Any) -> None:
    if isinstance(value, Mapping) and (value or not prefix):
        for key, sub in value.items():
            _flatten_into(flat, f"{prefix}.{key}" if prefix else str(key), sub)
    elif isinstance(value, (Mapping, list, tuple)):
        flat[prefix] = json.dumps(value, default=str)
    elif value is None or isinstance(value, (str, int, float, bool)):
        flat[prefix] = value
    else:
        flat[prefix] = str(value)


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy with secret-named keys set to ``"***"`` and passwords in URL userinfo masked."""
    return {key: _redact_item(str(key), value) for key, value in params.items()}


def _redact_item(key: str, value: Any) -> Any:
    if any(part in key.lower() for part in _SECRET_KEY_PARTS):
        return REDACTED
    if isinstance(value, str):
        return _USERINFO_RE.sub(_mask_userinfo, value)
    if isinstance(value, Mapping):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return [_redact_item("", v) for v in value]
    return value


def _mask_userinfo(m: re.Match[str]) -> str:
    if m.group("pw") is None:
        return f"{m.group('pre')}{REDACTED}@"
    return f"{m.group('pre')}{m.group('user')}:{REDACTED}@"


def _safe_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return redact(flatten_config(params))


# --------------------------------------------------------------------------- step metrics


@dataclasses.dataclass
class StepMetrics:
    """What the trainer measures each step; :meth:`as_dict` gives the flat metric names."""

    losses: dict[str, float]  # weighted terms the optimiser sums -> "loss/<term>"
    lr_by_group: dict[str, float]  # -> "lr/<group>"
    grad_norm: float | None  # -> "grad_norm" (absent when not clipped / not measured)
    images_per_s: float
    data_wait_fraction: float  # seconds waiting for the batch / step seconds
    peak_memory_mb: float

    def as_dict(self) -> dict[str, float]:
        out = {f"loss/{term}": float(v) for term, v in self.losses.items()}
        # A criterion that already reports its total keeps it; summing again would double-count.
        out.setdefault("loss/total", float(sum(v for t, v in self.losses.items() if t != "total")))
        out.update({f"lr/{group}": float(v) for group, v in self.lr_by_group.items()})
        if self.grad_norm is not None:
            out["grad_norm"] = float(self.grad_norm)
        out["images_per_s"] = float(self.images_per_s)
        out["data_wait_fraction"] = float(self.data_wait_fraction)
        out["peak_memory_mb"] = float(self.peak_memory_mb)
        return out


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak CUDA memory allocated on ``device``; on CPU the process's peak RSS, in MiB."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


# --------------------------------------------------------------------------- backends


class NullLogger(_Closing):
    """For ranks other than 0: accepts everything, writes nothing."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, name: str, data: bytes) -> None:
        pass


class MultiLogger(_Closing):
    """Fans every call out to several loggers, in order."""

    def __init__(self, *loggers: Logger) -> None:
        self.loggers = list(loggers)

    def log_params(self, params: Mapping[str, Any]) -> None:
        for lg in self.loggers:
            lg.log_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log_metrics(metrics, step)

    def log_artifact(self, name: str, data: bytes) -> None:
        for lg in self.loggers:
            lg.log_artifact(name, data)

    def flush(self) -> None:
        for lg in self.loggers:
            lg.flush()

    def close(self) -> None:
        # Close them all even if one fails (its file must still be flushed), then raise the first.
        errors: list[BaseException] = []
        for lg in self.loggers:
            try:
                lg.close()
            except Exception as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)
        if errors:
            raise errors[0]


class JsonlLogger(_Closing):
    """``<run_dir>/metrics.jsonl`` (one ``{"step", "time", **metrics}`` per call), ``params.json``,
    ``artifacts/<name>``; ``run_dir`` local or ``s3://``.

    Local: lines are appended and flushed at once, and a resumed run appends to the same file.
    S3 has no append, so lines go to a local spool file and the whole of it is uploaded every
    ``flush_every_s`` seconds and on close; a run that finds ``metrics.jsonl`` already there
    (a resume) starts the spool from it so the upload does not drop the earlier lines.
    Non-finite values are written as the strings ``"nan"``, ``"inf"``, ``"-inf"``: strict JSON,
    and ``float()`` reads them back.
    """

    def __init__(self, run_dir: str, storage: Storage, flush_every_s: float = 30.0) -> None:
        self.run_dir = run_dir
        self.storage = storage
        self.flush_every_s = flush_every_s
        self.metrics_uri = join(run_dir, "metrics.jsonl")
        self._params: dict[str, Any] = {}
        self._s3 = is_s3(run_dir)
        self._dirty = False
        self._last_flush = time.monotonic()
        self._closed = False
        self._file: IO[bytes] = self._open_sink()

    def _open_sink(self) -> IO[bytes]:
        if not self._s3:
            path = self.metrics_uri.removeprefix("file://")
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            return open(path, "ab")  # held until close()
        spool = tempfile.TemporaryFile()  # noqa: SIM115 - held until close()
        if self.storage.exists(self.metrics_uri):
            with self.storage.open_read(self.metrics_uri) as src:
                shutil.copyfileobj(src, spool)
        return spool

    def log_params(self, params: Mapping[str, Any]) -> None:
        # Later calls add to (or override) earlier ones; the file always holds the union.
        self._params.update(_safe_params(params))
        text = json.dumps(self._params, indent=2, default=str) + "\n"
        self.storage.write_bytes(join(self.run_dir, "params.json"), text.encode())

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        reserved = {"step", "time"} & set(metrics)
        if reserved:
            raise ValueError(f"metric names {sorted(reserved)} are reserved for the record itself")
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        record.update({name: _json_number(v) for name, v in metrics.items()})
        self._file.write((json.dumps(record, allow_nan=False) + "\n").encode())
        self._file.flush()
        self._dirty = True
        if self._s3 and time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def log_artifact(self, name: str, data: bytes) -> None:
        self.storage.write_bytes(join(self.run_dir, "artifacts", _artifact_path(name)), data)

    def flush(self) -> None:
        """Upload the spool (S3); a no-op locally, where every line is flushed as written."""
        self._last_flush = time.monotonic()
        if not (self._s3 and self._dirty):
            return
        self._file.seek(0)
        with self.storage.open_write(self.metrics_uri) as out:
            shutil.copyfileobj(self._file, out)
        self._file.seek(0, os.SEEK_END)
        self._dirty = False

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._file.close()


def _json_number(value: Any) -> float | int | str:
    if isinstance(value, bool):  # bool is an int; keep it a number rather than true/false
        return int(value)
    if isinstance(value, int):
        return value
    v = float(value)  # also 0-d tensors and numpy scalars
    return v if math.isfinite(v) else str(v)


def _artifact_path(name: str) -> str:
    # Artifacts stay under artifacts/: no absolute paths, no climbing out with "..".
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"artifact name {name!r} must be a relative path without '.' or '..' parts")
    return "/".join(parts)


class ConsoleLogger(_Closing):
    """A tqdm bar over ``max_steps`` with loss, lr, images/s and data-wait % as postfix, and every
    ``print_every`` steps (and at the last step) one plain line on stderr, which is what remains
    in a job log where the bar is off (``disable=None``: the bar shows only on a terminal)."""

    def __init__(self, max_steps: int, print_every: int = 20) -> None:
        self.max_steps = max_steps
        self.print_every = print_every
        self._bar = tqdm(total=max_steps, desc="train", unit="step", disable=None, dynamic_ncols=True)

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, name: str, data: bytes) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        summary = _summary(metrics)
        # Set the position rather than add one: a resumed run starts mid-way.
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix(summary, refresh=False)
        due = self.print_every > 0 and step % self.print_every == 0
        if due or step == self.max_steps:
            line = " ".join([f"step {step}/{self.max_steps}"] + [f"{k} {v}" for k, v in summary.items()])
            tqdm.write(line, file=sys.stderr)  # resolved now: callers (and tests) may swap stderr

    def close(self) -> None:
        self._bar.close()


def _summary(metrics: Mapping[str, float]) -> dict[str, str]:
    out: dict[str, str] = {}
    if "loss/total" in metrics:
        out["loss"] = f"{float(metrics['loss/total']):.4f}"
    lrs = [float(v) for k, v in metrics.items() if k.startswith("lr/")]
    if lrs:
        # The base lr is the largest: backbone groups run at a fraction of it.
        out["lr"] = f"{max(lrs):.2e}"
    if "images_per_s" in metrics:
        out["images/s"] = f"{float(metrics['images_per_s']):.1f}"
    if "data_wait_fraction" in metrics:
        out["data-wait"] = f"{100 * float(metrics['data_wait_fraction']):.0f}%"
    return out


# --------------------------------------------------------------------------- factory


def make_logger(run_dir: str, max_steps: int, storage: Storage, print_every: int = 20) -> Logger:
    """Rank 0: console + JSONL in ``run_dir``; every other rank: a :class:`NullLogger`."""
    rank, _ = rank_and_world()
    if rank != 0:
        return NullLogger()
    console = ConsoleLogger(max_steps, print_every=print_every)
    try:
        return MultiLogger(console, JsonlLogger(run_dir, storage))
    except BaseException:
        with contextlib.suppress(Exception):
            console.close()
        raise
