# -*- test-case-name: tests.process.test_cli -*-
"""C{twistd fauth} / C{twist fauth}: options and service construction."""
from __future__ import annotations

import sys
from typing import Any, Optional

from twisted.python import usage

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    synopsis = "[--config FILE] [--workers N] [--check] [--version]"
    longdesc = (
        "Run the fauth forward-authentication gateway: every request is checked "
        "with an external auth service (APISIX forward-auth semantics) before it "
        "is proxied upstream.  With --workers N (N > 1) this process binds the "
        "listening sockets and runs N worker processes that share them; it also "
        "runs the admin API and tells every worker to reload after a change."
    )
    optParameters = [
        ["config", "c", "conf/fauth.yaml", "Path of the YAML (or JSON) configuration file."],
        [
            "workers",
            "w",
            None,
            "Worker processes serving the gateway, an integer, 1 or more (default: the config's workers, "
            "else 1; 1 runs a single process).",
        ],
    ]
    optFlags = [
        [
            "check",
            None,
            "Load and validate the config, print what would be served (listeners, routes, auth "
            "targets, upstreams) and exit: 0 if it is valid, 1 with the error if not. Binds nothing.",
        ],
    ]
    compData = usage.Completions(optActions={"config": usage.CompleteFiles("*.y*ml *.json")})

    def opt_version(self) -> None:
        """Print fauth's version (and Twisted's and Python's) and exit."""
        import platform

        import twisted

        from fauth import __version__

        sys.stdout.write(
            "fauth %s (Twisted %s, %s %s)\n"
            % (__version__, twisted.__version__, platform.python_implementation(), platform.python_version())
        )
        sys.stdout.flush()
        raise SystemExit(0)


def _workers_option(value: Optional[str]) -> Optional[int]:
    # Checked here rather than by usage.Options: its refusals exit with
    # status 0 on Twisted < 26, and print the whole help.
    from fauth.config import ConfigError

    if value is None:
        return None
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError("--workers must be an integer, 1 or more (not %s)" % value)
    return count


def _check(conf: Any, path: str) -> None:
    from fauth.process.check import describe

    sys.stdout.write(describe(conf))
    sys.stdout.write("fauth: configuration %s is valid\n" % path)
    sys.stdout.flush()
    raise SystemExit(0)


def makeService(options: Any) -> Any:
    """
    Load and validate the config (merged with the admin store), then build
    the L{GatewayService}; it owns SIGHUP (reload) and SIGTERM (graceful
    shutdown) in this process.  With more than one worker (C{--workers},
    else C{workers:}), a L{fauth.process.supervisor.WorkerSupervisor} instead.
    """
    from fauth.config import ConfigError
    from fauth.admin.control import Control
    from fauth.process.gcsettings import settle_heap
    from fauth.process.service import GatewayService

    try:
        workers = _workers_option(options["workers"])
        control = Control.from_file(options["config"])
        if options["check"]:
            _check(control.conf, options["config"])
        if workers is None:
            workers = control.conf.workers
        if workers > 1:
            from fauth.process.supervisor import WorkerSupervisor

            return WorkerSupervisor(control, workers, handle_signals=True)
        # What GatewayService.from_file does.
        service = GatewayService(control.conf, control=control, handle_signals=True)
        settle_heap()
        return service
    except ConfigError as e:
        # One line and a non-zero exit, never a traceback.
        sys.stderr.write("fauth: %s\n" % e)
        sys.stderr.flush()
        raise SystemExit(1)
