# -*- test-case-name: tests.auth.test_variables -*-
"""
Compile-once templates for APISIX C{extra_headers} values, and for the
path and query of a C{forward-auth} C{uri} (L{compile_uri}, fauth's own).

A template such as C{"tenant=$post_arg.tenant_id;${http_x_user ?? anon}"}
is parsed once (L{compile_template}) into literal text and variable
references; L{Template.render} then only looks the variables up and
concatenates, which keeps the per-request cost small.  The variables of one
request are resolved by L{fauth.auth.variables.RequestVariables}.

String convention: everything that comes from the wire (headers, query,
body fields) is a "byte string" -- a C{str} obtained by decoding the raw
bytes as latin-1, one character per byte, exactly like a Lua string.
Callers encode rendered values back with latin-1.
"""
from __future__ import annotations

import re
from typing import Any, FrozenSet, List, Optional, Protocol, Tuple, Union
from urllib.parse import quote

import attrs

__all__ = [
    "MISSING",
    "NULL",
    "Template",
    "UnsafeValue",
    "UriTemplate",
    "VARIABLE_NAMES",
    "VARIABLE_PREFIXES",
    "VarRef",
    "VariableSource",
    "compile_template",
    "compile_uri",
    "is_known_variable",
    "lua_tostring",
    "to_byte_string",
]

MISSING = object()


# Lua value model
# --------------------------------------------------------------------------


