"""
Request paths (issue 18, point 1): normalised only as far as RFC 3986 says
the result is equivalent; ambiguous encodings (C{%2F %5C %00 %3B %25 %3F
%23}) kept or refused by the C{encoded_characters} policy, never decoded
into separators; C{//} merged or not by C{merge_slashes}; and the auth
service (C{X-Forwarded-Uri}) and the upstream always sent the same target.

The end-to-end tests send the attacker's bytes over a raw socket to a real
gateway, with a recording auth service and upstream behind it.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred

from fauth.config import ConfigError, parse_config
from fauth.request.inbound import AMBIGUOUS, BadRequest, normalise, normalise_path
from tests.harness import GatewayUnderTest, raw_request, start_gateway
from tests.hostile_env import AuthService, Upstream, request, status_of
from tests.servers import listen_on_loopback

# ---------------------------------------------------------------------------
# normalise(): route form, target form, whether an ambiguous encoding is kept

NORMAL = [
    # raw, merge_slashes, route form, target
    (b"/api/v4/projects/group%2Fproject", True, "/api/v4/projects/group%2Fproject", b"/api/v4/projects/group%2Fproject"),
    (b"/api/a%20b/%2Fx", True, "/api/a b/%2Fx", b"/api/a%20b/%2Fx"),
    (b"/api/a%2fb", True, "/api/a%2Fb", b"/api/a%2Fb"),  # hex upper-cased
    (b"/api//double", True, "/api/double", b"/api/double"),
    (b"/api//double", False, "/api//double", b"/api//double"),
    (b"//a///b/", True, "/a/b/", b"/a/b/"),
    (b"//a///b/", False, "//a///b/", b"//a///b/"),
    (b"/a/../b", True, "/b", b"/b"),
    (b"/a//../b", True, "/b", b"/b"),
    (b"/a//../b", False, "/a/b", b"/a/b"),  # RFC 3986 5.2.4: ".." removes the empty segment
    (b"/public/%2e%2e/private", True, "/private", b"/private"),
    (b"/public/%2E.//private", True, "/private", b"/private"),
    (b"/a/./b/.", True, "/a/b/", b"/a/b/"),
    (b"/a/b/..", True, "/a/", b"/a/"),
    (b"/a/%2E", True, "/a/", b"/a/"),
    (b"/%7euser/%41%62%2D%5f", True, "/~user/Ab-_", b"/~user/Ab-_"),  # unreserved: decoded
    (b"/caf%c3%a9", True, "/caf\u00e9", b"/caf%C3%A9"),  # not unreserved: stays encoded, upper-cased
    (b"/x%ff", True, "/x\u00ff", b"/x%FF"),  # not UTF-8: read byte for byte
    (b"/sp%20ace", True, "/sp ace", b"/sp%20ace"),
    (b"/..a/.b", True, "/..a/.b", b"/..a/.b"),  # not dot segments
    (b"/", True, "/", b"/"),
    (b"/plain", True, "/plain", b"/plain"),
]


@pytest.mark.parametrize("raw, merge, route, target", NORMAL)
def test_normalise(raw: bytes, merge: bool, route: str, target: bytes) -> None:
    path = normalise(raw, merge)
    assert (path.route, path.target) == (route, target)
    assert path.encoded == (b"%" in target and any(b"%%%02X" % c in target for c in AMBIGUOUS))


@pytest.mark.parametrize("char", sorted(AMBIGUOUS))
def test_each_ambiguous_encoding_is_kept_encoded_never_decoded(char: int) -> None:
    for spelling in (b"%%%02x" % char, b"%%%02X" % char):
        path = normalise(b"/a/x" + spelling + b"y/b")
        assert path.encoded
        assert path.target == b"/a/x%%%02Xy/b" % char
        assert path.route == "/a/x%%%02Xy/b" % char
        with pytest.raises(BadRequest):
            normalise_path(b"/a/x" + spelling + b"y/b")  # encoded_characters: reject
        assert normalise_path(b"/a/x" + spelling + b"y/b", encoded_characters="keep") == path.route


REFUSED = [
    b"/%2e%2e/x", b"/../x", b"/a/../../x",  # above the root
    b"/public/..%2fprivate", b"/public%2f..%2fprivate", b"/public/%2e%2e%2fprivate", b"/x/..%5Cprivate",
    b"/x/%5c..%5cprivate", b"/x/..%3b/private", b"/x/..%3B", b"/x/.%00", b"/x/..%3Fa", b"/x/..%23a",
    b"/x/%252e%252e%252fprivate", b"/x/..%252F",  # a dot segment behind an encoded separator: any policy
    b"/a%zz", b"/a%4", b"/a%", b"/a%%41",  # malformed percent-encoding
    b"/a;b", b"/a\\b", b"/a#b",  # path parameters, backslash, fragment: raw
    b"/%c0%ae%c0%ae/x", b"/%e0%80%ae",  # overlong UTF-8
    b"x", b"", b"/a b", b"/\xc3\xa9",  # not an origin-form path of visible ASCII
]


@pytest.mark.parametrize("raw", REFUSED)
@pytest.mark.parametrize("merge", [True, False], ids=["merge", "no-merge"])
def test_refused_whatever_the_policy(raw: bytes, merge: bool) -> None:
    with pytest.raises(BadRequest):
        normalise_path(raw, merge, encoded_characters="keep")


# ---------------------------------------------------------------------------
# Configuration


def _conf(http: Optional[Dict[str, Any]] = None, **route: Any) -> Any:
    doc: Dict[str, Any] = {"routes": [dict({"id": "r", "uri": "/r", "upstream": {"nodes": {"127.0.0.1:1": 1}}}, **route)]}
    if http is not None:
        doc["http"] = http
    return parse_config(doc)


def test_defaults_are_reject_and_merge() -> None:
    conf = _conf()
    assert (conf.http.encoded_characters, conf.http.merge_slashes) == ("reject", True)
    assert conf.routes[0].encoded_characters is None


def test_listener_and_route_settings() -> None:
    conf = _conf({"encoded_characters": "keep", "merge_slashes": False}, encoded_characters="reject")
    assert (conf.http.encoded_characters, conf.http.merge_slashes) == ("keep", False)
    assert conf.routes[0].encoded_characters == "reject"


@pytest.mark.parametrize(
    "http, route, message",
    [
        ({"encoded_characters": "decode"}, {}, 'config: http: property "encoded_characters" must be "keep" or "reject"'),
        ({"merge_slashes": "yes"}, {}, 'config: http: property "merge_slashes" must be a boolean'),
        (
            None,
            {"encoded_characters": "decode"},
            'route "r": property "encoded_characters" validation failed: matches none of the enum values',
        ),
        (
            None,
            {"encoded_characters": 1},
            'route "r": property "encoded_characters" validation failed: wrong type: expected string, got number',
        ),
    ],
)
def test_bad_settings_are_refused_by_name(http: Any, route: Dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        _conf(http, **route)
    assert str(e.value) == message


# ---------------------------------------------------------------------------
# End to end: raw bytes in, what the auth service and the upstream saw


class Env:
    def __init__(self, gateway: GatewayUnderTest, auth: AuthService, guarded: Upstream, public: Upstream, ports: List[Any]) -> None:
        self.gateway = gateway
        self.auth = auth
        self.guarded = guarded
        self.public = public
        self.ports = ports

    async def get(self, reactor: Any, target: bytes, authorised: bool = True) -> Optional[int]:
        headers: Tuple[bytes, ...] = (b"Host: gw.test",) + ((b"Authorization: letmein",) if authorised else ())
        raw = await raw_request(reactor, self.gateway.port_number, request(target, headers=headers))
        return status_of(raw)

    def judged(self) -> List[bytes]:
        """Every X-Forwarded-Uri the auth service was sent."""
        return [value for call in self.auth.calls for value in call.get(b"x-forwarded-uri", [])]

    def served(self) -> List[bytes]:
        return [hit["uri"] for hit in self.guarded.hits + self.public.hits]

    def reset(self) -> None:
        del self.auth.calls[:], self.guarded.hits[:], self.public.hits[:]

    async def stop(self) -> None:
        await self.gateway.stop()
        for port in self.ports:
            await port.stopListening()


async def start(reactor: Any, http: Optional[Dict[str, Any]] = None, **routes: Dict[str, Any]) -> Env:
    """
    A gateway with C{/api/*} and C{/api/admin/*} guarded (auth: C{Authorization:
    letmein}) and C{/*} unguarded (public); C{routes} adds keys to a route by id.
    """
    auth, guarded, public = AuthService(), Upstream(b"guarded"), Upstream(b"public")
    ports = [await listen_on_loopback(reactor, r) for r in (auth, guarded, public)]
    fa = {
        "forward-auth": {
            "uri": "http://127.0.0.1:%d/auth" % ports[0].getHost().port,
            "request_headers": ["Authorization"],
        }
    }
    to_guarded = {"nodes": {"127.0.0.1:%d" % ports[1].getHost().port: 1}}
    to_public = {"nodes": {"127.0.0.1:%d" % ports[2].getHost().port: 1}}
    docs = [
        {"id": "api", "uri": "/api/*", "plugins": fa, "upstream": to_guarded},
        {"id": "admin", "uri": "/api/admin/*", "plugins": fa, "upstream": to_guarded},
        {"id": "public", "uri": "/*", "upstream": to_public},
    ]
    for doc in docs:
        doc.update(routes.get(str(doc["id"]), {}))
    config: Dict[str, Any] = {"routes": docs}
    if http is not None:
        config["http"] = http
    return Env(await start_gateway(reactor, config), auth, guarded, public, ports)


@async_yield_fixture
async def env(reactor: Any, request: Any) -> AsyncIterator[Env]:
    """The gateway of L{start}, with the C{http} section a test passes as C{KEEP} (indirect), or none."""
    environment = await start(reactor, getattr(request, "param", None))
    try:
        yield environment
    finally:
        await environment.stop()


KEEP = pytest.mark.parametrize("env", [{"encoded_characters": "keep"}], indirect=True, ids=["keep"])


@KEEP
@ensureDeferred
async def test_the_issue_paths_reach_auth_and_upstream_as_sent_with_keep(reactor: Any, env: Env) -> None:
    for target in (b"/api/v4/projects/group%2Fproject", b"/api/a%20b/%2Fx", b"/api/v4/projects/group%2Fproject?ref=a%2Fb"):
        env.reset()
        assert await env.get(reactor, target) == 200
        assert env.judged() == [target]
        assert [hit["uri"] for hit in env.guarded.hits] == [target]


@pytest.mark.parametrize("char", sorted(AMBIGUOUS), ids=lambda c: "%%%02X" % c)
@ensureDeferred
async def test_each_ambiguous_encoding_is_400_by_default_and_nobody_sees_it(reactor: Any, env: Env, char: int) -> None:
    assert await env.get(reactor, b"/api/a%%%02xb" % char) == 400
    assert await env.get(reactor, b"/elsewhere%%%02Xb" % char) == 400
    assert env.auth.calls == [] and env.served() == []


@pytest.mark.parametrize("char", sorted(AMBIGUOUS), ids=lambda c: "%%%02X" % c)
@KEEP
@ensureDeferred
async def test_each_ambiguous_encoding_is_kept_encoded_for_auth_and_upstream(reactor: Any, env: Env, char: int) -> None:
    assert await env.get(reactor, b"/api/a%%%02xb" % char) == 200
    expected = b"/api/a%%%02Xb" % char
    assert env.judged() == [expected]
    assert [hit["uri"] for hit in env.guarded.hits] == [expected]


@ensureDeferred
async def test_a_route_overrides_the_listener_either_way(reactor: Any) -> None:
    # Listener reject, one route keep (GitLab-style APIs): only that route passes %2F.
    environment = await start(reactor, None, api={"encoded_characters": "keep"})
    try:
        assert await environment.get(reactor, b"/api/group%2Fproject") == 200
        assert await environment.get(reactor, b"/other%2Fthing") == 400
        assert environment.served() == [b"/api/group%2Fproject"]
    finally:
        await environment.stop()
    # Listener keep, one route reject.
    environment = await start(reactor, {"encoded_characters": "keep"}, public={"encoded_characters": "reject"})
    try:
        assert await environment.get(reactor, b"/api/group%2Fproject") == 200
        assert await environment.get(reactor, b"/other%2Fthing") == 400
        assert environment.served() == [b"/api/group%2Fproject"]
    finally:
        await environment.stop()


@KEEP
@ensureDeferred
async def test_an_encoded_slash_never_routes_as_a_slash(reactor: Any, env: Env) -> None:
    # Kept, %2F is part of a segment: "/api%2Fadmin/x" is not under /api/ for the
    # routes, and goes on encoded, so a strict upstream sees one segment too.
    assert await env.get(reactor, b"/api%2Fadmin/x", authorised=False) == 200
    assert [hit["uri"] for hit in env.public.hits] == [b"/api%2Fadmin/x"]
    assert env.guarded.hits == []


# What an attacker sends to climb out of an unguarded route or into a guarded one.
ATTACKS = [
    b"/x/..%2fapi/admin/secret", b"/x%2f..%2fapi/admin/secret", b"/x/%2e%2e%2fapi/admin/secret",
    b"/x/..%5capi/admin/secret", b"/x/%5c..%5capi/admin/secret", b"/x/..%3b/api/admin/secret",
    b"/x/.%00/../api/admin/secret", b"/x/..%3F/api/admin/secret", b"/x/..%23/api/admin/secret",
    b"/x/%252e%252e%252fapi/admin/secret", b"/x/%2e%2e/api/admin/secret", b"/x/..;/api/admin/secret",
    b"/x\\..\\api/admin/secret", b"/x/%c0%ae%c0%ae/api/admin/secret", b"//api/admin/secret",
    b"/x/../api/admin/secret", b"/api/admin/../admin/secret", b"/%2e%2e/api/admin/secret",
]


@pytest.mark.parametrize("target", ATTACKS)
@pytest.mark.parametrize("policy", ["reject", "keep"])
@ensureDeferred
async def test_no_encoding_trick_reaches_a_guarded_path_unauthenticated(reactor: Any, target: bytes, policy: str) -> None:
    environment = await start(reactor, {"encoded_characters": policy})
    try:
        status = await environment.get(reactor, target, authorised=False)
        assert status in (400, 403), status
        assert environment.guarded.hits == []
        for uri in [hit["uri"] for hit in environment.public.hits]:
            assert b"admin" not in uri.lower(), uri
    finally:
        await environment.stop()


@ensureDeferred
async def test_merge_slashes_on_by_default(reactor: Any, env: Env) -> None:
    assert await env.get(reactor, b"/api//double") == 200
    assert env.judged() == [b"/api/double"] and env.served() == [b"/api/double"]
    env.reset()
    # A guarded prefix cannot be escaped with an extra slash.
    assert await env.get(reactor, b"//api//admin/x", authorised=False) == 403
    assert env.served() == []


@ensureDeferred
async def test_merge_slashes_off_keeps_them_for_everyone(reactor: Any) -> None:
    environment = await start(reactor, {"merge_slashes": False})
    try:
        assert await environment.get(reactor, b"/api//double") == 200
        assert environment.judged() == [b"/api//double"]
        assert environment.served() == [b"/api//double"]
    finally:
        await environment.stop()


@KEEP
@ensureDeferred
async def test_unreserved_encodings_are_decoded_and_hex_upper_cased(reactor: Any, env: Env) -> None:
    assert await env.get(reactor, b"/api/%7euser/caf%c3%a9/%2fk") == 200
    assert env.judged() == [b"/api/~user/caf%C3%A9/%2Fk"]
    assert env.served() == [b"/api/~user/caf%C3%A9/%2Fk"]


TARGETS = [
    b"/api/a", b"/api/./a/../b", b"/api/%2e/x", b"/api//x//y/", b"/api/a%2Fb", b"/api/a%2fb?q=%2F#",
    b"/api/%25", b"/api/caf%c3%a9", b"/api/%7E/x?a=..%2F", b"/api/a%3bb", b"/api/a%00", b"/api/.%2e/api/x",
]


@pytest.mark.parametrize("http", [None, {"encoded_characters": "keep"}, {"merge_slashes": False}], ids=["default", "keep", "no-merge"])
@ensureDeferred
async def test_the_auth_service_and_the_upstream_see_one_target(reactor: Any, http: Any) -> None:
    environment = await start(reactor, http)
    try:
        for target in TARGETS:
            environment.reset()
            status = await environment.get(reactor, target)
            if status == 200:
                (judged,) = environment.judged()
                assert environment.served() == [judged], target
            else:
                assert status == 400 and environment.served() == [], (target, status)
    finally:
        await environment.stop()
