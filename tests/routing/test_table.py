"""Tests for L{fauth.routing.table.RouteTable} and L{fauth.request.inbound.normalise_path}."""
from __future__ import annotations

from typing import Any, AsyncIterator, Dict, List, Optional

import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred
from twisted.web.resource import Resource

from fauth.config import RouteConf, parse_config
from fauth.process.demo import DemoAuthResource
from fauth.request.inbound import BadRequest, normalise_path
from fauth.routing.table import RouteTable
from tests.harness import raw_request, start_gateway
from tests.servers import listen_on_loopback

UPSTREAM = {"nodes": {"127.0.0.1:1980": 1}}


def _table(*routes: Dict[str, Any]) -> "RouteTable[str]":
    """A table whose payload is each route's id."""
    docs = [dict({"upstream": UPSTREAM}, **r) for r in routes]
    conf = parse_config({"routes": docs})
    entries = [(route, route.id) for route in conf.routes]
    return RouteTable(entries)


def match(table: "RouteTable[str]", path: str, method: str = "GET", host: str = "example.com") -> Optional[str]:
    return table.match(method, host, path)


# --- matching rules ---------------------------------------------------------


def test_exact_beats_prefix() -> None:
    # The prefix route comes first and has the higher priority; exact still wins.
    table = _table(
        {"id": "prefix", "uri": "/api/*", "priority": 10},
        {"id": "exact", "uri": "/api/users"},
    )
    assert match(table, "/api/users") == "exact"
    assert match(table, "/api/users/1") == "prefix"
    assert match(table, "/api/") == "prefix"


def test_longest_prefix_wins() -> None:
    table = _table(
        {"id": "short", "uri": "/api/*", "priority": 5},
        {"id": "long", "uri": "/api/v1/*"},
    )
    assert match(table, "/api/v1/x") == "long"
    assert match(table, "/api/v2/x") == "short"


def test_priority_breaks_ties() -> None:
    table = _table(
        {"id": "low", "uri": "/same", "priority": 1},
        {"id": "high", "uri": "/same", "priority": 2},
        {"id": "low-prefix", "uri": "/p/*"},
        {"id": "high-prefix", "uri": "/p/*", "priority": 3},
    )
    assert match(table, "/same") == "high"
    assert match(table, "/p/x") == "high-prefix"


def test_equal_priority_keeps_configuration_order() -> None:
    table = _table({"id": "first", "uri": "/same"}, {"id": "second", "uri": "/same"})
    assert match(table, "/same") == "first"


def test_methods_filter() -> None:
    table = _table(
        {"id": "post", "uri": "/m", "methods": ["POST"], "priority": 9},
        {"id": "get", "uri": "/m", "methods": ["GET", "HEAD"]},
    )
    assert match(table, "/m", "POST") == "post"
    assert match(table, "/m", "GET") == "get"
    assert match(table, "/m", "HEAD") == "get"
    assert match(table, "/m", "DELETE") is None


def test_method_mismatch_on_exact_falls_back_to_prefix() -> None:
    table = _table(
        {"id": "exact-post", "uri": "/x/y", "methods": ["POST"]},
        {"id": "prefix", "uri": "/x/*"},
    )
    assert match(table, "/x/y", "GET") == "prefix"
    assert match(table, "/x/y", "POST") == "exact-post"


def test_hosts_filter() -> None:
    table = _table(
        {"id": "a", "uri": "/h", "hosts": ["a.example.org"]},
        {"id": "any", "uri": "/h", "priority": -1},
    )
    assert match(table, "/h", host="a.example.org") == "a"
    assert match(table, "/h", host="b.example.org") == "any"


def test_hosts_filter_is_case_insensitive_in_config() -> None:
    table = _table({"id": "a", "uri": "/h", "hosts": ["A.Example.ORG"]})
    # Hosts reach the table lower-cased (see InboundRequest).
    assert match(table, "/h", host="a.example.org") == "a"


def test_hosts_wildcard() -> None:
    table = _table({"id": "wild", "uri": "/w", "hosts": ["*.example.com"]})
    assert match(table, "/w", host="api.example.com") == "wild"
    assert match(table, "/w", host="a.b.example.com") == "wild"
    assert match(table, "/w", host="example.com") is None
    assert match(table, "/w", host="evilexample.com") is None
    assert match(table, "/w", host="example.com.evil.net") is None


def test_disabled_route_ignored() -> None:
    table = _table(
        {"id": "off", "uri": "/d", "status": 0, "priority": 100},
        {"id": "on", "uri": "/d"},
        {"id": "off-only", "uri": "/gone", "status": 0},
    )
    assert match(table, "/d") == "on"
    assert match(table, "/gone") is None


# --- APISIX's radixtree_host_uri order ------------------------------------------

