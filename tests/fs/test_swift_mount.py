"""Swift through a real mount: large files become SLOs and leave no orphan segments (after an
overwrite, a delete, a rename, a kill mid-upload and a remount), swiftclient interop, and a
token that expires in the middle of a copy."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backends.test_swift import referenced, segments, wait_until_rejected
from tests.fs.test_data_path import status
from tests.mounting import Mount, mounted
from tests.servers import Target

pytestmark = pytest.mark.backends("swift")

MiB = 1024 * 1024


def settle() -> None:
    time.sleep(1.2)  # attr_timeout=1 in test mounts: new objects become visible


def wait_for_segments(target: Target, least: int, timeout: float = 60) -> None:
    """Bounded wait until at least ``least`` segments of an upload are in ``_segments``."""
    end = time.monotonic() + timeout
    while len(segments(target)) < least:
        if time.monotonic() > end:
            raise AssertionError(f"fewer than {least} segments uploaded in {timeout}s")
        time.sleep(0.05)


def test_large_file_is_an_slo_and_leaves_no_orphans(mnt: Mount, target: Target) -> None:
    c, sdk = target.extra["container"], target.sdk
    data = os.urandom(20 * MiB + 7)  # block_size 8M in test mounts: three segments
    (mnt.path / "big").write_bytes(data)
    mnt.stop()
    headers, body = sdk.get_object(c, "big")
    assert headers["x-static-large-object"] == "True" and body == data
    first = segments(target)
    assert len(first) == 3 and referenced(target, "big") == first
    mnt.start()
    with open(mnt.path / "big", "rb") as f:  # a read across a segment boundary
        f.seek(8 * MiB - 5)
        assert f.read(10) == data[8 * MiB - 5:8 * MiB + 5]
    # Overwrite with another large file: only the new segments remain.
    data2 = os.urandom(17 * MiB)
    (mnt.path / "big").write_bytes(data2)
    mnt.stop()
    second = segments(target)
    assert len(second) == 3 and not set(second) & set(first)
    assert sdk.get_object(c, "big")[1] == data2
    # Rename: the manifest moves, the segments stay as they are.
    mnt.start()
    (mnt.path / "big").rename(mnt.path / "renamed")
    mnt.stop()
    assert segments(target) == second and referenced(target, "renamed") == second
    # A directory rename copies manifests too.
    mnt.start()
    (mnt.path / "d").mkdir()
    (mnt.path / "renamed").rename(mnt.path / "d" / "big")
    (mnt.path / "d").rename(mnt.path / "e")
    assert (mnt.path / "e" / "big").read_bytes() == data2
    mnt.stop()
    assert segments(target) == second and referenced(target, "e/big") == second
    # Overwrite with a small file, then delete: nothing is left in _segments.
    mnt.start()
    (mnt.path / "e" / "big").write_bytes(b"small")
    mnt.stop()
    assert segments(target) == []
    mnt.start()
    (mnt.path / "e" / "big2").write_bytes(os.urandom(9 * MiB))
    mnt.stop()
    assert len(segments(target)) == 2
    mnt.start()
    os.unlink(mnt.path / "e" / "big2")
    mnt.stop()
    assert segments(target) == []


def test_kill_mid_upload_then_remount_leaves_no_orphans(target: Target, tmp_path: Path) -> None:
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"writeback_delay": "0", "block_size": "8M"})
    m.start()
    data = os.urandom(64 * MiB)
    try:
        with open(m.path / "interrupted", "wb") as f:
            f.write(data)
        wait_for_segments(target, 1)  # the upload is under way
        m.kill()
        assert not mounted(m.path)
        assert segments(target), "the killed upload left segments behind"
        m.start()  # the journal in the cache dir names the dead upload's segments
        m.stop()  # waits for the recovered upload
        left = segments(target)
        assert left == referenced(target, "interrupted") and len(left) == 8
        m.start()
        assert (m.path / "interrupted").read_bytes() == data
    finally:
        m.cleanup()


def test_swiftclient_mtime_and_reads_back(mnt: Mount, target: Target) -> None:
    c, sdk = target.extra["container"], target.sdk
    sdk.put_object(c, "from-cli", b"cli", headers={"X-Object-Meta-Mtime": "1600000000.250000"})
    sdk.put_object(c, "folder", b"", content_type="application/directory")
    settle()
    assert (mnt.path / "from-cli").stat().st_mtime_ns == 1_600_000_000_250_000_000
    assert (mnt.path / "folder").is_dir() and os.listdir(mnt.path / "folder") == []
    (mnt.path / "folder" / "inside").write_bytes(b"written through the mount")
    mnt.stop()
    headers, body = sdk.get_object(c, "folder/inside")
    assert body == b"written through the mount"
    assert float(headers["x-object-meta-mtime"]) == pytest.approx(time.time(), abs=600)


@pytest.fixture
def short_token_env(target: Target) -> Iterator[dict[str, str]]:
    with target.extra["server"].proxy(token_life=3) as env:
        yield env


def test_token_expiry_mid_copy_is_survived(target: Target, tmp_path: Path,
                                           short_token_env: dict[str, str]) -> None:
    """v1 auth through ST_* (as rclone and the swift CLI read it) on a proxy whose tokens last
    3 s: a copy into the mount that outlives the token still completes."""
    from swiftclient.client import get_auth

    short = Target("swift", target.url, env=short_token_env, sdk=target.sdk, extra=target.extra)
    # sync_upload: close() returns once the copy is on the store, so the count below is final.
    m = Mount(short, tmp_path / "mnt", tmp_path / "cache", {"writeback_delay": "0", "sync_upload": ""})
    src = tmp_path / "src"
    src.write_bytes(os.urandom(24 * MiB))
    m.start()
    try:
        (m.path / "first").write_bytes(b"before expiry")
        m.stop()
        m.start()
        # tempauth hands out a user's unexpired token again, so this is the mount's token, or
        # (if that one ran out meanwhile) a newer one: either way the mount's token is dead
        # once this one is, and the copy has to renew it.
        url, token = get_auth(short_token_env["ST_AUTH"], short_token_env["ST_USER"],
                              short_token_env["ST_KEY"])
        wait_until_rejected(target, url, token)
        shutil.copyfile(src, m.path / "copied")
        assert status(m)["requests"].get("authorize") == 1
        m.stop()
        assert target.sdk.get_object(target.extra["container"], "copied")[1] == src.read_bytes()
        assert token not in m.log()
    finally:
        m.cleanup()
