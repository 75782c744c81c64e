# -*- test-case-name: tests.upstream.test_websocket -*-
"""
WebSocket tunnels (APISIX's route-level C{enable_websocket}).

An allowed C{Upgrade: websocket} request on such a route is sent upstream
over a connection of its own (never from the pool, never back to it), with
C{Upgrade} and C{Connection} kept.  A C{101} answer is relayed to the
client, the client's transport is taken from the L{HTTPChannel}, and from
then on bytes flow both ways untouched: the gateway does not parse frames.

  - Backpressure: a full client send buffer pauses the upstream socket
    (the tunnel is the request's push producer, which the channel pauses
    and resumes), a full upstream send buffer pauses the client socket.
  - Half-close: an end of input on one side becomes an end of output on
    the other; the tunnel is over when both directions are, or either
    connection is lost.
  - Idle timeout: the upstream C{read} timeout; no byte either way for that
    long closes both connections.  The head of the 101 must come within
    C{send} + C{read}, as for any request.
  - Drain: L{Tunnels.close_all} closes every open tunnel (the end of the
    shutdown grace).

Any other answer than 101 is relayed as an ordinary response, after which
the upstream connection is closed.

Twisted's channel is taken over with C{HTTPChannel._protocolUpgradeForWebsockets},
the private hook Twisted's own C{twisted.web.websocket} uses (in 25.5 and
26.x); bytes the channel buffered after the request (C{_dataBuffer}) are
passed on first.
"""
from __future__ import annotations

from typing import Any, List, Optional, Set

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import ParseError
from zope.interface import alsoProvides, implementer

from fauth.auth.cookies import merge_into_response
from fauth.request.inbound import InboundRequest
from fauth.request.lifecycle import when_finished
from fauth.wire.fields import copy_fields
from fauth.request.replies import send_simple
from fauth.wire.h1 import MAX_RESPONSE_HEAD, ChunkedDecoder, ResponseHead, find_head_end, parse_head
from fauth.wire.headers import HOP_BY_HOP, connection_listed
from fauth.wire.transport import describe_failure

__all__ = ["Tunnels", "wants_upgrade"]

log = Logger()

_NO_BODY_CODES = frozenset([204, 304])


def wants_upgrade(request: Any) -> bool:
    """
    Whether C{request} asks for a WebSocket: an HTTP/1.1 C{GET} without a
    body, with C{Upgrade: websocket} and C{upgrade} listed in C{Connection},
    on an HTTP/1.1 channel (whose transport can be taken over).
    """
    if request.method != b"GET" or request.clientproto != b"HTTP/1.1":
        return False
    headers = request.requestHeaders
    upgrade = headers.getRawHeaders(b"upgrade")
    if not upgrade or not any(b"websocket" in value.lower() for value in upgrade):
        return False
    if b"upgrade" not in connection_listed(headers):
        return False
    if headers.hasHeader(b"transfer-encoding") or headers.getRawHeaders(b"content-length", [b"0"]) != [b"0"]:
        return False
    return hasattr(request.channel, "_protocolUpgradeForWebsockets")


