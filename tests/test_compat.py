"""
The private Twisted, treq and hyperlink names and behaviours fauth relies on.

Each holds in Twisted 25.5 (PyPy 3.9) and 26.10 (CPython 3.11) with the treq
and hyperlink releases that install beside them.  An upgrade that drops or
renames one fails here, by name, rather than somewhere deep in a proxy test.
"""
from __future__ import annotations

from typing import Any, List, Tuple

import pytest
from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints, tcp, unix
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web import _newclient, client, http, http_headers, server
from twisted.web.iweb import IAgent
from zope.interface import implementer

from fauth.wire.agent import BytesBody, NoCookies, PreEncodedURL, PreparedHeaders


@pytest.mark.parametrize(
    "owner, name",
    [
        # fauth.edge.server: the hardened server channel
        (http.HTTPChannel, "_maybeChooseTransferDecoder"),
        (http.HTTPChannel, "_respondToBadRequestAndDisconnect"),
        (http.HTTPChannel, "_finishRequestBody"),
        (http.HTTPChannel, "_abortingCall"),
        # fauth.edge.server: dispatch on the head, held bodies, 100 Continue
        # sent after an allow, bare LF in a buffered line, strict trailers
        (http.HTTPChannel, "_send100Continue"),
        (http._ChunkedTransferDecoder, "_dataReceived_TRAILER"),
        # fauth.edge.resources: whether the client has gone, and GatewayRequest.process
        (http.Request, "_disconnected"),
        (server.Request, "_handleStar"),
        # fauth.edge.request.HardenedRequest: when its first write may join
        # the head with the body (no content encoder, no faked HEAD)
        (server.Request, "_encoder"),
        (server.Request, "_inFakeHead"),
        (http, "_ChunkedTransferDecoder"),
        (http, "_MalformedChunkedDataError"),
        (http._ChunkedTransferDecoder, "_dataReceived_CHUNK_LENGTH"),
        # fauth.upstream.tunnel: taking the client's transport over from the
        # channel after a 101 (the hook twisted.web.websocket uses), and the
        # bytes the channel buffered while the request was handled
        (http.HTTPChannel, "_protocolUpgradeForWebsockets"),
        # fauth.edge.h2: Twisted's ALPN switch, redone to build the hardened
        # HTTP/2 connection
        (http, "_GenericHTTPChannelProtocol"),
        # fauth.wire.connection, fauth.wire.transport: the errors a client connection
        # fails with
        (_newclient, "_DataLoss"),
        (_newclient, "ParseError"),
        (_newclient, "RequestNotSent"),
        # fauth.wire.pool: the pool's connection factory (a documented instance
        # variable since 12.1, with its signature), new connections, the
        # quiescent callback's return (its own), and the wrapper that retries a
        # request once on a stale pooled connection; fauth.wire.agent:
        # Twisted's Request for a plain pool
        (client.HTTPConnectionPool, "_factory"),
        (client.HTTPConnectionPool, "_newConnection"),
        (client.HTTPConnectionPool, "_putConnection"),
        (client, "_RetryingHTTP11ClientProtocol"),
        (client, "_HTTP11ClientFactory"),
        (_newclient, "Request"),
        # fauth.wire.agent: an answer's Headers made from its parsed head
        (http_headers.Headers, "_rawHeaders"),
        # fauth.wire.agent: AnswerHeaders makes Headers' one slot on first use
        (http_headers.Headers, "_rawHeaders"),
        # fauth.config, fauth.process.service, fauth.process.sockets
        (endpoints, "_parseServer"),
        (StreamServerEndpointService, "_raiseSynchronously"),
        (tcp.Port, "_fromListeningDescriptor"),
        (unix.Port, "_fromListeningDescriptor"),
    ],
)
def test_private_name_exists(owner: object, name: str) -> None:
    assert hasattr(owner, name), "%s.%s is gone" % (getattr(owner, "__name__", owner), name)


