"""Helpers for the systemd integration tests: mountinfo, the helper in /sbin, a notify socket,
and a real systemd booted as PID 1 in fully isolated namespaces.

The private systemd follows the facts in issue 7.  It never runs over the host's files:
``/`` is an overlay whose upper layer is a tmpfs, and /tmp, /dev, /run are fresh; /proc/sys
and /sys are read-only; it gets its own cgroup (a new subtree of the host's cgroup2,
entered before ``unshare --cgroup``) and its own cgroup2 mount; and every unit or generator
that touches machine-wide state is masked.  Booting over the real root would let
systemd-tmpfiles wipe the host's /tmp and sysusers rewrite /etc/passwd.

It is driven with ``nsenter -t PID -a`` and stopped with ``systemctl poweroff``; whatever is
left in its cgroup is then killed by PID.  Every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
CLOUDFS = str(VENV_BIN / "cloudfs")
SYSTEMD = "/usr/lib/systemd/systemd"
FSTAB_GENERATOR = "/lib/systemd/system-generators/systemd-fstab-generator"
UNITS_SRC = Path(__file__).resolve().parents[2] / "systemd"


# --- mountinfo --------------------------------------------------------------------------------


@dataclass
class Mount:
    mountpoint: str
    options: set[str]  # per-mount options (ro, nosuid, nodev, ...)
    dev: str  # major:minor; for FUSE the minor names /sys/fs/fuse/connections/MINOR
    fstype: str
    source: str
    super_options: set[str]


def _unescape(s: str) -> str:
    return s.encode().decode("unicode_escape") if "\\" in s else s


def parse_mountinfo(text: str) -> list[Mount]:
    out = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        r = right.split()
        if len(f) < 6 or len(r) < 3:
            continue
        opts, super_opts = set(f[5].split(",")), set(r[2].split(","))
        out.append(Mount(_unescape(f[4]), opts, f[2], r[0], _unescape(r[1]), super_opts))
    return out


def _canonical_no_stat(path: str | os.PathLike[str]) -> str:
    """realpath of the parent only: stat()ing a mountpoint whose FUSE daemon hangs would hang us too."""
    p = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))


def mounts_at(path: str | os.PathLike[str], mountinfo: str | None = None) -> list[Mount]:
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
        path = _canonical_no_stat(path)
    return [m for m in parse_mountinfo(mountinfo) if m.mountpoint == str(path)]


def cloudfs_mount_at(path: str | os.PathLike[str], mountinfo: str | None = None) -> Mount | None:
    """The FUSE mount of cloudfs at ``path`` (type fuse.cloudfs or fuse), if any."""
    for m in reversed(mounts_at(path, mountinfo)):
        if m.fstype.startswith("fuse"):
            return m
    return None


def wait_for(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def kill_daemons_for(path: str | os.PathLike[str]) -> list[int]:
    """SIGKILL, by PID, ``cloudfs mount`` processes whose argv names this mountpoint.

    A daemon that deadlocked on its own mountpoint keeps every process that touches the path
    (even umount, which stats it) in uninterruptible sleep; killing it fails those requests.
    """
    target = _canonical_no_stat(path)
    killed = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if any(a.endswith("cloudfs") for a in args[:2]) and "mount" in args and (
            target in args or str(path) in args
        ):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(d.name), signal.SIGKILL)
                killed.append(int(d.name))
    return killed


def lazy_unmount(path: str | os.PathLike[str]) -> None:
    """Last-resort cleanup for a test that left a mount behind, even a hung one.

    Aborting the FUSE connection (if fusectl is mounted) fails the daemon's pending requests,
    so a deadlocked daemon exits; ``umount -l -c`` detaches without stat()ing the path.
    """
    path = _canonical_no_stat(path)
    for _ in range(5):
        m = cloudfs_mount_at(path)
        if not m:
            return
        abort = Path(f"/sys/fs/fuse/connections/{m.dev.split(':')[1]}/abort")
        with contextlib.suppress(OSError):
            abort.write_text("1")
        kill_daemons_for(path)
        time.sleep(0.2)
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(["umount", "-l", "-c", path], capture_output=True, timeout=30)


# --- the helper in /sbin -----------------------------------------------------------------------


@contextlib.contextmanager
def helper_installed(prefix: str = "/sbin") -> Iterator[list[str]]:
    """Install mount.cloudfs / mount.fuse.cloudfs into ``prefix`` and always remove them again."""
    from cloudfs import mount_helper

    written: list[str] = []

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")  # pytest still runs finalizers, so /sbin gets cleaned

    old = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        written = mount_helper.install(prefix)
        yield written
    finally:
        signal.signal(signal.SIGTERM, old)
        mount_helper.uninstall(prefix)
        for p in written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


# --- a notify socket, as systemd provides for Type=notify ----------------------------------------


class NotifySocket:
    """Bind an AF_UNIX datagram socket and collect what ``sd_notify`` sends to it."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = os.path.join(directory, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(msg)
        return msg

    def wait_for(self, key: str, timeout: float, on_message: Callable[[dict[str, str]], None] | None = None):
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.receive(left)
            if msg is None:
                break
            if on_message:
                on_message(msg)
            if key in msg:
                return msg
        raise TimeoutError(f"no {key} on the notify socket within {timeout}s (got {self.messages})")

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


