# -*- test-case-name: tests.request.test_replies -*-
"""
Answers the gateway makes itself (a status, maybe a body, nothing
proxied), and the copy of a relayed answer's header fields.
"""
from __future__ import annotations

from typing import AbstractSet, Any, Dict, Iterable, List, Optional, Tuple

from twisted.web.http_headers import Headers

__all__ = ["copy_fields", "send_simple"]


def send_simple(request: Any, status: int, body: bytes = b"", content_type: Optional[bytes] = None) -> None:
    """Answer with a fixed status and body (gateway-made responses)."""
    request.setResponseCode(status)
    if content_type is not None:
        request.responseHeaders.setRawHeaders(b"content-type", [content_type])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    if body:
        request.write(body)
    request.finish()


# Lower-case name -> the name Twisted's Headers stores it under.
_CANONICAL: Dict[bytes, bytes] = {}
_MAX_NAMES = 1000


def _canonical(name: bytes) -> bytes:
    found = _CANONICAL.get(name)
    if found is None:
        probe = Headers()
        probe.setRawHeaders(name, [b""])
        ((found, _),) = probe.getAllRawHeaders()
        if len(_CANONICAL) < _MAX_NAMES:
            _CANONICAL[name] = found
    return found


def copy_fields(
    out: Headers, fields: Iterable[Tuple[bytes, List[bytes]]], drop: AbstractSet[bytes], listed: AbstractSet[bytes]
) -> None:
    """
    Set each of C{fields} (a parsed response head's lower-case names and
    values: L{fauth.wire.h1.ReplyHeaders.items}) not in C{drop} nor
    C{listed} in C{out}, replacing what C{out} had under that name, as
    C{setRawHeaders} does.

    The parser let through token names only and values without CR, LF or
    another control character but tab, so C{setRawHeaders}' encoding and
    sanitising per field would change nothing: the value lists go into
    the dict Twisted keeps them in (C{_rawHeaders}, pinned in
    tests/test_compat.py) as they are, under the name Twisted would have
    made of the name, worked out once per name.
    """
    raw = out._rawHeaders
    canonical = _CANONICAL
    for name, values in fields:
        if name not in drop and name not in listed:
            raw[canonical.get(name) or _canonical(name)] = values
