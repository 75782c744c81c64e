# -*- test-case-name: tests.test_config -*-
"""
The gateway's configuration: frozen models, YAML/JSON loading and validation.

Route and plugin objects are APISIX's, so an APISIX user's route JSON works
unchanged.  Every error is one line naming the route and the attribute, in
the wording APISIX's validator uses.
"""
from __future__ import annotations

import ipaddress
import json
import math
import os
import re
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import attr
import yaml

from fauth.schema import (
    SchemaError,
    check_forward_auth,
    check_integer_range,
    check_type,
    security_warnings,
)
from fauth.variables import Template, compile_template

__all__ = [
    "AdminConf",
    "ConfigError",
    "ForwardAuthConf",
    "GatewayConf",
    "Node",
    "RouteConf",
    "UpstreamConf",
    "load_config",
    "parse_config",
    "parse_forward_auth",
    "read_document",
]

HTTP_METHODS = frozenset(
    ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PURGE"]
)
KNOWN_PLUGINS = frozenset(["forward-auth"])
_TOP_LEVEL_KEYS = frozenset(
    [
        "listen", "routes", "upstreams", "demo", "ssl_trusted_certificate", "http", "admin", "shutdown_grace",
        "access_log", "access_log_user_header", "workers",
    ]
)
_ADMIN_KEYS = frozenset(["listen", "keys", "store", "metrics_require_key"])
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ROUTE_KEYS = frozenset(
    [
        "id", "name", "desc", "uri", "uris", "methods", "host", "hosts", "priority",
        "plugins", "upstream", "upstream_id", "status", "labels", "enable_websocket",
        "create_time", "update_time",
    ]
)
_UPSTREAM_KEYS = frozenset(
    [
        "id", "name", "desc", "type", "scheme", "nodes", "pass_host", "upstream_host",
        "timeout", "keepalive_pool", "labels", "create_time", "update_time",
    ]
)
_HEADER_NAME_RE = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")  # an RFC 9110 token; fullmatch
_HOST_RE = re.compile(r"^\*?[0-9a-zA-Z-._\[\]:]+$")
_HOSTNAME_RE = re.compile(r"^[0-9A-Za-z]([0-9A-Za-z-]{0,62})(\.[0-9A-Za-z]([0-9A-Za-z-]{0,62}))*\.?$")


class ConfigError(ValueError):
    """A configuration document was refused; C{str()} is one line saying where and why."""


@attr.frozen
class ForwardAuthConf:
    """One validated C{forward-auth} plugin instance (defaults filled in)."""

    uri: str
    ssl_verify: bool = True
    request_method: str = "GET"
    max_req_body_size: int = 67108864
    request_headers: Tuple[str, ...] = ()
    extra_headers: Optional[Tuple[Tuple[str, Template], ...]] = None
    upstream_headers: Tuple[str, ...] = ()
    client_headers: Tuple[str, ...] = ()
    timeout: int = 3000
    keepalive: bool = True
    keepalive_timeout: int = 60000
    keepalive_pool: int = 5
    allow_degradation: bool = False
    status_on_error: int = 403
    error_response: Optional[str] = None
    warnings: Tuple[str, ...] = attr.field(default=(), eq=False)


@attr.frozen
class Node:
    """One upstream node."""

    host: str
    port: int
    weight: int = 1

    @property
    def netloc(self) -> str:
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s:%d" % (host, self.port)


@attr.frozen
class UpstreamTimeouts:
    """Seconds, as APISIX."""

    connect: float = 60.0
    send: float = 60.0
    read: float = 60.0


@attr.frozen
class UpstreamConf:
    """A validated upstream: where allowed requests go."""

    nodes: Tuple[Node, ...]
    id: Optional[str] = None
    type: str = "roundrobin"
    scheme: str = "http"
    pass_host: str = "pass"
    upstream_host: Optional[str] = None
    timeout: UpstreamTimeouts = UpstreamTimeouts()
    keepalive_pool: int = 320


