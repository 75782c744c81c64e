"""
The server's last gaps (issue 11), end to end over real sockets: HTTP/1.0
keep-alive, strict chunked trailers, heads ending in bare LF, path
parameters, hosts with several trailing dots, and the one request target
the auth service and the upstream both see.
"""
from __future__ import annotations

import time
from typing import Any, AsyncIterator, Dict, List

import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred
from twisted.web.resource import Resource

from tests.harness import raw_request, start_gateway
from tests.hostile_env import HostileEnv, Upstream, request, start_env, status_of
from tests.servers import listen_on_loopback


@pytest.fixture
def reactor() -> Any:
    """The reactor pytest-twisted installed (imported late, never at module level)."""
    from twisted.internet import reactor as installed

    return installed


@async_yield_fixture
async def env(reactor: Any) -> AsyncIterator[HostileEnv]:
    environment = await start_env(reactor)
    try:
        yield environment
    finally:
        await environment.stop()


def _heads(raw: bytes) -> List[bytes]:
    """The response heads in C{raw} (bodies are short and have a Content-Length)."""
    heads = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        heads.append(head)
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                raw = raw[int(value) :]
    return heads


# ---------------------------------------------------------------------------
# HTTP/1.0 with Connection: keep-alive (ab -k)


@ensureDeferred
async def test_http10_keep_alive_is_kept_alive(env: HostileEnv) -> None:
    keep = request(b"/public/x", headers=(b"Host: gw.test", b"Connection: keep-alive"), version=b"HTTP/1.0")
    last = request(b"/public/y", headers=(b"Host: gw.test",), version=b"HTTP/1.0")
    raw = await env.send(keep + keep + last)
    heads = _heads(raw)
    assert len(heads) == 3, raw
    for head in heads[:2]:
        assert b"\r\nConnection: keep-alive" in head, head
        assert b"\r\nContent-Length: 6" in head, head
    assert [hit["uri"] for hit in env.public.hits] == [b"/public/x", b"/public/x", b"/public/y"]


@ensureDeferred
async def test_http10_keep_alive_refusals_and_404_keep_the_connection(env: HostileEnv) -> None:
    keep = (b"Host: gw.test", b"Connection: Keep-Alive")
    raw = await env.send(
        request(b"/nowhere", headers=keep, version=b"HTTP/1.0")
        + request(b"/private/x", headers=keep, version=b"HTTP/1.0")
        + request(b"/public/z", headers=(b"Host: gw.test",), version=b"HTTP/1.0")
    )
    assert [int(h.split(b" ")[1]) for h in _heads(raw)] == [404, 403, 200], raw


@ensureDeferred
async def test_http10_without_keep_alive_still_closes(env: HostileEnv) -> None:
    once = b"GET /public/x HTTP/1.0\r\nHost: gw.test\r\n\r\n"
    raw = await env.send(once + once)
    assert len(_heads(raw)) == 1, raw


@pytest.mark.parametrize(
    "fields",
    [
        (b"Connection: x-trace", b"Connection: close"),  # Twisted reads the first line only
        (b"Connection: keep-alive,close",),  # and splits on spaces, not commas
        (b"Connection: Close",),
    ],
    ids=["second-line", "no-space", "case"],
)
@ensureDeferred
async def test_connection_close_is_honoured_wherever_it_stands(env: HostileEnv, fields: Any) -> None:
    started = time.monotonic()
    first = request(b"/public/x", headers=(b"Host: gw.test",) + fields)
    raw = await env.send(first + request(b"/public/y", headers=(b"Host: gw.test",)), timeout=8.0)
    heads = _heads(raw)
    assert len(heads) == 1, raw
    assert b"\r\nConnection: close" in heads[0], heads[0]
    assert [hit["uri"] for hit in env.public.hits] == [b"/public/x"]
    # Closed by the gateway after the answer, not by the client's timeout.
    assert time.monotonic() - started < 5.0


