# -*- test-case-name: tests.test_inbound -*-
"""
What the gateway knows about one client request, computed once: the raw
target, the normalised path routes match on, the host, the peer.
"""
from __future__ import annotations

from typing import Any, Optional
from urllib.parse import quote, unquote_to_bytes

import attr
from twisted.web.http_headers import Headers

__all__ = ["BadRequest", "InboundRequest", "normalise_path"]


class BadRequest(ValueError):
    """A request target no route may be matched against."""


def normalise_path(raw: bytes) -> str:
    """
    Percent-decode the path and resolve C{.} and C{..} segments and repeated
    slashes, as nginx's C{$uri} does, so that C{/public/%2e%2e/private}
    matches the route of C{/private}, never the one of C{/public/*}.

    @raise BadRequest: for NUL bytes, undecodable text, or a path that climbs
        above the root.
    """
    if b"%" not in raw and b"/." not in raw and b"//" not in raw:
        if not raw.startswith(b"/"):
            raise BadRequest("request target must start with /")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    decoded = unquote_to_bytes(raw)
    if b"\x00" in decoded:
        raise BadRequest("NUL byte in path")
    if not decoded.startswith(b"/"):
        raise BadRequest("request target must start with /")
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        text = decoded.decode("latin-1")
    segments = []
    for segment in text.split("/")[1:]:
        if segment == "..":
            if not segments:
                raise BadRequest("path climbs above the root")
            segments.pop()
        elif segment not in (".", ""):
            segments.append(segment)
    trailing = text.endswith(("/", "/.", "/..")) and bool(segments)
    return "/" + "/".join(segments) + ("/" if trailing else "")


def _split_host(value: str) -> str:
    """Lower-case a Host value and drop its port (IPv6 literals keep brackets)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end != -1 else value
    return value.partition(":")[0]


@attr.s(slots=True, auto_attribs=True)
class InboundRequest:
    """
    One client request as fauth sees it.

    @ivar request_uri: the target exactly as the client sent it.
    @ivar path: decoded, normalised; what routes match.
    @ivar query: the raw query string, without C{?}.
    @ivar host: C{$host}: lower-cased, no port.
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

    @classmethod
    def from_twisted(cls, request: Any) -> "InboundRequest":
        """
        Build from a L{twisted.web.server.Request}.

        @raise BadRequest: when the target cannot be matched safely.
        """
        uri: bytes = request.uri
        if uri[:1] != b"/":
            # Absolute form: the authority wins over Host (RFC 9112 3.2.2).
            if uri[:7].lower() == b"http://" or uri[:8].lower() == b"https://":
                rest = uri.split(b"://", 1)[1]
                authority, slash, tail = rest.partition(b"/")
                uri = slash + tail if slash else b"/"
                host_value: Optional[bytes] = authority
            else:
                raise BadRequest("unsupported request target")
        else:
            host_value = request.requestHeaders.getRawHeaders(b"host", [None])[0]
        raw_path, _, query = uri.partition(b"?")
        path = normalise_path(raw_path)
        client = request.getClientAddress()
        server = request.getHost()
        if host_value:
            host = _split_host(host_value.decode("latin-1"))
        else:
            host = getattr(server, "host", "") or "localhost"
        return cls(
            method=request.method.decode("ascii", "replace"),
            request_uri=uri.decode("latin-1"),
            path=path,
            query=query.decode("latin-1"),
            host=host,
            scheme="https" if request.isSecure() else "http",
            remote_addr=getattr(client, "host", None) or "unix:",
            remote_port=getattr(client, "port", 0) or 0,
            server_addr=getattr(server, "host", "") or "",
            server_port=getattr(server, "port", 0) or 0,
            headers=request.requestHeaders,
            content=request.content,
        )

    @property
    def upstream_target(self) -> bytes:
        """
        The target sent upstream: the client's own bytes when they were
        already normal, else the normalised path re-encoded, so that the
        upstream sees the path that was authorised.
        """
        raw_path = self.request_uri.partition("?")[0]
        if raw_path == self.path:
            target = raw_path
        else:
            target = quote(self.path, safe="/:@!$&'()*+,;=-._~")
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
