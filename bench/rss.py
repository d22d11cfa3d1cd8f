"""Memory check: copy a file much larger than cloudfs's cache and dirty budget through a
mount, both directions, and sample the daemon's RSS (target: peak < 300 MiB).

    .venv/bin/python bench/rss.py                     # 3 GiB file, cache_size=1G (dirty budget 512M)
    .venv/bin/python bench/rss.py --size 5G --cache-size 1G --max-dirty 256M

Up: a local file is copied into the mount (1 MiB writes, fsync, close) and the run waits
until the object is complete on the server.  Down: after a remount with an empty cache and
dropped page cache, the object is copied back out and every MiB is checked.  The cache
directory's size is sampled too: it must stay under cache_size.  Writes
bench/results/rss-<stamp>.json and the generated rss section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import humanfriendly

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    ROOT,
    Cloudfs,
    MiB,
    Pattern,
    RssSampler,
    Server,
    drop_caches,
    machine,
    mounted,
    replace_section,
    tool_versions,
)

from tests.mounting import DirSampler  # after common, which puts the repository on sys.path

TARGET_MIB = 300
DOC = ROOT / "docs" / "benchmarks.md"


def copy(src: Path, dst: Path, size: int, pattern: Pattern | None,
         progress: list[int] | None = None) -> float:
    """1 MiB reads and writes; checks the pattern when given; fsync at the end.
    ``progress[0]`` follows the bytes written, for a watcher in another thread."""
    t0 = time.monotonic()
    with open(src, "rb", buffering=0) as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for i in range(size // MiB):
                chunk = b""
                while len(chunk) < MiB:
                    part = fin.read(MiB - len(chunk))
                    if not part:
                        raise RuntimeError(f"{src}: short read at {i * MiB + len(chunk)}")
                    chunk += part
                if pattern is not None and not pattern.check(i, chunk):
                    raise RuntimeError(f"{src}: wrong data in MiB {i}")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                if progress is not None:
                    progress[0] = (i + 1) * MiB
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.monotonic() - t0


def up(fs: Cloudfs, srv: Server, bucket: str, src: Path, size: int, timeout: float) -> dict[str, Any]:
    """Copy into the mount and wait until the object is complete on the server.  If that
    takes longer than ``timeout``, record how far it got and SIGKILL the mount."""
    progress = [0]
    failure: list[BaseException] = []
    t_write: list[float] = []

    def writer() -> None:
        try:
            t_write.append(copy(src, fs.root / "big.bin", size, None, progress))
        except BaseException as exc:
            failure.append(exc)

    def server_size() -> int:
        try:
            return srv.sdk.head_object(Bucket=bucket, Key="big.bin")["ContentLength"]
        except Exception:
            return -1

    out: dict[str, Any] = {}
    timeline: list[dict[str, Any]] = []
    next_status = 0.0
    with RssSampler(fs.pid, 0.2) as rss, DirSampler(fs.cache) as cache:
        t0 = time.monotonic()
        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if failure:
                raise failure[0]
            if time.monotonic() >= next_status:
                # What the daemon did so far: bytes written, dirty, sent, and its requests.
                next_status = time.monotonic() + 2.0
                st = fs.status()
                if st:
                    timeline.append({"t": round(time.monotonic() - t0, 1), "written_mib": progress[0] // MiB,
                                     "closed": bool(t_write), "dirty_mib": st["cache"]["dirty_bytes"] // MiB,
                                     "sent_mib": st["uploads"]["uploaded_bytes"] // MiB,
                                     "requests": st["requests"]})
            if t_write and server_size() == size:
                break
            time.sleep(0.5)
        else:
            out["stalled"] = (f"not on the server after {timeout:.0f} s: {progress[0] // MiB} of "
                              f"{size // MiB} MiB written, object on the server "
                              f"{max(server_size(), 0) // MiB} MiB")
            log = fs.log_tail(100_000).splitlines()
            out["cache_full_log_lines"] = sum("cache full" in line for line in log)
            rss.sample()
            fs._count_requests()
            if fs.pid:
                os.kill(fs.pid, signal.SIGKILL)  # the writer is stuck in write(2); nothing else frees it
            fs.kill()
            thread.join(60)
        elapsed = time.monotonic() - t0
    if "stalled" not in out:
        out.update(write_s=round(t_write[0], 1), durable_s=round(elapsed, 1),
                   durable_MiBps=round(size / MiB / elapsed, 1))
        fs.unmount(timeout=timeout)
    out.update(peak_rss_mib=rss.peak_mib, cache_dir_peak_mib=round(cache.peak / MiB),
               samples=len(rss.samples), requests=fs.take_requests(), timeline=timeline)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="3G", help="file size (default 3G)")
    ap.add_argument("--cache-size", default="1G", help="cloudfs cache_size (default 1G)")
    ap.add_argument("--max-dirty", default="", help="cloudfs max_dirty (default: half of cache_size)")
    ap.add_argument("--options", default="", help="more cloudfs -o options")
    ap.add_argument("--timeout", type=float, default=900,
                    help="seconds allowed for each direction; a stalled upload is recorded and the mount "
                         "killed (default 900)")
    ap.add_argument("--workdir", help="default: a new directory under /var/tmp, removed afterwards")
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("needs root (drop_caches)")
    size = humanfriendly.parse_size(args.size, binary=True) // MiB * MiB
    cache_size = humanfriendly.parse_size(args.cache_size, binary=True)
    options = {"cache_size": args.cache_size}
    if args.max_dirty:
        options["max_dirty"] = args.max_dirty
    options.update(dict(kv.split("=", 1) if "=" in kv else (kv, "") for kv in args.options.split(",") if kv))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cloudfs-rss-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    pattern = Pattern()
    res: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([os.path.relpath(sys.executable, ROOT), os.path.relpath(sys.argv[0], ROOT),
                               *sys.argv[1:]]),
        "size_mib": size // MiB, "options": options, "machine": machine(), "versions": tool_versions(),
        "target_mib": TARGET_MIB,
    }
    print(f"work directory {work}", flush=True)
    srv = Server(work / "seaweed")
    fs: Cloudfs | None = None
    try:
        srv.start()
        bucket = srv.new_bucket().extra["bucket"]
        fs = Cloudfs(work, bucket, srv.endpoint, options=options)
        src = work / "src.bin"
        pattern.write_file(src, size)

        fs.mount(clean=True)
        res["up"] = up(fs, srv, bucket, src, size, args.timeout)
        print(f"up: { {k: v for k, v in res['up'].items() if k != 'timeline'} }", flush=True)
        if "stalled" in res["up"]:
            from boto3.s3.transfer import TransferConfig

            srv.sdk.upload_file(str(src), bucket, "big.bin",
                                Config=TransferConfig(multipart_chunksize=8 * MiB, max_concurrency=8))
        src.unlink()

        drop_caches()
        fs.mount(clean=True)
        back = work / "back.bin"
        with RssSampler(fs.pid, 0.2) as rss, DirSampler(fs.cache) as cache:
            t_read = copy(fs.root / "big.bin", back, size, pattern)
        fs.unmount(timeout=args.timeout)
        res["down"] = {"read_s": round(t_read, 1), "MiBps": round(size / MiB / t_read, 1),
                       "peak_rss_mib": rss.peak_mib, "cache_dir_peak_mib": round(cache.peak / MiB),
                       "samples": len(rss.samples), "requests": fs.take_requests()}
        print(f"down: {res['down']}", flush=True)
        back.unlink()
        res["log_warnings"] = [line for line in fs.log_tail(400).splitlines()
                               if " WARNING " in line or " ERROR " in line][-20:]
    except BaseException as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
        if fs is not None:
            res["log_tail"] = fs.log_tail(60)
        raise
    finally:
        if fs is not None:
            fs.kill()
        srv.stop()
        if srv.sdk is not None:
            srv.sdk.close()
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = ROOT / "bench" / "results" / f"rss-{stamp}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
        res["json"] = os.path.relpath(out, ROOT)
        if not args.no_doc:
            replace_section(DOC, "bench/rss.py", render(res, cache_size))
        if fs is not None and mounted(fs.mnt):
            print(f"still mounted, keeping {work}", file=sys.stderr)
        elif not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(render(res, cache_size))
    peak = max(res["up"]["peak_rss_mib"], res["down"]["peak_rss_mib"])
    return 0 if peak < TARGET_MIB and "stalled" not in res["up"] else 1


def render(res: dict[str, Any], cache_size: int) -> str:
    lines = [f"### Memory check ({res['date']})", "", f"- command: `{res['command']}`",
             f"- cloudfs options: `{','.join(f'{k}={v}' for k, v in res['options'].items())}`; "
             f"file: {res['size_mib']} MiB ({res['size_mib'] * MiB / cache_size:.1f}x cache_size); "
             f"target: peak RSS < {TARGET_MIB} MiB", f"- raw results: `{res.get('json', '-')}`", ""]
    if "error" in res:
        lines += [f"Failed: `{res['error']}`", ""]
    lines += ["| direction | time | throughput | peak RSS | cache dir peak |", "|---|---|---|---|---|"]
    if "up" in res and "stalled" in res["up"]:
        u = res["up"]
        lines.append(f"| local -> mount | **stalled**: {u['stalled']} | - | {u['peak_rss_mib']} MiB | "
                     f"{u['cache_dir_peak_mib']} MiB |")
    elif "up" in res:
        u = res["up"]
        lines.append(f"| local -> mount, until on the server | {u['durable_s']} s (write returned after "
                     f"{u['write_s']} s) | {u['durable_MiBps']} MiB/s | {u['peak_rss_mib']} MiB | "
                     f"{u['cache_dir_peak_mib']} MiB |")
    if "down" in res:
        d = res["down"]
        lines.append(f"| mount -> local, cold cache | {d['read_s']} s | {d['MiBps']} MiB/s | "
                     f"{d['peak_rss_mib']} MiB | {d['cache_dir_peak_mib']} MiB |")
    for direction in ("up", "down"):
        reqs = res.get(direction, {}).get("requests")
        if reqs:
            lines += ["",
                      f"cloudfs requests, {direction}: " + ", ".join(f"{op} {n:,}" for op, n in reqs.items())]
    commits = [p for p in res.get("up", {}).get("timeline", [])
               if not p["closed"] and p["requests"].get("mpu_complete")]
    if commits:
        first = commits[0]
        lines += ["", f"First multipart upload completed while the file was still being written: by "
                  f"{first['t']} s, at {first['written_mib']} MiB written "
                  f"(timeline in the JSON file)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
