"""
The admin API on a real loopback listener, in front of a real gateway:
every verb, every refusal (with APISIX's wording), the seed examples, and
the C{admin} section of the configuration.
"""
from __future__ import annotations

import json
import os
import subprocess
from typing import Any, AsyncIterator, Dict

import attr
import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred

from fauth.admin.api import key_matches
from fauth.config import AdminConf, ConfigError, parse_config
from fauth.admin.objects import merge_patch
from fauth.process.demo import DemoAuthResource, EchoResource
from tests.adminenv import KEY, TWISTD, AdminEnv, Marker, REPO_ROOT, refused_start_line, start_admin_env, subprocess_env
from tests.servers import listen_on_loopback, port_url

PLUGIN_URI_REQUIRED = (
    'failed to check the configuration of plugin forward-auth err: property "uri" is required'
)




@attr.s(auto_attribs=True)
class World:
    """The gateway under test plus the services its routes point at."""

    env: AdminEnv
    auth_url: str
    echo_node: str
    marker_node: str

    def seed_route(self, **extra: Any) -> Dict[str, Any]:
        """The seed's route 1 (forward-auth to the demo auth service, upstream the echo)."""
        route: Dict[str, Any] = {
            "uri": "/headers",
            "plugins": {
                "forward-auth": {
                    "uri": self.auth_url,
                    "request_headers": ["Authorization"],
                    "upstream_headers": ["X-User-ID"],
                    "client_headers": ["Location"],
                }
            },
            "upstream": {"nodes": {self.echo_node: 1}, "type": "roundrobin"},
        }
        route.update(extra)
        return route


@async_yield_fixture
async def world(reactor: Any, tmp_path: Any) -> AsyncIterator[World]:
    auth = await listen_on_loopback(reactor, DemoAuthResource())
    echo = await listen_on_loopback(reactor, EchoResource())
    marker = await listen_on_loopback(reactor, Marker(b"file"))
    echo_node = "127.0.0.1:%d" % echo.getHost().port
    marker_node = "127.0.0.1:%d" % marker.getHost().port
    doc = {
        "upstreams": [{"id": "echo", "nodes": {echo_node: 1}}],
        "routes": [{"id": "file-1", "uri": "/file", "upstream": {"nodes": {marker_node: 1}}}],
    }
    env = await start_admin_env(reactor, tmp_path, doc)
    try:
        yield World(env, port_url(auth, "/"), echo_node, marker_node)
    finally:
        await env.stop()
        for port in (auth, echo, marker):
            await port.stopListening()


# --- the key ----------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "wrong", KEY + "x", ""])
@ensureDeferred
async def test_missing_or_wrong_key_is_401(world: World, key: Any) -> None:
    for method, path in [
        ("GET", "/apisix/admin/routes"),
        ("GET", "/apisix/admin/routes/1"),
        ("PUT", "/apisix/admin/routes/1"),
        ("DELETE", "/apisix/admin/upstreams/echo"),
        ("POST", "/apisix/admin/reload"),
        ("GET", "/anything/else"),
        ("GET", "/"),
    ]:
        code, body = await world.env.admin(method, path, world.seed_route(), key=key)
        assert (code, body) == (401, {"error_msg": "failed to check token"}), (method, path)
    assert not os.path.exists(world.env.store_path)


@ensureDeferred
async def test_healthz_needs_no_key(world: World) -> None:
    code, body = await world.env.admin("GET", "/healthz", key=None)
    assert (code, body) == (200, b"ok")


@ensureDeferred
async def test_unknown_admin_path_is_404_with_key(world: World) -> None:
    code, body = await world.env.admin("GET", "/nothing")
    assert code == 404
    code, body = await world.env.admin("GET", "/apisix/admin/consumers")
    assert code == 404
    assert "consumers" in body["error_msg"]


def test_key_comparison() -> None:
    keys = [b"one", b"two"]
    assert key_matches(b"two", keys)
    assert key_matches(b"one", keys)
    assert not key_matches(b"three", keys)
    assert not key_matches(b"", keys)
    assert not key_matches(None, keys)


# --- the seed examples --------------------------------------------------------


