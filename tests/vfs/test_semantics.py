"""tests that docs/semantics.md names: its in-process claims (the VFS driven directly).

Request counts come from the backend's own counter (``backend.requests``), so a test sees
every request the file system sent to the store.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest
import trio

from cloudfs import layout
from cloudfs.backends.errors import BackendError
from cloudfs.inodes import ROOT_INODE
from cloudfs.vfs import SetAttr
from tests.vfs.conftest import BS, CTX, FS, Rig, run

CONFLICT = re.compile(r"^(?P<name>.+)\.conflict-\d{8}-\d{6}-[0-9a-f]{6}$")


def sent(fs: FS) -> int:
    """Requests sent to the store so far."""
    return sum(fs.backend.requests.values())


def failing(fs: FS, *names: str) -> None:
    """The store stops answering these operations (as when it is unreachable)."""
    for name in names:
        async def down(*args: Any, _name: str = name) -> Any:
            fs.backend.requests[_name] += 1
            raise BackendError(f"{_name}: the store is unreachable")

        setattr(fs.backend, name, down)


async def wait_stored(fs: FS, key: str, data: bytes) -> None:
    with trio.fail_after(30):
        while await fs.stored(key) != data:
            await trio.sleep(0.05)


# ---------------------------------------------------------------------- writing
def test_release_without_flush_schedules_the_upload(rig: Rig) -> None:
    """An NFS-exported mount never sends FLUSH: RELEASE alone gets the file uploaded."""
    async def main() -> None:
        async with rig.mounted(writeback_delay=0.2) as fs:
            fh = await fs.create("nfs")
            await fs.write(fh, 0, b"via nfsd")
            await fs.vfs.release(fh)  # no flush before it
            await wait_stored(fs, "nfs", b"via nfsd")
            with trio.fail_after(30):  # the object is on the store just before its upload returns
                while fs.cache.pending:
                    await trio.sleep(0.01)

    run(main)


def test_writers_get_enospc_only_when_no_upload_finishes(rig: Rig) -> None:
    """A full cache with a dead store: writers wait; only after the stall timeout with no
    upload finished do they get ENOSPC (never a hang, never an early error)."""
    async def main() -> None:
        async with rig.mounted(crash=True, cache_size=8 * BS, max_dirty=8 * BS, writeback_delay=0.0) as fs:
            fs.cache.stall_timeout = 0.5
            fh = await fs.create("big")
            failing(fs, "put", "mpu_create", "mpu_part", "head")
            written = 0
            with pytest.raises(OSError) as exc, trio.fail_after(30):
                for off in range(0, 64 * BS, BS):
                    written += await fs.write(fh, off, b"x" * BS)
            assert exc.value.errno == errno.ENOSPC
            assert written >= 7 * BS  # everything the cache holds was accepted first
            assert fs.backend.requests["head"] + fs.backend.requests["put"] > 0  # the uploader was woken

    run(main)


def test_a_cache_disk_fuller_than_min_free_gives_enospc_at_once(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """The cache file system is below ``min_free`` by more than the cache holds: nothing the
    mount can evict or upload makes room, so a write gets ENOSPC at once, with one log line,
    instead of waiting for a change that cannot come."""
    async def main() -> None:
        async with rig.mounted(min_free=1 << 40) as fs:
            fs.cache.stall_timeout = 3600.0  # an ENOSPC within the guard below is not the stall
            fh = await fs.create("f")
            with caplog.at_level(logging.INFO, logger="cloudfs.cache.block_cache"):
                with pytest.raises(OSError) as exc, trio.fail_after(30):
                    await fs.write(fh, 0, b"x" * BS)
            assert exc.value.errno == errno.ENOSPC
            assert len([r for r in caplog.records if "min_free" in r.getMessage()]) == 1
            assert not [r for r in caplog.records if "waiting for uploads" in r.getMessage()]

    run(main)


def test_a_multipart_upload_is_visible_only_when_complete(rig: Rig) -> None:
    """A part fails: the object does not appear (no partial object); the next round
    completes it.  Given up (unlink), the open upload is aborted."""
    async def main() -> None:
        data = os.urandom(40 * BS)
        async with rig.mounted() as fs:
            fs.uploader._part_size = lambda size, streaming=False: 8 * BS  # type: ignore[method-assign]
            real_part = fs.backend.mpu_part
            calls = {"n": 0}

            async def flaky_part(*args: Any) -> Any:
                calls["n"] += 1
                if calls["n"] == 3:
                    raise BackendError("part 3 failed")
                return await real_part(*args)

            fs.backend.mpu_part = flaky_part  # type: ignore[method-assign]
            await fs.write_file("big", data)
            file = fs.cache.by_key["big"]
            with pytest.raises(BackendError):
                await fs.uploader.flush(file)
            assert await fs.stored("big") is None
            assert await fs.keys() == []
            await fs.sync()
            assert await fs.stored("big") == data
            # a second file left with an open upload, then unlinked: the upload is aborted
            calls["n"] = 0
            await fs.write_file("doomed", data)
            with pytest.raises(BackendError):
                await fs.uploader.flush(fs.cache.by_key["doomed"])
            aborts = fs.backend.requests["mpu_abort"]
            await fs.unlink("doomed")
            assert fs.backend.requests["mpu_abort"] == aborts + 1
            assert await fs.stored("doomed") is None

    run(main)


def test_uploads_that_cannot_finish_stay_for_the_next_mount(rig: Rig) -> None:
    """The store is unreachable at unmount: the data stays in the cache directory and the
    next mount with it uploads it."""
    async def main() -> None:
        async with rig.mounted() as fs:
            await fs.write_file("kept", b"not lost")
            failing(fs, "put", "head")
            failed = await fs.uploader.flush_all()
            assert [f.key for f in failed] == ["kept"]
            fs.crashed = True  # the daemon exits without having uploaded it
        async with rig.mounted() as fs:
            assert await fs.stored("kept") is None
            await fs.sync()
            assert await fs.stored("kept") == b"not lost"

    run(main)


# ---------------------------------------------------------------------- metadata caching
def test_metadata_and_missing_names_are_cached_for_attr_timeout(rig: Rig) -> None:
    async def main() -> None:
        async with rig.mounted(attr_timeout=1.0) as fs:
            await fs.other_tool_puts("f", b"one")
            assert (await fs.stat("f")).size == 3
            assert await fs.lookup("missing") is None
            await fs.other_tool_puts("f", b"longer")
            await fs.other_tool_puts("missing", b"now here")
            before = sent(fs)
            assert (await fs.stat("f")).size == 3  # remembered
            assert await fs.lookup("missing") is None  # remembered as missing
            assert sent(fs) == before
            await trio.sleep(1.1)  # attr_timeout passed
            assert (await fs.stat("f")).size == 6
            assert await fs.read_file("missing") == b"now here"

    run(main)


def test_a_folder_listed_or_created_here_answers_missing_names_without_a_request(rig: Rig) -> None:
    async def main() -> None:
        async with rig.mounted(attr_timeout=30.0) as fs:
            await fs.other_tool_puts("listed/a", b"a")
            await fs.mkdir("made")
            assert await fs.listdir("listed") == ["a"]
            before = sent(fs)
            assert await fs.lookup("made/nothing") is None
            assert await fs.lookup("listed/nothing") is None
            assert (await fs.stat("listed/a")).size == 1
            assert sent(fs) == before
            await fs.write_file("made/new", b"n")  # a create in a folder made here asks nothing
            assert sent(fs) == before

    run(main)


# ---------------------------------------------------------------------- conflicts
def test_conflict_copy_is_named_and_logged(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Changed on the server, or created there by someone else, while local changes were
    pending: the server's version keeps the name, ours is NAME.conflict-..., a warning says so."""
    async def main() -> None:
        async with rig.mounted() as fs:
            await fs.write_file("doc", b"base")
            await fs.sync()
            await fs.write_file("doc", b"ours")
            await fs.other_tool_puts("doc", b"theirs")
            await fs.write_file("new", b"mine")  # never uploaded; someone else creates it
            await fs.other_tool_puts("new", b"someone else's")
            with caplog.at_level(logging.WARNING):
                await fs.sync()
            keys = await fs.keys()
            assert await fs.stored("doc") == b"theirs"
            assert await fs.stored("new") == b"someone else's"
            copies = {m["name"]: k for k in keys if (m := CONFLICT.match(k))}
            assert sorted(copies) == ["doc", "new"], keys
            assert await fs.stored(copies["doc"]) == b"ours"
            assert await fs.stored(copies["new"]) == b"mine"
            warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any(copies["doc"] in m for m in warned) and any(copies["new"] in m for m in warned)

    run(main)


