"""
C{trusted_proxies} through a real gateway on loopback, with raw client
sockets: from 127.0.0.1 (trusted) the forwarded chain names the client for
the auth request's C{X-Forwarded-For}, C{$remote_addr}, the upstream's
C{X-Real-IP}/C{X-Forwarded-For} and the access log; a configuration that
trusts nothing (or other networks) ignores the very same spoofed chains;
IPv6 through [::1].
"""
from __future__ import annotations

import json
from typing import Any, AsyncIterator, Dict, List, Tuple

import attr
from pytest_twisted import async_yield_fixture, ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.web.resource import Resource

from fauth.config import parse_config
from fauth.edge.gateway import Gateway
from fauth.edge.resources import GatewayResource, GatewaySite
from fauth.observe.accesslog import AccessLog
from fauth.observe.metrics import GatewayMetrics
from fauth.process.demo import EchoResource
from tests.harness import raw_request
from tests.servers import listen_on_loopback, port_url


class RecordingAuth(Resource):
    """Allows everything, naming the user; keeps the headers of each auth request."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: List[Dict[bytes, List[bytes]]] = []

    def render(self, request: Any) -> bytes:
        self.seen.append({k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()})
        request.setHeader(b"X-User-ID", b"u1")
        return b""


@attr.s(auto_attribs=True)
class Env:
    reactor: Any
    auth: RecordingAuth
    auth_url: str
    echo: str
    ports: List[Any]
    tmp_path: Any

    async def gateway(self, v6: bool = False, **top: Any) -> Tuple[int, Gateway, GatewayMetrics]:
        doc: Dict[str, Any] = {
            "routes": [
                {
                    "id": "1",
                    "uri": "/headers",
                    "plugins": {
                        "forward-auth": {
                            "uri": self.auth_url,
                            "upstream_headers": ["X-User-ID"],
                            "extra_headers": {"X-Remote": "$remote_addr:$remote_port"},
                        }
                    },
                    "upstream": {"nodes": {self.echo: 1}},
                }
            ],
        }
        doc.update(top)
        conf = parse_config(doc)
        gateway = Gateway(self.reactor, conf)
        metrics = GatewayMetrics(gateway)
        metrics.access_log = AccessLog(str(self.tmp_path / "access.log"), "X-User-ID")
        site = GatewaySite(GatewayResource(gateway, metrics), conf.http, reactor=self.reactor)
        endpoint = (
            TCP6ServerEndpoint(self.reactor, 0, interface="::1")
            if v6
            else TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        )
        port = await endpoint.listen(site)
        self.ports.append(port)
        self.gateways.append(gateway)
        return port.getHost().port, gateway, metrics

    gateways: List[Gateway] = attr.Factory(list)

    def log_lines(self, metrics: GatewayMetrics) -> List[Dict[str, Any]]:
        assert metrics.access_log is not None
        metrics.access_log.flush()
        with open(str(self.tmp_path / "access.log")) as f:
            return [json.loads(line) for line in f]


@async_yield_fixture
async def env(reactor: Any, tmp_path: Any) -> AsyncIterator[Env]:
    auth = RecordingAuth()
    auth_port = await listen_on_loopback(reactor, auth)
    echo = await listen_on_loopback(reactor, EchoResource())
    e = Env(reactor, auth, port_url(auth_port, "/auth"), "127.0.0.1:%d" % echo.getHost().port, [auth_port, echo], tmp_path)
    try:
        yield e
    finally:
        for port in e.ports:
            await port.stopListening()
        for gateway in e.gateways:
            await gateway.close()


async def get(reactor: Any, port: int, *fields: bytes, host: str = "127.0.0.1") -> Dict[str, str]:
    """GET /headers with extra header lines from C{host}; the upstream's view of the request headers."""
    head = b"GET /headers HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n" + b"".join(f + b"\r\n" for f in fields)
    raw = await raw_request(reactor, port, head + b"\r\n", host=host)
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:200]
    headers: Dict[str, str] = json.loads(raw.partition(b"\r\n\r\n")[2])["headers"]
    return headers


SPOOFED = (b"X-Forwarded-For: 6.6.6.6, 203.0.113.9", b"Forwarded: for=7.7.7.7")


