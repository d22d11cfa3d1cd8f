"""Backends: one module per object store behind the interface in :mod:`cloudfs.backends.base`.

``open_backend(url, options)`` picks the module by URL scheme and imports it lazily, so a
mount of one store never loads the other SDKs.
"""

from __future__ import annotations

import importlib
from urllib.parse import unquote, urlsplit

from .base import Backend, Capabilities, ListPage, ObjectInfo, PartInfo, Payload
from .errors import ConfigError

# scheme -> (module, class).
SCHEMES: dict[str, tuple[str, str]] = {
    "file": ("local", "LocalBackend"),
    "s3": ("s3", "S3Backend"),
    "az": ("azure", "AzureBackend"),
    "gs": ("gcs", "GCSBackend"),
    "b2": ("b2", "B2Backend"),
    "swift": ("swift", "SwiftBackend"),
}

__all__ = ["SCHEMES", "Backend", "Capabilities", "ListPage", "ObjectInfo", "PartInfo", "Payload",
           "backend_class", "open_backend"]


def backend_class(scheme: str) -> type[Backend]:
    if scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise ConfigError(f"unknown URL scheme {scheme + '://' if scheme else '(none)'}; use one of {known}")
    module, cls = SCHEMES[scheme]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def open_backend(url: str, options: dict[str, str] | None = None) -> Backend:
    """Build the backend for a bucket URL. Options are the backend's ``-o`` settings."""
    options = dict(options or {})
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise ConfigError("credentials do not belong in the URL; use the backend's environment or files")
    cls = backend_class(parts.scheme)
    unknown = set(options) - cls.options
    if unknown:
        raise ConfigError(f"{parts.scheme}:// does not take option(s): {', '.join(sorted(unknown))}")
    return cls.from_url(parts.netloc, unquote(parts.path), options)
