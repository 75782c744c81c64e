"""
A gateway with a guarded and an unguarded upstream, a counting auth service
and raw-socket helpers: the setting of the hostile-client and fuzz tests.

Routes (all on one gateway):

  - C{/private}, C{/private/*}: forward-auth (C{/auth}: 200 with
    C{X-User-ID: alice} only for C{Authorization: letmein}) -> private
    upstream;
  - C{/bare}, C{/bare/*}: forward-auth (C{/auth-bare}: 200 without any
    C{X-User-ID} for C{letmein}) -> private upstream;
  - C{/public/*}: no plugin -> public upstream;
  - C{/post-mode/*}: forward-auth in POST mode (the body goes to C{/auth}
    too), C{max_req_body_size} 512 -> private upstream;
  - C{/get-only}: GET only, no plugin -> public upstream;
  - C{/vhost/*} on host C{secure.example}: guarded -> private upstream;
    on host C{open.example}, or any other host: unguarded -> public upstream;
  - C{/degrade}: forward-auth to a closed port with C{allow_degradation}
    -> private upstream.
"""
from __future__ import annotations

import re
import socket
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import unquote_to_bytes

from twisted.web.resource import Resource

from tests.harness import GatewayUnderTest, raw_request, start_gateway
from tests.servers import listen_on_loopback

__all__ = ["AuthService", "HostileEnv", "Upstream", "liberal_paths", "start_env", "status_of"]

USER_HEADER = "X-User-ID"