HOST = "admin.example.com"
_KINDS = [
    pytest.param(host, exact, id="%s-%s" % ("host" if host else "nohost", "exact" if exact else "prefix"))
    for host in (True, False)
    for exact in (True, False)
]


def _doc(name: str, host: bool, exact: bool, priority: int) -> Dict[str, Any]:
    doc: Dict[str, Any] = {"id": name, "uri": "/app/public" if exact else "/app/*", "priority": priority}
    if host:
        doc["hosts"] = [HOST]
    return doc


@pytest.mark.parametrize("a_host, a_exact", _KINDS)
@pytest.mark.parametrize("b_host, b_exact", _KINDS)
@pytest.mark.parametrize("a_priority, b_priority", [(0, 0), (5, 0), (0, 5)])
def test_precedence_of_every_pairing(
    a_host: bool, a_exact: bool, b_host: bool, b_exact: bool, a_priority: int, b_priority: int
) -> None:
    """
    Two routes that both match admin.example.com/app/public: the one APISIX
    picks is the host-bound one, then the exact uri, then the higher
    priority, then the first configured; in both configuration orders.
    """
    a = _doc("a", a_host, a_exact, a_priority)
    b = _doc("b", b_host, b_exact, b_priority)

    def rank(doc: Dict[str, Any], order: int) -> Any:
        return ("hosts" in doc, doc["uri"] == "/app/public", doc["priority"], -order)

    for first, second in ((a, b), (b, a)):
        expected = max((rank(first, 0), first["id"]), (rank(second, 1), second["id"]))[1]
        table = _table(first, second)
        assert match(table, "/app/public", host=HOST) == expected, (first, second)
    # Another host sees the host-less routes only.
    hostless = [d["id"] for d in (a, b) if "hosts" not in d]
    table = _table(a, b)
    found = match(table, "/app/public", host="other.example.com")
    assert (found in hostless) if hostless else found is None


def test_host_bound_prefix_beats_hostless_exact_route_the_issue_case() -> None:
    table = _table(
        {"id": "A", "uri": "/app/*", "hosts": ["admin.example.com"]},
        {"id": "B", "uri": "/app/public"},
    )
    assert match(table, "/app/public", host="admin.example.com") == "A"
    assert match(table, "/app/public", host="www.example.com") == "B"


def test_host_bound_catch_all_beats_hostless_exact() -> None:
    table = _table({"id": "exact", "uri": "/x"}, {"id": "all", "uri": "/*", "host": "h.example"})
    assert match(table, "/x", host="h.example") == "all"


def test_exact_host_before_wildcard_host_whatever_the_uri() -> None:
    table = _table(
        {"id": "wild-exact-uri", "uri": "/a/b", "hosts": ["*.example.com"], "priority": 100},
        {"id": "exact-host-prefix", "uri": "/*", "hosts": ["api.example.com"]},
    )
    assert match(table, "/a/b", host="api.example.com") == "exact-host-prefix"
    assert match(table, "/a/b", host="www.example.com") == "wild-exact-uri"


def test_longer_wildcard_host_first() -> None:
    table = _table(
        {"id": "short", "uri": "/a", "hosts": ["*.com"], "priority": 9},
        {"id": "long", "uri": "/*", "hosts": ["*.example.com"]},
    )
    assert match(table, "/a", host="x.example.com") == "long"
    assert match(table, "/a", host="x.other.com") == "short"


def test_wildcard_host_is_a_suffix_as_radixtree_reads_it() -> None:
    # "*example.com" (no dot) is the suffix "example.com": the bare name matches.
    table = _table({"id": "w", "uri": "/w", "hosts": ["*example.com"]})
    assert match(table, "/w", host="example.com") == "w"
    assert match(table, "/w", host="myexample.com") == "w"
    assert match(table, "/w", host="example.org") is None


def test_a_host_that_does_not_match_the_path_falls_to_the_next_host_then_hostless() -> None:
    table = _table(
        {"id": "exact-host", "uri": "/only", "hosts": ["a.example.com"]},
        {"id": "wild", "uri": "/w/*", "hosts": ["*.example.com"]},
        {"id": "any", "uri": "/*"},
    )
    assert match(table, "/w/x", host="a.example.com") == "wild"
    assert match(table, "/z", host="a.example.com") == "any"


def test_methods_mismatch_on_host_route_falls_to_hostless() -> None:
    table = _table(
        {"id": "host-post", "uri": "/m", "hosts": ["h.example"], "methods": ["POST"]},
        {"id": "any", "uri": "/m"},
    )
    assert match(table, "/m", "POST", host="h.example") == "host-post"
    assert match(table, "/m", "GET", host="h.example") == "any"


