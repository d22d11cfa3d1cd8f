"""Test targets: one module per backend, each starting a real server on 127.0.0.1.

A module exposes ``Server`` (a context manager started once per test session) whose
``new_bucket()`` returns a fresh, empty :class:`Target`.  The conformance suite is
parametrized over :data:`BACKENDS`; a backend is done when the whole suite passes on it.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any

BACKENDS = ["local", "s3", "seaweed", "azure", "gcs", "b2", "swift"]


@dataclass
class Target:
    """A fresh bucket on a running server."""

    backend: str
    url: str  # what a user passes to `cloudfs mount`
    env: dict[str, str] = field(default_factory=dict)  # credentials/endpoints, as a user exports them
    options: dict[str, str] = field(default_factory=dict)  # backend -o options
    sdk: Any = None  # the store's own SDK client, for interop checks
    extra: dict[str, Any] = field(default_factory=dict)


def diverges(target: Target, feature: str) -> str | None:
    """Why the target's store cannot do ``feature``, or None where it can: each test server
    module lists what its store cannot do, and why, in ``DIVERGENCES`` (mirrored in
    docs/semantics.md)."""
    reason: str | None = target.extra.get("divergences", {}).get(feature)
    return reason


def require(target: Target, feature: str) -> None:
    """Skip the calling test where the target's store cannot do ``feature`` (:func:`diverges`)."""
    import pytest

    reason = diverges(target, feature)
    if reason:
        pytest.skip(f"{target.extra.get('server_name', target.backend)}: {reason}")


def selected_backends() -> list[str]:
    """CLOUDFS_TEST_BACKENDS=local,s3 narrows a local run; CI runs them all."""
    wanted = os.environ.get("CLOUDFS_TEST_BACKENDS")
    if not wanted:
        return list(BACKENDS)
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    unknown = set(names) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backends in CLOUDFS_TEST_BACKENDS: {unknown}")
    return names


def server_class(name: str) -> Any:
    return importlib.import_module(f"{__name__}.{name}").Server
