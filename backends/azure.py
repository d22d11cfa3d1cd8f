"""Azure Blob Storage backend: ``az://ACCOUNT/CONTAINER[/prefix]``, block blobs.

Credentials follow Azure's conventions, looked up in this order:

* ``AZURE_STORAGE_CONNECTION_STRING`` wins when set; its ``AccountName`` must be the URL's
  account.  It may carry ``AccountKey``, ``SharedAccessSignature`` and ``BlobEndpoint``
  (``UseDevelopmentStorage=true`` means Azurite's well-known account).
* ``AZURE_STORAGE_KEY`` (or ``AZURE_STORAGE_ACCOUNT_KEY``): the shared account key.
* ``AZURE_STORAGE_SAS_TOKEN``: a SAS token (with or without the leading ``?``).
* none of these: anonymous access (public containers only).

The blob endpoint is ``-o endpoint=URL``, else the connection string's ``BlobEndpoint``,
else ``AZURE_STORAGE_BLOB_ENDPOINT``, else ``https://ACCOUNT.blob.core.windows.net`` (the
connection string's ``EndpointSuffix``/``DefaultEndpointsProtocol`` apply).  Path-style
endpoints such as Azurite's ``http://127.0.0.1:10000/devstoreaccount1`` work.

Keys and SAS tokens are never logged and never appear in error messages: messages are
built from HTTP status codes and Azure error codes only, because the SDK's exception text
can contain request URLs with SAS query strings.

Directory markers.  The interface's marker for directory ``x`` is the key ``x/``.  It is
written as a zero-byte blob named ``x/`` carrying the metadata ``hdi_isfolder=true``.
Azure tools without a hierarchical namespace (blobfuse2, Storage Explorer) mark a folder
with a zero-byte blob named ``x`` (no slash) with ``hdi_isfolder=true``; such a blob is
presented as the marker ``x/``: it lists as the common prefix ``x/`` (merged with the real
prefix of its children, also across pages), as the object ``x/`` in flat listings, and
``head("x/")`` finds it, while ``head("x")`` reports it as missing.  ``hdi_isfolder`` is
hidden from a marker's metadata (it is added back on every write).  One thing is not
emulated: a listing of ``x/`` does not include a blobfuse2-style marker ``x`` itself (that
would cost an extra request on every directory listing).

Metadata.  Azure metadata names must be C# identifiers and are case-insensitive; names are
returned lowercased.  A name that is not an identifier (``content-type``, ``1x``, ``ü``) or
that already looks escaped is stored with every character other than ASCII letters and
digits escaped as ``_xHH_`` (UTF-8 bytes, lowercase hex, a leading digit too) and decoded
on read; identifiers such as ``mode``, ``hdi_isfolder`` and ``is_symlink`` are stored as
they are.  Values must be ASCII (cloudfs's own values always are).

Multipart uploads are staged blocks committed with ``commit_block_list``: the upload id
is random hex, and block ids are base64 of ``<upload id>-<part number:06d>`` (all the same
length, as Azure requires).  The metadata given at create is kept in memory until
completion; uncommitted blocks of an aborted upload expire on the server after 7 days.
Server-side part copy (Put Block From URL) is not offered: Azurite does not implement it,
so it could not be tested, and it needs a SAS for the source blob.

Names: Azure turns ``\\`` into ``/`` in blob names, so keys with a backslash are refused.
Deleting a blob also deletes its snapshots (otherwise the delete would fail for good).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import secrets
import threading
import time
from enum import Enum
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
    RetryPolicy,
    requests_adapter,
    tls_verify,
)
from .errors import (
    AlreadyExists,
    AuthenticationFailed,
    BackendError,
    BucketNotFound,
    ConfigError,
    InvalidName,
    NameTooLong,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    Transient,
    error_for_status,
    retry_after,
)

log = logging.getLogger(__name__)

MiB = 1024 * 1024
FOLDER_META = "hdi_isfolder"
DEV_ACCOUNT = "devstoreaccount1"
# Azurite's published development key (not a secret); used for UseDevelopmentStorage=true.
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
DEV_ENDPOINT = "http://127.0.0.1:10000/devstoreaccount1"
TOKEN_TAG = "cfs1:"  # marks a listing token wrapped with cloudfs state

_ACCOUNT_RE = re.compile(r"[a-z0-9]{1,24}\Z")
_CONTAINER_RE = re.compile(r"(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]\Z")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ESCAPED_RE = re.compile(r"(?:_x[0-9a-f]{2}_)+", re.IGNORECASE)
_NAME_CODES = {"InvalidResourceName", "InvalidUri", "InvalidBlobOrBlock", "OutOfRangeInput"}
_LONG_CODES = {"KeyTooLong", "BlobNameTooLong"}


# ---------------------------------------------------------------------- metadata names
def encode_meta_key(name: str) -> str:
    """A C#-identifier form of a metadata name, reversible by :func:`decode_meta_key`."""
    if not name:
        raise InvalidName("empty metadata name")
    if _IDENT_RE.match(name) and not _ESCAPED_RE.search(name):
        return name
    out = []
    for i, ch in enumerate(name):
        if ch.isascii() and ch.isalnum() and not (i == 0 and ch.isdigit()):
            out.append(ch)
        else:
            out.extend(f"_x{b:02x}_" for b in ch.encode())
    return "".join(out)


