"""
Conformance suite: one test per case of the behaviour contract
(``reference/forward-auth-contract.md`` section 4), named after it.

Everything runs over real loopback sockets: a mock auth service and an echo
upstream written as small ``twisted.web`` resources below, and ONE gateway
carrying every route of the reference test files (set up once per module,
which stands for the reference's setup-only TESTs: forward-auth.t 2/17/20,
forward-auth2.t 1, forward-auth3.t 1).

Differences from the reference fixtures, all deliberate:

* "u1" (the gateway itself) + ``proxy-rewrite`` to ``/echo`` becomes a route
  whose upstream is the echo server directly: the echo ignores the path.
* Route 6 (degradation) gets its own URI (``/degrade``) as the contract
  advises, so degradation is really exercised.
* Route 8's unreachable auth service is a just-closed loopback port.
* forward-auth3's ``serverless-post-function`` (which replies with the
  request headers after forward-auth) is the echo upstream.
"""
from __future__ import annotations

import gzip
import json
from io import BytesIO
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

import attr
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, PotentialDataLoss, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from fauth.auth.forward import ForwardAuth
from fauth.config import parse_forward_auth
from fauth.edge.gateway import AuthClients
from fauth.config.schema import SchemaError, check_forward_auth
from tests.harness import GatewayUnderTest, LogCapture, raw_request, start_gateway
from tests.servers import listen_on_loopback, port_url

USER = b"i-am-an-user"
FORBIDDEN_PAGE = (
    b"<html>\r\n<head><title>403 Forbidden</title></head>\r\n<body>\r\n"
    b"<center><h1>403 Forbidden</h1></center>\r\n</body>\r\n</html>\r\n"
)


# ---------------------------------------------------------------------------
# Mock services
# ---------------------------------------------------------------------------


def _first(request: Any, name: bytes) -> Optional[bytes]:
    values = request.requestHeaders.getRawHeaders(name)
    return values[0] if values else None


def headers_json(request: Any) -> Dict[str, Any]:
    """The request headers, names lower-cased; a repeated header becomes a list."""
    out: Dict[str, Any] = {}
    for name, values in request.requestHeaders.getAllRawHeaders():
        decoded = [v.decode("latin-1") for v in values]
        out[name.decode("latin-1").lower()] = decoded[0] if len(decoded) == 1 else decoded
    return out


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


