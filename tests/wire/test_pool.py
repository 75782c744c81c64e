"""
L{fauth.wire.pool.StrictConnectionPool}, driven over in-memory transports and a
fake clock: connections are L{ClientConnection}s on L{StringTransport}s,
answers are C{dataReceived} calls and a peer's close a C{connectionLost}.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseFailed, ResponseNeverReceived

from fauth.wire.connection import ClientConnection, ClientRequest
from fauth.wire.h1 import ResponseHead, request_head
from fauth.wire.pool import StrictConnectionPool, target_label
from tests.harness import outcome

KEY = (b"http", b"127.0.0.1", 80)
OTHER = (b"http", b"127.0.0.2", 8080)
GET = request_head(b"GET", b"/", [(b"Host", b"x")])
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Endpoint:
    """Connects at once over a StringTransport; remembers every connection."""

    def __init__(self) -> None:
        self.connections: List[ClientConnection] = []

    def connect(self, factory: Any) -> Deferred:
        connection = factory.buildProtocol(None)
        connection.makeConnection(StringTransport())
        self.connections.append(connection)
        return succeed(connection)


class PendingEndpoint:
    """Never finishes connecting."""

    def connect(self, factory: Any) -> Deferred:
        return Deferred()


class Body:
    """A sink that keeps the answer; the request's Deferred fires with it."""

    def __init__(self) -> None:
        self.head: Optional[ResponseHead] = None
        self.chunks: List[bytes] = []
        self.done: List[Optional[Failure]] = []

    def body_start(self, producer: Any, head: ResponseHead) -> "Body":
        self.head = head
        return self

    def body_data(self, data: bytes) -> None:
        self.chunks.append(data)

    def body_done(self, reason: Optional[Failure]) -> None:
        self.done.append(reason)

    @property
    def body(self) -> bytes:
        assert self.done == [None], self.done
        return b"".join(self.chunks)


def new_pool(**settings: Any) -> Tuple[Clock, Endpoint, StrictConnectionPool]:
    """A fake clock, an L{Endpoint}, and a pool with C{settings} on that clock."""
    clock = Clock()
    reactor: Any = clock
    return clock, Endpoint(), StrictConnectionPool(reactor, **settings)


def send(
    pool: StrictConnectionPool,
    endpoint: Any,
    method: bytes = b"GET",
    body: Optional[bytes] = None,
    key: Any = KEY,
) -> Tuple[Body, List[Any]]:
    """
    A request over a connection from C{pool}, as L{fauth.wire.transport.Connector}
    sends one: its sink, and what its Deferred fired with.
    """
    sink = Body()
    request = ClientRequest(method, GET, sink, body)
    connecting: Deferred = pool.getConnection(key, endpoint)
    return sink, outcome(connecting.addCallback(lambda connection: connection.request(request)))


def answer(connection: ClientConnection, data: bytes = OK) -> None:
    connection.dataReceived(data)


def closed(connection: ClientConnection) -> bool:
    transport: Any = connection.transport
    return bool(transport.disconnecting)


def sent(connection: ClientConnection) -> bytes:
    transport: Any = connection.transport
    return bytes(transport.value())


def stale(connection: ClientConnection) -> None:
    """The peer closed the idle connection, but the close is not read yet."""
    connection.transport.write = lambda data: connection.connectionLost(Failure(ConnectionDone()))  # type: ignore


def only(results: List[Any]) -> Any:
    assert len(results) == 1, results
    return results[0]


# -- reuse


def test_a_finished_connection_is_reused() -> None:
    clock, endpoint, pool = new_pool(maxPersistentPerHost=4)
    first, first_results = send(pool, endpoint)
    (connection,) = endpoint.connections
    assert isinstance(connection, ClientConnection)
    answer(connection)
    assert pool.connection_counts() == {KEY: (1, 0)}
    second, second_results = send(pool, endpoint)
    assert pool.connection_counts() == {KEY: (0, 1)}
    answer(connection)
    assert endpoint.connections == [connection]
    assert sent(connection) == GET + GET
    assert only(first_results) is first and first.body == b"ok"
    assert only(second_results) is second and second.body == b"ok"
    assert pool.connection_counts() == {KEY: (1, 0)}
    assert not closed(connection)


def test_keys_do_not_share_connections() -> None:
    clock, endpoint, pool = new_pool()
    send(pool, endpoint)
    answer(endpoint.connections[0])
    send(pool, endpoint, key=OTHER)
    assert len(endpoint.connections) == 2
    assert pool.connection_counts() == {KEY: (1, 0), OTHER: (0, 1)}


