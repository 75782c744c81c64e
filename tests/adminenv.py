"""
A real gateway with its admin API, built from a configuration file the way
C{twistd fauth} builds it (L{GatewayService.from_file}), on loopback ports;
plus helpers for tests that run C{twistd fauth} as a separate process.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import attr
import yaml
from treq.client import HTTPClient
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from fauth.process.service import GatewayService
from tests.servers import port_url, service_port

__all__ = [
    "KEY",
    "AdminEnv",
    "Marker",
    "Slow",
    "start_admin_env",
    "write_config",
    "free_ports",
    "start_twistd",
    "wait_accepting",
]

KEY = "edd1c9f034335f136f87ad84b625c8f1"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]


class Marker(Resource):
    """An upstream answering every request with 200 and its marker."""

    isLeaf = True

    def __init__(self, marker: bytes) -> None:
        super().__init__()
        self.marker = marker

    def render(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return self.marker


class Slow(Resource):
    """An upstream answering 200 C{slow} after C{delay} seconds."""

    isLeaf = True

    def __init__(self, reactor: Any, delay: float) -> None:
        super().__init__()
        self._reactor = reactor
        self._delay = delay

    def render(self, request: Any) -> Any:
        def answer() -> None:
            if not request.finished and not getattr(request, "_disconnected", False):
                request.setHeader(b"content-type", b"text/plain")
                request.write(b"slow")
                request.finish()

        call = self._reactor.callLater(self._delay, answer)
        request.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)
        return NOT_DONE_YET


def write_config(path: Any, doc: Dict[str, Any]) -> None:
    """Write C{doc} as YAML, atomically (a reload never sees half a file)."""
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    os.replace(tmp, str(path))


@attr.s(auto_attribs=True)
class AdminEnv:
    """A running L{GatewayService} with its admin API, and clients for both."""

    reactor: Any
    config_path: str
    store_path: str
    service: GatewayService
    gateway_url: str
    admin_url: str
    client: HTTPClient
    pool: HTTPConnectionPool

    async def admin(
        self,
        method: str,
        path: str,
        body: Any = None,
        key: Optional[str] = KEY,
        raw: Optional[bytes] = None,
    ) -> Tuple[int, Any]:
        """An admin API call; the answer's status and decoded JSON (or text)."""
        headers = {"X-API-KEY": key} if key is not None else {}
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        response = await self.client.request(method, self.admin_url + path, headers=headers, data=data)
        content = await response.content()
        if response.headers.getRawHeaders(b"content-type") == [b"application/json"]:
            return response.code, json.loads(content)
        return response.code, content

    async def get(self, path: str, headers: Optional[Dict[str, str]] = None) -> Tuple[int, bytes, Any]:
        """A request through the gateway."""
        response = await self.client.get(self.gateway_url + path, headers=headers)
        body = await response.content()
        return response.code, body, response.headers

    async def stop(self) -> None:
        await self.pool.closeCachedConnections()
        if self.service.running:
            await self.service.stopService()


def env_doc(tmp_path: Any, doc: Dict[str, Any], admin: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """C{doc} with loopback listeners on free ports and a store in C{tmp_path}."""
    full = dict(doc)
    full["listen"] = ["tcp:0:interface=127.0.0.1"]
    full["admin"] = dict(
        {"listen": "tcp:0:interface=127.0.0.1", "keys": [KEY], "store": str(tmp_path / "store.json")},
        **(admin or {})
    )
    return full


async def start_admin_env(
    reactor: Any, tmp_path: Any, doc: Dict[str, Any], admin: Optional[Dict[str, Any]] = None
) -> AdminEnv:
    """Write C{doc} (see L{env_doc}) to C{tmp_path/fauth.yaml} and start it."""
    config_path = str(tmp_path / "fauth.yaml")
    full = env_doc(tmp_path, doc, admin)
    write_config(config_path, full)
    service = GatewayService.from_file(config_path, reactor)
    service.startService()
    gateway_port = await service_port(service.listeners[0])
    assert service.admin_listener is not None
    admin_port = await service_port(service.admin_listener)
    pool = HTTPConnectionPool(reactor, persistent=False)
    return AdminEnv(
        reactor,
        config_path,
        full["admin"]["store"],
        service,
        port_url(gateway_port),
        port_url(admin_port),
        HTTPClient(Agent(reactor, pool=pool)),
        pool,
    )


# --- twistd as a separate process -------------------------------------------


def free_ports(count: int) -> List[int]:
    """Ports the kernel just handed out on 127.0.0.1 (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def subprocess_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    parts = [REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.update(extra)
    return env


def refused_start_line(config_path: str) -> str:
    """
    Run C{twistd fauth --config config_path}; assert that it refused to
    start (exit 1) with exactly one C{fauth: } line on stderr and no
    traceback, and return that line.
    """
    result = subprocess.run(
        TWISTD + ["fauth", "--config", config_path],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("fauth: ")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def start_twistd(config_path: str, log_path: str, **env: str) -> "subprocess.Popen[bytes]":
    """C{twistd -n fauth --config config_path}, output to C{log_path}."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            TWISTD + ["fauth", "--config", config_path],
            cwd=REPO_ROOT,
            env=subprocess_env(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def accepts(port: int) -> bool:
    """Whether 127.0.0.1:C{port} accepts a connection now."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def wait_accepting(process: "subprocess.Popen[bytes]", ports: List[int], log_path: str, seconds: float = 15.0) -> None:
    """Block until every port accepts (or fail with the process's output)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError("twistd exited with %s: %s" % (process.returncode, _read(log_path)))
        if all(accepts(p) for p in ports):
            return
        time.sleep(0.02)
    raise AssertionError("twistd did not listen within %s s: %s" % (seconds, _read(log_path)))


async def wait_accepting_async(
    reactor: Any, process: "subprocess.Popen[bytes]", ports: List[int], log_path: str, seconds: float = 15.0
) -> None:
    """L{wait_accepting} without blocking the reactor."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError("twistd exited with %s: %s" % (process.returncode, _read(log_path)))
        if all(accepts(p) for p in ports):
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("twistd did not listen within %s s: %s" % (seconds, _read(log_path)))


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""
