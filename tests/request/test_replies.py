"""L{fauth.request.replies.send_simple}: the answers the gateway makes itself."""
from __future__ import annotations

from fauth.request.replies import send_simple
from fauth.testing import FakeRequest


def test_a_status_with_a_body_and_its_type() -> None:
    request = FakeRequest()
    send_simple(request, 404, b'{"error_msg":"404 Route Not Found"}', b"application/json")
    assert request.code == 404 and request.finished
    assert request.body == b'{"error_msg":"404 Route Not Found"}'
    assert request.responseHeaders.getRawHeaders(b"content-length") == [b"35"]
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]


def test_a_bare_status_says_its_empty_length_and_no_type() -> None:
    request = FakeRequest()
    send_simple(request, 502)
    assert (request.code, request.body, request.finished) == (502, b"", True)
    assert request.responseHeaders.getRawHeaders(b"content-length") == [b"0"]
    assert request.responseHeaders.getRawHeaders(b"content-type") is None

