"""OpenStack Swift backend: ``swift://CONTAINER[/prefix]`` over python-swiftclient.

Credentials follow OpenStack's conventions, looked up in this order (environment only: never
the URL, the command line or a log line):

* Keystone v3 when ``OS_AUTH_URL`` is set: an application credential
  (``OS_APPLICATION_CREDENTIAL_ID`` / ``OS_APPLICATION_CREDENTIAL_SECRET``) or a password
  (``OS_USERNAME``, ``OS_PASSWORD``, ``OS_PROJECT_NAME``, ``OS_USER_DOMAIN_NAME``,
  ``OS_PROJECT_DOMAIN_NAME``; ``OS_REGION_NAME`` and ``OS_INTERFACE`` pick the endpoint);
* v1 auth (tempauth, swauth, Rackspace-style) from ``ST_AUTH``, ``ST_USER``, ``ST_KEY``;
* a pre-authenticated ``OS_STORAGE_URL`` + ``OS_AUTH_TOKEN`` (cannot be renewed).

A 401 means the token expired, and so does a 403 once the token's known lifetime is over (or
when the lifetime is unknown): the base class re-authenticates once, serialised, and retries.

Capabilities come from ``GET /info`` when the mount checks the container: the name limit,
the metadata limits, the largest object, SLO (segment count) and bulk delete.

Mapping onto the cloudfs interface:

* ETags are Swift's without quotes; a Static Large Object's is the SLO ETag (the same in
  HEAD, GET and listings, via ``slo_etag``).  ``if_match`` on GET is sent as ``If-Match``;
  on PUT Swift honours only ``If-None-Match: *``, so ``if_match`` is checked with the HEAD
  that a PUT does anyway (a race window of one request remains).
* Metadata is ``X-Object-Meta-*``.  Swift folds ``_`` and ``-`` together in header names
  (WSGI) and lower-cases them, so names read back with ``-`` spelled ``_`` (cloudfs's own
  ``is_symlink``, ``cloudfs_upload``); rclone's ``mtime`` (float seconds) and s3fs's
  ``mode``/``uid``/``gid`` are read and written as the other backends do.  A value longer
  than ``max_meta_value_length`` (an s3fs ``xattr``) is split over ``NAME``, ``NAME~1``,
  ``NAME~2`` ... and joined on read.
* Directory markers are zero-byte ``dir/`` objects.  The ``application/directory`` objects
  older tools write (``dir`` without the slash) are presented as the marker ``dir/``: a
  common prefix in delimited listings, the object ``dir/`` in flat ones, and ``head``/
  ``delete`` of ``dir/`` find them.
* Large files are Static Large Objects (a DLO when ``/info`` has no ``slo``): parts are
  segments in ``CONTAINER_segments`` named ``KEY/cloudfs/UPLOAD/NUMBER``, so two uploads
  of one name never share a segment; completing PUTs the manifest.  The segments an object
  replaces (on overwrite by either path) are deleted only after the new object is
  committed.  Every upload and replacement is journaled in the backend's state directory
  before it starts and forgotten after its cleanup, so the next mount deletes what a crash
  left: every journaled segment the object now at that name does not reference.
* ``delete`` of a large object deletes its segments too (``multipart-manifest=delete``).
  ``copy`` and ``move`` of a large object copy the manifest (the segments are shared), and
  ``delete_many`` -- which cloudfs calls only after copying a directory tree -- and the
  second half of ``move`` delete manifests only, so the copies keep their segments.
* ``delete_many`` is one bulk-delete request per ``max_deletes_per_request`` keys when the
  cluster offers bulk delete, else one DELETE each.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit

from .base import (
    TLS_OPTIONS,
    Backend,
    Capabilities,
    ListPage,
    ObjectInfo,
    PartInfo,
    Payload,
    tls_verify,
)
from .errors import (
    AuthenticationFailed,
    BackendError,
    BucketNotFound,
    ConfigError,
    InvalidName,
    NameTooLong,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    QuotaExceeded,
    TokenExpired,
    Transient,
    error_for_status,
    retry_after,
)

log = logging.getLogger(__name__)
# swiftclient logs requests (headers redacted, but bodies and URLs) at DEBUG/INFO.
logging.getLogger("swiftclient").setLevel(logging.WARNING)

MiB = 1024 * 1024
META = "x-object-meta-"
DIRECTORY_TYPE = "application/directory"
SEGMENT_TAG = "cloudfs"
CHUNK_SEP = "~"
TIMEOUT = 60.0
READ_CHUNK = MiB
DELETE_WORKERS = 8
JOURNAL_DIR = "swift-segments"


class MetadataTooLarge(BackendError):
    errno = errno.ENOSPC


@dataclass(frozen=True)
class Session:
    """One authentication: where to send requests and the token to send."""

    url: str
    token: str
    expires_at: float | None = None  # time.time() after which the token is dead; None: unknown

    def __repr__(self) -> str:  # never print the token
        return f"Session(url={self.url!r})"


# ---------------------------------------------------------------------- authentication
def connection_tls(verify: bool | str) -> dict[str, Any]:
    """swiftclient's ``http_connection`` arguments for a ``tls_verify`` value."""
    return {"insecure": verify is False, "cacert": verify if isinstance(verify, str) else None}


