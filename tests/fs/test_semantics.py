"""tests that docs/semantics.md names: its claims through real mounts.

Each test proves one or a few sentences of docs/semantics.md by ordinary file calls, the
bucket as another tool sees it, and the requests the daemon sent (``cloudfs status --json``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from cloudfs.backends import open_backend
from cloudfs.daemon import _alive
from tests.fs.test_data_path import put_object, status
from tests.fs.test_integrity import stored, stored_keys
from tests.mounting import CLOUDFS, Mount, mounted, on_a_terminal
from tests.servers import Target

pytestmark = pytest.mark.backends("local", "s3")
MiB = 1024 * 1024
UPLOADS = ("put", "mpu_create", "mpu_part", "mpu_complete")


def requests(m: Mount) -> dict[str, int]:
    return dict(status(m)["requests"])


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


def head(target: Target, key: str) -> Any:
    backend = open_backend(target.url, target.options)
    try:
        return trio.run(backend.head, key)
    finally:
        backend.close()


@pytest.fixture
def slow(target: Target, tmp_path: Path) -> Iterator[Mount]:
    """A mount that uploads only at unmount: what is written stays pending meanwhile."""
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"writeback_delay": "1h"})
    m.start()
    yield m
    m.cleanup()


# ---------------------------------------------------------------------- writing
def test_write_lands_in_the_cache_and_sends_nothing(slow: Mount) -> None:
    data = os.urandom(3 * MiB)
    before = requests(slow)
    with open(slow.path / "f", "wb") as f:
        f.write(data)
    sent = delta(before, requests(slow))
    assert not [op for op in sent if op in UPLOADS], sent
    st = status(slow)
    assert st["cache"]["dirty_bytes"] >= len(data)
    assert st["uploads"]["pending_files"] == 1
    assert stored(slow.target, "f") is None
    slow.stop()
    assert stored(slow.target, "f") == data


def test_sync_upload_fsync_and_close_return_after_the_object_is_stored(target: Target, tmp_path: Path
                                                                       ) -> None:
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"sync_upload": "", "writeback_delay": "1h"})
    m.start()
    try:
        with open(m.path / "f", "wb") as f:
            f.write(b"fsynced")
            f.flush()
            os.fsync(f.fileno())
            assert stored(target, "f") == b"fsynced"
            f.write(b", then closed")
        assert stored(target, "f") == b"fsynced, then closed"
        assert status(m)["uploads"]["pending_files"] == 0
    finally:
        m.cleanup()


# ---------------------------------------------------------------------- reading
def test_random_reads_fetch_no_readahead_and_sequential_reads_do(target: Target, tmp_path: Path) -> None:
    data = os.urandom(48 * MiB)
    put_object(target, "big", data)
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"block_size": "4M", "readahead": "4"})
    m.start()
    try:
        fd = os.open(m.path / "big", os.O_RDONLY)
        try:
            for off in (30 * MiB + 100, 41 * MiB + 100, 46 * MiB + 100):  # blocks 7, 10, 11
                assert os.pread(fd, 4096, off) == data[off:off + 4096]
        finally:
            os.close(fd)
        st = status(m)
        assert st["cache"]["fetches"] == 3 and st["requests"]["get"] == 3, st
        with open(m.path / "big", "rb") as f:
            assert f.read(12 * MiB) == data[:12 * MiB]  # blocks 0-2; the kernel asks for up to 1 MiB more
        deadline = time.monotonic() + 20
        while status(m)["cache"]["fetches"] < 3 + 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status(m)["cache"]["fetches"] >= 3 + 5, "no block past what was read was fetched ahead"
    finally:
        m.cleanup()


@pytest.mark.backends("s3")
def test_listing_reuses_attributes_for_dir_cache_time(target: Target, tmp_path: Path) -> None:
    """S3 listings carry no metadata: a listing repeated within dir_cache_time sends no HEAD
    (and no LIST: the folder's listing is kept).
    A metadata-only change by another tool (same ETag) shows on stat after attr_timeout and
    in listings after dir_cache_time.  (The mount's root is listed: it needs no lookup.)"""
    bucket = target.url[5:]
    for i in range(5):
        target.sdk.put_object(Bucket=bucket, Key=f"f{i}", Body=b"x" * i)
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"dir_cache_time": "12", "attr_timeout": "2"})
    m.start()
    try:
        first = time.monotonic()
        with os.scandir(m.path) as it:  # ls -l
            assert sorted(e.name for e in it if e.stat(follow_symlinks=False)) == [f"f{i}" for i in range(5)]
        assert requests(m).get("head", 0) >= 5
        time.sleep(2.2)  # attr_timeout passed; the kept listing answers (dir_cache_time)
        before = requests(m)
        assert len(os.listdir(m.path)) == 5
        sent = delta(before, requests(m))
        assert sent == {}, sent  # no LIST, no HEAD
        etag = target.sdk.head_object(Bucket=bucket, Key="f0")["ETag"]
        for key in ("f0", "f1"):  # a chmod by another tool: metadata only
            target.sdk.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": key},
                                   Metadata={"mode": str(stat.S_IFREG | 0o600)}, MetadataDirective="REPLACE")
        assert target.sdk.head_object(Bucket=bucket, Key="f0")["ETag"] == etag
        time.sleep(2.2)  # attr_timeout
        assert stat.S_IMODE(os.stat(m.path / "f1").st_mode) == 0o600
        time.sleep(max(0.0, first + 12.5 - time.monotonic()))  # dir_cache_time
        before = requests(m)
        with os.scandir(m.path) as it:
            modes = {e.name: stat.S_IMODE(e.stat(follow_symlinks=False).st_mode) for e in it}
        assert delta(before, requests(m)).get("head", 0) >= 1  # the listing asked again
        assert modes["f0"] == 0o600 and modes["f2"] == 0o644
    finally:
        m.cleanup()


