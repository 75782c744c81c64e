# -*- test-case-name: tests.process.test_workers -*-
"""
A worker process of C{twistd fauth --workers N}: C{python -m
fauth.process.worker}, started by its supervisor (L{fauth.process.supervisor})
with the listening sockets, the configuration document and a pipe for its
log events.  It serves a whole gateway (its own route table and connection
pools) on the inherited sockets; when its supervisor disappears (its
standard input, a pipe from the supervisor, reaches end-of-file) it drains
and exits.
"""
from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from fauth.config import ConfigError
from fauth.process.sockets import InheritedEndpoint, SocketSpec
from fauth.admin.control import Control

__all__ = [
    "ETCD_STATE_KEY",
    "EVENTS_FD",
    "FIRST_SOCKET_FD",
    "METRICS_KEY",
    "METRICS_TEXT_KEY",
    "READY_KEY",
    "read_payload",
    "worker_main",
]

log = Logger()

#: Event key a worker sets on the log event saying it is ready (its signal
#: handlers are installed and it accepts connections).
READY_KEY = "fauth_worker_ready"
#: Event key of a worker's answer to C{metrics <n>} (its registry's text
#: in C{METRICS_TEXT_KEY}); the supervisor takes it, it is not logged.
METRICS_KEY = "fauth_worker_metrics"
METRICS_TEXT_KEY = "fauth_worker_metrics_text"
#: Event key of a worker's etcd state (C{[revision, watching]}), sent
#: after every change; the supervisor takes it for C{/healthz}.
ETCD_STATE_KEY = "fauth_worker_etcd"
#: In a worker: the pipe its log events go to (JSON text sequence).
EVENTS_FD = 3
#: In a worker: the first inherited listening socket (then 5, 6, ...).
FIRST_SOCKET_FD = 4



# --- the worker process ---------------------------------------------------------


def _read_exactly(fd: int, count: int) -> bytes:
    chunks = []
    while count > 0:
        chunk = os.read(fd, min(count, 1 << 16))
        if not chunk:
            raise EOFError("the supervisor closed the pipe")
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def read_payload(fd: int = 0) -> Dict[str, Any]:
    """Read what the supervisor sends a new worker: C{{"document": ..., "sockets": [...]}}."""
    header = b""
    while not header.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            raise EOFError("the supervisor closed the pipe")
        header += byte
    data = _read_exactly(fd, int(header))
    kind, _, body = data.partition(b" ")
    payload = json.loads(body) if kind == b"json" else yaml.safe_load(body)
    if not isinstance(payload, dict):
        raise ValueError("bad payload from the supervisor")
    return payload


@implementer(IReadDescriptor)
class _SupervisorWatch:
    """
    Reads the worker's standard input (a pipe from the supervisor, which
    never writes to it after the start-up payload): end-of-file means the
    supervisor is gone.  An C{IReadDescriptor}.
    """

    def __init__(self, fd: int, gone: Callable[[], None], line: Optional[Callable[[bytes], None]] = None) -> None:
        self._fd = fd
        self._gone = gone
        self._line = line
        self._buffer = b""

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "supervisor-pipe"

    def doRead(self) -> Any:
        from twisted.internet import main

        try:
            data = os.read(self._fd, 4096)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR):
                return None
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        # After the payload, the supervisor only asks for metrics.
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if self._line is not None:
                try:
                    self._line(line)
                except Exception:
                    log.failure("a request from the supervisor failed")
        self._buffer = self._buffer[-4096:]
        return None

    def connectionLost(self, reason: Any) -> None:
        self._gone()


def _parse_worker_arguments(argv: Sequence[str]) -> Tuple[int, str, Optional[str]]:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m fauth.process.worker", description="A fauth worker (started by its supervisor)."
    )
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--reactor", default=None)
    args = parser.parse_args(list(argv))
    return args.index, args.config, args.reactor


def worker_main(argv: Optional[Sequence[str]] = None) -> int:
    """
    A worker process: read the payload from the supervisor (standard
    input), log JSON events to L{EVENTS_FD}, adopt the inherited sockets
    and run the gateway (no admin API, no demo services) until SIGTERM,
    SIGINT or the supervisor's end.

    @return: the exit status.
    """
    index, config_path, reactor_module = _parse_worker_arguments(sys.argv[1:] if argv is None else argv)
    from twisted.logger import globalLogBeginner, jsonFileLogObserver

    events = open(EVENTS_FD, "w", encoding="utf-8")
    observers: List[Any] = [jsonFileLogObserver(events)]
    globalLogBeginner.beginLoggingTo(observers)
    if reactor_module:
        try:
            import importlib

            importlib.import_module(reactor_module).install()
        except Exception:
            log.failure(
                "worker {index}: could not install {module}; using the default reactor", index=index, module=reactor_module
            )
    from twisted.internet import reactor as installed

    reactor: Any = installed
    try:
        payload = read_payload(0)
        control = Control.from_document(payload["document"], config_path=config_path)
        control.reload_store = True
        specs = [SocketSpec.from_json(doc) for doc in payload["sockets"]]
        from fauth.process.gcsettings import settle_heap
        from fauth.process.service import GatewayService

        endpoints = [InheritedEndpoint(reactor, spec) for spec in specs]
        service = GatewayService(control.conf, reactor, control=control, handle_signals=True, endpoints=endpoints)
        service.startService()
        settle_heap()
    except ConfigError as e:
        log.critical("worker {index}: {error}", index=index, error=str(e))
        return 3
    except Exception:
        log.failure("worker {index}: could not start", index=index)
        return 3
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)

    def supervisor_gone() -> None:
        if not service.running:
            return
        log.warn("worker {index}: the supervisor is gone; shutting down", index=index)
        service.terminate()

    def asked(line: bytes) -> None:
        word, _, serial = line.partition(b" ")
        if word == b"metrics" and serial.isdigit():
            text, _ = service.metrics.exposition(None)
            log.info("metrics", **{METRICS_KEY: int(serial), METRICS_TEXT_KEY: text.decode("utf-8")})

    def etcd_changed() -> None:
        sync = service.etcd
        log.info("etcd state", **{ETCD_STATE_KEY: [sync.revision or 0, sync.watching]})

    if service.etcd is not None:
        service.etcd.listeners.append(etcd_changed)

    def ready() -> None:
        os.set_blocking(0, False)
        reactor.addReader(_SupervisorWatch(0, supervisor_gone, asked))
        if service.etcd is not None:
            etcd_changed()
        log.info(
            "worker {index} ready: pid {pid}, {count} listening sockets",
            index=index,
            pid=os.getpid(),
            count=len(specs),
            **{READY_KEY: True},
        )

    reactor.callWhenRunning(ready)
    reactor.run()
    return 0


if __name__ == "__main__":
    # Through the module's own name, so that its classes and its logger's
    # namespace are fauth.process.worker's, not __main__'s.
    from fauth.process.worker import worker_main as main

    sys.exit(main())
