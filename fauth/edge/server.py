# -*- test-case-name: tests.edge.test_hostile_clients -*-
"""
The client-facing HTTP/1.1 server, hardened: L{HardenedHTTPChannel} is
Twisted's L{HTTPChannel} with stricter parsing, limits that answer with the
right status, and timeouts that slow clients cannot stretch.

What Twisted's own channel lets through, and this one refuses:

  - ambiguous framing: a duplicated C{Content-Length} (even an identical
    one), C{Transfer-Encoding} other than exactly C{chunked} (C{identity}
    is accepted by Twisted and leaves the body to be read as the next
    request), C{Transfer-Encoding} in an HTTP/1.0 request, chunk sizes that
    do not fit 63 bits (400; RFC 9112 6.1 and 6.3);
  - obsolete line folding (a header line starting with SP or HTAB), which
    Twisted joins to the previous value (400; RFC 9112 5.2);
  - whitespace before the colon, control characters other than HTAB in a
    value (Twisted 25.5 only refuses NUL; 26 refuses NUL, CR and LF), and
    methods that are not upper-case letters, C{-} or C{_}, as nginx
    (400);
  - request targets with bytes outside visible ASCII (Twisted lets
    0x7F-0xB0 through).

Limits answer as they should: too many header fields or too many header
bytes get 431 (Twisted: 400), an over-long request line gets 414 (Twisted:
the connection is dropped without an answer).

Timeouts: Twisted only has an idle timeout, which every received byte
resets, so a client sending one byte a second holds a connection for ever.
Here the request head must be complete within C{header_timeout} seconds of
its first byte (or of the connection, for the first request), and the body
within C{body_timeout} seconds of the end of the head; otherwise the client
gets 408 (nothing at all when it had sent nothing) and the connection is
closed.  Between requests of a persistent connection the idle timeout
applies as before.

Only attributes present in both Twisted 25.5 (PyPy 3.9) and 26.x are used:
C{_maybeChooseTransferDecoder}, C{_respondToBadRequestAndDisconnect},
C{_transferDecoder}, C{_finishRequestBody}, C{_version}, C{_abortingCall}
and the private C{_ChunkedTransferDecoder}.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional, Tuple, cast

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import IResource

from fauth.config import HttpLimits
from fauth.wire.headers import CTL, TOKEN

__all__ = ["HardenedHTTPChannel", "HardenedSite"]

log = Logger()

# Method: what nginx accepts (upper case, "-", "_").
_METHOD = re.compile(rb"[A-Z_\-]+\Z")
# Visible ASCII only (RFC 9112 3.2); Twisted's own check lets 0x7F-0xB0 pass.
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")
# Content-Length: digits only, and few enough to fit 63 bits.
_LENGTH = re.compile(rb"[0-9]{1,18}\Z")
_MAX_CHUNK_SIZE = 2**63 - 1
# A block of header lines each of which passes the per-line checks of
# lineReceived: a token, a colon, a value without control characters (HTAB
# allowed), CRLF.  Obs-fold and whitespace before the colon fail it.
_FIELD_LINES = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n)*")

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
}

# Phases of the channel, for the timers.
_IDLE = "idle"  # persistent connection between two requests: idle timeout only
_HEAD = "head"  # request line and header fields: header_timeout
_BODY = "body"  # request body: body_timeout
_BUSY = "busy"  # request handed to the resource: no read timeout
_CLOSED = "closed"  # refused or timed out: ignore everything


class _StrictChunkedDecoder(http._ChunkedTransferDecoder):
    """Twisted's chunked decoder, refusing chunk sizes beyond 63 bits."""

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        done: bool = super()._dataReceived_CHUNK_LENGTH()
        if done and self.length > _MAX_CHUNK_SIZE:
            raise http._MalformedChunkedDataError("chunk size too large")
        return done


