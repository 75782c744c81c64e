"""
C{GET /metrics} on the real admin listener of a real gateway: scraped
before and after requests of every kind, the counters move by exactly what
was done; histograms count; pool gauges see kept-alive and busy
connections; reloads and store writes are counted; the key is needed only
with C{metrics_require_key}.
"""
from __future__ import annotations

import socket
from typing import Any, AsyncIterator, Dict, FrozenSet, List, Tuple

import attr
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from pytest_twisted import async_yield_fixture, ensureDeferred
from twisted.internet.task import deferLater

from fauth.process.demo import DemoAuthResource, EchoResource
from fauth.observe.exchange import DURATION_BUCKETS, Histogram
from fauth.wire.pool import target_label
from tests.adminenv import KEY, AdminEnv, Slow, free_ports, start_admin_env
from tests.servers import listen_on_loopback, port_url

Samples = Dict[Tuple[str, FrozenSet[Tuple[str, str]]], float]




@attr.s(auto_attribs=True)
class World:
    env: AdminEnv
    auth_target: str
    echo_target: str
    slow_target: str
    ports: List[Any]


def routes_doc(auth_url: str, echo: str, slow: str, dead: str) -> List[Dict[str, Any]]:
    """One route per outcome the metrics tell apart."""
    up = {"nodes": {echo: 1}}
    return [
        {
            "id": "1",
            "uri": "/headers",
            "plugins": {
                "forward-auth": {
                    "uri": auth_url,
                    "request_headers": ["Authorization"],
                    "upstream_headers": ["X-User-ID"],
                }
            },
            "upstream": up,
        },
        {
            "id": "err",
            "uri": "/anything/err",
            "plugins": {"forward-auth": {"uri": "http://%s/" % dead, "status_on_error": 503}},
            "upstream": up,
        },
        {
            "id": "deg",
            "uri": "/anything/deg",
            "plugins": {"forward-auth": {"uri": "http://%s/" % dead, "allow_degradation": True}},
            "upstream": up,
        },
        {
            "id": "big",
            "uri": "/anything/big",
            "plugins": {"forward-auth": {"uri": auth_url, "request_method": "POST", "max_req_body_size": 4}},
            "upstream": up,
        },
        {"id": "open", "uri": "/anything/open", "upstream": up},
        {"id": "slow", "uri": "/slow", "upstream": {"nodes": {slow: 1}}},
    ]


async def make_world(reactor: Any, tmp_path: Any, admin: Any = None) -> World:
    auth = await listen_on_loopback(reactor, DemoAuthResource())
    echo = await listen_on_loopback(reactor, EchoResource())
    slow = await listen_on_loopback(reactor, Slow(reactor, 0.5))
    targets = ["127.0.0.1:%d" % p.getHost().port for p in (auth, echo, slow)]
    dead = "127.0.0.1:%d" % free_ports(1)[0]
    doc = {"routes": routes_doc(port_url(auth, "/"), targets[1], targets[2], dead)}
    env = await start_admin_env(reactor, tmp_path, doc, admin)
    return World(env, targets[0], targets[1], targets[2], [auth, echo, slow])


@async_yield_fixture
async def world(reactor: Any, tmp_path: Any) -> AsyncIterator[World]:
    w = await make_world(reactor, tmp_path)
    try:
        yield w
    finally:
        await w.env.stop()
        for port in w.ports:
            await port.stopListening()


async def scrape(env: AdminEnv, key: Any = None) -> Samples:
    code, body = await env.admin("GET", "/metrics", key=key)
    assert code == 200, body
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def request(env: AdminEnv, method: str, path: str, **kwargs: Any) -> int:
    response = await env.client.request(method, env.gateway_url + path, **kwargs)
    await response.content()
    return int(response.code)


# --- counters and histograms --------------------------------------------------


