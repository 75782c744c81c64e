# -*- test-case-name: tests.wire.test_agent -*-
"""
What fauth's auth calls go through below treq: an L{IAgent} over an
L{HTTPConnectionPool}, and the pieces handed to C{treq.HTTPClient} so that
a call costs as little as possible and carries nothing from another call.

The layers, and why each is there::

    treq.HTTPClient.request        the client API users know; they can hand
      -> PoolAgent                 us their own pool through it
        -> HTTPConnectionPool      Twisted's pooling (StrictConnectionPool)
          -> ClientConnection      strict HTTP/1.1, one-pass head parsing

C{Agent} would parse the URL and build an endpoint on every call;
L{PoolAgent} does both once per URL.  treq re-encodes the URL on every
call (hyperlink's C{to_uri()}, IDNA included); L{PreEncodedURL} is the
result of doing that once.  treq always wraps the agent in Twisted's
C{ContentDecoderAgent}, which adds C{Accept-Encoding: gzip} to the request,
and on the answer decompresses gzip and rewrites C{Content-Encoding}:
L{PreparedHeaders} carry the exact fields to send (the agent sends those,
not what a wrapper added), and every response from the agent keeps the
headers as they arrived in C{sent_headers}, which L{as_sent} finds beneath
treq's wrappers, so a denial is relayed as the auth service sent it.
"""
from __future__ import annotations

from copy import copy
from http.cookiejar import Cookie
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

from hyperlink import EncodedURL
from treq.cookies import IndexableCookieJar
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer, IProtocol, IPushProducer
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web.client import URI, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IClientRequest, IPolicyForHTTPS, IResponse
from twisted.web._newclient import Request, ResponseFailed
from zope.interface import implementer

from fauth.wire.connection import ClientRequest
from fauth.wire.fields import copy_fields
from fauth.wire.h1 import ReplyHeaders, ResponseHead, request_head
from fauth.wire.pool import StrictConnectionPool
from fauth.wire.transport import Connector, IClientReactor

__all__ = [
    "BytesBody",
    "NoCookies",
    "PoolAgent",
    "PreEncodedURL",
    "PreparedHeaders",
    "StrictResponse",
    "as_sent",
]

# Methods whose request has a body by definition: without one, they say
# Content-Length: 0 (as Twisted's client does).
_BODY_METHODS = frozenset([b"POST", b"PUT", b"PATCH"])
# Body bytes kept while nobody has asked for the body yet; past this the
# connection is paused (as Twisted's client pauses until deliverBody).
_UNCLAIMED = 64 * 1024


class PreEncodedURL(EncodedURL):
    """
    A URL in its encoded (URI) form, computed once: treq calls
    C{to_uri().to_text()} on every request, which IDNA-encodes the host
    each time.
    """

    _text: Optional[str] = None

    @classmethod
    def encode(cls, text: str) -> "PreEncodedURL":
        """
        C{text} parsed and encoded now; a URL of visible ASCII only is
        taken as already encoded, and goes out exactly as written.

        @raise ValueError: not a URL.
        """
        uri = EncodedURL.from_text(text).to_uri()
        url = cls(
            scheme=uri.scheme,
            host=uri.host,
            path=uri.path,
            query=uri.query,
            fragment=uri.fragment,
            port=uri.port,
            rooted=uri.rooted,
            userinfo=uri.userinfo,
            uses_netloc=uri.uses_netloc,
        )
        # (With a password, to_text() must keep hiding it, as hyperlink's does.)
        encoded = all("!" <= c <= "~" for c in text) and ":" not in uri.userinfo
        url._text = text if encoded else uri.to_text()
        return url

    def with_target(self, target: bytes) -> "PreEncodedURL":
        """
        This URL with another request target (origin form, encoded: visible
        ASCII), for a call whose path is built per request; a copy rather
        than a parse (a parse costs about 20 times as much).  Only its
        text changes: what treq sends, and where the agent connects.
        """
        url = copy(self)
        origin = self.to_text()
        url._text = origin[: origin.index("/", origin.index("//") + 2)] + target.decode("ascii")
        return url

    def to_uri(self) -> "PreEncodedURL":
        return self

    def to_text(self, with_password: bool = False) -> str:
        if with_password:
            return super().to_text(True)
        if self._text is None:
            self._text = super().to_text()
        return self._text

    def replace(self, *args: Any, **kwargs: Any) -> EncodedURL:
        # A changed URL is no longer encoded: a plain one.
        return EncodedURL.from_text(super().to_text(True)).replace(*args, **kwargs)


class PreparedHeaders(Headers):
    """
    Request fields checked and ordered by fauth (L{fauth.auth}), sent by
    L{PoolAgent} exactly as they are: names and values are not
    re-validated, and what treq's wrappers add to the L{Headers} (its
    C{Accept-Encoding}) is not sent.  The framing fields are the agent's.
    """

    def __init__(self, wire: Sequence[Tuple[bytes, bytes]] = ()) -> None:
        super().__init__()
        self.wire = wire

    def copy(self) -> "PreparedHeaders":
        return PreparedHeaders(self.wire)


