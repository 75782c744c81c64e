# -*- test-case-name: tests.admin.test_reload -*-
"""
The runtime built from a configuration: one route table whose entries carry
their compiled forward-auth checker and upstream proxy, and the connection
pools they share.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import attr
from twisted.internet.defer import DeferredList
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

from fauth.auth.cache import DecisionCache
from fauth.auth.forward import ForwardAuth
from fauth.auth.client import AuthCallError, AuthClient, AuthTarget
from fauth.auth.targets import AuthNodes
from fauth.auth.variables import RequestVariables
from fauth.config import ForwardAuthConf, GatewayConf, Node, RouteConf, UpstreamConf, UpstreamTimeouts
from fauth.config.apisix import auth_disabled
from fauth.config.expr import Lookup
from fauth.request.clientaddr import ForwardedChain
from fauth.request.inbound import InboundRequest
from fauth.upstream.proxy import UpstreamProxy
from fauth.upstream.tunnel import Tunnels
from fauth.routing.table import RouteTable
from fauth.wire.pool import StrictConnectionPool

__all__ = ["AuthClients", "Gateway", "Route", "load_trust_root"]

log = Logger()


@attr.frozen
class Route:
    """
    A route's runtime: what L{RouteTable.match} returns.

    @ivar auth_paths: the C{auth_server_paths} of its forward-auth, whose
        requests go to C{auth_server} unchecked; C{()} for most routes.
    """

    conf: RouteConf
    auth: Optional[ForwardAuth]
    #: C{None} for a route that cannot run (C{conf.failure}): it answers 503.
    upstream: Optional[UpstreamProxy]
    auth_paths: Tuple[str, ...] = ()
    auth_server: Optional[UpstreamProxy] = None


def load_trust_root(path: Optional[str]) -> Any:
    """The CA bundle of C{ssl_trusted_certificate}, or the platform's trust."""
    if path is None:
        return None
    from twisted.internet import ssl

    with open(path, "rb") as f:
        pem = f.read()
    certs = [
        ssl.Certificate.loadPEM(b"-----BEGIN CERTIFICATE-----" + chunk)
        for chunk in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]
    ]
    return ssl.trustRootFromCertificates(certs)


def _forwarded_chain(conf: GatewayConf) -> Optional[ForwardedChain]:
    return ForwardedChain(conf.trusted_proxies) if conf.trusted_proxies is not None else None


def _variables(inbound: InboundRequest) -> Lookup:
    """The variables C{vars} of a route read (APISIX's C{ctx.var} before the route is known)."""
    return RequestVariables.for_request(inbound).lookup


