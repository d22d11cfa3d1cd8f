"""Fault injection through real mounts: crashes, dead servers, full disks, bad input.

Every fault ends in a clear error and loses nothing that was promised.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import CLOUDFS, Mount, mounted
from tests.servers import Target
from tests.servers.flaky_proxy import FlakyProxy
from tests.servers.process import http_ready

MiB = 1024 * 1024


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLOUDFS, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@contextlib.contextmanager
def proxied(target: Target, fail_every: int) -> Iterator[tuple[FlakyProxy, Target]]:
    """A fault proxy in front of ``target``'s S3 server, and ``target`` reached through it."""
    upstream = int(target.env["AWS_ENDPOINT_URL_S3"].rsplit(":", 1)[1])
    with FlakyProxy(upstream, fail_every=fail_every) as proxy:
        yield proxy, Target("s3", target.url, env={**target.env,
                                                   "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{proxy.port}"})


# ---------------------------------------------------------------------- crash safety
@pytest.mark.backends("local", "s3")
def test_sigkill_after_fsync_recovers_on_remount(target: Target, tmp_path: Path) -> None:
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"writeback_delay": "1h"})
    m.start()
    try:
        data = os.urandom(3 * MiB + 5)
        with open(m.path / "precious", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with open(m.path / "dir-less", "wb") as f:
            f.write(b"small")
            os.fsync(f.fileno())
        m.kill()  # SIGKILL: nothing was uploaded (write-back delay of an hour)
        assert not mounted(m.path)
        m.start()  # same cache dir: the journal is replayed
        assert (m.path / "precious").read_bytes() == data
        m.stop()  # unmount waits for the recovered upload
        if target.backend == "s3":
            got = target.sdk.get_object(Bucket=target.url[5:], Key="precious")["Body"].read()
        else:
            got = (target.extra["root"] / "precious").read_bytes()
        assert got == data
    finally:
        m.cleanup()


@pytest.mark.backends("local", "s3")
def test_sigkill_while_a_file_larger_than_the_cache_streams_out(target: Target, tmp_path: Path) -> None:
    """A file three times the cache goes up through one open multipart upload whose parts'
    blocks are evicted as it goes; killed after an fsync, the next mount finishes from that
    upload and the store gets every byte."""
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache",
              {"writeback_delay": "1h", "cache_size": "24M", "block_size": "1M"})
    m.start()
    try:
        data = os.urandom(72 * MiB)
        fd = os.open(m.path / "big", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for off in range(0, len(data), MiB):
                os.write(fd, data[off:off + MiB])
            os.fsync(fd)
            m.kill()
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)  # the mount is gone: ENOTCONN
        m.start()
        m.stop()
        if target.backend == "s3":
            got = target.sdk.get_object(Bucket=target.url[5:], Key="big")["Body"].read()
        else:
            got = (target.extra["root"] / "big").read_bytes()
        assert got == data
        assert "existed only in a multipart upload" not in m.log()
    finally:
        m.cleanup()


def test_unmount_uploads_everything_first(local_target: Target, tmp_path: Path) -> None:
    m = Mount(local_target, tmp_path / "mnt", tmp_path / "cache", {"writeback_delay": "1h"})
    m.start()
    try:
        for i in range(20):
            (m.path / f"f{i}").write_bytes(bytes([i]) * (100_000 + i))
        m.stop()  # returns only when uploads are done and the mount is gone
        root = local_target.extra["root"]
        for i in range(20):
            assert (root / f"f{i}").read_bytes() == bytes([i]) * (100_000 + i)
    finally:
        m.cleanup()


def test_sigterm_flushes_and_exits(local_target: Target, tmp_path: Path) -> None:
    m = Mount(local_target, tmp_path / "mnt", tmp_path / "cache", {"writeback_delay": "1h"})
    m.start()
    try:
        (m.path / "t").write_bytes(b"terminated")
        pid = m.pid()
        assert pid
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while mounted(m.path) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not mounted(m.path)
        assert (local_target.extra["root"] / "t").read_bytes() == b"terminated"
    finally:
        m.cleanup()


