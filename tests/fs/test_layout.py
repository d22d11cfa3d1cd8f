"""Golden tests for the object layout codec (cloudfs/layout.py, documented in docs/layout.md).

Every ``meta`` dict below is shaped exactly as a backend hands it to the codec: metadata
names lowercase and without the store's header prefix (``x-amz-meta-``, ``x-ms-meta-``,
``x-goog-meta-``, ``x-object-meta-``), values as the named tool writes them.
"""

from __future__ import annotations

import dataclasses
import stat
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudfs import layout
from cloudfs.layout import Attrs

NS = 1_000_000_000
DEFAULT_UID, DEFAULT_GID = 4242, 4343
SERVER_MTIME = 1_600_000_000.25  # the store's Last-Modified, used when no tool mtime is readable
SERVER_NS = 1_600_000_000_250_000_000


def decode(meta: dict[str, str] | None, *, is_dir: bool = False, size: int = 0,
           server_mtime: float | None = SERVER_MTIME) -> Attrs:
    return layout.decode(meta, is_dir=is_dir, size=size, server_mtime=server_mtime,
                         default_uid=DEFAULT_UID, default_gid=DEFAULT_GID)


def s3fs_xattr(pairs: dict[str, str]) -> str:
    """``x-amz-meta-xattr`` exactly as s3fs's build_xattrs() makes it: the names raw, the
    base64 values unescaped, joined into ``{"n":"v",...}``, then s3fs's urlEncode(), which
    keeps ``[A-Za-z0-9._~/-]`` and writes every other byte as ``%XX`` (upper-case hex)."""
    raw = "{" + ",".join(f'"{name}":"{value}"' for name, value in pairs.items()) + "}"
    return quote(raw, safe="/._~-")


# --------------------------------------------------------------------------- golden objects

S3FS_XATTR = s3fs_xattr({"user.bin": "//79", "user.comment": "aGVsbG8gd29ybGQ=", "user.empty": ""})

