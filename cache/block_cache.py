"""The local block cache: file contents cut into fixed-size blocks on local disk, and the
owner of every :class:`~cloudfs.cache.file.File`'s state transitions.

Storage is per file identity (``CACHE_DIR/files/<fid>/``: block files ``b<N>`` and the
journal record ``state.json``), never per path.  A block is

* absent: fetched on demand with one ranged GET of the file's stored version (``base``),
  zeros where that version never had bytes;
* clean: a copy of the stored version, evictable (LRU);
* dirty: written here and not yet uploaded, never evicted;
* staged: sent as a part of the file's open multipart upload (clean and evictable; data
  that is only in the open upload is reached by completing the upload first).

Every state change is one method here, and each writes the journal record it affects
before it returns, so what the FUSE layer acknowledges is on disk.  Two kinds of change
need no record written on the trio thread (docs/concurrency.md, "The journal"): a first
write into a file with no stored version (recovery takes all its blocks as dirty), and the
upload bookkeeping (``set_upload_token``, ``upload_done``), whose records are written in a
worker thread and awaited by the uploader.  The cache knows
nothing of the uploader: it calls ``on_dirty(file)`` when a file gains changes to upload,
``on_pressure()`` when writers wait for space, and awaits ``complete_upload(file)`` when
a read or write needs data that only an open multipart upload holds.

The size bound is hard and byte-accurate: each block file is charged what it can occupy
(its size rounded up to 4 KiB, at least 4 KiB), and the charge is reserved before the file
is created or grown; if clean blocks cannot be evicted to make room, the caller waits until
uploads turn dirty blocks clean.  Writers also wait while dirty charges would exceed
``max_dirty``.  When the cache file system is below ``min_free`` by more than the whole cache
holds (other programs filled it), no upload or eviction can make room: ENOSPC at once.

Locking (single trio thread; see docs/concurrency.md): code between two awaits runs alone.
``block_locks[(fid, block)]`` is held while a block is fetched or created; nothing else is
awaited under it but the fetch limiter and the download.  After every await, a fetch
re-checks the file's ``epoch`` and ``base``: a truncate, rebase or unlink may have happened
while it waited, and then its bytes are thrown away.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace

import trio

from cloudfs import layout
from cloudfs.backends import Backend
from cloudfs.backends.errors import BackendError, NotFound, PreconditionFailed
from cloudfs.layout import Attrs

from . import journal
from .file import IN_TRANSIT, File, OpenUpload, Remote, StagedPart, Status
from .multi_lock import MultiLock

log = logging.getLogger(__name__)

PAGE = 4096  # the accounting unit: a block file is charged its size rounded up to this
READ_FDS = 64  # block files kept open for reads
STALL_ESCALATE = 10.0  # seconds a writer waits for space before uploads stop staging only
# Metadata key carrying the upload token (lowercase; a valid Azure metadata name).
UPLOAD_KEY = "cloudfs_upload"


class CacheLocked(Exception):
    """Another mount uses this cache directory."""


class StaleError(BackendError):
    errno = errno.ESTALE


@dataclass
class Snapshot:
    """What an upload sends: the file as it was when the upload began."""

    key: str
    size: int
    gen: int
    dirty: dict[int, int]
    base: Remote | None
    fetch_limit: int
    metadata: dict[str, str]
    content_changed: bool  # False: only attributes changed (a metadata update suffices)


@dataclass
class Recovered:
    """What ``BlockCache.open`` found in the journal."""

    pending: list[File] = field(default_factory=list)  # changes to upload
    deletions: list[File] = field(default_factory=list)  # unlinked while open: delete on the store
    stale_uploads: list[tuple[str, str]] = field(default_factory=list)  # (key, upload id) to abort
    resumed_uploads: list[str] = field(default_factory=list)  # upload ids the uploader continues


def _ignore(file: File) -> None:
    pass


def _nothing() -> None:
    pass


async def _no_open_uploads(file: File) -> None:
    raise BackendError(f"{file.key}: data of an open upload is not readable here")


class BlockCache:
    def __init__(self, backend: Backend, cache_dir: str, *, block_size: int, max_bytes: int,
                 max_dirty: int, min_free: int = 0, readahead_blocks: int = 4,
                 stall_timeout: float = 600.0, stall_escalate: float = STALL_ESCALATE,
                 store_identity: str | None = None,
                 on_dirty: Callable[[File], None] = _ignore, on_pressure: Callable[[], None] = _nothing,
                 complete_upload: Callable[[File], Awaitable[None]] = _no_open_uploads) -> None:
        self.backend = backend
        self.dir = cache_dir
        self.files_dir = os.path.join(cache_dir, "files")
        self.block_size = block_size
        self.max_bytes = max_bytes
        self.max_dirty = min(max_dirty, max_bytes)
        self.min_free = min_free
        self.readahead_blocks = readahead_blocks
        self.stall_timeout = stall_timeout
        self.stall_escalate = stall_escalate  # see STALL_ESCALATE
        self.waiting = 0  # writers waiting for cache space right now
        self.stalled = 0  # of them, those waiting longer than stall_escalate
        self._told_disk_full = False  # the log said writes get ENOSPC (min_free), not yet undone
        self.store_identity = store_identity or backend.describe()
        self._on_dirty = on_dirty
        self._on_pressure = on_pressure
        self._complete_upload = complete_upload
        self.by_key: dict[str, File] = {}  # the one linked File per key (unlinked ones are not here)
        self.files: dict[str, File] = {}  # by fid: every File with storage, linked or not
        self.pending: set[File] = set()  # files with changes the store does not have yet
        self.lru: OrderedDict[tuple[str, int], File] = OrderedDict()  # clean blocks, oldest first
        # Block files kept open for reads (at most READ_FDS, least recently read closed first):
        # a read needs no open/close, and the kernel's read-ahead on the block file carries on
        # from read to read.  Invariant: only present blocks have one; a block leaves ``present``
        # only through _drop_blocks, which closes it, so no fd outlives its block file.
        self._read_fds: OrderedDict[tuple[str, int], int] = OrderedDict()
        self.used = 0  # bytes charged to block files, plus reservations in flight
        self.dirty_bytes = 0  # charges of the dirty blocks
        self.block_locks = MultiLock()
        self._changed = trio.Event()  # replaced each time space is freed / dirty bytes drop
        self.fetch_limiter = trio.CapacityLimiter(8)
        self.stats = {"fetches": 0, "fetched_bytes": 0, "evictions": 0, "hits": 0, "lost_bytes": 0}
        self._lock_fd: int | None = None
        # Journal records written, by thread: "trio" (the FUSE thread waits for these) and
        # "worker".  For tests and profiling.
        self.journal_writes: Counter[str] = Counter()

    # ------------------------------------------------------------------ start-up
    def open(self) -> Recovered:
        """Lock the cache dir, check whose it is, load the journal."""
        os.makedirs(self.files_dir, mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
        fd = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheLocked(f"cache directory {self.dir} is in use by another cloudfs mount") from None
        self._lock_fd = fd
        try:
            recorded = journal.check_identity(self.dir, self.store_identity, self.block_size)
        except BaseException:
            self.close()
            raise
        if recorded != self.block_size:
            log.warning("cache directory %s holds %d-byte blocks: using that block size, not %d",
                        self.dir, recorded, self.block_size)
            self.block_size = recorded
        self._migrate_v1()
        found = Recovered()
        loaded: list[tuple[float, tuple[str, int], File]] = []
        for fid in os.listdir(self.files_dir):
            path = os.path.join(self.files_dir, fid)
            record = journal.read_record(path)
            if record is None or record.fid != fid:
                shutil.rmtree(path, ignore_errors=True)  # storage of an unlinked file, or torn
                continue
            file = self._load(record, path, loaded)
            if file.unlinked:
                found.deletions.append(file)
                continue
            if file.key in self.by_key:  # two records claim one key: keep the pending one
                other = self.by_key[file.key]
                loser = other if file.pending and not other.pending else file
                log.warning("%s: two cached versions; dropping the %s one", file.key, loser.status.value)
                self._free(loser)
                if loser is file:
                    continue
            self.by_key[file.key] = file
            self._set_status(file, file.status)
            upload = file.open_upload
            if upload is not None and file.pending and any(b not in file.present for b in file.staged):
                # Some written bytes exist only in the upload left open: it is continued.
                found.resumed_uploads.append(upload.upload_id)
            elif upload is not None:
                # Everything it holds is still here: abort it and send those blocks again,
                # which every store does alike.
                found.stale_uploads.append((upload.key, upload.upload_id))
                if file.pending:
                    self.close_multipart(file)
                else:
                    file.open_upload = None
                    file.staged.clear()
                    self._journal(file)
            if file.pending:
                found.pending.append(file)
        for _, k, file in sorted(loaded, key=lambda t: t[0]):
            if file.fid in self.files and k[1] in file.present and k[1] not in file.dirty:
                self.lru[k] = file
        # The bound is hard from the start: a cache reopened with a smaller cache_size sheds
        # its oldest clean blocks now.
        while self.used > self.max_bytes and self._evict_one():
            pass
        return found

    def _load(self, record: journal.FileRecord, path: str,
              loaded: list[tuple[float, tuple[str, int], File]]) -> File:
        attrs = layout.decode(record.metadata, is_dir=False, size=record.size, server_mtime=None,
                              default_uid=os.getuid(), default_gid=os.getgid())
        base = Remote(record.base_etag, record.base_size) if record.base_etag is not None else None
        status = Status.DIRTY if record.pending else Status.CLEAN
        if record.delete_on_close is not None:
            status = Status.UNLINKED
        file = File(record.key, record.size, attrs, layout.foreign(record.metadata), base,
                    record.fetch_limit, status=status, fid=record.fid, dir=path,
                    upload_token=record.upload_token)
        if record.delete_on_close is not None:
            file.delete_on_close = Remote(**record.delete_on_close)
        if record.open_upload is not None:
            raw = dict(record.open_upload)
            parts = {int(n): StagedPart(**p) for n, p in raw.pop("parts", {}).items()}
            file.open_upload = OpenUpload(**raw, parts=parts)
            file.staged = {int(b): n for b, n in record.staged.items()}
        self.files[record.fid] = file
        dirty = set(record.dirty)
        # A pending file with no stored version has no clean blocks: every block file holds
        # bytes written here, listed in the record or not (see _mark_dirty).
        all_dirty = record.pending and record.base_etag is None and record.delete_on_close is None
        for fname in os.listdir(path):
            if fname.startswith("b") and fname[1:].isdigit():
                block = int(fname[1:])
                st = os.stat(os.path.join(path, fname))
                file.present.add(block)
                file.charged[block] = charge = self.charge(st.st_size)
                self.used += charge
                if block in dirty or all_dirty:
                    file.gen += 1
                    file.dirty[block] = file.gen
                    self.dirty_bytes += charge
                else:
                    loaded.append((st.st_mtime, (record.fid, block), file))
            elif fname.endswith(".tmp"):
                os.unlink(os.path.join(path, fname))
        # The record is rewritten when a block first turns dirty, not on every write that
        # extends the file: after a crash the dirty blocks themselves tell the size.
        for block in file.dirty:
            extent = block * self.block_size + os.path.getsize(file.block_path(block))
            file.size = max(file.size, extent)
        file.gen += 1
        return file

    def _migrate_v1(self) -> None:
        """Cache directories of format 1 kept ``entries/<sha256(key)>/``: give each a file id."""
        old = os.path.join(self.dir, "entries")
        if not os.path.isdir(old):
            return
        for name in os.listdir(old):
            path = os.path.join(old, name)
            raw = journal.read_json(os.path.join(path, "state.json"))
            if not isinstance(raw, dict) or not isinstance(raw.get("key"), str):
                continue
            fid = uuid.uuid4().hex
            record = journal.FileRecord(
                fid=fid, key=raw["key"], size=int(raw.get("size", 0)), pending=bool(raw.get("pending")),
                metadata=dict(raw.get("metadata") or {}), base_etag=raw.get("base_etag"),
                base_size=int(raw.get("base_size", 0)), fetch_limit=int(raw.get("fetch_limit", 0)),
                dirty=list(raw.get("dirty") or []), upload_token=raw.get("upload_token"))
            journal.write_record(path, record, durable=True)
            os.rename(path, os.path.join(self.files_dir, fid))
        shutil.rmtree(old, ignore_errors=True)
        journal.fsync_dir(self.files_dir)

    def close(self) -> None:
        while self._read_fds:
            os.close(self._read_fds.popitem()[1])
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ files and names
    def file_for(self, key: str, remote: Remote, attrs: Attrs, foreign: dict[str, str]) -> File:
        """The File for the stored object ``remote`` at ``key`` (found by a lookup or listing).

        A File with local changes wins until they are uploaded.  A clean one of the same
        version is reused (its cached blocks stay valid) and takes the fresh attributes; one
        of another version is superseded: old handles keep it, new ones get a new File.
        """
        file = self.by_key.get(key)
        if file is not None:
            if file.pending:
                file.refreshed = time.monotonic()
                return file
            if file.base is not None and file.base.etag == remote.etag:
                file.attrs, file.foreign, file.refreshed = attrs, dict(foreign), time.monotonic()
                return file
            self._unlink(file)
        file = File(key, remote.size, attrs, dict(foreign), remote, remote.size)
        self.by_key[key] = file
        return file

    def new_file(self, key: str, attrs: Attrs) -> File:
        """A new, empty file created here: storage now, pending upload, journaled."""
        old = self.by_key.get(key)
        if old is not None:
            self._unlink(old)
        file = File(key, 0, attrs, {}, None, 0)
        self._set_status(file, Status.DIRTY)
        self.by_key[key] = file
        self._attach(file)  # its one record: pending, no stored version
        self._changed_now(file, journal=False)
        return file

    def forget(self, file: File) -> None:
        """Nothing in memory refers to ``file`` any more (its inode was dropped).

        A file without storage is forgotten; one with storage stays, its clean blocks
        serving the next open of the same version.
        """
        if file.fid is None and not file.pending and self.by_key.get(file.key) is file:
            del self.by_key[file.key]

    def absent(self, key: str) -> None:
        """The store has no object at ``key`` (a lookup said so): drop a clean stored File."""
        file = self.by_key.get(key)
        if file is not None and not file.pending:
            self._unlink(file)

    def rename(self, file: File, new_key: str, base: Remote | None = None, attrs: Attrs | None = None
               ) -> None:
        """``file`` is now stored under ``new_key`` (after the store moved its object, whose
        new version is ``base``), with ``attrs`` if given: the moved object was stored with
        them, so they are no change to upload.  Whatever was at ``new_key`` must be unlinked
        first."""
        assert new_key not in self.by_key or self.by_key[new_key] is file, new_key
        if self.by_key.get(file.key) is file:
            del self.by_key[file.key]
        file.key = new_key
        if base is not None:
            file.base = base
        if attrs is not None:
            file.attrs = attrs
            file.ctime_ns = 0
        self.by_key[new_key] = file
        self._journal(file)

    def unlink(self, file: File, delete_on_close: Remote | None = None) -> None:
        """No name refers to ``file`` any more: its pending changes are never uploaded, its
        storage lives until the last handle closes.  ``delete_on_close``: the stored object
        is deleted only then (it still holds data the open handles may read); journaled, so
        a crash before that deletes it on the next mount."""
        assert not file.uploading, "wait for file.idle first"
        self._unlink(file)
        if delete_on_close is not None and file.fid is not None:
            file.delete_on_close = delete_on_close
            self._journal(file)

    def _unlink(self, file: File) -> None:
        if self.by_key.get(file.key) is file:
            del self.by_key[file.key]
        file.staged.clear()  # the caller gave the open upload up (Uploader.discard)
        file.open_upload = None
        self._set_status(file, Status.UNLINKED)
        file.epoch += 1
        file.idle.set()
        if file.fid is not None:
            self._unjournal(file)
            if not file.opens:
                self._free(file)

    def _set_status(self, file: File, status: Status) -> None:
        """The one place a File's status changes (``pending`` follows it)."""
        file.status = status
        if file.pending:
            self.pending.add(file)
        else:
            self.pending.discard(file)

    def open_handle(self, file: File) -> None:
        """A handle opened ``file``: give it storage if it has none yet."""
        file.opens += 1
        if file.fid is None and not file.unlinked:
            self._attach(file)

    def close_handle(self, file: File) -> Remote | None:
        """A handle closed.  Returns the stored version to delete now, if the file was
        unlinked while open and this was its last handle (then call ``deleted``)."""
        file.opens -= 1
        if file.opens or not file.unlinked:
            return None
        if file.delete_on_close is not None:
            return file.delete_on_close
        self._free(file)
        return None

    def deleted(self, file: File) -> None:
        """The store no longer has ``file``'s stored version: nothing is left to delete at the
        last close.  Its storage goes now, or at the last close if handles are open."""
        file.delete_on_close = None
        if file.opens and file.fid is not None:
            self._unjournal(file)
        else:
            self._free(file)

    def _attach(self, file: File) -> None:
        fid = uuid.uuid4().hex
        path = os.path.join(self.files_dir, fid)
        os.makedirs(path, mode=0o700)
        file.fid, file.dir = fid, path
        self.files[fid] = file
        self._journal(file)

    def _free(self, file: File) -> None:
        if file.fid is None:
            return
        self._drop_blocks(file, set(file.present))
        with file.journal_lock:  # no record written in a worker thread outlives the storage
            file.journal_seq += 1
            file.journal_done = file.journal_seq
            shutil.rmtree(file.dir, ignore_errors=True)
        self.files.pop(file.fid, None)
        file.fid, file.dir = None, ""
        if self.by_key.get(file.key) is file and not file.pending:
            del self.by_key[file.key]

    # ------------------------------------------------------------------ attributes
    def set_attrs(self, file: File, attrs: Attrs) -> None:
        """New mode/owner/times/xattrs: journaled, and uploaded with the file (an object whose
        content did not change gets a metadata update only).  ``attrs`` carries the ctime
        (the caller's, or the kernel's): it replaces any earlier local change's."""
        file.attrs = attrs
        file.ctime_ns = 0
        self._changed_now(file)

    def metadata(self, file: File) -> dict[str, str]:
        """What to store with the object: other tools' keys, then cloudfs's (its ctime the
        last change, a write or truncate included)."""
        attrs = file.attrs
        if file.ctime_ns > attrs.ctime:
            attrs = replace(attrs, ctime_ns=file.ctime_ns)
        return {**file.foreign, **layout.encode(attrs)}

    def _changed_now(self, file: File, journal: bool = True) -> None:
        """``file`` changed (content or attributes): it must be uploaded, and the journal says so
        (the record is rewritten when the change is in it, or when the file turns pending)."""
        file.gen += 1
        file.last_change = time.monotonic()
        if file.unlinked:
            return
        if file.status is Status.CLEAN:
            self._set_status(file, Status.DIRTY)
            journal = True
        elif file.status is Status.UPLOADING:
            self._set_status(file, Status.UPLOADING_DIRTY)
        if file.fid is None:
            self._attach(file)
        elif journal:
            self._journal(file)
        self._on_dirty(file)

    # ------------------------------------------------------------------ journal
    def _record(self, file: File) -> journal.FileRecord:
        assert file.fid is not None
        return journal.FileRecord(
            fid=file.fid, key=file.key, size=file.size, pending=file.pending, metadata=self.metadata(file),
            base_etag=file.base.etag if file.base else None, base_size=file.base.size if file.base else 0,
            fetch_limit=file.fetch_limit, dirty=sorted(file.dirty),
            staged={str(b): n for b, n in file.staged.items()}, upload_token=file.upload_token,
            open_upload=asdict(file.open_upload) if file.open_upload else None,
            delete_on_close=asdict(file.delete_on_close) if file.delete_on_close else None)

    def _journaled(self, file: File) -> bool:
        return file.fid is not None and not (file.unlinked and file.delete_on_close is None)

    def _journal(self, file: File, durable: bool = False) -> None:
        """Write the file's record now, on the trio thread: on disk before the caller goes on."""
        if not self._journaled(file):
            return
        file.journal_seq += 1
        if self._write_record(file, file.dir, self._record(file), file.journal_seq, durable):
            self.journal_writes["trio"] += 1

    async def _journal_in_worker(self, file: File) -> None:
        """Write the file's record in a worker thread; on disk when this returns (or a newer
        one is).  The record is built now: it holds the state as of this call."""
        if not self._journaled(file):
            return
        file.journal_seq += 1
        args = (file, file.dir, self._record(file), file.journal_seq, False)
        if await trio.to_thread.run_sync(self._write_record, *args):
            self.journal_writes["worker"] += 1

    def _write_record(self, file: File, path: str, record: journal.FileRecord, seq: int,
                      durable: bool) -> bool:
        """Any thread.  Records reach the disk in the order they were built (``seq``): one
        built before the newest written (or before the record was removed) is dropped, and
        a durable one then makes the newer record durable instead.  True if written."""
        with file.journal_lock:
            try:
                if seq <= file.journal_done:
                    if durable:
                        journal.sync_record(path)
                    return False
                journal.write_record(path, record, durable)
            except FileNotFoundError:
                return False  # the storage is gone (unlinked): nothing left to record
            file.journal_done = seq
            return True

    def _unjournal(self, file: File) -> None:
        """Remove the record (no name refers to the file); records built before stay off disk."""
        with file.journal_lock:
            file.journal_seq += 1
            file.journal_done = file.journal_seq
            journal.remove(journal.record_path(file.dir), durable=False)

    async def make_durable(self, file: File) -> None:
        """fsync the dirty blocks and the journal record: the data survives a power loss."""
        if file.fid is None or file.unlinked:
            return
        blocks = [file.block_path(b) for b in file.dirty]
        file.journal_seq += 1
        record, path, seq = self._record(file), file.dir, file.journal_seq

        def sync() -> bool:
            for block_path in blocks:
                try:
                    fd = os.open(block_path, os.O_RDONLY)
                except FileNotFoundError:
                    continue  # dropped by a truncate meanwhile: the record written later covers it
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            # Built here, on the trio thread, and written in the worker: if a newer record was
            # written meanwhile, that one is made durable instead (it holds all of this one).
            return self._write_record(file, path, record, seq, durable=True)

        if await trio.to_thread.run_sync(sync):
            self.journal_writes["worker"] += 1
        journal.fsync_dir(self.files_dir)

    # ------------------------------------------------------------------ space
    def _drop_blocks(self, file: File, blocks: set[int]) -> None:
        for block in blocks:
            if block not in file.present:
                continue
            file.present.discard(block)
            assert file.fid is not None
            self.lru.pop((file.fid, block), None)
            fd = self._read_fds.pop((file.fid, block), None)
            if fd is not None:
                os.close(fd)
            charge = file.charged.pop(block, 0)
            if file.dirty.pop(block, None) is not None:
                self.dirty_bytes -= charge
            self.used -= charge
            try:
                os.unlink(file.block_path(block))
            except FileNotFoundError:
                pass
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_change(self) -> None:
        """Sleep until space is freed or dirty bytes drop; callers re-check their condition.

        Back-pressure, not a hang: if nothing frees space for ``stall_timeout`` seconds
        (uploads keep failing, e.g. the store is unreachable), the writer gets ENOSPC.
        """
        self.waiting += 1
        try:
            self._on_pressure()
            with trio.move_on_after(self.stall_timeout) as scope:
                with trio.move_on_after(min(self.stall_escalate, self.stall_timeout)) as early:
                    await self._changed.wait()
                if early.cancelled_caught:
                    # Staging whole parts freed nothing: the uploader sends whole rounds
                    # (completing open uploads) while a writer is this stuck.
                    self.stalled += 1
                    try:
                        log.info("writers waited %.0fs for cache space: uploading whole files",
                                 self.stall_escalate)
                        self._on_pressure()
                        await self._changed.wait()
                    finally:
                        self.stalled -= 1
        finally:
            self.waiting -= 1
        if scope.cancelled_caught:
            raise OSError(errno.ENOSPC, f"cache full and no upload finished in {self.stall_timeout:.0f}s")

    def _evict_one(self) -> bool:
        for (_fid, block), file in self.lru.items():
            self.stats["evictions"] += 1
            self._drop_blocks(file, {block})
            return True
        return False

    def _disk_free(self) -> int:
        st = os.statvfs(self.dir)
        return st.f_bavail * st.f_frsize

    def charge(self, length: int) -> int:
        """What a block file of ``length`` bytes is charged: rounded up to PAGE, at least PAGE."""
        return max(PAGE, -(-min(length, self.block_size) // PAGE) * PAGE)

    async def reserve(self, nbytes: int) -> None:
        """Add ``nbytes`` to ``used``: evict clean blocks to make room, else wait for uploads.

        The caller owns the reservation: it becomes a block's charge or is given back.
        """
        waited = False
        while True:
            while self.used + nbytes > self.max_bytes or (
                    self.min_free and self._disk_free() < self.min_free + nbytes):
                if not self._evict_one():
                    break
            else:
                self.used += nbytes
                self._told_disk_full = False
                return
            if self.min_free and (free := self._disk_free()) + self.used < self.min_free + nbytes:
                # Others filled the cache file system: even an empty cache would not make room.
                # Said once until a reservation succeeds again (writes keep coming meanwhile).
                if not self._told_disk_full:
                    self._told_disk_full = True
                    log.warning("cache file system has %d bytes free, below min_free (%d) with the "
                                "cache holding %d: writes get ENOSPC", free, self.min_free, self.used)
                raise OSError(errno.ENOSPC, "cache file system below min_free")
            if not waited:
                log.info("cache full (%d bytes, %d dirty): waiting for uploads", self.used, self.dirty_bytes)
                waited = True
            await self._wait_change()

    def _unreserve(self, nbytes: int) -> None:
        self.used -= nbytes
        self._wake()

    async def _wait_dirty_budget(self, file: File, block: int, end: int, empty: bool) -> None:
        """Wait while the bytes a write ending at ``end`` within ``block`` adds to ``dirty_bytes``
        would exceed ``max_dirty`` (never when nothing is dirty: a write always progresses)."""
        while (n := self._dirty_growth(file, block, end, empty)) and self.dirty_bytes and (
                self.dirty_bytes + n > self.max_dirty):
            await self._wait_change()

    def _dirty_growth(self, file: File, block: int, end: int, empty: bool) -> int:
        need = self.charge(end)
        if block in file.dirty:
            return max(0, need - file.charged.get(block, 0))
        if block in file.present:
            return max(need, file.charged.get(block, 0))
        remote = 0
        if not empty and file.base is not None:
            remote = min(self.block_size, file.fetch_limit - block * self.block_size)
        return max(need, self.charge(remote))

    async def _grow(self, file: File, block: int, length: int) -> bool:
        """Make the present block's charge cover a file of ``length`` bytes.

        True when it already did; False after an await (the caller re-checks: the block may
        have been dropped meanwhile).
        """
        need = self.charge(length) - file.charged.get(block, 0)
        if need <= 0:
            return True
        assert file.fid is not None
        key = (file.fid, block)
        pinned = self.lru.pop(key, None) is not None  # not evictable while we wait for room
        try:
            await self.reserve(need)
        finally:
            if pinned and block in file.present and block not in file.dirty and file.fid == key[0]:
                self.lru[key] = file
        if block in file.present and file.fid == key[0]:
            file.charged[block] = file.charged.get(block, 0) + need
            if block in file.dirty:
                self.dirty_bytes += need
        else:
            self._unreserve(need)
        return False

    # ------------------------------------------------------------------ blocks
    def _needs_open_upload(self, file: File, block: int) -> bool:
        return block in file.staged and block not in file.present

    async def ensure_block(self, file: File, block: int) -> None:
        """Make the block present locally (fetch its stored part, zeros for the rest)."""
        if block in file.present:
            self.stats["hits"] += 1
            return
        if file.fid is None:
            self._attach(file)
        while self._needs_open_upload(file, block) and not file.unlinked:
            await self._complete_upload(file)
        fid = file.fid
        async with self.block_locks((fid, block)):
            while block not in file.present and file.fid == fid:
                base = file.base
                try:
                    await self._fetch_block(file, block)
                except StaleError:
                    if file.base is not base:
                        continue  # rebased meanwhile (our own upload finished): fetch from the new base
                    if file.uploading:
                        await file.idle.wait()  # our own upload is replacing the object right now
                        if file.base is not base:
                            continue
                    if file.upload_token and await self._adopt_own_upload(file) and file.base is not base:
                        continue
                    raise

    async def _fetch_block(self, file: File, block: int) -> None:
        """ensure_block()'s work, under the block lock.  Returns without making the block
        present if the file changed under it (the caller loops)."""
        start = block * self.block_size
        charge = 0
        while True:
            remote_len = max(0, min(self.block_size, file.fetch_limit - start)) if file.base else 0
            if self.charge(remote_len) <= charge:
                break
            if charge:
                self._unreserve(charge)  # fetch_limit grew while we waited (an upload finished)
            charge = self.charge(remote_len)
            await self.reserve(charge)
        epoch, base, fid = file.epoch, file.base, file.fid
        path = file.block_path(block)
        try:
            if remote_len and base is not None:
                tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
                try:
                    async with self.fetch_limiter:
                        with open(tmp, "wb", opener=_private) as f:
                            await self.backend.download(file.key, f, start, remote_len, if_match=base.etag)
                    if os.path.getsize(tmp) != remote_len:
                        raise StaleError(f"{file.key}: object is shorter than expected")
                    if file.epoch != epoch or file.base is not base or file.fid != fid:
                        self._unreserve(charge)
                        return  # truncated, rebased or unlinked meanwhile: these bytes are stale
                    os.rename(tmp, path)
                except (PreconditionFailed, NotFound):
                    raise StaleError(f"{file.key}: changed on the server; reopen it") from None
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                self.stats["fetches"] += 1
                self.stats["fetched_bytes"] += remote_len
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        except BaseException:
            self._unreserve(charge)
            raise
        self._add_present(file, block, charge)

    def _add_present(self, file: File, block: int, charge: int) -> None:
        assert file.fid is not None
        file.present.add(block)
        file.charged[block] = charge
        self.lru[(file.fid, block)] = file

    async def _adopt_own_upload(self, file: File) -> bool:
        """The file's base is gone: if the object carries our journaled upload token, it is our
        own upload, committed but not recorded (killed, or the reply lost); take it as base."""
        token = file.upload_token
        try:
            info = await self.backend.head(file.key)
        except NotFound:
            return False
        if file.uploading or file.unlinked or file.upload_token != token or not carries(info.metadata, token):
            return False
        self.rebase_on_own_upload(file, Remote(info.etag, info.size))
        return True

    def rebase_on_own_upload(self, file: File, remote: Remote) -> None:
        """Take ``remote``, our own committed but unrecorded upload, as the base.

        It holds the snapshot of that upload: at every byte below the fetch limit that is not
        in a local block it equals the old base, so uncached bytes can be fetched from it.
        If it is the open multipart upload that was committed, the staged blocks' bytes are
        in it too (a later truncate below them completes the upload first, so none was cut).
        The file stays pending: the local content is sent again.
        """
        log.info("%s: the server has our interrupted upload; continuing from it", file.key)
        upload = file.open_upload
        if upload is not None and upload.token and upload.token == file.upload_token:
            staged_end = max(((b + 1) * self.block_size for b in file.staged), default=0)
            file.fetch_limit = max(file.fetch_limit, min(staged_end, file.size))
            file.staged.clear()
            file.open_upload = None
        file.base = remote
        file.fetch_limit = min(file.fetch_limit, remote.size)
        self._journal(file)

    def _touch(self, file: File, block: int) -> None:
        k = (file.fid or "", block)
        if k in self.lru:
            self.lru.move_to_end(k)

    async def read(self, file: File, offset: int, size: int) -> bytes:
        end = min(offset + size, file.size)
        out = bytearray()
        pos = offset
        while pos < end:
            block, within = divmod(pos, self.block_size)
            n = min(self.block_size - within, end - pos)
            await self.ensure_block(file, block)
            end = min(end, file.size)  # a truncate may have run while we waited
            n = min(n, end - pos)
            if n <= 0:
                break
            if block not in file.present:
                continue
            data = os.pread(self._read_fd(file, block), n, within)
            if len(data) < n:
                data += bytes(n - len(data))  # hole: zeros past the end of the block file
            self._touch(file, block)
            if pos == offset and pos + n >= end:
                return data  # all of it from one block: no copy
            out += data
            pos += n
        return bytes(out)

    def _read_fd(self, file: File, block: int) -> int:
        """An open read-only fd of a present block's file (see ``_read_fds``)."""
        assert file.fid is not None
        key = (file.fid, block)
        fd = self._read_fds.get(key)
        if fd is None:
            fd = self._read_fds[key] = os.open(file.block_path(block), os.O_RDONLY | os.O_CLOEXEC)
            if len(self._read_fds) > READ_FDS:
                os.close(self._read_fds.popitem(last=False)[1])
        else:
            self._read_fds.move_to_end(key)
        return fd

    def prefetch_range(self, file: File, offset: int, blocks: int | None = None) -> list[int]:
        """Blocks worth fetching ahead of a sequential reader at ``offset``."""
        first = offset // self.block_size + 1
        last = min((file.size - 1) // self.block_size if file.size else -1,
                   first + (self.readahead_blocks if blocks is None else blocks) - 1)
        return [b for b in range(first, last + 1)
                if b not in file.present and b * self.block_size < file.fetch_limit
                and b not in file.staged and not self.block_locks.locked((file.fid, b))]

    async def write(self, file: File, offset: int, data: bytes | memoryview) -> int:
        pos, view = offset, memoryview(data)
        while view:
            block, within = divmod(pos, self.block_size)
            n = min(self.block_size - within, len(view))
            while block in file.staged:
                await self._unstage(file, block)
            empty = self._covers(file, pos, n) or block * self.block_size >= file.fetch_limit
            await self._wait_dirty_budget(file, block, within + n, empty)
            # The block file's charge covers what it will hold after the write *before* the
            # write: used <= max_bytes at all times.  Each await may drop the block (truncate,
            # eviction, unlink): loop until it is present with a sufficient charge.
            while True:
                if file.fid is None:
                    self._attach(file)
                if block not in file.present:
                    if self._covers(file, pos, n) or block * self.block_size >= file.fetch_limit:
                        await self._ensure_block_empty(file, block)  # nothing stored to merge with
                    else:
                        await self.ensure_block(file, block)
                elif await self._grow(file, block, within + n):
                    break
            # Journal the block as dirty *before* changing its file: killed in between, a
            # clean-looking block file with new bytes would pass for a copy of the stored
            # version and never be uploaded (a dirty block with old bytes is harmless).
            self._mark_dirty(file, block)
            fd = os.open(file.block_path(block), os.O_WRONLY)
            try:
                os.pwrite(fd, view[:n], within)
            finally:
                os.close(fd)
            view = view[n:]
            pos += n
            file.size = max(file.size, pos)
        file.last_change = time.monotonic()
        file.ctime_ns = time.time_ns()
        return len(data)

    def _covers(self, file: File, pos: int, n: int) -> bool:
        """A write of ``n`` bytes at ``pos`` (within one block) replaces every byte the block holds."""
        return pos % self.block_size == 0 and (n == self.block_size or pos + n >= file.size)

    async def _ensure_block_empty(self, file: File, block: int) -> None:
        fid = file.fid
        async with self.block_locks((fid, block)):
            if block in file.present or file.fid != fid:
                return
            charge = self.charge(0)
            await self.reserve(charge)
            if file.fid != fid:
                self._unreserve(charge)
                return
            try:
                os.close(os.open(file.block_path(block), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            except BaseException:
                self._unreserve(charge)
                raise
            # Callers guarantee no stored byte of this block survives the coming write.
            self._add_present(file, block, charge)

    def _mark_dirty(self, file: File, block: int) -> None:
        """``block`` is about to be written: dirty, not evictable, its generation current."""
        first = block not in file.dirty
        if first:
            assert file.fid is not None
            self.dirty_bytes += file.charged.get(block, 0)
            self.lru.pop((file.fid, block), None)
            file.dirty[block] = file.gen
        # The record lists the dirty blocks: written when the set grows, not on every write.
        # A file with no stored version needs none (the record on disk says so too: base is
        # journaled on every change of it): recovery takes every block of such a file as
        # dirty, it has no clean ones to mistake them for.
        self._changed_now(file, journal=first and file.base is not None)
        file.dirty[block] = file.gen

    async def _unstage(self, file: File, block: int) -> None:
        """``block`` is about to change, but it was sent in a part of the open upload: the part
        is taken back (its blocks dirty again) if all of them are here; otherwise the open
        upload is completed first, since it holds the only copy of the others."""
        number = file.staged[block]
        blocks = [b for b, n in file.staged.items() if n == number]
        if not all(b in file.present for b in blocks):
            await self._complete_upload(file)
            return
        assert file.open_upload is not None and file.fid is not None
        for b in blocks:
            del file.staged[b]
            self.lru.pop((file.fid, b), None)
            file.dirty[b] = file.gen
            self.dirty_bytes += file.charged.get(b, 0)
        file.open_upload.parts.pop(number, None)
        self._journal(file)

    async def truncate(self, file: File, size: int) -> None:
        while any((b + 1) * self.block_size > size for b in file.staged) and not file.unlinked:
            await self._complete_upload(file)  # the cut would go through data sent in parts
        if file.fid is None:
            self._attach(file)
        if size < file.size:
            last = (size - 1) // self.block_size if size else -1
            self._drop_blocks(file, {b for b in file.present if b > last})
            file.fetch_limit = min(file.fetch_limit, size)
            file.epoch += 1  # fetches in flight hold bytes past the new end
            within = size - last * self.block_size if last >= 0 else 0
            if last >= 0 and within < self.block_size:
                if last in file.present or last * self.block_size < file.fetch_limit:
                    await self.ensure_block(file, last)
                    if last in file.present:
                        self._mark_dirty(file, last)  # before the file changes: see write()
                        path = file.block_path(last)
                        length = min(within, os.path.getsize(path))
                        os.truncate(path, length)
                        freed = file.charged.get(last, 0) - self.charge(length)
                        if freed > 0:
                            file.charged[last] -= freed
                            self.dirty_bytes -= freed
                            self._unreserve(freed)
        file.size = size
        file.trunc_low = min(file.trunc_low, size)
        file.ctime_ns = time.time_ns()
        self._changed_now(file)

    # ------------------------------------------------------------------ uploads
    def begin_upload(self, file: File) -> Snapshot:
        """An upload of everything so far starts: DIRTY -> UPLOADING, and its snapshot."""
        assert file.status is Status.DIRTY, file.status
        self._set_status(file, Status.UPLOADING)
        file.idle = trio.Event()
        file.trunc_low = file.size
        content_changed = bool(file.dirty) or file.base is None or not (
            file.size == file.base.size == file.fetch_limit)
        return Snapshot(file.key, file.size, file.gen, dict(file.dirty), file.base, file.fetch_limit,
                        self.metadata(file), content_changed)

    async def set_upload_token(self, file: File, token: str | None) -> None:
        """Journaled before the upload can change the object (see uploader.py): the record is
        on disk when this returns, written in a worker thread."""
        file.upload_token = token
        await self._journal_in_worker(file)

    async def upload_done(self, file: File, snap: Snapshot, etag: str) -> None:
        """The store holds ``snap`` as version ``etag``: blocks not rewritten since are clean.

        The state changes at once; the record follows in a worker thread.  Until it is on
        disk the old one says pending, with the upload token: a crash re-uploads, and the
        object carrying the token is taken as ours (docs/concurrency.md, crash points)."""
        if file.unlinked:
            return
        file.base = Remote(etag, snap.size)
        file.fetch_limit = min(snap.size, file.trunc_low)
        file.upload_token = None
        file.open_upload = None
        file.staged.clear()
        file.uploaded_gen = snap.gen
        clean = []
        for block, gen in snap.dirty.items():
            if file.dirty.get(block) == gen:
                del file.dirty[block]
                self.dirty_bytes -= file.charged.get(block, 0)
                clean.append(block)
        if file.status is Status.UPLOADING and file.gen == snap.gen:
            self._set_status(file, Status.CLEAN)
            file.refreshed = time.monotonic()
        else:
            self._set_status(file, Status.DIRTY)
        file.idle.set()
        self._wake()
        if file.pending:
            self._on_dirty(file)
        await self._journal_in_worker(file)
        # Evictable only now: until the record says they are clean it lists them as dirty (or
        # the file as having no stored version), and a crash uploads them again from here.
        for block in clean:
            if file.fid is not None and block in file.present and block not in file.dirty:
                self.lru[(file.fid, block)] = file
        self._wake()

    def upload_failed(self, file: File) -> None:
        if file.status in IN_TRANSIT:
            self._set_status(file, Status.DIRTY)
        file.idle.set()
        self._wake()

    def retarget(self, file: File, key: str) -> int:
        """A conflict: the store's version keeps the name, and this file's content becomes a
        new object under ``key``.  Returns the bytes lost (see ``lose_base``)."""
        if self.by_key.get(file.key) is file:
            del self.by_key[file.key]
        file.key = key
        self.by_key[key] = file
        file.upload_token = None
        return self.lose_base(file)

    def lose_base(self, file: File) -> int:
        """The stored version is gone (deleted elsewhere, or replaced): the file goes up from
        local data alone.  Cached blocks of the old version become dirty (they are its only
        copy now); bytes never cached here are zeros, and their count is returned (lost, for
        the caller to report)."""
        lost = 0
        if file.base is not None:
            for block in range(0, -(-file.fetch_limit // self.block_size)):
                if block not in file.present:
                    lost += min(self.block_size, file.fetch_limit - block * self.block_size)
        for block in file.present - set(file.dirty):
            assert file.fid is not None
            self.lru.pop((file.fid, block), None)
            file.dirty[block] = file.gen
            self.dirty_bytes += file.charged.get(block, 0)
        file.base = None
        file.fetch_limit = 0
        file.epoch += 1
        self.stats["lost_bytes"] += lost
        self._journal(file)
        return lost

    def open_multipart(self, file: File, upload: OpenUpload) -> None:
        file.open_upload = upload
        self._journal(file, durable=True)

    def staged_part(self, file: File, part: StagedPart, gens: dict[int, int]) -> None:
        """Part ``part`` of the open upload holds these blocks (at these generations): those
        not rewritten since are clean and evictable; the journal lists the part."""
        assert file.open_upload is not None and file.fid is not None
        file.open_upload.parts[part.number] = part
        for block, gen in gens.items():
            if file.dirty.get(block) == gen:
                del file.dirty[block]
                self.dirty_bytes -= file.charged.get(block, 0)
                file.staged[block] = part.number
                if block in file.present:
                    self.lru[(file.fid, block)] = file
        self._journal(file, durable=True)
        self._wake()

    def close_multipart(self, file: File) -> dict[int, int]:
        """The open upload is gone (aborted, or forgotten by the store): staged blocks that are
        still here are dirty again (returned with their generation).  A staged block already
        evicted existed only in the upload: its bytes are lost, counted and logged."""
        again: dict[int, int] = {}
        lost = 0
        for block in list(file.staged):
            if block in file.present:
                assert file.fid is not None
                self.lru.pop((file.fid, block), None)
                file.dirty[block] = again[block] = file.gen
                self.dirty_bytes += file.charged.get(block, 0)
            else:
                lost += min(self.block_size, max(0, file.size - block * self.block_size))
        if lost:
            self.stats["lost_bytes"] += lost
            log.error("%s: %d bytes existed only in a multipart upload the store no longer has",
                      file.key, lost)
        file.staged.clear()
        file.open_upload = None
        self._journal(file)
        return again

    def pending_files(self) -> list[File]:
        return list(self.pending)


def carries(meta: dict[str, str] | None, token: str | None) -> bool:
    """Whether object metadata carries our upload token."""
    return bool(token) and any(k.lower() == UPLOAD_KEY and v == token for k, v in (meta or {}).items())


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)
