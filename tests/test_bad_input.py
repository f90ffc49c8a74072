"""Bad input at the foundations, through the `maskdino` command as a user runs it: each ends as one
stderr line naming the cause and the fix, exit 2, no traceback, no terminal colour codes, and nothing
already written is lost (a re-run after the fix completes).

Cases: an S3 failure inside a Ray shard task (dead endpoint, missing bucket), a full disk while
sharding, and a YAML alias bomb in a config (refused at once, in bounded memory)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data_prep.synthetic import SyntheticSpec, make_synthetic

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cli"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    make_synthetic(root, SyntheticSpec(train_images=3, val_images=1, formats=("coco_instances",), seed=3))
    return root / "coco"


# Runs the command as its only child and writes the child's peak RSS (KiB) to argv[1].
_PEAK_RSS = ("import resource, subprocess, sys; run = subprocess.run(sys.argv[2:]); "
             "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
             "sys.exit(run.returncode)")


def _shard(raw: Path, output: str, *extra: str, env: dict[str, str] | None = None, peak_rss_file: Path | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    args = [*CLI, "shard", *extra, "source.format=coco_instances", f"source.root={raw}", "source.split=train",
            f"output={output}"]
    if peak_rss_file is not None:
        args = [sys.executable, "-c", _PEAK_RSS, str(peak_rss_file), *args]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _one_error_line(run: subprocess.CompletedProcess[str]) -> str:
    """Exit 2 and exactly one stderr line, `error: ...`, plain text (no traceback, no ANSI colours)."""
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), run.stderr
    assert "\x1b[" not in lines[0], lines[0]
    return lines[0]


@pytest.mark.ray
@pytest.mark.s3
def test_dead_endpoint_in_a_ray_shard_task_is_one_line_naming_the_endpoint(raw, s3_server):
    run = _shard(raw, "s3://bucket/coco/train", "storage.endpoint_url=http://127.0.0.1:1",
                 "storage.max_attempts=1", "executor.num_cpus=1")
    line = _one_error_line(run)
    assert "cannot connect to the S3 endpoint http://127.0.0.1:1" in line
    assert "endpoint_url" in line  # the fix
    assert "ray::" not in line


@pytest.mark.ray
@pytest.mark.s3
def test_missing_bucket_in_a_ray_shard_task_is_one_line_naming_the_bucket(raw, s3_server, s3_bucket):
    run = _shard(raw, "s3://no-such-bucket-for-this-test/coco/train", f"storage.endpoint_url={s3_server}",
                 "executor.num_cpus=1")
    line = _one_error_line(run)
    assert "bucket 'no-such-bucket-for-this-test' does not exist" in line and "create it" in line
    storage, bucket = s3_bucket  # the fix: an existing bucket; the same command then completes
    run = _shard(raw, f"{bucket}/coco/train", f"storage.endpoint_url={s3_server}", "executor.num_cpus=1")
    assert run.returncode == 0, run.stderr
    assert storage.exists(f"{bucket}/coco/train/manifest.json")


# Python starts with this as sitecustomize: every file the local storage backend opens for writing
# accepts LIMIT bytes, then fails as a full disk does (ENOSPC), whichever thread writes.
_FULL_DISK = textwrap.dedent("""
    import errno, os
    import core.storage.local as local

    LIMIT = int(os.environ["FAKE_DISK_LIMIT"])

    class _Full:
        def __init__(self, f):
            self._f, self._n = f, 0
        def write(self, data):
            self._n += len(data)
            if self._n > LIMIT:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self._f.write(data)
        def __getattr__(self, name):
            return getattr(self._f, name)

    def _open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return _Full(f) if "x" in mode or "w" in mode else f

    local.open = _open
""")


def test_full_disk_while_sharding_is_one_line_with_path_and_free_space_and_loses_nothing(raw, tmp_path):
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(_FULL_DISK)
    output = tmp_path / "shards"
    env = {"PYTHONPATH": f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "FAKE_DISK_LIMIT": "4096"}
    run = _shard(raw, str(output), "--inline", "shard.maxcount=1", env=env)
    line = _one_error_line(run)
    assert "no space left on the device writing" in line and str(output) in line
    assert " MB free in " in line and "free some space" in line
    assert not (output / "manifest.json").exists()
    assert not [p for p in output.rglob("*") if ".tmp-" in p.name]  # no half-written temp file stays
    run = _shard(raw, str(output), "--inline", "shard.maxcount=1")  # space freed: the re-run completes
    assert run.returncode == 0, run.stderr
    assert (output / "manifest.json").exists()


_ALIAS_BOMB = "\n".join(
    ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10**9 leaves
    + ["output: *a8"]
)


def test_yaml_alias_bomb_is_refused_in_bounded_memory(raw, tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(_ALIAS_BOMB + "\n")
    peak = tmp_path / "peak_rss_kib"
    # The timeout only guards against a hang (before the fix this ran for minutes at 3 GB).
    run = _shard(raw, str(tmp_path / "out"), "--config", str(config), peak_rss_file=peak, timeout=120)
    line = _one_error_line(run)
    assert str(config) in line and "alias" in line
    assert int(peak.read_text()) < 1024 * 1024, f"peak RSS {peak.read_text()} KiB"


def test_an_error_line_never_carries_terminal_colour_codes():
    """Whatever wraps an error in colours (Ray does), the line the user reads is plain text."""
    from cli.errors import one_line

    wrapped = ValueError("\x1b[36mray::write_shard()\x1b[39m (pid=1, ip=10.0.0.1) failed\nTraceback (most recent ...")
    assert one_line(wrapped) == "ray::write_shard() (pid=1, ip=10.0.0.1) failed"