def test_the_newest_idle_is_reused_and_the_oldest_closed_past_max_persistent() -> None:
    clock, endpoint, pool = new_pool(maxPersistentPerHost=3)
    for _ in range(4):
        send(pool, endpoint)
    a, b, c, d = endpoint.connections
    for connection in (a, b, c, d):
        answer(connection)
    # a went idle first: closed when d came back with three already idle.
    assert closed(a) and not any(closed(connection) for connection in (b, c, d))
    assert len(clock.getDelayedCalls()) == 1  # one timer for the pool, not one per connection
    assert pool.connection_counts() == {KEY: (3, 0)}
    # Last in, first out: d is the one handed out next, then c.
    send(pool, endpoint)
    assert (b.state, c.state, d.state) == ("QUIESCENT", "QUIESCENT", "WAITING")
    send(pool, endpoint)
    assert (b.state, c.state) == ("QUIESCENT", "WAITING")
    assert len(endpoint.connections) == 4
    assert len(clock.getDelayedCalls()) == 1


def test_keep_idle_lowered_closes_the_excess_now_and_holds_after() -> None:
    clock, endpoint, pool = new_pool(maxPersistentPerHost=4)
    for _ in range(8):
        send(pool, endpoint)
    for connection in endpoint.connections[:4]:
        answer(connection)
    assert pool.connection_counts() == {KEY: (4, 4)}
    pool.keep_idle(2)  # a reload with a smaller keepalive_pool
    assert pool.connection_counts() == {KEY: (2, 4)}
    # The longest idle go.
    assert [closed(c) for c in endpoint.connections[:4]] == [True, True, False, False]
    for connection in endpoint.connections[4:]:
        answer(connection)
    # The trimming on return holds from the new limit.
    assert pool.connection_counts() == {KEY: (2, 0)}
    assert sum(not closed(c) for c in endpoint.connections) == 2


def test_idle_connections_close_after_the_timeout() -> None:
    clock, endpoint, pool = new_pool(maxPersistentPerHost=4, cachedConnectionTimeout=10.0)
    send(pool, endpoint)
    send(pool, endpoint)
    a, b = endpoint.connections
    answer(a)
    clock.advance(6)
    answer(b)
    clock.advance(3.9)
    assert not closed(a) and not closed(b)
    clock.advance(0.1)
    assert closed(a) and not closed(b)
    assert pool.connection_counts() == {KEY: (1, 0)}
    clock.advance(5.9)
    assert not closed(b)
    clock.advance(0.1)
    assert closed(b)
    assert clock.getDelayedCalls() == []
    assert pool.connection_counts() == {KEY: (0, 0)}
    # Neither is handed out again.
    send(pool, endpoint)
    assert len(endpoint.connections) == 3


def test_a_reused_connection_is_not_timed_out_while_busy() -> None:
    clock, endpoint, pool = new_pool(cachedConnectionTimeout=10.0)
    send(pool, endpoint)
    (connection,) = endpoint.connections
    answer(connection)
    clock.advance(5)
    sink, _ = send(pool, endpoint)
    clock.advance(20)
    assert not closed(connection)
    assert clock.getDelayedCalls() == []  # the timer found nothing idle, and stopped
    answer(connection)
    assert sink.body == b"ok"
    # Its idle time starts again from the end of this exchange.
    clock.advance(9.9)
    assert not closed(connection)
    clock.advance(0.1)
    assert closed(connection)


def test_each_target_keeps_its_own_idle_timeout_on_the_one_timer() -> None:
    clock, endpoint, pool = new_pool(maxPersistentPerHost=4, cachedConnectionTimeout=60.0)
    pool.limit(OTHER, 4, 5.0, 1000)  # an upstream's keepalive_pool: 5 s
    send(pool, endpoint)
    send(pool, endpoint, key=OTHER)
    slow, fast = endpoint.connections
    answer(slow)  # the timer is armed for 60 s first...
    answer(fast)  # ...and moved sooner for this one
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(5)
    assert closed(fast) and not closed(slow)
    assert pool.connection_counts() == {KEY: (1, 0), OTHER: (0, 0)}
    clock.advance(54.9)
    assert not closed(slow)
    clock.advance(0.1)
    assert closed(slow) and clock.getDelayedCalls() == []