GOLDEN: dict[str, tuple[dict[str, str], dict, Attrs]] = {
    # s3fs: decimal st_mode with type bits, decimal uid/gid, "%ld" mtime, ctime and atime,
    # xattrs in one URL-encoded JSON header.
    "s3fs-file": (
        {"mode": "33188", "uid": "1000", "gid": "1001", "mtime": "1700000000",
         "atime": "1700000100", "ctime": "1700000200", "xattr": S3FS_XATTR},
        {"size": 11},
        Attrs(stat.S_IFREG | 0o644, 1000, 1001, 1_700_000_000 * NS, 11,
              {b"user.bin": b"\xff\xfe\xfd", b"user.comment": b"hello world", b"user.empty": b""},
              ctime_ns=1_700_000_200 * NS, atime_ns=1_700_000_100 * NS),
    ),
    # s3fs's ctime with a fraction ("%ld.%09ld", s3fs_str_realtime()).
    "s3fs-ctime-fraction": (
        {"mode": "33188", "mtime": "1700000000", "ctime": "1700000300.000000007"},
        {"size": 1},
        Attrs(stat.S_IFREG | 0o644, DEFAULT_UID, DEFAULT_GID, 1_700_000_000 * NS, 1, {},
              ctime_ns=1_700_000_300 * NS + 7),
    ),
    # s3fs with a sub-second mtime: "%ld.%09ld".
    "s3fs-file-fraction": (
        {"mode": "33261", "uid": "0", "gid": "0", "mtime": "1700000000.000000042"},
        {"size": 5},
        Attrs(stat.S_IFREG | 0o755, 0, 0, 1_700_000_000 * NS + 42, 5, {}),
    ),
    # s3fs mkdir: a "dir/" marker object with a directory mode.
    "s3fs-dir-marker": (
        {"mode": "16877", "uid": "1000", "gid": "1000", "mtime": "1700000000"},
        {"is_dir": True},
        Attrs(stat.S_IFDIR | 0o755, 1000, 1000, 1_700_000_000 * NS, 0, {}),
    ),
    # s3fs symlink: the body is the target, the mode carries S_IFLNK (41471 = 0o120777).
    "s3fs-symlink": (
        {"mode": "41471", "uid": "1000", "gid": "1000", "mtime": "1700000000"},
        {"size": len(b"../target/file.txt")},
        Attrs(stat.S_IFLNK | 0o777, 1000, 1000, 1_700_000_000 * NS, 18, {}),
    ),
    # rclone on S3: X-Amz-Meta-Mtime is fractional epoch seconds with trailing zeros
    # dropped; ".5" is half a second (s3fs would misread it as 5 ns).
    "rclone-s3-mtime": (
        {"mtime": "1354040105.5"},
        {"size": 3},
        Attrs(stat.S_IFREG | 0o644, DEFAULT_UID, DEFAULT_GID, 1_354_040_105_500_000_000, 3, {}),
    ),
    "rclone-s3-mtime-whole": (
        {"mtime": "1354040105"},
        {},
        Attrs(stat.S_IFREG | 0o644, DEFAULT_UID, DEFAULT_GID, 1_354_040_105 * NS, 0, {}),
    ),
    # rclone --metadata: mode is OCTAL text, uid/gid decimal, atime RFC 3339, plus btime.
    "rclone-s3-metadata": (
        {"mtime": "1354040105.123", "mode": "100664", "uid": "1000", "gid": "100",
         "atime": "2012-11-27T18:15:05.5Z", "btime": "2012-11-27T18:15:05Z"},
        {"size": 7},
        Attrs(stat.S_IFREG | 0o664, 1000, 100, 1_354_040_105_123_000_000, 7, {},
              atime_ns=1_354_040_105_500_000_000),
    ),
    "rclone-s3-metadata-dir": (
        {"mtime": "1354040105.25", "mode": "40750"},
        {"is_dir": True},
        Attrs(stat.S_IFDIR | 0o750, DEFAULT_UID, DEFAULT_GID, 1_354_040_105_250_000_000, 0, {}),
    ),
    # octal 42755 (setgid dir) is also decimal 42755, whose type bits say symlink: a
    # directory takes the octal reading.
    "rclone-s3-metadata-setgid-dir": (
        {"mode": "42755"},
        {"is_dir": True},
        Attrs(stat.S_IFDIR | 0o2755, DEFAULT_UID, DEFAULT_GID, SERVER_NS, 0, {}),
    ),
    # rclone on GCS and Azure keeps mtime in the same key, but as RFC 3339 with nanoseconds.
    "rclone-gcs-mtime": (
        {"mtime": "2012-11-27T18:15:05.123456789Z"},
        {"size": 1},
        Attrs(stat.S_IFREG | 0o644, DEFAULT_UID, DEFAULT_GID, 1_354_040_105_123_456_789, 1, {}),
    ),
    "rclone-azure-mtime": (
        {"mtime": "2012-11-27T18:15:05.500000000Z"},
        {},
        Attrs(stat.S_IFREG | 0o644, DEFAULT_UID, DEFAULT_GID, 1_354_040_105_500_000_000, 0, {}),
    ),
    # gsutil -P: goog-reserved-* keys, mtime whole epoch seconds, mode octal permission bits.
    "gsutil": (
        {"goog-reserved-file-atime": "1700000100", "goog-reserved-file-mtime": "1700000000",
         "goog-reserved-posix-mode": "644", "goog-reserved-posix-uid": "1000",
         "goog-reserved-posix-gid": "1000"},
        {"size": 9},
        Attrs(stat.S_IFREG | 0o644, 1000, 1000, 1_700_000_000 * NS, 9, {}),
    ),
    "gsutil-executable": (
        {"goog-reserved-file-mtime": "1700000000", "goog-reserved-posix-mode": "755"},
        {"size": 2},
        Attrs(stat.S_IFREG | 0o755, DEFAULT_UID, DEFAULT_GID, 1_700_000_000 * NS, 2, {}),
    ),
    # gcsfuse: gcsfuse_mtime is RFC 3339 with nanoseconds (Go's RFC3339Nano drops trailing zeros).
    "gcsfuse": (
        {"gcsfuse_mtime": "2023-11-14T22:13:20.123456789Z"},
        {"size": 4},
        Attrs(stat.S_IFREG | 0o644, DEFAULT_UID, DEFAULT_GID, 1_700_000_000_123_456_789, 4, {}),
    ),
    "gcsfuse-short-fraction": (
        {"gcsfuse_mtime": "2023-11-14T22:13:20.5Z"},
        {},
        Attrs(stat.S_IFREG | 0o644, DEFAULT_UID, DEFAULT_GID, 1_700_000_000_500_000_000, 0, {}),
    ),
    "gcsfuse-offset": (
        {"gcsfuse_mtime": "2023-11-15T00:13:20.000000001+02:00"},
        {},
        Attrs(stat.S_IFREG | 0o644, DEFAULT_UID, DEFAULT_GID, 1_700_000_000_000_000_001, 0, {}),
    ),
    # gcsfuse / Cloud Console folders: an empty "dir/" object without metadata.
    "gcs-folder-marker": (
        {},
        {"is_dir": True},
        Attrs(stat.S_IFDIR | 0o755, DEFAULT_UID, DEFAULT_GID, SERVER_NS, 0, {}),
    ),
    # blobfuse2: a folder is a zero-byte blob with hdi_isfolder=true (even without a slash).
    "blobfuse2-folder": (
        {"hdi_isfolder": "true"},
        {},
        Attrs(stat.S_IFDIR | 0o755, DEFAULT_UID, DEFAULT_GID, SERVER_NS, 0, {}),
    ),
    # Azure metadata names are case-insensitive; a value may come back as "True".
    "blobfuse2-folder-case": (
        {"Hdi_IsFolder": "True"},
        {},
        Attrs(stat.S_IFDIR | 0o755, DEFAULT_UID, DEFAULT_GID, SERVER_NS, 0, {}),
    ),
    # blobfuse2: a symlink is a blob whose body is the target, marked is_symlink=true.
    "blobfuse2-symlink": (
        {"is_symlink": "true"},
        {"size": 6},
        Attrs(stat.S_IFLNK | 0o777, DEFAULT_UID, DEFAULT_GID, SERVER_NS, 6, {}),
    ),
    # B2 tools (b2 CLI, rclone on B2): src_last_modified_millis.
    "b2": (
        {"src_last_modified_millis": "1700000000123"},
        {"size": 8},
        Attrs(stat.S_IFREG | 0o644, DEFAULT_UID, DEFAULT_GID, 1_700_000_000_123_000_000, 8, {}),
    ),
    # Swift tools (python-swiftclient "%f", rclone): X-Object-Meta-Mtime as fractional epoch.
    "swift": (
        {"mtime": "1354040105.500000"},
        {"size": 10},
        Attrs(stat.S_IFREG | 0o644, DEFAULT_UID, DEFAULT_GID, 1_354_040_105_500_000_000, 10, {}),
    ),
    "swift-rclone": (
        {"mtime": "1354040105.123456789"},
        {},
        Attrs(stat.S_IFREG | 0o644, DEFAULT_UID, DEFAULT_GID, 1_354_040_105_123_456_789, 0, {}),
    ),
    # An object put by a plain client (aws s3 cp, boto3): no metadata at all.
    "plain-object": (
        {},
        {"size": 123},
        Attrs(stat.S_IFREG | 0o644, DEFAULT_UID, DEFAULT_GID, SERVER_NS, 123, {}),
    ),
}


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden(name: str) -> None:
    meta, kwargs, expected = GOLDEN[name]
    if "ctime" not in meta:  # no ctime key: the store's last-modified time is the ctime
        expected = dataclasses.replace(expected, ctime_ns=SERVER_NS)
    assert decode(dict(meta), **kwargs) == expected


