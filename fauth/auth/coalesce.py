# -*- test-case-name: tests.auth.test_cache,tests.auth.test_cache_e2e -*-
"""
Coalescing: one auth call shared by the identical requests that arrive
while it is in flight.

Each request holds a seat: a L{Deferred} of its own.  Cancelling a seat (its
client went away) only gives the seat up; the shared call goes on for the
others, and is cancelled when the last seat is given up.  An answer that
forbids reuse (C{Set-Cookie}, C{no-store}...) is not handed to the waiting
seats: each of them then makes its own call, with its own request (with a
narrowed C{cache.key}, requests that share a flight may still differ), as
without coalescing.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from fauth.auth.decision import Decision

__all__ = ["Flight", "Outcome"]


class Outcome:
    """
    What a shared call decided: C{first} for the request that started it,
    C{others} for those that joined (C{None}: they must ask on their own).
    """

    __slots__ = ("first", "others")

    def __init__(self, first: Decision, others: Optional[Decision]) -> None:
        self.first = first
        self.others = others


class _Seat:
    __slots__ = ("deferred", "first", "own", "retry")

    def __init__(self, first: bool, retry: Callable[[], "Deferred[Decision]"]) -> None:
        self.first = first
        self.retry = retry
        self.own: Optional[Deferred] = None
        self.deferred: Deferred = Deferred()


class Flight:
    """
    One auth call in flight and the requests waiting for it.

    @param forget: called once, when the flight stops taking new seats
        (answered, or cancelled by its last seat).
    """

    def __init__(self, forget: Callable[[], None]) -> None:
        self._forget = forget
        self._seats: List[_Seat] = []
        self._call: Optional[Deferred] = None
        self._landed = False

    @property
    def waiting(self) -> int:
        """Seats still waiting for the shared call."""
        return len(self._seats)

    def join(self, retry: Callable[[], "Deferred[Decision]"]) -> "Deferred[Decision]":
        """
        A seat: the first is the starter's; later ones are coalesced requests.

        @param retry: makes this seat's own call, of its own request (when
            the shared answer forbids reuse); fires with its L{Decision}.
        """
        seat = _Seat(not self._seats and self._call is None, retry)
        seat.deferred = Deferred(lambda _: self._leave(seat))
        self._seats.append(seat)
        return seat.deferred

    def start(self, call: "Deferred[Outcome]") -> None:
        """Share C{call} (after the first L{join}, so that an answer at once reaches its seat)."""
        self._call = call
        call.addBoth(self._land)

    def _leave(self, seat: _Seat) -> None:
        if seat.own is not None:
            seat.own.cancel()
            return
        if seat in self._seats:
            self._seats.remove(seat)
        if not self._seats and not self._landed and self._call is not None:
            # Nobody is waiting any more: a later identical request must
            # start a call of its own, not join this cancelled one.
            self._landed = True
            self._forget()
            self._call.cancel()

    def _land(self, result: Any) -> None:
        if self._landed:
            # Cancelled by its last seat: the failure is nobody's news.
            return None
        self._landed = True
        self._forget()
        seats, self._seats = self._seats, []
        for seat in seats:
            if isinstance(result, Failure):
                seat.deferred.errback(result)
            elif seat.first:
                seat.deferred.callback(result.first)
            elif result.others is not None:
                seat.deferred.callback(result.others)
            else:
                seat.own = own = seat.retry()
                own.addBoth(_settle, seat)
        return None


def _settle(result: Any, seat: _Seat) -> None:
    if seat.deferred.called:
        return
    if isinstance(result, Failure):
        seat.deferred.errback(result)
    else:
        seat.deferred.callback(result)
