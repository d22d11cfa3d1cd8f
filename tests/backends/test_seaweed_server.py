"""The SeaweedFS test server keeps what it acknowledged across a restart."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import trio

from cloudfs.backends import Payload, open_backend
from tests.servers import seaweed


def test_seaweed_persists_across_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(256 * 1024 + 3)
    with seaweed.Server(tmp_path) as srv:
        target = srv.new_bucket()
        for k, v in target.env.items():
            monkeypatch.setenv(k, v)

        b = open_backend(target.url + "/pre", target.options)
        try:
            trio.run(b.check)
            etag = trio.run(b.put, "dir/obj", Payload.from_bytes(data), {"mode": "33188"})
        finally:
            b.close()

        srv.restart()
        # The S3 gateway answers before its volume server serves reads again: wait (bounded)
        # until the object comes back, then check everything about it.
        for _ in range(120):
            try:
                target.sdk.head_object(Bucket=target.extra["bucket"], Key="pre/dir/obj")
                break
            except Exception:
                time.sleep(0.5)

        b = open_backend(target.url + "/pre", target.options)
        try:
            info = trio.run(b.head, "dir/obj")
            assert info.size == len(data)
            assert info.etag == etag
            assert info.metadata == {"mode": "33188"}
            assert trio.run(b.get_range, "dir/obj") == data
        finally:
            b.close()
        raw = target.sdk.get_object(Bucket=target.extra["bucket"], Key="pre/dir/obj")["Body"].read()
        assert raw == data
