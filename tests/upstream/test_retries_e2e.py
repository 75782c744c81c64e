"""
Node priority, retries after connection failures, least_conn and chash,
through a real gateway on loopback in front of real (and dead) upstreams.
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Tuple

from pytest_twisted import ensureDeferred
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.web.server import NOT_DONE_YET

from tests.harness import LogCapture
from tests.upstream.test_proxy_e2e import Recorder, Stack, fetch, get, node, reactor, route, sleep, stack

__all__ = ["reactor", "stack"]  # fixtures


async def dead_port(reactor: Any) -> int:
    """A loopback port nothing listens on (connections are refused)."""
    closed = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
    port = closed.getHost().port
    await closed.stopListening()
    return port


def listed(*nodes: Dict[str, Any]) -> Any:
    """Nodes in APISIX's list form (route() is typed for the mapping form)."""
    return list(nodes)


async def dead_primary(reactor: Any, stack: Stack, live: Recorder, uri: str, **upstream: Any) -> Tuple[Any, int, int]:
    """A gateway whose route's primary node refuses connections and whose backup is C{live}."""
    up = await stack.upstream(live)
    dead = await dead_port(reactor)
    gw = await stack.gateway([route("1", uri, listed(n(dead, 1, 1), n(up, 1, 0)), **upstream)])
    return gw, dead, up


def n(port: int, weight: int = 1, priority: int = 0) -> Dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, "weight": weight, "priority": priority}


async def bodies(reactor: Any, port: int, path: str, count: int, extra: bytes = b"") -> List[bytes]:
    out = []
    for _ in range(count):
        reply = await fetch(reactor, port, get(path, extra=extra))
        out.append(b"%d %s" % (reply.status, reply.body))
    return out


@ensureDeferred
async def test_backup_node_gets_nothing_while_the_primary_answers(reactor: Any, stack: Stack) -> None:
    primary, backup = Recorder(b"primary"), Recorder(b"backup")
    p, b = await stack.upstream(primary), await stack.upstream(backup)
    gw = await stack.gateway([route("1", "/p/*", listed(n(b, 10, -1), n(p, 1, 0)))])
    assert await bodies(reactor, gw.port_number, "/p/x", 6) == [b"200 primary"] * 6
    assert backup.seen == []


@ensureDeferred
async def test_backup_node_takes_over_when_the_primary_refuses(reactor: Any, stack: Stack) -> None:
    gw, dead, b = await dead_primary(reactor, stack, Recorder(b"backup"), "/p/*")
    with LogCapture() as logs:
        assert await bodies(reactor, gw.port_number, "/p/x", 3) == [b"200 backup"] * 3
    assert logs.contains("upstream 127.0.0.1:%d failed: connection refused; trying 127.0.0.1:%d" % (dead, b))


@ensureDeferred
async def test_a_dead_node_beside_a_live_one_never_fails_a_request(reactor: Any, stack: Stack) -> None:
    live = Recorder(b"live")
    up = await stack.upstream(live)
    dead = await dead_port(reactor)
    gw = await stack.gateway([route("1", "/r/*", {node(dead): 1, node(up): 1})])
    assert await bodies(reactor, gw.port_number, "/r/x", 6) == [b"200 live"] * 6
    assert len(live.seen) == 6


@ensureDeferred
async def test_retries_zero_gives_the_dead_nodes_502(reactor: Any, stack: Stack) -> None:
    live = Recorder(b"live")
    up = await stack.upstream(live)
    dead = await dead_port(reactor)
    gw = await stack.gateway([route("1", "/r/*", {node(dead): 1, node(up): 1}, retries=0)])
    got = await bodies(reactor, gw.port_number, "/r/x", 4)
    assert sorted(s.split(b" ")[0] for s in got) == [b"200", b"200", b"502", b"502"]


@ensureDeferred
async def test_retries_one_of_three_dead_nodes_can_still_fail(reactor: Any, stack: Stack) -> None:
    live = Recorder(b"live")
    up = await stack.upstream(live)
    dead1, dead2 = await dead_port(reactor), await dead_port(reactor)
    nodes = listed(n(dead1, 1, 2), n(dead2, 1, 1), n(up, 1, 0))
    gw = await stack.gateway([route("1", "/r/*", nodes, retries=1)])
    # Priorities fix the order: two dead tries, and no third.
    assert await bodies(reactor, gw.port_number, "/r/x", 2) == [b"502 "] * 2
    gw2 = await stack.gateway([route("1", "/r/*", nodes)])
    assert await bodies(reactor, gw2.port_number, "/r/x", 2) == [b"200 live"] * 2


@ensureDeferred
async def test_a_streamed_body_reaches_the_node_after_a_refused_one(reactor: Any, stack: Stack) -> None:
    live = Recorder(b"live")
    gw = (await dead_primary(reactor, stack, live, "/u/*"))[0]
    size = 3 * 1024 * 1024
    payload = b"POST /u/x HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % size
    reply = await fetch(reactor, gw.port_number, payload + b"x" * size)
    assert (reply.status, reply.body) == (200, b"live")
    assert [s.length for s in live.seen] == [size]
    assert live.seen[0].sha256 == hashlib.sha256(b"x" * size).hexdigest()


