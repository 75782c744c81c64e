"""
fauth's forward-auth extensions (issue 21) through a real gateway on
loopback: variables in C{uri}, C{preserve_request_method},
C{run_on_preflight} and C{allow_partial_message}.  The auth service and the
upstream are small Twisted servers that record what they were sent; the
upstream reports each body by length and SHA-256.
"""
from __future__ import annotations

import json
from hashlib import sha256
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.web.resource import Resource

from fauth.config import parse_config
from fauth.config.errors import ConfigError
from fauth.config.templates import UnsafeValue, compile_uri
from fauth.edge.gateway import Gateway
from fauth.edge.resources import GatewayResource, GatewaySite
from fauth.observe.accesslog import AccessLog
from fauth.observe.metrics import GatewayMetrics
from tests.harness import raw_request
from tests.servers import listen_on_loopback

LIMIT = 1024


class RecordingAuth(Resource):
    """
    Records every auth request (method, target, headers, body); answers 403
    when its own target or C{X-Forwarded-Uri} holds C{deny}, else 200 with
    C{X-User-ID: alice}.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[Dict[str, Any]] = []

    def render(self, request: Any) -> bytes:
        headers = {k.decode().lower(): [v.decode("latin-1") for v in vs] for k, vs in request.requestHeaders.getAllRawHeaders()}
        body = request.content.read() if request.content is not None else b""
        self.calls.append({"method": request.method.decode(), "uri": request.uri.decode("latin-1"), "headers": headers, "body": body})
        forwarded = request.getHeader(b"x-forwarded-uri") or b""
        if b"deny" in request.uri or b"deny" in forwarded:
            request.setResponseCode(403)
            return b"denied"
        request.setHeader(b"X-User-ID", b"alice")
        return b""


class Echo(Resource):
    """Answers what it received: method, target, headers, body length and SHA-256."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: List[Dict[str, Any]] = []

    def render(self, request: Any) -> bytes:
        body = request.content.read() if request.content is not None else b""
        seen = {
            "method": request.method.decode(),
            "uri": request.uri.decode("latin-1"),
            "headers": {k.decode().lower(): [v.decode("latin-1") for v in vs] for k, vs in request.requestHeaders.getAllRawHeaders()},
            "length": len(body),
            "sha256": sha256(body).hexdigest(),
        }
        self.seen.append(seen)
        return json.dumps(seen).encode()


def _route(rid: str, uri: str, auth: Dict[str, Any], echo_port: int) -> Dict[str, Any]:
    return {
        "id": rid,
        "uri": uri,
        "plugins": {"forward-auth": auth},
        "upstream": {"nodes": {"127.0.0.1:%d" % echo_port: 1}},
    }


class Env:
    def __init__(self, reactor: Any, auth: RecordingAuth, echo: Echo, port: int, metrics: GatewayMetrics, log: str) -> None:
        self.reactor = reactor
        self.auth = auth
        self.echo = echo
        self.port = port
        self.metrics = metrics
        self.log = log

    async def send(self, payload: bytes) -> Tuple[int, Dict[str, str], bytes]:
        raw = await raw_request(self.reactor, self.port, payload)
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers, body

    def outcomes(self, route: str) -> Dict[str, float]:
        text = self.metrics.exposition()[0].decode()
        return {
            s.labels["outcome"]: s.value
            for family in text_string_to_metric_families(text)
            if family.name == "fauth_auth_decisions"
            for s in family.samples
            if s.name == "fauth_auth_decisions_total" and s.labels.get("route") == route
        }

    def access_lines(self) -> List[Dict[str, Any]]:
        assert self.metrics.access_log is not None
        self.metrics.access_log.flush()
        with open(self.log) as f:
            return [json.loads(line) for line in f.read().splitlines()]