@ensureDeferred
async def test_seed_put_route_with_forward_auth_then_without(world: World) -> None:
    env = world.env
    # curl -X PUT 127.0.0.1:9180/apisix/admin/routes/1 -H 'X-API-KEY: …' -d '{…forward-auth…}'
    code, body = await env.admin("PUT", "/apisix/admin/routes/1", world.seed_route())
    assert code == 201
    assert body["key"] == "/apisix/routes/1"
    assert body["value"]["id"] == "1"
    assert body["value"]["plugins"]["forward-auth"]["uri"] == world.auth_url

    code, content, _ = await env.get("/headers", {"Authorization": "321"})
    assert code == 200
    assert json.loads(content)["headers"]["X-User-Id"] == "i-am-user"
    code, _, headers = await env.get("/headers")
    assert code == 403
    assert headers.getRawHeaders(b"location") == [b"http://example.com/auth"]

    # "Delete the plugin": the same route with "plugins": {} -- the very next
    # request goes through unauthenticated, no restart.
    code, body = await env.admin("PUT", "/apisix/admin/routes/1", world.seed_route(plugins={}))
    assert code == 200
    assert body["value"]["plugins"] == {}
    code, content, _ = await env.get("/headers")
    assert code == 200
    assert "X-User-Id" not in json.loads(content)["headers"]


# --- each verb ----------------------------------------------------------------


@ensureDeferred
async def test_put_creates_then_updates_keeping_create_time(world: World) -> None:
    env = world.env
    code, first = await env.admin("PUT", "/apisix/admin/routes/r1", world.seed_route(plugins={}))
    assert code == 201
    value = first["value"]
    assert isinstance(value["create_time"], int) and value["create_time"] == value["update_time"]
    code, second = await env.admin("PUT", "/apisix/admin/routes/r1", world.seed_route(plugins={}, name="n"))
    assert code == 200
    assert second["value"]["name"] == "n"
    assert second["value"]["create_time"] == value["create_time"]
    # A body id equal to the URL id is fine (a number too).
    code, _ = await env.admin("PUT", "/apisix/admin/routes/7", world.seed_route(id=7, uri="/seven"))
    assert code == 201


@ensureDeferred
async def test_get_one_and_list(world: World) -> None:
    env = world.env
    await env.admin("PUT", "/apisix/admin/routes/1", world.seed_route())
    code, body = await env.admin("GET", "/apisix/admin/routes/1")
    assert code == 200
    assert body["key"] == "/apisix/routes/1"
    assert body["value"]["uri"] == "/headers"
    assert body["source"] == "api"

    code, body = await env.admin("GET", "/apisix/admin/routes")
    assert code == 200
    assert body["total"] == 2 == len(body["list"])
    assert [(item["key"], item["source"]) for item in body["list"]] == [
        ("/apisix/routes/file-1", "file"),
        ("/apisix/routes/1", "api"),
    ]
    code, body = await env.admin("GET", "/apisix/admin/upstreams/")
    assert code == 200
    assert body["total"] == 1
    assert body["list"][0]["value"]["id"] == "echo"


@ensureDeferred
async def test_unknown_id_is_404(world: World) -> None:
    env = world.env
    for method in ("GET", "DELETE", "PATCH"):
        code, body = await env.admin(method, "/apisix/admin/routes/nope", {"name": "x"})
        assert code == 404, method
        assert body == {"message": "Key not found"}
    code, body = await env.admin("GET", "/apisix/admin/upstreams/nope")
    assert (code, body) == (404, {"message": "Key not found"})


@ensureDeferred
async def test_delete_route(world: World) -> None:
    env = world.env
    await env.admin("PUT", "/apisix/admin/routes/1", world.seed_route(plugins={}))
    assert (await env.get("/headers"))[0] == 200
    code, body = await env.admin("DELETE", "/apisix/admin/routes/1")
    assert (code, body) == (200, {"key": "/apisix/routes/1", "deleted": "1"})
    assert (await env.admin("GET", "/apisix/admin/routes/1"))[0] == 404
    code, content, _ = await env.get("/headers")
    assert code == 404
    with open(env.store_path) as f:
        assert json.load(f) == {"routes": {}, "upstreams": {}, "meta": {"revision": 2, "routes": {}, "upstreams": {}}}


@ensureDeferred
async def test_post_generates_ids(world: World) -> None:
    env = world.env
    code, first = await env.admin("POST", "/apisix/admin/routes", world.seed_route(plugins={}))
    assert code == 201
    code, second = await env.admin("POST", "/apisix/admin/routes", world.seed_route(plugins={}, uri="/b"))
    assert code == 201
    ids = [first["value"]["id"], second["value"]["id"]]
    assert ids[0] != ids[1]
    for doc_id, answer in zip(ids, (first, second)):
        assert answer["key"] == "/apisix/routes/" + doc_id
        assert (await env.admin("GET", "/apisix/admin/routes/" + doc_id))[0] == 200
    code, body = await env.admin("POST", "/apisix/admin/routes", world.seed_route(id="mine"))
    assert (code, body) == (400, {"error_msg": "wrong route id, do not need it"})
    code, up = await env.admin("POST", "/apisix/admin/upstreams", {"nodes": {world.echo_node: 1}})
    assert code == 201
    assert up["key"] == "/apisix/upstreams/" + up["value"]["id"]