# ---------------------------------------------------------------------- server faults
def test_dead_server_gives_eio_not_hang(moto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    proc, target = moto
    target.sdk.put_object(Bucket="faults", Key="remote.bin", Body=os.urandom(MiB))
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"retries": "2", "timeout": "10"})
    m.start()
    try:
        assert (m.path / "remote.bin").stat().st_size == MiB
        f = open(m.path / "open-while-offline", "wb")
        proc.stop()  # the store goes away
        start = time.monotonic()
        with pytest.raises(OSError) as exc:
            (m.path / "remote.bin").read_bytes()
        assert exc.value.errno == errno.EIO
        assert time.monotonic() - start < 30
        # Writes to an open file still land in the cache; the upload waits for the store.
        f.write(b"kept")
        f.close()
        with open(m.path / "open-while-offline", "rb") as g:
            assert g.read() == b"kept"
    finally:
        m.kill()
    # The pending upload survives in the cache directory (journal + block) for the next mount.
    from cloudfs.cache import journal
    from cloudfs.cache.block_cache import BlockCache

    identity = journal.read_json(str(tmp_path / "cache" / "cache.json"))["store"]
    cache = BlockCache(None, str(tmp_path / "cache"), block_size=8 * MiB,  # type: ignore[arg-type]
                       max_bytes=512 * MiB, max_dirty=256 * MiB, store_identity=identity)
    try:
        pending = {f.key: f for f in cache.open().pending}
        file = pending["open-while-offline"]
        assert file.size == 4
        assert Path(file.block_path(0)).read_bytes() == b"kept"
    finally:
        cache.close()


