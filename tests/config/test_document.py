"""Tests for L{fauth.config}: loading, defaults, and one-line refusals."""
from __future__ import annotations

import json
import os
from typing import Any, Dict

import pytest

from fauth.config import (
    ConfigError,
    ForwardAuthConf,
    GatewayConf,
    Node,
    load_config,
    parse_config,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(REPO_ROOT, "conf", "fauth.yaml")


def _route(**overrides: Any) -> Dict[str, Any]:
    route: Dict[str, Any] = {
        "id": "1",
        "uri": "/a",
        "plugins": {"forward-auth": {"uri": "http://127.0.0.1:9999/"}},
        "upstream": {"nodes": {"127.0.0.1:1980": 1}},
    }
    route.update(overrides)
    return route


def _doc(*routes: Dict[str, Any], **top: Any) -> Dict[str, Any]:
    doc: Dict[str, Any] = {"routes": list(routes) or [_route()]}
    doc.update(top)
    return doc


def refusal(doc: Any) -> str:
    """The message of the L{ConfigError} C{doc} is refused with; it is one line."""
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- accepted documents ---------------------------------------------------


def test_quickstart_config_loads() -> None:
    conf = load_config(QUICKSTART)
    assert isinstance(conf, GatewayConf)
    assert conf.listen == ("tcp:9080",)
    assert conf.demo is not None
    assert conf.demo.auth == "tcp:9999:interface=127.0.0.1"
    assert conf.demo.upstream == "tcp:1980:interface=127.0.0.1"
    by_id = {r.id: r for r in conf.routes}
    assert set(by_id) == {"headers", "post"}
    headers = by_id["headers"]
    assert headers.uris == ("/headers",)
    assert headers.methods == frozenset(["GET"])
    assert headers.forward_auth is not None
    assert headers.forward_auth.uri == "http://127.0.0.1:9999/"
    assert headers.forward_auth.request_headers == ("Authorization",)
    assert headers.forward_auth.upstream_headers == ("X-User-ID",)
    assert headers.forward_auth.client_headers == ("Location",)
    assert headers.upstream.nodes == (Node("127.0.0.1", 1980, 1),)
    post = by_id["post"]
    assert post.forward_auth is not None
    assert post.forward_auth.uri == "http://127.0.0.1:9999/auth"
    assert post.forward_auth.extra_headers is not None
    assert [name for name, _ in post.forward_auth.extra_headers] == ["tenant_id"]


def test_defaults() -> None:
    conf = parse_config({"routes": [{"id": "1", "uri": "/a", "plugins": {"forward-auth": {"uri": "https://auth/"}},
                                     "upstream": {"nodes": {"127.0.0.1:1980": 1}}}]})
    assert conf.listen == ("tcp:9080",)
    assert conf.demo is None
    assert dict(conf.upstreams) == {}
    (route,) = conf.routes
    assert route.priority == 0
    assert route.methods is None
    assert route.hosts is None
    assert route.enabled is True
    assert route.upstream.scheme == "http"
    assert route.upstream.type == "roundrobin"
    assert route.forward_auth == ForwardAuthConf(
        uri="https://auth/",
        ssl_verify=True,
        request_method="GET",
        max_req_body_size=67108864,
        request_headers=(),
        extra_headers=None,
        upstream_headers=(),
        client_headers=(),
        timeout=3000,
        keepalive=True,
        keepalive_timeout=60000,
        keepalive_pool=5,
        allow_degradation=False,
        status_on_error=403,
    )


def test_empty_document_is_default_config() -> None:
    conf = parse_config(None)
    assert conf.listen == ("tcp:9080",)
    assert conf.routes == ()


def test_uri_and_uris() -> None:
    conf = parse_config(_doc(_route(id="1", uri="/one")))
    assert conf.routes[0].uris == ("/one",)
    doc = _doc(_route(id="1"))
    del doc["routes"][0]["uri"]
    doc["routes"][0]["uris"] = ["/x", "/y/*"]
    assert parse_config(doc).routes[0].uris == ("/x", "/y/*")


def test_uri_and_uris_together_refused() -> None:
    message = refusal(_doc(_route(uris=["/b"])))
    assert message.startswith('route "1": ')
    assert '"uri"' in message and '"uris"' in message


def test_upstream_id_resolution() -> None:
    route = _route()
    del route["upstream"]
    route["upstream_id"] = "echo"
    conf = parse_config(
        {
            "upstreams": [{"id": "echo", "nodes": {"127.0.0.1:1980": 2}}],
            "routes": [route],
        }
    )
    assert conf.upstreams["echo"].nodes == (Node("127.0.0.1", 1980, 2),)
    assert conf.routes[0].upstream is conf.upstreams["echo"]
    assert conf.routes[0].upstream.id == "echo"


def test_nodes_as_dict() -> None:
    conf = parse_config(_doc(_route(upstream={"nodes": {"127.0.0.1:1980": 1, "example.com": 3}})))
    assert conf.routes[0].upstream.nodes == (Node("127.0.0.1", 1980, 1), Node("example.com", 80, 3))


def test_nodes_as_list() -> None:
    nodes = [{"host": "127.0.0.1", "port": 1980, "weight": 2}, {"host": "example.com"}]
    conf = parse_config(_doc(_route(upstream={"scheme": "https", "nodes": nodes})))
    assert conf.routes[0].upstream.nodes == (Node("127.0.0.1", 1980, 2), Node("example.com", 443, 1))


def test_ipv6_node() -> None:
    conf = parse_config(_doc(_route(upstream={"nodes": {"[::1]:80": 1}})))
    (node,) = conf.routes[0].upstream.nodes
    assert node == Node("::1", 80, 1)
    assert node.netloc == "[::1]:80"


def test_json_config_file_accepted(tmp_path: Any) -> None:
    path = tmp_path / "fauth.json"
    # Tab-indented, as many editors write JSON; and a number in exponent form.
    doc = _doc(_route(plugins={"forward-auth": {"uri": "http://127.0.0.1:9999/"}}))
    text = json.dumps(doc, indent="\t")
    text = text.replace('"127.0.0.1:1980": 1', '"127.0.0.1:1980": 1e0')
    path.write_text(text)
    conf = load_config(str(path))
    assert conf.routes[0].id == "1"
    assert conf.routes[0].forward_auth is not None
    assert conf.routes[0].forward_auth.uri == "http://127.0.0.1:9999/"
    assert conf.routes[0].upstream.nodes == (Node("127.0.0.1", 1980, 1),)


def test_yaml_file_loaded(tmp_path: Any) -> None:
    path = tmp_path / "fauth.yaml"
    path.write_text(
        "listen: tcp:0\nroutes:\n  - id: 7\n    uri: /y\n    upstream:\n      nodes: {'127.0.0.1:1': 1}\n"
    )
    conf = load_config(str(path))
    assert conf.listen == ("tcp:0",)
    assert conf.routes[0].id == "7"
    assert conf.routes[0].forward_auth is None


# --- refusals ---------------------------------------------------------------


def test_bad_forward_auth_timeout() -> None:
    doc = _doc(_route(plugins={"forward-auth": {"uri": "http://a/", "timeout": 0}}))
    assert refusal(doc) == (
        'route "1": plugin forward-auth: property "timeout" validation failed: expected 0 to be at least 1'
    )


def test_missing_uri() -> None:
    route = _route()
    del route["uri"]
    assert refusal(_doc(route)) == 'route "1": property "uri" is required'


def test_missing_forward_auth_uri() -> None:
    doc = _doc(_route(plugins={"forward-auth": {"timeout": 10}}))
    assert refusal(doc) == 'route "1": plugin forward-auth: property "uri" is required'


def test_unknown_plugin() -> None:
    assert refusal(_doc(_route(plugins={"key-auth": {}}))) == 'route "1": unknown plugin [key-auth]'


def test_unknown_top_level_key() -> None:
    message = refusal(_doc(bogus=1))
    assert message.startswith("config: ")
    assert '"bogus"' in message


def test_unknown_route_key() -> None:
    message = refusal(_doc(_route(bogus=1)))
    assert message.startswith('route "1": ')
    assert "bogus" in message


def test_bad_listen_endpoint() -> None:
    message = refusal(_doc(listen=["tcp:abc"]))
    assert "listen" in message
    assert '"tcp:abc"' in message


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "host with space:80"])
def test_bad_node_address(address: str) -> None:
    message = refusal(_doc(_route(id="n1", upstream={"nodes": {address: 1}})))
    assert message.startswith('route "n1": ')
    assert '"nodes"' in message
    assert address in message


