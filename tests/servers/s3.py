"""S3 conformance target: a moto server on 127.0.0.1, one fresh bucket per test."""

from __future__ import annotations

import itertools
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from . import Target
from .process import ManagedProcess, free_port, http_ready

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def venv_bin(name: str) -> str:
    """A console script installed next to the running interpreter (the venv's bin/)."""
    return os.path.join(os.path.dirname(sys.executable), name)


def boto3_client(endpoint: str, env: dict[str, str] | None = None) -> Any:
    import boto3
    import botocore.config

    creds = env or CREDENTIALS
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=creds.get("AWS_DEFAULT_REGION", "us-east-1"),
        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"], aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
        config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3},
                                      request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required"))


def start_moto(workdir: Path, name: str = "moto", env: dict[str, str] | None = None
               ) -> tuple[ManagedProcess, int]:
    port = free_port()
    proc = ManagedProcess(name, [venv_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)], workdir,
                          env={**CREDENTIALS, **(env or {})}, cwd=str(workdir))
    proc.start(lambda: http_ready(f"http://127.0.0.1:{port}/"), timeout=60)
    return proc, port


class Server:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._n = itertools.count()
        self.proc: ManagedProcess | None = None
        self.port = 0
        self.sdk: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.proc, self.port = start_moto(self.workdir)
        self.sdk = boto3_client(self.endpoint)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sdk is not None:
            self.sdk.close()
        if self.proc is not None:
            self.proc.stop()

    def env(self) -> dict[str, str]:
        return {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def new_bucket(self) -> Target:
        bucket = f"cloudfs-test-{next(self._n)}-{uuid.uuid4().hex[:8]}"
        self.sdk.create_bucket(Bucket=bucket)
        return Target("s3", f"s3://{bucket}", env=self.env(), sdk=self.sdk,
                      extra={"bucket": bucket, "endpoint": self.endpoint})
