# -*- test-case-name: tests.edge.test_hostile_clients,tests.edge.test_server,tests.edge.test_head_dispatch -*-
"""
The client-facing HTTP/1.1 server, hardened: L{HardenedHTTPChannel} is
Twisted's L{HTTPChannel} with stricter parsing, limits that answer with the
right status, and timeouts that slow clients cannot stretch.

What Twisted's own channel lets through and this one refuses is listed in
L{fauth.edge.framing}, which holds the grammar.

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

Requests with a body are dispatched on their head when the site's
resource asks for it (C{handles_heads}; L{HardenedRequest}), the seam
glyph suggested in Twisted #5511: the channel calls the request when the
head is in, holds the body back (the transport paused) until the resource
wants it, defers C{100 Continue} until then, and, for a request answered
before its body ended, drops the rest (a little) or closes with a
lingering close (more).  Chunked trailers are parsed strictly, a head
ending in a bare LF is refused at once, and C{client_max_body_size}
answers 413.

Only attributes present in both Twisted 25.5 (PyPy 3.9) and 26.x are used
(tests/test_compat.py pins them): C{_maybeChooseTransferDecoder},
C{_respondToBadRequestAndDisconnect}, C{_transferDecoder},
C{_finishRequestBody}, C{_version}, C{_command}, C{_path},
C{_abortingCall}, C{_send100Continue}, C{_networkProducer},
C{_waitingForTransport}, C{_handlingRequest}, LineReceiver's C{_buffer} and
C{_busyReceiving}, and the private C{_ChunkedTransferDecoder} (its
C{_buffer}, C{_dataReceived_CHUNK_LENGTH} and C{_dataReceived_TRAILER}, in
L{fauth.edge.framing}).
"""
from __future__ import annotations

import gc
import math
import platform
from typing import Any, Optional, Tuple, cast

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import IResource

from fauth.config import HttpLimits
from fauth.edge.framing import FIELD_LINES, LENGTH, METHOD, TARGET, StrictChunkedDecoder
from fauth.edge.request import DISCARD_LIMIT, HardenedRequest
from fauth.wire.headers import CTL, TOKEN

__all__ = ["HardenedHTTPChannel", "HardenedSite"]

log = Logger()

#: Closing while a body still arrives: after the answer, the write side is
#: shut and at most this many bytes are read and dropped, for at most
#: L{LINGER_TIME} seconds, so that the client can read the answer before
#: the connection is reset (nginx's lingering close).
LINGER_LIMIT = 256 * 1024
LINGER_TIME = 2.0

# PyPy allocates bytes objects of a body's size (tens of KiB) outside its
# nursery and frees them only when a minor collection runs, which the few
# small objects of a streamed body rarely cause: the pieces of a large
# upload then pile up until the process has grown by the body's size.  One
# incremental collection step per RECLAIM_EVERY bytes read keeps that
# bounded.  CPython frees each piece by reference counting: nothing to do.
_collect_step = getattr(gc, "collect_step", None) if platform.python_implementation() == "PyPy" else None
RECLAIM_EVERY = 16 * 1024 * 1024

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
}

# A line feed as an int: `b"\n" in line` costs CPython 3.11 a TypeError
# raised and cleared inside the test (it tries the needle as an int first).
_LF = ord("\n")

