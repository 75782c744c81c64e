"""
The admin store: atomic writes, durability across restarts, refusal of a
corrupt store (which is never overwritten), and C{kill -9} at random
moments while a client writes.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import stat
import threading
import time
from typing import Any, Dict, List

import pytest
from pytest_twisted import ensureDeferred

from fauth.admin import store as store_module
from fauth.config import ConfigError
from fauth.admin.control import Control
from fauth.admin.objects import AdminError
from fauth.process.service import GatewayService
from fauth.admin.store import Store, StoreContents, atomic_write
from tests.adminenv import (
    KEY,
    Marker,
    env_doc,
    free_ports,
    start_admin_env,
    refused_start_line,
    start_twistd,
    wait_accepting,
    write_config,
)
from tests.servers import listen_on_loopback, port_url, service_port




def _route(doc_id: str, upstream: str = "u") -> Dict[str, Any]:
    return {"id": doc_id, "uri": "/" + doc_id, "upstream_id": upstream}


# --- atomic_write ---------------------------------------------------------------


def test_atomic_write_creates_and_replaces(tmp_path: Any) -> None:
    path = str(tmp_path / "s.json")
    atomic_write(path, b"one")
    atomic_write(path, b"two")
    with open(path, "rb") as f:
        assert f.read() == b"two"
    assert os.listdir(str(tmp_path)) == ["s.json"]


def test_crash_between_write_and_rename_leaves_old_file(tmp_path: Any, monkeypatch: Any) -> None:
    store = Store(str(tmp_path / "s.json"))
    old = StoreContents(routes={"1": _route("1")})
    store.save(old)
    with open(store.path, "rb") as f:
        old_bytes = f.read()

    # The process "dies" right before the rename: no rename, no clean-up.
    class Crash(BaseException):
        pass

    def crash(*args: Any) -> None:
        raise Crash()

    monkeypatch.setattr(store_module.os, "replace", crash)
    monkeypatch.setattr(store_module.os, "unlink", lambda path: None)
    with pytest.raises(Crash):
        store.save(old.with_doc("routes", "2", _route("2")))
    monkeypatch.undo()

    with open(store.path, "rb") as f:
        assert f.read() == old_bytes
    assert store.load() == old
    # The written temporary file is left next to it, and is ignored.
    leftovers = [n for n in os.listdir(str(tmp_path)) if n != "s.json"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".s.json.") and leftovers[0].endswith(".tmp")


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path: Any, monkeypatch: Any) -> None:
    path = str(tmp_path / "s.json")
    atomic_write(path, b'{"routes": {}}')

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.os, "fsync", no_space)
    with pytest.raises(OSError):
        atomic_write(path, b"new")
    monkeypatch.undo()
    with open(path, "rb") as f:
        assert f.read() == b'{"routes": {}}'
    assert os.listdir(str(tmp_path)) == ["s.json"]


def test_file_is_always_valid_json_while_written(tmp_path: Any) -> None:
    store = Store(str(tmp_path / "s.json"))
    store.save(StoreContents())
    stop = threading.Event()
    reads: List[int] = []
    errors: List[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                with open(store.path, "rb") as f:
                    doc = json.loads(f.read())
                reads.append(len(doc["routes"]))
            except Exception as e:  # any torn read is a failure
                errors.append(repr(e))

    thread = threading.Thread(target=reader)
    thread.start()
    contents = StoreContents()
    try:
        for i in range(200):
            # Growing documents, so a torn file could not parse.
            contents = contents.with_doc("routes", str(i), dict(_route(str(i)), desc="x" * 500))
            store.save(contents)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert reads and reads == sorted(reads)
    assert len(store.load().routes) == 200


def test_existing_mode_is_kept_and_new_file_is_private(tmp_path: Any) -> None:
    path = str(tmp_path / "s.json")
    atomic_write(path, b"{}")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    os.chmod(path, 0o640)
    atomic_write(path, b"{}")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_missing_store_is_empty(tmp_path: Any) -> None:
    assert Store(str(tmp_path / "absent.json")).load() == StoreContents()


def test_store_in_a_missing_directory_is_refused(tmp_path: Any) -> None:
    path = str(tmp_path / "nowhere" / "store.json")
    with pytest.raises(ConfigError) as info:
        Store(path).load()
    assert str(info.value) == "store %s: its directory does not exist" % path


def test_failed_store_write_changes_nothing(tmp_path: Any, monkeypatch: Any) -> None:
    doc = env_doc(tmp_path, {"upstreams": [{"id": "u", "nodes": {"127.0.0.1:9": 1}}]})
    control = Control.from_document(doc)
    applied: List[Any] = []
    control.on_change(applied.append)
    control.put("routes", "1", _route("1"))
    assert len(applied) == 1

    def broken(contents: StoreContents) -> None:
        raise OSError(28, "No space left on device")

    assert control.store is not None
    monkeypatch.setattr(control.store, "save", broken)
    with pytest.raises(AdminError) as info:
        control.put("routes", "2", _route("2"))
    assert info.value.status == 500
    assert "No space left on device" in info.value.message
    assert list(control.contents.routes) == ["1"]
    assert [r.id for r in control.conf.routes] == ["1"]
    assert len(applied) == 1


# --- durability across a restart ------------------------------------------------------


@ensureDeferred
async def test_changes_survive_a_restart(reactor: Any, tmp_path: Any) -> None:
    upstream = await listen_on_loopback(reactor, Marker(b"kept"))
    node = "127.0.0.1:%d" % upstream.getHost().port
    env = await start_admin_env(reactor, tmp_path, {})
    try:
        code, _ = await env.admin("PUT", "/apisix/admin/upstreams/u", {"nodes": {node: 1}})
        assert code == 201
        code, _ = await env.admin("PUT", "/apisix/admin/routes/1", {"uri": "/kept", "upstream_id": "u"})
        assert code == 201
        code, _ = await env.admin("POST", "/apisix/admin/routes", {"uri": "/posted", "upstream": {"nodes": {node: 1}}})
        assert code == 201
    finally:
        await env.stop()

    service = GatewayService.from_file(env.config_path, reactor)
    assert [r.id for r in service.control.conf.routes][0] == "1"
    assert list(service.control.contents.upstreams) == ["u"]
    service.startService()
    try:
        port = await service_port(service.listeners[0])
        for path in ("/kept", "/posted"):
            response = await env.client.get(port_url(port, path))
            assert (response.code, await response.content()) == (200, b"kept")
    finally:
        await service.stopService()
        await env.pool.closeCachedConnections()
        await upstream.stopListening()


# --- a corrupt store ------------------------------------------------------------------


CORRUPT = {
    "bad-json": (b'{"routes": {', "not valid JSON"),
    "not-utf8": (b"\xff\xfe{}", "not valid JSON"),
    "nan": (b'{"routes": {"1": {"id": "1", "priority": NaN}}}', "not valid JSON"),
    "array": (b"[]", "not a JSON object"),
    "routes-array": (b'{"routes": [], "upstreams": {}}', '"routes" is not an object'),
    "unknown-key": (b'{"routes": {}, "consumers": {}}', 'unknown key "consumers"'),
    "route-not-object": (b'{"routes": {"1": "x"}}', 'route "1" is not an object'),
    "id-mismatch": (b'{"routes": {"1": {"id": "2", "uri": "/a", "upstream_id": "u"}}}', 'route "1" holds a document with id "2"'),
    "no-longer-valid": (
        b'{"routes": {"1": {"id": "1", "uri": "/a", "upstream_id": "gone"}}, "upstreams": {}}',
        'route "1": failed to fetch upstream info by upstream id [gone]',
    ),
    "bad-plugin": (
        b'{"routes": {"1": {"id": "1", "uri": "/a", "upstream_id": "u", "plugins": {"forward-auth": {}}}}}',
        'route "1": plugin forward-auth: property "uri" is required',
    ),
    "also-in-file": (
        b'{"upstreams": {"u": {"id": "u", "nodes": {"127.0.0.1:9": 1}}}}',
        'upstream "u" is also defined in the configuration file',
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_store_refuses_start_and_is_not_touched(tmp_path: Any, case: str) -> None:
    data, words = CORRUPT[case]
    doc = env_doc(tmp_path, {"upstreams": [{"id": "u", "nodes": {"127.0.0.1:9": 1}}]})
    config_path = str(tmp_path / "fauth.yaml")
    write_config(config_path, doc)
    store_path = doc["admin"]["store"]
    with open(store_path, "wb") as f:
        f.write(data)
    with pytest.raises(ConfigError) as info:
        GatewayService.from_file(config_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("store %s: " % store_path)
    assert words in message
    with open(store_path, "rb") as f:
        assert f.read() == data


def test_twistd_refuses_corrupt_store(tmp_path: Any) -> None:
    doc = env_doc(tmp_path, {})
    config_path = str(tmp_path / "fauth.yaml")
    write_config(config_path, doc)
    data = b'{"routes": {"1": {"id": "1"'
    with open(doc["admin"]["store"], "wb") as f:
        f.write(data)
    line = refused_start_line(config_path)
    assert line.startswith("fauth: store %s: not valid JSON" % doc["admin"]["store"])
    with open(doc["admin"]["store"], "rb") as f:
        assert f.read() == data


# --- kill -9 while writing ---------------------------------------------------------------


def test_kill_9_never_loses_an_acknowledged_write(tmp_path: Any) -> None:
    """
    A client PUTs new routes one after another; the gateway is killed with
    SIGKILL at a random moment, five times.  After every kill the store
    loads and validates, and holds exactly a prefix of the writes: every
    acknowledged one, plus at most the one in flight.
    """
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    gateway_port, admin_port = free_ports(2)
    doc = env_doc(tmp_path, {"upstreams": [{"id": "u", "nodes": {"127.0.0.1:9": 1}}]})
    doc["listen"] = ["tcp:%d:interface=127.0.0.1" % gateway_port]
    doc["admin"]["listen"] = "tcp:%d:interface=127.0.0.1" % admin_port
    config_path = str(tmp_path / "fauth.yaml")
    write_config(config_path, doc)
    store_path = doc["admin"]["store"]
    log_path = str(tmp_path / "twistd.log")
    written = 0  # routes r0000 .. r{written-1} are in the store
    per_round = []

    for round_number in range(5):
        process = start_twistd(config_path, log_path)
        try:
            wait_accepting(process, [admin_port], log_path)
            acked: List[int] = []
            errors: List[str] = []
            stop = threading.Event()

            def writer(start: int) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
                index = start
                while not stop.is_set():
                    doc_id = "r%04d" % index
                    try:
                        conn.request(
                            "PUT",
                            "/apisix/admin/routes/" + doc_id,
                            body=json.dumps(_route(doc_id)),
                            headers={"X-API-KEY": KEY},
                        )
                        response = conn.getresponse()
                        response.read()
                    except (OSError, http.client.HTTPException):
                        return  # killed
                    if response.status != 201:
                        errors.append("%s: %s" % (doc_id, response.status))
                        return
                    acked.append(index)
                    index += 1

            thread = threading.Thread(target=writer, args=(written,))
            thread.start()
            time.sleep(rng.uniform(0.15, 0.6))
            process.kill()
            process.wait()
            stop.set()
            thread.join(10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert errors == [], (seed, errors)
        assert acked, "no write was acknowledged in round %d (seed %d)" % (round_number, seed)

        with open(store_path, "rb") as f:
            stored = json.loads(f.read())
        Control.from_document(doc)  # loads and validates as a start-up would
        ids = list(stored["routes"])
        expected = ["r%04d" % i for i in range(len(ids))]
        assert ids == expected, seed
        last_acked = acked[-1] + 1
        assert last_acked <= len(ids) <= last_acked + 1, (seed, last_acked, len(ids))
        per_round.append(len(ids) - written)
        written = len(ids)
    print("kill -9 rounds (seed %d): %s writes per round, %d in all" % (seed, per_round, written))
