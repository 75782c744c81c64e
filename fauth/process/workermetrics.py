# -*- test-case-name: tests.process.test_workers_metrics -*-
"""
The supervisor's C{/metrics}: the sum over its workers, so that a scraper
sees one gateway (each worker is asked through its standard input and
answers on its event pipe; L{fauth.process.supervisor.WorkerSupervisor}).
"""
from __future__ import annotations

from typing import Any, Dict, List, Protocol, Tuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

__all__ = ["SupervisorMetrics"]

log = Logger()


class _Workers(Protocol):
    """What the sum needs of the supervisor."""

    outcomes: Dict[Tuple[str, str], int]

    def collect_metrics(self) -> "Deferred[List[str]]":
        ...


class SupervisorMetrics(Resource):
    """
    C{GET /metrics} on the supervisor's admin listener: the sum over its
    workers (each asked through its standard input, answering on its event
    pipe), so that a scraper sees one gateway.  C{fauth_reloads_total} and
    C{fauth_store_writes_total} are the supervisor's own (it alone takes
    admin writes; every worker reloads when it does); C{fauth_workers} is
    how many workers answered (a worker that did not answer within
    L{fauth.process.supervisor.METRICS_TIMEOUT} is left out).
    """

    isLeaf = True

    def __init__(self, supervisor: _Workers) -> None:
        super().__init__()
        self._supervisor = supervisor

    def render_GET(self, request: Any) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        from fauth.observe.metrics import exposition_of, merge_expositions

        accept = request.getHeader(b"accept")
        outcomes = self._supervisor.outcomes

        def answer(texts: List[str]) -> None:
            own: Dict[str, Dict[Tuple[Tuple[str, str], ...], float]] = {
                "fauth_reloads": {(("result", r),): float(outcomes.get(("reload", r), 0)) for r in ("ok", "refused")},
                "fauth_store_writes": {
                    (("result", r),): float(outcomes.get(("store_write", r), 0)) for r in ("ok", "error")
                },
            }
            families = merge_expositions(texts, own)
            workers = GaugeMetricFamily("fauth_workers", "Worker processes whose metrics are summed here")
            workers.add_metric([], len(texts))
            families.append(workers)
            body, content_type = exposition_of(families, accept.decode("latin-1") if accept else None)
            if not request.finished and not getattr(request, "_disconnected", False):
                request.setHeader(b"content-type", content_type.encode("ascii"))
                request.setHeader(b"cache-control", b"no-store")
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            log.failure("/metrics: collecting from the workers failed", failure)
            if not request.finished and not getattr(request, "_disconnected", False):
                request.setResponseCode(500)
                request.finish()

        self._supervisor.collect_metrics().addCallback(answer).addErrback(failed)
        return NOT_DONE_YET
