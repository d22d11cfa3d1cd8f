"""The S3 backend's lean HEAD/LIST/PUT path (backends/s3_fast.py) answers exactly as boto3 does.

Every check runs the same call through two backends on the same bucket of a real server
(moto and SeaweedFS): one with the fast path, one with ``fast_path=False`` (boto3 alone, the
code as it was), and compares the results or the errors.  Error answers that the test servers
cannot be made to send (503 with Retry-After, 500 without a body, a hung store) come from a
small canned HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
import trio

from cloudfs.backends import s3_fast
from cloudfs.backends.base import ListPage, ObjectInfo, Payload, RetryPolicy
from cloudfs.backends.errors import BackendError, NotFound, PermissionDenied, Transient
from cloudfs.backends.s3 import S3Backend
from cloudfs.layout import encode_xattrs
from tests.backends.test_s3 import ACCESS_KEY, SECRET, assert_no_secrets, auth_moto  # noqa: F401
from tests.servers import Target
from tests.servers.flaky_proxy import FlakyProxy

pytestmark = pytest.mark.backends("s3", "seaweed")

T = TypeVar("T")
QUICK = RetryPolicy(attempts=1, initial_delay=0.01, max_delay=0.01, call_timeout=20, metadata_timeout=20)

KEYS = [
    "plain", "with space", "two  spaces ", "unicodé/ñame/日本語", "plus+sign", "per%cent", "per%2Fcent",
    "question?mark", "hash#tag", "amp&er=sand;semi", "tilde~under_score.dot-dash", "star*(paren)'quote'",
    "brackets[]{}<>|^`", "comma,colon:at@dollar$bang!", "back\\slash", "emoji😀", "deep/a/b/c/d/e/f",
    "trailing.", "l" * 200 + "/" + "o" * 200 + "/" + "n" * 200, "x" * 1000,
    "empty-folder/", "dir/", "dir/a", "dir/b c", "dir/sub/x", "dir/sub2/", "dir+plus/y", "dir space/z",
]


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return trio.run(fn, *args)


@contextlib.contextmanager
def pair(bucket: str, endpoint: str | None = None, **kw: Any) -> Iterator[tuple[S3Backend, S3Backend]]:
    """The same backend twice: with the fast path, and through boto3 only."""
    fast = S3Backend(bucket, endpoint=endpoint, retry=QUICK, **kw)
    slow = S3Backend(bucket, endpoint=endpoint, retry=QUICK, fast_path=False, **kw)
    try:
        yield fast, slow
    finally:
        fast.close()
        slow.close()


def boto3_sends(b: S3Backend) -> list[str]:
    """URLs of the HEAD/LIST/PUT requests the backend's boto3 client sends (it records, changes nothing)."""
    urls: list[str] = []
    for op in ("HeadObject", "ListObjectsV2", "PutObject"):
        b.client.meta.events.register(f"before-send.s3.{op}", lambda request, **_: urls.append(request.url))
    return urls


def outcome(fn: Callable[..., Awaitable[T]], *args: Any) -> Any:
    """The result of a call, or the class and text of the error it raised."""
    try:
        return run(fn, *args)
    except BackendError as exc:
        return (type(exc), str(exc), getattr(exc, "retry_after", None))


@pytest.fixture
def objects(target: Target) -> list[str]:
    sdk, bucket = target.sdk, target.extra["bucket"]
    meta = {"mode": "33188", "uid": "1000", "mtime": "1700000000.123456789",
            # non-ASCII attributes, stored the way cloudfs stores them (encode_xattrs)
            "xattr": encode_xattrs({"user.名前".encode(): "värde ✓".encode(), b"user.bin": b"\x00\xff"}),
            "note": "=?UTF-8?B?w6lsw6h2ZQ==?=", "CamelCase": "Kept"}
    stored = []
    for i, key in enumerate(KEYS):
        try:
            sdk.put_object(Bucket=bucket, Key=key, Body=b"" if key.endswith("/") else b"x" * i,
                           Metadata=meta if i % 2 else {})
        except sdk.exceptions.ClientError as exc:  # SeaweedFS: a name component is at most 255 bytes
            assert exc.response["Error"]["Code"] == "KeyTooLongError" and len(key) > 255
            continue
        stored.append(key)
    return stored


