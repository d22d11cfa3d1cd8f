"""The inode table: which inode number stands for which name, and how long it lives.

An :class:`Inode` is what the kernel holds a number for.  A regular file's inode points at
its :class:`~cloudfs.cache.file.File`, the one owner of its size, version, attributes and
local state; the inode adds only the kernel's view (number, lookup count, path).  A
directory or symlink has no File: its attributes and version live in :class:`Meta`.

Lifetime: an inode is kept while the kernel holds it (lookup count, ``forget``), while a
handle is open on its file, or while its file has changes not yet uploaded -- whatever
the kernel forgets, local changes stay reachable by their path.  An object replaced on the
store gets a new inode (the kernel trusts its own size for a known inode under writeback
caching), and so does a name that changed between file and folder.

Paths are object keys without a trailing slash; the root is ``""``.  Only this module
changes ``by_path``/``by_ino`` and ``Inode.path``; ``on_drop`` tells the owner of the File
that no inode refers to it any more.
"""

from __future__ import annotations

import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from cloudfs.cache.file import File
from cloudfs.layout import Attrs

ROOT_INODE = 1


@dataclass
class Meta:
    """Attributes of a directory (its marker object) or a symlink (its link object)."""

    attrs: Attrs
    etag: str | None = None
    stored: bool = False  # the object exists (a directory may be only a common prefix)
    foreign: dict[str, str] = field(default_factory=dict)  # other tools' keys, kept on update
    refreshed: float = field(default_factory=time.monotonic)
    # A folder seen only as a listing prefix: its attributes are defaults until a lookup.
    provisional: bool = False
    target: bytes | None = None  # symlink target, once read


@dataclass(eq=False)
class Inode:
    ino: int
    path: str
    file: File | None = None  # regular files
    meta: Meta | None = None  # directories and symlinks
    lookups: int = 0  # references the kernel holds (lookup replies minus forgets)
    kernel_epoch: int = -1  # the File epoch whose pages the kernel may keep cached

    @property
    def attrs(self) -> Attrs:
        if self.file is not None:
            return self.file.attrs
        assert self.meta is not None
        return self.meta.attrs

    @property
    def is_dir(self) -> bool:
        return self.file is None and stat.S_ISDIR(self.attrs.mode)

    @property
    def is_symlink(self) -> bool:
        return self.file is None and stat.S_ISLNK(self.attrs.mode)

    @property
    def key(self) -> str:
        """The object key: directories are stored as markers ``path/``."""
        return self.path + "/" if self.is_dir else self.path

    @property
    def size(self) -> int:
        if self.file is not None:
            return self.file.size
        if self.is_symlink:
            return self.attrs.size
        return 0

    @property
    def ctime_ns(self) -> int:
        """st_ctime: the stored ctime, or a file's later local change not yet in its attrs."""
        if self.file is not None:
            return max(self.file.attrs.ctime, self.file.ctime_ns)
        return self.attrs.ctime

    @property
    def refreshed(self) -> float:
        return self.file.refreshed if self.file is not None else self.meta.refreshed  # type: ignore[union-attr]

    def pinned(self) -> bool:
        """Whether the inode must stay whatever the kernel forgets."""
        if self.ino == ROOT_INODE or self.lookups:
            return True
        return self.file is not None and (self.file.opens > 0 or self.file.pending)


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def _ignore(inode: Inode) -> None:
    pass


class InodeTable:
    def __init__(self, root: Meta, on_drop: Callable[[Inode], None] = _ignore) -> None:
        self.by_ino: dict[int, Inode] = {}
        self.by_path: dict[str, Inode] = {}
        self._next = ROOT_INODE + 1
        self._on_drop = on_drop
        self.root = Inode(ROOT_INODE, "", meta=root, lookups=1)
        self.by_ino[ROOT_INODE] = self.root
        self.by_path[""] = self.root

    def __getitem__(self, ino: int) -> Inode:
        return self.by_ino[ino]

    def __len__(self) -> int:
        return len(self.by_ino)

    def get(self, path: str) -> Inode | None:
        return self.by_path.get(path)

    def add(self, path: str, *, file: File | None = None, meta: Meta | None = None) -> Inode:
        """A new inode for ``path``; the inode that had the name loses it (it lives on while
        the kernel or a handle holds it)."""
        old = self.by_path.get(path)
        if old is not None:
            self.detach(old)
        inode = Inode(self._next, path, file=file, meta=meta)
        self._next += 1
        self.by_ino[inode.ino] = inode
        self.by_path[path] = inode
        return inode

    def detach(self, inode: Inode) -> None:
        """The path no longer names this inode (unlinked or replaced); the inode lives on."""
        if self.by_path.get(inode.path) is inode:
            del self.by_path[inode.path]
        self.release(inode)

    def forget(self, ino: int, n: int) -> None:
        inode = self.by_ino.get(ino)
        if inode is None or ino == ROOT_INODE:
            return
        inode.lookups = max(0, inode.lookups - n)
        self.release(inode)

    def release(self, inode: Inode) -> None:
        """Drop the inode if nothing pins it any more (after a forget, a close or an upload)."""
        if inode.pinned():
            return
        if self.by_ino.get(inode.ino) is inode:
            del self.by_ino[inode.ino]
        if self.by_path.get(inode.path) is inode:
            del self.by_path[inode.path]
        self._on_drop(inode)

    def move(self, old: str, new: str) -> list[Inode]:
        """Re-path ``old`` and everything below it to ``new`` (after a rename); returns the
        inodes moved.  Whatever had the name ``new`` must be detached first."""
        assert new not in self.by_path, new
        prefix = old + "/"
        moved = []
        for path in [p for p in self.by_path if p == old or p.startswith(prefix)]:
            inode = self.by_path.pop(path)
            inode.path = new + path[len(old):]
            moved.append(inode)
        for inode in moved:
            self.by_path[inode.path] = inode
        return moved

    def under(self, path: str) -> Iterator[Inode]:
        """Every named inode strictly below ``path``."""
        prefix = path + "/" if path else ""
        for p, inode in list(self.by_path.items()):
            if p.startswith(prefix) and p != path:
                yield inode