class AuthMock(Resource):
    """
    The auth services of the reference tests, one path each:

    * ``/auth``: forward-auth.t branches A-G, keyed on ``Authorization``;
    * ``/crashed-auth``: closes the connection without answering (nginx 444);
    * ``/auth-frame``: 200 with ``X-Auth-Saw-Te`` = the Transfer-Encoding received;
    * ``/auth2``: forward-auth2.t, framing headers per auth method;
    * ``/auth3``: forward-auth3.t, always 200 without ``X-User-ID``;
    * ``/auth-doc``, ``/auth-tenant``: the documentation's examples (D1-D3);
    * ``/x/...`` and ``/inspect``: the extra cases X1-X11.

    Every call is counted per path; ``/x/slow`` never answers.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: Dict[str, int] = {}
        self.frames: List[Dict[str, Any]] = []
        self.pending: List[Any] = []

    def count(self, path: str) -> int:
        return self.calls.get(path, 0)

    def render(self, request: Any) -> Any:
        path = request.path.decode("latin-1")
        self.calls[path] = self.calls.get(path, 0) + 1
        handler = {
            "/auth": self._auth,
            "/crashed-auth": self._crashed,
            "/auth-frame": self._frame,
            "/auth2": self._auth2,
            "/auth3": self._auth3,
            "/auth-doc": self._doc,
            "/auth-tenant": self._tenant,
            "/inspect": self._inspect,
            "/x/302": self._redirect,
            "/x/followed": self._ok,
            "/x/500": self._boom,
            "/x/204": self._no_content,
            "/x/dup": self._dup,
            "/x/slow": self._slow,
        }.get(path)
        if handler is None:
            request.setResponseCode(404)
            return b"no such mock"
        return handler(request)

    # forward-auth.t ------------------------------------------------------

    def _auth(self, request: Any) -> Any:
        authorization = _first(request, b"authorization")
        if authorization == b"111":  # A
            return b""
        if authorization == b"222":  # B
            request.setHeader(b"X-User-ID", USER)
            return b""
        if authorization == b"333":  # C
            request.setResponseCode(403)
            request.setHeader(b"Location", b"http://example.com/auth")
            return b""
        if authorization == b"444":  # D
            request.setResponseCode(403)
            request.setHeader(b"Content-Type", b"application/json")
            return _dumps(headers_json(request))
        for key, expected in ((b"777", b"123"), (b"888", b"abcd")):  # E, F
            if authorization == key:
                tenant = _first(request, b"tenant_id")
                if tenant == expected:
                    request.setHeader(b"X-User-ID", USER)
                    return b""
                request.setResponseCode(400)
                return b"tenant_id is " + (tenant if tenant is not None else b"nil")
        if request.method == b"POST":  # G
            try:
                data = json.loads(request.content.read())
            except ValueError:
                request.setResponseCode(400)
                return b"bad json"
            value = data.get("authorization") if isinstance(data, dict) else None
            if value == "555":
                request.setHeader(b"X-User-ID", USER)
                return b""
            if value == "666":
                request.setResponseCode(403)
                request.setHeader(b"Location", b"http://example.com/auth")
                return b""
        request.setResponseCode(404)
        return b"no branch matched"

    def _crashed(self, request: Any) -> Any:
        request.channel.transport.loseConnection()
        return NOT_DONE_YET

    def _frame(self, request: Any) -> Any:
        te = _first(request, b"transfer-encoding")
        self.frames.append(
            {
                "te": te,
                "cl": _first(request, b"content-length"),
                "body": request.content.read(),
            }
        )
        request.setHeader(b"X-Auth-Saw-Te", te if te is not None else b"none")
        return b""

    # forward-auth2.t / forward-auth3.t -------------------------------------

    def _auth2(self, request: Any) -> Any:
        if _first(request, b"authorization") != b"token-headers-test":
            request.setResponseCode(403)
            return b""
        framing = any(
            request.requestHeaders.hasHeader(name)
            for name in (b"content-length", b"transfer-encoding", b"content-encoding")
        )
        if request.method == b"POST":
            ok = framing
        else:
            ok = not framing
        if not ok:
            request.setResponseCode(403)
        return b""

    def _auth3(self, request: Any) -> Any:
        request.setHeader(b"X-Other", b"present")
        return b""

    # documentation examples ----------------------------------------------

    def _doc(self, request: Any) -> Any:
        authorization = _first(request, b"authorization")
        if authorization == b"123":
            return b""
        if authorization == b"321":
            request.setHeader(b"X-User-ID", b"i-am-user")
            return b""
        request.setResponseCode(403)
        request.setHeader(b"X-Forward-Auth", b"Fail")
        return FORBIDDEN_PAGE

    def _tenant(self, request: Any) -> Any:
        tenant = _first(request, b"tenant_id")
        if tenant == b"123":
            return b""
        request.setResponseCode(403)
        return b"tenant_id is %s but expecting 123" % (tenant if tenant is not None else b"nil",)

    # extra cases -----------------------------------------------------------

    def _inspect(self, request: Any) -> Any:
        request.setResponseCode(403)
        request.setHeader(b"Content-Type", b"application/json")
        return _dumps(
            {
                "method": request.method.decode("latin-1"),
                "uri": request.uri.decode("latin-1"),
                "headers": headers_json(request),
                "body": request.content.read().decode("latin-1"),
            }
        )

    def _redirect(self, request: Any) -> Any:
        request.setResponseCode(302)
        request.setHeader(
            b"Location", b"http://127.0.0.1:%d/x/followed" % (request.getHost().port,)
        )
        return b""

    def _ok(self, request: Any) -> Any:
        return b"followed"

    def _boom(self, request: Any) -> Any:
        request.setResponseCode(500)
        request.setHeader(b"Content-Type", b"application/x-boom")
        return b"boom"

    def _no_content(self, request: Any) -> Any:
        request.setResponseCode(204)
        request.setHeader(b"X-User-ID", b"from-204")
        return b""

    def _dup(self, request: Any) -> Any:
        request.responseHeaders.setRawHeaders(b"X-User-ID", [b"first", b"second"])
        return b""

    def _slow(self, request: Any) -> Any:
        self.pending.append(request)
        request.notifyFinish().addBoth(lambda _: self.pending.remove(request))
        return NOT_DONE_YET

    def release(self) -> None:
        """Drop the connections of requests that never got an answer."""
        for request in list(self.pending):
            request.channel.transport.abortConnection()


class EchoUpstream(Resource):
    """Answers 200 with the JSON of the request headers (lower-cased names)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: List[bytes] = []

    def render(self, request: Any) -> bytes:
        self.bodies.append(request.content.read())
        request.setHeader(b"Content-Type", b"application/json")
        return _dumps(headers_json(request))


