# -*- test-case-name: tests.admin.test_etcd -*-
"""
L{EtcdClient}: etcd's v3 JSON gateway (C{/v3/kv/range}, C{/v3/kv/put},
C{/v3/kv/deleterange}, C{/v3/watch}; keys and values in base64) spoken with
treq over one persistent L{HTTPConnectionPool}, failing over to the next
member of C{etcd.host} when one is unreachable.
"""
from __future__ import annotations

import base64
import json
import math
from typing import Any, Callable, Dict, List, Optional, Tuple, cast

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, _HTTP11ClientFactory
from twisted.web.http_headers import Headers

from fauth.config import EtcdConf

__all__ = ["EtcdClient", "EtcdError", "EtcdUnavailable", "MAX_WATCH_LINE", "describe", "range_end", "unb64"]

log = Logger()

#: Largest single line of a watch stream (one watch response).
MAX_WATCH_LINE = 64 * 1024 * 1024


class EtcdError(Exception):
    """etcd answered, with an error (the message is etcd's)."""


class EtcdUnavailable(Exception):
    """No member of C{etcd.host} could be reached (the message says why, per member)."""


def _b64(data: str) -> str:
    return base64.b64encode(data.encode("utf-8")).decode("ascii")


def unb64(data: str) -> bytes:
    """A base64 key or value of etcd's JSON gateway, decoded."""
    return base64.b64decode(data)


def range_end(prefix: str) -> str:
    """The end of the key range holding every key that starts with C{prefix}."""
    # Keys are compared as bytes: the prefix with its last byte plus one.
    raw = prefix.encode("utf-8")
    return (raw[:-1] + bytes([raw[-1] + 1])).decode("utf-8")


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
                errors.append("%s: %s" % (host, describe(e)))
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
                    unb64(kv["key"]),
                    unb64(kv.get("value", "")),
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


def describe(e: BaseException) -> str:
    """An etcd failure as one line: the first reason of a transport failure, \"timed out\" for a timeout."""
    text = " ".join(str(e).split())
    name = type(e).__name__
    if name == "ResponseNeverReceived" or name == "RequestTransmissionFailed":
        reasons = getattr(e, "reasons", [])
        if reasons:
            return describe(reasons[0].value)
    if name == "TimeoutError" or name == "CancelledError":
        return "timed out"
    return "%s: %s" % (name, text) if text else name