def test_equal_priority_prefixes_on_one_node_prefer_the_longer_uri() -> None:
    # radixtree's sort_route: same priority, the longer uri as written first.
    table = _table({"id": "star", "uri": "/a/*"}, {"id": "inner", "uri": "/a/*/b"})
    assert match(table, "/a/x/b") == "inner"
    assert match(table, "/a/x/c") == "star"


def test_prefix_without_slash_and_with_slash() -> None:
    table = _table({"id": "bare", "uri": "/app*"}, {"id": "slash", "uri": "/app/*"})
    assert match(table, "/app") == "bare"
    assert match(table, "/apple") == "bare"
    assert match(table, "/app/x") == "slash"
    assert match(table, "/app/") == "slash"


def test_inner_star_spans_segments_and_the_rest_must_fit() -> None:
    table = _table({"id": "inner", "uri": "/u/*/profile"})
    assert match(table, "/u/1/profile") == "inner"
    assert match(table, "/u/a/b/profile") == "inner"
    assert match(table, "/u/1/profile/x") is None
    assert match(table, "/u/1/other") is None


def test_uris_each_placed() -> None:
    table = _table({"id": "multi", "uris": ["/one", "/two/*"]}, {"id": "rest", "uri": "/*"})
    assert match(table, "/one") == "multi"
    assert match(table, "/two/x") == "multi"
    assert match(table, "/three") == "rest"


class _Request:
    def __init__(self, remote_addr: str, **variables: Any) -> None:
        self.remote_addr = remote_addr
        self.variables = variables


def _lookup(request: _Request) -> Any:
    return request.variables.get


def test_remote_addrs_filter_and_fall_through() -> None:
    docs = [
        {"id": "office", "uri": "/r", "remote_addrs": ["10.0.0.0/8", "2001:db8::/32"], "upstream": UPSTREAM},
        {"id": "rest", "uri": "/r", "priority": -1, "upstream": UPSTREAM},
    ]
    conf = parse_config({"routes": docs})
    table: RouteTable[str] = RouteTable([(r, r.id) for r in conf.routes], _lookup)
    assert table.match("GET", "h", "/r", _Request("10.1.2.3")) == "office"
    assert table.match("GET", "h", "/r", _Request("::ffff:10.1.2.3")) == "office"
    assert table.match("GET", "h", "/r", _Request("2001:db8::1")) == "office"
    assert table.match("GET", "h", "/r", _Request("192.0.2.1")) == "rest"
    assert table.match("GET", "h", "/r", _Request("unix:")) == "rest"
    # Without the request nothing about the client is known: not matched.
    assert table.match("GET", "h", "/r") == "rest"


def test_vars_filter() -> None:
    docs = [
        {"id": "beta", "uri": "/v", "vars": [["http_x_beta", "==", "1"]], "upstream": UPSTREAM},
        {"id": "rest", "uri": "/v", "priority": -1, "upstream": UPSTREAM},
    ]
    conf = parse_config({"routes": docs})
    table: RouteTable[str] = RouteTable([(r, r.id) for r in conf.routes], _lookup)
    assert table.match("GET", "h", "/v", _Request("1.2.3.4", http_x_beta="1")) == "beta"
    assert table.match("GET", "h", "/v", _Request("1.2.3.4", http_x_beta="2")) == "rest"
    assert table.match("GET", "h", "/v", _Request("1.2.3.4")) == "rest"


def test_unmatched_is_none() -> None:
    table = _table({"id": "1", "uri": "/only"})
    assert match(table, "/other") is None
    assert match(table, "/only/") is None


def test_table_keeps_route_objects() -> None:
    conf = parse_config({"routes": [{"id": "r", "uri": "/r", "upstream": UPSTREAM}]})
    (route,) = conf.routes
    table: RouteTable[RouteConf] = RouteTable([(route, route)])
    assert table.match("GET", "h", "/r") is route
    assert table.size == 1


# --- path normalisation -----------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"/a/../b", "/b"),
        (b"//a///b", "/a/b"),
        (b"/public/%2e%2e/private", "/private"),
        (b"/public/%2E%2E/private", "/private"),
        (b"/a/./b/.", "/a/b/"),
        (b"/plain", "/plain"),
        (b"/sp%20ace", "/sp ace"),
        (b"/", "/"),
    ],
)
def test_normalise_path(raw: bytes, expected: str) -> None:
    assert normalise_path(raw) == expected


