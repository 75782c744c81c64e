# -*- test-case-name: tests.process.test_workers -*-
"""
The gateway's listening sockets shared by several processes: the
supervisor binds them (and never accepts on them), each worker adopts the
ones it inherits (L{adopt_shared}: what C{reactor.adoptStreamPort} does,
with Twisted's own port classes, adjusted for a socket several processes
share).  Every idle worker is woken for a new connection and the first to
accept it serves it; workers accept one connection per wake-up, so that one
worker does not take a whole burst.

Because the sockets belong to the supervisor, a worker that dies takes only
its own connections with it: the listening socket stays open (new
connections queue in its backlog and the other workers keep accepting).
(C{SO_REUSEPORT} with a socket per worker would close that worker's accept
queue with it, resetting the connections waiting there, and does not exist
for UNIX sockets.)
"""
from __future__ import annotations

import functools
import os
import socket
import stat
import sys
from typing import Any, Dict, Mapping, Optional, Tuple

import attr
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

from fauth.config import ConfigError

__all__ = [
    "SYSTEMD_VARIABLES",
    "InheritedEndpoint", "SharedSocket", "SocketSpec", "adopt_shared", "bind_shared",
    "check_shareable",
    "family_name",
]

_SUPPORTED = "tcp, tcp6, ssl, unix and systemd"
# Environment variables that describe sockets systemd passed to the supervisor.
SYSTEMD_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


# --- the listening sockets (supervisor side) ---------------------------------


@attr.frozen
class SocketSpec:
    """
    A listening socket as a worker receives it.

    @ivar fd: its file descriptor in the worker.
    @ivar family: C{"AF_INET"}, C{"AF_INET6"} or C{"AF_UNIX"}.
    @ivar description: the C{listen} endpoint description it was bound for;
        for TLS, the worker reads its certificate and key from it.
    @ivar tls: whether the worker wraps accepted connections in TLS.
    """

    fd: int
    family: str
    description: str
    tls: bool = False

    def to_json(self) -> Dict[str, Any]:
        """A JSON-able dict (see L{from_json})."""
        return {"fd": self.fd, "family": self.family, "description": self.description, "tls": self.tls}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "SocketSpec":
        """The spec L{to_json} described."""
        return cls(int(doc["fd"]), str(doc["family"]), str(doc["description"]), bool(doc["tls"]))


@attr.s(auto_attribs=True, eq=False)
class SharedSocket:
    """
    A listening socket the supervisor holds for its workers: bound by it, or
    inherited from systemd.  The supervisor never accepts on it.

    @ivar description: the C{listen} endpoint description.
    @ivar fd: the supervisor's file descriptor.
    @ivar family: the socket's address family.
    @ivar tls: whether workers wrap its connections in TLS (C{ssl:}).
    """

    description: str
    fd: int
    family: int
    tls: bool = False
    _socket: Optional[socket.socket] = None
    _unix_path: Optional[str] = None
    _lock: Any = None
    _closed: bool = False

    def close(self) -> None:
        """
        Close the supervisor's copy: without C{shutdown()}, so the workers
        that still hold the socket keep it until they stop listening; the
        kernel closes it (and refuses new connections) after the last one.
        A UNIX socket's file is removed now (no new client finds it).
        """
        if self._closed:
            return
        self._closed = True
        if self._socket is not None:
            self._socket.close()
        else:
            try:
                os.close(self.fd)
            except OSError:
                pass
        if self._unix_path is not None:
            try:
                os.unlink(self._unix_path)
            except OSError:
                pass
        if self._lock is not None:
            self._lock.unlock()


def family_name(family: int) -> str:
    for name in ("AF_INET", "AF_INET6", "AF_UNIX"):
        if family == getattr(socket, name, None):
            return name
    raise ValueError("unsupported address family %r" % (family,))