# ---------------------------------------------------------------------------
# The gateway with every route of the contract
# ---------------------------------------------------------------------------

STD_LISTS = {
    "request_headers": ["Authorization"],
    "upstream_headers": ["X-User-ID"],
    "client_headers": ["Location"],
}


def build_routes(auth: str, closed_port: int) -> List[Dict[str, Any]]:
    """The routes of section 4, keyed as in the reference (plus our own)."""

    def fa(path: str, **attrs: Any) -> Dict[str, Any]:
        return dict(attrs, uri=auth + path)

    table: List[Tuple[str, str, Dict[str, Any]]] = [
        # forward-auth.t
        ("1", "/hello", fa("/auth", **STD_LISTS)),
        ("2", "/empty", fa("/auth", request_headers=["Authorization"])),
        (
            "3",
            "/ping",
            fa("/auth", request_method="POST", upstream_headers=["X-User-ID"], client_headers=["Location"]),
        ),
        ("5", "/nodegr", fa("/crashed-auth", **STD_LISTS)),
        ("6", "/degrade", fa("/crashed-auth", allow_degradation=True, **STD_LISTS)),
        (
            "8",
            "/onerror",
            dict(
                STD_LISTS,
                uri="http://127.0.0.1:%d/auth" % closed_port,
                status_on_error=503,
                allow_degradation=False,
            ),
        ),
        (
            "9",
            "/ping2",
            fa("/auth", request_method="GET", extra_headers={"tenant_id": "$post_arg.tenant_id"}, **STD_LISTS),
        ),
        ("10", "/ping3", fa("/auth", request_method="GET", extra_headers={"tenant_id": "abcd"}, **STD_LISTS)),
        (
            "11",
            "/crlf",
            fa("/auth", request_method="GET", request_headers=["Authorization"], extra_headers={"X-User": "$arg_user"}),
        ),
        (
            "11-degrade",
            "/crlf-degrade",
            fa(
                "/auth",
                request_headers=["Authorization"],
                extra_headers={"X-User": "$arg_user"},
                allow_degradation=True,
            ),
        ),
        ("100", "/toolarge", fa("/auth", request_method="POST", max_req_body_size=10, upstream_headers=["X-User-ID"])),
        (
            "101",
            "/withinlimit",
            fa("/auth", request_method="POST", max_req_body_size=1024, upstream_headers=["X-User-ID"]),
        ),
        ("pingframe", "/pingframe", fa("/auth-frame", request_method="POST", upstream_headers=["X-Auth-Saw-Te"])),
        # forward-auth2.t
        ("verify-post", "/verify-auth-post", fa("/auth2", request_headers=["Authorization"], request_method="POST")),
        ("verify-get", "/verify-auth-get", fa("/auth2", request_headers=["Authorization"], request_method="GET")),
        # forward-auth3.t
        ("hello3", "/hello3", fa("/auth3", upstream_headers=["X-User-ID"])),
        # documentation examples
        ("d1", "/d1", fa("/auth-doc", request_headers=["Authorization"], upstream_headers=["X-User-ID"])),
        ("d2", "/d2", fa("/auth-doc", request_headers=["Authorization"], client_headers=["X-Forward-Auth"])),
        ("d3", "/d3", fa("/auth-tenant", request_method="GET", extra_headers={"tenant_id": "$post_arg.tenant_id"})),
        # extra cases
        ("x1", "/x1", fa("/x/302", client_headers=["Location"])),
        ("x2", "/x2", fa("/x/500")),
        ("x3", "/x3", fa("/x/204", upstream_headers=["X-User-ID"])),
        ("x4", "/x4", fa("/x/dup", upstream_headers=["X-User-ID"])),
        ("x5", "/x5", fa("/x/slow", timeout=200, upstream_headers=["X-User-ID"])),
        ("x5-degrade", "/x5-degrade", fa("/x/slow", timeout=200, allow_degradation=True, upstream_headers=["X-User-ID"])),
        ("x6", "/x6", fa("/inspect")),
        ("x7", "/p", fa("/inspect?from=conf&x=%2F")),
        ("x8", "/x8", fa("/inspect", extra_headers={"X-Missing": "$http_x_nope", "X-Dflt": "${http_x_nope ?? dflt}"})),
        ("x9", "/x9", fa("/inspect", extra_headers={"X-Forwarded-Host": "override"})),
        ("x10", "/x10", fa("/inspect", request_method="POST")),
        ("x12", "/x12", fa("/inspect", extra_headers={"X-Route": "$route_id", "X-Route-Name": "$route_name"})),
        (
            "x11",
            "/x11",
            fa("/auth", request_headers=["Authorization"], _meta={"error_response": "custom failure"}),
        ),
        (
            "x11-error",
            "/x11-error",
            fa("/crashed-auth", _meta={"error_response": {"message": "auth is down"}}),
        ),
    ]
    routes = []
    for rid, uri, conf in table:
        route: Dict[str, Any] = {"id": rid, "uri": uri, "plugins": {"forward-auth": conf}, "upstream_id": "echo"}
        if rid == "d3":
            route["methods"] = ["POST"]
        if rid == "x12":
            route["name"] = "inspected route"
        routes.append(route)
    return routes


