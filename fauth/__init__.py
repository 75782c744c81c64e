"""
fauth: a forward-authentication gateway on Twisted, with the behaviour of
Apache APISIX's C{forward-auth} plugin.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["ForwardAuthResource", "GatewayService", "__version__", "load_config", "parse_config"]


def __getattr__(name: str) -> object:
    # Lazy, so importing fauth (e.g. from the twistd plugin) stays cheap and
    # never pulls in anything that might install a reactor.
    if name == "ForwardAuthResource":
        from fauth.resource import ForwardAuthResource

        return ForwardAuthResource
    if name == "GatewayService":
        from fauth.service import GatewayService

        return GatewayService
    if name in ("load_config", "parse_config"):
        from fauth import config

        return getattr(config, name)
    raise AttributeError(name)
