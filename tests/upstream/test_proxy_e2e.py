"""
End-to-end tests of the upstream leg (``fauth.proxy``): a real gateway on
loopback in front of real upstream servers written in Twisted.

Covered: connection pooling, smooth weighted round-robin, https upstreams
with a private CA, ``pass_host``, the three timeouts, hop-by-hop headers and
``X-Forwarded-*``, body framing (Content-Length, HEAD, 204, 304, large and
chunked uploads, the forward-auth POST body), backpressure from a slow client
to the upstream, and a client that goes away mid-download.
"""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import time
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Tuple

import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer

from fauth.routing.balancer import SmoothWeightedRoundRobin
from fauth.config import Node
from fauth.process.demo import quiet_site
from tests.harness import GatewayUnderTest, LogCapture, raw_request, start_gateway
from tests.servers import listen_on_loopback

MiB = 1024 * 1024
CHUNK = 64 * 1024


@pytest.fixture
def reactor() -> Any:
    """The reactor pytest-twisted installed (imported late, never at module level)."""
    from twisted.internet import reactor as installed

    return installed


def sleep(reactor: Any, seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


# ---------------------------------------------------------------------------
# Parsing what the client receives


class Reply:
    """One HTTP response as the client got it on the wire."""

    def __init__(self, raw: bytes) -> None:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, "no complete response head in %r" % (raw[:200],)
        lines = head.split(b"\r\n")
        self.status_line = lines[0]
        self.status = int(lines[0].split(b" ")[1])
        self.headers: List[Tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers.append((name.strip().lower(), value.strip()))
        self.raw_body = rest
        if self.values(b"transfer-encoding") == [b"chunked"]:
            self.body = dechunk(rest)
        else:
            self.body = rest

    def values(self, name: bytes) -> List[bytes]:
        return [v for n, v in self.headers if n == name]

    def first(self, name: bytes) -> Optional[bytes]:
        found = self.values(name)
        return found[0] if found else None

    def names(self) -> List[bytes]:
        return [n for n, _ in self.headers]


def dechunk(data: bytes) -> bytes:
    out = []
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        assert sep, "truncated chunked body"
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(data[:size])
        assert data[size : size + 2] == b"\r\n"
        data = data[size + 2 :]


async def fetch(reactor: Any, port: int, payload: bytes) -> Reply:
    """One request with the connection closed by the server when done."""
    return Reply(await raw_request(reactor, port, payload, timeout=10.0))


class _OneResponse(Protocol):
    """
    Sends raw bytes and collects exactly one response framed by
    Content-Length, then hangs up (for keep-alive requests, where
    ``raw_request`` would wait for a close that never comes).
    """

    def __init__(self, payload: bytes, done: Deferred) -> None:
        self._payload = payload
        self._buffer = b""
        self._done = done

    def connectionMade(self) -> None:
        self.transport.write(self._payload)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        head, sep, body = self._buffer.partition(b"\r\n\r\n")
        if not sep or self._done.called:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(body) >= length:
            self._done.callback(self._buffer)
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if not self._done.called:
            self._done.callback(self._buffer)


async def fetch_keepalive(reactor: Any, port: int, payload: bytes) -> Reply:
    done: Deferred = Deferred()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await endpoint.connect(Factory.forProtocol(lambda: _OneResponse(payload, done)))
    done.addTimeout(10, reactor)
    return Reply(await done)


def get(path: str, host: str = "gw.test", extra: bytes = b"", method: str = "GET") -> bytes:
    return (
        b"%s %s HTTP/1.1\r\nHost: %s\r\n%sConnection: close\r\n\r\n"
        % (method.encode(), path.encode(), host.encode(), extra)
    )


# ---------------------------------------------------------------------------
# Upstream servers


class Seen:
    """What an upstream server received for one request."""

    def __init__(self, request: Any) -> None:
        self.method: bytes = request.method
        self.uri: bytes = request.uri
        self.headers: Dict[bytes, List[bytes]] = {
            name.lower(): list(values) for name, values in request.requestHeaders.getAllRawHeaders()
        }
        request.content.seek(0)
        body = request.content.read()
        self.length = len(body)
        self.sha256 = hashlib.sha256(body).hexdigest()

    def header(self, name: bytes) -> Optional[bytes]:
        values = self.headers.get(name)
        return values[0] if values else None


class Recorder(Resource):
    """Records every request; answers with C{respond(request)} (default: its name)."""

    isLeaf = True

    def __init__(self, name: bytes = b"up", respond: Optional[Callable[[Any], bytes]] = None) -> None:
        super().__init__()
        self.name = name
        self.seen: List[Seen] = []
        self._respond = respond

    def render(self, request: Any) -> bytes:
        self.seen.append(Seen(request))
        if self._respond is not None:
            return self._respond(request)
        request.setHeader(b"content-type", b"text/plain")
        return self.name


class _Canned(Protocol):
    """Raw upstream: records each request head, answers with fixed bytes, keeps the connection."""

    def __init__(self, heads: List[bytes], response: bytes) -> None:
        self._heads = heads
        self._response = response
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\r\n\r\n" in self._buffer:
            head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
            self._heads.append(head)
            self.transport.write(self._response)


class _Silent(Protocol):
    """Accepts and never answers."""

    def __init__(self, connections: List[Any]) -> None:
        self._connections = connections

    def connectionMade(self) -> None:
        self._connections.append(self.transport)


def head_values(head: bytes, name: bytes) -> List[bytes]:
    """Values of C{name} in a raw request head, one entry per line."""
    out = []
    for line in head.split(b"\r\n")[1:]:
        n, _, v = line.partition(b":")
        if n.strip().lower() == name:
            out.append(v.strip())
    return out


@implementer(IPushProducer)
class Streamer:
    """
    Serves C{total} bytes in 64 KiB chunks as a push producer that honours
    pauseProducing; counts what it produced and how it ended.
    """

    def __init__(self, reactor: Any, request: Any, total: int) -> None:
        self._reactor = reactor
        self._request = request
        self.total = total
        self.produced = 0
        self.paused = False
        self.pauses = 0
        self.stopped = False
        self.finished = False
        self.halted: Deferred = Deferred()  # stopProducing or connection lost
        self._call: Any = None

    def start(self) -> None:
        self._request.setHeader(b"content-type", b"application/octet-stream")
        self._request.setHeader(b"content-length", b"%d" % self.total)
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self._halt())
        self._schedule()

    def _halt(self) -> None:
        self.stopped = True
        if not self.halted.called:
            self.halted.callback(self.produced)

    def _schedule(self) -> None:
        if self._call is None or not self._call.active():
            self._call = self._reactor.callLater(0, self._produce)

    def _produce(self) -> None:
        chunk = b"x" * CHUNK
        for _ in range(16):
            if self.paused or self.stopped or self.finished:
                return
            if self.produced >= self.total:
                self.finished = True
                self._request.unregisterProducer()
                self._request.finish()
                return
            size = min(CHUNK, self.total - self.produced)
            self.produced += size
            self._request.write(chunk if size == CHUNK else chunk[:size])
        self._schedule()

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self._halt()

    def cancel(self) -> None:
        self.stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()


class StreamingUpstream(Resource):
    isLeaf = True

    def __init__(self, reactor: Any, total: int) -> None:
        super().__init__()
        self._reactor = reactor
        self._total = total
        self.streams: List[Streamer] = []
        self.started: Deferred = Deferred()

    def render_GET(self, request: Any) -> Any:
        stream = Streamer(self._reactor, request, self._total)
        self.streams.append(stream)
        stream.start()
        if not self.started.called:
            self.started.callback(stream)
        return server.NOT_DONE_YET


class SlowReader(Protocol):
    """
    A download client: sends one request, counts body bytes, and stops
    reading from its socket after the first chunk when C{pause_first}.
    """

    def __init__(self, payload: bytes, pause_first: bool) -> None:
        self._payload = payload
        self._pause_first = pause_first
        self._head = b""
        self.head: Optional[bytes] = None
        self.body_bytes = 0
        self.expected: Optional[int] = None
        self.first_data: Deferred = Deferred()
        self.complete: Deferred = Deferred()
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._payload)

    def dataReceived(self, data: bytes) -> None:
        if self.head is None:
            self._head += data
            head, sep, rest = self._head.partition(b"\r\n\r\n")
            if not sep:
                return
            self.head = head
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    self.expected = int(value)
            data = rest
        self.body_bytes += len(data)
        if not self.first_data.called:
            if self._pause_first:
                self.transport.pauseProducing()
            self.first_data.callback(None)
        if self.expected is not None and self.body_bytes >= self.expected and not self.complete.called:
            self.complete.callback(self.body_bytes)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.complete.called:
            self.complete.callback(self.body_bytes)
        self.lost.callback(None)


