"""The persistent metadata record (cloudfs/meta_store.py) on its own: docs/semantics.md, "Reading"."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cloudfs.backends import ObjectInfo
from cloudfs.meta_store import MetaStore


def info(key: str, etag: str = "e1", mode: str = "33188") -> ObjectInfo:
    return ObjectInfo(key, 3, etag, 1_600_000_000.5, {"mode": mode})


def test_a_record_is_used_only_for_its_etag_and_survives_reopening(tmp_path: Path) -> None:
    path = str(tmp_path / "metadata.db")
    store = MetaStore(path, 100)
    store.record([info("a"), info("b", "e2"), ObjectInfo("no-etag", 1)])
    store.close()
    store = MetaStore(path, 100)
    got = store.lookup([info("a"), info("b", "other"), ObjectInfo("no-etag", 1), info("missing")])
    assert list(got) == ["a"]
    found, checked = got["a"]
    assert (found.size, found.etag, found.mtime) == (3, "e1", 1_600_000_000.5)
    assert found.metadata == {"mode": "33188"}
    assert checked > 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    store.close()


def test_the_record_is_bounded_and_drops_the_oldest(tmp_path: Path) -> None:
    store = MetaStore(str(tmp_path / "metadata.db"), 100)
    for batch in range(5):
        store.record([info(f"k{batch}-{i}") for i in range(40)])
    assert len(store) <= 100
    assert store.lookup([info("k4-39")]) and not store.lookup([info("k0-0")])
    store.close()


def test_a_corrupt_record_is_started_afresh(tmp_path: Path) -> None:
    path = tmp_path / "metadata.db"
    path.write_bytes(b"not a database" * 1000)
    store = MetaStore(str(path), 100)
    assert store.lookup([info("a")]) == {}
    store.record([info("a")])
    assert list(store.lookup([info("a")])) == ["a"]
    store.close()
