# -*- test-case-name: tests.test_authclient -*-
"""
The HTTP client of the auth leg: requests to one auth target over one
pool of L{fauth.connection.ClientConnection}s.

The URL is encoded once, at config time, and each call writes one
pre-serialised head: the auth service sees exactly the headers the
contract sends.  No cookie jar and no C{Accept-Encoding} are involved (treq
would keep a jar across calls, so a C{Set-Cookie} in one user's auth answer
would go out with the next user's auth request), and the timeout covers the
whole exchange, body included.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import attr
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from fauth.connection import ClientRequest, Reply
from fauth.h1 import request_head
from fauth.pools import ConnectionPool
from fauth.transport import Connector, tls_policy

__all__ = [
    "AuthCallError",
    "AuthClient",
    "AuthTarget",
    "Reply",
]

# A denial's body goes back to the client; beyond this an auth service is
# misbehaving, and the call fails rather than buffering without bound.
MAX_AUTH_BODY = 1024 * 1024

_PATH_OK = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/%?"
)


class AuthCallError(Exception):
    """The auth call failed before or without an HTTP answer; the message is the log's C{err}."""


@attr.frozen
class AuthTarget:
    """Where C{conf.uri} points, parsed once at config time."""

    scheme: str
    host: str
    port: int
    target: bytes
    ssl_verify: bool

    @property
    def host_header(self) -> bytes:
        default = 443 if self.scheme == "https" else 80
        host = "[%s]" % self.host if ":" in self.host else self.host
        if self.port != default:
            host = "%s:%d" % (host, self.port)
        return host.encode("idna")

    @classmethod
    def parse(cls, uri: str, ssl_verify: bool) -> "AuthTarget":
        """@raise AuthCallError: C{bad uri: ...} or invalid path characters."""
        try:
            parts = urlsplit(uri)
            port = parts.port
        except ValueError as e:
            raise AuthCallError("bad uri: %s (%s)" % (uri, e))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AuthCallError("bad uri: %s" % uri)
        try:
            # host_header and the connection encode it: find out now, not per call.
            parts.hostname.encode("idna")
        except UnicodeError as e:
            raise AuthCallError("bad uri: %s (%s)" % (uri, e))
        path = (parts.path or "/").encode("utf-8")
        query = parts.query.encode("utf-8")
        if not set(path) <= _PATH_OK:
            raise AuthCallError("invalid characters found in path")
        if not set(query) <= _PATH_OK:
            raise AuthCallError("invalid characters found in query")
        return cls(
            scheme=parts.scheme,
            host=parts.hostname,
            port=port or (443 if parts.scheme == "https" else 80),
            target=path + (b"?" + query if parts.query else b""),
            ssl_verify=ssl_verify,
        )


class AuthClient:
    """
    Calls to one auth target over one connection pool.

    @param keepalive: keep connections for reuse.
    @param keepalive_timeout: seconds an idle pooled connection is kept.
    @param keepalive_pool: idle connections kept at most.
    """

    def __init__(
        self,
        reactor: Any,
        target: Optional[AuthTarget],
        *,
        keepalive: bool = True,
        keepalive_timeout: float = 60.0,
        keepalive_pool: int = 5,
        connect_timeout: float = 3.0,
        trust_root: Any = None,
        bad_uri: Optional[str] = None,
    ) -> None:
        self._reactor = reactor
        self.target = target
        self._bad_uri = bad_uri
        self._keepalive = keepalive
        self.pool = ConnectionPool(reactor, keepalive, keepalive_pool, keepalive_timeout)
        self._connector = Connector(
            reactor, self.pool, tls_policy(target.ssl_verify if target else True, trust_root), connect_timeout
        )
        if target is not None:
            self._scheme = target.scheme.encode("ascii")
            self._host = target.host.encode("idna")
            self.host_header = target.host_header
        else:
            self.host_header = b""
        # Framing fields every call of a kind sends.
        self._close = ((b"Connection", b"close"),) if not keepalive else ()

    def call(
        self,
        method: bytes,
        fields: Sequence[Tuple[bytes, bytes]],
        body: Optional[bytes],
        timeout: float,
    ) -> "Deferred[Reply]":
        """
        One auth exchange: C{fields} (checked names and values) and
        C{body}, answered in full within C{timeout} seconds; on expiry the
        whole exchange is cancelled and fails with C{AuthCallError("timeout")}.
        """
        target = self.target
        if target is None:
            return fail(AuthCallError(self._bad_uri or "bad uri"))
        framing = self._close
        if body is not None:
            framing += ((b"Content-Length", b"%d" % len(body)),)
        head = request_head(method, target.target, tuple(framing) + tuple(fields))
        request = ClientRequest(method, head, body, limit=MAX_AUTH_BODY, persistent=self._keepalive)
        exchange = self._connector.request(self._scheme, self._host, target.port, request)
        expired = []

        def expire() -> None:
            expired.append(True)
            exchange.cancel()

        timer = self._reactor.callLater(timeout, expire)

        def finished(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if expired and isinstance(result, Failure):
                return Failure(AuthCallError("timeout"))
            return result

        return exchange.addBoth(finished)

    def close(self) -> Deferred:
        """Close pooled connections."""
        return self.pool.close()
