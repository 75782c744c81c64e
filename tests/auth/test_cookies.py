"""
Cookies on allow (C{allow_cookies}): configuration wording, which cookies
are picked, and through a real gateway on loopback: allowed (beside the
upstream's own cookies), denied, never to the upstream, and never from one
user to another with the decision cache on (in turn and in flight at
once), with the metrics and the access log.
"""
from __future__ import annotations

from typing import Any, Dict, List

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred, gatherResults

from fauth.auth.cookies import CookiePicker
from fauth.config import parse_forward_auth
from fauth.wire.h1 import ReplyHeaders
from tests.auth.test_client import Env, env, eventually, request  # noqa: F401 (env: fixture)
from tests.harness import raw_request, refusal, start_gateway
from tests.rawserver import RawConnection, Seen


def test_parsed_values() -> None:
    assert parse_forward_auth({"uri": "http://a/auth"}).allow_cookies == ()
    conf = parse_forward_auth({"uri": "http://a/auth", "allow_cookies": ["_oauth2_proxy", "*"]})
    assert conf.allow_cookies == ("_oauth2_proxy", "*")


@pytest.mark.parametrize(
    "value, message",
    [
        ("*", "wrong type: expected array, got string"),
        ([1], "failed to validate item 1: wrong type: expected string, got number"),
        (["ok", "a b"], 'failed to validate item 2: invalid cookie name "a b"'),
        (["a=b"], 'failed to validate item 1: invalid cookie name "a=b"'),
        (["\r\n"], 'failed to validate item 1: invalid cookie name "\\r\\n"'),
    ],
)
def test_bad_values_are_refused_naming_route_and_attribute(value: Any, message: str) -> None:
    assert refusal({"uri": "http://a/auth", "allow_cookies": value}) == (
        'route "r1": plugin forward-auth: property "allow_cookies" validation failed: ' + message
    )


def test_every_cookie_or_those_named_case_sensitively() -> None:
    headers = ReplyHeaders({b"set-cookie": [b"_oauth2_proxy=abc; Path=/; HttpOnly", b"Other=1", b"other =2"]})
    assert CookiePicker(["*"]).pick(headers) == tuple(headers.get(b"set-cookie") or ())
    assert CookiePicker(["_oauth2_proxy"]).pick(headers) == (b"_oauth2_proxy=abc; Path=/; HttpOnly",)
    assert CookiePicker(["other"]).pick(headers) == (b"other =2",)
    assert CookiePicker(["absent"]).pick(headers) == ()
    assert CookiePicker(["*"]).pick(ReplyHeaders({})) == ()


# ---------------------------------------------------------------------------
# Through a real gateway


def session_auth(seen: Seen, conn: RawConnection) -> None:
    """Allows "token-<user>", refreshing that user's session cookie; 401 otherwise (with a cookie too)."""
    token = dict((n.lower(), v) for n, v in seen.headers).get(b"authorization", b"")
    if token.startswith(b"token-"):
        user = token[len(b"token-"):]
        conn.respond(
            202,
            [
                (b"X-User-ID", user),
                (b"Set-Cookie", b"_oauth2_proxy=session-%s; Path=/; HttpOnly" % user),
                (b"Set-Cookie", b"csrf=%s" % user),
            ],
        )
    else:
        conn.respond(401, [(b"Set-Cookie", b"_oauth2_proxy=; Max-Age=0")], b"no session")


