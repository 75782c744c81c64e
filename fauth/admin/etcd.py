# -*- test-case-name: tests.admin.test_etcd -*-
"""
Routes, upstreams, services and plugin configs shared by several gateways
through etcd, in APISIX's key layout: C{<prefix>/routes/<id>},
C{<prefix>/upstreams/<id>}, C{<prefix>/services/<id>},
C{<prefix>/plugin_configs/<id>}, each
value the JSON object APISIX stores (C{id}, the object's fields,
C{create_time}, C{update_time}).

L{EtcdClient} speaks etcd's v3 JSON gateway (C{/v3/kv/range},
C{/v3/kv/put}, C{/v3/kv/deleterange}, C{/v3/watch}; keys and values in
base64) with treq over one persistent L{HTTPConnectionPool}, failing over
to the next member of C{etcd.host} when one is unreachable.

L{EtcdSync} is the service every gateway process runs: it lists the prefix,
hands the objects to L{Control.apply_remote}, then watches from the next
revision.  When etcd goes away the gateway keeps its last table, retries
with a growing delay, and on return resumes the watch from its revision (or
lists again when etcd compacted that revision away).  It is also how the
admin API writes (L{EtcdSync.write}).
"""
from __future__ import annotations

import base64
import json
import math
import random
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, cast

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, _HTTP11ClientFactory
from twisted.web.http_headers import Headers

from fauth.admin.store import KINDS
from fauth.config import EtcdConf

__all__ = ["EtcdClient", "EtcdCollector", "EtcdError", "EtcdSync", "EtcdUnavailable", "Change", "parse_event"]

log = Logger()

#: First delay (seconds) before retrying after etcd failed; doubled per
#: failure in a row up to L{MAX_RETRY_DELAY}, each then drawn between half
#: and all of it.  Small, because a gateway catching up late serves a stale
#: table meanwhile, and a refused connection costs etcd nothing.
RETRY_DELAY = 0.1
MAX_RETRY_DELAY = 1.0
#: Largest single line of a watch stream (one watch response).
MAX_WATCH_LINE = 64 * 1024 * 1024

#: One change to apply: kind, id, the document (C{None}: deleted).
Change = Tuple[str, str, Optional[Dict[str, Any]]]


class EtcdError(Exception):
    """etcd answered, with an error (the message is etcd's)."""


class EtcdUnavailable(Exception):
    """No member of C{etcd.host} could be reached (the message says why, per member)."""


def _b64(data: str) -> str:
    return base64.b64encode(data.encode("utf-8")).decode("ascii")


def _unb64(data: str) -> bytes:
    return base64.b64decode(data)


def range_end(prefix: str) -> str:
    """The end of the key range holding every key that starts with C{prefix}."""
    # Keys are compared as bytes: the prefix with its last byte plus one.
    raw = prefix.encode("utf-8")
    return (raw[:-1] + bytes([raw[-1] + 1])).decode("utf-8")


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


class _LineReader(Protocol):
    """Delivers each newline-terminated JSON message of a watch stream."""

    def __init__(self, on_message: Callable[[Dict[str, Any]], None], done: "Deferred[None]") -> None:
        self._on_message = on_message
        self._done = done
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while True:
            line, sep, rest = self._buffer.partition(b"\n")
            if not sep:
                break
            self._buffer = rest
            if line.strip():
                try:
                    self._on_message(json.loads(line))
                except Exception:
                    # Stop the stream: the caller retries from its revision.
                    self._fail(Failure())
                    return
        if len(self._buffer) > MAX_WATCH_LINE:
            self._fail(Failure(EtcdError("watch response larger than %d bytes" % MAX_WATCH_LINE)))

    def _fail(self, failure: Failure) -> None:
        if not self._done.called:
            self._done.errback(failure)
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    def stop(self) -> None:
        """Drop the stream (its connection is closed, not pooled)."""
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done.called:
            return
        if reason is not None and reason.check(ResponseDone):
            self._done.errback(EtcdError("the watch stream ended"))
        else:
            self._done.errback(reason)


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False


