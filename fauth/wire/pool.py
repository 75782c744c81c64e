# -*- test-case-name: tests.wire.test_pool -*-
"""
L{StrictConnectionPool}: Twisted's L{HTTPConnectionPool} with fauth's strict
HTTP/1.1 connection (L{fauth.wire.connection.ClientConnection}) in place of
C{HTTP11ClientProtocol}.

The pooling is as Twisted's: C{getConnection} hands out an idle connection
(wrapped to retry an idempotent request once on a stale one) or opens a new
one, and a connection that finishes an exchange comes back through the
pool's quiescent callback, to be closed after C{cachedConnectionTimeout}
or when more than C{maxPersistentPerHost} are idle.  This subclass builds
different connections, remembers them per target for the
C{fauth_pool_connections} gauges, and keeps nothing once closed.

It also keeps the idle connections differently.  Twisted's pool arms a
reactor timer per connection each time one goes idle, and cancels it when
the connection is taken again: a heap push (comparisons in Python) and a
cancel per request and leg.  Here an idle connection only notes when it
went idle, and one timer per pool, armed for the oldest, closes what has
been idle too long.  The most recently idle connection is handed out
first (as nginx's upstream keep-alive does): the one least likely to have
been closed by the peer meanwhile, and under a steady load the surplus
goes idle for long enough to be closed.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Hashable, Optional, Tuple, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool, _RetryingHTTP11ClientProtocol

from fauth.wire.connection import ClientConnection

__all__ = ["StrictConnectionPool", "target_label"]

log = Logger()

_IDLE = "QUIESCENT"
_BUSY = "WAITING"


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


class _StrictFactory(Factory):
    """
    Builds L{ClientConnection}s; the signature is that of Twisted's
    C{_HTTP11ClientFactory}, what the pool's own C{_newConnection} builds.
    """

    # One "Starting factory" log line per connection is noise.
    noisy = False

    def __init__(self, quiescentCallback: Callable[[ClientConnection], None], metadata: Any) -> None:
        self._quiescentCallback = quiescentCallback
        self._metadata = metadata

    def buildProtocol(self, addr: Any) -> ClientConnection:
        return ClientConnection(self._quiescentCallback)


class StrictConnectionPool(HTTPConnectionPool):
    """
    An L{HTTPConnectionPool} of fauth's strict connections.

    @param persistent: keep connections for reuse at all (C{keepalive}).
    @param maxPersistentPerHost: idle connections kept per target
        (C{keepalive_pool}).
    @param cachedConnectionTimeout: seconds an idle connection is kept
        (C{keepalive_timeout}).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        persistent: bool = True,
        maxPersistentPerHost: int = 2,
        cachedConnectionTimeout: float = 60.0,
    ) -> None:
        super().__init__(reactor, persistent)
        self.maxPersistentPerHost = maxPersistentPerHost
        # Twisted's attribute is inferred from its default (240, an int);
        # the pool only hands it to callLater, which takes seconds as float.
        self.cachedConnectionTimeout = cachedConnectionTimeout  # type: ignore[assignment]
        self._opened: Dict[Hashable, "weakref.WeakSet[ClientConnection]"] = {}
        self._closed = False
        self._limits: Dict[Hashable, Tuple[int, float, int]] = {}
        # The one timer that closes connections idle for too long.
        self._sweep: Optional[IDelayedCall] = None

    def limit(self, key: Hashable, size: int, idle_timeout: float, requests: int) -> None:
        """
        An upstream's C{keepalive_pool} for target C{key}: at most C{size}
        idle connections, each kept C{idle_timeout} seconds and used for at
        most C{requests} requests (nginx's C{keepalive},
        C{keepalive_timeout} and C{keepalive_requests}).  The last call for
        a target wins, as the last upstream APISIX sets a pool with does.
        """
        self._limits[key] = (size, idle_timeout, requests)

    def getConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred:
        """
        A connection for one request to C{key}: the most recently idle one
        still open, or a new one (Twisted's, but last in, first out, and no
        timer to cancel).
        """
        connections = self._connections.get(key)
        while connections:
            connection = connections.pop()
            if connection.state == _IDLE:
                if self.retryAutomatically:
                    return succeed(_RetryingHTTP11ClientProtocol(connection, lambda: self._newConnection(key, endpoint)))
                return succeed(connection)
        return self._newConnection(key, endpoint)

    def _putConnection(self, key: Hashable, connection: Any) -> None:
        if connection.state != _IDLE:
            log.error("BUG: a connection in state {state} returned to the pool", state=connection.state)
            return
        size, idle_timeout, requests = self._target_limits(key)
        if requests is not None:
            connection.served += 1
            if connection.served >= requests:
                connection.abort()
                return
        connections = self._connections.get(key)
        if connections is None:
            connections = self._connections[key] = []
        if len(connections) >= size:
            if not connections:  # keep none
                connection.abort()
                return
            connections.pop(0).abort()  # the longest idle
        now = self._reactor.seconds()
        connection.idle_since = now
        connections.append(connection)
        sweep = self._sweep
        if sweep is None:
            self._sweep = self._reactor.callLater(idle_timeout, self._close_expired)
        elif sweep.getTime() > now + idle_timeout:
            sweep.reset(idle_timeout)  # rare: a target with a shorter timeout

    def _target_limits(self, key: Hashable) -> Tuple[int, float, Optional[int]]:
        """C{key}'s idle connections kept, idle timeout and requests per connection (C{None}: no limit)."""
        limits = self._limits.get(key)
        if limits is None:
            return self.maxPersistentPerHost, self.cachedConnectionTimeout, None
        return limits

    def _close_expired(self) -> None:
        """Close the connections idle for longer than their timeout; re-arm for the next."""
        self._sweep = None
        now = self._reactor.seconds()
        due: Optional[float] = None
        for key, connections in list(self._connections.items()):
            timeout = self._target_limits(key)[1]
            # Oldest first: each put appends, each get takes the newest.
            while connections and connections[0].idle_since + timeout <= now:
                connections.pop(0).abort()
            if connections:
                expiry = connections[0].idle_since + timeout
                due = expiry if due is None else min(due, expiry)
            else:
                del self._connections[key]
        if due is not None:
            self._sweep = self._reactor.callLater(due - now, self._close_expired)

    def _newConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred:
        # Twisted's, but the quiescent callback closes what a closed pool
        # would otherwise take back, and no repr(endpoint) per connection.
        def quiescentCallback(connection: ClientConnection) -> None:
            if self._closed or not self.persistent:
                transport = connection.transport
                assert transport is not None  # it just finished an exchange
                transport.loseConnection()
            else:
                self._putConnection(key, connection)

        opened = self._opened.get(key)
        if opened is None:
            opened = self._opened[key] = weakref.WeakSet()
        # The factory builds ClientConnections, which the endpoint's
        # Deferred fires with (typed as any IProtocol).
        connecting = cast("Deferred[ClientConnection]", endpoint.connect(_StrictFactory(quiescentCallback, key)))
        return connecting.addCallback(_remember, opened)

    def keep_idle(self, count: int) -> None:
        """
        Keep at most C{count} idle connections per target from now on;
        those already idle beyond it, the longest idle first, are closed
        now rather than as connections come back.
        """
        self.maxPersistentPerHost = count
        for idle in self._connections.values():
            while len(idle) > count:
                idle.pop(0).abort()

    def connection_counts(self) -> Dict[Hashable, Tuple[int, int]]:
        """
        Per target: C{(idle, active)}.  Idle: kept for reuse; active:
        carrying a request or its response now (connections still being
        opened, and closing ones, are in neither).  Every target ever
        connected to is listed, with zeros once its connections are gone.
        """
        counts: Dict[Hashable, Tuple[int, int]] = {}
        for key, connections in list(self._opened.items()):
            active = sum(1 for connection in list(connections) if connection.state == _BUSY)
            idle = sum(1 for connection in self._connections.get(key, ()) if connection.state == _IDLE)
            counts[key] = (idle, active)
        return counts

    def close(self) -> Deferred:
        """
        Close every idle connection, and each busy one as its exchange ends;
        fires once the idle ones are closed.
        """
        self._closed = True
        return self.closeCachedConnections()

    def closeCachedConnections(self) -> Deferred:
        """Close every idle connection (Twisted's), and stop the idle timer."""
        sweep, self._sweep = self._sweep, None
        if sweep is not None and sweep.active():
            sweep.cancel()
        return super().closeCachedConnections()


def _remember(connection: ClientConnection, opened: "weakref.WeakSet[ClientConnection]") -> ClientConnection:
    opened.add(connection)
    return connection
