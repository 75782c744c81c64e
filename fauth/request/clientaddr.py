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
from socket import AF_INET, AF_INET6, inet_ntop, inet_pton
from typing import Dict, List, Optional, Sequence, Tuple

import attr
from twisted.web.http_headers import Headers

from fauth.config.models import TrustedProxies

__all__ = ["ClientAddress", "ForwardedChain", "forwarded_for"]

# An X-Forwarded-For hop: a bracketed IPv6 address with an optional port,
# an IPv4 address with a port, or an address (what proxies write).
_HOP = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::([0-9]{1,5}))?\Z|([0-9.]+):([0-9]{1,5})\Z|([0-9A-Fa-f:.]+)\Z")
# RFC 7239 forwarded-pair (token "=" token / quoted-string), then its separator.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PAIR = re.compile(r"[ \t]*(%s)=(%s|\"(?:[^\"\\]|\\.)*\")[ \t]*([;,]|\Z)" % (_TOKEN, _TOKEN))
_MAPPED = b"\0" * 10 + b"\xff\xff"
# Peers whose trust is remembered; past this many the memory starts over.
_PEERS_KEPT = 4096

#: An address as the trust check reads it: C{(4 or 6, its integer value)},
#: an IPv4 address seen as C{::ffff:a.b.c.d} by a dual-stack socket as IPv4.
_Address = Tuple[int, int]


def _address(text: str) -> Optional[_Address]:
    # inet_pton, not ipaddress: the same strict literals (no leading zeros,
    # no short forms, no scope), for a tenth of the time.
    try:
        return 4, int.from_bytes(inet_pton(AF_INET, text), "big")
    except (OSError, ValueError):
        pass
    try:
        packed = inet_pton(AF_INET6, text)
    except (OSError, ValueError):
        return None
    if packed[:12] == _MAPPED:
        return 4, int.from_bytes(packed[12:], "big")
    return 6, int.from_bytes(packed, "big")


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


def _parse_hop(text: str) -> Optional[Tuple[str, int, _Address]]:
    """A hop's address as written canonically, its port (C{0}: none), and its value."""
    if ":" not in text and "[" not in text:
        # An IPv4 address, what nearly every hop is: no pattern needed.
        found = _address(text)
        return None if found is None else (text, 0, found)
    match = _HOP.match(text)
    if match is None:
        return None
    v6, v6_port, v4, v4_port, bare = match.groups()
    literal = v6 or v4 or bare
    address = _address(literal)
    port = int(v6_port or v4_port or 0)
    if address is None or port > 65535 or (v4 is not None and ":" in literal):
        return None
    if v6 is not None and ":" not in literal:
        return None  # [192.0.2.1]: brackets are for IPv6
    host = inet_ntop(AF_INET6, inet_pton(AF_INET6, literal)) if ":" in literal else literal
    return host, port, address


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
        networks: Dict[int, List[Tuple[int, int]]] = {4: [], 6: []}
        for network in conf.networks:
            networks[network.version].append((int(network.network_address), int(network.netmask)))
        self._networks = networks
        self._forwarded = conf.header.lower() == "forwarded"
        self._header = conf.header.lower().encode("ascii")
        self._peers: Dict[str, bool] = {}

    def trusts(self, address: _Address) -> bool:
        """Whether C{address} (see L{_address}) is in one of the trusted networks."""
        family, value = address
        for network, mask in self._networks[family]:
            if value & mask == network:
                return True
        return False

    def _trusts_peer(self, peer_host: str) -> bool:
        trusted = self._peers.get(peer_host)
        if trusted is None:
            address = _address(peer_host)  # None: a UNIX socket, which no network holds
            trusted = address is not None and self.trusts(address)
            if len(self._peers) >= _PEERS_KEPT:
                self._peers.clear()
            self._peers[peer_host] = trusted
        return trusted

    def resolve(self, peer_host: str, peer_port: int, headers: Headers) -> ClientAddress:
        """The client of a request from C{peer_host}, with C{headers}."""
        if not self._trusts_peer(peer_host):
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
            host, port, address = parsed
            if not self.trusts(address):
                break
        return ClientAddress(host, port, True)
