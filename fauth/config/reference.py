# -*- test-case-name: tests.config.test_reference -*-
"""
The configuration reference (C{docs/operators/reference.md}), generated from
what the validators accept: every section lists exactly the keys its parser
takes, with the defaults and bounds the parser and the models apply.  Only
the one-line meanings are written here; a key the parser accepts without a
meaning here, or a meaning for a key it no longer takes, stops L{render}.

Regenerate with C{python -m fauth.config.reference > docs/operators/reference.md};
C{tests/config/test_reference.py} fails while the file differs.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Mapping, Tuple

import attr

from fauth.config import apisix, document, extensions, routes, schema
from fauth.config.models import (
    ActiveCheck,
    AdminConf,
    AuthChecks,
    CacheConf,
    EtcdConf,
    GatewayConf,
    HttpLimits,
    RouteConf,
    SigninConf,
    TrustedProxies,
    UpstreamConf,
    UpstreamTimeouts,
)

__all__ = ["ReferenceDrift", "render"]

REQUIRED = "required"


class ReferenceDrift(Exception):
    """The meanings here and the keys a parser accepts disagree."""


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return "`%s`" % json.dumps(value)


def _model_defaults(model: type) -> Dict[str, str]:
    """C{field name -> shown default} of an attrs model's fields that have a plain default."""
    shown = {}
    for name, field in attr.fields_dict(model).items():
        # Plain values only: nested models (C{http}, C{timeout}) have tables or rows of their own.
        if isinstance(field.default, (str, int, float, tuple, type(None))):
            shown[name] = _shown(field.default)
    return shown


@attr.frozen
class _Section:
    title: str
    intro: str
    keys: Tuple[str, ...]
    defaults: Mapping[str, str]
    meanings: Mapping[str, str]

    def rows(self) -> List[str]:
        missing = sorted(set(self.keys) - set(self.meanings))
        extra = sorted(set(self.meanings) - set(self.keys))
        if missing or extra:
            raise ReferenceDrift(
                "%s: accepted but not described: %s; described but not accepted: %s"
                % (self.title, ", ".join(missing) or "-", ", ".join(extra) or "-")
            )
        lines = ["| key | default | meaning |", "|---|---|---|"]
        for key, meaning in self.meanings.items():
            lines.append("| `%s` | %s | %s |" % (key, self.defaults.get(key, "none"), meaning))
        return lines


def _forward_auth_defaults() -> Dict[str, str]:
    shown = {key: _shown(value) for key, value in schema.FORWARD_AUTH_DEFAULTS.items()}
    shown.update((key, _shown(value)) for key, value in schema.FORWARD_AUTH_EXTENSIONS.items())
    for key, (low, high) in schema._INTEGERS.items():
        bound = "at least %s" % low if high is None else "%s to %s" % (low, high)
        shown[key] = "%s (%s)" % (shown[key], bound)
    shown["request_method"] += " (%s)" % " or ".join("`%s`" % m for m in schema._REQUEST_METHODS)
    shown["uri"] = REQUIRED
    shown["allow_cookies"] = shown["auth_server_paths"] = _shown([])
    shown["checks"] = "passive, with `nodes`"
    return shown


_FORWARD_AUTH = {
    "uri": "the auth service's URL; its path and query are sent as they are, or filled from `$variables` (an extension)",
    "ssl_verify": "verify an https auth service's certificate and host name",
    "request_method": "`POST` sends the client's body to auth (read first, up to `max_req_body_size`); `GET` asks on the request head",
    "max_req_body_size": "POST mode: bytes of body sent to auth; a larger body gets 413 (or its prefix, with `allow_partial_message`)",
    "request_headers": "client headers copied to the auth request",
    "extra_headers": "headers added to the auth request; values may use variables",
    "upstream_headers": "auth-answer headers set on the upstream request after a 2xx; removed when the answer lacks them",
    "client_headers": "auth-answer headers copied to the client on a denial",
    "timeout": "milliseconds for the whole auth exchange, body included",
    "keepalive": "keep auth connections open for reuse",
    "keepalive_timeout": "milliseconds an idle auth connection is kept",
    "keepalive_pool": "idle auth connections kept per auth service",
    "allow_degradation": "when the auth service fails, let the request through unchanged",
    "status_on_error": "status answered when the auth service fails and degradation is off",
    "_meta": "APISIX's plugin metadata: `disable`, `filter`, `error_response`, `priority`",
    "cache": "extension: decision cache, coalescing and serve-stale (the last table)",
    "preserve_request_method": "extension: the auth call uses the client's method",
    "run_on_preflight": "extension: `false` lets a CORS preflight through without an auth call",
    "allow_partial_message": "extension, POST mode: a larger body sends its first `max_req_body_size` bytes to auth instead of 413",
    "preset": "extension: `authelia`, `oauth2-proxy` or `authentik` fills the attributes that server's documentation asks for; written ones win",
    "signin_redirect": "extension: chosen denials become a redirect to a sign-in page, for browsers (its own table)",
    "allow_cookies": "extension: cookie names (or `*`) whose `Set-Cookie` in a 2xx auth answer goes to the client's response",
    "auth_server_paths": "extension: path prefixes proxied to the auth service itself, without a check",
    "nodes": 'extension: several auth servers, `{"host:port": weight}` or a list of `{host, port, weight, priority}`; `uri` says what each is asked',
    "checks": "extension, with `nodes`: their health checks (the `checks` tables)",
}

