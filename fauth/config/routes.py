# -*- test-case-name: tests.config.test_routes -*-
"""
APISIX routes, services and plugin configs, validated in APISIX's wording,
and merged as APISIX merges them: a route's plugins override its plugin
config's (C{plugin_config.merge}), which override its service's
(C{plugin.merge_service_route}); the service supplies the upstream, hosts
and C{enable_websocket} a route does not set.

Every route field is either done as APISIX does it or refused: a field
accepted and ignored could change who gets in.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import attr

from fauth.config.apisix import (
    HTTP_METHODS,
    KNOWN_PLUGINS,
    _HOST_RE,
    _object,
    _prop,
    check_string_list,
    parse_forward_auth_plugin,
    parse_upstream,
)
from fauth.config.expr import parse_remote_addrs, parse_vars
from fauth.config.models import (
    ENCODED_POLICIES,
    PluginConfigConf,
    PluginsConf,
    RouteConf,
    ServiceConf,
    UpstreamConf,
    UpstreamTimeouts,
)
from fauth.config.schema import SchemaError, check_type

__all__ = ["parse_plugin_config", "parse_route", "parse_service", "placeholder_route"]

_METADATA = ("id", "name", "desc", "labels", "create_time", "update_time")
_ROUTE_KEYS = frozenset(
    _METADATA
    + (
        "uri", "uris", "methods", "host", "hosts", "remote_addr", "remote_addrs", "vars", "filter_func",
        "script", "script_id", "priority", "plugins", "plugin_config_id", "upstream", "upstream_id",
        "service_id", "timeout", "status", "enable_websocket", "encoded_characters",
    )
)
_SERVICE_KEYS = frozenset(_METADATA + ("plugins", "upstream", "upstream_id", "script", "enable_websocket", "hosts"))
_PLUGIN_CONFIG_KEYS = frozenset(_METADATA + ("plugins",))
_ID = re.compile(r"[a-zA-Z0-9\-_.]{1,64}\Z")
_NO_LUA = (
    'property "%s" is not supported: it is Lua code, which APISIX runs and fauth cannot; '
    "match with vars, remote_addrs, hosts and methods instead"
)


def _reference(name: str, value: object) -> str:
    """An id naming another object (C{upstream_id}, C{service_id}...): a string or a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        check_type(name, value, "string")
    text = str(value)
    if not _ID.match(text):
        raise _prop(name, 'invalid id "%s"' % text)
    return text


def parse_plugins(doc: Mapping[str, Any]) -> PluginsConf:
    """
    The C{plugins} of a route, service or plugin config: C{forward-auth}
    is the only one fauth runs; any other is refused (a plugin APISIX would
    run, e.g. C{limit-count} or C{ip-restriction}, must not be skipped).
    """
    plugins = doc.get("plugins", {})
    if plugins == []:
        plugins = {}
    check_type("plugins", plugins, "object")
    forward_auth = None
    for plugin_name, plugin_conf in plugins.items():
        if plugin_name not in KNOWN_PLUGINS:
            raise SchemaError("unknown plugin [%s]" % plugin_name)
        try:
            forward_auth = parse_forward_auth_plugin(plugin_conf)
        except SchemaError as e:
            raise SchemaError("failed to check the configuration of plugin %s err: %s" % (plugin_name, e))
    return PluginsConf("forward-auth" in plugins, forward_auth)


def _hosts(doc: Mapping[str, Any], single: bool) -> Optional[Tuple[str, ...]]:
    hosts: Optional[Tuple[str, ...]] = None
    if single and "host" in doc and "hosts" in doc:
        raise SchemaError('only one of "host" and "hosts" is allowed')
    if single and "host" in doc:
        check_type("host", doc["host"], "string")
        hosts = (doc["host"],)
    elif "hosts" in doc:
        hosts = check_string_list("hosts", doc["hosts"])
    for h in hosts or ():
        if not _HOST_RE.match(h):
            # Escaped: the message is one line, whatever the host holds.
            raise _prop("hosts", 'invalid host "%s"' % h.encode("unicode_escape").decode("ascii"))
    return tuple(h.lower() for h in hosts) if hosts else None


def _upstream(doc: Mapping[str, Any], upstreams: Mapping[str, UpstreamConf]) -> Optional[UpstreamConf]:
    if "upstream" in doc and "upstream_id" in doc:
        raise SchemaError('only one of "upstream" and "upstream_id" is allowed')
    if "upstream" in doc:
        try:
            return parse_upstream(doc["upstream"])
        except SchemaError as e:
            raise SchemaError("upstream: %s" % e)
    if "upstream_id" in doc:
        uid = _reference("upstream_id", doc["upstream_id"])
        if uid not in upstreams:
            raise SchemaError("failed to fetch upstream info by upstream id [%s]" % uid)
        return upstreams[uid]
    return None


def _refuse_lua(doc: Mapping[str, Any]) -> None:
    for name in ("filter_func", "script", "script_id"):
        if name in doc:
            raise SchemaError(_NO_LUA % name)


