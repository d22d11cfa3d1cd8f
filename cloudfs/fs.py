"""FUSE operations: POSIX calls turned into object-store and cache calls.

Every handler runs under :func:`fuse_errors`, the one boundary where errors become errno
values: an exception escaping a pyfuse3 handler would kill the whole mount.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import pyfuse3
import trio

from cloudfs.backends import Backend, ObjectInfo, Payload
from cloudfs.backends.errors import BackendError, NotFound
from cloudfs.cache.block_cache import BlockCache, Entry, Remote
from cloudfs.cache.uploader import Uploader

from . import layout
from .layout import Attrs
from .nodes import ROOT_INODE, Node, NodeTable, join

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
XATTR_NAMESPACE = b"user."


def fuse_errors(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kw: Any) -> Any:
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
            log.warning("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return cast(F, wrapper)


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


@dataclass
class FsOptions:
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    read_only: bool = False
    # Kernel attribute/entry caching, our metadata TTL, negative entries and how long a
    # complete directory listing answers "no such name" without asking the store.
    attr_timeout: float = 10.0
    # How long a listing may reuse the metadata of an object whose ETag did not change.
    dir_cache_time: float = 300.0
    sync_upload: bool = False


@dataclass
class DirHandle:
    path: str
    names: list[tuple[bytes, int]] = field(default_factory=list)  # (name, inode)
    seen: set[str] = field(default_factory=set)
    token: str | None = None
    started: bool = False
    done: bool = False


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class CloudFS(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, backend: Backend, cache: BlockCache, uploader: Uploader, opts: FsOptions) -> None:
        super().__init__()
        self.backend = backend
        self.cache = cache
        self.uploader = uploader
        self.opts = opts
        now = time.time_ns()
        self.nodes = NodeTable(Attrs(stat.S_IFDIR | 0o755, opts.uid, opts.gid, now))
        self.negative: dict[str, float] = {}
        # Folders whose complete list of names is known (made here, or fully listed):
        # path -> (valid until, names). A name missing from a fresh list needs no request.
        self.listed: dict[str, tuple[float, set[str]]] = {}
        self.dirs: dict[int, DirHandle] = {}
        self._next_fh = 1
        self.head_limiter = trio.CapacityLimiter(32)
        uploader.on_conflict = self._on_conflict
        uploader.on_uploaded = self._on_uploaded

    # ------------------------------------------------------------------ helpers
    def _decode(self, info: ObjectInfo | None, is_dir: bool, size: int = 0,
                server_mtime: float | None = None) -> Attrs:
        return layout.decode(info.metadata if info else None, is_dir=is_dir,
                             size=info.size if info else size,
                             server_mtime=info.mtime if info else server_mtime,
                             default_uid=self.opts.uid, default_gid=self.opts.gid)

    def _entry_attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.st_mode = node.attrs.mode
        a.st_nlink = 2 if node.is_dir else 1
        a.st_uid = node.attrs.uid
        a.st_gid = node.attrs.gid
        a.st_size = node.size if not node.is_dir else 0
        if node.attrs.is_symlink and node.target is not None:
            a.st_size = len(node.target)
        a.st_blksize = 1024 * 1024
        a.st_blocks = (a.st_size + 511) // 512
        a.st_mtime_ns = node.attrs.mtime_ns
        a.st_atime_ns = node.attrs.mtime_ns
        a.st_ctime_ns = max(node.ctime_ns, node.attrs.mtime_ns)
        # A folder seen only as a listing prefix may have a marker with attributes: let the
        # kernel ask again (lookup resolves it) instead of caching the defaults.
        a.attr_timeout = a.entry_timeout = 0 if node.provisional else self.opts.attr_timeout
        return a

    def _negative(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0  # the kernel caches the absence for entry_timeout
        a.entry_timeout = self.opts.attr_timeout
        return a

    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise _fail(errno.ENOENT) from None

    def _check_name(self, path: str, name: bytes) -> None:
        if len(name) > 255:
            raise _fail(errno.ENAMETOOLONG)
        self.backend.validate_key(path)

    def _writable(self) -> None:
        if self.opts.read_only:
            raise _fail(errno.EROFS)

    def _path(self, parent: int, name: bytes) -> str:
        try:
            text = os.fsdecode(name)
            text.encode("utf-8")
        except UnicodeError:
            raise _fail(errno.EINVAL) from None  # keys are UTF-8: undecodable names cannot be stored
        return join(self._node(parent).path, text)

    async def _resolve(self, path: str) -> Node | None:
        """Find what ``path`` is on the backend: a file/symlink object, or a folder."""
        entry = self.cache.entries.get(path)
        if entry is not None and entry.pending and entry.base is None:
            node = self.nodes.get(path)
            if node is None:  # recovered after a crash: known only to the cache so far
                attrs = layout.decode(entry.metadata, is_dir=False, size=entry.size, server_mtime=None,
                                      default_uid=self.opts.uid, default_gid=self.opts.gid)
                node = self.nodes.add(path, attrs, None, False)
                node.entry = entry
            return node
        found: dict[str, ObjectInfo] = {}
        listing = None

        async def head(key: str) -> None:
            try:
                found[key] = await self.backend.head(key)
            except NotFound:
                pass

        async def lst() -> None:
            nonlocal listing
            listing = await self.backend.list_page(path + "/", "/", None, 2)

        # The object, the folder marker (with its attributes; blobfuse2's folder blobs are
        # found this way too) and whether anything lies below: three requests in parallel.
        async with trio.open_nursery() as n:
            n.start_soon(head, path)
            n.start_soon(head, path + "/")
            n.start_soon(lst)
        assert listing is not None
        info = found.get(path)
        if info is not None and not (info.metadata or {}).get("hdi_isfolder") == "true":
            attrs = self._decode(info, is_dir=False)
            if not attrs.is_dir:
                return self._remember(path, attrs, info.etag, True, info.metadata)
        marker = found.get(path + "/")
        if marker is not None or listing.objects or listing.prefixes:
            attrs = self._decode(marker, is_dir=True, server_mtime=time.time())
            return self._remember(path, attrs, marker.etag if marker else None, marker is not None,
                                  marker.metadata if marker else None)
        return None

    def _remember(self, path: str, attrs: Attrs, etag: str | None, remote: bool,
                  meta: dict[str, str] | None = None) -> Node:
        node = self.nodes.get(path)
        if node is not None and (node.entry is not None and node.entry.pending):
            node.refreshed = time.monotonic()
            return node  # local changes win until they are uploaded
        self.negative.pop(path, None)
        ours = self.cache.entries.get(path)
        if (node is not None and node.etag is not None and etag != node.etag and not node.is_dir
                and not node.opens and not (ours is not None and ours.base is not None
                                            and ours.base.etag == etag)):
            # Replaced on the server: a new inode, so the kernel drops the old size and pages
            # (with the writeback cache it never takes a new size for a known inode).
            self.nodes.detach(node)
        node = self.nodes.add(path, attrs, etag, remote)
        node.foreign_meta = layout.foreign(meta)
        return node

    def _metadata(self, node: Node) -> dict[str, str]:
        """What to store for a node: our keys, plus other tools' keys we do not manage."""
        return {**node.foreign_meta, **layout.encode(node.attrs)}

    async def _lookup_path(self, path: str) -> Node | None:
        node = self.nodes.get(path)
        now = time.monotonic()
        if node is not None and not node.provisional and (
                node.opens or (node.entry is not None and node.entry.pending)
                or now - node.refreshed < self.opts.attr_timeout):
            return node
        if node is None and (self.negative.get(path, 0) > now or self._known_absent(path, now)):
            return None
        node = await self._resolve(path)
        if node is None:
            self.negative[path] = now + self.opts.attr_timeout
            old = self.nodes.get(path)
            if old is not None:
                self.nodes.detach(old)
        return node

    def _known_absent(self, path: str, now: float) -> bool:
        parent, _, name = path.rpartition("/")
        known = self.listed.get(parent)
        return known is not None and known[0] > now and name not in known[1]

    def _listed_add(self, path: str) -> None:
        parent, _, name = path.rpartition("/")
        if parent in self.listed:
            self.listed[parent][1].add(name)

    def _listed_remove(self, path: str) -> None:
        parent, _, name = path.rpartition("/")
        if parent in self.listed:
            self.listed[parent][1].discard(name)
        for key in [k for k in self.listed if k == path or k.startswith(path + "/")]:
            del self.listed[key]

    async def _save_attrs(self, node: Node) -> None:
        """Persist mode/owner/mtime/xattrs in the object's metadata."""
        if self.nodes.get(node.path) is not node or (node.entry is not None and node.entry.deleted):
            return  # unlinked but still open: nothing left to store it in
        meta = self._metadata(node)
        if layout.metadata_size(meta) > self.backend.capabilities.max_metadata_bytes:
            raise _fail(errno.ENOSPC)
        if node.entry is not None and node.entry.pending:
            node.entry.metadata = meta
            self.cache.mark_pending(node.entry)
            self.uploader.schedule(node.entry)
        elif node.is_dir:
            if node.ino == ROOT_INODE:
                return
            node.etag = await self.backend.put(node.key, Payload.from_bytes(b""), meta)
            node.remote = True
        else:
            if node.entry is not None:
                await self.uploader.wait_idle(node.entry)
            node.etag = await self.backend.set_metadata(node.key, meta)
            if node.entry is not None and node.entry.base is not None:
                node.entry.base = Remote(node.etag, node.entry.base.size)
                node.entry.metadata = meta
                self.cache._journal(node.entry)

    def _open_entry(self, node: Node) -> Entry:
        if node.entry is None:
            remote = Remote(node.etag, node.attrs.size) if node.remote else None
            node.entry = self.cache.entry(node.path, remote, node.attrs.size)
            if not node.entry.pending:
                node.entry.metadata = self._metadata(node)
        return node.entry

    def _on_uploaded(self, entry: Entry) -> None:
        # We just stored this object: what we know of it is fresh, no lookup needs the store.
        node = self.nodes.get(entry.key)
        if node is not None and entry.base is not None and not node.is_dir:
            node.etag = entry.base.etag
            node.remote = True
            node.attrs.size = entry.base.size
            node.refreshed = time.monotonic()

    def _on_conflict(self, entry: Entry, saved_as: str) -> None:
        # The server's version keeps the name; drop our blocks and re-read it on next access.
        node = self.nodes.get(entry.key)
        self.cache.discard(entry)
        if node is not None:
            node.entry = None
            node.refreshed = 0
            node.kernel_etag = None

    # ------------------------------------------------------------------ lookups
    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if name == b".":
            node = self._node(parent_inode)
        elif name == b"..":
            parent = self._node(parent_inode).path.rpartition("/")[0]
            node = self.nodes.get(parent) or self._node(ROOT_INODE)
        else:
            if len(name) > 255:
                raise _fail(errno.ENAMETOOLONG)
            found = await self._lookup_path(self._path(parent_inode, name))
            if found is None:
                return self._negative()
            node = found
        node.lookups += 1
        return self._entry_attrs(node)

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._entry_attrs(self._node(inode))

    def forget(self, inode_list: list[tuple[int, int]]) -> None:  # type: ignore[override]
        for ino, n in inode_list:
            self.nodes.forget(ino, n)

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        self._writable()
        node = self._node(inode)
        changed = False
        if fields.update_size:
            if node.is_dir:
                raise _fail(errno.EISDIR)
            entry = self._open_entry(node)
            await self.cache.truncate(entry, attr.st_size)
            self.uploader.schedule(entry)
        if fields.update_mode:
            node.attrs.mode = stat.S_IFMT(node.attrs.mode) | stat.S_IMODE(attr.st_mode)
            changed = True
        if fields.update_uid:
            node.attrs.uid = attr.st_uid
            changed = True
        if fields.update_gid:
            node.attrs.gid = attr.st_gid
            changed = True
        if fields.update_mtime:
            node.attrs.mtime_ns = attr.st_mtime_ns
            changed = True
        elif fields.update_size:
            node.attrs.mtime_ns = time.time_ns()
            changed = True
        node.ctime_ns = time.time_ns()
        if changed:
            await self._save_attrs(node)
        return self._entry_attrs(node)

    # ------------------------------------------------------------------ directories
    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        node = self._node(inode)
        if not node.is_dir:
            raise _fail(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        self.dirs[fh] = DirHandle(node.path)
        return fh

    async def _fill(self, handle: DirHandle) -> bool:
        """Fetch one more listing page into the handle; False when the listing is done."""
        if handle.done:
            return False
        prefix = handle.path + "/" if handle.path else ""
        if not handle.started:
            handle.started = True
            # Local entries not uploaded yet come first: they exist only in the inode table.
            for child in self.nodes.children(handle.path):
                if child.entry is not None and child.entry.pending and not child.remote:
                    self._add_dir_entry(handle, child)
        page = await self.backend.list_page(prefix, "/", handle.token, 1000)
        now = time.monotonic()

        def known(o: ObjectInfo) -> bool:  # fresh and unchanged: its metadata is already here
            node = self.nodes.get(o.key)
            return (node is not None and node.etag == o.etag and not node.provisional
                    and now - node.refreshed < self.opts.dir_cache_time)

        need_head = [o for o in page.objects if o.metadata is None and o.key != prefix and not known(o)]
        if need_head:
            heads: dict[str, ObjectInfo] = {}

            async def head(key: str) -> None:
                async with self.head_limiter:
                    try:
                        heads[key] = await self.backend.head(key)
                    except NotFound:
                        pass

            async with trio.open_nursery() as n:
                for o in need_head:
                    n.start_soon(head, o.key)
            objects = [heads.get(o.key, o) if o.metadata is None else o for o in page.objects]
        else:
            objects = page.objects
        for o in objects:
            if o.key == prefix or not o.key.startswith(prefix):
                continue
            name = o.key[len(prefix):]
            if name.endswith("/"):
                continue
            attrs = self._decode(o, is_dir=False)
            if attrs.is_dir:
                continue  # an hdi_isfolder blob: its prefix entry stands for it
            cached = self.nodes.get(o.key)
            if o.metadata is None and cached is not None and known(o):
                self._add_dir_entry(handle, cached)
                continue
            self._add_dir_entry(handle, self._remember(o.key, attrs, o.etag, True, o.metadata))
        for p in page.prefixes:
            path = p.rstrip("/")
            name = path[len(prefix):]
            if not name or path in handle.seen:
                continue
            node = self.nodes.get(path)
            if node is None or not node.is_dir:
                node = self._remember(path, self._decode(None, True, server_mtime=time.time()), None, False)
                node.provisional = True
            self._add_dir_entry(handle, node)
        handle.token = page.next_token
        handle.done = not page.next_token
        if handle.done:
            names = {os.fsdecode(name) for name, _ in handle.names}
            self.listed[handle.path] = (time.monotonic() + self.opts.attr_timeout, names)
        return True

    def _add_dir_entry(self, handle: DirHandle, node: Node) -> None:
        if node.path in handle.seen:
            return
        handle.seen.add(node.path)
        handle.names.append((os.fsencode(node.path.rpartition("/")[2]), node.ino))

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.dirs[fh]
        pos = start_id
        while True:
            while pos >= len(handle.names):
                if not await self._fill(handle):
                    return
            name, ino = handle.names[pos]
            node = self.nodes.by_ino.get(ino)
            if node is None:
                pos += 1
                continue
            if not pyfuse3.readdir_reply(token, name, self._entry_attrs(node), pos + 1):
                return
            node.lookups += 1
            pos += 1

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        self._writable()
        path = self._path(parent_inode, name)
        self._check_name(path + "/", name)
        if await self._lookup_path(path) is not None:
            raise _fail(errno.EEXIST)
        attrs = Attrs(stat.S_IFDIR | stat.S_IMODE(mode), ctx.uid, ctx.gid, time.time_ns())
        etag = await self.backend.put(path + "/", Payload.from_bytes(b""), layout.encode(attrs))
        node = self._remember(path, attrs, etag, True)
        self._listed_add(path)
        self.listed[path] = (time.monotonic() + self.opts.attr_timeout, set())  # new: empty
        node.lookups += 1
        return self._entry_attrs(node)

    async def _dir_is_empty(self, path: str) -> bool:
        for child in self.nodes.children(path):
            if child.entry is not None and child.entry.pending and not child.entry.deleted:
                return False
        page = await self.backend.list_page(path + "/", "/", None, 2)
        return not page.prefixes and all(o.key == path + "/" for o in page.objects)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._writable()
        path = self._path(parent_inode, name)
        node = await self._lookup_path(path)
        if node is None:
            raise _fail(errno.ENOENT)
        if not node.is_dir:
            raise _fail(errno.ENOTDIR)
        if not await self._dir_is_empty(path):
            raise _fail(errno.ENOTEMPTY)
        await self.backend.delete(path + "/")
        self.nodes.detach(node)
        self._listed_remove(path)
        self.negative[path] = time.monotonic() + self.opts.attr_timeout

    # ------------------------------------------------------------------ files
    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._writable()
        path = self._path(parent_inode, name)
        self._check_name(path, name)
        existing = await self._lookup_path(path)
        if existing is not None:
            if flags & os.O_EXCL:
                raise _fail(errno.EEXIST)
            if existing.is_dir:
                raise _fail(errno.EISDIR)
            fi = await self.open(existing.ino, flags | os.O_TRUNC, ctx)
            existing.lookups += 1
            return fi, self._entry_attrs(existing)
        attrs = Attrs(stat.S_IFREG | stat.S_IMODE(mode), ctx.uid, ctx.gid, time.time_ns())
        node = self.nodes.add(path, attrs, None, False)
        self.negative.pop(path, None)
        self._listed_add(path)
        entry = self.cache.entry(path, None, 0)
        if entry.pending or entry.size:
            await self.uploader.wait_idle(entry)
            await self.cache.truncate(entry, 0)
        entry.metadata = layout.encode(attrs)
        self.cache.mark_pending(entry)
        node.entry = entry
        node.opens += 1
        entry.open_count += 1
        node.lookups += 1
        self.uploader.schedule(entry)
        return pyfuse3.FileInfo(fh=node.ino), self._entry_attrs(node)

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise _fail(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self._writable()
        entry = self._open_entry(node)
        node.opens += 1
        entry.open_count += 1
        if flags & os.O_TRUNC and entry.size:
            await self.cache.truncate(entry, 0)
            node.attrs.mtime_ns = time.time_ns()
            entry.metadata = self._metadata(node)
            self.uploader.schedule(entry)
        # The kernel may keep pages cached only while they still match the object.
        version = entry.base.etag if entry.base else None
        keep = node.kernel_etag is not None and node.kernel_etag == version and not flags & os.O_TRUNC
        node.kernel_etag = version
        return pyfuse3.FileInfo(fh=inode, keep_cache=keep)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._node(fh)
        entry = self._open_entry(node)
        data = await self.cache.read(entry, off, size)
        self._readahead(entry, off, off + len(data))
        return data

    # A run of sequential reads must be this long before cloudfs fetches ahead: the kernel's
    # own read-ahead (up to 1 MiB) turns one random read into a short sequential run.
    SEQUENTIAL_RUN = 4 * 1024 * 1024

    def _readahead(self, entry: Entry, start: int, end: int) -> None:
        if entry.read_end != start:
            entry.run_start = start  # not sequential: a new run begins
        entry.read_end = end
        if end - entry.run_start < self.SEQUENTIAL_RUN or self.nursery is None:
            return
        for b in self.cache.prefetch_range(entry, end - 1):
            self.nursery.start_soon(self._prefetch, entry, b)

    async def _prefetch(self, entry: Entry, block: int) -> None:
        try:
            await self.cache.ensure_block(entry, block)
        except (BackendError, OSError) as exc:  # read-ahead is optional: never let it end the mount
            log.debug("read-ahead of %s block %d failed: %s", entry.key, block, exc)

    nursery: trio.Nursery | None = None

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._writable()
        node = self._node(fh)
        entry = self._open_entry(node)
        n = await self.cache.write(entry, off, buf)
        node.attrs.mtime_ns = time.time_ns()
        entry.metadata = self._metadata(node)
        self.uploader.schedule(entry)
        return n

    @fuse_errors
    async def flush(self, fh: int) -> None:
        node = self._node(fh)
        if node.entry is not None and node.entry.pending:
            if self.opts.sync_upload:
                await self.uploader.flush(node.entry)
            else:
                self.uploader.schedule(node.entry)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        node = self._node(fh)
        entry = node.entry
        if entry is None or not entry.pending:
            return
        if self.opts.sync_upload:
            await self.uploader.flush(entry)
        else:
            await self.cache.make_durable(entry)
            self.uploader.schedule(entry)

    @fuse_errors
    async def release(self, fh: int) -> None:
        node = self._node(fh)
        node.opens -= 1
        entry = node.entry
        if entry is not None:
            entry.open_count -= 1
            if entry.deleted and not entry.open_count:
                self.cache.discard(entry)
            elif entry.pending:
                self.uploader.schedule(entry)  # an NFS export only sends release
        if not node.opens and entry is not None and not entry.pending:
            node.attrs.size = entry.size  # the size lived in the entry while it was attached
            node.entry = None
        self.nodes.forget(node.ino, 0)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._writable()
        path = self._path(parent_inode, name)
        node = await self._lookup_path(path)
        if node is None:
            raise _fail(errno.ENOENT)
        if node.is_dir:
            raise _fail(errno.EISDIR)
        entry = node.entry or self.cache.entries.get(path)
        if entry is not None:
            await self.uploader.wait_idle(entry)  # an upload finishing later would resurrect it
            entry.pending = False
            if entry.open_count:
                entry.deleted = True  # readable through open handles until release
                self.cache.entries.pop(entry.key, None)
            else:
                self.cache.discard(entry)
        await self.backend.delete(path)
        self.nodes.detach(node)
        self._listed_remove(path)
        self.negative[path] = time.monotonic() + self.opts.attr_timeout

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        self._writable()
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise _fail(errno.ENOTSUP)
        old = self._path(parent_inode_old, name_old)
        new = self._path(parent_inode_new, name_new)
        node = await self._lookup_path(old)
        if node is None:
            raise _fail(errno.ENOENT)
        self._check_name(new + ("/" if node.is_dir else ""), name_new)
        if old == new:
            return
        if node.is_dir and (new + "/").startswith(old + "/"):
            raise _fail(errno.EINVAL)
        target = await self._lookup_path(new)
        if target is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise _fail(errno.EEXIST)
            if target.is_dir and not node.is_dir:
                raise _fail(errno.EISDIR)
            if node.is_dir and not target.is_dir:
                raise _fail(errno.ENOTDIR)
            if target.is_dir and not await self._dir_is_empty(new):
                raise _fail(errno.ENOTEMPTY)
        if node.is_dir:
            await self._rename_dir(old, new)  # its marker replaces an empty target's
        else:
            await self._rename_file(node, old, new, target)
        self.nodes.move(old, new)
        self._listed_remove(old)
        self._listed_remove(new)
        self._listed_add(new)
        self.negative.pop(new, None)
        self.negative[old] = time.monotonic() + self.opts.attr_timeout

    async def _rename_file(self, node: Node, old: str, new: str, target: Node | None) -> None:
        entry = node.entry or self.cache.entries.get(old)
        if target is not None and target.entry is not None:
            await self.uploader.wait_idle(target.entry)
            target.entry.pending = False
        if entry is not None and entry.pending:
            # Flush first: the object then exists and moves server-side like any other.
            await self.uploader.flush(entry)
        node.etag = await self.backend.move(old, new)
        node.remote = True
        if entry is not None and not entry.deleted:
            self.cache.rename(entry, new)
            if entry.base is not None:
                entry.base = Remote(node.etag, entry.base.size)

    async def _rename_dir(self, old: str, new: str) -> None:
        """Copy every object below ``old/`` to ``new/``, then delete the originals.

        Not atomic: interrupted, both trees may hold some of the objects (docs/semantics.md).
        """
        for child in list(self.nodes.by_path.values()):
            if child.path.startswith(old + "/") and child.entry is not None and child.entry.pending:
                await self.uploader.flush(child.entry)
        keys: list[str] = []
        async for page in self.backend.list(old + "/", None):
            keys += [o.key for o in page.objects]
        if not keys:
            keys = [old + "/"]
        limiter = trio.CapacityLimiter(16)

        async def copy(key: str) -> None:
            async with limiter:
                await self.backend.copy(key, new + key[len(old):])

        async with trio.open_nursery() as n:
            for key in keys:
                n.start_soon(copy, key)
        if old + "/" not in keys:
            # An implicit folder: give the new one a marker so it survives being emptied.
            node = self.nodes.get(old)
            attrs = node.attrs if node else self._decode(None, True, server_mtime=time.time())
            await self.backend.put(new + "/", Payload.from_bytes(b""), layout.encode(attrs))
        await self.backend.delete_many(keys)
        for key in keys:
            entry = self.cache.entries.get(key)
            if entry is not None:
                self.cache.rename(entry, new + key[len(old):])

    # ------------------------------------------------------------------ symlinks, links
    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        self._writable()
        path = self._path(parent_inode, name)
        self._check_name(path, name)
        if await self._lookup_path(path) is not None:
            raise _fail(errno.EEXIST)
        attrs = Attrs(stat.S_IFLNK | 0o777, ctx.uid, ctx.gid, time.time_ns(), size=len(target))
        etag = await self.backend.put(path, Payload.from_bytes(target), layout.encode(attrs))
        node = self._remember(path, attrs, etag, True)
        self._listed_add(path)
        node.target = target
        node.lookups += 1
        return self._entry_attrs(node)

    @fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        node = self._node(inode)
        if not node.attrs.is_symlink:
            raise _fail(errno.EINVAL)
        if node.target is None:
            node.target = await self.backend.get_range(node.path)
        return node.target

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
                   ) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EPERM)  # objects cannot share content under two names

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EPERM)  # device nodes and fifos cannot be stored as objects

    # ------------------------------------------------------------------ xattrs
    def _xattr_name(self, name: bytes) -> bytes:
        if not name.startswith(XATTR_NAMESPACE):
            raise _fail(errno.ENOTSUP)
        return name

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        node = self._node(inode)
        try:
            return node.attrs.xattrs[name]
        except KeyError:
            raise _fail(errno.ENODATA) from None

    @fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return list(self._node(inode).attrs.xattrs)

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        self._writable()
        node = self._node(inode)
        node.attrs.xattrs[self._xattr_name(name)] = value
        try:
            await self._save_attrs(node)
        except pyfuse3.FUSEError:
            del node.attrs.xattrs[name]
            raise

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        self._writable()
        node = self._node(inode)
        if name not in node.attrs.xattrs:
            raise _fail(errno.ENODATA)
        del node.attrs.xattrs[name]
        await self._save_attrs(node)

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