@pytest_twisted.ensureDeferred
async def test_auth_cookies_reach_the_client_beside_the_upstreams_never_the_upstream(env: Env, tmp_path: Any) -> None:
    auth = await env.auth(session_auth)
    env.upstream.cookie = b"app=1; Path=/"
    gw = await env.gateway(
        auth.url(), access_log=str(tmp_path / "access.log"), request_headers=["Authorization"],
        upstream_headers=["X-User-ID"], allow_cookies=["_oauth2_proxy"],
    )
    ok = await request(gw, headers=[("Authorization", "token-alice"), ("Cookie", "_oauth2_proxy=old")])
    assert (ok.status, ok.body) == (200, b"upstream ok")
    assert sorted(ok.headers[b"set-cookie"]) == [b"_oauth2_proxy=session-alice; Path=/; HttpOnly", b"app=1; Path=/"]
    # Never to the upstream: it sees the client's own Cookie and no Set-Cookie.
    seen = env.upstream.seen[-1]
    assert seen.getRawHeaders(b"cookie") == [b"_oauth2_proxy=old"]
    assert not seen.hasHeader(b"set-cookie")
    # Denied: the auth answer is relayed as ever (its cookie only through client_headers).
    denied = await request(gw)
    assert (denied.status, denied.body) == (401, b"no session")
    assert b"set-cookie" not in denied.headers
    # A client's own Set-Cookie request header is not a response cookie.
    spoofed = await request(gw, headers=[("Authorization", "token-bob"), ("Set-Cookie", "_oauth2_proxy=evil")])
    assert sorted(spoofed.headers[b"set-cookie"]) == [b"_oauth2_proxy=session-bob; Path=/; HttpOnly", b"app=1; Path=/"]
    assert len(env.upstream.seen) == 2

    assert gw.decisions() == {"allow": 2, "deny": 1}
    lines = gw.log_lines()
    assert [(line["auth"], line.get("auth_cookies")) for line in lines] == [("allow", 1), ("deny", None), ("allow", 1)]
    text = gw.metrics.exposition()[0].decode()  # type: ignore[union-attr]
    assert 'fauth_auth_cookies_total{route="1"} 2.0' in text


@pytest_twisted.ensureDeferred
async def test_with_the_cache_on_no_user_ever_gets_another_users_cookie(env: Env, tmp_path: Any) -> None:
    from twisted.internet import reactor

    held: List[Any] = []

    def slow(seen: Seen, conn: RawConnection) -> None:
        # Answers wait until the test releases them, so that calls overlap.
        held.append(lambda: session_auth(seen, conn))

    auth = await env.auth(slow)
    gw = await env.gateway(
        auth.url(), access_log=str(tmp_path / "access.log"), request_headers=["Authorization"],
        upstream_headers=["X-User-ID"], allow_cookies=["*"],
        # One key for every user of a tenant: were an answer with a cookie
        # stored or shared, the next user of that tenant would get it.
        cache={"ttl": 30, "key": ["$http_x_tenant"]},
    )

    async def as_user(user: str) -> Any:
        return await request(gw, headers=[("Authorization", "token-" + user), ("X-Tenant", "acme")])

    async def release_all() -> None:
        while True:
            while held:
                held.pop(0)()
            if not await eventually(reactor, lambda: bool(held), timeout=0.3):
                return

    # In turn, then two users in flight at once on the same key.
    replies: Dict[str, Any] = {}
    for user in ("alice", "bob"):
        d = ensureDeferred(as_user(user))
        await release_all()
        replies[user] = await d
    together = [ensureDeferred(as_user(u)) for u in ("carol", "dave")]
    cache = gw.gateway.decision_cache("1")
    assert cache is not None
    # Dave joined Carol's call (one call, two waiting)...
    assert await eventually(reactor, lambda: sum(f.waiting for f in cache.flights.values()) == 2)
    assert len(held) == 1
    # ...and asks on his own once her answer turns out to carry a cookie.
    await release_all()
    replies["carol"], replies["dave"] = await gatherResults(together)

    for user, reply in replies.items():
        assert reply.status == 200
        assert sorted(reply.headers[b"set-cookie"]) == [
            b"_oauth2_proxy=session-%s; Path=/; HttpOnly" % user.encode(), b"csrf=%s" % user.encode(),
        ], user
    # Every user was asked about (nothing stored), and reached the upstream as themselves.
    assert len(auth.requests) == 4
    assert sorted(h.getRawHeaders(b"x-user-id")[0] for h in env.upstream.seen) == [b"alice", b"bob", b"carol", b"dave"]
    assert len(cache) == 0
    assert gw.metrics is not None
    assert gw.metrics.route("1").cache["uncacheable"] >= 3
    assert gw.metrics.route("1").cache["hit"] == 0
    assert [line.get("auth_cookies") for line in gw.log_lines()] == [2, 2, 2, 2]


