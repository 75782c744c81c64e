"""
Node selection (L{fauth.routing.balancer}) and the retry loop of the
upstream leg (L{fauth.upstream.proxy._Tries}), without sockets.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, List

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from fauth.config import Node, UpstreamConf
from fauth.routing.balancer import Balancer, ConsistentHash, LeastConnections, SmoothWeightedRoundRobin
from fauth.routing.health import connect_failed
from fauth.upstream.proxy import _Retries, _Tries
from tests.harness import outcome

A, B, C, D = (Node(h, 80) for h in "abcd")


def test_round_robin_skips_tried_nodes_and_ends_with_none() -> None:
    rr = SmoothWeightedRoundRobin([Node("a", 80, 5), B, C])
    assert rr.pick(tried={Node("a", 80, 5)}) in (B, C)
    assert rr.pick(tried={Node("a", 80, 5), B}) == C
    assert rr.pick(tried={Node("a", 80, 5), B, C}) is None


def test_priority_lower_nodes_only_after_every_higher_one_was_tried() -> None:
    high1, high2 = Node("h1", 80, 1, 10), Node("h2", 80, 1, 10)
    low = Node("low", 80, 1, -1)
    mid = Node("mid", 80, 1, 0)
    balancer = Balancer("roundrobin", [low, mid, high1, high2])
    # A healthy primary set: the backups never get a request.
    assert {balancer.pick() for _ in range(20)} == {high1, high2}
    assert balancer.pick(tried={high1}) == high2
    assert balancer.pick(tried={high1, high2}) == mid
    assert balancer.pick(tried={high1, high2, mid}) == low
    assert balancer.pick(tried={high1, high2, mid, low}) is None


def test_one_usable_node_is_single_and_weight_zero_nodes_are_never_picked() -> None:
    balancer = Balancer("roundrobin", [Node("zero", 80, 0), A])
    assert balancer.single == A
    assert Balancer("roundrobin", [A, B]).single is None


def test_least_connections_counts_requests_in_flight() -> None:
    lc = LeastConnections([A, Node("b", 80, 2)])
    heavy = Node("b", 80, 2)
    # Scores (n + 1) / weight: b (0.5) first, then a and b tie at 1 (a, first listed).
    assert [lc.pick() for _ in range(3)] == [heavy, A, heavy]
    assert lc.active == {A: 1, heavy: 2}
    lc.release(heavy)
    lc.release(heavy)
    assert lc.pick() == heavy
    assert lc.pick(tried={heavy}) == A


def test_consistent_hash_same_key_same_node_and_moves_little_when_a_node_goes() -> None:
    four = ConsistentHash([A, B, C, D])
    keys = ["user-%d" % i for i in range(400)]
    placed = {k: four.pick(k) for k in keys}
    assert all(four.pick(k) == placed[k] for k in keys)
    assert set(Counter(placed.values())) == {A, B, C, D}
    three = ConsistentHash([A, B, C])
    moved = [k for k in keys if placed[k] != D and three.pick(k) != placed[k]]
    # Only D's keys move (a modulo hash would move about three quarters).
    assert moved == []
    # A retry goes to another node, and none is left once all were tried.
    first = four.pick("k")
    assert four.pick("k", tried={first}) not in (first, None)
    assert four.pick("k", tried={A, B, C, D}) is None


def test_connect_failed_tells_connection_failures_from_the_rest() -> None:
    assert connect_failed(Failure(net_error.ConnectionRefusedError()))
    assert connect_failed(Failure(net_error.TimeoutError()))
    assert connect_failed(Failure(net_error.DNSLookupError("x")))
    assert not connect_failed(Failure(net_error.ConnectingCancelledError(None)))
    assert not connect_failed(Failure(net_error.ConnectionLost()))


def _tries(conf: UpstreamConf, clock: Clock, sent: List[Node], cancelled: Any = None) -> Any:
    def canceller(d: Deferred) -> None:
        if cancelled is not None:
            cancelled.append(d)

    first: Deferred = Deferred(canceller)
    pending: List[Deferred] = [first]

    def send(node: Node, error: str) -> Deferred:
        sent.append(node)
        d: Deferred = Deferred(canceller)
        pending.append(d)
        return d

    balancer = Balancer(conf.type, conf.nodes)
    node = balancer.pick()
    assert node is not None
    sent.append(node)
    return _Tries(_Retries(clock, balancer, conf, node, None), first, send), pending


def test_tries_stop_at_retries_and_keep_the_last_failure() -> None:
    clock, sent = Clock(), []  # type: ignore[var-annotated]
    conf = UpstreamConf(nodes=(A, B, C), retries=1)
    tries, pending = _tries(conf, clock, sent)
    result = outcome(tries.result)
    pending[0].errback(net_error.ConnectionRefusedError())
    assert len(sent) == 2 and sent[0] != sent[1]
    pending[1].errback(net_error.ConnectionRefusedError())
    assert len(sent) == 2  # retries: 1 -> two tries in all
    assert isinstance(result[0], Failure) and result[0].check(net_error.ConnectionRefusedError)


def test_tries_do_not_retry_past_retry_timeout() -> None:
    clock, sent = Clock(), []  # type: ignore[var-annotated]
    conf = UpstreamConf(nodes=(A, B, C), retry_timeout=2.0)
    tries, pending = _tries(conf, clock, sent)
    result = outcome(tries.result)
    clock.advance(3)
    pending[0].errback(net_error.ConnectionRefusedError())
    assert len(sent) == 1
    assert result[0].check(net_error.ConnectionRefusedError)


def test_tries_never_retry_a_failure_after_connecting() -> None:
    clock, sent = Clock(), []  # type: ignore[var-annotated]
    tries, pending = _tries(UpstreamConf(nodes=(A, B)), clock, sent)
    result = outcome(tries.result)
    pending[0].errback(net_error.ConnectionLost())
    assert len(sent) == 1 and result[0].check(net_error.ConnectionLost)


def test_cancelling_the_tries_cancels_the_try_in_progress() -> None:
    clock, sent, cancelled = Clock(), [], []  # type: ignore[var-annotated]
    tries, pending = _tries(UpstreamConf(nodes=(A, B)), clock, sent, cancelled)
    result = outcome(tries.result)
    pending[0].errback(net_error.ConnectionRefusedError())
    tries.result.cancel()
    assert cancelled == [pending[1]]
    assert len(sent) == 2 and result[0].check(CancelledError)
