"""Nothing acknowledged is lost: the data-loss cases of the ownership redesign, in-process.

Each test names the case it guards (issue 10's list); docs/semantics.md points here.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest

from cloudfs.inodes import ROOT_INODE
from cloudfs.vfs import SetAttr
from tests.vfs.conftest import BS, CTX, Rig, run


def test_basic_round_trip(rig: Rig) -> None:
    async def main() -> None:
        async with rig.mounted() as fs:
            await fs.mkdir("d")
            await fs.write_file("d/f", b"hello")
            assert await fs.read_file("d/f") == b"hello"
            assert await fs.listdir("") == ["d"]
            assert await fs.listdir("d") == ["f"]
        async with rig.mounted() as fs:
            assert await fs.stored("d/f") == b"hello"
            assert await fs.read_file("d/f") == b"hello"

    run(main)


def test_rename_over_open_file_keeps_both_versions_apart(rig: Rig) -> None:
    """Case 1: an atomic save (write tmp, rename over f) while a reader holds f.  The old
    handle reads the old bytes; its close touches nothing of the new file."""
    async def main() -> None:
        async with rig.mounted() as fs:
            await fs.write_file("f", b"old" * 1000)
            await fs.sync()
            reader = await fs.open("f", os.O_RDONLY)
            assert await fs.read(reader, 0, 3) == b"old"
            await fs.write_file("f.tmp", b"new content")
            await fs.rename("f.tmp", "f")
            assert await fs.read(reader) == b"old" * 1000
            await fs.release(reader)
            assert await fs.read_file("f") == b"new content"
        async with rig.mounted() as fs:
            assert await fs.stored("f") == b"new content"
            assert await fs.keys() == ["f"]

    run(main)


def test_unlink_and_recreate_while_old_handle_open(rig: Rig) -> None:
    """Case 1: ``rm f; echo new > f`` with an old handle open; the new file survives a crash."""
    async def main() -> None:
        async with rig.mounted() as fs:
            await fs.write_file("f", b"first")
            await fs.sync()
            old = await fs.open("f", os.O_RDONLY)
            await fs.unlink("f")
            await fs.write_file("f", b"second")
            assert await fs.read(old) == b"first"
            await fs.release(old)
            assert await fs.read_file("f") == b"second"
        # a crash before any upload: the new file comes back from the journal
        async with rig.mounted(crash=True) as fs:
            old = await fs.open("f", os.O_RDONLY)
            await fs.unlink("f")
            await fs.write_file("f", b"third")
            await fs.release(old)
        async with rig.mounted() as fs:
            assert await fs.read_file("f") == b"third"
        async with rig.mounted() as fs:
            assert await fs.stored("f") == b"third"

    run(main)


def test_rename_foreign_object_over_open_file(rig: Rig) -> None:
    """Case 2: ``mv g f`` while f is open, g made by another tool: writes through the old
    f handle never reach g's content."""
    async def main() -> None:
        async with rig.mounted() as fs:
            await fs.write_file("f", b"ffff")
            await fs.sync()
            await fs.other_tool_puts("g", b"gggg")
            fh = await fs.open("f", os.O_RDWR)
            await fs.rename("g", "f")
            await fs.write(fh, 0, b"XX")
            await fs.release(fh)
            assert await fs.read_file("f") == b"gggg"
        async with rig.mounted() as fs:
            assert await fs.stored("f") == b"gggg"
            assert await fs.stored("g") is None

    run(main)


def test_directory_rename_under_a_writer(rig: Rig) -> None:
    """Case 3: ``mv d e`` while d/f is written and fsync'd: e/f has the latest data, no
    conflict copy appears, and d does not come back."""
    async def main() -> None:
        async with rig.mounted() as fs:
            await fs.mkdir("d")
            await fs.write_file("d/f", b"v1")
            await fs.sync()
            fh = await fs.open("d/f", os.O_RDWR)
            await fs.write(fh, 0, b"v2")
            await fs.fsync(fh)
            await fs.rename("d", "e")
            await fs.write(fh, 2, b"+more")
            await fs.fsync(fh)
            await fs.release(fh)
            assert await fs.read_file("e/f") == b"v2+more"
        async with rig.mounted() as fs:
            keys = await fs.keys()
            assert "e/f" in keys
            assert not [k for k in keys if k.startswith("d/") or "conflict" in k], keys
            assert await fs.stored("e/f") == b"v2+more"

    run(main)