class AuthClients:
    """
    One L{AuthClient} per auth target and pool settings; routes calling the
    same auth service share it.

    @param pool: every client's connections come from this (an
        application's own L{HTTPConnectionPool}); by default each client
        has a L{fauth.wire.pool.StrictConnectionPool} of its own.
    """

    def __init__(self, reactor: Any, trust_root: Any = None, pool: Optional[HTTPConnectionPool] = None) -> None:
        self._reactor = reactor
        self._trust_root = trust_root
        self._pool = pool
        self._clients: Dict[Tuple[Any, ...], AuthClient] = {}
        self._node_sets: Dict[Tuple[Any, ...], AuthNodes] = {}

    def get(self, conf: ForwardAuthConf) -> Union[AuthClient, AuthNodes]:
        """
        The client for this plugin instance's C{uri} and keep-alive
        settings; with C{nodes}, the L{AuthNodes} of those nodes (and
        C{checks}).
        """
        try:
            target: Optional[AuthTarget] = AuthTarget.parse(conf.client_uri, conf.ssl_verify)
            bad_uri = None
        except AuthCallError as e:
            target, bad_uri = None, str(e)
        key = (
            target or conf.uri,
            conf.keepalive,
            conf.keepalive_timeout,
            conf.keepalive_pool,
            conf.timeout,
        )
        if target is not None and conf.nodes is not None:
            return self._nodes(key + (conf.nodes, conf.checks), conf, target)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = self._client(conf, target, bad_uri, self._pool)
        return client

    def _client(
        self, conf: ForwardAuthConf, target: Optional[AuthTarget], bad_uri: Optional[str], pool: Optional[HTTPConnectionPool]
    ) -> AuthClient:
        return AuthClient(
            self._reactor,
            target,
            keepalive=conf.keepalive,
            keepalive_timeout=conf.keepalive_timeout / 1000.0,
            keepalive_pool=conf.keepalive_pool,
            connect_timeout=conf.timeout / 1000.0,
            trust_root=self._trust_root,
            bad_uri=bad_uri,
            pool=pool,
        )

    def _nodes(self, key: Tuple[Any, ...], conf: ForwardAuthConf, target: AuthTarget) -> AuthNodes:
        nodes = self._node_sets.get(key)
        if nodes is None:
            assert conf.nodes is not None and conf.checks is not None  # parse_forward_auth sets both
            nodes = self._node_sets[key] = AuthNodes(
                self._reactor,
                target,
                conf.nodes,
                conf.checks,
                # One pool per node (the application's own, when it gave one).
                lambda node_target, pool: self._client(conf, node_target, None, pool or self._pool),
            )
        return nodes

    def clients(self) -> List[AuthClient]:
        """Every client in use, those of each auth node included (for the pool metrics)."""
        return list(self._clients.values()) + [c for nodes in self._node_sets.values() for c in nodes.clients()]

    def node_sets(self) -> List[AuthNodes]:
        """The auth nodes of every C{forward-auth} with C{nodes} (for their metrics)."""
        return list(self._node_sets.values())

    def prune(self, keep: Iterable[Union[AuthClient, AuthNodes]]) -> None:
        """
        Close and forget every client not in C{keep} (those the installed
        table uses).  A request in flight holds its own reference, so it
        completes; only the idle pooled connections are closed.
        """
        kept = {id(c) for c in keep}
        unused: List[Union[AuthClient, AuthNodes]] = []
        for key in [k for k, c in self._clients.items() if id(c) not in kept]:
            unused.append(self._clients.pop(key))
        for key in [k for k, n in self._node_sets.items() if id(n) not in kept]:
            unused.append(self._node_sets.pop(key))
        for client in unused:
            try:
                client.close()
            except Exception:
                log.failure("closing an unused auth client failed")

    def close(self) -> Any:
        """Close every pooled connection (and stop the active health checks)."""
        return DeferredList([c.close() for c in list(self._clients.values()) + list(self._node_sets.values())])