def test_no_metadata_at_all() -> None:
    assert decode(None, size=5) == Attrs(stat.S_IFREG | 0o644, DEFAULT_UID, DEFAULT_GID, SERVER_NS, 5, {})
    assert decode(None, is_dir=True, size=5, server_mtime=None) == Attrs(
        stat.S_IFDIR | 0o755, DEFAULT_UID, DEFAULT_GID, 0, 0, {})


def test_s3fs_xattr_header_golden_text() -> None:
    """The literal header s3fs writes for {user.comment: b"hello world"}."""
    text = "%7B%22user.comment%22%3A%22aGVsbG8gd29ybGQ%3D%22%7D"
    assert s3fs_xattr({"user.comment": "aGVsbG8gd29ybGQ="}) == text
    assert layout.decode_xattrs(text) == {b"user.comment": b"hello world"}
    assert layout.encode_xattrs({b"user.comment": b"hello world"}) == text


def test_s3fs_xattr_non_ascii_name() -> None:
    """s3fs copies names raw (no JSON escaping), so cloudfs reads and writes raw UTF-8 too."""
    text = s3fs_xattr({"user.café": "eA=="})
    assert "%C3%A9" in text
    assert layout.decode_xattrs(text) == {"user.café".encode(): b"x"}
    assert layout.encode_xattrs({"user.café".encode(): b"x"}) == text


