"""Publishing training checkpoints to the run's storage (local or s3://) so a resume never reads a torn one.

Protocol, per checkpoint step (ordering matters):
1. every rank saves through DeepSpeed into a local folder (fast local disk, node-local on clusters);
2. every rank uploads the files it owns (`files_of_rank`: its own `zero_pp_rank_<r>_*` shards; rank 0
   also the rank-independent files: model states and our client state; the trainer asks DeepSpeed for no
   `latest` file, since `COMPLETE.json` says which checkpoints are whole), each written atomically
   by Storage (temp + rename locally, multipart completion on S3);
3. after a barrier, rank 0 writes `COMPLETE.json` last: the step and every file with its size and sha256.
A checkpoint without its marker, or whose listed files are missing or of the wrong size, is torn:
`latest_complete` skips it, so `resume: auto` takes the newest complete one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.storage import Storage, join

CHECKPOINTS_DIR = "checkpoints"
MARKER_NAME = "COMPLETE.json"
_STEP_DIR = re.compile(r"step_(\d{8})$")
# DeepSpeed's per-rank ZeRO partitions (`[bf16_]zero_pp_rank_<r>_...`) and the trainer's `rank_<r>.pt`.
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_|^rank_(\d+)\.")


class CheckpointPublishError(RuntimeError):
    """A published checkpoint that does not match its marker (size or checksum); names the file."""


@dataclass(frozen=True)
class FileEntry:
    name: str  # path relative to the checkpoint folder, "/"-separated
    bytes: int
    sha256: str


@dataclass(frozen=True)
class CheckpointMarker:
    step: int
    world_size: int
    files: list[FileEntry]
    meta: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> CheckpointMarker:
        d = json.loads(text)
        return cls(step=d["step"], world_size=d["world_size"], files=[FileEntry(**f) for f in d["files"]],
                   meta=d.get("meta", {}))


def checkpoint_uri(run_uri: str, step: int) -> str:
    return join(run_uri, CHECKPOINTS_DIR, f"step_{step:08d}")


def local_files(local_dir: str) -> list[str]:
    """Every file under `local_dir`, relative and "/"-separated, sorted."""
    root = Path(local_dir)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def files_of_rank(names: list[str], rank: int) -> list[str]:
    """The files `rank` uploads: its own ZeRO partition files; rank 0 also everything rank-independent."""
    out = []
    for name in names:
        match = _RANK_FILE.search(name.rsplit("/", 1)[-1])
        owner = int(match.group(1) or match.group(2)) if match else 0
        if owner == rank:
            out.append(name)
    return out


def _sha256(path: str) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def upload_files(storage: Storage, local_dir: str, remote_uri: str, names: list[str]) -> list[FileEntry]:
    """Upload `names` (relative to local_dir) below remote_uri; returns their entries for the marker."""
    entries = []
    for name in names:
        path = os.path.join(local_dir, name)
        size, digest = _sha256(path)
        with open(path, "rb") as src, storage.open_write(join(remote_uri, name)) as dst:
            for block in iter(lambda: src.read(8 << 20), b""):
                dst.write(block)
        entries.append(FileEntry(name, size, digest))
    return entries


def write_marker(storage: Storage, remote_uri: str, marker: CheckpointMarker) -> None:
    """The commit point: written after every file of the checkpoint is in place."""
    storage.write_bytes(join(remote_uri, MARKER_NAME), marker.to_json().encode())


def read_marker(storage: Storage, remote_uri: str) -> CheckpointMarker | None:
    uri = join(remote_uri, MARKER_NAME)
    if not storage.exists(uri):
        return None
    return CheckpointMarker.from_json(storage.read_bytes(uri).decode())


def _is_whole(storage: Storage, remote_uri: str, marker: CheckpointMarker) -> bool:
    present = {info.uri: info.size for info in storage.list(remote_uri)}
    return all(present.get(join(remote_uri, f.name)) == f.bytes for f in marker.files)


def complete_checkpoints(storage: Storage, run_uri: str) -> list[tuple[int, str]]:
    """(step, uri) of every complete checkpoint of the run, oldest first; torn ones are left out."""
    steps = set()
    for info in storage.list(join(run_uri, CHECKPOINTS_DIR)):
        parent = info.uri.rsplit("/", 2)
        if len(parent) == 3 and parent[2] == MARKER_NAME and _STEP_DIR.search(parent[1]):
            steps.add(int(_STEP_DIR.search(parent[1]).group(1)))
    out = []
    for step in sorted(steps):
        uri = checkpoint_uri(run_uri, step)
        marker = read_marker(storage, uri)
        if marker is not None and marker.step == step and _is_whole(storage, uri, marker):
            out.append((step, uri))
    return out


def latest_complete(storage: Storage, run_uri: str) -> tuple[int, str] | None:
    complete = complete_checkpoints(storage, run_uri)
    return complete[-1] if complete else None


def fetch(storage: Storage, remote_uri: str, local_dir: str) -> CheckpointMarker:
    """Download a complete checkpoint into local_dir, verifying every file against the marker."""
    marker = read_marker(storage, remote_uri)
    if marker is None:
        raise CheckpointPublishError(f"{remote_uri} has no {MARKER_NAME}: an incomplete checkpoint, not resumable")
    for f in marker.files:
        path = os.path.join(local_dir, f.name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with storage.open_read(join(remote_uri, f.name)) as src, open(path, "wb") as dst:
            dst.writelines(iter(lambda: src.read(8 << 20), b""))
        if _sha256(path) != (f.bytes, f.sha256):
            raise CheckpointPublishError(f"{join(remote_uri, f.name)}: size or sha256 differs from {MARKER_NAME}")
    return marker


def prune(storage: Storage, run_uri: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints (the marker first, so a half-deleted one
    reads as torn, never as complete); returns the deleted checkpoint URIs."""
    deleted = []
    for _, uri in complete_checkpoints(storage, run_uri)[:-keep] if keep > 0 else []:
        storage.delete(join(uri, MARKER_NAME))
        for info in list(storage.list(uri)):
            storage.delete(info.uri)
        deleted.append(uri)
    return deleted
