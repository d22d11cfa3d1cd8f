"""Swift-specific checks against a real Swift (tests/servers/swift.py): large objects and their
segments, interop with swiftclient and older tools, limits from /info, authentication."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from cloudfs.backends import Backend, Payload, open_backend
from cloudfs.backends.errors import (
    AuthenticationFailed,
    BucketNotFound,
    ConfigError,
    NotFound,
    PreconditionFailed,
)
from cloudfs.backends.swift import (
    Auth,
    KeystoneAuth,
    PreAuth,
    SwiftBackend,
    V1Auth,
    decode_metadata,
    encode_metadata,
)
from tests.servers import Target

pytestmark = pytest.mark.backends("swift")

T = TypeVar("T")
MiB = 1024 * 1024


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return trio.run(fn, *args)


def segments(target: Target) -> list[str]:
    """Every object in the container's segments container (none if it does not exist)."""
    from swiftclient.exceptions import ClientException

    try:
        _, items = target.sdk.get_container(f"{target.extra['container']}_segments", full_listing=True)
    except ClientException as exc:
        if exc.http_status == 404:
            return []
        raise
    return sorted(i["name"] for i in items)


def referenced(target: Target, key: str) -> list[str]:
    """The segment names the SLO manifest at ``key`` points at."""
    import json

    _, body = target.sdk.get_object(target.extra["container"], key,
                                    query_string="multipart-manifest=get")
    return sorted(e["name"].split("/", 2)[2] for e in json.loads(body))


class Recorder:
    """Counts the HTTP requests a backend sends, as (method, path-and-query) pairs."""

    def __init__(self, backend: SwiftBackend) -> None:
        self.calls: list[tuple[str, str]] = []
        inner = backend._request

        def request(method: str, path: str, **kw: Any) -> Any:
            self.calls.append((method, path + (f"?{kw['query']}" if kw.get("query") else "")))
            return inner(method, path, **kw)

        backend._request = request  # type: ignore[method-assign]

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]


def upload_large(backend: Backend, key: str, data: bytes, part: int,
                 meta: dict[str, str] | None = None) -> str:
    async def go() -> str:
        uid = await backend.mpu_create(key, meta or {})
        parts = []
        for i, off in enumerate(range(0, len(data), part), 1):
            parts.append(await backend.mpu_part(key, uid, i, Payload.from_bytes(data[off:off + part])))
        return await backend.mpu_complete(key, uid, parts)

    return run(go)


@pytest.fixture
def swift_backend(backend: Backend, tmp_path: Path) -> SwiftBackend:
    assert isinstance(backend, SwiftBackend)
    backend.use_state_dir(str(tmp_path / "state"))
    run(backend.check)
    return backend


# ------------------------------------------------------------------ large objects
def test_large_object_is_an_slo_read_across_segments(backend_name: str, target: Target,
                                                     swift_backend: SwiftBackend) -> None:
    data = os.urandom(3 * MiB + 100)
    etag = upload_large(swift_backend, "big/file", data, MiB, {"mode": "33188"})
    headers = target.sdk.head_object(target.extra["container"], "big/file")
    assert headers["x-static-large-object"] == "True"
    segs = segments(target)
    assert len(segs) == 4 and all(s.startswith("big/file/cloudfs/") for s in segs)
    assert referenced(target, "big/file") == segs
    info = run(swift_backend.head, "big/file")
    assert info.size == len(data) and info.etag == etag and info.metadata == {"mode": "33188"}
    listed = run(swift_backend.list_page, "big/")
    assert [(o.key, o.size, o.etag) for o in listed.objects] == [("big/file", len(data), etag)]
    # A range that spans a segment boundary, and a conditional read with the SLO ETag.
    assert run(swift_backend.get_range, "big/file", MiB - 10, 20, etag) == data[MiB - 10:MiB + 10]
    with pytest.raises(PreconditionFailed):
        run(swift_backend.get_range, "big/file", 0, 10, "0123456789abcdef0123456789abcdef")
    _, body = target.sdk.get_object(target.extra["container"], "big/file")
    assert body == data  # swiftclient reads it back whole


def test_segment_names_are_per_upload(backend_name: str, target: Target, swift_backend: SwiftBackend) -> None:
    async def two() -> tuple[str, str]:
        a = await swift_backend.mpu_create("same", {})
        b = await swift_backend.mpu_create("same", {})
        return a, b

    a, b = run(two)
    run(swift_backend.mpu_part, "same", a, 1, Payload.from_bytes(b"a" * 10))
    run(swift_backend.mpu_part, "same", b, 1, Payload.from_bytes(b"b" * 10))
    assert segments(target) == [f"same/cloudfs/{u}/00000001" for u in sorted([a, b])]
    run(swift_backend.mpu_abort, "same", a)
    run(swift_backend.mpu_abort, "same", b)
    assert segments(target) == []


