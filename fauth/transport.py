# -*- test-case-name: tests.test_auth_leg,tests.test_proxy_e2e -*-
"""
Outbound connections for both legs: quiet persistent pools, TLS policies,
and agents that connect to IP literals without a resolver round-trip.
"""
from __future__ import annotations

from typing import Any

from twisted.internet import endpoints
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.web import client as web_client
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

__all__ = ["make_agent", "quiet_pool", "tls_policy"]


class _ClientProtocol(HTTP11ClientProtocol):  # type: ignore[misc]
    """
    Puts each response's connection-control headers on the response as
    C{connection_headers}: the Agent's parser moves C{Connection} out of
    C{response.headers}, and with it the names a proxy must also drop.
    """

    def request(self, request: Any) -> Any:
        d = super().request(request)
        parser = self._parser
        if parser is not None:

            def keep(response: Any) -> Any:
                response.connection_headers = parser.connHeaders
                return response

            d.addCallback(keep)
        return d


class _QuietFactory(web_client._HTTP11ClientFactory):  # type: ignore[misc]
    # One "Starting factory" log line per pooled connection is noise.
    noisy = False

    def buildProtocol(self, addr: Any) -> _ClientProtocol:
        return _ClientProtocol(self._quiescentCallback)


def quiet_pool(reactor: Any, persistent: bool) -> web_client.HTTPConnectionPool:
    """An L{HTTPConnectionPool} that does not log every new connection."""
    pool = web_client.HTTPConnectionPool(reactor, persistent=persistent)
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