class AuthService(Resource):
    """Allows only C{Authorization: letmein}; counts every call."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[Dict[bytes, List[bytes]]] = []

    def render(self, request: Any) -> bytes:
        self.calls.append({k.lower(): list(v) for k, v in request.requestHeaders.getAllRawHeaders()})
        if request.requestHeaders.getRawHeaders(b"authorization") == [b"letmein"]:
            if request.path == b"/auth":
                request.setHeader(b"X-User-ID", b"alice")
            return b""
        request.setResponseCode(403)
        return b"denied"


class Upstream(Resource):
    """Records what it received: method, target, all header lines, body."""

    isLeaf = True

    def __init__(self, name: bytes) -> None:
        super().__init__()
        self.name = name
        self.hits: List[Dict[str, Any]] = []

    def render(self, request: Any) -> bytes:
        request.content.seek(0)
        self.hits.append(
            {
                "method": request.method,
                "uri": request.uri,
                "headers": [(k, list(v)) for k, v in request.requestHeaders.getAllRawHeaders()],
                "body": request.content.read(),
            }
        )
        return self.name

    def identity(self, hit: Dict[str, Any]) -> List[bytes]:
        """Every value of every spelling of X-User-ID (case, C{_} for C{-}) in one hit."""
        return [
            value
            for name, values in hit["headers"]
            if name.lower().replace(b"_", b"-") == b"x-user-id"
            for value in values
        ]

    def header(self, hit: Dict[str, Any], name: bytes) -> List[bytes]:
        return [v for n, values in hit["headers"] if n.lower() == name for v in values]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


class HostileEnv:
    """The running gateway, its auth service and its two upstreams."""

    def __init__(
        self,
        reactor: Any,
        gateway: GatewayUnderTest,
        auth: AuthService,
        private: Upstream,
        public: Upstream,
        ports: List[Any],
    ) -> None:
        self.reactor = reactor
        self.gateway = gateway
        self.auth = auth
        self.private = private
        self.public = public
        self._ports = ports

    @property
    def port(self) -> int:
        return self.gateway.port_number

    async def send(self, payload: bytes, timeout: float = 3.0) -> bytes:
        """Raw bytes in, everything received until the gateway closes out."""
        return await raw_request(self.reactor, self.port, payload, timeout=timeout)

    def untouched(self) -> bool:
        """Nobody behind the gateway saw anything."""
        return not self.auth.calls and not self.private.hits and not self.public.hits

    def reset(self) -> None:
        del self.auth.calls[:]
        del self.private.hits[:]
        del self.public.hits[:]

    async def stop(self) -> None:
        await self.gateway.stop()
        for port in self._ports:
            await port.stopListening()


def _fa(auth_url: str, path: str, **extra: Any) -> Dict[str, Any]:
    return {
        "forward-auth": dict(
            {
                "uri": auth_url + path,
                "request_headers": ["Authorization"],
                "upstream_headers": [USER_HEADER],
            },
            **extra,
        )
    }


async def start_env(
    reactor: Any,
    http: Optional[Dict[str, Any]] = None,
    degrade: bool = True,
    top: Optional[Dict[str, Any]] = None,
) -> HostileEnv:
    """
    Start the auth service, both upstreams and the gateway (C{http} limits
    optional; without C{degrade}, no C{/degrade} route; C{top}: more
    top-level config keys, such as C{client_max_body_size}).
    """
    auth = AuthService()
    private = Upstream(b"private")
    public = Upstream(b"public")
    auth_port = await listen_on_loopback(reactor, auth)
    private_port = await listen_on_loopback(reactor, private)
    public_port = await listen_on_loopback(reactor, public)
    auth_url = "http://127.0.0.1:%d" % auth_port.getHost().port
    to_private = {"nodes": {"127.0.0.1:%d" % private_port.getHost().port: 1}}
    to_public = {"nodes": {"127.0.0.1:%d" % public_port.getHost().port: 1}}
    routes = [
        {"id": "private", "uris": ["/private", "/private/*"], "plugins": _fa(auth_url, "/auth"), "upstream": to_private},
        {"id": "bare", "uris": ["/bare", "/bare/*"], "plugins": _fa(auth_url, "/auth-bare"), "upstream": to_private},
        {"id": "public", "uri": "/public/*", "upstream": to_public},
        {
            "id": "post-mode",
            "uri": "/post-mode/*",
            "plugins": _fa(auth_url, "/auth", request_method="POST", max_req_body_size=512),
            "upstream": to_private,
        },
        {"id": "get-only", "uri": "/get-only", "methods": ["GET"], "upstream": to_public},
        {
            "id": "vhost-secure",
            "hosts": ["secure.example"],
            "uri": "/vhost/*",
            "plugins": _fa(auth_url, "/auth"),
            "upstream": to_private,
        },
        {"id": "vhost-open", "hosts": ["open.example"], "uri": "/vhost/*", "upstream": to_public},
        {"id": "vhost-default", "uri": "/vhost/*", "upstream": to_public},
    ]
    if degrade:
        routes.append(
            {
                "id": "degrade",
                "uri": "/degrade",
                "plugins": _fa("http://127.0.0.1:%d" % closed_port(), "/auth", allow_degradation=True),
                "upstream": to_private,
            }
        )
    doc: Dict[str, Any] = dict(top or {}, routes=routes)
    if http:
        doc["http"] = http
    gateway = await start_gateway(reactor, doc)
    return HostileEnv(reactor, gateway, auth, private, public, [auth_port, private_port, public_port])


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9]) [^\r\n]*\r\n")


def status_of(raw: bytes) -> Optional[int]:
    """
    The status of the last final response in C{raw} (a 100 Continue is
    skipped), or C{None} when nothing (or no well-formed status line)
    came back.
    """
    status = None
    rest = raw
    while rest:
        match = _STATUS_LINE.match(rest)
        if match is None:
            return status
        status = int(match.group(1))
        if status != 100:
            return status
        rest = rest[rest.find(b"\r\n\r\n") + 4 :]
    return status


def _overlong_to_ascii(data: bytes) -> bytes:
    """What a lax UTF-8 decoder makes of overlong forms: C{\\xc0\\xae} -> C{.}."""

    def two(m: "re.Match[bytes]") -> bytes:
        return bytes([((m.group(0)[0] & 0x1F) << 6 | (m.group(0)[1] & 0x3F)) & 0x7F])

    def three(m: "re.Match[bytes]") -> bytes:
        b = m.group(0)
        return bytes([((b[0] & 0x0F) << 12 | (b[1] & 0x3F) << 6 | (b[2] & 0x3F)) & 0x7F])

    data = re.sub(rb"\xe0[\x80-\x81][\x80-\xbf]", three, data)
    return re.sub(rb"[\xc0\xc1][\x80-\xbf]", two, data)


def _resolve(path: bytes) -> bytes:
    out: List[bytes] = []
    for segment in path.split(b"/"):
        if segment == b"..":
            if out:
                out.pop()
        elif segment not in (b".", b""):
            out.append(segment)
    return b"/" + b"/".join(out)


def liberal_paths(target: bytes) -> List[bytes]:
    """
    The paths a lax upstream could make of C{target}: percent-decoded once,
    overlong UTF-8 read as ASCII, backslashes as slashes, C{;params} dropped
    from segments (Tomcat), dot segments resolved.
    """
    path = target.split(b"?", 1)[0].split(b"#", 1)[0]
    out = []
    for candidate in (path, unquote_to_bytes(path)):
        c = _overlong_to_ascii(candidate).replace(b"\\", b"/")
        no_params = b"/".join(s.split(b";", 1)[0] for s in c.split(b"/"))
        out.extend([_resolve(c), _resolve(no_params)])
    return out


def reaches_private(target: bytes) -> bool:
    """Whether some lax reading of C{target} lands on C{/private} or below."""
    return any(p == b"/private" or p.startswith(b"/private/") for p in liberal_paths(target))


def request(
    target: bytes,
    method: bytes = b"GET",
    headers: Tuple[bytes, ...] = (b"Host: gw.test",),
    body: bytes = b"",
    version: bytes = b"HTTP/1.1",
) -> bytes:
    """One request ending in C{Connection: close} (unless C{headers} have a Connection)."""
    head = b"%s %s %s\r\n" % (method, target, version)
    if not any(line.lower().startswith(b"connection:") for line in headers):
        headers += (b"Connection: close",)
    for line in headers:
        head += line + b"\r\n"
    return head + b"\r\n" + body
