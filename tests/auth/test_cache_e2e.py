"""
The decision cache through a real gateway on loopback: 1,000 users
interleaved, each upstream request checked for its own user's identity;
the metrics and the access log of cached decisions; clients going away
from a shared call.
"""
from __future__ import annotations

import json
import random
from typing import Any, Dict, List, Tuple

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import DeferredSemaphore, ensureDeferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.web import server
from twisted.web.resource import Resource

from fauth.config import parse_config
from fauth.edge.gateway import Gateway
from fauth.edge.resources import GatewayResource, GatewaySite
from fauth.observe.accesslog import AccessLog
from fauth.observe.metrics import GatewayMetrics
from tests.harness import raw_request
from tests.auth.test_client import AuthConnection, Env, env, eventually, request  # noqa: F401 (env: fixture)
from tests.servers import listen_on_loopback

USERS = 1000
ROUNDS = 3


class SlowAuth(Resource):
    """Answers each token with its own user after a short delay, so that identical calls overlap."""

    isLeaf = True

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.calls: List[bytes] = []

    def render(self, request: Any) -> Any:
        token = request.getHeader(b"authorization") or b""
        self.calls.append(token)

        def answer() -> None:
            if request._disconnected:
                return
            if token.startswith(b"token-"):
                request.setHeader(b"x-user-id", b"user-" + token[len(b"token-"):])
            else:
                request.setResponseCode(401)
            request.finish()

        self.reactor.callLater(random.uniform(0.0, 0.004), answer)
        return server.NOT_DONE_YET


class Echo(Resource):
    """Records the identity each request arrived with, and answers it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: List[Tuple[bytes, bytes]] = []

    def render(self, request: Any) -> bytes:
        pair = (request.getHeader(b"authorization") or b"", request.getHeader(b"x-user-id") or b"")
        self.seen.append(pair)
        return b"%s %s" % pair


@pytest.mark.parametrize("key", [[], ["$http_authorization"]], ids=["whole-request", "narrowed"])
@pytest_twisted.ensureDeferred
async def test_1000_interleaved_users_each_reach_the_upstream_as_themselves(key: List[str], tmp_path: Any) -> None:
    from twisted.internet import reactor

    auth = SlowAuth(reactor)
    echo = Echo()
    auth_port = await listen_on_loopback(reactor, auth)
    echo_port = await listen_on_loopback(reactor, echo)
    conf = parse_config(
        {
            "listen": ["tcp:0"],
            "routes": [
                {
                    "id": "1",
                    "uri": "/me",
                    "plugins": {
                        "forward-auth": {
                            "uri": "http://127.0.0.1:%d/auth" % auth_port.getHost().port,
                            "request_headers": ["Authorization"],
                            "upstream_headers": ["X-User-ID"],
                            "keepalive_pool": 64,
                            "cache": {"ttl": 30, "key": key},
                        }
                    },
                    "upstream": {"nodes": {"127.0.0.1:%d" % echo_port.getHost().port: 1}},
                }
            ],
        }
    )
    gateway = Gateway(reactor, conf)
    metrics = GatewayMetrics(gateway)
    metrics.access_log = AccessLog(str(tmp_path / "access.log"))
    site = GatewaySite(GatewayResource(gateway, metrics), conf.http, reactor=reactor)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    try:
        # Every user several times, shuffled, many at once; a user's
        # requests also carry a forged identity header of another user.
        plan = [(user, n) for user in range(USERS) for n in range(ROUNDS)]
        random.Random(12).shuffle(plan)
        limit = DeferredSemaphore(64)
        answers: Dict[Tuple[int, int], bytes] = {}

        async def one(user: int, n: int) -> None:
            payload = (
                "GET /me HTTP/1.1\r\nHost: gw\r\nAuthorization: token-%d\r\nX-User-ID: user-%d\r\n"
                "Connection: close\r\n\r\n" % (user, (user + 1) % USERS)
            ).encode()
            raw = await raw_request(reactor, port.getHost().port, payload)
            answers[(user, n)] = raw

        await gatherResults([limit.run(lambda u=user, n=n: ensureDeferred(one(u, n))) for user, n in plan])

        assert len(echo.seen) == USERS * ROUNDS
        for token, user in echo.seen:
            assert token.startswith(b"token-")
            assert user == b"user-" + token[len(b"token-"):], (token, user)
        for (user, _), raw in answers.items():
            assert raw.startswith(b"HTTP/1.1 200"), raw[:100]
            assert raw.endswith(b"token-%d user-%d" % (user, user))

        # Each user's decision was asked for about once: the rest were hits
        # or shared calls.
        assert USERS <= len(auth.calls) < USERS * ROUNDS
        assert sorted(set(auth.calls)) == sorted(b"token-%d" % u for u in range(USERS))

        text = metrics.exposition()[0].decode()
        samples = {
            s.labels["result"]: s.value
            for family in text_string_to_metric_families(text)
            if family.name == "fauth_auth_cache"
            for s in family.samples
            if s.name == "fauth_auth_cache_total" and s.labels.get("route") == "1"
        }
        assert set(samples) == {"hit", "miss", "coalesced", "stale", "uncacheable"}
        assert samples["miss"] == len(auth.calls)
        assert samples["hit"] + samples["coalesced"] + samples["miss"] == USERS * ROUNDS
        assert samples["hit"] > 0
        assert samples["stale"] == samples["uncacheable"] == 0

        metrics.access_log.flush()
        lines = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
        assert len(lines) == USERS * ROUNDS
        by_auth: Dict[str, int] = {}
        for line in lines:
            by_auth[line["auth"]] = by_auth.get(line["auth"], 0) + 1
            # The user shown is the auth service's, for cached decisions too.
            assert line["user"] is not None and line["user"].startswith("user-")
        assert by_auth.get("allow (cached)") == samples["hit"]
        assert by_auth.get("allow") == samples["miss"]
        assert by_auth.get("allow (coalesced)", 0) == samples["coalesced"]
    finally:
        await port.stopListening()
        await gateway.close()
        await auth_port.stopListening()
        await echo_port.stopListening()



# ---------------------------------------------------------------------------
# Clients going away from a shared call, on real sockets


class _Hanging(Protocol):
    """Sends one request and keeps the connection until aborted."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = b""

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += data


