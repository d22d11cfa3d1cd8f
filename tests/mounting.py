"""Real mounts for tests: `cloudfs mount` exactly as a user runs it, always cleaned up."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from cloudfs.daemon import is_mounted
from tests.servers import Target

CLOUDFS = str(Path(sys.executable).with_name("cloudfs"))


def mounted(path: Path) -> bool:
    return is_mounted(str(path))  # the daemon's own check: one reading of mountinfo


class Mount:
    """A cloudfs daemon serving ``target`` on ``path``."""

    def __init__(self, target: Target, path: Path, cache_dir: Path, options: dict[str, str] | None = None
                 ) -> None:
        self.target = target
        self.path = path
        self.cache_dir = cache_dir
        self.options = {"cache_dir": str(cache_dir), "writeback_delay": "0.5", "attr_timeout": "1",
                        "cache_size": "512M", "block_size": "8M",
                        # Not the 1G default: a test machine's disk may have less to spare.
                        "min_free": "64M", **(options or {}), **target.options}
        self.env = {**os.environ, **target.env}

    def option_text(self) -> str:
        return ",".join(f"{k}={v}" if v else k for k, v in self.options.items())

    def start(self, timeout: float = 60) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([CLOUDFS, "mount", self.target.url, str(self.path), "-o", self.option_text()],
                              env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"cloudfs mount failed ({proc.returncode}): "
                               f"{proc.stderr.strip()}\n{self.log()}")
        assert mounted(self.path), "cloudfs mount returned 0 but nothing is mounted"

    def pid(self) -> int | None:
        from cloudfs.daemon import pid_file

        try:
            return int(Path(pid_file(str(self.path))).read_text())
        except (OSError, ValueError):
            return None

    def log(self) -> str:
        try:
            return (self.cache_dir / "cloudfs.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 120) -> None:
        """`cloudfs umount`: uploads pending data, then unmounts."""
        if not mounted(self.path):
            return
        proc = subprocess.run([CLOUDFS, "umount", str(self.path)], env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"cloudfs umount failed: {proc.stderr.strip()}\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL the daemon (a crash), then clear the dead mount."""
        pid = self.pid()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while mounted(self.path) and time.monotonic() < deadline:
            subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True)
            time.sleep(0.1)

    def cleanup(self) -> None:
        """Best effort, for fixture teardown after failures: never leave a mount behind.
        The log's tail goes to stdout, which pytest shows only for a failed test."""
        print(f"--- tail of {self.cache_dir / 'cloudfs.log'}\n{self.log()}")
        try:
            self.stop(timeout=60)
        except Exception:
            self.kill()
        if mounted(self.path):
            subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True)
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)

    def remount(self) -> None:
        self.stop()
        self.start()


def dir_bytes(path: Path) -> int:
    """Disk space allocated to the files below ``path``."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


class DirSampler:
    """Peak allocated size of a directory (a cache directory), sampled every ``interval`` s."""

    def __init__(self, path: Path, interval: float = 1.0) -> None:
        self.path = path
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, dir_bytes(self.path))
            self._stop.wait(self.interval)

    def __enter__(self) -> DirSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def on_a_terminal(args: list[str], env: dict[str, str], timeout: float = 120) -> bytes:
    """What ``args`` writes to a 100-column terminal (a pty) it runs on, and its exit code 0;
    killed (and the test failed) if it takes more than ``timeout``."""
    master, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(args, env=env, stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's last user is gone
                break
            if not chunk:
                break
            out += chunk
        else:
            proc.kill()
            pytest.fail(f"{args} still running after {timeout}s; its last output: {out[-300:]!r}")
    finally:
        os.close(master)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    assert code == 0, out[-1000:]
    return out