# ---------------------------------------------------------------------------
# The test stack: every server started is stopped at teardown


class Stack:
    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._ports: List[Any] = []
        self._gateways: List[GatewayUnderTest] = []
        self._transports: List[Any] = []
        self._streams: List[Streamer] = []

    async def upstream(self, resource: Any) -> int:
        port = await listen_on_loopback(self.reactor, resource)
        self._ports.append(port)
        return port.getHost().port

    async def listen_factory(self, factory: Any) -> int:
        port = await TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(factory)
        self._ports.append(port)
        return port.getHost().port

    async def listen_tls(self, resource: Any, options: Any) -> int:
        endpoint = SSL4ServerEndpoint(self.reactor, 0, options, interface="127.0.0.1")
        port = await endpoint.listen(quiet_site(resource, self.reactor))
        self._ports.append(port)
        return port.getHost().port

    def count_connections(self, port_number: int) -> List[int]:
        """Count connections accepted by one of our listening ports."""
        port = [p for p in self._ports if p.getHost().port == port_number][0]
        factory = port.factory
        original = factory.buildProtocol
        counter = [0]

        def build(addr: Any) -> Any:
            counter[0] += 1
            return original(addr)

        factory.buildProtocol = build
        return counter

    async def gateway(self, routes: List[Dict[str, Any]], **extra: Any) -> GatewayUnderTest:
        gw = await start_gateway(self.reactor, dict({"routes": routes}, **extra))
        self._gateways.append(gw)
        return gw

    def track(self, transport: Any) -> None:
        self._transports.append(transport)

    def track_streams(self, streams: List[Streamer]) -> None:
        self._streams = streams

    async def close(self) -> None:
        for stream in self._streams:
            stream.cancel()
        for transport in self._transports:
            transport.abortConnection()
        for gw in self._gateways:
            await gw.stop()
        for port in self._ports:
            await port.stopListening()
        # Let aborted connections finish closing before the next test.
        await sleep(self.reactor, 0.01)


