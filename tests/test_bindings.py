"""Attacks on the CloudEvents bindings (Kafka, AMQP 0-9-1, JSON structured format).

Two promises are tested: the same event has the same digest in every binding
and mode (invariant 3), and a decoder turns every odd transport input into
``TrustError(malformed)`` (never another exception, never a silent choice
between two values).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from chainkit import ORDERS, T0, build_story, rejected, verify
from cloudevents.core.v1.event import CloudEvent

from trusthop.bindings import (
    decode_amqp,
    decode_kafka,
    decode_structured,
    encode_amqp,
    encode_kafka,
    encode_structured,
)
from trusthop.bindings.structured import MAX_STRUCTURED_BYTES
from trusthop.errors import Reason
from trusthop.event import WireEvent
from trusthop.sign import append_hop

R = Reason
DEST = "kafka:billing"
PLUS2 = timezone(timedelta(hours=2))
MINUS5 = timezone(timedelta(hours=-5, minutes=-30))


def sdk_event(data: Any = None, **attributes: Any) -> CloudEvent:
    attrs: dict[str, Any] = {
        "id": "evt-42",
        "source": "/shop/orders",
        "type": "order.placed",
        "time": datetime(2026, 1, 1, 2, 0, 0, 120000, tzinfo=PLUS2),
        "subject": "order-42",
    }
    attrs.update(attributes)
    return CloudEvent({k: v for k, v in attrs.items() if v is not None}, data)


EVENTS: dict[str, CloudEvent] = {
    "json-dict": sdk_event({"b": 1, "a": [1, 2.5, None], "u": "\u00e9\u2603"},
                           datacontenttype="application/json"),
    "json-implicit": sdk_event({"z": {"y": 1, "x": 2}}),
    "json-list": sdk_event([3, 2, 1], datacontenttype="application/vnd.x+json"),
    "json-str": sdk_event("just a string", datacontenttype="application/json"),
    "text": sdk_event("h\u00e9llo\nworld", datacontenttype="text/plain; charset=utf-8"),
    "text-untyped": sdk_event("plain"),
    "binary": sdk_event(bytes(range(256)), datacontenttype="application/octet-stream"),
    "binary-untyped": sdk_event(b"\x00\xff\xfe"),
    "binary-looks-like-json": sdk_event(b'{"b":1, "a":2}', datacontenttype="application/json"),
    "binary-invalid-utf8-text": sdk_event(b"\xff\xfe", datacontenttype="text/plain"),
    "no-data": sdk_event(None),
    "extensions": sdk_event({"k": 1}, datacontenttype="application/json", label="blue",
                            count=42, negative=-7, flag=True, off=False, empty=""),
    "time-negative-offset": sdk_event(b"x", time=datetime(2025, 12, 31, 18, 29, 59, 999999,
                                                           tzinfo=MINUS5)),
    "time-utc-no-fraction": sdk_event(b"x", time=datetime(2026, 1, 1, tzinfo=UTC)),
    "dataschema": sdk_event(b"x", dataschema="https://schemas.example.com/order/v1"),
}


def kafka_binary(event: WireEvent) -> WireEvent:
    headers, value = encode_kafka(event)
    return decode_kafka(headers, value)


def kafka_structured(event: WireEvent) -> WireEvent:
    headers, value = encode_kafka(event, structured=True)
    return decode_kafka(headers, value)


def amqp_binary(event: WireEvent) -> WireEvent:
    headers, body, content_type = encode_amqp(event)
    return decode_amqp(headers, body, content_type)


def amqp_structured(event: WireEvent) -> WireEvent:
    headers, body, content_type = encode_amqp(event, structured=True)
    return decode_amqp(headers, body, content_type)


TRANSPORTS: dict[str, Callable[[WireEvent], WireEvent]] = {
    "kafka-binary": kafka_binary,
    "kafka-structured": kafka_structured,
    "amqp-binary": amqp_binary,
    "amqp-structured": amqp_structured,
}


def sealed(event: CloudEvent, destination: str = DEST) -> WireEvent:
    """The wire form of ``event`` with a chain whose newest ring signs it."""
    wire = WireEvent.from_cloudevent(event)
    chain = append_hop(ORDERS, build_story().chain, event_digest=wire.digest(),
                       destination=destination, now=T0 + 25)
    wire.chain = chain.encode()
    return wire


def accept(wire: WireEvent, destination: str = DEST) -> None:
    assert verify(wire.chain, digest=wire.digest(), destination=destination).scope


# -- one event, one digest, every binding -------------------------------------------


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("name", list(EVENTS))
def test_same_digest_in_every_binding(name: str, transport: str) -> None:
    wire = sealed(EVENTS[name])
    received = TRANSPORTS[transport](wire)
    assert received.digest() == wire.digest()
    assert received.chain == wire.chain
    accept(received)
    # The handler sees the producer's event.
    original, delivered = EVENTS[name], received.to_cloudevent()
    assert delivered.get_data() == _expected_data(original)
    assert delivered.get_time() == original.get_time()
    assert delivered.get_id() == original.get_id()


def _expected_data(event: CloudEvent) -> Any:
    """What the handler gets: JSON content parsed, anything else as bytes."""
    data = event.get_data()
    is_json = (event.get_datacontenttype() or "").endswith("json")
    if isinstance(data, bytes) and is_json:
        return json.loads(data)
    if isinstance(data, str) and not is_json:
        return data.encode()
    return data


@pytest.mark.parametrize("second", list(TRANSPORTS))
@pytest.mark.parametrize("first", list(TRANSPORTS))
def test_transcoding_between_bindings_keeps_the_digest(first: str, second: str) -> None:
    """A bridge re-publishing Kafka <-> AMQP in any mode keeps the event verifiable."""
    for event in (EVENTS["json-dict"], EVENTS["extensions"], EVENTS["binary-looks-like-json"],
                  EVENTS["no-data"], EVENTS["text"]):
        wire = sealed(event)
        twice = TRANSPORTS[second](TRANSPORTS[first](wire))
        assert twice.digest() == wire.digest()
        accept(twice)


def test_time_offsets_and_fractions_in_headers_match_structured_utc() -> None:
    base = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    kafka = decode_kafka([(f"ce_{k}", v.encode()) for k, v in base.items()]
                         + [("ce_time", b"2026-01-01T02:00:00.120+02:00")], b"")
    amqp = decode_amqp({f"cloudEvents:{k}": v for k, v in base.items()}
                       | {"cloudEvents:time": b"2025-12-31T18:30:00.12-05:30"}, b"", None)
    structured = decode_structured(json.dumps(base | {"time": "2026-01-01T00:00:00.12Z"})
                                   .encode())
    assert kafka.digest() == amqp.digest() == structured.digest()


def test_typed_amqp_headers_match_kafka_strings() -> None:
    wire = sealed(EVENTS["extensions"])
    headers, body, content_type = encode_amqp(wire)
    assert headers["cloudEvents_count"] == "42"
    typed = headers | {"cloudEvents_count": 42, "cloudEvents_flag": True,
                       "cloudEvents_off": False, "cloudEvents_negative": -7,
                       "cloudEvents_label": b"blue"}
    received = decode_amqp(typed, body, content_type)
    assert received.attributes["count"] == 42
    assert received.digest() == wire.digest()
    accept(received)


# -- tampering in transit ----------------------------------------------------------


def _kafka(wire: WireEvent) -> tuple[list[tuple[str, bytes | None]], bytes | None]:
    headers, value = encode_kafka(wire)
    return list(headers), value


def test_tampered_kafka_value_is_event_mismatch() -> None:
    wire = sealed(EVENTS["json-dict"])
    headers, value = _kafka(wire)
    assert value is not None
    received = decode_kafka(headers, value.replace(b'"b":1', b'"b":2'))
    rejected(lambda: accept(received), R.EVENT_MISMATCH)


@pytest.mark.parametrize(("header", "new"), [
    ("ce_type", b"order.cancelled"), ("ce_subject", b"order-43"), ("ce_count", b"43"),
    ("ce_flag", b"false"), ("ce_time", b"2026-01-01T00:00:00.121Z"),
    ("content-type", b"text/plain"),
])
def test_tampered_kafka_attribute_is_event_mismatch(header: str, new: bytes) -> None:
    headers, value = _kafka(sealed(EVENTS["extensions"]))
    headers = [(k, new if k == header else v) for k, v in headers]
    rejected(lambda: accept(decode_kafka(headers, value)), R.EVENT_MISMATCH)


@pytest.mark.parametrize("extra", [("ce_added", b"1"), ("ce_dataschema", b"urn:x")])
def test_added_kafka_attribute_is_event_mismatch(extra: tuple[str, bytes]) -> None:
    headers, value = _kafka(sealed(EVENTS["extensions"]))
    rejected(lambda: accept(decode_kafka([*headers, extra], value)), R.EVENT_MISMATCH)


def test_removed_kafka_attribute_is_event_mismatch() -> None:
    headers, value = _kafka(sealed(EVENTS["extensions"]))
    headers = [(k, v) for k, v in headers if k != "ce_label"]
    rejected(lambda: accept(decode_kafka(headers, value)), R.EVENT_MISMATCH)


def test_removed_kafka_content_type_is_event_mismatch() -> None:
    headers, value = _kafka(sealed(EVENTS["json-dict"]))
    headers = [(k, v) for k, v in headers if k != "content-type"]
    rejected(lambda: accept(decode_kafka(headers, value)), R.EVENT_MISMATCH)


def test_tampered_structured_document_is_event_mismatch() -> None:
    wire = sealed(EVENTS["json-dict"])
    document = json.loads(encode_structured(wire))
    document["data"]["b"] = 2
    received = decode_structured(json.dumps(document).encode())
    rejected(lambda: accept(received), R.EVENT_MISMATCH)
    document = json.loads(encode_structured(wire))
    document["extra"] = "x"
    rejected(lambda: accept(decode_structured(json.dumps(document).encode())), R.EVENT_MISMATCH)


@pytest.mark.parametrize("header", ["ce_traceparent", "ce_tracestate"])
def test_trace_context_may_be_rewritten(header: str) -> None:
    headers, value = _kafka(sealed(EVENTS["json-dict"]))
    rewritten = [*headers, (header, b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]
    received = decode_kafka(rewritten, value)
    assert header[3:] in received.attributes
    accept(received)
    again = [(k, b"changed=1" if k == header else v) for k, v in rewritten]
    accept(decode_kafka(again, value))


def test_replayed_into_another_topic_is_wrong_destination() -> None:
    wire = sealed(EVENTS["json-dict"])
    received = kafka_binary(wire)
    rejected(lambda: accept(received, destination="kafka:billing-copy"), R.WRONG_DESTINATION)


# -- JSON key order between binary and structured mode --------------------------------


def test_structured_json_may_be_reserialised_in_any_key_order() -> None:
    """A trusthop producer signs canonical JSON, so any re-serialisation of the
    structured document (key order, whitespace, escapes) keeps the digest."""
    wire = sealed(EVENTS["json-dict"])
    document = json.loads(encode_structured(wire))
    assert "data" in document  # canonical JSON travels as a JSON value
    data = document.pop("data")
    reordered = {"data": {k: data[k] for k in reversed(list(data))}, **dict(
        reversed(list(document.items())))}
    body = json.dumps(reordered, indent=3, ensure_ascii=True).encode()
    received = decode_structured(body)
    assert received.data == wire.data
    accept(received)


def test_binary_json_bytes_are_signed_as_they_are() -> None:
    """In binary mode the data bytes are signed verbatim: a bridge that
    re-serialises them (another key order, whitespace) breaks the digest, and
    a bridge that turns non-canonical binary JSON into a structured ``data``
    value breaks it too. Non-canonical JSON therefore travels as data_base64."""
    wire = sealed(EVENTS["binary-looks-like-json"])
    assert wire.data == b'{"b":1, "a":2}'
    headers, value = _kafka(wire)
    assert value == wire.data
    reordered = decode_kafka(headers, b'{"a":2,"b":1}')
    rejected(lambda: accept(reordered), R.EVENT_MISMATCH)

    document = json.loads(encode_structured(wire))
    assert "data" not in document
    assert base64.b64decode(document["data_base64"]) == wire.data
    accept(decode_structured(json.dumps(document).encode()))

    document["data"] = json.loads(base64.b64decode(document.pop("data_base64")))
    rejected(lambda: accept(decode_structured(json.dumps(document).encode())),
             R.EVENT_MISMATCH)


def test_canonical_binary_json_survives_a_structured_bridge() -> None:
    wire = sealed(EVENTS["json-dict"])
    headers, value = _kafka(wire)
    binary = decode_kafka(headers, value)
    document = json.loads(encode_structured(binary))
    document["data"] = dict(reversed(list(document["data"].items())))
    accept(decode_structured(json.dumps(document, indent=1).encode()))


# -- Kafka decoder: headers an attacker or a broker can produce -------------------------


def kafka_headers(**overrides: bytes | None) -> list[tuple[str, bytes | None]]:
    base: dict[str, bytes | None] = {"ce_specversion": b"1.0", "ce_id": b"1",
                                     "ce_source": b"/s", "ce_type": b"t"}
    base.update(overrides)
    return list(base.items())


def test_minimal_kafka_record() -> None:
    event = decode_kafka(kafka_headers(), None)
    assert event.attributes == {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    assert event.data is None and event.chain is None
    assert decode_kafka(kafka_headers(), b"").data is None


@pytest.mark.parametrize("extra", [
    [("ce_trustchain", b"AAAA"), ("ce_trustchain", b"BBBB")],
    [("ce_trustchain", b"AAAA"), ("ce_trustchain", b"AAAA")],
    [("ce_id", b"2")],
    [("ce_id", b"1")],
    [("content-type", b"a/b"), ("content-type", b"a/b")],
    [("ce_datacontenttype", b"application/json")],
])
def test_kafka_repeated_attribute_is_malformed(extra: list[tuple[str, bytes]]) -> None:
    rejected(lambda: decode_kafka(kafka_headers() + extra, b"x"), R.MALFORMED)


@pytest.mark.parametrize("name", ["ce_id", "ce_trustchain", "ce_subject", "content-type"])
def test_kafka_none_value_is_malformed(name: str) -> None:
    headers = [(k, v) for k, v in kafka_headers() if k != name] + [(name, None)]
    rejected(lambda: decode_kafka(headers, b"x"), R.MALFORMED)


@pytest.mark.parametrize("value", [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"abc\x80"])
def test_kafka_non_utf8_value_is_malformed(value: bytes) -> None:
    rejected(lambda: decode_kafka(kafka_headers(ce_subject=value), b"x"), R.MALFORMED)
    rejected(lambda: decode_kafka([*kafka_headers(), ("content-type", value)], b"x"),
             R.MALFORMED)


def test_kafka_foreign_headers_are_ignored_whatever_they_hold() -> None:
    clean = decode_kafka(kafka_headers(), b"x")
    noisy = decode_kafka([*kafka_headers(), ("traceparent", None), ("x-retry", b"\xff\xfe"),
                          ("x-retry", b"2"), ("cex_id", b"9"), ("ce", b"9"),
                          ("kafka_key", b"k")], b"x")
    assert noisy.attributes == clean.attributes
    assert noisy.digest() == clean.digest()


@pytest.mark.parametrize("name", ["CE_id", "Ce_id", "cE_id", "CE_TRUSTCHAIN", "Content-Type",
                                  "CONTENT-TYPE"])
def test_kafka_mis_cased_cloudevents_headers_are_malformed(name: str) -> None:
    rejected(lambda: decode_kafka([*kafka_headers(), (name, b"x")], b"x"), R.MALFORMED)


@pytest.mark.parametrize("value", [b"order\n42", b"a\x00b", b"\x1b[2J", b"del\x7f", b"\xc2\x85"])
def test_kafka_control_characters_are_rejected_at_the_digest(value: bytes) -> None:
    event = decode_kafka(kafka_headers(ce_subject=value), b"x")
    rejected(event.digest, R.MALFORMED)


def test_kafka_structured_record_with_ce_headers_is_malformed() -> None:
    wire = sealed(EVENTS["json-dict"])
    headers, value = encode_kafka(wire, structured=True)
    rejected(lambda: decode_kafka([*headers, ("ce_id", b"other")], value), R.MALFORMED)
    rejected(lambda: decode_kafka([*headers, ("ce_trustchain", wire.chain.encode())], value),
             R.MALFORMED)


@pytest.mark.parametrize("content_type", [
    b"application/cloudevents+json", b"application/cloudevents+json; charset=utf-8",
    b"APPLICATION/CLOUDEVENTS+JSON",
])
def test_kafka_structured_content_type_variants(content_type: bytes) -> None:
    wire = sealed(EVENTS["json-dict"])
    _, value = encode_kafka(wire, structured=True)
    accept(decode_kafka([("content-type", content_type)], value))


def test_kafka_structured_record_without_value_is_malformed() -> None:
    rejected(lambda: decode_kafka([("content-type", b"application/cloudevents+json")], None),
             R.MALFORMED)


@pytest.mark.parametrize("headers", [None, [], [("ce_id", b"1")],
                                     kafka_headers(ce_specversion=b"0.3"),
                                     kafka_headers(ce_id=b"")])
def test_kafka_record_that_is_no_cloudevent(headers: Any) -> None:
    rejected(lambda: decode_kafka(headers, b"x"), R.MALFORMED)


def test_kafka_header_keys_that_are_bytes_are_not_cloudevents_headers() -> None:
    event = decode_kafka([*kafka_headers(), (b"ce_subject", b"x")], None)  # type: ignore[list-item]
    assert "subject" not in event.attributes


def test_kafka_chain_header_that_is_not_base64_fails_verification() -> None:
    event = decode_kafka(kafka_headers(ce_trustchain=b"\xc3\xa9t\xc3\xa9"), b"x")
    assert event.chain == "\u00e9t\u00e9"
    rejected(lambda: verify(event.chain, digest=event.digest(), destination=DEST), R.MALFORMED)


# -- AMQP decoder ---------------------------------------------------------------------------


def amqp_headers(prefix: str = "cloudEvents_", **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {f"{prefix}specversion": "1.0", f"{prefix}id": "1",
                            f"{prefix}source": "/s", f"{prefix}type": "t"}
    base.update({f"{prefix}{k}": v for k, v in overrides.items()})
    return base


def test_amqp_both_prefixes_are_accepted_and_agree() -> None:
    a = decode_amqp(amqp_headers("cloudEvents_"), b"x", "text/plain")
    b = decode_amqp(amqp_headers("cloudEvents:"), b"x", "text/plain")
    assert a.attributes == b.attributes
    assert a.digest() == b.digest()


@pytest.mark.parametrize("name", ["id", "trustchain", "subject"])
def test_amqp_same_attribute_under_both_prefixes_is_malformed(name: str) -> None:
    headers = amqp_headers() | {f"cloudEvents_{name}": "a", f"cloudEvents:{name}": "a"}
    rejected(lambda: decode_amqp(headers, b"x", None), R.MALFORMED)


@pytest.mark.parametrize("name", ["cloudevents_subject", "CloudEvents_subject",
                                  "CLOUDEVENTS:subject", "cloudevents:trustchain"])
def test_amqp_mis_cased_prefix_is_malformed(name: str) -> None:
    rejected(lambda: decode_amqp(amqp_headers() | {name: "x"}, b"x", None), R.MALFORMED)


def test_amqp_broker_and_foreign_headers_are_ignored() -> None:
    clean = decode_amqp(amqp_headers(), b"x", "text/plain")
    noisy = decode_amqp(amqp_headers() | {
        "x-death": [{"count": 1, "queue": "q"}], "x-delivery-count": 3,
        "x-first-death-reason": b"rejected", "x-cloudEvents_subject": "evil",
        "cloudEventsX": "y", "trustchain": "forged", "ce_subject": "evil", "other": None,
    }, b"x", "text/plain")
    assert noisy.attributes == clean.attributes
    assert noisy.digest() == clean.digest()
    assert noisy.chain is None


@pytest.mark.parametrize("value", [None, 1.5, [1], {"a": 1}, datetime(2026, 1, 1, tzinfo=UTC),
                                   b"\xff\xfe", bytearray(b"\x80")])
def test_amqp_unsupported_header_values_are_malformed(value: Any) -> None:
    rejected(lambda: decode_amqp(amqp_headers(subject=value), b"x", None), R.MALFORMED)


@pytest.mark.parametrize("value", [5, True, False, 0])
def test_amqp_chain_header_must_be_a_string(value: Any) -> None:
    rejected(lambda: decode_amqp(amqp_headers(trustchain=value), b"x", None), R.MALFORMED)


@pytest.mark.parametrize("value", ["\x80", "A" * 10 + "\u00e9", b"AAAA=", "AA AA"])
def test_amqp_chain_header_that_is_not_base64url_fails_verification(value: Any) -> None:
    event = decode_amqp(amqp_headers(trustchain=value), b"x", None)
    assert isinstance(event.chain, str)
    rejected(lambda: verify(event.chain, digest=event.digest(), destination=DEST), R.MALFORMED)


def test_amqp_datacontenttype_header_is_malformed() -> None:
    rejected(lambda: decode_amqp(amqp_headers(datacontenttype="text/plain"), b"x", None),
             R.MALFORMED)


def test_amqp_structured_message_with_cloudevents_headers_is_malformed() -> None:
    wire = sealed(EVENTS["json-dict"])
    _, body, content_type = encode_amqp(wire, structured=True)
    rejected(lambda: decode_amqp({"cloudEvents_id": "x"}, body, content_type), R.MALFORMED)
    rejected(lambda: decode_amqp({"cloudEvents:trustchain": wire.chain}, body, content_type),
             R.MALFORMED)
    accept(decode_amqp({"x-delivery-count": 2}, body, content_type))


def test_amqp_empty_body_is_no_data() -> None:
    assert decode_amqp(amqp_headers(), b"", None).data is None
    assert decode_amqp(amqp_headers(), b"", None).digest() == \
        decode_kafka(kafka_headers(), None).digest()


def test_amqp_encoder_never_sends_bytes_header_values() -> None:
    wire = sealed(EVENTS["extensions"])
    wire.attributes["blob"] = b"\x00\xff"
    headers, _, _ = encode_amqp(wire)
    assert all(isinstance(v, str) for v in headers.values())
    assert decode_amqp(*encode_amqp(wire)).digest() == wire.digest()


@pytest.mark.parametrize(("headers", "content_type"), [
    (None, None), ({}, "application/json"), (amqp_headers(specversion="1.1"), None),
    (amqp_headers(id=""), None), (amqp_headers(id=7), None), ({1: "x"}, None),
])
def test_amqp_message_that_is_no_cloudevent(headers: Any, content_type: str | None) -> None:
    rejected(lambda: decode_amqp(headers, b"x", content_type), R.MALFORMED)


# -- structured format ----------------------------------------------------------------------


def doc(**members: Any) -> bytes:
    base: dict[str, Any] = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    base.update(members)
    return json.dumps(base).encode()


@pytest.mark.parametrize("body", [
    b"", b"null", b"[]", b'"x"', b"{", b"\xff\xfe", b'{"specversion":"1.0"}',
    doc(data=1, data_base64="AA=="), doc(data_base64="not base64!"), doc(data_base64=5),
    doc(data_base64="AA"), doc(subject=None), doc(subject=1.5), doc(subject=[1]),
    doc(subject={"a": 1}), doc(trustchain=5), doc(trustchain=["a"]), doc(datacontenttype=5),
    doc(specversion="0.3"), doc(id=5), doc(**{"Bad": "x"}),
    b'{"specversion":"1.0","id":"1","source":"/s","type":"t","n":NaN}',
    b'{"specversion":"1.0","id":"1","source":"/s","type":"t","data":Infinity}',
    b'{"specversion":"1.0","id":"1","source":"/s","type":"t","data":1e999}',
    b'{"specversion":"1.0","id":"1","source":"/s","type":"t","data":"\\ud800"}',
    b'{"specversion":"1.0","id":"1","source":"/s","type":"t","n":' + b"9" * 5000 + b"}",
])
def test_structured_garbage_is_malformed(body: bytes) -> None:
    def decode_and_digest() -> None:
        decode_structured(body).digest()

    rejected(decode_and_digest, R.MALFORMED)


@pytest.mark.parametrize("member", ["id", "type", "trustchain", "subject", "data",
                                    "datacontenttype"])
def test_structured_duplicate_members_are_malformed(member: str) -> None:
    """Parsers disagree on which duplicate wins; trusthop refuses to choose."""
    body = doc(subject="a", datacontenttype="text/plain", data="x", trustchain="AAAA")
    duplicate = body[:-1] + b', "' + member.encode() + b'": "other"}'
    rejected(lambda: decode_structured(duplicate), R.MALFORMED)


def test_structured_duplicate_members_inside_data_are_malformed() -> None:
    body = doc()[:-1] + b', "data": {"a": 1, "a": 2}}'
    rejected(lambda: decode_structured(body), R.MALFORMED)


def test_structured_size_limit() -> None:
    rejected(lambda: decode_structured(b" " * (MAX_STRUCTURED_BYTES + 1)), R.MALFORMED)
    padding = MAX_STRUCTURED_BYTES - len(doc(data=""))
    assert decode_structured(doc(data="x" * padding)).data is not None


@pytest.mark.parametrize(("members", "expected"), [
    ({"data": None}, b"null"),
    ({"data": {"b": 1, "a": 2}}, b'{"a":2,"b":1}'),
    ({"data": "x"}, b'"x"'),
    ({"data": "x", "datacontenttype": "text/plain"}, b"x"),
    ({"data_base64": ""}, None),
    ({"data_base64": "AAE="}, b"\x00\x01"),
    ({}, None),
])
def test_structured_data_member_forms(members: dict[str, Any], expected: bytes | None) -> None:
    assert decode_structured(doc(**members)).data == expected


def test_structured_deeply_nested_data_never_escapes_as_recursion_error() -> None:
    prefix = b'{"specversion":"1.0","id":"1","source":"/s","type":"t","data":'
    for depth in range(400, 1200, 3):
        body = prefix + b"[" * depth + b"]" * depth + b"}"
        try:
            decode_structured(body).digest()
        except Exception as exc:
            assert getattr(exc, "reason", None) is R.MALFORMED, (depth, type(exc))


def test_structured_typed_extensions_round_trip_as_types() -> None:
    event = decode_structured(doc(count=5, flag=True))
    assert event.attributes["count"] == 5 and event.attributes["flag"] is True
    assert event.digest() == decode_kafka(kafka_headers(ce_count=b"5", ce_flag=b"true"),
                                          None).digest()