@ensureDeferred
async def test_trusted_peer_names_the_client_everywhere(reactor: Any, env: Env) -> None:
    port, _, metrics = await env.gateway(trusted_proxies=["127.0.0.1"])
    upstream = await get(reactor, port, *SPOOFED)
    seen = env.auth.seen[-1]
    # The auth service: one address (APISIX's X-Forwarded-For), the first
    # untrusted hop from the right; $remote_addr the same; no port given.
    assert seen[b"x-forwarded-for"] == [b"203.0.113.9"]
    assert seen[b"x-remote"] == [b"203.0.113.9:0"]
    # The upstream: the chain as received, the trusted peer appended.
    assert upstream["X-Real-Ip"] == "203.0.113.9"
    assert upstream["X-Forwarded-For"] == "6.6.6.6, 203.0.113.9, 127.0.0.1"
    assert upstream["X-User-Id"] == "u1"
    line = env.log_lines(metrics)[-1]
    assert (line["remote_addr"], line["peer"]) == ("203.0.113.9", "127.0.0.1")


@ensureDeferred
async def test_trusted_hops_are_walked_and_malformed_ones_stop(reactor: Any, env: Env) -> None:
    port, _, metrics = await env.gateway(trusted_proxies=["127.0.0.0/8", "10.0.0.0/8"])
    await get(reactor, port, b"X-Forwarded-For: 6.6.6.6, 198.51.100.4:7001", b"X-Forwarded-For: 10.1.1.1")
    assert env.auth.seen[-1][b"x-remote"] == [b"198.51.100.4:7001"]
    await get(reactor, port, b"X-Forwarded-For: 6.6.6.6, nonsense, 10.1.1.1")
    assert env.auth.seen[-1][b"x-forwarded-for"] == [b"10.1.1.1"]
    upstream = await get(reactor, port, b"X-Forwarded-For: 10.2.2.2, 10.1.1.1")
    assert env.auth.seen[-1][b"x-forwarded-for"] == [b"10.2.2.2"]
    assert upstream["X-Real-Ip"] == "10.2.2.2"
    assert [line["remote_addr"] for line in env.log_lines(metrics)] == ["198.51.100.4", "10.1.1.1", "10.2.2.2"]


@ensureDeferred
async def test_forwarded_header_when_chosen(reactor: Any, env: Env) -> None:
    port, _, _ = await env.gateway(trusted_proxies=["127.0.0.1"], real_ip_header="Forwarded")
    await get(reactor, port, b'Forwarded: for=7.7.7.7, for="[2001:db8::5]:8443";proto=https', b"X-Forwarded-For: 6.6.6.6")
    assert env.auth.seen[-1][b"x-remote"] == [b"2001:db8::5:8443"]
    await get(reactor, port, b"Forwarded: for=unknown", b"X-Forwarded-For: 6.6.6.6")
    assert env.auth.seen[-1][b"x-forwarded-for"] == [b"127.0.0.1"]


@ensureDeferred
async def test_untrusted_peer_chains_are_ignored(reactor: Any, env: Env) -> None:
    # Trusting other networks: 127.0.0.1 is a client like any other, and
    # its claimed chain goes nowhere (dropped upstream, as Caddy does).
    port, _, metrics = await env.gateway(trusted_proxies=["10.0.0.0/8", "::1"])
    upstream = await get(reactor, port, *SPOOFED)
    assert env.auth.seen[-1][b"x-forwarded-for"] == [b"127.0.0.1"]
    assert env.auth.seen[-1][b"x-remote"][0].startswith(b"127.0.0.1:")
    assert env.auth.seen[-1][b"x-remote"] != [b"127.0.0.1:0"]
    assert upstream["X-Real-Ip"] == "127.0.0.1"
    assert upstream["X-Forwarded-For"] == "127.0.0.1"
    line = env.log_lines(metrics)[-1]
    assert line["remote_addr"] == "127.0.0.1" and "peer" not in line


@ensureDeferred
async def test_without_trusted_proxies_nothing_changes(reactor: Any, env: Env) -> None:
    port, gateway, metrics = await env.gateway()
    assert gateway.forwarded_chain is None
    upstream = await get(reactor, port, *SPOOFED)
    assert env.auth.seen[-1][b"x-forwarded-for"] == [b"127.0.0.1"]
    assert upstream["X-Real-Ip"] == "127.0.0.1"
    # Today's upstream chain: the client's, the peer appended (nginx's
    # $proxy_add_x_forwarded_for).
    assert upstream["X-Forwarded-For"] == "6.6.6.6, 203.0.113.9, 127.0.0.1"
    assert env.log_lines(metrics)[-1]["remote_addr"] == "127.0.0.1"