@ensureDeferred
async def test_patch_is_a_json_merge_patch(world: World) -> None:
    env = world.env
    await env.admin("PUT", "/apisix/admin/routes/1", world.seed_route(name="before", desc="gone soon"))
    patch = {"name": "after", "desc": None, "plugins": {"forward-auth": {"client_headers": None, "timeout": 2000}}}
    code, body = await env.admin("PATCH", "/apisix/admin/routes/1", patch)
    assert code == 200
    value = body["value"]
    assert value["name"] == "after"
    assert "desc" not in value
    auth = value["plugins"]["forward-auth"]
    assert auth["timeout"] == 2000
    assert "client_headers" not in auth
    assert auth["request_headers"] == ["Authorization"]
    # Effective at once: the denial no longer carries Location.
    code, _, headers = await env.get("/headers")
    assert code == 403
    assert not headers.hasHeader(b"location")

    # Removing the plugin's uri is validated like a PUT, and changes nothing.
    code, body = await env.admin("PATCH", "/apisix/admin/routes/1", {"plugins": {"forward-auth": {"uri": None}}})
    assert (code, body) == (400, {"error_msg": PLUGIN_URI_REQUIRED})
    code, body = await env.admin("GET", "/apisix/admin/routes/1")
    assert body["value"]["plugins"]["forward-auth"]["uri"] == world.auth_url

    # Dropping the whole plugin with null.
    code, body = await env.admin("PATCH", "/apisix/admin/routes/1", {"plugins": {"forward-auth": None}})
    assert code == 200
    assert (await env.get("/headers"))[0] == 200


def test_merge_patch_rfc7396_examples() -> None:
    # RFC 7396, appendix A.
    assert merge_patch({"a": "b"}, {"a": "c"}) == {"a": "c"}
    assert merge_patch({"a": "b"}, {"b": "c"}) == {"a": "b", "b": "c"}
    assert merge_patch({"a": "b"}, {"a": None}) == {}
    assert merge_patch({"a": "b", "b": "c"}, {"a": None}) == {"b": "c"}
    assert merge_patch({"a": ["b"]}, {"a": "c"}) == {"a": "c"}
    assert merge_patch({"a": "c"}, {"a": ["b"]}) == {"a": ["b"]}
    assert merge_patch({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}) == {"a": {"b": "d"}}
    assert merge_patch({"a": [{"b": "c"}]}, {"a": [1]}) == {"a": [1]}
    assert merge_patch(["a", "b"], ["c", "d"]) == ["c", "d"]
    assert merge_patch({"a": "b"}, ["c"]) == ["c"]
    assert merge_patch({"a": "foo"}, None) is None
    assert merge_patch({"a": "foo"}, "bar") == "bar"
    assert merge_patch({"e": None}, {"a": 1}) == {"e": None, "a": 1}
    assert merge_patch([1, 2], {"a": "b", "c": None}) == {"a": "b"}
    assert merge_patch({}, {"a": {"bb": {"ccc": None}}}) == {"a": {"bb": {}}}


@ensureDeferred
async def test_upstreams_crud_and_cross_references(world: World) -> None:
    env = world.env
    code, body = await env.admin("PUT", "/apisix/admin/upstreams/u1", {"nodes": {world.marker_node: 1}})
    assert code == 201
    assert body == {"key": "/apisix/upstreams/u1", "value": body["value"], "createdIndex": 1, "modifiedIndex": 1}
    # An API route on an API upstream, and one on the file's upstream.
    route = {"uri": "/m", "upstream_id": "u1"}
    assert (await env.admin("PUT", "/apisix/admin/routes/m", route))[0] == 201
    assert (await env.admin("PUT", "/apisix/admin/routes/e", {"uri": "/headers", "upstream_id": "echo"}))[0] == 201
    code, content, _ = await env.get("/m")
    assert (code, content) == (200, b"file")
    assert (await env.get("/headers"))[0] == 200
    # Re-pointing the upstream changes the routes using it.
    code, _ = await env.admin("PUT", "/apisix/admin/upstreams/u1", {"nodes": {world.echo_node: 1}})
    assert code == 200
    code, content, _ = await env.get("/m")
    assert code == 404  # the echo server has no /m
    # A route naming an upstream nobody defines.
    code, body = await env.admin("PUT", "/apisix/admin/routes/x", {"uri": "/x", "upstream_id": "ghost"})
    assert (code, body) == (400, {"error_msg": "failed to fetch upstream info by upstream id [ghost]"})
    code, body = await env.admin("PUT", "/apisix/admin/upstreams/bad", {"nodes": {}})
    assert code == 400
    assert body["error_msg"].startswith('invalid configuration: property "nodes"')