# --- a private systemd ---------------------------------------------------------------------------

# Units that touch machine-wide state or are pointless in the sandbox.  Even though the root is
# an overlay, they stay masked: a mistake in the isolation must not become damage to the host.
MASKED_UNITS = [
    "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-clean.service",
    "systemd-tmpfiles-clean.timer",
    "systemd-sysusers.service",
    "systemd-sysctl.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "systemd-modules-load.service",
    "kmod-static-nodes.service",
    "systemd-udevd.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "systemd-hwdb-update.service",
    "systemd-timesyncd.service",
    "systemd-random-seed.service",
    "systemd-remount-fs.service",
    "systemd-firstboot.service",
    "systemd-machine-id-commit.service",
    "systemd-journal-catalog-update.service",
    "systemd-update-done.service",
    "systemd-pstore.service",
    "systemd-logind.service",
    "systemd-journal-flush.service",
    "systemd-network-generator.service",
    "ldconfig.service",
    "dev-hugepages.mount",
    "dev-mqueue.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "tmp.mount",
    "getty.target",
    "console-getty.service",
    "getty@tty1.service",
    "timers.target",
    "e2scrub_reap.service",
    "postgresql.service",
    "cron.service",
    "dbus.socket",
    "dbus.service",
]
KEEP_GENERATORS = {"systemd-fstab-generator"}

TEST_TARGET = """\
[Unit]
Description=cloudfs test boot target
Requires=basic.target
Wants=remote-fs.target
After=basic.target
AllowIsolate=yes
"""

INNER_SCRIPT = r"""
set -eu
W="$1"; R="$W/root"
mount -t tmpfs -o mode=0755 layers "$W/layers"
mkdir "$W/layers/upper" "$W/layers/work"
mount -t overlay overlay -o "lowerdir=/,upperdir=$W/layers/upper,workdir=$W/layers/work" "$R"
cp -a "$W/seed/." "$R/"
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount --bind "$R/proc/sys" "$R/proc/sys"
mount -o remount,bind,ro "$R/proc/sys"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=0755,nosuid dev "$R/dev"
for n in null zero full random urandom tty fuse autofs; do
    touch "$R/dev/$n"; mount --bind "/dev/$n" "$R/dev/$n"
done
touch "$R/dev/console"; mount --bind "$W/console.log" "$R/dev/console"
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$R/dev/shm"
ln -s /proc/self/fd "$R/dev/fd"
for i in 0:stdin 1:stdout 2:stderr; do ln -s "/proc/self/fd/${i%%:*}" "$R/dev/${i#*:}"; done
mount -t tmpfs -o mode=0755,nosuid,nodev run "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmp "$R/tmp"
cd "$R"
mkdir -p .oldroot
pivot_root . .oldroot
cd /
umount -l /.oldroot
rmdir /.oldroot || true
exec env -i container=cloudfs-test TERM=dumb PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /usr/lib/systemd/systemd --unit=cloudfs-test.target --log-target=console --show-status=no
"""


