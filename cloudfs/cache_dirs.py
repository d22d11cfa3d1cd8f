"""`cloudfs cache list` and `cloudfs cache clean`: the cache directories on this machine.

A cache directory is in use while a mount holds its lock (the same ``flock`` a second mount
would fail on), and it holds pending uploads while any journal record in it says so (a
file not yet uploaded, a delete to finish, an open multipart upload).  Neither kind is ever
removed: removing it would lose data the mount acknowledged.  ``clean`` holds the lock
while it deletes, so a mount cannot start on a directory half-removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from cloudfs.cache import journal


@dataclass
class CacheDir:
    path: str
    store: str | None  # what cache.json says it belongs to (None: not a cloudfs cache)
    bytes: int
    pending_files: int
    in_use: bool
    last_used: float  # epoch seconds of the newest file in it

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def default_base() -> str:
    """Where default cache directories live (see options.default_cache_dir)."""
    if os.getuid() == 0:
        return "/var/cache/cloudfs"
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cloudfs")


def candidates(base: str) -> list[str]:
    """Cache directories directly under ``base`` (those with a cache.json)."""
    if not os.path.isdir(base):
        return []
    return sorted(os.path.join(base, n) for n in os.listdir(base)
                  if os.path.isfile(os.path.join(base, n, "cache.json")))


@contextlib.contextmanager
def locked(path: str) -> Iterator[bool]:
    """Hold the cache directory's mount lock if it is free; yields whether it was."""
    try:
        fd = os.open(os.path.join(path, "lock"), os.O_RDWR)
    except FileNotFoundError:
        yield True  # never mounted to completion: nothing can hold it
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _pending_files(path: str) -> int:
    files = os.path.join(path, "files")
    if not os.path.isdir(files):
        return 0
    count = 0
    for fid in os.listdir(files):
        record = journal.read_record(os.path.join(files, fid))
        if record is not None and (record.pending or record.delete_on_close is not None
                                   or record.open_upload is not None):
            count += 1
    return count


def _usage(path: str) -> tuple[int, float]:
    total, newest = 0, 0.0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(os.path.join(dirpath, name))
                total += st.st_blocks * 512
                newest = max(newest, st.st_mtime)
    return total, newest


def describe(path: str) -> CacheDir:
    raw = journal.read_json(os.path.join(path, "cache.json"))
    store = raw.get("store") if isinstance(raw, dict) else None
    with locked(path) as free:
        pending = _pending_files(path)
    size, newest = _usage(path)
    return CacheDir(path, store if isinstance(store, str) else None, size, pending, not free, newest)


def clean(path: str, older_than: float | None = None) -> str | None:
    """Remove the cache directory ``path``; returns why it was kept, or None if removed."""
    if not os.path.isfile(os.path.join(path, "cache.json")):
        return "not a cloudfs cache directory"
    with locked(path) as free:
        if not free:
            return "in use by a mount"
        pending = _pending_files(path)
        if pending:
            return f"{pending} file(s) not uploaded yet: mount it to upload them"
        if older_than is not None:
            _size, newest = _usage(path)
            if time.time() - newest < older_than:
                return "used recently"
        # Everything goes while the lock is held, the lock file last: a mount starting now
        # finds no lock to wait on and makes a fresh cache (then the rmdir below fails).
        for name in sorted(os.listdir(path), key=lambda n: n == "lock"):
            full = os.path.join(path, name)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.unlink(full)
    try:
        os.rmdir(path)
    except OSError:
        return "a mount started on it meanwhile"
    return None
