"""Tests for the quickstart demo services (``fauth.process.demo``).

The auth branches and the echo routes are exercised over real loopback
sockets, through :func:`fauth.process.demo.demo_services` as the quickstart starts
them; the ``/bytes`` producer's backpressure is checked synchronously.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any, AsyncIterator, List, Optional

import attr
import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.test.requesthelper import DummyRequest

from fauth.process.demo import (
    AUTH_SERVICE_NAME,
    MAX_BYTES,
    UPSTREAM_SERVICE_NAME,
    DemoAuthResource,
    EchoResource,
    _RepeatedBytesProducer,
    demo_services,
)
from tests.servers import listen_on_loopback, port_url, service_port

LOOPBACK = "tcp:0:interface=127.0.0.1"


@pytest.fixture
def demo_reactor() -> Any:
    """The reactor pytest-twisted installed (imported late, never at module level)."""
    from twisted.internet import reactor

    return reactor


@attr.s(auto_attribs=True, frozen=True)
class Demo:
    """The running demo services and a keep-alive client for them."""

    auth_url: str
    upstream_url: str
    client: HTTPClient
    connections: List[str]  # one entry per server-side connection accepted


@async_yield_fixture
async def demo(demo_reactor: Any) -> AsyncIterator[Demo]:
    """Start ``demo_services`` on loopback; tear down client pool and ports."""
    services = demo_services(demo_reactor, LOOPBACK, LOOPBACK)
    auth_service = services.getServiceNamed(AUTH_SERVICE_NAME)
    upstream_service = services.getServiceNamed(UPSTREAM_SERVICE_NAME)

    connections: List[str] = []
    for name, service in ((AUTH_SERVICE_NAME, auth_service), (UPSTREAM_SERVICE_NAME, upstream_service)):
        _count_connections(service.factory, name, connections)

    services.startService()
    auth_port = await service_port(auth_service)
    upstream_port = await service_port(upstream_service)

    # One cached connection per host, so reuse is observable.
    pool = HTTPConnectionPool(demo_reactor, persistent=True)
    pool.maxPersistentPerHost = 1
    client = HTTPClient(Agent(demo_reactor, pool=pool))
    try:
        yield Demo(port_url(auth_port), port_url(upstream_port), client, connections)
    finally:
        await pool.closeCachedConnections()
        await services.stopService()


def _count_connections(site: Any, name: str, sink: List[str]) -> None:
    """Record in ``sink`` every connection ``site`` accepts."""
    build = site.buildProtocol

    def counting(addr: Any) -> Any:
        sink.append(name)
        return build(addr)

    site.buildProtocol = counting


async def _get(demo: Demo, url: str, **kwargs: Any) -> Any:
    """GET ``url`` and return (response, body bytes)."""
    response = await demo.client.get(url, **kwargs)
    return response, await response.content()


# --- auth service ----------------------------------------------------------


@ensureDeferred
async def test_auth_123_allows_without_user(demo: Demo) -> None:
    response, body = await _get(demo, demo.auth_url + "/check", headers={"Authorization": "123"})
    assert response.code == 200
    assert body == b""
    assert response.headers.getRawHeaders("X-User-ID") is None
    assert response.length == 0


@ensureDeferred
async def test_auth_321_allows_with_user(demo: Demo) -> None:
    response, body = await _get(demo, demo.auth_url + "/", headers={"Authorization": "321"})
    assert response.code == 200
    assert body == b""
    assert response.headers.getRawHeaders("X-User-ID") == ["i-am-user"]


@pytest.mark.parametrize("authorization", [None, "999", "1234"])
@ensureDeferred
async def test_auth_other_denies_with_location(demo: Demo, authorization: Optional[str]) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response, body = await _get(demo, demo.auth_url + "/anything/at/all", headers=headers)
    assert response.code == 403
    assert body == b"403 Forbidden"
    assert response.headers.getRawHeaders("Location") == ["http://example.com/auth"]
    assert response.headers.getRawHeaders("X-Forward-Auth") == ["Fail"]
    assert response.headers.getRawHeaders("Content-Type")[0].startswith("text/plain")


@ensureDeferred
async def test_auth_any_method(demo: Demo) -> None:
    response = await demo.client.post(demo.auth_url + "/x", data=b"body", headers={"Authorization": "321"})
    await response.content()
    assert response.code == 200
    assert response.headers.getRawHeaders("X-User-ID") == ["i-am-user"]


@ensureDeferred
async def test_auth_tenant_present(demo: Demo) -> None:
    response, body = await _get(demo, demo.auth_url + "/auth", headers={"tenant_id": "abcd"})
    assert response.code == 200
    assert body == b""
    assert response.headers.getRawHeaders("X-User-ID") == ["i-am-user"]


@ensureDeferred
async def test_auth_tenant_missing(demo: Demo) -> None:
    # Authorization is ignored on /auth: only tenant_id counts there.
    response, body = await _get(demo, demo.auth_url + "/auth", headers={"Authorization": "123"})
    assert response.code == 400
    assert body == b"tenant_id is required"
    assert response.headers.getRawHeaders("Content-Type")[0].startswith("text/plain")


@ensureDeferred
async def test_auth_tenant_empty(demo: Demo) -> None:
    response, body = await _get(demo, demo.auth_url + "/auth", headers={"tenant_id": ""})
    assert response.code == 400
    assert body == b"tenant_id is required"


@ensureDeferred
async def test_auth_keeps_connection_alive(demo: Demo) -> None:
    """Every branch sets Content-Length, so one connection serves them all."""
    for headers in ({"Authorization": "123"}, {"Authorization": "321"}, {}, {"tenant_id": "t"}):
        path = "/auth" if "tenant_id" in headers else "/check"
        response, _ = await _get(demo, demo.auth_url + path, headers=headers)
        assert response.length is not None
    await _get(demo, demo.auth_url + "/auth")
    assert demo.connections.count(AUTH_SERVICE_NAME) == 1


# --- echo upstream -----------------------------------------------------------


@ensureDeferred
async def test_echo_headers(demo: Demo) -> None:
    response = await demo.client.get(
        demo.upstream_url + "/headers",
        headers={"X-User-ID": "i-am-user", "X-Multi": ["a", "b"]},
    )
    payload = await response.json()
    assert response.code == 200
    assert response.headers.getRawHeaders("Content-Type") == ["application/json"]
    assert payload["headers"]["X-User-Id"] == "i-am-user"
    assert payload["headers"]["X-Multi"] == "a,b"
    assert "Host" in payload["headers"]


@ensureDeferred
async def test_echo_head_headers_has_no_body(demo: Demo) -> None:
    get = await demo.client.get(demo.upstream_url + "/headers")
    get_body = await get.content()
    head = await demo.client.head(demo.upstream_url + "/headers")
    assert head.code == 200
    assert await head.content() == b""
    # HEAD announces the length a GET would have (same headers sent).
    assert head.headers.getRawHeaders("Content-Length") == [str(len(get_body))]


@ensureDeferred
async def test_echo_anything(demo: Demo) -> None:
    body = b"hello \xff world"
    response = await demo.client.request(
        "PUT",
        demo.upstream_url + "/anything/deep/path?a=1&a=2&b=%20x+y",
        data=body,
        headers={"Content-Type": "application/octet-stream"},
    )
    payload = await response.json()
    assert response.code == 200
    assert payload["method"] == "PUT"
    assert payload["url"] == "/anything/deep/path?a=1&a=2&b=%20x+y"
    assert payload["args"] == {"a": "1", "b": " x y"}
    assert payload["sha256"] == hashlib.sha256(body).hexdigest()
    assert payload["length"] == len(body)
    assert payload["data"] == body.decode("utf-8", "replace")
    assert payload["json"] is None
    assert payload["form"] == {}


@ensureDeferred
async def test_echo_anything_form(demo: Demo) -> None:
    response = await demo.client.request(
        "PATCH", demo.upstream_url + "/anything", data={"tenant_id": "123", "x": "a b"}
    )
    payload = await response.json()
    assert payload["method"] == "PATCH"
    assert payload["form"] == {"tenant_id": "123", "x": "a b"}
    assert payload["args"] == {}
    # POST forms are pre-parsed by Twisted, which must not eat the body.
    response = await demo.client.post(demo.upstream_url + "/post?q=1", data={"tenant_id": "000"})
    payload = await response.json()
    assert payload["form"] == {"tenant_id": "000"}
    assert payload["args"] == {"q": "1"}
    assert payload["data"] == "tenant_id=000"


@ensureDeferred
async def test_echo_post_json(demo: Demo) -> None:
    document = {"tenant_id": 123, "nested": [1, "two"]}
    response = await demo.client.post(demo.upstream_url + "/post", json=document)
    payload = await response.json()
    assert response.code == 200
    assert payload["method"] == "POST"
    assert payload["json"] == document
    assert json.loads(payload["data"]) == document
    assert payload["headers"]["Content-Type"].startswith("application/json")


@ensureDeferred
async def test_echo_post_invalid_json_is_null(demo: Demo) -> None:
    response = await demo.client.post(
        demo.upstream_url + "/post", data=b"{nope", headers={"Content-Type": "application/json"}
    )
    payload = await response.json()
    assert payload["json"] is None
    assert payload["data"] == "{nope"


@ensureDeferred
async def test_echo_status(demo: Demo) -> None:
    response, body = await _get(demo, demo.upstream_url + "/status/204")
    assert response.code == 204
    assert body == b""
    response, body = await _get(demo, demo.upstream_url + "/status/418")
    assert response.code == 418
    assert body == b""


@ensureDeferred
async def test_echo_status_invalid(demo: Demo) -> None:
    response, _ = await _get(demo, demo.upstream_url + "/status/100")
    assert response.code == 400


@ensureDeferred
async def test_echo_bytes(demo: Demo) -> None:
    response, body = await _get(demo, demo.upstream_url + "/bytes/100000")
    assert response.code == 200
    assert response.length == 100000
    assert body == b"x" * 100000


@ensureDeferred
async def test_echo_bytes_large_streams(demo: Demo) -> None:
    size = 5 * 1024 * 1024 + 3
    response, body = await _get(demo, demo.upstream_url + "/bytes/%d" % (size,))
    assert len(body) == size
    # The connection is still usable afterwards (finished cleanly).
    response, body = await _get(demo, demo.upstream_url + "/bytes/0")
    assert response.code == 200
    assert body == b""
    assert demo.connections.count(UPSTREAM_SERVICE_NAME) == 1


@ensureDeferred
async def test_echo_bytes_capped(demo: Demo) -> None:
    response = await demo.client.head(demo.upstream_url + "/bytes/999999999999")
    assert await response.content() == b""
    assert response.headers.getRawHeaders("Content-Length") == [str(MAX_BYTES)]


@pytest.mark.parametrize(
    "method, path",
    [("GET", "/nope"), ("GET", "/post"), ("POST", "/headers"), ("GET", "/anythingelse")],
)
@ensureDeferred
async def test_echo_not_found(demo: Demo, method: str, path: str) -> None:
    response = await demo.client.request(method, demo.upstream_url + path)
    payload = await response.json()
    assert response.code == 404
    assert payload == {"error": "not found"}


@ensureDeferred
async def test_listen_on_loopback(demo_reactor: Any) -> None:
    """The shared helper serves a resource on a fresh loopback port."""
    port = await listen_on_loopback(demo_reactor, DemoAuthResource())
    pool = HTTPConnectionPool(demo_reactor, persistent=False)
    try:
        client = HTTPClient(Agent(demo_reactor, pool=pool))
        response = await client.get(port_url(port, "/auth"), headers={"tenant_id": "x"})
        await response.content()
        assert port.getHost().host == "127.0.0.1"
        assert response.code == 200
    finally:
        await port.stopListening()


# --- synchronous checks ------------------------------------------------------


class _FullBufferRequest:
    """
    Just enough of a request for the producer, whose transport is 'full'
    after every write (as a real one pauses its producer inside write()).
    """

    def __init__(self) -> None:
        self.written: List[bytes] = []
        self.producer: Any = None
        self.finished = 0
        self.finish_notifications: List[Deferred[None]] = []

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def notifyFinish(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.finish_notifications.append(d)
        return d

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self.producer.pauseProducing()

    def finish(self) -> None:
        self.finished += 1


def test_bytes_producer_respects_backpressure() -> None:
    request = _FullBufferRequest()
    producer = _RepeatedBytesProducer(request, 64 * 1024 * 2 + 10)  # type: ignore[arg-type]
    producer.start()
    assert [len(chunk) for chunk in request.written] == [64 * 1024]
    assert request.finished == 0
    producer.resumeProducing()
    producer.resumeProducing()
    assert [len(chunk) for chunk in request.written] == [64 * 1024, 64 * 1024, 10]
    assert request.finished == 1
    assert request.producer is None


def test_bytes_producer_stops_on_disconnect() -> None:
    request = _FullBufferRequest()
    producer = _RepeatedBytesProducer(request, 64 * 1024 * 4)  # type: ignore[arg-type]
    producer.start()
    for d in request.finish_notifications:
        d.errback(ConnectionDone("client went away"))
    producer.resumeProducing()
    assert len(request.written) == 1
    assert request.finished == 0


def test_auth_resource_dummy_request() -> None:
    """Synchronous smoke test: render() completes the request itself."""
    request = DummyRequest([b"auth"])
    request.path = b"/auth"
    request.requestHeaders.setRawHeaders(b"tenant_id", [b"t1"])
    DemoAuthResource().render(request)
    assert request.finished == 1
    assert request.responseCode == 200
    assert request.responseHeaders.getRawHeaders(b"X-User-ID") == [b"i-am-user"]


def test_echo_resource_dummy_request_anything() -> None:
    request = DummyRequest([b"anything"])
    request.path = b"/anything"
    request.uri = b"/anything?q=1"
    request.method = b"POST"
    request.content = io.BytesIO(b"")
    EchoResource().render(request)
    payload = json.loads(b"".join(request.written))
    assert payload["args"] == {"q": "1"}
    assert payload["sha256"] == hashlib.sha256(b"").hexdigest()
