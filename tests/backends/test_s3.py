"""S3-specific behaviour of the S3 backend, against moto on 127.0.0.1."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
import trio

from cloudfs.backends import Payload, open_backend, s3_fast
from cloudfs.backends.base import RetryPolicy
from cloudfs.backends.errors import (
    AuthenticationFailed,
    BackendError,
    BucketNotFound,
    ConfigError,
    InvalidName,
    NameTooLong,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    Transient,
)
from cloudfs.backends.s3 import S3Backend
from tests.servers import Target
from tests.servers.flaky_proxy import FlakyProxy, Request
from tests.servers.process import free_port
from tests.servers.s3 import start_moto

pytestmark = pytest.mark.backends("s3")

T = TypeVar("T")
SECRET = "wJalrXUtnFEMI-very-secret-value-0123"
ACCESS_KEY = "AKIACLOUDFSTESTKEY01"


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return trio.run(fn, *args)


def assert_no_secrets(text: str) -> None:
    for secret in (SECRET, ACCESS_KEY, "testing", "X-Amz-Signature", "Signature="):
        assert secret not in text


@pytest.fixture(scope="session")
def auth_moto(backend_name: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second moto that checks credentials (IAM auth on from the first request)."""
    workdir = tmp_path_factory.mktemp("moto-auth")
    proc, port = start_moto(workdir, "moto-auth", env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def test_rejected_credentials(backend_name: str, auth_moto: str, monkeypatch: pytest.MonkeyPatch,
                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", auth_moto)
    caplog.set_level(logging.DEBUG, logger="cloudfs")
    b = open_backend("s3://some-bucket")
    try:
        with pytest.raises(AuthenticationFailed) as err:
            run(b.check)
        with pytest.raises(PermissionDenied):  # a HEAD answer has no body: 403 is all it says
            run(b.head, "a/key")
    finally:
        b.close()
    assert "AWS_ACCESS_KEY_ID" in str(err.value)  # the hint
    assert_no_secrets(str(err.value))
    assert_no_secrets(caplog.text)


def test_no_credentials(backend_name: str, target: Target, monkeypatch: pytest.MonkeyPatch,
                        tmp_path: Path) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    b = open_backend(target.url, target.options)
    try:
        started = time.monotonic()
        with pytest.raises(AuthenticationFailed) as err:
            run(b.check)
        assert time.monotonic() - started < 10
    finally:
        b.close()
    assert "AWS_ACCESS_KEY_ID" in str(err.value)


def test_unknown_profile(backend_name: str, target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    with pytest.raises(ConfigError, match="no-such-profile"):
        open_backend(target.url, {"profile": "no-such-profile"})


def test_missing_bucket(backend_name: str, target: Target) -> None:
    b = open_backend("s3://cloudfs-no-such-bucket-here")
    try:
        with pytest.raises(BucketNotFound):
            run(b.check)
        with pytest.raises(BucketNotFound):
            run(b.put, "k", Payload.from_bytes(b"x"), {})
        with pytest.raises(NotFound):
            run(b.head, "k")
    finally:
        b.close()


def test_key_too_long(backend: Any) -> None:
    with pytest.raises(NameTooLong):
        run(backend.put, "k" * 1025, Payload.from_bytes(b""), {})
    run(backend.put, "k" * 1024, Payload.from_bytes(b"ok"), {})  # exactly the limit is fine
    with pytest.raises(NameTooLong):
        run(backend.copy, "k" * 1024, "k" * 1025)


def test_key_too_long_with_prefix(backend_name: str, target: Target) -> None:
    b = open_backend(target.url + "/some/prefix")
    try:
        with pytest.raises(NameTooLong):
            run(b.put, "k" * (1024 - len("some/prefix/") + 1), Payload.from_bytes(b""), {})
    finally:
        b.close()


def test_foreign_metadata_visible(backend: Any, target: Target) -> None:
    """Objects written by s3fs (x-amz-meta-mode/uid/gid/mtime) and rclone (x-amz-meta-mtime)."""
    bucket = target.extra["bucket"]
    target.sdk.put_object(Bucket=bucket, Key="s3fs/file", Body=b"abc",
                          Metadata={"mode": "33188", "uid": "1000", "gid": "1000", "mtime": "1700000000"})
    target.sdk.put_object(Bucket=bucket, Key="rclone/file", Body=b"defg",
                          Metadata={"mtime": "1700000000.123456789"})
    target.sdk.put_object(Bucket=bucket, Key="s3fs/dir/", Body=b"",
                          Metadata={"mode": "16877"}, ContentType="application/x-directory")
    info = run(backend.head, "s3fs/file")
    assert info.metadata == {"mode": "33188", "uid": "1000", "gid": "1000", "mtime": "1700000000"}
    assert info.size == 3
    info = run(backend.head, "rclone/file")
    assert info.metadata == {"mtime": "1700000000.123456789"}
    info = run(backend.head, "s3fs/dir/")
    assert info.size == 0 and info.metadata == {"mode": "16877"}
    page = run(backend.list_page, "s3fs/")
    assert [o.key for o in page.objects] == ["s3fs/file"]
    assert page.objects[0].metadata is None  # listings do not carry metadata on S3
    assert page.prefixes == ["s3fs/dir/"]


def test_written_metadata_is_plain_s3(backend: Any, target: Target) -> None:
    """What cloudfs writes is ordinary x-amz-meta-* headers other tools can read."""
    run(backend.put, "f", Payload.from_bytes(b"x"), {"mode": "33188", "mtime": "1700000000.5"})
    head = target.sdk.head_object(Bucket=target.extra["bucket"], Key="f")
    assert head["Metadata"] == {"mode": "33188", "mtime": "1700000000.5"}
    assert head["ResponseMetadata"]["HTTPHeaders"]["x-amz-meta-mode"] == "33188"


def test_etag_forms_agree(backend: Any, target: Target) -> None:
    etag = run(backend.put, "e", Payload.from_bytes(b"data"), {})
    assert not etag.startswith('"')
    assert run(backend.head, "e").etag == etag
    assert run(backend.list_page, "").objects[0].etag == etag
    raw = target.sdk.head_object(Bucket=target.extra["bucket"], Key="e")["ETag"]
    assert raw.strip('"') == etag
    # Either form is accepted back in a condition.
    run(lambda: backend.put("e", Payload.from_bytes(b"v2"), {}, if_match=f'"{etag}"'))
    with pytest.raises(PreconditionFailed):
        run(backend.get_range, "e", 0, None, etag)


def test_prefix_mount(backend_name: str, target: Target) -> None:
    b = open_backend(target.url + "/base/dir/")
    try:
        assert b.describe().startswith(f"s3://{target.extra['bucket']}/base/dir/")
        run(b.put, "sub/a", Payload.from_bytes(b"a"), {})
        page = run(b.list_page, "", None)
        assert [o.key for o in page.objects] == ["sub/a"]
        assert run(b.head, "sub/a").key == "sub/a"
    finally:
        b.close()
    raw = target.sdk.list_objects_v2(Bucket=target.extra["bucket"])
    assert [o["Key"] for o in raw["Contents"]] == ["base/dir/sub/a"]


def test_empty_object_and_ranges_past_end(backend: Any) -> None:
    run(backend.put, "empty", Payload.from_bytes(b""), {})
    assert run(backend.get_range, "empty") == b""
    assert run(backend.get_range, "empty", 0, 10) == b""
    run(backend.put, "five", Payload.from_bytes(b"12345"), {})
    assert run(backend.get_range, "five", 3, 100) == b"45"
    assert run(backend.get_range, "five", 5, 10) == b""
    assert run(backend.get_range, "five", 7) == b""


def test_multipart_copy_of_large_object(backend: Any) -> None:
    """Objects above the single-copy limit are copied part by part, server-side."""
    assert isinstance(backend, S3Backend)
    mib = 1024 * 1024
    data = os.urandom(11 * mib + 5)
    run(backend.put, "big/src", Payload.from_bytes(data), {"mode": "33188"})
    backend.max_single_copy = 6 * mib
    backend.copy_part_size = 5 * mib
    etag = run(backend.copy, "big/src", "big/dst")
    assert etag.endswith("-3")  # a multipart ETag: 5 + 5 + 1 MiB
    assert run(backend.get_range, "big/dst") == data
    assert run(backend.head, "big/dst").metadata == {"mode": "33188"}
    run(backend.copy, "big/src", "big/dst2", {"mode": "33261"})
    assert run(backend.head, "big/dst2").metadata == {"mode": "33261"}
    # set_metadata on a large object: a multipart copy onto itself keeps the data
    run(backend.set_metadata, "big/src", {"mode": "33152"})
    assert run(backend.head, "big/src").metadata == {"mode": "33152"}
    assert run(backend.get_range, "big/src") == data


def test_part_copy_pinned_to_source_etag(backend: Any) -> None:
    """A part copy names the source ETag it expects (moto does not check it; S3 does)."""
    part = 5 * 1024 * 1024
    etag = run(backend.put, "pc/src", Payload.from_bytes(b"a" * part), {})
    sent: list[dict[str, str]] = []

    def record(request: Any, **_: Any) -> None:
        sent.append({k.lower(): v.decode() if isinstance(v, bytes) else v
                     for k, v in request.headers.items()})

    backend.client.meta.events.register("before-send.s3.UploadPartCopy", record)

    async def go() -> None:
        uid = await backend.mpu_create("pc/dst", {})
        try:
            await backend.mpu_part_copy("pc/dst", uid, 1, "pc/src", 0, part, etag)
        finally:
            await backend.mpu_abort("pc/dst", uid)

    run(go)
    assert len(sent) == 1
    assert sent[0]["x-amz-copy-source-if-match"] == f'"{etag}"'
    assert sent[0]["x-amz-copy-source-range"] == f"bytes=0-{part - 1}"


def test_copy_missing_source(backend: Any) -> None:
    with pytest.raises(NotFound):
        run(backend.copy, "nope", "dst")


def test_abort_unknown_upload_is_quiet(backend: Any) -> None:
    run(backend.mpu_abort, "k", "no-such-upload-id")


def test_unreachable_endpoint_is_transient(backend_name: str, target: Target) -> None:
    port = free_port()  # nothing listens here
    b = S3Backend(target.extra["bucket"], endpoint=f"http://127.0.0.1:{port}",
                  retry=RetryPolicy(attempts=2, initial_delay=0.01, max_delay=0.01, call_timeout=20),
                  connect_timeout=2, read_timeout=2)
    try:
        started = time.monotonic()
        with pytest.raises(Transient) as err:
            run(b.check)
        with pytest.raises(Transient):
            run(b.get_range, "k")
        assert time.monotonic() - started < 15
    finally:
        b.close()
    assert f"127.0.0.1:{port}" in str(err.value)
    assert_no_secrets(str(err.value))


def _client_error(code: str, status: int, headers: dict[str, str] | None = None) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": f"message with {SECRET}"},
                        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers or {}}},
                       "GetObject")


