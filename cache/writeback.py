"""The write-back queue: which file to upload when (after rclone's vfs/vfscache/writeback).

It knows ids, never files or the cache.  An id is due ``delay`` seconds after it was last
scheduled, so a file that keeps changing is uploaded once it settles; ``expedite`` makes
ids due at once (cache pressure, unmount).  ``run(store)`` calls ``store(id)`` for due ids,
at most ``parallel`` at a time.  ``store`` returns None when the id is done, or a number of
seconds after which to call it again (the file was busy); an exception is a failed try:
the id is retried after a delay that doubles per consecutive failure, capped at
``max_backoff``.  A success resets it.  ``resume`` (the store answers again after an
outage) retries every queued id, backoffs forgotten, one at a time in the order the ids
were queued: parallel tries would reach the store in any order.

Rules: ids are scheduled from the trio thread only; one ``store`` call per id runs at a
time (a schedule during the call makes it due again when the call returns: at once if it
was an ``expedite``, whatever delay the call asked for).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable

import trio

from cloudfs.backends.errors import BackendError

log = logging.getLogger(__name__)

Store = Callable[[str], Awaitable[float | None]]


class WritebackQueue:
    def __init__(self, *, delay: float, parallel: int = 4, initial_backoff: float = 1.0,
                 max_backoff: float = 300.0) -> None:
        self.delay = delay
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.slots = trio.CapacityLimiter(parallel)
        self._due: dict[str, float] = {}  # id -> monotonic due time (the heap may hold stale ones)
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._running: set[str] = set()
        self._again: dict[str, bool] = {}  # scheduled while its store() ran: id -> expedited
        self.tries: dict[str, int] = {}  # consecutive failures
        self.retry_at: dict[str, float] = {}
        self.errors: dict[str, str] = {}  # id -> last failure, for status
        self._wakeup = trio.Event()
        # When each queued id was queued (until its store() call ends it): the resume order.
        self._order: dict[str, int] = {}
        self._resume: set[str] = set()  # ids ``resume`` retries in that order, not yet started
        self._resume_heap: list[tuple[int, str]] = []  # (order, id) of them; may hold stale ones
        self._resuming = trio.Event()
        self._finished = trio.Event()  # set whenever a store() call returns

    def __contains__(self, id: str) -> bool:
        return id in self._due or id in self._running or id in self._resume

    def __len__(self) -> int:
        return len(self._due.keys() | self._running | self._resume)

    def schedule(self, id: str, delay: float | None = None) -> None:
        """Due ``delay`` (default: the write-back delay) from now, or when its backoff ends."""
        if id in self._running:
            self._again.setdefault(id, False)
            return
        if id in self._resume:
            return  # its turn comes in the resume order (store() waits for a file to settle)
        due = max(time.monotonic() + (self.delay if delay is None else delay), self.retry_at.get(id, 0.0))
        self._push(id, due)

    def expedite(self, id: str | None = None) -> None:
        """Due now (one id, or every queued one); a failing id still waits for its backoff."""
        now = time.monotonic()
        for i in [id] if id is not None else list(self._due):
            if i in self._running:
                self._again[i] = True
            elif i in self._resume:
                continue  # due already, in the resume order
            elif i in self._due or id is not None:
                self._push(i, max(now, self.retry_at.get(i, 0.0)))

    def retry_now(self) -> None:
        """Every queued id due now, backoffs and last errors forgotten: the store is back, or
        a user asked for everything to go up (``cloudfs sync``)."""
        self.retry_at.clear()
        self.errors.clear()
        self.expedite()

    def resume(self) -> None:
        """The store answers again: every queued id is retried now, backoffs and last errors
        forgotten, one after another in the order they were queued (an id whose try is under
        way goes again once it ends, in its place)."""
        self.retry_at.clear()
        self.errors.clear()
        for id in self._due.keys() | self._running:
            self._due.pop(id, None)
            if id not in self._resume:
                self._resume.add(id)
                heapq.heappush(self._resume_heap, (self._order.get(id, -1), id))
        if self._resume:
            self._resuming.set()

    def discard(self, id: str) -> None:
        self._due.pop(id, None)
        self._resume.discard(id)
        self._order.pop(id, None)
        self._again.pop(id, None)
        self.tries.pop(id, None)
        self.retry_at.pop(id, None)
        self.errors.pop(id, None)

    def _push(self, id: str, due: float) -> None:
        self._order.setdefault(id, next(self._seq))
        self._due[id] = due
        heapq.heappush(self._heap, (due, next(self._seq), id))
        self._wakeup.set()

    async def run(self, store: Store, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._resume_in_order, store)
            task_status.started()
            while True:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    due, _, id = heapq.heappop(self._heap)
                    if self._due.get(id) != due:
                        continue  # rescheduled since: a later entry stands for it
                    del self._due[id]
                    self._running.add(id)
                    nursery.start_soon(self._one, store, id)
                timeout = self._heap[0][0] - now if self._heap else 60.0
                self._wakeup = trio.Event()
                with trio.move_on_after(max(0.0, timeout)):
                    await self._wakeup.wait()

    async def _resume_in_order(self, store: Store) -> None:
        while True:
            await self._resuming.wait()
            while self._resume:
                order, id = self._resume_heap[0]
                if id not in self._resume or self._order.get(id, -1) != order:
                    heapq.heappop(self._resume_heap)  # discarded, or queued again since
                    continue
                if id in self._running:  # a try from before: it goes again when that ends
                    self._finished = trio.Event()
                    await self._finished.wait()
                    continue
                heapq.heappop(self._resume_heap)
                self._resume.discard(id)
                self._running.add(id)
                await self._one(store, id)
            self._resuming = trio.Event()

    async def _one(self, store: Store, id: str) -> None:
        again: float | None = None
        try:
            async with self.slots:
                again = await store(id)
            self.tries.pop(id, None)
            self.retry_at.pop(id, None)
            self.errors.pop(id, None)
        except (BackendError, OSError) as exc:
            tries = self.tries[id] = self.tries.get(id, 0) + 1
            wait = min(self.max_backoff, self.initial_backoff * 2 ** (tries - 1))
            self.retry_at[id] = time.monotonic() + wait
            self.errors[id] = str(exc)
            log.error("upload failed (try %d), next in %.0fs: %s", tries, wait, exc)
            again = wait
        finally:
            self._running.discard(id)
            self._finished.set()
        expedited = self._again.pop(id, None)
        if expedited:
            self.expedite(id)
        elif expedited is not None or again is not None:
            self.schedule(id, again)
        elif id not in self._resume:
            self._order.pop(id, None)  # done: queued again later, it goes behind the others
