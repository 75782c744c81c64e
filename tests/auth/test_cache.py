"""
The decision cache (forward-auth's C{cache} section) on a fake clock and a
scripted auth client: configuration and its wording, keys, what a cached
decision holds, Cache-Control, coalescing and its cancellation, serve-stale,
the LRU bound, reloads.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from fauth.auth.cache import DecisionCache, lifetime
from fauth.auth.client import AuthCallError, Reply
from fauth.auth.decision import Allow, Degrade, Respond
from fauth.auth.forward import ForwardAuth
from fauth.config import CacheConf, ConfigError, Node, RouteConf, UpstreamConf, parse_config, parse_forward_auth
from fauth.edge.gateway import Gateway
from fauth.request.inbound import InboundRequest
from fauth.wire.h1 import ReplyHeaders
from tests.harness import LogCapture, outcome

URI = "http://127.0.0.1:9/auth"


class Call:
    """One auth call the scripted client received."""

    def __init__(self, fields: Sequence[Tuple[bytes, bytes]], body: Optional[bytes]) -> None:
        self.fields = dict((n.lower(), v) for n, v in fields)
        self.body = body
        self.cancelled = False
        self.deferred: Deferred = Deferred(self._cancel)

    def _cancel(self, d: Deferred) -> None:
        self.cancelled = True

    def answer(self, status: int = 200, headers: Optional[Dict[bytes, List[bytes]]] = None, body: bytes = b"") -> None:
        fields = {k.lower(): v for k, v in (headers or {}).items()}
        self.deferred.callback(Reply(status, ReplyHeaders(fields), body))

    def fail(self, reason: str = "connection refused") -> None:
        self.deferred.errback(Failure(AuthCallError(reason)))


class ScriptedClient:
    """An L{AuthClient} stand-in: every call waits until the test answers it."""

    host_header = b"127.0.0.1:9"

    def __init__(self) -> None:
        self.calls: List[Call] = []

    def call(
        self,
        method: str,
        fields: Sequence[Tuple[bytes, bytes]],
        body: Optional[bytes],
        timeout: float,
        target: Optional[bytes] = None,
    ) -> Deferred:
        call = Call(fields, body)
        self.calls.append(call)
        return call.deferred

    @property
    def last(self) -> Call:
        return self.calls[-1]

#: The route the checks run for ($route_id "1").
ROUTE = RouteConf(id="1", uris=("/",), upstream=UpstreamConf(nodes=(Node("127.0.0.1", 80),)))


def inbound(
    token: str = "t1",
    uri: str = "/x",
    remote: str = "10.0.0.1",
    method: str = "GET",
    body: bytes = b"",
    **extra: str,
) -> InboundRequest:
    headers = Headers({b"authorization": [token.encode()], b"host": [b"gw.test"]})
    for name, value in extra.items():
        headers.setRawHeaders(name.replace("_", "-").encode(), [value.encode()])
    path, _, query = uri.partition("?")
    request = InboundRequest(
        method=method, request_uri=uri, path=path, query=query, host="gw.test", scheme="http",
        remote_addr=remote, remote_port=1, server_addr="127.0.0.1", server_port=2, headers=headers,
    )
    request._body = body
    return request


def forward_auth(clock: Any = None, cache: Any = "default", **plugin: Any) -> Tuple[ForwardAuth, ScriptedClient, Clock]:
    conf: Dict[str, Any] = {
        "uri": URI,
        "request_headers": ["Authorization"],
        "upstream_headers": ["X-User-ID"],
        "client_headers": ["Location"],
    }
    if cache == "default":
        cache = {"ttl": 30}
    if cache is not None:
        conf["cache"] = cache
    conf.update(plugin)
    clock = clock or Clock()
    client = ScriptedClient()
    return ForwardAuth(parse_forward_auth(conf), client, clock), client, clock  # type: ignore[arg-type]


def allow(user: bytes) -> Dict[bytes, List[bytes]]:
    return {b"x-user-id": [user]}


def decided(auth: ForwardAuth, request: InboundRequest) -> Any:
    """The decision C{auth} made at once (a hit), or fail."""
    got = outcome(auth.check(request, ROUTE))
    assert got, "no decision at once"
    return got[0]


# ---------------------------------------------------------------------------
# Configuration


def _route_error(cache: Any) -> str:
    doc = {
        "routes": [
            {
                "id": "1",
                "uri": "/",
                "plugins": {"forward-auth": {"uri": URI, "cache": cache}},
                "upstream": {"nodes": {"127.0.0.1:1980": 1}},
            }
        ]
    }
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    return str(info.value)


PREFIX = 'route "1": plugin forward-auth: property "cache" validation failed: '


@pytest.mark.parametrize(
    "cache, message",
    [
        ({}, 'property "ttl" is required'),
        ({"ttl": -1}, 'property "ttl" validation failed: expected -1 to be at least 0'),
        ({"ttl": "30"}, 'property "ttl" validation failed: wrong type: expected number, got string'),
        ({"ttl": True}, 'property "ttl" validation failed: wrong type: expected number, got boolean'),
        ({"ttl": float("inf")}, 'property "ttl" validation failed: expected inf to be a finite number'),
        ({"ttl": 1, "deny_ttl": -0.5}, 'property "deny_ttl" validation failed: expected -0.5 to be at least 0'),
        ({"ttl": 1, "stale_if_error": None}, 'property "stale_if_error" validation failed: wrong type: expected number, got null'),
        ({"ttl": 1, "max_entries": 0}, 'property "max_entries" validation failed: expected 0 to be at least 1'),
        ({"ttl": 1, "max_entries": 1.5}, 'property "max_entries" validation failed: wrong type: expected integer, got number'),
        ({"ttl": 1, "key": "$http_authorization"}, 'property "key" validation failed: wrong type: expected array, got string'),
        ({"ttl": 1, "key": [1]}, 'property "key" validation failed: failed to validate item 1: wrong type: expected string, got number'),
        (
            {"ttl": 1, "key": ["$uri", "Authorization"]},
            'property "key" validation failed: failed to validate item 2: "Authorization" names no variable '
            '(e.g. "$http_authorization")',
        ),
        ({"ttl": 1, "stale": 5}, "additional properties forbidden, found stale"),
        (None, "wrong type: expected object, got null"),
        ([1], "wrong type: expected object, got array"),
    ],
)
def test_bad_cache_sections_are_refused_naming_route_and_attribute(cache: Any, message: str) -> None:
    assert _route_error(cache) == PREFIX + message


def test_cache_section_parsed_with_defaults() -> None:
    conf = parse_forward_auth({"uri": URI, "cache": {"ttl": 30, "key": ["$http_authorization"]}})
    assert conf.cache is not None
    assert (conf.cache.ttl, conf.cache.deny_ttl, conf.cache.max_entries, conf.cache.stale_if_error) == (30, 0, 10000, 0)
    assert [t.source for t in conf.cache.key] == ["$http_authorization"]
    assert parse_forward_auth({"uri": URI}).cache is None


def test_admin_api_wording_for_a_bad_cache() -> None:
    from fauth.config import parse_route

    with pytest.raises(ConfigError) as info:
        parse_route(
            {"uri": "/", "plugins": {"forward-auth": {"uri": URI, "cache": {"ttl": -1}}},
             "upstream": {"nodes": {"127.0.0.1:1": 1}}},
            {}, "1",
        )
    assert str(info.value) == (
        "failed to check the configuration of plugin forward-auth err: "
        'property "cache" validation failed: property "ttl" validation failed: expected -1 to be at least 0'
    )


# ---------------------------------------------------------------------------
# Off by default


def test_without_cache_every_request_asks_and_decisions_carry_no_cache_label() -> None:
    auth, client, _ = forward_auth(cache=None)
    assert auth.cache is None
    results = [outcome(auth.check(inbound(), ROUTE)) for _ in range(3)]
    assert len(client.calls) == 3, "identical requests are not coalesced without a cache section"
    for call in client.calls:
        call.answer(200, allow(b"u1"))
    for got in results:
        assert got[0] == Allow(((b"X-User-ID", (b"u1",)),))
        assert got[0].cache is None
    assert len(client.calls) == 3


# ---------------------------------------------------------------------------
# Hits, expiry and the whole decision


def test_allow_is_reused_for_ttl_then_asked_again() -> None:
    auth, client, clock = forward_auth()
    first = outcome(auth.check(inbound(), ROUTE))
    client.last.answer(200, {b"x-user-id": [b"u1"], b"x-other": [b"o"]})
    assert first[0].cache == "miss"
    assert first[0].reply_headers is not None  # the asking request still logs the whole answer
    clock.advance(29.9)
    hit = decided(auth, inbound())
    assert hit.cache == "hit"
    assert hit == Allow(((b"X-User-ID", (b"u1",)),))
    assert len(client.calls) == 1
    clock.advance(0.1)
    again = outcome(auth.check(inbound(), ROUTE))
    assert again == [] and len(client.calls) == 2


def test_cached_allow_removes_missing_identity_headers_too() -> None:
    auth, client, _ = forward_auth()
    outcome(auth.check(inbound(), ROUTE))
    client.last.answer(200, {})
    hit = decided(auth, inbound())
    assert hit.set_headers == ((b"X-User-ID", None),)
    headers = Headers({b"x-user-id": [b"forged"]})
    hit.apply(headers)
    assert not headers.hasHeader(b"x-user-id")


def test_denials_are_asked_again_by_default() -> None:
    auth, client, _ = forward_auth()
    outcome(auth.check(inbound(), ROUTE))
    client.last.answer(403, {b"location": [b"/login"]}, b"no")
    outcome(auth.check(inbound(), ROUTE))
    assert len(client.calls) == 2


def test_deny_ttl_reuses_a_whole_denial() -> None:
    auth, client, clock = forward_auth(cache={"ttl": 30, "deny_ttl": 5})
    outcome(auth.check(inbound(), ROUTE))
    client.last.answer(401, {b"location": [b"/login"], b"x-secret": [b"s"]}, b"who are you")
    hit = decided(auth, inbound())
    assert hit == Respond(401, ((b"Location", (b"/login",)),), b"who are you")
    assert (hit.outcome, hit.cache) == ("deny", "hit")
    clock.advance(5)
    assert outcome(auth.check(inbound(), ROUTE)) == []
    assert len(client.calls) == 2


@pytest.mark.parametrize("status", [302, 400, 404, 429, 500, 503])
def test_other_answers_are_never_stored(status: int) -> None:
    auth, client, _ = forward_auth(cache={"ttl": 30, "deny_ttl": 30})
    outcome(auth.check(inbound(), ROUTE))
    client.last.answer(status, {}, b"x")
    outcome(auth.check(inbound(), ROUTE))
    assert len(client.calls) == 2


def test_transport_errors_are_never_stored() -> None:
    auth, client, _ = forward_auth()
    first = outcome(auth.check(inbound(), ROUTE))
    client.last.fail()
    assert first[0] == Respond(403) and (first[0].outcome, first[0].cache) == ("error", "miss")
    outcome(auth.check(inbound(), ROUTE))
    assert len(client.calls) == 2


def test_unbuildable_auth_request_is_refused_before_the_cache() -> None:
    auth, client, _ = forward_auth(extra_headers={"X-A": "$arg_a"})
    got = decided(auth, inbound(uri="/x?a=%0d%0aX:1".replace("%0d%0a", "\r\n")))
    assert got.outcome == "error" and client.calls == []


# ---------------------------------------------------------------------------
# Keys


def test_default_key_is_the_whole_auth_request() -> None:
    auth, client, _ = forward_auth(request_headers=["Authorization", "Cookie"])
    outcome(auth.check(inbound(), ROUTE))
    client.last.answer(200, allow(b"u1"))
    # Not sent to the auth service: cannot change its answer, shares the decision.
    assert decided(auth, inbound(x_unrelated="1")).cache == "hit"
    # Every field it is sent splits the key: token, cookie, client address, URI, host.
    for different in (
        inbound(token="t2"),
        inbound(cookie="s=1"),
        inbound(remote="10.0.0.2"),
        inbound(uri="/x?a=1"),
        inbound(uri="/y"),
    ):
        assert outcome(auth.check(different, ROUTE)) == []
    assert len(client.calls) == 6


def test_default_key_includes_the_body_in_post_mode() -> None:
    auth, client, _ = forward_auth(request_method="POST")
    outcome(auth.check(inbound(method="POST", body=b'{"a":1}'), ROUTE))
    client.last.answer(200, allow(b"u1"))
    assert decided(auth, inbound(method="POST", body=b'{"a":1}')).cache == "hit"
    assert outcome(auth.check(inbound(method="POST", body=b'{"a":2}'), ROUTE)) == []
    assert client.last.body == b'{"a":2}'


def test_default_key_splits_on_extra_headers_values() -> None:
    auth, client, _ = forward_auth(extra_headers={"X-Tenant": "$arg_tenant"})
    outcome(auth.check(inbound(uri="/x?tenant=a"), ROUTE))
    client.last.answer(200, allow(b"u1"))
    assert decided(auth, inbound(uri="/x?tenant=a")).cache == "hit"
    assert outcome(auth.check(inbound(uri="/x?tenant=b"), ROUTE)) == []


def test_narrowed_key_shares_across_what_it_leaves_out() -> None:
    auth, client, _ = forward_auth(cache={"ttl": 30, "key": ["$http_authorization"]})
    outcome(auth.check(inbound(token="t1", uri="/a", remote="10.0.0.1"), ROUTE))
    client.last.answer(200, allow(b"u1"))
    hit = decided(auth, inbound(token="t1", uri="/b?c=d", remote="10.9.9.9"))
    assert hit.cache == "hit" and hit.set_headers == ((b"X-User-ID", (b"u1",)),)
    assert outcome(auth.check(inbound(token="t2"), ROUTE)) == []
    assert len(client.calls) == 2


def test_narrowed_key_values_cannot_pass_for_each_other() -> None:
    # ("ab", "c") and ("a", "bc") must be two keys.
    auth, client, _ = forward_auth(cache={"ttl": 30, "key": ["$http_authorization", "$arg_x"]})
    outcome(auth.check(inbound(token="ab", uri="/?x=c"), ROUTE))
    client.last.answer(200, allow(b"u1"))
    assert outcome(auth.check(inbound(token="a", uri="/?x=bc"), ROUTE)) == []
    assert len(client.calls) == 2


# ---------------------------------------------------------------------------
# Cache-Control and Set-Cookie


CONF = CacheConf(ttl=30, deny_ttl=10)


@pytest.mark.parametrize(
    "status, headers, expected",
    [
        (200, {}, (30, False)),
        (200, {b"cache-control": [b"max-age=5"]}, (5, False)),
        (200, {b"cache-control": [b"public, max-age=500"]}, (30, False)),
        (200, {b"cache-control": [b"max-age=50, s-maxage=3"]}, (3, False)),
        (200, {b"cache-control": [b"max-age=2", b"max-age=7"]}, (2, False)),
        (200, {b"cache-control": [b'max-age="4"']}, (4, False)),
        (403, {b"cache-control": [b"max-age=4"]}, (4, False)),
        (403, {}, (10, False)),
        (200, {b"cache-control": [b"no-store"]}, (0, True)),
        (200, {b"cache-control": [b"max-age=60, Private"]}, (0, True)),
        (200, {b"cache-control": [b"no-cache"]}, (0, True)),
        (200, {b"cache-control": [b"max-age=0"]}, (0, True)),
        (200, {b"cache-control": [b"max-age=soon"]}, (0, True)),
        (200, {b"set-cookie": [b"s=1"]}, (0, True)),
        (403, {b"set-cookie": [b"s=1"]}, (0, True)),
    ],
)
def test_lifetime_follows_the_stricter_of_config_and_cache_control(
    status: int, headers: Dict[bytes, List[bytes]], expected: Tuple[float, bool]
) -> None:
    assert lifetime(status, ReplyHeaders(headers), CONF) == expected


def test_max_age_below_ttl_shortens_the_entry() -> None:
    auth, client, clock = forward_auth()
    outcome(auth.check(inbound(), ROUTE))
    client.last.answer(200, {b"x-user-id": [b"u1"], b"cache-control": [b"max-age=2"]})
    clock.advance(1.9)
    assert decided(auth, inbound()).cache == "hit"
    clock.advance(0.1)
    assert outcome(auth.check(inbound(), ROUTE)) == []


@pytest.mark.parametrize(
    "headers",
    [{b"cache-control": [b"no-store"]}, {b"cache-control": [b"private"]}, {b"set-cookie": [b"sid=abc"]}],
)
def test_answers_that_forbid_reuse_are_not_stored(headers: Dict[bytes, List[bytes]]) -> None:
    auth, client, _ = forward_auth()
    first = outcome(auth.check(inbound(), ROUTE))
    client.last.answer(200, {**headers, b"x-user-id": [b"u1"]})
    assert first[0].cache == "uncacheable"
    assert outcome(auth.check(inbound(), ROUTE)) == []
    assert len(client.calls) == 2


def test_an_uncacheable_answer_drops_the_expired_entry() -> None:
    auth, client, clock = forward_auth(cache={"ttl": 1, "stale_if_error": 60})
    outcome(auth.check(inbound(), ROUTE))
    client.last.answer(200, allow(b"u1"))
    clock.advance(2)
    outcome(auth.check(inbound(), ROUTE))
    client.last.answer(200, {b"x-user-id": [b"u1"], b"cache-control": [b"no-store"]})
    got = outcome(auth.check(inbound(), ROUTE))
    client.last.fail()
    assert got[0].outcome == "error", "no stale allow after the auth service said no-store"


# ---------------------------------------------------------------------------
# Coalescing


def test_identical_requests_in_flight_share_one_call() -> None:
    auth, client, _ = forward_auth()
    results = [outcome(auth.check(inbound(), ROUTE)) for _ in range(5)]
    other = outcome(auth.check(inbound(token="t2"), ROUTE))
    assert len(client.calls) == 2
    client.calls[0].answer(200, allow(b"u1"))
    assert [r[0].cache for r in results] == ["miss", "coalesced", "coalesced", "coalesced", "coalesced"]
    assert all(r[0].set_headers == ((b"X-User-ID", (b"u1",)),) for r in results)
    assert other == []
    client.calls[1].answer(200, allow(b"u2"))
    assert other[0].set_headers == ((b"X-User-ID", (b"u2",)),)


def test_ttl_zero_coalesces_but_stores_nothing() -> None:
    auth, client, _ = forward_auth(cache={"ttl": 0})
    results = [outcome(auth.check(inbound(), ROUTE)) for _ in range(3)]
    assert len(client.calls) == 1
    client.last.answer(200, allow(b"u1"))
    assert [r[0].cache for r in results] == ["miss", "coalesced", "coalesced"]
    assert outcome(auth.check(inbound(), ROUTE)) == []
    assert len(client.calls) == 2
    assert len(auth.cache) == 0  # type: ignore[arg-type]


def test_coalesced_failures_are_shared() -> None:
    auth, client, _ = forward_auth()
    results = [outcome(auth.check(inbound(), ROUTE)) for _ in range(3)]
    client.last.fail("timeout")
    assert [(r[0].outcome, r[0].cache) for r in results] == [("error", "miss"), ("error", "coalesced"), ("error", "coalesced")]


def test_a_waiter_that_leaves_does_not_cancel_the_shared_call() -> None:
    auth, client, _ = forward_auth()
    first = outcome(auth.check(inbound(), ROUTE))
    waiter = auth.check(inbound(), ROUTE)
    left = outcome(waiter)
    waiter.cancel()
    assert left[0].check(CancelledError)
    assert not client.last.cancelled
    client.last.answer(200, allow(b"u1"))
    assert first[0].set_headers == ((b"X-User-ID", (b"u1",)),)


def test_the_starter_leaving_does_not_cancel_the_call_for_the_others() -> None:
    auth, client, _ = forward_auth()
    starter = auth.check(inbound(), ROUTE)
    outcome(starter)
    others = [outcome(auth.check(inbound(), ROUTE)) for _ in range(2)]
    starter.cancel()
    assert not client.last.cancelled
    client.last.answer(200, allow(b"u1"))
    assert [o[0].cache for o in others] == ["coalesced", "coalesced"]
    assert decided(auth, inbound()).cache == "hit", "the answer is stored though its starter left"


def test_the_last_one_leaving_cancels_the_call_and_the_next_starts_afresh() -> None:
    auth, client, _ = forward_auth()
    seats = [auth.check(inbound(), ROUTE) for _ in range(3)]
    results = [outcome(s) for s in seats]
    seats[1].cancel()
    seats[0].cancel()
    assert not client.calls[0].cancelled
    seats[2].cancel()
    assert client.calls[0].cancelled
    assert all(r[0].check(CancelledError) for r in results)
    assert auth.cache.flights == {}  # type: ignore[union-attr]
    fresh = outcome(auth.check(inbound(), ROUTE))
    assert len(client.calls) == 2, "a new request does not join the cancelled call"
    client.last.answer(200, allow(b"u1"))
    assert fresh[0].cache == "miss"


def test_a_cancelled_shared_call_logs_nothing_and_stores_nothing() -> None:
    auth, client, _ = forward_auth()
    seat = auth.check(inbound(), ROUTE)
    outcome(seat)
    with LogCapture() as logs:
        seat.cancel()
    assert logs.lines == []
    assert len(auth.cache) == 0  # type: ignore[arg-type]


def test_waiters_ask_on_their_own_when_the_answer_forbids_reuse() -> None:
    auth, client, _ = forward_auth()
    first = outcome(auth.check(inbound(), ROUTE))
    waiters = [outcome(auth.check(inbound(), ROUTE)) for _ in range(2)]
    client.calls[0].answer(200, {b"x-user-id": [b"u1"], b"set-cookie": [b"sid=for-the-first"]})
    assert first[0].cache == "uncacheable"
    assert waiters == [[], []]
    assert len(client.calls) == 3, "each waiter makes its own call"
    client.calls[1].answer(200, {b"x-user-id": [b"u1"], b"set-cookie": [b"sid=second"]})
    client.calls[2].answer(200, allow(b"u1"))
    assert [w[0].cache for w in waiters] == ["uncacheable", "miss"]


def test_a_waiter_leaving_during_its_own_call_cancels_that_call() -> None:
    auth, client, _ = forward_auth()
    outcome(auth.check(inbound(), ROUTE))
    waiter = auth.check(inbound(), ROUTE)
    left = outcome(waiter)
    client.calls[0].answer(200, {b"cache-control": [b"no-store"]})
    assert len(client.calls) == 2
    waiter.cancel()
    assert client.calls[1].cancelled
    assert left[0].check(CancelledError)


# ---------------------------------------------------------------------------
# Serve-stale


def _expired(plugin: Dict[str, Any], **cache: Any) -> Tuple[ForwardAuth, ScriptedClient, Clock]:
    """A forward-auth whose allow for inbound() expired 1 s ago."""
    auth, client, clock = forward_auth(cache=dict({"ttl": 10}, **cache), **plugin)
    outcome(auth.check(inbound(), ROUTE))
    client.last.answer(200, allow(b"u1"))
    clock.advance(11)
    return auth, client, clock


@pytest.mark.parametrize(
    "failure",
    [
        lambda call: call.fail("connection refused"),
        lambda call: call.fail("timeout"),
        lambda call: call.answer(500, {}, b"oops"),
        lambda call: call.answer(503, {}, b""),
    ],
    ids=["transport", "timeout", "500", "503"],
)
def test_a_failing_auth_service_gets_the_stale_allow_within_the_window(failure: Any) -> None:
    auth, client, _ = _expired({}, stale_if_error=5)
    got = outcome(auth.check(inbound(), ROUTE))
    waiter = outcome(auth.check(inbound(), ROUTE))
    with LogCapture() as logs:
        failure(client.last)
    assert got[0] == Allow(((b"X-User-ID", (b"u1",)),))
    assert (got[0].cache, waiter[0].cache) == ("stale", "stale")
    assert logs.contains("serving a stale allow (expired 1.0s ago)")


def test_past_the_window_a_failure_is_status_on_error() -> None:
    auth, client, clock = _expired({"status_on_error": 503}, stale_if_error=5)
    clock.advance(4.5)  # 5.5 s past expiry
    got = outcome(auth.check(inbound(), ROUTE))
    client.last.fail()
    assert got[0] == Respond(503) and got[0].outcome == "error"


def test_past_the_window_degradation_applies_as_today() -> None:
    auth, client, clock = _expired({"allow_degradation": True}, stale_if_error=1)
    clock.advance(1)
    got = outcome(auth.check(inbound(), ROUTE))
    client.last.fail()
    assert isinstance(got[0], Degrade)


def test_without_stale_if_error_nothing_stale_is_served() -> None:
    auth, client, _ = _expired({})
    got = outcome(auth.check(inbound(), ROUTE))
    client.last.fail()
    assert got[0].outcome == "error"


def test_a_5xx_without_stale_is_relayed_as_today() -> None:
    auth, client, _ = forward_auth(cache={"ttl": 10, "stale_if_error": 60})
    got = outcome(auth.check(inbound(), ROUTE))
    client.last.answer(502, {}, b"bad gateway")
    assert got[0] == Respond(502, (), b"bad gateway") and got[0].outcome == "deny"


def test_denials_are_never_served_stale() -> None:
    auth, client, clock = forward_auth(cache={"ttl": 10, "deny_ttl": 10, "stale_if_error": 60})
    outcome(auth.check(inbound(), ROUTE))
    client.last.answer(403, {}, b"no")
    clock.advance(11)
    got = outcome(auth.check(inbound(), ROUTE))
    client.last.fail()
    assert got[0].outcome == "error"


def test_a_denial_ends_the_stale_allow() -> None:
    auth, client, _ = _expired({}, stale_if_error=60)
    outcome(auth.check(inbound(), ROUTE))
    client.last.answer(403, {}, b"revoked")
    got = outcome(auth.check(inbound(), ROUTE))
    client.last.fail()
    assert got[0].outcome == "error"


def test_a_fresh_allow_renews_the_stale_window() -> None:
    auth, client, clock = _expired({}, stale_if_error=5)
    outcome(auth.check(inbound(), ROUTE))
    client.last.answer(200, allow(b"u1-renewed"))
    clock.advance(12)  # expired 2 s ago again
    got = outcome(auth.check(inbound(), ROUTE))
    client.last.fail()
    assert got[0].set_headers == ((b"X-User-ID", (b"u1-renewed",)),) and got[0].cache == "stale"


# ---------------------------------------------------------------------------
# The LRU bound


def test_max_entries_evicts_the_least_recently_used() -> None:
    auth, client, _ = forward_auth(cache={"ttl": 30, "max_entries": 2})
    for token in ("a", "b"):
        outcome(auth.check(inbound(token=token), ROUTE))
        client.last.answer(200, allow(token.encode()))
    assert decided(auth, inbound(token="a")).cache == "hit"  # "a" is now the most recent
    outcome(auth.check(inbound(token="c"), ROUTE))
    client.last.answer(200, allow(b"c"))
    assert len(auth.cache) == 2  # type: ignore[arg-type]
    assert decided(auth, inbound(token="a")).cache == "hit"
    assert decided(auth, inbound(token="c")).cache == "hit"
    assert outcome(auth.check(inbound(token="b"), ROUTE)) == [], "b was evicted"


def test_the_bound_holds_under_many_keys() -> None:
    cache = DecisionCache(CacheConf(ttl=30, max_entries=100))
    for i in range(1000):
        cache.store(b"%d" % i, Allow(), 30, 0.0)
    assert len(cache) == 100
    assert cache.fresh(b"899", 1.0) is None and cache.fresh(b"900", 1.0) is not None


def test_dead_entries_go_on_lookup() -> None:
    cache = DecisionCache(CacheConf(ttl=1, stale_if_error=1))
    cache.store(b"k", Allow(), 1, 0.0)
    assert cache.fresh(b"k", 1.5) is None and len(cache) == 1  # kept for serve-stale
    assert cache.fresh(b"k", 2.0) is None and len(cache) == 0


# ---------------------------------------------------------------------------
# Reloads


def _doc(**plugin: Any) -> Dict[str, Any]:
    fa = dict({"uri": URI, "request_headers": ["Authorization"], "cache": {"ttl": 30}}, **plugin)
    return {
        "routes": [
            {"id": "1", "uri": "/a", "plugins": {"forward-auth": fa}, "upstream": {"nodes": {"127.0.0.1:1": 1}}},
            {"id": "2", "uri": "/b", "plugins": {"forward-auth": dict(fa)}, "upstream": {"nodes": {"127.0.0.1:1": 1}}},
        ]
    }


def test_a_reload_keeps_unchanged_routes_caches_and_drops_changed_ones() -> None:
    gateway = Gateway(MemoryReactorClock(), parse_config(_doc()))
    one, two = gateway.decision_cache("1"), gateway.decision_cache("2")
    assert one is not None and two is not None and one is not two, "one cache per route"
    one.store(b"k", Allow(), 30, 0.0)
    gateway.update(parse_config(_doc()))
    assert gateway.decision_cache("1") is one
    assert gateway.table.match("GET", "x", "/a").auth.cache is one  # type: ignore[union-attr]

    changed = _doc()
    changed["routes"][0]["plugins"]["forward-auth"]["upstream_headers"] = ["X-User-ID"]
    gateway.update(parse_config(changed))
    assert gateway.decision_cache("1") is not one
    assert len(gateway.decision_cache("1")) == 0  # type: ignore[arg-type]
    assert gateway.decision_cache("2") is two

    changed["routes"][1]["plugins"]["forward-auth"]["cache"] = {"ttl": 5}
    gateway.update(parse_config(changed))
    assert gateway.decision_cache("2") is not two

    del changed["routes"][1]["plugins"]["forward-auth"]["cache"]
    gateway.update(parse_config(changed))
    assert gateway.decision_cache("2") is None
    assert gateway.table.match("GET", "x", "/b").auth.cache is None  # type: ignore[union-attr]


def test_a_built_but_refused_table_does_not_replace_the_caches() -> None:
    gateway = Gateway(MemoryReactorClock(), parse_config(_doc()))
    one = gateway.decision_cache("1")
    changed = _doc()
    changed["routes"][0]["plugins"]["forward-auth"]["timeout"] = 2000
    gateway.build(parse_config(changed))  # never installed
    assert gateway.decision_cache("1") is one
    gateway.update(parse_config(_doc()))
    assert gateway.decision_cache("1") is one


def test_a_real_timeout_serves_the_stale_allow() -> None:
    """The real client on a memory reactor: the connection never opens, the timer expires the call."""
    from fauth.auth.client import AuthClient, AuthTarget

    reactor = MemoryReactorClock()
    conf = parse_forward_auth(
        {"uri": URI, "upstream_headers": ["X-User-ID"], "timeout": 500, "cache": {"ttl": 10, "stale_if_error": 30}}
    )
    auth = ForwardAuth(conf, AuthClient(reactor, AuthTarget.parse(URI, True)), reactor)
    key = auth.cache_key(inbound(), ROUTE, auth.build_headers(inbound(), ROUTE), None)
    auth.cache.store(key, Allow(((b"X-User-ID", (b"u1",)),)), 10, reactor.seconds())  # type: ignore[union-attr]
    assert decided(auth, inbound()).cache == "hit"
    reactor.advance(10)
    got = outcome(auth.check(inbound(), ROUTE))
    assert got == [] and len(reactor.tcpClients) == 1
    with LogCapture() as logs:
        reactor.advance(0.5)
    assert got[0].cache == "stale" and got[0].set_headers == ((b"X-User-ID", (b"u1",)),)
    assert logs.contains("err: timeout; serving a stale allow (expired 0.5s ago)")


# ---------------------------------------------------------------------------
# The access log's auth and user fields


class _LoggedRequest:
    method = b"GET"
    uri = b"/x"
    sentLength = 0

    def getClientAddress(self) -> Any:
        return None


class _LoggedExchange:
    def __init__(self, decision: Any) -> None:
        from fauth.observe.exchange import RouteMetrics

        self.request = _LoggedRequest()
        self.route = RouteMetrics("1")
        self.decision = decision
        self.auth_s = self.upstream_s = None
        self.elapsed = 0.0


@pytest.mark.parametrize(
    "decision, auth, user",
    [
        (Allow(((b"X-User-ID", (b"u1",)),), ReplyHeaders({b"x-user-id": [b"u1"]})), "allow", "u1"),
        (Allow(((b"X-User-ID", (b"u1",)),), ReplyHeaders({b"x-user-id": [b"u1"]}), cache="miss"), "allow", "u1"),
        (Allow(((b"X-User-ID", (b"u1",)),), cache="hit"), "allow (cached)", "u1"),
        (Allow(((b"x-user-id", (b"u1",)),), cache="stale"), "allow (stale)", "u1"),
        (Allow(((b"X-User-ID", (b"u1",)),), ReplyHeaders({b"x-user-id": [b"u1"]}), cache="coalesced"),
         "allow (coalesced)", "u1"),
        (Allow(((b"X-User-ID", None),), cache="hit"), "allow (cached)", None),
        (Allow(((b"X-Other", (b"o",)),), cache="hit"), "allow (cached)", None),
        (Allow(((b"X-User-ID", (b"u1",)),)), "allow", None),  # no cache: only the answer's headers count
        (Respond(403, cache="hit"), "deny (cached)", None),
        (Respond(403, outcome="error", cache="miss"), "error", None),
        (Degrade(cache="miss"), "degraded", None),
    ],
)
def test_access_log_says_how_the_cache_decided(tmp_path: Any, decision: Any, auth: str, user: Optional[str]) -> None:
    import json

    from fauth.observe.accesslog import AccessLog

    log = AccessLog(str(tmp_path / "a.log"))
    log.log(_LoggedExchange(decision), 200)  # type: ignore[arg-type]
    log.flush()
    line = json.loads((tmp_path / "a.log").read_text())
    assert (line["auth"], line["user"]) == (auth, user)


# ---------------------------------------------------------------------------
# Coalescing under any interleaving of arrivals, departures and answers


from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_STEPS = st.lists(
    st.one_of(
        st.just(("join",)),
        st.tuples(st.just("leave"), st.integers(0, 7)),
        st.tuples(st.just("answer"), st.sampled_from(["allow", "no-store", "fail", "503"])),
    ),
    max_size=25,
)


@settings(max_examples=500, deadline=None)
@given(_STEPS)
# A waiter leaving during its own call (the shared answer forbade reuse).
@example([("join",), ("join",), ("answer", "no-store"), ("leave", 1)])
# Everyone leaving, then a newcomer starting afresh.
@example([("join",), ("join",), ("leave", 0), ("leave", 1), ("join",), ("answer", "allow")])
def test_coalescing_invariants_under_any_interleaving(steps: List[Tuple[Any, ...]]) -> None:
    """
    Every request gets exactly one result; a call is cancelled exactly when
    every request waiting for it has left; nothing stays in flight once the
    calls are settled; only requests that stayed get a decision.
    """
    auth, client, _ = forward_auth(cache={"ttl": 0})
    seats: List[Tuple[Deferred, List[Any]]] = []
    left = set()
    for step in steps:
        if step[0] == "join":
            d = auth.check(inbound(), ROUTE)
            seats.append((d, outcome(d)))
        elif step[0] == "leave" and seats:
            index = step[1] % len(seats)
            if not seats[index][0].called:
                left.add(index)
            seats[index][0].cancel()
        elif step[0] == "answer":
            pending = [c for c in client.calls if not c.deferred.called]
            if pending:
                how = step[1]
                if how == "allow":
                    pending[0].answer(200, allow(b"u1"))
                elif how == "no-store":
                    pending[0].answer(200, {b"x-user-id": [b"u1"], b"cache-control": [b"no-store"]})
                elif how == "fail":
                    pending[0].fail()
                else:
                    pending[0].answer(503)
    # No call runs for nobody: each one in flight has a request of its own
    # still waiting for it (a shared call at least one, an own call one).
    running = [c for c in client.calls if not c.deferred.called]
    assert len(running) <= sum(1 for d, _ in seats if not d.called)
    # Settle whatever is still asked for (own calls of waiters included).
    while True:
        pending = [c for c in client.calls if not c.deferred.called]
        if not pending:
            break
        pending[0].answer(200, allow(b"u1"))
    for index, (d, got) in enumerate(seats):
        assert len(got) == 1, "every request gets exactly one result"
        if index in left:
            assert isinstance(got[0], Failure) and got[0].check(CancelledError)
        else:
            # Nobody else's departure cancelled this one's call.
            assert not isinstance(got[0], Failure), got[0]
            assert got[0].outcome in ("allow", "deny", "error") and got[0].cache is not None
    assert auth.cache.flights == {}  # type: ignore[union-attr]
    # A cancelled call had nobody left waiting for it; and calls are only
    # made for requests (one shared call, or one own call per waiter).
    assert len(client.calls) <= len(seats)
