# -*- test-case-name: tests.admin.test_reload,tests.process.test_workers -*-
"""
SIGTERM and SIGHUP for the gateway process and the worker supervisor.

Python runs a signal handler between two bytecodes of whatever the main
thread is doing, possibly in the middle of a reactor iteration, so the
handlers here only hand the work to the reactor, as its own handlers do.
Replacing the reactor's SIGTERM handler also means the reactor never
records an exit signal, so twistd exits 0 after a drain instead of
re-raising SIGTERM on itself.
"""
from __future__ import annotations

import signal
from typing import Any, Callable, Dict

from twisted.internet.error import ReactorNotRunning

__all__ = ["ProcessSignals", "stop_reactor"]


def stop_reactor(reactor: Any) -> None:
    """Stop C{reactor}, unless it is already stopping."""
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


class ProcessSignals:
    """
    Routes SIGTERM to C{on_term} and SIGHUP to C{on_hup} on the reactor
    thread, and puts the previous handlers back on L{restore}.
    """

    def __init__(self, reactor: Any, on_term: Callable[[], object], on_hup: Callable[[], object]) -> None:
        self._reactor = reactor
        self._on_term = on_term
        self._on_hup = on_hup
        self._previous: Dict[int, Any] = {}

    def install(self) -> None:
        """Take over SIGTERM and (where the platform has it) SIGHUP."""
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._term)
        sighup = getattr(signal, "SIGHUP", None)
        if sighup is not None:
            self._previous[sighup] = signal.signal(sighup, self._hup)

    def restore(self) -> None:
        """Put back the handlers that were there before L{install}."""
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _term(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self._on_term)

    def _hup(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self._on_hup)
