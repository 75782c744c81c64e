"""
The admin API in APISIX v3's shapes (C{apisix/admin/v3_adapter.lua},
C{apisix/core/etcd.lua}) on a real loopback listener in front of a real
gateway, with the store file: object answers with C{createdIndex} and
C{modifiedIndex}, a missing key's C{{"message": "Key not found"}}, C{PUT} on
the collection, sub-path C{PATCH}, C{DELETE ?force=true}, list arguments,
C{?ttl=}, and the C{apisix-client} package reading the answers.
"""
from __future__ import annotations

import json
from typing import Any, Dict

import pytest
from pytest_twisted import ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.adminenv import KEY, start_admin_env
from tests.admin.test_api import World, world

__all__ = ["world"]  # the fixture

R = "/apisix/admin/routes"
U = "/apisix/admin/upstreams"


def plain(world: World, uri: str = "/headers", **extra: Any) -> Dict[str, Any]:
    return world.seed_route(plugins={}, uri=uri, **extra)


@ensureDeferred
async def test_every_object_answer_has_created_and_modified_index(world: World) -> None:
    env = world.env
    code, first = await env.admin("PUT", R + "/1", plain(world))
    assert (code, first["createdIndex"], first["modifiedIndex"]) == (201, 1, 1)
    code, second = await env.admin("PUT", R + "/2", plain(world, "/b"))
    assert (second["createdIndex"], second["modifiedIndex"]) == (2, 2)
    code, again = await env.admin("PUT", R + "/1", plain(world, "/c"))
    assert (code, again["createdIndex"], again["modifiedIndex"]) == (200, 1, 3)
    code, patched = await env.admin("PATCH", R + "/1", {"name": "n"})
    assert (patched["createdIndex"], patched["modifiedIndex"]) == (1, 4)
    code, one = await env.admin("GET", R + "/1")
    assert (one["createdIndex"], one["modifiedIndex"]) == (1, 4)
    assert one["value"]["create_time"] <= one["value"]["update_time"]
    code, listing = await env.admin("GET", R)
    assert [(i["key"], i["createdIndex"], i["modifiedIndex"]) for i in listing["list"]] == [
        ("/apisix/routes/file-1", 0, 0),
        ("/apisix/routes/1", 1, 4),
        ("/apisix/routes/2", 2, 2),
    ]
    code, posted = await env.admin("POST", U, {"nodes": {world.echo_node: 1}})
    assert (code, posted["createdIndex"], posted["modifiedIndex"]) == (201, 5, 5)


@ensureDeferred
async def test_indexes_survive_a_restart(reactor: Any, tmp_path: Any, world: World) -> None:
    env = world.env
    await env.admin("PUT", R + "/1", plain(world))
    await env.admin("PUT", R + "/1", plain(world, "/x"))
    with open(env.store_path) as f:
        stored = json.load(f)
    assert stored["meta"] == {"revision": 2, "routes": {"1": {"created": 1, "modified": 2}}, "upstreams": {}}
    await env.stop()
    again = await start_admin_env(reactor, tmp_path, {})
    try:
        code, one = await again.admin("GET", R + "/1")
        assert (code, one["createdIndex"], one["modifiedIndex"]) == (200, 1, 2)
        code, three = await again.admin("PUT", R + "/3", plain(world, "/3"))
        assert three["createdIndex"] == 3
    finally:
        await again.stop()


@ensureDeferred
async def test_missing_key_is_apisix_s_key_not_found(world: World) -> None:
    env = world.env
    for method, path in (("GET", R + "/nope"), ("DELETE", R + "/nope"), ("PATCH", R + "/nope"),
                         ("PATCH", R + "/nope/uri"), ("GET", U + "/nope")):
        code, body = await env.admin(method, path, "/x" if path.endswith("uri") else {"name": "x"})
        assert (code, body) == (404, {"message": "Key not found"}), (method, path)


