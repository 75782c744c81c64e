"""
Configuration: frozen models, APISIX objects and their wording, the document, templates.

The public names are importable from here: C{from fauth.config import
parse_config, ConfigError, GatewayConf}.
"""
from fauth.config.apisix import parse_forward_auth, parse_upstream
from fauth.config.routes import parse_plugin_config, parse_route, parse_service
from fauth.config.document import load_config, parse_config, read_document
from fauth.config.errors import ConfigError
from fauth.config.models import (
    ActiveCheck,
    AdminConf,
    ENCODED_POLICIES,
    AuthChecks,
    CacheConf,
    DemoConf,
    EtcdConf,
    ForwardAuthConf,
    GatewayConf,
    HttpLimits,
    Node,
    PluginConfigConf,
    RouteConf,
    ServiceConf,
    SigninConf,
    TrustedProxies,
    UpstreamConf,
    UpstreamTimeouts,
)
from fauth.config.schema import SchemaError

__all__ = [
    "ENCODED_POLICIES",
    "ActiveCheck",
    "AdminConf",
    "AuthChecks",
    "CacheConf",
    "ConfigError",
    "DemoConf",
    "EtcdConf",
    "ForwardAuthConf",
    "GatewayConf",
    "HttpLimits",
    "Node",
    "PluginConfigConf",
    "RouteConf",
    "ServiceConf",
    "SchemaError",
    "SigninConf",
    "TrustedProxies",
    "UpstreamConf",
    "UpstreamTimeouts",
    "load_config",
    "parse_config",
    "parse_forward_auth",
    "parse_plugin_config",
    "parse_route",
    "parse_service",
    "parse_upstream",
    "read_document",
]
