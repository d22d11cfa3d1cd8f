"""What the store holds under each name: lookups, listings, and what is remembered of them.

This module turns names into inodes by asking the store (HEAD, LIST) as little as it can:

* an inode whose attributes were confirmed less than ``attr_timeout`` ago is used as is,
  and so is a file with local changes (they win until uploaded);
* a name looked up and not found is remembered as absent for ``attr_timeout``;
* a folder listed completely here, or made here, keeps its listing (:mod:`cloudfs.listings`)
  for ``dir_cache_time``: readdir is answered from it, and any other name in it is absent,
  for lookups and creates alike, without a request.  This mount's own changes update it;
  other tools' changes show up once it expires;
* a listing reuses the attributes of objects whose ETag did not change for
  ``dir_cache_time`` (S3 listings carry no user metadata; a HEAD per object is what that saves).

What the store returns becomes inodes through ``remember_file``/``remember_dir``: the File
comes from the block cache (one per key), and a new File (another version) means a new inode.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import trio

from cloudfs import layout
from cloudfs.backends import Backend, ObjectInfo
from cloudfs.backends.errors import NotFound, Transient, one_error
from cloudfs.cache.block_cache import BlockCache
from cloudfs.cache.file import File, Remote
from cloudfs.layout import Attrs

from .inodes import ROOT_INODE, Inode, InodeTable, Meta, join, parent_of
from .listings import Fill, Listing, Listings
from .meta_store import MetaStore

log = logging.getLogger(__name__)


@dataclass
class MetadataOptions:
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    attr_timeout: float = 10.0
    dir_cache_time: float = 300.0
    head_parallel: int = 32  # batches of HEADs in flight for one listing page (Backend.head_many)
    dir_cache_entries: int = 100_000  # entries of all listings kept, together (an LRU)
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
        # Folders whose complete listing is known (listed here, or made here), with every own
        # change since applied: trusted for dir_cache_time, kept (LRU) for offline mode.
        self.listings = Listings(opts.dir_cache_entries)
        # Listings from the store in progress, by folder: own changes meanwhile go to them too.
        self.fills: dict[str, list[Fill]] = {}
        # HEAD results kept across mounts (stores whose listings lack metadata; set by the
        # daemon): a record checked before this mount started counts as checked at its start.
        self.store: MetaStore | None = None
        self.started = time.time()
        self.shadowed: set[str] = set()  # folders hidden by an object of the same name (warned)

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
        elif inode.is_dir:
            # A folder whose listing is trusted is known to exist as long as its names are.
            if self._trusted(inode.path) is not None:
                return True
        return time.monotonic() - inode.refreshed < self.opts.attr_timeout

    def _trusted(self, path: str) -> Listing | None:
        """The kept listing of the folder ``path`` while it is trusted (within dir_cache_time)."""
        known = self.listings.get(path)
        return known if known is not None and known.until > time.monotonic() else None

    def _seen_in_listing(self, path: str) -> Inode | None:
        """The inode the parent's trusted listing last saw at ``path``."""
        known = self._trusted(parent_of(path))
        return known.entries.get(path.rpartition("/")[2]) if known is not None else None

    def listed_without(self, path: str) -> bool:
        """Whether the last complete listing of the parent, however old, lacks ``path``."""
        known = self.listings.get(parent_of(path))
        return known is not None and path.rpartition("/")[2] not in known.entries

    def _listing_lacks(self, path: str) -> bool:
        """Whether the parent's listing is trusted (within dir_cache_time) and lacks ``path``."""
        known = self._trusted(parent_of(path))
        return known is not None and path.rpartition("/")[2] not in known.entries

    async def cached_listing(self, path: str, stale: bool = False) -> list[Inode] | None:
        """The folder's listing as inodes, answered without a LIST: while it is trusted
        (within ``dir_cache_time``), or however old if ``stale`` (offline).  None if there is
        none, or an entry can no longer be made into an inode."""
        known = self.listings.get(path) if stale else self._trusted(path)
        if known is None:
            return None
        out: list[Inode] = []
        for name, seen in list(known.entries.items()):
            child = join(path, name)
            inode = self.table.get(child) or self._revive(child, seen)
            if inode is None and not stale:
                # Known by name only (the store's version after a conflict): one lookup.
                inode = await self.lookup(child)
                if inode is None:
                    continue  # gone; lookup dropped the name
            if inode is None:
                return None
            if name in known.entries:
                known.entries[name] = inode  # what the table has now (a newer version)
            out.append(inode)
        return out

    def _revive(self, path: str, seen: Inode | None) -> Inode | None:
        """An inode again for what a listing saw at ``path``, though the kernel made us forget
        it (the table dropped it): the same File or Meta, so no request is needed."""
        if seen is None:
            return self._last_known(path)
        if seen.file is not None:
            file = self.cache.by_key.get(path)
            if file is None:
                old = seen.file
                if old.base is None or old.unlinked or old.pending or old.key != path:
                    return None
                file = self.cache.file_for(path, old.base, old.attrs, old.foreign)
                file.refreshed = old.refreshed  # confirmed by the store then, not now
            return self.table.add(path, file=file)
        if seen.meta is not None and seen.path == path:
            return self.table.add(path, meta=seen.meta)
        return None

    def _listed_folder(self, path: str) -> Inode | None:
        """The inode of a folder whose listing is trusted, though the kernel made us forget it."""
        known = self._trusted(path)
        if known is None or known.folder is None:
            return None
        return self.table.add(path, meta=known.folder)

    def _listed_entry(self, path: str) -> Inode | None:
        """The inode of a name in the parent's trusted listing, though the kernel made us forget it."""
        seen = self._seen_in_listing(path)
        if seen is None:
            return None
        inode = self._revive(path, seen)
        if inode is not None:
            self.listings.add(parent_of(path), path.rpartition("/")[2], inode)
        return inode

    def _last_known(self, path: str) -> Inode | None:
        """An inode for what ``path`` was when last seen, though the kernel made us forget it:
        a file the cache still has, or a folder that was listed."""
        file = self.cache.by_key.get(path)
        if file is not None:
            return self.table.add(path, file=file)
        if self.listings.get(path) is not None:
            return self.remember_dir(path, None)
        return None

    def known_absent(self, path: str) -> bool:
        if self.negative.get(path, 0.0) > time.monotonic():
            return True
        return self._listing_lacks(path)

    # ------------------------------------------------------------------ bookkeeping of our own changes
    def _changed(self, path: str, added: bool) -> None:
        """An own change of the name ``path``: into the parent's listing, and into the
        listings of it in progress."""
        parent, _, name = path.rpartition("/")
        if added:
            self.listings.add(parent, name, self.table.get(path))
        else:
            self.listings.discard(parent, name)
        for fill in self.fills.get(parent, ()):
            fill.changes.append((name, added))

    def added(self, path: str) -> None:
        """A name made here (create, mkdir, symlink, mknod, or a rename's new name)."""
        self.negative.pop(path, None)
        self._changed(path, True)
        # Whatever had the name before (an empty folder a rename replaced) has no listing now.
        self.listings.drop(path)
        for fill in self.fills.get(path, ()):
            fill.void = True

    def removed(self, path: str, folder: bool = True) -> None:
        """The name ``path`` is gone (``folder``: it may have been a folder, whose listings go)."""
        self.negative[path] = time.monotonic() + self.opts.attr_timeout
        self._changed(path, False)
        if folder:
            self.listings.drop_below(path)
        prefix = path + "/"
        for key, fills in self.fills.items():
            if key == path or key.startswith(prefix):
                for fill in fills:
                    fill.void = True

    def replaced_elsewhere(self, path: str) -> None:
        """The store holds another version under ``path`` than the one this mount had (a
        conflict: theirs kept the name).  The name stays listed; its next use asks the store."""
        self.negative.pop(path, None)
        self._changed(path, True)

    def created_dir(self, path: str) -> None:
        """A folder made here is empty: all its names are known for dir_cache_time."""
        self.added(path)
        inode = self.table.get(path)
        self.listings.put(path, Listing(time.monotonic() + self.opts.dir_cache_time,
                                        folder=inode.meta if inode is not None else None))

    # ------------------------------------------------------------------ lookups
    async def lookup(self, path: str) -> Inode | None:
        inode = self.table.get(path) or self._listed_folder(path) or self._listed_entry(path)
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
        parent, _, name = path.rpartition("/")
        if found is None:
            self.negative[path] = time.monotonic() + self.opts.attr_timeout
            self.cache.absent(path)
            old = self.table.get(path)
            if old is not None and not (old.file is not None and old.file.pending):
                self.table.detach(old)
            self.listings.discard(parent, name)  # gone (another tool deleted it)
        else:
            self.listings.add(parent, name, found)  # there (another tool made it)
        return found

    async def lookup_for_create(self, path: str) -> Inode | None:
        """What is at ``path`` right before a create.  The kernel sends CREATE while it holds a
        negative entry, so a remembered negative lookup is not trusted: one HEAD asks the
        store, except in a folder whose complete listing this mount holds within
        ``dir_cache_time`` (listed or made here) and that lacks the name.  Should another
        tool make the name meanwhile, the upload's HEAD finds its object and both versions
        are kept (a conflict copy, cache/uploader.py ``_check_remote``)."""
        inode = self.table.get(path)
        if inode is not None and self.fresh(inode):
            return inode
        if inode is None and self._listing_lacks(path):
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
        self._record(info)
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
                self._record(found[path])
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
        if info is not None:
            self._record(info)
        if info is not None and not self._is_folder_blob(info):
            if not self.decode(info, is_dir=False).is_dir:
                return self.remember_file(path, info)
        marker = found.get(path + "/")
        if marker is not None or listing[0] or self.pending_below(path):
            return self.remember_dir(path, marker)
        return None

    def uploaded(self, file: File) -> None:
        """The store holds ``file`` as its base version with the attributes it has now (no
        change since the round): recorded, so a listing after a remount needs no HEAD for it."""
        if file.base is not None and file.base.etag and not file.pending:
            self._record(ObjectInfo(file.key, file.base.size, file.base.etag, time.time(),
                                    self.cache.metadata(file)))

    def _record(self, info: ObjectInfo) -> None:
        """What the store said of an object (a HEAD, or an upload's answer): a later listing,
        of this mount or the next, need not ask again."""
        if self.store is not None:
            self.store.record([info])

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
    async def list_page(self, path: str, token: str | None, named: Collection[str] = ()) -> ListingPage:
        """One page of the folder's listing, as inodes (each name once per page).

        A prefix ``x/`` whose name ``x`` is also an object (on this page, or in ``named``:
        the names earlier pages of the listing gave) is left out: the object is what a lookup
        of ``x`` finds too, and the objects below ``x/`` cannot be reached (warned once)."""
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
        if need_head and self.store is not None:
            # Recorded by this or an earlier mount, for the same ETag, within dir_cache_time.
            fresh_after = time.time() - self.opts.dir_cache_time
            for key, (info, checked) in self.store.lookup(need_head).items():
                if max(checked, self.started) > fresh_after:
                    heads[key] = ObjectInfo(key, info.size, info.etag, info.mtime, info.metadata)
            need_head = [o for o in need_head if o.key not in heads]
        if need_head:
            heads.update(await self.backend.head_many([o.key for o in need_head], self.opts.head_parallel))
            if self.store is not None:
                self.store.record([heads[o.key] for o in need_head if o.key in heads])  # one transaction
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
        files = {inode.path for inode in entries}
        for p in page.prefixes:
            sub = p.rstrip("/")
            if not sub or sub == path:
                continue
            if sub in files or sub.rpartition("/")[2] in named:
                self._shadowed(sub)
                continue
            entries.append(self.remember_dir(sub, None, provisional=True))
        return ListingPage(entries, not page.next_token, page.next_token)

    def _shadowed(self, path: str) -> None:
        if path not in self.shadowed and len(self.shadowed) < 10_000:
            self.shadowed.add(path)
            log.warning("%s is both an object and a folder (%s/...): the mount shows the object; "
                        "the objects below the folder are not reachable through it", path, path)

    def begin_fill(self, path: str) -> Fill:
        """A listing of ``path`` from the store starts (its first page)."""
        fill = Fill(path)
        self.fills.setdefault(path, []).append(fill)
        return fill

    def end_fill(self, fill: Fill, entries: list[tuple[str, Inode]] | None) -> None:
        """The listing is complete with ``entries`` (in order), or was abandoned (None).  A
        complete one, with the own changes made meanwhile applied, is kept for dir_cache_time."""
        fills = self.fills.get(fill.path, [])
        if fill in fills:
            fills.remove(fill)
        if not fills:
            self.fills.pop(fill.path, None)
        if entries is None or fill.void:
            return
        names: dict[str, Inode | None] = dict(entries)
        for name, added in fill.changes:
            if added:
                names[name] = self.table.get(join(fill.path, name))
            else:
                names.pop(name, None)
        # Attributes this listing fetched count from its end, so an `ls -l` of a folder
        # whose listing outlasts attr_timeout stats its first names without a HEAD each.
        now = time.monotonic()
        for _, inode in entries:
            known: File | Meta | None = inode.file if inode.file is not None else inode.meta
            if known is not None and known.refreshed >= fill.started:
                known.refreshed = now
        folder = self.table.get(fill.path)
        self.listings.put(fill.path, Listing(now + self.opts.dir_cache_time, names,
                                             folder.meta if folder is not None and folder.is_dir else None))

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
