"""Cache tier: BlockCache and Uploader on the File API, without FUSE or the VFS.

Built the way the daemon builds them (``cloudfs.daemon.build``), over the local backend; a
"restart" is a new BlockCache on the same directory, as after SIGKILL.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from cloudfs.backends import open_backend
from cloudfs.backends.errors import BackendError, NotFound
from cloudfs.cache.file import Status
from cloudfs.cache.journal import CacheMismatch
from cloudfs.daemon import Mount, build
from cloudfs.layout import Attrs
from cloudfs.options import MountOptions
from cloudfs.vfs import Notify

BS = 64 * 1024


def attrs() -> Attrs:
    return Attrs(0o100644, os.getuid(), os.getgid(), 1_700_000_000 * 10**9)


@asynccontextmanager
async def running(tmp_path: Path, **options: Any) -> AsyncIterator[Mount]:
    root = tmp_path / "bucket"
    root.mkdir(exist_ok=True)
    backend = open_backend(f"file://{root}", {})
    settings: dict[str, Any] = {"block_size": BS, "cache_size": 256 * BS, "min_free": 0,
                                "writeback_delay": 3600.0, **options}
    opts = replace(MountOptions(), **settings)
    mount = build(backend, str(tmp_path / "cache"), opts, Notify())
    mount.cache.open()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(mount.uploader.run)
            yield mount
            nursery.cancel_scope.cancel()
    finally:
        mount.cache.close()
        backend.close()


def test_two_generations_of_one_key_never_share_storage(tmp_path: Path) -> None:
    """Closing a handle of an unlinked file leaves the new file under its name alone."""
    async def main() -> None:
        async with running(tmp_path) as m:
            old = m.cache.new_file("f", attrs())
            m.cache.open_handle(old)
            await m.cache.write(old, 0, b"old")
            m.cache.unlink(old)
            new = m.cache.new_file("f", attrs())
            await m.cache.write(new, 0, b"new")
            assert old.fid != new.fid and old.dir != new.dir
            m.cache.close_handle(old)
            assert await m.cache.read(new, 0, 10) == b"new"
        async with running(tmp_path) as m:
            file = m.cache.by_key["f"]
            assert file.pending and file.fid == new.fid
            assert await m.cache.read(file, 0, 10) == b"new"
            assert [f.fid for f in m.cache.files.values()] == [new.fid]

    trio.run(main)


def test_recorded_block_size_wins_and_another_store_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path) as m:
            file = m.cache.new_file("f", attrs())
            await m.cache.write(file, 0, os.urandom(3 * BS))
        async with running(tmp_path, block_size=2 * BS) as m:
            assert m.cache.block_size == BS
            file = m.cache.by_key["f"]
            before = await m.cache.read(file, 0, 3 * BS)
            await m.cache.write(file, BS + 5, b"!")
            await m.uploader.flush(file)
            stored = await m.uploader.backend.get_range("f")
            assert stored == before[:BS + 5] + b"!" + before[BS + 6:]
        other = tmp_path / "other"
        other.mkdir()
        backend = open_backend(f"file://{other}", {})
        cache = build(backend, str(tmp_path / "cache"), MountOptions(), Notify()).cache
        with pytest.raises(CacheMismatch):
            cache.open()
        backend.close()

    trio.run(main)


def test_attributes_of_a_pending_file_are_journaled(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path) as m:
            file = m.cache.new_file("f", attrs())
            await m.cache.write(file, 0, b"x")
            m.cache.set_attrs(file, replace(attrs(), mode=0o100600, xattrs={b"user.k": b"v"}))
        async with running(tmp_path) as m:
            file = m.cache.by_key["f"]
            assert file.attrs.mode == 0o100600 and file.attrs.xattrs == {b"user.k": b"v"}

    trio.run(main)


def test_writes_during_an_upload_go_up_in_the_next_round(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path) as m:
            file = m.cache.new_file("f", attrs())
            await m.cache.write(file, 0, b"first")
            backend = m.uploader.backend
            gate, started = trio.Event(), trio.Event()
            real = backend.put

            async def held(*args: Any, **kw: Any) -> str:
                started.set()
                await gate.wait()
                return await real(*args, **kw)

            backend.put = held  # type: ignore[method-assign]
            async with trio.open_nursery() as n:
                n.start_soon(m.uploader.upload, file)
                await started.wait()
                await m.cache.write(file, 5, b"+second")
                assert file.status is Status.UPLOADING_DIRTY
                backend.put = real  # type: ignore[method-assign]
                gate.set()
            assert file.pending
            await m.uploader.flush(file)
            assert not file.pending
            assert await backend.get_range("f") == b"first+second"

    trio.run(main)


def gate_downloads(backend: Any, at: int) -> tuple[trio.Event, trio.Event]:
    """Hold ranged GETs that start at byte ``at`` until ``gate`` is set; ``started`` tells
    that one is waiting.  The real download runs once the gate opens."""
    gate, started = trio.Event(), trio.Event()
    real = backend.download

    async def held(key: str, f: Any, start: int, *args: Any, **kw: Any) -> None:
        if start == at:
            started.set()
            await gate.wait()
        await real(key, f, start, *args, **kw)

    backend.download = held
    return gate, started


async def stored_file(m: Mount, key: str, data: bytes) -> Any:
    """A clean file whose stored version is ``data`` and of which nothing is cached."""
    file = m.cache.new_file(key, attrs())
    await m.cache.write(file, 0, data)
    await m.uploader.flush(file)
    m.cache._drop_blocks(file, set(file.present))
    assert not file.present and not file.pending
    return file


def test_a_fetch_in_flight_during_truncate_adds_no_old_bytes(tmp_path: Path) -> None:
    """Case 6 of issue 10: truncate below a block whose fetch is waiting, then extend: the
    fetch's bytes are thrown away and the block reads as zeros."""
    async def main() -> None:
        async with running(tmp_path) as m:
            old = os.urandom(3 * BS)
            file = await stored_file(m, "f", old)
            gate, started = gate_downloads(m.uploader.backend, 2 * BS)
            async with trio.open_nursery() as n:
                n.start_soon(m.cache.ensure_block, file, 2)
                await started.wait()
                await m.cache.truncate(file, BS + 10)
                await m.cache.truncate(file, 3 * BS)
                gate.set()
            assert await m.cache.read(file, 0, 3 * BS) == old[:BS + 10] + bytes(2 * BS - 10)
            await m.uploader.flush(file)
            assert await m.uploader.backend.get_range("f") == old[:BS + 10] + bytes(2 * BS - 10)

    trio.run(main)