def decode_meta_key(name: str) -> str:
    def unescape(m: re.Match[str]) -> str:
        raw = bytes.fromhex("".join(re.findall(r"_x([0-9a-f]{2})_", m.group(0))))
        return raw.decode("utf-8", errors="replace")

    return _ESCAPED_RE.sub(unescape, name.lower())


def _is_folder(meta: dict[str, str] | None) -> bool:
    return any(k.lower() == FOLDER_META and str(v).lower() == "true" for k, v in (meta or {}).items())


# ---------------------------------------------------------------------- credentials
def parse_connection_string(text: str) -> dict[str, str]:
    """``Key=Value;...`` into a dict with lowercased keys (values may contain '=')."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError("AZURE_STORAGE_CONNECTION_STRING is malformed (expected Key=Value;...)")
        out[key.strip().lower()] = value.strip()
    if out.get("usedevelopmentstorage", "").lower() == "true":
        out.setdefault("accountname", DEV_ACCOUNT)
        out.setdefault("accountkey", DEV_KEY)
        out.setdefault("blobendpoint", DEV_ENDPOINT)
    return out


def resolve_credentials(account: str, endpoint: str | None,
                        env: dict[str, str] | os._Environ[str] | None = None) -> tuple[str, Any]:
    """(account URL, SDK credential) for ``account`` from the environment, by Azure's conventions."""
    env = os.environ if env is None else env
    credential: Any = None
    conn_endpoint: str | None = None
    protocol, suffix = "https", "core.windows.net"
    conn_text = env.get("AZURE_STORAGE_CONNECTION_STRING", "").strip()
    if conn_text:
        conn = parse_connection_string(conn_text)
        name = conn.get("accountname", "")
        if not name:
            raise ConfigError("AZURE_STORAGE_CONNECTION_STRING has no AccountName")
        if name != account:
            raise ConfigError(f"AZURE_STORAGE_CONNECTION_STRING is for account {name!r}, "
                              f"but the URL names account {account!r}")
        if conn.get("accountkey"):
            credential = {"account_name": account, "account_key": conn["accountkey"]}
        elif conn.get("sharedaccesssignature"):
            credential = conn["sharedaccesssignature"].lstrip("?")
        conn_endpoint = conn.get("blobendpoint") or None
        protocol = conn.get("defaultendpointsprotocol", protocol) or protocol
        suffix = conn.get("endpointsuffix", suffix) or suffix
    else:
        key = env.get("AZURE_STORAGE_KEY") or env.get("AZURE_STORAGE_ACCOUNT_KEY")
        sas = env.get("AZURE_STORAGE_SAS_TOKEN")
        if key:
            credential = {"account_name": account, "account_key": key.strip()}
        elif sas:
            credential = sas.strip().lstrip("?")
    url = (endpoint or conn_endpoint or env.get("AZURE_STORAGE_BLOB_ENDPOINT")
           or f"{protocol}://{account}.blob.{suffix}")
    return _check_endpoint(url), credential


