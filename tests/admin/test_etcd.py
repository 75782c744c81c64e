"""
Several gateways sharing routes and upstreams through a real etcd
(Debian's C{etcd-server}, started here on loopback ports), in APISIX's key
layout: admin writes land in etcd, every gateway watches and serves them;
invalid objects are skipped; etcd going away is survived.
"""
from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, Optional, Tuple

import attr
import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.protocols import portforward
from twisted.web.client import Agent, HTTPConnectionPool

from fauth.admin.etcd import parse_event
from fauth.admin.etcdclient import range_end
from fauth.config import ConfigError, parse_config
from fauth.process.service import GatewayService
from tests.adminenv import KEY, Marker, write_config
from tests.etcdenv import EtcdCluster, etcd_get, etcd_put, etcdctl, start_cluster
from tests.servers import listen_on_loopback, port_url, service_port


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


# --- configuration ------------------------------------------------------------


@pytest.mark.parametrize(
    "etcd, message",
    [
        ({"host": []}, 'config: etcd: property "host" must be a list of member URLs, e.g. ["http://127.0.0.1:2379"]'),
        ({"host": ["127.0.0.1:2379"]}, 'config: etcd: host "127.0.0.1:2379" must be http://HOST:PORT'),
        ({"host": ["https://e:2379"]}, 'config: etcd: host "https://e:2379": https is not supported yet; use http://'),
        ({"host": ["http://e:2379"], "prefix": "apisix"}, 'config: etcd: property "prefix" must be a key prefix'),
        ({"host": ["http://e:2379"], "timeout": 0}, 'config: etcd: property "timeout" must be a positive number'),
        ({"host": ["http://e:2379"], "user": "root"}, 'config: etcd: "user" and "password" go together'),
        ({"host": ["http://e:2379"], "tls": {}}, 'config: etcd: unknown key "tls"'),
        (
            {"host": ["http://e:2379"], "user": "root", "password": "${FAUTH_TEST_UNSET}"},
            'config: etcd: password: environment variable "FAUTH_TEST_UNSET" is not set',
        ),
    ],
)
def test_bad_etcd_sections_are_refused_in_one_line(etcd: Dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"etcd": etcd}, environ={})
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_etcd_section_defaults_and_password_from_the_environment() -> None:
    conf = parse_config(
        {"etcd": {"host": "http://127.0.0.1:2379/", "user": "root", "password": "${P}"}}, environ={"P": "s3cret"}
    ).etcd
    assert conf is not None
    assert conf.hosts == ("http://127.0.0.1:2379",)
    assert (conf.prefix, conf.timeout, conf.user, conf.password) == ("/apisix", 30.0, "root", "s3cret")
    assert "s3cret" not in repr(conf)


def test_keys_in_apisix_layout() -> None:
    assert parse_event("/apisix", b"/apisix/routes/1", b'{"id":"1","uri":"/a"}') == (
        "routes",
        "1",
        {"id": "1", "uri": "/a"},
    )
    assert parse_event("/apisix", b"/apisix/upstreams/u", None) == ("upstreams", "u", None)
    # Numeric ids (APISIX's own generated ones) are strings here.
    assert parse_event("/apisix", b"/apisix/routes/7", b'{"id":7}') == ("routes", "7", {"id": "7"})
    # Other APISIX objects and the old directory markers are not ours.
    for key in (b"/apisix/routes/", b"/apisix/ssls/1", b"/apisix/plugins", b"/other/routes/1"):
        assert parse_event("/apisix", key, b"{}") is None
    for bad in (b"not json", b"[1]", b'{"id":"2"}'):
        with pytest.raises(ValueError):
            parse_event("/apisix", b"/apisix/routes/1", bad)
    assert range_end("/apisix/") == "/apisix0"


# --- the real thing -------------------------------------------------------------------


@async_yield_fixture
async def etcd(tmp_path: Any) -> AsyncIterator[EtcdCluster]:
    cluster = start_cluster(tmp_path, 1)
    try:
        yield cluster
    finally:
        cluster.stop()


@async_yield_fixture
async def upstream(reactor: Any) -> AsyncIterator[str]:
    port = await listen_on_loopback(reactor, Marker(b"up"))
    try:
        yield "127.0.0.1:%d" % port.getHost().port
    finally:
        await port.stopListening()