async def _env(reactor: Any, tmp_path: Any, routes: List[Tuple[str, str, Dict[str, Any]]]) -> Any:
    auth, echo = RecordingAuth(), Echo()
    auth_port = await listen_on_loopback(reactor, auth)
    echo_port = await listen_on_loopback(reactor, echo)
    base = "http://127.0.0.1:%d" % auth_port.getHost().port
    conf = parse_config(
        {
            "listen": ["tcp:0"],
            "routes": [
                _route(rid, uri, dict(plugin, uri=plugin["uri"].replace("AUTH", base)), echo_port.getHost().port)
                for rid, uri, plugin in routes
            ],
        }
    )
    gateway = Gateway(reactor, conf)
    metrics = GatewayMetrics(gateway)
    log = str(tmp_path / "access.log")
    metrics.access_log = AccessLog(log)
    site = GatewaySite(GatewayResource(gateway, metrics), conf.http, reactor=reactor)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)

    async def stop() -> None:
        await port.stopListening()
        await gateway.close()
        await auth_port.stopListening()
        await echo_port.stopListening()

    return Env(reactor, auth, echo, port.getHost().port, metrics, log), stop


def _get(target: str, *headers: str, method: str = "GET") -> bytes:
    lines = ["%s %s HTTP/1.1" % (method, target), "Host: gw", "Connection: close"] + list(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# ---------------------------------------------------------------------------
# 1. Variables in uri
# ---------------------------------------------------------------------------


class _Vars:
    def __init__(self, **values: str) -> None:
        self.values = values

    def lookup(self, name: str) -> Optional[str]:
        return self.values.get(name)


@pytest.mark.parametrize(
    "uri, values, target",
    [
        # A decoded path keeps its slashes and is encoded as a path.
        ("http://a/check$uri", {"uri": "/a b/\xc3\xbc"}, b"/check/a%20b/%C3%BC"),
        # A query value is one value: "&", "=", "?", "%", "+", "#" encoded.
        (
            "http://a/verify?uri=$request_uri&x=1",
            {"request_uri": "/a%20b?x=1&y=2+3#f"},
            b"/verify?uri=/a%2520b%3Fx%3D1%26y%3D2%2B3%23f&x=1",
        ),
        # In the path, "?" and "#" cannot start a query or fragment.
        ("http://a/u/$arg_name", {"arg_name": "x?y#z"}, b"/u/x%3Fy%23z"),
        # A default is encoded like a value; a missing variable is empty.
        ("http://a/t?who=${arg_who ?? a b}&v=$arg_v", {}, b"/t?who=a%20b&v="),
        # UTF-8 bytes of a value (latin-1 byte string) are encoded byte by byte.
        ("http://a/t?h=$http_x", {"http_x": "\xc3\xa9"}, b"/t?h=%C3%A9"),
    ],
)
def test_uri_values_are_encoded_for_where_they_stand(uri: str, values: Dict[str, str], target: bytes) -> None:
    template = compile_uri(uri)
    assert template is not None
    assert template.render(_Vars(**values)) == target


@pytest.mark.parametrize(
    "uri, values, message",
    [
        ("http://a/t?v=$arg_v", {"arg_v": "a\r\nX-Evil: 1"}, "invalid characters found in query"),
        ("http://a/t/$arg_v", {"arg_v": "a\nb"}, "invalid characters found in path"),
        ("http://a/t/$arg_v", {"arg_v": "a\x00"}, "invalid characters found in path"),
        ("http://a/users/$arg_u/x", {"arg_u": ".."}, "dot segment in path"),
        ("http://a/users/$arg_u", {"arg_u": "../admin"}, "dot segment in path"),
        ("http://a/users/$arg_u", {"arg_u": "."}, "dot segment in path"),
    ],
)
def test_uri_values_with_control_characters_or_dot_segments_are_refused(
    uri: str, values: Dict[str, str], message: str
) -> None:
    template = compile_uri(uri)
    assert template is not None
    with pytest.raises(UnsafeValue, match=message):
        template.render(_Vars(**values))


def test_uri_without_variables_is_used_as_apisix_does() -> None:
    assert compile_uri("http://a/verify?x=1") is None
    assert compile_uri("http://a/price$") is None  # a lone "$" names nothing


@pytest.mark.parametrize(
    "uri, message",
    [
        ("http://$host/verify", "variables are allowed only in the path and query, after the host and port"),
        ("http://auth$uri", "variables are allowed only in the path and query, after the host and port"),
        ("http://auth:$server_port/x", "variables are allowed only in the path and query, after the host and port"),
        ("$scheme://auth/x", "variables are allowed only in the path and query, after the host and port"),
        ("http://auth/x?u=$reqest_uri", 'unknown variable "$reqest_uri"'),
        ("http://auth/x$uri#top", "a uri with variables cannot have a fragment"),
        ("http://auth/a b$uri", "invalid characters found in path"),
    ],
)
def test_uri_variables_refused_at_config_time(uri: str, message: str) -> None:
    doc = {
        "routes": [
            {"id": "v", "uri": "/", "plugins": {"forward-auth": {"uri": uri}}, "upstream": {"nodes": {"127.0.0.1:1": 1}}}
        ]
    }
    with pytest.raises(ConfigError) as raised:
        parse_config(doc)
    assert str(raised.value) == (
        'route "v": plugin forward-auth: '
        'property "uri" validation failed: %s' % message
    )


@pytest_twisted.ensureDeferred
async def test_uri_variables_reach_the_auth_service_encoded(reactor: Any, tmp_path: Any) -> None:
    env, stop = await _env(
        reactor,
        tmp_path,
        [
            ("q", "/q/*", {"uri": "AUTH/verify?uri=$request_uri&path=$uri"}),
            ("p", "/p/*", {"uri": "AUTH/prefix$uri?q=${arg_q ?? none}", "upstream_headers": ["X-User-ID"]}),
        ],
    )
    try:
        status, _, _ = await env.send(_get("/q/a%20b/../c?x=1&y=%26"))
        assert status == 200
        call = env.auth.calls[-1]
        # $request_uri is the raw target, $uri the decoded normalised path.
        assert call["uri"] == "/verify?uri=%s&path=/q/c" % quote("/q/a%20b/../c?x=1&y=%26", safe="/")
        assert call["headers"]["x-forwarded-uri"] == ["/q/c?x=1&y=%26"]
        assert call["method"] == "GET"

        status, _, body = await env.send(_get("/p/a%20b/%C3%A9"))
        assert status == 200
        assert env.auth.calls[-1]["uri"] == "/prefix/p/a%20b/%C3%A9?q=none"
        assert json.loads(body)["headers"]["x-user-id"] == ["alice"]

        status, _, _ = await env.send(_get("/p/x?q=a%2Bb%26c%3Dd"))
        assert env.auth.calls[-1]["uri"] == "/prefix/p/x?q=a%2Bb%26c%3Dd"

        # The auth service decides on the rendered target.
        status, _, body = await env.send(_get("/p/x?q=deny"))
        assert (status, body) == (403, b"denied")
        assert len(env.echo.seen) == 3
    finally:
        await stop()


@pytest_twisted.ensureDeferred
async def test_crlf_in_a_uri_variable_answers_status_on_error_never_degraded(reactor: Any, tmp_path: Any) -> None:
    env, stop = await _env(
        reactor,
        tmp_path,
        [
            ("d", "/d/*", {"uri": "AUTH/v?q=$arg_q", "allow_degradation": True, "status_on_error": 503}),
            ("u", "/u/*", {"uri": "AUTH/users/$arg_u"}),
        ],
    )
    try:
        status, _, _ = await env.send(_get("/d/x?q=a%0d%0aX-Injected:%201"))
        assert status == 503
        status, _, _ = await env.send(_get("/u/x?u=.."))
        assert status == 403
        assert env.auth.calls == [] and env.echo.seen == []
        assert env.outcomes("d")["error"] == 1 and env.outcomes("d")["degraded"] == 0
    finally:
        await stop()


@pytest_twisted.ensureDeferred
async def test_cached_decisions_are_keyed_on_the_rendered_uri(reactor: Any, tmp_path: Any) -> None:
    # $http_x_tenant reaches the auth service only through the uri: two
    # requests alike but for it must not share a decision.
    env, stop = await _env(reactor, tmp_path, [("c", "/c", {"uri": "AUTH/t/$http_x_tenant", "cache": {"ttl": 60}})])
    try:
        assert (await env.send(_get("/c", "X-Tenant: ok")))[0] == 200
        assert (await env.send(_get("/c", "X-Tenant: ok")))[0] == 200
        assert (await env.send(_get("/c", "X-Tenant: deny")))[0] == 403
        assert [c["uri"] for c in env.auth.calls] == ["/t/ok", "/t/deny"]
    finally:
        await stop()


# ---------------------------------------------------------------------------
# 2. preserve_request_method
# ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_preserve_request_method_sends_the_clients_method_without_the_body(reactor: Any, tmp_path: Any) -> None:
    env, stop = await _env(reactor, tmp_path, [("m", "/m/*", {"uri": "AUTH/auth", "preserve_request_method": True})])
    try:
        status, _, body = await env.send(
            b"PUT /m/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello"
        )
        assert status == 200
        call = env.auth.calls[-1]
        assert (call["method"], call["body"], call["headers"]["content-length"]) == ("PUT", b"", ["0"])
        assert call["headers"]["x-forwarded-method"] == ["PUT"]
        # The upstream gets the request as it was.
        seen = json.loads(body)
        assert (seen["method"], seen["length"], seen["sha256"]) == ("PUT", 5, sha256(b"hello").hexdigest())

        for method in ("DELETE", "PATCH", "HEAD", "OPTIONS"):
            status, _, _ = await env.send(_get("/m/x", method=method))
            assert status == 200, method
            call = env.auth.calls[-1]
            assert call["method"] == method
            # Body-less methods say nothing of a body; PATCH says it is empty.
            assert call["headers"].get("content-length") == (["0"] if method == "PATCH" else None), method
            assert "transfer-encoding" not in call["headers"]
        # A denial of the preserved method is relayed as usual.
        status, _, body = await env.send(_get("/m/deny", method="DELETE"))
        assert (status, body, env.auth.calls[-1]["method"]) == (403, b"denied", "DELETE")
    finally:
        await stop()


@pytest_twisted.ensureDeferred
async def test_preserve_request_method_in_post_mode_sends_the_body_with_the_clients_method(
    reactor: Any, tmp_path: Any
) -> None:
    env, stop = await _env(
        reactor,
        tmp_path,
        [("mp", "/mp/*", {"uri": "AUTH/auth", "preserve_request_method": True, "request_method": "POST"})],
    )
    try:
        status, _, _ = await env.send(
            b"PUT /mp/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc"
        )
        assert status == 200
        call = env.auth.calls[-1]
        assert (call["method"], call["body"], call["headers"]["content-length"]) == ("PUT", b"abc", ["3"])
        # A GET stays a GET, without a body or a Content-Length.
        status, _, _ = await env.send(_get("/mp/x"))
        call = env.auth.calls[-1]
        assert (status, call["method"], call["body"]) == (200, "GET", b"")
        assert "content-length" not in call["headers"]
        # A POST without a body says it is empty, as in plain POST mode.
        status, _, _ = await env.send(b"POST /mp/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        call = env.auth.calls[-1]
        assert (status, call["method"], call["headers"]["content-length"]) == (200, "POST", ["0"])
    finally:
        await stop()


@pytest.mark.parametrize("name", ["preserve_request_method", "run_on_preflight", "allow_partial_message"])
def test_extension_booleans_are_validated_in_apisix_wording(name: str) -> None:
    doc = {
        "routes": [
            {
                "id": "b",
                "uri": "/",
                "plugins": {"forward-auth": {"uri": "http://a/", name: "yes"}},
                "upstream": {"nodes": {"127.0.0.1:1": 1}},
            }
        ]
    }
    with pytest.raises(ConfigError) as raised:
        parse_config(doc)
    assert str(raised.value) == (
        'route "b": plugin forward-auth: '
        'property "%s" validation failed: wrong type: expected boolean, got string' % name
    )


def test_extensions_default_to_apisix_behaviour() -> None:
    conf = parse_config(
        {"routes": [{"id": "d", "uri": "/", "plugins": {"forward-auth": {"uri": "http://a/"}}, "upstream": {"nodes": {"127.0.0.1:1": 1}}}]}
    ).routes[0].forward_auth
    assert conf is not None
    assert (conf.preserve_request_method, conf.run_on_preflight, conf.allow_partial_message) == (False, True, False)
    assert conf.uri_template is None


# ---------------------------------------------------------------------------
# 3. run_on_preflight
# ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cors_preflight_goes_upstream_without_auth_and_without_spoofed_identity(
    reactor: Any, tmp_path: Any
) -> None:
    env, stop = await _env(
        reactor,
        tmp_path,
        [("cors", "/cors/*", {"uri": "AUTH/deny-all", "run_on_preflight": False, "upstream_headers": ["X-User-ID"]})],
    )
    try:
        status, _, body = await env.send(
            _get(
                "/cors/x",
                "Origin: https://app.example",
                "Access-Control-Request-Method: DELETE",
                "X-User-ID: admin",
                "X_User_ID: admin",
                method="OPTIONS",
            )
        )
        assert status == 200
        seen = json.loads(body)
        assert seen["method"] == "OPTIONS"
        assert "x-user-id" not in seen["headers"] and "x_user_id" not in seen["headers"]
        assert seen["headers"]["origin"] == ["https://app.example"]
        assert env.auth.calls == []

        # A plain OPTIONS, one with only Origin, and any other method are checked.
        for payload in (
            _get("/cors/x", method="OPTIONS"),
            _get("/cors/x", "Origin: https://app.example", method="OPTIONS"),
            _get("/cors/x", "Access-Control-Request-Method: GET", method="OPTIONS"),
            _get("/cors/x", "Origin: https://app.example", "Access-Control-Request-Method: GET"),
        ):
            status, _, body = await env.send(payload)
            assert (status, body) == (403, b"denied"), payload
        assert len(env.auth.calls) == 4 and len(env.echo.seen) == 1

        outcomes = env.outcomes("cors")
        assert (outcomes["preflight"], outcomes["deny"]) == (1, 4)
        assert [line["auth"] for line in env.access_lines()] == ["preflight"] + ["deny"] * 4
    finally:
        await stop()


@pytest_twisted.ensureDeferred
async def test_preflights_are_checked_by_default(reactor: Any, tmp_path: Any) -> None:
    env, stop = await _env(reactor, tmp_path, [("cors", "/cors/*", {"uri": "AUTH/deny-all"})])
    try:
        status, _, _ = await env.send(
            _get("/cors/x", "Origin: https://a", "Access-Control-Request-Method: PUT", method="OPTIONS")
        )
        assert status == 403 and len(env.auth.calls) == 1 and env.echo.seen == []
    finally:
        await stop()


# ---------------------------------------------------------------------------
# 4. allow_partial_message
# ---------------------------------------------------------------------------


def _body(size: int) -> bytes:
    return bytes(range(256)) * (size // 256) + bytes(range(size % 256))


def _upload(target: str, body: bytes, chunked: bool, piece: int = 3000) -> bytes:
    head = "POST %s HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n" % target
    if not chunked:
        return (head + "Content-Length: %d\r\n\r\n" % len(body)).encode() + body
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + piece]), body[i : i + piece]) for i in range(0, len(body), piece)
    )
    return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunks + b"0\r\n\r\n"