# Phases of the channel, for the timers.
_IDLE = "idle"  # persistent connection between two requests: idle timeout only
_HEAD = "head"  # request line and header fields: header_timeout
_BODY = "body"  # request body: body_timeout
_BUSY = "busy"  # request handed to the resource: no read timeout
_CLOSED = "closed"  # refused or timed out: ignore everything


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
        self._idle_deadline: Optional[float] = None
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
        # A request dispatched on its head (HardenedRequest) whose body is
        # held back while nobody wants it yet, or while the upstream is slow.
        self._body_held = False
        # A request answered before its body ended: its requestDone waits
        # for the end of the body (dropped, up to DISCARD_LIMIT).
        self._unfinished: Any = None
        self._lingering = False
        self._linger_bytes = 0
        self._unreclaimed = 0

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
    # a phase only notes its deadline, and so does the idle timeout
    # (Twisted's TimeoutMixin, whose setTimeout arms and cancels a timer
    # around every request); the timer, when it fires, acts on what is due
    # and re-arms itself for whatever deadline is set by then (or stops).

    def _start_timer(self, seconds: float, phase: str) -> None:
        """The current C{phase} must be over within C{seconds}."""
        if not seconds or not math.isfinite(seconds):
            self._deadline = None
            return
        now = self._clock()
        self._deadline = (now + seconds, phase)
        self._arm(now, now + seconds)

    def _arm(self, now: float, when: float) -> None:
        """Have the timer fire at C{when} at the latest."""
        timer = self._timer
        if timer is None:
            self._timer = self.callLater(when - now, self._check_deadline)
        elif timer.getTime() > when:
            timer.reset(when - now)  # rare: moving a timer sooner scans the reactor's heap

    def _cancel_timer(self) -> None:
        """No deadline: the timer, if any, finds nothing due and stops."""
        self._deadline = None

    def _stop_timer(self) -> None:
        self._deadline = None
        self._idle_deadline = None
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _check_deadline(self) -> None:
        self._timer = None
        now = self._clock()
        idle = self._idle_deadline
        if idle is not None and idle <= now:
            self._idle_deadline = None
            self.timeoutConnection()
        if self._deadline is not None and self._deadline[0] <= now:
            phase = self._deadline[1]
            self._deadline = None
            self._timed_out(phase)
        due = [when for when in (self._idle_deadline, self._deadline and self._deadline[0]) if when is not None]
        if due:
            self._arm(now, min(due))

    def setTimeout(self, period: Optional[float]) -> Optional[float]:
        """
        The idle timeout (Twisted's L{TimeoutMixin} API, which HTTPChannel
        calls around each request): C{period} seconds without data from
        now, or none; the previous period is returned.
        """
        previous = self.timeOut
        # (TimeoutMixin infers an int from its class default; seconds are floats.)
        self.timeOut = period  # type: ignore[assignment]
        if period is None:
            self._idle_deadline = None
        else:
            now = self._clock()
            self._idle_deadline = now + period
            self._arm(now, now + period)
        return previous

    def resetTimeout(self) -> None:
        """Data came in: the idle timeout counts from now (if it runs)."""
        if self._idle_deadline is not None and self.timeOut is not None:
            self._idle_deadline = self._clock() + self.timeOut

    def _timed_out(self, phase: str) -> None:
        if self._phase != phase:
            return
        peer = self.transport.getPeer() if self.transport is not None else None
        log.info(
            "client {peer} too slow: request {what} not complete in time; closing",
            peer=str(peer),
            what="head" if phase == _HEAD else "body",
        )
        request = self.requests[-1] if phase == _BODY and self.requests else None
        if request is not None and getattr(request, "dispatched", False):
            if self._unfinished is None and not request.startedWriting:
                # In the hands of the resource already: answered through
                # the request, which the resource then finds finished.
                request.refuse_body(408)
                return
            # Answered already (or answering): no 408 can follow.
            self._phase = _CLOSED
            self._stop_timer()
            if self.transport is not None:
                cast(Any, self.transport).abortConnection()
            return
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
        if _collect_step is not None:
            self._unreclaimed += len(data)
            if self._unreclaimed > RECLAIM_EVERY:
                self._unreclaimed = 0
                _collect_step()
        if self._phase == _CLOSED or self._lingering:
            self._discard(data)
            return
        if data:
            if self._phase == _IDLE:
                self._begin_head()
            if self._phase == _HEAD:
                self._head_started = True
                if self._expect_request_line and not self._buffer:
                    self._fields_checked = self._check_fields(data)
        super().dataReceived(data)
        if self._phase == _HEAD and self.line_mode and _LF in self._buffer and not self._busyReceiving:
            # Lines end in CRLF, so an LF left over is a bare one: a head
            # ending in it would otherwise wait for the header timeout.
            self._refuse(400)

    def rawDataReceived(self, data: bytes) -> None:
        # LineReceiver hands the bytes that followed a head in the same read
        # straight to rawDataReceived, not through dataReceived: a head
        # refused on its own (413 on its Content-Length) must stop them here,
        # or its body would be parsed, and finish a request that has none.
        if self._phase == _CLOSED or self._lingering:
            self._discard(data)
            return
        super().rawDataReceived(data)

    def _discard(self, data: bytes) -> None:
        """Bytes after a refusal or a close: dropped, a lingering close bounded by L{LINGER_LIMIT}."""
        if self._lingering:
            self._linger_bytes += len(data)
            if self._linger_bytes > LINGER_LIMIT and self.transport is not None:
                cast(Any, self.transport).abortConnection()

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
            and FIELD_LINES.fullmatch(fields) is not None
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

    def _refuse(self, status: int, linger: bool = False) -> None:
        """
        Answer C{status} with no body, close, and ignore anything further
        (with C{linger}: a body may be arriving, see L{linger_close}).
        """
        if self._phase == _CLOSED:
            return
        self._phase = _CLOSED
        reason = _REASONS.get(status, b"Error")
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 %d %s\r\nConnection: close\r\nContent-Length: 0\r\n\r\n" % (status, reason)
            )
        if linger:
            self.linger_close()
        else:
            self._close()

    def refuse(self, status: int) -> None:
        """Answer C{status} to a request whose body is still arriving, then close (lingering)."""
        self._refuse(status, linger=True)

    def linger_close(self) -> None:
        """
        Close after what was written, while a request body may still be
        arriving: shut the write side (the client sees the end of the
        answer), then read and drop up to L{LINGER_LIMIT} bytes for up to
        L{LINGER_TIME} seconds before the connection is aborted.  Closing
        at once with unread bytes makes the kernel reset the connection,
        and a client still sending may then lose the answer.
        """
        if self._lingering:
            return
        self._lingering = True
        self._phase = _CLOSED
        self.persistent = False
        self._stop_timer()
        transport = self.transport
        if transport is None:
            return
        if ITCPTransport.providedBy(transport):
            self._body_held = False
            cast(Any, transport).resumeProducing()
            transport.loseWriteConnection()
        else:
            transport.loseConnection()
        if self._abortingCall is None:
            self._abortingCall = self.callLater(LINGER_TIME, self.forceAbortClient)

    # -- request bodies held and released (HardenedRequest) ------------------

    def hold_body(self) -> None:
        """Read nothing more from the client until L{release_body}."""
        if not self._body_held and self.transport is not None:
            self._body_held = True
            self._networkProducer.pauseProducing()

    def release_body(self) -> None:
        """Read the body on (unless the client does not read our answers)."""
        if self._body_held:
            self._body_held = False
            if not self._waitingForTransport and not self._lingering and self.transport is not None:
                self._networkProducer.resumeProducing()

    def resumeProducing(self) -> None:
        # Twisted resumes reading whenever the client drains our answers;
        # a held body must stay held.
        super().resumeProducing()
        if self._body_held and not self._handlingRequest:
            self._networkProducer.pauseProducing()

    def _send100Continue(self) -> None:
        request = self.requests[-1] if self.requests else None
        if isinstance(request, HardenedRequest) and self.length != 0:
            # Sent when the body is wanted (HardenedRequest.want_body):
            # after an allow, never before a denial.
            request.expect_continue = True
            return
        super()._send100Continue()

    def body_unwanted(self, request: "HardenedRequest") -> None:
        """
        C{request} was answered before its body ended: drop the rest of it,
        up to L{DISCARD_LIMIT}, to keep the connection; close (lingering)
        when more is known or found to follow.
        """
        self._unfinished = request
        remaining = request.body_remaining()
        if not self.persistent or remaining is None and request.body_dropped > DISCARD_LIMIT or (
            remaining is not None and remaining > DISCARD_LIMIT
        ):
            self.linger_close()
        else:
            self.release_body()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Every 400 Twisted itself decides on comes through here.
        self._refuse(400)

    # -- request line and header fields ---------------------------------------

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(414 if self._expect_request_line else 431)

    def lineReceived(self, line: bytes) -> None:
        if self._phase == _CLOSED:
            return
        if _LF in line:
            self._refuse(400)  # a bare LF (RFC 9112 2.2: we do not accept it as a line end)
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
            if len(parts) != 3 or not METHOD.match(parts[0]) or not TARGET.match(parts[1]):
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
            if self._framing is not None or not LENGTH.match(data):
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
            self._transferDecoder = StrictChunkedDecoder(
                self.requests[-1].handleContentChunk, self._finishRequestBody, self._limits
            )
            return True
        return True

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """
        Twisted's rule, read as RFC 9110 7.6.1 says: the C{Connection}
        options of every field line, split on commas (Twisted reads only the
        first line, split on spaces, so C{Connection: x} then C{Connection:
        close}, or C{keep-alive,close}, kept the connection open).  Plus
        HTTP/1.0 with C{Connection: keep-alive} (as C{ab -k} sends) kept
        alive when the request is a L{HardenedRequest}, which answers such a
        request with C{Connection: keep-alive} and a length, or closes when
        the response has no length.
        """
        values = request.requestHeaders.getRawHeaders(b"connection")
        if values is None:
            # No Connection field (most requests): what the rules below say then.
            return version == b"HTTP/1.1"
        tokens = {token.strip(b" \t").lower() for value in values for token in value.split(b",")}
        if version == b"HTTP/1.1":
            if b"close" in tokens:
                request.responseHeaders.setRawHeaders(b"connection", [b"close"])
                return False
            return True
        if version == b"HTTP/1.0" and isinstance(request, HardenedRequest):
            if b"keep-alive" in tokens and b"close" not in tokens:
                request.keep_alive_http10 = True
                return True
        return False

    # -- phases --------------------------------------------------------------

    def allHeadersReceived(self) -> None:
        self._fields_checked = False
        super().allHeadersReceived()
        if self._phase == _CLOSED:
            return
        if self.length == 0:
            self._cancel_timer()
            return
        limit = self._limits.client_max_body_size
        if limit and self.length is not None and self.length > limit:
            self._refuse(413, linger=True)
            return
        self._phase = _BODY
        self._start_timer(self._limits.body_timeout, _BODY)
        request = self.requests[-1]
        if isinstance(request, HardenedRequest):
            request.head_received(self._command, self._path, self._version)

    def allContentReceived(self) -> None:
        if self._phase == _CLOSED:
            # The end of a body refused while it arrived, in the same read
            # (413 on a chunked body read as Twisted does): nothing to process.
            return
        self._cancel_timer()
        self._phase = _BUSY
        self._expect_request_line = True
        self._head_started = False
        self.MAX_LENGTH = self._limits.max_request_line
        super().allContentReceived()
        unfinished, self._unfinished = self._unfinished, None
        if unfinished is not None and not self._lingering:
            # Answered before its body ended; the body is over now.
            self.requestDone(unfinished)

    def requestDone(self, request: http.Request) -> None:
        if isinstance(request, HardenedRequest) and request.dispatched and not request.body_complete:
            self.body_unwanted(request)
            return
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

    requestFactory = HardenedRequest

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
