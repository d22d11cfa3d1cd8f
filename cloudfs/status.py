"""`cloudfs status MOUNTPOINT`: what a running mount is doing.

The daemon answers on a private Unix socket beside its pid file (0600 in a 0700 run
directory).  A client sends one command line, ``status`` or ``sync`` (upload every pending
file now: no write-back delay, no backoff, last errors forgotten), and gets one JSON
document back:
backend requests by operation, cache use, pending uploads and recent upload errors.  No
secrets are in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import trio

from cloudfs.backends import Backend
from cloudfs.cache.block_cache import BlockCache
from cloudfs.cache.uploader import Uploader
from cloudfs.cache.writeback import WritebackQueue


def socket_path(pid_file: str) -> str:
    return pid_file.removesuffix(".pid") + ".sock"


def snapshot(backend: Backend, cache: BlockCache, uploader: Uploader, queue: WritebackQueue,
             mountpoint: str, log: str | None = None) -> dict[str, Any]:
    pending = cache.pending_files()
    return {
        "mountpoint": mountpoint,
        "backend": backend.describe(),
        "pid": os.getpid(),
        "log": log,  # None: the daemon logs to its stderr (--foreground)
        "offline_since": backend.offline_since,  # epoch seconds; None while the store answers
        "requests": dict(backend.requests),
        "cache": {
            "dir": cache.dir,
            "used_bytes": cache.used,
            "max_bytes": cache.max_bytes,
            "dirty_bytes": cache.dirty_bytes,
            "max_dirty_bytes": cache.max_dirty,
            "block_size": cache.block_size,
            **cache.stats,
        },
        "uploads": {
            "pending_files": len(pending),
            "pending_bytes": sum(uploader.pending_bytes(f) for f in pending),
            "uploading": sorted(f.key for f in pending if f.uploading)[:20],
            "uploaded_bytes": uploader.sent_bytes,
            "errors": {f.key: queue.errors[f.fid] for f in pending
                       if f.fid is not None and f.fid in queue.errors},
        },
    }


async def serve(path: str, report: Callable[[], dict[str, Any]], expedite: Callable[[], None]) -> None:
    """Answer every connection's command with ``report()`` as JSON, until cancelled."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(8)
    listener = trio.SocketListener(sock)
    try:
        async with listener:
            while True:
                stream = await listener.accept()
                async with stream:
                    with contextlib.suppress(trio.BrokenResourceError), trio.move_on_after(10):
                        command = b""
                        while b"\n" not in command and len(command) < 64:
                            chunk = await stream.receive_some(64)
                            if not chunk:
                                break
                            command += chunk
                        if command.strip() == b"sync":
                            expedite()
                        await stream.send_all(json.dumps(report()).encode())
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def query(path: str, command: str = "status", timeout: float = 5.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(command.encode() + b"\n")
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return json.loads(b"".join(chunks))


def every_mount(run_dir: str) -> list[dict[str, Any]]:
    """The status of each mount that answers on a socket in ``run_dir`` (dead ones are skipped)."""
    found = []
    for name in sorted(os.listdir(run_dir)):
        if name.endswith(".sock"):
            with contextlib.suppress(OSError, ValueError):
                found.append(query(os.path.join(run_dir, name)))
    return sorted(found, key=lambda st: st["mountpoint"])


def size_text(n: int) -> str:
    """``n`` bytes for people: ``512 bytes``, ``1.5 KiB``, ``20.0 MiB``, ``3.2 GiB``."""
    if n < 1024:
        return f"{n} byte" + ("" if n == 1 else "s")
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def store_line(st: dict[str, Any]) -> str:
    """``store: answers``, or ``store: offline since T, N files / B bytes queued``."""
    if st.get("offline_since") is None:
        return "store: answers"
    u = st["uploads"]
    files = u["pending_files"]
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st["offline_since"]))
    return (f"store: offline since {since}, "
            f"{files} file{'' if files == 1 else 's'} / {size_text(u['pending_bytes'])} queued")


def render(st: dict[str, Any]) -> str:
    c, u = st["cache"], st["uploads"]
    mib = 1024 * 1024
    lines = [
        f"{st['mountpoint']}: {st['backend']} (pid {st['pid']})",
        f"cache directory: {c['dir']}" + (f", log: {st['log']}" if st.get("log") else ""),
        store_line(st),
        f"cache: {c['used_bytes'] / mib:.0f} of {c['max_bytes'] / mib:.0f} MiB used, "
        f"{c['dirty_bytes'] / mib:.0f} MiB not uploaded, {c['hits']} hits, {c['fetches']} fetches, "
        f"{c['evictions']} evictions",
        f"uploads: {u['pending_files']} file(s) pending ({size_text(u['pending_bytes'])}), "
        f"{size_text(u['uploaded_bytes'])} uploaded",
        "requests: " + ", ".join(f"{k} {v}" for k, v in sorted(st["requests"].items())),
    ]
    lines += [f"upload error: {k}: {v}" for k, v in u["errors"].items()]
    return "\n".join(lines)
