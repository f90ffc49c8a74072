"""Ray Jobs orchestration (orchestration/jobs.py, `maskdino submit` / `maskdino jobs`): one Ray head for the
module on 127.0.0.1 with its own ports, token auth off, stopped by its process group (never `ray stop`)."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from orchestration import jobs

CLI = [sys.executable, "-m", "cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}, cwd=jobs.PROJECT_ROOT)


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` in its own session; yields the dashboard URL."""
    import requests

    ports = {name: _free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                             "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "metrics-export-port", "runtime-env-agent-port",
                                             "node-manager-port", "object-manager-port")}
    temp_dir = f"/tmp/rj_{uuid.uuid4().hex[:8]}"  # unix socket paths must stay under ~107 characters
    log = tempfile.NamedTemporaryFile("w", prefix="rj_head_", suffix=".log", delete=False)  # noqa: SIM115
    auth = pytest.MonkeyPatch()
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp_dir}",
         "--block", *(f"--{name}={port}" for name, port in ports.items())],
        # as on a real cluster node, `python` in a job's entrypoint is the environment with the project's deps
        env={**os.environ, "RAY_AUTH_MODE": "disabled",
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
        stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start --head exited ({head.returncode}): {Path(log.name).read_text()[-2000:]}")
            try:
                if requests.get(f"{address}/api/version", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray dashboard did not answer at {address} within 90 s")
            time.sleep(0.5)
        auth.setenv("RAY_AUTH_MODE", "disabled")  # this process's clients too (undone at teardown)
        yield address
    finally:
        auth.undo()
        # Our head only (`ray stop` would kill every Ray on the machine). SIGTERM to `ray start` alone: it drains
        # and stops its children in ~5 s; SIGTERM to the whole group makes it wait ~30 s for a dead GCS.
        head.terminate()
        try:
            head.wait(timeout=45)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
        log.close()
        os.unlink(log.name)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture()
def small_dir(tmp_path) -> Path:
    (tmp_path / "README").write_text("a tiny working_dir\n")
    return tmp_path


# ---------------------------------------------------------------- without a head
def test_submit_to_a_closed_port_fails_fast_with_one_line(tmp_path):
    port = _free_port()  # nothing listens there
    run = _cli("submit", "x.yaml", "--address", f"http://127.0.0.1:{port}", timeout=30)  # a hang fails here
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and f"http://127.0.0.1:{port}" in lines[0] and lines[0].startswith("error: ")


def test_no_address_anywhere_is_a_user_error(monkeypatch):
    for var in jobs.ADDRESS_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(jobs.JobsError, match="--address"):
        jobs.resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:8265")
    assert jobs.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265/")
    assert jobs.resolve_address(None) == "http://head:8265"
    with pytest.raises(jobs.JobsError, match="not a dashboard URL"):
        jobs.resolve_address("ray://head:10001")


class _RecordingClient:
    def __init__(self):
        self.calls = []

    def submit_job(self, **kwargs):
        self.calls.append(kwargs)
        return "raysubmit_test"


def test_submit_pipeline_builds_entrypoint_and_runtime_env():
    client = _RecordingClient()
    pipeline = jobs.PROJECT_ROOT / "pyproject.toml"  # any file inside the project stands in for a pipeline YAML
    job_id = jobs.submit_pipeline("http://127.0.0.1:1", pipeline, ["--dry-run", "a b"],
                             {"env_vars": {"A": "1"}, "pip": ["tqdm"], "excludes": ["/scratch/"]},
                             client=client, env_vars={"B": "2"}, entrypoint_num_cpus=1)
    assert job_id == "raysubmit_test"
    sent = client.calls[0]
    assert sent["entrypoint"] == "python -m cli run pyproject.toml --dry-run 'a b'"
    env = sent["runtime_env"]
    assert env["working_dir"] == str(jobs.PROJECT_ROOT)
    assert env["excludes"][:len(jobs.DEFAULT_EXCLUDES)] == list(jobs.DEFAULT_EXCLUDES)
    assert "/scratch/" in env["excludes"]
    assert env["env_vars"] == {"A": "1", "B": "2"} and env["pip"] == ["tqdm"]
    assert sent["entrypoint_num_cpus"] == 1 and sent["metadata"]["pipeline"] == str(pipeline)
    for heavy in (".git/config", ".venv/bin/python", "demo_out/x.yaml", "runs/r/ckpt", "data/coco/a.jpg",
                  "model/__pycache__/x.pyc", "tests/fixtures/f.json", "w.safetensors", "x.egg-info/PKG-INFO"):
        assert jobs.is_excluded(heavy), heavy
    for needed in ("cli/__init__.py", "configs/data/coco.yaml", "model/config.py", "orchestration/jobs.py"):
        assert not jobs.is_excluded(needed), needed
    files, size = jobs.working_dir_size()
    assert 0 < size < jobs.UPLOAD_LIMIT_BYTES // 10 and files > 20
    # a relative path is taken from the current folder; outside the working_dir or excluded is refused
    entrypoint = jobs.pipeline_entrypoint(jobs.PROJECT_ROOT / "configs" / ".." / "pyproject.toml")
    assert entrypoint.endswith(" run pyproject.toml")
    with pytest.raises(jobs.JobsError, match="outside the working_dir"):
        jobs.pipeline_entrypoint(__file__, working_dir=jobs.PROJECT_ROOT / "pipeline")
    with pytest.raises(jobs.JobsError, match="not found"):
        jobs.pipeline_entrypoint(jobs.PROJECT_ROOT / "nope.yaml")


def test_build_runtime_env_working_dir_precedence(tmp_path):
    assert jobs.build_runtime_env({"working_dir": str(tmp_path)})["working_dir"] == str(tmp_path.resolve())
    chosen = jobs.build_runtime_env({"working_dir": "/nope"}, working_dir=tmp_path)
    assert chosen["working_dir"] == str(tmp_path.resolve())
    remote = jobs.build_runtime_env({"working_dir": "s3://bucket/pkg.zip"})
    assert remote == {"working_dir": "s3://bucket/pkg.zip"}  # no excludes for an already packed URI
    with pytest.raises(jobs.JobsError, match="not a folder"):
        jobs.build_runtime_env(working_dir=tmp_path / "missing")
    with pytest.raises(jobs.JobsError, match="KEY=VALUE"):
        jobs.parse_env_pairs(["novalue"])


# ---------------------------------------------------------------- against the module's head
@pytest.mark.ray
@pytest.mark.slow
def test_successful_job_status_and_logs(ray_head, small_dir):
    job_id = jobs.submit_job(ray_head, "python -c \"print('hello from job')\"", working_dir=small_dir)
    outcome = jobs.wait_job(ray_head, job_id, timeout_s=120, pending_timeout_s=60)
    assert outcome.status == "SUCCEEDED" and outcome.exit_code == 0, outcome
    assert "hello from job" in "".join(jobs.job_logs(ray_head, job_id))
    status = _cli("jobs", "status", job_id, "--address", ray_head)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout, status.stderr
    logs = _cli("jobs", "logs", job_id, "--address", ray_head)
    assert logs.returncode == 0 and "hello from job" in logs.stdout, logs.stderr
    followed = _cli("jobs", "logs", job_id, "--follow", env={"RAY_ADDRESS": ray_head})  # address from the env
    assert followed.returncode == 0 and "hello from job" in followed.stdout, followed.stderr
    listed = _cli("jobs", "list", "--address", ray_head)
    assert listed.returncode == 0 and job_id in listed.stdout
    unknown = _cli("jobs", "status", "raysubmit_nope", "--address", ray_head)
    assert unknown.returncode == 2 and "raysubmit_nope" in unknown.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_failing_job_exits_1(ray_head, small_dir):
    job_id = jobs.submit_job(ray_head, 'python -c "import sys; sys.exit(3)"', working_dir=small_dir)
    outcome = jobs.wait_job(ray_head, job_id, timeout_s=120, pending_timeout_s=60)
    assert outcome.status == "FAILED" and outcome.exit_code == 1, outcome
    status = _cli("jobs", "status", job_id, "--address", ray_head)
    assert status.returncode == 1 and "FAILED" in status.stdout, status.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_long_job_is_stopped(ray_head, small_dir):
    job_id = jobs.submit_job(ray_head, 'python -c "import time; time.sleep(600)"', working_dir=small_dir)
    deadline = time.monotonic() + 60
    while jobs.job_status(ray_head, job_id) != "RUNNING":
        assert time.monotonic() < deadline, "the job did not start within 60 s"
        time.sleep(0.5)
    stop = _cli("jobs", "stop", job_id, "--address", ray_head, "--wait", "--timeout", "30")
    assert stop.returncode == 3 and "STOPPED" in stop.stdout, (stop.stdout, stop.stderr)  # stopped, not timed out (5)
    assert _cli("jobs", "status", job_id, "--address", ray_head).returncode == 3


@pytest.mark.ray
@pytest.mark.slow
def test_job_waiting_for_missing_resources_reports_pending_timeout(ray_head):
    run = _cli("submit", "pyproject.toml", "--address", ray_head, "--wait", "--pending-timeout", "5",
               "--entrypoint-resources", '{"nope": 1}')
    assert run.returncode == 4, (run.stdout, run.stderr)
    job_id = run.stdout.splitlines()[0].strip()
    assert "PENDING_TIMEOUT" in run.stdout and "resources" in run.stdout
    assert jobs.job_status(ray_head, job_id) == "PENDING"
    # Ray cannot stop a job whose driver was never scheduled: the stop request waits for it (the job ends FAILED
    # after the head's RAY_JOB_START_TIMEOUT_SECONDS); the CLI says so.
    stop = _cli("jobs", "stop", job_id, "--address", ray_head)
    assert stop.returncode == 0 and "RAY_JOB_START_TIMEOUT_SECONDS" in stop.stdout, (stop.stdout, stop.stderr)


@pytest.mark.ray
@pytest.mark.slow
def test_project_root_uploads_and_imports_on_the_head(ray_head):
    job_id = jobs.submit_job(ray_head, 'python -c "import cli, orchestration.jobs; print(\'imported\')"')
    outcome = jobs.wait_job(ray_head, job_id, timeout_s=180, pending_timeout_s=120)
    logs = "".join(jobs.job_logs(ray_head, job_id))
    assert outcome.status == "SUCCEEDED", (outcome, logs[-2000:])
    assert "imported" in logs
    info = jobs.job_info(ray_head, job_id)
    assert shlex.split(info.entrypoint)[0] == "python"


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_pipeline_submitted_as_a_job_succeeds(ray_head, tmp_path):
    """`maskdino submit configs/pipeline/tiny.yaml --wait`: every stage kind runs inside the job on the head
    (sharding as Ray tasks, training under Ray Train, evaluation, registration); exit code 0 = SUCCEEDED."""
    from mlflow import MlflowClient

    from data_prep.synthetic import SyntheticSpec, make_synthetic

    raw, run_root = tmp_path / "raw", tmp_path / "run"
    make_synthetic(raw, SyntheticSpec(train_images=8, val_images=4, formats=("coco_instances",)))
    run = _cli("submit", "configs/pipeline/tiny.yaml", "--address", ray_head, "--wait", "--timeout", "900",
               "--stop-on-timeout", "--", f"run_root={run_root}", f"stages.shard.overrides=[source.root={raw / 'coco'}]",
               timeout=1000)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-2000:])
    job_id = run.stdout.splitlines()[0].strip()
    assert jobs.job_status(ray_head, job_id) == "SUCCEEDED"
    assert "pipeline maskdino-tiny: 4 stages ran, 0 skipped, 0 failed" in run.stdout  # the job's logs, printed
    for stage in ("shard", "train", "evaluate", "register"):
        assert (run_root / "stages" / stage / "LATEST.json").is_file(), stage
    champion = MlflowClient(f"sqlite:///{run_root / 'mlflow.db'}").get_model_version_by_alias("maskdino-tiny-instance",
                                                                                             "champion")
    assert int(champion.version) == 1