def test_the_channel_state_the_hardened_server_reads() -> None:
    # fauth.edge.server reads these on a live channel (set per connection or
    # per request, so not on the class): the request line's parts, the
    # transport as producer, whether a request is being handled or the
    # transport is full, LineReceiver's buffer and re-entrancy flag, and the
    # chunked decoder's buffer (a bytearray).
    from twisted.internet.testing import StringTransport

    channel = http.HTTPChannel()
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"POST /x?a=1 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhe")
    for name in ("_networkProducer", "_waitingForTransport", "_handlingRequest", "_busyReceiving", "_buffer"):
        assert hasattr(channel, name), name
    assert (channel._command, channel._path) == (b"POST", b"/x?a=1")
    assert isinstance(channel._transferDecoder._buffer, bytearray)
    assert http.parse_qs(b"a=1&b=", 1) == {b"a": [b"1"], b"b": [b""]}


def test_bytes_after_a_head_in_the_same_read_go_straight_to_raw_data_received() -> None:
    # fauth.edge.server.HardenedHTTPChannel.rawDataReceived stops the body of
    # a head refused on its own (413) there: LineReceiver hands the rest of
    # the read to rawDataReceived after allHeadersReceived, without passing
    # through dataReceived again.
    from twisted.internet.testing import StringTransport

    seen: List[Tuple[str, bytes]] = []

    class Channel(http.HTTPChannel):
        def dataReceived(self, data: bytes) -> None:
            seen.append(("dataReceived", data))
            super().dataReceived(data)

        def rawDataReceived(self, data: bytes) -> None:
            seen.append(("rawDataReceived", data))
            super().rawDataReceived(data)

    channel = Channel()
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nbody")
    assert [name for name, _ in seen] == ["dataReceived", "rawDataReceived"]
    assert seen[1][1] == b"body"


def test_headers_keep_value_lists_in_raw_headers_under_their_canonical_name() -> None:
    # fauth.wire.fields reads and sets _rawHeaders under the name Headers
    # itself stores (found through a probe Headers), and the server writes
    # what is there.
    from twisted.internet.testing import StringTransport
    from twisted.web.http_headers import Headers

    headers = Headers()
    headers.setRawHeaders(b"x-request-id", [b"1"])
    assert headers._rawHeaders == {b"X-Request-Id": [b"1"]}
    headers._rawHeaders[b"ETag"] = [b'"a"', b'"b"']
    assert headers.getRawHeaders(b"etag") == [b'"a"', b'"b"']
    channel = http.HTTPChannel()
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", headers)
    assert transport.value() == b'HTTP/1.1 200 OK\r\nX-Request-Id: 1\r\nETag: "a"\r\nETag: "b"\r\n\r\n'


def test_a_fired_deferred_shows_its_result() -> None:
    # fauth.wire.transport.Connector.send reads a pooled connection off the
    # already-fired Deferred of getConnection.
    from twisted.internet.defer import succeed

    d = succeed("connection")
    assert d.called and d.result == "connection"


def test_the_pool_keeps_idle_connections_per_key_in_connections() -> None:
    # fauth.wire.pool.StrictConnectionPool keeps its idle connections there
    # (getConnection and _putConnection are its own), and
    # closeCachedConnections, Twisted's, closes them from there.
    pool = client.HTTPConnectionPool(Clock())
    assert pool._connections == {} and pool._timeouts == {}
    closing: List[str] = []

    class Idle:
        def abort(self) -> Deferred:
            closing.append("abort")
            return Deferred()

    pool._connections[("http", "h", 80)] = [Idle()]  # type: ignore[list-item]
    pool.closeCachedConnections()
    assert closing == ["abort"] and pool._connections == {}
    # The factory is called as (quiescentCallback, metadata).
    factory = client.HTTPConnectionPool._factory(lambda protocol: None, "metadata")
    assert factory.buildProtocol(None) is not None


def test_the_retrying_wrapper_takes_a_connection_and_a_way_to_a_new_one() -> None:
    # fauth.wire.pool.StrictConnectionPool.getConnection wraps a pooled
    # connection as Twisted's getConnection does: (connection, newConnection).
    sent: List[Any] = []

    class Connection:
        def request(self, request: Any) -> Deferred:
            sent.append(request)
            return Deferred()

    wrapper = client._RetryingHTTP11ClientProtocol(Connection(), lambda: Deferred())
    wrapper.request("r")
    assert sent == ["r"]


