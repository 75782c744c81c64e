"""
Header patterns and renames in C{upstream_headers} and C{client_headers}:
compiling and its wording, the anti-spoofing rule for every name a pattern
or rename can give, and through a real gateway on loopback: allowed,
denied, spoofed, cached, with the metrics and the access log.
"""
from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.web.http_headers import Headers

from fauth.auth.decision import Allow
from fauth.config.headerrules import compile_rules
from tests.auth.test_client import Env, env, request  # noqa: F401 (env: fixture)
from tests.harness import refusal, start_gateway
from tests.rawserver import RawConnection, Seen


def test_names_renames_and_patterns_compile_once() -> None:
    rules = compile_rules(
        "upstream_headers", ["X-User-ID", "X-Auth-Request-User>X-User", " A > B ", "Remote-*", "X_Auth_*_Token"]
    )
    assert rules.exact == ((b"X-User-ID", b"X-User-ID"), (b"X-Auth-Request-User", b"X-User"), (b"A", b"B"))
    assert rules.pattern is not None
    for name in (b"Remote-User", b"remote_groups", b"REMOTE-", b"x-auth-access-token", b"X_AUTH_ID_TOKEN"):
        assert rules.strips(name), name
    for name in (b"Remote", b"X-Remote-User", b"x-auth-token-x", b"X-User"):
        assert not rules.strips(name), name
    assert compile_rules("client_headers", ["Location"]).pattern is None


def test_a_pattern_never_touches_the_names_that_frame_a_message() -> None:
    rules = compile_rules("upstream_headers", ["Content-*", "*st", "Trans*", "Connect*"])
    for name in (b"Content-Length", b"Host", b"Transfer-Encoding", b"Connection"):
        assert not rules.strips(name), name
    assert rules.strips(b"Content-Type")
    picked = rules.matching([(b"content-length", [b"5"]), (b"content-type", [b"text/plain"]), (b"host", [b"x"])])
    assert picked == [(b"content-type", (b"text/plain",))]


@pytest.mark.parametrize("prop", ["upstream_headers", "client_headers"])
@pytest.mark.parametrize("entry", ["*", "**", "X-*>X-User", "A>", ">B", "A>B>C", "A>B*", "X *", "X-\r\n*", "Ü-*"])
def test_bad_entries_are_refused_naming_route_and_attribute(prop: str, entry: str) -> None:
    shown = entry if entry.isprintable() else entry.encode("unicode_escape").decode("ascii")
    assert refusal({"uri": "http://a/auth", prop: ["X-Ok", entry]}) == (
        'route "r1": plugin forward-auth: property "%s" validation failed: '
        'failed to validate item 2: invalid header name "%s"' % (prop, shown)
    )


def test_every_spelling_a_pattern_matches_goes_and_connection_cannot_hide_one() -> None:
    rules = compile_rules("upstream_headers", ["Remote-*"])
    allow = Allow(((b"remote-user", (b"alice",)),), strip=rules)
    headers = Headers(
        {
            b"Remote-User": [b"mallory"],
            b"remote_user": [b"mallory"],
            b"REMOTE-GROUPS": [b"admins"],
            b"Remote_Email": [b"m@evil"],
            b"Connection": [b"keep-alive, Remote-Name"],
            b"X-Other": [b"kept"],
        }
    )
    allow.apply(headers)
    assert dict(headers.getAllRawHeaders()) == {
        b"Remote-User": [b"alice"],
        b"Connection": [b"keep-alive"],
        b"X-Other": [b"kept"],
    }
    # A pattern strips even when the auth service gave no header of it.
    empty = Headers({b"Remote-User": [b"mallory"]})
    Allow((), strip=rules).apply(empty)
    assert list(empty.getAllRawHeaders()) == []


# ---------------------------------------------------------------------------
# Through a real gateway


