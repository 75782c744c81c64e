"""
A request through the gateway, end to end over loopback (real auth service,
real upstream, the gateway between), leaves nothing for CPython's cyclic
collector: everything it built is freed by reference counting when it
ends.  A request that left a cycle behind would cost a collection pass
over it later, a pause in some other request (the slow tail), and the
cache-cold memory of objects not freed at once.
"""
from __future__ import annotations

import gc
import platform
from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

from fauth.process.demo import DemoAuthResource, EchoResource
from tests.harness import start_gateway
from tests.servers import listen_on_loopback, port_url

pytestmark = pytest.mark.skipif(
    platform.python_implementation() != "CPython",
    reason="counts what CPython's cyclic collector frees; PyPy frees nothing by reference counting",
)


class KeepAlive(Protocol):
    """Sends C{count} requests one after the other on one connection; C{done} fires with the answers."""

    def __init__(self, request: bytes, count: int) -> None:
        self.request, self.count = request, count
        self.answers: List[bytes] = []
        self.buffer = b""
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].lower()
        length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
        if len(self.buffer) < end + 4 + length:
            return
        self.answers.append(self.buffer[: end + 4 + length])
        self.buffer = self.buffer[end + 4 + length :]
        if len(self.answers) == self.count:
            self.transport.loseConnection()
            self.done.callback(self.answers)
        else:
            self.transport.write(self.request)


async def garbage_after(reactor: Any, port: int, request: bytes, count: int, status: int) -> int:
    """
    The objects CPython's cyclic collector frees after C{count} requests on
    one connection, each answered with C{status}.
    """
    client = KeepAlive(request, count)
    gc.collect()
    gc.disable()
    try:
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: client))
        answers = await client.done
        assert all(answer.startswith(b"HTTP/1.1 %d " % status) for answer in answers), answers[0]
        return gc.collect()
    finally:
        gc.enable()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("token, status", [(b"321", 200), (b"wrong", 403)], ids=["allowed", "denied"])
async def test_requests_leave_no_cycles(token: bytes, status: int) -> None:
    from twisted.internet import reactor

    auth = await listen_on_loopback(reactor, DemoAuthResource())
    upstream = await listen_on_loopback(reactor, EchoResource())
    gateway = await start_gateway(
        reactor,
        {
            "routes": [
                {
                    "id": "1",
                    "uri": "/*",
                    "plugins": {
                        "forward-auth": {
                            "uri": port_url(auth, "/"),
                            "request_headers": ["Authorization"],
                            "upstream_headers": ["X-User-ID"],
                        }
                    },
                    "upstream": {"nodes": {"127.0.0.1:%d" % upstream.getHost().port: 1}},
                }
            ]
        },
    )
    request = b"GET /headers HTTP/1.1\r\nHost: gateway\r\nAuthorization: " + token + b"\r\n\r\n"
    try:
        await garbage_after(reactor, gateway.port_number, request, 5, status)  # pools filled, caches warm
        few = await garbage_after(reactor, gateway.port_number, request, 10, status)
        many = await garbage_after(reactor, gateway.port_number, request, 60, status)
    finally:
        await gateway.stop()
        await auth.stopListening()
        await upstream.stopListening()
    # A connection's own objects may be a cycle once it closes; what a
    # request leaves behind grows with the requests (about 50 objects each
    # when the request's end held the parties it told).
    assert many - few < 50, (few, many)