@ensureDeferred
async def test_put_on_the_collection_takes_the_id_from_the_body(world: World) -> None:
    env = world.env
    code, body = await env.admin("PUT", R, dict(plain(world), id="from-body"))
    assert (code, body["key"], body["value"]["id"]) == (201, "/apisix/routes/from-body", "from-body")
    assert (await env.get("/headers"))[0] == 200
    code, body = await env.admin("PUT", R, plain(world))
    assert (code, body) == (400, {"error_msg": "missing route id"})
    code, body = await env.admin("PUT", U, {"id": 7, "nodes": {world.echo_node: 1}})
    assert (code, body["key"]) == (201, "/apisix/upstreams/7")


@ensureDeferred
async def test_sub_path_patch_replaces_what_the_path_names(world: World) -> None:
    env = world.env
    await env.admin("PUT", R + "/1", plain(world, methods=["GET", "POST"]))
    code, body = await env.admin("PATCH", R + "/1/methods", ["POST"])
    assert (code, body["value"]["methods"]) == (200, ["POST"])
    assert (await env.get("/headers"))[0] == 404  # a GET no longer matches
    code, body = await env.admin("PATCH", R + "/1/upstream/nodes", {world.marker_node: 1})
    assert body["value"]["upstream"]["nodes"] == {world.marker_node: 1}
    code, body = await env.admin("PATCH", R + "/1/methods", ["GET"])
    code, content, _ = await env.get("/headers")
    assert (code, content) == (200, b"file")
    # Through something that is not an object, and an invalid result.
    code, body = await env.admin("PATCH", R + "/1/uri/x", "y")
    assert (code, body) == (400, {"error_msg": "invalid sub-path: /uri"})
    code, body = await env.admin("PATCH", R + "/1/methods", ["FETCH"])
    assert code == 400 and "methods" in body["error_msg"]
    code, one = await env.admin("GET", R + "/1")
    assert one["value"]["methods"] == ["GET"]


@ensureDeferred
async def test_delete_force_still_never_strands_a_route(world: World) -> None:
    env = world.env
    await env.admin("PUT", U + "/u1", {"nodes": {world.marker_node: 1}})
    await env.admin("PUT", R + "/1", {"uri": "/m", "upstream_id": "u1"})
    code, body = await env.admin("DELETE", U + "/u1?force=true")
    assert code == 400
    assert body["error_msg"].startswith("can not delete this upstream, route [1] is still using it now (")
    assert (await env.get("/m"))[0] == 200
    # Unused: force or not, it goes.
    await env.admin("PUT", U + "/u2", {"nodes": {world.marker_node: 1}})
    assert (await env.admin("DELETE", U + "/u2?force=true"))[0] == 200
    assert (await env.admin("GET", U + "/u2"))[0] == 404


@ensureDeferred
async def test_list_filters_and_pages(world: World) -> None:
    env = world.env
    for i in range(12):
        doc = plain(world, "/p%d" % i, name="svc-%d" % i, labels={"team": "a" if i % 2 else "b"})
        assert (await env.admin("PUT", R + "/r%02d" % i, doc))[0] == 201
    code, body = await env.admin("GET", R + "?name=svc-1")
    assert (body["total"], [i["value"]["name"] for i in body["list"]]) == (3, ["svc-1", "svc-10", "svc-11"])
    code, body = await env.admin("GET", R + "?uri=^/p1")
    assert body["total"] == 3
    code, body = await env.admin("GET", R + "?uri=/file")
    assert [i["key"] for i in body["list"]] == ["/apisix/routes/file-1"]
    code, body = await env.admin("GET", R + "?label=team")
    assert body["total"] == 12
    code, body = await env.admin("GET", R + "?label=owner")
    assert body == {"total": 0, "list": []}
    code, body = await env.admin("GET", R + "?page=2&page_size=10")
    assert body["total"] == 13
    assert [i["key"] for i in body["list"]] == ["/apisix/routes/r09", "/apisix/routes/r10", "/apisix/routes/r11"]
    code, body = await env.admin("GET", R + "?page=1&page_size=5")
    assert (code, body) == (400, {"error_msg": "page_size must be between 10 and 500"})
    code, body = await env.admin("GET", R + "?name=(")
    assert code == 400 and body["error_msg"].startswith("invalid argument name")


