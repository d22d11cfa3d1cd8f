"""The write-back queue (cache/writeback.py) on its own: ids and a store function, no files.
What ``resume`` (the store answers again) retries, and in which order; the order through a
real mount is in tests/faults/test_faults.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from cloudfs.backends.errors import Transient
from cloudfs.cache.writeback import WritebackQueue

LONG = 3600.0  # a delay no test waits for: reaching it means the rule under test failed


class FirstCallHeld:
    """A store function whose first call waits until the test lets it return ``answer``;
    later calls return None (done) at once."""

    def __init__(self, answer: float | None) -> None:
        self.answer = answer
        self.calls = 0
        self.running, self.release = trio.Event(), trio.Event()

    async def __call__(self, id: str) -> float | None:
        self.calls += 1
        if self.calls > 1:
            return None
        self.running.set()
        await self.release.wait()
        return self.answer


def during_the_first_call(queue: WritebackQueue, store: FirstCallHeld,
                          act: Callable[[], None], until: Callable[[], Awaitable[None]]) -> None:
    """Schedule "f", ``act`` while its first store call runs, let the call return, then wait
    (bounded) for ``until``."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(queue.run, store)
            queue.schedule("f", 0)
            with trio.fail_after(30):
                await store.running.wait()
                act()
                store.release.set()
                await until()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_an_expedite_during_a_store_call_makes_the_id_due_at_once_whatever_the_call_asked() -> None:
    """The call asked to be retried much later (the file was busy), but an expedite came
    while it ran (a writer waits for space, an unmount): the id runs again at once."""
    queue, store = WritebackQueue(delay=LONG), FirstCallHeld(answer=LONG)

    async def second_call() -> None:
        while store.calls < 2:
            await trio.sleep(0.01)

    during_the_first_call(queue, store, lambda: queue.expedite("f"), second_call)
    assert store.calls == 2 and "f" not in queue


def test_a_schedule_during_a_store_call_waits_for_the_delay_it_asked() -> None:
    queue, store = WritebackQueue(delay=LONG), FirstCallHeld(answer=None)

    async def queued_again() -> None:
        while "f" in queue._running:
            await trio.sleep(0.01)
        await trio.sleep(0.2)

    # another change while it uploads: due a write-back delay from now, not at once
    during_the_first_call(queue, store, lambda: queue.schedule("f"), queued_again)
    assert store.calls == 1 and "f" in queue


def test_resume_retries_every_queued_id_at_once_one_after_another_in_queued_order() -> None:
    """Ids that failed while the store was away (their backoffs far off, and in another order
    than queued) all go again at ``resume``, in the order they were queued, never two at a
    time, although the queue uploads four in parallel otherwise."""
    order = ["c", "a", "d", "b"]

    async def main() -> None:
        queue = WritebackQueue(delay=0.0, parallel=4, initial_backoff=3600.0)
        online = False
        calls: list[str] = []
        running = 0
        overlapped = False

        async def store(id: str) -> float | None:
            nonlocal running, overlapped
            running += 1
            overlapped |= running > 1 and online
            try:
                # The failures end in reverse order: queued order is not the order they end.
                await trio.sleep(0.01 * (len(order) - order.index(id)))
                if not online:
                    raise Transient("store away")
                calls.append(id)
                return None
            finally:
                running -= 1

        async with trio.open_nursery() as nursery:
            await nursery.start(queue.run, store)
            for id in order:
                queue.schedule(id)
            with trio.fail_after(5):
                while len(queue.errors) < len(order):
                    await trio.sleep(0.01)
            assert len(queue) == len(order)
            online = True
            queue.resume()
            with trio.fail_after(5):
                while len(queue):
                    await trio.sleep(0.01)
            assert calls == order
            assert not overlapped
            assert not queue.errors and not queue.retry_at
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_an_id_whose_try_is_under_way_at_resume_goes_again_in_its_place() -> None:
    """Its try started while the store was away and fails after the store came back: it is
    tried again at once, before the ids queued after it, not after its backoff."""
    async def main() -> None:
        queue = WritebackQueue(delay=0.0, parallel=4, initial_backoff=3600.0)
        release = trio.Event()
        calls: list[str] = []

        async def store(id: str) -> float | None:
            calls.append(id)
            if calls.count(id) == 1:
                if id == "first":
                    await release.wait()  # under way at resume
                raise Transient("store away")
            return None

        async with trio.open_nursery() as nursery:
            await nursery.start(queue.run, store)
            queue.schedule("first")
            await trio.sleep(0.05)
            queue.schedule("second")
            with trio.fail_after(5):
                while "second" not in queue.errors:
                    await trio.sleep(0.01)
            queue.resume()
            release.set()
            with trio.fail_after(5):
                while len(queue):
                    await trio.sleep(0.01)
            assert calls == ["first", "second", "first", "second"]
            nursery.cancel_scope.cancel()

    trio.run(main)
