"""Seeing what a mount does: Prometheus metrics (``-o metrics=HOST:PORT``), scraped from a
real mount during known activity (the numbers are the requests and bytes that activity must
cause), and `cloudfs status` of every mount, and the cache directory housekeeping."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloudfs.status import render
from tests.faults.test_faults import proxied
from tests.mounting import CLOUDFS, Mount
from tests.servers import Target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_what_the_mount_did(local_target: Target, tmp_path: Path) -> None:
    port = free_port()
    m = Mount(local_target, tmp_path / "mnt", tmp_path / "cache",
              {"metrics": f"127.0.0.1:{port}", "sync_upload": "1"})
    m.start()
    try:
        (local_target.extra["root"] / "theirs").write_bytes(b"four")
        (m.path / "mine").write_bytes(b"hello")  # close returns once it is stored
        assert (m.path / "theirs").read_bytes() == b"four"
        got = scrape(port)
        puts = got[("cloudfs_backend_requests_total", (("op", "put"), ("result", "ok")))]
        assert puts == 1
        assert got[("cloudfs_backend_request_seconds_count", (("op", "put"),))] == puts
        assert got[("cloudfs_uploaded_bytes_total", ())] == 5
        assert got[("cloudfs_fetched_bytes_total", ())] == 4
        assert got[("cloudfs_cache_fetches_total", ())] == 1
        assert got[("cloudfs_queued_files", ())] == 0
        assert got[("cloudfs_dirty_bytes", ())] == 0
        misses = [k for k in got
                  if k[0] == "cloudfs_backend_requests_total" and ("result", "NotFound") in k[1]]
        assert misses, "lookups of the new name asked the store and got NotFound"
    finally:
        m.cleanup()


def test_metrics_count_cache_hits_and_evictions(local_target: Target, tmp_path: Path) -> None:
    """A re-read of a cached file is a hit and no fetch; reading 1 MiB through a cache of four
    64 KiB blocks evicts all but the last four blocks it fetched."""
    port = free_port()
    m = Mount(local_target, tmp_path / "mnt", tmp_path / "cache",
              {"metrics": f"127.0.0.1:{port}", "cache_size": "256K", "block_size": "64K"})
    root = local_target.extra["root"]
    (root / "small").write_bytes(b"four")
    big = os.urandom(1024 * 1024)
    (root / "big").write_bytes(big)
    m.start()
    try:
        def counts() -> tuple[float, float, float]:
            got = scrape(port)
            return tuple(got[(f"cloudfs_cache_{name}_total", ())]  # type: ignore[return-value]
                         for name in ("hits", "fetches", "evictions"))

        assert (m.path / "small").read_bytes() == b"four"
        hits, fetches, evictions = counts()
        assert (fetches, evictions) == (1, 0)
        with open(m.path / "small", "rb") as f:  # the kernel forgets its pages: the read reaches us
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert f.read() == b"four"
        assert counts() == (hits + 1, 1, 0)
        assert (m.path / "big").read_bytes() == big
        _, fetches, evictions = counts()
        assert fetches >= 1 + 16 and evictions >= fetches - 4
        assert scrape(port)[("cloudfs_cache_used_bytes", ())] <= 256 * 1024
    finally:
        m.cleanup()


def test_bad_metrics_address_is_one_line_and_exit_2(local_target: Target, tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        for value in ("nonsense", "127.0.0.1:99999", f"127.0.0.1:{port}"):
            proc = subprocess.run([CLOUDFS, "mount", local_target.url, str(tmp_path / "mnt"), "-o",
                                   f"metrics={value},cache_dir={tmp_path / 'cache'}"],
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 2, (value, proc.stderr)
            assert len(proc.stderr.strip().splitlines()) == 1 and "metrics" in proc.stderr, proc.stderr


def test_status_without_a_mountpoint_lists_every_mount(local_target: Target, tmp_path: Path) -> None:
    mounts = [Mount(local_target, tmp_path / f"mnt{i}", tmp_path / f"cache{i}") for i in range(2)]
    try:
        for m in mounts:
            m.start()
        (mounts[0].path / "f").write_bytes(b"x")
        out = subprocess.run([CLOUDFS, "status", "--json"], capture_output=True, text=True, timeout=30,
                             check=True)
        listed = {st["mountpoint"]: st for st in json.loads(out.stdout)}
        for i, m in enumerate(mounts):
            st = listed[str(m.path)]
            assert st["cache"]["dir"] == str(tmp_path / f"cache{i}")
            assert st["log"] == str(tmp_path / f"cache{i}" / "cloudfs.log")
        text = subprocess.run([CLOUDFS, "status"], capture_output=True, text=True, timeout=30,
                              check=True).stdout
        assert all(f"{m.path}: " in text for m in mounts)
    finally:
        for m in mounts:
            m.cleanup()


def test_offline_shows_in_the_metrics_and_in_the_status_of_every_mount(
        moto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """While the store does not answer, ``cloudfs_offline`` is 1 and `cloudfs status --json`
    (all mounts) gives ``offline_since``; the first answer sets both back."""
    _proc, target = moto
    target.sdk.put_object(Bucket="faults", Key="remote", Body=b"not cached")
    port = free_port()
    with proxied(target, fail_every=0) as (proxy, via):
        m = Mount(via, tmp_path / "mnt", tmp_path / "cache", {"metrics": f"127.0.0.1:{port}", "retries": "2"})
        m.start()
        try:
            assert os.listdir(m.path) == ["remote"]
            got = scrape(port)
            assert got[("cloudfs_offline", ())] == 0
            assert every_mount()[str(m.path)]["offline_since"] is None
            proxy.down()
            with pytest.raises(OSError) as exc:
                (m.path / "remote").read_bytes()  # not cached: the fetch fails past its retries
            assert exc.value.errno == errno.EIO
            got = scrape(port)
            assert got[("cloudfs_offline", ())] == 1
            failed = {k: v for k, v in got.items()
                      if k[0] == "cloudfs_backend_requests_total" and ("result", "ok") not in k[1]}
            assert sum(failed.values()) >= 2, failed  # the first attempt and its retry
            st = every_mount()[str(m.path)]
            assert st["offline_since"] is not None and st["backend"].startswith("s3://faults/")
            proxy.up()
            assert (m.path / "remote").read_bytes() == b"not cached"  # the answer ends offline mode
            assert scrape(port)[("cloudfs_offline", ())] == 0
            assert every_mount()[str(m.path)]["offline_since"] is None
        finally:
            m.cleanup()


def every_mount() -> dict[str, dict[str, Any]]:
    """`cloudfs status --json` with no mountpoint, by mountpoint."""
    out = subprocess.run([CLOUDFS, "status", "--json"], capture_output=True, text=True, timeout=30,
                         check=True)
    return {st["mountpoint"]: st for st in json.loads(out.stdout)}


def test_status_text_says_offline_since_and_what_is_queued() -> None:
    """Offline, one line says since when and what waits (people's units); `--json` keeps the
    numbers (`test_offline_the_cache_keeps_serving_and_changes_go_up_when_the_store_is_back`)."""
    st: dict[str, Any] = {
        "mountpoint": "/mnt", "backend": "s3://b/", "pid": 1, "log": None, "offline_since": None,
        "requests": {"put": 2},
        "cache": {"dir": "/c", "used_bytes": 0, "max_bytes": 1024**3, "dirty_bytes": 0, "hits": 0,
                  "fetches": 0, "evictions": 0},
        "uploads": {"pending_files": 1, "pending_bytes": 3 * 1024**3 // 2, "uploaded_bytes": 1,
                    "errors": {}},
    }
    assert "store: answers" in render(st).splitlines()
    st["offline_since"] = time.mktime((2025, 1, 2, 3, 4, 5, 0, 0, -1))
    lines = render(st).splitlines()
    assert "store: offline since 2025-01-02 03:04:05, 1 file / 1.5 GiB queued" in lines
    assert "uploads: 1 file(s) pending (1.5 GiB), 1 byte uploaded" in lines
    st["uploads"].update(pending_files=3, pending_bytes=1536)
    assert "store: offline since 2025-01-02 03:04:05, 3 files / 1.5 KiB queued" in render(st).splitlines()


def test_cache_list_and_clean_never_remove_what_is_in_use_or_pending(local_target: Target,
                                                                    tmp_path: Path) -> None:
    base = tmp_path / "caches"
    busy = Mount(local_target, tmp_path / "mnt", base / "busy", {"writeback_delay": "1h"})
    idle = Mount(local_target, tmp_path / "mnt2", base / "idle")

    def cache(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CLOUDFS, "cache", *args], capture_output=True, text=True, timeout=60)

    try:
        idle.start()
        idle.stop()
        busy.start()
        with open(busy.path / "pending", "wb") as f:
            f.write(b"not uploaded yet")
            os.fsync(f.fileno())
        listed = {d["path"]: d for d in json.loads(cache("list", "--dir", str(base), "--json").stdout)}
        assert listed[str(base / "busy")]["in_use"] and listed[str(base / "busy")]["pending_files"] == 1
        assert not listed[str(base / "idle")]["in_use"] and listed[str(base / "idle")]["pending_files"] == 0
        assert listed[str(base / "idle")]["store"].rstrip("/") == f"file://{local_target.extra['root']}"
        proc = cache("clean", str(base / "busy"))
        assert proc.returncode == 1 and "in use" in proc.stderr
        busy.kill()
        proc = cache("clean", str(base / "busy"))
        assert proc.returncode == 1 and "not uploaded" in proc.stderr
        proc = cache("clean", "--dir", str(base), "--older-than", "30d")
        assert proc.returncode == 0 and sorted(os.listdir(base)) == ["busy", "idle"]
        proc = cache("clean", "--dir", str(base))
        assert proc.returncode == 0 and os.listdir(base) == ["busy"]
        busy.start()  # the pending file goes up at unmount, and then nothing holds the cache
        busy.stop()
        assert (local_target.extra["root"] / "pending").read_bytes() == b"not uploaded yet"
        assert cache("clean", str(base / "busy")).returncode == 0 and os.listdir(base) == []
    finally:
        busy.cleanup()
        idle.cleanup()


def status_of(m: Mount) -> dict[str, Any]:
    out = subprocess.run([CLOUDFS, "status", "--json", str(m.path)], capture_output=True, text=True,
                         timeout=30, check=True)
    return dict(json.loads(out.stdout))


def test_sync_uploads_now_and_warm_fills_the_cache(local_target: Target, tmp_path: Path) -> None:
    root = local_target.extra["root"]
    (root / "data").mkdir()
    (root / "data" / "a").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    (root / "data" / "b").write_bytes(b"small")
    m = Mount(local_target, tmp_path / "mnt", tmp_path / "cache",
              {"writeback_delay": "1h", "block_size": "1M"})
    m.start()
    try:
        (m.path / "new").write_bytes(b"uploaded by sync")
        proc = subprocess.run([CLOUDFS, "sync", str(m.path)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert (root / "new").read_bytes() == b"uploaded by sync"
        assert status_of(m)["uploads"]["pending_files"] == 0
        proc = subprocess.run([CLOUDFS, "warm", str(m.path / "data")], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0 and "warmed 2 file(s)" in proc.stderr, proc.stderr
        assert status_of(m)["cache"]["fetches"] == 5  # 4 blocks of a, 1 of b
        m.remount()  # warm survives: the blocks are in the cache directory
        assert (m.path / "data" / "a").read_bytes() == (root / "data" / "a").read_bytes()
        assert status_of(m)["cache"]["fetches"] == 0
    finally:
        m.cleanup()


def test_sync_with_the_store_down_exits_1_with_one_line(moto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    proc, target = moto
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"writeback_delay": "1h", "retries": "1"})
    m.start()
    try:
        (m.path / "stuck").write_bytes(b"waits for the store")
        proc.stop()
        out = subprocess.run([CLOUDFS, "sync", str(m.path)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 1, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "1 file(s) could not be uploaded" in out.stderr
    finally:
        m.kill()


@pytest.mark.backends("s3")
def test_debug_log_traces_requests_without_contents_or_secrets(target: Target, tmp_path: Path) -> None:
    """``-o debug``: one line per FUSE request and per request to the store, with names and
    sizes, and never the file's bytes, an xattr's value or a credential."""
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"debug": ""})
    m.start()
    try:
        (m.path / "traced.txt").write_bytes(b"CONTENT-NOT-FOR-LOGS")
        os.setxattr(m.path / "traced.txt", "user.note", b"XATTR-NOT-FOR-LOGS")
        assert os.listdir(m.path) == ["traced.txt"]
        m.stop()
    finally:
        m.kill()
    log = (tmp_path / "cache" / "cloudfs.log").read_text(errors="replace")
    assert "fuse create(" in log and "name='traced.txt'" in log
    assert "fuse write(" in log and "buf=<20 bytes>" in log
    assert re.search(r"put\('traced\.txt', <Payload>, <\d+ metadata keys>.*\) -> ok in", log), log[-3000:]
    assert "list_page(" in log
    secret = target.env["AWS_SECRET_ACCESS_KEY"]
    for leak in ("CONTENT-NOT-FOR-LOGS", "XATTR-NOT-FOR-LOGS", f"={secret}", f"'{secret}'",
                 "Signature", "Authorization", target.env["AWS_ACCESS_KEY_ID"] + "/"):
        assert leak not in log, leak
