"""The uploader: sends a file's changes to the store, as the write-back queue asks.

One *round* uploads everything a file has changed so far (its snapshot: size, dirty-block
generations, base, metadata); writes during the round stay dirty and go up in the next
one.  A file whose content did not change gets a metadata update only.  At most one round
per file runs at a time (``_rounds``).

A round that is one PUT, on a store that checks conditions in the PUT itself
(``Capabilities.atomic_conditional_put``), is sent conditionally and nothing is asked first:
``if_none_match`` for a file with no base, ``if_match=base`` for one with a base.  The store
then stores it only if the object still is the file's base (or still absent): exactly when
the HEAD below would have said "upload".  Only when the store refuses does the round fall
back to the HEAD and what follows.  Other rounds (multipart uploads, whose completion is not
sent conditionally; metadata-only updates, which are copies; stores that emulate conditions
with a lookup) ask first.  An S3-compatible server may ignore the conditions
(``Backend.conditional_put_unverified``): there each kind of condition is trusted only after
the server refused it once, checked by sending the first conditional PUT of that kind a
second time (it stores the same bytes again if the server ignores the condition).

Otherwise, before a round, one HEAD tells whether the stored object is still the file's base:

* unchanged, or absent for a new file: upload;
* carrying our journaled upload token: it is our own upload, committed but not recorded
  (killed, or the reply lost); it becomes the base and the round goes on;
* deleted elsewhere: the file goes up from local data (bytes never cached here are lost,
  counted and logged);
* changed by someone else: a conflict.  The store's version keeps the name; the file goes on
  under ``NAME.conflict-YYYYmmdd-HHMMSS-xxxxxx`` (``on_conflict`` tells the file system).

Large files go up as multipart uploads, one part per group of blocks.  Unchanged ranges are
copied server-side where the store can (upload-part-copy), so editing a big object sends
only what changed.  A file being written while the cache fills keeps one multipart upload
open: whole parts are sent as their blocks fill (*staging*), their blocks become clean and
evictable, and the final round sends only the rest.  The cost of a big upload is then
linear in its size, and a file larger than the cache flows through it.  Open uploads are
journaled: the next mount continues or aborts them, so none is orphaned.

Payloads are read from block files opened before the request (:class:`Payload` segments),
so nothing is staged in temporary files.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections.abc import Callable

import trio

from cloudfs.backends import Backend, PartInfo, Payload
from cloudfs.backends.base import Segment
from cloudfs.backends.errors import BackendError, NotFound, PreconditionFailed, one_error
from cloudfs.layout import metadata_size

from .block_cache import UPLOAD_KEY, BlockCache, Snapshot, carries
from .file import File, OpenUpload, Remote, StagedPart, Status
from .multi_lock import MultiLock
from .writeback import WritebackQueue

log = logging.getLogger(__name__)

GiB = 1024**3
# An open file streaming out through a multipart upload counts as still being written this
# long after its last change, though the write-back delay passed: a writer's pauses (the
# kernel's write-back, a slow source) must not complete the upload half-way.
STREAM_IDLE = 30.0


def conflict_key(key: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{key}.conflict-{stamp}-{uuid.uuid4().hex[:6]}"


class _Refused(Exception):
    """The store refused a conditional PUT: the object is not (or no longer) the file's base."""


def _ignore_conflict(file: File, old_key: str) -> None:
    pass


def _ignore(file: File) -> None:
    pass


