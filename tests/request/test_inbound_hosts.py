"""InboundRequest.from_twisted's Host: the same value read the same way every time, the cache of seen values bounded."""
from __future__ import annotations

from typing import Any, Dict, List

import pytest
from twisted.internet.address import IPv4Address
from twisted.web.http_headers import Headers

from fauth.request import inbound as inbound_module
from fauth.request.inbound import BadRequest, InboundRequest


class _Request:
    method = b"GET"
    clientproto = b"HTTP/1.1"
    content = None

    def __init__(self, host: bytes, uri: bytes = b"/x") -> None:
        self.uri = uri
        self.requestHeaders = Headers({b"host": [host]})

    def getClientAddress(self) -> Any:
        return IPv4Address("TCP", "127.0.0.1", 40000)

    def getHost(self) -> Any:
        return IPv4Address("TCP", "127.0.0.1", 8080)

    def isSecure(self) -> bool:
        return False


@pytest.mark.parametrize(
    "value, host",
    [(b"Secure.Example.:80", "secure.example"), (b"[::1]:8080", "[::1]"), (b"plain", "plain")],
)
def test_a_host_read_again_is_read_the_same(value: bytes, host: str) -> None:
    first = InboundRequest.from_twisted(_Request(value))
    again = InboundRequest.from_twisted(_Request(value))
    assert first.host == again.host == host


@pytest.mark.parametrize("value", [b"secure.example..", b"bad host", b"a\x00b"])
def test_an_invalid_host_is_refused_every_time(value: bytes) -> None:
    for _ in range(2):
        with pytest.raises(BadRequest, match="invalid Host"):
            InboundRequest.from_twisted(_Request(value))


def test_an_authority_wins_over_a_host_seen_before() -> None:
    InboundRequest.from_twisted(_Request(b"seen.example"))
    request = _Request(b"seen.example", uri=b"http://Other.Example:81/x")
    assert InboundRequest.from_twisted(request).host == "other.example"
    assert request.requestHeaders.getRawHeaders(b"host") == [b"Other.Example:81"]


def test_the_seen_hosts_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    known: Dict[bytes, str] = {}
    monkeypatch.setattr(inbound_module, "_known_hosts", known)
    monkeypatch.setattr(inbound_module, "_MAX_KNOWN_HOSTS", 3)
    hosts: List[str] = []
    for n in range(6):
        hosts.append(InboundRequest.from_twisted(_Request(b"H%d.example" % n)).host)
    assert hosts == ["h%d.example" % n for n in range(6)]
    assert list(known) == [b"H0.example", b"H1.example", b"H2.example"]