PARTIAL = {"uri": "AUTH/auth", "request_method": "POST", "max_req_body_size": LIMIT, "allow_partial_message": True}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest_twisted.ensureDeferred
async def test_partial_message_sends_a_prefix_to_auth_and_the_whole_body_upstream(
    reactor: Any, tmp_path: Any, chunked: bool
) -> None:
    env, stop = await _env(
        reactor,
        tmp_path,
        [
            ("big", "/big/*", dict(PARTIAL, request_headers=["X-Forwarded-Body-Truncated"])),
            ("strict", "/strict/*", dict(PARTIAL, allow_partial_message=False)),
        ],
    )
    try:
        for size in (0, 1, LIMIT - 1, LIMIT, LIMIT + 1, 3 * LIMIT + 7, 200_000, 3_000_000):
            body = _body(size)
            # A client's own copy of the header is never what auth sees.
            payload = _upload("/big/x", body, chunked).replace(
                b"Connection: close\r\n", b"Connection: close\r\nX-Forwarded-Body-Truncated: false\r\n"
            )
            status, _, answer = await env.send(payload)
            assert status == 200, (size, answer[:200])
            call = env.auth.calls[-1]
            assert call["body"] == body[:LIMIT], size
            assert call["headers"]["content-length"] == [str(min(size, LIMIT))]
            assert call["headers"]["x-forwarded-body-truncated"] == ["true" if size > LIMIT else "false"], size
            seen = json.loads(answer)
            assert (seen["length"], seen["sha256"]) == (size, sha256(body).hexdigest()), size
            if not chunked:
                assert seen["headers"]["content-length"] == [str(size)], size
            else:
                # Sent with its length when it was all in before the call
                # (from the buffer), re-chunked when it streamed.
                assert seen["headers"].get("content-length", [str(size)]) == [str(size)], size

        # Without the option, a larger body is still refused with 413, unasked.
        calls = len(env.auth.calls)
        status, _, _ = await env.send(_upload("/strict/x", _body(LIMIT + 1), chunked))
        assert status == 413 and len(env.auth.calls) == calls
        # ... and on a route without it the header is not sent.
        status, _, _ = await env.send(_upload("/strict/x", _body(10), chunked))
        assert status == 200 and "x-forwarded-body-truncated" not in env.auth.calls[-1]["headers"]
    finally:
        await stop()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest_twisted.ensureDeferred
