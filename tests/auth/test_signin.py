"""
Sign-in redirects (C{signin_redirect}): configuration wording, who counts as
a browser, the original URL's encoding, and through a real gateway on
loopback: allowed, denied (browser and API client), spoofed, cached, with
the metrics and the access log.
"""
from __future__ import annotations

from typing import Any, Dict, List
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_twisted
from twisted.web.http_headers import Headers

from fauth.auth.decision import Respond
from fauth.auth.signin import SigninRedirect, original_url, wants_html
from fauth.config import SigninConf, parse_forward_auth
from fauth.request.inbound import InboundRequest
from tests.auth.test_client import Env, env, request  # noqa: F401 (env: fixture)
from tests.harness import refusal
from tests.rawserver import RawConnection, Seen

BROWSER = ("Accept", "text/html,application/xhtml+xml,*/*;q=0.8")
SIGNIN = {"uri": "https://auth.example.com/oauth2/start"}


def inbound(headers: Dict[bytes, List[bytes]], target: str = "/hello?a=1", scheme: str = "http") -> InboundRequest:
    return InboundRequest(
        method="GET", request_uri=target, path=target.partition("?")[0], query=target.partition("?")[2],
        host="app.example", scheme=scheme, remote_addr="127.0.0.1", remote_port=1, server_addr="127.0.0.1",
        server_port=80, headers=Headers(headers),
    )


# ---------------------------------------------------------------------------
# Configuration


def test_defaults_and_parsed_values() -> None:
    conf = parse_forward_auth({"uri": "http://a/auth", "signin_redirect": {"uri": "/oauth2/start"}})
    assert conf.signin_redirect == SigninConf(uri="/oauth2/start", param="rd", statuses=(401,), status=302)
    conf = parse_forward_auth(
        {"uri": "http://a/auth", "signin_redirect": {"uri": "/s?x=1", "param": "next", "statuses": [401, 403], "status": 303}}
    )
    assert conf.signin_redirect == SigninConf(uri="/s?x=1", param="next", statuses=(401, 403), status=303)
    assert parse_forward_auth({"uri": "http://a/auth"}).signin_redirect is None


@pytest.mark.parametrize(
    "section, message",
    [
        ("/start", "wrong type: expected object, got string"),
        ({}, 'property "uri" is required'),
        ({"uri": "/s", "params": "rd"}, "additional properties forbidden, found params"),
        ({"uri": 3}, 'property "uri" validation failed: wrong type: expected string, got number'),
        ({"uri": "start"}, 'property "uri" validation failed: expected "start" to be a path or an http(s) URL'),
        ({"uri": "/s\r\nX: 1"}, 'property "uri" validation failed: expected "/s\\r\\nX: 1" to be a path'),
        ({"uri": "javascript:alert(1)"}, 'property "uri" validation failed: expected "javascript:alert(1)"'),
        ({"uri": "/s#frag"}, 'property "uri" validation failed: expected "/s#frag"'),
        ({"uri": "/s", "param": "r d"}, 'property "param" validation failed: expected "r d" to be letters'),
        ({"uri": "/s", "statuses": []}, 'property "statuses" validation failed: expect array to have at least 1 items'),
        ({"uri": "/s", "statuses": [200]}, 'property "statuses" validation failed: failed to validate item 1: expected 200 to be at least 300'),
        ({"uri": "/s", "statuses": [401, "403"]}, 'property "statuses" validation failed: failed to validate item 2: '
         "wrong type: expected integer, got string"),
        ({"uri": "/s", "status": 200}, 'property "status" validation failed: matches none of the enum values'),
    ],
)
def test_bad_sections_are_refused_naming_route_and_attribute(section: Any, message: str) -> None:
    message_given = refusal({"uri": "http://a/auth", "signin_redirect": section})
    assert message_given.startswith(
        'route "r1": plugin forward-auth: property "signin_redirect" validation failed: ' + message
    ), message_given


# ---------------------------------------------------------------------------
# Browsers and API clients; the original URL


