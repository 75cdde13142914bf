"""Red-team review of the digest fast paths (``canonical_time``'s regex fast
path and datetime fast path, ``signed_attributes``' single scan) and of
``WireEvent.from_cloudevent`` canonicalising ``time``: differential tests
against the slow paths.

Held (regression tests): the canonical-string fast path against the slow
path through an explicit ``+00:00`` / ``-00:00`` offset, the datetime path
against the string path, and the single control/surrogate scan against a
per-attribute reference, control characters and lone surrogates in any
attribute (unsigned ones included).

Broken: a timezone-aware datetime whose UTC instant falls outside years
1..9999 (``0001-01-01T00:30:00+01:00``) makes ``canonical_time`` raise
``OverflowError`` instead of ``TrustError(malformed)``, while the same
instant as text is ``malformed``; ``WireEvent.from_cloudevent`` (and so
``ChainSigner.seal``, ``TrustedPublisher``, ``TrustedKafkaProducer``) lets
it escape their documented contract.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from cloudevents.core.v1.event import CloudEvent
from hypothesis import given, settings
from hypothesis import strategies as st

from trusthop.digest import (
    UNSIGNED_ATTRIBUTES,
    canonical_time,
    canonical_value,
    signed_attributes,
)
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent


def _time(value: Any) -> Any:
    try:
        return canonical_time(value)
    except TrustError as error:
        return error.reason


@settings(max_examples=3000, deadline=None, derandomize=True)
@given(
    year=st.integers(0, 9999),
    month=st.integers(0, 13),
    day=st.integers(0, 32),
    hour=st.integers(0, 25),
    minute=st.integers(0, 61),
    second=st.integers(0, 61),
    fraction=st.one_of(st.none(), st.text(alphabet="0123456789", max_size=10)),
)
def test_the_canonical_fast_path_agrees_with_the_slow_path_through_an_offset(
    year: int, month: int, day: int, hour: int, minute: int, second: int, fraction: str | None
) -> None:
    base = f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"
    if fraction is not None:
        base += "." + fraction
    fast = _time(base + "Z")
    assert fast == _time(base + "+00:00") == _time(base + "-00:00") == _time(base + "z")
    if isinstance(fast, str):
        assert _time(fast) == fast  # idempotent


@settings(max_examples=1500, deadline=None, derandomize=True)
@given(
    moment=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                        timezones=st.just(UTC)),
    offset=st.integers(-23 * 60 - 59, 23 * 60 + 59),
)
def test_the_datetime_path_agrees_with_the_string_path(moment: datetime, offset: int) -> None:
    local = moment.astimezone(timezone(timedelta(minutes=offset)))
    as_datetime = canonical_time(local)
    assert as_datetime == canonical_time(local.isoformat())
    assert canonical_time(as_datetime) == as_datetime


@pytest.mark.parametrize(
    "moment",
    [
        datetime(1, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))),
        datetime(9999, 12, 31, 23, 30, tzinfo=timezone(timedelta(hours=-1))),
    ],
    ids=["before-year-1", "after-year-9999"],
)
def test_a_datetime_outside_the_utc_range_is_malformed_like_its_text(moment: datetime) -> None:
    with pytest.raises(TrustError) as text_error:
        canonical_time(moment.isoformat())
    assert text_error.value.reason is Reason.MALFORMED
    with pytest.raises(TrustError) as datetime_error:  # OverflowError before the fix
        canonical_time(moment)
    assert datetime_error.value.reason is Reason.MALFORMED
    event = CloudEvent(
        {"id": "1", "source": "/s", "type": "t", "specversion": "1.0", "time": moment}, None
    )
    with pytest.raises(TrustError):  # the documented contract of from_cloudevent
        WireEvent.from_cloudevent(event)


# ---- signed_attributes: one scan against a per-attribute reference --------

NASTY = st.sampled_from(
    ["\x00", "\x1b", "\x1f", "\x7f", "\x85", "\x9f", "\ud800", "\udfff", "\ud83d", "\u2028",
     "\u00a0", "\U0001f600", "a", "", "Z", "\t", "\n"]
)
TEXT = st.lists(st.one_of(NASTY, st.text(max_size=3)), max_size=4).map("".join)
VALUE = st.one_of(TEXT, st.booleans(), st.integers(-(2**33), 2**33), st.binary(max_size=4),
                  st.none())
NAME = st.sampled_from(
    ["id", "source", "type", "subject", "specversion", "datacontenttype", "dataschema",
     "traceparent", "tracestate", "trustchain", "ext1", "partitionkey", "time"]
)


def reference(attributes: dict[str, Any]) -> Any:
    """signed_attributes as the per-attribute slow path would compute it."""
    out = {}
    try:
        for name, value in attributes.items():
            if value is None:
                continue
            if name in UNSIGNED_ATTRIBUTES:
                if name != "trustchain":
                    text = canonical_value(name, value)
                    limit = 128 if name == "traceparent" else 8192
                    if len(text) > limit:
                        raise TrustError(Reason.MALFORMED, "too long")
                continue
            out[name] = canonical_value(name, value)
    except TrustError as error:
        return error.reason
    return out


@settings(max_examples=3000, deadline=None, derandomize=True)
@given(attributes=st.dictionaries(NAME, VALUE, max_size=8))
def test_the_single_scan_agrees_with_a_scan_per_attribute(attributes: dict[str, Any]) -> None:
    try:
        got: Any = signed_attributes(attributes)
    except TrustError as error:
        got = error.reason
    assert got == reference(attributes)
    if isinstance(got, dict):
        for value in got.values():
            value.encode("utf-8")  # never a surrogate (raises if it were)
            assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value)


def test_a_tzinfo_without_an_offset_is_no_utc_offset() -> None:
    """A tzinfo whose utcoffset() is None makes a naive datetime: astimezone()
    would read it as the host's local time (a digest that depends on TZ)."""

    class NoOffset(timezone.__base__):  # type: ignore[misc,name-defined]
        def utcoffset(self, dt: datetime | None) -> None:
            return None

        def dst(self, dt: datetime | None) -> None:
            return None

        def tzname(self, dt: datetime | None) -> str:
            return "?"

    with pytest.raises(TrustError) as error:
        canonical_time(datetime(2026, 1, 1, tzinfo=NoOffset()))
    assert error.value.reason is Reason.MALFORMED
