# -*- test-case-name: tests.auth.test_targets -*-
"""
Several auth servers behind one C{forward-auth} (its C{nodes}, fauth's
own): each call goes to the next healthy node by smooth weighted
round-robin, and, when that node cannot be connected to, to the next one
not tried yet, within the one C{timeout}.  Only a connection failure moves
on: never an answer (a 5xx is relayed as from C{uri}), never a call whose
request may have reached a node.  Every node has its own L{AuthClient}
(treq over its own L{HTTPConnectionPool}); all are asked the same
question: C{uri}'s scheme, C{Host}, path and query.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import attr
from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool

from fauth import __version__
from fauth.auth.client import AuthCallError, AuthClient, AuthTarget, Reply
from fauth.config import AuthChecks, Node
from fauth.routing.balancer import Balancer
from fauth.routing.health import NodeHealth, connect_failed
from fauth.wire.transport import IClientReactor, describe_failure, is_cancellation

__all__ = ["AuthNodes", "NODE_RESULTS"]

log = Logger()

#: Values of the C{result} label of C{fauth_auth_node_calls_total}:
#: C{answered} (an HTTP answer, any status), C{failed} (no answer after the
#: request may have been sent: timeout, reset, bad answer; not tried
#: again), C{unreachable} (no connection; the next node was tried, if any).
NODE_RESULTS = ("answered", "failed", "unreachable")

MakeClient = Callable[[AuthTarget, Optional[HTTPConnectionPool]], AuthClient]


class AuthNodes:
    """
    The auth calls of one C{forward-auth} with C{nodes}; called as an
    L{AuthClient} is.

    @param target: C{uri}, parsed: what every node is asked.
    @param make_client: an L{AuthClient} for a target, on a given pool
        (C{None}: the client's own).
    @ivar label: C{uri} without its query, for the metrics.
    @ivar health: the nodes' L{NodeHealth}.
    @ivar calls: per node, the calls by result (L{NODE_RESULTS}).
    """

    def __init__(
        self,
        reactor: IClientReactor,
        target: AuthTarget,
        nodes: Sequence[Node],
        checks: AuthChecks,
        make_client: MakeClient,
    ) -> None:
        self._reactor = reactor
        self.host_header = target.host_header
        path = target.target.partition(b"?")[0].decode("ascii")
        self.label = "%s://%s%s" % (target.scheme, self.host_header.decode("ascii"), path)
        usable = [node for node in nodes if node.weight > 0]
        self._clients: Dict[Node, AuthClient] = {
            node: make_client(attr.evolve(target, host=node.host, port=node.port), None) for node in usable
        }
        self._balancer = Balancer("roundrobin", usable)
        self.health = NodeHealth(reactor.seconds, checks.max_fails, checks.fail_timeout)
        self.calls: Dict[Node, Dict[str, int]] = {node: dict.fromkeys(NODE_RESULTS, 0) for node in usable}
        self._probes: Optional[_Probes] = None
        if checks.active is not None:
            check_path = checks.active.http_path.encode("ascii")
            self._probes = _Probes(
                self.health,
                {
                    node: make_client(attr.evolve(target, host=node.host, port=node.port, target=check_path), client.pool)
                    for node, client in self._clients.items()
                },
                ((b"Host", self.host_header), (b"User-Agent", b"fauth/%s" % __version__.encode("ascii"))),
                checks.active.timeout,
            )
            self._probes.start(reactor, checks.active.interval)

    @property
    def checking(self) -> bool:
        """Active checks are running."""
        return self._probes is not None and self._probes.running

    def clients(self) -> List[AuthClient]:
        """Every node's client (for the pool metrics)."""
        return list(self._clients.values())

    def _pick(self, tried: Sequence[Node]) -> Optional[Node]:
        usable = self.health.usable
        skip = set(tried)
        skip.update(node for node in self._clients if not usable(node))
        return self._balancer.pick(None, skip)

    def call(
        self,
        method: str,
        fields: Sequence[Tuple[bytes, bytes]],
        body: Optional[bytes],
        timeout: float,
        target: Optional[bytes] = None,
    ) -> "Deferred[Reply]":
        """
        One auth exchange (as L{AuthClient.call}) on the next healthy
        node, then on others while the nodes cannot be connected to, all
        within C{timeout} seconds (C{target}: a per-request path and query,
        as L{AuthClient.call}).  Fails with L{AuthCallError} when no node is
        left.
        """
        node = self._pick(())
        if node is None:
            return fail(AuthCallError("no auth node available: all %d are down" % len(self._clients)))
        return _Call(self, (method, fields, body, target), self._reactor.seconds() + timeout, node).result

    def close(self) -> Deferred:
        """Stop the active checks; close every node's pooled connections."""
        if self._probes is not None:
            self._probes.stop()
        return DeferredList([client.close() for client in self._clients.values()])


class _Call:
    """One call's tries, node after node while connections fail."""

    def __init__(
        self,
        nodes: AuthNodes,
        args: Tuple[str, Sequence[Tuple[bytes, bytes]], Optional[bytes], Optional[bytes]],
        deadline: float,
        first: Node,
    ) -> None:
        self._nodes = nodes
        self._args = args
        self._deadline = deadline
        self._tried: List[Node] = []
        self._current: Optional[Deferred] = None
        self.result: "Deferred[Reply]" = Deferred(self._cancel)
        self._try(first)

    def _cancel(self, _: Deferred) -> None:
        if self._current is not None:
            self._current.cancel()

    def _try(self, node: Node) -> None:
        self._tried.append(node)
        left = self._deadline - self._nodes._reactor.seconds()
        if left <= 0:
            self.result.errback(AuthCallError("timeout"))
            return
        method, fields, body, target = self._args
        d = self._current = self._nodes._clients[node].call(method, fields, body, left, target)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(node,), errbackArgs=(node,))

    def _answered(self, reply: Reply, node: Node) -> None:
        self._nodes.health.succeeded(node)
        self._nodes.calls[node]["answered"] += 1
        if not self.result.called:
            self.result.callback(reply)

    def _failed(self, failure: Failure, node: Node) -> None:
        if self.result.called or is_cancellation(failure):
            return  # cancelled by the caller: no verdict on the node
        nodes = self._nodes
        nodes.health.failed(node)
        if not connect_failed(failure):
            nodes.calls[node]["failed"] += 1
            self.result.errback(failure)
            return
        nodes.calls[node]["unreachable"] += 1
        following = nodes._pick(self._tried)
        log.warn(
            "forward-auth: auth node {node} unreachable ({err}){then}",
            node=node.netloc,
            err=describe_failure(failure),
            then="; trying %s" % following.netloc if following is not None else "",
        )
        if following is None:
            self.result.errback(failure)
        else:
            self._try(following)


