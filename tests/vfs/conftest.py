"""In-process tier: the file system (cloudfs.vfs.VFS) driven directly, without FUSE.

A :class:`Rig` wires backend, cache, uploader and VFS exactly as the daemon does
(``cloudfs.daemon.build``) over the local-disk backend, and :class:`FS` offers path-level
calls that behave like the kernel: lookups take references, ``forget_all`` gives them all
back (``echo 2 > /proc/sys/vm/drop_caches``), ``crash`` leaves without uploading anything
(SIGKILL).  A failure here points at a line of cloudfs, not at a mount's log.

Uploads happen only when a test asks (``sync``), unless it sets a write-back delay: the
outcome never depends on timing.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from cloudfs.backends import Backend, Payload, open_backend
from cloudfs.backends.errors import NotFound
from cloudfs.daemon import Mount, build
from cloudfs.inodes import ROOT_INODE, Inode
from cloudfs.options import MountOptions
from cloudfs.vfs import Ctx, Notify, SetAttr

T = TypeVar("T")
KiB = 1024
BS = 64 * KiB  # small blocks: multi-block files stay small
CTX = Ctx(uid=os.getuid(), gid=os.getgid())


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return trio.run(fn, *args)


class RecordingNotify(Notify):
    def __init__(self) -> None:
        self.changed: list[tuple[int, str]] = []

    def entry_changed(self, parent_ino: int, name: str) -> None:
        self.changed.append((parent_ino, name))


class FS:
    """Path-level calls over one running VFS, with kernel-like reference counting."""

    def __init__(self, mount: Mount, backend: Backend, notify: RecordingNotify) -> None:
        self.mount = mount
        self.vfs = mount.vfs
        self.cache = mount.cache
        self.uploader = mount.uploader
        self.backend = backend
        self.notify = notify
        self.crashed = False  # set by a test: leaving the mount then uploads nothing (SIGKILL)

    # ---- names
    async def lookup(self, path: str) -> Inode | None:
        inode = self.vfs.table.root
        for name in [p for p in path.split("/") if p]:
            found = await self.vfs.lookup(inode.ino, os.fsencode(name))
            if found is None:
                return None
            found.lookups += 1  # the kernel holds what a lookup returns
            inode = found
        return inode

    async def stat(self, path: str) -> Inode:
        inode = await self.lookup(path)
        if inode is None:
            raise FileNotFoundError(errno.ENOENT, path)
        return inode

    async def _parent(self, path: str) -> tuple[int, bytes]:
        head, _, name = path.rpartition("/")
        parent = await self.stat(head) if head else self.vfs.table.root
        return parent.ino, os.fsencode(name)

    def forget_all(self) -> None:
        """The kernel drops every inode it holds (memory pressure, drop_caches)."""
        self.vfs.forget([(i.ino, i.lookups) for i in list(self.vfs.table.by_ino.values())
                         if i.ino != ROOT_INODE and i.lookups])

    # ---- files
    async def create(self, path: str, mode: int = 0o644, flags: int = os.O_RDWR) -> int:
        parent, name = await self._parent(path)
        handle, inode = await self.vfs.create(parent, name, stat.S_IFREG | mode, flags | os.O_CREAT, CTX)
        inode.lookups += 1
        return handle.fh

    async def open(self, path: str, flags: int = os.O_RDWR) -> int:
        inode = await self.stat(path)
        return (await self.vfs.open(inode.ino, flags, CTX)).fh

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        return await self.vfs.write(fh, offset, data)

    async def read(self, fh: int, offset: int = 0, size: int = 1 << 30) -> bytes:
        out = b""
        while len(out) < size:
            chunk = await self.vfs.read(fh, offset + len(out), min(size - len(out), 4 * BS))
            if not chunk:
                break
            out += chunk
        return out

    async def release(self, fh: int) -> None:
        await self.vfs.flush(fh)
        await self.vfs.release(fh)

    async def fsync(self, fh: int) -> None:
        await self.vfs.fsync(fh, False)

    async def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        fh = await self.create(path, mode, os.O_RDWR | os.O_TRUNC)
        await self.write(fh, 0, data)
        await self.release(fh)

    async def append(self, path: str, data: bytes) -> None:
        inode = await self.stat(path)
        fh = await self.open(path, os.O_WRONLY | os.O_APPEND)
        await self.write(fh, inode.size, data)  # the kernel turns O_APPEND into the offset
        await self.release(fh)

    async def read_file(self, path: str) -> bytes:
        fh = await self.open(path, os.O_RDONLY)
        try:
            return await self.read(fh)
        finally:
            await self.release(fh)

    # ---- changes
    async def unlink(self, path: str) -> None:
        await self.vfs.unlink(*await self._parent(path), CTX)

    async def rename(self, old: str, new: str, flags: int = 0) -> None:
        await self.vfs.rename(*await self._parent(old), *await self._parent(new), flags, CTX)

    async def mkdir(self, path: str, mode: int = 0o755) -> None:
        parent, name = await self._parent(path)
        (await self.vfs.mkdir(parent, name, stat.S_IFDIR | mode, CTX)).lookups += 1

    async def rmdir(self, path: str) -> None:
        await self.vfs.rmdir(*await self._parent(path), CTX)

    async def setattr(self, path: str, **change: Any) -> Inode:
        inode = await self.stat(path)
        return await self.vfs.setattr(inode.ino, SetAttr(**change), CTX)

    async def setxattr(self, path: str, name: bytes, value: bytes) -> None:
        await self.vfs.setxattr((await self.stat(path)).ino, name, value)

    async def listdir(self, path: str = "") -> list[str]:
        inode = await self.stat(path) if path else self.vfs.table.root
        handle = self.vfs.opendir(inode.ino)
        names: list[str] = []
        start = 0
        try:
            for _ in range(100_000):
                entries = await self.vfs.readdir(handle.fh, start)
                if not entries:
                    break
                for name, child, nxt in entries:
                    if name not in (b".", b".."):
                        names.append(os.fsdecode(name))
                        child.lookups += 1
                    start = nxt
        finally:
            self.vfs.releasedir(handle.fh)
        return sorted(names)

    async def sync(self) -> None:
        """Upload everything pending; every upload must succeed."""
        failed = await self.uploader.flush_all()
        assert not failed, [f.key for f in failed]

    # ---- the store, seen by another tool
    async def stored(self, key: str) -> bytes | None:
        try:
            return await self.backend.get_range(key)
        except NotFound:
            return None

    async def stored_meta(self, key: str) -> dict[str, str]:
        return (await self.backend.head(key)).metadata or {}

    async def keys(self) -> list[str]:
        out: list[str] = []
        async for page in self.backend.list("", None):
            out += [o.key for o in page.objects]
        return sorted(out)

    async def other_tool_puts(self, key: str, data: bytes) -> None:
        await self.backend.put(key, Payload.from_bytes(data))


class Rig:
    """One bucket and one cache directory; each ``mounted()`` is a mount of them."""

    def __init__(self, tmp_path: Path, **options: Any) -> None:
        self.root = tmp_path / "bucket"
        self.root.mkdir(exist_ok=True)
        self.cache_dir = str(tmp_path / "cache")
        self.opts = replace(MountOptions(), block_size=BS, cache_size=256 * BS, min_free=0,
                            writeback_delay=3600.0, attr_timeout=1.0, **options)

    @asynccontextmanager
    async def mounted(self, *, crash: bool = False, **options: Any) -> AsyncIterator[FS]:
        """A mount; leaving it uploads everything (a clean unmount) unless ``crash``.
        A crash still closes the cache directory (the process is gone), but uploads nothing."""
        backend = open_backend(f"file://{self.root}", {})
        os.makedirs(self.cache_dir, mode=0o700, exist_ok=True)
        notify = RecordingNotify()
        mount = build(backend, self.cache_dir, replace(self.opts, **options), notify)
        recovered = mount.cache.open()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(mount.vfs.run)
                await mount.vfs.load_root()
                await mount.vfs.recover(recovered.deletions)
                await nursery.start(mount.uploader.run)
                for file in recovered.pending:
                    mount.queue.schedule(file.fid)
                fs = FS(mount, backend, notify)
                yield fs
                if not (crash or fs.crashed):
                    await fs.sync()
                nursery.cancel_scope.cancel()
        finally:
            mount.cache.close()
            backend.close()


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)
