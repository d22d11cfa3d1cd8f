"""Kept folder listings (cloudfs/listings.py), in-process: docs/semantics.md, "Reading".

Request counts come from the backend's own counter (``backend.requests``).
"""

from __future__ import annotations

import re

import trio

from tests.vfs.conftest import FS, Rig, run

CONFLICT = re.compile(r"^(?P<name>.+)\.conflict-\d{8}-\d{6}-[0-9a-f]{6}$")


def sent(fs: FS) -> int:
    return sum(fs.backend.requests.values())


async def listdir_interleaved(fs: FS, path: str, between: object) -> list[str]:
    """A readdir that gets its first page, then lets ``between`` run, then finishes."""
    inode = await fs.stat(path)
    handle = fs.vfs.opendir(inode.ino)
    names: list[str] = []
    try:
        entries = await fs.vfs.readdir(handle.fh, 0)
        await between()  # type: ignore[operator]
        start = entries[-1][2] if entries else 0
        names += [e[0].decode() for e in entries]
        while True:
            more = await fs.vfs.readdir(handle.fh, start)
            if not more:
                break
            names += [e[0].decode() for e in more]
            start = more[-1][2]
    finally:
        fs.vfs.releasedir(handle.fh)
    return sorted(n for n in names if n not in (".", ".."))


def test_own_changes_during_a_listing_are_kept(rig: Rig) -> None:
    """A file unlinked, and one created, while a listing from the store is half-way: the
    kept listing has neither the unlinked name (it never comes back) nor lacks the new one."""
    async def main() -> None:
        async with rig.mounted(attr_timeout=0.01) as fs:
            for i in range(1500):  # two pages of 1000
                await fs.other_tool_puts(f"d/f{i:04d}", b"x")

            async def meanwhile() -> None:
                await fs.unlink("d/f1400")  # on the second page, not yet listed
                await fs.unlink("d/f0001")  # on the first page, already listed
                await fs.write_file("d/new", b"n")

            await listdir_interleaved(fs, "d", meanwhile)
            await trio.sleep(0.05)  # attr_timeout: only the kept listing knows now
            before = sent(fs)
            names = await fs.listdir("d")
            assert sent(fs) == before
            assert "f1400" not in names and "f0001" not in names and "new" in names
            assert len(names) == 1500 - 2 + 1
            assert await fs.lookup("d/f1400") is None

    run(main)


def test_a_conflict_keeps_both_names_in_the_kept_listing(rig: Rig) -> None:
    """After a conflict, the kept listing has the store's version under the name and ours
    under the conflict name."""
    async def main() -> None:
        async with rig.mounted() as fs:
            await fs.other_tool_puts("d/a", b"a")
            assert await fs.listdir("d") == ["a"]
            await fs.write_file("d/doc", b"ours")
            await fs.other_tool_puts("d/doc", b"theirs")
            await fs.sync()
            names = await fs.listdir("d")
            copies = [n for n in names if CONFLICT.match(n)]
            assert len(copies) == 1 and sorted(set(names) - set(copies)) == ["a", "doc"], names
            assert await fs.read_file("d/doc") == b"theirs"
            assert await fs.read_file(f"d/{copies[0]}") == b"ours"

    run(main)


def test_the_kept_listings_are_bounded_by_entries(rig: Rig) -> None:
    """dir_cache_entries bounds the entries of all kept listings: the least recently used
    folder goes first, and a folder larger than the bound is listed from the store each time."""
    async def main() -> None:
        async with rig.mounted(dir_cache_entries=10) as fs:
            for folder, n in (("a", 4), ("b", 4), ("c", 4), ("big", 10)):
                for i in range(n):
                    await fs.other_tool_puts(f"{folder}/f{i}", b"x")
            for folder in ("a", "b"):
                await fs.listdir(folder)
            listings = fs.vfs.meta.listings
            assert listings.size == 10 and len(listings) == 2  # 4 entries + 1 each
            await fs.listdir("c")  # 15 > 10: "a", the least recently used, goes
            assert listings.size == 10 and listings.get("a") is None and listings.get("b") is not None
            await fs.stat("big")
            before = fs.backend.requests["list_page"]
            await fs.listdir("big")
            await fs.listdir("big")
            assert fs.backend.requests["list_page"] == before + 2
            assert listings.size <= 10

    run(main)


def test_offline_a_kept_listing_answers_however_old(rig: Rig) -> None:
    """The store does not answer: an expired kept listing is still served (offline mode)."""
    async def main() -> None:
        async with rig.mounted(dir_cache_time=0.01) as fs:
            await fs.other_tool_puts("d/a", b"a")
            await fs.write_file("d/local", b"pending")
            assert await fs.listdir("d") == ["a", "local"]
            await trio.sleep(0.05)
            from cloudfs.backends.errors import Transient

            async def down(*args: object, **kw: object) -> object:
                raise Transient("the store is unreachable")

            fs.backend.list_page = down  # type: ignore[method-assign]
            fs.backend.head = down  # type: ignore[method-assign]
            fs.forget_all()
            assert await fs.listdir("d") == ["a", "local"]
            fs.crashed = True

    run(main)


