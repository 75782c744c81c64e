"""L{fauth.auth.decision}: what an allow does to the request headers, and the frozen decisions."""
from __future__ import annotations

import attr
import pytest
from twisted.web.http_headers import Headers

from fauth.auth.decision import Allow, Degrade, Respond


def test_allow_sets_removes_and_strips_every_spelling_of_an_identity() -> None:
    headers = Headers(
        {
            b"X-User-ID": [b"spoofed", b"twice"],
            b"X_User_ID": [b"underscored"],
            b"x_user-id": [b"mixed"],
            b"X-Role": [b"admin"],
            b"Connection": [b"keep-alive, X-User-ID, x_role"],
            b"Accept": [b"*/*"],
        }
    )
    Allow(((b"X-User-ID", (b"alice",)), (b"X-Role", None))).apply(headers)
    assert headers.getRawHeaders(b"x-user-id") == [b"alice"]
    assert headers.getRawHeaders(b"x-role") is None
    names = {name.lower() for name, _ in headers.getAllRawHeaders()}
    assert b"x_user_id" not in names and b"x_user-id" not in names
    # The identity names leave Connection (so the proxy cannot drop the auth's value); the rest stays.
    assert headers.getRawHeaders(b"connection") == [b"keep-alive"]
    assert headers.getRawHeaders(b"accept") == [b"*/*"]


def test_allow_without_identity_headers_changes_nothing() -> None:
    headers = Headers({b"X-User-ID": [b"client"]})
    Allow().apply(headers)
    assert headers.getRawHeaders(b"x-user-id") == [b"client"]


def test_decisions_are_frozen_values_with_their_outcome() -> None:
    respond = Respond(403, ((b"location", (b"/login",)),), b"no")
    assert (Allow().outcome, Degrade().outcome, respond.outcome) == ("allow", "degraded", "deny")
    assert Respond(503, outcome="error").outcome == "error"
    assert respond == Respond(403, ((b"location", (b"/login",)),), b"no")
    with pytest.raises(attr.exceptions.FrozenInstanceError):
        respond.status = 200  # type: ignore[misc]
