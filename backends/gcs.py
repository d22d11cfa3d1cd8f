"""Google Cloud Storage backend: ``gs://BUCKET[/prefix]`` over google-cloud-storage (JSON API).

Credentials follow Google's conventions, nothing cloudfs-specific:

* Application Default Credentials: ``GOOGLE_APPLICATION_CREDENTIALS`` (a service-account
  JSON file), ``gcloud auth application-default login``, or the metadata server on GCE/GKE.
  The project comes from ``-o project=``, ``GOOGLE_CLOUD_PROJECT`` or the credentials.
* ``-o anonymous``: no credentials, for public buckets.
* Emulators: ``STORAGE_EMULATOR_HOST`` (as every Google SDK reads it) or ``-o endpoint=URL``.
  An emulator gets AnonymousCredentials, and so does any ``http://`` endpoint (a token is
  never sent in clear text); an ``https://`` endpoint (e.g. Private Service Connect) uses ADC
  unless ``-o anonymous`` is given.

Mapping onto the cloudfs interface:

* ``ObjectInfo.etag`` is the object's *generation* number as a string, so every ``if_match``
  becomes ``ifGenerationMatch`` and ``if_none_match`` becomes ``ifGenerationMatch=0``.
  Metadata-only changes (``set_metadata``) keep the generation, as the data is unchanged.
* Reads are ranged media GETs with ``ifGenerationMatch``; the generation the server reports
  (``x-goog-generation``) is checked as well, since some emulators ignore the condition.
* Directory markers are zero-byte objects whose name ends in ``/``, as gcsfuse and the Cloud
  Console create them.
* GCS has no multipart upload, so ``mpu_*`` is a *parallel composite upload*: each part is a
  temporary object ``<mount prefix>.cloudfs-parts/<upload id>/<part number>``; completion
  composes them (at most 32 sources per compose, so in a tree) into the final key with the
  metadata given at create time, then deletes the temporaries; abort deletes them.  The
  ``.cloudfs-parts/`` folder is hidden from listings and refused as a user key.  Each part
  object carries the target key and metadata (``cloudfs-mpu``), so an upload interrupted by
  a crash can still be completed or cleaned up from another process.  There is no ranged
  server-side copy, so ``part_copy`` is False.
* The SDK's own retries are switched off (``retry=None`` on every call): the base class
  retries ``Transient`` errors once, with its own policy.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import requests
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc
from google.cloud import storage

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
    NotFound,
    PreconditionFailed,
    Transient,
    error_for_status,
    retry_after,
)

log = logging.getLogger(__name__)

PARTS_DIR = ".cloudfs-parts/"
MPU_META_KEY = "cloudfs-mpu"
CHUNK_SIZE = 8 * 1024 * 1024  # resumable upload chunk: a multiple of 256 KiB
TIMEOUT = (10, 60)  # (connect, read) seconds for one HTTP request
COMPOSE_MAX = 32
DELETE_WORKERS = 8
CONTENT_TYPE = "application/octet-stream"
EMULATOR_PROJECT = "cloudfs-emulator"
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")

try:  # the SDK's own media exceptions (google-cloud-storage >= 3) and the legacy package
    from google.cloud.storage.exceptions import DataCorruption as _DataCorruption
    from google.cloud.storage.exceptions import InvalidResponse as _InvalidResponse
except ImportError:  # pragma: no cover - older SDK
    from google.resumable_media import DataCorruption as _DataCorruption  # type: ignore[no-redef]
    from google.resumable_media import InvalidResponse as _InvalidResponse  # type: ignore[no-redef]


class GCSBackend(Backend):
    scheme = "gs"
    capabilities = Capabilities(
        max_key_bytes=1024,
        max_metadata_bytes=8192,
        min_part_size=1,
        max_part_size=5 * 1024**4,
        max_parts=1024,
        forbidden_chars="\r\n",  # the JSON API refuses CR and LF in object names
        listing_has_metadata=True,
        part_copy=False,
        conditional_writes=True,
        atomic_conditional_put=True,
    )
    options = frozenset({"anonymous", "endpoint", "project"}) | TLS_OPTIONS

    def __init__(self, bucket: str, prefix: str = "", *, endpoint: str | None = None,
                 project: str | None = None, anonymous: bool = False, verify: bool | str = True,
                 **kw: Any) -> None:
        super().__init__(bucket, prefix, **kw)
        self.endpoint = endpoint
        self.client = _make_client(endpoint, project, anonymous)
        pool = requests_adapter(int(self.limiter.total_tokens) + DELETE_WORKERS, verify)
        self.client._http.mount("https://", pool)
        self.client._http.mount("http://", pool)
        self._bucket = self.client.bucket(bucket)
        self._uploads: dict[str, dict[str, Any]] = {}  # upload id -> {"key", "metadata"}

    @classmethod
    def from_url(cls, netloc: str, path: str, options: dict[str, str]) -> GCSBackend:
        if not netloc:
            raise ConfigError("gs:// URL needs a bucket: gs://BUCKET[/prefix]")
        if not BUCKET_NAME.fullmatch(netloc):
            raise ConfigError(f"{netloc!r} is not a GCS bucket name (lowercase letters, digits, "
                              "'-', '_' and '.'; 3 to 63 characters per dot-separated part)")
        anonymous = options.get("anonymous", "false").lower() not in ("0", "false", "no", "off")
        return cls(netloc, path.strip("/"), endpoint=options.get("endpoint") or None,
                   project=options.get("project") or None, anonymous=anonymous,
                   verify=tls_verify(options))

    def describe(self) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"gs://{self.bucket}/{self.prefix}{where}"

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # pragma: no cover - closing a pool never matters for correctness
            log.debug("closing the GCS client failed", exc_info=True)

    # ------------------------------------------------------------------ keys
    def _parts_root(self) -> str:
        return self.prefix + PARTS_DIR

    def validate_key(self, key: str) -> None:
        super().validate_key(key)
        full = self.full_key(key)
        if full in (".", "..") or full.startswith(".well-known/acme-challenge/"):
            raise InvalidName(f"gs:// cannot store an object named {full!r}")
        if key == PARTS_DIR.rstrip("/") or key.startswith(PARTS_DIR):
            raise InvalidName(f"{PARTS_DIR} is reserved by cloudfs for composite uploads")

    # ------------------------------------------------------------------ errors
    def _translate(self, exc: Exception) -> BackendError | None:
        if isinstance(exc, gexc.GoogleAPICallError):
            headers = getattr(getattr(exc, "response", None), "headers", None)
            return _by_status(exc.code, _message(exc), headers)
        if isinstance(exc, _InvalidResponse):
            status = getattr(getattr(exc, "response", None), "status_code", None)
            return _by_status(status, "unexpected response from GCS", None)
        if isinstance(exc, _DataCorruption):
            return Transient("GCS: checksum mismatch on transfer")
        if isinstance(exc, auth_exc.DefaultCredentialsError):
            return AuthenticationFailed(
                "no Google credentials found: set GOOGLE_APPLICATION_CREDENTIALS, run "
                "`gcloud auth application-default login`, or use -o anonymous for a public bucket")
        if isinstance(exc, auth_exc.TransportError):
            return Transient("GCS: cannot reach the token endpoint")
        if isinstance(exc, auth_exc.RefreshError):
            return AuthenticationFailed("GCS: credentials were rejected when refreshing the token")
        if isinstance(exc, auth_exc.GoogleAuthError):
            return AuthenticationFailed("GCS: invalid credentials")
        if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout
                      | requests.exceptions.ChunkedEncodingError):
            return Transient(f"GCS: connection failed ({type(exc).__name__})")
        if isinstance(exc, ConnectionError | TimeoutError):
            return Transient(f"GCS: connection failed ({type(exc).__name__})")
        return None

    # ------------------------------------------------------------------ helpers
    def _info(self, blob: Any) -> ObjectInfo:
        when = blob.updated or blob.time_created
        return ObjectInfo(
            key=blob.name,
            size=int(blob.size or 0),
            etag=None if blob.generation is None else str(blob.generation),
            mtime=when.timestamp() if when else None,
            metadata=dict(blob.metadata or {}),
        )

    @staticmethod
    def _generation(etag: str, key: str) -> int:
        """The generation an ETag stands for; a foreign ETag can never match."""
        try:
            return int(etag.strip('"'))
        except ValueError:
            raise PreconditionFailed(f"{key}: object changed (etag is not a GCS generation)") from None

    # ------------------------------------------------------------------ primitives
    def _check_bucket(self) -> None:
        try:
            # A one-item listing needs only storage.objects.list, which a reader always has
            # (a bucket GET would need storage.buckets.get too).
            it = self.client.list_blobs(self._bucket, max_results=1, prefix=self.prefix or None,
                                        retry=None, timeout=TIMEOUT)
            next(it.pages, None)
        except gexc.NotFound:
            raise BucketNotFound(f"bucket gs://{self.bucket} does not exist") from None

    def _list_page(self, prefix: str, delimiter: str | None, token: str | None, limit: int) -> ListPage:
        it = self.client.list_blobs(self._bucket, prefix=prefix or None, delimiter=delimiter,
                                    max_results=limit, page_token=token or None,
                                    retry=None, timeout=TIMEOUT)
        page = ListPage()
        gcs_page = next(it.pages, None)
        if gcs_page is None:
            return page
        hidden = self._parts_root()
        page.objects = [self._info(b) for b in gcs_page if not b.name.startswith(hidden)]
        page.prefixes = sorted(p for p in gcs_page.prefixes if not p.startswith(hidden))
        page.next_token = it.next_page_token or None
        return page

    def _head(self, key: str) -> ObjectInfo:
        blob = self._bucket.blob(key)
        blob.reload(retry=None, timeout=TIMEOUT)
        return self._info(blob)

    def _get_into(self, key: str, start: int, length: int | None, out: BinaryIO,
                  if_match: str | None) -> None:
        gen = self._generation(if_match, key) if if_match else None
        blob = self._bucket.blob(key)
        end = None if length is None else start + length - 1  # the SDK's end is inclusive
        try:
            blob.download_to_file(out, start=start or None, end=end, raw_download=True,
                                  if_generation_match=gen, retry=None, timeout=TIMEOUT)
        except gexc.RequestRangeNotSatisfiable:
            # Reading at or past the end: no bytes, as a short read at EOF. Still honour
            # the precondition and a missing object.
            info = self._head(key)
            if gen is not None and info.etag != str(gen):
                raise PreconditionFailed(f"{key}: changed since it was read") from None
            return
        if gen is not None and blob.generation is not None and int(blob.generation) != gen:
            raise PreconditionFailed(f"{key}: changed since it was read")

    def _put(self, key: str, payload: Payload, metadata: dict[str, str], if_match: str | None,
             if_none_match: bool) -> str:
        gen: int | None = None
        if if_none_match:
            gen = 0
        elif if_match:
            gen = self._generation(if_match, key)
        blob = self._bucket.blob(key, chunk_size=CHUNK_SIZE if payload.size > CHUNK_SIZE else None)
        blob.metadata = metadata or None
        with payload.open() as src:
            blob.upload_from_file(src, size=payload.size, content_type=self.content_type(key), rewind=False,
                                  if_generation_match=gen, retry=None, timeout=TIMEOUT)
        return str(blob.generation)

    def _set_metadata(self, key: str, metadata: dict[str, str]) -> str:
        # A full-resource update (PUT) replaces user metadata outright; a PATCH would merge,
        # and removing a key through PATCH is not portable (emulators store "" instead).
        blob = self._bucket.blob(key)
        blob.reload(retry=None, timeout=TIMEOUT)
        blob.metadata = dict(metadata) or None
        blob.update(if_metageneration_match=blob.metageneration, retry=None, timeout=TIMEOUT)
        return str(blob.generation)

    def _copy(self, src: str, dst: str, metadata: dict[str, str] | None) -> str:
        if src == dst and metadata is not None:
            return self._set_metadata(src, metadata)
        source = self._bucket.blob(src)
        target = self._bucket.blob(dst)
        if metadata is not None:
            # An object resource in the request body replaces the destination's metadata;
            # without one, GCS copies the source's.
            target.metadata = dict(metadata)
            target.content_type = self.content_type(dst)
        token: str | None = None
        while True:  # rewrite works in steps for large objects or across storage classes
            token, _done, _total = target.rewrite(source, token=token, retry=None, timeout=TIMEOUT)
            if token is None:
                break
        return str(target.generation)

    def _delete(self, key: str) -> None:
        try:
            self._bucket.blob(key).delete(retry=None, timeout=TIMEOUT)
        except gexc.NotFound:
            pass

    def _delete_many(self, keys: list[str]) -> None:
        # JSON-API batches would save round trips on GCS, but emulators do not speak them;
        # a few threads over the shared connection pool do the job everywhere.
        if len(keys) <= 1:
            for key in keys:
                self._delete(key)
            return
        with ThreadPoolExecutor(min(DELETE_WORKERS, len(keys))) as pool:
            for fut in [pool.submit(self._guard, self._delete, k) for k in keys]:
                fut.result()

    # ------------------------------------------------------------------ composite uploads
    def _mpu_dir(self, upload_id: str) -> str:
        if not upload_id.isalnum():
            raise InvalidName("bad upload id")
        return f"{self._parts_root()}{upload_id}/"

    def _mpu_create(self, key: str, metadata: dict[str, str]) -> str:
        upload_id = uuid.uuid4().hex
        self._uploads[upload_id] = {"key": key, "metadata": dict(metadata)}
        return upload_id

    def _mpu_part(self, key: str, upload_id: str, number: int, payload: Payload) -> str:
        if not 1 <= number <= self.capabilities.max_parts:
            raise InvalidName(f"part number {number} out of range 1..{self.capabilities.max_parts}")
        state = self._uploads.get(upload_id, {"key": key, "metadata": None})
        record = json.dumps({"key": key, "metadata": state["metadata"]}, separators=(",", ":"))
        if len(record.encode()) > self.capabilities.max_metadata_bytes - 64:
            record = json.dumps({"key": key, "metadata": None})  # too big to carry: key only
        blob = self._bucket.blob(f"{self._mpu_dir(upload_id)}{number:05d}",
                                 chunk_size=CHUNK_SIZE if payload.size > CHUNK_SIZE else None)
        blob.metadata = {MPU_META_KEY: record}
        with payload.open() as src:
            blob.upload_from_file(src, size=payload.size, content_type=CONTENT_TYPE, rewind=False,
                                  retry=None, timeout=TIMEOUT)
        return str(blob.generation)

    def _mpu_metadata(self, upload_id: str, parts: list[PartInfo]) -> dict[str, str]:
        state = self._uploads.get(upload_id)
        if state is not None:
            return state["metadata"]
        # Not started by this process (e.g. after a crash): the parts carry the metadata.
        if not parts:
            raise NotFound("no such composite upload")
        blob = self._bucket.blob(f"{self._mpu_dir(upload_id)}{parts[0].number:05d}")
        blob.reload(retry=None, timeout=TIMEOUT)
        record = json.loads((blob.metadata or {}).get(MPU_META_KEY, "{}"))
        return record.get("metadata") or {}

    def _compose(self, dst: Any, sources: list[tuple[str, int | None]]) -> None:
        dst.compose([self._bucket.blob(name) for name, _ in sources],
                    if_source_generation_match=[g for _, g in sources]
                    if all(g is not None for _, g in sources) else None,
                    retry=None, timeout=TIMEOUT)

    def _mpu_complete(self, key: str, upload_id: str, parts: list[PartInfo]) -> str:
        metadata = self._mpu_metadata(upload_id, parts)
        folder = self._mpu_dir(upload_id)
        sources: list[tuple[str, int | None]] = [
            (f"{folder}{p.number:05d}", self._generation(p.etag, f"part {p.number}")) for p in parts]
        level = 0
        while len(sources) > COMPOSE_MAX:  # compose in a tree: 32 sources per call
            level += 1
            merged: list[tuple[str, int | None]] = []
            for i in range(0, len(sources), COMPOSE_MAX):
                tmp = self._bucket.blob(f"{folder}c{level}-{i // COMPOSE_MAX:05d}")
                tmp.content_type = CONTENT_TYPE
                self._compose(tmp, sources[i:i + COMPOSE_MAX])
                merged.append((tmp.name, tmp.generation))
            sources = merged
        final = self._bucket.blob(key)
        final.content_type = self.content_type(key)
        final.metadata = dict(metadata) or None
        if sources:
            self._compose(final, sources)
        else:  # no parts at all: an empty object
            final.upload_from_string(b"", content_type=self.content_type(key), retry=None, timeout=TIMEOUT)
        self._remove_parts(upload_id)
        self._uploads.pop(upload_id, None)
        return str(final.generation)

    def _remove_parts(self, upload_id: str) -> None:
        folder = self._mpu_dir(upload_id)
        names = [b.name for b in self.client.list_blobs(self._bucket, prefix=folder, retry=None,
                                                        timeout=TIMEOUT)]
        self._delete_many(names)

    def _mpu_resume(self, key: str, upload_id: str, metadata: dict[str, str]) -> None:
        self._uploads.setdefault(upload_id, {"key": key, "metadata": dict(metadata)})

    def _mpu_abort(self, key: str, upload_id: str) -> None:
        self._remove_parts(upload_id)
        self._uploads.pop(upload_id, None)


# ---------------------------------------------------------------------- client and errors
def _normalise_endpoint(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url  # STORAGE_EMULATOR_HOST is often host:port
    if not urlsplit(url).netloc:
        raise ConfigError(f"bad GCS endpoint {url!r}: give http(s)://host[:port]")
    return url


def _make_client(endpoint: str | None, project: str | None, anonymous: bool) -> Any:
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials

    project = project or os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("GCLOUD_PROJECT")
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    given = endpoint or emulator
    url = _normalise_endpoint(given) if given else None
    try:
        if url is not None:
            opts = ClientOptions(api_endpoint=url)
            if anonymous or not endpoint or url.startswith("http://"):
                # An emulator, or a plain-http endpoint: never send a token in clear text.
                return storage.Client(project=project or EMULATOR_PROJECT,
                                      credentials=AnonymousCredentials(), client_options=opts)
            return storage.Client(project=project, client_options=opts)
        if anonymous:
            return storage.Client.create_anonymous_client()
        return storage.Client(project=project)
    except auth_exc.DefaultCredentialsError:
        raise AuthenticationFailed(
            "no Google credentials found: set GOOGLE_APPLICATION_CREDENTIALS to a service-account "
            "key file, run `gcloud auth application-default login`, or use -o anonymous for a "
            "public bucket") from None
    except auth_exc.GoogleAuthError as exc:
        raise AuthenticationFailed(f"cannot load Google credentials ({type(exc).__name__})") from None


def _message(exc: Any) -> str:
    # The API's own message names the bucket/object and the problem; it never holds tokens.
    msg = getattr(exc, "message", "") or ""
    return f"GCS: {msg}" if msg else f"GCS: HTTP {getattr(exc, 'code', '?')}"


def _by_status(status: int | None, message: str, headers: Any) -> BackendError:
    if status == 400 and "name" in message.lower():
        return InvalidName(message)
    return error_for_status(status, message, retry_after(headers))