@pytest.mark.parametrize(("code", "status", "expected"), [
    ("NoSuchKey", 404, NotFound),
    ("404", 404, NotFound),
    ("NoSuchUpload", 404, NotFound),
    ("NoSuchBucket", 404, BucketNotFound),
    ("AccessDenied", 403, PermissionDenied),
    ("InvalidAccessKeyId", 403, AuthenticationFailed),
    ("SignatureDoesNotMatch", 403, AuthenticationFailed),
    ("ExpiredToken", 400, AuthenticationFailed),
    ("PreconditionFailed", 412, PreconditionFailed),
    ("ConditionalRequestConflict", 409, PreconditionFailed),
    ("KeyTooLongError", 400, NameTooLong),
    ("InvalidObjectName", 400, InvalidName),
    ("InternalError", 500, Transient),
    ("SlowDown", 503, Transient),
    ("RequestTimeout", 400, Transient),
    ("ServiceUnavailable", 503, Transient),
    ("502", 502, Transient),
    ("Throttling", 400, Transient),
    ("SomethingElse", 400, BackendError),
])
def test_error_mapping(code: str, status: int, expected: type[Exception]) -> None:
    b = S3Backend("bucket", endpoint="http://127.0.0.1:1")
    try:
        mapped = b._translate(_client_error(code, status))
    finally:
        b.close()
    assert type(mapped) is expected
    assert_no_secrets(str(mapped))


