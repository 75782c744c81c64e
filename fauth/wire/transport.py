# -*- test-case-name: tests.auth.test_client,tests.upstream.test_proxy_e2e -*-
"""
Outbound connections for both legs: TLS policies, endpoints that connect to
IP literals without a resolver round-trip, requests over an
L{HTTPConnectionPool}, and the short error strings a failed exchange is
logged with.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from OpenSSL import SSL
from twisted.internet import endpoints
from twisted.internet import error as net_error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorPluggableNameResolver, IReactorTCP, IReactorTime
from twisted.python.failure import Failure
from twisted.web import client as web_client
from twisted.web._newclient import (
    ParseError,
    ResponseFailed,
    ResponseNeverReceived,
    _DataLoss,
)
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from fauth.wire.connection import ClientRequest

__all__ = [
    "BodyTooLarge",
    "Connector",
    "IClientReactor",
    "describe_failure",
    "is_cancellation",
    "tls_policy",
]


class IClientReactor(IReactorTCP, IReactorTime, IReactorPluggableNameResolver):
    """
    What the outbound legs need of a reactor, for type checking: TCP
    connections, timers (timeouts, the pool's idle connections) and a name
    resolver (L{HostnameEndpoint}).  The same three as treq's own reactor
    type; every reactor Twisted ships provides them.
    """


@implementer(IPolicyForHTTPS)
class _NoVerification:
    """C{ssl_verify: false}: TLS without certificate or hostname checks."""

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        from twisted.internet import ssl

        return ssl.CertificateOptions(verify=False)


def tls_policy(verify: bool, trust_root: Any = None) -> IPolicyForHTTPS:
    """Certificate and hostname verification (service-identity), cached per host."""
    if not verify:
        return _NoVerification()
    return web_client.HostnameCachingHTTPSPolicy(web_client.BrowserLikePolicyForHTTPS(trust_root))


class BodyTooLarge(Exception):
    """A response body went over the size its reader allows."""


class Connector:
    """
    Requests over one pool: one endpoint per C{(scheme, host, port)}, built
    on first use.  IP literals get a plain TCP endpoint: L{HostnameEndpoint}
    would run C{getaddrinfo} in the thread pool for every new connection,
    even for C{127.0.0.1}.  Names still go through L{HostnameEndpoint}.
    """

    # Endpoints of targets no longer configured are dropped past this many.
    max_endpoints = 1024

    def __init__(
        self,
        reactor: IClientReactor,
        pool: web_client.HTTPConnectionPool,
        policy: IPolicyForHTTPS,
        connect_timeout: float,
    ) -> None:
        self._reactor = reactor
        self._pool = pool
        self._policy = policy
        self._timeout = connect_timeout
        self._endpoints: Dict[Tuple[bytes, bytes, int], Any] = {}

    def endpoint(self, scheme: bytes, host: bytes, port: int) -> Tuple[Tuple[bytes, bytes, int], Any]:
        """
        The pool key and endpoint of C{host:port} (C{host} IDNA-encoded,
        IPv6 without brackets).
        """
        key = (scheme, host, port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if len(self._endpoints) >= self.max_endpoints:
                self._endpoints.clear()
            endpoint = self._endpoints[key] = self._endpoint(scheme, host, port)
        return key, endpoint

    def request(self, scheme: bytes, host: bytes, port: int, request: ClientRequest) -> Deferred:
        """
        Send C{request} to C{host:port} over a connection from the pool;
        see L{ClientConnection.request}.
        """
        key, endpoint = self.endpoint(scheme, host, port)
        return self.send(key, endpoint, request)

    def send(self, key: Any, endpoint: Any, request: Any) -> Deferred:
        """
        Send C{request} (a L{ClientRequest}, or a Twisted C{Request} with a
        plain pool) over a connection for C{key}, from the pool or opened
        with C{endpoint}.
        """
        connecting = self._pool.getConnection(key, endpoint)
        if connecting.called and not isinstance(connecting.result, Failure):
            # A pooled connection, handed over at once: sending now returns
            # a Deferred nobody has fired yet, so every callback the callers
            # add is appended, rather than each one re-entering a fired
            # Deferred that waits on another (about a dozen per request).
            # The result: a ClientConnection or Twisted's HTTP11ClientProtocol
            # (mypy only knows a fired Deferred's result as an object).
            connection: Any = connecting.result
            return connection.request(request)
        return connecting.addCallback(_send, request)

    def _endpoint(self, scheme: bytes, host: bytes, port: int) -> Any:
        text = host.decode("ascii")
        if isIPAddress(text):
            endpoint: Any = endpoints.TCP4ClientEndpoint(self._reactor, text, port, self._timeout)
        elif isIPv6Address(text):
            endpoint = endpoints.TCP6ClientEndpoint(self._reactor, text, port, self._timeout)
        else:
            endpoint = endpoints.HostnameEndpoint(self._reactor, host, port, self._timeout)
        if scheme == b"https":
            endpoint = endpoints.wrapClientTLS(self._policy.creatorForNetloc(host, port), endpoint)
        return endpoint


def is_cancellation(failure: Failure) -> bool:
    """
    Whether a failed call was cancelled by its caller (also when wrapped in
    a C{ResponseFailed}); a call cancelled while still connecting fails with
    L{ConnectingCancelledError} instead.
    """
    if failure.check(CancelledError, net_error.ConnectingCancelledError):
        return True
    reasons = getattr(failure.value, "reasons", None) or []
    return any(inner.check(CancelledError, net_error.ConnectingCancelledError) for inner in reasons)


def describe_failure(failure: Failure) -> str:
    """The reference's short error strings (C{closed}, C{timeout}, ...) for a failed call."""
    exc = failure.value
    if isinstance(exc, (ResponseFailed, ResponseNeverReceived)):
        reasons = getattr(exc, "reasons", None) or []
        for inner in reasons:
            if not isinstance(inner.value, (net_error.ConnectionDone, net_error.ConnectionLost)):
                return describe_failure(inner)
        return "closed"
    if isinstance(exc, net_error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (net_error.TimeoutError, net_error.TCPTimedOutError)):
        return "timeout"
    if isinstance(exc, (net_error.ConnectionDone, net_error.ConnectionLost, net_error.ConnectionClosed, _DataLoss)):
        # _DataLoss: closed before the end of a body framed by Content-Length or chunks.
        return "closed"
    if isinstance(exc, net_error.DNSLookupError):
        return "failed to resolve host: %s" % (exc.args[0] if exc.args else "")
    if isinstance(exc, SSL.Error):
        return "handshake failed: %s" % (exc,)
    if type(exc).__name__ == "VerificationError" and type(exc).__module__.startswith("service_identity"):
        # Chain verified, but the certificate names another host (service-identity).
        return "handshake failed: certificate host mismatch"
    if isinstance(exc, ParseError):
        what, data = (tuple(exc.args) + ("", b""))[:2]
        return "bad response: %s%s" % (what, " %r" % (data[:80],) if data else "")
    if isinstance(exc, CancelledError):
        return "cancelled"
    if isinstance(exc, BodyTooLarge):
        return "response body too large"
    text = failure.getErrorMessage()
    return "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__


def _send(connection: Any, request: Any) -> Deferred:
    return connection.request(request)
