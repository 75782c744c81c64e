# -*- test-case-name: tests.edge.test_embedding -*-
"""
The web side: L{GatewayResource}, the gateway's single leaf resource, and
L{ForwardAuthResource}, which guards any existing L{IResource}.
"""
from __future__ import annotations

import json
import tempfile
import time
from io import BytesIO
from typing import Any, Callable, List, Mapping, Optional, Union

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.client import HTTPConnectionPool
from twisted.web.http import datetimeToString
from twisted.web.resource import IResource, Resource, getChildForRequest

from fauth.auth.decision import AUTH_SERVER, Allow, Decision, Respond
from fauth.auth.forward import ForwardAuth
from fauth.auth.variables import RequestVariables
from fauth.wire.transport import is_cancellation
from fauth.config import ForwardAuthConf, HttpLimits, RouteConf, parse_forward_auth
from fauth.edge.drain import InFlight
from fauth.edge.gateway import AuthClients, Gateway
from fauth.edge.request import BodySink, HardenedRequest
from fauth.edge.h2 import NegotiatingChannel, alpn_protocols
from fauth.edge.server import HardenedSite
from fauth.request.clientaddr import ForwardedChain
from fauth.wire.fields import canonical, fields_of
from fauth.request.inbound import BadRequest, InboundRequest, check_encoded
from fauth.request.lifecycle import when_finished
from fauth.observe.exchange import Exchange
from fauth.observe.metrics import GatewayMetrics
from fauth.request.replies import send_simple
from fauth.upstream.tunnel import wants_upgrade

__all__ = ["ForwardAuthResource", "GatewayResource", "GatewayRequest", "GatewaySite"]

log = Logger()

_NOT_FOUND = b'{"error_msg":"404 Route Not Found"}'
_UNAVAILABLE = b'{"error_msg":"503 Service Unavailable: this route cannot run (see the gateway log)"}'


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
_SERVER = canonical(b"server")
_DATE = canonical(b"date")


class GatewayRequest(HardenedRequest):
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
        # As setHeader would, without its name encoding and value
        # sanitising per call: both are known clean (fauth.wire.fields).
        fields = fields_of(self.responseHeaders)
        fields[_SERVER] = [server.version]
        fields[_DATE] = [_http_date()]
        self.prepath = []
        self.postpath = []
        self.sitepath: List[bytes] = []
        if self.path == b"*":
            self._handleStar()
            return
        try:
            # Not through Request.render: GatewayResource.render answers
            # every method itself and always returns NOT_DONE_YET.
            site.resource.render(self)
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
        try:
            if exchange is not None:
                exchange.decided(decision)
            if client_gone(request) or request.finished:
                # (finished: the server answered already, e.g. 408 or 413 on a
                # body that arrived while the auth service was asked.)
                return
            if isinstance(decision, Respond):
                write_respond(request, decision)
                return
            if isinstance(decision, Allow):
                decision.apply(request.requestHeaders)
                if decision.cookies:
                    # For this client's response only (fauth.auth.cookies).
                    request.cookies.extend(decision.cookies)
            proceed()
        except BaseException:
            # What an errback after the callback would get: one link, not two.
            _internal_error(Failure(), request)

    d.addCallbacks(decided, _internal_error, errbackArgs=(request,))


def parse_inbound(
    request: Any, limits: HttpLimits, policy: Optional[str] = None, proxies: Optional[ForwardedChain] = None
) -> Optional[InboundRequest]:
    """
    The request as fauth sees it, its path normalised as C{limits} say, or
    C{None} after answering 400.  With C{policy}, an ambiguous encoding in
    the path is checked against it (else the caller does, once routed:
    L{encoded_refused}).

    @param proxies: the C{trusted_proxies} (see L{InboundRequest.from_twisted}).
    """
    try:
        inbound = InboundRequest.from_twisted(request, limits.merge_slashes, proxies)
        if policy is not None:
            check_encoded(inbound.encoded, policy)
        return inbound
    except BadRequest as e:
        _bad_request(request, e)
        return None


