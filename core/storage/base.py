"""The storage vocabulary shared by every backend: its config, what a listing returns, its one error
type, and the :class:`Backend` protocol each URI scheme implements (docs/architecture.md#storage)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import BinaryIO, Protocol

MIN_PART_SIZE = 5 * 2**20  # S3 rejects non-final multipart parts smaller than 5 MiB.
READ_CHUNK = 8 * 2**20  # read size used by readall/copy loops (bounded memory).


@dataclass(frozen=True)
class StorageConfig:
    """How to reach S3 and how hard to try.  Local paths ignore everything here."""

    endpoint_url: str | None = None  # else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS default
    region: str | None = None  # else AWS_REGION / AWS_DEFAULT_REGION / profile's, else "us-east-1"
    profile: str | None = None  # else AWS_PROFILE; None -> default credential chain
    max_attempts: int = 5  # botocore "standard" attempts per request AND our own retry loops
    backoff_base_s: float = 0.1  # exponential backoff with full jitter, capped at backoff_max_s
    backoff_max_s: float = 5.0
    multipart_part_size: int = 16 * 2**20  # >= 5 MiB (S3 minimum for non-final parts)
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.multipart_part_size < MIN_PART_SIZE:
            raise ValueError(
                f"multipart_part_size={self.multipart_part_size} is below the S3 minimum of "
                f"{MIN_PART_SIZE} bytes (5 MiB); raise it"
            )
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts={self.max_attempts} must be >= 1")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise ValueError("backoff_base_s and backoff_max_s must be >= 0")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("connect_timeout_s and read_timeout_s must be > 0")


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int


def one_line(text: str) -> str:
    return " ".join(str(text).split())


class StorageError(RuntimeError):
    """A storage operation failed.  ``str()`` is one line naming the URI and the fix.

    ``uri`` is the URI concerned; ``code`` is the S3 error code (e.g. ``"NoSuchBucket"``,
    ``"404"``) or the exception type name, when there is one.  Never carries credentials.
    """

    def __init__(self, message: str, *, uri: str | None = None, code: str | None = None) -> None:
        super().__init__(one_line(message))
        self.uri = uri
        self.code = code


class Backend(Protocol):
    """What one URI scheme implements; :class:`~core.storage.storage.Storage` routes each URI to its
    scheme's backend and builds everything else (read_bytes, exists, copy_to_local) on these five."""

    def open_read(self, uri: str, start: int = 0) -> BinaryIO:
        """A stream of the object's bytes from offset ``start``."""
        ...

    def open_write(self, uri: str) -> AbstractContextManager[BinaryIO]:
        """A writable stream whose bytes appear under ``uri`` only when the block exits cleanly."""
        ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object below ``prefix`` (recursive), sorted by URI."""
        ...

    def stat(self, uri: str) -> ObjectInfo | None:
        """The object's size, or None when there is none."""
        ...

    def delete(self, uri: str) -> None:
        """Remove the object; no error when it is absent."""
        ...
