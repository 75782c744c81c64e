# -*- test-case-name: tests.admin.test_reload -*-
"""Counting the requests in flight, so a shutdown can wait for them."""
from __future__ import annotations

from typing import Any, List, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from fauth.request.lifecycle import when_finished

__all__ = ["InFlight"]


class InFlight:
    """
    Requests between the start of their rendering and their end (response
    finished, or client gone).

    @ivar count: how many are in flight now.
    """

    def __init__(self) -> None:
        self.count = 0
        self._waiting: List[Deferred[None]] = []

    def track(self, request: Any) -> None:
        """Count C{request} until it is finished or its client is gone."""
        self.count += 1
        when_finished(request, self._finished)

    def _finished(self, reason: Optional[Failure]) -> None:
        # A client that went away is simply no longer in flight.
        self.count -= 1
        if self.count == 0 and self._waiting:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def idle(self) -> "Deferred[None]":
        """
        A L{Deferred} firing when no request is in flight (at once if none
        is).  Cancelling it (e.g. by C{addTimeout}) stops the wait.
        """
        if self.count == 0:
            return succeed(None)
        d: Deferred[None] = Deferred(self._waiting.remove)
        self._waiting.append(d)
        return d
