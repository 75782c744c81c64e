"""
C{/metrics} on the supervisor of C{--workers N}: the sum over its workers,
so that a scraper sees one gateway.
"""
from __future__ import annotations

import re
from typing import Any, AsyncIterator

import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred
from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool

from fauth.observe.metrics import exposition_of, merge_expositions
from tests.adminenv import KEY, Slow, free_ports
from tests.servers import listen_on_loopback
from tests.process.test_workers import both_workers_hold_connections, start, stop, wait_ready_async


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@async_yield_fixture
async def upstream(reactor: Any) -> AsyncIterator[str]:
    port = await listen_on_loopback(reactor, Slow(reactor, 0.25))
    try:
        yield "127.0.0.1:%d" % port.getHost().port
    finally:
        await port.stopListening()


def _value(text: str, pattern: str) -> float:
    match = re.search("^" + pattern + r" ([0-9.e+]+)$", text, re.M)
    assert match, text
    return float(match.group(1))


def test_merge_sums_samples_and_keeps_what_is_not_a_sum() -> None:
    one = (
        "# HELP fauth_http_requests_total r\n# TYPE fauth_http_requests_total counter\n"
        'fauth_http_requests_total{route="1",status="200"} 3.0\n'
        "# HELP process_start_time_seconds s\n# TYPE process_start_time_seconds gauge\n"
        "process_start_time_seconds 100.0\n"
        "# HELP python_info i\n# TYPE python_info gauge\n"
        'python_info{implementation="CPython"} 1.0\n'
    )
    two = one.replace("3.0", "4.0").replace("100.0", "90.0") + (
        "# HELP fauth_http_requests_total r\n# TYPE fauth_http_requests_total counter\n"
        'fauth_http_requests_total{route="2",status="404"} 1.0\n'
    )
    text = exposition_of(merge_expositions([one, two]))[0].decode()
    assert _value(text, r'fauth_http_requests_total\{route="1",status="200"\}') == 7.0
    assert _value(text, r'fauth_http_requests_total\{route="2",status="404"\}') == 1.0
    assert _value(text, "process_start_time_seconds") == 90.0
    assert _value(text, r'python_info\{implementation="CPython"\}') == 1.0


@ensureDeferred
async def test_supervisor_metrics_are_the_sum_over_workers(reactor: Any, tmp_path: Any, upstream: str) -> None:
    port, admin_port = free_ports(2)
    doc = {
        "listen": ["tcp:%d:interface=127.0.0.1" % port],
        "admin": {
            "listen": "tcp:%d:interface=127.0.0.1" % admin_port,
            "keys": [KEY],
            "store": str(tmp_path / "store.json"),
        },
        "routes": [{"id": "1", "uri": "/m", "upstream": {"nodes": {upstream: 1}}}],
    }
    s = start(tmp_path, doc, ("--workers", "2"))
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(Agent(reactor, pool=pool))
    try:
        await wait_ready_async(reactor, s, 2)
        url = "http://127.0.0.1:%d/m" % port
        # Spread over both workers (each holds some connections), then count.
        for _ in range(5):
            counts = await both_workers_hold_connections(reactor, s, port, url)
            if all(counts[pid] > 0 for pid in s.workers()):
                break
        assert all(counts[pid] > 0 for pid in s.workers()), counts
        response = await client.get("http://127.0.0.1:%d/metrics" % admin_port)
        first = (await response.content()).decode()
        assert response.code == 200, first
        assert _value(first, "fauth_workers") == 2.0
        before = _value(first, r'fauth_http_requests_total\{route="1",status="200"\}')
        for _ in range(10):
            answer = await client.get(url)
            await answer.content()
        response = await client.get("http://127.0.0.1:%d/metrics" % admin_port)
        text = (await response.content()).decode()
        assert _value(text, r'fauth_http_requests_total\{route="1",status="200"\}') == before + 10
        # Histograms too: one upstream exchange per request, over both workers.
        assert _value(text, r'fauth_upstream_duration_seconds_count\{route="1"\}') == before + 10
        # Admin writes are the supervisor's own count.
        answer = await client.put(
            "http://127.0.0.1:%d/apisix/admin/routes/2" % admin_port,
            data=b'{"uri": "/n", "upstream": {"nodes": {"%s": 1}}}' % upstream.encode(),
            headers={"X-API-KEY": KEY},
        )
        assert answer.code == 201, await answer.content()
        response = await client.get(
            "http://127.0.0.1:%d/metrics" % admin_port, headers={"Accept": "application/openmetrics-text"}
        )
        text = (await response.content()).decode()
        assert text.rstrip().endswith("# EOF")
        assert _value(text, r'fauth_store_writes_total\{result="ok"\}') == 1.0
        assert "metrics" not in [line.split("] ", 1)[-1] for line in s.log().splitlines()]
    finally:
        await pool.closeCachedConnections()
        stop(s)