# ---------------------------------------------------------------------------
# Chunked trailers

CHUNKED = (b"Host: gw.test", b"Transfer-Encoding: chunked")


def _with_trailer(trailer: bytes) -> bytes:
    return request(b"/public/x", b"POST", CHUNKED, b"5\r\nhello\r\n0\r\n" + trailer)


@ensureDeferred
async def test_well_formed_trailers_pass(env: HostileEnv) -> None:
    raw = await env.send(_with_trailer(b"X-Checksum: abc\r\nX-Other:\t1 2\r\n\r\n"))
    assert status_of(raw) == 200, raw
    assert [hit["body"] for hit in env.public.hits] == [b"hello"]


BAD_TRAILERS = {
    "no-colon": b"X-Checksum abc\r\n\r\n",
    "space-before-colon": b"X-Checksum : abc\r\n\r\n",
    "control-character": b"X-Checksum: a\x01c\r\n\r\n",
    "obs-fold": b"X-Checksum: abc\r\n more\r\n\r\n",
    "bare-lf-end": b"X-Checksum: abc\n\n",
    "bare-lf-inside": b"X-Checksum: abc\nX-B: 1\r\n\r\n",
    "bare-lf-empty-line": b"\n",
    "too-many": b"X-T: 1\r\n" * 600 + b"\r\n",
    "too-large": b"X-T: " + b"a" * 20000 + b"\r\n\r\n",
}


@pytest.mark.parametrize("trailer", list(BAD_TRAILERS.values()), ids=list(BAD_TRAILERS))
@ensureDeferred
async def test_malformed_trailers_are_400_at_once(env: HostileEnv, trailer: bytes) -> None:
    started = time.monotonic()
    raw = await env.send(_with_trailer(trailer))
    assert status_of(raw) == 400, raw
    assert time.monotonic() - started < 1.0
    assert env.untouched()


# ---------------------------------------------------------------------------
# Heads ending in bare LF


@pytest.mark.parametrize(
    "head",
    [
        b"GET /public/x HTTP/1.1\nHost: gw.test\n\n",
        b"GET /public/x HTTP/1.1\r\nHost: gw.test\n\n",
        b"GET /public/x HTTP/1.1\r\nHost: gw.test\r\n\n",
        b"GET /public/x HTTP/1.1\r\nHost: gw.test\nX-A: 1\r\n\r\n",
    ],
    ids=["all-lf", "fields-lf", "last-lf", "lf-inside"],
)
@ensureDeferred
async def test_bare_lf_in_head_is_400_at_once(env: HostileEnv, head: bytes) -> None:
    started = time.monotonic()
    raw = await env.send(head)
    assert status_of(raw) == 400, raw
    assert time.monotonic() - started < 1.0
    assert env.untouched()


# ---------------------------------------------------------------------------
# Path parameters and Host


@pytest.mark.parametrize("target", [b"/private;x/secret", b"/public;x/y", b"/public/x;jsessionid=1", b"/;/private"])
@ensureDeferred
async def test_path_parameters_are_refused(env: HostileEnv, target: bytes) -> None:
    raw = await env.send(request(target))
    assert status_of(raw) == 400, raw
    assert env.untouched()


@ensureDeferred
async def test_an_encoded_semicolon_is_refused_by_default(env: HostileEnv) -> None:
    # encoded_characters: reject by default (a route with keep passes it on
    # encoded: tests/request/test_paths.py).
    raw = await env.send(request(b"/public/a%3bb"))
    assert status_of(raw) == 400, raw
    assert env.untouched()


@pytest.mark.parametrize("host", [b"secure.example..", b"secure.example..:80", b"..", b"open.example..."])
@ensureDeferred
async def test_host_with_several_trailing_dots_is_400(env: HostileEnv, host: bytes) -> None:
    raw = await env.send(request(b"/vhost/x", headers=(b"Host: " + host,)))
    assert status_of(raw) == 400, raw
    assert env.untouched()
    raw = await env.send(request(b"http://%s/vhost/x" % host))
    assert status_of(raw) == 400, raw
    assert env.untouched()


