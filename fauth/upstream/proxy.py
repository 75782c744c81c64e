# -*- test-case-name: tests.upstream.test_proxy_e2e -*-
"""
The upstream leg: HTTP/1.1 connections (L{fauth.wire.connection}) from a
L{fauth.wire.pool.StrictConnectionPool},
bodies streamed with backpressure, hop-by-hop headers dropped both ways.
"""
from __future__ import annotations

import re
from io import BytesIO
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers
from zope.interface import implementer

from fauth.auth.cookies import merge_into_response
from fauth.auth.variables import RequestVariables
from fauth.config import Node, UpstreamConf
from fauth.config.templates import compile_template
from fauth.routing.balancer import Balancer
from fauth.routing.health import connect_failed
from fauth.wire.connection import ClientRequest, FileUpload, StreamUpload
from fauth.wire.deadlines import Deadlines
from fauth.wire.h1 import ResponseHead
from fauth.wire.headers import HOP_BY_HOP, connection_listed
from fauth.request.inbound import InboundRequest
from fauth.request.lifecycle import when_finished
from fauth.wire.fields import canonical, copy_fields, fields_of
from fauth.request.replies import send_simple
from fauth.wire.transport import Connector, IClientReactor, describe_failure, tls_policy

__all__ = ["UpstreamProxy"]

log = Logger()

# The credentials and challenges of the hop between a client and a proxy
# (RFC 9110 11.7): the gateway is that proxy, so they are never relayed to
# an upstream, nor an upstream's back to the client (a forward-auth service
# may still read Proxy-Authorization through request_headers, and send
# Proxy-Authenticate through client_headers).
_PROXY_HOP = frozenset([b"proxy-authorization", b"proxy-authenticate"])
_RESPONSE_DROP = HOP_BY_HOP | _PROXY_HOP
# Framing is redone for the upstream connection; Host is set per pass_host;
# the X-Forwarded-* and X-Real-IP a client sent are replaced.
_REQUEST_DROP = HOP_BY_HOP | _PROXY_HOP | frozenset(
    [
        b"host",
        b"content-length",
        b"expect",
        b"x-forwarded-for",
        b"x-real-ip",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
    ]
)
# The fields every upstream request ends with, and the blank line.
_FORWARDED = (
    b"X-Forwarded-For: %s\r\nX-Real-IP: %s\r\nX-Forwarded-Proto: %s\r\n"
    b"X-Forwarded-Host: %s\r\nX-Forwarded-Port: %d\r\n\r\n"
)
# Where Headers keeps these (fauth.wire.fields).
_HOST = canonical(b"host")
_CONNECTION = canonical(b"connection")
_CONTENT_LENGTH = canonical(b"content-length")
_BODY_METHODS = frozenset([b"POST", b"PUT", b"PATCH"])
# Responses whose Content-Length, if any, is not the length of what follows.
_NO_BODY_CODES = frozenset([204, 304])
_TARGET_OK = re.compile(rb"[\x21-\x7e]+")
_TARGET_UNSAFE = re.compile(rb"[^\x21-\x7e]")




def wire_target(target: bytes) -> bytes:
    """C{target} with any byte a request line cannot carry percent-encoded."""
    if _TARGET_OK.fullmatch(target) is not None:
        return target
    return _TARGET_UNSAFE.sub(lambda m: b"%%%02X" % m.group()[0], target)


class _ClientBody:
    """The client's side of a L{StreamUpload}: the body of a request dispatched on its head."""

    __slots__ = ("_request",)

    def __init__(self, request: Any) -> None:
        self._request = request

    def pause(self) -> None:
        self._request.pause_body()

    def resume(self) -> None:
        self._request.resume_body()

    def stop(self) -> None:
        self._request.drop_body()


