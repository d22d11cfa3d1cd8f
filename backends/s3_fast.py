"""A lean request path for the S3 backend's hot calls: HeadObject and ListObjectsV2 (a cold
``ls -l`` sends one HEAD per entry) and PutObject of small bodies (one per small file).

botocore's generic machinery (parameter validation, endpoint ruleset resolution, event
hooks, signing, the generic response parser with dateutil) costs about 2 ms of CPU per
request, and a cold ``ls -l`` sends one HEAD per entry.  Here the endpoint is resolved once
per operation with botocore's own ruleset resolver, each request is built with botocore's
own URL and query encoding, signed by botocore's own signer (the client's refreshing
credentials, session token and signing region), and sent through the client's own
connection pool (``client._endpoint.http_session``: its CA bundle, ``verify``, proxies,
client certificate, timeouts and pool size), or, where nothing in them needs the session
(:class:`Direct`), straight over ``http.client`` connections made as that session makes its
own: urllib3's pool and botocore's response objects cost as much CPU again as the rest.  Only
successful answers are parsed here, cheaply: HEAD and PUT from their headers, LIST with
ElementTree.  Error answers go through botocore's own parser into the same ``ClientError``
the client raises, so ``S3Backend._translate`` maps both paths alike.

:meth:`FastPath.head_object`, :meth:`FastPath.list_objects_v2` and :meth:`FastPath.put_object`
take the client's keyword arguments and return the subset of the client's parsed response
that the backend reads, with the same types and values (``tests/backends/test_s3_fast.py``
compares them).  A PUT's headers are those botocore's own serializer writes for the same
arguments; bodies up to ``PUT_MAX`` are sent from memory, in one signed request.  A PUT goes
through boto3 instead where botocore would add more than the serializer does: a checksum
(``request_checksum_calculation=when_supported``, AWS's default: it may go in an aws-chunked
trailer), or metadata botocore refuses (not ASCII).

Nothing here is shared between two backends: each FastPath belongs to one client.
"""

from __future__ import annotations

import calendar
import datetime
import http.client
import logging
import re
import select
import ssl
import threading
import xml.etree.ElementTree as ET
from typing import Any, NoReturn
from urllib.parse import unquote_plus, urlsplit

log = logging.getLogger(__name__)

HEAD = "HeadObject"
LIST = "ListObjectsV2"
PUT = "PutObject"
PUT_MAX = 1024 * 1024  # larger bodies stream from their file through boto3
_META_PREFIX = "x-amz-meta-"
_MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep",
                                       "Oct", "Nov", "Dec"), start=1)}
# The two timestamp forms S3 sends; anything else is left to botocore's own parser.
_HTTP_DATE = re.compile(r"[A-Z][a-z]{2}, (\d{2}) ([A-Z][a-z]{2}) (\d{4}) (\d{2}):(\d{2}):(\d{2}) GMT")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{3}|\.\d{6})?(?:Z|[+-]\d{2}:\d{2})")


class UseClient(Exception):
    """Send this call through the boto3 client instead.  Carries no URL or header."""


class Redirected(UseClient):
    """The store's answer is one botocore's region redirector acts on (it follows it and
    remembers the bucket's region): the client serves this call, and the endpoints are
    resolved again for the next one."""


class Unsupported(UseClient):
    """This client's configuration cannot be served here; the reason is the message."""


def open_fast_path(client: Any, bucket: str) -> FastPath | None:
    """A FastPath for ``bucket`` on ``client``, or None (logged) when the configuration
    needs something only botocore's full request path does."""
    try:
        return FastPath(client, bucket)
    except Unsupported as exc:
        log.info("s3: HEAD and LIST go through boto3: %s", exc)
        return None


class _Endpoint:
    """Where one operation goes and how it is signed, as botocore's ruleset resolves it."""

    def __init__(self, client: Any, operation: str, bucket: str) -> None:
        self.model = client.meta.service_model.operation_model(operation)
        context: dict[str, Any] = {"client_config": client.meta.config}
        # Key and Prefix are ruleset parameters that no rule reads: one resolution per
        # operation serves every key of the bucket.
        url, headers, props = client._resolve_endpoint_ruleset(self.model, {"Bucket": bucket}, context)
        if headers:
            raise Unsupported("the endpoint ruleset asks for extra headers")
        schemes = [s.get("name") for s in props.get("authSchemes") or []]
        if schemes and schemes[0] != "sigv4":
            raise Unsupported(f"the endpoint is signed with {schemes[0]} (S3 Express, multi-region)")
        signer = client._request_signer
        self.signature_version = signer._choose_signer(operation, "standard", context)
        if self.signature_version != "s3v4":
            raise Unsupported(f"signature version {self.signature_version!r} (only s3v4 is fast)")
        signing = context.get("signing") or {}
        self.url = url
        self.region = signing.get("region") or signer.region_name
        self.signing_name = signing.get("signing_name") or signer.signing_name


