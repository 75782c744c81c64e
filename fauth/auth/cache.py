# -*- test-case-name: tests.auth.test_cache,tests.auth.test_cache_e2e -*-
"""
The decision cache of one route (C{forward-auth}'s C{cache} section): a
bounded LRU of whole decisions by key, their freshness, the window in which
an expired allow may still serve while the auth service fails, and the
rules by which an auth answer may be stored at all.

Times are the reactor's C{seconds()}, passed in by the caller: nothing here
reads a clock, so tests run on L{twisted.internet.task.Clock}.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import attr

from fauth.auth.decision import Allow, Decision
from fauth.config.models import CacheConf
from fauth.wire.h1 import ReplyHeaders

if TYPE_CHECKING:
    from fauth.auth.coalesce import Flight

__all__ = ["DecisionCache", "lifetime"]

# Directives that forbid reuse by a shared cache.  no-cache allows storing
# but demands revalidation before each reuse, which a decision cache cannot
# do: it counts as "never reuse".
_FORBIDDING = frozenset([b"no-store", b"private", b"no-cache"])


def lifetime(status: int, headers: ReplyHeaders, conf: CacheConf) -> Tuple[float, bool]:
    """
    How long an auth answer may be reused, and whether the answer itself
    forbade reuse.

    The configured C{ttl} (2xx) or C{deny_ttl} (401, 403; other statuses
    are never stored) is shortened by C{Cache-Control: max-age} (or
    C{s-maxage}, which a shared cache obeys instead); C{no-store},
    C{private}, C{no-cache}, a zero or malformed age and any C{Set-Cookie}
    forbid it.

    @return: C{(seconds, forbidden)}; C{seconds} is 0 when the answer is
        not to be stored.
    """
    if status < 300:
        seconds = conf.ttl
    elif status in (401, 403):
        seconds = conf.deny_ttl
    else:
        seconds = 0
    if headers.get(b"set-cookie") is not None:
        # A cookie is set for one client; reusing the answer would hand it
        # (or the session it stands for) to the next.
        return 0, True
    values = headers.get(b"cache-control")
    if values is None:
        return seconds, False
    max_age: Optional[int] = None
    s_maxage: Optional[int] = None
    for value in values:
        for directive in value.split(b","):
            name, _, argument = directive.strip().partition(b"=")
            name = name.strip().lower()
            if name in _FORBIDDING:
                return 0, True
            if name in (b"max-age", b"s-maxage"):
                argument = argument.strip().strip(b'"')
                if not argument.isdigit():
                    # RFC 9111 5.2: an invalid age is treated as stale.
                    return 0, True
                if name == b"max-age":
                    max_age = int(argument) if max_age is None else min(max_age, int(argument))
                else:
                    s_maxage = int(argument) if s_maxage is None else min(s_maxage, int(argument))
    age = s_maxage if s_maxage is not None else max_age
    if age is not None:
        if age == 0:
            return 0, True
        seconds = min(seconds, age)
    return seconds, False


class _Entry:
    # One float per entry: the end of the stale window follows from it (a
    # hundred thousand entries make every field count).
    __slots__ = ("hit", "expires")

    def __init__(self, hit: Decision, expires: float) -> None:
        self.hit = hit
        self.expires = expires


class DecisionCache:
    """
    Whole decisions of one route by key, at most C{conf.max_entries}, the
    least recently used evicted first.  Per process; a new route
    configuration gets a new cache (L{fauth.edge.gateway}).

    @ivar flights: the auth calls in flight by key (L{fauth.auth.coalesce}).
    """

    def __init__(self, conf: CacheConf) -> None:
        self.conf = conf
        self._entries: "OrderedDict[bytes, _Entry]" = OrderedDict()
        self.flights: Dict[bytes, "Flight"] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def fresh(self, key: bytes, now: float) -> Optional[Decision]:
        """The stored decision for C{key} (its C{cache} is C{"hit"}) if it has not expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now < entry.expires:
            self._entries.move_to_end(key)
            return entry.hit
        if now >= self._stale_until(entry):
            del self._entries[key]
        return None

    def _stale_until(self, entry: _Entry) -> float:
        if isinstance(entry.hit, Allow):
            return entry.expires + self.conf.stale_if_error
        return entry.expires

    def stale(self, key: bytes, now: float) -> Optional[Tuple[Allow, float]]:
        """
        An expired allow for C{key} still within C{stale_if_error}, and how
        many seconds ago it expired.  Denials are never served stale.
        """
        entry = self._entries.get(key)
        if entry is None or not isinstance(entry.hit, Allow) or now >= self._stale_until(entry):
            return None
        return attr.evolve(entry.hit, cache="stale"), max(0.0, now - entry.expires)

    def store(self, key: bytes, decision: Decision, seconds: float, now: float) -> None:
        """Keep C{decision} for C{seconds} (an allow for C{stale_if_error} more, when stale)."""
        if isinstance(decision, Allow):
            # The whole answer's headers stay out of the cache: only the
            # upstream_headers values are the decision (and memory per entry
            # stays what the configuration asks for).
            # Nor a cookie: lifetime() keeps answers with one out, and a
            # stored allow must never hand one user's cookie to another.
            hit: Decision = attr.evolve(decision, reply_headers=None, cookies=(), cache="hit")
        else:
            hit = attr.evolve(decision, cache="hit")
        entries = self._entries
        entries[key] = _Entry(hit, now + seconds)
        entries.move_to_end(key)
        while len(entries) > self.conf.max_entries:
            entries.popitem(last=False)

    def forget(self, key: bytes) -> None:
        """Drop C{key}'s decision: a newer answer superseded it."""
        self._entries.pop(key, None)
