"""Requests the metadata path sends, through real mounts (docs/semantics.md, "Reading" and
"Names"): kept folder listings (``dir_cache_time``), creates in folders whose names are known,
and the persistent metadata record that spares HEADs after a remount.

Counts come from ``cloudfs status --json`` (every request the daemon sent), never timings.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
import trio

from cloudfs.backends import Payload, open_backend
from tests.fs.test_data_path import status
from tests.mounting import Mount
from tests.servers import Target

pytestmark = pytest.mark.backends("local", "s3")
LOOKUPS = ("head", "list_page")


def requests(m: Mount) -> dict[str, int]:
    return dict(status(m)["requests"])


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


def put_many(target: Target, keys: list[str], data: bytes = b"x") -> None:
    """Objects written by another tool (no cloudfs metadata)."""
    backend = open_backend(target.url, target.options)

    async def fill() -> None:
        limit = trio.CapacityLimiter(16)

        async def one(key: str) -> None:
            async with limit:
                await backend.put(key, Payload.from_bytes(data), {})

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(one, key)

    try:
        trio.run(fill)
    finally:
        backend.close()


def ls_l(path: Path) -> dict[str, os.stat_result]:
    """What `ls -l` does: readdir, then lstat of every entry."""
    with os.scandir(path) as it:
        return {e.name: e.stat(follow_symlinks=False) for e in it}


# ---------------------------------------------------------------------- kept listings
def test_a_warm_ls_l_sends_no_request(target: Target, tmp_path: Path) -> None:
    """A folder listed completely (two LIST pages) is answered from the kept listing for
    dir_cache_time: a second `ls -l`, after attr_timeout (1 s) has passed, sends no LIST and
    no HEAD, also for its subfolders (looked up once by the first `ls -l`), and after the
    kernel forgot it all."""
    names = [f"f{i:04d}" for i in range(1100)]
    put_many(target, [f"d/{n}" for n in names] + ["d/sub/x", "d/sub2/"])  # and two folders
    names += ["sub", "sub2"]
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache")
    m.start()
    try:
        assert sorted(ls_l(m.path / "d")) == names
        time.sleep(1.3)  # attr_timeout: the kernel's and cloudfs's attributes expired
        before = requests(m)
        for _ in range(3):
            assert sorted(ls_l(m.path / "d")) == names
        sent = delta(before, requests(m))
        assert not [op for op in sent if op in LOOKUPS], sent
        Path("/proc/sys/vm/drop_caches").write_text("2")  # the kernel forgets the inodes too
        before = requests(m)
        assert sorted(ls_l(m.path / "d")) == names
        sent = delta(before, requests(m))
        assert not [op for op in sent if op in LOOKUPS], sent
    finally:
        m.cleanup()


def test_the_kept_listing_follows_this_mounts_own_changes(target: Target, tmp_path: Path) -> None:
    """create, mkdir, symlink, unlink, rmdir, rename in and out of the folder: the kept listing
    shows each at once, with no LIST; an unlinked name never comes back."""
    put_many(target, ["d/a", "d/b", "d/gone", "other/x"])
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"writeback_delay": "0.2"})
    m.start()
    try:
        d = m.path / "d"
        assert sorted(os.listdir(d)) == ["a", "b", "gone"]
        assert sorted(os.listdir(m.path / "other")) == ["x"]
        time.sleep(1.3)  # attr_timeout
        (d / "new").write_bytes(b"new")
        os.mkdir(d / "sub")
        os.symlink("a", d / "link")
        os.unlink(d / "gone")
        os.rename(d / "b", d / "b2")
        os.rename(m.path / "other" / "x", d / "x")
        os.rename(d / "a", m.path / "other" / "a")
        os.mkdir(d / "empty")
        os.rmdir(d / "empty")
        expected = ["b2", "link", "new", "sub", "x"]
        before = requests(m)
        assert sorted(os.listdir(d)) == expected
        assert sorted(os.listdir(m.path / "other")) == ["a"]
        assert "list_page" not in delta(before, requests(m))
        time.sleep(1.0)  # the new file is uploaded meanwhile
        assert status(m)["uploads"]["pending_files"] == 0
        assert sorted(os.listdir(d)) == expected
        assert not (d / "gone").exists()
    finally:
        m.cleanup()


def test_other_tools_changes_show_up_after_dir_cache_time(target: Target, tmp_path: Path) -> None:
    """Another tool adds and deletes objects in a listed folder: the kept listing answers as
    before until dir_cache_time (3 s here) has passed, then the folder is listed again."""
    put_many(target, ["d/old", "d/stays"])
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"dir_cache_time": "3"})
    m.start()
    try:
        assert sorted(os.listdir(m.path / "d")) == ["old", "stays"]
        listed = time.monotonic()
        put_many(target, ["d/theirs"])
        backend = open_backend(target.url, target.options)
        try:
            trio.run(backend.delete, "d/old")
        finally:
            backend.close()
        time.sleep(1.3)  # attr_timeout: only the kept listing remembers now
        assert sorted(os.listdir(m.path / "d")) == ["old", "stays"]
        assert not (m.path / "d" / "theirs").exists()  # not in the listing: missing, no request
        time.sleep(max(0.0, listed + 3.2 - time.monotonic()))
        before = requests(m)
        assert sorted(os.listdir(m.path / "d")) == ["stays", "theirs"]
        assert delta(before, requests(m)).get("list_page", 0) >= 1
        assert (m.path / "d" / "theirs").read_bytes() == b"x"
    finally:
        m.cleanup()


# ---------------------------------------------------------------------- creates
def test_creates_in_a_folder_whose_names_are_known_send_no_lookup(target: Target, tmp_path: Path) -> None:
    """Creating files in a folder made here, or listed here, long after attr_timeout (1 s)
    but within dir_cache_time: no HEAD and no LIST per create (the uploads come later)."""
    put_many(target, ["listed/a"])
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"writeback_delay": "1h"})
    m.start()
    try:
        os.mkdir(m.path / "made")
        assert os.listdir(m.path / "listed") == ["a"]
        time.sleep(1.5)  # past attr_timeout
        before = requests(m)
        for folder in ("made", "listed"):
            for i in range(20):
                (m.path / folder / f"n{i}").write_bytes(b"new")
        sent = delta(before, requests(m))
        assert not [op for op in sent if op in LOOKUPS], sent
        assert len(os.listdir(m.path / "made")) == 20 and len(os.listdir(m.path / "listed")) == 21
    finally:
        m.cleanup()


def test_a_create_racing_another_tool_in_a_listed_folder_keeps_both(target: Target, tmp_path: Path
                                                                   ) -> None:
    """The listing says the name is free, but another tool made it meanwhile: the upload's
    HEAD finds their object, theirs keeps the name and ours becomes a conflict copy."""
    put_many(target, ["d/a"])
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"writeback_delay": "1h"})
    m.start()
    try:
        assert os.listdir(m.path / "d") == ["a"]
        put_many(target, ["d/race"], b"theirs")
        time.sleep(1.3)  # attr_timeout
        (m.path / "d" / "race").write_bytes(b"ours")
        m.stop()
        backend = open_backend(target.url, target.options)
        try:
            keys = [o.key for page in [trio.run(backend.list_page, "d/", "/", None, 100)]
                    for o in page.objects]
            copies = [k for k in keys if k.startswith("d/race.conflict-")]
            assert len(copies) == 1, keys
            assert trio.run(backend.get_range, "d/race") == b"theirs"
            assert trio.run(backend.get_range, copies[0]) == b"ours"
        finally:
            backend.close()
    finally:
        m.cleanup()


def test_kept_listing_attributes_are_the_listings(target: Target, tmp_path: Path) -> None:
    """A kept listing answers `ls -l` with the attributes it had (a chmod here shows at once)."""
    put_many(target, ["d/f"])
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache")
    m.start()
    try:
        assert stat.S_IMODE(ls_l(m.path / "d")["f"].st_mode) == 0o644
        os.chmod(m.path / "d" / "f", 0o600)
        time.sleep(1.3)
        assert stat.S_IMODE(ls_l(m.path / "d")["f"].st_mode) == 0o600
    finally:
        m.cleanup()


# ---------------------------------------------------------------------- the persistent record
@pytest.mark.backends("s3")
def test_a_remount_lists_unchanged_objects_without_heads(target: Target, tmp_path: Path) -> None:
    """S3 listings carry no metadata: the first `ls -l` HEADs every object, and records the
    results in the cache directory (metadata.db, 0600).  After unmount and remount with the
    same cache directory, `ls -l` sends LISTs only; an object changed by another tool (new
    ETag) is HEADed again, and shows its new attributes."""
    bucket = target.url[5:]
    names = [f"f{i:02d}" for i in range(40)]
    for n in names:
        target.sdk.put_object(Bucket=bucket, Key=n, Body=b"x", Metadata={"mode": str(stat.S_IFREG | 0o640)})
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache")
    m.start()
    try:
        before = requests(m)
        assert {n: stat.S_IMODE(s.st_mode) for n, s in ls_l(m.path).items()} == dict.fromkeys(names, 0o640)
        assert delta(before, requests(m)).get("head", 0) == len(names)
        m.remount()
        db = m.cache_dir / "metadata.db"
        assert stat.S_IMODE(db.stat().st_mode) == 0o600
        before = requests(m)
        assert {n: stat.S_IMODE(s.st_mode) for n, s in ls_l(m.path).items()} == dict.fromkeys(names, 0o640)
        sent = delta(before, requests(m))
        assert sent.get("head", 0) == 0 and sent.get("list_page", 0) >= 1, sent
        target.sdk.put_object(Bucket=bucket, Key="f07", Body=b"changed",
                              Metadata={"mode": str(stat.S_IFREG | 0o600)})
        m.remount()
        before = requests(m)
        modes = {n: stat.S_IMODE(s.st_mode) for n, s in ls_l(m.path).items()}
        assert modes["f07"] == 0o600 and modes["f06"] == 0o640
        assert delta(before, requests(m)).get("head", 0) == 1
    finally:
        m.cleanup()


def test_a_remount_lists_files_this_mount_uploaded_without_heads(target: Target, tmp_path: Path) -> None:
    """What the mount uploaded is recorded with its ETag and attributes as it stored them: after
    a remount with the same cache directory, `ls -l` of those files sends LISTs only, and shows
    the attributes they were stored with."""
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache")
    m.start()
    try:
        for i in range(30):
            (m.path / f"f{i:02d}").write_bytes(b"y" * i)
            os.chmod(m.path / f"f{i:02d}", 0o600 + (i % 8))
        os.utime(m.path / "f03", (1_600_000_000, 1_600_000_000))
        m.remount()  # the unmount uploads everything first
        before = requests(m)
        listed = ls_l(m.path)  # the root: no folder lookup to count
        sent = delta(before, requests(m))
        assert {n: (s.st_size, stat.S_IMODE(s.st_mode)) for n, s in listed.items()} == {
            f"f{i:02d}": (i, 0o600 + (i % 8)) for i in range(30)}
        assert listed["f03"].st_mtime == 1_600_000_000
        assert sent.get("head", 0) == 0 and sent.get("list_page", 0) >= 1, sent
    finally:
        m.cleanup()


# ---------------------------------------------------------------------- requests from the kernel
def test_ls_l_asks_for_security_labels_and_acls_once(target: Target, tmp_path: Path) -> None:
    """``ls -l`` asks every entry for its SELinux label and ACL; the ENOTSUP answer for those
    namespaces (never stored) tells it the mount has none, so 40 entries cost a few
    GETXATTR requests, not two each, while ``user.*`` xattrs keep working."""
    put_many(target, [f"d/f{i:02d}" for i in range(40)])
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"debug": ""})
    m.start()
    try:
        os.setxattr(m.path / "d" / "f00", "user.note", b"kept")
        out = subprocess.run(["ls", "-l", str(m.path / "d")], capture_output=True, text=True, check=True)
        assert len(out.stdout.splitlines()) == 41  # "total" + 40 entries
        assert os.getxattr(m.path / "d" / "f00", "user.note") == b"kept"
        with pytest.raises(OSError) as exc:
            os.getxattr(m.path / "d" / "f01", "security.selinux")
        assert exc.value.errno == errno.ENOTSUP
        m.stop()
    finally:
        m.kill()
    log = (tmp_path / "cache" / "cloudfs.log").read_text(errors="replace")
    asked = [line for line in log.splitlines() if "fuse getxattr(" in line]
    assert 3 <= len(asked) <= 6, asked  # the two above, and ls's first label and ACL probes
