# -*- test-case-name: tests.edge.test_http2 -*-
"""
HTTP/2 for clients on C{ssl:} listeners (C{http: {http2: true}}), with
Twisted's own implementation (C{twisted[http2]}, the C{h2} package).

ALPN offers C{h2} and C{http/1.1}; a connection that chose C{h2} is served
by L{HardenedH2Connection}, one that chose C{http/1.1} (or no ALPN, or a
plain TCP listener) by the hardened HTTP/1.1 channel as before.  Every
stream is a L{fauth.edge.resources.GatewayRequest}: the same routes,
forward-auth and header rules.

Hardening beyond Twisted's own (which buffers at most 17 KiB of control
frames, PING and SETTINGS acknowledgements, for a client that does not
read, and closes the connection past that):

  - C{SETTINGS_MAX_CONCURRENT_STREAMS} is C{max_concurrent_streams}; a
    client opening more is a protocol error (h2), and the connection is
    closed with a GOAWAY;
  - C{SETTINGS_MAX_HEADER_LIST_SIZE} is C{max_header_bytes}, enforced by
    the HPACK decoder: a larger header list closes the connection (h2 also
    refuses more than 64 CONTINUATION frames in one header block);
  - rapid reset (CVE-2023-44487): at most C{_RESET_BURST} streams reset by
    the client, refilled at C{_RESET_RATE} a second; past that, GOAWAY
    (ENHANCE_YOUR_CALM) and close.  Twisted 26 has a bucket of its own
    (1000, 33/s); Twisted 25.5 has none.

Twisted's C{_GenericHTTPChannelProtocol} builds a plain C{H2Connection}
when ALPN chose C{h2}; L{NegotiatingChannel} is that class with the same
switch building the hardened one.  The private names it relies on are
pinned in tests/test_compat.py.
"""
from __future__ import annotations

from importlib.util import find_spec
from typing import Any, List, Set

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http

from fauth.config import HttpLimits
from fauth.edge.server import HardenedHTTPChannel

__all__ = ["HardenedH2Connection", "NegotiatingChannel", "alpn_protocols", "h2_available"]

log = Logger()

_RESET_BURST = 100
_RESET_RATE = 33.0


def h2_available() -> bool:
    """Whether Twisted's HTTP/2 can run here (the C{h2} package is installed)."""
    return find_spec("h2") is not None and bool(getattr(http, "H2_ENABLED", False))


def alpn_protocols(limits: HttpLimits) -> List[bytes]:
    """What ALPN offers on a TLS listener of a site with these limits."""
    if limits.http2 and h2_available():
        return [b"h2", b"http/1.1"]
    return [b"http/1.1"]


