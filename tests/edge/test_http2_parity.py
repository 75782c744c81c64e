"""
HTTP/2 at parity with HTTP/1.1 (issue 18, point 3), over real TLS on
loopback with a raw C{h2} client (validation of what it sends turned off,
so it sends the attacker's header lists and frames as given):

  - RFC 9113 8.2-8.3 malformed requests are refused, each one, whether h2
    refuses it (a connection error: GOAWAY) or fauth does (400, 413, 431
    on the stream), and nothing of them reaches the auth service or the
    upstream (no H2.CL / H2.TE downgrade);
  - the header and body deadlines of HTTP/1.1 apply to a stream;
  - a client that never opens its flow-control window does not make the
    gateway read an upstream body without bound;
  - the auth service and the upstream see the same identity and
    X-Forwarded-* headers for the same request over HTTP/1.1 and HTTP/2.
"""
from __future__ import annotations

import socket
import ssl
import time
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Tuple

import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread

from fauth.config import parse_config
from fauth.edge.gateway import Gateway
from fauth.edge.resources import GatewayResource, GatewaySite
from fauth.testing import LogCapture
from tests.hostile_env import AuthService, Upstream
from tests.servers import listen_on_loopback
from tests.tls import self_signed

h2 = pytest.importorskip("h2")
import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402
import httpx  # noqa: E402

LIMITS = {
    "http2": True,
    "header_timeout": 1,
    "body_timeout": 1,
    "max_headers": 20,
}
MAX_BODY = 4096
BIG = 64 * 1024 * 1024


class BigBody(Protocol):
    """An upstream answering any request with C{size} bytes, written as its transport lets it; counts them."""

    sent = 0
    size = BIG

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self._paused = False
        self._started = False

    def dataReceived(self, data: bytes) -> None:
        if not self._started and b"\r\n\r\n" in data:
            self._started = True
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BigBody.size)
            self.resumeProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        chunk = b"b" * 65536
        while not self._paused and BigBody.sent < BigBody.size and self.transport is not None and self._started:
            self.transport.write(chunk)
            BigBody.sent += len(chunk)

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self._paused = True


class Env:
    def __init__(self, port: Any, gateway: Gateway, auth: AuthService, upstream: Upstream, ports: List[Any]) -> None:
        self.port = port
        self.gateway = gateway
        self.auth = auth
        self.upstream = upstream
        self.ports = ports

    @property
    def number(self) -> int:
        return int(self.port.getHost().port)

    def untouched(self) -> bool:
        return not self.auth.calls and not self.upstream.hits

    async def stop(self) -> None:
        await self.port.stopListening()
        for port in self.ports:
            await port.stopListening()
        await self.gateway.close()


async def start(reactor: Any, tmp_path: Any) -> Env:
    auth, upstream = AuthService(), Upstream(b"up")
    auth_port = await listen_on_loopback(reactor, auth)
    up_port = await listen_on_loopback(reactor, upstream)
    big_port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Factory.forProtocol(BigBody))
    fa = {
        "forward-auth": {
            "uri": "http://127.0.0.1:%d/auth" % auth_port.getHost().port,
            "request_headers": ["Authorization"],
            "upstream_headers": ["X-User-ID"],
        }
    }
    conf = parse_config(
        {
            "http": LIMITS,
            "client_max_body_size": MAX_BODY,
            "routes": [
                {"id": "p", "uri": "/p/*", "plugins": fa, "upstream": {"nodes": {"127.0.0.1:%d" % up_port.getHost().port: 1}}},
                {"id": "big", "uri": "/big", "upstream": {"nodes": {"127.0.0.1:%d" % big_port.getHost().port: 1}}},
            ],
        }
    )
    gateway = Gateway(reactor, conf)
    site = GatewaySite(GatewayResource(gateway), conf.http, reactor=reactor)
    key, cert = self_signed(tmp_path)
    port = await serverFromString(reactor, "ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s" % (key, cert)).listen(site)
    return Env(port, gateway, auth, upstream, [auth_port, up_port, big_port])


@async_yield_fixture
async def env(reactor: Any, tmp_path: Any) -> AsyncIterator[Env]:
    environment = await start(reactor, tmp_path)
    try:
        yield environment
    finally:
        await environment.stop()