@pytest.mark.parametrize(
    "headers, browser",
    [
        ({b"accept": [b"text/html,application/xhtml+xml,*/*;q=0.8"]}, True),
        ({b"accept": [b"application/json", b"TEXT/HTML; charset=utf-8"]}, True),
        ({b"accept": [b"text/html;q=0.5"]}, True),
        ({b"accept": [b"text/html;q=0"]}, False),
        ({b"accept": [b"text/html; q=0.000"]}, False),
        ({b"accept": [b"*/*"]}, False),
        ({b"accept": [b"application/json"]}, False),
        ({b"accept": [b"text/htmlx"]}, False),
        ({}, False),
        ({b"accept": [b"text/html"], b"x-requested-with": [b"XMLHttpRequest"]}, False),
    ],
)
def test_only_browsers_navigating_are_redirected(headers: Dict[bytes, List[bytes]], browser: bool) -> None:
    assert wants_html(inbound(headers)) is browser


def test_original_url_is_scheme_host_as_sent_and_target_as_sent() -> None:
    request = inbound({b"host": [b"App.Example:8443"]}, "/a/../b%2F?q=%0d%0a&x=1", scheme="https")
    assert original_url(request) == "https://App.Example:8443/a/../b%2F?q=%0d%0a&x=1"
    assert original_url(inbound({})) == "http://app.example/hello?a=1"  # HTTP/1.0 without Host


def test_location_encodes_every_reserved_byte_of_the_original() -> None:
    redirect = SigninRedirect(SigninConf(uri="https://auth.example.com/start?client=app", param="rd"))
    request = inbound({b"host": [b"app.example"]}, "/p?next=%0D%0A&y=a#b\xff")
    location = redirect.location(request)
    assert location.startswith(b"https://auth.example.com/start?client=app&rd=http%3A%2F%2Fapp.example%2Fp%3F")
    assert all(0x21 <= byte <= 0x7E for byte in location)
    for forbidden in (b"\r", b"\n", b"#", b" "):
        assert forbidden not in location
    query = parse_qs(urlsplit(location.decode("ascii")).query)
    assert query["client"] == ["app"]
    assert query["rd"] == [original_url(request).encode("latin-1").decode("utf-8", "replace")] or len(query["rd"]) == 1
    # The parameter decodes back to the original, byte for byte.
    from urllib.parse import unquote_to_bytes

    assert unquote_to_bytes(location.split(b"&rd=")[1]) == original_url(request).encode("latin-1")


def test_only_the_auth_services_chosen_denials_become_redirects() -> None:
    redirect = SigninRedirect(SigninConf(uri="/start", statuses=(401,)))
    browser = inbound({b"accept": [b"text/html"]})
    denial = Respond(401, ((b"Location", (b"/elsewhere",)), (b"Set-Cookie", (b"s=; Max-Age=0",))), b"who?")
    made = redirect.apply(denial, browser)
    assert isinstance(made, Respond)
    assert (made.status, made.outcome, made.body) == (302, "redirect", b"")
    assert made.headers == (
        (b"Set-Cookie", (b"s=; Max-Age=0",)),
        (b"Location", (b"/start?rd=http%3A%2F%2Fapp.example%2Fhello%3Fa%3D1",)),
    )
    assert redirect.apply(Respond(403), browser) == Respond(403)
    assert redirect.apply(Respond(401, outcome="error"), browser).outcome == "error"  # status_on_error: 401
    assert redirect.apply(denial, inbound({b"accept": [b"application/json"]})) is denial


# ---------------------------------------------------------------------------
# Through a real gateway


def oauth2_proxy_like(seen: Seen, conn: RawConnection) -> None:
    """Allows token "good"; 401 otherwise, with a cookie-clearing header; 403 for token "banned"."""
    token = dict((n.lower(), v) for n, v in seen.headers).get(b"authorization")
    if token == b"good":
        conn.respond(202, [(b"X-User-ID", b"alice")])
    elif token == b"banned":
        conn.respond(403, body=b"banned")
    else:
        conn.respond(401, [(b"Set-Cookie", b"_oauth2_proxy=; Max-Age=0")], b"unauthorized")


