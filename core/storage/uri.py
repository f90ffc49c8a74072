"""URIs the storage layer understands: a local path, ``file://PATH``, or ``s3://bucket/key``."""

from __future__ import annotations

import os
import re

from core.storage.base import StorageError

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{2,254}$", re.IGNORECASE)  # 3+ chars; lenient: legacy names too


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
        return "file://" + os.path.join(local_path(base), *parts)
    reject_other_scheme(base)
    return os.path.join(base, *parts)


def local_path(uri: str) -> str:
    # "file://" is treated as a plain prefix (no percent-decoding): "file:///data/x" -> "/data/x".
    if uri.startswith("file://"):
        path = uri[len("file://") :]
        if path.startswith("localhost/"):
            path = path[len("localhost") :]
        return path
    reject_other_scheme(uri)
    return uri


def reject_other_scheme(uri: str) -> None:
    scheme, sep, _ = uri.partition("://")
    if sep and scheme.isalnum():
        raise StorageError(
            f"unsupported URI scheme {scheme!r} in {uri!r}; use a local path, file:// or s3://", uri=uri
        )

