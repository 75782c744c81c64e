# -*- test-case-name: tests.admin.test_reload,tests.admin.test_api -*-
"""
Installing a new configuration in two phases: every applier with a C{build}
makes its runtime first (whatever it raises refuses the change, with nothing
written or installed), then all are installed.  Plus the listeners told of
every reload's and store write's outcome.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

from twisted.logger import Logger

from fauth.config import GatewayConf

__all__ = ["Appliers", "BuildError", "one_line"]

log = Logger()


class BuildError(Exception):
    """The runtime could not be built from (or install) a valid configuration."""


def one_line(e: BaseException) -> str:
    """An exception as one log-safe line: its type and message, whitespace folded."""
    text = " ".join(str(e).split())
    return "%s: %s" % (type(e).__name__, text) if text else type(e).__name__


class Appliers:
    """Who is given each new effective configuration, and who hears the outcomes."""

    def __init__(self) -> None:
        self._appliers: List[Tuple[Callable[..., None], Optional[Callable[[GatewayConf], Any]]]] = []
        self._outcome_listeners: List[Callable[[str, str], None]] = []

    def on_change(
        self, apply: Callable[..., None], build: Optional[Callable[[GatewayConf], Any]] = None
    ) -> None:
        """
        Call C{apply(conf)} with every new effective configuration.

        With C{build}, in two phases: C{build(conf)} runs before anything is
        written or installed (whatever it raises refuses the change), then
        C{apply(conf, built)} installs what it returned.  A bound C{update}
        of an object with a C{build} method (L{Gateway.update}) is taken
        that way without being told.
        """
        if build is None and getattr(apply, "__name__", None) == "update":
            owner_build = getattr(getattr(apply, "__self__", None), "build", None)
            if callable(owner_build):
                build = owner_build
        self._appliers.append((apply, build))

    def on_outcome(self, listener: Callable[[str, str], None]) -> None:
        """
        Call C{listener(event, result)} after every reload (C{"reload"},
        C{"ok"} or C{"refused"}) and every store write (C{"store_write"},
        C{"ok"} or C{"error"}); for metrics, and to reopen the access log.
        """
        self._outcome_listeners.append(listener)

    def report(self, event: str, result: str) -> None:
        """Tell the outcome listeners; one that fails is logged, not raised."""
        for listener in self._outcome_listeners:
            try:
                listener(event, result)
            except Exception:
                log.failure("{event} listener failed", event=event)

    def build(self, conf: GatewayConf) -> List[Any]:
        """
        Phase one: every two-phase applier's runtime for C{conf}, nothing
        installed.

        @raise BuildError: one line; the traceback is logged.
        """
        built: List[Any] = []
        for _, build in self._appliers:
            if build is None:
                built.append(None)
                continue
            try:
                built.append(build(conf))
            except Exception as e:
                log.failure("the runtime cannot be built from the new configuration")
                raise BuildError("the gateway cannot run it: %s" % one_line(e))
        return built

    def install(self, conf: GatewayConf, built: List[Any], record: Callable[[GatewayConf], None]) -> None:
        """
        Phase two: install what L{build} made, then (the new runtime
        serving) C{record(conf)} and tell the one-phase appliers.

        @raise BuildError: installing failed (logged); C{record} not called.
        """
        for (apply, build), runtime in zip(self._appliers, built):
            if build is not None:
                try:
                    apply(conf, runtime)
                except Exception as e:
                    log.failure("installing the new configuration failed")
                    raise BuildError("installing it failed: %s" % one_line(e))
        record(conf)
        for apply, build in self._appliers:
            if build is None:
                try:
                    apply(conf)
                except Exception:
                    log.failure("a configuration change listener failed")