def systemd_unavailable_reason() -> str | None:
    """Why a private systemd cannot run here, or None.  Only missing kernel features count."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/autofs"):
        return "/dev/autofs is missing (no autofs in this kernel)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    for ns in ("pid", "mnt", "uts", "ipc", "cgroup"):
        if not os.path.exists(f"/proc/self/ns/{ns}"):
            return f"no {ns} namespaces in this kernel"
    fs = Path("/proc/filesystems").read_text()
    if "overlay" not in fs:
        return "no overlayfs in this kernel"
    if "cgroup2" not in fs:
        return "no cgroup2 in this kernel"
    if not _host_cgroup2():
        return "no cgroup2 hierarchy mounted on the host"
    for tool in ("unshare", "nsenter", "pivot_root"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    if not os.path.exists(SYSTEMD):
        return f"{SYSTEMD} is not installed"
    return None


def _host_cgroup2() -> str | None:
    for m in parse_mountinfo(Path("/proc/self/mountinfo").read_text()):
        if m.fstype == "cgroup2":
            return m.mountpoint
    return None


def _cgroup_pids(cg: Path) -> list[int]:
    pids = []
    for procs in cg.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids += [int(x) for x in procs.read_text().split()]
    return pids


def _remove_cgroup(cg: Path) -> None:
    for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()
    with contextlib.suppress(OSError):
        cg.rmdir()


class PrivateSystemd:
    """A real systemd as PID 1 of fresh pid/mount/uts/ipc/cgroup namespaces over an overlay root.

    ``seed`` files (path inside -> text or bytes, or ``(text, mode)``) are copied into the
    overlay before boot, so /etc/fstab, /etc/cloudfs/*.conf and /sbin/mount.cloudfs exist only
    inside.
    """

    def __init__(self, seed: dict[str, object] | None = None, symlinks: dict[str, str] | None = None,
                 dirs: list[str] | None = None) -> None:  # fmt: skip
        self.workdir = Path(tempfile.mkdtemp(prefix="cloudfs-systemd-"))
        self.seed = seed or {}
        self.dirs = dirs or []  # empty directories, e.g. mountpoints
        self.symlinks = symlinks or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # host PID of the private systemd
        self.cgroup: Path | None = None

    # setup

    def _write_seed(self) -> None:
        seed = self.workdir / "seed"
        unitdir = seed / "etc/systemd/system"
        unitdir.mkdir(parents=True)
        for unit in MASKED_UNITS:
            (unitdir / unit).symlink_to("/dev/null")
        gendir = seed / "etc/systemd/system-generators"
        gendir.mkdir(parents=True)
        for gen in os.listdir("/lib/systemd/system-generators"):
            if gen not in KEEP_GENERATORS:
                (gendir / gen).symlink_to("/dev/null")
        (unitdir / "cloudfs-test.target").write_text(TEST_TARGET)
        (seed / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        (seed / "etc/fstab").write_text("# cloudfs test fstab\n")
        for rel, content in self.seed.items():
            mode = None
            if isinstance(content, tuple):
                content, mode = content
            p = seed / rel.lstrip("/")
            p.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                p.write_bytes(content)
            else:
                p.write_text(str(content))
            if mode is not None:
                os.chmod(p, mode)
        for rel in self.dirs:
            (seed / rel.lstrip("/")).mkdir(parents=True, exist_ok=True)
        for rel, target in self.symlinks.items():
            p = seed / rel.lstrip("/")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.symlink_to(target)

    def boot(self, timeout: float = 60) -> None:
        w = self.workdir
        (w / "layers").mkdir()
        (w / "root").mkdir()
        (w / "console.log").touch()
        (w / "inner.sh").write_text(INNER_SCRIPT)
        self._write_seed()
        host_cg = _host_cgroup2()
        assert host_cg
        self.cgroup = Path(host_cg) / f"cloudfs-test-{uuid.uuid4().hex[:8]}"
        self.cgroup.mkdir()
        cg_procs = str(self.cgroup / "cgroup.procs")

        def enter_cgroup() -> None:  # runs in the child before exec: the cgroup ns root is this cgroup
            with open(cg_procs, "w") as f:
                f.write(str(os.getpid()))

        self.log = open(w / "unshare.log", "wb")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--pid", "--uts", "--ipc", "--cgroup", "--fork",
             "--propagation", "private", "/bin/sh", str(w / "inner.sh"), str(w)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=enter_cgroup, start_new_session=True,
        )  # fmt: skip
        self.pid = int(
            wait_for(self._child_pid, 10, "the namespace's PID 1 to start")  # type: ignore[arg-type]
        )
        try:
            wait_for(self._booted, timeout, "the private systemd to finish booting", interval=0.3)
        except TimeoutError:
            raise TimeoutError(f"private systemd did not boot:\n{self.diagnostics()}") from None

    def _child_pid(self) -> int | None:
        assert self.proc
        if self.proc.poll() is not None:
            raise RuntimeError(f"unshare exited with {self.proc.returncode}:\n{self.diagnostics()}")
        try:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return None
        if not kids:
            return None
        pid = int(kids[0])
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                return pid
        return None

    def _booted(self) -> bool:
        assert self.proc
        if self.proc.poll() is not None:
            raise RuntimeError(f"private systemd exited with {self.proc.returncode}:\n{self.diagnostics()}")
        r = self.run(["systemctl", "is-system-running"], timeout=10, check=False)
        state = r.stdout.strip()
        if state in ("running", "degraded"):
            self.boot_state = state
            return True
        return False

    # driving it

    def run(
        self, cmd: list[str], *, timeout: float = 30, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside all of the private systemd's namespaces (root and cwd are its /)."""
        assert self.pid
        r = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", "--wd=/", *cmd],
            capture_output=True, text=True, timeout=timeout, input=input,
            env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_PAGER": "",
                 "SYSTEMD_COLORS": "0", "LANG": "C.UTF-8"},
        )  # fmt: skip
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
        return r

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run(["/bin/sh", "-c", script], **kw)  # type: ignore[arg-type]

    def systemctl(self, *args: str, timeout: float = 60, check: bool = True):
        return self.run(["systemctl", "--no-pager", *args], timeout=timeout, check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        r = self.systemctl("show", unit, *[f"--property={p}" for p in props])
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def journal(self, unit: str | None = None, lines: int = 200) -> str:
        cmd = ["journalctl", "--no-pager", "-o", "short-monotonic", "-n", str(lines)]
        if unit:
            cmd += ["-u", unit]
        return self.run(cmd, check=False, timeout=30).stdout

    def mountinfo(self) -> str:
        return self.run(["cat", "/proc/self/mountinfo"]).stdout

    def cloudfs_mount_at(self, path: str) -> Mount | None:
        for m in reversed(parse_mountinfo(self.mountinfo())):
            if m.mountpoint == path and m.fstype.startswith("fuse"):
                return m
        return None

    def diagnostics(self) -> str:
        parts = []
        for name in ("unshare.log", "console.log"):
            with contextlib.suppress(OSError):
                parts.append(f"--- {name} (tail) ---\n" + (self.workdir / name).read_text()[-6000:])
        if self.pid and self.proc and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                parts.append("--- systemctl --failed ---\n" + self.systemctl("--failed", check=False).stdout)
            with contextlib.suppress(Exception):
                parts.append("--- journal (tail) ---\n" + self.journal(lines=80))
        return "\n".join(parts)

    # stopping it

    def poweroff(self, timeout: float = 60) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self.systemctl("poweroff", "--no-block", timeout=20, check=False)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)

    def cleanup(self) -> None:
        """Power off, then kill whatever is left in its cgroup by PID, and remove the cgroup."""
        try:
            self.poweroff()
        finally:
            if self.cgroup and self.cgroup.exists():
                for _ in range(20):
                    pids = _cgroup_pids(self.cgroup)
                    if not pids:
                        break
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    time.sleep(0.2)
                _remove_cgroup(self.cgroup)
            if self.proc and self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(10)
            with contextlib.suppress(Exception):
                self.log.close()
            # Nothing was mounted in the host's namespace: the overlay and tmpfs died with it.
            shutil.rmtree(self.workdir, ignore_errors=True)


def render_unit(name: str) -> str:
    """A shipped unit with ExecStart pointing at this venv's cloudfs (what install_units writes)."""
    from cloudfs.mount_helper import render_unit as render

    return render((UNITS_SRC / name).read_text(), CLOUDFS)


def dedent(s: str) -> str:
    return textwrap.dedent(s).lstrip()
