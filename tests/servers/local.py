"""The local-disk backend needs no server: each bucket is a fresh directory."""

from __future__ import annotations

import itertools
from pathlib import Path

from . import Target


class Server:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._n = itertools.count()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def new_bucket(self) -> Target:
        root = self.workdir / f"bucket{next(self._n)}"
        root.mkdir(parents=True)
        return Target("local", f"file://{root}", extra={"root": root})
