"""
The access log (top-level C{access_log}): one JSON object per line per
request through a real gateway, for allowed, denied and failing requests;
off by default; standard output with C{-}; reopened on reload (logrotate);
buffered and flushed every second; its configuration keys validated.
"""
from __future__ import annotations

import json
import os
import re
import types
from typing import Any, AsyncIterator, Dict, List, Optional

import attr
import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred
from twisted.internet.task import Clock

from fauth.observe.accesslog import FLUSH_BYTES, AccessLog, AccessLogService, iso_utc
from fauth.auth.decision import Allow
from fauth.config import ConfigError, parse_config
from fauth.process.demo import DemoAuthResource, EchoResource
from fauth.wire.h1 import ReplyHeaders
from fauth.observe.exchange import RouteMetrics
from fauth.observe.metrics import GatewayMetrics
from fauth.process.service import GatewayService
from tests.adminenv import AdminEnv, env_doc, free_ports, start_admin_env, write_config
from tests.harness import LogCapture
from tests.servers import listen_on_loopback, port_url

_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FIELDS = [
    "time", "route", "method", "uri", "status", "auth", "auth_ms", "upstream_ms",
    "duration_ms", "bytes", "user", "remote_addr",
]




@attr.s(auto_attribs=True)
class Backends:
    auth_url: str
    echo: str
    dead: str
    ports: List[Any]

    def doc(self, **top: Any) -> Dict[str, Any]:
        fa = {"uri": self.auth_url, "request_headers": ["Authorization"], "upstream_headers": ["X-User-ID"]}
        doc: Dict[str, Any] = {
            "routes": [
                {"id": "1", "uri": "/headers", "plugins": {"forward-auth": fa}, "upstream": {"nodes": {self.echo: 1}}},
                {
                    "id": "err",
                    "uri": "/anything/err",
                    "plugins": {"forward-auth": {"uri": "http://%s/" % self.dead}},
                    "upstream": {"nodes": {self.echo: 1}},
                },
                {"id": "open", "uri": "/anything/open", "upstream": {"nodes": {self.echo: 1}}},
            ]
        }
        doc.update(top)
        return doc


@async_yield_fixture
async def backends(reactor: Any) -> AsyncIterator[Backends]:
    auth = await listen_on_loopback(reactor, DemoAuthResource())
    echo = await listen_on_loopback(reactor, EchoResource())
    try:
        yield Backends(
            port_url(auth, "/"),
            "127.0.0.1:%d" % echo.getHost().port,
            "127.0.0.1:%d" % free_ports(1)[0],
            [auth, echo],
        )
    finally:
        for port in (auth, echo):
            await port.stopListening()


async def get(env: AdminEnv, path: str, **headers: str) -> int:
    response = await env.client.get(env.gateway_url + path, headers=headers or None)
    await response.content()
    return int(response.code)


def read_lines(path: str) -> List[Dict[str, Any]]:
    with open(path, "rb") as f:
        data = f.read()
    assert data == b"" or data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def flush(env: AdminEnv) -> None:
    access_log = env.service.metrics.access_log
    assert access_log is not None
    access_log.flush()


@ensureDeferred
async def test_lines_for_allow_deny_error_and_unrouted(reactor: Any, tmp_path: Any, backends: Backends) -> None:
    path = str(tmp_path / "access.log")
    env = await start_admin_env(reactor, tmp_path, backends.doc(access_log=path))
    try:
        assert await get(env, "/headers?who=me", Authorization="321") == 200
        assert await get(env, "/headers", Authorization="nope") == 403
        assert await get(env, "/anything/err") == 403
        assert await get(env, "/anything/open", **{"X-User-ID": "forged"}) == 200
        assert await get(env, "/nowhere") == 404
        flush(env)
        allow, deny, error, open_, unrouted = read_lines(path)
    finally:
        await env.stop()

    for line in (allow, deny, error, open_, unrouted):
        assert list(line) == FIELDS
        assert _TIME.match(line["time"]), line
        assert line["method"] == "GET"
        assert line["remote_addr"] == "127.0.0.1"
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0

    assert allow["route"] == "1" and allow["uri"] == "/headers?who=me" and allow["status"] == 200
    assert allow["auth"] == "allow" and allow["user"] == "i-am-user"
    assert allow["auth_ms"] > 0 and allow["upstream_ms"] > 0
    assert allow["bytes"] > 0

    assert deny["status"] == 403 and deny["auth"] == "deny" and deny["user"] is None
    assert deny["auth_ms"] > 0 and deny["upstream_ms"] is None

    assert error["route"] == "err" and error["status"] == 403 and error["auth"] == "error"
    assert error["user"] is None and error["upstream_ms"] is None and error["auth_ms"] >= 0

    # No auth on the route: no outcome, and the client's X-User-ID is never the user.
    assert open_["route"] == "open" and open_["auth"] is None and open_["user"] is None
    assert open_["auth_ms"] is None and open_["upstream_ms"] > 0

    assert unrouted["route"] is None and unrouted["status"] == 404 and unrouted["auth"] is None


