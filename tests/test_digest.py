"""Attacks on trusthop.digest: what the newest ring binds to (invariant 3).

The digest must cover every attribute but the documented unsigned ones, give
one canonical form per value, and turn every odd input into ``malformed``.
"""

from __future__ import annotations

import hashlib
import sys
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from chainkit import make_event, rejected

from trusthop.canonical import pack
from trusthop.digest import (
    UNSIGNED_ATTRIBUTES,
    canonical_json,
    canonical_time,
    canonical_value,
    data_bytes,
    event_digest,
    is_json_content_type,
    is_valid_attribute_name,
    signed_attributes,
)
from trusthop.errors import Reason

R = Reason
BASE = {"specversion": "1.0", "id": "e1", "source": "/s", "type": "t"}


# -- time -------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "canonical"), [
    ("2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z"),
    ("2026-01-01t00:00:00z", "2026-01-01T00:00:00Z"),
    ("2026-01-01T02:00:00+02:00", "2026-01-01T00:00:00Z"),
    ("2025-12-31T19:00:00-05:00", "2026-01-01T00:00:00Z"),
    ("2026-01-01T05:45:00+05:45", "2026-01-01T00:00:00Z"),
    ("2026-01-01T00:00:00+00:00", "2026-01-01T00:00:00Z"),
    ("2026-01-01T00:00:00-00:00", "2026-01-01T00:00:00Z"),
    ("2026-01-01T00:00:00.120Z", "2026-01-01T00:00:00.12Z"),
    ("2026-01-01T00:00:00.000Z", "2026-01-01T00:00:00Z"),
    ("2026-01-01T00:00:00.0Z", "2026-01-01T00:00:00Z"),
    ("2026-01-01T00:00:00.123456789Z", "2026-01-01T00:00:00.123456789Z"),
    ("2026-01-01T01:30:00.5+01:30", "2026-01-01T00:00:00.5Z"),
    ("2024-02-29T23:59:59Z", "2024-02-29T23:59:59Z"),
    ("2026-03-01T00:30:00+01:00", "2026-02-28T23:30:00Z"),
    ("0999-06-01T00:00:00Z", "0999-06-01T00:00:00Z"),
    ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00Z"),
    ("9999-12-31T23:59:59-00:00", "9999-12-31T23:59:59Z"),
])
def test_canonical_time(text: str, canonical: str) -> None:
    assert canonical_time(text) == canonical


@pytest.mark.parametrize("moment", [
    datetime(2026, 1, 1, 2, 0, 0, 120000, tzinfo=timezone(timedelta(hours=2))),
    datetime(2025, 12, 31, 23, 0, 0, 120000, tzinfo=timezone(timedelta(hours=-1))),
    datetime(2026, 1, 1, 0, 0, 0, 120000, tzinfo=UTC),
])
def test_datetime_and_text_forms_agree(moment: datetime) -> None:
    assert canonical_time(moment) == "2026-01-01T00:00:00.12Z"
    assert canonical_time(moment) == canonical_time("2026-01-01T03:00:00.120000+03:00")


@pytest.mark.parametrize("text", [
    "2026-01-01 00:00:00Z", "2026-01-01T00:00:00", "2026-01-01", "2026-1-01T00:00:00Z",
    "2026-13-01T00:00:00Z", "2026-02-30T00:00:00Z", "2025-02-29T00:00:00Z",
    "2026-01-01T24:00:00Z", "2026-01-01T00:60:00Z", "2026-12-31T23:59:60Z",
    "2026-01-01T00:00:00+24:00", "2026-01-01T00:00:00+23:60", "2026-01-01T00:00:00+0100",
    "2026-01-01T00:00:00.Z", "2026-01-01T00:00:00.1234567890Z", "2026-01-01T00:00:00,5Z",
    "0000-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:00:00-02:00",
    "2026-01-01T00:00:00Z\n", " 2026-01-01T00:00:00Z", "+2026-01-01T00:00:00Z",
    "\u0662\u0660\u0662\u0666-01-01T00:00:00Z",  # Arabic-Indic digits
    "2026-01-01T00:00:00.\u0661Z", "\uff12\uff10\uff12\uff16-01-01T00:00:00Z",
    "2026-01-01T00:00:00+0\u0661:00", "",
])
def test_invalid_time_is_malformed(text: str) -> None:
    rejected(lambda: canonical_time(text), R.MALFORMED)


