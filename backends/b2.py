"""Backblaze B2: ``b2://BUCKET[/prefix]`` over b2sdk, on B2's native API (not the S3-compatible one).

A bucket written by the ``b2`` CLI, rclone or the web UI mounts as files and folders, and
what cloudfs writes reads back with them.

Credentials follow B2's conventions: ``B2_APPLICATION_KEY_ID`` / ``B2_APPLICATION_KEY``, or
else the b2 CLI's account-info file (``B2_ACCOUNT_INFO``, ``~/.b2_account_info`` or
``$XDG_CONFIG_HOME/b2/account_info``, as b2sdk finds it; it is only read).  Keys restricted
to a bucket or a name prefix work; a key used on another bucket or outside its prefix, or
lacking a capability, fails with a message that says which.  ``-o endpoint=URL`` sets the
realm (its authorization URL, or a b2sdk realm name such as ``production``).  The key never
appears in a URL, a log line or an error.  With a state directory (the daemon's
``use_state_dir``), the session -- account id, API and download URLs, the authorization
token, the bucket id, but not the key -- is kept in ``b2_account.json`` there, mode 0600,
so a remount does not authorize again; an expired token is renewed as any other.

Mapping onto the cloudfs interface:

* ``ObjectInfo.etag`` is the B2 *file id* of the version, unique per upload.  B2 has no
  conditional writes: ``if_match`` / ``if_none_match`` are checked with a lookup just before
  the upload (another writer in between is not caught).  Downloads check ``if_match``
  against the version the server sent (``X-Bz-File-Id``).
* Metadata is the version's ``fileInfo``.  cloudfs's s3fs-style keys (``mode``, ``uid``,
  ``gid``, ``mtime``, ...) go there as they are, plus ``src_last_modified_millis`` (the
  mtime in milliseconds), which the b2 CLI and rclone write and read.  When ``mtime`` is
  present the derived ``src_last_modified_millis`` is not handed back (it is written again).
* Folders: a listing uses ``b2_list_file_names`` with ``prefix`` and ``delimiter``.  The
  marker of folder ``x/`` is written as the empty file ``x/.bzEmpty``, as B2's web UI
  creates folders (B2 file names may not end in ``/``); a ``x/`` written by other tools is
  read as the marker too.  A file named ``.bzEmpty`` is refused (EINVAL).
* Names: UTF-8, at most 1024 bytes, each ``/``-separated part at most 250 bytes
  (ENAMETOOLONG), no control characters or DEL (EINVAL).
* Versions: deleting hides the name (``b2_hide_file``), as the b2 CLI and rclone do, so the
  bucket's lifecycle rules keep or expire the history; ``-o b2_hard_delete`` deletes every
  version of the name instead.  Hidden files never appear.  A metadata change (``chmod``)
  is a server-side copy onto the same name: a new version.
* Uploads: a small file is ``b2_upload_file`` on an upload URL from a pool; multipart is
  B2's large file (``b2_start_large_file``, parallel ``b2_upload_part`` with the parts'
  SHA1s, ``b2_finish_large_file``, ``b2_cancel_large_file``); part copies are
  ``b2_copy_part`` from the source version's file id.  A 503, a dropped connection or an
  expired upload token retires that upload URL, and the retry takes a new one at once
  (``Transient(backoff=False)``), as B2 asks and rclone#3465 learnt.
* Copies (rename, metadata) are ``b2_copy_file``; above 5 GB (B2's limit for it) they are
  a large file of ``b2_copy_part`` ranges.
* Retries: b2sdk's own retry loop is switched off (one attempt per request); the base
  class retries, honours ``Retry-After`` on 429/503, and re-authorizes once on an expired
  token.  Storage, transaction and bandwidth caps are ``QuotaExceeded`` (EDQUOT).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from .base import (
    TLS_OPTIONS,
    Backend,
    Capabilities,
    ListPage,
    ObjectInfo,
    PartInfo,
    Payload,
    requests_adapter,
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

MB = 1000 * 1000
MARKER = ".bzEmpty"
MTIME_MILLIS = "src_last_modified_millis"
LARGE_FILE_SHA1 = "large_file_sha1"
STATE_FILE = "b2_account.json"
CHUNK = 1024 * 1024
_BUCKET_RE = re.compile(r"[A-Za-z0-9-]{6,50}")
_EPOCH_RE = re.compile(r"(-?[0-9]{1,12})(?:\.([0-9]*))?")
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class _Session:
    """What b2_authorize_account gave, plus the bucket's id."""

    account_id: str
    token: str
    api_url: str
    download_url: str
    bucket_id: str
    allowed: dict[str, Any]