class NoCookies(IndexableCookieJar):
    """
    A cookie jar that never stores and never sends: an auth call shared by
    every user must not carry one user's C{Set-Cookie} into the next
    user's request.
    """

    def set_cookie(self, cookie: Cookie) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def add_cookie_header(self, request: Any) -> None:
        pass

    def __iter__(self) -> Iterator[Cookie]:
        return iter(())


@implementer(IBodyProducer)
class BytesBody:
    """
    A body in memory, written in one go (treq's default producer runs on
    the global C{Cooperator}, a reactor turn later).
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


_NO_NAMES: FrozenSet[bytes] = frozenset()


def _twisted_headers(answer: ReplyHeaders) -> Headers:
    """
    C{answer} as a Twisted L{Headers} of its own, names and values not
    checked again: they were parsed (L{copy_fields}).
    """
    headers = Headers()
    copy_fields(headers, answer.items(), _NO_NAMES, _NO_NAMES)
    return headers


@implementer(IClientRequest)
class _SentRequest:
    __slots__ = ("method", "absoluteURI", "headers")

    def __init__(self, method: bytes, absoluteURI: bytes, headers: Headers) -> None:
        self.method = method
        self.absoluteURI = absoluteURI
        self.headers = headers


@implementer(IResponse, IPushProducer)
class StrictResponse:
    """
    An answer on a L{fauth.wire.connection.ClientConnection}: the request's
    sink, and what the agent's Deferred fires with once the head is in.
    The body goes to the protocol given to L{deliverBody}; until then it is
    kept (pausing the connection past 64 KiB).  To that protocol this is
    also the transport: losing or stopping it aborts the connection.

    @ivar headers: the answer's headers as a Twisted L{Headers}, which
        treq's wrappers may change.
    @ivar sent_headers: the same, as they arrived (L{ReplyHeaders}).
    """

    version = (b"HTTP", 1, 1)
    previousResponse: Optional[IResponse] = None

    code: int
    phrase: bytes
    length: Any
    headers: Headers
    sent_headers: ReplyHeaders

    def __init__(self, request: IClientRequest) -> None:
        # The rest is set by body_start, before anyone sees this response.
        self.request = request
        self._producer: Any = None
        self._protocol: Optional[IProtocol] = None
        self._unclaimed: List[bytes] = []
        self._unclaimed_size = 0
        self._done: Optional[Failure] = None
        self._finished = False
        self._stopped = False

    # -- the connection's sink

    def body_start(self, producer: Any, head: ResponseHead) -> "StrictResponse":
        self._producer = producer
        self.code = head.status
        self.phrase = head.reason
        self.length = head.length
        self.sent_headers = head.headers
        self.headers = _twisted_headers(head.headers)
        return self

    def body_data(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is not None:
            protocol.dataReceived(data)
        elif not self._stopped:
            self._unclaimed.append(data)
            self._unclaimed_size += len(data)
            if self._unclaimed_size > _UNCLAIMED:
                self._producer.pauseProducing()

    def body_done(self, reason: Optional[Failure]) -> None:
        self._finished = True
        self._done = reason
        protocol = self._protocol
        if protocol is not None:
            self._protocol = None
            protocol.connectionLost(reason or Failure(ResponseDone()))

    # -- IResponse

    def deliverBody(self, protocol: IProtocol) -> None:
        protocol.makeConnection(self)  # type: ignore[arg-type]
        unclaimed, self._unclaimed = self._unclaimed, []
        if self._stopped:
            protocol.connectionLost(Failure(ResponseFailed([Failure(net_error.ConnectionAborted())])))
            return
        self._protocol = protocol
        for data in unclaimed:
            protocol.dataReceived(data)
            if self._protocol is not protocol:
                return  # it stopped the body: stop() tells it once the connection is closed
        if self._finished:
            self._protocol = None
            protocol.connectionLost(self._done or Failure(ResponseDone()))
            return
        if self._unclaimed_size > _UNCLAIMED:
            self._producer.resumeProducing()
        self._unclaimed_size = 0

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    # -- the body protocol's transport

    def pauseProducing(self) -> None:
        if self._producer is not None:
            self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        if self._producer is not None:
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        self.stop()

    def loseConnection(self) -> None:
        self.stop()

    abortConnection = loseConnection

    def stop(self) -> None:
        """
        Abort the body's transfer (a timeout, or its reader gave up); the
        connection is closed, never pooled.  The body protocol hears of it
        once the connection is closed, not from inside this call.
        """
        if self._finished or self._stopped:
            return
        self._stopped = True
        protocol, self._protocol = self._protocol, None
        connection = self._producer
        connection.stopProducing()
        if protocol is not None:
            reason = Failure(ResponseFailed([Failure(net_error.ConnectionAborted())]))
            connection.when_closed().addCallback(lambda _: protocol.connectionLost(reason))


class _PlainResponse(proxyForInterface(IResponse)):  # type: ignore[misc]
    """
    Twisted's own response (from a plain L{HTTPConnectionPool}), with its
    headers kept as they arrived before treq's wrappers change them, and a
    way to stop its body.
    """

    def __init__(self, original: IResponse) -> None:
        self.original = original
        self.sent_headers = ReplyHeaders(
            {name.lower(): tuple(values) for name, values in original.headers.getAllRawHeaders()}
        )
        self._protocol: Optional[IProtocol] = None

    def deliverBody(self, protocol: IProtocol) -> None:
        self._protocol = protocol
        self.original.deliverBody(protocol)

    def stop(self) -> None:
        """
        Abort the body's transfer, once it is being read: its connection is
        closed, never pooled.
        """
        transport = getattr(self._protocol, "transport", None)
        if transport is not None:
            transport.stopProducing()


def as_sent(response: IResponse) -> Any:
    """
    The response L{PoolAgent} made, beneath treq's wrappers (each keeps
    what it wraps as C{original}): its C{sent_headers} and its body are
    what the server sent.
    """
    while not isinstance(response, (StrictResponse, _PlainResponse)):
        response = response.original  # type: ignore[attr-defined]
    return response


class _Target:
    """A URL's pool key, endpoint and request target, worked out once."""

    __slots__ = ("key", "endpoint", "target", "host")

    def __init__(self, key: Any, endpoint: Any, target: bytes, host: bytes) -> None:
        self.key = key
        self.endpoint = endpoint
        self.target = target
        self.host = host


