# -*- test-case-name: tests.auth.test_client -*-
"""
The HTTP client of the auth leg: C{treq.HTTPClient} over a L{PoolAgent}
(L{fauth.wire.agent}) and an L{HTTPConnectionPool}, calling one auth target.

The URL is encoded once, at config time, and each call sends exactly the
fields the contract builds: no cookie jar that keeps anything (a
C{Set-Cookie} in one user's auth answer must not go out with the next
user's auth request), no C{Accept-Encoding}, and the answer relayed as it
was sent.  One timer cancels the whole call, body included; the body is
read through treq under a 1 MiB cap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union, cast
from urllib.parse import urlsplit

import attr
import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import IResponse

from fauth.wire.agent import BytesBody, NoCookies, PoolAgent, PreEncodedURL, PreparedHeaders, as_sent
from fauth.wire.h1 import ReplyHeaders
from fauth.wire.deadlines import Deadlines
from fauth.wire.pool import StrictConnectionPool
from fauth.wire.transport import BodyTooLarge, IClientReactor, tls_policy

if TYPE_CHECKING:
    from treq._types import _ITreqReactor

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


class Reply:
    """An auth service's whole answer, as it was sent."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: ReplyHeaders, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


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
    Calls to one auth target through treq.

    @param pool: the connections to use; by default a
        L{StrictConnectionPool} of this client's own, built from the
        keep-alive settings.  An application's own L{HTTPConnectionPool}
        works too (its settings then apply, and it is not closed here).
    @param keepalive: keep connections for reuse.
    @param keepalive_timeout: seconds an idle pooled connection is kept.
    @param keepalive_pool: idle connections kept at most.
    """

    def __init__(
        self,
        reactor: IClientReactor,
        target: Optional[AuthTarget],
        *,
        keepalive: bool = True,
        keepalive_timeout: float = 60.0,
        keepalive_pool: int = 5,
        connect_timeout: float = 3.0,
        trust_root: Any = None,
        bad_uri: Optional[str] = None,
        pool: Optional[HTTPConnectionPool] = None,
    ) -> None:
        self._reactor = reactor
        self._deadlines: Dict[float, Deadlines] = {}
        # treq's reactor type (private) names the same interfaces as
        # IClientReactor, which is not nominally one of it.
        self._treq_reactor = cast("_ITreqReactor", reactor)
        self.target = target
        self._bad_uri = bad_uri
        self._own_pool: Optional[StrictConnectionPool] = None
        if pool is None:
            pool = self._own_pool = StrictConnectionPool(reactor, keepalive, keepalive_pool, keepalive_timeout)
        self.pool: HTTPConnectionPool = pool
        policy = tls_policy(target.ssl_verify if target else True, trust_root)
        self._jar = NoCookies()
        self._http = HTTPClient(
            PoolAgent(reactor, self.pool, policy, connect_timeout),
            cookiejar=self._jar,
            data_to_body_producer=BytesBody,
        )
        self.host_header = target.host_header if target is not None else b""
        self._url = (
            PreEncodedURL.encode(
                "%s://%s%s" % (target.scheme, self.host_header.decode("ascii"), target.target.decode("ascii"))
            )
            if target is not None
            else None
        )

    def call(
        self,
        method: str,
        fields: Sequence[Tuple[bytes, bytes]],
        body: Optional[bytes],
        timeout: float,
        target: Optional[bytes] = None,
    ) -> "Deferred[Reply]":
        """
        One auth exchange: C{fields} (checked names and values) and
        C{body}, answered in full within C{timeout} seconds; on expiry the
        whole exchange is cancelled and fails with C{AuthCallError("timeout")}.
        C{target} (encoded) replaces the path and query of the client's URL.
        """
        url = self._url
        if url is None:
            return fail(AuthCallError(self._bad_uri or "bad uri"))
        exchange = self._http.request(
            method,
            url if target is None else url.with_target(target),
            headers=PreparedHeaders(fields),
            data=body,
            cookies=self._jar,
            allow_redirects=False,
            unbuffered=True,
            reactor=self._treq_reactor,
        )
        expired = []

        def expire() -> None:
            expired.append(True)
            exchange.cancel()

        deadlines = self._deadlines.get(timeout)
        if deadlines is None:
            deadlines = self._deadlines[timeout] = Deadlines(self._reactor, timeout)
        deadlines.add(expire)

        def answered(result: Any) -> Any:
            # One callback for both outcomes, and for a body already in.
            if not isinstance(result, Failure):
                reading = _read(result)
                if isinstance(reading, Deferred):
                    # The body is still coming: the deadline covers it too.
                    return reading.addBoth(finished)
                result = reading
            return finished(result)

        def finished(result: Any) -> Any:
            deadlines.remove(expire)
            if expired and isinstance(result, Failure):
                return Failure(AuthCallError("timeout"))
            return result

        return exchange.addBoth(answered)

    def close(self) -> Deferred:
        """Close pooled connections (of this client's own pool only)."""
        if self._own_pool is None:
            return succeed(None)
        return self._own_pool.close()


def _read(response: IResponse) -> "Union[Reply, Failure, Deferred[Reply]]":
    """
    The answer as the auth service sent it, its body read through treq, at
    most 1 MiB: at once when the body is in already, else when it is.
    """
    raw = as_sent(response)
    chunks = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > MAX_AUTH_BODY:
            raise BodyTooLarge()
        chunks.append(data)

    reading = treq.collect(raw, collect)
    if reading.called:
        # The whole body came with the head (as most auth answers do): no
        # Deferred to wait on.
        outcome: List[Any] = []
        reading.addBoth(outcome.append)
        (result,) = outcome
        return result if isinstance(result, Failure) else Reply(raw.code, raw.sent_headers, b"".join(chunks))

    def settle(result: Any) -> None:
        if read.called:
            return  # cancelled: the stopped body's end is nobody's news
        if isinstance(result, Failure):
            read.errback(result)
        else:
            read.callback(Reply(raw.code, raw.sent_headers, b"".join(chunks)))

    # treq's Deferred has no canceller: cancelling this one stops the body.
    read: Deferred = Deferred(lambda _: raw.stop())
    reading.addBoth(settle)
    return read