class _Probes:
    """The active checks: a C{GET} of the check path on every node, each interval."""

    def __init__(
        self,
        health: NodeHealth,
        clients: Dict[Node, AuthClient],
        fields: Tuple[Tuple[bytes, bytes], ...],
        timeout: float,
    ) -> None:
        self._health = health
        self._clients = clients
        self._fields = fields
        self._timeout = timeout
        self._running: Dict[Node, Deferred] = {}
        self._loop: Optional[LoopingCall] = None

    def start(self, reactor: IClientReactor, interval: float) -> None:
        self._loop = LoopingCall(self.probe)
        self._loop.clock = reactor
        self._loop.start(interval, now=True)

    @property
    def running(self) -> bool:
        return self._loop is not None and self._loop.running

    def probe(self) -> None:
        """Check every node whose previous check is over."""
        for node, client in self._clients.items():
            if node in self._running:
                continue
            d = self._running[node] = client.call("GET", self._fields, None, self._timeout)
            d.addCallbacks(self._checked, self._unreachable, callbackArgs=(node,), errbackArgs=(node,))

    def _checked(self, reply: Reply, node: Node) -> None:
        del self._running[node]
        self._health.probed(node, 200 <= reply.status < 400)

    def _unreachable(self, failure: Failure, node: Node) -> None:
        self._running.pop(node, None)
        if not is_cancellation(failure):
            self._health.probed(node, False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for d in list(self._running.values()):
            d.cancel()
        for client in self._clients.values():
            client.close()  # shares the node's pool: closes nothing of its own
