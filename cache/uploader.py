"""The write-back uploader: sends pending entries to the backend in the background.

An entry is uploaded ``delay`` seconds after its last write (so a file being written is
not uploaded again and again), at once under cache pressure, and on demand (fsync with
``sync_upload``, rename, unmount).  Large objects go up as parallel multipart parts, one
part per block group; blocks that are unchanged and not cached are copied server-side
where the backend can (upload-part-copy) and fetched otherwise.  An upload works on a
snapshot (size, dirty-block generations); blocks written during the upload stay dirty
and are sent again.  See docs/concurrency.md and docs/semantics.md.

Before an upload starts, a fresh token is journaled (``Entry.upload_token``) and sent in the
object's metadata (``UPLOAD_KEY``).  Killed after the server committed the object but
before ``mark_uploaded`` recorded it, the next run finds its own token on the changed
object and takes that version as the new base instead of reporting a conflict.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import trio

from cloudfs.backends import Backend, ObjectInfo, PartInfo, Payload
from cloudfs.backends.errors import BackendError, NotFound, PreconditionFailed

from .block_cache import BlockCache, Entry, Remote

log = logging.getLogger(__name__)

# Metadata key carrying the upload token (lowercase; a valid Azure metadata name).  The FUSE
# layer treats it as its own key (cloudfs.layout.OWN_KEYS), not as another tool's.
UPLOAD_KEY = "cloudfs_upload"


@dataclass
class Snapshot:
    key: str
    size: int
    gen: int
    dirty: dict[int, int]
    base: Remote | None
    fetch_limit: int
    metadata: dict[str, str]


def conflict_key(key: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{key}.conflict-{stamp}-{uuid.uuid4().hex[:6]}"


class Uploader:
    def __init__(self, cache: BlockCache, backend: Backend, *, delay: float = 5.0,
                 parallel_files: int = 4, parallel_parts: int = 8) -> None:
        self.cache = cache
        self.backend = backend
        self.delay = delay
        self.file_slots = trio.CapacityLimiter(parallel_files)
        self.part_slots = trio.CapacityLimiter(parallel_parts)
        self.queue: dict[str, Entry] = {}  # entry id -> entry with pending changes
        self.active: set[str] = set()  # entry ids with an upload task started
        self.retry_at: dict[str, float] = {}
        self.errors: dict[str, BackendError] = {}
        self.urgent = False
        self._wakeup = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.tmp_dir = os.path.join(cache.dir, "tmp")
        # Called when an upload found the object changed by another writer (key, conflict key).
        self.on_conflict: Callable[[Entry, str], None] = lambda entry, saved_as: None
        # Called after an upload stored the entry (the FS refreshes what it knows of the object).
        self.on_uploaded: Callable[[Entry], None] = lambda entry: None
        self.uploaded_bytes = 0
        cache.on_pressure = self.pressure
        cache.adopt_own_upload = self.adopt_own_upload

    # ------------------------------------------------------------------ scheduling
    def schedule(self, entry: Entry) -> None:
        if entry.pending and not entry.deleted:
            self.queue[entry.id] = entry
            self._wake()

    def pressure(self) -> None:
        self.urgent = True
        self._wake()

    def _wake(self) -> None:
        self._wakeup.set()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)
        for name in os.listdir(self.tmp_dir):
            os.unlink(os.path.join(self.tmp_dir, name))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                self._wakeup = trio.Event()
                now = time.monotonic()
                urgent, self.urgent = self.urgent, False
                next_due = now + 1.0
                for entry in list(self.queue.values()):
                    if entry.uploading or entry.id in self.active:
                        continue
                    if not entry.pending or entry.deleted:
                        self.queue.pop(entry.id, None)
                        continue
                    due = max(entry.last_write + self.delay, self.retry_at.get(entry.id, 0))
                    if urgent and entry.id not in self.retry_at:
                        due = now
                    if due <= now:
                        self.active.add(entry.id)
                        nursery.start_soon(self._upload_task, entry)
                    else:
                        next_due = min(next_due, due)
                with trio.move_on_after(max(0.05, next_due - now)):
                    await self._wakeup.wait()

    async def _upload_task(self, entry: Entry) -> None:
        try:
            await self.upload(entry)
        except BackendError as exc:
            self.retry_at[entry.id] = time.monotonic() + min(60.0, 2.0 * (1 + len(self.errors)))
            log.error("upload of %s failed, will retry: %s", entry.key, exc)
        finally:
            self.active.discard(entry.id)

    # ------------------------------------------------------------------ waiting
    async def wait_idle(self, entry: Entry) -> None:
        while entry.uploading:
            await entry.idle.wait()

    async def flush(self, entry: Entry) -> None:
        """Upload now and return when the content at call time is on the backend."""
        while True:
            await self.wait_idle(entry)
            if not entry.pending or entry.deleted:
                return
            gen = entry.gen
            await self.upload(entry)
            if entry.gen == gen or not entry.pending:
                return

    def pending_entries(self) -> list[Entry]:
        return [e for e in self.cache.entries.values() if e.pending and not e.deleted]

    async def flush_all(self, progress: bool = False) -> None:
        """Upload every pending entry (unmount); a progress bar on a terminal."""
        entries = self.pending_entries()
        if not entries:
            return
        total = sum(e.size for e in entries)
        bar = None
        if progress and sys.stderr.isatty():
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="cloudfs: uploading")
        log.info("flushing %d pending file(s), %d bytes", len(entries), total)
        failures: list[str] = []

        async def one(entry: Entry) -> None:
            try:
                await self.flush(entry)
            except BackendError as exc:
                failures.append(f"{entry.key}: {exc}")
            if bar is not None:
                bar.update(entry.size)

        async with trio.open_nursery() as nursery:
            for entry in entries:
                nursery.start_soon(one, entry)
        if bar is not None:
            bar.close()
        if failures:
            raise BackendError("could not upload: " + "; ".join(failures[:5]))

    # ------------------------------------------------------------------ uploading
    async def upload(self, entry: Entry) -> None:
        async with self.file_slots:
            # Checked after the slot wait: another task may have uploaded it meanwhile.
            await self.wait_idle(entry)
            if not entry.pending or entry.deleted:
                return
            entry.uploading = True
            entry.idle = trio.Event()
            entry.trunc_low = entry.size
            snap = Snapshot(entry.key, entry.size, entry.gen, dict(entry.dirty), entry.base,
                            entry.fetch_limit, dict(entry.metadata))
            try:
                target = snap.key
                if await self._changed_remotely(entry, snap):
                    target = conflict_key(snap.key)
                    log.warning("%s changed on the server while local changes were pending; "
                                "the server's version keeps the name, the local one is saved as %s",
                                snap.key, target)
                metadata = snap.metadata
                if target == snap.key and not entry.deleted:
                    token = uuid.uuid4().hex
                    tagged = {**snap.metadata, UPLOAD_KEY: token}
                    if _metadata_size(tagged) <= self.backend.capabilities.max_metadata_bytes:
                        # Journaled before the object can change: see _changed_remotely().
                        entry.upload_token = token
                        self.cache._journal(entry)
                        metadata = tagged
                etag = await self._send(entry, snap, target, metadata)
                self.uploaded_bytes += snap.size
                if target != snap.key:
                    # The local version is safe under the conflict name and the server's version
                    # keeps the key: forget the local blocks (they belong to neither).  Without
                    # this the entry stayed pending and every later round saved another conflict
                    # copy, and its dirty blocks held the dirty budget forever.
                    entry.pending = False
                    self.cache.discard(entry)
                    self.on_conflict(entry, target)
                elif not entry.deleted:
                    entry.upload_token = None  # journaled by mark_uploaded
                    self.cache.mark_uploaded(entry, etag, snap.size, snap.dirty,
                                             entry.trunc_low, snap.gen)
                    self.on_uploaded(entry)
                self.retry_at.pop(entry.id, None)
                self.errors.pop(entry.id, None)
                if not entry.pending:
                    self.queue.pop(entry.id, None)
            except BackendError as exc:
                self.errors[entry.id] = exc
                raise
            except OSError as exc:
                # A block file vanished under us (truncate/unlink during the upload): retry later.
                raise BackendError(f"{entry.key}: local cache changed during upload ({exc})") from exc
            finally:
                entry.uploading = False
                entry.idle.set()
                self._wake()

    async def _changed_remotely(self, entry: Entry, snap: Snapshot) -> bool:
        """Whether another writer replaced the object since ``snap.base`` (a conflict).

        The object carrying the journaled token of our last upload is our own upload, committed
        by the server but not recorded (the process was killed, or the reply was lost): it
        becomes the base, and this upload sends the local content on top of it.
        """
        token = entry.upload_token
        try:
            info = await self.backend.head(snap.key)
        except NotFound:
            return False  # new, or deleted by someone else: writing it back loses nothing
        if snap.base is not None and info.etag == snap.base.etag:
            return False
        if _carries(info.metadata, token):
            snap.base = self._rebase(entry, info)
            snap.fetch_limit = min(snap.fetch_limit, info.size)
            return False
        return True  # someone created it after we did, or changed it

    def _rebase(self, entry: Entry, info: ObjectInfo) -> Remote:
        """Take our own committed, unrecorded upload ``info`` as the entry's base.

        The object holds the snapshot of that upload: at every byte below the fetch limit that
        is not in a local block it equals the old base (clean blocks were sent as they were,
        dirty ones are still local, truncates lowered the limit), so uncached bytes can be
        fetched from it.  The entry stays pending: the local content is sent again.
        """
        log.info("%s: the server has our interrupted upload; continuing from it", entry.key)
        new = Remote(info.etag, info.size)
        if not entry.deleted:
            entry.base = new
            entry.fetch_limit = min(entry.fetch_limit, info.size)
            self.cache._journal(entry)
        return new

    async def adopt_own_upload(self, entry: Entry) -> bool:
        """BlockCache hook: the entry's base is gone; rebase it if the object is our upload."""
        token = entry.upload_token
        if not token or entry.uploading or entry.deleted:
            return False
        try:
            info = await self.backend.head(entry.key)
        except NotFound:
            return False
        if entry.uploading or entry.deleted or entry.upload_token != token or (
                not _carries(info.metadata, token)):
            return False
        self._rebase(entry, info)
        return True

    def _part_size(self, size: int) -> int:
        bs = self.cache.block_size
        part = self.backend.part_size_for(size, bs)
        return -(-part // bs) * bs  # whole blocks per part

    async def _send(self, entry: Entry, snap: Snapshot, key: str, metadata: dict[str, str]) -> str:
        part = self._part_size(snap.size)
        if snap.size <= part:
            tmp = await self._assemble(entry, snap, 0, snap.size)
            try:
                return await self.backend.put(key, Payload.from_file(tmp), metadata)
            finally:
                os.unlink(tmp)
        upload_id = await self.backend.mpu_create(key, metadata)
        parts: list[PartInfo] = []
        try:
            try:
                async with trio.open_nursery() as nursery:
                    for number, start in enumerate(range(0, snap.size, part), 1):
                        length = min(part, snap.size - start)
                        nursery.start_soon(self._send_part, entry, snap, key, upload_id, number, start,
                                           length, parts)
            except BaseExceptionGroup as group:
                # Fix: trio wraps a failed part in an ExceptionGroup, which upload()'s
                # `except BackendError` and _upload_task did not catch: one failed part (a retry
                # budget spent, a block file dropped by a truncate) crashed run() and the mount.
                raise _single_error(group) from None
            return await self.backend.mpu_complete(key, upload_id, parts)
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                try:
                    await self.backend.mpu_abort(key, upload_id)
                except BackendError as exc:
                    log.warning("could not abort multipart upload of %s: %s", key, exc)
            raise

    async def _send_part(self, entry: Entry, snap: Snapshot, key: str, upload_id: str, number: int,
                         start: int, length: int, parts: list[PartInfo]) -> None:
        async with self.part_slots:
            bs = self.cache.block_size
            blocks = range(start // bs, (start + length - 1) // bs + 1)
            # Unchanged ranges are copied server-side even when cached: cheaper than sending
            # them again, and it lets the cache evict clean blocks while a big file uploads.
            copyable = (snap.base is not None and self.backend.capabilities.part_copy
                        and key == snap.key and start + length <= snap.fetch_limit
                        and not any(b in snap.dirty for b in blocks))
            if copyable:
                assert snap.base is not None
                parts.append(await self.backend.mpu_part_copy(key, upload_id, number, snap.key, start,
                                                              length, snap.base.etag))
                return
            path = entry.block_path(blocks[0])
            if len(blocks) == 1 and blocks[0] in entry.present and os.path.getsize(path) >= length:
                # Fix: a shorter block file (a hole at its end) used to be extended in place
                # (BlockCache.materialize_length, now removed); when a truncate+write had replaced
                # the block during this upload, that grew the *new* block file past the file
                # size, and recovery after a kill took the zeros for data.  Short blocks now go
                # through _assemble, which never touches block files.
                payload = Payload.from_file(path, 0, length)
                parts.append(await self.backend.mpu_part(key, upload_id, number, payload))
                return
            tmp = await self._assemble(entry, snap, start, length)
            try:
                parts.append(await self.backend.mpu_part(key, upload_id, number, Payload.from_file(tmp)))
            finally:
                os.unlink(tmp)

    async def _assemble(self, entry: Entry, snap: Snapshot, start: int, length: int) -> str:
        """Write bytes [start, start+length) of the snapshot into a temp file."""
        bs = self.cache.block_size
        # The temp dir is made by run(); create it here too so flush()/flush_all() work without
        # the background loop (fix: uploads before run() failed with "local cache changed").
        os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)
        tmp = os.path.join(self.tmp_dir, uuid.uuid4().hex)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, length)  # sparse zeros: holes need no writes
            pos = start
            while pos < start + length:
                block, within = divmod(pos, bs)
                n = min(bs - within, start + length - pos)
                if block in entry.present:
                    with open(entry.block_path(block), "rb") as src:
                        src.seek(within)
                        os.pwrite(fd, src.read(n), pos - start)
                elif snap.base is not None and pos < snap.fetch_limit:
                    remote_n = min(n, snap.fetch_limit - pos)
                    with os.fdopen(os.dup(fd), "r+b") as out:
                        out.seek(pos - start)
                        try:
                            await self.backend.download(snap.key, out, pos, remote_n, if_match=snap.base.etag)
                        except (NotFound, PreconditionFailed):
                            log.error("%s: bytes %d-%d of the previous version are gone from the server; "
                                      "they are zeros in the upload", snap.key, pos, pos + remote_n)
                            out.seek(pos - start)
                            out.write(bytes(remote_n))
                pos += n
            os.ftruncate(fd, length)  # a retried download truncates at its start
            return tmp
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            os.close(fd)


def _carries(meta: dict[str, str] | None, token: str | None) -> bool:
    """Whether object metadata carries our upload token."""
    return bool(token) and any(k.lower() == UPLOAD_KEY and v == token for k, v in (meta or {}).items())


def _metadata_size(meta: dict[str, str]) -> int:
    return sum(len(k) + len(v) for k, v in meta.items())


def _single_error(group: BaseExceptionGroup) -> BaseException:
    """The first BackendError/OSError of a part nursery's group; the group itself otherwise.

    Anything else (Cancelled, a bug) keeps its group so trio and the caller see it unchanged.
    """
    matched, rest = group.split((BackendError, OSError))
    if matched is None or rest is not None:
        return group
    exc: BaseException = matched
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
