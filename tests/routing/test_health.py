"""
Node health (L{fauth.routing.health}): nginx's max_fails/fail_timeout with
probation, active checks' verdicts, and which failures may go to another
node.
"""
from __future__ import annotations

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseNeverReceived

from fauth.routing.health import NodeHealth, connect_failed


def test_passive_out_for_fail_timeout_then_on_probation() -> None:
    clock = Clock()
    health = NodeHealth(clock.seconds, max_fails=2, fail_timeout=10)
    health.failed("a")
    assert health.usable("a")
    health.succeeded("a")  # an answer resets the count
    health.failed("a")
    assert health.usable("a")
    health.failed("a")
    assert not health.usable("a") and health.usable("b")
    clock.advance(9.9)
    assert not health.usable("a")
    clock.advance(0.1)
    assert health.usable("a")
    health.failed("a")  # back on probation: one more failure, out again
    assert not health.usable("a")


def test_max_fails_zero_never_leaves_out() -> None:
    health = NodeHealth(Clock().seconds, max_fails=0)
    for _ in range(5):
        health.failed("a")
    assert health.usable("a")


def test_active_checks_override() -> None:
    clock = Clock()
    health = NodeHealth(clock.seconds, max_fails=1, fail_timeout=60)
    health.probed("a", False)
    assert not health.usable("a")
    clock.advance(120)
    assert not health.usable("a")  # out until a check passes
    health.failed("b")
    health.probed("b", True)  # a passing check brings a node back at once
    assert health.usable("b")
    health.probed("a", True)
    assert health.usable("a")


def test_connect_failed() -> None:
    assert connect_failed(Failure(net_error.ConnectionRefusedError()))
    assert connect_failed(Failure(net_error.TCPTimedOutError()))
    assert connect_failed(Failure(net_error.DNSLookupError("x")))
    # Sent (or maybe sent): never again elsewhere.
    assert not connect_failed(Failure(ResponseNeverReceived([Failure(net_error.ConnectionLost())])))
    assert not connect_failed(Failure(net_error.ConnectionLost()))
    assert not connect_failed(Failure(CancelledError()))
    assert not connect_failed(Failure(net_error.ConnectingCancelledError(None)))
