# -*- test-case-name: tests.upstream.test_balancer,tests.upstream.test_retries_e2e,tests.auth.test_targets -*-
"""
Node selection, as APISIX's balancers (C{apisix/balancer/*.lua}): smooth
weighted round-robin, least connections and consistent hashing, each run
per node priority (C{apisix/balancer/priority.lua}): a lower priority's
nodes are picked only once every node of the higher ones was tried for
that request.  Shared by the upstream leg (L{fauth.upstream.proxy}) and
several auth servers (L{fauth.auth.targets}).

Every picker takes the nodes one request already tried (connection
failures) and never picks them again; it answers C{None} when none is left.
"""
from __future__ import annotations

import bisect
import hashlib
from typing import AbstractSet, Callable, Dict, List, Optional, Protocol, Sequence

from fauth.config import Node

__all__ = [
    "Balancer",
    "ConsistentHash",
    "LeastConnections",
    "SmoothWeightedRoundRobin",
]

_NONE: AbstractSet[Node] = frozenset()


class SmoothWeightedRoundRobin:
    """
    Picks nodes in proportion to their weights, interleaved rather than in
    bursts: weights 5, 1, 1 give a a b a c a a, as nginx does.
    """

    def __init__(self, nodes: Sequence[Node]) -> None:
        self._nodes = [n for n in nodes if n.weight > 0]
        self._weights = [n.weight for n in self._nodes]
        self._current: List[int] = [0] * len(self._nodes)
        self._total = sum(self._weights)

    def pick(self, key: object = None, tried: AbstractSet[Node] = _NONE) -> Optional[Node]:
        """The next node not in C{tried}, or C{None} when all were."""
        if not tried:
            return self._next()
        if all(n in tried for n in self._nodes):
            return None
        # As APISIX's roundrobin picker: take the rotation's next until one
        # was not tried (every node comes round within the weights' sum).
        while True:
            node = self._next()
            if node not in tried:
                return node

    def _next(self) -> Node:
        if len(self._nodes) == 1:
            return self._nodes[0]
        current = self._current
        best = 0
        for i, weight in enumerate(self._weights):
            current[i] += weight
            if current[i] > current[best]:
                best = i
        current[best] -= self._total
        return self._nodes[best]

    def release(self, node: Node) -> None:
        """Nothing to count."""


class LeastConnections:
    """
    C{type: least_conn}: the node with the fewest requests in flight per
    unit of weight (APISIX's score, C{(connections + 1) / weight}); the
    first such node in configuration order on a tie.
    """

    def __init__(self, nodes: Sequence[Node]) -> None:
        self._nodes = [n for n in nodes if n.weight > 0]
        self.active: Dict[Node, int] = {n: 0 for n in self._nodes}

    def pick(self, key: object = None, tried: AbstractSet[Node] = _NONE) -> Optional[Node]:
        best: Optional[Node] = None
        best_score = 0.0
        for node in self._nodes:
            if node in tried:
                continue
            score = (self.active[node] + 1) / node.weight
            if best is None or score < best_score:
                best, best_score = node, score
        if best is not None:
            self.active[best] += 1
        return best

    def release(self, node: Node) -> None:
        """A request picked C{node} and is done with it (answered or failed)."""
        if self.active.get(node, 0) > 0:
            self.active[node] -= 1


# Points per unit of weight on the ring (resty.chash, which APISIX uses, has 160).
_POINTS = 160


def _point(data: bytes) -> int:
    # MD5's first 4 bytes, as ketama: CRC-32 is linear, and the points of
    # "host:port#i" would bunch up on the ring.
    return int.from_bytes(hashlib.md5(data).digest()[:4], "big")


class ConsistentHash:
    """
    C{type: chash}: a hash ring of C{160 * weight} points per node; a key
    goes to the node of the first point at or after its hash, and a key's
    retry to the next node round the ring.  Adding or removing a node moves
    only the keys of its share.  (Which key a request has is the proxy's
    business: L{fauth.upstream.proxy}.)
    """

    def __init__(self, nodes: Sequence[Node]) -> None:
        points = []
        for node in nodes:
            for i in range(_POINTS * node.weight):
                points.append((_point(("%s#%d" % (node.netloc, i)).encode("ascii")), node.netloc, node))
        points.sort(key=lambda p: (p[0], p[1]))
        self._hashes = [p[0] for p in points]
        self._ring = [p[2] for p in points]
        self._count = len({p[1] for p in points})

    def pick(self, key: object = None, tried: AbstractSet[Node] = _NONE) -> Optional[Node]:
        text = key if isinstance(key, str) else ""
        start = bisect.bisect_left(self._hashes, _point(text.encode("utf-8", "surrogateescape")))
        ring = self._ring
        if not tried:
            return ring[start % len(ring)]
        if len(tried) >= self._count and all(n in tried for n in ring):
            return None
        for i in range(len(ring)):
            node = ring[(start + i) % len(ring)]
            if node not in tried:
                return node
        return None

    def release(self, node: Node) -> None:
        """Nothing to count."""


class _Picker(Protocol):
    def pick(self, key: object = None, tried: AbstractSet[Node] = _NONE) -> Optional[Node]:
        ...

    def release(self, node: Node) -> None:
        ...


_KINDS: Dict[str, Callable[[Sequence[Node]], _Picker]] = {
    "roundrobin": SmoothWeightedRoundRobin,
    "least_conn": LeastConnections,
    "chash": ConsistentHash,
}


class Balancer:
    """
    An upstream's node selection: one picker of its C{type} per node
    priority, the highest priority first (APISIX's priority balancer).

    @ivar single: the only node, when there is one (the proxy then needs
        no balancer at all).
    """

    def __init__(self, kind: str, nodes: Sequence[Node]) -> None:
        usable = [n for n in nodes if n.weight > 0]
        self.single: Optional[Node] = usable[0] if len(usable) == 1 else None
        make = _KINDS[kind]
        priorities = sorted({n.priority for n in usable}, reverse=True)
        self._groups = [make([n for n in usable if n.priority == p]) for p in priorities]
        self._group_of: Dict[Node, _Picker] = {}
        for group, priority in zip(self._groups, priorities):
            for node in usable:
                if node.priority == priority:
                    self._group_of[node] = group

    def pick(self, key: object = None, tried: AbstractSet[Node] = _NONE) -> Optional[Node]:
        """
        A node for one try of a request: from the highest priority with a
        node not in C{tried}; C{None} when every node was tried.

        @param key: the request's hash key (C{chash} only).
        """
        for group in self._groups:
            node = group.pick(key, tried)
            if node is not None:
                return node
        return None

    def release(self, node: Node) -> None:
        """The try that picked C{node} is over (least_conn counts it down)."""
        self._group_of[node].release(node)

