# -*- test-case-name: tests.auth.test_variables -*-
"""
The APISIX/nginx variables of one client request (C{$uri}, C{$http_*},
C{$arg_*}, C{$cookie_*}, C{$post_arg.*} ...), resolved for the templates of
L{fauth.config.templates} (APISIX's C{ctx.var}).
"""
from __future__ import annotations

import email.message
import email.parser
import email.utils
import json
import re
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger

from fauth.config.templates import MISSING, NULL, to_byte_string

if TYPE_CHECKING:
    from twisted.web.http_headers import Headers

    from fauth.config.models import RouteConf
    from fauth.request.inbound import InboundRequest

__all__ = ["DEFAULT_MAX_POST_ARGS_SIZE", "RequestVariables"]

_log = Logger()


# ngx.req.get_uri_args / get_post_args stop after 100 arguments by default.
_MAX_ARGS = 100

#: APISIX C{max_post_args_readable_size} default (64 MiB); bodies larger than
#: this make C{post_arg} variables missing.
DEFAULT_MAX_POST_ARGS_SIZE = 64 * 1024 * 1024

_ArgValue = Union[str, bool, List[Union[str, bool]]]


def _latin1(value: Union[str, bytes]) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value


def _unescape(text: str) -> str:
    """Percent-decode I{text} (C{+} is a space) into a latin-1 byte string."""
    text = text.replace("+", " ")
    if "%" not in text:
        return text
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        # The caller handed us already-decoded non-latin-1 text; keep its
        # UTF-8 bytes so the result is still one char per byte.
        raw = text.encode("utf-8", "surrogatepass")
    return unquote_to_bytes(raw).decode("latin-1")


def _parse_ngx_args(raw: str) -> Dict[str, _ArgValue]:
    """Parse C{a=1&b&a=2} like C{ngx.decode_args}.

    A key without C{=} is boolean C{true}; repeated keys collect into a
    list; empty keys are dropped; at most L{_MAX_ARGS} are read.
    """
    result: Dict[str, _ArgValue] = {}
    count = 0
    for piece in raw.split("&"):
        if not piece:
            continue
        if count >= _MAX_ARGS:
            break
        count += 1
        key, eq, val = piece.partition("=")
        key = _unescape(key)
        if not key:
            continue
        value: Union[str, bool] = _unescape(val) if eq else True
        existing = result.get(key)
        if existing is None:
            result[key] = value
        elif isinstance(existing, list):
            existing.append(value)
        else:
            result[key] = [existing, value]
    return result


def _first(value: Optional[_ArgValue]) -> Optional[Union[str, bool]]:
    if isinstance(value, list):
        return value[0]
    return value


def _parse_multipart(content_type: str, body: bytes) -> Dict[str, str]:
    """Return C{{field name: content}} for a multipart/form-data body.

    Like lua-multipart's C{get_all} the first part with a given name wins.
    """
    # Header values cannot carry CR/LF, but make sure ours cannot either.
    ct = content_type.replace("\r", " ").replace("\n", " ")
    raw = b"Content-Type: " + ct.encode("latin-1", "replace") + b"\r\n\r\n" + body
    message = email.parser.BytesParser().parsebytes(raw)
    fields: Dict[str, str] = {}
    if not message.is_multipart():
        return fields
    payload = message.get_payload()
    if not isinstance(payload, list):
        return fields
    for part in payload:
        if not isinstance(part, email.message.Message) or part.is_multipart():
            continue
        name = part.get_param("name", header="content-disposition")
        if name is None:
            continue
        name = email.utils.collapse_rfc2231_value(name)
        try:
            # The parser keeps undecodable header bytes as surrogates.
            name = name.encode("ascii", "surrogateescape").decode("latin-1")
        except UnicodeEncodeError:
            pass
        if name in fields:
            continue
        content = part.get_payload(decode=True)
        if content is None:
            content = b""
        fields[name] = content.decode("latin-1") if isinstance(content, bytes) else str(content)
    return fields


# JSONPath subset used when a post_arg path contains "[", "*" or "..".
_JP_NAME_RE = re.compile(r"[^.\[\]]+")
_JP_INT_RE = re.compile(r"-?\d+$")


