"""
L{fauth.wire.connection.ClientConnection}, driven synchronously: the peer is a
L{StringTransport} (what was sent is C{transport.value()}), its answers are
C{dataReceived} calls and its closing is a C{connectionLost} call.

Every request streams its answer to a sink: L{Collect} keeps the whole
answer (as the auth leg's reader does), L{Sink} records each call it gets.
"""
from __future__ import annotations

from io import BytesIO
from typing import Any, List, NamedTuple, Optional, Tuple

import pytest
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import (
    ParseError,
    RequestNotSent,
    ResponseFailed,
    ResponseNeverReceived,
    _DataLoss,
)
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from fauth.wire.connection import ClientConnection, ClientRequest, FileUpload
from fauth.wire.h1 import MAX_RESPONSE_HEAD, ResponseHead, request_head
from fauth.wire.transport import describe_failure
from tests.harness import LogCapture, outcome

GET = request_head(b"GET", b"/resource", [(b"Host", b"upstream")])
OK_EMPTY = b"HTTP/1.1 204 No Content\r\n\r\n"


class Transport(StringTransport):
    """
    A L{StringTransport} that counts aborts and logs producer registrations
    itself, so the tests do not depend on which Twisted release has
    C{StringTransport.abortConnection} or what it records.
    """

    def __init__(self) -> None:
        super().__init__()
        self.aborts = 0
        self.registrations: List[Tuple[str, Any]] = []

    def abortConnection(self) -> None:
        self.aborts += 1
        self.loseConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.registrations.append(("register", (producer, streaming)))
        super().registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.registrations.append(("unregister", self.producer))
        super().unregisterProducer()


class PausingTransport(Transport):
    """Pauses its registered producer after every C{pause_after} bytes, as a full socket buffer would."""

    def __init__(self, pause_after: int) -> None:
        super().__init__()
        self.pause_after = pause_after
        self._since_pause = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None:
            self._since_pause += len(data)
            if self._since_pause >= self.pause_after:
                self._since_pause = 0
                self.producer.pauseProducing()


class Whole(NamedTuple):
    """A whole answer, as L{Collect.reply} gives it."""

    status: int
    headers: Any
    body: bytes


class Collect:
    """
    A sink that keeps the whole answer: C{body_start} returns the sink
    itself, so the request's Deferred fires with it once the head is in,
    and L{reply} is the answer once the body has ended.
    """

    def __init__(self) -> None:
        self.producer: Any = None
        self.head: Optional[ResponseHead] = None
        self.chunks: List[bytes] = []
        self.done: List[Optional[Failure]] = []

    def body_start(self, producer: Any, head: ResponseHead) -> "Collect":
        assert self.head is None, "body_start called twice"
        self.producer, self.head = producer, head
        return self

    def body_data(self, data: bytes) -> None:
        assert self.head is not None and not self.done, "body_data outside the body"
        self.chunks.append(data)

    def body_done(self, reason: Optional[Failure]) -> None:
        assert self.head is not None, "body_done before body_start"
        self.done.append(reason)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def reply(self) -> Whole:
        """The answer; only once its body ended, once, without a failure."""
        assert self.done == [None], self.done
        assert self.head is not None
        return Whole(self.head.status, self.head.headers, self.body)

    @property
    def failure(self) -> Failure:
        """How the body failed; only once it did, once."""
        (reason,) = self.done
        assert isinstance(reason, Failure), reason
        return reason


class Sink:
    """Records what a streamed answer's sink is told; C{body_start} returns L{started}."""

    def __init__(self) -> None:
        self.events: List[Tuple[str, Any]] = []
        self.heads: List[ResponseHead] = []
        self.started = object()

    def body_start(self, producer: Any, head: ResponseHead) -> object:
        self.events.append(("start", producer))
        self.heads.append(head)
        return self.started

    def body_data(self, data: bytes) -> None:
        self.events.append(("data", data))

    def body_done(self, reason: Optional[Failure]) -> None:
        self.events.append(("done", reason))

    @property
    def body(self) -> bytes:
        return b"".join(data for kind, data in self.events if kind == "data")

    @property
    def done(self) -> List[Optional[Failure]]:
        return [reason for kind, reason in self.events if kind == "done"]


def connect(transport: Optional[Transport] = None) -> Tuple[ClientConnection, Transport, List[ClientConnection]]:
    """A connected L{ClientConnection}, its transport, and the list its quiescent callback appends to."""
    pooled: List[ClientConnection] = []
    connection = ClientConnection(pooled.append)
    transport = transport if transport is not None else Transport()
    connection.makeConnection(transport)
    return connection, transport, pooled


