# -*- test-case-name: tests.process.test_workers -*-
"""
One worker process as the supervisor sees it: its slot (which process is in
it, how often it restarted), the protocol on its pipes, the delay before a
restart, and what a worker needs in its environment to start like its
supervisor (the same C{fauth} on its path, the same kind of reactor).
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Any, Dict, Mapping, Optional, Protocol, Tuple

import attr
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from fauth.process.worker import EVENTS_FD

__all__ = [
    "MAX_RESTART_DELAY",
    "STABLE_AFTER",
    "SlotOwner",
    "WorkerProtocol",
    "WorkerSlot",
    "describe_exit",
    "reactor_module",
    "restart_delay",
    "worker_pythonpath",
]

log = Logger()

#: First restart delay (seconds); doubled for every further quick exit.
RESTART_DELAY = 0.1
#: Longest restart delay (seconds).
MAX_RESTART_DELAY = 10.0
#: A worker that ran this long (seconds) before exiting restarts at once
#: (after L{RESTART_DELAY}): its exit is not part of a crash loop.
STABLE_AFTER = 10.0


@attr.s(auto_attribs=True, eq=False)
class WorkerSlot:
    """
    One of the N worker positions and the process currently in it.

    @ivar index: 1 to N.
    @ivar process: the running worker's process transport, or C{None}.
    @ivar pid: its process id (the last one, once it exited).
    @ivar ready: whether it said it serves (and handles SIGHUP).
    @ivar reload_pending: a reload was asked for before it was ready.
    @ivar started: when it was started (reactor seconds).
    @ivar quick_exits: consecutive exits within L{STABLE_AFTER} of a start.
    @ivar restarts: how many times this slot was restarted.
    """

    index: int
    process: Any = None
    pid: Optional[int] = None
    ready: bool = False
    reload_pending: bool = False
    started: float = 0.0
    quick_exits: int = 0
    restarts: int = 0
    restart_call: Any = None
    #: With etcd: the worker's last reported revision and whether it watches.
    etcd_state: Optional[Tuple[int, bool]] = None


def describe_exit(reason: Failure) -> str:
    """C{exited with status N} or C{killed by signal N (SIGNAME)}, from C{processEnded}'s reason."""
    value = reason.value
    signum = getattr(value, "signal", None)
    if signum:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = "?"
        return "killed by signal %d (%s)" % (signum, name)
    return "exited with status %s" % (getattr(value, "exitCode", None),)


def restart_delay(quick_exits: int) -> float:
    """Seconds before a restart, after C{quick_exits} consecutive quick exits (1 or more)."""
    return float(min(RESTART_DELAY * 2 ** max(0, quick_exits - 1), MAX_RESTART_DELAY))


class SlotOwner(Protocol):
    """What a L{WorkerProtocol} reports to: the supervisor."""

    def relay(self, slot: WorkerSlot, pid: Optional[int], line: str) -> None:
        """One line the worker wrote on its events pipe."""

    def worker_ended(self, slot: WorkerSlot, pid: Optional[int], reason: Failure) -> None:
        """The worker process in C{slot} is gone."""


class WorkerProtocol(ProcessProtocol):
    """The supervisor's end of one worker process: relays its output, reports its end."""

    def __init__(self, supervisor: SlotOwner, slot: WorkerSlot) -> None:
        self._supervisor = supervisor
        self._slot = slot
        self._buffers: Dict[int, bytes] = {EVENTS_FD: b"", 2: b""}
        self.pid: Optional[int] = None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._buffers.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > 1 << 20:  # a runaway line: pass it on as it is
            lines.append(rest)
            rest = b""
        self._buffers[childFD] = rest
        for line in lines:
            self._line(childFD, line)

    def _line(self, childFD: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if not text.strip("\x1e "):
            return
        if childFD == EVENTS_FD:
            self._supervisor.relay(self._slot, self.pid, text)
        else:
            log.warn("worker {index} (pid {pid}) stderr: {line}", index=self._slot.index, pid=self.pid, line=text)

    def processEnded(self, reason: Failure) -> None:
        for childFD, rest in sorted(self._buffers.items()):
            if rest:
                self._line(childFD, rest)
        self._buffers = {EVENTS_FD: b"", 2: b""}
        self._supervisor.worker_ended(self._slot, self.pid, reason)


def worker_pythonpath(environ: Mapping[str, str]) -> Optional[str]:
    """
    The C{PYTHONPATH} a worker needs to import this very C{fauth} (a source
    checkout not otherwise on the path), or C{None} to leave it as it is.
    """
    import site

    import fauth

    root = os.path.dirname(os.path.dirname(os.path.abspath(fauth.__file__)))
    site_dirs = list(getattr(site, "getsitepackages", lambda: [])())
    user_site = getattr(site, "getusersitepackages", lambda: None)()
    if user_site:
        site_dirs.append(user_site)
    current = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root in [os.path.abspath(p) for p in site_dirs + current]:
        return None
    return os.pathsep.join([root] + current)


def reactor_module(reactor: Any) -> Optional[str]:
    """The module whose C{install()} gives a worker the supervisor's kind of reactor."""
    module = type(reactor).__module__
    if module.startswith("twisted.internet.") and hasattr(sys.modules.get(module), "install"):
        return module
    return None
