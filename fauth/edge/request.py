# -*- test-case-name: tests.edge.test_head_dispatch,tests.edge.test_server_gaps -*-
"""
L{HardenedRequest}: the request of the hardened server (L{fauth.edge.server}).
A request whose resource decides on the head (C{handles_heads}) is
dispatched as soon as its head is in, its body held back by the channel
until the resource wants it (L{HardenedRequest.want_body}), streams it to a
L{BodySink}, or refuses it; HTTP/1.0 keep-alive is answered as such.
"""
from __future__ import annotations

from typing import Any, List, Optional

from twisted.web import http, server
# Imported by name: every attribute read through the module goes through
# Twisted's deprecation proxy (a Python __getattribute__).
from twisted.web.http import NO_BODY_CODES, HTTPChannel, toChunk
from twisted.web.http_headers import Headers

#: Bytes of an unwanted request body (denied, refused, or answered early by
#: the upstream) read and dropped to keep the connection for the next
#: request, as nginx discards one; a longer body closes the connection.
DISCARD_LIMIT = 64 * 1024

__all__ = ["DISCARD_LIMIT", "BodySink", "HardenedRequest"]


class BodySink:
    """What a request body dispatched on its head is streamed to (L{HardenedRequest.stream_body})."""

    def body_data(self, data: bytes) -> None:
        """A piece of the body (de-chunked)."""

    def body_end(self) -> None:
        """The body is complete."""

    def body_abort(self) -> None:
        """The body will not be complete (larger than C{client_max_body_size})."""


