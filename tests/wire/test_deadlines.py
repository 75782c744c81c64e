"""L{fauth.wire.deadlines.Deadlines}: many waits of one length on one reactor timer."""
from __future__ import annotations

from typing import List

from twisted.internet.task import Clock

from fauth.wire.deadlines import Deadlines


def test_calls_time_out_in_turn_on_one_timer() -> None:
    clock = Clock()
    deadlines = Deadlines(clock, 3.0)
    expired: List[str] = []
    first, second, third = (lambda name=name: expired.append(name) for name in ("first", "second", "third"))
    deadlines.add(first)
    clock.advance(1)
    deadlines.add(second)
    clock.advance(1)
    deadlines.add(third)
    deadlines.remove(first)  # answered in time
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(1)  # t=3: the first's deadline, but it was answered
    assert expired == []
    clock.advance(1)  # t=4
    assert expired == ["second"]
    clock.advance(0.5)
    assert expired == ["second"]
    clock.advance(0.5)  # t=5
    assert expired == ["second", "third"]
    assert clock.getDelayedCalls() == []
    deadlines.add(first)  # a new call arms it again
    clock.advance(3)
    assert expired == ["second", "third", "first"]


def test_an_expiry_that_fails_does_not_stop_the_next() -> None:
    clock = Clock()
    deadlines = Deadlines(clock, 1.0)
    expired: List[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    deadlines.add(broken)
    deadlines.add(lambda: expired.append("next"))
    clock.advance(1)
    assert expired == ["next"]
