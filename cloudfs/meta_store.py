"""A persistent record of what HEAD said about objects, so a remount lists without HEADs.

S3 and Swift listings carry no user metadata (mode, owner, mtime): a cold listing HEADs
every object.  This record, ``CACHE_DIR/metadata.db`` (sqlite3, private: 0600 in the
0700 cache directory), keeps each object's HEAD result (size, ETag, last-modified, user
metadata as sent by the store) keyed by key, with the ETag it belongs to.

Invariants:

* a record is used only for an object whose listed ETag equals the recorded one: a
  record with another ETag is never used (an object without an ETag is never recorded);
* it is a cache, never the truth: losing it (a crash, a torn or corrupt file, any sqlite
  error) costs HEADs, never correctness.  So writes are not fsynced (``synchronous=OFF``),
  and a file that sqlite cannot read is deleted and started afresh;
* bounded: at most ``max_entries`` records; beyond that the oldest checked ones go
  (10% at a time, so eviction runs rarely);
* writes are batched by the caller (one transaction per listing page) and run on the
  trio thread: a page's transaction is a few milliseconds without fsync.

Owned by one :class:`cloudfs.metadata.Metadata` (one mount); the cache directory's lock
keeps two mounts from sharing it.  It is opened at first use, after the mount took that lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time

from cloudfs.backends import ObjectInfo

log = logging.getLogger(__name__)

FILE = "metadata.db"
CHUNK = 500  # keys per SELECT (sqlite's limit on bound variables is 999 in old builds)
SCHEMA = ("CREATE TABLE IF NOT EXISTS heads (key TEXT PRIMARY KEY, etag TEXT NOT NULL, "
          "size INTEGER NOT NULL, mtime REAL, metadata TEXT NOT NULL, checked REAL NOT NULL)")


class MetaStore:
    def __init__(self, path: str, max_entries: int) -> None:
        self.path = path
        self.max_entries = max_entries
        self._db: sqlite3.Connection | None = None
        self._broken = False  # an error we could not recover from: used no more this mount
        self._count: int | None = None  # records held, once counted (kept up to date roughly)
        self._added = 0  # records written since the last count

    # ------------------------------------------------------------------ opening
    def _connect(self) -> sqlite3.Connection:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # sqlite's -wal/-shm copy its mode
        os.close(fd)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=OFF")
            db.execute(SCHEMA)
            db.execute("CREATE INDEX IF NOT EXISTS heads_checked ON heads (checked)")
        except BaseException:
            db.close()
            raise
        return db

    def _open(self) -> sqlite3.Connection | None:
        if self._broken:
            return None
        if self._db is None:
            try:
                self._db = self._connect()
            except sqlite3.DatabaseError as exc:
                log.warning("metadata record %s unreadable (%s): starting a new one", self.path, exc)
                self._remove_files()
                try:
                    self._db = self._connect()
                except (sqlite3.Error, OSError) as exc2:
                    self._give_up(exc2)
            except OSError as exc:
                self._give_up(exc)
        return self._db

    def _give_up(self, exc: BaseException) -> None:
        log.warning("metadata record %s not used: %s (listings HEAD objects instead)", self.path, exc)
        self._broken = True
        self.close()
        if type(exc) is sqlite3.DatabaseError:  # corrupt ("malformed"): the next mount starts afresh
            self._remove_files()

    def _remove_files(self) -> None:
        """The database and sqlite's WAL and shared-memory files beside it."""
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path + suffix)

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    # ------------------------------------------------------------------ reading and writing
    def lookup(self, objects: list[ObjectInfo]) -> dict[str, tuple[ObjectInfo, float]]:
        """The recorded HEAD results of ``objects`` whose ETag matches theirs, with the wall
        clock time each was checked: key -> (info, checked)."""
        db = self._open()
        wanted = {o.key: o for o in objects if o.etag is not None}
        if db is None or not wanted:
            return {}
        out: dict[str, tuple[ObjectInfo, float]] = {}
        keys = list(wanted)
        try:
            for i in range(0, len(keys), CHUNK):
                chunk = keys[i:i + CHUNK]
                rows = db.execute(f"SELECT key, etag, size, mtime, metadata, checked FROM heads "
                                  f"WHERE key IN ({','.join('?' * len(chunk))})", chunk).fetchall()
                for key, etag, size, mtime, metadata, checked in rows:
                    if etag != wanted[key].etag:
                        continue  # another version: never used
                    out[key] = (ObjectInfo(key, int(size), etag, mtime, json.loads(metadata)), float(checked))
        except (sqlite3.Error, ValueError) as exc:
            self._give_up(exc)
            return {}
        return out

    def record(self, infos: list[ObjectInfo]) -> None:
        """HEAD results, written in one transaction (not fsynced)."""
        rows = [(o.key, o.etag, o.size, o.mtime, json.dumps(o.metadata or {}), time.time())
                for o in infos if o.etag is not None]
        db = self._open()
        if db is None or not rows:
            return
        try:
            with db:  # one transaction
                db.execute("BEGIN")
                db.executemany("INSERT OR REPLACE INTO heads (key, etag, size, mtime, metadata, checked) "
                               "VALUES (?, ?, ?, ?, ?, ?)", rows)
            # Counted now and then; in between, an upper bound (a replacement counts too).
            self._added += len(rows)
            count = self._count
            if count is None or self._added >= max(100, self.max_entries // 20):
                count = int(db.execute("SELECT COUNT(*) FROM heads").fetchone()[0])
                self._added = 0
            else:
                count += len(rows)
            self._count = count
            if count > self.max_entries:
                self._evict(db)
        except sqlite3.Error as exc:
            self._give_up(exc)

    def _evict(self, db: sqlite3.Connection) -> None:
        """Down to 90% of the bound, the oldest checked records first."""
        count = int(db.execute("SELECT COUNT(*) FROM heads").fetchone()[0])
        excess = count - self.max_entries * 9 // 10
        if excess > 0 and count > self.max_entries:
            with db:
                db.execute("BEGIN")
                db.execute("DELETE FROM heads WHERE key IN "
                           "(SELECT key FROM heads ORDER BY checked LIMIT ?)", (excess,))
            count -= excess
        self._count, self._added = count, 0

    def __len__(self) -> int:
        db = self._open()
        if db is None:
            return 0
        return int(db.execute("SELECT COUNT(*) FROM heads").fetchone()[0])
