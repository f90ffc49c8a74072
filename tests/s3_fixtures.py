"""Shared pytest helpers for S3 tests: an in-process moto server, fresh buckets, a fault proxy.

Registered from ``tests/conftest.py`` via ``pytest_plugins = ["tests.s3_fixtures"]``.

Fixtures
--------
``s3_server``  (session)  endpoint URL of a moto server on 127.0.0.1; dummy credentials in env.
``s3_bucket``  (function) ``(Storage, "s3://<fresh bucket>")`` talking to moto directly.
``fault_proxy`` (function) a started :class:`FaultProxy` in front of moto; ``fault_proxy.storage()``
               builds a Storage that goes through it.

Everything binds to 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import os
import socket
import socketserver
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import boto3
import pytest

from core.storage import Storage, StorageConfig

TEST_REGION = "us-east-1"
_ENV_SET = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_DEFAULT_REGION": TEST_REGION,
    # Keep the developer's ~/.aws out of tests.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
_ENV_UNSET = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def make_storage(endpoint_url: str, **overrides: Any) -> Storage:
    """A Storage for tests: given endpoint, us-east-1, fast backoff (overridable)."""
    kwargs: dict[str, Any] = {"endpoint_url": endpoint_url, "region": TEST_REGION, "backoff_base_s": 0.01}
    kwargs.update(overrides)
    return Storage(StorageConfig(**kwargs))


def create_bucket(endpoint_url: str, prefix: str = "test") -> str:
    """Create a uniquely named bucket on ``endpoint_url``; returns its name."""
    name = f"{prefix}-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=endpoint_url, region_name=TEST_REGION).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto once per test session; yields ``"http://127.0.0.1:PORT"``."""
    from moto.server import ThreadedMotoServer  # imported lazily: moto is slow to import

    with pytest.MonkeyPatch.context() as mp:
        for name, value in _ENV_SET.items():
            mp.setenv(name, value)
        for name in _ENV_UNSET:
            mp.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture()
def s3_bucket(s3_server: str) -> tuple[Storage, str]:
    """A fresh bucket; returns ``(storage, "s3://name")``."""
    return make_storage(s3_server), f"s3://{create_bucket(s3_server)}"


@pytest.fixture()
def fault_proxy(s3_server: str) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server) as proxy:
        yield proxy


# --------------------------------------------------------------------------- FaultProxy


@dataclass
class _Rule:
    kind: str  # "error" | "cut"
    remaining: int
    method: str
    path_contains: str | None
    query_contains: str | None
    status: int = 503
    code: str = "SlowDown"
    message: str = "Please reduce your request rate."
    after_bytes: int = 0

    def matches(self, method: str, path: str, query: str) -> bool:
        return (
            self.remaining > 0
            and method == self.method
            and (self.path_contains is None or self.path_contains in path)
            and (self.query_contains is None or self.query_contains in query)
        )


@dataclass
class SeenRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    fault: str | None = None  # "error", "cut" or None (forwarded untouched)


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    rules: list[_Rule] = field(default_factory=list)
    seen: list[SeenRequest] = field(default_factory=list)


