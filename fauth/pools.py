# -*- test-case-name: tests.test_metrics -*-
"""
Pools of L{ClientConnection}s, one per leg: idle connections kept per
C{(scheme, host, port)} for reuse, and counted, idle and busy, for
C{fauth_pool_connections} (L{fauth.metrics}).

Twisted's C{HTTPConnectionPool} does per request what is done here per
connection or per expiry: it wraps every reused connection in a retrying
proxy handed out through a fired Deferred, and schedules and cancels a
reactor timer each time a connection goes back and comes out.  Here a
connection going back is stamped with the time, one timer per pool closes
those idle longer than the timeout, and the most recently used connection
is reused first, so the others can age out after a burst.
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, Hashable, List, Tuple

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseNeverReceived

from fauth.connection import ClientConnection, ClientRequest

__all__ = ["ConnectionPool", "target_label"]

# Methods a request may be sent again for, when a reused connection turns
# out to have been closed before it answered (RFC 9110 section 9.2.2).
_RETRYABLE = frozenset([b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"])
# ClientConnection states: ready for a request, carrying one, and gone.
_IDLE = "QUIESCENT"
_BUSY = "WAITING"
_LOST = "CONNECTION_LOST"


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


class _Factory(Factory):
    # One "Starting factory" log line per connection is noise.
    noisy = False

    def __init__(self, pool: "ConnectionPool", key: Hashable) -> None:
        self._pool = pool
        self._key = key

    def buildProtocol(self, addr: Any) -> ClientConnection:
        key, pool = self._key, self._pool
        connection = ClientConnection(lambda c: pool._put(key, c))
        pool._opened.setdefault(key, weakref.WeakSet()).add(connection)
        return connection


class ConnectionPool:
    """
    Connections for one leg.

    @ivar persistent: keep connections for reuse at all.
    @ivar max_idle: idle connections kept per target; past it, the oldest
        is closed.
    @ivar idle_timeout: seconds an idle connection is kept.
    """

    def __init__(self, reactor: Any, persistent: bool = True, max_idle: int = 2, idle_timeout: float = 60.0) -> None:
        self._reactor = reactor
        self.persistent = persistent
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        # Per target, oldest first: (connection, when it went idle).
        self._idle: Dict[Hashable, List[Tuple[ClientConnection, float]]] = {}
        self._opened: Dict[Hashable, "weakref.WeakSet[ClientConnection]"] = {}
        self._sweep: Any = None
        self._closed = False

    def request(self, key: Hashable, endpoint: Any, request: ClientRequest) -> Deferred:
        """
        Send C{request} over an idle connection to C{key}, or a new one
        from C{endpoint}; see L{ClientRequest} for what the result fires
        with.  A reused connection that fails before any answer is
        replaced once, for a request that can be sent again.
        """
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()[0]
            if connection.state == _IDLE:
                d = connection.request(request)
                if not request.has_body and request.method in _RETRYABLE:
                    d.addErrback(self._retry, key, endpoint, request)
                return d
        return self._connect(key, endpoint, request)

    def _connect(self, key: Hashable, endpoint: Any, request: ClientRequest) -> Deferred:
        return endpoint.connect(_Factory(self, key)).addCallback(_send, request)

    def _retry(self, failure: Failure, key: Hashable, endpoint: Any, request: ClientRequest) -> Any:
        if not failure.check(ResponseNeverReceived):
            return failure
        return self._connect(key, endpoint, request)

    def _put(self, key: Hashable, connection: ClientConnection) -> None:
        if not self.persistent or self._closed:
            connection.transport.loseConnection()
            return
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.max_idle:
            oldest = idle.pop(0)[0]
            oldest.transport.loseConnection()
        idle.append((connection, self._reactor.seconds()))
        if self._sweep is None:
            self._sweep = self._reactor.callLater(self.idle_timeout, self._expire)

    def _expire(self) -> None:
        self._sweep = None
        now = self._reactor.seconds()
        deadline = now - self.idle_timeout
        oldest = None
        for key, idle in list(self._idle.items()):
            while idle and (idle[0][1] <= deadline or idle[0][0].state != _IDLE):
                idle.pop(0)[0].transport.loseConnection()
            if idle:
                oldest = idle[0][1] if oldest is None else min(oldest, idle[0][1])
            else:
                del self._idle[key]
        if oldest is not None:
            self._sweep = self._reactor.callLater(oldest + self.idle_timeout - now, self._expire)

    def connection_counts(self) -> Dict[Hashable, Tuple[int, int]]:
        """
        Per target: C{(idle, active)}.  Idle: kept for reuse; active:
        carrying a request or its response now (connections still being
        opened, and closing ones, are in neither).  Every target ever
        connected to is listed, with zeros once its connections are gone.
        """
        counts: Dict[Hashable, Tuple[int, int]] = {}
        for key, connections in list(self._opened.items()):
            active = 0
            for connection in list(connections):
                state = connection.state
                if state == _BUSY:
                    active += 1
                elif state == _LOST:
                    connections.discard(connection)
            counts[key] = (0, active)
        for key, idle in self._idle.items():
            alive = sum(1 for connection, _ in idle if connection.state == _IDLE)
            counts[key] = (alive, counts.get(key, (0, 0))[1])
        return counts

    def close(self) -> Deferred:
        """
        Close every idle connection, and each busy one as its exchange ends;
        fires once the idle ones are closed.
        """
        self._closed = True
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        idle, self._idle = self._idle, {}
        return gatherResults(
            [connection.abort() for connections in idle.values() for connection, _ in connections]
        ).addCallback(lambda _: None)


def _send(connection: ClientConnection, request: ClientRequest) -> Deferred:
    return connection.request(request)