@attr.s(auto_attribs=True)
class Reply:
    status: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> Optional[List[str]]:
        values = self.headers.getRawHeaders(name.encode("latin-1"))
        return None if values is None else [v.decode("latin-1") for v in values]

    def json(self) -> Any:
        return json.loads(self.body)


@attr.s(auto_attribs=True)
class Env:
    reactor: Any
    auth: AuthMock
    echo: EchoUpstream
    gateway: GatewayUnderTest
    agent: Agent

    async def request(
        self,
        method: str,
        path: str,
        headers: Optional[Dict[str, str]] = None,
        body: Optional[bytes] = None,
    ) -> Reply:
        """One request like the reference's test client: C{Host: localhost}, redirects not followed."""
        sent = Headers({b"Host": [b"localhost"]})
        for name, value in (headers or {}).items():
            sent.setRawHeaders(name.encode("latin-1"), [value.encode("latin-1")])
        producer = FileBodyProducer(BytesIO(body)) if body is not None else None
        response = await self.agent.request(
            method.encode("ascii"), self.gateway.url(path).encode("ascii"), sent, producer
        )
        content = await read_body(response)
        return Reply(response.code, response.headers, content)

    async def raw(self, payload: bytes) -> Tuple[int, Dict[str, List[str]], bytes]:
        return parse_raw(await raw_request(self.reactor, self.gateway.port_number, payload))


class _Body(Protocol):
    def __init__(self, done: Deferred) -> None:
        self.chunks: List[bytes] = []
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def read_body(response: Any) -> "Deferred[bytes]":
    """The whole response body (C{readBody} without its deprecation warning on pooled transports)."""
    done: Deferred = Deferred()
    response.deliverBody(_Body(done))
    return done


def parse_raw(data: bytes) -> Tuple[int, Dict[str, List[str]], bytes]:
    """Status, headers (lower-cased names) and de-chunked body of a raw HTTP/1.1 answer; 1xx skipped."""
    while True:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        if 100 <= status < 200:
            data = rest
            continue
        break
    headers: Dict[str, List[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.decode("latin-1").strip().lower(), []).append(value.decode("latin-1").strip())
    body = rest
    if "chunked" in ",".join(headers.get("transfer-encoding", [])).lower():
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2:]
    return status, headers, body


@pytest_twisted.async_yield_fixture(scope="module")
async def env() -> AsyncIterator[Env]:
    from twisted.internet import reactor

    auth = AuthMock()
    echo = EchoUpstream()
    auth_port = await listen_on_loopback(reactor, auth)
    echo_port = await listen_on_loopback(reactor, echo)
    # An address where nothing listens: bind a port, then close it.
    closed = await listen_on_loopback(reactor, Resource())
    closed_port = closed.getHost().port
    await closed.stopListening()
    pool = HTTPConnectionPool(reactor, persistent=False)
    gateway = None
    try:
        gateway = await start_gateway(
            reactor,
            {
                "routes": build_routes(port_url(auth_port), closed_port),
                "upstreams": [
                    {
                        "id": "echo",
                        "type": "roundrobin",
                        "nodes": {"127.0.0.1:%d" % echo_port.getHost().port: 1},
                    }
                ],
            },
        )
        yield Env(reactor, auth, echo, gateway, Agent(reactor, pool=pool))
    finally:
        if gateway is not None:
            await gateway.stop()
        auth.release()
        await pool.closeCachedConnections()
        await auth_port.stopListening()
        await echo_port.stopListening()


# ---------------------------------------------------------------------------
# 4.1 t/plugin/forward-auth.t
# ---------------------------------------------------------------------------


def _schema_result(conf: Dict[str, Any]) -> str:
    try:
        check_forward_auth(conf)
    except SchemaError as e:
        schema_message = str(e)
    else:
        schema_message = "done"
    try:
        parse_forward_auth(conf)
    except SchemaError as e:
        parsed_message = str(e)
    else:
        parsed_message = "done"
    assert schema_message == parsed_message
    return schema_message