class Gateway:
    """
    Everything a request needs, built once per configuration.

    @param pool: an application's own L{HTTPConnectionPool} for the auth
        calls (see L{AuthClients}).
    @param auth_clients: where the auth clients come from (a test double's,
        L{fauth.testing.StubAuthService.clients}); by default built here.

    @ivar table: the current L{RouteTable}; replaced, never mutated.
    @ivar tunnels: the open WebSocket tunnels (routes with C{enable_websocket}).
    @ivar forwarded_chain: the client addresses behind C{trusted_proxies},
        or C{None} when no proxy is trusted (the peer is the client).
    """

    def __init__(
        self,
        reactor: Any,
        conf: GatewayConf,
        pool: Optional[HTTPConnectionPool] = None,
        auth_clients: Optional[AuthClients] = None,
    ) -> None:
        self._reactor = reactor
        self._trust_root = load_trust_root(conf.ssl_trusted_certificate)
        self.auth_clients = auth_clients or AuthClients(reactor, self._trust_root, pool)
        self.upstream_pool = StrictConnectionPool(reactor, cachedConnectionTimeout=60.0)
        self.tunnels = Tunnels(reactor)
        self.conf = conf
        self.forwarded_chain = _forwarded_chain(conf)
        # Decision caches by (route id, forward-auth conf): a rebuilt route
        # whose forward-auth is unchanged keeps its decisions; one whose
        # forward-auth changed (or a removed route) loses them with its old
        # ForwardAuth.  Pruned to the installed configuration's on install.
        self._caches: Dict[Tuple[str, ForwardAuthConf], DecisionCache] = {}
        self.table: RouteTable[Route] = self._build(conf)
        self._install(conf, self.table)

    def build(self, conf: GatewayConf) -> "RouteTable[Route]":
        """
        The route table for C{conf}, built completely but not installed
        (see L{update}); whatever it raises, the running table is untouched.
        It may add auth clients: the next L{update} drops the unused ones.
        """
        return self._build(conf)

    def update(self, conf: GatewayConf, table: "Optional[RouteTable[Route]]" = None) -> None:
        """
        Serve C{conf} from the next request on.  The new table (C{table},
        from L{build}, or built now) is swapped in one assignment: requests
        in flight keep the route they matched, and pools carry over; auth
        clients the new table does not use are closed and dropped.
        """
        if table is None:
            table = self._build(conf)
        self.conf, self.table = conf, table
        self.forwarded_chain = _forwarded_chain(conf)
        self._install(conf, table)

    def _install(self, conf: GatewayConf, table: "RouteTable[Route]") -> None:
        keep = {(route.id, route.forward_auth) for route in conf.routes if route.forward_auth is not None}
        self._caches = {key: cache for key, cache in self._caches.items() if key in keep}
        self.upstream_pool.keep_idle(max([r.upstream.keepalive_pool for r in conf.routes if r.upstream] + [32]))
        # The same keys as in _build: these are the clients the table uses.
        self.auth_clients.prune(
            [self.auth_clients.get(route.forward_auth) for route in conf.routes if route.forward_auth is not None]
        )

    def _build(self, conf: GatewayConf) -> "RouteTable[Route]":
        proxies: Dict[Any, UpstreamProxy] = {}
        entries: List[Tuple[RouteConf, Route]] = []
        for route in conf.routes:
            if route.upstream is None:
                entries.append((route, Route(route, None, None)))
                continue
            upstream = self._proxy(route.upstream, proxies)
            auth = None
            if route.forward_auth is not None:
                key = (route.id, route.forward_auth)
                auth = ForwardAuth(
                    route.forward_auth,
                    self.auth_clients.get(route.forward_auth),
                    self._reactor,
                    cache=self._caches.get(key),
                )
                if auth.cache is not None:
                    self._caches[key] = auth.cache
            elif auth_disabled(route):
                log.warn(
                    "route {id}: forward-auth is disabled by _meta.disable: its requests pass without auth",
                    id=route.id,
                )
            entries.append((route, self._route(route, auth, upstream, proxies)))
        return RouteTable(entries, _variables)

    def _route(
        self, route: RouteConf, auth: Optional[ForwardAuth], upstream: UpstreamProxy, proxies: Dict[Any, UpstreamProxy]
    ) -> Route:
        conf = route.forward_auth
        if conf is None or not conf.auth_server_paths:
            return Route(route, auth, upstream)
        try:
            target = AuthTarget.parse(conf.uri, conf.ssl_verify)
        except AuthCallError:
            # Every auth call of this route fails (status_on_error): so do
            # its auth service's paths, through the same check.
            return Route(route, auth, upstream)
        seconds = conf.timeout / 1000.0
        server = UpstreamConf(
            nodes=(Node(target.host, target.port),),
            scheme=target.scheme,
            timeout=UpstreamTimeouts(connect=seconds, send=seconds, read=seconds),
        )
        key = ("auth server", server)
        proxy = proxies.get(key)
        if proxy is None:
            proxy = proxies[key] = UpstreamProxy(server, self._reactor, self.upstream_pool, self._trust_root)
        return Route(route, auth, upstream, conf.auth_server_paths, proxy)

    def decision_cache(self, route_id: str) -> Optional[DecisionCache]:
        """The installed decision cache of route C{route_id}, if it has one."""
        for (rid, _), cache in self._caches.items():
            if rid == route_id:
                return cache
        return None

    def _proxy(self, conf: UpstreamConf, proxies: Dict[Any, UpstreamProxy]) -> UpstreamProxy:
        # Routes naming the same upstream share its balancer state.
        key = id(conf)
        proxy = proxies.get(key)
        if proxy is None:
            proxy = proxies[key] = UpstreamProxy(conf, self._reactor, self.upstream_pool, self._trust_root)
        return proxy

    def close(self) -> Any:
        """Close the pools of both legs."""
        return DeferredList([self.auth_clients.close(), self.upstream_pool.close()])
