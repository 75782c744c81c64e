"""UpstreamProxy.forward over a real pool on in-memory connections and a fake clock."""
from __future__ import annotations

from typing import Any, List

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from fauth.config import Node, UpstreamConf, UpstreamTimeouts
from fauth.wire.h1 import ReplyHeaders, ResponseHead
from fauth.request.inbound import InboundRequest
from fauth.wire.pool import StrictConnectionPool
from fauth.testing import FakeRequest
from fauth.upstream.proxy import UpstreamProxy


class Endpoint:
    """Connects at once over a StringTransport (a fresh connection each time)."""

    def __init__(self) -> None:
        self.transports: List[StringTransport] = []
        self.protocols: List[Any] = []

    def connect(self, factory: Any) -> Deferred:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        self.protocols.append(protocol)
        return succeed(protocol)




def inbound_of(request: FakeRequest) -> InboundRequest:
    return InboundRequest(
        method="GET", request_uri="/x", path="/x", query="", host="gw.test", scheme="http",
        remote_addr="127.0.0.1", remote_port=1, server_addr="127.0.0.1", server_port=2,
        headers=request.requestHeaders,
    )


def _setup(timeouts: UpstreamTimeouts = UpstreamTimeouts()) -> Any:
    clock = Clock()
    pool = StrictConnectionPool(clock)
    conf = UpstreamConf(nodes=(Node("127.0.0.1", 9),), timeout=timeouts)
    proxy = UpstreamProxy(conf, clock, pool)
    endpoint = Endpoint()
    proxy._connector._endpoints[(b"http", b"127.0.0.1", 9)] = endpoint
    request = FakeRequest()
    return clock, proxy, endpoint, request, inbound_of(request)


def test_client_gone_before_the_head_cancels_the_upstream_exchange() -> None:
    clock, proxy, endpoint, request, inbound = _setup()
    proxy.forward(request, inbound)
    (transport,) = endpoint.transports
    assert transport.value().startswith(b"GET /x HTTP/1.1\r\n")
    # The client goes away while the upstream has not answered yet (a fresh
    # connection: the pool's Deferred has fired, the request's has not).
    request.finish_by_client_gone()
    assert transport.disconnecting
    assert endpoint.protocols[0].state == "CLOSING"
    clock.advance(120)  # past every deadline: nothing left to time out
    assert clock.getDelayedCalls() == []
    assert request.code == 0 and request.written == []


def test_body_idle_timeout_holds_when_send_exceeds_read() -> None:
    clock, proxy, endpoint, request, inbound = _setup(UpstreamTimeouts(connect=1, send=10, read=1))
    proxy.forward(request, inbound)
    (transport,) = endpoint.transports
    protocol = endpoint.protocols[0]
    clock.advance(1.5)  # past the read timeout, but the head may take send + read (11 s)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
    assert request.code == 200
    clock.advance(0.9)
    assert not transport.disconnecting
    clock.advance(0.2)  # one read timeout after the last bytes
    assert transport.disconnecting


class FakeUpstream:
    """The upstream connection as the relay sees it (its producer)."""

    def __init__(self) -> None:
        self.stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


class LateConnector:
    """
    A connector whose answer (with a 64 MiB body) is already in when the
    client leaves: cancel() cannot stop it, and the upstream goes on sending
    until its connection is stopped.
    """

    length = 64 * 1024 * 1024

    def __init__(self) -> None:
        self.upstream = FakeUpstream()
        self.delivered: List[int] = []

    def request(self, scheme: bytes, host: bytes, port: int, outgoing: Any) -> Deferred:
        def too_late(d: Deferred) -> None:
            head = ResponseHead(
                200, b"OK", ReplyHeaders({b"content-type": [b"application/octet-stream"]}),
                self.length, False, True, frozenset(),
            )
            d.callback(outgoing.sink.body_start(self.upstream, head))
            sent = 0
            while not self.upstream.stopped and sent < self.length:
                outgoing.sink.body_data(b"x" * 65536)
                sent += 65536
            self.delivered.append(sent)

        return Deferred(too_late)


def test_answer_after_the_client_left_stops_the_upstream_at_once() -> None:
    clock = Clock()
    proxy = UpstreamProxy(UpstreamConf(nodes=(Node("127.0.0.1", 9),)), clock, pool=None)
    connector = LateConnector()
    proxy._connector = connector  # type: ignore[assignment]
    request = FakeRequest()
    proxy.forward(request, inbound_of(request))
    # The client leaves; the cancel comes too late and the answer is delivered.
    request.finish_by_client_gone()
    assert connector.upstream.stopped
    # Stopped before reading the body, not after reading all of it into nothing.
    assert connector.delivered == [0]
    assert request.code == 0 and request.written == []
    clock.advance(120)  # no deadline left to act on
    assert clock.getDelayedCalls() == [] and request.code == 0
