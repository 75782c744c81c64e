"""
Fault injection, end to end, on both legs: a real gateway on loopback in
front of raw-protocol auth services and upstreams that misbehave on cue
(refuse, stall, reset, send garbage, frame bodies wrongly, flood).

Every case checks the same five things:

  1. the documented answer (C{status_on_error}, 502, 504, the auth
     service's own answer, or an aborted client connection after the
     response head went out), within the configured timeout plus a margin;
  2. a log line saying what happened (or none for events that are not
     failures, such as a pooled connection closed while idle);
  3. no leak: the connections where the fault happened are closed by the
     gateway without waiting for its pools to be closed, the mock servers
     see no connection left after C{gateway.stop()}, and the process has as
     many file descriptors at the end as before the test;
  4. everyone else is served meanwhile (a request on a healthy route during
     the fault);
  5. the next request through the same gateway is served normally.

The auth leg's own suite (tests/test_auth_leg.py) and the upstream suite
(tests/test_proxy_e2e.py) cover some of these failures one at a time with
narrower assertions; this module is the systematic table, plus uploads on
pooled upstream connections (spooled bodies, an upstream answering before
the body is sent) and a client leaving while the auth connection is still
being set up.
"""
from __future__ import annotations

import hashlib
import os
import socket
import time
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Union

import attr
import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.defer import ensureDeferred as as_deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Cooperator, deferLater
from zope.interface import implementer

from tests.rawserver import Handler, RawConnection, RawServer, Seen
from tests.harness import GatewayUnderTest, LogCapture, raw_request, start_gateway

MiB = 1024 * 1024
# The auth leg: timeout (ms in the config) and the status it fails with.
AUTH_TIMEOUT = 0.5
STATUS_ON_ERROR = 503
# The upstream leg: the response head must arrive within send + read; the
# body may then be idle for at most read.
UPSTREAM_TIMEOUT = {"connect": 1, "send": 0.3, "read": 0.3}
UPSTREAM_HEAD_TIMEOUT = 0.6
UPSTREAM_BODY_IDLE = 0.3
MARGIN = 1.0
FAILED = "failed to process forward auth, err: "
ABORTED = "aborted"  # expected outcome: the client connection is aborted mid-response


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


