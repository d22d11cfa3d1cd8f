"""Nothing acknowledged is lost, through real mounts: everyday programs' patterns that lost
data before the ownership redesign (issue 10's list), each as ordinary file calls.

Run on the local backend and on S3 (moto); the in-process tier (tests/vfs/) has the same
cases with failures that point at a line.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
import trio

from cloudfs.backends import open_backend
from cloudfs.backends.errors import NotFound
from tests.mounting import CLOUDFS, Mount, mounted
from tests.servers import Target

pytestmark = pytest.mark.backends("local", "s3")
MiB = 1024 * 1024


def stored(target: Target, key: str) -> bytes | None:
    backend = open_backend(target.url, target.options)
    try:
        return trio.run(backend.get_range, key)
    except NotFound:
        return None
    finally:
        backend.close()


def stored_keys(target: Target) -> list[str]:
    backend = open_backend(target.url, target.options)

    async def keys() -> list[str]:
        out: list[str] = []
        async for page in backend.list("", None):
            out += [o.key for o in page.objects]
        return sorted(out)

    try:
        return trio.run(keys)
    finally:
        backend.close()


@pytest.fixture
def slow(target: Target, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A mount that uploads only when asked (unmount): what is pending stays pending."""
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"writeback_delay": "1h"})
    m.start()
    yield m
    m.cleanup()


def test_atomic_save_while_a_reader_holds_the_file(slow: Mount) -> None:
    """Case 1: write a temp file, rename it over f while f is open for reading."""
    f = slow.path / "f"
    f.write_bytes(b"old" * 1000)
    with open(f, "rb") as reader:
        assert reader.read(3) == b"old"
        (slow.path / "f.tmp").write_bytes(b"new content")
        os.rename(slow.path / "f.tmp", f)
        assert reader.read() == b"old" * 999
    assert f.read_bytes() == b"new content"
    slow.remount()
    assert f.read_bytes() == b"new content"
    assert stored(slow.target, "f") == b"new content"


def test_rm_and_recreate_with_an_old_handle_open_survives_sigkill(slow: Mount) -> None:
    """Case 1: ``rm f; echo new > f`` while an old handle is open, then a crash."""
    f = slow.path / "f"
    f.write_bytes(b"first")
    slow.remount()
    with open(f, "rb") as old:
        f.unlink()
        f.write_bytes(b"second")
        assert old.read() == b"first"
    slow.kill()
    slow.start()
    assert f.read_bytes() == b"second"
    slow.stop()
    assert stored(slow.target, "f") == b"second"


def test_mv_of_a_folder_under_a_writer(slow: Mount) -> None:
    """Case 3: ``mv d e`` while d/f is written and fsync'd."""
    (slow.path / "d").mkdir()
    (slow.path / "d" / "f").write_bytes(b"v1")
    slow.remount()
    with open(slow.path / "d" / "f", "r+b") as w:
        w.write(b"v2")
        w.flush()
        os.fsync(w.fileno())
        os.rename(slow.path / "d", slow.path / "e")
        w.write(b"+more")
        w.flush()
        os.fsync(w.fileno())
    slow.stop()
    keys = stored_keys(slow.target)
    assert stored(slow.target, "e/f") == b"v2+more"
    assert not [k for k in keys if k.startswith("d/") or "conflict" in k], keys


def test_drop_caches_keeps_pending_changes(slow: Mount) -> None:
    """Case 5: the kernel forgets inodes with pending changes (memory pressure)."""
    (slow.path / "d").mkdir()
    a = slow.path / "a"
    a.write_bytes(b"stored")
    slow.remount()
    with open(a, "ab") as f:
        f.write(b"+pending")
    os.chmod(a, 0o600)
    (slow.path / "d" / "new").write_bytes(b"only here")
    Path("/proc/sys/vm/drop_caches").write_text("2")
    st = a.stat()
    assert st.st_size == len(b"stored+pending")
    assert stat.S_IMODE(st.st_mode) == 0o600
    with open(a, "ab") as f:
        f.write(b"!")
    assert a.read_bytes() == b"stored+pending!"
    assert os.listdir(slow.path / "d") == ["new"]
    with pytest.raises(OSError) as exc:
        os.rmdir(slow.path / "d")
    assert exc.value.errno == errno.ENOTEMPTY
    slow.stop()
    assert stored(slow.target, "a") == b"stored+pending!"
    assert stored(slow.target, "d/new") == b"only here"