class EtcdClient:
    """
    etcd's v3 JSON gateway through treq, over one persistent connection pool.

    @param conf: the C{etcd} section.
    @param reactor: for timeouts and connections.
    @param pool: the pool; a persistent L{HTTPConnectionPool} by default
        (closed by L{close}).
    @ivar member: the index in C{conf.hosts} of the member in use: the
        last one that answered.
    """

    def __init__(self, conf: EtcdConf, reactor: Any, pool: Optional[HTTPConnectionPool] = None) -> None:
        import treq.client

        self.conf = conf
        self._reactor = reactor
        self._own_pool = pool is None
        if pool is None:
            pool = HTTPConnectionPool(reactor, persistent=True)
            # Quiet: a retry every second while etcd is down would log a
            # "Starting factory" pair each time.
            pool._factory = _QuietFactory
            # A watch holds one connection for as long as it runs; the rest
            # are for requests.
            pool.maxPersistentPerHost = 4
        self.pool = pool
        self._http = treq.client.HTTPClient(Agent(reactor, pool=self.pool))
        self.member = 0
        self._tokens: Dict[str, str] = {}

    @property
    def host(self) -> str:
        """The member in use."""
        return self.conf.hosts[self.member]

    def close(self) -> "Deferred[None]":
        """Close the pool's idle connections (when the client made the pool)."""
        from twisted.internet.defer import succeed

        return self.pool.closeCachedConnections() if self._own_pool else succeed(None)

    # -- requests ------------------------------------------------------------

    @inlineCallbacks
    def _post_once(self, host: str, path: str, body: Dict[str, Any]) -> Any:
        headers = Headers({b"content-type": [b"application/json"]})
        token = yield self._token(host)
        if token is not None:
            headers.addRawHeader(b"authorization", token.encode("ascii"))
        d = self._http.post(host + path, data=json.dumps(body).encode("utf-8"), headers=headers)
        d.addCallback(lambda response: response.content().addCallback(lambda data: (response.code, data)))
        d.addTimeout(self.conf.timeout, self._reactor)
        code, data = yield d
        try:
            doc = json.loads(data)
        except ValueError:
            raise EtcdError("%s%s: status %d, not JSON" % (host, path, code))
        if code != 200 or not isinstance(doc, dict):
            message = doc.get("message") or doc.get("error") if isinstance(doc, dict) else None
            if token is not None and message and "token" in str(message):
                # Expired or revoked: authenticate again on the next call.
                self._tokens.pop(host, None)
            raise EtcdError("%s: %s" % (host, message or "status %d" % code))
        return doc

    @inlineCallbacks
    def _token(self, host: str) -> Any:
        if self.conf.user is None:
            return None
        if host not in self._tokens:
            # Simple tokens are per member: one per host.
            d = self._http.post(
                host + "/v3/auth/authenticate",
                data=json.dumps({"name": self.conf.user, "password": self.conf.password}).encode("utf-8"),
                headers=Headers({b"content-type": [b"application/json"]}),
            )
            d.addCallback(lambda response: response.content().addCallback(lambda data: (response.code, data)))
            d.addTimeout(self.conf.timeout, self._reactor)
            code, data = yield d
            doc = json.loads(data) if data.startswith(b"{") else {}
            if code != 200 or "token" not in doc:
                raise EtcdError("%s: authentication as %s failed: %s" % (host, self.conf.user, doc.get("message", code)))
            self._tokens[host] = doc["token"]
        return self._tokens[host]

    @inlineCallbacks
    def call(self, path: str, body: Dict[str, Any]) -> Any:
        """
        POST C{body} to C{path} on the member in use, then on each other
        member in turn while they cannot be reached.

        @return: a Deferred firing with etcd's JSON answer; failing with
            L{EtcdError} (etcd answered with an error) or L{EtcdUnavailable}.
        """
        errors = []
        for step in range(len(self.conf.hosts)):
            index = (self.member + step) % len(self.conf.hosts)
            host = self.conf.hosts[index]
            try:
                doc = yield self._post_once(host, path, body)
            except EtcdError as e:
                # A member without a leader (cut off from the others) says so:
                # the next one may have one.
                if "leader" in str(e) or "timed out" in str(e):
                    errors.append(str(e))
                    continue
                raise
            except CancelledError:
                raise
            except Exception as e:
                errors.append("%s: %s" % (host, _describe(e)))
                continue
            if index != self.member:
                log.info("etcd: using member {host}", host=host)
                self.member = index
            return doc
        raise EtcdUnavailable("; ".join(errors))

    def list(self, prefix: str) -> "Deferred[Tuple[int, List[Tuple[bytes, bytes, int, int]]]]":
        """
        Every key under C{prefix}/ (with its value, and the revisions that
        created and last changed it) and the revision of that view.
        """
        body = {"key": _b64(prefix + "/"), "range_end": _b64(range_end(prefix + "/"))}

        def parsed(doc: Dict[str, Any]) -> Tuple[int, List[Tuple[bytes, bytes, int, int]]]:
            revision = int(doc["header"]["revision"])
            kvs = [
                (
                    _unb64(kv["key"]),
                    _unb64(kv.get("value", "")),
                    int(kv.get("create_revision", 0)),
                    int(kv.get("mod_revision", 0)),
                )
                for kv in doc.get("kvs", [])
            ]
            return revision, kvs

        return self.call("/v3/kv/range", body).addCallback(parsed)

    def put(self, key: str, value: bytes, ttl: Optional[float] = None) -> "Deferred[int]":
        """
        Write C{key}; fires with the new revision.  With C{ttl}, under a
        new lease of that many seconds (rounded up: etcd's are whole), so
        etcd deletes it then, as APISIX's C{?ttl=}.
        """
        body = {"key": _b64(key), "value": base64.b64encode(value).decode("ascii")}
        if ttl is None:
            return self.call("/v3/kv/put", body).addCallback(lambda doc: int(doc["header"]["revision"]))

        def leased(doc: Dict[str, Any]) -> "Deferred[int]":
            return self.call("/v3/kv/put", dict(body, lease=doc["ID"])).addCallback(
                lambda doc: int(doc["header"]["revision"])
            )

        return self.call("/v3/lease/grant", {"TTL": max(1, math.ceil(ttl))}).addCallback(leased)

    def delete(self, key: str) -> "Deferred[int]":
        """Delete C{key}; fires with the new revision."""
        return self.call("/v3/kv/deleterange", {"key": _b64(key)}).addCallback(
            lambda doc: int(doc["header"]["revision"])
        )

    def watch(self, prefix: str, start_revision: int, on_message: Callable[[Dict[str, Any]], None]) -> "Deferred[None]":
        """
        Watch every key under C{prefix}/ from C{start_revision} on the member
        in use, calling C{on_message} with each watch response (C{"result"}
        of the stream).  A failure to connect moves to the next member for
        the next attempt.

        @return: a Deferred that fails when the stream ends (it never
            succeeds); cancel it to stop watching.
        """
        host = self.host
        body = {
            "create_request": {
                "key": _b64(prefix + "/"),
                "range_end": _b64(range_end(prefix + "/")),
                "start_revision": start_revision,
            }
        }
        done: Deferred[None] = Deferred(lambda _: reader[0].stop() if reader else None)
        reader: List[_LineReader] = []

        def unwrap(message: Dict[str, Any]) -> None:
            if "error" in message:
                error = message["error"]
                raise EtcdError("%s: %s" % (host, error.get("message", error) if isinstance(error, dict) else error))
            on_message(message.get("result", {}))

        def connected(response: Any) -> Any:
            if response.code != 200:
                return response.content().addCallback(
                    lambda data: done.errback(EtcdError("%s: watch refused: status %d %r" % (host, response.code, data[:200])))
                    if not done.called
                    else None
                )
            protocol = _LineReader(unwrap, done)
            reader.append(protocol)
            response.deliverBody(protocol)
            if done.called:  # cancelled meanwhile
                protocol.stop()
            return None

        def unreachable(failure: Failure) -> None:
            if not done.called:
                # Next time, the next member.
                self.member = (self.member + 1) % len(self.conf.hosts)
                done.errback(failure)

        def start(token: Optional[str]) -> "Deferred[Any]":
            # etcd's "require leader" (gRPC metadata, through the gateway):
            # a member cut off from its cluster's leader ends the watch
            # rather than keep it open without news.
            headers = Headers({b"content-type": [b"application/json"], b"grpc-metadata-hasleader": [b"true"]})
            if token is not None:
                headers.addRawHeader(b"authorization", token.encode("ascii"))
            request = self._http.post(
                host + "/v3/watch", data=json.dumps(body).encode("utf-8"), headers=headers, unbuffered=True
            )
            request.addTimeout(self.conf.timeout, self._reactor)
            return request

        connecting = self._token(host).addCallback(start)
        connecting.addCallbacks(connected, unreachable)
        def stop_connecting(failure: Failure) -> Failure:
            connecting.cancel()
            return failure

        done.addErrback(stop_connecting)
        return done


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split())
    name = type(e).__name__
    if name == "ResponseNeverReceived" or name == "RequestTransmissionFailed":
        reasons = getattr(e, "reasons", [])
        if reasons:
            return _describe(reasons[0].value)
    if name == "TimeoutError" or name == "CancelledError":
        return "timed out"
    return "%s: %s" % (name, text) if text else name


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
            change = self._parse(_unb64(kv.get("key", "")), None if deleted else _unb64(kv.get("value", "")))
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
            self.last_error = _describe(failure.value) if failure.value is not None else "unknown"
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
