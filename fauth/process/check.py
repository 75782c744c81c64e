# -*- test-case-name: tests.process.test_cli -*-
"""
C{--check}: what a configuration would serve, as text, without binding a
socket or calling a service (as C{nginx -t} and C{caddy validate}).
"""
from __future__ import annotations

from typing import List

from fauth.config import GatewayConf, RouteConf
from fauth.config.apisix import auth_disabled

__all__ = ["describe"]


def _route_line(route: RouteConf) -> str:
    parts = ["route %r: %s" % (route.id, " ".join(route.uris))]
    if route.methods is not None:
        parts.append("methods " + ",".join(sorted(route.methods)))
    if route.hosts is not None:
        parts.append("hosts " + ",".join(route.hosts))
    if route.priority:
        parts.append("priority %d" % route.priority)
    if route.remote_addrs is not None:
        parts.append("remote_addrs " + ",".join(str(n) for n in route.remote_addrs.networks))
    if route.vars is not None:
        parts.append("vars")
    for what, oid in (("service", route.service_id), ("plugin_config", route.plugin_config_id)):
        if oid is not None:
            parts.append("%s %s" % (what, oid))
    if not route.enabled:
        parts.append("disabled (status 0)")
    auth = route.forward_auth
    if auth is not None:
        parts.append("forward-auth %s %s" % (auth.request_method, auth.uri))
    else:
        parts.append("no forward-auth (disabled by _meta.disable)" if auth_disabled(route) else "no forward-auth")
    upstream = route.upstream
    if upstream is None:
        parts.append("cannot run, answers 503: %s" % route.failure)
    else:
        target = ", ".join(
            "%s(%d%s)" % (node.netloc, node.weight, ", priority %d" % node.priority if node.priority else "")
            for node in upstream.nodes
        )
        kind = "" if upstream.type == "roundrobin" else upstream.type + " "
        parts.append("upstream %s%s://%s" % (kind, upstream.scheme, target))
    if route.enable_websocket:
        parts.append("websocket")
    return "; ".join(parts)


def describe(conf: GatewayConf) -> str:
    """
    Listeners, workers, admin API, etcd and every route with its auth target
    and upstream nodes, one per line, in the order they were configured.
    """
    lines: List[str] = ["listen: " + ", ".join(conf.listen), "workers: %d" % conf.workers]
    if conf.admin is not None:
        lines.append("admin: " + conf.admin.listen)
    if conf.etcd is not None:
        lines.append(
            "etcd: %s (prefix %s; routes there are added when the gateway starts)"
            % (", ".join(conf.etcd.hosts), conf.etcd.prefix)
        )
    if conf.demo is not None:
        lines.append("demo: auth %s, upstream %s" % (conf.demo.auth, conf.demo.upstream))
    lines.append("routes: %d" % len(conf.routes))
    lines.extend("  " + _route_line(route) for route in conf.routes)
    return "\n".join(lines) + "\n"
