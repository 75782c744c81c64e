# -*- test-case-name: tests.admin.test_api,tests.admin.test_store,tests.admin.test_reload -*-
"""
The effective configuration and every way it changes at run time: admin API
writes, and reloads of the configuration file (SIGHUP, C{POST
/apisix/admin/reload}).

The effective configuration is the file's document with the store's routes
and upstreams appended, validated as a whole with L{parse_config} (so a
route from one side may name an upstream from the other).  A change is
validated completely first, its runtime built (L{Gateway.build}), then
written to the store, and only then installed with L{Gateway.update}: a
refused change (invalid, or one the runtime cannot be built from) leaves
both the store and the running table alone.
"""
from __future__ import annotations

import copy
import os
import re
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import attr
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from fauth.config import (
    ConfigError,
    GatewayConf,
    RouteConf,
    parse_config,
    parse_plugin_config,
    parse_route,
    parse_service,
    parse_upstream,
    read_document,
)
from fauth.config.document import standalone_id
from fauth.config.schema import SchemaError
from fauth.admin.sift import sift
from fauth.admin.store import KINDS, Store, StoreContents

__all__ = ["AdminError", "Control", "Entry", "KINDS", "merge_patch"]

log = Logger()

#: The admin API's resource types, as in its URLs.
#: Sections a reload cannot change in a running process.
RESTART_ONLY = ("listen", "admin", "demo", "http", "ssl_trusted_certificate", "workers", "etcd")

# APISIX's id schema: a string of 1-64 of these, or a positive integer.
_ID_RE = re.compile(r"[a-zA-Z0-9\-_.]{1,64}\Z")
_LABEL_RE = re.compile(r'^(route|upstream|service|plugin_config) "([^"]*)": ')
# Messages parse_route already words as APISIX's admin API does.
_APISIX_WORDED = (
    "failed to check the configuration of plugin",
    "unknown plugin",
    "failed to fetch upstream",
    "failed to fetch service",
    "failed to fetch plugin config",
    "failed to validate the 'vars' expression",
    "only one of remote_addr",
)
#: Who may name an object of each kind, and by which field: (kind, field).
_USERS = {
    "upstreams": (("routes", "upstream_id"), ("services", "upstream_id")),
    "services": (("routes", "service_id"),),
    "plugin_configs": (("routes", "plugin_config_id"),),
}
#: APISIX's refusal to delete an object still named (admin/services.lua ...).
_IN_USE = {
    "upstreams": "can not delete this upstream, %s [%s] is still using it now",
    "services": "can not delete this service directly, %s [%s] is still using it now",
    "plugin_configs": "can not delete this plugin config, %s [%s] is still using it now",
}


class _BuildError(Exception):
    """The runtime could not be built from (or install) a valid configuration."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return "%s: %s" % (type(e).__name__, text) if text else type(e).__name__


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


def _not_found() -> AdminError:
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


def _singular(kind: str) -> str:
    return kind[:-1]


def _file_docs(doc: Mapping[str, Any], kind: str) -> List[Any]:
    docs = doc.get(kind) or []
    if not isinstance(docs, list):
        raise ConfigError('config: property "%s" validation failed: wrong type: expected array' % kind)
    return docs


def _file_ids(doc: Mapping[str, Any], kind: str) -> List[str]:
    return [doc_id for doc_id, _ in _file_items(doc, kind)]


def _file_items(doc: Mapping[str, Any], kind: str) -> List[Tuple[str, Dict[str, Any]]]:
    """The file's objects of C{kind} with their ids (C{arr_<n>} for those without, as APISIX)."""
    return [
        (standalone_id(i) if d.get("id") is None else str(d["id"]), d)
        for i, d in enumerate(_file_docs(doc, kind), 1)
        if isinstance(d, dict)
    ]


def _then(outcome: Optional["Deferred[Any]"], result: Any) -> Any:
    """
    C{result} (called first when callable: an entry made after the write
    knows its indexes), or a Deferred firing with it once C{outcome} (an
    etcd write) succeeded.
    """
    make = result if callable(result) else lambda: result
    if outcome is None:
        return make()
    return outcome.addCallback(lambda _: make())


