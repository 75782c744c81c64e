# -*- test-case-name: tests.admin.test_api,tests.admin.test_store,tests.admin.test_reload -*-
"""
The effective configuration and every way it changes at run time: admin API
writes, changes from etcd, and reloads of the configuration file (SIGHUP,
C{POST /apisix/admin/reload}).

The effective configuration (L{fauth.admin.effective}) is the file's
document with the store's objects appended, validated as a whole (so a
route from one side may name an upstream from the other).  A change is
validated completely first, its runtime built (L{Gateway.build}), then
written to the store, and only then installed with L{Gateway.update}: a
refused change (invalid, or one the runtime cannot be built from) leaves
both the store and the running table alone.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import attr
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from fauth.config import ConfigError, GatewayConf, RouteConf, read_document
from fauth.admin.effective import RESTART_ONLY, merge, parse_base
from fauth.admin.objects import (
    IN_USE,
    USERS,
    AdminError,
    Entry,
    check_document,
    check_forbidden_times,
    check_id,
    file_ids,
    file_items,
    merge_patch,
    not_found,
    replace_at,
    singular,
    stamp_times,
)
from fauth.admin.phases import Appliers, BuildError, one_line
from fauth.admin.sift import sift
from fauth.admin.store import KINDS, Store, StoreContents

__all__ = ["Control"]

log = Logger()

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
        self._phases = Appliers()
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
        """L{Appliers.on_change}: C{apply} gets every new effective configuration."""
        self._phases.on_change(apply, build)

    def on_outcome(self, listener: Callable[[str, str], None]) -> None:
        """L{Appliers.on_outcome}: C{listener} hears every reload's and store write's outcome."""
        self._phases.on_outcome(listener)

    # -- reads ---------------------------------------------------------------

    def _entry(self, kind: str, doc_id: str, value: Mapping[str, Any], source: str = "api") -> Entry:
        etcd = self.conf.etcd
        indexes = self.etcd.indexes if self.etcd is not None else self.contents.indexes
        created, modified = indexes.get((kind, doc_id), (0, 0))
        return Entry(kind, doc_id, value, source, etcd.prefix if etcd is not None else "/apisix", created, modified)

    def file_ids(self, kind: str) -> List[str]:
        """The ids of C{kind} the configuration file owns."""
        return file_ids(self.conf.source, kind)

    def get(self, kind: str, doc_id: str) -> Entry:
        """One route or upstream, from the file or the store."""
        for entry in self._file_entries(kind):
            if entry.id == doc_id:
                return entry
        value = self._stored(kind, doc_id)
        if value is None:
            raise not_found()
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
            for doc_id, d in file_items(self.conf.source, kind)
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
        check_forbidden_times(doc)
        if doc_id is None:
            if doc.get("id") is None:
                raise AdminError(400, "missing %s id" % singular(kind))
            doc_id = str(doc["id"])
        check_id(kind, doc_id)
        self._check_writable(kind, doc_id)
        if "id" in doc and str(doc["id"]) != doc_id:
            raise AdminError(400, "wrong %s id" % singular(kind))
        previous = self._stored(kind, doc_id)
        value = {"id": doc_id}
        value.update((k, v) for k, v in doc.items() if k != "id")
        stamp_times(value, previous, int(self._clock()))
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
            raise AdminError(400, "wrong %s id, do not need it" % singular(kind))
        check_forbidden_times(doc)
        doc_id = self._new_id()
        value = {"id": doc_id}
        value.update(doc)
        stamp_times(value, None, int(self._clock()))
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
        check_id(kind, doc_id)
        self._check_writable(kind, doc_id)
        previous = self._stored(kind, doc_id)
        if previous is None:
            raise not_found()
        if sub_path:
            merged = self._object(replace_at(previous, sub_path, patch))
        else:
            merged = self._object(merge_patch(previous, self._object(patch)))
        if "id" in merged and str(merged["id"]) != doc_id:
            raise AdminError(400, "wrong %s id" % singular(kind))
        value = {"id": doc_id}
        value.update((k, v) for k, v in merged.items() if k != "id")
        patched_stamp = not sub_path and isinstance(patch, dict) and "update_time" in patch
        stamp_times(value, previous, int(self._clock()), patch=not patched_stamp)
        return _then(self._commit(kind, doc_id, value, ttl), lambda: self._entry(kind, doc_id, value))

    def delete(self, kind: str, doc_id: str, force: bool = False) -> Entry:
        """
        Remove C{doc_id}; an upstream, service or plugin config still named
        by a route (or an upstream by a service) is kept, as APISIX keeps it
        (with etcd: a Deferred, as L{put}).  C{force} (APISIX's
        C{?force=true}) skips that check in APISIX; fauth still refuses a
        change that would leave a route without what it names, and says so.
        """
        check_id(kind, doc_id)
        self._check_writable(kind, doc_id)
        previous = self._stored(kind, doc_id)
        if previous is None:
            raise not_found()
        for user_kind, field in USERS.get(kind, ()):
            for user in self.list(user_kind):
                if field in user.value and str(user.value[field]) == doc_id:
                    message = IN_USE[kind] % (singular(user_kind), user.id)
                    if force:
                        message += " (fauth never serves a %s without what it names: change it first)" % (
                            singular(user_kind)
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
            log.info("admin API: {kind} {id} expired (ttl)", kind=singular(kind), id=doc_id)

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
                % (singular(kind), doc_id, where),
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
        check_document(kind, value, self.conf)
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
            built = self._phases.build(conf)
        except BuildError as e:
            raise AdminError(400, "invalid configuration: %s" % e)
        if self.etcd is not None:
            assert change is not None
            return self._write_etcd(conf, contents, built, change, ttl)
        assert self.store is not None
        try:
            self.store.save(contents)
        except OSError as e:
            log.error("admin change not saved to {path}: {error}", path=self.store.path, error=e)
            self._phases.report("store_write", "error")
            raise AdminError(500, "failed to write the store %s: %s" % (self.store.path, e.strerror or e))
        self.contents = contents
        self._phases.report("store_write", "ok")
        self.last_origin = "admin"
        try:
            self._apply(conf, built)
        except BuildError as e:
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
            self._phases.report("store_write", "ok")
            # With objects skipped, re-sift: the change may make them valid.
            if self.contents is before and not self.skipped:
                self.contents = contents
                self.last_origin = "admin"
                try:
                    self._apply(conf, built)
                except BuildError as e:
                    raise AdminError(500, "saved, but not applied: %s" % e)
            else:
                # The watch changed the table meanwhile (or objects wait
                # in skipped): apply onto that.
                self.apply_remote([change], origin="admin")

        def failed(failure: Failure) -> None:
            from fauth.admin.etcdclient import EtcdError, EtcdUnavailable

            failure.trap(EtcdUnavailable, EtcdError, Exception)
            self._phases.report("store_write", "error")
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
                        kind=singular(key[0]),
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
            built = self._phases.build(conf)
            self.placeholders = sifted.placeholders
            self.contents = sifted.contents
            self.skipped = dict(sifted.skipped)
            self.reasons = dict(sifted.reasons)
            self.last_origin = origin
            self._apply(conf, built)
            for kind, doc_id in recovered:
                log.info("etcd: {kind} {id} is valid now and runs", kind=singular(kind), id=doc_id)
        except Exception:
            log.failure("etcd: changes could not be applied; the running table is kept")

    def _remote(self) -> StoreContents:
        """Everything etcd holds as last seen: the objects that validate and those that do not."""
        raw = self.contents
        for (kind, doc_id), doc in self.skipped.items():
            raw = raw.with_doc(kind, doc_id, doc)
        return raw

    def _apply(self, conf: GatewayConf, built: List[Any]) -> None:
        self._phases.install(conf, built, self._record)

    def _record(self, conf: GatewayConf) -> None:
        self.conf = conf

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
                built = self._phases.build(conf)
            except (ConfigError, BuildError):
                raise
            except Exception as e:
                log.failure("reload: unexpected error")
                raise ConfigError("config: reload failed: %s" % one_line(e))
        except BuildError as e:
            error = ConfigError("config: %s" % e)
            log.warn("reload refused: {error}", error=str(error))
            self._phases.report("reload", "refused")
            raise error
        except ConfigError as e:
            log.warn("reload refused: {error}", error=str(e))
            self._phases.report("reload", "refused")
            raise
        if changed:
            log.warn(
                "reload: changes to {sections} need a restart; ignored", sections=", ".join(changed)
            )
        self.last_origin = "reload"
        try:
            self._apply(conf, built)
        except BuildError as e:
            error = ConfigError("config: %s" % e)
            log.warn("reload refused: {error}", error=str(error))
            self._phases.report("reload", "refused")
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
        self._phases.report("reload", "ok")
        return conf
