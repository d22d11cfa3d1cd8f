"""B2-specific checks against the B2 test server: interop with b2sdk, versions, large files,
faults (expired tokens, upload-URL 503s, caps), application keys and the test server itself."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import trio

from cloudfs.backends import Backend, Payload, open_backend
from cloudfs.backends.b2 import B2Backend, mtime_millis
from cloudfs.backends.errors import (
    AuthenticationFailed,
    BucketNotFound,
    ConfigError,
    InvalidName,
    NameTooLong,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    Transient,
)
from tests.servers import Target
from tests.servers.b2 import post_json, sdk_api

pytestmark = pytest.mark.backends("b2")

T = TypeVar("T")
MB = 1000 * 1000


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return trio.run(fn, *args)


def versions(target: Target, name: str) -> list[tuple[str, str]]:
    return [(v.file_name, v.action) for v in target.sdk.list_file_versions(name)]


def sdk_bytes(target: Target, name: str) -> tuple[bytes, dict[str, str]]:
    downloaded = target.sdk.download_file_by_name(name)
    out = io.BytesIO()
    downloaded.save(out)
    return out.getvalue(), dict(downloaded.download_version.file_info)


def stats(target: Target) -> dict[str, int]:
    with urllib.request.urlopen(f"{target.extra['realm']}/cloudfs-test/stats", timeout=10) as resp:
        return json.loads(resp.read())


def faults(target: Target, **plan: Any) -> None:
    post_json(f"{target.extra['realm']}/cloudfs-test/faults", plan)


def delta(before: dict[str, int], after: dict[str, int], op: str) -> int:
    return after.get(op, 0) - before.get(op, 0)


# ------------------------------------------------------------------ interop with b2sdk / the b2 CLI
def test_b2sdk_files_show_size_mtime_and_folders(target: Target, backend: Backend) -> None:
    bucket = target.sdk
    bucket.upload_bytes(b"from the b2 CLI", "cli/file.txt",
                        file_info={"src_last_modified_millis": "1600000000123"})
    bucket.upload_bytes(b"", "cli/webui-folder/.bzEmpty")  # the web UI's "new folder"
    info = run(backend.head, "cli/file.txt")
    assert info.size == len(b"from the b2 CLI")
    assert info.metadata == {"src_last_modified_millis": "1600000000123"}
    assert info.etag == bucket.get_file_info_by_name("cli/file.txt").id_
    assert run(backend.get_range, "cli/file.txt", 9, 6) == b"b2 CLI"

    async def listing() -> tuple[list[str], list[str]]:
        keys: list[str] = []
        prefixes: list[str] = []
        async for page in backend.list("cli/"):
            keys += [o.key for o in page.objects]
            prefixes += page.prefixes
        return keys, prefixes

    assert run(listing) == (["cli/file.txt"], ["cli/webui-folder/"])
    assert run(backend.head, "cli/webui-folder/").size == 0


def test_written_files_download_intact_with_b2sdk(backend: Backend, target: Target) -> None:
    data = os.urandom(123_457)
    run(backend.put, "out/data.bin", Payload.from_bytes(data),
        {"mode": "33188", "mtime": "1700000000.250000000"})
    body, info = sdk_bytes(target, "out/data.bin")
    assert body == data
    # POSIX attributes as the b2 CLI and rclone read them, beside the s3fs-style keys.
    assert info["src_last_modified_millis"] == "1700000000250"
    assert info["mode"] == "33188" and info["mtime"] == "1700000000.250000000"
    version = target.sdk.get_file_info_by_name("out/data.bin")
    assert version.content_sha1 == hashlib.sha1(data).hexdigest()
    # The derived key is not handed back: what cloudfs wrote is what it reads.
    assert run(backend.head, "out/data.bin").metadata == {"mode": "33188", "mtime": "1700000000.250000000"}


def test_large_file_sha1_of_other_tools_is_dropped_with_new_content(backend: Backend, target: Target) -> None:
    sha1 = hashlib.sha1(b"old").hexdigest()
    target.sdk.upload_bytes(b"old", "cli/large", file_info={"large_file_sha1": sha1, "note": "kept"})
    meta = dict(run(backend.head, "cli/large").metadata or {})
    run(backend.set_metadata, "cli/large", {**meta, "mode": "33152"})  # same content: kept
    assert sdk_bytes(target, "cli/large")[1]["large_file_sha1"] == sha1
    run(backend.put, "cli/large", Payload.from_bytes(b"new content"), meta)  # rewritten: dropped
    _, info = sdk_bytes(target, "cli/large")
    assert "large_file_sha1" not in info and info["note"] == "kept"


def test_folder_marker_is_written_as_bzempty(backend: Backend, target: Target) -> None:
    run(backend.put, "dir/", Payload.from_bytes(b""), {"mode": "16877"})
    assert [v.file_name for v, _ in target.sdk.ls("dir/")] == ["dir/.bzEmpty"]
    with pytest.raises(InvalidName):
        run(backend.put, "dir/.bzEmpty", Payload.from_bytes(b"x"), {})


def test_mtime_millis() -> None:
    assert mtime_millis("1700000000.250000000") == "1700000000250"
    assert mtime_millis("-2.500000000") == "-1500"  # s3fs's floor-normalized form of -1.5 s
    assert mtime_millis("1600000000") == "1600000000000"
    assert mtime_millis("2024-01-02T03:04:05Z") is None


# ------------------------------------------------------------------ versions
def test_delete_hides_by_default(backend: Backend, target: Target) -> None:
    run(backend.put, "v/file", Payload.from_bytes(b"one"), {})
    run(backend.delete, "v/file")
    assert versions(target, "v/file") == [("v/file", "hide"), ("v/file", "upload")]
    with pytest.raises(NotFound):
        run(backend.head, "v/file")
    run(backend.delete, "v/file")  # idempotent: already hidden
    run(backend.delete, "v/never")  # and never there
    assert versions(target, "v/file") == [("v/file", "hide"), ("v/file", "upload")]


def test_hard_delete_removes_every_version(target: Target) -> None:
    backend = open_backend(target.url, {**target.options, "b2_hard_delete": ""})
    try:
        for body in (b"one", b"two"):
            run(backend.put, "h/file", Payload.from_bytes(body), {})
        run(backend.set_metadata, "h/file", {"mode": "33152"})  # a copy: a third version
        run(backend.move, "h/file", "h/moved")
        assert versions(target, "h/file") == []
        assert versions(target, "h/moved") == [("h/moved", "upload")]
        run(backend.delete, "h/moved")
        assert versions(target, "h/moved") == []
    finally:
        backend.close()


# ------------------------------------------------------------------ large files and copies
def test_large_file_goes_up_in_parts_with_checked_sha1s(backend: Backend, target: Target) -> None:
    part = backend.capabilities.min_part_size
    data = os.urandom(2 * part + 999)
    before = stats(target)

    async def go() -> None:
        uid = await backend.mpu_create("big/file", {"mode": "33188"})
        parts = []
        async with trio.open_nursery() as n:
            async def one(i: int, off: int, ln: int) -> None:
                parts.append(await backend.mpu_part("big/file", uid, i,
                                                    Payload.from_bytes(data[off:off + ln])))
            for i, off in enumerate(range(0, len(data), part), 1):
                n.start_soon(one, i, off, min(part, len(data) - off))
        await backend.mpu_complete("big/file", uid, parts)

    run(go)
    after = stats(target)
    assert delta(before, after, "upload_part") == 3
    assert delta(before, after, "finish_large_file") == 1
    assert delta(before, after, "upload_file") == 0
    body, info = sdk_bytes(target, "big/file")
    assert body == data and info["mode"] == "33188"
    # The server checks each part's SHA1 against the data, as B2 does.
    s = target.extra["api"].session
    large = s.start_large_file(target.sdk.id_, "big/bad", "b2/x-auto", {})
    url = s.get_upload_part_url(large["fileId"])
    req = urllib.request.Request(url["uploadUrl"], data=b"x" * 10, method="POST", headers={
        "Authorization": url["authorizationToken"], "X-Bz-Part-Number": "1",
        "X-Bz-Content-Sha1": hashlib.sha1(b"y" * 10).hexdigest()})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=10)
    assert exc.value.code == 400 and json.loads(exc.value.read())["code"] == "part_sha1_mismatch"


def test_large_copy_uses_copy_part(backend: Backend, target: Target, monkeypatch: Any) -> None:
    assert isinstance(backend, B2Backend)
    monkeypatch.setattr(backend, "max_single_copy", 1000)
    monkeypatch.setattr(backend, "copy_part_size", backend.capabilities.min_part_size)
    data = os.urandom(backend.capabilities.min_part_size + 4321)
    run(backend.put, "lc/src", Payload.from_bytes(data), {"mode": "33188"})
    before = stats(target)
    run(backend.move, "lc/src", "lc/dst")
    after = stats(target)
    assert delta(before, after, "copy_part") == 2 and delta(before, after, "copy_file") == 0
    body, info = sdk_bytes(target, "lc/dst")
    assert body == data and info["mode"] == "33188"
    with pytest.raises(NotFound):
        run(backend.head, "lc/src")


# ------------------------------------------------------------------ faults
def test_upload_503s_take_a_new_upload_url_at_once(backend: Backend, target: Target) -> None:
    run(backend.put, "f/warm", Payload.from_bytes(b"w"), {})  # one pooled upload URL
    faults(target, fail_uploads=2)
    before = stats(target)
    run(backend.put, "f/file", Payload.from_bytes(b"survives"), {})
    after = stats(target)
    assert delta(before, after, "upload_file") == 3
    assert delta(before, after, "get_upload_url") == 2  # each failed URL was retired
    assert backend.requests["put"] == 1 + 3
    assert sdk_bytes(target, "f/file")[0] == b"survives"


def test_upload_part_503s_are_survived(backend: Backend, target: Target) -> None:
    faults(target, fail_uploads=1)

    async def go() -> None:
        uid = await backend.mpu_create("f/large", {})
        first = Payload.from_bytes(b"a" * backend.capabilities.min_part_size)
        p1 = await backend.mpu_part("f/large", uid, 1, first)
        p2 = await backend.mpu_part("f/large", uid, 2, Payload.from_bytes(b"tail"))
        await backend.mpu_complete("f/large", uid, [p1, p2])

    run(go)
    assert backend.requests["mpu_part"] == 3
    assert sdk_bytes(target, "f/large")[0] == b"a" * backend.capabilities.min_part_size + b"tail"


def test_expired_token_reauthorizes_once(backend: Backend, target: Target) -> None:
    run(backend.put, "t/one", Payload.from_bytes(b"1"), {})
    faults(target, expire_tokens=True)
    before = stats(target)

    async def several() -> None:
        async with trio.open_nursery() as n:
            for _ in range(4):
                n.start_soon(backend.head, "t/one")
            n.start_soon(backend.put, "t/two", Payload.from_bytes(b"2"), {})

    run(several)
    after = stats(target)
    assert backend.requests["authorize"] == 1
    assert delta(before, after, "authorize_account") == 1
    assert sdk_bytes(target, "t/two")[0] == b"2"


def test_caps_are_edquot_and_not_retried(backend: Backend, target: Target) -> None:
    faults(target, cap_exceeded=1)
    with pytest.raises(QuotaExceeded) as exc:
        run(backend.put, "q/file", Payload.from_bytes(b"x"), {})
    assert exc.value.errno == errno.EDQUOT and "cap" in str(exc.value)
    assert backend.requests["put"] == 1


def test_429_and_503_carry_retry_after_to_the_shared_retry(backend: Backend) -> None:
    from b2sdk.v2 import exception as b2exc

    for exc in (b2exc.TooManyRequests(retry_after_seconds="7"),
                b2exc.ServiceError("503 service_unavailable busy", retry_after_seconds="7")):
        mapped = backend._translate(exc)
        assert isinstance(mapped, Transient) and mapped.retry_after == 7 and mapped.backoff


def test_b2_test_mode_header_fails_some_uploads(target: Target) -> None:
    s = target.extra["api"].session
    url = s.get_upload_url(target.sdk.id_)
    codes = []
    for _ in range(2):
        req = urllib.request.Request(url["uploadUrl"], data=b"x", method="POST", headers={
            "Authorization": url["authorizationToken"], "X-Bz-File-Name": "tm", "Content-Type": "b2/x-auto",
            "X-Bz-Content-Sha1": hashlib.sha1(b"x").hexdigest(), "X-Bz-Test-Mode": "fail_some_uploads"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                codes.append(resp.status)
        except urllib.error.HTTPError as err:
            codes.append(err.code)
    assert codes == [503, 200]


# ------------------------------------------------------------------ names, keys, credentials
def test_name_rules(backend: Backend) -> None:
    with pytest.raises(NameTooLong):
        backend.validate_key("a/" + "x" * 251)
    backend.validate_key("a/" + "x" * 250)
    with pytest.raises(InvalidName) as exc:
        backend.validate_key("bad\x7fname")
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(NameTooLong):  # the marker's .bzEmpty counts against the 1024 bytes
        backend.validate_key("/".join(["y" * 203] * 5) + "/")
    backend.validate_key("/".join(["y" * 203] * 5))


def restricted(target: Target, capabilities: list[str], prefix: str | None = None,
               bucket_id: str | None = None) -> dict[str, str]:
    key = target.extra["api"].create_key(capabilities, f"k{os.urandom(4).hex()}",
                                         bucket_id=bucket_id or target.sdk.id_, name_prefix=prefix)
    return {"B2_APPLICATION_KEY_ID": key.id_, "B2_APPLICATION_KEY": key.application_key}


READ_WRITE = ["listBuckets", "listFiles", "readFiles", "writeFiles", "deleteFiles"]


def test_key_restricted_to_bucket_and_prefix(target: Target, monkeypatch: Any, server: Any) -> None:
    for k, v in restricted(target, READ_WRITE, prefix="photos/").items():
        monkeypatch.setenv(k, v)
    ok = open_backend(f"{target.url}/photos", target.options)
    try:
        run(ok.check)
        run(ok.put, "a.jpg", Payload.from_bytes(b"jpg"), {})
        assert sdk_bytes(target, "photos/a.jpg")[0] == b"jpg"
    finally:
        ok.close()
    outside = open_backend(target.url, target.options)
    with pytest.raises(PermissionDenied, match="restricted to names starting with 'photos/'"):
        run(outside.check)
    other = server.new_bucket()
    elsewhere = open_backend(other.url, other.options)
    with pytest.raises(PermissionDenied, match="restricted to bucket"):
        run(elsewhere.check)


def test_missing_capability_is_named(target: Target, monkeypatch: Any) -> None:
    for k, v in restricted(target, ["listBuckets", "listFiles", "readFiles"]).items():
        monkeypatch.setenv(k, v)
    backend = open_backend(target.url, target.options)
    try:
        run(backend.check)
        with pytest.raises(PermissionDenied, match="writeFiles"):
            run(backend.put, "x", Payload.from_bytes(b"x"), {})
    finally:
        backend.close()
    for k, v in restricted(target, ["listBuckets", "readFiles"]).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(PermissionDenied, match="listFiles"):
        run(open_backend(target.url, target.options).check)


def test_bad_credentials_and_missing_bucket(target: Target, monkeypatch: Any) -> None:
    monkeypatch.setenv("B2_APPLICATION_KEY", "not-the-key")
    with pytest.raises(AuthenticationFailed) as exc:
        run(open_backend(target.url, target.options).check)
    assert "not-the-key" not in str(exc.value)
    monkeypatch.undo()
    for k, v in target.env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(BucketNotFound):
        run(open_backend("b2://no-such-bucket", target.options).check)
    with pytest.raises(ConfigError):
        open_backend("b2://x", target.options)
    monkeypatch.delenv("B2_APPLICATION_KEY")
    monkeypatch.setenv("B2_ACCOUNT_INFO", os.devnull + ".missing")
    with pytest.raises(AuthenticationFailed, match="B2_APPLICATION_KEY_ID"):
        open_backend(target.url, target.options)


def test_b2_cli_account_info_file(target: Target, monkeypatch: Any, tmp_path: Any) -> None:
    from b2sdk.v2 import B2Api, SqliteAccountInfo

    path = tmp_path / "b2_account_info"
    api = B2Api(SqliteAccountInfo(file_name=str(path)))
    api.authorize_account(target.extra["realm"], target.env["B2_APPLICATION_KEY_ID"],
                          target.env["B2_APPLICATION_KEY"])  # what `b2 account authorize` does
    monkeypatch.delenv("B2_APPLICATION_KEY_ID")
    monkeypatch.delenv("B2_APPLICATION_KEY")
    monkeypatch.setenv("B2_ACCOUNT_INFO", str(path))
    backend = open_backend(target.url, {})  # the realm comes from the file too
    try:
        run(backend.put, "cli", Payload.from_bytes(b"c"), {})
        assert sdk_bytes(target, "cli")[0] == b"c"
    finally:
        backend.close()


def test_session_kept_private_in_state_dir(target: Target, tmp_path: Any) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    first = open_backend(target.url, target.options)
    first.use_state_dir(str(state))
    run(first.check)
    saved = state / "b2_account.json"
    assert saved.stat().st_mode & 0o777 == 0o600
    assert target.env["B2_APPLICATION_KEY"] not in saved.read_text()
    second = open_backend(target.url, target.options)
    second.use_state_dir(str(state))
    before = stats(target)
    run(second.check)
    assert delta(before, stats(target), "authorize_account") == 0  # the saved session is reused
    first.close()
    second.close()


def test_sdk_can_talk_to_the_server_as_a_realm(target: Target) -> None:
    api = sdk_api(target.extra["realm"])
    assert target.extra["bucket"] in [b.name for b in api.list_buckets()]
