"""Backblaze B2 for the tests: B2's native HTTP API over b2sdk's own ``RawSimulator``, on 127.0.0.1.

No B2 server exists in the registries we can reach, so this module is one.  b2sdk ships
``RawSimulator``, which carries B2's server-side behaviour (versions, hide markers, large
files with part SHA1s, server-side copies, application keys with capabilities); this file
only puts HTTP in front of it::

    python -m tests.servers.b2 --host 127.0.0.1 --port PORT --key-id ID --key KEY

It accepts that key pair (creating the account) and serves it at ``http://HOST:PORT`` as
the realm: ``B2Api.authorize_account(realm, ...)`` takes any URL and then calls
``POST <realm>/b2api/v3/b2_authorize_account`` with Basic auth.  It runs in the foreground
until SIGTERM.  The same process answers the API calls, uploads (``/upload/...``) and
downloads (``/file/BUCKET/NAME``, ``b2_download_file_by_id``, with ``Range``).

Calls served: ``b2_authorize_account``, ``list_buckets``, ``create_bucket``, ``create_key``,
``list_file_names`` (with ``delimiter``), ``list_file_versions``, ``get_upload_url``,
``upload_file``, ``start_large_file``, ``get_upload_part_url``, ``upload_part``,
``finish_large_file``, ``cancel_large_file``, ``list_parts``, ``download_file_by_name`` and
``_by_id``, ``copy_file``, ``copy_part``, ``delete_file_version``, ``hide_file``,
``get_file_info``.

Where the simulator differs from B2, this server follows B2 (the tests are not weakened):

* a version made by ``copy_file`` was not registered, so deleting it failed with
  FileNotPresent; it is registered now;
* ``copy_file`` refused sources over 200 bytes (its default part size): the limit is B2's 5 GB;
  the minimum part size is B2's 5 MB, and the recommended one 100 MB;
* ``REPLACE`` with an empty ``fileInfo`` kept the source's file info: it is emptied;
* upload timestamps counted from 5 s after the epoch: they are the real clock (strictly
  increasing); file ids were 4 digits (9999 files per bucket, sorted as strings) and there
  were 100 buckets and 200 upload URLs per bucket at most: all are unbounded now;
* unfinished large files hid the finished version of the same name from
  ``list_file_names``: B2 does not list them there;
* ``list_file_names`` had no ``delimiter``; it has B2's (folders come back with
  ``action: "folder"``);
* a key restricted to a bucket could not upload, hide or copy (the bucket was not checked
  with its id); the request's bucket is used;
* ``hide_file`` on a name with no visible version answers 400 ``no_such_file`` (an already
  hidden one ``already_hidden``), as B2 does; an expired token answers 401
  ``expired_auth_token``.

Faults, like B2's ``X-Bz-Test-Mode`` header (which is honoured too: ``fail_some_uploads``
fails every other upload carrying it with 503, ``expire_some_account_authorization_tokens``
expires the token of every other call carrying it, ``force_cap_exceeded`` answers 403
``cap_exceeded``), can be planned deterministically by the tests with
``POST /cloudfs-test/faults`` and a JSON body: ``{"fail_uploads": N}`` makes the next N
uploads (files or parts) fail with 503 ``service_unavailable``, ``{"expire_tokens": true}``
expires every account token issued so far, ``{"cap_exceeded": N}`` fails the next N uploads
with 403 ``storage_cap_exceeded``.  ``GET /cloudfs-test/stats`` returns the requests served
by call name.
"""

from __future__ import annotations

import argparse
import base64
import collections
import itertools
import json
import re
import signal
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from b2sdk._internal.raw_api import MetadataDirectiveMode
from b2sdk._internal.raw_simulator import BucketSimulator, RawSimulator
from b2sdk.v2 import exception as b2exc

from . import Target
from .process import ManagedProcess, free_port, http_ready

REPO = Path(__file__).resolve().parents[2]
FAKE_UPLOAD = "https://upload.example.com/"
MB = 1000 * 1000