def test_forward_auth_t_TEST_1_schema_sanity() -> None:
    uri = "http://127.0.0.1:8199"
    cases = [
        ({"uri": uri}, "done"),
        ({"request_headers": ["test"]}, 'property "uri" is required'),
        ({"uri": 3233}, 'property "uri" validation failed: wrong type: expected string, got number'),
        (
            {"uri": uri, "request_headers": "test"},
            'property "request_headers" validation failed: wrong type: expected array, got string',
        ),
        ({"uri": uri, "request_method": "POST"}, "done"),
        (
            {"uri": uri, "request_method": "PUT"},
            'property "request_method" validation failed: matches none of the enum values',
        ),
    ]
    assert [_schema_result(conf) for conf, _ in cases] == [expected for _, expected in cases]


@pytest_twisted.ensureDeferred
async def test_forward_auth_t_TEST_3_request_headers_forwarded(env: Env) -> None:
    reply = await env.request("GET", "/hello", {"Authorization": "111"})
    assert reply.status == 200
    assert b'"authorization":"111"' in reply.body


@pytest_twisted.ensureDeferred
async def test_forward_auth_t_TEST_4_upstream_headers(env: Env) -> None:
    reply = await env.request("GET", "/hello", {"Authorization": "222"})
    assert reply.status == 200
    assert b'"x-user-id":"i-am-an-user"' in reply.body


@pytest_twisted.ensureDeferred
async def test_forward_auth_t_TEST_5_client_headers(env: Env) -> None:
    reply = await env.request("GET", "/hello", {"Authorization": "333"})
    assert reply.status == 403
    assert reply.header("Location") == ["http://example.com/auth"]


@pytest_twisted.ensureDeferred
async def test_forward_auth_t_TEST_6_generated_headers_override_client_ones(env: Env) -> None:
    reply = await env.request(
        "GET", "/hello", {"Authorization": "444", "X-Forwarded-Host": "apisix.apache.org"}
    )
    assert reply.status == 403
    seen = reply.json()  # the auth service's body, relayed verbatim
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-method"] == "GET"
    assert seen["x-forwarded-host"] == "localhost"
    assert seen["x-forwarded-uri"] == "/hello"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert b"apisix.apache.org" not in reply.body


@pytest_twisted.ensureDeferred
async def test_forward_auth_t_TEST_7_no_upstream_headers_configured(env: Env) -> None:
    reply = await env.request("GET", "/empty", {"Authorization": "222"})
    assert reply.status == 200
    assert b'"authorization":"222"' in reply.body  # the echo answered
    assert b'"x-user-id":"i-am-an-user"' not in reply.body


@pytest_twisted.ensureDeferred
async def test_forward_auth_t_TEST_8_no_client_headers_configured(env: Env) -> None:
    reply = await env.request("GET", "/empty", {"Authorization": "333"})
    assert reply.status == 403
    assert reply.header("Location") is None


@pytest_twisted.ensureDeferred
async def test_forward_auth_t_TEST_9_post_mode_body_forwarded(env: Env) -> None:
    body = b'{"authorization": "555"}'
    reply = await env.request("POST", "/ping", body=body)
    assert reply.status == 200
    assert b'"x-user-id":"i-am-an-user"' in reply.body
    # The body read for the auth call is still sent upstream.
    assert env.echo.bodies[-1] == body


@pytest_twisted.ensureDeferred
async def test_forward_auth_t_TEST_10_post_mode_failure(env: Env) -> None:
    reply = await env.request("POST", "/ping", body=b'{"authorization": "666"}')
    assert reply.status == 403
    assert reply.header("Location") == ["http://example.com/auth"]


@pytest_twisted.ensureDeferred
async def test_forward_auth_t_TEST_11_auth_server_drops_connection(env: Env) -> None:
    before = env.auth.count("/crashed-auth")
    with LogCapture() as logs:
        reply = await env.request("GET", "/nodegr", {"Authorization": "111"})
    assert reply.status == 403
    assert env.auth.count("/crashed-auth") > before
    assert logs.contains("failed to process forward auth, err: closed"), logs.lines


@pytest_twisted.ensureDeferred
async def test_forward_auth_t_TEST_12_degradation(env: Env) -> None:
    before = env.auth.count("/crashed-auth")
    reply = await env.request("GET", "/degrade", {"Authorization": "111"})
    assert env.auth.count("/crashed-auth") > before  # the auth service was tried...
    assert reply.status == 200  # ...and the upstream answered anyway
    assert b'"authorization":"111"' in reply.body