class Direct:
    """Requests over ``http.client``, on keep-alive connections made the way the client's
    botocore session makes its own: the same CA bundle (or no verification), connect and
    read timeouts and socket options (TCP keepalive, no Nagle).  A configuration this cannot
    reproduce (a proxy for the endpoint, a client certificate) is ``Unsupported``: requests
    then go through the session.

    Idle connections are kept per origin, at most ``keep`` each; any thread takes one, sends
    one request, and gives it back unless the answer closes it.  A kept connection the server
    has closed meanwhile is found before use, as urllib3 finds it (readable while idle); one
    that fails on use anyway is sent on once more, on a new connection, only for HEAD and GET:
    a PUT the store may have taken is never sent twice."""

    def __init__(self, session: Any, url: str) -> None:
        from botocore.httpsession import create_urllib3_context, get_cert_path

        if session._proxy_config.proxy_url_for(url):
            raise Unsupported("a proxy is configured for the endpoint")
        if session._cert_file:
            raise Unsupported("a client certificate is configured")
        timeout = session._timeout
        self._connect_timeout = getattr(timeout, "connect_timeout", timeout)
        self._read_timeout = getattr(timeout, "read_timeout", timeout)
        self._socket_options = list(session._socket_options or [])
        self._keep = session._max_pool_connections
        verify = session._verify
        self._context = create_urllib3_context()
        if verify:
            self._context.check_hostname = True
            self._context.verify_mode = ssl.CERT_REQUIRED
            self._context.load_verify_locations(cafile=get_cert_path(verify))
        else:
            self._context.check_hostname = False
            self._context.verify_mode = ssl.CERT_NONE
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self._closed = False

    def send(self, method: str, url: str, headers: Any, body: bytes | None) -> Answer:
        """Send a signed request; its answer.  Transport failures raise what botocore's
        session raises for them (``ConnectTimeoutError``, ``ReadTimeoutError``,
        ``EndpointConnectionError``, ``ConnectionClosedError``); a failed certificate check
        its ``SSLCertVerificationError``."""
        from botocore import exceptions

        parts = urlsplit(url)
        origin = (parts.scheme, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        target = parts.path + ("?" + parts.query if parts.query else "")
        for fresh in (False, True):
            conn, reused = self._take(origin, url, fresh)
            try:
                conn.request(method, target, body=body or None, headers=headers)
                resp = conn.getresponse()
                content = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if isinstance(exc, TimeoutError):
                    raise exceptions.ReadTimeoutError(endpoint_url=url) from None
                if reused and method in ("HEAD", "GET"):
                    continue  # closed by the server as it was taken: once more, on a new one
                raise exceptions.ConnectionClosedError(endpoint_url=url) from None
            self._give(origin, conn, resp.will_close)
            return Answer(resp.status, resp.headers, content)
        raise AssertionError("unreachable")

    def _take(self, origin: tuple[str, str, int], url: str,
              fresh: bool) -> tuple[http.client.HTTPConnection, bool]:
        from botocore import exceptions

        while not fresh:
            with self._lock:
                idle = self._idle.get(origin)
                conn = idle.pop() if idle else None
            if conn is None:
                break
            if not _dropped(conn):
                return conn, True
            conn.close()
        scheme, host, port = origin
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=self._connect_timeout,
                                               context=self._context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self._connect_timeout)
        try:
            conn.connect()
            assert conn.sock is not None
            for option in self._socket_options:
                conn.sock.setsockopt(*option)
            conn.sock.settimeout(self._read_timeout)
        except ssl.SSLCertVerificationError:
            conn.close()
            raise
        except TimeoutError:
            conn.close()
            raise exceptions.ConnectTimeoutError(endpoint_url=url) from None
        except OSError:
            conn.close()
            raise exceptions.EndpointConnectionError(endpoint_url=url) from None
        return conn, False

    def _give(self, origin: tuple[str, str, int], conn: http.client.HTTPConnection, closing: bool) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if not closing and not self._closed and len(idle) < self._keep:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle connection was closed by the server (or has bytes nobody asked for):
    readable while idle, as urllib3's ``is_connection_dropped`` tells."""
    if conn.sock is None:
        return True
    poller = select.poll()
    poller.register(conn.sock, select.POLLIN)
    return bool(poller.poll(0))


