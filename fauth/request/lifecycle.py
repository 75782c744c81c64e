# -*- test-case-name: tests.request.test_lifecycle -*-
"""
The end of a request, told to several parties through one C{notifyFinish}.

Twisted's C{Request.notifyFinish} makes a L{Deferred} per caller; the
gateway has four per request (in-flight count, metrics, the auth call and
the upstream call waiting to be cancelled).  Here the first caller creates
the one Deferred and the others join its list.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional

from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["when_finished"]

log = Logger()

Callback = Callable[[Optional[Failure]], None]


def when_finished(request: Any, callback: Callback) -> None:
    """
    Call C{callback(None)} once the response to C{request} is finished, or
    C{callback(reason)} if its connection is lost first.  Callbacks run in
    the order they were added; one that raises is logged and does not stop
    the others.
    """
    callbacks: Optional[List[Callback]] = getattr(request, "_fauth_when_finished", None)
    if callbacks is None:
        callbacks = request._fauth_when_finished = []
        request.notifyFinish().addBoth(_run, callbacks)
    callbacks.append(callback)


def _run(result: object, callbacks: List[Callback]) -> None:
    reason = result if isinstance(result, Failure) else None
    for callback in callbacks:
        try:
            callback(reason)
        except Exception:
            log.failure("error while finishing a request")
    # The failure of a client gone away is consumed: every party was told.