def test_hung_store_fails_with_eio_and_one_clear_line(moto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A store that accepts connections and never answers: a lookup gives EIO after the short
    metadata timeout and its retries, and the log says so without a traceback."""
    _proc, target = moto
    with proxied(target, fail_every=0) as (proxy, hung):
        m = Mount(hung, tmp_path / "mnt", tmp_path / "cache", {"retries": "2", "metadata_timeout": "2"})
        m.start()
        try:
            proxy.hang()
            with pytest.raises(OSError) as exc:
                (m.path / "asked-while-hung").read_bytes()
            assert exc.value.errno == errno.EIO
            assert proxy.hung >= 2, "the lookup was retried"
            log = m.log()
            assert "head got no answer in 2s" in log
            assert "Traceback" not in log and "TooSlowError" not in log
        finally:
            m.kill()


def test_offline_an_uncached_read_from_a_hung_store_fails_within_the_metadata_timeout(
        moto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Once the mount is offline, a read of data that is not cached is one attempt within the
    short ``metadata_timeout``, even while the store hangs (TCP accepted, no answer), not a
    transfer's ``-o timeout`` times its retries."""
    _proc, target = moto
    target.sdk.put_object(Bucket="faults", Key="first", Body=b"puts the mount offline")
    target.sdk.put_object(Bucket="faults", Key="second", Body=os.urandom(MiB))
    with proxied(target, fail_every=0) as (proxy, via):
        m = Mount(via, tmp_path / "mnt", tmp_path / "cache",
                  {"retries": "2", "timeout": "120", "metadata_timeout": "2"})
        m.start()
        try:
            assert sorted(os.listdir(m.path)) == ["first", "second"]  # names and sizes known
            proxy.down()
            with pytest.raises(OSError) as exc:
                (m.path / "first").read_bytes()
            assert exc.value.errno == errno.EIO
            assert json.loads(cli("status", "--json", str(m.path)).stdout)["offline_since"] is not None
            proxy.hang()  # before up(): no request is answered between the two
            proxy.up()
            start = time.monotonic()
            with pytest.raises(OSError) as exc:
                (m.path / "second").read_bytes()
            took = time.monotonic() - start
            assert exc.value.errno == errno.EIO
            assert took < 60, f"the read waited {took:.0f}s: the transfer timeout, not metadata_timeout"
            assert proxy.hung >= 1  # it did ask the hung store
            assert json.loads(cli("status", "--json", str(m.path)).stdout)["offline_since"] is not None
            log = m.log()
            assert "get moved no data for 2s" in log and "Traceback" not in log
        finally:
            m.kill()


def test_offline_the_cache_keeps_serving_and_changes_go_up_when_the_store_is_back(
        moto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _proc, target = moto
    target.sdk.put_object(Bucket="faults", Key="d/remote", Body=b"never read here")
    with proxied(target, fail_every=0) as (proxy, via):
        m = Mount(via, tmp_path / "mnt", tmp_path / "cache", {"retries": "2"})
        m.start()
        try:
            (m.path / "d" / "cached").write_bytes(b"read while offline")
            assert cli("sync", str(m.path)).returncode == 0
            assert sorted(os.listdir(m.path / "d")) == ["cached", "remote"]
            assert (m.path / "d" / "remote").stat().st_size == 15
            proxy.down()
            time.sleep(1.5)  # attr_timeout=1: every cached answer is stale now
            assert (m.path / "d" / "cached").read_bytes() == b"read while offline"
            assert sorted(os.listdir(m.path / "d")) == ["cached", "remote"]
            with pytest.raises(OSError) as exc:
                (m.path / "d" / "remote").read_bytes()  # not cached: fails, and at once
            assert exc.value.errno == errno.EIO
            (m.path / "d" / "new").write_bytes(b"written while offline")
            with open(m.path / "d" / "cached", "ab") as f:
                f.write(b", appended")
            st = json.loads(cli("status", "--json", str(m.path)).stdout)
            assert st["offline_since"] is not None and st["uploads"]["pending_files"] == 2
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st["offline_since"]))
            queued = st["uploads"]["pending_bytes"]
            assert 0 < queued < 1024  # the two small files: shown in bytes
            line = f"store: offline since {since}, 2 files / {queued} bytes queued"
            assert line in cli("status", str(m.path)).stdout.splitlines()
            proxy.up()
            assert cli("sync", str(m.path)).returncode == 0
            st = json.loads(cli("status", "--json", str(m.path)).stdout)
            assert st["offline_since"] is None and st["uploads"]["pending_files"] == 0
            assert "store: answers" in cli("status", str(m.path)).stdout.splitlines()
        finally:
            m.cleanup()
    got = {k: target.sdk.get_object(Bucket="faults", Key=k)["Body"].read() for k in ("d/new", "d/cached")}
    assert got == {"d/new": b"written while offline", "d/cached": b"read while offline, appended"}