@async_yield_fixture
async def stack(reactor: Any) -> AsyncIterator[Stack]:
    s = Stack(reactor)
    try:
        yield s
    finally:
        await s.close()


def route(
    rid: str, uri: str, nodes: Dict[str, int], plugins: Optional[Dict[str, Any]] = None, **upstream: Any
) -> Dict[str, Any]:
    doc: Dict[str, Any] = {
        "id": rid,
        "uri": uri,
        "upstream": dict({"type": "roundrobin", "nodes": nodes}, **upstream),
    }
    if plugins:
        doc["plugins"] = plugins
    return doc


def node(port: int) -> str:
    return "127.0.0.1:%d" % port


# ---------------------------------------------------------------------------
# Pooling and balancing


@ensureDeferred
async def test_sequential_requests_share_one_pooled_upstream_connection(reactor: Any, stack: Stack) -> None:
    upstream = Recorder()
    up = await stack.upstream(upstream)
    connections = stack.count_connections(up)
    gw = await stack.gateway([route("1", "/p/*", {node(up): 1})])
    for i in range(6):
        reply = await fetch(reactor, gw.port_number, get("/p/%d" % i))
        assert reply.status == 200
        assert reply.body == b"up"
    assert [s.uri for s in upstream.seen] == [b"/p/%d" % i for i in range(6)]
    assert connections[0] == 1


def test_smooth_weighted_round_robin_unit() -> None:
    a, b, c = Node("a", 1, 5), Node("b", 1, 1), Node("c", 1, 1)
    balancer = SmoothWeightedRoundRobin([a, b, c])
    picks = [balancer.pick().host for _ in range(14)]
    assert picks == list("aabacaa") * 2


