"""Complete folder listings this mount holds: the names of a folder, in listing order.

A :class:`Listing` is what a complete listing from the store said, plus every change this
mount made in the folder since (create, mkdir, unlink, rmdir, rename in and out, conflict
copies): it is never wrong about what this mount did.  Until ``until`` (``dir_cache_time``
after the listing) it is trusted: readdir is served from it and a name not in it is absent,
with no request.  After that it is kept only as the last listing for offline mode.

:class:`Listings` is an LRU bounded by the total number of entries (``dir_cache_entries``):
adding a listing evicts the least recently used ones until the total fits, and a folder
with more entries than the whole limit is not kept at all.  A listing counts as its entries
plus one, so empty folders made here are bounded too.  Owned by
:class:`cloudfs.metadata.Metadata`, on the trio thread; nothing here awaits.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from .inodes import Inode, Meta


@dataclass
class Listing:
    until: float  # monotonic: served without a request until then
    # name -> the inode last seen under it (None: known only by name, e.g. the store's version
    # that kept the name after a conflict); insertion order is listing order.
    entries: dict[str, Inode | None] = field(default_factory=dict)
    folder: Meta | None = None  # the folder's own attributes: it is known while its names are


@dataclass
class Fill:
    """A listing from the store in progress: own changes in the folder meanwhile are recorded,
    so the finished listing includes them (an unlinked name never comes back from a page
    listed before the unlink)."""

    path: str
    started: float = field(default_factory=time.monotonic)
    changes: list[tuple[str, bool]] = field(default_factory=list)  # (name, added) in order
    void: bool = False  # the folder itself was removed or renamed: the result is not kept


class Listings:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._lru: OrderedDict[str, Listing] = OrderedDict()
        self.size = 0  # invariant: the sum of 1 + len(entries) over every listing held

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, path: str) -> Listing | None:
        """The listing of ``path``, however old; a hit makes it the most recently used."""
        listing = self._lru.get(path)
        if listing is not None:
            self._lru.move_to_end(path)
        return listing

    def put(self, path: str, listing: Listing) -> None:
        self.drop(path)
        if 1 + len(listing.entries) > self.max_entries:
            return
        self._lru[path] = listing
        self.size += 1 + len(listing.entries)
        self._shrink()

    def drop(self, path: str) -> None:
        old = self._lru.pop(path, None)
        if old is not None:
            self.size -= 1 + len(old.entries)

    def drop_below(self, path: str) -> None:
        """Forget the listings of ``path`` and of every folder below it."""
        prefix = path + "/"
        for key in [k for k in self._lru if k == path or k.startswith(prefix)]:
            self.drop(key)

    def add(self, path: str, name: str, inode: Inode | None) -> None:
        listing = self._lru.get(path)
        if listing is None:
            return
        if name not in listing.entries:
            self.size += 1
        listing.entries[name] = inode
        self._shrink()

    def discard(self, path: str, name: str) -> None:
        listing = self._lru.get(path)
        if listing is not None and listing.entries.pop(name, False) is not False:
            self.size -= 1

    def _shrink(self) -> None:
        while self.size > self.max_entries and self._lru:
            _, oldest = self._lru.popitem(last=False)
            self.size -= 1 + len(oldest.entries)