def test_an_upstream_connection_is_closed_after_its_requests() -> None:
    clock, endpoint, pool = new_pool(maxPersistentPerHost=4)
    pool.limit(KEY, 4, 60.0, 2)  # keepalive_pool.requests: 2
    send(pool, endpoint)
    (connection,) = endpoint.connections
    answer(connection)
    assert not closed(connection)
    send(pool, endpoint)
    answer(connection)
    assert closed(connection)
    assert pool.connection_counts() == {KEY: (0, 0)}


def test_a_pool_that_keeps_none_closes_each_connection() -> None:
    clock, endpoint, pool = new_pool(maxPersistentPerHost=0)
    sink, _ = send(pool, endpoint)
    answer(endpoint.connections[0])
    assert sink.body == b"ok" and closed(endpoint.connections[0])
    assert clock.getDelayedCalls() == []


def test_a_connection_the_peer_closed_while_idle_is_not_handed_out() -> None:
    clock, endpoint, pool = new_pool()
    send(pool, endpoint)
    (old,) = endpoint.connections
    answer(old)
    old.connectionLost(Failure(ConnectionDone()))
    assert pool.connection_counts() == {KEY: (0, 0)}
    sink, results = send(pool, endpoint)
    assert len(endpoint.connections) == 2 and sent(old) == GET
    answer(endpoint.connections[1])
    assert only(results) is sink and sink.body == b"ok"
    assert len(clock.getDelayedCalls()) == 1  # the pool's one timer
    clock.advance(60)
    assert closed(endpoint.connections[1]) and clock.getDelayedCalls() == []


def test_not_persistent_keeps_nothing() -> None:
    clock, endpoint, pool = new_pool(persistent=False)
    sink, _ = send(pool, endpoint)
    answer(endpoint.connections[0])  # an answer that would allow reuse
    assert sink.body == b"ok"
    assert closed(endpoint.connections[0])
    assert clock.getDelayedCalls() == []
    assert pool.connection_counts() == {KEY: (0, 0)}
    send(pool, endpoint)
    assert len(endpoint.connections) == 2


# -- retries


def test_a_get_on_a_stale_reused_connection_is_sent_once_more_on_a_new_one() -> None:
    clock, endpoint, pool = new_pool()
    send(pool, endpoint)
    answer(endpoint.connections[0])
    stale(endpoint.connections[0])
    sink, results = send(pool, endpoint)
    assert len(endpoint.connections) == 2
    assert results == []  # the failure on the stale one is not the caller's
    assert sent(endpoint.connections[1]) == GET
    answer(endpoint.connections[1])
    assert only(results) is sink and sink.body == b"ok"


def test_a_retried_get_that_fails_again_fails() -> None:
    clock, endpoint, pool = new_pool()
    send(pool, endpoint)
    answer(endpoint.connections[0])
    stale(endpoint.connections[0])
    sink, results = send(pool, endpoint)
    endpoint.connections[1].connectionLost(Failure(ConnectionLost()))
    assert len(endpoint.connections) == 2  # once more, not again and again
    assert only(results).check(ResponseNeverReceived)
    assert sink.head is None


@pytest.mark.parametrize("method, body", [(b"POST", b""), (b"GET", b"x")])
def test_a_request_with_a_body_is_never_sent_twice(method: bytes, body: bytes) -> None:
    clock, endpoint, pool = new_pool()
    send(pool, endpoint)
    answer(endpoint.connections[0])
    stale(endpoint.connections[0])
    sink, results = send(pool, endpoint, method, body)
    assert len(endpoint.connections) == 1
    assert only(results).check(ResponseNeverReceived)
    assert sink.head is None


def test_a_get_that_got_part_of_an_answer_is_not_sent_again() -> None:
    clock, endpoint, pool = new_pool()
    send(pool, endpoint)
    (connection,) = endpoint.connections
    answer(connection)
    _, results = send(pool, endpoint)
    answer(connection, b"HTTP/1.1 200 OK\r\nContent-")
    connection.connectionLost(Failure(ConnectionDone()))
    assert len(endpoint.connections) == 1
    failure = only(results)
    assert failure.check(ResponseFailed) and not failure.check(ResponseNeverReceived)


def test_a_get_on_a_new_connection_is_not_retried() -> None:
    clock, endpoint, pool = new_pool()
    _, results = send(pool, endpoint)
    endpoint.connections[0].connectionLost(Failure(ConnectionDone()))
    assert len(endpoint.connections) == 1
    assert only(results).check(ResponseNeverReceived)


# -- closing


