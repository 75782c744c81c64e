"""
L{fauth.wire.agent}, driven synchronously: no sockets, no reactor.

The agent's connector is given an in-memory endpoint (L{MemoryEndpoint}):
each connection it opens is the pool's own protocol (fauth's
L{ClientConnection} on a L{StrictConnectionPool}, Twisted's
C{HTTP11ClientProtocol} on a plain L{HTTPConnectionPool}) on a
L{StringTransport}.  What the agent sent is C{transport.value()}; the
server's answer is a C{dataReceived} call on that protocol, and the
connection closing a C{connectionLost} call.
"""
from __future__ import annotations

import gzip
from io import BytesIO
from typing import Any, List, Optional, Tuple

import pytest
import treq
import twisted
from hyperlink import EncodedURL
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol, ResponseFailed
from twisted.web.client import FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers

from fauth.wire.agent import (
    BytesBody,
    NoCookies,
    PoolAgent,
    PreEncodedURL,
    PreparedHeaders,
    StrictResponse,
    _PlainResponse,
    as_sent,
)
from fauth.wire.connection import ClientConnection
from fauth.wire.h1 import ReplyHeaders
from fauth.wire.pool import StrictConnectionPool
from fauth.wire.transport import tls_policy
from tests.harness import outcome

KEY = (b"http", b"127.0.0.1", 9999)
URL = b"http://127.0.0.1:9999/verify?a=1"
WIRE = ((b"Host", b"auth.test"), (b"X-Forwarded-Uri", b"/x"), (b"x-lower", b"v"), (b"X-Dup", b"1"), (b"X-Dup", b"2"))
WIRE_BYTES = b"Host: auth.test\r\nX-Forwarded-Uri: /x\r\nx-lower: v\r\nX-Dup: 1\r\nX-Dup: 2\r\n"
UNCLAIMED = 64 * 1024


class MemoryEndpoint:
    """Opens connections in memory: the factory's protocol on a L{StringTransport}."""

    def __init__(self) -> None:
        self.connections: List[Any] = []

    def connect(self, factory: Any) -> Deferred:
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.connections.append(protocol)
        return succeed(protocol)


class Setup:
    """A L{PoolAgent} over C{pool}, whose connections to L{KEY} are in memory."""

    def __init__(self, pool: Optional[HTTPConnectionPool] = None, clock: Optional[Clock] = None) -> None:
        self.clock = clock or Clock()
        self.pool = pool if pool is not None else StrictConnectionPool(self.clock)
        self.agent = PoolAgent(self.clock, self.pool, tls_policy(True), 3.0)
        self.endpoint = MemoryEndpoint()
        self.agent._connector._endpoints[KEY] = self.endpoint

    @property
    def connection(self) -> Any:
        """The one connection opened so far."""
        (connection,) = self.endpoint.connections
        return connection

    def sent(self) -> bytes:
        return self.connection.transport.value()

    def request(self, method: bytes = b"GET", uri: bytes = URL, headers: Any = None, body: Any = None) -> List[Any]:
        return outcome(self.agent.request(method, uri, headers, body))

    def treq(self, jar: Optional[IndexableCookieJar] = None) -> HTTPClient:
        """treq's client as L{fauth.auth.client} builds it, over this agent."""
        jar = jar if jar is not None else NoCookies()
        return HTTPClient(self.agent, cookiejar=jar, data_to_body_producer=BytesBody)


def treq_call(http: HTTPClient, clock: Clock, url: Any, **kwargs: Any) -> List[Any]:
    """One call with the options L{fauth.auth.client.AuthClient.call} uses."""
    kwargs.setdefault("cookies", http._cookiejar)
    return outcome(
        http.request(kwargs.pop("method", "GET"), url, allow_redirects=False, unbuffered=True, reactor=clock, **kwargs)
    )


class Body(Protocol):
    """Records what a response body protocol is told, in order."""

    def __init__(self) -> None:
        self.events: List[Tuple[str, Any]] = []

    def connectionMade(self) -> None:
        self.events.append(("made", self.transport))

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("data", data))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.events.append(("lost", reason))

    @property
    def data(self) -> bytes:
        return b"".join(value for kind, value in self.events if kind == "data")

    @property
    def lost(self) -> List[Failure]:
        return [value for kind, value in self.events if kind == "lost"]