class HardenedHTTPChannel(http.HTTPChannel):
    """
    An L{HTTPChannel} for an HTTP/1.1 server facing untrusted clients.

    @param limits: C{max_request_line}, C{max_headers}, C{max_header_bytes},
        C{header_timeout}, C{body_timeout} (the idle timeout is the
        factory's C{timeOut}, set by L{HardenedSite}).
    @param clock: what the deadlines are read from: the reactor whose
        C{callLater} the factory gives the channel (the global one by
        default, imported only then).
    """

    def __init__(self, limits: HttpLimits = HttpLimits(), clock: Optional[IReactorTime] = None) -> None:
        super().__init__()
        self._limits = limits
        if clock is None:
            from twisted.internet import reactor

            clock = cast(IReactorTime, reactor)  # mypy sees the module, not the reactor it becomes
        self._clock = clock.seconds
        self._deadline: Optional[Tuple[float, str]] = None
        self._fields_checked = False
        # Twisted's own limits answer 400; ours are checked first (and
        # answer 414/431), so Twisted's must never trigger before them.
        self.maxHeaders = limits.max_headers + 1
        self.totalHeadersSize = limits.max_request_line + limits.max_header_bytes + 2 * limits.max_headers + 4
        self.MAX_LENGTH = limits.max_request_line
        self._phase = _HEAD
        self._expect_request_line = True
        self._head_started = False
        self._header_count = 0
        self._header_bytes = 0
        self._framing: Optional[bytes] = None
        self._timer: Optional[IDelayedCall] = None
        self._addresses: Optional[Tuple[IAddress, IAddress, bool]] = None

    # -- per connection, not per request ------------------------------------

    def getPeer(self) -> IAddress:
        # Twisted's Request asks for both addresses on every request, and
        # the local one is a getsockname() system call each time.
        return self._known_addresses()[0]

    def getHost(self) -> IAddress:
        return self._known_addresses()[1]

    def isSecure(self) -> bool:
        return self._known_addresses()[2]

    def _known_addresses(self) -> Tuple[IAddress, IAddress, bool]:
        addresses = self._addresses
        if addresses is None:
            transport = self.transport
            assert transport is not None  # asked by a request, on a connection
            addresses = self._addresses = (
                transport.getPeer(),
                transport.getHost(),
                bool(super().isSecure()),
            )
        return addresses

    # -- timers --------------------------------------------------------------

    # One timer per connection, not a callLater and a cancel per request:
    # a phase only notes its deadline, and the timer, when it fires,
    # re-arms itself for whatever deadline is set by then (or stops).

    def _start_timer(self, seconds: float, phase: str) -> None:
        """The current C{phase} must be over within C{seconds}."""
        if not seconds or not math.isfinite(seconds):
            self._deadline = None
            return
        now = self._clock()
        self._deadline = (now + seconds, phase)
        timer = self._timer
        if timer is None:
            self._timer = self.callLater(seconds, self._check_deadline)
        elif timer.getTime() > now + seconds:
            timer.reset(seconds)  # rare: moving a timer sooner scans the reactor's heap

    def _cancel_timer(self) -> None:
        """No deadline: the timer, if any, finds nothing due and stops."""
        self._deadline = None

    def _stop_timer(self) -> None:
        self._deadline = None
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _check_deadline(self) -> None:
        self._timer = None
        if self._deadline is None:
            return
        when, phase = self._deadline
        left = when - self._clock()
        if left > 0:
            self._timer = self.callLater(left, self._check_deadline)
            return
        self._deadline = None
        self._timed_out(phase)

    def _timed_out(self, phase: str) -> None:
        if self._phase != phase:
            return
        peer = self.transport.getPeer() if self.transport is not None else None
        log.info(
            "client {peer} too slow: request {what} not complete in time; closing",
            peer=str(peer),
            what="head" if phase == _HEAD else "body",
        )
        if phase == _HEAD and not self._head_started:
            # Nothing received: nobody to answer.
            self._phase = _CLOSED
            self._close()
            return
        self._refuse(408)

    # -- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self._phase = _HEAD
        self._start_timer(self._limits.header_timeout, _HEAD)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        self._phase = _CLOSED
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        if self._phase == _CLOSED:
            return
        if data:
            if self._phase == _IDLE:
                self._begin_head()
            if self._phase == _HEAD:
                self._head_started = True
                if self._expect_request_line and not self._buffer:
                    self._fields_checked = self._check_fields(data)
        super().dataReceived(data)

    def _check_fields(self, data: bytes) -> bool:
        """
        Whether the header fields of the request head at the start of
        C{data} pass every per-line check and limit, checked in one pass
        (then lineReceived skips them line by line); C{False} also when the
        head is not all there, or something is wrong with it, for
        lineReceived to find and answer.
        """
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        start = data.find(b"\r\n") + 2
        fields = data[start : end + 2] if start <= end else b""
        limits = self._limits
        return (
            len(fields) <= limits.max_header_bytes
            and fields.count(b"\n") <= limits.max_headers
            and _FIELD_LINES.fullmatch(fields) is not None
        )

    def _begin_head(self) -> None:
        """The first bytes of a request on a persistent connection."""
        self._phase = _HEAD
        self._head_started = True
        self._start_timer(self._limits.header_timeout, _HEAD)

    def _close(self) -> None:
        self._stop_timer()
        transport = self.transport
        if transport is None:
            return
        self.loseConnection()
        # A client that does not read could hold the connection open.
        if self.abortTimeout is not None and self._abortingCall is None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)

    def _refuse(self, status: int) -> None:
        """Answer C{status} with no body, close, and ignore anything further."""
        if self._phase == _CLOSED:
            return
        self._phase = _CLOSED
        reason = _REASONS.get(status, b"Error")
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 %d %s\r\nConnection: close\r\nContent-Length: 0\r\n\r\n" % (status, reason)
            )
        self._close()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Every 400 Twisted itself decides on comes through here.
        self._refuse(400)

    # -- request line and header fields ---------------------------------------

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(414 if self._expect_request_line else 431)

    def lineReceived(self, line: bytes) -> None:
        if self._phase == _CLOSED:
            return
        if self._phase == _IDLE:
            self._begin_head()
        if self._expect_request_line:
            if not line or not self.persistent:
                # One empty line before a request is tolerated, as Twisted
                # does; after a last request, Twisted ignores everything.
                super().lineReceived(line)
                return
            if len(line) > self._limits.max_request_line:
                self._refuse(414)
                return
            parts = line.split(b" ")
            if len(parts) != 3 or not _METHOD.match(parts[0]) or not _TARGET.match(parts[1]):
                self._refuse(400)
                return
            self._expect_request_line = False
            self._header_count = 0
            self._header_bytes = 0
            self._framing = None
            self.MAX_LENGTH = self._limits.max_header_bytes
            super().lineReceived(line)
            return
        if line and not self._fields_checked:
            if line[:1] in (b" ", b"\t"):
                self._refuse(400)  # obsolete line folding
                return
            self._header_count += 1
            self._header_bytes += len(line) + 2
            if (
                self._header_count > self._limits.max_headers
                or self._header_bytes > self._limits.max_header_bytes
            ):
                self._refuse(431)
                return
            name, colon, value = line.partition(b":")
            if not colon or TOKEN.fullmatch(name) is None or CTL.search(value):
                self._refuse(400)
                return
        super().lineReceived(line)

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        """
        Framing, strictly: one C{Content-Length} of digits, or exactly
        C{Transfer-Encoding: chunked} on HTTP/1.1, never both.
        """
        if header == b"Content-Length":
            if self._framing is not None or not _LENGTH.match(data):
                self._refuse(400)
                self.length = None
                return False
            self._framing = header
            return bool(super()._maybeChooseTransferDecoder(header, data))
        if header == b"Transfer-Encoding":
            codings = [c.strip(b" \t").lower() for c in data.split(b",")]
            if self._framing is not None or self._version != b"HTTP/1.1" or codings != [b"chunked"]:
                # A coding we do not know, with chunked last: 501 (RFC 9112 6.1);
                # anything where chunked is not the one, final coding: 400 (6.3).
                unknown = (
                    self._framing is None
                    and self._version == b"HTTP/1.1"
                    and len(codings) > 1
                    and codings[-1] == b"chunked"
                    and b"chunked" not in codings[:-1]
                    and all(TOKEN.fullmatch(c) for c in codings)
                )
                self._refuse(501 if unknown else 400)
                self.length = None
                return False
            self._framing = header
            self.length = None
            self._transferDecoder = _StrictChunkedDecoder(
                self.requests[-1].handleContentChunk, self._finishRequestBody
            )
            return True
        return True

    # -- phases --------------------------------------------------------------

    def allHeadersReceived(self) -> None:
        self._fields_checked = False
        super().allHeadersReceived()
        if self._phase == _CLOSED:
            return
        if self.length == 0:
            self._cancel_timer()
        else:
            self._phase = _BODY
            self._start_timer(self._limits.body_timeout, _BODY)

    def allContentReceived(self) -> None:
        self._cancel_timer()
        self._phase = _BUSY
        self._expect_request_line = True
        self._head_started = False
        self.MAX_LENGTH = self._limits.max_request_line
        super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:
        if self._phase != _CLOSED:
            # Pipelined bytes already buffered are replayed by Twisted below,
            # through dataReceived, which starts the header timer for them.
            self._phase = _IDLE
        super().requestDone(request)
        if self._phase == _IDLE and self._buffer:
            # Part of the next request arrived with the previous one.
            self._begin_head()


class HardenedSite(server.Site):
    """
    A L{Site} whose connections are L{HardenedHTTPChannel}s.

    @param limits: the C{http:} section of the configuration; its
        C{idle_timeout} is the site's C{timeout}.
    """

    def __init__(self, resource: IResource, limits: HttpLimits = HttpLimits(), **kwargs: Any) -> None:
        super().__init__(resource, timeout=limits.idle_timeout, **kwargs)
        self.limits = limits

    def acceptableProtocols(self) -> list:
        """ALPN: HTTP/1.1 only (Twisted's L{Site} offers h2 whenever h2 is installed; this channel is not h2)."""
        return [b"http/1.1"]

    # Twisted declares Factory.protocol as a class; buildProtocol only calls it.
    def protocol(self) -> HardenedHTTPChannel:  # type: ignore[override]
        """Called by C{Factory.buildProtocol}: a channel with this site's limits."""
        return HardenedHTTPChannel(self.limits, self.reactor)
