"""Mount options (``-o a,b=c``): one documented table, used by ``--help`` and the docs."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field

import humanfriendly

from cloudfs.backends.errors import ConfigError

# name -> help. The same text appears in `cloudfs mount --help` and docs/options.md.
OPTIONS: dict[str, str] = {
    "ro": "mount read-only",
    "nonempty": "mount over a directory that is not empty (its files are hidden while mounted); "
                "without it such a mount is refused",
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
    "dir_cache_time": "seconds a complete folder listing is kept: `ls` of the folder is answered from it "
                      "with no request, a name not in it is missing without a request (lookups and "
                      "creates), and listings reuse the metadata of objects whose ETag is unchanged; "
                      "this mount's own changes update it, other tools' changes show up after at most "
                      "this (default 300, as rclone's --dir-cache-time)",
    "dir_cache_entries": "entries of all kept folder listings together, least recently used dropped "
                         "first; a folder with more entries is listed from the store every time "
                         "(default 100000)",
    "meta_cache_entries": "objects whose HEAD result is kept in the cache directory (metadata.db), so a "
                          "listing after a remount sends no HEAD for objects whose ETag is unchanged; "
                          "oldest dropped first; only for stores whose listings lack metadata (S3, "
                          "Swift); 0 turns it off (default 500000)",
    "sync_upload": "fsync() and close() return only after the upload finished",
    "attr_timeout": "seconds metadata and missing names are cached by cloudfs and the kernel; changes "
                    "by other tools show up after at most this, except in folder listings and in "
                    "folders whose listing is kept (see dir_cache_time) (default 10)",
    "readahead": "blocks fetched ahead of a sequential reader (default 4)",
    "transfers": "files uploaded in parallel (default 4)",
    "connections": "concurrent requests to the backend (default 16)",
    "retries": "attempts for a failing request before the call fails with EIO (default 6)",
    "timeout": "seconds a transfer may go without moving a byte before it counts as failed; a "
               "slow but steady one goes on (default 120)",
    "metadata_timeout": "seconds a request that moves no data (HEAD, LIST, DELETE) may take in all; "
                        "while the store does not answer, also how long any request may go "
                        "without moving a byte, so a hung store is noticed quickly (default 10)",
    "content_type": "the Content-Type of every object written: `auto` (the default: from the name's "
                    "extension, as web servers do) or one fixed type for all, e.g. application/octet-stream",
    "log_file": "where the daemon logs (default: cloudfs.log in the cache directory)",
    "debug": "log every FUSE request and every request to the store (names and sizes; never file "
             "contents, metadata values or credentials)",
    "metrics": "serve Prometheus metrics on HOST:PORT (e.g. 127.0.0.1:9105): requests by operation "
               "and result with latency, bytes up and down, cache hits/misses/evictions, dirty bytes, "
               "queued files",
    "noatime": "kernel flag, passed to the mount; `relatime` (the default, undoes it) and `strictatime` "
               "are accepted too (libfuse cannot set strictatime: it is ignored)",
    "noexec": "kernel flag, passed to the mount (`exec`, the default, undoes it)",
    "nosuid": "accepted for fstab lines; a cloudfs mount is always nosuid,nodev (also `nodev`)",
}
# The generic kernel flags of fstab lines (what only mount(8) or systemd act on is removed by
# mount.cloudfs, see cloudfs/mount_helper.py): accepted by `cloudfs mount -o`; noatime and
# noexec are passed to the FUSE mount, nosuid and nodev are always on.
KERNEL_FLAGS = ("noatime", "relatime", "strictatime", "noexec", "exec", "nosuid", "nodev")
ATIME_FLAGS = ("noatime", "relatime", "strictatime")
ALWAYS_ON = ("nosuid", "nodev")


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
    dir_cache_entries: int = 100_000
    meta_cache_entries: int = 500_000
    readahead: int = 4
    transfers: int = 4
    connections: int = 16
    retries: int = 6
    timeout: float = 120.0
    metadata_timeout: float = 10.0
    log_file: str | None = None
    debug: bool = False
    metrics: str | None = None  # HOST:PORT
    content_type: str | None = None  # None: guessed from each name
    nonempty: bool = False
    atime: str | None = None  # noatime or relatime (the kernel's default)
    noexec: bool = False
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
        seconds = float(value) if value.replace(".", "", 1).isdigit() else humanfriendly.parse_timespan(value)
    except humanfriendly.InvalidTimespan:
        raise ConfigError(f"-o {name}={value}: not a duration (e.g. 5, 5s, 2m)") from None
    if not 0 <= seconds < 10 * 365 * 86400:
        raise ConfigError(f"-o {name}={value}: not a duration (e.g. 5, 5s, 2m)")
    return seconds


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


def _bool(name: str, value: str) -> bool:
    if value.lower() in ("", "1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"-o {name}={value}: expected no value, or one of 1/0, yes/no, true/false")


def _flag(name: str, value: str) -> None:
    if value:
        raise ConfigError(f"-o {name}={value}: {name} takes no value")


# Smallest accepted value of each numeric option (the largest is checked where it matters).
MINIMUM = {"uid": 0, "gid": 0, "readahead": 0, "dir_cache_entries": 0, "meta_cache_entries": 0,
           "transfers": 1, "connections": 1,
           "retries": 1, "cache_size": 1, "min_free": 0, "max_dirty": 1, "timeout": 0.001,
           "metadata_timeout": 0.001}


# Backend options that are yes/no flags; the backends read them, this only refuses nonsense.
BACKEND_FLAGS = ("path_style", "anonymous", "b2_hard_delete")
B2_REALMS = ("production", "dev", "staging")


def _check_backend_option(name: str, value: str) -> None:
    """The checks every backend's options share (each backend checks the rest itself)."""
    if name in BACKEND_FLAGS:
        _bool(name, value)
    elif name == "endpoint" and value and not value.startswith(("http://", "https://")) \
            and value not in B2_REALMS:
        raise ConfigError(f"-o endpoint={value}: not an http(s):// URL")