def test_truncate_inside_a_block_being_fetched_waits_for_it(tmp_path: Path) -> None:
    """The cut lands in a block whose fetch is in flight: truncate waits for that fetch
    (it needs the block's bytes below the cut) and then cuts it."""
    async def main() -> None:
        async with running(tmp_path) as m:
            old = os.urandom(3 * BS)
            file = await stored_file(m, "f", old)
            gate, started = gate_downloads(m.uploader.backend, BS)
            cut = trio.Event()

            async def truncate() -> None:
                await m.cache.truncate(file, BS + 10)
                cut.set()

            async with trio.open_nursery() as n:
                n.start_soon(m.cache.ensure_block, file, 1)
                await started.wait()
                n.start_soon(truncate)
                await trio.testing.wait_all_tasks_blocked()
                assert not cut.is_set() and file.size == 3 * BS
                gate.set()
            assert file.size == BS + 10
            assert await m.cache.read(file, 0, 3 * BS) == old[:BS + 10]
            await m.uploader.flush(file)
            assert await m.uploader.backend.get_range("f") == old[:BS + 10]

    trio.run(main)


async def staged_and_evicted(m: Mount, key: str, data: bytes) -> Any:
    """A pending file some of whose bytes exist only in its open multipart upload: parts
    sent early (as under cache pressure) and their clean blocks evicted."""
    file = m.cache.new_file(key, attrs())
    await m.cache.write(file, 0, data)
    await m.uploader.stage(file)
    assert file.open_upload is not None and file.staged
    m.cache._drop_blocks(file, set(file.staged))
    await m.cache.make_durable(file)
    return file


def test_an_upload_left_open_by_a_crash_is_continued(tmp_path: Path) -> None:
    """Killed while a big file streamed out: the next start continues its open upload, so
    bytes that only the upload holds are not lost."""
    data = os.urandom(40 * BS)

    async def main() -> None:
        async with running(tmp_path) as m:
            await staged_and_evicted(m, "big", data)
        async with running(tmp_path) as m:
            file = m.cache.by_key["big"]
            assert file.pending and file.open_upload is not None
            await m.uploader.flush(file)
            assert m.cache.stats["lost_bytes"] == 0
            assert await m.uploader.backend.get_range("big") == data

    trio.run(main)


