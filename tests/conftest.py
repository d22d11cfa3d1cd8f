"""Shared fixtures: servers per backend (session-wide), a fresh bucket per test, backends and mounts."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mounting import Mount
from tests.servers import Target, selected_backends, server_class
from tests.servers.s3 import CREDENTIALS, boto3_client, start_moto


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Every test that asks for `backend_name` runs once per backend: the conformance matrix.
    if "backend_name" in metafunc.fixturenames:
        names = selected_backends()
        only = metafunc.definition.get_closest_marker("backends")
        if only:
            names = [n for n in names if n in only.args]
        metafunc.parametrize("backend_name", names, scope="session")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backends(*names): run only on these backends")


# `make test` runs the tests in two pytest-xdist workers (`-n 2 --dist loadgroup`); each worker
# starts the servers its tests need.  A group below runs whole on one worker:
# * "swift": the Swift cluster takes by far the longest to start (rings, four servers and
#   memcached), so one worker starts it, once;
# * "host": the tests that change the machine itself (mount(8) helpers in /sbin, a private
#   systemd, `make install` and wheel builds from the checkout) run one at a time.
HOST_WIDE = ("tests/systemd/test_mount8.py", "tests/systemd/test_private_systemd.py", "tests/packaging/")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend_name") == "swift":
            item.add_marker(pytest.mark.xdist_group("swift"))
        elif item.nodeid.startswith(HOST_WIDE) or item.get_closest_marker("systemd"):
            item.add_marker(pytest.mark.xdist_group("host"))


@pytest.hookimpl(trylast=True)  # after xdist marked the groups in the node ids
def pytest_collection_finish(session: pytest.Session) -> None:
    """In a loadgroup worker, a grouped test whose node id carries no group would run beside
    the rest of its group: tests that change the machine would race.  Refuse to run then."""
    if not getattr(session.config.option, "loadgroup", False):  # not an xdist loadgroup worker
        return
    lost = [item.nodeid for item in session.items
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        raise pytest.UsageError(f"pytest-xdist's --dist loadgroup did not group {lost[0]} (and "
                                f"{len(lost) - 1} more): this pytest and pytest-xdist do not work "
                                "together (pytest-dev/pytest-xdist#1386)")


@pytest.fixture(scope="session")
def started_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Any]]:
    """Each backend's server, started on first use and kept until the session ends (then
    stopped in reverse order).  Tests of different backends may come in any order (pytest-xdist
    hands them out one by one), and a switch of backend must not stop and restart a server, as
    a parametrized session fixture would.  A server that failed to start fails the rest of its
    tests with the same error, without trying again."""
    started: dict[str, Any] = {}
    failed: dict[str, BaseException] = {}
    with contextlib.ExitStack() as stack:

        def get(name: str) -> Any:
            if name in failed:
                raise failed[name]
            if name not in started:
                workdir = tmp_path_factory.mktemp(f"server-{name}")
                try:
                    started[name] = stack.enter_context(server_class(name)(workdir))
                except Exception as exc:
                    failed[name] = exc
                    raise
            return started[name]

        yield get


@pytest.fixture(scope="session")
def server(backend_name: str, started_servers: Callable[[str], Any]) -> Any:
    return started_servers(backend_name)


@pytest.fixture
def target(server: Any, monkeypatch: pytest.MonkeyPatch) -> Target:
    tgt: Target = server.new_bucket()
    for k, v in tgt.env.items():
        monkeypatch.setenv(k, v)
    return tgt


@pytest.fixture
def backend(target: Target) -> Iterator[Any]:
    from cloudfs.backends import open_backend

    b = open_backend(target.url, target.options)
    yield b
    b.close()


@pytest.fixture
def mnt(target: Target, tmp_path: Path) -> Iterator[Mount]:
    """A real cloudfs mount of a fresh bucket (write-back delay 0.5 s, metadata TTL 1 s)."""
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache")
    m.start()
    yield m
    m.cleanup()


@pytest.fixture
def moto(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A private moto server this test may stop: the shared one must stay up."""
    proc, port = start_moto(tmp_path, "moto-fault")
    endpoint = f"http://127.0.0.1:{port}"
    boto3_client(endpoint).create_bucket(Bucket="faults")
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": endpoint}
    yield proc, Target("s3", "s3://faults", env=env, sdk=boto3_client(endpoint))
    proc.stop()


def pytest_sessionfinish(session: pytest.Session) -> None:
    # Last resort after crashes/interrupts: no cloudfs mount made by this session survives it.
    base = str(session.config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
    with open("/proc/self/mountinfo") as f:
        stale = [line.split()[4] for line in f if line.split()[4].startswith(base)]
    for path in reversed(stale):
        subprocess.run(["fusermount3", "-uz", path], capture_output=True)


@pytest.fixture
def local_target(tmp_path: Path) -> Target:
    root = tmp_path / "bucket"
    root.mkdir()
    return Target("local", f"file://{root}", extra={"root": root})


def pytest_report_header() -> str:
    return f"cloudfs backends under test: {', '.join(selected_backends())} (uid {os.getuid()})"
