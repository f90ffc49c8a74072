"""Runs shard tasks: one Ray task per shard (local Ray by default, a cluster with an address), or
inline in this process. Jobs are consumed lazily and at most `max_in_flight` slices are in the
object store at once, so driver memory does not grow with the number of shards or workers."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import core
import data_prep
from data_prep.shard_config import ExecutorConfig
from data_prep.writer import ShardJob, ShardResult, write_shard

log = logging.getLogger(__name__)


def run_jobs(jobs: Iterable[ShardJob], cfg: ExecutorConfig) -> Iterator[ShardResult]:
    """Results in completion order (callers sort by `index`)."""
    if cfg.kind == "inline":
        for job in jobs:
            yield write_shard(job)
        return
    yield from _run_on_ray(jobs, cfg)


@contextlib.contextmanager
def ray_session(cfg: ExecutorConfig) -> Iterator[None]:
    """Start or join Ray for the duration of the block unless it is already up (then leave it be)."""
    if cfg.kind != "ray":
        yield
        return
    import ray  # lazy: ray costs seconds to import; --inline sharding never needs it

    if ray.is_initialized():
        yield
        return
    _init_ray(cfg)
    try:
        yield
    finally:
        ray.shutdown()


def _init_ray(cfg: ExecutorConfig) -> None:
    import ray  # lazy: ray costs seconds to import; --inline sharding never needs it

    if cfg.address:
        # A remote cluster may not have this project installed: ship what shard tasks import with the job.
        ray.init(address=cfg.address, runtime_env={"py_modules": [core, data_prep]}, logging_level=logging.WARNING)
    else:
        quiet_local_ray_auth_notice()
        ray.init(num_cpus=cfg.num_cpus or None, object_store_memory=cfg.object_store_bytes,
                 include_dashboard=False, logging_level=logging.WARNING)


class _DropTokenAuthNotice(logging.Filter):
    """Ray enables token authentication for every new local cluster (the secure default) and says so on
    stderr at each start: a line of noise in front of our one-line summaries and errors. Only that
    notice is dropped; the warning that authentication is *disabled* stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def quiet_local_ray_auth_notice() -> None:
    """Install the filter (once) on the logger of Ray's authentication set-up; call before ray.init."""
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenAuthNotice) for f in auth_log.filters):
        auth_log.addFilter(_DropTokenAuthNotice())


def _run_on_ray(jobs: Iterable[ShardJob], cfg: ExecutorConfig) -> Iterator[ShardResult]:
    import ray  # lazy: ray costs seconds to import; --inline sharding never needs it

    with ray_session(cfg):
        # Shard tasks are idempotent (a rerun rewrites the same bytes), so a worker lost mid-task
        # is safely retried by Ray; application errors (storage failures) are not retried here.
        remote_write = ray.remote(num_cpus=1, max_retries=3)(write_shard)
        window = cfg.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        pending: list = []
        for job in jobs:
            if len(pending) >= window:
                done, pending = ray.wait(pending, num_returns=1)
                yield _task_result(done[0])
            pending.append(remote_write.remote(job))
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield _task_result(done[0])


def _task_result(ref: Any) -> ShardResult:
    """The task's result, or the task's own exception. Ray raises a RayTaskError whose message is the
    remote traceback with terminal colour codes around the task name; its `cause` is the exception the
    task raised (a StorageError naming the bucket, say), whose one-line message is what the user needs."""
    import ray  # lazy: ray costs seconds to import; --inline sharding never needs it

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, Exception):
            raise exc.cause from exc
        raise
