# -*- test-case-name: tests.observe.test_accesslog -*-
"""
The optional access log: one JSON object per line per request, to a file
(top-level C{access_log: path}) or to standard output (C{access_log: "-"}).
Off by default; then the only per-request cost is one C{if}.

A line::

    {"time":"2026-11-29T07:06:22.123Z","route":"1","method":"GET","uri":"/headers?a=1",
     "status":200,"auth":"allow","auth_ms":1.204,"upstream_ms":2.311,"duration_ms":3.902,
     "bytes":312,"user":"i-am-user","remote_addr":"127.0.0.1"}

Buffering: a file gets whole lines only, written together once 64 KiB are
pending and at least every second (so a line is on disk within about a
second, and a reader never sees half a line); standard output gets every
line as it is written.  The file is reopened on every reload (SIGHUP or
C{POST /apisix/admin/reload}), as logrotate needs; a reload may also change
C{access_log} and C{access_log_user_header}.  Writes are made by the
reactor thread, as Twisted's own log; a failing write drops its lines and
logs one error until writing works again.
"""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, List, Optional, Protocol

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from fauth.config import ConfigError

if TYPE_CHECKING:
    from fauth.config import GatewayConf
    from fauth.observe.exchange import Exchange


class _LogHolder(Protocol):
    """What keeps the open log (a L{fauth.observe.metrics.GatewayMetrics})."""

    access_log: Optional["AccessLog"]

__all__ = ["AccessLog", "AccessLogService", "FLUSH_BYTES", "FLUSH_INTERVAL", "iso_utc"]

log = Logger()

#: Pending bytes that make a file log write at once.
FLUSH_BYTES = 64 * 1024
#: Seconds between two writes of a file log's pending lines.
FLUSH_INTERVAL = 1.0

# A JSON string literal, non-ASCII and control characters escaped (C in CPython).
_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii
_LINE = (
    '{"time":"%s","route":%s,"method":%s,"uri":%s,"status":%d,"auth":%s,"auth_ms":%s,'
    '"upstream_ms":%s,"duration_ms":%.3f,"bytes":%d,"user":%s,"remote_addr":%s}\n'
)


# The auth field of a decision the auth service was not asked for now.
_CACHE_SHOWN = {"hit": "cached", "stale": "stale", "coalesced": "coalesced"}


def _stored_value(decision: Any, name: bytes) -> Any:
    wanted = name.lower()
    for header, values in decision.set_headers:
        if header.lower() == wanted:
            return values
    return None


def iso_utc(when: float) -> str:
    """ISO 8601 UTC with milliseconds: C{2026-11-29T07:06:22.123Z}."""
    second = int(when)
    return "%s.%03dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)), int((when - second) * 1000))


def _ms(seconds: Optional[float]) -> str:
    return "null" if seconds is None else "%.3f" % (seconds * 1000.0)


def _string(text: Optional[str]) -> str:
    return "null" if text is None else _quote(text)


