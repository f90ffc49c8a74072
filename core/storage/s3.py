"""The S3 backend (``s3://bucket/key``, any S3-compatible endpoint through boto3).

* **Atomic publish**: a streaming multipart upload completed on a clean exit and aborted on error;
  small objects take one ``put_object``.
* **Resumable reads**: botocore retries failed *requests* but never a response body cut mid-read;
  the reader re-issues ``get_object(Range="bytes=POS-", IfMatch=etag)`` from the last byte delivered
  (core/storage/s3_streams.py), so it neither loses nor duplicates bytes, and fails loudly if the object
  changed in between.
* **Bounded retries** with exponential backoff and full jitter on transient errors, on top of
  botocore's own "standard" retry mode.
* **Readable errors** (core/storage/s3_errors.py): one line naming the URI and the fix; credentials
  never appear in messages or logs.

The boto3 client is created lazily, once per process id, because clients are not fork-safe.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar

import boto3
import botocore.config
import botocore.exceptions as bce

from core.storage.base import ObjectInfo, StorageConfig, StorageError
from core.storage.s3_errors import (
    NOT_FOUND_CODES,
    cause,
    describe,
    is_transient,
    scrub,
    storage_error,
)
from core.storage.s3_streams import S3MultipartWriter, S3RangeReader
from core.storage.uri import parse_s3

logger = logging.getLogger(__name__)

T = TypeVar("T")


def object_ref(uri: str) -> tuple[str, str]:
    """(bucket, key) of an object URI; a prefix (empty key or trailing slash) is refused."""
    bucket, key = parse_s3(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"{uri!r} names a prefix, not an object; add an object key", uri=uri)
    return bucket, key


class S3Backend:
    """Objects in S3 buckets, reached with one boto3 client per process."""

    def __init__(self, config: StorageConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._session: Any = None
        self._client_obj: Any = None

    # ------------------------------------------------------------------ the Backend protocol

    def open_read(self, uri: str, start: int = 0) -> BinaryIO:
        """Streaming reads that transparently resume after a connection cut."""
        bucket, key = object_ref(uri)
        raw = S3RangeReader(self, uri, bucket, key, start)
        return io.BufferedReader(raw, buffer_size=256 * 1024)  # type: ignore[return-value]

    @contextlib.contextmanager
    def open_write(self, uri: str) -> Iterator[BinaryIO]:
        bucket, key = object_ref(uri)
        writer = S3MultipartWriter(self, uri, bucket, key)
        try:
            yield writer  # type: ignore[misc]
        except BaseException:
            writer.abort()
            raise
        try:
            writer.finish()
        except BaseException:
            writer.abort()
            raise

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        bucket, key = parse_s3(prefix)
        key_prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        client = self.client(prefix)
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key_prefix}
        while True:
            # One call per page so each page gets its own bounded retry.
            page = self.call("list", prefix, client.list_objects_v2, **kwargs)
            # S3 returns keys in UTF-8 binary order == Python str order, so URIs come sorted.
            for obj in page.get("Contents", []) or []:
                if obj["Key"].endswith("/"):
                    continue
                yield ObjectInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]))
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def stat(self, uri: str) -> ObjectInfo | None:
        """On S3 a missing bucket also reads as None (HEAD carries no error code to tell them apart)."""
        bucket, key = parse_s3(uri)
        if not key or key.endswith("/"):
            return None
        try:
            head = self.call("stat", uri, self.client(uri).head_object, Bucket=bucket, Key=key)
        except StorageError as exc:
            if exc.code in NOT_FOUND_CODES:
                return None
            raise
        return ObjectInfo(uri, int(head["ContentLength"]))

    def delete(self, uri: str) -> None:
        bucket, key = object_ref(uri)
        self.call("delete", uri, self.client(uri).delete_object, Bucket=bucket, Key=key)

    # ------------------------------------------------------------------ plumbing (also used by the streams)

    def client(self, uri: str = "") -> Any:
        """The boto3 S3 client for this process (created lazily; clients are not fork-safe)."""
        pid = os.getpid()
        if self._client_obj is not None and self._pid == pid:
            return self._client_obj
        with self._lock:
            if self._client_obj is None or self._pid != pid:
                self._session, self._client_obj = self._make_client(uri)
                self._pid = pid
            return self._client_obj

    def _make_client(self, uri: str) -> tuple[Any, Any]:
        cfg = self.config
        profile = cfg.profile or os.environ.get("AWS_PROFILE") or None
        try:
            session = boto3.session.Session(profile_name=profile)
        except bce.ProfileNotFound:
            raise StorageError(
                f"AWS profile {profile!r} not found (needed for {uri}); check AWS_PROFILE / "
                "StorageConfig.profile and ~/.aws/config",
                uri=uri,
                code="ProfileNotFound",
            ) from None
        region = (
            cfg.region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or session.region_name
            or "us-east-1"
        )
        endpoint = (
            cfg.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )
        bconfig = botocore.config.Config(
            # "total_max_attempts", not "max_attempts": in a client Config botocore reads
            # retries["max_attempts"] as the number of *retries* (N+1 requests); this keeps
            # StorageConfig.max_attempts meaning total attempts everywhere.
            retries={"total_max_attempts": cfg.max_attempts, "mode": "standard"},
            connect_timeout=cfg.connect_timeout_s,
            read_timeout=cfg.read_timeout_s,
        )
        try:
            client = session.client("s3", endpoint_url=endpoint, region_name=region, config=bconfig)
        except (ValueError, bce.BotoCoreError) as exc:
            raise StorageError(
                f"cannot create an S3 client for {uri} (endpoint {scrub(str(endpoint))!r}, region "
                f"{region!r}): {describe(exc)}; check endpoint_url / region",
                uri=uri,
                code=type(exc).__name__,
            ) from None
        return session, client


    def known_secrets(self) -> tuple[str, ...]:
        # Values to redact besides the env ones: whatever the session resolved (profile, SSO...).
        session = self._session
        if session is None:
            return ()
        try:
            creds = session.get_credentials()
            if creds is None:
                return ()
            frozen = creds.get_frozen_credentials()
            return tuple(v for v in (frozen.access_key, frozen.secret_key, frozen.token) if v)
        except Exception:  # noqa: BLE001 - redaction must never raise
            return ()

    def backoff(self, attempt: int) -> float:
        cap = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempt - 1))
        return random.uniform(0, cap)  # full jitter: spreads out many workers retrying at once

    def call(self, op: str, uri: str, fn: Callable[..., T], **kwargs: Any) -> T:
        """Call one S3 API with bounded retries on transient errors; translate failures."""
        attempts = self.config.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                return fn(**kwargs)
            except Exception as exc:  # noqa: BLE001 - classified below
                if not is_transient(exc) or attempt == attempts:
                    raise self.error(exc, op, uri, attempt) from cause(exc)
                delay = self.backoff(attempt)
                logger.warning(
                    "S3 %s %s failed (attempt %d/%d: %s); retrying in %.2fs",
                    op, uri, attempt, attempts, describe(exc, self.known_secrets()), delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


    def error(self, exc: BaseException, op: str, uri: str, attempts: int = 1) -> StorageError:
        """Map a boto/botocore exception to a one-line, credential-free StorageError."""
        return storage_error(exc, op, uri, attempts, self.known_secrets())