# ---------------------------------------------------------------------------
# A raw HTTP/2 client (blocking, run in a thread)


class Outcome:
    def __init__(self) -> None:
        self.status: Optional[int] = None
        self.reset: Optional[int] = None
        self.goaway: Optional[int] = None
        self.closed = False
        self.ended = False
        self.body = b""
        self.took = 0.0

    @property
    def refused(self) -> bool:
        """The stream got no answer but a refusal: a GOAWAY for the connection, or a reset."""
        return self.status is None and (self.goaway is not None or self.reset is not None or self.closed)

    def __repr__(self) -> str:
        return "Outcome(status=%r, reset=%r, goaway=%r, closed=%r, body=%r)" % (
            self.status, self.reset, self.goaway, self.closed, self.body[:80]
        )


def _connect(port: int) -> ssl.SSLSocket:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = context.wrap_socket(sock, server_hostname="localhost")
    assert tls.selected_alpn_protocol() == "h2"
    return tls


def _client() -> Any:
    config = h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
    )
    return h2.connection.H2Connection(config=config)


def exchange(
    port: int,
    send: Callable[[Any, ssl.SSLSocket], None],
    stream_id: int = 1,
    wait: float = 5.0,
    read: bool = True,
    answer: bool = True,
) -> Outcome:
    """
    Open an h2 connection, let C{send} send on it (the client connection and
    the socket), then read until stream C{stream_id} ends or is reset, or
    the connection closes; what happened.  Without C{answer}, nothing is
    sent back (no SETTINGS acknowledgement: it would end a header block
    left open on purpose).
    """
    sock = _connect(port)
    client = _client()
    client.initiate_connection()
    sock.sendall(client.data_to_send())
    outcome = Outcome()
    started = time.monotonic()
    try:
        send(client, sock)
        sock.sendall(client.data_to_send())
        sock.settimeout(wait)
        while read and not outcome.ended and outcome.reset is None and outcome.goaway is None:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                break
            except (ConnectionError, ssl.SSLError, OSError):
                outcome.closed = True
                break
            if not data:
                outcome.closed = True
                break
            for event in client.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                    outcome.status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                    outcome.body += event.data
                    client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                    outcome.ended = True
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
                    outcome.reset = event.error_code
                elif isinstance(event, h2.events.ConnectionTerminated):
                    outcome.goaway = event.error_code
            pending = client.data_to_send()
            if pending and answer:
                sock.sendall(pending)
    finally:
        outcome.took = time.monotonic() - started
        sock.close()
    return outcome


def base(path: bytes = b"/p/x", method: bytes = b"GET") -> List[Tuple[bytes, bytes]]:
    return [(b":method", method), (b":scheme", b"https"), (b":authority", b"localhost"), (b":path", path)]


AUTH = (b"authorization", b"letmein")


def headers_only(headers: List[Tuple[bytes, bytes]], body: Optional[bytes] = None) -> Callable[[Any, Any], None]:
    def send(client: Any, sock: Any) -> None:
        client.send_headers(1, headers, end_stream=body is None)
        if body is not None:
            client.send_data(1, body, end_stream=True)

    return send


# ---------------------------------------------------------------------------
# Malformed requests

# h2 refuses these itself (a connection error: GOAWAY PROTOCOL_ERROR).
BY_H2 = {
    "connection": base() + [(b"connection", b"close")],
    "transfer-encoding": base() + [(b"transfer-encoding", b"chunked")],
    "keep-alive": base() + [(b"keep-alive", b"timeout=5")],
    "proxy-connection": base() + [(b"proxy-connection", b"keep-alive")],
    "upgrade": base() + [(b"upgrade", b"websocket")],
    "te-gzip": base() + [(b"te", b"gzip")],
    "uppercase-name": base() + [(b"X-User-ID", b"mallory")],
    "cr-in-value": base() + [(b"x-a", b"b\rc")],
    "lf-in-value-smuggle": base() + [(b"x-a", b"b\r\ntransfer-encoding: chunked")],
    "nul-in-value": base() + [(b"x-a", b"b\x00c")],
    "space-in-name": base() + [(b"x a", b"b")],
    "colon-in-name": base() + [(b"x:a", b"b")],
    "nul-in-name": base() + [(b"x\x00a", b"b")],
    "value-surrounding-space": base() + [(b"x-a", b" b")],
    "missing-method": [h for h in base() if h[0] != b":method"],
    "missing-path": [h for h in base() if h[0] != b":path"],
    "missing-scheme": [h for h in base() if h[0] != b":scheme"],
    "empty-path": base(b""),
    "duplicate-path": base() + [(b":path", b"/p/y")],
    "unknown-pseudo": base() + [(b":foo", b"bar")],
    "status-in-request": base() + [(b":status", b"200")],
    "pseudo-after-regular": base()[:3] + [(b"x-a", b"b"), (b":path", b"/p/x")],
    "authority-host-disagree": base() + [(b"host", b"evil.example")],
    "two-hosts": [h for h in base() if h[0] != b":authority"] + [(b"host", b"a"), (b"host", b"b")],
    "content-length-plus": base(method=b"POST") + [(b"content-length", b"+5")],
    "content-length-underscore": base(method=b"POST") + [(b"content-length", b"1_0")],
}