def encoded_refused(request: Any, inbound: InboundRequest, policy: str) -> bool:
    """Whether C{inbound}'s path was refused (400 answered) by the C{encoded_characters} C{policy}."""
    try:
        check_encoded(inbound.encoded, policy)
    except BadRequest as e:
        _bad_request(request, e)
        return True
    return False


def _bad_request(request: Any, error: BadRequest) -> None:
    send_simple(request, 400, json.dumps({"error_msg": str(error)}).encode(), b"application/json")


def _site_limits(request: Any) -> HttpLimits:
    """The limits of the (hardened) site serving C{request}; the defaults on any other site."""
    limits = getattr(getattr(request, "site", None), "limits", None)
    return limits if isinstance(limits, HttpLimits) else HttpLimits()


class _BodyBuffer(BodySink):
    """
    Reads the body of a request dispatched on its head into a file, as
    Twisted would have (memory below 100 kB, a temporary file above), for
    a forward-auth that needs it (C{request_method: POST}, C{$post_arg}),
    up to C{limit} bytes: then C{done} is called, with the body in
    C{request.content} and C{inbound.content}, the whole body or just more
    than C{limit} of it (the auth check answers 413 then).

    With C{partial} (C{allow_partial_message}), a body passing C{limit} is
    held instead: what was read (C{limit} and at most one read more) is in
    C{inbound.content} only, for the auth check to cut, and goes back to
    the request (L{HardenedRequest.hold_back}), which reads no more until
    the upstream leg streams the whole body, from its first byte.
    """

    def __init__(
        self, request: Any, inbound: InboundRequest, limit: int, done: Callable[[], None], partial: bool = False
    ) -> None:
        length = request.body_length
        self._file: Any = BytesIO() if length is not None and length < 100000 else tempfile.TemporaryFile()
        self._request = request
        self._inbound = inbound
        self._limit = limit
        self._partial = partial
        self._size = 0
        self._done: Optional[Callable[[], None]] = done

    def body_data(self, data: bytes) -> None:
        if self._done is None:
            return
        self._size += len(data)
        self._file.write(data)
        if self._size > self._limit:
            if self._partial:
                self._hold()
            else:
                self._finish()

    def _hold(self) -> None:
        done, self._done = self._done, None
        assert done is not None
        self._file.seek(0)
        received = self._file.read()
        self._file.close()
        self._inbound.content = BytesIO(received)
        self._request.hold_back(received)
        done()

    def body_end(self) -> None:
        self._finish()

    def body_abort(self) -> None:
        # The server answered (413, 408) itself.
        self._done = None
        self._file.close()

    def _finish(self) -> None:
        done, self._done = self._done, None
        if done is None:
            return
        self._file.seek(0)
        self._request.content = self._inbound.content = self._file
        done()


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
    #: Requests with a body come as soon as their head is in
    #: (L{HardenedRequest}): the auth call starts before the body is read.
    handles_heads = True

    def __init__(self, gateway: Gateway, metrics: Optional[GatewayMetrics] = None) -> None:
        super().__init__()
        self._gateway = gateway
        self._metrics = metrics
        self.in_flight = InFlight()

    def render(self, request: Any) -> Any:
        self.in_flight.track(request)
        exchange = None if self._metrics is None else Exchange(self._metrics, request)
        http = self._gateway.conf.http
        inbound = parse_inbound(request, http, proxies=self._gateway.forwarded_chain)
        if inbound is None:
            return server.NOT_DONE_YET
        if exchange is not None and inbound.proxied is not None:
            exchange.client_addr = inbound.remote_addr
        route = self._gateway.table.match(inbound.method, inbound.host, inbound.path, inbound)
        if route is None:
            send_simple(request, 404, _NOT_FOUND, b"application/json")
            return server.NOT_DONE_YET
        if inbound.encoded and encoded_refused(
            request, inbound, route.conf.encoded_characters or http.encoded_characters
        ):
            return server.NOT_DONE_YET
        if exchange is not None:
            exchange.routed(route.conf.id)
        upstream = route.upstream
        if upstream is None:
            # A route that cannot run (RouteConf.failure) holds its paths: fail closed.
            send_simple(request, 503, _UNAVAILABLE, b"application/json")
            return server.NOT_DONE_YET
        if route.auth_paths and inbound.path.startswith(route.auth_paths):
            # The auth service's own pages (sign-in, callback): to it, unchecked.
            if exchange is not None:
                exchange.decided(AUTH_SERVER)
            route.auth_server.forward(request, inbound, exchange)  # type: ignore[union-attr]  # set with auth_paths
            return server.NOT_DONE_YET
        # -- WebSocket hook: an upgrade on an enable_websocket route is tunnelled
        if route.conf.enable_websocket and wants_upgrade(request):
            tunnels = self._gateway.tunnels
            forward = lambda: tunnels.forward(upstream, request, inbound, exchange)  # noqa: E731
        else:
            forward = lambda: upstream.forward(request, inbound, exchange)  # noqa: E731
        # -- end of hook
        auth = route.auth
        if auth is None or (
            auth.conf.filter is not None
            and not auth.conf.filter.evaluate(RequestVariables.for_request(inbound, route.conf).lookup)
        ):
            # No forward-auth, or its _meta.filter says it does not run for
            # this request (APISIX's meta_filter): straight upstream.
            forward()
            return server.NOT_DONE_YET

        def check() -> None:
            guard(
                auth,
                request,
                inbound,
                forward,
                route.conf,
                exchange,
            )

        if auth.needs_body and getattr(request, "dispatched", False) and request.content is None:
            # Dispatched on its head, but this auth call carries the body:
            # read it first (a declared length over the limit is answered
            # 413 by the check at once, before any of it is read).
            limit = auth.conf.max_req_body_size
            declared = request.body_length
            if declared is not None and declared > limit and not auth.takes_partial_body:
                check()
            else:
                request.stream_body(_BodyBuffer(request, inbound, limit, check, auth.takes_partial_body))
            return server.NOT_DONE_YET
        check()
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
    #: Served as a L{HardenedSite}'s root, requests with a body come as soon
    #: as their head is in: a denial never reads the body.
    handles_heads = True

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
        if getattr(request, "fauth_allowed", None) is self:
            # Allowed on its head; the body is in now (HardenedRequest.process_with_body).
            return self._render_wrapped(request)
        limits = _site_limits(request)
        inbound = parse_inbound(request, limits, limits.encoded_characters)
        if inbound is None:
            return server.NOT_DONE_YET
        if getattr(request, "dispatched", False) and request.content is None:
            # On its head (HardenedSite, this resource its root): ask before
            # the body is read; on allow, the body is read as Twisted does,
            # then the guarded tree rendered.
            if self._auth.needs_body:
                declared = request.body_length
                if (
                    declared is not None
                    and declared > self._auth.conf.max_req_body_size
                    and not self._auth.takes_partial_body
                ):
                    guard(self._auth, request, inbound, lambda: None)  # 413 before the body
                else:
                    request.process_with_body()
                return server.NOT_DONE_YET

            def allowed() -> None:
                request.fauth_allowed = self
                request.process_with_body()

            guard(self._auth, request, inbound, allowed)
            return server.NOT_DONE_YET
        # Allowed: traverse the guarded tree from where this leaf stopped.
        guard(self._auth, request, inbound, lambda: self._render_wrapped(request))
        return server.NOT_DONE_YET

    def _render_wrapped(self, request: Any) -> Any:
        request.render(getChildForRequest(self._wrapped, request))
        return server.NOT_DONE_YET
