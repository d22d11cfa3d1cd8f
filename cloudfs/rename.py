"""Renames: files and folders moved on the store, with a journaled intent so that an
interrupted one is finished by the next mount.

No store renames atomically, and a folder is many objects, so a rename is a sequence:

1. the intent ``{old, new}`` is written (durably) to the cache directory's ``intents/``;
2. uploads of files below ``old`` are held (they would write to the old name);
3. every object below ``old`` is copied to its new key; folder markers are written anew
   with their attributes (not copied: some stores keep markers as directories that
   CopyObject cannot read);
4. local files are re-keyed (their journal records name the new key) and the inodes move;
5. the old keys are deleted, last;
6. the intent is removed.

Killed anywhere in between, the next mount replays the intent: what is still below
``old`` is copied again and deleted, and records that still name an old key are re-keyed.
A rerun never makes the tree worse: the source of every copy is the old key as it is.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass

import trio

from cloudfs import layout
from cloudfs.backends import Backend, Payload
from cloudfs.backends.errors import NotFound
from cloudfs.cache import journal
from cloudfs.cache.block_cache import BlockCache
from cloudfs.cache.file import File, Remote

from .inodes import Inode, InodeTable

log = logging.getLogger(__name__)


@dataclass
class Intent:
    path: str
    old: str
    new: str
    is_dir: bool


class Renamer:
    def __init__(self, backend: Backend, cache: BlockCache, table: InodeTable, intents_dir: str,
                 parallel: int = 16) -> None:
        self.backend = backend
        self.cache = cache
        self.table = table
        self.intents_dir = intents_dir
        self.limiter = trio.CapacityLimiter(parallel)
        self.moving: dict[str, list[File]] = {}  # folder being moved -> files held for it

    # ------------------------------------------------------------------ intents
    def _begin(self, old: str, new: str, is_dir: bool) -> Intent:
        os.makedirs(self.intents_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.intents_dir, f"{uuid.uuid4().hex}.json")
        journal.write_json(path, {"old": old, "new": new, "is_dir": is_dir}, durable=True)
        return Intent(path, old, new, is_dir)

    def _end(self, intent: Intent) -> None:
        journal.remove(intent.path, durable=False)

    def intents(self) -> list[Intent]:
        out = []
        if os.path.isdir(self.intents_dir):
            for name in sorted(os.listdir(self.intents_dir)):
                path = os.path.join(self.intents_dir, name)
                raw = journal.read_json(path)
                valid = isinstance(raw, dict) and all(isinstance(raw.get(k), str) for k in ("old", "new"))
                if valid:
                    out.append(Intent(path, raw["old"], raw["new"], bool(raw.get("is_dir"))))
                elif name.endswith(".tmp") or raw is None:
                    journal.remove(path, durable=False)
        return out

    async def replay(self) -> None:
        """Finish renames an earlier mount was killed in (before serving)."""
        for intent in self.intents():
            log.info("finishing the interrupted rename of %s to %s", intent.old, intent.new)
            held = self._files_below(intent.old, intent.is_dir)
            await self._move_objects(intent, held, attrs=None)
            self._end(intent)

    # ------------------------------------------------------------------ holds
    def held_for(self, key: str) -> bool:
        """Whether ``key`` lies below a folder being moved right now."""
        return any(key.startswith(old + "/") for old in self.moving)

    def adopt(self, file: File) -> None:
        """A file created below a folder being moved: it is held and moved with it."""
        for old, held in self.moving.items():
            if file.key.startswith(old + "/"):
                file.holds += 1
                held.append(file)
                return

    def _files_below(self, old: str, is_dir: bool) -> list[File]:
        prefix = old + "/"
        return [f for key, f in list(self.cache.by_key.items())
                if (key.startswith(prefix) if is_dir else key == old)]

    @staticmethod
    async def _hold(files: list[File]) -> None:
        """Hold uploads of ``files``; returns once none of them is uploading."""
        for f in files:
            f.holds += 1
        for _ in range(1000):
            busy = [f for f in files if f.uploading]
            if not busy:
                return
            await busy[0].idle.wait()

    @staticmethod
    def _release(files: list[File]) -> None:
        for f in files:
            f.holds -= 1

    # ------------------------------------------------------------------ renames
    async def rename(self, inode: Inode, new: str, attrs: layout.Attrs) -> None:
        """Move ``inode``'s object(s) to ``new`` on the store and re-key local files; the
        caller has dealt with what was at ``new`` and moves the inodes afterwards.  ``attrs``
        are the moved inode's (its new ctime): a folder's new marker and a file's, symlink's
        or special file's copy are stored with them, in the same request."""
        old = inode.path
        is_dir = inode.is_dir
        intent = self._begin(old, new, is_dir)
        held = self._files_below(old, is_dir)
        if is_dir:
            self.moving[old] = held
        await self._hold(held)
        try:
            await self._move_objects(intent, held, attrs,
                                     implicit_dir=is_dir and inode.meta is not None and not inode.meta.stored,
                                     foreign=(inode.file.foreign if inode.file is not None
                                              else inode.meta.foreign if inode.meta is not None else {}))
        finally:
            self.moving.pop(old, None)
            self._release(held)
        self._end(intent)

    async def _move_objects(self, intent: Intent, held: list[File], attrs: layout.Attrs | None,
                            implicit_dir: bool = False, foreign: dict[str, str] | None = None) -> None:
        """The store's side of a rename.  ``attrs`` (None when an interrupted rename is
        finished: each object keeps what it has) go into the moved folder's marker, or into
        the moved object's copy together with ``foreign`` (other tools' metadata keys)."""
        old, new = intent.old, intent.new
        marker_attrs = attrs if intent.is_dir else None
        object_meta = ({**(foreign or {}), **layout.encode(attrs)}
                       if attrs is not None and not intent.is_dir else None)
        if intent.is_dir:
            keys: list[str] = []
            async for page in self.backend.list(old + "/", None):
                keys += [o.key for o in page.objects]
        elif held and all(f.base is None for f in held):
            keys = []  # never uploaded: nothing of it on the store, only the journal is re-keyed
        else:
            keys = [old]
        etags: dict[str, str] = {}

        def renamed(key: str) -> str:
            return new + key[len(old):]

        async def move_one(key: str) -> None:
            async with self.limiter:
                try:
                    if key.endswith("/"):
                        attrs = marker_attrs if key == old + "/" else None
                        await self._rewrite_marker(key, renamed(key), attrs)
                    else:
                        etags[key] = await self.backend.copy(key, renamed(key),
                                                             object_meta if key == old else None)
                except NotFound:
                    pass  # gone meanwhile (deleted by its owner, or an earlier run moved it)

        async with trio.open_nursery() as n:
            for key in keys:
                n.start_soon(move_one, key)
        if intent.is_dir and implicit_dir and old + "/" not in keys and marker_attrs is not None:
            # An implicit folder: give the new one a marker so it survives being emptied.
            await self.backend.put(new + "/", Payload.from_bytes(b""), layout.encode(marker_attrs))
        for file in held + [f for f in self._files_below(old, intent.is_dir) if f not in held]:
            if file.unlinked or not (file.key == old or file.key.startswith(old + "/")):
                continue
            base = None
            if file.base is not None and file.key in etags:
                base = Remote(etags[file.key], file.base.size)
            other = self.cache.by_key.get(renamed(file.key))
            if other is not None and other is not file:
                self.cache.unlink(other)  # replaced by the rename
            self.cache.rename(file, renamed(file.key), base, attrs if object_meta is not None else None)
        if keys:
            await self.backend.delete_many(keys)

    async def _rewrite_marker(self, key: str, new_key: str, attrs: layout.Attrs | None) -> None:
        """A folder marker written anew at ``new_key`` with the old one's attributes."""
        info = await self.backend.head(key)
        meta = dict(info.metadata or {})
        if attrs is not None:
            meta = {**layout.foreign(meta), **layout.encode(attrs)}
        await self.backend.put(new_key, Payload.from_bytes(b""), meta)
