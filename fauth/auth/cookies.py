# -*- test-case-name: tests.auth.test_cookies -*-
"""
Cookies on allow (C{allow_cookies}): the C{Set-Cookie}s of an auth
service's 2xx answer (oauth2-proxy refreshing a session, say) added to the
client's response of that request, as Traefik's C{addAuthCookiesToResponse}
does.  They go to that one client only: never to the upstream request, and
never through the decision cache (an answer with C{Set-Cookie} is not
stored, L{fauth.auth.cache.lifetime}; a stored allow has none).
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

from fauth.wire.h1 import ReplyHeaders

__all__ = ["ALL", "CookiePicker", "merge_into_response"]

#: The C{allow_cookies} item that picks every cookie.
ALL = "*"


class CookiePicker:
    """One route's C{allow_cookies}, compiled once: every cookie, or those named."""

    def __init__(self, names: Sequence[str]) -> None:
        self._all = ALL in names
        # Cookie names are case-sensitive (RFC 6265 5.3).
        self._names = frozenset(name.encode("ascii") for name in names if name != ALL)

    def pick(self, headers: ReplyHeaders) -> Tuple[bytes, ...]:
        """The C{Set-Cookie} values of an auth answer that go to the client."""
        values = headers.get(b"set-cookie")
        if not values:
            return ()
        if self._all:
            return tuple(values)
        names = self._names
        return tuple(value for value in values if value.partition(b"=")[0].strip() in names)


def merge_into_response(request: Any) -> None:
    """
    Put the auth cookies of an allowed request (in C{request.cookies},
    where L{fauth.edge.resources.guard} left them) beside the upstream's
    own C{Set-Cookie}s, just copied into C{request.responseHeaders}
    (call it only when there are some: it always writes the header).

    Twisted writes C{request.cookies} I{in place of} any C{Set-Cookie}
    header, so both lists become the header here.  A gateway-made 502
    that follows clears the headers, the auth cookies with them.
    """
    out = request.responseHeaders
    out.setRawHeaders(b"set-cookie", list(out.getRawHeaders(b"set-cookie", ())) + request.cookies)
    request.cookies = []
