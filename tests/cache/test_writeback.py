"""The write-back queue alone: what ``resume`` (the store answers again) retries, and in
which order.  The order through a real mount is in tests/faults/test_faults.py."""

from __future__ import annotations

import trio

from cloudfs.backends.errors import Transient
from cloudfs.cache.writeback import WritebackQueue


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
