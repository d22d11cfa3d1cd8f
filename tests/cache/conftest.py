"""Cache tier: BlockCache + Uploader driven directly under trio (no FUSE), against real backends.

Each test gets a fresh bucket (``backend`` fixture) and a :class:`Harness` holding the cache
directory, so a test can "restart" (a new BlockCache on the same directory) at will.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from cloudfs.backends import Backend, Payload
from cloudfs.backends.errors import NotFound
from cloudfs.cache.block_cache import BlockCache, Entry, Remote
from cloudfs.cache.uploader import Uploader

T = TypeVar("T")

KiB = 1024
MiB = 1024 * KiB
BS = 64 * KiB  # small blocks keep the tier fast


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return trio.run(fn, *args)


class Counter:
    """Counts calls of chosen backend methods by wrapping them on the instance."""

    def __init__(self, backend: Backend, *names: str) -> None:
        self.backend = backend
        self.calls: dict[str, list[tuple[Any, ...]]] = {n: [] for n in names}
        for name in names:
            orig = getattr(backend, name)

            async def wrapper(*args: Any, _orig: Any = orig, _name: str = name, **kw: Any) -> Any:
                self.calls[_name].append(args)
                return await _orig(*args, **kw)

            setattr(backend, name, wrapper)

    def __getitem__(self, name: str) -> int:
        return len(self.calls[name])

    def reset(self) -> None:
        for v in self.calls.values():
            v.clear()

    def restore(self) -> None:
        for name in self.calls:
            delattr(self.backend, name)


class Harness:
    def __init__(self, backend: Backend, cache_dir: Path) -> None:
        self.backend = backend
        self.cache_dir = str(cache_dir)
        self.caches: list[BlockCache] = []

    def cache(self, *, block_size: int = BS, max_bytes: int = 64 * BS, max_dirty: int | None = None,
              **kw: Any) -> tuple[BlockCache, list[Entry]]:
        """A new BlockCache on the harness's directory (a restart when one existed): (cache, pending)."""
        c = BlockCache(self.backend, self.cache_dir, block_size=block_size, max_bytes=max_bytes,
                       max_dirty=max_bytes if max_dirty is None else max_dirty, **kw)
        pending = c.open()
        self.caches.append(c)
        return c, pending

    def uploader(self, cache: BlockCache, **kw: Any) -> Uploader:
        kw.setdefault("delay", 0.0)
        return Uploader(cache, self.backend, **kw)

    def close_all(self) -> None:
        for c in self.caches:
            c.close()

    # -- backend helpers (async: call from inside trio.run)
    async def put(self, key: str, data: bytes) -> Remote:
        etag = await self.backend.put(key, Payload.from_bytes(data))
        info = await self.backend.head(key)
        assert info.etag == etag
        return Remote(info.etag, info.size)

    async def remote(self, key: str) -> Remote | None:
        try:
            info = await self.backend.head(key)
        except NotFound:
            return None
        return Remote(info.etag, info.size)

    async def open_entry(self, cache: BlockCache, key: str) -> Entry:
        """What the FUSE layer does on open: HEAD the object, then get the checked entry."""
        remote = await self.remote(key)
        return cache.entry(key, remote, remote.size if remote else 0)

    async def get(self, key: str) -> bytes:
        return await self.backend.get_range(key)

    async def keys(self, prefix: str = "") -> list[str]:
        out: list[str] = []
        async for page in self.backend.list(prefix, None):
            out += [o.key for o in page.objects]
        return sorted(out)


@pytest.fixture
def harness(backend: Backend, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(backend, tmp_path / "cache")
    yield h
    h.close_all()


def pattern(n: int, seed: int = 0) -> bytes:
    """Deterministic incompressible-looking bytes (cheaper than os.urandom for big sizes)."""
    import random

    return random.Random(seed).randbytes(n)


def check_accounting(cache: BlockCache) -> None:
    """``used``/``dirty_bytes`` are the charges of the block files, each covering its file.

    Call when no reservation is in flight (no fetch or write running).
    """
    from cloudfs.cache.block_cache import PAGE

    used = dirty = 0
    for entry in cache.entries.values():
        assert set(entry.charged) == entry.present, entry.key
        for block, charge in entry.charged.items():
            size = os.path.getsize(entry.block_path(block))
            assert charge >= max(PAGE, size), (entry.key, block, charge, size)
            assert charge % PAGE == 0
            used += charge
            dirty += charge if block in entry.dirty else 0
    assert cache.used == used
    assert cache.dirty_bytes == dirty
    assert cache.used <= cache.max_bytes


def files_under(path: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(path):
        out += [os.path.join(root, d) for d in dirs]
        out += [os.path.join(root, f) for f in files]
    return out
