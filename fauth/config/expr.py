# -*- test-case-name: tests.config.test_expr -*-
"""
A route's C{vars} and C{remote_addrs}: the expressions of
C{lua-resty-expr} (C{resty.expr.v1}, what APISIX's router evaluates) and
client address lists, validated once and evaluated per request.

Values are compared as Lua compares them: nginx variables are strings, a
number on the right makes the left a number (C{tonumber}), nothing else
converts (C{"1" == 1} is false, C{true == 1} too).
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any, Callable, List, Optional, Tuple, Union

import attr

from fauth.config.schema import SchemaError, check_type

__all__ = ["AddressList", "Expr", "Lookup", "parse_remote_addrs", "parse_vars"]

#: Resolves an APISIX variable name (C{ctx.var}); C{None} when missing.
Lookup = Callable[[str], Any]

_LOGIC = ("AND", "OR", "!AND", "!OR")
_OPERATORS = frozenset(["==", "~=", ">", ">=", "<", "<=", "~~", "~*", "in", "has", "ipmatch"])
#: What fauth knows before the route is chosen; other nginx variables would
#: be nil here and make an expression mean something else than in APISIX.
_VARIABLES = frozenset(
    [
        "uri", "request_uri", "args", "query_string", "request_method", "scheme", "host",
        "remote_addr", "remote_port", "server_addr", "server_port",
    ]
)
_VARIABLE_PREFIXES = ("http_", "arg_", "cookie_")
_NUMBER = re.compile(r"\s*[-+]?(0[xX][0-9a-fA-F]+|([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?)\s*\Z")

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def _tonumber(value: Any) -> Optional[float]:
    """Lua's C{tonumber}: numbers, and strings that read as one (hex too)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and _NUMBER.match(value):
        text = value.strip()
        unsigned = text.lstrip("+-")
        if unsigned[:2] in ("0x", "0X"):
            number = float(int(unsigned, 16))
            return -number if text.startswith("-") else number
        return float(text)
    return None


def _lua_equal(left: Any, right: Any) -> bool:
    """C{left == right} in Lua: no conversion between types; tables only equal themselves."""
    if isinstance(left, bool) or isinstance(right, bool):
        return left is right
    if isinstance(left, (int, float)) and isinstance(right, (int, float)):
        return left == right
    if isinstance(left, str) and isinstance(right, str):
        return left == right
    return left is None and right is None


def _as_lua(value: Any) -> Any:
    # ngx.var gives strings: $server_port is "9080", not 9080.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


