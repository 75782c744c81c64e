"""
WebSocket tunnels (C{enable_websocket}) end to end, with real sockets on
127.0.0.1: the gateway in front of a real WebSocket echo server (the
C{websockets} package), and real C{websockets} clients.

The client and the echo server run on an asyncio loop in a thread of their
own; the gateway runs on the reactor pytest-twisted drives.

C{websockets} is in the test extra (setup.cfg; 15.0.1 on PyPy 3.9): where
it is not installed, tests/conftest.py leaves this module out of the
collection.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import threading
import time
from typing import Any, AsyncIterator, Awaitable, Dict, List, Optional, Tuple

import pytest
import websockets
from pytest_twisted import async_yield_fixture, ensureDeferred
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall, deferLater
from zope.interface import implementer

from fauth.config import parse_config
from fauth.edge.gateway import Gateway
from fauth.edge.resources import GatewayResource, GatewaySite
from fauth.observe.accesslog import AccessLog
from fauth.observe.metrics import GatewayMetrics
from fauth.testing import StubAuthService
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

MiB = 1024 * 1024
GOOD = {"Authorization": "Bearer good"}


def sleep(reactor: Any, seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


# ---------------------------------------------------------------------------
# The asyncio side: a loop in a thread, an echo server on it


class Loop:
    """An asyncio loop in a thread; L{run} hands it a coroutine and returns a Deferred."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any]) -> Deferred:
        d: Deferred = Deferred()
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

        def done(f: Any) -> None:
            error = f.exception()
            if error is not None:
                self.reactor.callFromThread(d.errback, error)
            else:
                self.reactor.callFromThread(d.callback, f.result())

        future.add_done_callback(done)
        return d

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class EchoServer:
    """A WebSocket echo server; records each handshake's headers and path."""

    def __init__(self) -> None:
        self.handshakes: List[Tuple[str, Dict[str, str]]] = []
        self.server: Any = None
        self.port = 0

    async def start(self) -> None:
        self.server = await serve(
            self.handler, "127.0.0.1", 0, ping_interval=None, max_size=None, process_request=self.seen
        )
        self.port = self.server.sockets[0].getsockname()[1]

    def seen(self, connection: Any, request: Any) -> None:
        self.handshakes.append((request.path, {k.lower(): v for k, v in request.headers.raw_items()}))

    async def handler(self, ws: Any) -> None:
        try:
            while True:
                # Streamed: each fragment is echoed as it comes, so a large
                # message is never held whole on this side either.
                fragments = ws.recv_streaming()
                first = await fragments.__anext__()

                async def rest(first: Any = first, fragments: Any = fragments) -> AsyncIterator[Any]:
                    yield first
                    async for fragment in fragments:
                        yield fragment

                await ws.send(rest())
        except (websockets.ConnectionClosed, StopAsyncIteration):
            pass

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


# ---------------------------------------------------------------------------
# The gateway


class Env:
    def __init__(self, reactor: Any, loop: Loop, echo: EchoServer, tmp_path: Any) -> None:
        self.reactor = reactor
        self.loop = loop
        self.echo = echo
        self.auth = StubAuthService(tokens={"Bearer good": {"X-User-ID": "alice"}}, deny=(403, (), b"no"))
        self.log_path = str(tmp_path / "access.log")
        self.port: Any = None
        self.gateway: Any = None
        self.metrics: Any = None

    async def start(self, read_timeout: float = 6) -> None:
        upstream = {
            "nodes": {"127.0.0.1:%d" % self.echo.port: 1},
            "timeout": {"connect": 2, "send": 2, "read": read_timeout},
        }
        fa = {"uri": "http://stub-auth/auth", "request_headers": ["Authorization"], "upstream_headers": ["X-User-ID"]}
        doc = {
            "listen": ["tcp:0"],
            "routes": [
                {"id": "ws", "uri": "/ws*", "enable_websocket": True, "plugins": {"forward-auth": fa}, "upstream": upstream},
                {"id": "open", "uri": "/open", "enable_websocket": True, "upstream": upstream},
                {"id": "plain", "uri": "/plain", "plugins": {"forward-auth": fa}, "upstream": upstream},
            ],
        }
        conf = parse_config(doc)
        self.gateway = Gateway(self.reactor, conf, auth_clients=self.auth.clients())
        self.metrics = GatewayMetrics(self.gateway)
        self.metrics.access_log = AccessLog(self.log_path)
        site = GatewaySite(GatewayResource(self.gateway, self.metrics), conf.http, reactor=self.reactor)
        self.port = await TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(site)

    def url(self, path: str) -> str:
        return "ws://127.0.0.1:%d%s" % (self.port.getHost().port, path)

    def connect(self, path: str = "/ws", headers: Optional[Dict[str, str]] = None, **kwargs: Any) -> Any:
        kwargs.setdefault("ping_interval", None)
        kwargs.setdefault("max_size", None)
        return connect(self.url(path), additional_headers=GOOD if headers is None else headers, **kwargs)

    def log_lines(self) -> List[Dict[str, Any]]:
        self.metrics.access_log.flush()
        with open(self.log_path) as f:
            return [json.loads(line) for line in f]

    async def stop(self) -> None:
        self.gateway.tunnels.close_all()
        await self.port.stopListening()
        await self.gateway.close()
        self.metrics.access_log.close()