@ensureDeferred
async def test_requests_and_decisions_counted_exactly(world: World) -> None:
    env = world.env
    before = await scrape(env)
    assert await request(env, "GET", "/headers", headers={"Authorization": "321"}) == 200
    assert await request(env, "GET", "/headers", headers={"Authorization": "123"}) == 200
    assert await request(env, "GET", "/headers", headers={"Authorization": "nope"}) == 403
    assert await request(env, "GET", "/anything/err") == 503
    assert await request(env, "GET", "/anything/deg") == 200
    assert await request(env, "POST", "/anything/big", data=b"more than four bytes") == 413
    assert await request(env, "GET", "/anything/open") == 200
    assert await request(env, "GET", "/nowhere") == 404
    assert await request(env, "GET", "/%2e%2e/climb") == 400
    after = await scrape(env)

    requests = "fauth_http_requests_total"
    assert delta(before, after, requests, route="1", status="200") == 2
    assert delta(before, after, requests, route="1", status="403") == 1
    assert delta(before, after, requests, route="err", status="503") == 1
    assert delta(before, after, requests, route="deg", status="200") == 1
    assert delta(before, after, requests, route="big", status="413") == 1
    assert delta(before, after, requests, route="open", status="200") == 1
    assert delta(before, after, requests, route="", status="404") == 1
    assert delta(before, after, requests, route="", status="400") == 1
    total = sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == requests)
    assert total == 9

    decisions = "fauth_auth_decisions_total"
    expected = {
        ("1", "allow"): 2,
        ("1", "deny"): 1,
        ("err", "error"): 1,
        ("deg", "degraded"): 1,
        ("big", "rejected"): 1,
    }
    for route in ("1", "err", "deg", "big"):
        for outcome in ("allow", "deny", "error", "degraded", "rejected"):
            assert delta(before, after, decisions, route=route, outcome=outcome) == expected.get(
                (route, outcome), 0
            ), (route, outcome)
    # Routes without forward-auth have no decisions at all.
    assert not [k for k in after if k[0] == decisions and ("route", "open") in k[1]]

    auth_count = "fauth_auth_duration_seconds_count"
    assert delta(before, after, auth_count, route="1") == 3
    assert delta(before, after, auth_count, route="err") == 1
    assert delta(before, after, auth_count, route="deg") == 1
    assert delta(before, after, auth_count, route="big") == 0  # 413: no auth call
    assert delta(before, after, "fauth_auth_duration_seconds_sum", route="1") > 0
    upstream_count = "fauth_upstream_duration_seconds_count"
    assert delta(before, after, upstream_count, route="1") == 2
    assert delta(before, after, upstream_count, route="deg") == 1
    assert delta(before, after, upstream_count, route="open") == 1
    assert delta(before, after, upstream_count, route="err") == 0
    assert delta(before, after, upstream_count, route="big") == 0
    # Buckets are cumulative, end with +Inf == count.
    buckets = [
        value(after, "fauth_auth_duration_seconds_bucket", route="1", le=le)
        for le in [repr(float(b)) for b in DURATION_BUCKETS] + ["+Inf"]
    ]
    assert buckets == sorted(buckets)
    assert buckets[-1] == value(after, auth_count, route="1") == 3


@ensureDeferred
async def test_routes_appear_at_zero_before_their_first_request(world: World) -> None:
    samples = await scrape(world.env)
    assert value(samples, "fauth_auth_decisions_total", route="err", outcome="error") == 0
    assert ("fauth_auth_decisions_total", frozenset({("route", "err"), ("outcome", "error")})) in samples
    assert ("fauth_upstream_duration_seconds_count", frozenset({("route", "open")})) in samples
    assert ("fauth_requests_in_flight", frozenset()) in samples
    # Process metrics come along in the gateway's own registry.
    assert any(name == "process_cpu_seconds_total" for name, _ in samples)


