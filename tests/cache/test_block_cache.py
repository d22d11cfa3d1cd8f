"""BlockCache: sparse ranged reads, the hard size bound and LRU eviction, persistence, privacy."""

from __future__ import annotations

import os
import stat

import pytest
import trio

from cloudfs.cache.block_cache import CacheLocked

from .conftest import BS, Harness, KiB, files_under, pattern, run

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
        assert cache2.used == 6 * BS
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