class Auth:
    """How to obtain a :class:`Session`, chosen from the environment by OpenStack's order."""

    kind = ""
    renewable = True
    url = ""  # where authentication (or, pre-authenticated, storage) lives: names the cluster
    verify: bool | str = True  # -o ca_bundle / tls_verify, for auth and storage requests alike

    def login(self) -> Session:
        raise NotImplementedError

    @staticmethod
    def from_env(env: dict[str, str] | os._Environ[str] | None = None) -> Auth:
        env = os.environ if env is None else env
        if env.get("OS_AUTH_URL"):
            return KeystoneAuth(env)
        if env.get("ST_AUTH"):
            if not env.get("ST_USER") or not env.get("ST_KEY"):
                raise AuthenticationFailed("ST_AUTH is set but ST_USER or ST_KEY is missing")
            return V1Auth(env["ST_AUTH"], env["ST_USER"], env["ST_KEY"])
        if env.get("OS_STORAGE_URL") and env.get("OS_AUTH_TOKEN"):
            return PreAuth(env["OS_STORAGE_URL"], env["OS_AUTH_TOKEN"])
        raise AuthenticationFailed(
            "no Swift credentials: set OS_AUTH_URL and OS_USERNAME/OS_PASSWORD/OS_PROJECT_NAME "
            "(or OS_APPLICATION_CREDENTIAL_ID/_SECRET) for Keystone v3, ST_AUTH/ST_USER/ST_KEY for "
            "v1 auth, or OS_STORAGE_URL and OS_AUTH_TOKEN")


class V1Auth(Auth):
    kind = "v1"

    def __init__(self, url: str, user: str, key: str) -> None:
        self.url, self.user, self._key = url, user, key

    def login(self) -> Session:
        from swiftclient.client import http_connection

        parsed, conn = http_connection(self.url, timeout=TIMEOUT, **connection_tls(self.verify))
        try:
            conn.request("GET", parsed.path, "", {"X-Auth-User": self.user, "X-Auth-Key": self._key})
            resp = conn.getresponse()
            resp.read()
        finally:
            conn.close()
        if resp.status in (401, 403):
            raise AuthenticationFailed(f"swift: {self.url} rejected user {self.user!r} (HTTP {resp.status})")
        if not 200 <= resp.status < 300:
            raise error_for_status(resp.status, f"swift: v1 auth at {self.url} failed (HTTP {resp.status})",
                                   retry_after(resp.headers))
        url = resp.getheader("x-storage-url")
        token = resp.getheader("x-storage-token") or resp.getheader("x-auth-token")
        if not url or not token:
            raise AuthenticationFailed(f"swift: {self.url} answered without a storage URL and token")
        life = resp.getheader("x-auth-token-expires")
        try:
            expires = time.time() + float(life) if life else None
        except ValueError:
            expires = None
        return Session(url, token, expires)


class KeystoneAuth(Auth):
    kind = "keystone-v3"

    def __init__(self, env: dict[str, str] | os._Environ[str]) -> None:
        self.auth_url = self.url = env["OS_AUTH_URL"]
        self.region = env.get("OS_REGION_NAME") or None
        self.interface = env.get("OS_INTERFACE", "public").removesuffix("URL")
        self._args: dict[str, str | None]
        if env.get("OS_APPLICATION_CREDENTIAL_ID") or env.get("OS_APPLICATION_CREDENTIAL_NAME"):
            self.method = "application-credential"
            self._args = {"application_credential_id": env.get("OS_APPLICATION_CREDENTIAL_ID"),
                          "application_credential_name": env.get("OS_APPLICATION_CREDENTIAL_NAME"),
                          "application_credential_secret": env.get("OS_APPLICATION_CREDENTIAL_SECRET"),
                          "username": env.get("OS_USERNAME"),
                          "user_domain_name": env.get("OS_USER_DOMAIN_NAME")}
            if not self._args["application_credential_secret"]:
                raise AuthenticationFailed("OS_APPLICATION_CREDENTIAL_SECRET is not set")
        else:
            self.method = "password"
            missing = [v for v in ("OS_USERNAME", "OS_PASSWORD") if not env.get(v)]
            if missing:
                raise AuthenticationFailed(f"OS_AUTH_URL is set but {', '.join(missing)} is not")
            self._args = {"username": env.get("OS_USERNAME"), "password": env.get("OS_PASSWORD"),
                          "project_name": env.get("OS_PROJECT_NAME") or env.get("OS_TENANT_NAME"),
                          "project_id": env.get("OS_PROJECT_ID"),
                          "user_domain_name": env.get("OS_USER_DOMAIN_NAME") or "Default",
                          "project_domain_name": env.get("OS_PROJECT_DOMAIN_NAME") or "Default"}

    def login(self) -> Session:
        try:
            from keystoneauth1 import exceptions as ks_exc
            from keystoneauth1 import session as ks_session
            from keystoneauth1.identity import v3
        except ImportError:  # pragma: no cover - a dependency
            raise ConfigError("Keystone v3 auth needs keystoneauth1 (pip install keystoneauth1)") from None
        args: dict[str, Any] = {k: v for k, v in self._args.items() if v}
        plugin = (v3.ApplicationCredential if self.method == "application-credential" else v3.Password)(
            auth_url=self.auth_url, **args)
        sess = ks_session.Session(auth=plugin, timeout=TIMEOUT, verify=self.verify)
        try:
            token = sess.get_token()
            url = sess.get_endpoint(service_type="object-store", interface=self.interface,
                                    region_name=self.region)
            expires = plugin.get_access(sess).expires
        except ks_exc.Unauthorized:
            raise AuthenticationFailed(f"swift: Keystone at {self.auth_url} rejected the "
                                       f"{self.method}") from None
        except ks_exc.EndpointNotFound:
            raise AuthenticationFailed("swift: the Keystone catalog has no object-store endpoint"
                                       + (f" in region {self.region}" if self.region else "")) from None
        except (ks_exc.ConnectFailure, ks_exc.ConnectTimeout, ks_exc.DiscoveryFailure):
            raise Transient(f"swift: cannot reach Keystone at {self.auth_url}") from None
        except ks_exc.ClientException as exc:
            raise AuthenticationFailed(f"swift: Keystone auth failed ({type(exc).__name__})") from None
        if not token or not url:
            raise AuthenticationFailed("swift: Keystone returned no token or object-store endpoint")
        return Session(url, token, expires.timestamp() if expires else None)


