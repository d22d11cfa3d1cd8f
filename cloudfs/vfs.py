"""The file system: POSIX calls over inodes, the block cache, the uploader and the store.

This layer knows nothing of FUSE (:mod:`cloudfs.fs` is the adapter): its calls take inode
numbers, handles and a :class:`Ctx`, return :class:`~cloudfs.inodes.Inode` objects, and
fail with ``OSError(errno)``.  The in-process tests drive it directly.

Who owns what (docs/concurrency.md has the full table):

* a regular file's size, version, attributes and local state: its File, changed only
  through :class:`~cloudfs.cache.block_cache.BlockCache` methods;
* names and inode numbers: :class:`~cloudfs.inodes.InodeTable`;
* what the store holds under each name, and what is remembered of it: :mod:`cloudfs.metadata`;
* open files and folders: :mod:`cloudfs.handles`; renames: :mod:`cloudfs.rename`.

The kernel's caches are told about changes it cannot see (a conflict gives a name to
another version) through ``notify``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import trio

from cloudfs import layout
from cloudfs.backends import Backend, Payload
from cloudfs.backends.errors import BackendError, NotFound, Transient
from cloudfs.cache.block_cache import BlockCache
from cloudfs.cache.file import File
from cloudfs.cache.uploader import Uploader
from cloudfs.layout import Attrs

from .handles import DirHandle, FileHandle, Handles, NextPage, ReadAhead
from .inodes import ROOT_INODE, Inode, InodeTable, Meta, join, parent_of
from .listings import Fill
from .metadata import ListingPage, Metadata, MetadataOptions
from .rename import Renamer

log = logging.getLogger(__name__)

XATTR_NAMESPACE = b"user."
NAME_MAX = 255


@dataclass(frozen=True)
class Ctx:
    """Who makes a call (from the FUSE request)."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0o022