@attr.frozen
class RouteConf:
    """A validated route."""

    id: str
    uris: Tuple[str, ...]
    upstream: UpstreamConf
    name: str = ""
    methods: Optional[frozenset] = None
    hosts: Optional[Tuple[str, ...]] = None
    priority: int = 0
    forward_auth: Optional[ForwardAuthConf] = None
    enabled: bool = True
    source: Mapping[str, Any] = attr.field(factory=dict, eq=False, repr=False)


@attr.frozen
class HttpLimits:
    """
    Limits of the client-facing HTTP server (L{fauth.httpserver}).

    @ivar idle_timeout: seconds a persistent connection may wait for its
        next request.
    @ivar max_headers: header fields per request; more get 431.
    @ivar max_header_bytes: bytes of header fields (request line excluded,
        CRLFs included); more get 431.
    @ivar max_request_line: bytes of the request line; more get 414.
    @ivar header_timeout: seconds from a request's first byte (or from the
        connection, for the first request) to the end of its head; then 408.
    @ivar body_timeout: seconds from the end of the head to the end of the
        body; then 408.
    """

    idle_timeout: float = 60.0
    max_headers: int = 500
    max_header_bytes: int = 16384
    max_request_line: int = 8192
    header_timeout: float = 10.0
    body_timeout: float = 60.0


@attr.frozen
class DemoConf:
    """The in-process demo auth service and echo upstream of the quickstart."""

    auth: str
    upstream: str


@attr.frozen
class AdminConf:
    """
    The admin API: its own listener, the accepted C{X-API-KEY} values
    (C{${ENV_VAR}} already expanded) and the store file of its changes.
    """

    keys: Tuple[str, ...] = attr.field(repr=False)  # secrets: kept out of logs
    listen: str = "tcp:9180:interface=127.0.0.1"
    store: str = "fauth-store.json"
    metrics_require_key: bool = False


@attr.frozen
class GatewayConf:
    """
    The whole gateway configuration.

    @ivar source: the configuration document as written in the file (admin
        API additions live in the store, not here).
    """

    listen: Tuple[str, ...] = ("tcp:9080",)
    routes: Tuple[RouteConf, ...] = ()
    upstreams: Mapping[str, UpstreamConf] = attr.field(factory=dict)
    demo: Optional[DemoConf] = None
    ssl_trusted_certificate: Optional[str] = None
    http: HttpLimits = HttpLimits()
    admin: Optional[AdminConf] = None
    shutdown_grace: float = 30.0
    #: Access log path, C{"-"} for standard output, or C{None} (off).
    access_log: Optional[str] = None
    #: Auth-response header whose value the access log shows as C{user}.
    access_log_user_header: str = "X-User-ID"
    #: Worker processes under C{twistd fauth} (C{--workers} overrides it).
    workers: int = 1
    source: Mapping[str, Any] = attr.field(factory=dict, eq=False, repr=False)


def _shown(value: str) -> str:
    """C{value} for a one-line message: control characters escaped."""
    return value if value.isprintable() else value.encode("unicode_escape").decode("ascii")


def _prop(name: str, message: str) -> SchemaError:
    return SchemaError('property "%s" validation failed: %s' % (name, message))