def test_retry_after_is_kept() -> None:
    b = S3Backend("bucket", endpoint="http://127.0.0.1:1")
    try:
        mapped = b._translate(_client_error("SlowDown", 503, {"retry-after": "3"}))
    finally:
        b.close()
    assert isinstance(mapped, Transient) and mapped.retry_after == 3.0


def test_connection_errors_are_transient() -> None:
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    url = "http://127.0.0.1:1/bucket/key?X-Amz-Signature=abc"
    b = S3Backend("bucket", endpoint="http://127.0.0.1:1")
    try:
        for exc in (EndpointConnectionError(endpoint_url=url), ConnectTimeoutError(endpoint_url=url),
                    ReadTimeoutError(endpoint_url=url), ConnectionClosedError(endpoint_url=url)):
            mapped = b._translate(exc)
            assert isinstance(mapped, Transient), exc
            assert_no_secrets(str(mapped))
        assert isinstance(b._translate(NoCredentialsError()), AuthenticationFailed)
        assert isinstance(b._translate(PartialCredentialsError(provider="env", cred_var="x")),
                          AuthenticationFailed)
        assert b._translate(ValueError("not ours")) is None
    finally:
        b.close()


def test_options(backend_name: str, target: Target) -> None:
    b = open_backend(target.url, {"endpoint": "http://127.0.0.1:9", "region": "eu-west-1", "path_style": ""})
    try:
        assert b.describe() == f"s3://{target.extra['bucket']}/ at 127.0.0.1:9"
        assert b.client.meta.region_name == "eu-west-1"
        assert b.client.meta.config.s3["addressing_style"] == "path"
    finally:
        b.close()
    with pytest.raises(ConfigError):
        open_backend(target.url, {"endpoint": "http://user:pw@127.0.0.1:9"})
    with pytest.raises(ConfigError):
        open_backend(target.url, {"path_style": "maybe"})
    with pytest.raises(ConfigError):
        open_backend(target.url, {"access_key": "x"})
    with pytest.raises(ConfigError):
        open_backend("s3:///prefix-only")