_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*(;[ -~]*)?")


def _content_type(value: str) -> str | None:
    if value == "auto":
        return None
    if not _MEDIA_TYPE.fullmatch(value):
        raise ConfigError(f"-o content_type={value}: not auto nor a media type like text/plain")
    return value


def parse(options: dict[str, str], backend_options: frozenset[str]) -> MountOptions:
    """Parse and check every option; a bad one is a ConfigError naming it (exit code 2)."""
    m = MountOptions()
    modes: dict[str, int] = {}
    for name, value in options.items():
        if name in ("ro", "rw"):
            _flag(name, value)
            m.read_only = name == "ro"
        elif name in ("allow_other", "nonempty", "nosuid", "nodev", "noexec", "exec", *ATIME_FLAGS):
            _flag(name, value)
            if name in ("noatime", "relatime"):  # strictatime: accepted, libfuse cannot set it
                m.atime = name
            elif name in ("noexec", "exec"):
                m.noexec = name == "noexec"
            elif name not in ALWAYS_ON:
                setattr(m, name, True)
        elif name in ("uid", "gid", "readahead", "transfers", "connections", "retries", "dir_cache_entries",
                      "meta_cache_entries"):
            setattr(m, name, _int(name, value))
        elif name in ("umask", "file_mode", "dir_mode"):
            modes[name] = _octal(name, value)
        elif name in ("cache_size", "min_free", "max_dirty", "block_size"):
            setattr(m, name, _size(name, value))
        elif name in ("writeback_delay", "attr_timeout", "timeout", "metadata_timeout", "dir_cache_time"):
            setattr(m, name, _seconds(name, value))
        elif name in ("sync_upload", "debug"):
            setattr(m, name, _bool(name, value))
        elif name in ("cache_dir", "log_file"):
            if not value:
                raise ConfigError(f"-o {name} needs a path")
            setattr(m, name, os.path.abspath(value))
        elif name == "metrics":
            parse_address(value)
            m.metrics = value
        elif name == "content_type":
            m.content_type = _content_type(value)
        elif name in backend_options:
            _check_backend_option(name, value)
            m.backend[name] = value
        else:
            raise ConfigError(f"unknown mount option: {name} (see `cloudfs mount --help`)")
        least = MINIMUM.get(name)
        if least is not None and getattr(m, name) < least:
            raise ConfigError(f"-o {name}={value}: " + (f"must be at least {least}" if isinstance(least, int)
                                                        else "must be more than 0"))
    if m.uid >= 2**32 - 1 or m.gid >= 2**32 - 1:
        raise ConfigError("-o uid/gid: not a valid user or group id")
    if m.block_size < 64 * 1024 or m.block_size > 1024**3:
        raise ConfigError("-o block_size must be between 64K and 1G")
    if m.cache_size < 4 * m.block_size:
        raise ConfigError("-o cache_size must hold at least 4 blocks")
    if m.max_dirty is None:
        m.max_dirty = m.cache_size // 2
    elif m.max_dirty > m.cache_size:
        raise ConfigError("-o max_dirty must not exceed cache_size")
    umask = modes.get("umask", 0o022)
    m.file_mode = modes.get("file_mode", 0o666 & ~umask)
    m.dir_mode = modes.get("dir_mode", 0o777 & ~umask)
    return m


def check_paths(m: MountOptions, cache_dir: str) -> None:
    """The cache directory can be created (or is a directory we may write) and the log file
    can be written: checked before the mount starts, so a bad path is one line, not a traceback."""
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise ConfigError(f"cache directory {cache_dir}: exists and is not a directory")
    try:
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cache directory {cache_dir}: {exc.strerror or exc}") from None
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"cache directory {cache_dir}: not writable")
    if m.log_file:
        parent = os.path.dirname(m.log_file)
        if os.path.isdir(m.log_file) or not os.path.isdir(parent) or \
                not os.access(m.log_file if os.path.exists(m.log_file) else parent, os.W_OK):
            raise ConfigError(f"-o log_file={m.log_file}: not a file that can be written")


def normalise_url(url: str) -> str:
    """One spelling per bucket: the scheme in lower case, no repeated or trailing slashes in
    the path (``S3://b//p/`` is ``s3://b/p``).  Everything keyed on the URL uses this form."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url.strip())
    path = "/".join(p for p in parts.path.split("/") if p)
    if parts.scheme.lower() == "file" or parts.path.startswith("/"):
        path = "/" + path if path else ""
    return urlunsplit((parts.scheme.lower(), parts.netloc, path, parts.query, parts.fragment))


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
    """``url`` is the store's description (Backend.describe(): scheme, bucket and prefix already in
    one spelling, plus the endpoint), so every way of typing the URL finds the same cache."""
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
                      "Backend options: `ca_bundle=PATH` (the CAs to trust) and `tls_verify=0` (no "
                      "certificate check, for test servers) on every network store; `endpoint`, `region`, "
                      "`path_style`, `profile`, `storage_class`, `sse`, `sse_kms_key_id`, `sse_c_key_file`, "
                      "`acl`, `requester_pays` (s3, described in `backends/s3.py`); `endpoint` (az); "
                      "`endpoint`, `project`, `anonymous` (gs); `endpoint`, `b2_hard_delete` (b2).", ""])


if __name__ == "__main__":
    print(markdown_table(), end="")
