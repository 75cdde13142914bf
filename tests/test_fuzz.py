"""Property tests: decoders and the verifier either answer or raise TrustError.

Nothing an attacker or a broker puts on the wire may raise anything else (a
crash would skip the dead-letter path), and no mutation of a valid chain may
ever verify. A per-example deadline keeps every input cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from chainkit import BUNDLE, DEST2, NOW, build_story
from cloudevents.core.v1.event import CloudEvent
from hypothesis import example, given, settings
from hypothesis import strategies as st

from trusthop.bindings import (
    decode_amqp,
    decode_kafka,
    decode_structured,
    encode_amqp,
    encode_kafka,
)
from trusthop.canonical import b64url_decode, b64url_encode
from trusthop.errors import TrustError
from trusthop.event import WireEvent
from trusthop.verify import verify_chain

STORY = build_story()
RAW = b64url_decode(STORY.encoded)
# TRUSTHOP_FUZZ_SCALE=50 multiplies every example budget for a long hunt.
SCALE = int(os.environ.get("TRUSTHOP_FUZZ_SCALE", "1"))
FAST = settings(max_examples=150 * SCALE, deadline=timedelta(seconds=1), database=None)

ATTRIBUTES = ["specversion", "id", "source", "type", "time", "subject", "datacontenttype",
              "trustchain", "traceparent", "data", "Id", "", "x" * 21, "count"]
GOOD_VALUES = [b"1.0", b"id-1", b"/s", b"t", b"2026-01-01T00:00:00Z", STORY.encoded.encode(),
               b"application/json", b"application/cloudevents+json", b"text/plain"]


def only_trust_errors(fn: Any, *args: Any) -> Any:
    """Call ``fn``; then exercise the result the way a consumer would."""
    try:
        event = fn(*args)
    except TrustError:
        return None
    assert isinstance(event, WireEvent)
    for step in (event.digest, event.to_cloudevent, event.require_cloudevent):
        with contextlib.suppress(TrustError):
            step()
    with contextlib.suppress(TrustError):
        verify_chain(event.chain, bundle=BUNDLE, event_digest=event.digest(),
                     destination=DEST2, now=NOW)
    return event


kafka_keys = st.one_of(
    st.sampled_from([f"ce_{a}" for a in ATTRIBUTES] + ["content-type", "Content-Type", "CE_id",
                                                       "ce_", "ce", "x-retry", "traceparent"]),
    st.text(max_size=30),
)
kafka_values = st.one_of(st.none(), st.sampled_from(GOOD_VALUES), st.binary(max_size=64))


@FAST
@given(headers=st.one_of(st.none(), st.lists(st.tuples(kafka_keys, kafka_values), max_size=12)),
       value=st.one_of(st.none(), st.binary(max_size=256)))
@example(headers=[("ce_specversion", b"1.0"), ("ce_id", b"1"), ("ce_source", b"/s"),
                  ("ce_type", b"t"), ("ce_time", "\u0662\u0660\u0662\u0666-01-01T00:00:00Z"
                                                .encode())], value=b"x")
@example(headers=[("content-type", b"application/cloudevents+json")],
         value=b'{"specversion":"1.0","id":"1","source":"/s","type":"t","data":'
               + b"[" * 990 + b"]" * 990 + b"}")
def test_decode_kafka_only_raises_trust_errors(headers: Any, value: bytes | None) -> None:
    only_trust_errors(decode_kafka, headers, value)


amqp_keys = st.one_of(
    st.sampled_from([f"{p}{a}" for p in ("cloudEvents_", "cloudEvents:", "cloudevents_")
                     for a in ATTRIBUTES] + ["x-death", "x-delivery-count"]),
    st.text(max_size=30),
)
amqp_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=40),
    st.binary(max_size=40), st.sampled_from([v.decode() for v in GOOD_VALUES]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                                                         max_size=2),
)


@FAST
@given(headers=st.one_of(st.none(), st.dictionaries(amqp_keys, amqp_values, max_size=12)),
       body=st.binary(max_size=256),
       content_type=st.one_of(st.none(), st.sampled_from(
           ["application/json", "application/cloudevents+json", "text/plain", ""]),
           st.text(max_size=30)))
def test_decode_amqp_only_raises_trust_errors(headers: Any, body: bytes,
                                              content_type: str | None) -> None:
    only_trust_errors(decode_amqp, headers, body, content_type)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20)),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=20,
)


@FAST
@given(body=st.binary(max_size=512))
def test_decode_structured_any_bytes(body: bytes) -> None:
    only_trust_errors(decode_structured, body)


@FAST
@given(members=st.dictionaries(st.sampled_from([*ATTRIBUTES, "data_base64"]), json_values,
                               max_size=8))
@example(members={"time": False})
@example(members={"time": 1767225600, "datacontenttype": "application/json", "data": [[]]})
def test_decode_structured_json_documents(members: dict[str, Any]) -> None:
    base: dict[str, Any] = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    only_trust_errors(decode_structured, json.dumps(base | members).encode())


def _verify(text: str) -> None:
    verify_chain(text, bundle=BUNDLE, event_digest=STORY.digest, destination=DEST2, now=NOW)


@FAST
@given(text=st.text(max_size=300))
@example(text=STORY.encoded + "=")
@example(text="")
def test_verify_chain_any_string(text: str) -> None:
    try:
        _verify(text)
    except TrustError:
        return
    assert text == STORY.encoded


@FAST
@given(raw=st.binary(max_size=512))
def test_verify_chain_any_bytes_as_base64url(raw: bytes) -> None:
    try:
        _verify(b64url_encode(raw))
    except TrustError:
        return
    assert raw == RAW


@st.composite
def mutated_raw(draw: st.DrawFn) -> bytes:
    data = bytearray(RAW)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif len(data) > 1:
            del data[at:at + draw(st.integers(1, 4))]
    return bytes(data)


@settings(max_examples=300 * SCALE, deadline=timedelta(seconds=1), database=None)
@given(raw=mutated_raw())
def test_no_mutation_of_a_valid_chain_verifies(raw: bytes) -> None:
    try:
        _verify(b64url_encode(raw))
    except TrustError:
        return
    assert raw == RAW, "a mutated chain verified"


@FAST
@given(at=st.integers(0, len(STORY.encoded) - 1),
       char=st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/"))
def test_no_mutation_of_the_encoded_text_verifies(at: int, char: str) -> None:
    text = STORY.encoded[:at] + char + STORY.encoded[at + 1 :]
    try:
        _verify(text)
    except TrustError:
        return
    assert text == STORY.encoded


# -- invariant 3 over random events ----------------------------------------------------

RESERVED = {"specversion", "id", "source", "type", "time", "datacontenttype", "trustchain",
            "traceparent", "tracestate", "data", "dataschema", "subject"}
names = st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True).filter(lambda n: n not in RESERVED)
clean_text = st.text(st.characters(blacklist_categories=["Cc", "Cs"]), max_size=30)
ext_values = st.one_of(clean_text, st.booleans(), st.integers(-(2**31), 2**31 - 1))
payloads = st.one_of(
    st.tuples(st.none(), st.none()),
    st.tuples(st.binary(max_size=64), st.sampled_from([None, "application/octet-stream"])),
    st.tuples(clean_text, st.just("text/plain")),
    st.tuples(st.dictionaries(st.text(max_size=8), json_values, max_size=4),
              st.sampled_from([None, "application/json", "application/x+json"])),
)


@settings(max_examples=100 * SCALE, deadline=timedelta(seconds=2), database=None)
@given(extensions=st.dictionaries(names, ext_values, max_size=5), payload=payloads,
       micros=st.integers(0, 999_999), offset=st.integers(-23 * 60, 23 * 60))
def test_every_binding_gives_every_event_the_same_digest(
    extensions: dict[str, Any], payload: tuple[Any, str | None], micros: int, offset: int
) -> None:
    data, content_type = payload
    attrs: dict[str, Any] = {
        "id": "e", "source": "/s", "type": "t",
        "time": datetime(2026, 1, 1, tzinfo=UTC).replace(microsecond=micros)
        .astimezone(timezone(timedelta(minutes=offset))),
        **extensions,
    }
    if content_type is not None:
        attrs["datacontenttype"] = content_type
    wire = WireEvent.from_cloudevent(CloudEvent(attrs, data))
    wire = dataclasses.replace(wire, chain=STORY.encoded)
    digest = wire.digest()
    received = [
        decode_kafka(*encode_kafka(wire)),
        decode_kafka(*encode_kafka(wire, structured=True)),
        decode_amqp(*encode_amqp(wire)),
        decode_amqp(*encode_amqp(wire, structured=True)),
    ]
    for event in received:
        assert event.digest() == digest
        assert event.chain == STORY.encoded
