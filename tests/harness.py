"""
End-to-end harness: a real gateway on a loopback port, raw HTTP clients and
a log capture, for tests that use real sockets.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import attr
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

from fauth.config import ConfigError, GatewayConf, parse_config
from fauth.edge.gateway import Gateway
from fauth.edge.resources import GatewayResource, GatewaySite
from fauth.observe.accesslog import AccessLog
from fauth.observe.metrics import GatewayMetrics
from fauth.testing import LogCapture

__all__ = ["GatewayUnderTest", "LogCapture", "outcome", "raw_request", "refusal", "start_gateway"]


@attr.s(auto_attribs=True)
class GatewayUnderTest:
    """A running gateway: its port, its runtime, and how to stop it."""

    port: Any
    gateway: Gateway
    site: GatewaySite
    metrics: Optional[GatewayMetrics] = None

    def decisions(self, route: str = "1") -> Dict[str, int]:
        """The route's auth decisions by outcome, as C{/metrics} counts them (needs C{access_log})."""
        assert self.metrics is not None
        return {k: v for k, v in self.metrics.route(route).decisions.items() if v}

    def log_lines(self) -> List[Dict[str, Any]]:
        """The access log's lines so far (needs C{access_log})."""
        assert self.metrics is not None and self.metrics.access_log is not None
        self.metrics.access_log.flush()
        with open(self.metrics.access_log.path) as f:
            return [json.loads(line) for line in f]

    @property
    def port_number(self) -> int:
        return self.port.getHost().port

    def url(self, path: str = "/") -> str:
        return "http://127.0.0.1:%d%s" % (self.port_number, path)

    async def stop(self) -> None:
        await self.port.stopListening()
        await self.gateway.close()


async def start_gateway(reactor: Any, doc: Dict[str, Any], access_log: Optional[str] = None) -> GatewayUnderTest:
    """
    Validate C{doc} as a config document (its C{listen} is ignored) and serve
    it on 127.0.0.1 at a free port; with C{access_log} (a path), counted in
    metrics and logged there.
    """
    conf: GatewayConf = parse_config(dict(doc, listen=["tcp:0"]))
    gateway = Gateway(reactor, conf)
    metrics = None
    if access_log is not None:
        metrics = GatewayMetrics(gateway)
        metrics.access_log = AccessLog(access_log, conf.access_log_user_header)
    site = GatewaySite(GatewayResource(gateway, metrics), conf.http, reactor=reactor)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    return GatewayUnderTest(port, gateway, site, metrics)


class _Collect(Protocol):
    def __init__(self, payload: bytes, done: Deferred) -> None:
        self._payload = payload
        self._chunks: List[bytes] = []
        self._done = done

    def connectionMade(self) -> None:
        self.transport.write(self._payload)

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self._done.callback(b"".join(self._chunks))


async def raw_request(
    reactor: Any, port: int, payload: bytes, timeout: float = 10.0, host: str = "127.0.0.1"
) -> bytes:
    """
    Send raw bytes to C{host}:C{port} (127.0.0.1, or C{"::1"}) and return
    everything received until the server closes (send C{Connection: close}
    to make it do so).
    """
    done: Deferred = Deferred()
    endpoint = (TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint)(reactor, host, port)
    protocol = await endpoint.connect(Factory.forProtocol(lambda: _Collect(payload, done)))
    timer = reactor.callLater(timeout, protocol.transport.abortConnection)
    try:
        return await done
    finally:
        if timer.active():
            timer.cancel()


def outcome(d: Deferred) -> List[Any]:
    """What C{d} fires with, once it does: an empty list until then (failures are consumed)."""
    results: List[Any] = []
    d.addBoth(results.append)
    return results




def refusal(plugin: Dict[str, Any]) -> str:
    """The message a document is refused with whose route "r1" has this C{forward-auth} object."""
    doc = {"routes": [{"id": "r1", "uri": "/*", "plugins": {"forward-auth": plugin}, "upstream": {"nodes": {"127.0.0.1:1980": 1}}}]}
    try:
        parse_config(doc)
    except ConfigError as e:
        return str(e)
    raise AssertionError("accepted: %r" % (plugin,))