def test_offline_writes_beyond_the_cache_wait_and_all_go_up_when_the_store_is_back(
        moto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Offline, a file three times the cache is accepted up to the cache's size; its writer
    then waits (back-pressure: no error, the cache stays within ``cache_size``) and goes on
    once the store answers, and every byte reaches the store.  (ENOSPC comes only after the
    cache's 10-minute stall timeout: `test_writers_get_enospc_only_when_no_upload_finishes`.)"""
    _proc, target = moto
    target.sdk.put_object(Bucket="faults", Key="remote", Body=b"puts the mount offline")
    data = os.urandom(24 * MiB)
    (tmp_path / "src").write_bytes(data)
    # The writer is a process of its own: with a thread of the test's process blocked in
    # the mount's fsync, the test itself stalled before it could bring the store back.
    copy = ("import os, shutil, sys\n"
            "with open(sys.argv[1], 'rb') as src, open(sys.argv[2], 'wb') as dst:\n"
            "    shutil.copyfileobj(src, dst, 1 << 20); dst.flush(); os.fsync(dst.fileno())\n")

    with proxied(target, fail_every=0) as (proxy, via):
        m = Mount(via, tmp_path / "mnt", tmp_path / "cache",
                  {"retries": "2", "cache_size": "8M", "block_size": "1M"})
        m.start()
        writer: subprocess.Popen[str] | None = None
        try:
            assert os.listdir(m.path) == ["remote"]
            proxy.down()
            with pytest.raises(OSError) as exc:
                (m.path / "remote").read_bytes()
            assert exc.value.errno == errno.EIO
            writer = subprocess.Popen([sys.executable, "-c", copy, str(tmp_path / "src"),
                                       str(m.path / "big")], stderr=subprocess.PIPE, text=True)
            log = tmp_path / "cache" / "cloudfs.log"
            end = time.monotonic() + 60
            while "writers waited 10s for cache space" not in log.read_text(errors="replace"):
                assert time.monotonic() < end and writer.poll() is None, m.log()
                time.sleep(0.2)
            assert writer.poll() is None  # waiting: no error
            st = json.loads(cli("status", "--json", str(m.path), timeout=30).stdout)
            assert st["offline_since"] is not None
            assert 0 < st["cache"]["used_bytes"] <= st["cache"]["max_bytes"] == 8 * MiB
            assert st["uploads"]["pending_files"] == 1
            proxy.up()  # the next probe finds it; the queued upload and the writer go on
            assert writer.wait(timeout=120) == 0, (writer.stderr.read() if writer.stderr else "", m.log())
            m.stop()
        finally:
            if writer is not None and writer.poll() is None:
                writer.kill()
            m.cleanup()  # kills the mount if it still waits: the writer's fsync returns then
            if writer is not None:
                writer.wait(timeout=30)
    assert target.sdk.get_object(Bucket="faults", Key="big")["Body"].read() == data


def _wait_for_backoff(log: Path, tries: int, files: int, deadline: float = 90) -> None:
    """Until ``files`` uploads have each failed ``tries`` times: their next retry is at least
    2**(tries-1) s away (the write-back queue's backoff), well after the store's return."""
    pattern = re.compile(rf"upload failed \(try {tries}\)")
    end = time.monotonic() + deadline
    while len(pattern.findall(log.read_text(errors="replace"))) < files:
        assert time.monotonic() < end, f"the uploads did not fail {tries} times: {log.read_text()[-3000:]}"
        time.sleep(0.2)


def _wait_in_store(target: Target, want: dict[str, bytes], deadline: float = 60) -> None:
    """Ask the store itself (never the mount) until it holds ``want``, bounded."""
    end = time.monotonic() + deadline
    got: dict[str, bytes] = {}
    while got != want:
        assert time.monotonic() < end, f"the store holds {sorted(got)} of {sorted(want)}"
        time.sleep(0.5)
        got = {}
        for key in want:
            with contextlib.suppress(target.sdk.exceptions.NoSuchKey, target.sdk.exceptions.NoSuchBucket):
                got[key] = target.sdk.get_object(Bucket="faults", Key=key)["Body"].read()


def test_offline_uploads_resume_by_themselves_in_order_when_the_store_is_back(
        moto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Nothing touches the mount after the outage: the mount asks the store every few seconds
    while it does not answer, and once it does, the queued uploads go up in the order they
    were written, long before their backoff would have retried them, with the usual conflict
    rule for a file another tool changed meanwhile."""
    _proc, target = moto
    with proxied(target, fail_every=0) as (proxy, via):
        m = Mount(via, tmp_path / "mnt", tmp_path / "cache", {"retries": "2"})
        m.start()
        try:
            (m.path / "before").write_bytes(b"up before the outage")
            assert cli("sync", str(m.path)).returncode == 0
            assert os.listdir(m.path) == ["before"]
            proxy.down()
            (m.path / "a").write_bytes(b"written first")
            time.sleep(0.2)
            (m.path / "b").write_bytes(b"written second")
            with open(m.path / "before", "ab") as f:  # and another tool changes it meanwhile
                f.write(b", appended here")
            target.sdk.put_object(Bucket="faults", Key="before", Body=b"changed elsewhere")
            _wait_for_backoff(tmp_path / "cache" / "cloudfs.log", tries=5, files=3)  # next in 16 s
            st = json.loads(cli("status", "--json", str(m.path)).stdout)
            assert st["offline_since"] is not None and st["uploads"]["pending_files"] == 3
            back = len(proxy.requests)
            proxy.up()
            _wait_in_store(target, {"a": b"written first", "b": b"written second",
                                    "before": b"changed elsewhere"})
            # The usual conflict rule: the store's version keeps the name, ours is a copy.
            end = time.monotonic() + 60
            while not (copies := [o["Key"] for o in target.sdk.list_objects_v2(
                    Bucket="faults", Prefix="before.conflict-").get("Contents", [])]):
                assert time.monotonic() < end, "no conflict copy of 'before'"
                time.sleep(0.5)
            assert len(copies) == 1, copies
            _wait_in_store(target, {copies[0]: b"up before the outage, appended here"})
            seen = [(r.method, r.path.split("?")[0], r.path) for r in proxy.requests[back:]]
            puts = [path for method, path, _ in seen if method == "PUT"]
            assert puts.index("/faults/a") < puts.index("/faults/b"), seen
            # What brought the store back was the probe (a one-name listing), not a retry.
            assert seen[0][0] == "GET" and "max-keys=1" in seen[0][2], seen
            st = json.loads(cli("status", "--json", str(m.path)).stdout)
            assert st["offline_since"] is None and st["uploads"]["pending_files"] == 0
            log = (tmp_path / "cache" / "cloudfs.log").read_text()
            assert log.count("answers again") == 1 and "Traceback" not in log
        finally:
            m.cleanup()


def test_uploads_resume_by_themselves_when_the_store_server_restarts(
        moto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The same with the real test server stopped (connections refused) and started again on
    its port.  moto keeps nothing across a restart: the bucket is created again at once."""
    proc, target = moto
    endpoint = target.env["AWS_ENDPOINT_URL_S3"]
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"retries": "2"})
    m.start()
    try:
        assert os.listdir(m.path) == []  # a complete listing: names are known while offline
        proc.stop()
        (m.path / "a").write_bytes(b"written first")
        (m.path / "b").write_bytes(b"written second")
        _wait_for_backoff(tmp_path / "cache" / "cloudfs.log", tries=4, files=2)  # next in 8 s
        proc.start(lambda: http_ready(f"{endpoint}/"), timeout=60)
        target.sdk.create_bucket(Bucket="faults")
        _wait_in_store(target, {"a": b"written first", "b": b"written second"})
        assert "Traceback" not in (tmp_path / "cache" / "cloudfs.log").read_text()
    finally:
        m.cleanup()


def test_umount_reports_what_could_not_be_uploaded(moto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Case 16: the store is down at unmount: ``cloudfs umount`` exits 1 with one line saying
    what stays in the cache directory, and the next mount uploads it."""
    proc, target = moto
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache",
              {"writeback_delay": "1h", "retries": "1", "timeout": "5"})
    m.start()
    try:
        (m.path / "kept").write_bytes(b"x" * 1000)
        proc.stop()  # the store goes away
        out = subprocess.run([CLOUDFS, "umount", str(m.path)], env=m.env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 1, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "1 file(s), 1000 bytes could not be uploaded" in lines[0], lines
        assert str(tmp_path / "cache") in lines[0]
        assert not mounted(m.path)
    finally:
        m.cleanup()


def test_server_errors_are_retried(moto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A store that throttles every third request (503 SlowDown) still gets every file."""
    _proc, target = moto
    with proxied(target, fail_every=3) as (proxy, flaky):
        m = Mount(flaky, tmp_path / "mnt", tmp_path / "cache")
        m.start()
        try:
            for i in range(5):
                (m.path / f"r{i}").write_bytes(b"x" * 1000 * (i + 1))
            m.stop()
        finally:
            m.cleanup()
        assert proxy.failed > 0
    for i in range(5):
        body = target.sdk.get_object(Bucket="faults", Key=f"r{i}")["Body"].read()
        assert body == b"x" * 1000 * (i + 1)


# ---------------------------------------------------------------------- cache faults
def test_small_cache_disk_applies_back_pressure(local_target: Target, tmp_path: Path) -> None:
    """A file three times the cache size is written without ENOSPC: writers wait for uploads."""
    cache = tmp_path / "smallfs"
    cache.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(cache)], check=True)
    m = Mount(local_target, tmp_path / "mnt", cache / "c",
              {"cache_size": "32M", "block_size": "1M", "min_free": "4M", "max_dirty": "16M"})
    try:
        m.start()
        data = os.urandom(MiB)
        with open(m.path / "big", "wb") as f:
            for _ in range(96):
                f.write(data)
        m.stop()
        stored = (local_target.extra["root"] / "big").read_bytes()
        assert len(stored) == 96 * MiB and stored[:MiB] == data and stored[-MiB:] == data
    finally:
        m.cleanup()
        subprocess.run(["umount", "-l", str(cache)], check=False)