def send(
    connection: ClientConnection,
    method: bytes = b"GET",
    head: bytes = GET,
    body: Optional[bytes] = None,
    upload: Optional[FileUpload] = None,
    persistent: bool = True,
) -> Tuple[Collect, List[Any]]:
    """Send a request whose answer a new L{Collect} keeps: that sink, and what the request's Deferred fired with."""
    sink = Collect()
    results = outcome(connection.request(ClientRequest(method, head, sink, body, upload, persistent)))
    return sink, results


def only(results: List[Any]) -> Any:
    assert len(results) == 1, results
    return results[0]


def reasons(failure: Failure) -> List[Failure]:
    return list(failure.value.reasons)


def lost(connection: ClientConnection, exception: Optional[Exception] = None) -> None:
    connection.connectionLost(Failure(exception if exception is not None else net_error.ConnectionDone()))


# -- sending


@pytest.mark.parametrize("body", [None, b"", b"small body", b"b" * (64 * 1024), b"B" * (200 * 1024 + 3)])
def test_head_and_body_written_as_given(body: Optional[bytes]) -> None:
    connection, transport, _ = connect()
    connection.request(ClientRequest(b"POST", GET, Collect(), body))
    assert transport.value() == GET + (body or b"")
    assert connection.state == "WAITING"
    assert not transport.disconnecting


def test_body_producer_is_what_the_pool_retry_looks_at() -> None:
    # Twisted's pool sends a failed request again only when its
    # bodyProducer is None: an empty body is still a body.
    assert ClientRequest(b"GET", GET, Collect()).bodyProducer is None
    assert ClientRequest(b"POST", GET, Collect(), b"").bodyProducer == b""
    assert ClientRequest(b"POST", GET, Collect(), b"data").bodyProducer == b"data"
    upload = FileUpload(BytesIO(b"x"), 1)
    assert ClientRequest(b"POST", GET, Collect(), upload=upload).bodyProducer is upload


def test_connection_made_disables_nagle_on_tcp() -> None:
    @implementer(ITCPTransport)
    class TCPTransport(Transport):
        nodelay: Optional[bool] = None

        def setTcpNoDelay(self, enabled: bool) -> None:
            self.nodelay = enabled

    transport = TCPTransport()
    connect(transport)
    assert transport.nodelay is True


# -- whole answers


def test_collect_content_length_in_pieces() -> None:
    connection, transport, pooled = connect()
    sink, results = send(connection)
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Answer: yes\r\nX-Answer: again\r\n\r\nhello world"
    head_size = wire.index(b"\r\n\r\n") + 4
    for index in range(len(wire) - 1):
        connection.dataReceived(wire[index : index + 1])
        # The Deferred fires with the sink as soon as the head is in; the
        # body has not ended, and the connection is not pooled, before the last byte.
        assert results == ([sink] if index + 1 >= head_size else []), index
        assert sink.done == [] and pooled == [], index
    connection.dataReceived(wire[-1:])
    reply = sink.reply
    assert (reply.status, reply.body) == (200, b"hello world")
    assert reply.headers.get(b"x-answer") == (b"yes", b"again")
    assert b"content-length" not in reply.headers
    assert sink.producer is connection
    assert pooled == [connection] and connection.state == "QUIESCENT"
    assert not transport.disconnecting


def test_collect_head_and_body_in_one_packet() -> None:
    connection, _, pooled = connect()
    sink, results = send(connection)
    connection.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    assert only(results) is sink
    assert (sink.reply.status, sink.reply.body) == (201, b"ok")
    assert pooled == [connection]


