# -*- test-case-name: tests.test_resource,tests.test_embedding -*-
"""
The web side: L{GatewayResource}, the gateway's single leaf resource, and
L{ForwardAuthResource}, which guards any existing L{IResource}.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import IResource, Resource, getChildForRequest

from fauth.auth import Allow, Decision, ForwardAuth, Respond
from fauth.authclient import is_cancellation
from fauth.config import ForwardAuthConf, HttpLimits, parse_forward_auth
from fauth.gateway import AuthClients, Gateway, Route
from fauth.inbound import BadRequest, InboundRequest
from fauth.proxy import send_simple

__all__ = ["ForwardAuthResource", "GatewayResource", "GatewayRequest", "GatewaySite"]

log = Logger()

_NOT_FOUND = b'{"error_msg":"404 Route Not Found"}'


class GatewayRequest(server.Request):
    """No default C{Content-Type}: a proxy must not invent one."""

    defaultContentType = None


class GatewaySite(server.Site):
    """
    A L{Site} without the per-request access log (about a third of
    CPython's per-request cost) and with the configured idle timeout.
    """

    requestFactory = GatewayRequest

    def __init__(self, resource: IResource, limits: HttpLimits = HttpLimits(), **kwargs: Any) -> None:
        super().__init__(resource, timeout=limits.idle_timeout, **kwargs)

    def log(self, request: Any) -> None:
        pass


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


def _internal_error(failure: Failure, request: Any, what: str) -> None:
    if is_cancellation(failure):
        return
    log.failure("unexpected error while {what}", failure, what=what)
    if not request.finished and not request.startedWriting and not client_gone(request):
        send_simple(request, 500)


def _cancel_when_gone(request: Any, d: Deferred) -> None:
    """A client that goes away cancels its pending auth call."""
    request.notifyFinish().addErrback(lambda _: d.cancel())


class GatewayResource(Resource):
    """
    The gateway: route, ask the auth service, proxy or answer.

    @param gateway: holds the current route table; read once per request,
        so a request finishes on the table it started with.
    """

    isLeaf = True

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self._gateway = gateway

    def render(self, request: Any) -> Any:
        try:
            inbound = InboundRequest.from_twisted(request)
        except BadRequest as e:
            send_simple(request, 400, ('{"error_msg":"%s"}' % e).encode(), b"application/json")
            return server.NOT_DONE_YET
        route = self._gateway.table.match(inbound.method, inbound.host, inbound.path)
        if route is None:
            send_simple(request, 404, _NOT_FOUND, b"application/json")
            return server.NOT_DONE_YET
        if route.auth is None:
            route.upstream.forward(request, inbound)
            return server.NOT_DONE_YET
        d = route.auth.check(inbound, route.conf.id)
        _cancel_when_gone(request, d)
        d.addCallback(self._decided, request, inbound, route)
        d.addErrback(_internal_error, request, "handling a request")
        return server.NOT_DONE_YET

    @staticmethod
    def _decided(decision: Decision, request: Any, inbound: InboundRequest, route: Route) -> None:
        if client_gone(request):
            return
        if isinstance(decision, Respond):
            write_respond(request, decision)
            return
        if isinstance(decision, Allow):
            decision.apply(request.requestHeaders)
        route.upstream.forward(request, inbound)


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
    @param auth_clients: share pools with other guards (optional).
    """

    isLeaf = True

    def __init__(
        self,
        wrapped: IResource,
        conf: Union[Mapping[str, Any], ForwardAuthConf],
        reactor: Any = None,
        auth_clients: Optional[AuthClients] = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        if not isinstance(conf, ForwardAuthConf):
            conf = parse_forward_auth(dict(conf))
        self._wrapped = wrapped
        self.auth_clients = auth_clients or AuthClients(reactor)
        self._auth = ForwardAuth(conf, self.auth_clients.get(conf), reactor)

    def render(self, request: Any) -> Any:
        try:
            inbound = InboundRequest.from_twisted(request)
        except BadRequest as e:
            send_simple(request, 400, str(e).encode(), b"text/plain")
            return server.NOT_DONE_YET
        d = self._auth.check(inbound)
        _cancel_when_gone(request, d)
        d.addCallback(self._decided, request)
        d.addErrback(_internal_error, request, "rendering a guarded resource")
        return server.NOT_DONE_YET

    def _decided(self, decision: Decision, request: Any) -> None:
        if client_gone(request):
            return
        if isinstance(decision, Respond):
            write_respond(request, decision)
            return
        if isinstance(decision, Allow):
            decision.apply(request.requestHeaders)
        # Traverse the guarded tree from where this leaf stopped.
        request.render(getChildForRequest(self._wrapped, request))
