# -*- test-case-name: tests.test_auth_leg,tests.test_proxy_e2e -*-
"""
Outbound connections for both legs: quiet persistent pools, TLS policies,
agents that connect to IP literals without a resolver round-trip, a strict
response parser, in-memory request bodies, and the short error strings a
failed exchange is logged with.
"""
from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet import endpoints
from twisted.internet import error as net_error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client as web_client
from twisted.web._newclient import (
    HEADER,
    STATUS,
    HTTP11ClientProtocol,
    HTTPClientParser,
    ParseError,
    RequestGenerationFailed,
    ResponseFailed,
    ResponseNeverReceived,
    _DataLoss,
)
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from fauth.headers import CTL, TOKEN
from fauth.pools import TrackedPool

__all__ = [
    "BytesProducer",
    "MAX_RESPONSE_HEAD",
    "MAX_RESPONSE_HEADERS",
    "describe_failure",
    "is_cancellation",
    "make_agent",
    "quiet_pool",
    "tls_policy",
]

log = Logger()

# A response head (status line and header lines) from an auth service or an
# upstream larger than this fails the exchange as a bad response instead of
# being buffered; nginx's own limit (proxy_buffer_size) is 4 or 8 KiB.
MAX_RESPONSE_HEAD = 64 * 1024
MAX_RESPONSE_HEADERS = 500


class _StrictParser(HTTPClientParser):  # type: ignore[misc]
    """
    The Agent's response parser with the checks a proxy needs.  Twisted's
    takes a header line without a colon as a C{ValueError}, passes a NUL or
    another control character on in a value, joins obs-fold lines without a
    space, and buffers any number of header lines.  Here each of these is a
    L{ParseError} (C{bad response: ...}): the exchange fails and the
    connection is closed.
    """

    MAX_LENGTH = MAX_RESPONSE_HEAD
    _head_bytes = 0
    _head_lines = 0

    def lineReceived(self, line: bytes) -> None:
        if self.state in (STATUS, HEADER):
            self._head_bytes += len(line) + 1
            if self._head_bytes > MAX_RESPONSE_HEAD:
                raise ParseError("response head too large", b"")
            if self.state == HEADER and line not in (b"", b"\r"):
                self._head_lines += 1
                if self._head_lines > MAX_RESPONSE_HEADERS:
                    raise ParseError("too many headers", b"")
                _check_header_line(line[:-1] if line[-1:] == b"\r" else line)
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        raise ParseError("response head too large", b"")


def _check_header_line(line: bytes) -> None:
    if line[:1] in (b" ", b"\t"):
        raise ParseError("obsolete line folding", line[:80])
    name, colon, value = line.partition(b":")
    if not colon:
        raise ParseError("header line without a colon", line[:80])
    if TOKEN.fullmatch(name) is None:
        raise ParseError("invalid header name", name[:80])
    if CTL.search(value) is not None:
        raise ParseError("control character in header value", name[:80])


class _ClientProtocol(HTTP11ClientProtocol):  # type: ignore[misc]
    """
    Puts each response's connection-control headers on the response as
    C{connection_headers}: the Agent's parser moves C{Connection} out of
    C{response.headers}, and with it the names a proxy must also drop.
    """

    def request(self, request: Any) -> Any:
        d = super().request(request)
        parser = self._parser
        if type(parser) is HTTPClientParser:
            # Twisted builds its parser inside request(); no byte has been parsed yet.
            parser.__class__ = _StrictParser
        if parser is not None:

            def keep(response: Any) -> Any:
                response.connection_headers = parser.connHeaders
                return response

            d.addCallback(keep)
        return d

    def _finishResponse_WAITING(self, rest: bytes) -> None:
        # Bytes after a complete response can only be an answer the peer
        # thinks belongs to the next request: reusing the connection would
        # desynchronise it.  Twisted drops them and pools the connection.
        if rest and self._currentRequest is not None:
            self._stray(len(rest))
            self._currentRequest.persistent = False
        # The whole answer came before the whole request body went out (an
        # upstream answering early, e.g. 413).  Stop sending the body now,
        # while its source is open: relaying the answer finishes the client's
        # request, and the server then closes a spooled body's file (Twisted
        # would read it again and log a critical error).  Then abort: the
        # connection can carry nothing more, and the stopped producer, still
        # registered, would hold a plain close open.
        early = self._state == "TRANSMITTING" and self._currentRequest is not None
        if early:
            self._currentRequest.stopWriting()
        super()._finishResponse_WAITING(rest)
        if early:
            self.transport.abortConnection()

    _finishResponse_TRANSMITTING = _finishResponse_WAITING

    def dataReceived(self, data: bytes) -> None:
        if self._parser is None and self._state == "QUIESCENT":
            # The same, arriving while the connection waits in the pool.
            self._stray(len(data))
            self.transport.loseConnection()
            return
        super().dataReceived(data)

    def _stray(self, size: int) -> None:
        peer = self.transport.getPeer()
        log.warn(
            "{peer} sent {size} bytes after the end of a response; connection closed, not reused",
            peer="%s:%s" % (getattr(peer, "host", peer), getattr(peer, "port", "")),
            size=size,
        )