def test_bad_node_host_in_list_form() -> None:
    message = refusal(_doc(_route(upstream={"nodes": [{"host": "host with space", "port": 80}]})))
    assert message.startswith('route "1": ')
    assert '"nodes"' in message
    assert "host with space" in message


def test_unknown_upstream_id() -> None:
    route = _route()
    del route["upstream"]
    route["upstream_id"] = "nope"
    message = refusal(_doc(route))
    assert message.startswith('route "1": ')
    assert "upstream id [nope]" in message


def test_duplicate_route_id() -> None:
    message = refusal(_doc(_route(uri="/a"), _route(uri="/b")))
    assert message == 'route "1": duplicate id'


def test_routes_and_upstreams_without_id_named_by_position_as_apisix_standalone() -> None:
    route = _route()
    del route["id"]
    conf = parse_config(dict(_doc(_route(id="first"), route, dict(route, uri="/later")),
                             upstreams=[{"nodes": {"127.0.0.1:9": 1}}]))
    assert [r.id for r in conf.routes] == ["first", "arr_2", "arr_3"]
    assert list(conf.upstreams) == ["arr_1"]
    named = dict(route, upstream_id="arr_1")
    del named["upstream"]
    conf = parse_config(dict(_doc(named), upstreams=[{"nodes": {"127.0.0.1:9": 1}}]))
    assert conf.routes[0].upstream.id == "arr_1"
    conf = parse_config(dict(_doc(dict(named, service_id="arr_1")), upstreams=[{"nodes": {"127.0.0.1:9": 1}}],
                             services=[{"plugins": {}}]))
    assert list(conf.services) == ["arr_1"]
    # The name is the one errors and duplicates go by.
    assert refusal(_doc(route, _route(id="arr_1"))) == 'route "arr_1": duplicate id'
    assert refusal(_doc(dict(route, uri="nope"))).startswith('route "arr_1": property "uri"')


