"""The pyfuse3 adapter: FUSE requests in, :class:`~cloudfs.vfs.VFS` calls out.

This module only translates: request contexts and setattr fields into VFS arguments,
:class:`~cloudfs.inodes.Inode` objects into ``EntryAttributes``, and errors into errno
values.  Every handler runs under :func:`fuse_errors`, the one boundary where errors become
errno values: an exception escaping a pyfuse3 handler would kill the whole mount.

Lookup counts: every reply that hands the kernel an inode (lookup, create, mkdir,
symlink, readdir entries other than ``.``/``..``) adds one, and ``forget`` takes them back.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import pyfuse3

from cloudfs.backends.base import trace_arg
from cloudfs.backends.errors import BackendError

from .inodes import Inode
from .vfs import VFS, Ctx, Notify, SetAttr

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def fuse_errors(fn: F) -> F:
    params = list(inspect.signature(fn).parameters)[1:]  # after self

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kw: Any) -> Any:
        if log.isEnabledFor(logging.DEBUG):  # -o debug: one line per FUSE request
            log.debug("fuse %s(%s)", fn.__name__, ", ".join(
                f"{name}={_trace(name, value)}" for name, value in zip(params, args[1:], strict=False)))
        try:
            try:
                return await fn(*args, **kw)
            except BaseExceptionGroup as group:
                # Parallel requests (nurseries) fail as a group: the first real error decides.
                raise _first_leaf(group) from None
        except pyfuse3.FUSEError:
            raise
        except BackendError as exc:
            log.warning("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            if exc.errno not in _QUIET:
                log.warning("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return cast(F, wrapper)


_NAME_PARAMS = {"name", "name_old", "name_new", "new_name", "target"}


def _trace(param: str, value: Any) -> str:
    """A request argument as the debug trace shows it: names (file names, symlink targets,
    xattr names) as text; data and xattr values only by size."""
    if param in _NAME_PARAMS and isinstance(value, bytes):
        return repr(os.fsdecode(value))
    if param == "ctx":
        return f"uid {value.uid} pid {value.pid}" if value is not None else "-"
    if isinstance(value, pyfuse3.EntryAttributes | pyfuse3.SetattrFields | pyfuse3.ReaddirToken):
        return f"<{type(value).__name__}>"
    return trace_arg(value)


# Answers that are part of normal operation, not worth a log line.
_QUIET = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENODATA, errno.ENOTDIR,
          errno.EISDIR, errno.EINVAL, errno.ENOTSUP, errno.EPERM, errno.EROFS}


def _first_leaf(group: BaseExceptionGroup) -> BaseException:  # type: ignore[type-arg]
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for preferred in (pyfuse3.FUSEError, BackendError, OSError):
        for leaf in leaves:
            if isinstance(leaf, preferred):
                return leaf
    return leaves[0] if leaves else group


def _ctx(ctx: Any) -> Ctx:
    if ctx is None:
        return Ctx()
    return Ctx(uid=ctx.uid, gid=ctx.gid, pid=ctx.pid, umask=ctx.umask)


class KernelNotify(Notify):
    """Tells the kernel to drop a cached name (it would otherwise keep the old inode)."""

    def entry_changed(self, parent_ino: int, name: str) -> None:
        try:
            pyfuse3.invalidate_entry_async(parent_ino, os.fsencode(name), ignore_enoent=True)
        except Exception as exc:  # the kernel may have dropped it already
            log.debug("invalidate %s: %s", name, exc)


class CloudFS(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, vfs: VFS) -> None:
        super().__init__()
        self.vfs = vfs

    # ------------------------------------------------------------------ replies
    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        attrs = inode.attrs
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode.ino
        a.st_mode = attrs.mode
        a.st_rdev = attrs.rdev
        # A file no name refers to any more (unlinked or replaced while open) has no links.
        a.st_nlink = 2 if inode.is_dir else 0 if inode.file is not None and inode.file.unlinked else 1
        a.st_uid = attrs.uid
        a.st_gid = attrs.gid
        a.st_size = inode.size
        a.st_blksize = 1024 * 1024
        a.st_blocks = (a.st_size + 511) // 512
        a.st_mtime_ns = attrs.mtime_ns
        a.st_atime_ns = attrs.mtime_ns if attrs.atime_ns is None else attrs.atime_ns
        a.st_ctime_ns = inode.ctime_ns
        # A folder seen only as a listing prefix may have a marker with attributes: let the
        # kernel ask again (lookup resolves it) instead of caching the defaults.
        provisional = inode.meta is not None and inode.meta.provisional
        timeout = 0 if provisional else self.vfs.opts.attr_timeout
        a.attr_timeout = a.entry_timeout = timeout
        return a

    def _entry(self, inode: Inode) -> pyfuse3.EntryAttributes:
        """A reply that hands the kernel a reference to ``inode``."""
        inode.lookups += 1
        return self._attrs(inode)

    def _negative(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0  # the kernel caches the absence for entry_timeout
        a.entry_timeout = self.vfs.opts.attr_timeout
        return a

    # ------------------------------------------------------------------ names and attributes
    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        inode = await self.vfs.lookup(parent_inode, name)
        return self._negative() if inode is None else self._entry(inode)

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attrs(self.vfs.inode(inode))

    def forget(self, inode_list: list[tuple[int, int]]) -> None:  # type: ignore[override]
        self.vfs.forget(inode_list)

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        change = SetAttr(
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            # With the write-back cache the kernel keeps a regular file's times and sends
            # its ctime along (FATTR_CTIME); for others the change's time is taken here.
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        )
        return self._attrs(await self.vfs.setattr(inode, change, _ctx(ctx)))

    # ------------------------------------------------------------------ directories
    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._entry(await self.vfs.mkdir(parent_inode, name, mode, _ctx(ctx)))

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.vfs.rmdir(parent_inode, name, _ctx(ctx))

    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        return self.vfs.opendir(inode).fh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        while True:
            entries = await self.vfs.readdir(fh, start_id)
            if not entries:
                return
            for name, inode, next_id in entries:
                if not pyfuse3.readdir_reply(token, name, self._attrs(inode), next_id):
                    return
                if name not in (b".", b".."):  # the kernel takes no reference for these
                    inode.lookups += 1
                start_id = next_id

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self.vfs.releasedir(fh)

    # ------------------------------------------------------------------ files
    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        handle, inode = await self.vfs.create(parent_inode, name, mode, flags, _ctx(ctx))
        info = pyfuse3.FileInfo(fh=handle.fh, keep_cache=self.vfs.keep_cache(handle))
        return info, self._entry(inode)

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        handle = await self.vfs.open(inode, flags, _ctx(ctx))
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=self.vfs.keep_cache(handle))

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.vfs.read(fh, off, size)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.vfs.write(fh, off, buf)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        await self.vfs.flush(fh)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.vfs.fsync(fh, datasync)

    @fuse_errors
    async def release(self, fh: int) -> None:
        await self.vfs.release(fh)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.vfs.unlink(parent_inode, name, _ctx(ctx))

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        await self.vfs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags, _ctx(ctx))

    # ------------------------------------------------------------------ links and nodes
    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.vfs.symlink(parent_inode, name, target, _ctx(ctx)))

    @fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self.vfs.readlink(inode)

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
                   ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)  # objects cannot share content under two names

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.vfs.mknod(parent_inode, name, mode, rdev, _ctx(ctx)))

    # ------------------------------------------------------------------ xattrs
    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return self.vfs.getxattr(inode, name)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return self.vfs.listxattr(inode)

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        await self.vfs.setxattr(inode, name, value)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await self.vfs.removexattr(inode, name)

    # ------------------------------------------------------------------ misc
    @fuse_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = 1024 * 1024
        s.f_frsize = 4096
        # Object stores have no fixed size: report a large, stable capacity (as rclone does).
        s.f_blocks = 2**40 // s.f_frsize
        s.f_bfree = s.f_bavail = s.f_blocks
        s.f_files = s.f_ffree = s.f_favail = 2**32
        s.f_namemax = 255
        return s
