"""
Every limit answers, however the request arrives (issue 18, point 2).

A limit used to be answered only when the bytes after the offending head
came in a later read: a body over C{client_max_body_size} sent in the same
write as its head (what curl does for small bodies) was parsed after the
413, finished a request that had no body buffer, and crashed it
(C{AttributeError: 'NoneType' object has no attribute 'tell'}), the client
getting nothing.

Here each limit (413 on a declared or a chunked length, 413 on a POST-mode
C{max_req_body_size}, 408 on a slow body or head, 431, 414, 400) meets each
way a body arrives: in the same write as its head, in a later write,
chunked, behind an C{Expect: 100-continue}, and with a next request
pipelined behind it.  Every case must get its status and a closed
connection, nobody behind the gateway may see a request, the pipelined
request must never be served, and nothing may be logged as a failure.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from fauth.testing import LogCapture
from tests.hostile_env import HostileEnv, start_env, status_of

LIMITS = {
    "max_headers": 20,
    "max_header_bytes": 2048,
    "max_request_line": 1024,
    "header_timeout": 1,
    "body_timeout": 1,
}
MAX_BODY = 1024

#: A request pipelined behind the refused one: it must never be served.
NEXT = b"GET /public/next HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n"


@async_yield_fixture
async def env(reactor: Any) -> AsyncIterator[HostileEnv]:
    environment = await start_env(reactor, LIMITS, degrade=False, top={"client_max_body_size": MAX_BODY})
    try:
        yield environment
    finally:
        await environment.stop()


class _Client(Protocol):
    """Sends its parts, each after its delay; keeps what comes back."""

    def __init__(self, reactor: Any, parts: Sequence[Tuple[float, bytes]], done: Deferred) -> None:
        self._reactor = reactor
        self._parts = list(parts)
        self._done = done
        self.received: List[bytes] = []

    def connectionMade(self) -> None:
        self._next()

    def _next(self) -> None:
        if not self._parts or self.transport is None:
            return
        delay, data = self._parts.pop(0)
        if delay:
            self._reactor.callLater(delay, self._send, data)
        else:
            self._send(data)

    def _send(self, data: bytes) -> None:
        if self._done.called:
            return
        self.transport.write(data)
        self._next()

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self._done.callback(b"".join(self.received))


async def exchange(reactor: Any, port: int, parts: Sequence[Tuple[float, bytes]], timeout: float = 4.0) -> bytes:
    """
    Send C{parts} (seconds to wait, bytes) to the gateway; return what it
    answered once it closed the connection (C{None}-free: a gateway that
    never closes fails the test).
    """
    done: Deferred = Deferred()
    protocol = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
        Factory.forProtocol(lambda: _Client(reactor, parts, done))
    )
    timer = reactor.callLater(timeout, protocol.transport.abortConnection)
    raw: bytes = await done
    assert timer.active(), "the gateway never closed the connection; it sent %r" % raw
    timer.cancel()
    return raw


# ---------------------------------------------------------------------------
# The requests: a head, and a body that follows it

AUTH = b"Authorization: letmein"


def head(path: bytes, *fields: bytes, method: bytes = b"PUT") -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: gw.test\r\n%s\r\n" % (method, path, b"".join(f + b"\r\n" for f in fields))


def chunks(size: int, piece: int = 256) -> bytes:
    out = b""
    while size > 0:
        n = min(piece, size)
        out += b"%x\r\n%s\r\n" % (n, b"c" * n)
        size -= n
    return out + b"0\r\n\r\n"


class Case:
    """A request that hits a limit: its head, its body, and the answer it must get."""

    def __init__(
        self, status: int, head: bytes, body: bytes, complete: bool = True, on_head: bool = True, keeps: bool = False
    ) -> None:
        self.status = status
        self.head = head
        self.body = body
        # A body that is not all there (slow): nothing can be pipelined behind it.
        self.complete = complete
        # Refused on its head: before any auth call, and before a 100 Continue.
        self.on_head = on_head
        # Answered by the gateway past the server's limits, a small body
        # read and dropped: the connection is kept for a next request.
        self.keeps = keeps


def _cases() -> Dict[str, Case]:
    over = b"x" * (MAX_BODY * 2)
    cases: Dict[str, Case] = {}
    for route, extra in ((b"/public/a", ()), (b"/private/a", (AUTH,))):
        name = route.split(b"/")[1].decode()
        cases["413-length-" + name] = Case(413, head(route, *extra, b"Content-Length: %d" % len(over)), over)
        cases["413-chunked-" + name] = Case(
            413, head(route, *extra, b"Transfer-Encoding: chunked"), chunks(MAX_BODY * 2), on_head=False
        )
        cases["408-body-length-" + name] = Case(
            408, head(route, *extra, b"Content-Length: 100"), b"y" * 50, complete=False, on_head=False
        )
        cases["408-body-chunked-" + name] = Case(
            408,
            head(route, *extra, b"Transfer-Encoding: chunked"),
            b"32\r\n" + b"y" * 20,
            complete=False,
            on_head=False,
        )
    # POST mode: the body goes to the auth service, up to max_req_body_size (512).
    post = b"p" * 800
    cases["413-post-mode-length"] = Case(
        413, head(b"/post-mode/a", AUTH, b"Content-Length: %d" % len(post), method=b"POST"), post, keeps=True
    )
    cases["413-post-mode-chunked"] = Case(
        413,
        head(b"/post-mode/a", AUTH, b"Transfer-Encoding: chunked", method=b"POST"),
        chunks(800),
        on_head=False,
        keeps=True,
    )
    body = b"z" * 10
    length = b"Content-Length: 10"
    cases["431-field-count"] = Case(431, head(b"/public/a", length, *[b"X-F%d: 1" % i for i in range(30)]), body)
    cases["431-field-bytes"] = Case(431, head(b"/public/a", length, b"X-Big: " + b"b" * 3000), body)
    cases["414-request-line"] = Case(414, head(b"/public/" + b"l" * 2000, length), body)
    cases["400-duplicate-length"] = Case(400, head(b"/public/a", length, length), body)
    cases["400-length-and-chunked"] = Case(400, head(b"/public/a", length, b"Transfer-Encoding: chunked"), body)
    cases["400-bad-chunk-size"] = Case(
        400, head(b"/public/a", b"Transfer-Encoding: chunked"), b"zz\r\nabc\r\n0\r\n\r\n", on_head=False
    )
    return cases


CASES = _cases()

#: How the body arrives: a list of (delay, bytes) from the case.
SHAPES = {
    "with-head": lambda c: [(0.0, c.head + c.body)],
    "after-head": lambda c: [(0.0, c.head), (0.3, c.body)],
    "small-pieces": lambda c: [(0.0, c.head)] + [(0.005, c.body[i : i + 64]) for i in range(0, len(c.body), 64)],
    "pipelined": lambda c: [(0.0, c.head + c.body + NEXT)],
    "expect-continue": lambda c: [(0.0, c.head.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"))],
}


def _matrix() -> List[Any]:
    out = []
    for case_name, case in CASES.items():
        for shape in SHAPES:
            if shape == "pipelined" and not case.complete:
                continue  # nothing can follow a body that never ends
            if shape == "expect-continue" and not case.on_head:
                continue  # a client waiting for 100 Continue sends no body to judge
            out.append(pytest.param(case_name, shape, id="%s/%s" % (case_name, shape)))
    return out


def _failures(logs: LogCapture) -> List[str]:
    return [line for event, line in zip(logs.events, logs.lines) if event.get("log_failure") is not None] + [
        line for line in logs.lines if "Unhandled" in line or "Traceback" in line
    ]


@pytest.mark.parametrize("case_name, shape", _matrix())
@ensureDeferred
async def test_every_limit_answers_however_the_body_arrives(
    reactor: Any, env: HostileEnv, case_name: str, shape: str
) -> None:
    case = CASES[case_name]
    parts = SHAPES[shape](case)
    kept = case.keeps and shape != "expect-continue"
    if kept and shape != "pipelined":
        parts.append((0.1, NEXT))
    with LogCapture() as logs:
        raw = await exchange(reactor, env.port, parts)
    assert status_of(raw) == case.status, raw
    first = raw.partition(b"\r\n\r\n")[0]
    if kept:
        # The body was read and dropped: the next request is a request.
        assert raw.count(b"HTTP/1.1 ") == 2 and raw.count(b"HTTP/1.1 200 ") == 1, raw
        assert [hit["uri"] for hit in env.public.hits] == [b"/public/next"]
    else:
        assert raw.count(b"HTTP/1.1 ") == 1, raw  # one answer: the pipelined request was not served
        assert b"Connection: close" in first, raw
        assert not env.public.hits
    # Nobody behind the gateway got the refused request (the auth service
    # may have been asked on the head of a request whose body then broke
    # a limit).
    assert not env.private.hits
    if case.on_head:
        assert not env.auth.calls, env.auth.calls
    assert _failures(logs) == []


# ---------------------------------------------------------------------------
# Controls: the same shapes within the limits are served, pipelining included


def _fine(chunked: bool, path: bytes = b"/public/a", extra: Tuple[bytes, ...] = ()) -> Case:
    if chunked:
        return Case(200, head(path, *extra, b"Transfer-Encoding: chunked"), chunks(MAX_BODY))
    return Case(200, head(path, *extra, b"Content-Length: %d" % MAX_BODY), b"w" * MAX_BODY)


@pytest.mark.parametrize("shape", ["with-head", "after-head", "small-pieces", "pipelined"])
@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
@ensureDeferred
async def test_bodies_within_the_limits_pass_in_every_shape(
    reactor: Any, env: HostileEnv, shape: str, chunked: bool
) -> None:
    case = _fine(chunked)
    parts = SHAPES[shape](case)
    if shape != "pipelined":
        parts[-1] = (parts[-1][0], parts[-1][1] + NEXT)
    with LogCapture() as logs:
        raw = await exchange(reactor, env.port, parts)
    assert raw.count(b"HTTP/1.1 200 ") == 2, raw
    assert [hit["uri"] for hit in env.public.hits] == [b"/public/a", b"/public/next"]
    assert env.public.hits[0]["body"] == (b"c" if chunked else b"w") * MAX_BODY
    assert _failures(logs) == []


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
@ensureDeferred
async def test_post_mode_within_its_limit_reaches_auth_and_upstream(reactor: Any, env: HostileEnv, chunked: bool) -> None:
    body = b"q" * 500
    framing = chunks(500) if chunked else body
    field = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: 500"
    raw = await exchange(reactor, env.port, [(0.0, head(b"/post-mode/a", AUTH, field, method=b"POST") + framing + NEXT)])
    assert raw.count(b"HTTP/1.1 200 ") == 2, raw
    assert [hit["body"] for hit in env.private.hits] == [b"c" * 500 if chunked else body]
    assert len(env.auth.calls) == 1


@ensureDeferred
async def test_a_slow_head_is_408_even_with_a_body_declared(reactor: Any, env: HostileEnv) -> None:
    with LogCapture() as logs:
        raw = await exchange(reactor, env.port, [(0.0, b"PUT /public/a HTTP/1.1\r\nContent-Length: 5\r\nHost: gw")])
    assert status_of(raw) == 408, raw
    assert env.untouched()
    assert _failures(logs) == []


# ---------------------------------------------------------------------------
# A resource that reads bodies as Twisted does (no handles_heads) on a hardened site


@ensureDeferred
async def test_a_chunked_body_over_the_limit_is_413_for_a_plain_resource(reactor: Any) -> None:
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.web.resource import Resource

    from fauth.config import HttpLimits
    from fauth.edge.server import HardenedSite

    served: List[Optional[bytes]] = []

    class Plain(Resource):
        isLeaf = True

        def render_PUT(self, request: Any) -> bytes:
            served.append(request.content.read())
            return b"ok"

    site = HardenedSite(Plain(), HttpLimits(client_max_body_size=MAX_BODY), reactor=reactor)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    try:
        number = port.getHost().port
        with LogCapture() as logs:
            over = await exchange(
                reactor, number, [(0.0, head(b"/x", b"Transfer-Encoding: chunked") + chunks(MAX_BODY * 4) + NEXT)]
            )
            within = await exchange(
                reactor, number, [(0.0, head(b"/x", b"Transfer-Encoding: chunked", b"Connection: close") + chunks(MAX_BODY))]
            )
        assert status_of(over) == 413 and over.count(b"HTTP/1.1 ") == 1, over
        assert status_of(within) == 200, within
        assert served == [b"c" * MAX_BODY]
        assert _failures(logs) == []
    finally:
        await port.stopListening()