@ensureDeferred
async def test_weighted_round_robin_across_two_real_nodes(reactor: Any, stack: Stack) -> None:
    first, second = Recorder(b"a"), Recorder(b"b")
    port_a = await stack.upstream(first)
    port_b = await stack.upstream(second)
    gw = await stack.gateway([route("1", "/w/*", {node(port_a): 2, node(port_b): 1})])
    sequence = []
    for _ in range(6):
        reply = await fetch(reactor, gw.port_number, get("/w/x"))
        assert reply.status == 200
        sequence.append(reply.body.decode())
    assert "".join(sequence) == "abaaba"
    assert (len(first.seen), len(second.seen)) == (4, 2)


# ---------------------------------------------------------------------------
# https upstreams


def _make_pki(directory: Any) -> Tuple[str, Any]:
    """A CA and a server certificate for IP 127.0.0.1; returns (CA path, server TLS options)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fauth test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = os.path.join(str(directory), "ca.pem")
    with open(ca_path, "wb") as f:
        f.write(ca_cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    options = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem).options()
    return ca_path, options


@ensureDeferred
async def test_https_upstream_verified_with_trusted_ca(reactor: Any, stack: Stack, tmp_path: Any) -> None:
    ca_path, options = _make_pki(tmp_path)
    upstream = Recorder(b"secure")
    up = await stack.listen_tls(upstream, options)
    gw = await stack.gateway(
        [route("1", "/s/*", {node(up): 1}, scheme="https")], ssl_trusted_certificate=ca_path
    )
    reply = await fetch(reactor, gw.port_number, get("/s/x"))
    assert reply.status == 200
    assert reply.body == b"secure"
    assert upstream.seen[0].uri == b"/s/x"


@ensureDeferred
async def test_https_upstream_with_untrusted_ca_is_502(reactor: Any, stack: Stack, tmp_path: Any) -> None:
    _, options = _make_pki(tmp_path)
    upstream = Recorder(b"secure")
    up = await stack.listen_tls(upstream, options)
    gw = await stack.gateway([route("1", "/s/*", {node(up): 1}, scheme="https")])
    with LogCapture() as logs:
        reply = await fetch(reactor, gw.port_number, get("/s/x"))
    assert reply.status == 502
    assert upstream.seen == []
    assert logs.contains("upstream %s failed: handshake failed" % node(up)), logs.lines
    assert logs.contains("certificate verify failed"), logs.lines


# ---------------------------------------------------------------------------
# pass_host


@ensureDeferred
async def test_pass_host_pass_node_and_rewrite(reactor: Any, stack: Stack) -> None:
    upstream = Recorder()
    up = await stack.upstream(upstream)
    gw = await stack.gateway(
        [
            route("1", "/pass/*", {node(up): 1}),
            route("2", "/node/*", {node(up): 1}, pass_host="node"),
            route("3", "/rewrite/*", {node(up): 1}, pass_host="rewrite", upstream_host="up.example"),
        ]
    )
    for path in ("/pass/x", "/node/x", "/rewrite/x"):
        reply = await fetch(reactor, gw.port_number, get(path, host="client.example:8080"))
        assert reply.status == 200
    hosts = [s.headers[b"host"] for s in upstream.seen]
    assert hosts == [[b"client.example:8080"], [node(up).encode()], [b"up.example"]]
    # X-Forwarded-Host is the client's host whatever pass_host says.
    assert {s.header(b"x-forwarded-host") for s in upstream.seen} == {b"client.example"}


# ---------------------------------------------------------------------------
# Timeouts and failures


@ensureDeferred
async def test_connection_refused_is_502(reactor: Any, stack: Stack) -> None:
    closed = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
    dead = closed.getHost().port
    await closed.stopListening()
    gw = await stack.gateway([route("1", "/r/*", {node(dead): 1})])
    with LogCapture() as logs:
        reply = await fetch(reactor, gw.port_number, get("/r/x"))
    assert reply.status == 502
    assert logs.contains("connection refused"), logs.lines


FAST_TIMEOUTS = {"connect": 1, "send": 0.3, "read": 0.3}


@ensureDeferred
async def test_upstream_that_never_answers_is_504_within_a_second(reactor: Any, stack: Stack) -> None:
    connections: List[Any] = []
    up = await stack.listen_factory(Factory.forProtocol(lambda: _Silent(connections)))
    gw = await stack.gateway([route("1", "/t/*", {node(up): 1}, timeout=FAST_TIMEOUTS)])
    started = time.monotonic()
    reply = await fetch(reactor, gw.port_number, get("/t/x"))
    elapsed = time.monotonic() - started
    for transport in connections:
        stack.track(transport)
    assert reply.status == 504
    # send + read = 0.6 s until the response head must have arrived.
    assert 0.5 <= elapsed < 1.5, elapsed
    assert len(connections) == 1


class _StallBody(Resource):
    """Promises 1000 bytes, sends 10, then stalls."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.lost: Deferred = Deferred()

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-length", b"1000")
        request.write(b"0123456789")
        request.notifyFinish().addBoth(lambda _: self.lost.callback(None))
        return server.NOT_DONE_YET


