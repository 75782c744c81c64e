# -*- test-case-name: tests.edge.test_hostile_clients,tests.edge.test_server -*-
"""
The request grammar the hardened server holds clients to (RFC 9112, with
nginx's method rule): methods, targets, C{Content-Length} values and field
lines as bytes patterns, and L{StrictChunkedDecoder}, Twisted's chunked
decoder with chunk sizes and trailer sections checked.  Shared by the
HTTP/1.1 channel (L{fauth.edge.server}) and the HTTP/2 checks
(L{fauth.edge.h2}).

What Twisted's own channel lets through and the hardened channel refuses:

  - ambiguous framing: a duplicated C{Content-Length} (even an identical
    one), C{Transfer-Encoding} other than exactly C{chunked} (C{identity}
    is accepted by Twisted and leaves the body to be read as the next
    request), C{Transfer-Encoding} in an HTTP/1.0 request, chunk sizes that
    do not fit 63 bits (400; RFC 9112 6.1 and 6.3);
  - obsolete line folding (a header line starting with SP or HTAB), which
    Twisted joins to the previous value (400; RFC 9112 5.2);
  - whitespace before the colon, control characters other than HTAB in a
    value (Twisted 25.5 only refuses NUL; 26 refuses NUL, CR and LF), and
    methods that are not upper-case letters, C{-} or C{_}, as nginx
    (400);
  - request targets with bytes outside visible ASCII (Twisted lets
    0x7F-0xB0 through).
"""
from __future__ import annotations

import re
from typing import Any

from twisted.web import http

from fauth.config import HttpLimits

__all__ = ["FIELD_LINE", "FIELD_LINES", "LENGTH", "MAX_CHUNK_SIZE", "METHOD", "TARGET", "StrictChunkedDecoder"]

# Method: what nginx accepts (upper case, "-", "_").
METHOD = re.compile(rb"[A-Z_\-]+\Z")
# Visible ASCII only (RFC 9112 3.2); Twisted's own check lets 0x7F-0xB0 pass.
TARGET = re.compile(rb"[\x21-\x7e]+\Z")
# Content-Length: digits only, and few enough to fit 63 bits.
LENGTH = re.compile(rb"[0-9]{1,18}\Z")
MAX_CHUNK_SIZE = 2**63 - 1
# One trailer field line (RFC 9112 7.1.2: the same grammar as a header field
# line), without its CRLF.
FIELD_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*")
# A block of header lines each of which passes the per-line checks of
# lineReceived: a token, a colon, a value without control characters (HTAB
# allowed), CRLF.  Obs-fold and whitespace before the colon fail it.
FIELD_LINES = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n)*")


class StrictChunkedDecoder(http._ChunkedTransferDecoder):
    """
    Twisted's chunked decoder, refusing chunk sizes beyond 63 bits and any
    trailer section that is not field lines ending in CRLF within the
    header limits (Twisted only looks for CRLFs, so a trailer line without
    a colon, with control characters, or ended by a bare LF passes, and a
    bare LF leaves the request waiting for its timeout).  Trailer fields
    are checked, then dropped: nothing downstream reads them.
    """

    def __init__(self, dataCallback: Any, finishCallback: Any, limits: HttpLimits = HttpLimits()) -> None:
        super().__init__(dataCallback, finishCallback)
        self._max_fields = limits.max_headers
        self._max_bytes = limits.max_header_bytes
        self._trailer_fields = 0
        self._trailer_bytes = 0

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        done: bool = super()._dataReceived_CHUNK_LENGTH()
        if done and self.length > MAX_CHUNK_SIZE:
            raise http._MalformedChunkedDataError("chunk size too large")
        return done

    def _dataReceived_TRAILER(self) -> bool:
        buffer = self._buffer
        end = buffer.find(b"\r\n")
        if end < 0:
            if b"\n" in buffer or self._trailer_bytes + len(buffer) > self._max_bytes + 1:
                raise http._MalformedChunkedDataError("malformed trailer section")
            return False
        if end == 0:
            rest = bytes(buffer[2:])
            del buffer[:]
            self.state = "FINISHED"
            self.finishCallback(rest)
            return False
        self._trailer_fields += 1
        self._trailer_bytes += end + 2
        if (
            self._trailer_fields > self._max_fields
            or self._trailer_bytes > self._max_bytes
            or FIELD_LINE.fullmatch(bytes(buffer[:end])) is None
        ):
            raise http._MalformedChunkedDataError("malformed trailer section")
        del buffer[: end + 2]
        return True