def test_non_ascii_digits_do_not_alias_the_ascii_time() -> None:
    attrs = BASE | {"time": "\u0662\u0660\u0662\u0666-01-01T00:00:00Z"}
    rejected(lambda: event_digest(attrs, None), R.MALFORMED)


def test_naive_datetime_is_malformed() -> None:
    rejected(lambda: canonical_time(datetime(2026, 1, 1)), R.MALFORMED)


# -- values -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("flag", True, "true"), ("flag", False, "false"),
    ("count", 0, "0"), ("count", -5, "-5"), ("count", 2**31 - 1, "2147483647"),
    ("count", -(2**31), "-2147483648"),
    ("blob", b"\xff\x00", "/wA="), ("blob", b"", ""),
    ("when", datetime(2026, 1, 1, tzinfo=UTC), "2026-01-01T00:00:00Z"),
    ("text", "plain \u00e9\u2028\U0001f600", "plain \u00e9\u2028\U0001f600"),
    ("time", "2026-01-01T01:00:00+01:00", "2026-01-01T00:00:00Z"),
])
def test_canonical_value(name: str, value: Any, expected: str) -> None:
    assert canonical_value(name, value) == expected


@pytest.mark.parametrize(("name", "value"), [
    ("count", 2**31), ("count", -(2**31) - 1), ("count", 10**100),
    ("x", 1.5), ("x", None), ("x", [1]), ("x", {"a": 1}), ("x", object()),
    ("time", 1767225600), ("time", True), ("time", b"2026-01-01T00:00:00Z"),
    ("x", "a\x00b"), ("x", "line\nbreak"), ("x", "cr\r"), ("x", "tab\t"), ("x", "\x1b[31m"),
    ("x", "del\x7f"), ("x", "nel\x85"), ("x", "c1\x9f"),
])
def test_unsupported_or_unsafe_values_are_malformed(name: str, value: Any) -> None:
    rejected(lambda: canonical_value(name, value), R.MALFORMED)


@pytest.mark.parametrize("name", ["Type", "a_b", "a-b", "x" * 21, "", "caf\u00e9", "data base",
                                  "\uff41", "type\n"])
def test_invalid_attribute_names(name: str) -> None:
    assert not is_valid_attribute_name(name)
    rejected(lambda: signed_attributes(BASE | {name: "v"}), R.MALFORMED)


def test_valid_attribute_names() -> None:
    for name in ("a", "x" * 20, "trustchain", "datacontenttype", "v2"):
        assert is_valid_attribute_name(name)


def test_signed_attributes_exclude_exactly_the_documented_ones() -> None:
    assert {"trustchain", "traceparent", "tracestate"} == UNSIGNED_ATTRIBUTES
    attrs = BASE | {"trustchain": "x", "traceparent": "y", "tracestate": "z", "other": "w",
                    "absent": None}
    assert signed_attributes(attrs) == BASE | {"other": "w"}


# -- data ------------------------------------------------------------------------------


@pytest.mark.parametrize(("content_type", "expected"), [
    ("application/json", True), ("application/json; charset=utf-8", True),
    ("APPLICATION/JSON", True), (" text/json ", True), ("application/cloudevents+json", True),
    ("application/vnd.api+json;v=1", True), ("application/jsonx", False),
    ("text/plain", False), ("application/octet-stream", False), (None, False), ("", False),
    ("json", False),
])
def test_is_json_content_type(content_type: str | None, expected: bool) -> None:
    assert is_json_content_type(content_type) is expected