async def test_partial_message_denied_never_reaches_the_upstream(reactor: Any, tmp_path: Any, chunked: bool) -> None:
    env, stop = await _env(reactor, tmp_path, [("big", "/big/*", PARTIAL)])
    try:
        status, _, body = await env.send(_upload("/big/deny", _body(500_000), chunked))
        assert (status, body) == (403, b"denied")
        assert len(env.auth.calls[-1]["body"]) == LIMIT
        assert env.echo.seen == []
        # The connection is not left in a state that spoils the next request.
        status, _, _ = await env.send(_upload("/big/x", _body(5000), chunked))
        assert status == 200 and env.echo.seen[-1]["length"] == 5000
    finally:
        await stop()


class _Client(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(self.received)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest_twisted.ensureDeferred
async def test_partial_message_asks_on_the_prefix_before_the_rest_is_sent(
    reactor: Any, tmp_path: Any, chunked: bool
) -> None:
    # The client sends a little more than the limit and stops: the auth
    # call must be made on that prefix (not wait for the body), and once
    # allowed the rest, sent only then, streams to the upstream.
    env, stop = await _env(reactor, tmp_path, [("big", "/big/*", PARTIAL)])
    try:
        body = _body(2_000_000)
        payload = _upload("/big/x", body, chunked, piece=LIMIT)
        cut = payload.index(b"\r\n\r\n") + 4 + 3 * LIMIT
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", env.port)
        client = await endpoint.connect(Factory.forProtocol(_Client))
        client.transport.write(payload[:cut])
        for _ in range(500):
            if env.auth.calls:
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert len(env.auth.calls) == 1
        assert env.auth.calls[0]["body"] == body[:LIMIT]
        assert env.auth.calls[0]["headers"]["x-forwarded-body-truncated"] == ["true"]
        client.transport.write(payload[cut:])
        raw = await client.closed
        assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
        seen = env.echo.seen[-1]
        assert (seen["length"], seen["sha256"]) == (len(body), sha256(body).hexdigest())
    finally:
        await stop()


@pytest_twisted.ensureDeferred
async def test_partial_message_on_an_embedded_guard(reactor: Any) -> None:
    # ForwardAuthResource reads the body as Twisted does, then asks on its
    # prefix; the guarded resource gets it whole.
    from fauth.edge.server import HardenedSite
    from fauth.testing import StubAuthService

    stub = StubAuthService(decide=lambda call: (200, (), b""))
    echo = Echo()
    guard = stub.guard(echo, dict(PARTIAL, uri="http://stub-auth/"), reactor=reactor)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(HardenedSite(guard, reactor=reactor))
    try:
        for size, chunked in ((LIMIT, False), (5000, False), (5000, True)):
            body = _body(size)
            raw = await raw_request(reactor, port.getHost().port, _upload("/x", body, chunked))
            assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
            call = stub.calls[-1]
            assert call.body == body[:LIMIT]
            assert call.header(b"x-forwarded-body-truncated") == (b"true" if size > LIMIT else b"false")
            assert (echo.seen[-1]["length"], echo.seen[-1]["sha256"]) == (size, sha256(body).hexdigest())
    finally:
        await port.stopListening()
