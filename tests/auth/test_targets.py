"""
Several auth servers (C{forward-auth} C{nodes}, L{fauth.auth.targets})
through a real gateway on loopback: weights honoured over many calls; a
dead node (refused port) beside a live one costs no request and is left
out; a slow node times out without a retry; an answer (a 5xx too) is
never retried; all down gives status_on_error or degradation; active
checks leave a failing node out and bring it back; the metrics per node.
"""
from __future__ import annotations

import json
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pytest_twisted import async_yield_fixture, ensureDeferred
from twisted.internet.defer import Deferred
from twisted.web import server
from twisted.web.resource import Resource

from fauth.config import ConfigError, parse_config
from fauth.observe.metrics import GatewayMetrics
from tests.adminenv import free_ports
from tests.harness import GatewayUnderTest, LogCapture, raw_request, start_gateway
from tests.servers import listen_on_loopback


class AuthNode(Resource):
    """
    An auth server: allows, naming itself in C{X-User-ID}; C{mode} makes it
    answer 503, or never answer; its C{/healthz} answers C{health}.
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.mode = "allow"
        self.health = 200
        self.calls: List[Tuple[bytes, bytes]] = []
        self.checks = 0
        self.checked: Optional[Deferred] = None
        self.stalled: List[Any] = []

    def render(self, request: Any) -> Any:
        if request.path == b"/healthz":
            self.checks += 1
            request.setResponseCode(self.health)
            if self.checked is not None:
                checked, self.checked = self.checked, None
                request.notifyFinish().addBoth(lambda _: checked.callback(None))
            return b""
        self.calls.append((request.uri, request.getHeader(b"host") or b""))
        if self.mode == "stall":
            self.stalled.append(request)
            return server.NOT_DONE_YET
        if self.mode == "fail":
            request.setResponseCode(503)
            return b"auth down for maintenance"
        request.setHeader(b"X-User-ID", self.name.encode())
        return b""

    def next_check(self) -> Deferred:
        """Fires after the next health check was answered."""
        self.checked = Deferred()
        return self.checked


class Env:
    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.nodes: Dict[str, AuthNode] = {}
        self.ports: List[Any] = []
        self.addresses: Dict[str, str] = {}
        self.gateways: List[GatewayUnderTest] = []
        self.echo = ""

    async def node(self, name: str) -> AuthNode:
        resource = self.nodes[name] = AuthNode(name)
        port = await listen_on_loopback(self.reactor, resource)
        self.ports.append(port)
        self.addresses[name] = "127.0.0.1:%d" % port.getHost().port
        return resource

    async def gateway(self, nodes: Any, **auth: Any) -> GatewayUnderTest:
        fa = {"uri": "http://auth.internal/verify?x=1", "upstream_headers": ["X-User-ID"], "nodes": nodes}
        fa.update(auth)
        doc = {"routes": [{"id": "r", "uri": "/headers", "plugins": {"forward-auth": fa}, "upstream": {"nodes": {self.echo: 1}}}]}
        gw = await start_gateway(self.reactor, doc)
        self.gateways.append(gw)
        return gw

    async def ask(self, gw: GatewayUnderTest) -> Tuple[int, Dict[str, Any]]:
        raw = await raw_request(
            self.reactor, gw.port_number, b"GET /headers HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
        )
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, (json.loads(body)["headers"] if status == 200 else {"body": body})


@async_yield_fixture
async def env(reactor: Any) -> AsyncIterator[Env]:
    from fauth.process.demo import EchoResource

    e = Env(reactor)
    echo = await listen_on_loopback(reactor, EchoResource())
    e.ports.append(echo)
    e.echo = "127.0.0.1:%d" % echo.getHost().port
    try:
        yield e
    finally:
        for gw in e.gateways:
            await gw.stop()
        for node in e.nodes.values():
            for request in node.stalled:
                if not request._disconnected:
                    request.finish()
        for port in e.ports:
            await port.stopListening()


def node_metrics(gw: GatewayUnderTest) -> Dict[Tuple[str, ...], float]:
    text = GatewayMetrics(gw.gateway).exposition()[0].decode()
    found = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("fauth_auth_node_calls", "fauth_auth_node_up"):
            for sample in family.samples:
                labels = sample.labels
                found[(sample.name, labels["node"]) + ((labels["result"],) if "result" in labels else ())] = sample.value
                assert labels["auth"] == "http://auth.internal/verify"
    return found


@ensureDeferred
async def test_weights_are_honoured(reactor: Any, env: Env) -> None:
    a, b = await env.node("a"), await env.node("b")
    gw = await env.gateway({env.addresses["a"]: 3, env.addresses["b"]: 1})
    users = []
    for _ in range(40):
        status, headers = await env.ask(gw)
        assert status == 200
        users.append(headers["X-User-Id"])
    assert (users.count("a"), users.count("b")) == (30, 10)
    assert users[:4] in (["a", "a", "b", "a"], ["a", "b", "a", "a"])  # interleaved, not in bursts
    # Every node is asked uri's question: its path and query, its Host.
    assert set(a.calls + b.calls) == {(b"/verify?x=1", b"auth.internal")}
    metrics = node_metrics(gw)
    assert metrics[("fauth_auth_node_calls_total", env.addresses["a"], "answered")] == 30
    assert metrics[("fauth_auth_node_calls_total", env.addresses["b"], "answered")] == 10
    assert metrics[("fauth_auth_node_up", env.addresses["a"])] == 1


@ensureDeferred
async def test_dead_node_beside_a_live_one(reactor: Any, env: Env) -> None:
    live = await env.node("live")
    dead = "127.0.0.1:%d" % free_ports(1)[0]
    gw = await env.gateway({dead: 1, env.addresses["live"]: 1})
    with LogCapture() as logs:
        for _ in range(6):
            status, headers = await env.ask(gw)
            assert (status, headers["X-User-Id"]) == (200, "live")
    assert len(live.calls) == 6
    # Refused once, then left out (max_fails 1) for fail_timeout.
    metrics = node_metrics(gw)
    assert metrics[("fauth_auth_node_calls_total", dead, "unreachable")] == 1
    assert metrics[("fauth_auth_node_calls_total", dead, "answered")] == 0
    assert metrics[("fauth_auth_node_up", dead)] == 0
    assert metrics[("fauth_auth_node_up", env.addresses["live"])] == 1
    assert logs.contains("auth node %s unreachable (connection refused); trying %s" % (dead, env.addresses["live"]))


@ensureDeferred
async def test_an_answer_is_never_retried(reactor: Any, env: Env) -> None:
    a, b = await env.node("a"), await env.node("b")
    a.mode = b.mode = "fail"
    gw = await env.gateway({env.addresses["a"]: 1, env.addresses["b"]: 1})
    status, body = await env.ask(gw)
    assert (status, body["body"]) == (503, b"auth down for maintenance")
    assert len(a.calls) + len(b.calls) == 1
    metrics = node_metrics(gw)
    assert sum(v for k, v in metrics.items() if k[-1] == "answered") == 1
    # An answer is not a failure: both stay in.
    assert metrics[("fauth_auth_node_up", env.addresses["a"])] == metrics[("fauth_auth_node_up", env.addresses["b"])] == 1


@ensureDeferred
async def test_slow_node_times_out_without_retry(reactor: Any, env: Env) -> None:
    slow, fast = await env.node("slow"), await env.node("fast")
    slow.mode = "stall"
    gw = await env.gateway({env.addresses["slow"]: 1, env.addresses["fast"]: 1}, timeout=300, status_on_error=504)
    statuses = []
    for _ in range(3):
        statuses.append((await env.ask(gw))[0])
    # The first request waited for the slow node (its request was sent: no
    # second node), then it was left out and the fast one answered.
    assert len(slow.stalled) == 1
    assert sorted(statuses) == [200, 200, 504]
    assert len(fast.calls) == 2
    metrics = node_metrics(gw)
    assert metrics[("fauth_auth_node_calls_total", env.addresses["slow"], "failed")] == 1
    assert metrics[("fauth_auth_node_up", env.addresses["slow"])] == 0


@pytest.mark.parametrize("degrade", [False, True])
@ensureDeferred
async def test_all_down(reactor: Any, env: Env, degrade: bool) -> None:
    dead = ["127.0.0.1:%d" % p for p in free_ports(2)]
    gw = await env.gateway({dead[0]: 1, dead[1]: 2}, allow_degradation=degrade, status_on_error=502)
    with LogCapture() as logs:
        first = await env.ask(gw)
        second = await env.ask(gw)
    if degrade:
        assert first[0] == second[0] == 200
        assert "X-User-Id" not in first[1]
    else:
        assert first[0] == second[0] == 502
    metrics = node_metrics(gw)
    # Both were tried by the first request; the second found none left.
    assert [metrics[("fauth_auth_node_calls_total", d, "unreachable")] for d in dead] == [1, 1]
    assert logs.contains("err: connection refused")
    assert logs.contains("err: no auth node available: all 2 are down")


@ensureDeferred
async def test_active_checks(reactor: Any, env: Env) -> None:
    a, b = await env.node("a"), await env.node("b")
    b.health = 503
    checked = b.next_check()
    gw = await env.gateway(
        {env.addresses["a"]: 1, env.addresses["b"]: 1},
        checks={"active": {"http_path": "/healthz", "interval": 0.05, "timeout": 1}},
    )
    await checked
    for _ in range(4):
        assert (await env.ask(gw))[1]["X-User-Id"] == "a"
    assert b.calls == [] and node_metrics(gw)[("fauth_auth_node_up", env.addresses["b"])] == 0
    b.health = 200
    await b.next_check()
    users = [(await env.ask(gw))[1]["X-User-Id"] for _ in range(4)]
    assert sorted(users) == ["a", "a", "b", "b"]
    # Checks stop with the configuration that asked for them.
    [nodes] = gw.gateway.auth_clients.node_sets()
    assert nodes.checking
    gw.gateway.update(parse_config({"routes": []}))
    assert gw.gateway.auth_clients.node_sets() == [] and not nodes.checking


@pytest.mark.parametrize(
    "auth, message",
    [
        ({"nodes": {"127.0.0.1:1": 1}, "checks": {"passive": {"max_fails": "x"}}},
         'property "checks" validation failed: property "passive" validation failed: property "max_fails" validation failed: wrong type: expected integer, got string'),
        ({"checks": {"passive": {}}},
         'property "checks" validation failed: health checks are for "nodes" (several auth servers); "uri" alone has none'),
        ({"nodes": {"127.0.0.1:1": 1}, "checks": {"active": {"http_path": "/h", "timeout": 0}}},
         'property "checks" validation failed: property "active" validation failed: property "timeout" validation failed: expected 0 to be greater than 0'),
        ({"nodes": {"127.0.0.1:1": 1}, "checks": {"active": {"path": "/h"}}},
         'property "checks" validation failed: additional properties forbidden, found path'),
        ({"nodes": {"127.0.0.1:1": 0}},
         'property "nodes" validation failed: expect at least one node with a weight above 0'),
        ({"nodes": {"127.0.0.1:x": 1}},
         'property "nodes" validation failed: invalid node address "127.0.0.1:x": bad port'),
        ({"nodes": [{"host": "127.0.0.1", "port": 0}]},
         'property "nodes" validation failed: expected 0 to be at least 1'),
    ],
)
def test_bad_config(auth: Dict[str, Any], message: str) -> None:
    fa = dict(auth, uri="http://auth/verify")
    with pytest.raises(ConfigError) as e:
        parse_config({"routes": [{"id": "r", "uri": "/", "plugins": {"forward-auth": fa}, "upstream": {"nodes": {"127.0.0.1:1": 1}}}]})
    assert str(e.value) == 'route "r": plugin forward-auth: ' + message


def test_defaults_and_ports() -> None:
    from fauth.config import AuthChecks, Node, parse_forward_auth

    conf = parse_forward_auth({"uri": "https://auth/verify", "nodes": [{"host": "10.0.0.1"}, {"host": "::1", "port": 8443, "weight": 3}]})
    assert conf.nodes == (Node("10.0.0.1", 443, 1), Node("::1", 8443, 3))
    assert conf.checks == AuthChecks(max_fails=1, fail_timeout=10.0, active=None)
    assert parse_forward_auth({"uri": "http://auth/"}).nodes is None


@ensureDeferred
async def test_with_the_decision_cache(reactor: Any, env: Env) -> None:
    a, b = await env.node("a"), await env.node("b")
    dead = "127.0.0.1:%d" % free_ports(1)[0]
    gw = await env.gateway({dead: 5, env.addresses["a"]: 1, env.addresses["b"]: 1}, cache={"ttl": 60})
    users = [(await env.ask(gw))[1]["X-User-Id"] for _ in range(5)]
    # One call (the dead node refused it first, then a live one answered),
    # then the stored allow: whichever node answered, the key is the same.
    assert len(a.calls) + len(b.calls) == 1
    assert len(set(users)) == 1
    assert node_metrics(gw)[("fauth_auth_node_calls_total", dead, "unreachable")] == 1


@ensureDeferred
async def test_backup_nodes_by_priority(reactor: Any, env: Env) -> None:
    main, backup = await env.node("main"), await env.node("backup")

    def listed(primary: str) -> List[Dict[str, Any]]:
        host, port = primary.rsplit(":", 1)
        spare_host, spare_port = env.addresses["backup"].rsplit(":", 1)
        return [
            {"host": host, "port": int(port), "weight": 1, "priority": 1},
            {"host": spare_host, "port": int(spare_port), "weight": 100, "priority": 0},
        ]

    gw = await env.gateway(listed(env.addresses["main"]))
    assert [(await env.ask(gw))[1]["X-User-Id"] for _ in range(3)] == ["main"] * 3
    # The higher priority dead: the backup answers, after one refused connection.
    gw = await env.gateway(listed("127.0.0.1:%d" % free_ports(1)[0]))
    assert [(await env.ask(gw))[1]["X-User-Id"] for _ in range(3)] == ["backup"] * 3
    assert len(main.calls) == 3 and len(backup.calls) == 3
