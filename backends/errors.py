"""The small set of errors every backend maps its SDK's failures to.

The FUSE layer turns them into errno values at one boundary (``errno`` attribute); the CLI
prints ``str(err)``. Messages never contain credentials: backends build them from error
codes, keys and bucket names only.
"""

from __future__ import annotations

import errno as _errno


class BackendError(Exception):
    """A backend operation failed for good (after retries, where retrying made sense)."""

    errno = _errno.EIO


class NotFound(BackendError):
    errno = _errno.ENOENT


class BucketNotFound(NotFound):
    """The bucket / container / root directory itself does not exist."""


class AlreadyExists(BackendError):
    errno = _errno.EEXIST


class PreconditionFailed(BackendError):
    """An If-Match / If-None-Match / generation condition did not hold: someone else wrote."""

    errno = _errno.EIO


class PermissionDenied(BackendError):
    errno = _errno.EACCES


class AuthenticationFailed(PermissionDenied):
    """Credentials are missing, malformed or rejected."""


class InvalidName(BackendError):
    """The backend cannot store an object under this key."""

    errno = _errno.EINVAL


class NameTooLong(InvalidName):
    errno = _errno.ENAMETOOLONG


class NotSupported(BackendError):
    errno = _errno.ENOTSUP


class Transient(BackendError):
    """A failure worth retrying: timeouts, throttling, 5xx, dropped connections."""

    errno = _errno.EIO

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ConfigError(BackendError):
    """Bad URL or option given by the user."""

    errno = _errno.EINVAL