class _UnsupportedPath(Exception):
    pass


def _jp_parse(expr: str) -> List[Tuple[bool, str, Any]]:
    """Parse C{.a..b[0]['c'][*][1:3]} into (recursive, kind, arg) steps."""
    steps: List[Tuple[bool, str, Any]] = []
    i = 0
    n = len(expr)
    while i < n:
        recursive = False
        if expr.startswith("..", i):
            recursive = True
            i += 2
        elif expr[i] == ".":
            i += 1
        elif expr[i] != "[":
            raise _UnsupportedPath(expr)
        if i >= n:
            raise _UnsupportedPath(expr)
        if expr[i] == "[":
            end = expr.find("]", i)
            if end < 0:
                raise _UnsupportedPath(expr)
            inner = expr[i + 1 : end].strip()
            i = end + 1
            if inner == "*":
                steps.append((recursive, "wild", None))
            elif inner[:1] in ("'", '"'):
                names = []
                for item in inner.split(","):
                    item = item.strip()
                    if len(item) < 2 or item[0] != item[-1] or item[0] not in "'\"":
                        raise _UnsupportedPath(expr)
                    names.append(item[1:-1])
                steps.append((recursive, "names", names))
            elif ":" in inner:
                bounds = inner.split(":")
                if len(bounds) > 3 or not all(
                    b.strip() == "" or _JP_INT_RE.match(b.strip()) for b in bounds
                ):
                    raise _UnsupportedPath(expr)
                nums = [int(b) if b.strip() else None for b in bounds]
                steps.append((recursive, "slice", slice(*nums)))
            elif inner and all(_JP_INT_RE.match(x.strip()) for x in inner.split(",")):
                steps.append(
                    (recursive, "indexes", [int(x) for x in inner.split(",")])
                )
            else:
                # Filters ?(...), script (...) and the like.
                raise _UnsupportedPath(expr)
        elif expr[i] == "*":
            i += 1
            steps.append((recursive, "wild", None))
        else:
            m = _JP_NAME_RE.match(expr, i)
            if m is None:
                raise _UnsupportedPath(expr)
            i = m.end()
            steps.append((recursive, "names", [m.group(0)]))
    return steps


def _jp_descendants(node: Any, out: List[Any]) -> None:
    """Append I{node} and everything below it to I{out}, in document order."""
    # Iterative: client-controlled nesting must not hit the recursion limit.
    stack = [node]
    while stack:
        current = stack.pop()
        out.append(current)
        if isinstance(current, dict):
            stack.extend(reversed(list(current.values())))
        elif isinstance(current, list):
            stack.extend(reversed(current))


def _jp_select(node: Any, kind: str, arg: Any, out: List[Any]) -> None:
    if kind == "names":
        if isinstance(node, dict):
            for name in arg:
                if name in node:
                    out.append(node[name])
    elif kind == "wild":
        if isinstance(node, dict):
            out.extend(node.values())
        elif isinstance(node, list):
            out.extend(node)
    elif kind == "indexes":
        if isinstance(node, list):
            size = len(node)
            for idx in arg:
                if -size <= idx < size:
                    out.append(node[idx])
    elif kind == "slice":
        if isinstance(node, list):
            out.extend(node[arg])


def _jsonpath(root: Any, path: str) -> Optional[List[Any]]:
    """Evaluate the APISIX C{$.<path>} query; C{None} when nothing matches.

    Unsupported syntax (filters, scripts) yields an empty list so the value
    still renders as a Lua table, as APISIX would for a query result.
    """
    expr = path if path[:1] in (".", "[") else "." + path
    try:
        steps = _jp_parse(expr)
    except _UnsupportedPath:
        return []
    nodes: List[Any] = [root]
    for recursive, kind, arg in steps:
        if recursive:
            expanded: List[Any] = []
            for node in nodes:
                _jp_descendants(node, expanded)
            nodes = expanded
        selected: List[Any] = []
        for node in nodes:
            _jp_select(node, kind, arg, selected)
        nodes = selected
        if not nodes:
            break
    return nodes or None


