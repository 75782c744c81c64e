"""
Live reload (C{POST /apisix/admin/reload}, SIGHUP), route changes under
load, and graceful shutdown (draining, SIGTERM with C{shutdown_grace}).
"""
from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

import attr
import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool

from fauth.process.demo import DemoAuthResource
from fauth.edge.drain import InFlight
from fauth.process.service import GatewayService
from tests.adminenv import (
    KEY,
    AdminEnv,
    Marker,
    Slow,
    accepts,
    env_doc,
    free_ports,
    start_admin_env,
    start_twistd,
    wait_accepting,
    wait_accepting_async,
    write_config,
)
from tests.harness import LogCapture
from tests.servers import listen_on_loopback, port_url




@attr.s(auto_attribs=True)
class Markers:
    """Upstreams answering C{m0}, C{m1}, ... and the demo auth service."""

    nodes: List[str]
    auth_url: str
    ports: List[Any]


@async_yield_fixture
async def markers(reactor: Any) -> AsyncIterator[Markers]:
    ports = [await listen_on_loopback(reactor, Marker(b"m%d" % i)) for i in range(4)]
    auth = await listen_on_loopback(reactor, DemoAuthResource())
    try:
        yield Markers(["127.0.0.1:%d" % p.getHost().port for p in ports], port_url(auth, "/"), ports + [auth])
    finally:
        for port in ports + [auth]:
            await port.stopListening()


def _file_doc(m: Markers, **routes: int) -> Dict[str, Any]:
    """File routes C{/name} → marker C{routes[name]}."""
    return {
        "upstreams": [{"id": "fu%d" % i, "nodes": {node: 1}} for i, node in enumerate(m.nodes)],
        "routes": [{"id": name, "uri": "/" + name, "upstream_id": "fu%d" % i} for name, i in routes.items()],
    }


async def _rewrite_and_reload(env: AdminEnv, tmp_path: Any, doc: Dict[str, Any]) -> Tuple[int, Any]:
    write_config(env.config_path, env_doc(tmp_path, doc))
    return await env.admin("POST", "/apisix/admin/reload")


# --- reload through the admin API ------------------------------------------------------


@ensureDeferred
async def test_admin_reload_applies_a_valid_file(reactor: Any, tmp_path: Any, markers: Markers) -> None:
    env = await start_admin_env(reactor, tmp_path, _file_doc(markers, a=0))
    try:
        await env.admin("PUT", "/apisix/admin/routes/api", {"uri": "/api", "upstream_id": "fu3"})
        assert (await env.get("/a"))[:2] == (200, b"m0")
        assert (await env.get("/b"))[0] == 404

        code, body = await _rewrite_and_reload(env, tmp_path, _file_doc(markers, a=1, b=2))
        assert (code, body) == (200, {"reloaded": True})
        assert (await env.get("/a"))[:2] == (200, b"m1")
        assert (await env.get("/b"))[:2] == (200, b"m2")
        # The admin API's routes are still there, after the file's.
        assert (await env.get("/api"))[:2] == (200, b"m3")
        code, body = await env.admin("GET", "/apisix/admin/routes")
        assert [item["value"]["id"] for item in body["list"]] == ["a", "b", "api"]
    finally:
        await env.stop()


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("timeout", 'route "a": plugin forward-auth: property "timeout" validation failed: expected 0 to be at least 1'),
        ("yaml", "is not valid YAML"),
        ("conflict", 'route "api" is also defined in the configuration file'),
        ("upstream-removed", 'route "api": failed to fetch upstream info by upstream id [fu3]'),
    ],
)
@ensureDeferred
async def test_admin_reload_refuses_an_invalid_file(
    reactor: Any, tmp_path: Any, markers: Markers, bad: str, reason: str
) -> None:
    env = await start_admin_env(reactor, tmp_path, _file_doc(markers, a=0))
    try:
        await env.admin("PUT", "/apisix/admin/routes/api", {"uri": "/api", "upstream_id": "fu3"})
        doc = _file_doc(markers, a=1, b=2)
        if bad == "timeout":
            doc["routes"][0]["plugins"] = {"forward-auth": {"uri": markers.auth_url, "timeout": 0}}
        elif bad == "conflict":
            doc["routes"].append({"id": "api", "uri": "/other", "upstream_id": "fu0"})
        elif bad == "upstream-removed":
            doc["upstreams"].pop()
        with LogCapture() as logs:
            if bad == "yaml":
                with open(env.config_path, "a") as f:
                    f.write("routes: [\n  - id: 1\n   uri: x: y\n")
                code, body = await env.admin("POST", "/apisix/admin/reload")
            else:
                code, body = await _rewrite_and_reload(env, tmp_path, doc)
        assert code == 400
        assert reason in body["error_msg"]
        assert "\n" not in body["error_msg"]
        assert logs.contains("reload refused: ")
        assert logs.contains(reason)
        # The old table is kept.
        assert (await env.get("/a"))[:2] == (200, b"m0")
        assert (await env.get("/b"))[0] == 404
        assert (await env.get("/api"))[:2] == (200, b"m3")
    finally:
        await env.stop()


