"""How S3 failures are classified and worded: transient (retried) or not, and every boto/botocore
exception mapped to a one-line, credential-free :class:`StorageError` that names the fix."""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

import botocore.exceptions as bce

from core.storage.base import StorageError, one_line

try:  # urllib3 is a hard dependency of botocore, but keep the import failure local.
    from urllib3.exceptions import ProtocolError as _U3ProtocolError
    from urllib3.exceptions import ReadTimeoutError as _U3ReadTimeoutError
except ImportError:  # pragma: no cover
    _U3ProtocolError = _U3ReadTimeoutError = ()  # type: ignore[assignment,misc]


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
NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
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


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, bce.ClientError):
        code, status = client_error_code(exc)
        return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS
    return isinstance(exc, _TRANSIENT_ERRORS)


def client_error_code(exc: bce.ClientError) -> tuple[str, int]:
    resp = getattr(exc, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", "") or "")
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code or str(status), status


_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_URL_USERINFO_RE = re.compile(r"(//)[^/@\s]+@")


def scrub(text: str, extra_secrets: tuple[str, ...] = ()) -> str:
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


def describe(exc: BaseException, secrets_: tuple[str, ...] = ()) -> str:
    if isinstance(exc, bce.ClientError):
        code, status = client_error_code(exc)
        msg = (exc.response.get("Error", {}) or {}).get("Message", "")
        return one_line(scrub(f"{code} (HTTP {status}){': ' + msg if msg else ''}", secrets_))
    return one_line(scrub(f"{type(exc).__name__}: {exc}", secrets_))


def cause(exc: BaseException) -> BaseException | None:
    # ClientError text comes from the server and may echo credential material; keep it out of
    # tracebacks (the StorageError message already carries the code, status and scrubbed text).
    # botocore's own exceptions are built from local values and are kept for debugging.
    return None if isinstance(exc, bce.ClientError) else exc


def _endpoint(exc: BaseException) -> str:
    """" scheme://host:port" of the endpoint botocore could not reach (its message has the whole request URL)."""
    url = (getattr(exc, "kwargs", None) or {}).get("endpoint_url")
    if not url:
        return ""
    parts = urlsplit(str(url))
    return f" {scrub(f'{parts.scheme}://{parts.netloc}' if parts.netloc else str(url))}"


def storage_error(exc: BaseException, op: str, uri: str, attempts: int = 1,
                  secrets: tuple[str, ...] = ()) -> StorageError:
    """Map a boto/botocore exception to a one-line, credential-free StorageError; ``secrets`` are
    extra values to redact (what the session resolved besides the environment's)."""
    bucket = uri[5:].partition("/")[0] if uri[:5].lower() == "s3://" else ""
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, bce.ClientError):
        code, _status = client_error_code(exc)
        return StorageError(_client_error_message(exc, code, op, uri, bucket, tries, secrets), uri=uri, code=code)
    if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError, bce.CredentialRetrievalError)):
        msg = (f"no usable AWS credentials for {op} {uri}; set AWS_PROFILE or "
               "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or attach an instance role")
    elif isinstance(exc, (bce.EndpointConnectionError, bce.ConnectTimeoutError)):
        msg = (f"cannot connect to the S3 endpoint{_endpoint(exc)} for {op} {uri}{tries}; check endpoint_url / "
               "AWS_ENDPOINT_URL_S3 and the network")
    elif is_transient(exc):
        msg = (f"{op} {uri} failed{tries}: {describe(exc, secrets)}; the connection to "
               "S3 is unstable - retry later or raise StorageConfig.max_attempts")
    else:
        msg = f"{op} {uri} failed: {describe(exc, secrets)}"
    return StorageError(msg, uri=uri, code=type(exc).__name__)


def _client_error_message(exc: bce.ClientError, code: str, op: str, uri: str, bucket: str, tries: str,
                          secrets: tuple[str, ...]) -> str:
    if code == "NoSuchBucket":
        return f"bucket {bucket!r} does not exist ({uri}); create it or fix the URI"
    if code in NOT_FOUND_CODES:
        return f"object not found: {uri}; check the key (list its prefix to see what exists)"
    if code in _CREDENTIAL_CODES:
        return (f"S3 rejected the credentials for {op} {uri} ({code}); check AWS_PROFILE / "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, or refresh them")
    if code in ("AccessDenied", "AllAccessDisabled", "403"):
        return (f"access denied for {op} {uri}; check which credentials/profile are in use and "
                f"the bucket policy for {bucket!r}")
    if code == "PreconditionFailed":
        return f"{uri} changed while it was being read (ETag differs); re-run to read the new version"
    if code == "NoSuchUpload":
        return f"multipart upload for {uri} no longer exists (aborted or expired); retry the write"
    if is_transient(exc):
        return (f"{op} {uri} failed{tries}: {describe(exc, secrets)}; S3 is throttling "
                "or unavailable - retry later or raise StorageConfig.max_attempts")
    return f"{op} {uri} failed: {describe(exc, secrets)}"