class _LuaNull:
    """Singleton standing for cjson's C{null} userdata.

    Lookups must distinguish "missing" (C{None}, so C{??} defaults apply)
    from a JSON C{null} that is present (APISIX renders it as
    C{userdata: NULL} and does not apply the default).
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "NULL"

    def __bool__(self) -> bool:
        return False


#: The JSON C{null} value as returned by L{RequestVariables.lookup}.
NULL = _LuaNull()


def lua_tostring(value: object) -> str:
    """Stringify I{value} the way Lua's C{tostring} would in APISIX.

    C{bool} -> C{true}/C{false}; C{int} -> decimal; C{float} ->
    C{%.14g} (LuaJIT's number format); C{None}/L{NULL} ->
    C{userdata: NULL}; C{dict}/C{list}/C{tuple} -> C{table: 0x<id>};
    C{bytes} -> latin-1 text; C{str} unchanged.
    """
    cls = value.__class__
    if cls is str:
        return value  # type: ignore[return-value]
    # bool before int: bool is an int subclass.
    if cls is bool:
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "%.14g" % value
    if value is None or value is NULL:
        return "userdata: NULL"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("latin-1")
    if isinstance(value, (dict, list, tuple)):
        return "table: 0x%08x" % id(value)
    return str(value)


def to_byte_string(text: str) -> str:
    """Re-express decoded Unicode text as latin-1 chars of its UTF-8 bytes."""
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogatepass").decode("latin-1")


# --------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------


class VariableSource(Protocol):
    """Anything that can resolve a variable name for L{Template.render}."""

    def lookup(self, name: str) -> Optional[Any]:
        """Return the variable's value, or C{None} when it is missing."""
        ...


@attrs.frozen
class VarRef:
    """A C{$name} / C{${name ?? default}} reference inside a template."""

    name: str
    #: Text used when the variable is missing; C{None} when no C{??} given.
    default: Optional[str] = None


# C{$name} is greedy over [A-Za-z0-9_.] so C{$post_arg.a.b} is one name;
# the braced form allows whitespace and an optional C{?? default} (trailing
# whitespace before the closing brace is trimmed).  C{\$} is left untouched.
_VAR_RE = re.compile(
    r"(?<!\\)\$(?:"
    r"\{\s*([A-Za-z0-9_.]+)\s*(?:\?\?\s*([^}]*?)\s*)?\}"
    r"|([A-Za-z0-9_.]+)"
    r")"
)

_Part = Union[str, VarRef]


def _parse(source: str) -> Tuple[_Part, ...]:
    """Split I{source} into literal strings and L{VarRef} parts."""
    if "$" not in source:
        return (source,) if source else ()
    parts: List[_Part] = []
    pos = 0
    for m in _VAR_RE.finditer(source):
        if m.start() > pos:
            parts.append(source[pos : m.start()])
        braced = m.group(1)
        if braced is not None:
            parts.append(VarRef(braced, m.group(2)))
        else:
            parts.append(VarRef(m.group(3)))
        pos = m.end()
    if pos < len(source):
        parts.append(source[pos:])
    return tuple(parts)


@attrs.frozen
class Template:
    """A parsed C{extra_headers} value; build it once, render per request.

    Output convention: L{render} returns a latin-1 "byte string" (one
    character per byte).  Literal text from the configuration is held as its
    UTF-8 bytes, request data as the raw bytes, so C{render(v).encode(
    "latin-1")} -- or simply L{render_bytes} -- gives exactly the bytes
    APISIX would send.  For ASCII templates this is plain text.
    """

    source: str
    _parts: Tuple[_Part, ...] = attrs.field(init=False, repr=False, eq=False)
    # Flattened (is_literal, text_or_name, default) triples so the render
    # loop needs no attribute access or isinstance checks; empty when the
    # template has no variables.
    _ops: Tuple[Tuple[bool, str, str], ...] = attrs.field(
        init=False, repr=False, eq=False
    )
    # Rendering of a variable-free template (source as a byte string).
    _constant: str = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        parts = _parse(self.source)
        ops: Tuple[Tuple[bool, str, str], ...] = ()
        if any(p.__class__ is VarRef for p in parts):
            ops = tuple(
                (True, to_byte_string(p), "")
                if isinstance(p, str)
                else (False, p.name, to_byte_string(p.default or ""))
                for p in parts
            )
        object.__setattr__(self, "_parts", parts)
        object.__setattr__(self, "_ops", ops)
        object.__setattr__(self, "_constant", to_byte_string(self.source))

    @property
    def parts(self) -> Tuple[_Part, ...]:
        """The compiled parts: literal C{str} and L{VarRef} items."""
        return self._parts

    @property
    def is_literal(self) -> bool:
        """True when the template references no variables at all."""
        return not self._ops

    def render(self, variables: VariableSource) -> str:
        """Substitute variables from I{variables} and return the text.

        A missing variable (C{lookup} returned C{None}) becomes its C{??}
        default or the empty string; other values go through
        L{lua_tostring}.  A variable-free template returns its source
        (as a byte string, i.e. unchanged when ASCII) without any lookup.
        """
        ops = self._ops
        if not ops:
            return self._constant
        lookup = variables.lookup
        out: List[str] = []
        append = out.append
        for literal, text, default in ops:
            if literal:
                append(text)
                continue
            value = lookup(text)
            if value is None:
                append(default)
            elif value.__class__ is str:
                append(value)
            else:
                append(lua_tostring(value))
        return "".join(out)

    def render_bytes(self, variables: VariableSource) -> bytes:
        """L{render}, encoded to the bytes to put on the wire."""
        text = self.render(variables)
        try:
            return text.encode("latin-1")
        except UnicodeEncodeError:
            # Only a foreign VariableSource returning real (non-latin-1)
            # Unicode text gets here; send that as UTF-8.
            return text.encode("utf-8", "surrogateescape")


def compile_template(value: str) -> Template:
    """Parse I{value} once into a reusable L{Template}."""
    return Template(value)


# --------------------------------------------------------------------------
# Variables in the forward-auth uri
# --------------------------------------------------------------------------

#: The variable names L{fauth.auth.variables.RequestVariables} resolves,
#: besides those of L{VARIABLE_PREFIXES}.
VARIABLE_NAMES: FrozenSet[str] = frozenset(
    [
        "request_uri", "uri", "args", "query_string", "request_method", "method", "scheme", "host",
        "remote_addr", "remote_port", "server_addr", "server_port", "route_id", "route_name",
    ]
)
VARIABLE_PREFIXES = ("http_", "arg_", "cookie_", "post_arg.", "post_arg_")


def is_known_variable(name: str) -> bool:
    """Whether C{$name} is a request variable (else it is always missing)."""
    return name in VARIABLE_NAMES or any(
        name.startswith(prefix) and len(name) > len(prefix) for prefix in VARIABLE_PREFIXES
    )


class UnsafeValue(ValueError):
    """A request's value cannot go into the auth request (a control character); the message is the log's C{err}."""


# What a uri's path and query may hold literally (AuthTarget's check).
_URI_LITERAL = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%?]*\Z")
# What a value keeps unencoded: in the path, path characters (RFC 3986
# pchar and "/", so "$uri" stays a path); in the query, only what no query
# parser reads as structure ("&", "=", "+", ";", "#", "%" are encoded), so a
# value stays one value.
_PATH_SAFE = "/:@!$&'()*+,;="
_QUERY_SAFE = "/:@!$'()*,"
_CONTROL = re.compile(b"[\x00-\x1f\x7f]")
_AUTHORITY = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#$]*(?=[/?])")


