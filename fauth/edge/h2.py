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

Parity with the HTTP/1.1 server (L{fauth.edge.server}):

  - malformed requests h2 lets through are answered on their stream before
    a request exists (L{refusal}: 400, 431, 413); h2 refuses the rest of
    RFC 9113 8.2-8.3 itself, as a connection error;
  - C{header_timeout} bounds a header block (or any frame but DATA) from
    the read that began it (GOAWAY: no stream to answer yet),
    C{body_timeout} a stream's body (408), C{client_max_body_size} its
    DATA (413);
  - a stream's queued response body is bounded (L{STREAM_QUEUE_LIMIT}):
    past it the upstream leg is paused, as Twisted pauses it for a closed
    flow-control window;
  - several C{cookie} fields are joined for the HTTP/1.1 upstream.

Twisted's C{_GenericHTTPChannelProtocol} builds a plain C{H2Connection}
when ALPN chose C{h2}; L{NegotiatingChannel} is that class with the same
switch building the hardened one.  The private names it relies on are
pinned in tests/test_compat.py.
"""
from __future__ import annotations

from functools import partial
from importlib.util import find_spec
from typing import Any, Dict, Hashable, List, Optional, Sequence, Set, Tuple

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http

from fauth.config import HttpLimits
# As the HTTP/1.1 server: methods nginx accepts, a Content-Length of digits
# only (h2 and Twisted take whatever int() takes).
from fauth.edge.framing import LENGTH, METHOD
from fauth.edge.server import HardenedHTTPChannel
from fauth.wire.headers import CTL, TOKEN

__all__ = [
    "STREAM_QUEUE_LIMIT",
    "HardenedH2Connection",
    "NegotiatingChannel",
    "alpn_protocols",
    "h2_available",
    "refusal",
]

log = Logger()

_RESET_BURST = 100
_RESET_RATE = 33.0

#: Bytes of response body queued for one stream (not yet sent) beyond which
#: its producer, the upstream leg, is paused (L{HardenedH2Connection}).
STREAM_QUEUE_LIMIT = 256 * 1024

_SCHEMES = (b"http", b"https")
# Frame types (RFC 9113 6): what a partial frame at the end of a read is.
_DATA, _HEADERS, _CONTINUATION = 0x0, 0x1, 0x9


def refusal(headers: Sequence[Tuple[bytes, bytes]], limits: HttpLimits) -> Optional[int]:
    """
    The status a request header list that h2 accepted must still get
    (RFC 9113 8.2-8.3, and the HTTP/1.1 server's rules), or C{None}.

    h2 (C{validate_inbound_headers}) already refuses, as a connection error:
    upper-case names, CR, LF or NUL in names or values, names with other
    control characters, space or a colon, values with surrounding
    whitespace, connection-specific fields (C{connection},
    C{transfer-encoding}, C{keep-alive}, C{proxy-connection},
    C{upgrade}), C{te} other than C{trailers}, unknown, duplicated or
    missing pseudo-header fields, a pseudo-header field after a regular
    one, an empty C{:path}, two C{host} fields, C{host} and C{:authority}
    disagreeing, and (per stream) DATA that disagrees with
    C{content-length}.  Left for here: names that are not tokens, values
    with other control characters (as HTTP/1.1), a C{:method} that is not
    upper-case letters, C{-} or C{_} (CONNECT included: no tunnels), a
    C{:scheme} other than http or https, a C{:path} that is not
    origin-form (or C{*} for OPTIONS), a C{content-length} that is not one
    number; more fields than C{max_headers} get 431, a C{content-length}
    over C{client_max_body_size} 413.
    """
    method = scheme = path = None
    lengths: List[bytes] = []
    fields = 0
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":scheme":
                scheme = value
            elif name == b":path":
                path = value
            elif name != b":authority":
                return 400  # :protocol (extended CONNECT): not offered
            continue
        fields += 1
        if TOKEN.fullmatch(name) is None or CTL.search(value):
            return 400
        if name == b"content-length":
            lengths.append(value)
    if method is None or METHOD.match(method) is None or method == b"CONNECT":
        return 400
    if scheme not in _SCHEMES or path is None:
        return 400
    if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
        return 400
    if fields > limits.max_headers:
        return 431
    if lengths:
        if len(lengths) > 1 or LENGTH.match(lengths[0]) is None:
            return 400
        if limits.client_max_body_size and int(lengths[0]) > limits.client_max_body_size:
            return 413
    return None


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
            self._limits = limits
            # The header block (or frame) being received, and its deadline.
            self._fauth_head: Optional[Hashable] = None
            self._fauth_head_timer: Any = None
            # Per stream: the body deadline, and the body bytes received.
            self._fauth_body_timers: Dict[int, Any] = {}
            self._fauth_body_bytes: Dict[int, int] = {}
            # Streams whose producer the queue limit paused.
            self._fauth_capped: Set[int] = set()
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
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.connectionLost(Failure(ConnectionLost("stream reset")))
                    self._requestDone(event.stream_id)
                self._goaway(ErrorCodes.ENHANCE_YOUR_CALM, "too many stream resets", "Too many stream resets")
                return
            self._end_body(event.stream_id)
            super()._requestAborted(event)

        def _goaway(self, code: Any, why: str, reason: str) -> None:
            """Close the connection with a GOAWAY carrying C{code}."""
            peer = self.transport.getPeer() if self.transport is not None else None
            log.warn("HTTP/2 client {peer}: {why}; closing", peer=str(peer), why=why)
            self.conn.close_connection(error_code=code)
            if self.transport is not None:
                self.transport.write(self.conn.data_to_send())
                self.transport.loseConnection()
            self.connectionLost(Failure(ConnectionLost(reason)))
            self._let_tls_close()

        def dataReceived(self, data: bytes) -> None:
            super().dataReceived(data)
            self._watch_head()
            self._let_tls_close()

        # -- header_timeout: a header block (HEADERS and its CONTINUATIONs),
        # or any frame but DATA, must be complete within header_timeout of
        # the read that began it; else GOAWAY and close (there is no stream
        # yet to answer 408 on).  h2 holds what is incomplete in its frame
        # buffer (tests/test_compat.py pins the names).

        def _watch_head(self) -> None:
            if self._closed():
                self._stop_head_timer()
                return
            buffer = self.conn.incoming_buffer
            data = buffer._data
            pending: Optional[Hashable] = None
            if buffer._headers_buffer:
                # One key from the first bytes of a stream's HEADERS frame to
                # its END_HEADERS: CONTINUATION frames do not restart it.
                pending = ("head", buffer._headers_buffer[0].stream_id)
            elif len(data) >= 9 and data[3] in (_HEADERS, _CONTINUATION):
                pending = ("head", int.from_bytes(data[5:9], "big") & 0x7FFFFFFF)
            elif len(data) >= 9 and data[3] != _DATA:
                pending = ("frame", bytes(data[:9]))
            elif data and (len(data) < 4 or data[3] != _DATA):
                pending = ("frame", None)
            if pending == self._fauth_head:
                return
            self._stop_head_timer()
            self._fauth_head = pending
            if pending is not None and self._limits.header_timeout:
                self._fauth_head_timer = self.callLater(self._limits.header_timeout, self._head_timed_out)

        def _stop_head_timer(self) -> None:
            timer, self._fauth_head_timer = self._fauth_head_timer, None
            self._fauth_head = None
            if timer is not None and timer.active():
                timer.cancel()

        def _head_timed_out(self) -> None:
            self._fauth_head_timer = None
            if not self._closed():
                self._goaway(ErrorCodes.NO_ERROR, "request head not complete in time", "request head too slow")

        # -- requests: malformed ones refused before a stream exists, the
        # body deadline and client_max_body_size per stream

        def _requestReceived(self, event: Any) -> None:
            if self._closed():
                return
            status = refusal(event.headers, self._limits)
            if status is not None:
                self._refuse_stream(event.stream_id, status, event.stream_ended is None)
                return
            super()._requestReceived(event)
            request = self.streams[event.stream_id]._request
            cookies = request.requestHeaders.getRawHeaders(b"cookie")
            if cookies is not None and len(cookies) > 1:
                # RFC 9113 8.2.3: one field for HTTP/1.1 (the upstream leg).
                request.requestHeaders.setRawHeaders(b"cookie", [b"; ".join(cookies)])
            if event.stream_ended is None and self._limits.body_timeout:
                self._fauth_body_bytes[event.stream_id] = 0
                self._fauth_body_timers[event.stream_id] = self.callLater(
                    self._limits.body_timeout, partial(self._body_timed_out, event.stream_id)
                )

        def _refuse_stream(self, stream_id: int, status: int, still_sending: bool) -> None:
            """
            Answer C{status} on a stream, and reset it (C{NO_ERROR}: RFC
            9113 8.1) when the client is still sending, so that it stops
            and its DATA no longer counts against the connection's window.
            """
            try:
                self.conn.send_headers(
                    stream_id, [(b":status", b"%d" % status), (b"content-length", b"0")], end_stream=True
                )
                if still_sending:
                    self.conn.reset_stream(stream_id, error_code=ErrorCodes.NO_ERROR)
            except ProtocolError:
                return  # closed by the client meanwhile
            self._tryToWriteControlData()

        def _drop_request(self, stream_id: int, status: int) -> None:
            """
            Refuse a stream whose request is in Twisted's hands: C{status}
            if nothing was answered yet, else a reset; the request is told
            its client is gone (an auth call or upstream exchange is
            cancelled).
            """
            stream = self.streams.get(stream_id)
            if stream is None:
                return
            self._end_body(stream_id)
            request = stream._request
            if request.startedWriting or request.finished:
                self.abortRequest(stream_id)
            else:
                self._refuse_stream(stream_id, status, True)
                if self._streamIsActive(stream_id):
                    stream.connectionLost(Failure(ConnectionLost("refused: %d" % status)))
                    self._requestDone(stream_id)

        def _body_timed_out(self, stream_id: int) -> None:
            self._fauth_body_timers.pop(stream_id, None)
            if not self._closed() and self._streamIsActive(stream_id):
                peer = self.transport.getPeer() if self.transport is not None else None
                log.info("HTTP/2 client {peer}: request body not complete in time", peer=str(peer))
                self._drop_request(stream_id, 408)

        def _end_body(self, stream_id: int) -> None:
            self._fauth_body_bytes.pop(stream_id, None)
            timer = self._fauth_body_timers.pop(stream_id, None)
            if timer is not None and timer.active():
                timer.cancel()

        def connectionLost(self, reason: Failure = Failure(ConnectionLost()), _cancelTimeouts: bool = True) -> None:
            self._stop_head_timer()
            for stream_id in list(self._fauth_body_timers):
                self._end_body(stream_id)
            super().connectionLost(reason, _cancelTimeouts)

        # h2 takes in a whole read before Twisted handles its events one by
        # one: by the time a request is answered, h2 may have seen its
        # stream reset, or closed the connection (a flood tripped a limit)
        # while Twisted still goes through the rest of the events.  Events
        # after the close are ignored; an answer for a stream h2 already
        # closed is dropped, where Twisted only expects StreamClosedError.

        def _closed(self) -> bool:
            return bool(self.conn.state_machine.state == ConnectionState.CLOSED)

        def _requestDataReceived(self, event: Any) -> None:
            if self._closed():
                return
            if not self._streamIsActive(event.stream_id):
                # A stream answered and forgotten: its DATA still counts
                # against the connection's window, which must stay open.
                self.openStreamWindow(event.stream_id, event.flow_controlled_length)
                return
            limit = self._limits.client_max_body_size
            if limit and event.stream_id in self._fauth_body_bytes:
                received = self._fauth_body_bytes[event.stream_id] + len(event.data)
                self._fauth_body_bytes[event.stream_id] = received
                if received > limit:
                    self._drop_request(event.stream_id, 413)
                    self.openStreamWindow(event.stream_id, event.flow_controlled_length)
                    return
            super()._requestDataReceived(event)

        def _requestEnded(self, event: Any) -> None:
            self._end_body(event.stream_id)
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
                return
            # Twisted pauses a stream's producer (the upstream leg) only when
            # the client's flow-control window is used up: a client that
            # opens a large window and then reads nothing would have the
            # whole upstream body queued here.  Past STREAM_QUEUE_LIMIT
            # bytes queued, the producer is paused as for a closed window.
            stream = self.streams.get(streamID)
            if stream is not None and self._queued(streamID) > STREAM_QUEUE_LIMIT:
                stream.flowControlBlocked()
                self._fauth_capped.add(streamID)

        def _queued(self, streamID: int) -> int:
            return sum(len(chunk) for chunk in self._outboundStreamQueues.get(streamID, ()) if isinstance(chunk, bytes))

        def _sendPrioritisedData(self, *args: Any) -> None:
            super()._sendPrioritisedData(*args)
            # Streams held back by the queue limit go on once half of it is sent.
            for streamID in list(self._fauth_capped):
                stream = self.streams.get(streamID)
                if stream is None:
                    self._fauth_capped.discard(streamID)
                elif self._queued(streamID) <= STREAM_QUEUE_LIMIT // 2:
                    self._fauth_capped.discard(streamID)
                    stream.windowUpdated()  # resumes it if the client's window allows

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
