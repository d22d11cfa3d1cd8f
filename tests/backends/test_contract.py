"""Backend contract: every backend, against its real server, behaves the same through the interface."""

from __future__ import annotations

import io
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import trio

from cloudfs.backends import Backend, Payload
from cloudfs.backends.errors import NameTooLong, NotFound, NotSupported, PreconditionFailed

T = TypeVar("T")


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return trio.run(fn, *args)


def put(b: Backend, key: str, data: bytes, meta: dict[str, str] | None = None) -> str:
    return run(b.put, key, Payload.from_bytes(data), meta or {})


def list_all(b: Backend, prefix: str, delimiter: str | None = "/", limit: int = 1000
             ) -> tuple[list[str], list[str]]:
    async def go() -> tuple[list[str], list[str]]:
        keys: list[str] = []
        prefixes: list[str] = []
        async for page in b.list(prefix, delimiter, limit):
            keys += [o.key for o in page.objects]
            prefixes += page.prefixes
        return keys, prefixes

    return run(go)


def test_bucket_check(backend: Backend) -> None:
    run(backend.check)


def test_put_head_get(backend: Backend) -> None:
    etag = put(backend, "dir/hello.txt", b"hello world", {"mode": "33188", "mtime": "1700000000.5"})
    info = run(backend.head, "dir/hello.txt")
    assert info.key == "dir/hello.txt"
    assert info.size == 11
    assert info.etag == etag
    assert info.metadata == {"mode": "33188", "mtime": "1700000000.5"}
    assert info.mtime is not None and abs(info.mtime - __import__("time").time()) < 3600
    assert run(backend.get_range, "dir/hello.txt") == b"hello world"
    assert run(backend.get_range, "dir/hello.txt", 6, 5) == b"world"
    assert run(backend.get_range, "dir/hello.txt", 6) == b"world"


def test_download_streams_into_file(backend: Backend, tmp_path: Any) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    put(backend, "big", data)
    out = io.BytesIO()
    run(backend.download, "big", out, 1024 * 1024, 1024 * 1024 + 5)
    assert out.getvalue() == data[1024 * 1024: 2 * 1024 * 1024 + 5]


def test_put_from_file_range(backend: Backend, tmp_path: Any) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"0123456789")
    run(backend.put, "ranged", Payload.from_file(str(src), 2, 5))
    assert run(backend.get_range, "ranged") == b"23456"


def test_missing_object(backend: Backend) -> None:
    with pytest.raises(NotFound):
        run(backend.head, "nope")
    with pytest.raises(NotFound):
        run(backend.get_range, "nope", 0, 10)
    run(backend.delete, "nope")  # idempotent


def test_listing_with_delimiter_and_markers(backend: Backend) -> None:
    put(backend, "a/1", b"1")
    put(backend, "a/2", b"22")
    put(backend, "a/sub/x", b"x")
    put(backend, "a/empty/", b"")
    put(backend, "b", b"b")
    keys, prefixes = list_all(backend, "")
    assert keys == ["b"]
    assert prefixes == ["a/"]
    keys, prefixes = list_all(backend, "a/")
    assert keys == ["a/1", "a/2"]
    assert sorted(prefixes) == ["a/empty/", "a/sub/"]
    keys, _ = list_all(backend, "a/empty/")
    assert keys == ["a/empty/"]  # the marker lists itself, as on S3
    keys, prefixes = list_all(backend, "", None)
    assert keys == ["a/1", "a/2", "a/empty/", "a/sub/x", "b"]
    assert prefixes == []
    info = run(backend.head, "a/empty/")
    assert info.size == 0


def test_listing_pages(backend: Backend) -> None:
    names = [f"p/{i:03d}" for i in range(25)]

    async def fill() -> None:
        async with trio.open_nursery() as n:
            for k in names:
                n.start_soon(backend.put, k, Payload.from_bytes(b"x"), {})

    run(fill)

    async def pages() -> list[int]:
        sizes = []
        async for page in backend.list("p/", "/", 10):
            sizes.append(len(page.objects))
        return sizes

    sizes = run(pages)
    assert sum(sizes) == 25 and len(sizes) >= 3
    keys, _ = list_all(backend, "p/", "/", 10)
    assert keys == names


