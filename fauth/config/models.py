# -*- test-case-name: tests.config.test_document -*-
"""
The gateway's configuration as frozen models: what every other stage reads,
built once per document by L{fauth.config.document}.
"""
from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from typing import Any, Mapping, Optional, Tuple, Union

import attr

from fauth.config.expr import AddressList, Expr
from fauth.config.templates import Template, UriTemplate

__all__ = [
    "ActiveCheck",
    "AdminConf",
    "AuthChecks",
    "CacheConf",
    "DemoConf",
    "EtcdConf",
    "ForwardAuthConf",
    "GatewayConf",
    "HttpLimits",
    "Node",
    "PluginConfigConf",
    "PluginsConf",
    "RouteConf",
    "ServiceConf",
    "SigninConf",
    "TrustedProxies",
    "UpstreamConf",
    "UpstreamTimeouts",
]


@attr.frozen
class CacheConf:
    """
    The C{cache} object inside C{forward-auth} (fauth's own, ignored by
    APISIX): decision cache, coalescing and serve-stale.

    @ivar ttl: seconds an allow is reused; C{0} keeps only coalescing.
    @ivar deny_ttl: seconds a 401 or 403 is reused.
    @ivar max_entries: decisions kept per route, least recently used first out.
    @ivar stale_if_error: seconds past expiry an allow may still serve
        while the auth service fails.
    @ivar key: variables whose values make the key; empty: the whole auth
        request (every field sent, and the body's digest in POST mode).
    """

    ttl: float
    deny_ttl: float = 0
    max_entries: int = 10000
    stale_if_error: float = 0
    key: Tuple[Template, ...] = ()


@attr.frozen
class SigninConf:
    """
    The C{signin_redirect} object inside C{forward-auth} (fauth's own):
    chosen denials become a redirect to a sign-in page, for browsers.

    @ivar uri: the sign-in URL (absolute, or a path on the client's host).
    @ivar param: the query parameter that carries the original URL.
    @ivar statuses: the auth answers that redirect.
    @ivar status: the redirect's status.
    """

    uri: str
    param: str = "rd"
    statuses: Tuple[int, ...] = (401,)
    status: int = 302


@attr.frozen
class ActiveCheck:
    """
    C{checks.active} of C{forward-auth} (fauth's own): a C{GET} of
    C{http_path} on every auth node each C{interval} seconds; a 2xx or 3xx
    answer within C{timeout} seconds passes.
    """

    http_path: str
    interval: float = 5.0
    timeout: float = 1.0


@attr.frozen
class AuthChecks:
    """
    C{checks} of C{forward-auth} with C{nodes}: passive (nginx's
    C{max_fails} failures in a row leave a node out for C{fail_timeout}
    seconds; C{0} turns it off) and optionally active.
    """

    max_fails: int = 1
    fail_timeout: float = 10.0
    active: Optional[ActiveCheck] = None


@attr.frozen
class ForwardAuthConf:
    """
    One validated C{forward-auth} plugin instance (defaults filled in).

    @ivar uri_template: C{uri} compiled when it has variables, else C{None}.
    @ivar preserve_request_method: (fauth's own) the auth call uses the
        client's method; C{request_method} still says whether it has the body.
    @ivar run_on_preflight: (fauth's own) C{False}: a CORS preflight goes
        upstream without an auth call.
    @ivar allow_partial_message: (fauth's own) POST mode: a larger body
        sends its first C{max_req_body_size} bytes to auth instead of a 413.
    """

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
    uri_template: Optional[UriTemplate] = None
    preserve_request_method: bool = False
    run_on_preflight: bool = True
    allow_partial_message: bool = False
    #: Off (C{None}) unless the object has a C{cache} section.
    cache: Optional[CacheConf] = None
    #: Several auth servers (fauth's own): where to connect, C{uri} saying
    #: what to ask; C{None}: C{uri}'s host alone.
    nodes: Optional[Tuple["Node", ...]] = None
    #: Their health checks (defaults with C{nodes}; C{None} without).
    checks: Optional[AuthChecks] = None
    #: C{_meta.filter}: the plugin runs only for requests it accepts (a
    #: compiled L{fauth.config.expr.Expr}), or always (C{None}).
    filter: Optional[Expr] = attr.field(default=None, eq=False)
    #: Off (C{None}) unless the object has a C{signin_redirect} section.
    signin_redirect: Optional[SigninConf] = None
    #: Cookies of a 2xx auth answer passed to the client (C{"*"}: all).
    allow_cookies: Tuple[str, ...] = ()
    #: Path prefixes the auth service serves itself: proxied to it, unchecked.
    auth_server_paths: Tuple[str, ...] = ()
    warnings: Tuple[str, ...] = attr.field(default=(), eq=False)

    @property
    def client_uri(self) -> str:
        """The URL the auth client is built for: C{uri}, or with variables its origin and C{/}."""
        return self.uri if self.uri_template is None else self.uri_template.origin + "/"


