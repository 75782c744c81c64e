"""
The auth leg end to end: connection reuse, whole-exchange timeouts,
transport failures, TLS verification, and the treq state that must not leak
between requests (cookies, Accept-Encoding, redirects), plus the exact header
set the auth service receives.

The auth service here is a raw HTTP/1.1 protocol so that every test can see
connections open and close, the exact header lines, and can answer in ways a
well-behaved web server never would (stall, garbage, silent close).
"""
from __future__ import annotations

import datetime
import gzip
import ipaddress
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import pytest_twisted
from pytest_twisted import async_yield_fixture
from treq.client import HTTPClient
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.web.resource import Resource

from fauth.wire.agent import NoCookies
from fauth.auth.client import AuthCallError, AuthClient, AuthTarget
from tests.harness import GatewayUnderTest, LogCapture, raw_request, start_gateway
from tests.rawserver import RawConnection, RawServer, Seen
from tests.servers import listen_on_loopback

FAILED = "failed to process forward auth, err: "
ONE_MIB = 1024 * 1024  # the cap on an auth body (authclient.MAX_AUTH_BODY)


# ---------------------------------------------------------------------------
# The auth service: a raw server whose handlers take (seen, conn)

AuthConnection = RawConnection
AuthServer = RawServer
Handler = Callable[[Seen, RawConnection], None]


def answer_200(seen: Seen, conn: RawConnection) -> None:
    conn.respond(200)