_KIND_JSON = "json"
_KIND_FORM = "form"
_KIND_MULTIPART = "multipart"
_BODY_KINDS = frozenset(
    ("application/json", "application/x-www-form-urlencoded", "multipart/form-data")
)


class RequestVariables:
    """L{VariableSource} for one client request (APISIX C{ctx.var}).

    Everything is computed lazily; the body callable is invoked at most
    once, and only when a C{post_arg} variable is looked up.
    """

    __slots__ = (
        "_method",
        "_request_uri",
        "_path",
        "_query",
        "_headers",
        "_remote_addr",
        "_remote_port",
        "_server_addr",
        "_server_port",
        "_scheme",
        "_host",
        "_body",
        "_route_id",
        "_route_name",
        "_max_post_args_size",
        "_uri_args",
        "_cookies",
        "_parsed_body",
    )

    def __init__(
        self,
        *,
        method: str,
        request_uri: str,
        path: str,
        query: str,
        headers: Headers,
        remote_addr: str,
        remote_port: int,
        server_addr: str,
        server_port: int,
        scheme: str,
        host: str,
        body: Callable[[], bytes],
        route_id: str = "",
        route_name: str = "",
        max_post_args_size: int = DEFAULT_MAX_POST_ARGS_SIZE,
    ) -> None:
        self._method = method
        self._request_uri = request_uri
        self._path = path
        self._query = query
        self._headers = headers
        self._remote_addr = remote_addr
        self._remote_port = remote_port
        self._server_addr = server_addr
        self._server_port = server_port
        self._scheme = scheme
        self._host = host
        self._body = body
        self._route_id = route_id
        self._route_name = route_name
        self._max_post_args_size = max_post_args_size
        self._uri_args: Optional[Dict[str, _ArgValue]] = None
        self._cookies: Optional[Dict[str, str]] = None
        # (kind, data, error); kind is None when the body is unusable.
        self._parsed_body: Optional[Tuple[Optional[str], Any, str]] = None

    # -- public ------------------------------------------------------------

    def lookup(self, name: str) -> Optional[Any]:
        """Resolve an APISIX variable name; C{None} when it is missing."""
        simple = _SIMPLE.get(name)
        if simple is not None:
            return simple(self)
        if name.startswith("http_"):
            return self._header(name[5:])
        if name.startswith("arg_"):
            return self._arg(name[4:])
        if name.startswith("cookie_"):
            return self._cookie(name[7:])
        if name.startswith("post_arg."):
            return self._post_arg_path(name[9:])
        if name.startswith("post_arg_"):
            return self._post_arg_form(name[9:])
        return None

    # -- simple variables --------------------------------------------------

    @classmethod
    def for_request(cls, inbound: "InboundRequest", route: "Optional[RouteConf]" = None) -> "RequestVariables":
        """The variables of C{inbound}, matched to C{route} (C{$route_id}, C{$route_name})."""
        return cls(
            method=inbound.method,
            request_uri=inbound.request_uri,
            # As every other value, the bytes the client sent (nginx's $uri
            # holds the decoded bytes), one character per byte.
            path=inbound.path if inbound.path.isascii() else inbound.path.encode(inbound.path_codec).decode("latin-1"),
            query=inbound.query,
            headers=inbound.headers,
            remote_addr=inbound.remote_addr,
            remote_port=inbound.remote_port,
            server_addr=inbound.server_addr,
            server_port=inbound.server_port,
            scheme=inbound.scheme,
            host=inbound.host,
            body=inbound.body,
            route_id=route.id if route is not None else "",
            route_name=route.name if route is not None else "",
        )

    def _route_id_var(self) -> Optional[str]:
        # api_ctx.route_id is nil in APISIX when unset, so "" is missing.
        return self._route_id or None

    def _route_name_var(self) -> Optional[str]:
        return self._route_name or None

    # -- headers / args / cookies -------------------------------------------

    def _header(self, suffix: str) -> Optional[str]:
        if not suffix:
            return None
        # nginx maps "-" to "_" in $http_* names; go back the other way.
        try:
            key = suffix.replace("_", "-").encode("ascii")
        except UnicodeEncodeError:
            return None
        values = self._headers.getRawHeaders(key)
        if not values:
            return None
        return _latin1(values[0])

    def _arg(self, key: str) -> Optional[Union[str, bool]]:
        args = self._uri_args
        if args is None:
            args = self._uri_args = _parse_ngx_args(self._query)
        return _first(args.get(key))

    def _cookie(self, key: str) -> Optional[str]:
        cookies = self._cookies
        if cookies is None:
            cookies = self._cookies = self._parse_cookies()
        return cookies.get(key)

    def _parse_cookies(self) -> Dict[str, str]:
        cookies: Dict[str, str] = {}
        for header in self._headers.getRawHeaders(b"cookie") or ():
            for pair in _latin1(header).split(";"):
                key, eq, value = pair.partition("=")
                key = key.strip(" \t")
                if not eq or not key or key in cookies:
                    continue  # first occurrence wins
                cookies[key] = value.strip(" \t")
        return cookies

    # -- request body --------------------------------------------------------

    def _content_type(self) -> str:
        values = self._headers.getRawHeaders(b"content-type")
        return _latin1(values[0]) if values else ""

    def _body_data(self) -> Tuple[Optional[str], Any, str]:
        parsed = self._parsed_body
        if parsed is None:
            parsed = self._parsed_body = self._parse_body()
        return parsed

    def _parse_body(self) -> Tuple[Optional[str], Any, str]:
        content_type = self._content_type()
        media = content_type.split(";", 1)[0].strip().lower()
        if media not in _BODY_KINDS:
            return (None, None, "unsupported content-type in header: " + content_type)
        body = self._body()
        limit = self._max_post_args_size
        if limit > 0 and len(body) > limit:
            return (
                None,
                None,
                "request body size %d exceeds max_post_args_readable_size %d"
                % (len(body), limit),
            )
        if media == "application/json":
            try:
                # cjson decodes every number as a double.
                data = json.loads(body.decode("utf-8"), parse_int=float)
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                return (None, None, "could not parse JSON request body: %s" % (e,))
            return (_KIND_JSON, data, "")
        if media == "application/x-www-form-urlencoded":
            return (_KIND_FORM, _parse_ngx_args(body.decode("latin-1")), "")
        # multipart/form-data is the only kind left.
        try:
            fields = _parse_multipart(content_type, body)
        except Exception as e:  # malformed input must not fail the request
            return (None, None, "could not parse multipart body: %s" % (e,))
        return (_KIND_MULTIPART, fields, "")

    def _post_arg_path(self, path: str) -> Optional[Any]:
        kind, data, error = self._body_data()
        if kind is None:
            _log.warn(
                "failed to fetch post args value by key: {path} error: {error}",
                path=path,
                error=error,
            )
            return None
        if "[" in path or "*" in path or ".." in path:
            return _jsonpath(data, path)
        current: Any = data
        for part in path.split("."):
            # Numeric list indexes are not supported in the dotted form.
            if not isinstance(current, dict):
                return None
            current = current.get(part, MISSING)
            if current is MISSING:
                return None
        if current is None:
            return NULL  # JSON null is present, unlike a missing key
        if kind == _KIND_JSON and current.__class__ is str:
            return to_byte_string(current)
        return current

    def _post_arg_form(self, key: str) -> Optional[Union[str, bool]]:
        media = self._content_type().split(";", 1)[0].strip().lower()
        if media != "application/x-www-form-urlencoded":
            return None
        kind, data, _ = self._body_data()
        if kind != _KIND_FORM:
            return None
        return _first(data.get(key))


_SIMPLE: Dict[str, Callable[[RequestVariables], Any]] = {
    "request_uri": lambda v: v._request_uri,
    "uri": lambda v: v._path,
    "args": lambda v: v._query,
    "query_string": lambda v: v._query,
    "request_method": lambda v: v._method,
    "method": lambda v: v._method,
    "scheme": lambda v: v._scheme,
    "host": lambda v: v._host,
    "remote_addr": lambda v: v._remote_addr,
    "remote_port": lambda v: v._remote_port,
    "server_addr": lambda v: v._server_addr,
    "server_port": lambda v: v._server_port,
    "route_id": RequestVariables._route_id_var,
    "route_name": RequestVariables._route_name_var,
}
