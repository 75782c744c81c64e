"""
Embedding fauth in a Twisted application: L{ForwardAuthResource} guarding a
user's resource tree, and L{GatewayService} inside a user's L{MultiService}.

The auth service is the demo one (C{Authorization: 123} → 200, C{321} → 200
with C{X-User-ID: i-am-user}, else 403 with C{Location} and
C{X-Forward-Auth: Fail}, body C{403 Forbidden}).
"""
from __future__ import annotations

import json
from typing import Any, AsyncIterator, Dict, List, Optional

import attr
import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred
from treq.client import HTTPClient
from twisted.application.service import MultiService
from twisted.internet.error import ConnectionRefusedError
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from fauth.config import ForwardAuthConf, parse_config, parse_forward_auth
from fauth.process.demo import DemoAuthResource, EchoResource
from fauth.edge.resources import ForwardAuthResource
from fauth.config.schema import SchemaError
from fauth.process.service import GatewayService
from tests.servers import listen_on_loopback, port_url, service_port


class Hello(Resource):
    """Renders the X-User-ID request header it sees (or C{<none>})."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        seen = request.requestHeaders.getRawHeaders(b"x-user-id")
        request.setHeader(b"Content-Type", b"text/plain")
        return b"hello " + (b",".join(seen) if seen else b"<none>")


def user_tree() -> Resource:
    root = Resource()
    root.putChild(b"hello", Hello())
    return root




@attr.s(auto_attribs=True)
class Env:
    reactor: Any
    auth_url: str
    client: HTTPClient
    ports: List[Any]
    guards: List[ForwardAuthResource] = attr.Factory(list)

    async def serve(self, resource: Any) -> str:
        """Serve C{resource} on loopback; return its base URL."""
        port = await listen_on_loopback(self.reactor, resource)
        self.ports.append(port)
        return port_url(port)

    def conf(self, **extra: Any) -> Dict[str, Any]:
        conf: Dict[str, Any] = {
            "uri": self.auth_url,
            "request_headers": ["Authorization"],
            "upstream_headers": ["X-User-ID"],
            "client_headers": ["Location", "X-Forward-Auth"],
        }
        conf.update(extra)
        return conf

    async def get(self, url: str, headers: Optional[Dict[str, str]] = None) -> Any:
        response = await self.client.get(url, headers=headers)
        body = await response.content()
        return response, body


@async_yield_fixture
async def env(reactor: Any) -> AsyncIterator[Env]:
    auth = await listen_on_loopback(reactor, DemoAuthResource())
    pool = HTTPConnectionPool(reactor, persistent=False)
    e = Env(reactor, port_url(auth, "/"), HTTPClient(Agent(reactor, pool=pool)), [auth])
    try:
        yield e
    finally:
        for resource in e.guards:
            await resource.auth_clients.close()
        await pool.closeCachedConnections()
        for port in e.ports:
            await port.stopListening()


def guard(env: Env, wrapped: Any, conf: Any) -> ForwardAuthResource:
    resource = ForwardAuthResource(wrapped, conf, reactor=env.reactor)
    env.guards.append(resource)
    return resource


@ensureDeferred
async def test_allowed_request_reaches_child_with_upstream_headers(env: Env) -> None:
    base = await env.serve(guard(env, user_tree(), env.conf()))
    response, body = await env.get(base + "/hello", {"Authorization": "321"})
    assert response.code == 200
    assert body == b"hello i-am-user"


@ensureDeferred
async def test_client_supplied_user_id_removed_when_auth_lacks_it(env: Env) -> None:
    base = await env.serve(guard(env, user_tree(), env.conf()))
    response, body = await env.get(base + "/hello", {"Authorization": "123", "X-User-ID": "injected"})
    assert response.code == 200
    assert body == b"hello <none>"


@ensureDeferred
async def test_client_supplied_user_id_replaced_by_auth_answer(env: Env) -> None:
    base = await env.serve(guard(env, user_tree(), env.conf()))
    response, body = await env.get(base + "/hello", {"Authorization": "321", "X-User-ID": "admin"})
    assert response.code == 200
    assert body == b"hello i-am-user"


@ensureDeferred
async def test_denied_request_gets_auth_answer(env: Env) -> None:
    base = await env.serve(guard(env, user_tree(), env.conf()))
    response, body = await env.get(base + "/hello", {"Authorization": "wrong"})
    assert response.code == 403
    assert body == b"403 Forbidden"
    assert response.headers.getRawHeaders(b"location") == [b"http://example.com/auth"]
    assert response.headers.getRawHeaders(b"x-forward-auth") == [b"Fail"]
    assert b"hello" not in body


@ensureDeferred
async def test_denied_request_only_gets_listed_client_headers(env: Env) -> None:
    base = await env.serve(guard(env, user_tree(), env.conf(client_headers=["Location"])))
    response, _ = await env.get(base + "/hello")
    assert response.code == 403
    assert response.headers.getRawHeaders(b"location") == [b"http://example.com/auth"]
    assert not response.headers.hasHeader(b"x-forward-auth")


@ensureDeferred
async def test_guard_as_child_in_larger_tree(env: Env) -> None:
    root = Resource()
    open_page = Resource()
    open_page.isLeaf = True
    open_page.render_GET = lambda request: b"open"  # type: ignore[attr-defined]
    root.putChild(b"open", open_page)
    root.putChild(b"guarded", guard(env, user_tree(), env.conf()))
    base = await env.serve(root)

    response, body = await env.get(base + "/guarded/hello", {"Authorization": "321"})
    assert response.code == 200
    assert body == b"hello i-am-user"

    response, body = await env.get(base + "/guarded/hello")
    assert response.code == 403
    assert b"hello" not in body

    # Outside the guard, no auth is asked for.
    response, body = await env.get(base + "/open")
    assert response.code == 200
    assert body == b"open"

    # Traversal inside the guarded tree still yields the tree's own 404.
    response, _ = await env.get(base + "/guarded/missing", {"Authorization": "123"})
    assert response.code == 404


@ensureDeferred
async def test_conf_as_forward_auth_conf(env: Env) -> None:
    conf = parse_forward_auth(env.conf())
    assert isinstance(conf, ForwardAuthConf)
    base = await env.serve(guard(env, user_tree(), conf))
    response, body = await env.get(base + "/hello", {"Authorization": "321"})
    assert response.code == 200
    assert body == b"hello i-am-user"
    response, _ = await env.get(base + "/hello")
    assert response.code == 403


def test_bad_conf_dict_raises_schema_error_with_apisix_wording() -> None:
    from twisted.internet.testing import MemoryReactorClock

    with pytest.raises(SchemaError) as info:
        ForwardAuthResource(user_tree(), {"uri": "http://a/", "timeout": 0}, reactor=MemoryReactorClock())
    assert str(info.value) == 'property "timeout" validation failed: expected 0 to be at least 1'
    with pytest.raises(SchemaError) as info:
        ForwardAuthResource(user_tree(), {"timeout": 5}, reactor=MemoryReactorClock())
    assert str(info.value) == 'property "uri" is required'


# --- GatewayService in a user's MultiService ------------------------------


@ensureDeferred
async def test_gateway_service_in_user_multiservice(env: Env, reactor: Any) -> None:
    upstream = await listen_on_loopback(reactor, EchoResource())
    env.ports.append(upstream)
    conf = parse_config(
        {
            "listen": ["tcp:0:interface=127.0.0.1"],
            "routes": [
                {
                    "id": "1",
                    "uri": "/headers",
                    "plugins": {"forward-auth": env.conf()},
                    "upstream": {"nodes": {"127.0.0.1:%d" % upstream.getHost().port: 1}},
                }
            ],
        }
    )
    app = MultiService()
    gateway_service = GatewayService(conf, reactor=reactor)
    gateway_service.setServiceParent(app)
    app.startService()
    stopped = False
    try:
        assert gateway_service.running
        port = await service_port(gateway_service.listeners[0])
        url = port_url(port, "/headers")

        response, body = await env.get(url, {"Authorization": "321"})
        assert response.code == 200
        assert json.loads(body)["headers"]["X-User-Id"] == "i-am-user"

        response, _ = await env.get(url)
        assert response.code == 403

        await app.stopService()
        stopped = True
        assert not gateway_service.running
        with pytest.raises(ConnectionRefusedError):
            await env.client.get(url)
    finally:
        if not stopped:
            await app.stopService()


def test_gateway_site_traverses_any_root_but_the_gateway() -> None:
    # GatewayRequest skips traversal only in front of a GatewayResource;
    # a leaf like ForwardAuthResource needs postpath to route its tree.
    from twisted.web.resource import Resource
    from twisted.web.test.requesthelper import DummyChannel

    from fauth.edge.resources import GatewaySite

    seen: List[List[bytes]] = []

    class Leaf(Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            seen.append(list(request.postpath))
            return b"ok"

    site = GatewaySite(Leaf())
    channel = DummyChannel()
    channel.site = site
    request = site.requestFactory(channel)
    request.gotLength(0)
    request.requestReceived(b"GET", b"/a/b", b"HTTP/1.1")
    assert seen == [[b"a", b"b"]]


class CountingDemoAuth(DemoAuthResource):
    """The demo auth service, noting the client port of every request it answers."""

    def __init__(self) -> None:
        super().__init__()
        self.client_ports: List[int] = []

    def render(self, request: Any) -> Any:
        self.client_ports.append(request.getClientAddress().port)
        return super().render(request)


@ensureDeferred
async def test_one_application_pool_serves_its_treq_calls_and_the_auth_calls(env: Env) -> None:
    auth = CountingDemoAuth()
    auth_url = await env.serve(auth)
    pool = HTTPConnectionPool(env.reactor, persistent=True)
    app_client = HTTPClient(Agent(env.reactor, pool=pool))
    try:
        # The application's own call leaves a connection in its pool ...
        response = await app_client.get(auth_url + "/", headers={"Authorization": "123"})
        assert response.code == 200
        await response.content()
        resource = ForwardAuthResource(user_tree(), env.conf(uri=auth_url + "/"), reactor=env.reactor, pool=pool)
        assert resource.auth_clients.get(resource._auth.conf).pool is pool
        base = await env.serve(resource)
        # ... which fauth's auth calls then use (Twisted's own protocol),
        # allowed and denied alike, and give back.
        response, body = await env.get(base + "/hello", {"Authorization": "321"})
        assert (response.code, body) == (200, b"hello i-am-user")
        response, body = await env.get(base + "/hello")
        assert response.code == 403 and body == b"403 Forbidden"
        assert response.headers.getRawHeaders(b"location") == [b"http://example.com/auth"]
        response = await app_client.get(auth_url + "/", headers={"Authorization": "123"})
        assert response.code == 200
        await response.content()
        assert len(auth.client_ports) == 4 and len(set(auth.client_ports)) == 1
        # The application's pool is the application's: fauth does not close it.
        await resource.auth_clients.close()
        assert len(set(pool._connections.get((b"http", b"127.0.0.1", int(auth_url.rsplit(":", 1)[1])), []))) == 1
    finally:
        await pool.closeCachedConnections()


@ensureDeferred
async def test_an_application_pool_call_is_bounded_by_the_timeout_body_included(env: Env) -> None:
    class StallingBody(Resource):
        isLeaf = True

        def render(self, request: Any) -> Any:
            request.setResponseCode(403)
            request.setHeader(b"Content-Length", b"100")
            request.write(b"only part of it")
            return NOT_DONE_YET

    auth_url = await env.serve(StallingBody())
    pool = HTTPConnectionPool(env.reactor, persistent=True)
    try:
        resource = ForwardAuthResource(
            user_tree(), env.conf(uri=auth_url + "/", timeout=300, status_on_error=503), reactor=env.reactor, pool=pool
        )
        base = await env.serve(resource)
        started = env.reactor.seconds()
        response, body = await env.get(base + "/hello")
        assert response.code == 503
        assert env.reactor.seconds() - started < 2.0
        # The half-read connection was closed, not given back to the pool.
        assert all(not connections for connections in pool._connections.values())
    finally:
        await pool.closeCachedConnections()