def test_invalid_yaml_reports_file_name(tmp_path: Any) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("routes: [\n  - id: 1\n   uri: x: y\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert "YAML" in message


def test_missing_file(tmp_path: Any) -> None:
    path = str(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert path in message
    assert "No such file" in message



# --- refusing what can only be a mistake ------------------------------------------------


def _auth_route(**plugin: Any) -> Dict[str, Any]:
    conf: Dict[str, Any] = {"uri": "http://127.0.0.1:9999/"}
    conf.update(plugin)
    return _route(plugins={"forward-auth": conf})


@pytest.mark.parametrize("prop", ["request_headers", "upstream_headers", "client_headers"])
@pytest.mark.parametrize("name", ["X Foo", "X-Foo\r\nEvil: 1", "", "X:Foo", "Ünï"])
def test_header_lists_take_only_header_names(prop: str, name: str) -> None:
    message = refusal(_doc(_auth_route(**{prop: ["X-Ok", name]})))
    shown = name if name.isprintable() else name.encode("unicode_escape").decode("ascii")
    assert message == (
        'route "1": plugin forward-auth: property "%s" validation failed: '
        'failed to validate item 2: invalid header name "%s"' % (prop, shown)
    )


def test_header_list_message() -> None:
    assert refusal(_doc(_auth_route(upstream_headers=["X Foo"]))) == (
        'route "1": plugin forward-auth: property "upstream_headers" validation failed: '
        'failed to validate item 1: invalid header name "X Foo"'
    )


def test_extra_headers_keys_stay_as_apisix() -> None:
    # APISIX accepts any key containing ':' there; it fails at call time.
    parse_config(_doc(_auth_route(extra_headers={"X:Foo": "v"})))


@pytest.mark.parametrize(
    "host", ["a..b", "example.com\r\nX-Evil: 1", "example.com\n", "exa mple.com", "[fe80::1%a\r\nb]", "h:0", "h:x"]
)
def test_upstream_host_must_be_host_and_port(host: str) -> None:
    route = _route(upstream={"nodes": {"127.0.0.1:1980": 1}, "pass_host": "rewrite", "upstream_host": host})
    assert 'property "upstream_host" validation failed: invalid host' in refusal(_doc(route))


@pytest.mark.parametrize("host", ["example.com", "example.com:8080", "[::1]:8080", "10.0.0.1"])
def test_upstream_host_accepts_host_and_port(host: str) -> None:
    route = _route(upstream={"nodes": {"127.0.0.1:1980": 1}, "pass_host": "rewrite", "upstream_host": host})
    assert parse_config(_doc(route)).routes[0].upstream.upstream_host == host


@pytest.mark.parametrize("address", ["example.com\n", "[fe80::1%eth0\n]", "127.0.0.1:\u0668\u0660"])
def test_node_address_refuses_control_and_non_ascii(address: str) -> None:
    route = _route(upstream={"nodes": {address: 1}})
    assert 'property "nodes" validation failed: invalid node address' in refusal(_doc(route))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", ["connect", "send", "read"])
def test_upstream_timeouts_must_be_finite(value: float, which: str) -> None:
    route = _route(upstream={"nodes": {"127.0.0.1:1980": 1}, "timeout": {which: value}})
    assert 'property "timeout" validation failed' in refusal(_doc(route))


@pytest.mark.parametrize("field", ["shutdown_grace", "workers"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_other_numbers_must_be_finite(field: str, value: float) -> None:
    assert 'property "%s"' % field in refusal(_doc(**{field: value}))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_keepalive_pool_size_must_be_finite(value: float) -> None:
    route = _route(upstream={"nodes": {"127.0.0.1:1980": 1}, "keepalive_pool": {"size": value}})
    assert 'property "keepalive_pool" validation failed' in refusal(_doc(route))


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_file_refuses_nan_and_infinity(tmp_path: Any, constant: str) -> None:
    path = tmp_path / "fauth.json"
    path.write_text(
        '{"routes": [{"id": "1", "uri": "/a", "upstream": {"nodes": {"127.0.0.1:1980": 1},'
        ' "timeout": {"read": %s}}}]}' % constant
    )
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == "config: %s: %s is not a number (JSON has no NaN or Infinity)" % (path, constant)


@pytest.mark.parametrize("constant", [".nan", ".inf", "-.inf"])
def test_yaml_file_refuses_nan_and_infinity(tmp_path: Any, constant: str) -> None:
    path = tmp_path / "fauth.yaml"
    path.write_text(
        "routes:\n- id: '1'\n  uri: /a\n  upstream:\n    nodes: {'127.0.0.1:1980': 1}\n"
        "    timeout: {read: %s}\n" % constant
    )
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert 'property "timeout" validation failed' in str(info.value)


def test_degradation_with_upstream_headers_warns() -> None:
    warning = (
        "allow_degradation with upstream_headers: a degraded request keeps the client's own values "
        "of those headers"
    )
    conf = parse_config(_doc(_auth_route(allow_degradation=True, upstream_headers=["X-User-ID"])))
    assert warning in conf.routes[0].forward_auth.warnings  # type: ignore[union-attr]
    for plugin in ({"allow_degradation": True}, {"upstream_headers": ["X-User-ID"]}):
        conf = parse_config(_doc(_auth_route(**plugin)))
        assert warning not in conf.routes[0].forward_auth.warnings  # type: ignore[union-attr]


@pytest.mark.parametrize("host", ["example.com\n", "*.example.com\n"])
def test_route_hosts_are_matched_whole(host: str) -> None:
    # "$" in a regular expression also matches before a final newline.
    assert 'property "hosts" validation failed: invalid host' in refusal(_doc(_route(hosts=[host])))


@pytest.mark.parametrize(
    "value, size",
    [(0, 0), (1048576, 1048576), ("0", 0), ("512k", 512 * 1024), ("10m", 10 * 1024**2), ("1G", 1024**3), ("77", 77)],
)
def test_client_max_body_size_takes_bytes_or_nginx_sizes(value: Any, size: int) -> None:
    assert parse_config(_doc(_route(), client_max_body_size=value)).http.client_max_body_size == size


def test_client_max_body_size_defaults_to_no_limit() -> None:
    assert parse_config(_doc(_route())).http.client_max_body_size == 0


@pytest.mark.parametrize("value", [-1, "1x", "m", "1.5m", True, 1.5, [], "1 m\n"])
def test_client_max_body_size_refuses_other_values(value: Any) -> None:
    assert "client_max_body_size" in refusal(_doc(_route(), client_max_body_size=value))


def test_client_max_body_size_is_top_level_only() -> None:
    assert 'unknown key "client_max_body_size"' in refusal(_doc(_route(), http={"client_max_body_size": 1}))


def test_enable_websocket_is_a_boolean_of_the_route() -> None:
    from fauth.config.routes import parse_route
    from fauth.config.schema import SchemaError

    base = {"id": "1", "uri": "/ws", "upstream": {"nodes": {"127.0.0.1:1980": 1}}}
    assert parse_route(dict(base), {}).enable_websocket is False
    assert parse_route(dict(base, enable_websocket=True), {}).enable_websocket is True
    with pytest.raises(SchemaError, match='property "enable_websocket" validation failed: wrong type: expected boolean'):
        parse_route(dict(base, enable_websocket="yes"), {})


def test_http2_is_a_boolean_off_by_default_and_streams_a_positive_integer() -> None:
    assert parse_config({"routes": []}).http.http2 is False
    conf = parse_config({"routes": [], "http": {"http2": True, "max_concurrent_streams": 50}})
    assert (conf.http.http2, conf.http.max_concurrent_streams) == (True, 50)
    assert refusal({"routes": [], "http": {"http2": 1}}) == 'config: http: property "http2" must be a boolean'
    assert refusal({"routes": [], "http": {"max_concurrent_streams": 1.5}}) == (
        'config: http: property "max_concurrent_streams" must be a positive integer'
    )


def test_a_hardened_site_alone_offers_http11_only_over_alpn() -> None:
    # Twisted's Site offers h2 whenever h2 is installed; the hardened
    # channel is HTTP/1.1 only, and the gateway's site offers h2 only when
    # http2 is on.
    from twisted.web.resource import Resource

    from fauth.config import HttpLimits
    from fauth.edge.resources import GatewaySite
    from fauth.edge.server import HardenedSite

    assert HardenedSite(Resource()).acceptableProtocols() == [b"http/1.1"]
    assert GatewaySite(Resource()).acceptableProtocols() == [b"http/1.1"]
    assert GatewaySite(Resource(), HttpLimits(http2=True)).acceptableProtocols() == [b"h2", b"http/1.1"]
