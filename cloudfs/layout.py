"""The object layout: how POSIX attributes live in object user metadata, and how to read
what other tools wrote.  See docs/layout.md.

cloudfs writes s3fs-compatible keys (all metadata keys are lowercase, without the store's
header prefix):

* ``mode``  decimal st_mode including the file-type bits (``33188`` for a 0644 file)
* ``uid``/``gid``  decimal
* ``mtime`` epoch seconds with a 9-digit fraction (``1700000000.500000000``)
* ``xattr`` s3fs's form: URL-encoded JSON object of name -> base64(value)
* a symlink is an object whose body is the target, with S_IFLNK in ``mode``
* an empty directory is a ``dir/`` marker object

Reading accepts the forms written by rclone (fractional ``mtime`` without padding, octal
``mode`` text), gsutil (``goog-reserved-*``), gcsfuse (``gcsfuse_mtime``), blobfuse2
(``hdi_isfolder``, ``is_symlink``), B2 tools (``src_last_modified_millis``) and Swift tools
(``mtime`` from X-Object-Meta-Mtime).
"""

from __future__ import annotations

import base64
import json
import stat
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from urllib.parse import quote, unquote

DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755
_VALID_TYPES = {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR,
                stat.S_IFBLK}


@dataclass
class Attrs:
    """The POSIX view of one object."""

    mode: int  # full st_mode, type bits included
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


def parse_mode(text: str) -> int | None:
    """s3fs writes decimal, rclone octal text. Decimal only if <= 65535 with valid type bits."""
    text = text.strip()
    if not text.isdigit():
        return None
    value = int(text)
    if value <= 0xFFFF and stat.S_IFMT(value) in _VALID_TYPES:
        return value
    try:
        value = int(text, 8)
    except ValueError:
        return None
    if value <= 0xFFFF and stat.S_IFMT(value) in _VALID_TYPES | {0}:
        return value
    return None


def parse_epoch(text: str) -> int | None:
    """Epoch seconds, possibly fractional, to nanoseconds ('.5' is half a second, not 5 ns)."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        return None
    if not value.is_finite() or value < 0:
        return None
    return int(value * 1_000_000_000)


def format_epoch(ns: int) -> str:
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def _parse_rfc3339(text: str) -> int | None:
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    frac = text.rsplit(".", 1)[1].rstrip("Z").split("+")[0].split("-")[0] if "." in text else ""
    seconds = int(dt.timestamp())
    return seconds * 1_000_000_000 + int((frac + "000000000")[:9]) if frac.isdigit() else seconds * 10**9


def _mtime_from(meta: dict[str, str]) -> int | None:
    for key in ("mtime", "x-amz-meta-mtime"):
        if key in meta and (ns := parse_epoch(meta[key])) is not None:
            return ns
    if "gcsfuse_mtime" in meta and (ns := _parse_rfc3339(meta["gcsfuse_mtime"])) is not None:
        return ns
    if "goog-reserved-file-mtime" in meta and (ns := parse_epoch(meta["goog-reserved-file-mtime"])):
        return ns
    if "src_last_modified_millis" in meta:
        try:
            return int(meta["src_last_modified_millis"]) * 1_000_000
        except ValueError:
            return None
    return None


def _int(meta: dict[str, str], *keys: str) -> int | None:
    for key in keys:
        try:
            return int(meta[key])
        except (KeyError, ValueError):
            continue
    return None


def decode_xattrs(text: str) -> dict[bytes, bytes]:
    try:
        raw = json.loads(unquote(text))
        return {k.encode(): base64.b64decode(v) for k, v in raw.items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def encode_xattrs(xattrs: dict[bytes, bytes]) -> str:
    raw = {k.decode(): base64.b64encode(v).decode() for k, v in sorted(xattrs.items())}
    return quote(json.dumps(raw, separators=(",", ":")), safe="")


def decode(meta: dict[str, str] | None, *, is_dir: bool, size: int, server_mtime: float | None,
           default_uid: int, default_gid: int) -> Attrs:
    """POSIX attributes for an object (or a directory marker / implicit directory)."""
    meta = {k.lower(): v for k, v in (meta or {}).items()}
    mode = parse_mode(meta["mode"]) if "mode" in meta else None
    if mode is None and "goog-reserved-posix-mode" in meta:
        mode = parse_mode(meta["goog-reserved-posix-mode"])
    perms = stat.S_IMODE(mode) if mode is not None else None
    ftype = stat.S_IFMT(mode) if mode else 0
    if is_dir or meta.get("hdi_isfolder", "").lower() == "true":
        ftype = stat.S_IFDIR
        perms = DEFAULT_DIR_MODE if perms is None else perms
    else:
        if meta.get("is_symlink", "").lower() == "true":
            ftype = stat.S_IFLNK
        if ftype not in (stat.S_IFREG, stat.S_IFLNK):
            ftype = stat.S_IFREG  # devices/fifos cannot be served from an object: show a file
        if perms is None:
            perms = 0o777 if ftype == stat.S_IFLNK else DEFAULT_FILE_MODE
    mtime = _mtime_from(meta)
    if mtime is None:
        mtime = int((server_mtime or 0) * 1_000_000_000)
    uid = _int(meta, "uid", "goog-reserved-posix-uid")
    gid = _int(meta, "gid", "goog-reserved-posix-gid")
    return Attrs(
        mode=ftype | perms,
        uid=default_uid if uid is None else uid,
        gid=default_gid if gid is None else gid,
        mtime_ns=mtime,
        size=0 if ftype == stat.S_IFDIR else size,
        xattrs=decode_xattrs(meta["xattr"]) if "xattr" in meta else {},
    )


def encode(attrs: Attrs) -> dict[str, str]:
    """Metadata cloudfs writes for an object (s3fs-compatible keys)."""
    meta = {
        "mode": str(attrs.mode),
        "uid": str(attrs.uid),
        "gid": str(attrs.gid),
        "mtime": format_epoch(attrs.mtime_ns),
    }
    if attrs.xattrs:
        meta["xattr"] = encode_xattrs(attrs.xattrs)
    return meta


def metadata_size(meta: dict[str, str]) -> int:
    return sum(len(k) + len(v) for k, v in meta.items())
