# -*- test-case-name: tests.test_authclient -*-
"""
The HTTP client of the auth leg: treq over one L{HTTPConnectionPool} per
auth target, with treq's per-call work done once.

C{treq.HTTPClient.request} parses and re-encodes the URL (hyperlink and
IDNA), and wraps the agent, on every call, in C{CookieAgent} with a jar kept
across calls and in C{ContentDecoderAgent}, which adds C{Accept-Encoding:
gzip}.  For a gateway the wrapping is a leak between users (a C{Set-Cookie}
from one user's auth answer would be sent with the next user's auth request)
and the parsing is a per-request cost.  So the URL is encoded once, the
pooled agent is used as it is, and the answer still comes back as treq's
response: the auth service sees exactly the headers the contract sends.
"""
from __future__ import annotations

from typing import Any, List, Optional
from urllib.parse import urlsplit

import attr
from treq.client import HTTPClient
from treq.response import _Response
from treq.cookies import IndexableCookieJar  # type: ignore[attr-defined]
from twisted.internet.defer import Deferred, fail
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import client as web_client
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer

from fauth.transport import BytesProducer, make_agent, quiet_pool, tls_policy

__all__ = [
    "AuthCallError",
    "AuthClient",
    "AuthReply",
    "AuthTarget",
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
class AuthReply:
    """The auth service's answer, body read in full."""

    status: int
    headers: Headers
    body: bytes


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

    @property
    def url(self) -> bytes:
        host = "[%s]" % self.host if ":" in self.host else self.host
        return b"%s://%s:%d%s" % (self.scheme.encode(), host.encode("idna"), self.port, self.target)

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
            # host_header and url encode it: find out now, not per call.
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


class _NoCookies(IndexableCookieJar):  # type: ignore[misc]
    """A cookie jar that never keeps a cookie, so none can cross requests."""

    def set_cookie(self, cookie: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def add_cookie_header(self, request: Any) -> None:
        pass


class _PreparedClient(HTTPClient):  # type: ignore[misc]
    """treq's client for one fixed, already encoded URL (see the module docstring)."""

    def __init__(self, agent: IAgent, url: bytes) -> None:
        super().__init__(agent, cookiejar=_NoCookies())
        self._url = url

    def send(self, method: bytes, headers: Headers, body: Optional[IBodyProducer]) -> "Deferred[_Response]":
        """One request to the URL; a treq response, unbuffered."""
        return self._agent.request(method, self._url, headers, body).addCallback(_Response, self._cookiejar)


class _CappedBody(Protocol):
    """Collects a response body up to a limit; cancellable mid-body."""

    def __init__(self, limit: int) -> None:
        self._chunks: List[bytes] = []
        self._size = 0
        self._limit = limit
        self.done: Deferred = Deferred(self._cancel)

    def _cancel(self, d: Deferred) -> None:
        # readBody's canceller would look for abortConnection, which the
        # body transport lacks (Twisted #8227); stopping the producer closes
        # the pooled connection instead of returning it half-read.
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.transport.stopProducing()
            self.done.errback(AuthCallError("response body too large"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if reason.check(web_client.ResponseDone, web_client.PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


class AuthClient:
    """
    treq over one connection pool for one auth target.

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
        self.pool = quiet_pool(reactor, keepalive)
        self.pool.maxPersistentPerHost = keepalive_pool
        self.pool.cachedConnectionTimeout = keepalive_timeout
        agent = make_agent(
            reactor, self.pool, tls_policy(target.ssl_verify if target else True, trust_root), connect_timeout
        )
        self._http = _PreparedClient(agent, target.url) if target else None
        self.host_header = target.host_header if target else b""

    def call(
        self, method: bytes, headers: Headers, body: Optional[bytes], timeout: float
    ) -> "Deferred[AuthReply]":
        """
        One auth exchange, body included, within C{timeout} seconds; on
        expiry the whole exchange is cancelled and fails with
        C{AuthCallError("timeout")}.
        """
        if self._http is None:
            return fail(AuthCallError(self._bad_uri or "bad uri"))
        exchange = self._http.send(method, headers, BytesProducer(body) if body is not None else None)
        exchange.addCallback(self._read)
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

    @staticmethod
    def _read(response: Any) -> "Deferred[AuthReply]":
        reader = _CappedBody(MAX_AUTH_BODY)
        response.deliverBody(reader)
        return reader.done.addCallback(
            lambda body: AuthReply(response.code, response.headers, body)
        )

    def close(self) -> Deferred:
        """Close pooled connections."""
        return self.pool.closeCachedConnections()
