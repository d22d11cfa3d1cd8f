"""The reference model of a file tree, shared by the stateful model tests.

Hypothesis drives create/open/pwrite/truncate/fsync/close, renames of files and folders
(also over open files), unlink while open, mkdir/rmdir, chmod and kernel forget; each rule
checks its precondition against the model, asks the file system under test (the ``do_*``
methods of a subclass) and updates the model.  After each step, the tree (names, content,
modes) must equal the model's (``tree_matches``).

The model knows files as objects (inodes), so a handle keeps its file across rename and
unlink, as POSIX says.  A killed process loses nothing the kernel had passed on
(docs/semantics.md), so a crash + remount must give exactly the model's named files.

Two drivers: tests/vfs/test_model.py (in-process, the VFS called directly) and
tests/fs/test_model_mount.py (a real FUSE mount, with ordinary os calls).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.vfs.conftest import BS

DIRS = ["d", "e", "d/s"]
NAMES = ["a", "b", "c"]
# Names in the root come up more often: they need no folder first.
PATHS = NAMES * 3 + [f"{d}/{n}" for d in DIRS for n in NAMES]


@dataclass(eq=False)
class Obj:
    """One file (an inode): what every name and handle on it must show."""

    data: bytearray = field(default_factory=bytearray)
    mode: int = 0o644
    mtime_ns: int | None = None  # set by utime and not written since; None: the clock decides
    xattrs: dict[bytes, bytes] = field(default_factory=dict)

    def written(self) -> None:
        self.mtime_ns = None


class TreeModel(RuleBasedStateMachine):
    """The rules every model test shares; a subclass says how each call reaches its file system."""

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, Obj] = {}
        self.dirs: set[str] = {""}
        self.handles: dict[int, Obj] = {}

    # ---- the file system under test (a subclass implements these)
    def do_write_file(self, path: str, data: bytes) -> None:
        """Create or truncate ``path`` (mode 0644 if new), write ``data``, close."""
        raise NotImplementedError

    def do_open(self, path: str) -> int:
        raise NotImplementedError

    def do_pwrite(self, fh: int, offset: int, chunk: bytes) -> None:
        raise NotImplementedError

    def do_read(self, fh: int) -> bytes:
        """All of the file, from offset 0, through the handle."""
        raise NotImplementedError

    def do_fsync(self, fh: int) -> None:
        raise NotImplementedError

    def do_close(self, fh: int) -> None:
        raise NotImplementedError

    def do_truncate(self, path: str, size: int) -> None:
        raise NotImplementedError

    def do_chmod(self, path: str, mode: int) -> None:
        raise NotImplementedError

    def do_unlink(self, path: str) -> None:
        raise NotImplementedError

    def do_rename(self, src: str, dst: str) -> None:
        raise NotImplementedError

    def do_mkdir(self, path: str) -> None:
        raise NotImplementedError

    def do_rmdir(self, path: str) -> None:
        raise NotImplementedError

    def do_forget(self) -> None:
        """The kernel forgets every inode it holds no handle on."""
        raise NotImplementedError

    def seen_tree(self) -> tuple[set[str], set[str]]:
        """(file paths, folder paths with "" for the root) as a walk of the tree finds them."""
        raise NotImplementedError

    def seen_file(self, path: str) -> tuple[bytes, int]:
        """(content read by path, st_mode)."""
        raise NotImplementedError

    # ---- helpers
    @staticmethod
    def parent(path: str) -> str:
        return path.rpartition("/")[0]

    def can_hold(self, path: str) -> bool:
        return self.parent(path) in self.dirs and path not in self.dirs

    def pick_handle(self, data: st.DataObject) -> int | None:
        return data.draw(st.sampled_from(sorted(self.handles))) if self.handles else None

    def pick_file(self, data: st.DataObject) -> str:
        """A name that exists: rules on files draw from the model, so no step is wasted."""
        return data.draw(st.sampled_from(sorted(self.files)), label="path")

    def pick_dir(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(sorted(self.dirs - {""})), label="folder")

    def has_files(self) -> bool:
        return bool(self.files)

    def has_handles(self) -> bool:
        return bool(self.handles)

    def has_dirs(self) -> bool:
        return len(self.dirs) > 1

    def below(self, d: str) -> list[str]:
        prefix = d + "/"
        return [p for p in [*self.files, *self.dirs] if p.startswith(prefix)]

    def expected_keys(self) -> set[str]:
        """What the store holds once everything is uploaded: the files, and a marker per folder
        (every folder here was made by mkdir or moved by a rename, both write one)."""
        return set(self.files) | {d + "/" for d in self.dirs if d}

    # ---- files
    @rule(path=st.sampled_from(PATHS), data=st.binary(max_size=BS + 100))
    def write_file(self, path: str, data: bytes) -> None:
        if not self.can_hold(path):
            return
        self.do_write_file(path, data)
        obj = self.files.get(path)
        if obj is None:
            self.files[path] = Obj(bytearray(data))
        else:
            obj.data[:] = data  # O_TRUNC on an existing file keeps the inode
            obj.written()

    @precondition(lambda self: self.files and len(self.handles) < 4)
    @rule(data=st.data())
    def open(self, data: st.DataObject) -> None:
        path = self.pick_file(data)
        fh = self.do_open(path)
        self.handles[fh] = self.files[path]

    @precondition(has_handles)
    @rule(data=st.data(), offset=st.integers(0, 3 * BS), chunk=st.binary(min_size=1, max_size=BS + 7))
    def pwrite(self, data: st.DataObject, offset: int, chunk: bytes) -> None:
        fh = self.pick_handle(data)
        if fh is None:
            return
        obj = self.handles[fh]
        self.do_pwrite(fh, offset, chunk)
        if len(obj.data) < offset:
            obj.data.extend(bytes(offset - len(obj.data)))
        obj.data[offset:offset + len(chunk)] = chunk
        obj.written()

    @precondition(has_handles)
    @rule(data=st.data())
    def read_handle(self, data: st.DataObject) -> None:
        fh = self.pick_handle(data)
        if fh is None:
            return
        assert self.do_read(fh) == bytes(self.handles[fh].data)

    @precondition(has_handles)
    @rule(data=st.data())
    def fsync(self, data: st.DataObject) -> None:
        fh = self.pick_handle(data)
        if fh is not None:
            self.do_fsync(fh)

    @precondition(has_handles)
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        fh = self.pick_handle(data)
        if fh is None:
            return
        self.do_close(fh)
        del self.handles[fh]

    @precondition(has_files)
    @rule(data=st.data(), size=st.integers(0, 3 * BS))
    def truncate(self, data: st.DataObject, size: int) -> None:
        path = self.pick_file(data)
        self.do_truncate(path, size)
        obj = self.files[path]
        if size < len(obj.data):
            del obj.data[size:]
        else:
            obj.data.extend(bytes(size - len(obj.data)))
        obj.written()

    @precondition(has_files)
    @rule(data=st.data(), mode=st.sampled_from([0o600, 0o640, 0o755]))
    def chmod(self, data: st.DataObject, mode: int) -> None:
        path = self.pick_file(data)
        self.do_chmod(path, mode)
        self.files[path].mode = mode

    @precondition(has_files)
    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        path = self.pick_file(data)
        self.do_unlink(path)
        del self.files[path]

    @precondition(has_files)
    @rule(data=st.data(), dst=st.sampled_from(PATHS))
    def rename_file(self, data: st.DataObject, dst: str) -> None:
        src = self.pick_file(data)
        if not self.can_hold(dst) or src == dst:
            return
        self.do_rename(src, dst)
        self.files[dst] = self.files.pop(src)

    # ---- folders
    @rule(path=st.sampled_from(DIRS))
    def mkdir(self, path: str) -> None:
        if path in self.dirs or path in self.files or self.parent(path) not in self.dirs:
            return
        self.do_mkdir(path)
        self.dirs.add(path)

    @precondition(has_dirs)
    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        path = self.pick_dir(data)
        if self.below(path):
            try:
                self.do_rmdir(path)
            except OSError as exc:
                assert exc.errno == 39  # ENOTEMPTY
                return
            raise AssertionError(f"rmdir of non-empty {path} succeeded")
        self.do_rmdir(path)
        self.dirs.discard(path)

    @precondition(has_dirs)
    @rule(data=st.data(), dst=st.sampled_from(DIRS))
    def rename_dir(self, data: st.DataObject, dst: str) -> None:
        src = self.pick_dir(data)
        if dst in self.dirs or dst in self.files:
            return
        if self.parent(dst) not in self.dirs or (dst + "/").startswith(src + "/"):
            return
        self.do_rename(src, dst)
        moved = {p: dst + p[len(src):] for p in [src, *self.below(src)]}
        for old, new in moved.items():
            if old in self.files:
                self.files[new] = self.files.pop(old)
            else:
                self.dirs.discard(old)
                self.dirs.add(new)

    # ---- the kernel
    @rule()
    def kernel_forgets(self) -> None:
        self.do_forget()

    # ---- checks
    @invariant()
    def tree_matches(self) -> None:
        files, dirs = self.seen_tree()
        assert files == set(self.files), (files, set(self.files))
        assert dirs == self.dirs, (dirs, self.dirs)
        for path, obj in self.files.items():
            content, mode = self.seen_file(path)
            assert content == bytes(obj.data), path
            assert stat.S_IMODE(mode) == obj.mode, (path, oct(mode))