def record_headers(backend: S3Backend) -> list[tuple[str, dict[str, str]]]:
    """(operation, request headers) of every request the backend sends from now on."""
    sent: list[tuple[str, dict[str, str]]] = []

    def record(request: Any, event_name: str, **_: Any) -> None:
        sent.append((event_name.rsplit(".", 1)[-1], {k.lower(): v.decode() if isinstance(v, bytes) else v
                                                     for k, v in request.headers.items()}))

    backend.client.meta.events.register("before-send.s3", record)
    return sent


def put_in_parts(b: S3Backend, key: str, body: bytes) -> None:
    """``body`` stored as a multipart upload of one part."""

    async def multipart() -> None:
        uid = await b.mpu_create(key, {})
        part = await b.mpu_part(key, uid, 1, Payload.from_bytes(body))
        await b.mpu_complete(key, uid, [part])

    run(multipart)


def test_write_settings_reach_every_object(backend_name: str, target: Target) -> None:
    """storage_class, sse=s3 and acl go on PUT, multipart create and copy (a rename), and the
    Content-Type follows the name."""
    b = open_backend(target.url, {"storage_class": "STANDARD_IA", "sse": "s3", "acl": "public-read"})
    assert isinstance(b, S3Backend)
    bucket = target.extra["bucket"]
    try:
        run(b.put, "site/index.html", Payload.from_bytes(b"<html/>"), {"mode": "33188"})

        put_in_parts(b, "big.jpg", b"j" * 100)
        run(b.copy, "site/index.html", "site/moved.txt", {"mode": "33188"})
        run(b.copy, "big.jpg", "kept.bin")  # metadata kept: so is the Content-Type
    finally:
        b.close()
    expected = {"site/index.html": "text/html", "big.jpg": "image/jpeg", "site/moved.txt": "text/plain",
                "kept.bin": "image/jpeg"}
    for key, content_type in expected.items():
        head = target.sdk.head_object(Bucket=bucket, Key=key)
        assert head.get("StorageClass") == "STANDARD_IA", key
        assert head.get("ServerSideEncryption") == "AES256", key
        assert head["ContentType"] == content_type, key
        grants = target.sdk.get_object_acl(Bucket=bucket, Key=key)["Grants"]
        assert any(g["Grantee"].get("URI", "").endswith("/AllUsers") and g["Permission"] == "READ"
                   for g in grants), key