@ensureDeferred
async def test_reload_changes_trust(reactor: Any, env: Env) -> None:
    port, gateway, _ = await env.gateway()
    await get(reactor, port, *SPOOFED)
    assert env.auth.seen[-1][b"x-forwarded-for"] == [b"127.0.0.1"]
    gateway.update(parse_config(dict(gateway.conf.source, trusted_proxies=["127.0.0.1"])))
    await get(reactor, port, *SPOOFED)
    assert env.auth.seen[-1][b"x-forwarded-for"] == [b"203.0.113.9"]


@ensureDeferred
async def test_ipv6_peer(reactor: Any, env: Env) -> None:
    port, _, metrics = await env.gateway(v6=True, trusted_proxies=["::1/128"])
    upstream = await get(reactor, port, b"X-Forwarded-For: 6.6.6.6, [2001:db8::9]:1234", host="::1")
    assert env.auth.seen[-1][b"x-forwarded-for"] == [b"2001:db8::9"]
    assert upstream["X-Forwarded-For"] == "6.6.6.6, [2001:db8::9]:1234, ::1"
    assert env.log_lines(metrics)[-1]["remote_addr"] == "2001:db8::9"
    # An IPv4-only trust list does not cover ::1.
    port, _, _ = await env.gateway(v6=True, trusted_proxies=["127.0.0.1"])
    upstream = await get(reactor, port, b"X-Forwarded-For: 6.6.6.6", host="::1")
    assert env.auth.seen[-1][b"x-forwarded-for"] == [b"::1"]
    assert upstream["X-Forwarded-For"] == "::1"


class ByAddress(Resource):
    """Allows only the client 203.0.113.9 (by the X-Forwarded-For it is sent); counts the calls."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def render(self, request: Any) -> bytes:
        self.calls += 1
        if request.getHeader(b"x-forwarded-for") != b"203.0.113.9":
            request.setResponseCode(403)
            return b"not from here"
        request.setHeader(b"X-User-ID", b"office")
        return b""


@ensureDeferred
async def test_cached_decisions_are_per_resolved_client(reactor: Any, env: Env) -> None:
    auth = ByAddress()
    port = await listen_on_loopback(reactor, auth)
    env.ports.append(port)
    gw_port, _, metrics = await env.gateway(
        trusted_proxies=["127.0.0.1"],
        routes=[
            {
                "id": "c",
                "uri": "/headers",
                "plugins": {"forward-auth": {"uri": port_url(port, "/"), "upstream_headers": ["X-User-ID"], "cache": {"ttl": 60}}},
                "upstream": {"nodes": {env.echo: 1}},
            }
        ],
    )
    allowed = await get(reactor, gw_port, b"X-Forwarded-For: 203.0.113.9")
    assert allowed["X-User-Id"] == "office"
    assert (await get(reactor, gw_port, b"X-Forwarded-For: 6.6.6.6, 203.0.113.9"))["X-User-Id"] == "office"
    assert auth.calls == 1  # the same client: the stored allow
    # Another client behind the proxy never gets that allow, spoofing left of it or not.
    head = b"GET /headers HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\nX-Forwarded-For: 203.0.113.9, 198.51.100.7\r\n\r\n"
    denied = await raw_request(reactor, gw_port, head)
    assert denied.startswith(b"HTTP/1.1 403 ") and denied.endswith(b"not from here")
    assert auth.calls == 2
    assert [line["auth"] for line in env.log_lines(metrics)] == ["allow", "allow (cached)", "deny"]


@ensureDeferred
async def test_remote_addrs_match_the_resolved_client(reactor: Any, env: Env) -> None:
    route = {"id": "office", "uri": "/headers", "remote_addrs": ["203.0.113.0/24"], "upstream": {"nodes": {env.echo: 1}}}
    head = b"GET /headers HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\nX-Forwarded-For: %s\r\n\r\n"
    port, _, _ = await env.gateway(trusted_proxies=["127.0.0.1"], routes=[route])
    assert (await raw_request(reactor, port, head % b"203.0.113.9")).startswith(b"HTTP/1.1 200 ")
    assert (await raw_request(reactor, port, head % b"203.0.113.9, 198.51.100.7")).startswith(b"HTTP/1.1 404 ")
    # Not trusted: the same claim matches nothing.
    port, _, _ = await env.gateway(routes=[route])
    assert (await raw_request(reactor, port, head % b"203.0.113.9")).startswith(b"HTTP/1.1 404 ")
