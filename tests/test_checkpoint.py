"""Checkpoint publishing: per-rank uploads, the completion marker written last, torn checkpoints never
taken by `latest_complete`, verified downloads, pruning; on a local run folder and on moto S3."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.storage import Storage, join
from pipeline.checkpoint import (
    MARKER_NAME,
    CheckpointMarker,
    CheckpointPublishError,
    checkpoint_uri,
    complete_checkpoints,
    fetch,
    files_of_rank,
    latest_complete,
    local_files,
    prune,
    upload_files,
    write_marker,
)

# The files DeepSpeed writes for a 2-rank ZeRO-2 checkpoint, plus ours.
DS_FILES = {
    "global_step5/mp_rank_00_model_states.pt": b"model" * 100,
    "global_step5/zero_pp_rank_0_mp_rank_00_optim_states.pt": b"optim0" * 300,
    "global_step5/zero_pp_rank_1_mp_rank_00_optim_states.pt": b"optim1" * 300,
    "latest": b"global_step5",
    "client_state.json": b"{}",
}


def _saved(tmp_path: Path, step: int) -> str:
    local = tmp_path / f"local_{step}"
    for name, data in DS_FILES.items():
        path = local / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data + str(step).encode())
    return str(local)


def _publish(storage: Storage, local: str, run: str, step: int, world: int = 2) -> str:
    """What the trainer does: each rank uploads its files, then rank 0 writes the marker."""
    remote = checkpoint_uri(run, step)
    names = local_files(local)
    entries = [e for rank in range(world) for e in upload_files(storage, local, remote, files_of_rank(names, rank))]
    write_marker(storage, remote, CheckpointMarker(step=step, world_size=world, files=entries))
    return remote


def test_each_file_is_uploaded_by_exactly_one_rank():
    names = sorted(DS_FILES)
    by_rank = [files_of_rank(names, r) for r in range(2)]
    assert by_rank[1] == ["global_step5/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert sorted(by_rank[0] + by_rank[1]) == names


def _run_roundtrip(storage: Storage, run: str, tmp_path: Path) -> None:
    for step in (5, 10):
        _publish(storage, _saved(tmp_path, step), run, step)
    # a torn step 15: files uploaded, killed before the marker
    local = _saved(tmp_path, 15)
    upload_files(storage, local, checkpoint_uri(run, 15), local_files(local))
    assert [s for s, _ in complete_checkpoints(storage, run)] == [5, 10]
    assert latest_complete(storage, run) == (10, checkpoint_uri(run, 10))

    out = tmp_path / "fetched"
    marker = fetch(storage, checkpoint_uri(run, 10), str(out))
    assert marker.step == 10 and marker.world_size == 2
    for name, data in DS_FILES.items():
        assert (out / name).read_bytes() == data + b"10"

    assert prune(storage, run, keep=1) == [checkpoint_uri(run, 5)]
    assert [s for s, _ in complete_checkpoints(storage, run)] == [10]


def test_publish_resume_and_prune_on_a_local_run_folder(tmp_path):
    _run_roundtrip(Storage(), str(tmp_path / "run"), tmp_path)


@pytest.mark.s3
def test_publish_resume_and_prune_on_s3(s3_bucket, tmp_path):
    storage, bucket = s3_bucket
    _run_roundtrip(storage, join(bucket, "runs/r1"), tmp_path)  # the fixture yields "s3://NAME"


def test_a_checkpoint_with_a_missing_or_truncated_file_is_torn(tmp_path):
    storage, run = Storage(), str(tmp_path / "run")
    remote = _publish(storage, _saved(tmp_path, 5), run, 5)
    target = join(remote, "global_step5/zero_pp_rank_1_mp_rank_00_optim_states.pt")
    Path(target).write_bytes(b"cut")
    assert latest_complete(storage, run) is None
    os.remove(target)
    assert latest_complete(storage, run) is None


def test_fetch_refuses_content_that_does_not_match_the_marker(tmp_path):
    storage, run = Storage(), str(tmp_path / "run")
    remote = _publish(storage, _saved(tmp_path, 5), run, 5)
    target = Path(join(remote, "latest"))
    target.write_bytes(b"X" * len(target.read_bytes()))  # same size, other bytes
    with pytest.raises(CheckpointPublishError, match="latest: size or sha256 differs"):
        fetch(storage, remote, str(tmp_path / "fetched"))
    os.remove(join(remote, MARKER_NAME))
    with pytest.raises(CheckpointPublishError, match="incomplete checkpoint"):
        fetch(storage, remote, str(tmp_path / "fetched2"))
