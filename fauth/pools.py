# -*- test-case-name: tests.test_metrics -*-
"""
An L{HTTPConnectionPool} that can say, at any moment, how many of its
connections are idle and how many are carrying a request, per target: what
C{fauth_pool_connections} reports (L{fauth.metrics}).

Idle connections are the pool's own lists (C{_connections}, keyed by
C{(scheme, host, port)}).  Connections in use leave those lists, so the pool
also remembers every connection it opened (weakly: a closed connection is
forgotten once collected) and counts, when asked, those whose protocol is
in the middle of an exchange.  Nothing is done per request: one callback
per new connection, and the counting is done at scrape time.
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, Hashable, Tuple

from twisted.internet.defer import Deferred
from twisted.web import client as web_client

__all__ = ["TrackedPool", "target_label"]

# HTTP11ClientProtocol states in which a connection carries a request or its
# response (QUIESCENT is idle or about to be used; CONNECTION_LOST, ABORTING
# and GENERATION_FAILED are closing).
_BUSY = frozenset(["TRANSMITTING", "WAITING", "TRANSMITTING_AFTER_RECEIVING_RESPONSE"])


def target_label(key: Hashable) -> str:
    """
    C{host:port} of a pool key C{(scheme, host, port)} (IPv6 literals in
    brackets); any other key as C{str()}.
    """
    if isinstance(key, tuple) and len(key) == 3:
        _, host, port = key
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        host = host.strip("[]")
        return "%s:%s" % ("[%s]" % host if ":" in host else host, port)
    return str(key)


class TrackedPool(web_client.HTTPConnectionPool):  # type: ignore[misc]
    """
    An L{HTTPConnectionPool} that remembers the connections it opened, so
    L{connection_counts} can tell idle ones from those in use.
    """

    def __init__(self, reactor: Any, persistent: bool = True) -> None:
        super().__init__(reactor, persistent=persistent)
        self._opened: Dict[Hashable, "weakref.WeakSet[Any]"] = {}

    def _newConnection(self, key: Hashable, endpoint: Any) -> Deferred:
        d: Deferred = super()._newConnection(key, endpoint)

        def opened(protocol: Any) -> Any:
            known = self._opened.get(key)
            if known is None:
                known = self._opened[key] = weakref.WeakSet()
            known.add(protocol)
            return protocol

        return d.addCallback(opened)

    def connection_counts(self) -> Dict[Hashable, Tuple[int, int]]:
        """
        Per pool key: C{(idle, active)}.  Idle: kept for reuse; active:
        carrying a request or its response now (connections still being
        opened, and closing ones, are in neither).  Every key ever connected
        to is listed, with zeros once its connections are gone.
        """
        counts: Dict[Hashable, Tuple[int, int]] = {}
        for key, protocols in list(self._opened.items()):
            active = 0
            for protocol in list(protocols):
                state = getattr(protocol, "state", None)
                if state in _BUSY:
                    active += 1
                elif state == "CONNECTION_LOST":
                    protocols.discard(protocol)
            counts[key] = (0, active)
        for key, idle in self._connections.items():
            counts[key] = (len(idle), counts.get(key, (0, 0))[1])
        return counts
