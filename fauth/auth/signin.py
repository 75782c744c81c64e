# -*- test-case-name: tests.auth.test_signin -*-
"""
Sign-in redirects (C{signin_redirect}): a browser whose request the auth
service refused with one of the chosen statuses is sent to a sign-in page
that brings it back, as nginx users of oauth2-proxy do with
C{error_page 401 =}; an API client keeps the auth service's answer.
"""
from __future__ import annotations

from urllib.parse import quote

import attr

from fauth.auth.decision import Decision, Respond
from fauth.config.models import SigninConf
from fauth.request.inbound import InboundRequest
from fauth.wire.headers import first_value

__all__ = ["SigninRedirect", "original_url", "wants_html"]


def wants_html(inbound: InboundRequest) -> bool:
    """
    Whether the client is a browser navigating: it accepts C{text/html}
    (not with C{q=0}) and its request is not a script's (no
    C{X-Requested-With}, which XHR libraries send).
    """
    headers = inbound.headers
    if headers.hasHeader(b"x-requested-with"):
        return False
    for value in headers.getRawHeaders(b"accept", ()):
        for item in value.split(b","):
            media, _, params = item.partition(b";")
            if media.strip().lower() != b"text/html":
                continue
            q = [p.strip().lower() for p in params.split(b";") if p.strip().lower().startswith(b"q=")]
            if not q or q[0][2:].strip(b" 0.") != b"":
                return True
    return False


def original_url(inbound: InboundRequest) -> str:
    """
    The URL the client asked for: scheme, its C{Host} as sent (port
    included; the server validated it) and the target as sent.
    """
    host = first_value(inbound.headers, b"host")
    authority = host.decode("latin-1") if host is not None else inbound.host
    return "%s://%s%s" % (inbound.scheme, authority, inbound.request_uri)


class SigninRedirect:
    """One route's C{signin_redirect}, compiled once."""

    def __init__(self, conf: SigninConf) -> None:
        self.conf = conf
        self._statuses = frozenset(conf.statuses)
        joiner = "&" if "?" in conf.uri else "?"
        self._prefix = ("%s%s%s=" % (conf.uri, joiner, conf.param)).encode("ascii")

    def location(self, inbound: InboundRequest) -> bytes:
        """The sign-in URL for this request, the original URL percent-encoded in it."""
        # Every byte but the unreserved ones encoded: no CR, LF, "&" or "#"
        # of the original can reach the Location header or the parameter.
        return self._prefix + quote(original_url(inbound), safe="", encoding="latin-1").encode("ascii")

    def apply(self, decision: Decision, inbound: InboundRequest) -> Decision:
        """
        C{decision}, or the redirect it becomes: only the auth service's own
        denials with a chosen status, and only for browsers.  The denial's
        C{client_headers} stay (a cookie it clears, say), but its
        C{Location} and body go.
        """
        if not isinstance(decision, Respond) or decision.outcome != "deny":
            return decision
        if decision.status not in self._statuses or not wants_html(inbound):
            return decision
        headers = tuple((name, values) for name, values in decision.headers if name.lower() != b"location")
        return attr.evolve(
            decision,
            status=self.conf.status,
            headers=headers + ((b"Location", (self.location(inbound),)),),
            body=b"",
            outcome="redirect",
        )