_SIGNIN = {
    "uri": "the sign-in URL: a path on the client's host, or an http(s) URL",
    "param": "the query parameter carrying the original URL, percent-encoded",
    "statuses": "the auth answers that redirect (300 to 599)",
    "status": "the redirect's status: 301, 302, 303, 307 or 308",
}

_CHECKS = {
    "passive": "failures in a row that leave a node out, and for how long (the next table)",
    "active": "a periodic `GET` of each node (the table after it); none: off",
}

_PASSIVE = {
    "max_fails": "calls without an answer in a row that leave a node out; `0`: never",
    "fail_timeout": "seconds a node stays out; back in, one more failure leaves it out again",
}

_ACTIVE = {
    "http_path": "path each node is asked with `GET` (with `uri`'s Host)",
    "interval": "seconds between checks of a node",
    "timeout": "seconds for a check's answer; a 2xx or 3xx passes",
}

_CACHE = {
    "ttl": "seconds an allow is reused; `0` keeps only coalescing",
    "deny_ttl": "seconds a 401 or 403 is reused",
    "max_entries": "decisions kept per route, least recently used out first",
    "stale_if_error": "seconds past expiry an allow may still serve while the auth service fails",
    "key": "variables whose values make the key; empty: the whole auth request",
}

_TOP_LEVEL = {
    "listen": "Twisted endpoint descriptions the gateway serves on (`tcp:`, `ssl:`, `unix:`, `systemd:`)",
    "routes": "route objects, APISIX's",
    "upstreams": "shared upstream objects, each with an `id`",
    "services": "service objects (APISIX's), each with an `id`: plugins, upstream and hosts shared by routes",
    "plugin_configs": "plugin config objects (APISIX's), each with an `id`",
    "demo": "endpoints of the in-process demo auth service and echo upstream (`auth`, `upstream`)",
    "ssl_trusted_certificate": "CA bundle for https auth services and upstreams",
    "http": "client-side limits and HTTP/2 (the next table)",
    "admin": "the admin API (its table below); omitted: no admin API",
    "shutdown_grace": "seconds SIGTERM waits for requests in flight",
    "access_log": "access log path, or `-` for standard output; none: off",
    "access_log_user_header": "auth-answer header the access log shows as `user`",
    "workers": "worker processes (`--workers` overrides it)",
    "client_max_body_size": "bytes (or `10m`, `1g`) a request body may have; more gets 413; `0`: no limit",
    "etcd": "routes and upstreams shared through etcd (its table below)",
    "trusted_proxies": "extension: addresses and CIDRs (or `private_ranges`) whose forwarded chain names the client",
    "real_ip_header": "extension, with `trusted_proxies`: `X-Forwarded-For` or `Forwarded`, the one header the chain is read from",
}

_HTTP = {
    "idle_timeout": "seconds a keep-alive connection may wait for its next request",
    "max_headers": "header fields a request may have; more gets 431",
    "max_header_bytes": "bytes of header fields; more gets 431",
    "max_request_line": "bytes of request line; longer gets 414",
    "header_timeout": "seconds for a request line and headers to arrive, then 408",
    "body_timeout": "seconds for the whole request body to arrive, then 408",
    "http2": "offer HTTP/2 (ALPN `h2`) on `ssl:` listeners",
    "max_concurrent_streams": "HTTP/2 streams open at once per connection",
    "encoded_characters": "`reject` (400) or `keep` (still encoded, for routing, auth and the upstream) a path with `%2F`, `%5C`, `%00`, `%3B`, `%25`, `%3F`, `%23`",
    "merge_slashes": "`//` in a path counts as `/` (for routing, auth and the upstream alike)",
}