def parse_forward_auth(conf: object) -> ForwardAuthConf:
    """
    Validate a C{forward-auth} attribute dict (as APISIX would) and return
    the frozen model.

    @raise SchemaError: with APISIX's message.
    """
    checked = check_forward_auth(conf)
    # Beyond APISIX's schema: a list item that is not a header name can only
    # be a mistake, and would fail every request at run time.
    for prop in ("request_headers", "upstream_headers", "client_headers"):
        for i, name in enumerate(checked[prop], 1):  # type: ignore[call-overload, arg-type]
            if not _HEADER_NAME_RE.fullmatch(name):
                raise _prop(prop, 'failed to validate item %d: invalid header name "%s"' % (i, _shown(name)))
    warnings = list(security_warnings(checked))
    if checked["allow_degradation"] and checked["upstream_headers"]:
        warnings.append(
            "allow_degradation with upstream_headers: a degraded request keeps the client's own values "
            "of those headers"
        )
    extra = checked.get("extra_headers")
    extra_headers = None
    if extra is not None:
        extra_headers = tuple(
            # Keys containing ':' skip validation in APISIX and fail at call
            # time; a non-string value there is stringified the Lua way.
            (str(name), compile_template(value if isinstance(value, str) else str(value)))
            for name, value in dict(extra).items()  # type: ignore[call-overload]
        )
    meta = checked.get("_meta")
    error_response = None
    if isinstance(meta, dict) and meta.get("error_response") is not None:
        er = meta["error_response"]
        error_response = er if isinstance(er, str) else json.dumps(er, separators=(",", ":"))
    return ForwardAuthConf(
        uri=checked["uri"],  # type: ignore[arg-type]
        ssl_verify=checked["ssl_verify"],  # type: ignore[arg-type]
        request_method=checked["request_method"],  # type: ignore[arg-type]
        max_req_body_size=checked["max_req_body_size"],  # type: ignore[arg-type]
        request_headers=tuple(checked["request_headers"]),  # type: ignore[call-overload]
        extra_headers=extra_headers,
        upstream_headers=tuple(checked["upstream_headers"]),  # type: ignore[call-overload]
        client_headers=tuple(checked["client_headers"]),  # type: ignore[call-overload]
        timeout=checked["timeout"],  # type: ignore[arg-type]
        keepalive=checked["keepalive"],  # type: ignore[arg-type]
        keepalive_timeout=checked["keepalive_timeout"],  # type: ignore[arg-type]
        keepalive_pool=checked["keepalive_pool"],  # type: ignore[arg-type]
        allow_degradation=checked["allow_degradation"],  # type: ignore[arg-type]
        status_on_error=checked["status_on_error"],  # type: ignore[arg-type]
        error_response=error_response,
        warnings=tuple(warnings),
    )


def _parse_node_address(address: str) -> Tuple[str, Optional[int]]:
    # No control characters, spaces or non-ASCII anywhere (an IPv6 scope id
    # would otherwise carry them into a Host header).
    if not address.isascii() or any(c <= " " or c == "\x7f" for c in address):
        raise _prop("nodes", 'invalid node address "%s"' % _shown(address))
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep:
            raise _prop("nodes", 'invalid node address "%s"' % _shown(address))
        port_text = rest[1:] if rest.startswith(":") else None
        if rest and not rest.startswith(":"):
            raise _prop("nodes", 'invalid node address "%s"' % _shown(address))
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _prop("nodes", 'invalid node address "%s"' % _shown(address))
    else:
        host, sep, port_text_ = address.rpartition(":")
        if not sep:
            host, port_text = address, None
        else:
            port_text = port_text_
        if ":" in host:
            raise _prop("nodes", 'invalid node address "%s" (IPv6 needs brackets)' % _shown(address))
        if not host or not _HOSTNAME_RE.fullmatch(host):
            raise _prop("nodes", 'invalid node address "%s"' % _shown(address))
    if port_text is None:
        return host, None
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _prop("nodes", 'invalid node address "%s": bad port' % _shown(address))
    return host, int(port_text)


def _parse_nodes(nodes: object, scheme: str) -> Tuple[Node, ...]:
    default_port = 443 if scheme == "https" else 80
    parsed = []
    if isinstance(nodes, dict):
        items: Iterable[Tuple[str, object, object]] = [
            (str(k), None, v) for k, v in nodes.items()
        ]
        for address, _, weight in items:
            host, port = _parse_node_address(address)
            check_type("nodes", weight, "integer")
            check_integer_range("nodes", weight, minimum=0)
            parsed.append(Node(host, port or default_port, int(weight)))  # type: ignore[call-overload]
    elif isinstance(nodes, list):
        for i, item in enumerate(nodes, 1):
            if not isinstance(item, dict):
                raise _prop("nodes", "failed to validate item %d: wrong type: expected object" % i)
            host = item.get("host")
            check_type("nodes", host, "string")
            port = item.get("port", default_port)
            check_type("nodes", port, "integer")
            check_integer_range("nodes", port, minimum=1, maximum=65535)
            weight = item.get("weight", 1)
            check_type("nodes", weight, "integer")
            check_integer_range("nodes", weight, minimum=0)
            h, _ = _parse_node_address(host.strip("[]") if ":" not in host else "[%s]" % host.strip("[]"))  # type: ignore[union-attr]
            parsed.append(Node(h, int(port), int(weight)))  # type: ignore[call-overload]
    else:
        check_type("nodes", nodes, "object")
    if not parsed or not any(n.weight > 0 for n in parsed):
        raise _prop("nodes", "expect at least one node with a weight above 0")
    return tuple(parsed)


