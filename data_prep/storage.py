"""One small storage interface over URIs: local paths / ``file://`` and ``s3://bucket/key``.

Used by sharding, loading, checkpoints and artifacts so that none of them has to care where
bytes live.  Guarantees, on both backends:

* **Atomic publish.**  ``open_write`` makes nothing visible under the final name until the
  ``with`` block exits cleanly (local: temp file + fsync + ``os.replace``; S3: streaming
  multipart upload completed on exit, aborted on error; small objects use one ``put_object``).
* **Resumable reads.**  botocore retries failed *requests* but never a response body cut
  mid-read; ``open_read`` re-issues ``get_object(Range="bytes=POS-", IfMatch=etag)`` from the
  last byte delivered, so a reader neither loses nor duplicates bytes, and fails loudly if the
  object changed in between.
* **Bounded retries** with exponential backoff and full jitter on transient S3 errors, on
  top of botocore's own "standard" retry mode.
* **Readable errors.**  Everything surfaces as :class:`StorageError` with a one-line message
  naming the URI and what to check.  Credentials never appear in messages or logs.

A :class:`Storage` pickles to its :class:`StorageConfig` only (it is shipped to Ray tasks); the
boto3 client is created lazily, once per process id, because clients are not fork-safe.

Only the standard library and boto3/botocore are imported here, so any part of the project
(and any Ray worker) can use this module without pulling in the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, ContextManager, TypeVar

import boto3
import botocore.config
import botocore.exceptions as bce

try:  # urllib3 is a hard dependency of botocore, but keep the import failure local.
    from urllib3.exceptions import ProtocolError as _U3ProtocolError
    from urllib3.exceptions import ReadTimeoutError as _U3ReadTimeoutError
except ImportError:  # pragma: no cover
    _U3ProtocolError = _U3ReadTimeoutError = ()  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)

__all__ = [
    "ObjectInfo",
    "Storage",
    "StorageConfig",
    "StorageError",
    "is_s3",
    "join",
    "parse_s3",
]

_MIN_PART_SIZE = 5 * 2**20  # S3 rejects non-final multipart parts smaller than 5 MiB.
_MAX_PARTS = 10_000  # S3 limit on parts per multipart upload.
_READ_CHUNK = 8 * 2**20  # read size used by readall/copy loops (bounded memory).
_TEMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{16}$")  # our local temp files: ".<name>.tmp-<hex16>"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{2,254}$", re.IGNORECASE)  # 3+ chars; lenient: legacy names too

T = TypeVar("T")


# --------------------------------------------------------------------------- public types


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
        if self.multipart_part_size < _MIN_PART_SIZE:
            raise ValueError(
                f"multipart_part_size={self.multipart_part_size} is below the S3 minimum of "
                f"{_MIN_PART_SIZE} bytes (5 MiB); raise it"
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


class StorageError(RuntimeError):
    """A storage operation failed.  ``str()`` is one line naming the URI and the fix.

    ``uri`` is the URI concerned; ``code`` is the S3 error code (e.g. ``"NoSuchBucket"``,
    ``"404"``) or the exception type name, when there is one.  Never carries credentials.
    """

    def __init__(self, message: str, *, uri: str | None = None, code: str | None = None) -> None:
        super().__init__(_one_line(message))
        self.uri = uri
        self.code = code


# --------------------------------------------------------------------------- URI helpers


def is_s3(uri: str) -> bool:
    return uri[:5].lower() == "s3://"


def parse_s3(uri: str) -> tuple[str, str]:
    """``"s3://bucket/some/key"`` -> ``("bucket", "some/key")``; the key may be empty."""
    if not is_s3(uri):
        raise StorageError(f"not an S3 URI: {uri!r}; expected s3://bucket/key", uri=uri)
    bucket, _, key = uri[5:].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise StorageError(
            f"malformed S3 URI {uri!r}: bad bucket name {bucket!r}; expected s3://bucket/key", uri=uri
        )
    return bucket, key


def join(base: str, *parts: str) -> str:
    """URI-aware join: ``join("s3://b/p", "x", "y.tar") == "s3://b/p/x/y.tar"``.

    For S3, slashes around ``parts`` are normalised (empty parts are skipped; a trailing slash on
    the last part is kept).  Local paths, with or without ``file://``, follow ``os.path.join``.
    """
    if is_s3(base):
        # Pure string work (no bucket validation): parse_s3 checks names where they are used.
        out = base.rstrip("/")
        for i, part in enumerate(parts):
            if not part:
                continue
            last = i == len(parts) - 1
            seg = part.lstrip("/") if last else part.strip("/")
            if seg:
                out = f"{out}/{seg}"
        return out
    if base.startswith("file://"):
        return "file://" + os.path.join(_local_path(base), *parts)
    _reject_other_scheme(base)
    return os.path.join(base, *parts)


# --------------------------------------------------------------------------- internals: errors


_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
    }
)
_TRANSIENT_STATUS = frozenset({500, 502, 503, 504})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AuthorizationHeaderMalformed",
    }
)

# Connection-level failures.  botocore retries them for a request, but never when they happen
# while a response body is being streamed; our loops cover both.
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    bce.IncompleteReadError,
    bce.ResponseStreamingError,
    bce.ReadTimeoutError,
    bce.ConnectionClosedError,
    bce.EndpointConnectionError,
    _U3ProtocolError,  # type: ignore[arg-type]
    _U3ReadTimeoutError,  # type: ignore[arg-type]
    ConnectionError,  # builtin: reset / aborted / refused
)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, bce.ClientError):
        code, status = _client_error_code(exc)
        return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS
    return isinstance(exc, _TRANSIENT_ERRORS)


def _client_error_code(exc: bce.ClientError) -> tuple[str, int]:
    resp = getattr(exc, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", "") or "")
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code or str(status), status


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_URL_USERINFO_RE = re.compile(r"(//)[^/@\s]+@")


def _scrub(text: str, extra_secrets: tuple[str, ...] = ()) -> str:
    """Remove anything that looks like a credential from text we did not write ourselves.

    Server-provided messages and exception strings are not ours to trust (S3 error bodies can
    carry the access key id), so we redact the current credential values and URL userinfo.
    Very short values are skipped: dummy test credentials like "testing" would otherwise
    mangle ordinary words, and real keys are 16+ characters.
    """
    values = [os.environ.get(name, "") for name in _SECRET_ENV] + list(extra_secrets)
    for value in sorted({v for v in values if v and len(v) >= 8}, key=len, reverse=True):
        text = text.replace(value, "***")
    return _URL_USERINFO_RE.sub(r"\1***@", text)


def _describe(exc: BaseException, secrets_: tuple[str, ...] = ()) -> str:
    if isinstance(exc, bce.ClientError):
        code, status = _client_error_code(exc)
        msg = (exc.response.get("Error", {}) or {}).get("Message", "")
        return _one_line(_scrub(f"{code} (HTTP {status}){': ' + msg if msg else ''}", secrets_))
    return _one_line(_scrub(f"{type(exc).__name__}: {exc}", secrets_))


# --------------------------------------------------------------------------- internals: local paths


def _local_path(uri: str) -> str:
    # "file://" is treated as a plain prefix (no percent-decoding): "file:///data/x" -> "/data/x".
    if uri.startswith("file://"):
        path = uri[len("file://") :]
        if path.startswith("localhost/"):
            path = path[len("localhost") :]
        return path
    _reject_other_scheme(uri)
    return uri


def _reject_other_scheme(uri: str) -> None:
    scheme, sep, _ = uri.partition("://")
    if sep and scheme.isalnum():
        raise StorageError(
            f"unsupported URI scheme {scheme!r} in {uri!r}; use a local path, file:// or s3://", uri=uri
        )


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


# --------------------------------------------------------------------------- Storage


class Storage:
    """Read, write, list and delete objects by URI (local path, ``file://`` or ``s3://``)."""

    def __init__(self, config: StorageConfig | None = None) -> None:
        self.config = config or StorageConfig()
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._session: Any = None
        self._client_obj: Any = None

    # -- pickling: ship the config only; clients/sessions are per process.
    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"Storage({self.config!r})"

    # ------------------------------------------------------------------ reading

    def open_read(self, uri: str, start: int = 0) -> BinaryIO:
        """Open ``uri`` for streaming reads from byte ``start``.

        For S3 the returned stream transparently resumes after a connection cut.
        """
        if start < 0:
            raise StorageError(f"start={start} must be >= 0 ({uri})", uri=uri)
        if is_s3(uri):
            bucket, key = self._object_ref(uri)
            raw = _S3RangeReader(self, uri, bucket, key, start)
            return io.BufferedReader(raw, buffer_size=256 * 1024)  # type: ignore[return-value]
        path = _local_path(uri)
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

    def read_bytes(self, uri: str) -> bytes:
        with self.open_read(uri) as f:
            return f.read()

    # ------------------------------------------------------------------ writing

    def open_write(self, uri: str) -> ContextManager[BinaryIO]:
        """Context manager yielding a writable stream; publishes atomically on clean exit.

        Do not rely on ``close()`` inside the block to publish: only the clean exit does.
        """
        if is_s3(uri):
            return self._open_write_s3(uri)
        return self._open_write_local(uri)

    def write_bytes(self, uri: str, data: bytes) -> None:
        with self.open_write(uri) as f:
            f.write(data)

    @contextlib.contextmanager
    def _open_write_local(self, uri: str) -> Iterator[BinaryIO]:
        path = _local_path(uri)
        directory, name = os.path.split(os.path.abspath(path))
        if not name:
            raise StorageError(f"cannot write to {uri!r}: it names a directory; add a file name", uri=uri)
        try:
            os.makedirs(directory, exist_ok=True)
            # Same directory as the target so os.replace is an atomic rename on one filesystem.
            tmp = os.path.join(directory, f".{name}.tmp-{secrets.token_hex(8)}")
            f = open(tmp, "xb")  # noqa: SIM115
        except OSError as exc:
            raise StorageError(f"cannot create {path}: {exc.strerror}; check the directory", uri=uri) from exc
        try:
            yield f  # type: ignore[misc]
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
        except BaseException:
            with contextlib.suppress(OSError):  # e.g. a full disk on flush; keep the original error
                f.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(directory)

    @contextlib.contextmanager
    def _open_write_s3(self, uri: str) -> Iterator[BinaryIO]:
        bucket, key = self._object_ref(uri)
        writer = _S3MultipartWriter(self, uri, bucket, key)
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

    # ------------------------------------------------------------------ metadata

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """All objects below ``prefix`` (recursive), sorted by URI.

        ``prefix`` names a directory: ``"s3://b/data"`` and ``"s3://b/data/"`` both list keys
        under ``data/``.  S3 "directory marker" keys (ending in "/") and our local temp files
        are skipped.
        """
        if is_s3(prefix):
            return self._list_s3(prefix)
        return self._list_local(prefix)

    def _list_local(self, prefix: str) -> Iterator[ObjectInfo]:
        root = _local_path(prefix)
        scheme = "file://" if prefix.startswith("file://") else ""
        found: list[ObjectInfo] = []
        if os.path.isdir(root):
            for dirpath, _dirnames, filenames in os.walk(root):
                for fname in filenames:
                    if _TEMP_RE.match(fname):
                        continue
                    full = os.path.join(dirpath, fname)
                    try:
                        size = os.stat(full).st_size
                    except FileNotFoundError:  # deleted while walking
                        continue
                    found.append(ObjectInfo(scheme + full, size))
        found.sort(key=lambda o: o.uri)  # os.walk order is per-directory; sort globally
        return iter(found)

    def _list_s3(self, prefix: str) -> Iterator[ObjectInfo]:
        bucket, key = parse_s3(prefix)
        key_prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        client = self._client(prefix)
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key_prefix}
        while True:
            # One call per page so each page gets its own bounded retry.
            page = self._call("list", prefix, client.list_objects_v2, **kwargs)
            # S3 returns keys in UTF-8 binary order == Python str order, so URIs come sorted.
            for obj in page.get("Contents", []) or []:
                if obj["Key"].endswith("/"):
                    continue
                yield ObjectInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]))
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def stat(self, uri: str) -> ObjectInfo | None:
        """Size of the object at ``uri``, or None if there is none (directories are not objects).

        On S3 a missing bucket also reads as None (HEAD carries no error code to tell them apart).
        """
        if is_s3(uri):
            bucket, key = parse_s3(uri)
            if not key or key.endswith("/"):
                return None
            client = self._client(uri)
            try:
                head = self._call("stat", uri, client.head_object, Bucket=bucket, Key=key)
            except StorageError as exc:
                if exc.code in _NOT_FOUND_CODES:
                    return None
                raise
            return ObjectInfo(uri, int(head["ContentLength"]))
        path = _local_path(uri)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not os.path.isfile(path):
            return None
        return ObjectInfo(uri, st.st_size)

    def exists(self, uri: str) -> bool:
        return self.stat(uri) is not None

    def delete(self, uri: str) -> None:
        """Delete the object at ``uri``; no error if it is absent."""
        if is_s3(uri):
            bucket, key = self._object_ref(uri)
            self._call("delete", uri, self._client(uri).delete_object, Bucket=bucket, Key=key)
            return
        path = _local_path(uri)
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise StorageError(f"{path} is a directory; delete() removes single files", uri=uri) from None
        except OSError as exc:
            raise StorageError(f"cannot delete {path}: {exc.strerror}; check permissions", uri=uri) from exc

    def copy_to_local(self, uri: str, local_path: str) -> str:
        """Make ``uri`` available as a local file and return its path.

        Local URIs are not copied: their own path is returned (``local_path`` is ignored).
        S3 objects are streamed (resumably) and published atomically at ``local_path``; if
        ``local_path`` is an existing directory the object's base name is used inside it.
        """
        if not is_s3(uri):
            path = _local_path(uri)
            if not os.path.isfile(path):
                raise StorageError(f"no such file: {path}; check the path", uri=uri, code="NotFound")
            return path
        bucket, key = self._object_ref(uri)
        if os.path.isdir(local_path):
            local_path = os.path.join(local_path, key.rsplit("/", 1)[-1])
        with self.open_read(uri) as src, self.open_write(local_path) as dst:
            while chunk := src.read(_READ_CHUNK):
                dst.write(chunk)
        return local_path

    # ------------------------------------------------------------------ S3 plumbing

    def _object_ref(self, uri: str) -> tuple[str, str]:
        bucket, key = parse_s3(uri)
        if not key or key.endswith("/"):
            raise StorageError(f"{uri!r} names a prefix, not an object; add an object key", uri=uri)
        return bucket, key

    def _client(self, uri: str = "") -> Any:
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
                f"cannot create an S3 client for {uri} (endpoint {_scrub(str(endpoint))!r}, region "
                f"{region!r}): {_describe(exc)}; check endpoint_url / region",
                uri=uri,
                code=type(exc).__name__,
            ) from None
        return session, client

    def _known_secrets(self) -> tuple[str, ...]:
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

    def _backoff(self, attempt: int) -> float:
        cap = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempt - 1))
        return random.uniform(0, cap)  # full jitter: spreads out many workers retrying at once

    def _call(self, op: str, uri: str, fn: Callable[..., T], **kwargs: Any) -> T:
        """Call one S3 API with bounded retries on transient errors; translate failures."""
        attempts = self.config.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                return fn(**kwargs)
            except Exception as exc:  # noqa: BLE001 - classified below
                if not _is_transient(exc) or attempt == attempts:
                    raise self._error(exc, op, uri, attempt) from _cause(exc)
                delay = self._backoff(attempt)
                logger.warning(
                    "S3 %s %s failed (attempt %d/%d: %s); retrying in %.2fs",
                    op, uri, attempt, attempts, _describe(exc, self._known_secrets()), delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _error(self, exc: BaseException, op: str, uri: str, attempts: int = 1) -> StorageError:
        """Map a boto/botocore exception to a one-line, credential-free StorageError."""
        bucket = uri[5:].partition("/")[0] if is_s3(uri) else ""
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, bce.ClientError):
            code, status = _client_error_code(exc)
            if code == "NoSuchBucket":
                msg = f"bucket {bucket!r} does not exist ({uri}); create it or fix the URI"
            elif code in _NOT_FOUND_CODES:
                msg = f"object not found: {uri}; check the key (list its prefix to see what exists)"
            elif code in _CREDENTIAL_CODES:
                msg = (
                    f"S3 rejected the credentials for {op} {uri} ({code}); check AWS_PROFILE / "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, or refresh them"
                )
            elif code in ("AccessDenied", "AllAccessDisabled", "403"):
                msg = (
                    f"access denied for {op} {uri}; check which credentials/profile are in use and "
                    f"the bucket policy for {bucket!r}"
                )
            elif code == "PreconditionFailed":
                msg = f"{uri} changed while it was being read (ETag differs); re-run to read the new version"
            elif code == "NoSuchUpload":
                msg = f"multipart upload for {uri} no longer exists (aborted or expired); retry the write"
            elif _is_transient(exc):
                msg = (
                    f"{op} {uri} failed{tries}: {_describe(exc, self._known_secrets())}; S3 is throttling "
                    "or unavailable - retry later or raise StorageConfig.max_attempts"
                )
            else:
                msg = f"{op} {uri} failed: {_describe(exc, self._known_secrets())}"
            return StorageError(msg, uri=uri, code=code)
        if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError, bce.CredentialRetrievalError)):
            return StorageError(
                f"no usable AWS credentials for {op} {uri}; set AWS_PROFILE or "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or attach an instance role",
                uri=uri,
                code=type(exc).__name__,
            )
        if isinstance(exc, (bce.EndpointConnectionError, bce.ConnectTimeoutError)):
            return StorageError(
                f"cannot connect to the S3 endpoint for {op} {uri}{tries}; check endpoint_url / "
                "AWS_ENDPOINT_URL_S3 and the network",
                uri=uri,
                code=type(exc).__name__,
            )
        if _is_transient(exc):
            return StorageError(
                f"{op} {uri} failed{tries}: {_describe(exc, self._known_secrets())}; the connection to "
                "S3 is unstable - retry later or raise StorageConfig.max_attempts",
                uri=uri,
                code=type(exc).__name__,
            )
        return StorageError(
            f"{op} {uri} failed: {_describe(exc, self._known_secrets())}", uri=uri, code=type(exc).__name__
        )


