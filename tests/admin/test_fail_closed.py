"""
Routes that cannot run fail closed, on every way in (issue 22): refused at
the configuration file and the admin API; from etcd (where nothing validated
them) kept in the table as placeholders answering 503, never letting their
paths fall to a broader public route.  Services and plugin configs, which
APISIX users put forward-auth in, on all three ways in; APISIX's route
precedence through a real gateway.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Dict

import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred

from fauth.config import ConfigError, parse_config
from fauth.process.demo import DemoAuthResource
from tests.adminenv import env_doc, start_admin_env, write_config
from tests.admin.test_etcd import etcd, reactor, start_fleet, stop_fleet, upstream  # noqa: F401 (fixtures)
from tests.etcdenv import EtcdCluster, etcd_put, etcdctl
from tests.servers import listen_on_loopback

TOKEN = {"Authorization": "123"}


@async_yield_fixture
async def auth(reactor: Any) -> AsyncIterator[str]:  # noqa: F811
    """The demo auth service: 200 for C{Authorization: 123}, else 403."""
    port = await listen_on_loopback(reactor, DemoAuthResource())
    try:
        yield "http://127.0.0.1:%d/" % port.getHost().port
    finally:
        await port.stopListening()


def _fa(auth: str) -> Dict[str, Any]:
    return {"forward-auth": {"uri": auth, "request_headers": ["Authorization"]}}


def _nodes(upstream: str) -> Dict[str, Any]:  # noqa: F811
    return {"nodes": {upstream: 1}}


# --- the configuration file: refused up front ---------------------------------------


@pytest.mark.parametrize(
    "route, message",
    [
        (
            {"plugins": {"forward-auth": {"uri": "http://a/"}, "limit-count": {"count": 1}}},
            'route "r": unknown plugin [limit-count]',
        ),
        ({"service_id": "nope"}, 'route "r": failed to fetch service info by service id [nope], response code: 404'),
        (
            {"plugin_config_id": "nope"},
            'route "r": failed to fetch plugin config info by plugin config id [nope], response code: 404',
        ),
        ({"filter_func": "function(vars) return true end"}, 'route "r": property "filter_func" is not supported'),
        ({"script": "local _M = {} return _M"}, 'route "r": property "script" is not supported'),
    ],
)
def test_file_refuses_routes_that_cannot_run(route: Dict[str, Any], message: str) -> None:
    doc = dict({"id": "r", "uri": "/r", "upstream": {"nodes": {"127.0.0.1:1": 1}}}, **route)
    with pytest.raises(ConfigError) as caught:
        parse_config({"routes": [doc]})
    assert str(caught.value).startswith(message), str(caught.value)


@ensureDeferred
async def test_file_host_bound_route_wins_and_service_brings_forward_auth(
    reactor: Any, tmp_path: Any, auth: str, upstream: str  # noqa: F811
) -> None:
    """
    The issue's case through a real gateway: C{admin.example.com/app/public}
    is served by the host-bound forward-auth route (403 without a token),
    not by the host-less public one; and forward-auth from a service.
    """
    doc = {
        "services": [{"id": "guarded", "plugins": _fa(auth), "upstream": _nodes(upstream)}],
        "routes": [
            {"id": "A", "uri": "/app/*", "hosts": ["admin.example.com"], "plugins": _fa(auth), "upstream": _nodes(upstream)},
            {"id": "B", "uri": "/app/public", "upstream": _nodes(upstream)},
            {"id": "S", "uri": "/svc/*", "service_id": "guarded"},
        ],
    }
    env = await start_admin_env(reactor, tmp_path, doc)
    try:
        code, _, _ = await env.get("/app/public", {"Host": "admin.example.com"})
        assert code == 403
        code, body, _ = await env.get("/app/public", dict(TOKEN, Host="admin.example.com"))
        assert code == 200 and body == b"up"
        code, _, _ = await env.get("/app/public", {"Host": "www.example.com"})
        assert code == 200
        code, _, _ = await env.get("/svc/x")
        assert code == 403
        code, _, _ = await env.get("/svc/x", TOKEN)
        assert code == 200
    finally:
        await env.stop()


# --- the admin API (store file): refused up front, APISIX's words ------------------------


@ensureDeferred
async def test_admin_api_services_and_plugin_configs(
    reactor: Any, tmp_path: Any, auth: str, upstream: str  # noqa: F811
) -> None:
    env = await start_admin_env(reactor, tmp_path, {"routes": [{"id": "pub", "uri": "/*", "upstream": _nodes(upstream)}]})
    try:
        code, answer = await env.admin("PUT", "/apisix/admin/routes/r", {"uri": "/r/*", "service_id": "s"})
        assert (code, answer["error_msg"]) == (400, "failed to fetch service info by service id [s], response code: 404")
        code, answer = await env.admin("PUT", "/apisix/admin/services/s", {"plugins": _fa(auth), "upstream": _nodes(upstream)})
        assert code == 201, answer
        code, answer = await env.admin("PUT", "/apisix/admin/plugin_configs/p", {"plugins": _fa(auth)})
        assert code == 201, answer
        code, answer = await env.admin("POST", "/apisix/admin/plugin_configs", {"plugins": _fa(auth)})
        assert (code, answer["error_msg"]) == (405, "not supported `POST` method for plugin config")
        code, answer = await env.admin("PUT", "/apisix/admin/routes/r", {"uri": "/r/*", "service_id": "s"})
        assert code == 201, answer
        code, answer = await env.admin(
            "PUT", "/apisix/admin/routes/q", {"uri": "/q/*", "plugin_config_id": "p", "upstream": _nodes(upstream)}
        )
        assert code == 201, answer
        for path in ("/r/x", "/q/x"):
            assert (await env.get(path))[0] == 403
            assert (await env.get(path, TOKEN))[0] == 200
        code, answer = await env.admin("DELETE", "/apisix/admin/services/s")
        assert (code, answer["error_msg"]) == (400, "can not delete this service directly, route [r] is still using it now")
        code, answer = await env.admin("DELETE", "/apisix/admin/plugin_configs/p")
        assert (code, answer["error_msg"]) == (400, "can not delete this plugin config, route [q] is still using it now")
        code, answer = await env.admin(
            "PUT", "/apisix/admin/routes/lua", {"uri": "/l", "filter_func": "function(v) return true end", "service_id": "s"}
        )
        assert code == 400 and answer["error_msg"].startswith('invalid configuration: property "filter_func" is not supported')
        code, answer = await env.admin("PUT", "/apisix/admin/routes/v", {"uri": "/v", "vars": [["arg_x", "=~", 1]], "service_id": "s"})
        assert (code, answer["error_msg"]) == (400, "failed to validate the 'vars' expression: invalid operator '=~'")
        code, answer = await env.admin("GET", "/apisix/admin/services")
        assert code == 200 and [item["value"]["id"] for item in answer["list"]] == ["s"]
        # Deleted once unused.
        assert (await env.admin("DELETE", "/apisix/admin/routes/r"))[0] == 200
        assert (await env.admin("DELETE", "/apisix/admin/services/s"))[0] == 200
        assert (await env.get("/r/x"))[0] == 200  # now the public route's
    finally:
        await env.stop()


@ensureDeferred
async def test_admin_api_host_bound_route_wins(
    reactor: Any, tmp_path: Any, auth: str, upstream: str  # noqa: F811
) -> None:
    env = await start_admin_env(reactor, tmp_path, {})
    try:
        route_a = {"uri": "/app/*", "hosts": ["admin.example.com"], "plugins": _fa(auth), "upstream": _nodes(upstream)}
        assert (await env.admin("PUT", "/apisix/admin/routes/B", {"uri": "/app/public", "upstream": _nodes(upstream)}))[0] == 201
        assert (await env.admin("PUT", "/apisix/admin/routes/A", route_a))[0] == 201
        assert (await env.get("/app/public", {"Host": "admin.example.com"}))[0] == 403
        assert (await env.get("/app/public", {"Host": "www.example.com"}))[0] == 200
    finally:
        await env.stop()


@ensureDeferred
async def test_reload_that_drops_a_service_still_named_is_refused(
    reactor: Any, tmp_path: Any, auth: str, upstream: str  # noqa: F811
) -> None:
    doc = {
        "services": [{"id": "s", "plugins": _fa(auth), "upstream": _nodes(upstream)}],
        "routes": [{"id": "pub", "uri": "/*", "upstream": _nodes(upstream)}],
    }
    env = await start_admin_env(reactor, tmp_path, doc)
    try:
        assert (await env.admin("PUT", "/apisix/admin/routes/r", {"uri": "/r/*", "service_id": "s"}))[0] == 201
        assert (await env.get("/r/x"))[0] == 403
        full = env_doc(tmp_path, dict(doc, services=[]))
        write_config(env.config_path, full)
        code, answer = await env.admin("POST", "/apisix/admin/reload")
        assert code == 400
        assert 'route "r": failed to fetch service info by service id [s], response code: 404' in answer["error_msg"]
        assert (await env.get("/r/x"))[0] == 403  # the running table kept
    finally:
        await env.stop()


# --- etcd: what arrives at run time fails closed -------------------------------------------


@ensureDeferred
async def test_etcd_route_that_cannot_run_answers_503_not_the_public_route(
    reactor: Any, tmp_path: Any, etcd: EtcdCluster, auth: str, upstream: str  # noqa: F811
) -> None:
    """
    forward-auth beside a plugin fauth does not have: the route stays in the
    table answering 503 (healthz and metrics say so) until a valid version
    arrives; its paths never reach the public C{/*}.
    """
    etcd_put(etcd.url, "/apisix/routes/public", {"id": "public", "uri": "/*", "upstream": _nodes(upstream)})
    secret = {
        "id": "secret",
        "uri": "/secret/*",
        "plugins": dict(_fa(auth), **{"limit-count": {"count": 10, "time_window": 60}}),
        "upstream": _nodes(upstream),
    }
    etcd_put(etcd.url, "/apisix/routes/secret", secret)
    fleet = await start_fleet(reactor, tmp_path, etcd.urls, count=1)
    try:
        await fleet.synced()
        (g,) = fleet.gateways
        await fleet.all_serve("/other", 200, 2)
        code, body = await fleet.get(g, "/secret/x")
        assert code == 503 and b"up" not in body
        code, health = await fleet.healthz(g)
        assert code == 200 and "routes answering 503 until a valid version arrives (see the log): secret" in health
        response = await fleet.client.get(g.admin_url + "/metrics")
        metrics = (await response.content()).decode()
        assert 'fauth_route_failed_closed{route="secret"} 1.0' in metrics, metrics
        # The admin API shows what etcd holds.
        code, answer = await fleet.admin(g, "GET", "/apisix/admin/routes/secret")
        assert code == 200 and "limit-count" in answer["value"]["plugins"]
        # A valid version replaces it.
        etcd_put(etcd.url, "/apisix/routes/secret", dict(secret, plugins=_fa(auth)))
        await fleet.all_serve("/secret/x", 403, 2)
        assert "answering 503" not in (await fleet.healthz(g))[1]

        # An existing route turned invalid: still its paths, 503.
        etcd_put(etcd.url, "/apisix/routes/secret", dict(secret, uri=5))
        await fleet.all_serve("/secret/x", 503, 2)
        # Deleting it through the admin API works (it is in etcd).
        code, _ = await fleet.admin(g, "DELETE", "/apisix/admin/routes/secret")
        assert code == 200
        await fleet.all_serve("/secret/x", 200, 2)
    finally:
        await stop_fleet(fleet)


@ensureDeferred
async def test_etcd_services_and_plugin_configs_and_their_deletion(
    reactor: Any, tmp_path: Any, etcd: EtcdCluster, auth: str, upstream: str  # noqa: F811
) -> None:
    etcd_put(etcd.url, "/apisix/routes/public", {"id": "public", "uri": "/*", "upstream": _nodes(upstream)})
    etcd_put(etcd.url, "/apisix/services/s", {"id": "s", "plugins": _fa(auth), "upstream": _nodes(upstream)})
    etcd_put(etcd.url, "/apisix/plugin_configs/p", {"id": "p", "plugins": _fa(auth)})
    etcd_put(etcd.url, "/apisix/routes/by-service", {"id": "by-service", "uri": "/s/*", "service_id": "s"})
    etcd_put(
        etcd.url,
        "/apisix/routes/by-pc",
        {"id": "by-pc", "uri": "/p/*", "plugin_config_id": "p", "upstream": _nodes(upstream)},
    )
    fleet = await start_fleet(reactor, tmp_path, etcd.urls, count=1)
    try:
        await fleet.synced()
        (g,) = fleet.gateways
        for path in ("/s/x", "/p/x"):
            await fleet.all_serve(path, 403, 2)
        # The objects they name deleted behind fauth's back (etcdctl): the
        # routes fail closed, never fall to the public route.
        etcdctl(etcd.url, "del", "/apisix/services/s")
        etcdctl(etcd.url, "del", "/apisix/plugin_configs/p")
        await fleet.all_serve("/s/x", 503, 2)
        await fleet.all_serve("/p/x", 503, 2)
        # A route arriving with a service that is not there yet: 503, then
        # served once the service arrives.
        etcd_put(etcd.url, "/apisix/routes/early", {"id": "early", "uri": "/early/*", "service_id": "late"})
        await fleet.all_serve("/early/x", 503, 2)
        etcd_put(etcd.url, "/apisix/services/late", {"id": "late", "plugins": _fa(auth), "upstream": _nodes(upstream)})
        await fleet.all_serve("/early/x", 403, 2)
        # An invalid service: its routes say why.
        etcd_put(etcd.url, "/apisix/services/late", {"id": "late", "plugins": {"key-auth": {}}, "upstream": _nodes(upstream)})
        await fleet.all_serve("/early/x", 503, 2)
        reason = g.service.control.reasons[("routes", "early")]
        assert "service late does not validate: unknown plugin [key-auth]" in reason, reason
        # Fixed through the admin API: the route waiting on it runs as soon as
        # the API answered.
        code, answer = await fleet.admin(
            g, "PUT", "/apisix/admin/services/late", {"plugins": _fa(auth), "upstream": _nodes(upstream)}
        )
        assert code == 200, answer
        assert (await fleet.get(g, "/early/x"))[0] == 403
        # The admin API refuses to delete a service still named, as APISIX.
        code, answer = await fleet.admin(g, "DELETE", "/apisix/admin/services/late")
        assert (code, answer["error_msg"]) == (400, "can not delete this service directly, route [early] is still using it now")
    finally:
        await stop_fleet(fleet)


@ensureDeferred
async def test_etcd_host_bound_route_wins(
    reactor: Any, tmp_path: Any, etcd: EtcdCluster, auth: str, upstream: str  # noqa: F811
) -> None:
    etcd_put(
        etcd.url,
        "/apisix/routes/A",
        {"id": "A", "uri": "/app/*", "hosts": ["admin.example.com"], "plugins": _fa(auth), "upstream": _nodes(upstream)},
    )
    etcd_put(etcd.url, "/apisix/routes/B", {"id": "B", "uri": "/app/public", "upstream": _nodes(upstream)})
    fleet = await start_fleet(reactor, tmp_path, etcd.urls, count=1)
    try:
        await fleet.synced()
        (g,) = fleet.gateways
        await fleet.all_serve("/app/public", 200, 2)
        response = await fleet.client.get(g.url + "/app/public", headers={"Host": "admin.example.com"})
        assert response.code == 403
        await response.content()
    finally:
        await stop_fleet(fleet)
