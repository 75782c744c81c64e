"""InboundRequest.from_twisted's Host (the same value read the same way every time, the cache of seen values bounded); normalise's fast path."""
from __future__ import annotations

import re
from typing import Any, Dict, List

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.web.http_headers import Headers

from fauth.request import inbound as inbound_module
from fauth.request.inbound import BadRequest, InboundRequest, normalise


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


# The fast path of normalise (fauth.request.inbound._PLAIN) takes exactly the
# paths its checks one by one found needing no work.

_SEGMENTS = st.lists(st.sampled_from(list(b".%;\\#a0~?:@\x7f \x00\xe9")), max_size=4).map(bytes)
# Slash-separated segments (empty ones too), sometimes without the leading slash.
_PATHS = st.builds(
    lambda lead, segments: lead + b"/".join(segments),
    st.sampled_from([b"/", b"/", b"/", b"", b"."]),
    st.lists(_SEGMENTS, min_size=1, max_size=5),
)


def _needs_no_work(raw: bytes) -> bool:
    return (
        re.match(rb"/[\x21-\x7e]*\Z", raw) is not None
        and not any(bad in raw for bad in (b";", b"\\", b"#", b"%", b"/.", b"//"))
    )


@settings(max_examples=400)
@given(_PATHS)
@example(b"/")
@example(b"/a/")
@example(b"/a//b")
@example(b"/.well-known")
@example(b"/a%41")
@example(b"/a;b")
@example(b"/a\\b")
@example(b"/a#b")
@example(b"/a\x7fb")
@example(b"a/b")
def test_the_fast_path_takes_exactly_the_paths_that_need_no_work(raw: bytes) -> None:
    assert (inbound_module._PLAIN.match(raw) is not None) == _needs_no_work(raw)
    if _needs_no_work(raw):
        path = normalise(raw)
        assert (path.route, path.target, path.encoded) == (raw.decode("ascii"), raw, False)
