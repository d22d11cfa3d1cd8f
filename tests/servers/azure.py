"""Azure Blob Storage for the tests: Azurite (blob service only), in memory, on 127.0.0.1.

Azurite is installed by npm into ``.deps/npm`` at the repository root.  It is run with its
working directory in the session's temp dir, so it writes nothing anywhere else.  Each
``new_bucket()`` is a fresh container on the well-known development account.
"""

from __future__ import annotations

import itertools
import os
import uuid
from pathlib import Path
from typing import Any

from . import Target
from .process import ManagedProcess, ServerFailed, free_port, http_ready

REPO = Path(__file__).resolve().parents[2]
AZURITE = REPO / ".deps" / "npm" / "node_modules" / ".bin" / "azurite-blob"

ACCOUNT = "devstoreaccount1"
# Azurite's published development key (not a secret).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class Server:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.proc: ManagedProcess | None = None
        self._n = itertools.count()
        self._service: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
                f"BlobEndpoint={self.endpoint};")

    def __enter__(self) -> Server:
        if not os.access(AZURITE, os.X_OK):
            raise ServerFailed(f"azurite: {AZURITE} is missing; run "
                               "`npm install --no-audit --no-fund --prefix .deps/npm azurite@3`")
        self.port = free_port()
        data = self.workdir / "azurite"
        data.mkdir(parents=True, exist_ok=True)
        self.proc = ManagedProcess(
            "azurite",
            [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
             "--inMemoryPersistence", "--skipApiVersionCheck", "--loose", "--silent",
             "--disableTelemetry"],
            self.workdir, cwd=str(data))
        self.proc.start(lambda: http_ready(f"http://127.0.0.1:{self.port}/"))
        from azure.storage.blob import BlobServiceClient

        self._service = BlobServiceClient.from_connection_string(self.connection_string)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._service is not None:
            self._service.close()
        if self.proc is not None:
            self.proc.stop()

    def new_bucket(self) -> Target:
        name = f"bucket{next(self._n)}-{uuid.uuid4().hex[:8]}"
        container = self._service.get_container_client(name)
        container.create_container()
        return Target(
            "azure",
            f"az://{ACCOUNT}/{name}",
            env={"AZURE_STORAGE_CONNECTION_STRING": self.connection_string},
            sdk=container,
            extra={"account": ACCOUNT, "key": KEY, "endpoint": self.endpoint, "container": name,
                   "service": self._service},
        )
