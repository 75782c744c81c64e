"""
Fuzzing with hypothesis.

  - Raw request bytes (generated request lines, header fields, separators
    and bodies, then byte-level mutations) sent over a real socket into a
    running gateway: every answer is well-formed HTTP with an expected
    status and no Python internals, the gateway keeps serving, and the
    private upstream only ever sees requests the auth service allowed.
  - Configuration documents around the real schema shapes into
    L{fauth.config.parse_config}: only L{ConfigError} may escape.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterator, List

import attr
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_twisted import blockon
from twisted.internet.defer import ensureDeferred
from twisted.internet.testing import MemoryReactorClock

from fauth.config import ConfigError, parse_config
from fauth.edge.gateway import Gateway
from tests.hostile_env import HostileEnv, start_env

ALLOWED = {200, 400, 403, 404, 405, 408, 411, 413, 414, 431, 501, 502, 503, 504}
# Short timeouts: incomplete requests get their 408 quickly.
FUZZ_LIMITS = {"header_timeout": 0.2, "body_timeout": 0.2, "idle_timeout": 0.2, "max_headers": 30,
               "max_header_bytes": 1024, "max_request_line": 512}
_PYTHON_INTERNALS = re.compile(rb"Traceback|File \"|\b[A-Za-z_]*(Error|Exception)\b")
_STATUS = re.compile(rb"HTTP/1\.[01] ([0-9]{3}) [^\r\n]*\r\n")


@pytest.fixture(scope="module")
def fuzz_env() -> Iterator[HostileEnv]:
    from twisted.internet import reactor

    environment = blockon(ensureDeferred(start_env(reactor, FUZZ_LIMITS, degrade=False)))
    try:
        yield environment
    finally:
        blockon(ensureDeferred(environment.stop()))


def parse_responses(raw: bytes) -> List[int]:
    """
    Statuses of the responses in C{raw}, strictly: each must have a status
    line, header fields with a colon and a framed (or final) body.
    """
    statuses = []
    rest = raw
    while rest:
        match = _STATUS.match(rest)
        assert match, "not a status line: %r" % rest[:80]
        end = rest.find(b"\r\n\r\n")
        assert end != -1, "incomplete response head: %r" % rest[:200]
        lines = rest[match.end() : end].split(b"\r\n") if end > match.end() - 2 else []
        rest = rest[end + 4 :]
        status = int(match.group(1))
        statuses.append(status)
        headers: Dict[bytes, bytes] = {}
        for line in lines:
            if not line:
                continue
            name, colon, value = line.partition(b":")
            assert colon and name and name == name.strip(), "bad header line %r" % line
            headers[name.lower()] = value.strip()
        if status == 100 or status in (204, 304):
            continue
        if b"content-length" in headers:
            length = int(headers[b"content-length"])
            if (not rest or rest[:7] == b"HTTP/1.") and length:
                continue  # a HEAD response: the length without the body
            assert len(rest) >= length, "truncated body"
            rest = rest[length:]
        elif headers.get(b"transfer-encoding") == b"chunked":
            while True:
                size_line, sep, rest = rest.partition(b"\r\n")
                assert sep, "truncated chunked body"
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    _, sep, rest = rest.partition(b"\r\n")
                    break
                rest = rest[size + 2 :]
        else:
            rest = b""
    return statuses


# ---------------------------------------------------------------------------
# Raw requests

_TARGETS = [
    b"/public/x", b"/public/", b"/private", b"/private/x", b"/bare", b"/bare/y", b"/get-only", b"/vhost/x",
    b"/nowhere", b"http://secure.example/vhost/x", b"http://open.example/vhost/x", b"HTTP://gw.test/private",
    b"/public/x?a=1&b=%00", b"/public/../private", b"/public/%2e%2e/private", b"//private", b"/%2fprivate",
]
_TRICKY_TARGETS = [
    b"*", b"/public\\..\\private", b"/public/%c0%ae%c0%ae/private", b"/public/..;/private", b"/private%00",
    b"/public/%5c..%5cprivate", b"/..", b"http://user@gw.test/private",
]
_FIELDS = [
    (b"Authorization", b"letmein"),
    (b"Authorization", b"letmein"), (b"Authorization", b"nope"), (b"X-User-ID", b"mallory"),
    (b"X_User_ID", b"mallory"), (b"Connection", b"keep-alive"), (b"Connection", b"X-User-ID, close"),
    (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"0"), (b"Content-Length", b"5"),
    (b"Expect", b"100-continue"), (b"Content-Type", b"application/x-www-form-urlencoded"),
    (b"Content-Type", b"multipart/form-data; boundary=x"), (b"Cookie", b"a=b; c"), (b"Accept", b"*/*"),
]
_HOSTILE_FIELDS = [
    (b"Host", b""), (b"Host", b"gw.test"), (b"Transfer-Encoding", b"gzip, chunked"),
    (b"Transfer-Encoding", b"identity"), (b"Content-Length", b"-1"), (b"Content-Length", b"1, 2"),
    (b"Content-Length", b"99999999999"), (b"Transfer-Encoding", b"chunked, gzip"),
]
_BODIES = [
    b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n", b"ffffffffffffffffffff\r\n", b"5 ;x\r\nhello\r\n0\r\n\r\n",
    b"GET /private/x HTTP/1.1\r\nHost: gw.test\r\nAuthorization: letmein\r\n\r\n",
    b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\nb\r\n--x--\r\n",
]

_VALID_METHODS = [b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"DELETE", b"PATCH"]
odd_methods = st.sampled_from([b"BREW", b"get", b"G T", b"", b"CONNECT", b"GET\x00"]) | st.binary(max_size=6)
odd_targets = (
    st.sampled_from(_TRICKY_TARGETS) | st.binary(max_size=30).map(lambda b: b"/" + b) | st.binary(max_size=12)
)
odd_versions = st.sampled_from([b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 x", b"", b"HTTP/1.2"])
odd_fields = st.sampled_from(_HOSTILE_FIELDS) | st.tuples(st.binary(max_size=10), st.binary(max_size=24)) | st.tuples(
    st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"Host", b"Authorization", b"X-User-ID"]),
    st.binary(max_size=10),
)
odd_separators = st.sampled_from([b"\n", b"\r", b"\r\n ", b"\r\n\t", b"\x00", b" \r\n"])


mutations = st.lists(
    st.tuples(st.sampled_from(["insert", "delete", "replace", "repeat"]), st.integers(0, 4096),
              st.binary(min_size=1, max_size=4)),
    min_size=1,
    max_size=3,
)


# Not st.integers: hypothesis favours boundary values, so "== 0" would be common.
_ONE_IN_FOUR = st.sampled_from((False, False, False, True))
_ONE_IN_TEN = st.sampled_from((False,) * 9 + (True,))


def mostly(draw: Any, usual: Any, odd: Any) -> Any:
    """One in ten draws from C{odd}, the rest from C{usual}."""
    return draw(odd) if draw(_ONE_IN_TEN) else draw(usual)


@st.composite
def raw_requests(draw: Any) -> bytes:
    """A plausible request (so that routing, auth and proxying run), then odd parts and byte mutations."""
    sep = lambda: mostly(draw, st.just(b"\r\n"), odd_separators)  # noqa: E731
    method = mostly(draw, st.sampled_from(_VALID_METHODS), odd_methods)
    target = mostly(draw, st.sampled_from(_TARGETS), odd_targets)
    version = mostly(draw, st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]), odd_versions)
    head = method + b" " + target + b" " + version + sep()
    if not draw(_ONE_IN_FOUR):
        head += b"Host: " + draw(st.sampled_from([b"gw.test", b"secure.example", b"open.example"])) + sep()
    for _ in range(draw(st.sampled_from((0, 1, 2, 3, 4)))):
        name, value = mostly(draw, st.sampled_from(_FIELDS), odd_fields)
        head += name + b": " + value + sep()
    if not draw(_ONE_IN_FOUR):
        head += b"Connection: close\r\n"
    data = head + b"\r\n" + mostly(draw, st.sampled_from(_BODIES), st.binary(max_size=40))
    if draw(_ONE_IN_FOUR):
        for kind, position, chunk in draw(mutations):
            at = position % (len(data) + 1)
            if kind == "insert":
                data = data[:at] + chunk + data[at:]
            elif kind == "delete":
                data = data[:at] + data[at + len(chunk) :]
            elif kind == "replace":
                data = data[:at] + chunk + data[at + len(chunk) :]
            else:
                data = data[:at] + data[at : at + 16] * len(chunk) + data[at:]
    return data


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(payload=raw_requests())
@pytest_twisted.ensureDeferred
async def test_raw_request_fuzz(fuzz_env: HostileEnv, payload: bytes) -> None:
    raw = await fuzz_env.send(payload, timeout=3.0)
    assert not _PYTHON_INTERNALS.search(raw), raw
    for status in parse_responses(raw):
        assert status in ALLOWED or status == 100, (status, raw)
    # The private upstream only ever saw requests the auth service allowed.
    allowed = [call for call in fuzz_env.auth.calls if call.get(b"authorization") == [b"letmein"]]
    assert len(fuzz_env.private.hits) <= len(allowed)
    for hit in fuzz_env.private.hits:
        assert b"letmein" in fuzz_env.private.header(hit, b"authorization"), hit
    # And the gateway still serves a normal client.
    normal = await fuzz_env.send(b"GET /public/ok HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n", timeout=3.0)
    assert parse_responses(normal) == [200], normal


# ---------------------------------------------------------------------------
# Configuration documents

_TOP = ["listen", "routes", "upstreams", "demo", "ssl_trusted_certificate", "http", "admin", "shutdown_grace"]
_ROUTE = ["id", "name", "desc", "uri", "uris", "methods", "host", "hosts", "priority", "plugins", "upstream",
          "upstream_id", "status", "labels", "enable_websocket"]
_UPSTREAM = ["id", "type", "scheme", "nodes", "pass_host", "upstream_host", "timeout", "keepalive_pool", "name"]
_FORWARD_AUTH = ["uri", "ssl_verify", "request_method", "max_req_body_size", "request_headers", "extra_headers",
                 "upstream_headers", "client_headers", "timeout", "keepalive", "keepalive_timeout", "keepalive_pool",
                 "allow_degradation", "status_on_error", "error_response"]
_HTTP = ["idle_timeout", "max_headers", "max_header_bytes", "max_request_line", "header_timeout", "body_timeout"]
_ADMIN = ["listen", "keys", "store", "metrics_require_key"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "/", "/a/*", "GET", "POST", "http://127.0.0.1:1/auth", "https://a.example/x", "tcp:0",
                     "tcp:99999", "ssl:443", "unix:/tmp/x", "127.0.0.1:80", "[::1]:80", "a.example", "*.example",
                     "roundrobin", "chash", "pass", "node", "rewrite", "$remote_addr", "${x ?? y}", "$post_arg.a",
                     "${UNSET}", "X-User-ID"]),
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def shaped(keys: List[str], values: Any = json_values) -> Any:
    """A dict over (mostly) the schema's own keys, with any values."""
    key = st.sampled_from(keys) | st.text(max_size=8)
    return st.dictionaries(key, values, max_size=len(keys))


