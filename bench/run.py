"""cloudfs side by side with rclone mount, s3fs and a local directory, on one SeaweedFS.

    .venv/bin/python bench/run.py                 # the full run (~20-30 min), as `make bench`
    .venv/bin/python bench/run.py --quick         # smoke run with small sizes (~3 min)
    .venv/bin/python bench/run.py --workloads seq_read,ls --tools cloudfs,rclone
    .venv/bin/python bench/run.py --workloads rand_read,passthrough --tools cloudfs
    .venv/bin/python bench/run.py --workloads ls_scale --huge      # adds the 100k-entry folder
    .venv/bin/python bench/run.py --workloads ls --tools cloudfs --rss-200k   # + find over 200k objects

Needs root (drop_caches, FUSE), rclone, s3fs and fio.  Writes bench/results/<stamp>.json
and rewrites the generated section of docs/benchmarks.md (the prose around it is kept).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    ROOT,
    TOOLS,
    Cloudfs,
    MiB,
    Passthrough,
    Pattern,
    RssSampler,
    Server,
    Tool,
    drop_caches,
    machine,
    mounted,
    replace_section,
    tool_versions,
)
from rss import TARGET_MIB as RSS_TARGET_MIB

# passthrough: the random-read job of rand_read, run once on bench/passthrough.py (the
# request ceiling) instead of on every tool.  find_rss is opt-in (--rss-200k), cloudfs only.
WORKLOADS = ["seq_write", "seq_read", "rand_read", "small_files", "ls", "tar", "cp_r", "find_ls", "ls_scale",
             "passthrough"]
HUGE_ENTRIES = 100_000  # --huge adds a folder of this many entries to ls_scale
RSS_FILES_PER_FOLDER = 1000  # find_rss's tree: one LIST page per folder
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "bench" / "results"


@dataclass
class Sizes:
    raw: int = 256 * MiB
    seq: int = 1024 * MiB
    rand: int = 512 * MiB
    small_files: int = 1000
    small_size: int = 4096
    dir_entries: int = 10_000
    scale_entries: tuple[int, ...] = (1000, 10_000)  # ls_scale: one folder of each size
    tree_files: int = 3000  # cp_r's source and find_ls's tree, small_size each
    tree_folders: int = 30
    rss_objects: int = 200_000  # find_rss
    fio_runtime: int = 15
    durable_timeout: float = 600.0

    @property
    def rss_folders(self) -> int:
        return max(1, self.rss_objects // RSS_FILES_PER_FOLDER)


QUICK = Sizes(raw=32 * MiB, seq=64 * MiB, rand=32 * MiB, small_files=100, dir_entries=500,
              scale_entries=(100, 1000), tree_files=200, tree_folders=10, fio_runtime=3,
              durable_timeout=120.0)


@dataclass
class TreeWrite:
    """What :meth:`Bench.write_tree` measured (seconds)."""

    return_s: float
    durable_s: float
    unmount_s: float
    proc: subprocess.CompletedProcess[str]
    rss_mib: float | None


def timed_listing(argv: list[str], want_lines: int) -> float:
    """Seconds ``argv`` took; it must exit 0 and print exactly ``want_lines`` lines."""
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    elapsed = time.monotonic() - t0
    lines = proc.stdout.count("\n")
    if proc.returncode or lines != want_lines:
        raise RuntimeError(f"{shlex.join(argv)} returned {proc.returncode} with {lines} lines "
                           f"(want {want_lines}): {proc.stderr[-500:]}")
    return elapsed


class Bench:
    def __init__(self, work: Path, sizes: Sizes, srv: Server) -> None:
        self.work = work
        self.sizes = sizes
        self.srv = srv
        self.sdk = srv.sdk
        self.pattern = Pattern()
        self.bucket = ""
        self.tarball = work / "src.tar"
        self.tar_files = 0
        self.raw: dict[str, Any] = {}
        self.local_root = work  # the local tool's directory, from setup() on
        self.stored: set[str] = set()  # prefixes store() has filled

    # ------------------------------------------------------------------ setup
    def setup(self, local: Path, workloads: list[str]) -> None:
        """The bucket and the fixtures ``workloads`` read, on the server and (but for
        find_rss's) in the local directory ``local``, which is the local tool's bucket."""
        self.local_root = local
        self.bucket = self.srv.new_bucket().extra["bucket"]
        self.raw = self.measure_raw()
        fx = local / "fixtures"
        fx.mkdir(parents=True, exist_ok=True)
        s = self.sizes
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=8)
        for name, size in (("seq.bin", s.seq), ("rand.bin", s.rand)):
            self.pattern.write_file(fx / name, size)
            self.sdk.upload_file(str(fx / name), self.bucket, f"fixtures/{name}", Config=cfg)
        if "ls" in workloads:
            self.flat_folder(s.dir_entries)
        if "ls_scale" in workloads:
            for n in s.scale_entries:
                self.flat_folder(n)
        if {"cp_r", "find_ls"} & set(workloads):
            self.small_tree()
        if "find_rss" in workloads:
            self.rss_tree()
        self.make_tarball()
        log(f"fixtures ready in bucket {self.bucket}")

    def store(self, prefix: str, names: list[str], body: bytes, mirror: bool) -> str:
        """PUT ``body`` as ``prefix/name`` for every name straight to the server (not through
        a mount), 16 at a time, and with ``mirror`` write the same files in the local
        directory.  Each prefix is filled once per run; returns it."""
        if prefix in self.stored:
            return prefix

        def put(name: str) -> None:
            if mirror:
                path = self.local_root / prefix / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(body)
            self.sdk.put_object(Bucket=self.bucket, Key=f"{prefix}/{name}", Body=body)

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(put, names))
        self.stored.add(prefix)
        log(f"stored {len(names):,} objects under {prefix}/ in {time.monotonic() - t0:.1f}s")
        return prefix

    def flat_folder(self, entries: int) -> str:
        """One folder of ``entries`` objects of 100 bytes (ls, ls_scale)."""
        return self.store(f"fixtures/flat-{entries}", [f"entry-{i:06d}.txt" for i in range(entries)],
                          b"x" * 100, mirror=True)

    def tree(self, prefix: str, files: int, folders: int, body: bytes, mirror: bool) -> str:
        """``files`` objects spread evenly over ``folders`` folders one level below ``prefix``."""
        return self.store(prefix, [f"d{i % folders:04d}/f{i:06d}" for i in range(files)], body, mirror)

    def small_tree(self) -> str:
        """cp_r's source (the local copy) and find_ls's tree (on the server)."""
        s = self.sizes
        return self.tree(f"fixtures/tree-{s.tree_files}", s.tree_files, s.tree_folders,
                         self.pattern.base[:s.small_size], mirror=True)

    def rss_tree(self) -> str:
        """find_rss's objects: only cloudfs reads them, so there is no local copy."""
        s = self.sizes
        return self.tree(f"rss/tree-{s.rss_objects}", s.rss_objects, s.rss_folders, b"x" * 100, mirror=False)

    def measure_raw(self) -> dict[str, Any]:
        """The server's own speed through boto3: one stream, and multipart with 8 threads."""
        from boto3.s3.transfer import TransferConfig

        size = self.sizes.raw
        data = b"".join(self.pattern.chunk(i) for i in range(size // MiB))
        out: dict[str, Any] = {"size_mib": size // MiB}
        t0 = time.monotonic()
        self.sdk.put_object(Bucket=self.bucket, Key="raw/single", Body=data)
        out["put_single_MiBps"] = mibps(size, time.monotonic() - t0)
        t0 = time.monotonic()
        got = self.sdk.get_object(Bucket=self.bucket, Key="raw/single")["Body"].read()
        out["get_single_MiBps"] = mibps(size, time.monotonic() - t0)
        assert got == data, "SeaweedFS returned different data"
        cfg = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=8)
        t0 = time.monotonic()
        self.sdk.upload_fileobj(io.BytesIO(data), self.bucket, "raw/multipart", Config=cfg)
        out["put_multipart_MiBps"] = mibps(size, time.monotonic() - t0)
        buf = io.BytesIO()
        t0 = time.monotonic()
        self.sdk.download_fileobj(self.bucket, "raw/multipart", buf, Config=cfg)
        out["get_multipart_MiBps"] = mibps(size, time.monotonic() - t0)
        del data, got, buf
        log(f"raw SeaweedFS: {out}")
        return out

    def make_tarball(self) -> None:
        """A real source tree available offline: the Python stdlib (regular files and
        directories only, no __pycache__), ~40 MB and ~750 files."""
        src = Path("/usr/lib/python3.11")
        if not src.is_dir():
            src = Path(sysconfig.get_paths()["stdlib"])
        count = 0

        def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
            nonlocal count
            if "__pycache__" in info.name or "site-packages" in info.name or "dist-packages" in info.name:
                return None
            if not (info.isfile() or info.isdir()):
                return None
            count += info.isfile()
            return info

        with tarfile.open(self.tarball, "w") as tar:
            tar.add(src, arcname=src.name, filter=keep)
        self.tar_files = count
        self.tar_source = str(src)
        self.tar_mib = round(self.tarball.stat().st_size / MiB, 1)

    # ------------------------------------------------------------------ helpers
    def wait_object(self, key: str, size: int, t0: float) -> float:
        deadline = time.monotonic() + self.sizes.durable_timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if self.sdk.head_object(Bucket=self.bucket, Key=key)["ContentLength"] == size:
                    return time.monotonic() - t0
            time.sleep(0.1)
        raise TimeoutError(f"{key} did not reach {size} bytes on the server in {self.sizes.durable_timeout}s")

    def count_objects(self, prefix: str) -> int:
        n = 0
        for page in self.sdk.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            n += sum(1 for o in page.get("Contents", []) if not o["Key"].endswith("/"))
        return n

    def wait_count(self, prefix: str, want: int, t0: float) -> float:
        deadline = time.monotonic() + self.sizes.durable_timeout
        while time.monotonic() < deadline:
            if self.count_objects(prefix) >= want:
                return time.monotonic() - t0
            time.sleep(0.25)
        raise TimeoutError(f"{prefix}: {self.count_objects(prefix)} of {want} objects on the server after "
                           f"{self.sizes.durable_timeout}s")

    def until_on_server(self, tool: Tool, prefix: str, want: int, t0: float) -> float:
        """Seconds from ``t0`` until ``want`` objects are under ``prefix`` on the server; for
        the local directory, which has no server, until sync returns."""
        if tool.name == "local":
            os.sync()
            return time.monotonic() - t0
        return self.wait_count(prefix, want, t0)

    def write_tree(self, tool: Tool, name: str, argv_into: Callable[[Path], list[str]],
                   files: int) -> TreeWrite:
        """On a fresh mount, run ``argv_into(d)``, a command that writes ``files`` files under
        ``d`` = w-<tool>/<name>, and wait until they are all on the server."""
        tool.mount(clean=True)
        d = tool.root / f"w-{tool.name}" / name
        d.mkdir(parents=True, exist_ok=True)
        with RssSampler(tool.pid) as rss:
            t0 = time.monotonic()
            proc = subprocess.run(argv_into(d), capture_output=True, text=True, timeout=1800)
            t_return = time.monotonic() - t0
            t_durable = self.until_on_server(tool, f"w-{tool.name}/{name}/", files, t0)
            t_unmount = tool.unmount()
        return TreeWrite(t_return, t_durable, t_unmount, proc, rss.peak_mib)

    def cold_then_warm(self, tool: Tool, argv: list[str], want_lines: int, warm: bool) -> dict[str, Any]:
        """``argv``, a listing of the mount, on a fresh mount with an empty cache and dropped
        caches (cold), then with ``warm`` once more in the same mount."""
        tool.mount(clean=True)
        drop_caches()
        with RssSampler(tool.pid) as rss:
            out = {"cold_s": round(timed_listing(argv, want_lines), 3)}
            if warm:
                out["warm_s"] = round(timed_listing(argv, want_lines), 3)
        tool.unmount()
        out["rss_mib"] = rss.peak_mib
        return out

    def read_file(self, path: Path, size: int) -> float:
        """Sequential read with 1 MiB read() calls; checks every chunk's index and samples."""
        buf = bytearray(MiB)
        view = memoryview(buf)
        base = self.pattern.base
        t0 = time.monotonic()
        with open(path, "rb", buffering=0) as f:
            for i in range(size // MiB):
                got = 0
                while got < MiB:
                    n = f.readinto(view[got:])
                    if not n:
                        raise RuntimeError(f"{path}: short file at {i * MiB + got}")
                    got += n
                if buf[:8] != i.to_bytes(8, "little") or buf[4096:4160] != base[4096:4160] \
                        or buf[-64:] != base[-64:]:
                    raise RuntimeError(f"{path}: wrong data in MiB {i}")
            if f.read(1):
                raise RuntimeError(f"{path}: longer than {size}")
        return time.monotonic() - t0

    def verify_object(self, key: str, size: int) -> None:
        n = size // MiB
        for i in sorted({0, n // 2, n - 1}):
            body = self.sdk.get_object(Bucket=self.bucket, Key=key,
                                       Range=f"bytes={i * MiB}-{(i + 1) * MiB - 1}")["Body"].read()
            if body != self.pattern.chunk(i):
                raise RuntimeError(f"{key}: MiB {i} on the server differs from what was written")

    # ------------------------------------------------------------------ workloads
    def seq_write(self, tool: Tool) -> dict[str, Any]:
        size = self.sizes.seq
        tool.mount(clean=True)
        drop_caches()
        d = tool.root / f"w-{tool.name}"
        d.mkdir(exist_ok=True)
        out: dict[str, Any] = {"size_mib": size // MiB}
        with RssSampler(tool.pid) as rss:
            t0 = time.monotonic()
            fd = os.open(d / "seq.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for i in range(size // MiB):
                    view = memoryview(self.pattern.chunk(i))
                    while view:
                        view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            t_ret = time.monotonic() - t0
            if tool.name == "local":
                t_dur = t_ret
            else:
                t_dur = self.wait_object(f"w-{tool.name}/seq.bin", size, t0)
            out["unmount_s"] = round(tool.unmount(), 2)
        if tool.name != "local":
            self.verify_object(f"w-{tool.name}/seq.bin", size)
        out.update(write_MiBps=mibps(size, t_ret), write_s=round(t_ret, 2), durable_s=round(t_dur, 2),
                   durable_MiBps=mibps(size, t_dur), rss_mib=rss.peak_mib)
        return out

    def seq_read(self, tool: Tool) -> dict[str, Any]:
        size = self.sizes.seq
        path = tool.root / "fixtures" / "seq.bin"
        tool.mount(clean=True)
        drop_caches()
        with RssSampler(tool.pid) as rss1:
            cold = self.read_file(path, size)
            warm = self.read_file(path, size)
        tool.unmount()
        drop_caches()
        tool.mount(clean=False)
        with RssSampler(tool.pid) as rss2:
            remount = self.read_file(path, size)
        tool.unmount()
        return {"size_mib": size // MiB, "cold_MiBps": mibps(size, cold), "warm_MiBps": mibps(size, warm),
                "remount_MiBps": mibps(size, remount), "cold_s": round(cold, 2),
                "rss_mib": peak(rss1.peak_mib, rss2.peak_mib)}

    def fio(self, path: Path, tag: str) -> dict[str, Any]:
        argv = ["fio", f"--name={tag}", f"--filename={path}", "--readonly", "--rw=randread", "--bs=4k",
                f"--size={self.sizes.rand}", "--ioengine=psync", "--numjobs=4", "--group_reporting",
                f"--runtime={self.sizes.fio_runtime}", "--time_based", "--invalidate=1",
                "--randrepeat=1", "--output-format=json"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.sizes.fio_runtime + 120)
        if proc.returncode:
            raise RuntimeError(f"fio failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]["read"]
        pct = job.get("clat_ns", {}).get("percentile", {})
        return {"iops": round(job["iops"]), "lat_mean_ms": round(job["lat_ns"]["mean"] / 1e6, 3),
                "lat_p99_ms": round(pct.get("99.000000", 0) / 1e6, 3)}

    def rand_read(self, tool: Tool) -> dict[str, Any]:
        path = tool.root / "fixtures" / "rand.bin"
        tool.mount(clean=True)
        drop_caches()
        with RssSampler(tool.pid) as rss:
            cold = self.fio(path, "cold")
            warm = self.fio(path, "warm")
        tool.unmount()
        return {"file_mib": self.sizes.rand // MiB, "runtime_s": self.sizes.fio_runtime,
                "cold_iops": cold["iops"], "cold_lat_mean_ms": cold["lat_mean_ms"],
                "cold_lat_p99_ms": cold["lat_p99_ms"], "warm_iops": warm["iops"],
                "warm_lat_mean_ms": warm["lat_mean_ms"], "rss_mib": rss.peak_mib}

    def small_files(self, tool: Tool) -> dict[str, Any]:
        n, size = self.sizes.small_files, self.sizes.small_size
        tool.mount(clean=True)
        d = tool.root / f"w-{tool.name}" / "small"
        d.mkdir(parents=True, exist_ok=True)
        bodies = [i.to_bytes(8, "little") + self.pattern.base[8:size] for i in range(n)]
        with RssSampler(tool.pid) as rss:
            t0 = time.monotonic()
            for i in range(n):
                with open(d / f"f{i:05d}", "wb") as f:
                    f.write(bodies[i])
            t_create = time.monotonic() - t0
            t1 = time.monotonic()
            for i in range(n):
                with open(d / f"f{i:05d}", "rb") as f:
                    if f.read() != bodies[i]:
                        raise RuntimeError(f"small file {i} reads back wrong")
            t_read = time.monotonic() - t1
            t_dur = self.until_on_server(tool, f"w-{tool.name}/small/", n, t0)
            out = {"files": n, "create_s": round(t_create, 2), "create_files_per_s": round(n / t_create),
                   "read_s": round(t_read, 2), "read_files_per_s": round(n / t_read),
                   "durable_s": round(t_dur, 2), "unmount_s": round(tool.unmount(), 2)}
        out["rss_mib"] = rss.peak_mib
        return out

    def ls_listing(self, tool: Tool, entries: int, warm: bool) -> dict[str, Any]:
        """``ls -l`` of a folder of ``entries`` objects, cold, then with ``warm`` again."""
        path = tool.root / self.flat_folder(entries)
        out = self.cold_then_warm(tool, ["ls", "-l", str(path)], entries + 1, warm)  # + "total N"
        return {"entries": entries, **out, "cold_entries_per_s": round(entries / out["cold_s"]),
                "cold_us_per_entry": round(out["cold_s"] / entries * 1e6)}

    def ls(self, tool: Tool) -> dict[str, Any]:
        return self.ls_listing(tool, self.sizes.dir_entries, warm=True)

    def ls_scale(self, tool: Tool) -> dict[str, Any]:
        """Cold ``ls -l`` of one folder per size, each on its own fresh mount, so the time and
        cloudfs's requests of each size stand alone: growth with the size shows in them."""
        parts: dict[str, Any] = {}
        for entries in self.sizes.scale_entries:
            part = parts[str(entries)] = self.ls_listing(tool, entries, warm=False)
            if isinstance(tool, Cloudfs):
                part["requests"] = tool.take_requests()  # counted before this size's unmount
        return {"parts": parts}

    def find_ls(self, tool: Tool) -> dict[str, Any]:
        """``find -ls`` of the small-file tree (uploaded to the server directly), cold and warm."""
        s = self.sizes
        path = tool.root / self.small_tree()
        want = s.tree_files + s.tree_folders + 1  # a line for every file, every folder and the top
        out = self.cold_then_warm(tool, ["find", str(path), "-ls"], want, warm=True)
        return {"files": s.tree_files, "folders": s.tree_folders, **out}

    def find_rss(self, tool: Tool) -> dict[str, Any]:
        """--rss-200k: a plain ``find`` over rss_objects objects on a cold cloudfs mount; the
        figure is the daemon's peak RSS."""
        s = self.sizes
        path = tool.root / self.rss_tree()
        out = self.cold_then_warm(tool, ["find", str(path)], s.rss_objects + s.rss_folders + 1, warm=False)
        return {"objects": s.rss_objects, "folders": s.rss_folders, **out}

    def tar(self, tool: Tool) -> dict[str, Any]:
        w = self.write_tree(tool, "tar", lambda d: ["tar", "--no-same-owner", "-xf", str(self.tarball), "-C",
                                                    str(d)], self.tar_files)
        out = {"files": self.tar_files, "tar_mib": self.tar_mib, "extract_s": round(w.return_s, 2),
               "extract_files_per_s": round(self.tar_files / w.return_s), "durable_s": round(w.durable_s, 2),
               "unmount_s": round(w.unmount_s, 2), "tar_rc": w.proc.returncode, "rss_mib": w.rss_mib}
        if w.proc.returncode:
            out["tar_stderr"] = w.proc.stderr.strip()[-1500:]
        return out

    def cp_r(self, tool: Tool) -> dict[str, Any]:
        """``cp -r`` of the local small-file tree into the mount."""
        s = self.sizes
        src = self.small_tree()
        w = self.write_tree(tool, "cp_r", lambda d: ["cp", "-r", f"{self.local_root / src}/.", str(d)],
                            s.tree_files)
        out = {"files": s.tree_files, "folders": s.tree_folders, "return_s": round(w.return_s, 2),
               "return_files_per_s": round(s.tree_files / w.return_s), "durable_s": round(w.durable_s, 2),
               "unmount_s": round(w.unmount_s, 2), "cp_rc": w.proc.returncode, "rss_mib": w.rss_mib}
        if w.proc.returncode:
            out["cp_stderr"] = w.proc.stderr.strip()[-1500:]
        if tool.name != "local":
            key = f"w-{tool.name}/cp_r/d0000/f000000"
            body = self.sdk.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            if body != self.pattern.base[:s.small_size]:
                raise RuntimeError(f"{key} on the server differs from its source")
        return out


# ---------------------------------------------------------------------- report
def mibps(size: int, seconds: float) -> float:
    return round(size / MiB / seconds, 1) if seconds > 0 else float("inf")


def peak(*values: float | None) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# (workload, key, label, unit, higher_is_better)
ROWS = [
    ("seq_write", "write_MiBps", "seq write {size_mib} MiB: write+fsync+close returns", "MiB/s", True),
    ("seq_write", "durable_MiBps", "seq write {size_mib} MiB: until on the server", "MiB/s", True),
    ("seq_read", "cold_MiBps", "seq read {size_mib} MiB, cold (empty cache, caches dropped)", "MiB/s", True),
    ("seq_read", "warm_MiBps", "seq read {size_mib} MiB, warm (read again)", "MiB/s", True),
    ("seq_read", "remount_MiBps", "seq read {size_mib} MiB after remount + drop_caches", "MiB/s", True),
    ("rand_read", "cold_iops", "random 4 KiB reads, {file_mib} MiB file, 4 jobs, cold start", "IOPS", True),
    ("rand_read", "warm_iops", "random 4 KiB reads, {file_mib} MiB file, 4 jobs, warm", "IOPS", True),
    ("small_files", "create_files_per_s", "{files} x 4 KiB files: create+write+close", "files/s", True),
    ("small_files", "read_files_per_s", "{files} x 4 KiB files: open+read+close", "files/s", True),
    ("small_files", "durable_s", "{files} x 4 KiB files: start until all on the server", "s", False),
    ("ls", "cold_s", "ls -l of {entries} entries, cold (after remount)", "s", False),
    ("ls", "warm_s", "ls -l of {entries} entries, warm (again)", "s", False),
    ("ls_scale", "cold_s", "ls -l of {entries:,} entries in one folder, cold", "s", False),
    ("ls_scale", "cold_us_per_entry", "ls -l of {entries:,} entries in one folder, cold, per entry", "µs",
     False),
    ("tar", "extract_s", "tar -x of {files} files ({tar_mib} MB): tar returns", "s", False),
    ("tar", "durable_s", "tar -x of {files} files: until all on the server", "s", False),
    ("cp_r", "return_s", "cp -r of {files} x 4 KiB files in {folders} folders: cp returns", "s", False),
    ("cp_r", "durable_s", "cp -r of {files} x 4 KiB files: until all on the server", "s", False),
    ("find_ls", "cold_s", "find -ls of {files} files in {folders} folders, cold (fresh mount)", "s", False),
    ("find_ls", "warm_s", "find -ls of {files} files in {folders} folders, warm (again)", "s", False),
]
COLUMNS = ("local", "passthrough", "cloudfs", "rclone", "s3fs")
# Workloads that record the exit status of the command they time as <command>_rc / _stderr.
COMMANDS = {"tar": "tar", "cp_r": "cp"}


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def ratio(c: Any, p: Any, higher: bool) -> str:
    if not isinstance(c, (int, float)) or not isinstance(p, (int, float)) or not c or not p:
        return "-"
    r = c / p if higher else p / c
    text = f"{r:.2f}" if r >= 0.1 else f"{r:.2g}"
    return f"**{text}**" if r < 1 else text


def expand_parts(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per tool, every measured workload; one that measured several parts (ls_scale: a
    folder size each) counts as one workload "<workload> <part>" per part."""
    out: dict[str, dict[str, Any]] = {}
    for tool, workloads in results.items():
        out[tool] = {}
        for wl, w in workloads.items():
            if "parts" in w:
                out[tool].update({f"{wl} {part}": v for part, v in w["parts"].items()})
            else:
                out[tool][wl] = w
    return out


def render(res: dict[str, Any]) -> str:
    R = expand_parts(res["results"])
    tools = [t for t in COLUMNS if t in R]
    measured = list(dict.fromkeys(wl for t in tools for wl in R[t]))
    lines = [f"### Run of {res['date']}" + (" (quick smoke run, small sizes)" if res["quick"] else ""), "",
             f"- command: `{res['command']}`",
             f"- machine: {res['machine']['nproc']} CPUs ({res['machine']['cpu']}), "
             f"{res['machine']['ram_gib']} GiB RAM, kernel {res['versions']['kernel']}"]
    lines += [f"- {k}: {v}" for k, v in res["versions"].items() if k != "kernel"]
    raw = res["raw"]
    if raw:
        lines.append(f"- SeaweedFS raw throughput via boto3 ({raw['size_mib']} MiB object): "
                     f"PUT {raw['put_single_MiBps']} MiB/s one stream, {raw['put_multipart_MiBps']} MiB/s "
                     f"multipart x8; GET {raw['get_single_MiBps']} MiB/s one stream, "
                     f"{raw['get_multipart_MiBps']} MiB/s ranged x8")
    lines.append(f"- mount commands: {'; '.join(f'`{c}`' for c in res['mount_commands'].values())}")
    lines.append(f"- total time: {res['elapsed_s'] / 60:.1f} min; load average (1/5/15 min) at start "
                 f"{'/'.join(f'{x:.1f}' for x in res['loadavg_start'])}, at end "
                 f"{'/'.join(f'{x:.1f}' for x in res['loadavg_end'])}; raw results: `{res['json']}`")
    lines += ["", "Ratios are cloudfs's advantage over the peer: above 1 cloudfs is faster "
              "(for seconds: peer time / cloudfs time; for RSS: peer RSS / cloudfs RSS); "
              "**bold** where cloudfs is behind.", ""]
    head = ["workload", "unit", *tools]
    peers = [p for p in ("rclone", "s3fs") if p in tools and "cloudfs" in tools]
    head += [f"cloudfs vs {p}" for p in peers]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for workload, key, template, unit, higher in ROWS:
        for wl in [m for m in measured if m == workload or m.startswith(f"{workload} ")]:
            vals = {t: R.get(t, {}).get(wl, {}) for t in tools}
            if not any(key in v for v in vals.values()):
                continue
            params = next(v for v in vals.values() if key in v)
            label = template
            with contextlib.suppress(KeyError, IndexError, ValueError):
                label = template.format(**params)
            row = [label, unit] + [fmt(v.get(key)) if "error" not in v else "error" for v in vals.values()]
            row += [ratio(vals["cloudfs"].get(key), vals[p].get(key), higher) for p in peers]
            lines.append("| " + " | ".join(row) + " |")
    # find_rss runs on cloudfs alone, over far more objects: its peak is reported below.
    rss = {t: peak(*(w.get("rss_mib") for wl, w in R.get(t, {}).items() if wl != "find_rss")) for t in tools}
    row = ["peak RSS of the mount process (max over the workloads above)", "MiB", *map(fmt, rss.values())]
    row += [ratio(rss["cloudfs"], rss[p], False) for p in peers]
    lines.append("| " + " | ".join(row) + " |")
    if "cloudfs" in tools and "local" in tools:
        c, loc = R["cloudfs"].get("seq_read", {}), R["local"].get("seq_read", {})
        if c.get("warm_MiBps") and loc.get("warm_MiBps"):
            lines += ["", f"cloudfs warm sequential read is {100 * c['warm_MiBps'] / loc['warm_MiBps']:.0f}% "
                      "of the local directory's."]
    if "cloudfs" in tools and "passthrough" in tools:
        c, ceiling = R["cloudfs"].get("rand_read", {}), R["passthrough"].get("rand_read", {})
        if all(w.get(k) for w in (c, ceiling) for k in ("cold_iops", "warm_iops")):
            cold, warm = (c[k] / ceiling[k] for k in ("cold_iops", "warm_iops"))
            lines += ["", f"cloudfs random 4 KiB reads are {cold:.2f}x (cold) and {warm:.2f}x (warm) of the "
                      "request ceiling of a plain pyfuse3 passthrough of the local directory on this machine "
                      "(`bench/passthrough.py`, the passthrough column; target: at least 0.9x)."]
    memory = R.get("cloudfs", {}).get("find_rss", {})
    if "rss_mib" in memory:
        lines += ["", f"Memory run (`--rss-200k`): `find` over {memory['objects']:,} objects in "
                  f"{memory['folders']:,} folders on a cold cloudfs mount took {fmt(memory['cold_s'])} s; "
                  f"the daemon's peak RSS was {fmt(memory['rss_mib'])} MiB (bench/rss.py's target: "
                  f"< {RSS_TARGET_MIB} MiB)."]
    errors = [(t, wl, w["error"]) for t in tools for wl, w in R.get(t, {}).items() if "error" in w]
    errors += [(t, wl, f"{cmd} exited {w[f'{cmd}_rc']}: "
                + " / ".join(w.get(f"{cmd}_stderr", "").split("\n")[:3]))
               for wl, cmd in COMMANDS.items() for t in tools
               if (w := R.get(t, {}).get(wl, {})).get(f"{cmd}_rc")]
    if errors:
        lines += ["", "Errors in this run:", ""]
        lines += [f"- {t} / {wl}: `{e.splitlines()[0][:300]}`" for t, wl, e in errors]
    problems = {t: v for t, v in res.get("log_problems", {}).items() if v}
    if problems:
        lines += ["", "Warnings and errors in the mount logs (all lines are in the JSON file):", ""]
        for t, v in problems.items():
            lines.append(f"- {t}: {len(v)} lines, e.g. `{v[0][:300]}`")
    lines += ["", "Per-workload peak RSS (MiB):", "", "| workload | " + " | ".join(tools) + " |",
              "|---|" + "---|" * len(tools)]
    for wl in measured:
        lines.append(f"| {wl} | " + " | ".join(fmt(R.get(t, {}).get(wl, {}).get("rss_mib")) for t in tools)
                     + " |")
    reqs = {wl: w["requests"] for wl, w in R.get("cloudfs", {}).items() if w.get("requests")}
    if reqs:
        lines += ["", "cloudfs backend requests per workload (the daemon's own count, `cloudfs status`):", ""]
        lines += [f"- {wl}: " + ", ".join(f"{op} {n:,}" for op, n in r.items()) for wl, r in reqs.items()]
    return "\n".join(lines) + "\n"


def workloads_for(tool: Tool, workloads: list[str]) -> list[str]:
    """The workloads ``tool`` runs: the passthrough only rand_read's job (the workload
    ``passthrough`` stands for it), find_rss only cloudfs, the others every tool."""
    if isinstance(tool, Passthrough):
        return ["rand_read"] if "passthrough" in workloads else []
    return [wl for wl in workloads if wl != "passthrough" and (wl != "find_rss" or isinstance(tool, Cloudfs))]


def write_doc(section: str) -> None:
    replace_section(DOC, "bench/run.py", section)


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {WORKLOADS}")
    ap.add_argument("--tools", default="local,cloudfs,rclone,s3fs", help="comma-separated subset")
    ap.add_argument("--cloudfs-options", default="", help="extra -o options for cloudfs, e.g. block_size=16M")
    ap.add_argument("--workdir", help="where the server data, caches and mountpoints go "
                    "(default: a new directory under /var/tmp, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    ap.add_argument("--huge", action="store_true",
                    help=f"ls_scale also lists a folder of {HUGE_ENTRIES:,} entries")
    ap.add_argument("--rss-200k", action="store_true",
                    help="also the memory run find_rss on cloudfs: find over 200,000 objects (--rss-objects)")
    ap.add_argument("--rss-objects", type=int, help="with --rss-200k: this many objects instead")
    args = ap.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    tools = [t for t in args.tools.split(",") if t]
    bad = set(workloads) - set(WORKLOADS) | set(tools) - set(TOOLS)
    if bad:
        ap.error(f"unknown workloads/tools: {sorted(bad)}")
    if args.rss_objects is not None and not args.rss_200k:
        ap.error("--rss-objects needs --rss-200k")
    if args.rss_200k:
        if "cloudfs" not in tools:
            ap.error("--rss-200k runs on cloudfs: add it to --tools")
        workloads.append("find_rss")
    if os.geteuid() != 0:
        ap.error("needs root (drop_caches, FUSE mounts)")
    for exe in ("fio", "rclone", "s3fs", "fusermount3"):
        if not shutil.which(exe):
            ap.error(f"{exe} not found: apt-get install -y rclone s3fs fio fuse3")
    sizes = QUICK if args.quick else Sizes()
    if args.huge:
        sizes = replace(sizes, scale_entries=(*sizes.scale_entries, HUGE_ENTRIES))
    if args.rss_objects is not None:
        sizes = replace(sizes, rss_objects=args.rss_objects)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cloudfs-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    res: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([os.path.relpath(sys.executable, ROOT), os.path.relpath(sys.argv[0], ROOT),
                               *sys.argv[1:]]) if argv is None else shlex.join(argv),
        "quick": args.quick, "workloads": workloads, "tools": tools, "sizes": sizes.__dict__,
        "machine": machine(), "loadavg_start": os.getloadavg(), "versions": tool_versions(),
        "results": {}, "raw": {}, "mount_commands": {}, "log_problems": {},
    }
    log(f"work directory {work}")
    made: list[Tool] = []
    srv = Server(work / "seaweed")
    try:
        srv.start()
        bench = Bench(work, sizes, srv)
        local = TOOLS["local"](work, "", srv.endpoint)
        bench.setup(local.root, workloads)
        res["raw"] = bench.raw
        res["tarball"] = {"source": bench.tar_source, "files": bench.tar_files, "mib": bench.tar_mib}
        extra = dict(kv.split("=", 1) if "=" in kv else (kv, "") for kv in args.cloudfs_options.split(",")
                     if kv)
        names = [*tools, "passthrough"] if "passthrough" in workloads else tools
        for name in names:
            if name == "local":
                tool: Tool = local
            elif name == "passthrough":
                tool = Passthrough(work, local.root)
            elif name == "cloudfs":
                tool = TOOLS[name](work, bench.bucket, srv.endpoint, options=extra)  # type: ignore[call-arg]
            else:
                tool = TOOLS[name](work, bench.bucket, srv.endpoint)
            made.append(tool)
            if name != "local":
                res["mount_commands"][name] = shlex.join(tool.command()).replace(str(work), "$WORK").replace(
                    f"{ROOT}/", "")
            res["results"][name] = {}
            for wl in workloads_for(tool, workloads):
                log(f"{name}: {wl} ...")
                t0 = time.monotonic()
                try:
                    out = getattr(bench, wl)(tool)
                except Exception as exc:
                    out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                           "log_tail": tool.log_tail(60)}
                    log(f"{name}: {wl} FAILED: {exc}")
                    tool.kill()
                if isinstance(tool, Cloudfs):
                    out["requests"] = tool.take_requests()  # counted by the daemon before each unmount
                out["wall_s"] = round(time.monotonic() - t0, 1)
                res["results"][name][wl] = out
                log(f"{name}: {wl}: {json.dumps({k: v for k, v in out.items() if k != 'traceback'})[:600]}")
            if name != "local":
                res["log_problems"][name] = [line for line in tool.log_tail(100_000).splitlines()
                                             if any(w in line for w in ("WARNING", "ERROR", "CRITICAL"))]
    finally:
        for tool in made:
            with contextlib.suppress(Exception):
                tool.kill()
        srv.__exit__(None, None, None)
        res["elapsed_s"] = round(time.monotonic() - started, 1)
        res["loadavg_end"] = os.getloadavg()
        RESULTS.mkdir(parents=True, exist_ok=True)
        out_path = RESULTS / f"{stamp}{'-quick' if args.quick else ''}.json"
        res["json"] = os.path.relpath(out_path, ROOT)
        out_path.write_text(json.dumps(res, indent=1) + "\n")
        if res["results"] and not args.no_doc:
            write_doc(render(res))
        still = [t.mnt for t in made if mounted(t.mnt)]
        if still:
            log(f"still mounted, keeping {work}: {still}")
        elif not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(render(res))
    log(f"results: {out_path}" + ("" if args.no_doc else f", {DOC.relative_to(ROOT)}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
