# -*- test-case-name: tests.edge.test_hostile_clients -*-
"""
What the gateway knows about one client request, computed once: the raw
target, the normalised path routes match on, the host, the peer.
"""
from __future__ import annotations

import re
from typing import Any, List, Optional, Tuple
from urllib.parse import quote, unquote_to_bytes

import attr
from twisted.web.http_headers import Headers

from fauth.request.clientaddr import ClientAddress, ForwardedChain

__all__ = ["BadRequest", "InboundRequest", "normalise_path"]


class BadRequest(ValueError):
    """A request target no route may be matched against."""


# Overlong UTF-8 forms (C0/C1 leads, E0 80-9F, F0 80-8F): no valid text has
# them, and a lax decoder upstream reads %c0%ae as "." and %c0%af as "/".
_OVERLONG = re.compile(rb"[\xc0\xc1]|\xe0[\x80-\x9f]|\xf0[\x80-\x8f]")
# Host: reg-name or IPv4 (RFC 3986 unreserved and sub-delims; no
# pct-encoding, which no client uses and an upstream could decode) or an IP
# literal, then an optional port.
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=]*)(:[0-9]*)?\Z")


def normalise_path(raw: bytes) -> str:
    """
    Percent-decode the path and resolve C{.} and C{..} segments and repeated
    slashes, as nginx's C{$uri} does, so that C{/public/%2e%2e/private}
    matches the route of C{/private}, never the one of C{/public/*}.

    @raise BadRequest: for NUL bytes, backslashes (raw or encoded: some
        upstreams read them as C{/}), overlong UTF-8, a C{;} (path
        parameters: Java servers read C{/private;x/secret} as
        C{/private/secret}, nginx and APISIX as a segment C{private;x}, so
        no one route can stand for both readings), or a path that climbs
        above the root.  An encoded C{%3B} is an ordinary character of its
        segment, and goes on encoded.
    """
    return _normalise(raw)[0]


def _normalise(raw: bytes) -> Tuple[str, str]:
    """
    L{normalise_path}, and the codec the decoded bytes were read with:
    C{"utf-8"}, or C{"latin-1"} when they were not UTF-8 (so that the path
    can be turned back into the very same bytes).
    """
    if b";" in raw:
        raise BadRequest("path parameters (;) in path")
    if b"%" not in raw and b"/." not in raw and b"//" not in raw and b"\\" not in raw:
        if not raw.startswith(b"/"):
            raise BadRequest("request target must start with /")
        try:
            return raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            if _OVERLONG.search(raw):
                raise BadRequest("overlong UTF-8 in path")
            return raw.decode("latin-1"), "latin-1"
    decoded = unquote_to_bytes(raw)
    if b"\x00" in decoded:
        raise BadRequest("NUL byte in path")
    if b"\\" in decoded:
        raise BadRequest("backslash in path")
    if not decoded.startswith(b"/"):
        raise BadRequest("request target must start with /")
    codec = "utf-8"
    try:
        text = decoded.decode(codec)
    except UnicodeDecodeError:
        if _OVERLONG.search(decoded):
            raise BadRequest("overlong UTF-8 in path")
        codec = "latin-1"
        text = decoded.decode(codec)
    segments: List[str] = []
    for segment in text.split("/")[1:]:
        if ";" in segment and segment.partition(";")[0] in (".", ".."):
            # From %3B: an upstream that decodes before it strips
            # parameters would read "..%3b" as "..".
            raise BadRequest("dot segment with parameters in path")
        if segment == "..":
            if not segments:
                raise BadRequest("path climbs above the root")
            segments.pop()
        elif segment not in (".", ""):
            segments.append(segment)
    trailing = text.endswith(("/", "/.", "/..")) and bool(segments)
    return "/" + "/".join(segments) + ("/" if trailing else ""), codec


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


@attr.s(slots=True, auto_attribs=True)
class InboundRequest:
    """
    One client request as fauth sees it.

    @ivar request_uri: the target exactly as the client sent it.
    @ivar path: decoded, normalised; what routes match.
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
    #: The codec L{path} was decoded with (L{_normalise}); encoding it back
    #: with the same one gives the bytes that were authorised.
    path_codec: str = "utf-8"
    proxied: Optional[ClientAddress] = None

    @classmethod
    def from_twisted(cls, request: Any, proxies: Optional[ForwardedChain] = None) -> "InboundRequest":
        """
        Build from a L{twisted.web.server.Request}.

        @param proxies: the C{trusted_proxies} whose forwarded chain names
            the client; C{None}: the peer is the client.

        @raise BadRequest: when the target cannot be matched safely.
        """
        uri: bytes = request.uri
        hosts = request.requestHeaders.getRawHeaders(b"host")
        if hosts is None:
            if request.clientproto == b"HTTP/1.1":
                raise BadRequest("HTTP/1.1 request without Host")
        elif len(hosts) > 1:
            raise BadRequest("more than one Host")
        elif not _HOST.match(hosts[0]):
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
            else:
                raise BadRequest("unsupported request target")
        else:
            host_value = hosts[0] if hosts else None
        raw_path, _, query = uri.partition(b"?")
        path, path_codec = _normalise(raw_path)
        client = request.getClientAddress()
        server = request.getHost()
        if host_value:
            host = _split_host(host_value.decode("latin-1"))
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
            path=path,
            query=query.decode("latin-1"),
            host=host,
            scheme="https" if request.isSecure() else "http",
            remote_addr=remote_addr,
            remote_port=remote_port,
            server_addr=getattr(server, "host", "") or "",
            server_port=getattr(server, "port", 0) or 0,
            headers=request.requestHeaders,
            content=request.content,
            path_codec=path_codec,
            proxied=proxied,
        )

    @property
    def upstream_target(self) -> bytes:
        """
        The target sent upstream and, as C{X-Forwarded-Uri}, to the auth
        service: the client's own bytes when they were already normal, else
        the normalised path re-encoded, so that the auth service judges the
        path the routes matched and the upstream serves exactly that one
        (C{/public/..%2fprivate/secret} is C{/private/secret} for all three).
        """
        if self._target is None:
            self._target = self._make_target()
        return self._target

    def _make_target(self) -> bytes:
        raw_path = self.request_uri.partition("?")[0]
        if raw_path == self.path:
            target = raw_path
        else:
            # quote() would encode a str as UTF-8: a path read as latin-1
            # (not UTF-8) must go back as its own bytes (%FF, not %C3%BF).
            target = quote(self.path.encode(self.path_codec), safe="/:@!$&'()*+,=-._~")
        if self.query:
            target += "?" + self.query
        return target.encode("latin-1")

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
