# -*- test-case-name: tests.test_proxy -*-
"""
The upstream leg: a persistent pooled HTTP/1.1 Agent, bodies streamed with
backpressure, hop-by-hop headers dropped both ways.
"""
from __future__ import annotations

from io import BytesIO
from typing import Any, Optional

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator, NotPaused
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client as web_client
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from fauth.transport import BytesProducer, describe_failure, make_agent, tls_policy
from fauth.balancer import SmoothWeightedRoundRobin
from fauth.config import UpstreamConf
from fauth.headers import connection_listed, end_to_end_headers
from fauth.inbound import InboundRequest

__all__ = ["UpstreamProxy", "send_simple"]

log = Logger()

# Framing is redone for the upstream connection; Host is set per pass_host.
_REQUEST_DROP = frozenset([b"host", b"content-length", b"expect"])
_BODY_METHODS = frozenset([b"POST", b"PUT", b"PATCH"])
# Responses whose Content-Length, if any, is not the length of what follows.
_NO_BODY_CODES = frozenset([204, 304])


def send_simple(request: Any, status: int, body: bytes = b"", content_type: Optional[bytes] = None) -> None:
    """Answer with a fixed status and body (gateway-made responses)."""
    request.setResponseCode(status)
    if content_type is not None:
        request.responseHeaders.setRawHeaders(b"content-type", [content_type])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    if body:
        request.write(body)
    request.finish()


class _FileBody(web_client.FileBodyProducer):  # type: ignore[misc]
    """
    A request body the server spooled to a file (over 100 kB), streamed with
    backpressure, with two fixes over L{FileBodyProducer}:

      - a transport keeps its "producer paused" flag after the producer is
        unregistered, so after an in-memory body of more than 64 KiB on the
        same pooled connection, the first C{resumeProducing} comes unpaired:
        L{NotPaused} would fail the upload (502);
      - the upload ends with its last chunk, not one cooperator tick later:
        an upstream that answers as soon as it has the whole body would
        otherwise find the request still being written, the connection would
        be dropped instead of pooled, and that tick would read a file the
        server had closed when the answer was relayed.

    (An upstream that answers before taking the whole body is handled by
    L{fauth.transport}: the upload is stopped and the connection aborted.)
    """

    def resumeProducing(self) -> None:
        try:
            super().resumeProducing()
        except NotPaused:
            pass

    def _writeloop(self, consumer: Any) -> Any:
        remaining = self.length
        while remaining > 0:
            data = self._inputFile.read(min(self._readSize, remaining))
            if not data:
                break  # shorter than it was: the length check fails the request
            remaining -= len(data)
            consumer.write(data)
            if remaining > 0:
                yield None
        self._inputFile.close()


class _Relay(Protocol):
    """
    Streams the upstream body to the client.  The upstream transport is the
    client request's push producer, so a slow client pauses the upstream
    socket instead of growing a buffer.
    """

    def __init__(self, request: Any, reactor: Any, idle_timeout: float) -> None:
        self._request = request
        self._reactor = reactor
        self._idle_timeout = idle_timeout
        self._timer: Any = None
        self.client_gone = False
        self._timed_out = False

    def connectionMade(self) -> None:
        self._request.registerProducer(self.transport, True)
        self._timer = self._reactor.callLater(self._idle_timeout, self._idle)

    def _idle(self) -> None:
        log.warn("upstream read timed out in the body; aborting the client connection")
        self._timed_out = True
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.client_gone:
            return
        self._timer.reset(self._idle_timeout)
        self._request.write(data)

    def stop(self) -> None:
        """The client went away: stop the upstream transfer."""
        self.client_gone = True
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        request = self._request
        if self.client_gone:
            return
        request.unregisterProducer()
        if reason.check(web_client.ResponseDone, web_client.PotentialDataLoss):
            request.finish()
        else:
            # The status line has gone out: the only honest signal left is
            # to abort, so the client never takes a truncated body as whole.
            if not self._timed_out:  # already said, and "closed" would be wrong
                log.warn("upstream failed mid-body: {err}", err=describe_failure(reason))
            transport = request.channel.transport if request.channel else None
            if transport is not None:
                abort = getattr(transport, "abortConnection", None)
                (abort or transport.loseConnection)()


class _Discard(Protocol):
    """
    The body of an answer nobody waits for any more (the client left): stop
    the transfer at once, which closes that upstream connection, instead of
    reading the whole body into nothing.
    """

    def connectionMade(self) -> None:
        self.transport.stopProducing()


