# -*- test-case-name: tests.config.test_document -*-
"""
APISIX objects: C{forward-auth} plugin attributes and upstreams (routes:
L{fauth.config.routes}),
validated in the wording APISIX's validator uses, so an APISIX user's route
JSON works unchanged.
"""
from __future__ import annotations

import ipaddress
import json
import math
import re
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Type, TypeVar

from fauth.config.expr import parse_vars
from fauth.config.models import (
    ActiveCheck,
    AuthChecks,
    CacheConf,
    ForwardAuthConf,
    Node,
    RouteConf,
    UpstreamConf,
    UpstreamTimeouts,
)
from fauth.config.schema import (
    SchemaError,
    check_forward_auth,
    check_integer,
    check_integer_range,
    check_string_array,
    check_type,
    closed_object,
    format_number,
    is_object,
    type_mismatch,
    security_warnings,
)
from fauth.config.extensions import (
    extension,
    parse_allow_cookies,
    parse_auth_server_paths,
    parse_signin_redirect,
)
from fauth.config.headerrules import compile_rules
from fauth.config.presets import apply_preset
from fauth.config.templates import compile_template, compile_uri

__all__ = [
    "HEADER_NAME",
    "HTTP_METHODS",
    "KNOWN_PLUGINS",
    "auth_disabled",
    "check_string_list",
    "parse_cache",
    "meta_disabled",
    "parse_forward_auth",
    "parse_forward_auth_plugin",
    "parse_upstream",
]

HTTP_METHODS = frozenset(
    ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PURGE"]
)
KNOWN_PLUGINS = frozenset(["forward-auth"])
_UPSTREAM_KEYS = frozenset(
    [
        "id", "name", "desc", "type", "scheme", "nodes", "pass_host", "upstream_host",
        "timeout", "keepalive_pool", "labels", "create_time", "update_time",
        "retries", "retry_timeout", "hash_on", "key", "tls", "checks",
        "discovery_type", "discovery_args", "service_name",
    ]
)
#: Upstream fields of APISIX's schema that fauth refuses, and why.
_UPSTREAM_REFUSED = {
    "checks": "fauth runs no health checks (a node that refuses connections is retried on the next, see retries)",
    "discovery_type": "fauth has no service discovery; list the nodes in \"nodes\"",
    "discovery_args": "fauth has no service discovery; list the nodes in \"nodes\"",
    "service_name": "fauth has no service discovery; list the nodes in \"nodes\"",
}
_BALANCERS = ("roundrobin", "least_conn", "chash")
# APISIX's upstream_hash_vars_schema and upstream_hash_header_schema.
_HASH_VARS_PATTERN = (
    "^((uri|server_name|server_addr|request_uri|remote_port|remote_addr|query_string|host|hostname"
    "|mqtt_client_id)|arg_[0-9a-zA-z_-]+)$"
)
_HASH_NAME_PATTERN = "^[a-zA-Z0-9-_]+$"
HEADER_NAME = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")  # an RFC 9110 token; fullmatch
_HOST_RE = re.compile(r"\*?[0-9a-zA-Z-._\[\]:]+\Z")
_HOSTNAME_RE = re.compile(r"^[0-9A-Za-z]([0-9A-Za-z-]{0,62})(\.[0-9A-Za-z]([0-9A-Za-z-]{0,62}))*\.?$")


def _shown(value: str) -> str:
    """C{value} for a one-line message: control characters escaped."""
    return value if value.isprintable() else value.encode("unicode_escape").decode("ascii")


def _prop(name: str, message: str) -> SchemaError:
    return SchemaError('property "%s" validation failed: %s' % (name, message))


_T = TypeVar("_T")


def _checked(checked: Mapping[str, object], prop: str, kind: Type[_T]) -> _T:
    """C{checked[prop]}, which L{check_forward_auth} validated (or defaulted) as a C{kind}."""
    value = checked[prop]
    assert isinstance(value, kind), prop
    return value


