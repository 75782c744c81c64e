# -*- test-case-name: tests.wire.test_h1 -*-
"""
HTTP/1.1 on the wire, for both outbound legs: request heads serialised in
one join, response heads parsed in one pass with the checks a proxy needs,
and the chunked body decoder.

Twisted's client parser handles a response one line at a time, building a
L{Headers} object; it also accepts a NUL or another control character in a
value, joins obs-fold lines and takes any number of header lines.  Here a
head is checked with a few C-level bytes operations over the whole block
and split into lines once, and each of those is a L{ParseError}
(C{bad response: ...}).
"""
from __future__ import annotations

import re
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

from twisted.web._newclient import ParseError
from twisted.web.iweb import UNKNOWN_LENGTH

from fauth.wire.headers import CTL, TOKEN

__all__ = [
    "MAX_RESPONSE_HEAD",
    "MAX_RESPONSE_HEADERS",
    "ChunkedDecoder",
    "ReplyHeaders",
    "ResponseHead",
    "find_head_end",
    "parse_head",
    "request_head",
]

# A response head (status line and header lines) from an auth service or an
# upstream larger than this fails the exchange as a bad response instead of
# being buffered; nginx's own limit (proxy_buffer_size) is 4 or 8 KiB.
MAX_RESPONSE_HEAD = 64 * 1024
MAX_RESPONSE_HEADERS = 500

# They describe this hop's framing, not the message: kept out of
# ResponseHead.headers (as Twisted's Agent does) and interpreted here.
_CONNECTION_CONTROL = frozenset(
    [
        b"content-length",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    ]
)
_NO_BODY_STATUS = frozenset([204, 304])
# An int needle: CPython's bytes "in" tries a bytes needle as an int first,
# raising and clearing a TypeError each time.
_CR = ord("\r")

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?\r?")
# What a header block may hold besides its names' token characters and
# colons (deleted by translate(None, ...): what is left is refused).
_VALUE_OR_LF = b"\t\n" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
_TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

# The few status lines a backend sends, parsed once.
_KNOWN_STATUS: Dict[bytes, Tuple[bytes, int, bytes]] = {}


def _status(line: bytes) -> Tuple[bytes, int, bytes]:
    """C{(minor version, status, reason)} of a status line (without its LF)."""
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise ParseError("bad status line", line[:80])
    minor, code, reason = match.groups()
    found = (minor, int(code), reason or b"")
    if len(_KNOWN_STATUS) < 64:
        _KNOWN_STATUS[line] = found
    return found


class ReplyHeaders:
    """
    A response's end-to-end headers: lower-case name to values, in arrival
    order.  Read-only: a parsed head may be shared by every response that
    sent the same bytes (L{parse_head}).
    """

    __slots__ = ("_map",)

    def __init__(self, fields: Optional[Mapping[bytes, Sequence[bytes]]] = None) -> None:
        self._map = fields if fields is not None else {}

    def get(self, name: bytes) -> Optional[Sequence[bytes]]:
        """Every value of C{name} (any case), or C{None}."""
        return self._map.get(name.lower())

    def items(self) -> Iterable[Tuple[bytes, Sequence[bytes]]]:
        """C{(lower-case name, values)} pairs."""
        return self._map.items()

    def __contains__(self, name: bytes) -> bool:
        return name.lower() in self._map

    def __repr__(self) -> str:
        return "ReplyHeaders(%r)" % (self._map,)


