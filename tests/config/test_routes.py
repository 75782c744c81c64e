"""
Tests for L{fauth.config.routes}: route fields done as APISIX or refused,
services and plugin configs merged as APISIX merges them, and the
fail-closed placeholder of a route that cannot run.
"""
from __future__ import annotations

from typing import Any, Dict

import pytest

from fauth.config import ConfigError, GatewayConf, RouteConf, UpstreamTimeouts, parse_config
from fauth.config.routes import placeholder_route
from fauth.config.schema import SchemaError

UP = {"nodes": {"127.0.0.1:1980": 1}}


def fa(uri: str) -> Dict[str, Any]:
    return {"forward-auth": {"uri": uri}}


def conf(**doc: Any) -> GatewayConf:
    return parse_config(doc)


def one(route: Dict[str, Any], **doc: Any) -> RouteConf:
    full = dict({"id": "r", "uri": "/r"}, **route)
    if not any(k in full for k in ("upstream", "upstream_id", "service_id")):
        full["upstream"] = UP
    (parsed,) = conf(routes=[full], **doc).routes
    return parsed


def test_route_plugins_override_plugin_config_which_override_service() -> None:
    doc = dict(
        services=[{"id": "s", "plugins": fa("http://service/"), "upstream": UP}],
        plugin_configs=[{"id": "p", "plugins": fa("http://plugin-config/")}],
    )
    route = one({"service_id": "s", "plugin_config_id": "p", "plugins": fa("http://route/")}, **doc)
    assert route.forward_auth is not None and route.forward_auth.uri == "http://route/"
    route = one({"service_id": "s", "plugin_config_id": "p"}, **doc)
    assert route.forward_auth is not None and route.forward_auth.uri == "http://plugin-config/"
    route = one({"service_id": "s"}, **doc)
    assert route.forward_auth is not None and route.forward_auth.uri == "http://service/"
    assert (route.service_id, route.plugin_config_id) == ("s", None)
    # Empty plugins on the route: nothing of its own, the service's applies.
    route = one({"service_id": "s", "plugins": {}}, **doc)
    assert route.forward_auth is not None and route.forward_auth.uri == "http://service/"


def test_service_supplies_upstream_hosts_and_websocket_the_route_lacks() -> None:
    doc = dict(
        upstreams=[{"id": "u", "nodes": {"10.0.0.1:80": 1}}],
        services=[{"id": "s", "upstream_id": "u", "hosts": ["Svc.Example"], "enable_websocket": True}],
    )
    route = one({"service_id": "s"}, **doc)
    assert route.upstream is not None and route.upstream.nodes[0].host == "10.0.0.1"
    assert route.hosts == ("svc.example",)
    assert route.enable_websocket is True
    route = one({"service_id": "s", "upstream": UP, "host": "own.example", "enable_websocket": False}, **doc)
    assert route.upstream is not None and route.upstream.nodes[0].host == "127.0.0.1"
    assert route.hosts == ("own.example",)
    assert route.enable_websocket is False


def test_route_timeout_replaces_the_upstreams() -> None:
    route = one({"timeout": {"connect": 1, "send": 2, "read": 3.5}})
    assert route.upstream is not None
    assert route.upstream.timeout == UpstreamTimeouts(1.0, 2.0, 3.5)


