# -*- test-case-name: tests.process.test_workers -*-
"""
Several processes: C{twistd fauth --workers N} (or C{workers: N}).

The supervisor (the process twistd runs) binds the gateway's listening
sockets itself and never accepts on them; it starts N worker processes
(C{python -m fauth.process.worker}, same interpreter, C{reactor.spawnProcess})
that inherit the sockets (C{childFDs}) and adopt them (L{adopt_shared}: what
C{reactor.adoptStreamPort} does, with Twisted's own port classes, adjusted
for a socket several processes share).  Each worker is a whole gateway with
its own route table and connection pools.  Every idle worker is woken for a
new connection and the first to accept it serves it; workers accept one
connection per wake-up, so that one worker does not take a whole burst.

Because the sockets belong to the supervisor, a worker that dies takes
only its own connections with it: the listening socket stays open (new
connections queue in its backlog and the other workers keep accepting)
while the supervisor starts a replacement.  (C{SO_REUSEPORT} with a socket
per worker would close that worker's accept queue with it, resetting the
connections waiting there, and does not exist for UNIX sockets.)

The supervisor also runs what must exist once: the admin API (its changes
go to the store file, then every worker is told to reload with SIGHUP and
re-reads the configuration file and the store, which is the one source of
truth they share; with C{etcd}, every worker watches etcd itself and no
signal is sent) and the C{demo} services.  Its C{/metrics} is the sum over
the workers, each asked on its standard input (L{SupervisorMetrics}).  It relays the workers' logs
(each worker writes JSON log events to a pipe), restarts a worker that
exits (after a short, growing delay), forwards SIGHUP, and on SIGTERM
makes every worker drain (each for C{shutdown_grace}) before it exits
with status 0.  A worker whose supervisor disappears (its standard
input, a pipe from the supervisor, reaches end-of-file) drains and exits.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any, Dict, List, Optional, Tuple

import yaml
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from fauth.config import ConfigError
from fauth.admin.control import Control
from fauth.admin.effective import RESTART_ONLY
from fauth.process.sockets import SYSTEMD_VARIABLES, SharedSocket, SocketSpec, bind_shared, check_shareable, family_name
from fauth.process.worker import ETCD_STATE_KEY, EVENTS_FD, FIRST_SOCKET_FD, METRICS_KEY, METRICS_TEXT_KEY, READY_KEY
from fauth.process.children import (
    STABLE_AFTER,
    WorkerProtocol,
    WorkerSlot,
    describe_exit,
    reactor_module,
    restart_delay,
    worker_pythonpath,
)
from fauth.process.workermetrics import SupervisorMetrics
from fauth.process.signals import ProcessSignals, stop_reactor

__all__ = ["WorkerSupervisor"]

log = Logger()

#: After C{shutdown_grace}, how long (seconds) the supervisor still waits
#: for a draining worker before it sends SIGKILL.
KILL_MARGIN = 5.0
#: How long (seconds) workers stopping at once (SIGINT) get before SIGKILL.
STOP_NOW_TIMEOUT = 5.0
#: Seconds the supervisor's C{/metrics} waits for its workers' answers.
METRICS_TIMEOUT = 2.0


class WorkerSupervisor(MultiService):
    """
    The supervisor of C{--workers N}: binds the C{listen} sockets, runs N
    worker processes on them, the admin API (when configured) and the demo
    services; restarts workers, forwards reloads, drains them on SIGTERM.

    @param control: the effective configuration, read from a file
        (L{Control.from_file}).
    @param workers: how many worker processes (2 or more makes sense).
    @param reactor: defaults to the global reactor, imported only then.
    @param handle_signals: install SIGHUP (reload, forwarded) and SIGTERM
        (drain every worker, then stop) handlers once the reactor runs.
    @param executable: the interpreter workers run (C{sys.executable}).
    @ivar slots: the L{WorkerSlot}s.
    @ivar sockets: the bound L{SharedSocket}s (after start).
    @ivar admin_root: the admin API's root resource, or C{None}.
    @ivar accepting: true while running and not shutting down.
    """

    def __init__(
        self,
        control: Control,
        workers: int,
        reactor: Any = None,
        *,
        handle_signals: bool = False,
        executable: Optional[str] = None,
    ) -> None:
        super().__init__()
        conf = control.conf
        if control.config_path is None:
            raise ConfigError("config: several workers need a configuration file (they read it)")
        for description in conf.listen:
            check_shareable(description)
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self._reactor = reactor
        self.control = control
        self._executable = executable or sys.executable
        # Workers resolve relative paths (store, certificates) as this
        # process did when it read the configuration, whatever twistd's
        # --rundir does later.
        self._cwd = os.getcwd()
        # Sections a reload cannot change stay as they were at start-up, for
        # every worker, including those started later.
        self._startup_source = dict(conf.source)
        self.slots = [WorkerSlot(index) for index in range(1, workers + 1)]
        self.sockets: List[SharedSocket] = []
        self.accepting = False
        self._handle_signals = handle_signals
        self._signals = ProcessSignals(reactor, self.terminate, self._reload_on_signal)
        self._terminating = False
        self._stopping = False
        self._signal_reload = False
        self._waiting: List[Deferred[None]] = []
        # Asked-for worker metrics: request number -> (answers by slot, Deferred).
        self._metrics_asked: Dict[int, Tuple[Dict[int, str], "Deferred[List[str]]", List[int]]] = {}
        self._metrics_serial = 0
        #: Reloads and admin store writes, which this process alone makes
        #: (for C{/metrics}): (event, result) -> count.
        self.outcomes: Dict[Tuple[str, str], int] = {}
        control.on_outcome(self._count_outcome)
        if conf.demo is not None:
            from fauth.process.demo import demo_services

            demo_services(reactor, conf.demo.auth, conf.demo.upstream).setServiceParent(self)
        self.admin_root: Any = None
        self.admin_listener: Any = None
        #: With C{etcd} and C{admin}: this process's own watch, which keeps
        #: the admin API's view (and validation) current; each worker
        #: watches etcd itself for the routes it serves.
        self.etcd: Any = None
        if conf.admin is not None and conf.etcd is not None:
            from fauth.admin.etcd import EtcdSync

            self.etcd = EtcdSync(reactor, control)
            self.etcd.setServiceParent(self)
        if conf.admin is not None:
            from fauth.admin.api import AdminRoot, AdminSite
            from fauth.process.service import _listener

            self.admin_root = AdminRoot(
                control, conf.admin.keys, self.serving, self.etcd_status if self.etcd is not None else None
            )
            metrics = SupervisorMetrics(self)
            self.admin_root.putChild(
                b"metrics", self.admin_root.guard(metrics) if conf.admin.metrics_require_key else metrics
            )
            self.admin_listener = _listener(reactor, conf.admin.listen, AdminSite(self.admin_root), "admin.listen")
            self.admin_listener.setServiceParent(self)
            if control.store is not None:
                from fauth.admin.expiry import StoreExpiry

                StoreExpiry(reactor, control).setServiceParent(self)
        control.on_change(self._configuration_changed)

    def etcd_status(self) -> str:
        """
        For C{/healthz} with etcd: this process's watch (its admin API's
        view), then the workers' (each reports its revision after every
        change): C{...; workers: 2 of 2 watching, revision 41 to 41}.
        """
        states = [slot.etcd_state for slot in self.slots if slot.ready and slot.etcd_state is not None]
        text = self.etcd.status()
        if not states:
            return text + "; workers: none reported yet"
        watching = sum(1 for _, on in states if on)
        revisions = [revision for revision, _ in states]
        return text + "; workers: %d of %d watching, revision %d to %d" % (
            watching,
            len(self.slots),
            min(revisions),
            max(revisions),
        )

    def _count_outcome(self, event: str, result: str) -> None:
        self.outcomes[(event, result)] = self.outcomes.get((event, result), 0) + 1

    # -- start and stop ------------------------------------------------------

    def _bind(self) -> None:
        if self.sockets:
            return
        try:
            for description in self.control.conf.listen:
                self.sockets.append(bind_shared(self._reactor, description))
        except BaseException:
            self._close_sockets()
            self.sockets = []
            raise

    def privilegedStartService(self) -> None:
        # Bound here, before twistd sheds privileges (ports below 1024).
        self._bind()
        super().privilegedStartService()

    def startService(self) -> None:
        self._bind()
        super().startService()
        self.accepting = True
        self._reactor.callWhenRunning(self._started)

    def _started(self) -> None:
        if not self.running or self._stopping:
            return
        if self._handle_signals:
            self._signals.install()
        log.info(
            "starting {count} workers on {listen}",
            count=len(self.slots),
            listen=", ".join(s.description for s in self.sockets),
        )
        for slot in self.slots:
            self._spawn(slot)

    def stopService(self) -> "Deferred[None]":
        self.accepting = False
        if not self._terminating:
            self._signals.restore()
        self._stopping = True
        self._cancel_restarts()
        if not self._terminating and self.live():
            # The reactor stops for another reason (SIGINT, the embedding
            # application): workers stop at once too.
            log.info("stopping {count} workers now", count=len(self.live()))
            self._signal_all(signal.SIGINT)
            gone = self._wait_for_workers(STOP_NOW_TIMEOUT)
        else:
            gone = self._wait_for_workers(self.control.conf.shutdown_grace + KILL_MARGIN)
        self._close_sockets()

        def stop_children(_: object) -> Any:
            return MultiService.stopService(self)

        return gone.addBoth(stop_children)

    def _close_sockets(self) -> None:
        for shared in self.sockets:
            shared.close()

    def live(self) -> List[WorkerSlot]:
        """The slots whose worker process is running."""
        return [slot for slot in self.slots if slot.process is not None]

    def serving(self) -> bool:
        """For C{/healthz}: not shutting down, and at least one worker ready."""
        return self.accepting and any(slot.ready for slot in self.slots)

    # -- worker processes ---------------------------------------------------

    def worker_document(self) -> Dict[str, Any]:
        """
        The configuration document a new worker starts from: the one this
        process runs now (its last valid load), with the sections a reload
        cannot change as they were at start-up, and the store file's
        absolute path.
        """
        doc = dict(self.control.conf.source)
        # client_max_body_size is read into the "http" limits, restart-only too.
        for key in RESTART_ONLY + ("client_max_body_size",):
            if key in self._startup_source:
                doc[key] = self._startup_source[key]
            else:
                doc.pop(key, None)
        if self.control.store is not None and isinstance(doc.get("admin"), dict):
            doc["admin"] = dict(doc["admin"], store=self.control.store.path)
        return doc

    def _payload(self) -> bytes:
        specs = [
            SocketSpec(FIRST_SOCKET_FD + n, family_name(shared.family), shared.description, shared.tls).to_json()
            for n, shared in enumerate(self.sockets)
        ]
        payload = {"document": self.worker_document(), "sockets": specs}
        try:
            data = b"json " + json.dumps(payload).encode("utf-8")
        except (TypeError, ValueError):  # YAML's own types (dates, sets, ...)
            data = b"yaml " + yaml.safe_dump(payload).encode("utf-8")
        return b"%d\n" % len(data) + data

    def _environment(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
        path = worker_pythonpath(env)
        if path is not None:
            env["PYTHONPATH"] = path
        return env

    def _spawn(self, slot: WorkerSlot) -> None:
        slot.restart_call = None
        if self._stopping or self._terminating:
            return
        argv = [self._executable, "-m", "fauth.process.worker", "--index", str(slot.index)]
        argv += ["--config", str(self.control.config_path)]
        module = reactor_module(self._reactor)
        if module is not None:
            argv += ["--reactor", module]
        # 0: a pipe that only tells the worker when this process is gone;
        # 1: this process's standard output (an access log to "-" goes
        # there as from a single process); 2 and EVENTS_FD: relayed.
        child_fds: Dict[int, Any] = {0: "w", 1: 1, 2: "r", EVENTS_FD: "r"}
        for n, shared in enumerate(self.sockets):
            child_fds[FIRST_SOCKET_FD + n] = shared.fd
        protocol = WorkerProtocol(self, slot)
        try:
            process = self._reactor.spawnProcess(
                protocol,
                self._executable,
                argv,
                env=self._environment(),
                path=self._cwd if self._cwd != os.getcwd() else None,
                childFDs=child_fds,
            )
        except Exception:
            log.failure("worker {index}: could not start it", index=slot.index)
            self._schedule_restart(slot, quick=True)
            return
        protocol.pid = process.pid
        slot.process = process
        slot.pid = process.pid
        slot.ready = False
        slot.reload_pending = False
        slot.started = self._reactor.seconds()
        log.info("worker {index} started: pid {pid}", index=slot.index, pid=process.pid)
        process.writeToChild(0, self._payload())

    def collect_metrics(self, timeout: float = METRICS_TIMEOUT) -> "Deferred[List[str]]":
        """
        Ask every ready worker for its metrics (a line on its standard
        input); fires with the Prometheus texts of those that answered
        within C{timeout} seconds.
        """
        slots = [slot for slot in self.live() if slot.ready]
        self._metrics_serial += 1
        serial = self._metrics_serial
        answers: Dict[int, str] = {}
        d: Deferred[List[str]] = Deferred()
        expected = [slot.index for slot in slots]
        self._metrics_asked[serial] = (answers, d, expected)
        for slot in slots:
            try:
                slot.process.writeToChild(0, b"metrics %d\n" % serial)
            except Exception:
                expected.remove(slot.index)

        def give_up() -> None:
            self._metrics_done(serial)

        call = self._reactor.callLater(timeout, give_up)
        d.addBoth(lambda result: (call.cancel() if call.active() else None, result)[1])
        if not expected:
            self._metrics_done(serial)
        return d

    def _metrics_done(self, serial: int) -> None:
        asked = self._metrics_asked.pop(serial, None)
        if asked is not None:
            answers, d, _ = asked
            d.callback([answers[index] for index in sorted(answers)])

    def _metrics_answer(self, slot: WorkerSlot, event: Dict[str, Any]) -> None:
        serial = event.get(METRICS_KEY)
        if not isinstance(serial, int):
            return
        asked = self._metrics_asked.get(serial)
        if asked is None:
            return  # too late
        answers, _, expected = asked
        answers[slot.index] = str(event.get(METRICS_TEXT_KEY, ""))
        if all(index in answers for index in expected):
            self._metrics_done(serial)

    def relay(self, slot: WorkerSlot, pid: Optional[int], line: str) -> None:
        """Publish one line of a worker's log (a JSON event) in this process's log."""
        try:
            event = eventFromJSON(line.lstrip("\x1e"))
        except ValueError:
            event = None
        if isinstance(event, dict) and METRICS_KEY in event:
            self._metrics_answer(slot, event)
            return
        if isinstance(event, dict) and ETCD_STATE_KEY in event:
            state = event[ETCD_STATE_KEY]
            if slot.pid == pid and isinstance(state, list) and len(state) == 2:
                slot.etcd_state = (int(state[0] or 0), bool(state[1]))
            return
        if not isinstance(event, dict) or "log_format" not in event:
            log.info("worker {index} (pid {pid}): {line}", index=slot.index, pid=pid, line=line)
            return
        namespace = event.get("log_namespace", "-")
        level_name = getattr(event.get("log_level"), "name", "-")
        event["log_system"] = "worker %d, pid %s, %s#%s" % (slot.index, pid, namespace, level_name)
        event["fauth_worker"] = slot.index
        globalLogPublisher(event)
        if event.get(READY_KEY) is True and slot.pid == pid:
            self._ready(slot)

    def _ready(self, slot: WorkerSlot) -> None:
        slot.ready = True
        if slot.reload_pending:
            slot.reload_pending = False
            self._signal(slot, signal.SIGHUP)

    def worker_ended(self, slot: WorkerSlot, pid: Optional[int], reason: Failure) -> None:
        status = describe_exit(reason)
        slot.process = None
        slot.ready = False
        slot.etcd_state = None
        if self._stopping or self._terminating:
            log.info("worker {index} (pid {pid}) {status}", index=slot.index, pid=pid, status=status)
            self._check_gone()
            return
        uptime = self._reactor.seconds() - slot.started
        self._schedule_restart(slot, quick=uptime < STABLE_AFTER, pid=pid, status=status, uptime=uptime)

    def _schedule_restart(
        self, slot: WorkerSlot, quick: bool, pid: Optional[int] = None, status: str = "", uptime: float = 0.0
    ) -> None:
        slot.quick_exits = slot.quick_exits + 1 if quick else 1
        delay = restart_delay(slot.quick_exits)
        if pid is not None:
            log.warn(
                "worker {index} (pid {pid}) {status} after {uptime:.1f}s; restarting it in {delay}s",
                index=slot.index,
                pid=pid,
                status=status,
                uptime=uptime,
                delay=delay,
            )
        slot.restarts += 1
        slot.restart_call = self._reactor.callLater(delay, self._spawn, slot)

    def _cancel_restarts(self) -> None:
        for slot in self.slots:
            if slot.restart_call is not None and slot.restart_call.active():
                slot.restart_call.cancel()
            slot.restart_call = None

    def _signal(self, slot: WorkerSlot, signum: int) -> None:
        if slot.process is None:
            return
        try:
            slot.process.signalProcess(signum)
        except (ProcessExitedAlready, OSError):
            pass

    def _signal_all(self, signum: int) -> None:
        for slot in self.live():
            self._signal(slot, signum)

    def _check_gone(self) -> None:
        if self.live():
            return
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def _wait_for_workers(self, timeout: float) -> "Deferred[None]":
        """Fires when no worker runs; SIGKILLs those still running after C{timeout} seconds."""
        if not self.live():
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)

        def kill() -> None:
            stuck = self.live()
            if stuck:
                log.warn(
                    "{count} workers still running after {timeout}s; killing them (SIGKILL)",
                    count=len(stuck),
                    timeout=timeout,
                )
                self._signal_all(signal.SIGKILL)

        call = self._reactor.callLater(timeout, kill)

        def done(result: object) -> object:
            if call.active():
                call.cancel()
            return result

        return d.addBoth(done)

    # -- reload ----------------------------------------------------------------

    def _configuration_changed(self, conf: Any) -> None:
        """After every applied change (admin API write, reload): every worker reloads."""
        if self.control.conf.etcd is not None and self.control.last_origin != "reload":
            # The workers watch etcd: they have the change already, or soon.
            return
        if not self._signal_reload:
            self.reload_workers()

    def reload_workers(self) -> None:
        """
        Send SIGHUP to every worker: it re-reads the configuration file and
        the store.  A worker still starting gets it once it is ready; one
        being restarted starts from the new configuration anyway.
        """
        told = 0
        for slot in self.live():
            if slot.ready:
                self._signal(slot, signal.SIGHUP)
                told += 1
            else:
                slot.reload_pending = True
        log.info("telling {count} workers to reload", count=told)

    def _reload_on_signal(self) -> None:
        # Forwarded whatever this process made of the file: a worker refuses
        # an invalid file too, and reopens its access log either way, as a
        # single process does on SIGHUP.
        log.info("SIGHUP: reloading {path}, then every worker", path=self.control.config_path)
        self._signal_reload = True
        try:
            self.control.reload()
        except ConfigError:
            pass  # logged by Control.reload ("reload refused: ...")
        finally:
            self._signal_reload = False
        self.reload_workers()

    # -- shutdown ----------------------------------------------------------------

    def terminate(self) -> "Deferred[None]":
        """
        What SIGTERM does: stop listening (the workers stop accepting, the
        socket closes once the last one let go), let every worker drain for
        up to C{shutdown_grace}, then stop the reactor (exit status 0).  A
        second call tells the workers to stop at once.
        """
        if self._terminating:
            log.warn("SIGTERM again: telling {count} workers to stop now", count=len(self.live()))
            self._signal_all(signal.SIGTERM)
            return succeed(None)
        self._terminating = True
        self.accepting = False
        self._cancel_restarts()
        grace = self.control.conf.shutdown_grace
        log.info(
            "SIGTERM: stopping {count} workers; each finishes its requests in flight (up to {grace}s)",
            count=len(self.live()),
            grace=grace,
        )
        self._signal_all(signal.SIGTERM)
        self._close_sockets()

        def gone(_: object) -> None:
            log.info("all workers exited; stopping")
            stop_reactor(self._reactor)

        return self._wait_for_workers(grace + KILL_MARGIN).addCallback(gone)

