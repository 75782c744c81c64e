"""
L{fauth.edge.server.HardenedHTTPChannel} on a memory reactor: its one
deadline timer per connection, and the one-pass check of a head's fields.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from fauth.config import HttpLimits
from fauth.edge.server import HardenedHTTPChannel, HardenedSite

GET = b"GET / HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\n"


class Ok(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"ok"


def serve(
    limits: HttpLimits = HttpLimits(header_timeout=10, body_timeout=60), resource: Optional[Resource] = None
) -> Tuple[MemoryReactorClock, HardenedHTTPChannel, StringTransport]:
    clock = MemoryReactorClock()
    site = HardenedSite(resource or Ok(), limits, reactor=clock)
    site.log = lambda request: None  # type: ignore[method-assign]
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
    channel.makeConnection(transport)
    return clock, channel, transport


def deadline_timers(clock: MemoryReactorClock, channel: HardenedHTTPChannel) -> List[Any]:
    return [call for call in clock.getDelayedCalls() if getattr(call.func, "__self__", None) is channel and call.func.__name__ == "_check_deadline"]


def test_one_deadline_timer_serves_every_request_of_a_connection() -> None:
    clock, channel, transport = serve()
    first = deadline_timers(clock, channel)
    assert len(first) == 1
    for _ in range(50):
        channel.dataReceived(GET)
        clock.advance(0.01)
    assert transport.value().count(b"HTTP/1.1 200 OK") == 50
    # No callLater and cancel per request: still the same single timer,
    # the idle timeout's too (Twisted's TimeoutMixin would arm one per request).
    assert deadline_timers(clock, channel) == first
    assert clock.getDelayedCalls() == first


class Pending(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: List[Any] = []

    def render(self, request: Any) -> Any:
        self.requests.append(request)
        return NOT_DONE_YET


def test_an_idle_connection_closes_after_the_idle_timeout() -> None:
    clock, channel, transport = serve(HttpLimits(header_timeout=10, body_timeout=60, idle_timeout=30))
    channel.dataReceived(GET)
    assert b"200 OK" in transport.value()
    clock.advance(29.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting
    assert transport.value().count(b"HTTP/1.1") == 1  # closed, nothing said


def test_data_restarts_the_idle_timeout() -> None:
    clock, channel, transport = serve(HttpLimits(header_timeout=100, body_timeout=60, idle_timeout=5))
    for piece in (b"GET / HT", b"TP/1.1\r\n", b"Host: a", b".test\r\n"):
        clock.advance(4)
        channel.dataReceived(piece)
    assert not transport.disconnecting  # 16 s, but never 5 without data
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting and transport.value() == b""


def test_no_idle_timeout_while_a_request_is_handled() -> None:
    pending = Pending()
    clock, channel, transport = serve(HttpLimits(idle_timeout=5), pending)
    channel.dataReceived(GET)
    clock.advance(100)  # the resource takes its time
    assert not transport.disconnecting
    (request,) = pending.requests
    request.write(b"late")
    request.finish()
    clock.advance(4.9)  # idle from the end of the answer
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


def test_the_timer_rearms_for_a_head_started_later() -> None:
    clock, channel, transport = serve()
    clock.advance(9)
    channel.dataReceived(GET)  # a request in time: between requests, only the idle timeout
    clock.advance(5)  # the first arming comes due: re-armed for the idle timeout alone
    assert [call.getTime() for call in deadline_timers(clock, channel)] == [9 + HttpLimits().idle_timeout]
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: a")  # a head started at t=14
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.2)  # ten seconds after the head started
    assert transport.value().endswith(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert transport.disconnecting


def test_a_body_deadline_then_a_head_deadline() -> None:
    clock, channel, transport = serve(HttpLimits(header_timeout=10, body_timeout=3))
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\n\r\nab")
    clock.advance(2.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert b"408" in transport.value() and transport.disconnecting


def test_the_timer_goes_with_the_connection() -> None:
    clock, channel, transport = serve()
    channel.connectionLost(None)
    assert deadline_timers(clock, channel) == []


@pytest.mark.parametrize(
    "head, status",
    [
        (b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Ok: fine\tvalue\r\n\r\n", b"200"),
        (b"GET / HTTP/1.1\r\nHost: a.test\r\n folded\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost : a.test\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: a.test\r\nX: a\x01b\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: a.test\r\nno colon\r\n\r\n", b"400"),
    ],
)
def test_fields_checked_in_one_pass_or_line_by_line_answer_the_same(head: bytes, status: bytes) -> None:
    # Whole head in one read (one pass) and byte by byte (line by line).
    for pieces in ([head], [head[i : i + 1] for i in range(len(head))]):
        _, channel, transport = serve()
        for piece in pieces:
            channel.dataReceived(piece)
        assert transport.value().startswith(b"HTTP/1.1 " + status), (pieces[0], transport.value()[:60])


@pytest.mark.parametrize("extra, status", [(3, b"200"), (4, b"431")])
def test_field_limits_hold_in_one_pass(extra: int, status: bytes) -> None:
    # max_headers 4: Host plus three more is the limit.
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(extra))
    _, channel, transport = serve(HttpLimits(max_headers=4))
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: a.test\r\n" + fields + b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 " + status)