def test_overwrite_deletes_old_segments_only_after_commit(backend_name: str, target: Target,
                                                          swift_backend: SwiftBackend) -> None:
    first = os.urandom(2 * MiB + 1)
    upload_large(swift_backend, "f", first, MiB)
    old = segments(target)
    assert len(old) == 3
    # A manifest that Swift refuses (a wrong segment ETag) commits nothing: the old object
    # and all its segments stay (rclone#4469 deleted them first).

    async def refused() -> None:
        uid = await swift_backend.mpu_create("f", {})
        part = await swift_backend.mpu_part("f", uid, 1, Payload.from_bytes(b"new"))
        try:
            await swift_backend.mpu_complete("f", uid, [type(part)(1, "0" * 32)])
        finally:
            await swift_backend.mpu_abort("f", uid)

    with pytest.raises(Exception):  # noqa: B017 - Swift's 400 for a bad manifest
        run(refused)
    assert segments(target) == old
    assert run(swift_backend.get_range, "f") == first
    # A committed SLO overwrite: only the new upload's segments remain, and every DELETE of
    # an old segment comes after the manifest PUT.
    second = os.urandom(MiB + 5)
    rec = Recorder(swift_backend)
    upload_large(swift_backend, "f", second, MiB)
    new = segments(target)
    assert len(new) == 2 and not set(new) & set(old)
    manifest_put = next(i for i, (m, p) in enumerate(rec.calls)
                        if m == "PUT" and "multipart-manifest=put" in p)
    deletes = [i for i, (m, p) in enumerate(rec.calls)
               if m in ("DELETE", "POST") and ("_segments" in p or "bulk-delete" in p)]
    assert deletes and min(deletes) > manifest_put
    # A plain overwrite removes the large object's segments too, after its PUT.
    run(swift_backend.put, "f", Payload.from_bytes(b"small now"))
    assert segments(target) == []
    assert run(swift_backend.get_range, "f") == b"small now"


def test_delete_removes_segments(backend_name: str, target: Target, swift_backend: SwiftBackend) -> None:
    upload_large(swift_backend, "gone", os.urandom(2 * MiB), MiB)
    assert len(segments(target)) == 2
    run(swift_backend.delete, "gone")
    assert segments(target) == []
    with pytest.raises(NotFound):
        run(swift_backend.head, "gone")


def test_move_copies_the_manifest_not_the_data(backend_name: str, target: Target,
                                               swift_backend: SwiftBackend) -> None:
    data = os.urandom(2 * MiB + 3)
    upload_large(swift_backend, "old-name", data, MiB, {"mode": "33188"})
    segs = segments(target)
    rec = Recorder(swift_backend)
    run(swift_backend.move, "old-name", "new-name")
    # HEAD, GET of the manifest, PUT of the manifest, HEAD for its ETag, DELETE of the old
    # manifest: no request copies data (no X-Copy-From of a large object).
    assert rec.methods() == ["HEAD", "GET", "PUT", "HEAD", "DELETE"]
    assert "multipart-manifest=get" in rec.calls[1][1] and "multipart-manifest=put" in rec.calls[2][1]
    assert segments(target) == segs and referenced(target, "new-name") == segs
    assert run(swift_backend.get_range, "new-name") == data
    assert run(swift_backend.head, "new-name").metadata == {"mode": "33188"}
    with pytest.raises(NotFound):
        run(swift_backend.head, "old-name")
    run(swift_backend.delete, "new-name")
    assert segments(target) == []


