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


def test_copied_fields_replace_and_read_as_set_raw_headers_would() -> None:
    from twisted.web.http_headers import Headers

    from fauth.request.replies import copy_fields

    fields = [
        (b"content-type", [b"text/plain"]),
        (b"www-authenticate", [b"Basic", b"Bearer"]),
        (b"x-hop", [b"listed in Connection"]),
        (b"keep-alive", [b"timeout=5"]),
        (b"date", [b"upstream's"]),
        (b"etag", [b'"1"']),
    ]
    copied = Headers({b"date": [b"gateway's"], b"server": [b"gateway"]})
    copy_fields(copied, fields, frozenset([b"keep-alive"]), frozenset([b"x-hop"]))
    expected = Headers({b"date": [b"gateway's"], b"server": [b"gateway"]})
    for name, values in fields[:2] + fields[4:]:
        expected.setRawHeaders(name, values)
    # The same names (Twisted's casing), values and order, as on the wire.
    assert list(copied.getAllRawHeaders()) == list(expected.getAllRawHeaders())
    assert copied.getRawHeaders(b"Date") == [b"upstream's"]
    assert copied.getRawHeaders(b"WWW-Authenticate") == [b"Basic", b"Bearer"]
    assert not copied.hasHeader(b"x-hop") and not copied.hasHeader(b"keep-alive")
