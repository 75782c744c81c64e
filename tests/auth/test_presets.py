"""
Presets: what each fills in, that written attributes win, the wording of a
bad one, C{auth_server_paths}; and each preset driven through a real gateway
on loopback against a mock that answers as that server documents (allowed,
denied for a browser and for a script, spoofed identity headers, the
server's own pages, cached), with the metrics and the access log.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import pytest_twisted
from twisted.web.resource import Resource

from fauth.config import parse_forward_auth
from fauth.config.presets import PRESETS
from tests.auth.test_client import Env, env, request  # noqa: F401 (env: fixture)
from tests.harness import GatewayUnderTest, refusal, start_gateway
from tests.servers import listen_on_loopback, port_url

BROWSER = ("Accept", "text/html,application/xhtml+xml,*/*;q=0.8")


# ---------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_fills_its_path_and_attributes(name: str) -> None:
    conf = parse_forward_auth({"uri": "https://auth.internal:9000", "preset": name})
    assert conf.uri == "https://auth.internal:9000" + PRESETS[name]["path"]
    assert conf.upstream_headers == tuple(PRESETS[name]["upstream_headers"])
    # A trailing slash is no path either; a path is kept as written.
    assert parse_forward_auth({"uri": "https://a/", "preset": name}).uri == "https://a" + PRESETS[name]["path"]
    assert parse_forward_auth({"uri": "https://a/mine", "preset": name}).uri == "https://a/mine"


def test_written_attributes_win_whole() -> None:
    conf = parse_forward_auth(
        {
            "uri": "http://127.0.0.1:4180",
            "preset": "oauth2-proxy",
            "upstream_headers": ["X-Auth-Request-User>X-User"],
            "allow_cookies": [],
            "signin_redirect": {"uri": "https://login.example/oauth2/start"},
        }
    )
    assert conf.upstream_headers == ("X-Auth-Request-User>X-User",)
    assert conf.allow_cookies == ()
    assert conf.signin_redirect is not None and conf.signin_redirect.uri == "https://login.example/oauth2/start"
    assert conf.auth_server_paths == ("/oauth2/",)  # not written: the preset's
    # The preset's own values are never changed by a use of it.
    assert PRESETS["oauth2-proxy"]["allow_cookies"] == ["*"]


@pytest.mark.parametrize(
    "plugin, message",
    [
        ({"uri": "http://a", "preset": "keycloak"}, 'property "preset" validation failed: matches none of the enum values'),
        ({"uri": "http://a", "preset": 1}, 'property "preset" validation failed: wrong type: expected string, got number'),
        ({"preset": "authelia"}, 'property "uri" is required'),
        ({"uri": "http://a", "auth_server_paths": ["oauth2/"]},
         'property "auth_server_paths" validation failed: failed to validate item 1: expected "oauth2/" to be a path'),
        ({"uri": "http://a", "auth_server_paths": "/oauth2/"},
         'property "auth_server_paths" validation failed: wrong type: expected array, got string'),
    ],
)
def test_bad_presets_are_refused_naming_route_and_attribute(plugin: Dict[str, Any], message: str) -> None:
    given = refusal(plugin)
    assert given.startswith('route "r1": plugin forward-auth: ' + message), given


# ---------------------------------------------------------------------------
# Mock auth servers, answering as their documentation says


class MockServer(Resource):
    """Records every request; subclasses answer by path."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: List[Any] = []

    def render(self, request: Any) -> bytes:
        self.seen.append((request.uri, request.requestHeaders.copy()))
        return self.answer(request, request.path.decode())

    def answer(self, request: Any, path: str) -> bytes:
        raise NotImplementedError

    @staticmethod
    def cookie(request: Any, name: bytes) -> Optional[bytes]:
        return request.received_cookies.get(name)

    @staticmethod
    def found(request: Any, location: bytes) -> bytes:
        request.setResponseCode(302)
        request.setHeader(b"location", location)
        return b""

    @staticmethod
    def identify(request: Any, status: int, headers: List[Tuple[bytes, bytes]]) -> bytes:
        request.setResponseCode(status)
        for name, value in headers:
            request.setHeader(name, value)
        return b""


