"""fauth.proxy._Relay's one timer: the head deadline, then the idle deadline between body chunks."""
from __future__ import annotations

from typing import Any, List, Optional

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from fauth.proxy import _Relay


class Upstream:
    def __init__(self) -> None:
        self.stopped = 0

    def stopProducing(self) -> None:
        self.stopped += 1


class ClientRequest:
    """What the relay touches of a server request."""

    channel = None

    def __init__(self) -> None:
        self.written: List[bytes] = []
        self.finished = False
        self.producers: List[Any] = []

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producers.append(producer)

    def unregisterProducer(self) -> None:
        self.producers.append(None)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def finish(self) -> None:
        self.finished = True


def relay_on(clock: Clock, response_timeout: float = 10.0, idle: float = 3.0) -> Any:
    request = ClientRequest()
    relay = _Relay(request, clock, response_timeout, idle)
    cancelled: List[Optional[Failure]] = []
    relay.call = Deferred(lambda d: cancelled.append(None))
    relay.call.addErrback(lambda f: None)
    return relay, request, cancelled


def test_no_head_within_send_plus_read_cancels_the_call() -> None:
    clock = Clock()
    relay, _, cancelled = relay_on(clock, response_timeout=10.0, idle=3.0)
    clock.advance(9.9)
    assert cancelled == [] and not relay.timed_out
    clock.advance(0.1)
    assert cancelled == [None] and relay.timed_out
    assert clock.getDelayedCalls() == []


def test_a_slow_but_steady_body_is_never_cut() -> None:
    clock = Clock()
    relay, request, _ = relay_on(clock, response_timeout=10.0, idle=3.0)
    upstream = Upstream()
    clock.advance(8)  # the head comes late, but in time
    relay.body_start(upstream)
    relay.relay()
    for _ in range(10):  # 20 s of body, a chunk every 2 s
        clock.advance(2)
        relay.body_data(b"x")
    assert upstream.stopped == 0 and not relay.timed_out
    # Then it stalls: cut exactly one idle timeout after the last chunk.
    clock.advance(2.9)
    assert upstream.stopped == 0
    clock.advance(0.1)
    assert upstream.stopped == 1 and relay.timed_out
    assert len(request.written) == 10


def test_the_end_of_the_body_stops_the_timer() -> None:
    clock = Clock()
    relay, request, _ = relay_on(clock)
    relay.body_start(Upstream())
    relay.relay()
    relay.body_data(b"ok")
    relay.body_done(None)
    assert request.finished and request.producers[-1] is None
    assert clock.getDelayedCalls() == []