def test_collect_chunked() -> None:
    connection, transport, pooled = connect()
    sink, results = send(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
    connection.dataReceived(b"lo\r\n6\r\n world\r\n")
    assert only(results) is sink and sink.done == [] and pooled == []
    connection.dataReceived(b"0\r\nX-Trailer: t\r\n\r\n")
    reply = sink.reply
    assert (reply.status, reply.body) == (200, b"hello world")
    assert b"transfer-encoding" not in reply.headers
    assert pooled == [connection] and not transport.disconnecting


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK"])
def test_collect_body_until_close(status_line: bytes) -> None:
    connection, _, pooled = connect()
    sink, results = send(connection)
    connection.dataReceived(status_line + b"\r\nX-A: 1\r\n\r\nuntil ")
    connection.dataReceived(b"the end")
    assert only(results) is sink and sink.done == []
    lost(connection)
    reply = sink.reply
    assert (reply.status, reply.body, reply.headers.get(b"x-a")) == (200, b"until the end", (b"1",))
    assert pooled == [] and connection.state == "CONNECTION_LOST"


def test_no_body_answers_complete_at_once() -> None:
    for method, wire in [
        (b"GET", OK_EMPTY),
        (b"GET", b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n"),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"),
    ]:
        connection, _, pooled = connect()
        sink, results = send(connection, method)
        connection.dataReceived(wire)
        assert only(results) is sink, wire
        assert sink.reply.body == b"" and sink.chunks == [], wire
        assert pooled == [connection], wire


def test_head_answer_keeps_content_length() -> None:
    connection, _, _ = connect()
    sink, _ = send(connection, b"HEAD")
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    assert sink.reply.headers.get(b"content-length") == (b"1234",)


# -- reuse


def test_reused_connection_carries_a_second_request() -> None:
    connection, transport, pooled = connect()
    first, _ = send(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
    assert first.reply.body == b"first"
    assert pooled == [connection] and connection.state == "QUIESCENT"

    second_head = request_head(b"GET", b"/second", [])
    second, _ = send(connection, head=second_head)
    assert transport.value() == GET + second_head
    assert connection.state == "WAITING"
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nsecond\r\n0\r\n\r\n")
    assert second.reply.body == b"second"
    assert first.done == [None]  # the first sink hears nothing of the second answer
    assert pooled == [connection, connection]  # once per answer
    assert not transport.disconnecting


def test_pooled_before_the_sink_hears_of_the_end() -> None:
    # As with Twisted's HTTP11ClientProtocol: the caller's next request may use it.
    connection, _, pooled = connect()
    seen: List[Tuple[str, int]] = []

    class Watching(Collect):
        def body_done(self, reason: Optional[Failure]) -> None:
            seen.append((connection.state, len(pooled)))
            super().body_done(reason)

    sink = Watching()
    connection.request(ClientRequest(b"GET", GET, sink))
    connection.dataReceived(OK_EMPTY)
    assert seen == [("QUIESCENT", 1)]
    assert sink.reply.status == 204


def test_busy_until_the_body_ends() -> None:
    # The Deferred fires with the head: the connection still carries the body then.
    connection, transport, _ = connect()
    refused: List[List[Any]] = []

    def again(result: Any) -> None:
        refused.append(outcome(connection.request(ClientRequest(b"GET", b"NEXT\r\n\r\n", Collect()))))

    sink = Collect()
    connection.request(ClientRequest(b"GET", GET, sink)).addCallback(again)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\non")
    assert only(only(refused)).check(RequestNotSent)
    assert transport.value() == GET
    connection.dataReceived(b"e")
    assert sink.reply.body == b"one"


def test_next_request_from_body_done() -> None:
    connection, transport, _ = connect()
    second: List[Collect] = []

    class Again(Collect):
        def body_done(self, reason: Optional[Failure]) -> None:
            super().body_done(reason)
            sink, results = send(connection, head=b"NEXT\r\n\r\n")
            second.append(sink)
            # Nothing of the first exchange may leak into the second.
            connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
            assert only(results) is sink

    first = Again()
    connection.request(ClientRequest(b"GET", GET, first))
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
    assert first.reply.body == b"one"
    assert only(second).reply.body == b"two"
    assert transport.value() == GET + b"NEXT\r\n\r\n"


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ],
)
def test_answer_that_ends_the_connection_is_not_reused(wire: bytes) -> None:
    connection, transport, pooled = connect()
    sink, _ = send(connection)
    connection.dataReceived(wire)
    assert sink.reply.body == b"ok"
    assert pooled == []
    assert connection.state == "CLOSING"
    assert transport.disconnecting and transport.aborts == 0  # a clean close


def test_request_not_persistent_is_not_reused() -> None:
    connection, transport, pooled = connect()
    sink, _ = send(connection, persistent=False)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert sink.reply.body == b"ok"
    assert pooled == [] and transport.disconnecting


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nX",
        b"HTTP/1.1 204 No Content\r\n\r\nX",
    ],
)
def test_stray_bytes_after_an_answer_prevent_reuse(wire: bytes) -> None:
    connection, transport, pooled = connect()
    sink, _ = send(connection)
    with LogCapture() as logs:
        connection.dataReceived(wire)
    assert sink.reply.status in (200, 204)  # the answer itself is fine
    assert sink.reply.body in (b"ok", b"")
    assert logs.contains("192.168.1.1:54321 sent ")
    assert logs.contains("bytes after the end of a response; connection closed, not reused")
    assert pooled == []
    assert connection.state == "CLOSING" and transport.disconnecting


