"""How long a request may take (backends/base.py ``Backend._call``): a transfer fails once its
timeout passes with no byte moving, however long it has been moving; a request with no body
to watch fails once its timeout passes at all."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import trio

from cloudfs.backends import open_backend
from cloudfs.backends.base import Progress, RetryPolicy
from cloudfs.backends.errors import Transient
from cloudfs.backends.s3 import S3Backend
from tests.servers import Target
from tests.servers.flaky_proxy import FlakyProxy

KiB = 1024


def busy_for(seconds: float, progress: Progress | None) -> None:
    """A worker-thread call that takes ``seconds``, telling ``progress`` (if any) of a byte
    moved every 50 ms."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.05)
        if progress is not None:
            progress.moved()


def within(timeout: float, progress: Progress | None, seconds: float, tmp_path: Path,
           moving: bool = True) -> None:
    backend = open_backend(f"file://{tmp_path}", {})

    async def call() -> None:
        await trio.to_thread.run_sync(busy_for, seconds, progress if moving else None,
                                      abandon_on_cancel=True)

    try:
        trio.run(backend._within, timeout, progress, "get", call)
    finally:
        backend.close()


def test_a_transfer_that_keeps_moving_outlasts_its_timeout(tmp_path: Path) -> None:
    within(0.5, Progress(), 2.0, tmp_path)


def test_a_transfer_that_stops_moving_fails_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(Transient, match=r"^file: get moved no data for 0.5s$"):
        within(0.5, Progress(), 30.0, tmp_path, moving=False)


def test_a_request_with_nothing_to_watch_fails_at_its_timeout(tmp_path: Path) -> None:
    with pytest.raises(Transient, match=r"got no answer in 0.5s"):
        within(0.5, None, 30.0, tmp_path)


@pytest.mark.backends("s3")
def test_a_slow_download_that_keeps_moving_completes_and_a_hung_one_fails(target: Target) -> None:
    """Through a proxy that sends 64 KiB every 50 ms, 4 MiB take over 3 s: longer than the
    3 s timeout in total, but each MiB the SDK reads at a time arrives well within it.  Hung,
    the same download fails."""
    bucket = target.extra["bucket"]
    data = os.urandom(4096 * KiB)
    target.sdk.put_object(Bucket=bucket, Key="slow", Body=data)
    upstream = int(target.extra["endpoint"].rsplit(":", 1)[1])
    with FlakyProxy(upstream, fail_every=0) as proxy:
        backend = S3Backend(bucket, endpoint=f"http://127.0.0.1:{proxy.port}",
                            retry=RetryPolicy(attempts=1, call_timeout=3.0, metadata_timeout=3.0))
        try:
            proxy.trickle = (64 * KiB, 0.05)
            assert trio.run(backend.get_range, "slow") == data
            proxy.trickle = None
            proxy.hang()
            with pytest.raises(Transient, match="moved no data for 3s"):
                trio.run(backend.get_range, "slow")
        finally:
            backend.close()