@pytest.mark.parametrize(("data", "content_type", "json_default", "expected"), [
    (None, "application/json", False, None),
    (b"raw", "application/json", False, b"raw"),
    (bytearray(b"raw"), None, False, b"raw"),
    (memoryview(b"raw"), "text/plain", False, b"raw"),
    ({"b": 1, "a": [1, 2]}, "application/json", False, b'{"a":[1,2],"b":1}'),
    ({"b": 1, "a": 2}, None, False, b'{"a":2,"b":1}'),
    ("text", "application/json", False, b'"text"'),
    ("text", None, True, b'"text"'),
    ("text", None, False, b"text"),
    ("t\u00e9xt", "text/plain", False, "t\u00e9xt".encode()),
    ({"\u00e9": "\u2603"}, "application/json", False, '{"\u00e9":"\u2603"}'.encode()),
    (5, "text/plain", False, b"5"),
    (None, None, True, None),
])
def test_data_bytes(data: Any, content_type: str | None, json_default: bool,
                    expected: bytes | None) -> None:
    assert data_bytes(data, content_type, json_default=json_default) == expected


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {"a": float("-inf")}, {1, 2},
                                   {"a": object()}, b"bytes", "\ud800", {("t",): 1}])
def test_canonical_json_refuses_what_json_cannot_say(value: Any) -> None:
    rejected(lambda: canonical_json(value), R.MALFORMED)


def test_canonical_json_of_deep_values_is_malformed_not_a_crash() -> None:
    value: Any = []
    for _ in range(sys.getrecursionlimit() + 50):
        value = [value]
    rejected(lambda: canonical_json(value), R.MALFORMED)


def test_canonical_json_form() -> None:
    assert canonical_json({"b": [1, {"d": 1, "c": None}], "a": "\u00e9"}) == \
        '{"a":"\u00e9","b":[1,{"c":null,"d":1}]}'.encode()


# -- the digest ----------------------------------------------------------------------------


def test_digest_is_sha256_of_the_documented_payload() -> None:
    attrs = BASE | {"flag": True, "time": "2026-01-01T01:00:00+01:00"}
    expected_attrs = {"flag": "true", "id": "e1", "source": "/s", "specversion": "1.0",
                      "time": "2026-01-01T00:00:00Z", "type": "t"}
    payload = pack(["trusthop/v1/event", expected_attrs, b"data"])
    assert event_digest(attrs, b"data") == hashlib.sha256(payload).digest()


def test_attribute_order_does_not_matter() -> None:
    attrs = BASE | {"a": "1", "b": "2"}
    assert event_digest(attrs, None) == event_digest(dict(reversed(list(attrs.items()))), None)


def test_typed_and_string_forms_have_one_digest() -> None:
    # Binary mode delivers strings; the structured format and AMQP may deliver types.
    typed = BASE | {"count": 5, "flag": True, "blob": b"\xff"}
    strings = BASE | {"count": "5", "flag": "true", "blob": "/w=="}
    assert event_digest(typed, None) == event_digest(strings, None)


def test_no_data_empty_data_and_null_differ() -> None:
    assert event_digest(BASE, None) != event_digest(BASE, b"")
    assert event_digest(BASE, None) != event_digest(BASE, b"null")


@pytest.mark.parametrize("change", [
    {"id": "e2"}, {"source": "/t"}, {"type": "u"}, {"specversion": "1.1"},
    {"subject": "x"}, {"datacontenttype": "application/json"}, {"dataschema": "urn:x"},
    {"time": "2026-01-01T00:00:00Z"}, {"ext": ""}, {"ext": "0"},
])
def test_every_signed_attribute_changes_the_digest(change: dict[str, str]) -> None:
    assert event_digest(BASE | change, b"d") != event_digest(BASE, b"d")


def test_attribute_and_data_boundaries_cannot_be_shifted() -> None:
    # Moving bytes between an attribute value and the data must change the digest.
    a = event_digest(BASE | {"x": "ab"}, b"c")
    b = event_digest(BASE | {"x": "a"}, b"bc")
    assert a != b
    assert event_digest(BASE | {"x": "1"}, None) != event_digest(BASE | {"x1": ""}, None)


@pytest.mark.parametrize("unsigned", sorted(UNSIGNED_ATTRIBUTES))
def test_unsigned_attributes_do_not_change_the_digest(unsigned: str) -> None:
    assert event_digest(BASE | {unsigned: "anything"}, b"d") == event_digest(BASE, b"d")


def test_wire_event_digest_uses_the_data_bytes() -> None:
    event = make_event("e", data={"z": 1, "a": 2})
    assert event.data == b'{"a":2,"z":1}'
    assert event.digest() == event_digest(event.attributes, event.data)