@attr.s(auto_attribs=True)
class Gateway:
    service: GatewayService
    url: str
    admin_url: str


@attr.s(auto_attribs=True)
class Fleet:
    reactor: Any
    gateways: List[Gateway]
    client: HTTPClient
    pool: HTTPConnectionPool

    async def get(self, gateway: Gateway, path: str) -> Tuple[int, bytes]:
        response = await self.client.get(gateway.url + path)
        return response.code, await response.content()

    async def admin(self, gateway: Gateway, method: str, path: str, body: Any = None) -> Tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        response = await self.client.request(method, gateway.admin_url + path, headers={"X-API-KEY": KEY}, data=data)
        content = await response.content()
        try:
            return response.code, json.loads(content)
        except ValueError:
            return response.code, content

    async def healthz(self, gateway: Gateway) -> Tuple[int, str]:
        response = await self.client.get(gateway.admin_url + "/healthz")
        return response.code, (await response.content()).decode()

    async def until(self, check: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> float:
        """Poll C{check} every 10 ms until true; the seconds it took."""
        start = time.monotonic()
        while not await check():
            if time.monotonic() - start > seconds:
                raise AssertionError("not within %s s" % seconds)
            await deferLater(self.reactor, 0.01, lambda: None)
        return time.monotonic() - start

    async def all_serve(self, path: str, status: int = 200, seconds: float = 5.0) -> float:
        async def check() -> bool:
            for gateway in self.gateways:
                code, _ = await self.get(gateway, path)
                if code != status:
                    return False
            return True

        return await self.until(check, seconds)

    async def synced(self) -> None:
        async def check() -> bool:
            return all(g.service.etcd.watching for g in self.gateways)

        await self.until(check, 10)


async def start_fleet(
    reactor: Any, tmp_path: Any, hosts: List[str], count: int = 3, extra: Optional[Dict[str, Any]] = None
) -> Fleet:
    gateways = []
    for n in range(count):
        doc: Dict[str, Any] = {
            "listen": ["tcp:0:interface=127.0.0.1"],
            "admin": {"listen": "tcp:0:interface=127.0.0.1", "keys": [KEY]},
            "etcd": {"host": hosts, "timeout": 2},
        }
        doc.update(extra or {})
        path = str(tmp_path / ("gw%d.yaml" % n))
        write_config(path, doc)
        service = GatewayService.from_file(path, reactor)
        service.startService()
        assert service.admin_listener is not None
        gateways.append(
            Gateway(
                service,
                port_url(await service_port(service.listeners[0])),
                port_url(await service_port(service.admin_listener)),
            )
        )
    pool = HTTPConnectionPool(reactor, persistent=False)
    fleet = Fleet(reactor, gateways, HTTPClient(Agent(reactor, pool=pool)), pool)
    return fleet


async def stop_fleet(fleet: Fleet) -> None:
    for gateway in fleet.gateways:
        if gateway.service.running:
            await gateway.service.stopService()
    await fleet.pool.closeCachedConnections()


def route(route_id: str, uri: str, node: str, **extra: Any) -> Dict[str, Any]:
    doc = {"id": route_id, "uri": uri, "upstream": {"type": "roundrobin", "nodes": {node: 1}}}
    doc.update(extra)
    return doc


@ensureDeferred
async def test_three_gateways_serve_a_change_made_anywhere(
    reactor: Any, tmp_path: Any, etcd: EtcdCluster, upstream: str
) -> None:
    """
    A route written through one gateway's admin API lands in etcd in
    APISIX's format and is served by all three; one written with
    C{etcdctl put} too; a deletion through another gateway removes it
    everywhere; no store file is written.
    """
    etcd_put(etcd.url, "/apisix/routes/pre", route("pre", "/pre", upstream))
    fleet = await start_fleet(reactor, tmp_path, etcd.urls)
    try:
        await fleet.synced()
        # Listed at start.
        await fleet.all_serve("/pre", 200, 2)
        g1, g2, g3 = fleet.gateways
        code, answer = await fleet.admin(g1, "PUT", "/apisix/admin/routes/r1", route("r1", "/one", upstream))
        assert code == 201, answer
        assert answer["key"] == "/apisix/routes/r1"
        stored = etcd_get(etcd.url, "/apisix/routes/r1")
        assert stored["id"] == "r1" and stored["uri"] == "/one"
        assert isinstance(stored["create_time"], int) and stored["update_time"] == stored["create_time"]
        assert await fleet.all_serve("/one", 200, 1.0) < 1.0

        # As an APISIX operator would write it.
        etcdctl(etcd.url, "put", "/apisix/upstreams/u1", json.dumps({"id": "u1", "nodes": {upstream: 1}}))
        etcdctl(etcd.url, "put", "/apisix/routes/r2", json.dumps({"id": "r2", "uri": "/two", "upstream_id": "u1"}))
        assert await fleet.all_serve("/two", 200, 1.0) < 1.0
        code, answer = await fleet.admin(g3, "GET", "/apisix/admin/routes/r2")
        assert code == 200 and answer["value"]["upstream_id"] == "u1"

        # An upstream in use cannot be deleted, from any gateway.
        code, answer = await fleet.admin(g2, "DELETE", "/apisix/admin/upstreams/u1")
        assert code == 400 and "still using" in answer["error_msg"]
        code, answer = await fleet.admin(g2, "DELETE", "/apisix/admin/routes/r1")
        assert code == 200, answer
        assert etcd_get(etcd.url, "/apisix/routes/r1") is None
        assert await fleet.all_serve("/one", 404, 1.0) < 1.0

        # Validation as without etcd, before anything is written.
        code, answer = await fleet.admin(
            g1, "PUT", "/apisix/admin/routes/bad", dict(route("bad", "/bad", upstream), plugins={"forward-auth": {}})
        )
        assert code == 400 and 'property \\"uri\\" is required' in json.dumps(answer["error_msg"])
        assert etcd_get(etcd.url, "/apisix/routes/bad") is None
        assert not (tmp_path / "fauth-store.json").exists()
    finally:
        await stop_fleet(fleet)


@ensureDeferred
async def test_invalid_objects_are_skipped_and_the_rest_applies(
    reactor: Any, tmp_path: Any, etcd: EtcdCluster, upstream: str
) -> None:
    # Invalid ones at start-up too: the listing applies the rest.
    etcd_put(etcd.url, "/apisix/routes/early-bad", b"{not json")
    etcd_put(etcd.url, "/apisix/routes/early", route("early", "/early", upstream))
    fleet = await start_fleet(reactor, tmp_path, etcd.urls, count=1)
    try:
        await fleet.synced()
        await fleet.all_serve("/early", 200, 2)
        # An APISIX route with a plugin fauth does not run, a route naming an
        # unknown upstream, a value that is no JSON object: each skipped, the
        # routes that can be placed answering 503 (fail closed).
        etcd_put(
            etcd.url,
            "/apisix/routes/other",
            dict(route("other", "/other", upstream), plugins={"limit-count": {"count": 1, "time_window": 60}}),
        )
        etcd_put(etcd.url, "/apisix/routes/orphan", {"id": "orphan", "uri": "/orphan", "upstream_id": "nope"})
        etcd_put(etcd.url, "/apisix/routes/list", b"[1, 2]")
        etcd_put(etcd.url, "/apisix/routes/good", route("good", "/good", upstream))
        await fleet.all_serve("/good", 200, 1.0)
        for path in ("/other", "/orphan"):
            code, _ = await fleet.get(fleet.gateways[0], path)
            assert code == 503
        # The watch goes on.
        etcd_put(etcd.url, "/apisix/routes/later", route("later", "/later", upstream))
        await fleet.all_serve("/later", 200, 1.0)
        assert fleet.gateways[0].service.etcd.watching
    finally:
        await stop_fleet(fleet)


@ensureDeferred
async def test_etcd_stopped_keeps_serving_refuses_writes_and_recovers(
    reactor: Any, tmp_path: Any, etcd: EtcdCluster, upstream: str
) -> None:
    fleet = await start_fleet(reactor, tmp_path, etcd.urls, count=2)
    try:
        await fleet.synced()
        g1, g2 = fleet.gateways
        code, _ = await fleet.admin(g1, "PUT", "/apisix/admin/routes/a", route("a", "/a", upstream))
        assert code == 201
        await fleet.all_serve("/a", 200, 1.0)
        code, body = await fleet.healthz(g1)
        assert code == 200 and body.startswith("ok; etcd: watching")

        etcd.members[0].stop()

        async def says_down() -> bool:
            return "unreachable" in (await fleet.healthz(g2))[1]

        await fleet.until(says_down, 5)
        code, body = await fleet.healthz(g2)
        assert code == 200 and "serving the last table" in body, body
        response = await fleet.client.get(g2.admin_url + "/metrics")
        metrics = (await response.content()).decode()
        assert "\nfauth_etcd_watching 0.0\n" in metrics, metrics
        assert "\nfauth_etcd_revision 0.0\n" not in metrics
        await fleet.all_serve("/a", 200, 0.5)
        # Admin writes: 503, nothing changed anywhere.
        code, answer = await fleet.admin(g1, "PUT", "/apisix/admin/routes/b", route("b", "/b", upstream))
        assert code == 503 and "etcd is unavailable" in answer["error_msg"], answer
        code, answer = await fleet.admin(g1, "DELETE", "/apisix/admin/routes/a")
        assert code == 503
        code, _ = await fleet.admin(g1, "GET", "/apisix/admin/routes/b")
        assert code == 404
        await fleet.all_serve("/b", 404, 0.5)
        await fleet.all_serve("/a", 200, 0.5)

        etcd.members[0].start()
        etcd.wait_healthy()
        await fleet.synced()
        code, body = await fleet.healthz(g2)
        assert body.startswith("ok; etcd: watching")
        etcd_put(etcd.url, "/apisix/routes/c", route("c", "/c", upstream))
        await fleet.all_serve("/c", 200, 1.0)
        code, _ = await fleet.admin(g2, "PUT", "/apisix/admin/routes/b", route("b", "/b", upstream))
        assert code == 201
        await fleet.all_serve("/b", 200, 1.0)
    finally:
        await stop_fleet(fleet)


class _Cuttable(portforward.ProxyFactory):
    """A TCP proxy to etcd whose connections can all be cut."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.live: List[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.live.append(protocol)
        return protocol

    def cut(self) -> None:
        for protocol in self.live:
            if protocol.transport is not None:
                protocol.transport.abortConnection()
        self.live = []


@ensureDeferred
async def test_catch_up_from_the_revision_and_relist_after_compaction(
    reactor: Any, tmp_path: Any, etcd: EtcdCluster, upstream: str
) -> None:
    """
    The gateway reaches etcd through a proxy that is cut: changes made
    meanwhile are caught up from its revision once it is back; when etcd
    compacted that revision away, it lists everything again.
    """
    from twisted.internet.endpoints import TCP4ServerEndpoint

    proxy = _Cuttable("127.0.0.1", etcd.members[0].client_port)
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = await endpoint.listen(proxy)
    proxy_url = "http://127.0.0.1:%d" % port.getHost().port
    fleet = await start_fleet(reactor, tmp_path, [proxy_url], count=1)
    gateway = fleet.gateways[0]
    try:
        await fleet.synced()
        for n in range(3):
            etcd_put(etcd.url, "/apisix/routes/k%d" % n, route("k%d" % n, "/k%d" % n, upstream))
        await fleet.all_serve("/k2", 200, 1.0)

        # Cut: the listener goes, connections drop.
        await port.stopListening()
        proxy.cut()

        async def down() -> bool:
            return not gateway.service.etcd.watching

        await fleet.until(down, 3)
        for n in range(3, 8):
            etcd_put(etcd.url, "/apisix/routes/k%d" % n, route("k%d" % n, "/k%d" % n, upstream))
        etcdctl(etcd.url, "del", "/apisix/routes/k0")
        port = await TCP4ServerEndpoint(reactor, int(proxy_url.rsplit(":", 1)[1]), interface="127.0.0.1").listen(
            proxy
        )
        took = await fleet.all_serve("/k7", 200, 5)
        assert took < 3
        await fleet.all_serve("/k0", 404, 0.5)
        await fleet.all_serve("/k4", 200, 0.5)
        # From its revision: no second listing.
        assert gateway.service.etcd.listings == 1

        # Again, and this time etcd compacts past the gateway's revision.
        await port.stopListening()
        proxy.cut()
        await fleet.until(down, 3)
        etcd_put(etcd.url, "/apisix/routes/k8", route("k8", "/k8", upstream))
        etcdctl(etcd.url, "del", "/apisix/routes/k1")
        revision = etcd_put(etcd.url, "/apisix/routes/k9", route("k9", "/k9", upstream))
        etcdctl(etcd.url, "compact", str(revision))
        port = await TCP4ServerEndpoint(reactor, int(proxy_url.rsplit(":", 1)[1]), interface="127.0.0.1").listen(
            proxy
        )
        await fleet.all_serve("/k9", 200, 5)
        await fleet.all_serve("/k8", 200, 0.5)
        await fleet.all_serve("/k1", 404, 0.5)
        await fleet.all_serve("/k3", 200, 0.5)
        assert gateway.service.etcd.listings == 2
    finally:
        await stop_fleet(fleet)
        await port.stopListening()
        proxy.cut()


@ensureDeferred
async def test_a_member_of_a_three_node_cluster_going_away_is_survived(
    reactor: Any, tmp_path: Any, upstream: str
) -> None:
    """
    C{host} lists the three members; the one the gateways use is stopped:
    they move to another, keep serving, take changes written elsewhere and
    admin writes.
    """
    cluster = start_cluster(tmp_path, 3)
    fleet = await start_fleet(reactor, tmp_path, cluster.urls, count=2)
    try:
        await fleet.synced()
        g1, g2 = fleet.gateways
        code, _ = await fleet.admin(g1, "PUT", "/apisix/admin/routes/a", route("a", "/a", upstream))
        assert code == 201
        await fleet.all_serve("/a", 200, 1.0)
        assert g1.service.etcd.client.host == cluster.urls[0]

        cluster.members[0].stop()
        etcd_put(cluster.members[1].url, "/apisix/routes/b", route("b", "/b", upstream))
        took = await fleet.all_serve("/b", 200, 5)
        assert took < 3, took
        for gateway in fleet.gateways:
            assert gateway.service.etcd.client.host != cluster.urls[0]
        code, answer = await fleet.admin(g2, "PUT", "/apisix/admin/routes/c", route("c", "/c", upstream))
        assert code == 201, answer
        await fleet.all_serve("/c", 200, 1.0)
        code, body = await fleet.healthz(g1)
        assert code == 200 and body.startswith("ok; etcd: watching"), body
    finally:
        await stop_fleet(fleet)
        cluster.stop()


@ensureDeferred
async def test_every_worker_watches(reactor: Any, tmp_path: Any, etcd: EtcdCluster, upstream: str) -> None:
    """
    C{--workers 2} with etcd: each worker watches, so a change written with
    etcdctl or through the supervisor's admin API is served on every new
    connection (whichever worker takes it) within a second, without
    reload signals.
    """
    from tests.adminenv import free_ports
    from tests.process.test_workers import start, stop, wait_ready_async

    port, admin_port = free_ports(2)
    doc = {
        "listen": ["tcp:%d:interface=127.0.0.1" % port],
        "admin": {"listen": "tcp:%d:interface=127.0.0.1" % admin_port, "keys": [KEY]},
        "etcd": {"host": etcd.urls},
    }
    s = start(tmp_path, doc, ("--workers", "2"))
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(Agent(reactor, pool=pool))
    url = "http://127.0.0.1:%d" % port

    async def every_connection_serves(path: str, status: int = 200) -> bool:
        for _ in range(12):
            response = await client.get(url + path)
            await response.content()
            if response.code != status:
                return False
        return True

    async def within(path: str, seconds: float, status: int = 200) -> float:
        start_at = time.monotonic()
        while not await every_connection_serves(path, status):
            assert time.monotonic() - start_at < seconds, s.log()
            await deferLater(reactor, 0.01, lambda: None)
        return time.monotonic() - start_at

    try:
        await wait_ready_async(reactor, s, 2)
        etcdctl(etcd.url, "put", "/apisix/routes/w", json.dumps(route("w", "/w", upstream)))
        assert await within("/w", 1.0) < 1.0
        data = json.dumps(route("v", "/v", upstream)).encode()
        response = await client.put(
            "http://127.0.0.1:%d/apisix/admin/routes/v" % admin_port, data=data, headers={"X-API-KEY": KEY}
        )
        assert response.code == 201, await response.content()
        assert await within("/v", 1.0) < 1.0
        etcdctl(etcd.url, "del", "/apisix/routes/w")
        assert await within("/w", 1.0, 404) < 1.0
        assert s.count("telling \\d+ workers to reload") == 0, s.log()
        # The supervisor's /healthz knows where each worker is.
        revision = int(etcdctl(etcd.url, "get", "/apisix/routes/v", "-w", "json").split('"revision":')[1].split(",")[0])
        deadline = time.monotonic() + 2
        while True:
            response = await client.get("http://127.0.0.1:%d/healthz" % admin_port)
            body = (await response.content()).decode()
            if "workers: 2 of 2 watching, revision %d to %d" % (revision, revision) in body:
                break
            assert time.monotonic() < deadline, body
            await deferLater(reactor, 0.05, lambda: None)
        assert body.startswith("ok; etcd: watching"), body
        assert s.count("etcd: loaded") == 3, s.log()  # the supervisor and each worker
    finally:
        await pool.closeCachedConnections()
        stop(s)


@ensureDeferred
async def test_a_route_skipped_for_its_upstream_is_taken_when_the_upstream_is_fixed(
    reactor: Any, tmp_path: Any, etcd: EtcdCluster, upstream: str
) -> None:
    fleet = await start_fleet(reactor, tmp_path, etcd.urls, count=1)
    try:
        await fleet.synced()
        # An upstream fauth cannot run (APISIX's ewma), and a route on it.
        etcd_put(etcd.url, "/apisix/upstreams/u", {"id": "u", "type": "ewma", "nodes": {upstream: 1}})
        etcd_put(etcd.url, "/apisix/routes/r", {"id": "r", "uri": "/r", "upstream_id": "u"})
        etcd_put(etcd.url, "/apisix/routes/other", route("other", "/other", upstream))
        await fleet.all_serve("/other", 200, 1.0)
        code, _ = await fleet.get(fleet.gateways[0], "/r")
        assert code == 503
        assert set(fleet.gateways[0].service.control.skipped) == {("upstreams", "u"), ("routes", "r")}
        etcd_put(etcd.url, "/apisix/upstreams/u", {"id": "u", "nodes": {upstream: 1}})
        await fleet.all_serve("/r", 200, 1.0)
        assert fleet.gateways[0].service.control.skipped == {}
        # A skipped object deleted is forgotten.
        etcd_put(etcd.url, "/apisix/routes/bad", {"id": "bad", "uri": "/bad", "upstream_id": "none"})
        etcdctl(etcd.url, "del", "/apisix/routes/bad")
        etcd_put(etcd.url, "/apisix/routes/last", route("last", "/last", upstream))
        await fleet.all_serve("/last", 200, 1.0)
        assert fleet.gateways[0].service.control.skipped == {}
    finally:
        await stop_fleet(fleet)


@ensureDeferred
async def test_a_gateway_started_while_etcd_is_down_serves_its_file_and_loads_later(
    reactor: Any, tmp_path: Any, etcd: EtcdCluster, upstream: str
) -> None:
    etcd_put(etcd.url, "/apisix/routes/e", route("e", "/e", upstream))
    etcd.members[0].stop()
    fleet = await start_fleet(reactor, tmp_path, etcd.urls, count=1, extra={"routes": [route("f", "/f", upstream)]})
    gateway = fleet.gateways[0]
    try:
        await fleet.all_serve("/f", 200, 1.0)
        code, body = await fleet.healthz(gateway)
        assert code == 200 and body.startswith("ok; etcd: not loaded yet"), body
        # No write is validated against a table that lacks etcd's objects.
        code, answer = await fleet.admin(gateway, "POST", "/apisix/admin/routes", {"uri": "/p", "upstream": {"nodes": {upstream: 1}}})
        assert code == 503 and "not loaded yet" in answer["error_msg"], answer
        etcd.members[0].start()
        etcd.wait_healthy()
        await fleet.all_serve("/e", 200, 3)
        await fleet.all_serve("/f", 200, 0.5)
    finally:
        await stop_fleet(fleet)


@ensureDeferred
async def test_etcd_authentication(
    reactor: Any, tmp_path: Any, etcd: EtcdCluster, upstream: str, monkeypatch: Any
) -> None:
    """With C{user} and C{password} (from the environment), against an etcd with auth enabled."""
    etcdctl(etcd.url, "user", "add", "root", "--new-user-password", "s3cret")
    etcdctl(etcd.url, "auth", "enable")
    monkeypatch.setenv("FAUTH_TEST_ETCD_PASSWORD", "s3cret")
    fleet = await start_fleet(
        reactor, tmp_path, etcd.urls, count=1,
        extra={
            "etcd": {"host": etcd.urls, "prefix": "/fleet", "user": "root", "password": "${FAUTH_TEST_ETCD_PASSWORD}"}
        },
    )
    try:
        await fleet.synced()
        code, answer = await fleet.admin(fleet.gateways[0], "PUT", "/apisix/admin/routes/a", route("a", "/a", upstream))
        assert code == 201, answer
        assert answer["key"] == "/fleet/routes/a"
        out = etcdctl(etcd.url, "--user", "root:s3cret", "get", "/fleet/routes/a", "--print-value-only")
        assert json.loads(out)["uri"] == "/a"
        etcdctl(etcd.url, "--user", "root:s3cret", "put", "/fleet/routes/b", json.dumps(route("b", "/b", upstream)))
        # Outside the prefix: not ours.
        etcdctl(etcd.url, "--user", "root:s3cret", "put", "/apisix/routes/c", json.dumps(route("c", "/c", upstream)))
        await fleet.all_serve("/b", 200, 1.0)
        await fleet.all_serve("/c", 404, 0.5)
    finally:
        await stop_fleet(fleet)


@ensureDeferred
async def test_concurrent_admin_writes_through_several_gateways_all_land(
    reactor: Any, tmp_path: Any, etcd: EtcdCluster, upstream: str
) -> None:
    """
    Writes in flight at once, through three gateways (each applying its own
    while the watch brings the others'): every gateway ends with etcd's
    table.
    """
    from twisted.internet.defer import gatherResults

    fleet = await start_fleet(reactor, tmp_path, etcd.urls)
    try:
        await fleet.synced()
        writes = [
            Deferred.fromCoroutine(
                fleet.admin(fleet.gateways[n % 3], "PUT", "/apisix/admin/routes/x%d" % n, route("x%d" % n, "/x%d" % n, upstream))
            )
            for n in range(30)
        ]
        results = await gatherResults(writes)
        assert [code for code, _ in results] == [201] * 30, results
        await fleet.all_serve("/x29", 200, 1.0)
        for n in range(30):
            await fleet.all_serve("/x%d" % n, 200, 1.0)
        expected = {"x%d" % n for n in range(30)}
        for gateway in fleet.gateways:
            assert set(gateway.service.control.contents.routes) == expected
    finally:
        await stop_fleet(fleet)


@ensureDeferred
async def test_a_member_without_a_leader_is_not_trusted(reactor: Any, tmp_path: Any, upstream: str) -> None:
    """
    Two of three members stopped: the one left has no leader, so its watch
    ends (etcd's require-leader), and the gateway says etcd is unreachable
    instead of watching a member that will never have news; it comes back
    with the others.
    """
    cluster = start_cluster(tmp_path, 3)
    fleet = await start_fleet(reactor, tmp_path, cluster.urls, count=1)
    gateway = fleet.gateways[0]
    try:
        await fleet.synced()
        assert gateway.service.etcd.client.host == cluster.urls[0]
        cluster.members[1].stop()
        cluster.members[2].stop()

        async def says_down() -> bool:
            return "unreachable" in (await fleet.healthz(gateway))[1]

        took = await fleet.until(says_down, 10)
        print("no leader noticed after %.2f s" % took)
        cluster.members[1].start()
        cluster.members[2].start()
        cluster.wait_healthy()
        await fleet.synced()
        etcd_put(cluster.members[1].url, "/apisix/routes/b", route("b", "/b", upstream))
        await fleet.all_serve("/b", 200, 3)
    finally:
        await stop_fleet(fleet)
        cluster.stop()