class PreAuth(Auth):
    kind = "pre-authenticated"
    renewable = False

    def __init__(self, url: str, token: str) -> None:
        self._session = Session(url, token)
        self.url = url

    def login(self) -> Session:
        return self._session


# ---------------------------------------------------------------------- metadata
def encode_metadata(metadata: dict[str, str], max_value: int) -> dict[str, str]:
    """``X-Object-Meta-*`` headers for cloudfs metadata; long values in ``~N`` chunks."""
    headers: dict[str, str] = {}
    for name, value in metadata.items():
        if not name or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in name):
            raise InvalidName(f"swift cannot store a metadata name like {name!r}")
        value = str(value)
        if any(ord(c) < 32 for c in value):
            raise InvalidName(f"metadata value of {name!r} has control characters; Swift cannot store it")
        chunks = [value[i:i + max_value] for i in range(0, len(value), max_value)] or [""]
        for i, chunk in enumerate(chunks):
            headers[f"X-Object-Meta-{name}{f'{CHUNK_SEP}{i}' if i else ''}"] = chunk
    return headers


def decode_metadata(headers: dict[str, str]) -> dict[str, str]:
    """The inverse of :func:`encode_metadata` over (lowercase) response headers."""
    parts: dict[str, dict[int, str]] = {}
    for header, value in headers.items():
        header = header.lower()
        if not header.startswith(META):
            continue
        name = header[len(META):].replace("-", "_")
        base, sep, index = name.rpartition(CHUNK_SEP)
        if sep and index.isdigit() and base:
            parts.setdefault(base, {})[int(index)] = value
        else:
            parts.setdefault(name, {})[0] = value
    out: dict[str, str] = {}
    for name, chunks in parts.items():
        if 0 not in chunks:  # stray chunks without a head: shown as they are
            out.update({f"{name}{CHUNK_SEP}{i}": v for i, v in chunks.items()})
            continue
        value, i = "", 0
        while i in chunks:
            value += chunks[i]
            i += 1
        out[name] = value
    return out


def _etag(value: str | None) -> str | None:
    return value.strip().strip('"') if value else None


def _is_slo(headers: dict[str, str]) -> bool:
    return headers.get("x-static-large-object", "").lower() == "true"