class Upstream(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: List[Any] = []

    #: A C{Set-Cookie} value the upstream answers with, or C{None}.
    cookie: Optional[bytes] = None

    def render(self, request: Any) -> bytes:
        self.seen.append(request.requestHeaders.copy())
        request.setHeader(b"content-type", b"text/plain")
        if self.cookie is not None:
            request.setHeader(b"set-cookie", self.cookie)
        return b"upstream ok"


# ---------------------------------------------------------------------------
# Plumbing


class Env:
    """Starts servers and gateways for one test and stops them all afterwards."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._cleanups: List[Callable[[], Awaitable[Any]]] = []
        self.upstream = Upstream()
        self.upstream_port: Any = None

    async def start_upstream(self) -> None:
        self.upstream_port = await listen_on_loopback(self.reactor, self.upstream)
        self._cleanups.append(self.upstream_port.stopListening)

    async def auth(self, handler: Handler = answer_200, tls: Optional[Tuple[str, str]] = None) -> AuthServer:
        server = RawServer(self.reactor, lambda conn, seen: handler(seen, conn))
        await server.listen(tls)
        self._cleanups.append(server.close)
        return server

    def doc(self, auth_uri: str, trusted: Optional[str] = None, **plugin: Any) -> Dict[str, Any]:
        conf = dict(plugin, uri=auth_uri)
        doc: Dict[str, Any] = {
            "routes": [
                {
                    "id": "1",
                    "uri": "/hello",
                    "plugins": {"forward-auth": conf},
                    "upstream": {"nodes": {"127.0.0.1:%d" % self.upstream_port.getHost().port: 1}},
                }
            ]
        }
        if trusted is not None:
            doc["ssl_trusted_certificate"] = trusted
        return doc

    async def gateway(
        self, auth_uri: str, trusted: Optional[str] = None, access_log: Optional[str] = None, **plugin: Any
    ) -> GatewayUnderTest:
        """A gateway whose route "1" (C{/hello}) has these C{forward-auth} attributes; see L{start_gateway}."""
        gw = await start_gateway(self.reactor, self.doc(auth_uri, trusted, **plugin), access_log)
        self._cleanups.append(gw.stop)
        return gw

    async def close(self) -> None:
        for cleanup in reversed(self._cleanups):
            await cleanup()


@async_yield_fixture
async def env() -> AsyncIterator[Env]:
    from twisted.internet import reactor

    e = Env(reactor)
    await e.start_upstream()
    try:
        yield e
    finally:
        await e.close()


class Reply:
    def __init__(self, raw: bytes) -> None:
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split(b" ")[1])
        self.headers: Dict[bytes, List[bytes]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers.setdefault(name.strip().lower(), []).append(value.strip())
        if self.headers.get(b"transfer-encoding") == [b"chunked"]:
            body = _dechunk(body)
        self.body = body


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return out


async def request(
    gw: GatewayUnderTest,
    path: str = "/hello",
    headers: Sequence[Tuple[str, str]] = (),
    method: str = "GET",
    body: bytes = b"",
) -> Reply:
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: localhost"]
    lines.extend("%s: %s" % h for h in headers)
    if body or method == "POST":
        lines.append("Content-Length: %d" % len(body))
    lines.append("Connection: close")
    payload = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    from twisted.internet import reactor

    return Reply(await raw_request(reactor, gw.port_number, payload))


async def eventually(reactor: Any, predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            return False
        await deferLater(reactor, 0.01, lambda: None)
    return True


async def free_port(reactor: Any) -> int:
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
    number = port.getHost().port
    await port.stopListening()
    return number


# ---------------------------------------------------------------------------
# keepalive


@pytest_twisted.ensureDeferred
async def test_keepalive_reuses_one_connection_for_sequential_requests(env: Env) -> None:
    auth = await env.auth()
    gw = await env.gateway(auth.url(), keepalive=True, keepalive_pool=5)
    for _ in range(20):
        assert (await request(gw)).status == 200
    assert len(auth.requests) == 20
    assert len(auth.connections) == 1
    assert {s.conn for s in auth.requests} == {1}
    # Keep-alive is HTTP/1.1's default: no Connection header is sent.
    assert auth.requests[0].values(b"connection") == []


@pytest_twisted.ensureDeferred
async def test_keepalive_false_opens_and_closes_a_connection_per_request(env: Env) -> None:
    auth = await env.auth()
    gw = await env.gateway(auth.url(), keepalive=False)
    for _ in range(5):
        assert (await request(gw)).status == 200
    assert len(auth.connections) == 5
    assert [s.conn for s in auth.requests] == [1, 2, 3, 4, 5]
    # The gateway closes each one itself; nothing is kept for reuse.
    assert await eventually(env.reactor, lambda: not auth.open_connections)
    assert not any(c.closed_by_us for c in auth.connections)


@pytest_twisted.ensureDeferred
async def test_keepalive_timeout_closes_idle_connection(env: Env) -> None:
    auth = await env.auth()
    gw = await env.gateway(auth.url(), keepalive_timeout=1000)
    assert (await request(gw)).status == 200
    answered = env.reactor.seconds()
    assert len(auth.open_connections) == 1
    await deferLater(env.reactor, 0.5, lambda: None)
    assert len(auth.open_connections) == 1, "closed well before keepalive_timeout"
    assert await eventually(env.reactor, lambda: not auth.open_connections, timeout=2.5)
    conn = auth.connections[0]
    assert not conn.closed_by_us
    assert conn.lost_at is not None
    assert 0.8 <= conn.lost_at - answered <= 2.0


@pytest_twisted.ensureDeferred
async def test_keepalive_pool_bounds_idle_connections_after_a_burst(env: Env) -> None:
    held: List[AuthConnection] = []

    def hold_until_ten(seen: Seen, conn: AuthConnection) -> None:
        held.append(conn)
        if len(held) == 10:
            for c in held:
                c.respond(200)

    auth = await env.auth(hold_until_ten)
    gw = await env.gateway(auth.url(), keepalive_pool=3)
    replies = await gatherResults([ensureDeferred(request(gw)) for _ in range(10)])
    assert [r.status for r in replies] == [200] * 10
    assert len(auth.connections) == 10
    assert await eventually(env.reactor, lambda: len(auth.open_connections) <= 3)
    await deferLater(env.reactor, 0.05, lambda: None)
    assert len(auth.open_connections) == 3
    assert not any(c.closed_by_us for c in auth.connections)
    # The survivors are reused.
    auth.normal = lambda conn, seen: answer_200(seen, conn)
    assert (await request(gw)).status == 200
    assert len(auth.connections) == 10


# ---------------------------------------------------------------------------
# timeout covers the whole exchange


def stall_body(seen: Seen, conn: AuthConnection) -> None:
    conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")


def never_answer(seen: Seen, conn: AuthConnection) -> None:
    pass


@pytest.mark.parametrize("handler", [stall_body, never_answer], ids=["body-stalls", "never-answers"])
@pytest_twisted.ensureDeferred
async def test_timeout_covers_whole_exchange(env: Env, handler: Handler) -> None:
    auth = await env.auth(handler)
    gw = await env.gateway(auth.url(), timeout=300, status_on_error=503)
    with LogCapture() as logs:
        started = env.reactor.seconds()
        reply = await request(gw)
        elapsed = env.reactor.seconds() - started
    assert reply.status == 503
    assert reply.body == b""
    assert 0.25 <= elapsed < 1.5
    assert logs.contains(FAILED + "timeout")
    # The half-read connection is dropped, not returned to the pool.
    assert await eventually(env.reactor, lambda: not auth.open_connections)
    assert not auth.connections[0].closed_by_us


@pytest.mark.parametrize("handler", [stall_body, never_answer], ids=["body-stalls", "never-answers"])
@pytest_twisted.ensureDeferred
async def test_timeout_with_allow_degradation_proxies(env: Env, handler: Handler) -> None:
    auth = await env.auth(handler)
    gw = await env.gateway(auth.url(), timeout=300, allow_degradation=True, status_on_error=503)
    with LogCapture() as logs:
        started = env.reactor.seconds()
        reply = await request(gw)
        elapsed = env.reactor.seconds() - started
    assert reply.status == 200
    assert reply.body == b"upstream ok"
    assert elapsed < 1.5
    assert len(env.upstream.seen) == 1
    assert logs.contains(FAILED + "timeout")


@pytest_twisted.ensureDeferred
async def test_direct_client_body_stall_times_out_and_is_not_pooled(env: Env) -> None:
    auth = await env.auth(stall_body)
    client = AuthClient(env.reactor, AuthTarget.parse(auth.url(), True))
    try:
        started = env.reactor.seconds()
        with pytest.raises(AuthCallError) as info:
            await client.call("GET", ((b"Host", client.host_header),), None, 0.2)
        assert str(info.value) == "timeout"
        assert env.reactor.seconds() - started < 1.0
        assert await eventually(env.reactor, lambda: not auth.open_connections)
        assert all(idle == 0 for idle, _ in client.pool.connection_counts().values())
    finally:
        await client.close()


# ---------------------------------------------------------------------------
# transport failures


@pytest_twisted.ensureDeferred
async def test_refused_connection(env: Env) -> None:
    port = await free_port(env.reactor)
    gw = await env.gateway("http://127.0.0.1:%d/auth" % port, status_on_error=503)
    with LogCapture() as logs:
        reply = await request(gw)
    assert reply.status == 503
    assert logs.contains(FAILED + "connection refused"), logs.lines
    assert env.upstream.seen == []


@pytest_twisted.ensureDeferred
async def test_closed_without_response(env: Env) -> None:
    auth = await env.auth(lambda seen, conn: conn.close())
    gw = await env.gateway(auth.url())
    with LogCapture() as logs:
        reply = await request(gw)
    assert reply.status == 403
    assert logs.contains(FAILED + "closed"), logs.lines
    assert len(auth.requests) == 1


@pytest_twisted.ensureDeferred
async def test_garbage_status_line(env: Env) -> None:
    auth = await env.auth(lambda seen, conn: conn.transport.write(b"HELLO\r\n\r\n"))
    gw = await env.gateway(auth.url(), status_on_error=502)
    with LogCapture() as logs:
        reply = await request(gw)
    assert reply.status == 502
    assert logs.contains(FAILED + "bad response") or logs.contains(FAILED + "closed"), logs.lines
    assert env.upstream.seen == []


@pytest_twisted.ensureDeferred
async def test_auth_body_over_cap_is_an_error(env: Env) -> None:
    big = b"x" * (ONE_MIB + 1)
    auth = await env.auth(lambda seen, conn: conn.respond(403, body=big))
    gw = await env.gateway(auth.url(), status_on_error=503)
    with LogCapture() as logs:
        reply = await request(gw)
    assert reply.status == 503
    assert reply.body == b""
    assert logs.contains(FAILED + "response body too large"), logs.lines
    assert await eventually(env.reactor, lambda: not auth.open_connections)


@pytest_twisted.ensureDeferred
async def test_auth_body_at_cap_is_relayed(env: Env) -> None:
    exact = b"y" * ONE_MIB
    auth = await env.auth(lambda seen, conn: conn.respond(403, body=exact))
    gw = await env.gateway(auth.url(), status_on_error=503)
    reply = await request(gw)
    assert reply.status == 403
    assert reply.body == exact


@pytest_twisted.ensureDeferred
async def test_stale_pooled_connection_closed_while_idle(env: Env) -> None:
    def answer_then_close(seen: Seen, conn: AuthConnection) -> None:
        conn.respond(200)
        env.reactor.callLater(0.01, conn.close)

    auth = await env.auth(answer_then_close)
    gw = await env.gateway(auth.url())
    assert (await request(gw)).status == 200
    assert await eventually(env.reactor, lambda: not auth.open_connections)
    with LogCapture() as logs:
        assert (await request(gw)).status == 200
    assert not logs.contains(FAILED)
    assert len(auth.connections) == 2


@pytest_twisted.ensureDeferred
async def test_stale_pooled_connection_closed_as_request_arrives(env: Env) -> None:
    def close_second_on_first_connection(seen: Seen, conn: AuthConnection) -> None:
        if conn.index == 1 and len(auth.requests) == 2:
            conn.close()  # the idle close crossed the request on the wire
        else:
            conn.respond(200)

    auth = await env.auth(close_second_on_first_connection)
    gw = await env.gateway(auth.url())
    assert (await request(gw)).status == 200
    with LogCapture() as logs:
        assert (await request(gw)).status == 200
    assert not logs.contains(FAILED)
    assert [s.conn for s in auth.requests] == [1, 1, 2]


# ---------------------------------------------------------------------------
# TLS


def _write_tls_material(tmp_path: Any) -> Dict[str, Tuple[str, str]]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> Any:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def build(subject: str, key: Any, issuer: str, issuer_key: Any, san: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    def write(stem: str, key: Any, cert: Any) -> Tuple[str, str]:
        key_path = tmp_path / (stem + ".key.pem")
        cert_path = tmp_path / (stem + ".cert.pem")
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(key_path), str(cert_path)

    ip_san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build("fauth test CA", ca_key, "fauth test CA", ca_key, None, True)
    good_key = ec.generate_private_key(ec.SECP256R1())
    good = build("127.0.0.1", good_key, "fauth test CA", ca_key, ip_san, False)
    wrong_key = ec.generate_private_key(ec.SECP256R1())
    wrong = build("example.com", wrong_key, "fauth test CA", ca_key, [x509.DNSName("example.com")], False)
    self_key = ec.generate_private_key(ec.SECP256R1())
    selfsigned = build("127.0.0.1", self_key, "127.0.0.1", self_key, ip_san, False)
    return {
        "ca": ("", write("ca", ca_key, ca)[1]),
        "good": write("good", good_key, good),
        "wrong_name": write("wrong", wrong_key, wrong),
        "self_signed": write("self", self_key, selfsigned),
    }


@pytest.fixture
def tls(tmp_path: Any) -> Dict[str, Tuple[str, str]]:
    return _write_tls_material(tmp_path)


@pytest_twisted.ensureDeferred
async def test_tls_trusted_ca_verifies(env: Env, tls: Dict[str, Tuple[str, str]]) -> None:
    auth = await env.auth(tls=tls["good"])
    gw = await env.gateway(auth.url(), trusted=tls["ca"][1])
    with LogCapture() as logs:
        reply = await request(gw)
    assert reply.status == 200, logs.lines
    assert reply.body == b"upstream ok"
    assert len(auth.requests) == 1
    assert auth.requests[0].values(b"host") == [b"127.0.0.1:%d" % auth.port.getHost().port]


@pytest_twisted.ensureDeferred
async def test_tls_untrusted_self_signed_is_refused(env: Env, tls: Dict[str, Tuple[str, str]]) -> None:
    auth = await env.auth(tls=tls["self_signed"])
    gw = await env.gateway(auth.url(), trusted=tls["ca"][1], status_on_error=503)
    with LogCapture() as logs:
        reply = await request(gw)
    assert reply.status == 503
    assert logs.contains(FAILED + "handshake failed"), logs.lines
    assert any("certificate verify failed" in line for line in logs.lines), logs.lines
    assert auth.requests == []
    assert env.upstream.seen == []


@pytest_twisted.ensureDeferred
async def test_tls_untrusted_self_signed_allowed_without_verify(env: Env, tls: Dict[str, Tuple[str, str]]) -> None:
    auth = await env.auth(tls=tls["self_signed"])
    gw = await env.gateway(auth.url(), trusted=tls["ca"][1], ssl_verify=False)
    reply = await request(gw)
    assert reply.status == 200
    assert len(auth.requests) == 1


@pytest_twisted.ensureDeferred
async def test_tls_hostname_mismatch_is_refused(env: Env, tls: Dict[str, Tuple[str, str]]) -> None:
    auth = await env.auth(tls=tls["wrong_name"])
    gw = await env.gateway(auth.url(), trusted=tls["ca"][1], status_on_error=503)
    with LogCapture() as logs:
        reply = await request(gw)
    assert reply.status == 503
    assert logs.contains(FAILED + "handshake failed"), logs.lines
    assert auth.requests == []
    assert env.upstream.seen == []


# ---------------------------------------------------------------------------
# isolation: treq state that must not leak


@pytest_twisted.ensureDeferred
async def test_set_cookie_from_auth_is_never_sent_back(env: Env) -> None:
    def cookie_first(seen: Seen, conn: AuthConnection) -> None:
        headers = [(b"Set-Cookie", b"session=alice; Path=/")] if len(auth.requests) == 1 else []
        conn.respond(200, headers)

    auth = await env.auth(cookie_first)
    gw = await env.gateway(auth.url(), request_headers=["Authorization"])
    assert (await request(gw, headers=[("Authorization", "alice")])).status == 200
    assert (await request(gw, headers=[("Authorization", "bob")])).status == 200
    assert (await request(gw)).status == 200
    assert len(auth.requests) == 3
    for seen in auth.requests:
        assert seen.values(b"cookie") == []


@pytest_twisted.ensureDeferred
async def test_no_accept_encoding_unless_listed(env: Env) -> None:
    auth = await env.auth()
    gw = await env.gateway(auth.url())
    assert (await request(gw)).status == 200
    assert (await request(gw, headers=[("Accept-Encoding", "gzip, br")])).status == 200
    assert [s.values(b"accept-encoding") for s in auth.requests] == [[], []]


@pytest_twisted.ensureDeferred
async def test_listed_accept_encoding_is_the_clients_value_once(env: Env) -> None:
    auth = await env.auth()
    gw = await env.gateway(auth.url(), request_headers=["Accept-Encoding"])
    assert (await request(gw, headers=[("Accept-Encoding", "br, deflate")])).status == 200
    assert (await request(gw, headers=[("Accept-Encoding", "gzip")])).status == 200
    assert (await request(gw)).status == 200
    assert [s.values(b"accept-encoding") for s in auth.requests] == [[b"br, deflate"], [b"gzip"], []]


@pytest_twisted.ensureDeferred
async def test_every_auth_call_is_one_treq_request_without_redirects(env: Env, monkeypatch: Any) -> None:
    calls: List[Dict[str, Any]] = []
    real = HTTPClient.request

    def spy(self: HTTPClient, method: str, url: Any, **kwargs: Any) -> Any:
        calls.append(dict(kwargs, method=method, jar=self._cookiejar))
        return real(self, method, url, **kwargs)

    monkeypatch.setattr(HTTPClient, "request", spy)
    auth = await env.auth()
    gw = await env.gateway(auth.url())
    for _ in range(3):
        assert (await request(gw)).status == 200
    assert len(calls) == len(auth.requests) == 3
    for call in calls:
        assert call["method"] == "GET" and call["allow_redirects"] is False
        # One jar that keeps nothing, as the client's and as the call's.
        assert isinstance(call["jar"], NoCookies) and call["cookies"] is call["jar"]


@pytest_twisted.ensureDeferred
async def test_a_denial_without_content_encoding_gets_none_invented(env: Env) -> None:
    auth = await env.auth(lambda seen, conn: conn.respond(401, [(b"X-Reason", b"no")], b"who?"))
    gw = await env.gateway(auth.url(), client_headers=["Content-Encoding", "X-Reason"])
    reply = await request(gw)
    assert reply.status == 401 and reply.body == b"who?"
    assert reply.headers[b"x-reason"] == [b"no"]
    assert b"content-encoding" not in reply.headers


@pytest_twisted.ensureDeferred
async def test_an_allow_without_content_encoding_sends_none_upstream(env: Env) -> None:
    auth = await env.auth(lambda seen, conn: conn.respond(200, [(b"X-User-ID", b"alice")]))
    gw = await env.gateway(auth.url(), upstream_headers=["X-User-ID", "Content-Encoding"])
    assert (await request(gw, headers=[("Content-Encoding", "identity")])).status == 200
    (seen,) = env.upstream.seen
    assert seen.getRawHeaders(b"x-user-id") == [b"alice"]
    # The auth service sent none: removed, not the client's, not an empty one.
    assert seen.getRawHeaders(b"content-encoding") is None


@pytest_twisted.ensureDeferred
async def test_a_gzip_denial_is_relayed_as_the_auth_service_sent_it(env: Env) -> None:
    compressed = gzip.compress(b"denied, in detail")
    auth = await env.auth(
        lambda seen, conn: conn.respond(403, [(b"Content-Encoding", b"gzip"), (b"Content-Type", b"text/plain")], compressed)
    )
    gw = await env.gateway(auth.url(), client_headers=["Content-Encoding", "Content-Type"])
    reply = await request(gw, headers=[("Accept-Encoding", "gzip")])
    assert reply.status == 403
    assert reply.headers[b"content-encoding"] == [b"gzip"]
    assert reply.body == compressed


@pytest_twisted.ensureDeferred
async def test_redirect_is_relayed_not_followed(env: Env) -> None:
    def redirect(seen: Seen, conn: AuthConnection) -> None:
        if seen.target == b"/auth":
            conn.respond(302, [(b"Location", auth.url("/login").encode())], b"go away")
        else:
            conn.respond(200)

    auth = await env.auth(redirect)
    gw = await env.gateway(auth.url(), client_headers=["Location"])
    reply = await request(gw)
    assert reply.status == 302
    assert reply.headers[b"location"] == [auth.url("/login").encode()]
    assert reply.body == b"go away"
    assert [s.target for s in auth.requests] == [b"/auth"]
    assert env.upstream.seen == []


# ---------------------------------------------------------------------------
# the header set


@pytest_twisted.ensureDeferred
async def test_auth_sees_exactly_the_contract_headers(env: Env) -> None:
    auth = await env.auth()
    gw = await env.gateway(auth.url(), request_headers=["Authorization"])
    reply = await request(
        gw,
        path="/hello?x=1",
        method="POST",
        headers=[
            ("Authorization", "Bearer t"),
            ("Cookie", "session=bob"),
            ("Accept-Encoding", "gzip"),
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Other", "nope"),
            ("Content-Type", "text/plain"),
        ],
        body=b"hello body",
    )
    assert reply.status == 200
    assert len(auth.requests) == 1
    seen = auth.requests[0]
    assert seen.method == b"GET"
    assert seen.target == b"/auth"
    assert seen.body == b""
    assert sorted(seen.names()) == sorted([
        b"host", b"user-agent", b"x-forwarded-proto", b"x-forwarded-method",
        b"x-forwarded-host", b"x-forwarded-uri", b"x-forwarded-for", b"authorization",
    ])
    assert seen.values(b"authorization") == [b"Bearer t"]
    assert seen.values(b"x-forwarded-method") == [b"POST"]
    assert seen.values(b"x-forwarded-uri") == [b"/hello?x=1"]
    assert seen.values(b"x-forwarded-host") == [b"localhost"]
    assert seen.values(b"x-forwarded-proto") == [b"http"]
    assert seen.values(b"x-forwarded-for") == [b"127.0.0.1"]
    assert seen.values(b"host") == [b"127.0.0.1:%d" % auth.port.getHost().port]


@pytest_twisted.ensureDeferred
async def test_generated_x_forwarded_for_wins_over_listed_client_header(env: Env) -> None:
    auth = await env.auth()
    gw = await env.gateway(auth.url(), request_headers=["x-forwarded-for"])
    reply = await request(gw, headers=[("X-Forwarded-For", "6.6.6.6")])
    assert reply.status == 200
    assert auth.requests[0].values(b"x-forwarded-for") == [b"127.0.0.1"]


@pytest_twisted.ensureDeferred
async def test_extra_header_overrides_generated_x_forwarded_host(env: Env) -> None:
    auth = await env.auth()
    gw = await env.gateway(auth.url(), extra_headers={"X-Forwarded-Host": "override"})
    reply = await request(gw, headers=[("X-Forwarded-Host", "client.example")])
    assert reply.status == 200
    assert auth.requests[0].values(b"x-forwarded-host") == [b"override"]


def test_a_body_after_the_head_is_waited_for_and_one_with_it_is_not() -> None:
    from twisted.internet.task import Clock

    from tests.harness import outcome
    from tests.wire.test_agent import MemoryEndpoint

    clock = Clock()
    client = AuthClient(clock, AuthTarget.parse("http://127.0.0.1:9/", True))
    endpoint = MemoryEndpoint()
    client._http._agent._connector._endpoints[(b"http", b"127.0.0.1", 9)] = endpoint
    fields = ((b"Host", b"127.0.0.1:9"),)
    later = outcome(client.call("GET", fields, None, 3.0))
    (connection,) = endpoint.connections
    connection.dataReceived(b"HTTP/1.1 403 No\r\nContent-Length: 6\r\n\r\nden")
    assert later == []
    connection.dataReceived(b"ied")
    assert [(r.status, r.body) for r in later] == [(403, b"denied")]
    at_once = outcome(client.call("GET", fields, None, 3.0))
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nX-User: u\r\nContent-Length: 0\r\n\r\n")
    assert [(r.status, r.headers.get(b"x-user"), r.body) for r in at_once] == [(200, (b"u",), b"")]
    clock.advance(10)  # past their timeout: answered calls stay answered
    assert [r.status for r in later + at_once] == [403, 200]