def parse_forward_auth(conf: object) -> ForwardAuthConf:
    """
    Validate a C{forward-auth} attribute dict (as APISIX would) and return
    the frozen model.

    @raise SchemaError: with APISIX's message.
    """
    checked = check_forward_auth(apply_preset(conf))
    # Beyond APISIX's schema: a list item that is not a header name can only
    # be a mistake, and would fail every request at run time.
    for i, name in enumerate(_checked(checked, "request_headers", list), 1):
        if not HEADER_NAME.fullmatch(name):
            raise _prop("request_headers", 'failed to validate item %d: invalid header name "%s"' % (i, _shown(name)))
    # fauth's own: patterns and renames too (compiled again by the check).
    for prop in ("upstream_headers", "client_headers"):
        compile_rules(prop, _checked(checked, prop, list))
    warnings = list(security_warnings(checked))
    if checked["allow_degradation"] and checked["upstream_headers"]:
        warnings.append(
            "allow_degradation with upstream_headers: a degraded request keeps the client's own values "
            "of those headers"
        )
    extra = checked.get("extra_headers")
    extra_headers = None
    if extra is not None:
        assert isinstance(extra, dict)  # as check_forward_auth returns it
        extra_headers = tuple(
            # Keys containing ':' skip validation in APISIX and fail at call
            # time; a non-string value there is stringified the Lua way.
            (str(name), compile_template(value if isinstance(value, str) else str(value)))
            for name, value in extra.items()
        )
    meta = checked.get("_meta")
    try:
        _check_meta(meta)
    except SchemaError as e:
        raise _prop("_meta", str(e))
    plugin_filter = None
    if isinstance(meta, dict) and "filter" in meta:
        # APISIX: "failed to validate the 'vars' expression: ..." (plugin.lua).
        plugin_filter = parse_vars(meta["filter"])
    error_response = None
    if isinstance(meta, dict) and meta.get("error_response") is not None:
        er = meta["error_response"]
        error_response = er if isinstance(er, str) else json.dumps(er, separators=(",", ":"))
    uri = _checked(checked, "uri", str)
    try:
        uri_template = compile_uri(uri)
    except ValueError as e:
        raise _prop("uri", str(e))
    if checked.get("allow_partial_message") and checked["request_method"] != "POST":
        warnings.append('allow_partial_message has no effect without request_method "POST"')
    uri = _checked(checked, "uri", str)
    nodes = None
    checks = None
    if checked.get("nodes") is not None:
        nodes = _parse_nodes(checked["nodes"], "https" if uri[:6].lower() == "https:" else "http")
        try:
            checks = parse_checks(checked.get("checks"))
        except SchemaError as e:
            raise _prop("checks", str(e))
    elif checked.get("checks") is not None:
        raise _prop("checks", 'health checks are for "nodes" (several auth servers); "uri" alone has none')
    return ForwardAuthConf(
        uri=uri,
        ssl_verify=_checked(checked, "ssl_verify", bool),
        request_method=_checked(checked, "request_method", str),
        max_req_body_size=_checked(checked, "max_req_body_size", int),
        request_headers=tuple(_checked(checked, "request_headers", list)),
        extra_headers=extra_headers,
        upstream_headers=tuple(_checked(checked, "upstream_headers", list)),
        client_headers=tuple(_checked(checked, "client_headers", list)),
        timeout=_checked(checked, "timeout", int),
        keepalive=_checked(checked, "keepalive", bool),
        keepalive_timeout=_checked(checked, "keepalive_timeout", int),
        keepalive_pool=_checked(checked, "keepalive_pool", int),
        allow_degradation=_checked(checked, "allow_degradation", bool),
        status_on_error=_checked(checked, "status_on_error", int),
        error_response=error_response,
        uri_template=uri_template,
        preserve_request_method=checked.get("preserve_request_method", False) is True,
        run_on_preflight=checked.get("run_on_preflight", True) is not False,
        allow_partial_message=checked.get("allow_partial_message", False) is True,
        cache=extension(checked, "cache", parse_cache),
        nodes=nodes,
        checks=checks,
        filter=plugin_filter,
        warnings=tuple(warnings),
        signin_redirect=extension(checked, "signin_redirect", parse_signin_redirect),
        allow_cookies=parse_allow_cookies(checked["allow_cookies"]) if "allow_cookies" in checked else (),
        auth_server_paths=(
            parse_auth_server_paths(checked["auth_server_paths"]) if "auth_server_paths" in checked else ()
        ),
    )


def _check_meta(meta: object) -> None:
    """
    APISIX's injected C{_meta} schema (C{plugin_injected_schema}): C{disable}
    (see L{parse_forward_auth_plugin}), C{error_response}, C{priority}
    (forward-auth is the only plugin fauth runs: nothing to order), C{filter}
    (compiled by L{parse_forward_auth}); C{pre_function} is refused.
    """
    if not isinstance(meta, dict):
        return  # absent, or an empty array (Lua cannot tell it from an object)
    for name in meta:
        if name not in ("disable", "error_response", "priority", "filter", "pre_function"):
            raise SchemaError("additional properties forbidden, found %s" % name)
    if "disable" in meta:
        check_type("disable", meta["disable"], "boolean")
    if "error_response" in meta and not isinstance(meta["error_response"], str) and not is_object(
        meta["error_response"]
    ):
        raise _prop("error_response", "value should match only one schema, but matches none")
    if "priority" in meta:
        check_type("priority", meta["priority"], "integer")
    if "filter" in meta:
        check_type("filter", meta["filter"], "array")
    if "pre_function" in meta:
        check_type("pre_function", meta["pre_function"], "string")
        raise _prop("pre_function", "not supported by fauth: it runs no Lua")