class Quitter(Body):
    """Gives up on the body at its first piece, as treq's C{_BodyCollector} does when its collector raises."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.transport.loseConnection()
        self.events.append(("gave up", None))


def aborted(failure: Failure) -> bool:
    """A stopped body's end: C{ResponseFailed([ConnectionAborted])}."""
    return failure.check(ResponseFailed) is not None and any(
        inner.check(net_error.ConnectionAborted) for inner in failure.value.reasons
    )


def strict_response(setup: Setup, answer: bytes, uri: bytes = URL) -> StrictResponse:
    """Send a GET for C{uri} and answer it with C{answer}; the agent's result."""
    result = setup.request(uri=uri, headers=PreparedHeaders(((b"Host", b"auth.test"),)))
    setup.connection.dataReceived(answer)
    (response,) = result
    assert isinstance(response, StrictResponse)
    return response


def idle(pool: HTTPConnectionPool) -> List[Any]:
    """The connections pooled for L{KEY}."""
    return list(pool._connections.get(KEY, []))


# -- requests on a strict pool


def test_prepared_headers_go_out_exactly_as_given_and_nothing_else() -> None:
    setup = Setup()
    headers = PreparedHeaders(WIRE)
    # What treq's ContentDecoderAgent and CookieAgent add goes into the Headers, not on the wire.
    headers.addRawHeader(b"Accept-Encoding", b"gzip")
    headers.addRawHeader(b"Cookie", b"a=b")
    result = setup.request(headers=headers)
    assert setup.sent() == b"GET /verify?a=1 HTTP/1.1\r\n" + WIRE_BYTES + b"\r\n"
    assert isinstance(setup.connection, ClientConnection)
    assert result == []  # no answer yet


def test_a_bytes_body_is_framed_by_its_content_length() -> None:
    setup = Setup()
    setup.request(b"POST", headers=PreparedHeaders(WIRE), body=BytesBody(b"hello"))
    assert setup.sent() == b"POST /verify?a=1 HTTP/1.1\r\nContent-Length: 5\r\n" + WIRE_BYTES + b"\r\nhello"


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"PATCH"])
def test_a_body_method_without_a_body_says_content_length_0(method: bytes) -> None:
    setup = Setup()
    setup.request(method, headers=PreparedHeaders(WIRE))
    assert setup.sent() == method + b" /verify?a=1 HTTP/1.1\r\nContent-Length: 0\r\n" + WIRE_BYTES + b"\r\n"


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"DELETE", b"OPTIONS"])
def test_other_methods_without_a_body_have_no_content_length(method: bytes) -> None:
    setup = Setup()
    setup.request(method, headers=PreparedHeaders(WIRE))
    assert setup.sent() == method + b" /verify?a=1 HTTP/1.1\r\n" + WIRE_BYTES + b"\r\n"


def test_an_empty_bytes_body_still_says_content_length_0() -> None:
    setup = Setup()
    setup.request(b"GET", headers=PreparedHeaders(WIRE), body=BytesBody(b""))
    assert setup.sent() == b"GET /verify?a=1 HTTP/1.1\r\nContent-Length: 0\r\n" + WIRE_BYTES + b"\r\n"


def test_a_non_persistent_pool_says_connection_close_and_keeps_nothing() -> None:
    clock = Clock()
    setup = Setup(StrictConnectionPool(clock, persistent=False), clock)
    result = setup.request(b"POST", headers=PreparedHeaders(WIRE), body=BytesBody(b"x"))
    assert setup.sent() == (
        b"POST /verify?a=1 HTTP/1.1\r\nConnection: close\r\nContent-Length: 1\r\n" + WIRE_BYTES + b"\r\nx"
    )
    setup.connection.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert result[0].code == 204
    assert setup.connection.transport.disconnecting
    assert idle(setup.pool) == []


def test_a_persistent_pool_keeps_the_connection_and_reuses_it() -> None:
    setup = Setup()
    first = setup.request(headers=PreparedHeaders(WIRE))
    assert b"Connection:" not in setup.sent()
    setup.connection.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert first[0].code == 204
    assert idle(setup.pool) == [setup.connection]
    setup.connection.transport.clear()
    second = setup.request(b"DELETE", headers=PreparedHeaders(WIRE))
    assert setup.sent() == b"DELETE /verify?a=1 HTTP/1.1\r\n" + WIRE_BYTES + b"\r\n"  # same connection
    setup.connection.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert second[0].code == 204