def test_close_closes_idle_connections_and_their_timers() -> None:
    clock, endpoint, pool = new_pool()
    send(pool, endpoint)
    send(pool, endpoint)
    a, b = endpoint.connections
    answer(a)
    answer(b)
    assert len(clock.getDelayedCalls()) == 1
    done = outcome(pool.close())
    assert closed(a) and closed(b) and done == []
    assert clock.getDelayedCalls() == []
    assert pool.connection_counts() == {KEY: (0, 0)}
    a.connectionLost(Failure(ConnectionDone()))
    assert done == []
    b.connectionLost(Failure(ConnectionDone()))
    assert done == [None]


def test_close_with_an_idle_connection_already_gone_fires() -> None:
    clock, endpoint, pool = new_pool()
    send(pool, endpoint)
    answer(endpoint.connections[0])
    endpoint.connections[0].connectionLost(Failure(ConnectionDone()))
    assert only(outcome(pool.close())) is None


def test_a_connection_finishing_after_close_is_closed_not_kept() -> None:
    clock, endpoint, pool = new_pool()
    sink, _ = send(pool, endpoint)
    (busy,) = endpoint.connections
    assert only(outcome(pool.close())) is None  # nothing idle to wait for
    assert not closed(busy)  # its exchange goes on
    answer(busy)
    assert sink.body == b"ok"
    assert closed(busy)
    assert clock.getDelayedCalls() == [] and pool.connection_counts() == {KEY: (0, 0)}
    send(pool, endpoint)
    assert len(endpoint.connections) == 2


# -- counts and labels


def test_connection_counts_idle_and_active() -> None:
    clock, endpoint, pool = new_pool(maxPersistentPerHost=4)
    assert pool.connection_counts() == {}
    for _ in range(3):
        send(pool, endpoint)
    send(pool, endpoint, key=OTHER)
    a, b, c, other = endpoint.connections
    assert pool.connection_counts() == {KEY: (0, 3), OTHER: (0, 1)}
    answer(a)
    answer(other)
    assert pool.connection_counts() == {KEY: (1, 2), OTHER: (1, 0)}
    # Closing ones are neither.
    b.stopProducing()
    assert b.state == "CLOSING"
    assert pool.connection_counts() == {KEY: (1, 1), OTHER: (1, 0)}
    # An idle one the peer closed is not idle any more.
    other.connectionLost(Failure(ConnectionDone()))
    assert pool.connection_counts() == {KEY: (1, 1), OTHER: (0, 0)}


def test_connection_counts_leave_out_connections_being_opened() -> None:
    _, _, pool = new_pool()
    endpoint: Any = PendingEndpoint()
    results = outcome(pool.getConnection(KEY, endpoint))
    assert results == []
    assert pool.connection_counts() == {KEY: (0, 0)}


@pytest.mark.parametrize(
    "key, label",
    [
        ((b"http", b"127.0.0.1", 80), "127.0.0.1:80"),
        ((b"https", b"auth.example", 8443), "auth.example:8443"),
        ((b"http", b"::1", 8080), "[::1]:8080"),
        ((b"https", b"[2001:db8::1]", 443), "[2001:db8::1]:443"),
        (("http", "fe80::1", 80), "[fe80::1]:80"),
        ("unix:/run/auth.sock", "unix:/run/auth.sock"),
        ((b"http", b"x"), str((b"http", b"x"))),
    ],
)
def test_target_label(key: Any, label: str) -> None:
    assert target_label(key) == label


def test_the_connector_sends_over_a_pooled_connection_at_once() -> None:
    # fauth.wire.transport.Connector.send: with a connection ready in the pool the
    # request goes out now and its Deferred is the connection's own, not yet
    # fired (callbacks the callers add are appended, not run through a fired
    # Deferred waiting on another).
    from fauth.wire.transport import Connector, tls_policy

    clock, endpoint, pool = new_pool(maxPersistentPerHost=2)
    connector = Connector(clock, pool, tls_policy(True), 1.0)
    connector._endpoints[KEY] = endpoint
    first = Body()
    results = outcome(connector.request(b"http", b"127.0.0.1", 80, ClientRequest(b"GET", GET, first)))
    (connection,) = endpoint.connections
    answer(connection)
    assert only(results) is first
    second = Body()
    d = connector.request(b"http", b"127.0.0.1", 80, ClientRequest(b"GET", GET, second))
    assert not d.called and sent(connection) == GET + GET
    later = outcome(d)
    answer(connection)
    assert only(later) is second and second.body == b"ok"
    assert endpoint.connections == [connection]
