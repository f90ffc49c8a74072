"""MlflowLogger and run helpers against real MLflow backends: a sqlite store in tmp_path, and an
`mlflow server` (sqlite + artifacts in a moto S3 bucket) that two processes log through at once."""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import boto3
import pytest

from pipeline.mlflow_tracking import (
    PARENT_TAG,
    TRUNCATED,
    MlflowLogger,
    client,
    default_tracking_uri,
    end_run,
    ensure_experiment,
    mlflow_key,
    start_run,
)
from tests.s3_fixtures import TEST_REGION, create_bucket

STEPS = 120


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


def test_logger_sends_redacted_params_stepped_metrics_and_artifacts_to_nested_runs(tmp_path):
    uri = default_tracking_uri(str(tmp_path))
    exp = ensure_experiment(uri, "unit")
    assert ensure_experiment(uri, "unit") == exp  # get-or-create
    parent = start_run(uri, exp, "pipeline")
    child = start_run(uri, exp, "finetune", parent_run_id=parent, tags={"stage": "finetune"})
    logger = MlflowLogger(uri, child, flush_every_s=3600, flush_every_records=1000)
    logger.log_params({"optim": {"lr": 1e-4}, "storage": {"secret_access_key": "AKIA-SECRET"},
                       "data": {"manifest": "s3://user:pw@host/m.json"}, "note": "x" * 7000})
    for step in (10, 20, 30):
        logger.log_metrics({"loss/total": step / 10, "lr/backbone": 1e-5, "grad norm!": math.nan}, step=step)
    assert client(uri).get_run(child).data.metrics == {}  # buffered until flush
    logger.log_artifact("eval/report.json", b'{"AP": 1}')
    logger.close()
    end_run(uri, child)

    run = client(uri).get_run(child)
    params = run.data.params
    assert params["optim.lr"] == "0.0001" and params["storage.secret_access_key"] == "***"
    assert params["data.manifest"] == "s3://user:***@host/m.json"
    assert len(params["note"]) == 6000 and params["note"].endswith(TRUNCATED)
    assert _history(uri, child, "loss/total") == [(10, 1.0), (20, 2.0), (30, 3.0)]
    assert math.isnan(run.data.metrics[mlflow_key("grad norm!")])  # NaN stored, not a crash
    assert run.data.tags[PARENT_TAG] == parent and run.data.tags["stage"] == "finetune"
    assert run.info.status == "FINISHED"
    assert [a.path for a in client(uri).list_artifacts(child, "eval")] == ["eval/report.json"]
    assert run.info.artifact_uri.startswith(str(tmp_path))  # not ./mlruns in the current directory


def test_changed_param_is_skipped_not_fatal(tmp_path):
    uri = default_tracking_uri(str(tmp_path))
    run = start_run(uri, ensure_experiment(uri, "p"), "r")
    with MlflowLogger(uri, run) as logger:
        logger.log_params({"a": 1})
        logger.log_params({"a": 2, "b": "x"})  # MLflow forbids changing a; b still lands
    assert client(uri).get_run(run).data.params == {"a": "1", "b": "x"}


def test_mlflow_key_keeps_slashes_and_fixes_the_rest():
    assert mlflow_key("loss/total") == "loss/total"
    assert mlflow_key("/a//b/") == "a/b"
    assert mlflow_key("ap@0.5[car]") == "ap_0.5_car_"
    assert len(mlflow_key("k" * 300)) == 250


# ---------------------------------------------------------------- server + S3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_server(s3_server, tmp_path) -> Iterator[tuple[str, str, str]]:
    """`mlflow server` on 127.0.0.1 with a sqlite store and artifacts in a fresh moto bucket;
    yields (tracking URI, bucket, S3 endpoint). Ready when /health answers (about 20 s), else fails after 120 s."""
    bucket = create_bucket(s3_server, "mlflow")
    port = _free_port()
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_server}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
           "--artifacts-destination", f"s3://{bucket}/artifacts", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(uri, proc, tmp_path / "server.log", timeout_s=120)
        yield uri, bucket, s3_server
    finally:
        _stop(proc)
        log.close()


def _wait_healthy(uri: str, proc: subprocess.Popen, log_path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {timeout_s} s: {log_path.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """The server's gunicorn/uvicorn children share its session: signal the group we created."""
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


def _worker(uri: str, shared_run: str, parent: str, index: int, barrier) -> tuple[str, str]:
    """One training process: the experiment by name (racing the other worker), metrics and an artifact on
    the shared run, and its own sibling child run."""
    exp = ensure_experiment(uri, "race-created")
    barrier.wait(timeout=120)
    sibling = start_run(uri, exp, f"worker-{index}", parent_run_id=parent)
    with MlflowLogger(uri, shared_run, flush_every_records=25) as shared, MlflowLogger(uri, sibling) as own:
        for step in range(STEPS):
            shared.log_metrics({f"worker{index}/value": float(step)}, step=step)
            own.log_metrics({"value": float(index * 1000 + step)}, step=step)
        shared.log_artifact(f"workers/{index}.bin", bytes([index]) * 1024)
        own.log_artifact("own/result.txt", f"worker {index}".encode())
    end_run(uri, sibling)
    return exp, sibling


@pytest.mark.s3
@pytest.mark.slow
def test_two_processes_log_through_server_into_s3_without_loss(mlflow_server):
    uri, bucket, endpoint = mlflow_server
    exp = ensure_experiment(uri, "driver")
    parent = start_run(uri, exp, "pipeline")
    shared = start_run(uri, exp, "shared", parent_run_id=parent)
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        results = pool.starmap(_worker, [(uri, shared, parent, i, barrier) for i in range(2)])

    exps = {e for e, _ in results}
    assert len(exps) == 1 and "0" not in exps  # both workers got the same, non-Default experiment
    for index, (_, sibling) in enumerate(results):
        assert _history(uri, shared, f"worker{index}/value") == [(s, float(s)) for s in range(STEPS)]
        assert _history(uri, sibling, "value") == [(s, float(index * 1000 + s)) for s in range(STEPS)]
        assert client(uri).get_run(sibling).data.tags[PARENT_TAG] == parent
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=TEST_REGION)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    for index, (_, sibling) in enumerate(results):
        assert any(k.endswith(f"{shared}/artifacts/workers/{index}.bin") for k in keys), keys
        assert any(k.endswith(f"{sibling}/artifacts/own/result.txt") for k in keys), keys