@pytest_twisted.ensureDeferred
async def test_browsers_are_sent_to_sign_in_and_api_clients_keep_the_401(env: Env, tmp_path: Any) -> None:
    auth = await env.auth(oauth2_proxy_like)
    gw = await env.gateway(
        auth.url(), access_log=str(tmp_path / "access.log"),
        request_headers=["Authorization"], upstream_headers=["X-User-ID"], client_headers=["Set-Cookie"],
        signin_redirect={"uri": "/oauth2/start"},
    )
    # Allowed: proxied as ever, whatever the client accepts.
    ok = await request(gw, headers=[BROWSER, ("Authorization", "good")])
    assert (ok.status, ok.body) == (200, b"upstream ok")
    assert env.upstream.seen[-1].getRawHeaders(b"x-user-id") == [b"alice"]
    # A browser without a session: a redirect carrying where it was going.
    browser = await request(gw, "/hello?tab=2&x=%0D%0A", headers=[BROWSER])
    assert browser.status == 302
    assert browser.headers[b"location"] == [b"/oauth2/start?rd=http%3A%2F%2Flocalhost%2Fhello%3Ftab%3D2%26x%3D%250D%250A"]
    assert browser.headers[b"set-cookie"] == [b"_oauth2_proxy=; Max-Age=0"]  # client_headers still apply
    assert browser.body == b""
    # API clients keep the auth service's answer.
    api = await request(gw, headers=[("Accept", "application/json")])
    xhr = await request(gw, headers=[BROWSER, ("X-Requested-With", "XMLHttpRequest")])
    for reply in (api, xhr):
        assert (reply.status, reply.body) == (401, b"unauthorized")
        assert b"location" not in reply.headers
    # A status not chosen is relayed.
    banned = await request(gw, headers=[BROWSER, ("Authorization", "banned")])
    assert (banned.status, banned.body) == (403, b"banned")
    # Spoofed: a client's own forwarding headers do not steer the redirect.
    spoofed = await request(
        gw, headers=[BROWSER, ("X-Forwarded-Host", "evil.example"), ("X-Forwarded-Proto", "https")]
    )
    assert spoofed.headers[b"location"] == [b"/oauth2/start?rd=http%3A%2F%2Flocalhost%2Fhello"]
    assert len(env.upstream.seen) == 1

    assert gw.decisions() == {"allow": 1, "redirect": 2, "deny": 3}
    lines = gw.log_lines()
    assert [(line["status"], line["auth"]) for line in lines] == [
        (200, "allow"), (302, "redirect"), (401, "deny"), (401, "deny"), (403, "deny"), (302, "redirect"),
    ]
    text = gw.metrics.exposition()[0].decode()  # type: ignore[union-attr]
    assert 'fauth_auth_decisions_total{outcome="redirect",route="1"} 2.0' in text


@pytest_twisted.ensureDeferred
async def test_a_cached_denial_redirects_each_request_to_its_own_url(env: Env, tmp_path: Any) -> None:
    # (A 401 with Set-Cookie would never be stored.)
    auth = await env.auth(lambda seen, conn: conn.respond(401, body=b"unauthorized"))
    gw = await env.gateway(
        auth.url(), access_log=str(tmp_path / "access.log"), request_headers=["Authorization"],
        signin_redirect={"uri": "https://auth.example.com/start", "param": "next"},
        cache={"ttl": 30, "deny_ttl": 30, "key": ["$http_authorization"]},
    )
    first = await request(gw, "/hello?page=1", headers=[BROWSER])
    second = await request(gw, "/hello?page=2", headers=[BROWSER])
    api = await request(gw, "/hello?page=3")
    assert len(auth.requests) == 1  # one call: the others were the stored denial
    assert first.headers[b"location"] == [b"https://auth.example.com/start?next=http%3A%2F%2Flocalhost%2Fhello%3Fpage%3D1"]
    assert second.headers[b"location"] == [b"https://auth.example.com/start?next=http%3A%2F%2Flocalhost%2Fhello%3Fpage%3D2"]
    assert (api.status, api.body) == (401, b"unauthorized")
    assert [line["auth"] for line in gw.log_lines()] == ["redirect", "redirect (cached)", "deny (cached)"]
    assert gw.decisions() == {"redirect": 2, "deny": 1}
