# -*- test-case-name: tests.admin.test_etcd -*-
"""
Routes, upstreams, services and plugin configs shared by several gateways
through etcd, in APISIX's key layout: C{<prefix>/routes/<id>},
C{<prefix>/upstreams/<id>}, C{<prefix>/services/<id>},
C{<prefix>/plugin_configs/<id>}, each
value the JSON object APISIX stores (C{id}, the object's fields,
C{create_time}, C{update_time}).

L{fauth.admin.etcdclient.EtcdClient} speaks etcd's v3 JSON gateway.

L{EtcdSync} is the service every gateway process runs: it lists the prefix,
hands the objects to L{Control.apply_remote}, then watches from the next
revision.  When etcd goes away the gateway keeps its last table, retries
with a growing delay, and on return resumes the watch from its revision (or
lists again when etcd compacted that revision away).  It is also how the
admin API writes (L{EtcdSync.write}).
"""
from __future__ import annotations

import json
import random
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure

from fauth.admin.etcdclient import EtcdClient, EtcdError, describe, unb64
from fauth.admin.store import KINDS

__all__ = ["EtcdCollector", "EtcdSync", "Change", "parse_event"]

log = Logger()

#: First delay (seconds) before retrying after etcd failed; doubled per
#: failure in a row up to L{MAX_RETRY_DELAY}, each then drawn between half
#: and all of it.  Small, because a gateway catching up late serves a stale
#: table meanwhile, and a refused connection costs etcd nothing.
RETRY_DELAY = 0.1
MAX_RETRY_DELAY = 1.0

#: One change to apply: kind, id, the document (C{None}: deleted).
Change = Tuple[str, str, Optional[Dict[str, Any]]]


def parse_event(prefix: str, key: bytes, value: Optional[bytes]) -> Optional[Change]:
    """
    The change an etcd key and value stand for, or C{None} for keys that are
    not a route, upstream, service or plugin config (APISIX keeps other
    objects under the prefix too: ssls, consumers, global rules, which fauth
    does not use).

    @param value: C{None} for a deletion.
    @raise ValueError: the value is not a JSON object of that id (logged
        and skipped by the caller).
    """
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.startswith(prefix + "/"):
        return None
    kind, _, doc_id = text[len(prefix) + 1 :].partition("/")
    # "<prefix>/routes/" alone is the empty directory marker older APISIX writes.
    if kind not in KINDS or not doc_id or "/" in doc_id:
        return None
    if value is None:
        return (kind, doc_id, None)
    try:
        doc = json.loads(value.decode("utf-8"))
    except ValueError as e:
        raise ValueError("not JSON: %s" % e)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if "id" in doc and str(doc["id"]) != doc_id:
        raise ValueError('its "id" is %s, not the key\'s %s' % (json.dumps(doc["id"]), doc_id))
    doc = dict(doc, id=doc_id)
    return (kind, doc_id, doc)


