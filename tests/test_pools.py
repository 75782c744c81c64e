"""fauth.pools.ConnectionPool, driven over in-memory transports and a fake clock."""
from __future__ import annotations

from typing import Any, List

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from fauth.connection import ClientConnection, ClientRequest, Reply
from fauth.h1 import request_head
from fauth.pools import ConnectionPool
from tests.harness import outcome

KEY = (b"http", b"127.0.0.1", 80)
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


def answer(connection: ClientConnection, data: bytes = OK) -> None:
    connection.dataReceived(data)


def test_a_finished_connection_is_reused() -> None:
    clock, endpoint = Clock(), Endpoint()
    pool = ConnectionPool(clock, max_idle=4)
    first = outcome(pool.request(KEY, endpoint, ClientRequest(b"GET", GET)))
    answer(endpoint.connections[0])
    second = outcome(pool.request(KEY, endpoint, ClientRequest(b"GET", GET)))
    answer(endpoint.connections[0])
    assert len(endpoint.connections) == 1
    assert isinstance(first[0], Reply) and isinstance(second[0], Reply)
    assert pool.connection_counts() == {KEY: (1, 0)}


def test_the_most_recently_used_is_reused_and_the_oldest_closed_past_max_idle() -> None:
    clock, endpoint = Clock(), Endpoint()
    pool = ConnectionPool(clock, max_idle=2)
    for _ in range(3):
        pool.request(KEY, endpoint, ClientRequest(b"GET", GET))
    a, b, c = endpoint.connections
    for connection in (a, b, c):
        answer(connection)
    # a went idle first: closed when c came back with two already idle.
    assert a.transport.disconnecting and not b.transport.disconnecting and not c.transport.disconnecting
    pool.request(KEY, endpoint, ClientRequest(b"GET", GET))
    assert c.state == "WAITING" and b.state == "QUIESCENT"


def test_idle_connections_close_after_the_timeout_with_one_timer() -> None:
    clock, endpoint = Clock(), Endpoint()
    pool = ConnectionPool(clock, max_idle=4, idle_timeout=10.0)
    pool.request(KEY, endpoint, ClientRequest(b"GET", GET))
    pool.request(KEY, endpoint, ClientRequest(b"GET", GET))
    a, b = endpoint.connections
    answer(a)
    clock.advance(6)
    answer(b)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(4)
    assert a.transport.disconnecting and not b.transport.disconnecting
    clock.advance(5.9)
    assert not b.transport.disconnecting
    clock.advance(0.1)
    assert b.transport.disconnecting
    assert clock.getDelayedCalls() == []
    assert pool.connection_counts() == {KEY: (0, 0)}


def stale(connection: ClientConnection) -> None:
    """The peer closed the idle connection, but the close is not read yet."""
    connection.transport.write = lambda data: connection.connectionLost(Failure(ConnectionDone()))  # type: ignore


def test_a_get_on_a_stale_reused_connection_is_sent_once_more_on_a_new_one() -> None:
    clock, endpoint = Clock(), Endpoint()
    pool = ConnectionPool(clock, max_idle=4)
    pool.request(KEY, endpoint, ClientRequest(b"GET", GET))
    answer(endpoint.connections[0])
    stale(endpoint.connections[0])
    result = outcome(pool.request(KEY, endpoint, ClientRequest(b"GET", GET)))
    assert len(endpoint.connections) == 2
    assert endpoint.connections[1].transport.value() == GET
    answer(endpoint.connections[1])
    assert isinstance(result[0], Reply)


def test_a_request_with_a_body_is_never_sent_twice() -> None:
    clock, endpoint = Clock(), Endpoint()
    pool = ConnectionPool(clock, max_idle=4)
    pool.request(KEY, endpoint, ClientRequest(b"GET", GET))
    answer(endpoint.connections[0])
    stale(endpoint.connections[0])
    result = outcome(pool.request(KEY, endpoint, ClientRequest(b"POST", GET, b"")))
    assert len(endpoint.connections) == 1
    assert isinstance(result[0], Failure)


def test_not_persistent_keeps_nothing() -> None:
    clock, endpoint = Clock(), Endpoint()
    pool = ConnectionPool(clock, persistent=False)
    pool.request(KEY, endpoint, ClientRequest(b"GET", GET))
    pool._put(KEY, endpoint.connections[0])
    assert endpoint.connections[0].transport.disconnecting
    assert clock.getDelayedCalls() == []


def test_close_closes_idle_connections_and_the_timer() -> None:
    clock, endpoint = Clock(), Endpoint()
    pool = ConnectionPool(clock, max_idle=4)
    pool.request(KEY, endpoint, ClientRequest(b"GET", GET))
    answer(endpoint.connections[0])
    done = outcome(pool.close())
    assert endpoint.connections[0].transport.disconnecting and done == []
    endpoint.connections[0].connectionLost(Failure(ConnectionDone()))
    assert done == [None]
    assert clock.getDelayedCalls() == []


def test_a_connection_finishing_after_close_is_not_kept() -> None:
    clock, endpoint = Clock(), Endpoint()
    pool = ConnectionPool(clock, max_idle=4)
    pool.request(KEY, endpoint, ClientRequest(b"GET", GET))
    pool.close()
    answer(endpoint.connections[0])
    assert endpoint.connections[0].transport.disconnecting
    assert clock.getDelayedCalls() == [] and pool.connection_counts() == {KEY: (0, 0)}
