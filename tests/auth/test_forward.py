"""Header rules and the auth request's handling of names that must not be sent."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from fauth.auth.forward import ForwardAuth
from fauth.auth.client import AuthCallError, AuthClient, AuthTarget
from fauth.config import parse_forward_auth
from fauth.process.demo import DemoAuthResource, EchoResource
from fauth.wire.headers import HeaderError
from fauth.request.inbound import InboundRequest
from tests.harness import LogCapture, start_gateway
from tests.servers import listen_on_loopback


def auth_headers(name: str, value: str) -> Tuple[Tuple[bytes, bytes], ...]:
    """The auth request's fields for a plugin with one literal C{extra_headers} entry."""
    conf = parse_forward_auth({"uri": "http://127.0.0.1:9/auth", "extra_headers": {name: value}})
    auth = ForwardAuth(conf, AuthClient(Clock(), AuthTarget.parse(conf.uri, True)), Clock())
    inbound = InboundRequest(
        method="GET", request_uri="/x", path="/x", query="", host="gw.test", scheme="http",
        remote_addr="127.0.0.1", remote_port=1, server_addr="127.0.0.1", server_port=2, headers=Headers(),
    )
    return auth.build_headers(inbound)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("X-Foo\n", "v", "key"),  # a regex anchored with $ would accept this one
        ("X Foo", "v", "key"),
        ("X-Foo:", "v", "key"),
        ("X-Ümlaut", "v", "key"),
        ("X-Foo", "a\r\nb", "value"),
        ("X-Foo", "a\nb", "value"),
        ("X-Foo", "a\x00b", "value"),
        ("X-Foo", "a\x7fb", "value"),
    ],
)
def test_auth_request_refuses_unsendable_extra_headers(name: str, value: str, message: str) -> None:
    with pytest.raises(HeaderError, match="invalid characters found in header " + message):
        auth_headers(name, value)


def test_auth_request_sends_tab_and_token_names() -> None:
    assert (b"X-Foo_bar.baz~1", b"a\tb c") in auth_headers("X-Foo_bar.baz~1", "a\tb c")


def test_unencodable_auth_host_is_a_bad_uri() -> None:
    with pytest.raises(AuthCallError, match="bad uri"):
        AuthTarget.parse("http://a..b/auth", True)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("bad_name", ["X-Ümlaut", "X-€uro", "X-Foo\n", "X Foo"])
async def test_bad_extra_header_name_fails_the_call_not_the_gateway(bad_name: str) -> None:
    auth = await listen_on_loopback(reactor, DemoAuthResource())
    upstream = await listen_on_loopback(reactor, EchoResource())
    gateway = await start_gateway(
        reactor,
        {
            "routes": [
                {
                    "id": "1",
                    "uri": "/headers",
                    "plugins": {
                        "forward-auth": {
                            "uri": "http://127.0.0.1:%d/" % auth.getHost().port,
                            "request_headers": ["Authorization"],
                            "extra_headers": {bad_name: "x"},
                            "status_on_error": 503,
                        }
                    },
                    "upstream": {"nodes": {"127.0.0.1:%d" % upstream.getHost().port: 1}},
                },
                {
                    "id": "2",
                    "uri": "/bad-host",
                    "plugins": {"forward-auth": {"uri": "http://a..b/auth", "status_on_error": 502}},
                    "upstream": {"nodes": {"127.0.0.1:%d" % upstream.getHost().port: 1}},
                },
            ]
        },
    )
    try:
        import treq

        with LogCapture() as logs:
            reply = await treq.get(gateway.url("/headers"), headers={"Authorization": "321"})
            body = await reply.content()
            bad_host = await treq.get(gateway.url("/bad-host"))
            await bad_host.content()
        assert reply.code == 503
        assert body == b""
        assert logs.contains("failed to process forward auth, err: invalid characters found in header key")
        assert bad_host.code == 502
        assert logs.contains("failed to process forward auth, err: bad uri")
        assert not logs.contains("Traceback")
    finally:
        await gateway.stop()
        await auth.stopListening()
        await upstream.stopListening()


def test_framing_headers_are_never_copied_to_the_auth_request() -> None:
    # A client's Content-Length on a body-less auth GET would make the auth
    # service read the next pooled request as this one's body.
    conf = parse_forward_auth(
        {
            "uri": "http://127.0.0.1:9/auth",
            "request_headers": ["Authorization", "Content-Length", "Transfer-Encoding", "Connection"],
            "extra_headers": {"Expect": "100-continue", "X-Tenant": "t1"},
        }
    )
    with LogCapture() as logs:
        auth = ForwardAuth(conf, AuthClient(Clock(), AuthTarget.parse(conf.uri, True)), Clock())
    for name in ("Content-Length", "Transfer-Encoding", "Connection", "Expect"):
        assert logs.contains("%s frames the auth request itself and is not copied" % name), logs.lines
    inbound = InboundRequest(
        method="POST", request_uri="/x", path="/x", query="", host="gw.test", scheme="http",
        remote_addr="127.0.0.1", remote_port=1, server_addr="127.0.0.1", server_port=2,
        headers=Headers(
            {b"Authorization": [b"321"], b"Content-Length": [b"48"], b"Transfer-Encoding": [b"chunked"],
             b"Connection": [b"keep-alive"]}
        ),
    )
    names = [name.lower() for name, _ in auth.build_headers(inbound)]
    assert b"authorization" in names and b"x-tenant" in names
    assert not {b"content-length", b"transfer-encoding", b"connection", b"expect"} & set(names)


@pytest.mark.parametrize(
    "request_headers",
    [
        [],
        ["Authorization"],
        ["Authorization", "Cookie", "X_Token"],
        ["X-Forwarded-For", "Authorization", "x-forwarded-uri"],  # generated ones are never copied
        ["Authorization", "authorization"],  # the same field twice
        ["Host", "Authorization"],
        ["User-Agent"],
    ],
)
@pytest.mark.parametrize(
    "client",
    [
        {},
        {b"authorization": [b"t1", b"t2"], b"cookie": [b"a=1"], b"x-token": [b"x"], b"x-forwarded-for": [b"6.6.6.6"]},
        {b"host": [b"gw.test"], b"user-agent": [b"curl"], b"authorization": [b"bad\x01value"]},
    ],
)
def test_the_usual_configuration_sends_what_the_precedence_table_does(
    request_headers: List[str], client: Dict[bytes, List[bytes]]
) -> None:
    conf = parse_forward_auth({"uri": "http://127.0.0.1:9/auth", "request_headers": request_headers})
    auth = ForwardAuth(conf, AuthClient(Clock(), AuthTarget.parse(conf.uri, True)), Clock())
    inbound = InboundRequest(
        method="GET", request_uri="/x?y", path="/x", query="y", host="gw.test", scheme="http",
        remote_addr="127.0.0.1", remote_port=1, server_addr="127.0.0.1", server_port=2, headers=Headers(client),
    )

    def sent() -> Any:
        try:
            return auth.build_headers(inbound)
        except HeaderError as e:
            return str(e)

    plain = auth._plain
    fast = sent()
    auth._plain = None  # the general path, through the precedence table
    assert sent() == fast
    # The shortcut is taken exactly when no field can shadow another.
    keys = [name.lower() for name in request_headers]
    assert (plain is not None) == (len(set(keys)) == len(keys) and not {"host", "user-agent"} & set(keys))