@async_yield_fixture
async def env(reactor: Any, tmp_path: Any) -> AsyncIterator[Env]:
    loop = Loop(reactor)
    echo = EchoServer()
    await loop.run(echo.start())
    environment = Env(reactor, loop, echo, tmp_path)
    await environment.start()
    try:
        yield environment
    finally:
        await environment.stop()
        await loop.run(echo.stop())
        loop.stop()


async def wait_for(reactor: Any, condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await sleep(reactor, 0.01)


# ---------------------------------------------------------------------------
# Tests


@ensureDeferred
async def test_echo_of_text_and_binary_frames(env: Env) -> None:
    async def talk() -> Tuple[Any, Any]:
        async with env.connect("/ws/chat?room=1") as ws:
            await ws.send("hello, tunnel")
            text = await ws.recv()
            await ws.send(bytes(range(256)) * 4)
            binary = await ws.recv()
            return text, binary

    text, binary = await env.loop.run(talk())
    assert text == "hello, tunnel"
    assert binary == bytes(range(256)) * 4
    # Auth first, its upstream_headers applied; the path and query kept.
    assert len(env.auth.calls) == 1
    path, headers = env.echo.handshakes[-1]
    assert path == "/ws/chat?room=1"
    assert headers["x-user-id"] == "alice"
    assert headers["upgrade"].lower() == "websocket"
    assert "upgrade" in headers["connection"].lower()
    assert headers["x-forwarded-for"] == "127.0.0.1"


@ensureDeferred
async def test_denied_upgrade_never_reaches_the_upstream(env: Env) -> None:
    async def denied() -> Any:
        try:
            async with env.connect(headers={"Authorization": "Bearer bad"}):
                return None
        except websockets.InvalidStatus as e:
            return e.response

    response = await env.loop.run(denied())
    assert response.status_code == 403
    assert response.body == b"no"
    assert env.echo.handshakes == []
    assert env.gateway.tunnels.count == 0


@ensureDeferred
async def test_without_enable_websocket_upgrade_headers_are_dropped(env: Env) -> None:
    async def plain() -> Any:
        try:
            async with env.connect("/plain"):
                return None
        except websockets.InvalidStatus as e:
            return e.response

    response = await env.loop.run(plain())
    # The upstream saw a plain GET (no Upgrade) and refused it as not a WebSocket.
    assert response.status_code in (400, 426)
    path, headers = env.echo.handshakes[-1]
    assert "upgrade" not in headers
    assert "upgrade" not in headers.get("connection", "").lower()


@ensureDeferred
async def test_metrics_and_one_access_log_line_when_the_tunnel_closes(env: Env, reactor: Any) -> None:
    opened = Deferred()  # type: ignore[var-annotated]
    release = threading.Event()

    async def session() -> None:
        async with env.connect() as ws:
            await ws.send(os.urandom(1000))  # incompressible (permessage-deflate)
            await ws.recv()
            reactor.callFromThread(opened.callback, None)
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 5)

    done = env.loop.run(session())
    await opened
    route = env.metrics.route("ws")
    assert (route.upgrades, route.tunnels) == (1, 1)
    assert env.gateway.tunnels.count == 1
    assert env.log_lines() == []  # nothing logged while it is open
    exposition = env.metrics.exposition()[0].decode()
    assert 'fauth_websocket_tunnels{route="ws"} 1.0' in exposition
    release.set()
    await done
    await wait_for(reactor, lambda: env.gateway.tunnels.count == 0)
    assert (route.upgrades, route.tunnels) == (1, 0)
    assert route.statuses == {101: 1}
    [line] = env.log_lines()
    assert line["status"] == 101 and line["upgrade"] == "websocket"
    assert line["user"] == "alice" and line["route"] == "ws"
    assert line["bytes_up"] > 1000 and line["bytes"] > 1000
    assert line["duration_ms"] > 0


