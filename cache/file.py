"""One regular file's state: the single owner of its size, version, attributes and local state.

A :class:`File` exists for every regular file the mount knows: for a file seen only on the
store it is a small in-memory record (no storage); once the file is opened it gets
*storage*, a directory ``CACHE_DIR/files/<fid>/`` named by a random id that lasts as long
as the file does, never by its path.  The path is an attribute (``key``), changed by
rename and journaled; a re-created name gets a new File and new storage, so two
generations of one name never share blocks or a journal record.

Every field is changed only by :class:`cloudfs.cache.block_cache.BlockCache` (content,
transitions, journal) and, for the attribute fields, through its ``set_attrs``; the FUSE
layer and the uploader read them.  The status is one value of :class:`Status`, not a set
of loose flags; its diagram is in docs/concurrency.md.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from dataclasses import dataclass, field

import trio

from cloudfs.layout import Attrs


class Status(enum.Enum):
    # Content and attributes equal the stored object ``base`` (a new file starts DIRTY).
    CLEAN = "clean"
    # Local changes not yet part of an upload.
    DIRTY = "dirty"
    # An upload of every change so far is in flight.
    UPLOADING = "uploading"
    # An upload is in flight and more changes arrived since its snapshot.
    UPLOADING_DIRTY = "uploading+dirty"
    # No name refers to it any more (unlinked, or replaced by a rename): its storage lives
    # until the last handle closes, and it is never uploaded.
    UNLINKED = "unlinked"


PENDING = frozenset({Status.DIRTY, Status.UPLOADING, Status.UPLOADING_DIRTY})
IN_TRANSIT = frozenset({Status.UPLOADING, Status.UPLOADING_DIRTY})


@dataclass(frozen=True)
class Remote:
    """A version of the stored object: the one the clean blocks are a copy of."""

    etag: str | None
    size: int


@dataclass
class StagedPart:
    """A part already sent in the file's open multipart upload."""

    number: int
    etag: str
    start: int
    length: int


@dataclass
class OpenUpload:
    """A multipart upload kept open while a large file is written (linear upload cost).

    Parts are sent as whole ranges of dirty blocks fill; their blocks then become clean and
    evictable.  The upload is journaled, so the next mount completes or aborts it.
    """

    upload_id: str
    key: str
    part_size: int
    token: str  # the upload token in its metadata
    metadata: dict[str, str] = field(default_factory=dict)  # what it was opened with
    parts: dict[int, StagedPart] = field(default_factory=dict)


@dataclass(eq=False)
class File:
    # ---- persisted in the journal record (cache/journal.py) once the file has storage
    key: str  # the object the content is stored in
    size: int
    attrs: Attrs  # mode/uid/gid/mtime/xattrs (size lives in ``size``)
    foreign: dict[str, str]  # other tools' metadata keys, carried over on updates
    base: Remote | None  # the stored version clean blocks belong to; None: nothing stored
    fetch_limit: int  # bytes of ``base`` still part of the content (lowered by truncate)
    status: Status = Status.CLEAN
    fid: str | None = None  # storage id; None until the file is first opened or created
    dirty: dict[int, int] = field(default_factory=dict)  # block -> write generation
    staged: dict[int, int] = field(default_factory=dict)  # block -> part number in ``open_upload``
    upload_token: str | None = None  # sent with the last upload started (see uploader.py)
    open_upload: OpenUpload | None = None
    delete_on_close: Remote | None = None  # unlinked while open: delete this version at last close

    # ---- runtime only
    dir: str = ""  # storage directory
    present: set[int] = field(default_factory=set)  # blocks with a local file
    charged: dict[int, int] = field(default_factory=dict)  # present block -> bytes charged
    gen: int = 0  # bumped by every change; an upload's snapshot remembers it
    uploaded_gen: int = -1  # gen of the last snapshot the store holds (this mount)
    epoch: int = 0  # bumped when blocks stop meaning what they meant (truncate, rebase)
    opens: int = 0  # open handles
    holds: int = 0  # uploads may not start while > 0 (a directory rename in progress)
    last_change: float = 0.0  # monotonic time of the last change: the write-back delay counts from it
    refreshed: float = field(default_factory=time.monotonic)  # attributes last confirmed by the store
    # The last local change (write, truncate, attributes) not yet folded into ``attrs``'s
    # ctime; 0: none.  Uploads and journal records store the later of the two.
    ctime_ns: int = 0
    trunc_low: int = 0  # smallest size truncated to while an upload is in flight
    idle: trio.Event = field(default_factory=trio.Event)  # set while no upload is in flight
    # The journal record's order (BlockCache._write_record): every record built, or removal,
    # takes the next number on the trio thread; ``journal_done`` is the newest one on disk.
    # Records written in worker threads reach the disk in that order, never an older over a newer.
    journal_seq: int = 0
    journal_done: int = 0
    journal_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.status not in IN_TRANSIT:
            self.idle.set()

    @property
    def pending(self) -> bool:
        """Local changes the store does not have yet."""
        return self.status in PENDING

    @property
    def uploading(self) -> bool:
        return self.status in IN_TRANSIT

    @property
    def unlinked(self) -> bool:
        return self.status is Status.UNLINKED

    def block_path(self, block: int) -> str:
        return os.path.join(self.dir, f"b{block}")