class ResponseHead:
    """
    A parsed response head and how its body is framed.

    @ivar length: the body's length, C{0} when there is none, or
        L{UNKNOWN_LENGTH} (chunked, or up to the end of the connection).
    @ivar chunked: the body is chunked.
    @ivar keep_alive: the connection may carry another request afterwards.
    @ivar connection: the tokens of C{Connection}, lower-cased (names a
        proxy must also treat as hop-by-hop).
    """

    __slots__ = ("status", "reason", "headers", "length", "chunked", "keep_alive", "connection")

    def __init__(
        self,
        status: int,
        reason: bytes,
        headers: ReplyHeaders,
        length: object,
        chunked: bool,
        keep_alive: bool,
        connection: frozenset,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.length = length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.connection = connection


def request_head(method: bytes, target: bytes, fields: Iterable[Tuple[bytes, bytes]]) -> bytes:
    """
    C{method target HTTP/1.1}, the fields, the blank line.  Names and values
    must already be checked (no CR or LF): they are copied as they are.
    """
    lines = b"\r\n".join(map(b": ".join, fields))  # C-level joins, no loop in Python
    if not lines:
        return b"%s %s HTTP/1.1\r\n\r\n" % (method, target)
    return b"%s %s HTTP/1.1\r\n%s\r\n\r\n" % (method, target, lines)


def find_head_end(buffer: bytes) -> int:
    """
    The offset just past the blank line ending a head in C{buffer}, or
    C{-1}.  CRLF and bare LF line ends are both accepted, as Twisted does.
    """
    crlf = buffer.find(b"\n\r\n")
    lf = buffer.find(b"\n\n")
    if crlf < 0:
        return lf + 2 if lf >= 0 else -1
    if 0 <= lf < crlf:
        return lf + 2
    return crlf + 3


# Heads parsed lately, by their bytes.  A backend answers most requests with
# the same head but for Date, which changes once a second, so nearly every
# head is one seen before; a head is immutable (ReplyHeaders is read-only,
# its values tuples), so one object serves every response that sent it.
_PARSED: Dict[bytes, "ResponseHead"] = {}
_PARSED_MAX = 256
_PARSED_MAX_SIZE = 2048  # bigger heads are rare, and often unique (cookies)


def parse_head(block: bytes, method: bytes) -> ResponseHead:
    """
    Parse C{block}, a whole head up to and including its blank line, of the
    response to a C{method} request.  The result is shared and must not be
    changed.

    @raise ParseError: what is wrong with it (first argument) and the
        offending bytes (second).
    """
    if method == b"HEAD" or len(block) > _PARSED_MAX_SIZE:
        return _parse_head(block, method)
    head = _PARSED.get(block)
    if head is None:
        head = _parse_head(block, method)  # a ParseError is not kept: it costs a parse each time
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[block] = head
    return head


def _parse_head(block: bytes, method: bytes) -> ResponseHead:
    newline = block.find(b"\n")
    status_line = block[:newline]
    known = _KNOWN_STATUS.get(status_line)
    if known is None:
        known = _status(status_line)
    minor, status, reason = known
    fields = block[newline + 1 : len(block) - (2 if block.endswith(b"\r\n") else 1)]
    # A well-formed block is lines of a token, a colon and a value without
    # control characters (tab allowed), each ended by CRLF or a bare LF.
    # Checked with C-level bytes operations over the whole block: once
    # CRLFs are LFs, nothing but value characters and LFs (a CR left is a
    # bare one); then a colon on every line, and only token characters in
    # the names.  Only a head that fails is looked at line by line, for
    # the message (_explain).
    text = fields.replace(b"\r\n", b"\n") if _CR in fields else fields
    if text.translate(None, _VALUE_OR_LF):
        _explain(fields)
    lines = text.split(b"\n")
    lines.pop()  # after the last LF
    headers: Dict[bytes, List[bytes]] = {}
    for field in lines:
        name, colon, value = field.partition(b":")
        if not colon:
            _explain(fields)
        name = name.lower()
        value = value.strip(b" \t")
        values = headers.get(name)
        if values is None:
            headers[name] = [value]
        else:
            values.append(value)
    if b"" in headers or b"".join(headers).translate(None, _TOKEN_CHARS):
        _explain(fields)
    if len(lines) > MAX_RESPONSE_HEADERS:
        raise ParseError("too many headers", b"")
    control: Dict[bytes, List[bytes]] = {}
    head_request = method == b"HEAD"
    for name in _CONNECTION_CONTROL.intersection(headers):
        if not (head_request and name == b"content-length"):
            control[name] = headers.pop(name)
    tokens = control.get(b"connection")
    connection = _NO_TOKENS if tokens is None else _tokens(tokens)
    keep_alive = b"close" not in connection and (minor == b"1" or b"keep-alive" in connection)
    length: object
    chunked = False
    if status in _NO_BODY_STATUS or head_request or 100 <= status < 200:
        length = 0
    elif b"transfer-encoding" in control:
        codings = b",".join(control[b"transfer-encoding"]).lower().replace(b" ", b"").replace(b"\t", b"")
        if codings != b"chunked":
            raise ParseError("unsupported transfer encoding", codings[:80])
        chunked = True
        length = UNKNOWN_LENGTH
        if b"content-length" in control:
            # A message framed twice is how responses are smuggled: use the
            # chunks, and never put this connection back in the pool.
            keep_alive = False
    elif b"content-length" in control:
        length = _content_length(control[b"content-length"])
    else:
        length = UNKNOWN_LENGTH
        keep_alive = False  # the body ends with the connection
    frozen = {name: tuple(values) for name, values in headers.items()}
    return ResponseHead(status, reason, ReplyHeaders(frozen), length, chunked, keep_alive, connection)


_NO_TOKENS: FrozenSet[bytes] = frozenset()


# The few Connection values servers send ("keep-alive", "close"), parsed once.
_KNOWN_TOKENS: Dict[Tuple[bytes, ...], FrozenSet[bytes]] = {}


def _tokens(values: List[bytes]) -> FrozenSet[bytes]:
    key = tuple(values)
    found = _KNOWN_TOKENS.get(key)
    if found is None:
        tokens = {token.strip().lower() for value in values for token in value.split(b",")}
        tokens.discard(b"")
        found = frozenset(tokens)
        if len(_KNOWN_TOKENS) < 64:
            _KNOWN_TOKENS[key] = found
    return found


def _content_length(values: List[bytes]) -> int:
    # "42" and "42, 42" (or two equal headers) are one length; anything else
    # could be response splitting.
    if len(values) == 1:
        value = values[0]
        if value.isdigit() and len(value) <= 18:
            return int(value)
    found = {value.strip() for joined in values for value in joined.split(b",")}
    if len(found) != 1:
        raise ParseError("conflicting Content-Length", b",".join(values)[:80])
    (value,) = found
    if not value.isdigit() or len(value) > 18:
        raise ParseError("invalid Content-Length", value[:80])
    return int(value)


def _explain(fields: bytes) -> None:
    """Raise the L{ParseError} for the first bad line of a header block."""
    for raw in fields.split(b"\n"):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line[:1] in (b" ", b"\t"):
            raise ParseError("obsolete line folding", line[:80])
        name, colon, value = line.partition(b":")
        if not colon:
            raise ParseError("header line without a colon", line[:80])
        if TOKEN.fullmatch(name) is None:
            raise ParseError("invalid header name", name[:80])
        if CTL.search(value) is not None:
            raise ParseError("control character in header value", name[:80])
    raise ParseError("malformed header block", fields[:80])


class ChunkedDecoder:
    """
    Decodes a chunked body fed in arbitrary pieces.

    L{feed} returns the body bytes decoded so far and whether the body (its
    trailers included) is complete; bytes after the end are in L{rest}.

    @raise ParseError: on a bad chunk size, a missing CRLF after a chunk, or
        a head of trailers beyond L{MAX_RESPONSE_HEAD}.
    """

    __slots__ = ("_buffer", "_remaining", "_state", "_trailer_bytes", "rest")

    _SIZE, _DATA, _DATA_END, _TRAILERS = range(4)

    def __init__(self) -> None:
        self._buffer = b""
        self._remaining = 0
        self._state = self._SIZE
        self._trailer_bytes = 0
        self.rest = b""

    def feed(self, data: bytes) -> Tuple[List[bytes], bool]:
        buffer = self._buffer + data if self._buffer else data
        out: List[bytes] = []
        position = 0
        end = len(buffer)
        while position < end:
            state = self._state
            if state == self._DATA:
                take = min(self._remaining, end - position)
                out.append(buffer[position : position + take])
                position += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = self._DATA_END
            elif state == self._SIZE:
                newline = buffer.find(b"\n", position)
                if (newline if newline >= 0 else end) - position > _MAX_SIZE_LINE:
                    raise ParseError("chunk size line too long", b"")
                if newline < 0:
                    break
                size = _chunk_size(buffer[position:newline])
                position = newline + 1
                if size == 0:
                    self._state = self._TRAILERS
                else:
                    self._remaining = size
                    self._state = self._DATA
            elif state == self._DATA_END:
                if buffer.startswith(b"\r\n", position):
                    position += 2
                elif buffer.startswith(b"\n", position):
                    position += 1
                elif end - position < 2 and buffer[position:end] == b"\r":
                    break
                else:
                    raise ParseError("missing CRLF after a chunk", buffer[position : position + 20])
                self._state = self._SIZE
            else:  # trailers, up to a blank line; their fields are dropped
                if buffer.startswith(b"\r\n", position) or buffer.startswith(b"\n", position):
                    self.rest = buffer[position + (2 if buffer[position] == 13 else 1) :]
                    self._buffer = b""
                    return out, True
                newline = buffer.find(b"\n", position)
                line_end = newline + 1 if newline >= 0 else end
                if self._trailer_bytes + line_end - position > MAX_RESPONSE_HEAD:
                    raise ParseError("response head too large", b"")
                if newline < 0:
                    break
                self._trailer_bytes += line_end - position
                position = line_end
        self._buffer = buffer[position:]
        return out, False


# A chunk size with its extensions; nothing legitimate comes near this.
_MAX_SIZE_LINE = 1024
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?\r?")


def _chunk_size(line: bytes) -> int:
    match = _CHUNK_SIZE.fullmatch(line)
    if match is None:
        raise ParseError("bad chunk size", line[:40])
    return int(match.group(1), 16)
