"""
The client address behind trusted proxies (L{fauth.request.clientaddr}):
the chain walked from the right, stopping at the first untrusted or
malformed hop; C{Forwarded} parsed as RFC 7239 says; the configuration keys
validated with one clear line.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import pytest
from twisted.web.http_headers import Headers

from fauth.config import ConfigError, TrustedProxies, parse_config
from fauth.request.clientaddr import ClientAddress, ForwardedChain, forwarded_for


def chain(trusted: List[str], header: Optional[str] = None) -> ForwardedChain:
    doc: Dict[str, Any] = {"trusted_proxies": trusted}
    if header is not None:
        doc["real_ip_header"] = header
    conf = parse_config(doc).trusted_proxies
    assert isinstance(conf, TrustedProxies)
    return ForwardedChain(conf)


def headers(**fields: List[str]) -> Headers:
    h = Headers()
    for name, values in fields.items():
        h.setRawHeaders(name.replace("_", "-").encode(), [v.encode() for v in values])
    return h


@pytest.mark.parametrize(
    "peer, xff, expected",
    [
        # An untrusted peer is the client, whatever it claims.
        ("192.0.2.1", ["203.0.113.9"], ("192.0.2.1", 4000, False)),
        # A trusted peer without a chain is the client.
        ("10.0.0.1", None, ("10.0.0.1", 4000, True)),
        # One trusted hop: the hop before it.
        ("10.0.0.1", ["203.0.113.9"], ("203.0.113.9", 0, True)),
        # From the right: a spoofed left part is never reached.
        ("10.0.0.1", ["6.6.6.6, 203.0.113.9, 10.0.0.2"], ("203.0.113.9", 0, True)),
        # Several header lines are one list, in order.
        ("10.0.0.1", ["6.6.6.6", "203.0.113.9"], ("203.0.113.9", 0, True)),
        # Every hop trusted: the leftmost.
        ("10.0.0.1", ["10.0.0.3, 10.0.0.2"], ("10.0.0.3", 0, True)),
        # A malformed hop stops the walk: the last good address stands.
        ("10.0.0.1", ["203.0.113.9, bogus"], ("10.0.0.1", 4000, True)),
        ("10.0.0.1", ["203.0.113.9, unknown, 10.0.0.2"], ("10.0.0.2", 0, True)),
        ("10.0.0.1", ["203.0.113.9,,10.0.0.2"], ("10.0.0.2", 0, True)),
        ("10.0.0.1", ["1.2.3.4.5"], ("10.0.0.1", 4000, True)),
        ("10.0.0.1", ["[1.2.3.4]"], ("10.0.0.1", 4000, True)),
        ("10.0.0.1", ["203.0.113.9:99999"], ("10.0.0.1", 4000, True)),
        # Ports as proxies write them; IPv6 canonical.
        ("10.0.0.1", ["203.0.113.9:5555"], ("203.0.113.9", 5555, True)),
        ("10.0.0.1", ["[2001:DB8:0::1]:443"], ("2001:db8::1", 443, True)),
        ("10.0.0.1", ["2001:db8::1"], ("2001:db8::1", 0, True)),
        # IPv6 peers, and an IPv4 peer seen through a dual-stack socket.
        ("::1", ["203.0.113.9"], ("203.0.113.9", 0, True)),
        ("::ffff:10.0.0.1", ["203.0.113.9"], ("203.0.113.9", 0, True)),
        ("fe80::1", ["203.0.113.9"], ("fe80::1", 4000, False)),
        # Not an IP peer (a UNIX socket): never trusted.
        ("unix:", ["203.0.113.9"], ("unix:", 4000, False)),
    ],
)
def test_x_forwarded_for(peer: str, xff: Optional[List[str]], expected: Any) -> None:
    resolver = chain(["10.0.0.0/8", "::1"])
    found = resolver.resolve(peer, 4000, headers(x_forwarded_for=xff) if xff else Headers())
    assert found == ClientAddress(*expected)


@pytest.mark.parametrize(
    "values, expected",
    [
        (["for=192.0.2.60;proto=http;by=203.0.113.43"], ["192.0.2.60"]),
        (['for="_gazonk"'], ["_gazonk"]),
        (['For="[2001:db8:cafe::17]:4711"'], ["[2001:db8:cafe::17]:4711"]),
        (["for=192.0.2.43, for=198.51.100.17"], ["192.0.2.43", "198.51.100.17"]),
        (["for=192.0.2.43", "for=198.51.100.17;proto=https"], ["192.0.2.43", "198.51.100.17"]),
        (["proto=https, for=198.51.100.17"], [None, "198.51.100.17"]),
        (['for="a,b", for=unknown'], ["a,b", "unknown"]),
        # Not RFC 7239: nothing of the header is trusted.
        (["for=192.0.2.43:80"], [None]),
        (["for=1;for=2"], [None]),
        (["garbage"], [None]),
        (["for=192.0.2.43", "x"], ["192.0.2.43", None]),
    ],
)
def test_forwarded_parsing(values: List[str], expected: List[Optional[str]]) -> None:
    assert forwarded_for([v.encode() for v in values]) == expected


@pytest.mark.parametrize(
    "forwarded, expected",
    [
        (['for=203.0.113.9;proto=https, for="[::1]:80"'], ("203.0.113.9", 0, True)),
        (['for="[2001:db8::7]:4711"'], ("2001:db8::7", 4711, True)),
        (["for=6.6.6.6, for=203.0.113.9"], ("203.0.113.9", 0, True)),
        (["for=203.0.113.9, for=unknown"], ("127.0.0.1", 4000, True)),
        (["for=203.0.113.9, proto=http"], ("127.0.0.1", 4000, True)),
        (["for=203.0.113.9:80"], ("127.0.0.1", 4000, True)),
    ],
)
def test_forwarded_chain(forwarded: List[str], expected: Any) -> None:
    resolver = chain(["127.0.0.0/8", "::1"], "forwarded")
    h = headers(forwarded=forwarded, x_forwarded_for=["6.6.6.6"])
    assert resolver.resolve("127.0.0.1", 4000, h) == ClientAddress(*expected)


def test_x_forwarded_for_mode_ignores_forwarded() -> None:
    resolver = chain(["127.0.0.1"])
    h = headers(forwarded=["for=6.6.6.6"])
    assert resolver.resolve("127.0.0.1", 4000, h) == ClientAddress("127.0.0.1", 4000, True)


def test_private_ranges_and_defaults() -> None:
    conf = parse_config({"trusted_proxies": ["private_ranges", "192.0.2.7"]}).trusted_proxies
    assert conf is not None and conf.header == "X-Forwarded-For"
    resolver = ForwardedChain(conf)
    for address in ["10.1.2.3", "172.31.0.1", "192.168.9.9", "127.0.0.2", "fd12::1", "::1", "192.0.2.7"]:
        assert resolver.resolve(address, 1, headers(x_forwarded_for=["8.8.8.8"])).host == "8.8.8.8"
    for address in ["172.32.0.1", "192.0.2.8", "2001:db8::1"]:
        assert resolver.resolve(address, 1, headers(x_forwarded_for=["8.8.8.8"])).host == address
    assert parse_config({}).trusted_proxies is None
    assert parse_config({"trusted_proxies": []}).trusted_proxies is None


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"trusted_proxies": "10.0.0.0/8"}, 'config: property "trusted_proxies" validation failed: wrong type: expected array'),
        ({"trusted_proxies": ["10.0.0.0/33"]}, 'config: trusted_proxies: "10.0.0.0/33" is not an IP address or CIDR network (e.g. 10.0.0.0/8, ::1)'),
        ({"trusted_proxies": ["example.com"]}, 'config: trusted_proxies: "example.com" is not an IP address or CIDR network (e.g. 10.0.0.0/8, ::1)'),
        ({"trusted_proxies": [10]}, 'config: trusted_proxies: "10" is not an IP address or CIDR network (e.g. 10.0.0.0/8, ::1)'),
        ({"trusted_proxies": ["fe80::1%eth0"]}, 'config: trusted_proxies: "fe80::1%eth0" is not an IP address or CIDR network (e.g. 10.0.0.0/8, ::1)'),
        ({"trusted_proxies": ["::1"], "real_ip_header": "X-Real-IP"}, 'config: property "real_ip_header" must be "X-Forwarded-For" or "Forwarded"'),
        ({"real_ip_header": "Forwarded"}, 'config: property "real_ip_header" needs "trusted_proxies" (the peers it is read from)'),
    ],
)
def test_bad_config(doc: Dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    assert str(e.value) == message
