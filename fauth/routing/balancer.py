# -*- test-case-name: tests.upstream.test_proxy_e2e,tests.auth.test_targets -*-
"""
Node selection: nginx's smooth weighted round-robin, shared by the upstream
leg (L{fauth.upstream.proxy}) and several auth servers (L{fauth.auth.targets}).
"""
from __future__ import annotations

from typing import List, Sequence

from fauth.config import Node

__all__ = ["SmoothWeightedRoundRobin"]


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

    def pick(self) -> Node:
        """The next node."""
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