def _object(what: str, doc: object, allowed: frozenset) -> Dict[str, Any]:
    """An APISIX object with only the C{allowed} keys; an empty array passes as one (Lua cannot tell them apart)."""
    check_type(what, doc, "object")
    if not isinstance(doc, dict):
        return {}
    for key in doc:
        if key not in allowed:
            raise SchemaError("additional properties forbidden, found %s" % key)
    return doc


def parse_upstream(doc: object, upstream_id: Optional[str] = None) -> UpstreamConf:
    """Validate one APISIX upstream object."""
    doc = _object("upstream", doc, _UPSTREAM_KEYS)
    kind = doc.get("type", "roundrobin")
    if kind not in ("roundrobin",):
        raise _prop("type", "matches none of the enum values")
    scheme = doc.get("scheme", "http")
    if scheme not in ("http", "https"):
        raise _prop("scheme", "matches none of the enum values")
    if "nodes" not in doc:
        raise SchemaError('property "nodes" is required')
    nodes = _parse_nodes(doc["nodes"], scheme)
    pass_host = doc.get("pass_host", "pass")
    if pass_host not in ("pass", "node", "rewrite"):
        raise _prop("pass_host", "matches none of the enum values")
    upstream_host = doc.get("upstream_host")
    if upstream_host is not None:
        check_type("upstream_host", upstream_host, "string")
    if pass_host == "rewrite" and not upstream_host:
        raise SchemaError('property "upstream_host" is required when "pass_host" is "rewrite"')
    if upstream_host:
        # It becomes the Host header: host[:port], as a node address.
        try:
            _parse_node_address(upstream_host)  # type: ignore[arg-type]
        except SchemaError:
            raise _prop("upstream_host", 'invalid host "%s"' % _shown(upstream_host))  # type: ignore[arg-type]
    timeouts = UpstreamTimeouts()
    if "timeout" in doc:
        t = doc["timeout"]
        check_type("timeout", t, "object")
        values = {}
        for k, v in (t.items() if isinstance(t, dict) else ()):
            if k not in ("connect", "send", "read"):
                raise _prop("timeout", "additional properties forbidden, found %s" % k)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                check_type("timeout", v, "number")
            if not math.isfinite(v):
                raise _prop("timeout", "expected %s to be a finite number" % v)
            if v <= 0:
                raise _prop("timeout", "expected %s to be greater than 0" % v)
            values[k] = float(v)
        timeouts = UpstreamTimeouts(**values)
    pool = 320
    if "keepalive_pool" in doc:
        kp = doc["keepalive_pool"]
        check_type("keepalive_pool", kp, "object")
        size = kp.get("size", 320) if isinstance(kp, dict) else 320
        check_type("keepalive_pool", size, "integer")
        check_integer_range("keepalive_pool", size, minimum=1)
        pool = int(size)
    uid = doc.get("id", upstream_id)
    return UpstreamConf(
        id=None if uid is None else str(uid),
        nodes=nodes,
        type=kind,
        scheme=scheme,
        pass_host=pass_host,
        upstream_host=upstream_host,
        timeout=timeouts,
        keepalive_pool=pool,
    )


def _check_string_list(name: str, value: object) -> Tuple[str, ...]:
    check_type(name, value, "array")
    if not isinstance(value, list):
        value = []  # an empty object passes as an array (Lua cannot tell them apart)
    for i, item in enumerate(value, 1):
        if not isinstance(item, str):
            raise _prop(name, "failed to validate item %d: wrong type: expected string" % i)
    if not value:
        raise _prop(name, "expect array to have at least 1 items")
    return tuple(value)