def _parse(description: str) -> Tuple[str, Tuple[Any, ...], Dict[str, Any]]:
    """
    C{(kind, args, kwargs)} of a server endpoint description, C{kind} one
    of C{TCP}, C{SSL}, C{UNIX}, C{TCP6}, C{SYSTEMD}.

    @raise ConfigError: a description workers cannot share.
    """
    from twisted.internet.endpoints import _parseServer

    try:
        kind, args, kwargs = _parseServer(description, None)
    except Exception as e:  # Twisted raises several types for bad strings
        raise ConfigError('config: listen: bad endpoint description "%s": %s' % (description, e))
    if isinstance(kind, str) and kind in ("TCP", "SSL", "UNIX"):
        return kind, tuple(args), dict(kwargs)
    prefix = str(getattr(kind, "prefix", "")).upper()
    if prefix in ("TCP6", "SYSTEMD"):
        return prefix, tuple(args), dict(kwargs)
    raise ConfigError(
        'config: listen: "%s": several workers can share %s listeners only (set workers to 1 for this one)'
        % (description, _SUPPORTED)
    )


def check_shareable(description: str) -> None:
    """
    Refuse (without binding anything) a C{listen} description the
    supervisor cannot bind for its workers.

    @raise ConfigError: one line.
    """
    _parse(description)


def _bind_inet(interface: str, port: int, backlog: int) -> socket.socket:
    # What twisted.internet.tcp.Port does: the family follows the interface
    # ("" is every IPv4 address), SO_REUSEADDR, a numeric IPv6 address with
    # its scope id.
    from twisted.internet.abstract import isIPv6Address
    from twisted.internet.error import CannotListenError

    if isIPv6Address(interface):
        family = socket.AF_INET6
        flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        address: Any = socket.getaddrinfo(interface, port, family, socket.SOCK_STREAM, 0, flags)[0][4]
    else:
        family, address = socket.AF_INET, (interface, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise CannotListenError(interface, port, e)
    sock.setblocking(False)
    return sock


def _in_filesystem(path: str) -> bool:
    return not path.startswith("\0")


def _bind_unix(path: str, mode: int, backlog: int, want_pid: bool) -> Tuple[socket.socket, Any]:
    # What twisted.internet.unix.Port does, lock file included.
    from twisted.internet.error import CannotListenError
    from twisted.python.lockfile import FilesystemLock

    lock = None
    if want_pid:
        lock = FilesystemLock(path + ".lock")
        if not lock.lock():
            raise CannotListenError(None, path, "Cannot acquire lock")
        if not lock.clean:
            try:
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.remove(path)
            except OSError:
                pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        if _in_filesystem(path):
            os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        if lock is not None:
            lock.unlock()
        raise CannotListenError(None, path, e)
    sock.setblocking(False)
    return sock, lock


def _tcp6_arguments(port: str, backlog: Any = 50, interface: str = "::") -> Tuple[int, int, str]:
    return int(port), int(backlog), interface


def bind_shared(reactor: Any, description: str) -> SharedSocket:
    """
    Bind the listening socket of a C{listen} description (with Twisted's
    semantics for it), or take the one systemd passed, for workers to share.

    @raise ConfigError: a description workers cannot share.
    @raise twisted.internet.error.CannotListenError: it cannot be bound.
    """
    kind, args, kwargs = _parse(description)
    if kind in ("TCP", "SSL"):
        sock = _bind_inet(kwargs["interface"], args[0], kwargs["backlog"])
        return SharedSocket(description, sock.fileno(), sock.family, kind == "SSL", sock)
    if kind == "TCP6":
        port, backlog, interface = _tcp6_arguments(*args, **kwargs)
        sock = _bind_inet(interface, port, backlog)
        return SharedSocket(description, sock.fileno(), sock.family, False, sock)
    if kind == "UNIX":
        path = args[0]
        sock, lock = _bind_unix(path, kwargs["mode"], kwargs["backlog"], kwargs["wantPID"])
        unix_path = path if _in_filesystem(path) else None
        return SharedSocket(description, sock.fileno(), socket.AF_UNIX, False, sock, unix_path, lock)
    # SYSTEMD: the endpoint only names an inherited descriptor.
    from twisted.internet.endpoints import serverFromString

    endpoint = serverFromString(reactor, description)
    return SharedSocket(description, int(endpoint.fileno), int(endpoint.addressFamily))


# --- the listening sockets (worker side) -------------------------------------


#: Connections a worker accepts per readiness event of a shared socket.
ACCEPTS_PER_EVENT = 1


@functools.lru_cache(maxsize=None)
def _port_classes() -> Tuple[Any, Any]:
    """
    The port classes of L{adopt_shared}: Twisted's TCP and UNIX ports with
    the changes a socket shared by processes needs.
    """
    from twisted.internet import tcp, unix

    class SharedTCPPort(tcp.Port):
        """
        Accepts L{ACCEPTS_PER_EVENT} connections per readiness event (as
        nginx's C{multi_accept off}), where Twisted accepts up to 100 and
        more: every worker is woken for a new connection, and a worker that
        took a whole burst would serve it alone while the others idle.
        """

        def doRead(self) -> Any:
            self.numberAccepts = ACCEPTS_PER_EVENT
            return tcp.Port.doRead(self)

    class SharedUNIXPort(unix.Port):
        """
        As L{SharedTCPPort}; also, the socket and its file are the
        supervisor's: closing never calls C{shutdown()} on the socket (it
        would stop every worker's accepts) nor removes the file, and the
        file's mode is left alone (Twisted would set its default, 0666).
        """

        _shouldShutdown = False

        def doRead(self) -> Any:
            self.numberAccepts = ACCEPTS_PER_EVENT
            return unix.Port.doRead(self)

        def connectionLost(self, reason: Any) -> None:
            tcp.Port.connectionLost(self, reason)

    return SharedTCPPort, SharedUNIXPort


def adopt_shared(reactor: Any, fd: int, family: int, factory: Any) -> Any:
    """
    What C{reactor.adoptStreamPort(fd, family, factory)} does (the same
    Twisted port classes, built the same way), for a listening socket that
    other worker processes share: see L{_port_classes} for the differences.
    The caller still owns (and closes) C{fd}.
    """
    tcp_port, unix_port = _port_classes()
    if family == socket.AF_UNIX:
        port = unix_port._fromListeningDescriptor(reactor, fd, factory)
        probe = socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM)  # a duplicate
        try:
            path = probe.getsockname()
        finally:
            probe.close()
        if isinstance(path, bytes):
            path = path.decode(sys.getfilesystemencoding())
        if path and _in_filesystem(path):
            port.mode = stat.S_IMODE(os.stat(path).st_mode)  # its chmod is then a no-op
    else:
        port = tcp_port._fromListeningDescriptor(reactor, fd, family, factory)
    port.startListening()
    return port


