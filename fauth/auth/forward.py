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
from fauth.auth.cookies import CookiePicker
from fauth.auth.targets import AuthNodes
from fauth.auth.decision import Allow, Decision, Degrade, Preflight, Respond
from fauth.auth.signin import SigninRedirect
from fauth.wire.transport import describe_failure, is_cancellation
from fauth.config import ForwardAuthConf, RouteConf
from fauth.config.headerrules import compile_rules
from fauth.config.templates import UnsafeValue
from fauth.wire.headers import CTL, HOP_BY_HOP, TOKEN, HeaderError, first_value
from fauth.request.inbound import InboundRequest
from fauth.auth.variables import RequestVariables

__all__ = ["ForwardAuth", "is_preflight"]

log = Logger()

_USER_AGENT = ("fauth/%s" % __version__).encode("ascii")
# Methods whose request has a body by definition (as the agent's).
_BODY_METHODS = frozenset(["POST", "PUT", "PATCH"])


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
        self._upstream_rules = compile_rules("upstream_headers", conf.upstream_headers)
        self._upstream_headers = self._upstream_rules.exact
        self._upstream_pattern = self._upstream_rules.pattern
        self._client_rules = compile_rules("client_headers", conf.client_headers)
        self._host_header = client.host_header
        # The usual configuration, whose fields are known to be distinct
        # once written: built without the precedence table.
        copied_keys = [key for key, _, _ in self._request_headers]
        self._plain: Optional[Tuple[Tuple[bytes, Tuple[bytes, ...]], ...]] = None
        if (
            not self._post
            and not self._extra
            and len(set(copied_keys)) == len(copied_keys)
            and not {"host", "user-agent"}.intersection(copied_keys)
        ):
            self._plain = tuple(
                (name, lookups) for key, name, lookups in self._request_headers if key not in _FORWARDED_KEYS
            )
        self._signin = None if conf.signin_redirect is None else SigninRedirect(conf.signin_redirect)
        self._cookies = CookiePicker(conf.allow_cookies) if conf.allow_cookies else None
        self._uri = conf.uri_template
        self._needs_vars = self._extra_needs_vars or self._uri is not None
        self._preserve = conf.preserve_request_method
        # A preflight lets no identity through: every upstream_headers name
        # is removed from it, as for an allow without them.
        self._preflight = (
            None
            if conf.run_on_preflight
            else Preflight(
                tuple((name, None) for _, name in self._upstream_headers),
                strip=self._upstream_rules if self._upstream_pattern is not None else None,
            )
        )
        names = [part.name for _, _, template in self._extra for part in template.parts if not isinstance(part, str)]
        if self._uri is not None:
            names += self._uri.names
        #: The auth request carries the body (POST), or a variable read from
        #: it ($post_arg): the body must be read before the call.
        self.needs_body = self._post or any(name.startswith("post_arg") for name in names)
        #: C{allow_partial_message} in POST mode: a body over
        #: C{max_req_body_size} is cut for the auth call, not refused.
        self.takes_partial_body = self._post and conf.allow_partial_message
        for warning in conf.warnings:
            log.warn("{warning}", warning=warning)

    def build_headers(
        self,
        inbound: InboundRequest,
        route: Optional[RouteConf] = None,
        variables: Optional[RequestVariables] = None,
        truncated: bool = False,
    ) -> Tuple[Tuple[bytes, bytes], ...]:
        """
        The auth request's headers, in the reference's precedence: generated
        C{X-Forwarded-*}, then C{extra_headers} (overwrite), then
        C{request_headers} (fill only), then C{Host} and C{User-Agent}.
        Names compare case-insensitively.

        @param variables: the request's variables, when the caller has them.
        @param truncated: the body sent is the first C{max_req_body_size}
            bytes of a larger one (C{allow_partial_message}).
        @raise HeaderError: a name or value that must not be sent.
        """
        if self._plain is not None:
            return self._plain_headers(inbound, self._plain)
        table: Dict[str, Tuple[bytes, bytes]] = dict(zip(_FORWARDED_KEYS, _forwarded(inbound)))
        if self._post:
            encoding = first_value(inbound.headers, b"content-encoding")
            if encoding is not None:
                table["content-encoding"] = (b"Content-Encoding", encoding)
            if self.takes_partial_body:
                # Always sent on such a route (as Envoy's partial-body
                # header): a client's copy can never stand in for it.
                table["x-forwarded-body-truncated"] = (b"X-Forwarded-Body-Truncated", b"true" if truncated else b"false")
        if self._extra:
            if variables is None and self._extra_needs_vars:
                variables = RequestVariables.for_request(inbound, route)
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
        return _checked(tuple(table.values()))

    def _plain_headers(
        self, inbound: InboundRequest, copied: Tuple[Tuple[bytes, Tuple[bytes, ...]], ...]
    ) -> Tuple[Tuple[bytes, bytes], ...]:
        """L{build_headers} without a body or C{extra_headers}, whose C{request_headers} name no other field."""
        fields = _forwarded(inbound)
        get = inbound.headers.getRawHeaders
        for name, lookups in copied:
            for lookup in lookups:
                values = get(lookup)
                if values:
                    fields.append((name, values[0]))
                    break
        fields.append((b"Host", self._host_header))
        fields.append((b"User-Agent", _USER_AGENT))
        return _checked(tuple(fields))


    def check(self, inbound: InboundRequest, route: Optional[RouteConf] = None) -> "Deferred[Decision]":
        """
        Ask the auth service about one request.  Never fails: every outcome,
        transport errors included, is a L{Decision}.  Cancelling the result
        cancels the auth call.
        """
        decided = self._decide(inbound, route)
        if self._signin is not None:
            # After the cache: a stored denial is the same for everyone, its
            # redirect carries this request's own URL.
            decided.addCallback(self._signin.apply, inbound)
        return decided

    def _decide(self, inbound: InboundRequest, route: Optional[RouteConf]) -> "Deferred[Decision]":
        preflight = self._preflight
        if preflight is not None and is_preflight(inbound):
            return succeed(preflight)
        body: Optional[bytes] = None
        truncated = False
        if self._post:
            too_big = self._body_too_big(inbound)
            if too_big is None:
                body = inbound.body()
            elif self.takes_partial_body:
                body = inbound.body()[: self.conf.max_req_body_size]
                truncated = True
            else:
                log.warn("failed to read request body: {err}", err=too_big)
                return succeed(Respond(413, outcome="rejected"))
        method = self.conf.request_method
        if self._preserve:
            method = inbound.method
            if not body and method not in _BODY_METHODS:
                body = None  # a GET stays a GET without a body, POST mode or not
        variables = RequestVariables.for_request(inbound, route) if self._needs_vars else None
        try:
            headers = self.build_headers(inbound, route, variables, truncated)
            target = None if self._uri is None or variables is None else self._uri.render(variables)
        except (HeaderError, UnsafeValue) as e:
            # The client's own data made the auth request unsendable (CR/LF
            # through $arg_*, say).  Degradation is for an auth service that
            # fails, not a client that can choose to fail it: never degrade.
            return succeed(self._failed(str(e), degradable=False))
        if self.cache is not None:
            return self._check_cached(self.cache, inbound, route, _Call(method, target, headers, body))
        d = self._client.call(method, headers, body, self._timeout, target)
        return d.addCallbacks(self._interpret, self._transport_failure)

    # -- the decision cache (conf.cache) ----------------------------------

    def cache_key(
        self,
        inbound: InboundRequest,
        route: Optional[RouteConf],
        fields: Tuple[Tuple[bytes, bytes], ...],
        body: Optional[bytes],
        method: Optional[str] = None,
        target: Optional[bytes] = None,
    ) -> bytes:
        """
        The key of a request's decision: by default a digest of everything
        the auth request carries beyond this instance's constants: the
        fields, the body's digest, and the method (C{preserve_request_method})
        and target (C{uri} with variables) when they are the request's own,
        so only byte-identical auth requests share; with C{cache.key}, a
        digest of those variables' values alone.
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
            if method is not None or target is not None:
                # A request line in front: method and target hold no space.
                line = b"%s %s\r\n" % ((method or "").encode("ascii"), target or b"")
                data = line + data
        return sha256(data).digest()

    def _check_cached(
        self,
        cache: DecisionCache,
        inbound: InboundRequest,
        route: Optional[RouteConf],
        call: "_Call",
    ) -> "Deferred[Decision]":
        key = self.cache_key(
            inbound,
            route,
            call.fields,
            call.body,
            call.method if self._preserve else None,
            call.target,
        )
        hit = cache.fresh(key, self._reactor.seconds())
        if hit is not None:
            return succeed(hit)

        def ask_alone() -> "Deferred[Decision]":
            # This request's own call: with a narrowed key, the one it
            # joined may have carried another client's credentials.
            return self._ask(cache, key, call).addCallback(lambda outcome: outcome.first)

        flight = cache.flights.get(key)
        if flight is not None:
            return flight.join(ask_alone)

        def forget() -> None:
            if cache.flights.get(key) is flight:
                del cache.flights[key]

        flight = cache.flights[key] = Flight(forget)
        seat = flight.join(ask_alone)
        flight.start(self._ask(cache, key, call))
        return seat

    def _ask(self, cache: DecisionCache, key: bytes, call: "_Call") -> "Deferred[Outcome]":
        """One auth call whose answer may be stored, or replaced by a stale allow."""
        d = self._client.call(call.method, call.fields, call.body, self._timeout, call.target)
        return d.addCallbacks(
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
            found = reply.headers.get
            given: List[Tuple[bytes, Optional[Tuple[bytes, ...]]]] = []
            for source, name in self._upstream_headers:
                values = found(source)
                given.append((name, tuple(values) if values else None))
            set_headers = tuple(given)
            if self._upstream_pattern is not None:
                set_headers += tuple(self._upstream_rules.matching(reply.headers.items()))
            return Allow(
                set_headers,
                reply.headers,
                cookies=() if self._cookies is None else self._cookies.pick(reply.headers),
                strip=self._upstream_rules if self._upstream_pattern is not None else None,
            )
        headers = []
        for source, name in self._client_rules.exact:
            values = reply.headers.get(source)
            if values:
                headers.append((name, tuple(values)))
        if self._client_rules.pattern is not None:
            headers.extend(self._client_rules.matching(reply.headers.items()))
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


_FORWARDED_KEYS = ("x-forwarded-proto", "x-forwarded-method", "x-forwarded-host", "x-forwarded-uri", "x-forwarded-for")


def _forwarded(inbound: InboundRequest) -> List[Tuple[bytes, bytes]]:
    """The generated C{X-Forwarded-*} fields of the auth request, in L{_FORWARDED_KEYS}' order."""
    return [
        (b"X-Forwarded-Proto", inbound.scheme.encode("ascii")),
        (b"X-Forwarded-Method", inbound.method.encode("latin-1")),
        (b"X-Forwarded-Host", inbound.host.encode("latin-1")),
        # What the upstream will be sent, not the raw target: an auth
        # service must judge the path that is served (see
        # InboundRequest.upstream_target).
        (b"X-Forwarded-Uri", inbound.upstream_target),
        (b"X-Forwarded-For", inbound.remote_addr.encode("latin-1")),
    ]


def _checked(fields: Tuple[Tuple[bytes, bytes], ...]) -> Tuple[Tuple[bytes, bytes], ...]:
    """C{fields}, unless a value holds a control character (one search over them all, tab-separated)."""
    if CTL.search(b"\t".join([value for _, value in fields])) is not None:
        raise HeaderError("invalid characters found in header value")
    return fields


class _Call:
    """What one auth call sends: method, target (C{None}: the uri's own), fields and body."""

    __slots__ = ("method", "target", "fields", "body")

    def __init__(
        self, method: str, target: Optional[bytes], fields: Tuple[Tuple[bytes, bytes], ...], body: Optional[bytes]
    ) -> None:
        self.method = method
        self.target = target
        self.fields = fields
        self.body = body


def is_preflight(inbound: InboundRequest) -> bool:
    """
    A CORS preflight (Fetch standard): an C{OPTIONS} request with C{Origin}
    and C{Access-Control-Request-Method}.  A plain C{OPTIONS} is not one.
    """
    headers = inbound.headers
    return (
        inbound.method == "OPTIONS"
        and headers.hasHeader(b"origin")
        and headers.hasHeader(b"access-control-request-method")
    )


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