def _cause(exc: BaseException) -> BaseException | None:
    # ClientError text comes from the server and may echo credential material; keep it out of
    # tracebacks (the StorageError message already carries the code, status and scrubbed text).
    # botocore's own exceptions are built from local values and are kept for debugging.
    return None if isinstance(exc, bce.ClientError) else exc


# --------------------------------------------------------------------------- S3 reader


class _S3RangeReader(io.RawIOBase):
    """Raw stream over one S3 object that resumes with ranged GETs after a cut.

    Invariant: ``_pos`` is the absolute offset of the next byte to hand out; after a failure
    we ask for exactly ``bytes=_pos-`` with ``IfMatch`` on the first ETag, so bytes are neither
    lost nor duplicated and a replaced object is detected instead of silently spliced.
    """

    def __init__(self, storage: Storage, uri: str, bucket: str, key: str, start: int) -> None:
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
        client = self._storage._client(self._uri)
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key, **extra}
        if self._pos:
            kwargs["Range"] = f"bytes={self._pos}-"
        return client.get_object(**kwargs)

    def _open_first(self) -> None:
        storage = self._storage
        try:
            resp = storage._call("read", self._uri, self._get)
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
                if not _is_transient(exc):
                    raise storage._error(exc, "read", self._uri) from _cause(exc)
                failures += 1  # consecutive: any delivered byte returns and resets the count
                if failures >= attempts:
                    raise storage._error(exc, "read", self._uri, failures) from _cause(exc)
                delay = storage._backoff(failures)
                logger.warning(
                    "S3 read %s interrupted at byte %d of %d (attempt %d/%d: %s); resuming in %.2fs",
                    self._uri, self._pos, self._end, failures, attempts,
                    _describe(exc, storage._known_secrets()), delay,
                )
                time.sleep(delay)

    def readall(self) -> bytes:
        # RawIOBase.readall reads 8 KiB at a time; large chunks are much faster here.
        chunks = []
        while self._pos < self._end:
            chunk = self.read(min(_READ_CHUNK, self._end - self._pos))
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self._drop_body()
        super().close()


