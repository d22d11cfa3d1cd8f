"""The shared HTTP-status mapping and Retry-After parsing (backends/errors.py)."""

from __future__ import annotations

import email.utils
import time

import pytest
import trio

from cloudfs.backends import errors as e
from cloudfs.backends.base import Backend, ObjectInfo, RetryPolicy


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


class _Expiring(Backend):
    """A backend whose token expires: exercises the base's re-authorization, no store needed."""

    scheme = "test"

    def __init__(self, refuse_fresh: bool = False) -> None:
        super().__init__("bucket", retry=RetryPolicy(attempts=4, initial_delay=0.0, max_delay=0.0))
        self.token = 0
        self.renewals = 0
        self.refuse_fresh = refuse_fresh

    def _reauthorize(self) -> None:
        self.renewals += 1
        self.token += 1

    def _head(self, key: str) -> ObjectInfo:
        if self.token == 0 or self.refuse_fresh:
            raise e.TokenExpired("token expired")
        return ObjectInfo(key, 1)


def test_concurrent_expiry_renews_once() -> None:
    b = _Expiring()

    async def main() -> None:
        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(b.head, f"k{i}")

    trio.run(main)
    assert b.renewals == 1
    assert b.requests["authorize"] == 1


def test_refused_fresh_token_is_an_auth_failure() -> None:
    b = _Expiring(refuse_fresh=True)
    with pytest.raises(e.AuthenticationFailed, match="fresh token"):
        trio.run(b.head, "k")
    assert b.renewals == 1
    assert b.requests["head"] == 2