@pytest_twisted.ensureDeferred
async def test_forward_auth_t_TEST_13_status_on_error(env: Env) -> None:
    with LogCapture() as logs:
        reply = await env.request("GET", "/onerror", {"Authorization": "333"})
    assert reply.status == 503
    assert reply.body == b""
    assert logs.contains("failed to process forward auth, err: "), logs.lines


@pytest_twisted.ensureDeferred
async def test_forward_auth_t_TEST_14_extra_headers_from_post_arg(env: Env) -> None:
    body = b'{"tenant_id": 123}'
    reply = await env.request(
        "POST", "/ping2", {"Authorization": "777", "Content-Type": "application/json"}, body
    )
    assert reply.status == 200, reply.body
    assert b'"x-user-id":"i-am-an-user"' in reply.body
    assert env.echo.bodies[-1] == body


@pytest_twisted.ensureDeferred
async def test_forward_auth_t_TEST_15_extra_headers_literal(env: Env) -> None:
    reply = await env.request("GET", "/ping3", {"Authorization": "888"})
    assert reply.status == 200, reply.body
    assert b'"x-user-id":"i-am-an-user"' in reply.body


@pytest_twisted.ensureDeferred
async def test_forward_auth_t_TEST_16_crlf_injection_blocked(env: Env) -> None:
    before = env.auth.count("/auth")
    with LogCapture() as logs:
        reply = await env.request(
            "GET", "/crlf?user=guest%0d%0ax-user1:%20admin", {"Authorization": "111"}
        )
    assert reply.status == 403
    assert logs.contains(
        "failed to process forward auth, err: invalid characters found in header value"
    ), logs.lines
    assert env.auth.count("/auth") == before  # refused, not sanitised and sent


@pytest_twisted.ensureDeferred
async def test_crlf_from_the_client_is_never_degraded(env: Env) -> None:
    """
    Deliberate deviation from the reference: a client whose own data makes
    the auth request unsendable must not ride allow_degradation past auth.
    """
    before = env.auth.count("/auth")
    with LogCapture() as logs:
        reply = await env.request(
            "GET", "/crlf-degrade?user=guest%0d%0ax-user1:%20admin", {"Authorization": "111"}
        )
    assert reply.status == 403
    assert reply.body == b""
    assert logs.contains("invalid characters found in header value"), logs.lines
    assert env.auth.count("/auth") == before
    ok = await env.request("GET", "/crlf-degrade?user=guest", {"Authorization": "111"})
    assert ok.status == 200


@pytest_twisted.ensureDeferred
async def test_forward_auth_t_TEST_18_body_over_max_req_body_size(env: Env) -> None:
    before = env.auth.count("/auth")
    with LogCapture() as logs:
        reply = await env.request("POST", "/toolarge", body=b'{"authorization":"555"}')
    assert reply.status == 413
    assert logs.contains("failed to read request body"), logs.lines
    assert env.auth.count("/auth") == before


@pytest_twisted.ensureDeferred
async def test_forward_auth_t_TEST_19_body_within_limit(env: Env) -> None:
    reply = await env.request("POST", "/withinlimit", body=b'{"authorization":"555"}')
    assert reply.status == 200
    assert b"i-am-an-user" in reply.body