@pytest.mark.parametrize(
    "route, message",
    [
        ({"timeout": {"connect": 1, "send": 2}}, 'property "timeout" validation failed: property "read" is required'),
        ({"timeout": {"connect": 0, "send": 1, "read": 1}}, 'property "timeout" validation failed: property "connect"'),
        ({"remote_addr": "1.2.3.4", "remote_addrs": ["1.2.3.4"]}, "only one of remote_addr or remote_addrs is allowed"),
        ({"uri": "/a/*/b/*"}, 'property "uri" validation failed: "/a/*/b/*": a "*" ends the uri'),
        ({"uri": "/a/b*/c"}, 'property "uri" validation failed: "/a/b*/c"'),
        ({"filter_func": "function(vars) return vars.arg_x == 'y' end"}, 'property "filter_func" is not supported'),
        ({"script": "local _M = {} return _M"}, 'property "script" is not supported'),
        ({"script_id": "1"}, 'property "script_id" is not supported'),
        ({"plugins": {"ip-restriction": {"whitelist": ["1.2.3.4"]}}}, "unknown plugin [ip-restriction]"),
        ({"service_id": "s"}, "failed to fetch service info by service id [s], response code: 404"),
        ({"plugin_config_id": "p"}, "failed to fetch plugin config info by plugin config id [p], response code: 404"),
        ({"vars": [["arg_x", "==", "1"]], "status": 2}, 'property "status" validation failed'),
        ({"unknown_field": 1}, "additional properties forbidden, found unknown_field"),
    ],
)
def test_route_fields_refused_in_apisix_words(route: Dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        one(route)
    assert str(caught.value).startswith('route "r": ' + message), str(caught.value)


def test_inert_metadata_accepted() -> None:
    route = one({"name": "n", "desc": "d", "labels": {"team": "a"}, "create_time": 1, "update_time": 2})
    assert route.name == "n"


@pytest.mark.parametrize(
    "route, message",
    [
        ({"name": 5}, 'property "name" validation failed: wrong type: expected string'),
        ({"desc": "x" * 257}, 'property "desc" validation failed: string too long'),
        ({"labels": ["a"]}, 'property "labels" validation failed: wrong type: expected object'),
        ({"labels": {"team": "a b"}}, 'property "labels" validation failed: property "team" validation failed'),
    ],
)
def test_metadata_checked_as_apisix(route: Dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        one(route)
    assert str(caught.value).startswith('route "r": ' + message), str(caught.value)


def test_status_zero_disables() -> None:
    assert one({"status": 0}).enabled is False
    assert one({"status": 1}).enabled is True


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"services": [{"id": "s", "plugins": {"limit-count": {}}}]}, 'service "s": unknown plugin [limit-count]'),
        ({"services": [{"id": "s", "upstream_id": "none"}]}, 'service "s": failed to fetch upstream info by upstream id [none]'),
        ({"services": [{"id": "s", "uri": "/x"}]}, 'service "s": additional properties forbidden, found uri'),
        ({"services": [{"id": "s", "script": "return {}"}]}, 'service "s": property "script" is not supported'),
        ({"plugin_configs": [{"id": "p"}]}, 'plugin_config "p": property "plugins" is required'),
        ({"plugin_configs": [{"id": "p", "plugins": {"cors": {}}}]}, 'plugin_config "p": unknown plugin [cors]'),
        ({"plugin_configs": [{"id": "p", "plugins": {}}, {"id": "p", "plugins": {}}]}, 'plugin_config "p": duplicate id'),
    ],
)
def test_services_and_plugin_configs_refused(doc: Dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(doc)
    assert str(caught.value).startswith(message), str(caught.value)


def test_placeholder_matches_where_the_route_would() -> None:
    doc = {"id": "x", "uris": ["/a", "/b/*"], "hosts": ["H.example"], "methods": ["GET"], "priority": 3,
           "plugins": {"limit-count": {}}}
    placeholder = placeholder_route("x", doc, "unknown plugin [limit-count]")
    assert placeholder is not None
    assert (placeholder.uris, placeholder.hosts, placeholder.methods, placeholder.priority) == (
        ("/a", "/b/*"), ("h.example",), frozenset(["GET"]), 3
    )
    assert placeholder.upstream is None and placeholder.failure == "unknown plugin [limit-count]"
    assert placeholder.enabled


def test_placeholder_where_fields_do_not_read() -> None:
    previous = one({"uri": "/old/*", "hosts": ["old.example"], "priority": 7})
    # Unreadable uri, hosts and priority: the previous version's.
    placeholder = placeholder_route("r", {"uri": 5, "hosts": 7, "priority": "high"}, "bad", previous)
    assert placeholder is not None
    assert (placeholder.uris, placeholder.hosts, placeholder.priority) == (("/old/*",), ("old.example",), 7)
    # Unreadable methods: any method (broader, so closed).
    placeholder = placeholder_route("r", {"uri": "/n", "methods": "GET"}, "bad", previous)
    assert placeholder is not None and placeholder.methods is None and placeholder.hosts is None
    # Nothing to place without a uri, then or now.
    assert placeholder_route("r", [1, 2], "not an object") is None
    # A route the operator disabled stays disabled.
    placeholder = placeholder_route("r", {"uri": "/n", "status": 0, "plugins": {"x": {}}}, "bad")
    assert placeholder is not None and not placeholder.enabled


def test_placeholder_takes_its_service_hosts() -> None:
    services = conf(services=[{"id": "s", "hosts": ["svc.example"], "upstream": UP}]).services
    placeholder = placeholder_route("r", {"uri": "/n", "service_id": "s", "vars": "bad"}, "bad", None, services)
    assert placeholder is not None and placeholder.hosts == ("svc.example",)


def test_parse_route_alone_words_references() -> None:
    from fauth.config import parse_route

    with pytest.raises(SchemaError) as caught:
        parse_route({"id": "r", "uri": "/r", "service_id": 5}, {})
    assert str(caught.value) == "failed to fetch service info by service id [5], response code: 404"
