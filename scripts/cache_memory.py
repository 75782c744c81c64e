#!/usr/bin/env python3
"""
Memory of a full decision cache: N distinct users' allows stored through
the real check path (whole-request key, one upstream_headers value each),
on a fake clock, no sockets.

    python scripts/cache_memory.py [--entries 100000] [--key whole|token]

Reports the bytes the cache holds per entry, measured as the growth of the
process's RSS (any interpreter) and, on CPython, of tracemalloc's traced
memory (with --trace).  Run from the repo root with the suite's interpreter.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Any, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.defer import Deferred, succeed  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.web.http_headers import Headers  # noqa: E402

from fauth.auth.client import Reply  # noqa: E402
from fauth.auth.forward import ForwardAuth  # noqa: E402
from fauth.config import parse_forward_auth  # noqa: E402
from fauth.request.inbound import InboundRequest  # noqa: E402
from fauth.wire.h1 import ReplyHeaders  # noqa: E402


class Answering:
    """Answers every call at once with the user of its token."""

    host_header = b"auth.internal:9000"

    def call(self, method: str, fields: Sequence[Tuple[bytes, bytes]], body: Optional[bytes], timeout: float) -> Deferred:
        token = dict(fields)[b"Authorization"]
        headers = ReplyHeaders({
            b"x-user-id": [b"user-" + token[7:]],
            b"content-length": [b"0"],
            b"date": [b"Thu, 03 Dec 2026 06:00:00 GMT"],
            b"server": [b"auth"],
        })
        return succeed(Reply(200, headers, b""))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=100000)
    parser.add_argument("--key", choices=["whole", "token"], default="whole")
    parser.add_argument("--trace", action="store_true", help="also count with tracemalloc (CPython; inflates RSS)")
    args = parser.parse_args(argv)
    cache: Any = {"ttl": 30, "max_entries": args.entries}
    if args.key == "token":
        cache["key"] = ["$http_authorization"]
    conf = parse_forward_auth({
        "uri": "http://auth.internal:9000/verify",
        "request_headers": ["Authorization"],
        "upstream_headers": ["X-User-ID"],
        "cache": cache,
    })
    auth = ForwardAuth(conf, Answering(), Clock())  # type: ignore[arg-type]
    tracing = args.trace and sys.implementation.name == "cpython"
    if tracing:
        import tracemalloc

        tracemalloc.start()
    gc.collect()
    before_rss = rss()
    before_traced = tracemalloc.get_traced_memory()[0] if tracing else 0
    for i in range(args.entries):
        token = b"Bearer %032x" % (i * 2654435761)
        inbound = InboundRequest(
            method="GET", request_uri="/api/items?page=1", path="/api/items", query="page=1", host="gw.example",
            scheme="https", remote_addr="10.1.%d.%d" % (i // 256 % 256, i % 256), remote_port=40000,
            server_addr="10.0.0.1", server_port=443,
            headers=Headers({b"authorization": [token], b"host": [b"gw.example"]}),
        )
        auth.check(inbound, "1")
    gc.collect()
    assert auth.cache is not None and len(auth.cache) == args.entries
    grown_rss = rss() - before_rss
    print("%s %s, %d entries, key %s" % (sys.implementation.name, sys.version.split()[0], args.entries, args.key))
    print("  RSS growth: %.1f MiB (%.0f bytes/entry)" % (grown_rss / 2**20, grown_rss / args.entries))
    if tracing:
        traced = tracemalloc.get_traced_memory()[0] - before_traced
        print("  traced allocations: %.1f MiB (%.0f bytes/entry)" % (traced / 2**20, traced / args.entries))


if __name__ == "__main__":
    main(sys.argv[1:])
