"""`Storage`: read, write, list and delete objects by URI, whatever their scheme.

Each URI goes to its scheme's :class:`~core.storage.base.Backend` (core/storage/local.py for paths and
``file://``, core/storage/s3.py for ``s3://``); the conveniences every caller wants (``read_bytes``,
``write_bytes``, ``exists``, ``copy_to_local``) are built once on top of the backends' five operations.
Guarantees on both backends: atomic publish (nothing under the final name until a ``with open_write``
block exits cleanly), bounded retries, and one-line :class:`StorageError` messages that name the URI and
the fix and never carry credentials (docs/architecture.md#storage).

A :class:`Storage` pickles to its :class:`StorageConfig` only (it is shipped to Ray tasks and
DataLoader workers); backends hold per-process state (the boto3 client) and are rebuilt on unpickling.
Only the standard library and boto3/botocore are imported here, so any process (a Ray shard worker
too) can use it without pulling in the rest of the project.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, BinaryIO

from core.storage.base import (
    READ_CHUNK,
    Backend,
    ObjectInfo,
    StorageConfig,
    StorageError,
)
from core.storage.local import LocalBackend
from core.storage.s3 import S3Backend, object_ref
from core.storage.uri import is_s3, local_path


class Storage:
    """Objects by URI (local path, ``file://`` or ``s3://``), one backend per scheme."""

    def __init__(self, config: StorageConfig | None = None) -> None:
        self.config = config or StorageConfig()
        self._local = LocalBackend()
        self._s3 = S3Backend(self.config)

    # -- pickling: ship the config only; clients/sessions are per process.
    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"Storage({self.config!r})"

    def backend(self, uri: str) -> Backend:
        """The backend that serves ``uri``'s scheme."""
        return self._s3 if is_s3(uri) else self._local

    # ------------------------------------------------------------------ the backends' operations

    def open_read(self, uri: str, start: int = 0) -> BinaryIO:
        """Open ``uri`` for streaming reads from byte ``start`` (on S3 the stream resumes after a cut)."""
        if start < 0:
            raise StorageError(f"start={start} must be >= 0 ({uri})", uri=uri)
        return self.backend(uri).open_read(uri, start)

    def open_write(self, uri: str) -> AbstractContextManager[BinaryIO]:
        """Context manager yielding a writable stream; publishes atomically on clean exit.

        Do not rely on ``close()`` inside the block to publish: only the clean exit does.
        """
        return self.backend(uri).open_write(uri)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """All objects below ``prefix`` (recursive), sorted by URI.

        ``prefix`` names a directory: ``"s3://b/data"`` and ``"s3://b/data/"`` both list keys
        under ``data/``.  S3 "directory marker" keys (ending in "/") and our local temp files
        are skipped.
        """
        return self.backend(prefix).list(prefix)

    def stat(self, uri: str) -> ObjectInfo | None:
        """Size of the object at ``uri``, or None if there is none (directories are not objects).

        On S3 a missing bucket also reads as None (HEAD carries no error code to tell them apart).
        """
        return self.backend(uri).stat(uri)

    def delete(self, uri: str) -> None:
        """Delete the object at ``uri``; no error if it is absent."""
        self.backend(uri).delete(uri)

    # ------------------------------------------------------------------ built on them

    def read_bytes(self, uri: str) -> bytes:
        with self.open_read(uri) as f:
            return f.read()

    def write_bytes(self, uri: str, data: bytes) -> None:
        with self.open_write(uri) as f:
            f.write(data)

    def exists(self, uri: str) -> bool:
        return self.stat(uri) is not None

    def copy_to_local(self, uri: str, local_file: str) -> str:
        """Make ``uri`` available as a local file and return its path.

        Local URIs are not copied: their own path is returned (``local_file`` is ignored).
        S3 objects are streamed (resumably) and published atomically at ``local_file``; if
        ``local_file`` is an existing directory the object's base name is used inside it.
        """
        if not is_s3(uri):
            path = local_path(uri)
            if not os.path.isfile(path):
                raise StorageError(f"no such file: {path}; check the path", uri=uri, code="NotFound")
            return path
        _bucket, key = object_ref(uri)
        if os.path.isdir(local_file):
            local_file = os.path.join(local_file, key.rsplit("/", 1)[-1])
        with self.open_read(uri) as src, self.open_write(local_file) as dst:
            while chunk := src.read(READ_CHUNK):
                dst.write(chunk)
        return local_file

    def _client(self, uri: str = "") -> Any:
        """The S3 backend's boto3 client for this process (tests and benchmarks patch it)."""
        return self._s3.client(uri)
