# -*- test-case-name: tests.wire.test_connection -*-
"""
One pooled HTTP/1.1 client connection, for both outbound legs.

It takes the place of Twisted's C{HTTP11ClientProtocol} under a
L{twisted.web.client.HTTPConnectionPool} (L{fauth.wire.pool}), which keeps,
times out and retries connections as it does Twisted's own.  Twisted's
protocol serialises a C{Request} header by header, parses the answer a line
at a time into a C{Headers}, runs about twenty Deferred callbacks and a
C{TransportProxyProducer}, and accepts answers a proxy must refuse (a header
line without a colon, NUL, obs-fold, unbounded lines and header counts,
stray bytes).  Here a request is a head serialised by the caller in one
join, the answer's head is parsed in one pass with those checks
(L{fauth.wire.h1}), and one Deferred fires per request, when the head is in:
the body then goes to the request's sink, with the connection as its push
producer.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional, Protocol as TypingProtocol, cast

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IAddress, IProducer, IPushProducer, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import (
    ParseError,
    RequestNotSent,
    ResponseFailed,
    ResponseNeverReceived,
    _DataLoss,
)
from zope.interface import implementer

from fauth.wire.h1 import MAX_RESPONSE_HEAD, MAX_RESPONSE_HEADERS, ChunkedDecoder, ResponseHead, find_head_end, parse_head

__all__ = [
    "BodySource",
    "ClientConnection",
    "ClientRequest",
    "FileUpload",
    "ResponseSink",
    "StreamUpload",
]

log = Logger()

_BIG_BODY = 64 * 1024


class ResponseSink(TypingProtocol):
    """What a L{ClientRequest}'s answer is streamed to."""

    def body_start(self, producer: IPushProducer, head: ResponseHead) -> Any:
        """
        The head is in; the body follows.  C{producer} (the connection)
        pauses, resumes or stops the body.  The request's Deferred fires
        with what this returns.
        """

    def body_data(self, data: bytes) -> None:
        """A piece of the body."""

    def body_done(self, reason: Optional[Failure]) -> None:
        """The body is complete (C{None}), or failed."""


