"""The conformance suite: ordinary file calls through a real mount, on every backend.

A backend is done when this whole module passes on it.  Each test uses a fresh bucket and
mount (fixture ``mnt``); ``remount()`` proves that what a test saw was stored in the bucket,
not just held by the daemon.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from cloudfs.backends import open_backend
from cloudfs.backends.errors import NotFound
from tests.mounting import Mount
from tests.servers import require

MiB = 1024 * 1024


def wait_for_object(mnt: Mount, key: str, size: int | None = None, timeout: float = 30) -> None:
    """Poll the bucket (not the mount) until the write-back uploader stored ``key``."""
    backend = open_backend(mnt.target.url, mnt.target.options)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                info = trio.run(backend.head, key)
                if size is None or info.size == size:
                    return
            except NotFound:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{key} did not reach the bucket in {timeout}s")
            time.sleep(0.2)
    finally:
        backend.close()


def object_bytes(mnt: Mount, key: str) -> bytes:
    backend = open_backend(mnt.target.url, mnt.target.options)
    try:
        return trio.run(backend.get_range, key)
    finally:
        backend.close()


def test_write_read_and_persist(mnt: Mount) -> None:
    p = mnt.path / "hello.txt"
    p.write_bytes(b"hello, world\n")
    assert p.read_bytes() == b"hello, world\n"
    assert p.stat().st_size == 13
    assert stat.S_ISREG(p.stat().st_mode)
    wait_for_object(mnt, "hello.txt", 13)
    assert object_bytes(mnt, "hello.txt") == b"hello, world\n"
    mnt.remount()
    assert (mnt.path / "hello.txt").read_bytes() == b"hello, world\n"


def test_empty_file(mnt: Mount) -> None:
    (mnt.path / "empty").touch()
    assert (mnt.path / "empty").stat().st_size == 0
    mnt.remount()
    assert (mnt.path / "empty").read_bytes() == b""


def test_seek_overwrite_and_holes(mnt: Mount) -> None:
    data = bytearray(os.urandom(3 * MiB + 123))
    p = mnt.path / "f.bin"
    p.write_bytes(data)
    with open(p, "r+b") as f:
        f.seek(MiB + 7)
        f.write(b"X" * 5000)
        f.seek(len(data) + 4096)  # a hole past the end reads as zeros
        f.write(b"tail")
    data[MiB + 7:MiB + 5007] = b"X" * 5000
    data += bytes(4096) + b"tail"
    assert p.read_bytes() == data
    mnt.remount()
    assert (mnt.path / "f.bin").read_bytes() == data


def test_partial_rewrite_of_stored_file(mnt: Mount) -> None:
    data = bytearray(os.urandom(20 * MiB))
    (mnt.path / "big").write_bytes(data)
    mnt.remount()
    with open(mnt.path / "big", "r+b") as f:
        f.seek(9 * MiB)
        f.write(b"middle")
    data[9 * MiB:9 * MiB + 6] = b"middle"
    mnt.remount()
    got = (mnt.path / "big").read_bytes()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()


def test_truncate(mnt: Mount) -> None:
    p = mnt.path / "t"
    p.write_bytes(b"0123456789" * 1000)
    os.truncate(p, 15)
    assert p.read_bytes() == b"012345678901234"
    os.truncate(p, 20)
    assert p.read_bytes() == b"012345678901234" + bytes(5)
    with open(p, "r+b") as f:
        f.truncate(3)
    mnt.remount()
    assert (mnt.path / "t").read_bytes() == b"012"


def test_append(mnt: Mount) -> None:
    p = mnt.path / "log"
    for i in range(5):
        with open(p, "a") as f:
            f.write(f"line {i}\n")
    mnt.remount()
    assert (mnt.path / "log").read_text().splitlines() == [f"line {i}" for i in range(5)]


def test_o_trunc_and_o_excl(mnt: Mount) -> None:
    p = mnt.path / "x"
    p.write_bytes(b"long content")
    with open(p, "wb") as f:
        f.write(b"short")
    assert p.read_bytes() == b"short"
    with pytest.raises(FileExistsError):
        os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)


def test_directories(mnt: Mount) -> None:
    (mnt.path / "a" / "b" / "c").mkdir(parents=True)
    (mnt.path / "a" / "b" / "file").write_text("x")
    (mnt.path / "empty").mkdir()
    assert sorted(os.listdir(mnt.path)) == ["a", "empty"]
    assert sorted(os.listdir(mnt.path / "a" / "b")) == ["c", "file"]
    assert stat.S_ISDIR((mnt.path / "a").stat().st_mode)
    with pytest.raises(OSError) as exc:
        os.rmdir(mnt.path / "a")
    assert exc.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileExistsError):
        os.mkdir(mnt.path / "empty")
    mnt.remount()
    assert sorted(os.listdir(mnt.path)) == ["a", "empty"]
    assert os.listdir(mnt.path / "empty") == []
    os.rmdir(mnt.path / "empty")
    os.rmdir(mnt.path / "a" / "b" / "c")
    assert sorted(os.listdir(mnt.path / "a" / "b")) == ["file"]
    mnt.remount()
    assert sorted(os.listdir(mnt.path)) == ["a"]


def test_unlink(mnt: Mount) -> None:
    p = mnt.path / "gone"
    p.write_text("bye")
    wait_for_object(mnt, "gone")
    os.unlink(p)
    assert not p.exists()
    with pytest.raises(FileNotFoundError):
        os.unlink(p)
    mnt.remount()
    assert not (mnt.path / "gone").exists()


def test_unlinked_file_stays_readable_while_open(mnt: Mount) -> None:
    """It reads on, and has no links left (``st_nlink`` 0), as does a file replaced by a
    rename while open."""
    p = mnt.path / "open-unlinked"
    p.write_bytes(b"still here")
    with open(p, "rb") as f:
        assert os.fstat(f.fileno()).st_nlink == 1
        os.unlink(p)
        assert f.read() == b"still here"
        assert os.fstat(f.fileno()).st_nlink == 0
    assert not p.exists()
    p.write_bytes(b"old")
    (mnt.path / "new").write_bytes(b"new")
    with open(p, "rb") as f:
        os.rename(mnt.path / "new", p)
        assert os.fstat(f.fileno()).st_nlink == 0
        assert f.read() == b"old"
    assert os.stat(p).st_nlink == 1


def test_unlink_before_upload_never_reaches_bucket(mnt: Mount) -> None:
    p = mnt.path / "temp"
    p.write_bytes(b"scratch")
    os.unlink(p)
    mnt.remount()
    assert os.listdir(mnt.path) == []


def test_rename_file(mnt: Mount) -> None:
    (mnt.path / "a.txt").write_text("A")
    (mnt.path / "b.txt").write_text("B")
    os.rename(mnt.path / "a.txt", mnt.path / "c.txt")
    os.replace(mnt.path / "c.txt", mnt.path / "b.txt")  # over an existing file
    assert sorted(os.listdir(mnt.path)) == ["b.txt"]
    assert (mnt.path / "b.txt").read_text() == "A"
    mnt.remount()
    assert sorted(os.listdir(mnt.path)) == ["b.txt"]
    assert (mnt.path / "b.txt").read_text() == "A"


def test_rename_directory_tree(mnt: Mount) -> None:
    src = mnt.path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "one").write_text("1")
    (src / "sub" / "two").write_text("2")
    os.rename(src, mnt.path / "dst")
    assert not src.exists()
    assert (mnt.path / "dst" / "one").read_text() == "1"
    assert (mnt.path / "dst" / "sub" / "two").read_text() == "2"
    mnt.remount()
    assert sorted(os.listdir(mnt.path)) == ["dst"]
    assert sorted(os.listdir(mnt.path / "dst" / "sub")) == ["deeper", "two"]
    assert (mnt.path / "dst" / "sub" / "two").read_text() == "2"


def test_rename_refusals(mnt: Mount) -> None:
    (mnt.path / "d").mkdir()
    (mnt.path / "d" / "f").write_text("x")
    (mnt.path / "e").mkdir()
    (mnt.path / "e" / "g").write_text("y")
    with pytest.raises(OSError) as exc:
        os.rename(mnt.path / "d", mnt.path / "e")
    assert exc.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as exc:
        os.rename(mnt.path / "d", mnt.path / "d" / "inside")
    assert exc.value.errno == errno.EINVAL


def test_chmod_chown_utime_persist(mnt: Mount) -> None:
    p = mnt.path / "m"
    p.write_text("x")
    os.chmod(p, 0o600)
    os.chown(p, 1234, 5678)
    os.utime(p, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    mnt.remount()
    st = (mnt.path / "m").stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_mtime_ns == 1_600_000_000_123_456_789


def _moves_ctime(path: Path, change: Callable[[], object], now_at: Path | None = None) -> os.stat_result:
    """``change()`` moves ``path``'s st_ctime (the clock ticks in between); ``now_at``: its
    name afterwards."""
    before = os.lstat(path)
    time.sleep(0.02)
    change()
    after = os.lstat(now_at or path)
    assert after.st_ctime_ns > before.st_ctime_ns, change
    return after


def test_ctime_moves_with_every_change_and_survives_remount(mnt: Mount) -> None:
    """st_ctime is stored (s3fs's ``ctime`` key) and moves with write, truncate, chmod,
    chown, utime, xattr changes and rename; a read does not move it, and a remount keeps it."""
    p = mnt.path / "f"
    p.write_bytes(b"data")
    _moves_ctime(p, lambda: os.chmod(p, 0o600))
    _moves_ctime(p, lambda: os.chown(p, 1234, 5678))
    st = _moves_ctime(p, lambda: os.utime(p, ns=(10**18, 10**18)))
    assert st.st_mtime_ns == 10**18 < st.st_ctime_ns  # a utime sets mtime, ctime is now
    _moves_ctime(p, lambda: os.setxattr(p, "user.k", b"v"))
    _moves_ctime(p, lambda: os.removexattr(p, "user.k"))

    def append() -> None:
        with open(p, "ab") as f:
            f.write(b"+more")

    st = _moves_ctime(p, append)
    assert st.st_mtime_ns > 10**18
    before = st
    st = _moves_ctime(p, lambda: os.truncate(p, 2))
    assert st.st_mtime_ns > before.st_mtime_ns
    time.sleep(0.02)
    assert p.read_bytes() == b"da"
    assert os.lstat(p).st_ctime_ns == st.st_ctime_ns  # reading changes nothing
    os.symlink("f", mnt.path / "link")
    os.mkfifo(mnt.path / "fifo")
    (mnt.path / "dir").mkdir()
    _moves_ctime(mnt.path / "fifo", lambda: os.chmod(mnt.path / "fifo", 0o600))
    _moves_ctime(mnt.path / "link", lambda: os.chown(mnt.path / "link", 7, 8, follow_symlinks=False))
    _moves_ctime(p, lambda: os.rename(p, mnt.path / "g"), mnt.path / "g")
    _moves_ctime(mnt.path / "link", lambda: os.rename(mnt.path / "link", mnt.path / "link2"),
                 mnt.path / "link2")
    names = ["g", "fifo", "link2"]
    if not mnt.target.extra.get("divergences", {}).get("folder_attributes"):  # SeaweedFS drops them
        _moves_ctime(mnt.path / "dir", lambda: os.chmod(mnt.path / "dir", 0o700))
        _moves_ctime(mnt.path / "dir", lambda: os.setxattr(mnt.path / "dir", "user.k", b"v"))
        _moves_ctime(mnt.path / "dir", lambda: os.rename(mnt.path / "dir", mnt.path / "dir2"),
                     mnt.path / "dir2")
        names.append("dir2")
    ctimes = {n: os.lstat(mnt.path / n).st_ctime_ns for n in names}
    mnt.remount()
    assert {n: os.lstat(mnt.path / n).st_ctime_ns for n in names} == ctimes


def test_mkdir_mode_persists(mnt: Mount) -> None:
    require(mnt.target, "folder_attributes")
    (mnt.path / "dir").mkdir(mode=0o750)
    mnt.remount()
    assert stat.S_IMODE((mnt.path / "dir").stat().st_mode) == 0o750


def test_symlinks(mnt: Mount) -> None:
    (mnt.path / "target.txt").write_text("pointed at")
    os.symlink("target.txt", mnt.path / "link")
    os.symlink("../nowhere/dangling", mnt.path / "dangling")
    assert os.readlink(mnt.path / "link") == "target.txt"
    assert (mnt.path / "link").read_text() == "pointed at"
    mnt.remount()
    assert os.readlink(mnt.path / "link") == "target.txt"
    assert os.readlink(mnt.path / "dangling") == "../nowhere/dangling"
    assert stat.S_ISLNK(os.lstat(mnt.path / "link").st_mode)


def test_xattrs(mnt: Mount) -> None:
    p = mnt.path / "x"
    p.write_text("x")
    os.setxattr(p, "user.color", b"blue")
    os.setxattr(p, "user.bin", bytes(range(256)))
    assert os.getxattr(p, "user.color") == b"blue"
    assert sorted(os.listxattr(p)) == ["user.bin", "user.color"]
    os.removexattr(p, "user.bin")
    with pytest.raises(OSError) as exc:
        os.setxattr(p, "trusted.nope", b"1")
    assert exc.value.errno in (errno.ENOTSUP, errno.EPERM)
    mnt.remount()
    assert os.listxattr(mnt.path / "x") == ["user.color"]
    assert os.getxattr(mnt.path / "x", "user.color") == b"blue"
    with pytest.raises(OSError) as exc:
        os.getxattr(mnt.path / "x", "user.missing")
    assert exc.value.errno == errno.ENODATA


def test_special_files(mnt: Mount) -> None:
    """FIFOs, sockets and device nodes are stored (as s3fs stores them) and keep their type,
    permissions and device number across a remount; a FIFO works as one on the mount."""
    os.mkfifo(mnt.path / "fifo", 0o640)
    os.mknod(mnt.path / "tty", stat.S_IFCHR | 0o600, os.makedev(5, 0))
    os.mknod(mnt.path / "disk", stat.S_IFBLK | 0o640, os.makedev(7, 3))
    os.mknod(mnt.path / "plain", stat.S_IFREG | 0o644)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(mnt.path / "sock"))
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append((mnt.path / "fifo").read_bytes()))
    reader.start()
    with open(mnt.path / "fifo", "wb") as w:
        w.write(b"through the pipe")
    reader.join(30)
    assert got == [b"through the pipe"]
    os.chmod(mnt.path / "fifo", 0o600)
    os.rename(mnt.path / "disk", mnt.path / "loop3")
    mnt.remount()
    st = {name: os.lstat(mnt.path / name) for name in ("fifo", "tty", "loop3", "plain", "sock")}
    assert st["fifo"].st_mode == stat.S_IFIFO | 0o600
    assert st["tty"].st_mode == stat.S_IFCHR | 0o600 and st["tty"].st_rdev == os.makedev(5, 0)
    assert st["loop3"].st_mode == stat.S_IFBLK | 0o640 and st["loop3"].st_rdev == os.makedev(7, 3)
    assert st["plain"].st_mode == stat.S_IFREG | 0o644 and st["plain"].st_size == 0
    assert stat.S_ISSOCK(st["sock"].st_mode)
    assert sorted(os.listdir(mnt.path)) == ["fifo", "loop3", "plain", "sock", "tty"]
    with pytest.raises(OSError):  # nodev: a device node on the mount does not open the device
        open(mnt.path / "tty", "rb").close()
    for name in ("fifo", "tty", "loop3", "sock"):
        os.unlink(mnt.path / name)
    mnt.remount()
    assert os.listdir(mnt.path) == ["plain"]


def test_hard_links_refused(mnt: Mount) -> None:
    (mnt.path / "a").write_text("a")
    with pytest.raises(OSError) as exc:
        os.link(mnt.path / "a", mnt.path / "b")
    assert exc.value.errno in (errno.EPERM, errno.ENOTSUP)


def test_large_file_multipart(mnt: Mount) -> None:
    size = 40 * MiB + 12345
    chunk = os.urandom(MiB)
    digest = hashlib.sha256()
    with open(mnt.path / "large", "wb") as f:
        written = 0
        while written < size:
            part = chunk[: min(MiB, size - written)]
            f.write(part)
            digest.update(part)
            written += len(part)
    mnt.stop()
    stored = object_bytes(mnt, "large")
    assert len(stored) == size
    assert hashlib.sha256(stored).hexdigest() == digest.hexdigest()
    mnt.start()
    with open(mnt.path / "large", "rb") as f:
        f.seek(25 * MiB)
        assert f.read(MiB) == stored[25 * MiB:26 * MiB]


def test_many_files(mnt: Mount) -> None:
    d = mnt.path / "many"
    d.mkdir()
    names = [f"file-{i:04d}" for i in range(300)]
    for n in names:
        (d / n).write_text(n)
    assert sorted(os.listdir(d)) == names
    mnt.remount()
    assert sorted(os.listdir(d)) == names
    assert (d / "file-0123").read_text() == "file-0123"


def test_unicode_names(mnt: Mount) -> None:
    names = ["café.txt", "файл", "名前 with spaces", "emoji-😀", "a+b=c&d"]
    for n in names:
        (mnt.path / n).write_text(n)
    mnt.remount()
    assert sorted(os.listdir(mnt.path)) == sorted(names)
    for n in names:
        assert (mnt.path / n).read_text() == n


def test_concurrent_writers(mnt: Mount) -> None:
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            data = bytes([i]) * (256 * 1024 + i)
            for rep in range(3):
                (mnt.path / f"w{i}").write_bytes(data[: len(data) - rep])
        except BaseException as exc:  # collected and re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    # Two writers on one file, disjoint regions.
    p = mnt.path / "shared"
    p.write_bytes(bytes(2 * MiB))

    def region(off: int, byte: int) -> None:
        with open(p, "r+b") as f:
            f.seek(off)
            f.write(bytes([byte]) * MiB)

    threads = [threading.Thread(target=region, args=(0, 1)), threading.Thread(target=region, args=(MiB, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    mnt.remount()
    for i in range(8):
        assert (mnt.path / f"w{i}").read_bytes() == bytes([i]) * (256 * 1024 + i - 2)
    assert (mnt.path / "shared").read_bytes() == bytes([1]) * MiB + bytes([2]) * MiB


def test_names_too_long(mnt: Mount) -> None:
    with pytest.raises(OSError) as exc:
        (mnt.path / ("n" * 256)).write_text("x")
    assert exc.value.errno == errno.ENAMETOOLONG
    # Each component fits, the whole key does not (S3/Azure/GCS: 1024 bytes).
    deep = mnt.path
    for i in range(5):
        deep = deep / (f"{i}" * 250)
    try:
        deep.parent.mkdir(parents=True)
        deep.write_text("x")
    except OSError as e:
        assert e.errno == errno.ENAMETOOLONG
    else:
        assert mnt.target.backend == "local", "a cloud key over 1024 bytes must be refused"


def test_statfs(mnt: Mount) -> None:
    st = os.statvfs(mnt.path)
    assert st.f_bavail > 0 and st.f_namemax == 255


def test_objects_written_by_others_appear(mnt: Mount) -> None:
    backend = open_backend(mnt.target.url, mnt.target.options)
    try:
        from cloudfs.backends import Payload

        trio.run(backend.put, "outside/made.txt", Payload.from_bytes(b"by another tool"), {})
    finally:
        backend.close()
    time.sleep(1.2)  # metadata and negative-entry TTL (attr_timeout=1)
    assert "outside" in os.listdir(mnt.path)
    assert (mnt.path / "outside" / "made.txt").read_bytes() == b"by another tool"
    st = (mnt.path / "outside" / "made.txt").stat()
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_uid == os.getuid()


def test_large_directory_pages(mnt: Mount) -> None:
    backend = open_backend(mnt.target.url, mnt.target.options)
    names = [f"e{i:05d}" for i in range(2100)]
    try:
        from cloudfs.backends import Payload

        async def fill() -> None:
            limit = trio.CapacityLimiter(32)

            async def one(n: str) -> None:
                async with limit:
                    await backend.put(f"big/{n}", Payload.from_bytes(b""), {})

            async with trio.open_nursery() as nursery:
                for n in names:
                    nursery.start_soon(one, n)

        trio.run(fill)
    finally:
        backend.close()
    assert sorted(os.listdir(mnt.path / "big")) == names
    with os.scandir(mnt.path / "big") as it:
        assert sum(1 for _ in it) == len(names)


def test_read_only_mount(target: object, tmp_path: Path) -> None:
    from tests.servers import Target

    assert isinstance(target, Target)
    rw = Mount(target, tmp_path / "rw", tmp_path / "cache-rw")
    rw.start()
    try:
        (rw.path / "f").write_text("x")
    finally:
        rw.cleanup()
    ro = Mount(target, tmp_path / "ro", tmp_path / "cache-ro", {"ro": ""})
    ro.start()
    try:
        assert (ro.path / "f").read_text() == "x"
        with pytest.raises(OSError) as exc:
            (ro.path / "g").write_text("y")
        assert exc.value.errno == errno.EROFS
    finally:
        ro.cleanup()


def test_size_survives_upload_and_kernel_forget(mnt: Mount) -> None:
    """After the upload and once the kernel forgot the inode, a fresh lookup has the right size."""
    data = os.urandom(5000)
    (mnt.path / "sized").write_bytes(data)
    wait_for_object(mnt, "sized", 5000)
    time.sleep(0.3)
    Path("/proc/sys/vm/drop_caches").write_text("3")  # the kernel forgets dentries and inodes
    assert (mnt.path / "sized").stat().st_size == 5000
    assert (mnt.path / "sized").read_bytes() == data