def _one_try_http() -> Any:
    """b2sdk's HTTP layer with its retry loop removed: the base class retries, once."""
    from b2sdk.v2 import B2Http

    class OneTry(B2Http):
        @classmethod
        def _translate_and_retry(cls, fcn: Any, try_count: int, post_params: Any = None) -> Any:
            return cls._translate_errors(fcn, post_params)

    return OneTry()


def credentials_from_environment(env: dict[str, str] | os._Environ[str] | None = None
                                 ) -> tuple[str, str, str | None]:
    """(key id, key, realm or None) by B2's conventions: the environment, else the b2 CLI's file."""
    env = os.environ if env is None else env
    key_id, key = env.get("B2_APPLICATION_KEY_ID", "").strip(), env.get("B2_APPLICATION_KEY", "").strip()
    if key_id and key:
        return key_id, key, None
    if key_id or key:
        raise AuthenticationFailed("b2: set both B2_APPLICATION_KEY_ID and B2_APPLICATION_KEY")
    from b2sdk.v2 import SqliteAccountInfo

    path = SqliteAccountInfo.get_user_account_info_path()
    if not os.path.exists(os.path.expanduser(path)):
        raise AuthenticationFailed("b2: no credentials: set B2_APPLICATION_KEY_ID and B2_APPLICATION_KEY, "
                                   "or run `b2 account authorize`")
    try:
        info = SqliteAccountInfo(file_name=os.path.expanduser(path))
        return info.get_application_key_id(), info.get_application_key(), info.get_realm()
    except Exception as exc:  # a damaged or foreign file: say where, not what it holds
        raise AuthenticationFailed(f"b2: cannot read the b2 CLI's account info {path} "
                                   f"({type(exc).__name__})") from None


def realm_url(realm: str | None) -> str:
    from b2sdk.v2 import REALM_URLS

    url = REALM_URLS.get(realm or "production", realm or "")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"b2: endpoint must be an http(s):// URL or one of {', '.join(REALM_URLS)}")
    if parts.username or parts.password or parts.query:
        raise ConfigError("b2: credentials do not belong in the endpoint URL")
    return url.rstrip("/")


def mtime_millis(text: str) -> str | None:
    """cloudfs's ``mtime`` (epoch seconds, floor-normalized fraction) as B2's milliseconds."""
    m = _EPOCH_RE.fullmatch(text.strip())
    if m is None:
        return None
    return str(int(m.group(1)) * 1000 + int(((m.group(2) or "") + "000")[:3]))


