"""Tests for core.storage: local and S3 (moto) backends, atomic writes, retries, resumable reads."""

from __future__ import annotations

import logging
import os
import pickle
import traceback

import boto3
import pytest

from core.storage import s3 as storage_mod
from core.storage import ObjectInfo, Storage, StorageConfig, StorageError, is_s3, join, parse_s3
from tests.s3_fixtures import TEST_REGION, create_bucket, make_storage

MiB = 2**20


def _payload(n: int, seed: int = 0) -> bytes:
    # Position-dependent bytes: a lost or duplicated range cannot go unnoticed.
    block = bytes((i * 31 + seed) % 251 for i in range(65521))  # prime length: no aligned repeats
    return (block * (n // len(block) + 1))[:n]


def _raw_client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name=TEST_REGION)


# --------------------------------------------------------------------------- URI helpers / config


def test_is_s3_and_parse_s3():
    assert is_s3("s3://b/k") and is_s3("S3://b/k")
    assert not is_s3("/tmp/x") and not is_s3("file:///tmp/x")
    assert parse_s3("s3://bucket/a/b.tar") == ("bucket", "a/b.tar")
    assert parse_s3("s3://bucket") == ("bucket", "")
    assert parse_s3("s3://bucket/") == ("bucket", "")
    for bad in ("s3://", "s3:///key", "s3://b/k", "s3://bad bucket/k", "/local/path"):
        with pytest.raises(StorageError):
            parse_s3(bad)


def test_join():
    assert join("s3://b/p", "x") == "s3://b/p/x"
    assert join("s3://b/p/", "x", "y.tar") == "s3://b/p/x/y.tar"
    assert join("s3://b", "/x/", "y") == "s3://b/x/y"
    assert join("s3://b", "x", "") == "s3://b/x"
    assert join("/data", "x", "y") == os.path.join("/data", "x", "y")
    assert join("file:///data", "x") == "file:///data/x"
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        join("gs://b/p", "x")


def test_config_validates_part_size():
    with pytest.raises(ValueError, match="5 MiB"):
        StorageConfig(multipart_part_size=4 * MiB)
    StorageConfig(multipart_part_size=5 * MiB)


def test_storage_pickles_config_only_and_caches_client_per_process(monkeypatch):
    st = Storage(StorageConfig(endpoint_url="http://127.0.0.1:9", region="us-east-1"))
    client = st._client()
    assert st._client() is client  # cached
    clone = pickle.loads(pickle.dumps(st))
    assert clone.config == st.config and clone._s3._client_obj is None
    real_pid = os.getpid()
    monkeypatch.setattr(storage_mod.os, "getpid", lambda: real_pid + 1)  # as after a fork
    assert st._client() is not client


# --------------------------------------------------------------------------- local backend


def test_local_atomic_write_success_and_parent_dirs(tmp_path):
    st = Storage()
    target = tmp_path / "a" / "b" / "out.bin"
    with st.open_write(str(target)) as f:
        f.write(b"hello ")
        f.write(b"world")
        assert not target.exists()  # not visible before the clean exit
    assert target.read_bytes() == b"hello world"
    assert os.listdir(target.parent) == ["out.bin"]  # no temp leftovers


def test_local_atomic_write_exception_leaves_nothing(tmp_path):
    st = Storage()
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with st.open_write(str(target)) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    # An existing object is left untouched by a failed rewrite.
    st.write_bytes(str(target), b"v1")
    with pytest.raises(RuntimeError):
        with st.open_write(str(target)) as f:
            f.write(b"v2-partial")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"v1" and os.listdir(tmp_path) == ["out.bin"]


def test_local_write_survives_caller_closing_the_file(tmp_path):
    st = Storage()
    with st.open_write(str(tmp_path / "x")) as f:
        f.write(b"data")
        f.close()
    assert (tmp_path / "x").read_bytes() == b"data"


def test_local_list_sorted_skips_temps(tmp_path):
    st = Storage()
    for rel in ("b/2.tar", "a.txt", "a/1.tar", "b/1.tar", "c"):
        st.write_bytes(str(tmp_path / rel), b"x" * len(rel))
    (tmp_path / "b" / ".3.tar.tmp-0123456789abcdef").write_bytes(b"junk")  # a crashed writer's temp
    with st.open_write(str(tmp_path / "b" / "4.tar")) as f:  # a writer in progress
        f.write(b"y")
        listed = list(st.list(str(tmp_path)))
    expected = sorted(str(tmp_path / rel) for rel in ("b/2.tar", "a.txt", "a/1.tar", "b/1.tar", "c"))
    assert [o.uri for o in listed] == expected
    assert all(o.size == len(os.path.relpath(o.uri, tmp_path)) for o in listed)
    assert [o.uri for o in st.list("file://" + str(tmp_path / "a"))] == ["file://" + str(tmp_path / "a/1.tar")]
    assert list(st.list(str(tmp_path / "missing"))) == []


def test_local_stat_exists_delete_read(tmp_path):
    st = Storage()
    p = str(tmp_path / "f.bin")
    assert st.stat(p) is None and not st.exists(p)
    st.write_bytes(p, b"0123456789")
    assert st.stat(p) == ObjectInfo(p, 10) and st.exists("file://" + p)
    assert st.stat(str(tmp_path)) is None  # directories are not objects
    with st.open_read(p, start=4) as f:
        assert f.read(3) == b"456" and f.read() == b"789"
    assert st.read_bytes("file://" + p) == b"0123456789"
    assert st.copy_to_local(p, str(tmp_path / "ignored")) == p
    st.delete(p)
    st.delete(p)  # absent: no error
    assert not st.exists(p)


def test_local_open_read_missing_names_path(tmp_path):
    missing = str(tmp_path / "nope.tar")
    with pytest.raises(StorageError, match="nope.tar") as ei:
        Storage().open_read(missing)
    assert "\n" not in str(ei.value)


# --------------------------------------------------------------------------- S3 basics


@pytest.mark.s3
def test_s3_put_get_list_stat_delete(s3_bucket, s3_server):
    st, bucket = s3_bucket
    name = parse_s3(bucket)[0]
    for rel, data in {"d/b.tar": b"bb", "d/a.tar": b"a", "d/sub/c.tar": b"ccc", "d2/x": b"x", "top": b"t"}.items():
        st.write_bytes(join(bucket, rel), data)
    _raw_client(s3_server).put_object(Bucket=name, Key="d/marker/", Body=b"")  # "directory" marker
    expected = [ObjectInfo(f"{bucket}/d/a.tar", 1), ObjectInfo(f"{bucket}/d/b.tar", 2),
                ObjectInfo(f"{bucket}/d/sub/c.tar", 3)]
    assert list(st.list(join(bucket, "d"))) == expected
    assert list(st.list(join(bucket, "d") + "/")) == expected  # trailing slash: same
    assert [o.uri for o in st.list(bucket)] == sorted(
        f"{bucket}/{k}" for k in ("d/a.tar", "d/b.tar", "d/sub/c.tar", "d2/x", "top")
    )
    assert st.read_bytes(f"{bucket}/d/sub/c.tar") == b"ccc"
    assert st.stat(f"{bucket}/d/b.tar") == ObjectInfo(f"{bucket}/d/b.tar", 2)
    assert st.stat(f"{bucket}/d/none") is None and not st.exists(f"{bucket}/d/none")
    st.delete(f"{bucket}/d/b.tar")
    st.delete(f"{bucket}/d/b.tar")  # absent: no error
    assert not st.exists(f"{bucket}/d/b.tar")
    with pytest.raises(StorageError, match="object not found") as ei:
        st.read_bytes(f"{bucket}/d/b.tar")
    assert ei.value.code == "NoSuchKey"


@pytest.mark.s3
def test_s3_list_paginates(s3_bucket, s3_server, monkeypatch):
    st, bucket = s3_bucket
    client = st._client()
    real = client.list_objects_v2
    calls = []

    def small_pages(**kw):
        calls.append(kw)
        return real(MaxKeys=2, **kw)

    monkeypatch.setattr(client, "list_objects_v2", small_pages)
    for i in range(5):
        st.write_bytes(join(bucket, "p", f"{i}"), b"x")
    assert [o.uri for o in st.list(join(bucket, "p"))] == [join(bucket, "p", f"{i}") for i in range(5)]
    assert len(calls) == 3


@pytest.mark.s3
def test_s3_open_read_with_start(s3_bucket):
    st, bucket = s3_bucket
    uri = join(bucket, "obj")
    data = _payload(100_000)
    st.write_bytes(uri, data)
    with st.open_read(uri, start=12_345) as f:
        assert f.read(10) == data[12_345:12_355]
        assert f.read() == data[12_355:]
    with st.open_read(uri, start=len(data)) as f:
        assert f.read() == b""
    with pytest.raises(StorageError, match="past the end"):
        st.open_read(uri, start=len(data) + 1)


@pytest.mark.s3
def test_s3_copy_to_local(s3_bucket, tmp_path):
    st, bucket = s3_bucket
    data = _payload(300_000, seed=3)
    st.write_bytes(join(bucket, "x", "shard.tar"), data)
    out = st.copy_to_local(join(bucket, "x", "shard.tar"), str(tmp_path))
    assert out == str(tmp_path / "shard.tar")
    assert (tmp_path / "shard.tar").read_bytes() == data
    assert os.listdir(tmp_path) == ["shard.tar"]


@pytest.mark.s3
def test_s3_endpoint_and_region_from_env(s3_server, monkeypatch):
    bucket = create_bucket(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("AWS_REGION", TEST_REGION)
    st = Storage()  # no explicit endpoint: taken from the environment
    st.write_bytes(f"s3://{bucket}/k", b"v")
    assert st.read_bytes(f"s3://{bucket}/k") == b"v"


# --------------------------------------------------------------------------- multipart


@pytest.mark.s3
def test_s3_multipart_upload_streams_parts(s3_server, fault_proxy):
    bucket = f"s3://{create_bucket(s3_server)}"
    st = fault_proxy.storage(multipart_part_size=5 * MiB)
    direct = make_storage(s3_server)
    uri = join(bucket, "big.bin")
    data = _payload(12 * MiB, seed=1)
    with st.open_write(uri) as f:
        for off in range(0, len(data), 3 * MiB + 7):  # uneven writes straddle part boundaries
            f.write(data[off : off + 3 * MiB + 7])
        # Two full parts are already uploaded while the block runs; nothing is visible yet.
        assert fault_proxy.count("PUT", query_contains="partNumber") == 2
        assert direct.stat(uri) is None
    assert fault_proxy.count("PUT", query_contains="partNumber") == 3
    head = _raw_client(s3_server).head_object(Bucket=parse_s3(bucket)[0], Key="big.bin")
    assert head["ETag"].strip('"').endswith("-3")
    assert direct.stat(uri) == ObjectInfo(uri, len(data))
    assert direct.read_bytes(uri) == data


@pytest.mark.s3
def test_s3_multipart_aborted_on_exception(s3_bucket, s3_server):
    st, bucket = s3_bucket
    st = make_storage(s3_server, multipart_part_size=5 * MiB)
    uri = join(bucket, "big.bin")
    with pytest.raises(RuntimeError, match="boom"):
        with st.open_write(uri) as f:
            f.write(_payload(12 * MiB))
            raise RuntimeError("boom")
    assert st.stat(uri) is None
    uploads = _raw_client(s3_server).list_multipart_uploads(Bucket=parse_s3(bucket)[0])
    assert uploads.get("Uploads", []) == []


@pytest.mark.s3
def test_s3_multipart_exact_part_multiple_and_empty_object(s3_bucket, s3_server):
    _, bucket = s3_bucket
    st = make_storage(s3_server, multipart_part_size=5 * MiB)
    data = _payload(10 * MiB, seed=4)
    st.write_bytes(join(bucket, "two"), data)  # one write, exactly two parts, nothing left over
    head = _raw_client(s3_server).head_object(Bucket=parse_s3(bucket)[0], Key="two")
    assert head["ETag"].strip('"').endswith("-2") and st.read_bytes(join(bucket, "two")) == data
    st.write_bytes(join(bucket, "empty"), b"")
    assert st.stat(join(bucket, "empty")) == ObjectInfo(join(bucket, "empty"), 0)
    assert st.read_bytes(join(bucket, "empty")) == b""


@pytest.mark.s3
def test_s3_small_object_single_put(s3_server, fault_proxy):
    bucket = f"s3://{create_bucket(s3_server)}"
    st = fault_proxy.storage()
    st.write_bytes(join(bucket, "small"), b"abc")
    assert fault_proxy.count("PUT") == 1 and fault_proxy.count("POST") == 0  # no multipart calls


# --------------------------------------------------------------------------- injected faults


@pytest.mark.s3
def test_s3_put_503_is_retried(s3_server, fault_proxy):
    bucket = f"s3://{create_bucket(s3_server)}"
    st = fault_proxy.storage()
    fault_proxy.fail_next(1, "PUT", path_contains="/obj")
    st.write_bytes(join(bucket, "obj"), b"payload")
    assert fault_proxy.faults == 1
    assert fault_proxy.count("PUT", path_contains="/obj") == 2
    assert make_storage(s3_server).read_bytes(join(bucket, "obj")) == b"payload"


@pytest.mark.s3
def test_s3_upload_part_503_is_retried(s3_server, fault_proxy):
    bucket = f"s3://{create_bucket(s3_server)}"
    st = fault_proxy.storage(multipart_part_size=5 * MiB)
    data = _payload(11 * MiB, seed=2)
    fault_proxy.fail_next(1, "PUT", query_contains="partNumber=2")
    st.write_bytes(join(bucket, "mp"), data)
    assert fault_proxy.faults == 1
    assert fault_proxy.count("PUT", query_contains="partNumber=2") == 2
    assert make_storage(s3_server).read_bytes(join(bucket, "mp")) == data


@pytest.mark.s3
def test_s3_our_retry_loop_outlasts_botocore_and_is_bounded(s3_server, fault_proxy, caplog):
    caplog.set_level(logging.WARNING, logger="core.storage")
    bucket = f"s3://{create_bucket(s3_server)}"
    st = fault_proxy.storage(max_attempts=2)
    # botocore makes 2 attempts per call; 3 faults need our own second call.
    fault_proxy.fail_next(3, "PUT", path_contains="/a")
    st.write_bytes(join(bucket, "a"), b"1")
    assert fault_proxy.faults == 3 and fault_proxy.count("PUT", path_contains="/a") == 4
    assert "attempt 1/2" in caplog.text
    # More faults than 2 x 2 attempts: a one-line StorageError, not a hang.
    fault_proxy.fail_next(10, "PUT", path_contains="/b")
    with pytest.raises(StorageError, match="after 2 attempts") as ei:
        st.write_bytes(join(bucket, "b"), b"1")
    assert ei.value.code == "SlowDown" and "\n" not in str(ei.value)
    assert fault_proxy.count("PUT", path_contains="/b") == 4


@pytest.mark.s3
def test_s3_read_resumes_after_body_cuts(s3_server, fault_proxy, caplog):
    caplog.set_level(logging.WARNING, logger="core.storage")
    bucket = f"s3://{create_bucket(s3_server)}"
    uri = join(bucket, "cut.bin")
    data = _payload(3 * MiB, seed=5)
    make_storage(s3_server).write_bytes(uri, data)
    st = fault_proxy.storage()
    fault_proxy.cut_next(2, after_bytes=1 * MiB, path_contains="/cut.bin")
    got = st.read_bytes(uri)
    assert len(got) == len(data) and got == data
    assert fault_proxy.cuts == 2
    gets = [r for r in fault_proxy.requests if r.method == "GET" and r.path.endswith("/cut.bin")]
    assert [r.headers.get("Range") for r in gets] == [None, f"bytes={MiB}-", f"bytes={2 * MiB}-"]
    assert all(r.headers.get("If-Match") for r in gets[1:])
    assert caplog.text.count("interrupted at byte") == 2


@pytest.mark.s3
def test_s3_read_cut_with_small_reads_and_start(s3_server, fault_proxy):
    bucket = f"s3://{create_bucket(s3_server)}"
    uri = join(bucket, "cut.bin")
    data = _payload(3 * MiB, seed=6)
    make_storage(s3_server).write_bytes(uri, data)
    fault_proxy.cut_next(2, after_bytes=MiB + 17, path_contains="/cut.bin")
    out = bytearray()
    with fault_proxy.storage().open_read(uri, start=1000) as f:
        while chunk := f.read(65_537):
            out += chunk
    assert bytes(out) == data[1000:] and fault_proxy.cuts == 2


@pytest.mark.s3
def test_s3_read_gives_up_after_max_attempts(s3_server, fault_proxy):
    bucket = f"s3://{create_bucket(s3_server)}"
    uri = join(bucket, "cut.bin")
    make_storage(s3_server).write_bytes(uri, _payload(MiB))
    fault_proxy.cut_next(100, after_bytes=0, path_contains="/cut.bin")
    with pytest.raises(StorageError, match="after 3 attempts"):
        fault_proxy.storage(max_attempts=3).read_bytes(uri)
    assert fault_proxy.cuts == 3  # the first GET + 2 resumes, all cut before any byte


@pytest.mark.s3
def test_s3_read_detects_object_replaced_mid_read(s3_server, fault_proxy):
    bucket = f"s3://{create_bucket(s3_server)}"
    uri = join(bucket, "obj")
    direct = make_storage(s3_server)
    direct.write_bytes(uri, _payload(2 * MiB, seed=1))
    fault_proxy.cut_next(1, after_bytes=MiB, path_contains="/obj")
    with fault_proxy.storage().open_read(uri) as f:
        f.read(1000)
        direct.write_bytes(uri, _payload(2 * MiB, seed=2))  # replaced while we read
        with pytest.raises(StorageError, match="changed while it was being read") as ei:
            f.read()
    assert ei.value.code == "PreconditionFailed"


# --------------------------------------------------------------------------- errors & credentials


@pytest.mark.s3
def test_s3_no_such_bucket_is_one_line_storage_error(s3_server):
    st = make_storage(s3_server)
    for action in (
        lambda: st.read_bytes("s3://no-such-bucket-xyz/k"),
        lambda: st.write_bytes("s3://no-such-bucket-xyz/k", b"x"),
        lambda: list(st.list("s3://no-such-bucket-xyz/p")),
    ):
        with pytest.raises(StorageError) as ei:
            action()
        msg = str(ei.value)
        assert "\n" not in msg
        assert "bucket 'no-such-bucket-xyz' does not exist" in msg and "s3://no-such-bucket-xyz/" in msg
        assert ei.value.code == "NoSuchBucket"


@pytest.mark.s3
def test_credentials_never_leak(s3_server, fault_proxy, monkeypatch, caplog):
    key_id, secret, token = "AKIALEAKCHECK7777777", "sEcReT/leak+CHECK/0123456789abcdefGHIJ", "ToKeN-leak-check-42"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    caplog.set_level(logging.DEBUG, logger="core.storage")
    bucket = f"s3://{create_bucket(s3_server)}"
    st = fault_proxy.storage(max_attempts=2)
    texts = []

    def capture(fn):
        with pytest.raises(StorageError) as ei:
            fn()
        texts.append(str(ei.value))
        texts.append("".join(traceback.format_exception(ei.value)))

    capture(lambda: st.read_bytes("s3://no-such-bucket-xyz/k"))
    # A server echoing credential material in its error message (S3 does echo the key id).
    echo = f"bad signature for {key_id} with {secret} and {token}"
    fault_proxy.fail_next(1, "GET", path_contains="/k1", status=403, code="SignatureDoesNotMatch", message=echo)
    capture(lambda: st.read_bytes(join(bucket, "k1")))
    fault_proxy.fail_next(10, "PUT", path_contains="/k2", message=echo)  # retried + logged, then exhausted
    capture(lambda: st.write_bytes(join(bucket, "k2"), b"x"))
    assert "credentials" in texts[2]  # the 403 names what to check
    assert caplog.records, "the retries should have logged warnings"
    haystack = "\n".join(texts) + caplog.text
    for value in (key_id, secret, token):
        assert value not in haystack


def test_missing_credentials_message(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    st = Storage(StorageConfig(endpoint_url="http://127.0.0.1:9", region="us-east-1", max_attempts=1))
    with pytest.raises(StorageError, match="no usable AWS credentials.*s3://bkt/k"):
        st.read_bytes("s3://bkt/k")