class Tunnels:
    """
    The open tunnels of one gateway, and how new ones are opened.

    @ivar count: tunnels open now.
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self._open: Set["_Tunnel"] = set()

    @property
    def count(self) -> int:
        return len(self._open)

    def forward(self, proxy: Any, request: Any, inbound: InboundRequest, exchange: Any = None) -> None:
        """
        Send the upgrade C{request} to the next node of C{proxy} (an
        L{fauth.upstream.proxy.UpstreamProxy}) and tunnel on a 101.
        """
        endpoint, head, netloc, next_target = proxy.tunnel_target(request, inbound)
        upgrade = b", ".join(request.requestHeaders.getRawHeaders(b"upgrade", []))
        timeout = proxy.conf.timeout
        tunnel = _Tunnel(self, request, exchange, netloc, timeout.send + timeout.read, timeout.read)
        tunnel.upgrade = b"Upgrade: %s\r\nConnection: Upgrade\r\n\r\n" % (upgrade,)
        tunnel.next_target = next_target
        tunnel.connect(endpoint, head)

    def close_all(self) -> None:
        """Close every open tunnel now (a drain's grace is over)."""
        for tunnel in list(self._open):
            tunnel.abort("the gateway is shutting down")


@implementer(IPushProducer)
class _Producer:
    """Pauses and resumes one side's socket (C{transport}) for the other's buffer."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass  # the connection's own loss ends the tunnel


@implementer(IHalfCloseableProtocol)
class _UpstreamSide(Protocol):
    """The dedicated upstream connection; everything goes to its tunnel."""

    def __init__(self, tunnel: "_Tunnel") -> None:
        self.tunnel = tunnel

    def connectionMade(self) -> None:
        self.tunnel.upstream_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.tunnel.upstream_data(data)

    def readConnectionLost(self) -> None:
        self.tunnel.upstream_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.tunnel.upstream_lost(reason)


class _ClientSide(Protocol):
    """What the client's transport delivers to once the channel is taken over."""

    def __init__(self, tunnel: "_Tunnel") -> None:
        self.tunnel = tunnel

    def dataReceived(self, data: bytes) -> None:
        self.tunnel.client_data(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.tunnel.client_lost(reason)


# States of a tunnel.
_CONNECTING = "connecting"  # connecting, or sending the head and waiting for the answer
_RESPONSE = "response"  # a non-101 answer being relayed as a response
_OPEN = "open"  # 101 relayed: bytes flow both ways
_CLOSED = "closed"


class _Tunnel:
    """One upgrade request: its upstream connection and, after a 101, the tunnel."""

    def __init__(
        self,
        tunnels: Tunnels,
        request: Any,
        exchange: Any,
        netloc: str,
        head_timeout: float,
        idle_timeout: float,
    ) -> None:
        self._tunnels = tunnels
        self._reactor = tunnels._reactor
        self._request = request
        self._exchange = exchange
        self._netloc = netloc
        self._head_timeout = head_timeout
        self._idle_timeout = idle_timeout
        self._state = _CONNECTING
        self._connecting: Optional[Deferred] = None
        self._upstream: Optional[_UpstreamSide] = None
        self._up: Any = None  # its transport
        self._client: Any = None  # the client's transport, once taken over
        self._channel: Any = None
        self._buffer = b""
        self._timer: Optional[IDelayedCall] = None
        self._deadline = 0.0
        self._last = 0.0
        self._client_eof = False
        self._upstream_eof = False
        self._client_gone = False
        self._upstream_gone = False
        self._counted = False
        self.bytes_up = 0  # client to upstream, after the 101
        self.bytes_down = 0  # upstream to client, after the 101
        # A non-101 answer's body framing.
        self._remaining: Any = None
        self._decoder: Optional[ChunkedDecoder] = None

    # -- the upgrade request -------------------------------------------------

    #: The C{Upgrade} and C{Connection} fields ending every head sent.
    upgrade = b"\r\n"
    #: After a connection failure, the proxy's next node (see
    #: L{fauth.upstream.proxy.UpstreamProxy.tunnel_target}), or C{None}.
    next_target: Any = None

    def connect(self, endpoint: Any, head: bytes) -> None:
        if self._exchange is not None:
            self._exchange.upstream_started()
        self._deadline = self._reactor.seconds() + self._head_timeout
        self._timer = self._reactor.callLater(self._head_timeout, self._check)
        self._dial(endpoint, head)
        when_finished(self._request, self._request_finished)

    def _dial(self, endpoint: Any, head: bytes) -> None:
        self._head = head[:-2] + self.upgrade
        d = self._connecting = endpoint.connect(Factory.forProtocol(lambda: _UpstreamSide(self)))
        d.addErrback(self._connect_failed)

    def _request_finished(self, reason: Optional[Failure]) -> None:
        # Before the takeover only: the client went away (or a non-101
        # answer was relayed in full).
        if reason is None or self._state == _OPEN:
            return
        self._client_gone = True
        if self._state != _CLOSED:
            self._end_upstream()

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._state == _CLOSED or self._client_gone:
            return
        target = self.next_target(failure) if self.next_target is not None else None
        if target is not None:
            endpoint, head, netloc = target
            log.warn(
                "upstream {node} failed: {err}; trying {next}",
                node=self._netloc, err=describe_failure(failure), next=netloc,
            )
            self._netloc = netloc
            self._deadline = self._reactor.seconds() + self._head_timeout
            self._dial(endpoint, head)
            return
        self._fail(504 if failure.check(net_error.TimeoutError) else 502, describe_failure(failure))

    def _fail(self, status: int, why: str) -> None:
        """The upgrade failed before any answer went out: C{status} to the client."""
        log.warn("upstream {node} failed: {err}", node=self._netloc, err=why)
        self._state = _CLOSED
        self._stop_timer()
        if self._exchange is not None:
            self._exchange.upstream_failed()
        if self._connecting is not None:
            self._connecting.cancel()
        if self._up is not None:
            self._up.abortConnection()
        request = self._request
        if not self._client_gone and not request.finished and not request.startedWriting:
            send_simple(request, status)

    def _end_upstream(self) -> None:
        self._state = _CLOSED
        self._stop_timer()
        if self._connecting is not None:
            self._connecting.cancel()
        if self._up is not None:
            self._up.abortConnection()

    def upstream_connected(self, upstream: _UpstreamSide) -> None:
        self._connecting = None
        self._upstream = upstream
        self._up = upstream.transport
        if self._state == _CLOSED or self._client_gone:
            self._up.abortConnection()
            return
        self._up.write(self._head)

    def upstream_data(self, data: bytes) -> None:
        state = self._state
        if state == _OPEN:
            self.bytes_down += len(data)
            self._last = self._reactor.seconds()
            self._client.write(data)
        elif state == _CONNECTING:
            self._head_data(data)
        elif state == _RESPONSE:
            self._response_body(data)

    def _head_data(self, data: bytes) -> None:
        buffer = self._buffer = self._buffer + data
        while True:
            end = find_head_end(buffer)
            if end < 0:
                if len(buffer) > MAX_RESPONSE_HEAD:
                    self._fail(502, "bad response: head too large")
                return
            try:
                head = parse_head(buffer[:end], b"GET")
            except ParseError as e:
                self._fail(502, "bad response: %s" % (e.args[0],))
                return
            buffer = self._buffer = buffer[end:]
            if head.status == 101:
                self._switch(head, buffer)
                return
            if 100 <= head.status < 200:
                continue  # 100 Continue and the like: the real answer follows
            self._respond(head, buffer)
            return

    # -- a 101: the tunnel -----------------------------------------------------

    def _switch(self, head: ResponseHead, rest: bytes) -> None:
        request = self._request
        self._buffer = b""
        if self._exchange is not None:
            self._exchange.upstream_answered()
        if self._client_gone or request.channel is None or request.channel.transport is None:
            self._end_upstream()
            return
        channel = self._channel = request.channel
        client = self._client = channel.transport
        lines = [b"HTTP/1.1 101 %s\r\n" % (head.reason or b"Switching Protocols",)]
        listed = head.connection
        for name, values in head.headers.items():
            if name not in HOP_BY_HOP and name not in listed:
                lines.extend(b"%s: %s\r\n" % (name, value) for value in values)
        # The allow's auth cookies (fauth.auth.cookies): the 101 is their only response.
        lines.extend(b"Set-Cookie: %s\r\n" % cookie for cookie in request.cookies)
        upgrade = head.headers.get(b"upgrade") or [b"websocket"]
        lines.append(b"Upgrade: %s\r\nConnection: Upgrade\r\n\r\n" % (b", ".join(upgrade),))
        response = b"".join(lines)
        # The request counts as answered with a 101 (access log, metrics).
        request.setResponseCode(101, head.reason or b"Switching Protocols")
        request.startedWriting = 1
        request.sentLength = 0
        self._state = _OPEN
        self._tunnels._open.add(self)
        self._counted = True
        if self._exchange is not None:
            self._exchange.tunnel_opened()
        # What the client sent after its request head (it should wait for
        # the 101, but may not) is in the channel's buffer.
        early: List[bytes] = list(getattr(channel, "_dataBuffer", []))
        channel._dataBuffer = []
        channel._protocolUpgradeForWebsockets(_ClientSide(self))
        # An end of input from the client becomes an end of output upstream.
        alsoProvides(channel, IHalfCloseableProtocol)
        channel.readConnectionLost = self.client_eof
        channel.writeConnectionLost = lambda: None
        # Backpressure both ways: the channel pauses its request's producer
        # when the client's send buffer is full; the upstream transport
        # pauses the client's socket when its own is.
        request.registerProducer(_Producer(self._up), True)
        upstream_transport = self._up
        if upstream_transport is not None:
            upstream_transport.registerProducer(_Producer(client), True)
        client.write(response)
        self._last = self._reactor.seconds()
        self._rearm_idle()
        client.resumeProducing()  # the channel may have paused it while the request was handled
        if rest:
            self.upstream_data(rest)
        for data in early:
            if self._state == _OPEN:
                self.client_data(data)

    def _rearm_idle(self) -> None:
        timer = self._timer
        if timer is None or not timer.active():
            self._timer = self._reactor.callLater(self._idle_timeout, self._check)
        elif timer.getTime() > self._last + self._idle_timeout:
            timer.reset(self._idle_timeout)

    def client_data(self, data: bytes) -> None:
        if self._state != _OPEN or self._up is None:
            return
        self.bytes_up += len(data)
        self._last = self._reactor.seconds()
        self._up.write(data)

    def client_eof(self) -> None:
        self._client_eof = True
        if self._upstream_eof:
            self.close()
        elif self._up is not None:
            _lose_write(self._up)

    def upstream_eof(self) -> None:
        self._upstream_eof = True
        if self._state == _RESPONSE:
            self._response_done(self._remaining is None and self._decoder is None)
            return
        if self._state != _OPEN:
            self.upstream_lost(Failure(net_error.ConnectionDone()))
            return
        if self._client_eof:
            self.close()
        elif ISSLTransport.providedBy(self._client):
            self._close_client()  # no half-close under TLS
        else:
            _lose_write(self._client)

    def upstream_lost(self, reason: Failure) -> None:
        self._upstream_gone = True
        state = self._state
        if state == _OPEN:
            self._close_client()
        elif state == _RESPONSE:
            self._response_done(self._remaining is None and self._decoder is None)
        elif state == _CONNECTING and not self._client_gone:
            self._fail(502, "connection closed before the response: %s" % describe_failure(reason))

    def client_lost(self, reason: Failure) -> None:
        self._client_gone = True
        if self._up is not None and not self._upstream_gone:
            self._up.loseConnection()
        self._finish(reason)

    def close(self) -> None:
        """Both directions are over: close both connections (buffered bytes go out first)."""
        if self._up is not None:
            self._up.loseConnection()
        if self._client is not None:
            self._close_client()

    def _close_client(self) -> None:
        # The channel is still the client transport's producer; a TLS
        # transport only closes once its producer is gone.
        try:
            self._client.unregisterProducer()
        except Exception:
            pass
        self._client.loseConnection()

    def abort(self, why: str) -> None:
        """Close both connections at once."""
        log.info("closing a WebSocket tunnel to {node}: {why}", node=self._netloc, why=why)
        if self._up is not None:
            self._up.abortConnection()
        if self._client is not None:
            self._client.abortConnection()

    def _finish(self, reason: Failure) -> None:
        """The client's connection is gone: the tunnel is over; count and log it."""
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self._stop_timer()
        self._tunnels._open.discard(self)
        request = self._request
        request.sentLength = self.bytes_down
        if self._exchange is not None and self._counted:
            self._exchange.tunnel_closed(self.bytes_up, self.bytes_down)
        # The channel's own end of connection (its timers, the request's
        # notifyFinish), which the takeover had replaced.
        channel = self._channel
        type(channel).connectionLost(channel, reason)

    # -- timers ----------------------------------------------------------------

    def _check(self) -> None:
        self._timer = None
        if self._state == _CLOSED:
            return
        if self._state == _OPEN:
            left = self._last + self._idle_timeout - self._reactor.seconds()
            if left > 0:
                self._timer = self._reactor.callLater(left, self._check)
                return
            self.abort("idle for %gs" % (self._idle_timeout,))
            return
        if self._state == _CONNECTING:
            left = self._deadline - self._reactor.seconds()
            if left > 0:
                self._timer = self._reactor.callLater(left, self._check)
                return
            self._fail(504, "timeout")

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # -- any other answer: an ordinary response -------------------------------

    def _respond(self, head: ResponseHead, rest: bytes) -> None:
        self._stop_timer()
        request = self._request
        if self._exchange is not None:
            self._exchange.upstream_answered()
        if self._client_gone:
            self._end_upstream()
            return
        self._state = _RESPONSE
        request.setResponseCode(head.status, head.reason)
        out = request.responseHeaders
        copy_fields(out, head.headers.items(), HOP_BY_HOP, head.connection)
        if request.cookies:  # an allow's auth cookies (allow_cookies)
            merge_into_response(request)
        length = head.length
        if head.status in _NO_BODY_CODES or length == 0:
            if isinstance(length, int):
                out.setRawHeaders(b"content-length", [b"%d" % length])
            self._remaining = 0
            self._response_done(True)
            return
        if head.chunked:
            self._decoder = ChunkedDecoder()
        elif isinstance(length, int):
            out.setRawHeaders(b"content-length", [b"%d" % length])
            self._remaining = length
        # else: up to the end of the connection (_remaining stays None)
        upstream = self._up
        request.registerProducer(_Producer(upstream), True)
        if rest:
            self._response_body(rest)

    def _response_body(self, data: bytes) -> None:
        request = self._request
        if self._client_gone:
            return
        if self._decoder is not None:
            try:
                chunks, done = self._decoder.feed(data)
            except ParseError:
                self._response_done(False)
                return
            for chunk in chunks:
                request.write(chunk)
            if done:
                self._response_done(True)
            return
        if self._remaining is not None:
            data = data[: self._remaining]
            self._remaining -= len(data)
            request.write(data)
            if self._remaining == 0:
                self._response_done(True)
            return
        request.write(data)

    def _response_done(self, complete: bool) -> None:
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        request = self._request
        if self._up is not None and not self._upstream_gone:
            self._up.loseConnection()  # never pooled
        if self._client_gone or request.finished:
            return
        if request.producer is not None:
            request.unregisterProducer()
        if complete:
            request.finish()
        elif request.channel is not None and request.channel.transport is not None:
            request.channel.transport.abortConnection()  # a truncated body must not pass as whole


def _lose_write(transport: Any) -> None:
    """Half-close C{transport} where it can; close it where it cannot (TLS, pipes)."""
    if ISSLTransport.providedBy(transport):
        # A TLS wrapper hands loseWriteConnection to the TCP transport under
        # it, which would end the stream without a close_notify.
        transport.loseConnection()
        return
    lose = getattr(transport, "loseWriteConnection", None)
    try:
        if lose is not None:
            lose()
            return
    except Exception:
        pass
    transport.loseConnection()
