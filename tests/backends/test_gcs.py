"""GCS-specific checks against fake-gcs-server: interop with other GCS tools, composite uploads, errors."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import trio

from cloudfs.backends import Backend, Payload, open_backend
from cloudfs.backends.base import RetryPolicy
from cloudfs.backends.errors import (
    BackendError,
    BucketNotFound,
    ConfigError,
    InvalidName,
    NameTooLong,
    NotFound,
    PreconditionFailed,
    Transient,
)
from tests.servers import Target
from tests.servers.process import free_port

pytestmark = pytest.mark.backends("gcs")

T = TypeVar("T")


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return trio.run(fn, *args)


def sdk_bucket(target: Target) -> Any:
    return target.sdk.bucket(target.extra["bucket"])


def leftover_parts(target: Target, prefix: str = "") -> list[str]:
    return [b.name for b in target.sdk.list_blobs(target.extra["bucket"], prefix=prefix + ".cloudfs-parts/")]


# ------------------------------------------------------------------ interop with other tools
INTEROP_METADATA = {
    "gcsfuse": {"gcsfuse_mtime": "2024-01-02T03:04:05.123456789Z"},
    "gsutil": {"goog-reserved-file-mtime": "1700000000", "goog-reserved-posix-mode": "644",
               "goog-reserved-posix-uid": "1000", "goog-reserved-posix-gid": "1000"},
    "rclone": {"mtime": "2024-01-02T03:04:05.123456789+00:00"},
}


def test_objects_from_other_tools_keep_their_metadata(backend_name: str, target: Target,
                                                      backend: Backend) -> None:
    bucket = sdk_bucket(target)
    for tool, meta in INTEROP_METADATA.items():
        blob = bucket.blob(f"tools/{tool}.txt")
        blob.metadata = meta
        blob.upload_from_string(f"written by {tool}".encode(), content_type="text/plain")
    bucket.blob("tools/dir/").upload_from_string(b"")  # a gcsfuse / Console folder marker

    for tool, meta in INTEROP_METADATA.items():
        info = run(backend.head, f"tools/{tool}.txt")
        assert info.metadata == meta
        assert info.size == len(f"written by {tool}")
        assert info.etag == str(bucket.get_blob(f"tools/{tool}.txt").generation)
        assert run(backend.get_range, f"tools/{tool}.txt", 11) == tool.encode()

    async def listing() -> tuple[dict[str, Any], list[str]]:
        objs: dict[str, Any] = {}
        prefixes: list[str] = []
        async for page in backend.list("tools/"):
            objs.update({o.key: o for o in page.objects})
            prefixes += page.prefixes
        return objs, prefixes

    objs, prefixes = run(listing)
    assert prefixes == ["tools/dir/"]
    assert sorted(objs) == [f"tools/{t}.txt" for t in sorted(INTEROP_METADATA)]
    for tool, meta in INTEROP_METADATA.items():
        assert objs[f"tools/{tool}.txt"].metadata == meta  # listings carry metadata: no HEAD needed
    assert run(backend.head, "tools/dir/").size == 0


def test_what_the_backend_writes_reads_back_with_the_sdk(backend_name: str, target: Target,
                                                         backend: Backend, tmp_path: Any) -> None:
    bucket = sdk_bucket(target)
    etag = run(backend.put, "w/small", Payload.from_bytes(b"small body"), {"mode": "33188"})
    blob = bucket.get_blob("w/small")
    assert blob.download_as_bytes() == b"small body"
    assert blob.metadata == {"mode": "33188"}
    assert etag == str(blob.generation)

    # Larger than one resumable chunk: goes through a resumable upload session.
    big = os.urandom(9 * 1024 * 1024 + 3)
    src = tmp_path / "big"
    src.write_bytes(b"head" + big)
    etag = run(backend.put, "w/big", Payload.from_file(str(src), 4), {"k": "v"})
    blob = bucket.get_blob("w/big")
    assert blob.size == len(big) and blob.download_as_bytes() == big
    assert etag == str(blob.generation)

    # Metadata replacement is complete (removed keys vanish) and keeps the generation.
    new = run(backend.set_metadata, "w/small", {"uid": "1000"})
    blob = bucket.get_blob("w/small")
    assert blob.metadata == {"uid": "1000"}
    assert new == str(blob.generation)
    run(backend.copy, "w/small", "w/copy", {"mode": "33261"})
    assert bucket.get_blob("w/copy").metadata == {"mode": "33261"}
    assert bucket.get_blob("w/copy").download_as_bytes() == b"small body"
    run(backend.delete, "w/copy")
    assert bucket.get_blob("w/copy") is None


def test_prefix_mount(backend_name: str, target: Target) -> None:
    b = open_backend(target.url + "/some/prefix", target.options)
    try:
        run(b.put, "f", Payload.from_bytes(b"x"), {})
        assert sdk_bucket(target).get_blob("some/prefix/f") is not None
        keys: list[str] = []

        async def go() -> None:
            async for page in b.list(""):
                keys.extend(o.key for o in page.objects)

        run(go)
        assert keys == ["f"]
        assert run(b.head, "f").key == "f"
    finally:
        b.close()


def test_stale_generation_on_read(backend_name: str, target: Target, backend: Backend) -> None:
    old = run(backend.put, "g", Payload.from_bytes(b"one"), {})
    new = run(backend.put, "g", Payload.from_bytes(b"two"), {})
    assert old != new
    assert run(backend.get_range, "g", 0, None, new) == b"two"
    with pytest.raises(PreconditionFailed):
        run(backend.get_range, "g", 0, None, old)
    with pytest.raises(PreconditionFailed):
        run(backend.get_range, "g", 1, 1, '"some-md5-etag"')
    assert run(backend.get_range, "g", 3) == b""  # at EOF: nothing, not an error


# ------------------------------------------------------------------ composite uploads
def test_composite_upload_with_more_than_32_parts(backend_name: str, target: Target,
                                                  backend: Backend) -> None:
    chunks = [os.urandom(1000 + i) for i in range(70)]  # 70 parts: a two-level compose tree

    async def go() -> None:
        uid = await backend.mpu_create("cmp/obj", {"mode": "33188", "gcsfuse_mtime": "x"})
        parts = []
        send, recv = trio.open_memory_channel[int](len(chunks))
        for i in range(len(chunks)):
            send.send_nowait(i)
        send.close()

        async def worker() -> None:
            async for i in recv:
                parts.append(await backend.mpu_part("cmp/obj", uid, i + 1, Payload.from_bytes(chunks[i])))

        async with trio.open_nursery() as n:
            for _ in range(8):
                n.start_soon(worker)
        # Parts are invisible in listings of the user's folders while the upload runs.
        page = await backend.list_page("")
        assert page.prefixes == [] and page.objects == []
        with pytest.raises(NotFound):
            await backend.head("cmp/obj")
        await backend.mpu_complete("cmp/obj", uid, parts)

    run(go)
    blob = sdk_bucket(target).get_blob("cmp/obj")
    assert blob.download_as_bytes() == b"".join(chunks)
    assert blob.metadata == {"mode": "33188", "gcsfuse_mtime": "x"}
    assert run(backend.head, "cmp/obj").etag == str(blob.generation)
    assert leftover_parts(target) == []


def test_composite_upload_parts_carry_recovery_info(backend_name: str, target: Target,
                                                    backend: Backend) -> None:
    """Another process (a fresh backend) can finish an upload from what the part objects hold."""

    async def start() -> tuple[str, list[Any]]:
        uid = await backend.mpu_create("rec/obj", {"mode": "33152"})
        parts = [await backend.mpu_part("rec/obj", uid, n, Payload.from_bytes(bytes([64 + n]) * 10))
                 for n in (1, 2)]
        return uid, parts

    uid, parts = run(start)
    assert len(leftover_parts(target)) == 2
    other = open_backend(target.url, target.options)
    try:
        run(other.mpu_complete, "rec/obj", uid, parts)
    finally:
        other.close()
    assert run(backend.get_range, "rec/obj") == b"A" * 10 + b"B" * 10
    assert run(backend.head, "rec/obj").metadata == {"mode": "33152"}
    assert leftover_parts(target) == []


def test_composite_abort_removes_parts(backend_name: str, target: Target, backend: Backend) -> None:
    async def go() -> None:
        uid = await backend.mpu_create("ab/obj", {})
        for n in range(1, 4):
            await backend.mpu_part("ab/obj", uid, n, Payload.from_bytes(b"p" * 50))
        assert len(leftover_parts(target)) == 3
        await backend.mpu_abort("ab/obj", uid)
        await backend.mpu_abort("ab/obj", uid)  # idempotent

    run(go)
    assert leftover_parts(target) == []
    with pytest.raises(NotFound):
        run(backend.head, "ab/obj")


def test_parts_folder_is_reserved(backend_name: str, target: Target, backend: Backend) -> None:
    with pytest.raises(InvalidName):
        run(backend.put, ".cloudfs-parts/x", Payload.from_bytes(b""), {})
    with pytest.raises(InvalidName):
        run(backend.put, "bad\nname", Payload.from_bytes(b""), {})


# ------------------------------------------------------------------ errors
def test_missing_bucket(backend_name: str, target: Target) -> None:
    b = open_backend("gs://cloudfs-no-such-bucket", target.options)
    try:
        with pytest.raises(BucketNotFound):
            run(b.check)
    finally:
        b.close()


def test_closed_port_fails_fast(backend_name: str, target: Target) -> None:
    from cloudfs.backends.gcs import GCSBackend

    port = free_port()  # nothing listens here
    b = GCSBackend(target.extra["bucket"], endpoint=f"http://127.0.0.1:{port}",
                   retry=RetryPolicy(attempts=2, initial_delay=0.01, max_delay=0.05, call_timeout=5))
    try:
        t0 = time.monotonic()
        with pytest.raises(BackendError) as err:
            run(b.head, "x")
        assert isinstance(err.value, Transient)
        with pytest.raises(Transient):
            run(b.put, "x", Payload.from_bytes(b"x"), {})
        assert time.monotonic() - t0 < 10
    finally:
        b.close()


def test_key_too_long(backend_name: str, target: Target, backend: Backend) -> None:
    with pytest.raises(NameTooLong):
        run(backend.put, "k" * 1025, Payload.from_bytes(b""), {})
    run(backend.put, "k" * 1024, Payload.from_bytes(b"ok"), {})  # exactly the limit is fine
    b = open_backend(target.url + "/pfx", target.options)
    try:  # the mount prefix counts towards the limit
        with pytest.raises(NameTooLong):
            run(b.put, "k" * 1021, Payload.from_bytes(b""), {})
    finally:
        b.close()


def test_options(backend_name: str, target: Target) -> None:
    with pytest.raises(ConfigError):
        open_backend(target.url, {"access_key": "x"})
    with pytest.raises(ConfigError):
        open_backend("gs:///nobucket", {})
    with pytest.raises(ConfigError):
        open_backend("gs://Not_A_Bucket!", {})
    b = open_backend(target.url, {"endpoint": target.extra["endpoint"], "project": "p", "anonymous": "1"})
    try:
        run(b.check)
        assert b.describe().startswith(target.url + "/")
    finally:
        b.close()
