# -*- test-case-name: tests.config.test_schema -*-
"""JSON-schema-style validation with APISIX (api7/jsonschema) error wording.

APISIX validates plugin, route and upstream configuration with the Lua
C{api7/jsonschema} library and returns its error strings verbatim to Admin
API clients, e.g. C{property "uri" is required} or
C{property "timeout" validation failed: expected 0 to be at least 1}.
This module reproduces that wording for the C{forward-auth} plugin
(L{check_forward_auth}) and exposes small generic helpers
(L{check_type}, L{check_integer_range}, ...) so other modules can
validate routes/upstreams with identical messages.

Lua semantics that are deliberately mirrored:

  - Lua cannot tell C{{}} from C{[]}: an I{empty} dict is a valid array and an
    I{empty} list is a valid object (see L{is_array} / L{is_object}).
  - A number is an C{integer} when it has no fractional part, so C{3000.0} is
    accepted (and normalised to C{int}); C{bool} is never a number.

One deliberate divergence: Lua's C{type()} reports C{table} for both objects
and arrays (and C{userdata} for JSON null); we report the JSON names
(C{object}, C{array}, C{null}) as L{type_name} documents, since those
are what API users can act on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Dict, List, Optional, Tuple

from fauth.config.errors import ConfigError

__all__ = [
    "SchemaError",
    "FORWARD_AUTH_DEFAULTS",
    "FORWARD_AUTH_PROPERTY_ORDER",
    "FORWARD_AUTH_EXTENSIONS",
    "check_forward_auth",
    "security_warnings",
    "type_name",
    "is_integer",
    "is_object",
    "is_array",
    "format_number",
    "type_mismatch",
    "property_error",
    "check_required",
    "check_type",
    "check_integer_range",
    "check_integer",
    "check_enum",
    "check_string_array",
    "check_min_properties",
]


class SchemaError(ConfigError):
    """A configuration failed validation.

    C{str(err)} (and C{err.message}) is the exact APISIX error text, e.g.
    C{property "uri" is required}; callers put it into the Admin API
    C{error_msg} / log line unchanged.
    """

    message: str

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# ---------------------------------------------------------------------------
# Type classification (JSON names, Lua-compatible semantics)
# ---------------------------------------------------------------------------


def type_name(value: object) -> str:
    """Return the JSON type name of C{value} as used in error messages.

    C{str} -> C{string}, C{bool} -> C{boolean}, C{int}/C{float} ->
    C{number}, list/tuple -> C{array}, mapping -> C{object}, C{None} ->
    C{null}. Anything else (e.g. YAML dates or bytes) gets its Python type
    name so that the message is still informative and never raises.
    """
    # bool must be tested before int: bool is an int subclass in Python.
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, (list, tuple)):
        return "array"
    return type(value).__name__


def is_integer(value: object) -> bool:
    """True for ints and for finite floats without a fractional part (never bool)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        # Lua checks C{v % 1.0 == 0.0}; inf/nan fail that test too.
        return math.isfinite(value) and value.is_integer()
    return False


def is_object(value: object) -> bool:
    """True for mappings, and for empty lists (Lua cannot tell C{[]} from C{{}})."""
    if isinstance(value, Mapping):
        return True
    return isinstance(value, (list, tuple)) and len(value) == 0


def is_array(value: object) -> bool:
    """True for lists/tuples, and for empty mappings (Lua cannot tell C{{}} from C{[]})."""
    if isinstance(value, (list, tuple)):
        return True
    return isinstance(value, Mapping) and len(value) == 0