def test_conflict_copy_has_zeros_for_bytes_never_cached(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        data = os.urandom(4 * BS)
        async with rig.mounted() as fs:
            await fs.other_tool_puts("big", data)  # nothing of it cached here
            fh = await fs.open("big", os.O_WRONLY)
            await fs.write(fh, 0, b"X" * BS)  # the whole first block: nothing fetched
            await fs.release(fh)
            await fs.other_tool_puts("big", b"replaced")
            with caplog.at_level(logging.WARNING):
                await fs.sync()
            copy = [k for k in await fs.keys() if CONFLICT.match(k)]
            assert len(copy) == 1
            assert await fs.stored(copy[0]) == b"X" * BS + bytes(3 * BS)
            assert any("zeros" in r.getMessage() and copy[0] in r.getMessage() for r in caplog.records
                       if r.levelno >= logging.WARNING)

    run(main)


# ---------------------------------------------------------------------- names
def test_never_uploaded_file_is_renamed_without_a_request(rig: Rig) -> None:
    async def main() -> None:
        async with rig.mounted() as fs:
            await fs.write_file("draft", b"local only")
            assert await fs.lookup("final") is None  # the kernel looks the new name up first
            before = sent(fs)
            await fs.rename("draft", "final")
            assert sent(fs) == before
            assert await fs.read_file("final") == b"local only"
        async with rig.mounted() as fs:
            assert await fs.keys() == ["final"]
            assert await fs.stored("final") == b"local only"

    run(main)


def test_rename_flags(rig: Rig) -> None:
    """RENAME_NOREPLACE is honoured; RENAME_EXCHANGE and RENAME_WHITEOUT fail with EINVAL."""
    async def main() -> None:
        async with rig.mounted() as fs:
            await fs.write_file("a", b"a")
            await fs.write_file("b", b"b")
            for flags in (2, 4):  # RENAME_EXCHANGE, RENAME_WHITEOUT
                with pytest.raises(OSError) as exc:
                    await fs.rename("a", "b", flags=flags)
                assert exc.value.errno == errno.EINVAL
            with pytest.raises(OSError) as exc:
                await fs.rename("a", "b", flags=1)  # RENAME_NOREPLACE onto an existing name
            assert exc.value.errno == errno.EEXIST
            await fs.rename("a", "c", flags=1)
            assert await fs.read_file("c") == b"a" and await fs.read_file("b") == b"b"

    run(main)


def test_interrupted_directory_rename_is_finished_by_the_next_mount(rig: Rig) -> None:
    """Killed after the copies, before the old keys were deleted: the journaled intent is
    replayed by the next mount, which leaves only the new names."""
    async def main() -> None:
        async with rig.mounted() as fs:
            await fs.mkdir("d")
            await fs.write_file("d/one", b"1")
            await fs.mkdir("d/sub")
            await fs.write_file("d/sub/two", b"2")
        async with rig.mounted(crash=True) as fs:
            failing(fs, "delete_many")
            with pytest.raises(BackendError):
                await fs.rename("d", "e")
            keys = await fs.keys()
            assert "d/one" in keys and "e/one" in keys  # copied first; the crash came before the deletes
        async with rig.mounted() as fs:
            keys = await fs.keys()
            assert not [k for k in keys if k.startswith("d/")], keys
            assert await fs.stored("e/one") == b"1" and await fs.stored("e/sub/two") == b"2"
            assert await fs.listdir("") == ["e"]

    run(main)


# ---------------------------------------------------------------------- attributes
def test_root_of_a_bucket_refuses_chmod_chown_and_xattrs(rig: Rig) -> None:
    async def main() -> None:
        async with rig.mounted() as fs:
            for change in (SetAttr(mode=0o700), SetAttr(uid=1234), SetAttr(gid=5678)):
                with pytest.raises(OSError) as exc:
                    await fs.vfs.setattr(ROOT_INODE, change, CTX)
                assert exc.value.errno == errno.EPERM
            with pytest.raises(OSError) as exc:
                await fs.vfs.setxattr(ROOT_INODE, b"user.k", b"v")
            assert exc.value.errno == errno.EPERM
            assert fs.vfs.listxattr(ROOT_INODE) == []

    run(main)


# ---------------------------------------------------------------------- cache directory
def test_default_cache_dir_is_named_after_the_store_endpoint_included(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudfs.daemon import prepare

    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    (tmp_path / "sub").mkdir()
    (tmp_path / "mnt").mkdir()

    def cache_dir(url: str, options: str = "") -> str:
        plan = prepare(url, str(tmp_path / "mnt"), [options] if options else None)
        try:
            return plan.cache_dir
        finally:
            plan.backend.close()

    one = cache_dir("s3://bucket", "endpoint=http://127.0.0.1:9000")
    assert one == cache_dir("s3://bucket/", "endpoint=http://127.0.0.1:9000")  # the store, not the text
    assert one != cache_dir("s3://bucket", "endpoint=http://127.0.0.1:9001")
    assert one != cache_dir("s3://other", "endpoint=http://127.0.0.1:9000")
    assert cache_dir(f"file://{tmp_path}") != cache_dir(f"file://{tmp_path}/sub")
    assert os.geteuid() == 0 or one.startswith(str(tmp_path / "xdg" / "cloudfs"))
    monkeypatch.setenv("AZURE_STORAGE_KEY", "a2V5")
    azure = cache_dir("az://acct/cont", "endpoint=http://127.0.0.1:10000/acct")
    assert azure != cache_dir("az://acct/cont", "endpoint=http://127.0.0.1:10001/acct")
    assert azure != cache_dir("az://acct/cont")
    monkeypatch.setenv("ST_USER", "u")
    monkeypatch.setenv("ST_KEY", "k")
    monkeypatch.setenv("ST_AUTH", "http://127.0.0.1:8080/auth/v1.0")
    swift = cache_dir("swift://c")
    monkeypatch.setenv("ST_AUTH", "http://127.0.0.1:8081/auth/v1.0")
    assert swift != cache_dir("swift://c")


def test_b2_name_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """On B2: a part over 250 bytes is ENAMETOOLONG; control characters, DEL and a file
    named .bzEmpty are EINVAL (the checks need no server)."""
    from cloudfs.backends import open_backend

    monkeypatch.setenv("B2_APPLICATION_KEY_ID", "id")
    monkeypatch.setenv("B2_APPLICATION_KEY", "key")
    backend = open_backend("b2://bucket-name", {})
    try:
        backend.validate_key("a/" + "x" * 250)
        backend.validate_key("d/")  # a folder (its marker is d/.bzEmpty) is fine
        cases = {"a/" + "x" * 251: errno.ENAMETOOLONG, "bad\x01name": errno.EINVAL,
                 "bad\x1fname": errno.EINVAL, "bad\x7fname": errno.EINVAL, "d/.bzEmpty": errno.EINVAL}
        for key, code in cases.items():
            with pytest.raises(BackendError) as exc:
                backend.validate_key(key)
            assert exc.value.errno == code, key
    finally:
        backend.close()


# ---------------------------------------------------------------------- ctime
def test_rename_stores_the_new_ctime_in_its_own_copy(rig: Rig) -> None:
    """Renaming a stored file moves its ctime, and the copy that moves the object stores it:
    one copy and one delete, no metadata update and no upload after it."""
    async def main() -> None:
        async with rig.mounted() as fs:
            await fs.write_file("a", b"stored")
            await fs.sync()
            before = (await fs.stat("a")).ctime_ns
            sent = dict(fs.backend.requests)
            await trio.sleep(0.01)
            await fs.rename("a", "b")
            await fs.sync()
            moved = (await fs.stat("b")).ctime_ns
            assert moved > before
            new = {op: n - sent.get(op, 0) for op, n in fs.backend.requests.items() if n != sent.get(op, 0)}
            assert new.get("copy") == 1 and not {"set_metadata", "put"} & set(new), new
            assert (await fs.stored_meta("b"))["ctime"] == layout.format_epoch(moved)
            assert (await fs.stored("b")) == b"stored"

    run(main)


def test_ctime_is_journaled_uploaded_and_taken_from_the_kernel(rig: Rig) -> None:
    """A write, a truncate and an attribute change move the ctime; it is in the journal
    record (a crash keeps it) and in the uploaded object's ``ctime``; a ctime the kernel
    sends (it keeps a write-back-cached file's times) is stored as it is."""
    async def main() -> None:
        async with rig.mounted(crash=True) as fs:
            await fs.write_file("f", b"data")
            created = (await fs.stat("f")).ctime_ns
            fh = await fs.open("f")
            await trio.sleep(0.01)
            await fs.write(fh, 4, b"+")
            await fs.release(fh)
            written = (await fs.stat("f")).ctime_ns
            assert written > created
            await trio.sleep(0.01)
            await fs.setattr("f", size=2)
            truncated = (await fs.stat("f")).ctime_ns
            assert truncated > written
            await trio.sleep(0.01)
            await fs.setattr("f", mode=0o600)
            changed = (await fs.stat("f")).ctime_ns
            assert changed > truncated
        async with rig.mounted() as fs:  # after the crash: from the journal record
            assert (await fs.stat("f")).ctime_ns == changed
        async with rig.mounted() as fs:
            assert (await fs.stored_meta("f"))["ctime"] == layout.format_epoch(changed)
            await fs.setattr("f", mtime_ns=1_600_000_000 * 10**9, ctime_ns=1_700_000_000 * 10**9 + 5)
        async with rig.mounted() as fs:
            inode = await fs.stat("f")
            assert inode.attrs.mtime_ns == 1_600_000_000 * 10**9
            assert inode.ctime_ns == 1_700_000_000 * 10**9 + 5
            assert (await fs.stored_meta("f"))["ctime"] == "1700000000.000000005"

    run(main)

