"""The shared HTTP-status mapping and Retry-After parsing (backends/errors.py)."""

from __future__ import annotations

import email.utils
import time

import pytest

from cloudfs.backends import errors as e


@pytest.mark.parametrize(("status", "cls"), [
    (None, e.Transient), (408, e.Transient), (429, e.Transient), (500, e.Transient), (503, e.Transient),
    (401, e.AuthenticationFailed), (403, e.PermissionDenied), (404, e.NotFound),
    (409, e.PreconditionFailed), (412, e.PreconditionFailed), (501, e.NotSupported), (400, e.BackendError),
])
def test_error_for_status(status: int | None, cls: type) -> None:
    err = e.error_for_status(status, "what", 3.0)
    assert type(err) is cls
    assert str(err) == "what"
    if cls is e.Transient:
        assert isinstance(err, e.Transient) and err.retry_after == 3.0


def test_retry_after_forms() -> None:
    assert e.retry_after(None) is None
    assert e.retry_after({}) is None
    assert e.retry_after({"Retry-After": "7"}) == 7.0
    assert e.retry_after({"retry-after": "1.5"}) == 1.5
    assert e.retry_after({"Retry-After": "-3"}) == 0.0
    assert e.retry_after({"x-ms-retry-after-ms": "250", "Retry-After": "9"}) == 0.25
    assert e.retry_after({"Retry-After": "soon"}) is None
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 20 <= (e.retry_after({"Retry-After": date}) or 0) <= 31
