"""
APISIX fields of issue 22 and 18 on each way an object arrives: the YAML
file, the admin API (store file) and etcd, through real gateways on
loopback: upstream node C{priority} and retries, the upstream fields fauth
refuses, C{_meta.disable} and C{_meta.filter} on forward-auth, C{?ttl=} and
C{createdIndex} on etcd, and id-less routes of a standalone file.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Dict

import attr
import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.web.resource import Resource

from fauth.config import ConfigError, parse_config
from fauth.process.check import describe
from tests.adminenv import AdminEnv, Marker, start_admin_env
from tests.admin.test_etcd import Fleet, etcd, start_fleet, stop_fleet
from tests.etcdenv import EtcdCluster, etcd_get, etcd_put
from tests.harness import LogCapture
from tests.servers import listen_on_loopback, port_url

__all__ = ["etcd"]  # the fixture

R = "/apisix/admin/routes"


class CountingDeny(Resource):
    """An auth service that denies everything and counts the calls."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def render(self, request: Any) -> bytes:
        self.calls += 1
        request.setResponseCode(403)
        return b"denied"


@attr.s(auto_attribs=True)
class Services:
    auth: CountingDeny
    auth_url: str
    live: str  # host:port of an upstream answering "live"
    dead: int  # a port nothing listens on

    def forward_auth(self, **meta: Any) -> Dict[str, Any]:
        conf: Dict[str, Any] = {"uri": self.auth_url}
        if meta:
            conf["_meta"] = meta
        return conf

    def guarded(self, route_id: str, uri: str, **meta: Any) -> Dict[str, Any]:
        return {
            "id": route_id,
            "uri": uri,
            "plugins": {"forward-auth": self.forward_auth(**meta)},
            "upstream": {"nodes": {self.live: 1}},
        }

    def backup_pair(self, route_id: str, uri: str, **upstream: Any) -> Dict[str, Any]:
        """A route whose primary node is dead and whose backup is live."""
        host, port = self.live.split(":")
        nodes = [
            {"host": "127.0.0.1", "port": self.dead, "weight": 1, "priority": 1},
            {"host": host, "port": int(port), "weight": 1, "priority": 0},
        ]
        return {"id": route_id, "uri": uri, "upstream": dict({"nodes": nodes}, **upstream)}


@async_yield_fixture
async def services(reactor: Any) -> AsyncIterator[Services]:
    auth = CountingDeny()
    auth_port = await listen_on_loopback(reactor, auth)
    live_port = await listen_on_loopback(reactor, Marker(b"live"))
    closed = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
    dead = closed.getHost().port
    await closed.stopListening()
    try:
        yield Services(auth, port_url(auth_port, "/auth"), "127.0.0.1:%d" % live_port.getHost().port, dead)
    finally:
        await auth_port.stopListening()
        await live_port.stopListening()


# --- the YAML file -----------------------------------------------------------------


@ensureDeferred
async def test_yaml_meta_disable_priority_and_id_less_routes(reactor: Any, tmp_path: Any, services: Services) -> None:
    idless = services.guarded("x", "/idless")
    del idless["id"]
    doc = {
        "routes": [
            services.guarded("off", "/off", disable=True),
            services.guarded("on", "/on", disable=False),
            services.backup_pair("pair", "/pair"),
            idless,
        ]
    }
    with LogCapture() as logs:
        env = await start_admin_env(reactor, tmp_path, doc)
    try:
        code, body, _ = await env.get("/off")
        assert (code, body, services.auth.calls) == (200, b"live", 0)
        assert logs.contains("route off: forward-auth is disabled by _meta.disable: its requests pass without auth")
        code, body, _ = await env.get("/on")
        assert (code, body, services.auth.calls) == (403, b"denied", 1)
        assert (await env.get("/pair"))[:2] == (200, b"live")
        assert (await env.get("/idless"))[0] == 403
        code, listed = await env.admin("GET", R)
        assert [item["value"]["id"] for item in listed["list"]] == ["off", "on", "pair", "arr_4"]
        code, body = await env.admin("PUT", R + "/arr_4", services.guarded("arr_4", "/x"))
        assert code == 409
    finally:
        await env.stop()


