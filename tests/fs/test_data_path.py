"""The data path through real mounts: block cache, read-ahead, eviction, write-back, recovery.

Backend requests and cache counters come from `cloudfs status --json`, so these tests see
what the daemon really sent to the store.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from cloudfs.backends import Payload, open_backend
from tests.mounting import CLOUDFS, Mount, mounted
from tests.servers import Target

MiB = 1024 * 1024


def status(m: Mount) -> dict[str, Any]:
    out = subprocess.run([CLOUDFS, "status", "--json", str(m.path)], capture_output=True, text=True,
                         timeout=10, check=True)
    return json.loads(out.stdout)


def gets(m: Mount) -> int:
    return status(m)["requests"].get("get", 0)


def put_object(target: Target, key: str, data: bytes) -> None:
    backend = open_backend(target.url, target.options)
    try:
        trio.run(backend.put, key, Payload.from_bytes(data), {})
    finally:
        backend.close()


def test_sparse_read_fetches_one_block(target: Target, tmp_path: Path) -> None:
    data = os.urandom(48 * MiB)
    put_object(target, "big.bin", data)
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"block_size": "4M"})
    m.start()
    try:
        with open(m.path / "big.bin", "rb") as f:
            f.seek(30 * MiB + 100)
            assert f.read(4096) == data[30 * MiB + 100:30 * MiB + 4196]
        st = status(m)
        assert st["cache"]["fetches"] == 1
        assert st["cache"]["fetched_bytes"] == 4 * MiB
        assert st["requests"]["get"] == 1
    finally:
        m.cleanup()


def test_writing_into_a_stored_object_fetches_only_the_merged_block(target: Target, tmp_path: Path) -> None:
    data = bytearray(os.urandom(48 * MiB))
    put_object(target, "big.bin", bytes(data))
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"block_size": "4M", "writeback_delay": "1h"})
    m.start()
    try:
        with open(m.path / "big.bin", "r+b") as f:
            f.seek(30 * MiB + 100)
            f.write(b"middle")
        data[30 * MiB + 100:30 * MiB + 106] = b"middle"
        st = status(m)
        assert st["cache"]["fetches"] == 1 and st["cache"]["fetched_bytes"] == 4 * MiB
        m.stop()  # the upload copies the unchanged blocks server-side where the store can
        m.start()
        assert (m.path / "big.bin").read_bytes() == bytes(data)
    finally:
        m.cleanup()


def test_sequential_read_prefetches_and_warm_remount_fetches_nothing(target: Target, tmp_path: Path) -> None:
    data = os.urandom(40 * MiB)
    put_object(target, "seq.bin", data)
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"block_size": "4M", "readahead": "4"})
    m.start()
    try:
        assert (m.path / "seq.bin").read_bytes() == data
        st = status(m)
        assert st["cache"]["fetches"] == 10  # each block once, read-ahead included
        m.remount()  # same cache dir: the cache stays warm
        assert (m.path / "seq.bin").read_bytes() == data
        assert gets(m) == 0, "a warm cache must not GET cached blocks"
    finally:
        m.cleanup()


def test_other_writer_invalidates_cache(target: Target, tmp_path: Path) -> None:
    put_object(target, "shared.txt", b"version one")
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache")
    m.start()
    try:
        assert (m.path / "shared.txt").read_bytes() == b"version one"
        put_object(target, "shared.txt", b"version two, longer")
        time.sleep(1.5)  # attr_timeout=1
        assert (m.path / "shared.txt").read_bytes() == b"version two, longer"
        m.stop()
        put_object(target, "shared.txt", b"version three")
        m.start()  # persisted blocks of version two are dropped, not served
        assert (m.path / "shared.txt").read_bytes() == b"version three"
    finally:
        m.cleanup()


def test_small_cache_evicts_and_stays_bounded(target: Target, tmp_path: Path) -> None:
    data = os.urandom(40 * MiB)
    put_object(target, "large", data)
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache",
              {"cache_size": "16M", "block_size": "2M", "max_dirty": "8M"})
    m.start()
    try:
        assert (m.path / "large").read_bytes() == data
        st = status(m)
        assert st["cache"]["used_bytes"] <= 16 * MiB
        assert st["cache"]["evictions"] > 0
        # Writing more than the cache holds: writers wait for uploads instead of failing.
        with open(m.path / "written", "wb") as f:
            for i in range(20):
                f.write(bytes([i]) * MiB)
                assert status(m)["cache"]["used_bytes"] <= 16 * MiB
        m.stop()
        m.start()
        got = (m.path / "written").read_bytes()
        assert got == b"".join(bytes([i]) * MiB for i in range(20))
    finally:
        m.cleanup()


def test_write_back_waits_for_the_delay(local_target: Target, tmp_path: Path) -> None:
    m = Mount(local_target, tmp_path / "mnt", tmp_path / "cache", {"writeback_delay": "3"})
    m.start()
    try:
        with open(m.path / "slow", "wb") as f:
            for _ in range(5):
                f.write(b"x" * 1000)
                f.flush()
                time.sleep(0.3)
        assert not (local_target.extra["root"] / "slow").exists(), "uploaded before the delay"
        deadline = time.monotonic() + 15
        while not (local_target.extra["root"] / "slow").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (local_target.extra["root"] / "slow").read_bytes() == b"x" * 5000
        assert status(m)["requests"].get("put", 0) == 1, "one upload for one written file"
    finally:
        m.cleanup()


def test_sigkill_during_upload_recovers(target: Target, tmp_path: Path) -> None:
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"writeback_delay": "0", "block_size": "8M"})
    m.start()
    data = os.urandom(64 * MiB)
    try:
        with open(m.path / "interrupted", "wb") as f:
            f.write(data)
        time.sleep(0.3)  # the upload has started
        m.kill()
        assert not mounted(m.path)
        m.start()
        m.stop()  # waits for the recovered upload
        m.start()
        assert (m.path / "interrupted").read_bytes() == data
    finally:
        m.cleanup()


class RandomWrites(RuleBasedStateMachine):
    """Random writes, truncates and reads compared with a bytearray, with remounts between."""

    mount: Mount
    target: Target

    def __init__(self) -> None:
        super().__init__()
        self.model = bytearray()
        self.path = self.mount.path / "model.bin"
        self.path.write_bytes(b"")

    @rule(offset=st.integers(0, 3 * 256 * 1024), data=st.binary(min_size=1, max_size=100_000))
    def write(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)
        if offset > len(self.model):
            self.model += bytes(offset - len(self.model))
        self.model[offset:offset + len(data)] = data

    @rule(size=st.integers(0, 4 * 256 * 1024))
    def truncate(self, size: int) -> None:
        os.truncate(self.path, size)
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model += bytes(size - len(self.model))

    @rule(offset=st.integers(0, 4 * 256 * 1024), size=st.integers(1, 300_000))
    def read(self, offset: int, size: int) -> None:
        with open(self.path, "rb") as f:
            f.seek(offset)
            assert f.read(size) == bytes(self.model[offset:offset + size])

    @precondition(lambda self: True)
    @rule()
    def remount(self) -> None:
        self.mount.remount()

    @invariant()
    def size_matches(self) -> None:
        assert self.path.stat().st_size == len(self.model)

    def teardown(self) -> None:
        self.mount.remount()
        assert self.path.read_bytes() == bytes(self.model)


def test_random_writes_match_model(target: Target, tmp_path: Path) -> None:
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"block_size": "256K"})
    m.start()
    try:
        RandomWrites.mount = m
        RandomWrites.target = target
        run_state_machine_as_test(RandomWrites, settings=settings(
            max_examples=3, stateful_step_count=10, deadline=None, derandomize=True,
            suppress_health_check=list(HealthCheck)))
    finally:
        m.cleanup()
