"""
The command line: C{twist fauth} and C{twistd -n fauth}, run as real
processes from the repository root (so C{twisted/plugins/fauth_plugin.py}
is found through C{PYTHONPATH}).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Tuple

import pytest

from tests.adminenv import free_ports, refused_start_line
from pytest_twisted import ensureDeferred
from treq.client import HTTPClient
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(REPO_ROOT, "conf", "fauth.yaml")

TWIST = [sys.executable, "-m", "twisted"]
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]
RUNNERS = {"twist": TWIST, "twistd": TWISTD}

BAD_TIMEOUT_CONFIG = """\
routes:
  - id: "r1"
    uri: /a
    plugins:
      forward-auth:
        uri: http://127.0.0.1:9999/
        timeout: 0
    upstream:
      nodes: {"127.0.0.1:1980": 1}
"""
BAD_TIMEOUT_MESSAGE = (
    'fauth: route "r1": plugin forward-auth: property "timeout" validation failed: '
    "expected 0 to be at least 1"
)


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    parts = [REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def run(argv: List[str], timeout: float = 30.0) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        argv, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )


# --- refusals and help ------------------------------------------------------


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_bad_config_exits_with_one_line(runner: str, tmp_path: Any) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_TIMEOUT_CONFIG)
    result = run(RUNNERS[runner] + ["fauth", "--config", str(path)])
    assert result.returncode != 0
    assert BAD_TIMEOUT_MESSAGE in result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stdout


def test_missing_config_file_exits_with_one_line(tmp_path: Any) -> None:
    path = str(tmp_path / "absent.yaml")
    assert path in refused_start_line(path)


def test_twistd_help_mentions_config() -> None:
    result = run(TWISTD + ["fauth", "--help"])
    assert result.returncode == 0
    assert "--config" in result.stdout


# --- --version and --check --------------------------------------------------

FAUTH = [sys.executable, "-m", "fauth"]
ALL_RUNNERS = dict(RUNNERS, fauth=FAUTH)


def _argv(runner: str, *args: str) -> List[str]:
    # `python -m fauth` takes fauth's options directly; twist/twistd after the subcommand.
    return ALL_RUNNERS[runner] + ([] if runner == "fauth" else ["fauth"]) + list(args)


@pytest.mark.parametrize("runner", sorted(ALL_RUNNERS))
def test_version_is_fauths(runner: str) -> None:
    from fauth import __version__

    result = run(_argv(runner, "--version"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("fauth %s (Twisted " % __version__)


@pytest.mark.parametrize("runner", sorted(ALL_RUNNERS))
def test_check_prints_what_would_be_served_and_binds_nothing(runner: str, tmp_path: Any) -> None:
    path, gateway, auth, upstream = quickstart_copy(tmp_path)
    # The gateway's own port is held by someone else: a check that bound it would fail.
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", gateway))
    holder.listen(1)
    try:
        result = run(_argv(runner, "--config", path, "--check"))
    finally:
        holder.close()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "listen: tcp:%d" % gateway in lines
    assert (
        "  route 'headers': /headers; methods GET; forward-auth GET http://127.0.0.1:%d/; "
        "upstream http://127.0.0.1:%d(1)" % (auth, upstream)
    ) in lines
    assert lines[-1] == "fauth: configuration %s is valid" % path
    assert not _accepts(auth) and not _accepts(upstream)


@pytest.mark.parametrize("runner", sorted(ALL_RUNNERS))
def test_check_refuses_a_bad_config_with_one_line(runner: str, tmp_path: Any) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_TIMEOUT_CONFIG)
    result = run(_argv(runner, "--config", str(path), "--check"))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [BAD_TIMEOUT_MESSAGE]
    assert "valid" not in result.stdout


# --- the quickstart, for real ----------------------------------------------




def quickstart_copy(tmp_path: Any) -> Tuple[str, int, int, int]:
    """conf/fauth.yaml with its three ports replaced by free ones."""
    gateway, auth, upstream = free_ports(3)
    with open(QUICKSTART) as f:
        text = f.read()
    for old, new in (("9080", gateway), ("9999", auth), ("1980", upstream)):
        assert old in text
        text = text.replace(old, str(new))
    path = tmp_path / "fauth.yaml"
    path.write_text(text)
    return str(path), gateway, auth, upstream


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


async def wait_until_listening(reactor: Any, process: "subprocess.Popen[bytes]", ports: List[int], log: Any) -> None:
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail("gateway exited with %s: %s" % (process.returncode, log.read_text()))
        if all(_accepts(port) for port in ports):
            return
        await deferLater(reactor, 0.05, lambda: None)
    pytest.fail("gateway did not listen within 10 s: %s" % log.read_text())


async def wait_for_exit(reactor: Any, process: "subprocess.Popen[bytes]", seconds: float = 10.0) -> int:
    deadline = time.monotonic() + seconds
    while process.poll() is None and time.monotonic() < deadline:
        await deferLater(reactor, 0.05, lambda: None)
    if process.returncode is None:
        process.kill()
        process.wait()
        pytest.fail("gateway did not exit within %s s of SIGTERM" % seconds)
    return process.returncode


@pytest.mark.parametrize("runner", sorted(RUNNERS))
@ensureDeferred
async def test_quickstart_serves_the_seed_examples(runner: str, reactor: Any, tmp_path: Any) -> None:
    path, gateway_port, auth_port, upstream_port = quickstart_copy(tmp_path)
    log = tmp_path / "output.log"
    with open(str(log), "wb") as out:
        process = subprocess.Popen(
            RUNNERS[runner] + ["fauth", "--config", path],
            cwd=REPO_ROOT,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(Agent(reactor, pool=pool))
    base = "http://127.0.0.1:%d" % gateway_port
    try:
        await wait_until_listening(reactor, process, [gateway_port, auth_port, upstream_port], log)

        # curl -i http://127.0.0.1:9080/headers -H 'Authorization: 321'
        response = await client.get(base + "/headers", headers={"Authorization": "321"})
        body = await response.content()
        assert response.code == 200
        assert json.loads(body)["headers"]["X-User-Id"] == "i-am-user"

        # curl -i http://127.0.0.1:9080/headers
        response = await client.get(base + "/headers")
        await response.content()
        assert response.code == 403
        assert response.headers.getRawHeaders(b"location") == [b"http://example.com/auth"]

        # curl -i -X POST http://127.0.0.1:9080/post -d '{"tenant_id": 123}'
        response = await client.post(base + "/post", json={"tenant_id": 123})
        body = await response.content()
        assert response.code == 200
        echoed = json.loads(body)
        assert echoed["json"] == {"tenant_id": 123}
        assert echoed["headers"]["X-User-Id"] == "i-am-user"

        response = await client.post(base + "/post", json={"abc": 123})
        body = await response.content()
        assert response.code == 400
        assert body == b"tenant_id is required"
    finally:
        await pool.closeCachedConnections()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        code = await wait_for_exit(reactor, process)
    # Twisted ends a SIGTERM shutdown by re-raising the signal at itself.
    assert code in (0, -signal.SIGTERM), log.read_text()
    assert "Main loop terminated" in log.read_text()
    assert not _accepts(gateway_port)
    assert "Traceback" not in log.read_text()
