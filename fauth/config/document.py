# -*- test-case-name: tests.config.test_document -*-
"""
A whole configuration document: YAML/JSON loading, the top-level keys, the
upstreams, services, plugin configs and routes in it
(L{fauth.config.apisix}, L{fauth.config.routes}), and C{${ENV_VAR}} in
admin keys.  Every error is one line naming the route and the attribute.
"""
from __future__ import annotations

import json
import os
import re
from importlib.util import find_spec
from ipaddress import ip_network
from typing import Any, Callable, Dict, Mapping, Optional, TypeVar

import attr
import yaml

from fauth.config.apisix import HEADER_NAME, check_string_list, parse_upstream
from fauth.config.routes import parse_plugin_config, parse_route, parse_service
from fauth.config.errors import ConfigError
from fauth.config.models import ENCODED_POLICIES, AdminConf, DemoConf, EtcdConf, GatewayConf, HttpLimits, TrustedProxies
from fauth.config.schema import SchemaError

__all__ = ["load_config", "parse_config", "read_document", "standalone_id"]

_TOP_LEVEL_KEYS = frozenset(
    [
        "listen", "routes", "upstreams", "services", "plugin_configs", "demo", "ssl_trusted_certificate", "http",
        "admin", "shutdown_grace", "access_log", "access_log_user_header", "workers", "client_max_body_size", "etcd",
        "trusted_proxies", "real_ip_header",
    ]
)
_ADMIN_KEYS = frozenset(["listen", "keys", "store", "metrics_require_key"])
_ETCD_KEYS = frozenset(["host", "prefix", "timeout", "user", "password"])
_ETCD_HOST_RE = re.compile(r"^http://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(:[0-9]{1,5})?/?$")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def standalone_id(position: int) -> str:
    """
    The id of the C{position}th (from 1) route or upstream of a file that
    gives it none: C{arr_<position>}, as APISIX's standalone mode names them
    (C{apisix/core/config_yaml.lua}).
    """
    return "arr_%d" % position


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
        listen_t = check_string_list("listen", listen)
    except SchemaError as e:
        raise ConfigError("config: %s" % e)
    for desc in listen_t:
        _check_endpoint("listen", desc)

    upstreams = _objects(doc, "upstreams", "upstream", parse_upstream)
    plugin_configs = _objects(doc, "plugin_configs", "plugin_config", parse_plugin_config)
    services = _objects(doc, "services", "service", lambda d, oid: parse_service(d, upstreams, oid))
    routes = list(
        _objects(doc, "routes", "route", lambda d, oid: parse_route(d, upstreams, oid, services, plugin_configs)).values()
    )

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
            if k not in attr.fields_dict(HttpLimits) or k == "client_max_body_size":
                raise ConfigError('config: http: unknown key "%s"' % k)
            if k == "encoded_characters":
                if v not in ENCODED_POLICIES:
                    raise ConfigError('config: http: property "encoded_characters" must be "keep" or "reject"')
                values[k] = v
                continue
            if k == "merge_slashes":
                if not isinstance(v, bool):
                    raise ConfigError('config: http: property "merge_slashes" must be a boolean')
                values[k] = v
                continue
            if k == "http2":
                if not isinstance(v, bool):
                    raise ConfigError('config: http: property "http2" must be a boolean')
                if v and find_spec("h2") is None:
                    raise ConfigError('config: http: "http2" needs the h2 package (pip install "twisted[http2]")')
                values[k] = v
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ConfigError('config: http: property "%s" must be a positive number' % k)
            if attr.fields_dict(HttpLimits)[k].type in (int, "int") and not isinstance(v, int):
                raise ConfigError('config: http: property "%s" must be a positive integer' % k)
            values[k] = v
        http = HttpLimits(**values)
    if doc.get("client_max_body_size") is not None:
        http = attr.evolve(http, client_max_body_size=_parse_size(doc["client_max_body_size"]))

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
    if not isinstance(user_header, str) or not HEADER_NAME.fullmatch(user_header):
        raise ConfigError('config: property "access_log_user_header" must be a header name')

    workers = doc.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError('config: property "workers" must be an integer, 1 or more')

    etcd = None
    if doc.get("etcd") is not None:
        etcd = _parse_etcd(doc["etcd"], os.environ if environ is None else environ)

    return GatewayConf(
        listen=listen_t,
        routes=tuple(routes),
        upstreams=upstreams,
        services=services,
        plugin_configs=plugin_configs,
        demo=demo,
        ssl_trusted_certificate=trusted,
        http=http,
        admin=admin,
        shutdown_grace=float(grace),
        access_log=access_log,
        access_log_user_header=user_header,
        workers=workers,
        etcd=etcd,
        trusted_proxies=_parse_trusted_proxies(doc.get("trusted_proxies"), doc.get("real_ip_header")),
        source=doc,
    )


_T = TypeVar("_T")


def _objects(doc: Mapping[str, Any], kind: str, singular: str, parse: Callable[[Any, str], _T]) -> Dict[str, _T]:
    """
    The APISIX objects of one top-level list, by id, in order (one without
    an id named by L{standalone_id}); an error names the object
    (C{route "1": ...}).
    """
    raw = doc.get(kind) or []
    if not isinstance(raw, list):
        raise ConfigError('config: property "%s" validation failed: wrong type: expected array' % kind)
    parsed: Dict[str, _T] = {}
    for i, item in enumerate(raw, 1):
        oid = item.get("id") if isinstance(item, dict) else None
        if oid is None:
            oid = standalone_id(i)
        label = '%s "%s"' % (singular, oid)
        try:
            obj = parse(item, str(oid))
        except SchemaError as e:
            message = str(e)
            prefix = "failed to check the configuration of plugin forward-auth err: "
            if message.startswith(prefix):
                message = "plugin forward-auth: " + message[len(prefix):]
            raise ConfigError("%s: %s" % (label, message))
        if str(oid) in parsed:
            raise ConfigError("%s: duplicate id" % label)
        parsed[str(oid)] = obj
    return parsed