@pytest.mark.parametrize(
    "upstream, words",
    [
        ({"checks": {"active": {"http_path": "/"}}}, 'property "checks" validation failed: not supported: fauth runs no health checks'),
        ({"type": "ewma"}, 'property "type" validation failed: invalid balancer type: ewma'),
        ({"scheme": "grpc"}, 'property "scheme" validation failed: grpc is not supported by fauth (http or https)'),
        ({"scheme": "gopher"}, 'property "scheme" validation failed: matches none of the enum values'),
        ({"discovery_type": "dns", "service_name": "x"}, 'property "discovery_type" validation failed: not supported'),
        ({"tls": {"client_cert_id": "1"}}, 'property "tls" validation failed: client_cert_id is not supported by fauth'),
        ({"type": "chash"}, "missing key"),
        ({"type": "chash", "hash_on": "consumer"}, 'property "hash_on" validation failed: consumer is not supported'),
        ({"type": "chash", "key": "bogus"}, 'invalid configuration: failed to match pattern'),
        ({"retries": -1}, 'property "retries" validation failed: expected -1 to be at least 0'),
        ({"retry_timeout": "1"}, 'property "retry_timeout" validation failed: wrong type: expected number, got string'),
        ({"keepalive_pool": {"requests": 0}}, 'property "keepalive_pool" validation failed: expected 0 to be at least 1'),
        ({"keepalive_pool": {"idle": 1}}, 'property "keepalive_pool" validation failed: additional properties forbidden'),
    ],
)
def test_yaml_upstream_fields_refused_in_apisix_words(upstream: Dict[str, Any], words: str) -> None:
    doc = {"routes": [{"id": "1", "uri": "/", "upstream": dict({"nodes": {"127.0.0.1:9": 1}}, **upstream)}]}
    with pytest.raises(ConfigError) as caught:
        parse_config(doc)
    assert words in str(caught.value)
    assert str(caught.value).startswith('route "1": upstream: ')


@pytest.mark.parametrize(
    "meta, words",
    [
        ({"filter": [["arg_a", "bogus", "1"]]}, "plugin forward-auth: failed to validate the 'vars' expression: invalid operator 'bogus'"),
        ({"filter": "arg_a"}, 'property "filter" validation failed: wrong type: expected array, got string'),
        ({"pre_function": "return"}, 'property "pre_function" validation failed: not supported by fauth: it runs no Lua'),
        ({"disable": "yes"}, 'property "disable" validation failed: wrong type: expected boolean, got string'),
        ({"colour": 1}, 'property "_meta" validation failed: additional properties forbidden, found colour'),
    ],
)
def test_yaml_meta_refusals(meta: Dict[str, Any], words: str) -> None:
    doc = {"routes": [{"id": "1", "uri": "/", "plugins": {"forward-auth": {"uri": "http://a/", "_meta": meta}},
                       "upstream": {"nodes": {"127.0.0.1:9": 1}}}]}
    with pytest.raises(ConfigError) as caught:
        parse_config(doc)
    assert words in str(caught.value), str(caught.value)


def test_a_disabled_forward_auth_is_accepted_even_when_invalid_as_apisix() -> None:
    nodes = [{"host": "127.0.0.1", "port": 9, "weight": 1, "priority": 2}, {"host": "127.0.0.1", "port": 8, "weight": 1}]
    doc = {"routes": [{"id": "1", "uri": "/", "plugins": {"forward-auth": {"timeout": 0, "_meta": {"disable": True}}},
                       "upstream": {"type": "least_conn", "nodes": nodes}}]}
    conf = parse_config(doc)
    assert conf.routes[0].forward_auth is None
    # fauth --check says so.
    assert (
        "  route '1': /; no forward-auth (disabled by _meta.disable); "
        "upstream least_conn http://127.0.0.1:9(1, priority 2), 127.0.0.1:8(1)"
    ) in describe(conf).splitlines()


# --- the admin API (store file) ----------------------------------------------------