def proxy_like(seen: Seen, conn: RawConnection) -> None:
    """Allows token "good" with oauth2-proxy's and Authelia's identity headers; 401 otherwise."""
    token = dict((n.lower(), v) for n, v in seen.headers).get(b"authorization")
    if token == b"good":
        conn.respond(
            200,
            [
                (b"Remote-User", b"alice"),
                (b"Remote-Groups", b"admins,dev"),
                (b"X-Auth-Request-User", b"alice@corp"),
                (b"X-Unrelated", b"not copied"),
            ],
        )
    else:
        conn.respond(401, [(b"WWW-Authenticate", b'Bearer realm="corp"'), (b"X-Reason", b"expired")], b"no")


SPOOFED = [
    ("Remote-User", "mallory"),
    ("remote_groups", "admins"),
    ("REMOTE-EMAIL", "m@evil"),
    ("X_User", "mallory"),
    ("x-user", "mallory"),
]  # (Connection: Remote-User is the unit test's: the request helper sends its own Connection line)


@pytest_twisted.ensureDeferred
async def test_patterns_and_renames_through_the_gateway(env: Env, tmp_path: Any) -> None:
    auth = await env.auth(proxy_like)
    gw = await env.gateway(
        auth.url(), access_log=str(tmp_path / "access.log"), request_headers=["Authorization"],
        upstream_headers=["Remote-*", "X-Auth-Request-User>X-User"],
        client_headers=["WWW-*", "X-Reason>X-Why"],
        cache={"ttl": 30},
    )
    # Allowed (then again from the cache), each time with spoofed identity headers.
    for _ in range(2):
        ok = await request(gw, headers=[("Authorization", "good")] + SPOOFED)
        assert ok.status == 200
        seen = env.upstream.seen[-1]
        assert identity_headers(seen) == {
            b"remote-user": [b"alice"],
            b"remote-groups": [b"admins,dev"],
            b"x-user": [b"alice@corp"],
        }
        assert not seen.hasHeader(b"x-unrelated")
    # Denied: the patterns and renames of client_headers pick what the client gets.
    denied = await request(gw, headers=SPOOFED)
    assert (denied.status, denied.body) == (401, b"no")
    assert denied.headers[b"www-authenticate"] == [b'Bearer realm="corp"']
    assert denied.headers[b"x-why"] == [b"expired"]
    assert b"x-reason" not in denied.headers
    assert len(auth.requests) == 2
    assert gw.decisions() == {"allow": 2, "deny": 1}
    assert [line["auth"] for line in gw.log_lines()] == ["allow", "allow (cached)", "deny"]


@pytest_twisted.ensureDeferred
async def test_the_access_log_user_follows_a_rename_for_stored_allows(env: Env, tmp_path: Any) -> None:
    auth = await env.auth(proxy_like)
    doc = env.doc(
        auth.url(), request_headers=["Authorization"], upstream_headers=["X-Auth-Request-User>X-User"],
        cache={"ttl": 30},
    )
    doc["access_log_user_header"] = "X-User"
    gw = await start_gateway(env.reactor, doc, str(tmp_path / "access.log"))
    try:
        for _ in range(2):
            assert (await request(gw, headers=[("Authorization", "good")])).status == 200
        assert [(line["auth"], line["user"]) for line in gw.log_lines()] == [
            ("allow", "alice@corp"), ("allow (cached)", "alice@corp"),
        ]
    finally:
        await gw.stop()


@pytest_twisted.ensureDeferred
async def test_a_preflight_let_through_unasked_strips_what_a_pattern_matches(env: Env) -> None:
    auth = await env.auth(proxy_like)
    gw = await env.gateway(auth.url(), upstream_headers=["Remote-*", "X-Auth-Request-User>X-User"], run_on_preflight=False)
    reply = await request(
        gw, method="OPTIONS",
        headers=[("Origin", "https://app.example"), ("Access-Control-Request-Method", "PUT")] + SPOOFED,
    )
    assert reply.status == 200
    assert len(auth.requests) == 0
    seen = env.upstream.seen[-1]
    assert identity_headers(seen) == {}


def identity_headers(headers: Any) -> Any:
    return {
        name.lower(): values for name, values in headers.getAllRawHeaders()
        if name.lower().replace(b"_", b"-").startswith((b"remote-", b"x-user", b"x-auth"))
    }
