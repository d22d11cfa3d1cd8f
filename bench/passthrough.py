"""A minimal read-only pyfuse3 + trio passthrough of a local directory: the request ceiling.

    .venv/bin/python bench/passthrough.py SOURCE MOUNTPOINT     # serves until unmounted

Every request is answered straight from SOURCE with one system call on the trio thread
(no worker threads, no cache of its own), so what a workload reaches through this mount is
what pyfuse3's request round trip allows on this machine.  `bench/run.py --workloads
passthrough` runs the random-read job on it and reports cloudfs against that ceiling.
The kernel sees the same mount as a cloudfs mount: the same options, write-back cache
mode, attribute timeout, kernel page cache kept across opens, and 1 MiB read-ahead.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cloudfs.daemon import _raise_readahead  # noqa: E402
from cloudfs.options import MountOptions  # noqa: E402

ATTR_TIMEOUT = MountOptions().attr_timeout  # cloudfs's default, so the kernel asks as often
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = True  # as cloudfs.fs.CloudFS: the kernel's page cache behaves alike

    def __init__(self, source: Path) -> None:
        super().__init__()
        # Inode numbers are handed out here, once per path, and never reused: nothing is
        # forgotten, which is fine for a benchmark's few thousand paths.
        self.paths: dict[int, bytes] = {pyfuse3.ROOT_INODE: os.fsencode(source)}
        self.inodes: dict[bytes, int] = {os.fsencode(source): pyfuse3.ROOT_INODE}

    def _inode_of(self, path: bytes) -> int:
        ino = self.inodes.get(path)
        if ino is None:
            ino = self.inodes[path] = len(self.paths) + 1  # ROOT_INODE is 1
            self.paths[ino] = path
        return ino

    def _attrs(self, path: bytes, ino: int) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize",
                     "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, name, getattr(st, name))
        a.attr_timeout = a.entry_timeout = ATTR_TIMEOUT
        return a

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext = None
                     ) -> pyfuse3.EntryAttributes:
        path = os.path.join(self.paths[parent_inode], name)
        return self._attrs(path, self._inode_of(path))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext = None) -> pyfuse3.EntryAttributes:
        return self._attrs(self.paths[inode], inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not stat.S_ISDIR(os.lstat(self.paths[inode]).st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # start_id is the index of the next entry in the sorted listing: a listing read in
        # several calls sees each name once as long as the directory does not change.
        parent = self.paths[fh]
        names = sorted(os.listdir(parent))
        for index in range(start_id, len(names)):
            path = os.path.join(parent, names[index])
            if not pyfuse3.readdir_reply(token, names[index], self._attrs(path, self._inode_of(path)),
                                         index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        pass

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        try:
            fd = os.open(self.paths[inode], os.O_RDONLY)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)  # the file handle is the source's fd

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    async def release(self, fh: int) -> None:
        os.close(fh)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.paths[pyfuse3.ROOT_INODE])
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                     "f_favail", "f_namemax"):
            setattr(out, name, getattr(st, name))
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="the local directory to serve")
    ap.add_argument("mountpoint", type=Path)
    args = ap.parse_args()
    options = {"fsname=passthrough", "subtype=passthrough", "ro", "nosuid", "nodev", "default_permissions"}
    pyfuse3.init(Passthrough(args.source.resolve()), str(args.mountpoint), options)  # cloudfs.daemon's, ro
    _raise_readahead(str(args.mountpoint))
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
