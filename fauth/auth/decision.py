# -*- test-case-name: tests.auth.test_decision -*-
"""
What a forward-auth check decides, as frozen values: L{Allow} (with the
identity headers to set), L{Degrade}, or L{Respond} (the answer the client
gets instead).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import attr
from twisted.web.http_headers import Headers

from fauth.config.headerrules import HeaderRules, fold
from fauth.wire.h1 import ReplyHeaders

# An int needle: CPython's bytes "in" tries a bytes needle as an int first,
# raising and clearing a TypeError each time (about four times the cost).
_UNDERSCORE = ord("_")

__all__ = ["AUTH_SERVER", "Allow", "AuthServer", "Decision", "Degrade", "Preflight", "Respond"]


@attr.frozen
class Allow:
    """
    Let the request through.  C{set_headers} maps each configured
    C{upstream_headers} name to the auth service's values, or to C{None}
    when it gave none: such a header must be removed from the request.
    With C{upstream_headers} patterns, C{strip} holds them: a client's
    header of a name they match goes, whatever the auth service gave.
    """

    set_headers: Tuple[Tuple[bytes, Optional[Tuple[bytes, ...]]], ...] = ()
    #: The auth service's response headers (for the access log's C{user}).
    reply_headers: Optional[ReplyHeaders] = attr.field(default=None, eq=False, repr=False)
    #: C{Set-Cookie} values for this client's response (C{allow_cookies});
    #: never part of a stored decision.
    cookies: Tuple[bytes, ...] = attr.field(default=(), eq=False, repr=False)
    #: How the decision cache produced it (one of
    #: L{fauth.observe.exchange.CACHE_RESULTS}), or C{None} without C{cache}.
    cache: Optional[str] = attr.field(default=None, eq=False)
    #: The compiled C{upstream_headers} when they hold patterns, else C{None}.
    strip: Optional[HeaderRules] = attr.field(default=None, eq=False, repr=False)
    #: For metrics and the access log (L{fauth.observe.metrics}).
    outcome = "allow"

    def apply(self, headers: Headers) -> None:
        """
        Rewrite request headers in place.  Client headers spelled with
        underscores (C{X_User_ID}) go too: many upstreams (CGI, WSGI, PHP)
        read them as the dashed name, so they could smuggle an identity.
        So does every client header a pattern of C{strip} matches.
        """
        strip = self.strip
        if not self.set_headers and strip is None:
            return
        folded = {fold(name) for name, _ in self.set_headers}
        for raw_name, _ in list(headers.getAllRawHeaders()):
            if (_UNDERSCORE in raw_name and fold(raw_name) in folded) or (strip is not None and strip.strips(raw_name)):
                headers.removeHeader(raw_name)
        # "Connection: X-User-ID" would make the proxy drop the auth's value
        # as hop-by-hop: such tokens go, the rest of Connection stays.
        connection = headers.getRawHeaders(b"connection")
        if connection:
            kept = [
                token.strip()
                for value in connection
                for token in value.split(b",")
                if token.strip()
                and fold(token.strip()) not in folded
                and (strip is None or not strip.strips(token.strip()))
            ]
            if kept:
                headers.setRawHeaders(b"connection", [b", ".join(kept)])
            else:
                headers.removeHeader(b"connection")
        for name, values in self.set_headers:
            if values is None:
                headers.removeHeader(name)
            else:
                headers.setRawHeaders(name, list(values))


@attr.frozen
class Preflight(Allow):
    """
    A CORS preflight let through without an auth call (C{run_on_preflight:
    false}); like an allow whose answer had none of the identity headers,
    it removes them all from the request.
    """

    outcome = "preflight"


@attr.frozen
class Degrade:
    """The auth service failed and C{allow_degradation} lets the request through untouched."""

    cache: Optional[str] = attr.field(default=None, eq=False)
    outcome = "degraded"


@attr.frozen
class Respond:
    """Answer the client now: the auth service's denial, a 413, or C{status_on_error}."""

    status: int
    headers: Tuple[Tuple[bytes, Tuple[bytes, ...]], ...] = ()
    body: bytes = b""
    #: C{deny} (the auth service's answer), C{redirect} (that answer turned
    #: into a sign-in redirect, L{fauth.auth.signin}), C{error}
    #: (C{status_on_error}) or C{rejected} (413, no auth call); for metrics
    #: and the access log.
    outcome: str = attr.field(default="deny", eq=False)
    cache: Optional[str] = attr.field(default=None, eq=False)


@attr.frozen
class AuthServer:
    """
    A request under C{auth_server_paths} (the auth service's own sign-in
    pages and callbacks): proxied to the auth service, without a check.
    """

    cache: Optional[str] = attr.field(default=None, eq=False)
    outcome = "auth_server"


#: The single L{AuthServer} decision.
AUTH_SERVER = AuthServer()

Decision = Union[Allow, Degrade, Respond, AuthServer]  # a Preflight is an Allow