@ensureDeferred
async def test_admin_api_meta_disable_priority_and_refusals(reactor: Any, tmp_path: Any, services: Services) -> None:
    env: AdminEnv = await start_admin_env(reactor, tmp_path, {})
    try:
        assert (await env.admin("PUT", R + "/off", services.guarded("off", "/off", disable=True)))[0] == 201
        assert (await env.get("/off"))[:2] == (200, b"live")
        assert services.auth.calls == 0
        # Turned back on with a PATCH: auth again.
        code, _ = await env.admin("PATCH", R + "/off/plugins/forward-auth/_meta/disable", False)
        assert code == 200
        assert (await env.get("/off"))[:2] == (403, b"denied")
        assert services.auth.calls == 1
        assert (await env.admin("PUT", R + "/pair", services.backup_pair("pair", "/pair")))[0] == 201
        assert (await env.get("/pair"))[:2] == (200, b"live")
        # _meta.filter: the plugin runs only for the requests it accepts (APISIX's meta_filter).
        code, body = await env.admin("PUT", R + "/f", services.guarded("f", "/f", filter=[["arg_check", "==", "1"]]))
        assert code == 201, body
        calls = services.auth.calls
        assert (await env.get("/f?check=1"))[:2] == (403, b"denied")
        assert (await env.get("/f?check=0"))[:2] == (200, b"live")
        assert services.auth.calls == calls + 1
        code, body = await env.admin("PUT", R + "/g", services.guarded("g", "/g", filter=[["arg_a", "bogus", "1"]]))
        assert code == 400
        assert body["error_msg"].endswith("failed to validate the 'vars' expression: invalid operator 'bogus'")
        checks = services.backup_pair("c", "/c", checks={"active": {}})
        code, body = await env.admin("PUT", R + "/c", checks)
        assert (code, body["error_msg"]) == (
            400,
            'invalid configuration: upstream: property "checks" validation failed: not supported: fauth runs no '
            "health checks (a node that refuses connections is retried on the next, see retries)",
        )
        assert (await env.get("/g"))[0] == 404 and (await env.get("/c"))[0] == 404
    finally:
        await env.stop()


# --- etcd ---------------------------------------------------------------------------


@ensureDeferred
async def test_etcd_meta_disable_priority_ttl_and_indexes(
    reactor: Any, tmp_path: Any, etcd: EtcdCluster, services: Services
) -> None:
    etcd_put(etcd.url, "/apisix/routes/off", services.guarded("off", "/off", disable=True))
    etcd_put(etcd.url, "/apisix/routes/pair", services.backup_pair("pair", "/pair"))
    etcd_put(etcd.url, "/apisix/routes/filtered", services.guarded("filtered", "/filtered", filter=[["http_x_skip", "~=", "yes"]]))
    etcd_put(etcd.url, "/apisix/routes/lua", services.guarded("lua", "/lua", pre_function="return"))
    fleet: Fleet = await start_fleet(reactor, tmp_path, etcd.urls, count=1)
    try:
        await fleet.synced()
        (gw,) = fleet.gateways
        await fleet.all_serve("/off", 200, 2)
        assert services.auth.calls == 0  # (and /off's requests never call it)
        assert await fleet.get(gw, "/pair") == (200, b"live")
        # The filter decides whether the plugin runs.
        assert await fleet.get(gw, "/filtered") == (403, b"denied")
        response = await fleet.client.get(gw.url + "/filtered", headers={"X-Skip": "yes"})
        assert (response.code, await response.content()) == (200, b"live")
        # Refused: kept as a route that answers 503 (fail closed), never served unauthenticated.
        assert (await fleet.get(gw, "/lua"))[0] == 503
        assert ("routes", "lua") in gw.service.control.skipped
        # Indexes are etcd's revisions.
        code, one = await fleet.admin(gw, "GET", R + "/pair")
        assert code == 200 and 0 < one["createdIndex"] == one["modifiedIndex"]
        code, put = await fleet.admin(gw, "PUT", R + "/pair", services.backup_pair("pair", "/pair2"))
        assert (code, put["createdIndex"]) == (200, one["createdIndex"])
        assert put["modifiedIndex"] > one["modifiedIndex"]
        # ?ttl= is an etcd lease: etcd deletes the key, the watch removes the route.
        code, body = await fleet.admin(gw, "PUT", R + "/short?ttl=1", services.guarded("short", "/short"))
        assert code == 201, body
        assert etcd_get(etcd.url, "/apisix/routes/short") is not None
        assert (await fleet.get(gw, "/short"))[0] == 403
        await fleet.all_serve("/short", 404, 5)
        assert etcd_get(etcd.url, "/apisix/routes/short") is None
        assert (await fleet.admin(gw, "GET", R + "/short")) == (404, {"message": "Key not found"})
    finally:
        await stop_fleet(fleet)
