"""Tests for L{fauth.config.expr}: a route's C{vars} as lua-resty-expr, C{remote_addrs} as ipmatcher."""
from __future__ import annotations

from typing import Any, Dict, List

import pytest

from fauth.config.expr import parse_remote_addrs, parse_vars
from fauth.config.schema import SchemaError

VARS: Dict[str, Any] = {
    "arg_name": "json",
    "arg_flag": True,  # ?flag (no "="): Lua true
    "http_x_n": "10",
    "http_x_hex": "0x10",
    "server_port": 9080,  # an int here, a string in nginx
    "remote_addr": "10.1.2.3",
    "uri": "/api/Users",
    "cookie_session": "abc",
}


def ev(rule: List[Any], variables: Dict[str, Any] = VARS) -> bool:
    expr = parse_vars(rule)
    assert expr is not None
    return expr.evaluate(variables.get)


@pytest.mark.parametrize(
    "rule, expected",
    [
        (["arg_name", "==", "json"], True),
        (["arg_name", "==", "xml"], False),
        (["arg_missing", "==", "json"], False),
        (["arg_name", "~=", "xml"], True),
        (["arg_missing", "~=", "xml"], True),
        # A number on the right makes the left a number; nothing else converts.
        (["http_x_n", "==", 10], True),
        (["http_x_n", "==", "10.0"], False),
        (["http_x_hex", "==", 16], True),
        (["server_port", "==", "9080"], True),
        (["server_port", "==", 9080], True),
        (["arg_flag", "==", True], True),
        (["arg_flag", "==", "true"], False),
        (["http_x_n", ">", 9], True),
        (["http_x_n", ">", "9"], True),
        (["http_x_n", ">=", 10], True),
        (["http_x_n", "<", 10], False),
        (["http_x_n", "<=", 10], True),
        (["arg_name", ">", 1], False),
        (["arg_missing", "<", 1], False),
        (["uri", "~~", "^/api/"], True),
        (["uri", "~~", "^/api/users"], False),
        (["uri", "~*", "^/api/users"], True),
        (["arg_missing", "~~", ".*"], False),
        (["arg_name", "in", ["xml", "json"]], True),
        (["arg_name", "in", ["xml"]], False),
        (["arg_name", "IN", ["json"]], True),  # operators are case-insensitive
        (["arg_name", "has", "json"], False),  # has needs an array on the left
        (["remote_addr", "ipmatch", ["10.0.0.0/8"]], True),
        (["remote_addr", "ipmatch", "192.168.0.0/16"], False),
        (["arg_name", "!", "==", "json"], False),
        (["arg_name", "!", "in", ["xml"]], True),
        (["arg_missing", "==", None], True),  # JSON null is Lua nil
        (["arg_name", "JSON"], True),  # the short form lowers its value
        (["cookie_session", "==", "abc"], True),
    ],
)
def test_operators_as_lua_resty_expr(rule: List[Any], expected: bool) -> None:
    assert ev([rule]) is expected


def test_logic_operators_and_nesting() -> None:
    yes = ["arg_name", "==", "json"]
    no = ["arg_name", "==", "xml"]
    assert ev([yes, yes]) is True
    assert ev([yes, no]) is False
    assert ev(["OR", no, yes]) is True
    assert ev(["OR", no, no]) is False
    assert ev(["!AND", yes, no]) is True
    assert ev(["!OR", no, yes]) is False
    assert ev(["AND", ["OR", no, yes], yes]) is True
    assert ev([["OR", no, no], yes]) is False
    assert ev(["and", yes, yes]) is True


def test_empty_vars_is_no_condition() -> None:
    assert parse_vars([]) is None
    assert parse_vars({}) is None


@pytest.mark.parametrize(
    "rule, message",
    [
        (["arg_name", "==", "json"], "rule should be wrapped inside brackets"),
        ([["arg_name", "=~", "json"]], "invalid operator '=~'"),
        ([["arg_name", "x", "==", "json"]], "bad 'not' expression"),
        ([["arg_name"]], "invalid expression"),
        (["OR", ["arg_name", "==", "a"]], "rule too short"),
        ([["uri", "~~", "("]], 'invalid regular expression "("'),
        ([["remote_addr", "ipmatch", "not-an-ip"]], "invalid ip address"),
        # Would be nil here, so mean something else than in APISIX: refused.
        ([["post_arg.name", "==", "a"]], 'variable "post_arg.name" is not one fauth can evaluate'),
        ([["server_protocol", "==", "HTTP/2.0"]], 'variable "server_protocol" is not one fauth can evaluate'),
    ],
)
def test_invalid_vars_refused_in_apisix_words(rule: List[Any], message: str) -> None:
    with pytest.raises(SchemaError) as caught:
        parse_vars(rule)
    assert str(caught.value).startswith("failed to validate the 'vars' expression: " + message), str(caught.value)


def test_vars_must_be_an_array() -> None:
    with pytest.raises(SchemaError) as caught:
        parse_vars("arg_x == 1")
    assert str(caught.value) == 'property "vars" validation failed: wrong type: expected array, got string'


def test_remote_addrs() -> None:
    listed = parse_remote_addrs(["127.0.0.1", "10.0.0.0/8", "::1", "2001:db8::/32"])
    for address in ("127.0.0.1", "10.9.9.9", "::1", "2001:db8::5", "::ffff:10.0.0.1"):
        assert listed.contains(address), address
    for address in ("127.0.0.2", "11.0.0.1", "::2", "unix:", ""):
        assert not listed.contains(address), address
    assert parse_remote_addrs("192.0.2.1", "remote_addr").contains("192.0.2.1")


@pytest.mark.parametrize(
    "value, prop, message",
    [
        ([], "remote_addrs", 'property "remote_addrs" validation failed: expect array to have at least 1 items'),
        ("10.0.0.1", "remote_addrs", 'property "remote_addrs" validation failed: wrong type: expected array'),
        (["10.0.0.300"], "remote_addrs", 'property "remote_addrs" validation failed: failed to validate item 1'),
        ("example.com", "remote_addr", 'property "remote_addr" validation failed'),
    ],
)
def test_bad_remote_addrs(value: Any, prop: str, message: str) -> None:
    with pytest.raises(SchemaError) as caught:
        parse_remote_addrs(value, prop)
    assert str(caught.value).startswith(message), str(caught.value)