def meta_disabled(conf: object) -> bool:
    """Whether a plugin object has C{_meta.disable} true (APISIX's C{check_disable})."""
    meta = conf.get("_meta") if isinstance(conf, dict) else None
    return isinstance(meta, dict) and meta.get("disable") is True


def auth_disabled(route: RouteConf) -> bool:
    """Whether C{route} has a C{forward-auth} that C{_meta.disable} turned off."""
    plugins = route.source.get("plugins")
    return isinstance(plugins, dict) and meta_disabled(plugins.get("forward-auth"))


def parse_forward_auth_plugin(conf: object) -> Optional[ForwardAuthConf]:
    """
    The C{forward-auth} of a route: L{parse_forward_auth}, or C{None} when
    C{_meta.disable} is true.  As APISIX, a disabled plugin never runs
    (every request of the route passes without an auth call) and is
    accepted even when the rest of its object does not validate; only its
    C{_meta} must.

    @raise SchemaError: with APISIX's message.
    """
    if not meta_disabled(conf):
        return parse_forward_auth(conf)
    try:
        _check_meta(conf.get("_meta") if isinstance(conf, dict) else None)
    except SchemaError as e:
        raise _prop("_meta", str(e))
    return None


_CACHE_KEYS = ("ttl", "deny_ttl", "max_entries", "stale_if_error", "key")


def _seconds(name: str, value: object) -> float:
    """A number of seconds: finite, at least 0."""
    check_type(name, value, "number")
    if not math.isfinite(value):  # type: ignore[arg-type]
        raise _prop(name, "expected %s to be a finite number" % format_number(value))
    check_integer_range(name, value, minimum=0)
    return value  # type: ignore[return-value]


def parse_cache(doc: object) -> CacheConf:
    """
    Validate the C{cache} object of C{forward-auth} (fauth's own).  Unlike
    the plugin object, unknown keys are refused: a misspelt C{stale_if_error}
    would otherwise silently change what is served during an outage.

    @raise SchemaError: what is wrong, without the C{property "cache"} prefix.
    """
    doc = closed_object(doc, _CACHE_KEYS)
    if "ttl" not in doc:
        # No default: "how long one user's allow serves again" is a choice
        # an operator makes, never one made for them.
        raise SchemaError('property "ttl" is required')
    ttl = _seconds("ttl", doc["ttl"])
    deny_ttl = _seconds("deny_ttl", doc.get("deny_ttl", 0))
    stale = _seconds("stale_if_error", doc.get("stale_if_error", 0))
    max_entries = check_integer("max_entries", doc.get("max_entries", 10000), minimum=1)
    names = check_string_array("key", doc.get("key", []))
    key = []
    for i, source in enumerate(names, 1):
        template = compile_template(source)
        # A key entry without a variable is the same for every request: all
        # of them would share one decision (one user's identity for all).
        if template.is_literal:
            raise _prop("key", 'failed to validate item %d: "%s" names no variable (e.g. "$http_authorization")'
                        % (i, _shown(source)))
        key.append(template)
    return CacheConf(
        ttl=ttl, deny_ttl=deny_ttl, max_entries=max_entries, stale_if_error=stale, key=tuple(key)
    )


_CHECKS_KEYS = ("passive", "active")
_PASSIVE_KEYS = ("max_fails", "fail_timeout")
_ACTIVE_KEYS = ("http_path", "interval", "timeout")
_HTTP_PATH = re.compile(r"/[!-~]*\Z")


def _closed_object(doc: object, keys: Tuple[str, ...]) -> Dict[str, Any]:
    """An object with only C{keys} (refused otherwise: a misspelt key would silently change health)."""
    if not is_object(doc):
        raise SchemaError(type_mismatch(doc, "object"))
    if not isinstance(doc, dict):
        return {}  # an empty array passes as an object (Lua cannot tell them apart)
    for name in doc:
        if name not in keys:
            raise SchemaError("additional properties forbidden, found %s" % name)
    return doc


