"""The local-disk backend (plain paths and ``file://``): atomic publish by temp file + fsync + rename.

A full disk is a user error, not a bug: it surfaces as one :class:`StorageError` line naming the
path and the free space left, and the temp file is removed, so nothing half-written is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from typing import BinaryIO

from core.storage.base import ObjectInfo, StorageError
from core.storage.uri import local_path

TEMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{16}$")  # our local temp files: ".<name>.tmp-<hex16>"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _fsync_dir(path: str) -> None:
    # Makes the rename durable across a crash; not possible on every platform, harmless if not.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _free_bytes(directory: str) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def disk_full_error(path: str, exc: OSError, uri: str) -> StorageError:
    """One line naming the file, the free space where it goes, and the fix."""
    free = _free_bytes(os.path.dirname(os.path.abspath(path)) or ".")
    left = f"{free / 1e6:,.1f} MB free" if free is not None else "free space unknown"
    return StorageError(f"no space left on the device writing {path} ({left} in {os.path.dirname(path) or '.'}; "
                        f"{exc.strerror}); free some space or write elsewhere, then re-run: finished work is kept",
                        uri=uri, code="ENOSPC")


def _publish(f: BinaryIO, tmp: str, path: str) -> None:
    """fsync the temp file (by name when the caller closed it) and rename it over ``path``."""
    if f.closed:  # the caller closed it: data is flushed, fsync by name instead
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    else:
        f.flush()
        os.fsync(f.fileno())
        f.close()
    os.replace(tmp, path)


class LocalBackend:
    """Files on this machine's disks."""

    def open_read(self, uri: str, start: int = 0) -> BinaryIO:
        path = local_path(uri)
        try:
            f = open(path, "rb")  # noqa: SIM115 - the caller owns the handle
        except FileNotFoundError:
            raise StorageError(f"no such file: {path}; check the path", uri=uri, code="NotFound") from None
        except IsADirectoryError:
            raise StorageError(f"{path} is a directory, not a file; name a file", uri=uri) from None
        except OSError as exc:
            raise StorageError(f"cannot open {path}: {exc.strerror}; check permissions", uri=uri) from exc
        if start:
            f.seek(start)
        return f

    @contextlib.contextmanager
    def open_write(self, uri: str) -> Iterator[BinaryIO]:
        path = local_path(uri)
        directory, name = os.path.split(os.path.abspath(path))
        if not name:
            raise StorageError(f"cannot write to {uri!r}: it names a directory; add a file name", uri=uri)
        try:
            os.makedirs(directory, exist_ok=True)
            # Same directory as the target so os.replace is an atomic rename on one filesystem.
            tmp = os.path.join(directory, f".{name}.tmp-{secrets.token_hex(8)}")
            f = open(tmp, "xb")  # noqa: SIM115
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise disk_full_error(path, exc, uri) from exc
            raise StorageError(f"cannot create {path}: {exc.strerror}; check the directory", uri=uri) from exc
        try:
            yield f  # type: ignore[misc]
            _publish(f, tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):  # e.g. a full disk on flush; keep the original error
                f.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            # Whoever wrote into the stream (directly, or a thread behind it) ran out of space here.
            if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                raise disk_full_error(path, exc, uri) from exc
            raise
        _fsync_dir(directory)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        root = local_path(prefix)
        scheme = "file://" if prefix.startswith("file://") else ""
        found: list[ObjectInfo] = []
        if os.path.isdir(root):
            for dirpath, _dirnames, filenames in os.walk(root):
                for fname in filenames:
                    if TEMP_RE.match(fname):
                        continue
                    full = os.path.join(dirpath, fname)
                    try:
                        size = os.stat(full).st_size
                    except FileNotFoundError:  # deleted while walking
                        continue
                    found.append(ObjectInfo(scheme + full, size))
        found.sort(key=lambda o: o.uri)  # os.walk order is per-directory; sort globally
        return iter(found)

    def stat(self, uri: str) -> ObjectInfo | None:
        path = local_path(uri)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not os.path.isfile(path):
            return None
        return ObjectInfo(uri, st.st_size)

    def delete(self, uri: str) -> None:
        path = local_path(uri)
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise StorageError(f"{path} is a directory; delete() removes single files", uri=uri) from None
        except OSError as exc:
            raise StorageError(f"cannot delete {path}: {exc.strerror}; check permissions", uri=uri) from exc
