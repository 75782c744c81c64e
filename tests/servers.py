"""Small helpers for tests that run real HTTP servers on loopback."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint

from fauth.process.demo import quiet_site

if TYPE_CHECKING:
    from twisted.application.internet import StreamServerEndpointService
    from twisted.internet.interfaces import IListeningPort, IReactorTCP
    from twisted.web.resource import IResource

__all__ = ["listen_on_loopback", "port_url", "service_port"]


def listen_on_loopback(reactor: IReactorTCP, resource: IResource) -> Deferred[IListeningPort]:
    """
    Serve ``resource`` (no access log) on 127.0.0.1 at a free port.

    The caller owns the port: ``await port.stopListening()`` when done.
    """
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    return endpoint.listen(quiet_site(resource, reactor))


def port_url(port: IListeningPort, path: str = "") -> str:
    """Return ``http://host:port`` + ``path`` for a listening TCP port."""
    address = port.getHost()
    return "http://%s:%d%s" % (address.host, address.port, path)


def service_port(service: StreamServerEndpointService) -> Deferred[IListeningPort]:
    """
    Return a Deferred firing with the port of a *started* endpoint service.

    Twisted keeps it only in the private ``_waitingForPort``; this is the one
    place tests reach for it.  The service's own chain is left untouched
    (``stopService`` still gets the port).
    """
    waiting = service._waitingForPort
    if waiting is None:
        raise RuntimeError("service %r has not been started" % (service,))
    result: Deferred[IListeningPort] = Deferred()

    def relay(port: Any) -> Any:
        # The service's own errback logs listen failures and leaves None.
        if port is None or not hasattr(port, "getHost"):
            result.errback(RuntimeError("service %r failed to listen" % (service,)))
        else:
            result.callback(port)
        return port

    waiting.addBoth(relay)
    return result