def test_kernel_forget_keeps_pending_changes(rig: Rig) -> None:
    """Case 5: the kernel forgets inodes with pending changes: size, mode, appends, new
    files in listings and rmdir all still see the local state."""
    async def main() -> None:
        async with rig.mounted() as fs:
            await fs.mkdir("d")
            await fs.write_file("a", b"stored")
            await fs.sync()
            await fs.append("a", b"+pending")
            await fs.setattr("a", mode=0o600)
            await fs.write_file("d/new", b"only here")
            fs.forget_all()
            inode = await fs.stat("a")
            assert inode.size == len(b"stored+pending")
            assert stat.S_IMODE(inode.attrs.mode) == 0o600
            await fs.append("a", b"!")
            assert await fs.read_file("a") == b"stored+pending!"
            assert await fs.listdir("d") == ["new"]
            with pytest.raises(OSError) as exc:
                await fs.rmdir("d")
            assert exc.value.errno == errno.ENOTEMPTY
        async with rig.mounted() as fs:
            assert await fs.stored("a") == b"stored+pending!"
            assert stat.S_IMODE(int((await fs.stored_meta("a"))["mode"])) == 0o600
            assert await fs.stored("d/new") == b"only here"

    run(main)


def test_truncate_during_readahead_keeps_old_bytes_out(rig: Rig) -> None:
    """Case 6: truncate to 0 and extend while blocks of the old content may be fetched:
    the store ends with zeros past the cut, never old data."""
    async def main() -> None:
        async with rig.mounted() as fs:
            await fs.write_file("big", os.urandom(8 * BS))
            await fs.sync()
        async with rig.mounted() as fs:
            fh = await fs.open("big", os.O_RDWR)
            await fs.read(fh, 0, 6 * BS)  # sequential: read-ahead runs
            await fs.setattr("big", size=0)
            await fs.setattr("big", size=4 * BS)
            assert await fs.read(fh) == bytes(4 * BS)
            await fs.release(fh)
        async with rig.mounted() as fs:
            assert await fs.stored("big") == bytes(4 * BS)

    run(main)


def test_create_on_existing_name_does_not_truncate(rig: Rig) -> None:
    """Case 7: CREATE for a name another tool made meanwhile opens it; ``>>`` appends."""
    async def main() -> None:
        async with rig.mounted() as fs:
            assert await fs.lookup("log") is None  # the kernel now holds a negative entry
            await fs.other_tool_puts("log", b"theirs\n")
            fh = await fs.create("log", flags=os.O_WRONLY | os.O_APPEND)
            size = (await fs.stat("log")).size
            await fs.write(fh, size, b"mine\n")
            await fs.release(fh)
        async with rig.mounted() as fs:
            assert await fs.stored("log") == b"theirs\nmine\n"

    run(main)


def test_attributes_of_pending_file_survive_crash(rig: Rig) -> None:
    """Case 8: chmod/utime/setxattr after writing (``cp -p``, ``rsync -a``) are journaled."""
    async def main() -> None:
        async with rig.mounted(crash=True) as fs:
            await fs.write_file("f", b"data")
            await fs.setattr("f", mode=0o640, mtime_ns=1_600_000_000 * 10**9)
            await fs.setxattr("f", b"user.note", b"kept")
        async with rig.mounted() as fs:
            inode = await fs.stat("f")
            assert stat.S_IMODE(inode.attrs.mode) == 0o640
            assert inode.attrs.mtime_ns == 1_600_000_000 * 10**9
        async with rig.mounted() as fs:
            meta = await fs.stored_meta("f")
            assert stat.S_IMODE(int(meta["mode"])) == 0o640
            assert fs.vfs.getxattr((await fs.stat("f")).ino, b"user.note") == b"kept"

    run(main)


