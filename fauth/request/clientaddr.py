# -*- test-case-name: tests.request.test_clientaddr,tests.request.test_trusted_proxies_e2e -*-
"""
The client's address behind trusted proxies (top-level C{trusted_proxies}):
from a peer in those networks only, the forwarded chain (C{X-Forwarded-For},
or C{Forwarded}'s C{for=} with C{real_ip_header: Forwarded}) is walked from
the right, each hop trusted moving one step left, stopping at the first hop
that is not trusted (Caddy's C{trusted_proxies_strict}, Traefik's
C{forwardedHeaders.trustedIPs}, nginx's C{real_ip_recursive on}).  A hop
that is not an address (C{unknown}, an obfuscated name, garbage) stops the
walk too: the last address known good is the client.
"""
from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import List, Optional, Sequence, Tuple, Union

import attr
from twisted.web.http_headers import Headers

from fauth.config.models import TrustedProxies

__all__ = ["ClientAddress", "ForwardedChain", "forwarded_for"]

_Address = Union[IPv4Address, IPv6Address]

# An X-Forwarded-For hop: an address, an IPv4 address with a port, or a
# bracketed IPv6 address with an optional port (what proxies write).
_HOP = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::([0-9]{1,5}))?\Z|([0-9.]+):([0-9]{1,5})\Z|([0-9A-Fa-f:.]+)\Z")
# RFC 7239 forwarded-pair (token "=" token / quoted-string), then its separator.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PAIR = re.compile(r"[ \t]*(%s)=(%s|\"(?:[^\"\\]|\\.)*\")[ \t]*([;,]|\Z)" % (_TOKEN, _TOKEN))


@attr.s(slots=True, frozen=True, auto_attribs=True)
class ClientAddress:
    """
    Where a request came from, behind trusted proxies.

    @ivar host: the client's address: the first untrusted hop of the chain,
        or the peer itself.
    @ivar port: the client's port when its hop gave one, else C{0} (the
        peer's own when the peer is the client).
    @ivar peer_trusted: the peer is a trusted proxy, so its forwarded chain
        was read (and goes on to the upstream, the peer appended).
    """

    host: str
    port: int
    peer_trusted: bool


def _parse_hop(text: str) -> Optional[Tuple[_Address, int]]:
    match = _HOP.match(text)
    if match is None:
        return None
    v6, v6_port, v4, v4_port, bare = match.groups()
    try:
        address = ip_address(v6 or v4 or bare)
    except ValueError:
        return None
    port = int(v6_port or v4_port or 0)
    if port > 65535 or (v6 is not None and address.version != 6):
        return None
    return address, port


def forwarded_for(values: Sequence[bytes]) -> List[Optional[str]]:
    """
    The C{for=} node of each element of C{Forwarded} header values, in
    order; C{None} for an element without one.  A header that does not
    parse (RFC 7239 section 4) is one C{None}: nothing of it can be trusted.
    """
    nodes: List[Optional[str]] = []
    for raw in values:
        text = raw.decode("latin-1")
        position, node = 0, None
        while position < len(text):
            match = _PAIR.match(text, position)
            if match is None:
                return nodes + [None]
            name, value, separator = match.groups()
            if name.lower() == "for":
                if node is not None:
                    return nodes + [None]  # two for= in one element
                node = value[1:-1].replace("\\", "") if value.startswith('"') else value
            position = match.end()
            if separator != ";":
                nodes.append(node)
                node = None
    return nodes


class ForwardedChain:
    """
    The client address of each request, compiled once per configuration.

    @param conf: the trusted networks and the header that carries the chain.
    """

    def __init__(self, conf: TrustedProxies) -> None:
        self.conf = conf
        self._networks = conf.networks
        self._forwarded = conf.header.lower() == "forwarded"
        self._header = conf.header.lower().encode("ascii")

    def trusts(self, address: _Address) -> bool:
        """Whether C{address} is in one of the trusted networks."""
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            # A dual-stack socket's view of an IPv4 peer.
            address = address.ipv4_mapped
        for network in self._networks:
            if address in network:
                return True
        return False

    def resolve(self, peer_host: str, peer_port: int, headers: Headers) -> ClientAddress:
        """The client of a request from C{peer_host}, with C{headers}."""
        try:
            peer = ip_address(peer_host)
        except ValueError:  # a UNIX socket: no network holds it
            return ClientAddress(peer_host, peer_port, False)
        if not self.trusts(peer):
            return ClientAddress(peer_host, peer_port, False)
        values = headers.getRawHeaders(self._header)
        if not values:
            return ClientAddress(peer_host, peer_port, True)
        if self._forwarded:
            hops = forwarded_for(values)
        else:
            hops = [hop.strip() for value in values for hop in value.decode("latin-1").split(",")]
        host, port = peer_host, peer_port
        for hop in reversed(hops):
            parsed = _parse_hop(hop) if hop is not None else None
            if parsed is None:
                break  # not an address: the last good one stands
            address, port = parsed
            host = str(address)
            if not self.trusts(address):
                break
        return ClientAddress(host, port, True)
