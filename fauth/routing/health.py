# -*- test-case-name: tests.routing.test_health,tests.auth.test_targets -*-
"""
The health of a set of nodes, for either leg: passive (nginx's
C{max_fails}/C{fail_timeout}: a node failing that many times in a row is
left out for that long) and active (the last probe's verdict), and which
failures may be tried again on another node.
"""
from __future__ import annotations

from typing import Callable, Dict, Hashable

from twisted.internet import error as net_error
from twisted.python.failure import Failure

from fauth.wire.transport import describe_failure, is_cancellation

__all__ = ["NodeHealth", "connect_failed"]


def connect_failed(failure: Failure) -> bool:
    """
    Whether a call failed before any of its request reached the node: the
    connection (or its TLS handshake) could not be made.  Only then may
    another node be asked: a request a node began to process must not run
    twice, and an answer, whatever its status, is the answer.
    """
    if is_cancellation(failure):
        return False
    if failure.check(net_error.ConnectError, net_error.DNSLookupError):
        return True
    return describe_failure(failure).startswith("handshake failed")


class _State:
    __slots__ = ("fails", "out_until", "probe_down")

    def __init__(self) -> None:
        self.fails = 0
        self.out_until = 0.0
        self.probe_down = False


class NodeHealth:
    """
    Which nodes may be picked now.

    @param clock: seconds (the reactor's).
    @param max_fails: failures in a row that leave a node out; C{0} never does.
    @param fail_timeout: seconds a node stays out.  Back in, it is on
        probation: one more failure leaves it out again.
    """

    def __init__(self, clock: Callable[[], float], max_fails: int = 1, fail_timeout: float = 10.0) -> None:
        self._clock = clock
        self._max_fails = max_fails
        self._fail_timeout = fail_timeout
        self._states: Dict[Hashable, _State] = {}

    def _state(self, node: Hashable) -> _State:
        state = self._states.get(node)
        if state is None:
            state = self._states[node] = _State()
        return state

    def usable(self, node: Hashable) -> bool:
        """C{node} is neither left out after failures nor failing its probes."""
        state = self._states.get(node)
        return state is None or (not state.probe_down and state.out_until <= self._clock())

    def failed(self, node: Hashable) -> None:
        """A call to C{node} got no answer."""
        if self._max_fails == 0:
            return
        state = self._state(node)
        state.fails += 1
        if state.fails >= self._max_fails:
            state.out_until = self._clock() + self._fail_timeout
            state.fails = self._max_fails - 1

    def succeeded(self, node: Hashable) -> None:
        """C{node} answered."""
        state = self._states.get(node)
        if state is not None:
            state.fails = 0

    def probed(self, node: Hashable, healthy: bool) -> None:
        """An active check of C{node} passed (it is back in at once) or failed (out until one passes)."""
        state = self._state(node)
        state.probe_down = not healthy
        if healthy:
            state.fails = 0
            state.out_until = 0.0