@pytest.mark.parametrize("raw", [b"/%2e%2e/x", b"/../x", b"/a/../../x", b"/a%00b", b"/%00"])
def test_normalise_path_refuses(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        normalise_path(raw)


# --- end to end -------------------------------------------------------------


class _PathEcho(Resource):
    """An upstream that answers with the target it received."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain")
        return b"upstream saw " + request.uri




@async_yield_fixture
async def traversal_gateway(reactor: Any) -> AsyncIterator[Any]:
    """A guarded C{/private} and an unguarded C{/public/*} route on one upstream."""
    ports: List[Any] = []
    auth = await listen_on_loopback(reactor, DemoAuthResource())
    ports.append(auth)
    upstream = await listen_on_loopback(reactor, _PathEcho())
    ports.append(upstream)
    nodes = {"127.0.0.1:%d" % upstream.getHost().port: 1}
    gateway = await start_gateway(
        reactor,
        {
            "routes": [
                {
                    "id": "private",
                    "uri": "/private",
                    "plugins": {
                        "forward-auth": {
                            "uri": "http://127.0.0.1:%d/" % auth.getHost().port,
                            "request_headers": ["Authorization"],
                            "client_headers": ["X-Forward-Auth"],
                        }
                    },
                    "upstream": {"nodes": nodes},
                },
                {"id": "public", "uri": "/public/*", "upstream": {"nodes": nodes}},
            ]
        },
    )
    try:
        yield gateway
    finally:
        await gateway.stop()
        for port in ports:
            await port.stopListening()


def _get(target: bytes, extra: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: example.com\r\n" + extra + b"Connection: close\r\n\r\n"


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@ensureDeferred
async def test_dot_dot_does_not_escape_into_unguarded_route(reactor: Any, traversal_gateway: Any) -> None:
    port = traversal_gateway.port_number
    # Sanity: the unguarded route serves, the guarded one denies.
    public = await raw_request(reactor, port, _get(b"/public/x"))
    assert _status(public) == 200
    assert public.endswith(b"upstream saw /public/x")

    response = await raw_request(reactor, port, _get(b"/public/%2e%2e/private"))
    assert _status(response) == 403
    assert b"X-Forward-Auth: Fail" in response
    assert b"upstream saw" not in response

    allowed = await raw_request(reactor, port, _get(b"/public/%2e%2e/private", b"Authorization: 123\r\n"))
    assert _status(allowed) == 200
    # The upstream gets the path that was authorised.
    assert allowed.endswith(b"upstream saw /private")


@ensureDeferred
async def test_climbing_above_root_is_bad_request(reactor: Any, traversal_gateway: Any) -> None:
    response = await raw_request(reactor, traversal_gateway.port_number, _get(b"/%2e%2e/private"))
    assert _status(response) == 400
    assert b"upstream saw" not in response


@ensureDeferred
async def test_unmatched_is_404_with_apisix_body(reactor: Any, traversal_gateway: Any) -> None:
    response = await raw_request(reactor, traversal_gateway.port_number, _get(b"/nowhere"))
    assert _status(response) == 404
    head, _, body = response.partition(b"\r\n\r\n")
    assert body == b'{"error_msg":"404 Route Not Found"}'
    assert b"Content-Type: application/json" in head


@ensureDeferred
async def test_vars_and_remote_addrs_through_a_gateway(reactor: Any) -> None:
    """
    A public route limited by C{vars} or C{remote_addrs} is taken only when
    they hold; otherwise the guarded route behind it answers (403): were
    they ignored, everyone would get the public one.
    """
    auth = await listen_on_loopback(reactor, DemoAuthResource())
    upstream = await listen_on_loopback(reactor, _PathEcho())
    nodes = {"127.0.0.1:%d" % upstream.getHost().port: 1}
    guard = {"forward-auth": {"uri": "http://127.0.0.1:%d/" % auth.getHost().port, "request_headers": ["Authorization"]}}
    gateway = await start_gateway(
        reactor,
        {
            "routes": [
                {"id": "guarded", "uri": "/*", "plugins": guard, "upstream": {"nodes": nodes}},
                {"id": "beta", "uri": "/v", "vars": [["http_x_beta", "==", "yes"]], "upstream": {"nodes": nodes}},
                {"id": "office", "uri": "/o", "remote_addrs": ["192.0.2.0/24"], "upstream": {"nodes": nodes}},
                {"id": "local", "uri": "/l", "remote_addr": "127.0.0.1", "upstream": {"nodes": nodes}},
            ]
        },
    )
    try:
        port = gateway.port_number
        assert _status(await raw_request(reactor, port, _get(b"/v"))) == 403
        assert _status(await raw_request(reactor, port, _get(b"/v", b"X-Beta: no\r\n"))) == 403
        assert _status(await raw_request(reactor, port, _get(b"/v", b"X-Beta: yes\r\n"))) == 200
        assert _status(await raw_request(reactor, port, _get(b"/o"))) == 403
        assert _status(await raw_request(reactor, port, _get(b"/l"))) == 200
    finally:
        await gateway.stop()
        await auth.stopListening()
        await upstream.stopListening()
