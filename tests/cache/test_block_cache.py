"""BlockCache: sparse ranged reads, the hard size bound and LRU eviction, persistence, privacy."""

from __future__ import annotations

import os
import stat

import pytest
import trio

from cloudfs.cache.block_cache import CacheLocked

from .conftest import BS, Harness, KiB, MiB, check_accounting, files_under, pattern, run

pytestmark = pytest.mark.backends("local", "s3")


def test_sparse_read_fetches_one_block(harness: Harness, backend_name: str) -> None:
    data = pattern(16 * BS + 123)

    async def main() -> None:
        await harness.put("big", data)
        cache, _ = harness.cache()
        entry = await harness.open_entry(cache, "big")
        # 4 KiB in the middle of block 7: one ranged GET of exactly that block.
        off = 7 * BS + 1000
        assert await cache.read(entry, off, 4 * KiB) == data[off:off + 4 * KiB]
        assert cache.stats["fetches"] == 1
        assert cache.stats["fetched_bytes"] == BS
        assert entry.present == {7}
        # Again: served from the cache.
        assert await cache.read(entry, off + 10, 100) == data[off + 10:off + 110]
        assert cache.stats["fetches"] == 1
        # A read straddling blocks 8/9 fetches those two; the short last block fetches its length.
        off = 9 * BS - 10
        assert await cache.read(entry, off, 20) == data[off:off + 20]
        assert cache.stats["fetches"] == 3
        assert await cache.read(entry, 16 * BS, 4 * KiB) == data[16 * BS:]
        assert cache.stats["fetched_bytes"] == 3 * BS + 123
        # Past EOF: nothing, no fetch.
        assert await cache.read(entry, len(data) + 5, 100) == b""
        assert cache.stats["fetches"] == 4

    run(main)


def test_eviction_is_lru_and_bounded(harness: Harness, backend_name: str) -> None:
    data = pattern(12 * BS, seed=1)
    max_bytes = 4 * BS

    async def main() -> None:
        await harness.put("obj", data)
        cache, _ = harness.cache(max_bytes=max_bytes)
        entry = await harness.open_entry(cache, "obj")
        for b in range(4):
            assert await cache.read(entry, b * BS, 10) == data[b * BS:b * BS + 10]
            assert cache.used <= max_bytes
        # Touch block 0: block 1 is now the least recently used.
        await cache.read(entry, 0, 10)
        await cache.read(entry, 5 * BS, 10)
        assert cache.used <= max_bytes
        assert entry.present == {0, 2, 3, 5}
        assert cache.stats["evictions"] == 1
        # A full sequential scan never exceeds the bound and returns the right bytes.
        for b in range(12):
            assert await cache.read(entry, b * BS, BS) == data[b * BS:(b + 1) * BS]
            assert cache.used <= max_bytes
            assert len(entry.present) <= 4
        # What is on disk agrees with the accounting.
        blocks = [p for p in files_under(cache.entries_dir) if os.path.basename(p).startswith("b")]
        assert len(blocks) * BS == cache.used <= max_bytes
        check_accounting(cache)

    run(main)


def test_dirty_blocks_are_never_evicted(harness: Harness, backend_name: str) -> None:
    data = pattern(8 * BS, seed=2)
    max_bytes = 4 * BS

    async def main() -> None:
        await harness.put("obj", data)
        cache, _ = harness.cache(max_bytes=max_bytes, max_dirty=2 * BS)
        entry = await harness.open_entry(cache, "obj")
        await cache.write(entry, 0, b"x" * BS)
        await cache.write(entry, 3 * BS + 5, b"y" * 10)  # merges: fetches block 3
        assert set(entry.dirty) == {0, 3}
        for b in (1, 2, 4, 5, 6, 7, 1, 2):
            got = await cache.read(entry, b * BS, BS)
            assert got == data[b * BS:(b + 1) * BS]
            assert cache.used <= max_bytes
            assert {0, 3} <= entry.present
        # Only 2 slots for clean blocks: the other clean ones were evicted, oldest first.
        assert len(entry.present) == 4
        assert await cache.read(entry, 0, 3) == b"xxx"
        assert await cache.read(entry, 3 * BS, 10) == data[3 * BS:3 * BS + 5] + b"yyyyy"
        check_accounting(cache)

    run(main)


def test_reader_waits_for_uploader_when_cache_is_all_dirty(harness: Harness, backend_name: str) -> None:
    """Every block is dirty and the cache is full: a cold read waits for an upload, then proceeds."""
    data = pattern(6 * BS, seed=3)

    async def main() -> None:
        await harness.put("obj", data)
        cache, _ = harness.cache(max_bytes=3 * BS, max_dirty=3 * BS)
        uploader = harness.uploader(cache, delay=3600)  # only pressure triggers an upload
        entry = await harness.open_entry(cache, "obj")
        for b in range(3):
            await cache.write(entry, b * BS, b"d" * BS)
        uploader.schedule(entry)
        assert cache.used == cache.dirty_bytes == 3 * BS
        async with trio.open_nursery() as nursery:
            await nursery.start(uploader.run)
            with trio.fail_after(20):
                got = await cache.read(entry, 4 * BS, 10)
            assert got == data[4 * BS:4 * BS + 10]
            assert cache.used <= 3 * BS
            nursery.cancel_scope.cancel()
        assert await harness.get("obj") == b"d" * 3 * BS + data[3 * BS:]

    run(main)