@implementer(IAgent)
class PoolAgent:
    """
    Requests over the connections of an L{HTTPConnectionPool}.

    With a L{StrictConnectionPool} each request is one pre-serialised head
    on fauth's strict connection; with any other pool (an application's
    own), a Twisted L{Request} on Twisted's C{HTTP11ClientProtocol}.  URLs
    are parsed, and their endpoints built, once.  Bodies are
    L{BytesBody}s with a strict pool; any L{IBodyProducer} otherwise.

    @param policy: TLS for C{https} URLs.
    @param connect_timeout: seconds to connect.
    """

    # URLs whose parse is kept; past this many the cache starts over.
    max_targets = 1024

    def __init__(
        self, reactor: IClientReactor, pool: HTTPConnectionPool, policy: IPolicyForHTTPS, connect_timeout: float
    ) -> None:
        self._pool = pool
        self._connector = Connector(reactor, pool, policy, connect_timeout)
        self._strict = isinstance(pool, StrictConnectionPool)
        self._targets: Dict[bytes, _Target] = {}

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Optional[Headers] = None,
        bodyProducer: Optional[IBodyProducer] = None,
    ) -> Deferred:
        target = self._targets.get(uri)
        if target is None:
            try:
                target = self._parse(uri)
            except ValueError as e:
                return fail(e)
        if headers is None:
            headers = Headers()
        if isinstance(headers, PreparedHeaders):
            fields: Sequence[Tuple[bytes, bytes]] = headers.wire
        else:
            fields = [(name, value) for name, values in headers.getAllRawHeaders() for value in values]
            if not headers.hasHeader(b"host"):
                fields.insert(0, (b"Host", target.host))
        persistent = self._pool.persistent
        if not self._strict:
            return self._plain(method, uri, target, fields, bodyProducer, persistent)
        body: Optional[bytes] = None
        framing: Tuple[Tuple[bytes, bytes], ...] = () if persistent else ((b"Connection", b"close"),)
        if bodyProducer is not None:
            if not isinstance(bodyProducer, BytesBody):
                return fail(TypeError("a strict connection pool sends BytesBody bodies only"))
            body = bodyProducer.body
            framing += ((b"Content-Length", b"%d" % len(body)),)
        elif method in _BODY_METHODS:
            framing += ((b"Content-Length", b"0"),)
        head = request_head(method, target.target, framing + tuple(fields))
        response = StrictResponse(_SentRequest(method, uri, headers))
        request = ClientRequest(method, head, response, body, persistent=persistent, sink_keeps_body=True)
        return self._connector.send(target.key, target.endpoint, request)

    def _plain(
        self,
        method: bytes,
        uri: bytes,
        target: _Target,
        fields: Sequence[Tuple[bytes, bytes]],
        bodyProducer: Optional[IBodyProducer],
        persistent: bool,
    ) -> Deferred:
        headers = Headers()
        for name, value in fields:
            headers.addRawHeader(name, value)
        request = Request(method, target.target, headers, bodyProducer, persistent)
        return self._connector.send(target.key, target.endpoint, request).addCallback(_PlainResponse)

    def _parse(self, uri: bytes) -> _Target:
        parsed = URI.fromBytes(uri)
        if parsed.scheme not in (b"http", b"https") or not parsed.host:
            raise ValueError("unsupported URL: %r" % (uri,))
        host = parsed.host.strip(b"[]")
        key, endpoint = self._connector.endpoint(parsed.scheme, host, parsed.port)
        target = _Target(key, endpoint, parsed.originForm, parsed.netloc)
        if len(self._targets) >= self.max_targets:
            self._targets.clear()
        self._targets[uri] = target
        return target