@ensureDeferred
async def test_ttl_expires_a_stored_route(reactor: Any, world: World) -> None:
    env = world.env
    marker = {"nodes": {world.marker_node: 1}}
    code, body = await env.admin("PUT", R + "/short?ttl=0.3", plain(world, "/short", upstream=marker))
    assert code == 201
    await env.admin("PUT", R + "/long", plain(world, "/long", upstream=marker))
    assert (await env.get("/short"))[0] == 200
    with open(env.store_path) as f:
        assert "expires" in json.load(f)["meta"]["routes"]["short"]
    for _ in range(100):
        if (await env.get("/short"))[0] == 404:
            break
        await deferLater(reactor, 0.05, lambda: None)
    assert (await env.admin("GET", R + "/short")) == (404, {"message": "Key not found"})
    assert (await env.get("/long"))[0] == 200
    with open(env.store_path) as f:
        assert list(json.load(f)["routes"]) == ["long"]
    # A PUT without ttl makes an object permanent again; a bad ttl is refused.
    code, _ = await env.admin("PUT", R + "/long?ttl=abc", plain(world, "/long"))
    assert (code, _) == (400, {"error_msg": "invalid argument ttl: should be a number"})


@ensureDeferred
async def test_expired_objects_in_the_store_go_at_start(reactor: Any, tmp_path: Any) -> None:
    store = {
        "routes": {"old": {"id": "old", "uri": "/old", "upstream": {"nodes": {"127.0.0.1:9": 1}}}},
        "upstreams": {},
        "meta": {"revision": 1, "routes": {"old": {"created": 1, "modified": 1, "expires": 1.0}}, "upstreams": {}},
    }
    with open(str(tmp_path / "store.json"), "w") as f:
        json.dump(store, f)
    env = await start_admin_env(reactor, tmp_path, {})
    try:
        for _ in range(40):
            if (await env.admin("GET", R + "/old"))[0] == 404:
                break
            await deferLater(reactor, 0.05, lambda: None)
        assert (await env.admin("GET", R + "/old"))[0] == 404
    finally:
        await env.stop()


@ensureDeferred
async def test_apisix_client_package_reads_the_answers(reactor: Any, tmp_path: Any) -> None:
    apisix_client = pytest.importorskip("apisix_client")  # its code needs Python 3.10+
    from apisix_client.upstream.models import Node, Upstream

    # (Its models take nodes as a list only: none of the {"host:port": weight} form here.)
    env = await start_admin_env(reactor, tmp_path, {})
    client = apisix_client.ApisixClient(env.admin_url + "/", KEY)

    def work() -> Any:
        up_id = client.upstream.create_or_update(
            Upstream(name="u", type="roundrobin", nodes=[Node(host="127.0.0.1", port=9, weight=1, priority=1)]),
            "u1",
        )
        got = client.upstream.get("u1")
        missing = client.upstream.get("nope")
        everything = client.upstream.get_all()
        count = client.upstream.count()
        deleted = client.upstream.delete("u1")
        return up_id, got, missing, everything, count, deleted

    try:
        up_id, got, missing, everything, count, deleted = await deferToThread(work)
    finally:
        await env.stop()
    assert up_id == "u1"
    assert got.key == "/apisix/upstreams/u1" and got.created_index == got.modified_index > 0
    assert got.value.name == "u" and got.value.nodes[0].priority == 1
    assert missing is None
    assert [item.value.id for item in everything] == ["u1"]
    assert (count, deleted) == (1, 1)
