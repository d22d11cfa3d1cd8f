"""The small set of errors every backend maps its SDK's failures to.

The FUSE layer turns them into errno values at one boundary (``errno`` attribute); the CLI
prints ``str(err)``. Messages never contain credentials: backends build them from error
codes, keys and bucket names only.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import errno as _errno
from collections.abc import Iterator
from typing import Any


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


class QuotaExceeded(BackendError):
    """The account or bucket hit a storage, transaction or bandwidth cap."""

    errno = _errno.EDQUOT


class Transient(BackendError):
    """A failure worth retrying: timeouts, throttling, 5xx, dropped connections."""

    errno = _errno.EIO

    def __init__(self, message: str, retry_after: float | None = None, *, backoff: bool = True) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        # False: the retry goes somewhere else (a fresh upload URL, a new token), so waiting
        # would only add latency.
        self.backoff = backoff


class TokenExpired(Transient):
    """The store's session token expired: the base re-authorizes once, then retries at once."""

    def __init__(self, message: str) -> None:
        super().__init__(message, backoff=False)


class ConfigError(BackendError):
    """Bad URL or option given by the user."""

    errno = _errno.EINVAL


def retry_after(headers: Any) -> float | None:
    """Seconds a server asked us to wait: ``Retry-After`` (delta-seconds or an HTTP-date) or
    Azure's ``x-ms-retry-after-ms``; None when absent or unreadable.  ``headers`` is any
    mapping with ``get`` (case-insensitive ones are looked up as given, plain dicts in both cases).
    """
    if headers is None:
        return None
    ms = headers.get("x-ms-retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("Retry-After") or headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(str(value))
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


def error_for_status(status: int | None, message: str, retry_after: float | None = None) -> BackendError:
    """The error for an HTTP status, once for every store.  Backends first map the error codes
    only they know (a missing bucket, a name the store refuses), then fall back to this.

    * no status (no response at all), 408, 429 and 5xx but 501: ``Transient``, retried;
    * 401 ``AuthenticationFailed``, 403 ``PermissionDenied``, 404 ``NotFound``;
    * 409 and 412: ``PreconditionFailed``.  A 409 is what S3 answers a conditional write that
      raced another (ConditionalRequestConflict) and GCS a create-only write onto an existing
      object: both mean "someone else wrote".  Azure's 409s carry their own codes
      (BlobAlreadyExists, lease conflicts) and are mapped by its backend before this;
    * 501 ``NotSupported``; anything else a plain ``BackendError``.
    """
    if status is None or status in (408, 429) or (status >= 500 and status != 501):
        return Transient(message, retry_after)
    if status == 401:
        return AuthenticationFailed(message)
    if status == 403:
        return PermissionDenied(message)
    if status == 404:
        return NotFound(message)
    if status in (409, 412):
        return PreconditionFailed(message)
    if status == 501:
        return NotSupported(message)
    return BackendError(message)


def single_error(group: BaseExceptionGroup) -> BaseException:  # type: ignore[type-arg]
    """Parallel requests (a nursery) fail as a group: its first BackendError/OSError alone,
    or the group itself when it holds anything else (Cancelled, a bug), so trio and the
    caller see that unchanged."""
    matched, rest = group.split((BackendError, OSError))
    if matched is None or rest is not None:
        return group
    exc: BaseException = matched
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


@contextlib.contextmanager
def one_error() -> Iterator[None]:
    """Around a nursery of requests: raise ``single_error`` of the group it fails with."""
    try:
        yield
    except BaseExceptionGroup as group:
        raise single_error(group) from None