# --------------------------------------------------------------------------- precedence

@pytest.mark.parametrize(("meta", "expected_ns"), [
    ({"mtime": "100", "gcsfuse_mtime": "1970-01-01T00:03:20Z", "goog-reserved-file-mtime": "300",
      "src_last_modified_millis": "400000"}, 100 * NS),
    ({"gcsfuse_mtime": "1970-01-01T00:03:20Z", "goog-reserved-file-mtime": "300",
      "src_last_modified_millis": "400000"}, 200 * NS),
    ({"goog-reserved-file-mtime": "300", "src_last_modified_millis": "400000"}, 300 * NS),
    ({"src_last_modified_millis": "400000"}, 400 * NS),
    # an unreadable value does not hide the next source
    ({"mtime": "yesterday", "gcsfuse_mtime": "1970-01-01T00:03:20Z"}, 200 * NS),
    ({"mtime": "", "gcsfuse_mtime": "bad", "goog-reserved-file-mtime": "x",
      "src_last_modified_millis": "400000"}, 400 * NS),
    ({"mtime": "bad", "src_last_modified_millis": "4e5"}, SERVER_NS),
    # zero is a real mtime, not "missing"
    ({"goog-reserved-file-mtime": "0", "src_last_modified_millis": "400000"}, 0),
])
def test_mtime_precedence(meta: dict[str, str], expected_ns: int) -> None:
    assert decode(meta).mtime_ns == expected_ns


def test_mode_uid_gid_precedence() -> None:
    a = decode({"mode": "33261", "uid": "7", "gid": "8", "goog-reserved-posix-mode": "600",
                "goog-reserved-posix-uid": "1", "goog-reserved-posix-gid": "2"})
    assert (a.mode, a.uid, a.gid) == (stat.S_IFREG | 0o755, 7, 8)
    b = decode({"mode": "garbage", "uid": "-1", "gid": "x", "goog-reserved-posix-mode": "600",
                "goog-reserved-posix-uid": "1", "goog-reserved-posix-gid": "2"})
    assert (b.mode, b.uid, b.gid) == (stat.S_IFREG | 0o600, 1, 2)


def test_keys_are_case_insensitive() -> None:
    assert decode({"Mode": "33188", "UID": "5", "Gid": "6", "MTime": "1.5", "CTime": "2.5"}) == Attrs(
        stat.S_IFREG | 0o644, 5, 6, 1_500_000_000, 0, {}, ctime_ns=2_500_000_000)


def test_directory_marker_wins_over_file_mode() -> None:
    """A dir/ marker is a directory whatever its mode's type bits say (perms are kept)."""
    assert decode({"mode": "33188"}, is_dir=True).mode == stat.S_IFDIR | 0o644
    assert decode({"mode": "33188", "hdi_isfolder": "true"}, size=0).mode == stat.S_IFDIR | 0o644


def test_special_files_keep_their_type_and_device_number() -> None:
    """s3fs's mknod objects: the type in ``mode``, a device's number in ``rdev``."""
    for mode in (stat.S_IFIFO | 0o600, stat.S_IFCHR | 0o600, stat.S_IFBLK | 0o600, stat.S_IFSOCK | 0o600):
        attrs = decode({"mode": str(mode), "rdev": "259"}, size=1)
        assert attrs.mode == mode and attrs.size == 0
        assert attrs.rdev == (259 if stat.S_IFMT(mode) in (stat.S_IFCHR, stat.S_IFBLK) else 0)
        assert layout.encode(attrs).get("rdev") == ("259" if attrs.rdev else None)