class _Clock:
    """Upload timestamps: wall-clock milliseconds, strictly increasing."""

    def __init__(self) -> None:
        self.last = 0

    def __iter__(self) -> _Clock:
        return self

    def __next__(self) -> int:
        self.last = max(self.last + 1, int(time.time() * 1000))
        return self.last


CLOCK = _Clock()


class Bucket(BucketSimulator):
    MAX_SIMPLE_COPY_SIZE = 5 * 1000 * MB
    FIRST_FILE_NUMBER = 10**12 - 1  # 12 digits: ids sort as strings and as numbers alike
    FIRST_FILE_ID = str(FIRST_FILE_NUMBER)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.upload_url_counter = itertools.count()
        self.file_id_counter = iter(range(self.FIRST_FILE_NUMBER, 0, -1))
        self.upload_timestamp_counter = CLOCK

    def list_file_names(self, account_auth_token: str, start_file_name: str | None = None,
                        max_file_count: int | None = None, prefix: str | None = None,
                        delimiter: str | None = None) -> dict[str, Any]:
        start = start_file_name or ""
        prefix = prefix or ""
        limit = max_file_count or 100
        files: list[dict[str, Any]] = []
        previous = None
        for name, file_id in sorted(self.file_name_and_id_to_file):
            if name < start or not name.startswith(prefix):
                if name > start and name > prefix and not name.startswith(prefix):
                    break
                continue
            sim = self.file_name_and_id_to_file[(name, file_id)]
            if sim.action == "start":
                continue  # unfinished large files are not listed, and hide nothing
            if name == previous:
                continue  # an older version
            previous = name
            if not sim.is_visible():
                continue  # hidden: not listed, and makes no folder
            if delimiter:
                cut = name.find(delimiter, len(prefix))
                if cut >= 0:
                    folder = name[:cut + len(delimiter)]
                    if not files or files[-1]["fileName"] != folder:
                        if len(files) == limit:
                            return {"files": files, "nextFileName": folder}
                        files.append({"action": "folder", "fileName": folder, "fileId": None,
                                      "contentLength": 0, "fileInfo": {}, "uploadTimestamp": 0})
                    continue
            if len(files) == limit:
                return {"files": files, "nextFileName": name}
            files.append(sim.as_list_files_dict(account_auth_token))
        return {"files": files, "nextFileName": None}

    def copy_file(self, *args: Any, **kwargs: Any) -> Any:
        result = super().copy_file(*args, **kwargs)
        names = ["account_auth_token", "file_id", "new_file_name", "bytes_range", "metadata_directive",
                 "content_type", "file_info"]
        given = {**dict(zip(names, args, strict=False)), **kwargs}
        if given.get("metadata_directive") is MetadataDirectiveMode.REPLACE:
            result.file_info = dict(given.get("file_info") or {})
            result.bucket.file_id_to_file[result.file_id].file_info = dict(result.file_info)
        return result

    def hide_file(self, account_auth_token: str, file_name: str) -> dict[str, Any]:
        versions = [sim for (name, _), sim in sorted(self.file_name_and_id_to_file.items())
                    if name == file_name and sim.action != "start"]
        if not versions:
            raise b2exc.FileNotPresent(file_id_or_name=file_name)
        if versions[0].action == "hide":
            raise b2exc.FileAlreadyHidden(file_name)
        return super().hide_file(account_auth_token, file_name)


class Simulator(RawSimulator):
    BUCKET_SIMULATOR_CLASS = Bucket
    MIN_PART_SIZE = 5 * MB

    def __init__(self) -> None:
        super().__init__()
        self.bucket_id_counter = itertools.count()

    # The bucket the running request is about: the simulator checks a key restricted to a
    # bucket with the bucket id, which several of its calls do not pass (so such keys could
    # not upload, hide or copy at all).
    request_bucket: str | None = None

    def _assert_account_auth(self, api_url: str, account_auth_token: str, account_id: str, capability: str,
                             bucket_id: str | None = None, file_name: str | None = None) -> None:
        super()._assert_account_auth(api_url, account_auth_token, account_id, capability,
                                     bucket_id or self.request_bucket, file_name)

    def copy_file(self, *args: Any, **kwargs: Any) -> Any:
        result = super().copy_file(*args, **kwargs)
        dest = kwargs.get("destination_bucket_id") or self.file_id_to_bucket_id[kwargs["source_file_id"]]
        self.file_id_to_bucket_id[result["fileId"]] = dest
        return result


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


