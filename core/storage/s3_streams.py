"""The S3 object streams: a reader that resumes a cut response with ranged GETs, and a writer that
publishes by multipart upload (or one PUT for a small object) only on a clean finish."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import time
from typing import TYPE_CHECKING, Any

import botocore.exceptions as bce

from core.storage.base import READ_CHUNK, StorageError
from core.storage.s3_errors import cause, describe, is_transient

if TYPE_CHECKING:
    from core.storage.s3 import S3Backend

logger = logging.getLogger(__name__)

_MAX_PARTS = 10_000  # S3 limit on parts per multipart upload.


class S3RangeReader(io.RawIOBase):
    """Raw stream over one S3 object that resumes with ranged GETs after a cut.

    Invariant: ``_pos`` is the absolute offset of the next byte to hand out; after a failure
    we ask for exactly ``bytes=_pos-`` with ``IfMatch`` on the first ETag, so bytes are neither
    lost nor duplicated and a replaced object is detected instead of silently spliced.
    """

    def __init__(self, storage: S3Backend, uri: str, bucket: str, key: str, start: int) -> None:
        super().__init__()
        self._storage = storage
        self._uri = uri
        self._bucket = bucket
        self._key = key
        self._pos = start
        self._etag: str | None = None
        self._end = start  # absolute end offset, known after the first response
        self._body: Any = None
        self._open_first()

    # -- opening
    def _get(self, **extra: Any) -> dict[str, Any]:
        client = self._storage.client(self._uri)
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key, **extra}
        if self._pos:
            kwargs["Range"] = f"bytes={self._pos}-"
        return client.get_object(**kwargs)

    def _open_first(self) -> None:
        storage = self._storage
        try:
            resp = storage.call("read", self._uri, self._get)
        except StorageError as exc:
            if exc.code != "InvalidRange":
                raise
            # Range starting at or past the end: S3 answers 416.  At exactly the end that is
            # simply an empty read; beyond it the caller asked for something impossible.
            info = storage.stat(self._uri)
            if info is not None and self._pos == info.size:
                self._end = self._pos
                return
            size = "missing" if info is None else f"{info.size} bytes"
            raise StorageError(
                f"start={self._pos} is past the end of {self._uri} ({size}); use a smaller start",
                uri=self._uri,
                code="InvalidRange",
            ) from None
        self._etag = resp.get("ETag")
        self._end = self._pos + int(resp["ContentLength"])
        self._body = resp["Body"]

    def _reopen(self) -> None:
        extra = {"IfMatch": self._etag} if self._etag else {}
        resp = self._get(**extra)  # transient errors are handled by readinto's loop
        got = self._pos + int(resp["ContentLength"])
        if got != self._end:  # same ETag but different length would be a server bug; refuse
            resp["Body"].close()
            raise StorageError(
                f"{self._uri} changed while it was being read (size differs); re-run to read the new version",
                uri=self._uri,
                code="PreconditionFailed",
            )
        self._body = resp["Body"]

    def _drop_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            with contextlib.suppress(Exception):
                body.close()

    # -- RawIOBase API
    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def readinto(self, b: Any) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("I/O operation on closed file")
        want = min(len(b), self._end - self._pos)
        if want <= 0:
            return 0
        storage = self._storage
        attempts = storage.config.max_attempts
        failures = 0
        while True:
            try:
                if self._body is None:
                    self._reopen()
                chunk = self._body.read(want)
                if not chunk:  # EOF before the advertised length without an error: a cut
                    raise bce.IncompleteReadError(actual_bytes=self._pos, expected_bytes=self._end)
                n = len(chunk)
                b[:n] = chunk
                self._pos += n
                return n
            except StorageError:
                self._drop_body()
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                self._drop_body()
                if not is_transient(exc):
                    raise storage.error(exc, "read", self._uri) from cause(exc)
                failures += 1  # consecutive: any delivered byte returns and resets the count
                if failures >= attempts:
                    raise storage.error(exc, "read", self._uri, failures) from cause(exc)
                delay = storage.backoff(failures)
                logger.warning(
                    "S3 read %s interrupted at byte %d of %d (attempt %d/%d: %s); resuming in %.2fs",
                    self._uri, self._pos, self._end, failures, attempts,
                    describe(exc, storage.known_secrets()), delay,
                )
                time.sleep(delay)

    def readall(self) -> bytes:
        # RawIOBase.readall reads 8 KiB at a time; large chunks are much faster here.
        chunks = []
        while self._pos < self._end:
            chunk = self.read(min(READ_CHUNK, self._end - self._pos))
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self._drop_body()
        super().close()


# --------------------------------------------------------------------------- S3 writer


class S3MultipartWriter(io.RawIOBase):
    """Write-only stream: buffers one part, uploads parts as they fill, publishes on finish().

    The multipart upload is only created once a full part exists, so small objects cost a
    single PUT.  Nothing is visible under the key until CompleteMultipartUpload / PutObject.
    """

    def __init__(self, storage: S3Backend, uri: str, bucket: str, key: str) -> None:
        super().__init__()
        self._storage = storage
        self._uri = uri
        self._bucket = bucket
        self._key = key
        self._part_size = storage.config.multipart_part_size
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._written = 0
        self._done = False

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._written

    def write(self, b: Any) -> int:  # type: ignore[override]
        if self._done or self.closed:
            raise ValueError(f"write to a finished or closed S3 writer ({self._uri})")
        view = memoryview(b).cast("B")
        n = len(view)
        # Fill the part buffer piecewise: memory stays at one part even for a huge single write.
        while view:
            take = self._part_size - len(self._buf)
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == self._part_size:
                part, self._buf = bytes(self._buf), bytearray()
                self._upload_part(part)
        self._written += n
        return n

    def close(self) -> None:
        # Closing only forbids further writes; publishing happens on the with-block's clean exit.
        super().close()

    def _upload_part(self, data: bytes) -> None:
        storage, client = self._storage, self._storage.client(self._uri)
        if self._upload_id is None:
            resp = storage.call(
                "write", self._uri, client.create_multipart_upload, Bucket=self._bucket, Key=self._key
            )
            self._upload_id = resp["UploadId"]
        number = len(self._parts) + 1
        if number > _MAX_PARTS:
            raise StorageError(
                f"{self._uri} needs more than {_MAX_PARTS} parts; raise StorageConfig.multipart_part_size",
                uri=self._uri,
            )
        resp = storage.call(
            f"write part {number} of",
            self._uri,
            client.upload_part,
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=data,
        )
        self._parts.append({"ETag": resp["ETag"], "PartNumber": number})

    def finish(self) -> None:
        storage, client = self._storage, self._storage.client(self._uri)
        if self._upload_id is None:
            storage.call(
                "write", self._uri, client.put_object, Bucket=self._bucket, Key=self._key, Body=bytes(self._buf)
            )
        else:
            if self._buf or not self._parts:
                self._upload_part(bytes(self._buf))
            self._buf = bytearray()
            try:
                storage.call(
                    "write",
                    self._uri,
                    client.complete_multipart_upload,
                    Bucket=self._bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
            except StorageError as exc:
                # A retried Complete whose first try succeeded (response lost) sees NoSuchUpload.
                if exc.code != "NoSuchUpload" or not self._completed_already():
                    raise
        self._done = True
        self._upload_id = None
        super().close()

    def _completed_already(self) -> bool:
        try:
            head = self._storage.client(self._uri).head_object(Bucket=self._bucket, Key=self._key)
            digests = b"".join(bytes.fromhex(p["ETag"].strip('"')) for p in self._parts)
        except Exception:  # noqa: BLE001 - any doubt (or a non-MD5 ETag) means "not completed"
            return False
        expected = f'"{hashlib.md5(digests).hexdigest()}-{len(self._parts)}"'  # noqa: S324 - S3's ETag scheme
        return head.get("ETag") == expected and int(head.get("ContentLength", -1)) == self._written

    def abort(self) -> None:
        """Best effort: drop the multipart upload so no parts linger (and cost money)."""
        self._done = True
        self._buf = bytearray()
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            try:
                self._storage.call(
                    "abort upload of",
                    self._uri,
                    self._storage.client(self._uri).abort_multipart_upload,
                    Bucket=self._bucket,
                    Key=self._key,
                    UploadId=upload_id,
                )
            except StorageError as exc:
                if exc.code != "NoSuchUpload":
                    logger.warning(
                        "could not abort multipart upload for %s (%s); its parts stay billed until "
                        "a bucket lifecycle rule (AbortIncompleteMultipartUpload) removes them",
                        self._uri, exc,
                    )
        with contextlib.suppress(Exception):
            super().close()
