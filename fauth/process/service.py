# -*- test-case-name: tests.process.test_cli -*-
"""
The whole gateway as a L{Service}, for twistd or an existing L{MultiService}:
its listeners, the admin API's listener, live reload (SIGHUP) and graceful
shutdown (SIGTERM).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocolFactory, IReactorCore, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool
from twisted.python.failure import Failure

from fauth.observe.accesslog import AccessLogService
from fauth.admin.api import AdminRoot, AdminSite
from fauth.config import ConfigError, GatewayConf
from fauth.admin.control import Control
from fauth.admin.expiry import StoreExpiry
from fauth.edge.gateway import Gateway
from fauth.observe.metrics import GatewayMetrics, MetricsResource
from fauth.edge.resources import GatewayResource, GatewaySite
from fauth.process.signals import ProcessSignals, stop_reactor
from fauth.wire.transport import IClientReactor

__all__ = ["GatewayService", "IGatewayReactor"]

log = Logger()


class IGatewayReactor(IReactorCore, IClientReactor):
    """
    What a gateway process needs of its reactor, for type checking: the
    outbound legs' (L{IClientReactor}: TCP, timers, name resolution), and
    running and stopping (L{IReactorCore}).  Every reactor Twisted ships
    provides them.
    """


def _listener(
    reactor: IReactorCore, description: str, factory: IProtocolFactory, where: str
) -> StreamServerEndpointService:
    try:
        endpoint = serverFromString(reactor, description)
    except Exception as e:  # bad TLS files and the like
        raise ConfigError('config: %s: "%s": %s' % (where, description, e))
    listener = StreamServerEndpointService(endpoint, factory)
    # A port we cannot bind must stop start-up, not be logged and ignored.
    listener._raiseSynchronously = True
    return listener


class GatewayService(MultiService):
    """
    Listens on every C{listen} endpoint and serves the gateway; also starts
    the demo services when the config asks for them, and the admin API on
    C{admin.listen} when there is an C{admin} section.

    @param conf: a validated L{GatewayConf} (see L{fauth.config.load_config});
        with C{admin}, its source document is merged with the store.
    @param reactor: defaults to the global reactor, imported only then.
    @param pool: an application's own L{HTTPConnectionPool} for every auth
        call (its settings then apply); by default each auth target gets a
        L{fauth.wire.pool.StrictConnectionPool} from its keep-alive settings.
    @param control: the effective configuration, when the caller built it
        (L{from_file} does); C{conf} is then ignored.
    @param handle_signals: install SIGHUP (reload) and SIGTERM (graceful
        shutdown, then C{reactor.stop()}) handlers once the reactor runs;
        for a process that is all gateway (C{twistd fauth} does it).
    @param endpoints: a worker of C{--workers N} (L{fauth.process.worker}): serve
        the gateway on these server endpoints (the sockets its supervisor
        bound) instead of C{conf.listen}, and leave the demo services and
        the admin API to the supervisor, which runs them.
    @ivar gateway: the runtime (route table and pools).
    @ivar resource: the L{GatewayResource}; its C{in_flight} counts requests.
    @ivar site: the L{GatewaySite} every listener serves.
    @ivar control: the effective configuration and its changes.
    @ivar metrics: the gateway's L{GatewayMetrics}; C{metrics.registry} is
        served as C{/metrics} on the admin listener.
    @ivar access_log: the L{AccessLogService} (C{access_log}).
    @ivar admin_root: the admin listener's root resource, or C{None} without
        C{admin}.  Hook for more admin endpoints:
        C{admin_root.putChild(b"metrics", admin_root.guard(resource))}.
    @ivar accepting: true while the gateway listeners accept connections.
    """

    def __init__(
        self,
        conf: GatewayConf,
        reactor: Optional[IGatewayReactor] = None,
        pool: Optional[HTTPConnectionPool] = None,
        *,
        control: Optional[Control] = None,
        handle_signals: bool = False,
        endpoints: Optional[Sequence[IStreamServerEndpoint]] = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            # mypy sees the module, not the reactor it becomes.
            reactor = cast(IGatewayReactor, global_reactor)
        self._reactor = reactor
        self.control = control if control is not None else Control.from_conf(conf)
        conf = self.control.conf
        self.gateway = Gateway(reactor, conf, pool)
        self.control.on_change(self.gateway.update)
        self.metrics = GatewayMetrics(self.gateway, lambda: self.resource.in_flight.count)
        self.control.on_outcome(self.metrics.count_outcome)
        self.resource = GatewayResource(self.gateway, self.metrics)
        self.site = GatewaySite(self.resource, conf.http)
        # Before the listeners: a MultiService stops its children in reverse.
        self.access_log = AccessLogService(reactor, self.metrics, conf)
        self.access_log.setServiceParent(self)
        self.control.on_outcome(
            lambda event, result: self.access_log.reloaded(self.control.conf) if event == "reload" else None
        )
        if conf.demo is not None and endpoints is None:
            from fauth.process.demo import demo_services

            demo_services(reactor, conf.demo.auth, conf.demo.upstream).setServiceParent(self)
        self.listeners = []
        for description in conf.listen if endpoints is None else ():
            listener = _listener(reactor, description, self.site, "listen")
            listener.setServiceParent(self)
            self.listeners.append(listener)
        for endpoint in endpoints or ():
            listener = StreamServerEndpointService(endpoint, self.site)
            listener._raiseSynchronously = True
            listener.setServiceParent(self)
            self.listeners.append(listener)
        self.accepting = False
        #: With C{etcd}: the L{fauth.admin.etcd.EtcdSync} keeping this
        #: gateway's table etcd's (every gateway process watches).
        self.etcd: Any = None
        if conf.etcd is not None:
            from fauth.admin.etcd import EtcdSync

            from fauth.admin.etcd import EtcdCollector

            self.etcd = EtcdSync(reactor, self.control)
            self.etcd.setServiceParent(self)
            self.metrics.registry.register(EtcdCollector(self.etcd))
        self.admin_root: Optional[AdminRoot] = None
        self.admin_listener: Optional[StreamServerEndpointService] = None
        if conf.admin is not None and endpoints is None:
            self.admin_root = AdminRoot(
                self.control,
                conf.admin.keys,
                lambda: self.accepting,
                self.etcd.status if self.etcd is not None else None,
            )
            metrics_resource = MetricsResource(self.metrics)
            self.admin_root.putChild(
                b"metrics",
                self.admin_root.guard(metrics_resource) if conf.admin.metrics_require_key else metrics_resource,
            )
            self.admin_listener = _listener(reactor, conf.admin.listen, AdminSite(self.admin_root), "admin.listen")
            self.admin_listener.setServiceParent(self)
            if self.control.store is not None:
                StoreExpiry(reactor, self.control).setServiceParent(self)
        self._handle_signals = handle_signals
        self._signals = ProcessSignals(reactor, self.terminate, self._reload_on_signal)
        self._terminating = False

    @classmethod
    def from_file(
        cls, path: str, reactor: Optional[IGatewayReactor] = None, handle_signals: bool = False
    ) -> "GatewayService":
        """
        The gateway of the configuration file at C{path}, merged with its
        admin store; reloads re-read C{path}.

        @raise ConfigError: one line (a store problem names the store file).
        """
        control = Control.from_file(path)
        return cls(control.conf, reactor, control=control, handle_signals=handle_signals)

    def startService(self) -> None:
        super().startService()
        self.accepting = True
        if self._handle_signals:
            # Not now: twistd calls startService before reactor.run(), which
            # then installs the reactor's own SIGTERM handler over ours.
            self._reactor.callWhenRunning(self._install_signals)

    def _install_signals(self) -> None:
        if self.running:
            self._signals.install()

    def stopService(self) -> Optional[Any]:
        self.accepting = False
        if not self._terminating:
            # After our own SIGTERM, ours stay: a later SIGTERM reaching the
            # reactor's handler would turn the exit status into -15.
            self._signals.restore()
        d = super().stopService()
        return d.addBoth(lambda _: self.gateway.close())

    # -- graceful shutdown ---------------------------------------------------

    def drain(self, grace: Optional[float] = None) -> "Deferred[bool]":
        """
        Stop accepting connections on the gateway listeners, then wait for
        the requests in flight (they finish on the route table they started
        with).  The admin listener stays up (C{/healthz} says C{draining}).

        @param grace: seconds to wait at most; C{shutdown_grace} by default.
        @return: fires with C{True} when every request finished, C{False}
            when the grace ran out first.
        """
        if grace is None:
            grace = self.control.conf.shutdown_grace
        self.accepting = False
        stopped = DeferredList([maybeDeferred(listener.stopService) for listener in self.listeners])

        def wait(_: object) -> "Deferred[bool]":
            idle = self.resource.in_flight.idle()
            idle.addTimeout(grace, self._reactor)

            def timed_out(failure: Failure) -> bool:
                failure.trap(CancelledError, TimeoutError)
                # WebSocket tunnels have no end of their own: the grace is theirs.
                self.gateway.tunnels.close_all()
                return False

            return idle.addCallbacks(lambda _: True, timed_out)

        return stopped.addCallback(wait)

    def terminate(self) -> "Deferred[None]":
        """
        What SIGTERM does: L{drain} for up to C{shutdown_grace} seconds,
        then C{reactor.stop()}.  A second call stops at once.

        Stopping the reactor ourselves (rather than letting its own SIGTERM
        handler do it) is also what makes twistd exit with status 0: the
        reactor only records an exit signal, which twistd re-raises on
        itself, when its own handler ran.
        """
        in_flight = self.resource.in_flight
        if self._terminating:
            log.warn("SIGTERM again: stopping now ({count} requests in flight)", count=in_flight.count)
            stop_reactor(self._reactor)
            return succeed(None)
        self._terminating = True
        grace = self.control.conf.shutdown_grace
        log.info(
            "SIGTERM: no longer accepting connections; waiting up to {grace}s for {count} requests in flight",
            grace=grace,
            count=in_flight.count,
        )

        def drained(finished: bool) -> None:
            if finished:
                log.info("all requests finished; stopping")
            else:
                log.warn(
                    "shutdown grace of {grace}s over; stopping with {count} requests in flight",
                    grace=grace,
                    count=in_flight.count,
                )
            stop_reactor(self._reactor)

        def failed(failure: Failure) -> None:
            log.failure("draining failed; stopping", failure)
            stop_reactor(self._reactor)

        return self.drain(grace).addCallbacks(drained, failed)

    # -- signals -------------------------------------------------------------

    def _reload_on_signal(self) -> None:
        log.info("SIGHUP: reloading {path}", path=self.control.config_path)
        try:
            self.control.reload()
        except ConfigError:
            pass  # logged by Control.reload ("reload refused: ...")