def format_number(value: object) -> str:
    """Format a number the way Lua's C{tostring} does in the range messages.

    Integral values print without C{.0} (LuaJIT prints C{3000} for
    C{3000.0}); other floats use C{%.14g} like Lua.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return format(value, ".14g")
    return str(value)


_TYPE_CHECKS = {
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": is_integer,
    "object": is_object,
    "array": is_array,
    "null": lambda v: v is None,
}


# ---------------------------------------------------------------------------
# Message builders
# ---------------------------------------------------------------------------


def type_mismatch(value: object, expected: str) -> str:
    """The bare validator text C{wrong type: expected X, got Y} (no property prefix)."""
    return f"wrong type: expected {expected}, got {type_name(value)}"


def property_error(prop: str, detail: str) -> SchemaError:
    """Build C{SchemaError('property "<prop>" validation failed: <detail>')}."""
    return SchemaError(f'property "{prop}" validation failed: {detail}')


# ---------------------------------------------------------------------------
# Generic property checks (raise SchemaError with APISIX wording)
# ---------------------------------------------------------------------------


def check_required(conf: Mapping[str, object], prop: str) -> None:
    """Raise C{property "<prop>" is required} when C{prop} is absent from C{conf}.

    A present C{None} (JSON null) counts as given: Lua's cjson null is not
    nil, so APISIX reports a type error for it instead.
    """
    if prop not in conf:
        raise SchemaError(f'property "{prop}" is required')


def check_type(prop: str, value: object, expected: str) -> object:
    """Check C{value} against JSON type C{expected}; return it normalised.

    C{expected} is one of string, boolean, number, integer, object, array,
    null. On mismatch raises
    C{property "<prop>" validation failed: wrong type: expected <expected>, got <type>}.
    The returned value has integral floats turned into C{int} for
    C{integer} and an empty mapping turned into C{[]} for C{array}.
    """
    check = _TYPE_CHECKS.get(expected)
    if check is None:
        raise ValueError(f"unknown JSON type {expected!r}")
    if not check(value):
        raise property_error(prop, type_mismatch(value, expected))
    if expected == "integer":
        return int(value)  # type: ignore[call-overload]
    if expected == "array" and isinstance(value, Mapping):
        return []
    return value


def check_integer_range(
    prop: str,
    value: object,
    minimum: Optional[int] = None,
    maximum: Optional[int] = None,
) -> None:
    """Check inclusive bounds of an already type-checked number.

    Raises C{property "<prop>" validation failed: expected <v> to be at least
    <min>} (or C{at most <max>}); the minimum is checked first, as in
    api7/jsonschema.
    """
    if minimum is not None and value < minimum:  # type: ignore[operator]
        raise property_error(
            prop, f"expected {format_number(value)} to be at least {format_number(minimum)}"
        )
    if maximum is not None and value > maximum:  # type: ignore[operator]
        raise property_error(
            prop, f"expected {format_number(value)} to be at most {format_number(maximum)}"
        )


def check_integer(
    prop: str,
    value: object,
    minimum: Optional[int] = None,
    maximum: Optional[int] = None,
) -> int:
    """Type-check an integer property, then its inclusive bounds; return it as C{int}."""
    number = check_type(prop, value, "integer")
    check_integer_range(prop, number, minimum, maximum)
    return number  # type: ignore[return-value]


def check_enum(prop: str, value: object, allowed: Sequence[object]) -> None:
    """Raise C{... validation failed: matches none of the enum values} unless C{value} is allowed."""
    # Compare type as well as value so True does not match an enum entry 1.
    for candidate in allowed:
        if type(candidate) is type(value) and candidate == value:
            return
    raise property_error(prop, "matches none of the enum values")


def check_string_array(prop: str, value: object) -> List[str]:
    """Validate an C{array} of C{string} items; return a new list.

    Item positions in messages are 1-based, as Lua's C{ipairs} reports them:
    C{failed to validate item 2: wrong type: expected string, got number}.
    """
    items = check_type(prop, value, "array")
    assert isinstance(items, (list, tuple))  # what check_type lets through as an array
    result: List[str] = []
    for index, item in enumerate(items, start=1):
        if not isinstance(item, str):
            raise property_error(
                prop, f"failed to validate item {index}: {type_mismatch(item, 'string')}"
            )
        result.append(item)
    return result


def check_min_properties(prop: str, value: Mapping[str, object], minimum: int) -> None:
    """Raise C{... expect object to have at least <n> properties} for too-small objects."""
    if len(value) < minimum:
        raise property_error(prop, f"expect object to have at least {minimum} properties")


# ---------------------------------------------------------------------------
# forward-auth plugin schema
# ---------------------------------------------------------------------------

#: Defaults APISIX's forward-auth schema injects. Read-only; the list values
#: are copied into each checked conf, never shared.
FORWARD_AUTH_DEFAULTS: Mapping[str, object] = MappingProxyType(
    {
        "ssl_verify": True,
        "request_method": "GET",
        "max_req_body_size": 67108864,
        "request_headers": [],
        "upstream_headers": [],
        "client_headers": [],
        "timeout": 3000,
        "keepalive": True,
        "keepalive_timeout": 60000,
        "keepalive_pool": 5,
        "allow_degradation": False,
        "status_on_error": 403,
    }
)

#: Order in which properties are checked, so the first reported error is
#: deterministic (Lua iterates its schema table in hash order).
FORWARD_AUTH_PROPERTY_ORDER = (
    "uri",
    "ssl_verify",
    "request_method",
    "max_req_body_size",
    "request_headers",
    "extra_headers",
    "upstream_headers",
    "client_headers",
    "timeout",
    "keepalive",
    "keepalive_timeout",
    "keepalive_pool",
    "allow_degradation",
    "status_on_error",
    "_meta",
)

#: fauth's own boolean attributes (extensions APISIX ignores as unknown
#: keys) and their defaults, which keep APISIX's behaviour.  Checked after
#: APISIX's own, in this order; never injected into the checked conf, so
#: an APISIX route reads back as it was written.
FORWARD_AUTH_EXTENSIONS: Mapping[str, bool] = MappingProxyType(
    {
        "preserve_request_method": False,
        "run_on_preflight": True,
        "allow_partial_message": False,
    }
)

_REQUEST_METHODS = ("GET", "POST")
_STRING_ARRAYS = frozenset({"request_headers", "upstream_headers", "client_headers"})
_BOOLEANS = frozenset({"ssl_verify", "keepalive", "allow_degradation"})
# prop -> (minimum, maximum), both inclusive, None = unbounded.
_INTEGERS: Dict[str, Tuple[Optional[int], Optional[int]]] = {
    "max_req_body_size": (1, None),
    "timeout": (1, 60000),
    "keepalive_timeout": (1000, None),
    "keepalive_pool": (1, None),
    "status_on_error": (200, 599),
}
_EXTRA_HEADERS_PATTERN = "^[^:]+$"


def _matches_header_name_pattern(key: object) -> bool:
    """Equivalent of PCRE C{^[^:]+$}: non-empty and without C{:}."""
    text = key if isinstance(key, str) else str(key)
    return text != "" and ":" not in text


def _check_extra_headers(value: object) -> Dict[object, object]:
    """Validate C{extra_headers} (object, minProperties 1, C{^[^:]+$} -> string)."""
    check_type("extra_headers", value, "object")
    mapping: Mapping[object, object] = value if isinstance(value, Mapping) else {}
    # api7/jsonschema walks patternProperties before counting properties, so a
    # bad value is reported even though minProperties is listed first.
    for key, item in mapping.items():
        if _matches_header_name_pattern(key) and not isinstance(item, str):
            raise property_error(
                "extra_headers",
                f'failed to validate {key} (matching "{_EXTRA_HEADERS_PATTERN}"): '
                f"{type_mismatch(item, 'string')}",
            )
    check_min_properties("extra_headers", mapping, 1)  # type: ignore[arg-type]
    return dict(mapping)


def _check_forward_auth_property(prop: str, value: object) -> object:
    """Validate one known forward-auth property; return its normalised value."""
    if prop == "uri":
        return check_type(prop, value, "string")
    if prop == "request_method":
        check_type(prop, value, "string")
        check_enum(prop, value, _REQUEST_METHODS)
        return value
    if prop in _BOOLEANS:
        return check_type(prop, value, "boolean")
    if prop in _INTEGERS:
        minimum, maximum = _INTEGERS[prop]
        return check_integer(prop, value, minimum, maximum)
    if prop in _STRING_ARRAYS:
        return check_string_array(prop, value)
    if prop == "extra_headers":
        return _check_extra_headers(value)
    if prop == "_meta":
        # Only the container type is checked here; APISIX's plugin-meta
        # fields are interpreted elsewhere.
        return check_type(prop, value, "object")
    raise AssertionError(f"unhandled property {prop}")  # pragma: no cover


def check_forward_auth(conf: object) -> Dict[str, object]:
    """Validate one forward-auth plugin conf (parsed JSON/YAML).

    Returns a NEW dict with defaults filled in for every attribute except
    C{extra_headers} (left absent when not given) and fauth's
    L{FORWARD_AUTH_EXTENSIONS} (type-checked when given). Unknown keys are kept
    as-is; the input is never mutated. Raises L{SchemaError} with the
    exact APISIX message on the first failure, checking properties in
    L{FORWARD_AUTH_PROPERTY_ORDER}.
    """
    if not is_object(conf):
        # The root has no property name, so no "property ..." prefix.
        raise SchemaError(type_mismatch(conf, "object"))
    source: Mapping[str, object] = conf if isinstance(conf, Mapping) else {}

    result: Dict[str, object] = dict(source)
    check_required(source, "uri")
    for prop in FORWARD_AUTH_PROPERTY_ORDER:
        if prop in source:
            result[prop] = _check_forward_auth_property(prop, source[prop])
        elif prop in FORWARD_AUTH_DEFAULTS:
            default = FORWARD_AUTH_DEFAULTS[prop]
            # Fresh list per conf so callers can't alias the shared default.
            result[prop] = list(default) if isinstance(default, list) else default
    for prop in FORWARD_AUTH_EXTENSIONS:
        if prop in source:
            result[prop] = check_type(prop, source[prop], "boolean")
    return result


def security_warnings(conf: Mapping[str, object]) -> List[str]:
    """Config-time security warnings APISIX logs for a forward-auth conf.

    One warning is returned per problem found:

      - C{uri} not starting with C{https} (case-sensitive, as APISIX's
        C{core.utils.check_https}) -> no-TLS warning;
      - C{ssl_verify} explicitly C{false} -> ssl_verify warning.
    """
    warnings: List[str] = []
    uri = conf.get("uri")
    if not (isinstance(uri, str) and uri.startswith("https")):
        warnings.append("Using forward-auth uri with no TLS is a security risk")
    if conf.get("ssl_verify") is False:
        warnings.append(
            "Keeping ssl_verify disabled in forward-auth configuration is a security risk"
        )
    return warnings
