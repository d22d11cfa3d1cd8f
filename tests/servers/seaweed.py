"""A SeaweedFS S3 gateway on 127.0.0.1: a conformance target, and for persistence/crash
tests and benchmarks.

Unlike moto it keeps its data on disk (in the server's workdir), so a ``restart()`` -- or
a kill and start -- shows whether what cloudfs acknowledged really reached the store.  It
is in the conformance matrix (:data:`tests.servers.BACKENDS`); tests may also use it
directly::

    with seaweed.Server(tmp_path) as srv:
        target = srv.new_bucket()

``weed mini`` runs master, volume, filer and S3 in one process (and, unlike ``weed server``,
exits within a second or two on SIGTERM instead of waiting ~15 s for gRPC streams).  Every port is pinned to
a free port on 127.0.0.1 and stays the same across restarts, so endpoints handed out in
targets keep working.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
import uuid
from pathlib import Path
from typing import Any

from . import Target
from .process import ManagedProcess, free_port
from .s3 import CREDENTIALS, boto3_client, venv_bin

# What SeaweedFS cannot store that the conformance suite checks (docs/semantics.md).
DIVERGENCES = {
    "folder_attributes": "its S3 gateway turns a PUT of a `dir/` marker into a filer directory and "
                         "drops the marker's x-amz-meta-* metadata, so a folder's mode, owner, times "
                         "and xattrs are not stored",
}

PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc",
              "admin", "admin_grpc", "debug")


class Server:
    # weed needs a few seconds to flush and exit cleanly; killing it early can lose the last writes.
    stop_grace = 20.0

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.data = self.workdir / "seaweed-data"
        self.ports = {name: free_port() for name in PORT_NAMES}
        self._n = itertools.count()
        self._starts = 0
        self.proc: ManagedProcess | None = None
        self.sdk: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        return {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def _write_s3_config(self) -> Path:
        path = self.workdir / "seaweed-s3.json"
        path.write_text(json.dumps({"identities": [{
            "name": "cloudfs-test",
            "credentials": [{"accessKey": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                             "secretKey": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        return path

    def argv(self) -> list[str]:
        p = self.ports
        return [
            venv_bin("weed"), "mini",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-dir={self.data}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.preStopSeconds=0",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={self._write_s3_config()}",
            "-admin.ui=false", f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin_grpc']}",
            "-webdav=false",
            f"-debug.port={p['debug']}", "-metricsPort=0",
        ]

    def _ready(self) -> bool:
        self.sdk.list_buckets()
        return True

    def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        self._starts += 1
        self.proc = ManagedProcess(f"seaweed{self._starts}", self.argv(), self.workdir, cwd=str(self.workdir))
        if self.sdk is None:
            self.sdk = boto3_client(self.endpoint)
        self.proc.start(self._ready, timeout=90)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace=self.stop_grace)
            self.proc = None
        # weed leaves its gRPC unix sockets (/tmp/seaweedfs-<service>-<port>.sock) behind.
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()

    def restart(self) -> None:
        """Stop cleanly and start again on the same ports and data directory."""
        self.stop()
        self.start()

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self.sdk is not None:
            self.sdk.close()
            self.sdk = None

    def new_bucket(self) -> Target:
        bucket = f"cloudfs-test-{next(self._n)}-{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sdk.create_bucket(Bucket=bucket)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        return Target("s3", f"s3://{bucket}", env=self.env(), sdk=self.sdk,
                      extra={"bucket": bucket, "endpoint": self.endpoint, "server": self,
                             "server_name": "seaweed", "divergences": DIVERGENCES})
