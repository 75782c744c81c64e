"""UpstreamProxy.forward over a real pool on in-memory connections and a fake clock."""
from __future__ import annotations

from typing import Any, List

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from fauth.config import Node, UpstreamConf, UpstreamTimeouts
from fauth.inbound import InboundRequest
from fauth.pools import ConnectionPool
from fauth.proxy import UpstreamProxy


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


class FakeRequest:
    method = b"GET"
    finished = False
    startedWriting = False

    def __init__(self) -> None:
        self.requestHeaders = Headers({b"host": [b"gw.test"]})
        self.responseHeaders = Headers()
        self.content = None
        self._finish: Deferred = Deferred()
        self.written: List[bytes] = []
        self.code = 0
        self.channel = None
        self.aborted = False

    def notifyFinish(self) -> Deferred:
        return self._finish

    def setResponseCode(self, code: int, message: Any = None) -> None:
        self.code = code

    def setHeader(self, *a: Any) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def finish(self) -> None:
        self.finished = True


def _setup(timeouts: UpstreamTimeouts = UpstreamTimeouts()) -> Any:
    clock = Clock()
    pool = ConnectionPool(clock)
    conf = UpstreamConf(nodes=(Node("127.0.0.1", 9),), timeout=timeouts)
    proxy = UpstreamProxy(conf, clock, pool)
    endpoint = Endpoint()
    proxy._connector._endpoints[(b"http", b"127.0.0.1", 9)] = endpoint
    request = FakeRequest()
    inbound = InboundRequest(
        method="GET", request_uri="/x", path="/x", query="", host="gw.test", scheme="http",
        remote_addr="127.0.0.1", remote_port=1, server_addr="127.0.0.1", server_port=2,
        headers=request.requestHeaders,
    )
    return clock, proxy, endpoint, request, inbound


def test_client_gone_before_the_head_cancels_the_upstream_exchange() -> None:
    clock, proxy, endpoint, request, inbound = _setup()
    proxy.forward(request, inbound)
    (transport,) = endpoint.transports
    assert transport.value().startswith(b"GET /x HTTP/1.1\r\n")
    # The client goes away while the upstream has not answered yet (a fresh
    # connection: the pool's Deferred has fired, the request's has not).
    request._finish.errback(Failure(ConnectionLost()))
    assert transport.disconnecting
    assert endpoint.protocols[0].state == "CLOSING"
    assert clock.getDelayedCalls() == []
    assert request.code == 0 and request.written == []


def test_body_idle_timeout_holds_when_send_exceeds_read() -> None:
    clock, proxy, endpoint, request, inbound = _setup(UpstreamTimeouts(connect=1, send=10, read=1))
    proxy.forward(request, inbound)
    (transport,) = endpoint.transports
    protocol = endpoint.protocols[0]
    clock.advance(1.5)  # the first check, at read = 1 s, re-arms for the head deadline (11 s)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
    assert request.code == 200
    clock.advance(0.9)
    assert not transport.disconnecting
    clock.advance(0.2)  # one read timeout after the last bytes
    assert transport.disconnecting