@pytest_twisted.ensureDeferred
async def test_forward_auth_t_TEST_21_chunked_client_body_is_reframed(env: Env) -> None:
    del env.auth.frames[:]
    status, _, body = await env.raw(
        b"POST /pingframe HTTP/1.1\r\n"
        b"Host: localhost\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"Connection: close\r\n"
        b"\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    assert status == 200
    assert b'"x-auth-saw-te":"none"' in body
    assert env.auth.frames == [{"te": None, "cl": b"5", "body": b"hello"}]
    assert env.echo.bodies[-1] == b"hello"


# ---------------------------------------------------------------------------
# 4.2 t/plugin/forward-auth2.t
# ---------------------------------------------------------------------------

TOKEN = {"Authorization": "token-headers-test"}
TOKEN_BODY = b'{"authorization": "token-headers-test"}'


@pytest_twisted.ensureDeferred
async def test_forward_auth2_t_TEST_2_get_auth_request_has_no_framing_headers(env: Env) -> None:
    reply = await env.request("GET", "/verify-auth-get", TOKEN)
    assert reply.status == 200


@pytest_twisted.ensureDeferred
async def test_forward_auth2_t_TEST_3_bodiless_post_auth_request_has_content_length(env: Env) -> None:
    reply = await env.request("GET", "/verify-auth-post", TOKEN)
    assert reply.status == 200


@pytest_twisted.ensureDeferred
async def test_forward_auth2_t_TEST_4_post_auth_request_with_body(env: Env) -> None:
    reply = await env.request("POST", "/verify-auth-post", TOKEN, TOKEN_BODY)
    assert reply.status == 200


@pytest_twisted.ensureDeferred
async def test_forward_auth2_t_TEST_5_client_body_not_leaked_into_get_auth_request(env: Env) -> None:
    reply = await env.request("POST", "/verify-auth-get", TOKEN, TOKEN_BODY)
    assert reply.status == 200
    assert env.echo.bodies[-1] == TOKEN_BODY  # the upstream still gets the body


# ---------------------------------------------------------------------------
# 4.3 t/plugin/forward-auth3.t
# ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_forward_auth3_t_TEST_2_absent_upstream_header_is_removed(env: Env) -> None:
    reply = await env.request("GET", "/hello3", {"X-User-ID": "injected-value"})
    assert reply.status == 200
    seen = reply.json()
    assert "host" in seen  # the echo answered with the request headers
    assert "x-user-id" not in seen
    assert b"injected-value" not in reply.body


# ---------------------------------------------------------------------------
# 4.4 t/plugin/security-warning.t
# ---------------------------------------------------------------------------

NO_TLS_WARNING = "Using forward-auth uri with no TLS is a security risk"


async def _build_forward_auth(uri: str) -> LogCapture:
    from twisted.internet import reactor

    clients = AuthClients(reactor)
    with LogCapture() as logs:
        conf = parse_forward_auth({"uri": uri})  # check_schema passes
        ForwardAuth(conf, clients.get(conf), reactor)
    await clients.close()
    return logs


@pytest_twisted.ensureDeferred
async def test_security_warning_t_TEST_13_http_uri_warns() -> None:
    logs = await _build_forward_auth("http://127.0.0.1:8199")
    assert logs.contains(NO_TLS_WARNING), logs.lines


@pytest_twisted.ensureDeferred
async def test_security_warning_t_TEST_14_https_uri_does_not_warn() -> None:
    logs = await _build_forward_auth("https://127.0.0.1:8199")
    assert not logs.contains(NO_TLS_WARNING), logs.lines
    assert not logs.contains("security risk"), logs.lines


# ---------------------------------------------------------------------------
# 4.5 documentation examples
# ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_doc_D1_request_and_upstream_headers(env: Env) -> None:
    reply = await env.request("GET", "/d1", {"Authorization": "123"})
    assert reply.status == 200
    assert reply.json()["authorization"] == "123"
    reply = await env.request("GET", "/d1", {"Authorization": "321"})
    assert reply.status == 200
    assert reply.json()["x-user-id"] == "i-am-user"


@pytest_twisted.ensureDeferred
async def test_doc_D2_client_headers_on_failure(env: Env) -> None:
    reply = await env.request("GET", "/d2")
    assert reply.status == 403
    assert reply.header("X-Forward-Auth") == ["Fail"]
    assert reply.body == FORBIDDEN_PAGE


@pytest_twisted.ensureDeferred
async def test_doc_D3_extra_headers_from_form_post_arg(env: Env) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    reply = await env.request("POST", "/d3", form, b"tenant_id=123")
    assert reply.status == 200
    assert env.echo.bodies[-1] == b"tenant_id=123"
    reply = await env.request("POST", "/d3", form, b"tenant_id=000")
    assert reply.status == 403
    assert reply.body == b"tenant_id is 000 but expecting 123"


# ---------------------------------------------------------------------------
# 4.6 extra cases read from the code
# ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_extra_X1_redirect_relayed_not_followed(env: Env) -> None:
    reply = await env.request("GET", "/x1")
    assert reply.status == 302
    location = reply.header("Location")
    assert location is not None and location[0].endswith("/x/followed")
    assert env.auth.count("/x/followed") == 0


@pytest_twisted.ensureDeferred
async def test_extra_X2_auth_500_relayed_without_its_content_type(env: Env) -> None:
    reply = await env.request("GET", "/x2")
    assert reply.status == 500
    assert reply.body == b"boom"
    assert reply.header("Content-Type") != ["application/x-boom"]


@pytest_twisted.ensureDeferred
async def test_extra_X3_auth_204_is_success(env: Env) -> None:
    reply = await env.request("GET", "/x3")
    assert reply.status == 200
    assert reply.json()["x-user-id"] == "from-204"


@pytest_twisted.ensureDeferred
async def test_extra_X4_repeated_auth_header_reaches_upstream_twice(env: Env) -> None:
    reply = await env.request("GET", "/x4", {"X-User-ID": "client"})
    assert reply.status == 200
    assert reply.json()["x-user-id"] == ["first", "second"]


@pytest_twisted.ensureDeferred
async def test_extra_X5_auth_timeout(env: Env) -> None:
    with LogCapture() as logs:
        reply = await env.request("GET", "/x5", {"X-User-ID": "client"})
    assert reply.status == 403
    assert reply.body == b""
    assert logs.contains("failed to process forward auth, err: timeout"), logs.lines
    # With degradation the request goes through untouched: upstream_headers
    # are not cleared on this path, so the client's value survives.
    reply = await env.request("GET", "/x5-degrade", {"X-User-ID": "client"})
    assert reply.status == 200
    assert reply.json()["x-user-id"] == "client"
    assert env.auth.count("/x/slow") >= 2


@pytest_twisted.ensureDeferred
async def test_extra_X6_client_x_forwarded_for_dropped(env: Env) -> None:
    reply = await env.request("GET", "/x6", {"X-Forwarded-For": "1.2.3.4"})
    assert reply.status == 403
    assert reply.json()["headers"]["x-forwarded-for"] == "127.0.0.1"


@pytest_twisted.ensureDeferred
async def test_extra_X7_forwarded_uri_keeps_client_query_request_line_does_not(env: Env) -> None:
    reply = await env.request("GET", "/p?a=1&b=%20")
    assert reply.status == 403
    seen = reply.json()
    assert seen["headers"]["x-forwarded-uri"] == "/p?a=1&b=%20"
    assert seen["uri"] == "/inspect?from=conf&x=%2F"
    assert seen["method"] == "GET"


@pytest_twisted.ensureDeferred
async def test_extra_X8_missing_variable_empty_or_default(env: Env) -> None:
    reply = await env.request("GET", "/x8")
    assert reply.status == 403
    headers = reply.json()["headers"]
    assert headers["x-missing"] == ""
    assert headers["x-dflt"] == "dflt"


@pytest_twisted.ensureDeferred
async def test_extra_X9_extra_headers_override_generated(env: Env) -> None:
    reply = await env.request("GET", "/x9")
    assert reply.status == 403
    assert reply.json()["headers"]["x-forwarded-host"] == "override"


@pytest_twisted.ensureDeferred
async def test_extra_X12_route_id_and_name_in_extra_headers(env: Env) -> None:
    # The matched route reaches the variables: $route_name was always empty.
    reply = await env.request("GET", "/x12")
    assert reply.status == 403
    headers = reply.json()["headers"]
    assert (headers["x-route"], headers["x-route-name"]) == ("x12", "inspected route")


@pytest_twisted.ensureDeferred
async def test_extra_X10_post_mode_content_encoding_kept_expect_dropped(env: Env) -> None:
    payload = gzip.compress(b'{"hello": "world"}')
    status, _, body = await env.raw(
        b"POST /x10 HTTP/1.1\r\n"
        b"Host: localhost\r\n"
        b"Content-Encoding: gzip\r\n"
        b"Expect: 100-continue\r\n"
        b"Content-Length: %d\r\n"
        b"Connection: close\r\n"
        b"\r\n" % (len(payload),) + payload
    )
    assert status == 403
    seen = json.loads(body)
    assert seen["method"] == "POST"
    assert seen["headers"]["content-encoding"] == "gzip"
    assert "expect" not in seen["headers"]
    assert "transfer-encoding" not in seen["headers"]
    assert seen["headers"]["content-length"] == str(len(payload))
    assert seen["body"] == payload.decode("latin-1")  # raw bytes, not decoded


@pytest_twisted.ensureDeferred
async def test_extra_X11_meta_error_response(env: Env) -> None:
    # A denial >= 400: the configured body replaces the auth service's.
    reply = await env.request("GET", "/x11", {"Authorization": "444"})
    assert reply.status == 403
    assert reply.body == b"custom failure"
    # Success is unaffected.
    reply = await env.request("GET", "/x11", {"Authorization": "111"})
    assert reply.status == 200
    assert reply.json()["authorization"] == "111"
    # A transport failure: status_on_error with the configured body.
    reply = await env.request("GET", "/x11-error")
    assert reply.status == 403
    assert json.loads(reply.body) == {"message": "auth is down"}
