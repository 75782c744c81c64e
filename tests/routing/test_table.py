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
