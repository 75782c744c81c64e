# -*- test-case-name: tests.admin.test_api -*-
"""
The admin API, on its own listener: an APISIX-compatible subset
(C{/apisix/admin/routes}, C{/apisix/admin/upstreams}), C{POST
/apisix/admin/reload}, and C{GET /healthz}.

Resource tree of L{AdminRoot}::

    /healthz            no key; 200 "ok" while the gateway accepts requests
    /metrics            added by GatewayService (L{fauth.observe.metrics}); no key
                        unless admin.metrics_require_key
    /apisix/admin/...   X-API-KEY required (L{KeyGuard})
    anything else       X-API-KEY required, then 404

Extension hook: more endpoints are added as children of the root, e.g.
C{root.putChild(b"metrics", root.guard(metrics))} (or unguarded, when
C{admin.metrics_require_key} is false).
"""
from __future__ import annotations

import hmac
import json
import math
import re
from typing import Any, Callable, Iterable, List, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import IResource, Resource, getChildForRequest

from fauth.config import ConfigError, HttpLimits
from fauth.admin.control import Control
from fauth.admin.objects import AdminError, Entry
from fauth.admin.store import KINDS
from fauth.edge.server import _CLOSED, HardenedHTTPChannel, HardenedSite

__all__ = ["MAX_ADMIN_BODY", "AdminRoot", "AdminSite", "ApisixAdmin", "Healthz", "KeyGuard", "key_matches"]

log = Logger()

_JSON = b"application/json"
_BAD_TOKEN = b'{"error_msg":"failed to check token"}'
_TOO_LARGE = b'{"error_msg":"request body too large"}'

#: Largest admin request body, in bytes; larger ones get 413 before the
#: key is checked, and the connection is closed.
MAX_ADMIN_BODY = 1024 * 1024


def key_matches(given: Optional[bytes], keys: Sequence[bytes]) -> bool:
    """
    Whether C{given} is one of C{keys}, in constant time: every key is
    compared (no early exit) with L{hmac.compare_digest}.
    """
    candidate = given if given is not None else b""
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate, key)
    return found and given is not None


