"""
Several processes (C{twistd fauth --workers N}, C{workers: N}), run as real
processes: the supervisor binds the sockets, the workers share them.

Which worker serves what is read from C{/proc} rather than from the
responses (no test-only header in production answers): a worker's server
side of a connection is an established socket whose local port is the
gateway's, held by that worker's process (C{/proc/net/tcp*} inodes matched
against C{/proc/<pid>/fd}).  Linux only.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from typing import Any, AsyncIterator, Dict, List, Optional, Set, Tuple

import attr
import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool

from fauth.config import ConfigError, parse_config
from tests.adminenv import KEY, REPO_ROOT, TWISTD, Marker, Slow, accepts, free_ports, subprocess_env, write_config
from tests.servers import listen_on_loopback
from tests.tls import self_signed

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/net/tcp"), reason="reads worker connections from /proc (Linux)"
)




# --- /proc ------------------------------------------------------------------------


def _stat(pid: int) -> Optional[List[str]]:
    try:
        with open("/proc/%d/stat" % pid) as f:
            text = f.read()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # [state, ppid, ...]


def alive(pid: int) -> bool:
    """Whether C{pid} runs (a zombie does not)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def children(pid: int) -> List[int]:
    """The running processes whose parent is C{pid}."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                found.append(int(entry))
    return sorted(found)


def established(port: int) -> Set[int]:
    """Socket inodes of the established connections whose local port is C{port}."""
    inodes: Set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def socket_inodes(pid: int) -> Set[int]:
    inodes: Set[int] = set()
    try:
        names = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, name))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def connections_by_process(pids: List[int], port: int) -> Dict[int, int]:
    """How many connections to C{port} each of C{pids} holds."""
    inodes = established(port)
    return {pid: len(socket_inodes(pid) & inodes) for pid in pids}


# --- a supervised gateway -----------------------------------------------------------


@attr.s(auto_attribs=True)
class Supervised:
    """C{twistd -n fauth --workers N} running: its process and log."""

    process: "subprocess.Popen[bytes]"
    log_path: str
    config_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def workers(self) -> List[int]:
        return children(self.process.pid)

    def ready_pids(self) -> List[int]:
        return [int(pid) for pid in re.findall(r"worker \d+ ready: pid (\d+)", self.log())]

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log()))


# Starts twistd as systemd would with one socket (fd 3, LISTEN_FDS=1, LISTEN_FDNAMES,
# LISTEN_PID=its pid): argv[1] is the socket's descriptor here.
_AS_SYSTEMD = (
    "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); "
    "os.environ.update(LISTEN_FDS='1', LISTEN_FDNAMES='http', LISTEN_PID=str(os.getpid())); "
    "os.execv(sys.executable, [sys.executable] + sys.argv[2:])"
)


def start(
    tmp_path: Any,
    doc: Dict[str, Any],
    args: Tuple[str, ...] = ("--workers", "2"),
    systemd_socket: Optional[socket.socket] = None,
) -> Supervised:
    config_path = str(tmp_path / "fauth.yaml")
    log_path = str(tmp_path / "twistd.log")
    write_config(config_path, doc)
    argv = TWISTD + ["fauth", "--config", config_path] + list(args)
    pass_fds: Tuple[int, ...] = ()
    if systemd_socket is not None:
        pass_fds = (systemd_socket.fileno(),)
        argv = [sys.executable, "-c", _AS_SYSTEMD, str(pass_fds[0])] + argv[1:]
    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT, pass_fds=pass_fds
        )
    return Supervised(process, log_path, config_path)


def _check(s: Supervised, ready: int) -> bool:
    if s.process.poll() is not None:
        raise AssertionError("twistd exited with %s: %s" % (s.process.returncode, s.log()))
    return len(s.ready_pids()) >= ready


def wait_ready(s: Supervised, ready: int = 2, seconds: float = 20.0) -> None:
    """Block until C{ready} workers said they are ready (in total, restarts included)."""
    deadline = time.monotonic() + seconds
    while not _check(s, ready):
        if time.monotonic() > deadline:
            raise AssertionError("%d workers not ready within %s s: %s" % (ready, seconds, s.log()))
        time.sleep(0.05)


async def wait_ready_async(reactor: Any, s: Supervised, ready: int = 2, seconds: float = 20.0) -> None:
    """L{wait_ready} without blocking the reactor."""
    deadline = time.monotonic() + seconds
    while not _check(s, ready):
        if time.monotonic() > deadline:
            raise AssertionError("%d workers not ready within %s s: %s" % (ready, seconds, s.log()))
        await deferLater(reactor, 0.05, lambda: None)


def stop(s: Supervised, seconds: float = 15.0) -> int:
    if s.process.poll() is None:
        s.process.send_signal(signal.SIGTERM)
    try:
        return s.process.wait(seconds)
    finally:
        if s.process.poll() is None:
            s.process.kill()
            s.process.wait()
        for pid in children(s.process.pid):
            os.kill(pid, signal.SIGKILL)


async def sleep(reactor: Any, seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


@attr.s(auto_attribs=True)
class Upstreams:
    m0: str
    m1: str
    slow: str
    ports: List[Any]


@async_yield_fixture
async def upstreams(reactor: Any) -> AsyncIterator[Upstreams]:
    ports = [
        await listen_on_loopback(reactor, Marker(b"m0")),
        await listen_on_loopback(reactor, Marker(b"m1")),
        await listen_on_loopback(reactor, Slow(reactor, 0.25)),
    ]
    nodes = ["127.0.0.1:%d" % p.getHost().port for p in ports]
    try:
        yield Upstreams(nodes[0], nodes[1], nodes[2], ports)
    finally:
        for port in ports:
            await port.stopListening()


def _route(route_id: str, uri: str, node: str) -> Dict[str, Any]:
    return {"id": route_id, "uri": uri, "upstream": {"nodes": {node: 1}}}


async def _get(client: HTTPClient, url: str) -> Tuple[int, bytes]:
    response = await client.get(url)
    return response.code, await response.content()


async def _concurrent(reactor: Any, url: str, count: int) -> Tuple[List[Tuple[int, bytes]], HTTPConnectionPool]:
    """C{count} requests at once, each on its own connection; also the pool (to close)."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(Agent(reactor, pool=pool))
    results = await gatherResults([Deferred.fromCoroutine(_get(client, url)) for _ in range(count)])
    return results, pool