def test_plain_headers_get_a_host_from_the_url_when_they_have_none() -> None:
    setup = Setup()
    setup.request(headers=Headers({b"X-A": [b"1", b"2"]}))
    assert setup.sent() == b"GET /verify?a=1 HTTP/1.1\r\nHost: 127.0.0.1:9999\r\nX-A: 1\r\nX-A: 2\r\n\r\n"


def test_no_headers_at_all_get_a_host_from_the_url() -> None:
    setup = Setup()
    setup.request(headers=None)
    assert setup.sent() == b"GET /verify?a=1 HTTP/1.1\r\nHost: 127.0.0.1:9999\r\n\r\n"


def test_plain_headers_keep_their_own_host() -> None:
    setup = Setup()
    setup.request(headers=Headers({b"host": [b"other.test"], b"X-A": [b"1"]}))
    assert setup.sent() == b"GET /verify?a=1 HTTP/1.1\r\nHost: other.test\r\nX-A: 1\r\n\r\n"


def test_an_ipv6_literal_connects_without_brackets_and_keeps_them_in_host() -> None:
    setup = Setup()
    endpoint = MemoryEndpoint()
    setup.agent._connector._endpoints[(b"http", b"::1", 9999)] = endpoint
    setup.request(uri=b"http://[::1]:9999/v")
    (connection,) = endpoint.connections
    assert connection.transport.value() == b"GET /v HTTP/1.1\r\nHost: [::1]:9999\r\n\r\n"
    assert setup.endpoint.connections == []


def test_a_producer_other_than_bytes_body_is_a_type_error_on_a_strict_pool() -> None:
    setup = Setup()
    result = setup.request(b"POST", headers=PreparedHeaders(WIRE), body=FileBodyProducer(BytesIO(b"x")))
    assert len(result) == 1 and isinstance(result[0], Failure)
    assert result[0].check(TypeError)
    assert setup.endpoint.connections == []  # nothing connected, nothing sent


@pytest.mark.parametrize(
    "uri",
    [
        b"ftp://127.0.0.1:9999/x",
        b"http:///x",
        b"/relative/only",
        b"http://b\xc3\xbccher.test/",  # not encoded: the endpoint's host must be ASCII
    ],
)
def test_a_bad_url_fails_the_deferred_with_value_error(uri: bytes) -> None:
    setup = Setup()
    result = setup.request(uri=uri)
    assert len(result) == 1 and isinstance(result[0], Failure)
    assert result[0].check(ValueError)
    assert setup.agent._targets == {}  # nothing cached
    assert setup.endpoint.connections == []


def test_the_url_parse_is_cached_per_uri() -> None:
    setup = Setup()
    setup.request(headers=PreparedHeaders(WIRE))
    target = setup.agent._targets[URL]
    assert (target.key, target.target, target.host) == (KEY, b"/verify?a=1", b"127.0.0.1:9999")
    assert target.endpoint is setup.endpoint
    setup.request(headers=PreparedHeaders(WIRE))
    assert setup.agent._targets[URL] is target
    other = b"http://127.0.0.1:9999/other"
    setup.request(uri=other)
    assert setup.agent._targets[other] is not target
    assert setup.agent._targets[other].target == b"/other"
    assert setup.agent._targets[URL] is target
    # Each request went out (the first two connections are still busy).
    assert [c.transport.value().split(b"\r\n")[0] for c in setup.endpoint.connections] == [
        b"GET /verify?a=1 HTTP/1.1",
        b"GET /verify?a=1 HTTP/1.1",
        b"GET /other HTTP/1.1",
    ]


def test_the_url_cache_is_bounded_by_max_targets() -> None:
    setup = Setup()
    setup.agent.max_targets = 3
    uris = [b"http://127.0.0.1:9999/p%d" % i for i in range(10)]
    for uri in uris:
        setup.request(uri=uri)
        assert len(setup.agent._targets) <= 3
        assert uri in setup.agent._targets
    assert len(setup.endpoint.connections) == 10
    assert setup.endpoint.connections[-1].transport.value().startswith(b"GET /p9 HTTP/1.1\r\n")


# -- StrictResponse through the agent


