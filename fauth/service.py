# -*- test-case-name: tests.test_service -*-
"""The whole gateway as a L{Service}, for twistd or an existing L{MultiService}."""
from __future__ import annotations

from typing import Any, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString

from fauth.config import ConfigError, GatewayConf
from fauth.gateway import Gateway
from fauth.resource import GatewayResource, GatewaySite

__all__ = ["GatewayService"]


class GatewayService(MultiService):
    """
    Listens on every C{listen} endpoint and serves the gateway; also starts
    the demo services when the config asks for them.

    @param conf: a validated L{GatewayConf} (see L{fauth.config.load_config}).
    @param reactor: defaults to the global reactor, imported only then.
    @ivar gateway: the runtime (route table and pools).
    @ivar site: the L{GatewaySite} every listener serves.
    """

    def __init__(self, conf: GatewayConf, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.gateway = Gateway(reactor, conf)
        self.site = GatewaySite(GatewayResource(self.gateway), conf.http)
        if conf.demo is not None:
            from fauth.demo import demo_services

            demo_services(reactor, conf.demo.auth, conf.demo.upstream).setServiceParent(self)
        self.listeners = []
        for description in conf.listen:
            try:
                endpoint = serverFromString(reactor, description)
            except Exception as e:  # bad TLS files and the like
                raise ConfigError('config: listen: "%s": %s' % (description, e))
            listener = StreamServerEndpointService(endpoint, self.site)
            # A port we cannot bind must stop start-up, not be logged and ignored.
            listener._raiseSynchronously = True
            listener.setServiceParent(self)
            self.listeners.append(listener)

    def stopService(self) -> Optional[Any]:
        d = super().stopService()
        return d.addBoth(lambda _: self.gateway.close())
