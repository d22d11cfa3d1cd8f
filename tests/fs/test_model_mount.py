"""The stateful model test through a real mount: tests/model.py's rules as ordinary os calls.

The same random sequences as the in-process run (tests/vfs/test_model.py), with fewer steps,
through `cloudfs mount` on the local backend and S3 (moto): create/open/pwrite/truncate/
fsync/close, renames of files and folders (also over open files), unlink while open,
mkdir/rmdir, chmod, utime, user xattrs, the kernel forgetting inodes (drop_caches), pauses
that let the write-back uploads run, and remounts: ``cloudfs umount``, a plain
``fusermount3 -u`` (the daemon uploads, then exits) and SIGKILL of the daemon, each followed
by a mount with the same cache directory.  After each step the tree must equal the model's;
after each clean unmount, and at the end, the store must hold exactly the model's files
(content, mode, mtime, xattrs) and folder markers.

CLOUDFS_MOUNT_MODEL_EXAMPLES (default 8) and CLOUDFS_MOUNT_MODEL_STEPS (default 25) size it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule, run_state_machine_as_test

from cloudfs import layout
from cloudfs.backends import open_backend
from tests.model import TreeModel
from tests.mounting import Mount, mounted
from tests.servers import Target
from tests.vfs.conftest import BS

pytestmark = pytest.mark.backends("local", "s3")
EXAMPLES = int(os.environ.get("CLOUDFS_MOUNT_MODEL_EXAMPLES", "8"))
STEPS = int(os.environ.get("CLOUDFS_MOUNT_MODEL_STEPS", "25"))
MAX_REMOUNTS = 2  # per example: a mount takes a second or two
XATTRS = [b"user.a", b"user.b"]
_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> None:
    """syncfs(2): the kernel writes every dirty page of the mount back to the daemon."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def serving(pid: int, m: Mount) -> bool:
    """Whether ``pid`` is still the daemon of ``m`` (not gone, not a zombie, not reused)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return state != "Z" and os.fsencode(m.path) in cmdline


def store_contents(target: Target) -> dict[str, tuple[bytes, layout.Attrs]]:
    """Every key on the store, with its body and the attributes its metadata says."""
    backend = open_backend(target.url, target.options)

    async def read_all() -> dict[str, tuple[bytes, layout.Attrs]]:
        out = {}
        async for page in backend.list("", None):
            for o in page.objects:
                info = await backend.head(o.key)
                attrs = layout.decode(info.metadata, is_dir=o.key.endswith("/"), size=info.size,
                                      server_mtime=info.mtime, default_uid=0, default_gid=0)
                out[o.key] = (await backend.get_range(o.key) if info.size else b""), attrs
        return out

    try:
        return trio.run(read_all)
    finally:
        backend.close()


class MountModel(TreeModel):
    server: Any  # set by the test: a fresh bucket for every example
    workdir: Path
    mounts: list[tuple[Mount, list[int]]]  # every mount and its daemons, for the last-resort cleanup
    examples = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.here = self.workdir / f"example{next(self.examples)}"
        self.m = Mount(self.server.new_bucket(), self.here / "mnt", self.here / "cache",
                       {"block_size": str(BS), "writeback_delay": "0.5"})
        self.pids: list[int] = []
        self.mounts.append((self.m, self.pids))
        self.start()

    def p(self, path: str) -> Path:
        return self.m.path / path

    def changed(self) -> None:
        self.changes += 1
        self.paused = False

    def start(self) -> None:
        self.changes = 0  # since this mount
        self.paused = True  # nothing written since the last pause
        self.m.start()
        pid = self.m.pid()
        assert pid is not None
        self.pids.append(pid)

    def close_all(self) -> None:
        for fd in list(self.handles):
            os.close(fd)
        self.handles.clear()

    # ---- the mount, with ordinary os calls
    def do_write_file(self, path: str, data: bytes) -> None:
        self.changed()
        fd = os.open(self.p(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def do_open(self, path: str) -> int:
        return os.open(self.p(path), os.O_RDWR)

    def do_pwrite(self, fh: int, offset: int, chunk: bytes) -> None:
        self.changed()
        done = 0
        while done < len(chunk):
            done += os.pwrite(fh, chunk[done:], offset + done)

    def do_read(self, fh: int) -> bytes:
        out = bytearray()
        while chunk := os.pread(fh, 1 << 20, len(out)):
            out += chunk
        return bytes(out)

    def do_fsync(self, fh: int) -> None:
        os.fsync(fh)

    def do_close(self, fh: int) -> None:
        os.close(fh)

    def do_truncate(self, path: str, size: int) -> None:
        self.changed()
        os.truncate(self.p(path), size)

    def do_chmod(self, path: str, mode: int) -> None:
        self.changed()
        os.chmod(self.p(path), mode)

    def do_unlink(self, path: str) -> None:
        self.changed()
        os.unlink(self.p(path))

    def do_rename(self, src: str, dst: str) -> None:
        self.changed()
        os.rename(self.p(src), self.p(dst))

    def do_mkdir(self, path: str) -> None:
        self.changed()
        os.mkdir(self.p(path))

    def do_rmdir(self, path: str) -> None:
        self.changed()
        os.rmdir(self.p(path))

    def do_forget(self) -> None:
        Path("/proc/sys/vm/drop_caches").write_text("2")

    def seen_tree(self) -> tuple[set[str], set[str]]:
        files, dirs = set(), {""}
        todo = [""]
        while todo:
            d = todo.pop()
            for name in os.listdir(self.p(d)):
                path = f"{d}/{name}" if d else name
                if stat.S_ISDIR(os.lstat(self.p(path)).st_mode):
                    dirs.add(path)
                    todo.append(path)
                else:
                    files.add(path)
        return files, dirs

    def seen_file(self, path: str) -> tuple[bytes, int]:
        return self.p(path).read_bytes(), os.stat(self.p(path)).st_mode

    # ---- attributes only a mount drives here
    @precondition(TreeModel.has_files)
    @rule(data=st.data(), seconds=st.integers(0, 2_000_000_000),
          fraction=st.sampled_from([0, 1, 500_000_000, 999_999_999]))
    def utime(self, data: st.DataObject, seconds: int, fraction: int) -> None:
        path = self.pick_file(data)
        ns = seconds * 10**9 + fraction
        self.changed()
        os.utime(self.p(path), ns=(ns, ns))
        self.files[path].mtime_ns = ns

    @precondition(TreeModel.has_files)
    @rule(data=st.data(), name=st.sampled_from(XATTRS), value=st.binary(max_size=40))
    def setxattr(self, data: st.DataObject, name: bytes, value: bytes) -> None:
        path = self.pick_file(data)
        self.changed()
        os.setxattr(self.p(path), name, value)
        self.files[path].xattrs[name] = value

    @precondition(TreeModel.has_files)
    @rule(data=st.data(), name=st.sampled_from(XATTRS))
    def removexattr(self, data: st.DataObject, name: bytes) -> None:
        path = self.pick_file(data)
        obj = self.files[path]
        if name not in obj.xattrs:
            with pytest.raises(OSError) as exc:
                os.removexattr(self.p(path), name)
            assert exc.value.errno == errno.ENODATA
            return
        self.changed()
        os.removexattr(self.p(path), name)
        del obj.xattrs[name]

    # ---- time, uploads, restarts
    # Both are slow and take no arguments (hypothesis tries such rules first): they wait
    # until there is something for them to act on.
    @precondition(lambda self: not self.paused)
    @rule()
    def pause(self) -> None:
        time.sleep(0.7)  # past writeback_delay: uploads run under the next steps
        self.paused = True

    @precondition(lambda self: self.changes >= 3 and len(self.pids) <= MAX_REMOUNTS)
    @rule(how=st.sampled_from(["umount", "fusermount", "sigkill"]))
    def remount(self, how: str) -> None:
        if how == "sigkill":
            # Through the kernel, pwrite() may sit in the page cache (writeback_cache) until
            # close, fsync or the kernel's own write-back: such data was never passed on, and
            # a SIGKILL may lose it (docs/semantics.md, "Writing": a killed process loses nothing
            # the kernel had passed on).  syncfs passes it all on without any fsync, so the
            # model's promise is exact again: every named file as the model has it.
            syncfs(self.m.path)
            self.m.kill()
            for fd in self.handles:
                with contextlib.suppress(OSError):
                    os.close(fd)  # the mount is gone: the handles die with it
            self.handles.clear()
        else:
            self.close_all()  # a busy mount is not unmounted: the programs close first
            if how == "umount":
                self.m.stop()
            else:
                subprocess.run(["fusermount3", "-u", str(self.m.path)], check=True, timeout=30)
                deadline = time.monotonic() + 60
                while serving(self.pids[-1], self.m) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert not serving(self.pids[-1], self.m), "the daemon did not exit after fusermount3 -u"
            self.store_matches()
        self.start()

    # ---- checks
    @invariant()
    def attrs_match(self) -> None:
        for path, obj in self.files.items():
            if obj.mtime_ns is not None:
                assert os.stat(self.p(path)).st_mtime_ns == obj.mtime_ns, path
            seen = {os.fsencode(n): os.getxattr(self.p(path), n) for n in os.listxattr(self.p(path))}
            assert seen == obj.xattrs, path

    def store_matches(self) -> None:
        """After a clean unmount: the store holds the model, and nothing else."""
        stored = store_contents(self.m.target)
        assert set(stored) == self.expected_keys(), (sorted(stored), sorted(self.expected_keys()))
        for path, obj in self.files.items():
            data, attrs = stored[path]
            assert data == bytes(obj.data), path
            assert stat.S_IMODE(attrs.mode) == obj.mode, (path, oct(attrs.mode))
            assert attrs.xattrs == obj.xattrs, path
            if obj.mtime_ns is not None:
                assert attrs.mtime_ns == obj.mtime_ns, path

    def teardown(self) -> None:
        try:
            self.close_all()
            self.m.stop()
            self.store_matches()
        finally:
            for fd in self.handles:
                with contextlib.suppress(OSError):
                    os.close(fd)
            finish(self.m, self.pids)  # the cache dir stays, with its cloudfs.log, for a failure


def finish(m: Mount, pids: list[int]) -> None:
    """Never leave a mount or a daemon behind: unmount, kill what still runs, detach last."""
    with contextlib.suppress(Exception):
        m.cleanup()
    for pid in pids:
        if serving(pid, m):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if mounted(m.path):
        subprocess.run(["fusermount3", "-uz", str(m.path)], capture_output=True)


def test_model_through_a_mount(server: Any, target: Target, tmp_path: Path) -> None:
    MountModel.server = server  # `target` set the store's environment; each example takes a bucket
    MountModel.workdir = tmp_path
    MountModel.mounts = []
    umask = os.umask(0o022)  # new files are 0644, as the model says
    try:
        run_state_machine_as_test(MountModel, settings=settings(
            max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None,
            suppress_health_check=list(HealthCheck)))
    finally:
        os.umask(umask)
        for m, pids in MountModel.mounts:
            finish(m, pids)