class FaultProxy:
    """A tiny HTTP proxy on 127.0.0.1 in front of an S3 endpoint that injects faults.

    One request per connection (it answers ``Connection: close``); forwards with http.client.

    * ``fail_next(n, method, path_contains=, query_contains=)``: answer the next ``n`` matching
      requests with an S3 XML error (503 SlowDown by default) instead of forwarding them.
    * ``cut_next(n, after_bytes, path_contains=)``: forward the next ``n`` matching GETs but send
      only ``after_bytes`` body bytes (headers keep the full Content-Length), then drop the socket.

    ``requests`` / ``count()`` / ``faults`` / ``cuts`` report what it saw.  It stops on context
    exit, on ``stop()``, or by itself after ``max_lifetime_s``.
    """

    def __init__(self, target_url: str, *, max_lifetime_s: float = 600.0, socket_timeout_s: float = 30.0):
        host_port = target_url.split("://", 1)[-1].rstrip("/")
        host, _, port = host_port.partition(":")
        self.target = (host, int(port or 80))
        self._state = _State()
        self._socket_timeout_s = socket_timeout_s
        self._max_lifetime_s = max_lifetime_s
        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self.endpoint_url = ""

    # -- lifecycle
    def start(self) -> FaultProxy:
        handler = _make_handler(self.target, self._state, self._socket_timeout_s)
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler, bind_and_activate=False)
        server.daemon_threads = True
        server.allow_reuse_address = True
        server.server_bind()
        server.server_activate()
        self._server = server
        self.endpoint_url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self._max_lifetime_s, self.stop)  # bounded even if never stopped
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if self._timer is not None and threading.current_thread() is not self._timer:
            self._timer.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def storage(self, **overrides: Any) -> Storage:
        """A Storage whose S3 traffic goes through this proxy."""
        return make_storage(self.endpoint_url, **overrides)

    # -- fault programming
    def fail_next(
        self,
        n: int = 1,
        method: str = "PUT",
        *,
        path_contains: str | None = None,
        query_contains: str | None = None,
        status: int = 503,
        code: str = "SlowDown",
        message: str = "Please reduce your request rate.",
    ) -> None:
        rule = _Rule("error", n, method.upper(), path_contains, query_contains, status, code, message)
        with self._state.lock:
            self._state.rules.append(rule)

    def cut_next(
        self,
        n: int = 1,
        after_bytes: int = 0,
        *,
        method: str = "GET",
        path_contains: str | None = None,
        query_contains: str | None = None,
    ) -> None:
        rule = _Rule("cut", n, method.upper(), path_contains, query_contains, after_bytes=after_bytes)
        with self._state.lock:
            self._state.rules.append(rule)

    # -- reporting
    @property
    def requests(self) -> list[SeenRequest]:
        with self._state.lock:
            return list(self._state.seen)

    def count(self, method: str | None = None, *, path_contains: str | None = None,
              query_contains: str | None = None, fault: str | None = None) -> int:
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method.upper())
            and (path_contains is None or path_contains in r.path)
            and (query_contains is None or query_contains in r.query)
            and (fault is None or r.fault == fault)
        )

    @property
    def faults(self) -> int:
        """Error responses injected so far."""
        return self.count(fault="error")

    @property
    def cuts(self) -> int:
        """Response bodies cut so far."""
        return self.count(fault="cut")


def _error_xml(code: str, message: str, path: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{path}</Resource>"
        "<RequestId>FAULTPROXY</RequestId></Error>"
    ).encode()


_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade", "expect"}


def _make_handler(target: tuple[str, int], state: _State, timeout_s: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # so that Expect: 100-continue is answered
        timeout = timeout_s

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
            pass

        def _read_body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _proxy(self) -> None:
            self.close_connection = True
            body = self._read_body()  # always drain the request so the client sees our answer
            path, _, query = self.path.partition("?")
            method = self.command
            with state.lock:
                rule = next((r for r in state.rules if r.matches(method, path, query)), None)
                if rule is not None:
                    rule.remaining -= 1
                seen = SeenRequest(method, path, query, dict(self.headers.items()), rule.kind if rule else None)
                state.seen.append(seen)
            if rule is not None and rule.kind == "error":
                payload = _error_xml(rule.code, rule.message, path)
                self.send_response(rule.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Connection", "close")
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(payload)
                return

            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or method in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            upstream = http.client.HTTPConnection(*target, timeout=timeout_s)
            try:
                upstream.request(method, self.path, body=body, headers=headers)
                resp = upstream.getresponse()
                data = resp.read()
                resp_headers = resp.getheaders()
                status, reason = resp.status, resp.reason
            finally:
                upstream.close()

            self.send_response(status, reason)
            for k, v in resp_headers:
                if k.lower() in _HOP_BY_HOP or (k.lower() == "content-length" and method != "HEAD"):
                    continue
                self.send_header(k, v)
            if method != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            if method == "HEAD":
                return
            if rule is not None and rule.kind == "cut":
                self.wfile.write(data[: rule.after_bytes])
                self.wfile.flush()
                # Abrupt close: the client holds headers promising more bytes than it will get.
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _proxy

    return Handler