def test_a_folder_replaced_by_a_rename_does_not_keep_its_listing(rig: Rig) -> None:
    """mv onto an empty folder: the moved folder's names are listed, not the empty ones."""
    async def main() -> None:
        async with rig.mounted(attr_timeout=0.01) as fs:
            await fs.mkdir("src")
            await fs.write_file("src/a", b"a")
            await fs.mkdir("dst")
            assert await fs.listdir("dst") == []
            await fs.rename("src", "dst")
            fs.forget_all()
            await trio.sleep(0.05)
            assert await fs.listdir("dst") == ["a"]
            assert await fs.read_file("dst/a") == b"a"

    run(main)



def test_attributes_from_a_listing_count_from_its_end(rig: Rig) -> None:
    """`ls -l` of a big folder whose listing outlasts attr_timeout: the names of its first
    page are still fresh when ls stats them after the last page, also after the kernel
    forgot their inodes, so no HEAD and no LIST is sent; attr_timeout after the end of the
    listing, a stat asks the store again (one HEAD for a file it knew)."""
    async def main() -> None:
        async with rig.mounted(attr_timeout=3.0) as fs:
            for i in range(1200):  # two pages of 1000
                await fs.other_tool_puts(f"d/f{i:04d}", bytes(i % 7))
            real_list_page = fs.backend.list_page

            async def slow_second_page(prefix: str, delimiter: str | None, token: str | None,
                                       limit: int) -> object:
                if token is not None and prefix == "d/":
                    await trio.sleep(3.5)  # the first page's attributes are older than attr_timeout
                return await real_list_page(prefix, delimiter, token, limit)

            fs.backend.list_page = slow_second_page  # type: ignore[method-assign,assignment]
            assert len(await fs.listdir("d")) == 1200
            before = sent(fs)
            for i in range(0, 500):
                assert (await fs.stat(f"d/f{i:04d}")).attrs.size == i % 7
            fs.forget_all()  # the kernel drops what it held: the table forgets them
            for i in range(500, 1000):
                assert (await fs.stat(f"d/f{i:04d}")).attrs.size == i % 7
            assert sent(fs) == before, fs.backend.requests
            await trio.sleep(3.1)  # attr_timeout after the listing's end
            fs.forget_all()
            heads = fs.backend.requests["head"]
            await fs.stat("d/f0001")
            assert sent(fs) == before + 1 and fs.backend.requests["head"] == heads + 1

    run(main)


def test_the_next_page_is_listed_while_the_kernel_takes_this_one(rig: Rig) -> None:
    """A listing of three pages: the page after each one is fetched in the background
    (``VFS._start_next_page``) and used by the next readdir, so each page is listed once and
    every name comes once."""
    async def main() -> None:
        async with rig.mounted() as fs:
            for i in range(2500):
                await fs.other_tool_puts(f"d/f{i:04d}", b"x")
            inode = await fs.stat("d")
            before = fs.backend.requests["list_page"]
            handle = fs.vfs.opendir(inode.ino)
            try:
                first = await fs.vfs.readdir(handle.fh, 0)
                assert handle.next_page is not None  # page two is on its way
                with trio.fail_after(30):
                    await handle.next_page.done.wait()
                assert fs.backend.requests["list_page"] - before == 2
                names = [e[0].decode() for e in first]
                start = first[-1][2]
                while more := await fs.vfs.readdir(handle.fh, start):
                    names += [e[0].decode() for e in more]
                    start = more[-1][2]
            finally:
                fs.vfs.releasedir(handle.fh)
            assert fs.backend.requests["list_page"] - before == 3
            files = [n for n in names if n not in (".", "..")]
            assert len(files) == len(set(files)) == 2500

    run(main)


def test_a_listing_given_up_after_its_first_page_leaves_nothing_behind(rig: Rig) -> None:
    """Released after one page, the handle's next page is cancelled or dropped, and is
    not kept as the folder's listing: the next listing lists the folder again, whole."""
    async def main() -> None:
        async with rig.mounted() as fs:
            for i in range(1500):
                await fs.other_tool_puts(f"d/f{i:04d}", b"x")
            inode = await fs.stat("d")
            handle = fs.vfs.opendir(inode.ino)
            await fs.vfs.readdir(handle.fh, 0)
            next_page = handle.next_page
            assert next_page is not None
            fs.vfs.releasedir(handle.fh)
            with trio.fail_after(30):
                await next_page.done.wait()
            before = fs.backend.requests["list_page"]
            assert len(await fs.listdir("d")) == 1500
            assert fs.backend.requests["list_page"] - before == 2

    run(main)
