# -*- test-case-name: tests.test_testing -*-
"""
Test doubles for applications guarded by fauth, shipped as C{treq.testing}
and C{twisted.internet.testing} ship theirs; fauth's own tests use them too.

  - L{StubAuthService}: an auth service in memory, answering each auth call
    at once (no socket, no reactor turn), recording what it was asked;
    L{StubAuthService.guard} wraps a resource in a L{ForwardAuthResource}
    that asks it.  Drive the guarded resource with C{treq.testing.StubTreq}.
  - L{MemoryGateway}: the whole gateway on a L{MemoryReactorClock}, from a
    configuration document, with the auth calls answered by a
    L{StubAuthService} and the upstream nodes served by resources, all in
    memory.
  - L{FakeRequest}: just enough of a server request for the parts of fauth
    that take one (C{notifyFinish}, writes, producers).
  - L{LogCapture}: the log lines emitted while it is active.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import attr
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource
from twisted.web.server import Site
from zope.interface import implementer

from fauth.auth.client import Reply
from fauth.config import ForwardAuthConf, GatewayConf, parse_config
from fauth.edge.gateway import AuthClients, Gateway
from fauth.edge.resources import ForwardAuthResource, GatewayResource, GatewaySite
from fauth.wire.h1 import ChunkedDecoder, ReplyHeaders, find_head_end, parse_head

__all__ = ["AuthCall", "FakeRequest", "LogCapture", "MemoryGateway", "Response", "StubAuthService"]

Answer = Tuple[int, Sequence[Tuple[bytes, bytes]], bytes]


@attr.frozen
class AuthCall:
    """One auth request as the stub received it."""

    method: str
    fields: Tuple[Tuple[bytes, bytes], ...]
    body: Optional[bytes]
    #: The request target built from a C{uri} with variables, else C{None}.
    target: Optional[bytes] = None

    def header(self, name: bytes) -> Optional[bytes]:
        """The value of header C{name} (any case), or C{None}."""
        lower = name.lower()
        for field, value in self.fields:
            if field.lower() == lower:
                return value
        return None


class StubAuthService:
    """
    An auth service in memory.

    By default it allows a request whose C{Authorization} is a key of
    C{tokens}, answering 200 with that key's identity headers, and denies
    any other with C{deny}.  Give C{decide} to answer anything else.

    @param tokens: C{Authorization} value -> identity headers of the allow.
    @param deny: the denial: status, headers, body.
    @param decide: C{decide(call)} returns C{(status, headers, body)} for an
        L{AuthCall}; replaces the token rule.
    @ivar calls: every L{AuthCall}, in order.
    """

    def __init__(
        self,
        tokens: Optional[Mapping[str, Mapping[str, str]]] = None,
        deny: Answer = (403, (), b""),
        decide: Optional[Callable[[AuthCall], Answer]] = None,
    ) -> None:
        self.calls: List[AuthCall] = []
        self._tokens = {
            key.encode("latin-1"): tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in identity.items())
            for key, identity in (tokens or {}).items()
        }
        self._deny = deny
        self._decide = decide or self._by_token

    def _by_token(self, call: AuthCall) -> Answer:
        identity = self._tokens.get(call.header(b"authorization") or b"")
        return (200, identity, b"") if identity is not None else self._deny

    def call(
        self,
        method: str,
        fields: Sequence[Tuple[bytes, bytes]],
        body: Optional[bytes],
        timeout: float,
        target: Optional[bytes] = None,
    ) -> Deferred:
        """What L{fauth.auth.client.AuthClient.call} does, answered at once."""
        auth_call = AuthCall(method, tuple(fields), body, target)
        self.calls.append(auth_call)
        status, headers, reply_body = self._decide(auth_call)
        collected: Dict[bytes, List[bytes]] = {}
        for name, value in headers:
            collected.setdefault(name.lower(), []).append(value)
        return succeed(Reply(status, ReplyHeaders(collected), reply_body))

    # What fauth reads of an auth client besides call().
    host_header = b"stub-auth"
    pool = None

    def close(self) -> Deferred:
        return succeed(None)

    def clients(self) -> AuthClients:
        """Auth clients that are all this stub (for L{ForwardAuthResource} and L{fauth.edge.gateway.Gateway})."""
        return _StubClients(self)

    def guard(
        self, wrapped: IResource, conf: Union[Mapping[str, Any], ForwardAuthConf], reactor: Any = None
    ) -> ForwardAuthResource:
        """
        C{wrapped} behind a L{ForwardAuthResource} that asks this stub;
        C{conf} is the C{forward-auth} attribute dict (its C{uri} may be
        left out).
        """
        if not isinstance(conf, ForwardAuthConf):
            conf = dict(conf)
            conf.setdefault("uri", "http://stub-auth/")
        return ForwardAuthResource(wrapped, conf, reactor=reactor or MemoryReactorClock(), auth_clients=self.clients())


class _StubClients(AuthClients):
    def __init__(self, stub: StubAuthService) -> None:
        super().__init__(MemoryReactorClock())
        self._stub = stub

    def get(self, conf: ForwardAuthConf) -> Any:
        return self._stub

    def clients(self) -> List[Any]:
        return [self._stub]

    def prune(self, keep: Any) -> None:
        pass

    def close(self) -> Deferred:
        return succeed(None)


@attr.frozen
class Response:
    """A response the L{MemoryGateway} sent its client."""

    status: int
    headers: ReplyHeaders
    body: bytes

    def header(self, name: str) -> Optional[bytes]:
        """The first value of C{name}, or C{None}."""
        values = self.headers.get(name.encode("latin-1"))
        return values[0] if values else None


class MemoryGateway:
    """
    The gateway of a configuration document on a L{MemoryReactorClock},
    with every socket in memory: the auth calls go to C{auth}, and the
    upstream connections (made through the reactor's C{connectTCP}, as for
    real) to C{upstreams}, resources served by a Twisted L{Site}.

    @param doc: the configuration document (its C{listen} is ignored).
    @param upstreams: a resource serving every upstream node, or one per
        C{(host, port)}.
    @ivar reactor: the L{MemoryReactorClock}: C{reactor.advance(seconds)}
        makes timeouts happen.
    """

    def __init__(
        self,
        doc: Mapping[str, Any],
        auth: StubAuthService,
        upstreams: Union[IResource, Mapping[Tuple[str, int], IResource]],
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.conf: GatewayConf = parse_config(dict(doc, listen=["tcp:0"]))
        self.gateway = Gateway(self.reactor, self.conf, auth_clients=auth.clients())
        self.site = GatewaySite(GatewayResource(self.gateway), self.conf.http, reactor=self.reactor)
        self._upstreams = upstreams
        self._connected = 0
        self._pumps: List[iosim.IOPump] = []

    def request(
        self, method: str, path: str, headers: Sequence[Tuple[str, str]] = (), body: bytes = b"", host: str = "gateway.test"
    ) -> Response:
        """
        Send one request on a new client connection and return the answer,
        once everything in memory has moved (auth, upstream, response).
        """
        lines = ["%s %s HTTP/1.1" % (method, path), "Host: %s" % host, "Connection: close"]
        lines += ["%s: %s" % header for header in headers]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append("Content-Length: %d" % len(body))
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        return self.send(raw)

    def send(self, raw: bytes) -> Response:
        """Send C{raw} bytes on a new client connection and parse the first answer."""
        client = IPv4Address("TCP", "127.0.0.1", 40000 + self._connected)
        channel = self.site.buildProtocol(client)
        transport = StringTransport(peerAddress=client, hostAddress=IPv4Address("TCP", "127.0.0.1", 9080))
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        for _ in range(1000):
            if not self.flush():
                break
        return _parse_response(transport.value())

    def flush(self) -> bool:
        """Connect pending upstream connections and move their bytes; whether anything moved."""
        moved = False
        while self._connected < len(self.reactor.tcpClients):
            host, port, factory, _, _ = self.reactor.tcpClients[self._connected]
            self._connected += 1
            resource = self._upstreams.get((host, port)) if isinstance(self._upstreams, Mapping) else self._upstreams
            if resource is None:
                raise LookupError("no upstream resource for %s:%d" % (host, port))
            server = Site(resource).buildProtocol(None)
            client = factory.buildProtocol(None)
            server_io = iosim.FakeTransport(server, isServer=True)
            client_io = iosim.FakeTransport(client, isServer=False)
            self._pumps.append(iosim.connect(server, server_io, client, client_io, greet=False, clock=self.reactor))
            moved = True
        for pump in list(self._pumps):
            moved = pump.flush() or moved
        return moved


def _parse_response(data: bytes) -> Response:
    end = find_head_end(data)
    if end < 0:
        raise ValueError("no complete response in %r" % (data[:200],))
    head = parse_head(data[:end], b"GET")
    rest = data[end:]
    if head.chunked:
        pieces, _ = ChunkedDecoder().feed(rest)
        body = b"".join(pieces)
    elif isinstance(head.length, int):
        body = rest[: head.length]
    else:
        body = rest
    return Response(head.status, head.headers, body)


class FakeRequest:
    """
    Just enough of a L{twisted.web.server.Request} for the parts of fauth
    that take one: C{notifyFinish} (L{finish} fires it, as does
    L{finish_by_client_gone}), response code, headers, writes, producers.

    @ivar notifications: the Deferreds C{notifyFinish} handed out, not fired yet.
    """

    finished = False
    startedWriting = False
    channel = None

    def __init__(self, method: bytes = b"GET", uri: bytes = b"/", headers: Optional[Mapping[bytes, Sequence[bytes]]] = None) -> None:
        self.method = method
        self.uri = uri
        self.requestHeaders = Headers({b"host": [b"gateway.test"]} if headers is None else dict(headers))
        self.responseHeaders = Headers()
        self.content: Any = None
        self.code = 0
        self.written: List[bytes] = []
        self.producers: List[Any] = []
        self.notifications: List[Deferred] = []

    def notifyFinish(self) -> Deferred:
        d: Deferred = Deferred()
        self.notifications.append(d)
        return d

    def setResponseCode(self, code: int, message: Any = None) -> None:
        self.code = code

    def write(self, data: bytes) -> None:
        self.startedWriting = True
        self.written.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producers.append(producer)

    def unregisterProducer(self) -> None:
        self.producers.append(None)

    def finish(self) -> None:
        self.finished = True
        notifications, self.notifications = self.notifications, []
        for d in notifications:
            d.callback(None)

    def finish_by_client_gone(self, reason: Optional[Failure] = None) -> None:
        """The client's connection is lost before the response is finished."""
        from twisted.internet.error import ConnectionLost

        notifications, self.notifications = self.notifications, []
        for d in notifications:
            d.errback(reason or Failure(ConnectionLost()))

    @property
    def body(self) -> bytes:
        """Everything written."""
        return b"".join(self.written)


@implementer(ILogObserver)
class LogCapture:
    """
    Collects formatted log lines while active::

        with LogCapture() as logs:
            ...
        assert logs.contains("failed to process forward auth, err: closed")
    """

    def __init__(self) -> None:
        self.lines: List[str] = []
        self.events: List[Dict[str, Any]] = []

    def __call__(self, event: Dict[str, Any]) -> None:
        self.events.append(event)
        text = formatEvent(event)
        if text:
            self.lines.append(text)

    def __enter__(self) -> "LogCapture":
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self)

    def contains(self, text: str) -> bool:
        """Whether a captured line contains C{text}."""
        return any(text in line for line in self.lines)
