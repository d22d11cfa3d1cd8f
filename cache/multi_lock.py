"""A lock per key (s3ql's MultiLock): two blocks never wait for each other."""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

import trio


class MultiLock:
    def __init__(self) -> None:
        self._locks: dict[Hashable, trio.Lock] = {}
        self._users: dict[Hashable, int] = {}

    @asynccontextmanager
    async def __call__(self, key: Hashable) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, trio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]
                del self._locks[key]

    def locked(self, key: Hashable) -> bool:
        return key in self._locks and self._locks[key].locked()