@ensureDeferred
async def test_default_config_writes_no_access_log(
    reactor: Any, tmp_path: Any, backends: Backends, capfd: Any
) -> None:
    env = await start_admin_env(reactor, tmp_path, backends.doc())
    try:
        assert env.service.metrics.access_log is None
        assert await get(env, "/headers", Authorization="321") == 200
        assert await get(env, "/nowhere") == 404
    finally:
        await env.stop()
    assert sorted(os.listdir(str(tmp_path))) == ["fauth.yaml"]
    out, _ = capfd.readouterr()
    assert '"route"' not in out


@ensureDeferred
async def test_dash_writes_each_line_to_standard_output(
    reactor: Any, tmp_path: Any, backends: Backends, capfd: Any
) -> None:
    env = await start_admin_env(reactor, tmp_path, backends.doc(access_log="-"))
    try:
        assert await get(env, "/headers", Authorization="321") == 200
        # No flush: standard output is written line by line.
        out, _ = capfd.readouterr()
    finally:
        await env.stop()
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(x["route"], x["status"], x["user"]) for x in lines] == [("1", 200, "i-am-user")]


@ensureDeferred
async def test_reload_reopens_the_file_for_logrotate(reactor: Any, tmp_path: Any, backends: Backends) -> None:
    path = str(tmp_path / "access.log")
    env = await start_admin_env(reactor, tmp_path, backends.doc(access_log=path))
    try:
        assert await get(env, "/headers", Authorization="321") == 200
        os.rename(path, path + ".1")  # logrotate's move
        assert await get(env, "/headers", Authorization="nope") == 403  # still the old file
        code, _ = await env.admin("POST", "/apisix/admin/reload")
        assert code == 200
        assert await get(env, "/anything/open") == 200
        flush(env)
        assert [x["status"] for x in read_lines(path + ".1")] == [200, 403]
        assert [x["route"] for x in read_lines(path)] == ["open"]
    finally:
        await env.stop()


@ensureDeferred
async def test_refused_reload_still_reopens(reactor: Any, tmp_path: Any, backends: Backends) -> None:
    path = str(tmp_path / "access.log")
    env = await start_admin_env(reactor, tmp_path, backends.doc(access_log=path))
    try:
        os.rename(path, path + ".1")
        with open(env.config_path, "a") as f:
            f.write("unknown_key: 1\n")
        code, _ = await env.admin("POST", "/apisix/admin/reload")
        assert code == 400
        assert await get(env, "/anything/open") == 200
        flush(env)
        assert [x["route"] for x in read_lines(path)] == ["open"]
    finally:
        await env.stop()


@ensureDeferred
async def test_reload_can_move_and_turn_off_the_log(reactor: Any, tmp_path: Any, backends: Backends) -> None:
    first, second = str(tmp_path / "a.log"), str(tmp_path / "b.log")
    env = await start_admin_env(reactor, tmp_path, backends.doc(access_log=first))
    try:
        full = env_doc(tmp_path, backends.doc(access_log=second, access_log_user_header="x-user-id"))
        write_config(env.config_path, full)
        assert (await env.admin("POST", "/apisix/admin/reload"))[0] == 200
        assert await get(env, "/headers", Authorization="321") == 200
        flush(env)
        assert read_lines(first) == []
        assert [x["user"] for x in read_lines(second)] == ["i-am-user"]
        write_config(env.config_path, env_doc(tmp_path, backends.doc()))
        assert (await env.admin("POST", "/apisix/admin/reload"))[0] == 200
        assert env.service.metrics.access_log is None
        assert await get(env, "/anything/open") == 200
        assert len(read_lines(second)) == 1
    finally:
        await env.stop()


