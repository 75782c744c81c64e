"""fauth.upstream.proxy._Relay's waits: the head deadline, then the idle deadline between body chunks."""
from __future__ import annotations

from typing import Any, List, Optional

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from fauth.config import Node
from fauth.wire.h1 import ReplyHeaders, ResponseHead
from fauth.testing import FakeRequest
from fauth.upstream.proxy import _Relay
from fauth.wire.deadlines import Deadlines

HEAD = ResponseHead(200, b"OK", ReplyHeaders(), 2, False, True, frozenset())


class Upstream:
    def __init__(self) -> None:
        self.stopped = 0

    def stopProducing(self) -> None:
        self.stopped += 1




def relay_on(clock: Clock, response_timeout: float = 10.0, idle: float = 3.0) -> Any:
    request = FakeRequest()
    relay = _Relay(request, Deadlines(clock, response_timeout), Deadlines(clock, idle), Node("127.0.0.1", 9))
    cancelled: List[Optional[Failure]] = []
    call: Deferred = Deferred(lambda d: cancelled.append(None))
    call.addErrback(lambda f: None)
    relay.start(call)
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
    assert relay.body_start(upstream, HEAD) is HEAD
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
    relay.body_start(Upstream(), HEAD)
    relay.relay()
    relay.body_data(b"ok")
    relay.body_done(None)
    assert request.finished and request.producers[-1] is None
    clock.advance(10)  # the timers find nothing left to time, and stop
    assert clock.getDelayedCalls() == [] and not relay.timed_out


def test_idle_deadline_after_a_late_head_when_send_exceeds_read() -> None:
    # send 10 + read 1: the head may take 11 s; once it is in, a stall must
    # still be cut after 1 s.
    clock = Clock()
    relay, _, _ = relay_on(clock, response_timeout=11.0, idle=1.0)
    upstream = Upstream()
    clock.advance(1.5)
    relay.body_start(upstream, HEAD)
    relay.relay()
    relay.body_data(b"0123456789")
    clock.advance(0.9)
    assert upstream.stopped == 0
    clock.advance(0.2)
    assert upstream.stopped == 1 and relay.timed_out


def test_many_relays_share_one_timer_per_wait() -> None:
    clock = Clock()
    heads, bodies = Deadlines(clock, 10.0), Deadlines(clock, 3.0)
    calls = []
    for _ in range(50):
        relay = _Relay(FakeRequest(), heads, bodies, Node("127.0.0.1", 9))
        call: Deferred = Deferred()
        call.addErrback(lambda f: None)
        relay.start(call)
        calls.append(call)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(10)
    assert all(call.called for call in calls)  # each one cancelled at its deadline


def test_the_server_stopping_the_relay_means_the_client_is_gone() -> None:
    clock = Clock()
    relay, request, _ = relay_on(clock)
    upstream = Upstream()
    relay.body_start(upstream, HEAD)
    relay.relay()
    assert request.producers == [relay]
    relay.stopProducing()
    assert relay.client_gone and upstream.stopped == 1
    # The failure the stopped upstream reports is not blamed on the upstream.
    relay.body_done(Failure(RuntimeError("aborted")))
    assert request.producers == [relay] and not request.finished
    clock.advance(10)
    assert clock.getDelayedCalls() == [] and not relay.timed_out and upstream.stopped == 1
