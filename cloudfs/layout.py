"""The object layout: how POSIX attributes live in object user metadata, and how to read
what other tools wrote.  See docs/layout.md.

cloudfs writes s3fs-compatible keys (all metadata keys are lowercase, without the store's
header prefix):

* ``mode``  decimal st_mode including the file-type bits (``33188`` for a 0644 file)
* ``uid``/``gid``  decimal
* ``mtime`` epoch seconds with a 9-digit fraction (``1700000000.500000000``)
* ``ctime`` the same form (s3fs writes ``%ld`` or ``%ld.%09ld``); an object without one has
  the store's last-modified time as ctime, as s3fs reads it
* ``xattr`` s3fs's form: URL-encoded JSON object of name -> base64(value)
* a symlink is an object whose body is the target, with S_IFLNK in ``mode``
* a FIFO, socket or device node is an empty object with its type in ``mode`` and, for a
  device, ``rdev`` (decimal), as s3fs's mknod writes them
* an empty directory is a ``dir/`` marker object

Reading accepts the forms written by rclone (fractional ``mtime`` without padding, octal
``mode`` text), gsutil (``goog-reserved-*``), gcsfuse (``gcsfuse_mtime``), blobfuse2
(``hdi_isfolder``, ``is_symlink``), B2 tools (``src_last_modified_millis``) and Swift tools
(``mtime`` from X-Object-Meta-Mtime).
"""

from __future__ import annotations

import base64
import json
import math
import re
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote, unquote

DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755
_VALID_TYPES = {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR,
                stat.S_IFBLK}
