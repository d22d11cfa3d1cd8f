"""Open files and folders: a handle per open, keyed by the ``fh`` the kernel passes back.

A :class:`FileHandle` holds what belongs to one open: its flags and its read-ahead state.
What belongs to the file (size, content, attributes) stays on the File.  A write through a
read-only handle is EBADF (reads through write-only handles are the kernel's own, for
partial pages under writeback caching).

Read-ahead (after mountpoint-s3's prefetcher): each handle watches its own reads.  Once they
have run sequentially for ``SEQUENTIAL_RUN`` bytes (the kernel's own read-ahead turns one
random read into a short sequential run, so a shorter run says nothing), the window of
blocks fetched ahead starts at one and doubles with every further read in sequence,
up to ``max_blocks``.  A seek further than ``SLACK`` resets it: a random reader never fetches
more than it reads.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from cloudfs.cache.file import File

from .inodes import Inode

if TYPE_CHECKING:
    from .metadata import ListingPage


class ReadAhead:
    SEQUENTIAL_RUN = 4 * 1024 * 1024
    # The kernel keeps several reads of one file in flight and they are answered in any
    # order, so "in sequence" means within this distance of the furthest read so far
    # (mountpoint-s3 allows small forward and backward seeks the same way).
    SLACK = 1024 * 1024

    def __init__(self, block_size: int, max_blocks: int) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.run_start = 0
        self.furthest = -1  # the end of the furthest read of the current run
        self.window = 0

    def advise(self, start: int, end: int) -> int:
        """A read of [start, end) arrived: how many blocks past ``end`` to fetch now."""
        if self.furthest < 0 or abs(start - self.furthest) > self.SLACK:
            self.run_start, self.window, self.furthest = start, 0, end  # a seek: a new run begins
        self.run_start, self.furthest = min(self.run_start, start), max(self.furthest, end)
        if self.furthest - self.run_start < self.SEQUENTIAL_RUN or not self.max_blocks:
            return 0
        self.window = min(self.max_blocks, max(1, self.window * 2))
        return self.window


@dataclass(eq=False)
class FileHandle:
    fh: int
    inode: Inode
    file: File
    flags: int
    readahead: ReadAhead

    @property
    def writable(self) -> bool:
        return self.flags & os.O_ACCMODE != os.O_RDONLY


@dataclass(eq=False)
class NextPage:
    """The listing page after ``token``, fetched in the background while the kernel takes
    the entries before it.  Exactly one of ``page`` and ``error`` is set once ``done`` is,
    unless the fetch was cancelled (the handle was released, or went on without it)."""

    token: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    page: ListingPage | None = None
    error: Exception | None = None


@dataclass(eq=False)
class DirHandle:
    fh: int
    inode: Inode
    entries: list[tuple[bytes, Inode]] = field(default_factory=list)  # (name, inode) in reply order
    seen: set[str] = field(default_factory=set)
    token: str | None = None
    started: bool = False
    done: bool = False
    next_page: NextPage | None = None  # the page after ``token``, in flight

    def add(self, name: str, inode: Inode) -> None:
        if name not in self.seen:
            self.seen.add(name)
            self.entries.append((os.fsencode(name), inode))


class Handles:
    def __init__(self) -> None:
        self.files: dict[int, FileHandle] = {}
        self.dirs: dict[int, DirHandle] = {}
        self._next = 1

    def _fh(self) -> int:
        fh = self._next
        self._next += 1
        return fh

    def open_file(self, inode: Inode, file: File, flags: int, readahead: ReadAhead) -> FileHandle:
        handle = FileHandle(self._fh(), inode, file, flags, readahead)
        self.files[handle.fh] = handle
        return handle

    def open_dir(self, inode: Inode) -> DirHandle:
        handle = DirHandle(self._fh(), inode)
        self.dirs[handle.fh] = handle
        return handle

    def file(self, fh: int) -> FileHandle:
        try:
            return self.files[fh]
        except KeyError:
            raise OSError(errno.EBADF, "no such file handle") from None

    def dir(self, fh: int) -> DirHandle:
        try:
            return self.dirs[fh]
        except KeyError:
            raise OSError(errno.EBADF, "no such directory handle") from None