@ensureDeferred
async def test_delete_upstream_in_use_is_refused(world: World) -> None:
    env = world.env
    await env.admin("PUT", "/apisix/admin/upstreams/u1", {"nodes": {world.marker_node: 1}})
    await env.admin("PUT", "/apisix/admin/routes/1", {"uri": "/m", "upstream_id": "u1"})
    code, body = await env.admin("DELETE", "/apisix/admin/upstreams/u1")
    assert (code, body) == (400, {"error_msg": "can not delete this upstream, route [1] is still using it now"})
    assert (await env.get("/m"))[0] == 200
    assert (await env.admin("DELETE", "/apisix/admin/routes/1"))[0] == 200
    code, body = await env.admin("DELETE", "/apisix/admin/upstreams/u1")
    assert (code, body) == (200, {"key": "/apisix/upstreams/u1", "deleted": "1"})


# --- refusals -------------------------------------------------------------------


@ensureDeferred
async def test_plugin_error_has_apisix_wording_and_writes_nothing(world: World) -> None:
    env = world.env
    await env.admin("PUT", "/apisix/admin/routes/1", world.seed_route(plugins={}))
    with open(env.store_path, "rb") as f:
        before = f.read()
    bad = world.seed_route(plugins={"forward-auth": {"request_headers": ["Authorization"]}})
    code, body = await env.admin("PUT", "/apisix/admin/routes/1", bad)
    assert (code, body) == (400, {"error_msg": PLUGIN_URI_REQUIRED})
    code, body = await env.admin("PUT", "/apisix/admin/routes/2", bad)
    assert code == 400
    with open(env.store_path, "rb") as f:
        assert f.read() == before
    # The running table is the old one: route 1 still passes unauthenticated.
    assert (await env.get("/headers"))[0] == 200
    code, body = await env.admin("PUT", "/apisix/admin/routes/1", world.seed_route(plugins={"forward-auth": {"uri": "http://a/", "timeout": 0}}))
    assert (code, body) == (
        400,
        {
            "error_msg": "failed to check the configuration of plugin forward-auth err: "
            'property "timeout" validation failed: expected 0 to be at least 1'
        },
    )


@ensureDeferred
async def test_unknown_plugin(world: World) -> None:
    route = world.seed_route(plugins={"serverless-pre-function": {"phase": "rewrite"}})
    code, body = await world.env.admin("PUT", "/apisix/admin/routes/1", route)
    assert (code, body) == (400, {"error_msg": "unknown plugin [serverless-pre-function]"})


@pytest.mark.parametrize(
    "raw", [b"", b"{", b'{"uri": "/a",}', b"\xff\xfe", b'{"priority": NaN}', b'{"plugins": {"forward-auth": {"x": 1e400}}}']
)
@ensureDeferred
async def test_malformed_json(world: World, raw: bytes) -> None:
    for method, path in [("PUT", "/apisix/admin/routes/1"), ("POST", "/apisix/admin/routes")]:
        code, body = await world.env.admin(method, path, raw=raw)
        assert code == 400
        assert body["error_msg"].startswith("invalid request body: ")
    assert not os.path.exists(world.env.store_path)


