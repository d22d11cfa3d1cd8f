"""What a small file's upload costs, and that it still never overwrites another writer, through
real mounts on every backend (docs/semantics.md "Conflicts with other writers";
docs/concurrency.md "Crash points").

Where the store checks If-None-Match / If-Match in the PUT itself
(``Capabilities.atomic_conditional_put``), a small file goes up in one conditional PUT and
nothing is asked first; elsewhere (B2, Swift) a HEAD comes first.  Request counts come from
`cloudfs status --json`: what the daemon really sent.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import trio

from cloudfs.backends import open_backend
from cloudfs.status import size_text
from tests.fs.test_integrity import put_other, stored, stored_keys
from tests.fs.test_integrity_store import status, wait_uploaded
from tests.mounting import CLOUDFS, Mount
from tests.servers import Target

N = 20


def _counting_mount(target: Target, tmp_path: Path) -> tuple[Mount, bool, bool]:
    """A started mount whose creates and opens ask the store nothing more than needed
    (attr_timeout: a create in a folder this mount made asks nothing within it), and (the
    store checks PUT conditions itself, the mount verifies that once first)."""
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"attr_timeout": "60", "writeback_delay": "0.3"})
    m.start()
    backend = open_backend(target.url, target.options)
    try:
        return m, backend.capabilities.atomic_conditional_put, backend.conditional_put_unverified
    finally:
        backend.close()


def _sent(before: dict[str, int], after: dict[str, int], op: str) -> int:
    return after.get(op, 0) - before.get(op, 0)


def test_new_small_files_go_up_in_one_put_each(target: Target, tmp_path: Path) -> None:
    m, atomic, unverified = _counting_mount(target, tmp_path)  # every request counted is the uploader's
    try:
        (m.path / "d").mkdir()
        if unverified:
            # The first new file shows whether this S3-compatible server checks If-None-Match:
            # HEAD, PUT, and the same PUT again (refused).
            (m.path / "d" / "first").write_bytes(b"first")
            before = wait_uploaded(m)["requests"]
            assert m.log().count("checks if-none-match on PUT") == 1, m.log()
        else:
            before = wait_uploaded(m)["requests"]
        for i in range(N):
            (m.path / "d" / f"f{i}").write_bytes(b"%d" % i * 100)
        after = wait_uploaded(m)["requests"]
        puts, heads = _sent(before, after, "put"), _sent(before, after, "head")
        assert puts == N, (puts, after)
        if atomic:
            assert heads == 0, f"{heads} HEAD for {N} new files: {after}"
        else:
            assert heads >= N, f"a store without checked PUT conditions asks first: {after}"
        for i in range(N):
            assert stored(target, f"d/f{i}") == b"%d" % i * 100
    finally:
        m.cleanup()


def test_changed_small_files_go_up_in_one_put_each(target: Target, tmp_path: Path) -> None:
    """A stored file changed here: one PUT with If-Match, no HEAD."""
    m, atomic, unverified = _counting_mount(target, tmp_path)
    try:
        for i in range(N):
            (m.path / f"f{i}").write_bytes(b"v1")
        wait_uploaded(m)
        if unverified:
            with open(m.path / "f0", "r+b") as f:
                f.write(b"v2")
            wait_uploaded(m)
            assert m.log().count("checks if-match on PUT") == 1, m.log()
        first = 1 if unverified else 0
        # Opening a stored file may revalidate it with a HEAD (the VFS's, not the uploader's):
        # open them all before counting.
        handles = [open(m.path / f"f{i}", "r+b") for i in range(first, N)]
        before = status(m)["requests"]
        for f in handles:
            f.write(b"v2")
            f.close()
        after = wait_uploaded(m)["requests"]
        puts, heads = _sent(before, after, "put"), _sent(before, after, "head")
        assert puts == N - first, (puts, after)
        if atomic:
            assert heads == 0, f"{heads} HEAD for {N - first} changed files: {after}"
        for i in range(N):
            assert stored(target, f"f{i}") == b"v2"
    finally:
        m.cleanup()


def _sync(m: Mount) -> None:
    """`cloudfs sync`: upload everything pending now (the write-back delay is an hour, so
    nothing goes up before the test says so, however slow the machine)."""
    subprocess.run([CLOUDFS, "sync", str(m.path)], capture_output=True, text=True, timeout=120, check=True)


def _slow_mount(target: Target, tmp_path: Path) -> Mount:
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"writeback_delay": "3600"})
    m.start()
    return m


def _changed_here(target: Target, tmp_path: Path) -> Mount:
    """A mount where ``doc`` was stored as "base" and then written "ours", its upload pending."""
    m = _slow_mount(target, tmp_path)
    try:
        (m.path / "doc").write_bytes(b"base")
        _sync(m)
        with open(m.path / "doc", "r+b") as f:
            f.write(b"ours")
    except BaseException:
        m.cleanup()
        raise
    return m


def _conflict_copies(target: Target, name: str) -> list[str]:
    return [k for k in stored_keys(target) if k.startswith(f"{name}.conflict-")]


def test_a_file_changed_on_the_server_meanwhile_becomes_a_conflict_copy(target: Target, tmp_path: Path
                                                                        ) -> None:
    """The conditional PUT is refused; the HEAD that follows finds another writer's version:
    it keeps the name, ours goes up as the conflict copy, both whole."""
    m = _changed_here(target, tmp_path)
    try:
        put_other(target, "doc", b"theirs")
        _sync(m)
        assert stored(target, "doc") == b"theirs"
        copies = _conflict_copies(target, "doc")
        assert len(copies) == 1, stored_keys(target)
        assert stored(target, copies[0]) == b"ours"
        assert "changed on the server while local changes were pending" in m.log()
    finally:
        m.cleanup()


def test_a_new_file_created_on_the_server_meanwhile_becomes_a_conflict_copy(target: Target, tmp_path: Path
                                                                            ) -> None:
    """The same for a new file: If-None-Match is refused, the other tool's object keeps the name."""
    m = _slow_mount(target, tmp_path)
    try:
        (m.path / "new").write_bytes(b"ours")
        put_other(target, "new", b"theirs")
        _sync(m)
        assert stored(target, "new") == b"theirs"
        copies = _conflict_copies(target, "new")
        assert len(copies) == 1, stored_keys(target)
        assert stored(target, copies[0]) == b"ours"
    finally:
        m.cleanup()