def test_append_to_a_name_another_tool_created_meanwhile(slow: Mount) -> None:
    """Case 7: ``echo x >> log`` while the kernel holds a negative entry for ``log``."""
    log = slow.path / "log"
    assert not log.exists()
    backend = open_backend(slow.target.url, slow.target.options)
    try:
        from cloudfs.backends import Payload
        trio.run(backend.put, "log", Payload.from_bytes(b"theirs\n"))
    finally:
        backend.close()
    with open(log, "ab") as f:
        f.write(b"mine\n")
    slow.stop()
    assert stored(slow.target, "log") == b"theirs\nmine\n"


def test_chmod_and_utime_after_writing_survive_sigkill(slow: Mount) -> None:
    """Case 8: ``cp -p``/``rsync -a`` set attributes right after writing; then a crash."""
    f = slow.path / "f"
    f.write_bytes(b"data")
    os.chmod(f, 0o640)
    os.utime(f, ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    slow.kill()
    slow.start()
    st = f.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime_ns == 1_600_000_000 * 10**9
    slow.remount()
    assert stat.S_IMODE(f.stat().st_mode) == 0o640


def test_unlinked_open_files_keep_working(slow: Mount) -> None:
    """Case 9: the create-then-unlink temp file, and a stored file unlinked while open."""
    data = os.urandom(20 * MiB)
    big = slow.path / "big"
    big.write_bytes(data)
    slow.remount()  # now stored, nothing cached
    with open(big, "r+b") as f:
        big.unlink()
        f.seek(17 * MiB)
        assert f.read(MiB) == data[17 * MiB:18 * MiB]
        f.seek(30 * MiB)
        f.write(b"tail")
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        assert f.read(MiB) == data[:MiB]
    with open(slow.path / "tmp", "w+b") as t:
        os.unlink(slow.path / "tmp")
        t.write(b"scratch" * 10_000)
        t.flush()
        os.fsync(t.fileno())
        t.seek(0)
        assert t.read(7) == b"scratch"
    assert os.listdir(slow.path) == []
    slow.stop()
    assert stored_keys(slow.target) == []


def test_unlinked_open_file_is_not_resurrected_after_sigkill(slow: Mount) -> None:
    """Case 10: SIGKILL while an unlinked file is open."""
    (slow.path / "gone").write_bytes(os.urandom(MiB))
    slow.remount()
    f = open(slow.path / "gone", "r+b")
    try:
        f.write(b"changed")
        f.flush()
        os.unlink(slow.path / "gone")
        os.fsync(f.fileno())
        slow.kill()
    finally:
        try:
            f.close()
        except OSError:
            pass  # the mount is gone
    slow.start()
    assert os.listdir(slow.path) == []
    slow.stop()
    assert stored_keys(slow.target) == []


def test_umount_refuses_a_busy_mount_and_lazy_detaches(slow: Mount) -> None:
    """Case 12: ``cloudfs umount`` of a mount with an open file names the holder, exits 16,
    and leaves the mount alone; ``--lazy`` detaches it and the data still goes up."""
    f = open(slow.path / "open", "wb")
    try:
        f.write(b"still being written")
        proc = subprocess.run([CLOUDFS, "umount", str(slow.path)], env=slow.env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 16, proc.stderr
        assert f"pid {os.getpid()}" in proc.stderr and "--lazy" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert mounted(slow.path)
        f.flush()
    finally:
        f.close()
    proc = subprocess.run([CLOUDFS, "umount", "--lazy", str(slow.path)], env=slow.env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not mounted(slow.path)
    assert stored(slow.target, "open") == b"still being written"


@pytest.mark.backends("local")
def test_cache_dir_of_another_store_is_refused(target: Target, tmp_path: Path) -> None:
    """Case 4: a cache directory reused for another bucket never uploads into it."""
    first = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"writeback_delay": "1h"})
    first.start()
    try:
        (first.path / "pending").write_bytes(b"belongs to the first bucket")
        first.kill()
    finally:
        first.cleanup()
    other_root = tmp_path / "other"
    other_root.mkdir()
    other = Target("local", f"file://{other_root}", extra={"root": other_root})
    proc = subprocess.run([CLOUDFS, "mount", other.url, str(tmp_path / "mnt"),
                           "-o", f"cache_dir={tmp_path / 'cache'}"], capture_output=True, text=True,
                          timeout=60)
    try:
        assert proc.returncode == 2, proc.stderr
        assert "belongs to" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert stored_keys(other) == []
    finally:
        if mounted(tmp_path / "mnt"):
            subprocess.run(["fusermount3", "-uz", str(tmp_path / "mnt")], capture_output=True)
    first.start()  # the right store gets it
    first.stop()
    assert stored(target, "pending") == b"belongs to the first bucket"


def put_other(target: Target, key: str, data: bytes) -> None:
    """Another tool writes ``key`` on the store."""
    from cloudfs.backends import Payload

    backend = open_backend(target.url, target.options)
    try:
        trio.run(backend.put, key, Payload.from_bytes(data))
    finally:
        backend.close()


def test_rename_foreign_object_over_open_file(slow: Mount) -> None:
    """Case 2: ``mv g f`` while f is open and g was made by another tool (no cache entry
    here): what is written through the old f handle never reaches the renamed-in file."""
    f = slow.path / "f"
    f.write_bytes(b"old f " * 100)
    slow.remount()
    put_other(slow.target, "g", b"from another tool")
    with open(f, "r+b") as old:
        assert old.read(6) == b"old f "
        os.rename(slow.path / "g", f)
        old.seek(0)
        old.write(b"XXXXXX")
        old.flush()
        os.fsync(old.fileno())
        old.seek(0)
        assert old.read(12) == b"XXXXXXold f "
        assert f.read_bytes() == b"from another tool"
    assert f.read_bytes() == b"from another tool"
    slow.stop()
    assert stored_keys(slow.target) == ["f"]
    assert stored(slow.target, "f") == b"from another tool"


def test_cache_dir_reused_with_another_block_size(target: Target, tmp_path: Path) -> None:
    """Case 4: the recorded block size wins over another ``-o block_size``; a 1-byte edit
    changes one byte on the store, pending across a crash or not."""
    data = bytearray(os.urandom(3 * MiB + 12345))
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache",
              {"writeback_delay": "1h", "block_size": "1M", "cache_size": "16M"})
    try:
        m.start()
        (m.path / "f").write_bytes(data)
        m.stop()
        m.options["block_size"] = "256K"
        m.start()
        assert (m.path / "f").read_bytes() == data  # the cached 1M blocks, read right
        with open(m.path / "f", "r+b") as f:
            f.seek(MiB + MiB // 2 + 7)
            f.write(b"!")
            f.flush()
            os.fsync(f.fileno())
        data[MiB + MiB // 2 + 7] = ord("!")
        m.kill()
        m.options["block_size"] = "2M"
        m.start()
        assert (m.path / "f").read_bytes() == data
        m.stop()
        assert stored(target, "f") == data
    finally:
        m.cleanup()


def test_new_open_sees_a_changed_object_while_another_handle_is_open(slow: Mount) -> None:
    """Case 14, close-to-open: a new open revalidates with the store even while an older
    handle is open, and the older handle keeps reading its version."""
    f = slow.path / "f"
    f.write_bytes(b"one")
    slow.remount()
    with open(f, "rb") as old:
        assert old.read() == b"one"
        put_other(slow.target, "f", b"two!")
        time.sleep(1.5)  # attr_timeout=1 passes: not an assertion on timing
        with open(f, "rb") as new:
            assert new.read() == b"two!"
        old.seek(0)
        assert old.read() == b"one"
    assert f.read_bytes() == b"two!"


RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4


def renameat2(src: Path, dst: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src))


def test_root_attributes_are_refused_or_stored(slow: Mount) -> None:
    """Case 17: the bucket root has nothing to store attributes in (EPERM); rename flags
    other than RENAME_NOREPLACE and xattrs of other namespaces are refused."""
    for call in (lambda: os.chmod(slow.path, 0o700),
                 lambda: os.chown(slow.path, 1234, 1234),
                 lambda: os.setxattr(slow.path, "user.note", b"x")):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EPERM
    a, b = slow.path / "a", slow.path / "b"
    a.write_bytes(b"x")
    b.write_bytes(b"y")
    for flags, dst in ((RENAME_WHITEOUT, slow.path / "c"), (RENAME_EXCHANGE, b), (1 << 7, slow.path / "c")):
        with pytest.raises(OSError) as exc:
            renameat2(a, dst, flags)
        assert exc.value.errno == errno.EINVAL, flags
    with pytest.raises(OSError) as exc:
        renameat2(a, b, RENAME_NOREPLACE)
    assert exc.value.errno == errno.EEXIST
    renameat2(a, slow.path / "c", RENAME_NOREPLACE)
    for name in ("trusted.x", "security.x"):
        with pytest.raises(OSError) as exc:
            os.removexattr(b, name)
        assert exc.value.errno == errno.ENOTSUP, name
    slow.remount()
    assert sorted(os.listdir(slow.path)) == ["b", "c"]
    assert stat.S_IMODE(slow.path.stat().st_mode) == 0o755
    assert stored(slow.target, "c") == b"x"