@implementer(IPushProducer)
class _Relay:
    """
    One allowed request's trip upstream and back: the sink of the streamed
    L{ClientRequest}.  The body goes to the client with the relay as the
    client request's push producer, passing pauses on to the upstream
    connection, so a slow client pauses the upstream socket instead of
    growing a buffer; the server stopping it means the client is gone.

    Two waits are timed, for the head (C{send} + C{read} timeout) and then
    between body chunks (C{read} timeout), each on its upstream's
    L{Deadlines} for that length: a dict entry per exchange, not a reactor
    timer armed and cancelled per request.
    """

    def __init__(
        self,
        request: Any,
        head_waits: Deadlines,
        body_waits: Deadlines,
        node: Node,
        exchange: Any = None,
    ) -> None:
        self._request = request
        self._exchange = exchange
        #: The node of the try in progress (for the log).
        self.node = node
        self._head_waits = head_waits
        self._body_waits = body_waits
        self._upstream: Any = None
        self._relaying = False
        self.call: Any = None
        self.client_gone = False
        self.timed_out = False

    def start(self, call: Any) -> None:
        """Wait for the answer to C{call} (cancelled if the head is late)."""
        self.call = call
        self._head_waits.add(self._head_late)

    def follow(self, call: Any) -> None:
        """
        L{start}, and relay what C{call} (the exchange) results in: its head
        copied to the client's response, or a gateway-made 502 or 504; a
        client gone before the head cancels it.  (Methods rather than
        closures per request, and one callback for both outcomes: an
        error in it goes to L{_unexpected} directly.)
        """
        self.start(call)
        when_finished(self._request, self._client_finished)
        call.addBoth(self._outcome)

    def _client_finished(self, reason: Optional[Failure]) -> None:
        if reason is None:
            return
        if self.answered:
            self.stop()
        else:
            # Connecting, or waiting for the head (maybe on a retry):
            # cancelling reaches whichever Deferred is pending.
            self.client_gone = True
            self.call.cancel()

    def _outcome(self, result: Any) -> None:
        try:
            if isinstance(result, Failure):
                self._answer_failure(result)
            else:
                self._copy_head(result)
        except BaseException:
            self._unexpected(Failure())

    def _copy_head(self, head: ResponseHead) -> None:
        request = self._request
        if self._exchange is not None:
            self._exchange.upstream_answered()
        if self.client_gone or request.finished:
            # (finished: the gateway refused the rest of a streamed body.)
            # Nobody waits for this answer: stop it now, which closes that
            # connection, rather than read its body into nothing.
            self.stop()
            return
        request.setResponseCode(head.status, head.reason)
        out = request.responseHeaders
        copy_fields(out, head.headers.items(), _RESPONSE_DROP, head.connection)
        if request.cookies:  # an allow's auth cookies (allow_cookies)
            merge_into_response(request)
        # HEAD keeps the upstream's own Content-Length (in head.headers); 204 must
        # have none and a 304's describes the 200 it stands for: never an invented 0.
        length = head.length  # an int, or UNKNOWN_LENGTH
        if isinstance(length, int) and request.method != b"HEAD" and head.status not in _NO_BODY_CODES:
            fields_of(out)[_CONTENT_LENGTH] = [b"%d" % length]
        self.relay()

    def _answer_failure(self, failure: Failure) -> None:
        self.stop_timer()
        request = self._request
        if self.client_gone or request.finished:
            return
        if self._exchange is not None:
            self._exchange.upstream_failed()
        if self.timed_out or failure.check(net_error.TimeoutError):
            status = 504
            reason = "timeout"
        else:
            status = 502
            reason = describe_failure(failure)
        log.warn("upstream {node} failed: {err}", node=self.node.netloc, err=reason)
        send_simple(request, status)

    def _unexpected(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            return
        request = self._request
        log.failure("unexpected error in the upstream leg", failure)
        self.stop()
        if not request.finished and not request.startedWriting:
            # _copy_head may have copied the upstream's headers already
            # (Set-Cookie, Content-Encoding...): none of them may go out
            # with a 502 the gateway made up.
            request.responseHeaders = Headers()
            send_simple(request, 502)

    def again(self) -> None:
        """A retry on another node: it has its own head deadline."""
        self._head_waits.restart(self._head_late)

    @property
    def answered(self) -> bool:
        """The head is in: the body is (or was) on its way."""
        return self._upstream is not None

    def _head_late(self) -> None:
        self.timed_out = True
        self.call.cancel()

    def _body_stalled(self) -> None:
        self.timed_out = True
        log.warn("upstream read timed out in the body; aborting the client connection")
        self._upstream.stopProducing()

    def stop_timer(self) -> None:
        """No more waiting: the exchange failed or is over."""
        self._head_waits.remove(self._head_late)
        self._body_waits.remove(self._body_stalled)

    def body_start(self, upstream: Any, head: ResponseHead) -> ResponseHead:
        self._upstream = upstream
        return head

    def relay(self) -> None:
        """Start passing the body on (the head has been copied)."""
        self._request.registerProducer(self, True)
        self._relaying = True
        self._head_waits.remove(self._head_late)
        self._body_waits.add(self._body_stalled)

    def body_data(self, data: bytes) -> None:
        if self.client_gone:
            return
        self._body_waits.restart(self._body_stalled)
        self._request.write(data)

    def stop(self) -> None:
        """The client went away: stop the upstream transfer."""
        self.client_gone = True
        self.stop_timer()
        if self._upstream is not None:
            self._upstream.stopProducing()

    # IPushProducer, for the client's side

    def pauseProducing(self) -> None:
        self._upstream.pauseProducing()

    def resumeProducing(self) -> None:
        self._upstream.resumeProducing()

    def stopProducing(self) -> None:
        # The server stops its producer when the client's connection is lost.
        self.stop()

    def body_done(self, reason: Optional[Failure]) -> None:
        self.stop_timer()
        request = self._request
        if self.client_gone or not self._relaying:
            return
        request.unregisterProducer()
        if reason is None:
            request.finish()
        else:
            # The status line has gone out: the only honest signal left is
            # to abort, so the client never takes a truncated body as whole.
            if not self.timed_out:  # already said, and "closed" would be wrong
                log.warn("upstream failed mid-body: {err}", err=describe_failure(reason))
            transport = request.channel.transport if request.channel else None
            if transport is not None:
                abort = getattr(transport, "abortConnection", None)
                (abort or transport.loseConnection)()


class _Retries:
    """
    Which node one request tries next after a connection failure
    (L{connect_failed}): the balancer's next node not tried yet, while
    C{retries} and C{retry_timeout} allow, as APISIX's balancer does; none
    after any other failure.
    """

    def __init__(self, reactor: IReactorTime, balancer: Balancer, conf: UpstreamConf, node: Node, key: object) -> None:
        self._reactor = reactor
        self._balancer = balancer
        self._key = key
        self._tried = {node}
        self._left = conf.tries - 1
        self._deadline = reactor.seconds() + conf.retry_timeout if conf.retry_timeout > 0 else None

    def next_node(self, failure: Failure) -> Optional[Node]:
        """The node to try after C{failure}, or C{None}: the request failed."""
        if self._left <= 0 or not connect_failed(failure):
            return None
        if self._deadline is not None and self._reactor.seconds() > self._deadline:
            log.warn("upstream: retry_timeout passed after {count} tries", count=len(self._tried))
            return None
        node = self._balancer.pick(self._key, self._tried)
        if node is not None:
            self._left -= 1
            self._tried.add(node)
        return node


class _Tries:
    """
    One request's tries of an upstream with more than one node, the next
    one chosen by L{_Retries}.

    @ivar result: fires with the answering try's head, or fails with the
        last failure; cancelling it cancels the try in progress.
    """

    def __init__(self, retries: _Retries, first: "Deferred[Any]", send: Callable[[Node, str], "Deferred[Any]"]) -> None:
        self._retries = retries
        self._send = send
        self._current = first
        self.result: "Deferred[Any]" = Deferred(lambda _: self._current.cancel())
        self._follow(first)

    def _follow(self, d: "Deferred[Any]") -> None:
        self._current = d
        d.addCallbacks(self._answered, self._failed)

    def _answered(self, head: Any) -> None:
        if not self.result.called:
            self.result.callback(head)

    def _failed(self, failure: Failure) -> None:
        if self.result.called:  # cancelled
            return
        node = self._retries.next_node(failure)
        if node is None:
            self.result.errback(failure)
        else:
            self._follow(self._send(node, describe_failure(failure)))


def _hash_key(conf: UpstreamConf) -> Callable[[InboundRequest], str]:
    """
    The C{chash} key of a request, as APISIX's C{fetch_chash_hash_key}:
    the variable, header or cookie C{key} names (or the C{vars_combinations}
    template), and the client's address when the request has none.
    """
    key = conf.key or ""
    if conf.hash_on == "vars_combinations":
        template = compile_template(key)

        def combined(inbound: InboundRequest) -> str:
            value = template.render(RequestVariables.for_request(inbound))
            return value or inbound.remote_addr

        return combined
    name = {"header": "http_" + key.lower().replace("-", "_"), "cookie": "cookie_" + key}.get(conf.hash_on, key)

    def one(inbound: InboundRequest) -> str:
        value = RequestVariables.for_request(inbound).lookup(name)
        return value if isinstance(value, str) and value else inbound.remote_addr

    return one


class UpstreamProxy:
    """
    Sends allowed requests to one upstream's nodes.

    @param pool: the upstream L{fauth.wire.pool.StrictConnectionPool}, shared by
        every upstream (keyed per scheme, host and port inside).
    """

    def __init__(
        self, conf: UpstreamConf, reactor: IClientReactor, pool: HTTPConnectionPool, trust_root: Any = None
    ) -> None:
        self.conf = conf
        self._reactor = reactor
        self._balancer = Balancer(conf.type, conf.nodes)
        self._tries = conf.tries
        self._counted = conf.type == "least_conn"
        # One node: no balancer, no retries, no per-request work for either
        # (least_conn still counts, as APISIX's does for a later scale-out).
        self._single = self._balancer.single if not self._counted else None
        self._hash_key = _hash_key(conf) if conf.type == "chash" else None
        self._connector = Connector(
            reactor, pool, tls_policy(conf.tls_verify, trust_root), conf.timeout.connect
        )
        self._scheme = conf.scheme.encode("ascii")
        # The waits for an answer's head, and between its body's reads.
        self._head_waits = Deadlines(reactor, conf.timeout.send + conf.timeout.read)
        self._body_waits = Deadlines(reactor, conf.timeout.read)
        self._rewrite_host = (conf.upstream_host or "").encode("idna") if conf.pass_host == "rewrite" else None
        self._host_of_node = conf.pass_host == "node"
        # Per node: the host to connect to and the netloc for Host, encoded once.
        self._wire: Dict[Node, Tuple[bytes, bytes]] = {
            node: (node.host.encode("idna"), node.netloc.encode("idna")) for node in conf.nodes
        }
        # (Hashing an attrs Node per request costs more than it looks.)
        self._single_wire = self._wire[self._single] if self._single is not None else (b"", b"")
        limit = getattr(pool, "limit", None)  # a StrictConnectionPool's keepalive_pool
        if limit is not None:
            for node, (host, _) in self._wire.items():
                limit((self._scheme, host, node.port), conf.keepalive_pool,
                      conf.keepalive_idle_timeout, conf.keepalive_requests)

    def _pick(self, request: Any, inbound: InboundRequest) -> Tuple[Node, object]:
        """The first node for C{request}, and its hash key (C{chash})."""
        if self._single is not None:
            return self._single, None
        key = self._hash_key(inbound) if self._hash_key is not None else None
        node = self._balancer.pick(key)
        assert node is not None  # nothing tried yet, and an upstream has a node
        return node, key

    def _head(
        self, request: Any, inbound: InboundRequest, netloc: bytes, length: Optional[int], chunked: bool = False
    ) -> bytes:
        incoming = request.requestHeaders
        fields = fields_of(incoming)
        host = self._rewrite_host
        if host is None:
            host = netloc if self._host_of_node else (fields.get(_HOST) or [netloc])[0]
        # One join of the head's pieces, in request_head's layout (names and
        # values are checked already: no CR or LF).
        parts = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (request.method, wire_target(inbound.upstream_target), host)]
        if length is not None:
            parts.append(b"Content-Length: %d\r\n" % length)
        elif chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        listed = connection_listed(incoming) if fields.get(_CONNECTION) else None
        drop = _REQUEST_DROP | listed if listed else _REQUEST_DROP
        forwarded: Sequence[bytes] = ()
        for name, values in fields.items():
            lower = name.lower()
            if lower not in drop:
                for value in values:
                    parts.append(b"%s: %s\r\n" % (name, value))
            elif lower == b"x-forwarded-for":
                forwarded = values
        client = inbound.remote_addr.encode("latin-1")
        peer = client
        if inbound.proxied is not None:
            # trusted_proxies: a trusted peer's chain goes on with the peer
            # appended; an untrusted peer's is dropped (as Caddy does).
            peer = (getattr(request.getClientAddress(), "host", None) or "unix:").encode("latin-1")
            if not inbound.proxied.peer_trusted:
                forwarded = ()
        parts.append(
            _FORWARDED
            % (
                b", ".join([*forwarded, peer]) if forwarded else peer,
                client,
                inbound.scheme.encode("ascii"),
                inbound.host.encode("latin-1"),
                inbound.server_port,
            )
        )
        return b"".join(parts)

    def _body(self, request: Any, inbound: InboundRequest) -> Tuple[Optional[bytes], Any]:
        if getattr(request, "dispatched", False) and request.content is None:
            # Dispatched on its head (fauth.edge.server.HardenedRequest):
            # the body streams from the client, or, when it is all in
            # already, goes in one piece with its length.
            if request.body_complete:
                return request.take_pending(), None
            upload = StreamUpload(request.body_length, _ClientBody(request))
            request.stream_body(upload, start=False)
            return None, upload
        content = request.content
        size = inbound.body_length()
        if size == 0:
            if request.method in _BODY_METHODS or _CONTENT_LENGTH in fields_of(request.requestHeaders):
                return b"", None
            return None, None
        if isinstance(content, BytesIO):
            return content.getvalue(), None
        content.seek(0)
        return None, FileUpload(content, size)

    # -- hook for fauth.upstream.tunnel (WebSocket) ---------------------------

    def tunnel_target(self, request: Any, inbound: InboundRequest) -> Tuple[Any, bytes, str, Any]:
        """
        The next node for an upgrade, never through the pool: its endpoint,
        the request head (hop-by-hop fields dropped, as for any request; the
        tunnel adds its own C{Upgrade} and C{Connection}), its netloc, and
        C{None} or, with more than one try, C{next_target(failure)}: the
        same three for the next node after a connection failure (the rules
        of L{_Retries}), or C{None}.
        """
        node, key = self._pick(request, inbound)
        current = [node]
        if self._counted:
            when_finished(request, lambda _: self._balancer.release(current[0]))
        if self._tries == 1:
            return self._tunnel_to(request, inbound, node) + (None,)
        retries = _Retries(self._reactor, self._balancer, self.conf, node, key)

        def next_target(failure: Failure) -> Optional[Tuple[Any, bytes, str]]:
            next_node = retries.next_node(failure)
            if next_node is None:
                return None
            if self._counted:
                self._balancer.release(current[0])
            current[0] = next_node
            return self._tunnel_to(request, inbound, next_node)

        return self._tunnel_to(request, inbound, node) + (next_target,)

    def _tunnel_to(self, request: Any, inbound: InboundRequest, node: Node) -> Tuple[Any, bytes, str]:
        host, netloc = self._wire[node]
        endpoint = self._connector.endpoint(self._scheme, host, node.port)[1]
        return endpoint, self._head(request, inbound, netloc, None), node.netloc

    # -- end of hook -----------------------------------------------------------

    def forward(self, request: Any, inbound: InboundRequest, exchange: Any = None) -> None:
        """
        Proxy C{request} to the next node and stream the answer back.

        @param exchange: a L{fauth.observe.exchange.Exchange} to time the upstream
            leg, or C{None}.
        """
        single = self._single
        if single is not None:
            node, key = single, None
            host, netloc = self._single_wire
        else:
            node, key = self._pick(request, inbound)
            host, netloc = self._wire[node]
        body, upload = self._body(request, inbound)
        length = len(body) if body is not None else (upload.length if upload is not None else None)
        chunked = upload is not None and length is None
        relay = _Relay(request, self._head_waits, self._body_waits, node, exchange)
        head = self._head(request, inbound, netloc, length, chunked)
        outgoing = ClientRequest(request.method, head, relay, body, upload)
        if exchange is not None:
            exchange.upstream_started()
        if self._tries == 1:
            d = self._connector.request(self._scheme, host, node.port, outgoing)
        else:

            def send(next_node: Node, last_error: str) -> "Deferred[Any]":
                node = relay.node
                log.warn(
                    "upstream {node} failed: {err}; trying {next}",
                    node=node.netloc, err=last_error, next=next_node.netloc,
                )
                if self._counted:
                    self._balancer.release(node)
                relay.node = next_node
                host, netloc = self._wire[next_node]
                # pass_host: node names the node tried (APISIX recreates the request).
                retry = outgoing
                if self._host_of_node:
                    head = self._head(request, inbound, netloc, length, chunked)
                    retry = ClientRequest(request.method, head, relay, body, upload)
                relay.again()
                return self._connector.request(self._scheme, host, next_node.port, retry)

            first = self._connector.request(self._scheme, host, node.port, outgoing)
            d = _Tries(_Retries(self._reactor, self._balancer, self.conf, node, key), first, send).result
        if self._counted:
            when_finished(request, lambda _: self._balancer.release(relay.node))
        relay.follow(d)
