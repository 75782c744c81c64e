# -*- test-case-name: tests.wire.test_fields -*-
"""
The fields of a Twisted L{Headers}, read and set in its own dict.

Every L{Headers} method encodes and canonicalises the name it is given
(and C{setRawHeaders} sanitises each value): a few thousand instructions
a call, several per proxied request.  Where fauth already holds the
canonical name, or values a parser has checked, it reads and sets
C{Headers._rawHeaders} (canonical name to list of values, pinned in
tests/test_compat.py) directly.
"""
from __future__ import annotations

from typing import AbstractSet, Dict, Iterable, List, Sequence, Tuple

from twisted.web.http_headers import Headers

__all__ = ["canonical", "copy_fields", "fields_of"]

_CANONICAL: Dict[bytes, bytes] = {}
_MAX_NAMES = 1000


def canonical(name: bytes) -> bytes:
    """The name L{Headers} stores C{name} (any case) under."""
    found = _CANONICAL.get(name)
    if found is None:
        probe = Headers()
        probe.setRawHeaders(name, [b""])
        ((found, _),) = probe.getAllRawHeaders()
        if len(_CANONICAL) < _MAX_NAMES:
            _CANONICAL[name] = found
    return found


def fields_of(headers: Headers) -> Dict[bytes, List[bytes]]:
    """
    The dict C{headers} keeps its fields in: canonical name (L{canonical})
    to values.  Read it, or set a whole list of values already free of CR
    and LF.
    """
    return headers._rawHeaders


def copy_fields(
    out: Headers, fields: Iterable[Tuple[bytes, Sequence[bytes]]], drop: AbstractSet[bytes], listed: AbstractSet[bytes]
) -> None:
    """
    Set each of C{fields} (a parsed response head's lower-case names and
    values: L{fauth.wire.h1.ReplyHeaders.items}) not in C{drop} nor
    C{listed} in C{out}, replacing what C{out} had under that name, as
    C{setRawHeaders} does.

    The parser let through token names only and values without CR, LF or
    another control character but tab, so C{setRawHeaders}' encoding and
    sanitising per field would change nothing: the values go in as they
    are, in a list of C{out}'s own (a parsed head is shared by every
    response that sent it, and L{Headers} appends to its lists), under the
    name Twisted would have made of the name.
    """
    raw = out._rawHeaders
    names = _CANONICAL
    for name, values in fields:
        if name not in drop and name not in listed:
            raw[names.get(name) or canonical(name)] = list(values)
