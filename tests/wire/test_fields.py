"""L{fauth.wire.fields}: a Headers' fields read and set in its own dict, as its methods would."""
from __future__ import annotations

from twisted.web.http_headers import Headers

from fauth.wire.fields import canonical, copy_fields, fields_of


def test_the_canonical_name_is_the_one_headers_stores() -> None:
    for name in (b"host", b"CONTENT-LENGTH", b"www-authenticate", b"etag", b"x-user-id", b"te"):
        headers = Headers()
        headers.setRawHeaders(name, [b"1"])
        assert list(headers.getAllRawHeaders()) == [(canonical(name), [b"1"])]
    assert canonical(b"content-length") == b"Content-Length"


def test_fields_of_reads_what_the_methods_read() -> None:
    headers = Headers({b"host": [b"a.test"], b"x-twice": [b"1", b"2"]})
    fields = fields_of(headers)
    assert fields.get(canonical(b"host")) == headers.getRawHeaders(b"host") == [b"a.test"]
    assert fields.get(canonical(b"x-twice")) == [b"1", b"2"]
    assert fields.get(canonical(b"connection")) is None and not headers.hasHeader(b"connection")
    fields[canonical(b"content-length")] = [b"0"]
    assert headers.getRawHeaders(b"content-length") == [b"0"]


def test_copied_fields_replace_and_read_as_set_raw_headers_would() -> None:
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


def test_copied_fields_are_lists_of_their_own_the_shared_head_keeps_its_values() -> None:
    from fauth.wire.h1 import parse_head

    block = b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nX-Up: u\r\nContent-Length: 0\r\n\r\n"
    first, second = Headers(), Headers()
    copy_fields(first, parse_head(block, b"GET").headers.items(), frozenset(), frozenset())
    first.addRawHeader(b"set-cookie", b"auth=1")  # as allow_cookies adds the auth service's cookie
    copy_fields(second, parse_head(block, b"GET").headers.items(), frozenset(), frozenset())
    assert first.getRawHeaders(b"set-cookie") == [b"a=1", b"auth=1"]
    assert second.getRawHeaders(b"set-cookie") == [b"a=1"]
    assert parse_head(block, b"GET").headers.get(b"set-cookie") == (b"a=1",)
