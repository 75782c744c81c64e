"""fauth.request.lifecycle: several parties told of a request's end through one entry of its notifications."""
from __future__ import annotations

import gc
from typing import Any, List, Optional

from twisted.internet.defer import Deferred
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


def test_a_lost_client_is_told_to_all() -> None:
    request = FakeRequest()
    reasons: List[Optional[Failure]] = []
    when_finished(request, reasons.append)
    when_finished(request, reasons.append)
    request.notifications[0].errback(Failure(ConnectionLost()))
    assert len(reasons) == 2 and all(r is not None and r.check(ConnectionLost) for r in reasons)


class _OnlyNotifyFinish:
    """A request with C{notifyFinish} but no C{notifications} list (as Twisted's DummyRequest)."""

    def __init__(self) -> None:
        self.handed_out: List[Deferred] = []

    def notifyFinish(self) -> Deferred:
        d: Deferred = Deferred()
        self.handed_out.append(d)
        return d


def test_without_a_notifications_list_one_notify_finish_and_its_failure_consumed() -> None:
    request = _OnlyNotifyFinish()
    reasons: List[Optional[Failure]] = []
    when_finished(request, reasons.append)
    when_finished(request, reasons.append)
    assert len(request.handed_out) == 1
    d = request.handed_out[0]
    d.errback(Failure(ConnectionLost()))
    assert len(reasons) == 2 and all(r is not None and r.check(ConnectionLost) for r in reasons)
    # Consumed: no "Unhandled error in Deferred" later.
    assert outcome(d) == [None]
    finished = _OnlyNotifyFinish()
    when_finished(finished, reasons.append)
    finished.handed_out[0].callback(None)
    assert reasons[-1] is None


def test_a_twisted_request_tells_every_party_when_finished_or_lost() -> None:
    # The real Request: its finish and connectionLost reach the parties
    # through its notifications (no Deferred made).
    from twisted.web.server import Request
    from twisted.web.test.requesthelper import DummyChannel

    seen: List[Any] = []
    finished = Request(DummyChannel())
    when_finished(finished, lambda reason: seen.append(("a", reason)))
    when_finished(finished, lambda reason: seen.append(("b", reason)))
    assert seen == []
    finished.finish()
    assert seen == [("a", None), ("b", None)]
    lost = Request(DummyChannel())
    when_finished(lost, lambda reason: seen.append(("lost", reason)))
    lost.connectionLost(Failure(ConnectionLost()))
    assert seen[-1][0] == "lost" and seen[-1][1].check(ConnectionLost)


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


def _reachable(root: object, target: object, limit: int = 10000) -> bool:
    """Whether C{target} can be reached from C{root} through references (what the cyclic collector follows)."""
    seen = {id(root)}
    todo = [root]
    while todo and len(seen) < limit:
        for referent in gc.get_referents(todo.pop()):
            if referent is target:
                return True
            if id(referent) not in seen and not isinstance(referent, type):
                seen.add(id(referent))
                todo.append(referent)
    return False


def test_a_finished_request_lets_go_of_its_parties() -> None:
    # A party holds the request (the relay, the exchange do); were the
    # request to keep holding the party once told, every request would be
    # a cycle left to the cyclic collector: a pause in some later request.
    from twisted.web.server import Request
    from twisted.web.test.requesthelper import DummyChannel

    class Party:
        def __init__(self, request: Request) -> None:
            self.request = request
            self.told: List[Optional[Failure]] = []

        def done(self, reason: Optional[Failure]) -> None:
            self.told.append(reason)

    request = Request(DummyChannel())
    party = Party(request)
    when_finished(request, party.done)
    assert _reachable(request, party)
    request.finish()
    assert party.told == [None]
    assert not _reachable(request, party)


def test_a_party_that_comes_after_the_end_is_told_at_once() -> None:
    request = FakeRequest()
    seen: List[Any] = []
    when_finished(request, lambda reason: seen.append(("first", reason)))
    lost = Failure(ConnectionLost())
    request.notifications[0].errback(lost)
    when_finished(request, lambda reason: seen.append(("late", reason)))
    assert seen == [("first", lost), ("late", lost)]
