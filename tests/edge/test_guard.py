"""fauth.edge.resources.guard: what a decision does to the request, and a failure on the way answered 500."""
from __future__ import annotations

from typing import Any, List

from twisted.internet.defer import Deferred, fail, succeed

from fauth.auth.decision import Allow, Respond
from fauth.edge.resources import guard
from fauth.request.inbound import InboundRequest
from fauth.testing import FakeRequest, LogCapture


class _Auth:
    def __init__(self, result: "Deferred[Any]") -> None:
        self.result = result

    def check(self, inbound: Any, route: Any = None) -> "Deferred[Any]":
        return self.result


def _inbound(request: FakeRequest) -> InboundRequest:
    return InboundRequest(
        method="GET", request_uri="/", path="/", query="", host="gateway.test", scheme="http",
        remote_addr="127.0.0.1", remote_port=1, server_addr="127.0.0.1", server_port=2,
        headers=request.requestHeaders,
    )


def test_an_allow_applies_its_headers_then_proceeds() -> None:
    request = FakeRequest()
    seen: List[Any] = []
    allow = Allow(set_headers=((b"X-User-ID", (b"u1",)),))
    guard(_Auth(succeed(allow)), request, _inbound(request), lambda: seen.append(request.requestHeaders.getRawHeaders(b"x-user-id")))
    assert seen == [[b"u1"]]


def test_a_denial_is_answered_and_nothing_proceeds() -> None:
    request = FakeRequest()
    seen: List[str] = []
    guard(_Auth(succeed(Respond(403, body=b"no"))), request, _inbound(request), lambda: seen.append("proceeded"))
    assert (seen, request.code, request.body, request.finished) == ([], 403, b"no", True)


def test_an_error_while_proceeding_is_logged_and_answered_500() -> None:
    request = FakeRequest()

    def proceed() -> None:
        raise RuntimeError("boom")

    with LogCapture() as logs:
        guard(_Auth(succeed(Allow())), request, _inbound(request), proceed)
    assert (request.code, request.finished) == (500, True)
    assert logs.contains("unexpected error while handling"), logs.lines


def test_a_failed_check_is_logged_and_answered_500() -> None:
    request = FakeRequest()
    seen: List[str] = []
    with LogCapture() as logs:
        guard(_Auth(fail(RuntimeError("boom"))), request, _inbound(request), lambda: seen.append("proceeded"))
    assert (seen, request.code, request.finished) == ([], 500, True)
    assert logs.contains("unexpected error while handling"), logs.lines


def test_a_client_gone_cancels_a_pending_check() -> None:
    request = FakeRequest()
    cancelled: List[bool] = []
    pending: "Deferred[Any]" = Deferred(lambda d: cancelled.append(True))
    with LogCapture() as logs:
        guard(_Auth(pending), request, _inbound(request), lambda: None)
        request.finish_by_client_gone()
    assert cancelled == [True]
    assert request.code == 0 and not logs.contains("unexpected error"), logs.lines