class Answer:
    """A response as FastPath reads it, from either transport: ``status_code``, ``headers``
    (case-insensitive, iterated in the server's spelling) and ``content``."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status: int, headers: Any, content: bytes) -> None:
        self.status_code = status
        self.headers = headers  # http.client's HTTPMessage, or botocore's HeadersDict
        self.content = content

    def for_botocore(self) -> Answer:
        """The same answer with botocore's header type, for its error parser."""
        from botocore.awsrequest import HeadersDict

        return Answer(self.status_code, HeadersDict(self.headers.items()), self.content)


class FastPath:
    def __init__(self, client: Any, bucket: str) -> None:
        import botocore.handlers

        self._bucket = bucket
        # Invalid bucket names and ARNs (access points, outposts) take boto3's path, which
        # rejects them or rewrites the request for them.
        try:
            botocore.handlers.validate_bucket_name({"Bucket": bucket})
        except Exception:
            raise Unsupported("boto3 refuses this bucket name") from None
        if bucket.startswith("arn:"):
            raise Unsupported("the bucket is an ARN")
        try:
            self._http = client._endpoint.http_session
            self._signer = client._request_signer
            self._parser = client._response_parser
            self._config = client.meta.config
            self._exceptions = client.exceptions
            creator = getattr(client, "_user_agent_creator", None)
            self._user_agent = creator.to_string() if creator is not None else self._config.user_agent
            self._client = client
            self._serializer = client._serializer
            self._endpoints = self._resolve()
        except Unsupported:
            raise
        except Exception as exc:  # a botocore without these internals, an unresolvable endpoint
            raise Unsupported(f"botocore internals not as expected ({type(exc).__name__})") from None
        self._endpoints_stale = False
        try:
            self._direct: Direct | None = Direct(self._http, self._endpoints[HEAD].url)
        except Unsupported as exc:
            log.info("s3: requests go through botocore's session: %s", exc)
            self._direct = None
        except Exception as exc:  # a botocore session without these internals
            log.info("s3: requests go through botocore's session (%s)", type(exc).__name__)
            self._direct = None
        # Only then does botocore add nothing to a PutObject beyond its serialized headers.
        self._puts = getattr(self._config, "request_checksum_calculation", None) == "when_required"

    def _resolve(self) -> dict[str, _Endpoint]:
        # Resolving runs botocore's before-endpoint-resolution hooks, so a region the
        # redirector learned for the bucket is used from then on.
        try:
            return {op: _Endpoint(self._client, op, self._bucket) for op in (HEAD, LIST, PUT)}
        except Unsupported:
            raise
        except Exception as exc:  # an endpoint the ruleset cannot resolve: boto3 says why
            raise Unsupported(f"the endpoint does not resolve ({type(exc).__name__})") from None

    def _endpoint(self, operation: str) -> _Endpoint:
        if self._endpoints_stale:
            self._endpoints_stale = False
            self._endpoints = self._resolve()
        return self._endpoints[operation]

    # ------------------------------------------------------------------ the two calls
    def head_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        """HeadObject: ``ContentLength``, ``ETag``, ``LastModified``, ``Metadata`` as boto3 parses them."""
        assert Bucket == self._bucket
        if not Key:
            raise UseClient()  # boto3's parameter validation refuses an empty key
        return _head_answer(self._send(HEAD, "HEAD", _key_path(Key), {}).headers)

    def list_objects_v2(self, *, Bucket: str, Prefix: str, MaxKeys: int, Delimiter: str | None = None,
                        ContinuationToken: str | None = None) -> dict[str, Any]:
        """ListObjectsV2 with ``encoding-type=url``, which boto3 adds (and decodes) itself."""
        assert Bucket == self._bucket
        # In the order botocore's serializer writes them (the arguments', then its own).
        query: dict[str, Any] = {"list-type": 2, "prefix": Prefix, "max-keys": MaxKeys}
        if Delimiter is not None:
            query["delimiter"] = Delimiter
        if ContinuationToken is not None:
            query["continuation-token"] = ContinuationToken
        query["encoding-type"] = "url"
        resp = self._send(LIST, "GET", "/", query)
        if not resp.content:
            return {}
        root = _xml_root(resp.content)
        if root is None or root.tag == "Error":
            # botocore's _handle_200_error: S3 may answer 200 with an error, or a body cut
            # short; both count as a 500 (retried).
            self._raise_error(self._endpoint(LIST), resp, status=500)
        return _list_answer(root)

    def put_object(self, *, Bucket: str, Key: str, Body: bytes, **params: Any) -> dict[str, Any]:
        """PutObject of a body in memory: ``ETag`` as boto3 parses it.  ``params`` are the
        client's other PutObject arguments (Metadata, ContentType, ContentLength, IfMatch,
        IfNoneMatch, StorageClass, ACL, ...)."""
        assert Bucket == self._bucket
        metadata = params.get("Metadata") or {}
        if (not self._puts or not Key or not isinstance(Body, bytes) or len(Body) > PUT_MAX
                or not all(k.isascii() and v.isascii() for k, v in metadata.items())):
            raise UseClient()
        endpoint = self._endpoint(PUT)
        serialized = self._serializer.serialize_to_request({"Bucket": Bucket, "Key": Key, **params},
                                                           endpoint.model)
        resp = self._send(PUT, "PUT", _key_path(Key), {}, serialized["headers"], Body)
        return {"ETag": resp.headers["etag"]} if "etag" in resp.headers else {}

    # ------------------------------------------------------------------ plumbing
    def _request(self, endpoint: _Endpoint, method: str, path: str, query: dict[str, Any],
                 headers: dict[str, str] | None = None, body: bytes = b"") -> Any:
        """The unsigned AWSRequest, its URL joined and its query encoded by botocore."""
        from botocore.awsrequest import create_request_object, prepare_request_dict

        request_dict = {"url_path": path, "query_string": query, "method": method,
                        "headers": dict(headers or {}), "body": body}
        prepare_request_dict(request_dict, endpoint.url, {"client_config": self._config},
                             self._user_agent)
        return create_request_object(request_dict)

    def _send(self, operation: str, method: str, path: str, query: dict[str, Any],
              headers: dict[str, str] | None = None, body: bytes = b"") -> Any:
        """Build, sign and send one request; the response when it is a success.  An error
        answer raises the ClientError the client would; transport failures raise botocore's
        own exceptions (the http session maps urllib3's)."""
        endpoint = self._endpoint(operation)
        request = self._signed(endpoint, method, path, query, headers, body)
        if self._direct is not None:
            resp: Any = self._direct.send(method, request.url, request.headers, request.body)
        else:
            resp = self._http.send(request)
        if resp.status_code >= 300:
            self._raise_error(endpoint, resp)
        return resp

    def _signed(self, endpoint: _Endpoint, method: str, path: str, query: dict[str, Any],
                headers: dict[str, str] | None = None, body: bytes = b"") -> Any:
        """The request, signed and prepared (``url``, ``headers``, ``body``)."""
        request = self._request(endpoint, method, path, query, headers, body)
        # get_auth_instance freezes the client's credentials (refreshing them when they are
        # about to expire); none at all raises NoCredentialsError when signing, as boto3 does.
        self._signer.get_auth_instance(endpoint.signing_name, endpoint.region,
                                       endpoint.signature_version).add_auth(request)
        return request.prepare()

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()

    def _raise_error(self, endpoint: _Endpoint, resp: Any, status: int | None = None) -> NoReturn:
        from botocore.endpoint import convert_to_response_dict

        if isinstance(resp, Answer):
            resp = resp.for_botocore()
        model = endpoint.model
        response_dict = convert_to_response_dict(resp, model)
        if status is not None:
            response_dict["status_code"] = status
        parsed = self._parser.parse(response_dict, model.output_shape)
        error = parsed.get("Error") or {}
        if _redirector_would_act(endpoint.model.name, response_dict["status_code"], error):
            self._endpoints_stale = True  # the redirector may learn the bucket's region now
            raise Redirected()
        raise self._exceptions.from_code(error.get("Code"))(parsed, endpoint.model.name)