def _connection_class() -> Any:
    from h2.connection import ConnectionState
    from h2.errors import ErrorCodes
    from h2.exceptions import ProtocolError
    from h2.settings import SettingCodes, Settings
    from twisted.internet.error import ConnectionLost
    from twisted.web._http2 import H2Connection

    class HardenedH2Connection(H2Connection):
        """Twisted's L{H2Connection} with fauth's limits (see the module docstring)."""

        def __init__(self, limits: HttpLimits, reactor: Any = None) -> None:
            super().__init__(reactor)
            conn = self.conn
            # Sent in the first SETTINGS frame (initiate_connection, in
            # connectionMade) and in force from the start.
            conn.local_settings = Settings(
                client=False,
                initial_values={
                    SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
                    SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
                },
            )
            conn.decoder.max_header_list_size = limits.max_header_bytes
            self._fauth_resets = float(_RESET_BURST)
            self._fauth_reset_time = self._reactor.seconds()
            self._fauth_released = False
            self._fauth_dead: Set[int] = set()

        def _requestAborted(self, event: Any) -> None:
            if self._closed() or not self._streamIsActive(event.stream_id):
                return
            now = self._reactor.seconds()
            elapsed = max(0.0, now - self._fauth_reset_time)
            self._fauth_reset_time = now
            self._fauth_resets = min(float(_RESET_BURST), self._fauth_resets + elapsed * _RESET_RATE) - 1
            if self._fauth_resets < 0:
                peer = self.transport.getPeer() if self.transport is not None else None
                log.warn("HTTP/2 client {peer}: too many stream resets; closing", peer=str(peer))
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.connectionLost(Failure(ConnectionLost("stream reset")))
                    self._requestDone(event.stream_id)
                self.conn.close_connection(error_code=ErrorCodes.ENHANCE_YOUR_CALM)
                if self.transport is not None:
                    self.transport.write(self.conn.data_to_send())
                    self.transport.loseConnection()
                self.connectionLost(Failure(ConnectionLost("Too many stream resets")))
                self._let_tls_close()
                return
            super()._requestAborted(event)

        def dataReceived(self, data: bytes) -> None:
            super().dataReceived(data)
            self._let_tls_close()

        # h2 takes in a whole read before Twisted handles its events one by
        # one: by the time a request is answered, h2 may have seen its
        # stream reset, or closed the connection (a flood tripped a limit)
        # while Twisted still goes through the rest of the events.  Events
        # after the close are ignored; an answer for a stream h2 already
        # closed is dropped, where Twisted only expects StreamClosedError.

        def _closed(self) -> bool:
            return bool(self.conn.state_machine.state == ConnectionState.CLOSED)

        def _requestReceived(self, event: Any) -> None:
            if not self._closed():
                super()._requestReceived(event)

        def _requestDataReceived(self, event: Any) -> None:
            if not self._closed() and self._streamIsActive(event.stream_id):
                super()._requestDataReceived(event)

        def _requestEnded(self, event: Any) -> None:
            if not self._closed() and self._streamIsActive(event.stream_id):
                super()._requestEnded(event)

        def _handleWindowUpdate(self, event: Any) -> None:
            if not self._closed():
                super()._handleWindowUpdate(event)

        def _handlePriorityUpdate(self, event: Any) -> None:
            if not self._closed():
                super()._handlePriorityUpdate(event)

        def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any, streamID: int) -> None:
            if streamID in self._fauth_dead or self._closed():
                return
            try:
                super().writeHeaders(version, code, reason, headers, streamID)
            except ProtocolError:
                self._dead_stream(streamID)

        def writeDataToStream(self, streamID: int, data: bytes) -> None:
            if streamID in self._fauth_dead or self._closed():
                return
            try:
                super().writeDataToStream(streamID, data)
            except ProtocolError:
                self._dead_stream(streamID)

        def endRequest(self, streamID: int) -> None:
            if streamID in self._fauth_dead or self._closed():
                return
            super().endRequest(streamID)

        def _dead_stream(self, streamID: int) -> None:
            # Closed on h2's side: nothing more is sent on it, and Twisted's
            # state for it goes once the write in progress has returned.
            self._fauth_dead.add(streamID)
            self._reactor.callLater(0, self._drop_stream, streamID)

        def _drop_stream(self, streamID: int) -> None:
            self._fauth_dead.discard(streamID)
            stream = self.streams.get(streamID)
            if stream is not None:
                stream.connectionLost(Failure(ConnectionLost("stream closed by the client")))
                self._requestDone(streamID)

        def _let_tls_close(self) -> None:
            # Twisted closes a connection it refuses (a protocol error, a
            # flood) with loseConnection while it is still the transport's
            # producer; a TLS transport waits for its producer to go before
            # it closes, so the connection stayed open after the GOAWAY
            # until the idle timeout.  Let go, and abort a peer that does
            # not read its close in time.
            transport: Any = self.transport
            if transport is None or not getattr(transport, "disconnecting", False) or self._fauth_released:
                return
            self._fauth_released = True
            transport.unregisterProducer()
            if self._abortingCall is None and self.abortTimeout is not None:
                self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)

    return HardenedH2Connection


_hardened_class: Any = None


def HardenedH2Connection(limits: HttpLimits, reactor: Any = None) -> Any:  # noqa: N802 -- a class, built on first use
    """A hardened L{H2Connection} (the class is built when h2 is first needed)."""
    global _hardened_class
    if _hardened_class is None:
        _hardened_class = _connection_class()
    return _hardened_class(limits, reactor)


class NegotiatingChannel(http._GenericHTTPChannelProtocol):
    """
    A hardened HTTP/1.1 channel that becomes a L{HardenedH2Connection} when
    ALPN chose C{h2}.
    """

    def __init__(self, limits: HttpLimits, reactor: Any) -> None:
        super().__init__(HardenedHTTPChannel(limits, reactor))
        self._limits = limits
        self._reactor = reactor

    def dataReceived(self, data: bytes) -> None:
        if self._negotiatedProtocol is None:
            first: Any = self._channel  # the HardenedHTTPChannel
            negotiated: Any = getattr(first.transport, "negotiatedProtocol", None) or b"http/1.1"
            if negotiated == b"h2":
                # As Twisted's own switch: the HTTP/1.1 channel lets go of the
                # transport (producer, timeouts), the HTTP/2 one takes it.
                network = first._networkProducer
                network.unregisterProducer()
                first.setTimeout(None)
                first._stop_timer()
                transport = first.transport
                channel = HardenedH2Connection(self._limits, self._reactor)
                channel.requestFactory = self._requestFactory
                channel.site = self._site
                channel.factory = self._factory
                channel.timeOut = self._timeOut
                channel.callLater = self._callLater
                self._channel = channel
                channel.makeConnection(transport)
                network.registerProducer(channel, True)
            self._negotiatedProtocol = negotiated
        self._channel.dataReceived(data)
