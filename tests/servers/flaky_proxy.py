"""An HTTP proxy on 127.0.0.1 that fails some requests, for retry tests.

Every ``fail_every``-th request is answered with 503 SlowDown (what S3 sends when it
throttles; 0: never); the rest are forwarded unchanged to the upstream server.  Every
request is logged in ``requests`` (method, path with query, headers), and ``before``, if
set, is called with that entry in the handler's thread before it is forwarded: a test
can hold a request there (a slow store) until it has done what it wants meanwhile.
After ``hang()``, requests are accepted and never answered (a hung store) until the proxy
closes; with ``trickle`` set to (bytes, seconds), answers' bodies go out that many bytes at a
time with that pause between (a slow but moving link); between ``down()`` and ``up()`` each
connection is dropped without an answer (a store gone away).  With ``tls`` (a server-side
SSL context) it speaks HTTPS to its clients and plain HTTP to the upstream: a store behind a
certificate of the test's own CA.
"""

from __future__ import annotations

import http.client
import itertools
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)


class FlakyProxy:
    def __init__(self, upstream_port: int, fail_every: int = 3,
                 before: Callable[[Request], None] | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.upstream_port = upstream_port
        self.fail_every = fail_every
        self.before = before
        self.counter = itertools.count(1)
        self.failed = 0
        self.hung = 0
        self._hang = threading.Event()
        self._down = threading.Event()
        self.dropped = 0
        self._closing = threading.Event()
        self.trickle: tuple[int, float] | None = None
        self.requests: list[Request] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy._down.is_set():
                    proxy.dropped += 1
                    self.close_connection = True
                    return
                if proxy._hang.is_set():
                    proxy.hung += 1
                    proxy._closing.wait(120)
                    self.close_connection = True
                    return
                request = Request(self.command, self.path, dict(self.headers))
                proxy.requests.append(request)
                if proxy.before is not None:
                    proxy.before(request)
                if proxy.fail_every and next(proxy.counter) % proxy.fail_every == 0:
                    proxy.failed += 1
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    if self.command != "HEAD":  # a body after a HEAD answer spoils the connection
                        self.wfile.write(SLOWDOWN)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                try:
                    self._reply(resp, data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client is gone (a test killed it)

            def _reply(self, resp: http.client.HTTPResponse, data: bytes) -> None:
                self.send_response_only(resp.status)  # the upstream's Date and Server, not ours too
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                # A HEAD answer has no body: its Content-Length is the object's size.
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if proxy.trickle is None:
                    self.wfile.write(data)
                    return
                step, pause = proxy.trickle
                for i in range(0, len(data), step):
                    self.wfile.write(data[i:i + step])
                    self.wfile.flush()
                    if proxy._closing.wait(pause):
                        return

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def hang(self) -> None:
        self._hang.set()

    def down(self) -> None:
        self._down.set()

    def up(self) -> None:
        self._down.clear()

    def __enter__(self) -> FlakyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()