@ensureDeferred
async def test_body_stalled_beyond_read_timeout_aborts_the_client(reactor: Any, stack: Stack) -> None:
    upstream = _StallBody()
    up = await stack.upstream(upstream)
    gw = await stack.gateway([route("1", "/t/*", {node(up): 1}, timeout=FAST_TIMEOUTS)])
    started = time.monotonic()
    raw = await raw_request(reactor, gw.port_number, get("/t/x"), timeout=5.0)
    elapsed = time.monotonic() - started
    reply = Reply(raw)
    assert reply.status == 200
    assert reply.first(b"content-length") == b"1000"
    assert reply.body == b"0123456789"  # incomplete: the client can tell
    assert elapsed < 2.0, elapsed
    # The stalled upstream connection was closed too, not left in the pool.
    upstream.lost.addTimeout(2, reactor)
    await upstream.lost


# ---------------------------------------------------------------------------
# Headers


CANNED_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Length: 2\r\n"
    b"Connection: X-Up\r\n"
    b"X-Up: 1\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"Set-Cookie: a=1\r\n"
    b"Set-Cookie: b=2\r\n"
    b"X-Kept: yes\r\n"
    b"Proxy-Authenticate: Basic realm=up\r\n"
    b"\r\n"
    b"ok"
)


@ensureDeferred
async def test_hop_by_hop_headers_dropped_both_ways_and_forwarded_headers_set(
    reactor: Any, stack: Stack
) -> None:
    heads: List[bytes] = []
    up = await stack.listen_factory(Factory.forProtocol(lambda: _Canned(heads, CANNED_RESPONSE)))
    gw = await stack.gateway([route("1", "/h/*", {node(up): 1})])
    request = (
        b"GET /h/x?q=1 HTTP/1.1\r\n"
        b"Host: client.example:8080\r\n"
        b"Connection: keep-alive, X-Secret\r\n"
        b"X-Secret: 1\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Upgrade: foo\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        b"proxy-authenticate: x\r\n"
        b"X-Forwarded-For: 1.2.3.4\r\n"
        b"X-Multi: a\r\n"
        b"X-Multi: b\r\n"
        b"X-Plain: kept\r\n"
        b"\r\n"
    )
    reply = await fetch_keepalive(reactor, gw.port_number, request)

    assert len(heads) == 1
    head = heads[0]
    assert head.split(b"\r\n")[0] == b"GET /h/x?q=1 HTTP/1.1"
    for name in (
        b"connection", b"x-secret", b"keep-alive", b"te", b"upgrade", b"proxy-connection",
        b"proxy-authorization", b"proxy-authenticate",
    ):
        assert head_values(head, name) == [], (name, head)
    assert head_values(head, b"x-plain") == [b"kept"]
    multi = [v.strip() for value in head_values(head, b"x-multi") for v in value.split(b",")]
    assert multi == [b"a", b"b"]
    assert head_values(head, b"x-forwarded-for") == [b"1.2.3.4, 127.0.0.1"]
    assert head_values(head, b"x-real-ip") == [b"127.0.0.1"]
    assert head_values(head, b"x-forwarded-proto") == [b"http"]
    assert head_values(head, b"x-forwarded-host") == [b"client.example"]
    assert head_values(head, b"x-forwarded-port") == [b"%d" % gw.port_number]

    assert reply.status == 200
    assert reply.body == b"ok"
    assert reply.values(b"x-kept") == [b"yes"]
    assert reply.values(b"set-cookie") == [b"a=1", b"b=2"]
    assert reply.values(b"x-up") == []
    assert reply.values(b"keep-alive") == []
    assert reply.values(b"proxy-authenticate") == []
    assert all(b"x-up" not in v.lower() for v in reply.values(b"connection"))


