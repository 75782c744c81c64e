# -*- test-case-name: tests.request.test_replies -*-
"""Answers the gateway makes itself: a status, maybe a body, nothing proxied."""
from __future__ import annotations

from typing import Any, Optional

__all__ = ["send_simple"]


def send_simple(request: Any, status: int, body: bytes = b"", content_type: Optional[bytes] = None) -> None:
    """Answer with a fixed status and body (gateway-made responses)."""
    request.setResponseCode(status)
    if content_type is not None:
        request.responseHeaders.setRawHeaders(b"content-type", [content_type])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    if body:
        request.write(body)
    request.finish()
