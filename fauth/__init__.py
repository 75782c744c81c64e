"""
fauth: a forward-authentication gateway on Twisted, with the behaviour of
Apache APISIX's C{forward-auth} plugin.

What an embedder needs is importable from here (lazily: importing C{fauth},
as the twistd plugin does, pulls in nothing that could install a reactor):

  - L{ForwardAuthResource}: guards any L{IResource} with one C{forward-auth}
    configuration;
  - L{GatewayService}: the whole gateway as a service for a C{MultiService};
  - L{HardenedSite}: the hardened HTTP/1.1 server both are served best by;
  - L{load_config}, L{parse_config}, L{ConfigError}: a configuration, and
    the one error a refused one raises;
  - L{Allow}, L{Degrade}, L{Respond}, L{Decision}: what a check decides.

Test doubles for applications guarded by fauth are in L{fauth.testing}.
Every other module is the implementation: its names may change.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any, Dict

__version__ = "0.1.0"

# Public name -> the module that defines it.
_PUBLIC: Dict[str, str] = {
    "Allow": "fauth.auth.decision",
    "ConfigError": "fauth.config.errors",
    "Decision": "fauth.auth.decision",
    "Degrade": "fauth.auth.decision",
    "ForwardAuthResource": "fauth.edge.resources",
    "GatewayService": "fauth.process.service",
    "HardenedSite": "fauth.edge.server",
    "Respond": "fauth.auth.decision",
    "load_config": "fauth.config.document",
    "parse_config": "fauth.config.document",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError("module 'fauth' has no attribute %r" % (name,))
    return getattr(import_module(module), name)