def _check_endpoint(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("the Azure blob endpoint must be an http(s):// URL")
    if parts.query or parts.fragment or parts.username or parts.password:
        # A SAS in the endpoint would end up in logs: credentials go in the environment.
        raise ConfigError("the Azure blob endpoint must not carry a query string or credentials; "
                          "put a SAS token in AZURE_STORAGE_SAS_TOKEN")
    return url.strip().rstrip("/")


# ---------------------------------------------------------------------- errors
def _code_of(exc: Any) -> str:
    code = None
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is not None:
        code = headers.get("x-ms-error-code")
    if not code:
        code = getattr(exc, "error_code", None)
    if isinstance(code, Enum):
        code = code.value
    return str(code or "")


def status_error(status: int | None, code: str, headers: Any, what: str, container: str) -> BackendError:
    """The BackendError for an HTTP status and Azure error code (no SDK text in the message).

    Azure's codes are mapped here; the rest goes to the shared ``error_for_status``.  A 409
    is not a precondition failure on Azure unless its code says so: Azure answers 409 for
    lease conflicts, archived blobs and containers changing state, none of which means
    "someone else wrote this object".
    """
    detail = f"HTTP {status}" + (f" {code}" if code else "")
    if code in ("ContainerNotFound", "ContainerBeingDeleted") and status == 404:
        return BucketNotFound(f"az: container {container!r} does not exist ({detail})")
    if status == 404:
        return NotFound(f"{what}: no such object ({detail})")
    if status in (401, 403):
        if code in ("AuthenticationFailed", "InvalidAuthenticationInfo", "NoAuthenticationInformation",
                    "") or status == 401:
            return AuthenticationFailed(f"az: the account rejected the credentials ({detail})")
        return PermissionDenied(f"{what}: permission denied ({detail})")
    if code in ("ConditionNotMet", "TargetConditionNotMet", "SourceConditionNotMet"):
        return PreconditionFailed(f"{what}: changed by someone else ({detail})")
    if status == 416:
        return BackendError(f"{what}: range not satisfiable ({detail})")
    if code in ("ServerBusy", "OperationTimedOut", "InternalError"):
        return Transient(f"{what}: Azure is busy or failing ({detail})", retry_after(headers))
    if code in _LONG_CODES:
        return NameTooLong(f"{what}: name too long ({detail})")
    if code in _NAME_CODES:
        return InvalidName(f"{what}: Azure cannot store this name ({detail})")
    if status == 409:
        if code == "BlobAlreadyExists":
            return AlreadyExists(f"{what}: already exists ({detail})")
        if code in ("ContainerBeingDeleted", "ContainerBeingCreated"):
            return Transient(f"{what}: container is changing state ({detail})")
        return BackendError(f"{what}: conflict ({detail})")
    return error_for_status(status, f"{what}: Azure request failed ({detail})", retry_after(headers))


class AzureBackend(Backend):
    scheme = "az"
    capabilities = Capabilities(
        max_key_bytes=1024,
        max_metadata_bytes=8192,
        min_part_size=1,
        max_part_size=4000 * MiB,
        max_parts=50_000,
        forbidden_chars="\\",
        listing_has_metadata=True,
        part_copy=False,
        conditional_writes=True,
        atomic_conditional_put=True,
    )
    options = frozenset({"endpoint"}) | TLS_OPTIONS

    def __init__(self, account: str, container: str, prefix: str = "", *, endpoint: str | None = None,
                 credential: Any = None, max_connections: int = 16, retry: RetryPolicy | None = None,
                 connection_timeout: float = 20.0, read_timeout: float = 60.0, verify: bool | str = True
                 ) -> None:
        super().__init__(bucket=container, prefix=prefix, max_connections=max_connections, retry=retry)
        import requests
        from azure.core.pipeline.transport import RequestsTransport
        from azure.storage.blob import BlobServiceClient

        self.account = account
        self.container = container
        self.endpoint = _check_endpoint(endpoint or f"https://{account}.blob.core.windows.net")
        self._uses_sas = isinstance(credential, str)
        self._uses_key = isinstance(credential, dict)
        session = requests.Session()
        adapter = requests_adapter(max_connections + 4)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        transport = RequestsTransport(session=session, session_owner=True, connection_verify=verify,
                                      connection_timeout=connection_timeout, read_timeout=read_timeout)
        # base.py retries; the SDK must not retry on its own as well.
        self._service = BlobServiceClient(self.endpoint, credential=credential, transport=transport,
                                          retry_total=0)
        self._container = self._service.get_container_client(container)
        self._uploads: dict[str, tuple[str, dict[str, str]]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, netloc: str, path: str, options: dict[str, str]) -> AzureBackend:
        account = netloc.lower()
        if not _ACCOUNT_RE.match(account):
            raise ConfigError("az:// URLs name a storage account and a container: az://ACCOUNT/CONTAINER"
                              "[/prefix] (for another endpoint use -o endpoint=URL)")
        container, _, prefix = path.lstrip("/").partition("/")
        if not container:
            raise ConfigError("az:// URL needs a container: az://ACCOUNT/CONTAINER[/prefix]")
        if not _CONTAINER_RE.match(container) and container != "$root":
            raise ConfigError(f"{container!r} is not a valid Azure container name (3-63 characters: "
                              "lowercase letters, digits and single hyphens)")
        endpoint, credential = resolve_credentials(account, options.get("endpoint"))
        return cls(account, container, prefix, endpoint=endpoint, credential=credential,
                   verify=tls_verify(options))

    def describe(self) -> str:
        name = f"az://{self.account}/{self.container}/{self.prefix}"
        host = self._safe_host()
        # The public endpoint follows from the account; another one (Azurite, a sovereign
        # cloud) is part of the store's name.
        return name if host == f"{self.account}.blob.core.windows.net" else f"{name} at {host}"

    def close(self) -> None:
        self._service.close()

    # ------------------------------------------------------------------ helpers
    def _translate(self, exc: Exception) -> BackendError | None:
        from azure.core.exceptions import (
            AzureError,
            ClientAuthenticationError,
            HttpResponseError,
            ServiceRequestError,
            ServiceResponseError,
        )

        status = getattr(exc, "status_code", None)
        if isinstance(exc, HttpResponseError) and status:
            response = getattr(exc, "response", None)
            return status_error(status, _code_of(exc), getattr(response, "headers", None),
                                f"az://{self.account}/{self.container}", self.container)
        if isinstance(exc, ClientAuthenticationError):
            # Includes signing failures (an account key that is not base64).
            return AuthenticationFailed("az: cannot sign requests with the account key "
                                        "(is it the base64 key from the portal?)")
        if isinstance(exc, ServiceRequestError):
            return Transient(f"az: cannot reach {self._safe_host()} ({type(exc).__name__})")
        if isinstance(exc, ServiceResponseError):
            return Transient(f"az: connection to {self._safe_host()} failed ({type(exc).__name__})")
        if isinstance(exc, AzureError):
            return BackendError(f"az: request failed ({type(exc).__name__})")
        return None

    def _safe_host(self) -> str:
        return urlsplit(self.endpoint).netloc

    def _blob(self, key: str) -> Any:
        return self._container.get_blob_client(key)

    @staticmethod
    def _encode_meta(metadata: dict[str, str], folder: bool = False) -> dict[str, str]:
        out: dict[str, str] = {}
        for k, v in metadata.items():
            if not v.isascii() or any(ord(c) < 32 for c in v):
                raise InvalidName(f"metadata value of {k!r} is not printable ASCII; Azure cannot store it")
            out[encode_meta_key(k)] = v
        if folder:
            out = {k: v for k, v in out.items() if k.lower() != FOLDER_META}
            out[FOLDER_META] = "true"
        return out

    @staticmethod
    def _decode_meta(metadata: dict[str, str] | None, marker: bool) -> dict[str, str]:
        out = {decode_meta_key(k): v for k, v in (metadata or {}).items()}
        if marker:
            out.pop(FOLDER_META, None)
        return out

    def _info(self, key: str, props: Any, marker: bool) -> ObjectInfo:
        modified = props.last_modified
        return ObjectInfo(key, 0 if marker else int(props.size or 0), props.etag,
                          modified.timestamp() if modified else None,
                          self._decode_meta(props.metadata, marker))

    def _props(self, key: str) -> Any | None:
        """Blob properties, or None when the blob does not exist."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return self._blob(key).get_blob_properties()
        except ResourceNotFoundError as exc:
            if _code_of(exc) == "ContainerNotFound":
                raise
            return None

    def _marker_blob(self, key: str) -> tuple[str, Any]:
        """The blob holding marker ``key`` (``x/``, else a blobfuse2-style ``x``) and its properties."""
        props = self._props(key)
        if props is not None:
            return key, props
        props = self._props(key[:-1]) if len(key) > 1 else None
        if props is not None and _is_folder(props.metadata):
            return key[:-1], props
        raise NotFound(f"{key}: no such object")

    @staticmethod
    def _conditions(if_match: str | None, if_none_match: bool) -> dict[str, Any]:
        from azure.core import MatchConditions

        if if_none_match:
            return {"match_condition": MatchConditions.IfMissing}
        if if_match:
            return {"etag": if_match, "match_condition": MatchConditions.IfNotModified}
        return {}

    # ------------------------------------------------------------------ primitives
    def _check_bucket(self) -> None:
        from azure.core.exceptions import HttpResponseError

        try:
            self._container.get_container_properties()
        except HttpResponseError as exc:
            if self._uses_key and exc.status_code == 403:
                # The account owner's key can do everything, so a 403 means a wrong key (Azure
                # says AuthenticationFailed, Azurite AuthorizationFailure) or a firewall rule.
                raise AuthenticationFailed(f"az: account {self.account!r} rejected the account key "
                                           f"(HTTP 403 {_code_of(exc)})") from None
            # A container-scoped SAS may not read container properties: listing proves access.
            if not (self._uses_sas and exc.status_code == 403 and _code_of(exc) != "AuthenticationFailed"):
                raise
            next(self._container.list_blobs(results_per_page=1).by_page(), None)

    def _list_page(self, prefix: str, delimiter: str | None, token: str | None, limit: int) -> ListPage:
        from azure.storage.blob import BlobPrefix

        azure_token, pending = _unwrap_token(token)
        limit = max(1, min(limit, 5000))
        paged: Any  # the SDK's pager; its by_page() iterator carries continuation_token
        if delimiter:
            paged = self._container.walk_blobs(name_starts_with=prefix or None, delimiter=delimiter,
                                               include=["metadata"], results_per_page=limit)
        else:
            paged = self._container.list_blobs(name_starts_with=prefix or None, include=["metadata"],
                                               results_per_page=limit)
        pages = paged.by_page(continuation_token=azure_token)
        items = list(next(pages, []))
        page = ListPage()
        seen_prefixes = set(pending)
        objects: dict[str, ObjectInfo] = {}
        names: list[str] = []
        for item in items:
            names.append(item.name)
            if isinstance(item, BlobPrefix):
                if item.name not in seen_prefixes:
                    seen_prefixes.add(item.name)
                    page.prefixes.append(item.name)
                continue
            folder = _is_folder(item.metadata)
            if folder and not item.name.endswith("/"):
                marker = item.name + "/"
                if delimiter:
                    # blobfuse2 folder blob: the common prefix of its (maybe absent) children.
                    if marker not in seen_prefixes:
                        seen_prefixes.add(marker)
                        page.prefixes.append(marker)
                        pending.append(marker)
                    continue
                objects.setdefault(marker, self._info(marker, item, True))
                continue
            objects[item.name] = self._info(item.name, item, item.name.endswith("/"))
        page.objects = [objects[k] for k in sorted(objects)]
        page.prefixes.sort()
        next_token = pages.continuation_token or None
        if next_token:
            # Keep the folder prefixes already shown that a later page may still list.
            last = max(names) if names else ""
            pending = sorted({p for p in pending if p > last})
            page.next_token = _wrap_token(next_token, pending)
        return page

    def _head(self, key: str) -> ObjectInfo:
        if key.endswith("/"):
            _, props = self._marker_blob(key)
            return self._info(key, props, True)
        props = self._props(key)
        if props is None or _is_folder(props.metadata):
            raise NotFound(f"{key}: no such object")
        return self._info(key, props, False)

    def _get_into(self, key: str, start: int, length: int | None, out: BinaryIO,
                  if_match: str | None) -> None:
        from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

        if key.endswith("/"):
            self._marker_blob(key)
            return
        try:
            stream = self._blob(key).download_blob(offset=start, length=length, max_concurrency=1,
                                                   **self._conditions(if_match, False))
            stream.readinto(out)
        except ResourceNotFoundError:
            if if_match:
                raise PreconditionFailed(f"{key}: object is gone") from None
            raise
        except HttpResponseError as exc:
            if exc.status_code == 416:
                return  # start at or past the end: nothing to read
            raise

    def _put(self, key: str, payload: Payload, metadata: dict[str, str], if_match: str | None,
             if_none_match: bool) -> str:
        from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

        meta = self._encode_meta(metadata, folder=key.endswith("/"))
        try:
            with payload.open() as body:
                result = self._blob(key).upload_blob(body, length=payload.size, overwrite=True,
                                                     metadata=meta, max_concurrency=1,
                                                     content_settings=self._content_settings(key),
                                                     **self._conditions(if_match, if_none_match))
        except ResourceExistsError as exc:
            if if_none_match and _code_of(exc) == "BlobAlreadyExists":
                raise PreconditionFailed(f"{key}: object exists") from None
            raise
        except ResourceNotFoundError as exc:
            if if_match and _code_of(exc) != "ContainerNotFound":
                raise PreconditionFailed(f"{key}: object is gone") from None
            raise
        return result["etag"]

    def _set_metadata(self, key: str, metadata: dict[str, str]) -> str:
        if key.endswith("/"):
            name, _ = self._marker_blob(key)
            result = self._blob(name).set_blob_metadata(self._encode_meta(metadata, folder=True))
        else:
            result = self._blob(key).set_blob_metadata(self._encode_meta(metadata))
        return result["etag"]

    def _copy(self, src: str, dst: str, metadata: dict[str, str] | None) -> str:
        if src.endswith("/"):
            info = self._head(src)
            meta = (info.metadata or {}) if metadata is None else metadata
            return self._put(dst, Payload.from_bytes(b""), meta, None, False)
        if src == dst and metadata is not None:
            return self._set_metadata(dst, metadata)
        target = self._blob(dst)
        kwargs: dict[str, Any] = {}
        if metadata is not None:
            kwargs["metadata"] = self._encode_meta(metadata, folder=dst.endswith("/"))
        result = target.start_copy_from_url(self._blob(src).url, **kwargs)
        status, etag = result.get("copy_status"), result.get("etag")
        deadline = time.monotonic() + self.retry.call_timeout
        delay = 0.05
        while status == "pending":
            if time.monotonic() > deadline:
                copy_id = result.get("copy_id")
                if copy_id:
                    target.abort_copy(copy_id)
                raise BackendError(f"{dst}: server-side copy did not finish in time")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
            props = target.get_blob_properties()
            status, etag = props.copy.status, props.etag
        if status != "success":
            raise BackendError(f"{dst}: server-side copy from {src} ended as {status!r}")
        if metadata is not None:
            # Copy Blob takes the source's Content-Type and has no header to change it: a copy
            # under new metadata (a rename) gets the new name's type in a second request.
            etag = target.set_http_headers(self._content_settings(dst))["etag"]
        return etag

    def _delete(self, key: str) -> None:
        from azure.core import MatchConditions
        from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

        try:
            self._blob(key).delete_blob(delete_snapshots="include")
        except ResourceNotFoundError as exc:
            if _code_of(exc) == "ContainerNotFound":
                raise
        if key.endswith("/") and len(key) > 1:
            props = self._props(key[:-1])
            if props is not None and _is_folder(props.metadata):
                try:
                    self._blob(key[:-1]).delete_blob(delete_snapshots="include", etag=props.etag,
                                                     match_condition=MatchConditions.IfNotModified)
                except HttpResponseError as exc:
                    if exc.status_code not in (404, 412):
                        raise

    def _delete_many(self, keys: list[str]) -> None:
        from azure.core.exceptions import HttpResponseError

        markers = [k for k in keys if k.endswith("/")]
        plain = [k for k in keys if not k.endswith("/")]
        for key in markers:
            self._delete(key)
        for i in range(0, len(plain), 256):  # Azure's batch limit
            chunk = plain[i:i + 256]
            try:
                results = list(self._container.delete_blobs(*chunk, delete_snapshots="include",
                                                            raise_on_any_failure=False))
            except HttpResponseError as exc:
                if exc.status_code in (400, 403, 404, 501) and _code_of(exc) != "ContainerNotFound":
                    # No batch support (or not allowed for this SAS): one request each.
                    for key in chunk:
                        self._delete(key)
                    continue
                raise
            for key, resp in zip(chunk, results, strict=False):
                if resp.status_code in (200, 202, 404):
                    if resp.status_code == 404 and resp.headers.get("x-ms-error-code") == "ContainerNotFound":
                        raise status_error(404, "ContainerNotFound", None, key, self.container)
                    continue
                raise status_error(resp.status_code, resp.headers.get("x-ms-error-code", ""),
                                   resp.headers, key, self.container)

    def _content_settings(self, key: str) -> Any:
        from azure.storage.blob import ContentSettings

        return ContentSettings(content_type=self.content_type(key))

    # Multipart: staged blocks, committed in part order.
    @staticmethod
    def _block_id(upload_id: str, number: int) -> str:
        return base64.b64encode(f"{upload_id}-{number:06d}".encode()).decode()

    def _upload(self, key: str, upload_id: str) -> dict[str, str]:
        with self._lock:
            record = self._uploads.get(upload_id)
        if record is None or record[0] != key:
            raise NotFound(f"{key}: no such multipart upload")
        return record[1]

    def _mpu_create(self, key: str, metadata: dict[str, str]) -> str:
        self._encode_meta(metadata)  # refuse bad metadata before any data is sent
        upload_id = secrets.token_hex(16)
        with self._lock:
            self._uploads[upload_id] = (key, dict(metadata))
        return upload_id

    def _mpu_part(self, key: str, upload_id: str, number: int, payload: Payload) -> str:
        self._upload(key, upload_id)
        if not 1 <= number <= self.capabilities.max_parts:
            raise InvalidName(f"part number {number} is out of range")
        block_id = self._block_id(upload_id, number)
        with payload.open() as body:
            self._blob(key).stage_block(block_id, body, length=payload.size)
        return block_id

    def _mpu_complete(self, key: str, upload_id: str, parts: list[PartInfo]) -> str:
        from azure.storage.blob import BlobBlock

        metadata = self._upload(key, upload_id)
        blocks = []
        for p in parts:
            block_id = self._block_id(upload_id, p.number)
            if p.etag != block_id:
                raise PreconditionFailed(f"part {p.number} does not belong to this upload")
            blocks.append(BlobBlock(block_id=block_id))
        result = self._blob(key).commit_block_list(
            blocks, metadata=self._encode_meta(metadata, folder=key.endswith("/")),
            content_settings=self._content_settings(key))
        with self._lock:
            self._uploads.pop(upload_id, None)
        return result["etag"]

    def _mpu_resume(self, key: str, upload_id: str, metadata: dict[str, str]) -> None:
        # Staged blocks are named after the upload id, so they are the upload's parts still.
        with self._lock:
            self._uploads.setdefault(upload_id, (key, dict(metadata)))

    def _mpu_abort(self, key: str, upload_id: str) -> None:
        # Uncommitted blocks expire on their own; nothing is stored server-side for an upload.
        with self._lock:
            self._uploads.pop(upload_id, None)


# ---------------------------------------------------------------------- listing tokens
def _wrap_token(token: str, pending: list[str]) -> str:
    if not pending:
        return token
    raw = json.dumps({"t": token, "p": pending}, separators=(",", ":")).encode()
    return TOKEN_TAG + base64.urlsafe_b64encode(raw).decode()


def _unwrap_token(token: str | None) -> tuple[str | None, list[str]]:
    if not token or not token.startswith(TOKEN_TAG):
        return token, []
    try:
        state = json.loads(base64.urlsafe_b64decode(token[len(TOKEN_TAG):]))
        return state["t"], list(state["p"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise BackendError("az: malformed listing token") from None