@ensureDeferred
async def test_reload_ignores_listen_and_admin_changes(reactor: Any, tmp_path: Any, markers: Markers) -> None:
    env = await start_admin_env(reactor, tmp_path, _file_doc(markers, a=0))
    try:
        doc = env_doc(tmp_path, _file_doc(markers, a=1), admin={"keys": ["a-new-key"]})
        doc["listen"] = ["tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"]
        write_config(env.config_path, doc)
        with LogCapture() as logs:
            code, body = await env.admin("POST", "/apisix/admin/reload")
        assert (code, body) == (200, {"reloaded": True})
        assert logs.contains("reload: changes to listen, admin need a restart; ignored")
        assert (await env.get("/a"))[:2] == (200, b"m1")
        assert (await env.admin("GET", "/apisix/admin/routes"))[0] == 200
        assert (await env.admin("GET", "/apisix/admin/routes", key="a-new-key"))[0] == 401
        assert len(env.service.listeners) == 1
        assert env.service.control.conf.listen == ("tcp:0:interface=127.0.0.1",)
    finally:
        await env.stop()


@ensureDeferred
async def test_file_route_may_use_an_api_upstream(reactor: Any, tmp_path: Any, markers: Markers) -> None:
    env = await start_admin_env(reactor, tmp_path, _file_doc(markers, a=0))
    try:
        await env.admin("PUT", "/apisix/admin/upstreams/api-up", {"nodes": {markers.nodes[2]: 1}})
        doc = _file_doc(markers, a=0)
        doc["routes"].append({"id": "f", "uri": "/f", "upstream_id": "api-up"})
        code, _ = await _rewrite_and_reload(env, tmp_path, doc)
        assert code == 200
        assert (await env.get("/f"))[:2] == (200, b"m2")
        code, body = await env.admin("DELETE", "/apisix/admin/upstreams/api-up")
        assert (code, body) == (400, {"error_msg": "can not delete this upstream, route [f] is still using it now"})
    finally:
        await env.stop()

    # And it starts that way too.
    service = GatewayService.from_file(env.config_path, reactor)
    assert [r.id for r in service.control.conf.routes] == ["a", "f"]


# --- reload under load ------------------------------------------------------------------------


