"""CPU per S3 metadata request: the S3 backend's lean HEAD/LIST path against boto3's.

Starts a SeaweedFS server (tests/servers/seaweed.py) in a temporary directory, stores
``--objects`` small objects with cloudfs-style metadata (mode, uid, gid, mtime), then, in
``--rounds`` alternating rounds of each path (so a change in the machine's load hits both),
HEADs every object once and lists the whole bucket in pages of 1000 keys until
``--pages`` pages have been read.  The calls are the backend's blocking primitives
(``S3Backend._head`` / ``_list_page``), one at a time in this thread, so the figure is
this process's CPU time (``time.thread_time()``: the server's CPU and the machine's load do
not count), divided by the number of requests.  Prints the median over the rounds, in µs.

Run from the repository root, after ``./scripts/install-deps.sh``::

    .venv/bin/python bench/s3_requests.py                    # 2000 HEAD + 10 LIST pages, 5 rounds
    .venv/bin/python bench/s3_requests.py --objects 500 --pages 2 --rounds 3   # quicker
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cloudfs.backends.s3 import S3Backend  # noqa: E402
from tests.servers.seaweed import Server  # noqa: E402

META = {"mode": "33188", "uid": "1000", "gid": "1000", "mtime": "1700000000.123456789"}


def fill(srv: Server, bucket: str, n: int) -> list[str]:
    keys = [f"bench/dir{i % 10}/file-{i:06d}.dat" for i in range(n)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: srv.sdk.put_object(Bucket=bucket, Key=k, Body=b"x" * 100, Metadata=META),
                      keys))
    return keys


def cpu_per_call(fn: Callable[[], int]) -> float:
    """µs of this thread's CPU per request, for ``fn`` that returns how many it sent."""
    started = time.thread_time()
    n = fn()
    return (time.thread_time() - started) / n * 1e6


def heads(b: S3Backend, keys: list[str]) -> int:
    for key in keys:
        b._head(key)
    return len(keys)


def lists(b: S3Backend, pages: int) -> int:
    sent, token = 0, None
    while sent < pages:
        page = b._list_page("bench/", None, token, 1000)
        assert len(page.objects) == 1000 or not page.next_token, len(page.objects)
        sent += 1
        token = page.next_token
    return sent


@contextlib.contextmanager
def backends(bucket: str, endpoint: str) -> Iterator[dict[str, S3Backend]]:
    made = {"boto3": S3Backend(bucket, endpoint=endpoint, fast_path=False),
            "fast": S3Backend(bucket, endpoint=endpoint)}
    try:
        yield made
    finally:
        for b in made.values():
            b.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=2000)
    ap.add_argument("--pages", type=int, default=10, help="LIST pages of 1000 keys per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cloudfs-bench-s3req-") as tmp, Server(Path(tmp)) as srv:
        for k, v in srv.env().items():
            os.environ[k] = v
        bucket = srv.new_bucket().extra["bucket"]
        keys = fill(srv, bucket, args.objects)
        results: dict[tuple[str, str], list[float]] = {}
        with backends(bucket, srv.endpoint) as made:
            for b in made.values():  # warm up: connections, endpoint resolution, imports
                heads(b, keys[:20])
                lists(b, 1)
            assert made["fast"]._fast is not None
            for _ in range(args.rounds):
                for name, b in made.items():
                    results.setdefault((name, "HEAD"), []).append(cpu_per_call(lambda b=b: heads(b, keys)))
                    results.setdefault((name, "LIST"), []).append(
                        cpu_per_call(lambda b=b: lists(b, args.pages)))
    print(f"{args.objects} HEAD and {args.pages} LIST pages of 1000 keys per round, {args.rounds} rounds; "
          f"CPU of the calling thread, median (min-max) per request; load {os.getloadavg()[0]:.1f}")
    for op in ("HEAD", "LIST"):
        for name in ("boto3", "fast"):
            xs = results[(name, op)]
            print(f"  {op:4} {name:5}: {statistics.median(xs):9.0f} µs  ({min(xs):.0f}-{max(xs):.0f})")
        ratio = statistics.median(results[("boto3", op)]) / statistics.median(results[("fast", op)])
        print(f"  {op:4} boto3/fast: {ratio:.1f}x")


if __name__ == "__main__":
    main()
