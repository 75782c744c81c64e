# -*- test-case-name: tests.routing.test_table -*-
"""
An immutable route table that picks routes in the order of APISIX's default
router, C{radixtree_host_uri} (C{apisix/http/router/radixtree_host_uri.lua}
over C{lua-resty-radixtree}):

 1. Routes bound to a host (their own C{hosts}/C{host}, else their
    service's) before every host-less route.  Among the hosts, the exact
    host first, then the wildcard ones (C{*.example.com}) by longest
    suffix.  A route listed under several hosts is tried under each.
 2. Within one host (and among the host-less routes): a route whose uri is
    the path exactly, then the prefix routes (C{/api/*}, C{/api*}) from the
    longest prefix to the shortest.
 3. Among routes on the same uri: the higher C{priority} first, then (prefix
    routes only) the longer uri as written, then configuration order.

A candidate is taken when its C{methods}, C{remote_addrs} and C{vars} accept
the request (and, for a uri with C{*} inside it, the rest of the path fits);
otherwise the next candidate in that order is tried.

A table is never changed after it is built; reloads build a new one and swap
the reference, so a request keeps the table it started with.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, Generic, List, Optional, Pattern, Sequence, Tuple, TypeVar

from fauth.config import RouteConf
from fauth.config.expr import Lookup

__all__ = ["RouteTable"]

T = TypeVar("T")

#: Gives the variable lookup (APISIX's C{ctx.var}) of the request passed
#: to L{RouteTable.match}, for routes with C{vars}.
VariablesFactory = Callable[[Any], Lookup]

# (route, payload, pattern the whole path must fit, or None)
_Candidate = Tuple[RouteConf, Any, "Optional[Pattern[str]]"]


def _inner_star(uri: str, star: int) -> "Optional[Pattern[str]]":
    """
    For a uri with C{*} before its end (C{/a/*/b}), what the whole path must
    fit beyond its literal prefix (radixtree's C{compare_param}: a C{*}
    segment is anything, slashes included; a C{:name} segment one segment).
    """
    if star == len(uri) - 1:
        return None
    parts = []
    for segment in uri.split("/"):
        if segment.startswith("*"):
            parts.append("(.*)")
        elif segment.startswith(":"):
            parts.append("([^/]+)")
        else:
            # Escaped, where radixtree puts the segment into its regex as
            # written ("." would match any character there).
            parts.append(re.escape(segment))
    return re.compile("/".join(parts), re.DOTALL)


class _UriRouter:
    """
    One radix tree of lua-resty-radixtree: exact uris in a dict, prefixes
    (the uri up to its first C{*}) tried longest first.
    """

    def __init__(self, items: List[Tuple[str, RouteConf, Any, int]]) -> None:
        exact: Dict[str, List[Tuple[Tuple[int, int], _Candidate]]] = {}
        prefix: Dict[str, List[Tuple[Tuple[int, int, int], _Candidate]]] = {}
        for uri, route, payload, order in items:
            star = uri.find("*")
            if star == -1:
                exact.setdefault(uri, []).append(((-route.priority, order), (route, payload, None)))
            else:
                # radixtree's sort_route: priority, then the longer uri as
                # written; its insertion keeps configuration order among equals.
                key = (-route.priority, -len(uri), order)
                prefix.setdefault(uri[:star], []).append((key, (route, payload, _inner_star(uri, star))))
        self._exact = {uri: tuple(c for _, c in sorted(items_, key=lambda i: i[0])) for uri, items_ in exact.items()}
        self._prefixes = {
            uri: tuple(c for _, c in sorted(items_, key=lambda i: i[0])) for uri, items_ in prefix.items()
        }
        # Distinct prefix lengths, longest first: one dict lookup per length
        # rather than a scan of every prefix.
        self._lengths = sorted({len(p) for p in prefix}, reverse=True)

    def match(self, method: str, path: str, request: Any, variables: Optional[VariablesFactory]) -> Any:
        candidates = self._exact.get(path)
        if candidates is not None:
            found = _pick(candidates, method, path, request, variables)
            if found is not None:
                return found
        size = len(path)
        for length in self._lengths:
            if length <= size:
                candidates = self._prefixes.get(path[:length])
                if candidates is not None:
                    found = _pick(candidates, method, path, request, variables)
                    if found is not None:
                        return found
        return None


def _pick(
    candidates: Tuple[_Candidate, ...],
    method: str,
    path: str,
    request: Any,
    variables: Optional[VariablesFactory],
) -> Any:
    for route, payload, pattern in candidates:
        if route.methods is not None and method not in route.methods:
            continue
        if route.remote_addrs is not None:
            if request is None or not route.remote_addrs.contains(request.remote_addr):
                continue
        if route.vars is not None:
            if request is None or variables is None or not route.vars.evaluate(variables(request)):
                continue
        if pattern is not None and pattern.fullmatch(path) is None:
            continue
        return payload
    return None


class RouteTable(Generic[T]):
    """
    Maps a request to the payload of the route APISIX would pick.

    @param entries: C{(route, payload)} pairs in configuration order; the
        payload is what L{match} returns (the runtime objects of the route).
    @param variables: makes the variable lookup of the request given to
        L{match}, for routes with C{vars}; without it (or without a request)
        such routes never match.
    """

    def __init__(self, entries: Sequence[Tuple[RouteConf, T]], variables: Optional[VariablesFactory] = None) -> None:
        by_host: Dict[str, List[Tuple[str, RouteConf, Any, int]]] = {}
        hostless: List[Tuple[str, RouteConf, Any, int]] = []
        for order, (route, payload) in enumerate(entries):
            if not route.enabled:
                continue
            for uri in route.uris:
                item = (uri, route, payload, order)
                if route.hosts is None:
                    hostless.append(item)
                    continue
                for host in route.hosts:
                    by_host.setdefault(host, []).append(item)
        self._exact_hosts = {host: _UriRouter(items) for host, items in by_host.items() if not host.startswith("*")}
        # "*.example.com" is the suffix ".example.com"; longer suffixes first
        # (radixtree walks up the reversed host).
        self._wildcard_hosts = tuple(
            (host[1:], _UriRouter(items))
            for host, items in sorted(by_host.items(), key=lambda kv: -len(kv[0]))
            if host.startswith("*")
        )
        self._hostless = _UriRouter(hostless)
        self._variables = variables
        self.size = len(entries)

    def match(self, method: str, host: str, path: str, request: Any = None) -> Optional[T]:
        """
        The payload of the route for this request, or C{None}.

        @param host: lower-cased, without port (nginx's C{$host}).
        @param path: decoded and normalised.
        @param request: the L{fauth.request.inbound.InboundRequest}, for
            C{remote_addrs} and C{vars}.
        """
        variables = self._variables
        router = self._exact_hosts.get(host)
        if router is not None:
            found = router.match(method, path, request, variables)
            if found is not None:
                return found
        for suffix, router in self._wildcard_hosts:
            if host.endswith(suffix):
                found = router.match(method, path, request, variables)
                if found is not None:
                    return found
        return self._hostless.match(method, path, request, variables)