class B2Backend(Backend):
    scheme = "b2"
    capabilities = Capabilities(
        max_key_bytes=1024,
        # fileInfo travels in X-Bz-Info-* headers (7000 bytes for all, URL-encoded): leave room.
        max_metadata_bytes=2048,
        min_part_size=5 * MB,
        max_part_size=5 * 1000 * MB,
        max_parts=10_000,
        forbidden_chars="\x7f",
        listing_has_metadata=True,
        part_copy=True,
        conditional_writes=True,
        # B2 has no conditional upload: ``_put`` checks if_match / if_none_match with a lookup
        # first (atomic_conditional_put stays False: the uploader asks with a HEAD instead).
    )
    options = frozenset({"endpoint", "b2_hard_delete"}) | TLS_OPTIONS

    # Files larger than this are copied as a large file of parts (B2's b2_copy_file limit).
    max_single_copy: int = 5 * 1000 * MB
    copy_part_size: int = 100 * MB

    def __init__(self, bucket: str, prefix: str = "", *, key_id: str, key: str, realm: str | None = None,
                 hard_delete: bool = False, verify: bool | str = True, **kw: Any) -> None:
        super().__init__(bucket, prefix, **kw)
        from b2sdk.v2 import B2RawHTTPApi

        self.realm = realm_url(realm)
        self.custom_realm = realm is not None and realm != "production"
        self.hard_delete = hard_delete
        self._key_id = key_id
        self._key = key
        self._http = _one_try_http()
        adapter = requests_adapter(max(int(self.limiter.total_tokens), 10) + 4, verify)
        for scheme in ("https://", "http://"):
            self._http.session.mount(scheme, adapter)
        self._raw = B2RawHTTPApi(self._http)
        self._lock = threading.Lock()  # guards _session, the upload URL pools and the state file
        self._session: _Session | None = None
        self._upload_urls: list[tuple[str, str]] = []
        self._part_urls: dict[str, list[tuple[str, str]]] = {}
        self._state_path: str | None = None

    @classmethod
    def from_url(cls, netloc: str, path: str, options: dict[str, str]) -> B2Backend:
        if not netloc:
            raise ConfigError("b2:// URL needs a bucket: b2://BUCKET[/prefix]")
        if not _BUCKET_RE.fullmatch(netloc):
            raise ConfigError(f"{netloc!r} is not a B2 bucket name (6 to 50 letters, digits and '-')")
        key_id, key, cli_realm = credentials_from_environment()
        hard = options.get("b2_hard_delete")
        return cls(netloc, path.strip("/"), key_id=key_id, key=key,
                   realm=options.get("endpoint") or cli_realm,
                   hard_delete=hard is not None and hard.lower() not in ("0", "false", "no", "off"),
                   verify=tls_verify(options))

    def describe(self) -> str:
        name = f"b2://{self.bucket}/{self.prefix}"
        if self.custom_realm:
            name += f" at {urlsplit(self.realm).netloc}"
        return name

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._http.session.close()

    # ------------------------------------------------------------------ session
    def use_state_dir(self, path: str) -> None:
        self._state_path = os.path.join(path, STATE_FILE)
        try:
            with open(self._state_path) as f:
                state = json.load(f)
        except (OSError, ValueError):
            return
        if (state.get("realm"), state.get("key"), state.get("bucket"), state.get("prefix")) == (
                self.realm, self._fingerprint(), self.bucket, self.prefix):
            with contextlib.suppress(KeyError, TypeError):
                self._session = _Session(**state["session"])

    def _fingerprint(self) -> str:
        # Which key the saved session belongs to, without saving the key.
        return hashlib.sha256(f"{self._key_id}\0{self._key}".encode()).hexdigest()

    def _save_state(self, session: _Session) -> None:
        if self._state_path is None:
            return
        state = {"realm": self.realm, "key": self._fingerprint(), "bucket": self.bucket,
                 "prefix": self.prefix, "session": session.__dict__}
        tmp = self._state_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self._state_path)

    def _current(self) -> _Session:
        with self._lock:
            if self._session is None:
                self._session = self._authorize()
            return self._session

    def _reauthorize(self) -> None:
        with self._lock:
            self._session = self._authorize()

    def _authorize(self) -> _Session:
        """b2_authorize_account, then the bucket's id (the caller holds _lock)."""
        from b2sdk.v2 import exception as b2exc

        self._upload_urls.clear()
        self._part_urls.clear()
        try:
            resp = self._raw.authorize_account(self.realm, self._key_id, self._key)
        except b2exc.Unauthorized:
            raise AuthenticationFailed("b2: the application key was refused (check B2_APPLICATION_KEY_ID "
                                       "and B2_APPLICATION_KEY)") from None
        storage = resp.get("apiInfo", {}).get("storageApi", resp)
        allowed = {"bucketId": storage.get("bucketId"), "bucketName": storage.get("bucketName"),
                   "capabilities": list(storage.get("capabilities") or []),
                   "namePrefix": storage.get("namePrefix")}
        token = resp["authorizationToken"]
        if allowed["bucketName"] and allowed["bucketName"] != self.bucket:
            raise PermissionDenied(f"b2: the application key is restricted to bucket "
                                   f"{allowed['bucketName']!r}, not {self.bucket!r}")
        prefix = allowed["namePrefix"]
        if prefix and not self.prefix.startswith(prefix):
            raise PermissionDenied(f"b2: the application key is restricted to names starting with "
                                   f"{prefix!r}; mount b2://{self.bucket}/{prefix.rstrip('/')}")
        missing = [c for c in ("listFiles", "readFiles") if c not in allowed["capabilities"]]
        if missing:
            raise PermissionDenied(f"b2: the application key lacks the {' and '.join(missing)} "
                                   "capability, needed to mount a bucket")
        for cap in ("writeFiles", "deleteFiles"):
            if cap not in allowed["capabilities"]:
                log.warning("b2: the application key lacks the %s capability: writes will fail", cap)
        bucket_id = allowed["bucketId"] if allowed["bucketName"] == self.bucket else None
        if bucket_id is None:
            try:
                found = self._raw.list_buckets(storage["apiUrl"], token, resp["accountId"],
                                               bucket_name=self.bucket)["buckets"]
            except b2exc.InvalidAuthToken:
                raise AuthenticationFailed("b2: the fresh authorization token was refused") from None
            except b2exc.Unauthorized:
                raise PermissionDenied("b2: the application key lacks the listBuckets capability "
                                       "(needed to find the bucket)") from None
            if not found:
                raise BucketNotFound(f"b2: bucket {self.bucket!r} does not exist")
            bucket_id = found[0]["bucketId"]
        session = _Session(resp["accountId"], token, storage["apiUrl"], storage["downloadUrl"], bucket_id,
                           allowed)
        self._save_state(session)
        return session

    # ------------------------------------------------------------------ errors
    def _rpc(self, capability: str, method: str, *args: Any, **kw: Any) -> Any:
        """One B2 API call with the account token; says which capability a refusal was about."""
        from b2sdk.v2 import exception as b2exc

        s = self._current()
        try:
            if method.startswith("b2_"):  # an endpoint b2sdk has no method for, by name
                return self._raw._post_json(s.api_url, method, s.token, **kw)
            return getattr(self._raw, method)(s.api_url, s.token, *args, **kw)
        except b2exc.InvalidAuthToken:
            raise TokenExpired("b2: the authorization token expired") from None
        except b2exc.Unauthorized:
            raise PermissionDenied(f"b2://{self.bucket}: the application key lacks the {capability} "
                                   "capability (or is restricted to other names)") from None

    def _translate(self, exc: Exception) -> BackendError | None:
        import requests
        from b2sdk.v2 import exception as b2exc

        where = f"b2://{self.bucket}"
        if isinstance(exc, b2exc.InvalidAuthToken):
            return TokenExpired(f"{where}: the authorization token expired")
        if isinstance(exc, b2exc.StorageCapExceeded | b2exc.TransactionCapExceeded | b2exc.CapExceeded):
            return QuotaExceeded(f"{where}: {exc} (raise the caps in the B2 account's settings)")
        if isinstance(exc, b2exc.UnknownError) and "cap_exceeded" in str(exc):
            return QuotaExceeded(f"{where}: a B2 cap (storage, transactions or bandwidth) is exceeded; "
                                 "raise it in the account's settings")
        if isinstance(exc, b2exc.Unauthorized | b2exc.AccessDenied):
            return PermissionDenied(f"{where}: access denied ({type(exc).__name__})")
        if isinstance(exc, b2exc.NonExistentBucket | b2exc.BucketIdNotFound):
            return BucketNotFound(f"{where}: no such bucket")
        if isinstance(exc, b2exc.FileNotPresent):
            return NotFound(f"{where}: no such file")
        if isinstance(exc, b2exc.UnusableFileName):
            return InvalidName(f"{where}: B2 cannot store this name ({exc})")
        if isinstance(exc, b2exc.TooManyRequests | b2exc.ServiceError):
            return Transient(f"{where}: B2 is busy ({type(exc).__name__})",
                             retry_after({"Retry-After": exc.retry_after_seconds}))
        if isinstance(exc, b2exc.ChecksumMismatch | b2exc.PartSha1Mismatch | b2exc.FileSha1Mismatch):
            return Transient(f"{where}: checksum mismatch in transfer")
        if isinstance(exc, b2exc.B2ConnectionError | b2exc.B2RequestTimeout | b2exc.ConnectionReset
                      | b2exc.BrokenPipe | b2exc.UnknownHost | b2exc.RequestTimeout):
            return Transient(f"{where}: connection to {urlsplit(self.realm).netloc} failed "
                             f"({type(exc).__name__})")
        if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout
                      | requests.exceptions.ChunkedEncodingError | ConnectionError | TimeoutError):
            return Transient(f"{where}: connection failed ({type(exc).__name__})")
        if isinstance(exc, b2exc.Conflict):
            return error_for_status(409, f"{where}: conflict")
        if isinstance(exc, b2exc.B2Error):
            return BackendError(f"{where}: B2 error ({type(exc).__name__}: {exc})")
        return None

    # ------------------------------------------------------------------ names and metadata
    def _name(self, key: str) -> str:
        """The B2 file name for a key: a folder marker ``x/`` is the file ``x/.bzEmpty``."""
        return key + MARKER if key.endswith("/") else key

    def _key_of(self, name: str) -> str | None:
        """The key for a listed B2 name; None for names the mount does not show."""
        if name == MARKER or name.endswith("/" + MARKER):
            key = name[: -len(MARKER)]
            return key if key and key != self.prefix else None
        return name if name != self.prefix else None

    def validate_key(self, key: str) -> None:
        super().validate_key(key)
        full = self._name(self.full_key(key))
        if len(full.encode()) > self.capabilities.max_key_bytes:
            raise NameTooLong(f"B2 file names are at most {self.capabilities.max_key_bytes} bytes")
        if _BAD_CHARS.search(full):
            raise InvalidName("B2 file names cannot hold control characters or DEL")
        parts = full.split("/")
        if any(len(p.encode()) > 250 for p in parts):
            raise NameTooLong("B2 allows at most 250 bytes between two '/'")
        if "" in parts[:-1] or full.startswith("/"):
            raise InvalidName("B2 file names cannot hold an empty part ('//' or a leading '/')")
        if not key.endswith("/") and key.rsplit("/", 1)[-1] == MARKER:
            raise InvalidName(f"{MARKER} is the name of B2's folder markers")

    @staticmethod
    def _file_info(metadata: dict[str, str], new_content: bool = False) -> dict[str, str]:
        info = dict(metadata)
        if new_content:
            # The b2 CLI and rclone check a large file's whole SHA1 against this key: carried
            # over from an older version onto new content, it would fail their downloads.
            info.pop(LARGE_FILE_SHA1, None)
        millis = mtime_millis(metadata["mtime"]) if "mtime" in metadata else None
        if millis is not None:
            info[MTIME_MILLIS] = millis
        return info

    @staticmethod
    def _metadata(info: dict[str, Any] | None) -> dict[str, str]:
        meta = {str(k): str(v) for k, v in (info or {}).items()}
        if "mtime" in meta:
            meta.pop(MTIME_MILLIS, None)  # derived from mtime on every write
        return meta

    def _info(self, key: str, f: dict[str, Any]) -> ObjectInfo:
        marker = key.endswith("/")
        stamp = f.get("uploadTimestamp")
        return ObjectInfo(key, 0 if marker else int(f.get("contentLength") or 0), f.get("fileId"),
                          stamp / 1000 if stamp else None, self._metadata(f.get("fileInfo")))

    # ------------------------------------------------------------------ primitives
    def _check_bucket(self) -> None:
        s = self._current()
        self._list_names(self.prefix or None, None, None, 1)
        log.debug("b2: bucket %s is %s", self.bucket, s.bucket_id)

    def _list_names(self, prefix: str | None, delimiter: str | None, start: str | None,
                    limit: int) -> dict[str, Any]:
        params: dict[str, Any] = {"bucketId": self._current().bucket_id,
                                  "maxFileCount": max(1, min(limit, 10_000))}
        if prefix:
            params["prefix"] = prefix
        if delimiter:
            params["delimiter"] = delimiter
        if start:
            params["startFileName"] = start
        # b2sdk's raw list_file_names has no delimiter: the same request, with it.
        return self._rpc("listFiles", "b2_list_file_names", **params)

    def _list_page(self, prefix: str, delimiter: str | None, token: str | None, limit: int) -> ListPage:
        resp = self._list_names(prefix, delimiter, token, limit)
        page = ListPage()
        objects: dict[str, ObjectInfo] = {}
        for f in resp.get("files", []):
            name = f["fileName"]
            if f.get("action") == "folder":
                page.prefixes.append(name)
                continue
            if f.get("action") != "upload":
                continue
            key = self._key_of(name)
            if key is not None and key.startswith(prefix):
                objects.setdefault(key, self._info(key, f))
        page.objects = [objects[k] for k in sorted(objects)]
        page.next_token = resp.get("nextFileName") or None
        return page

    def _lookup(self, name: str) -> dict[str, Any] | None:
        """The current version of one file name, or None."""
        files = self._list_names(name, None, name, 1).get("files", [])
        if files and files[0]["fileName"] == name and files[0].get("action") == "upload":
            return files[0]
        return None

    def _find(self, key: str) -> dict[str, Any]:
        f = self._lookup(self._name(key))
        if f is None and key.endswith("/") and len(key) > 1:
            f = self._lookup(key)  # a folder marker written by other tools as "x/"
        if f is None:
            raise NotFound(f"b2://{self.bucket}/{key}: no such file")
        return f

    def _head(self, key: str) -> ObjectInfo:
        return self._info(key, self._find(key))

    def _get_into(self, key: str, start: int, length: int | None, out: BinaryIO,
                  if_match: str | None) -> None:
        from b2sdk.v2 import b2_url_encode
        from b2sdk.v2 import exception as b2exc

        if key.endswith("/"):
            self._find(key)
            return
        s = self._current()
        url = f"{s.download_url}/file/{b2_url_encode(self.bucket)}/{b2_url_encode(key)}"
        rng = None
        if length is not None:
            rng = (start, start + length - 1)
        elif start:
            rng = (start, start + 2**50)
        try:
            with self._raw.download_file_from_url(s.token, url, rng) as resp:
                if if_match and resp.headers.get("x-bz-file-id") != if_match:
                    raise PreconditionFailed(f"b2://{self.bucket}/{key}: changed since it was read")
                for chunk in resp.iter_content(CHUNK):
                    out.write(chunk)
        except b2exc.UnsatisfiableRange:
            # At or past the end: no bytes, like read(2) at EOF; the version must still match.
            if if_match and self._head(key).etag != if_match:
                raise PreconditionFailed(f"b2://{self.bucket}/{key}: changed since it was read") from None
        except b2exc.FileNotPresent:
            if if_match:
                raise PreconditionFailed(f"b2://{self.bucket}/{key}: gone since it was read") from None
            raise NotFound(f"b2://{self.bucket}/{key}: no such file") from None
        except b2exc.InvalidAuthToken:
            raise TokenExpired("b2: the authorization token expired") from None

    def _put(self, key: str, payload: Payload, metadata: dict[str, str], if_match: str | None,
             if_none_match: bool) -> str:
        name = self._name(key)
        if if_match or if_none_match:
            current = self._lookup(name)
            if if_none_match and current is not None:
                raise PreconditionFailed(f"b2://{self.bucket}/{key}: exists")
            if if_match and (current is None or current.get("fileId") != if_match):
                raise PreconditionFailed(f"b2://{self.bucket}/{key}: changed by someone else")
        sha1 = _sha1(payload)
        info = self._file_info(metadata, new_content=True)

        def send(url: str, token: str) -> Any:
            with payload.open() as body:
                return self._raw.upload_file(url, token, name, payload.size, self.content_type(key), sha1,
                                             info, body)

        return self._upload(self._upload_urls, lambda: self._rpc(
            "writeFiles", "get_upload_url", self._current().bucket_id), send)["fileId"]

    def _upload(self, pool: list[tuple[str, str]], fresh: Any, send: Any) -> Any:
        """Send on a pooled upload URL; a failing URL is retired and the retry takes another at once."""
        from b2sdk.v2 import exception as b2exc

        with self._lock:
            url_token = pool.pop() if pool else None
        if url_token is None:
            got = fresh()
            url_token = (got["uploadUrl"], got["authorizationToken"])
        try:
            result = send(*url_token)
        except (b2exc.ServiceError, b2exc.B2ConnectionError, b2exc.B2RequestTimeout, b2exc.ConnectionReset,
                b2exc.BrokenPipe, b2exc.InvalidAuthToken) as exc:
            raise Transient(f"b2://{self.bucket}: upload failed ({type(exc).__name__}); "
                            "retrying on a new upload URL", backoff=False) from None
        with self._lock:
            pool.append(url_token)
        return result

    def _copy(self, src: str, dst: str, metadata: dict[str, str] | None) -> str:
        from b2sdk.v2 import MetadataDirectiveMode
        from b2sdk.v2 import exception as b2exc

        f = self._find(src)
        if src.endswith("/") or dst.endswith("/"):
            meta = self._metadata(f.get("fileInfo")) if metadata is None else metadata
            return self._put(dst, Payload.from_bytes(b""), meta, None, False)
        if src == dst and metadata is None:
            return f["fileId"]
        size = int(f.get("contentLength") or 0)
        if size > self.max_single_copy:
            return self._large_copy(f, dst, metadata)
        kw: dict[str, Any] = {}
        if metadata is not None:
            kw = {"metadata_directive": MetadataDirectiveMode.REPLACE,
                  "content_type": self.content_type(dst), "file_info": self._file_info(metadata)}
        try:
            return self._rpc("writeFiles", "copy_file", f["fileId"], self._name(dst), **kw)["fileId"]
        except b2exc.BadRequest as exc:
            if getattr(exc, "code", None) != "source_too_large":
                raise
            return self._large_copy(f, dst, metadata)

    def _large_copy(self, f: dict[str, Any], dst: str, metadata: dict[str, str] | None) -> str:
        size = int(f.get("contentLength") or 0)
        meta = self._metadata(f.get("fileInfo")) if metadata is None else metadata
        part = self.part_size_for(size, self.copy_part_size)
        upload_id = self._mpu_create(dst, meta)
        try:
            parts = [PartInfo(n, self._mpu_part_copy(dst, upload_id, n, "", off, min(part, size - off),
                                                     f["fileId"]))
                     for n, off in enumerate(range(0, size, part), start=1)]
            return self._mpu_complete(dst, upload_id, parts)
        except BaseException:
            with contextlib.suppress(Exception):
                self._mpu_abort(dst, upload_id)
            raise

    def _delete(self, key: str) -> None:
        names = [self._name(key)]
        if key.endswith("/") and len(key) > 1:
            names.append(key)  # a marker other tools wrote as "x/"
        for name in names:
            if self.hard_delete:
                self._delete_versions(name)
            else:
                self._hide(name)

    def _hide(self, name: str) -> None:
        from b2sdk.v2 import exception as b2exc

        try:
            self._rpc("writeFiles", "hide_file", self._current().bucket_id, name)
        except (b2exc.FileNotPresent, b2exc.FileAlreadyHidden):
            pass  # nothing visible under that name: deletes are idempotent

    def _delete_versions(self, name: str) -> None:
        """Every version of one name, hide markers included (bounded by the listing's end)."""
        from b2sdk.v2 import exception as b2exc

        start_id: str | None = None
        while True:
            resp = self._rpc("listFiles", "list_file_versions", self._current().bucket_id, name, start_id,
                             1000, name)
            for f in resp.get("files", []):
                if f["fileName"] != name:
                    return
                with contextlib.suppress(b2exc.FileNotPresent):
                    self._rpc("deleteFiles", "delete_file_version", f["fileId"], name)
            start_id = resp.get("nextFileId")
            if resp.get("nextFileName") != name or not start_id:
                return

    # ------------------------------------------------------------------ large files
    def _mpu_create(self, key: str, metadata: dict[str, str]) -> str:
        resp = self._rpc("writeFiles", "start_large_file", self._current().bucket_id, self._name(key),
                         self.content_type(key), self._file_info(metadata, new_content=True))
        return resp["fileId"]

    def _mpu_part(self, key: str, upload_id: str, number: int, payload: Payload) -> str:
        if not 1 <= number <= self.capabilities.max_parts:
            raise InvalidName(f"part number {number} out of range 1..{self.capabilities.max_parts}")
        sha1 = _sha1(payload)
        with self._lock:
            pool = self._part_urls.setdefault(upload_id, [])

        def send(url: str, token: str) -> Any:
            with payload.open() as body:
                return self._raw.upload_part(url, token, number, payload.size, sha1, body)

        resp = self._upload(pool, lambda: self._rpc("writeFiles", "get_upload_part_url", upload_id), send)
        return resp["contentSha1"]

    def _mpu_part_copy(self, key: str, upload_id: str, number: int, src_key: str, start: int,
                       length: int, src_etag: str | None) -> str:
        from b2sdk.v2 import exception as b2exc

        source = src_etag or self._head(src_key).etag
        try:
            resp = self._rpc("writeFiles", "copy_part", source, upload_id, number,
                             (start, start + length - 1))
        except b2exc.FileNotPresent:
            raise PreconditionFailed(f"b2://{self.bucket}/{src_key}: the copied version is gone") from None
        return resp["contentSha1"]

    def _mpu_complete(self, key: str, upload_id: str, parts: list[PartInfo]) -> str:
        if [p.number for p in parts] != list(range(1, len(parts) + 1)):
            raise BackendError(f"b2://{self.bucket}/{key}: large file parts must be numbered 1..N")
        if not parts:
            self._mpu_abort(key, upload_id)
            return self._put(key, Payload.from_bytes(b""), self._metadata(None), None, False)
        resp = self._rpc("writeFiles", "finish_large_file", upload_id, [p.etag for p in parts])
        with self._lock:
            self._part_urls.pop(upload_id, None)
        return resp["fileId"]

    def _mpu_abort(self, key: str, upload_id: str) -> None:
        from b2sdk.v2 import exception as b2exc

        with self._lock:
            self._part_urls.pop(upload_id, None)
        with contextlib.suppress(b2exc.FileNotPresent):
            self._rpc("writeFiles", "cancel_large_file", upload_id)


def _sha1(payload: Payload) -> str:
    digest = hashlib.sha1()
    with payload.open() as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
