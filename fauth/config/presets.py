# -*- test-case-name: tests.auth.test_presets -*-
"""
Presets (C{preset: authelia | oauth2-proxy | authentik}, fauth's own): the
C{forward-auth} attributes each auth server's documentation asks nginx,
Traefik and Caddy users to set, filled in before the object is validated.
Attributes written in the object win over the preset's, whole (a list
given replaces the preset's list).  A C{uri} without a path
(C{http://authelia:9091}) gets the preset's path.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Dict
from urllib.parse import urlsplit

from fauth.config.schema import check_enum, check_type

__all__ = ["PRESETS", "apply_preset"]

_AUTHELIA: Dict[str, Any] = {
    # Authelia 4.38+, "Forward Auth" implementation (Traefik, Caddy): it
    # reads X-Forwarded-Method/-Proto/-Host/-Uri/-For, which fauth sends, and
    # itself answers a browser with 302 to its portal (rd already in the
    # Location), a script with 401.
    "path": "/api/authz/forward-auth",
    "request_headers": ["Authorization", "Proxy-Authorization", "Cookie", "Accept", "X-Requested-With"],
    "upstream_headers": ["Remote-User", "Remote-Groups", "Remote-Email", "Remote-Name"],
    "client_headers": ["Location", "Set-Cookie", "WWW-Authenticate"],
}
_OAUTH2_PROXY: Dict[str, Any] = {
    # oauth2-proxy's nginx auth_request setup: 401 without a session, turned
    # into a 302 to /oauth2/start?rd=...; a refreshed session cookie on the
    # 2xx passed on; /oauth2/ routed to oauth2-proxy.
    "path": "/oauth2/auth",
    "request_headers": ["Cookie", "Authorization"],
    "extra_headers": {"X-Original-URI": "$request_uri"},
    "upstream_headers": ["X-Auth-Request-*"],
    "client_headers": ["WWW-Authenticate"],
    "signin_redirect": {"uri": "/oauth2/start", "param": "rd"},
    "allow_cookies": ["*"],
    "auth_server_paths": ["/oauth2/"],
}
_AUTHENTIK: Dict[str, Any] = {
    # authentik's proxy outpost, nginx endpoint: the URL in X-Original-URL,
    # 401 without a session turned into a 302 to the outpost's start page,
    # its cookie passed on, /outpost.goauthentik.io/ routed to the outpost.
    "path": "/outpost.goauthentik.io/auth/nginx",
    "request_headers": ["Cookie", "Authorization"],
    "extra_headers": {"X-Original-URL": "$scheme://$http_host$request_uri"},
    "upstream_headers": ["X-authentik-*"],
    "signin_redirect": {"uri": "/outpost.goauthentik.io/start", "param": "rd"},
    "allow_cookies": ["*"],
    "auth_server_paths": ["/outpost.goauthentik.io/"],
}

#: The attributes of each preset (C{path}: the auth endpoint's path).
PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {"authelia": _AUTHELIA, "oauth2-proxy": _OAUTH2_PROXY, "authentik": _AUTHENTIK}
)


def apply_preset(conf: object) -> object:
    """
    C{conf} with its preset's attributes filled in, as a new dict; C{conf}
    itself when it names no preset (or is not an object: the validator
    says so).

    @raise fauth.config.schema.SchemaError: an unknown preset, in APISIX's wording.
    """
    if not isinstance(conf, Mapping) or "preset" not in conf:
        return conf
    name = check_type("preset", conf["preset"], "string")
    check_enum("preset", name, tuple(PRESETS))
    preset = PRESETS[name]  # type: ignore[index]
    filled: Dict[str, Any] = {key: copy.deepcopy(value) for key, value in preset.items() if key != "path"}
    filled.update(conf)
    uri = conf.get("uri")
    if isinstance(uri, str) and urlsplit(uri).path in ("", "/") and not urlsplit(uri).query:
        filled["uri"] = uri.rstrip("/") + preset["path"]
    return filled