def test_s3fs_legacy_directory_object_without_slash_is_a_file() -> None:
    """An object "dir" (no slash) with a directory mode is shown as a file: only the caller
    (listing: common prefix or dir/ marker) decides what is a directory."""
    assert decode({"mode": "16877"}, size=0).mode == stat.S_IFREG | 0o755


# --------------------------------------------------------------------------- mode rule

def _rule(text: str) -> int | None:
    """The rule as the issue states it, written independently of parse_mode."""
    if not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    if value <= 65535 and stat.S_IFMT(value) in layout._VALID_TYPES:
        return value
    try:
        value = int(text, 8)
    except ValueError:
        return None
    return value if value <= 0o177777 and stat.S_IFMT(value) in layout._VALID_TYPES | {0} else None


@pytest.mark.parametrize(("text", "expected"), [
    ("33188", 0o100644),  # s3fs file, decimal
    ("16877", 0o40755),   # s3fs dir, decimal
    ("41471", 0o120777),  # s3fs symlink, decimal
    ("100664", 0o100664), # rclone file, octal (decimal > 65535)
    ("120777", 0o120777), # rclone symlink, octal
    ("40755", 0o40755),   # rclone dir, octal (decimal 40755 has invalid type bits 0o110000)
    ("644", 0o644),       # gsutil perms only, octal (decimal 644 has no type bits)
    ("755", 0o755),
    ("0", 0),
    ("  33188\n", 0o100644),
    ("65535", 0o65535),   # decimal type bits 0o170000 are invalid: octal (S_IFBLK, shown as a file)
    ("999999", None),     # not decimal (> 65535), not octal (digits 9)
    ("1777777", None),    # octal, but more than 16 bits
    ("", None), ("-33188", None), ("+33188", None), ("0o644", None), ("0x81a4", None),
    ("33188.0", None), ("²", None), ("١٢٣", None), ("9" * 5000, None),
])
def test_parse_mode(text: str, expected: int | None) -> None:
    assert layout.parse_mode(text) == expected


def test_parse_mode_matches_rule_exhaustively() -> None:
    for n in range(0, 200_000):  # every decimal <= 65535 and every octal text <= 177777
        text = str(n)
        assert layout.parse_mode(text) == _rule(text), text


def test_every_s3fs_decimal_mode_reads_back() -> None:
    for ftype in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
        for perms in range(0o10000):
            mode = ftype | perms
            assert layout.parse_mode(str(mode), is_dir=ftype == stat.S_IFDIR) == mode


def test_every_rclone_octal_mode_reads_back() -> None:
    """rclone's octal text of a regular file or symlink is always > 65535 as a decimal, so it
    is unambiguous; for directories decode() passes is_dir, which settles 41xxx-44xxx."""
    for ftype, is_dir in ((stat.S_IFREG, False), (stat.S_IFLNK, False), (stat.S_IFDIR, True)):
        for perms in range(0o10000):
            mode = ftype | perms
            assert layout.parse_mode(format(mode, "o"), is_dir=is_dir) == mode, oct(mode)


# --------------------------------------------------------------------------- mtime parsing

@pytest.mark.parametrize(("text", "expected"), [
    ("1354040105.5", 1_354_040_105_500_000_000),       # rclone: NOT 5 ns
    ("1354040105.50", 1_354_040_105_500_000_000),
    ("1354040105.000000005", 1_354_040_105_000_000_005),
    ("1354040105.1234567891", 1_354_040_105_123_456_789),  # beyond ns: dropped
    ("1354040105.", 1_354_040_105 * NS),
    ("0", 0),
    ("-1.500000000", -500_000_000),  # s3fs "%ld.%09ld" of a normalized timespec
    ("-2", -2 * NS),
    ("", None), ("abc", None), ("1e9", None), ("NaN", None), ("inf", None), ("1,5", None),
    ("1354040105.5.5", None), ("0x10", None), ("²", None), ("9" * 13, None), ("1e999999", None),
])
def test_parse_epoch(text: str, expected: int | None) -> None:
    assert layout.parse_epoch(text) == expected