def _answer(request: Any, status: int, doc: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", _JSON)
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")


def _error(request: Any, status: int, message: str) -> bytes:
    return _answer(request, status, {"error_msg": message})


class KeyGuard(Resource):
    """
    Lets a request through to C{wrapped} (traversing it) only with an
    C{X-API-KEY} header equal to one of C{keys}; else 401 with APISIX's
    C{{"error_msg":"failed to check token"}}.
    """

    isLeaf = True

    def __init__(self, wrapped: IResource, keys: Iterable[str]) -> None:
        super().__init__()
        self._wrapped = wrapped
        self._keys = [k.encode("utf-8") for k in keys]

    def render(self, request: Any) -> Any:
        given = request.requestHeaders.getRawHeaders(b"x-api-key")
        # Exactly one header: two different values must not be read as either.
        if not key_matches(given[0] if given and len(given) == 1 else None, self._keys):
            request.setResponseCode(401)
            request.setHeader(b"content-type", _JSON)
            return _BAD_TOKEN
        return getChildForRequest(self._wrapped, request).render(request)


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return _error(request, 404, "not found")


class Healthz(Resource):
    """
    C{GET /healthz}: 200 C{ok} while C{serving()} is true, 503 C{draining}
    once a shutdown stopped accepting requests.  No key needed.

    @param note: with etcd, a line on its state appended to C{ok} (C{ok;
        etcd: unreachable since ...}): a gateway cut off from etcd still
        serves its last table, so it stays 200 and says so in the body.
    """

    isLeaf = True

    def __init__(self, serving: Callable[[], bool], note: Optional[Callable[[], Optional[str]]] = None) -> None:
        super().__init__()
        self._serving = serving
        self._note = note

    def render(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if self._serving():
            note = self._note() if self._note is not None else None
            return b"ok" if not note else ("ok; " + note).encode("utf-8")
        request.setResponseCode(503)
        return b"draining"


def _ttl(request: Any) -> Optional[float]:
    """APISIX's C{?ttl=} (seconds), or C{None}."""
    given = request.args.get(b"ttl")
    if not given:
        return None
    try:
        ttl = float(given[-1])
    except ValueError:
        ttl = math.nan
    if not math.isfinite(ttl) or ttl <= 0:
        # (APISIX checks tonumber() only; etcd refuses a lease of 0 or less.)
        raise AdminError(400, "invalid argument ttl: should be a number")
    return ttl


def _arg(request: Any, name: bytes) -> Optional[str]:
    values = request.args.get(name)
    return values[-1].decode("utf-8", "replace") if values else None


def _search(pattern: "re.Pattern[str]", text: object) -> bool:
    return isinstance(text, str) and pattern.search(text) is not None


def _listing(request: Any, items: List[dict]) -> dict:
    """
    C{{"total": n, "list": [...]}} with APISIX v3's list arguments applied
    (C{apisix/admin/v3_adapter.lua}): C{name} and C{uri} (regular
    expressions, searched), C{label} (a label key present), then C{page}
    and C{page_size} (10 to 500, the pages in C{createdIndex} order);
    C{total} counts what the filters kept.
    """
    patterns = {}
    for name in ("name", "uri"):
        text = _arg(request, name.encode("ascii"))
        if text is not None:
            try:
                patterns[name] = re.compile(text)
            except re.error as e:
                raise AdminError(400, "invalid argument %s: %s" % (name, e))
    label = _arg(request, b"label")
    kept = []
    for item in items:
        value = item["value"]
        if "name" in patterns and not _search(patterns["name"], value.get("name")):
            continue
        if label is not None and not (isinstance(value.get("labels"), dict) and label in value["labels"]):
            continue
        if "uri" in patterns:
            uris = [value.get("uri")] + list(value.get("uris") or [])
            if not any(_search(patterns["uri"], uri) for uri in uris):
                continue
        kept.append(item)
    total = len(kept)
    page, size = _arg(request, b"page"), _arg(request, b"page_size")
    if page is not None and size is not None:
        try:
            page_number, page_size = int(page), int(size)
        except ValueError:
            page_number, page_size = 1, 0
        if not 10 <= page_size <= 500:
            raise AdminError(400, "page_size must be between 10 and 500")
        page_number = max(page_number, 1)
        kept.sort(key=lambda item: item["createdIndex"])
        kept = kept[(page_number - 1) * page_size : page_number * page_size]
    return {"total": total, "list": kept}


class ApisixAdmin(Resource):
    """
    Everything under C{/apisix/admin/} (the key is checked by the
    L{KeyGuard} in front of it).
    """

    isLeaf = True

    def __init__(self, control: Control) -> None:
        super().__init__()
        self._control = control

    def render(self, request: Any) -> bytes:
        method = request.method.decode("ascii", "replace")
        try:
            parts = [p.decode("utf-8") for p in request.postpath]
        except UnicodeDecodeError:
            return _error(request, 400, "invalid id: not UTF-8")
        # Tolerate a trailing slash (/apisix/admin/routes/).
        if len(parts) > 1 and parts[-1] == "":
            parts.pop()
        try:
            if not parts or parts[0] != "admin":
                raise AdminError(404, "not found")
            return self._dispatch(request, method, parts[1:])
        except AdminError as e:
            return _answer(request, e.status, {e.field: e.message})
        except Exception:
            log.failure("admin API: unexpected error on {method} {uri}", method=method, uri=request.uri)
            return _error(request, 500, "internal error")

    def _reply(self, request: Any, outcome: Any, make: Callable[[Any], bytes]) -> Any:
        """
        C{make(outcome)}, or, when C{outcome} is a Deferred (a write to
        etcd), C{NOT_DONE_YET} and the answer once it fired.
        """
        if not isinstance(outcome, Deferred):
            return make(outcome)

        def failed(failure: Failure) -> bytes:
            error = failure.value
            if isinstance(error, AdminError):
                return _answer(request, error.status, {error.field: error.message})
            log.failure("admin API: unexpected error on {method} {uri}", failure, method=request.method, uri=request.uri)
            return _error(request, 500, "internal error")

        def send(body: bytes) -> None:
            # The client may have gone: the change is made (or not) anyway,
            # as etcd decided; only the answer is lost.
            if not request.finished and not getattr(request, "_disconnected", False):
                request.write(body)
                request.finish()

        outcome.addCallback(make).addErrback(failed).addCallback(send)
        outcome.addErrback(lambda f: log.failure("admin API: answering failed", f))
        return server.NOT_DONE_YET

    def _dispatch(self, request: Any, method: str, parts: List[str]) -> bytes:
        if parts == ["reload"]:
            if method != "POST":
                raise self._not_allowed(request, "POST")
            try:
                self._control.reload()
            except ConfigError as e:
                return _error(request, 400, str(e))
            return _answer(request, 200, {"reloaded": True})
        if not parts or parts[0] not in KINDS:
            raise AdminError(404, "Unsupported resource type: %s" % (parts[0] if parts else ""))
        kind = parts[0]
        if len(parts) == 1:
            if method in ("GET", "HEAD"):
                entries = self._control.list(kind)
                return _answer(request, 200, _listing(request, [self._item(e) for e in entries]))
            if method == "POST":

                def created_one(entry: Entry) -> bytes:
                    self._audit(request, method, entry, "created")
                    return _answer(request, 201, self._item(entry, written=True))

                return self._reply(request, self._control.create(kind, self._body(request), _ttl(request)), created_one)
            if method == "PUT":
                # APISIX's PUT /apisix/admin/routes with the id in the body.
                return self._put(request, method, kind, None)
            raise self._not_allowed(request, "GET, PUT, POST")
        doc_id, sub_path = parts[1], parts[2:]
        if sub_path and method != "PATCH":
            raise AdminError(404, "not found")
        if method in ("GET", "HEAD"):
            return _answer(request, 200, self._item(self._control.get(kind, doc_id)))
        if method == "PUT":
            return self._put(request, method, kind, doc_id)
        if method == "PATCH":

            def patched(entry: Entry) -> bytes:
                self._audit(request, method, entry, "updated")
                return _answer(request, 200, self._item(entry, written=True))

            outcome = self._control.patch(kind, doc_id, self._body(request), sub_path, _ttl(request))
            return self._reply(request, outcome, patched)
        if method == "DELETE":

            def deleted(entry: Entry) -> bytes:
                self._audit(request, method, entry, "deleted")
                return _answer(request, 200, {"key": entry.key, "deleted": "1"})

            force = request.args.get(b"force") == [b"true"]
            return self._reply(request, self._control.delete(kind, doc_id, force), deleted)
        raise self._not_allowed(request, "GET, PUT, PATCH, DELETE")

    def _put(self, request: Any, method: str, kind: str, doc_id: Optional[str]) -> Any:
        def put_one(outcome: Any) -> bytes:
            created, entry = outcome
            self._audit(request, method, entry, "created" if created else "updated")
            return _answer(request, 201 if created else 200, self._item(entry, written=True))

        return self._reply(request, self._control.put(kind, doc_id, self._body(request), _ttl(request)), put_one)

    @staticmethod
    def _item(entry: Entry, written: bool = False) -> dict:
        """
        APISIX v3's object answer: C{key}, C{value}, C{createdIndex},
        C{modifiedIndex} (its clients read them from every answer), and
        fauth's C{source} (APISIX has no file-owned objects; clients that do
        not know it ignore it) on reads.
        """
        item = {
            "key": entry.key,
            "value": entry.value,
            "createdIndex": entry.created_index,
            "modifiedIndex": entry.modified_index,
        }
        if not written:
            item["source"] = entry.source
        return item

    @staticmethod
    def _not_allowed(request: Any, allowed: str) -> AdminError:
        request.setHeader(b"allow", allowed.encode("ascii"))
        return AdminError(405, "method %s not allowed here" % request.method.decode("ascii", "replace"))

    @staticmethod
    def _body(request: Any) -> object:
        # Any Content-Type: curl -d sends application/x-www-form-urlencoded.
        request.content.seek(0)
        data = request.content.read()

        def refuse_constant(name: str) -> Any:
            raise ValueError("%s is not valid JSON" % name)

        def finite(text: str) -> float:
            # 1e400 would become inf, which the store could not write back.
            value = float(text)
            if not math.isfinite(value):
                raise ValueError("number %s is out of range" % text)
            return value

        try:
            return json.loads(data.decode("utf-8"), parse_constant=refuse_constant, parse_float=finite)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise AdminError(400, "invalid request body: %s" % e)
        except RecursionError:
            # [[[[...]]]] nested deeper than the interpreter's stack.
            raise AdminError(400, "invalid request body: nested too deeply")

    @staticmethod
    def _audit(request: Any, method: str, entry: Entry, what: str) -> None:
        peer = request.getClientAddress()
        log.info(
            "admin API: {method} {key} {what} (from {peer})",
            method=method,
            key=entry.key,
            what=what,
            peer=getattr(peer, "host", peer),
        )


class AdminRoot(Resource):
    """
    The admin listener's root (see the module docstring for its tree).

    @param control: what the API reads and changes.
    @param keys: the accepted C{X-API-KEY} values.
    @param serving: whether the gateway accepts requests (for C{/healthz}).
    @param note: a line on the configuration store for C{/healthz} (etcd).
    """

    def __init__(
        self,
        control: Control,
        keys: Iterable[str],
        serving: Callable[[], bool],
        note: Optional[Callable[[], Optional[str]]] = None,
    ) -> None:
        super().__init__()
        self.keys = tuple(keys)
        self.putChild(b"healthz", Healthz(serving, note))
        self.putChild(b"apisix", self.guard(ApisixAdmin(control)))

    def guard(self, resource: IResource) -> KeyGuard:
        """C{resource} behind this API's C{X-API-KEY} check."""
        return KeyGuard(resource, self.keys)

    def getChild(self, path: bytes, request: Any) -> IResource:
        # Unknown paths need the key too: no probing without it.
        return self.guard(_NotFound())

    def render(self, request: Any) -> Any:
        return self.guard(_NotFound()).render(request)


class _AdminRequest(server.Request):
    """A request whose body may not exceed C{MAX_ADMIN_BODY} (chunked included)."""

    _received = 0

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if isinstance(channel, _AdminChannel) and channel.refused:
            return
        self._received += len(data)
        if self._received > MAX_ADMIN_BODY:
            if isinstance(channel, _AdminChannel):
                channel.too_large()
            return
        super().handleContentChunk(data)


class _AdminChannel(HardenedHTTPChannel):
    """
    A L{HardenedHTTPChannel} refusing request bodies over
    C{MAX_ADMIN_BODY} with 413 and closing the connection: by the
    C{Content-Length} as soon as the head is in, for a chunked body as soon
    as it has grown too large.  Nothing of such a request is rendered.
    """

    refused = False

    def too_large(self) -> None:
        """Answer 413 and close; the request is never handed to the resource."""
        if self.refused:
            return
        self.refused = True
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(_TOO_LARGE), _TOO_LARGE)
            )
        # Ignore anything further, and close.
        self._phase = _CLOSED
        self._close()

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.length > MAX_ADMIN_BODY:
            self.too_large()
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self.refused:
            return
        super().allContentReceived()


class AdminSite(HardenedSite):
    """
    The admin listener's site: the client-facing server's hardening
    (L{HardenedSite}: strict parsing, header and body timeouts), bodies
    capped at C{MAX_ADMIN_BODY}, and no access log (admin writes are logged
    by the API itself).
    """

    displayTracebacks = False

    def __init__(self, resource: IResource, limits: HttpLimits = HttpLimits(), **kwargs: Any) -> None:
        kwargs.setdefault("requestFactory", _AdminRequest)
        super().__init__(resource, limits, **kwargs)

    def protocol(self) -> HardenedHTTPChannel:  # type: ignore[override]
        return _AdminChannel(self.limits)

    def log(self, request: Any) -> None:
        pass