@attrs.frozen
class UriTemplate:
    """
    A C{forward-auth} C{uri} with variables in its path or query, compiled
    once: its static C{origin} (C{scheme://host:port}, where the auth
    client and its pool are built for), and the request target rendered per
    request by L{render}.  Each value is percent-encoded for where it
    stands: in the path, everything but path characters (C{/} stays, so
    C{$uri} stays a path); in the query, everything that could end the
    value or start another (C{&}, C{=}, C{+}, C{#}, C{%}...).
    """

    source: str
    origin: str = attrs.field(eq=False)
    # (literal bytes or None, variable name, default, in the query)
    _ops: Tuple[Tuple[Optional[bytes], str, str, bool], ...] = attrs.field(eq=False, repr=False)
    _checks_path: bool = attrs.field(eq=False, repr=False)

    @property
    def names(self) -> Tuple[str, ...]:
        """The variables it reads."""
        return tuple(name for literal, name, _, _ in self._ops if literal is None)

    def render(self, variables: VariableSource) -> bytes:
        """
        The request target (origin form) for one request.

        @raise UnsafeValue: a value holds a control character (CR, LF, NUL...),
            or makes a C{.} or C{..} path segment.
        """
        lookup = variables.lookup
        out: List[bytes] = []
        for literal, name, default, in_query in self._ops:
            if literal is not None:
                out.append(literal)
                continue
            value = lookup(name)
            text = default if value is None else (value if value.__class__ is str else lua_tostring(value))
            try:
                raw = text.encode("latin-1")
            except UnicodeEncodeError:
                raw = text.encode("utf-8", "surrogateescape")
            if _CONTROL.search(raw) is not None:
                raise UnsafeValue("invalid characters found in %s" % ("query" if in_query else "path"))
            out.append(quote(raw, safe=_QUERY_SAFE if in_query else _PATH_SAFE).encode("ascii"))
        target = b"".join(out)
        if self._checks_path:
            path = target.partition(b"?")[0]
            # A value must not climb out of the path the operator wrote
            # ("../admin" from $arg_user), for an auth service resolving it.
            if any(segment in (b".", b"..") for segment in path.split(b"/")):
                raise UnsafeValue("dot segment in path")
        return target


def compile_uri(uri: str) -> Optional[UriTemplate]:
    """
    The L{UriTemplate} of C{uri}, or C{None} when it names no variable (it
    is then used as APISIX does, as it is).

    @raise ValueError: what is wrong (a variable in the scheme, host or port,
        an unknown variable, a fragment, a character a request line cannot
        carry), for C{property "uri" validation failed: ...}.
    """
    parts = _parse(uri)
    if all(isinstance(part, str) for part in parts):
        return None
    first = parts[0] if isinstance(parts[0], str) else ""
    authority = _AUTHORITY.match(first)
    if authority is None:
        # The literal start ends before the authority does: a variable
        # would choose the auth target, which is built once.
        raise ValueError("variables are allowed only in the path and query, after the host and port")
    origin = first[: authority.end()]
    rest: List[_Part] = [first[authority.end():]]
    rest += parts[1:]
    ops: List[Tuple[Optional[bytes], str, str, bool]] = []
    in_query = checks_path = False
    for part in rest:
        if isinstance(part, str):
            if "#" in part:
                raise ValueError("a uri with variables cannot have a fragment")
            if _URI_LITERAL.match(part) is None:
                raise ValueError("invalid characters found in path")
            if part:
                ops.append((part.encode("ascii"), "", "", False))
            in_query = in_query or "?" in part
        else:
            if not is_known_variable(part.name):
                raise ValueError('unknown variable "$%s"' % part.name)
            ops.append((None, part.name, to_byte_string(part.default or ""), in_query))
            checks_path = checks_path or not in_query
    return UriTemplate(uri, origin, tuple(ops), checks_path)