class EtcdSync(Service):
    """
    Keeps a L{Control}'s stored routes and upstreams those of etcd, and is
    where its admin API writes (it sets C{control.etcd} to itself).

    @param reactor: for timers and connections.
    @param control: whose C{conf.etcd} names the cluster.
    @param client: an L{EtcdClient}; one of C{conf.etcd} by default.
    @ivar revision: the etcd revision the table reflects, or C{None}
        before the first listing.
    @ivar down_since: when etcd was found unreachable (C{time.time()}),
        or C{None} while the watch runs.
    """

    def __init__(self, reactor: Any, control: Any, client: Optional[EtcdClient] = None) -> None:
        conf = control.conf.etcd
        if conf is None:
            raise ValueError("no etcd section")
        self._reactor = reactor
        self.control = control
        self.conf = conf
        self.client = client if client is not None else EtcdClient(conf, reactor)
        self.revision: Optional[int] = None
        #: C{(kind, id)}: the C{create_revision} and C{mod_revision} of its key
        #: (APISIX's C{createdIndex} and C{modifiedIndex}).
        self.indexes: Dict[Tuple[str, str], Tuple[int, int]] = {}
        self.down_since: Optional[float] = time.time()
        self.watching = False
        self.last_error = "not connected yet"
        self.failures = 0
        #: How many times the prefix was listed (start-up, compactions).
        self.listings = 0
        #: Called with no argument after the table or the watch's state
        #: changed (a worker tells its supervisor).
        self.listeners: List[Callable[[], None]] = []
        self._pending: Optional[Deferred[Any]] = None
        self._retry: Any = None
        control.etcd = self

    # -- the admin API's writes ---------------------------------------------

    def key(self, kind: str, doc_id: str) -> str:
        """C{<prefix>/<kind>/<id>}."""
        return "%s/%s/%s" % (self.conf.prefix, kind, doc_id)

    def write(
        self, kind: str, doc_id: str, value: Optional[Dict[str, Any]], ttl: Optional[float] = None
    ) -> "Deferred[int]":
        """
        Put (or, C{value} C{None}, delete) one object; one etcd request, so
        all or nothing (with C{ttl}, a lease is granted first: an object
        is never written without the lease it was asked with).
        """
        key = self.key(kind, doc_id)
        if value is None:
            return self.client.delete(key).addCallback(self._indexed, kind, doc_id, False)
        data = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
        return self.client.put(key, data, ttl).addCallback(self._indexed, kind, doc_id, True)

    def _indexed(self, revision: int, kind: str, doc_id: str, present: bool) -> int:
        # The watch brings the same revisions later; the admin API's answer needs them now.
        if present:
            created = self.indexes.get((kind, doc_id), (revision, revision))[0]
            self.indexes[(kind, doc_id)] = (created, revision)
        else:
            self.indexes.pop((kind, doc_id), None)
        return revision

    # -- health --------------------------------------------------------------

    def status(self) -> str:
        """One line for C{/healthz}, naming the routes that cannot run (they answer 503)."""
        failing = [route.id for route in self.control.placeholders]
        if not failing:
            return self._watch_status()
        return "%s; routes answering 503 until a valid version arrives (see the log): %s" % (
            self._watch_status(),
            ", ".join(failing),
        )

    def _watch_status(self) -> str:
        if self.watching:
            return "etcd: watching %s%s at revision %s" % (self.client.host, self.conf.prefix, self.revision)
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.down_since or time.time()))
        if self.revision is None:
            return "etcd: not loaded yet (unreachable since %s, %d attempts: %s); serving the file's routes only" % (
                since,
                self.failures,
                self.last_error,
            )
        return "etcd: unreachable since %s (%d attempts: %s); serving the last table, revision %d" % (
            since,
            self.failures,
            self.last_error,
            self.revision,
        )

    # -- the loop ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self._run)

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._pending is not None:
            self._pending.cancel()
        return self.client.close()

    def _run(self) -> None:
        self._retry = None
        if not self.running:
            return
        self._pending = self._cycle()
        self._pending.addErrback(self._failed)

    @inlineCallbacks
    def _cycle(self) -> Any:
        if self.revision is None:
            revision, kvs = yield self.client.list(self.conf.prefix)
            changes = []
            indexes = {}
            for key, value, created, modified in kvs:
                change = self._parse(key, value)
                if change is not None:
                    changes.append(change)
                    indexes[(change[0], change[1])] = (created, modified)
            self.indexes = indexes
            self.control.apply_remote(changes, replace=True, origin="etcd")
            self.revision = revision
            self.listings += 1
            self._tell()
            contents = self.control.contents
            log.info(
                "etcd: loaded {routes} routes and {upstreams} upstreams ({skipped} skipped) from {host}{prefix} "
                "at revision {revision}",
                routes=len(contents.routes),
                upstreams=len(contents.upstreams),
                skipped=len(self.control.skipped) + len(kvs) - len(changes),
                host=self.client.host,
                prefix=self.conf.prefix,
                revision=revision,
            )
        yield self.client.watch(self.conf.prefix, self.revision + 1, self._message)

    def _message(self, result: Dict[str, Any]) -> None:
        if result.get("created"):
            if self.down_since is not None and self.failures:
                log.info(
                    "etcd: back after {seconds:.1f}s; watching {host} from revision {revision}",
                    seconds=time.time() - self.down_since,
                    host=self.client.host,
                    revision=(self.revision or 0) + 1,
                )
            self.watching = True
            self.down_since = None
            self.failures = 0
            self._tell()
        if result.get("compact_revision") and result.get("canceled"):
            # Our revision is gone: list everything again.
            log.warn(
                "etcd: revision {revision} was compacted (now {compacted}); listing again",
                revision=self.revision,
                compacted=result["compact_revision"],
            )
            self.revision = None
            raise EtcdError("compacted")
        events = result.get("events")
        if not events:
            return
        changes = []
        latest = self.revision or 0
        for event in events:
            kv = event.get("kv", {})
            latest = max(latest, int(kv.get("mod_revision", 0)))
            deleted = event.get("type") == "DELETE"
            change = self._parse(unb64(kv.get("key", "")), None if deleted else unb64(kv.get("value", "")))
            if change is not None:
                changes.append(change)
                if deleted:
                    self.indexes.pop((change[0], change[1]), None)
                else:
                    self.indexes[(change[0], change[1])] = (
                        int(kv.get("create_revision", 0)),
                        int(kv.get("mod_revision", 0)),
                    )
        if changes:
            self.control.apply_remote(changes, origin="etcd")
        self.revision = latest
        self._tell()

    def _tell(self) -> None:
        for listener in self.listeners:
            try:
                listener()
            except Exception:
                log.failure("etcd: a listener failed")

    def _parse(self, key: bytes, value: Optional[bytes]) -> Optional[Change]:
        try:
            return parse_event(self.conf.prefix, key, value)
        except ValueError as e:
            log.warn("etcd: {key} skipped: {error}", key=key.decode("utf-8", "replace"), error=str(e))
            return None

    def _failed(self, failure: Failure) -> None:
        self._pending = None
        if not self.running:
            return
        was_watching = self.watching
        self.watching = False
        if was_watching:
            self._tell()
        self.failures += 1
        if self.down_since is None:
            self.down_since = time.time()
        if failure.check(EtcdError) and str(failure.value) == "compacted":
            delay = 0.0
        else:
            self.last_error = describe(failure.value) if failure.value is not None else "unknown"
            # Jittered, so that a fleet that lost etcd together does not
            # come back to it in lockstep.
            delay = min(RETRY_DELAY * 2 ** (self.failures - 1), MAX_RETRY_DELAY) * (0.5 + random.random() / 2)
            if was_watching or self.failures == 1:
                log.warn(
                    "etcd: {error}; serving the last table (revision {revision}), retrying",
                    error=self.last_error,
                    revision=self.revision,
                )
        self._retry = self._reactor.callLater(delay, self._run)


class EtcdCollector:
    """
    Metric families of an L{EtcdSync}, for a gateway's registry:
    C{fauth_etcd_watching} (1 while the watch runs), C{fauth_etcd_revision}
    (the revision the table reflects), C{fauth_etcd_skipped_objects}.
    """

    def __init__(self, sync: EtcdSync) -> None:
        self._sync = sync

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        sync = self._sync
        watching = GaugeMetricFamily("fauth_etcd_watching", "1 while the etcd watch runs, 0 while etcd is unreachable")
        watching.add_metric([], 1 if sync.watching else 0)
        revision = GaugeMetricFamily(
            "fauth_etcd_revision", "The etcd revision the route table reflects (0 before the first listing)"
        )
        revision.add_metric([], sync.revision or 0)
        skipped = GaugeMetricFamily(
            "fauth_etcd_skipped_objects",
            "Objects in etcd left out because they do not validate (a route among them answers 503: "
            "fauth_route_failed_closed)",
        )
        skipped.add_metric([], len(sync.control.skipped))
        return iter([watching, revision, skipped])
