# -*- test-case-name: tests.observe.test_metrics -*-
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
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Protocol, Tuple

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from twisted.web.resource import Resource

from fauth.config.models import GatewayConf
from fauth.observe.accesslog import AccessLog
from fauth.observe.exchange import CACHE_RESULTS, OUTCOMES, RouteMetrics
from fauth.wire.pool import target_label

__all__ = [
    "GatewayCollector",
    "GatewayMetrics",
    "GatewayState",
    "MetricsResource",
]


class _Client(Protocol):
    pool: Any


class _AuthNodes(Protocol):
    label: str
    calls: Dict[Any, Dict[str, int]]
    health: Any


class _AuthClients(Protocol):
    def clients(self) -> Iterable[_Client]:
        ...

    def node_sets(self) -> Iterable[_AuthNodes]:
        ...


class GatewayState(Protocol):
    """What a scrape reads of the running gateway (L{fauth.edge.gateway.Gateway})."""

    conf: GatewayConf
    upstream_pool: Any

    @property
    def auth_clients(self) -> _AuthClients:
        ...

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
        gateway: GatewayState,
        in_flight: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.gateway = gateway
        self.in_flight = in_flight
        self.clock = clock
        self.access_log: Optional[AccessLog] = None
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
        cache_routes = set()
        for route_conf in conf.routes:
            m.route(route_conf.id)
            if route_conf.forward_auth is not None:
                auth_routes.add(route_conf.id)
                if route_conf.forward_auth.cache is not None:
                    cache_routes.add(route_conf.id)
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
            "redirect (such an answer turned into a sign-in redirect), auth_server (a path of the auth service "
            "itself, not checked), error (transport failure or unbuildable auth request, answered with "
            "status_on_error), degraded (the same failure let through by allow_degradation), rejected (413 before "
            "any auth call), preflight (a CORS preflight let through without an auth call: run_on_preflight false).",
            labels=["route", "outcome"],
        )
        auth = HistogramMetricFamily(
            "fauth_auth_duration_seconds",
            "Time from the start of the auth check to its decision (every outcome but rejected and preflight).",
            labels=["route"],
        )
        upstream = HistogramMetricFamily(
            "fauth_upstream_duration_seconds",
            "Time from sending a request upstream to its response headers (failed exchanges are not observed).",
            labels=["route"],
        )
        cache = CounterMetricFamily(
            "fauth_auth_cache",
            "Forward-auth decisions of routes with a cache: hit (stored decision), miss (auth service asked), "
            "coalesced (shared an identical call in flight), stale (expired allow served while the auth "
            "service failed), uncacheable (asked; the answer forbade reuse).",
            labels=["route", "result"],
        )
        for r in everything[1:]:
            if r.route in auth_routes or any(r.decisions.values()):
                for outcome in OUTCOMES:
                    decisions.add_metric([r.route, outcome], r.decisions[outcome])
                auth.add_metric([r.route], r.auth.cumulative(), r.auth.sum)
            if r.route in cache_routes or any(r.cache.values()):
                for result in CACHE_RESULTS:
                    cache.add_metric([r.route, result], r.cache[result])
            upstream.add_metric([r.route], r.upstream.cumulative(), r.upstream.sum)
        yield decisions
        yield cache
        yield auth
        yield upstream

        upgrades = CounterMetricFamily(
            "fauth_websocket_upgrades",
            "WebSocket upgrades the upstream accepted (101 relayed), by route.",
            labels=["route"],
        )
        tunnels = GaugeMetricFamily(
            "fauth_websocket_tunnels", "WebSocket tunnels open now, by route.", labels=["route"]
        )
        for r in everything[1:]:
            if r.upgrades:
                upgrades.add_metric([r.route], r.upgrades)
                tunnels.add_metric([r.route], r.tunnels)
        yield upgrades
        yield tunnels

        cookies = CounterMetricFamily(
            "fauth_auth_cookies",
            "Allowed requests whose response carried the auth service's cookies (allow_cookies), by route.",
            labels=["route"],
        )
        for r in everything[1:]:
            if r.cookies:
                cookies.add_metric([r.route], r.cookies)
        yield cookies

        node_calls = CounterMetricFamily(
            "fauth_auth_node_calls",
            "Calls to each node of a forward-auth with nodes (auth: its uri without the query): answered "
            "(any status), failed (no answer after the request may have been sent; not tried again), "
            "unreachable (no connection; the next node was tried, if any).",
            labels=["auth", "node", "result"],
        )
        node_up = GaugeMetricFamily(
            "fauth_auth_node_up",
            "1 while a node of a forward-auth with nodes may be picked, 0 while its failures or its "
            "active checks leave it out.",
            labels=["auth", "node"],
        )
        for nodes in sorted(m.gateway.auth_clients.node_sets(), key=lambda n: n.label):
            for node, results in nodes.calls.items():
                for result, count in results.items():
                    node_calls.add_metric([nodes.label, node.netloc, result], count)
                node_up.add_metric([nodes.label, node.netloc], 1 if nodes.health.usable(node) else 0)
        yield node_calls
        yield node_up

        failed = GaugeMetricFamily(
            "fauth_route_failed_closed",
            "1 for each route that arrived (from etcd) but cannot run: it answers 503 until a valid version "
            "arrives; the log says why.",
            labels=["route"],
        )
        for route_conf in conf.routes:
            if route_conf.failure is not None:
                failed.add_metric([route_conf.id], 1)
        yield failed

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
# Per route or per object, the same in every worker that has it: a sum would count workers.
_TAKE_MAX = frozenset(["python_info", "fauth_route_failed_closed", "fauth_etcd_skipped_objects"])


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
    registry.register(_Families(families))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