def test_unlinked_open_file_stays_usable(rig: Rig) -> None:
    """Case 9: the create-then-unlink temp-file pattern, and an unlinked stored file with
    uncached blocks: reads, writes into new blocks and fsync all work."""
    async def main() -> None:
        data = os.urandom(4 * BS)
        async with rig.mounted() as fs:
            await fs.write_file("stored", data)
        async with rig.mounted() as fs:
            fh = await fs.open("stored", os.O_RDWR)
            await fs.unlink("stored")
            assert await fs.read(fh, 3 * BS, BS) == data[3 * BS:]
            await fs.write(fh, 6 * BS, b"tail")
            await fs.fsync(fh)
            assert await fs.read(fh, 0, BS) == data[:BS]
            await fs.release(fh)
            tmp = await fs.create("tmp")
            await fs.unlink("tmp")
            await fs.write(tmp, 0, b"scratch" * 10_000)
            await fs.fsync(tmp)
            assert await fs.read(tmp, 0, 7) == b"scratch"
            await fs.release(tmp)
            assert await fs.listdir() == []
        async with rig.mounted() as fs:
            assert await fs.keys() == []

    run(main)


def test_unlinked_open_file_is_not_resurrected_by_crash(rig: Rig) -> None:
    """Case 10: SIGKILL while an unlinked file is open: the next mount neither uploads it
    nor keeps its stored object."""
    async def main() -> None:
        async with rig.mounted() as fs:
            await fs.write_file("gone", os.urandom(3 * BS))
        async with rig.mounted(crash=True) as fs:
            fh = await fs.open("gone", os.O_RDWR)
            await fs.write(fh, 0, b"changed")
            await fs.unlink("gone")
            await fs.write(fh, BS, b"more")
            await fs.fsync(fh)
            tmp = await fs.create("scratch")
            await fs.write(tmp, 0, b"x")
            await fs.unlink("scratch")
        async with rig.mounted() as fs:
            assert await fs.listdir() == []
        async with rig.mounted() as fs:
            assert await fs.keys() == []

    run(main)


def test_writes_during_conflict_reach_the_conflict_copy(rig: Rig) -> None:
    """Case 11: another tool replaced the object while we had changes: ours go to a
    conflict copy, and writes made after that (fsync'd) reach it too."""
    async def main() -> None:
        async with rig.mounted() as fs:
            await fs.write_file("doc", b"base")
            await fs.sync()
            fh = await fs.open("doc", os.O_RDWR)
            await fs.write(fh, 0, b"ours")
            await fs.other_tool_puts("doc", b"theirs")
            await fs.sync()
            await fs.write(fh, 4, b"+later")
            await fs.fsync(fh)
            await fs.release(fh)
        async with rig.mounted() as fs:
            keys = await fs.keys()
            copies = [k for k in keys if k != "doc"]
            assert len(copies) == 1, keys
            assert await fs.stored("doc") == b"theirs"
            assert await fs.stored(copies[0]) == b"ours+later"

    run(main)


def test_new_open_sees_a_changed_object_while_another_handle_is_open(rig: Rig) -> None:
    """Case 14, close-to-open: a new open revalidates even while an old handle is open."""
    async def main() -> None:
        async with rig.mounted() as fs:
            await fs.write_file("f", b"one")
            await fs.sync()
            old = await fs.open("f", os.O_RDONLY)
            assert await fs.read(old) == b"one"
            await fs.other_tool_puts("f", b"two!")
            fs.forget_all()
            fs.vfs.meta.negative.clear()
            for inode in fs.vfs.table.by_ino.values():
                if inode.file is not None:
                    inode.file.refreshed = 0.0  # attr_timeout passed
            assert await fs.read_file("f") == b"two!"
            assert await fs.read(old) == b"one"
            await fs.release(old)

    run(main)


def test_root_attributes_are_refused_or_stored(rig: Rig) -> None:
    """Case 17: chmod on a bucket root has nothing to store it in: EPERM, not silence."""
    async def main() -> None:
        async with rig.mounted() as fs:
            with pytest.raises(OSError) as exc:
                await fs.vfs.setattr(ROOT_INODE, SetAttr(mode=0o700), CTX)
            assert exc.value.errno == errno.EPERM
            with pytest.raises(OSError) as exc:
                await fs.rename("a", "b", flags=4)  # RENAME_WHITEOUT
            assert exc.value.errno in (errno.EINVAL, errno.ENOENT)
            await fs.write_file("a", b"x")
            with pytest.raises(OSError) as exc:
                await fs.rename("a", "b", flags=4)
            assert exc.value.errno == errno.EINVAL
            with pytest.raises(OSError) as exc:
                await fs.vfs.removexattr((await fs.stat("a")).ino, b"trusted.x")
            assert exc.value.errno == errno.ENOTSUP

    run(main)