# ---------------------------------------------------------------------------
# One request target for the auth service and the upstream


class PathAwareAuth(Resource):
    """Approves what X-Forwarded-Uri says is under /files/public/; records it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: List[bytes] = []

    def render(self, request: Any) -> bytes:
        (uri,) = request.requestHeaders.getRawHeaders(b"x-forwarded-uri")
        self.seen.append(uri)
        if not uri.startswith(b"/files/public/"):
            request.setResponseCode(403)
        return b""


TARGETS = [
    b"/files/public/..%2fprivate/secret",
    b"/files/public/%2e%2e/private/secret",
    b"/files/public//../private/secret",
    b"/files/public/./ok",
    b"/files/public/ok?a=%2e%2e/b",
    b"/files/public/a%3Bb",
    b"/files/public/%7euser",
]


@ensureDeferred
async def test_the_auth_service_judges_exactly_what_the_upstream_serves(reactor: Any) -> None:
    auth, upstream = PathAwareAuth(), Upstream(b"files")
    auth_port = await listen_on_loopback(reactor, auth)
    up_port = await listen_on_loopback(reactor, upstream)
    route: Dict[str, Any] = {
        "id": "files",
        "uri": "/files/*",
        "plugins": {"forward-auth": {"uri": "http://127.0.0.1:%d/auth" % auth_port.getHost().port}},
        "upstream": {"nodes": {"127.0.0.1:%d" % up_port.getHost().port: 1}},
        "encoded_characters": "keep",
    }
    gw = await start_gateway(reactor, {"routes": [route]})
    try:
        statuses = []
        for target in TARGETS:
            del auth.seen[:], upstream.hits[:]
            raw = await raw_request(reactor, gw.port_number, request(target))
            statuses.append(status_of(raw))
            if statuses[-1] == 400:
                assert not auth.seen and not upstream.hits
                continue
            (judged,) = auth.seen
            if upstream.hits:
                (hit,) = upstream.hits
                assert hit["uri"] == judged, (target, judged, hit["uri"])
        # ..%2f: a dot segment behind an encoded slash, refused whatever the
        # policy; a%3Bb: kept encoded on this route (encoded_characters: keep).
        assert statuses == [400, 403, 403, 200, 200, 200, 200]
    finally:
        await gw.stop()
        await auth_port.stopListening()
        await up_port.stopListening()


class Unsized(Resource):
    """Answers without a Content-Length (Twisted then streams it chunked to an HTTP/1.1 client)."""

    isLeaf = True

    def render_GET(self, request: Any) -> Any:
        from twisted.web.server import NOT_DONE_YET

        request.write(b"part one, ")
        request.write(b"part two")
        request.finish()
        return NOT_DONE_YET


@ensureDeferred
async def test_http10_keep_alive_answer_without_length_closes(reactor: Any) -> None:
    up_port = await listen_on_loopback(reactor, Unsized())
    route = {"id": "u", "uri": "/u", "upstream": {"nodes": {"127.0.0.1:%d" % up_port.getHost().port: 1}}}
    gw = await start_gateway(reactor, {"routes": [route]})
    try:
        keep = b"GET /u HTTP/1.0\r\nHost: gw.test\r\nConnection: keep-alive\r\n\r\n"
        raw = await raw_request(reactor, gw.port_number, keep + keep, timeout=5)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 "), raw  # Twisted answers in the client's version
        assert b"\r\nConnection: close" in head and b"content-length" not in head.lower(), head
        # The body ends with the connection (HTTP/1.0 has no chunked coding);
        # the second request is never read.
        assert body == b"part one, part two", raw
    finally:
        await gw.stop()
        await up_port.stopListening()
