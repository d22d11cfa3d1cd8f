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

from cloudfs.backends import open_backend
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