# ---------------------------------------------------------------------------
# Bodies


def _sized_body(request: Any) -> bytes:
    """100 KiB written in two parts with an explicit Content-Length."""
    request.setHeader(b"content-length", b"%d" % (100 * 1024))
    request.write(b"a" * (50 * 1024))
    request.write(b"b" * (50 * 1024))
    request.finish()
    return server.NOT_DONE_YET  # type: ignore[return-value]


@ensureDeferred
async def test_response_content_length_is_kept(reactor: Any, stack: Stack) -> None:
    up = await stack.upstream(Recorder(respond=_sized_body))
    gw = await stack.gateway([route("1", "/b/*", {node(up): 1})])
    reply = await fetch(reactor, gw.port_number, get("/b/x"))
    assert reply.status == 200
    assert reply.values(b"content-length") == [b"%d" % (100 * 1024)]
    assert reply.values(b"transfer-encoding") == []
    assert reply.raw_body == b"a" * (50 * 1024) + b"b" * (50 * 1024)


@ensureDeferred
async def test_head_is_200_without_body(reactor: Any, stack: Stack) -> None:
    upstream = Recorder(b"hello")
    up = await stack.upstream(upstream)
    gw = await stack.gateway([route("1", "/b/*", {node(up): 1})])
    reply = await fetch(reactor, gw.port_number, get("/b/x", method="HEAD"))
    assert reply.status == 200
    assert reply.raw_body == b""
    assert upstream.seen[0].method == b"HEAD"
    # The length of what a GET would return, as the upstream said; never 0.
    assert reply.values(b"content-length") == [b"5"]


def _no_content(request: Any) -> bytes:
    request.setResponseCode(204)
    return b""


@ensureDeferred
async def test_204_has_no_body_and_no_content_length(reactor: Any, stack: Stack) -> None:
    up = await stack.upstream(Recorder(respond=_no_content))
    gw = await stack.gateway([route("1", "/b/*", {node(up): 1})])
    reply = await fetch(reactor, gw.port_number, get("/b/x"))
    assert reply.status == 204
    assert reply.raw_body == b""
    assert reply.values(b"content-length") == []  # RFC 9110 8.6: MUST NOT
    assert reply.values(b"transfer-encoding") == []


@ensureDeferred
async def test_304_has_no_body(reactor: Any, stack: Stack) -> None:
    heads: List[bytes] = []
    response = b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 5\r\n\r\n'
    up = await stack.listen_factory(Factory.forProtocol(lambda: _Canned(heads, response)))
    gw = await stack.gateway([route("1", "/b/*", {node(up): 1})])
    reply = await fetch(reactor, gw.port_number, get("/b/x", extra=b'If-None-Match: "v1"\r\n'))
    assert reply.status == 304
    assert reply.raw_body == b""
    assert reply.values(b"etag") == [b'"v1"']
    assert head_values(heads[0], b"if-none-match") == [b'"v1"']
    # Content-Length of a 304 describes the 200 it stands for: never a made-up 0.
    assert reply.values(b"content-length") in ([], [b"5"])
    assert reply.values(b"transfer-encoding") == []


def _digest(request: Any) -> bytes:
    request.content.seek(0)
    body = request.content.read()
    return b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())


def _upload(path: str, body: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: gw.test\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (path.encode(), len(body))
    ) + body


