"""A stateful model test: random operation sequences against a reference model.

Hypothesis drives create/open/pwrite/truncate/fsync/close, renames of files and folders
(also over open files), unlink while open, mkdir/rmdir, chmod, kernel forget, uploads,
clean remounts and SIGKILL + remount.  After each step that can change what a reader sees,
and at the end, the tree (names, content, modes) must equal the model's; after a remount
the store must hold the same.

The model knows files as objects (inodes), so a handle keeps its file across rename and
unlink, as POSIX says.  A killed process loses nothing the kernel had passed on
(docs/semantics.md), so a crash + remount must give exactly the model's named files.

Runs in-process (the VFS on a trio loop in a helper thread, driven from hypothesis).
Shrunk failures become ordinary tests in test_integrity.py.
"""

from __future__ import annotations

import functools
import os
import stat
import tempfile
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.vfs.conftest import BS, FS, Rig

T = TypeVar("T")

DIRS = ["d", "e", "d/s"]
NAMES = ["a", "b", "c"]
# Names in the root come up more often: they need no folder first.
PATHS = NAMES * 3 + [f"{d}/{n}" for d in DIRS for n in NAMES]


class Loop:
    """A trio loop in a helper thread; hypothesis's rules (plain functions) call into it."""

    def __init__(self) -> None:
        ready = threading.Event()
        self.error: BaseException | None = None

        async def main() -> None:
            self.token = trio.lowlevel.current_trio_token()
            self.stop = trio.Event()
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                ready.set()
                await self.stop.wait()
                nursery.cancel_scope.cancel()

        def runner() -> None:
            try:
                trio.run(main)
            except BaseException as exc:  # reported by close()
                self.error = exc
                ready.set()

        self.thread = threading.Thread(target=runner, daemon=True)
        self.thread.start()
        ready.wait(60)

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(fn, *args, trio_token=self.token)

    def close(self) -> None:
        trio.from_thread.run_sync(self.stop.set, trio_token=self.token)
        self.thread.join(60)
        if self.error is not None:
            raise self.error


class MountTask:
    """One mount of the rig, held open by a task on the loop until ``leave``."""

    def __init__(self, loop: Loop, rig: Rig) -> None:
        self.loop = loop
        self.rig = rig
        self.done = trio.Event()
        self.failure: BaseException | None = None
        self.fs: FS = loop.run(self._start)

    async def _start(self) -> FS:
        started: list[FS] = []
        got = trio.Event()
        self.release = trio.Event()

        async def hold() -> None:
            try:
                async with self.rig.mounted() as fs:
                    started.append(fs)
                    got.set()
                    await self.release.wait()
            except BaseException as exc:
                self.failure = exc
                got.set()
            finally:
                self.done.set()

        self.loop.nursery.start_soon(hold)
        await got.wait()
        if not started:
            raise AssertionError("mount failed") from self.failure
        return started[0]

    def leave(self, crash: bool) -> None:
        async def stop() -> None:
            self.fs.crashed = crash
            self.release.set()
            await self.done.wait()

        self.loop.run(stop)
        if self.failure is not None:
            raise self.failure


@dataclass(eq=False)
class Obj:
    data: bytearray = field(default_factory=bytearray)
    mode: int = 0o644


