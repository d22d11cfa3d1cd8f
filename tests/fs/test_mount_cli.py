"""`cloudfs mount` as a new user meets it: --version, the mountpoint checks (not empty, a dead
mount left by a crash), kernel flags, the typo guard for a missing prefix, and one cache
directory however the URL is typed; a file:// bucket keeps no temp folder.  All through the
real CLI; every mount is cleared even when a test fails."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import cloudfs
from tests.mounting import CLOUDFS, Mount, mounted, on_a_terminal
from tests.servers import Target


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLOUDFS, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@contextlib.contextmanager
def cleared(*paths: Path) -> Iterator[None]:
    """Whatever happens in the block, nothing stays mounted on ``paths``."""
    try:
        yield
    finally:
        for path in paths:
            for _ in range(20):
                if not mounted(path):
                    break
                subprocess.run([CLOUDFS, "umount", "--lazy", str(path)], capture_output=True, timeout=60)
                subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)
                time.sleep(0.1)


def test_version() -> None:
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"cloudfs {cloudfs.__version__}", r


def test_nonempty_mountpoint_refused_unless_nonempty(local_target: Target, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "hidden.txt").write_text("mine")
    (local_target.extra["root"] / "remote.txt").write_text("theirs")
    with cleared(mnt):
        r = cli("mount", local_target.url, str(mnt), "-o", f"cache_dir={tmp_path / 'cache'}")
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == (f"cloudfs: mountpoint {mnt} is not empty (its files would be hidden); "
                                    "use -o nonempty to mount over them")
        assert not mounted(mnt)
        r = cli("mount", local_target.url, str(mnt), "-o", f"cache_dir={tmp_path / 'cache'},nonempty")
        assert r.returncode == 0, r.stderr
        assert os.listdir(mnt) == ["remote.txt"]
        assert cli("umount", str(mnt)).returncode == 0
    assert (mnt / "hidden.txt").read_text() == "mine"


def _kill_daemon(m: Mount) -> None:
    """SIGKILL the daemon and leave its dead mount behind ("Transport endpoint is not connected")."""
    pid = m.pid()
    assert pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    with pytest.raises(OSError) as exc:
        os.stat(m.path)
    assert exc.value.errno == 107  # ENOTCONN
    assert mounted(m.path)


def test_dead_mount_of_ours_is_cleared(local_target: Target, tmp_path: Path) -> None:
    m = Mount(local_target, tmp_path / "mnt", tmp_path / "cache")
    with cleared(m.path):
        m.start()
        (m.path / "f").write_text("kept")
        os.sync()
        _kill_daemon(m)
        r = cli("mount", local_target.url, str(m.path), "-o", m.option_text())
        assert r.returncode == 0, r.stderr
        assert r.stderr.strip() == \
            f"cloudfs: cleared the dead cloudfs mount left on {m.path} by a crashed daemon"
        assert (m.path / "f").read_text() == "kept"
        m.stop()


def test_dead_mount_with_cache_in_use_is_an_error(local_target: Target, tmp_path: Path) -> None:
    """If the cache directory's lock is held, the dead mount is not provably ours: left alone."""
    m = Mount(local_target, tmp_path / "mnt", tmp_path / "cache")
    with cleared(m.path):
        m.start()
        _kill_daemon(m)
        fd = os.open(tmp_path / "cache" / "lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            r = cli("mount", local_target.url, str(m.path), "-o", m.option_text())
        finally:
            os.close(fd)
        assert r.returncode == 16, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "transport endpoint is not connected" in r.stderr
        assert f"fusermount3 -uz {m.path}" in r.stderr
        assert mounted(m.path)  # not touched


def test_kernel_flags_reach_the_mount(local_target: Target, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = f"cache_dir={tmp_path / 'cache'},relatime,strictatime,noatime,exec,noexec,nosuid,nodev"
    with cleared(mnt):
        r = cli("mount", local_target.url, str(mnt), "-o", opts)
        assert r.returncode == 0, r.stderr
        with open("/proc/self/mountinfo") as f:
            line = next(ln for ln in f if ln.split()[4] == str(mnt))
        flags = set(line.split()[5].split(","))
        assert {"noatime", "noexec", "nosuid", "nodev"} <= flags, line
        assert cli("umount", str(mnt)).returncode == 0


def test_file_bucket_keeps_no_temp_folder(local_target: Target, tmp_path: Path) -> None:
    """A file:// bucket holds only what was written: the local backend's temp folder is made
    while a put needs it and gone after the unmount (it would show up in other tools)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with cleared(mnt):
        r = cli("mount", local_target.url, str(mnt), "-o", f"cache_dir={tmp_path / 'cache'}")
        assert r.returncode == 0, r.stderr
        (mnt / "d").mkdir()
        (mnt / "d" / "f").write_bytes(b"x" * 100_000)
        (mnt / "g").write_bytes(b"small")
        r = cli("umount", str(mnt))
        assert r.returncode == 0, r.stderr
    root = local_target.extra["root"]
    assert sorted(p.name for p in root.iterdir()) == ["d", "g"]
    assert (root / "d" / "f").read_bytes() == b"x" * 100_000


@pytest.mark.backends("s3")
def test_missing_prefix_warns_once_and_mounts(target: Target, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = f"cache_dir={tmp_path / 'cache'}"
    with cleared(mnt):
        r = cli("mount", f"{target.url}/phtoos", str(mnt), "-o", opts)
        assert r.returncode == 0, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "nothing exists under" in lines[0] and "phtoos" in lines[0], r.stderr
        assert os.listdir(mnt) == []
        (mnt / "first").write_text("x")
        assert cli("umount", str(mnt)).returncode == 0
        # now the prefix exists: no warning
        r = cli("mount", f"{target.url}/phtoos", str(mnt), "-o", opts)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert os.listdir(mnt) == ["first"]
        assert cli("umount", str(mnt)).returncode == 0
        # a bucket mounted without a prefix never warns, empty or not
        r = cli("mount", target.url, str(mnt), "-o", f"cache_dir={tmp_path / 'cache2'}")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert cli("umount", str(mnt)).returncode == 0
    assert (tmp_path / "cache" / "cloudfs.log").read_text().count("nothing exists under") == 1


@pytest.mark.backends("local", "s3")
def test_url_spellings_share_the_default_cache_dir(target: Target, tmp_path: Path) -> None:
    """Crash recovery finds the pending uploads however the URL was typed: S3:// or s3://,
    with or without trailing or doubled slashes."""
    scheme, rest = target.url.split("://", 1)
    spellings = [target.url, f"{scheme.upper()}://{rest}/", f"{scheme}://{rest}//"]
    if target.backend == "s3":
        spellings = [f"{target.url}/photos", f"{scheme.upper()}://{rest}//photos/"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    dirs: set[str] = set()
    try:
        with cleared(mnt):
            for url in spellings:
                r = cli("mount", url, str(mnt), "-o", "cache_size=64M")  # no cache_dir: the default
                assert r.returncode == 0, (url, r.stderr)
                st = cli("status", str(mnt), "--json")
                assert st.returncode == 0, st.stderr
                dirs.add(json.loads(st.stdout)["cache"]["dir"])
                assert cli("umount", str(mnt)).returncode == 0
    finally:
        for d in dirs:  # the default cache dirs of this test's own bucket
            shutil.rmtree(d, ignore_errors=True)
    assert len(dirs) == 1, dirs


def test_sync_shows_upload_progress_on_a_terminal_only(local_target: Target, tmp_path: Path) -> None:
    """With the write-back delay an hour away, ``cloudfs sync`` uploads a file of several parts
    whole (it once sent only its whole parts and then waited for the delay)."""
    m = Mount(local_target, tmp_path / "mnt", tmp_path / "cache",
              {"writeback_delay": "1h", "block_size": "1M"})
    with cleared(m.path):
        m.start()
        data = os.urandom(3 * 1024 * 1024 + 5)
        (m.path / "on-tty").write_bytes(data)
        out = on_a_terminal([CLOUDFS, "sync", str(m.path)], m.env)
        assert b"cloudfs: uploading" in out and b"100%" in out, out[-1000:]
        assert (local_target.extra["root"] / "on-tty").read_bytes() == data
        (m.path / "piped").write_bytes(data)
        r = cli("sync", str(m.path), env=m.env)
        assert r.returncode == 0 and r.stderr == "" and r.stdout == "", r  # no bar, nothing at all
        assert (local_target.extra["root"] / "piped").read_bytes() == data
        m.stop()


def test_warm_shows_progress_on_a_terminal_only(local_target: Target, tmp_path: Path) -> None:
    root = local_target.extra["root"]
    size = 3 * 1024 * 1024 + 5
    for name in ("a", "b"):
        (root / name).write_bytes(os.urandom(size))
    m = Mount(local_target, tmp_path / "mnt", tmp_path / "cache", {"block_size": "1M"})
    with cleared(m.path):
        m.start()
        out = on_a_terminal([CLOUDFS, "warm", str(m.path / "a")], m.env)
        assert b"cloudfs: warming" in out and b"100%" in out, out[-1000:]
        assert f"warmed 1 file(s), {size} bytes".encode() in out, out
        r = cli("warm", str(m.path / "b"), env=m.env)
        assert r.returncode == 0 and r.stdout == "", r
        assert r.stderr.splitlines() == [f"warmed 1 file(s), {size} bytes"], r.stderr  # no bar
        st = json.loads(cli("status", str(m.path), "--json").stdout)
        assert st["cache"]["fetches"] == 8  # both files' 4 blocks: the warms read them
        m.stop()