# h2 lets these through; fauth answers them on the stream.
BY_FAUTH = {
    "name-not-a-token": (base() + [(b"x(a)", b"b")], 400),
    "control-character-in-value": (base() + [(b"x-a", b"b\x01c")], 400),
    "del-in-value": (base() + [(b"x-a", b"b\x7fc")], 400),
    "lower-case-method": (base(method=b"get"), 400),
    "method-with-space": (base(method=b"G T"), 400),
    "connect": ([(b":method", b"CONNECT"), (b":authority", b"localhost:443")], 400),
    "scheme-ftp": ([(n, b"ftp" if n == b":scheme" else v) for n, v in base()], 400),
    "path-not-origin-form": (base(b"p/x"), 400),
    "star-path-with-get": (base(b"*"), 400),
    "absolute-path": (base(b"https://evil.example/p/x"), 400),
    "two-content-lengths": (base(method=b"POST") + [(b"content-length", b"5"), (b"content-length", b"5")], 400),
    "too-many-fields": (base() + [(b"x-f%d" % i, b"1") for i in range(25)], 431),
    "content-length-over-limit": (base(method=b"POST") + [(b"content-length", b"%d" % (MAX_BODY + 1))], 413),
    "non-ascii-path": (base(b"/p/\xc3\xa9"), 400),
    "encoded-dot-dot-slash": (base(b"/p/..%2fx"), 400),
    "encoded-slash-by-default": (base(b"/p/a%2Fb"), 400),
}


def _refused_by_h2(outcome: Outcome) -> bool:
    return outcome.refused and (outcome.goaway == 1 or outcome.reset == 1)  # PROTOCOL_ERROR


@pytest.mark.parametrize("name", list(BY_H2))
@ensureDeferred
async def test_malformed_requests_h2_refuses_reach_nobody(env: Env, name: str) -> None:
    outcome = await deferToThread(exchange, env.number, headers_only(BY_H2[name] + [AUTH]))
    # h2 4.4 (CPython) refuses each; h2 4.3 (PyPy 3.9) lets two host fields
    # and a content-length such as "+5" through, which fauth answers 400.
    assert _refused_by_h2(outcome) or outcome.status == 400, outcome
    assert env.untouched()


@pytest.mark.parametrize("name", list(BY_FAUTH))
@ensureDeferred
async def test_malformed_requests_fauth_refuses_are_answered_and_reach_nobody(env: Env, name: str) -> None:
    headers, status = BY_FAUTH[name]
    outcome = await deferToThread(exchange, env.number, headers_only(headers + [AUTH]))
    # (h2 4.3 refuses an ordinary CONNECT itself.)
    assert outcome.status == status or name == "connect" and _refused_by_h2(outcome), outcome
    assert env.untouched()


@pytest.mark.parametrize(
    "declared, sent",
    [(5, b"0123456789"), (10, b"01234")],
    ids=["data-over-content-length", "data-under-content-length"],
)
@ensureDeferred
async def test_content_length_disagreeing_with_data_reaches_nobody(env: Env, declared: int, sent: bytes) -> None:
    # H2.CL: a body longer than its content-length would be a second request
    # on an HTTP/1.1 upstream connection; shorter, it would hang it.
    headers = base(method=b"POST") + [AUTH, (b"content-length", b"%d" % declared)]
    outcome = await deferToThread(exchange, env.number, headers_only(headers, sent))
    assert outcome.refused, outcome
    assert env.untouched()