# ---------------------------------------------------------------------- the backend
class SwiftBackend(Backend):
    scheme = "swift"
    # Swift's defaults; /info replaces them at mount.
    capabilities = Capabilities(
        max_key_bytes=1024,
        max_metadata_bytes=4096 - 512,  # headroom for chunked values' extra names
        min_part_size=MiB,
        max_part_size=5 * 1024**3,
        max_parts=1000,
        forbidden_chars="",
        listing_has_metadata=False,
        part_copy=False,
        conditional_writes=True,
        # Swift checks only If-None-Match on PUT, and ``_put`` sends a HEAD first anyway (for
        # old segments): atomic_conditional_put stays False.
    )
    options: frozenset[str] = TLS_OPTIONS

    def __init__(self, container: str, prefix: str = "", *, auth: Auth | None = None, **kw: Any) -> None:
        super().__init__(container, prefix, **kw)
        self.container = container
        self.segments = f"{container}_segments"
        self.auth = auth or Auth.from_env()
        self._session: Session | None = None
        self._login_lock = threading.Lock()
        self._local = threading.local()
        self._info: dict[str, Any] | None = None
        self._max_meta_value = 256
        self._max_meta_count = 90
        self._max_meta_overall = 4096
        self._segments_ready = False
        self._uploads: dict[str, dict[str, Any]] = {}  # upload id -> {"key", "metadata", "sizes"}
        self._lock = threading.Lock()
        self._journal_dir: str | None = None

    @classmethod
    def from_url(cls, netloc: str, path: str, options: dict[str, str]) -> SwiftBackend:
        container = netloc
        if not container:
            raise ConfigError("swift:// URL needs a container: swift://CONTAINER[/prefix]")
        if len(container.encode()) > 256 - len("_segments"):
            raise ConfigError(f"container name {container!r} is too long for Swift")
        verify = tls_verify(options)
        auth = Auth.from_env()
        auth.verify = verify
        return cls(container, path.strip("/"), auth=auth)

    def describe(self) -> str:
        """The container and the cluster (its auth URL's host), so two clusters' containers of
        one name never share a cache directory."""
        host = urlsplit(self.auth.url).netloc if self.auth.url else ""
        return f"swift://{self.container}/{self.prefix}" + (f" at {host}" if host else "")

    def close(self) -> None:
        conns = getattr(self._local, "conns", {})
        for _, conn in conns.values():
            with contextlib.suppress(Exception):
                conn.close()

    def use_state_dir(self, path: str) -> None:
        self._journal_dir = os.path.join(path, JOURNAL_DIR)
        os.makedirs(self._journal_dir, mode=0o700, exist_ok=True)

    # ------------------------------------------------------------------ sessions
    def _current(self) -> Session:
        session = self._session
        if session is None:
            with self._login_lock:
                if self._session is None:
                    self._session = self.auth.login()
                session = self._session
        return session

    def _reauthorize(self) -> None:
        if not self.auth.renewable:
            raise AuthenticationFailed("swift: the token (OS_AUTH_TOKEN) expired and cannot be renewed; "
                                       "give credentials instead")
        session = self.auth.login()
        with self._login_lock:
            self._session = session

    def _conn(self, url: str) -> tuple[Any, Any]:
        """This thread's connection to ``url`` (a swiftclient connection is not thread-safe)."""
        from swiftclient.client import http_connection

        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        if url not in conns:
            conns[url] = http_connection(url, timeout=TIMEOUT, **connection_tls(self.auth.verify))
        return conns[url]

    def _request(self, method: str, path: str, *, query: str = "", headers: dict[str, str] | None = None,
                 body: Any = b"", ok: tuple[int, ...] = (), stream: bool = False) -> Any:
        """One request to ``path`` below the storage URL (already quoted), with the token.

        Returns the response (read unless ``stream``); a status that is not 2xx nor in ``ok``
        raises the mapped error.
        """
        session = self._current()
        parsed, conn = self._conn(session.url)
        full = f"{parsed.path}{path}" + (f"?{query}" if query else "")
        hdrs = dict(headers or {})
        hdrs["X-Auth-Token"] = session.token
        try:
            conn.request(method, full, body, hdrs)
            resp = conn.getresponse()
        except Exception:
            self._drop_conn(session.url)
            raise
        if not stream or not 200 <= resp.status < 300:
            resp.body = resp.read()
        if 200 <= resp.status < 300 or resp.status in ok:
            return resp
        raise self._status_error(resp.status, resp, session, f"{method} {path.split('?')[0]}")

    def _drop_conn(self, url: str) -> None:
        conns = getattr(self._local, "conns", {})
        entry = conns.pop(url, None)
        if entry is not None:
            with contextlib.suppress(Exception):
                entry[1].close()

    def _status_error(self, status: int, resp: Any, session: Session, what: str) -> BackendError:
        from urllib.parse import unquote

        what = unquote(what)
        text = (getattr(resp, "body", b"") or b"")[:200].decode(errors="replace").lower()
        if status == 401:
            return TokenExpired(f"swift: {what}: token rejected (HTTP 401)")
        if status == 403:
            if session.expires_at is None or time.time() >= session.expires_at - 1:
                return TokenExpired(f"swift: {what}: token refused (HTTP 403), maybe expired")
            return PermissionDenied(f"swift: {what}: permission denied (HTTP 403)")
        if status == 413 and "quota" in text:
            return QuotaExceeded(f"swift: {what}: quota exceeded (HTTP 413)")
        if status == 413:
            return BackendError(f"swift: {what}: too large for this cluster (HTTP 413)")
        if status == 400 and "metadata" in text:
            return MetadataTooLarge(f"swift: {what}: metadata refused ({text.strip()[:80]})")
        if status == 400 and "name" in text and "long" in text:
            return NameTooLong(f"swift: {what}: name too long")
        return error_for_status(status, f"swift: {what}: HTTP {status}", retry_after(resp.headers))

    def _translate(self, exc: Exception) -> BackendError | None:
        import requests
        from swiftclient.exceptions import ClientException

        if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout
                      | requests.exceptions.ChunkedEncodingError | ConnectionError | TimeoutError):
            return Transient(f"swift: connection failed ({type(exc).__name__})")
        if isinstance(exc, ClientException):
            status = getattr(exc, "http_status", None)
            return error_for_status(status, f"swift: request failed (HTTP {status or 'none'})")
        return None

    # ------------------------------------------------------------------ paths and capabilities
    @staticmethod
    def _path(container: str, name: str | None = None) -> str:
        path = "/" + quote(container, safe="")
        return path if name is None else f"{path}/{quote(name, safe='/')}"

    def _obj(self, key: str) -> str:
        return self._path(self.container, key)

    def _load_info(self) -> dict[str, Any]:
        if self._info is not None:
            return self._info
        session = self._current()
        parts = urlsplit(session.url)
        info_url = f"{parts.scheme}://{parts.netloc}/info"
        parsed, conn = self._conn(info_url)
        conn.request("GET", parsed.path, "", {})
        resp = conn.getresponse()
        body = resp.read()
        info: dict[str, Any] = {}
        if resp.status == 200:
            with contextlib.suppress(ValueError):
                info = json.loads(body)
        else:
            log.info("swift: /info answered HTTP %s; assuming Swift's default limits", resp.status)
        self._apply_info(info)
        return info

    def _apply_info(self, info: dict[str, Any]) -> None:
        sw = info.get("swift", {})
        slo = info.get("slo")
        self._max_meta_value = int(sw.get("max_meta_value_length", 256))
        overall = int(sw.get("max_meta_overall_size", 4096))
        caps = self.capabilities
        self.capabilities = replace(
            caps,
            max_key_bytes=int(sw.get("max_object_name_length", caps.max_key_bytes)),
            max_metadata_bytes=max(256, overall - 512),
            max_part_size=int(sw.get("max_file_size", caps.max_part_size)),
            max_parts=int(slo.get("max_manifest_segments", 1000)) if slo else 10_000,
            min_part_size=max(caps.min_part_size, int(slo.get("min_segment_size", 1)) if slo else 1),
        )
        self._info = info
        self._max_meta_count = int(sw.get("max_meta_count", 90))
        self._max_meta_overall = overall

    def _meta_headers(self, metadata: dict[str, str]) -> dict[str, str]:
        headers = encode_metadata(metadata, self._max_meta_value)
        size = sum(len(k) - len("X-Object-Meta-") + len(v.encode()) for k, v in headers.items())
        if size > self._max_meta_overall or len(headers) > self._max_meta_count:
            raise MetadataTooLarge(f"swift: {len(headers)} metadata items of {size} bytes exceed the "
                                   "cluster's limits (see /info)")
        return headers

    # ------------------------------------------------------------------ objects
    def _head_raw(self, key: str) -> dict[str, str] | None:
        """Lower-case response headers of HEAD ``key``, or None if there is no such object."""
        resp = self._request("HEAD", self._obj(key), ok=(404,))
        if resp.status == 404:
            return None
        return {k.lower(): v for k, v in resp.getheaders()}

    def _info_from_headers(self, key: str, headers: dict[str, str]) -> ObjectInfo:
        stamp = headers.get("x-timestamp")
        try:
            mtime = float(stamp) if stamp else None
        except ValueError:
            mtime = None
        size = 0 if key.endswith("/") else int(headers.get("content-length", 0) or 0)
        return ObjectInfo(key, size, _etag(headers.get("etag")), mtime, decode_metadata(headers))

    def _check_bucket(self) -> None:
        self._load_info()
        resp = self._request("HEAD", self._path(self.container), ok=(404,))
        if resp.status == 404:
            raise BucketNotFound(f"container swift://{self.container} does not exist")

    def _list_page(self, prefix: str, delimiter: str | None, token: str | None, limit: int) -> ListPage:
        limit = max(1, min(limit, int(self._info_limit())))
        query = [("format", "json"), ("limit", str(limit))]
        if prefix:
            query.append(("prefix", prefix))
        if delimiter:
            query.append(("delimiter", delimiter))
        if token:
            query.append(("marker", token))
        resp = self._request("GET", self._path(self.container), query=_query(query), ok=(404,))
        if resp.status == 404:
            raise BucketNotFound(f"container swift://{self.container} does not exist")
        items = json.loads(resp.body or b"[]")
        page = ListPage()
        prefixes: set[str] = set()
        objects: dict[str, ObjectInfo] = {}
        for item in items:
            if "subdir" in item:
                prefixes.add(item["subdir"])
                continue
            name = item["name"]
            if item.get("content_type", "").split(";")[0] == DIRECTORY_TYPE and not name.endswith("/"):
                if delimiter:
                    prefixes.add(name + "/")  # an old-style folder object: its children's prefix
                    continue
                name += "/"
            objects.setdefault(name, self._info_from_listing(name, item))
        page.objects = [objects[k] for k in sorted(objects)]
        page.prefixes = sorted(prefixes)
        if len(items) >= limit:
            last = items[-1]
            page.next_token = last.get("subdir") or last["name"]
        return page

    def _info_limit(self) -> int:
        return int((self._info or {}).get("swift", {}).get("container_listing_limit", 10_000))

    @staticmethod
    def _info_from_listing(name: str, item: dict[str, Any]) -> ObjectInfo:
        mtime = None
        modified = item.get("last_modified")
        if modified:
            import datetime

            with contextlib.suppress(ValueError):
                mtime = datetime.datetime.fromisoformat(modified).replace(tzinfo=datetime.UTC).timestamp()
        size = 0 if name.endswith("/") else int(item.get("bytes", 0))
        return ObjectInfo(name, size, _etag(item.get("slo_etag") or item.get("hash")), mtime, None)

    def _marker_headers(self, key: str) -> tuple[str, dict[str, str]]:
        """The object holding marker ``key`` (``x/``, else an ``application/directory`` ``x``)."""
        headers = self._head_raw(key)
        if headers is not None:
            return key, headers
        headers = self._head_raw(key[:-1]) if len(key) > 1 else None
        if headers is not None and headers.get("content-type", "").split(";")[0] == DIRECTORY_TYPE:
            return key[:-1], headers
        raise NotFound(f"{key}: no such object")

    def _head(self, key: str) -> ObjectInfo:
        if key.endswith("/"):
            _, marker = self._marker_headers(key)
            return self._info_from_headers(key, marker)
        headers = self._head_raw(key)
        if headers is None or (headers.get("content-type", "").split(";")[0] == DIRECTORY_TYPE
                               and int(headers.get("content-length", 0) or 0) == 0):
            raise NotFound(f"{key}: no such object")
        return self._info_from_headers(key, headers)

    def _get_into(self, key: str, start: int, length: int | None, out: BinaryIO,
                  if_match: str | None) -> None:
        if key.endswith("/"):
            self._marker_headers(key)
            return
        headers: dict[str, str] = {}
        if start or length is not None:
            headers["Range"] = f"bytes={start}-" + ("" if length is None else str(start + length - 1))
        if if_match:
            headers["If-Match"] = f'"{_etag(if_match)}"'
        try:
            resp = self._request("GET", self._obj(key), headers=headers, ok=(416,), stream=True)
        except NotFound:
            if if_match:
                raise PreconditionFailed(f"{key}: object is gone") from None
            raise
        if resp.status == 416:
            return  # at or past the end: nothing to read
        try:
            for chunk in resp.iter_content(READ_CHUNK):
                out.write(chunk)
        finally:
            resp.close()

    def _put(self, key: str, payload: Payload, metadata: dict[str, str], if_match: str | None,
             if_none_match: bool) -> str:
        headers = self._meta_headers(metadata)
        headers["Content-Type"] = self.content_type(key)
        if if_none_match:
            headers["If-None-Match"] = "*"
        old: list[str] = []
        record: str | None = None
        if not key.endswith("/"):
            current = self._head_raw(key)
            if if_match and (current is None or _etag(current.get("etag")) != _etag(if_match)):
                raise PreconditionFailed(f"{key}: changed since it was read")
            if current is not None and not if_none_match:
                old = self._segments_of(key, current)
            if old:
                record = self._journal({"key": key, "segments": old})
        headers["Content-Length"] = str(payload.size)
        with _body(payload) as body:
            resp = self._request("PUT", self._obj(key), headers=headers, body=body)
        if record is not None:
            self._clean_up(record, committed=True)
        return _etag(resp.getheader("etag")) or ""

    def _set_metadata(self, key: str, metadata: dict[str, str]) -> str:
        if key.endswith("/"):
            key, _ = self._marker_headers(key)
        headers = self._meta_headers(metadata)
        self._request("POST", self._obj(key), headers=headers)  # replaces all X-Object-Meta-*
        current = self._head_raw(key)
        if current is None:
            raise NotFound(f"{key}: no such object")
        return _etag(current.get("etag")) or ""

    def _copy(self, src: str, dst: str, metadata: dict[str, str] | None) -> str:
        if src == dst and metadata is not None:
            return self._set_metadata(src, metadata)
        if src.endswith("/"):
            _, marker = self._marker_headers(src)
            meta = decode_metadata(marker) if metadata is None else metadata
            return self._put(dst, Payload.from_bytes(b""), meta, None, False)
        headers = self._head_raw(src)
        if headers is None:
            raise NotFound(f"{src}: no such object")
        if _is_slo(headers):
            # A large object is renamed by copying its manifest: the segments are shared.
            # Kept metadata keeps the type; new metadata (a rename) gets the new name's.
            manifest = self._manifest(src)
            if metadata is None:
                return self._put_manifest(dst, manifest, decode_metadata(headers),
                                          headers.get("content-type"))
            return self._put_manifest(dst, manifest, metadata, None)
        hdrs = {"X-Copy-From": self._path(self.container, src), "Content-Length": "0"}
        if metadata is not None:
            hdrs.update(self._meta_headers(metadata))
            hdrs["X-Fresh-Metadata"] = "true"
            hdrs["Content-Type"] = self.content_type(dst)  # else the copy keeps the source's
        resp = self._request("PUT", self._obj(dst), headers=hdrs)
        return _etag(resp.getheader("etag")) or ""

    def _delete(self, key: str) -> None:
        """Delete ``key`` and, if it is a large object, its segments (after the manifest goes)."""
        if key.endswith("/"):
            self._request("DELETE", self._obj(key), ok=(404,))
            old = self._head_raw(key[:-1]) if len(key) > 1 else None
            if old is not None and old.get("content-type", "").split(";")[0] == DIRECTORY_TYPE:
                self._request("DELETE", self._obj(key[:-1]), ok=(404,))
            return
        current = self._head_raw(key)
        if current is None:
            return
        segments = self._segments_of(key, current)
        record = self._journal({"key": key, "segments": segments}) if segments else None
        self._request("DELETE", self._obj(key), ok=(404,))
        if record is not None:
            self._clean_up(record, committed=True)

    def _delete_after_move(self, key: str) -> None:
        # The manifest only: the copy references the same segments.
        self._request("DELETE", self._obj(key), ok=(404,))

    def _delete_many(self, keys: list[str]) -> None:
        """Delete the objects (manifests only: see the module doc), in bulk where offered."""
        self._remove(self.container, keys)

    def _remove(self, container: str, names: list[str]) -> None:
        if not names:
            return
        info = self._load_info()
        bulk = info.get("bulk_delete")
        if bulk and len(names) > 1:
            step = int(bulk.get("max_deletes_per_request", 10_000))
            for i in range(0, len(names), step):
                self._bulk_delete(container, names[i:i + step])
            return
        if len(names) == 1:
            self._delete_one(container, names[0])
            return
        with ThreadPoolExecutor(min(DELETE_WORKERS, len(names))) as pool:
            for fut in [pool.submit(self._guard, self._delete_one, container, n) for n in names]:
                fut.result()

    def _delete_one(self, container: str, name: str) -> None:
        self._request("DELETE", self._path(container, name), ok=(404,))

    def _bulk_delete(self, container: str, names: list[str]) -> None:
        body = "\n".join(self._path(container, n) for n in names).encode()
        # The bulk-delete request goes to the account itself: POST /v1/AUTH_x?bulk-delete.
        resp = self._request("POST", "", query="bulk-delete",
                             headers={"Accept": "application/json", "Content-Type": "text/plain"},
                             body=body)
        result = json.loads(resp.body or b"{}")
        status = str(result.get("Response Status", "200"))
        if not status.startswith("2"):
            errors = result.get("Errors") or []
            code = int(status.split()[0]) if status.split()[0].isdigit() else None
            # 404s are "Number Not Found", not errors: anything left failed for real.
            raise error_for_status(code, f"swift: bulk delete failed for {len(errors)} object(s) ({status})")

    # ------------------------------------------------------------------ large objects
    def _manifest(self, key: str) -> list[dict[str, Any]]:
        """The SLO manifest of ``key`` in PUT form (path, etag, size_bytes, range)."""
        resp = self._request("GET", self._obj(key), query="multipart-manifest=get&format=raw")
        entries = json.loads(resp.body)
        return entries

    def _segments_of(self, key: str, headers: dict[str, str]) -> list[str]:
        """``container/name`` of each segment of the large object ``key`` (none for a plain one)."""
        if _is_slo(headers):
            try:
                entries = self._manifest(key)
            except NotFound:
                return []
            return [e["path"].lstrip("/") for e in entries if "path" in e]
        dlo = headers.get("x-object-manifest")
        if dlo:
            from urllib.parse import unquote

            container, _, prefix = unquote(dlo).partition("/")
            return [f"{container}/{name}" for name in self._names(container, prefix)]
        return []

    def _names(self, container: str, prefix: str) -> Iterator[str]:
        marker = ""
        while True:
            query = [("format", "json"), ("prefix", prefix)] + ([("marker", marker)] if marker else [])
            resp = self._request("GET", self._path(container), query=_query(query), ok=(404,))
            if resp.status == 404:
                return
            items = json.loads(resp.body or b"[]")
            if not items:
                return
            for item in items:
                yield item["name"]
            marker = items[-1]["name"]

    def _ensure_segments_container(self) -> None:
        if not self._segments_ready:
            self._request("PUT", self._path(self.segments))
            self._segments_ready = True

    def _segment_prefix(self, key: str, upload_id: str) -> str:
        if not upload_id.isalnum():
            raise InvalidName("bad upload id")
        return f"{key}/{SEGMENT_TAG}/{upload_id}/"

    def _mpu_create(self, key: str, metadata: dict[str, str]) -> str:
        self._meta_headers(metadata)  # refuse bad metadata before any data is sent
        self._load_info()
        self._ensure_segments_container()
        upload_id = uuid.uuid4().hex
        record = self._journal({"key": key, "upload": upload_id, "segments": []}, upload_id)
        with self._lock:
            self._uploads[upload_id] = {"key": key, "metadata": dict(metadata), "sizes": {},
                                        "record": record}
        return upload_id

    def _upload(self, key: str, upload_id: str) -> dict[str, Any]:
        with self._lock:
            state = self._uploads.get(upload_id)
        if state is None or state["key"] != key:
            raise NotFound(f"{key}: no such multipart upload")
        return state

    def _mpu_part(self, key: str, upload_id: str, number: int, payload: Payload) -> str:
        state = self._upload(key, upload_id)
        if not 1 <= number <= self.capabilities.max_parts:
            raise InvalidName(f"part number {number} out of range 1..{self.capabilities.max_parts}")
        name = f"{self._segment_prefix(key, upload_id)}{number:08d}"
        with _body(payload) as body:
            resp = self._request("PUT", self._path(self.segments, name), body=body,
                                 headers={"Content-Length": str(payload.size),
                                          "Content-Type": "application/octet-stream"})
        with self._lock:
            state["sizes"][number] = payload.size
        return _etag(resp.getheader("etag")) or ""

    def _mpu_complete(self, key: str, upload_id: str, parts: list[PartInfo]) -> str:
        state = self._upload(key, upload_id)
        prefix = self._segment_prefix(key, upload_id)
        entries = [{"path": f"/{self.segments}/{prefix}{p.number:08d}", "etag": p.etag,
                    "size_bytes": state["sizes"].get(p.number)} for p in parts]
        current = self._head_raw(key)
        old = self._segments_of(key, current) if current is not None else []
        record = state["record"]
        if old:  # journaled before the manifest replaces them
            self._journal({"key": key, "upload": upload_id, "segments": old}, upload_id)
        if not entries:
            etag = self._put(key, Payload.from_bytes(b""), state["metadata"], None, False)
        elif self._load_info().get("slo") is not None:
            etag = self._put_manifest(key, entries, state["metadata"], self.content_type(key))
        else:
            headers = self._meta_headers(state["metadata"])
            headers.update({"X-Object-Manifest": quote(f"{self.segments}/{prefix}"), "Content-Length": "0",
                            "Content-Type": self.content_type(key)})
            self._request("PUT", self._obj(key), headers=headers)
            info = self._head_raw(key) or {}
            etag = _etag(info.get("etag")) or ""
        with self._lock:
            self._uploads.pop(upload_id, None)
        self._clean_up(record, committed=True)
        return etag

    def _put_manifest(self, key: str, entries: list[dict[str, Any]], metadata: dict[str, str],
                      content_type: str | None) -> str:
        body = json.dumps(entries).encode()
        headers = self._meta_headers(metadata)
        headers.update({"Content-Type": content_type or self.content_type(key),
                        "Content-Length": str(len(body))})
        self._request("PUT", self._obj(key), query="multipart-manifest=put&heartbeat=off", headers=headers,
                      body=body)
        # The PUT answers with the manifest's own ETag; HEAD, GET and listings use the SLO ETag.
        info = self._head_raw(key) or {}
        return _etag(info.get("etag")) or ""

    def _mpu_resume(self, key: str, upload_id: str, metadata: dict[str, str]) -> None:
        # Segments are named after the upload id and its journal record after the upload id
        # (see _mpu_create); sizes of earlier segments are left to the SLO's check (null).
        record = self._record_path(upload_id)
        with self._lock:
            self._uploads.setdefault(upload_id, {"key": key, "metadata": dict(metadata), "sizes": {},
                                                 "record": record})

    def _mpu_abort(self, key: str, upload_id: str) -> None:
        with self._lock:
            state = self._uploads.pop(upload_id, None)
        # The object now at the key decides what is garbage: the manifest PUT may have been
        # committed even though its reply was lost.
        record = state["record"] if state else self._record_path(upload_id)
        self._clean_up(record)

    # ------------------------------------------------------------------ the segment journal
    def _record_path(self, name: str) -> str:
        return os.path.join(self._journal_dir or "", f"{name}.json")

    def _journal(self, record: dict[str, Any], name: str | None = None) -> str:
        """Persist ``record`` (fsynced, atomically replaced) and return its handle."""
        path = self._record_path(name or uuid.uuid4().hex)
        record = {**record, "container": self.container, "segments_container": self.segments}
        if self._journal_dir is None:
            with self._lock:
                self._memory_journal[path] = record
            return path
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    @property
    def _memory_journal(self) -> dict[str, dict[str, Any]]:
        # Without a state directory (the backend used outside a mount) records live in memory.
        if not hasattr(self, "_mem_records"):
            self._mem_records: dict[str, dict[str, Any]] = {}
        return self._mem_records

    def _read_record(self, path: str) -> dict[str, Any] | None:
        if self._journal_dir is None:
            with self._lock:
                return self._memory_journal.get(path)
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("swift: unreadable segment journal record %s; removing it", path)
            return {}

    def _forget(self, path: str) -> None:
        if self._journal_dir is None:
            with self._lock:
                self._memory_journal.pop(path, None)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def _clean_up(self, path: str, committed: bool = False) -> None:
        """Delete the segments of journal record ``path`` that the object now at its key does
        not reference, then forget the record.

        ``committed``: the caller just committed the new object, so the upload's own segments
        are in use and every other journaled one is garbage (saves a HEAD and a listing).
        """
        record = self._read_record(path)
        if not record:
            self._forget(path)
            return
        key = record.get("key", "")
        candidates = set(record.get("segments") or [])
        upload = record.get("upload")
        segments = record.get("segments_container", self.segments)
        if upload and not committed:
            prefix = self._segment_prefix(key, upload)
            candidates.update(f"{segments}/{n}" for n in self._names(segments, prefix))
        if not committed:
            current = self._head_raw(key)
            candidates -= set(self._segments_of(key, current) if current is not None else [])
        by_container: dict[str, list[str]] = {}
        for full in sorted(candidates):
            container, _, name = full.partition("/")
            by_container.setdefault(container, []).append(name)
        for container, names in by_container.items():
            self._remove(container, names)
        self._forget(path)

    def _recover(self, resumed: set[str]) -> None:
        """At mount: delete the orphan segments the journal lists, but those of uploads the
        cache resumes (their records are named after the upload id)."""
        if self._journal_dir is None:
            return
        for entry in sorted(os.listdir(self._journal_dir)):
            if not entry.endswith(".json") or entry[:-5] in resumed:
                continue
            path = os.path.join(self._journal_dir, entry)
            log.info("swift: cleaning up segments journaled before a crash (%s)", entry)
            self._clean_up(path)


@contextlib.contextmanager
def _body(payload: Payload) -> Iterator[Any]:
    """The request body for ``payload``: requests sends an empty file chunked, so b"" instead."""
    if payload.size == 0:
        yield b""
        return
    with payload.open() as f:
        yield f


def _query(pairs: list[tuple[str, str]]) -> str:
    return "&".join(f"{k}={quote(v, safe='')}" for k, v in pairs)
