# -*- test-case-name: tests.auth.test_variables -*-
"""
Compile-once templates for APISIX C{extra_headers} values.

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
from typing import Any, List, Optional, Protocol, Tuple, Union

import attrs

__all__ = [
    "MISSING",
    "NULL",
    "Template",
    "VarRef",
    "VariableSource",
    "compile_template",
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