_SIZE_RE = re.compile(r"([0-9]{1,15})([kKmMgG]?)\Z")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _parse_size(value: object) -> int:
    """
    C{client_max_body_size}: bytes as an integer, or nginx's size syntax
    (C{"512k"}, C{"10m"}, C{"1g"}), as APISIX passes it to nginx; 0 means
    no limit.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError('config: property "client_max_body_size" must be a size (bytes, or "10m", "1g"...)')
    if isinstance(value, int):
        if value < 0:
            raise ConfigError('config: property "client_max_body_size" must be 0 or more')
        return value
    match = _SIZE_RE.match(value.strip())
    if match is None:
        raise ConfigError('config: property "client_max_body_size" must be a size (bytes, or "10m", "1g"...)')
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


# Caddy's shorthand for the networks no public client comes from.
_PRIVATE_RANGES = ("192.168.0.0/16", "172.16.0.0/12", "10.0.0.0/8", "127.0.0.0/8", "fd00::/8", "::1/128")
_REAL_IP_HEADERS = {"x-forwarded-for": "X-Forwarded-For", "forwarded": "Forwarded"}


def _parse_trusted_proxies(value: object, header: object) -> Optional[TrustedProxies]:
    """
    C{trusted_proxies}: a list of IPv4/IPv6 addresses and CIDR networks (or
    C{private_ranges}, as Caddy), and C{real_ip_header}; an empty or absent
    list trusts nobody (C{None}).
    """
    if header is not None and not (isinstance(header, str) and header.lower() in _REAL_IP_HEADERS):
        raise ConfigError('config: property "real_ip_header" must be "X-Forwarded-For" or "Forwarded"')
    if value is None or value == []:
        if header is not None:
            raise ConfigError('config: property "real_ip_header" needs "trusted_proxies" (the peers it is read from)')
        return None
    if not isinstance(value, list):
        raise ConfigError('config: property "trusted_proxies" validation failed: wrong type: expected array')
    networks = []
    for entry in value:
        texts = _PRIVATE_RANGES if entry == "private_ranges" else (entry,)
        for text in texts:
            try:
                if not isinstance(text, str) or "%" in text:
                    raise ValueError(text)
                networks.append(ip_network(text.strip(), strict=False))
            except ValueError:
                raise ConfigError(
                    'config: trusted_proxies: "%s" is not an IP address or CIDR network (e.g. 10.0.0.0/8, ::1)' % entry
                )
    return TrustedProxies(
        networks=tuple(dict.fromkeys(networks)),
        header=_REAL_IP_HEADERS[header.lower()] if isinstance(header, str) else "X-Forwarded-For",
    )


def _expand_env(text: str, environ: Mapping[str, str], where: str = "admin: keys") -> str:
    def one(match: "re.Match[str]") -> str:
        name = match.group(1)
        if name not in environ:
            raise ConfigError('config: %s: environment variable "%s" is not set' % (where, name))
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


def _parse_etcd(doc: object, environ: Mapping[str, str]) -> EtcdConf:
    if not isinstance(doc, dict):
        raise ConfigError('config: property "etcd" validation failed: wrong type: expected object')
    for key in doc:
        if key not in _ETCD_KEYS:
            raise ConfigError('config: etcd: unknown key "%s" (known: %s)' % (key, ", ".join(sorted(_ETCD_KEYS))))
    hosts = doc.get("host")
    # A lone string is one member, as "listen" accepts one description.
    if isinstance(hosts, str):
        hosts = [hosts]
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
        raise ConfigError('config: etcd: property "host" must be a list of member URLs, e.g. ["http://127.0.0.1:2379"]')
    for host in hosts:
        if host.startswith("https://"):
            # Said plainly rather than half-supported: no client certificate
            # or CA option exists for etcd yet.
            raise ConfigError('config: etcd: host "%s": https is not supported yet; use http://' % host)
        match = _ETCD_HOST_RE.match(host)
        if not match or (match.group(2) and not 0 < int(match.group(2)[1:]) <= 65535):
            raise ConfigError('config: etcd: host "%s" must be http://HOST:PORT' % host)
    prefix = doc.get("prefix", "/apisix")
    if not isinstance(prefix, str) or not prefix.startswith("/") or len(prefix.rstrip("/")) < 2:
        raise ConfigError('config: etcd: property "prefix" must be a key prefix starting with "/", e.g. /apisix')
    timeout = doc.get("timeout", 30)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ConfigError('config: etcd: property "timeout" must be a positive number of seconds')
    user = doc.get("user")
    password = doc.get("password")
    if user is not None and (not isinstance(user, str) or not user):
        raise ConfigError('config: etcd: property "user" must be a non-empty string')
    if password is not None and not isinstance(password, str):
        raise ConfigError('config: etcd: property "password" must be a string')
    if (user is None) != (password is None):
        raise ConfigError('config: etcd: "user" and "password" go together (etcd\'s auth needs both)')
    if password is not None:
        password = _expand_env(password, environ, "etcd: password")
    return EtcdConf(
        hosts=tuple(h.rstrip("/") for h in hosts),
        prefix=prefix.rstrip("/"),
        timeout=float(timeout),
        user=user,
        password=password,
    )


def _check_endpoint(where: str, description: str) -> None:
    """Refuse endpoint strings Twisted could not parse (this also opens TLS key files), without listening."""
    from twisted.internet.endpoints import _parseServer

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