# Exceptions of the simulator and the status and code B2 answers with.
_STATUS: list[tuple[type[Exception], int, str]] = [
    (b2exc.FileAlreadyHidden, 400, "already_hidden"),
    (b2exc.FileNotPresent, 404, "not_found"),
    (b2exc.NonExistentBucket, 400, "bad_bucket_id"),
    (b2exc.DuplicateBucketName, 400, "duplicate_bucket_name"),
    (b2exc.MissingPart, 400, "missing_part"),
    (b2exc.PartSha1Mismatch, 400, "part_sha1_mismatch"),
]


def error_for(exc: Exception) -> ApiError:
    """B2's status and code for an exception the simulator raised."""
    if isinstance(exc, ApiError):
        return exc
    message = str(exc)
    if isinstance(exc, b2exc.InvalidAuthToken):
        code = "expired_auth_token" if "expired" in message else "bad_auth_token"
        return ApiError(401, code, message)
    if isinstance(exc, b2exc.Unauthorized):
        return ApiError(401, "unauthorized", message or "the key lacks a capability for this call")
    for cls, status, code in _STATUS:
        if isinstance(exc, cls):
            return ApiError(status, code, message)
    if isinstance(exc, b2exc.FileSha1Mismatch | b2exc.ChecksumMismatch):
        return ApiError(400, "bad_request", f"checksum did not match data received: {message}")
    if isinstance(exc, b2exc.CopySourceTooBig):
        return ApiError(400, "source_too_large", f"Copy source too big: {exc.size}")
    if isinstance(exc, b2exc.UnsatisfiableRange):
        return ApiError(416, "range_not_satisfiable", message)
    if isinstance(exc, b2exc.AccessDenied):
        return ApiError(403, "access_denied", message)
    if isinstance(exc, b2exc.B2Error):
        return ApiError(400, "bad_request", message)
    return ApiError(500, "internal_error", f"{type(exc).__name__}: {message}")


class Faults:
    def __init__(self) -> None:
        self.fail_uploads = 0
        self.cap_exceeded = 0
        self.header_uploads = 0
        self.header_tokens = 0


class B2Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, key_id: str, key: str) -> None:
        super().__init__((host, port), Handler)
        self.base = f"http://{host}:{self.server_address[1]}"
        self.sim = Simulator()
        account_id, _ = self.sim.create_account()
        # The account's master key is the pair given on the command line.
        master_key = self.sim.key_id_to_key.pop(account_id)
        master_key.application_key_id, master_key.key = key_id, key
        self.sim.key_id_to_key[key_id] = master_key
        self.lock = threading.Lock()
        self.faults = Faults()
        self.stats: collections.Counter[str] = collections.Counter()