def test_interrupted_upload_is_cleaned_up_by_the_next_mount(backend_name: str, target: Target,
                                                            tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    first = open_backend(target.url, target.options)
    first.use_state_dir(state)
    run(first.check)
    upload_large(first, "keep", os.urandom(MiB + 1), MiB)
    kept = segments(target)
    uid = run(first.mpu_create, "crash", {})
    run(first.mpu_part, "crash", uid, 1, Payload.from_bytes(os.urandom(1000)))
    run(first.mpu_part, "crash", uid, 2, Payload.from_bytes(os.urandom(1000)))
    first.close()  # "killed": neither completed nor aborted
    assert len(segments(target)) == len(kept) + 2
    second = open_backend(target.url, target.options)
    try:
        second.use_state_dir(state)
        run(second.check)
        run(second.recover)  # at mount: what the journal lists goes, but uploads being resumed
        assert segments(target) == kept
        assert os.listdir(os.path.join(state, "swift-segments")) == []
    finally:
        second.close()


# ------------------------------------------------------------------ interop
def test_swiftclient_objects_and_old_style_folders(backend_name: str, target: Target,
                                                   swift_backend: SwiftBackend) -> None:
    c, sdk = target.extra["container"], target.sdk
    sdk.put_object(c, "rc/file", b"rclone", headers={"X-Object-Meta-Mtime": "1354040105.5"})
    sdk.put_object(c, "olddir", b"", content_type="application/directory")
    sdk.put_object(c, "olddir/child", b"c")
    sdk.put_object(c, "lonely", b"", content_type="application/directory")
    assert run(swift_backend.head, "rc/file").metadata == {"mtime": "1354040105.5"}
    page = run(swift_backend.list_page, "")
    assert page.prefixes == ["lonely/", "olddir/", "rc/"] and page.objects == []
    flat = run(swift_backend.list_page, "", None)
    assert [o.key for o in flat.objects] == ["lonely/", "olddir/", "olddir/child", "rc/file"]
    assert run(swift_backend.head, "lonely/").size == 0
    with pytest.raises(NotFound):
        run(swift_backend.head, "lonely")  # a folder, not a file
    run(swift_backend.delete, "lonely/")
    with pytest.raises(NotFound):
        run(swift_backend.head, "lonely/")


def test_long_metadata_values_are_split_and_joined(backend_name: str, target: Target,
                                                   swift_backend: SwiftBackend) -> None:
    value = "x" * 300 + "y" * 300
    run(swift_backend.put, "m", Payload.from_bytes(b"m"), {"xattr": value, "is_symlink": "false"})
    headers = target.sdk.head_object(target.extra["container"], "m")
    assert [len(headers[f"x-object-meta-xattr{s}"]) for s in ("", "~1", "~2")] == [256, 256, 88]
    assert run(swift_backend.head, "m").metadata == {"xattr": value, "is_symlink": "false"}


def test_metadata_codec_round_trips() -> None:
    meta = {"mode": "33188", "cloudfs_upload": "abc", "xattr": "v" * 700}
    headers = {k.lower(): v for k, v in encode_metadata(meta, 256).items()}
    assert decode_metadata(headers) == meta


def test_limits_come_from_info(backend_name: str, target: Target, swift_backend: SwiftBackend) -> None:
    info = target.extra["server"].info()
    caps = swift_backend.capabilities
    assert caps.max_key_bytes == info["swift"]["max_object_name_length"]
    assert caps.max_part_size == info["swift"]["max_file_size"]
    assert caps.max_parts == info["slo"]["max_manifest_segments"]
    assert caps.max_metadata_bytes < info["swift"]["max_meta_overall_size"]


def test_delete_many_in_bulk_and_without(backend_name: str, target: Target, swift_backend: SwiftBackend,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(5):
        run(swift_backend.put, f"d/{i}", Payload.from_bytes(b"x"))
    rec = Recorder(swift_backend)
    run(swift_backend.delete_many, [f"d/{i}" for i in range(5)])
    assert rec.calls == [("POST", "?bulk-delete")]
    assert run(swift_backend.list_page, "d/").objects == []
    with target.extra["server"].proxy(bulk=False) as env:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        plain = open_backend(target.url)
        try:
            run(plain.check)
            for i in range(3):
                run(plain.put, f"e/{i}", Payload.from_bytes(b"x"))
            rec = Recorder(plain)
            run(plain.delete_many, [f"e/{i}" for i in range(3)])
            assert rec.methods() == ["DELETE"] * 3
            assert run(plain.list_page, "e/").objects == []
        finally:
            plain.close()


def test_dlo_when_the_cluster_has_no_slo(backend_name: str, target: Target, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with target.extra["server"].proxy(slo=False) as env:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        b = open_backend(target.url)
        try:
            b.use_state_dir(str(tmp_path / "state"))
            run(b.check)
            data = os.urandom(2 * MiB + 9)
            etag = upload_large(b, "dlo", data, MiB)
            headers = target.sdk.head_object(target.extra["container"], "dlo")
            assert headers["x-object-manifest"].startswith(f"{target.extra['container']}_segments/dlo/")
            assert run(b.head, "dlo").etag == etag
            assert run(b.get_range, "dlo", MiB - 3, 6) == data[MiB - 3:MiB + 3]
            assert len(segments(target)) == 3
            run(b.put, "dlo", Payload.from_bytes(b"plain"))  # the overwrite removes the segments
            assert segments(target) == []
        finally:
            b.close()


# ------------------------------------------------------------------ authentication
def test_auth_order_from_environment() -> None:
    keystone = {"OS_AUTH_URL": "http://127.0.0.1:1/v3", "OS_USERNAME": "u", "OS_PASSWORD": "p",
                "OS_PROJECT_NAME": "proj", "ST_AUTH": "http://127.0.0.1:1/auth/v1.0", "ST_USER": "a:b",
                "ST_KEY": "k", "OS_STORAGE_URL": "http://127.0.0.1:1/v1/AUTH_x", "OS_AUTH_TOKEN": "t"}
    assert isinstance(Auth.from_env(keystone), KeystoneAuth)
    assert Auth.from_env(keystone).method == "password"  # type: ignore[attr-defined]
    appcred = {"OS_AUTH_URL": "http://127.0.0.1:1/v3", "OS_APPLICATION_CREDENTIAL_ID": "id",
               "OS_APPLICATION_CREDENTIAL_SECRET": "s"}
    assert Auth.from_env(appcred).method == "application-credential"  # type: ignore[attr-defined]
    v1 = {k: v for k, v in keystone.items() if not k.startswith("OS_AUTH_URL")}
    assert isinstance(Auth.from_env(v1), V1Auth)
    pre = {k: v for k, v in v1.items() if not k.startswith("ST_")}
    assert isinstance(Auth.from_env(pre), PreAuth)
    with pytest.raises(AuthenticationFailed):
        Auth.from_env({})
    with pytest.raises(AuthenticationFailed):
        Auth.from_env({"OS_AUTH_URL": "http://127.0.0.1:1/v3", "OS_USERNAME": "u"})


def test_keystone_unreachable_is_reported_without_secrets() -> None:
    from tests.servers.process import free_port

    auth = KeystoneAuth({"OS_AUTH_URL": f"http://127.0.0.1:{free_port()}/v3", "OS_USERNAME": "u",
                         "OS_PASSWORD": "hunter2-secret", "OS_PROJECT_NAME": "p"})
    with pytest.raises(Exception) as err:
        auth.login()
    assert "hunter2" not in str(err.value)


def test_v1_auth_from_st_variables(backend_name: str, target: Target) -> None:
    assert set(target.env) == {"ST_AUTH", "ST_USER", "ST_KEY"}  # what the mount tests use
    b = open_backend(target.url)
    try:
        run(b.check)
        assert isinstance(b, SwiftBackend) and isinstance(b.auth, V1Auth)
    finally:
        b.close()


def test_wrong_key_fails_check_without_leaking(backend_name: str, target: Target,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ST_KEY", "wrong-secret-key")
    b = open_backend(target.url)
    try:
        with pytest.raises(AuthenticationFailed) as err:
            run(b.check)
        assert "wrong-secret-key" not in str(err.value)
    finally:
        b.close()


def test_pre_authenticated_token(backend_name: str, target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    url, token = target.sdk.get_auth()
    for name in ("ST_AUTH", "ST_USER", "ST_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OS_STORAGE_URL", url)
    monkeypatch.setenv("OS_AUTH_TOKEN", token)
    b = open_backend(target.url)
    try:
        run(b.check)
        run(b.put, "pre", Payload.from_bytes(b"p"))
        assert run(b.get_range, "pre") == b"p"
        assert token not in b.describe() and token not in repr(b.auth.login())
    finally:
        b.close()


def test_missing_container_and_bad_urls(backend_name: str, target: Target) -> None:
    b = open_backend("swift://no-such-container-here")
    try:
        with pytest.raises(BucketNotFound):
            run(b.check)
    finally:
        b.close()
    with pytest.raises(ConfigError):
        open_backend("swift://")
    with pytest.raises(ConfigError):
        open_backend("swift://" + "c" * 250)


def wait_until_rejected(target: Target, url: str, token: str, deadline: float = 30) -> None:
    """Bounded wait until Swift refuses ``token`` (tempauth's short token_life ran out)."""
    from swiftclient.client import head_container
    from swiftclient.exceptions import ClientException

    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            head_container(url, token, target.extra["container"])
        except ClientException as exc:
            if exc.http_status == 401:
                return
            raise
        time.sleep(0.25)
    raise AssertionError("the short-lived token was never rejected")


@pytest.fixture
def short_tokens(target: Target, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """``ST_*`` for a proxy whose tempauth tokens live 5 seconds.

    tempauth keeps a token in memcached for ``int(token_life - elapsed)`` seconds, and
    memcached's clock ticks in whole seconds, so a token may vanish up to ~2 s early: a
    renewed token must outlive the requests that retry with it by more than that.
    """
    with target.extra["server"].proxy(token_life=5) as env:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        yield env


def test_token_expiry_reauthenticates_once_for_concurrent_requests(backend_name: str, target: Target,
                                                                    short_tokens: dict[str, str]) -> None:
    b = open_backend(target.url)
    assert isinstance(b, SwiftBackend)
    try:
        run(b.put, "t", Payload.from_bytes(b"t"))
        session = b._current()
        wait_until_rejected(target, session.url, session.token)

        async def many() -> None:
            async with trio.open_nursery() as n:
                for _ in range(8):
                    n.start_soon(b.head, "t")

        run(many)
        assert b.requests["authorize"] == 1
        assert b._current().token != session.token
    finally:
        b.close()
