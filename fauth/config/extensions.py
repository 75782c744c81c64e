# -*- test-case-name: tests.auth.test_signin -*-
"""
fauth's own C{forward-auth} attributes beyond APISIX's (APISIX ignores
unknown keys, so a route using them stays portable), validated in the same
wording.  Unlike the plugin object, their objects refuse unknown keys: a
misspelt one would silently change who gets through.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Optional, Tuple, TypeVar

from fauth.config.models import SigninConf
from fauth.config.schema import (
    SchemaError,
    check_enum,
    check_integer,
    check_string_array,
    check_type,
    closed_object,
    property_error,
)

__all__ = [
    "INTEGRATION_KEYS",
    "REDIRECT_STATUSES",
    "SIGNIN_KEYS",
    "extension",
    "parse_allow_cookies",
    "parse_auth_server_paths",
    "parse_signin_redirect",
]

_T = TypeVar("_T")

#: What C{signin_redirect.status} may be.
REDIRECT_STATUSES = (301, 302, 303, 307, 308)

#: The keys of C{signin_redirect}.
SIGNIN_KEYS = ("uri", "param", "statuses", "status")
#: fauth's own C{forward-auth} attributes for the auth servers' integrations
#: (C{preset} is read by L{fauth.config.presets} before the rest).
INTEGRATION_KEYS = ("preset", "signin_redirect", "allow_cookies", "auth_server_paths")
# A URL a Location header can carry as it is: visible ASCII, and either a
# path on the client's host or an http(s) URL.
_SIGNIN_URI = re.compile(r"(?:/|https?://[^/?#\s]+(?:[/?]|\Z))[\x21-\x7e]*\Z")
# RFC 3986 unreserved characters: the parameter's name needs no encoding.
_PARAM = re.compile(r"[A-Za-z0-9._~-]+\Z")
# A cookie-name is an RFC 9110 token (RFC 6265 4.1.1).
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+\Z")


def parse_signin_redirect(doc: object) -> SigninConf:
    """
    Validate the C{signin_redirect} object.

    @raise SchemaError: what is wrong, without the C{property "signin_redirect"} prefix.
    """
    conf = closed_object(doc, SIGNIN_KEYS)
    if "uri" not in conf:
        raise SchemaError('property "uri" is required')
    uri = check_type("uri", conf["uri"], "string")
    assert isinstance(uri, str)
    if _SIGNIN_URI.match(uri) is None or "#" in uri:
        raise property_error(
            "uri", 'expected "%s" to be a path or an http(s) URL of visible ASCII, without a fragment'
            % uri.encode("unicode_escape").decode("ascii")
        )
    param = check_type("param", conf.get("param", "rd"), "string")
    assert isinstance(param, str)
    if _PARAM.match(param) is None:
        raise property_error("param", 'expected "%s" to be letters, digits, "-", ".", "_" or "~"'
                             % param.encode("unicode_escape").decode("ascii"))
    statuses = check_type("statuses", conf.get("statuses", [401]), "array")
    assert isinstance(statuses, (list, tuple))
    if not statuses:
        raise property_error("statuses", "expect array to have at least 1 items")
    chosen = []
    for index, item in enumerate(statuses, 1):
        try:
            chosen.append(check_integer("statuses", item, 300, 599))
        except SchemaError as e:
            raise property_error("statuses", "failed to validate item %d: %s" % (index, _detail(e)))
    status = check_integer("status", conf.get("status", 302))
    check_enum("status", status, REDIRECT_STATUSES)
    return SigninConf(uri=uri, param=param, statuses=tuple(chosen), status=status)


def parse_allow_cookies(doc: object) -> Tuple[str, ...]:
    """
    Validate C{allow_cookies}: cookie names, or C{"*"} for every cookie.

    @raise SchemaError: with the C{property "allow_cookies" validation failed:} prefix.
    """
    names = check_string_array("allow_cookies", doc)
    for index, name in enumerate(names, 1):
        if _TOKEN.match(name) is None:
            raise property_error(
                "allow_cookies",
                'failed to validate item %d: invalid cookie name "%s"' % (index, name.encode("unicode_escape").decode("ascii")),
            )
    return tuple(names)


def parse_auth_server_paths(doc: object) -> Tuple[str, ...]:
    """
    Validate C{auth_server_paths}: path prefixes, each starting with C{/},
    of visible ASCII.

    @raise SchemaError: with the C{property "auth_server_paths" validation failed:} prefix.
    """
    paths = check_string_array("auth_server_paths", doc)
    for index, path in enumerate(paths, 1):
        if not path.startswith("/") or not path.isascii() or not all("!" <= c <= "~" for c in path):
            raise property_error(
                "auth_server_paths",
                'failed to validate item %d: expected "%s" to be a path of visible ASCII starting with "/"'
                % (index, path.encode("unicode_escape").decode("ascii")),
            )
    return tuple(paths)


def _detail(error: SchemaError) -> str:
    """The validator text of C{error}, without its C{property "x" validation failed:} prefix."""
    return str(error).split("validation failed: ", 1)[-1]


def extension(checked: Mapping[str, object], name: str, parse: Callable[[object], _T]) -> Optional[_T]:
    """
    C{parse(checked[name])}, or C{None} when the attribute is absent.

    @raise SchemaError: with the C{property "<name>" validation failed:} prefix.
    """
    if name not in checked:
        return None
    try:
        return parse(checked[name])
    except SchemaError as e:
        raise property_error(name, str(e))