class Uploader:
    def __init__(self, cache: BlockCache, backend: Backend, queue: WritebackQueue, *,
                 parallel_parts: int = 8, on_conflict: Callable[[File, str], None] = _ignore_conflict,
                 on_uploaded: Callable[[File], None] = _ignore) -> None:
        self.cache = cache
        self.backend = backend
        self.queue = queue
        self.part_slots = trio.CapacityLimiter(parallel_parts)
        self._on_conflict = on_conflict
        self._on_uploaded = on_uploaded
        self._rounds = MultiLock()
        self._ours: set[str] = set()  # ids of the multipart uploads this process created or resumed
        self.sent_bytes = 0  # bytes sent in PUTs and parts (copies server-side not counted)
        self._synced_at = float("-inf")  # the last ``sync``: files changed before it upload whole
        # Whether the store checks each kind of PUT condition ("if_match", "if_none_match"):
        # True trusted, False not (ask with a HEAD first), None not yet seen (see the module doc).
        caps = backend.capabilities
        trusted = None if backend.conditional_put_unverified else caps.atomic_conditional_put
        self._conditions: dict[str, bool | None] = dict.fromkeys(
            ("if_match", "if_none_match"), trusted if caps.atomic_conditional_put else False)

    # ------------------------------------------------------------------ running
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The write-back queue (which also stages files under cache pressure), until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.queue.run, self._store)
            task_status.started()

    def sync(self) -> None:
        """``cloudfs sync``: every pending file goes up now, in a whole round, however recently
        it changed (a file changed after this call waits for the write-back delay as usual)."""
        self._synced_at = time.monotonic()
        self.queue.retry_now()

    def pressure(self) -> None:
        """Writers wait for cache space: upload everything now (a file still open stages
        its whole parts instead, see ``_store``)."""
        self.queue.expedite()

    async def _store(self, fid: str) -> float | None:
        file = self.cache.files.get(fid)
        if file is None or not file.pending:
            return None
        if file.holds:
            return 0.2  # a directory rename is moving it
        idle = time.monotonic() - file.last_change
        settles_in = self.queue.delay - idle
        streaming = file.open_upload is not None and idle < STREAM_IDLE
        if file.last_change <= self._synced_at:  # ``cloudfs sync`` asked for it: as if settled
            settles_in, streaming = 0.0, False
        if not self.cache.stalled and (settles_in > 0 or (file.opens and (self.cache.waiting or streaming))):
            # Still being written: it changed within the write-back delay, or it is open and
            # its writer may be the one waiting for cache space, or it is open and streams
            # out through an open upload that grew within STREAM_IDLE.  Send whole parts.  If
            # some went (room was made), or the file's dirty data can grow into its next part,
            # completing the upload now would only make the next round copy every part again;
            # it completes once it settles (or is flushed).  Writers stalled for long (staging
            # freed nothing) get a whole round instead.
            if await self.stage(file) or self._streaming(file):
                return max(settles_in, self.queue.delay)
        await self.upload(file)
        return None

    def _streaming(self, file: File) -> bool:
        """Whether staging alone keeps the file moving: it has an open upload, at most a part
        and a block of it is dirty, and ``max_dirty`` has room for it to fill that part (so
        the next whole part can be sent early too)."""
        upload = file.open_upload
        if upload is None or file.status is not Status.DIRTY:
            return False
        window = upload.part_size + self.cache.block_size
        dirty = sum(file.charged.get(b, 0) for b in file.dirty)
        return dirty <= window and self.cache.dirty_bytes - dirty + window <= self.cache.max_dirty

    # ------------------------------------------------------------------ waiting
    async def flush(self, file: File) -> None:
        """Upload now; return when the content at call time is on the store."""
        gen = file.gen
        while file.pending and file.uploaded_gen < gen:
            while file.holds:
                await trio.sleep(0.05)  # a directory rename is moving it: a moment
            if file.uploading:
                await file.idle.wait()
            else:
                await self.upload(file)

    async def flush_all(self, progress: bool = False) -> list[File]:
        """Upload every pending file (unmount); a progress bar on a terminal.  Returns the
        files that could not be uploaded."""
        files = self.cache.pending_files()
        if not files:
            return []
        total = sum(self.pending_bytes(f) for f in files)
        bar = None
        if progress and sys.stderr.isatty():
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="cloudfs: uploading")
        log.info("flushing %d pending file(s), %d bytes", len(files), total)
        failed: list[File] = []
        start = self.sent_bytes

        async def one(file: File) -> None:
            try:
                await self.flush(file)
            except BackendError as exc:
                log.error("%s: %s", file.key, exc)
                failed.append(file)
            if bar is not None:
                bar.n = min(total, self.sent_bytes - start)
                bar.refresh()

        async with trio.open_nursery() as nursery:
            for file in files:
                nursery.start_soon(one, file)
        if bar is not None:
            bar.close()
        return failed

    def pending_bytes(self, file: File) -> int:
        """Bytes a file's next round sends (dirty blocks), at least 1 for a metadata update."""
        bs = self.cache.block_size
        n = sum(min(bs, file.size - b * bs) for b in file.dirty if b * bs < file.size)
        if file.base is None:
            n = max(n, file.size)
        return max(1, n)

    # ------------------------------------------------------------------ a round
    async def upload(self, file: File) -> None:
        """One round: send everything the file changed so far."""
        assert file.fid is not None or file.unlinked
        async with self._rounds(id(file)):
            refused = False
            while True:
                if file.status is not Status.DIRTY or file.holds:
                    return
                cond = None if refused else self._put_condition(file)
                if cond is None or not self._conditions[cond]:
                    await self._check_remote(file)
                    if file.status is not Status.DIRTY or file.holds:
                        return  # unlinked, or moved, while we asked
                    # The HEAD said "upload": unconditionally, or with a condition this store
                    # was not yet seen to check (the HEAD covers it; see _put_conditionally).
                    cond = None if refused else self._put_condition(file)
                    if cond is not None and self._conditions[cond] is not None:
                        cond = None
                snap = self.cache.begin_upload(file)
                try:
                    etag = await self._send(file, snap, cond)
                except _Refused:
                    # Not the base any more (or no longer absent): ask, as without conditions.
                    self.cache.upload_failed(file)
                    refused = True
                    continue
                except BaseException:
                    self.cache.upload_failed(file)
                    raise
                await self.cache.upload_done(file, snap, etag)
                break
        self._on_uploaded(file)

    def _put_condition(self, file: File) -> str | None:
        """The condition the file's next round is sent with, if it is one conditional PUT on a
        store that may check it: "if_none_match" (no base) or "if_match" (the base).  None: the
        round asks first (multipart, metadata only, or the store cannot check).  Read with no
        await before ``begin_upload``, so the round's snapshot is the file as seen here."""
        if file.open_upload is not None or file.size > self._part_size(file.size):
            return None
        if file.base is None:
            cond = "if_none_match"
        elif file.dirty and file.base.etag:
            cond = "if_match"
        else:
            return None  # perhaps only attributes changed: a metadata update (a copy)
        return cond if self._conditions[cond] is not False else None

    async def _check_remote(self, file: File) -> None:
        """Is the stored object still the file's base?  See the module doc."""
        while True:
            key, base, token = file.key, file.base, file.upload_token
            try:
                info = await self.backend.head(key)
            except NotFound:
                info = None
            if file.key != key or file.status is not Status.DIRTY:
                if file.status is Status.DIRTY:
                    continue  # renamed while we asked: ask about the new name
                return
            if info is None:
                if base is not None:
                    lost = self.cache.lose_base(file)
                    log.warning("%s was deleted on the server while changed here; uploading the "
                                "local copy%s", key, f" ({lost} bytes never cached here are zeros)" if lost
                                else "")
                return
            if base is not None and info.etag == base.etag:
                return
            if carries(info.metadata, token):
                self.cache.rebase_on_own_upload(file, Remote(info.etag, info.size))
                return
            await self._conflict(file, key, Remote(info.etag, info.size))
            return

    async def _conflict(self, file: File, key: str, theirs: Remote) -> None:
        open_upload = file.open_upload
        if open_upload is not None and any(b not in file.present for b in file.staged):
            # Part of our data is only in the open upload, which can complete only under
            # this name: save their version as the conflict copy, then let ours take the name.
            saved = conflict_key(key)
            log.warning("%s changed on the server while a large upload of it was open here; the "
                        "server's version is saved as %s and the local one keeps the name", key, saved)
            await self.backend.copy(key, saved)
            self.cache.rebase_on_own_upload(file, theirs)
            return
        if open_upload is not None:
            await self._abort_open_upload(file)
        saved = conflict_key(key)
        log.warning("%s changed on the server while local changes were pending; the server's "
                    "version keeps the name, the local one is saved as %s", key, saved)
        lost = self.cache.retarget(file, saved)
        if lost:
            log.error("%s: %d bytes of the previous version were never cached here and are zeros "
                      "in %s", key, lost, saved)
        self._on_conflict(file, key)

    async def _abort_open_upload(self, file: File) -> None:
        upload = file.open_upload
        if upload is None:
            return
        self.cache.close_multipart(file)
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            try:
                await self.backend.mpu_abort(upload.key, upload.upload_id)
            except BackendError as exc:
                log.warning("could not abort the multipart upload of %s: %s", upload.key, exc)

    async def discard(self, file: File) -> None:
        """The file is being unlinked: give up its open upload, if any."""
        async with self._rounds(id(file)):
            await self._abort_open_upload(file)

    # ------------------------------------------------------------------ sending
    async def _tagged(self, file: File, metadata: dict[str, str]) -> dict[str, str]:
        """``metadata`` with a fresh upload token, journaled before the object can change (see
        _check_remote); without one if it would not fit the store's metadata limit."""
        token = uuid.uuid4().hex
        tagged = {**metadata, UPLOAD_KEY: token}
        if metadata_size(tagged) > self.backend.capabilities.max_metadata_bytes:
            return metadata
        await self.cache.set_upload_token(file, token)
        return tagged

    def _part_size(self, size: int, streaming: bool = False) -> int:
        bs = self.cache.block_size
        # A file still being written may grow well past its current size: leave room for it
        # within the store's part-count limit.
        part = self.backend.part_size_for(max(8 * size, 64 * GiB) if streaming else size, bs)
        return -(-part // bs) * bs  # whole blocks per part

    async def _send(self, file: File, snap: Snapshot, cond: str | None = None) -> str:
        """Upload the snapshot; returns the new version's ETag.  ``cond``: see ``_put_condition``
        (raises _Refused if the store refuses it)."""
        if cond is not None and (not snap.content_changed or file.open_upload is not None
                                 or snap.size > self._part_size(snap.size)):
            raise _Refused  # not one PUT after all (cannot happen: no await since _put_condition)
        if not snap.content_changed:
            return await self.backend.set_metadata(snap.key, await self._tagged(file, snap.metadata))
        upload = file.open_upload
        if upload is not None and (upload.key != snap.key or snap.size <= upload.part_size):
            await self._abort_open_upload(file)
            upload = None
        if upload is None:
            part = self._part_size(snap.size)
            if snap.size <= part:
                payload = await self._payload(file, snap, 0, snap.size)
                try:
                    metadata = await self._tagged(file, snap.metadata)
                    if cond is None:
                        etag = await self.backend.put(snap.key, payload, metadata)
                    else:
                        etag = await self._put_conditionally(snap, payload, metadata, cond)
                finally:
                    payload.close()
                self.sent_bytes += snap.size
                return etag
            upload = await self._open_upload(file, snap.key, part, await self._tagged(file, snap.metadata))
            return await self._send_multipart(file, snap, upload)
        try:
            if upload.upload_id not in self._ours:  # left open by a killed process
                await self.backend.mpu_resume(upload.key, upload.upload_id, upload.metadata)
                self._ours.add(upload.upload_id)
            return await self._send_multipart(file, snap, upload)
        except NotFound:
            if file.open_upload is not upload:
                raise
            # The store no longer has the upload kept open (an expiry rule, or a store that keeps
            # uploads in memory, restarted): its blocks go again, in a new upload.
            log.warning("%s: the open multipart upload is gone; uploading again", snap.key)
            snap.dirty.update(self.cache.close_multipart(file))
            return await self._send(file, snap)

    async def _put_conditionally(self, snap: Snapshot, payload: Payload, metadata: dict[str, str],
                                 cond: str) -> str:
        """One PUT stored only if the object is still the snapshot's base (``if_match``) or
        still absent (``if_none_match``); raises _Refused otherwise.  A condition not yet seen
        checked (``self._conditions`` None; the round asked with a HEAD first) is tested by
        sending the same PUT again: a server that checks it refuses the second one, one that
        ignores it stores the same bytes and metadata again."""
        if_match = snap.base.etag if cond == "if_match" and snap.base is not None else None
        if_none_match = cond == "if_none_match"
        assert if_match or if_none_match
        try:
            etag = await self.backend.put(snap.key, payload, metadata, if_match, if_none_match)
        except (PreconditionFailed, NotFound):  # NotFound: If-Match on a deleted object (S3)
            raise _Refused from None
        if self._conditions[cond] is None:
            try:
                etag = await self.backend.put(snap.key, payload, metadata, if_match, if_none_match)
            except (PreconditionFailed, NotFound):
                self._conditions[cond] = True
                log.info("%s checks %s on PUT: small files go up in one request",
                         self.backend.describe(), cond.replace("_", "-"))
            else:
                self._conditions[cond] = False
                log.warning("%s ignores %s on PUT: every upload asks with a HEAD first",
                            self.backend.describe(), cond.replace("_", "-"))
        return etag

    async def _send_multipart(self, file: File, snap: Snapshot, upload: OpenUpload) -> str:
        parts: list[PartInfo] = []
        with one_error():
            async with trio.open_nursery() as nursery:
                for number, start in enumerate(range(0, snap.size, upload.part_size), 1):
                    length = min(upload.part_size, snap.size - start)
                    staged = upload.parts.get(number)
                    if staged is not None and (staged.start, staged.length) == (start, length) and all(
                            file.staged.get(b) == number for b in self._blocks(start, length)):
                        parts.append(PartInfo(number, staged.etag))
                        continue
                    nursery.start_soon(self._send_part, file, snap, upload, number, start, length, parts)
        etag = await self.backend.mpu_complete(snap.key, upload.upload_id, parts)
        if {k: v for k, v in upload.metadata.items() if k != UPLOAD_KEY} != snap.metadata:
            # Attributes changed after the upload was opened (a chmod while it streamed).
            etag = await self.backend.set_metadata(snap.key, {**snap.metadata, UPLOAD_KEY: upload.token})
        return etag

    async def _open_upload(self, file: File, key: str, part_size: int, metadata: dict[str, str]
                           ) -> OpenUpload:
        upload_id = await self.backend.mpu_create(key, metadata)
        upload = OpenUpload(upload_id, key, part_size, metadata.get(UPLOAD_KEY, ""), metadata=metadata)
        self._ours.add(upload_id)
        self.cache.open_multipart(file, upload)
        return upload

    def _blocks(self, start: int, length: int) -> range:
        bs = self.cache.block_size
        return range(start // bs, (start + length - 1) // bs + 1)

    async def _send_part(self, file: File, snap: Snapshot, upload: OpenUpload, number: int, start: int,
                         length: int, parts: list[PartInfo]) -> None:
        async with self.part_slots:
            blocks = self._blocks(start, length)
            # Unchanged ranges are copied server-side even when cached: cheaper than sending
            # them again, and it lets the cache evict clean blocks while a big file uploads.
            copyable = (snap.base is not None and self.backend.capabilities.part_copy
                        and start + length <= snap.fetch_limit and not any(b in snap.dirty for b in blocks))
            if copyable:
                assert snap.base is not None
                parts.append(await self.backend.mpu_part_copy(snap.key, upload.upload_id, number, snap.key,
                                                              start, length, snap.base.etag))
                return
            payload = await self._payload(file, snap, start, length)
            try:
                parts.append(await self.backend.mpu_part(snap.key, upload.upload_id, number, payload))
            finally:
                payload.close()
            self.sent_bytes += length

    async def _payload(self, file: File, snap: Snapshot, start: int, length: int) -> Payload:
        """Bytes [start, start+length) of the snapshot, as segments of open block files.

        Each block file is opened with no await since the check that it is present, so an
        eviction later cannot take its bytes away.  A block that is not here is read from
        the stored version into memory, not into the cache: the cache may be full of this
        very file's dirty blocks, which only this upload can make clean.  Past the stored
        version (or with none) it is zeros.
        """
        bs = self.cache.block_size
        segments: list[Segment] = []
        try:
            pos = start
            while pos < start + length:
                block, within = divmod(pos, bs)
                n = min(bs - within, start + length - pos)
                if block in file.present:
                    segments.append(Segment(_open_ro(file.block_path(block)), within, n))
                elif snap.base is not None and pos < snap.fetch_limit:
                    segments.append(await self._stored_range(snap, pos, n))
                else:
                    segments.append(Segment(None, 0, n))
                pos += n
        except BaseException:
            Payload.from_segments(segments).close()
            raise
        return Payload.from_segments(segments)

    async def _stored_range(self, snap: Snapshot, pos: int, n: int) -> Segment:
        """``n`` bytes at ``pos`` of the snapshot's stored version, in an anonymous memory
        file (zeros past that version's end, or if it cannot be read: counted as lost)."""
        assert snap.base is not None
        fd = os.memfd_create("cloudfs-upload", os.MFD_CLOEXEC)
        try:
            with os.fdopen(os.dup(fd), "wb") as f:
                await self.backend.download(snap.key, f, pos, min(n, snap.fetch_limit - pos),
                                            if_match=snap.base.etag)
        except BackendError as exc:
            os.close(fd)
            log.error("%s: bytes %d-%d of the previous version could not be read (%s); they are "
                      "zeros in the upload", snap.key, pos, pos + n, exc)
            self.cache.stats["lost_bytes"] += n
            return Segment(None, 0, n)
        except BaseException:
            os.close(fd)
            raise
        return Segment(fd, 0, n)

    # ------------------------------------------------------------------ staging
    async def stage(self, file: File) -> bool:
        """Send the whole parts a large file being written has filled, keeping its multipart
        upload open (see the module doc).  True if it sent any."""
        sent: list[int] = []
        async with self._rounds(id(file)):
            if file.status is not Status.DIRTY or file.holds or file.fid is None:
                return False
            upload = file.open_upload
            part_size = upload.part_size if upload is not None else self._part_size(file.size, streaming=True)
            full = [n for n in range(1, file.size // part_size + 1)  # complete parts only
                    if self._fillable(file, n, part_size)]
            if not full:
                return False
            if upload is None:
                await self._check_remote(file)
                if file.status is not Status.DIRTY or file.open_upload is not None:
                    return False
                meta = await self._tagged(file, self.cache.metadata(file))
                if file.status is not Status.DIRTY or file.open_upload is not None:
                    return False  # unlinked while the token was journaled
                upload = await self._open_upload(file, file.key, part_size, meta)
            with one_error():
                async with trio.open_nursery() as nursery:
                    for number in full:
                        nursery.start_soon(self._stage_part, file, upload, number, sent)
        return bool(sent)

    async def _stage_part(self, file: File, upload: OpenUpload, number: int, sent: list[int]) -> None:
        """One whole part of ``stage``: its blocks not rewritten meanwhile become clean."""
        part_size = upload.part_size
        start = (number - 1) * part_size
        async with self.part_slots:
            if not self._fillable(file, number, part_size) or file.open_upload is not upload:
                return
            gens = {b: file.dirty[b] for b in self._blocks(start, part_size)}
            snap = Snapshot(file.key, file.size, file.gen, gens, None, 0, {}, True)
            payload = await self._payload(file, snap, start, part_size)
            try:
                info = await self.backend.mpu_part(file.key, upload.upload_id, number, payload)
            finally:
                payload.close()
        self.sent_bytes += part_size
        if file.open_upload is upload and not file.unlinked:
            self.cache.staged_part(file, StagedPart(number, info.etag, start, part_size), gens)
            sent.append(number)

    def _fillable(self, file: File, number: int, part_size: int) -> bool:
        start = (number - 1) * part_size
        blocks = self._blocks(start, part_size)
        bs = self.cache.block_size
        return all(b in file.dirty and b in file.present and b not in file.staged for b in blocks) and all(
            _size(file.block_path(b)) == bs for b in blocks)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def _open_ro(path: str) -> int:
    return os.open(path, os.O_RDONLY)
