# -*- test-case-name: tests.auth.test_forward -*-
"""Header rules shared by both legs: hop-by-hop names and what a valid header is."""
from __future__ import annotations

import re
from typing import FrozenSet, Optional

from twisted.web.http_headers import Headers

__all__ = [
    "CTL",
    "HOP_BY_HOP",
    "TOKEN",
    "HeaderError",
    "connection_listed",
    "first_value",
]

# RFC 9110 section 7.6.1, plus the historical names proxies still see.
HOP_BY_HOP: FrozenSet[bytes] = frozenset(
    [
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ]
)

#: An RFC 9110 token (a header name, a method, a transfer coding); use
#: C{fullmatch}: C{$} would also accept a trailing newline.
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Any control character except horizontal tab (RFC 9110 section 5.5).
CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class HeaderError(ValueError):
    """A header that must not be sent; the message is lua-resty-http's wording."""


def first_value(headers: Headers, name: bytes) -> Optional[bytes]:
    """The first value of a header, or C{None}."""
    values = headers.getRawHeaders(name)
    return values[0] if values else None


def connection_listed(headers: Headers) -> FrozenSet[bytes]:
    """Names listed in C{Connection}, lower-cased: hop-by-hop for this message."""
    values = headers.getRawHeaders(b"connection")
    if not values:
        return frozenset()
    return frozenset(
        token.strip().lower() for value in values for token in value.split(b",") if token.strip()
    )
