"""Nothing acknowledged is lost, through real mounts: issue 10's cases that need the store's
side of the story — another tool deleting or replacing an object, a slow store holding a
request while the file changes, request counts, the cache directory's disk use, a crash in
the middle of a folder rename.

A slow store is a proxy in front of moto (tests/servers/flaky_proxy.py) that holds chosen
requests, so those tests run on S3 only; every wait is bounded, and nothing asserts timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fs.test_integrity import put_other, stored, stored_keys
from tests.mounting import CLOUDFS, DirSampler, Mount
from tests.servers import Target
from tests.servers.flaky_proxy import FlakyProxy, Request

pytestmark = pytest.mark.backends("local", "s3")
MiB = 1024 * 1024


def status(m: Mount) -> dict[str, Any]:
    out = subprocess.run([CLOUDFS, "status", "--json", str(m.path)], capture_output=True, text=True,
                         timeout=10, check=True)
    return json.loads(out.stdout)


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def wait_uploaded(m: Mount, timeout: float = 60) -> dict[str, Any]:
    """The mount's status once nothing is pending (the write-back delay is short)."""
    snap: dict[str, Any] = {}

    def done() -> bool:
        nonlocal snap
        snap = status(m)
        return snap["uploads"]["pending_files"] == 0

    wait_until(done, "the uploads", timeout)
    return snap


