"""The local block cache: file contents cut into fixed-size blocks kept on local disk.

One *entry* per object key, in ``CACHE_DIR/entries/<sha256(key)>/``: block files ``b<N>``
and the journal record ``state.json`` (:mod:`cloudfs.cache.journal`).  A block is either

* absent: its bytes are fetched on demand with one ranged GET of the remote version
  (``base``), or are zeros where the remote version never had them;
* clean: a local copy of the remote version, evictable (LRU);
* dirty: written locally, not yet uploaded, never evicted.

The size bound is hard and byte-accurate: each block file is charged what it can occupy
(its size rounded up to 4 KiB, at least 4 KiB), and the charge is reserved before the file
is created or grown; if clean blocks cannot be evicted to make room, the caller waits until
the uploader turns dirty blocks clean.  Writers also wait while the charges of dirty blocks
would exceed ``max_dirty``.  The concurrency
rules (what runs between awaits, the per-block locks) are in docs/concurrency.md.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from cloudfs.backends import Backend
from cloudfs.backends.errors import BackendError, PreconditionFailed

from .journal import EntryState, fsync_dir, read_state, state_path, write_state
from .multi_lock import MultiLock

log = logging.getLogger(__name__)


PAGE = 4096  # the accounting unit: a block file is charged its size rounded up to this


class CacheLocked(Exception):
    """Another mount uses this cache directory."""


class StaleError(BackendError):
    errno = errno.ESTALE


@dataclass
class Remote:
    """The remote version the clean blocks of an entry belong to."""

    etag: str | None
    size: int


@dataclass
class Entry:
    id: str
    key: str
    size: int
    base: Remote | None
    fetch_limit: int
    dir: str
    present: set[int] = field(default_factory=set)
    dirty: dict[int, int] = field(default_factory=dict)  # block -> write generation
    charged: dict[int, int] = field(default_factory=dict)  # present block -> bytes in BlockCache.used
    metadata: dict[str, str] = field(default_factory=dict)
    gen: int = 0
    uploading: bool = False
    deleted: bool = False
    open_count: int = 0
    last_write: float = 0.0
    trunc_low: int = 0  # smallest size truncated to while an upload runs
    read_end: int = -1  # where the last read ended, and where the current sequential run began
    run_start: int = 0
    pending: bool = False  # content or metadata differs from the remote object: upload it
    upload_token: str | None = None  # journaled before an upload, sent in its metadata
    journaled: bool = False  # state.json reflects the dirty set
    idle: trio.Event = field(default_factory=trio.Event)  # set when no upload runs

    def block_path(self, block: int) -> str:
        return os.path.join(self.dir, f"b{block}")

    def state(self) -> EntryState:
        return EntryState(self.key, self.size, self.base.etag if self.base else None,
                          self.base.size if self.base else 0, self.fetch_limit,
                          sorted(self.dirty), dict(self.metadata), self.pending, self.upload_token)


def entry_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:40]


class BlockCache:
    def __init__(self, backend: Backend, cache_dir: str, *, block_size: int, max_bytes: int,
                 max_dirty: int, min_free: int = 0, readahead_blocks: int = 4,
                 stall_timeout: float = 600.0) -> None:
        self.backend = backend
        self.dir = cache_dir
        self.entries_dir = os.path.join(cache_dir, "entries")
        self.block_size = block_size
        self.max_bytes = max_bytes
        self.max_dirty = min(max_dirty, max_bytes)
        self.min_free = min_free
        self.readahead_blocks = readahead_blocks
        self.stall_timeout = stall_timeout
        self.entries: dict[str, Entry] = {}  # by key; orphans (unlinked while open) are not here
        self.lru: OrderedDict[tuple[str, int], Entry] = OrderedDict()  # clean blocks, oldest first
        self.used = 0  # bytes charged to block files, plus reservations in flight
        self.dirty_bytes = 0  # charges of the dirty blocks
        self.block_locks = MultiLock()
        self._changed = trio.Event()  # replaced each time space is freed / dirty bytes drop
        self.fetch_limiter = trio.CapacityLimiter(8)
        self.on_pressure: Callable[[], None] = lambda: None  # uploader hook: upload now
        # Uploader hook, for an entry with an upload token whose base is gone: rebase the entry
        # on the object if it is our own unrecorded upload; True when it did.
        self.adopt_own_upload: Callable[[Entry], Awaitable[bool]] = _never
        self.stats = {"fetches": 0, "fetched_bytes": 0, "evictions": 0, "hits": 0}
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ start-up
    def open(self) -> list[Entry]:
        """Lock the cache dir, load persisted entries; returns entries with pending uploads."""
        os.makedirs(self.entries_dir, mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
        fd = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheLocked(f"cache directory {self.dir} is in use by another cloudfs mount") from None
        self._lock_fd = fd
        pending = []
        loaded: list[tuple[float, tuple[str, int], Entry]] = []
        for name in os.listdir(self.entries_dir):
            path = os.path.join(self.entries_dir, name)
            state = read_state(path)
            if state is None or name != entry_id(state.key):
                shutil.rmtree(path, ignore_errors=True)  # orphan of an unlinked file, or torn
                continue
            entry = Entry(name, state.key, state.size,
                          Remote(state.base_etag, state.base_size) if state.base_etag else None,
                          state.fetch_limit, path, metadata=state.metadata, pending=state.pending,
                          upload_token=state.upload_token, journaled=True)
            entry.idle.set()
            for fname in os.listdir(path):
                if fname.startswith("b") and fname[1:].isdigit():
                    block = int(fname[1:])
                    st = os.stat(os.path.join(path, fname))
                    entry.present.add(block)
                    entry.charged[block] = charge = self.charge(st.st_size)
                    self.used += charge
                    if block in state.dirty:
                        entry.gen += 1
                        entry.dirty[block] = entry.gen
                        self.dirty_bytes += charge
                    else:
                        mtime = st.st_mtime
                        loaded.append((mtime, (name, block), entry))
                elif fname.endswith(".tmp"):
                    os.unlink(os.path.join(path, fname))
            # The record is rewritten when a block first turns dirty, not on every write that
            # extends the file: after a crash the dirty blocks themselves tell the size.
            for block in entry.dirty:
                extent = block * self.block_size + os.path.getsize(entry.block_path(block))
                entry.size = max(entry.size, extent)
            self.entries[entry.key] = entry
            if entry.pending:
                pending.append(entry)
        for _, k, entry in sorted(loaded, key=lambda t: t[0]):
            self.lru[k] = entry
        # The bound is hard from the start: a cache reopened with a smaller cache_size sheds its
        # oldest clean blocks now (fix: it used to stay above max_bytes until blocks were dropped).
        while self.used > self.max_bytes and self._evict_one():
            pass
        return pending

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ entries
    def entry(self, key: str, remote: Remote | None, size: int) -> Entry:
        """The entry for ``key``, checked against the current remote version.

        Clean blocks of an older remote version are dropped (another writer changed the
        object); an entry with dirty blocks keeps them (the uploader detects the conflict).
        """
        entry = self.entries.get(key)
        if entry is not None:
            if not entry.pending and not entry.uploading and remote is not None and (
                    entry.base is None or entry.base.etag != remote.etag):
                self._drop_blocks(entry, set(entry.present))
                entry.base = remote
                entry.size = remote.size
                entry.fetch_limit = remote.size
                self._journal(entry)
            return entry
        path = os.path.join(self.entries_dir, entry_id(key))
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, mode=0o700)
        entry = Entry(entry_id(key), key, size if remote is None else remote.size, remote,
                      remote.size if remote else 0, path)
        entry.idle.set()
        self.entries[key] = entry
        self._journal(entry)
        return entry

    def _journal(self, entry: Entry, durable: bool = False) -> None:
        if entry.deleted:
            return
        write_state(entry.dir, entry.state(), durable)
        entry.journaled = True

    def rename(self, entry: Entry, new_key: str) -> None:
        """Move an entry to a new key (the object was renamed). Replaces any entry there."""
        old = self.entries.pop(new_key, None)
        if old is not None and old is not entry:
            self.discard(old)
        self.entries.pop(entry.key, None)
        new_dir = os.path.join(self.entries_dir, entry_id(new_key))
        shutil.rmtree(new_dir, ignore_errors=True)
        os.rename(entry.dir, new_dir)
        for block in entry.present:
            self.lru.pop((entry.id, block), None)
        entry.id, entry.key, entry.dir = entry_id(new_key), new_key, new_dir
        for block in entry.present - set(entry.dirty):
            self.lru[(entry.id, block)] = entry
        self.entries[new_key] = entry
        self._journal(entry)

    def discard(self, entry: Entry) -> None:
        """Forget an entry and its blocks (the object was deleted)."""
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
        entry.deleted = True
        self._drop_blocks(entry, set(entry.present))
        shutil.rmtree(entry.dir, ignore_errors=True)

    # ------------------------------------------------------------------ space
    def _drop_blocks(self, entry: Entry, blocks: set[int]) -> None:
        for block in blocks:
            if block not in entry.present:
                continue
            entry.present.discard(block)
            self.lru.pop((entry.id, block), None)
            charge = entry.charged.pop(block, 0)
            if entry.dirty.pop(block, None) is not None:
                self.dirty_bytes -= charge
            self.used -= charge
            try:
                os.unlink(entry.block_path(block))
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
        self.on_pressure()
        with trio.move_on_after(self.stall_timeout) as scope:
            await self._changed.wait()
        if scope.cancelled_caught:
            raise OSError(errno.ENOSPC, f"cache full and no upload finished in {self.stall_timeout:.0f}s")

    def _evict_one(self) -> bool:
        for (_eid, block), entry in self.lru.items():
            if entry.uploading and not self.backend.capabilities.part_copy:
                continue  # the upload reads clean blocks from their files (no server-side copy)
            self.stats["evictions"] += 1
            self._drop_blocks(entry, {block})
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
        while True:
            while self.used + nbytes > self.max_bytes or (
                    self.min_free and self._disk_free() < self.min_free + nbytes):
                if not self._evict_one():
                    break
            else:
                self.used += nbytes
                return
            log.info("cache full (%d bytes, %d dirty): waiting for uploads", self.used, self.dirty_bytes)
            await self._wait_change()

    def _unreserve(self, nbytes: int) -> None:
        self.used -= nbytes
        self._wake()

    async def wait_dirty_budget(self, entry: Entry, block: int, end: int, empty: bool) -> None:
        """Wait while the bytes a write ending at ``end`` within ``block`` adds to ``dirty_bytes``
        would exceed ``max_dirty`` (never when nothing is dirty: a write always progresses).

        Re-computed after each wait: an upload may have turned the block clean meanwhile.
        """
        while (n := self._dirty_growth(entry, block, end, empty)) and self.dirty_bytes and (
                self.dirty_bytes + n > self.max_dirty):
            await self._wait_change()

    def _dirty_growth(self, entry: Entry, block: int, end: int, empty: bool) -> int:
        """What a write ending at ``end`` within ``block`` adds to ``dirty_bytes``; ``empty``:
        an absent block starts empty instead of being fetched."""
        need = self.charge(end)
        if block in entry.dirty:
            return max(0, need - entry.charged.get(block, 0))
        if block in entry.present:
            return max(need, entry.charged.get(block, 0))
        remote = 0
        if not empty and entry.base is not None:
            remote = min(self.block_size, entry.fetch_limit - block * self.block_size)
        return max(need, self.charge(remote))

    async def _grow(self, entry: Entry, block: int, length: int) -> bool:
        """Make the present block's charge cover a file of ``length`` bytes.

        True when it already did; False after an await (the caller re-checks: the block may
        have been dropped meanwhile).
        """
        need = self.charge(length) - entry.charged.get(block, 0)
        if need <= 0:
            return True
        # Not evictable while we wait for room (reserve() evicts from the LRU).
        pinned = self.lru.pop((entry.id, block), None) is not None
        try:
            await self.reserve(need)
        finally:
            if pinned and block in entry.present and block not in entry.dirty and not entry.deleted:
                self.lru[(entry.id, block)] = entry
        if block in entry.present and not entry.deleted:
            entry.charged[block] = entry.charged.get(block, 0) + need
            if block in entry.dirty:
                self.dirty_bytes += need
        else:
            self._unreserve(need)
        return False

    # ------------------------------------------------------------------ blocks
    async def ensure_block(self, entry: Entry, block: int, key: str | None = None) -> None:
        """Make the block present locally (fetch its remote part, zeros for the rest)."""
        if block in entry.present:
            self.stats["hits"] += 1
            return
        async with self.block_locks((entry.id, block)):
            while block not in entry.present and not entry.deleted:
                base = entry.base
                try:
                    await self._fetch_block(entry, block, key)
                except StaleError:
                    # Fix: our own upload replaces the object before mark_uploaded() moves
                    # entry.base to the new version; a cold read or a merging write in that
                    # window got ESTALE.  Wait for the upload, then fetch from the new base.
                    if entry.base is base and not entry.uploading:
                        # Our last upload may have been committed but not recorded (killed,
                        # or the reply was lost): then the object is our own, fetch from it.
                        if entry.upload_token and await self.adopt_own_upload(entry) and (
                                entry.base is not base):
                            continue
                        raise
                    while entry.uploading:
                        await entry.idle.wait()
                    if entry.base is base:
                        raise  # the upload failed: the object was changed by someone else

    async def _fetch_block(self, entry: Entry, block: int, key: str | None) -> None:
        """ensure_block()'s work, under the block lock."""
        start = block * self.block_size
        charge = 0
        while True:
            remote_len = max(0, min(self.block_size, entry.fetch_limit - start))
            if remote_len and entry.base is None:
                remote_len = 0
            if self.charge(remote_len) <= charge:
                break
            if charge:
                self._unreserve(charge)  # fetch_limit grew while we waited (an upload finished)
            charge = self.charge(remote_len)
            await self.reserve(charge)
        path = entry.block_path(block)
        try:
            if remote_len and entry.base is not None:
                tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
                try:
                    async with self.fetch_limiter:
                        with open(tmp, "wb", opener=_private) as f:
                            await self.backend.download(key or entry.key, f, start, remote_len,
                                                        if_match=entry.base.etag)
                    if os.path.getsize(tmp) != remote_len:
                        raise StaleError(f"{entry.key}: object is shorter than expected")
                    os.rename(tmp, path)
                except PreconditionFailed:
                    raise StaleError(f"{entry.key}: changed on the server; reopen it") from None
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
        if entry.deleted:  # unlinked while we fetched
            self._unreserve(charge)
            return
        entry.present.add(block)
        entry.charged[block] = charge
        self.lru[(entry.id, block)] = entry

    def _touch(self, entry: Entry, block: int) -> None:
        k = (entry.id, block)
        if k in self.lru:
            self.lru.move_to_end(k)

    async def read(self, entry: Entry, offset: int, size: int) -> bytes:
        end = min(offset + size, entry.size)
        out = bytearray()
        pos = offset
        while pos < end:
            block, within = divmod(pos, self.block_size)
            n = min(self.block_size - within, end - pos)
            await self.ensure_block(entry, block)
            fd = os.open(entry.block_path(block), os.O_RDONLY)
            try:
                data = os.pread(fd, n, within)
            finally:
                os.close(fd)
            if len(data) < n:
                data += bytes(n - len(data))  # hole: zeros past the end of the block file
            self._touch(entry, block)
            out += data
            pos += n
        return bytes(out)

    def prefetch_range(self, entry: Entry, offset: int) -> list[int]:
        """Blocks worth fetching ahead of a sequential reader at ``offset``."""
        first = offset // self.block_size + 1
        last = min((entry.size - 1) // self.block_size if entry.size else -1,
                   first + self.readahead_blocks - 1)
        return [b for b in range(first, last + 1)
                if b not in entry.present and b * self.block_size < entry.fetch_limit
                and not self.block_locks.locked((entry.id, b))]

    async def write(self, entry: Entry, offset: int, data: bytes | memoryview) -> int:
        pos, view = offset, memoryview(data)
        while view:
            block, within = divmod(pos, self.block_size)
            n = min(self.block_size - within, len(view))
            covers = within == 0 and (n == self.block_size or pos + n >= entry.size)
            await self.wait_dirty_budget(entry, block, within + n,
                                         covers or block * self.block_size >= entry.fetch_limit)
            covers = within == 0 and (n == self.block_size or pos + n >= entry.size)  # after the wait
            # The block file's charge covers what it will hold after the write *before* the
            # write: used <= max_bytes at all times.  Each await may drop the block (truncate,
            # eviction, unlink): loop until it is present with a sufficient charge.
            while not entry.deleted:
                if block not in entry.present:
                    if covers or block * self.block_size >= entry.fetch_limit:
                        # Nothing remote to merge with: start an empty block.
                        await self.ensure_block_empty(entry, block)
                    else:
                        await self.ensure_block(entry, block)
                elif await self._grow(entry, block, within + n):
                    break
            # Journal the block as dirty *before* changing its file: killed in between, a
            # clean-looking block file with new bytes would pass for a copy of the remote
            # version and never be uploaded (fix; a dirty block with old bytes is harmless).
            self._mark_dirty(entry, block)
            fd = os.open(entry.block_path(block), os.O_WRONLY)
            try:
                os.pwrite(fd, view[:n], within)
            finally:
                os.close(fd)
            view = view[n:]
            pos += n
            entry.size = max(entry.size, pos)
        entry.last_write = time.monotonic()
        return len(data)

    async def ensure_block_empty(self, entry: Entry, block: int) -> None:
        async with self.block_locks((entry.id, block)):
            if block in entry.present or entry.deleted:
                return
            charge = self.charge(0)
            await self.reserve(charge)
            try:
                os.close(os.open(entry.block_path(block), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            except BaseException:
                self._unreserve(charge)
                raise
            if entry.deleted:
                self._unreserve(charge)
                return
            # Callers guarantee no remote byte of this block survives the coming write.
            entry.present.add(block)
            entry.charged[block] = charge
            self.lru[(entry.id, block)] = entry

    def mark_pending(self, entry: Entry) -> None:
        """The object must be (re)uploaded: new file, resized, or metadata changed."""
        entry.gen += 1
        entry.last_write = time.monotonic()  # the write-back delay counts from now
        if not entry.pending:
            entry.pending = True
            entry.journaled = False
        if not entry.journaled:
            self._journal(entry)

    def _mark_dirty(self, entry: Entry, block: int) -> None:
        entry.gen += 1
        entry.pending = True
        if block not in entry.dirty:
            self.dirty_bytes += entry.charged.get(block, 0)
            self.lru.pop((entry.id, block), None)
            entry.dirty[block] = entry.gen
            entry.journaled = False
        else:
            entry.dirty[block] = entry.gen
        if not entry.journaled:
            self._journal(entry)  # so a killed process still finds the pending upload

    async def truncate(self, entry: Entry, size: int) -> None:
        if size < entry.size:
            last = (size - 1) // self.block_size if size else -1
            self._drop_blocks(entry, {b for b in entry.present if b > last})
            entry.fetch_limit = min(entry.fetch_limit, size)
            within = size - last * self.block_size if last >= 0 else 0
            if last >= 0 and within < self.block_size:
                if last in entry.present or last * self.block_size < entry.fetch_limit:
                    await self.ensure_block(entry, last)
                    self._mark_dirty(entry, last)  # before the file changes: see write()
                    path = entry.block_path(last)
                    length = min(within, os.path.getsize(path))
                    os.truncate(path, length)
                    freed = entry.charged.get(last, 0) - self.charge(length)
                    if freed > 0:
                        entry.charged[last] -= freed
                        self.dirty_bytes -= freed
                        self._unreserve(freed)
        entry.size = size
        entry.trunc_low = min(entry.trunc_low, size)
        entry.pending = True
        entry.gen += 1
        self._journal(entry)

    async def make_durable(self, entry: Entry) -> None:
        """fsync the dirty blocks and the journal record: the data survives a crash."""
        # Fix: the record used to be built and written inside the worker thread, racing with
        # _journal() on the trio thread: both used state.json.tmp (fsync failed with ENOENT when
        # the other rename took it), entry.state() iterated dicts being changed, and an older
        # record could replace a newer one.  Now the threads only fsync; the record is written
        # on the trio thread like every other journal write.
        blocks = [entry.block_path(b) for b in entry.dirty]

        def sync_blocks() -> None:
            for path in blocks:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    continue  # dropped by a truncate meanwhile
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

        def sync_record() -> None:
            fd = os.open(state_path(entry.dir), os.O_RDONLY)
            try:
                os.fsync(fd)  # this record or a newer one (which covers at least as much)
            finally:
                os.close(fd)
            fsync_dir(entry.dir)
            fsync_dir(self.entries_dir)

        if entry.deleted:
            return
        await trio.to_thread.run_sync(sync_blocks)
        if entry.deleted:
            return
        self._journal(entry)
        try:
            await trio.to_thread.run_sync(sync_record)
        except FileNotFoundError:
            if not entry.deleted:  # unlinked or renamed meanwhile: nothing left to make durable
                raise

    def mark_uploaded(self, entry: Entry, etag: str, size: int, gens: dict[int, int],
                      trunc_low: int, gen: int) -> None:
        """After an upload of a snapshot: blocks not rewritten since become clean."""
        entry.base = Remote(etag, size)
        if entry.gen == gen:
            entry.pending = False
        entry.fetch_limit = min(size, trunc_low)
        for block, gen in gens.items():
            if entry.dirty.get(block) == gen:
                del entry.dirty[block]
                self.dirty_bytes -= entry.charged.get(block, 0)
                if block in entry.present:
                    self.lru[(entry.id, block)] = entry
        self._journal(entry)
        self._wake()


async def _never(entry: Entry) -> bool:
    return False


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)
