"""Amazon S3 and S3-compatible stores (MinIO, SeaweedFS, Ceph RGW, R2, ...) through boto3.

URL: ``s3://bucket[/prefix]``.  Options (``-o``):

* ``endpoint=URL``   -- an S3-compatible endpoint instead of AWS (``AWS_ENDPOINT_URL_S3`` /
  ``AWS_ENDPOINT_URL`` are honoured too, as boto3 does);
* ``region=NAME``    -- the bucket's region (default: from the AWS config/env);
* ``path_style[=1]`` -- path-style addressing (the default whenever an endpoint is set);
* ``profile=NAME``   -- a profile from the shared AWS config/credentials files;
* ``storage_class=NAME`` -- the storage class of every object written (STANDARD_IA, ...);
* ``sse=s3|kms|c``   -- server-side encryption: S3-managed keys, KMS (``sse_kms_key_id=ID``,
  else the account's default key), or a customer key read from ``sse_c_key_file=PATH`` (32
  bytes, raw or base64; the file must not be readable by group or others).  With ``sse=c``
  every object is read and written with that key;
* ``acl=CANNED``     -- a canned ACL (private, public-read, bucket-owner-full-control, ...);
* ``requester_pays`` -- send ``x-amz-request-payer: requester`` (buckets whose owner bills
  the reader);
* ``ca_bundle=PATH`` / ``tls_verify=0`` -- the CA certificates to trust for an https endpoint,
  or no certificate check at all (every network store takes these, see ``base.tls_verify``).

Every request that takes one of these parameters gets it (PUT, copy, multipart create, part
uploads, HEAD, GET, LIST, DELETE), so renames and multipart uploads keep them.

Credentials come only from the standard AWS chain (environment, shared files, profiles,
instance/container roles) and never appear in a URL, argv, log line or error message.

ETags are kept without their surrounding quotes everywhere in the interface and quoted
again when they go back to S3 in a condition (If-Match, x-amz-copy-source-if-match).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

from . import s3_fast
from .base import (
    TLS_OPTIONS,
    Backend,
    Capabilities,
    ListPage,
    ObjectInfo,
    PartInfo,
    Payload,
    RetryPolicy,
    parse_flag,
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
    NotSupported,
    PermissionDenied,
    PreconditionFailed,
    Transient,
    error_for_status,
    retry_after,
)

CHUNK = 1024 * 1024
T = TypeVar("T")

_CREDENTIAL_HINT = ("set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or a profile "
                    "(AWS_PROFILE or -o profile=NAME) in ~/.aws/credentials")

_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchUpload", "NoSuchVersion"}
_BUCKET_NOT_FOUND = {"NoSuchBucket"}
_AUTH = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
         "TokenRefreshRequired", "AuthorizationHeaderMalformed", "InvalidSecurity",
         "MissingSecurityHeader", "AccessKeyDisabled", "InvalidClientTokenId", "UnrecognizedClientException"}
_DENIED = {"AccessDenied", "403", "AllAccessDisabled", "AccountProblem"}
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_TRANSIENT = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
              "RequestTimeout", "RequestTimeTooSkewed", "Throttling", "ThrottlingException",
              "RequestLimitExceeded", "TooManyRequests", "429", "OperationAborted",
              "BadDigest", "IncompleteBody", "XAmzContentSHA256Mismatch"}


STORAGE_CLASSES = ("STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING",
                   "GLACIER", "DEEP_ARCHIVE", "OUTPOSTS", "GLACIER_IR", "SNOW", "EXPRESS_ONEZONE")
CANNED_ACLS = ("private", "public-read", "public-read-write", "authenticated-read", "aws-exec-read",
               "bucket-owner-read", "bucket-owner-full-control")
SSE_MODES = {"s3": "AES256", "kms": "aws:kms", "c": "customer key"}


def _choice(name: str, value: str | None, choices: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if value not in choices:
        raise ConfigError(f"-o {name}={value}: not one of {', '.join(choices)}")
    return value


def read_sse_c_key(path: str) -> bytes:
    """The 32-byte SSE-C key in ``path`` (raw, or base64 on one line): a private file."""
    import base64
    import binascii

    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            data = f.read(1024)
    except OSError as exc:
        raise ConfigError(f"-o sse_c_key_file={path}: {exc.strerror}") from None
    if st.st_mode & 0o077:
        raise ConfigError(f"-o sse_c_key_file={path}: readable by group or others (chmod 600 it)")
    if len(data) == 32:
        return data
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ConfigError(f"-o sse_c_key_file={path}: not a 32-byte key (raw, or base64 on one line)")
    return key


@dataclass(frozen=True)
class WriteSettings:
    """How objects are stored and asked for: the S3 request parameters that mount options set."""

    storage_class: str | None = None
    sse: str | None = None  # a SSE_MODES key
    sse_kms_key_id: str | None = None
    sse_c_key: bytes | None = field(default=None, repr=False)
    acl: str | None = None
    requester_pays: bool = False

    @classmethod
    def from_options(cls, options: dict[str, str]) -> WriteSettings:
        sse = _choice("sse", options.get("sse"), tuple(SSE_MODES))
        if options.get("sse_kms_key_id") and sse != "kms":
            raise ConfigError("-o sse_kms_key_id goes with -o sse=kms")
        if (sse == "c") != bool(options.get("sse_c_key_file")):
            raise ConfigError("-o sse=c needs -o sse_c_key_file=PATH (and the key file needs sse=c)")
        return cls(storage_class=_choice("storage_class", options.get("storage_class"), STORAGE_CLASSES),
                   sse=sse, sse_kms_key_id=options.get("sse_kms_key_id") or None,
                   sse_c_key=read_sse_c_key(options["sse_c_key_file"]) if sse == "c" else None,
                   acl=_choice("acl", options.get("acl"), CANNED_ACLS),
                   requester_pays=bool(parse_flag(options.get("requester_pays"), "requester_pays")))

    def parameters(self) -> dict[str, Any]:
        """Every parameter these settings add, by its boto3 name; each operation takes the
        ones its API has (see ``S3Backend._extra``)."""
        out: dict[str, Any] = {}
        if self.storage_class:
            out["StorageClass"] = self.storage_class
        if self.sse in ("s3", "kms"):
            out["ServerSideEncryption"] = SSE_MODES[self.sse]
        if self.sse_kms_key_id:
            out["SSEKMSKeyId"] = self.sse_kms_key_id
        if self.sse_c_key is not None:
            out.update(SSECustomerAlgorithm="AES256", SSECustomerKey=self.sse_c_key,
                       CopySourceSSECustomerAlgorithm="AES256", CopySourceSSECustomerKey=self.sse_c_key)
        if self.acl:
            out["ACL"] = self.acl
        if self.requester_pays:
            out["RequestPayer"] = "requester"
        return out


def _unquote(etag: str | None) -> str | None:
    if etag is None:
        return None
    return etag.strip('"')


def _synthesized_folder(key: str, resp: dict[str, Any]) -> bool:
    """Whether a HEAD answer for ``key`` describes no stored object but a folder the store
    made up: SeaweedFS keeps folders as filer directories and answers a HEAD of ``dir/`` for
    any of them with an ETag of zero parts (``<md5>-0``), which no upload can produce. A
    ``dir/`` object that was PUT (a folder marker) has a plain ETag."""
    etag = _unquote(resp.get("ETag")) or ""
    return key.endswith("/") and int(resp.get("ContentLength", 0)) == 0 and etag.endswith("-0")


def _keeps_folders(resp: dict[str, Any]) -> bool:
    """Whether the store that answered keeps a folder after its last object is deleted
    (SeaweedFS does: the empty directory then lists as ``dir/``, as if it had a marker)."""
    headers = (resp.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}
    return str(headers.get("server", "")).startswith("SeaweedFS")


def _quote(etag: str) -> str:
    if etag.startswith(("W/", '"')) or etag == "*":
        return etag
    return f'"{etag}"'


class S3Backend(Backend):
    scheme = "s3"
    capabilities = Capabilities(
        max_key_bytes=1024,
        max_metadata_bytes=2048,
        min_part_size=5 * 1024 * 1024,
        max_part_size=5 * 1024**3,
        max_parts=10_000,
        listing_has_metadata=False,
        part_copy=True,
        conditional_writes=True,
        atomic_conditional_put=True,
    )
    options = frozenset({"endpoint", "region", "path_style", "profile", "storage_class", "sse",
                         "sse_kms_key_id", "sse_c_key_file", "acl", "requester_pays"}) | TLS_OPTIONS

    # Objects larger than this are copied part by part (S3 refuses CopyObject above 5 GiB).
    max_single_copy: int = 5 * 1024**3
    # Preferred part size for server-side multipart copies.
    copy_part_size: int = 512 * 1024 * 1024

    def __init__(self, bucket: str, prefix: str = "", *, endpoint: str | None = None,
                 region: str | None = None, path_style: bool | None = None, profile: str | None = None,
                 max_connections: int = 16, retry: RetryPolicy | None = None,
                 connect_timeout: float = 10.0, read_timeout: float = 60.0,
                 settings: WriteSettings | None = None, verify: bool | str = True,
                 fast_path: bool = True) -> None:
        super().__init__(bucket, prefix, max_connections=max_connections, retry=retry)
        import boto3
        import botocore.config
        import botocore.exceptions

        if not bucket:
            raise ConfigError("s3:// URL needs a bucket: s3://bucket[/prefix]")
        if endpoint is not None:
            parts = urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError("endpoint must be an http(s):// URL, e.g. endpoint=https://s3.example.com")
            if parts.username or parts.password:
                raise ConfigError("credentials do not belong in the endpoint URL")
        env_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        custom = bool(endpoint or env_endpoint)
        # AWS checks If-Match / If-None-Match on PUT (since 2024); an S3-compatible server
        # may store the object regardless, so there the uploader verifies it once.
        self.conditional_put_unverified = custom
        if path_style is None:
            path_style = custom
        self.profile = profile
        try:
            session = boto3.session.Session(profile_name=profile or None)
        except botocore.exceptions.ProfileNotFound:
            raise ConfigError(f"AWS profile {profile!r} is not in the shared config/credentials files"
                              ) from None
        s3_config: dict[str, Any] = {}
        if path_style:
            s3_config["addressing_style"] = "path"
        config_kw: dict[str, Any] = {
            "retries": {"max_attempts": 1, "mode": "standard"},
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "max_pool_connections": max(max_connections, 10),
            "tcp_keepalive": True,
            "s3": s3_config,
        }
        if custom:
            # Many S3-compatible stores do not speak the newer default CRC checksums /
            # aws-chunked trailers; only send checksums where the API requires them.
            config_kw["request_checksum_calculation"] = "when_required"
            config_kw["response_checksum_validation"] = "when_required"
        try:
            self.client = session.client("s3", region_name=region or None, endpoint_url=endpoint or None,
                                         config=botocore.config.Config(**config_kw), verify=verify)
        except ValueError as exc:  # bad endpoint or region string
            raise ConfigError(f"s3: invalid endpoint or region ({type(exc).__name__})") from None
        self.endpoint_url: str = self.client.meta.endpoint_url
        host = urlsplit(self.endpoint_url).hostname or ""
        self.custom_endpoint = custom or not host.endswith(("amazonaws.com", "amazonaws.com.cn"))
        self._botocore_exc = botocore.exceptions
        self.settings = settings or WriteSettings()
        self._extra = self._extra_parameters()
        # HEAD, LIST and small PUTs through s3_fast (built at the first of them, see ``_fast_path``);
        # False: always through boto3 (tests and bench/s3_requests.py compare the two).  The
        # fast path sends no request-payer or SSE-C headers, so those settings take boto3.
        self._fast_wanted = fast_path and not (self.settings.requester_pays
                                               or self.settings.sse_c_key is not None)
        self._fast: s3_fast.FastPath | None = None

    def _extra_parameters(self) -> dict[str, dict[str, Any]]:
        """For each operation (boto3 method name), the settings' parameters its API takes."""
        wanted = self.settings.parameters()
        model = self.client.meta.service_model
        out: dict[str, dict[str, Any]] = {}
        for py_name, op_name in self.client.meta.method_to_api_mapping.items():
            shape = model.operation_model(op_name).input_shape
            members = shape.members if shape is not None else {}
            extra = {k: v for k, v in wanted.items() if k in members}
            if extra:
                out[py_name] = extra
        return out

    @classmethod
    def from_url(cls, netloc: str, path: str, options: dict[str, str]) -> S3Backend:
        if not netloc:
            raise ConfigError("s3:// URL needs a bucket: s3://bucket[/prefix]")
        return cls(netloc, path.strip("/"), endpoint=options.get("endpoint") or None,
                   region=options.get("region") or None,
                   path_style=parse_flag(options.get("path_style"), "path_style"),
                   profile=options.get("profile") or None, settings=WriteSettings.from_options(options),
                   verify=tls_verify(options))

    def describe(self) -> str:
        name = f"s3://{self.bucket}/{self.prefix}"
        if self.custom_endpoint:
            parts = urlsplit(self.endpoint_url)
            host = parts.hostname or ""
            if parts.port:
                host = f"{host}:{parts.port}"
            name += f" at {host}"
        return name

    def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
        with contextlib.suppress(Exception):
            self.client.close()

    # ------------------------------------------------------------------ errors
    @contextlib.contextmanager
    def _about(self, key: str | None) -> Iterator[None]:
        """Remember which key the running call is about, for error messages."""
        try:
            yield
        except Exception as exc:
            with contextlib.suppress(Exception):
                if not hasattr(exc, "_cloudfs_key"):
                    exc._cloudfs_key = key  # type: ignore[attr-defined]
            raise

    def _where(self, exc: Exception) -> str:
        key = getattr(exc, "_cloudfs_key", None)
        if key is None:
            return f"s3://{self.bucket}"
        return f"s3://{self.bucket}/{key}"

    def _translate(self, exc: Exception) -> BackendError | None:
        bexc = self._botocore_exc
        where = self._where(exc)
        if isinstance(exc, bexc.ClientError):
            err = exc.response.get("Error", {}) or {}
            meta = exc.response.get("ResponseMetadata", {}) or {}
            code = str(err.get("Code") or meta.get("HTTPStatusCode") or "")
            status = int(meta.get("HTTPStatusCode") or 0)
            if code in _BUCKET_NOT_FOUND:
                return BucketNotFound(f"s3://{self.bucket}: no such bucket")
            if code in _NOT_FOUND:
                if code == "NoSuchUpload":
                    return NotFound(f"{where}: no such multipart upload")
                return NotFound(f"{where}: no such object")
            if code in _AUTH:
                return AuthenticationFailed(f"{where}: credentials rejected ({code}); {_CREDENTIAL_HINT}")
            if code in _DENIED:
                return PermissionDenied(f"{where}: access denied")
            if code in _PRECONDITION:
                return PreconditionFailed(f"{where}: object changed (condition failed)")
            if code == "KeyTooLongError":
                return NameTooLong(f"{where}: key too long for S3")
            if code in ("InvalidObjectName", "InvalidKey", "InvalidURI"):
                return InvalidName(f"{where}: S3 cannot store this name")
            if code == "NotImplemented" or status == 501:
                return NotSupported(f"{self.describe()}: operation not supported by this store ({code})")
            if code in _TRANSIENT:
                return Transient(f"{where}: store busy or failing ({code or status})",
                                 retry_after=retry_after(meta.get("HTTPHeaders") or {}))
            if code in ("PermanentRedirect", "301", "IllegalLocationConstraintException"):
                region = (meta.get("HTTPHeaders") or {}).get("x-amz-bucket-region")
                hint = f"; pass -o region={region}" if region else "; pass the bucket's -o region=NAME"
                return ConfigError(f"s3://{self.bucket}: bucket is in another region{hint}")
            return error_for_status(status or None, f"{where}: S3 error {code or status}",
                                    retry_after(meta.get("HTTPHeaders") or {}))
        if isinstance(exc, (bexc.NoCredentialsError, bexc.PartialCredentialsError)):
            return AuthenticationFailed(f"s3://{self.bucket}: no usable AWS credentials; {_CREDENTIAL_HINT}")
        if isinstance(exc, (bexc.ConnectionError, bexc.HTTPClientError)):
            # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError, ...
            return Transient(f"{where}: connection to {self._host()} failed ({type(exc).__name__})")
        if isinstance(exc, (bexc.ResponseStreamingError, bexc.IncompleteReadError)):
            return Transient(f"{where}: connection dropped while reading ({type(exc).__name__})")
        if isinstance(exc, bexc.ParamValidationError):
            return InvalidName(f"{where}: request rejected by the S3 client (invalid parameter)")
        if isinstance(exc, bexc.NoRegionError):
            return ConfigError("s3: no region configured; pass -o region=NAME or set AWS_DEFAULT_REGION")
        if isinstance(exc, bexc.BotoCoreError):
            return BackendError(f"{where}: S3 client error ({type(exc).__name__})")
        try:
            import urllib3.exceptions
        except ImportError:  # pragma: no cover
            return None
        if isinstance(exc, (urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError,
                            urllib3.exceptions.SSLError)):
            return Transient(f"{where}: connection to {self._host()} failed ({type(exc).__name__})")
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return Transient(f"{where}: connection to {self._host()} failed ({type(exc).__name__})")
        return None

    def _host(self) -> str:
        parts = urlsplit(self.endpoint_url)
        return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)

    def _code(self, exc: Exception) -> str:
        if isinstance(exc, self._botocore_exc.ClientError):
            err = exc.response.get("Error", {}) or {}
            meta = exc.response.get("ResponseMetadata", {}) or {}
            return str(err.get("Code") or meta.get("HTTPStatusCode") or "")
        return ""

    def _run(self, key: str | None, fn: Callable[..., T], **kw: Any) -> T:
        """Call a client method with the settings' parameters (``_extra``) its API takes."""
        extra = self._extra.get(getattr(fn, "__name__", ""))
        with self._about(key):
            return fn(**({**extra, **kw} if extra else kw))

    def _fast_path(self) -> s3_fast.FastPath | None:
        """The lean HEAD/LIST path, made at the first such call rather than in ``__init__``:
        by then the mount's ``check_bucket`` has taught botocore's region redirector where
        the bucket is.  None when this configuration needs boto3 (s3_fast says why)."""
        if self._fast_wanted and self._fast is None:
            self._fast_wanted = False  # one attempt per backend
            self._fast = s3_fast.open_fast_path(self.client, self.bucket)
        return self._fast

    def _hot_call(self, key: str | None, name: str, **kw: Any) -> Any:
        """``self.client.<name>(**kw)``, through the fast path when it can serve the call.  Both
        raise the same botocore exceptions, mapped by ``_translate``."""
        fast = self._fast_path()
        if fast is not None:
            try:
                return self._run(key, getattr(fast, name), **kw)
            except s3_fast.Unsupported:
                self._fast = None  # the endpoint changed into one only boto3 serves
                fast.close()
            except s3_fast.UseClient:
                pass  # a region redirect: botocore's redirector follows it
        return self._run(key, getattr(self.client, name), **kw)

    # ------------------------------------------------------------------ primitives
    def _check_bucket(self) -> None:
        bexc = self._botocore_exc
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except bexc.ClientError as exc:
            code = self._code(exc)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise BucketNotFound(f"s3://{self.bucket}: no such bucket") from None
            if code not in ("403", "AccessDenied", "400"):
                raise
        # HEAD has no body, so a 403 does not tell bad credentials from missing permission.
        # A one-key listing carries the error code; it also works where HeadBucket is not allowed.
        try:
            self._run(None, self.client.list_objects_v2, Bucket=self.bucket, MaxKeys=1, Prefix=self.prefix)
        except bexc.ClientError as exc:
            code = self._code(exc)
            if code in ("403", "AccessDenied"):
                raise PermissionDenied(f"s3://{self.bucket}: access denied (credentials accepted, "
                                       "but they may not list this bucket)") from None
            raise

    def _list_page(self, prefix: str, delimiter: str | None, token: str | None, limit: int) -> ListPage:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": limit}
        if delimiter:
            kw["Delimiter"] = delimiter
        if token:
            kw["ContinuationToken"] = token
        resp = self._hot_call(prefix, "list_objects_v2", **kw)
        page = ListPage()
        for obj in resp.get("Contents", []) or []:
            lm = obj.get("LastModified")
            page.objects.append(ObjectInfo(obj["Key"], int(obj.get("Size", 0)), _unquote(obj.get("ETag")),
                                           lm.timestamp() if lm else None, None))
        page.prefixes = [p["Prefix"] for p in resp.get("CommonPrefixes", []) or []]
        if resp.get("IsTruncated"):
            page.next_token = resp.get("NextContinuationToken")
        return page

    def _head(self, key: str) -> ObjectInfo:
        resp = self._hot_call(key, "head_object", Bucket=self.bucket, Key=key)
        if _synthesized_folder(key, resp):
            raise NotFound(f"s3://{self.bucket}/{key}: no such object (a folder without a marker)")
        lm = resp.get("LastModified")
        return ObjectInfo(key, int(resp.get("ContentLength", 0)), _unquote(resp.get("ETag")),
                          lm.timestamp() if lm else None, dict(resp.get("Metadata") or {}))

    def _get_into(self, key: str, start: int, length: int | None, out: BinaryIO,
                  if_match: str | None) -> None:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if length is not None:
            kw["Range"] = f"bytes={start}-{start + length - 1}"
        elif start:
            kw["Range"] = f"bytes={start}-"
        if if_match:
            kw["IfMatch"] = _quote(if_match)
        try:
            resp = self._run(key, self.client.get_object, **kw)
        except self._botocore_exc.ClientError as exc:
            if self._code(exc) in ("InvalidRange", "416"):
                return  # the range starts at or past the end: nothing to read, like read(2) at EOF
            raise
        body = resp["Body"]
        try:
            with self._about(key):
                for chunk in body.iter_chunks(CHUNK):
                    out.write(chunk)
        finally:
            body.close()

    def _put(self, key: str, payload: Payload, metadata: dict[str, str], if_match: str | None,
             if_none_match: bool) -> str:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Metadata": metadata,
                              "ContentLength": payload.size, "ContentType": self.content_type(key)}
        if if_match:
            kw["IfMatch"] = _quote(if_match)
        if if_none_match:
            kw["IfNoneMatch"] = "*"
        with payload.open() as body:
            if payload.size <= s3_fast.PUT_MAX:  # a small file: one request from memory
                resp = self._hot_call(key, "put_object", Body=body.read(), **kw)
            else:
                resp = self._run(key, self.client.put_object, Body=body, **kw)
        return _unquote(resp.get("ETag")) or ""

    def _copy(self, src: str, dst: str, metadata: dict[str, str] | None) -> str:
        if src == dst and metadata is None:
            return self._head(src).etag or ""  # nothing to change; S3 refuses such a copy
        if self.max_single_copy < self.capabilities.max_part_size:
            # Lowered threshold (tests, stores with a smaller copy limit): decide by size up front.
            info = self._head(src)
            if info.size > self.max_single_copy:
                return self._multipart_copy(src, dst, metadata, info)
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": dst,
                              "CopySource": {"Bucket": self.bucket, "Key": src}}
        if metadata is None:
            kw["MetadataDirective"] = "COPY"
        else:
            kw["MetadataDirective"] = "REPLACE"
            kw["Metadata"] = metadata
            kw["ContentType"] = self.content_type(dst)
        try:
            resp = self._run(src, self.client.copy_object, **kw)
        except self._botocore_exc.ClientError as exc:
            msg = str((exc.response.get("Error") or {}).get("Message") or "")
            if self._code(exc) == "InvalidRequest" and "larger than" in msg:
                return self._multipart_copy(src, dst, metadata, self._head(src))
            raise
        return _unquote((resp.get("CopyObjectResult") or {}).get("ETag")) or ""

    def _multipart_copy(self, src: str, dst: str, metadata: dict[str, str] | None,
                        info: ObjectInfo) -> str:
        """Copy an object too large for CopyObject with UploadPartCopy, pinned to the source ETag."""
        meta = dict(info.metadata or {}) if metadata is None else metadata
        part = self.part_size_for(info.size, self.copy_part_size)
        upload_id = self._mpu_create(dst, meta)
        try:
            parts = []
            for number, offset in enumerate(range(0, info.size, part), start=1):
                ln = min(part, info.size - offset)
                parts.append(PartInfo(number, self._mpu_part_copy(dst, upload_id, number, src, offset, ln,
                                                                  info.etag)))
            return self._mpu_complete(dst, upload_id, parts)
        except BaseException:
            with contextlib.suppress(Exception):
                self._mpu_abort(dst, upload_id)
            raise

    def _delete(self, key: str) -> None:
        try:
            resp = self._run(key, self.client.delete_object, Bucket=self.bucket, Key=key)
        except self._botocore_exc.ClientError as exc:
            if self._code(exc) not in ("NoSuchKey", "404"):
                raise
            return
        if _keeps_folders(resp):
            self._drop_empty_folders([key])

    def _delete_many(self, keys: list[str]) -> None:
        if not keys:
            return
        resp = self._run(None, self.client.delete_objects, Bucket=self.bucket,
                         Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True})
        errors = [e for e in resp.get("Errors", []) or [] if e.get("Code") not in ("NoSuchKey",)]
        if _keeps_folders(resp):
            failed = {e.get("Key") for e in errors}
            self._drop_empty_folders([k for k in keys if k not in failed])
        if not errors:
            return
        first = errors[0]
        code = str(first.get("Code") or "")
        key = first.get("Key")
        fake = self._botocore_exc.ClientError(
            {"Error": {"Code": code, "Message": ""}, "ResponseMetadata": {"HTTPStatusCode": 0}},
            "DeleteObjects")
        fake._cloudfs_key = key  # type: ignore[attr-defined]
        mapped = self._translate(fake) or BackendError(f"s3://{self.bucket}/{key}: delete failed")
        if type(mapped) is BackendError:
            mapped = BackendError(f"s3://{self.bucket}: {len(errors)} of {len(keys)} deletes failed "
                                  f"(first: {key}: {code})")
        raise mapped

    def _drop_empty_folders(self, deleted: list[str]) -> None:
        """After ``deleted`` are gone, delete the folders above them that the store keeps
        although nothing is in them and no marker was ever PUT, deepest first, up to (not
        including) the mount's prefix: on S3 such a folder ends with its last object.
        Deleting ``dir/`` on such a store removes only an empty directory, never its
        contents, so an object stored meanwhile keeps its folder."""
        folders = {k[:i + 1] for k in deleted for i in range(len(self.prefix), len(k) - 1) if k[i] == "/"}
        for folder in sorted(folders, key=lambda f: (-f.count("/"), f)):
            try:
                resp = self._run(folder, self.client.head_object, Bucket=self.bucket, Key=folder)
            except self._botocore_exc.ClientError as exc:
                if self._code(exc) in _NOT_FOUND:
                    continue
                raise
            if _synthesized_folder(folder, resp):
                self._run(folder, self.client.delete_object, Bucket=self.bucket, Key=folder)

    def _mpu_create(self, key: str, metadata: dict[str, str]) -> str:
        resp = self._run(key, self.client.create_multipart_upload, Bucket=self.bucket, Key=key,
                         Metadata=metadata, ContentType=self.content_type(key))
        return resp["UploadId"]

    def _mpu_part(self, key: str, upload_id: str, number: int, payload: Payload) -> str:
        with payload.open() as body:
            resp = self._run(key, self.client.upload_part, Bucket=self.bucket, Key=key, UploadId=upload_id,
                             PartNumber=number, Body=body, ContentLength=payload.size)
        return _unquote(resp.get("ETag")) or ""

    def _mpu_part_copy(self, key: str, upload_id: str, number: int, src_key: str, start: int,
                       length: int, src_etag: str | None) -> str:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "UploadId": upload_id, "PartNumber": number,
                              "CopySource": {"Bucket": self.bucket, "Key": src_key},
                              "CopySourceRange": f"bytes={start}-{start + length - 1}"}
        if src_etag:
            kw["CopySourceIfMatch"] = _quote(src_etag)
        resp = self._run(src_key, self.client.upload_part_copy, **kw)
        return _unquote((resp.get("CopyPartResult") or {}).get("ETag")) or ""

    def _mpu_complete(self, key: str, upload_id: str, parts: list[PartInfo]) -> str:
        resp = self._run(key, self.client.complete_multipart_upload, Bucket=self.bucket, Key=key,
                         UploadId=upload_id,
                         MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": _quote(p.etag)}
                                                    for p in parts]})
        return _unquote(resp.get("ETag")) or ""

    def _mpu_abort(self, key: str, upload_id: str) -> None:
        try:
            self._run(key, self.client.abort_multipart_upload, Bucket=self.bucket, Key=key,
                      UploadId=upload_id)
        except self._botocore_exc.ClientError as exc:
            if self._code(exc) not in ("NoSuchUpload", "404"):
                raise