def sleep(reactor: Any, seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


async def eventually(reactor: Any, predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await sleep(reactor, 0.01)
    return True


def open_fds() -> List[str]:
    return sorted(os.listdir("/proc/self/fd"))


def _describe_fds(fds: Any) -> List[str]:
    out = []
    for fd in sorted(fds):
        try:
            out.append("%s -> %s" % (fd, os.readlink("/proc/self/fd/%s" % fd)))
        except OSError:
            pass
    return out


# ---------------------------------------------------------------------------
# A raw HTTP/1.1 server whose next answer(s) can be made to misbehave


def auth_ok(conn: RawConnection, seen: Seen) -> None:
    conn.respond(200, ((b"X-User-ID", b"user-%d" % len(conn.server.requests)),))


def upstream_ok(conn: RawConnection, seen: Seen) -> None:
    user = seen.values(b"x-user-id")
    conn.respond(200, ((b"Content-Type", b"text/plain"),), b"upstream ok " + (user[0] if user else b"-"))


@implementer(IPushProducer)
class Flood:
    """Writes C{total} body bytes as fast as the peer reads them, honouring backpressure."""

    def __init__(self, conn: RawConnection, total: int) -> None:
        self._conn = conn
        self.total = total
        self.sent = 0
        self._paused = False
        self._stopped = False
        self._call: Any = None

    def start(self) -> None:
        self._conn.flood = self
        self._conn.transport.registerProducer(self, True)
        self._schedule()

    def _schedule(self) -> None:
        if not self._stopped and (self._call is None or not self._call.active()):
            self._call = self._conn.server.reactor.callLater(0, self._run)

    def _run(self) -> None:
        chunk = b"x" * (64 * 1024)
        for _ in range(16):
            if self._paused or self._stopped:
                return
            if self.sent >= self.total:
                self._conn.transport.unregisterProducer()
                self._stopped = True
                return
            size = min(len(chunk), self.total - self.sent)
            self.sent += size
            self._conn.write(chunk if size == len(chunk) else chunk[:size])
        self._schedule()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()


# ---------------------------------------------------------------------------
# Faults (the same misbehaviour serves as an auth service's or an upstream's)


HEAD_1000 = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n"


def never_answers(conn: RawConnection, seen: Seen) -> None:
    pass


def stalls_body(conn: RawConnection, seen: Seen) -> None:
    conn.write(HEAD_1000 + b"0123456789")


def resets_before_answering(conn: RawConnection, seen: Seen) -> None:
    conn.transport.abortConnection()


def resets_mid_body(conn: RawConnection, seen: Seen) -> None:
    conn.write(HEAD_1000 + b"0123456789")
    # Later, so that the head and the first bytes are on the wire before the RST.
    conn.server.reactor.callLater(0.05, conn.transport.abortConnection)


def closes_without_answering(conn: RawConnection, seen: Seen) -> None:
    conn.transport.loseConnection()


def malformed_status_line(conn: RawConnection, seen: Seen) -> None:
    conn.write(b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok")


def header_without_colon(conn: RawConnection, seen: Seen) -> None:
    conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-User-ID user-1\r\n\r\nok")


def header_with_nul(conn: RawConnection, seen: Seen) -> None:
    conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-User-ID: user\x00admin\r\n\r\nok")


# A whole second response after the first one's Content-Length: read as the
# answer to the next request, it would be a desynchronised connection.
STRAY = b"HTTP/1.1 401 Stray\r\nContent-Length: 5\r\n\r\nstray"


def body_longer_than_content_length(conn: RawConnection, seen: Seen) -> None:
    conn.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-User-ID: user-x\r\nContent-Length: 2\r\n\r\nok" + STRAY)


def stray_response_while_idle(conn: RawConnection, seen: Seen) -> None:
    conn.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-User-ID: user-x\r\nContent-Length: 2\r\n\r\nok")
    conn.server.reactor.callLater(0.02, conn.write, STRAY)


def obs_fold(conn: RawConnection, seen: Seen) -> None:
    conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-User-ID: user\r\n admin\r\n\r\nok")


def header_line_of_100_kib(conn: RawConnection, seen: Seen) -> None:
    conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Big: " + b"b" * (100 * 1024) + b"\r\n\r\nok")


def body_shorter_then_close(conn: RawConnection, seen: Seen) -> None:
    conn.write(HEAD_1000 + b"0123456789")
    conn.transport.loseConnection()


def body_of_100_mib(conn: RawConnection, seen: Seen) -> None:
    conn.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % (100 * MiB))
    Flood(conn, 100 * MiB).start()


def ten_thousand_headers(conn: RawConnection, seen: Seen) -> None:
    headers = b"".join(b"X-Header-%d: value-%d\r\n" % (i, i) for i in range(10000))
    conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + headers + b"\r\nok")


def closes_when_idle(conn: RawConnection, seen: Seen) -> None:
    conn.server.normal(conn, seen)
    conn.server.reactor.callLater(0.02, conn.transport.loseConnection)


REFUSES = "refuses"  # not a handler: the server stops listening
BLACKHOLE = "connect-hangs"  # not a handler: its port's accept queue is full, SYNs go unanswered


class Blackhole:
    """A port whose accept queue is full: a connection attempt neither succeeds nor fails."""

    def __init__(self, port: int) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(0)
        self.fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            self.fillers.append(filler)

    def close(self) -> None:
        for sock in self.fillers + [self.listener]:
            sock.close()


@attr.s(auto_attribs=True, frozen=True)
class Case:
    id: str
    fault: Union[Handler, str]
    expect: Union[int, str]  # a status, or ABORTED
    log: Optional[str]  # None: no warning at all
    bound: float  # seconds the answer may take (plus MARGIN)
    check: Optional[Callable[["Stack", "Outcome"], None]] = None


# ---------------------------------------------------------------------------
# A client that keeps what it needs and notes how the connection ended


class Outcome:
    """One response as the client saw it: status lines, head, body size, how the connection ended."""

    def __init__(self, raw_head: bytes, received: int, clean: bool, elapsed: float) -> None:
        self.raw = raw_head
        self.clean = clean
        self.elapsed = elapsed
        self.status_lines = raw_head.count(b"HTTP/1.1 ") + raw_head.count(b"HTTP/1.0 ")
        head, sep, rest = raw_head.partition(b"\r\n\r\n")
        self.has_head = bool(sep)
        self.status = 0
        self.headers: Dict[bytes, List[bytes]] = {}
        self.length: Optional[int] = None
        self.body_size = 0
        self.body = b""
        if sep:
            lines = head.split(b"\r\n")
            self.status = int(lines[0].split(b" ")[1])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                self.headers.setdefault(name.strip().lower(), []).append(value.strip())
            if b"content-length" in self.headers:
                self.length = int(self.headers[b"content-length"][0])
            self.body_size = received - len(head) - 4
            self.body = rest

    @property
    def complete(self) -> bool:
        return self.has_head and self.length is not None and self.body_size == self.length

    def __repr__(self) -> str:
        return "<Outcome status=%d lines=%d length=%r body=%d clean=%r %.3fs %r>" % (
            self.status, self.status_lines, self.length, self.body_size, self.clean, self.elapsed, self.raw[:200],
        )


class _Client(Protocol):
    KEEP = 64 * 1024  # bytes kept; the rest is only counted

    def __init__(self, payload: bytes, done: Deferred) -> None:
        self._payload = payload
        self._done = done
        self._kept: List[bytes] = []
        self._kept_size = 0
        self.received = 0

    def connectionMade(self) -> None:
        self.transport.write(self._payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self._kept_size < self.KEEP:
            self._kept.append(data)
            self._kept_size += len(data)

    def connectionLost(self, reason: Any = None) -> None:
        clean = bool(reason is not None and reason.check(net_error.ConnectionDone))
        self._done.callback((b"".join(self._kept), self.received, clean))


async def fetch(reactor: Any, port: int, path: str, timeout: float = 30.0) -> Outcome:
    payload = b"GET %s HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n" % path.encode()
    done: Deferred = Deferred()
    started = time.monotonic()
    protocol = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
        Factory.forProtocol(lambda: _Client(payload, done))
    )
    timer = reactor.callLater(timeout, protocol.transport.abortConnection)
    try:
        raw, received, clean = await done
    finally:
        if timer.active():
            timer.cancel()
    return Outcome(raw, received, clean, time.monotonic() - started)


# ---------------------------------------------------------------------------
# The stack under test


class Stack:
    """
    The faulty server (an auth service or an upstream), a healthy route next
    to it, and the gateway; torn down with the leak checks.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.fds_before = open_fds()
        self.servers: List[RawServer] = []
        self.gw: Optional[GatewayUnderTest] = None
        self.faulty: Optional[RawServer] = None
        self.upstream: Optional[RawServer] = None
        self.holes: List[Blackhole] = []

    async def server(self, normal: Handler) -> RawServer:
        server = RawServer(self.reactor, normal)
        await server.listen()
        self.servers.append(server)
        return server

    async def auth_leg(self, **plugin: Any) -> GatewayUnderTest:
        """C{/f} asks the faulty auth service, C{/o} a healthy one; both proxy to one upstream."""
        self.faulty = await self.server(auth_ok)
        healthy = await self.server(auth_ok)
        self.upstream = await self.server(upstream_ok)

        def route(rid: str, uri: str, auth: RawServer) -> Dict[str, Any]:
            conf = dict(
                {
                    "uri": "http://%s/auth" % auth.netloc,
                    "timeout": int(AUTH_TIMEOUT * 1000),
                    "status_on_error": STATUS_ON_ERROR,
                    "upstream_headers": ["X-User-ID"],
                    "keepalive_pool": 2,
                },
                **plugin,
            )
            return {
                "id": rid,
                "uri": uri,
                "plugins": {"forward-auth": conf},
                "upstream": {"nodes": {self.upstream.netloc: 1}, "timeout": UPSTREAM_TIMEOUT},
            }

        doc = {"routes": [route("f", "/f", self.faulty), route("o", "/o", healthy)]}
        self.gw = await start_gateway(self.reactor, doc)
        return self.gw

    async def upstream_leg(self) -> GatewayUnderTest:
        """C{/f} proxies to the faulty upstream, C{/o} to a healthy one (no auth on either)."""
        self.faulty = await self.server(upstream_ok)
        healthy = await self.server(upstream_ok)
        doc = {
            "routes": [
                {"id": "f", "uri": "/f", "upstream": {"nodes": {self.faulty.netloc: 1}, "timeout": UPSTREAM_TIMEOUT}},
                {"id": "o", "uri": "/o", "upstream": {"nodes": {healthy.netloc: 1}, "timeout": UPSTREAM_TIMEOUT}},
            ]
        }
        self.gw = await start_gateway(self.reactor, doc)
        return self.gw

    async def fetch(self, path: str) -> Outcome:
        assert self.gw is not None
        return await fetch(self.reactor, self.gw.port_number, path)

    async def close(self, check: bool) -> None:
        if self.gw is not None:
            await self.gw.stop()
        if check:
            # Pools closed: nothing may be left open towards any server.
            assert await eventually(
                self.reactor, lambda: not any(s.open_connections for s in self.servers)
            ), [(s.netloc, len(s.open_connections)) for s in self.servers]
        for server in self.servers:
            await server.close()
        for hole in self.holes:
            hole.close()
        if check:
            ok = await eventually(self.reactor, lambda: len(open_fds()) <= len(self.fds_before))
            assert ok, "file descriptors leaked: %r" % (_describe_fds(set(open_fds()) - set(self.fds_before)),)


@async_yield_fixture
async def stack(reactor: Any) -> AsyncIterator[Stack]:
    # Twisted keeps one descriptor in reserve for its listening ports, opened
    # on the first listen: make sure it is open before the count is taken.
    reserve = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
    await reserve.stopListening()
    s = Stack(reactor)
    passed = False
    try:
        yield s
        passed = True
    finally:
        # The leak checks run only when the test body passed (not to hide its failure).
        await s.close(check=passed)


async def exercise(stack: Stack, case: Case, healthy_expect: bytes) -> Outcome:
    """Inject the fault on C{/f}, serve C{/o} meanwhile, then C{/f} again; assert the common checks."""
    reactor = stack.reactor
    faulty = stack.faulty
    assert faulty is not None
    if case.fault == REFUSES:
        await faulty.stop_listening()
    elif case.fault == BLACKHOLE:
        await faulty.stop_listening()
        stack.holes.append(Blackhole(faulty.port_number))
    else:
        faulty.arm(case.fault)  # type: ignore[arg-type]
    with LogCapture() as logs:
        pending = as_deferred(stack.fetch("/f"))
        other = await stack.fetch("/o")
        outcome = await pending
        # Faulty connections are closed by the gateway itself, not when its pools close.
        closed = await eventually(reactor, lambda: all(c.lost for c in faulty.connections if c.faulted))
    # 4. everyone else was served while the fault was in flight
    assert other.status == 200 and other.complete, other
    assert other.body.startswith(healthy_expect), other
    assert other.elapsed < 1.0 + (5.0 if case.id == "body-100MiB" else 0), other
    # 1. the documented answer, in time
    if case.expect == ABORTED:
        # The head went out before the failure: the connection is aborted,
        # never completed and never answered a second time.
        assert outcome.status_lines <= 1, outcome
        assert not outcome.complete, outcome
        assert not outcome.clean, outcome
        if outcome.has_head:
            assert outcome.status == 200, outcome
    else:
        assert outcome.status == case.expect, outcome
        assert outcome.status_lines == 1, outcome
        assert outcome.complete, outcome
    assert outcome.elapsed <= case.bound + MARGIN, outcome
    # 2. a log line saying what happened
    warnings = [line for line in logs.lines if "fail" in line or "abort" in line or "timed out" in line]
    if case.log is None:
        assert warnings == [], logs.lines
    else:
        assert logs.contains(case.log), logs.lines
    # 3. no connection left open where a failure happened (a complete
    # response may leave its connection in the pool)
    if case.log is not None:
        assert closed, [(c.index, c.faulted, c.lost) for c in faulty.connections]
    if case.check is not None:
        case.check(stack, outcome)
    # 5. the next request through the same gateway
    with LogCapture() as logs:
        again = await stack.fetch("/o" if case.fault in (REFUSES, BLACKHOLE) else "/f")
    assert again.status == 200 and again.complete, again
    assert again.body.startswith(healthy_expect), again
    assert not logs.contains("fail"), logs.lines
    return outcome


# ---------------------------------------------------------------------------
# Auth service faults


def _flood_stopped_early(stack: Stack, outcome: Outcome) -> None:
    assert stack.faulty is not None
    floods = [c.flood for c in stack.faulty.connections if c.flood is not None]
    assert len(floods) == 1
    # The gateway read about 1 MiB and hung up; kernel buffers account for the rest.
    assert floods[0].sent < 24 * MiB, floods[0].sent


def _fresh_connection_after_stray_bytes(stack: Stack, outcome: Outcome) -> None:
    # The connection that carried bytes past the end of a response is not reused.
    assert stack.faulty is not None
    tainted = [c for c in stack.faulty.connections if c.faulted]
    assert len(tainted) == 1 and tainted[0].lost


def _upstream_saw_auth_user(stack: Stack, outcome: Outcome) -> None:
    # The auth answer (framed by its Content-Length) was used, the stray one ignored.
    assert outcome.body == b"upstream ok user-x", outcome


AUTH_CASES = [
    Case("refuses", REFUSES, STATUS_ON_ERROR, FAILED + "connection refused", AUTH_TIMEOUT),
    Case("connect-hangs", BLACKHOLE, STATUS_ON_ERROR, FAILED + "timeout", AUTH_TIMEOUT),
    Case("never-answers", never_answers, STATUS_ON_ERROR, FAILED + "timeout", AUTH_TIMEOUT),
    Case("stalls-body", stalls_body, STATUS_ON_ERROR, FAILED + "timeout", AUTH_TIMEOUT),
    Case("reset-before-answer", resets_before_answering, STATUS_ON_ERROR, FAILED + "closed", AUTH_TIMEOUT),
    Case("reset-mid-body", resets_mid_body, STATUS_ON_ERROR, FAILED + "closed", AUTH_TIMEOUT),
    Case("closes-without-answer", closes_without_answering, STATUS_ON_ERROR, FAILED + "closed", AUTH_TIMEOUT),
    Case("malformed-status-line", malformed_status_line, STATUS_ON_ERROR, FAILED + "bad response", AUTH_TIMEOUT),
    Case("header-without-colon", header_without_colon, STATUS_ON_ERROR, FAILED + "bad response", AUTH_TIMEOUT),
    Case("header-with-nul", header_with_nul, STATUS_ON_ERROR, FAILED + "bad response", AUTH_TIMEOUT),
    Case(
        "body-longer-than-content-length",
        body_longer_than_content_length,
        200,
        "bytes after the end of a response",
        AUTH_TIMEOUT,
        lambda s, o: (_fresh_connection_after_stray_bytes(s, o), _upstream_saw_auth_user(s, o)),
    ),
    Case(
        "stray-response-while-idle",
        stray_response_while_idle,
        200,
        "bytes after the end of a response",
        AUTH_TIMEOUT,
        lambda s, o: (_fresh_connection_after_stray_bytes(s, o), _upstream_saw_auth_user(s, o)),
    ),
    Case("obs-fold", obs_fold, STATUS_ON_ERROR, FAILED + "bad response: obsolete line folding", AUTH_TIMEOUT),
    Case(
        "header-line-100KiB", header_line_of_100_kib, STATUS_ON_ERROR, FAILED + "bad response: response head too large",
        AUTH_TIMEOUT,
    ),
    Case("body-shorter-then-close", body_shorter_then_close, STATUS_ON_ERROR, FAILED + "closed", AUTH_TIMEOUT),
    Case(
        "body-100MiB", body_of_100_mib, STATUS_ON_ERROR, FAILED + "response body too large", AUTH_TIMEOUT,
        _flood_stopped_early,
    ),
    Case("10000-headers", ten_thousand_headers, STATUS_ON_ERROR, FAILED + "bad response: too many headers", AUTH_TIMEOUT),
    Case("closes-idle-pooled-connection", closes_when_idle, 200, None, AUTH_TIMEOUT),
]


@pytest.mark.parametrize("case", AUTH_CASES, ids=[c.id for c in AUTH_CASES])
@ensureDeferred
async def test_auth_fault(stack: Stack, case: Case) -> None:
    await stack.auth_leg()
    await exercise(stack, case, b"upstream ok user-")
    if case.expect == STATUS_ON_ERROR:
        assert stack.upstream is not None
        # Fail closed: the faulty route's request never reached the upstream.
        assert len(stack.upstream.requests) == 2  # /o during the fault, /f after it


DEGRADED = [c for c in AUTH_CASES if c.expect == STATUS_ON_ERROR]


@pytest.mark.parametrize("case", DEGRADED, ids=[c.id for c in DEGRADED])
@ensureDeferred
async def test_auth_fault_with_allow_degradation(stack: Stack, case: Case) -> None:
    await stack.auth_leg(allow_degradation=True)
    degraded = attr.evolve(case, expect=200)
    outcome = await exercise(stack, degraded, b"upstream ok user-")
    # Let through unchanged: no identity from a failed (or half-read) auth answer.
    assert outcome.body == b"upstream ok -", outcome


@pytest.mark.parametrize("leg", ["auth", "upstream"])
@ensureDeferred
async def test_service_comes_back_after_being_down(stack: Stack, leg: str) -> None:
    if leg == "auth":
        await stack.auth_leg()
        expect, log = STATUS_ON_ERROR, FAILED + "connection refused"
    else:
        await stack.upstream_leg()
        expect, log = 502, "failed: connection refused"
    faulty = stack.faulty
    assert faulty is not None
    assert (await stack.fetch("/f")).status == 200
    await faulty.close()  # down: its pooled connection goes too
    for _ in range(3):
        with LogCapture() as logs:
            outcome = await stack.fetch("/f")
        assert outcome.status == expect and outcome.complete, outcome
        assert outcome.elapsed < 1.0, outcome
        assert logs.contains(log), logs.lines
    await faulty.listen()  # back, on the same port; the gateway is not restarted
    for _ in range(3):
        with LogCapture() as logs:
            outcome = await stack.fetch("/f")
        assert outcome.status == 200 and outcome.complete, outcome
        assert not logs.contains("fail"), logs.lines


# ---------------------------------------------------------------------------
# Upstream faults


def _whole_100_mib(stack: Stack, outcome: Outcome) -> None:
    # Streamed through, not a fault of the upstream: all of it arrives.
    assert outcome.body_size == 100 * MiB


def _stray_not_relayed(stack: Stack, outcome: Outcome) -> None:
    assert outcome.body == b"ok", outcome
    _fresh_connection_after_stray_bytes(stack, outcome)


UP_TIMEOUT = "upstream read timed out in the body; aborting the client connection"
UP_FAILED = "failed: "
UPSTREAM_CASES = [
    Case("refuses", REFUSES, 502, UP_FAILED + "connection refused", UPSTREAM_HEAD_TIMEOUT),
    Case("connect-hangs", BLACKHOLE, 504, UP_FAILED + "timeout", UPSTREAM_HEAD_TIMEOUT),
    Case("never-answers", never_answers, 504, UP_FAILED + "timeout", UPSTREAM_HEAD_TIMEOUT),
    Case("stalls-body", stalls_body, ABORTED, UP_TIMEOUT, UPSTREAM_BODY_IDLE),
    Case("reset-before-answer", resets_before_answering, 502, UP_FAILED + "closed", UPSTREAM_HEAD_TIMEOUT),
    Case("reset-mid-body", resets_mid_body, ABORTED, "upstream failed mid-body: closed", UPSTREAM_HEAD_TIMEOUT),
    Case("closes-without-answer", closes_without_answering, 502, UP_FAILED + "closed", UPSTREAM_HEAD_TIMEOUT),
    Case("malformed-status-line", malformed_status_line, 502, UP_FAILED + "bad response", UPSTREAM_HEAD_TIMEOUT),
    Case("header-without-colon", header_without_colon, 502, UP_FAILED + "bad response", UPSTREAM_HEAD_TIMEOUT),
    Case("header-with-nul", header_with_nul, 502, UP_FAILED + "bad response", UPSTREAM_HEAD_TIMEOUT),
    Case(
        "body-longer-than-content-length",
        body_longer_than_content_length,
        200,
        "bytes after the end of a response",
        UPSTREAM_HEAD_TIMEOUT,
        _stray_not_relayed,
    ),
    Case(
        "stray-response-while-idle",
        stray_response_while_idle,
        200,
        "bytes after the end of a response",
        UPSTREAM_HEAD_TIMEOUT,
        _stray_not_relayed,
    ),
    Case("obs-fold", obs_fold, 502, UP_FAILED + "bad response: obsolete line folding", UPSTREAM_HEAD_TIMEOUT),
    Case(
        "header-line-100KiB", header_line_of_100_kib, 502, UP_FAILED + "bad response: response head too large",
        UPSTREAM_HEAD_TIMEOUT,
    ),
    Case("body-shorter-then-close", body_shorter_then_close, ABORTED, "upstream failed mid-body: closed", UPSTREAM_HEAD_TIMEOUT),
    Case("body-100MiB", body_of_100_mib, 200, None, 20.0, _whole_100_mib),
    Case("10000-headers", ten_thousand_headers, 502, UP_FAILED + "bad response: too many headers", UPSTREAM_HEAD_TIMEOUT),
    Case("closes-idle-pooled-connection", closes_when_idle, 200, None, UPSTREAM_HEAD_TIMEOUT),
]


@pytest.mark.parametrize("case", UPSTREAM_CASES, ids=[c.id for c in UPSTREAM_CASES])
@ensureDeferred
async def test_upstream_fault(stack: Stack, case: Case) -> None:
    await stack.upstream_leg()
    await exercise(stack, case, b"upstream ok")


# ---------------------------------------------------------------------------
# Uploads on pooled upstream connections


def _upload(path: str, body: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: gw.test\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (path.encode(), len(body))
        + body
    )


def _sha_answer(conn: RawConnection, seen: Seen) -> None:
    conn.respond(200, ((b"Content-Type", b"text/plain"),), hashlib.sha256(seen.body).hexdigest().encode())


@ensureDeferred
async def test_spooled_uploads_reuse_one_upstream_connection(reactor: Any, stack: Stack) -> None:
    """
    Bodies over 100 kB are spooled to a file by the server and streamed from
    it.  The upload finishes with its last chunk, so an upstream that answers
    as soon as the body is complete finds the request written and the
    connection goes back to the pool.  Mixed with smaller bodies (sent from
    memory in one write) on the same connection, none fails.
    """
    up = await stack.server(_sha_answer)
    stack.gw = await start_gateway(reactor, {"routes": [{"id": "u", "uri": "/u", "upstream": {"nodes": {up.netloc: 1}}}]})
    with LogCapture() as logs:
        for i in range(24):
            body = os.urandom((80000, 200000, 300000)[i % 3])
            raw = await raw_request(reactor, stack.gw.port_number, _upload("/u", body))
            assert raw.startswith(b"HTTP/1.1 200 "), raw[:200]
            assert raw.endswith(hashlib.sha256(body).hexdigest().encode()), raw[-200:]
    assert len(up.connections) == 1, len(up.connections)
    assert not [line for line in logs.lines if "rror" in line or "fail" in line], logs.lines


@ensureDeferred
async def test_spooled_upload_after_a_large_in_memory_one_on_the_same_connection(reactor: Any, stack: Stack) -> None:
    """
    An in-memory body of more than 64 KiB is written at once: the transport
    pauses its producer, and keeps that "paused" flag after the producer is
    unregistered (Twisted).  The next upload on the pooled connection, from a
    spooled file, then gets a resumeProducing it never asked for as soon as
    the request head drains; it must not fail (it was a 502).  A slow
    cooperator makes the order certain.
    """
    up = await stack.server(_sha_answer)
    stack.gw = await start_gateway(reactor, {"routes": [{"id": "u", "uri": "/u", "upstream": {"nodes": {up.netloc: 1}}}]})
    route = stack.gw.gateway.table.match("POST", "gw.test", "/u")
    route.upstream._cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0.05, work))
    with LogCapture() as logs:
        for size in (80000, 200000, 80000, 300000):
            body = os.urandom(size)
            raw = await raw_request(reactor, stack.gw.port_number, _upload("/u", body))
            assert raw.startswith(b"HTTP/1.1 200 "), (size, raw[:200], logs.lines)
            assert raw.endswith(hashlib.sha256(body).hexdigest().encode()), raw[-200:]
    assert len(up.connections) == 1, len(up.connections)
    assert not [line for line in logs.lines if "rror" in line or "fail" in line], logs.lines


class _AnswersOnHead(Protocol):
    """Answers 413 as soon as a request head arrives, without reading the body; keeps reading and discarding."""

    def __init__(self, server: RawServer) -> None:
        self.server = server
        self.buffer = b""
        self.answered = False

    def connectionMade(self) -> None:
        self.server.connections.append(self)  # type: ignore[arg-type]
        self.lost = False
        self.faulted = True

    def dataReceived(self, data: bytes) -> None:
        if not self.answered:
            self.buffer += data
            if b"\r\n\r\n" in self.buffer:
                self.answered = True
                self.transport.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big\n")

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


@ensureDeferred
async def test_upstream_answering_before_the_upload_is_sent(reactor: Any, stack: Stack) -> None:
    """
    The upstream answers (413) before reading a spooled 1 MiB body: the client
    gets the answer, the upload stops quietly (the server closed the body's
    file when the client's response finished), nothing is logged as an error.
    """
    up = RawServer(reactor, _sha_answer)
    up.factory.buildProtocol = lambda addr: _AnswersOnHead(up)  # type: ignore[assignment]
    await up.listen()
    stack.servers.append(up)
    stack.gw = await start_gateway(reactor, {"routes": [{"id": "u", "uri": "/u", "upstream": {"nodes": {up.netloc: 1}}}]})
    with LogCapture() as logs:
        raw = await raw_request(reactor, stack.gw.port_number, _upload("/u", os.urandom(MiB)))
        await sleep(reactor, 0.3)  # the producer's next ticks
    assert raw.startswith(b"HTTP/1.1 413 "), raw[:200]
    assert raw.endswith(b"too big\n"), raw[-100:]
    assert not [line for line in logs.lines if "rror" in line or "critical" in line], logs.lines
    assert await eventually(reactor, lambda: not up.open_connections)
    with LogCapture() as logs:
        assert (await stack.fetch("/u")).status == 413


@ensureDeferred
async def test_client_gone_while_the_auth_connection_is_still_connecting(reactor: Any, stack: Stack) -> None:
    """
    The client leaves while the auth service's port does not even complete
    the TCP handshake: the pending connection attempt is cancelled, and that
    is not an auth failure (nothing logged as one, nobody answered).
    """
    await stack.auth_leg(timeout=3000)
    assert stack.faulty is not None
    await stack.faulty.stop_listening()
    stack.holes.append(Blackhole(stack.faulty.port_number))
    assert stack.gw is not None
    with LogCapture() as logs:
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", stack.gw.port_number).connect(
            Factory.forProtocol(Protocol)
        )
        client.transport.write(b"GET /f HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        await sleep(reactor, 0.2)
        client.transport.abortConnection()
        await sleep(reactor, 0.3)
    assert not logs.contains("failed to process forward auth"), logs.lines
    assert not [line for line in logs.lines if "rror" in line], logs.lines
    assert (await stack.fetch("/o")).status == 200