def test_requester_pays_and_customer_key_go_on_every_request(backend_name: str, target: Target,
                                                             tmp_path: Path) -> None:
    """moto neither bills nor encrypts, so this checks what is sent: the request-payer header
    on every request, the SSE-C key (as its MD5) on every one that reads or writes data."""
    key = os.urandom(32)
    key_file = tmp_path / "sse.key"
    key_file.write_bytes(base64.b64encode(key) + b"\n")
    key_file.chmod(0o600)
    b = open_backend(target.url, {"requester_pays": "", "sse": "c", "sse_c_key_file": str(key_file)})
    assert isinstance(b, S3Backend)
    sent = record_headers(b)
    try:
        run(b.put, "enc", Payload.from_bytes(b"secret data"), {})
        assert run(b.get_range, "enc") == b"secret data"
        run(b.head, "enc")
        run(b.copy, "enc", "enc2", {"mode": "33188"})
        run(b.list_page, "", None)
        run(b.delete, "enc2")
    finally:
        b.close()
    md5 = base64.b64encode(hashlib.md5(key).digest()).decode()
    ops = [op for op, _ in sent]
    assert {"PutObject", "GetObject", "HeadObject", "CopyObject", "ListObjectsV2", "DeleteObject"} <= set(ops)
    for op, headers in sent:
        assert headers.get("x-amz-request-payer") == "requester", op
        if op in ("PutObject", "GetObject", "HeadObject", "CopyObject"):
            assert headers["x-amz-server-side-encryption-customer-algorithm"] == "AES256", op
            assert headers["x-amz-server-side-encryption-customer-key-md5"] == md5, op
        if op == "CopyObject":
            assert headers["x-amz-copy-source-server-side-encryption-customer-key-md5"] == md5
    assert repr(key) not in repr(b.settings)