@contextlib.contextmanager
def slow_store(target: Target, before: Callable[[Request], None]) -> Iterator[tuple[FlakyProxy, Target]]:
    """``target`` (S3) behind a proxy that calls ``before`` on each request first."""
    port = int(target.extra["endpoint"].rsplit(":", 1)[1])
    with FlakyProxy(port, fail_every=0, before=before) as proxy:
        env = {**target.env, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{proxy.port}"}
        yield proxy, Target("s3", target.url, env=env, sdk=target.sdk, extra=target.extra)


def range_start(request: Request) -> int | None:
    rng = request.header("Range")
    if request.method != "GET" or not rng or not rng.startswith("bytes="):
        return None
    return int(rng[len("bytes="):].split("-")[0])


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[list[Mount]]:
    """Mounts a test makes; each is cleaned up, whatever happens."""
    made: list[Mount] = []
    yield made
    for m in made:
        m.cleanup()


def mount(made: list[Mount], target: Target, path: Path, options: dict[str, str]) -> Mount:
    m = Mount(target, path / "mnt", path / "cache", options)
    made.append(m)
    m.start()
    return m


# ---------------------------------------------------------------------- case 6
@pytest.mark.backends("s3")
def test_truncate_while_a_readahead_fetch_is_in_flight(target: Target, tmp_path: Path,
                                                       mounts: list[Mount]) -> None:
    """Case 6: read-ahead fetches of the old content are held by the store while the file is
    truncated to 0 and extended: no old byte comes back past the cut, none reaches the store."""
    put_other(target, "big", os.urandom(8 * MiB))
    release = threading.Event()
    held: list[int] = []

    def before(request: Request) -> None:
        start = range_start(request)
        if start is not None and start >= 2 * MiB and not release.is_set():
            held.append(start)
            release.wait(3)  # bounded: a truncate that waits for the fetch is fine too

    with slow_store(target, before) as (_, slowed):
        m = mount(mounts, slowed, tmp_path, {"writeback_delay": "1h", "block_size": "1M",
                                              "cache_size": "16M", "readahead": "4"})
        with open(m.path / "big", "r+b") as f:
            assert len(f.read(2 * MiB)) == 2 * MiB  # sequential: read-ahead starts
            wait_until(lambda: bool(held), "a read-ahead fetch", 10)
            os.ftruncate(f.fileno(), 0)
            os.ftruncate(f.fileno(), 4 * MiB)
            release.set()
            f.seek(0)
            assert f.read() == bytes(4 * MiB)
        release.set()
        m.remount()
        assert (m.path / "big").read_bytes() == bytes(4 * MiB)
        m.stop()
    assert stored(target, "big") == bytes(4 * MiB)


# ---------------------------------------------------------------------- case 11
def test_writes_fsynced_during_a_conflict_copy_upload_reach_it(target: Target, tmp_path: Path,
                                                               mounts: list[Mount]) -> None:
    """Case 11: another tool replaced the object while we had changes; ours go up as a
    conflict copy, and what is written and fsync'd while that upload runs (held by the store
    on S3) reaches an object too."""
    put_other(target, "doc", b"base")
    started, release = threading.Event(), threading.Event()

    def before(request: Request) -> None:
        if request.method == "PUT" and ".conflict-" in request.path and not release.is_set():
            started.set()
            release.wait(5)

    with contextlib.ExitStack() as stack:
        if target.backend == "s3":
            _, target_here = stack.enter_context(slow_store(target, before))
        else:
            target_here = target
        m = mount(mounts, target_here, tmp_path, {"writeback_delay": "1.5"})
        with open(m.path / "doc", "r+b") as f:
            f.write(b"ours")
            f.flush()
            os.fsync(f.fileno())  # past the kernel's page cache: cloudfs has it
            put_other(target, "doc", b"theirs")
            if target.backend == "s3":
                wait_until(started.is_set, "the conflict copy's upload", 30)
            else:
                wait_until(lambda: len(stored_keys(target)) == 2, "the conflict copy", 30)
            f.write(b"+later")
            f.flush()
            os.fsync(f.fileno())
            release.set()
        m.stop()
    keys = stored_keys(target)
    copies = [k for k in keys if k != "doc"]
    assert len(copies) == 1 and copies[0].startswith("doc.conflict-"), keys
    assert stored(target, "doc") == b"theirs"
    assert stored(target, copies[0]) == b"ours+later"


# ---------------------------------------------------------------------- case 13
def test_edited_big_file_deleted_on_the_server_uploads_local_data(target: Target, tmp_path: Path,
                                                                  mounts: list[Mount]) -> None:
    """Case 13: a multipart-size file edited here and deleted by another tool goes up from the
    local data (no part copied from the missing source), and umount exits 0 when every block
    was cached."""
    data = bytearray(os.urandom(12 * MiB))
    m = mount(mounts, target, tmp_path, {"writeback_delay": "1", "block_size": "1M", "cache_size": "32M"})
    (m.path / "big").write_bytes(data)
    m.remount()  # stored as a multipart object; every block stays cached
    with open(m.path / "big", "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"edited")
        f.flush()
        delete_other(target, "big")
    data[5 * MiB:5 * MiB + 6] = b"edited"
    requests = wait_uploaded(m)["requests"]
    assert not requests.get("mpu_part_copy") and not requests.get("copy"), requests
    m.stop()
    assert stored(target, "big") == data


def test_deleted_big_file_with_blocks_never_fetched_reports_lost_bytes(target: Target, tmp_path: Path,
                                                                       mounts: list[Mount]) -> None:
    """Case 13: with blocks that were never fetched here, the upload still finishes (zeros
    for them) and ``cloudfs umount`` exits 1 with one line counting the lost bytes."""
    data = os.urandom(12 * MiB)
    put_other(target, "big", data)
    m = mount(mounts, target, tmp_path, {"writeback_delay": "1h", "block_size": "1M",
                                          "cache_size": "32M", "readahead": "0"})
    with open(m.path / "big", "r+b") as f:
        f.write(b"edited")  # fetches block 0 only
    delete_other(target, "big")
    proc = subprocess.run([CLOUDFS, "umount", str(m.path)], env=m.env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "lost" in proc.stderr, proc.stderr
    assert f"{11 * MiB}" in proc.stderr, proc.stderr
    expected = b"edited" + data[6:MiB] + bytes(11 * MiB)
    assert stored(target, "big") == expected


def delete_other(target: Target, key: str) -> None:
    import trio

    from cloudfs.backends import open_backend

    backend = open_backend(target.url, target.options)
    try:
        trio.run(backend.delete, key)
    finally:
        backend.close()


# ---------------------------------------------------------------------- case 15
# Streaming a big file through the cache keeps two whole parts dirty while the next one
# fills: parts are 1 MiB here on the local store (1M blocks), 10 MiB on S3 (5 MiB minimum,
# doubled for the part-count limit).
STREAMING_CACHE_MIB = {"local": 8, "s3": 24}
CACHE_SLACK = 2 * MiB  # docs/semantics.md: journal records and the log beyond cache_size


def test_upload_staging_counts_against_cache_size(target: Target, tmp_path: Path,
                                                  mounts: list[Mount]) -> None:
    """Case 15: writing a file three times the cache size, the cache directory's disk use
    stays within ``cache_size`` plus the documented slack, uploads included."""
    cache = STREAMING_CACHE_MIB[target.backend]
    m = mount(mounts, target, tmp_path, {"writeback_delay": "0.3", "block_size": "1M",
                                          "cache_size": f"{cache}M", "max_dirty": f"{cache}M"})
    chunk = os.urandom(MiB)
    with DirSampler(m.cache_dir, interval=0.01) as disk:
        with open(m.path / "big", "wb") as f:
            for _ in range(3 * cache):
                f.write(chunk)
        wait_uploaded(m)
    peak = disk.peak
    assert peak <= cache * MiB + CACHE_SLACK, peak
    m.stop()
    got = stored(target, "big")
    assert got is not None and len(got) == 3 * cache * MiB and got[-MiB:] == chunk


# ---------------------------------------------------------------------- case 19
def test_a_file_three_times_the_cache_uploads_linearly(target: Target, tmp_path: Path,
                                                       mounts: list[Mount]) -> None:
    """Case 19: a file three times ``cache_size`` written sequentially goes up in one
    multipart upload, every part sent once, none copied server-side (request counts)."""
    cache = STREAMING_CACHE_MIB[target.backend]
    size = 3 * cache * MiB
    m = mount(mounts, target, tmp_path, {"writeback_delay": "0.3", "block_size": "1M",
                                          "cache_size": f"{cache}M", "max_dirty": f"{cache}M"})
    chunk = os.urandom(MiB)
    with open(m.path / "big", "wb") as f:
        for _ in range(size // MiB):
            f.write(chunk)
    snap = wait_uploaded(m)
    requests = snap["requests"]
    assert requests.get("mpu_create") == 1, str(requests)
    assert requests.get("mpu_complete") == 1, requests
    assert not requests.get("mpu_part_copy") and not requests.get("mpu_abort"), requests
    assert not requests.get("put"), requests
    assert snap["uploads"]["uploaded_bytes"] == size, snap["uploads"]
    m.stop()
    got = stored(target, "big")
    assert got is not None and len(got) == size and got[:MiB] == chunk


# ---------------------------------------------------------------------- folder rename
@pytest.mark.backends("s3")
def test_folder_rename_interrupted_by_sigkill_is_finished_on_remount(target: Target, tmp_path: Path,
                                                                      mounts: list[Mount]) -> None:
    """``mv d e`` is SIGKILLed half-way (the store holds the later copies): the next mount
    replays the journaled intent, and the whole tree is at the new name, nothing mixed."""
    names = [f"d/f{i:02d}" for i in range(12)] + ["d/sub/g", "d/sub/h"]
    contents = {n: f"content of {n}".encode() for n in names}
    copies: list[str] = []
    release = threading.Event()

    def before(request: Request) -> None:
        if request.method == "PUT" and (request.header("x-amz-copy-source") or "/e/" in request.path):
            copies.append(request.path)
            if len(copies) > 3:
                release.wait(10)

    with slow_store(target, before) as (_, slowed):
        m = mount(mounts, slowed, tmp_path, {"writeback_delay": "0.3"})
        (m.path / "d" / "sub").mkdir(parents=True)
        for n, data in contents.items():
            (m.path / n).write_bytes(data)
        m.remount()  # all stored
        mv = subprocess.Popen(["mv", str(m.path / "d"), str(m.path / "e")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: len(copies) > 3, "the rename's copies", 30)
            assert os.listdir(m.cache_dir / "intents"), "no intent journaled"
            m.kill()
        finally:
            release.set()
            try:
                mv.wait(30)
            except subprocess.TimeoutExpired:
                mv.kill()
                mv.wait()
        keys = stored_keys(target)
        assert any(k.startswith("d/") for k in keys), keys  # really interrupted half-way
        # The same store again (the cache directory records its endpoint: this proxy).
        m = mount(mounts, slowed, tmp_path, {"writeback_delay": "0.3"})
        assert os.listdir(m.path) == ["e"]
        assert sorted(os.listdir(m.path / "e")) == sorted([n[2:] for n in names if "/sub/" not in n]
                                                          + ["sub"])
        for n, data in contents.items():
            assert (m.path / ("e" + n[1:])).read_bytes() == data
        m.stop()
    keys = stored_keys(target)
    assert not [k for k in keys if not k.startswith("e/")], keys
    assert sorted(k for k in keys if not k.endswith("/")) == sorted("e" + n[1:] for n in names)
    assert not os.listdir(m.cache_dir / "intents")
