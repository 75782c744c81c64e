"""
L{fauth.edge.request.HardenedRequest}'s first write: the head joined with
the first piece of the body in one write when Twisted's own write would
only frame and write them, byte for byte what Twisted writes.
"""
from __future__ import annotations

import itertools
from typing import Any, List, Sequence, Tuple

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web import server
from twisted.web.resource import Resource

from fauth.config import HttpLimits
from fauth.edge.request import HardenedRequest
from fauth.edge.server import HardenedSite


class Answer(Resource):
    """Answers with C{code}, C{fields} and the body in C{pieces} (written one by one)."""

    isLeaf = True

    def __init__(self, code: int, fields: Sequence[Tuple[bytes, List[bytes]]], pieces: Sequence[bytes]) -> None:
        super().__init__()
        self.code, self.fields, self.pieces = code, fields, pieces

    def render(self, request: Any) -> Any:
        request.responseHeaders.removeHeader(b"date")  # the same bytes on both sides
        request.setResponseCode(self.code)
        for name, values in self.fields:
            request.responseHeaders.setRawHeaders(name, values)
        for piece in self.pieces:
            request.write(piece)
        request.finish()
        return server.NOT_DONE_YET


class Plain(HardenedRequest):
    defaultContentType = None
    joined = False

    def _write_head(self, data: bytes) -> None:
        self.joined = True
        super()._write_head(data)


class ByTwisted(Plain):
    """Twisted's write throughout."""

    def _plain_head(self) -> bool:
        return False


def exchange(factory: Any, resource: Resource, wire: bytes) -> Tuple[bytes, List[Any]]:
    site = HardenedSite(resource, HttpLimits(), reactor=MemoryReactorClock())
    site.requestFactory = factory
    site.log = lambda request: None  # type: ignore[method-assign]
    made: List[Any] = []

    def record(*args: Any, **kwargs: Any) -> Any:
        request = factory(*args, **kwargs)
        made.append(request)
        return request

    site.requestFactory = record
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
    channel.makeConnection(transport)
    channel.dataReceived(wire)
    return transport.value(), made


CASES = list(
    itertools.product(
        [b"GET", b"HEAD"],
        [b"HTTP/1.1", b"HTTP/1.0"],
        [200, 204, 304, 404],
        [
            [],
            [(b"content-length", [b"4"])],
            [(b"content-length", [b"0"]), (b"x-twice", [b"a", b"b"])],
            [(b"set-cookie", [b"a=1", b"b=2"]), (b"content-type", [b"text/plain"])],
            [(b"transfer-encoding", [b"gzip"])],
        ],
        [[b"body"], [], [b"", b"body"], [b"bo", b"dy"]],
    )
)


@pytest.mark.parametrize("method, version, code, fields, pieces", CASES)
def test_the_joined_first_write_writes_what_twisted_writes(
    method: bytes, version: bytes, code: int, fields: Any, pieces: List[bytes]
) -> None:
    wire = b"%s /x HTTP/1.1\r\nHost: a.test\r\n\r\n%s /y %s\r\nHost: a.test\r\n\r\n" % (method, method, version)
    resource = Answer(code, fields, pieces)
    joined, made = exchange(Plain, resource, wire)
    expected, _ = exchange(ByTwisted, resource, wire)
    assert joined == expected
    assert joined.count(b" %d " % code) == 2
    assert [request.joined for request in made] == [True, True]


def test_the_joined_write_is_one_transport_write() -> None:
    writes: List[bytes] = []

    class Counting(StringTransport):
        def write(self, data: bytes) -> None:
            writes.append(data)
            super().write(data)

        def writeSequence(self, data: Any) -> None:
            writes.append(b"".join(data))
            super().writeSequence(data)

    site = HardenedSite(Answer(200, [(b"content-length", [b"4"])], [b"body"]), HttpLimits(), reactor=MemoryReactorClock())
    site.requestFactory = Plain
    site.log = lambda request: None  # type: ignore[method-assign]
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    channel.makeConnection(Counting(peerAddress=IPv4Address("TCP", "127.0.0.1", 1)))
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert len(writes) == 1
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"\r\nContent-Length: 4\r\n\r\nbody")


@pytest.mark.parametrize(
    "change",
    [
        lambda request: request.addCookie(b"a", b"1"),
        lambda request: request.setETag(b'"e"'),
        lambda request: request.setLastModified(1),
        lambda request: setattr(request, "defaultContentType", b"text/html"),
    ],
)
def test_what_twisted_adds_to_a_head_still_goes_out(change: Any) -> None:
    class Changed(Answer):
        def render(self, request: Any) -> Any:
            change(request)
            return super().render(request)

    wire = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
    resource = Changed(200, [], [b"body"])
    joined, made = exchange(Plain, resource, wire)
    expected, _ = exchange(ByTwisted, resource, wire)
    assert joined == expected and not made[0].joined
    assert any(name in joined for name in (b"Set-Cookie: a=1", b"ETag:", b"Last-Modified:", b"Content-Type: text/html"))


