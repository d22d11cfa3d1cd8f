"""mount.cloudfs through mount(8) itself, and the service's ExecStart under a notify socket.

These run the real ``cloudfs mount`` (local-disk backend) on the host, as root.  The helper is
installed into /sbin for the module and removed afterwards, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.systemd.harness import (
    CLOUDFS,
    NotifySocket,
    cloudfs_mount_at,
    helper_installed,
    lazy_unmount,
    wait_for,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) helpers in /sbin need root")


@pytest.fixture(scope="module")
def sbin_helper():
    with helper_installed("/sbin") as paths:
        yield paths
    assert not os.path.exists("/sbin/mount.cloudfs")


@pytest.fixture
def bucket(tmp_path):
    b = tmp_path / "bucket"
    b.mkdir()
    (b / "hello.txt").write_text("hello from the bucket\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    yield b, mnt
    lazy_unmount(mnt)  # only acts if a test left the mount behind (never stats the path)


def run_logged(
    cmd: list[str], tmp: Path, timeout: float = 45, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run with output in a file, not a pipe: a daemon that kept our pipe open must not hang us."""
    log = tmp / f"out-{time.monotonic_ns()}.log"
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f, timeout=timeout, env=env)
    rc = r.returncode
    return rc, log.read_text()


def read_through(path: Path, timeout: float = 10) -> str:
    """Read a file in another process with a timeout (a hung FUSE mount must fail the test, not hang it)."""
    r = subprocess.run(["cat", str(path)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout


def cache_opts(tmp: Path) -> str:
    return f"cache_dir={tmp}/cache,cache_size=64M"


def test_mount_t_cloudfs_returns_when_ready(sbin_helper, bucket, tmp_path):
    b, mnt = bucket
    rc, out = run_logged(["mount", "-v", "-t", "cloudfs", f"file://{b}", str(mnt),
                          "-o", f"ro,_netdev,nofail,dev,suid,{cache_opts(tmp_path)}"], tmp_path)  # fmt: skip
    assert rc == 0, out
    # mount(8) returned: the file is readable right now, no polling
    m = cloudfs_mount_at(mnt)
    assert m is not None, f"mount(8) returned before the mount existed\n{out}"
    assert read_through(mnt / "hello.txt") == "hello from the bucket\n"
    assert {"ro", "nosuid", "nodev"} <= m.options, m
    # fsname= and subtype=: mountinfo and df name the bucket and the type
    assert m.fstype == "fuse.cloudfs" and m.source.rstrip("/") == f"file://{b}", m
    # mount(8) turns dev,suid into mount flags itself (they are the default, so it does not
    # pass them on) but passes _netdev and nofail on: the helper drops those
    assert "ignoring options: _netdev,nofail\n" in out, out
    assert f"-o ro,{cache_opts(tmp_path)}\n" in out, out
    rc, out = run_logged(["umount", str(mnt)], tmp_path)
    assert rc == 0, out
    assert cloudfs_mount_at(mnt) is None


def test_mount_T_fstab(sbin_helper, bucket, tmp_path):
    b, mnt = bucket
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"file://{b} {mnt} cloudfs ro,_netdev,noauto,nofail,x-systemd.automount,x-systemd.idle-timeout=1min,"
        f"comment=cloudfs,{cache_opts(tmp_path)},writeback_delay=1 0 0\n"
    )
    rc, out = run_logged(["mount", "-v", "-T", str(fstab), str(mnt)], tmp_path)
    assert rc == 0, out
    m = cloudfs_mount_at(mnt)
    assert m is not None and {"ro", "nosuid", "nodev"} <= m.options, (m, out)
    assert read_through(mnt / "hello.txt") == "hello from the bucket\n"
    # mount(8) strips noauto, x-*, comment= itself; the helper drops the rest
    assert "ignoring options: _netdev,nofail" in out, out
    assert f"-o ro,{cache_opts(tmp_path)},writeback_delay=1" in out, out
    rc, out = run_logged(["umount", str(mnt)], tmp_path)
    assert rc == 0, out
    assert cloudfs_mount_at(mnt) is None


GENERIC = ("defaults,noatime,relatime,strictatime,noexec,exec,nosuid,nodev,user,users,nofail,auto,noauto,"
           "_netdev")


def test_fstab_line_with_generic_options(sbin_helper, bucket, tmp_path):
    """The generic options of many fstab lines: the kernel ones reach the mount, the rest are
    accepted and ignored (issue 14)."""
    b, mnt = bucket
    fstab = tmp_path / "fstab"
    # one atime flag, as fstab lines have
    line = "defaults,noatime,noexec,nosuid,nodev,user,users,nofail,noauto,_netdev"
    fstab.write_text(f"file://{b} {mnt} cloudfs {line},{cache_opts(tmp_path)} 0 0\n")
    rc, out = run_logged(["mount", "-v", "-T", str(fstab), str(mnt)], tmp_path)
    assert rc == 0, out
    m = cloudfs_mount_at(mnt)
    assert m is not None and {"noatime", "noexec", "nosuid", "nodev"} <= m.options, (m, out)
    assert read_through(mnt / "hello.txt") == "hello from the bucket\n"
    rc, out = run_logged(["umount", str(mnt)], tmp_path)
    assert rc == 0, out
    assert cloudfs_mount_at(mnt) is None


def test_helper_called_directly_with_generic_options(bucket, tmp_path):
    """mount.cloudfs as mount(8) calls it (no /sbin install needed): every generic option is taken."""
    b, mnt = bucket
    helper = str(Path(CLOUDFS).with_name("mount.cloudfs"))
    rc, out = run_logged([helper, f"file://{b}", str(mnt), "-v", "-o", f"{GENERIC},{cache_opts(tmp_path)}"],
                         tmp_path)
    assert rc == 0, out
    m = cloudfs_mount_at(mnt)
    assert m is not None and {"nosuid", "nodev"} <= m.options and "noatime" not in m.options, (m, out)
    assert "ignoring options: defaults,exec,nosuid,nodev,user,users,nofail,auto,noauto,_netdev" in out, out
    assert read_through(mnt / "hello.txt") == "hello from the bucket\n"
    rc, out = run_logged([CLOUDFS, "umount", str(mnt)], tmp_path)
    assert rc == 0, out
    assert cloudfs_mount_at(mnt) is None


def test_mount_t_fuse_cloudfs_read_write(sbin_helper, bucket, tmp_path):
    b, mnt = bucket
    rc, out = run_logged(["mount", "-t", "fuse.cloudfs", f"file://{b}", str(mnt),
                          "-o", f"{cache_opts(tmp_path)},writeback_delay=60"], tmp_path)  # fmt: skip
    assert rc == 0, out
    m = cloudfs_mount_at(mnt)
    assert m is not None and {"rw", "nosuid", "nodev"} <= m.options, m
    (mnt / "new.txt").write_text("written through mount(8)\n")
    # umount flushes the pending upload (writeback_delay=60 has not passed)
    rc, out = run_logged(["umount", str(mnt)], tmp_path, timeout=120)
    assert rc == 0, out
    # (create may already have put an empty object: wait for the content)
    new = b / "new.txt"
    wait_for(lambda: new.exists() and new.read_text(), 60, "the pending upload after umount")
    assert (b / "new.txt").read_text() == "written through mount(8)\n"


def test_fake_mount_mounts_nothing(sbin_helper, bucket, tmp_path):
    b, mnt = bucket
    rc, out = run_logged(["mount", "-f", "-v", "-t", "cloudfs", f"file://{b}", str(mnt)], tmp_path)
    assert rc == 0, out
    assert cloudfs_mount_at(mnt) is None


def test_failing_mount_fails_with_a_message(sbin_helper, bucket, tmp_path):
    _, mnt = bucket
    missing = tmp_path / "no-such-bucket"
    rc, out = run_logged(["mount", "-t", "cloudfs", f"file://{missing}", str(mnt)], tmp_path)
    assert rc != 0
    assert str(missing) in out, out
    assert cloudfs_mount_at(mnt) is None
    cmd = ["mount", "-t", "cloudfs", f"file://{tmp_path}", str(mnt), "-o", "bogus_opt"]
    rc, out = run_logged(cmd, tmp_path)
    assert rc != 0 and "bogus_opt" in out, out


# --- readiness: the service's ExecStart under a notify socket --------------------------------


def write_profile(tmp_path: Path, b: Path, mnt: Path) -> Path:
    confdir = tmp_path / "conf"
    confdir.mkdir()
    conf = confdir / "ready.conf"
    conf.write_text(
        f'url = "file://{b}"\nmountpoint = "{mnt}"\n'
        f'options = {{ cache_dir = "{tmp_path}/cache", cache_size = "64M", writeback_delay = "600" }}\n'
        '[environment]\nCLOUDFS_TEST_SECRET = "x"\n'
    )
    conf.chmod(0o600)
    return confdir


def test_execstart_ready_only_when_mounted_and_sigterm_flushes(bucket, tmp_path):
    b, mnt = bucket
    confdir = write_profile(tmp_path, b, mnt)
    sock = NotifySocket(tmp_path)
    log = open(tmp_path / "daemon.log", "w")
    # exactly the ExecStart= of systemd/cloudfs@.service
    env = {**os.environ, "NOTIFY_SOCKET": sock.path, "CLOUDFS_CONFIG_DIR": str(confdir)}
    proc = subprocess.Popen([CLOUDFS, "mount", "--profile", "ready", "--foreground"],
                            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)  # fmt: skip
    try:
        seen_at_ready = {}

        def on_message(msg):
            if "READY" in msg:  # at this moment, before anything else happens, the mount must work
                seen_at_ready["mount"] = cloudfs_mount_at(mnt)
                seen_at_ready["data"] = read_through(mnt / "hello.txt")

        ready = sock.wait_for("READY", 60, on_message)
        assert ready["READY"] == "1"
        assert "Mounted" in ready.get("STATUS", "")
        assert seen_at_ready["mount"] is not None
        assert {"nosuid", "nodev"} <= seen_at_ready["mount"].options
        assert seen_at_ready["data"] == "hello from the bucket\n"

        (mnt / "pending.txt").write_text("must survive SIGTERM\n")
        # writeback_delay=600: the content is still pending (create may already have put an
        # empty object, so look at the content, not at existence)
        assert not (b / "pending.txt").exists() or (b / "pending.txt").read_text() == ""
        proc.send_signal(signal.SIGTERM)
        sock.wait_for("STOPPING", 30)
        assert proc.wait(120) == 0
        assert (b / "pending.txt").read_text() == "must survive SIGTERM\n"
        assert cloudfs_mount_at(mnt) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()
        sock.close()
        print((tmp_path / "daemon.log").read_text()[-3000:])


def test_execstop_flushes_and_returns_after_the_mount_process_exits(bucket, tmp_path):
    b, mnt = bucket
    confdir = write_profile(tmp_path, b, mnt)
    sock = NotifySocket(tmp_path)
    env = {**os.environ, "NOTIFY_SOCKET": sock.path, "CLOUDFS_CONFIG_DIR": str(confdir)}
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen([CLOUDFS, "mount", "--profile", "ready", "--foreground"],
                            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)  # fmt: skip
    try:
        sock.wait_for("READY", 60)
        (mnt / "pending.txt").write_text("flushed by ExecStop\n")
        # exactly the ExecStop= of systemd/cloudfs@.service (without its "-")
        rc, out = run_logged([CLOUDFS, "umount", "--profile", "ready"], tmp_path, timeout=120, env=env)
        assert rc == 0, out
        # when it returns, the upload is done and the mount process is gone
        assert (b / "pending.txt").read_text() == "flushed by ExecStop\n"
        assert cloudfs_mount_at(mnt) is None
        assert proc.wait(5) == 0
        # nothing left to stop: a clear error (the unit ignores it with "-")
        rc, out = run_logged([CLOUDFS, "umount", "--profile", "ready"], tmp_path, env=env)
        assert rc != 0 and "not mounted" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()
        sock.close()


NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@contextlib.contextmanager
def modes_granted(grants: dict[Path, int]) -> Iterator[None]:
    """Add permission bits to host paths for the test, and put the old modes back after it."""
    old = {p: stat.S_IMODE(p.stat().st_mode) for p in grants}
    try:
        for p, bits in grants.items():
            os.chmod(p, old[p] | bits)
        yield
    finally:
        for p, mode in old.items():
            os.chmod(p, mode)


@contextlib.contextmanager
def fstab_line(line: str) -> Iterator[None]:
    """/etc/fstab with one more line (mount(8) reads no other fstab for a non-root user)."""
    fstab = Path("/etc/fstab")
    saved = fstab.read_bytes() if fstab.exists() else None
    try:
        fstab.write_bytes((saved or b"").rstrip(b"\n") + b"\n" + line.encode() + b"\n")
        yield
    finally:
        if saved is None:
            fstab.unlink()
        else:
            fstab.write_bytes(saved)


def user_mount_diagnostics(mnt: Path) -> str:
    """What mount(8) run by a user depends on, for a failure message: the helper it looks up
    in /sbin, its own set-user-ID bit, the fstab line and the file systems involved."""
    cmds = [["ls", "-l", "/sbin/mount.cloudfs", "/usr/sbin/mount.cloudfs"],
            [*AS_NOBODY, "stat", "-c", "%n %A", "/sbin/mount.cloudfs"],
            ["sh", "-c", "ls -l $(command -v mount) $(command -v fusermount3)"],
            ["grep", "-F", str(mnt), "/etc/fstab"],
            ["findmnt", "-n", "-o", "TARGET,FSTYPE,OPTIONS", "-T", "/usr/sbin"],
            ["findmnt", "-n", "-o", "TARGET,FSTYPE,OPTIONS", "-T", str(mnt)]]  # fmt: skip
    lines = ["", "--- for diagnosis:"]
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        lines.append(f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}".rstrip())
    return "\n".join(lines)


@pytest.mark.parametrize("who", ["user", "users"])
def test_a_user_mount_from_fstab_by_a_non_root_user(sbin_helper, tmp_path, who):
    """An fstab line with `user` (or `users`) lets uid 65534 run `mount MOUNTPOINT`: mount(8) runs the helper
    as that user, the mount goes through fusermount3, the user reads and writes through it and
    `cloudfs umount` (as the user) uploads and unmounts.  For that the user needs /dev/fuse
    (0666 on Debian, 0600 in some containers) and the installation's interpreter reachable:
    both are granted for the test and put back."""
    home = Path(tempfile.mkdtemp(prefix="cloudfs-user-mount-", dir="/tmp"))
    os.chmod(home, 0o755)
    b, mnt, cache = home / "bucket", home / "mnt", home / "cache"
    for d in (b, mnt, cache):
        d.mkdir()
    (b / "hello.txt").write_text("hello from the bucket\n")
    for d in (b, mnt, cache, b / "hello.txt"):
        os.chown(d, NOBODY, NOBODY)
    python = Path(os.path.realpath(sys.executable))
    reach = {p: 0o001 for p in python.parents if not stat.S_IMODE(p.stat().st_mode) & 0o001}
    line = f"file://{b} {mnt} cloudfs {who},noauto,cache_dir={cache},cache_size=64M,min_free=0 0 0"
    try:
        with fstab_line(line), modes_granted({Path("/dev/fuse"): 0o066, **reach}):
            rc, out = run_logged([*AS_NOBODY, "mount", "-v", str(mnt)], tmp_path)
            assert rc == 0, out + user_mount_diagnostics(mnt)
            m = cloudfs_mount_at(mnt)
            assert m is not None and {"nosuid", "nodev", "noexec"} <= m.options, (m, out)
            r = subprocess.run([*AS_NOBODY, "cat", str(mnt / "hello.txt")], capture_output=True,
                               text=True, timeout=10)
            assert r.stdout == "hello from the bucket\n", r.stderr
            r = subprocess.run([*AS_NOBODY, "sh", "-c", f"echo written > {mnt}/new.txt"],
                               capture_output=True, text=True, timeout=10)
            assert r.returncode == 0, r.stderr
            rc, out = run_logged([*AS_NOBODY, CLOUDFS, "umount", str(mnt)], tmp_path, timeout=60)
            assert rc == 0, out
            assert cloudfs_mount_at(mnt) is None
            assert (b / "new.txt").read_text() == "written\n"
            assert (b / "new.txt").stat().st_uid == NOBODY
    finally:
        lazy_unmount(mnt)
        shutil.rmtree(home, ignore_errors=True)
