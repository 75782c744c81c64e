# -*- test-case-name: tests.routing.test_table -*-
"""
An immutable route table: exact URIs beat prefixes, the longest prefix wins,
C{priority} breaks ties, C{methods} and C{hosts} filter.

A table is never changed after it is built; reloads build a new one and swap
the reference, so a request keeps the table it started with.
"""
from __future__ import annotations

from typing import Dict, Generic, List, Optional, Sequence, Tuple, TypeVar

from fauth.config import RouteConf

__all__ = ["RouteTable"]

T = TypeVar("T")


def _host_matches(patterns: Tuple[str, ...], host: str) -> bool:
    for pattern in patterns:
        if pattern.startswith("*"):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif pattern == host:
            return True
    return False


class RouteTable(Generic[T]):
    """
    Maps (method, host, path) to the payload of the best route.

    @param entries: C{(route, payload)} pairs in configuration order; the
        payload is what L{match} returns (the runtime objects of the route).
    """

    def __init__(self, entries: Sequence[Tuple[RouteConf, T]]) -> None:
        exact: Dict[str, List[Tuple[int, int, RouteConf, T]]] = {}
        prefix: Dict[str, List[Tuple[int, int, RouteConf, T]]] = {}
        for order, (route, payload) in enumerate(entries):
            if not route.enabled:
                continue
            for uri in route.uris:
                item = (-route.priority, order, route, payload)
                if uri.endswith("*"):
                    prefix.setdefault(uri[:-1], []).append(item)
                else:
                    exact.setdefault(uri, []).append(item)
        self._exact = {
            uri: tuple((r, p) for _, _, r, p in sorted(items, key=lambda i: i[:2]))
            for uri, items in exact.items()
        }
        self._prefixes = tuple(
            (uri, tuple((r, p) for _, _, r, p in sorted(items, key=lambda i: i[:2])))
            for uri, items in sorted(prefix.items(), key=lambda kv: -len(kv[0]))
        )
        self.size = len(entries)

    @staticmethod
    def _pick(
        candidates: Tuple[Tuple[RouteConf, T], ...], method: str, host: str
    ) -> Optional[T]:
        for route, payload in candidates:
            if route.methods is not None and method not in route.methods:
                continue
            if route.hosts is not None and not _host_matches(route.hosts, host):
                continue
            return payload
        return None

    def match(self, method: str, host: str, path: str) -> Optional[T]:
        """
        The payload of the route for this request, or C{None}.

        @param host: lower-cased, without port.
        @param path: decoded and normalised.
        """
        candidates = self._exact.get(path)
        if candidates is not None:
            found = self._pick(candidates, method, host)
            if found is not None:
                return found
        for prefix, candidates in self._prefixes:
            if path.startswith(prefix):
                found = self._pick(candidates, method, host)
                if found is not None:
                    return found
        return None
