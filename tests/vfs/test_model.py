"""A stateful model test: random operation sequences against a reference model.

Hypothesis drives create/open/pwrite/truncate/fsync/close, renames of files and folders
(also over open files), unlink while open, mkdir/rmdir, chmod, kernel forget, uploads,
clean remounts and SIGKILL + remount.  After each step that can change what a reader sees,
and at the end, the tree (names, content, modes) must equal the model's; after a remount
the store must hold the same.

The reference model and its rules are tests/model.py, shared with the real-mount run
(tests/fs/test_model_mount.py); this module adds uploads and remounts, and drives it
in-process (the VFS on a trio loop in a helper thread, driven from hypothesis).
Shrunk failures become ordinary tests in test_integrity.py.
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

from tests.model import TreeModel
from tests.vfs.conftest import FS, Rig

T = TypeVar("T")


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


class Model(TreeModel):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(prefix="cloudfs-model-")
        self.loop = Loop()
        self.rig = Rig(Path(self.tmp.name))
        self.mount = MountTask(self.loop, self.rig)

    @property
    def fs(self) -> FS:
        return self.mount.fs

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return self.loop.run(fn, *args)

    # ---- the VFS, called as the kernel would
    def do_write_file(self, path: str, data: bytes) -> None:
        self.call(self.fs.write_file, path, data)

    def do_open(self, path: str) -> int:
        return self.call(self.fs.open, path, os.O_RDWR)

    def do_pwrite(self, fh: int, offset: int, chunk: bytes) -> None:
        self.call(self.fs.write, fh, offset, chunk)

    def do_read(self, fh: int) -> bytes:
        return self.call(self.fs.read, fh)

    def do_fsync(self, fh: int) -> None:
        self.call(self.fs.fsync, fh)

    def do_close(self, fh: int) -> None:
        self.call(self.fs.release, fh)

    def do_truncate(self, path: str, size: int) -> None:
        self.call(functools.partial(self.fs.setattr, path, size=size))

    def do_chmod(self, path: str, mode: int) -> None:
        self.call(functools.partial(self.fs.setattr, path, mode=mode))

    def do_unlink(self, path: str) -> None:
        self.call(self.fs.unlink, path)

    def do_rename(self, src: str, dst: str) -> None:
        self.call(self.fs.rename, src, dst)

    def do_mkdir(self, path: str) -> None:
        self.call(self.fs.mkdir, path)

    def do_rmdir(self, path: str) -> None:
        self.call(self.fs.rmdir, path)

    def do_forget(self) -> None:
        self.fs.forget_all()

    def seen_tree(self) -> tuple[set[str], set[str]]:
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

        return self.call(walk)

    def seen_file(self, path: str) -> tuple[bytes, int]:
        return self.call(self.fs.read_file, path), self.call(self.fs.stat, path).attrs.mode

    # ---- uploads, restarts
    @rule()
    def upload_all(self) -> None:
        self.call(self.fs.sync)

    @rule(crash=st.booleans())
    def remount(self, crash: bool) -> None:
        self.mount.leave(crash=crash)
        self.handles.clear()  # the processes holding them are gone with the mount
        self.mount = MountTask(self.loop, self.rig)

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
