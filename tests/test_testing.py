"""
L{fauth.testing}: the doubles an application guarded by fauth tests with,
used the way docs/embedders/embedding.md shows.
"""
from __future__ import annotations

import json
from typing import Any

from pytest_twisted import ensureDeferred
from treq.testing import StubTreq
from twisted.logger import Logger
from twisted.web.resource import Resource

from fauth.testing import FakeRequest, LogCapture, MemoryGateway, StubAuthService

IDENTITY = {"321": {"X-User-ID": "i-am-user"}}


class Hello(Resource):
    """Renders the X-User-ID it sees."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        seen = request.getHeader(b"x-user-id")
        return json.dumps({"user": seen.decode() if seen else None, "path": request.path.decode()}).encode()


@ensureDeferred
async def test_a_guarded_resource_under_stub_treq() -> None:
    auth = StubAuthService(tokens=IDENTITY, deny=(401, ((b"WWW-Authenticate", b"Bearer"),), b"who?"))
    guarded = auth.guard(Hello(), {"request_headers": ["Authorization"], "upstream_headers": ["X-User-ID"],
                                    "client_headers": ["WWW-Authenticate"]})
    client = StubTreq(guarded)
    allowed = await client.get("http://app.test/hello", headers={"Authorization": "321", "X-User-ID": "spoofed"})
    assert allowed.code == 200
    assert json.loads(await allowed.content()) == {"user": "i-am-user", "path": "/hello"}
    denied = await client.get("http://app.test/hello", headers={"Authorization": "nope"})
    assert denied.code == 401
    assert denied.headers.getRawHeaders(b"www-authenticate") == [b"Bearer"]
    assert await denied.content() == b"who?"
    # What the auth service was asked, as fauth builds it.
    first, second = auth.calls
    assert first.method == "GET" and first.header(b"authorization") == b"321"
    assert first.header(b"x-forwarded-uri") == b"/hello" and second.header(b"authorization") == b"nope"


def test_the_whole_gateway_in_memory() -> None:
    auth = StubAuthService(tokens=IDENTITY)
    doc = {
        "routes": [
            {
                "id": "1",
                "uri": "/api/*",
                "plugins": {"forward-auth": {"uri": "http://auth.test/verify", "request_headers": ["Authorization"],
                                             "upstream_headers": ["X-User-ID"]}},
                "upstream": {"nodes": {"10.0.0.1:8080": 1}},
            }
        ]
    }
    gateway = MemoryGateway(doc, auth, upstreams={("10.0.0.1", 8080): Hello()})
    allowed = gateway.request("GET", "/api/x", headers=[("Authorization", "321")])
    assert allowed.status == 200
    assert json.loads(allowed.body) == {"user": "i-am-user", "path": "/api/x"}
    denied = gateway.request("GET", "/api/x")
    assert denied.status == 403
    assert gateway.request("GET", "/elsewhere").status == 404
    assert len(auth.calls) == 2
    assert len(gateway.reactor.tcpClients) == 1  # one pooled upstream connection, reused


def test_a_custom_decision() -> None:
    auth = StubAuthService(decide=lambda call: (302, ((b"Location", b"/login"),), b""))
    gateway = MemoryGateway(
        {"routes": [{"id": "r", "uri": "/*", "plugins": {"forward-auth": {"uri": "http://a/", "client_headers": ["Location"]}},
                     "upstream": {"nodes": {"10.0.0.1:80": 1}}}]},
        auth,
        upstreams=Hello(),
    )
    response = gateway.request("GET", "/x")
    assert (response.status, response.header("location")) == (302, b"/login")


def test_fake_request_and_log_capture() -> None:
    request = FakeRequest(b"POST", b"/x")
    ended = []
    request.notifyFinish().addBoth(ended.append)
    request.setResponseCode(201)
    request.write(b"made")
    request.finish()
    assert (request.code, request.body, ended) == (201, b"made", [None])
    gone = FakeRequest()
    lost = []
    gone.notifyFinish().addErrback(lost.append)
    gone.finish_by_client_gone()
    assert len(lost) == 1
    with LogCapture() as logs:
        Logger().warn("hello {who}", who="tests")
    assert logs.contains("hello tests") and not logs.contains("goodbye")