@attr.frozen
class Node:
    """One upstream node."""

    host: str
    port: int
    weight: int = 1
    #: Lower priorities are tried only once every higher one failed (APISIX's).
    priority: int = 0

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
    """
    A validated upstream: where allowed requests go.

    @ivar type: C{roundrobin}, C{least_conn} or C{chash}.
    @ivar retries: further nodes tried after a connection failure; C{None}:
        as many as there are other nodes (APISIX's default).
    @ivar retry_timeout: seconds from the first try after which no further
        node is tried; C{0}: no limit.
    @ivar hash_on: what C{key} names, for C{chash}: C{vars}, C{header},
        C{cookie} or C{vars_combinations}.
    @ivar key: the variable, header or cookie name (or the template, for
        C{vars_combinations}) whose value is hashed.
    @ivar tls_verify: verify an https upstream's certificate and name.
    """

    nodes: Tuple[Node, ...]
    id: Optional[str] = None
    type: str = "roundrobin"
    scheme: str = "http"
    pass_host: str = "pass"
    upstream_host: Optional[str] = None
    timeout: UpstreamTimeouts = UpstreamTimeouts()
    keepalive_pool: int = 320
    keepalive_idle_timeout: float = 60.0
    keepalive_requests: int = 1000
    retries: Optional[int] = None
    retry_timeout: float = 0.0
    hash_on: str = "vars"
    key: Optional[str] = None
    tls_verify: bool = True

    @property
    def tries(self) -> int:
        """How many nodes one request may try, the first included."""
        usable = sum(1 for n in self.nodes if n.weight > 0)
        retries = usable - 1 if self.retries is None else self.retries
        return max(1, min(retries + 1, usable))


@attr.frozen
class RouteConf:
    """
    A validated route, its service and plugin config merged in (as APISIX's
    C{plugin_config.merge} and C{merge_service_route}).

    @ivar hosts: the route's C{hosts} (or C{host}), else its service's.
    @ivar remote_addrs: C{remote_addrs} (or C{remote_addr}), or C{None}.
    @ivar vars: the compiled C{vars}, or C{None}.
    @ivar enable_websocket: an C{Upgrade: websocket} request is tunnelled to
        the upstream (L{fauth.upstream.tunnel}) instead of having its
        C{Upgrade} and C{Connection} headers dropped.
    @ivar encoded_characters: C{keep} or C{reject} (see L{HttpLimits}), or
        C{None}: the C{http} section's.
    @ivar failure: for a route that arrived at run time (etcd) but cannot
        run, why: it keeps its place in the table and answers 503 (fail
        closed) rather than let its paths fall to a broader route.
        C{upstream} is then C{None}; otherwise it never is.
    """

    id: str
    uris: Tuple[str, ...]
    upstream: Optional[UpstreamConf]
    name: str = ""
    methods: Optional[frozenset] = None
    hosts: Optional[Tuple[str, ...]] = None
    priority: int = 0
    forward_auth: Optional[ForwardAuthConf] = None
    enabled: bool = True
    enable_websocket: bool = False
    encoded_characters: Optional[str] = None
    remote_addrs: Optional[AddressList] = None
    vars: Optional[Expr] = None
    service_id: Optional[str] = None
    plugin_config_id: Optional[str] = None
    failure: Optional[str] = None
    source: Mapping[str, Any] = attr.field(factory=dict, eq=False, repr=False)


#: What a path holding an ambiguous encoding gets (L{HttpLimits.encoded_characters}).
ENCODED_POLICIES = ("keep", "reject")


