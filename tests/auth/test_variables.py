"""Tests for fauth.variables: template compilation and request variables."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

from twisted.logger import LogEvent, globalLogPublisher
from twisted.web.http_headers import Headers

from fauth.auth.variables import RequestVariables
from fauth.config.templates import NULL, VarRef, compile_template, lua_tostring


class DictSource:
    """VariableSource over a dict that records every lookup."""

    def __init__(self, values: Dict[str, Any]) -> None:
        self.values = values
        self.looked_up: List[str] = []

    def lookup(self, name: str) -> Optional[Any]:
        self.looked_up.append(name)
        return self.values.get(name)


class CountingBody:
    """Body callable that counts how often it is read."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls = 0

    def __call__(self) -> bytes:
        self.calls += 1
        return self.data


def make_request(
    *,
    query: str = "",
    headers: Sequence[Tuple[bytes, bytes]] = (),
    body: bytes = b"",
    content_type: Optional[str] = None,
    route_id: str = "r1",
    route_name: str = "",
) -> Tuple[RequestVariables, CountingBody]:
    """Build RequestVariables for GET/POST /api/v1?<query> with *headers*."""
    h = Headers()
    for name, value in headers:
        h.addRawHeader(name, value)
    if content_type is not None:
        h.addRawHeader(b"Content-Type", content_type.encode("latin-1"))
    counter = CountingBody(body)
    target = "/api/v1" + ("?" + query if query else "")
    request = RequestVariables(
        method="POST",
        request_uri=target,
        path="/api/v1",
        query=query,
        headers=h,
        remote_addr="10.0.0.7",
        remote_port=51234,
        server_addr="10.0.0.1",
        server_port=9080,
        scheme="http",
        host="gw.example.com",
        body=counter,
        route_id=route_id,
        route_name=route_name,
    )
    return request, counter


def render(template: str, request: RequestVariables) -> str:
    return compile_template(template).render(request)


def render_json(template: str, payload: Any) -> str:
    request, _ = make_request(
        body=json.dumps(payload).encode("utf-8"), content_type="application/json"
    )
    return render(template, request)


# -- template compilation ---------------------------------------------------


def test_literal_passthrough_never_calls_lookup() -> None:
    template = compile_template("abcd")
    source = DictSource({"abcd": "nope"})
    assert template.is_literal
    assert template.render(source) == "abcd"
    assert source.looked_up == []


def test_template_with_variable_is_not_literal() -> None:
    template = compile_template("x-$host")
    assert not template.is_literal
    assert template.parts == ("x-", VarRef("host"))


def test_mixed_literal_and_variables() -> None:
    source = DictSource({"host": "h.example", "scheme": "https"})
    assert compile_template("a-$host-b/$scheme").render(source) == "a-h.example-b/https"


def test_missing_variable_renders_empty() -> None:
    request, _ = make_request()
    assert render("[$http_x_nope]", request) == "[]"


def test_braced_default_used_when_missing() -> None:
    request, _ = make_request()
    assert render("${http_x_nope ?? dflt}", request) == "dflt"
    assert render("${ http_x_nope??dflt }", request) == "dflt"


def test_braced_default_ignored_when_present() -> None:
    request, _ = make_request(headers=[(b"X-Here", b"yes")])
    assert render("${http_x_here ?? dflt}", request) == "yes"


def test_backslash_escaped_dollar_left_alone() -> None:
    source = DictSource({"host": "h"})
    template = compile_template("\\$host and $host")
    assert template.render(source) == "\\$host and h"
    assert source.looked_up == ["host"]


def test_dotted_name_is_greedy() -> None:
    template = compile_template("$post_arg.a.b-x")
    assert template.parts == (VarRef("post_arg.a.b"), "-x")


def test_lone_dollar_and_unclosed_brace_are_literal() -> None:
    template = compile_template("cost: $ ${unclosed")
    assert template.is_literal
    assert template.render(DictSource({})) == "cost: $ ${unclosed"


# -- lua_tostring -----------------------------------------------------------


def test_lua_tostring_scalars() -> None:
    assert lua_tostring(True) == "true"
    assert lua_tostring(False) == "false"
    assert lua_tostring(123) == "123"
    assert lua_tostring(1.5) == "1.5"
    assert lua_tostring(123.0) == "123"
    assert lua_tostring(None) == "userdata: NULL"
    assert lua_tostring(NULL) == "userdata: NULL"
    assert lua_tostring(b"\xe9t\xe9") == "\xe9t\xe9"


def test_lua_tostring_tables() -> None:
    value = {"a": 1}
    assert lua_tostring(value) == "table: 0x%08x" % id(value)
    assert lua_tostring([1, 2]).startswith("table: 0x")