@pytest.mark.parametrize("text", [
    "", "garbage", "2023-13-01T00:00:00Z", "2023-01-01", "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z", "2023-01-01T00:00:00.123Zjunk", "\uff12\uff10\uff12\uff13-01-01T00:00:00Z",
])
def test_rfc3339_garbage_falls_back(text: str) -> None:
    assert decode({"gcsfuse_mtime": text}).mtime_ns == SERVER_NS


def test_rfc3339_without_offset_is_utc() -> None:
    assert decode({"gcsfuse_mtime": "2023-11-14T22:13:20.25"}).mtime_ns == 1_700_000_000_250_000_000


# --------------------------------------------------------------------------- garbage

GARBAGE = ["", " ", "garbage", "-", "1e999999", "9" * 5000, "NaN", "²", "١٢٣", "\x00", "0x10",
           "{}", "[" * 5000 + "]" * 5000, "%ZZ", "%7B%22a%22%3A1%7D", "yes", "18446744073709551616"]
KEYS = ["mode", "uid", "gid", "mtime", "xattr", "gcsfuse_mtime", "goog-reserved-file-mtime",
        "goog-reserved-posix-mode", "goog-reserved-posix-uid", "goog-reserved-posix-gid",
        "src_last_modified_millis", "hdi_isfolder", "is_symlink"]


@pytest.mark.parametrize("key", KEYS)
def test_garbage_values_fall_back_to_defaults(key: str) -> None:
    for value in GARBAGE:
        a = decode({key: value}, size=3)
        assert a == Attrs(stat.S_IFREG | 0o644, DEFAULT_UID, DEFAULT_GID, SERVER_NS, 3, {}), (key, value)


def test_uid_gid_out_of_range_fall_back() -> None:
    assert decode({"uid": "4294967296", "gid": "-5"}).uid == DEFAULT_UID
    assert decode({"uid": "4294967296", "gid": "-5"}).gid == DEFAULT_GID
    assert decode({"uid": "4294967295", "gid": " 0 "}).uid == 4294967295
    assert decode({"uid": "4294967295", "gid": " 0 "}).gid == 0


@pytest.mark.parametrize("text", [
    "%7B%22user.a%22%3A%22%21%21%21not-base64%22%7D",  # bad base64 is dropped, not raised
    "%7B%22user.a%22%3A1%7D", "%7B%22user.a%22%3Anull%7D", "%5B%5D", "%22str%22", "%7B", "",
    "%7B%22%5Cud800%22%3A%22%22%7D",  # a lone surrogate from a JSON escape
])
def test_xattr_garbage(text: str) -> None:
    assert layout.decode_xattrs(text) in ({}, {b"user.a": b""})


def test_non_string_metadata_values_are_ignored() -> None:
    assert decode({"mode": None, "uid": 5, "mtime": b"1"}, size=1) == Attrs(  # type: ignore[dict-item]
        stat.S_IFREG | 0o644, DEFAULT_UID, DEFAULT_GID, SERVER_NS, 1, {})


# --------------------------------------------------------------------------- writing

def test_encode_writes_s3fs_keys() -> None:
    a = Attrs(stat.S_IFREG | 0o640, 1000, 1001, 1_700_000_000_500_000_000, 10,
              {b"user.comment": b"hello world"})
    assert layout.encode(a) == {
        "mode": "33184",
        "uid": "1000",
        "gid": "1001",
        "mtime": "1700000000.500000000",
        "ctime": "1700000000.500000000",  # made without a ctime: its mtime
        "xattr": "%7B%22user.comment%22%3A%22aGVsbG8gd29ybGQ%3D%22%7D",
    }
    assert layout.encode(Attrs(stat.S_IFDIR | 0o755, 0, 0, 1_700_000_000 * NS))["mtime"] == (
        "1700000000.000000000")
    assert "xattr" not in layout.encode(Attrs(stat.S_IFREG | 0o644, 0, 0, 0))
    assert layout.encode(Attrs(stat.S_IFREG | 0o644, 0, 0, 5 * NS, ctime_ns=6 * NS + 1))["ctime"] == (
        "6.000000001")
    assert "atime" not in layout.encode(Attrs(stat.S_IFREG | 0o644, 0, 0, 5 * NS))  # never set
    assert layout.encode(Attrs(stat.S_IFREG | 0o644, 0, 0, 5 * NS, atime_ns=4 * NS + 3))["atime"] == (
        "4.000000003")


