# -*- test-case-name: tests.test_tap -*-
"""C{twistd fauth} / C{twist fauth}: options and service construction."""
from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the fauth forward-authentication gateway: every request is checked "
        "with an external auth service (APISIX forward-auth semantics) before it "
        "is proxied upstream."
    )
    optParameters = [
        ["config", "c", "conf/fauth.yaml", "Path of the YAML (or JSON) configuration file."],
    ]
    compData = usage.Completions(optActions={"config": usage.CompleteFiles("*.y*ml *.json")})


def makeService(options: Any) -> Any:
    """
    Load and validate the config (merged with the admin store), then build
    the L{GatewayService}; it owns SIGHUP (reload) and SIGTERM (graceful
    shutdown) in this process.
    """
    from fauth.config import ConfigError
    from fauth.service import GatewayService

    try:
        return GatewayService.from_file(options["config"], handle_signals=True)
    except ConfigError as e:
        # One line and a non-zero exit, never a traceback.
        sys.stderr.write("fauth: %s\n" % e)
        sys.stderr.flush()
        raise SystemExit(1)