# -- request variables ------------------------------------------------------


def test_simple_request_variables() -> None:
    request, _ = make_request(query="a=1&b=2")
    assert render("$request_method $uri $request_uri $args", request) == (
        "POST /api/v1 /api/v1?a=1&b=2 a=1&b=2"
    )
    assert render("$remote_addr:$remote_port $server_port $host", request) == (
        "10.0.0.7:51234 9080 gw.example.com"
    )
    assert render("$route_id", request) == "r1"


def test_empty_query_string_and_unset_route_name() -> None:
    request, _ = make_request()
    assert request.lookup("query_string") == ""
    assert render("${route_name ?? unnamed}", request) == "unnamed"


def test_arg_is_percent_decoded_including_crlf() -> None:
    request, _ = make_request(query="user=guest%0d%0ax-user1:%20admin")
    assert render("$arg_user", request) == "guest\r\nx-user1: admin"


def test_arg_plus_first_value_and_flag() -> None:
    request, _ = make_request(query="q=a+b&q=second&flag")
    assert request.lookup("arg_q") == "a b"
    # ngx.req.get_uri_args: an argument without "=" is boolean true.
    assert render("$arg_flag", request) == "true"
    assert request.lookup("arg_missing") is None


def test_http_header_case_insensitive_with_underscores() -> None:
    request, _ = make_request(headers=[(b"X-User-Id", b"42"), (b"X-User-Id", b"43")])
    assert render("$http_x_user_id", request) == "42"
    assert render("$http_X_USER_ID", request) == "42"


def test_cookie_exact_name_first_occurrence() -> None:
    request, _ = make_request(
        headers=[
            (b"Cookie", b"a=b; sid=abc123; xsid=nope"),
            (b"Cookie", b"sid=later"),
        ]
    )
    assert render("$cookie_sid", request) == "abc123"
    assert request.lookup("cookie_id") is None


def test_post_arg_json_number() -> None:
    assert render_json("$post_arg.tenant_id", {"tenant_id": 123}) == "123"
    assert render_json("$post_arg.ratio", {"ratio": 1.5}) == "1.5"


def test_post_arg_form_keeps_string() -> None:
    request, _ = make_request(
        body=b"tenant_id=000&x=1", content_type="application/x-www-form-urlencoded"
    )
    assert render("$post_arg.tenant_id", request) == "000"
    assert render("$post_arg_tenant_id", request) == "000"


def test_post_arg_form_repeated_key_is_table() -> None:
    request, _ = make_request(
        body=b"k=1&k=2", content_type="Application/X-WWW-Form-Urlencoded; charset=utf-8"
    )
    assert render("$post_arg.k", request).startswith("table: 0x")
    assert render("$post_arg_k", request) == "1"


def test_post_arg_json_nested_path() -> None:
    payload = {"user": {"id": "u-7", "profile": {"admin": False}}}
    assert render_json("$post_arg.user.id", payload) == "u-7"
    assert render_json("$post_arg.user.profile.admin", payload) == "false"
    assert render_json("[$post_arg.user.nope.deeper]", payload) == "[]"


def test_post_arg_json_null_bool_and_object() -> None:
    payload = {"n": None, "b": True, "obj": {"a": 1}}
    assert render_json("${post_arg.n ?? dflt}", payload) == "userdata: NULL"
    assert render_json("$post_arg.b", payload) == "true"
    assert render_json("$post_arg.obj", payload).startswith("table: 0x")


def test_post_arg_json_list_index_not_supported_in_dotted_form() -> None:
    assert render_json("[$post_arg.items.0]", {"items": ["a"]}) == "[]"


def test_post_arg_jsonpath_returns_table() -> None:
    request, _ = make_request(
        body=b'{"messages": [{"role": "user"}, {"role": "system"}]}',
        content_type="application/json",
    )
    assert request.lookup("post_arg.messages[*].role") == ["user", "system"]
    assert render("$post_arg.messages[1].role", request).startswith("table: 0x")
    assert request.lookup("post_arg.messages[*].nope") is None


def test_post_arg_json_non_ascii_string_is_utf8_bytes() -> None:
    assert render_json("$post_arg.name", {"name": "é"}) == "\xc3\xa9"


