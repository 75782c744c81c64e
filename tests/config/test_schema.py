"""Tests for fauth.config.schema: APISIX forward-auth schema checks and wording."""

from __future__ import annotations

import copy
from typing import Any, Dict

import pytest

from fauth.config.schema import (
    FORWARD_AUTH_DEFAULTS,
    SchemaError,
    check_forward_auth,
    check_integer,
    check_integer_range,
    check_type,
    security_warnings,
    type_name,
)

URI = "http://127.0.0.1:1984/auth"


def _conf(**extra: Any) -> Dict[str, Any]:
    conf: Dict[str, Any] = {"uri": URI}
    conf.update(extra)
    return conf


def _error(conf: object) -> str:
    with pytest.raises(SchemaError) as info:
        check_forward_auth(conf)
    # str() and .message must both be the bare APISIX text.
    assert info.value.message == str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------
# Exact error messages
# --------------------------------------------------------------------------


def test_uri_missing() -> None:
    assert _error({}) == 'property "uri" is required'


def test_uri_missing_reported_first() -> None:
    assert _error({"timeout": 0}) == 'property "uri" is required'


def test_uri_wrong_type() -> None:
    assert _error({"uri": 3233}) == (
        'property "uri" validation failed: wrong type: expected string, got number'
    )


def test_request_headers_not_array() -> None:
    assert _error(_conf(request_headers="test")) == (
        'property "request_headers" validation failed: wrong type: expected array, got string'
    )


def test_request_headers_bad_item() -> None:
    assert _error(_conf(request_headers=["a", 1])) == (
        'property "request_headers" validation failed: failed to validate item 2: '
        "wrong type: expected string, got number"
    )


@pytest.mark.parametrize("prop", ["upstream_headers", "client_headers"])
def test_other_header_arrays_bad_item(prop: str) -> None:
    assert _error(_conf(**{prop: [None]})) == (
        f'property "{prop}" validation failed: failed to validate item 1: '
        "wrong type: expected string, got null"
    )


def test_request_method_enum() -> None:
    assert _error(_conf(request_method="PUT")) == (
        'property "request_method" validation failed: matches none of the enum values'
    )


def test_request_method_wrong_type() -> None:
    assert _error(_conf(request_method=1)) == (
        'property "request_method" validation failed: wrong type: expected string, got number'
    )


@pytest.mark.parametrize(
    "prop, value, expected",
    [
        ("timeout", 0, 'property "timeout" validation failed: expected 0 to be at least 1'),
        (
            "timeout",
            60001,
            'property "timeout" validation failed: expected 60001 to be at most 60000',
        ),
        (
            "status_on_error",
            600,
            'property "status_on_error" validation failed: expected 600 to be at most 599',
        ),
        (
            "status_on_error",
            199,
            'property "status_on_error" validation failed: expected 199 to be at least 200',
        ),
        (
            "keepalive_timeout",
            999,
            'property "keepalive_timeout" validation failed: expected 999 to be at least 1000',
        ),
        (
            "keepalive_pool",
            0,
            'property "keepalive_pool" validation failed: expected 0 to be at least 1',
        ),
        (
            "max_req_body_size",
            0,
            'property "max_req_body_size" validation failed: expected 0 to be at least 1',
        ),
    ],
)
def test_integer_bounds(prop: str, value: int, expected: str) -> None:
    assert _error(_conf(**{prop: value})) == expected


@pytest.mark.parametrize(
    "prop, value",
    [
        ("timeout", 1),
        ("timeout", 60000),
        ("status_on_error", 200),
        ("status_on_error", 599),
        ("keepalive_timeout", 1000),
        ("keepalive_pool", 1),
        ("max_req_body_size", 1),
    ],
)
def test_integer_bounds_inclusive(prop: str, value: int) -> None:
    assert check_forward_auth(_conf(**{prop: value}))[prop] == value


def test_extra_headers_empty_object() -> None:
    assert _error(_conf(extra_headers={})) == (
        'property "extra_headers" validation failed: expect object to have at least 1 properties'
    )


def test_extra_headers_empty_list_is_empty_object() -> None:
    # Lua cannot tell [] from {}: an empty list fails minProperties, not the type.
    assert _error(_conf(extra_headers=[])) == (
        'property "extra_headers" validation failed: expect object to have at least 1 properties'
    )


def test_extra_headers_non_string_value() -> None:
    assert _error(_conf(extra_headers={"X-A": 1})) == (
        'property "extra_headers" validation failed: failed to validate X-A '
        '(matching "^[^:]+$"): wrong type: expected string, got number'
    )


def test_extra_headers_colon_keys_not_validated() -> None:
    out = check_forward_auth(_conf(extra_headers={"X:A": 1, "X-B": "$uri"}))
    assert out["extra_headers"] == {"X:A": 1, "X-B": "$uri"}