nodes = st.one_of(
    st.dictionaries(st.sampled_from(["127.0.0.1:80", "a.example", "[::1]:8080", "::1", "x:y", ""]) | st.text(max_size=10),
                    json_values, max_size=3),
    st.lists(shaped(["host", "port", "weight"]), max_size=3),
    json_values,
)
upstreams = shaped(_UPSTREAM).flatmap(
    lambda d: st.just(d) | nodes.map(lambda n: dict(d, nodes=n))
)
forward_auth = shaped(_FORWARD_AUTH).flatmap(
    lambda d: st.just(d) | st.just(dict(d, uri="http://127.0.0.1:9/auth"))
)
plugins = st.one_of(st.dictionaries(st.sampled_from(["forward-auth", "limit-count"]), forward_auth, max_size=2), json_values)
routes = shaped(_ROUTE).flatmap(
    lambda d: st.fixed_dictionaries(
        {},
        optional={"plugins": plugins, "upstream": upstreams, "uri": st.sampled_from(["/", "/a", "/a/*", "", "a"]) | json_values},
    ).map(lambda extra: dict(d, **extra))
)
documents = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "listen": json_values,
            "routes": st.lists(routes, max_size=3) | json_values,
            "upstreams": st.lists(upstreams, max_size=2) | json_values,
            "http": shaped(_HTTP) | json_values,
            "admin": shaped(_ADMIN) | json_values,
            "demo": shaped(["auth", "upstream"]) | json_values,
            "ssl_trusted_certificate": json_values,
            "shutdown_grace": json_values,
        },
    ),
    shaped(_TOP),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents)
def test_config_fuzz_only_config_error_escapes(doc: Any) -> None:
    try:
        conf = parse_config(doc, environ={})
    except ConfigError:
        return
    # What validates must build: a runtime exception here is what let the
    # admin API store a configuration no process could then run.  (The CA
    # bundle is a file the fuzzer cannot make.)
    conf = attr.evolve(conf, ssl_trusted_certificate=None)
    gateway = Gateway(MemoryReactorClock(), conf)
    gateway.update(conf)
