# -*- test-case-name: tests.auth.test_headerrules -*-
"""
C{upstream_headers} and C{client_headers} entries beyond plain names,
compiled once: patterns (C{Remote-*}, as Traefik's
C{authResponseHeadersRegex}) and renames (C{X-Auth-Request-User>X-User}, as
Caddy's C{copy_headers A>B}).  A plain name keeps APISIX's meaning.

Names are compared as the anti-spoofing rule sees them: lower-case, C{_}
as C{-} (CGI, WSGI and PHP read C{X_User} as C{X-User}).
"""
from __future__ import annotations

import re
from typing import Iterable, List, Optional, Pattern, Sequence, Tuple

import attr

from fauth.config.schema import SchemaError, property_error
from fauth.wire.headers import HOP_BY_HOP

__all__ = ["HeaderRules", "compile_rules", "fold"]

_NAME = re.compile(r"[-!#$%&'+.^_`|~0-9A-Za-z]+\Z")  # a token without "*"
_PATTERN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]*\*[-!#$%&'*+.^_`|~0-9A-Za-z]*\Z")
# What a pattern never copies nor strips: the names that frame a message or
# route it (the gateway writes those itself on both legs).
RESERVED = HOP_BY_HOP | frozenset([b"content-length", b"host", b"expect"])


def fold(name: bytes) -> bytes:
    """A header name as the anti-spoofing rule compares it: lower-case, C{_} as C{-}."""
    return name.lower().replace(b"_", b"-")


@attr.frozen
class HeaderRules:
    """
    One attribute's entries, compiled.

    @ivar exact: C{(name in the auth answer, name it is given)} per plain
        entry or rename, in order; both as written.
    @ivar pattern: every pattern entry as one regular expression over
        L{fold}ed names (use C{fullmatch}), or C{None}.
    """

    exact: Tuple[Tuple[bytes, bytes], ...] = ()
    pattern: Optional[Pattern[bytes]] = None

    def matching(self, names: Iterable[Tuple[bytes, Sequence[bytes]]]) -> List[Tuple[bytes, Tuple[bytes, ...]]]:
        """The C{(name, values)} of C{names} that the patterns pick (never a L{RESERVED} name)."""
        pattern = self.pattern
        if pattern is None:
            return []
        return [
            (name, tuple(values))
            for name, values in names
            if values and pattern.fullmatch(fold(name)) is not None and name.lower() not in RESERVED
        ]

    def strips(self, name: bytes) -> bool:
        """Whether a client's header of this name must go (a pattern could give it)."""
        pattern = self.pattern
        return pattern is not None and pattern.fullmatch(fold(name)) is not None and name.lower() not in RESERVED


def _item_error(prop: str, index: int, entry: str) -> SchemaError:
    shown = entry if entry.isprintable() else entry.encode("unicode_escape").decode("ascii")
    return property_error(prop, 'failed to validate item %d: invalid header name "%s"' % (index, shown))


def compile_rules(prop: str, entries: Sequence[str]) -> HeaderRules:
    """
    Compile C{upstream_headers} or C{client_headers} (C{prop}).

    @raise SchemaError: an entry that is neither a name, a pattern nor a
        rename, in APISIX's wording.
    """
    exact: List[Tuple[bytes, bytes]] = []
    patterns: List[str] = []
    for index, entry in enumerate(entries, 1):
        source, arrow, target = entry.partition(">")
        source, target = source.strip(), target.strip()
        if arrow:
            if _NAME.match(source) is None or _NAME.match(target) is None:
                raise _item_error(prop, index, entry)
            exact.append((source.encode("ascii"), target.encode("ascii")))
        elif _NAME.match(entry) is not None:
            exact.append((entry.encode("ascii"), entry.encode("ascii")))
        elif _PATTERN.match(entry) is not None and entry.strip("*"):
            folded = entry.lower().replace("_", "-")
            patterns.append("[^:]*".join(re.escape(part) for part in folded.split("*")))
        else:
            raise _item_error(prop, index, entry)
    pattern = re.compile(("|".join("(?:%s)" % p for p in patterns)).encode("ascii")) if patterns else None
    return HeaderRules(tuple(exact), pattern)