def test_reload_serves_reads_without_fetches(harness: Harness, backend_name: str) -> None:
    data = pattern(5 * BS + 7, seed=4)

    async def main() -> None:
        await harness.put("warm", data)
        cache, _ = harness.cache()
        entry = await harness.open_entry(cache, "warm")
        assert await cache.read(entry, 0, len(data)) == data
        assert cache.stats["fetches"] == 6
        cache.close()

        cache2, pending = harness.cache()
        assert pending == []
        assert cache2.used == 5 * BS + 4 * KiB  # the 7-byte last block is charged one page
        check_accounting(cache2)
        entry2 = await harness.open_entry(cache2, "warm")
        assert await cache2.read(entry2, 0, len(data)) == data
        assert cache2.stats["fetches"] == 0
        assert cache2.stats["hits"] >= 6

    run(main)


def test_remote_change_drops_cached_blocks(harness: Harness, backend_name: str) -> None:
    old = pattern(3 * BS, seed=5)
    new = pattern(2 * BS + 99, seed=6)

    async def main() -> None:
        await harness.put("obj", old)
        cache, _ = harness.cache()
        entry = await harness.open_entry(cache, "obj")
        assert await cache.read(entry, 0, len(old)) == old
        cache.close()
        await trio.sleep(0.01)  # local ETags include the mtime
        await harness.put("obj", new)  # another writer

        cache2, _ = harness.cache()
        entry2 = await harness.open_entry(cache2, "obj")
        assert entry2.size == len(new)
        assert cache2.used == 0 and not entry2.present
        assert await cache2.read(entry2, 0, 4 * BS) == new
        assert cache2.stats["fetches"] == 3

    run(main)


def test_read_of_changed_object_without_revalidation_is_stale_error(harness: Harness,
                                                                       backend_name: str) -> None:
    """A cold block of a version that is gone is never mixed with the new version's bytes."""
    from cloudfs.cache.block_cache import StaleError

    async def main() -> None:
        await harness.put("obj", pattern(3 * BS, seed=7))
        cache, _ = harness.cache()
        entry = await harness.open_entry(cache, "obj")
        await trio.sleep(0.01)
        await harness.put("obj", pattern(3 * BS, seed=8))
        with pytest.raises(StaleError):
            await cache.read(entry, BS, 10)
        assert cache.used == 0  # the reservation was returned

    run(main)


def test_cache_files_are_private(harness: Harness, backend_name: str, tmp_path: object) -> None:
    async def main() -> None:
        await harness.put("a", pattern(2 * BS, seed=9))
        old = os.umask(0)  # even a permissive umask does not open the cache up
        try:
            cache, _ = harness.cache()
            uploader = harness.uploader(cache)
            entry = await harness.open_entry(cache, "a")
            await cache.read(entry, 0, 10)
            await cache.write(entry, BS + 3, b"hello")
            new = cache.entry("new", None, 0)
            cache.mark_pending(new)
            await cache.write(new, 0, b"fresh")
            await cache.make_durable(new)
            await uploader.flush(entry)
            await uploader.flush(new)
        finally:
            os.umask(old)
        assert stat.S_IMODE(os.stat(cache.dir).st_mode) == 0o700
        paths = files_under(cache.dir)
        assert any(os.path.basename(p) == "state.json" for p in paths)
        assert any(os.path.basename(p) == "b1" for p in paths)
        for p in paths:
            mode = stat.S_IMODE(os.lstat(p).st_mode)
            if os.path.isdir(p):
                assert mode == 0o700, p
            else:
                assert mode == 0o600, p

    run(main)


@pytest.mark.backends("local")  # cache-only: the backend does not matter
def test_second_cache_on_same_dir_is_refused(harness: Harness, backend_name: str) -> None:
    harness.cache()
    with pytest.raises(CacheLocked):
        harness.cache()


@pytest.mark.backends("local")  # cache-only: the backend does not matter
def test_make_durable_races_with_journal_writes(harness: Harness, backend_name: str) -> None:
    """fsync (worker thread) while writes keep journaling (trio thread): no error, newest record."""

    async def main() -> None:
        cache, _ = harness.cache(max_bytes=256 * BS)
        entry = cache.entry("f", None, 0)
        cache.mark_pending(entry)
        stop = False

        async def churn() -> None:
            i = 0
            while not stop:
                cache.mark_pending(entry)  # rewrites state.json every time
                entry.journaled = False
                i += 1
                if i % 5 == 0:
                    await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(churn)
            for i in range(15):
                await cache.write(entry, i * BS, b"x")
                await cache.make_durable(entry)
            stop = True
        cache.close()
        _, pending = harness.cache(max_bytes=256 * BS)
        assert len(pending) == 1 and len(pending[0].dirty) == 15

    run(main)