class _QuietFactory(web_client._HTTP11ClientFactory):  # type: ignore[misc]
    # One "Starting factory" log line per pooled connection is noise.
    noisy = False

    def buildProtocol(self, addr: Any) -> _ClientProtocol:
        return _ClientProtocol(self._quiescentCallback)


def quiet_pool(reactor: Any, persistent: bool) -> TrackedPool:
    """
    An L{HTTPConnectionPool} that does not log every new connection, and
    counts its idle and busy connections for the metrics (L{TrackedPool}).
    """
    pool = TrackedPool(reactor, persistent=persistent)
    pool._factory = _QuietFactory
    return pool


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


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    IP literals get a plain TCP endpoint: L{HostnameEndpoint} would run
    C{getaddrinfo} in the thread pool for every new connection, even for
    C{127.0.0.1}.  Names still go through L{HostnameEndpoint}.
    """

    def __init__(self, reactor: Any, policy: IPolicyForHTTPS, connect_timeout: float) -> None:
        self._reactor = reactor
        self._policy = policy
        self._timeout = connect_timeout

    def endpointForURI(self, uri: Any) -> Any:
        host = uri.host.decode("ascii")
        if isIPAddress(host):
            endpoint: Any = endpoints.TCP4ClientEndpoint(self._reactor, host, uri.port, self._timeout)
        elif isIPv6Address(host):
            endpoint = endpoints.TCP6ClientEndpoint(self._reactor, host, uri.port, self._timeout)
        else:
            endpoint = endpoints.HostnameEndpoint(self._reactor, uri.host, uri.port, self._timeout)
        if uri.scheme == b"https":
            endpoint = endpoints.wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


def make_agent(reactor: Any, pool: Any, policy: IPolicyForHTTPS, connect_timeout: float) -> web_client.Agent:
    """An L{Agent} over C{pool} with the endpoint rules above."""
    return web_client.Agent.usingEndpointFactory(
        reactor, _Endpoints(reactor, policy, connect_timeout), pool=pool
    )


@implementer(IBodyProducer)
class BytesProducer:
    """A body already in memory: written at once, so no Cooperator is involved."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred:
        if self._body:
            consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def is_cancellation(failure: Failure) -> bool:
    """
    Whether a failed call was cancelled by its caller (possibly wrapped by
    the Agent); a call cancelled while still connecting fails with
    L{ConnectingCancelledError} instead.
    """
    if failure.check(CancelledError, net_error.ConnectingCancelledError):
        return True
    reasons = getattr(failure.value, "reasons", None) or []
    return any(inner.check(CancelledError, net_error.ConnectingCancelledError) for inner in reasons)


def describe_failure(failure: Failure) -> str:
    """The reference's short error strings (C{closed}, C{timeout}, ...) for a failed call."""
    exc = failure.value
    if isinstance(exc, (ResponseFailed, ResponseNeverReceived, RequestGenerationFailed)):
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
    text = failure.getErrorMessage()
    return "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__