def _positive_seconds(name: str, value: object) -> float:
    seconds = _seconds(name, value)
    if seconds <= 0:
        raise _prop(name, "expected %s to be greater than 0" % format_number(value))
    return seconds


def parse_checks(doc: object) -> AuthChecks:
    """
    Validate the C{checks} object of a C{forward-auth} with C{nodes}
    (fauth's own; C{None}: the defaults, passive only).

    @raise SchemaError: what is wrong, without the C{property "checks"} prefix.
    """
    if doc is None:
        return AuthChecks()
    doc = _closed_object(doc, _CHECKS_KEYS)
    passive = _closed_object(doc.get("passive", {}), _PASSIVE_KEYS)
    try:
        max_fails = check_integer("max_fails", passive.get("max_fails", 1), minimum=0)
        fail_timeout = _positive_seconds("fail_timeout", passive.get("fail_timeout", 10))
    except SchemaError as e:
        raise _prop("passive", str(e))
    active = None
    if doc.get("active") is not None:
        raw = _closed_object(doc["active"], _ACTIVE_KEYS)
        try:
            if "http_path" not in raw:
                raise SchemaError('property "http_path" is required')
            path = raw["http_path"]
            check_type("http_path", path, "string")
            if not isinstance(path, str) or not _HTTP_PATH.match(path):
                raise _prop("http_path", 'expected a path starting with "/", e.g. /healthz')
            active = ActiveCheck(
                http_path=path,
                interval=_positive_seconds("interval", raw.get("interval", 5)),
                timeout=_positive_seconds("timeout", raw.get("timeout", 1)),
            )
        except SchemaError as e:
            raise _prop("active", str(e))
    return AuthChecks(max_fails=max_fails, fail_timeout=fail_timeout, active=active)


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
            assert isinstance(weight, (int, float))  # an integer, maybe written as 2.0
            parsed.append(Node(host, port or default_port, int(weight)))
    elif isinstance(nodes, list):
        for i, item in enumerate(nodes, 1):
            if not isinstance(item, dict):
                raise _prop("nodes", "failed to validate item %d: wrong type: expected object" % i)
            node_host = item.get("host")
            check_type("nodes", node_host, "string")
            assert isinstance(node_host, str)
            port = item.get("port", default_port)
            check_type("nodes", port, "integer")
            check_integer_range("nodes", port, minimum=1, maximum=65535)
            weight = item.get("weight", 1)
            check_type("nodes", weight, "integer")
            check_integer_range("nodes", weight, minimum=0)
            priority = item.get("priority", 0)
            check_type("nodes", priority, "integer")
            assert isinstance(priority, (int, float))  # an integer, maybe written as 2.0
            if "metadata" in item:
                check_type("nodes", item["metadata"], "object")
            bare = node_host.strip("[]")
            h, _ = _parse_node_address(bare if ":" not in node_host else "[%s]" % bare)
            parsed.append(Node(h, int(port), int(weight), int(priority)))
    else:
        check_type("nodes", nodes, "object")
    if not parsed or not any(n.weight > 0 for n in parsed):
        raise _prop("nodes", "expect at least one node with a weight above 0")
    return tuple(parsed)


def _object(what: str, doc: object, allowed: frozenset) -> Dict[str, Any]:
    """An APISIX object with only the C{allowed} keys; an empty array passes as one (Lua cannot tell them apart)."""
    check_type(what, doc, "object")
    return dict(closed_object(doc, allowed))


def _number(name: str, value: object, minimum: float, exclusive: bool = False) -> float:
    """A finite number at least (or, C{exclusive}, above) C{minimum}."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        check_type(name, value, "number")
    assert isinstance(value, (int, float))
    if not math.isfinite(value):
        raise _prop(name, "expected %s to be a finite number" % value)
    if exclusive and value <= minimum:
        raise _prop(name, "expected %s to be greater than %s" % (format_number(value), format_number(minimum)))
    if not exclusive and value < minimum:
        raise _prop(name, "expected %s to be at least %s" % (format_number(value), format_number(minimum)))
    return float(value)


def _parse_timeouts(t: object) -> UpstreamTimeouts:
    check_type("timeout", t, "object")
    values = {}
    for k, v in (t.items() if isinstance(t, dict) else ()):
        if k not in ("connect", "send", "read"):
            raise _prop("timeout", "additional properties forbidden, found %s" % k)
        values[k] = _number("timeout", v, 0, exclusive=True)
    return UpstreamTimeouts(**values)


def _parse_tls(tls: object) -> bool:
    """C{tls}: whether to verify the upstream's certificate (fauth verifies unless told not to)."""
    check_type("tls", tls, "object")
    tls = tls if isinstance(tls, dict) else {}
    for name in ("client_cert", "client_key", "client_cert_id"):
        if name in tls:
            raise _prop("tls", "%s is not supported by fauth (no client certificates towards upstreams)" % name)
    for name in tls:
        if name != "verify":
            raise _prop("tls", "additional properties forbidden, found %s" % name)
    verify = tls.get("verify", True)
    check_type("tls", verify, "boolean")
    return bool(verify)