@ensureDeferred
async def test_a_50_mib_message_streams_with_flat_rss(env: Env, reactor: Any) -> None:
    size = 50 * MiB
    fragment = b"\xab" * (64 * 1024)

    def rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def buffered() -> int:
        # What the gateway holds for the tunnel: the two sockets' pending
        # output (Twisted's FileDescriptor buffers).
        total = 0
        for tunnel in list(env.gateway.tunnels._open):
            for transport in (tunnel._client, tunnel._up):
                if transport is not None:
                    total += len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        return total

    peak = [rss()]
    baseline = peak[0]
    most_buffered = [0]

    def sample() -> None:
        peak[0] = max(peak[0], rss())
        most_buffered[0] = max(most_buffered[0], buffered())

    sampler = LoopingCall(sample)
    sampler.start(0.01)

    async def transfer() -> int:
        # Uncompressed: the 50 MiB cross the gateway as they are.
        async with env.connect(write_limit=256 * 1024, compression=None) as ws:

            async def fragments() -> AsyncIterator[bytes]:
                for _ in range(size // len(fragment)):
                    yield fragment

            sending = asyncio.ensure_future(ws.send(fragments()))
            received = 0
            async for part in ws.recv_streaming():
                received += len(part)
            await sending
            return received

    try:
        received = await env.loop.run(transfer())
    finally:
        sampler.stop()
    assert received == size
    # Backpressure: the gateway never holds more than a socket buffer's worth.
    assert most_buffered[0] < 2 * MiB, "the gateway buffered %d bytes" % most_buffered[0]
    # Client, echo server and gateway share this process: none holds the
    # message (about 2 MiB of growth measured; 50 if one of them did).  On
    # CPython only: PyPy's collector frees the garbage of 3 x 100 MiB of
    # traffic late (its RSS grows by about 140 MiB while it runs).
    if platform.python_implementation() == "CPython":
        assert peak[0] - baseline < 16 * MiB, "RSS grew by %d MiB" % ((peak[0] - baseline) // MiB)


@ensureDeferred
async def test_100_concurrent_tunnels(env: Env, reactor: Any) -> None:
    count = 100
    all_open = Deferred()  # type: ignore[var-annotated]
    release = threading.Event()

    async def many() -> List[str]:
        barrier = asyncio.Event()
        opened = [0]

        async def one(i: int) -> str:
            async with env.connect("/ws/%d" % i) as ws:
                await ws.send("n%d" % i)
                reply = await ws.recv()
                opened[0] += 1
                if opened[0] == count:
                    reactor.callFromThread(all_open.callback, None)
                    await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)
                    barrier.set()
                await barrier.wait()
                await ws.send("again%d" % i)
                return str(reply) + "/" + str(await ws.recv())

        return await asyncio.gather(*[one(i) for i in range(count)])

    done = env.loop.run(many())
    await all_open
    assert env.gateway.tunnels.count == count
    release.set()
    replies = await done
    assert replies == ["n%d/again%d" % (i, i) for i in range(count)]
    await wait_for(reactor, lambda: env.gateway.tunnels.count == 0)
    assert env.metrics.route("ws").upgrades == count


@ensureDeferred
async def test_idle_tunnel_closes_after_the_read_timeout(env: Env, reactor: Any) -> None:
    await env.port.stopListening()
    await env.start(read_timeout=0.3)

    async def idle() -> float:
        async with env.connect() as ws:
            await ws.send("ping")
            await ws.recv()
            started = time.monotonic()
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            return time.monotonic() - started

    waited = await env.loop.run(idle())
    assert 0.2 < waited < 3
    await wait_for(reactor, lambda: env.gateway.tunnels.count == 0)


@ensureDeferred
async def test_a_busy_tunnel_outlives_the_read_timeout(env: Env, reactor: Any) -> None:
    await env.port.stopListening()
    await env.start(read_timeout=0.3)

    async def busy() -> int:
        async with env.connect() as ws:
            for i in range(8):  # 0.8 s in all, never 0.3 s quiet
                await ws.send(str(i))
                await ws.recv()
                await asyncio.sleep(0.1)
            return 8

    assert await env.loop.run(busy()) == 8


# ---------------------------------------------------------------------------
# Raw sockets: half-close, a non-101 answer, drain


@implementer(IHalfCloseableProtocol)
class _RawUpstream(Protocol):
    """Answers 101, echoes; on the client's end of input writes "bye" and closes."""

    def connectionMade(self) -> None:
        self.head = b""
        self.switched = False

    def dataReceived(self, data: bytes) -> None:
        if not self.switched:
            self.head += data
            if b"\r\n\r\n" in self.head:
                self.switched = True
                _, _, rest = self.head.partition(b"\r\n\r\n")
                self.transport.write(  # type: ignore[union-attr]
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                )
                if rest:
                    self.transport.write(rest)  # type: ignore[union-attr]
            return
        self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.transport.write(b"bye")  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class _RawClient(Protocol):
    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = b""
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(self.received)


UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: example\r\nAuthorization: Bearer good\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


async def _raw_env(
    reactor: Any, tmp_path: Any, upstream: Protocol, read: float = 6, dead: Optional[int] = None
) -> Tuple[Any, Any, Any]:
    """C{dead}: a port nothing listens on, as the upstream's primary node (the live one its backup)."""
    factory = Factory.forProtocol(lambda: upstream)
    up_port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    nodes: Any = {"127.0.0.1:%d" % up_port.getHost().port: 1}
    if dead is not None:
        nodes = [
            {"host": "127.0.0.1", "port": dead, "weight": 1, "priority": 1},
            {"host": "127.0.0.1", "port": up_port.getHost().port, "weight": 1},
        ]
    auth = StubAuthService(tokens={"Bearer good": {"X-User-ID": "alice"}})
    fa = {"uri": "http://stub-auth/auth", "request_headers": ["Authorization"], "upstream_headers": ["X-User-ID"]}
    conf = parse_config(
        {
            "routes": [
                {
                    "id": "ws",
                    "uri": "/ws",
                    "enable_websocket": True,
                    "plugins": {"forward-auth": fa},
                    "upstream": {
                        "nodes": nodes,
                        "timeout": {"connect": 2, "send": 2, "read": read},
                    },
                }
            ]
        }
    )
    gateway = Gateway(reactor, conf, auth_clients=auth.clients())
    site = GatewaySite(GatewayResource(gateway), conf.http, reactor=reactor)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    return up_port, port, gateway


@ensureDeferred
async def test_half_close_is_respected_both_ways(reactor: Any, tmp_path: Any) -> None:
    up_port, port, gateway = await _raw_env(reactor, tmp_path, _RawUpstream())
    try:
        client = _RawClient(UPGRADE)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(Factory.forProtocol(lambda: client))
        await wait_for(reactor, lambda: b"\r\n\r\n" in client.received)
        assert client.received.startswith(b"HTTP/1.1 101 ")
        client.transport.write(b"some bytes")  # type: ignore[union-attr]
        await wait_for(reactor, lambda: client.received.endswith(b"some bytes"))
        # The client's end of input reaches the upstream as one; the upstream
        # still answers after it, and its close ends the tunnel.
        client.transport.loseWriteConnection()  # type: ignore[union-attr]
        received = await client.done
        assert received.endswith(b"some bytesbye")
        await wait_for(reactor, lambda: gateway.tunnels.count == 0)
    finally:
        await port.stopListening()
        await up_port.stopListening()
        await gateway.close()


class _NotAWebSocket(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 5\r\nX-Why: old\r\n\r\nnope!"
        )


@ensureDeferred
async def test_an_answer_other_than_101_is_relayed_as_a_response(reactor: Any, tmp_path: Any) -> None:
    up_port, port, gateway = await _raw_env(reactor, tmp_path, _NotAWebSocket())
    try:
        client = _RawClient(UPGRADE.replace(b"Connection: Upgrade", b"Connection: Upgrade, close"))
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(Factory.forProtocol(lambda: client))
        received = await client.done
        assert received.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
        assert b"X-Why: old" in received and received.endswith(b"\r\n\r\nnope!")
        assert gateway.tunnels.count == 0
    finally:
        await port.stopListening()
        await up_port.stopListening()
        await gateway.close()


@ensureDeferred
async def test_drain_closes_tunnels_at_the_end_of_the_grace(reactor: Any, tmp_path: Any) -> None:
    from tests.adminenv import start_admin_env

    factory = Factory.forProtocol(_RawUpstream)
    up_port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    route = {"id": "ws", "uri": "/ws", "enable_websocket": True, "upstream": {"nodes": {"127.0.0.1:%d" % up_port.getHost().port: 1}}}
    env = await start_admin_env(reactor, tmp_path, {"routes": [route]})
    try:
        port = int(env.gateway_url.rsplit(":", 1)[1])
        client = _RawClient(UPGRADE)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: client))
        await wait_for(reactor, lambda: client.received.startswith(b"HTTP/1.1 101 "))
        started = time.monotonic()
        assert await env.service.drain(0.3) is False
        assert 0.25 < time.monotonic() - started < 2
        await client.done  # closed by the gateway
        assert env.service.gateway.tunnels.count == 0
        assert env.service.resource.in_flight.count == 0
    finally:
        await env.stop()
        await up_port.stopListening()


