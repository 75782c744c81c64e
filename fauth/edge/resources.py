# -*- test-case-name: tests.edge.test_embedding -*-
"""
The web side: L{GatewayResource}, the gateway's single leaf resource, and
L{ForwardAuthResource}, which guards any existing L{IResource}.
"""
from __future__ import annotations

import json
import time
from typing import Any, Callable, List, Mapping, Optional, Union

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.client import HTTPConnectionPool
from twisted.web.http import datetimeToString
from twisted.web.resource import IResource, Resource, getChildForRequest

from fauth.auth.decision import Allow, Decision, Respond
from fauth.auth.forward import ForwardAuth
from fauth.wire.transport import is_cancellation
from fauth.config import ForwardAuthConf, HttpLimits, RouteConf, parse_forward_auth
from fauth.edge.drain import InFlight
from fauth.edge.gateway import AuthClients, Gateway
from fauth.edge.h2 import NegotiatingChannel, alpn_protocols
from fauth.edge.server import HardenedSite
from fauth.request.inbound import BadRequest, InboundRequest
from fauth.request.lifecycle import when_finished
from fauth.observe.exchange import Exchange
from fauth.observe.metrics import GatewayMetrics
from fauth.request.replies import send_simple
from fauth.upstream.tunnel import wants_upgrade

__all__ = ["ForwardAuthResource", "GatewayResource", "GatewayRequest", "GatewaySite"]

log = Logger()

_NOT_FOUND = b'{"error_msg":"404 Route Not Found"}'


