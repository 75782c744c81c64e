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

from fauth.config.models import (
    ActiveCheck,
    AuthChecks,
    CacheConf,
    ForwardAuthConf,
    Node,
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
    format_number,
    is_object,
    security_warnings,
    type_mismatch,
)
from fauth.config.templates import compile_template

__all__ = [
    "HEADER_NAME",
    "HTTP_METHODS",
    "KNOWN_PLUGINS",
    "check_string_list",
    "parse_cache",
    "parse_forward_auth",
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
    ]
)
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
    checked = check_forward_auth(conf)
    # Beyond APISIX's schema: a list item that is not a header name can only
    # be a mistake, and would fail every request at run time.
    for prop in ("request_headers", "upstream_headers", "client_headers"):
        for i, name in enumerate(_checked(checked, prop, list), 1):
            if not HEADER_NAME.fullmatch(name):
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
        assert isinstance(extra, dict)  # as check_forward_auth returns it
        extra_headers = tuple(
            # Keys containing ':' skip validation in APISIX and fail at call
            # time; a non-string value there is stringified the Lua way.
            (str(name), compile_template(value if isinstance(value, str) else str(value)))
            for name, value in extra.items()
        )
    meta = checked.get("_meta")
    error_response = None
    if isinstance(meta, dict) and meta.get("error_response") is not None:
        er = meta["error_response"]
        error_response = er if isinstance(er, str) else json.dumps(er, separators=(",", ":"))
    cache = None
    if "cache" in checked:
        try:
            cache = parse_cache(checked["cache"])
        except SchemaError as e:
            raise _prop("cache", str(e))
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
        cache=cache,
        nodes=nodes,
        checks=checks,
        warnings=tuple(warnings),
    )


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
    if not is_object(doc):
        raise SchemaError(type_mismatch(doc, "object"))
    if not isinstance(doc, dict):
        doc = {}  # an empty array passes as an object (Lua cannot tell them apart)
    for name in doc:
        if name not in _CACHE_KEYS:
            raise SchemaError("additional properties forbidden, found %s" % name)
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
            bare = node_host.strip("[]")
            h, _ = _parse_node_address(bare if ":" not in node_host else "[%s]" % bare)
            parsed.append(Node(h, int(port), int(weight)))
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
            _parse_node_address(upstream_host)
        except SchemaError:
            raise _prop("upstream_host", 'invalid host "%s"' % _shown(upstream_host))
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