def test_head_many_answers_as_head_does_and_leaves_out_missing_keys(backend: Backend) -> None:
    """Batches (``HEAD_BATCH`` keys per worker-thread call) over more keys than one batch
    holds: every stored key answered as ``head`` answers it, missing ones left out, one
    ``head`` request per key."""
    from cloudfs.backends.base import HEAD_BATCH

    stored = [f"hm/{i:03d}" for i in range(HEAD_BATCH + 7)]

    async def fill() -> None:
        async with trio.open_nursery() as n:
            for i, k in enumerate(stored):
                n.start_soon(backend.put, k, Payload.from_bytes(b"x" * i), {"mode": "33188"})

    run(fill)
    missing = ["hm/missing-1", "hm/missing-2"]
    before = backend.requests["head"]
    got = run(backend.head_many, stored + missing, 2)
    assert backend.requests["head"] - before == len(stored) + len(missing)
    assert sorted(got) == stored
    for key in (stored[0], stored[-1]):
        assert got[key] == run(backend.head, key)
    assert run(backend.head_many, [], 4) == {}


def test_copy_and_metadata(backend: Backend) -> None:
    put(backend, "src", b"payload", {"mode": "33188"})
    run(backend.copy, "src", "dst")
    assert run(backend.get_range, "dst") == b"payload"
    assert run(backend.head, "dst").metadata == {"mode": "33188"}
    run(backend.copy, "src", "dst2", {"mode": "33261"})
    assert run(backend.head, "dst2").metadata == {"mode": "33261"}
    run(backend.set_metadata, "src", {"mode": "33152", "uid": "1000"})
    assert run(backend.head, "src").metadata == {"mode": "33152", "uid": "1000"}
    assert run(backend.get_range, "src") == b"payload"


def test_delete_many(backend: Backend) -> None:
    for i in range(5):
        put(backend, f"d/{i}", b"x")
    run(backend.delete_many, [f"d/{i}" for i in range(5)] + ["d/missing"])
    keys, prefixes = list_all(backend, "d/")
    assert keys == [] and prefixes == []


@pytest.mark.backends("s3", "seaweed")
def test_folders_after_deletes(backend: Backend) -> None:
    # A folder without a marker ends with its last object; one with a marker stays, and its
    # marker goes (in one batch with what is below it) only with everything below it.
    for key in ("implicit/deep/x", "marked/", "marked/x", "tree/", "tree/sub/", "tree/sub/x", "tree/y"):
        put(backend, key, b"" if key.endswith("/") else b"x")
    run(backend.delete, "implicit/deep/x")
    run(backend.delete_many, ["marked/x", "tree/", "tree/sub/", "tree/sub/x", "tree/y"])
    assert list_all(backend, "") == ([], ["marked/"])
    assert list_all(backend, "marked/") == (["marked/"], [])
    assert list_all(backend, "", None) == (["marked/"], [])
    with pytest.raises(NotFound):
        run(backend.head, "implicit/")


def test_multipart_upload(backend: Backend, tmp_path: Any) -> None:
    part = max(backend.capabilities.min_part_size, 1024 * 1024)
    data = os.urandom(2 * part + 1234)
    src = tmp_path / "src"
    src.write_bytes(data)

    async def go() -> None:
        uid = await backend.mpu_create("mp/obj", {"mode": "33188"})
        parts = []
        async with trio.open_nursery() as n:
            async def one(i: int, off: int, ln: int) -> None:
                parts.append(await backend.mpu_part("mp/obj", uid, i, Payload.from_file(str(src), off, ln)))
            n.start_soon(one, 2, part, part)
            n.start_soon(one, 1, 0, part)
            n.start_soon(one, 3, 2 * part, 1234)
        # not visible before completion: nothing half-written is exposed
        with pytest.raises(NotFound):
            await backend.head("mp/obj")
        await backend.mpu_complete("mp/obj", uid, parts)

    run(go)
    assert run(backend.get_range, "mp/obj") == data
    assert run(backend.head, "mp/obj").metadata == {"mode": "33188"}