@ensureDeferred
async def test_5_mib_upload_reaches_upstream_byte_for_byte(reactor: Any, stack: Stack) -> None:
    upstream = Recorder(respond=_digest)
    up = await stack.upstream(upstream)
    gw = await stack.gateway([route("1", "/u/*", {node(up): 1})])
    body = os.urandom(5 * MiB)
    expected = hashlib.sha256(body).hexdigest()
    reply = await fetch(reactor, gw.port_number, _upload("/u/x", body))
    assert reply.status == 200
    assert reply.body == b"%d %s" % (len(body), expected.encode())
    seen = upstream.seen[0]
    assert (seen.method, seen.length, seen.sha256) == (b"POST", len(body), expected)
    assert seen.header(b"content-length") == b"%d" % len(body)
    assert seen.header(b"transfer-encoding") is None


@ensureDeferred
async def test_5_mib_upload_through_forward_auth_post_reaches_both(reactor: Any, stack: Stack) -> None:
    auth = Recorder(respond=lambda request: b"")
    auth_port = await stack.upstream(auth)
    upstream = Recorder(respond=_digest)
    up = await stack.upstream(upstream)
    plugins = {
        "forward-auth": {"uri": "http://127.0.0.1:%d/auth" % auth_port, "request_method": "POST"}
    }
    gw = await stack.gateway([route("1", "/u/*", {node(up): 1}, plugins=plugins)])
    body = os.urandom(5 * MiB)
    expected = hashlib.sha256(body).hexdigest()
    reply = await fetch(reactor, gw.port_number, _upload("/u/x", body))
    assert reply.status == 200
    assert len(auth.seen) == 1
    assert (auth.seen[0].method, auth.seen[0].length, auth.seen[0].sha256) == (b"POST", len(body), expected)
    seen = upstream.seen[0]
    assert (seen.method, seen.length, seen.sha256) == (b"POST", len(body), expected)
    assert reply.body == b"%d %s" % (len(body), expected.encode())


@ensureDeferred
async def test_chunked_upload_streams_chunked(reactor: Any, stack: Stack) -> None:
    # Dispatched on its head, the body is passed on as it arrives: a chunked
    # one stays chunked (re-framed: the client's chunk sizes and extensions
    # are not kept), as its length is not known in advance.
    upstream = Recorder(respond=_digest)
    up = await stack.upstream(upstream)
    gw = await stack.gateway([route("1", "/u/*", {node(up): 1})])
    parts = [b"hello ", os.urandom(70000), b"world"]
    body = b"".join(parts)
    payload = (
        b"POST /u/x HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
        + b"0\r\n\r\n"
    )
    reply = await fetch(reactor, gw.port_number, payload)
    assert reply.status == 200
    seen = upstream.seen[0]
    assert seen.sha256 == hashlib.sha256(body).hexdigest()
    assert seen.header(b"content-length") is None
    assert seen.header(b"transfer-encoding") == b"chunked"


# ---------------------------------------------------------------------------
# Backpressure and client disconnects


async def _settle(reactor: Any, read: Callable[[], int], limit: float = 5.0) -> None:
    """Wait until C{read()} stops growing for 0.3 s (or C{limit} passes)."""
    deadline = time.monotonic() + limit
    last, stable_since = read(), time.monotonic()
    while time.monotonic() < deadline:
        await sleep(reactor, 0.05)
        now = read()
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= 0.3:
            return


async def _download(stack: Stack, total: int, pause_first: bool) -> Tuple[StreamingUpstream, Streamer, SlowReader]:
    reactor = stack.reactor
    upstream = StreamingUpstream(reactor, total)
    stack.track_streams(upstream.streams)
    up = await stack.upstream(upstream)
    gw = await stack.gateway([route("1", "/big/*", {node(up): 1})])
    reader = SlowReader(get("/big/x"), pause_first)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", gw.port_number)
    await endpoint.connect(Factory.forProtocol(lambda: reader))
    stack.track(reader.transport)
    stream = await upstream.started.addTimeout(5, reactor)
    await reader.first_data.addTimeout(5, reactor)
    return upstream, stream, reader