class Handler(BaseHTTPRequestHandler):
    server: B2Server
    protocol_version = "HTTP/1.1"
    # A reply is written in two sends (headers, then body): with Nagle's algorithm on, the body
    # waits for the client's delayed ACK of the headers, 40 ms on Linux, on every request.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(obj, default=_jsonable).encode())

    def _error(self, err: ApiError) -> None:
        self._send(err.status, json.dumps({"status": err.status, "code": err.code,
                                           "message": err.message}).encode(), err.headers)

    def _test_mode(self, name: str) -> bool:
        return name in (self.headers.get("X-Bz-Test-Mode") or "")

    def _run(self, op: str, fn: Any) -> None:
        self.server.stats[op] += 1
        try:
            with self.server.lock:
                result = json.dumps(fn(), default=_jsonable).encode()
        except Exception as exc:  # every failure becomes B2's JSON error
            self._error(error_for(exc))
            return
        self._send(200, result)

    # ------------------------------------------------------------------ routes
    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path)
        if path.path == "/cloudfs-test/stats":
            self._json(dict(self.server.stats))
        elif path.path.startswith("/file/"):
            bucket, _, name = path.path[len("/file/"):].partition("/")
            self._download("download_file_by_name", urllib.parse.unquote(bucket),
                           urllib.parse.unquote(name), None)
        elif re.fullmatch(r"/b2api/v\d+/b2_download_file_by_id", path.path):
            file_id = urllib.parse.parse_qs(path.query).get("fileId", [""])[0]
            self._download("download_file_by_id", None, None, file_id)
        else:
            self._error(ApiError(404, "not_found", f"no such path {path.path}"))

    do_HEAD = do_GET

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        body = self._body()
        if path == "/cloudfs-test/faults":
            plan = json.loads(body or b"{}")
            with self.server.lock:
                faults = self.server.faults
                faults.fail_uploads += int(plan.get("fail_uploads", 0))
                faults.cap_exceeded += int(plan.get("cap_exceeded", 0))
                if plan.get("expire_tokens"):
                    for token in list(self.server.sim.auth_token_to_key):
                        self.server.sim.expire_auth_token(token)
            self._json({})
            return
        if path.startswith("/upload/"):
            self._upload(FAKE_UPLOAD + path[len("/upload/"):], body)
            return
        m = re.fullmatch(r"/b2api/v\d+/b2_(\w+)", path)
        if m is None:
            self._error(ApiError(404, "not_found", f"no such path {path}"))
            return
        op = m.group(1)
        try:
            params = json.loads(body or b"{}")
        except ValueError:
            self._error(ApiError(400, "bad_json", "the body is not JSON"))
            return
        if op == "authorize_account":
            self._run(op, lambda: self._authorize())
            return
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            self._error(ApiError(400, "bad_request", f"b2_{op} is not served by this test server"))
            return
        token = self.headers.get("Authorization", "")
        if token not in self.server.sim.auth_token_to_key:
            self.server.stats[op] += 1
            self._error(ApiError(401, "bad_auth_token", "missing or unknown authorization token"))
            return
        if self._test_mode("expire_some_account_authorization_tokens"):
            with self.server.lock:
                self.server.faults.header_tokens += 1
                if self.server.faults.header_tokens % 2 == 1 and token in self.server.sim.auth_token_to_key:
                    self.server.sim.expire_auth_token(token)
        sim = self.server.sim
        file_id = params.get("fileId") or params.get("sourceFileId") or params.get("largeFileId")
        with self.server.lock:
            sim.request_bucket = params.get("bucketId") or sim.file_id_to_bucket_id.get(file_id)
        self._run(op, lambda: handler(token, params))

    # ------------------------------------------------------------------ calls
    def _authorize(self) -> dict[str, Any]:
        auth = self.headers.get("Authorization", "")
        try:
            key_id, _, key = base64.b64decode(auth.removeprefix("Basic ").strip()).decode().partition(":")
        except ValueError:
            raise ApiError(401, "bad_auth_token", "malformed Basic authorization") from None
        result = self.server.sim.authorize_account(self.server.base, key_id, key)
        storage = result["apiInfo"]["storageApi"]
        storage["apiUrl"] = storage["downloadUrl"] = self.server.base
        storage["recommendedPartSize"] = 100 * MB
        storage["absoluteMinimumPartSize"] = 5 * MB
        # v3 names one bucket (or none) beside v4's list of allowed buckets.
        buckets = storage["allowed"].get("buckets") or [{}]
        storage["bucketId"], storage["bucketName"] = buckets[0].get("id"), buckets[0].get("name")
        # b2sdk's v2 clients read the v2 (flat) form, v3 clients the nested one.
        result.update({"apiUrl": self.server.base, "downloadUrl": self.server.base,
                       "recommendedPartSize": 100 * MB, "absoluteMinimumPartSize": 5 * MB,
                       "allowed": storage["allowed"], "s3ApiUrl": storage["s3ApiUrl"]})
        return result

    def _api(self) -> str:
        return self.server.sim.API_URL

    def _op_list_buckets(self, token: str, p: dict[str, Any]) -> Any:
        return self.server.sim.list_buckets(self._api(), token, p["accountId"], p.get("bucketId"),
                                            p.get("bucketName"))

    def _op_create_bucket(self, token: str, p: dict[str, Any]) -> Any:
        return self.server.sim.create_bucket(self._api(), token, p["accountId"], p["bucketName"],
                                             p.get("bucketType", "allPrivate"), p.get("bucketInfo"))

    def _op_create_key(self, token: str, p: dict[str, Any]) -> Any:
        return self.server.sim.create_key(self._api(), token, p["accountId"], p["capabilities"],
                                          p["keyName"], p.get("validDurationInSeconds"),
                                          p.get("bucketIds") or _one(p.get("bucketId")),
                                          p.get("namePrefix"))

    def _op_list_file_names(self, token: str, p: dict[str, Any]) -> Any:
        sim = self.server.sim
        bucket = sim._get_bucket_by_id(p["bucketId"])
        sim._assert_account_auth(self._api(), token, bucket.account_id, "listFiles",
                                 bucket_id=p["bucketId"], file_name=p.get("prefix"))
        return bucket.list_file_names(token, p.get("startFileName"), p.get("maxFileCount"),
                                      p.get("prefix"), p.get("delimiter"))

    def _op_list_file_versions(self, token: str, p: dict[str, Any]) -> Any:
        return self.server.sim.list_file_versions(self._api(), token, p["bucketId"], p.get("startFileName"),
                                                  p.get("startFileId"), p.get("maxFileCount"),
                                                  p.get("prefix"))

    def _op_get_upload_url(self, token: str, p: dict[str, Any]) -> Any:
        return self._local_upload_url(self.server.sim.get_upload_url(self._api(), token, p["bucketId"]))

    def _op_get_upload_part_url(self, token: str, p: dict[str, Any]) -> Any:
        return self._local_upload_url(self.server.sim.get_upload_part_url(self._api(), token, p["fileId"]))

    def _local_upload_url(self, result: dict[str, Any]) -> dict[str, Any]:
        result["uploadUrl"] = f"{self.server.base}/upload/{result['uploadUrl'][len(FAKE_UPLOAD):]}"
        return result

    def _op_start_large_file(self, token: str, p: dict[str, Any]) -> Any:
        return self.server.sim.start_large_file(self._api(), token, p["bucketId"], p["fileName"],
                                                p.get("contentType", "b2/x-auto"), p.get("fileInfo") or {})

    def _op_finish_large_file(self, token: str, p: dict[str, Any]) -> Any:
        return self.server.sim.finish_large_file(self._api(), token, p["fileId"], p["partSha1Array"])

    def _op_cancel_large_file(self, token: str, p: dict[str, Any]) -> Any:
        return self.server.sim.cancel_large_file(self._api(), token, p["fileId"])

    def _op_list_parts(self, token: str, p: dict[str, Any]) -> Any:
        return self.server.sim.list_parts(self._api(), token, p["fileId"], p.get("startPartNumber"),
                                          p.get("maxPartCount"))

    def _op_delete_file_version(self, token: str, p: dict[str, Any]) -> Any:
        return self.server.sim.delete_file_version(self._api(), token, p["fileId"], p["fileName"])

    def _op_hide_file(self, token: str, p: dict[str, Any]) -> Any:
        return self.server.sim.hide_file(self._api(), token, p["bucketId"], p["fileName"])

    def _op_get_file_info(self, token: str, p: dict[str, Any]) -> Any:
        sim = self.server.sim
        bucket_id = sim.file_id_to_bucket_id.get(p["fileId"])
        if bucket_id is None:
            raise b2exc.FileNotPresent(file_id_or_name=p["fileId"])
        bucket = sim._get_bucket_by_id(bucket_id)
        sim._assert_account_auth(self._api(), token, bucket.account_id, "readFiles")
        if p["fileId"] not in bucket.file_id_to_file:
            raise b2exc.FileNotPresent(file_id_or_name=p["fileId"])
        return sim.get_file_info_by_id(self._api(), token, p["fileId"])

    def _op_copy_file(self, token: str, p: dict[str, Any]) -> Any:
        directive = p.get("metadataDirective")
        return self.server.sim.copy_file(
            self._api(), token, source_file_id=self._known(p["sourceFileId"]), new_file_name=p["fileName"],
            bytes_range=_range(p.get("range")),
            metadata_directive=MetadataDirectiveMode[directive] if directive else None,
            content_type=p.get("contentType"), file_info=p.get("fileInfo"),
            destination_bucket_id=p.get("destinationBucketId"))

    def _op_copy_part(self, token: str, p: dict[str, Any]) -> Any:
        return self.server.sim.copy_part(self._api(), token, self._known(p["sourceFileId"]),
                                         p["largeFileId"], p["partNumber"], _range(p.get("range")))

    def _known(self, file_id: str) -> str:
        bucket_id = self.server.sim.file_id_to_bucket_id.get(file_id)
        if bucket_id is None or file_id not in self.server.sim.bucket_id_to_bucket[bucket_id].file_id_to_file:
            raise b2exc.FileNotPresent(file_id_or_name=file_id)
        return file_id

    # ------------------------------------------------------------------ data
    def _upload(self, sim_url: str, body: bytes) -> None:
        import io

        part = sim_url.startswith(FAKE_UPLOAD + "part/")
        op = "upload_part" if part else "upload_file"
        faults = self.server.faults
        with self.server.lock:
            if self._test_mode("fail_some_uploads"):
                faults.header_uploads += 1
                if faults.header_uploads % 2 == 1:
                    faults.fail_uploads += 1
            if self._test_mode("force_cap_exceeded"):
                self.server.stats[op] += 1
                self._error(ApiError(403, "cap_exceeded", "Cannot upload files, storage cap exceeded."))
                return
            if faults.fail_uploads:
                faults.fail_uploads -= 1
                self.server.stats[op] += 1
                self._error(ApiError(503, "service_unavailable", "c001_v0001000_t0001 is too busy"))
                return
            if faults.cap_exceeded:
                faults.cap_exceeded -= 1
                self.server.stats[op] += 1
                self._error(ApiError(403, "storage_cap_exceeded", "Cannot upload files, storage cap "
                                     "exceeded."))
                return
        if self.headers.get("Authorization") != sim_url:
            self.server.stats[op] += 1
            self._error(ApiError(401, "bad_auth_token", "the upload token does not match the URL"))
            return
        sha1 = self.headers.get("X-Bz-Content-Sha1", "")
        sim = self.server.sim
        if part:
            self._run(op, lambda: sim.upload_part(sim_url, sim_url, int(self.headers["X-Bz-Part-Number"]),
                                                  len(body), sha1, io.BytesIO(body)))
            return
        info = {k[len("X-Bz-Info-"):]: urllib.parse.unquote(v) for k, v in self.headers.items()
                if k.lower().startswith("x-bz-info-")}
        name = urllib.parse.unquote(self.headers.get("X-Bz-File-Name", ""))
        content_type = self.headers.get("Content-Type") or "b2/x-auto"
        self._run(op, lambda: sim.upload_file(sim_url, sim_url, name, len(body), content_type, sha1, info,
                                              io.BytesIO(body)))

    def _download(self, op: str, bucket_name: str | None, name: str | None, file_id: str | None) -> None:
        self.server.stats[op] += 1
        sim = self.server.sim
        token = self.headers.get("Authorization", "")
        try:
            with self.server.lock:
                if file_id is not None:
                    bucket_id = sim.file_id_to_bucket_id.get(file_id)
                    if bucket_id is None:
                        raise b2exc.FileNotPresent(file_id_or_name=file_id)
                    bucket = sim._get_bucket_by_id(bucket_id)
                else:
                    bucket = sim._get_bucket_by_name(bucket_name)
                if bucket.bucket_type != "allPublic":
                    if token not in sim.auth_token_to_key:
                        raise ApiError(401, "bad_auth_token", "missing or unknown authorization token")
                    sim._assert_account_auth(sim.API_URL, token, bucket.account_id, "readFiles",
                                             bucket_id=bucket.bucket_id, file_name=name)
                if file_id is not None:
                    file_sim = bucket.file_id_to_file.get(file_id)
                    if file_sim is None or file_sim.action != "upload":
                        raise b2exc.FileNotPresent(file_id_or_name=file_id)
                else:
                    assert name is not None
                    listed = bucket.list_file_names(token, name, 1, name)["files"]
                    if not listed or listed[0]["fileName"] != name:
                        raise b2exc.FileNotPresent(file_id_or_name=name)
                    file_sim = bucket.file_id_to_file[listed[0]["fileId"]]
                data = file_sim.data_bytes
                headers = dict(file_sim.as_download_headers(token))
        except Exception as exc:
            self._error(error_for(exc))
            return
        headers.pop("content-length", None)
        headers.pop("content-type", None)
        status = 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m is None:
                self._error(ApiError(400, "bad_request", f"bad Range {rng!r}"))
                return
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
            if start >= len(data) or start > end:
                self._error(ApiError(416, "range_not_satisfiable", f"range {rng} of {len(data)} bytes"))
                return
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data = data[start:end + 1]
            status = 206
        self._send(status, data, headers, file_sim.content_type or "application/octet-stream")


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value)
    if hasattr(value, "value"):  # enums
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON")


