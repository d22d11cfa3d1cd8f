"""Uploader: sparse merges and server-side part copy, back-pressure, crash recovery, conflicts."""

from __future__ import annotations

import os

import pytest
import trio

from cloudfs.cache.block_cache import BlockCache
from cloudfs.cache.uploader import UPLOAD_KEY

from .conftest import BS, Counter, Harness, KiB, MiB, check_accounting, pattern, run

pytestmark = pytest.mark.backends("local", "s3")


def big_size(backend_name: str) -> int:
    # S3 parts are >= 5 MiB: an object of three parts there; 16 one-block parts on local disk.
    return 12 * MiB + 5 * KiB if backend_name == "s3" else 16 * BS + 5 * KiB


def test_partial_overwrite_fetches_only_merged_blocks_and_copies_parts(harness: Harness,
                                                                       backend_name: str) -> None:
    size = big_size(backend_name)
    data = bytearray(pattern(size, seed=10))

    async def main() -> None:
        await harness.put("big", bytes(data))
        cache, _ = harness.cache(max_bytes=256 * BS)
        uploader = harness.uploader(cache)
        part = uploader._part_size(size)
        nparts = -(-size // part)
        assert nparts >= 3
        entry = await harness.open_entry(cache, "big")
        off = part + 3 * BS + 100  # 4 KiB inside the second part
        await cache.write(entry, off, b"\xab" * 4 * KiB)
        data[off:off + 4 * KiB] = b"\xab" * 4 * KiB
        assert cache.stats["fetches"] == 1 and cache.stats["fetched_bytes"] == BS
        assert entry.present == {off // BS}
        counter = Counter(harness.backend, "mpu_part", "mpu_part_copy", "put", "download")
        try:
            await uploader.flush(entry)
        finally:
            counter.restore()
        assert not entry.pending and not entry.dirty
        # Untouched, uncached parts are copied server-side; only the changed part is sent.
        assert counter["put"] == 0
        assert counter["mpu_part"] == 1
        assert counter["mpu_part_copy"] == nparts - 1
        assert [c[2] for c in counter.calls["mpu_part"]] == [off // part + 1]  # (key, id, number, payload)
        # Sending part 2 needs the rest of its bytes: fetched into the upload, not the cache.
        assert counter["download"] == (0 if part == BS else (part // BS) - 1)
        assert cache.stats["fetches"] == 1
        assert await harness.get("big") == bytes(data)
        # The cache is clean and still correct against the new version.
        assert entry.base is not None and entry.base.size == size
        assert await cache.read(entry, off - 10, 20) == bytes(data[off - 10:off + 10])

    run(main)


def test_multipart_of_locally_grown_object(harness: Harness, backend_name: str) -> None:
    """A new file bigger than a part goes up as multipart from cached blocks only."""
    size = big_size(backend_name) + 3 * BS

    async def main() -> None:
        data = pattern(size, seed=11)
        cache, _ = harness.cache(max_bytes=512 * BS if backend_name == "s3" else 64 * BS)
        uploader = harness.uploader(cache)
        entry = cache.entry("grown", None, 0)
        cache.mark_pending(entry)
        for pos in range(0, size, 100 * KiB):
            await cache.write(entry, pos, data[pos:pos + 100 * KiB])
        assert cache.stats["fetches"] == 0
        counter = Counter(harness.backend, "mpu_part", "mpu_part_copy", "download")
        try:
            await uploader.flush(entry)
        finally:
            counter.restore()
        assert counter["mpu_part_copy"] == 0 and counter["download"] == 0
        assert counter["mpu_part"] == -(-size // uploader._part_size(size))
        assert await harness.get("grown") == data
        assert not os.path.isdir(uploader.tmp_dir) or not os.listdir(uploader.tmp_dir)  # no leftovers

    run(main)


def test_writers_block_on_dirty_budget_and_resume(harness: Harness, backend_name: str) -> None:
    max_dirty = 4 * BS
    total = (40 if backend_name == "local" else 20) * BS  # S3: each round re-sends the object
    data = pattern(total, seed=12)

    async def main() -> None:
        cache, _ = harness.cache(max_bytes=8 * BS, max_dirty=max_dirty)
        uploader = harness.uploader(cache, delay=3600)  # only pressure makes it upload
        entry = cache.entry("stream", None, 0)
        cache.mark_pending(entry)
        uploader.schedule(entry)
        waits = 0
        orig = cache._wait_change

        async def counting_wait() -> None:
            nonlocal waits
            waits += 1
            await orig()

        cache._wait_change = counting_wait  # type: ignore[method-assign]
        peak = 0
        async with trio.open_nursery() as nursery:
            await nursery.start(uploader.run)

            async def watch() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, cache.dirty_bytes, cache.used - cache.max_bytes + cache.dirty_bytes)
                    assert cache.used <= cache.max_bytes
                    await trio.sleep(0)

            nursery.start_soon(watch)
            with trio.fail_after(30):
                for pos in range(0, total, 16 * KiB):
                    await cache.write(entry, pos, data[pos:pos + 16 * KiB])  # never raises
                    uploader.schedule(entry)
                    assert cache.dirty_bytes <= max_dirty
                    assert cache.used <= cache.max_bytes
                await uploader.flush(entry)
            nursery.cancel_scope.cancel()
        assert waits > 0  # the writer did wait for uploads
        assert peak <= max_dirty
        assert await harness.get("stream") == data
        assert cache.dirty_bytes == 0
        check_accounting(cache)

    run(main)


def test_crash_after_fsync_recovers_pending_upload(harness: Harness, backend_name: str) -> None:
    base = pattern(3 * BS, seed=13)

    async def main() -> None:
        await harness.put("old", base)
        cache, _ = harness.cache()
        e_old = await harness.open_entry(cache, "old")
        await cache.write(e_old, BS + 10, b"changed")
        await cache.make_durable(e_old)
        e_new = cache.entry("dir/new", None, 0)
        e_new.metadata = {"mode": "33188"}
        cache.mark_pending(e_new)
        await cache.write(e_new, 0, b"brand new file")
        await cache.make_durable(e_new)
        cache.close()  # SIGKILL: nothing uploaded, nothing flushed
        assert await harness.keys() == ["old"]
        assert await harness.get("old") == base

        cache2, pending = harness.cache()
        assert sorted(e.key for e in pending) == ["dir/new", "old"]
        uploader = harness.uploader(cache2)
        async with trio.open_nursery() as nursery:
            await nursery.start(uploader.run)
            for e in pending:
                uploader.schedule(e)
            with trio.fail_after(20):
                while any(e.pending or e.uploading for e in pending):
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
        expect = bytearray(base)
        expect[BS + 10:BS + 17] = b"changed"
        assert await harness.get("old") == bytes(expect)
        assert await harness.get("dir/new") == b"brand new file"
        meta = (await harness.backend.head("dir/new")).metadata or {}
        assert meta.pop(UPLOAD_KEY, None)  # the upload token stays on the object
        assert meta == {"mode": "33188"}
        assert cache2.dirty_bytes == 0
        # No conflict copies: the recovered entries knew the version they were based on.
        assert await harness.keys() == ["dir/new", "old"]

    run(main)


def test_crash_during_upload_exposes_no_partial_object(harness: Harness, backend_name: str) -> None:
    """Killed while the parts go up: the old object stays whole; the next run uploads it all."""
    size = big_size(backend_name)
    base = pattern(size, seed=14)
    new = pattern(size, seed=15)

    async def main() -> None:
        await harness.put("big", base)
        cache, _ = harness.cache(max_bytes=512 * BS)
        entry = await harness.open_entry(cache, "big")
        for pos in range(0, size, 256 * KiB):
            await cache.write(entry, pos, new[pos:pos + 256 * KiB])
        await cache.make_durable(entry)
        uploader = harness.uploader(cache)
        started = trio.Event()
        orig = harness.backend.mpu_part

        async def slow_part(*args: object, **kw: object) -> object:
            started.set()
            await trio.sleep(3600)
            return await orig(*args, **kw)  # type: ignore[arg-type]

        harness.backend.mpu_part = slow_part  # type: ignore[method-assign]
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(uploader.flush, entry)
                await started.wait()
                nursery.cancel_scope.cancel()  # the process dies mid-upload
        finally:
            del harness.backend.mpu_part
        cache.close()
        assert await harness.get("big") == base

        cache2, pending = harness.cache(max_bytes=512 * BS)
        assert [e.key for e in pending] == ["big"]
        await harness.uploader(cache2).flush_all()
        assert await harness.get("big") == new
        assert await harness.keys() == ["big"]

    run(main)


def test_conflict_keeps_other_writers_version(harness: Harness, backend_name: str) -> None:
    base = pattern(2 * BS, seed=16)
    theirs = b"the other writer's version"

    async def main() -> None:
        await harness.put("doc", base)
        cache, _ = harness.cache()
        uploader = harness.uploader(cache)
        conflicts: list[str] = []
        uploader.on_conflict = lambda entry, saved_as: conflicts.append(saved_as)
        entry = await harness.open_entry(cache, "doc")
        # Cache it all: bytes of the old version that were never cached are gone from the server
        # once the other writer replaced it (see test_conflict_copy_of_partly_cached_file).
        assert await cache.read(entry, 0, len(base)) == base
        await cache.write(entry, 5, b"mine")
        await trio.sleep(0.01)
        await harness.put("doc", theirs)
        await uploader.flush(entry)
        assert await harness.get("doc") == theirs
        assert len(conflicts) == 1
        saved = conflicts[0]
        assert saved.startswith("doc.conflict-")
        mine = bytearray(base)
        mine[5:9] = b"mine"
        assert await harness.get(saved) == bytes(mine)
        assert await harness.keys() == sorted(["doc", saved])
        # The local version is safe under the conflict name: the entry is no longer pending,
        # its dirty blocks are released, and a later upload round makes no second copy.
        assert not entry.pending
        assert cache.dirty_bytes == 0
        uploader.schedule(entry)
        await uploader.flush_all()
        async with trio.open_nursery() as nursery:
            await nursery.start(uploader.run)
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
        assert len(conflicts) == 1
        assert await harness.keys() == sorted(["doc", saved])
        # Reopening sees the other writer's version.
        entry = await harness.open_entry(cache, "doc")
        assert await cache.read(entry, 0, 100) == theirs

    run(main)


def test_conflict_copy_of_partly_cached_file(harness: Harness, backend_name: str) -> None:
    """Uncached bytes of the replaced version cannot be recovered: zeros, logged; the rest is kept."""
    base = pattern(3 * BS, seed=19)

    async def main() -> None:
        await harness.put("doc", base)
        cache, _ = harness.cache()
        uploader = harness.uploader(cache)
        entry = await harness.open_entry(cache, "doc")
        await cache.write(entry, 2 * BS, b"mine")  # merges block 2 only
        await trio.sleep(0.01)
        await harness.put("doc", b"theirs")
        await uploader.flush(entry)
        keys = await harness.keys()
        assert len(keys) == 2 and keys[1].startswith("doc.conflict-")
        assert await harness.get("doc") == b"theirs"
        copy = await harness.get(keys[1])
        assert len(copy) == len(base)
        assert copy[:2 * BS] == bytes(2 * BS)
        assert copy[2 * BS:] == b"mine" + base[2 * BS + 4:]

    run(main)


def test_conflict_on_new_file_created_remotely(harness: Harness, backend_name: str) -> None:
    async def main() -> None:
        cache, _ = harness.cache()
        uploader = harness.uploader(cache)
        entry = cache.entry("f", None, 0)
        cache.mark_pending(entry)
        await cache.write(entry, 0, b"local")
        await harness.put("f", b"remote")
        await uploader.flush(entry)
        keys = await harness.keys()
        assert len(keys) == 2 and keys[0] == "f" and keys[1].startswith("f.conflict-")
        assert await harness.get("f") == b"remote"
        assert await harness.get(keys[1]) == b"local"

    run(main)


def test_crash_between_block_write_and_journal_keeps_cache_consistent(harness: Harness,
                                                                      backend_name: str) -> None:
    """Killed inside write(): the block file must never pass for a clean copy of the remote."""
    base = pattern(2 * BS, seed=17)

    async def main() -> None:
        await harness.put("obj", base)
        cache, _ = harness.cache()
        entry = await harness.open_entry(cache, "obj")
        assert await cache.read(entry, 0, 10) == base[:10]  # block 0 cached clean

        def killed(*args: object) -> None:
            raise KeyboardInterrupt  # stands in for SIGKILL at this point

        journal = cache._journal
        cache._journal = killed  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            await cache.write(entry, 3, b"XYZ")
        cache._journal = journal  # type: ignore[method-assign]
        cache.close()

        cache2, _ = harness.cache()
        await harness.uploader(cache2).flush_all()
        entry2 = await harness.open_entry(cache2, "obj")
        local = await cache2.read(entry2, 0, 2 * BS)
        assert local == await harness.get("obj")

    run(main)


def test_reopen_with_smaller_cache_size_shrinks_to_bound(harness: Harness, backend_name: str) -> None:
    data = pattern(8 * BS, seed=18)

    async def main() -> None:
        await harness.put("obj", data)
        cache, _ = harness.cache(max_bytes=8 * BS)
        entry = await harness.open_entry(cache, "obj")
        await cache.read(entry, 0, 8 * BS)
        assert cache.used == 8 * BS
        cache.close()
        small: BlockCache
        small, _ = harness.cache(max_bytes=3 * BS)
        assert small.used <= 3 * BS
        entry = await harness.open_entry(small, "obj")
        assert await small.read(entry, 0, 8 * BS) == data
        assert small.used <= 3 * BS

    run(main)


def test_failed_part_is_retried_and_does_not_kill_the_uploader(harness: Harness,
                                                              backend_name: str) -> None:
    from cloudfs.backends.errors import BackendError

    size = big_size(backend_name)
    data = pattern(size, seed=20)

    part2 = 0

    async def main() -> None:
        nonlocal part2
        cache, _ = harness.cache(max_bytes=512 * BS)
        uploader = harness.uploader(cache, delay=0.0)
        entry = cache.entry("big", None, 0)
        cache.mark_pending(entry)
        for pos in range(0, size, 256 * KiB):
            await cache.write(entry, pos, data[pos:pos + 256 * KiB])
        failures = 0
        fail_next = 1
        orig = harness.backend.mpu_part

        async def flaky_part(key: str, upload_id: str, number: int, payload: object) -> object:
            nonlocal failures, fail_next
            if number == 2 and fail_next:
                fail_next -= 1
                failures += 1
                raise BackendError("part 2: the network is down")
            return await orig(key, upload_id, number, payload)  # type: ignore[arg-type]

        harness.backend.mpu_part = flaky_part  # type: ignore[method-assign,assignment]
        try:
            # The background loop survives the failure and retries after its backoff.
            uploader.schedule(entry)
            async with trio.open_nursery() as nursery:
                await nursery.start(uploader.run)
                with trio.fail_after(20):
                    while not failures or entry.uploading:
                        await trio.sleep(0.01)
                    assert entry.id in uploader.retry_at  # backed off, not crashed
                    uploader.retry_at[entry.id] = 0  # skip the wait (>= 4 s)
                    uploader._wake()
                    while entry.pending or entry.uploading:
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
            assert failures == 1
            assert await harness.get("big") == data
            # A direct flush reports a plain BackendError (what fsync/close turn into EIO).
            # Rewrite inside part 2: unchanged parts are copied server-side, so only a
            # changed part goes through mpu_part (and fails).
            part2 = uploader._part_size(size)
            await cache.write(entry, part2, b"again")
            fail_next = 1
            with pytest.raises(BackendError, match="network is down"):
                await uploader.flush(entry)
            assert entry.pending and not entry.uploading
            await uploader.flush(entry)
        finally:
            del harness.backend.mpu_part
        assert failures == 2
        assert await harness.get("big") == data[:part2] + b"again" + data[part2 + 5:]
        assert await harness.keys() == ["big"]

    run(main)


def test_kill_after_extending_write_recovers_full_size(harness: Harness, backend_name: str) -> None:
    """Appends to a dirty block do not rewrite the journal; recovery still sees every byte."""

    async def main() -> None:
        cache, _ = harness.cache()
        entry = cache.entry("log", None, 0)
        cache.mark_pending(entry)
        await cache.write(entry, 0, b"first line\n")  # block 0 turns dirty: journaled
        await cache.write(entry, 11, b"second line\n")  # same block, file grows: not journaled
        await cache.write(entry, 2 * BS + 1, b"far")  # sparse: block 2, journaled before size grew
        size = entry.size
        cache.close()  # killed
        cache2, pending = harness.cache()
        assert [e.size for e in pending] == [size]
        await harness.uploader(cache2).flush_all()
        expect = bytearray(size)
        expect[0:23] = b"first line\nsecond line\n"
        expect[2 * BS + 1:] = b"far"
        assert await harness.get("log") == bytes(expect)

    run(main)


def test_kill_after_server_commit_is_not_a_conflict(harness: Harness, backend_name: str) -> None:
    async def main() -> None:
        await harness.put("f", b"v1")
        cache, _ = harness.cache()
        uploader = harness.uploader(cache)
        entry = await harness.open_entry(cache, "f")
        await cache.write(entry, 0, b"v2")

        def killed(*args: object) -> None:
            raise KeyboardInterrupt  # SIGKILL right after the PUT returned

        cache.mark_uploaded = killed  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            await uploader.flush(entry)
        cache.close()
        assert await harness.get("f") == b"v2"
        cache2, _ = harness.cache()
        await harness.uploader(cache2).flush_all()
        assert await harness.keys() == ["f"]  # no f.conflict-... with a second copy of v2
        assert await harness.get("f") == b"v2"

    run(main)


def test_kill_after_server_commit_of_new_file_then_more_writes(harness: Harness,
                                                               backend_name: str) -> None:
    """A new file (no base) committed but not recorded, then written again after the restart:
    the server's copy carries our token, so it is the base and the newer data goes on top."""
    data = pattern(3 * BS + 10, seed=22)

    async def main() -> None:
        cache, _ = harness.cache()
        uploader = harness.uploader(cache)
        entry = cache.entry("n", None, 0)
        cache.mark_pending(entry)
        await cache.write(entry, 0, data)

        def killed(*args: object) -> None:
            raise KeyboardInterrupt

        cache.mark_uploaded = killed  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            await uploader.flush(entry)
        cache.close()
        assert await harness.get("n") == data
        cache2, pending = harness.cache()
        assert [e.key for e in pending] == ["n"] and pending[0].upload_token
        entry2 = pending[0]
        await cache2.write(entry2, BS + 1, b"later")
        await harness.uploader(cache2).flush_all()
        expect = bytearray(data)
        expect[BS + 1:BS + 6] = b"later"
        assert await harness.keys() == ["n"]
        assert await harness.get("n") == bytes(expect)
        assert not entry2.pending and entry2.upload_token is None
        cache2.close()
        _, pending = harness.cache()
        assert pending == []

    run(main)


def test_lost_reply_after_commit_is_not_a_conflict(harness: Harness, backend_name: str) -> None:
    """The server committed our PUT but the reply was lost: the retry rebases, no conflict copy."""
    base = pattern(2 * BS, seed=23)

    async def main() -> None:
        from cloudfs.backends.errors import BackendError

        await harness.put("f", base)
        cache, _ = harness.cache()
        uploader = harness.uploader(cache)
        conflicts: list[str] = []
        uploader.on_conflict = lambda entry, saved_as: conflicts.append(saved_as)
        entry = await harness.open_entry(cache, "f")
        await cache.write(entry, 10, b"mine")
        backend = harness.backend
        for name in ("put", "mpu_complete"):  # small objects are multipart on local disk
            orig = getattr(backend, name)

            async def lossy(*args: object, _orig: object = orig, **kw: object) -> str:
                await _orig(*args, **kw)  # type: ignore[operator]
                raise BackendError("connection reset after the request was sent")

            setattr(backend, name, lossy)
        try:
            with pytest.raises(BackendError):
                await uploader.flush(entry)
        finally:
            del backend.put
            del backend.mpu_complete
        await cache.write(entry, BS + 3, b"more")
        await uploader.flush(entry)
        expect = bytearray(base)
        expect[10:14] = b"mine"
        expect[BS + 3:BS + 7] = b"more"
        assert conflicts == []
        assert await harness.keys() == ["f"]
        assert await harness.get("f") == bytes(expect)
        assert not entry.pending and cache.dirty_bytes == 0
        check_accounting(cache)

    run(main)


def test_cold_read_while_own_upload_commits(harness: Harness, backend_name: str) -> None:
    """Between the server committing our upload and mark_uploaded(), cold reads still work."""
    base = pattern(4 * BS, seed=21)

    async def main() -> None:
        await harness.put("obj", base)
        cache, _ = harness.cache()
        uploader = harness.uploader(cache)
        entry = await harness.open_entry(cache, "obj")
        await cache.write(entry, 0, b"new head")
        committed, go_on = trio.Event(), trio.Event()
        backend = harness.backend

        def hold(name: str) -> None:
            orig = getattr(backend, name)

            async def wrapper(*args: object, **kw: object) -> object:
                etag = await orig(*args, **kw)
                committed.set()  # the server has the new version; entry.base is still the old one
                await go_on.wait()
                return etag

            setattr(backend, name, wrapper)

        hold("put")
        hold("mpu_complete")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(uploader.flush, entry)
                await committed.wait()
                nursery.start_soon(_release, go_on)
                with trio.fail_after(10):
                    got = await cache.read(entry, 3 * BS, 100)  # cold block
                assert got == base[3 * BS:3 * BS + 100]
                await cache.write(entry, 2 * BS + 7, b"merge")  # a merging write of a cold block
        finally:
            del backend.put
            del backend.mpu_complete
        await uploader.flush(entry)
        expect = bytearray(base)
        expect[0:8] = b"new head"
        expect[2 * BS + 7:2 * BS + 12] = b"merge"
        assert await harness.get("obj") == bytes(expect)

    run(main)


async def _release(event: trio.Event) -> None:
    await trio.sleep(0.2)  # the reader is waiting by now
    event.set()