class Authelia(MockServer):
    """
    /api/authz/forward-auth: 200 with Remote-* for a session; without one,
    302 to the portal (rd built from X-Forwarded-*) for a browser's GET, 401
    for scripts (X-Requested-With, or no text/html).
    """

    def answer(self, request: Any, path: str) -> bytes:
        assert path == "/api/authz/forward-auth", path
        if self.cookie(request, b"authelia_session") == b"valid":
            return self.identify(request, 200, [(b"Remote-User", b"john"), (b"Remote-Groups", b"admins,dev"),
                                                (b"Remote-Email", b"john@example.com"), (b"Remote-Name", b"John Doe")])
        h = request.getHeader
        url = "%s://%s%s" % (h(b"x-forwarded-proto").decode(), h(b"x-forwarded-host").decode(), h(b"x-forwarded-uri").decode())
        accept = (h(b"accept") or b"").decode()
        if "text/html" in accept and not h(b"x-requested-with") and h(b"x-forwarded-method") in (b"GET", b"HEAD"):
            return self.found(request, ("https://auth.example.com/?rd=%s&rm=GET" % quote(url, safe="")).encode())
        request.setResponseCode(401)
        return b"401 Unauthorized"


class OAuth2Proxy(MockServer):
    """
    /oauth2/auth: 202 with X-Auth-Request-* and a refreshed session cookie
    for a session, 401 otherwise; /oauth2/start: 302 to the provider.
    """

    def answer(self, request: Any, path: str) -> bytes:
        if path == "/oauth2/auth":
            if self.cookie(request, b"_oauth2_proxy") in (b"valid", b"valid-bob"):
                user = b"bob" if self.cookie(request, b"_oauth2_proxy") == b"valid-bob" else b"john"
                return self.identify(request, 202, [
                    (b"X-Auth-Request-User", user), (b"X-Auth-Request-Email", user + b"@example.com"),
                    (b"X-Auth-Request-Groups", b"role:admin"),
                    (b"Set-Cookie", b"_oauth2_proxy=refreshed-" + user + b"; Path=/; HttpOnly; Secure"),
                ])
            request.setResponseCode(401)
            return b"Unauthorized"
        assert path == "/oauth2/start", path
        rd = parse_qs(urlsplit(request.uri.decode()).query).get("rd", [""])[0]
        return self.found(request, ("https://idp.example/authorize?state=%s" % quote(rd, safe="")).encode())


class Authentik(MockServer):
    """
    /outpost.goauthentik.io/auth/nginx: the URL in X-Original-URL (400 without
    it); 200 with X-authentik-* for a session, 401 otherwise;
    /outpost.goauthentik.io/start: 302 to the flow.
    """

    def answer(self, request: Any, path: str) -> bytes:
        if path == "/outpost.goauthentik.io/auth/nginx":
            if not request.getHeader(b"x-original-url"):
                request.setResponseCode(400)
                return b"missing X-Original-URL"
            if self.cookie(request, b"authentik_proxy_3f2a") == b"valid":
                return self.identify(request, 200, [
                    (b"X-authentik-username", b"akadmin"), (b"X-authentik-groups", b"authentik Admins"),
                    (b"X-authentik-email", b"admin@example.com"), (b"X-authentik-uid", b"42"),
                    (b"Set-Cookie", b"authentik_proxy_3f2a=valid; Path=/; HttpOnly"),
                ])
            request.setResponseCode(401)
            return b""
        assert path == "/outpost.goauthentik.io/start", path
        return self.found(request, b"https://authentik.example/application/o/authorize/")