def test_cache_files_are_private(local_target: Target, tmp_path: Path) -> None:
    m = Mount(local_target, tmp_path / "mnt", tmp_path / "cache", {"writeback_delay": "1h"})
    m.start()
    try:
        (m.path / "secret").write_bytes(b"s" * 10)
        os.fsync(os.open(m.path / "secret", os.O_RDONLY))
        assert stat.S_IMODE(os.stat(tmp_path / "cache").st_mode) == 0o700
        for dirpath, dirs, files in os.walk(tmp_path / "cache"):
            for d in dirs:
                assert stat.S_IMODE(os.stat(os.path.join(dirpath, d)).st_mode) == 0o700, d
            for f in files:
                assert stat.S_IMODE(os.stat(os.path.join(dirpath, f)).st_mode) == 0o600, f
    finally:
        m.cleanup()


def test_two_mounts_cannot_share_a_cache_dir(local_target: Target, tmp_path: Path) -> None:
    m = Mount(local_target, tmp_path / "mnt", tmp_path / "cache")
    m.start()
    try:
        (tmp_path / "mnt2").mkdir()
        r = cli("mount", local_target.url, str(tmp_path / "mnt2"), "-o", f"cache_dir={tmp_path / 'cache'}")
        assert r.returncode == 16
        assert "in use by another cloudfs mount" in r.stderr
        assert not mounted(tmp_path / "mnt2")
    finally:
        m.cleanup()