_ADMIN = {
    "listen": "endpoint description of the admin API's own listener",
    "keys": "accepted `X-API-KEY` values, `${ENV_VAR}` allowed; at least one non-empty",
    "store": "JSON file keeping admin API changes (not used with `etcd`)",
    "metrics_require_key": "`/metrics` needs `X-API-KEY` too",
}

_ETCD = {
    "host": "etcd members' base URLs, tried in order",
    "prefix": "key prefix, APISIX's layout below it",
    "timeout": "seconds per etcd request (the watch excepted)",
    "user": "etcd user (with `password`)",
    "password": "etcd password, `${ENV_VAR}` allowed",
}

_METADATA = {
    "id": "the object's id (standalone YAML objects without one are named `arr_<position>`)",
    "name": "a name (admin API lists filter on it)",
    "desc": "a description",
    "labels": "string labels (admin API lists filter on them)",
    "create_time": "set by the admin API",
    "update_time": "set by the admin API",
}

_ROUTE = dict(
    _METADATA,
    **{
        "uri": "exact path, or a prefix ending in `*`",
        "uris": "several of `uri`",
        "methods": "HTTP methods matched; none: every method",
        "host": "one host matched (`*.example.com` wildcards)",
        "hosts": "several of `host`",
        "remote_addr": "one client address or CIDR matched",
        "remote_addrs": "several of `remote_addr`",
        "vars": "lua-resty-expr conditions on request variables",
        "filter_func": "refused: Lua",
        "script": "refused: Lua",
        "script_id": "refused: Lua",
        "priority": "higher wins among equal matches",
        "plugins": "`forward-auth` (every other plugin is refused)",
        "plugin_config_id": "a plugin config whose plugins the route's own override",
        "upstream": "an upstream object",
        "upstream_id": "the id of a shared upstream",
        "service_id": "a service supplying plugins, upstream and hosts the route lacks",
        "timeout": "`connect`, `send`, `read` seconds, replacing the upstream's",
        "status": "`0` disables the route",
        "enable_websocket": "tunnel WebSocket upgrades",
        "encoded_characters": "extension: overrides `http.encoded_characters` for this route",
    }
)

_SERVICE = dict(
    _METADATA,
    **{
        "plugins": "plugins for the routes that name the service",
        "upstream": "an upstream object",
        "upstream_id": "the id of a shared upstream",
        "script": "refused: Lua",
        "enable_websocket": "tunnel WebSocket upgrades on its routes",
        "hosts": "hosts for routes without their own",
    }
)

_PLUGIN_CONFIG = dict(_METADATA, plugins="plugins for the routes that name the plugin config")

_UPSTREAM = dict(
    {key: meaning for key, meaning in _METADATA.items() if key != "id"},
    **{
        "id": "the upstream's id (required in `upstreams`)",
        "type": "`roundrobin`, `least_conn` or `chash`",
        "scheme": "`http` or `https`",
        "nodes": '`{"host:port": weight}` or a list of `{host, port, weight, priority}`',
        "pass_host": "`pass` (client Host), `node` or `rewrite`",
        "upstream_host": "Host sent with `pass_host: rewrite`",
        "timeout": "`connect`, `send`, `read` seconds",
        "keepalive_pool": "`size`, `idle_timeout`, `requests` of the connection pool per node",
        "retries": "further nodes tried after a connection failure; default: nodes - 1",
        "retry_timeout": "seconds after which no further node is tried; `0`: no limit",
        "hash_on": "`chash`: `vars`, `header`, `cookie` or `vars_combinations`",
        "key": "`chash`: the variable, header, cookie or template hashed",
        "tls": "`verify: false` turns off certificate checks; client certificates refused",
        "checks": "refused: no health checks",
        "discovery_type": "refused: no service discovery",
        "discovery_args": "refused: no service discovery",
        "service_name": "refused: no service discovery",
    }
)


def _upstream_defaults() -> Dict[str, str]:
    shown = _model_defaults(UpstreamConf)
    shown["nodes"] = REQUIRED
    shown["timeout"] = ", ".join(
        "`%s: %s`" % (name, _shown(value).strip("`")) for name, value in attr.asdict(UpstreamTimeouts()).items()
    )
    shown["keepalive_pool"] = ", ".join(
        "`%s: %s`" % (key, shown[name].strip("`"))
        for key, name in (
            ("size", "keepalive_pool"),
            ("idle_timeout", "keepalive_idle_timeout"),
            ("requests", "keepalive_requests"),
        )
    )
    shown["tls"] = "`verify: true`"
    return shown


