"""Mount options (``-o a,b=c``): one documented table, used by ``--help`` and the docs."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import humanfriendly

from cloudfs.backends.errors import ConfigError

# name -> help. The same text appears in `cloudfs mount --help` and docs/options.md.
OPTIONS: dict[str, str] = {
    "ro": "mount read-only",
    "allow_other": "let other users access the mount (needs user_allow_other for non-root)",
    "uid": "owner of objects that carry no uid metadata (default: the mounting user)",
    "gid": "group of objects that carry no gid metadata (default: the mounting user's group)",
    "umask": "octal umask for objects that carry no mode metadata: files 0666 and folders 0777 "
             "minus it (default 022)",
    "file_mode": "octal permissions of files that carry no mode metadata (default 0644; wins over umask)",
    "dir_mode": "octal permissions of folders that carry no mode metadata (default 0755; wins over umask)",
    "cache_dir": "block cache directory (default: /var/cache/cloudfs/<bucket-hash> as root, "
                 "else $XDG_CACHE_HOME/cloudfs/<bucket-hash>)",
    "cache_size": "hard limit of the block cache, e.g. 20G (default 10G)",
    "min_free": "keep this much space free on the cache file system (default 1G)",
    "max_dirty": "written-but-not-uploaded data before writers wait (default: half of cache_size)",
    "block_size": "cache block and multipart part size (default 8M)",
    "writeback_delay": "seconds after the last write before a file is uploaded, e.g. 5, 5s, 2m (default 5s)",
    "dir_cache_time": "seconds a folder listing reuses the metadata of objects whose ETag is unchanged, "
                      "so a repeated `ls -l` sends no HEAD requests (default 300)",
    "sync_upload": "fsync() and close() return only after the upload finished",
    "attr_timeout": "seconds metadata, missing names and folder listings are cached by cloudfs and "
                    "the kernel; changes by other tools show up after at most this (default 10)",
    "readahead": "blocks fetched ahead of a sequential reader (default 4)",
    "transfers": "files uploaded in parallel (default 4)",
    "connections": "concurrent requests to the backend (default 16)",
    "retries": "attempts for a failing request before the call fails with EIO (default 6)",
    "timeout": "seconds one request may take before it counts as failed (default 120)",
    "metadata_timeout": "the same for requests that move no data (HEAD, LIST, DELETE), so a hung "
                        "store is noticed quickly (default 10)",
    "log_file": "where the daemon logs (default: cloudfs.log in the cache directory)",
    "debug": "verbose logging",
    "metrics": "serve Prometheus metrics on HOST:PORT (e.g. 127.0.0.1:9105): requests by operation "
               "and result with latency, bytes up and down, cache hits/misses/evictions, dirty bytes, "
               "queued files",
}


@dataclass
class MountOptions:
    read_only: bool = False
    allow_other: bool = False
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    file_mode: int = 0o644
    dir_mode: int = 0o755
    cache_dir: str | None = None
    cache_size: int = 10 * 1024**3
    min_free: int = 1024**3
    max_dirty: int | None = None
    block_size: int = 8 * 1024**2
    writeback_delay: float = 5.0
    sync_upload: bool = False
    attr_timeout: float = 10.0
    dir_cache_time: float = 300.0
    readahead: int = 4
    transfers: int = 4
    connections: int = 16
    retries: int = 6
    timeout: float = 120.0
    metadata_timeout: float = 10.0
    log_file: str | None = None
    debug: bool = False
    metrics: str | None = None  # HOST:PORT
    backend: dict[str, str] = field(default_factory=dict)  # options the backend takes


def split_options(text: str | list[str] | None) -> dict[str, str]:
    items: list[str] = []
    for chunk in [text] if isinstance(text, str) else (text or []):
        items += [p.strip() for p in chunk.split(",") if p.strip()]
    out: dict[str, str] = {}
    for item in items:
        name, _, value = item.partition("=")
        out[name] = value
    return out


def _size(name: str, value: str) -> int:
    try:
        return humanfriendly.parse_size(value, binary=True)
    except humanfriendly.InvalidSize:
        raise ConfigError(f"-o {name}={value}: not a size (e.g. 20G, 512M)") from None


def _seconds(name: str, value: str) -> float:
    try:
        return float(value) if value.replace(".", "", 1).isdigit() else humanfriendly.parse_timespan(value)
    except humanfriendly.InvalidTimespan:
        raise ConfigError(f"-o {name}={value}: not a duration (e.g. 5, 5s, 2m)") from None


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"-o {name}={value}: not a number") from None


def _octal(name: str, value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise ConfigError(f"-o {name}={value}: not an octal mode (e.g. 0640)") from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"-o {name}={value}: permissions are 0 to 0777")
    return mode


def parse(options: dict[str, str], backend_options: frozenset[str]) -> MountOptions:
    m = MountOptions()
    modes: dict[str, int] = {}
    for name, value in options.items():
        if name in ("ro", "rw"):
            m.read_only = name == "ro"
        elif name == "allow_other":
            m.allow_other = True
        elif name in ("uid", "gid", "readahead", "transfers", "connections", "retries"):
            setattr(m, name, _int(name, value))
        elif name in ("umask", "file_mode", "dir_mode"):
            modes[name] = _octal(name, value)
        elif name in ("cache_size", "min_free", "max_dirty", "block_size"):
            setattr(m, name, _size(name, value))
        elif name in ("writeback_delay", "attr_timeout", "timeout", "metadata_timeout", "dir_cache_time"):
            setattr(m, name, _seconds(name, value))
        elif name in ("sync_upload", "debug"):
            setattr(m, name, value.lower() not in ("0", "false", "no"))
        elif name in ("cache_dir", "log_file"):
            if not value:
                raise ConfigError(f"-o {name} needs a path")
            setattr(m, name, os.path.abspath(value))
        elif name == "metrics":
            parse_address(value)
            m.metrics = value
        elif name in backend_options:
            m.backend[name] = value
        else:
            raise ConfigError(f"unknown mount option: {name} (see `cloudfs mount --help`)")
    if m.block_size < 64 * 1024 or m.block_size > 1024**3:
        raise ConfigError("-o block_size must be between 64K and 1G")
    if m.cache_size < 4 * m.block_size:
        raise ConfigError("-o cache_size must hold at least 4 blocks")
    if m.retries < 1:
        raise ConfigError("-o retries must be at least 1")
    if m.max_dirty is None:
        m.max_dirty = m.cache_size // 2
    umask = modes.get("umask", 0o022)
    m.file_mode = modes.get("file_mode", 0o666 & ~umask)
    m.dir_mode = modes.get("dir_mode", 0o777 & ~umask)
    return m


def parse_address(text: str) -> tuple[str, int]:
    """``-o metrics=``: ``HOST:PORT`` (``[v6]:PORT``), or a bare ``PORT`` on 127.0.0.1."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"-o metrics={text}: expected HOST:PORT, e.g. 127.0.0.1:9105")
    return host, int(port)


def default_cache_dir(url: str) -> str:
    from cloudfs.cache_dirs import default_base

    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(default_base(), digest)


def markdown_table() -> str:
    """docs/options.md is generated from OPTIONS, so the docs and --help never disagree."""
    rows = [f"| `{name}` | {text} |" for name, text in OPTIONS.items()]
    return "\n".join(["# Mount options", "", "Generated from `cloudfs/options.py` "
                      "(`python -m cloudfs.options > docs/options.md`); "
                      "`cloudfs mount --help` shows the same.",
                      "", "| option | meaning |", "|---|---|", *rows, "",
                      "Backend options: `endpoint`, `region`, `path_style`, `profile` (s3); `endpoint` (az); "
                      "`endpoint`, `project`, `anonymous` (gs); `endpoint`, `b2_hard_delete` (b2).", ""])


if __name__ == "__main__":
    print(markdown_table(), end="")