def _key_path(key: str) -> str:
    """An object's path, as botocore's serializer renders "/{Key+}": "/" and "~" kept."""
    from botocore.utils import percent_encode

    return "/" + percent_encode(key, safe="/~")


def _redirector_would_act(operation: str, status: int, error: dict[str, Any]) -> bool:
    """Whether botocore's S3 region redirector (``S3RegionRedirectorv2.redirect_from_error``)
    would look at this error answer: the bucket may live in another region.  Such answers are
    sent again through the client, which follows the redirect or raises what it would."""
    code = error.get("Code")
    return (status in (301, 302, 307)
            or (operation == HEAD and code in ("301", "400"))
            or (code == "AuthorizationHeaderMalformed" and "Region" in error)
            or code in ("PermanentRedirect", "IllegalLocationConstraintException"))


# ---------------------------------------------------------------------- parsing
def _head_answer(headers: Any) -> dict[str, Any]:
    """HeadObject's output from its headers: ``headers`` is the response's case-insensitive
    HeadersDict, whose iteration gives each name as the server spelled it (boto3's metadata
    keys keep that spelling after the prefix)."""
    out: dict[str, Any] = {}
    if "content-length" in headers:
        out["ContentLength"] = int(headers["content-length"])
    if "etag" in headers:
        out["ETag"] = headers["etag"]
    if "last-modified" in headers:
        out["LastModified"] = _http_date(headers["last-modified"])
    n = len(_META_PREFIX)
    out["Metadata"] = {name[n:]: headers[name] for name in headers if name.lower().startswith(_META_PREFIX)}
    return out