@ensureDeferred
async def test_a_refused_stream_leaves_the_connection_serving(env: Env) -> None:
    # fauth's refusals are per stream: the next request on the connection is served.
    def send(client: Any, sock: Any) -> None:
        client.send_headers(1, base(b"p/x") + [AUTH], end_stream=False)
        for _ in range(3):  # DATA after the refusal: ignored, the connection's window kept open
            client.send_data(1, b"x" * 16000, end_stream=False)
        client.send_headers(3, base(b"/p/ok") + [AUTH], end_stream=True)

    outcome = await deferToThread(exchange, env.number, send, 3)
    assert outcome.status == 200 and outcome.ended, outcome
    assert [hit["uri"] for hit in env.upstream.hits] == [b"/p/ok"]


@ensureDeferred
async def test_a_body_over_client_max_body_size_is_413(env: Env) -> None:
    def send(client: Any, sock: Any) -> None:
        client.send_headers(1, base(method=b"POST") + [AUTH], end_stream=False)
        for _ in range(4):
            client.send_data(1, b"x" * 2048, end_stream=False)

    outcome = await deferToThread(exchange, env.number, send)
    assert outcome.status == 413, outcome
    assert env.untouched()


# ---------------------------------------------------------------------------
# Deadlines


@ensureDeferred
async def test_a_header_block_never_finished_is_cut_off(env: Env) -> None:
    from hpack import Encoder
    from hyperframe.frame import HeadersFrame

    def send(client: Any, sock: Any) -> None:
        block = Encoder().encode(base() + [AUTH])
        sock.sendall(HeadersFrame(1, data=block, flags=[]).serialize())  # no END_HEADERS, no CONTINUATION

    with LogCapture() as logs:
        outcome = await deferToThread(exchange, env.number, send, 1, 6.0, True, False)
    assert outcome.goaway is not None or outcome.closed, outcome
    assert outcome.took < 3.0, outcome.took
    assert logs.contains("request head not complete in time"), logs.lines
    assert env.untouched()


@ensureDeferred
async def test_a_header_frame_trickled_is_cut_off(env: Env) -> None:
    from hpack import Encoder
    from hyperframe.frame import HeadersFrame

    def send(client: Any, sock: Any) -> None:
        frame = HeadersFrame(1, data=Encoder().encode(base() + [AUTH]), flags=["END_HEADERS", "END_STREAM"]).serialize()
        sock.sendall(client.data_to_send())
        for i in range(len(frame) - 1):  # never the last byte
            try:
                sock.sendall(frame[i : i + 1])
            except OSError:
                return
            time.sleep(0.1)
            if i > 60:
                return

    with LogCapture() as logs:
        outcome = await deferToThread(exchange, env.number, send, 1, 9.0)
    assert outcome.goaway is not None or outcome.closed, outcome
    assert logs.contains("request head not complete in time"), logs.lines
    assert env.untouched()


@ensureDeferred
async def test_a_body_never_finished_is_408(env: Env) -> None:
    def send(client: Any, sock: Any) -> None:
        client.send_headers(1, base(method=b"POST") + [AUTH, (b"content-length", b"100")], end_stream=False)
        client.send_data(1, b"x" * 10, end_stream=False)

    outcome = await deferToThread(exchange, env.number, send, 1, 6.0)
    assert outcome.status == 408, outcome
    assert outcome.took < 3.0, outcome.took
    assert env.untouched()


@ensureDeferred
async def test_requests_within_the_deadlines_pass(env: Env) -> None:
    def send(client: Any, sock: Any) -> None:
        client.send_headers(1, base(method=b"POST") + [AUTH, (b"content-length", b"20")], end_stream=False)
        sock.sendall(client.data_to_send())
        for _ in range(4):
            time.sleep(0.1)
            client.send_data(1, b"y" * 5, end_stream=False)
            sock.sendall(client.data_to_send())
        client.end_stream(1)

    outcome = await deferToThread(exchange, env.number, send)
    assert outcome.status == 200, outcome
    assert [hit["body"] for hit in env.upstream.hits] == [b"y" * 20]


