"""Header rules and the auth request's handling of names that must not be sent."""
from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor

from fauth.authclient import AuthCallError, AuthTarget
from fauth.demo import DemoAuthResource, EchoResource
from fauth.headers import HeaderError, check_header
from tests.harness import LogCapture, start_gateway
from tests.servers import listen_on_loopback


@pytest.mark.parametrize(
    "name, value",
    [
        (b"X-Foo\n", b"v"),  # a regex anchored with $ would accept this one
        (b"X Foo", b"v"),
        (b"X-Foo:", b"v"),
        ("X-Ümlaut".encode("utf-8"), b"v"),
        (b"X-Foo", b"a\r\nb"),
        (b"X-Foo", b"a\nb"),
        (b"X-Foo", b"a\x00b"),
        (b"X-Foo", b"a\x7fb"),
    ],
)
def test_check_header_refuses(name: bytes, value: bytes) -> None:
    with pytest.raises(HeaderError):
        check_header(name, value)


def test_check_header_accepts_tab_and_token_names() -> None:
    check_header(b"X-Foo_bar.baz~1", b"a\tb c")


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