def _uris(doc: Mapping[str, Any]) -> Tuple[str, ...]:
    if "uri" in doc and "uris" in doc:
        raise SchemaError('only one of "uri" and "uris" is allowed')
    if "uri" in doc:
        check_type("uri", doc["uri"], "string")
        uris: Tuple[str, ...] = (doc["uri"],)
    elif "uris" in doc:
        uris = check_string_list("uris", doc["uris"])
    else:
        raise SchemaError('property "uri" is required')
    for uri in uris:
        if not uri.startswith("/"):
            raise _prop("uri", 'expected "%s" to start with "/"' % uri)
        stars = uri.count("*")
        # "/a/*/b": radixtree checks the rest of the path with a regex made
        # of the segments; fauth does the same for one star that starts its
        # segment (more stars could be made slow by a crafted path).
        if stars > 1 or (stars == 1 and not uri.endswith("*") and uri[uri.index("*") - 1] != "/"):
            raise _prop(
                "uri", '"%s": a "*" ends the uri ("/api/*"), or one "*" starts a segment inside it ("/a/*/b")' % uri
            )
    return uris


def _timeout(doc: Mapping[str, Any]) -> UpstreamTimeouts:
    t = doc["timeout"]
    check_type("timeout", t, "object")
    values: Dict[str, float] = {}
    for k in ("connect", "send", "read"):
        if not isinstance(t, dict) or k not in t:
            raise _prop("timeout", 'property "%s" is required' % k)
        v = t[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _prop("timeout", 'property "%s" validation failed: wrong type: expected number' % k)
        if not 0 < v < float("inf"):
            raise _prop("timeout", 'property "%s" validation failed: expected %s to be greater than 0' % (k, v))
        values[k] = float(v)
    return UpstreamTimeouts(**values)


_LABEL_VALUE = re.compile(r"\S{1,256}\Z")


def _metadata(doc: Mapping[str, Any]) -> str:
    """
    Check C{name}, C{desc} and C{labels} (inert, but shown and listed by:
    APISIX's types and lengths); the name.
    """
    name = doc.get("name", "")
    check_type("name", name, "string")
    if len(name) > 256:
        raise _prop("name", "string too long, expected at most 256")
    if "desc" in doc:
        check_type("desc", doc["desc"], "string")
        if len(doc["desc"]) > 256:
            raise _prop("desc", "string too long, expected at most 256")
    if "labels" in doc:
        check_type("labels", doc["labels"], "object")
        for key, value in (doc["labels"] or {}).items():
            if not isinstance(value, str) or not _LABEL_VALUE.match(value):
                raise _prop("labels", 'property "%s" validation failed: expected a string of 1 to 256 '
                            "characters without whitespace" % key)
    return str(name)


def _object_id(doc: Mapping[str, Any], given: Optional[str]) -> str:
    oid = doc.get("id", given)
    if oid is None:
        raise SchemaError('property "id" is required')
    if isinstance(oid, bool) or not isinstance(oid, (str, int)):
        check_type("id", oid, "string")
    return str(oid)


def parse_route(
    doc: object,
    upstreams: Mapping[str, UpstreamConf],
    route_id: Optional[str] = None,
    services: Mapping[str, ServiceConf] = {},
    plugin_configs: Mapping[str, PluginConfigConf] = {},
) -> RouteConf:
    """
    Validate one APISIX route object and merge its service and plugin
    config into it.

    @raise SchemaError: what is wrong, without the route prefix.
    """
    doc = _object("route", doc, _ROUTE_KEYS)
    uris = _uris(doc)
    _refuse_lua(doc)
    methods = None
    if "methods" in doc:
        listed = check_string_list("methods", doc["methods"])
        for m in listed:
            if m not in HTTP_METHODS:
                raise _prop("methods", "failed to validate item: matches none of the enum values")
        methods = frozenset(listed)
    hosts = _hosts(doc, single=True)
    if "remote_addr" in doc and "remote_addrs" in doc:
        raise SchemaError("only one of remote_addr or remote_addrs is allowed")
    remote_addrs = None
    for prop in ("remote_addr", "remote_addrs"):
        if prop in doc:
            remote_addrs = parse_remote_addrs(doc[prop], prop)
    variables = parse_vars(doc["vars"]) if "vars" in doc else None
    priority = doc.get("priority", 0)
    check_type("priority", priority, "integer")
    status = doc.get("status", 1)
    check_type("status", status, "integer")
    if status not in (0, 1):
        raise _prop("status", "matches none of the enum values")
    name = _metadata(doc)
    enable_websocket = doc.get("enable_websocket")
    if enable_websocket is not None:
        check_type("enable_websocket", enable_websocket, "boolean")
    encoded_characters = doc.get("encoded_characters")
    if encoded_characters is not None:
        # fauth's own (Traefik's encodedCharacters, per route): APISIX has none.
        check_type("encoded_characters", encoded_characters, "string")
        if encoded_characters not in ENCODED_POLICIES:
            raise _prop("encoded_characters", "matches none of the enum values")
    # Merged by plugin name, as APISIX: the first object that has the
    # plugin gives it whole (route, then plugin config, then service).
    plugins = parse_plugins(doc)
    upstream = _upstream(doc, upstreams)
    timeout = _timeout(doc) if "timeout" in doc else None

    plugin_config_id = None
    if "plugin_config_id" in doc:
        plugin_config_id = _reference("plugin_config_id", doc["plugin_config_id"])
        plugin_config = plugin_configs.get(plugin_config_id)
        if plugin_config is None:
            raise SchemaError(
                "failed to fetch plugin config info by plugin config id [%s], response code: 404" % plugin_config_id
            )
        plugins = plugins if plugins.has_forward_auth else plugin_config.plugins
    service_id = None
    if "service_id" in doc:
        service_id = _reference("service_id", doc["service_id"])
        service = services.get(service_id)
        if service is None:
            raise SchemaError("failed to fetch service info by service id [%s], response code: 404" % service_id)
        plugins = plugins if plugins.has_forward_auth else service.plugins
        upstream = upstream or service.upstream
        hosts = hosts or service.hosts
        if enable_websocket is None:
            enable_websocket = service.enable_websocket
    if upstream is None:
        raise SchemaError('property "upstream" is required (or "upstream_id", or a service with one)')
    if timeout is not None:
        # The route's timeout replaces its upstream's (APISIX's set_timeout).
        upstream = attr.evolve(upstream, timeout=timeout)
    return RouteConf(
        id=_object_id(doc, route_id),
        uris=uris,
        upstream=upstream,
        name=name,
        methods=methods,
        hosts=hosts,
        priority=priority,
        forward_auth=plugins.forward_auth,
        enabled=status == 1,
        enable_websocket=bool(enable_websocket),
        encoded_characters=encoded_characters,
        remote_addrs=remote_addrs,
        vars=variables,
        service_id=service_id,
        plugin_config_id=plugin_config_id,
        source=doc,
    )


def parse_service(
    doc: object, upstreams: Mapping[str, UpstreamConf], service_id: Optional[str] = None
) -> ServiceConf:
    """
    Validate one APISIX service object.

    @raise SchemaError: what is wrong, without the service prefix.
    """
    doc = _object("service", doc, _SERVICE_KEYS)
    _refuse_lua(doc)
    name = _metadata(doc)
    enable_websocket = doc.get("enable_websocket")
    if enable_websocket is not None:
        check_type("enable_websocket", enable_websocket, "boolean")
    return ServiceConf(
        id=_object_id(doc, service_id),
        upstream=_upstream(doc, upstreams),
        plugins=parse_plugins(doc),
        hosts=_hosts(doc, single=False),
        enable_websocket=enable_websocket,
        name=name,
    )


def parse_plugin_config(doc: object, plugin_config_id: Optional[str] = None) -> PluginConfigConf:
    """
    Validate one APISIX plugin config object (C{plugins} is required).

    @raise SchemaError: what is wrong, without the plugin config prefix.
    """
    doc = _object("plugin_config", doc, _PLUGIN_CONFIG_KEYS)
    if "plugins" not in doc:
        raise SchemaError('property "plugins" is required')
    _metadata(doc)
    return PluginConfigConf(id=_object_id(doc, plugin_config_id), plugins=parse_plugins(doc))


def placeholder_route(
    route_id: str,
    doc: object,
    reason: str,
    previous: Optional[RouteConf] = None,
    services: Mapping[str, ServiceConf] = {},
) -> Optional[RouteConf]:
    """
    The fail-closed stand-in for a route that arrived at run time but cannot
    run: it matches where the route would (what of its C{uri}, C{hosts},
    C{methods} and C{priority} reads; where a field does not, the previous
    version's, else the broader choice: any method, any client) and
    answers 503, so that its paths never fall to a broader route.

    @return: C{None} when not even its uris can be read (nor a previous
        version's): there is nothing it could hold.
    """
    d: Mapping[str, Any] = doc if isinstance(doc, dict) else {}
    uris: Optional[Tuple[str, ...]] = None
    try:
        uris = _uris(d)
    except SchemaError:
        raw = d.get("uris", [d.get("uri")])
        readable = tuple(u for u in raw if isinstance(u, str) and u.startswith("/")) if isinstance(raw, list) else ()
        uris = readable or (previous.uris if previous is not None else None)
    if not uris:
        return None
    known = previous.hosts if previous is not None else None
    try:
        hosts = _hosts(d, single=True)
    except SchemaError:
        hosts = known
    if hosts is None and "service_id" in d:
        service = services.get(str(d["service_id"]))
        hosts = service.hosts if service is not None else known
    methods = None
    listed = d.get("methods")
    if isinstance(listed, list) and listed and all(m in HTTP_METHODS for m in listed):
        methods = frozenset(listed)
    priority = d.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        priority = previous.priority if previous is not None else 0
    return RouteConf(
        id=route_id,
        uris=uris,
        upstream=None,
        name=str(d.get("name") or ""),
        methods=methods,
        hosts=hosts,
        priority=priority,
        enabled=d.get("status", 1) != 0,
        failure=reason,
        source=d,
    )
