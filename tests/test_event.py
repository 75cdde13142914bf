"""Attacks on trusthop.event: the transport-neutral WireEvent and its SDK form."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from chainkit import rejected
from cloudevents.core.v1.event import CloudEvent

from trusthop.errors import Reason
from trusthop.event import WireEvent, wire_value

R = Reason
BASE: dict[str, Any] = {"specversion": "1.0", "id": "e1", "source": "/s", "type": "t"}


def test_empty_data_is_no_data() -> None:
    assert WireEvent(dict(BASE), b"").data is None
    assert WireEvent(dict(BASE), b"").digest() == WireEvent(dict(BASE), None).digest()
    assert WireEvent(dict(BASE), b"\x00").data == b"\x00"


def test_properties_only_return_strings() -> None:
    assert WireEvent(BASE | {"id": 5, "datacontenttype": 7}, None).id is None
    assert WireEvent(BASE | {"id": 5, "datacontenttype": 7}, None).content_type is None
    assert WireEvent(BASE | {"datacontenttype": "text/plain"}, None).content_type == "text/plain"


@pytest.mark.parametrize(
    "change",
    [
        {"specversion": None},
        {"id": None},
        {"source": None},
        {"type": None},
        {"id": ""},
        {"type": 5},
        {"source": b"/s"},
        {"specversion": "0.3"},
        {"specversion": "1.0 "},
    ],
)
def test_require_cloudevent(change: dict[str, Any]) -> None:
    attrs = {k: v for k, v in (BASE | change).items() if v is not None}
    rejected(WireEvent(attrs, None).require_cloudevent, R.MALFORMED)


def test_to_cloudevent_parses_json_and_converts_time() -> None:
    event = WireEvent(
        BASE
        | {
            "datacontenttype": "application/json; charset=utf-8",
            "time": "2026-01-01T02:00:00.5+02:00",
            "count": "5",
        },
        b'{"a":[1,2]}',
    ).to_cloudevent()
    assert event.get_data() == {"a": [1, 2]}
    assert event.get_time() == datetime(2026, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)
    assert event.get_extension("count") == "5"


def test_to_cloudevent_keeps_other_data_as_bytes() -> None:
    event = WireEvent(BASE | {"datacontenttype": "text/plain"}, b"{not json").to_cloudevent()
    assert event.get_data() == b"{not json"


@pytest.mark.parametrize(
    "data", [b"{", b"\xff\xfe", b'{"a":', b"[" * 100_000, b"[" * 5000 + b"]" * 5000]
)
def test_to_cloudevent_bad_or_hostile_json_is_malformed(data: bytes) -> None:
    wire = WireEvent(BASE | {"datacontenttype": "application/json"}, data)
    rejected(wire.to_cloudevent, R.MALFORMED)


@pytest.mark.parametrize(
    "change",
    [
        {"time": "yesterday"},
        {"time": True},
        {"time": 1767225600},
        {"time": None},
        {"subject": 5},
        {"subject": ""},
        {"data": "reserved"},
        {"dataschema": ""},
    ],
)
def test_to_cloudevent_invalid_attributes_are_malformed(change: dict[str, Any]) -> None:
    rejected(WireEvent(BASE | change, None).to_cloudevent, R.MALFORMED)


def test_from_cloudevent_drops_any_trustchain_and_sets_json() -> None:
    sdk = CloudEvent(
        BASE | {"trustchain": "forged", "time": datetime(2026, 1, 1, tzinfo=UTC)}, {"b": 1, "a": 2}
    )
    wire = WireEvent.from_cloudevent(sdk, chain="CHAIN")
    assert "trustchain" not in wire.attributes
    assert wire.chain == "CHAIN"
    assert wire.content_type == "application/json"
    assert wire.data == b'{"a":2,"b":1}'


@pytest.mark.parametrize(
    ("data", "content_type", "expected"),
    [
        ("text", None, b"text"),
        ("text", "text/plain", b"text"),
        (b"\x00", None, b"\x00"),
        ("text", "application/json", b'"text"'),
        (None, None, None),
        ([1], None, b"[1]"),
    ],
)
def test_from_cloudevent_data(data: Any, content_type: str | None, expected: bytes | None) -> None:
    attrs = BASE | {"time": datetime(2026, 1, 1, tzinfo=UTC)}
    if content_type:
        attrs["datacontenttype"] = content_type
    assert WireEvent.from_cloudevent(CloudEvent(attrs, data)).data == expected


def test_from_and_to_cloudevent_round_trip() -> None:
    sdk = CloudEvent(
        BASE
        | {
            "time": datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))),
            "datacontenttype": "application/json",
            "flag": True,
        },
        {"k": "v"},
    )
    back = WireEvent.from_cloudevent(sdk).to_cloudevent()
    assert back.get_data() == {"k": "v"}
    assert back.get_time() == sdk.get_time()
    assert back.get_extension("flag") is True


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, "true"),
        (False, "false"),
        (5, "5"),
        ("s", "s"),
        (b"\xff", "/w=="),
        (datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))), "2026-01-01T00:00:00Z"),
    ],
)
def test_wire_value(value: Any, expected: str) -> None:
    assert wire_value(value) == expected


def test_a_handler_never_sees_a_time_nobody_signed() -> None:
    from trusthop.event import WireEvent

    wire = WireEvent({"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}, b"x")
    event = wire.to_cloudevent()
    assert event.get_time() is None
    assert "time" not in event.get_attributes()
    # ...and the signed digest is the same as for the event the handler sees.
    assert WireEvent.from_cloudevent(event).digest() == wire.digest()
