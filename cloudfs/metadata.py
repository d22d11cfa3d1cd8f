"""What the store holds under each name: lookups, listings, and what is remembered of them.

This module turns names into inodes by asking the store (HEAD, LIST) as little as it can:

* an inode whose attributes were confirmed less than ``attr_timeout`` ago is used as is,
  and so is a file with local changes (they win until uploaded);
* a name looked up and not found is remembered as absent for ``attr_timeout``;
* a folder listed completely here, or made here, knows all its names for ``attr_timeout``:
  any other name in it is absent without a request;
* a listing reuses the attributes of objects whose ETag did not change for
  ``dir_cache_time`` (S3 listings carry no user metadata; a HEAD per object is what that saves).

What the store returns becomes inodes through ``remember_file``/``remember_dir``: the File
comes from the block cache (one per key), and a new File (another version) means a new inode.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import trio

from cloudfs import layout
from cloudfs.backends import Backend, ObjectInfo
from cloudfs.backends.errors import NotFound, Transient, one_error
from cloudfs.cache.block_cache import BlockCache
from cloudfs.cache.file import Remote
from cloudfs.layout import Attrs

from .inodes import ROOT_INODE, Inode, InodeTable, Meta, join, parent_of

log = logging.getLogger(__name__)


@dataclass
class MetadataOptions:
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    attr_timeout: float = 10.0
    dir_cache_time: float = 300.0
    head_parallel: int = 32
    file_mode: int = layout.DEFAULT_FILE_MODE  # of objects whose metadata has no mode
    dir_mode: int = layout.DEFAULT_DIR_MODE


@dataclass
class ListingPage:
    entries: list[Inode]
    done: bool
    token: str | None


class Metadata:
    def __init__(self, backend: Backend, cache: BlockCache, table: InodeTable, opts: MetadataOptions) -> None:
        self.backend = backend
        self.cache = cache
        self.table = table
        self.opts = opts
        self.negative: dict[str, float] = {}  # path -> absent until (monotonic)
        # Folders whose complete list of names is known: path -> (valid until, names).
        self.listed: dict[str, tuple[float, set[str]]] = {}
        self.made_here: dict[str, float] = {}  # folders made by this mount -> until (monotonic)
        self.head_limiter = trio.CapacityLimiter(opts.head_parallel)

    # ------------------------------------------------------------------ decoding
    def decode(self, info: ObjectInfo | None, is_dir: bool, server_mtime: float | None = None) -> Attrs:
        return layout.decode(info.metadata if info else None, is_dir=is_dir,
                             size=info.size if info else 0,
                             server_mtime=info.mtime if info else server_mtime,
                             default_uid=self.opts.uid, default_gid=self.opts.gid,
                             file_mode=self.opts.file_mode, dir_mode=self.opts.dir_mode)

    # ------------------------------------------------------------------ freshness
    def fresh(self, inode: Inode) -> bool:
        if inode.ino == ROOT_INODE:
            return True
        if inode.file is not None:
            if inode.file.pending or inode.file.unlinked:
                return True  # local changes win until uploaded
        elif inode.meta is not None and inode.meta.provisional:
            return False
        return time.monotonic() - inode.refreshed < self.opts.attr_timeout

    def listed_without(self, path: str) -> bool:
        """Whether the last complete listing of the parent, however old, lacks ``path``."""
        known = self.listed.get(parent_of(path))
        return known is not None and path.rpartition("/")[2] not in known[1]

    def last_listing(self, path: str) -> list[Inode] | None:
        """The folder's last complete listing, however old, if every entry in it is still
        known."""
        known = self.listed.get(path)
        if known is None:
            return None
        found = [self.table.get(join(path, name)) or self._last_known(join(path, name))
                 for name in sorted(known[1])]
        return None if any(inode is None for inode in found) else found  # type: ignore[return-value]

    def _last_known(self, path: str) -> Inode | None:
        """An inode for what ``path`` was when last seen, though the kernel made us forget it:
        a file the cache still has, or a folder that was listed."""
        file = self.cache.by_key.get(path)
        if file is not None:
            return self.table.add(path, file=file)
        if path in self.listed:
            return self.remember_dir(path, None)
        return None

    def known_absent(self, path: str) -> bool:
        now = time.monotonic()
        if self.negative.get(path, 0.0) > now:
            return True
        known = self.listed.get(parent_of(path))
        return known is not None and known[0] > now and path.rpartition("/")[2] not in known[1]

    # ------------------------------------------------------------------ bookkeeping of our own changes
    def added(self, path: str) -> None:
        self.negative.pop(path, None)
        known = self.listed.get(parent_of(path))
        if known is not None:
            known[1].add(path.rpartition("/")[2])

    def removed(self, path: str) -> None:
        self.negative[path] = time.monotonic() + self.opts.attr_timeout
        known = self.listed.get(parent_of(path))
        if known is not None:
            known[1].discard(path.rpartition("/")[2])
        prefix = path + "/"
        below = [k for k in self.listed if k == path or k.startswith(prefix)]
        for key in below:
            del self.listed[key]
        for key in [k for k in self.made_here if k == path or k.startswith(prefix)]:
            del self.made_here[key]

    def created_dir(self, path: str) -> None:
        """A folder made here is empty: all its names are known."""
        self.added(path)
        until = time.monotonic() + self.opts.attr_timeout
        self.listed[path] = (until, set())
        self.made_here[path] = until

    # ------------------------------------------------------------------ lookups
    async def lookup(self, path: str) -> Inode | None:
        inode = self.table.get(path)
        if inode is not None and self.fresh(inode):
            return inode
        if inode is None and self.known_absent(path):
            return None
        try:
            found = await self.resolve(path, inode)
        except Transient:
            # The store does not answer: what we knew stands (offline, see docs/semantics.md).
            known = inode or self._last_known(path)
            if known is not None:
                return known
            if self.listed_without(path):
                return None
            raise
        if found is None:
            self.negative[path] = time.monotonic() + self.opts.attr_timeout
            self.cache.absent(path)
            old = self.table.get(path)
            if old is not None and not (old.file is not None and old.file.pending):
                self.table.detach(old)
        return found

    async def lookup_for_create(self, path: str) -> Inode | None:
        """What is at ``path`` right before a create.  The kernel sends CREATE while it holds a
        negative entry, so remembered absence is not trusted: one HEAD asks the store, except
        in a folder this mount made within ``attr_timeout`` (nothing else knew its name)."""
        inode = self.table.get(path)
        if inode is not None and self.fresh(inode):
            return inode
        made = self.made_here.get(parent_of(path), 0.0) > time.monotonic()
        if made and inode is None:
            return None
        try:
            info = await self.backend.head(path)
        except NotFound:
            return await self.lookup(path) if inode is not None else None
        except Transient:
            # Offline: create on what we know.  Should another tool have made the name
            # meanwhile, the upload finds its object and keeps both (a conflict copy).
            return inode
        if self._is_folder_blob(info) or self.decode(info, is_dir=False).is_dir:
            return await self.resolve(path, inode)
        return self.remember_file(path, info)

    def pending_below(self, path: str) -> bool:
        """Whether a file with changes not yet uploaded lies below ``path`` (so the folder exists)."""
        prefix = path + "/" if path else ""
        return any(f.key.startswith(prefix) for f in self.cache.pending)

    async def resolve(self, path: str, known: Inode | None = None) -> Inode | None:
        """Ask the store what ``path`` is: a file or symlink object, or a folder."""
        pending = self.cache.by_key.get(path)
        if pending is not None and pending.pending:
            inode = self.table.get(path)
            if inode is None or inode.file is not pending:
                inode = self.table.add(path, file=pending)  # recovered after a crash
            return inode
        found: dict[str, ObjectInfo] = {}
        listing: list[bool] = []

        async def head(key: str) -> None:
            try:
                found[key] = await self.backend.head(key)
            except NotFound:
                pass

        async def below() -> None:
            page = await self.backend.list_page(path + "/", "/", None, 2)
            listing.append(bool(page.objects or page.prefixes))

        if known is not None and known.file is not None:
            # A known file: one HEAD confirms it; a folder is asked for only if it is gone.
            await head(path)
            if path in found and not self._is_folder_blob(found[path]):
                return self.remember_file(path, found[path])
        # The object, the folder marker (with its attributes; blobfuse2's folder blobs are
        # found this way too) and whether anything lies below: requests in parallel.
        with one_error():
            async with trio.open_nursery() as n:
                if path not in found:
                    n.start_soon(head, path)
                n.start_soon(head, path + "/")
                n.start_soon(below)
        info = found.get(path)
        if info is not None and not self._is_folder_blob(info):
            if not self.decode(info, is_dir=False).is_dir:
                return self.remember_file(path, info)
        marker = found.get(path + "/")
        if marker is not None or listing[0] or self.pending_below(path):
            return self.remember_dir(path, marker)
        return None

    @staticmethod
    def _is_folder_blob(info: ObjectInfo) -> bool:
        return (info.metadata or {}).get("hdi_isfolder") == "true"

    def remember_file(self, path: str, info: ObjectInfo) -> Inode:
        """A file, symlink or special file (FIFO, socket, device) object the store holds at
        ``path``.  Only regular files have contents in the cache."""
        attrs = self.decode(info, is_dir=False)
        self.negative.pop(path, None)
        inode = self.table.get(path)
        if attrs.is_symlink or attrs.is_special:
            known = inode.meta if inode is not None and inode.meta is not None and not inode.is_dir else None
            if inode is not None and known is not None and known.etag == info.etag:
                known.refreshed = time.monotonic()
                return inode
            return self.table.add(path, meta=Meta(attrs, info.etag, True, layout.foreign(info.metadata)))
        file = self.cache.file_for(path, Remote(info.etag, info.size), attrs, layout.foreign(info.metadata))
        if inode is not None and inode.file is file:
            return inode
        return self.table.add(path, file=file)

    def remember_dir(self, path: str, marker: ObjectInfo | None, provisional: bool = False) -> Inode:
        """A folder at ``path``: its marker object, or only objects below it."""
        self.negative.pop(path, None)
        inode = self.table.get(path)
        if inode is not None and inode.is_dir:
            if provisional:
                return inode  # a listing prefix adds nothing to what a lookup found
            assert inode.meta is not None
            if inode.ino != ROOT_INODE:
                inode.meta.attrs = self.decode(marker, is_dir=True, server_mtime=time.time())
                inode.meta.etag = marker.etag if marker else None
                inode.meta.stored = marker is not None
                inode.meta.foreign = layout.foreign(marker.metadata if marker else None)
            inode.meta.refreshed = time.monotonic()
            inode.meta.provisional = False
            return inode
        meta = Meta(self.decode(marker, is_dir=True, server_mtime=time.time()),
                    marker.etag if marker else None, marker is not None,
                    layout.foreign(marker.metadata if marker else None), provisional=provisional)
        return self.table.add(path, meta=meta)

    # ------------------------------------------------------------------ listings
    async def list_page(self, path: str, token: str | None) -> ListingPage:
        """One page of the folder's listing, as inodes (each name once per page)."""
        prefix = path + "/" if path else ""
        page = await self.backend.list_page(prefix, "/", token, 1000)
        now = time.monotonic()

        def known(o: ObjectInfo) -> Inode | None:  # fresh enough and unchanged: no HEAD needed
            inode = self.table.get(o.key)
            if inode is None or (inode.meta is not None and inode.meta.provisional):
                return None
            etag = inode.file.base.etag if inode.file is not None and inode.file.base else (
                inode.meta.etag if inode.meta is not None else None)
            if inode.file is not None and inode.file.pending:
                return inode
            if etag == o.etag and now - inode.refreshed < self.opts.dir_cache_time:
                return inode
            return None

        need_head = [o for o in page.objects if o.metadata is None and o.key != prefix
                     and not o.key.endswith("/") and known(o) is None]
        heads: dict[str, ObjectInfo] = {}
        if need_head:
            async def head(key: str) -> None:
                async with self.head_limiter:
                    try:
                        heads[key] = await self.backend.head(key)
                    except NotFound:
                        pass

            with one_error():
                async with trio.open_nursery() as n:
                    for o in need_head:
                        n.start_soon(head, o.key)
        entries: list[Inode] = []
        for o in page.objects:
            if o.key == prefix or not o.key.startswith(prefix) or o.key.endswith("/"):
                continue
            cached = known(o) if o.metadata is None else None
            if cached is not None:
                entries.append(cached)
                continue
            info = heads.get(o.key, o) if o.metadata is None else o
            if o.metadata is None and o.key not in heads:
                continue  # deleted between the listing and the HEAD
            if self._is_folder_blob(info):
                continue  # its prefix entry stands for it
            entries.append(self.remember_file(o.key, info))
        for p in page.prefixes:
            sub = p.rstrip("/")
            if sub and sub != path:
                entries.append(self.remember_dir(sub, None, provisional=True))
        return ListingPage(entries, not page.next_token, page.next_token)

    def listing_done(self, path: str, names: set[str]) -> None:
        self.listed[path] = (time.monotonic() + self.opts.attr_timeout, names)

    def local_children(self, path: str) -> list[Inode]:
        """Files below ``path`` (direct children) with changes the store does not have yet."""
        prefix = path + "/" if path else ""
        out = []
        for file in list(self.cache.pending):
            key = file.key
            if key.startswith(prefix) and "/" not in key[len(prefix):]:
                inode = self.table.get(key)
                if inode is None or inode.file is not file:
                    inode = self.table.add(key, file=file)
                out.append(inode)
            elif key.startswith(prefix):
                # A pending file deeper down: its folders exist even if the store has none yet.
                sub = join(path, key[len(prefix):].split("/", 1)[0])
                if self.table.get(sub) is None:
                    out.append(self.remember_dir(sub, None, provisional=True))
        return out
