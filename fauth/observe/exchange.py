# -*- test-case-name: tests.observe.test_metrics -*-
"""
What one request did, counted as it goes: an L{Exchange} per request, whose
steps add to plain Python numbers in the L{RouteMetrics} of its route (one
dict lookup per route id, histograms counted with one C{bisect}); no label
string is built per request.  L{fauth.observe.metrics} turns the numbers
into metric families at scrape time; the access log writes one line per
finished exchange.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol, Tuple

from prometheus_client.utils import floatToGoString
from twisted.python.failure import Failure

from fauth.request.lifecycle import when_finished

if TYPE_CHECKING:
    from fauth.auth.decision import Decision

__all__ = [
    "CACHE_RESULTS",
    "CLIENT_CLOSED",
    "DURATION_BUCKETS",
    "OUTCOMES",
    "Exchange",
    "ExchangeLog",
    "Histogram",
    "RouteMetrics",
    "Tally",
]

#: Upper bounds (seconds) of the latency histograms, 0.5 ms to 10 s; +Inf is implicit.
DURATION_BUCKETS: Tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
_BUCKET_LABELS = tuple(floatToGoString(b) for b in DURATION_BUCKETS) + ("+Inf",)

#: Values of the C{outcome} label of C{fauth_auth_decisions_total}.
OUTCOMES = ("allow", "deny", "redirect", "error", "degraded", "rejected", "preflight", "auth_server")

# Outcomes decided without asking the auth service (413, a CORS preflight
# let through, a path of the auth service itself): no auth duration.
_NOT_ASKED = frozenset(["rejected", "preflight", "auth_server"])

#: Values of the C{result} label of C{fauth_auth_cache_total}, and of a
#: decision's C{cache}: C{hit} (a stored decision), C{miss} (the auth
#: service was asked), C{coalesced} (shared an identical request's call in
#: flight), C{stale} (an expired allow, served while the auth service
#: fails), C{uncacheable} (asked; its answer forbade reuse: C{no-store},
#: C{private}, C{no-cache}, C{max-age=0} or C{Set-Cookie}).
CACHE_RESULTS = ("hit", "miss", "coalesced", "stale", "uncacheable")

#: The C{status} of a request whose client went away before a response
#: started (nginx's convention).
CLIENT_CLOSED = 499


class Histogram:
    """Counts per bucket of L{DURATION_BUCKETS} (not cumulative) and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one duration."""
        # bisect_left: a value equal to a bound belongs to that bound ("le").
        self.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> List[Tuple[str, int]]:
        """C{(le, count)} pairs as Prometheus wants them."""
        total = 0
        buckets = []
        for label, count in zip(_BUCKET_LABELS, self.counts):
            total += count
            buckets.append((label, total))
        return buckets


class RouteMetrics:
    """
    The numbers of one route id (C{""} for requests no route matched).

    @ivar statuses: responses per status code.
    @ivar decisions: auth decisions per outcome (see L{OUTCOMES}).
    @ivar cache: decisions of a route with C{cache} by how the cache made
        them (see L{CACHE_RESULTS}).
    @ivar upgrades: WebSocket upgrades the upstream accepted (101).
    @ivar tunnels: WebSocket tunnels open now.
    @ivar cookies: allowed requests given the auth service's cookies.
    """

    __slots__ = ("route", "statuses", "decisions", "cache", "auth", "upstream", "upgrades", "tunnels", "cookies")

    def __init__(self, route: str) -> None:
        self.route = route
        self.statuses: Dict[int, int] = {}
        self.decisions: Dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.cache: Dict[str, int] = dict.fromkeys(CACHE_RESULTS, 0)
        self.auth = Histogram()
        self.upstream = Histogram()
        self.upgrades = 0
        self.tunnels = 0
        self.cookies = 0


class ExchangeLog(Protocol):
    """Where a finished exchange is written (the access log)."""

    def log(self, exchange: "Exchange", status: int) -> None:
        ...


class Tally(Protocol):
    """What an L{Exchange} adds to (a L{fauth.observe.metrics.GatewayMetrics})."""

    clock: Callable[[], float]
    unrouted: "RouteMetrics"

    @property
    def access_log(self) -> Optional[ExchangeLog]:
        ...

    def route(self, route_id: str) -> "RouteMetrics":
        ...


class Exchange:
    """
    What one request did, filled in as it goes: route, auth decision and
    timings.  Counted in its L{RouteMetrics} at each step; the response
    status (and the access log line, when there is one) when it finishes.
    """

    __slots__ = (
        "request", "route", "decision", "auth_s", "upstream_s", "tunnel_up", "client_addr",
        "_metrics", "_clock", "_start", "_auth_start", "_upstream_start",
    )

    def __init__(self, metrics: Tally, request: Any) -> None:
        self._metrics = metrics
        self._clock = clock = metrics.clock
        self._start = clock()
        self.request = request
        self.route = metrics.unrouted
        self.decision: Optional["Decision"] = None
        self.auth_s: Optional[float] = None
        self.upstream_s: Optional[float] = None
        # Bytes from the client to the upstream through a WebSocket tunnel,
        # once it closed (the other way is the request's sentLength).
        self.tunnel_up: Optional[int] = None
        # The client behind trusted_proxies, when it is not the peer.
        self.client_addr: Optional[str] = None
        when_finished(request, self._finished)

    @property
    def elapsed(self) -> float:
        """Seconds since the request reached the gateway."""
        return self._clock() - self._start

    def routed(self, route_id: str) -> None:
        """The request matched the route C{route_id}."""
        self.route = self._metrics.route(route_id)

    def auth_started(self) -> None:
        """The auth check begins."""
        self._auth_start = self._clock()

    def decided(self, decision: "Decision") -> None:
        """The auth check decided (C{decision.outcome})."""
        self.decision = decision
        outcome = decision.outcome
        route = self.route
        route.decisions[outcome] += 1
        cached = decision.cache
        if cached is not None:
            route.cache[cached] += 1
        if outcome == "allow" and decision.cookies:  # type: ignore[union-attr]  # an Allow
            route.cookies += 1
        if outcome not in _NOT_ASKED:
            self.auth_s = seconds = self._clock() - self._auth_start
            route.auth.observe(seconds)

    def upstream_started(self) -> None:
        """The request is being sent upstream."""
        self._upstream_start = self._clock()

    def upstream_answered(self) -> None:
        """The upstream's response headers arrived."""
        self.upstream_s = seconds = self._clock() - self._upstream_start
        self.route.upstream.observe(seconds)

    def upstream_failed(self) -> None:
        """The upstream leg failed (502/504): timed for the log, not observed."""
        self.upstream_s = self._clock() - self._upstream_start

    def tunnel_opened(self) -> None:
        """A 101 was relayed: the request is now a WebSocket tunnel."""
        self.route.upgrades += 1
        self.route.tunnels += 1

    def tunnel_closed(self, bytes_up: int, bytes_down: int) -> None:
        """The tunnel closed after C{bytes_up} bytes to the upstream and C{bytes_down} back."""
        self.route.tunnels -= 1
        self.tunnel_up = bytes_up

    def _finished(self, reason: Optional[Failure]) -> None:
        request = self.request
        if reason is None or request.startedWriting:
            status = request.code
        else:
            status = CLIENT_CLOSED
        statuses = self.route.statuses
        statuses[status] = statuses.get(status, 0) + 1
        access_log = self._metrics.access_log
        if access_log is not None:
            access_log.log(self, status)
