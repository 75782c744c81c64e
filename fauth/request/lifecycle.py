# -*- test-case-name: tests.request.test_lifecycle -*-
"""
The end of a request, told to several parties through one entry of its
C{notifications}.

Twisted's C{Request.notifyFinish} makes a L{Deferred} per caller; the
gateway has four parties per request (in-flight count, metrics, the auth
call and the upstream call waiting to be cancelled).  Here the first
caller puts one L{_Finished} where C{notifyFinish} puts its L{Deferred}:
in the request's C{notifications}, whose entries Twisted's C{Request}
calls C{callback(None)} on when the response is finished and
C{errback(reason)} on when the connection is lost first.  The others join
its list; no L{Deferred} is made, chained or run per request.  A request
without that list (a test double) gets one C{notifyFinish} instead.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional

from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["when_finished"]

log = Logger()

Callback = Callable[[Optional[Failure]], None]


class _Finished:
    """The parties told of one request's end, in the order they asked."""

    __slots__ = ("callbacks", "ended", "reason")

    def __init__(self) -> None:
        self.callbacks: List[Callback] = []
        self.ended = False
        self.reason: Optional[Failure] = None

    def callback(self, result: object) -> None:
        """The response is finished (Twisted's C{Request._cleanup})."""
        self.run(None)

    def errback(self, reason: Failure) -> None:
        """The connection was lost first (Twisted's C{Request.connectionLost})."""
        self.run(reason)

    def run(self, reason: Optional[Failure]) -> None:
        # Dropped as they run: the parties (the relay, the exchange) hold
        # the request, which holds this, and a cycle left behind would be
        # the cyclic collector's to find, a pause in some later request.
        callbacks, self.callbacks = self.callbacks, []
        self.ended, self.reason = True, reason
        for callback in callbacks:
            _call(callback, reason)

    def fired(self, result: object) -> None:
        """The end, as a C{notifyFinish} L{Deferred} fires it: the failure of a client gone is consumed."""
        self.run(result if isinstance(result, Failure) else None)


def _call(callback: Callback, reason: Optional[Failure]) -> None:
    try:
        callback(reason)
    except Exception:
        log.failure("error while finishing a request")


def when_finished(request: Any, callback: Callback) -> None:
    """
    Call C{callback(None)} once the response to C{request} is finished, or
    C{callback(reason)} if its connection is lost first.  Callbacks run in
    the order they were added; one that raises is logged and does not stop
    the others.  Added once the request has ended, C{callback} is called at
    once, with how it ended.
    """
    finished: Optional[_Finished] = getattr(request, "_fauth_when_finished", None)
    if finished is None:
        finished = request._fauth_when_finished = _Finished()
        notifications = getattr(request, "notifications", None)
        if type(notifications) is list:
            notifications.append(finished)
        else:
            request.notifyFinish().addBoth(finished.fired)
    if finished.ended:
        _call(callback, finished.reason)
    else:
        finished.callbacks.append(callback)