# ---------------------------------------------------------------------- names
def test_rename_of_a_stored_file_copies_server_side(slow: Mount) -> None:
    """The object is copied on the store (nothing downloaded or sent again) and the old one
    deleted; local changes not yet uploaded move with the file."""
    data = os.urandom(2 * MiB)
    put_object(slow.target, "a", data)
    time.sleep(1.2)  # attr_timeout: the mount sees the new object
    assert (slow.path / "a").stat().st_size == len(data)
    assert not (slow.path / "b").exists()
    before = requests(slow)
    os.rename(slow.path / "a", slow.path / "b")
    sent = delta(before, requests(slow))
    assert [op for op in sent if "copy" in op] and [op for op in sent if "delete" in op], sent
    assert not [op for op in sent if op in UPLOADS or op == "get"], sent
    assert stored(slow.target, "b") == data and stored(slow.target, "a") is None
    with open(slow.path / "b", "ab") as f:
        f.write(b"+pending")
    os.rename(slow.path / "b", slow.path / "c")
    slow.stop()
    assert stored(slow.target, "c") == data + b"+pending"
    assert stored_keys(slow.target) == ["c"]


def test_directory_rename_keeps_folder_attributes(slow: Mount) -> None:
    (slow.path / "d" / "sub").mkdir(parents=True)
    os.chmod(slow.path / "d", 0o750)
    os.chmod(slow.path / "d" / "sub", 0o700)
    (slow.path / "d" / "sub" / "f").write_bytes(b"f")
    slow.remount()
    os.rename(slow.path / "d", slow.path / "e")
    slow.remount()
    assert stat.S_IMODE((slow.path / "e").stat().st_mode) == 0o750
    assert stat.S_IMODE((slow.path / "e" / "sub").stat().st_mode) == 0o700
    assert (slow.path / "e" / "sub" / "f").read_bytes() == b"f"
    assert not [k for k in stored_keys(slow.target) if k == "d" or k.startswith("d/")]


def test_unlink_deletes_the_object_at_once(slow: Mount) -> None:
    put_object(slow.target, "gone", b"stored")
    time.sleep(1.2)  # attr_timeout
    assert (slow.path / "gone").read_bytes() == b"stored"
    os.unlink(slow.path / "gone")
    assert stored(slow.target, "gone") is None  # before any unmount


def test_non_utf8_names_fail_with_einval(mnt: Mount) -> None:
    base = os.fsencode(mnt.path)
    for call in (lambda p: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)), os.mkdir,
                 lambda p: os.symlink(b"target", p)):
        with pytest.raises(OSError) as exc:
            call(base + b"/bad-\xff\xfe")
        assert exc.value.errno == errno.EINVAL
    assert os.listdir(mnt.path) == []


def test_hard_links_fail_with_eperm(mnt: Mount) -> None:
    (mnt.path / "a").write_text("a")
    with pytest.raises(OSError) as exc:
        os.link(mnt.path / "a", mnt.path / "b")
    assert exc.value.errno == errno.EPERM
    assert os.listdir(mnt.path) == ["a"]


# ---------------------------------------------------------------------- attributes
def test_objects_without_metadata_show_defaults_and_the_mount_uid_gid(target: Target, tmp_path: Path) -> None:
    put_object(target, "plain", b"no metadata")
    put_object(target, "implicit/inner", b"in a folder without a marker")
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"uid": "1234", "gid": "5678"})
    m.start()
    try:
        st = (m.path / "plain").stat()
        assert st.st_mode == stat.S_IFREG | 0o644
        assert (st.st_uid, st.st_gid) == (1234, 5678)
        assert abs(st.st_mtime - head(target, "plain").mtime) < 0.001  # the server's last-modified
        st = (m.path / "implicit").stat()
        assert st.st_mode == stat.S_IFDIR | 0o755 and (st.st_uid, st.st_gid) == (1234, 5678)
    finally:
        m.cleanup()