def test_post_arg_multipart_text_field() -> None:
    boundary = "XyZ123"
    body = (
        "--XyZ123\r\n"
        'Content-Disposition: form-data; name="tenant_id"\r\n'
        "\r\n"
        "t-9\r\n"
        "--XyZ123\r\n"
        'Content-Disposition: form-data; name="file"; filename="a.txt"\r\n'
        "Content-Type: text/plain\r\n"
        "\r\n"
        "line1\r\nline2\r\n"
        "--XyZ123--\r\n"
    ).encode("latin-1")
    request, _ = make_request(
        body=body, content_type="multipart/form-data; boundary=" + boundary
    )
    assert render("$post_arg.tenant_id|$post_arg.file", request) == (
        "t-9|line1\r\nline2"
    )


def test_post_arg_invalid_json_is_missing_and_body_read_once() -> None:
    request, counter = make_request(body=b"{nope", content_type="application/json")
    assert render("${post_arg.a ?? d1}${post_arg.b ?? d2}", request) == "d1d2"
    assert counter.calls == 1


def test_post_arg_unsupported_content_type_logs_warning() -> None:
    events: List[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        request, _ = make_request(body=b"tenant_id=1", content_type="text/plain")
        assert request.lookup("post_arg.tenant_id") is None
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [
        e["log_format"].format(**e)
        for e in events
        if e.get("log_namespace") == "fauth.auth.variables"
    ]
    assert any(
        t.startswith("failed to fetch post args value by key: tenant_id") for t in texts
    )


def test_post_arg_underscore_form_only() -> None:
    request, counter = make_request(
        body=b'{"tenant_id": 1}', content_type="application/json"
    )
    assert request.lookup("post_arg_tenant_id") is None
    assert counter.calls == 0


def test_body_called_once_across_many_lookups() -> None:
    request, counter = make_request(
        body=b'{"a": 1, "b": {"c": 2}}', content_type="application/json"
    )
    assert render("$post_arg.a-$post_arg.b.c-$post_arg.a", request) == "1-2-1"
    assert counter.calls == 1


def test_body_not_read_without_post_arg_variables() -> None:
    request, counter = make_request(
        query="user=u",
        headers=[(b"Cookie", b"sid=s")],
        body=b'{"a": 1}',
        content_type="application/json",
    )
    assert render("$arg_user $cookie_sid $http_content_type $uri", request) == (
        "u s application/json /api/v1"
    )
    assert counter.calls == 0


def test_unknown_variable_is_missing() -> None:
    request, _ = make_request()
    assert request.lookup("no_such_var") is None
    assert render("${upstream_addr ?? none}", request) == "none"


def test_post_arg_jsonpath_recursive_descent() -> None:
    request, _ = make_request(
        body=b'{"a": {"id": 1, "b": {"id": 2}}}', content_type="application/json"
    )
    assert request.lookup("post_arg.a..id") == [1.0, 2.0]
    # "post_arg..id" leaves ".id", which APISIX walks as a dotted path.
    assert request.lookup("post_arg..id") is None


def test_post_arg_body_over_size_cap_is_missing() -> None:
    h = Headers()
    h.addRawHeader(b"Content-Type", b"application/json")
    request = RequestVariables(
        method="POST", request_uri="/", path="/", query="", headers=h,
        remote_addr="127.0.0.1", remote_port=1, server_addr="127.0.0.1",
        server_port=2, scheme="http", host="h",
        body=lambda: b'{"tenant_id": "0123456789"}',
        max_post_args_size=10,
    )
    assert render("${post_arg.tenant_id ?? big}", request) == "big"


def test_render_bytes_keeps_wire_bytes_and_utf8_literals() -> None:
    request, _ = make_request(headers=[(b"X-Name", b"\xc3\xa9\xff")])
    mixed = compile_template("\u00e9-$http_x_name")
    assert mixed.render_bytes(request) == b"\xc3\xa9-\xc3\xa9\xff"
    assert compile_template("\u20ac").render_bytes(request) == "\u20ac".encode("utf-8")
    assert compile_template("abcd").render_bytes(request) == b"abcd"


def test_known_variable_names_are_those_resolved() -> None:
    # A uri with variables is refused at load for an unknown name
    # (fauth.config.templates); that list must be what RequestVariables knows.
    from fauth.auth.variables import _SIMPLE
    from fauth.config.templates import VARIABLE_NAMES, is_known_variable

    assert set(_SIMPLE) == VARIABLE_NAMES
    variables = RequestVariables(
        method="GET", request_uri="/", path="/", query="a=1", headers=Headers({b"x-a": [b"v"], b"cookie": [b"c=1"]}),
        remote_addr="", remote_port=0, server_addr="", server_port=0, scheme="http", host="h",
        body=lambda: b"", route_id="", route_name="",
    )
    for name in ("http_x_a", "arg_a", "cookie_c"):
        assert is_known_variable(name) and variables.lookup(name) is not None
    assert not is_known_variable("http_") and not is_known_variable("nope")