class AccessLog:
    """
    One open access log.

    @param path: a file (opened for appending, created if missing) or
        C{"-"} for standard output.
    @param user_header: the auth-response header shown as C{user}.
    @param clock: wall-clock seconds, for C{time}.
    @raise OSError: the file cannot be opened.
    """

    def __init__(self, path: str, user_header: str = "X-User-ID", clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.user_header = user_header
        self._clock = clock
        self._stdout = path == "-"
        self._file: BinaryIO = self._open()
        self._pending: List[bytes] = []
        self._pending_size = 0
        self._failing = False
        self._second = -1
        self._prefix = ""

    @property
    def user_header(self) -> str:
        """The auth-response header whose first value is logged as C{user}."""
        return self._user_header.decode("latin-1")

    @user_header.setter
    def user_header(self, name: str) -> None:
        self._user_header = name.encode("latin-1")

    def _open(self) -> BinaryIO:
        if self._stdout:
            # The process's own standard output, not sys.stdout: twistd
            # redirects that into its log, one log event per write.
            return open(1, "ab", buffering=0, closefd=False)
        return open(self.path, "ab", buffering=0)

    def _timestamp(self) -> str:
        now = self._clock()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return "%s.%03dZ" % (self._prefix, int((now - second) * 1000))

    def log(self, exchange: "Exchange", status: int) -> None:
        """Write the line of a finished request."""
        request = exchange.request
        decision = exchange.decision
        user = outcome = "null"
        if decision is not None:
            shown = _CACHE_SHOWN.get(decision.cache) if decision.cache is not None else None
            outcome = '"%s"' % decision.outcome if shown is None else '"%s (%s)"' % (decision.outcome, shown)
            # Only what the auth service answered: never a client's header.
            headers = getattr(decision, "reply_headers", None)
            values = None if headers is None else headers.get(self._user_header)
            if not values and decision.outcome == "allow" and (headers is not None or decision.cache is not None):
                # A stored allow keeps only its upstream_headers values, by
                # the names the upstream gets (a rename's new name).
                values = _stored_value(decision, self._user_header)
            if values:
                user = _quote(values[0].decode("latin-1"))
        peer = getattr(request.getClientAddress(), "host", None)
        client = getattr(exchange, "client_addr", None)  # test doubles may lack it
        line = (
            _LINE
            % (
                self._timestamp(),
                _quote(exchange.route.route) if exchange.route.route else "null",
                _quote(request.method.decode("latin-1")),
                _quote(request.uri.decode("latin-1")),
                status,
                outcome,
                _ms(exchange.auth_s),
                _ms(exchange.upstream_s),
                exchange.elapsed * 1000.0,
                request.sentLength,
                user,
                _string(client or peer),
            )
        ).encode("ascii")
        cookies = getattr(decision, "cookies", None)
        if cookies:
            # The auth service's cookies went to this client (allow_cookies).
            line = line[:-2] + b',"auth_cookies":%d}\n' % len(cookies)
        if client is not None and client != peer:
            # trusted_proxies named the client: the proxy it came through too.
            line = line[:-2] + b',"peer":%s}\n' % _string(peer).encode("ascii")
        tunnel_up = getattr(exchange, "tunnel_up", None)  # test doubles may lack it
        if tunnel_up is not None:
            # A WebSocket tunnel, logged when it closed: "bytes" went to the
            # client, "bytes_up" to the upstream, "duration_ms" is its life.
            line = line[:-2] + b',"upgrade":"websocket","bytes_up":%d}\n' % tunnel_up
        self._pending.append(line)
        self._pending_size += len(line)
        if self._stdout or self._pending_size >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the pending lines now."""
        if not self._pending:
            return
        data = memoryview(b"".join(self._pending))
        self._pending = []
        self._pending_size = 0
        try:
            while data:
                written = self._file.write(data)
                if written is None:  # a non-blocking descriptor that is full
                    raise BlockingIOError("standard output would block")
                data = data[written:]
        except (OSError, ValueError) as e:
            if not self._failing:
                self._failing = True
                log.error("access log {path}: write failed, lines lost: {error}", path=self.path, error=e)
            return
        if self._failing:
            self._failing = False
            log.info("access log {path}: writing again", path=self.path)

    def reopen(self) -> None:
        """
        Open the path again (after logrotate renamed the file); on failure
        keep writing to the file already open.  Standard output is kept.
        """
        if self._stdout:
            self.flush()
            return
        try:
            new = self._open()
        except OSError as e:
            log.error("access log: cannot reopen {path}: {error}; still writing to the old file", path=self.path, error=e)
            self.flush()
            return
        self.flush()
        old, self._file = self._file, new
        old.close()

    def close(self) -> None:
        """Write what is pending, then close the file."""
        self.flush()
        self._file.close()


def open_access_log(path: str, user_header: str) -> AccessLog:
    """
    An L{AccessLog} for the configuration's C{access_log}.

    @raise ConfigError: one line, when the file cannot be opened.
    """
    try:
        return AccessLog(path, user_header)
    except OSError as e:
        raise ConfigError('config: access_log: cannot open "%s": %s' % (path, e.strerror or e))


class AccessLogService(Service):
    """
    Keeps C{metrics.access_log} as the configuration says, writes pending
    lines every L{FLUSH_INTERVAL} seconds while running, reopens the file on
    every reload, and closes it when stopped.

    @param reactor: for the flush timer.
    @param metrics: whose C{access_log} the requests write to.
    @param conf: the configuration at start-up.
    @raise ConfigError: C{access_log} cannot be opened.
    """

    def __init__(self, reactor: Any, metrics: _LogHolder, conf: "GatewayConf") -> None:
        self._reactor = reactor
        self._metrics = metrics
        self._timer: Optional[LoopingCall] = None
        if conf.access_log is not None:
            metrics.access_log = open_access_log(conf.access_log, conf.access_log_user_header)

    def startService(self) -> None:
        super().startService()
        self._timer = LoopingCall(self._flush)
        self._timer.clock = self._reactor
        self._timer.start(FLUSH_INTERVAL, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        self._timer = None
        current, self._metrics.access_log = self._metrics.access_log, None
        if current is not None:
            current.close()

    def _flush(self) -> None:
        current = self._metrics.access_log
        if current is not None:
            current.flush()

    def reloaded(self, conf: "GatewayConf") -> None:
        """
        After a reload, accepted or refused (C{conf} is the configuration
        now in force): reopen the file, or switch to the new C{access_log}.
        A new file that cannot be opened is logged and the current one kept.
        """
        current = self._metrics.access_log
        path = conf.access_log
        if current is not None and path == current.path:
            current.user_header = conf.access_log_user_header
            current.reopen()
            return
        new = None
        if path is not None:
            try:
                new = AccessLog(path, conf.access_log_user_header)
            except OSError as e:
                log.error(
                    "access log: cannot open {path}: {error}; keeping {current}",
                    path=path,
                    error=e.strerror or e,
                    current=current.path if current is not None else "none",
                )
                return
        self._metrics.access_log = new
        if current is not None:
            current.close()
        log.info("access log: {path}", path=path if path is not None else "off")