async def gateway_for(env: Env, preset: str, mock: MockServer, tmp_path: Any, **plugin: Any) -> GatewayUnderTest:
    port = await listen_on_loopback(env.reactor, mock)
    doc = {
        "routes": [
            {
                "id": "1",
                "uri": "/*",
                "plugins": {"forward-auth": dict({"uri": port_url(port), "preset": preset}, **plugin)},
                "upstream": {"nodes": {"127.0.0.1:%d" % env.upstream_port.getHost().port: 1}},
            }
        ]
    }
    gw = await start_gateway(env.reactor, doc, str(tmp_path / "access.log"))

    async def stop() -> None:
        await gw.stop()
        await port.stopListening()

    env._cleanups.append(stop)
    return gw


def identity(headers: Any, prefix: bytes) -> Dict[bytes, List[bytes]]:
    return {
        name.lower(): values for name, values in headers.getAllRawHeaders()
        if name.lower().replace(b"_", b"-").startswith(prefix)
    }


# ---------------------------------------------------------------------------
# Through the gateway


@pytest_twisted.ensureDeferred
async def test_authelia(env: Env, tmp_path: Any) -> None:
    mock = Authelia()
    gw = await gateway_for(env, "authelia", mock, tmp_path, cache={"ttl": 30})
    spoof = [("Remote-User", "admin"), ("remote_groups", "admins")]
    for _ in range(2):  # the second from the cache
        ok = await request(gw, "/app?x=1", headers=[("Cookie", "authelia_session=valid")] + spoof)
        assert (ok.status, ok.body) == (200, b"upstream ok")
        assert identity(env.upstream.seen[-1], b"remote-") == {
            b"remote-user": [b"john"], b"remote-groups": [b"admins,dev"],
            b"remote-email": [b"john@example.com"], b"remote-name": [b"John Doe"],
        }
    assert len(mock.seen) == 1
    # Authelia redirects browsers itself: its 302 and Location are relayed.
    browser = await request(gw, "/app?x=1", headers=[BROWSER] + spoof)
    assert browser.status == 302
    assert browser.headers[b"location"] == [b"https://auth.example.com/?rd=http%3A%2F%2Flocalhost%2Fapp%3Fx%3D1&rm=GET"]
    script = await request(gw, "/app", headers=[BROWSER, ("X-Requested-With", "XMLHttpRequest")])
    assert script.status == 401
    # What Authelia was sent: its endpoint, the forwarded request, the session cookie.
    target, sent = mock.seen[0]
    assert target == b"/api/authz/forward-auth"
    assert sent.getRawHeaders(b"x-forwarded-uri") == [b"/app?x=1"]
    assert sent.getRawHeaders(b"cookie") == [b"authelia_session=valid"]
    assert len(env.upstream.seen) == 2
    assert gw.decisions() == {"allow": 2, "deny": 2}
    assert [line["auth"] for line in gw.log_lines()] == ["allow", "allow (cached)", "deny", "deny"]


