"""What the cache directory remembers across a crash: its identity, one record per file, and
intents of multi-step operations.

* ``cache.json`` says what the directory belongs to: the store (backend identity: scheme,
  endpoint or account, bucket, prefix), the block size and the format version.  A mount of
  another store refuses to use it, so pending uploads never go to the wrong store.
* ``files/<fid>/state.json`` is a file's record (:class:`FileRecord`): its key, size, the
  stored version its clean blocks belong to, its dirty blocks, the metadata to upload and
  the multipart upload it keeps open.
* ``intents/<id>.json`` records a directory rename while it runs, so the next mount
  finishes one that was interrupted.

Every record is replaced atomically (write a temp file, rename it over the old one): after
a crash it is the old or the new record, never a torn one.  ``durable`` adds the fsyncs
that make it survive a power loss.  See docs/concurrency.md for when each is written.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

FORMAT = 2


class CacheMismatch(Exception):
    """The cache directory belongs to another store."""


@dataclass
class FileRecord:
    fid: str
    key: str
    size: int
    pending: bool  # local changes to upload
    metadata: dict[str, str]  # what to store with the object: cloudfs's keys and other tools'
    base_etag: str | None = None
    base_size: int = 0
    fetch_limit: int = 0
    dirty: list[int] = field(default_factory=list)
    staged: dict[str, int] = field(default_factory=dict)  # block (as text: JSON keys) -> part number
    upload_token: str | None = None
    open_upload: dict[str, Any] | None = None  # OpenUpload as a dict
    delete_on_close: dict[str, Any] | None = None  # Remote as a dict


def write_json(path: str, value: Any, durable: bool) -> None:
    """Atomically replace ``path`` with ``value`` as JSON; with ``durable`` it survives power loss."""
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, json.dumps(value).encode())
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(path))


def read_json(path: str) -> Any:
    """The parsed file, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def remove(path: str, durable: bool) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    if durable:
        fsync_dir(os.path.dirname(path))


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def record_path(file_dir: str) -> str:
    return os.path.join(file_dir, "state.json")


def write_record(file_dir: str, record: FileRecord, durable: bool) -> None:
    # Its fields are JSON values already (nested records come as dicts): no deep copy.
    write_json(record_path(file_dir), vars(record), durable)


def sync_record(file_dir: str) -> None:
    """fsync the record as it is on disk (and its directory entry)."""
    fd = os.open(record_path(file_dir), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(file_dir)


def read_record(file_dir: str) -> FileRecord | None:
    raw = read_json(record_path(file_dir))
    if not isinstance(raw, dict):
        return None
    try:
        return FileRecord(**raw)
    except TypeError:
        return None


def check_identity(cache_dir: str, store: str, block_size: int) -> int:
    """Claim ``cache_dir`` for ``store``, or check that it is already ours.

    Returns the block size to use: the recorded one, since cached blocks are cut to it.
    Raises CacheMismatch when the directory belongs to another store.
    """
    path = os.path.join(cache_dir, "cache.json")
    raw = read_json(path)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        if raw.get("store") != store:
            raise CacheMismatch(f"cache directory {cache_dir} belongs to {raw.get('store')}, not {store}; "
                                "use another -o cache_dir (or unmount the other store first)")
        recorded = raw.get("block_size")
        if isinstance(recorded, int) and recorded > 0:
            return recorded
    write_json(path, {"format": FORMAT, "store": store, "block_size": block_size}, durable=True)
    return block_size