def _http_date(text: str) -> datetime.datetime:
    m = _HTTP_DATE.fullmatch(text)
    if m is None or m[2] not in _MONTHS:
        return _botocore_timestamp(text)
    day, _, year, hour, minute, second = m.groups()
    epoch = calendar.timegm((int(year), _MONTHS[m[2]], int(day), int(hour), int(minute), int(second)))
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC)


def _iso_date(text: str) -> datetime.datetime:
    if _ISO_DATE.fullmatch(text) is None:
        return _botocore_timestamp(text)
    return datetime.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)


def _botocore_timestamp(text: str) -> datetime.datetime:
    from botocore.utils import parse_timestamp

    return parse_timestamp(text)


class _Names(dict[str, str]):
    """Element names without their namespace (botocore strips any namespace), remembered
    for one document: a page repeats the same few tags thousands of times."""

    def __missing__(self, tag: str) -> str:
        self[tag] = name = tag.rpartition("}")[2]
        return name


def _list_answer(root: ET.Element) -> dict[str, Any]:
    """ListObjectsV2's output: ``Contents`` (Key, LastModified, ETag, Size), ``CommonPrefixes``,
    ``IsTruncated``, ``NextContinuationToken``; keys and prefixes url-decoded when the answer
    says ``EncodingType=url``, exactly as boto3's ``decode_list_object_v2`` does.  An empty
    element reads as "", as in botocore."""
    names = _Names()
    out: dict[str, Any] = {}
    contents: list[dict[str, Any]] = []
    prefixes: list[dict[str, str]] = []
    for node in root:
        name = names[node.tag]
        if name == "Contents":
            contents.append(_list_entry(node, names))
        elif name == "CommonPrefixes":
            prefixes.append(_prefix_entry(node, names))
        elif name == "IsTruncated":
            out["IsTruncated"] = node.text == "true"
        elif name in ("NextContinuationToken", "EncodingType"):
            out[name] = node.text or ""
    if contents:
        out["Contents"] = contents
    if prefixes:
        out["CommonPrefixes"] = prefixes
    if out.get("EncodingType") == "url":
        for entry in contents:
            entry["Key"] = unquote_plus(entry["Key"])
        for entry in prefixes:
            entry["Prefix"] = unquote_plus(entry["Prefix"])
    return out


def _list_entry(node: ET.Element, names: _Names) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    for child in node:
        name = names[child.tag]
        if name == "Key" or name == "ETag":
            entry[name] = child.text or ""
        elif name == "Size":
            entry[name] = int(child.text or "")
        elif name == "LastModified":
            entry[name] = _iso_date(child.text or "")
    return entry


def _prefix_entry(node: ET.Element, names: _Names) -> dict[str, str]:
    entry: dict[str, str] = {}
    for child in node:
        if names[child.tag] == "Prefix":
            entry["Prefix"] = child.text or ""
    return entry


def _xml_root(body: bytes) -> ET.Element | None:
    """The document's root, read as UTF-8 whatever it declares (as botocore reads it); None
    when the body is no well-formed XML."""
    parser = ET.XMLParser(encoding="utf-8")
    try:
        parser.feed(body)
        return parser.close()
    except ET.ParseError:
        return None