@ensureDeferred
async def test_bytes_after_a_refused_upgrade_are_parsed_as_http_through_auth(reactor: Any, tmp_path: Any) -> None:
    # A client that pipelines a request behind its upgrade: the upstream
    # refused the upgrade, so those bytes are a new request for the gateway
    # (auth first), never raw bytes for the upstream.
    up_port, port, gateway = await _raw_env(reactor, tmp_path, _NotAWebSocket())
    try:
        smuggled = b"GET /ws HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n"
        client = _RawClient(UPGRADE + smuggled)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(Factory.forProtocol(lambda: client))
        received = await client.done
        assert received.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
        assert b"\r\n\r\nnope!HTTP/1.1 403 " in received  # the second request, denied by the auth service
        assert gateway.tunnels.count == 0
    finally:
        await port.stopListening()
        await up_port.stopListening()
        await gateway.close()


@ensureDeferred
async def test_an_unreachable_upstream_answers_502(reactor: Any, tmp_path: Any) -> None:
    up_port, port, gateway = await _raw_env(reactor, tmp_path, _NotAWebSocket())
    await up_port.stopListening()  # nothing listens there any more
    try:
        client = _RawClient(UPGRADE.replace(b"Connection: Upgrade", b"Connection: Upgrade, close"))
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(Factory.forProtocol(lambda: client))
        received = await client.done
        assert received.startswith(b"HTTP/1.1 502 ")
        assert gateway.tunnels.count == 0
    finally:
        await port.stopListening()
        await gateway.close()