class UpstreamProxy:
    """
    Sends allowed requests to one upstream's nodes.

    @param pool: shared L{HTTPConnectionPool} (keyed per host:port inside).
    """

    def __init__(self, conf: UpstreamConf, reactor: Any, pool: Any, trust_root: Any = None) -> None:
        self.conf = conf
        self._reactor = reactor
        self._balancer = SmoothWeightedRoundRobin(conf.nodes)
        self._agent = make_agent(reactor, pool, tls_policy(True, trust_root), conf.timeout.connect)
        self._scheme = conf.scheme.encode("ascii")
        self._response_timeout = conf.timeout.send + conf.timeout.read
        self._cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
        self._rewrite_host = (conf.upstream_host or "").encode("idna") if conf.pass_host == "rewrite" else None

    def _headers(self, request: Any, inbound: InboundRequest, netloc: bytes) -> Headers:
        headers = Headers(dict(end_to_end_headers(request.requestHeaders, _REQUEST_DROP)))
        if self.conf.pass_host == "node":
            host = netloc
        elif self._rewrite_host is not None:
            host = self._rewrite_host
        else:
            host = request.requestHeaders.getRawHeaders(b"host", [netloc])[0]
        headers.setRawHeaders(b"host", [host])
        peer = inbound.remote_addr.encode("latin-1")
        forwarded = headers.getRawHeaders(b"x-forwarded-for")
        headers.setRawHeaders(
            b"x-forwarded-for", [b", ".join(forwarded + [peer]) if forwarded else peer]
        )
        headers.setRawHeaders(b"x-real-ip", [peer])
        headers.setRawHeaders(b"x-forwarded-proto", [inbound.scheme.encode("ascii")])
        headers.setRawHeaders(b"x-forwarded-host", [inbound.host.encode("latin-1")])
        headers.setRawHeaders(b"x-forwarded-port", [b"%d" % inbound.server_port])
        return headers

    def _body(self, request: Any, inbound: InboundRequest) -> Any:
        content = request.content
        size = inbound.body_length()
        if size == 0:
            if request.method in _BODY_METHODS or request.requestHeaders.hasHeader(b"content-length"):
                return BytesProducer(b"")
            return None
        if isinstance(content, BytesIO):
            return BytesProducer(content.getvalue())
        content.seek(0)
        return _FileBody(content, cooperator=self._cooperator)

    def forward(self, request: Any, inbound: InboundRequest, exchange: Any = None) -> None:
        """
        Proxy C{request} to the next node and stream the answer back.

        @param exchange: a L{fauth.metrics.Exchange} to time the upstream
            leg, or C{None}.
        """
        node = self._balancer.pick()
        netloc = node.netloc.encode("idna")
        url = b"%s://%s%s" % (self._scheme, netloc, inbound.upstream_target)
        headers = self._headers(request, inbound, netloc)
        relay = _Relay(request, self._reactor, self.conf.timeout.read)
        state = {"timed_out": False}
        if exchange is not None:
            exchange.upstream_started()
        d = self._agent.request(request.method, url, headers, self._body(request, inbound))

        def expire() -> None:
            state["timed_out"] = True
            d.cancel()

        timer = self._reactor.callLater(self._response_timeout, expire)

        def client_gone(_: Any) -> None:
            relay.client_gone = True
            if not d.called:
                d.cancel()
            else:
                relay.stop()

        request.notifyFinish().addErrback(client_gone)

        def got_response(response: Any) -> None:
            if timer.active():
                timer.cancel()
            if exchange is not None:
                exchange.upstream_answered()
            if relay.client_gone:
                response.deliverBody(_Discard())
                return
            request.setResponseCode(response.code, response.phrase)
            out = request.responseHeaders
            # The Agent keeps Connection out of response.headers (fauth.transport puts it back here).
            conn = getattr(response, "connection_headers", None)
            listed = connection_listed(conn) if conn is not None else ()
            for name, values in end_to_end_headers(response.headers, listed):
                out.setRawHeaders(name, values)
            # HEAD keeps the upstream's own Content-Length (in response.headers); 204 must
            # have none and a 304's describes the 200 it stands for: never an invented 0.
            if (
                response.length is not UNKNOWN_LENGTH
                and request.method != b"HEAD"
                and response.code not in _NO_BODY_CODES
            ):
                out.setRawHeaders(b"content-length", [b"%d" % response.length])
            response.deliverBody(relay)

        def failed(failure: Failure) -> None:
            if timer.active():
                timer.cancel()
            if relay.client_gone:
                return
            if exchange is not None:
                exchange.upstream_failed()
            if state["timed_out"] or failure.check(net_error.TimeoutError):
                status = 504
                reason = "timeout"
            else:
                status = 502
                reason = describe_failure(failure)
            log.warn(
                "upstream {node} failed: {err}", node=node.netloc, err=reason
            )
            send_simple(request, status)

        d.addCallbacks(got_response, failed)
        d.addErrback(self._unexpected, request)

    @staticmethod
    def _unexpected(failure: Failure, request: Any) -> None:
        if failure.check(CancelledError):
            return
        log.failure("unexpected error in the upstream leg", failure)
        if not request.finished and not request.startedWriting:
            # got_response may have copied the upstream's headers already
            # (Set-Cookie, Content-Encoding...): none of them may go out
            # with a 502 the gateway made up.
            request.responseHeaders = Headers()
            send_simple(request, 502)