def _one(value: str | None) -> list[str] | None:
    return [value] if value else None


def _range(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    m = re.fullmatch(r"bytes=(\d+)-(\d+)", text.strip())
    if m is None:
        raise ApiError(400, "bad_request", f"bad range {text!r}")
    return int(m.group(1)), int(m.group(2))


# ---------------------------------------------------------------------- the test session's side
KEY_ID = "cloudfs-test-key-id"
KEY = "cloudfs-test-application-key"


class Server:
    """The conformance target: this module run as its own process, one fresh bucket per test."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.proc: ManagedProcess | None = None
        self._n = itertools.count()
        self._run = uuid.uuid4().hex[:8]
        self.api: Any = None

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.port = free_port()
        self.proc = ManagedProcess(
            "b2-server",
            [sys.executable, "-m", "tests.servers.b2", "--host", "127.0.0.1", "--port", str(self.port),
             "--key-id", KEY_ID, "--key", KEY],
            self.workdir, cwd=str(REPO))
        self.proc.start(lambda: http_ready(f"{self.realm}/cloudfs-test/stats"), timeout=30)
        try:
            self.api = sdk_api(self.realm)
        except Exception:
            self.proc.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.stop()

    @property
    def env(self) -> dict[str, str]:
        return {"B2_APPLICATION_KEY_ID": KEY_ID, "B2_APPLICATION_KEY": KEY}

    def new_bucket(self) -> Target:
        name = f"cloudfs-{self._run}-{next(self._n)}"
        bucket = self.api.create_bucket(name, "allPrivate")
        return Target("b2", f"b2://{name}", env=dict(self.env), options={"endpoint": self.realm},
                      sdk=bucket, extra={"bucket": name, "realm": self.realm, "port": self.port,
                                         "api": self.api})

    def faults(self, **plan: Any) -> None:
        post_json(f"{self.realm}/cloudfs-test/faults", plan)

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.realm}/cloudfs-test/stats", timeout=10) as resp:
            return json.loads(resp.read())


def sdk_api(realm: str, key_id: str = KEY_ID, key: str = KEY) -> Any:
    """b2sdk's own client, authorized against the test server (for interop checks)."""
    from b2sdk.v2 import B2Api, InMemoryAccountInfo

    api = B2Api(InMemoryAccountInfo())
    api.authorize_account(realm, key_id, key)
    return api


def post_json(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"{}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.servers.b2", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key-id", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args(argv)
    server = B2Server(args.host, args.port, args.key_id, args.key)

    def stop(*_: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"b2 test server on {server.base}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
