"""Property tests: decoders and the verifier either answer or raise TrustError.

Nothing an attacker or a broker puts on the wire may raise anything else (a
crash would skip the dead-letter path), no mutation of a valid chain may ever
verify, no rearrangement of valid rings may ever verify, and whatever a
legitimate key signs verifies only if it obeys every rule. Examples are
derandomised (the same inputs on every run) and never timed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from chainkit import (
    BUNDLE,
    DEST2,
    NOW,
    ORDERS,
    PAYMENTS,
    T0,
    build_story,
    encode_segments,
    signed_ring,
    wire_rings,
)
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
from trusthop.canonical import b64url_encode
from trusthop.errors import TrustError
from trusthop.event import WireEvent
from trusthop.rings import (
    K_ACTOR,
    K_CONSUMED,
    K_DEST,
    K_EVENT,
    K_IAT,
    K_KEY,
    K_LINK,
    K_PEER,
    K_SCOPE,
    K_TTL,
    K_X5C,
    link_tag,
)
from trusthop.verify import verify_chain

STORY = build_story()
OTHER = build_story("txn-2", subject="user:bob")
RINGS = wire_rings(STORY.encoded)
# TRUSTHOP_FUZZ_SCALE=50 multiplies every example budget (and draws new
# examples on every run) for a long hunt; by default the examples are fixed.
SCALE = int(os.environ.get("TRUSTHOP_FUZZ_SCALE", "1"))
FAST = settings(max_examples=150 * SCALE, deadline=None, database=None, derandomize=SCALE == 1)

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
@given(rings=st.lists(st.binary(max_size=300), max_size=5))
@example(rings=RINGS)
@example(rings=[RINGS[0], b""])
def test_verify_chain_any_ring_bytes(rings: list[bytes]) -> None:
    try:
        _verify(encode_segments(rings))
    except TrustError:
        return
    assert rings == RINGS


@st.composite
def mutated_rings(draw: st.DrawFn) -> list[bytes]:
    rings = [bytearray(r) for r in RINGS]
    for _ in range(draw(st.integers(1, 4))):
        data = rings[draw(st.integers(0, len(rings) - 1))]
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
    return [bytes(r) for r in rings]


@settings(max_examples=300 * SCALE, deadline=None, database=None, derandomize=SCALE == 1)
@given(rings=mutated_rings())
def test_no_mutation_of_a_valid_chain_verifies(rings: list[bytes]) -> None:
    try:
        _verify(encode_segments(rings))
    except TrustError:
        return
    assert rings == RINGS, "a mutated chain verified"


SOURCES = {"a": RINGS, "b": wire_rings(OTHER.encoded)}
PIECES = [f"{name}{index}" for name in SOURCES for index in range(3)]


@settings(max_examples=300 * SCALE, deadline=None, database=None, derandomize=SCALE == 1)
@given(layout=st.lists(st.sampled_from(PIECES), min_size=1, max_size=7))
@example(layout=["a0", "a1", "a2"])
@example(layout=["a0", "a2"])
@example(layout=["a0", "b1", "a2"])
def test_no_rearrangement_of_valid_rings_verifies(layout: list[str]) -> None:
    """Removal, reordering, duplication and splicing, on the wire."""
    text = encode_segments([SOURCES[p[0]][int(p[1])] for p in layout])
    try:
        _verify(text)
    except TrustError as err:
        assert err.reason.value in {"malformed", "broken_link", "event_mismatch",
                                    "wrong_destination"}, (layout, err)
        return
    assert layout == ["a0", "a1", "a2"]


TEXT_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/. "


@FAST
@given(at=st.integers(0, len(STORY.encoded) - 1), char=st.sampled_from(TEXT_CHARS))
def test_no_mutation_of_the_encoded_text_verifies(at: int, char: str) -> None:
    text = STORY.encoded[:at] + char + STORY.encoded[at + 1 :]
    try:
        _verify(text)
    except TrustError:
        return
    assert text == STORY.encoded


# -- whatever a legitimate key signs verifies only within the rules ----------------

PARENT = STORY.chain
PREV = PARENT.newest
DEST = "kafka:fuzz"
DIGEST = bytes(range(32))
msgpack_leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64),
                           st.text(max_size=12), st.binary(max_size=40),
                           st.floats(allow_nan=False))
msgpack_values = st.recursive(
    msgpack_leaves,
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.integers(-2, 30), children, max_size=3)),
    max_leaves=6,
)
GOOD_HOP = {
    K_ACTOR: "/ns/pay/sa/payments",
    K_KEY: PAYMENTS.key_tag,
    K_IAT: 5,
    K_TTL: 60,
    K_SCOPE: sorted(PREV.scope),
    K_LINK: link_tag(PARENT.hashes()[-1]),
    K_EVENT: DIGEST,
    K_DEST: DEST,
}
FIELD_VALUES = {
    K_ACTOR: st.sampled_from(["/ns/pay/sa/payments", "/ns/shop/sa/orders", "/ns/pay", "/",
                              "spiffe://prod.example.com/ns/pay/sa/payments"]),
    K_KEY: st.sampled_from([PAYMENTS.key_tag, ORDERS.key_tag, 0, 2**16, -1]),
    K_IAT: st.integers(-2, 2000),
    K_TTL: st.integers(-2, 2000),
    K_SCOPE: st.lists(st.sampled_from(["orders:read", "orders:write", "payments:charge",
                                       "admin"]), max_size=3),
    K_LINK: st.sampled_from([GOOD_HOP[K_LINK], GOOD_HOP[K_LINK] ^ 1, 0]),
    K_EVENT: st.sampled_from([DIGEST, bytes(32), DIGEST[:31]]),
    K_DEST: st.sampled_from([DEST, "kafka:other", ""]),
    K_CONSUMED: st.one_of(st.text(max_size=5), st.binary(min_size=15, max_size=17)),
    K_PEER: st.text(max_size=5),
    K_X5C: st.lists(st.binary(max_size=8), max_size=2),
}


@st.composite
def signed_hop_bodies(draw: st.DrawFn) -> dict[Any, Any]:
    body: dict[Any, Any] = dict(GOOD_HOP)
    for key in draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), max_size=4)):
        action = draw(st.sampled_from(["set", "drop", "junk"]))
        if action == "set":
            body[key] = draw(FIELD_VALUES[key])
        elif action == "drop":
            body.pop(key, None)
        else:
            body[key] = draw(msgpack_values)
    if draw(st.booleans()):
        body[draw(st.integers(-3, 40))] = draw(msgpack_values)
    return body


def _pack_any(body: dict[Any, Any]) -> bytes | None:
    import msgpack

    try:
        return msgpack.packb(dict(sorted(body.items())), use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return None


@settings(max_examples=400 * SCALE, deadline=None, database=None, derandomize=SCALE == 1)
@given(body=signed_hop_bodies(), now=st.integers(T0, T0 + 4000))
@example(body=GOOD_HOP, now=T0 + 30)
def test_a_signed_hop_verifies_only_within_every_rule(body: dict[Any, Any], now: int) -> None:
    """The payments key signs any body after the story: the verifier answers
    with a TrustError or a context that obeys every invariant."""
    raw = _pack_any(body)
    if raw is None:
        return
    ring = signed_ring(raw, PAYMENTS, PARENT.hashes()[-1])
    text = f"{PARENT.encode()}.{b64url_encode(ring)}"
    try:
        ctx = verify_chain(text, bundle=BUNDLE, event_digest=DIGEST, destination=DEST, now=now)
    except TrustError:
        return
    newest = ctx.chain.newest
    assert ctx.actors[-1] == PAYMENTS.actor
    assert ctx.scope <= PREV.scope
    assert PREV.iat <= newest.iat <= newest.exp <= PREV.exp
    assert newest.iat - 60 <= now <= newest.exp + 60
    assert ctx.chain.link_tags[-1] == link_tag(PARENT.hashes()[-1])
    assert newest.event_digest == DIGEST and newest.destination == DEST


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


@settings(max_examples=100 * SCALE, deadline=None, database=None, derandomize=SCALE == 1)
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