@pytest_twisted.ensureDeferred
async def test_oauth2_proxy(env: Env, tmp_path: Any) -> None:
    mock = OAuth2Proxy()
    gw = await gateway_for(env, "oauth2-proxy", mock, tmp_path, cache={"ttl": 30})
    spoof = [("X-Auth-Request-User", "admin"), ("x_auth_request_groups", "role:root")]
    # Allowed, with the session cookie refreshed; never stored (it sets a cookie).
    for cookie, user in (("valid", b"john"), ("valid-bob", b"bob"), ("valid", b"john")):
        ok = await request(gw, "/dash", headers=[("Cookie", "_oauth2_proxy=" + cookie)] + spoof)
        assert ok.status == 200
        assert ok.headers[b"set-cookie"] == [b"_oauth2_proxy=refreshed-" + user + b"; Path=/; HttpOnly; Secure"]
        assert identity(env.upstream.seen[-1], b"x-auth-request-") == {
            b"x-auth-request-user": [user], b"x-auth-request-email": [user + b"@example.com"],
            b"x-auth-request-groups": [b"role:admin"],
        }
        assert not env.upstream.seen[-1].hasHeader(b"set-cookie")
    assert len([t for t, _ in mock.seen if t == b"/oauth2/auth"]) == 3
    # No session: a browser goes to /oauth2/start with where it was going; a script keeps the 401.
    browser = await request(gw, "/dash?tab=2", headers=[BROWSER])
    assert browser.status == 302
    assert browser.headers[b"location"] == [b"/oauth2/start?rd=http%3A%2F%2Flocalhost%2Fdash%3Ftab%3D2"]
    script = await request(gw, "/dash", headers=[("Accept", "application/json")])
    assert (script.status, script.body) == (401, b"Unauthorized")
    # /oauth2/ is oauth2-proxy's own: reached without a check.
    start = await request(gw, "/oauth2/start?rd=http%3A%2F%2Flocalhost%2Fdash")
    assert start.status == 302
    assert start.headers[b"location"] == [b"https://idp.example/authorize?state=http%3A%2F%2Flocalhost%2Fdash"]
    # A path that only looks like /oauth2/ before normalisation is checked.
    sneaky = await request(gw, "/oauth2/../dash", headers=[BROWSER])
    assert sneaky.status == 302 and sneaky.headers[b"location"][0].startswith(b"/oauth2/start?rd=")
    sent = dict(mock.seen[0][1].getAllRawHeaders())
    assert sent[b"X-Original-Uri"] == [b"/dash"]
    assert gw.decisions() == {"allow": 3, "redirect": 2, "deny": 1, "auth_server": 1}
    assert gw.metrics is not None and gw.metrics.route("1").cookies == 3
    assert gw.metrics.route("1").cache["uncacheable"] == 3
    lines = gw.log_lines()
    assert [line["auth"] for line in lines] == ["allow"] * 3 + ["redirect", "deny", "auth_server", "redirect"]
    assert lines[5]["auth_ms"] is None and lines[5]["status"] == 302


@pytest_twisted.ensureDeferred
async def test_authentik(env: Env, tmp_path: Any) -> None:
    mock = Authentik()
    gw = await gateway_for(env, "authentik", mock, tmp_path)
    ok = await request(
        gw, "/wiki/page", headers=[("Cookie", "authentik_proxy_3f2a=valid"), ("X-authentik-username", "root"),
                                   ("X_Authentik_Groups", "admins")],
    )
    assert ok.status == 200
    assert ok.headers[b"set-cookie"] == [b"authentik_proxy_3f2a=valid; Path=/; HttpOnly"]
    assert identity(env.upstream.seen[-1], b"x-authentik-") == {
        b"x-authentik-username": [b"akadmin"], b"x-authentik-groups": [b"authentik Admins"],
        b"x-authentik-email": [b"admin@example.com"], b"x-authentik-uid": [b"42"],
    }
    # The outpost learnt the URL from X-Original-URL.
    assert mock.seen[0][0] == b"/outpost.goauthentik.io/auth/nginx"
    assert mock.seen[0][1].getRawHeaders(b"x-original-url") == [b"http://localhost/wiki/page"]
    browser = await request(gw, "/wiki/page", headers=[BROWSER])
    assert browser.status == 302
    assert browser.headers[b"location"] == [b"/outpost.goauthentik.io/start?rd=http%3A%2F%2Flocalhost%2Fwiki%2Fpage"]
    start = await request(gw, "/outpost.goauthentik.io/start?rd=x")
    assert start.status == 302
    assert start.headers[b"location"] == [b"https://authentik.example/application/o/authorize/"]
    assert mock.seen[-1][0] == b"/outpost.goauthentik.io/start?rd=x"
    script = await request(gw, "/wiki/page")
    assert script.status == 401
    assert len(env.upstream.seen) == 1
    assert gw.decisions() == {"allow": 1, "redirect": 1, "auth_server": 1, "deny": 1}