def _parse_hash(doc: Mapping[str, Any], kind: str) -> Tuple[str, Optional[str]]:
    """C{hash_on} and C{key}, checked as APISIX's C{check_upstream_conf} does for C{chash}."""
    hash_on = doc.get("hash_on", "vars")
    if hash_on not in ("vars", "header", "cookie", "consumer", "vars_combinations"):
        raise _prop("hash_on", "matches none of the enum values")
    key = doc.get("key")
    if key is not None:
        check_type("key", key, "string")
    if kind != "chash":
        return hash_on, key
    if hash_on == "consumer":
        raise _prop("hash_on", "consumer is not supported by fauth (it has no consumers)")
    if key is None:
        raise SchemaError("missing key")
    pattern = {"vars": _HASH_VARS_PATTERN, "header": _HASH_NAME_PATTERN, "cookie": _HASH_NAME_PATTERN}.get(hash_on)
    if pattern is not None and not re.fullmatch(pattern[1:-1], key):
        raise SchemaError('invalid configuration: failed to match pattern "%s" with "%s"' % (pattern, _shown(key)))
    return hash_on, key


def parse_upstream(doc: object, upstream_id: Optional[str] = None) -> UpstreamConf:
    """Validate one APISIX upstream object."""
    doc = _object("upstream", doc, _UPSTREAM_KEYS)
    for name, why in _UPSTREAM_REFUSED.items():
        if name in doc:
            raise _prop(name, "not supported: %s" % why)
    kind = doc.get("type", "roundrobin")
    check_type("type", kind, "string")
    if kind not in _BALANCERS:
        raise _prop("type", "invalid balancer type: %s (fauth has roundrobin, least_conn and chash)" % _shown(kind))
    scheme = doc.get("scheme", "http")
    if scheme in ("grpc", "grpcs", "tcp", "tls", "udp", "kafka"):
        raise _prop("scheme", "%s is not supported by fauth (http or https)" % scheme)
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
            _parse_node_address(upstream_host)
        except SchemaError:
            raise _prop("upstream_host", 'invalid host "%s"' % _shown(upstream_host))
    timeouts = _parse_timeouts(doc["timeout"]) if "timeout" in doc else UpstreamTimeouts()
    pool, idle, requests = 320, 60.0, 1000
    if "keepalive_pool" in doc:
        kp = doc["keepalive_pool"]
        check_type("keepalive_pool", kp, "object")
        kp = kp if isinstance(kp, dict) else {}
        for name in kp:
            if name not in ("size", "idle_timeout", "requests"):
                raise _prop("keepalive_pool", "additional properties forbidden, found %s" % name)
        pool = check_integer("keepalive_pool", kp.get("size", 320), minimum=1)
        idle = _number("keepalive_pool", kp.get("idle_timeout", 60), 0)
        requests = check_integer("keepalive_pool", kp.get("requests", 1000), minimum=1)
    retries = None
    if "retries" in doc:
        retries = check_integer("retries", doc["retries"], minimum=0)
    retry_timeout = _number("retry_timeout", doc["retry_timeout"], 0) if "retry_timeout" in doc else 0.0
    hash_on, key = _parse_hash(doc, kind)
    tls_verify = _parse_tls(doc["tls"]) if "tls" in doc else True
    for name in ("name", "desc"):
        if name in doc:
            check_type(name, doc[name], "string")
    if "labels" in doc:
        check_type("labels", doc["labels"], "object")
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
        keepalive_idle_timeout=idle,
        keepalive_requests=requests,
        retries=retries,
        retry_timeout=retry_timeout,
        hash_on=hash_on,
        key=key,
        tls_verify=tls_verify,
    )


def check_string_list(name: str, value: object) -> Tuple[str, ...]:
    check_type(name, value, "array")
    if not isinstance(value, list):
        value = []  # an empty object passes as an array (Lua cannot tell them apart)
    for i, item in enumerate(value, 1):
        if not isinstance(item, str):
            raise _prop(name, "failed to validate item %d: wrong type: expected string" % i)
    if not value:
        raise _prop(name, "expect array to have at least 1 items")
    return tuple(value)