class Model(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(prefix="cloudfs-model-")
        self.loop = Loop()
        self.rig = Rig(Path(self.tmp.name))
        self.mount = MountTask(self.loop, self.rig)
        self.files: dict[str, Obj] = {}
        self.dirs: set[str] = {""}
        self.handles: dict[int, Obj] = {}

    # ---- helpers
    @property
    def fs(self) -> FS:
        return self.mount.fs

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return self.loop.run(fn, *args)

    @staticmethod
    def parent(path: str) -> str:
        return path.rpartition("/")[0]

    def can_hold(self, path: str) -> bool:
        return self.parent(path) in self.dirs and path not in self.dirs

    def pick_handle(self, data: st.DataObject) -> int | None:
        return data.draw(st.sampled_from(sorted(self.handles))) if self.handles else None

    def below(self, d: str) -> list[str]:
        prefix = d + "/"
        return [p for p in [*self.files, *self.dirs] if p.startswith(prefix)]

    # ---- files
    @rule(path=st.sampled_from(PATHS), data=st.binary(max_size=BS + 100))
    def write_file(self, path: str, data: bytes) -> None:
        if not self.can_hold(path):
            return
        self.call(self.fs.write_file, path, data)
        obj = self.files.get(path)
        if obj is None:
            self.files[path] = Obj(bytearray(data))
        else:
            obj.data[:] = data  # O_TRUNC on an existing file keeps the inode

    @rule(path=st.sampled_from(PATHS))
    def open(self, path: str) -> None:
        if path not in self.files or len(self.handles) >= 4:
            return
        fh = self.call(self.fs.open, path, os.O_RDWR)
        self.handles[fh] = self.files[path]

    @rule(data=st.data(), offset=st.integers(0, 3 * BS), chunk=st.binary(min_size=1, max_size=BS + 7))
    def pwrite(self, data: st.DataObject, offset: int, chunk: bytes) -> None:
        fh = self.pick_handle(data)
        if fh is None:
            return
        obj = self.handles[fh]
        self.call(self.fs.write, fh, offset, chunk)
        if len(obj.data) < offset:
            obj.data.extend(bytes(offset - len(obj.data)))
        obj.data[offset:offset + len(chunk)] = chunk

    @rule(data=st.data())
    def read_handle(self, data: st.DataObject) -> None:
        fh = self.pick_handle(data)
        if fh is None:
            return
        assert self.call(self.fs.read, fh) == bytes(self.handles[fh].data)

    @rule(data=st.data())
    def fsync(self, data: st.DataObject) -> None:
        fh = self.pick_handle(data)
        if fh is not None:
            self.call(self.fs.fsync, fh)

    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        fh = self.pick_handle(data)
        if fh is None:
            return
        self.call(self.fs.release, fh)
        del self.handles[fh]

    @rule(path=st.sampled_from(PATHS), size=st.integers(0, 3 * BS))
    def truncate(self, path: str, size: int) -> None:
        if path not in self.files:
            return
        self.call(functools.partial(self.fs.setattr, path, size=size))
        obj = self.files[path]
        if size < len(obj.data):
            del obj.data[size:]
        else:
            obj.data.extend(bytes(size - len(obj.data)))

    @rule(path=st.sampled_from(PATHS), mode=st.sampled_from([0o600, 0o640, 0o755]))
    def chmod(self, path: str, mode: int) -> None:
        if path not in self.files:
            return
        self.call(functools.partial(self.fs.setattr, path, mode=mode))
        self.files[path].mode = mode

    @rule(path=st.sampled_from(PATHS))
    def unlink(self, path: str) -> None:
        if path not in self.files:
            return
        self.call(self.fs.unlink, path)
        del self.files[path]

    @rule(src=st.sampled_from(PATHS), dst=st.sampled_from(PATHS))
    def rename_file(self, src: str, dst: str) -> None:
        if src not in self.files or not self.can_hold(dst) or src == dst:
            return
        self.call(self.fs.rename, src, dst)
        self.files[dst] = self.files.pop(src)

    # ---- folders
    @rule(path=st.sampled_from(DIRS))
    def mkdir(self, path: str) -> None:
        if path in self.dirs or path in self.files or self.parent(path) not in self.dirs:
            return
        self.call(self.fs.mkdir, path)
        self.dirs.add(path)

    @rule(path=st.sampled_from(DIRS))
    def rmdir(self, path: str) -> None:
        if path not in self.dirs:
            return
        if self.below(path):
            try:
                self.call(self.fs.rmdir, path)
            except OSError as exc:
                assert exc.errno == 39  # ENOTEMPTY
                return
            raise AssertionError(f"rmdir of non-empty {path} succeeded")
        self.call(self.fs.rmdir, path)
        self.dirs.discard(path)

    @rule(src=st.sampled_from(DIRS), dst=st.sampled_from(DIRS))
    def rename_dir(self, src: str, dst: str) -> None:
        if src not in self.dirs or dst in self.dirs or dst in self.files:
            return
        if self.parent(dst) not in self.dirs or (dst + "/").startswith(src + "/"):
            return
        self.call(self.fs.rename, src, dst)
        moved = {p: dst + p[len(src):] for p in [src, *self.below(src)]}
        for old, new in moved.items():
            if old in self.files:
                self.files[new] = self.files.pop(old)
            else:
                self.dirs.discard(old)
                self.dirs.add(new)

    # ---- the kernel, uploads, restarts
    @rule()
    def kernel_forgets(self) -> None:
        self.fs.forget_all()

    @rule()
    def upload_all(self) -> None:
        self.call(self.fs.sync)

    @rule(crash=st.booleans())
    def remount(self, crash: bool) -> None:
        self.mount.leave(crash=crash)
        self.handles.clear()  # the processes holding them are gone with the mount
        self.mount = MountTask(self.loop, self.rig)

    # ---- checks
    @invariant()
    def tree_matches(self) -> None:
        async def walk() -> tuple[set[str], set[str]]:
            files, dirs = set(), {""}
            todo = [""]
            while todo:
                d = todo.pop()
                for name in await self.fs.listdir(d):
                    path = f"{d}/{name}" if d else name
                    inode = await self.fs.stat(path)
                    if inode.is_dir:
                        dirs.add(path)
                        todo.append(path)
                    else:
                        files.add(path)
            return files, dirs

        files, dirs = self.call(walk)
        assert files == set(self.files), (files, set(self.files))
        assert dirs == self.dirs, (dirs, self.dirs)
        for path, obj in self.files.items():
            assert self.call(self.fs.read_file, path) == bytes(obj.data), path
            mode = self.call(self.fs.stat, path).attrs.mode
            assert stat.S_IMODE(mode) == obj.mode, (path, oct(mode))

    def teardown(self) -> None:
        try:
            for fh in list(self.handles):
                self.call(self.fs.release, fh)
            self.mount.leave(crash=False)
            stored = {}
            for path in self.files:
                stored[path] = self.call(_read_store, self.rig, path)
            for path, obj in self.files.items():
                assert stored[path] == bytes(obj.data), path
        finally:
            self.loop.close()
            self.tmp.cleanup()


async def _read_store(rig: Rig, key: str) -> bytes | None:
    from cloudfs.backends import open_backend

    backend = open_backend(f"file://{rig.root}", {})
    try:
        return await backend.get_range(key)
    finally:
        backend.close()


Model.TestCase.settings = settings(max_examples=int(os.environ.get("CLOUDFS_MODEL_EXAMPLES", "40")),
                                   stateful_step_count=50, deadline=None,
                                   suppress_health_check=list(HealthCheck))
test_model = Model.TestCase
