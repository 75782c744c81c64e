# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics of a running gateway, served as C{GET /metrics} on the
admin listener.

The hot path only adds to plain Python numbers: one L{Exchange} per request
(timestamps with C{time.perf_counter()}), one L{RouteMetrics} per route id
(found with one dict lookup, kept across reloads), and histograms counted
with one C{bisect}.  No label string is built per request.  At scrape time
L{GatewayCollector} turns these numbers, and what it reads from the
connection pools, the in-flight counter and the reload and store-write
counts, into metric families of a L{CollectorRegistry} that belongs to one
L{GatewayMetrics} (never the global registry: tests and embedders build
several gateways in one process).

The reactor is single-threaded and a scrape runs in it too, so nothing is
locked.
"""
from __future__ import annotations

import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from fauth.request.lifecycle import when_finished
from fauth.wire.pool import target_label

if TYPE_CHECKING:
    from fauth.observe.accesslog import AccessLog
    from fauth.auth.decision import Decision
    from fauth.edge.gateway import Gateway

__all__ = [
    "DURATION_BUCKETS",
    "OUTCOMES",
    "Exchange",
    "GatewayCollector",
    "GatewayMetrics",
    "MetricsResource",
    "RouteMetrics",
]

#: Upper bounds (seconds) of the latency histograms, 0.5 ms to 10 s; +Inf is implicit.
DURATION_BUCKETS: Tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
_BUCKET_LABELS = tuple(floatToGoString(b) for b in DURATION_BUCKETS) + ("+Inf",)

#: Values of the C{outcome} label of C{fauth_auth_decisions_total}.
OUTCOMES = ("allow", "deny", "error", "degraded", "rejected")

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
    """

    __slots__ = ("route", "statuses", "decisions", "auth", "upstream")

    def __init__(self, route: str) -> None:
        self.route = route
        self.statuses: Dict[int, int] = {}
        self.decisions: Dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.auth = Histogram()
        self.upstream = Histogram()


class Exchange:
    """
    What one request did, filled in as it goes: route, auth decision and
    timings.  Counted in its L{RouteMetrics} at each step; the response
    status (and the access log line, when there is one) when it finishes.
    """

    __slots__ = (
        "request", "route", "decision", "auth_s", "upstream_s",
        "_metrics", "_clock", "_start", "_auth_start", "_upstream_start",
    )

    def __init__(self, metrics: "GatewayMetrics", request: Any) -> None:
        self._metrics = metrics
        self._clock = clock = metrics.clock
        self._start = clock()
        self.request = request
        self.route = metrics.unrouted
        self.decision: Optional["Decision"] = None
        self.auth_s: Optional[float] = None
        self.upstream_s: Optional[float] = None
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
        if outcome != "rejected":  # 413: the auth service was not asked
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


