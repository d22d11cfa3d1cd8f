"""The backend interface: one small contract that every object store fills in.

A backend subclass implements blocking ``_primitive`` methods over its SDK, working on raw
keys (the bucket prefix already applied), and a ``_translate`` that maps SDK exceptions to
the errors in :mod:`cloudfs.backends.errors`.  Everything that is the same for every store
lives here, once:

* the async face used by the rest of cloudfs (``await backend.head(key)``);
* running the blocking SDK call in a worker thread, under a per-backend CapacityLimiter
  (no global state: two mounts never share a limiter);
* retrying ``Transient`` errors with capped exponential backoff and jitter (tenacity),
  then giving up with the error (EIO at the FUSE boundary) -- never hanging;
* paging of listings, the mount prefix, and key validation against the capabilities.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import copy
import functools
import io
import itertools
import logging
import mimetypes
import os
import ssl
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableSequence, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar, cast

import prometheus_client
import tenacity
import trio

from .errors import (
    AuthenticationFailed,
    BackendError,
    ConfigError,
    InvalidName,
    NameTooLong,
    NotFound,
    NotSupported,
    TokenExpired,
    Transient,
    one_error,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
# Latency buckets (seconds) for backend requests: from a local server to a slow transfer.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


@dataclass(frozen=True)
class Capabilities:
    """What a store can hold; the FUSE layer refuses what does not fit before it uploads."""

    max_key_bytes: int = 1024
    max_metadata_bytes: int = 2048
    min_part_size: int = 5 * 1024 * 1024
    max_part_size: int = 5 * 1024**3
    max_parts: int = 10_000
    # Characters no key may contain (beyond NUL, which no store accepts).
    forbidden_chars: str = ""
    # Whether listings carry user metadata (saves a HEAD per entry in readdir).
    listing_has_metadata: bool = False
    # Whether a multipart upload can take a part by server-side copy of another object.
    part_copy: bool = False
    # Whether put/get honour If-Match / If-None-Match style conditions.
    conditional_writes: bool = False
    # Whether ``put`` checks ``if_match`` / ``if_none_match`` in the store itself, within the
    # one request that stores the object (no lookup first, so no window for another writer
    # and no extra request).  False where the backend emulates the conditions with a lookup
    # (B2) or sends one anyway (Swift).  See also ``Backend.conditional_put_unverified``.
    atomic_conditional_put: bool = False


@dataclass(frozen=True)
class ObjectInfo:
    """One object as seen by HEAD or a listing. ``metadata`` is None when the listing did not carry it."""

    key: str
    size: int
    etag: str | None = None
    mtime: float | None = None  # server-side last-modified, epoch seconds
    metadata: dict[str, str] | None = None


@dataclass
class ListPage:
    objects: list[ObjectInfo] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)  # common prefixes, each ending in the delimiter
    next_token: str | None = None


@dataclass(frozen=True)
class PartInfo:
    number: int  # 1-based
    etag: str


# Mount options every network store takes: the CA certificates to trust, or no check at all.
TLS_OPTIONS = frozenset({"ca_bundle", "tls_verify"})


def parse_flag(value: str | None, name: str) -> bool | None:
    """A yes/no backend option: None when not given; given bare (``-o name``) it is yes."""
    if value is None:
        return None
    v = value.strip().lower()
    if v in ("", "1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} takes 1/true or 0/false, not {value!r}")


def tls_verify(options: dict[str, str]) -> bool | str:
    """What ``-o ca_bundle=PATH`` / ``-o tls_verify=0`` ask for, as requests and botocore
    take it: True (the system's CAs), a CA bundle path, or False (no certificate check)."""
    bundle = options.get("ca_bundle")
    off = parse_flag(options.get("tls_verify"), "tls_verify") is False
    if bundle:
        if off:
            raise ConfigError("-o ca_bundle and -o tls_verify=0 contradict each other")
        path = os.path.abspath(bundle)
        if not os.path.isfile(path):
            raise ConfigError(f"-o ca_bundle={bundle}: no such file")
        return path
    if off:
        # Asked for: urllib3's warning on every request would only flood the log.
        import urllib3

        warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
        log.warning("TLS certificate checks are off (-o tls_verify=0)")
    return not off


def requests_adapter(pool_maxsize: int, verify: bool | str = True) -> Any:
    """A requests ``HTTPAdapter`` with a pool of ``pool_maxsize``, no retries of its own (the
    base class retries) and, when ``verify`` is not the default, that TLS setting on every
    request: requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's own
    ``verify``, and an explicit mount option must win over the environment."""
    import requests

    setting = verify

    class Adapter(requests.adapters.HTTPAdapter):
        def send(self, request: Any, stream: bool = False, timeout: Any = None, verify: bool | str = True,
                 cert: Any = None, proxies: Any = None) -> Any:
            return super().send(request, stream=stream, timeout=timeout,
                                verify=setting if setting is not True else verify, cert=cert, proxies=proxies)

    return Adapter(pool_connections=4, pool_maxsize=pool_maxsize, max_retries=0)


def untrusted_certificate(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a TLS certificate check that failed, however deep the SDK
    wrapped it (requests and botocore keep the ssl error as a cause, a reason or an argument;
    azure-core as its ``inner_exception``)."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo and len(seen) < 50:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return True
        todo.extend([e.__cause__, e.__context__, getattr(e, "reason", None),
                     getattr(e, "inner_exception", None), *e.args])
    return False


def trace_arg(value: object) -> str:
    """An argument as a debug trace shows it: names and numbers as they are, contents only by
    size (file data and metadata values are the user's, and never belong in a log)."""
    if isinstance(value, str):
        return repr(value if len(value) <= 200 else value[:200] + "...")
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return f"<{len(value)} metadata keys>"
    if isinstance(value, list | tuple):
        return f"<{len(value)} items>"
    return f"<{type(value).__name__}>"


class Payload:
    """A body to upload that can be re-read from the start on every retry attempt.

    Either bytes in memory or a byte range of a local file, so large bodies stream from
    disk instead of sitting in memory.
    """

    def __init__(self, data: bytes | None = None, path: str | None = None, offset: int = 0,
                 length: int | None = None, segments: list[Segment] | None = None) -> None:
        if sum(x is not None for x in (data, path, segments)) != 1:
            raise ValueError("give one of data, path or segments")
        self.data = data
        self.path = path
        self.offset = offset
        self.segments = segments
        self.progress: Progress | None = None  # told of every read (see ``watched``)
        if data is not None:
            self.size = len(data)
        elif segments is not None:
            self.size = sum(s.length for s in segments)
        else:
            assert path is not None
            self.size = os.path.getsize(path) - offset if length is None else length

    @classmethod
    def from_bytes(cls, data: bytes) -> Payload:
        return cls(data=data)

    @classmethod
    def from_file(cls, path: str, offset: int = 0, length: int | None = None) -> Payload:
        return cls(path=path, offset=offset, length=length)

    @classmethod
    def from_segments(cls, segments: list[Segment]) -> Payload:
        """Ranges of open files (and runs of zeros) read in order.  The payload owns the file
        descriptors: ``close()`` closes them.  Opened before the upload, they keep their
        content readable even if the files are unlinked meanwhile (a cache block evicted)."""
        return cls(segments=segments)

    def close(self) -> None:
        for seg in self.segments or []:
            if seg.fd is not None:
                os.close(seg.fd)
                seg.fd = None

    def watched(self, progress: Progress) -> Payload:
        """The same body, whose readers tell ``progress`` of every read."""
        clone = copy.copy(self)
        clone.progress = progress
        return clone

    def open(self) -> BinaryIO:
        """A fresh reader positioned at the start of the payload."""
        reader = self._open()
        return reader if self.progress is None else cast(BinaryIO, _Watched(reader, self.progress))

    def _open(self) -> BinaryIO:
        if self.data is not None:
            return io.BytesIO(self.data)
        if self.segments is not None:
            return io.BufferedReader(_SegmentReader(self.segments, self.size))
        assert self.path is not None
        if self.offset == 0 and self.size == os.path.getsize(self.path):
            return open(self.path, "rb")
        return cast(BinaryIO, _RangeReader(self.path, self.offset, self.size))


@dataclass
class Segment:
    """``length`` bytes at ``offset`` of the open file ``fd``, or zeros when ``fd`` is None.
    Bytes past the file's end read as zeros too (a block file holds a hole at its end)."""

    fd: int | None
    offset: int
    length: int


class Progress:
    """Bytes of a transfer moving.  Worker threads moving them call ``moved``; while an
    attempt watches (``watch``), that pushes the attempt's deadline on, at most once per
    ``every`` seconds (so the deadline lags the last byte by less than that)."""

    __slots__ = ("_every", "_push", "_pushed", "moves")

    def __init__(self) -> None:
        self._push: Callable[[], None] | None = None
        self._pushed = 0.0
        self._every = 0.0
        self.moves = 0  # calls of ``moved`` so far (a resumable call's attempts, see _Streak)

    def watch(self, push: Callable[[], None] | None, every: float = 0.0) -> None:
        self._push, self._every, self._pushed = push, every, time.monotonic()

    def moved(self) -> None:
        self.moves += 1
        push, now = self._push, time.monotonic()
        if push is not None and now - self._pushed >= self._every:
            self._pushed = now
            push()


class _Streak:
    """Which try in a row a failed attempt is, for the retry budget and the backoff.  For a
    resumable call (an attempt keeps what it got done, the next goes on from there) an
    attempt that moved its ``progress`` on starts the count again: the budget bounds
    attempts that get nothing done, and the call as a whole stays bounded by its work."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self._seen = progress.moves if progress is not None else 0
        self._base = 0

    def tries(self, state: tenacity.RetryCallState) -> int:
        if self._progress is not None and self._progress.moves != self._seen:
            self._seen = self._progress.moves
            self._base = state.attempt_number - 1
        return state.attempt_number - self._base


class _Watched:
    """A file object whose reads and writes tell a :class:`Progress`; anything else an SDK
    asks of it (seek, tell, fileno, ...) is the wrapped file's."""

    def __init__(self, inner: Any, progress: Progress) -> None:
        self._inner = inner
        self._progress = progress

    def read(self, *args: Any) -> bytes:
        data: bytes = self._inner.read(*args)
        self._progress.moved()
        return data

    def readinto(self, buf: Any) -> int:
        n: int = self._inner.readinto(buf)
        self._progress.moved()
        return n

    def write(self, data: Any) -> int:
        n: int = self._inner.write(data)
        self._progress.moved()
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __iter__(self) -> Any:
        return iter(self._inner)

    def __enter__(self) -> _Watched:
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.close()


class _View(io.RawIOBase):
    """A seekable read-only stream of ``_size`` bytes; subclasses read at ``_pos``."""

    _size = 0
    _pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, min(self._size, base + pos))
        return self._pos


class _SegmentReader(_View):
    def __init__(self, segments: list[Segment], size: int) -> None:
        self._segments = segments
        self._starts = list(itertools.accumulate((s.length for s in segments), initial=0))
        self._size = size

    def readinto(self, b: Any) -> int:
        if self._pos >= self._size:
            return 0
        i = bisect.bisect_right(self._starts, self._pos) - 1
        seg = self._segments[i]
        within = self._pos - self._starts[i]
        n = min(len(b), seg.length - within)
        if seg.fd is None:
            data = bytes(n)
        else:
            data = os.pread(seg.fd, n, seg.offset + within)
            if len(data) < n:
                data += bytes(n - len(data))
        b[:n] = data
        self._pos += n
        return n


class _RangeReader(_View):
    """``length`` bytes of a file starting at ``offset``."""

    def __init__(self, path: str, offset: int, length: int) -> None:
        self._f = open(path, "rb")
        self._start = offset
        self._size = length

    def readinto(self, b: Any) -> int:
        n = min(len(b), self._size - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._f.fileno(), n, self._start + self._pos)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    initial_delay: float = 0.2
    max_delay: float = 10.0
    # How long one blocking SDK call may go without moving a byte of its body (or, for a
    # call with no body to watch, how long it may take), so a dead connection ends in EIO,
    # not a hang, while a slow but moving transfer goes on.
    call_timeout: float = 300.0
    # The same for requests that move no data (HEAD, LIST, DELETE, ...): a hung store is
    # noticed in seconds, and the attempt is retried like any other transient failure.
    metadata_timeout: float = 10.0


# Keys per worker-thread call of ``Backend.head_many``: enough to amortize the hop, few
# enough that other requests get a connection slot between batches.
HEAD_BATCH = 32


def _ignore_reachability(up: bool) -> None:
    pass


# Primitives that send and receive only a few kilobytes: they get ``metadata_timeout``.
# ``head_batch`` (``head_many``) gets it per answer: each HEAD answered pushes the deadline on.
METADATA_OPS = frozenset({"check_bucket", "list_page", "head", "head_batch", "delete", "delete_after_move",
                          "mpu_create", "mpu_abort"})


class Backend:
    """Base class. Subclasses set ``scheme`` and ``capabilities`` and implement the primitives."""

    scheme: str = ""
    capabilities: Capabilities = Capabilities()
    # Option names (from ``-o``) a backend accepts; the CLI rejects the others.
    options: frozenset[str] = frozenset()
    # True where ``atomic_conditional_put`` holds for the protocol but a given server may
    # ignore the headers (S3-compatible stores: older ones store the object regardless).
    # The uploader then trusts a condition only once it saw the server refuse it.
    conditional_put_unverified: bool = False

    def __init__(self, bucket: str, prefix: str = "", *, max_connections: int = 16,
                 retry: RetryPolicy | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.limiter = trio.CapacityLimiter(max_connections)
        self.retry = retry or RetryPolicy()
        # Requests sent, by operation (each retry attempt counts): for `cloudfs status` and tests.
        self.requests: collections.Counter[str] = collections.Counter()
        # The same attempts by outcome ("ok" or the error's class), and their latency: metrics.
        self.results: collections.Counter[tuple[str, str]] = collections.Counter()
        self.latency = prometheus_client.Histogram(
            "cloudfs_backend_request_seconds", "Backend request latency, per attempt", ["op"],
            registry=None, buckets=LATENCY_BUCKETS)
        # Re-authorization after TokenExpired: one at a time, and once per expiry however many
        # requests saw it (each remembers the generation it was sent with).
        self._auth_lock = trio.Lock()
        self._auth_generation = 0
        self.fixed_content_type: str | None = None  # -o content_type, else guessed per name
        self.offline_since: float | None = None  # wall time since when the store does not answer
        self._on_reachability: Callable[[bool], None] = _ignore_reachability

    @classmethod
    def from_url(cls, netloc: str, path: str, options: dict[str, str]) -> Backend:
        """Build from the URL's host part (bucket/account) and path (prefix), plus ``-o`` options."""
        raise NotImplementedError

    # ------------------------------------------------------------------ description
    def describe(self) -> str:
        """A URL-like name without credentials, for logs and status."""
        return f"{self.scheme}://{self.bucket}/{self.prefix}"

    # ------------------------------------------------------------------ primitives (blocking)
    # Keys given to primitives already carry the mount prefix.
    def _translate(self, exc: Exception) -> BackendError | None:
        """Map an SDK exception to a BackendError; None means 'not an SDK error' (re-raise)."""
        return None

    def _check_bucket(self) -> None:
        raise NotImplementedError

    def _list_page(self, prefix: str, delimiter: str | None, token: str | None, limit: int) -> ListPage:
        raise NotImplementedError

    def _head(self, key: str) -> ObjectInfo:
        raise NotImplementedError

    def _get_into(self, key: str, start: int, length: int | None, out: BinaryIO,
                  if_match: str | None) -> None:
        """Write bytes [start, start+length) of the object to ``out`` (length None: to the end)."""
        raise NotImplementedError

    def _put(self, key: str, payload: Payload, metadata: dict[str, str], if_match: str | None,
             if_none_match: bool) -> str:
        """Store the whole object; returns the new ETag."""
        raise NotImplementedError

    def _set_metadata(self, key: str, metadata: dict[str, str]) -> str:
        """Replace the object's user metadata; returns the ETag. Default: copy onto itself."""
        return self._copy(key, key, metadata)

    def _copy(self, src: str, dst: str, metadata: dict[str, str] | None) -> str:
        raise NotImplementedError

    def _delete(self, key: str) -> None:
        """Delete one object. A missing object is not an error (deletes are idempotent)."""
        raise NotImplementedError

    # A rename is a copy, then a delete of the source (no store renames atomically).  Stores
    # whose large objects are manifests over shared segments (Swift SLO) copy the manifest
    # and then delete only the old manifest, so the two halves are separate primitives.
    def _copy_for_move(self, src: str, dst: str, metadata: dict[str, str] | None) -> str:
        return self._copy(src, dst, metadata)

    def _delete_after_move(self, key: str) -> None:
        self._delete(key)

    def _delete_many(self, keys: list[str]) -> None:
        for key in keys:
            self._delete(key)

    def _mpu_create(self, key: str, metadata: dict[str, str]) -> str:
        raise NotImplementedError

    def _mpu_part(self, key: str, upload_id: str, number: int, payload: Payload) -> str:
        raise NotImplementedError

    def _mpu_part_copy(self, key: str, upload_id: str, number: int, src_key: str, start: int,
                       length: int, src_etag: str | None) -> str:
        raise NotSupported("server-side part copy")

    def _mpu_complete(self, key: str, upload_id: str, parts: list[PartInfo]) -> str:
        raise NotImplementedError

    def _mpu_abort(self, key: str, upload_id: str) -> None:
        raise NotImplementedError

    def _mpu_resume(self, key: str, upload_id: str, metadata: dict[str, str]) -> None:
        """Adopt an upload another process of this mount opened (it was killed).  Stores that
        keep uploads server-side need nothing; a gone upload fails later with NotFound."""

    def _recover(self, resumed: set[str]) -> None:
        """Clean up what a killed process of this mount left behind (as the state directory
        records it), except the uploads in ``resumed``: the cache continues those."""

    def use_state_dir(self, path: str) -> None:
        """Called once before ``check()`` with a private directory (0700, in the mount's cache
        directory) where a backend may keep state across mounts, e.g. an account-info file."""

    def _reauthorize(self) -> None:
        """Get a fresh token after TokenExpired (blocking). Stores whose credentials do not
        expire never raise TokenExpired and need not override this."""
        raise AuthenticationFailed(f"{self.scheme}: the session expired and cannot be renewed")

    def close(self) -> None:
        """Release SDK clients and connection pools."""

    def content_type(self, key: str) -> str:
        """The Content-Type a new object is stored with: ``-o content_type``, else guessed
        from its name."""
        if self.fixed_content_type:
            return self.fixed_content_type
        guessed, _ = mimetypes.guess_type(key.rstrip("/"), strict=False)
        return guessed or "application/octet-stream"

    # ------------------------------------------------------------------ plumbing
    def full_key(self, key: str) -> str:
        return self.prefix + key

    def validate_key(self, key: str) -> None:
        """Raise NameTooLong / InvalidName if the store cannot hold this key."""
        full = self.full_key(key)
        if len(full.encode()) > self.capabilities.max_key_bytes:
            raise NameTooLong(f"key is {len(full.encode())} bytes, {self.scheme} allows "
                              f"{self.capabilities.max_key_bytes}")
        bad = "\0" + self.capabilities.forbidden_chars
        if any(c in full for c in bad):
            raise InvalidName(f"{self.scheme} cannot store a name with one of {bad!r}")

    def _guard(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except BackendError:
            raise
        except Exception as exc:
            if untrusted_certificate(exc):
                raise ConfigError(f"{self.describe()}: the server's TLS certificate is not trusted; pass "
                                  "-o ca_bundle=PATH (its CA), or -o tls_verify=0 for a test server"
                                  ) from None
            mapped = self._translate(exc)
            if mapped is None:
                raise
            raise mapped from None  # drop the SDK traceback: it may hold signed URLs

    async def _call(self, fn: Callable[..., T], *args: Any, retry: bool = True,
                    progress: Progress | None = None, counted: bool = True, resumable: bool = False) -> T:
        """Run a primitive in a worker thread with the retry policy.

        Each attempt ends as failed (``Transient``) once its timeout passes: for a call with a
        ``progress`` (a body moving through readers and writers it watches), a timeout in
        which no byte moved; for others, the timeout in total.

        ``Transient`` errors are retried with capped exponential backoff and jitter, at least
        as long as a ``Retry-After`` asked for; ``backoff=False`` ones at once.  A
        ``TokenExpired`` re-authorizes first (once per call: a second one means the fresh
        token is refused too, which is an authentication failure).  Each attempt counts as one
        request of its operation, unless ``counted`` is False (the caller counts what it sent).
        A ``resumable`` call's attempts keep what they got done: only attempts in a row that
        moved its ``progress`` nothing count against the retry budget (``_Streak``).
        """
        policy = self.retry
        op = getattr(fn, "__name__", "call").lstrip("_")
        # While the store is unreachable, one attempt per call within the short timeout: what
        # is not cached fails fast, and the first answer brings the store back (``_reachable``).
        offline = self.offline_since is not None
        timeout = min(policy.call_timeout, policy.metadata_timeout) if op in METADATA_OPS or offline \
            else policy.call_timeout
        attempts = policy.attempts if retry and not offline else 1
        streak = _Streak(progress if resumable else None)

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, Transient) and not exc.backoff:
                return 0.0
            counted_state = copy.copy(state)
            counted_state.attempt_number = streak.tries(state)
            delay = tenacity.wait_random_exponential(multiplier=policy.initial_delay,
                                                     max=policy.max_delay)(counted_state)
            if isinstance(exc, Transient) and exc.retry_after:
                delay = max(delay, min(exc.retry_after, policy.max_delay))
            return delay

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("%s: %s failed (%s), retry %d/%d", self.describe(), op, exc,
                        streak.tries(state), attempts - 1)

        retrying = tenacity.AsyncRetrying(
            sleep=trio.sleep,
            stop=lambda state: streak.tries(state) >= attempts,
            wait=wait,
            retry=tenacity.retry_if_exception_type(Transient),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            result = await self._attempts(fn, args, op, timeout, retrying, progress, counted)
        except Transient:
            if retry:  # the whole retry policy failed (a call without retries proves little)
                self._reachable(False)
            raise
        except BackendError:
            self._reachable(True)  # it answered, if only to refuse
            raise
        self._reachable(True)
        return result

    async def _attempts(self, fn: Callable[..., T], args: tuple[Any, ...], op: str, timeout: float,
                        retrying: tenacity.AsyncRetrying, progress: Progress | None, counted: bool) -> T:
        renewed = False
        async for attempt in retrying:
            if counted:
                self.requests[op] += 1
            generation = self._auth_generation
            with attempt:
                started = time.monotonic()
                try:
                    result = await self._within(timeout, progress, op, functools.partial(
                        trio.to_thread.run_sync, functools.partial(self._guard, fn, *args),
                        limiter=self.limiter, abandon_on_cancel=True))
                except BaseException as exc:
                    self._observe(op, args, type(exc).__name__, started)
                    if isinstance(exc, TokenExpired):
                        if renewed:
                            raise AuthenticationFailed(f"{exc}; a fresh token was refused too") from None
                        renewed = True
                        await self._renew_auth(generation)
                    raise
                self._observe(op, args, "ok", started)
                return result
        raise AssertionError("unreachable")

    async def _within(self, timeout: float, progress: Progress | None, op: str,
                      call: Callable[[], Awaitable[T]]) -> T:
        """``await call()``, cancelled as ``Transient`` once ``timeout`` seconds pass in which
        ``progress`` saw no byte move (without a ``progress``: once they pass at all)."""
        with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
            if progress is not None:
                token = trio.lowlevel.current_trio_token()

                def push_on() -> None:  # on the trio thread
                    scope.deadline = trio.current_time() + timeout

                def from_worker() -> None:
                    with contextlib.suppress(trio.RunFinishedError):  # an abandoned call, late
                        token.run_sync_soon(push_on)

                progress.watch(from_worker, timeout / 8)
            try:
                return await call()
            finally:
                if progress is not None:
                    progress.watch(None)
        if progress is None:
            raise Transient(f"{self.scheme}: {op} got no answer in {timeout:g}s")
        raise Transient(f"{self.scheme}: {op} moved no data for {timeout:g}s")

    def watch_reachability(self, callback: Callable[[bool], None]) -> None:
        """``callback(False)`` when the store stops answering, ``callback(True)`` when it
        answers again."""
        self._on_reachability = callback

    def _reachable(self, up: bool) -> None:
        if up and self.offline_since is not None:
            log.warning("%s answers again", self.describe())
            self.offline_since = None
            self._on_reachability(True)
        elif not up and self.offline_since is None:
            log.warning("%s does not answer: serving what is cached, keeping changes to upload later",
                        self.describe())
            self.offline_since = time.time()
            self._on_reachability(False)

    def _observe(self, op: str, args: tuple[Any, ...], outcome: str, started: float) -> None:
        elapsed = time.monotonic() - started
        self.results[(op, outcome)] += 1
        self.latency.labels(op).observe(elapsed)
        if log.isEnabledFor(logging.DEBUG):  # -o debug: one line per request sent
            log.debug("%s: %s(%s) -> %s in %.1f ms", self.describe(), op,
                      ", ".join(trace_arg(a) for a in args), outcome, elapsed * 1000)

    async def _renew_auth(self, generation: int) -> None:
        async with self._auth_lock:
            if self._auth_generation != generation:
                return  # another request renewed it meanwhile
            log.info("%s: session expired, re-authorizing", self.describe())
            self.requests["authorize"] += 1
            await trio.to_thread.run_sync(functools.partial(self._guard, self._reauthorize),
                                          abandon_on_cancel=True)
            self._auth_generation += 1

    # ------------------------------------------------------------------ async face
    async def check(self) -> None:
        """Fail with BucketNotFound / AuthenticationFailed early, at mount time."""
        await self._call(self._check_bucket)

    async def probe(self) -> bool:
        """Whether the store answers, asked with its cheapest request (a one-name listing),
        once and within ``metadata_timeout``; an answer ends offline mode (``_reachable``).
        Says nothing itself: the change of state is logged once, where it happens."""
        try:
            await self._call(self._list_page, self.full_key(""), "/", None, 1, retry=False)
        except Transient:
            return False
        except BackendError:
            pass  # it answered, if only to refuse
        return True

    async def list_page(self, prefix: str, delimiter: str | None = "/", token: str | None = None,
                        limit: int = 1000) -> ListPage:
        page = await self._call(self._list_page, self.full_key(prefix), delimiter, token, limit)
        n = len(self.prefix)
        if n:
            page.objects = [_strip(o, n) for o in page.objects]
            page.prefixes = [p[n:] for p in page.prefixes]
        return page

    async def list(self, prefix: str, delimiter: str | None = "/",
                   limit: int = 1000) -> AsyncIterator[ListPage]:
        """All pages of a listing, fetched one page at a time; each common prefix once."""
        token: str | None = None
        seen: set[str] = set()
        while True:
            page = await self.list_page(prefix, delimiter, token, limit)
            page.prefixes = [p for p in page.prefixes if p not in seen]
            seen.update(page.prefixes)
            yield page
            token = page.next_token
            if not token:
                return

    async def head(self, key: str) -> ObjectInfo:
        return _strip(await self._call(self._head, self.full_key(key)), len(self.prefix))

    async def head_many(self, keys: Sequence[str], parallel: int) -> dict[str, ObjectInfo]:
        """HEAD of every key, by key; a key the store does not hold is left out.

        The keys go in batches of up to ``HEAD_BATCH``, each batch one worker-thread call that
        sends its HEADs one after another, ``parallel`` batches at a time.  A thread hop and
        its retry and timeout machinery cost about as much CPU as the HEAD itself, so a cold
        listing's thousand HEADs take a few dozen of them instead of a thousand.  Each batch
        is one resumable call under the retry policy: an attempt goes on at the first key
        without an answer, only attempts that answer nothing count against the retry budget,
        and an attempt's timeout counts from the last answer, not from the batch's start.
        Every HEAD sent counts as one ``head`` request."""
        full = [self.full_key(k) for k in keys]
        # More batches than worker threads would only queue for them: a small page's HEADs
        # go in as few batches as keep every thread busy.
        parallel = max(1, min(parallel, int(self.limiter.total_tokens)))
        size = max(1, min(HEAD_BATCH, -(-len(full) // parallel)))
        answers: dict[str, ObjectInfo | None] = {}
        slots = trio.CapacityLimiter(parallel)

        async def run(batch: Sequence[str]) -> None:
            async with slots:
                progress, sent, attempt = Progress(), collections.deque[str](), [0]
                try:
                    await self._call(self._head_batch, batch, answers, sent, progress, attempt,
                                     progress=progress, counted=False, resumable=True)
                finally:
                    attempt[0] = -1  # an attempt abandoned at its timeout stops at its next key
                    self.requests["head"] += len(sent)

        with one_error():
            async with trio.open_nursery() as nursery:
                for i in range(0, len(full), size):
                    nursery.start_soon(run, full[i:i + size])
        stripped = (_strip(info, len(self.prefix)) for info in answers.values() if info is not None)
        return {info.key: info for info in stripped}

    def _head_batch(self, keys: Sequence[str], answers: dict[str, ObjectInfo | None],
                    sent: collections.deque[str], progress: Progress, attempt: MutableSequence[int]) -> None:
        """In a worker thread: HEAD each key not yet in ``answers`` (None: not found), until
        a later attempt of the batch starts or the batch ends (``attempt`` moves on)."""
        attempt[0] += 1
        mine = attempt[0]
        for key in keys:
            if attempt[0] != mine:
                return  # abandoned at its timeout: the next attempt goes on from here
            if key in answers:
                continue  # answered by an earlier attempt of this batch
            sent.append(key)
            try:
                answers[key] = self._guard(self._head, key)
            except NotFound:
                answers[key] = None
            progress.moved()

    async def get_range(self, key: str, start: int = 0, length: int | None = None,
                        if_match: str | None = None) -> bytes:
        buf = io.BytesIO()
        await self.download(key, buf, start, length, if_match)
        return buf.getvalue()

    async def download(self, key: str, out: BinaryIO, start: int = 0, length: int | None = None,
                       if_match: str | None = None) -> None:
        """Stream a byte range into ``out`` (rewound and truncated before each retry)."""
        if length == 0:
            return
        origin = out.tell()

        progress = Progress()
        watched = cast(BinaryIO, _Watched(out, progress))

        def attempt(k: str) -> None:
            out.seek(origin)
            out.truncate()
            self._get_into(k, start, length, watched, if_match)

        attempt.__name__ = "get"
        await self._call(attempt, self.full_key(key), progress=progress)

    async def put(self, key: str, payload: Payload, metadata: dict[str, str] | None = None,
                  if_match: str | None = None, if_none_match: bool = False) -> str:
        self.validate_key(key)
        progress = Progress()
        return await self._call(self._put, self.full_key(key), payload.watched(progress),
                                dict(metadata or {}), if_match, if_none_match, progress=progress)

    async def set_metadata(self, key: str, metadata: dict[str, str]) -> str:
        return await self._call(self._set_metadata, self.full_key(key), dict(metadata))

    async def copy(self, src: str, dst: str, metadata: dict[str, str] | None = None) -> str:
        self.validate_key(dst)
        return await self._call(self._copy, self.full_key(src), self.full_key(dst),
                                None if metadata is None else dict(metadata))

    async def delete(self, key: str) -> None:
        await self._call(self._delete, self.full_key(key))

    async def move(self, src: str, dst: str, metadata: dict[str, str] | None = None) -> str:
        """Give the object at ``src`` the name ``dst`` (server-side); returns the new ETag.
        Not atomic: interrupted between the two requests, both names exist."""
        self.validate_key(dst)
        etag = await self._call(self._copy_for_move, self.full_key(src), self.full_key(dst),
                                None if metadata is None else dict(metadata))
        await self._call(self._delete_after_move, self.full_key(src))
        return etag

    async def delete_many(self, keys: Iterable[str]) -> None:
        """Delete ``keys``; every key below a folder goes before the folder's marker (keys in
        reverse order), so a store that keeps folders as directories finds each one empty
        when its marker is deleted."""
        batch = sorted((self.full_key(k) for k in keys), reverse=True)
        for i in range(0, len(batch), 1000):
            await self._call(self._delete_many, batch[i:i + 1000])

    async def mpu_create(self, key: str, metadata: dict[str, str] | None = None) -> str:
        self.validate_key(key)
        return await self._call(self._mpu_create, self.full_key(key), dict(metadata or {}))

    async def mpu_part(self, key: str, upload_id: str, number: int, payload: Payload) -> PartInfo:
        progress = Progress()
        etag = await self._call(self._mpu_part, self.full_key(key), upload_id, number,
                                payload.watched(progress), progress=progress)
        return PartInfo(number, etag)

    async def mpu_part_copy(self, key: str, upload_id: str, number: int, src_key: str, start: int,
                            length: int, src_etag: str | None = None) -> PartInfo:
        etag = await self._call(self._mpu_part_copy, self.full_key(key), upload_id, number,
                                self.full_key(src_key), start, length, src_etag)
        return PartInfo(number, etag)

    async def mpu_complete(self, key: str, upload_id: str, parts: Sequence[PartInfo]) -> str:
        return await self._call(self._mpu_complete, self.full_key(key), upload_id,
                                sorted(parts, key=lambda p: p.number))

    async def mpu_abort(self, key: str, upload_id: str) -> None:
        await self._call(self._mpu_abort, self.full_key(key), upload_id)

    async def recover(self, resumed: Iterable[str] = ()) -> None:
        """At mount, after ``use_state_dir``: see ``_recover``."""
        await self._call(self._recover, set(resumed))

    async def mpu_resume(self, key: str, upload_id: str, metadata: dict[str, str]) -> None:
        """Continue, in this process, an upload opened by ``mpu_create`` in an earlier one:
        ``metadata`` is what it was created with."""
        await self._call(self._mpu_resume, self.full_key(key), upload_id, dict(metadata))

    def part_size_for(self, size: int, preferred: int) -> int:
        """A part size >= preferred that keeps ``size`` within the store's part-count limit."""
        caps = self.capabilities
        part = max(preferred, caps.min_part_size)
        while size > part * caps.max_parts:
            part *= 2
        if part > caps.max_part_size:
            raise ConfigError(f"object of {size} bytes is too large for {self.scheme}")
        return part


def _strip(info: ObjectInfo, n: int) -> ObjectInfo:
    if not n:
        return info
    return ObjectInfo(info.key[n:], info.size, info.etag, info.mtime, info.metadata)
