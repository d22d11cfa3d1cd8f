"""``-o ca_bundle=PATH`` and ``-o tls_verify=0`` against a store behind HTTPS: the test's own CA
signs the certificate of a TLS proxy in front of the real test server.  Trusted with the CA
bundle, refused with one clear error without it (no retries: a certificate does not get better),
accepted unchecked with tls_verify=0.  Swift's auth would hand out a storage URL pointing back
at the proxy in plain HTTP, so for Swift only the setting's way to its connections is checked."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from cloudfs.backends import Payload, open_backend
from cloudfs.backends.base import Backend, RetryPolicy
from cloudfs.backends.errors import ConfigError
from tests.servers import Target
from tests.servers.flaky_proxy import FlakyProxy
from tests.servers.tls import make_ca

pytestmark = pytest.mark.backends("s3", "azure", "gcs", "b2")
T = TypeVar("T")


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return trio.run(fn, *args)


def upstream_port(target: Target) -> int:
    from urllib.parse import urlsplit

    port = urlsplit(target.extra["realm" if target.backend == "b2" else "endpoint"]).port
    assert port is not None
    return port


def https_options(target: Target, port: int) -> dict[str, str]:
    """The options that point the backend at https://127.0.0.1:PORT instead of its server."""
    if target.backend == "s3":
        return {"endpoint": f"https://127.0.0.1:{port}"}
    if target.backend == "azure":
        return {"endpoint": f"https://127.0.0.1:{port}/{target.extra['account']}"}
    if target.backend == "b2":
        # The realm (authorization) is behind TLS; the API and download URLs it hands out are
        # the server's own.
        return {"endpoint": f"https://127.0.0.1:{port}"}
    return {"endpoint": f"https://127.0.0.1:{port}", "anonymous": ""}  # gcs: the emulator takes no token


@pytest.fixture
def tls_store(target: Target, tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    ca_file, context = make_ca(tmp_path)
    with FlakyProxy(upstream_port(target), fail_every=0, tls=context) as proxy:
        yield ca_file, https_options(target, proxy.port)


def opened(target: Target, options: dict[str, str]) -> Backend:
    b = open_backend(target.url, options)
    b.retry = RetryPolicy(attempts=3, initial_delay=0.01, max_delay=0.05)
    return b


def test_ca_bundle_is_trusted(backend_name: str, target: Target, tls_store: tuple[Path, dict[str, str]]
                              ) -> None:
    ca_file, options = tls_store
    b = opened(target, {**options, "ca_bundle": str(ca_file)})
    try:
        run(b.check)
        run(b.put, "over-tls", Payload.from_bytes(b"encrypted in transit"), {})
        assert run(b.get_range, "over-tls") == b"encrypted in transit"
    finally:
        b.close()


def test_untrusted_certificate_is_one_clear_error(backend_name: str, target: Target,
                                                  tls_store: tuple[Path, dict[str, str]]) -> None:
    _, options = tls_store
    b = opened(target, options)
    try:
        with pytest.raises(ConfigError, match="TLS certificate is not trusted; pass -o ca_bundle"):
            run(b.check)
        assert sum(b.requests.values()) == 1, b.requests  # not retried
    finally:
        b.close()


def test_tls_verify_off_accepts_any_certificate(backend_name: str, target: Target,
                                                tls_store: tuple[Path, dict[str, str]]) -> None:
    _, options = tls_store
    b = opened(target, {**options, "tls_verify": "0"})
    try:
        run(b.check)
        run(b.put, "unchecked", Payload.from_bytes(b"x"), {})
    finally:
        b.close()


@pytest.mark.backends("swift")
def test_swift_passes_the_tls_setting_to_auth_and_storage(backend_name: str, target: Target,
                                                           tmp_path: Path) -> None:
    from cloudfs.backends.swift import SwiftBackend, connection_tls

    ca_file, _ = make_ca(tmp_path)
    for options, verify in (({"ca_bundle": str(ca_file)}, str(ca_file)), ({"tls_verify": "0"}, False),
                            ({}, True)):
        b = open_backend(target.url, options)
        assert isinstance(b, SwiftBackend)
        try:
            assert b.auth.verify == verify
            run(b.check)  # plain http: the setting does not get in the way
        finally:
            b.close()
    assert connection_tls(False) == {"insecure": True, "cacert": None}
    assert connection_tls("/ca.pem") == {"insecure": False, "cacert": "/ca.pem"}