@ensureDeferred
async def test_client_gone_before_the_response_counts_499(world: World, reactor: Any) -> None:
    env = world.env
    before = await scrape(env)
    port = int(env.gateway_url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    for _ in range(100):
        if env.service.resource.in_flight.count == 1:
            break
        await deferLater(reactor, 0.01, lambda: None)
    sock.close()
    for _ in range(100):
        if env.service.resource.in_flight.count == 0:
            break
        await deferLater(reactor, 0.01, lambda: None)
    after = await scrape(env)
    assert delta(before, after, "fauth_http_requests_total", route="slow", status="499") == 1
    assert delta(before, after, "fauth_upstream_duration_seconds_count", route="slow") == 0


# --- gauges --------------------------------------------------------------------


async def wait_for(reactor: Any, env: AdminEnv, check: Any) -> Samples:
    """Scrape until C{check(samples)} holds (connections return to a pool a tick late)."""
    samples: Samples = {}
    for _ in range(50):
        samples = await scrape(env)
        if check(samples):
            return samples
        await deferLater(reactor, 0.02, lambda: None)
    return samples


@ensureDeferred
async def test_pool_gauges_show_kept_alive_connections(world: World, reactor: Any) -> None:
    env = world.env
    pool = "fauth_pool_connections"
    assert await request(env, "GET", "/headers", headers={"Authorization": "321"}) == 200

    def pooled(s: Samples) -> bool:
        return (
            value(s, pool, leg="auth", target=world.auth_target, state="idle") == 1
            and value(s, pool, leg="upstream", target=world.echo_target, state="idle") == 1
        )

    samples = await wait_for(reactor, env, pooled)
    assert pooled(samples), samples
    assert value(samples, pool, leg="auth", target=world.auth_target, state="active") == 0
    assert value(samples, pool, leg="upstream", target=world.echo_target, state="active") == 0

    # The same connections are used again: still one idle each.
    assert await request(env, "GET", "/headers", headers={"Authorization": "321"}) == 200
    samples = await wait_for(reactor, env, pooled)
    assert pooled(samples), samples


@ensureDeferred
async def test_active_connection_and_in_flight_while_a_request_waits(world: World, reactor: Any) -> None:
    env = world.env
    pending = env.client.get(env.gateway_url + "/slow")
    samples = await wait_for(
        reactor,
        env,
        lambda s: value(s, "fauth_pool_connections", leg="upstream", target=world.slow_target, state="active") == 1,
    )
    assert value(samples, "fauth_pool_connections", leg="upstream", target=world.slow_target, state="active") == 1
    assert value(samples, "fauth_requests_in_flight") == 1
    response = await pending
    assert await response.content() == b"slow"
    samples = await wait_for(
        reactor,
        env,
        lambda s: value(s, "fauth_pool_connections", leg="upstream", target=world.slow_target, state="idle") == 1,
    )
    assert value(samples, "fauth_pool_connections", leg="upstream", target=world.slow_target, state="active") == 0
    assert value(samples, "fauth_requests_in_flight") == 0


# --- reloads and store writes ------------------------------------------------------


@ensureDeferred
async def test_reload_and_store_write_counters(world: World) -> None:
    env = world.env
    before = await scrape(env)
    code, _ = await env.admin("POST", "/apisix/admin/reload")
    assert code == 200
    with open(env.config_path) as f:
        good = f.read()
    with open(env.config_path, "w") as f:
        f.write("routes: [{id: x}]\n")
    code, _ = await env.admin("POST", "/apisix/admin/reload")
    assert code == 400
    with open(env.config_path, "w") as f:
        f.write(good)
    code, _ = await env.admin("PUT", "/apisix/admin/routes/new", {"uri": "/anything/new", "upstream": {"nodes": {world.echo_target: 1}}})
    assert code == 201
    code, _ = await env.admin("PUT", "/apisix/admin/routes/bad", {"uri": "no-slash", "upstream": {"nodes": {world.echo_target: 1}}})
    assert code == 400  # refused before the store: not a store write

    def failing_save(contents: Any) -> None:
        raise OSError(28, "No space left on device")

    store = env.service.control.store
    assert store is not None
    store.save = failing_save  # type: ignore[method-assign]
    code, _ = await env.admin("DELETE", "/apisix/admin/routes/new")
    assert code == 500
    after = await scrape(env)
    assert delta(before, after, "fauth_reloads_total", result="ok") == 1
    assert delta(before, after, "fauth_reloads_total", result="refused") == 1
    assert delta(before, after, "fauth_store_writes_total", result="ok") == 1
    assert delta(before, after, "fauth_store_writes_total", result="error") == 1
    # The new route is counted from its first request on.
    assert await request(env, "GET", "/anything/new") == 200
    final = await scrape(env)
    assert delta(after, final, "fauth_http_requests_total", route="new", status="200") == 1


# --- access to /metrics ------------------------------------------------------------


@ensureDeferred
async def test_metrics_need_no_key_by_default(world: World) -> None:
    response = await world.env.client.get(world.env.admin_url + "/metrics")
    body = await response.content()
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"text/plain; version=0.0.4; charset=utf-8"]
    assert b"# TYPE fauth_http_requests_total counter" in body
    code, _ = await world.env.admin("GET", "/healthz", key=None)
    assert code == 200