@implementer(IStreamServerEndpoint)
class InheritedEndpoint:
    """
    A server endpoint (L{IStreamServerEndpoint}) for a worker: listens on a
    socket inherited from the supervisor, wrapping connections in TLS for an
    C{ssl:} description.  The inherited descriptor is closed once adopted
    (the reactor holds a duplicate).
    """

    def __init__(self, reactor: Any, spec: SocketSpec) -> None:
        self._reactor = reactor
        self.spec = spec
        self._used = False

    def listen(self, factory: Any) -> "Deferred[Any]":
        """Adopt the socket and serve C{factory} on it."""
        from twisted.internet import fdesc
        from twisted.internet.error import AlreadyListened

        if self._used:
            return fail(AlreadyListened())
        self._used = True
        try:
            if self.spec.tls:
                from twisted.internet.endpoints import _parseServer
                from twisted.protocols.tls import TLSMemoryBIOFactory

                _, args, _ = _parseServer(self.spec.description, None)
                factory = TLSMemoryBIOFactory(args[2], False, factory)
            fd = self.spec.fd
            fdesc.setNonBlocking(fd)
            port = adopt_shared(self._reactor, fd, getattr(socket, self.spec.family), factory)
            os.close(fd)
        except BaseException:
            return fail()
        return succeed(port)
