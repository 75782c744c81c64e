"""
A scriptable raw HTTP/1.1 server on loopback, for the auth services and
upstreams of tests that must see connections open and close, the exact
header lines, and answer in ways a well-behaved web server never would
(stall, garbage, silent close).
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import attr
from twisted.internet import error as net_error
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol

__all__ = ["Handler", "RawConnection", "RawServer", "Seen"]


@attr.s(auto_attribs=True)
class Seen:
    """One request as the server received it."""

    conn: int
    method: bytes
    target: bytes
    headers: List[Tuple[bytes, bytes]]
    body: bytes

    def names(self) -> List[bytes]:
        return [name.lower() for name, _ in self.headers]

    def values(self, name: bytes) -> List[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


class RawConnection(Protocol):
    """Parses requests (Content-Length framing only) and hands each to the server's next handler."""

    def __init__(self, server: "RawServer", index: int) -> None:
        self.server = server
        self.index = index
        self.buffer = b""
        self.lost = False
        self.lost_at: Optional[float] = None
        self.clean_close: Optional[bool] = None
        self.closed_by_us = False
        self.faulted = False
        #: Stopped when the connection is lost (a producer writing to it).
        self.flood: Any = None

    def connectionMade(self) -> None:
        self.server.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while not self.lost and not self.closed_by_us:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            lines = head.split(b"\r\n")
            method, target, _ = lines[0].split(b" ", 2)
            headers = []
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers.append((name, value.strip()))
            length = sum(int(v) for n, v in headers if n.lower() == b"content-length")
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            seen = Seen(self.index, method, target, headers, rest[:length])
            self.server.requests.append(seen)
            handler = self.server.take_handler()
            if handler is not self.server.normal:
                self.faulted = True
            handler(self, seen)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def respond(self, status: int = 200, headers: Any = (), body: bytes = b"") -> None:
        lines = [b"HTTP/1.1 %d X" % status, b"Content-Length: %d" % len(body)]
        lines.extend(b"%s: %s" % (n, v) for n, v in headers)
        self.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)

    def close(self) -> None:
        """Close the connection, reading nothing more."""
        self.closed_by_us = True
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        self.lost_at = self.server.reactor.seconds()
        self.clean_close = bool(reason is not None and reason.check(net_error.ConnectionDone))
        if self.flood is not None:
            self.flood.stopProducing()


Handler = Callable[[RawConnection, Seen], None]


class RawServer:
    """
    A loopback server answering with C{normal}, except for requests that
    find a handler queued by L{arm} (each used once).  Every connection is
    kept in C{connections}, so tests see which ones are still open.
    """

    def __init__(self, reactor: Any, normal: Handler) -> None:
        self.reactor = reactor
        self.normal = normal
        self.connections: List[RawConnection] = []
        self.requests: List[Seen] = []
        self._queued: List[Handler] = []
        self.port: Any = None
        self.port_number = 0
        self.scheme = "http"
        self.factory = Factory()
        self.factory.noisy = False
        self.factory.buildProtocol = self._build  # type: ignore[assignment]

    def _build(self, addr: Any) -> RawConnection:
        return RawConnection(self, len(self.connections) + 1)

    def arm(self, handler: Handler) -> None:
        """The next request (not yet answered by an armed handler) gets C{handler}."""
        self._queued.append(handler)

    def take_handler(self) -> Handler:
        return self._queued.pop(0) if self._queued else self.normal

    async def listen(self, tls: Optional[Tuple[str, str]] = None) -> None:
        """Listen on 127.0.0.1 (the same port again after L{stop_listening}); with C{(key, cert)}, TLS."""
        if tls is None:
            endpoint: Any = TCP4ServerEndpoint(self.reactor, self.port_number, interface="127.0.0.1")
        else:
            endpoint = serverFromString(
                self.reactor, "ssl:%d:interface=127.0.0.1:privateKey=%s:certKey=%s" % ((self.port_number,) + tls)
            )
            self.scheme = "https"
        self.port = await endpoint.listen(self.factory)
        self.port_number = self.port.getHost().port

    async def stop_listening(self) -> None:
        if self.port is not None:
            port, self.port = self.port, None
            await port.stopListening()

    @property
    def open_connections(self) -> List[RawConnection]:
        return [c for c in self.connections if not c.lost]

    @property
    def netloc(self) -> str:
        return "127.0.0.1:%d" % self.port_number

    def url(self, path: str = "/auth") -> str:
        return "%s://%s%s" % (self.scheme, self.netloc, path)

    async def close(self) -> None:
        """Abort every open connection and stop listening."""
        for conn in self.open_connections:
            conn.transport.abortConnection()
        await self.stop_listening()
