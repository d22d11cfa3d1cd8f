"""The inode table: which object path each inode number stands for, and its attributes.

Inodes live exactly as long as the kernel holds them (lookup counts, ``forget``) or a file
handle is open.  Paths are object keys without a trailing slash; the root is ``""``.
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass, field

import pyfuse3

from cloudfs.cache.block_cache import Entry

from .layout import Attrs

ROOT_INODE = pyfuse3.ROOT_INODE


@dataclass
class Node:
    ino: int
    path: str
    attrs: Attrs
    etag: str | None = None  # of the object at ``path`` (file, symlink or dir marker)
    remote: bool = False  # an object exists at ``path`` (dir: a marker exists)
    lookups: int = 0
    opens: int = 0
    refreshed: float = field(default_factory=time.monotonic)
    entry: Entry | None = None  # cache entry while open or pending
    target: bytes | None = None  # symlink target, once read
    kernel_etag: str | None = None  # version whose pages the kernel may keep cached
    ctime_ns: int = field(default_factory=time.time_ns)
    foreign_meta: dict[str, str] = field(default_factory=dict)  # other tools' keys, kept on update
    provisional: bool = False  # attributes are defaults from a listing prefix, not yet looked up

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.attrs.mode)

    @property
    def key(self) -> str:
        """The object key: directories are stored as markers ``path/``."""
        return self.path + "/" if self.is_dir else self.path

    @property
    def size(self) -> int:
        return self.entry.size if self.entry is not None else self.attrs.size


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class NodeTable:
    def __init__(self, root_attrs: Attrs) -> None:
        self.by_ino: dict[int, Node] = {}
        self.by_path: dict[str, Node] = {}
        self._next = ROOT_INODE + 1
        root = Node(ROOT_INODE, "", root_attrs, remote=True, lookups=1)
        self.by_ino[ROOT_INODE] = root
        self.by_path[""] = root

    def __getitem__(self, ino: int) -> Node:
        return self.by_ino[ino]

    def get(self, path: str) -> Node | None:
        return self.by_path.get(path)

    def add(self, path: str, attrs: Attrs, etag: str | None, remote: bool) -> Node:
        node = self.by_path.get(path)
        if node is not None:
            if stat.S_IFMT(node.attrs.mode) != stat.S_IFMT(attrs.mode) and not node.opens:
                self.detach(node)  # file replaced by a folder or vice versa: a new inode
            else:
                node.attrs, node.etag, node.remote = attrs, etag, remote
                node.refreshed = time.monotonic()
                node.provisional = False
                return node
        node = Node(self._next, path, attrs, etag, remote)
        self._next += 1
        self.by_ino[node.ino] = node
        self.by_path[path] = node
        return node

    def detach(self, node: Node) -> None:
        """The path no longer names this inode (unlinked or replaced); the inode lives on."""
        if self.by_path.get(node.path) is node:
            del self.by_path[node.path]
        self._maybe_drop(node)

    def forget(self, ino: int, n: int) -> None:
        node = self.by_ino.get(ino)
        if node is None or ino == ROOT_INODE:
            return
        node.lookups = max(0, node.lookups - n)
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        if node.lookups or node.opens or node.ino == ROOT_INODE:
            return
        self.by_ino.pop(node.ino, None)
        if self.by_path.get(node.path) is node:
            del self.by_path[node.path]

    def move(self, old: str, new: str) -> None:
        """Re-path ``old`` and everything below it to ``new`` (after a rename)."""
        target = self.by_path.get(new)
        if target is not None:
            self.detach(target)
        prefix = old + "/"
        for path in [p for p in self.by_path if p == old or p.startswith(prefix)]:
            node = self.by_path.pop(path)
            node.path = new + path[len(old):]
            self.by_path[node.path] = node

    def children(self, path: str) -> list[Node]:
        prefix = path + "/" if path else ""
        return [n for p, n in self.by_path.items()
                if p.startswith(prefix) and p != path and "/" not in p[len(prefix):]]