class _HttpDate:
    """The C{Date} header value, formatted once per second rather than per request."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second, self._value = second, datetimeToString(second)
        return self._value


_http_date = _HttpDate()


class GatewayRequest(server.Request):
    """
    No default C{Content-Type}: a proxy must not invent one.  And, in front
    of a L{GatewayResource}, no resource traversal: it serves every path
    itself, so the per-segment unquoting and tree walk of
    L{server.Request.process} are skipped.
    """

    defaultContentType = None

    def process(self) -> None:
        site = self.channel.site  # type: ignore[attr-defined]  # set by Site.buildProtocol
        if not isinstance(site.resource, GatewayResource):
            server.Request.process(self)
            return
        self.site = site
        self.setHeader(b"Server", server.version)
        self.setHeader(b"Date", _http_date())
        self.prepath = []
        self.postpath = []
        self.sitepath: List[bytes] = []
        if self.path == b"*":
            self._handleStar()
            return
        try:
            self.render(site.resource)
        except BaseException:
            self.processingFailed(Failure())


class GatewaySite(HardenedSite):
    """
    A L{Site} without the per-request access log (about a third of
    CPython's per-request cost), whose connections are hardened channels
    with the configured limits and timeouts (L{fauth.edge.server}).
    """

    requestFactory = GatewayRequest

    def __init__(self, resource: IResource, limits: HttpLimits = HttpLimits(), **kwargs: Any) -> None:
        super().__init__(resource, limits, **kwargs)

    def log(self, request: Any) -> None:
        pass

    # -- HTTP/2 hook (fauth.edge.h2): on when the http section says http2: true

    def acceptableProtocols(self) -> list:
        return alpn_protocols(self.limits)

    def protocol(self) -> Any:
        if self.limits.http2:
            return NegotiatingChannel(self.limits, self.reactor)
        return super().protocol()

    # -- end of hook


def write_respond(request: Any, decision: Respond) -> None:
    """Answer with the auth service's denial (or a gateway-made status)."""
    out = request.responseHeaders
    for name, values in decision.headers:
        out.setRawHeaders(name, list(values))
    content_type = None if out.hasHeader(b"content-type") or not decision.body else b"text/plain"
    send_simple(request, decision.status, decision.body, content_type)


def client_gone(request: Any) -> bool:
    """Whether the client connection of C{request} is already lost."""
    return bool(getattr(request, "_disconnected", False))


def _internal_error(failure: Failure, request: Any) -> None:
    if is_cancellation(failure):
        return
    log.failure("unexpected error while handling {uri!r}", failure, uri=request.uri)
    if not request.finished and not request.startedWriting and not client_gone(request):
        send_simple(request, 500)


def guard(
    auth: ForwardAuth,
    request: Any,
    inbound: InboundRequest,
    proceed: Callable[[], None],
    route: Optional[RouteConf] = None,
    exchange: Optional[Exchange] = None,
) -> None:
    """
    Ask C{auth} about C{request}; answer a denial (or an error status), or
    apply the allowed header changes and call C{proceed}.  A client that
    goes away cancels its pending auth call.

    @param route: the matched route (C{$route_id} and C{$route_name} in
        C{extra_headers}).
    @param exchange: told when the check starts and what it decided (metrics).
    """
    if exchange is not None:
        exchange.auth_started()
    d = auth.check(inbound, route)
    when_finished(request, lambda reason: d.cancel() if reason is not None else None)

    def decided(decision: Decision) -> None:
        if exchange is not None:
            exchange.decided(decision)
        if client_gone(request):
            return
        if isinstance(decision, Respond):
            write_respond(request, decision)
            return
        if isinstance(decision, Allow):
            decision.apply(request.requestHeaders)
        proceed()

    d.addCallback(decided)
    d.addErrback(_internal_error, request)


def parse_inbound(request: Any) -> Optional[InboundRequest]:
    """The request as fauth sees it, or C{None} after answering 400."""
    try:
        return InboundRequest.from_twisted(request)
    except BadRequest as e:
        send_simple(request, 400, json.dumps({"error_msg": str(e)}).encode(), b"application/json")
        return None


class GatewayResource(Resource):
    """
    The gateway: route, ask the auth service, proxy or answer.

    @param gateway: holds the current route table; read once per request,
        so a request finishes on the table it started with.
    @param metrics: counts every request (and writes the access log), or
        C{None}.
    @ivar in_flight: the requests being handled (a shutdown waits for them).
    """

    isLeaf = True

    def __init__(self, gateway: Gateway, metrics: Optional[GatewayMetrics] = None) -> None:
        super().__init__()
        self._gateway = gateway
        self._metrics = metrics
        self.in_flight = InFlight()

    def render(self, request: Any) -> Any:
        self.in_flight.track(request)
        exchange = None if self._metrics is None else Exchange(self._metrics, request)
        inbound = parse_inbound(request)
        if inbound is None:
            return server.NOT_DONE_YET
        route = self._gateway.table.match(inbound.method, inbound.host, inbound.path)
        if route is None:
            send_simple(request, 404, _NOT_FOUND, b"application/json")
            return server.NOT_DONE_YET
        if exchange is not None:
            exchange.routed(route.conf.id)
        # -- WebSocket hook: an upgrade on an enable_websocket route is tunnelled
        if route.conf.enable_websocket and wants_upgrade(request):
            tunnels, upstream = self._gateway.tunnels, route.upstream
            forward = lambda: tunnels.forward(upstream, request, inbound, exchange)  # noqa: E731
        else:
            forward = lambda: route.upstream.forward(request, inbound, exchange)  # noqa: E731
        # -- end of hook
        if route.auth is None:
            forward()
            return server.NOT_DONE_YET
        guard(route.auth, request, inbound, forward, route.conf, exchange)
        return server.NOT_DONE_YET


class ForwardAuthResource(Resource):
    """
    Guards any L{IResource} with one C{forward-auth} configuration.

    Allowed requests reach C{wrapped} with the C{upstream_headers} applied
    to C{request.requestHeaders} (absent ones removed); denied ones get the
    auth service's answer.

    @param wrapped: the resource (tree) to guard.
    @param conf: the C{forward-auth} attribute dict, as in APISIX, or a
        L{ForwardAuthConf}.
    @param reactor: defaults to the global reactor, imported only then.
    @param pool: an application's own L{HTTPConnectionPool} for the auth
        calls, shared with its other clients (its settings then apply);
        by default a L{fauth.wire.pool.StrictConnectionPool} from C{conf}'s
        keep-alive settings.
    @param auth_clients: share clients with other guards (optional).
    """

    isLeaf = True

    def __init__(
        self,
        wrapped: IResource,
        conf: Union[Mapping[str, Any], ForwardAuthConf],
        reactor: Any = None,
        pool: Optional[HTTPConnectionPool] = None,
        auth_clients: Optional[AuthClients] = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        if not isinstance(conf, ForwardAuthConf):
            conf = parse_forward_auth(dict(conf))
        self._wrapped = wrapped
        self.auth_clients = auth_clients or AuthClients(reactor, pool=pool)
        self._auth = ForwardAuth(conf, self.auth_clients.get(conf), reactor)

    def render(self, request: Any) -> Any:
        inbound = parse_inbound(request)
        if inbound is not None:
            # Allowed: traverse the guarded tree from where this leaf stopped.
            guard(self._auth, request, inbound, lambda: request.render(getChildForRequest(self._wrapped, request)))
        return server.NOT_DONE_YET
