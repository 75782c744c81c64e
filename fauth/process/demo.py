# -*- test-case-name: tests.process.test_demo -*-
"""In-process demo services started by the quickstart configuration.

Two plain C{twisted.web} leaf resources stand in for the outside world, so
that a fresh checkout can show the gateway working end to end:

  - L{DemoAuthResource}, a mock forward-auth service modelled on the one
    in APISIX's C{forward-auth} tests;
  - L{EchoResource}, a small httpbin-like upstream that echoes what it
    received (headers, body digest, ...) so a caller can see what the gateway
    forwarded.

L{demo_services} wraps both into a C{MultiService} listening on Twisted
endpoint descriptions.  Nothing here imports the global reactor: it is always
passed in.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Tuple
from urllib.parse import unquote_to_bytes

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorCore
    from twisted.web.http import Request as HTTPRequest
    from twisted.web.resource import IResource

__all__ = [
    "AUTH_SERVICE_NAME",
    "UPSTREAM_SERVICE_NAME",
    "MAX_BYTES",
    "DemoAuthResource",
    "EchoResource",
    "demo_services",
    "quiet_site",
]

#: Name of the auth child service inside L{demo_services}' result.
AUTH_SERVICE_NAME = "demo-auth"
#: Name of the echo upstream child service inside L{demo_services}' result.
UPSTREAM_SERVICE_NAME = "demo-upstream"

#: Upper bound for C{/bytes/<n>}: large enough for throughput tests, small
#: enough that a typo cannot make the demo stream for minutes.
MAX_BYTES = 100 * 1024 * 1024

_CHUNK_SIZE = 64 * 1024
_CHUNK = b"x" * _CHUNK_SIZE

_TEXT_PLAIN = b"text/plain; charset=utf-8"
_APPLICATION_JSON = b"application/json"
_OCTET_STREAM = b"application/octet-stream"
_FORM_URLENCODED = b"application/x-www-form-urlencoded"

_HeaderList = Iterable[Tuple[bytes, bytes]]


def _respond(
    request: Request,
    code: int,
    body: bytes = b"",
    content_type: Optional[bytes] = None,
    headers: _HeaderList = (),
) -> object:
    """
    Send a complete response with an explicit C{Content-Length}.

    Writing (rather than returning the body from C{render}) keeps HEAD
    responses honest: Twisted sends the headers, including the length the
    GET would have had, and drops the body.  An explicit length also keeps
    the connection reusable (no chunked encoding, no close).

    @return: C{NOT_DONE_YET}, for C{render} to return.
    """
    request.setResponseCode(code)
    for name, value in headers:
        request.setHeader(name, value)
    if content_type is not None:
        request.setHeader(b"Content-Type", content_type)
    # 204/304 must not carry a Content-Length describing a body.
    if code not in NO_BODY_CODES:
        request.setHeader(b"Content-Length", b"%d" % (len(body),))
    request.write(body)
    request.finish()
    return NOT_DONE_YET


def _respond_json(request: Request, code: int, payload: Any) -> object:
    """Send C{payload} as a JSON document (see L{_respond})."""
    body = json.dumps(payload).encode("utf-8")
    return _respond(request, code, body, _APPLICATION_JSON)


class DemoAuthResource(Resource):
    """
    Mock forward-auth service, answering any method on any path.

      - C{/auth}: 200 with C{X-User-ID: i-am-user} when the request carries a
        non-empty C{tenant_id} header, else 400 C{tenant_id is required}.
      - any other path, by C{Authorization}: C{123} → 200; C{321} → 200 with
        C{X-User-ID: i-am-user}; anything else (or none) → 403 with
        C{Location: http://example.com/auth} and C{X-Forward-Auth: Fail}.
    """

    isLeaf = True

    def render(self, request: Request) -> object:
        """Answer one auth check (overrides per-method dispatch: any method)."""
        if request.path == b"/auth":
            tenant = request.getHeader(b"tenant_id")
            if tenant:
                return _respond(request, 200, headers=[(b"X-User-ID", b"i-am-user")])
            return _respond(request, 400, b"tenant_id is required", _TEXT_PLAIN)

        authorization = request.getHeader(b"Authorization")
        if authorization == b"123":
            return _respond(request, 200)
        if authorization == b"321":
            return _respond(request, 200, headers=[(b"X-User-ID", b"i-am-user")])
        return _respond(
            request,
            403,
            b"403 Forbidden",
            _TEXT_PLAIN,
            headers=[
                (b"Location", b"http://example.com/auth"),
                (b"X-Forward-Auth", b"Fail"),
            ],
        )


def _decode_component(raw: bytes) -> str:
    """Decode one C{application/x-www-form-urlencoded} name or value."""
    return unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8", "replace")


def _parse_urlencoded(data: bytes) -> Dict[str, str]:
    """
    Parse a query string or urlencoded form into C{{name: first value}}.

    Works on bytes so undecodable input degrades to U+FFFD rather than
    raising (C{urllib.parse.parse_qs} on bytes insists on ASCII).
    """
    result: Dict[str, str] = {}
    for part in data.split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        result.setdefault(_decode_component(name), _decode_component(value))
    return result


def _media_type(request: Request) -> bytes:
    """Return the request's lower-cased media type, without parameters."""
    value = request.getHeader(b"Content-Type") or b""
    return value.split(b";", 1)[0].strip().lower()


def _echo_headers(request: Request) -> Dict[str, str]:
    """
    Return the request headers as C{{Canonical-Name: "v1,v2"}}.

    Values are decoded as latin-1 so the mapping is lossless: a test can
    C{.encode("latin-1")} a value to get the exact bytes that arrived.
    """
    return {
        name.decode("latin-1"): ",".join(v.decode("latin-1") for v in values)
        for name, values in request.requestHeaders.getAllRawHeaders()
    }


def _read_body(request: Request) -> bytes:
    """Return the whole request body (Twisted has already buffered it)."""
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    return content.read()


def _describe(request: Request) -> Dict[str, Any]:
    """Build the httpbin-style description of a request."""
    body = _read_body(request)
    media_type = _media_type(request)
    _, _, query = request.uri.partition(b"?")

    parsed_json: Any = None
    if media_type == _APPLICATION_JSON or media_type.endswith(b"+json"):
        try:
            parsed_json = json.loads(body)
        except (ValueError, RecursionError):
            # Not JSON after all (or undecodable): report null like httpbin.
            parsed_json = None

    form: Dict[str, str] = {}
    if media_type == _FORM_URLENCODED:
        form = _parse_urlencoded(body)

    return {
        "method": request.method.decode("latin-1"),
        "url": request.uri.decode("latin-1"),
        "args": _parse_urlencoded(query),
        "headers": _echo_headers(request),
        "data": body.decode("utf-8", "replace"),
        "json": parsed_json,
        "form": form,
        "sha256": hashlib.sha256(body).hexdigest(),
        "length": len(body),
    }


@implementer(IPushProducer)
class _RepeatedBytesProducer:
    """
    Stream C{total} bytes of C{b"x"} into a request, honouring backpressure.

    It writes 64 KiB chunks until the transport pauses it (Twisted calls
    C{pauseProducing} from inside C{write} once its send buffer is full),
    so at most about one buffer's worth is held in memory whatever C{total}.
    """

    def __init__(self, request: Request, total: int) -> None:
        self._request = request
        self._remaining = total
        self._paused = False
        self._producing = False
        self._done = False

    def start(self) -> None:
        """Register with the request and write until paused or done."""
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(self._connection_lost)
        self.resumeProducing()

    def _connection_lost(self, reason: Failure) -> None:
        """The client went away: stop writing into a dead connection."""
        self.stopProducing()

    def pauseProducing(self) -> None:
        """The transport's buffer is full; the write loop stops after this chunk."""
        self._paused = True

    def resumeProducing(self) -> None:
        """Write chunks until paused, stopped or finished."""
        self._paused = False
        # write() may pause and the transport may resume us re-entrantly;
        # the outer loop then simply carries on.
        if self._producing or self._done:
            return
        self._producing = True
        try:
            while not self._paused and not self._done and self._remaining > 0:
                size = min(self._remaining, _CHUNK_SIZE)
                self._request.write(_CHUNK if size == _CHUNK_SIZE else _CHUNK[:size])
                self._remaining -= size
        finally:
            self._producing = False
        if self._remaining == 0 and not self._done:
            self._done = True
            self._request.unregisterProducer()
            self._request.finish()

    def stopProducing(self) -> None:
        """Give up: the connection is gone (never finishes the request)."""
        self._done = True


def _parse_int(segment: bytes) -> Optional[int]:
    """Return C{segment} as a non-negative int, or None if it is not one."""
    if not segment.isdigit():
        return None
    return int(segment)


class EchoResource(Resource):
    """
    httpbin-like echo upstream.

      - C{GET|HEAD /headers} → C{{"headers": {...}}};
      - C{/anything[/...]} (any method) and C{POST /post} → a description of
        the request: method, url, args, headers, data, json, form, sha256 and
        length of the body;
      - C{GET|HEAD /status/<code>} → that status, empty body;
      - C{GET|HEAD /bytes/<n>} → C{n} bytes of C{b"x"} (at most
        L{MAX_BYTES}), streamed;
      - anything else → 404 C{{"error": "not found"}}.
    """

    isLeaf = True

    def render(self, request: Request) -> object:
        """Dispatch on path and method (overrides per-method dispatch)."""
        path = request.path
        method = request.method
        is_get = method in (b"GET", b"HEAD")

        if path == b"/anything" or path.startswith(b"/anything/"):
            return _respond_json(request, 200, _describe(request))
        if path == b"/post" and method == b"POST":
            return _respond_json(request, 200, _describe(request))
        if path == b"/headers" and is_get:
            return _respond_json(request, 200, {"headers": _echo_headers(request)})
        if path.startswith(b"/status/") and is_get:
            return self._status(request, path[len(b"/status/") :])
        if path.startswith(b"/bytes/") and is_get:
            return self._bytes(request, path[len(b"/bytes/") :])
        return _respond_json(request, 404, {"error": "not found"})

    def _status(self, request: Request, segment: bytes) -> object:
        """Answer with the status named in the path."""
        code = _parse_int(segment)
        # 1xx are not final responses; sending one would wedge the client.
        if code is None or not 200 <= code <= 599:
            return _respond_json(request, 400, {"error": "invalid status code"})
        return _respond(request, code)

    def _bytes(self, request: Request, segment: bytes) -> object:
        """Stream C{n} bytes with a push producer."""
        count = _parse_int(segment)
        if count is None:
            return _respond_json(request, 400, {"error": "invalid byte count"})
        count = min(count, MAX_BYTES)
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", _OCTET_STREAM)
        request.setHeader(b"Content-Length", b"%d" % (count,))
        # HEAD gets the headers only; nothing to stream for zero bytes.
        if request.method == b"HEAD" or count == 0:
            request.write(b"")
            request.finish()
            return NOT_DONE_YET
        _RepeatedBytesProducer(request, count).start()
        return NOT_DONE_YET


class _QuietSite(Site):
    """A C{Site} that writes no access log: the demo is not what is measured."""

    def log(self, request: HTTPRequest) -> None:
        """Do nothing (C{Site.log} formats a line per request)."""


def quiet_site(resource: IResource, reactor: Optional[IReactorCore] = None) -> Site:
    """
    Return a C{Site} serving C{resource} without access logging.

    @param reactor: the reactor the site uses for its timeouts and cached
        C{Date} header; None means Twisted's global one (resolved lazily
        by Twisted, not imported here).
    """
    return _QuietSite(resource, reactor=reactor)


def demo_services(
    reactor: IReactorCore, auth_endpoint: str, upstream_endpoint: str
) -> MultiService:
    """
    Build the demo auth service and echo upstream as one service tree.

    @param reactor: the reactor to listen with.
    @param auth_endpoint: server endpoint description for
        L{DemoAuthResource}, e.g. C{"tcp:9999:interface=127.0.0.1"}.
    @param upstream_endpoint: server endpoint description for L{EchoResource}.
    @return: a C{MultiService} with two C{StreamServerEndpointService}
        children named L{AUTH_SERVICE_NAME} and L{UPSTREAM_SERVICE_NAME}
        (their C{factory} attribute is the C{Site}).
    """
    parent = MultiService()
    children: List[Tuple[str, str, Resource]] = [
        (AUTH_SERVICE_NAME, auth_endpoint, DemoAuthResource()),
        (UPSTREAM_SERVICE_NAME, upstream_endpoint, EchoResource()),
    ]
    for name, description, resource in children:
        endpoint = serverFromString(reactor, description)
        child = StreamServerEndpointService(endpoint, quiet_site(resource, reactor))
        # As twisted.application.strports does: a port that cannot be bound
        # at start-up raises (twistd refuses to start) instead of only
        # being logged while the gateway runs without its demo peers.
        child._raiseSynchronously = True
        child.setName(name)
        child.setServiceParent(parent)
    return parent