def parse_route(
    doc: object, upstreams: Mapping[str, UpstreamConf], route_id: Optional[str] = None
) -> RouteConf:
    """
    Validate one APISIX route object.

    @raise SchemaError: what is wrong, without the route prefix.
    """
    doc = _object("route", doc, _ROUTE_KEYS)
    if "uri" in doc and "uris" in doc:
        raise SchemaError('only one of "uri" and "uris" is allowed')
    if "uri" in doc:
        check_type("uri", doc["uri"], "string")
        uris: Tuple[str, ...] = (doc["uri"],)
    elif "uris" in doc:
        uris = _check_string_list("uris", doc["uris"])
    else:
        raise SchemaError('property "uri" is required')
    for uri in uris:
        if not uri.startswith("/"):
            raise _prop("uri", 'expected "%s" to start with "/"' % uri)
    methods = None
    if "methods" in doc:
        listed = _check_string_list("methods", doc["methods"])
        for m in listed:
            if m not in HTTP_METHODS:
                raise _prop("methods", "failed to validate item: matches none of the enum values")
        methods = frozenset(listed)
    hosts = None
    if "host" in doc and "hosts" in doc:
        raise SchemaError('only one of "host" and "hosts" is allowed')
    if "host" in doc:
        check_type("host", doc["host"], "string")
        hosts = (doc["host"],)
    elif "hosts" in doc:
        hosts = _check_string_list("hosts", doc["hosts"])
    for h in hosts or ():
        if not _HOST_RE.match(h):
            raise _prop("hosts", 'invalid host "%s"' % h)
    hosts = tuple(h.lower() for h in hosts) if hosts else None
    priority = doc.get("priority", 0)
    check_type("priority", priority, "integer")
    status = doc.get("status", 1)
    check_type("status", status, "integer")
    if status not in (0, 1):
        raise _prop("status", "matches none of the enum values")
    name = doc.get("name", "")
    check_type("name", name, "string")
    plugins = doc.get("plugins", {})
    if plugins == []:
        plugins = {}
    check_type("plugins", plugins, "object")
    forward_auth = None
    for plugin_name, plugin_conf in plugins.items():
        if plugin_name not in KNOWN_PLUGINS:
            raise SchemaError("unknown plugin [%s]" % plugin_name)
        try:
            forward_auth = parse_forward_auth(plugin_conf)
        except SchemaError as e:
            raise SchemaError("failed to check the configuration of plugin %s err: %s" % (plugin_name, e))
    if "upstream" in doc and "upstream_id" in doc:
        raise SchemaError('only one of "upstream" and "upstream_id" is allowed')
    if "upstream" in doc:
        try:
            upstream = parse_upstream(doc["upstream"])
        except SchemaError as e:
            raise SchemaError("upstream: %s" % e)
    elif "upstream_id" in doc:
        uid = doc["upstream_id"]
        if isinstance(uid, bool) or not isinstance(uid, (str, int)):
            check_type("upstream_id", uid, "string")
        if str(uid) not in upstreams:
            raise SchemaError("failed to fetch upstream info by upstream id [%s]" % uid)
        upstream = upstreams[str(uid)]
    else:
        raise SchemaError('property "upstream" is required (or "upstream_id")')
    rid = doc.get("id", route_id)
    if rid is None:
        raise SchemaError('property "id" is required')
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        check_type("id", rid, "string")
    return RouteConf(
        id=str(rid),
        uris=uris,
        upstream=upstream,
        name=name,
        methods=methods,
        hosts=hosts,
        priority=priority,
        forward_auth=forward_auth,
        enabled=status == 1,
        source=doc,
    )


