# -*- test-case-name: tests.auth.test_forward,tests.auth.test_contract -*-
"""
The forward-auth decision: build the auth request exactly as APISIX does,
call the auth service over its pooled client, and turn its answer into a
decision.
"""
from __future__ import annotations

from hashlib import sha256
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from fauth import __version__
from fauth.auth.cache import DecisionCache, lifetime
from fauth.auth.client import AuthCallError, AuthClient, Reply
from fauth.auth.coalesce import Flight, Outcome
from fauth.auth.targets import AuthNodes
from fauth.auth.decision import Allow, Decision, Degrade, Respond
from fauth.wire.transport import describe_failure, is_cancellation
from fauth.config import ForwardAuthConf, RouteConf
from fauth.wire.headers import CTL, HOP_BY_HOP, TOKEN, HeaderError, first_value
from fauth.request.inbound import InboundRequest
from fauth.auth.variables import RequestVariables

__all__ = ["ForwardAuth"]

log = Logger()

_USER_AGENT = ("fauth/%s" % __version__).encode("ascii")



class ForwardAuth:
    """
    One C{forward-auth} plugin instance: config compiled once, then
    L{check} per request.

    @param conf: the validated plugin attributes.
    @param client: the pooled client for C{conf.uri}'s host, or the
        L{AuthNodes} of C{conf.nodes}.
    @param reactor: used for the timeout, and as the decision cache's clock.
    @param cache: the decision cache to use when C{conf.cache} is set (one
        kept from an identical earlier configuration of the route); by
        default a new one.

    @ivar cache: the L{DecisionCache}, or C{None} without C{conf.cache}.
    """

    def __init__(
        self,
        conf: ForwardAuthConf,
        client: Union[AuthClient, AuthNodes],
        reactor: Any,
        cache: Optional[DecisionCache] = None,
    ) -> None:
        self.conf = conf
        self.cache: Optional[DecisionCache] = None
        if conf.cache is not None:
            self.cache = cache if cache is not None and cache.conf == conf.cache else DecisionCache(conf.cache)
        self._key_templates = conf.cache.key if conf.cache is not None else ()
        self._client = client
        self._reactor = reactor
        self._post = conf.request_method == "POST"
        self._timeout = conf.timeout / 1000.0
        self._request_headers = tuple(
            (name.lower(), name.encode("utf-8"), _lookup_names(name))
            for name in _sendable(conf.request_headers, "request_headers")
        )
        extra = dict(conf.extra_headers or ())
        self._extra = tuple(
            (name.lower(), name.encode("utf-8"), extra[name])
            for name in _sendable(list(extra), "extra_headers")
        )
        # APISIX accepts any extra_headers key; one that is not a token fails
        # each call (as lua-resty-http refuses it then), found out once here.
        # The other names are fixed, or only sent when a client's header of
        # that name (a token: the server refuses others) was found.
        self._bad_name = any(TOKEN.fullmatch(name) is None for _, name, _ in self._extra)
        self._extra_needs_vars = any(not t.is_literal for _, _, t in self._extra)
        self._upstream_headers = tuple(n.encode("utf-8") for n in conf.upstream_headers)
        self._client_headers = tuple(n.encode("utf-8") for n in conf.client_headers)
        self._host_header = client.host_header
        #: The auth request carries the body (POST), or a variable read from
        #: it ($post_arg): the body must be read before the call.
        self.needs_body = self._post or any(
            not isinstance(part, str) and part.name.startswith("post_arg")
            for _, _, template in self._extra
            for part in template.parts
        )
        for warning in conf.warnings:
            log.warn("{warning}", warning=warning)

    def build_headers(self, inbound: InboundRequest, route: Optional[RouteConf] = None) -> Tuple[Tuple[bytes, bytes], ...]:
        """
        The auth request's headers, in the reference's precedence: generated
        C{X-Forwarded-*}, then C{extra_headers} (overwrite), then
        C{request_headers} (fill only), then C{Host} and C{User-Agent}.
        Names compare case-insensitively.

        @raise HeaderError: a name or value that must not be sent.
        """
        table: Dict[str, Tuple[bytes, bytes]] = {
            "x-forwarded-proto": (b"X-Forwarded-Proto", inbound.scheme.encode("ascii")),
            "x-forwarded-method": (b"X-Forwarded-Method", inbound.method.encode("latin-1")),
            "x-forwarded-host": (b"X-Forwarded-Host", inbound.host.encode("latin-1")),
            # What the upstream will be sent, not the raw target: an auth
            # service must judge the path that is served (see
            # InboundRequest.upstream_target).
            "x-forwarded-uri": (b"X-Forwarded-Uri", inbound.upstream_target),
            "x-forwarded-for": (b"X-Forwarded-For", inbound.remote_addr.encode("latin-1")),
        }
        if self._post:
            encoding = first_value(inbound.headers, b"content-encoding")
            if encoding is not None:
                table["content-encoding"] = (b"Content-Encoding", encoding)
        if self._extra:
            variables = RequestVariables.for_request(inbound, route) if self._extra_needs_vars else None
            for key, name, template in self._extra:
                value = template.source.encode("utf-8") if variables is None else template.render_bytes(variables)
                table[key] = (name, value)
        for key, name, lookups in self._request_headers:
            if key in table:
                continue
            for lookup in lookups:
                found = first_value(inbound.headers, lookup)
                if found is not None:
                    table[key] = (name, found)
                    break
        if "host" not in table:
            table["host"] = (b"Host", self._host_header)
        if "user-agent" not in table:
            table["user-agent"] = (b"User-Agent", _USER_AGENT)
        if self._bad_name:
            raise HeaderError("invalid characters found in header key")
        fields = tuple(table.values())
        for _, value in fields:
            if CTL.search(value) is not None:
                raise HeaderError("invalid characters found in header value")
        return fields


    def check(self, inbound: InboundRequest, route: Optional[RouteConf] = None) -> "Deferred[Decision]":
        """
        Ask the auth service about one request.  Never fails: every outcome,
        transport errors included, is a L{Decision}.  Cancelling the result
        cancels the auth call.
        """
        body: Optional[bytes] = None
        if self._post:
            too_big = self._body_too_big(inbound)
            if too_big is not None:
                log.warn("failed to read request body: {err}", err=too_big)
                return succeed(Respond(413, outcome="rejected"))
            body = inbound.body()
        try:
            headers = self.build_headers(inbound, route)
        except HeaderError as e:
            # The client's own data made the auth request unsendable (CR/LF
            # through $arg_*, say).  Degradation is for an auth service that
            # fails, not a client that can choose to fail it: never degrade.
            return succeed(self._failed(str(e), degradable=False))
        if self.cache is not None:
            return self._check_cached(self.cache, inbound, route, headers, body)
        call = self._client.call(self.conf.request_method, headers, body, self._timeout)
        return call.addCallbacks(self._interpret, self._transport_failure)

    # -- the decision cache (conf.cache) ----------------------------------

    def cache_key(
        self,
        inbound: InboundRequest,
        route: Optional[RouteConf],
        fields: Tuple[Tuple[bytes, bytes], ...],
        body: Optional[bytes],
    ) -> bytes:
        """
        The key of a request's decision: by default a digest of everything
        the auth request carries beyond this instance's constants (method
        and target), so only byte-identical auth requests share; with
        C{cache.key}, a digest of those variables' values alone.
        """
        if self._key_templates:
            variables = RequestVariables.for_request(inbound, route)
            # Length-prefixed: no value can pass for two.
            data = b"".join(
                b"%d:%s" % (len(value), value)
                for value in [template.render_bytes(variables) for template in self._key_templates]
            )
        else:
            # Names are tokens and values hold no CR or LF (build_headers
            # checked), so this is as unambiguous as the request head itself.
            data = b"\r\n".join(map(b":".join, fields))
            if body is not None:
                data += b"\r\n\r\n" + sha256(body).digest()
        return sha256(data).digest()

    def _check_cached(
        self,
        cache: DecisionCache,
        inbound: InboundRequest,
        route: Optional[RouteConf],
        fields: Tuple[Tuple[bytes, bytes], ...],
        body: Optional[bytes],
    ) -> "Deferred[Decision]":
        key = self.cache_key(inbound, route, fields, body)
        hit = cache.fresh(key, self._reactor.seconds())
        if hit is not None:
            return succeed(hit)
        flight = cache.flights.get(key)
        if flight is not None:
            return flight.join()

        def forget() -> None:
            if cache.flights.get(key) is flight:
                del cache.flights[key]

        def retry() -> "Deferred[Decision]":
            return self._ask(cache, key, fields, body).addCallback(lambda outcome: outcome.first)

        flight = cache.flights[key] = Flight(retry, forget)
        seat = flight.join()
        flight.start(self._ask(cache, key, fields, body))
        return seat

    def _ask(
        self, cache: DecisionCache, key: bytes, fields: Tuple[Tuple[bytes, bytes], ...], body: Optional[bytes]
    ) -> "Deferred[Outcome]":
        """One auth call whose answer may be stored, or replaced by a stale allow."""
        call = self._client.call(self.conf.request_method, fields, body, self._timeout)
        return call.addCallbacks(
            self._cached_reply, self._cached_failure, callbackArgs=(cache, key), errbackArgs=(cache, key)
        )

    def _cached_reply(self, reply: Reply, cache: DecisionCache, key: bytes) -> Outcome:
        now = self._reactor.seconds()
        if reply.status >= 500:
            stale = self._serve_stale(cache, key, now, "auth service answered %d" % reply.status)
            if stale is not None:
                return stale
        decision = self._interpret(reply)
        seconds, forbidden = lifetime(reply.status, reply.headers, cache.conf)
        if seconds > 0 and not forbidden:
            cache.store(key, decision, seconds, now)
        elif reply.status < 500:
            # A newer answer supersedes an expired one kept for serve-stale
            # (a denial now must never be followed by a stale allow).
            cache.forget(key)
        first = attr.evolve(decision, cache="uncacheable" if forbidden else "miss")
        return Outcome(first, None if forbidden else attr.evolve(decision, cache="coalesced"))

    def _cached_failure(self, failure: Failure, cache: DecisionCache, key: bytes) -> Outcome:
        if is_cancellation(failure):
            return failure  # type: ignore[return-value]
        reason = str(failure.value) if failure.check(AuthCallError) else describe_failure(failure)
        stale = self._serve_stale(cache, key, self._reactor.seconds(), reason)
        if stale is not None:
            return stale
        decision = self._failed(reason)
        return Outcome(attr.evolve(decision, cache="miss"), attr.evolve(decision, cache="coalesced"))

    def _serve_stale(self, cache: DecisionCache, key: bytes, now: float, reason: str) -> Optional[Outcome]:
        found = cache.stale(key, now)
        if found is None:
            return None
        decision, age = found
        log.warn(
            "failed to process forward auth, err: {err}; serving a stale allow (expired {age:.1f}s ago)",
            err=reason,
            age=age,
        )
        return Outcome(decision, decision)

    def _body_too_big(self, inbound: InboundRequest) -> Optional[str]:
        limit = self.conf.max_req_body_size
        declared = first_value(inbound.headers, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            size = int(declared)
        else:
            size = inbound.body_length()
            if size <= limit:
                return None
        return "request size %d is greater than the maximum size %d allowed" % (size, limit)

    def _interpret(self, reply: Reply) -> Decision:
        if reply.status < 300:
            return Allow(
                tuple(
                    (name, _tuple_or_none(reply.headers.get(name)))
                    for name in self._upstream_headers
                ),
                reply.headers,
            )
        headers = []
        for name in self._client_headers:
            values = reply.headers.get(name)
            if values:
                headers.append((name, tuple(values)))
        body = reply.body
        if self.conf.error_response is not None and reply.status >= 400:
            body = self.conf.error_response.encode("utf-8")
        return Respond(reply.status, tuple(headers), body)

    def _transport_failure(self, failure: Failure) -> Decision:
        if failure.check(AuthCallError):
            return self._failed(str(failure.value))
        if is_cancellation(failure):
            # The caller cancelled (the client went away): nobody to answer.
            return failure  # type: ignore[return-value]
        return self._failed(describe_failure(failure))

    def _failed(self, reason: str, degradable: bool = True) -> Decision:
        log.warn("failed to process forward auth, err: {err}", err=reason)
        if degradable and self.conf.allow_degradation:
            return Degrade()
        body = b""
        if self.conf.error_response is not None:
            body = self.conf.error_response.encode("utf-8")
        return Respond(self.conf.status_on_error, (), body, outcome="error")


# Names that frame the auth request's own hop: the gateway writes them (a
# client's Content-Length on a body-less auth request would make the auth
# service read the next user's request as its body).
_HOP_FIELDS = frozenset(name.decode("ascii") for name in HOP_BY_HOP) | {"content-length", "expect"}


def _sendable(names: Sequence[str], attribute: str) -> List[str]:
    """C{names} without those of L{_HOP_FIELDS}, each dropped with a warning."""
    kept = []
    for name in names:
        if name.lower() in _HOP_FIELDS:
            log.warn(
                "forward-auth {attribute}: {name} frames the auth request itself and is not copied",
                attribute=attribute,
                name=name,
            )
        else:
            kept.append(name)
    return kept


def _lookup_names(name: str) -> Tuple[bytes, ...]:
    """Client-side spellings to try: as configured, then lower-case with C{_} as C{-}."""
    exact = name.encode("utf-8")
    folded = name.lower().replace("_", "-").encode("utf-8")
    return (exact,) if folded == exact.lower() else (exact, folded)


def _tuple_or_none(values: Optional[Sequence[bytes]]) -> Optional[Tuple[bytes, ...]]:
    return tuple(values) if values else None