async def both_workers_hold_connections(reactor: Any, s: Supervised, port: int, url: str) -> Dict[int, int]:
    """
    Open 16 connections at once, each with a slow request, and count while
    they are in flight which worker holds which; up to 3 rounds, until every
    worker holds some.  The last count.
    """
    counts: Dict[int, int] = {}
    for _ in range(3):
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = HTTPClient(Agent(reactor, pool=pool))
        pending = [Deferred.fromCoroutine(_get(client, url)) for _ in range(16)]
        await sleep(reactor, 0.15)
        counts = connections_by_process([s.process.pid] + s.workers(), port)
        results = await gatherResults(pending)
        assert results == [(200, b"slow")] * 16
        if len(counts) == 3 and all(counts[pid] > 0 for pid in s.workers()):
            break
    return counts


# --- the command line ------------------------------------------------------------------


def test_help_documents_workers() -> None:
    result = subprocess.run(
        TWISTD + ["fauth", "--help"], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    assert "--workers=" in result.stdout
    assert "worker processes" in " ".join(result.stdout.split()).lower()


def test_workers_option_zero_is_refused_in_one_line(tmp_path: Any) -> None:
    config_path = str(tmp_path / "fauth.yaml")
    write_config(config_path, {"listen": ["tcp:0:interface=127.0.0.1"]})
    result = subprocess.run(
        TWISTD + ["fauth", "--config", config_path, "--workers", "0"],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["fauth: --workers must be an integer, 1 or more (not 0)"]


@pytest.mark.parametrize(
    "doc, workers, message",
    [
        ({}, "two", "fauth: --workers must be an integer, 1 or more (not two)"),
        ({"workers": 0}, None, 'fauth: config: property "workers" must be an integer, 1 or more'),
        ({"workers": "2"}, None, 'fauth: config: property "workers" must be an integer, 1 or more'),
        (
            {"listen": ["stdio:"]},
            "2",
            'fauth: config: listen: "stdio:": several workers can share tcp, tcp6, ssl, unix and systemd '
            "listeners only (set workers to 1 for this one)",
        ),
        (
            {"listen": ["stdio:"], "workers": 3},
            None,
            'fauth: config: listen: "stdio:": several workers can share',
        ),
    ],
)
def test_bad_worker_settings_are_refused(
    tmp_path: Any, capsys: Any, doc: Dict[str, Any], workers: Optional[str], message: str
) -> None:
    from fauth.process import tap

    config_path = str(tmp_path / "fauth.yaml")
    write_config(config_path, dict({"listen": ["tcp:0:interface=127.0.0.1"]}, **doc))
    options = tap.Options()
    options.parseOptions(["--config", config_path] + (["--workers", workers] if workers else []))
    with pytest.raises(SystemExit) as exited:
        tap.makeService(options)
    assert exited.value.code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(message)


def test_workers_key() -> None:
    assert parse_config({}).workers == 1
    assert parse_config({"workers": 4}).workers == 4
    for bad in (0, -1, True, 1.5, "2", None):
        with pytest.raises(ConfigError, match='property "workers" must be an integer, 1 or more'):
            parse_config({"workers": bad})


def test_restart_delay_and_exit_description() -> None:
    from twisted.internet.error import ProcessDone, ProcessTerminated
    from twisted.python.failure import Failure

    from fauth.process.children import MAX_RESTART_DELAY, describe_exit, restart_delay

    assert [restart_delay(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.8]
    assert restart_delay(50) == MAX_RESTART_DELAY
    assert describe_exit(Failure(ProcessDone(0))) == "exited with status 0"
    assert describe_exit(Failure(ProcessTerminated(3))) == "exited with status 3"
    assert describe_exit(Failure(ProcessTerminated(None, signal.SIGKILL))) == "killed by signal 9 (SIGKILL)"


def test_new_workers_start_on_the_running_configuration(tmp_path: Any, monkeypatch: Any) -> None:
    """
    What a new worker is given: the document the supervisor runs (after
    reloads), the sections a reload cannot change as they were at start-up,
    and the store's absolute path.
    """
    from twisted.internet.testing import MemoryReactorClock

    from fauth.admin.control import Control
    from fauth.process.supervisor import WorkerSupervisor

    monkeypatch.chdir(tmp_path)
    config_path = str(tmp_path / "fauth.yaml")
    doc: Dict[str, Any] = {
        "listen": ["tcp:8080"],
        "http": {"idle_timeout": 5},
        "admin": {"listen": "tcp:0:interface=127.0.0.1", "keys": [KEY], "store": "store.json"},
        "routes": [_route("a", "/a", "127.0.0.1:1")],
    }
    write_config(config_path, doc)
    supervisor = WorkerSupervisor(Control.from_file(config_path), 2, MemoryReactorClock())
    write_config(
        config_path,
        dict(doc, listen=["tcp:9090"], http={"idle_timeout": 9}, routes=[_route("b", "/b", "127.0.0.1:2")]),
    )
    supervisor.control.reload()
    started = supervisor.worker_document()
    assert started["listen"] == ["tcp:8080"] and started["http"] == {"idle_timeout": 5}
    assert started["routes"] == [_route("b", "/b", "127.0.0.1:2")]
    assert started["admin"]["store"] == str(tmp_path / "store.json")
    assert parse_config(started).routes[0].id == "b"


def test_restarts_back_off_while_workers_keep_exiting() -> None:
    from twisted.internet.error import ProcessTerminated
    from twisted.internet.testing import MemoryReactorClock
    from twisted.python.failure import Failure

    from fauth.admin.control import Control
    from fauth.process.children import MAX_RESTART_DELAY
    from fauth.process.supervisor import WorkerSupervisor

    clock = MemoryReactorClock()
    supervisor = WorkerSupervisor(Control(parse_config({}), config_path="/nonexistent.yaml"), 2, clock)
    spawned: List[int] = []
    supervisor._spawn = lambda slot: spawned.append(slot.index)  # type: ignore[assignment]
    slot = supervisor.slots[0]
    killed = Failure(ProcessTerminated(None, signal.SIGKILL))
    delays = []
    for _ in range(9):
        slot.started = clock.seconds()
        clock.advance(1)  # a quick exit
        supervisor.worker_ended(slot, 4242, killed)
        delays.append(round(slot.restart_call.getTime() - clock.seconds(), 6))
        clock.advance(delays[-1])
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8] and delays[-1] == MAX_RESTART_DELAY
    assert spawned == [1] * 9
    # A worker that ran for a while restarts at once again.
    slot.started = clock.seconds()
    clock.advance(60)
    supervisor.worker_ended(slot, 4243, killed)
    assert round(slot.restart_call.getTime() - clock.seconds(), 6) == 0.1
    # Stopping cancels a pending restart.
    supervisor.stopService()
    clock.advance(1)
    assert spawned == [1] * 9


# --- serving, restarts, parent death ----------------------------------------------


@ensureDeferred
async def test_workers_share_the_socket_a_killed_one_is_replaced_under_load(
    reactor: Any, tmp_path: Any, upstreams: Upstreams
) -> None:
    """
    Two workers serve, both accept connections (the supervisor none); a
    worker killed with SIGKILL under load is replaced, clients lose at most
    the requests it held, later requests all succeed; and when the
    supervisor itself is killed, the workers exit.
    """
    (port,) = free_ports(1)
    doc = {"listen": ["tcp:%d:interface=127.0.0.1" % port], "routes": [_route("s", "/slow", upstreams.slow)]}
    s = start(tmp_path, doc)
    url = "http://127.0.0.1:%d/slow" % port
    try:
        await wait_ready_async(reactor, s, 2)
        first = s.workers()
        assert len(first) == 2 and sorted(s.ready_pids()) == first

        counts = await both_workers_hold_connections(reactor, s, port, url)
        assert counts[s.process.pid] == 0, counts
        assert all(counts[pid] > 0 for pid in first), counts

        # Load: 8 clients, each on its own keep-alive connection, no retries.
        concurrency = 8
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = concurrency
        pool.retryAutomatically = False
        client = HTTPClient(Agent(reactor, pool=pool))
        outcomes: List[Tuple[float, bool]] = []  # (started at, succeeded)
        done = [False]

        async def loop() -> None:
            while not done[0]:
                started = time.monotonic()
                try:
                    ok = await _get(client, url) == (200, b"slow")
                except Exception:
                    ok = False
                outcomes.append((started, ok))

        clients = [Deferred.fromCoroutine(loop()) for _ in range(concurrency)]
        await sleep(reactor, 0.6)
        victim = first[0]
        held = connections_by_process([victim], port)[victim]  # stable: no request has failed yet
        os.kill(victim, signal.SIGKILL)
        await wait_ready_async(reactor, s, 3)
        replaced_at = time.monotonic()
        replacement = [pid for pid in s.workers() if pid not in first]
        assert len(replacement) == 1 and sorted(s.workers()) == sorted([first[1]] + replacement)
        await sleep(reactor, 1.0)
        done[0] = True
        await DeferredList(clients)
        await pool.closeCachedConnections()

        failures = [started for started, ok in outcomes if not ok]
        later = [ok for started, ok in outcomes if started >= replaced_at]
        print(
            "\nworker killed under load: it held %d of %d connections; %d requests, %d failed, "
            "%d started after the replacement was ready" % (held, concurrency, len(outcomes), len(failures), len(later))
        )
        # Only the requests on the killed worker's connections (at most one
        # each) can have failed.
        assert len(failures) <= held <= concurrency
        assert later and all(later)
        assert "(pid %d) killed by signal 9 (SIGKILL) after" % victim in s.log()
        # The replacement accepts on the same socket.
        counts = await both_workers_hold_connections(reactor, s, port, url)
        assert all(counts[pid] > 0 for pid in s.workers()), counts

        # The supervisor disappears: its workers notice and exit.
        workers = s.workers()
        s.process.kill()
        s.process.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            await sleep(reactor, 0.05)
        assert not any(alive(pid) for pid in workers)
    finally:
        stop(s)
    assert "Traceback" not in s.log()


# --- reload, admin API, graceful shutdown -------------------------------------------


@ensureDeferred
async def test_reloads_and_admin_changes_reach_every_worker_and_sigterm_drains(
    reactor: Any, tmp_path: Any, upstreams: Upstreams
) -> None:
    gateway_port, admin_port = free_ports(2)
    doc: Dict[str, Any] = {
        "workers": 2,  # the configuration key, no option
        "listen": ["tcp:%d:interface=127.0.0.1" % gateway_port],
        "admin": {
            "listen": "tcp:%d:interface=127.0.0.1" % admin_port,
            "keys": [KEY],
            "store": str(tmp_path / "store.json"),
        },
        "shutdown_grace": 10,
        "routes": [_route("m", "/m", upstreams.m0), _route("s", "/slow", upstreams.slow)],
    }
    s = start(tmp_path, doc, args=())
    gateway = "http://127.0.0.1:%d" % gateway_port
    admin = "http://127.0.0.1:%d" % admin_port
    pools: List[HTTPConnectionPool] = []

    async def spread(path: str, count: int = 16) -> List[Tuple[int, bytes]]:
        results, pool = await _concurrent(reactor, gateway + path, count)
        pools.append(pool)
        return results

    async def worker_reloads(total: int) -> None:
        deadline = time.monotonic() + 10
        while s.count(r"\[worker \d+, pid \d+, fauth\.admin\.control#info\] reloaded ") < total:
            assert time.monotonic() < deadline, s.log()
            await sleep(reactor, 0.05)

    admin_pool = HTTPConnectionPool(reactor, persistent=False)
    admin_client = HTTPClient(Agent(reactor, pool=admin_pool))
    try:
        await wait_ready_async(reactor, s, 2)
        assert len(s.workers()) == 2
        assert await spread("/m") == [(200, b"m0")] * 16

        # SIGHUP to the supervisor: it reloads, then every worker does.
        doc["routes"][0] = _route("m", "/m", upstreams.m1)
        write_config(s.config_path, doc)
        s.process.send_signal(signal.SIGHUP)
        await worker_reloads(2)
        assert await spread("/m", 24) == [(200, b"m1")] * 24

        # A route through the supervisor's admin API: in the store, then every worker reloads.
        route = {"uri": "/api", "upstream": {"nodes": {upstreams.m0: 1}}}
        response = await admin_client.put(admin + "/apisix/admin/routes/api", json=route, headers={"X-API-KEY": KEY})
        assert response.code == 201, await response.content()
        await response.content()
        await worker_reloads(4)
        assert await spread("/api", 24) == [(200, b"m0")] * 24
        assert await _get(admin_client, admin + "/healthz") == (200, b"ok")

        # SIGTERM: requests in flight on both workers finish, new connections
        # are refused, the supervisor exits 0 once the workers have.
        workers = s.workers()
        pool = HTTPConnectionPool(reactor, persistent=False)
        pools.append(pool)
        client = HTTPClient(Agent(reactor, pool=pool))
        in_flight = [Deferred.fromCoroutine(_get(client, gateway + "/slow")) for _ in range(8)]
        await sleep(reactor, 0.1)
        counts = connections_by_process(workers, gateway_port)
        s.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        refused_after = None
        draining = None
        # Both are polled at once: on a loaded machine the slow requests may
        # finish (and the supervisor exit) soon after the listeners close.
        while time.monotonic() - signalled < 1.0 and (refused_after is None or draining is None):
            if refused_after is None and not accepts(gateway_port):
                refused_after = time.monotonic() - signalled
            if draining is None:
                health = await _get(admin_client, admin + "/healthz")
                if health[0] == 503:
                    draining = health
            await sleep(reactor, 0.01)
        assert await gatherResults(in_flight) == [(200, b"slow")] * 8
        deadline = time.monotonic() + 10
        while s.process.poll() is None and time.monotonic() < deadline:
            await sleep(reactor, 0.05)
        code = s.process.poll()
        print("\nSIGTERM: 8 requests in flight on %s; refused new connections after %s s" % (counts, refused_after))
        assert code == 0, s.log()
        assert refused_after is not None and refused_after < 0.5
        assert draining == (503, b"draining")
        assert not any(alive(pid) for pid in workers)
        assert s.count(r"fauth\.process\.service#info\] all requests finished; stopping") == 2
        assert "all workers exited; stopping" in s.log()
    finally:
        for pool in pools + [admin_pool]:
            await pool.closeCachedConnections()
        stop(s)
    assert "Traceback" not in s.log()


# --- UNIX, TLS and IPv6 listeners -------------------------------------------------------




def _http_get(sock: Any, host: str = "localhost") -> Tuple[int, Dict[str, Any]]:
    """A GET /headers on a connected socket; the status and the echoed JSON."""
    with sock:
        sock.settimeout(10)
        sock.sendall(b"GET /headers HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host.encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if status == 200 else {}


def _unix_get(path: str) -> Tuple[int, Dict[str, Any]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return _http_get(sock)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_unix_tls_ipv6_and_systemd_listeners_are_shared(tmp_path: Any) -> None:
    """
    UNIX (mode kept), TLS (the workers wrap), IPv6 and systemd listeners;
    the demo services run in the supervisor.  A worker stopped on its own (SIGTERM to
    it) is replaced and the UNIX socket keeps working throughout: the
    worker neither shuts the shared socket down nor removes its file.
    """
    tls_port, v6_port, auth_port, upstream_port = free_ports(4)
    unix_path = str(tmp_path / "fauth.sock")
    key_path, cert_path = self_signed(tmp_path)
    listen = [
        "unix:%s:mode=600" % unix_path,
        "ssl:%d:interface=127.0.0.1:privateKey=%s:certKey=%s" % (tls_port, key_path, cert_path),
    ]
    ipv6 = _ipv6_loopback()
    if ipv6:
        listen.append("tcp:%d:interface=\\:\\:1" % v6_port)
    systemd = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    systemd.bind(("127.0.0.1", 0))
    systemd.listen(50)
    systemd_port = systemd.getsockname()[1]
    listen.append("systemd:domain=INET:index=0")
    doc = {
        "listen": listen,
        "demo": {
            "auth": "tcp:%d:interface=127.0.0.1" % auth_port,
            "upstream": "tcp:%d:interface=127.0.0.1" % upstream_port,
        },
        "shutdown_grace": 5,
        "routes": [_route("h", "/headers", "127.0.0.1:%d" % upstream_port)],
    }
    s = start(tmp_path, doc, systemd_socket=systemd)
    systemd.close()  # the gateway's now
    try:
        wait_ready(s, 2)
        assert stat.S_IMODE(os.stat(unix_path).st_mode) == 0o600
        systemd_connection = socket.create_connection(("127.0.0.1", systemd_port))
        assert _http_get(systemd_connection)[0] == 200
        for _ in range(4):
            assert _unix_get(unix_path)[0] == 200
        context = ssl.create_default_context(cafile=cert_path)
        tls = context.wrap_socket(socket.create_connection(("127.0.0.1", tls_port)), server_hostname="127.0.0.1")
        status, echoed = _http_get(tls)
        assert status == 200 and echoed["headers"]["X-Forwarded-Proto"] == "https"
        if ipv6:
            status, echoed = _http_get(socket.create_connection(("::1", v6_port)), host="[::1]")
            assert status == 200 and echoed["headers"]["X-Forwarded-For"] == "::1"

        # One worker stops on its own, drains, exits 0 and is replaced; the
        # other one alone serves meanwhile, on the same socket and file.
        first = s.workers()
        os.kill(first[0], signal.SIGTERM)
        deadline = time.monotonic() + 10
        while alive(first[0]):
            assert time.monotonic() < deadline, s.log()
            time.sleep(0.01)
        for _ in range(4):
            assert _unix_get(unix_path)[0] == 200
        alone = len(s.ready_pids()) == 2
        wait_ready(s, 3)
        assert len(s.workers()) == 2 and first[1] in s.workers()
        assert "(pid %d) exited with status 0 after" % first[0] in s.log()
        assert stat.S_IMODE(os.stat(unix_path).st_mode) == 0o600
        for _ in range(4):
            assert _unix_get(unix_path)[0] == 200
    finally:
        code = stop(s)
    print("\nUNIX socket served by the remaining worker alone: %s" % alone)
    assert code == 0, s.log()
    assert not os.path.exists(unix_path)
    assert "Traceback" not in s.log()