@ensureDeferred
async def test_route_changes_and_reloads_under_load(reactor: Any, tmp_path: Any, markers: Markers) -> None:
    """
    16 concurrent clients request file routes C{/y0..3} and API routes
    C{/x0..7}, each served by an upstream answering its own marker, while
    200 admin changes (PUT, PATCH, upstream re-definitions, create and
    delete of another route) and 20 reloads (alternating two equivalent
    files) happen: every response is 200 with the right marker.
    """
    auth = {"uri": markers.auth_url, "request_headers": ["Authorization"]}

    def file_version(b: bool) -> Dict[str, Any]:
        doc = _file_doc(markers, y0=0, y1=1, y2=2, y3=3)
        if b:  # the same routing, written differently, with auth
            doc["routes"] = [
                {"id": "y%d" % i, "uri": "/y%d" % i, "upstream": {"nodes": {node: 1}}, "plugins": {"forward-auth": auth}}
                for i, node in enumerate(markers.nodes)
            ] + [{"id": "yb", "uri": "/only-in-b", "upstream_id": "fu0"}]
        return doc

    env = await start_admin_env(reactor, tmp_path, file_version(False))
    for m, node in enumerate(markers.nodes):
        assert (await env.admin("PUT", "/apisix/admin/upstreams/au%d" % m, {"nodes": {node: 1}}))[0] == 201
    for i in range(8):
        route = {"uri": "/x%d" % i, "upstream_id": "au%d" % (i % 4)}
        assert (await env.admin("PUT", "/apisix/admin/routes/x%d" % i, route))[0] == 201

    paths = [("/y%d" % i, b"m%d" % i) for i in range(4)] + [("/x%d" % i, b"m%d" % (i % 4)) for i in range(8)]
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 16
    client = HTTPClient(Agent(reactor, pool=pool))
    served = [0]
    failures: List[str] = []
    admin_failures: List[str] = []
    done = [False]
    counts = {"changes": 0, "reloads": 0}

    async def client_loop(offset: int) -> None:
        n = offset
        while not done[0]:
            path, marker = paths[n % len(paths)]
            n += 1
            try:
                response = await client.get(env.gateway_url + path, headers={"Authorization": "123"})
                body = await response.content()
            except Exception as e:
                failures.append("%s: %r" % (path, e))
                continue
            if response.code != 200 or body != marker:
                failures.append("%s: %d %r (expected %r)" % (path, response.code, body[:80], marker))
            else:
                served[0] += 1

    # Its own persistent connections: the changes should not wait for
    # connection set-ups behind 16 busy clients.
    admin_pool = HTTPConnectionPool(reactor, persistent=True)
    admin_client = HTTPClient(Agent(reactor, pool=admin_pool))

    async def admin_call(method: str, path: str, body: Any = None) -> None:
        data = None if body is None else json.dumps(body).encode()
        response = await admin_client.request(method, env.admin_url + path, headers={"X-API-KEY": KEY}, data=data)
        answer = await response.content()
        if response.code not in (200, 201):
            admin_failures.append("%s %s: %d %r" % (method, path, response.code, answer))

    async def driver() -> None:
        for k in range(200):
            i = k % 8
            m = i % 4
            variant = k % 6
            if variant == 0:
                await admin_call("PUT", "/apisix/admin/routes/x%d" % i, {"uri": "/x%d" % i, "upstream_id": "au%d" % m})
            elif variant == 1:
                route = {"uri": "/x%d" % i, "upstream": {"nodes": {markers.nodes[m]: 1}}, "plugins": {"forward-auth": auth}}
                await admin_call("PUT", "/apisix/admin/routes/x%d" % i, route)
            elif variant == 2:
                await admin_call("PATCH", "/apisix/admin/routes/x%d" % i, {"name": "change %d" % k, "priority": k % 3})
            elif variant == 3:
                upstream = {"nodes": {markers.nodes[m]: 1}, "timeout": {"connect": 5 + k % 3}}
                await admin_call("PUT", "/apisix/admin/upstreams/au%d" % m, upstream)
            elif variant == 4:
                churn = {"uri": "/x%d" % i, "methods": ["POST"], "upstream_id": "fu0"}
                await admin_call("PUT", "/apisix/admin/routes/churn", churn)
            else:
                await admin_call("DELETE", "/apisix/admin/routes/churn")
            counts["changes"] += 1
            if k % 10 == 9:
                write_config(env.config_path, env_doc(tmp_path, file_version(counts["reloads"] % 2 == 0)))
                await admin_call("POST", "/apisix/admin/reload")
                counts["reloads"] += 1

    started = time.monotonic()
    try:
        clients = [Deferred.fromCoroutine(client_loop(c)) for c in range(16)]
        await Deferred.fromCoroutine(driver())
        while time.monotonic() - started < 3.0:
            await deferLater(reactor, 0.05, lambda: None)
        done[0] = True
        await gatherResults(clients)
        duration = time.monotonic() - started
    finally:
        done[0] = True
        await pool.closeCachedConnections()
        await admin_pool.closeCachedConnections()
        await env.stop()
    print(
        "\nreload under load: %d requests served in %.1f s (%.0f/s), %d failed, %d changes, %d reloads, "
        "%d refused admin calls"
        % (served[0], duration, served[0] / duration, len(failures), counts["changes"], counts["reloads"], len(admin_failures))
    )
    assert failures == []
    assert admin_failures == []
    assert counts == {"changes": 200, "reloads": 20}
    assert served[0] > 200