def test_the_deferred_fires_with_the_response_once_the_head_is_in() -> None:
    setup = Setup()
    result = setup.request(headers=PreparedHeaders(WIRE))
    setup.connection.dataReceived(b"HTTP/1.1 403 Nope\r\nContent-Length: 5\r\nX-Y: z\r\n")
    assert result == []  # half a head
    setup.connection.dataReceived(b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n")
    (response,) = result
    assert isinstance(response, StrictResponse)
    assert (response.code, response.phrase, response.length) == (403, b"Nope", 5)
    assert response.version == (b"HTTP", 1, 1)
    assert type(response.headers) is Headers
    assert response.headers.getRawHeaders(b"x-y") == [b"z"]
    assert response.headers.getRawHeaders(b"set-cookie") == [b"a=1", b"b=2"]
    assert isinstance(response.sent_headers, ReplyHeaders)
    assert response.sent_headers.get(b"X-Y") == (b"z",)
    assert response.sent_headers.get(b"set-cookie") == (b"a=1", b"b=2")
    assert (response.request.method, response.request.absoluteURI) == (b"GET", URL)
    assert as_sent(response) is response
    # The two are separate: a wrapper changing one leaves the other as sent.
    response.headers.removeHeader(b"x-y")
    response.headers.addRawHeader(b"set-cookie", b"c=3")
    assert response.sent_headers.get(b"x-y") == (b"z",)
    assert response.sent_headers.get(b"set-cookie") == (b"a=1", b"b=2")


def test_body_arriving_before_deliver_body_is_kept_and_delivered_in_order() -> None:
    setup = Setup()
    response = strict_response(setup, b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nab")
    setup.connection.dataReceived(b"cd")
    body = Body()
    response.deliverBody(body)
    assert body.events == [("made", response), ("data", b"ab"), ("data", b"cd")]
    setup.connection.dataReceived(b"ef")
    assert body.data == b"abcdef"
    assert len(body.lost) == 1 and body.lost[0].check(ResponseDone)
    assert body.events[-1][0] == "lost"
    assert idle(setup.pool) == [setup.connection]


def test_more_than_64k_unclaimed_pauses_the_connection_until_deliver_body() -> None:
    setup = Setup()
    total = UNCLAIMED + 1000
    response = strict_response(setup, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
    transport = setup.connection.transport
    setup.connection.dataReceived(b"a" * UNCLAIMED)
    assert transport.producerState == "producing"  # exactly 64 KiB is still fine
    setup.connection.dataReceived(b"b")
    assert transport.producerState == "paused"
    setup.connection.dataReceived(b"c" * 10)  # already in flight
    assert transport.producerState == "paused"
    body = Body()
    response.deliverBody(body)
    assert transport.producerState == "producing"
    assert body.data == b"a" * UNCLAIMED + b"b" + b"c" * 10
    assert body.lost == []
    setup.connection.dataReceived(b"d" * (total - UNCLAIMED - 11))
    assert len(body.data) == total
    assert len(body.lost) == 1 and body.lost[0].check(ResponseDone)
    assert idle(setup.pool) == [setup.connection]


def test_deliver_body_after_the_whole_body_is_in_gets_everything_then_the_end() -> None:
    setup = Setup()
    response = strict_response(setup, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")
    setup.connection.dataReceived(b"lo")
    assert idle(setup.pool) == [setup.connection]  # pooled before anyone read the body
    body = Body()
    response.deliverBody(body)
    assert [kind for kind, _ in body.events] == ["made", "data", "data", "lost"]
    assert body.data == b"hello"
    assert body.lost[0].check(ResponseDone)


def test_deliver_body_of_an_empty_answer_is_just_the_end() -> None:
    setup = Setup()
    response = strict_response(setup, b"HTTP/1.1 204 No Content\r\n\r\n")
    body = Body()
    response.deliverBody(body)
    assert [kind for kind, _ in body.events] == ["made", "lost"]
    assert body.lost[0].check(ResponseDone)


def test_a_body_cut_short_ends_in_failure() -> None:
    setup = Setup()
    response = strict_response(setup, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
    body = Body()
    response.deliverBody(body)
    setup.connection.connectionLost(Failure(net_error.ConnectionLost()))
    assert body.data == b"he"
    assert len(body.lost) == 1 and body.lost[0].check(ResponseFailed)
    assert idle(setup.pool) == []


@pytest.mark.parametrize(
    "how",
    ["stop", "loseConnection", "stopProducing", "abortConnection"],
)
def test_stopping_aborts_and_the_body_hears_of_it_when_the_connection_closes(how: str) -> None:
    setup = Setup()
    response = strict_response(setup, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
    body = Body()
    response.deliverBody(body)
    if how == "stop":
        response.stop()
    else:
        getattr(body.transport, how)()
    transport = setup.connection.transport
    assert transport.disconnecting
    assert body.lost == []  # not from inside the call
    response.stop()  # again: nothing more
    setup.connection.dataReceived(b"cdefghij")  # the rest, already in flight
    assert body.data == b"ab"
    assert body.lost == []
    setup.connection.connectionLost(Failure(net_error.ConnectionAborted()))
    assert len(body.lost) == 1 and aborted(body.lost[0])
    assert body.data == b"ab"
    assert setup.pool._connections == {}


def test_stopping_before_deliver_body_aborts_and_delivers_no_body() -> None:
    setup = Setup()
    response = strict_response(setup, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
    response.stop()
    assert setup.connection.transport.disconnecting
    setup.connection.dataReceived(b"cd")
    setup.connection.connectionLost(Failure(net_error.ConnectionAborted()))
    body = Body()
    response.deliverBody(body)
    assert body.data == b""
    assert len(body.lost) == 1 and aborted(body.lost[0])
    assert setup.pool._connections == {}


def test_stopping_a_finished_response_changes_nothing() -> None:
    setup = Setup()
    response = strict_response(setup, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab")
    response.stop()
    assert not setup.connection.transport.disconnecting
    assert idle(setup.pool) == [setup.connection]
    body = Body()
    response.deliverBody(body)
    assert body.data == b"ab" and body.lost[0].check(ResponseDone)


def test_losing_the_connection_inside_data_received_is_not_reentrant() -> None:
    setup = Setup()
    response = strict_response(setup, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    body = Quitter()
    response.deliverBody(body)
    setup.connection.dataReceived(b"abc")
    assert [kind for kind, _ in body.events] == ["made", "data", "gave up"]
    assert setup.connection.transport.disconnecting
    setup.connection.dataReceived(b"def")
    assert body.data == b"abc"
    setup.connection.connectionLost(Failure(net_error.ConnectionAborted()))
    assert [kind for kind, _ in body.events] == ["made", "data", "gave up", "lost"]
    assert aborted(body.lost[0])
    assert setup.pool._connections == {}


def test_losing_the_connection_while_the_kept_body_is_delivered() -> None:
    # The same, but with the body already in when deliverBody is called:
    # after loseConnection the protocol should hear nothing more until the
    # connection has closed, as when the body arrives after deliverBody.
    setup = Setup()
    response = strict_response(setup, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    setup.connection.dataReceived(b"def")
    body = Quitter()
    response.deliverBody(body)
    assert setup.connection.transport.disconnecting
    assert [kind for kind, _ in body.events] == ["made", "data", "gave up"]
    setup.connection.connectionLost(Failure(net_error.ConnectionAborted()))
    assert [kind for kind, _ in body.events] == ["made", "data", "gave up", "lost"]
    assert aborted(body.lost[0])
    assert setup.pool._connections == {}


def test_treq_collect_whose_collector_raises_stops_the_body_once() -> None:
    setup = Setup()
    http = setup.treq()
    result = treq_call(http, setup.clock, PreEncodedURL.encode("http://127.0.0.1:9999/v"))
    setup.connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    seen: List[bytes] = []

    def collector(data: bytes) -> None:
        seen.append(data)
        raise OSError("enough")

    collected = outcome(treq.collect(as_sent(result[0]), collector))
    setup.connection.dataReceived(b"abc")
    assert seen == [b"abc"]
    assert len(collected) == 1 and collected[0].check(OSError)
    assert setup.connection.transport.disconnecting
    setup.connection.dataReceived(b"def")
    setup.connection.connectionLost(Failure(net_error.ConnectionAborted()))
    assert seen == [b"abc"]
    assert len(collected) == 1
    assert setup.pool._connections == {}


# -- through treq


def test_treq_sends_exactly_the_prepared_fields_and_relays_a_gzip_answer_as_sent() -> None:
    setup = Setup()
    http = setup.treq()
    url = PreEncodedURL.encode("http://127.0.0.1:9999/verify?a=%7e")
    result = treq_call(http, setup.clock, url, method="POST", headers=PreparedHeaders(WIRE), data=b"body")
    assert setup.sent() == b"POST /verify?a=%7e HTTP/1.1\r\nContent-Length: 4\r\n" + WIRE_BYTES + b"\r\nbody"
    compressed = gzip.compress(b"denied, and why")
    setup.connection.dataReceived(
        b"HTTP/1.1 401 Unauthorized\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(compressed)
        + compressed
    )
    (response,) = result
    raw = as_sent(response)
    assert isinstance(raw, StrictResponse) and raw is not response
    assert raw.code == 401
    # treq's wrapper took Content-Encoding off the Headers; what was sent still says gzip.
    assert not response.headers.hasHeader(b"content-encoding")
    assert raw.sent_headers.get(b"content-encoding") == (b"gzip",)
    chunks: List[bytes] = []
    done = outcome(treq.collect(raw, chunks.append))
    assert done == [None]
    assert b"".join(chunks) == compressed


def test_treq_answer_without_content_encoding_is_relayed_without_one() -> None:
    setup = Setup()
    http = setup.treq()
    url = PreEncodedURL.encode("http://127.0.0.1:9999/v")
    result = treq_call(http, setup.clock, url, headers=PreparedHeaders(WIRE))
    setup.connection.dataReceived(b"HTTP/1.1 200 OK\r\nX-User: u\r\nContent-Length: 2\r\n\r\nok")
    (response,) = result
    raw = as_sent(response)
    assert isinstance(raw, StrictResponse)
    assert b"content-encoding" not in raw.sent_headers
    assert raw.sent_headers.get(b"x-user") == (b"u",)
    if (twisted.version.major, twisted.version.minor) == (26, 10):
        # ContentDecoderAgent puts back an empty one on an answer that had none.
        assert response.headers.getRawHeaders(b"content-encoding") == [b""]
    chunks: List[bytes] = []
    assert outcome(treq.collect(raw, chunks.append)) == [None]
    assert chunks == [b"ok"]


def test_treq_with_plain_headers_sends_what_its_wrapper_added() -> None:
    # Only PreparedHeaders keep treq's Accept-Encoding off the wire.
    setup = Setup()
    http = setup.treq()
    treq_call(http, setup.clock, "http://127.0.0.1:9999/v", headers={b"X-A": b"1"})
    assert setup.sent() == b"GET /v HTTP/1.1\r\nHost: 127.0.0.1:9999\r\nX-A: 1\r\nAccept-Encoding: gzip\r\n\r\n"


def _cookie_exchange(jar: IndexableCookieJar) -> Tuple[Setup, bytes]:
    """A Set-Cookie answer, then a second request with plain headers: what it sent."""
    setup = Setup()
    http = setup.treq(jar)
    first = treq_call(http, setup.clock, "http://127.0.0.1:9999/a", cookies=jar)
    setup.connection.dataReceived(b"HTTP/1.1 200 OK\r\nSet-Cookie: sid=user1; Path=/\r\nContent-Length: 0\r\n\r\n")
    assert first[0].code == 200
    assert idle(setup.pool) == [setup.connection]
    setup.connection.transport.clear()
    treq_call(http, setup.clock, "http://127.0.0.1:9999/a", cookies=jar)
    return setup, setup.sent()


def test_no_cookies_keeps_and_sends_nothing() -> None:
    jar = NoCookies()
    setup, second = _cookie_exchange(jar)
    assert second == b"GET /a HTTP/1.1\r\nHost: 127.0.0.1:9999\r\nAccept-Encoding: gzip\r\n\r\n"
    assert list(jar) == []
    assert jar._cookies == {}  # not merely hidden from iteration


def test_treqs_own_jar_would_carry_the_cookie_into_the_next_request() -> None:
    # The control for the test above: the same exchange with treq's own jar.
    jar = IndexableCookieJar()
    setup, second = _cookie_exchange(jar)
    assert b"Cookie: sid=user1\r\n" in second
    assert [cookie.name for cookie in jar] == ["sid"]


def test_no_cookies_ignores_cookies_handed_to_treq() -> None:
    setup = Setup()
    jar = NoCookies()
    http = setup.treq(jar)
    treq_call(http, setup.clock, "http://127.0.0.1:9999/a", cookies={"sid": "x"})
    assert b"Cookie" not in setup.sent()
    assert jar._cookies == {}


# -- PreEncodedURL


def test_an_ascii_url_goes_out_exactly_as_written() -> None:
    text = "http://a.test:81/p%7e?q=%2F&x"
    url = PreEncodedURL.encode(text)
    assert isinstance(url, EncodedURL)
    assert url.to_text() == text
    assert url.to_uri() is url
    assert url.to_uri().to_text() == text
    assert (url.host, url.port) == ("a.test", 81)


def test_a_non_ascii_url_is_encoded_once() -> None:
    url = PreEncodedURL.encode("http://bücher.test/ü?q=ä")
    assert url.to_text() == "http://xn--bcher-kva.test/%C3%BC?q=%C3%A4"
    assert url.to_uri() is url
    assert PreEncodedURL.encode("http://bücher.test/").to_text() == "http://xn--bcher-kva.test/"


def test_replace_returns_a_plain_encoded_url() -> None:
    url = PreEncodedURL.encode("http://a.test:81/p%7e?q=%2F&x")
    changed = url.replace(port=82)
    assert type(changed) is EncodedURL
    assert changed.port == 82
    assert changed.to_text().startswith("http://a.test:82/")
    assert url.to_text() == "http://a.test:81/p%7e?q=%2F&x"  # unchanged
    assert type(url.child("c")) is EncodedURL


def test_to_text_hides_the_password_as_hyperlink_does() -> None:
    text = "http://user:secret@a.test/v"
    url = PreEncodedURL.encode(text)
    assert url.to_text() == EncodedURL.from_text(text).to_text()
    assert "secret" not in url.to_text()
    assert url.to_text(with_password=True) == text


def test_a_pre_encoded_url_through_treq_and_the_agent() -> None:
    setup = Setup()
    treq_call(setup.treq(), setup.clock, PreEncodedURL.encode("http://127.0.0.1:9999/ü?q=%2f&x"))
    assert setup.sent().startswith(b"GET /%C3%BC?q=%2f&x HTTP/1.1\r\nHost: 127.0.0.1:9999\r\n")


# -- a plain HTTPConnectionPool: Twisted's own protocol


def test_a_plain_pool_sends_a_twisted_request() -> None:
    clock = Clock()
    setup = Setup(HTTPConnectionPool(clock), clock)
    result = setup.request(b"POST", headers=PreparedHeaders(WIRE), body=BytesBody(b"body"))
    assert isinstance(setup.connection, HTTP11ClientProtocol)
    sent = setup.sent()
    assert sent.startswith(b"POST /verify?a=1 HTTP/1.1\r\n")
    fields = (b"Host: auth.test\r\n", b"X-Forwarded-Uri: /x\r\n", b"X-Dup: 1\r\nX-Dup: 2\r\n", b"Content-Length: 4\r\n")
    for field in fields:
        assert field in sent
    assert b"Connection: close" not in sent
    assert sent.endswith(b"\r\n\r\nbody")
    assert result == []


def test_a_plain_pool_gets_a_host_from_the_url() -> None:
    clock = Clock()
    setup = Setup(HTTPConnectionPool(clock, persistent=False), clock)
    setup.request(headers=Headers({b"X-A": [b"1"]}))
    sent = setup.sent()
    assert b"Host: 127.0.0.1:9999\r\n" in sent
    assert b"X-A: 1\r\n" in sent
    assert b"Connection: close\r\n" in sent


def test_a_plain_pool_response_is_wrapped_with_its_headers_as_sent() -> None:
    clock = Clock()
    setup = Setup(HTTPConnectionPool(clock), clock)
    result = setup.request(headers=PreparedHeaders(WIRE))
    setup.connection.dataReceived(b"HTTP/1.1 403 Nope\r\nContent-Length: 3\r\nX-Y: z\r\nX-Y: w\r\n\r\nabc")
    (response,) = result
    assert isinstance(response, _PlainResponse)
    assert as_sent(response) is response
    assert (response.code, response.phrase, response.length) == (403, b"Nope", 3)
    assert response.sent_headers.get(b"X-Y") == (b"z", b"w")
    response.headers.addRawHeader(b"x-y", b"v")
    assert response.sent_headers.get(b"x-y") == (b"z", b"w")
    response.headers.removeHeader(b"x-y")
    assert not response.original.headers.hasHeader(b"x-y")
    assert response.sent_headers.get(b"x-y") == (b"z", b"w")
    body = Body()
    response.deliverBody(body)
    assert body.data == b"abc"
    assert len(body.lost) == 1 and body.lost[0].check(ResponseDone)
    assert idle(setup.pool) == [setup.connection]


def test_a_plain_pool_response_can_be_stopped() -> None:
    clock = Clock()
    setup = Setup(HTTPConnectionPool(clock), clock)
    result = setup.request(headers=PreparedHeaders(WIRE))
    setup.connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    (response,) = result
    body = Body()
    response.deliverBody(body)
    response.stop()
    # A TCP transport's stopProducing closes it; StringTransport only records it.
    assert setup.connection.transport.producerState == "stopped"
    assert body.lost == []
    setup.connection.connectionLost(Failure(net_error.ConnectionDone()))
    assert body.data == b"abc"
    assert len(body.lost) == 1 and body.lost[0].check(ResponseFailed)
    assert idle(setup.pool) == []


def test_treq_over_a_plain_pool_relays_the_answer_as_sent() -> None:
    clock = Clock()
    setup = Setup(HTTPConnectionPool(clock), clock)
    url = PreEncodedURL.encode("http://127.0.0.1:9999/v")
    result = treq_call(setup.treq(), clock, url, headers=PreparedHeaders(WIRE))
    assert b"Accept-Encoding" not in setup.sent()
    compressed = gzip.compress(b"x")
    setup.connection.dataReceived(
        b"HTTP/1.1 401 No\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(compressed) + compressed
    )
    raw = as_sent(result[0])
    assert isinstance(raw, _PlainResponse)
    assert raw.sent_headers.get(b"content-encoding") == (b"gzip",)
    assert not result[0].headers.hasHeader(b"content-encoding")
    chunks: List[bytes] = []
    outcome(treq.collect(raw, chunks.append))
    assert b"".join(chunks) == compressed


def test_an_answers_twisted_headers_are_its_own_and_as_twisted_makes_them() -> None:
    clock = Clock()
    block = b"HTTP/1.1 200 OK\r\nX-User-ID: u\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nwww-authenticate: x\r\nContent-Length: 0\r\n\r\n"
    answers = []
    for _ in range(2):  # the second one's head is the first's, parsed once
        setup = Setup(StrictConnectionPool(clock), clock)
        result = setup.request(headers=PreparedHeaders(WIRE))
        setup.connection.dataReceived(block)
        answers.append(result[0])
    first, second = answers
    expected = Headers({b"x-user-id": [b"u"], b"set-cookie": [b"a=1", b"b=2"], b"www-authenticate": [b"x"]})
    assert first.headers == expected and second.headers == expected
    assert first.sent_headers is second.sent_headers
    assert sorted(first.headers.getAllRawHeaders()) == sorted(expected.getAllRawHeaders())  # Twisted's spelling
    first.headers.addRawHeader(b"set-cookie", b"c=3")
    first.headers.removeHeader(b"x-user-id")
    assert second.headers == expected
    assert first.sent_headers.get(b"set-cookie") == (b"a=1", b"b=2")


def test_an_answer_whole_in_one_read_is_complete_when_its_deferred_fires() -> None:
    setup = Setup()
    seen: List[Any] = []

    def fired(response: Any) -> None:
        # The connection is back in the pool, and the body is all there.
        seen.append(setup.pool.connection_counts())
        body = Body()
        response.deliverBody(body)
        seen.append(body.events)

    d = setup.agent.request(b"GET", URL, PreparedHeaders(WIRE))
    d.addCallback(fired)
    setup.connection.dataReceived(b"HTTP/1.1 403 No\r\nContent-Length: 6\r\n\r\ndenied")
    counts, events = seen
    assert list(counts.values()) == [(1, 0)]
    assert events[-2][1] == b"denied" and events[-1][1].check(ResponseDone)


def test_a_body_broken_in_the_read_that_brought_the_head_fails_the_request() -> None:
    setup = Setup()
    results = setup.request(headers=PreparedHeaders(WIRE))
    setup.connection.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnope\r\n")
    (failure,) = results
    assert isinstance(failure, Failure) and failure.check(ResponseFailed)
    assert setup.connection.transport.disconnecting or setup.connection.state == "CLOSING"