# ---------------------------------------------------------------------- bad input
def test_cli_errors(tmp_path: Path, moto) -> None:  # type: ignore[no-untyped-def]
    _proc, target = moto
    (tmp_path / "mnt").mkdir()
    mnt = str(tmp_path / "mnt")
    cases = [
        (["mount", "ftp://x/y", mnt], 2, "unknown URL scheme"),
        (["mount", "b2://x", mnt], 2, "not a B2 bucket name"),
        (["mount", f"file://{tmp_path}/nope", mnt], 1, "does not exist"),
        (["mount", f"file://{tmp_path}", str(tmp_path / "missing")], 2, "does not exist"),
        (["mount", f"file://{tmp_path}", mnt, "-o", "bogus=1"], 2, "unknown mount option"),
        (["mount", f"file://{tmp_path}", mnt, "-o", "cache_size=lots"], 2, "not a size"),
        (["mount", "s3://user:pw@bucket", mnt], 2, "credentials do not belong in the URL"),
    ]
    for args, code, text in cases:
        r = cli(*args, "-o", f"cache_dir={tmp_path / 'c'}") if "-o" not in args else cli(*args)
        assert r.returncode == code, (args, r.stderr)
        assert text in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one line, no traceback
    # a missing bucket on a live store; the failed mount leaves no cache directory behind
    r = cli("mount", "s3://no-such-bucket", mnt, "-o", f"cache_dir={tmp_path / 'c2'}", env=target.env)
    assert r.returncode == 1 and "no-such-bucket" in r.stderr, r.stderr
    assert not (tmp_path / "c2").exists()
    # no credentials at all: a clear message, and no secret in it
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
           "AWS_CONFIG_FILE": "/dev/null", "AWS_ENDPOINT_URL_S3": target.env["AWS_ENDPOINT_URL_S3"]}
    r = cli("mount", "s3://faults", mnt, "-o", f"cache_dir={tmp_path / 'c3'}", env=env)
    assert r.returncode == 1 and "credential" in r.stderr.lower(), r.stderr
    assert not (tmp_path / "c3").exists()
    # a cache directory that was there before stays, whatever it holds
    (tmp_path / "c4").mkdir(mode=0o700)
    r = cli("mount", "s3://no-such-bucket", mnt, "-o", f"cache_dir={tmp_path / 'c4'}", env=target.env)
    assert r.returncode == 1 and (tmp_path / "c4").is_dir()
    assert not mounted(tmp_path / "mnt")


