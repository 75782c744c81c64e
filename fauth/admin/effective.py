# -*- test-case-name: tests.admin.test_store,tests.admin.test_reload -*-
"""
The effective configuration: the configuration file's document with the
admin store's objects appended after the file's, validated as a whole.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional

import attr

from fauth.config import ConfigError, GatewayConf, parse_config
from fauth.admin.objects import file_docs, file_ids, singular
from fauth.admin.store import KINDS, StoreContents

__all__ = ["RESTART_ONLY", "merge", "parse_base"]

#: Sections a reload cannot change in a running process.
RESTART_ONLY = ("listen", "admin", "demo", "http", "ssl_trusted_certificate", "workers", "etcd")

# An error about one object: which kind and id (store errors name the store file).
_LABEL_RE = re.compile(r'^(route|upstream|service|plugin_config) "([^"]*)": ')


def merge(base: GatewayConf, contents: StoreContents, store_path: Optional[str] = None) -> GatewayConf:
    """
    The effective configuration: C{base} (its C{source} document is the
    file's) with the store's objects (routes, upstreams, services, plugin
    configs) appended after the file's.

    @param store_path: when given, an error about a stored document is
        prefixed with C{store <path>:} so an operator knows which file to fix.
    @raise ConfigError: one line.
    """
    doc = base.source
    docs: Dict[str, List[Any]] = {}
    for kind in KINDS:
        owned_docs = file_docs(doc, kind)
        owned = set(file_ids(doc, kind))
        for doc_id in contents.of(kind):
            if doc_id in owned:
                raise ConfigError(
                    'store %s: %s "%s" is also defined in the configuration file; remove it from one of them'
                    % (store_path or "", singular(kind), doc_id)
                )
        docs[kind] = list(owned_docs) + list(contents.of(kind).values())
    try:
        parsed = parse_config(docs)
    except ConfigError as e:
        match = _LABEL_RE.match(str(e))
        if store_path is not None and match and match.group(2) in contents.of(match.group(1) + "s"):
            raise ConfigError("store %s: %s" % (store_path, e))
        raise
    return attr.evolve(
        base,
        routes=parsed.routes,
        upstreams=parsed.upstreams,
        services=parsed.services,
        plugin_configs=parsed.plugin_configs,
    )


def parse_base(doc: object) -> GatewayConf:
    """
    Validate everything in a configuration document except its routes,
    upstreams, services and plugin configs (validated later, together with
    the store's).
    """
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError("config: expected a mapping at the top level")
    for kind in KINDS:
        file_docs(doc, kind)
    base = parse_config(dict(doc, **{kind: [] for kind in KINDS}))
    return attr.evolve(base, source=doc)