def parse_config(doc: object, environ: Optional[Mapping[str, str]] = None) -> GatewayConf:
    """
    Validate a whole configuration document (already parsed from YAML/JSON).

    @param environ: where C{${ENV_VAR}} in C{admin.keys} are looked up;
        C{os.environ} by default.
    @raise ConfigError: one line naming the route and attribute.
    """
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError("config: expected a mapping at the top level")
    for key in doc:
        if key not in _TOP_LEVEL_KEYS:
            raise ConfigError(
                'config: unknown top-level key "%s" (known: %s)' % (key, ", ".join(sorted(_TOP_LEVEL_KEYS)))
            )
    listen = doc.get("listen", ["tcp:9080"])
    if isinstance(listen, str):
        listen = [listen]
    try:
        listen_t = _check_string_list("listen", listen)
    except SchemaError as e:
        raise ConfigError("config: %s" % e)
    for desc in listen_t:
        _check_endpoint("listen", desc)

    upstreams = {}
    raw_upstreams = doc.get("upstreams") or []
    if not isinstance(raw_upstreams, list):
        raise ConfigError('config: property "upstreams" validation failed: wrong type: expected array')
    for i, up in enumerate(raw_upstreams, 1):
        uid = up.get("id") if isinstance(up, dict) else None
        label = 'upstream "%s"' % uid if uid is not None else "upstream #%d" % i
        if uid is None:
            raise ConfigError('%s: property "id" is required' % label)
        try:
            parsed = parse_upstream(up)
        except SchemaError as e:
            raise ConfigError("%s: %s" % (label, e))
        if str(uid) in upstreams:
            raise ConfigError("%s: duplicate id" % label)
        upstreams[str(uid)] = parsed

    routes = []
    seen = set()
    raw_routes = doc.get("routes") or []
    if not isinstance(raw_routes, list):
        raise ConfigError('config: property "routes" validation failed: wrong type: expected array')
    for i, r in enumerate(raw_routes, 1):
        rid = r.get("id") if isinstance(r, dict) else None
        label = 'route "%s"' % rid if rid is not None else "route #%d" % i
        try:
            route = parse_route(r, upstreams)
        except SchemaError as e:
            message = str(e)
            prefix = "failed to check the configuration of plugin forward-auth err: "
            if message.startswith(prefix):
                message = "plugin forward-auth: " + message[len(prefix):]
            raise ConfigError("%s: %s" % (label, message))
        if route.id in seen:
            raise ConfigError("%s: duplicate id" % label)
        seen.add(route.id)
        routes.append(route)

    demo = None
    if doc.get("demo") is not None:
        d = doc["demo"]
        if not isinstance(d, dict) or set(d) - {"auth", "upstream"}:
            raise ConfigError('config: "demo" takes "auth" and "upstream" endpoint descriptions')
        for k in ("auth", "upstream"):
            if not isinstance(d.get(k), str):
                raise ConfigError('config: demo: property "%s" is required (an endpoint description)' % k)
            _check_endpoint("demo.%s" % k, d[k])
        demo = DemoConf(auth=d["auth"], upstream=d["upstream"])

    trusted = doc.get("ssl_trusted_certificate")
    if trusted is not None and not isinstance(trusted, str):
        raise ConfigError('config: property "ssl_trusted_certificate" validation failed: wrong type: expected string')

    http = HttpLimits()
    if doc.get("http") is not None:
        h = doc["http"]
        if not isinstance(h, dict):
            raise ConfigError('config: property "http" validation failed: wrong type: expected object')
        values = {}
        for k, v in h.items():
            if k not in attr.fields_dict(HttpLimits):
                raise ConfigError('config: http: unknown key "%s"' % k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ConfigError('config: http: property "%s" must be a positive number' % k)
            if attr.fields_dict(HttpLimits)[k].type in (int, "int") and not isinstance(v, int):
                raise ConfigError('config: http: property "%s" must be a positive integer' % k)
            values[k] = v
        http = HttpLimits(**values)

    admin = None
    if "admin" in doc:
        admin = _parse_admin(doc["admin"], os.environ if environ is None else environ)

    grace = doc.get("shutdown_grace", 30.0)
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace < float("inf"):
        raise ConfigError('config: property "shutdown_grace" must be a number of seconds, 0 or more')

    access_log = doc.get("access_log")
    if access_log is not None and (not isinstance(access_log, str) or not access_log or "\x00" in access_log):
        raise ConfigError('config: property "access_log" must be a file path or "-" (standard output)')
    user_header = doc.get("access_log_user_header", "X-User-ID")
    if not isinstance(user_header, str) or not _HEADER_NAME_RE.fullmatch(user_header):
        raise ConfigError('config: property "access_log_user_header" must be a header name')

    workers = doc.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError('config: property "workers" must be an integer, 1 or more')

    return GatewayConf(
        listen=listen_t,
        routes=tuple(routes),
        upstreams=upstreams,
        demo=demo,
        ssl_trusted_certificate=trusted,
        http=http,
        admin=admin,
        shutdown_grace=float(grace),
        access_log=access_log,
        access_log_user_header=user_header,
        workers=workers,
        source=doc,
    )


def _expand_env(text: str, environ: Mapping[str, str]) -> str:
    def one(match: "re.Match[str]") -> str:
        name = match.group(1)
        if name not in environ:
            raise ConfigError('config: admin: keys: environment variable "%s" is not set' % name)
        return environ[name]

    return _ENV_RE.sub(one, text)


def _parse_admin(doc: object, environ: Mapping[str, str]) -> AdminConf:
    if not isinstance(doc, dict):
        raise ConfigError('config: property "admin" validation failed: wrong type: expected object')
    for key in doc:
        if key not in _ADMIN_KEYS:
            raise ConfigError(
                'config: admin: unknown key "%s" (known: %s)' % (key, ", ".join(sorted(_ADMIN_KEYS)))
            )
    listen = doc.get("listen", "tcp:9180:interface=127.0.0.1")
    if not isinstance(listen, str):
        raise ConfigError('config: admin: property "listen" must be an endpoint description (a string)')
    _check_endpoint("admin.listen", listen)
    raw_keys = doc.get("keys")
    # A lone string is one key, as "listen" accepts one description.
    if isinstance(raw_keys, str):
        raw_keys = [raw_keys]
    if raw_keys is None:
        raw_keys = []
    if not isinstance(raw_keys, list) or not all(isinstance(k, str) for k in raw_keys):
        raise ConfigError('config: admin: property "keys" must be a list of strings')
    keys = tuple(_expand_env(k, environ) for k in raw_keys)
    # An admin API without a key would let anyone who reaches it rewrite the
    # routes: refuse to start rather than run it open.
    if not keys or not all(keys):
        raise ConfigError(
            'config: admin: property "keys" needs at least one non-empty key (the X-API-KEY value): '
            "without one anybody reaching the admin listener could change the routes"
        )
    store = doc.get("store", "fauth-store.json")
    if not isinstance(store, str) or not store:
        raise ConfigError('config: admin: property "store" must be a file path')
    require = doc.get("metrics_require_key", False)
    if not isinstance(require, bool):
        raise ConfigError('config: admin: property "metrics_require_key" must be true or false')
    return AdminConf(keys=keys, listen=listen, store=store, metrics_require_key=require)


def _check_endpoint(where: str, description: str) -> None:
    """Refuse endpoint strings Twisted could not parse (this also opens TLS key files), without listening."""
    from twisted.internet.endpoints import _parseServer  # type: ignore[attr-defined]

    try:
        kind, args, _ = _parseServer(description, None)
    except Exception as e:  # Twisted raises several types for bad strings
        raise ConfigError('config: %s: bad endpoint description "%s": %s' % (where, description, e))
    if kind in ("TCP", "SSL") and not 0 <= args[0] <= 65535:
        raise ConfigError('config: %s: bad endpoint description "%s": bad port' % (where, description))


def load_config(path: str) -> GatewayConf:
    """Read and validate a YAML (or JSON) configuration file."""
    return parse_config(read_document(path))


class _NonFiniteNumber(Exception):
    pass


def _refuse_constant(name: str) -> object:
    raise _NonFiniteNumber(name)


def read_document(path: str) -> object:
    """
    Read a YAML (or JSON) configuration file without validating it.

    @raise ConfigError: the file cannot be read or parsed.
    """
    try:
        with open(path, "rb") as f:
            # JSON first: PyYAML refuses tab-indented JSON and reads 1e3 as a string.
            try:
                doc = json.loads(f.read(), parse_constant=_refuse_constant)
            except _NonFiniteNumber as e:
                raise ConfigError("config: %s: %s is not a number (JSON has no NaN or Infinity)" % (path, e))
            except ValueError:
                f.seek(0)
                doc = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError("config: cannot read %s: %s" % (path, e.strerror or e))
    except yaml.YAMLError as e:
        raise ConfigError("config: %s is not valid YAML: %s" % (path, str(e).replace("\n", " ")))
    return doc