@pytest_twisted.ensureDeferred
async def test_a_websocket_101_carries_the_auth_cookies(env: Env) -> None:
    from twisted.internet import reactor

    auth = await env.auth(session_auth)

    def switch(seen: Seen, conn: RawConnection) -> None:
        conn.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        conn.close()  # the tunnel ends, and with it the client's connection

    upstream = await env.auth(switch)
    doc = env.doc(auth.url(), request_headers=["Authorization"], allow_cookies=["_oauth2_proxy"])
    route = doc["routes"][0]
    route["enable_websocket"] = True
    route["upstream"] = {"nodes": {"127.0.0.1:%d" % upstream.port_number: 1}}
    gw = await start_gateway(reactor, doc)
    try:
        raw = await raw_request(
            reactor, gw.port_number,
            b"GET /hello HTTP/1.1\r\nHost: localhost\r\nAuthorization: token-erin\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
    finally:
        await gw.stop()
    head = raw.partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"HTTP/1.1 101 Switching Protocols"
    assert b"Set-Cookie: _oauth2_proxy=session-erin; Path=/; HttpOnly" in head
    assert not any(line.lower().startswith(b"set-cookie: csrf") for line in head)
    assert [n.lower() for n, _ in upstream.requests[0].headers].count(b"set-cookie") == 0


@pytest_twisted.ensureDeferred
async def test_the_embedded_guard_adds_auth_cookies_beside_the_applications(env: Env) -> None:
    from twisted.internet import reactor
    from twisted.web.resource import Resource

    from fauth.edge.resources import ForwardAuthResource
    from tests.servers import listen_on_loopback

    class App(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            request.addCookie(b"app", b"1")
            return b"app for " + (request.getHeader(b"x-user-id") or b"nobody")

    auth = await env.auth(session_auth)
    guard = ForwardAuthResource(
        App(),
        {"uri": auth.url(), "request_headers": ["Authorization"], "upstream_headers": ["X-User-ID"],
         "allow_cookies": ["_oauth2_proxy"], "signin_redirect": {"uri": "/sign-in"}},
        reactor=reactor,
    )
    port = await listen_on_loopback(reactor, guard)
    try:
        def get(*headers: str) -> Any:
            head = "GET /x HTTP/1.1\r\nHost: app\r\nConnection: close\r\n%s\r\n" % "".join(h + "\r\n" for h in headers)
            return raw_request(reactor, port.getHost().port, head.encode())

        from tests.auth.test_client import Reply

        ok = Reply(await get("Authorization: token-fay"))
        assert (ok.status, ok.body) == (200, b"app for fay")
        assert sorted(ok.headers[b"set-cookie"]) == [b"_oauth2_proxy=session-fay; Path=/; HttpOnly", b"app=1"]
        browser = Reply(await get("Accept: text/html"))
        assert browser.status == 302
        assert browser.headers[b"location"] == [b"/sign-in?rd=http%3A%2F%2Fapp%2Fx"]
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_gateway_made_502_after_an_allow_carries_the_auth_cookies(env: Env) -> None:
    from tests.auth.test_client import free_port

    auth = await env.auth(session_auth)
    doc = env.doc(auth.url(), request_headers=["Authorization"], allow_cookies=["_oauth2_proxy"])
    doc["routes"][0]["upstream"] = {"nodes": {"127.0.0.1:%d" % await free_port(env.reactor): 1}}
    gw = await start_gateway(env.reactor, doc)
    try:
        reply = await request(gw, headers=[("Authorization", "token-gil")])
    finally:
        await gw.stop()
    assert reply.status == 502
    assert reply.headers[b"set-cookie"] == [b"_oauth2_proxy=session-gil; Path=/; HttpOnly"]
