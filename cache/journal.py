"""On-disk state of one cache entry: the journal record that makes write-back crash-safe.

Each entry directory holds its block files (``b<N>``) and ``state.json``.  The record names
the object key, the remote version the clean blocks belong to, the logical size, the dirty
blocks and the metadata to upload.  It is replaced atomically (write temp, fsync, rename),
so after a crash it is either the old or the new record, never a torn one.  See
docs/concurrency.md for when it is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field


@dataclass
class EntryState:
    key: str
    size: int
    base_etag: str | None = None
    base_size: int = 0
    fetch_limit: int = 0  # bytes of the remote version still part of the content
    dirty: list[int] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    pending: bool = False  # must be uploaded (new, written, resized or re-attributed)
    upload_token: str | None = None  # sent in the metadata of the upload started last


def state_path(entry_dir: str) -> str:
    return os.path.join(entry_dir, "state.json")


def write_state(entry_dir: str, state: EntryState, durable: bool) -> None:
    """Atomically replace the record; with ``durable`` it survives power loss."""
    path = state_path(entry_dir)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(asdict(state)).encode())
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    if durable:
        fsync_dir(entry_dir)


def read_state(entry_dir: str) -> EntryState | None:
    try:
        with open(state_path(entry_dir)) as f:
            raw = json.load(f)
        return EntryState(**raw)
    except (OSError, ValueError, TypeError):
        return None


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