# ---------------------------------------------------------------------------
# Flow control: the gateway reads an upstream body only as the client takes it


@pytest.mark.parametrize("window", ["never-opened", "opened-but-not-read"])
@ensureDeferred
async def test_a_client_that_takes_nothing_stalls_the_upstream(reactor: Any, env: Env, window: str) -> None:
    from twisted.internet.task import deferLater

    BigBody.sent, BigBody.size = 0, BIG
    holder: Dict[str, Any] = {}

    def open_and_stall() -> None:
        sock = _connect(env.number)
        client = _client()
        client.initiate_connection()
        client.send_headers(1, base(b"/big"), end_stream=True)
        if window == "opened-but-not-read":
            # Windows larger than the whole body, then never a read.
            client.increment_flow_control_window(2**31 - 1 - 65535)
            client.increment_flow_control_window(2**31 - 1 - 65535, stream_id=1)
        sock.sendall(client.data_to_send())
        holder["sock"] = sock

    await deferToThread(open_and_stall)
    try:
        await deferLater(reactor, 3.0, lambda: None)
        # A loopback socket and TLS buffer a few MiB; without backpressure
        # the gateway would have read all 64 MiB.
        assert 0 < BigBody.sent < 24 * 1024 * 1024, BigBody.sent
    finally:
        holder["sock"].close()


@ensureDeferred
async def test_a_paused_upstream_goes_on_as_the_client_reads(env: Env) -> None:
    # The control of the test above: past the queue limit the upstream is
    # paused, and resumed as the queue is sent; a client that reads gets it all.
    BigBody.sent, BigBody.size = 0, 2 * 1024 * 1024

    def send(client: Any, sock: Any) -> None:
        client.send_headers(1, base(b"/big"), end_stream=True)
        client.increment_flow_control_window(2**31 - 1 - 65535)
        client.increment_flow_control_window(2**31 - 1 - 65535, stream_id=1)

    outcome = await deferToThread(exchange, env.number, send, 1, 30.0)
    assert outcome.status == 200 and outcome.ended, outcome
    assert len(outcome.body) == BigBody.size == BigBody.sent


# ---------------------------------------------------------------------------
# The same headers for the auth service and the upstream over both versions


@ensureDeferred
async def test_identity_and_forwarded_headers_are_the_same_over_http11_and_http2(env: Env) -> None:
    headers = {
        "Authorization": "letmein",
        "X-User-ID": "mallory",
        "X_User_ID": "eve",
        "X-Forwarded-For": "10.9.9.9",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Proto": "http",
        "X-Forwarded-Port": "1",
        "X-Real-IP": "10.9.9.9",
        "Cookie": "a=1",
    }

    def talk(http2: bool) -> Tuple[str, int]:
        with httpx.Client(http2=http2, verify=False, timeout=10) as client:
            r = client.get("https://localhost:%d/p/same?q=1" % env.number, headers=headers)
            return r.http_version, r.status_code

    seen = {}
    for http2 in (False, True):
        del env.auth.calls[:], env.upstream.hits[:]
        version, status = await deferToThread(talk, http2)
        assert (version, status) == ("HTTP/2" if http2 else "HTTP/1.1", 200)
        (auth_call,) = env.auth.calls
        (hit,) = env.upstream.hits
        upstream = sorted((name.lower(), tuple(values)) for name, values in hit["headers"])
        seen[http2] = (sorted((k, tuple(v)) for k, v in auth_call.items()), upstream)
    assert seen[True] == seen[False]
    upstream = dict(seen[True][1])
    assert upstream[b"x-user-id"] == (b"alice",) and b"x_user_id" not in upstream
    assert upstream[b"x-forwarded-for"] == (b"10.9.9.9, 127.0.0.1",)
    assert upstream[b"x-forwarded-proto"] == (b"https",)
    assert upstream[b"x-forwarded-host"] == (b"localhost",)


@ensureDeferred
async def test_cookie_fields_are_joined_for_the_upstream(env: Env) -> None:
    outcome = await deferToThread(
        exchange, env.number, headers_only(base() + [AUTH, (b"cookie", b"a=1"), (b"cookie", b"b=2")])
    )
    assert outcome.status == 200, outcome
    (hit,) = env.upstream.hits
    assert env.upstream.header(hit, b"cookie") == [b"a=1; b=2"]