def test_an_upload_opened_by_a_killed_process_can_be_continued(target: Any, tmp_path: Any) -> None:
    """The cache continues a multipart upload left open by a killed mount (cache/uploader.py):
    a new backend on the same state directory resumes it and its first parts still count."""
    from cloudfs.backends import open_backend

    state = str(tmp_path / "state")
    os.makedirs(state, mode=0o700)
    first = open_backend(target.url, target.options)
    part = max(first.capabilities.min_part_size, 1024 * 1024)
    one, two = os.urandom(part), os.urandom(1000)
    try:
        first.use_state_dir(state)
        run(first.check)
        uid = run(first.mpu_create, "mp/resumed", {"mode": "33188"})
        p1 = run(first.mpu_part, "mp/resumed", uid, 1, Payload.from_bytes(one))
    finally:
        first.close()  # "killed": neither completed nor aborted
    second = open_backend(target.url, target.options)
    try:
        second.use_state_dir(state)
        run(second.check)

        async def go() -> None:
            await second.recover([uid])
            await second.mpu_resume("mp/resumed", uid, {"mode": "33188"})
            p2 = await second.mpu_part("mp/resumed", uid, 2, Payload.from_bytes(two))
            await second.mpu_complete("mp/resumed", uid, [p1, p2])

        run(go)
        assert run(second.get_range, "mp/resumed") == one + two
        assert run(second.head, "mp/resumed").metadata == {"mode": "33188"}
    finally:
        second.close()


def test_multipart_abort(backend: Backend) -> None:
    async def go() -> None:
        uid = await backend.mpu_create("mp/aborted", {})
        await backend.mpu_part("mp/aborted", uid, 1, Payload.from_bytes(b"x" * 100))
        await backend.mpu_abort("mp/aborted", uid)

    run(go)
    with pytest.raises(NotFound):
        run(backend.head, "mp/aborted")


def test_multipart_part_copy(backend: Backend) -> None:
    part = max(backend.capabilities.min_part_size, 1024 * 1024)
    base = os.urandom(2 * part)
    put(backend, "pc/src", base)
    if not backend.capabilities.part_copy:
        # The capability is honest: the uploader re-uploads unchanged ranges instead.
        async def refused() -> None:
            uid = await backend.mpu_create("pc/dst", {})
            try:
                await backend.mpu_part_copy("pc/dst", uid, 1, "pc/src", 0, part)
            finally:
                await backend.mpu_abort("pc/dst", uid)

        with pytest.raises(NotSupported):
            run(refused)
        return

    async def go() -> None:
        uid = await backend.mpu_create("pc/dst", {})
        p1 = await backend.mpu_part_copy("pc/dst", uid, 1, "pc/src", 0, part)
        p2 = await backend.mpu_part("pc/dst", uid, 2, Payload.from_bytes(b"new tail"))
        await backend.mpu_complete("pc/dst", uid, [p1, p2])

    run(go)
    assert run(backend.get_range, "pc/dst") == base[:part] + b"new tail"


def test_conditional_put(backend: Backend) -> None:
    assert backend.capabilities.conditional_writes, "every cloudfs backend detects conflicting writers"
    etag = put(backend, "c", b"v1")
    with pytest.raises(PreconditionFailed):
        run(lambda: backend.put("c", Payload.from_bytes(b"v2"), {}, if_none_match=True))
    with pytest.raises(PreconditionFailed):
        run(lambda: backend.put("c", Payload.from_bytes(b"v2"), {}, if_match='"not-the-etag"'))
    run(lambda: backend.put("c", Payload.from_bytes(b"v2"), {}, if_match=etag))
    assert run(backend.get_range, "c") == b"v2"


def test_name_too_long(backend: Backend) -> None:
    with pytest.raises(NameTooLong):
        put(backend, "x" * (backend.capabilities.max_key_bytes + 1), b"")


def test_unicode_keys(backend: Backend) -> None:
    key = "ünïcødé/файл 名前 😀.txt"
    put(backend, key, b"u")
    keys, prefixes = list_all(backend, "")
    assert prefixes == ["ünïcødé/"]
    keys, _ = list_all(backend, "ünïcødé/")
    assert keys == [key]
    assert run(backend.get_range, key) == b"u"