def test_head_answers_as_boto3(target: Target, objects: list[str]) -> None:
    with pair(target.extra["bucket"]) as (fast, slow):
        sent = boto3_sends(fast)
        for key in [*objects, "missing", "missing/", "dir/sub/", "empty-folder"]:
            a, b = outcome(fast.head, key), outcome(slow.head, key)
            assert a == b, key
            if isinstance(a, ObjectInfo):
                assert a.mtime is not None and a.etag and not a.etag.startswith('"')
        assert fast._fast is not None and sent == []  # every HEAD took the fast path


SMALL_META = {"mode": "33188", "uid": "1000", "mtime": "1700000000.123456789", "CamelCase": "Kept",
              "xattr": encode_xattrs({"user.名前".encode(): "värde ✓".encode()})}


def test_small_puts_store_what_boto3_stores(target: Target) -> None:
    """The same small PUTs through both paths store the same objects (body, metadata,
    Content-Type, ETag), and their conditions refuse alike.  A body over PUT_MAX and
    metadata boto3 refuses (not ASCII) take boto3's path."""
    sdk, bucket = target.sdk, target.extra["bucket"]
    keys = [k for k in KEYS if not k.endswith("/") and len(k) < 250] + ["page.html", "photo.JPG"]
    with pair(bucket) as (fast, slow):
        sent = boto3_sends(fast)
        for tag, b in (("fast", fast), ("slow", slow)):
            for i, key in enumerate(keys):
                etag = run(b.put, f"{tag}/{key}", Payload.from_bytes(b"y" * i), SMALL_META if i % 2 else {})
                assert etag and not etag.startswith('"')
        assert sent == []  # every PUT took the fast path
        for key in keys:
            a, b = (sdk.head_object(Bucket=bucket, Key=f"{tag}/{key}") for tag in ("fast", "slow"))
            for field in ("ContentLength", "ETag", "Metadata", "ContentType"):
                assert a[field] == b[field], (key, field)
        stored = sdk.head_object(Bucket=bucket, Key="fast/plain")["ETag"].strip('"')
        body = Payload.from_bytes(b"z")
        for cond in ((None, True), ("0" * 32, False)):  # it exists; it is another version
            refused = outcome(fast.put, "fast/plain", body, {}, *cond)
            assert refused == outcome(slow.put, "fast/plain", body, {}, *cond)
            assert isinstance(refused, tuple) and issubclass(refused[0], BackendError), refused
        assert run(fast.put, "fast/plain", Payload.from_bytes(b"w"), {}, stored) != stored
        assert sent == []
        big = Payload.from_bytes(b"b" * (s3_fast.PUT_MAX + 1))
        assert run(fast.put, "fast/big", big) == run(slow.put, "slow/big", big)
        assert len(sent) == 1  # boto3 streams it from its file
        odd = [outcome(b.put, "odd", Payload.from_bytes(b"o"), {"note": "élève"}) for b in (fast, slow)]
        assert odd[0] == odd[1] and isinstance(odd[0], tuple), odd  # what boto3 refuses, it refuses itself


def test_head_metadata_as_stored(target: Target, objects: list[str]) -> None:
    with pair(target.extra["bucket"]) as (fast, _):
        info = run(fast.head, "unicodé/ñame/日本語")
    assert info.metadata is not None and info.metadata["mode"] == "33188"
    assert info.metadata == target.sdk.head_object(Bucket=target.extra["bucket"], Key=KEYS[3])["Metadata"]


async def all_pages(b: S3Backend, prefix: str, delimiter: str | None, limit: int) -> list[ListPage]:
    return [page async for page in b.list(prefix, delimiter, limit)]