@ensureDeferred
async def test_an_upgrade_goes_to_the_backup_node_when_the_primary_refuses(reactor: Any, tmp_path: Any) -> None:
    closed = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
    dead = closed.getHost().port
    await closed.stopListening()
    up_port, port, gateway = await _raw_env(reactor, tmp_path, _RawUpstream(), dead=dead)
    try:
        client = _RawClient(UPGRADE + b"ping")
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(Factory.forProtocol(lambda: client))
        await wait_for(reactor, lambda: client.received.endswith(b"ping"))
        assert client.received.startswith(b"HTTP/1.1 101 ")
        client.transport.loseWriteConnection()  # type: ignore[union-attr]
        assert (await client.done).endswith(b"pingbye")
    finally:
        await port.stopListening()
        await up_port.stopListening()
        await gateway.close()


@ensureDeferred
async def test_wss_on_a_tls_listener_with_http2_on(env: Env, reactor: Any, tmp_path: Any) -> None:
    # With http2 on, a TLS connection's protocol is Twisted's negotiating
    # wrapper around the HTTP/1.1 channel; a WebSocket client (ALPN: none,
    # so HTTP/1.1) still gets its tunnel through it.
    pytest.importorskip("h2")
    import ssl

    from twisted.internet.endpoints import serverFromString

    from tests.tls import self_signed

    key, cert = self_signed(tmp_path)
    conf = parse_config(
        {
            "http": {"http2": True},
            "routes": [
                {
                    "id": "ws",
                    "uri": "/ws",
                    "enable_websocket": True,
                    "upstream": {"nodes": {"127.0.0.1:%d" % env.echo.port: 1}},
                }
            ],
        }
    )
    gateway = Gateway(reactor, conf)
    site = GatewaySite(GatewayResource(gateway), conf.http, reactor=reactor)
    port = await serverFromString(reactor, "ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s" % (key, cert)).listen(site)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    async def talk() -> Any:
        url = "wss://127.0.0.1:%d/ws" % port.getHost().port
        async with connect(url, ssl=context, ping_interval=None) as ws:
            await ws.send("over tls")
            return await ws.recv()

    try:
        assert await env.loop.run(talk()) == "over tls"
        await wait_for(reactor, lambda: gateway.tunnels.count == 0)
    finally:
        gateway.tunnels.close_all()
        await port.stopListening()
        await gateway.close()