def test_stray_bytes_in_a_later_packet_close_the_pooled_connection() -> None:
    connection, transport, pooled = connect()
    send(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert pooled == [connection] and not transport.disconnecting
    connection.dataReceived(b"\r\n")
    assert connection.state == "CLOSING" and transport.disconnecting
    # The pool then finds it not QUIESCENT and does not hand it out.
    _, results = send(connection)
    assert only(results).check(RequestNotSent)


def test_data_while_idle_closes_the_connection() -> None:
    connection, transport, pooled = connect()
    with LogCapture() as logs:
        connection.dataReceived(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    assert logs.contains("sent 32 bytes after the end of a response")
    assert connection.state == "CLOSING"
    assert transport.disconnecting and transport.aborts == 0
    assert pooled == []
    connection.dataReceived(b"more")  # ignored once closing
    assert connection.state == "CLOSING"


def test_quiescent_callback_that_fails_closes_the_connection() -> None:
    def broken(connection: ClientConnection) -> None:
        raise RuntimeError("pool is gone")

    connection = ClientConnection(broken)
    transport = Transport()
    connection.makeConnection(transport)
    sink, _ = send(connection)
    with LogCapture() as logs:
        connection.dataReceived(OK_EMPTY)
    assert logs.contains("could not return a connection to the pool")
    assert sink.reply.status == 204  # the answer still gets through
    assert connection.state == "CLOSING" and transport.disconnecting


# -- interim answers


def test_interim_answers_are_skipped() -> None:
    connection, _, pooled = connect()
    sink, results = send(connection, b"POST", body=b"body")
    connection.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert results == [] and sink.head is None
    connection.dataReceived(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 20")
    assert results == [] and sink.head is None
    connection.dataReceived(b"0 OK\r\nContent-Length: 4\r\n\r\ndone")
    assert only(results) is sink
    reply = sink.reply
    assert (reply.status, reply.body) == (200, b"done")
    assert b"link" not in reply.headers  # the hints were the interim answer's
    assert pooled == [connection]


# -- failures


@pytest.mark.parametrize(
    "wire, message",
    [
        (b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", "bad response: header line without a colon b'Bad Header'"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "bad response: bad status line b'SSH-2.0-OpenSSH\\r'"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", "bad response: conflicting Content-Length b'1, 2'"),
        (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n", "bad response: control character in header value b'X'"),
    ],
)
def test_parse_error_in_the_head_fails_the_request(wire: bytes, message: str) -> None:
    connection, transport, pooled = connect()
    sink, results = send(connection)
    connection.dataReceived(wire)
    failure = only(results)
    assert isinstance(failure, Failure) and failure.check(ResponseFailed)
    assert not failure.check(ResponseNeverReceived)
    assert reasons(failure)[0].check(ParseError)
    assert describe_failure(failure) == message
    assert sink.head is None and sink.done == []  # the sink never heard of it
    assert transport.aborts == 1 and pooled == [] and connection.state == "CLOSING"
    # Whatever else comes, or the end, is not an answer to anything.
    connection.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
    lost(connection)
    assert len(results) == 1 and sink.head is None


@pytest.mark.parametrize(
    "wire, message",
    [
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX",
            "bad response: missing CRLF after a chunk b'X'",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad response: bad chunk size b'zz\\r'"),
    ],
)
def test_parse_error_in_the_body_fails_the_body(wire: bytes, message: str) -> None:
    connection, transport, pooled = connect()
    sink, results = send(connection)
    connection.dataReceived(wire)
    assert only(results) is sink  # the head was fine
    failure = sink.failure
    assert failure.check(ResponseFailed)
    assert reasons(failure)[0].check(ParseError)
    assert describe_failure(failure) == message
    assert transport.aborts == 1 and pooled == [] and connection.state == "CLOSING"
    connection.dataReceived(b"0\r\n\r\n")
    lost(connection)
    assert len(sink.done) == 1 and len(results) == 1


def test_head_too_large() -> None:
    connection, transport, _ = connect()
    _, results = send(connection)
    start = b"HTTP/1.1 200 OK\r\nX-Big: "
    connection.dataReceived(start + b"x" * (MAX_RESPONSE_HEAD - len(start)))
    assert results == []  # at the limit, not over it
    connection.dataReceived(b"x")
    assert describe_failure(only(results)) == "bad response: response head too large"
    assert transport.aborts == 1


def test_too_many_headers_before_the_end_of_a_large_head() -> None:
    connection, _, _ = connect()
    _, results = send(connection)
    # Over the size limit with its end not in sight: the message says why.
    connection.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 600 + b"X-Big: " + b"x" * MAX_RESPONSE_HEAD)
    assert describe_failure(only(results)) == "bad response: too many headers"


def test_too_many_headers_in_a_small_head() -> None:
    connection, _, _ = connect()
    _, results = send(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 501 + b"\r\n")
    assert describe_failure(only(results)) == "bad response: too many headers"


@pytest.mark.parametrize("exception", [net_error.ConnectionDone(), net_error.ConnectionLost()])
def test_lost_before_any_byte(exception: Exception) -> None:
    connection, _, pooled = connect()
    sink, results = send(connection)
    lost(connection, exception)
    failure = only(results)
    assert failure.check(ResponseNeverReceived)  # what the pool retries an idempotent request on
    assert reasons(failure)[0].value is exception
    assert describe_failure(failure) == "closed"
    assert sink.head is None and sink.done == []
    assert connection.state == "CONNECTION_LOST" and pooled == []


def test_lost_mid_head() -> None:
    connection, _, _ = connect()
    sink, results = send(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Le")
    lost(connection)
    failure = only(results)
    assert failure.check(ResponseFailed) and not failure.check(ResponseNeverReceived)
    assert describe_failure(failure) == "closed"
    assert sink.head is None and sink.done == []


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",  # trailers not ended
    ],
)
def test_lost_mid_body(wire: bytes) -> None:
    connection, _, pooled = connect()
    sink, results = send(connection)
    connection.dataReceived(wire)
    assert only(results) is sink and sink.done == []
    lost(connection)
    failure = sink.failure
    assert failure.check(ResponseFailed)
    assert reasons(failure)[0].check(_DataLoss)  # a short body is never a whole answer
    assert describe_failure(failure) == "closed"
    assert len(results) == 1 and pooled == []


def test_cancel_before_the_head() -> None:
    connection, transport, pooled = connect()
    sink = Collect()
    d = connection.request(ClientRequest(b"GET", GET, sink))
    results = outcome(d)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\n")
    d.cancel()
    assert only(results).check(CancelledError)
    assert transport.aborts == 1
    assert connection.state == "CLOSING"
    # The rest of the answer, and the end, change nothing.
    connection.dataReceived(b"Content-Length: 0\r\n\r\n")
    lost(connection)
    assert len(results) == 1 and pooled == []
    assert sink.head is None and sink.done == []


def test_cancel_after_the_head_is_too_late() -> None:
    # The Deferred has fired: stopping the body is the producer's
    # stopProducing (see the streamed tests), not a cancel.
    connection, transport, pooled = connect()
    sink = Collect()
    d = connection.request(ClientRequest(b"GET", GET, sink))
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhalf")
    d.cancel()
    assert transport.aborts == 0 and connection.state == "WAITING"
    connection.dataReceived(b"the rest")
    assert sink.reply.body == b"halfthe rest"
    assert pooled == [connection]


def test_request_while_busy_is_not_sent() -> None:
    connection, transport, _ = connect()
    first, _ = send(connection)
    second, refused = send(connection, head=b"SECOND\r\n\r\n")
    assert only(refused).check(RequestNotSent)
    assert transport.value() == GET
    connection.dataReceived(OK_EMPTY)  # the first is unaffected
    assert first.reply.status == 204
    assert second.head is None and second.done == []


@pytest.mark.parametrize("how", ["closing", "lost"])
def test_request_on_a_closed_connection_is_not_sent(how: str) -> None:
    connection, transport, _ = connect()
    if how == "closing":
        connection.abort()
    else:
        lost(connection)
    _, results = send(connection)
    assert only(results).check(RequestNotSent)
    assert transport.value() == b""


# -- streamed answers


def test_stream_body_to_a_sink() -> None:
    connection, transport, pooled = connect()
    sink = Sink()
    fired: List[Any] = []

    def got_head(result: Any) -> None:
        # The sink knows its producer before the caller hears of the head.
        fired.append((result, list(sink.events)))

    connection.request(ClientRequest(b"GET", GET, sink)).addCallback(got_head)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-A: 1\r\n\r\nfirst")
    ((result, events_then),) = fired
    assert result is sink.started  # what body_start returned
    assert events_then == [("start", connection)]
    head = only(sink.heads)
    assert (head.status, head.reason, head.length, head.headers.get(b"x-a")) == (200, b"OK", 11, (b"1",))
    assert sink.events == [("start", connection), ("data", b"first")]
    connection.dataReceived(b"secon")
    assert sink.events[-1] == ("data", b"secon") and sink.done == []
    connection.dataReceived(b"d")
    assert sink.events[2:] == [("data", b"secon"), ("data", b"d"), ("done", None)]
    assert sink.body == b"firstsecond"
    assert pooled == [connection] and not transport.disconnecting


def test_stream_chunked() -> None:
    connection, _, pooled = connect()
    sink = Sink()
    results = outcome(connection.request(ClientRequest(b"GET", GET, sink)))
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    assert only(results) is sink.started
    assert only(sink.heads).length is UNKNOWN_LENGTH and only(sink.heads).chunked
    connection.dataReceived(b"2\r\nde\r\n0\r\n\r\n")
    assert sink.body == b"abcde" and sink.done == [None]
    assert pooled == [connection]


def test_stream_body_until_close() -> None:
    connection, _, pooled = connect()
    sink = Sink()
    connection.request(ClientRequest(b"GET", GET, sink))
    connection.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nall of it")
    assert sink.done == []
    lost(connection)
    assert sink.body == b"all of it" and sink.done == [None]
    assert pooled == []


def test_stream_no_body() -> None:
    connection, _, pooled = connect()
    sink = Sink()
    results = outcome(connection.request(ClientRequest(b"HEAD", GET, sink)))
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert only(results) is sink.started
    assert only(sink.heads).headers.get(b"content-length") == (b"5",)
    assert sink.events == [("start", connection), ("done", None)]
    assert pooled == [connection]


def test_stream_lost_before_the_head() -> None:
    connection, _, _ = connect()
    sink = Sink()
    results = outcome(connection.request(ClientRequest(b"GET", GET, sink)))
    lost(connection)
    assert only(results).check(ResponseNeverReceived)
    assert sink.events == []  # the sink only hears of a body that started


def test_stream_lost_mid_body() -> None:
    connection, _, _ = connect()
    sink = Sink()
    results = outcome(connection.request(ClientRequest(b"GET", GET, sink)))
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    lost(connection)
    assert only(results) is sink.started
    assert only(sink.heads).status == 200
    (reason,) = sink.done
    assert isinstance(reason, Failure) and reason.check(ResponseFailed)
    assert describe_failure(reason) == "closed"


def test_stream_parse_error_mid_body() -> None:
    connection, transport, _ = connect()
    sink = Sink()
    connection.request(ClientRequest(b"GET", GET, sink))
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
    connection.dataReceived(b"nope\r\n")
    (reason,) = sink.done
    assert sink.body == b"ok"
    assert isinstance(reason, Failure)
    assert describe_failure(reason) == "bad response: bad chunk size b'nope\\r'"
    assert transport.aborts == 1


def test_stream_stop_producing_mid_body() -> None:
    connection, transport, pooled = connect()
    sink = Sink()
    connection.request(ClientRequest(b"GET", GET, sink))
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    connection.stopProducing()
    (reason,) = sink.done
    assert isinstance(reason, Failure) and reason.check(ResponseFailed)
    assert reason.value.reasons[0].check(net_error.ConnectionAborted)
    assert describe_failure(reason) == "closed"
    assert transport.aborts == 1 and connection.state == "CLOSING"
    # The rest and the end are not delivered, and the sink is told only once.
    connection.dataReceived(b"the rest")
    lost(connection)
    assert sink.body == b"half" and len(sink.done) == 1
    assert pooled == []
    connection.stopProducing()  # nothing left to stop
    assert transport.aborts == 1


def test_stream_stop_producing_from_the_head_callback() -> None:
    # The caller may decide on the head alone (its client went away, say):
    # body bytes from the same packet must not reach the sink then.
    connection, transport, pooled = connect()
    sink = Sink()
    d = connection.request(ClientRequest(b"GET", GET, sink))
    d.addCallback(lambda result: connection.stopProducing())
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody")
    assert [kind for kind, _ in sink.events] == ["start", "done"]
    assert sink.done[0] is not None
    assert transport.aborts == 1 and pooled == []


def test_stream_stop_producing_from_body_start() -> None:
    # A sink may refuse on the head alone (a length over its cap, say): it is
    # told of the stop itself, and the Deferred still fires with its result.
    connection, transport, pooled = connect()
    sink = Sink()
    start = sink.body_start

    def body_start(producer: Any, head: ResponseHead) -> Any:
        result = start(producer, head)
        connection.stopProducing()
        return result

    sink.body_start = body_start  # type: ignore[method-assign]
    results = outcome(connection.request(ClientRequest(b"GET", GET, sink)))
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody")
    assert only(results) is sink.started
    assert [kind for kind, _ in sink.events] == ["start", "done"]
    assert sink.done[0] is not None and sink.done[0].check(ResponseFailed)
    assert transport.aborts == 1 and pooled == []


def test_stream_stop_producing_from_body_data() -> None:
    connection, transport, pooled = connect()
    sink = Sink()

    def body_data(data: bytes) -> None:
        sink.events.append(("data", data))
        connection.stopProducing()

    sink.body_data = body_data  # type: ignore[method-assign]
    connection.request(ClientRequest(b"GET", GET, sink))
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n1\r\nb\r\n0\r\n\r\n")
    assert sink.body == b"a"
    assert len(sink.done) == 1 and sink.done[0] is not None
    assert transport.aborts == 1 and pooled == []


def test_pause_and_resume_reach_the_transport() -> None:
    connection, transport, pooled = connect()
    sink = Sink()
    connection.request(ClientRequest(b"GET", GET, sink))
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nab")
    connection.pauseProducing()
    assert transport.producerState == "paused"
    connection.pauseProducing()  # idempotent: StringTransport would not mind, a real one counts
    assert transport.producerState == "paused"
    connection.resumeProducing()
    assert transport.producerState == "producing"
    connection.pauseProducing()
    # Bytes already read still arrive; the whole answer resumes the transport
    # before the connection goes back to the pool.
    connection.dataReceived(b"cdef")
    assert sink.done == [None]
    assert transport.producerState == "producing"
    assert pooled == [connection]


def test_pause_and_resume_while_idle_do_nothing() -> None:
    connection, transport, _ = connect()
    connection.pauseProducing()
    assert transport.producerState == "producing"
    transport.pauseProducing()
    connection.resumeProducing()
    assert transport.producerState == "paused"


# -- uploads


def test_upload_writes_every_byte_and_unregisters() -> None:
    connection, transport, pooled = connect()
    data = bytes(range(256)) * 1000 + b"tail"  # several 64 KiB reads
    upload = FileUpload(BytesIO(data), len(data))
    sink, _ = send(connection, b"PUT", upload=upload)
    assert transport.value() == GET + data
    assert transport.registrations == [("register", (upload, True)), ("unregister", upload)]
    assert transport.producer is None and upload.done
    connection.dataReceived(OK_EMPTY)
    assert sink.reply.status == 204
    assert pooled == [connection] and transport.aborts == 0


def test_upload_reads_no_more_than_its_length() -> None:
    connection, transport, _ = connect()
    upload = FileUpload(BytesIO(b"0123456789"), 4)
    send(connection, b"PUT", upload=upload)
    assert transport.value() == GET + b"0123"


def test_upload_with_backpressure() -> None:
    connection, transport, pooled = connect(PausingTransport(pause_after=64 * 1024))
    data = b"u" * (150 * 1024)
    upload = FileUpload(BytesIO(data), len(data))
    send(connection, b"PUT", upload=upload)
    assert transport.value() == GET + data[: 64 * 1024]
    assert transport.producer is upload and not upload.done
    upload.resumeProducing()
    assert transport.value() == GET + data[: 128 * 1024]
    upload.resumeProducing()
    assert transport.value() == GET + data
    assert upload.done and transport.producer is None
    upload.resumeProducing()  # a late resume writes nothing more
    assert transport.value() == GET + data


def test_upload_shorter_than_its_length_fails_the_request() -> None:
    connection, transport, pooled = connect()
    upload = FileUpload(BytesIO(b"x" * 100), 1000)
    sink, results = send(connection, b"PUT", upload=upload)
    failure = only(results)
    assert failure.check(ResponseNeverReceived)
    assert reasons(failure)[0].check(_DataLoss)
    assert transport.value() == GET + b"x" * 100
    assert transport.aborts == 1 and transport.producer is None
    assert connection.state == "CLOSING" and pooled == []
    lost(connection)
    assert len(results) == 1
    assert sink.head is None and sink.done == []


def test_upload_read_error_fails_the_request() -> None:
    class Broken(BytesIO):
        def read(self, size: Optional[int] = -1) -> bytes:
            raise OSError("disk gone")

    connection, transport, _ = connect()
    _, results = send(connection, b"PUT", upload=FileUpload(Broken(), 10))
    failure = only(results)
    assert reasons(failure)[0].check(OSError)
    assert transport.aborts == 1 and transport.producer is None


def test_early_answer_stops_a_paused_upload() -> None:
    # An upstream refusing an upload answers before the whole body went out.
    connection, transport, pooled = connect(PausingTransport(pause_after=64 * 1024))
    data = b"u" * (200 * 1024)
    upload = FileUpload(BytesIO(data), len(data))
    sink, _ = send(connection, b"PUT", upload=upload)
    assert not upload.done and transport.producer is upload
    connection.dataReceived(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
    assert sink.reply.status == 413
    assert upload.done and transport.producer is None
    assert transport.aborts == 1 and connection.state == "CLOSING"
    assert pooled == []
    sent = transport.value()
    upload.resumeProducing()  # the transport would not, but nothing more is written if it did
    assert transport.value() == sent == GET + data[: 64 * 1024]


def test_early_answer_streamed() -> None:
    connection, transport, pooled = connect(PausingTransport(pause_after=64 * 1024))
    data = b"u" * (200 * 1024)
    upload = FileUpload(BytesIO(data), len(data))
    sink = Sink()
    connection.request(ClientRequest(b"PUT", GET, sink, upload=upload))
    connection.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
    assert sink.body == b"no" and sink.done == [None]
    assert upload.done and transport.producer is None and transport.aborts == 1
    assert pooled == []


def test_lost_mid_upload_stops_it() -> None:
    connection, transport, _ = connect(PausingTransport(pause_after=64 * 1024))
    data = b"u" * (200 * 1024)
    upload = FileUpload(BytesIO(data), len(data))
    _, results = send(connection, b"PUT", upload=upload)
    lost(connection, net_error.ConnectionLost())
    assert upload.done and transport.producer is None
    assert describe_failure(only(results)) == "closed"


def test_cancel_mid_upload_stops_it() -> None:
    connection, transport, _ = connect(PausingTransport(pause_after=64 * 1024))
    data = b"u" * (200 * 1024)
    upload = FileUpload(BytesIO(data), len(data))
    d = connection.request(ClientRequest(b"PUT", GET, Collect(), upload=upload))
    results = outcome(d)
    d.cancel()
    assert only(results).check(CancelledError)
    assert upload.done and transport.producer is None and transport.aborts == 1


# -- closing, for the pool


def test_abort_fires_when_the_connection_is_lost() -> None:
    connection, transport, _ = connect()
    closed = outcome(connection.abort())
    also = outcome(connection.abort())
    assert transport.disconnecting and connection.state == "CLOSING"
    assert closed == [] and also == []
    lost(connection)
    assert closed == [None] and also == [None]
    assert connection.state == "CONNECTION_LOST"
    assert only(outcome(connection.abort())) is None  # already closed: at once


def test_abort_during_a_request_fails_it() -> None:
    connection, _, _ = connect()
    _, results = send(connection)
    closed = outcome(connection.abort())
    assert results == []
    lost(connection)
    assert closed == [None]
    assert describe_failure(only(results)) == "closed"


def test_when_closed_waits_for_the_end_without_closing() -> None:
    connection, transport, pooled = connect()
    first = outcome(connection.when_closed())
    second = outcome(connection.when_closed())
    assert first == [] and second == []
    assert not transport.disconnecting and connection.state == "QUIESCENT"
    # The connection still carries a request meanwhile.
    sink, _ = send(connection)
    connection.dataReceived(OK_EMPTY)
    assert sink.reply.status == 204 and pooled == [connection]
    assert first == [] and second == []
    lost(connection)
    assert first == [None] and second == [None]
    assert only(outcome(connection.when_closed())) is None  # already closed: at once


def test_when_closed_after_stop_producing() -> None:
    # What a sink stopping a body waits on: the connection aborted, then gone.
    connection, transport, _ = connect()
    sink = Sink()
    connection.request(ClientRequest(b"GET", GET, sink))
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    connection.stopProducing()
    closed = outcome(connection.when_closed())
    assert transport.aborts == 1 and closed == []
    lost(connection, net_error.ConnectionAborted())
    assert closed == [None]
    assert len(sink.done) == 1  # the loss is not news to the sink


def test_a_caller_reusing_the_connection_at_once_gets_its_own_answer() -> None:
    # The pool may hand the connection out again from inside the quiescent
    # callback: the first sink must still be told of its own end, and the
    # second answer go to the second sink only.
    sinks: List[Collect] = []

    def reuse(connection: ClientConnection) -> None:
        if len(sinks) < 2:
            sinks.append(send(connection)[0])

    connection = ClientConnection(reuse)
    connection.makeConnection(Transport())
    sinks.append(send(connection)[0])
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
    first, second = sinks
    assert first.reply.body == b"first"
    assert second.head is None and connection.state == "WAITING"
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
    assert first.reply.body == b"first"
    assert second.reply.body == b"second"