def _sections() -> Iterable[_Section]:
    top = _model_defaults(GatewayConf)
    top["client_max_body_size"] = _model_defaults(HttpLimits)["client_max_body_size"]
    top.update(dict.fromkeys(("upstreams", "services", "plugin_configs"), "`[]`"), http="the next table")
    top["real_ip_header"] = _shown(attr.fields(TrustedProxies).header.default)
    admin = _model_defaults(AdminConf)
    admin["keys"] = REQUIRED
    etcd = _model_defaults(EtcdConf)
    etcd["host"] = REQUIRED
    route = _model_defaults(RouteConf)
    route.update(status="`1`", name="none")
    yield _Section("Top level", "The keys of the configuration file.", tuple(document._TOP_LEVEL_KEYS), top, _TOP_LEVEL)
    yield _Section(
        "http", "Client-side limits (`http:`).",
        tuple(k for k in attr.fields_dict(HttpLimits) if k != "client_max_body_size"),
        _model_defaults(HttpLimits), _HTTP,
    )
    yield _Section("admin", "The admin API (`admin:`).", tuple(document._ADMIN_KEYS), admin, _ADMIN)
    yield _Section("etcd", "Shared configuration in etcd (`etcd:`).", tuple(document._ETCD_KEYS), etcd, _ETCD)
    yield _Section("Route", "A route object (file, admin API, etcd).", tuple(routes._ROUTE_KEYS), route, _ROUTE)
    yield _Section("Service", "A service object.", tuple(routes._SERVICE_KEYS), {}, _SERVICE)
    yield _Section("Plugin config", "A plugin config object.", tuple(routes._PLUGIN_CONFIG_KEYS), {}, _PLUGIN_CONFIG)
    yield _Section("Upstream", "An upstream object.", tuple(apisix._UPSTREAM_KEYS), _upstream_defaults(), _UPSTREAM)
    yield _Section(
        "forward-auth",
        "The `forward-auth` plugin object: APISIX's attributes with APISIX's defaults and bounds, then fauth's "
        "extensions. Unknown keys are accepted, as APISIX does.",
        # C{cache} is read by L{apisix.parse_forward_auth} beside the schema's properties.
        schema.FORWARD_AUTH_PROPERTY_ORDER + tuple(schema.FORWARD_AUTH_EXTENSIONS) + ("cache", "nodes", "checks")
        + extensions.INTEGRATION_KEYS,
        _forward_auth_defaults(), _FORWARD_AUTH,
    )
    cache = _model_defaults(CacheConf)
    cache["ttl"] = REQUIRED
    yield _Section(
        "forward-auth cache", "The `cache` object inside `forward-auth` (fauth's own).",
        tuple(apisix._CACHE_KEYS), cache, _CACHE,
    )
    signin = _model_defaults(SigninConf)
    signin["uri"] = REQUIRED
    yield _Section(
        "forward-auth signin_redirect", "The `signin_redirect` object inside `forward-auth` (fauth's own).",
        extensions.SIGNIN_KEYS, signin, _SIGNIN,
    )
    yield _Section(
        "forward-auth checks", "The `checks` object inside `forward-auth`, with `nodes` (fauth's own).",
        apisix._CHECKS_KEYS, {"passive": "on", "active": "none"}, _CHECKS,
    )
    yield _Section(
        "forward-auth checks.passive", "nginx's `max_fails` and `fail_timeout`, with their defaults.",
        apisix._PASSIVE_KEYS, _model_defaults(AuthChecks), _PASSIVE,
    )
    active = _model_defaults(ActiveCheck)
    active["http_path"] = REQUIRED
    yield _Section(
        "forward-auth checks.active", "Active checks of every auth node.", apisix._ACTIVE_KEYS, active, _ACTIVE,
    )


def render() -> str:
    """
    The reference page as Markdown.

    @raise ReferenceDrift: a parser accepts a key not described here, or the
        other way round.
    """
    out = [
        "# Configuration reference",
        "",
        "Generated by `fauth.config.reference` from the keys each parser accepts and the defaults it "
        "applies (do not edit: run `python -m fauth.config.reference > docs/operators/reference.md`). "
        "[Configuration](configuration.md) explains them with examples.",
    ]
    for section in _sections():
        out += ["", "## " + section.title, "", section.intro, ""] + section.rows()
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(render())
