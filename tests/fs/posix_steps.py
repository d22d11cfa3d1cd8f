"""Runs scripted POSIX calls in a directory and prints what each one did, as JSON.

``python posix_steps.py ROOT`` reads a JSON list of steps ``[op, arg, ...]`` on stdin, runs
each below ROOT (paths are relative to it) and prints one result per step:
``{"errno": "ENOENT"}`` for a call that failed, else ``{"ok": value}``.  The differential test
(tests/fs/test_posix_differential.py) runs the same steps on a cloudfs mount and on a local
directory, under root or (through ``setpriv``) another user, and compares the results.

Only the standard library: it runs as any user, from any directory.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import sys
import time
from typing import Any

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
TICK = 0.02  # after every call, so that a later change gets a later timestamp


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)


def _time(value: Any) -> Timespec:
    """``"now"``, ``"omit"`` or nanoseconds."""
    if value == "now":
        return Timespec(0, UTIME_NOW)
    if value == "omit":
        return Timespec(0, UTIME_OMIT)
    return Timespec(value // 1_000_000_000, value % 1_000_000_000)


def utimensat(path: str, atime: Any, mtime: Any) -> None:
    """utimensat(2) itself: os.utime has no UTIME_NOW / UTIME_OMIT."""
    times = (Timespec * 2)(_time(atime), _time(mtime))
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), times, AT_SYMLINK_NOFOLLOW) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _flags(names: list[str]) -> int:
    out = 0
    for name in names:
        out |= getattr(os, name)
    return out


def describe(st: os.stat_result) -> dict[str, Any]:
    return {"type": stat.S_IFMT(st.st_mode), "perm": oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid,
            "gid": st.st_gid, "size": st.st_size, "nlink": st.st_nlink, "rdev": st.st_rdev,
            "mtime": st.st_mtime_ns, "ctime": st.st_ctime_ns}


def run(op: str, *args: Any) -> Any:
    if op == "stat":
        return describe(os.lstat(args[0]))
    if op == "list":
        return sorted(os.listdir(args[0]))
    if op == "open":  # path, [flag names], mode: open and close
        os.close(os.open(args[0], _flags(args[1]), args[2] if len(args) > 2 else 0o644))
        return None
    if op == "write":  # append bytes (text)
        fd = os.open(args[0], os.O_WRONLY | os.O_APPEND)
        try:
            return os.write(fd, args[1].encode())
        finally:
            os.close(fd)
    if op == "read":
        with open(args[0], "rb") as f:
            return f.read().decode(errors="replace")
    if op == "ftruncate":  # path, size[, open flag names]
        fd = os.open(args[0], _flags(args[2]) if len(args) > 2 else os.O_WRONLY)
        try:
            os.ftruncate(fd, args[1])
        finally:
            os.close(fd)
        return None
    if op == "utimensat":
        utimensat(args[0], args[1], args[2])
        return None
    if op == "mknod":
        os.mknod(args[0], args[1], os.makedev(*args[2]) if len(args) > 2 else 0)
        return None
    if op == "lchown":
        os.chown(args[0], args[1], args[2], follow_symlinks=False)
        return None
    if op == "setxattr":
        os.setxattr(args[0], args[1], args[2].encode(), follow_symlinks=False)
        return None
    getattr(os, op)(*args)  # mkdir, rmdir, unlink, rename, symlink, mkfifo, chmod, chown, truncate
    return None


def main() -> None:
    os.chdir(sys.argv[1])
    os.umask(0o022)
    results = []
    for step in json.load(sys.stdin):
        try:
            results.append({"ok": run(*step)})
        except OSError as exc:
            results.append({"errno": errno.errorcode.get(exc.errno or 0, str(exc.errno))})
        time.sleep(TICK)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