@ensureDeferred
async def test_openmetrics_when_asked(world: World) -> None:
    response = await world.env.client.get(
        world.env.admin_url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    body = await response.content()
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


@ensureDeferred
async def test_metrics_require_key_when_configured(reactor: Any, tmp_path: Any) -> None:
    w = await make_world(reactor, tmp_path, {"metrics_require_key": True})
    try:
        code, body = await w.env.admin("GET", "/metrics", key=None)
        assert (code, body) == (401, {"error_msg": "failed to check token"})
        code, body = await w.env.admin("GET", "/metrics", key="wrong")
        assert code == 401
        samples = await scrape(w.env, key=KEY)
        assert ("fauth_requests_in_flight", frozenset()) in samples
        code, body = await w.env.admin("GET", "/healthz", key=None)
        assert (code, body) == (200, b"ok")
    finally:
        await w.env.stop()
        for port in w.ports:
            await port.stopListening()


@ensureDeferred
async def test_each_service_has_its_own_registry(world: World, reactor: Any, tmp_path: Any) -> None:
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = await start_admin_env(reactor, other_dir, {"routes": [{"id": "1", "uri": "/x", "upstream": {"nodes": {world.echo_target: 1}}}]})
    try:
        assert await request(world.env, "GET", "/anything/open") == 200
        mine = await scrape(world.env)
        theirs = await scrape(other)
        assert value(mine, "fauth_http_requests_total", route="open", status="200") == 1
        assert value(theirs, "fauth_http_requests_total", route="open", status="200") == 0
        assert world.env.service.metrics.registry is not other.service.metrics.registry
        assert not [m for m in REGISTRY.collect() if m.name.startswith("fauth_")]
    finally:
        await other.stop()


# --- units ---------------------------------------------------------------------------


def test_histogram_buckets_are_upper_bounds() -> None:
    h = Histogram()
    for seconds in (0.0001, 0.0005, 0.00051, 0.3, 10.0, 11.0):
        h.observe(seconds)
    cumulative = dict(h.cumulative())
    assert cumulative["0.0005"] == 2  # a value equal to a bound is in it
    assert cumulative["0.001"] == 3
    assert cumulative["0.5"] == 4
    assert cumulative["10.0"] == 5
    assert cumulative["+Inf"] == 6
    assert h.sum == pytest.approx(0.0001 + 0.0005 + 0.00051 + 0.3 + 10.0 + 11.0)


def test_target_labels() -> None:
    assert target_label(("http", b"127.0.0.1", 8080)) == "127.0.0.1:8080"
    assert target_label((b"https", b"::1", 443)) == "[::1]:443"
    assert target_label((b"https", b"[::1]", 443)) == "[::1]:443"
    assert target_label((b"http", b"auth.example", 80)) == "auth.example:80"
