# -*- test-case-name: tests.admin.test_api,tests.admin.test_v3_shapes -*-
"""
The admin API's objects and the rules for writing them, without state: the
refusal it answers with, an entry as it is shown, RFC 7396 merge patches and
APISIX's sub-path patches, ids, time stamps, which objects name which, and
the file's own objects.
"""
from __future__ import annotations

import copy
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import attr

from fauth.config import (
    ConfigError,
    GatewayConf,
    parse_plugin_config,
    parse_route,
    parse_service,
    parse_upstream,
)
from fauth.config.document import standalone_id
from fauth.config.schema import SchemaError

__all__ = [
    "AdminError",
    "Entry",
    "IN_USE",
    "USERS",
    "check_document",
    "check_forbidden_times",
    "check_id",
    "file_docs",
    "file_ids",
    "file_items",
    "merge_patch",
    "not_found",
    "replace_at",
    "singular",
    "stamp_times",
]

# APISIX's id schema: a string of 1-64 of these, or a positive integer.
ID_RE = re.compile(r"[a-zA-Z0-9\-_.]{1,64}\Z")
# Messages parse_route already words as APISIX's admin API does.
APISIX_WORDED = (
    "failed to check the configuration of plugin",
    "unknown plugin",
    "failed to fetch upstream",
    "failed to fetch service",
    "failed to fetch plugin config",
    "failed to validate the 'vars' expression",
    "only one of remote_addr",
)
#: Who may name an object of each kind, and by which field: (kind, field).
USERS = {
    "upstreams": (("routes", "upstream_id"), ("services", "upstream_id")),
    "services": (("routes", "service_id"),),
    "plugin_configs": (("routes", "plugin_config_id"),),
}
#: APISIX's refusal to delete an object still named (admin/services.lua ...).
IN_USE = {
    "upstreams": "can not delete this upstream, %s [%s] is still using it now",
    "services": "can not delete this service directly, %s [%s] is still using it now",
    "plugin_configs": "can not delete this plugin config, %s [%s] is still using it now",
}


class AdminError(Exception):
    """
    A refused admin operation: the HTTP status and APISIX's message, sent
    as C{{"error_msg": message}} (or, with C{field}, under that name:
    APISIX answers a missing key with C{{"message": "Key not found"}}).
    """

    def __init__(self, status: int, message: str, field: str = "error_msg") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def not_found() -> AdminError:
    return AdminError(404, "Key not found", field="message")


@attr.frozen
class Entry:
    """One route or upstream as the admin API shows it."""

    kind: str
    id: str
    value: Mapping[str, Any]
    #: C{"file"} (owned by the configuration file, read-only) or C{"api"}.
    source: str = "api"
    #: The key prefix: C{etcd.prefix} with etcd, else APISIX's default.
    prefix: str = "/apisix"
    #: The revisions that created and last changed it (0 for the file's objects).
    created_index: int = 0
    modified_index: int = 0

    @property
    def key(self) -> str:
        """APISIX's etcd key, e.g. C{/apisix/routes/1}."""
        return "%s/%s/%s" % (self.prefix, self.kind, self.id)


def merge_patch(target: object, patch: object) -> object:
    """Apply an RFC 7396 JSON merge patch (a new value; inputs untouched)."""
    if not isinstance(patch, dict):
        return patch
    result: Dict[str, Any] = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def singular(kind: str) -> str:
    return kind[:-1]


def file_docs(doc: Mapping[str, Any], kind: str) -> List[Any]:
    docs = doc.get(kind) or []
    if not isinstance(docs, list):
        raise ConfigError('config: property "%s" validation failed: wrong type: expected array' % kind)
    return docs


def file_ids(doc: Mapping[str, Any], kind: str) -> List[str]:
    return [doc_id for doc_id, _ in file_items(doc, kind)]


def file_items(doc: Mapping[str, Any], kind: str) -> List[Tuple[str, Dict[str, Any]]]:
    """The file's objects of C{kind} with their ids (C{arr_<n>} for those without, as APISIX)."""
    return [
        (standalone_id(i) if d.get("id") is None else str(d["id"]), d)
        for i, d in enumerate(file_docs(doc, kind), 1)
        if isinstance(d, dict)
    ]


def replace_at(doc: Mapping[str, Any], path: Sequence[str], value: object) -> object:
    """
    C{doc} with what C{path} names replaced by C{value} (missing objects on
    the way are made), as APISIX's C{core.table.patch}.

    @raise AdminError: 400 C{invalid sub-path: /a/b} when the path crosses
        something that is not an object.
    """
    result: Dict[str, Any] = copy.deepcopy(dict(doc))
    node: Any = result
    for i, name in enumerate(path[:-1]):
        child = node.get(name)
        if child is None:
            child = node[name] = {}
        if not isinstance(child, dict):
            raise AdminError(400, "invalid sub-path: /" + "/".join(path[: i + 1]))
        node = child
    node[path[-1]] = value
    return result


def check_id(kind: str, doc_id: str) -> None:
    if not ID_RE.match(doc_id):
        raise AdminError(
            400,
            'invalid configuration: property "id" validation failed: %s id "%s" must be 1 to 64 '
            "letters, digits, '-', '_' or '.'" % (singular(kind), doc_id),
        )


def check_forbidden_times(doc: Mapping[str, Any]) -> None:
    """
    APISIX's C{check_forbidden_properties} for C{PUT} and C{POST}: the
    gateway sets C{create_time} and C{update_time} (a C{PATCH} may give them).
    """
    for where, inner in (("", doc), ("upstream.", doc.get("upstream")), ("plugins.", doc.get("plugins"))):
        if isinstance(inner, dict):
            for name in ("create_time", "update_time"):
                if inner.get(name) is not None:
                    raise AdminError(400, "the property is forbidden:  %s%s" % (where, name))


def stamp_times(value: Dict[str, Any], previous: Optional[Mapping[str, Any]], now: int, patch: bool = False) -> None:
    for name in ("create_time", "update_time"):
        stamp = value.get(name)
        if stamp is not None and (isinstance(stamp, bool) or not isinstance(stamp, int)):
            raise AdminError(
                400, 'invalid configuration: property "%s" validation failed: wrong type: expected integer' % name
            )
    # As APISIX: a client's own stamps are kept (restoring a backup), the
    # creation time survives updates, the update time is now.
    if "create_time" not in value:
        value["create_time"] = previous.get("create_time", now) if previous else now
    if patch or "update_time" not in value:
        value["update_time"] = now


def check_document(kind: str, value: Mapping[str, Any], conf: GatewayConf) -> None:
    """
    One object alone, against what C{conf} holds (the upstreams, services
    and plugin configs it may name), so its errors get APISIX's exact wording.

    @raise AdminError: 400.
    """
    try:
        if kind == "routes":
            parse_route(value, conf.upstreams, None, conf.services, conf.plugin_configs)
        elif kind == "services":
            parse_service(value, conf.upstreams)
        elif kind == "plugin_configs":
            parse_plugin_config(value)
        else:
            parse_upstream(value)
    except SchemaError as e:
        message = str(e)
        if not message.startswith(APISIX_WORDED):
            message = "invalid configuration: " + message
        raise AdminError(400, message)
