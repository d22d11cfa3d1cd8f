"""The differential POSIX test: the same scripted calls on a cloudfs mount and on a plain
local directory (ext4 or tmpfs), as root and as an unprivileged user; errno values, stat
fields (type, permissions, owner, size, nlink, rdev, whether mtime and ctime moved) and
listings must match, except for the differences listed in DOCUMENTED (each one is in
docs/semantics.md, with its reason).  It runs on every backend; what a store cannot keep
(its server module's DIVERGENCES) is left out of the remount check there.

The calls run in a child process (tests/fs/posix_steps.py), under ``setpriv`` for uid 65534,
so the kernel's own checks (``default_permissions``) take part as they do for programs.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fs.posix_steps import describe
from tests.mounting import Mount
from tests.servers import Target, diverges

STEPS = str(Path(__file__).with_name("posix_steps.py"))
NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
LONG = "n" * 256  # one byte over NAME_MAX
T = 1_000_000_000_000_000_000  # 2001-09-09, in ns
Step = tuple[Any, ...]  # (who, op, *args); who is "root" or "nobody"

# Each sequence runs in a fresh directory of its own (mode 0777, made by root).
SEQUENCES: dict[str, list[Step]] = {
    "open_flags": [
        ("root", "open", "f", ["O_CREAT", "O_WRONLY"]),
        ("root", "open", "f", ["O_CREAT", "O_EXCL", "O_WRONLY"]),  # EEXIST
        ("root", "write", "f", "hello"),
        ("root", "stat", "f"),
        ("root", "open", "f", ["O_WRONLY", "O_TRUNC"]),
        ("root", "stat", "f"),  # size 0, mtime and ctime moved
        ("root", "symlink", "f", "l"),
        ("root", "open", "l", ["O_RDONLY", "O_NOFOLLOW"]),  # ELOOP
        ("root", "open", "f", ["O_RDONLY", "O_DIRECTORY"]),  # ENOTDIR
        ("root", "open", "l", ["O_RDONLY", "O_DIRECTORY"]),  # ENOTDIR (through the link)
        ("root", "mkdir", "d"),
        ("root", "open", "d", ["O_WRONLY"]),  # EISDIR
        ("root", "open", "d", ["O_RDONLY", "O_DIRECTORY"]),
        ("root", "open", "d", ["O_CREAT", "O_EXCL", "O_WRONLY"]),  # EEXIST
        ("root", "open", "missing", ["O_RDONLY"]),  # ENOENT
        ("root", "list", "."),
    ],
    "renames": [
        ("root", "mkdir", "d"),
        ("root", "open", "f", ["O_CREAT", "O_WRONLY"]),
        ("root", "rename", "d", "f"),  # ENOTDIR
        ("root", "rename", "f", "d"),  # EISDIR
        ("root", "mkdir", "d/sub"),
        ("root", "rename", "d", "d/sub/x"),  # EINVAL
        ("root", "rename", "d", "d/sub"),  # EINVAL
        ("root", "mkdir", "e"),
        ("root", "open", "e/x", ["O_CREAT", "O_WRONLY"]),
        ("root", "rename", "d", "e"),  # ENOTEMPTY
        ("root", "mkdir", "empty"),
        ("root", "rename", "d", "empty"),  # over an empty directory: fine
        ("root", "rename", "missing", "g"),  # ENOENT
        ("root", "rename", "f", "f"),  # itself: nothing happens
        ("root", "rename", "f", "g"),
        ("root", "stat", "g"),
        ("root", "list", "."),
        ("root", "list", "empty"),
    ],
    "rmdir_and_existing_names": [
        ("root", "mkdir", "d"),
        ("root", "open", "d/x", ["O_CREAT", "O_WRONLY"]),
        ("root", "rmdir", "d"),  # ENOTEMPTY
        ("root", "open", "f", ["O_CREAT", "O_WRONLY"]),
        ("root", "rmdir", "f"),  # ENOTDIR
        ("root", "rmdir", "missing"),  # ENOENT
        ("root", "unlink", "d"),  # EISDIR
        ("root", "mkdir", "f"),  # EEXIST
        ("root", "mkdir", "d"),  # EEXIST
        ("root", "symlink", "x", "f"),  # EEXIST
        ("root", "symlink", "x", "d"),  # EEXIST
        ("root", "mkfifo", "f"),  # EEXIST
        ("root", "list", "."),
    ],
    "names_and_paths": [
        ("root", "open", LONG, ["O_CREAT", "O_WRONLY"]),  # ENAMETOOLONG
        ("root", "mkdir", LONG),  # ENAMETOOLONG
        ("root", "stat", LONG),  # ENAMETOOLONG
        ("root", "symlink", "x", LONG),  # ENAMETOOLONG
        ("root", "open", "f", ["O_CREAT", "O_WRONLY"]),
        ("root", "open", "f/x", ["O_CREAT", "O_WRONLY"]),  # ENOTDIR
        ("root", "stat", "f/x"),  # ENOTDIR
        ("root", "mkdir", "f/x"),  # ENOTDIR
        ("root", "mkdir", "d"),
        ("root", "truncate", "d", 0),  # EISDIR
        ("root", "symlink", "loop2", "loop1"),
        ("root", "symlink", "loop1", "loop2"),
        ("root", "stat", "loop1"),
        ("root", "open", "loop1", ["O_RDONLY"]),  # ELOOP
        ("root", "list", "."),
    ],
    "dots_and_wrong_types": [
        ("root", "mkdir", "d"),
        ("root", "open", "f", ["O_CREAT", "O_WRONLY"]),
        ("root", "rmdir", "."),  # EINVAL
        ("root", "rmdir", "d/."),  # EINVAL
        ("root", "rmdir", "d/.."),  # ENOTEMPTY
        ("root", "rename", "d/.", "e"),  # EBUSY
        ("root", "rename", "f", "d/.."),  # EBUSY
        ("root", "ftruncate", "f", 0, ["O_RDONLY"]),  # EINVAL: not open for writing
        ("root", "ftruncate", "d", 0, ["O_RDONLY", "O_DIRECTORY"]),  # EINVAL
        ("root", "open", "/".join(["d"] * 2100), ["O_RDONLY"]),  # ENAMETOOLONG: over PATH_MAX
        ("root", "symlink", "l2", "l1"),
        ("root", "symlink", "l1", "l2"),
        ("root", "stat", "l1/x"),  # ELOOP along the path
        ("root", "list", "."),
    ],
    "special_files": [
        ("root", "mkfifo", "p", 0o640),
        ("root", "mknod", "c", stat.S_IFCHR | 0o600, [1, 3]),
        ("root", "mknod", "b", stat.S_IFBLK | 0o640, [7, 0]),
        ("root", "mknod", "r", stat.S_IFREG | 0o644),
        ("root", "stat", "p"),
        ("root", "stat", "c"),
        ("root", "stat", "b"),
        ("root", "stat", "r"),
        ("root", "chmod", "p", 0o600),
        ("root", "stat", "p"),
        ("root", "chown", "c", NOBODY, NOBODY),
        ("root", "stat", "c"),
        ("root", "rename", "p", "q"),
        ("root", "stat", "q"),
        ("root", "truncate", "q", 0),  # a FIFO: EINVAL
        ("root", "list", "."),
        ("root", "unlink", "q"),
        ("root", "unlink", "c"),
        ("root", "list", "."),
    ],
    "times": [
        ("root", "open", "f", ["O_CREAT", "O_WRONLY"]),
        ("root", "stat", "f"),
        ("root", "write", "f", "data"),
        ("root", "stat", "f"),  # mtime and ctime moved
        ("root", "read", "f"),
        ("root", "stat", "f"),  # nothing moved
        ("root", "chmod", "f", 0o600),
        ("root", "stat", "f"),  # ctime moved, mtime did not
        ("root", "utimensat", "f", "omit", "omit"),
        ("root", "stat", "f"),  # nothing moved
        ("root", "utimensat", "f", "now", "omit"),
        ("root", "stat", "f"),  # ctime moved, mtime did not
        ("root", "utimensat", "f", "omit", "now"),
        ("root", "stat", "f"),
        ("root", "utimensat", "f", T, T),
        ("root", "stat", "f"),
        ("root", "utimensat", "f", "now", "now"),
        ("root", "stat", "f"),
        ("root", "setxattr", "f", "user.k", "v"),
        ("root", "stat", "f"),
        ("root", "truncate", "f", 2),
        ("root", "stat", "f"),
        ("root", "ftruncate", "f", 1),
        ("root", "stat", "f"),
        ("root", "rename", "f", "g"),
        ("root", "stat", "g"),
        ("root", "mkdir", "d"),
        ("root", "stat", "d"),
        ("root", "chmod", "d", 0o700),
        ("root", "stat", "d"),
        ("root", "utimensat", "d", T, T),
        ("root", "stat", "d"),
    ],
    "ownership": [
        ("root", "open", "f", ["O_CREAT", "O_WRONLY"]),
        ("root", "chmod", "f", 0o6755),
        ("root", "stat", "f"),
        ("root", "chown", "f", NOBODY, NOBODY),  # clears S_ISUID, and S_ISGID (group-exec is set)
        ("root", "stat", "f"),
        ("root", "chmod", "f", 0o2745),
        ("root", "chown", "f", NOBODY, 0),  # S_ISGID without group-exec stays
        ("root", "stat", "f"),
        ("root", "mkdir", "d"),
        ("root", "chmod", "d", 0o6755),
        ("root", "chown", "d", NOBODY, NOBODY),  # a directory keeps both
        ("root", "stat", "d"),
        ("root", "open", "mine", ["O_CREAT", "O_WRONLY"]),
        ("root", "chown", "mine", NOBODY, NOBODY),
        ("root", "open", "roots", ["O_CREAT", "O_WRONLY"]),
        ("nobody", "chmod", "roots", 0o777),  # EPERM: not the owner
        ("nobody", "chown", "roots", NOBODY, NOBODY),  # EPERM
        ("nobody", "chown", "mine", 0, -1),  # EPERM: only root changes the owner
        ("nobody", "chown", "mine", -1, 0),  # EPERM: not one of its groups
        ("nobody", "chown", "mine", -1, NOBODY),  # its own group: fine
        ("nobody", "chown", "mine", NOBODY, -1),  # to itself: fine
        ("nobody", "chmod", "mine", 0o2755),  # the owner, in the file's group: S_ISGID stays
        ("nobody", "stat", "mine"),
        ("root", "chown", "mine", NOBODY, 0),
        ("nobody", "chmod", "mine", 0o2755),  # not in the file's group: S_ISGID is cleared
        ("nobody", "stat", "mine"),
        ("nobody", "chmod", "mine", 0o4755),  # S_ISUID of its own file: fine
        ("nobody", "stat", "mine"),
        ("root", "chown", "mine", NOBODY, NOBODY),
        ("root", "stat", "mine"),
    ],
    "directory_times": [
        ("root", "mkdir", "d"),
        ("root", "stat", "d"),
        ("root", "open", "d/x", ["O_CREAT", "O_WRONLY"]),  # a new entry
        ("root", "stat", "d"),
        ("root", "rename", "d/x", "d/y"),
        ("root", "stat", "d"),
        ("root", "unlink", "d/y"),
        ("root", "stat", "d"),
        ("root", "chmod", "d", 0o700),  # its own attributes
        ("root", "stat", "d"),
    ],
    "times_as_another_user": [
        ("root", "open", "f", ["O_CREAT", "O_WRONLY"]),  # 0644, root's
        ("nobody", "utimensat", "f", "now", "now"),  # EACCES: no write access
        ("nobody", "utimensat", "f", T, T),  # EPERM: not the owner
        ("nobody", "utimensat", "f", "omit", "omit"),
        ("root", "chmod", "f", 0o666),
        ("nobody", "stat", "f"),
        ("nobody", "utimensat", "f", "now", "now"),  # write access: UTIME_NOW is allowed
        ("nobody", "stat", "f"),
        ("nobody", "utimensat", "f", "now", "omit"),  # EPERM: only both UTIME_NOW
        ("nobody", "utimensat", "f", T, T),  # EPERM
        ("nobody", "stat", "f"),
    ],
    "writes_by_another_user": [
        ("root", "open", "f", ["O_CREAT", "O_WRONLY"]),
        ("root", "chmod", "f", 0o6777),
        ("nobody", "write", "f", "x"),  # clears S_ISUID and S_ISGID
        ("root", "stat", "f"),
        ("root", "chmod", "f", 0o6777),
        ("nobody", "truncate", "f", 0),  # so does a truncate
        ("root", "stat", "f"),
        ("root", "chmod", "f", 0o6777),
        ("nobody", "open", "f", ["O_WRONLY", "O_TRUNC"]),  # and an O_TRUNC open
        ("root", "stat", "f"),
        ("root", "chmod", "f", 0o6777),
        ("nobody", "open", "f", ["O_WRONLY", "O_TRUNC"]),  # of an empty file too
        ("root", "stat", "f"),
        ("root", "chmod", "f", 0o2767),
        ("nobody", "open", "f", ["O_WRONLY", "O_TRUNC"]),  # S_ISGID, not group-exec, other group
        ("root", "stat", "f"),
        ("root", "chmod", "f", 0o6777),
        ("nobody", "ftruncate", "f", 0),
        ("root", "stat", "f"),
        ("root", "chmod", "f", 0o6777),
        ("root", "open", "f", ["O_WRONLY", "O_TRUNC"]),  # root's keeps them
        ("root", "stat", "f"),
        ("root", "write", "f", "x"),  # root's writes keep them
        ("root", "stat", "f"),
        ("root", "open", "g", ["O_CREAT", "O_WRONLY"]),
        ("nobody", "write", "g", "x"),  # EACCES
        ("nobody", "open", "new", ["O_CREAT", "O_WRONLY"]),
        ("nobody", "stat", "new"),  # nobody's
        ("nobody", "mkdir", "newdir"),
        ("nobody", "stat", "newdir"),
    ],
    "sticky_directory": [
        ("root", "mkdir", "s"),
        ("root", "chmod", "s", 0o1777),
        ("root", "open", "s/roots", ["O_CREAT", "O_WRONLY"]),
        ("root", "chmod", "s/roots", 0o666),
        ("nobody", "unlink", "s/roots"),  # EPERM: sticky, and neither file nor folder is its
        ("nobody", "rename", "s/roots", "s/moved"),  # EPERM
        ("nobody", "open", "s/mine", ["O_CREAT", "O_WRONLY"]),
        ("nobody", "rename", "s/mine", "s/mine2"),
        ("nobody", "unlink", "s/mine2"),
        ("root", "mkdir", "t"),
        ("root", "chmod", "t", 0o777),
        ("root", "open", "t/roots", ["O_CREAT", "O_WRONLY"]),
        ("nobody", "unlink", "t/roots"),  # not sticky: anyone with write access
        ("root", "mkdir", "u"),
        ("root", "chmod", "u", 0o1777),
        ("root", "chown", "u", NOBODY, NOBODY),
        ("root", "open", "u/roots", ["O_CREAT", "O_WRONLY"]),
        ("nobody", "rename", "u/roots", "u/moved"),  # the folder is its: fine
        ("nobody", "unlink", "u/moved"),
        ("root", "list", "s"),
        ("root", "list", "t"),
        ("root", "list", "u"),
    ],
}

# Where cloudfs differs from the local file system, by (sequence, step, field), with the
# reason; each is in docs/semantics.md.  A difference not listed fails the test, and so does
# a listed one that went away.
_DIR_TIMES = ("a folder's mtime and ctime are its marker's: an entry added, renamed or removed "
              "in it does not rewrite the marker (a PUT for every change of a name)")
DOCUMENTED: dict[tuple[str, int, str], str] = {
    ("directory_times", step, t): _DIR_TIMES for step in (3, 5, 7) for t in ("mtime", "ctime")
}


# What a remount may not keep where the store cannot (its server module's DIVERGENCES, in
# docs/semantics.md): a folder's attributes, on SeaweedFS.
FOLDER_ATTRIBUTES = ("perm", "uid", "gid", "mtime", "ctime")


def run_steps(root: Path, steps: list[Step]) -> list[dict[str, Any]]:
    """The steps below ``root``, consecutive ones of one user in one child process."""
    results: list[dict[str, Any]] = []
    i = 0
    while i < len(steps):
        who = steps[i][0]
        j = i
        while j < len(steps) and steps[j][0] == who:
            j += 1
        cmd = ([*AS_NOBODY] if who == "nobody" else []) + [sys.executable, STEPS, str(root)]
        proc = subprocess.run(cmd, input=json.dumps([list(s[1:]) for s in steps[i:j]]), text=True,
                              capture_output=True, timeout=120, cwd="/")
        assert proc.returncode == 0, proc.stderr
        results += json.loads(proc.stdout)
        i = j
    return results


def observed(steps: list[Step], results: list[dict[str, Any]]) -> dict[tuple[int, str], Any]:
    """What is compared, by (step, field): errno or result; for a stat, its fields, with
    the times as whether they moved since the previous stat of that path."""
    out: dict[tuple[int, str], Any] = {}
    last: dict[str, dict[str, Any]] = {}
    for i, (step, result) in enumerate(zip(steps, results, strict=True)):
        if step[1] != "stat" or "ok" not in result:
            out[i, "result"] = result
            continue
        st = dict(result["ok"])
        before = last.get(step[2])
        last[step[2]] = dict(st)
        for t in ("mtime", "ctime"):
            st[t] = None if before is None else st[t] > before[t]
        if st["type"] == stat.S_IFDIR:
            del st["size"]  # a directory's size and link count mean nothing portable
            del st["nlink"]
        for name, value in st.items():
            out[i, name] = value
    return out


def lost_folder_attributes(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
                           ) -> set[str]:
    """The folders of two trees of the same names that differ in their attributes
    (:data:`FOLDER_ATTRIBUTES`) alone."""
    def rest(st: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in st.items() if k not in FOLDER_ATTRIBUTES}

    return {name for name, st in before.items()
            if st["type"] == stat.S_IFDIR and st != after[name] and rest(st) == rest(after[name])}


def tree(root: Path) -> dict[str, dict[str, Any]]:
    """Every name below ``root`` with its stat fields, times included."""
    out = {}
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(parent, name)
            out[os.path.relpath(path, root)] = describe(os.lstat(path))
    return out


@pytest.fixture
def shared_dirs() -> Iterator[Path]:
    """A directory any user can reach (pytest's tmp_path is root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="cloudfs-posix-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_posix_calls_match_a_local_file_system(target: Target, shared_dirs: Path) -> None:
    ref = shared_dirs / "ref"
    ref.mkdir()
    m = Mount(target, shared_dirs / "mnt", shared_dirs / "cache", {"allow_other": "", "attr_timeout": "0"})
    m.start()
    try:
        differences: dict[tuple[str, int, str], tuple[Any, Any]] = {}
        for name, steps in SEQUENCES.items():
            seen = []
            for root in (ref, m.path):
                (root / name).mkdir()
                (root / name).chmod(0o777)
                seen.append(observed(steps, run_steps(root / name, steps)))
            local, mounted = seen
            for key in sorted(local.keys() | mounted.keys()):
                if local.get(key) != mounted.get(key):
                    differences[(name, *key)] = (local.get(key), mounted.get(key))  # type: ignore[assignment]
        # What the calls left is stored: a remount shows the same tree, times included.
        before = tree(m.path)
        m.remount()
        after = tree(m.path)
    finally:
        m.cleanup()
    assert len(before) > 40 and after.keys() == before.keys()
    changed = {k for k in before if after[k] != before[k]}
    if diverges(target, "folder_attributes"):
        lost = lost_folder_attributes(before, after)
        assert lost, "folder_attributes is in DIVERGENCES, yet every folder kept its attributes"
        changed -= lost
    assert not changed, {k: (before[k], after[k]) for k in sorted(changed)}
    undocumented = {k: v for k, v in differences.items() if k not in DOCUMENTED}
    gone = [k for k in DOCUMENTED if k not in differences]
    report = "\n".join(f"{k}: {SEQUENCES[k[0]][k[1]]} local={v[0]} cloudfs={v[1]}"
                       for k, v in undocumented.items())
    assert not undocumented, "differences from the local file system:\n" + report
    assert not gone, f"documented differences that no longer occur: {gone}"