@ensureDeferred
async def test_not_an_object_and_bad_schema(world: World) -> None:
    env = world.env
    code, body = await env.admin("PUT", "/apisix/admin/routes/1", raw=b"[1]")
    assert code == 400
    assert body["error_msg"].startswith("invalid configuration")
    code, body = await env.admin("PUT", "/apisix/admin/routes/1", world.seed_route(bogus=1))
    assert (code, body) == (400, {"error_msg": "invalid configuration: additional properties forbidden, found bogus"})
    code, body = await env.admin("PUT", "/apisix/admin/routes/1", world.seed_route(create_time="yesterday"))
    assert (code, body) == (400, {"error_msg": "the property is forbidden:  create_time"})
    # As APISIX: the gateway stamps PUT and POST; only a PATCH may give the times.
    code, body = await env.admin("POST", "/apisix/admin/upstreams", {"nodes": {world.echo_node: 1}, "update_time": 1})
    assert (code, body) == (400, {"error_msg": "the property is forbidden:  update_time"})
    route = world.seed_route()
    route["upstream"]["create_time"] = 1
    code, body = await env.admin("PUT", "/apisix/admin/routes/1", route)
    assert (code, body) == (400, {"error_msg": "the property is forbidden:  upstream.create_time"})
    assert (await env.admin("PUT", "/apisix/admin/routes/1", world.seed_route()))[0] == 201
    code, body = await env.admin("PATCH", "/apisix/admin/routes/1", {"create_time": 1000, "update_time": 2000})
    assert (code, body["value"]["create_time"], body["value"]["update_time"]) == (200, 1000, 2000)


@ensureDeferred
async def test_body_id_differs_from_url_id(world: World) -> None:
    env = world.env
    code, body = await env.admin("PUT", "/apisix/admin/routes/1", world.seed_route(id="2"))
    assert (code, body) == (400, {"error_msg": "wrong route id"})
    await env.admin("PUT", "/apisix/admin/routes/1", world.seed_route())
    code, body = await env.admin("PATCH", "/apisix/admin/routes/1", {"id": "2"})
    assert (code, body) == (400, {"error_msg": "wrong route id"})
    code, body = await env.admin("PUT", "/apisix/admin/upstreams/u", {"id": "v", "nodes": {world.echo_node: 1}})
    assert (code, body) == (400, {"error_msg": "wrong upstream id"})


@ensureDeferred
async def test_bad_url_id(world: World) -> None:
    code, body = await world.env.admin("PUT", "/apisix/admin/routes/a%20b", world.seed_route())
    assert code == 400
    assert 'property "id"' in body["error_msg"]


@ensureDeferred
@pytest.mark.parametrize("bad", ["a%0A", "a%0D%0A", "%0Aa"])
async def test_ids_are_matched_whole(world: World, bad: str) -> None:
    # "$" in a regular expression also matches before a final newline.
    code, body = await world.env.admin("PUT", "/apisix/admin/routes/" + bad, world.seed_route())
    assert code == 400
    assert 'property "id"' in body["error_msg"]


@ensureDeferred
async def test_file_owned_ids_are_409(world: World) -> None:
    env = world.env
    message = "route file-1 is defined in the configuration file %s; edit the file and reload" % env.config_path
    for method in ("PUT", "PATCH", "DELETE"):
        code, body = await env.admin(method, "/apisix/admin/routes/file-1", world.seed_route())
        assert (code, body) == (409, {"error_msg": message}), method
    code, body = await env.admin("DELETE", "/apisix/admin/upstreams/echo")
    assert code == 409
    assert body["error_msg"].startswith("upstream echo is defined in the configuration file ")
    # Readable, though, and still served.
    code, body = await env.admin("GET", "/apisix/admin/routes/file-1")
    assert (code, body["source"]) == (200, "file")
    assert (await env.get("/file"))[1] == b"file"


@ensureDeferred
async def test_method_not_allowed(world: World) -> None:
    code, body = await world.env.admin("DELETE", "/apisix/admin/routes")
    assert code == 405
    code, body = await world.env.admin("GET", "/apisix/admin/reload")
    assert code == 405


# --- configuration ----------------------------------------------------------------


def _admin_doc(**admin: Any) -> Dict[str, Any]:
    return {"admin": admin}


def test_admin_defaults() -> None:
    conf = parse_config(_admin_doc(keys=["s3cret"]))
    assert conf.admin == AdminConf(keys=("s3cret",), listen="tcp:9180:interface=127.0.0.1", store="fauth-store.json")
    assert conf.admin.metrics_require_key is False
    assert conf.shutdown_grace == 30.0
    assert parse_config({}).admin is None
    assert "s3cret" not in repr(conf)  # keys stay out of logs


@pytest.mark.parametrize(
    "admin",
    [{}, {"keys": []}, {"keys": ""}, {"keys": [""]}, {"keys": ["ok", ""]}, {"keys": None}],
    ids=["absent", "empty-list", "empty-string", "empty-key", "one-empty", "null"],
)
def test_admin_without_a_key_is_refused(admin: Dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"admin": admin})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith('config: admin: property "keys" needs at least one non-empty key')
    assert "anybody" in message