def test_an_upload_committed_but_not_recorded_is_taken_as_the_base(tmp_path: Path) -> None:
    """Killed after the store completed the upload but before the journal said so: the
    next start finds its token on the object and reads the evicted parts from it."""
    data = os.urandom(40 * BS)

    async def main() -> None:
        async with running(tmp_path) as m:
            file = await staged_and_evicted(m, "big", data)
            backend = m.uploader.backend
            real = backend.mpu_complete

            async def reply_lost(*args: Any) -> str:
                await real(*args)
                raise BackendError("connection reset")

            backend.mpu_complete = reply_lost  # type: ignore[method-assign]
            with pytest.raises(BackendError):
                await m.uploader.upload(file)
            assert file.open_upload is not None
        async with running(tmp_path) as m:
            file = m.cache.by_key["big"]
            await m.cache.write(file, 3, b"!")
            await m.uploader.flush(file)
            assert m.cache.stats["lost_bytes"] == 0
            assert await m.uploader.backend.get_range("big") == data[:3] + b"!" + data[4:]

    trio.run(main)


def test_a_file_larger_than_the_cache_goes_up_in_one_upload(tmp_path: Path) -> None:
    """Issue 10 item 19: written sequentially through a cache a sixth of its size, a file is
    sent as one multipart upload, each part once, nothing copied server-side again."""
    async def main() -> None:
        async with running(tmp_path, cache_size=48 * BS, max_dirty=24 * BS, writeback_delay=3600.0) as m:
            backend = m.uploader.backend
            calls: dict[str, int] = {}
            for name in ("mpu_create", "mpu_part", "mpu_part_copy", "mpu_complete", "put"):
                real = getattr(backend, name)

                async def counted(*args: Any, _real: Any = real, _name: str = name) -> Any:
                    calls[_name] = calls.get(_name, 0) + 1
                    return await _real(*args)

                setattr(backend, name, counted)
            data = os.urandom(300 * BS)
            file = m.cache.new_file("big", attrs())
            for off in range(0, len(data), BS):
                await m.cache.write(file, off, data[off:off + BS])
            await m.uploader.flush(file)
            parts = -(-len(data) // m.uploader._part_size(0, streaming=True))
            assert calls == {"mpu_create": 1, "mpu_part": parts, "mpu_complete": 1}
            assert await backend.get_range("big") == data

    trio.run(main)


async def stuck_on_an_unfinished_part(m: Mount) -> tuple[Any, bytes, int]:
    """An open file streaming out through a cache whose dirty budget is one part and a block:
    part 1 staged (its upload open), then every block of part 2 but its first (the kernel
    has not written that one yet) and the first two of part 3, which fill the budget.  No
    part is whole, so staging can free nothing, and ``_streaming`` tells the uploader to
    keep staging.  Returns the file, its final bytes and the blocks in a part."""
    part = m.uploader._part_size(0, streaming=True)
    pb = part // BS
    m.cache.max_bytes = m.cache.max_dirty = part + BS
    data = os.urandom((2 * pb + 3) * BS)
    file = m.cache.new_file("big", attrs())
    m.cache.open_handle(file)
    for b in [*range(pb), *range(pb + 1, 2 * pb + 2)]:
        if b == pb + 1:
            assert await m.uploader.stage(file) and file.open_upload is not None
        await m.cache.write(file, b * BS, data[b * BS:(b + 1) * BS])
    assert m.cache.dirty_bytes == m.cache.max_dirty and not await m.uploader.stage(file)
    # Passes every half second from now on (stage-only while no writer is stalled), so an
    # expedite that arrives while a pass runs waits half a second, not the hour above.
    m.uploader.queue.delay = 0.5
    return file, data, pb


async def write_the_rest(m: Mount, file: Any, data: bytes, done: trio.Event) -> None:
    """The write past the budget: the last block of ``data``, the third of part 3."""
    await m.cache.write(file, len(data) - BS, data[-BS:])
    done.set()


def test_a_writer_stalled_behind_an_unfinished_part_gets_a_whole_round(tmp_path: Path) -> None:
    """A writer waiting for cache space behind an open file whose parts staging cannot send
    (CI: test_sigkill_while_a_file_larger_than_the_cache_streams_out waited 600 s).  After
    ``stall_escalate`` the uploader completes the open upload (a whole round, the file still
    open), the dirty blocks become clean and the writer goes on; the store gets every byte."""
    async def main() -> None:
        async with running(tmp_path) as m:
            file, data, pb = await stuck_on_an_unfinished_part(m)
            backend = m.uploader.backend
            seen: dict[str, Any] = {}
            done = trio.Event()
            real = backend.mpu_complete

            async def complete(*args: Any) -> str:
                etag = await real(*args)
                seen.update(stalled=m.cache.stalled, waiting=m.cache.waiting, opens=file.opens,
                            written=done.is_set(), stored=await backend.get_range("big"))
                return etag

            backend.mpu_complete = complete  # type: ignore[method-assign]
            m.cache.stall_escalate = 0.2

            async with trio.open_nursery() as n:
                n.start_soon(write_the_rest, m, file, data, done)
                with trio.fail_after(60):
                    await done.wait()
            # The upload was completed while the writer waited, stalled, and the file was open;
            # the gap the kernel had not written yet went up as zeros.
            assert seen.pop("stored") == data[:pb * BS] + bytes(BS) + data[(pb + 1) * BS:(2 * pb + 2) * BS]
            assert seen == {"stalled": 1, "waiting": 1, "opens": 1, "written": False}
            assert m.cache.stalled == 0 and m.cache.waiting == 0
            await m.cache.write(file, pb * BS, data[pb * BS:(pb + 1) * BS])  # the kernel's late block
            m.cache.close_handle(file)
            with trio.fail_after(60):
                await m.uploader.flush(file)
            assert not file.pending and m.cache.stats["lost_bytes"] == 0
            assert await backend.get_range("big") == data

    trio.run(main)


def test_without_escalation_a_writer_behind_an_unfinished_part_stays_blocked(tmp_path: Path) -> None:
    """The control of the test above: with ``stall_escalate`` out of reach the uploader only
    stages, which sends nothing, and the writer does not get through."""
    async def main() -> None:
        async with running(tmp_path) as m:
            file, data, _ = await stuck_on_an_unfinished_part(m)
            size, dirty = file.size, dict(file.dirty)
            staged: list[bool] = []  # what each of the uploader's passes sent
            real = m.uploader.stage

            async def counted(f: Any) -> bool:
                staged.append(await real(f))
                return staged[-1]

            m.uploader.stage = counted  # type: ignore[method-assign]
            m.cache.stall_escalate = 3600.0
            done = trio.Event()

            async with trio.open_nursery() as n:
                n.start_soon(write_the_rest, m, file, data, done)
                with trio.fail_after(60):
                    while len(staged) < 2 and not done.is_set():  # the pass the wait asked for, and the next
                        await trio.sleep(0.05)
                with trio.move_on_after(1.0):
                    await done.wait()
                assert not done.is_set() and m.cache.waiting == 1 and m.cache.stalled == 0
                n.cancel_scope.cancel()
            assert not any(staged)
            assert file.size == size and file.dirty == dirty and file.open_upload is not None
            with pytest.raises(NotFound):
                await m.uploader.backend.head("big")

    trio.run(main)


def open_block_files(cache_dir: Path) -> list[str]:
    """Block files under the cache directory this process holds open (deleted ones too)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{cache_dir}/files/"):
            out.append(target)
    return out


def test_block_files_kept_open_for_reads_are_bounded_and_never_outlive_their_block(tmp_path: Path) -> None:
    """Reads keep block files open (no open/close per read), at most READ_FDS of them; a block
    that leaves the cache (truncate, unlink) closes its file, so no deleted block file stays
    held and a block fetched again is read from its new file."""
    from cloudfs.cache.block_cache import READ_FDS

    async def main() -> None:
        async with running(tmp_path, cache_size=1024 * BS) as m:
            f = m.cache.new_file("f", attrs())
            m.cache.open_handle(f)
            nblocks = READ_FDS + 20
            for b in range(nblocks):
                await m.cache.write(f, b * BS, bytes([b % 251]) * BS)
            for b in range(nblocks):
                assert await m.cache.read(f, b * BS + 7, 100) == bytes([b % 251]) * 100
            held = open_block_files(tmp_path / "cache")
            assert 0 < len(held) <= READ_FDS
            await m.cache.truncate(f, 2 * BS)
            held = open_block_files(tmp_path / "cache")
            assert not [p for p in held if p.endswith("(deleted)")], held
            await m.cache.truncate(f, 4 * BS)  # blocks 2, 3 come back as zeros
            assert await m.cache.read(f, 3 * BS, 10) == bytes(10)
            assert await m.cache.read(f, BS, 10) == bytes([1]) * 10
            m.cache.unlink(f)
            m.cache.close_handle(f)
            held = open_block_files(tmp_path / "cache")
            assert held == [], held

    trio.run(main)
