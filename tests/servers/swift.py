"""OpenStack Swift: a real one-replica cluster in the test session's temp dir, on 127.0.0.1.

Debian's ``swift-proxy swift-object swift-container swift-account memcached`` packages (the
README's test command installs them) provide the servers; nothing is mocked.  The setup:

* one replica, one device in a plain directory (``mount_check = false``); rings built with
  ``swift-ring-builder`` (``rebalance`` may exit non-zero on such a tiny ring, harmlessly);
* ``workers = 0``: each server is one process, started in its own session and stopped by PID
  (then its process group), in reverse order, also when the start fails half-way;
* tempauth keeps its tokens in memcached, so a memcached listens on loopback too;
* the proxy pipeline is the one measured for the issue, plus ``bulk`` so that bulk delete is
  offered in ``/info``; :meth:`Server.proxy` starts further proxies on the same cluster with
  another pipeline (no bulk, no SLO) or a short tempauth ``token_life`` (token expiry tests).

Debian's 2.30 reads ``/etc/swift/swift.conf`` (the package installs one), pip's Swift reads
it from ``swift_dir``: one is written there as well.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import subprocess
import textwrap
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import Target
from .process import ManagedProcess, ServerFailed, free_port, http_ready, port_open

ACCOUNT = "test"
USER = "tester"
KEY = "testing"
PIPELINE = ("catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk tempauth copy "
            "slo dlo proxy-logging proxy-server")
PIPELINE_NO_BULK = PIPELINE.replace(" bulk", "")
RING_PARTITION_POWER = 6
STORAGE_SERVERS = ("account", "container", "object")


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ServerFailed(f"{name} is not installed; run `make deps` (apt: swift swift-proxy "
                           "swift-object swift-container swift-account memcached)")
    return path


class Server:
    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.etc = self.workdir / "swift-etc"
        self.devices = self.workdir / "swift-devices"
        self.ports = {name: free_port() for name in ("memcached", "account", "container", "object", "proxy")}
        self.procs: list[ManagedProcess] = []
        self._n = itertools.count()
        self._run = uuid.uuid4().hex[:8]
        self.sdk: Any = None

    # ------------------------------------------------------------------ addresses
    @property
    def auth_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy']}/auth/v1.0"

    def env(self, auth_url: str | None = None) -> dict[str, str]:
        """v1 credentials, exported as the swift CLI and rclone read them."""
        return {"ST_AUTH": auth_url or self.auth_url, "ST_USER": f"{ACCOUNT}:{USER}", "ST_KEY": KEY}

    # ------------------------------------------------------------------ setup
    def _write_configs(self) -> None:
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.devices / "d1").mkdir(parents=True, exist_ok=True)
        (self.etc / "swift.conf").write_text(textwrap.dedent("""\
            [swift-hash]
            swift_hash_path_suffix = cloudfs-tests
            swift_hash_path_prefix = cloudfs-tests
            [storage-policy:0]
            name = Policy-0
            default = yes
            [swift-constraints]
            """))
        for kind in STORAGE_SERVERS:
            (self.etc / f"{kind}-server.conf").write_text(textwrap.dedent(f"""\
                [DEFAULT]
                devices = {self.devices}
                mount_check = false
                bind_ip = 127.0.0.1
                bind_port = {self.ports[kind]}
                workers = 0
                swift_dir = {self.etc}
                log_name = {kind}-server
                log_level = WARNING

                [pipeline:main]
                pipeline = {kind}-server

                [app:{kind}-server]
                use = egg:swift#{kind}
                """))

    def _proxy_conf(self, name: str, port: int, pipeline: str, token_life: int, user: str) -> Path:
        path = self.etc / f"{name}.conf"
        path.write_text(textwrap.dedent(f"""\
            [DEFAULT]
            bind_ip = 127.0.0.1
            bind_port = {port}
            workers = 0
            swift_dir = {self.etc}
            log_name = {name}
            log_level = WARNING

            [pipeline:main]
            pipeline = {pipeline}

            [app:proxy-server]
            use = egg:swift#proxy
            account_autocreate = true

            [filter:tempauth]
            use = egg:swift#tempauth
            user_{ACCOUNT}_{user} = {KEY} .admin
            token_life = {token_life}
            storage_url_scheme = default

            [filter:cache]
            use = egg:swift#memcache
            memcache_servers = 127.0.0.1:{self.ports['memcached']}

            [filter:catch_errors]
            use = egg:swift#catch_errors
            [filter:gatekeeper]
            use = egg:swift#gatekeeper
            [filter:healthcheck]
            use = egg:swift#healthcheck
            [filter:proxy-logging]
            use = egg:swift#proxy_logging
            [filter:listing_formats]
            use = egg:swift#listing_formats
            [filter:bulk]
            use = egg:swift#bulk
            [filter:copy]
            use = egg:swift#copy
            [filter:slo]
            use = egg:swift#slo
            [filter:dlo]
            use = egg:swift#dlo
            """))
        return path

    def _build_ring(self, kind: str) -> None:
        builder = _binary("swift-ring-builder")
        ring = str(self.etc / f"{kind}.builder")
        for args in (["create", str(RING_PARTITION_POWER), "1", "1"],
                     ["add", f"r1z1-127.0.0.1:{self.ports[kind]}/d1", "100"]):
            proc = subprocess.run([builder, ring, *args], capture_output=True, text=True, timeout=60)
            if proc.returncode:
                raise ServerFailed(f"swift-ring-builder {' '.join(args)}: {proc.stdout}{proc.stderr}")
        # rebalance exits 1 ("warning") on a one-device ring: only the ring file counts.
        subprocess.run([builder, ring, "rebalance"], capture_output=True, text=True, timeout=60)
        if not (self.etc / f"{kind}.ring.gz").exists():
            raise ServerFailed(f"swift-ring-builder did not write {kind}.ring.gz")

    def _spawn(self, name: str, argv: list[str], ready_url: str | None, port: int) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.workdir, cwd=str(self.workdir))
        self.procs.append(proc)
        if ready_url is None:
            proc.start(lambda: port_open(port), timeout=30)
        else:
            proc.start(lambda: http_ready(ready_url), timeout=60)
        return proc

    def start(self) -> None:
        self._write_configs()
        # Each swift-ring-builder run is a second of Python start-up: the three rings in parallel.
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(self._build_ring, STORAGE_SERVERS))
        memcached = _binary("memcached")
        self._spawn("memcached", [memcached, "-l", "127.0.0.1", "-p", str(self.ports["memcached"]), "-U", "0",
                                  "-u", "root" if _is_root() else _user()], None, self.ports["memcached"])
        with ThreadPoolExecutor(3) as pool:  # each takes about 2 s to import its WSGI stack
            list(pool.map(self._start_storage_server, STORAGE_SERVERS))
        self._start_proxy("swift-proxy", self.ports["proxy"], PIPELINE, 86400)
        import swiftclient

        self.sdk = swiftclient.Connection(authurl=self.auth_url, user=f"{ACCOUNT}:{USER}", key=KEY,
                                          retries=2)
        self.sdk.get_account()  # the account is created on first use (account_autocreate)

    def _start_storage_server(self, kind: str) -> None:
        self._spawn(f"swift-{kind}", [_binary(f"swift-{kind}-server"), str(self.etc / f"{kind}-server.conf"),
                                      "--verbose"], f"http://127.0.0.1:{self.ports[kind]}/", self.ports[kind])

    def _start_proxy(self, name: str, port: int, pipeline: str, token_life: int,
                     user: str = USER) -> ManagedProcess:
        conf = self._proxy_conf(name, port, pipeline, token_life, user)
        return self._spawn(name, [_binary("swift-proxy-server"), str(conf), "--verbose"],
                           f"http://127.0.0.1:{port}/healthcheck", port)

    @contextlib.contextmanager
    def proxy(self, *, bulk: bool = True, slo: bool = True, token_life: int = 86400
              ) -> Iterator[dict[str, str]]:
        """Another proxy on the same cluster and account; yields the ``ST_*`` variables for it
        and stops it by PID afterwards.  tempauth hands out a user's unexpired token again
        (kept in the shared memcached), so each extra proxy has a user of its own: a short
        ``token_life`` then really applies to the tokens it issues."""
        port = free_port()
        user = f"proxy{port}"
        pipeline = PIPELINE if bulk else PIPELINE_NO_BULK
        if not slo:
            pipeline = pipeline.replace(" slo", "")
        proc = self._start_proxy(f"swift-proxy-{port}", port, pipeline, token_life, user)
        try:
            yield {"ST_AUTH": f"http://127.0.0.1:{port}/auth/v1.0", "ST_USER": f"{ACCOUNT}:{user}",
                   "ST_KEY": KEY}
        finally:
            proc.stop()
            self.procs.remove(proc)

    def stop(self) -> None:
        if self.sdk is not None:
            with contextlib.suppress(Exception):
                self.sdk.close()
            self.sdk = None
        while self.procs:
            self.procs.pop().stop()

    def __enter__(self) -> Server:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def info(self) -> dict[str, Any]:
        import json

        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['proxy']}/info", timeout=10) as resp:
            return json.loads(resp.read())

    def new_bucket(self) -> Target:
        container = f"cloudfs-{self._run}-{next(self._n)}"
        self.sdk.put_container(container)
        return Target("swift", f"swift://{container}", env=self.env(), sdk=self.sdk,
                      extra={"container": container, "server": self})


def _is_root() -> bool:
    import os

    return os.geteuid() == 0


def _user() -> str:
    import getpass

    return getpass.getuser()
