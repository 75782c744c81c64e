"""fauth.request.lifecycle: several parties told of a request's end through one notifyFinish."""
from __future__ import annotations

from typing import Any, List, Optional

from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from fauth.request.lifecycle import when_finished
from fauth.testing import FakeRequest, LogCapture
from tests.harness import outcome




def test_one_notify_finish_for_every_party_in_order() -> None:
    request = FakeRequest()
    seen: List[Any] = []
    for name in ("first", "second", "third"):
        when_finished(request, lambda reason, name=name: seen.append((name, reason)))
    assert len(request.notifications) == 1
    request.notifications[0].callback(None)
    assert seen == [("first", None), ("second", None), ("third", None)]


def test_a_lost_client_is_told_to_all_and_the_failure_consumed() -> None:
    request = FakeRequest()
    reasons: List[Optional[Failure]] = []
    when_finished(request, reasons.append)
    when_finished(request, reasons.append)
    d = request.notifications[0]
    d.errback(Failure(ConnectionLost()))
    assert len(reasons) == 2 and all(r is not None and r.check(ConnectionLost) for r in reasons)
    # Consumed: no "Unhandled error in Deferred" later.
    assert outcome(d) == [None]


def test_a_raising_party_is_logged_and_the_others_still_run() -> None:
    request = FakeRequest()
    seen: List[str] = []

    def broken(reason: Optional[Failure]) -> None:
        raise RuntimeError("boom")

    when_finished(request, broken)
    when_finished(request, lambda reason: seen.append("after"))
    with LogCapture() as logs:
        request.notifications[0].callback(None)
    assert seen == ["after"]
    assert logs.contains("error while finishing a request"), logs.lines