# --------------------------------------------------------------------------- S3 writer


class _S3MultipartWriter(io.RawIOBase):
    """Write-only stream: buffers one part, uploads parts as they fill, publishes on finish().

    The multipart upload is only created once a full part exists, so small objects cost a
    single PUT.  Nothing is visible under the key until CompleteMultipartUpload / PutObject.
    """

    def __init__(self, storage: Storage, uri: str, bucket: str, key: str) -> None:
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
        storage, client = self._storage, self._storage._client(self._uri)
        if self._upload_id is None:
            resp = storage._call(
                "write", self._uri, client.create_multipart_upload, Bucket=self._bucket, Key=self._key
            )
            self._upload_id = resp["UploadId"]
        number = len(self._parts) + 1
        if number > _MAX_PARTS:
            raise StorageError(
                f"{self._uri} needs more than {_MAX_PARTS} parts; raise StorageConfig.multipart_part_size",
                uri=self._uri,
            )
        resp = storage._call(
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
        storage, client = self._storage, self._storage._client(self._uri)
        if self._upload_id is None:
            storage._call(
                "write", self._uri, client.put_object, Bucket=self._bucket, Key=self._key, Body=bytes(self._buf)
            )
        else:
            if self._buf or not self._parts:
                self._upload_part(bytes(self._buf))
            self._buf = bytearray()
            try:
                storage._call(
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
            head = self._storage._client(self._uri).head_object(Bucket=self._bucket, Key=self._key)
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
                self._storage._call(
                    "abort upload of",
                    self._uri,
                    self._storage._client(self._uri).abort_multipart_upload,
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