def test_mountpoint_busy(local_target: Target, tmp_path: Path) -> None:
    m = Mount(local_target, tmp_path / "mnt", tmp_path / "cache")
    m.start()
    try:
        r = cli("mount", local_target.url, str(m.path), "-o", f"cache_dir={tmp_path / 'other'}")
        assert r.returncode == 16 and "busy" in r.stderr
    finally:
        m.cleanup()


def test_secrets_never_logged(moto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _proc, target = moto
    secret = "Sup3r-S3cret-Value-9f2c"
    target = Target("s3", target.url, env={**target.env, "AWS_SECRET_ACCESS_KEY": secret})
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"debug": ""})
    m.start()
    try:
        (m.path / "f").write_text("x")
        with pytest.raises(OSError):
            (m.path / ("n" * 300)).write_text("x")
        m.stop()
    finally:
        m.cleanup()
    log = (tmp_path / "cache" / "cloudfs.log").read_text()
    assert "mounted s3://faults" in log
    assert secret not in log


def test_concurrent_readers_during_upload(local_target: Target, tmp_path: Path) -> None:
    """Reads of a file whose upload is running see the written data, never a torn mix."""
    m = Mount(local_target, tmp_path / "mnt", tmp_path / "cache", {"writeback_delay": "0"})
    m.start()
    try:
        data = os.urandom(24 * MiB)
        (m.path / "busy").write_bytes(data)
        bad: list[int] = []

        def reader() -> None:
            for _ in range(5):
                if (m.path / "busy").read_bytes() != data:
                    bad.append(1)

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not bad
    finally:
        m.cleanup()


@pytest.mark.backends("b2")
def test_b2_expired_tokens_and_upload_503s_lose_nothing(target: Target, tmp_path: Path) -> None:
    """Like B2's X-Bz-Test-Mode (expire_some_account_authorization_tokens, fail_some_uploads),
    planned on the test server: the mount renews its token once and retries uploads on fresh
    upload URLs; every file arrives intact, and the key is never written anywhere."""
    from tests.servers.b2 import post_json

    realm = target.extra["realm"]
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"debug": "", "writeback_delay": "0"})
    m.start()
    files = {f"f{i}": os.urandom(1000 + i) for i in range(4)}
    files["large"] = os.urandom(20 * MiB + 3)  # above the part size: a large file of 3 parts
    try:
        (m.path / "warm").write_bytes(b"w")
        post_json(f"{realm}/cloudfs-test/faults", {"expire_tokens": True, "fail_uploads": 3})
        for name, data in files.items():
            (m.path / name).write_bytes(data)
        m.stop()
    finally:
        m.cleanup()
    for name, data in files.items():
        got = io.BytesIO()
        target.sdk.download_file_by_name(name).save(got)
        assert got.getvalue() == data, name
    log = (tmp_path / "cache" / "cloudfs.log").read_text()
    assert log.count("session expired, re-authorizing") == 1
    assert "retrying on a new upload URL" in log
    key = target.env["B2_APPLICATION_KEY"].encode()
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file():
            assert key not in path.read_bytes(), path
    state = tmp_path / "cache" / "backend" / "b2_account.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