@attr.frozen
class PluginsConf:
    """
    The C{plugins} of a route, service or plugin config.  Merging goes by
    plugin name, as APISIX's: an object that has C{forward-auth} gives it
    whole, whatever a service or plugin config under it says.
    """

    has_forward_auth: bool = False
    forward_auth: Optional[ForwardAuthConf] = None


@attr.frozen
class ServiceConf:
    """
    A validated APISIX service: what its routes take when they do not say
    it themselves (plugins, upstream, hosts, C{enable_websocket}).
    """

    id: str
    upstream: Optional[UpstreamConf] = None
    plugins: PluginsConf = PluginsConf()
    hosts: Optional[Tuple[str, ...]] = None
    enable_websocket: Optional[bool] = None
    name: str = ""


@attr.frozen
class PluginConfigConf:
    """A validated APISIX plugin config: plugins its routes take when they lack them."""

    id: str
    plugins: PluginsConf = PluginsConf()


@attr.frozen
class HttpLimits:
    """
    Limits of the client-facing HTTP server (L{fauth.edge.server}).

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
    @ivar client_max_body_size: bytes a request body may have, 0 for no
        limit; more get 413 (the top-level key of that name, APISIX's).
    @ivar http2: offer HTTP/2 (ALPN C{h2}) on C{ssl:} listeners
        (L{fauth.edge.h2}; needs the C{h2} package).
    @ivar max_concurrent_streams: HTTP/2 streams one connection may have
        open at once; more closes the connection.
    @ivar encoded_characters: what a path holding C{%2F}, C{%5C}, C{%00},
        C{%3B}, C{%25}, C{%3F} or C{%23} gets (L{fauth.request.inbound}):
        C{reject} (400) or C{keep} (routed, authorised and proxied still
        encoded); a route's own C{encoded_characters} wins.
    @ivar merge_slashes: repeated slashes in a path are one, for routing,
        the auth service and the upstream alike.
    """

    idle_timeout: float = 60.0
    max_headers: int = 500
    max_header_bytes: int = 16384
    max_request_line: int = 8192
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    client_max_body_size: int = 0
    http2: bool = False
    max_concurrent_streams: int = 100
    encoded_characters: str = "reject"
    merge_slashes: bool = True


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
class EtcdConf:
    """
    Where routes and upstreams live when several gateways share them: an
    etcd cluster, in APISIX's key layout (C{<prefix>/routes/<id>},
    C{<prefix>/upstreams/<id>}); the names are APISIX's C{deployment.etcd}.

    @ivar hosts: the members' base URLs (C{http://127.0.0.1:2379}), tried in
        order; the next one when a member is unreachable.
    @ivar prefix: the key prefix, without a trailing slash.
    @ivar timeout: seconds per etcd request (the watch excepted).
    @ivar user: etcd's auth user, or C{None}.
    @ivar password: its password (C{${ENV_VAR}} already expanded).
    """

    hosts: Tuple[str, ...]
    prefix: str = "/apisix"
    timeout: float = 30.0
    user: Optional[str] = None
    password: Optional[str] = attr.field(default=None, repr=False)  # a secret: kept out of logs


@attr.frozen
class TrustedProxies:
    """
    Top-level C{trusted_proxies} (and C{real_ip_header}): peers whose
    forwarded chain names the client (L{fauth.request.clientaddr}).

    @ivar networks: the trusted networks (a single address is a /32 or /128).
    @ivar header: C{X-Forwarded-For} or C{Forwarded}: the one header the
        chain is read from.
    """

    networks: Tuple[Union[IPv4Network, IPv6Network], ...]
    header: str = "X-Forwarded-For"


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
    services: Mapping[str, ServiceConf] = attr.field(factory=dict)
    plugin_configs: Mapping[str, PluginConfigConf] = attr.field(factory=dict)
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
    #: Routes and upstreams of the admin API in etcd rather than the store file.
    etcd: Optional[EtcdConf] = None
    #: Peers whose X-Forwarded-For/Forwarded is honoured; C{None}: none.
    trusted_proxies: Optional[TrustedProxies] = None
    source: Mapping[str, Any] = attr.field(factory=dict, eq=False, repr=False)