@pytest.mark.parametrize("options, message", [
    ({"storage_class": "COLD"}, "storage_class=COLD: not one of"),
    ({"acl": "everyone"}, "acl=everyone: not one of"),
    ({"sse": "aes"}, "sse=aes: not one of"),
    ({"sse": "c"}, "sse=c needs -o sse_c_key_file"),
    ({"sse_kms_key_id": "k"}, "sse_kms_key_id goes with -o sse=kms"),
    ({"requester_pays": "maybe"}, "requester_pays takes"),
    ({"ca_bundle": "/nonexistent/ca.pem"}, "no such file"),
    ({"tls_verify": "perhaps"}, "tls_verify takes"),
])
def test_bad_write_settings_are_config_errors(backend_name: str, target: Target, options: dict[str, str],
                                              message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_backend(target.url, options)


def test_customer_key_file_must_be_private_and_32_bytes(backend_name: str, target: Target,
                                                        tmp_path: Path) -> None:
    key_file = tmp_path / "k"
    key_file.write_bytes(os.urandom(32))
    key_file.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by group or others"):
        open_backend(target.url, {"sse": "c", "sse_c_key_file": str(key_file)})
    key_file.chmod(0o600)
    key_file.write_bytes(b"too short")
    with pytest.raises(ConfigError, match="not a 32-byte key") as err:
        open_backend(target.url, {"sse": "c", "sse_c_key_file": str(key_file)})
    assert "too short" not in str(err.value)


def test_tls_options_reach_the_client(backend_name: str, target: Target, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    for options, verify in (({"ca_bundle": str(ca)}, str(ca)), ({"tls_verify": "0"}, False)):
        b = open_backend(target.url, options)
        assert isinstance(b, S3Backend)
        try:
            assert b.client._endpoint.http_session._verify == verify
        finally:
            b.close()


@contextlib.contextmanager
def on_the_wire(target: Target, options: dict[str, str]) -> Iterator[tuple[S3Backend, list[Request]]]:
    """A backend with ``options`` whose every request (the lean path's and boto3's alike) is
    logged, with its headers, by a proxy in front of the store."""
    upstream = urlsplit(target.extra["endpoint"]).port
    assert upstream
    with FlakyProxy(upstream, fail_every=0) as proxy:
        b = open_backend(target.url, {**options, "endpoint": f"http://127.0.0.1:{proxy.port}"})
        assert isinstance(b, S3Backend)
        try:
            yield b, proxy.requests
        finally:
            b.close()


def operation(request: Request) -> str:
    """The S3 operation of a logged request, from its method, query and headers."""
    query = urlsplit(request.path).query
    if request.method == "PUT":
        if "partNumber=" in query:
            return "UploadPartCopy" if request.header("x-amz-copy-source") else "UploadPart"
        return "CopyObject" if request.header("x-amz-copy-source") else "PutObject"
    if request.method == "POST":
        return "CompleteMultipartUpload" if "uploadId=" in query else "CreateMultipartUpload"
    return {"GET": "ListObjectsV2" if "list-type=2" in query else "GetObject", "HEAD": "HeadObject",
            "DELETE": "DeleteObject"}.get(request.method, request.method)


def _write_every_way(b: S3Backend) -> None:
    """A small PUT (the lean path), a large one (boto3), a multipart upload and a copy."""
    run(b.put, "small", Payload.from_bytes(b"s" * 100), {"mode": "33188"})
    run(b.put, "large", Payload.from_bytes(b"l" * (s3_fast.PUT_MAX + 1)), {"mode": "33188"})
    put_in_parts(b, "parts", b"p" * 100)
    run(b.copy, "small", "copied", {"mode": "33188"})


def test_sse_kms_headers_go_on_every_write_the_lean_path_too(backend_name: str, target: Target) -> None:
    """sse=kms with sse_kms_key_id: the KMS headers on PutObject (a small one through s3_fast,
    a large one through boto3), CreateMultipartUpload and CopyObject, as the store receives them."""
    key_id = "arn:aws:kms:us-east-1:123456789012:key/cloudfs-test-key"
    with on_the_wire(target, {"sse": "kms", "sse_kms_key_id": key_id}) as (b, sent):
        through_boto3 = record_headers(b)
        _write_every_way(b)
        assert b._fast is not None  # the lean path serves this configuration
    assert [op for op, _ in through_boto3].count("PutObject") == 1  # only the large one
    writes = [r for r in sent if operation(r) in ("PutObject", "CreateMultipartUpload", "CopyObject")]
    assert sorted(operation(r) for r in writes) == ["CopyObject", "CreateMultipartUpload", "PutObject",
                                                    "PutObject"]
    for r in writes:
        assert r.header("x-amz-server-side-encryption") == "aws:kms", (operation(r), r.path)
        assert r.header("x-amz-server-side-encryption-aws-kms-key-id") == key_id, (operation(r), r.path)
    for r in sent:
        if operation(r) not in ("PutObject", "CreateMultipartUpload", "CopyObject"):
            assert r.header("x-amz-server-side-encryption") is None, (operation(r), r.path)


def test_sse_c_customer_key_goes_on_parts_reads_and_writes(backend_name: str, target: Target,
                                                           tmp_path: Path) -> None:
    """sse=c: the customer key (algorithm, key, its MD5) on PutObject, CreateMultipartUpload,
    UploadPart, CopyObject (for the source too), GetObject and HeadObject, as the store receives them."""
    key = os.urandom(32)
    key_file = tmp_path / "sse.key"
    key_file.write_bytes(key)
    key_file.chmod(0o600)
    with on_the_wire(target, {"sse": "c", "sse_c_key_file": str(key_file)}) as (b, sent):
        _write_every_way(b)
        assert run(b.get_range, "parts") == b"p" * 100
        assert run(b.head, "copied").size == 100
        assert b._fast is None  # SSE-C takes boto3 for every call
    ops = [operation(r) for r in sent]
    keyed = ("PutObject", "CreateMultipartUpload", "UploadPart", "CopyObject", "GetObject", "HeadObject")
    assert set(keyed) <= set(ops), ops
    md5 = base64.b64encode(hashlib.md5(key).digest()).decode()
    for r in sent:
        if operation(r) in keyed:
            assert r.header("x-amz-server-side-encryption-customer-algorithm") == "AES256", operation(r)
            assert r.header("x-amz-server-side-encryption-customer-key") == base64.b64encode(key).decode()
            assert r.header("x-amz-server-side-encryption-customer-key-md5") == md5, operation(r)
        if operation(r) == "CopyObject":
            assert r.header("x-amz-copy-source-server-side-encryption-customer-key-md5") == md5