class _HangUp(Protocol):
    """Takes a request and closes without an answer."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.loseConnection()


@ensureDeferred
async def test_no_retry_once_the_request_reached_a_node(reactor: Any, stack: Stack) -> None:
    live = Recorder(b"live")
    up = await stack.upstream(live)
    rude = await stack.listen_factory(Factory.forProtocol(_HangUp))
    gw = await stack.gateway([route("1", "/r/*", listed(n(rude, 1, 1), n(up, 1, 0)))])
    assert await bodies(reactor, gw.port_number, "/r/x", 2) == [b"502 "] * 2
    assert live.seen == []


@ensureDeferred
async def test_pass_host_node_names_the_node_the_retry_went_to(reactor: Any, stack: Stack) -> None:
    live = Recorder(b"live", respond=lambda request: request.getHeader(b"host"))
    gw, _, up = await dead_primary(reactor, stack, live, "/r/*", pass_host="node")
    assert await bodies(reactor, gw.port_number, "/r/x", 1) == [b"200 127.0.0.1:%d" % up]


class _Held(Recorder):
    """Holds requests to C{/hold} until released."""

    def __init__(self, name: bytes) -> None:
        super().__init__(name)
        self.held: List[Any] = []

    def render(self, request: Any) -> Any:
        if request.path.endswith(b"/hold"):
            self.held.append(request)
            return NOT_DONE_YET
        return super().render(request)


@ensureDeferred
async def test_least_conn_sends_past_a_busy_node(reactor: Any, stack: Stack) -> None:
    a, b = _Held(b"a"), _Held(b"b")
    port_a, port_b = await stack.upstream(a), await stack.upstream(b)
    gw = await stack.gateway([route("1", "/l/*", {node(port_a): 1, node(port_b): 1}, type="least_conn")])
    # The first request goes to a (tie, first listed) and stays there.
    held = Deferred.fromCoroutine(fetch(reactor, gw.port_number, get("/l/hold")))
    for _ in range(50):
        if a.held:
            break
        await sleep(reactor, 0.02)
    assert len(a.held) == 1
    assert await bodies(reactor, gw.port_number, "/l/x", 3) == [b"200 b"] * 3
    a.held[0].write(b"done")
    a.held[0].finish()
    reply = await held
    assert reply.body == b"done"
    # a is idle again: the tie goes to it.
    assert await bodies(reactor, gw.port_number, "/l/x", 1) == [b"200 a"]


@ensureDeferred
async def test_chash_on_a_header_keeps_each_user_on_one_node(reactor: Any, stack: Stack) -> None:
    a, b = Recorder(b"a"), Recorder(b"b")
    port_a, port_b = await stack.upstream(a), await stack.upstream(b)
    gw = await stack.gateway(
        [route("1", "/c/*", {node(port_a): 1, node(port_b): 1}, type="chash", hash_on="header", key="X-User")]
    )
    seen = {}
    for user in range(12):
        extra = b"X-User: u%d\r\n" % user
        answers = set(await bodies(reactor, gw.port_number, "/c/x", 3, extra))
        assert len(answers) == 1
        seen[user] = answers.pop()
    assert set(seen.values()) == {b"200 a", b"200 b"}


@ensureDeferred
async def test_chash_retries_the_next_node_when_the_key_s_node_is_dead(reactor: Any, stack: Stack) -> None:
    live = Recorder(b"live")
    up = await stack.upstream(live)
    dead = await dead_port(reactor)
    gw = await stack.gateway(
        [route("1", "/c/*", {node(dead): 1, node(up): 1}, type="chash", key="arg_user")]
    )
    for user in range(8):
        assert await bodies(reactor, gw.port_number, "/c/x?user=%d" % user, 1) == [b"200 live"]


@ensureDeferred
async def test_keepalive_pool_requests_and_idle_timeout_close_connections(reactor: Any, stack: Stack) -> None:
    up = await stack.upstream(Recorder(b"up"))
    connections = stack.count_connections(up)
    gw = await stack.gateway([route("1", "/k/*", {node(up): 1}, keepalive_pool={"requests": 2})])
    assert await bodies(reactor, gw.port_number, "/k/x", 6) == [b"200 up"] * 6
    assert connections[0] == 3
    other = await stack.upstream(Recorder(b"other"))
    counted = stack.count_connections(other)
    gw2 = await stack.gateway([route("1", "/k/*", {node(other): 1}, keepalive_pool={"idle_timeout": 0})])
    for _ in range(3):
        assert await bodies(reactor, gw2.port_number, "/k/x", 1) == [b"200 other"]
        await sleep(reactor, 0.01)  # the zero-second timer closes the idle connection
    assert counted[0] == 3
    default = await stack.upstream(Recorder(b"default"))
    kept = stack.count_connections(default)
    gw3 = await stack.gateway([route("1", "/k/*", {node(default): 1})])
    assert await bodies(reactor, gw3.port_number, "/k/x", 4) == [b"200 default"] * 4
    assert kept[0] == 1