def _replace_at(doc: Mapping[str, Any], path: Sequence[str], value: object) -> object:
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
        file_docs = _file_docs(doc, kind)
        owned = set(_file_ids(doc, kind))
        for doc_id in contents.of(kind):
            if doc_id in owned:
                raise ConfigError(
                    'store %s: %s "%s" is also defined in the configuration file; remove it from one of them'
                    % (store_path or "", _singular(kind), doc_id)
                )
        docs[kind] = list(file_docs) + list(contents.of(kind).values())
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
        _file_docs(doc, kind)
    base = parse_config(dict(doc, **{kind: [] for kind in KINDS}))
    return attr.evolve(base, source=doc)


def _check_id(kind: str, doc_id: str) -> None:
    if not _ID_RE.match(doc_id):
        raise AdminError(
            400,
            'invalid configuration: property "id" validation failed: %s id "%s" must be 1 to 64 '
            "letters, digits, '-', '_' or '.'" % (_singular(kind), doc_id),
        )


def _check_forbidden_times(doc: Mapping[str, Any]) -> None:
    """
    APISIX's C{check_forbidden_properties} for C{PUT} and C{POST}: the
    gateway sets C{create_time} and C{update_time} (a C{PATCH} may give them).
    """
    for where, inner in (("", doc), ("upstream.", doc.get("upstream")), ("plugins.", doc.get("plugins"))):
        if isinstance(inner, dict):
            for name in ("create_time", "update_time"):
                if inner.get(name) is not None:
                    raise AdminError(400, "the property is forbidden:  %s%s" % (where, name))


def _timestamps(value: Dict[str, Any], previous: Optional[Mapping[str, Any]], now: int, patch: bool = False) -> None:
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


