"""Random writes/truncates/reads against a bytearray model, with uploads and restarts in between.

The background uploader runs with a short delay and the cache is small (a few blocks, half of
them dirty budget), so eviction, back-pressure and uploads racing with writes are all exercised.
Each seed is a fixed, reproducible sequence; a failure names the seed and the op log.
"""

from __future__ import annotations

import random

import pytest
import trio

from cloudfs.cache.block_cache import BlockCache, Entry
from cloudfs.cache.uploader import Uploader

from .conftest import BS, Harness, KiB, check_accounting, run

pytestmark = pytest.mark.backends("local", "s3")

MAX_SIZE = 12 * BS + 333
KEY = "dir/model.bin"


@pytest.mark.parametrize("seed", range(4))
def test_random_ops_match_model(harness: Harness, backend_name: str, seed: int) -> None:
    rng = random.Random(f"{seed}-{backend_name}")
    steps = 150 if backend_name == "local" else 100
    max_bytes = 8 * BS
    log: list[str] = []
    model = bytearray(rng.randbytes(rng.choice([0, 100, 3 * BS, 5 * BS + 17])))

    def check(cond: bool, what: str) -> None:
        assert cond, f"seed {seed}: {what}; ops:\n" + "\n".join(log[-25:])

    async def session(first: bool) -> bool:
        """One mount's lifetime; returns False when the op budget is spent."""
        nonlocal model
        cache: BlockCache
        cache, pending = harness.cache(max_bytes=max_bytes, max_dirty=4 * BS)
        uploader: Uploader = harness.uploader(cache, delay=0.05)
        async with trio.open_nursery() as nursery:
            await nursery.start(uploader.run)
            for e in pending:
                uploader.schedule(e)
            entry: Entry = await harness.open_entry(cache, KEY)
            if first:
                check(entry.size == len(model), "initial size")
                if entry.base is None:
                    cache.mark_pending(entry)  # a new file, as create() makes it
                    uploader.schedule(entry)
            while len(log) < steps:
                check(cache.used <= max_bytes, f"cache.used {cache.used} > {max_bytes}")
                check_accounting(cache)
                op = rng.choices(["write", "truncate", "read", "flush", "restart", "durable"],
                                 [40, 12, 25, 8, 6, 4])[0]
                if op == "write":
                    off = rng.randrange(0, min(MAX_SIZE, len(model) + BS))
                    n = rng.choice([1, 100, 4 * KiB, BS - 1, BS, BS + 17, 2 * BS + 5])
                    n = max(0, min(n, MAX_SIZE - off))
                    data = rng.randbytes(n)
                    log.append(f"write({off}, {n})")
                    with trio.fail_after(30):
                        check(await cache.write(entry, off, data) == n, "write count")
                    if off > len(model):
                        model += bytes(off - len(model))
                    model[off:off + n] = data
                    uploader.schedule(entry)
                elif op == "truncate":
                    size = min(MAX_SIZE, rng.choice([0, rng.randrange(0, MAX_SIZE), len(model) // 2,
                                                     len(model) + rng.randrange(1, BS),
                                                     (len(model) // BS) * BS]))
                    log.append(f"truncate({size})")
                    with trio.fail_after(30):
                        await cache.truncate(entry, size)
                    del model[size:]
                    model += bytes(size - len(model))
                    uploader.schedule(entry)
                elif op == "read":
                    off = rng.randrange(0, len(model) + 10)
                    n = rng.choice([1, 4 * KiB, BS, 3 * BS, MAX_SIZE])
                    log.append(f"read({off}, {n})")
                    with trio.fail_after(30):
                        got = await cache.read(entry, off, n)
                    check(got == bytes(model[off:off + n]), f"read({off}, {n}) differs from the model")
                elif op == "durable":
                    log.append("make_durable")
                    await cache.make_durable(entry)
                elif op == "flush":
                    log.append("flush")
                    with trio.fail_after(30):
                        await uploader.flush(entry)
                    check(not entry.pending, "pending after flush")
                    remote = await harness.get(KEY)
                    check(remote == bytes(model), f"backend object ({len(remote)} B) != model "
                                                  f"({len(model)} B) after flush")
                    check(await cache.read(entry, 0, MAX_SIZE + BS) == bytes(model), "cache != model")
                else:
                    # Restart without uploading (a kill between uploads), or a clean unmount.
                    clean = rng.random() < 0.5
                    log.append(f"restart(clean={clean})")
                    if clean:
                        await uploader.flush_all()
                    await uploader.wait_idle(entry)
                    nursery.cancel_scope.cancel()
                    break
            else:
                await uploader.wait_idle(entry)  # see test_kill_after_server_commit_*
                nursery.cancel_scope.cancel()
        cache.close()
        return len(log) < steps

    async def main() -> None:
        if model or seed % 2:
            await harness.put(KEY, bytes(model))
        first = True
        while await session(first):
            first = False
        # Final: one more restart, upload everything, compare.
        cache, _ = harness.cache(max_bytes=max_bytes, max_dirty=4 * BS)
        with trio.fail_after(30):
            await harness.uploader(cache).flush_all()
        check(await harness.keys() == [KEY], f"unexpected objects {await harness.keys()}")
        check(await harness.get(KEY) == bytes(model), "final backend object != model")
        entry = await harness.open_entry(cache, KEY)
        check(await cache.read(entry, 0, MAX_SIZE + BS) == bytes(model), "final cache read != model")
        check(await harness.keys() == [KEY], f"unexpected objects {await harness.keys()}")
        check(cache.used <= max_bytes, "cache over its bound")

    run(main)
