# -*- test-case-name: tests.wire.test_deadlines -*-
"""
L{Deadlines}: the timeouts of many waits of one length, on one reactor
timer.  Their deadlines come in the order the waits start, so the timer
only needs to be armed for the oldest wait still pending: starting and
ending a wait are a dict insert and a dict delete, where a reactor timer
per wait costs a heap push (comparisons in Python) and a cancel, per
request.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["Deadlines"]

log = Logger()


class Deadlines:
    """
    Expiry, C{timeout} seconds after it starts, for each wait not ended
    before then.
    """

    def __init__(self, reactor: IReactorTime, timeout: float) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._waiting: Dict[Callable[[], None], float] = {}  # in the order they started
        self._timer: Optional[IDelayedCall] = None

    def add(self, expire: Callable[[], None]) -> None:
        """Call C{expire} once C{timeout} seconds have passed, unless L{remove}d first."""
        self._waiting[expire] = self._reactor.seconds() + self._timeout
        if self._timer is None:
            self._timer = self._reactor.callLater(self._timeout, self._fire)

    def restart(self, expire: Callable[[], None]) -> None:
        """Start the wait C{expire} stands for over: it now ends C{timeout} seconds from now."""
        self._waiting.pop(expire, None)
        self.add(expire)

    def remove(self, expire: Callable[[], None]) -> None:
        """The wait C{expire} stood for has ended (also fine after it expired)."""
        # The timer stays: when it fires, it re-arms for whoever is oldest then.
        self._waiting.pop(expire, None)

    def _fire(self) -> None:
        self._timer = None
        now = self._reactor.seconds()
        waiting = self._waiting
        while waiting:
            expire, deadline = next(iter(waiting.items()))
            if deadline > now:
                if self._timer is None:  # (an expiry may have started another wait)
                    self._timer = self._reactor.callLater(deadline - now, self._fire)
                elif self._timer.getTime() > deadline:
                    self._timer.reset(deadline - now)
                return
            del waiting[expire]
            try:
                expire()
            except Exception:
                log.failure("while expiring a wait: {expire!r}", expire=expire)