def test_a_file_deleted_on_the_server_meanwhile_goes_up_from_local_data(target: Target, tmp_path: Path
                                                                        ) -> None:
    """If-Match on a deleted object is refused (412, or 404 on S3): the HEAD finds nothing, and
    the local content is uploaded under its name, no conflict copy."""
    m = _changed_here(target, tmp_path)
    try:
        backend = open_backend(target.url, target.options)
        try:
            trio.run(backend.delete, "doc")
        finally:
            backend.close()
        _sync(m)
        assert stored(target, "doc") == b"ours"
        assert not _conflict_copies(target, "doc"), stored_keys(target)
    finally:
        m.cleanup()


@pytest.mark.backends("local", "s3")
def test_a_one_byte_change_of_a_multipart_file_uploads_about_one_part(target: Target, tmp_path: Path
                                                                      ) -> None:
    """A file of four parts and a bit, stored; after a remount one byte of its second part is
    changed: that part is sent again and the rest copied server-side, so ``cloudfs status``
    counts one part uploaded (it once said the whole file's size)."""
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache",
              {"writeback_delay": "3600", "block_size": "1M"})
    backend = open_backend(target.url, target.options)
    try:
        part = backend.part_size_for(0, 1024 * 1024)  # 1 MiB, or the store's minimum part
    finally:
        backend.close()
    size = 4 * part + 5
    data = bytearray(os.urandom(size))
    m.start()
    try:
        (m.path / "big").write_bytes(data)
        _sync(m)
        assert status(m)["uploads"]["uploaded_bytes"] == size
        m.remount()  # a fresh count; the file's blocks stay in the cache directory
        before = status(m)["requests"]
        at = part + 123
        data[at] = 0 if data[at] else 1  # one byte, changed
        with open(m.path / "big", "r+b") as f:
            f.seek(at)
            f.write(data[at:at + 1])
        _sync(m)
        snap = status(m)
        sent = {op: _sent(before, snap["requests"], op) for op in ("put", "mpu_part", "mpu_part_copy")}
        assert sent == {"put": 0, "mpu_part": 1, "mpu_part_copy": 4}, snap["requests"]
        assert snap["uploads"]["uploaded_bytes"] == part, snap["uploads"]
        text = subprocess.run([CLOUDFS, "status", str(m.path)], capture_output=True, text=True,
                              timeout=30, check=True).stdout
        assert f"uploads: 0 file(s) pending (0 bytes), {size_text(part)} uploaded" in text, text
        m.stop()
        assert stored(target, "big") == bytes(data)
    finally:
        m.cleanup()
