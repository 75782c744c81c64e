"""
Hostile clients, end to end over real sockets with exact bytes: request
smuggling, header abuse, path tricks, identity spoofing and slow clients.

Every test runs a real gateway (``tests.hostile_env``) in front of a
counting auth service, a guarded "private" upstream and an unguarded
"public" one, and checks both what the client got and that nobody behind
the gateway saw what it must not.
"""
from __future__ import annotations

import errno
import resource as rlimit
import socket
import time
from typing import Any, AsyncIterator, List

import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from tests.hostile_env import HostileEnv, reaches_private, request, start_env, status_of

LIMITS = {"max_headers": 20, "max_header_bytes": 2048, "max_request_line": 1024}


@pytest.fixture
def reactor() -> Any:
    """The reactor pytest-twisted installed (imported late, never at module level)."""
    from twisted.internet import reactor as installed

    return installed


def sleep(reactor: Any, seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


@async_yield_fixture
async def env(reactor: Any) -> AsyncIterator[HostileEnv]:
    environment = await start_env(reactor, LIMITS)
    try:
        yield environment
    finally:
        await environment.stop()


SMUGGLED = b"GET /private/x HTTP/1.1\r\nHost: gw.test\r\nAuthorization: letmein\r\n\r\n"


def _post(headers: List[bytes], body: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    return request(b"/public/x", b"POST", tuple([b"Host: gw.test"] + headers), body, version)


def _chunked(size_line: bytes) -> bytes:
    return _post([b"Transfer-Encoding: chunked"], size_line + b"\r\nhello\r\n0\r\n\r\n" + SMUGGLED)


# ---------------------------------------------------------------------------
# Request smuggling: ambiguous framing is refused, never forwarded.

SMUGGLING = {
    "cl-then-te": _post([b"Content-Length: 6", b"Transfer-Encoding: chunked"], b"0\r\n\r\n" + SMUGGLED),
    "te-then-cl": _post([b"Transfer-Encoding: chunked", b"Content-Length: 6"], b"0\r\n\r\n" + SMUGGLED),
    "two-content-lengths": _post([b"Content-Length: 5", b"Content-Length: 71"], b"hello" + SMUGGLED),
    "same-content-length-twice": _post([b"Content-Length: 5", b"Content-Length: 5"], b"hello" + SMUGGLED),
    "content-length-list": _post([b"Content-Length: 1, 2"], b"x" + SMUGGLED),
    "content-length-signed": _post([b"Content-Length: +5"], b"hello" + SMUGGLED),
    "content-length-negative": _post([b"Content-Length: -1"], SMUGGLED),
    "content-length-hex": _post([b"Content-Length: 0x5"], b"hello" + SMUGGLED),
    "content-length-huge": _post([b"Content-Length: 99999999999999999999999"], b"hello" + SMUGGLED),
    "content-length-space-before-colon": _post([b"Content-Length : 5"], b"hello" + SMUGGLED),
    "obs-fold": _post([b"Content-Length: 5", b"X-Folded: a", b" b"], b"hello" + SMUGGLED),
    "obs-fold-tab": _post([b"Content-Length: 5", b"X-Folded: a", b"\tb"], b"hello" + SMUGGLED),
    "obs-fold-transfer-encoding": _post([b"Transfer-Encoding:", b" chunked"], b"0\r\n\r\n" + SMUGGLED),
    "chunk-size-0x": _chunked(b"0x5"),
    "chunk-size-negative": _chunked(b"-1"),
    "chunk-size-plus": _chunked(b"+5"),
    "chunk-size-space-ext": _chunked(b"5 ;x"),
    "chunk-size-huge": _chunked(b"ffffffffffffffffffff"),
    "chunk-size-2-63": _chunked(b"8000000000000000"),
    "chunk-no-crlf-after-data": _post([b"Transfer-Encoding: chunked"], b"5\r\nhelloXX0\r\n\r\n" + SMUGGLED),
    "te-gzip": _post([b"Transfer-Encoding: gzip"], SMUGGLED),
    "te-chunked-gzip": _post([b"Transfer-Encoding: chunked, gzip"], b"0\r\n\r\n" + SMUGGLED),
    "te-identity": _post([b"Transfer-Encoding: identity"], SMUGGLED),
    "te-identity-with-length": _post([b"Transfer-Encoding: identity", b"Content-Length: 5"], b"hello" + SMUGGLED),
    "te-xchunked": _post([b"Transfer-Encoding: xchunked"], b"0\r\n\r\n" + SMUGGLED),
    "te-chunked-chunked": _post([b"Transfer-Encoding: chunked, chunked"], b"0\r\n\r\n" + SMUGGLED),
    "te-two-headers": _post([b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"], b"0\r\n\r\n" + SMUGGLED),
    "te-space-before-colon": _post([b"Transfer-Encoding : chunked", b"Content-Length: 5"], b"hello" + SMUGGLED),
    "te-in-http-1.0": _post([b"Transfer-Encoding: chunked"], b"0\r\n\r\n" + SMUGGLED, b"HTTP/1.0"),
}


@pytest.mark.parametrize("payload", list(SMUGGLING.values()), ids=list(SMUGGLING))
@ensureDeferred
async def test_ambiguous_framing_is_refused(env: HostileEnv, payload: bytes) -> None:
    raw = await env.send(payload)
    assert status_of(raw) == 400, raw
    assert raw.count(b"HTTP/1.1 ") == 1, raw  # nothing answered for the smuggled request
    assert env.untouched(), (env.auth.calls, env.private.hits, env.public.hits)


@ensureDeferred
async def test_unknown_coding_before_chunked_is_501(env: HostileEnv) -> None:
    raw = await env.send(_post([b"Transfer-Encoding: gzip, chunked"], b"0\r\n\r\n" + SMUGGLED))
    assert status_of(raw) == 501, raw
    assert env.untouched()


@ensureDeferred
async def test_sound_framing_still_works(env: HostileEnv) -> None:
    """The controls: one Content-Length, or chunked alone, are forwarded with their body."""
    raw = await env.send(_post([b"Content-Length: 5"], b"hello"))
    assert status_of(raw) == 200, raw
    raw = await env.send(_post([b"Transfer-Encoding: Chunked"], b"5;ext=1\r\nhello\r\n0\r\n\r\n"))
    assert status_of(raw) == 200, raw
    assert [hit["body"] for hit in env.public.hits] == [b"hello", b"hello"]


# ---------------------------------------------------------------------------
# Header abuse


BAD_FIELDS = {
    "bare-lf-in-value": b"X-A: a\nb",
    "bare-cr-in-value": b"X-A: a\rb",
    "nul-in-value": b"X-A: a\x00b",
    "ctl-in-value": b"X-A: a\x01b",
    "del-in-value": b"X-A: a\x7fb",
    "nul-in-name": b"X\x00A: b",
    "lf-in-name": b"X\nA: b",
    "cr-in-name": b"X\rA: b",
    "space-in-name": b"X A: b",
    "no-colon": b"X-A b",
    "empty-name": b": b",
    "bare-lf-line-end": b"X-A: a\nX-User-ID: mallory",
}


@pytest.mark.parametrize("field", list(BAD_FIELDS.values()), ids=list(BAD_FIELDS))
@ensureDeferred
async def test_control_characters_in_header_fields_are_refused(env: HostileEnv, field: bytes) -> None:
    raw = await env.send(request(b"/public/x", headers=(b"Host: gw.test", field)))
    assert status_of(raw) == 400, raw
    assert env.untouched()


@ensureDeferred
async def test_header_count_limit_is_431(env: HostileEnv) -> None:
    # Host + Connection + 18 = 20 fields: the limit, accepted.
    fields = tuple(b"X-F%d: v" % i for i in range(18))
    raw = await env.send(request(b"/public/x", headers=(b"Host: gw.test",) + fields))
    assert status_of(raw) == 200, raw
    raw = await env.send(request(b"/public/x", headers=(b"Host: gw.test", b"X-One-More: v") + fields))
    assert status_of(raw) == 431, raw
    assert b"Request Header Fields Too Large" in raw
    assert len(env.public.hits) == 1


@ensureDeferred
async def test_header_bytes_limit_is_431(env: HostileEnv) -> None:
    # Many small fields adding up to more than 2048 bytes.
    fields = tuple(b"X-F%d: %s" % (i, b"v" * 150) for i in range(15))
    raw = await env.send(request(b"/public/x", headers=(b"Host: gw.test",) + fields))
    assert status_of(raw) == 431, raw
    # One field longer than the whole budget.
    raw = await env.send(request(b"/public/x", headers=(b"Host: gw.test", b"X-Big: " + b"v" * 5000)))
    assert status_of(raw) == 431, raw
    assert env.untouched()


@ensureDeferred
async def test_request_line_limit_is_414(env: HostileEnv) -> None:
    raw = await env.send(request(b"/public/" + b"a" * 900))
    assert status_of(raw) == 200, raw
    raw = await env.send(request(b"/public/" + b"a" * 1100))
    assert status_of(raw) == 414, raw
    raw = await env.send(request(b"/public/" + b"a" * 100000))
    assert status_of(raw) == 414, raw
    assert len(env.public.hits) == 1


@pytest.mark.parametrize(
    "line",
    [b"GE T /public/x HTTP/1.1", b"G\x00T /public/x HTTP/1.1", b"get /public/x HTTP/1.1", b"G(T /public/x HTTP/1.1",
     b"GET  /public/x HTTP/1.1", b"GET /public/x  HTTP/1.1", b"GET /public/x HTTP/2.0", b"GET /public/x",
     b"GET /public/\x7f HTTP/1.1", b"GET /public/\xa0 HTTP/1.1"],
    ids=["space", "nul", "lowercase", "delimiter", "double-space", "trailing-space", "http2", "http0.9", "del", "high-byte"],
)
@ensureDeferred
async def test_malformed_request_line_is_400(env: HostileEnv, line: bytes) -> None:
    raw = await env.send(line + b"\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
    assert status_of(raw) == 400, raw
    assert env.untouched()


@ensureDeferred
async def test_valid_but_unrouted_method_is_404(env: HostileEnv) -> None:
    raw = await env.send(request(b"/get-only", method=b"BREW"))
    assert status_of(raw) == 404, raw
    # A valid method on a route without a method list still needs auth.
    raw = await env.send(request(b"/private/x", method=b"PROPFIND"))
    assert status_of(raw) == 403, raw
    assert env.public.hits == [] and env.private.hits == []


@ensureDeferred
async def test_absolute_form_authority_wins_over_host_for_routing(env: HostileEnv) -> None:
    """``http://secure.example/...`` with ``Host: open.example`` is routed as secure.example."""
    raw = await env.send(request(b"http://secure.example/vhost/x", headers=(b"Host: open.example",)))
    assert status_of(raw) == 403, raw
    assert env.public.hits == [] and env.private.hits == []
    assert env.auth.calls[0][b"x-forwarded-host"] == [b"secure.example"]


@ensureDeferred
async def test_absolute_form_authority_is_what_the_upstream_sees(env: HostileEnv) -> None:
    """
    The unguarded vhost reached by absolute form: the upstream must not see
    the guarded host's name in Host (it could serve the guarded site).
    """
    raw = await env.send(request(b"http://open.example/vhost/x?q=1", headers=(b"Host: secure.example",)))
    assert status_of(raw) == 200, raw
    (hit,) = env.public.hits
    assert env.public.header(hit, b"host") == [b"open.example"]
    assert env.public.header(hit, b"x-forwarded-host") == [b"open.example"]
    assert hit["uri"] == b"/vhost/x?q=1"


@pytest.mark.parametrize(
    "host",
    [b"secure.example", b"SECURE.example", b"secure.example.", b"secure.example:80", b"secure.example.:8080"],
)
@ensureDeferred
async def test_host_spellings_do_not_escape_a_guarded_virtual_host(env: HostileEnv, host: bytes) -> None:
    """Case, port and a trailing dot must not make the guarded vhost fall to the host-less route."""
    raw = await env.send(request(b"/vhost/x", headers=(b"Host: " + host,)))
    assert status_of(raw) == 403, raw
    assert env.public.hits == [] and env.private.hits == []
    raw = await env.send(request(b"/vhost/x", headers=(b"Host: elsewhere.example",)))
    assert status_of(raw) == 200, raw  # the control: the host-less route is unguarded


@pytest.mark.parametrize(
    "target",
    [b"http://user@open.example/vhost/x", b"http:///vhost/x", b"http://open.example:x/vhost/x",
     b"ftp://open.example/vhost/x", b"*", b"open.example:80"],
    ids=["userinfo", "empty-authority", "bad-port", "ftp", "asterisk", "authority-form"],
)
@ensureDeferred
async def test_unusable_request_targets_are_400(env: HostileEnv, target: bytes) -> None:
    raw = await env.send(request(target, headers=(b"Host: open.example",)))
    # Twisted answers "*" itself (405 but for OPTIONS), before any resource.
    assert status_of(raw) == (405 if target == b"*" else 400), raw
    assert env.untouched()


@ensureDeferred
async def test_http11_without_host_is_400(env: HostileEnv) -> None:
    raw = await env.send(b"GET /public/x HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert status_of(raw) == 400, raw
    # HTTP/1.0 has no such rule.
    raw = await env.send(b"GET /public/x HTTP/1.0\r\n\r\n")
    assert status_of(raw) == 200, raw
    assert len(env.public.hits) == 1


@pytest.mark.parametrize(
    "hosts",
    [(b"Host: open.example", b"Host: secure.example"), (b"Host: open.example", b"host: open.example"),
     (b"Host: open.example/evil",), (b"Host: open.example evil",), (b"Host: user@open.example",),
     (b"Host: %73ecure.example",), (b"Host: secure.example\\x",)],
    ids=["two-hosts", "same-host-twice", "slash", "space", "userinfo", "percent-encoded", "backslash"],
)
@ensureDeferred
async def test_duplicate_or_invalid_host_is_400(env: HostileEnv, hosts: tuple) -> None:
    raw = await env.send(request(b"/vhost/x", headers=hosts))
    assert status_of(raw) == 400, raw
    assert env.untouched()


PATH_TRICKS = [
    b"/private", b"/private/", b"//private", b"/./private", b"///private/x", b"/public/../private",
    b"/public/%2e%2e/private", b"/public/%2E%2E/private", b"/public/.%2e/private", b"/public/..%2fprivate",
    b"/public%2f..%2fprivate", b"/public/%2e%2e%2fprivate", b"/%2e%2e/private", b"/%2fprivate",
    b"/private%00/", b"/public/x%00/../../private", b"/public\\..\\private", b"/public/..\\private",
    b"/public/%5c..%5cprivate", b"/public/..%5Cprivate", b"/public/%c0%ae%c0%ae/private",
    b"/public/%c0%ae%c0%ae%c0%afprivate", b"/public/%e0%80%ae%e0%80%ae/private", b"/public/..;/private",
    b"/public/..;x=1/private", b"/public/.;/../private", b"/public/..%3b/private", b"/public/x#/../../private",
    b"/public/x/%2e%2e/%2e%2e/private/y", b"/public/%2e%2e%2f%2e%2e%2fprivate", b"http://gw.test/public/../private",
]


@pytest.mark.parametrize("target", PATH_TRICKS)
@ensureDeferred
async def test_path_tricks_never_reach_private_unauthenticated(env: HostileEnv, target: bytes) -> None:
    raw = await env.send(request(target))
    assert status_of(raw) in (400, 403, 404), raw
    assert env.private.hits == []
    for hit in env.public.hits:
        assert not reaches_private(hit["uri"]), hit["uri"]


# ---------------------------------------------------------------------------
# Identity spoofing: the upstream sees exactly what the auth service said.

SPOOFS = {
    "canonical": [b"X-User-ID: mallory"],
    "lower": [b"x-user-id: mallory"],
    "upper": [b"X-USER-ID: mallory"],
    "repeated": [b"X-User-ID: mallory", b"x-user-id: eve"],
    "underscores": [b"X_User_ID: mallory"],
    "mixed": [b"x_user-id: mallory"],
    "mixed-2": [b"X-User_Id: mallory"],
    "all-at-once": [b"X-User-ID: mallory", b"X_User_ID: eve", b"x_user_id: trent", b"X-USER_ID: oscar"],
    "hop-by-hop": [b"Connection: X-User-ID, close"],
    "hop-by-hop-underscore": [b"Connection: x_user_id, close", b"X_User_ID: mallory"],
}


@pytest.mark.parametrize("spoof", list(SPOOFS.values()), ids=list(SPOOFS))
@ensureDeferred
async def test_upstream_sees_only_the_auth_identity(env: HostileEnv, spoof: List[bytes]) -> None:
    headers = tuple([b"Host: gw.test", b"Authorization: letmein"] + spoof)
    raw = await env.send(request(b"/private/x", headers=headers))
    assert status_of(raw) == 200, raw
    raw = await env.send(request(b"/bare/x", headers=headers))
    assert status_of(raw) == 200, raw
    with_identity, without = env.private.hits
    assert env.private.identity(with_identity) == [b"alice"], with_identity["headers"]
    assert env.private.identity(without) == [], without["headers"]


@ensureDeferred
async def test_spoofing_without_credentials_reaches_nobody(env: HostileEnv) -> None:
    raw = await env.send(request(b"/private/x", headers=(b"Host: gw.test", b"X-User-ID: alice")))
    assert status_of(raw) == 403, raw
    assert env.private.hits == []


@ensureDeferred
async def test_degradation_lets_client_identity_through_as_documented(env: HostileEnv) -> None:
    """
    docs/operators/security.md: with ``allow_degradation`` an unreachable auth
    service lets the request through untouched, client headers included, as
    APISIX does.  This pins that documented behaviour.
    """
    raw = await env.send(request(b"/degrade", headers=(b"Host: gw.test", b"X-User-ID: mallory")))
    assert status_of(raw) == 200, raw
    (hit,) = env.private.hits
    assert env.private.identity(hit) == [b"mallory"]


# ---------------------------------------------------------------------------
# Slow clients


@async_yield_fixture
async def slow_env(reactor: Any) -> AsyncIterator[HostileEnv]:
    environment = await start_env(reactor, {"header_timeout": 1, "body_timeout": 1, "idle_timeout": 30})
    try:
        yield environment
    finally:
        await environment.stop()


class Trickle:
    """A raw non-blocking socket sending C{data} one byte per C{interval}."""

    def __init__(self, reactor: Any, port: int) -> None:
        self.reactor = reactor
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        err = self.sock.connect_ex(("127.0.0.1", port))
        assert err in (0, errno.EINPROGRESS), err
        self.received = b""
        self.closed = False

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.closed = True

    def poll(self) -> None:
        """Read what the gateway sent; notice when it closed."""
        while not self.closed:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.closed = True
                return
            if not data:
                self.closed = True
                return
            self.received += data

    def close(self) -> None:
        self.sock.close()


async def trickle_until_closed(reactor: Any, conn: Trickle, data: bytes, interval: float, limit: float) -> float:
    """Send C{data} byte by byte until the gateway closes; seconds it took."""
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < limit:
        if i < len(data):
            conn.send(data[i : i + 1])
            i += 1
        await sleep(reactor, interval)
        conn.poll()
        if conn.closed:
            break
    return time.monotonic() - start


@ensureDeferred
async def test_slowloris_headers_are_cut_off(reactor: Any, slow_env: HostileEnv) -> None:
    conn = Trickle(reactor, slow_env.port)
    try:
        head = b"GET /public/x HTTP/1.1\r\nHost: gw.test\r\nX-Slow: " + b"a" * 100
        took = await trickle_until_closed(reactor, conn, head, 0.2, 6.0)
    finally:
        conn.close()
    assert conn.closed, "connection still open after %.1fs" % took
    assert took < 3.0, took
    assert status_of(conn.received) == 408, conn.received
    assert slow_env.untouched()


@ensureDeferred
async def test_slow_body_is_cut_off(reactor: Any, slow_env: HostileEnv) -> None:
    conn = Trickle(reactor, slow_env.port)
    try:
        conn.send(b"POST /public/x HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 100\r\n\r\n")
        took = await trickle_until_closed(reactor, conn, b"b" * 100, 0.2, 6.0)
    finally:
        conn.close()
    assert conn.closed, "connection still open after %.1fs" % took
    assert took < 3.0, took
    assert status_of(conn.received) == 408, conn.received
    assert slow_env.untouched()


@ensureDeferred
async def test_silent_connection_is_closed_after_header_timeout(reactor: Any, slow_env: HostileEnv) -> None:
    conn = Trickle(reactor, slow_env.port)
    try:
        took = await trickle_until_closed(reactor, conn, b"", 0.1, 6.0)
    finally:
        conn.close()
    assert conn.closed and took < 3.0, took
    assert conn.received == b""


@ensureDeferred
async def test_keepalive_connection_may_idle_longer_than_header_timeout(reactor: Any, slow_env: HostileEnv) -> None:
    conn = Trickle(reactor, slow_env.port)
    one = b"GET /public/a HTTP/1.1\r\nHost: gw.test\r\n\r\n"
    try:
        conn.send(one)
        await sleep(reactor, 0.3)
        conn.poll()
        assert status_of(conn.received) == 200, conn.received
        await sleep(reactor, 1.6)  # idle, past header_timeout, within idle_timeout
        conn.poll()
        assert not conn.closed
        conn.send(b"GET /public/b HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
        for _ in range(30):
            await sleep(reactor, 0.1)
            conn.poll()
            if conn.closed:
                break
    finally:
        conn.close()
    assert conn.received.count(b"HTTP/1.1 200 ") == 2, conn.received
    assert [hit["uri"] for hit in slow_env.public.hits] == [b"/public/a", b"/public/b"]


@ensureDeferred
async def test_pipelined_slow_request_is_cut_off(reactor: Any, slow_env: HostileEnv) -> None:
    """A fast request followed, in the same packet, by a slow one: the slow one still times out."""
    conn = Trickle(reactor, slow_env.port)
    try:
        conn.send(b"GET /public/a HTTP/1.1\r\nHost: gw.test\r\n\r\nGET /public/b HTTP/1.1\r\nHost: gw")
        took = await trickle_until_closed(reactor, conn, b".test\r\nX-Slow: " + b"a" * 100, 0.2, 6.0)
    finally:
        conn.close()
    assert conn.closed and took < 3.0, took
    first, _, second = conn.received.partition(b"HTTP/1.1 408 ")
    assert status_of(first) == 200 and second, conn.received
    assert [hit["uri"] for hit in slow_env.public.hits] == [b"/public/a"]


FLOOD = 2000


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)
    if soft != rlimit.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == rlimit.RLIM_INFINITY else min(wanted, hard)
        rlimit.setrlimit(rlimit.RLIMIT_NOFILE, (target, hard))
    soft, _ = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)
    if soft != rlimit.RLIM_INFINITY and soft < wanted:
        pytest.skip("cannot raise the open file limit to %d" % wanted)


@async_yield_fixture
async def flood_env(reactor: Any) -> AsyncIterator[HostileEnv]:
    environment = await start_env(reactor, {"header_timeout": 4, "body_timeout": 4})
    try:
        yield environment
    finally:
        await environment.stop()


@ensureDeferred
async def test_slowloris_flood_does_not_starve_normal_clients(reactor: Any, flood_env: HostileEnv) -> None:
    _raise_fd_limit(2 * FLOOD + 512)
    started = time.monotonic()
    conns: List[Trickle] = []
    try:
        # Open in batches well below the listen backlog (50), letting the reactor accept.
        while len(conns) < FLOOD:
            for _ in range(25):
                conn = Trickle(reactor, flood_env.port)
                conn.send(b"GET /public/slow HTTP/1.1\r\nHost: gw.test\r\nX-Slow: ")
                conns.append(conn)
            await sleep(reactor, 0.005)
        opened = time.monotonic()
        # Keep them all trickling while a normal client asks.
        for conn in conns:
            conn.send(b"a")
        await sleep(reactor, 0.2)
        t0 = time.monotonic()
        raw = await flood_env.send(request(b"/public/normal"), timeout=5.0)
        served_in = time.monotonic() - t0
        assert status_of(raw) == 200, raw
        assert served_in < 1.0, served_in
        for conn in conns:
            conn.send(b"a")
        # Then every slow one is cut off by the header timeout.
        deadline = opened + 4 + 4
        while time.monotonic() < deadline:
            await sleep(reactor, 0.25)
            for conn in conns:
                conn.poll()
            if all(conn.closed for conn in conns):
                break
        still_open = sum(1 for conn in conns if not conn.closed)
        assert still_open == 0, "%d of %d slow connections still open" % (still_open, FLOOD)
        timed_out = sum(1 for conn in conns if status_of(conn.received) == 408)
        assert timed_out == FLOOD, timed_out
    finally:
        for conn in conns:
            conn.close()
    assert [hit["uri"] for hit in flood_env.public.hits] == [b"/public/normal"]
    assert time.monotonic() - started < 15