def test_extra_headers_non_empty_list() -> None:
    assert _error(_conf(extra_headers=["a"])) == (
        'property "extra_headers" validation failed: wrong type: expected object, got array'
    )


@pytest.mark.parametrize("prop", ["ssl_verify", "keepalive", "allow_degradation"])
def test_boolean_given_string(prop: str) -> None:
    assert _error(_conf(**{prop: "true"})) == (
        f'property "{prop}" validation failed: wrong type: expected boolean, got string'
    )


def test_integer_given_fraction() -> None:
    assert _error(_conf(timeout=1.5)) == (
        'property "timeout" validation failed: wrong type: expected integer, got number'
    )


def test_integer_given_bool() -> None:
    assert _error(_conf(timeout=True)) == (
        'property "timeout" validation failed: wrong type: expected integer, got boolean'
    )


def test_integer_given_string() -> None:
    assert _error(_conf(keepalive_pool="5")) == (
        'property "keepalive_pool" validation failed: wrong type: expected integer, got string'
    )


def test_float_integer_accepted_and_stored_as_int() -> None:
    out = check_forward_auth(_conf(timeout=3000.0, status_on_error=500.0))
    assert out["timeout"] == 3000 and type(out["timeout"]) is int
    assert out["status_on_error"] == 500 and type(out["status_on_error"]) is int


def test_float_integer_out_of_range_message() -> None:
    # Lua prints 0.0 as "0"; so must we.
    assert _error(_conf(timeout=0.0)) == (
        'property "timeout" validation failed: expected 0 to be at least 1'
    )


def test_empty_dict_is_empty_array() -> None:
    out = check_forward_auth(_conf(request_headers={}))
    assert out["request_headers"] == []


def test_non_empty_dict_is_not_array() -> None:
    assert _error(_conf(request_headers={"a": "b"})) == (
        'property "request_headers" validation failed: wrong type: expected array, got object'
    )


@pytest.mark.parametrize(
    "conf, got",
    [("x", "string"), (1, "number"), (None, "null"), (True, "boolean"), (["uri"], "array")],
)
def test_conf_not_object(conf: object, got: str) -> None:
    assert _error(conf) == f"wrong type: expected object, got {got}"


def test_conf_empty_list_is_empty_object() -> None:
    assert _error([]) == 'property "uri" is required'


def test_meta_must_be_object() -> None:
    assert _error(_conf(_meta="x")) == (
        'property "_meta" validation failed: wrong type: expected object, got string'
    )


def test_first_failure_in_table_order() -> None:
    conf = _conf(status_on_error=1, timeout=0, request_method="PUT", ssl_verify="no")
    assert _error(conf) == (
        'property "ssl_verify" validation failed: wrong type: expected boolean, got string'
    )


# --------------------------------------------------------------------------
# Defaults, copying, pass-through
# --------------------------------------------------------------------------


def test_defaults_filled() -> None:
    out = check_forward_auth({"uri": URI})
    assert out == {
        "uri": URI,
        "ssl_verify": True,
        "request_method": "GET",
        "max_req_body_size": 67108864,
        "request_headers": [],
        "upstream_headers": [],
        "client_headers": [],
        "timeout": 3000,
        "keepalive": True,
        "keepalive_timeout": 60000,
        "keepalive_pool": 5,
        "allow_degradation": False,
        "status_on_error": 403,
    }
    assert "extra_headers" not in out
    assert dict(FORWARD_AUTH_DEFAULTS) == {k: v for k, v in out.items() if k != "uri"}


def test_default_lists_not_shared() -> None:
    first = check_forward_auth({"uri": URI})
    first["request_headers"].append("X-Leak")  # type: ignore[union-attr]
    second = check_forward_auth({"uri": URI})
    assert second["request_headers"] == []
    assert FORWARD_AUTH_DEFAULTS["request_headers"] == []


def test_given_values_kept() -> None:
    conf = {
        "uri": "https://auth.example/verify",
        "ssl_verify": False,
        "request_method": "POST",
        "max_req_body_size": 10,
        "request_headers": ["Authorization"],
        "extra_headers": {"X-User": "$remote_addr"},
        "upstream_headers": ["X-User-ID"],
        "client_headers": ["Location"],
        "timeout": 60000,
        "keepalive": False,
        "keepalive_timeout": 1000,
        "keepalive_pool": 1,
        "allow_degradation": True,
        "status_on_error": 503,
        "_meta": {"disable": False},
    }
    assert check_forward_auth(conf) == conf


def test_unknown_keys_kept() -> None:
    marker = object()
    out = check_forward_auth(_conf(foo="bar", nested={"a": [1]}, weird=marker))
    assert out["foo"] == "bar"
    assert out["nested"] == {"a": [1]}
    assert out["weird"] is marker