def test_keys_from_environment() -> None:
    environ = {"FAUTH_KEY": "s3cret", "OTHER": "x"}
    conf = parse_config(_admin_doc(keys=["${FAUTH_KEY}", "pre-${OTHER}-post", "plain"]), environ=environ)
    assert conf.admin is not None
    assert conf.admin.keys == ("s3cret", "pre-x-post", "plain")
    with pytest.raises(ConfigError) as info:
        parse_config(_admin_doc(keys=["${FAUTH_MISSING}"]), environ=environ)
    assert str(info.value) == 'config: admin: keys: environment variable "FAUTH_MISSING" is not set'
    # Set but empty is no key at all.
    with pytest.raises(ConfigError) as info:
        parse_config(_admin_doc(keys=["${EMPTY}"]), environ={"EMPTY": ""})
    assert "non-empty key" in str(info.value)


def test_keys_from_process_environment(monkeypatch: Any) -> None:
    monkeypatch.setenv("FAUTH_TEST_ADMIN_KEY", "from-env")
    conf = parse_config(_admin_doc(keys=["${FAUTH_TEST_ADMIN_KEY}"]))
    assert conf.admin is not None and conf.admin.keys == ("from-env",)


@pytest.mark.parametrize(
    "doc, words",
    [
        ({"admin": {"keys": ["k"], "bogus": 1}}, 'unknown key "bogus"'),
        ({"admin": {"keys": ["k"], "listen": "tcp:abc"}}, "admin.listen"),
        ({"admin": {"keys": ["k"], "listen": 9180}}, '"listen"'),
        ({"admin": {"keys": [1]}}, '"keys" must be a list of strings'),
        ({"admin": {"keys": ["k"], "store": ""}}, '"store"'),
        ({"admin": {"keys": ["k"], "metrics_require_key": "yes"}}, '"metrics_require_key"'),
        ({"admin": ["k"]}, '"admin"'),
        ({"shutdown_grace": -1}, '"shutdown_grace"'),
        ({"shutdown_grace": "10"}, '"shutdown_grace"'),
        ({"shutdown_grace": True}, '"shutdown_grace"'),
    ],
)
def test_bad_admin_sections(doc: Dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_shutdown_grace() -> None:
    assert parse_config({"shutdown_grace": 0}).shutdown_grace == 0.0
    assert parse_config({"shutdown_grace": 2.5}).shutdown_grace == 2.5


def test_twistd_refuses_admin_without_keys(tmp_path: Any) -> None:
    path = tmp_path / "fauth.yaml"
    path.write_text("listen: ['tcp:0:interface=127.0.0.1']\nadmin:\n  listen: 'tcp:0:interface=127.0.0.1'\n")
    assert 'admin: property "keys" needs at least one non-empty key' in refused_start_line(str(path))


def test_twistd_refuses_unset_key_variable(tmp_path: Any) -> None:
    path = tmp_path / "fauth.yaml"
    path.write_text("admin:\n  keys: ['${FAUTH_TEST_UNSET_VARIABLE}']\n")
    env = subprocess_env()
    env.pop("FAUTH_TEST_UNSET_VARIABLE", None)
    result = subprocess.run(
        TWISTD + ["fauth", "--config", str(path)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert 'fauth: config: admin: keys: environment variable "FAUTH_TEST_UNSET_VARIABLE" is not set' in (
        result.stderr.splitlines()
    )


# --- conf/fauth-admin.yaml and the seed's curl commands, for real ---------------------------


SEED_PUT = (
    '{"uri":"/headers","plugins":{"forward-auth":{"uri":"http://127.0.0.1:9999","request_headers":["Authorization"],'
    '"upstream_headers":["X-User-ID"],"client_headers":["Location"]}},"upstream":{"nodes":{"127.0.0.1:1980":1},'
    '"type":"roundrobin"}}'
)
SEED_PUT_WITHOUT_PLUGIN = (
    '{"uri":"/headers","plugins":{},"upstream":{"nodes":{"127.0.0.1:1980":1},"type":"roundrobin"}}'
)


def _http(method: str, url: str, body: Any = None, headers: Any = None) -> Any:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def test_admin_example_config_runs_the_seed_examples(tmp_path: Any) -> None:
    import signal

    from tests.adminenv import free_ports, start_twistd, wait_accepting

    ports = dict(zip(("9080", "9999", "1980", "9180"), free_ports(4)))

    def local(text: str) -> str:
        for old, new in ports.items():
            text = text.replace(old, str(new))
        return text

    with open(os.path.join(REPO_ROOT, "conf", "fauth-admin.yaml")) as f:
        text = f.read()
    assert "store: fauth-store.json" in text
    text = local(text).replace("store: fauth-store.json", "store: %s" % (tmp_path / "store.json"))
    config_path = str(tmp_path / "fauth-admin.yaml")
    with open(config_path, "w") as f:
        f.write(text)
    log_path = str(tmp_path / "twistd.log")
    process = start_twistd(config_path, log_path, FAUTH_ADMIN_KEY=KEY)
    try:
        wait_accepting(process, [ports["9080"], ports["9180"]], log_path)
        admin = "http://127.0.0.1:%d/apisix/admin/routes/1" % ports["9180"]
        gateway = "http://127.0.0.1:%d/headers" % ports["9080"]
        code, body, _ = _http("PUT", admin, local(SEED_PUT).encode(), {"X-API-KEY": KEY})
        assert code == 201, body
        assert json.loads(body)["key"] == "/apisix/routes/1"

        code, body, _ = _http("GET", gateway, headers={"Authorization": "321"})
        assert code == 200
        assert json.loads(body)["headers"]["X-User-Id"] == "i-am-user"
        code, body, headers = _http("GET", gateway)
        assert code == 403
        assert headers["Location"] == "http://example.com/auth"

        code, body, _ = _http("PUT", admin, local(SEED_PUT_WITHOUT_PLUGIN).encode(), {"X-API-KEY": KEY})
        assert code == 200, body
        code, body, _ = _http("GET", gateway)
        assert code == 200
        assert "X-User-Id" not in json.loads(body)["headers"]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0


# --- hostile admin clients ---------------------------------------------------


def _admin_port(world: World) -> int:
    from urllib.parse import urlsplit

    port = urlsplit(world.env.admin_url).port
    assert port is not None
    return port


@ensureDeferred
async def test_deeply_nested_json_is_400_not_500(world: World) -> None:
    from tests.harness import LogCapture

    raw = b"[" * 200000 + b"]" * 200000
    with LogCapture() as logs:
        for method, path in [("PUT", "/apisix/admin/routes/1"), ("POST", "/apisix/admin/routes")]:
            code, body = await world.env.admin(method, path, raw=raw)
            assert code == 400, body
            assert body["error_msg"].startswith("invalid request body: ")
    assert not any("Traceback" in line or "unexpected error" in line for line in logs.lines)
    assert not os.path.exists(world.env.store_path)


@ensureDeferred
async def test_oversized_body_is_413_before_the_key(reactor: Any, world: World) -> None:
    from fauth.admin.api import MAX_ADMIN_BODY
    from tests.harness import raw_request

    port = _admin_port(world)
    # By Content-Length: refused as soon as the head is in, body never sent.
    head = (
        b"PUT /apisix/admin/routes/1 HTTP/1.1\r\nHost: admin\r\n"
        b"Content-Length: %d\r\n\r\n" % (MAX_ADMIN_BODY + 1)
    )
    answer = await raw_request(reactor, port, head, timeout=5)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert answer.endswith(b'{"error_msg":"request body too large"}')
    # Chunked: refused once it has grown past the limit (its last byte is
    # what crosses it, so nothing is left unread when the server closes).
    chunk = b"x" * 65536
    chunked = (
        b"POST /apisix/admin/routes HTTP/1.1\r\nHost: admin\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * (MAX_ADMIN_BODY // len(chunk))
        + b"1\r\nx"
    )
    answer = await raw_request(reactor, port, chunked, timeout=5)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1
    # At the limit: the key check answers as usual.
    exact = (
        b"PUT /apisix/admin/routes/1 HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % MAX_ADMIN_BODY
    ) + b"x" * MAX_ADMIN_BODY
    answer = await raw_request(reactor, port, exact, timeout=5)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert not os.path.exists(world.env.store_path)


@ensureDeferred
async def test_admin_listener_is_hardened(reactor: Any, world: World) -> None:
    from fauth.admin.api import AdminSite
    from fauth.edge.server import HardenedHTTPChannel, HardenedSite
    from tests.harness import raw_request

    site = AdminSite(world.env.service.admin_root)
    assert isinstance(site, HardenedSite)
    assert isinstance(site.buildProtocol(None), HardenedHTTPChannel)
    # Obsolete line folding: Twisted's own channel joins it, the hardened one refuses.
    folded = b"GET /healthz HTTP/1.1\r\nHost: admin\r\nX-A: a\r\n b\r\nConnection: close\r\n\r\n"
    answer = await raw_request(reactor, _admin_port(world), folded, timeout=5)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]


# --- a change the runtime cannot be built from ------------------------------------
#
# Control and Gateway alone (no listener): the change is validated, its
# runtime built, and only then stored and installed.


def _control_with_gateway(tmp_path: Any) -> Any:
    from twisted.internet.testing import MemoryReactorClock

    from fauth.admin.control import Control
    from fauth.edge.gateway import Gateway
    from tests.adminenv import env_doc

    doc = env_doc(tmp_path, {"upstreams": [{"id": "u", "nodes": {"127.0.0.1:9": 1}}]})
    control = Control.from_document(doc)
    gateway = Gateway(MemoryReactorClock(), control.conf)
    control.on_change(gateway.update)
    return control, gateway


def _auth_route(**plugin: Any) -> Dict[str, Any]:
    conf: Dict[str, Any] = {"uri": "http://127.0.0.1:9/auth"}
    conf.update(plugin)
    return {"uri": "/r", "upstream_id": "u", "plugins": {"forward-auth": conf}}


def test_admin_change_that_cannot_be_built_is_400_and_not_stored(tmp_path: Any, monkeypatch: Any) -> None:
    from fauth.admin.objects import AdminError
    from fauth.edge.gateway import Gateway

    control, gateway = _control_with_gateway(tmp_path)
    control.put("routes", "1", _auth_route())
    table, conf = gateway.table, control.conf
    with open(control.store.path, "rb") as f:
        stored = f.read()

    def broken(self: Any, conf: Any) -> Any:
        raise UnicodeError("label empty or too long")

    monkeypatch.setattr(Gateway, "_build", broken)
    with pytest.raises(AdminError) as info:
        control.put("routes", "2", _auth_route())
    assert info.value.status == 400
    assert info.value.message == (
        "invalid configuration: the gateway cannot run it: UnicodeError: label empty or too long"
    )
    # Nothing changed: the store, the recorded configuration, the table.
    with open(control.store.path, "rb") as f:
        assert f.read() == stored
    assert list(control.contents.routes) == ["1"]
    assert control.conf is conf
    assert gateway.table is table


def test_admin_refuses_a_header_name_that_is_not_a_token(tmp_path: Any) -> None:
    from fauth.admin.objects import AdminError

    control, gateway = _control_with_gateway(tmp_path)
    with pytest.raises(AdminError) as info:
        control.put("routes", "1", _auth_route(upstream_headers=["X-User", "X Foo"]))
    assert (info.value.status, info.value.message) == (
        400,
        'failed to check the configuration of plugin forward-auth err: property "upstream_headers" '
        'validation failed: failed to validate item 2: invalid header name "X Foo"',
    )
    assert not os.path.exists(control.store.path)


def test_admin_changes_do_not_accumulate_auth_clients(tmp_path: Any) -> None:
    control, gateway = _control_with_gateway(tmp_path)
    closed = []
    for timeout in range(1000, 1050):
        control.put("routes", "1", _auth_route(timeout=timeout))
        for client in gateway.auth_clients.clients():
            pool = client.pool
            original = pool.close
            if not getattr(original, "_spied", False):
                def spy(_o: Any = original, _c: Any = client) -> Any:
                    closed.append(_c)
                    return _o()
                spy._spied = True  # type: ignore[attr-defined]
                pool.close = spy
    assert len(gateway.auth_clients.clients()) == 1
    assert len(closed) == 49
    # Deleting the route drops its client too.
    control.delete("routes", "1")
    assert gateway.auth_clients.clients() == []


def test_upstream_keepalive_pool_applies_on_update(tmp_path: Any) -> None:
    control, gateway = _control_with_gateway(tmp_path)
    assert gateway.upstream_pool.maxPersistentPerHost == 32  # no routes: the floor
    control.put("upstreams", "big", {"nodes": {"127.0.0.1:9": 1}, "keepalive_pool": {"size": 1000}})
    control.put("routes", "1", {"uri": "/r", "upstream_id": "big"})
    assert gateway.upstream_pool.maxPersistentPerHost == 1000
    control.put("routes", "1", {"uri": "/r", "upstream_id": "u"})
    assert gateway.upstream_pool.maxPersistentPerHost == 320
