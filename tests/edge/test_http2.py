"""
HTTP/2 for clients on C{ssl:} listeners (C{http: {http2: true}},
L{fauth.edge.h2}): ALPN, the same routes and forward-auth per stream
(C{httpx[http2]} as the client), and the known floods against the gateway
with a raw HTTP/2 client (C{hyperframe} and C{hpack}, the frame and header
layers of the C{h2} package): each closes the offending connection and
leaves the others alone.
"""
from __future__ import annotations

import socket
import ssl
import time
from typing import Any, AsyncIterator, List, Optional, Tuple

import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource

from fauth.config import parse_config
from fauth.edge.gateway import Gateway
from fauth.edge.resources import GatewayResource, GatewaySite
from fauth.testing import StubAuthService
from tests.servers import listen_on_loopback
from tests.tls import self_signed

h2 = pytest.importorskip("h2")  # installed by the test extra everywhere (twisted[http2])
import httpx  # noqa: E402
from hpack import Encoder  # noqa: E402
from hyperframe.frame import (  # noqa: E402
    ContinuationFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"




class Echo(Resource):
    """The upstream: says what it got."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        body = request.content.read()
        user = request.getHeader(b"x-user-id") or b"-"
        return b"%s %s user=%s body=%d" % (request.method, request.uri, user, len(body))


class Env:
    def __init__(self, port: Any, gateway: Gateway, auth: StubAuthService, upstream: Any) -> None:
        self.port = port
        self.gateway = gateway
        self.auth = auth
        self.upstream = upstream

    @property
    def port_number(self) -> int:
        return int(self.port.getHost().port)

    def url(self, path: str) -> str:
        return "https://localhost:%d%s" % (self.port_number, path)


async def _start(reactor: Any, tmp_path: Any, http: Optional[dict] = None) -> Env:
    upstream = await listen_on_loopback(reactor, Echo())
    auth = StubAuthService(tokens={"Bearer good": {"X-User-ID": "alice"}}, deny=(403, (), b"no"))
    conf = parse_config(
        {
            "http": http if http is not None else {"http2": True, "max_concurrent_streams": 10},
            "routes": [
                {
                    "id": "h",
                    "uri": "/h*",
                    "plugins": {"forward-auth": {"uri": "http://stub/auth", "request_headers": ["Authorization"], "upstream_headers": ["X-User-ID"]}},
                    "upstream": {"nodes": {"127.0.0.1:%d" % upstream.getHost().port: 1}},
                }
            ],
        }
    )
    gateway = Gateway(reactor, conf, auth_clients=auth.clients())
    site = GatewaySite(GatewayResource(gateway), conf.http, reactor=reactor)
    key, cert = self_signed(tmp_path)
    port = await serverFromString(
        reactor, "ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s" % (key, cert)
    ).listen(site)
    return Env(port, gateway, auth, upstream)


@async_yield_fixture
async def env(reactor: Any, tmp_path: Any) -> AsyncIterator[Env]:
    environment = await _start(reactor, tmp_path)
    try:
        yield environment
    finally:
        await environment.port.stopListening()
        await environment.upstream.stopListening()
        await environment.gateway.close()


def _client(http2: bool = True) -> httpx.Client:
    return httpx.Client(http2=http2, verify=False, timeout=10)


GOOD = {"Authorization": "Bearer good"}


# ---------------------------------------------------------------------------
# Requests


@ensureDeferred
async def test_get_post_and_a_denial_over_http2(env: Env) -> None:
    def talk() -> List[Tuple[str, int, bytes]]:
        with _client() as client:
            out = []
            for method, path, headers, body in [
                ("GET", "/h/a?x=1", GOOD, None),
                ("POST", "/h/upload", GOOD, b"z" * 100000),
                ("GET", "/h/a", {"Authorization": "Bearer bad", "X-User-ID": "mallory"}, None),
            ]:
                r = client.request(method, env.url(path), headers=headers, content=body)
                out.append((r.http_version, r.status_code, r.content))
            return out

    replies = await deferToThread(talk)
    assert replies == [
        ("HTTP/2", 200, b"GET /h/a?x=1 user=alice body=0"),
        ("HTTP/2", 200, b"POST /h/upload user=alice body=100000"),
        ("HTTP/2", 403, b"no"),
    ]
    assert len(env.auth.calls) == 3


@ensureDeferred
async def test_http11_on_the_same_listener(env: Env) -> None:
    def talk() -> Tuple[str, int, bytes]:
        with _client(http2=False) as client:
            r = client.get(env.url("/h/b"), headers=GOOD)
            return r.http_version, r.status_code, r.content

    assert await deferToThread(talk) == ("HTTP/1.1", 200, b"GET /h/b user=alice body=0")


@ensureDeferred
async def test_http2_is_off_by_default(reactor: Any, tmp_path: Any) -> None:
    environment = await _start(reactor, tmp_path, http={})
    try:
        assert await deferToThread(_alpn, environment.port_number) == "http/1.1"

        def talk() -> Tuple[str, int]:
            with _client() as client:
                r = client.get(environment.url("/h/c"), headers=GOOD)
                return r.http_version, r.status_code

        assert await deferToThread(talk) == ("HTTP/1.1", 200)
    finally:
        await environment.port.stopListening()
        await environment.upstream.stopListening()
        await environment.gateway.close()


def _alpn(port: int) -> Optional[str]:
    raw = _tls(port)
    try:
        return raw.selected_alpn_protocol()
    finally:
        raw.close()


# ---------------------------------------------------------------------------
# Floods, with a raw client


def _tls(port: int) -> ssl.SSLSocket:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(sock, server_hostname="localhost")


def _request_block(encoder: Encoder, path: str = "/h/flood", extra: Optional[List[Tuple[str, str]]] = None) -> bytes:
    headers = [(":method", "GET"), (":scheme", "https"), (":authority", "localhost"), (":path", path)]
    return bytes(encoder.encode(headers + (extra or [])))


def _flood(port: int, frames: Any) -> Tuple[str, float]:
    """
    Send the preface and C{frames} (an iterable of L{Frame}s), then read
    until the gateway closes; how it ended and how long it took.
    """
    sock = _tls(port)
    assert sock.selected_alpn_protocol() == "h2"
    started = time.monotonic()
    try:
        sock.sendall(PREFACE + SettingsFrame(0).serialize())
        batch: List[bytes] = []
        try:
            for frame in frames:
                batch.append(frame.serialize())
                if len(batch) >= 100:
                    sock.sendall(b"".join(batch))
                    batch = []
            sock.sendall(b"".join(batch))
        except socket.timeout:
            return "still open (send blocked)", time.monotonic() - started
        except (ConnectionError, ssl.SSLError, OSError):
            return "closed while sending", time.monotonic() - started
        sock.settimeout(5)
        while True:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                return "still open", time.monotonic() - started
            except (ConnectionError, ssl.SSLError, OSError):
                return "closed", time.monotonic() - started
            if not data:
                return "closed", time.monotonic() - started
    finally:
        sock.close()


async def _still_serves(env: Env) -> None:
    def talk() -> Tuple[str, int]:
        with _client() as client:
            r = client.get(env.url("/h/ok"), headers=GOOD)
            return r.http_version, r.status_code

    assert await deferToThread(talk) == ("HTTP/2", 200)


@ensureDeferred
async def test_rapid_reset_closes_the_connection(env: Env) -> None:
    encoder = Encoder()

    def frames() -> Any:
        for i in range(500):
            stream = 1 + 2 * i
            # Opened and cancelled at once (the request is still coming:
            # no END_STREAM, so the stream is open when the reset arrives).
            yield HeadersFrame(stream, data=_request_block(encoder), flags=["END_HEADERS"])
            yield RstStreamFrame(stream, error_code=8)  # CANCEL

    how, took = await deferToThread(_flood, env.port_number, frames())
    assert how.startswith("closed") and took < 10
    await _still_serves(env)


@ensureDeferred
async def test_too_many_concurrent_streams_close_the_connection(env: Env) -> None:
    encoder = Encoder()
    # Streams left open (no END_STREAM): more than the 10 allowed here.
    frames = [HeadersFrame(1 + 2 * i, data=_request_block(encoder), flags=["END_HEADERS"]) for i in range(30)]
    how, _ = await deferToThread(_flood, env.port_number, frames)
    assert how.startswith("closed")
    await _still_serves(env)


@ensureDeferred
async def test_continuation_flood_closes_the_connection(env: Env) -> None:
    encoder = Encoder()
    block = _request_block(encoder)

    def frames() -> Any:
        yield HeadersFrame(1, data=block, flags=[])  # no END_HEADERS: continuations follow
        for i in range(300):  # h2 gives up after 64
            yield ContinuationFrame(1, data=b"\x00\x01a\x01b" * 1000)

    how, took = await deferToThread(_flood, env.port_number, frames())
    assert how.startswith("closed") and took < 10
    await _still_serves(env)


@ensureDeferred
async def test_a_header_list_over_the_limit_closes_the_connection(env: Env) -> None:
    encoder = Encoder()
    big = _request_block(encoder, extra=[("x-big", "v" * 20000)])  # max_header_bytes: 16384
    chunks = [big[i : i + 16000] for i in range(0, len(big), 16000)]
    frames: List[Frame] = [HeadersFrame(1, data=chunks[0], flags=["END_STREAM"] + (["END_HEADERS"] if len(chunks) == 1 else []))]
    for n, chunk in enumerate(chunks[1:], 2):
        frames.append(ContinuationFrame(1, data=chunk, flags=["END_HEADERS"] if n == len(chunks) else []))
    how, _ = await deferToThread(_flood, env.port_number, frames)
    assert how.startswith("closed")
    await _still_serves(env)


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_control_frame_flood_from_a_client_that_does_not_read(kind: str) -> None:
    # A client that sends PINGs (or SETTINGS) and never reads their
    # acknowledgements: once the transport is full (paused), the buffered
    # answers are capped and the connection is aborted.
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from fauth.config import HttpLimits
    from fauth.edge.h2 import HardenedH2Connection

    connection = HardenedH2Connection(HttpLimits(http2=True), Clock())
    transport = StringTransport()
    connection.makeConnection(transport)
    transport.registerProducer(connection, True)  # as the listener's protocol does
    connection.pauseProducing()  # what a full transport does
    frame = PingFrame(0, opaque_data=b"12345678") if kind == "ping" else SettingsFrame(0)
    connection.dataReceived(PREFACE + SettingsFrame(0).serialize() + frame.serialize() * 5000)
    assert transport.disconnecting or getattr(transport, "aborting", False) or transport.disconnected


@ensureDeferred
async def test_rapid_reset_of_complete_requests_closes_the_connection_cleanly(env: Env) -> None:
    # The classic form: each request complete (END_STREAM) and cancelled at
    # once.  Requests the client sent behind the one that tripped the limit
    # are not served on the closed connection, and nothing fails noisily.
    from fauth.testing import LogCapture

    encoder = Encoder()

    def frames() -> Any:
        for i in range(2000):
            stream = 1 + 2 * i
            yield HeadersFrame(stream, data=_request_block(encoder), flags=["END_HEADERS", "END_STREAM"])
            yield RstStreamFrame(stream, error_code=8)

    with LogCapture() as logs:
        how, took = await deferToThread(_flood, env.port_number, frames())
    assert how.startswith("closed") and took < 10
    assert not [e for e in logs.events if e.get("log_failure") is not None or e.get("isError")], logs.lines[:5]
    await _still_serves(env)
