"""Prometheus metrics of one mount (``-o metrics=HOST:PORT``).

Nothing is counted twice: a collector reads, at scrape time, the counters the backend,
cache and uploader keep anyway (the same numbers `cloudfs status` shows), and each mount
has its own registry, so two mounts in one process never share a metric.  The endpoint is
served on the trio thread, so a scrape reads that state between two awaits, never while it
changes.  It answers every request with the text exposition format, whatever the path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cloudfs.backends import Backend
from cloudfs.backends.errors import ConfigError
from cloudfs.cache.block_cache import BlockCache
from cloudfs.cache.uploader import Uploader
from cloudfs.cache.writeback import WritebackQueue
from cloudfs.options import parse_address

log = logging.getLogger(__name__)

MAX_REQUEST = 16 * 1024  # bytes of an HTTP request head read before answering


class MountCollector(Collector):
    def __init__(self, backend: Backend, cache: BlockCache, uploader: Uploader,
                 queue: WritebackQueue) -> None:
        self.backend = backend
        self.cache = cache
        self.uploader = uploader
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("cloudfs_backend_requests", "Backend request attempts by "
                                       "operation and result (ok, or the error)", labels=["op", "result"])
        for (op, result), n in sorted(self.backend.results.items()):
            requests.add_metric([op, result], n)
        yield requests
        yield from self.backend.latency.collect()
        yield CounterMetricFamily("cloudfs_uploaded_bytes", "Bytes sent to the store (PUTs and parts)",
                                  value=self.uploader.sent_bytes)
        yield CounterMetricFamily("cloudfs_fetched_bytes", "Bytes fetched from the store into the cache",
                                  value=self.cache.stats["fetched_bytes"])
        for name, text in (("hits", "Block reads served from the cache"),
                           ("fetches", "Blocks fetched from the store (cache misses)"),
                           ("evictions", "Clean blocks evicted to make room"),
                           ("lost_bytes", "Bytes that could not be recovered and were reported lost")):
            yield CounterMetricFamily(f"cloudfs_cache_{name}", text, value=self.cache.stats[name])
        pending = self.cache.pending_files()
        yield GaugeMetricFamily("cloudfs_cache_used_bytes", "Bytes the cache holds", value=self.cache.used)
        yield GaugeMetricFamily("cloudfs_cache_max_bytes", "The cache size limit", value=self.cache.max_bytes)
        yield GaugeMetricFamily("cloudfs_dirty_bytes", "Bytes written here and not uploaded yet",
                                value=self.cache.dirty_bytes)
        yield GaugeMetricFamily("cloudfs_queued_files", "Files with changes not uploaded yet",
                                value=len(pending))
        yield GaugeMetricFamily("cloudfs_offline", "1 while the store does not answer (serving the cache)",
                                value=0 if self.backend.offline_since is None else 1)
        yield GaugeMetricFamily("cloudfs_failing_files", "Queued files whose last upload attempt failed",
                                value=sum(1 for f in pending if f.fid in self.queue.errors))


async def listen(address: str) -> trio.SocketListener:
    """Bind the endpoint (before the mount is made, so a taken port fails the mount)."""
    host, port = parse_address(address)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ConfigError(f"-o metrics={address}: cannot listen there: {exc.strerror or exc}") from None
    return listeners[0]


async def serve(listener: trio.SocketListener, registry: CollectorRegistry) -> None:
    """Answer scrapes until cancelled, one at a time (a scrape is a few kilobytes)."""
    async with listener:
        while True:
            stream = await listener.accept()
            async with stream:
                with trio.move_on_after(10):
                    try:
                        await _answer(stream, registry)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass


async def _answer(stream: Any, registry: CollectorRegistry) -> None:
    head = b""
    while b"\r\n\r\n" not in head and len(head) < MAX_REQUEST:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        head += chunk
    body = generate_latest(registry)
    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                          b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                          + body)


def registry_for(collector: MountCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    return registry