SPECIAL_TYPES = frozenset({stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK})
_NS = 1_000_000_000
_MAX_NS = 2**63 - 1  # st_mtime_ns is a signed 64-bit count of nanoseconds
_MAX_ID = 2**32 - 1  # uid_t/gid_t are 32-bit unsigned
# ASCII digits only (str.isdigit() and int() also take e.g. '²' or Arabic-Indic digits).
_MODE_RE = re.compile(r"[0-9]{1,7}")
_EPOCH_RE = re.compile(r"([+-]?)([0-9]{1,12})(?:\.([0-9]*))?")
_MILLIS_RE = re.compile(r"[+-]?[0-9]{1,15}")
_ID_RE = re.compile(r"[0-9]{1,10}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class Attrs:
    """The POSIX view of one object."""

    mode: int  # full st_mode, type bits included
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    rdev: int = 0  # the device number of a device node
    # The last change of the file or its attributes (st_ctime).  Never None once built:
    # an Attrs made without one has its mtime as ctime (s3fs's reading of such an object).
    ctime_ns: int | None = None
    # st_atime as last set by utime (s3fs's ``atime`` key); None: never set, it reads as the
    # mtime.  Reads do not move it.
    atime_ns: int | None = None

    def __post_init__(self) -> None:
        if self.ctime_ns is None:
            self.ctime_ns = self.mtime_ns

    @property
    def ctime(self) -> int:
        """``ctime_ns`` as an int (it is never None after construction)."""
        return self.mtime_ns if self.ctime_ns is None else self.ctime_ns

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_special(self) -> bool:
        """A FIFO, socket or device node: only its attributes are stored."""
        return stat.S_IFMT(self.mode) in SPECIAL_TYPES

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


def parse_mode(text: str, *, is_dir: bool = False) -> int | None:
    """s3fs writes decimal, rclone octal text.

    A value is decimal only if it is at most 65535 and its file-type bits are valid;
    otherwise it is read as octal (and must then fit in 16 bits with valid or no type bits).
    For a directory, "valid" means S_IFDIR when the octal reading is a directory: rclone's
    octal ``42755`` (setgid dir) is also decimal 42755, which has S_IFLNK bits.
    """
    text = text.strip()
    if not _MODE_RE.fullmatch(text):
        return None
    value = int(text)
    if value <= 0xFFFF and stat.S_IFMT(value) in _VALID_TYPES:
        if not (is_dir and stat.S_IFMT(value) != stat.S_IFDIR and "8" not in text and "9" not in text
                and stat.S_IFMT(int(text, 8)) == stat.S_IFDIR):
            return value
    if "8" in text or "9" in text:
        return None
    value = int(text, 8)
    if value <= 0xFFFF and stat.S_IFMT(value) in _VALID_TYPES | {0}:
        return value
    return None


def parse_epoch(text: str) -> int | None:
    """Epoch seconds, possibly fractional, to nanoseconds ('.5' is half a second, not 5 ns).

    The fraction is padded to 9 digits (digits beyond nanoseconds are dropped).  A negative
    value follows s3fs's ``%ld.%09ld`` of a normalized timespec: ``-1.500000000`` is
    tv_sec=-1 plus tv_nsec=500000000, i.e. half a second before the epoch.
    """
    m = _EPOCH_RE.fullmatch(text.strip())
    if m is None:
        return None
    sign, seconds, frac = m.groups()
    ns = int(seconds) * _NS
    if sign == "-":
        ns = -ns
    ns += int(((frac or "") + "000000000")[:9])
    return ns if -_MAX_NS <= ns <= _MAX_NS else None


def format_epoch(ns: int) -> str:
    """s3fs's ``%ld.%09ld`` of a normalized timespec (floor seconds, fraction in [0, 1e9))."""
    return f"{ns // _NS}.{ns % _NS:09d}"


def _parse_rfc3339(text: str) -> int | None:
    """RFC 3339 (gcsfuse, rclone on GCS/Azure: ``2006-01-02T15:04:05.999999999Z``) to ns.

    Nanoseconds are kept (datetime stops at microseconds); a value without an offset is UTC.
    """
    text = text.strip()
    if not text.isascii() or "T" not in text.upper():
        return None
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        delta = dt.replace(microsecond=0) - _EPOCH
    except OverflowError:
        return None
    frac = ""
    if m := re.search(r"[0-9]{2}:?[0-9]{2}[.,]([0-9]+)", text):
        frac = m.group(1)
    ns = (delta.days * 86400 + delta.seconds) * _NS + int((frac + "000000000")[:9])
    return ns if -_MAX_NS <= ns <= _MAX_NS else None


def _parse_millis(text: str) -> int | None:
    m = _MILLIS_RE.fullmatch(text.strip())
    if m is None:
        return None
    ns = int(m.group(0)) * 1_000_000
    return ns if -_MAX_NS <= ns <= _MAX_NS else None


def _parse_epoch_or_rfc3339(text: str) -> int | None:
    ns = parse_epoch(text)
    return _parse_rfc3339(text) if ns is None else ns


# Where the mtime comes from, first usable one wins (see docs/layout.md):
# s3fs / rclone on S3 / Swift tools write epoch seconds in ``mtime``, rclone on GCS and Azure
# RFC 3339 in the same key; then gcsfuse, gsutil, B2 tools.
_MTIME_SOURCES = (
    ("mtime", _parse_epoch_or_rfc3339),
    ("gcsfuse_mtime", _parse_rfc3339),
    ("goog-reserved-file-mtime", parse_epoch),
    ("src_last_modified_millis", _parse_millis),
)


def _mtime_from(meta: dict[str, str]) -> int | None:
    for key, parse in _MTIME_SOURCES:
        if key in meta and (ns := parse(meta[key])) is not None:
            return ns
    return None


def _float_to_ns(seconds: float) -> int:
    """Float epoch seconds to ns without float error in the product (.25 s is 250000000 ns)."""
    whole = math.floor(seconds)
    return whole * _NS + round((seconds - whole) * _NS)


def _int(meta: dict[str, str], *keys: str) -> int | None:
    """The first key holding a valid uid/gid (decimal, 0 .. 2**32-1)."""
    for key in keys:
        text = meta.get(key, "").strip()
        if _ID_RE.fullmatch(text) and int(text) <= _MAX_ID:
            return int(text)
    return None


def decode_xattrs(text: str) -> dict[bytes, bytes]:
    """s3fs's ``xattr``: URL-encoded ``{"name":"base64(value)",...}``; {} if unreadable.

    Names are bytes that need not be UTF-8 (s3fs copies them raw): undecodable bytes survive
    as surrogate escapes.
    """
    try:
        raw = json.loads(unquote(text, errors="surrogateescape"))
        if not isinstance(raw, dict):
            return {}
        return {k.encode("utf-8", "surrogateescape"): base64.b64decode(v) for k, v in raw.items()}
    except (ValueError, TypeError, AttributeError, RecursionError):
        return {}


def encode_xattrs(xattrs: dict[bytes, bytes]) -> str:
    """The inverse of decode_xattrs, in s3fs's form.

    Names go into the JSON as raw UTF-8, not ``\\uXXXX`` escapes: s3fs does not unescape
    JSON, so an escaped name would reach it as a different name.
    """
    raw = {k.decode("utf-8", "surrogateescape"): base64.b64encode(v).decode()
           for k, v in sorted(xattrs.items())}
    return quote(json.dumps(raw, separators=(",", ":"), ensure_ascii=False), safe="",
                 errors="surrogateescape")


def decode(meta: dict[str, str] | None, *, is_dir: bool, size: int, server_mtime: float | None,
           default_uid: int, default_gid: int, file_mode: int = DEFAULT_FILE_MODE,
           dir_mode: int = DEFAULT_DIR_MODE) -> Attrs:
    """POSIX attributes for an object (or a directory marker / implicit directory); the
    ``default_*`` and ``*_mode`` values stand in for what its metadata does not say."""
    meta = {str(k).lower(): v for k, v in (meta or {}).items() if isinstance(v, str)}
    is_dir = is_dir or meta.get("hdi_isfolder", "").strip().lower() == "true"
    mode = parse_mode(meta["mode"], is_dir=is_dir) if "mode" in meta else None
    if mode is None and "goog-reserved-posix-mode" in meta:
        mode = parse_mode(meta["goog-reserved-posix-mode"], is_dir=is_dir)
    perms = stat.S_IMODE(mode) if mode is not None else None
    ftype = stat.S_IFMT(mode) if mode else 0
    if is_dir:
        ftype = stat.S_IFDIR
        perms = dir_mode if perms is None else perms
    else:
        if meta.get("is_symlink", "").strip().lower() == "true":
            ftype = stat.S_IFLNK
        if ftype not in (stat.S_IFREG, stat.S_IFLNK) and ftype not in SPECIAL_TYPES:
            ftype = stat.S_IFREG
        if perms is None:
            perms = 0o777 if ftype == stat.S_IFLNK else file_mode
    mtime = _mtime_from(meta)
    if mtime is None:
        mtime = _float_to_ns(server_mtime or 0.0)
    # s3fs's get_ctime(): the ``ctime`` key, else the store's last-modified time.
    ctime = parse_epoch(meta["ctime"]) if "ctime" in meta else None
    if ctime is None and server_mtime is not None:
        ctime = _float_to_ns(server_mtime)
    uid = _int(meta, "uid", "goog-reserved-posix-uid")
    gid = _int(meta, "gid", "goog-reserved-posix-gid")
    rdev = (_int(meta, "rdev") or 0) if ftype in (stat.S_IFCHR, stat.S_IFBLK) else 0
    atime = _parse_epoch_or_rfc3339(meta["atime"]) if "atime" in meta else None  # s3fs's or rclone's
    return Attrs(
        mode=ftype | perms,
        uid=default_uid if uid is None else uid,
        gid=default_gid if gid is None else gid,
        mtime_ns=mtime,
        size=0 if ftype == stat.S_IFDIR or ftype in SPECIAL_TYPES else size,
        xattrs=decode_xattrs(meta["xattr"]) if "xattr" in meta else {},
        rdev=rdev,
        ctime_ns=ctime,  # None (no ctime, no last-modified time): the mtime
        atime_ns=atime,
    )


def encode(attrs: Attrs) -> dict[str, str]:
    """Metadata cloudfs writes for an object (s3fs-compatible keys)."""
    meta = {
        "mode": str(attrs.mode),
        "uid": str(attrs.uid),
        "gid": str(attrs.gid),
        "mtime": format_epoch(attrs.mtime_ns),
        "ctime": format_epoch(attrs.ctime),
    }
    if attrs.xattrs:
        meta["xattr"] = encode_xattrs(attrs.xattrs)
    if attrs.rdev:
        meta["rdev"] = str(attrs.rdev)
    if attrs.atime_ns is not None:
        meta["atime"] = format_epoch(attrs.atime_ns)
    return meta


def metadata_size(meta: dict[str, str]) -> int:
    return sum(len(k) + len(v) for k, v in meta.items())


# cloudfs's keys, the uploader's token among them.
OWN_KEYS = frozenset({"mode", "uid", "gid", "mtime", "ctime", "atime", "xattr", "rdev", "cloudfs_upload"})


def foreign(meta: dict[str, str] | None) -> dict[str, str]:
    """Metadata keys cloudfs does not write (other tools'), to carry over on updates."""
    return {k: v for k, v in (meta or {}).items() if isinstance(v, str) and k.lower() not in OWN_KEYS}