# --- SIGHUP -----------------------------------------------------------------------------


def _get(port: int, path: str) -> Tuple[int, bytes]:
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _eventually(check: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within %s s" % seconds)
        time.sleep(0.02)


def test_sighup_reloads_a_valid_file_and_refuses_an_invalid_one(tmp_path: Any) -> None:
    gateway_port, upstream_port, auth_port = free_ports(3)
    node = "127.0.0.1:%d" % upstream_port
    doc: Dict[str, Any] = {
        "listen": ["tcp:%d:interface=127.0.0.1" % gateway_port],
        "demo": {"auth": "tcp:%d:interface=127.0.0.1" % auth_port, "upstream": "tcp:%d:interface=127.0.0.1" % upstream_port},
        "routes": [{"id": "one", "uri": "/headers", "upstream": {"nodes": {node: 1}}}],
    }
    config_path = str(tmp_path / "fauth.yaml")
    log_path = str(tmp_path / "twistd.log")
    write_config(config_path, doc)
    process = start_twistd(config_path, log_path)
    try:
        wait_accepting(process, [gateway_port], log_path)
        assert _get(gateway_port, "/headers")[0] == 200
        assert _get(gateway_port, "/anything/x")[0] == 404

        doc["routes"].append({"id": "two", "uri": "/anything/*", "upstream": {"nodes": {node: 1}}})
        write_config(config_path, doc)
        process.send_signal(signal.SIGHUP)
        _eventually(lambda: _get(gateway_port, "/anything/x")[0] == 200)

        doc["routes"][1]["plugins"] = {"forward-auth": {"uri": "http://127.0.0.1:%d/" % auth_port, "timeout": 0}}
        write_config(config_path, doc)
        process.send_signal(signal.SIGHUP)
        _eventually(lambda: "reload refused: " in open(log_path).read())
        with open(log_path) as f:
            assert 'reload refused: route "two": plugin forward-auth: property "timeout" validation failed' in f.read()
        # The old table: /anything/x still passes without auth.
        assert _get(gateway_port, "/anything/x")[0] == 200
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0


# --- draining and SIGTERM -----------------------------------------------------------------


class _FakeRequest:
    def __init__(self) -> None:
        self.finish: Deferred[None] = Deferred()

    def notifyFinish(self) -> "Deferred[None]":
        return self.finish


def test_in_flight_counter() -> None:
    from twisted.internet.testing import MemoryReactorClock

    in_flight = InFlight()
    assert in_flight.idle().called
    a, b = _FakeRequest(), _FakeRequest()
    in_flight.track(a)
    in_flight.track(b)
    assert in_flight.count == 2
    idle = in_flight.idle()
    a.finish.callback(None)
    assert not idle.called
    b.finish.errback(ConnectionRefusedError())  # a client that went away counts as finished
    assert idle.called and in_flight.count == 0

    # A wait that times out is forgotten (no AlreadyCalledError later).
    clock = MemoryReactorClock()
    c = _FakeRequest()
    in_flight.track(c)
    waiting = in_flight.idle()
    waiting.addTimeout(1, clock)
    failures: List[Any] = []
    waiting.addErrback(failures.append)
    clock.advance(2)
    assert len(failures) == 1
    c.finish.callback(None)
    assert in_flight.count == 0


@ensureDeferred
async def test_drain_finishes_requests_in_flight(reactor: Any, tmp_path: Any) -> None:
    slow = await listen_on_loopback(reactor, Slow(reactor, 0.5))
    route = {"id": "s", "uri": "/slow", "upstream": {"nodes": {"127.0.0.1:%d" % slow.getHost().port: 1}}}
    env = await start_admin_env(reactor, tmp_path, {"routes": [route]})
    try:
        pending = env.client.get(env.gateway_url + "/slow")
        await deferLater(reactor, 0.1, lambda: None)
        assert env.service.resource.in_flight.count == 1
        assert (await env.admin("GET", "/healthz", key=None)) == (200, b"ok")
        drained = env.service.drain(5)
        await deferLater(reactor, 0.05, lambda: None)
        # No new connections; the admin listener says so.
        with pytest.raises(ConnectionRefusedError):
            await env.client.get(env.gateway_url + "/slow")
        assert (await env.admin("GET", "/healthz", key=None)) == (503, b"draining")
        response = await pending
        assert (response.code, await response.content()) == (200, b"slow")
        assert await drained is True
    finally:
        await env.stop()
        await slow.stopListening()


@ensureDeferred
async def test_drain_gives_up_after_the_grace(reactor: Any, tmp_path: Any) -> None:
    slow = await listen_on_loopback(reactor, Slow(reactor, 5))
    route = {"id": "s", "uri": "/slow", "upstream": {"nodes": {"127.0.0.1:%d" % slow.getHost().port: 1}}}
    env = await start_admin_env(reactor, tmp_path, {"routes": [route]})
    try:
        pending = env.client.get(env.gateway_url + "/slow")
        pending.addErrback(lambda _: None)
        await deferLater(reactor, 0.1, lambda: None)
        started = time.monotonic()
        assert await env.service.drain(0.2) is False
        assert 0.15 < time.monotonic() - started < 2
        assert env.service.resource.in_flight.count == 1
    finally:
        await env.stop()
        await slow.stopListening()


async def _sigterm_run(
    reactor: Any, tmp_path: Any, delay: float, grace: float, again_after: Optional[float] = None
) -> Dict[str, Any]:
    """
    A twistd gateway in front of an upstream answering after C{delay}; a
    request, then SIGTERM 0.2 s later.  What happened, for the caller to check.
    """
    slow = await listen_on_loopback(reactor, Slow(reactor, delay))
    gateway_port, admin_port = free_ports(2)
    doc = env_doc(tmp_path, {"routes": [{"id": "s", "uri": "/slow", "upstream": {"nodes": {"127.0.0.1:%d" % slow.getHost().port: 1}}}]})
    doc["listen"] = ["tcp:%d:interface=127.0.0.1" % gateway_port]
    doc["admin"]["listen"] = "tcp:%d:interface=127.0.0.1" % admin_port
    doc["shutdown_grace"] = grace
    config_path = str(tmp_path / "fauth.yaml")
    log_path = str(tmp_path / "twistd.log")
    write_config(config_path, doc)
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(Agent(reactor, pool=pool))
    process = start_twistd(config_path, log_path)
    result: Dict[str, Any] = {}
    try:
        await wait_accepting_async(reactor, process, [gateway_port, admin_port], log_path)
        pending = client.get("http://127.0.0.1:%d/slow" % gateway_port)
        await deferLater(reactor, 0.2, lambda: None)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # New connections are refused from (almost) at once.
        refused_after: Optional[float] = None
        while time.monotonic() - signalled < 1.0:
            if not accepts(gateway_port):
                refused_after = time.monotonic() - signalled
                break
            await deferLater(reactor, 0.01, lambda: None)
        result["refused_after"] = refused_after
        if again_after is not None:
            await deferLater(reactor, again_after, lambda: None)
            process.send_signal(signal.SIGTERM)
        try:
            response = await pending
            result["response"] = (response.code, await response.content())
        except Exception as e:
            result["response"] = e
        while process.poll() is None and time.monotonic() - signalled < 10:
            await deferLater(reactor, 0.02, lambda: None)
        result["exit_after"] = time.monotonic() - signalled
        result["code"] = process.poll()
        with open(log_path) as f:
            result["log"] = f.read()
        return result
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        await pool.closeCachedConnections()
        await slow.stopListening()


@ensureDeferred
async def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(reactor: Any, tmp_path: Any) -> None:
    result = await _sigterm_run(reactor, tmp_path, delay=1.0, grace=30)
    assert result["response"] == (200, b"slow"), result["log"]
    assert result["refused_after"] is not None and result["refused_after"] < 0.5
    assert result["code"] == 0, result["log"]
    assert 0.5 < result["exit_after"] < 3.0
    assert "all requests finished; stopping" in result["log"]
    assert "Traceback" not in result["log"]


@ensureDeferred
async def test_sigterm_exits_after_the_grace(reactor: Any, tmp_path: Any) -> None:
    result = await _sigterm_run(reactor, tmp_path, delay=5.0, grace=0.5)
    assert not isinstance(result["response"], tuple)  # cut off
    assert result["code"] == 0, result["log"]
    assert 0.4 < result["exit_after"] < 2.5
    assert "shutdown grace of 0.5s over; stopping with 1 requests in flight" in result["log"]


@ensureDeferred
async def test_a_second_sigterm_stops_at_once(reactor: Any, tmp_path: Any) -> None:
    result = await _sigterm_run(reactor, tmp_path, delay=5.0, grace=30, again_after=0.3)
    assert not isinstance(result["response"], tuple)
    assert result["code"] == 0, result["log"]
    assert result["exit_after"] < 2.5
    assert "SIGTERM again: stopping now (1 requests in flight)" in result["log"]


# --- a reload the runtime cannot be built from ------------------------------------------


def _reloadable(tmp_path: Any) -> Any:
    from twisted.internet.testing import MemoryReactorClock

    from fauth.admin.control import Control
    from fauth.edge.gateway import Gateway

    config_path = str(tmp_path / "fauth.yaml")
    doc = {"routes": [{"id": "one", "uri": "/one", "upstream": {"nodes": {"127.0.0.1:9": 1}}}]}
    write_config(config_path, doc)
    control = Control.from_file(config_path)
    gateway = Gateway(MemoryReactorClock(), control.conf)
    control.on_change(gateway.update)
    doc["routes"].append({"id": "two", "uri": "/two", "upstream": {"nodes": {"127.0.0.1:9": 1}}})
    write_config(config_path, doc)
    return control, gateway


def test_reload_that_cannot_be_built_is_refused_with_a_config_error(tmp_path: Any, monkeypatch: Any) -> None:
    from fauth.config import ConfigError
    from fauth.edge.gateway import Gateway

    control, gateway = _reloadable(tmp_path)
    conf, table = control.conf, gateway.table
    outcomes: List[Tuple[str, str]] = []
    control.on_outcome(lambda event, result: outcomes.append((event, result)))

    def broken(self: Any, conf: Any) -> Any:
        raise UnicodeError("label empty\nor too long")

    monkeypatch.setattr(Gateway, "_build", broken)
    with LogCapture() as logs, pytest.raises(ConfigError) as info:
        control.reload()
    assert str(info.value) == "config: the gateway cannot run it: UnicodeError: label empty or too long"
    assert logs.contains("reload refused: config: the gateway cannot run it")
    # The traceback, once.
    assert len([line for line in logs.lines if "cannot be built" in line]) == 1
    assert control.conf is conf and gateway.table is table
    assert outcomes == [("reload", "refused")]
    monkeypatch.undo()
    control.reload()
    assert [r.id for r in control.conf.routes] == ["one", "two"]
    assert outcomes[-1] == ("reload", "ok")


def test_reload_wraps_an_unexpected_error_in_a_config_error(tmp_path: Any, monkeypatch: Any) -> None:
    from fauth.admin import control as control_module
    from fauth.config import ConfigError

    control, gateway = _reloadable(tmp_path)
    conf = control.conf

    def broken(path: str) -> Any:
        raise RuntimeError("surprise")

    monkeypatch.setattr(control_module, "read_document", broken)
    with pytest.raises(ConfigError) as info:
        control.reload()
    assert str(info.value) == "config: reload failed: RuntimeError: surprise"
    assert control.conf is conf