@dataclass
class SetAttr:
    """The attributes a setattr changes; None: unchanged."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    mtime_ns: int | None = None
    atime_ns: int | None = None
    ctime_ns: int | None = None  # the kernel's, when it keeps the times (write-back cache)


@dataclass
class VfsOptions:
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    read_only: bool = False
    attr_timeout: float = 10.0
    dir_cache_time: float = 300.0
    dir_cache_entries: int = 100_000
    sync_upload: bool = False
    readahead_blocks: int = 4
    file_mode: int = layout.DEFAULT_FILE_MODE  # of objects whose metadata has no mode
    dir_mode: int = layout.DEFAULT_DIR_MODE


class Notify:
    """What the kernel is told about changes it did not make.  The FUSE adapter sends them
    (pyfuse3.invalidate_entry_async); in-process tests record them."""

    def entry_changed(self, parent_ino: int, name: str) -> None:
        pass


def fail(code: int, what: str = "") -> OSError:
    return OSError(code, what or os.strerror(code))


class VFS:
    def __init__(self, backend: Backend, cache: BlockCache, uploader: Uploader, opts: VfsOptions,
                 intents_dir: str, notify: Notify | None = None) -> None:
        self.backend = backend
        self.cache = cache
        self.uploader = uploader
        self.opts = opts
        self.notify = notify or Notify()
        self._background: trio.Nursery | None = None  # read-ahead fetches, next listing pages; see run()
        root = Meta(Attrs(stat.S_IFDIR | opts.dir_mode, opts.uid, opts.gid, time.time_ns()), stored=True)
        self.table = InodeTable(root, on_drop=self._dropped)
        self.meta = Metadata(backend, cache, self.table,
                             MetadataOptions(opts.uid, opts.gid, opts.attr_timeout, opts.dir_cache_time,
                                             dir_cache_entries=opts.dir_cache_entries,
                                             file_mode=opts.file_mode, dir_mode=opts.dir_mode))
        self.handles = Handles()
        self._fills: dict[int, Fill] = {}  # directory handle -> its listing from the store in progress
        self.renamer = Renamer(backend, cache, self.table, intents_dir)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve background work (read-ahead fetches, the next page of a listing) until
        cancelled; without it, reads fetch no read-ahead and listings one page at a time."""
        async with trio.open_nursery() as nursery:
            self._background = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._background = None

    # ------------------------------------------------------------------ callbacks
    def _dropped(self, inode: Inode) -> None:
        if inode.file is not None:
            self.cache.forget(inode.file)

    def on_uploaded(self, file: File) -> None:
        """The uploader stored ``file``: an inode nothing else pins may go now."""
        self.meta.uploaded(file)
        inode = self.table.get(file.key)
        if inode is not None and inode.file is file:
            self.table.release(inode)

    def on_conflict(self, file: File, old_key: str) -> None:
        """A conflict: the store's version keeps ``old_key``, the local file now lives on under
        ``file.key`` (its conflict name).  The inode follows it; the old name's next lookup
        finds the store's version as a new inode."""
        new_key = file.key
        inode = self.table.get(old_key)
        if inode is None or inode.file is not file:
            return
        self.table.move(old_key, new_key)
        self.meta.removed(old_key, folder=False)
        self.meta.replaced_elsewhere(old_key)  # the store's version has the name
        self.meta.added(new_key)
        parent = self.table.get(parent_of(old_key))
        if parent is not None:
            self.notify.entry_changed(parent.ino, old_key.rpartition("/")[2])

    # ------------------------------------------------------------------ helpers
    def inode(self, ino: int) -> Inode:
        try:
            return self.table[ino]
        except KeyError:
            raise fail(errno.ENOENT) from None

    def _writable(self) -> None:
        if self.opts.read_only:
            raise fail(errno.EROFS)

    def _path(self, parent: Inode, name: bytes) -> str:
        if len(name) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)
        if not parent.is_dir:
            raise fail(errno.ENOTDIR)
        try:
            text = os.fsdecode(name)
            text.encode("utf-8")
        except UnicodeError:
            raise fail(errno.EINVAL, "names must be UTF-8") from None  # keys are UTF-8
        return join(parent.path, text)

    def _check_key(self, key: str) -> None:
        self.backend.validate_key(key)

    async def _lookup(self, path: str) -> Inode | None:
        return await self.meta.lookup(path)

    async def _existing(self, parent_ino: int, name: bytes) -> tuple[str, Inode]:
        path = self._path(self.inode(parent_ino), name)
        inode = await self._lookup(path)
        if inode is None:
            raise fail(errno.ENOENT)
        return path, inode

    # ------------------------------------------------------------------ lookups
    async def lookup(self, parent_ino: int, name: bytes) -> Inode | None:
        parent = self.inode(parent_ino)
        if name == b".":
            return parent
        if name == b"..":
            return self.table.get(parent_of(parent.path)) or self.table.root
        return await self._lookup(self._path(parent, name))

    def forget(self, items: list[tuple[int, int]]) -> None:
        for ino, n in items:
            self.table.forget(ino, n)

    # ------------------------------------------------------------------ attributes
    async def setattr(self, ino: int, change: SetAttr, ctx: Ctx) -> Inode:
        self._writable()
        inode = self.inode(ino)
        attrs = replace(inode.attrs, xattrs=dict(inode.attrs.xattrs))
        now = time.time_ns()
        if change.mode is not None:
            attrs.mode = stat.S_IFMT(attrs.mode) | stat.S_IMODE(change.mode)
        if change.uid is not None:
            attrs.uid = change.uid
        if change.gid is not None:
            attrs.gid = change.gid
        if change.mtime_ns is not None:
            attrs.mtime_ns = change.mtime_ns
        if change.atime_ns is not None:
            attrs.atime_ns = change.atime_ns
        if change.size is not None:
            if inode.file is None:
                raise fail(errno.EISDIR if inode.is_dir else errno.EINVAL)
            await self.cache.truncate(inode.file, change.size)
            if change.mtime_ns is None:
                attrs.mtime_ns = now
        if change != SetAttr():
            # Every attribute change, a truncate or a utime of atime alone included, is a
            # change of the inode: its ctime moves.
            attrs.ctime_ns = now if change.ctime_ns is None else change.ctime_ns
            await self._store_attrs(inode, attrs)
        return inode

    async def _store_attrs(self, inode: Inode, attrs: Attrs) -> None:
        """New attributes: a file's go up with it (journaled now); a folder marker or a symlink
        is updated on the store at once."""
        meta_text = {**(inode.file.foreign if inode.file else inode.meta.foreign),  # type: ignore[union-attr]
                     **layout.encode(attrs)}
        if layout.metadata_size(meta_text) > self.backend.capabilities.max_metadata_bytes:
            raise fail(errno.ENOSPC, "attributes do not fit in the store's metadata")
        file = inode.file
        if file is not None:
            was_clean = not file.pending and file.base is not None
            self.cache.set_attrs(file, attrs)  # journaled: from here on it survives a crash
            if was_clean:
                # A stored object's attributes go up at once (a metadata-only update); if the
                # store fails, the change stays pending and the write-back queue retries it.
                try:
                    await self.uploader.flush(file)
                except BackendError as exc:
                    log.warning("%s: attributes stay pending: %s", file.key, exc)
            return
        meta = inode.meta
        assert meta is not None
        if inode.ino == ROOT_INODE:
            if not self.backend.prefix:
                # A bucket's root has no object to keep attributes in: times live for the
                # mount only, anything else is refused.
                if (attrs.mode, attrs.uid, attrs.gid, attrs.xattrs) != (
                        meta.attrs.mode, meta.attrs.uid, meta.attrs.gid, meta.attrs.xattrs):
                    raise fail(errno.EPERM, "the root of a bucket has no object to store attributes in")
                meta.attrs = attrs
                return
            # Mounted on a prefix: the prefix's own folder marker holds them.
            meta.etag = await self.backend.put("", Payload.from_bytes(b""), meta_text)
        elif inode.is_dir:
            meta.etag = await self.backend.put(inode.key, Payload.from_bytes(b""), meta_text)
        else:
            meta.etag = await self.backend.set_metadata(inode.key, meta_text)
        meta.attrs, meta.stored = attrs, True
        meta.refreshed = time.monotonic()

    async def load_root(self) -> None:
        """Read the root's attributes from the prefix marker, when mounted on a prefix."""
        if not self.backend.prefix:
            return
        try:
            info = await self.backend.head("")
        except NotFound:
            return
        root = self.table.root.meta
        assert root is not None
        decoded = self.meta.decode(info, is_dir=True)
        root.attrs, root.etag, root.stored = decoded, info.etag, True
        root.foreign = layout.foreign(info.metadata)

    # ------------------------------------------------------------------ directories
    async def mkdir(self, parent_ino: int, name: bytes, mode: int, ctx: Ctx) -> Inode:
        self._writable()
        path = self._path(self.inode(parent_ino), name)
        self._check_key(path + "/")
        if await self._lookup(path) is not None:
            raise fail(errno.EEXIST)
        attrs = Attrs(stat.S_IFDIR | stat.S_IMODE(mode), ctx.uid, ctx.gid, time.time_ns())
        etag = await self.backend.put(path + "/", Payload.from_bytes(b""), layout.encode(attrs))
        inode = self.table.add(path, meta=Meta(attrs, etag, True))
        self.meta.created_dir(path)
        return inode

    async def _is_empty(self, inode: Inode) -> bool:
        if self.meta.pending_below(inode.path):
            return False
        page = await self.backend.list_page(inode.key, "/", None, 2)
        return not page.prefixes and all(o.key == inode.key for o in page.objects)

    async def rmdir(self, parent_ino: int, name: bytes, ctx: Ctx) -> None:
        self._writable()
        if name == b".":
            raise fail(errno.EINVAL)
        path, inode = await self._existing(parent_ino, name)
        if not inode.is_dir:
            raise fail(errno.ENOTDIR)
        if not await self._is_empty(inode):
            raise fail(errno.ENOTEMPTY)
        await self.backend.delete(inode.key)
        self.table.detach(inode)
        self.meta.removed(path)

    def opendir(self, ino: int) -> DirHandle:
        inode = self.inode(ino)
        if not inode.is_dir:
            raise fail(errno.ENOTDIR)
        return self.handles.open_dir(inode)

    async def readdir(self, fh: int, start: int) -> list[tuple[bytes, Inode, int]]:
        """Entries from index ``start`` on, as (name, inode, next index); as many as one listing
        page gives (the adapter asks again for more until it gets none)."""
        handle = self.handles.dir(fh)
        while start >= len(handle.entries) and await self._fill(handle):
            pass
        out = []
        for i in range(start, len(handle.entries)):
            name, inode = handle.entries[i]
            out.append((name, inode, i + 1))
        return out

    async def _fill(self, handle: DirHandle) -> bool:
        """One more listing page into the handle; False when the listing is done.  A folder
        whose complete listing is held (within dir_cache_time) is answered from it, with no
        request; otherwise it is listed from the store and the result is kept."""
        if handle.done:
            return False
        path = handle.inode.path
        if not handle.started:
            handle.started = True
            handle.add(".", handle.inode)
            handle.add("..", self.table.get(parent_of(path)) or self.table.root)
            for child in self.meta.local_children(path):
                handle.add(child.path.rpartition("/")[2], child)
            cached = await self.meta.cached_listing(path)
            if cached is not None:
                for inode in cached:
                    handle.add(inode.path.rpartition("/")[2], inode)
                handle.done = True
                return True
            self._fills[handle.fh] = self.meta.begin_fill(path)
        try:
            page = await self._next_page(handle)
        except Transient:
            last = await self.meta.cached_listing(path, stale=True) if handle.token is None else None
            if last is None:
                raise
            for inode in last:  # the store does not answer: the last complete listing stands
                handle.add(inode.path.rpartition("/")[2], inode)
            handle.done = True
            self._end_fill(handle.fh, None)
            return True
        for inode in page.entries:
            handle.add(inode.path.rpartition("/")[2], inode)
        handle.token = page.token
        handle.done = page.done
        if page.done:
            self._end_fill(handle.fh, [(os.fsdecode(name), inode) for name, inode in handle.entries[2:]])
        else:
            self._start_next_page(handle)
        return True

    def _start_next_page(self, handle: DirHandle) -> None:
        """Fetch the page after the handle's in the background: its LIST and HEADs go while
        the kernel takes this page's entries, instead of after them."""
        if self._background is None or handle.token is None:
            return
        next_page = handle.next_page = NextPage(handle.token)
        path = handle.inode.path

        async def fetch() -> None:
            with next_page.scope:
                try:
                    next_page.page = await self.meta.list_page(path, next_page.token, handle.seen)
                except Exception as exc:  # handed to the fill that waits for it
                    next_page.error = exc
            next_page.done.set()

        self._background.start_soon(fetch)

    async def _next_page(self, handle: DirHandle) -> ListingPage:
        """The page after the handle's token: the one in flight if there is one."""
        next_page, handle.next_page = handle.next_page, None
        if next_page is not None and next_page.token == handle.token:
            await next_page.done.wait()
            if next_page.error is not None:
                raise next_page.error
            if next_page.page is not None:
                return next_page.page
        elif next_page is not None:
            next_page.scope.cancel()
        return await self.meta.list_page(handle.inode.path, handle.token, handle.seen)

    def _end_fill(self, fh: int, entries: list[tuple[str, Inode]] | None) -> None:
        fill = self._fills.pop(fh, None)
        if fill is not None:
            self.meta.end_fill(fill, entries)

    def releasedir(self, fh: int) -> None:
        self._end_fill(fh, None)  # a listing given up half-way is not kept
        handle = self.handles.dirs.pop(fh, None)
        if handle is not None and handle.next_page is not None:
            handle.next_page.scope.cancel()

    # ------------------------------------------------------------------ files
    async def create(self, parent_ino: int, name: bytes, mode: int, flags: int, ctx: Ctx
                     ) -> tuple[FileHandle, Inode]:
        self._writable()
        path = self._path(self.inode(parent_ino), name)
        self._check_key(path)
        existing = await self.meta.lookup_for_create(path)
        if existing is not None:
            # The kernel sends CREATE while it holds a negative entry: another tool may have
            # made the name meanwhile.  Open it as it is (O_TRUNC only if asked for).
            if flags & os.O_EXCL:
                raise fail(errno.EEXIST)
            if existing.is_dir:
                raise fail(errno.EISDIR)
            return await self.open(existing.ino, flags, ctx), existing
        attrs = Attrs(stat.S_IFREG | stat.S_IMODE(mode), ctx.uid, ctx.gid, time.time_ns())
        file = self.cache.new_file(path, attrs)
        self.renamer.adopt(file)
        inode = self.table.add(path, file=file)
        self.meta.added(path)
        return self._open_handle(inode, file, flags), inode

    def _open_handle(self, inode: Inode, file: File, flags: int) -> FileHandle:
        self.cache.open_handle(file)
        return self.handles.open_file(inode, file, flags, ReadAhead(self.cache.block_size,
                                                                    self.opts.readahead_blocks))

    async def open(self, ino: int, flags: int, ctx: Ctx) -> FileHandle:
        inode = self.inode(ino)
        if inode.is_dir:
            raise fail(errno.EISDIR)
        if inode.file is None:
            raise fail(errno.ELOOP if flags & os.O_NOFOLLOW else errno.EINVAL)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            self._writable()
        file = inode.file
        handle = self._open_handle(inode, file, flags)
        # The kernel leaves an O_TRUNC open to the file system (atomic_o_trunc), so the
        # S_ISUID/S_ISGID a truncate by another user clears are cleared here.
        mode = dropped_privileges(file.attrs, ctx) if flags & os.O_TRUNC else file.attrs.mode
        if flags & os.O_TRUNC and (file.size or mode != file.attrs.mode):
            try:
                if file.size:
                    await self.cache.truncate(file, 0)
                now = time.time_ns()
                self.cache.set_attrs(file, replace(file.attrs, mode=mode, mtime_ns=now, ctime_ns=now))
            except BaseException:
                await self.release(handle.fh)
                raise
        return handle

    def keep_cache(self, handle: FileHandle) -> bool:
        """Whether the kernel may keep the pages it cached for this inode: yes unless the
        file's blocks stopped meaning what they meant (a rebase the kernel did not see)."""
        keep = handle.inode.kernel_epoch == handle.file.epoch
        handle.inode.kernel_epoch = handle.file.epoch
        return keep

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        # No access-mode check: with writeback caching the kernel reads partial pages through
        # write-only handles (O_APPEND writers); a program cannot read through one anyway.
        handle = self.handles.file(fh)
        ahead = handle.readahead.advise(offset, offset + size)  # in arrival order, not completion
        data = await self.cache.read(handle.file, offset, size)
        if ahead and self._background is not None and data:
            for block in self.cache.prefetch_range(handle.file, offset + len(data) - 1, ahead):
                self._background.start_soon(self._prefetch, handle.file, block)
        return data

    async def _prefetch(self, file: File, block: int) -> None:
        try:
            await self.cache.ensure_block(file, block)
        except (BackendError, OSError) as exc:  # read-ahead is optional: never let it end the mount
            log.debug("read-ahead of %s block %d failed: %s", file.key, block, exc)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        self._writable()
        handle = self.handles.file(fh)
        if not handle.writable:
            raise fail(errno.EBADF)
        if offset + len(data) > self.backend.capabilities.max_part_size * self.backend.capabilities.max_parts:
            raise fail(errno.EFBIG)
        return await self.cache.write(handle.file, offset, data)

    async def flush(self, fh: int) -> None:
        handle = self.handles.file(fh)
        if handle.file.pending and self.opts.sync_upload:
            await self.uploader.flush(handle.file)

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.handles.file(fh)
        file = handle.file
        if not file.pending:
            return
        if self.opts.sync_upload:
            await self.uploader.flush(file)
        else:
            await self.cache.make_durable(file)

    async def release(self, fh: int) -> None:
        handle = self.handles.files.pop(fh, None)
        if handle is None:
            return
        file = handle.file
        doomed = self.cache.close_handle(file)
        if doomed is not None:
            await self._delete_unlinked(file, doomed.etag)
        self.table.release(handle.inode)

    async def _delete_unlinked(self, file: File, etag: str | None) -> None:
        """Delete the stored version of a file unlinked while open, unless its name now holds
        something else (a new file made here, or another version)."""
        key = file.key
        try:
            if key not in self.cache.by_key:
                info = await self.backend.head(key)
                if info.etag == etag:
                    await self.backend.delete(key)
        except NotFound:
            pass
        self.cache.deleted(file)

    async def unlink(self, parent_ino: int, name: bytes, ctx: Ctx) -> None:
        self._writable()
        path, inode = await self._existing(parent_ino, name)
        if inode.is_dir:
            raise fail(errno.EISDIR)
        await self._remove_file(inode)
        self.table.detach(inode)
        self.meta.removed(path, folder=False)

    async def _remove_file(self, inode: Inode) -> None:
        """The object at ``inode``'s name goes away: journaled first, so a crash can neither
        resurrect the file nor leave its object behind."""
        file = inode.file
        if file is None:  # a symlink
            await self.backend.delete(inode.key)
            return
        await self._stop_uploads(file)
        stored = file.base
        if stored is None:  # never uploaded: nothing on the store
            self.cache.unlink(file)
            return
        if file.fid is None:  # nothing of it here (no storage, no journal record)
            await self.backend.delete(inode.key)
            self.cache.unlink(file)
            return
        self.cache.unlink(file, delete_on_close=stored)  # journaled: a crash still deletes it
        if file.opens and not self._fully_cached(file):
            return  # open handles may still read blocks of the stored version: at last close
        await self.backend.delete(inode.key)
        self.cache.deleted(file)

    async def _stop_uploads(self, file: File) -> None:
        """No upload of ``file`` is in flight or open: one finishing later would resurrect it."""
        await file.idle.wait()
        await self.uploader.discard(file)

    def _fully_cached(self, file: File) -> bool:
        bs = self.cache.block_size
        return all(b in file.present for b in range(0, -(-file.fetch_limit // bs)))

    # ------------------------------------------------------------------ renames
    async def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes,
                     flags: int, ctx: Ctx) -> None:
        self._writable()
        if flags & ~RENAME_NOREPLACE:
            raise fail(errno.EINVAL, "rename flags other than RENAME_NOREPLACE are not supported")
        old, inode = await self._existing(parent_old, name_old)
        new = self._path(self.inode(parent_new), name_new)
        self._check_key(new + ("/" if inode.is_dir else ""))
        if old == new:
            return
        if inode.is_dir and (new + "/").startswith(old + "/"):
            raise fail(errno.EINVAL)
        target = await self._lookup(new)
        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise fail(errno.EEXIST)
            if target.is_dir and not inode.is_dir:
                raise fail(errno.EISDIR)
            if inode.is_dir and not target.is_dir:
                raise fail(errno.ENOTDIR)
            if target.is_dir and not await self._is_empty(target):
                raise fail(errno.ENOTEMPTY)
        if target is not None and not target.is_dir:
            if inode.file is not None and inode.file.base is None:
                await self._remove_file(target)  # nothing of ours overwrites its object on the store
            else:
                await self._replaced(target)
        # The renamed inode's ctime moves (as on Linux): it is stored with the moved folder
        # marker or object, in the rename's own request.
        moved = replace(inode.attrs, xattrs=dict(inode.attrs.xattrs), ctime_ns=time.time_ns())
        await self.renamer.rename(inode, new, moved)
        if target is not None:
            self.table.detach(target)
        self.table.move(old, new)
        self.meta.removed(old)
        self.meta.added(new)
        if inode.meta is not None:
            inode.meta.attrs = moved  # a File took them in the rename

    async def _replaced(self, target: Inode) -> None:
        """A file the rename replaces: its object is overwritten by the move, so only the local
        state goes (open handles keep what they have)."""
        file = target.file
        if file is None:
            return
        await self._stop_uploads(file)
        self.cache.unlink(file)

    # ------------------------------------------------------------------ symlinks, links, nodes
    async def symlink(self, parent_ino: int, name: bytes, target: bytes, ctx: Ctx) -> Inode:
        self._writable()
        path = self._path(self.inode(parent_ino), name)
        self._check_key(path)
        if await self._lookup(path) is not None:
            raise fail(errno.EEXIST)
        attrs = Attrs(stat.S_IFLNK | 0o777, ctx.uid, ctx.gid, time.time_ns(), size=len(target))
        etag = await self.backend.put(path, Payload.from_bytes(target), layout.encode(attrs))
        inode = self.table.add(path, meta=Meta(attrs, etag, True, target=target))
        self.meta.added(path)
        return inode

    async def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int, ctx: Ctx) -> Inode:
        """A FIFO, socket or device node is an empty object that holds its attributes (the
        kernel does its I/O; nodev keeps devices closed); S_IFREG makes an empty file."""
        self._writable()
        path = self._path(self.inode(parent_ino), name)
        self._check_key(path)
        ftype = stat.S_IFMT(mode) or stat.S_IFREG
        if ftype not in layout.SPECIAL_TYPES and ftype != stat.S_IFREG:
            raise fail(errno.EINVAL)
        if await self._lookup(path) is not None:
            raise fail(errno.EEXIST)
        attrs = Attrs(ftype | stat.S_IMODE(mode), ctx.uid, ctx.gid, time.time_ns(),
                      rdev=rdev if ftype in (stat.S_IFCHR, stat.S_IFBLK) else 0)
        if ftype == stat.S_IFREG:
            file = self.cache.new_file(path, attrs)
            self.renamer.adopt(file)
            inode = self.table.add(path, file=file)
        else:
            etag = await self.backend.put(path, Payload.from_bytes(b""), layout.encode(attrs))
            inode = self.table.add(path, meta=Meta(attrs, etag, True))
        self.meta.added(path)
        return inode

    async def readlink(self, ino: int) -> bytes:
        inode = self.inode(ino)
        if not inode.is_symlink or inode.meta is None:
            raise fail(errno.EINVAL)
        if inode.meta.target is None:
            inode.meta.target = await self.backend.get_range(inode.path)
        return inode.meta.target

    # ------------------------------------------------------------------ xattrs
    def getxattr(self, ino: int, name: bytes) -> bytes:
        """ENOTSUP for the namespaces never stored (``security.*``, ``system.*``...): that
        tells ``ls -l`` the whole mount has no SELinux labels or ACLs, so it stops asking for
        them per file -- two FUSE requests per entry otherwise."""
        if not name.startswith(XATTR_NAMESPACE):
            raise fail(errno.ENOTSUP)
        try:
            return self.inode(ino).attrs.xattrs[name]
        except KeyError:
            raise fail(errno.ENODATA) from None

    def listxattr(self, ino: int) -> list[bytes]:
        return list(self.inode(ino).attrs.xattrs)

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._writable()
        if not name.startswith(XATTR_NAMESPACE):
            raise fail(errno.ENOTSUP, "only user.* extended attributes are stored")
        inode = self.inode(ino)
        attrs = replace(inode.attrs, xattrs={**inode.attrs.xattrs, name: value}, ctime_ns=time.time_ns())
        await self._store_attrs(inode, attrs)

    async def removexattr(self, ino: int, name: bytes) -> None:
        self._writable()
        if not name.startswith(XATTR_NAMESPACE):
            raise fail(errno.ENOTSUP, "only user.* extended attributes are stored")
        inode = self.inode(ino)
        if name not in inode.attrs.xattrs:
            raise fail(errno.ENODATA)
        attrs = replace(inode.attrs, xattrs={k: v for k, v in inode.attrs.xattrs.items() if k != name},
                        ctime_ns=time.time_ns())
        await self._store_attrs(inode, attrs)

    # ------------------------------------------------------------------ start-up
    async def recover(self, deletions: list[File]) -> None:
        """After a crash: finish interrupted renames, delete what was unlinked while open."""
        await self.renamer.replay()
        for file in deletions:
            assert file.delete_on_close is not None
            await self._delete_unlinked(file, file.delete_on_close.etag)


def in_group(ctx: Ctx, gid: int) -> bool:
    """Whether the caller is in group ``gid``: its own, or one of its supplementary groups
    (which a FUSE request does not carry: read from /proc while the caller waits for us)."""
    if ctx.gid == gid:
        return True
    try:
        with open(f"/proc/{ctx.pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return str(gid) in line.split()[1:]
    except OSError:
        pass
    return False


def dropped_privileges(attrs: Attrs, ctx: Ctx) -> int:
    """The mode a write or truncate by ``ctx`` leaves a regular file (Linux's
    setattr_should_drop_suidgid): S_ISUID goes, and S_ISGID when group-executable or when the
    caller is not in the file's group, unless the caller is root (CAP_FSETID)."""
    mode = attrs.mode
    if ctx.uid == 0 or not stat.S_ISREG(mode):
        return mode
    mode &= ~stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not in_group(ctx, attrs.gid)):
        mode &= ~stat.S_ISGID
    return mode


RENAME_NOREPLACE = 1  # linux/fs.h
OnConflict = Callable[[File, str], None]
