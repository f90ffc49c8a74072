"""`maskdino shard --address` joins an existing Ray cluster (a head started here on 127.0.0.1) and
ships the data_prep package to it; `--splits` shards several splits in one Ray session."""
from __future__ import annotations

import os
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from data_prep.synthetic import SyntheticSpec, make_synthetic
from tests.shard_helpers import read_manifest, read_samples

CLI = [sys.executable, "-m", "cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    make_synthetic(root, SyntheticSpec(train_images=6, val_images=3, min_size=96, max_size=128, seed=2,
                                       formats=("ade20k",)))
    return root


def test_splits_shard_each_split_into_its_own_folder(raw, tmp_path):
    out = tmp_path / "ade"
    run = subprocess.run(CLI + ["shard", "--inline", "--splits", "train,val", "source.format=ade20k",
                                f"source.root={raw / 'ADEChallengeData2016'}", f"output={out}"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert read_manifest(out / "train").counts.samples == 6 and read_manifest(out / "val").counts.samples == 3
    assert set(read_samples(out / "val")) == {"ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"}
    assert run.stdout.count("Sharded ") == 2  # one summary paragraph per split


@pytest.mark.slow
@pytest.mark.ray
def test_shard_on_a_running_cluster_by_address(raw, tmp_path):
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # Ray puts unix sockets under its temp dir; pytest's tmp_path is too long for a socket path.
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         f"--temp-dir={ray_tmp}", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:  # the GCS port accepts connections once the head is up
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head did not come up in 120 s"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        out = tmp_path / "out"
        run = subprocess.run(CLI + ["shard", "--address", address, "source.format=ade20k", "source.split=train",
                                    f"source.root={raw / 'ADEChallengeData2016'}", f"output={out}",
                                    "shard.maxcount=2"],
                             env=env, capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr[-2000:]
        manifest = read_manifest(out)
        assert len(manifest.shards) == 3 and manifest.counts.samples == 6
        assert "3 written" in run.stdout
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # our head only: `ray stop` would kill every Ray here
        head.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)
