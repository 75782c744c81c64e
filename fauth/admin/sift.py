# -*- test-case-name: tests.admin.test_fail_closed -*-
"""
Objects that arrive at run time (from etcd, where nothing validated them),
sorted into those that validate and those that do not.

An object that does not validate is left out, and logged.  A route that
does not is not simply left out: its paths would then fall to a broader
route (a public C{/*}) and reach the upstream without the auth check it was
written to have.  It becomes a placeholder (L{placeholder_route}) that
matches where it would and answers 503 until a valid version arrives; so
does a route whose service, plugin config or upstream is missing or invalid.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import attr

from fauth.admin.store import KINDS, StoreContents
from fauth.config import GatewayConf, RouteConf, parse_plugin_config, parse_route, parse_service, parse_upstream
from fauth.config.routes import placeholder_route
from fauth.config.schema import SchemaError

__all__ = ["Sifted", "sift"]

_REFERENCES = (("upstream_id", "upstreams"), ("service_id", "services"), ("plugin_config_id", "plugin_configs"))


@attr.frozen
class Sifted:
    """
    @ivar contents: the objects that validate.
    @ivar skipped: those that do not, by C{(kind, id)}: their documents.
    @ivar reasons: why, by C{(kind, id)} (one line, APISIX's wording).
    @ivar placeholders: a fail-closed route for each skipped route that
        can be placed (L{placeholder_route}).
    @ivar conf: C{files} with the objects that validate added (after the
        file's), and the placeholders: what the gateway serves.
    """

    contents: StoreContents
    skipped: Mapping[Tuple[str, str], Any]
    reasons: Mapping[Tuple[str, str], str]
    placeholders: Tuple[RouteConf, ...]
    conf: GatewayConf


def sift(files: GatewayConf, raw: StoreContents, previous: Mapping[str, RouteConf]) -> Sifted:
    """
    Validate every object of C{raw} against the configuration file's
    objects (C{files}) and the objects of C{raw} that validate, kinds in
    the order they may name each other.

    @param previous: the routes installed now, by id: where a skipped
        route's fields do not read, its placeholder keeps their place.
    """
    known: Dict[str, Dict[str, Any]] = {
        "upstreams": dict(files.upstreams),
        "plugin_configs": dict(files.plugin_configs),
        "services": dict(files.services),
        "routes": {r.id: r for r in files.routes},
    }
    parsers: Dict[str, Callable[[Any, str], Any]] = {
        "upstreams": lambda doc, i: parse_upstream(doc, i),
        "plugin_configs": lambda doc, i: parse_plugin_config(doc, i),
        "services": lambda doc, i: parse_service(doc, known["upstreams"], i),
        "routes": lambda doc, i: parse_route(doc, known["upstreams"], i, known["services"], known["plugin_configs"]),
    }
    valid: Dict[str, Dict[str, Any]] = {kind: {} for kind in KINDS}
    skipped: Dict[Tuple[str, str], Any] = {}
    reasons: Dict[Tuple[str, str], str] = {}
    for kind in KINDS:
        for doc_id, doc in raw.of(kind).items():
            if doc_id in known[kind]:
                reason = "%s %s is also defined in the configuration file" % (kind[:-1], doc_id)
            else:
                try:
                    known[kind][doc_id] = parsers[kind](doc, doc_id)
                    valid[kind][doc_id] = doc
                    continue
                except SchemaError as e:
                    reason = str(e) + _because(doc, reasons)
            skipped[(kind, doc_id)] = doc
            reasons[(kind, doc_id)] = reason
    placeholders = []
    for (kind, doc_id), doc in skipped.items():
        if kind == "routes" and doc_id not in known["routes"]:
            placeholder = placeholder_route(
                doc_id, doc, reasons[(kind, doc_id)], previous.get(doc_id), known["services"]
            )
            if placeholder is not None:
                placeholders.append(placeholder)
    routes = tuple(known["routes"].values())
    conf = attr.evolve(
        files,
        routes=routes + tuple(placeholders),
        upstreams=known["upstreams"],
        services=known["services"],
        plugin_configs=known["plugin_configs"],
    )
    contents = StoreContents(
        routes=valid["routes"],
        upstreams=valid["upstreams"],
        services=valid["services"],
        plugin_configs=valid["plugin_configs"],
    )
    return Sifted(contents, skipped, reasons, tuple(placeholders), conf)


def _because(doc: Any, reasons: Mapping[Tuple[str, str], str]) -> str:
    """Why an object this one names was left out, if it was."""
    if not isinstance(doc, dict):
        return ""
    for field, kind in _REFERENCES:
        reason: Optional[str] = reasons.get((kind, str(doc.get(field))))
        if field in doc and reason is not None:
            return " (%s %s does not validate: %s)" % (kind[:-1], doc[field], reason)
    return ""