@ensureDeferred
async def test_slow_client_pauses_the_upstream_producer(reactor: Any, stack: Stack) -> None:
    total = 256 * MiB
    _, stream, reader = await _download(stack, total, pause_first=True)
    await _settle(reactor, lambda: stream.produced)
    # The gateway did not buffer: the upstream was paused long before the end.
    assert stream.pauses >= 1
    assert stream.paused
    assert stream.produced < total
    assert stream.produced - reader.body_bytes < 40 * MiB, (stream.produced, reader.body_bytes)
    # And it is not merely slow: nothing moves while the client does not read.
    before = stream.produced
    await sleep(reactor, 0.3)
    assert stream.produced == before


@ensureDeferred
async def test_paused_download_resumes_to_full_length(reactor: Any, stack: Stack) -> None:
    total = 64 * MiB
    _, stream, reader = await _download(stack, total, pause_first=True)
    await _settle(reactor, lambda: stream.produced)
    assert stream.paused
    assert stream.produced < total
    reader.transport.resumeProducing()
    received = await reader.complete.addTimeout(20, reactor)
    assert received == total
    assert stream.finished
    assert reader.head is not None and b"content-length: %d" % total in reader.head.lower()


@ensureDeferred
async def test_client_gone_mid_download_stops_the_upstream(reactor: Any, stack: Stack) -> None:
    total = 256 * MiB
    _, stream, reader = await _download(stack, total, pause_first=True)
    reader.transport.abortConnection()
    started = time.monotonic()
    produced = await stream.halted.addTimeout(2, reactor)
    assert time.monotonic() - started < 2
    assert stream.stopped
    assert produced < total
    # Nothing more is produced once halted.
    await sleep(reactor, 0.1)
    assert stream.produced == produced


# ---------------------------------------------------------------------------
# The gateway's own 502


@ensureDeferred
async def test_unexpected_error_after_headers_gives_a_bare_502(
    reactor: Any, stack: Stack, monkeypatch: Any
) -> None:
    from fauth.upstream import proxy

    heads: List[bytes] = []
    canned = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: session=upstream\r\n"
        b"Content-Encoding: gzip\r\nX-Upstream: 1\r\n\r\nok"
    )
    up = await stack.listen_factory(Factory.forProtocol(lambda: _Canned(heads, canned)))
    gw = await stack.gateway([route("1", "/u/*", {node(up): 1})])

    def broken(self: Any) -> None:
        raise RuntimeError("relaying the body failed")

    monkeypatch.setattr(proxy._Relay, "relay", broken)
    with LogCapture() as logs:
        reply = await fetch(reactor, gw.port_number, get("/u/x"))
    assert logs.contains("unexpected error in the upstream leg"), logs.lines
    assert reply.status == 502
    assert reply.values(b"set-cookie") == []
    assert reply.values(b"content-encoding") == []
    assert reply.values(b"x-upstream") == []
    assert reply.values(b"content-length") == [b"0"]
    assert reply.raw_body == b""


@ensureDeferred
async def test_non_utf8_path_goes_upstream_as_its_own_bytes(reactor: Any, stack: Stack) -> None:
    upstream = Recorder()
    up = await stack.upstream(upstream)
    gw = await stack.gateway([route("1", "/*", {node(up): 1})])
    reply = await fetch(reactor, gw.port_number, get("/%ff/./x?q=%ff"))
    assert reply.status == 200
    # Byte 0xFF, as authorised; not U+00FF re-encoded as UTF-8 (%C3%BF).
    assert upstream.seen[0].uri == b"/%FF/x?q=%ff"
    reply = await fetch(reactor, gw.port_number, get("/%c3%a9/./x"))
    assert reply.status == 200
    assert upstream.seen[1].uri == b"/%C3%A9/x"


@ensureDeferred
async def test_client_gone_mid_download_is_not_blamed_on_the_upstream(reactor: Any, stack: Stack) -> None:
    with LogCapture() as logs:
        _, stream, reader = await _download(stack, 256 * MiB, pause_first=True)
        reader.transport.abortConnection()
        await stream.halted.addTimeout(2, reactor)
        await sleep(reactor, 0.2)
    assert not logs.contains("upstream failed mid-body"), logs.lines