class HardenedRequest(server.Request):
    """
    The request of a L{HardenedHTTPChannel}.

    B{Dispatch on the head.}  When the site's resource has a true
    C{handles_heads} attribute, a request with a body is processed as soon
    as its head is in (L{dispatched}), with C{content} C{None} and the body
    held back: nothing more is read from the client, and C{Expect:
    100-continue} is not answered, until the resource wants the body,
    through L{stream_body} (pieces passed on as they arrive, with
    L{pause_body} and L{resume_body} for backpressure).  A request answered
    before its body ended has the rest dropped (up to L{DISCARD_LIMIT},
    keeping the connection) or the connection closed
    (L{HardenedHTTPChannel.linger_close}).  Other resources get Twisted's
    behaviour: the whole body in C{content}, then C{process}.

    B{HTTP/1.0 keep-alive.}  An HTTP/1.0 request kept alive
    (L{HardenedHTTPChannel.checkPersistence}) is answered with
    C{Connection: keep-alive} when its length is known, else with
    C{Connection: close} and the connection closed after it (an HTTP/1.0
    body without a length ends with the connection).

    @ivar dispatched: processed on its head, the body still to come.
    @ivar body_complete: (when dispatched) the whole body has arrived.
    """

    keep_alive_http10 = False
    expect_continue = False
    dispatched = False
    body_complete = False
    body_received = 0
    body_dropped = 0
    _declared: Optional[int] = None
    _sink: Optional[BodySink] = None
    _dropping = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Twisted deletes .channel once the answer is done; the body may
        # still be arriving then.
        self._conn: Any = self.channel
        self._pending: List[bytes] = []

    # -- the head --------------------------------------------------------------

    def gotLength(self, length: Optional[int]) -> None:
        self._declared = length
        # Only a hardened channel (fauth.edge.server) can hold a body back.
        if length == 0 or not hasattr(self.channel, "hold_body"):
            super().gotLength(length)
        # else: head_received decides where the body goes

    def head_received(self, command: bytes, path: bytes, version: bytes) -> None:
        """Called by the channel when the head of a request with a body is in."""
        site = getattr(self._conn, "site", None)
        if site is None or not getattr(site.resource, "handles_heads", False):
            super().gotLength(self._declared)
            self.want_body()
            return
        # What requestReceived would set, for the resource to read now.
        self.method, self.uri, self.clientproto = command, path, version
        self.path, _, query = path.partition(b"?")
        self.args = http.parse_qs(query, 1) if query else {}
        self.dispatched = True
        self._conn.hold_body()
        self.process()

    def body_remaining(self) -> Optional[int]:
        """Bytes of the body still to come, or C{None} (chunked)."""
        if self._declared is None:
            return None
        return self._declared - self.body_received

    @property
    def body_length(self) -> Optional[int]:
        """The C{Content-Length} of the body, C{None} when chunked."""
        return self._declared

    # -- what the resource does with the body -----------------------------------

    def want_body(self) -> None:
        """Let the body come: C{100 Continue} first when it was asked for."""
        if self.expect_continue:
            self.expect_continue = False
            if not self.startedWriting and not self.finished and self._conn.transport is not None:
                self._conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._conn.release_body()

    def stream_body(self, sink: BodySink, start: bool = True) -> None:
        """
        Pass the body to C{sink} as it arrives (what arrived already at
        once), and its end; with C{start}, let it come (L{want_body}).
        """
        self._sink = sink
        pending, self._pending = self._pending, []
        for index, data in enumerate(pending):
            sink.body_data(data)
            if self._sink is not sink:
                # It handed the body back (hold_back): the rest waits behind.
                self._pending.extend(pending[index + 1 :])
                return
        if self.body_complete:
            sink.body_end()
        elif start:
            self.want_body()

    def process_with_body(self) -> None:
        """
        Go on as Twisted does after all: the whole body read into
        C{content}, then Twisted's C{requestReceived} (form arguments
        parsed) and C{process} again, where the resource finds what it
        decided on the head (L{fauth.edge.resources.ForwardAuthResource}).
        """
        self.dispatched = False
        server.Request.gotLength(self, self._declared)
        pending, self._pending = self._pending, []
        content = self.content
        assert content is not None  # gotLength made it
        for data in pending:
            content.write(data)
        if self.body_complete:
            server.Request.requestReceived(self, self.method, self.uri, self.clientproto)
        else:
            self.want_body()

    def hold_back(self, received: bytes) -> None:
        """
        Stop streaming to the sink and hold the body back again (read no
        more of it), with C{received} (what the sink took) put in front of
        what comes meanwhile: the next L{stream_body} sees the body from
        its first byte.
        """
        self._sink = None
        self._pending.insert(0, received)
        self.pause_body()

    def take_pending(self) -> bytes:
        """The body received so far and not passed on (for a body complete before it is wanted)."""
        pending, self._pending = self._pending, []
        return b"".join(pending)

    def pause_body(self) -> None:
        """Backpressure: read no more of the body for now."""
        if not self.body_complete:
            self._conn.hold_body()

    def resume_body(self) -> None:
        self.want_body()

    def drop_body(self) -> None:
        """
        Nobody wants the rest of the body (the upstream answered early, or
        failed): it is read and dropped, within the bounds of
        L{HardenedHTTPChannel.body_unwanted} once the answer is done.
        """
        if not self._dropping:
            self._dropping = True
            self._sink = None
            self._pending = []
            if not self.body_complete:
                self._conn.release_body()

    def handleContentChunk(self, data: bytes) -> None:
        self.body_received += len(data)
        limits = getattr(self._conn, "_limits", None)  # a hardened channel's
        limit = limits.client_max_body_size if limits is not None else 0
        if not self.dispatched:
            if self.content is None:
                return  # refused on its head by the channel (413): dropped
            if limit and self.body_received > limit:
                # A chunked body beyond client_max_body_size, read as
                # Twisted does (a resource without handles_heads, or after
                # process_with_body): nobody has answered yet.
                self.content = None
                self._conn.refuse(413)
                return
            super().handleContentChunk(data)
            return
        if self._dropping or self.finished:
            self._dropping = True
            self.body_dropped += len(data)
            if self.body_dropped > DISCARD_LIMIT:
                self._conn.linger_close()
            return
        if limit and self.body_received > limit:
            # A chunked body beyond client_max_body_size.
            self.refuse_body(413)
            return
        sink = self._sink
        if sink is None:
            self._pending.append(data)
        else:
            sink.body_data(data)

    def refuse_body(self, status: int) -> None:
        """
        The body will not be taken (too large, too slow): answer C{status}
        and close if nothing was answered yet, else abort the connection;
        then the sink, if any, is told (an upstream exchange is aborted,
        and finds the request finished).
        """
        sink, self._sink = self._sink, None
        self._dropping = True
        self._pending = []
        if not self._disconnected and not self.finished:
            if self.startedWriting:
                self._conn.transport.abortConnection()
            else:
                self.responseHeaders = Headers()
                self.setResponseCode(status)
                self.responseHeaders.setRawHeaders(b"content-length", [b"0"])
                self.responseHeaders.setRawHeaders(b"connection", [b"close"])
                self._conn.persistent = False
                self.finish()
        if sink is not None:
            sink.body_abort()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self.dispatched:
            super().requestReceived(command, path, version)
            return
        # The end of a body dispatched on its head: processed already.
        self.body_complete = True
        sink = self._sink
        if sink is not None and not self._dropping:
            sink.body_end()

    # -- answering -------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.startedWriting and self.dispatched and not self.body_complete:
            remaining = self.body_remaining()
            if self.expect_continue or remaining is not None and remaining > DISCARD_LIMIT and self._sink is None:
                # Answered while much of an unwanted body is still to come,
                # or before a 100 Continue the client waits for (it may
                # send the body or not: the next bytes cannot be told apart
                # from a next request): the connection closes after this.
                self.responseHeaders.setRawHeaders(b"connection", [b"close"])
                self._conn.persistent = False
        if self.keep_alive_http10 and not self.startedWriting:
            self.keep_alive_http10 = False
            if (
                self.responseHeaders.hasHeader(b"content-length")
                or self.method == b"HEAD"
                or self.code in http.NO_BODY_CODES
            ):
                self.responseHeaders.setRawHeaders(b"connection", [b"keep-alive"])
            else:
                self.responseHeaders.setRawHeaders(b"connection", [b"close"])
                self.channel.persistent = False
        if not self.startedWriting and self._plain_head():
            self._write_head(data)
            return
        server.Request.write(self, data)

    def _plain_head(self) -> bool:
        """
        Whether Twisted's first write would only frame the body and write
        the head as it is: an HTTP/1.x channel's own C{writeHeaders}, no
        content encoder or faked HEAD (L{server.Request.write}), no
        C{Content-Type} to default, and no C{lastModified}, C{etag} or
        C{cookies} to turn into fields first.
        """
        return (
            not self.finished
            and not self._disconnected
            and self.defaultContentType is None
            and self._encoder is None
            and not self._inFakeHead
            and not self.cookies
            and self.lastModified is None
            and self.etag is None
            and type(self.channel).writeHeaders is HTTPChannel.writeHeaders
        )

    def _write_head(self, data: bytes) -> None:
        """
        The first write in the L{_plain_head} case, as
        L{http.Request.write} does it, but with the head (which
        C{HTTPChannel.writeHeaders} hands the transport as four pieces a
        field, each checked and queued apart) joined with the first piece
        of the body into one write.
        """
        self.startedWriting = 1
        raw = self.responseHeaders._rawHeaders
        code = self.code
        no_body = self.method == b"HEAD" or code in NO_BODY_CODES
        if self.clientproto == b"HTTP/1.1" and not raw.get(b"Content-Length") and not no_body:
            raw[b"Transfer-Encoding"] = [b"chunked"]
            self.chunked = 1
        lines = [b"%s %d %s\r\n" % (self.clientproto, code, self.code_message)]
        for name, values in raw.items():
            for value in values:
                lines.append(b"%s: %s\r\n" % (name, value))
        lines.append(b"\r\n")
        if no_body:
            self.write = lambda data: None  # type: ignore[method-assign]  # as Twisted does
        elif data:
            self.sentLength += len(data)
            lines.extend(toChunk(data) if self.chunked else (data,))
        self.channel.write(b"".join(lines))

    def finish(self) -> None:
        if self.keep_alive_http10 and not self.startedWriting and not self.responseHeaders.hasHeader(b"content-length"):
            # Nothing written: the body is empty, and saying so keeps the connection.
            if self.method != b"HEAD" and self.code not in http.NO_BODY_CODES:
                self.responseHeaders.setRawHeaders(b"content-length", [b"0"])
        server.Request.finish(self)