def test_input_not_mutated() -> None:
    conf = _conf(request_headers=["a"], extra_headers={"X-A": "b"}, timeout=3000.0)
    snapshot = copy.deepcopy(conf)
    out = check_forward_auth(conf)
    assert conf == snapshot
    assert type(conf["timeout"]) is float
    assert out is not conf
    # Containers we validated are copies, so later edits don't leak back.
    assert out["request_headers"] is not conf["request_headers"]
    assert out["extra_headers"] is not conf["extra_headers"]


# --------------------------------------------------------------------------
# Security warnings (APISIX t/plugin/security-warning.t TEST 13/14)
# --------------------------------------------------------------------------


def test_warning_http_uri() -> None:
    conf = check_forward_auth({"uri": "http://127.0.0.1:9999"})
    assert security_warnings(conf) == ["Using forward-auth uri with no TLS is a security risk"]


def test_no_warning_https_uri() -> None:
    conf = check_forward_auth({"uri": "https://127.0.0.1:9999"})
    assert security_warnings(conf) == []


def test_warning_uri_prefix_case_sensitive() -> None:
    assert security_warnings({"uri": "HTTPS://example"}) == [
        "Using forward-auth uri with no TLS is a security risk"
    ]


def test_warning_ssl_verify_disabled() -> None:
    assert security_warnings({"uri": "https://a", "ssl_verify": False}) == [
        "Keeping ssl_verify disabled in forward-auth configuration is a security risk"
    ]
    assert security_warnings({"uri": "http://a", "ssl_verify": False}) == [
        "Using forward-auth uri with no TLS is a security risk",
        "Keeping ssl_verify disabled in forward-auth configuration is a security risk",
    ]


def test_no_ssl_verify_warning_when_absent_or_true() -> None:
    assert security_warnings({"uri": "https://a"}) == []
    assert security_warnings({"uri": "https://a", "ssl_verify": True}) == []


# --------------------------------------------------------------------------
# Generic helpers
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, name",
    [
        ("s", "string"),
        (True, "boolean"),
        (False, "boolean"),
        (1, "number"),
        (1.5, "number"),
        ([], "array"),
        ((), "array"),
        ({}, "object"),
        (None, "null"),
    ],
)
def test_type_name(value: object, name: str) -> None:
    assert type_name(value) == name


def test_check_type_helper() -> None:
    with pytest.raises(SchemaError) as info:
        check_type("host", 1, "string")
    assert str(info.value) == (
        'property "host" validation failed: wrong type: expected string, got number'
    )
    assert check_type("port", 80.0, "integer") == 80
    assert check_type("nodes", {}, "array") == []
    assert check_type("x", None, "null") is None


def test_check_integer_range_helper() -> None:
    check_integer_range("port", 1, minimum=1, maximum=65535)
    with pytest.raises(SchemaError) as info:
        check_integer_range("port", 65536, minimum=1, maximum=65535)
    assert str(info.value) == 'property "port" validation failed: expected 65536 to be at most 65535'
    with pytest.raises(SchemaError) as info:
        check_integer("retries", -1, minimum=0)
    assert str(info.value) == 'property "retries" validation failed: expected -1 to be at least 0'


def test_schema_error_is_value_error() -> None:
    assert issubclass(SchemaError, ValueError)


# --------------------------------------------------------------------------
# Property-based: never any exception other than SchemaError
# --------------------------------------------------------------------------

try:
    import hypothesis
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    hypothesis = None  # type: ignore[assignment]

if hypothesis is not None:
    _scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=10)
    )
    _json = st.recursive(
        _scalars,
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=6), children, max_size=4),
        max_leaves=12,
    )
    _field_names = st.sampled_from(sorted(FORWARD_AUTH_DEFAULTS) + ["uri", "extra_headers", "_meta"])
    # Mostly confs that use the real attribute names, so each checker is reached.
    _confs = st.dictionaries(_field_names | st.text(max_size=6), _json, max_size=8) | _json

    @hypothesis.settings(max_examples=400, deadline=None)
    @hypothesis.given(_confs)
    def test_arbitrary_documents_only_raise_schema_error(doc: object) -> None:
        snapshot = copy.deepcopy(doc)
        try:
            out = check_forward_auth(doc)
        except SchemaError as err:
            assert str(err)
        else:
            assert isinstance(out, dict)
            assert isinstance(out["uri"], str)
            for key in FORWARD_AUTH_DEFAULTS:
                assert key in out
            security_warnings(out)
        # Compare reprs: NaN != NaN would defeat ==.
        assert repr(doc) == repr(snapshot)

else:  # pragma: no cover

    @pytest.mark.skip(reason="hypothesis not installed")
    def test_arbitrary_documents_only_raise_schema_error() -> None:
        """Placeholder so the skip is visible in the report."""