@implementer(IAgent)
class RecordingAgent:
    """Records what treq's wrappers hand the agent underneath."""

    def __init__(self) -> None:
        self.calls: List[Tuple[bytes, bytes, Any, Any]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred:
        self.calls.append((method, uri, headers, bodyProducer))
        return Deferred()


def test_treq_passes_a_pre_encoded_url_and_prepared_headers_through() -> None:
    # fauth.wire.agent: treq calls to_uri().to_text() on the URL, and its
    # ContentDecoderAgent copies the Headers (PreparedHeaders.copy keeps the
    # wire fields) before adding Accept-Encoding; the body goes through the
    # client's data_to_body_producer.
    agent = RecordingAgent()
    jar = NoCookies()
    http_client = HTTPClient(agent, cookiejar=jar, data_to_body_producer=BytesBody)
    url = PreEncodedURL.encode("http://auth.test:9999/verify?a=%7e&b=%2F")
    wire = ((b"Host", b"auth.test:9999"), (b"X-Forwarded-Uri", b"/x"))
    http_client.request(
        "POST", url, headers=PreparedHeaders(wire), data=b"body", cookies=jar,
        allow_redirects=False, unbuffered=True, reactor=Clock(),
    )
    ((method, uri, headers, body),) = agent.calls
    assert (method, uri) == (b"POST", b"http://auth.test:9999/verify?a=%7e&b=%2F")
    assert isinstance(headers, PreparedHeaders) and headers.wire == wire
    assert headers.hasHeader(b"accept-encoding")  # added by treq's wrapper, not sent by fauth
    assert isinstance(body, BytesBody) and body.body == b"body"


def test_treq_sends_a_copied_url_with_its_own_target() -> None:
    # PreEncodedURL.with_target (a forward-auth uri with variables) copies
    # the hyperlink URL and changes only its text: treq must send that text
    # and nothing of the parsed parts it was copied from.
    agent = RecordingAgent()
    jar = NoCookies()
    http_client = HTTPClient(agent, cookiejar=jar, data_to_body_producer=BytesBody)
    url = PreEncodedURL.encode("http://auth.test:9999/")
    http_client.request(
        "GET", url.with_target(b"/verify?uri=%2Fa%2520b"), headers=PreparedHeaders(()), cookies=jar,
        allow_redirects=False, unbuffered=True, reactor=Clock(),
    )
    ((_, uri, _, _),) = agent.calls
    assert uri == b"http://auth.test:9999/verify?uri=%2Fa%2520b"
    assert url.to_text() == "http://auth.test:9999/"


def test_treq_and_twisted_wrappers_keep_what_they_wrap_as_original() -> None:
    # fauth.wire.agent.as_sent walks .original beneath treq's response wrappers.
    from treq.response import _Response

    class Response:
        length = 0

    response = Response()
    assert _Response(response, NoCookies()).original is response
    assert client.GzipDecoder(response).original is response


def test_the_channel_buffers_bytes_after_a_request_in_data_buffer() -> None:
    # fauth.upstream.tunnel passes on what a client sent after its upgrade
    # request, before the takeover, from this list.
    channel = http.HTTPChannel()
    assert channel._dataBuffer == []


def test_the_generic_channel_keeps_what_the_http2_switch_reads() -> None:
    # fauth.edge.h2.NegotiatingChannel.dataReceived reads these, as Twisted's
    # own switch does, after the factory set them through the properties.
    protocol = http._GenericHTTPChannelProtocol(http.HTTPChannel())
    protocol.requestFactory = http.Request
    protocol.site = "site"
    protocol.factory = "factory"
    protocol.timeOut = 5
    protocol.callLater = "callLater"
    assert protocol._negotiatedProtocol is None
    assert (protocol._requestFactory, protocol._site, protocol._factory) == (http.Request, "site", "factory")
    assert (protocol._timeOut, protocol._callLater) == (5, "callLater")
    assert isinstance(protocol._channel, http.HTTPChannel)
    assert "_networkProducer" in http.HTTPChannel.connectionMade.__code__.co_names


def test_the_http2_connection_has_what_the_hardened_one_overrides() -> None:
    pytest.importorskip("h2")
    from twisted.web._http2 import H2Connection

    for name in ("_requestAborted", "_requestDone", "forceAbortClient", "abortTimeout", "_abortingCall"):
        assert hasattr(H2Connection, name), name
    connection = H2Connection(Clock())
    assert connection.conn.decoder is not None and hasattr(connection.conn, "local_settings")


def test_the_http2_seams_of_the_parity_with_http11() -> None:
    # fauth.edge.h2.HardenedH2Connection: the handlers it overrides and the
    # state it reads (per-stream queues, the stream's request, the flow
    # control hooks), and h2's frame buffer (an incomplete header block in
    # _headers_buffer, an incomplete frame in _data) and RequestReceived's
    # stream_ended (END_STREAM on the HEADERS frame).
    pytest.importorskip("h2")
    import h2.events
    from h2.frame_buffer import FrameBuffer
    from twisted.web._http2 import H2Connection, H2Stream

    for name in (
        "_requestReceived", "_requestDataReceived", "_requestEnded", "_streamIsActive", "_sendPrioritisedData",
        "openStreamWindow", "abortRequest", "_tryToWriteControlData", "writeDataToStream", "callLater",
    ):
        assert hasattr(H2Connection, name), name
    for name in ("flowControlBlocked", "windowUpdated"):
        assert hasattr(H2Stream, name), name
    connection = H2Connection(Clock())
    assert connection._outboundStreamQueues == {} and connection.streams == {}
    assert isinstance(connection.conn.incoming_buffer, FrameBuffer)
    buffer = FrameBuffer(server=True)
    assert buffer._headers_buffer == [] and buffer._data == bytearray()
    assert h2.events.RequestReceived(stream_id=1).stream_ended is None
    assert "self._request = requestFactory(self, queued=False)" in _source(H2Stream.__init__)


def _source(function: Any) -> str:
    import inspect

    return inspect.getsource(function)


def test_a_request_calls_back_its_notifications_when_finished_and_errs_them_back_when_lost() -> None:
    # fauth.request.lifecycle.when_finished puts its own object in
    # Request.notifications (a documented instance variable) rather than a
    # Deferred from notifyFinish: Twisted calls callback(None) on each entry
    # when the response is finished and errback(reason) when the connection
    # is lost first, and nothing else.
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure
    from twisted.web.test.requesthelper import DummyChannel

    class Entry:
        def __init__(self) -> None:
            self.calls: List[Tuple[str, Any]] = []

        def callback(self, result: Any) -> None:
            self.calls.append(("callback", result))

        def errback(self, reason: Any) -> None:
            self.calls.append(("errback", reason))

    finished, lost = server.Request(DummyChannel()), server.Request(DummyChannel())
    done, gone = Entry(), Entry()
    finished.notifications.append(done)
    lost.notifications.append(gone)
    finished.finish()
    reason = Failure(ConnectionLost())
    lost.connectionLost(reason)
    assert done.calls == [("callback", None)]
    assert gone.calls == [("errback", reason)]


def test_headers_keep_their_values_in_raw_headers_under_the_canonical_name() -> None:
    # fauth.edge.resources.GatewayRequest.process puts Server and Date
    # straight into a new response's Headers._rawHeaders.
    from twisted.web.http_headers import Headers

    headers = Headers()
    headers._rawHeaders[b"Server"] = [b"TwistedWeb/x"]
    headers.setRawHeaders(b"date", [b"Mon, 07 Dec 2026 19:35:30 GMT"])
    assert headers.getRawHeaders(b"server") == [b"TwistedWeb/x"]
    assert list(headers._rawHeaders) == [b"Server", b"Date"]