@attr.frozen
class AddressList:
    """Client addresses as APISIX's C{ipmatcher}: IPv4 and IPv6, single or CIDR."""

    networks: Tuple[Network, ...]

    def contains(self, address: Any) -> bool:
        """Whether C{address} (a string) is in one of the networks; a non-IP never is."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        candidates: List[Any] = [ip]
        mapped = getattr(ip, "ipv4_mapped", None)
        if mapped is not None:
            # A dual-stack listener reports an IPv4 client as ::ffff:a.b.c.d.
            candidates.append(mapped)
        return any(c in n for c in candidates for n in self.networks if c.version == n.version)


def _network(text: object) -> Optional[Network]:
    if not isinstance(text, str):
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def parse_remote_addrs(doc: Any, prop: str = "remote_addrs") -> AddressList:
    """
    C{remote_addrs} (an array) or C{remote_addr} (one string) of a route.

    @raise SchemaError: in APISIX's wording.
    """
    items = [doc] if prop == "remote_addr" else check_type(prop, doc, "array")
    if not items:
        raise SchemaError('property "remote_addrs" validation failed: expect array to have at least 1 items')
    assert isinstance(items, list)
    networks = []
    for i, item in enumerate(items, 1):
        network = _network(item)
        if network is None:
            where = "" if prop == "remote_addr" else "failed to validate item %d: " % i
            raise SchemaError(
                'property "%s" validation failed: %sobject matches none of the required' % (prop, where)
                + (': "%s" is not an IP address or CIDR' % item if isinstance(item, str) else "")
            )
        networks.append(network)
    return AddressList(tuple(networks))


@attr.frozen
class _Compare:
    variable: str
    op: str
    right: Any
    negate: bool

    def test(self, lookup: Lookup) -> bool:
        return _compare(_as_lua(lookup(self.variable)), self.op, self.right) != self.negate


@attr.frozen
class Expr:
    """A compiled C{vars}: C{logic} over C{parts} (compare leaves or nested C{Expr})."""

    logic: str
    parts: Tuple[Union[_Compare, "Expr"], ...]

    def evaluate(self, lookup: Lookup) -> bool:
        """Whether the request whose variables C{lookup} gives satisfies the expression."""
        if self.logic in ("AND", "!AND"):
            result = all(p.test(lookup) for p in self.parts)
        else:
            result = any(p.test(lookup) for p in self.parts)
        return result != self.logic.startswith("!")

    def test(self, lookup: Lookup) -> bool:
        return self.evaluate(lookup)


def _compare(left: Any, op: str, right: Any) -> bool:
    if op == "==":
        if isinstance(right, (int, float)) and not isinstance(right, bool):
            number = _tonumber(left)
            return number is not None and number == right
        return _lua_equal(left, right)
    if op == "~=":
        if isinstance(right, (int, float)) and not isinstance(right, bool):
            number = _tonumber(left)
            return number is None or number != right
        return not _lua_equal(left, right)
    if op in (">", ">=", "<", "<="):
        a, b = _tonumber(left), _tonumber(right)
        if a is None or b is None:
            return False
        return {">": a > b, ">=": a >= b, "<": a < b, "<=": a <= b}[op]
    if op in ("~~", "~*"):
        # right is the compiled pattern; nil and false never match.
        if isinstance(left, (int, float)) and not isinstance(left, bool):
            left = str(left)
        return isinstance(left, str) and right.search(left) is not None
    if op == "in":
        return isinstance(right, list) and any(_lua_equal(v, left) for v in right)
    if op == "has":
        return isinstance(left, list) and any(_lua_equal(v, right) for v in left)
    # ipmatch: right is an AddressList
    return isinstance(left, str) and right.contains(left)


def _compile_compare(rule: List[Any]) -> _Compare:
    negate = False
    if len(rule) == 4:
        if rule[1] != "!":
            raise SchemaError("bad 'not' expression")
        negate = True
        variable, op, right = rule[0], rule[2], rule[3]
    else:
        variable, op, right = (rule + [None, None, None])[:3]
    if isinstance(op, str):
        op = op.lower()
    if right is None and op not in _OPERATORS:
        # lua-resty-expr's short form ["arg_x", "value"]: equality with the
        # value as it lowered it.
        right, op = op, "=="
        if right is None:
            raise SchemaError("invalid expression")
    if variable is None or op is None:
        raise SchemaError("invalid expression")
    if not isinstance(op, str) or op not in _OPERATORS:
        raise SchemaError("invalid operator '%s'" % op)
    if not isinstance(variable, str) or not (
        variable in _VARIABLES or (variable.startswith(_VARIABLE_PREFIXES) and "_" != variable[-1])
    ):
        raise SchemaError(
            'variable "%s" is not one fauth can evaluate when it picks a route (it knows %s, http_*, arg_*, '
            "cookie_*)" % (variable, ", ".join(sorted(_VARIABLES)))
        )
    if op in ("~~", "~*"):
        if not isinstance(right, str):
            raise SchemaError("operator %s needs a regular expression (a string)" % op)
        try:
            right = re.compile(right, re.IGNORECASE if op == "~*" else 0)
        except re.error as e:
            raise SchemaError('invalid regular expression "%s": %s' % (right, e))
    elif op == "ipmatch":
        if not right:
            raise SchemaError("invalid ip address")
        addresses = right if isinstance(right, list) else [right]
        networks = [_network(a) for a in addresses]
        if not networks or any(n is None for n in networks):
            raise SchemaError("invalid ip address")
        right = AddressList(tuple(n for n in networks if n is not None))
    elif isinstance(right, float) and right.is_integer():
        right = int(right)
    return _Compare(variable, op, right, negate)


def _compile(rule: List[Any]) -> Union[_Compare, Expr]:
    if not rule:
        raise SchemaError("rule too short")
    if isinstance(rule[0], list):
        parts = []
        for item in rule:
            if not isinstance(item, list):
                raise SchemaError("rule should be wrapped inside brackets")
            parts.append(_compile(item))
        return Expr("AND", tuple(parts))
    if isinstance(rule[0], str) and rule[0].upper() in _LOGIC:
        if len(rule) <= 2:
            raise SchemaError("rule too short")
        parts = []
        for item in rule[1:]:
            if not isinstance(item, list):
                raise SchemaError("rule should be wrapped inside brackets")
            parts.append(_compile(item))
        return Expr(rule[0].upper(), tuple(parts))
    return _compile_compare(rule)


def parse_vars(doc: Any) -> Optional[Expr]:
    """
    A route's C{vars}, or C{None} for an empty one (always true).

    @raise SchemaError: C{failed to validate the 'vars' expression: ...},
        APISIX's wording.
    """
    doc = check_type("vars", doc, "array")  # an empty object is an empty array to Lua
    if not doc:
        return None
    assert isinstance(doc, list)
    try:
        if not isinstance(doc[0], list) and not (isinstance(doc[0], str) and doc[0].upper() in _LOGIC):
            raise SchemaError("rule should be wrapped inside brackets")
        compiled = _compile(doc)
    except SchemaError as e:
        raise SchemaError("failed to validate the 'vars' expression: %s" % e)
    return compiled if isinstance(compiled, Expr) else Expr("AND", (compiled,))