@pytest.mark.parametrize("limit", [1000, 3])
@pytest.mark.parametrize("delimiter", ["/", None])
@pytest.mark.parametrize("prefix", ["", "dir/", "dir", "unicodé/", "no-such/"])
def test_list_answers_as_boto3(target: Target, objects: list[str], prefix: str, delimiter: str | None,
                               limit: int) -> None:
    with pair(target.extra["bucket"]) as (fast, slow):
        sent = boto3_sends(fast)
        a = run(all_pages, fast, prefix, delimiter, limit)
        b = run(all_pages, slow, prefix, delimiter, limit)
        assert sent == []
    assert a == b  # objects, prefixes and continuation tokens, page by page
    if limit == 3 and prefix == "" and delimiter is None:
        assert len(a) > 5 and all(p.next_token for p in a[:-1])
    keys = {o.key for p in a for o in p.objects} | {x for p in a for x in p.prefixes}
    if prefix == "" and delimiter is None:
        # (stores that keep folders as directories do not list their markers; SeaweedFS
        # reads a backslash as a folder separator)
        assert set(objects) - keys <= {"empty-folder/", "dir/", "dir/sub2/", "back\\slash"}


def test_prefix_mount_and_listing_with_prefix(target: Target, objects: list[str]) -> None:
    url = target.url + "/dir"
    from cloudfs.backends import open_backend

    fast, slow = open_backend(url), open_backend(url)
    assert isinstance(slow, S3Backend)
    slow._fast_wanted = False
    try:
        assert run(all_pages, fast, "", "/", 2) == run(all_pages, slow, "", "/", 2)
        assert outcome(fast.head, "a") == outcome(slow.head, "a")
    finally:
        fast.close()
        slow.close()


def test_requests_are_those_boto3_sends(target: Target, objects: list[str]) -> None:
    """The same URLs (path, query) reach the store, and the session token is signed in."""
    upstream = urlsplit(target.extra["endpoint"]).port
    assert upstream
    with FlakyProxy(upstream, fail_every=0) as proxy:
        endpoint = f"http://127.0.0.1:{proxy.port}"
        with pair(target.extra["bucket"], endpoint) as (fast, slow):
            for b in (fast, slow):
                for key in objects[:20]:
                    run(b.head, key)
                for key in objects[:5]:
                    run(b.put, f"put/{key}", Payload.from_bytes(b"p"), {"mode": "33188"})
                run(all_pages, b, "dir/", "/", 2)
                run(all_pages, b, "", None, 1000)
        half = len(proxy.requests) // 2
        got, want = proxy.requests[:half], proxy.requests[half:]
    assert [(r.method, r.path) for r in got] == [(r.method, r.path) for r in want]
    for r in got:
        auth = r.header("Authorization") or ""
        assert auth.startswith("AWS4-HMAC-SHA256 Credential=") and "/s3/aws4_request" in auth
        assert r.header("x-amz-date") and r.header("x-amz-content-sha256")