@pytest.mark.backends("local")  # cache-only: the backend does not matter
def test_small_files_are_charged_small(harness: Harness, backend_name: str) -> None:
    """2000 files of 4 KiB fit an 8 MiB dirty budget with 8 MiB blocks: nobody waits.

    Charged a whole block each, the second file already waited for the (here: never running)
    uploader, and stall_timeout turned that into ENOSPC.
    """
    nfiles, size = 2000, 4 * KiB

    async def main() -> None:
        cache, _ = harness.cache(block_size=8 * MiB, max_bytes=16 * MiB, max_dirty=8 * MiB,
                                 stall_timeout=1.0)
        waits = 0

        async def no_wait() -> None:
            nonlocal waits
            waits += 1
            raise AssertionError("a writer waited for cache space")

        cache._wait_change = no_wait  # type: ignore[method-assign]
        with trio.fail_after(60):
            for i in range(nfiles):
                entry = cache.entry(f"small/{i:04d}", None, 0)
                cache.mark_pending(entry)
                assert await cache.write(entry, 0, bytes([i % 251]) * size) == size
                assert cache.used <= cache.max_bytes
        assert waits == 0
        assert cache.dirty_bytes == cache.used == nfiles * size  # 7.8 MiB, not 2000 x 8 MiB
        check_accounting(cache)
        cache.close()
        reopened, pending = harness.cache(block_size=8 * MiB, max_bytes=16 * MiB, max_dirty=8 * MiB)
        assert len(pending) == nfiles
        assert reopened.used == reopened.dirty_bytes == nfiles * size
        check_accounting(reopened)

    run(main)


@pytest.mark.backends("local")  # cache-only: the backend does not matter
def test_growing_and_truncating_blocks_keep_charges_exact(harness: Harness, backend_name: str) -> None:
    """Appends reserve their growth before writing; truncates give bytes back."""

    async def main() -> None:
        cache, _ = harness.cache(max_bytes=4 * BS, max_dirty=4 * BS)
        entry = cache.entry("log", None, 0)
        cache.mark_pending(entry)
        for i in range(40):
            await cache.write(entry, i * 100, b"x" * 100)
            check_accounting(cache)
        assert cache.used == cache.dirty_bytes == 4 * KiB
        await cache.write(entry, 4 * KiB, b"y")  # one byte over a page: two pages
        assert cache.used == cache.dirty_bytes == 8 * KiB
        await cache.write(entry, BS + 10, b"z")  # block 1: a hole, then one byte
        assert cache.used == 8 * KiB + 4 * KiB
        await cache.write(entry, 2 * BS - 1, b"w")  # block 1 is now a full block file
        assert cache.used == 8 * KiB + BS
        check_accounting(cache)
        await cache.truncate(entry, 5000)  # block 1 dropped, block 0 cut to 5000 bytes
        assert cache.used == cache.dirty_bytes == 8 * KiB
        await cache.truncate(entry, 10)
        assert cache.used == cache.dirty_bytes == 4 * KiB
        check_accounting(cache)
        assert await cache.read(entry, 0, 100) == b"x" * 10

    run(main)


@pytest.mark.backends("local")  # cache-only: the backend does not matter
def test_append_waits_for_room_and_keeps_the_bound(harness: Harness, backend_name: str) -> None:
    """A write that grows a block file past its charge reserves first: used never passes max_bytes."""

    async def main() -> None:
        cache, _ = harness.cache(max_bytes=4 * BS, max_dirty=4 * BS, stall_timeout=0.5)
        entries = []
        for i in range(4):
            e = cache.entry(f"f{i}", None, 0)
            cache.mark_pending(e)
            await cache.write(e, 0, b"a" * (BS - 8 * KiB))
            entries.append(e)
        assert cache.used == 4 * BS - 32 * KiB
        # Growing f0 to a full block needs 8 KiB: there is room (32 KiB free).
        await cache.write(entries[0], BS - 8 * KiB, b"b" * 8 * KiB)
        check_accounting(cache)
        for e in entries[1:]:
            await cache.write(e, BS - 8 * KiB, b"b" * 8 * KiB)
        assert cache.used == cache.max_bytes
        # Everything is dirty and nothing uploads: the next growth waits, then gets ENOSPC,
        # and the bound held; the reservation was given back.
        e = cache.entry("f4", None, 0)
        cache.mark_pending(e)
        cache.max_dirty = 8 * BS
        import errno
        with pytest.raises(OSError) as exc:
            await cache.write(e, 0, b"c")
        assert exc.value.errno == errno.ENOSPC
        assert cache.used == cache.max_bytes
        check_accounting(cache)

    run(main)