class GatewayMetrics:
    """
    The metrics of one gateway, and their registry.

    @param gateway: read at scrape time (route table, connection pools).
    @param in_flight: the number of requests in flight now.
    @param clock: monotonic seconds for durations.
    @ivar registry: a dedicated L{CollectorRegistry} with the gateway's
        collector and the process collectors (C{process_*}, C{python_info}).
    @ivar access_log: the open L{AccessLog}, or C{None} (kept up to date by
        L{fauth.observe.accesslog.AccessLogService}).
    @ivar outcomes: reload and store-write counts, per C{(event, result)}.
    """

    def __init__(
        self,
        gateway: "Gateway",
        in_flight: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.gateway = gateway
        self.in_flight = in_flight
        self.clock = clock
        self.access_log: Optional["AccessLog"] = None
        self.unrouted = RouteMetrics("")
        self.routes: Dict[str, RouteMetrics] = {}
        self.outcomes: Dict[Tuple[str, str], int] = {
            ("reload", "ok"): 0,
            ("reload", "refused"): 0,
            ("store_write", "ok"): 0,
            ("store_write", "error"): 0,
        }
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(self))
        from prometheus_client import PlatformCollector, ProcessCollector

        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def route(self, route_id: str) -> RouteMetrics:
        """The numbers of C{route_id}, created on first use and kept across reloads."""
        metrics = self.routes.get(route_id)
        if metrics is None:
            metrics = self.routes[route_id] = RouteMetrics(route_id)
        return metrics

    def count_outcome(self, event: str, result: str) -> None:
        """A L{fauth.admin.control.Control.on_outcome} listener: count reloads and store writes."""
        key = (event, result)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1

    def exposition(self, accept: Optional[str] = None) -> Tuple[bytes, str]:
        """The registry in the format C{accept} asks for (Prometheus text by default) and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class GatewayCollector:
    """Builds the C{fauth_*} metric families from a L{GatewayMetrics} at scrape time."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        """Every C{fauth_*} family, computed now."""
        m = self._metrics
        conf = m.gateway.conf
        # Routes of the current table appear (at zero) before their first request.
        auth_routes = set()
        for route_conf in conf.routes:
            m.route(route_conf.id)
            if route_conf.forward_auth is not None:
                auth_routes.add(route_conf.id)
        everything = [m.unrouted] + [m.routes[k] for k in sorted(m.routes)]

        requests = CounterMetricFamily(
            "fauth_http_requests",
            "Responses by route id (empty: no route matched, or a 400 before routing) and status "
            "(499: the client went away before a response started).",
            labels=["route", "status"],
        )
        for r in everything:
            for status in sorted(r.statuses):
                requests.add_metric([r.route, str(status)], r.statuses[status])
        yield requests

        decisions = CounterMetricFamily(
            "fauth_auth_decisions",
            "Forward-auth decisions by route: allow (2xx), deny (the auth service's other answers), "
            "error (transport failure or unbuildable auth request, answered with status_on_error), "
            "degraded (the same failure let through by allow_degradation), rejected (413 before any auth call).",
            labels=["route", "outcome"],
        )
        auth = HistogramMetricFamily(
            "fauth_auth_duration_seconds",
            "Time from the start of the auth check to its decision (every outcome but rejected).",
            labels=["route"],
        )
        upstream = HistogramMetricFamily(
            "fauth_upstream_duration_seconds",
            "Time from sending a request upstream to its response headers (failed exchanges are not observed).",
            labels=["route"],
        )
        for r in everything[1:]:
            if r.route in auth_routes or any(r.decisions.values()):
                for outcome in OUTCOMES:
                    decisions.add_metric([r.route, outcome], r.decisions[outcome])
                auth.add_metric([r.route], r.auth.cumulative(), r.auth.sum)
            upstream.add_metric([r.route], r.upstream.cumulative(), r.upstream.sum)
        yield decisions
        yield auth
        yield upstream

        pools = GaugeMetricFamily(
            "fauth_pool_connections",
            "Connections to auth services and upstream nodes per target: idle (pooled for reuse) "
            "and active (carrying a request or its response).",
            labels=["leg", "target", "state"],
        )
        for leg, counts in sorted(self._pool_counts().items()):
            for target, (idle, active) in sorted(counts.items()):
                pools.add_metric([leg, target, "idle"], idle)
                pools.add_metric([leg, target, "active"], active)
        yield pools

        yield GaugeMetricFamily(
            "fauth_requests_in_flight", "Requests being handled now.", value=m.in_flight()
        )

        reloads = CounterMetricFamily(
            "fauth_reloads",
            "Reloads of the configuration file (SIGHUP, POST /apisix/admin/reload): ok or refused.",
            labels=["result"],
        )
        writes = CounterMetricFamily(
            "fauth_store_writes",
            "Admin API changes written to the store: ok, or error (the write failed; nothing changed).",
            labels=["result"],
        )
        for (event, result), count in sorted(m.outcomes.items()):
            if event == "reload":
                reloads.add_metric([result], count)
            elif event == "store_write":
                writes.add_metric([result], count)
        yield reloads
        yield writes

    def _pool_counts(self) -> Dict[str, Dict[str, Tuple[int, int]]]:
        gateway = self._metrics.gateway
        legs: Dict[str, Dict[str, Tuple[int, int]]] = {"auth": {}, "upstream": {}}
        pools = [("auth", client.pool) for client in gateway.auth_clients.clients()]
        pools.append(("upstream", gateway.upstream_pool))
        for leg, pool in pools:
            counts = getattr(pool, "connection_counts", None)
            if counts is None:
                continue
            per_target = legs[leg]
            for key, (idle, active) in counts().items():
                target = target_label(key)
                before = per_target.get(target, (0, 0))
                per_target[target] = (before[0] + idle, before[1] + active)
        return legs


class MetricsResource(Resource):
    """C{GET /metrics}: the registry of a L{GatewayMetrics}, in Prometheus text (or OpenMetrics, if asked)."""

    isLeaf = True

    def __init__(self, metrics: GatewayMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        accept = request.getHeader(b"accept")
        body, content_type = self._metrics.exposition(accept.decode("latin-1") if accept else None)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body


# --- several processes: the supervisor's sum over its workers -------------------

#: Families whose value is not a sum over processes: the earliest start,
#: the smallest descriptor limit, the stalest etcd revision; an info gauge
#: is 1, not N.
_TAKE_MIN = frozenset(["process_start_time_seconds", "process_max_fds", "fauth_etcd_revision"])
_TAKE_MAX = frozenset(["python_info"])


def merge_expositions(texts: List[str], own: Optional[Dict[str, Dict[Tuple[Tuple[str, str], ...], float]]] = None) -> List[Metric]:
    """
    One set of metric families from the Prometheus text of several worker
    processes: the sum of each sample (same name, same labels), except the
    few where a sum means nothing (L{_TAKE_MIN}, L{_TAKE_MAX}).

    @param own: families the caller counts itself, by family name, then
        sorted label pairs: those replace the workers' (the supervisor's
        reloads and admin store writes, which it alone makes).
    """
    from prometheus_client.parser import text_string_to_metric_families

    families: Dict[str, Metric] = {}
    values: Dict[str, Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            merged = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in merged:
                    merged[key] = sample.value
                elif family.name in _TAKE_MIN or sample.name.endswith("_created"):
                    merged[key] = min(merged[key], sample.value)
                elif family.name in _TAKE_MAX:
                    merged[key] = max(merged[key], sample.value)
                else:
                    merged[key] = merged[key] + sample.value
    for name, counts in (own or {}).items():
        if name in families:
            sample_name = name + "_total" if families[name].type == "counter" else name
            values[name] = {(sample_name, labels): value for labels, value in counts.items()}
    result = []
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
        result.append(family)
    return result


class _Families:
    """A collector that yields given families (for an encoder)."""

    def __init__(self, families: List[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def exposition_of(families: List[Metric], accept: Optional[str] = None) -> Tuple[bytes, str]:
    """C{families} encoded as C{accept} asks (Prometheus text by default), and the content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))  # type: ignore[arg-type]
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
