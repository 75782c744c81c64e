# -*- test-case-name: tests.edge.test_hostile_clients -*-
"""
What the gateway knows about one client request, computed once: the raw
target, the normalised path routes match on, the host, the peer.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, NamedTuple, Optional, Tuple
from urllib.parse import unquote_to_bytes

import attr
from twisted.web.http_headers import Headers

from fauth.request.clientaddr import ClientAddress, ForwardedChain

__all__ = [
    "AMBIGUOUS",
    "BadRequest",
    "InboundRequest",
    "NormalPath",
    "check_encoded",
    "normalise",
    "normalise_path",
]


class BadRequest(ValueError):
    """A request target no route may be matched against."""


# Overlong UTF-8 forms (C0/C1 leads, E0 80-9F, F0 80-8F): no valid text has
# them, and a lax decoder upstream reads %c0%ae as "." and %c0%af as "/".
_OVERLONG = re.compile(rb"[\xc0\xc1]|\xe0[\x80-\x9f]|\xf0[\x80-\x8f]")
# Host: reg-name or IPv4 (RFC 3986 unreserved and sub-delims; no
# pct-encoding, which no client uses and an upstream could decode) or an IP
# literal, then an optional port.
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=]*)(:[0-9]*)?\Z")
# A path is visible ASCII (RFC 9112 3.2; an HTTP/2 :path is checked here too).
_VISIBLE = re.compile(rb"/[\x21-\x7e]*\Z")
# A path that needs no work, found in one pass (the common case): visible
# ASCII but %, ;, backslash and # in segments starting with neither "." nor
# "/" (no dot segment, no empty one but the last).  Also cheaper in CPython 3.11
# than `b";" in raw`, which raises and clears a TypeError each time.
_PLAIN = re.compile(rb"(?:/(?![./])[\x21\x22\x24\x26-\x2e\x30-\x3a\x3c-\x5b\x5d-\x7e]*)+\Z")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# RFC 3986 2.3: their encodings are the characters themselves.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")

#: Encodings that are not the character (RFC 3986 2.2) and that some server
#: behind the gateway would read as a separator, a terminator or an escape:
#: C{/}, C{\\}, NUL, C{;}, C{%}, C{?}, C{#} (Traefik's C{encodedCharacters}
#: list).  Never decoded: kept as they are, or the request refused, as
#: C{encoded_characters} says (L{fauth.config.HttpLimits}).
AMBIGUOUS = frozenset(b"/\\\x00;%?#")
# Split a decoded segment where some reader could split it, and look for a
# dot segment among the pieces: "..%2F" is refused whatever the policy.
_DECODED_SEPARATORS = re.compile(rb"[/\\;\x00?#]")


class NormalPath(NamedTuple):
    """
    A request path normalised as RFC 3986 6.2.2 allows (L{normalise}).

    @ivar route: what routes match: every encoding decoded but the
        L{AMBIGUOUS} ones, which stay C{%XX} (upper case), so a literal
        C{%} in it always starts a kept encoding.
    @ivar target: the path sent to the auth service and the upstream:
        unreserved characters decoded, other encodings upper-cased, dot
        segments removed (and repeated slashes merged, if asked).
    @ivar encoded: it holds an L{AMBIGUOUS} encoding.
    @ivar codec: how C{route}'s decoded bytes were read: C{utf-8}, or
        C{latin-1} (byte for byte) when they are not UTF-8.
    """

    route: str
    target: bytes
    encoded: bool
    codec: str = "utf-8"


def normalise(raw: bytes, merge_slashes: bool = True) -> NormalPath:
    """
    Normalise the path C{raw} (the request target before C{?}) as far as
    RFC 3986 says the result is equivalent: percent-encoded unreserved
    characters decoded, hex digits upper-cased, C{.} and C{..} segments
    removed (their encoded forms too); with C{merge_slashes}, empty
    segments dropped (C{//} read as C{/}, as nginx and Traefik do).
    Encodings of reserved characters are not decoded (C{%2F} is not C{/}).

    @raise BadRequest: bytes outside visible ASCII; a malformed C{%};
        NUL (raw), a backslash (raw), a raw C{;} (path parameters: Java
        servers read C{/private;x/secret} as C{/private/secret}, nginx and
        APISIX as a segment C{private;x}) or C{#}; overlong UTF-8; a path
        that climbs above the root; a dot segment hidden behind an
        ambiguous encoding (C{..%2F}, C{..%3B}, C{.%00}), whatever the
        policy: decoded by a lax reader it climbs.
    """
    if _PLAIN.match(raw) is not None:
        return NormalPath(raw.decode("ascii"), raw, False)
    if _VISIBLE.match(raw) is None:
        raise BadRequest("request target must start with / and be visible ASCII")
    if b";" in raw:
        raise BadRequest("path parameters (;) in path")
    if b"\\" in raw:
        raise BadRequest("backslash in path")
    if b"#" in raw:
        raise BadRequest("fragment (#) in request target")
    parts = raw.split(b"/")[1:]
    last = len(parts) - 1
    routes: List[bytes] = []
    targets: List[bytes] = []
    encoded = False
    for i, part in enumerate(parts):
        route, target, ambiguous = _segment(part) if b"%" in part else (part, part, False)
        if target in (b".", b".."):
            if target == b"..":
                if not targets:
                    raise BadRequest("path climbs above the root")
                routes.pop()
                targets.pop()
            if i == last:
                routes.append(b"")
                targets.append(b"")
            continue
        if not target and merge_slashes and i != last:
            continue
        if ambiguous:
            encoded = True
            _refuse_hidden_dots(target)
        routes.append(route)
        targets.append(target)
    route_path = b"/" + b"/".join(routes)
    codec = "utf-8"
    try:
        text = route_path.decode(codec)
    except UnicodeDecodeError:
        if _OVERLONG.search(route_path):
            raise BadRequest("overlong UTF-8 in path")
        # Not UTF-8: read byte for byte, so that it cannot match a UTF-8 route.
        codec = "latin-1"
        text = route_path.decode(codec)
    return NormalPath(text, b"/" + b"/".join(targets), encoded, codec)


def _segment(part: bytes) -> Tuple[bytes, bytes, bool]:
    """One segment with encodings: (route form, target form, holds an ambiguous encoding)."""
    pieces = part.split(b"%")
    route = [pieces[0]]
    target = [pieces[0]]
    ambiguous = False
    for piece in pieces[1:]:
        if len(piece) < 2 or piece[0] not in _HEX or piece[1] not in _HEX:
            raise BadRequest("malformed percent-encoding in path")
        byte = int(piece[:2], 16)
        rest = piece[2:]
        if byte in _UNRESERVED:
            char = bytes((byte,))
            route.append(char + rest)
            target.append(char + rest)
            continue
        escape = b"%%%02X" % byte
        target.append(escape + rest)
        if byte in AMBIGUOUS:
            ambiguous = True
            route.append(escape + rest)
        else:
            route.append(bytes((byte,)) + rest)
    return b"".join(route), b"".join(target), ambiguous


def _refuse_hidden_dots(target: bytes) -> None:
    """A segment that a reader decoding it (once, or again for C{%25}) would split into a dot segment: 400."""
    decoded = target
    for _ in range(3):
        decoded = unquote_to_bytes(decoded)
        if any(piece in (b".", b"..") for piece in _DECODED_SEPARATORS.split(decoded)):
            raise BadRequest("dot segment behind an encoded separator in path")
        if b"%" not in decoded:
            return


def normalise_path(raw: bytes, merge_slashes: bool = True, encoded_characters: str = "reject") -> str:
    """
    The path routes match for C{raw} (L{normalise}), with the
    C{encoded_characters} policy applied: C{reject} refuses any
    L{AMBIGUOUS} encoding, C{keep} leaves it encoded.

    @raise BadRequest: as L{normalise}, and for a rejected encoding.
    """
    path = normalise(raw, merge_slashes)
    check_encoded(path.encoded, encoded_characters)
    return path.route


def check_encoded(encoded: bool, policy: str) -> None:
    """
    @param encoded: the path holds an L{AMBIGUOUS} encoding
        (L{NormalPath.encoded}, L{InboundRequest.encoded}).
    @raise BadRequest: it does, and C{policy} is C{reject}.
    """
    if encoded and policy == "reject":
        raise BadRequest("encoded %2F, %5C, %00, %3B, %25, %3F or %23 in path")


def _split_host(value: str) -> str:
    """
    Lower-case a Host value and drop its port (IPv6 literals keep brackets)
    and a trailing dot, as nginx's C{$host}: C{Secure.Example.:80} must
    match the routes of C{secure.example}, never fall to a host-less one.
    """
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end != -1 else value
    host = value.partition(":")[0]
    if host.endswith(".."):
        # One trailing dot is the root of the DNS (nginx drops it); more is
        # no name at all, and no route should be guessed for it.
        raise BadRequest("invalid Host")
    return host[:-1] if host.endswith(".") else host


#: Host values seen already (valid ones), and their L{_split_host}: clients
#: send the same Host on every request.  Bounded as Twisted bounds its cache
#: of header names: made-up names fill it once, then cost what they did.
_known_hosts: Dict[bytes, str] = {}
_MAX_KNOWN_HOSTS = 1000


@attr.s(slots=True, auto_attribs=True)
class InboundRequest:
    """
    One client request as fauth sees it.

    @ivar request_uri: the target exactly as the client sent it.
    @ivar path: normalised (L{NormalPath.route}); what routes match.
    @ivar query: the raw query string, without C{?}.
    @ivar host: C{$host}: lower-cased, no port.
    @ivar remote_addr: the client's address: the peer's, or, behind
        C{trusted_proxies}, the one its forwarded chain names.
    @ivar proxied: how L{remote_addr} was found when C{trusted_proxies} is
        set (the upstream's C{X-Forwarded-For} depends on it); else C{None}.
    """

    method: str
    request_uri: str
    path: str
    query: str
    host: str
    scheme: str
    remote_addr: str
    remote_port: int
    server_addr: str
    server_port: int
    headers: Headers
    content: Any = None
    _body: Optional[bytes] = None
    _target: Optional[bytes] = None
    #: The path holds an L{AMBIGUOUS} encoding, kept (L{check_encoded}).
    encoded: bool = False
    #: How C{path}'s decoded bytes were read (L{NormalPath.codec}).
    path_codec: str = "utf-8"
    proxied: Optional[ClientAddress] = None

    @classmethod
    def from_twisted(
        cls, request: Any, merge_slashes: bool = True, proxies: Optional[ForwardedChain] = None
    ) -> "InboundRequest":
        """
        Build from a L{twisted.web.server.Request}, the path normalised
        (L{normalise}); L{check_encoded} is for the caller, once it knows
        the policy (the route's, or the C{http} section's).

        @param proxies: the C{trusted_proxies} whose forwarded chain names
            the client; C{None}: the peer is the client.

        @raise BadRequest: when the target cannot be matched safely.
        """
        uri: bytes = request.uri
        hosts = request.requestHeaders.getRawHeaders(b"host")
        known: Optional[str] = None
        if hosts is None:
            if request.clientproto == b"HTTP/1.1":
                raise BadRequest("HTTP/1.1 request without Host")
        elif len(hosts) > 1:
            raise BadRequest("more than one Host")
        else:
            known = _known_hosts.get(hosts[0])
            if known is None and not _HOST.match(hosts[0]):
                raise BadRequest("invalid Host")
        if uri[:1] != b"/":
            # Absolute form: the authority wins over Host (RFC 9112 3.2.2).
            if uri[:7].lower() == b"http://" or uri[:8].lower() == b"https://":
                rest = uri.split(b"://", 1)[1]
                cut = min([i for i in (rest.find(b"/"), rest.find(b"?"), rest.find(b"#")) if i != -1] or [len(rest)])
                authority, tail = rest[:cut], rest[cut:]
                if not authority or not _HOST.match(authority):
                    raise BadRequest("invalid authority in request target")
                uri = tail if tail[:1] == b"/" else b"/" + tail
                host_value: Optional[bytes] = authority
                # Everything after this (routes, auth, upstream Host with
                # pass_host "pass") sees the authority, never a Host header
                # that disagrees with it.
                request.requestHeaders.setRawHeaders(b"host", [authority])
                known = None
                from_header = False
            else:
                raise BadRequest("unsupported request target")
        else:
            host_value = hosts[0] if hosts else None
            from_header = True
        raw_path, _, query = uri.partition(b"?")
        normal = normalise(raw_path, merge_slashes)
        client = request.getClientAddress()
        server = request.getHost()
        if known is not None:
            host = known
        elif host_value:
            host = _split_host(host_value.decode("latin-1"))
            if from_header and len(_known_hosts) < _MAX_KNOWN_HOSTS:
                _known_hosts[host_value] = host
        else:
            host = getattr(server, "host", "") or "localhost"
        remote_addr = getattr(client, "host", None) or "unix:"
        remote_port = getattr(client, "port", 0) or 0
        proxied = None
        if proxies is not None:
            proxied = proxies.resolve(remote_addr, remote_port, request.requestHeaders)
            remote_addr, remote_port = proxied.host, proxied.port
        return cls(
            method=request.method.decode("ascii", "replace"),
            request_uri=uri.decode("latin-1"),
            path=normal.route,
            query=query.decode("latin-1"),
            host=host,
            scheme="https" if request.isSecure() else "http",
            remote_addr=remote_addr,
            remote_port=remote_port,
            server_addr=getattr(server, "host", "") or "",
            server_port=getattr(server, "port", 0) or 0,
            headers=request.requestHeaders,
            content=request.content,
            target=normal.target + b"?" + query if query else normal.target,
            encoded=normal.encoded,
            path_codec=normal.codec,
            proxied=proxied,
        )

    @property
    def upstream_target(self) -> bytes:
        """
        The target sent upstream and, as C{X-Forwarded-Uri}, to the auth
        service: the normalised path (L{NormalPath.target}) and the query as
        sent, so that the auth service judges the path the routes matched
        and the upstream serves exactly that one
        (C{/public/%2e%2e/private/secret} is C{/private/secret} for all
        three).  Built by hand without one: L{request_uri} as it is.
        """
        if self._target is None:
            self._target = self.request_uri.encode("latin-1")
        return self._target

    def body(self) -> bytes:
        """The whole buffered body (read once; the file stays readable)."""
        if self._body is None:
            content = self.content
            if content is None:
                self._body = b""
            else:
                content.seek(0)
                self._body = content.read()
                content.seek(0)
        return self._body

    def body_length(self) -> int:
        """Length of the buffered body without reading it."""
        content = self.content
        if content is None:
            return 0
        if self._body is not None:
            return len(self._body)
        position = content.tell()
        content.seek(0, 2)
        size = content.tell()
        content.seek(position)
        return size