def test_ctime_falls_back_to_the_last_modified_time() -> None:
    """An object without a usable ``ctime`` has the store's last-modified time as ctime, as
    s3fs's get_ctime() reads it; with no such time either (a journal record), its mtime."""
    assert decode({"mtime": "1700000000"}, size=0).ctime == SERVER_NS
    assert decode({"mtime": "1700000000", "ctime": "soon"}, size=0).ctime == SERVER_NS
    assert decode({"ctime": "1700000001"}, size=0).ctime == 1_700_000_001 * NS
    assert decode({"mtime": "1700000000"}, size=0, server_mtime=None).ctime == 1_700_000_000 * NS


def test_encoded_values_are_ascii() -> None:
    """S3 and Azure metadata values must be ASCII."""
    meta = layout.encode(Attrs(stat.S_IFREG | 0o644, 0, 0, 0, 0,
                               {"user.ü".encode(): "ü".encode(), b"user.\xff\x00": b"\x00"}))
    assert all(v.isascii() for v in meta.values())


ROUND_TRIP = [
    Attrs(stat.S_IFREG | 0o644, 1000, 1000, 1_700_000_000 * NS, 42),
    Attrs(stat.S_IFREG | 0o4755, 0, 0, 1_354_040_105_500_000_000, 1),
    Attrs(stat.S_IFREG | 0o000, 4294967295, 65534, 1, 0),
    Attrs(stat.S_IFDIR | 0o1777, 0, 0, 1_700_000_000_000_000_001, 0),
    Attrs(stat.S_IFDIR | 0o2755, 5, 5, 0, 0, {b"user.x": b"y"}),
    Attrs(stat.S_IFLNK | 0o777, 1, 2, 1_700_000_000_999_999_999, 13),
    Attrs(stat.S_IFREG | 0o600, 1, 2, -1_500_000_000, 3),  # before the epoch
    Attrs(stat.S_IFREG | 0o600, 1, 2, 1_700_000_000 * NS, 3, ctime_ns=1_700_000_005 * NS + 9),
    Attrs(stat.S_IFREG | 0o600, 1, 2, 2**63 - 1, 3),
    Attrs(stat.S_IFREG | 0o600, 1, 2, 1_700_000_000 * NS, 3, atime_ns=-1_500_000_000),
    Attrs(stat.S_IFREG | 0o644, 1, 2, 3, 4, {b"user.bin": bytes(range(256)), b"user.empty": b"",
                                              "user.名前".encode(): b"v", b"user.\xff": b"\xff",
                                              b'user.q"uote,colon:': b"x"}),
]


def _round_trip(a: Attrs) -> Attrs:
    meta = layout.encode(a)
    return decode(meta, is_dir=a.is_dir, size=a.size)


@pytest.mark.parametrize("attrs", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_round_trip(attrs: Attrs) -> None:
    assert _round_trip(attrs) == attrs


@settings(max_examples=300, deadline=None)
@given(
    ftype=st.sampled_from([stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK]),
    perms=st.integers(0, 0o7777),
    uid=st.integers(0, 2**32 - 1),
    gid=st.integers(0, 2**32 - 1),
    mtime_ns=st.integers(-(2**63) + NS, 2**63 - 1),
    size=st.integers(0, 2**50),
    xattrs=st.dictionaries(st.binary(min_size=1, max_size=20), st.binary(max_size=40), max_size=4),
)
def test_round_trip_property(ftype: int, perms: int, uid: int, gid: int, mtime_ns: int, size: int,
                             xattrs: dict[bytes, bytes]) -> None:
    a = Attrs(ftype | perms, uid, gid, mtime_ns, 0 if ftype == stat.S_IFDIR else size, xattrs)
    meta = layout.encode(a)
    assert meta["mode"] == str(a.mode)
    whole, _, frac = meta["mtime"].partition(".")
    assert len(frac) == 9 and frac.isdigit() and whole.lstrip("-").isdigit()
    assert _round_trip(a) == a
