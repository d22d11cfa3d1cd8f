"""How many journal records a small file costs, and on which thread (docs/concurrency.md,
"The journal"): the kernel's create, write, mtime SETATTR and close of a new file wait for
two record rewrites on the trio thread (the one that serves FUSE); its upload writes two
more, in worker threads.  And what those records were for still holds after a crash.
"""

from __future__ import annotations

import os
import time

from tests.vfs.conftest import BS, Rig, run

N = 10


async def _create_write_close(fs, path: str, data: bytes) -> None:  # type: ignore[no-untyped-def]
    """What the kernel sends for ``echo data > path`` with write-back caching."""
    fh = await fs.create(path)
    await fs.write(fh, 0, data)
    await fs.setattr(path, mtime_ns=time.time_ns())
    await fs.release(fh)


def test_a_small_new_file_costs_two_records_on_the_fuse_thread(rig: Rig) -> None:
    async def go() -> None:
        async with rig.mounted() as fs:
            writes = fs.cache.journal_writes
            start = dict(writes)
            for i in range(N):
                await _create_write_close(fs, f"f{i}", b"x" * 100)
            assert writes["trio"] - start.get("trio", 0) == 2 * N, writes  # new_file, set_attrs
            assert writes["worker"] - start.get("worker", 0) == 0, writes
            await fs.sync()
            assert writes["trio"] - start.get("trio", 0) == 2 * N, writes
            # the upload token before the PUT, the uploaded state after it
            assert writes["worker"] - start.get("worker", 0) == 2 * N, writes
            for i in range(N):
                assert await fs.stored(f"f{i}") == b"x" * 100

    run(go)


def test_a_new_file_written_but_never_closed_survives_a_crash(rig: Rig) -> None:
    """Its first write rewrote no record: recovery takes every block of a file with no
    stored version as written here (several blocks, the last one partial)."""
    data = os.urandom(3 * BS + 100)

    async def go() -> None:
        async with rig.mounted(crash=True) as fs:
            fh = await fs.create("open")
            await fs.write(fh, 0, data)
            records = fs.cache.journal_writes["trio"]
            await fs.write(fh, len(data), b"tail")
            assert fs.cache.journal_writes["trio"] == records
        async with rig.mounted() as fs:
            assert await fs.read_file("open") == data + b"tail"
        async with rig.mounted() as fs:
            assert await fs.stored("open") == data + b"tail"

    run(go)


def test_a_stored_file_written_again_still_journals_its_first_dirty_block(rig: Rig) -> None:
    """A file with a stored version: a block written here must not pass for a clean copy of
    it after a crash, so its first write is journaled at once."""
    async def go() -> None:
        async with rig.mounted() as fs:
            await fs.write_file("f", b"a" * (2 * BS))
        async with rig.mounted(crash=True) as fs:
            fh = await fs.open("f")
            before = fs.cache.journal_writes["trio"]
            await fs.write(fh, BS, b"b" * 10)
            assert fs.cache.journal_writes["trio"] == before + 1
        async with rig.mounted() as fs:
            assert await fs.read_file("f") == b"a" * BS + b"b" * 10 + b"a" * (BS - 10)
        async with rig.mounted() as fs:
            assert await fs.stored("f") == b"a" * BS + b"b" * 10 + b"a" * (BS - 10)

    run(go)