class Control:
    """
    Owns the effective configuration of a running gateway and changes it.

    @param conf: the effective configuration (see L{from_document}).
    @param store: where admin changes go, or C{None} without C{admin}.
    @param contents: what the store held when C{conf} was built.
    @param config_path: the file reloads read, if any.
    @param clock: seconds since the epoch (for C{create_time}/C{update_time}).
    @ivar conf: the effective L{GatewayConf}, as last applied.
    @ivar contents: the store's documents, as last written.
    @ivar reload_store: whether L{reload} re-reads the store file too (a
        worker of C{--workers N}: its supervisor's admin API writes it).
    @ivar etcd: with an C{etcd} section, the L{fauth.admin.etcd.EtcdSync}
        that keeps C{contents} etcd's and takes the admin API's writes
        (set by it); C{store} is then C{None}, and the write methods return
        Deferreds.
    @ivar last_origin: what made the last applied change: C{"reload"},
        C{"admin"} or C{"etcd"} (a supervisor with etcd signals its
        workers only after a reload: they watch etcd themselves).
    """

    def __init__(
        self,
        conf: GatewayConf,
        store: Optional[Store] = None,
        contents: StoreContents = StoreContents(),
        config_path: Optional[str] = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.conf = conf
        self.store = store
        self.contents = contents
        self.config_path = config_path
        self._clock = clock
        self._appliers: List[Tuple[Callable[..., None], Optional[Callable[[GatewayConf], Any]]]] = []
        self._outcome_listeners: List[Callable[[str, str], None]] = []
        self._last_id = 0
        self.reload_store = False
        self.etcd: Any = None
        self.last_origin = "reload"
        #: Objects read from etcd that did not validate, by (kind, id).
        self.skipped: Dict[Tuple[str, str], Any] = {}
        #: Why, by (kind, id).
        self.reasons: Dict[Tuple[str, str], str] = {}
        #: The fail-closed stand-ins of the skipped routes (503), part of
        #: every effective configuration until a valid version arrives.
        self.placeholders: Tuple[RouteConf, ...] = ()

    @classmethod
    def from_document(cls, doc: object, config_path: Optional[str] = None) -> "Control":
        """
        Validate a configuration document, load the store its C{admin}
        section names, and build the effective configuration.

        @raise ConfigError: one line; errors in the store name its file.
        """
        base = parse_base(doc)
        # With etcd the admin API writes there: no store file is read or written.
        store = Store(base.admin.store) if base.admin is not None and base.etcd is None else None
        contents = store.load() if store is not None else StoreContents()
        conf = merge(base, contents, store.path if store is not None else None)
        return cls(conf, store, contents, config_path)

    @classmethod
    def from_file(cls, path: str) -> "Control":
        """L{from_document} on the file at C{path}; reloads re-read it."""
        # Absolute: reloads must find it even after twistd changed directory.
        return cls.from_document(read_document(path), config_path=os.path.abspath(path))

    @classmethod
    def from_conf(cls, conf: GatewayConf) -> "Control":
        """
        For a configuration parsed by the caller: with C{admin}, its
        C{source} document is merged with the store; without, it is used as
        it is (nothing to merge, nothing to reload).
        """
        if conf.admin is None:
            return cls(conf)
        return cls.from_document(conf.source)

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

    def _report(self, event: str, result: str) -> None:
        for listener in self._outcome_listeners:
            try:
                listener(event, result)
            except Exception:
                log.failure("{event} listener failed", event=event)

    # -- reads ---------------------------------------------------------------

    def _entry(self, kind: str, doc_id: str, value: Mapping[str, Any], source: str = "api") -> Entry:
        etcd = self.conf.etcd
        indexes = self.etcd.indexes if self.etcd is not None else self.contents.indexes
        created, modified = indexes.get((kind, doc_id), (0, 0))
        return Entry(kind, doc_id, value, source, etcd.prefix if etcd is not None else "/apisix", created, modified)

    def file_ids(self, kind: str) -> List[str]:
        """The ids of C{kind} the configuration file owns."""
        return _file_ids(self.conf.source, kind)

    def get(self, kind: str, doc_id: str) -> Entry:
        """One route or upstream, from the file or the store."""
        for entry in self._file_entries(kind):
            if entry.id == doc_id:
                return entry
        value = self._stored(kind, doc_id)
        if value is None:
            raise _not_found()
        return self._entry(kind, doc_id, value)

    def _stored(self, kind: str, doc_id: str) -> Optional[Mapping[str, Any]]:
        """The store's document, or etcd's that did not validate (it is there all the same)."""
        value = self.contents.of(kind).get(doc_id)
        return value if value is not None else self.skipped.get((kind, doc_id))

    def list(self, kind: str) -> List[Entry]:
        """The file's, then the store's (then etcd's that do not validate), in configuration order."""
        stored = [self._entry(kind, doc_id, value) for doc_id, value in self.contents.of(kind).items()]
        stored += [self._entry(k, doc_id, value) for (k, doc_id), value in self.skipped.items() if k == kind]
        return self._file_entries(kind) + stored

    def _file_entries(self, kind: str) -> List[Entry]:
        return [
            self._entry(kind, doc_id, d if "id" in d else dict(d, id=doc_id), "file")
            for doc_id, d in _file_items(self.conf.source, kind)
        ]

    # -- writes --------------------------------------------------------------

    def put(self, kind: str, doc_id: Optional[str], body: object, ttl: Optional[float] = None) -> Tuple[bool, Entry]:
        """
        Create or replace C{doc_id} (C{None}: the id the body holds, as
        APISIX's C{PUT /apisix/admin/routes}).

        @param ttl: seconds after which the object is deleted (APISIX's
            C{?ttl=}: an etcd lease; the store file keeps the time).
        @return: whether it was created, and the stored entry; with etcd, a
            Deferred firing with them once etcd took the change (failing
            with L{AdminError}, 503 while etcd is unavailable).
        @raise AdminError: refused; nothing changed.
        """
        doc = self._object(body)
        _check_forbidden_times(doc)
        if doc_id is None:
            if doc.get("id") is None:
                raise AdminError(400, "missing %s id" % _singular(kind))
            doc_id = str(doc["id"])
        _check_id(kind, doc_id)
        self._check_writable(kind, doc_id)
        if "id" in doc and str(doc["id"]) != doc_id:
            raise AdminError(400, "wrong %s id" % _singular(kind))
        previous = self._stored(kind, doc_id)
        value = {"id": doc_id}
        value.update((k, v) for k, v in doc.items() if k != "id")
        _timestamps(value, previous, int(self._clock()))
        return _then(
            self._commit(kind, doc_id, value, ttl), lambda: (previous is None, self._entry(kind, doc_id, value))
        )

    def create(self, kind: str, body: object, ttl: Optional[float] = None) -> Entry:
        """C{POST}: store under a generated id (with etcd: a Deferred, as L{put})."""
        self._check_loaded()
        if kind == "plugin_configs":
            # APISIX's plugin_configs have no POST (unsupported_methods).
            raise AdminError(405, "not supported `POST` method for plugin config")
        doc = self._object(body)
        if "id" in doc:
            raise AdminError(400, "wrong %s id, do not need it" % _singular(kind))
        _check_forbidden_times(doc)
        doc_id = self._new_id()
        value = {"id": doc_id}
        value.update(doc)
        _timestamps(value, None, int(self._clock()))
        return _then(self._commit(kind, doc_id, value, ttl), lambda: self._entry(kind, doc_id, value))

    def patch(
        self, kind: str, doc_id: str, patch: object, sub_path: Sequence[str] = (), ttl: Optional[float] = None
    ) -> Entry:
        """
        C{PATCH}: an RFC 7396 merge patch of the stored document or, with
        C{sub_path} (C{PATCH /routes/1/upstream/nodes}), C{patch} put in
        place of what that path holds, as APISIX; then full validation (with
        etcd: a Deferred, as L{put}).
        """
        _check_id(kind, doc_id)
        self._check_writable(kind, doc_id)
        previous = self._stored(kind, doc_id)
        if previous is None:
            raise _not_found()
        if sub_path:
            merged = self._object(_replace_at(previous, sub_path, patch))
        else:
            merged = self._object(merge_patch(previous, self._object(patch)))
        if "id" in merged and str(merged["id"]) != doc_id:
            raise AdminError(400, "wrong %s id" % _singular(kind))
        value = {"id": doc_id}
        value.update((k, v) for k, v in merged.items() if k != "id")
        patched_stamp = not sub_path and isinstance(patch, dict) and "update_time" in patch
        _timestamps(value, previous, int(self._clock()), patch=not patched_stamp)
        return _then(self._commit(kind, doc_id, value, ttl), lambda: self._entry(kind, doc_id, value))

    def delete(self, kind: str, doc_id: str, force: bool = False) -> Entry:
        """
        Remove C{doc_id}; an upstream, service or plugin config still named
        by a route (or an upstream by a service) is kept, as APISIX keeps it
        (with etcd: a Deferred, as L{put}).  C{force} (APISIX's
        C{?force=true}) skips that check in APISIX; fauth still refuses a
        change that would leave a route without what it names, and says so.
        """
        _check_id(kind, doc_id)
        self._check_writable(kind, doc_id)
        previous = self._stored(kind, doc_id)
        if previous is None:
            raise _not_found()
        for user_kind, field in _USERS.get(kind, ()):
            for user in self.list(user_kind):
                if field in user.value and str(user.value[field]) == doc_id:
                    message = _IN_USE[kind] % (_singular(user_kind), user.id)
                    if force:
                        message += " (fauth never serves a %s without what it names: change it first)" % (
                            _singular(user_kind)
                        )
                    raise AdminError(400, message)
        entry = self._entry(kind, doc_id, previous)
        contents = self.contents
        if doc_id in contents.of(kind):
            contents = contents.without(kind, doc_id)
        return _then(self._save_and_apply(self._effective(contents), contents, (kind, doc_id, None)), entry)

    def next_expiry(self) -> Optional[float]:
        """Seconds until the first stored object's C{?ttl=} runs out (0 if past), or C{None}."""
        if not self.contents.expires:
            return None
        return max(0.0, min(self.contents.expires.values()) - self._clock())

    def expire(self) -> None:
        """
        Delete every stored object whose C{?ttl=} ran out (the store file's;
        etcd deletes its leased keys itself), in one change.  Never raises
        (a timer calls it).
        """
        now = self._clock()
        due = [key for key, when in self.contents.expires.items() if when <= now]
        if not due or self.store is None:
            return
        contents = self.contents
        for kind, doc_id in due:
            contents = contents.without(kind, doc_id)
        try:
            self._save_and_apply(self._effective(contents), contents)
        except AdminError as e:
            log.error("expired objects not removed: {error}", error=e.message)
            return
        for kind, doc_id in due:
            log.info("admin API: {kind} {id} expired (ttl)", kind=_singular(kind), id=doc_id)

    def _check_loaded(self) -> None:
        # Validating against a table that lacks etcd's objects would refuse
        # (or allow) the wrong changes.
        if self.etcd is not None and self.etcd.revision is None:
            raise AdminError(503, "etcd is unavailable, nothing was changed: its objects are not loaded yet")

    def _check_writable(self, kind: str, doc_id: str) -> None:
        self._check_loaded()
        if self.store is None and self.etcd is None:
            raise AdminError(400, "the admin API is not configured (no admin section)")
        if doc_id in self.file_ids(kind):
            where = " " + self.config_path if self.config_path else ""
            raise AdminError(
                409,
                "%s %s is defined in the configuration file%s; edit the file and reload"
                % (_singular(kind), doc_id, where),
            )

    @staticmethod
    def _object(body: object) -> Dict[str, Any]:
        if not isinstance(body, dict):
            raise AdminError(400, "invalid configuration: wrong type: expected object")
        return body

    def _new_id(self) -> str:
        # Time-based and increasing, so a deleted id is not handed out again
        # (clients may still hold it); unique against every known id.
        taken = {doc_id for kind in KINDS for doc_id in self.contents.of(kind)}
        taken.update(doc_id for kind in KINDS for doc_id in self.file_ids(kind))
        taken.update(doc_id for _, doc_id in self.skipped)
        candidate = max(int(self._clock() * 1000000), self._last_id + 1)
        while str(candidate) in taken:
            candidate += 1
        self._last_id = candidate
        return str(candidate)

    def _commit(
        self, kind: str, doc_id: str, value: Dict[str, Any], ttl: Optional[float] = None
    ) -> Optional[Deferred]:
        # The document alone first: its errors get APISIX's exact wording.
        conf = self.conf
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
            if not message.startswith(_APISIX_WORDED):
                message = "invalid configuration: " + message
            raise AdminError(400, message)
        expires = None if ttl is None else self._clock() + ttl
        contents = self.contents.with_doc(kind, doc_id, value, expires)
        return self._save_and_apply(self._effective(contents), contents, (kind, doc_id, value), ttl)

    def _effective(self, contents: StoreContents) -> GatewayConf:
        try:
            return self._fail_closed(merge(self.conf, contents))
        except ConfigError as e:
            raise AdminError(400, str(e))

    def _fail_closed(self, conf: GatewayConf) -> GatewayConf:
        """C{conf} with the placeholders of the routes that cannot run, but none a valid route replaced."""
        valid = {route.id for route in conf.routes}
        held = tuple(p for p in self.placeholders if p.id not in valid)
        return attr.evolve(conf, routes=conf.routes + held) if held else conf

    def _save_and_apply(
        self,
        conf: GatewayConf,
        contents: StoreContents,
        change: Optional[Tuple[str, str, Any]] = None,
        ttl: Optional[float] = None,
    ) -> Optional["Deferred[None]"]:
        try:
            built = self._build(conf)
        except _BuildError as e:
            raise AdminError(400, "invalid configuration: %s" % e)
        if self.etcd is not None:
            assert change is not None
            return self._write_etcd(conf, contents, built, change, ttl)
        assert self.store is not None
        try:
            self.store.save(contents)
        except OSError as e:
            log.error("admin change not saved to {path}: {error}", path=self.store.path, error=e)
            self._report("store_write", "error")
            raise AdminError(500, "failed to write the store %s: %s" % (self.store.path, e.strerror or e))
        self.contents = contents
        self._report("store_write", "ok")
        self.last_origin = "admin"
        try:
            self._apply(conf, built)
        except _BuildError as e:
            raise AdminError(500, "saved, but not applied: %s" % e)
        return None

    def _write_etcd(
        self,
        conf: GatewayConf,
        contents: StoreContents,
        built: List[Any],
        change: Tuple[str, str, Any],
        ttl: Optional[float] = None,
    ) -> "Deferred[None]":
        """
        Write one validated change to etcd (one put or delete: all or
        nothing), then serve it here at once; the watch brings it back later
        and, finding it applied, does nothing.
        """
        before = self.contents

        def written(_: object) -> None:
            self._report("store_write", "ok")
            # With objects skipped, re-sift: the change may make them valid.
            if self.contents is before and not self.skipped:
                self.contents = contents
                self.last_origin = "admin"
                try:
                    self._apply(conf, built)
                except _BuildError as e:
                    raise AdminError(500, "saved, but not applied: %s" % e)
            else:
                # The watch changed the table meanwhile (or objects wait
                # in skipped): apply onto that.
                self.apply_remote([change], origin="admin")

        def failed(failure: Failure) -> None:
            from fauth.admin.etcd import EtcdError, EtcdUnavailable

            failure.trap(EtcdUnavailable, EtcdError, Exception)
            self._report("store_write", "error")
            log.error("admin change not written to etcd: {error}", error=str(failure.value))
            if failure.check(EtcdUnavailable):
                raise AdminError(503, "etcd is unavailable, nothing was changed: %s" % failure.value)
            raise AdminError(503, "etcd refused the change, nothing was changed: %s" % failure.value)

        return self.etcd.write(*change, ttl=ttl).addCallbacks(written, failed)

    # -- changes from etcd -----------------------------------------------------

    def apply_remote(self, changes: List[Tuple[str, str, Any]], replace: bool = False, origin: str = "etcd") -> None:
        """
        Apply changes read from etcd (C{(kind, id, document or None)}, in
        etcd's order).  Every object is validated (L{fauth.admin.sift}):
        those that do not validate are logged and left out, and a route
        among them stays in the table as a placeholder answering 503 (fail
        closed) until a valid version arrives; an object is tried again
        with every later change (a route waiting for its upstream is taken
        once the upstream arrives).  Never raises (a watcher calls it).

        @param replace: C{changes} is the whole of etcd's contents (a
            listing), not changes to the current one.
        """
        try:
            raw = StoreContents() if replace else self._remote()
            for kind, doc_id, doc in changes:
                if doc is None:
                    if doc_id in raw.of(kind):
                        raw = raw.without(kind, doc_id)
                else:
                    raw = raw.with_doc(kind, doc_id, doc)
            if changes and not replace and raw == self._remote():
                return
            previous = {route.id: route for route in self.conf.routes}
            sifted = sift(merge(self.conf, StoreContents()), raw, previous)
            held = {route.id for route in sifted.placeholders}
            for key, reason in sifted.reasons.items():
                if self.reasons.get(key) != reason:
                    log.warn(
                        "etcd: {kind} {id} {what}: {error}",
                        kind=_singular(key[0]),
                        id=key[1],
                        what="cannot run and answers 503 until a valid version arrives"
                        if key[0] == "routes" and key[1] in held
                        else "skipped",
                        error=reason,
                    )
            recovered = [
                key for key in self.reasons if key not in sifted.reasons and key[1] in sifted.contents.of(key[0])
            ]
            # Each object was parsed once by sift: its configuration is served as it is.
            conf = sifted.conf
            built = self._build(conf)
            self.placeholders = sifted.placeholders
            self.contents = sifted.contents
            self.skipped = dict(sifted.skipped)
            self.reasons = dict(sifted.reasons)
            self.last_origin = origin
            self._apply(conf, built)
            for kind, doc_id in recovered:
                log.info("etcd: {kind} {id} is valid now and runs", kind=_singular(kind), id=doc_id)
        except Exception:
            log.failure("etcd: changes could not be applied; the running table is kept")

    def _remote(self) -> StoreContents:
        """Everything etcd holds as last seen: the objects that validate and those that do not."""
        raw = self.contents
        for (kind, doc_id), doc in self.skipped.items():
            raw = raw.with_doc(kind, doc_id, doc)
        return raw

    def _build(self, conf: GatewayConf) -> List[Any]:
        """
        Phase one: every two-phase applier's runtime for C{conf}, nothing
        installed.

        @raise _BuildError: one line; the traceback is logged.
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
                raise _BuildError("the gateway cannot run it: %s" % _one_line(e))
        return built

    def _apply(self, conf: GatewayConf, built: List[Any]) -> None:
        """
        Phase two: install what L{_build} made, then (the new runtime
        serving) record C{conf} and tell the one-phase appliers.

        @raise _BuildError: installing failed (logged); C{conf} not recorded.
        """
        for (apply, build), runtime in zip(self._appliers, built):
            if build is not None:
                try:
                    apply(conf, runtime)
                except Exception as e:
                    log.failure("installing the new configuration failed")
                    raise _BuildError("installing it failed: %s" % _one_line(e))
        self.conf = conf
        for apply, build in self._appliers:
            if build is None:
                try:
                    apply(conf)
                except Exception:
                    log.failure("a configuration change listener failed")

    # -- reload --------------------------------------------------------------

    def reload(self) -> GatewayConf:
        """
        Re-read the configuration file: a valid one (merged with the store)
        replaces the route table; an invalid one is refused, the reason
        logged as C{reload refused: <reason>}, and the running table kept.
        Sections in L{RESTART_ONLY} keep their running values.  With
        L{reload_store}, the store file is read again too.

        @raise ConfigError: the refusal.
        """
        # A signal handler calls this: nothing but ConfigError may escape.
        try:
            try:
                if self.config_path is None:
                    raise ConfigError("config: the gateway was not started from a file; nothing to reload")
                doc = read_document(self.config_path)
                base = parse_base(doc)
                contents = self.contents
                if self.reload_store and self.store is not None:
                    contents = self.store.load()
                conf = self._fail_closed(merge(base, contents, self.store.path if self.store is not None else None))
                changed = [name for name in RESTART_ONLY if getattr(conf, name) != getattr(self.conf, name)]
                conf = attr.evolve(conf, **{name: getattr(self.conf, name) for name in RESTART_ONLY})
                built = self._build(conf)
            except (ConfigError, _BuildError):
                raise
            except Exception as e:
                log.failure("reload: unexpected error")
                raise ConfigError("config: reload failed: %s" % _one_line(e))
        except _BuildError as e:
            error = ConfigError("config: %s" % e)
            log.warn("reload refused: {error}", error=str(error))
            self._report("reload", "refused")
            raise error
        except ConfigError as e:
            log.warn("reload refused: {error}", error=str(e))
            self._report("reload", "refused")
            raise
        if changed:
            log.warn(
                "reload: changes to {sections} need a restart; ignored", sections=", ".join(changed)
            )
        self.last_origin = "reload"
        try:
            self._apply(conf, built)
        except _BuildError as e:
            error = ConfigError("config: %s" % e)
            log.warn("reload refused: {error}", error=str(error))
            self._report("reload", "refused")
            raise error
        self.contents = contents
        if self.etcd is not None and self.skipped:
            # What etcd holds that did not validate may now (or the reverse).
            self.apply_remote([], origin="reload")
        log.info(
            "reloaded {path}: {routes} routes, {stored} of them from the admin store",
            path=self.config_path,
            routes=len(conf.routes),
            stored=len(self.contents.routes),
        )
        self._report("reload", "ok")
        return conf