def test_session_token_is_sent(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value")
    upstream = urlsplit(target.extra["endpoint"]).port
    assert upstream
    with FlakyProxy(upstream, fail_every=0) as proxy:
        with pair(target.extra["bucket"], f"http://127.0.0.1:{proxy.port}") as (fast, _):
            with contextlib.suppress(BackendError):  # whether the store accepts it does not matter
                run(fast.head, "plain")
    assert [r.header("x-amz-security-token") for r in proxy.requests] == ["session-token-value"]
    assert "x-amz-security-token" in (proxy.requests[0].header("Authorization") or "")


def test_throttling_is_transient_and_retried(target: Target) -> None:
    upstream = urlsplit(target.extra["endpoint"]).port
    assert upstream
    target.sdk.put_object(Bucket=target.extra["bucket"], Key="k", Body=b"v")
    with FlakyProxy(upstream, fail_every=1) as proxy:
        with pair(target.extra["bucket"], f"http://127.0.0.1:{proxy.port}") as (fast, slow):
            for call in ((S3Backend.head, "k"), (S3Backend.list_page, "")):
                assert outcome(call[0], fast, call[1]) == outcome(call[0], slow, call[1])
                assert outcome(call[0], fast, call[1])[0] is Transient
    with FlakyProxy(upstream, fail_every=2) as proxy:  # the retry in Backend._call gets through
        b = S3Backend(target.extra["bucket"], endpoint=f"http://127.0.0.1:{proxy.port}",
                      retry=RetryPolicy(attempts=3, initial_delay=0.01, max_delay=0.01))
        try:
            # Request 1 is answered, 2 fails, 3 (its retry) is answered.
            assert [o.key for o in run(b.list_page, "").objects] == ["k"]
            assert [o.key for o in run(b.list_page, "").objects] == ["k"]
            assert b.requests["list_page"] == 3 and b._fast is not None
        finally:
            b.close()


def test_a_failed_head_in_a_batch_is_retried_alone(target: Target) -> None:
    """``Backend.head_many``: a throttled HEAD in a batch is retried by itself; the HEADs the
    batch had answered before it are not sent again."""
    upstream = urlsplit(target.extra["endpoint"]).port
    assert upstream
    keys = [f"batch/{i:02d}" for i in range(20)]
    for key in keys:
        target.sdk.put_object(Bucket=target.extra["bucket"], Key=key, Body=b"v")
    with FlakyProxy(upstream, fail_every=4) as proxy:
        b = S3Backend(target.extra["bucket"], endpoint=f"http://127.0.0.1:{proxy.port}",
                      retry=RetryPolicy(attempts=3, initial_delay=0.01, max_delay=0.01))
        try:
            assert sorted(run(b.head_many, keys, 1)) == keys
        finally:
            b.close()
    assert proxy.failed >= 5
    assert len(proxy.requests) == len(keys) + proxy.failed == b.requests["head"]
    answered = [r.path for i, r in enumerate(proxy.requests, 1) if i % 4]
    assert sorted(answered) == sorted(set(answered)) and len(answered) == len(keys)


def test_kept_connections_found_dead_are_replaced_and_only_head_is_sent_twice(target: Target) -> None:
    """``s3_fast.Direct``: a kept connection the server closed while idle is found before use
    and replaced.  One that fails on use is sent on once more on a new connection for a HEAD,
    never for a PUT (the store may have taken it); a store that drops every connection is a
    transient failure in one line, and the next request after it is back is answered."""
    import socket

    upstream = urlsplit(target.extra["endpoint"]).port
    assert upstream
    target.sdk.put_object(Bucket=target.extra["bucket"], Key="k", Body=b"v")
    with FlakyProxy(upstream, fail_every=0) as proxy:
        with pair(target.extra["bucket"], f"http://127.0.0.1:{proxy.port}") as (fast, _):
            assert run(fast.head, "k").size == 1
            direct = fast._fast._direct if fast._fast is not None else None
            assert direct is not None
            kept = [c for conns in direct._idle.values() for c in conns]
            assert len(kept) == 1 and kept[0].sock is not None
            kept[0].sock.shutdown(socket.SHUT_RDWR)  # as if the server had closed it
            assert run(fast.head, "k").size == 1
            assert len(proxy.requests) == 2
            proxy.down()
            kind, text, _ = outcome(fast.head, "k")
            assert kind is Transient and "\n" not in text
            assert proxy.dropped == 2  # on the kept connection, then once more on a new one
            kind, _, _ = outcome(fast.put, "p", Payload.from_bytes(b"x"), {})
            assert kind is Transient
            assert proxy.dropped == 3  # sent once: on a new connection (none was kept)
            proxy.up()
            assert run(fast.head, "k").size == 1
            run(fast.put, "p", Payload.from_bytes(b"x"), {})
            proxy.down()
            kind, _, _ = outcome(fast.put, "p", Payload.from_bytes(b"y"), {})
            assert kind is Transient and proxy.dropped == 4  # on the kept connection, not again
            proxy.up()
    assert target.sdk.get_object(Bucket=target.extra["bucket"], Key="p")["Body"].read() == b"x"


def test_missing_bucket(target: Target) -> None:
    with pair("cloudfs-no-such-bucket-fast", target.extra["endpoint"]) as (fast, slow):
        for call in ((S3Backend.head, "k"), (S3Backend.list_page, "")):
            assert outcome(call[0], fast, call[1]) == outcome(call[0], slow, call[1])
        assert isinstance(outcome(S3Backend.head, fast, "k")[1], str)
        assert issubclass(outcome(S3Backend.list_page, fast, "")[0], NotFound)


@pytest.mark.backends("s3")
def test_rejected_credentials(auth_moto: str, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok-" + SECRET)
    with pair("some-bucket", auth_moto) as (fast, slow):
        head, listing = outcome(fast.head, "a/key"), outcome(fast.list_page, "")
        assert head == outcome(slow.head, "a/key") and listing == outcome(slow.list_page, "")
    assert head[0] is PermissionDenied  # a HEAD answer has no body: 403 is all it says
    assert listing[0].__name__ == "AuthenticationFailed"
    for text in (head[1], listing[1], caplog.text):
        assert_no_secrets(text)


def test_no_credentials(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pair(target.extra["bucket"], target.extra["endpoint"], region="us-east-1") as (fast, slow):
        for call in ((S3Backend.head, "k"), (S3Backend.list_page, "")):
            a = outcome(call[0], fast, call[1])
            assert a == outcome(call[0], slow, call[1]) and a[0].__name__ == "AuthenticationFailed"


# ---------------------------------------------------------------------- canned answers
class Canned:
    """An HTTP server on 127.0.0.1 that answers every request with one canned response."""

    def __init__(self) -> None:
        self.status, self.headers, self.body, self.delay = 200, {}, b"", 0.0
        canned = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _answer(self) -> None:
                time.sleep(canned.delay)
                self.send_response(canned.status)
                for k, v in {**canned.headers, "Content-Length": str(len(canned.body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(canned.body)

            do_GET = do_HEAD = _answer

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def canned() -> Iterator[Canned]:
    c = Canned()
    yield c
    c.close()


def error_xml(code: str) -> bytes:
    return (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
            f"<Message>no {SECRET}</Message><RequestId>r</RequestId></Error>").encode()


@pytest.mark.backends("s3")
@pytest.mark.parametrize(("status", "headers", "body"), [
    (503, {"Retry-After": "3"}, error_xml("SlowDown")),
    (503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, b""),
    (500, {}, b""),
    (502, {}, b"<html>bad gateway</html>"),
    (404, {}, error_xml("NoSuchBucket")),
    (404, {}, error_xml("NoSuchKey")),
    (403, {}, error_xml("AccessDenied")),
    (403, {}, error_xml("SignatureDoesNotMatch")),
    (403, {}, b""),
    (400, {}, error_xml("ExpiredToken")),
    (409, {}, error_xml("OperationAborted")),
    (429, {}, b""),
    (501, {}, error_xml("NotImplemented")),
    (418, {}, b""),
    (200, {"Content-Type": "application/xml"}, b"<ListBucketResult><Contents><Key>"),  # truncated XML
    (200, {"Content-Type": "application/xml"}, error_xml("InternalError")),  # an error in a 200
    # what botocore's region redirector acts on: the fast path hands these to boto3
    (301, {"x-amz-bucket-region": "eu-west-1"}, error_xml("PermanentRedirect")),
    (400, {"x-amz-bucket-region": "eu-west-1"}, error_xml("AuthorizationHeaderMalformed")),
    (400, {}, b""),
])
def test_error_answers_map_as_boto3(canned: Canned, status: int, headers: dict[str, str], body: bytes,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    canned.status, canned.headers, canned.body = status, headers, body
    with pair("bucket", canned.endpoint, region="us-east-1") as (fast, slow):
        for call in ((S3Backend.head, "k"), (S3Backend.list_page, "")):
            if status == 200 and call[0] is S3Backend.head:
                continue
            a = outcome(call[0], fast, call[1])
            b = outcome(call[0], slow, call[1])
            assert a == b
            assert_no_secrets(a[1])
        assert fast._fast is not None


@pytest.mark.backends("s3")
def test_timeouts_and_dead_endpoints_are_transient(canned: Canned, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.servers.process import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    canned.status, canned.headers, canned.body, canned.delay = 200, {}, b"", 2.0
    try:
        for endpoint in (canned.endpoint, f"http://127.0.0.1:{free_port()}"):
            with pair("bucket", endpoint, region="us-east-1", connect_timeout=1,
                      read_timeout=0.5) as (fast, slow):
                for call in ((S3Backend.head, "k"), (S3Backend.list_page, "")):
                    a = outcome(call[0], fast, call[1])
                    assert a == outcome(call[0], slow, call[1]) and a[0] is Transient
                    assert_no_secrets(a[1])
    finally:
        canned.delay = 0.0


# ---------------------------------------------------------------------- addressing
class _Stop(Exception):
    pass


def boto3_request(b: S3Backend, key: str) -> Any:
    """The HeadObject request boto3 builds and signs for ``key``, taken just before it would be
    sent (the call then stops: nothing leaves the machine)."""
    seen: list[Any] = []

    def stop(request: Any, **_: Any) -> None:
        seen.append(request)
        raise _Stop()

    b.client.meta.events.register("before-send.s3.HeadObject", stop)
    with contextlib.suppress(_Stop):
        b.client.head_object(Bucket=b.bucket, Key=key)
    b.client.meta.events.unregister("before-send.s3.HeadObject", stop)
    return seen[0]


@pytest.mark.backends("s3")
@pytest.mark.parametrize(("bucket", "kw"), [
    ("my-bucket", {"region": "eu-west-1"}),
    ("my-bucket", {"region": "us-east-1"}),
    ("my-bucket", {"region": "eu-west-1", "path_style": True}),
    ("my.dotted.bucket", {"region": "eu-west-1"}),
    ("my-bucket", {"region": "cn-north-1"}),
    ("my-bucket", {"region": "eu-west-1", "endpoint": "https://s3.example.com"}),
    ("my-bucket", {"region": "eu-west-1", "endpoint": "https://s3.example.com/base/", "path_style": False}),
    ("my-bucket", {"region": "auto", "endpoint": "https://acct.r2.cloudflarestorage.com"}),
])
def test_urls_are_those_boto3_builds(bucket: str, kw: dict[str, Any],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Virtual-host and path-style addressing, AWS regions and custom endpoints: the fast
    path's URL and signing scope for a key are the ones botocore builds for the same call."""
    from cloudfs.backends import s3_fast

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    b = S3Backend(bucket, **kw)
    try:
        fast = b._fast_path()
        assert fast is not None
        endpoint = fast._endpoint(s3_fast.HEAD)
        for key in ("k", "a b/c+d%e?f#g", "unicodé", "/lead//double"):
            want = boto3_request(b, key)
            got = fast._request(endpoint, "HEAD", s3_fast._key_path(key), {})
            assert got.url == want.url
            fast._signer.get_auth_instance(endpoint.signing_name, endpoint.region,
                                           endpoint.signature_version).add_auth(got)
            scope = want.headers["Authorization"].split(b",")[0].split(b"/", 1)[1]
            assert got.headers["Authorization"].split(",")[0].split("/", 1)[1] == scope.decode()
    finally:
        b.close()


@pytest.mark.backends("s3")
def test_configurations_boto3_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the fast path does not serve is left to boto3, whole."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    for bucket in ("my-bucket--usw2-az1--x-s3",  # S3 Express directory bucket: its own session auth
                   "Invalid_Bucket!"):            # boto3 rejects the name (InvalidName)
        b = S3Backend(bucket, region="us-west-2")
        try:
            assert b._fast_path() is None
        finally:
            b.close()