@ensureDeferred
async def test_user_header_is_configurable(reactor: Any, tmp_path: Any, backends: Backends) -> None:
    path = str(tmp_path / "access.log")
    env = await start_admin_env(
        reactor, tmp_path, backends.doc(access_log=path, access_log_user_header="X-Account")
    )
    try:
        assert await get(env, "/headers", Authorization="321") == 200
        flush(env)
        assert [x["user"] for x in read_lines(path)] == [None]  # the auth service sent no X-Account
    finally:
        await env.stop()


# --- configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"access_log": 5}, 'config: property "access_log" must be a file path or "-" (standard output)'),
        ({"access_log": ""}, 'config: property "access_log" must be a file path or "-" (standard output)'),
        ({"access_log_user_header": "X User"}, 'config: property "access_log_user_header" must be a header name'),
        ({"access_log_user_header": "X-User\n"}, 'config: property "access_log_user_header" must be a header name'),
        ({"access_log_user_header": ["X-User"]}, 'config: property "access_log_user_header" must be a header name'),
    ],
)
def test_bad_keys_are_refused_in_one_line(doc: Dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    assert str(e.value) == message


def test_defaults() -> None:
    conf = parse_config({})
    assert conf.access_log is None and conf.access_log_user_header == "X-User-ID"
    conf = parse_config({"access_log": "-", "access_log_user_header": "X-Account"})
    assert conf.access_log == "-" and conf.access_log_user_header == "X-Account"


def test_unopenable_file_stops_start_up(tmp_path: Any) -> None:
    conf = parse_config({"listen": ["tcp:0:interface=127.0.0.1"], "access_log": str(tmp_path)})
    with pytest.raises(ConfigError) as e:
        GatewayService(conf, Clock())
    assert str(e.value).startswith('config: access_log: cannot open "%s": ' % tmp_path)
    assert "\n" not in str(e.value)


# --- buffering, with fake exchanges -------------------------------------------------


def fake_exchange(user: Optional[bytes] = None) -> Any:
    request = types.SimpleNamespace(
        method=b"GET",
        uri=b"/x\x01\xff",
        sentLength=3,
        getClientAddress=lambda: types.SimpleNamespace(host="10.0.0.1"),
    )
    headers = ReplyHeaders({b"x-user-id": [user]} if user is not None else {})
    return types.SimpleNamespace(
        request=request,
        decision=Allow((), headers),
        route=RouteMetrics("r"),
        auth_s=0.0012345,
        upstream_s=None,
        elapsed=0.5,
    )


def test_file_lines_wait_for_the_timer_or_64k(tmp_path: Any) -> None:
    clock = Clock()
    path = str(tmp_path / "access.log")
    conf = parse_config({"access_log": path})
    metrics = GatewayMetrics(types.SimpleNamespace(conf=conf))  # type: ignore[arg-type]
    service = AccessLogService(clock, metrics, conf)
    service.startService()
    access_log = metrics.access_log
    assert access_log is not None
    access_log.log(fake_exchange(b"alice"), 200)
    assert os.path.getsize(path) == 0
    clock.advance(1.0)
    [line] = read_lines(path)
    assert line["user"] == "alice" and line["uri"] == "/x\x01\xff" and line["auth_ms"] == 1.234
    assert line["auth"] == "allow" and line["route"] == "r" and line["bytes"] == 3
    # Lines pile up until 64 KiB are pending, then go out at once, whole.
    first = os.path.getsize(path)
    count = 0
    while os.path.getsize(path) == first:
        access_log.log(fake_exchange(), 200)
        count += 1
        assert count < FLUSH_BYTES // 50
    assert os.path.getsize(path) - first >= FLUSH_BYTES
    assert len(read_lines(path)) == 1 + count
    service.stopService()
    assert metrics.access_log is None
    assert not clock.getDelayedCalls()


def test_write_failure_is_logged_once_and_never_raises(tmp_path: Any) -> None:
    access_log = AccessLog(str(tmp_path / "access.log"))
    access_log._file.close()
    with LogCapture() as logs:
        for _ in range(3):
            access_log.log(fake_exchange(), 200)
            access_log.flush()
    errors = [line for line in logs.lines if "write failed" in line]
    assert len(errors) == 1, logs.lines


def test_iso_utc() -> None:
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1764399982.1239) == "2025-11-29T07:06:22.123Z"