def test_atime_is_what_utime_set_and_reads_do_not_move_it(mnt: Mount) -> None:
    """Never set, atime reads as the mtime; set by utime, it is stored (s3fs's ``atime``
    key), independently of the mtime, and survives a remount; reads do not move it."""
    p = mnt.path / "t"
    p.write_bytes(b"x")
    st = p.stat()
    assert st.st_atime_ns == st.st_mtime_ns
    atime, mtime = 1_000_000_000 * 10**9 + 5, 1_600_000_000 * 10**9
    os.utime(p, ns=(atime, mtime))
    assert (p.stat().st_atime_ns, p.stat().st_mtime_ns) == (atime, mtime)
    assert p.read_bytes() == b"x"
    assert p.stat().st_atime_ns == atime
    os.utime(p, ns=(atime, mtime + 7))  # the mtime alone moves
    mnt.remount()
    st = p.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime + 7)
    mnt.stop()
    metadata = {k.lower(): v for k, v in (head(mnt.target, "t").metadata or {}).items()}
    assert metadata["atime"] == "1000000000.000000005"


@pytest.mark.backends("s3")  # a file:// URL names the bucket directory: it has no prefix
def test_root_attributes_on_a_prefix_mount_are_stored(target: Target, tmp_path: Path) -> None:
    prefixed = dataclasses.replace(target, url=target.url.rstrip("/") + "/pfx")
    m = Mount(prefixed, tmp_path / "mnt", tmp_path / "cache")
    m.start()
    try:
        os.chmod(m.path, 0o700)
        os.chown(m.path, 1234, 5678)
        os.setxattr(m.path, "user.k", b"v")
        m.remount()
        st = m.path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and (st.st_uid, st.st_gid) == (1234, 5678)
        assert os.getxattr(m.path, "user.k") == b"v"
    finally:
        m.cleanup()


def test_statfs_reports_a_large_fixed_capacity(mnt: Mount) -> None:
    before = os.statvfs(mnt.path)
    assert before.f_blocks * before.f_frsize >= 2**40
    assert before.f_bavail == before.f_bfree == before.f_blocks
    (mnt.path / "f").write_bytes(os.urandom(MiB))
    after = os.statvfs(mnt.path)
    fields = ("f_blocks", "f_bavail", "f_frsize")
    assert [getattr(after, f) for f in fields] == [getattr(before, f) for f in fields]


# ---------------------------------------------------------------------- unmount
def test_plain_fusermount_unmounts_at_once_and_the_daemon_uploads_before_exit(slow: Mount) -> None:
    data = os.urandom(MiB)
    (slow.path / "late").write_bytes(data)
    pid = slow.pid()
    assert pid
    subprocess.run(["fusermount3", "-u", str(slow.path)], check=True, timeout=30)
    assert not mounted(slow.path)
    deadline = time.monotonic() + 120
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)
    assert stored(slow.target, "late") == data


def test_umount_gets_the_kernels_dirty_pages_to_the_store(slow: Mount) -> None:
    """Written data the kernel still holds (write-back caching: nothing sent to the daemon
    until writeback) reaches the store.  The file stays open, so the unmount is --lazy.
    (The kernel also writes back on the detach, so this does not tell syncfs apart.)"""
    data = os.urandom(256 * 1024)
    fd = os.open(slow.path / "dirty", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, data) == len(data)
        proc = subprocess.run([CLOUDFS, "umount", "--lazy", str(slow.path)], env=slow.env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert stored(slow.target, "dirty") == data
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)  # the mount process is gone


@pytest.mark.backends("s3")
def test_umount_shows_upload_progress_on_a_terminal(slow: Mount) -> None:
    data = os.urandom(96 * MiB)  # enough that the upload is still running when umount polls
    (slow.path / "big").write_bytes(data)
    assert status(slow)["uploads"]["pending_bytes"] == len(data)
    out = on_a_terminal([CLOUDFS, "umount", str(slow.path)], slow.env, timeout=300)
    assert b"uploading before unmount" in out, out
    assert stored(slow.target, "big") == data


def test_a_listing_has_dot_and_dotdot_with_the_folders_own_inode_numbers(
        target: Target, tmp_path: Path) -> None:
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache")
    m.start()
    try:
        (m.path / "d").mkdir()
        (m.path / "d" / "f").write_bytes(b"x")
        out = subprocess.run(["ls", "-1ai", str(m.path / "d")], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        listed = {name: int(ino) for ino, name in (line.split(None, 1) for line in out.splitlines())}
        assert sorted(listed) == [".", "..", "f"]
        assert listed["."] == os.stat(m.path / "d").st_ino
        assert listed[".."] == os.stat(m.path).st_ino
        assert listed["f"] == os.stat(m.path / "d" / "f").st_ino
    finally:
        m.cleanup()