async def _send(reactor: Any, port: int, token: str) -> _Hanging:
    payload = ("GET /hello HTTP/1.1\r\nHost: localhost\r\nAuthorization: %s\r\n\r\n" % token).encode()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    return await endpoint.connect(Factory.forProtocol(lambda: _Hanging(payload)))


@pytest_twisted.ensureDeferred
async def test_clients_leaving_a_shared_call_through_the_gateway(env: Env) -> None:
    held: List[AuthConnection] = []
    auth = await env.auth(lambda seen, conn: held.append(conn))
    gw = await env.gateway(
        auth.url(), request_headers=["Authorization"], upstream_headers=["X-User-ID"], cache={"ttl": 30}
    )
    cache = gw.gateway.decision_cache("1")
    assert cache is not None

    def waiting() -> int:
        return sum(f.waiting for f in cache.flights.values())

    # One client starts the call, a second joins it, the first goes away.
    first = await _send(env.reactor, gw.port_number, "t1")
    assert await eventually(env.reactor, lambda: len(held) == 1)
    survivor = ensureDeferred(request(gw, headers=[("Authorization", "t1")]))
    assert await eventually(env.reactor, lambda: waiting() == 2)
    first.transport.abortConnection()
    assert await eventually(env.reactor, lambda: waiting() == 1)
    await deferLater(env.reactor, 0.05, lambda: None)
    assert not held[0].lost, "the shared call was cancelled while a client still waited"
    held[0].respond(200, [(b"X-User-ID", b"user-1")])
    reply = await survivor
    assert reply.status == 200
    assert env.upstream.seen[-1].getRawHeaders(b"x-user-id") == [b"user-1"]
    assert len(auth.requests) == 1

    # Two clients share a call and both go away: the last one cancels it,
    # which closes the auth connection (nothing half-read goes back to the pool).
    a = await _send(env.reactor, gw.port_number, "t2")
    assert await eventually(env.reactor, lambda: len(held) == 2)
    b = await _send(env.reactor, gw.port_number, "t2")
    assert await eventually(env.reactor, lambda: waiting() == 2)
    a.transport.abortConnection()
    assert await eventually(env.reactor, lambda: waiting() == 1)
    await deferLater(env.reactor, 0.05, lambda: None)
    assert not held[1].lost
    b.transport.abortConnection()
    assert await eventually(env.reactor, lambda: held[1].lost)
    assert cache.flights == {}
    assert len(auth.requests) == 2