class _Wire(TypingProtocol):
    """
    What a L{ClientConnection} uses of its transport: a TCP connection's
    (L{ITCPTransport}, directly or under TLS), which is also the push
    producer of what it receives.
    """

    def write(self, data: bytes) -> None: ...

    def writeSequence(self, data: Iterable[bytes]) -> None: ...

    def registerProducer(self, producer: IProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def getPeer(self) -> IAddress: ...


class ClientRequest:
    """
    One request, ready for the wire.

    @ivar head: the request line and header fields with the framing
        (C{Content-Length}) already in, and the blank line.
    @ivar body: a body in memory, or C{None}.
    @ivar upload: a body streamed from a file (L{FileUpload}), or C{None}.
    @ivar sink: the L{ResponseSink} the answer goes to.
    @ivar persistent: the connection may be pooled afterwards.
    @ivar bodyProducer: what Twisted's pool reads to decide on a retry (a
        request with a body is never sent again); C{None} without a body.
    @ivar sink_keeps_body: the sink keeps body bytes until its reader asks
        for them (L{fauth.wire.agent.StrictResponse}): the body that came
        with the head is passed on before the request's Deferred fires, so
        an answer whole in one read is complete before its caller hears of
        it, and nobody waits on its body.
    """

    __slots__ = ("method", "head", "body", "upload", "sink", "persistent", "bodyProducer", "sink_keeps_body")

    def __init__(
        self,
        method: bytes,
        head: bytes,
        sink: ResponseSink,
        body: Optional[bytes] = None,
        upload: Optional["FileUpload"] = None,
        persistent: bool = True,
        sink_keeps_body: bool = False,
    ) -> None:
        self.method = method
        self.head = head
        self.body = body
        self.upload = upload
        self.sink = sink
        self.persistent = persistent
        self.sink_keeps_body = sink_keeps_body
        self.bodyProducer = upload if upload is not None else body


class _Upload:
    """
    What both kinds of request body share: written to one transport as its
    push producer, C{done} once complete or stopped, and a C{failed}
    callback for a body that breaks off.
    """

    def __init__(self) -> None:
        self._transport: Any = None
        self._failed: Optional[Callable[[Failure], None]] = None
        self.done = False

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            transport, self._transport = self._transport, None
            if transport is not None:
                transport.unregisterProducer()

    def _give_up(self, failure: Failure) -> None:
        failed = self._failed
        self._finish()
        if failed is not None:
            failed(failure)


@implementer(IPushProducer)
class FileUpload(_Upload):
    """
    A request body the server spooled to a file, written with backpressure:
    it is the transport's push producer, so the transport pauses it when its
    buffer fills, and it writes on synchronously until then (no Cooperator,
    no reactor turn per chunk).
    """

    chunk_size = 64 * 1024

    def __init__(self, source: Any, length: int) -> None:
        super().__init__()
        self._source = source
        self.length = length
        self._remaining = length
        self._paused = False

    def start(self, transport: _Wire, failed: Callable[[Failure], None]) -> None:
        """Write to C{transport}; C{failed} is told if the file cannot be read to its length."""
        self._transport = transport
        self._failed = failed
        transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        transport = self._transport
        while not self._paused and not self.done and transport is not None:
            try:
                data = self._source.read(min(self.chunk_size, self._remaining))
            except Exception:
                self._give_up(Failure())
                return
            if not data:
                self._give_up(Failure(_DataLoss("request body shorter than its Content-Length")))
                return
            self._remaining -= len(data)
            if self._remaining <= 0:
                self._finish()
            transport.write(data)

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        """Stop writing (the answer came early, or the connection is gone)."""
        self._finish()


class BodySource(TypingProtocol):
    """Where a L{StreamUpload}'s body comes from (the client's request)."""

    def pause(self) -> None:
        """Send no more for now (the upstream reads slowly)."""

    def resume(self) -> None:
        """Send on (the first call lets the body come at all)."""

    def stop(self) -> None:
        """The rest of the body is not wanted."""


class UploadAborted(Exception):
    """The client's body will not be complete (the gateway refused the rest)."""


@implementer(IPushProducer)
class StreamUpload(_Upload):
    """
    A request body passed on as it arrives from the client, with
    backpressure both ways: it is the upstream transport's push producer
    (a full buffer pauses the C{source}, the client's side), and it is fed
    by the C{source} through L{body_data} and L{body_end}.  A body of known
    C{length} keeps it (the client's framing delivers exactly that many
    bytes); one without (chunked from the client) is sent chunked.  What
    arrives before the connection is ready is kept (the source holds the
    rest back until L{start}).
    """

    def __init__(self, length: Optional[int], source: BodySource) -> None:
        super().__init__()
        self.length = length
        self._chunked = length is None
        self._source = source
        self._pending: List[bytes] = []
        self._ended = False

    def start(self, transport: Any, failed: Callable[[Failure], None]) -> None:
        """Write to C{transport} (the head is out); C{failed} is told if the client's body breaks off."""
        if self.done:
            return
        self._transport = transport
        self._failed = failed
        transport.registerProducer(self, True)
        pending, self._pending = self._pending, []
        for data in pending:
            self._write(data)
        if self._ended:
            self._end()
        else:
            self._source.resume()

    # -- fed by the client's side

    def body_data(self, data: bytes) -> None:
        if self.done or not data:
            return
        if self._transport is None:
            self._pending.append(data)
        else:
            self._write(data)

    def body_end(self) -> None:
        self._ended = True
        if self._transport is not None:
            self._end()

    def body_abort(self) -> None:
        """The client's body breaks off: the upstream exchange cannot be completed."""
        if not self.done:
            self._give_up(Failure(UploadAborted("request body refused by the gateway")))

    def _write(self, data: bytes) -> None:
        if self._chunked:
            self._transport.writeSequence([b"%x\r\n" % len(data), data, b"\r\n"])
        else:
            self._transport.write(data)

    def _end(self) -> None:
        if self.done:
            return
        if self._chunked:
            self._transport.write(b"0\r\n\r\n")
        self._finish()

    # -- IPushProducer, for the upstream transport

    def pauseProducing(self) -> None:
        if not self.done:
            self._source.pause()

    def resumeProducing(self) -> None:
        if not self.done:
            self._source.resume()

    def stopProducing(self) -> None:
        """Stop sending (the answer came early, or the connection is gone)."""
        was_done = self.done
        self._finish()
        self._pending = []
        if not was_done or not self._ended:
            self._source.stop()


@implementer(IPushProducer)
class ClientConnection(Protocol):
    """
    One request at a time over one connection; built by the pool's factory.

    @param quiescent: called with this connection when it can carry the next
        request (the pool puts it back).
    @ivar idle_since: when it last went back to the pool (the pool's clock).
    @ivar served: exchanges this connection has carried back to the pool
        (for an upstream's C{keepalive_pool.requests}).
    @ivar state: what L{fauth.pools} reads:
        C{QUIESCENT} (idle), C{WAITING} (carrying a request), C{CLOSING},
        C{CONNECTION_LOST}.
    """

    # The transport, as what this protocol uses of it; set by connectionMade.
    _wire: _Wire

    def __init__(self, quiescent: Callable[["ClientConnection"], None] = lambda c: None) -> None:
        self._quiescent = quiescent
        self.served = 0
        self.idle_since = 0.0
        self.state = "QUIESCENT"
        self._request: Optional[ClientRequest] = None
        self._deferred: Optional[Deferred] = None
        self._buffer = b""
        self._head: Optional[ResponseHead] = None
        self._received = False
        self._decoder: Optional[ChunkedDecoder] = None
        self._remaining: Optional[int] = None
        self._upload: Any = None  # FileUpload or StreamUpload
        self._reuse = True
        self._paused = False
        self._lost: List[Deferred] = []

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        # ITransport declares none of abortConnection and the producer
        # methods; the transports of a client connection (TCP, TLS) have them.
        self._wire = cast(_Wire, transport)
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)

    # -- the request

    def request(self, request: ClientRequest) -> Deferred:
        """
        Send C{request}.  The result fires, once the answer's head is in,
        with what the request's sink made of it; cancelling it before then
        aborts the connection.
        """
        if self.state != "QUIESCENT":
            return fail(RequestNotSent())
        self.state = "WAITING"
        self._request = request
        self._head = None
        self._received = False
        self._reuse = request.persistent
        d = self._deferred = Deferred(self._cancel)
        body = request.body
        if body is None:
            self._wire.write(request.head)
        elif len(body) < _BIG_BODY:
            self._wire.write(request.head + body)
        else:
            self._wire.writeSequence([request.head, body])
        if request.upload is not None:
            self._upload = request.upload
            request.upload.start(self._wire, self._upload_failed)
        return d

    def _cancel(self, d: Deferred) -> None:
        # The Deferred then fails with CancelledError; nothing else may fire it.
        self._deferred = None
        self._abandon()

    def _upload_failed(self, failure: Failure) -> None:
        request = self._request
        self._abandon()
        if request is not None:
            self._fail(request, failure)

    def _abandon(self) -> None:
        """Drop the current exchange and abort the connection (it can carry nothing more)."""
        self._request = None
        self._stop_upload()
        self.state = "CLOSING"
        if self.transport is not None:
            self._wire.abortConnection()

    def _stop_upload(self) -> None:
        upload, self._upload = self._upload, None
        if upload is not None:
            upload.stopProducing()

    # -- the response

    def dataReceived(self, data: bytes) -> None:
        if self._request is None:
            if self.state == "QUIESCENT":
                # An answer to no request, while pooled: the peer is out of step.
                self._stray(len(data))
                self.state = "CLOSING"
                self._wire.loseConnection()
            return
        try:
            if self._head is None:
                self._head_received(data)
            else:
                self._body_received(data)
        except ParseError:
            request = self._request
            self._abandon()
            if request is not None:
                self._fail(request, Failure())

    def _head_received(self, data: bytes) -> None:
        self._received = True
        request = self._request
        assert request is not None
        buffer = self._buffer + data if self._buffer else data
        while True:
            end = find_head_end(buffer)
            if end < 0 or end > MAX_RESPONSE_HEAD:
                if end > MAX_RESPONSE_HEAD or len(buffer) > MAX_RESPONSE_HEAD:
                    if buffer.count(b"\n", 0, MAX_RESPONSE_HEAD) > MAX_RESPONSE_HEADERS:
                        raise ParseError("too many headers", b"")
                    raise ParseError("response head too large", b"")
                self._buffer = buffer
                return
            head = parse_head(buffer[:end], request.method)
            buffer = buffer[end:]
            if not 100 <= head.status < 200:
                break
            # An interim answer nobody asked for (RFC 9110 section 15.2): skip it.
        self._buffer = b""
        self._head = head
        if not head.keep_alive:
            self._reuse = False
        self._decoder = ChunkedDecoder() if head.chunked else None
        length = head.length  # an int, or UNKNOWN_LENGTH
        self._remaining = length if isinstance(length, int) else None
        if request.sink_keeps_body:
            result = request.sink.body_start(self, head)
            if self._remaining == 0:
                self._complete(buffer)
            elif buffer:
                self._body_received(buffer)
            # (A body that fails in there fails the Deferred instead: _fail.)
            d, self._deferred = self._deferred, None
            if d is not None:
                d.callback(result)
            return
        # Taken first: a sink that stops the body at once is told so itself.
        d, self._deferred = self._deferred, None
        result = request.sink.body_start(self, head)
        if d is not None:
            d.callback(result)
        if self._request is not request:
            return  # the caller stopped it
        if self._remaining == 0:
            self._complete(buffer)
        elif buffer:
            self._body_received(buffer)

    def _body_received(self, data: bytes) -> None:
        request = self._request
        assert request is not None
        if self._decoder is not None:
            pieces, done = self._decoder.feed(data)
            for piece in pieces:
                self._deliver(request, piece)
                if self._request is not request:
                    return
            if done:
                self._complete(self._decoder.rest)
            return
        remaining = self._remaining
        if remaining is None:
            self._deliver(request, data)
        elif len(data) < remaining:
            self._remaining = remaining - len(data)
            self._deliver(request, data)
        else:
            self._remaining = 0
            self._deliver(request, data[:remaining] if len(data) > remaining else data)
            if self._request is request:
                self._complete(data[remaining:])

    def _deliver(self, request: ClientRequest, data: bytes) -> None:
        request.sink.body_data(data)

    def _complete(self, rest: bytes) -> None:
        request, head = self._request, self._head
        assert request is not None and head is not None
        if rest:
            # Bytes after a whole answer can only be an answer the peer
            # thinks belongs to the next request: reusing the connection
            # would desynchronise it.
            self._stray(len(rest))
            self._reuse = False
        upload, self._upload = self._upload, None
        self._request = self._head = self._decoder = None
        if upload is not None and not upload.done:
            # The whole answer came before the whole body went out (an
            # upstream refusing an upload).  Stop sending while the body's
            # source is open; the connection can carry nothing more.
            upload.stopProducing()
            self.state = "CLOSING"
            self._wire.abortConnection()
        elif self._reuse:
            if self._paused:
                self._wire.resumeProducing()
                self._paused = False
            self.state = "QUIESCENT"
            # Back in the pool before the caller hears of the end, as
            # Twisted does: the caller's next request can reuse it.
            try:
                self._quiescent(self)
            except Exception:
                log.failure("could not return a connection to the pool")
                self.state = "CLOSING"
                self._wire.loseConnection()
        else:
            self.state = "CLOSING"
            self._wire.loseConnection()
        request.sink.body_done(None)

    def _fail(self, request: ClientRequest, failure: Failure) -> None:
        """Tell the caller of C{request} that it failed."""
        d, self._deferred = self._deferred, None
        if d is not None:
            wrapper = ResponseFailed if self._received else ResponseNeverReceived
            d.errback(Failure(wrapper([failure])))
        else:
            request.sink.body_done(Failure(ResponseFailed([failure])))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        request = self._request
        self._request = None
        self.state = "CONNECTION_LOST"
        self._stop_upload()
        lost, self._lost = self._lost, []
        for d in lost:
            d.callback(None)
        if request is None:
            return
        head = self._head
        if head is not None and self._remaining is None and self._decoder is None:
            # A body framed by the end of the connection: this is its end.
            self._head = None
            request.sink.body_done(None)
            return
        if self._head is not None:
            reason = Failure(_DataLoss(reason.value))
        self._fail(request, reason)

    # -- IPushProducer, for the sink of a streamed body

    def pauseProducing(self) -> None:
        if self._request is not None and not self._paused:
            self._paused = True
            self._wire.pauseProducing()

    def resumeProducing(self) -> None:
        if self._request is not None and self._paused:
            self._paused = False
            self._wire.resumeProducing()

    def stopProducing(self) -> None:
        """Stop the answer being received (the client went away, or it timed out)."""
        request = self._request
        if request is None:
            return
        self._abandon()
        self._fail(request, Failure(net_error.ConnectionAborted()))

    # -- for the pool

    def abort(self) -> Deferred:
        """Close the connection; fires once it is closed."""
        closed = self.when_closed()
        if self.state != "CONNECTION_LOST":
            self.state = "CLOSING"
            self._wire.loseConnection()
        return closed

    def when_closed(self) -> Deferred:
        """Fires once the connection is closed."""
        if self.state == "CONNECTION_LOST":
            return succeed(None)
        d: Deferred = Deferred()
        self._lost.append(d)
        return d

    def _stray(self, size: int) -> None:
        peer = self._wire.getPeer()
        log.warn(
            "{peer} sent {size} bytes after the end of a response; connection closed, not reused",
            peer="%s:%s" % (getattr(peer, "host", peer), getattr(peer, "port", "")),
            size=size,
        )

