"""The pure parts of the Kafka shell (no broker), plus its offset bookkeeping
against an in-memory stand-in for ``AIOKafkaConsumer``.

* :func:`trusthop.kafka.verify_record` raises nothing but ``TrustError``,
  whatever the headers and value (hypothesis);
* :meth:`TrustedKafkaProducer.seal`: key choice, size budget, chain bounds;
* dead-letter headers and topic names, constructor refusals;
* the consumer's commit / rewind logic in paths a real broker cannot be made
  to take on demand (a dead-letter write that fails, a cancelled handler,
  a revoked partition, a refused commit);
* no record can stop or stall the consumer: a decoder or verifier bug, a
  dead letter too large to send (stub), a handler message that cannot be
  encoded.

The broker-facing behaviour is in ``integration/test_kafka.py``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)
from aiokafka.structs import ConsumerRecord
from chainkit import BUNDLE, EDGE, MALLORY_KEY, NOW, ORDERS, S0, S2, T0
from cloudevents.core.v1.event import CloudEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trusthop.destination import kafka_destination
from trusthop.errors import Reason, TrustError
from trusthop.kafka import (
    DEFAULT_MAX_MESSAGE_BYTES,
    H_ORIGINAL,
    H_ORIGINAL_BYTES,
    UNDECODABLE_DETAIL,
    KafkaDelivery,
    TrustedKafkaConsumer,
    TrustedKafkaProducer,
    dead_letter_headers,
    default_dead_letter_max_request_size,
    default_dead_letter_topic,
    record_size,
    stub_dead_letter_headers,
    verify_record,
)
from trusthop.pipeline import (
    H_ATTEMPTS,
    H_CONSUMER,
    H_DETAIL,
    H_REASON,
    H_SOURCE,
    ChainSigner,
    ChainVerifier,
    Rejection,
)
from trusthop.sign import Identity, mint_origin
from trusthop.verify import Limits

TOPIC = "orders"
GROUP = "orders-svc"


def clock() -> float:
    return NOW


VERIFIER = ChainVerifier(BUNDLE, clock=clock)
ORIGIN = mint_origin(
    EDGE,
    subject="user:alice",
    issuer="https://idp.example.com",
    credential="token",
    scope=S0,
    now=T0,
    ttl=3600,
)


def event(event_id: str = "evt-1", data: Any = None, **extra: Any) -> CloudEvent:
    attributes: dict[str, Any] = {
        "id": event_id,
        "source": "/shop/orders",
        "type": "order.placed",
        "specversion": "1.0",
        "time": datetime.datetime(2026, 1, 1, 0, 0, 10, tzinfo=datetime.UTC),
        "datacontenttype": "application/json",
    }
    attributes.update(extra)
    return CloudEvent(attributes, {"order": 42} if data is None else data)


def sealer(identity: Identity = EDGE, **kwargs: Any) -> TrustedKafkaProducer:
    """A producer used only for seal(): the aiokafka client is never touched."""
    return TrustedKafkaProducer(
        signer=ChainSigner(identity, clock=clock), producer=object(), **kwargs
    )


BINARY = sealer().seal(TOPIC, event(), origin=ORIGIN)
STRUCTURED = sealer(structured=True).seal(TOPIC, event(), origin=ORIGIN)


# --------------------------------------------------------------------------- #
# verify_record: only TrustError, whatever arrives
# --------------------------------------------------------------------------- #


def only_trust_errors(
    headers: Sequence[tuple[str, bytes | None]] | None, value: bytes | None
) -> Reason | None:
    try:
        verify_record(VERIFIER, topic=TOPIC, headers=headers, value=value)
    except TrustError as error:
        assert error.message
        return error.reason
    return None


def test_sealed_records_verify_in_both_modes() -> None:
    for record in (BINARY, STRUCTURED):
        trusted = verify_record(VERIFIER, topic=TOPIC, headers=record.headers, value=record.value)
        assert trusted.context.destination == kafka_destination(TOPIC)
        assert trusted.event.get_data() == {"order": 42}
    assert [k for k, _ in STRUCTURED.headers] == ["content-type"]
    assert ("ce_id", b"evt-1") in BINARY.headers


HEADER_NAMES = st.sampled_from(
    [
        "ce_id",
        "ce_source",
        "ce_type",
        "ce_specversion",
        "ce_trustchain",
        "ce_time",
        "ce_traceparent",
        "ce_partitionkey",
        "ce_",
        "ce_UPPER",
        "ce_na\u00efve",
        "Ce_id",
        "CE_ID",
        "content-type",
        "Content-Type",
        "x-foo",
        "trusthop-reason",
        "",
    ]
) | st.text(max_size=12)
HEADER_VALUES = (
    st.none()
    | st.binary(max_size=40)
    | st.sampled_from(
        [
            b"1.0",
            b"evt-1",
            b"/shop",
            b"order.placed",
            b"application/json",
            b"application/cloudevents+json",
            b"application/cloudevents+json; charset=utf-8",
            b"2026-01-01T00:00:10Z",
            b"2026-13-45T99:00:00Z",
            b"0000-01-01T00:00:00+23:59",
            b"\xff\xfe",
            b"\xc3\x28",
            b"\x00",
            b"AA",
            b"!!",
            b"kQE",
            dict(BINARY.headers)["ce_trustchain"],
        ]
    )
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
STRUCTURED_DOCS = st.dictionaries(
    st.sampled_from(
        [
            "id",
            "source",
            "type",
            "specversion",
            "trustchain",
            "data",
            "data_base64",
            "datacontenttype",
            "time",
            "Bad",
            "x",
        ]
    ),
    JSON,
    max_size=8,
).map(lambda d: json.dumps(d).encode())
VALUES = st.none() | st.binary(max_size=64) | STRUCTURED_DOCS | st.just(STRUCTURED.value)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=8), value=VALUES)
def test_arbitrary_headers_and_values_only_raise_trust_errors(
    headers: list[tuple[str, bytes | None]], value: bytes | None
) -> None:
    reason = only_trust_errors(headers, value)
    assert reason is None or isinstance(reason, Reason)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_valid_records_only_raise_trust_errors(data: st.DataObject) -> None:
    base = data.draw(st.sampled_from([BINARY, STRUCTURED]))
    headers: list[tuple[str, bytes | None]] = list(base.headers)
    value: bytes | None = base.value
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(
            st.sampled_from(["drop", "duplicate", "replace", "insert", "value", "flip", "truncate"])
        )
        if action == "drop" and headers:
            headers.pop(data.draw(st.integers(0, len(headers) - 1)))
        elif action == "duplicate" and headers:
            headers.append(headers[data.draw(st.integers(0, len(headers) - 1))])
        elif action == "replace" and headers:
            i = data.draw(st.integers(0, len(headers) - 1))
            headers[i] = (headers[i][0], data.draw(HEADER_VALUES))
        elif action == "insert":
            headers.insert(0, (data.draw(HEADER_NAMES), data.draw(HEADER_VALUES)))
        elif action == "value":
            value = data.draw(VALUES)
        elif action == "flip" and value:
            i = data.draw(st.integers(0, len(value) - 1))
            value = value[:i] + bytes([value[i] ^ data.draw(st.integers(1, 255))]) + value[i + 1 :]
        elif action == "truncate" and value:
            value = value[: data.draw(st.integers(0, len(value) - 1))]
    only_trust_errors(headers, value)


@pytest.mark.parametrize(
    ("headers", "value", "reason"),
    [
        ([("ce_id", None)], b"{}", Reason.MALFORMED),
        ([*BINARY.headers, ("ce_id", b"again")], BINARY.value, Reason.MALFORMED),
        ([("CE_ID", b"x"), *BINARY.headers], BINARY.value, Reason.MALFORMED),
        (
            [(k, b"\xff" if k == "ce_source" else v) for k, v in BINARY.headers],
            BINARY.value,
            Reason.MALFORMED,
        ),
        (
            [(k, v) for k, v in BINARY.headers if k != "ce_trustchain"],
            BINARY.value,
            Reason.MISSING_CHAIN,
        ),
        (None, None, Reason.MALFORMED),
        ([], b"hello", Reason.MALFORMED),
        (STRUCTURED.headers, None, Reason.MALFORMED),
        ([*STRUCTURED.headers, ("ce_id", b"x")], STRUCTURED.value, Reason.MALFORMED),
        (STRUCTURED.headers, b"\xff" + STRUCTURED.value, Reason.MALFORMED),
        (
            STRUCTURED.headers,
            STRUCTURED.value.replace(b'"order":42', b'"order":43'),
            Reason.EVENT_MISMATCH,
        ),
        (BINARY.headers, BINARY.value.replace(b'"order":42', b'"order":43'), Reason.EVENT_MISMATCH),
        # Foreign headers of any shape are ignored.
        ([("x", None), *BINARY.headers, ("x", b"\xff"), ("x", b"")], BINARY.value, None),
    ],
)
def test_hostile_records_have_their_reason(
    headers: list[tuple[str, bytes | None]] | None, value: bytes | None, reason: Reason | None
) -> None:
    assert only_trust_errors(headers, value) is reason


def test_verification_names_the_topic_it_was_read_from() -> None:
    with pytest.raises(TrustError) as info:
        verify_record(VERIFIER, topic="elsewhere", headers=BINARY.headers, value=BINARY.value)
    assert info.value.reason is Reason.WRONG_DESTINATION


# --------------------------------------------------------------------------- #
# producer: seal()
# --------------------------------------------------------------------------- #


def test_partitionkey_is_the_default_key_and_an_explicit_key_wins() -> None:
    keyed = event(partitionkey="customer-7")
    assert sealer().seal(TOPIC, keyed, origin=ORIGIN).key == b"customer-7"
    assert sealer().seal(TOPIC, keyed, origin=ORIGIN, key="other").key == b"other"
    assert sealer().seal(TOPIC, keyed, origin=ORIGIN, key=b"\xff").key == b"\xff"
    assert sealer().seal(TOPIC, event(), origin=ORIGIN).key is None
    structured = sealer(structured=True).seal(TOPIC, keyed, origin=ORIGIN)
    assert structured.key == b"customer-7"


def test_event_without_data_travels_as_an_empty_value_and_verifies() -> None:
    empty = CloudEvent({"id": "e", "source": "/s", "type": "t", "specversion": "1.0"}, None)
    record = sealer().seal(TOPIC, empty, origin=ORIGIN)
    assert record.value == b""
    trusted = verify_record(VERIFIER, topic=TOPIC, headers=record.headers, value=record.value)
    assert trusted.event.get_data() is None


def test_record_size_counts_headers_key_and_value() -> None:
    assert record_size(None, None, []) == 0
    assert record_size(b"kk", b"vvv", [("h\u00e9", b"12"), ("x", None)]) == 2 + 3 + 3 + 2 + 1


def test_budget_is_exact_and_counts_headers() -> None:
    size = record_size(BINARY.key, BINARY.value, BINARY.headers)
    assert size > len(BINARY.value) + 200  # the chain header is most of it
    at_limit = sealer(max_message_bytes=size).seal(TOPIC, event(), origin=ORIGIN)
    assert record_size(at_limit.key, at_limit.value, at_limit.headers) == size
    with pytest.raises(TrustError) as info:
        sealer(max_message_bytes=size - 1).seal(TOPIC, event(), origin=ORIGIN)
    assert info.value.reason is Reason.TOO_LARGE
    assert str(size) in info.value.message


def test_producer_refuses_what_every_consumer_would_reject() -> None:
    parent = verify_record(
        VERIFIER, topic=TOPIC, headers=BINARY.headers, value=BINARY.value
    ).context
    orders = sealer(ORDERS)
    with pytest.raises(TrustError) as info:
        orders.seal("payments", event("e2"), parent=parent, scope={*S0, "admin"})
    assert info.value.reason is Reason.SCOPE_ESCALATION
    with pytest.raises(TrustError) as info:
        sealer(ORDERS, limits=Limits(max_rings=1)).seal("payments", event("e2"), parent=parent)
    assert info.value.reason is Reason.DEPTH_EXCEEDED
    with pytest.raises(TrustError) as info:
        sealer(ORDERS, limits=Limits(max_bytes=64)).seal("payments", event("e2"), parent=parent)
    assert info.value.reason is Reason.TOO_LARGE
    derived = orders.seal("payments", event("e2"), parent=parent, scope=S2)
    context = verify_record(
        VERIFIER, topic="payments", headers=derived.headers, value=derived.value
    ).context
    assert context.scope == S2
    # v2: the derived ring names no event id by default; it is bound to the
    # consumed event through the parent ring's digest and hash.
    assert context.chain.hops[-1].consumed_event_id is None
    assert context.chain.hops[-2].event_digest == parent.chain.newest.event_digest
    assert context.chain.hashes()[:-1] == parent.chain.hashes()
    assert context.chain.hops[-1].actor == ORDERS.actor


def test_the_producer_bounds_agree_with_the_decoder_at_every_depth() -> None:
    # The producer checks the chain it sealed by its length and ring count, not
    # by decoding it: at each boundary it refuses exactly what decode_chain
    # refuses, with the same reason and message.
    from trusthop.chain import decode_chain

    chains = [sealer().seal(TOPIC, event("d0"), origin=ORIGIN)]
    parents: list[Any] = [None]
    for depth in range(1, 4):
        last = chains[-1]
        parent = verify_record(VERIFIER, topic=TOPIC, headers=last.headers, value=last.value)
        parents.append(parent.context)
        chains.append(sealer(ORDERS).seal(TOPIC, event(f"d{depth}"), parent=parent.context))
    for depth, (record_, parent) in enumerate(zip(chains, parents, strict=True)):
        text = dict(record_.headers)["ce_trustchain"].decode()
        rings = len(decode_chain(text, max_bytes=len(text), max_rings=64).rings)
        for limits in (
            Limits(max_rings=rings),
            Limits(max_rings=rings - 1),
            Limits(max_bytes=len(text)),
            Limits(max_bytes=len(text) - 1),
        ):
            try:
                decode_chain(text, max_bytes=limits.max_bytes, max_rings=limits.max_rings)
                expected = None
            except TrustError as error:
                expected = (error.reason, error.message)
            kwargs: dict[str, Any] = {"parent": parent} if parent else {"origin": ORIGIN}
            producer = sealer(ORDERS if parent else EDGE, limits=limits)
            try:  # the same event sealed again: the very same chain (a fixed clock)
                again = producer.seal(TOPIC, event(f"d{depth}"), **kwargs)
                assert dict(again.headers)["ce_trustchain"].decode() == text
                got = None
            except TrustError as error:
                got = (error.reason, error.message)
            assert got == expected, (rings, limits)


def test_a_key_outside_the_bundle_is_not_refused_by_the_producer_but_by_consumers() -> None:
    rogue = Identity.create(EDGE.actor, MALLORY_KEY)
    record = sealer(rogue).seal(TOPIC, event(), origin=ORIGIN)
    assert only_trust_errors(record.headers, record.value) is Reason.UNKNOWN_KEY


async def test_producer_constructor_refusals() -> None:
    signer = ChainSigner(EDGE)
    with pytest.raises(TypeError, match="value_serializer"):
        TrustedKafkaProducer(signer=signer, value_serializer=bytes)
    with pytest.raises(TypeError, match="either producer"):
        TrustedKafkaProducer(signer=signer, producer=object(), bootstrap_servers="x:1")
    with pytest.raises(ValueError, match="positive"):
        TrustedKafkaProducer(signer=signer, max_message_bytes=0)
    owned = TrustedKafkaProducer(signer=signer, bootstrap_servers="broker:9092", acks="all")
    assert type(owned.client).__name__ == "AIOKafkaProducer"


# --------------------------------------------------------------------------- #
# dead letters
# --------------------------------------------------------------------------- #


def test_dead_letter_headers_keep_originals_and_end_with_the_verdict() -> None:
    rejection = Rejection(
        Reason.BROKEN_LINK, "ring 2 \u2192 ring 1" + "x" * 600, "kafka:orders", GROUP, 1
    )
    original: list[tuple[str, bytes | None]] = [("x", None), ("x", b"\xff"), ("ce_id", b"e")]
    headers = dead_letter_headers(original, rejection)
    assert headers[:3] == original
    assert [name for name, _ in headers[3:]] == [
        H_REASON,
        H_DETAIL,
        H_SOURCE,
        H_CONSUMER,
        H_ATTEMPTS,
    ]
    verdict = dict(headers)
    assert verdict[H_REASON] == b"broken_link"
    assert verdict[H_SOURCE] == b"kafka:orders"
    assert verdict[H_CONSUMER] == GROUP.encode()
    assert verdict[H_ATTEMPTS] == b"1"
    detail = verdict[H_DETAIL]
    assert detail is not None and len(detail.decode()) == 512
    assert dead_letter_headers(None, rejection)[0][0] == H_REASON


FORGED: list[tuple[str, bytes | None]] = [
    ("trusthop-reason", b"handler_failed"),
    ("x-keep", b"1"),
    ("TRUSTHOP-Detail", b"forged"),
    ("Trusthop-Source", None),
    ("trusthop-original", b"other/0/0"),
    ("TRU\u017fTHOP-consumer", b"folds to trusthop-consumer"),
    ("trusthop-", b""),
    ("x-trusthop-reason", b"not ours: kept"),
    ("trusthop_reason", b"not ours either: kept"),
]


def test_dead_letter_headers_drop_every_incoming_trusthop_header() -> None:
    rejection = Rejection(Reason.WRONG_DESTINATION, "signed for kafka:other", "kafka:orders", GROUP)
    headers = dead_letter_headers(FORGED, rejection)
    assert headers[:3] == [
        ("x-keep", b"1"),
        ("x-trusthop-reason", b"not ours: kept"),
        ("trusthop_reason", b"not ours either: kept"),
    ]
    own = [(name, value) for name, value in headers if name.casefold().startswith("trusthop-")]
    assert own == headers[3:]
    assert [name for name, _ in own] == [H_REASON, H_DETAIL, H_SOURCE, H_CONSUMER, H_ATTEMPTS]
    # A reader taking the first trusthop-reason, or the last, reads the real verdict.
    assert [v for k, v in headers if k == H_REASON] == [b"wrong_destination"]


def test_verdict_headers_escape_what_utf8_cannot_encode() -> None:
    rejection = Rejection(Reason.HANDLER_FAILED, "ValueError: id \ud800", "kafka:orders", GROUP)
    assert dict(dead_letter_headers([], rejection))[H_DETAIL] == b"ValueError: id \\ud800"


def test_stub_dead_letter_headers_name_the_original() -> None:
    rejection = Rejection(Reason.MALFORMED, "no specversion", "kafka:orders", GROUP)
    stub = stub_dead_letter_headers(
        rejection, topic="orders", partition=3, offset=17, size=1_100_000
    )
    assert stub == [
        *dead_letter_headers(None, rejection),
        (H_ORIGINAL, b"orders/3/17"),
        (H_ORIGINAL_BYTES, b"1100000"),
    ]


def test_default_dead_letter_request_size_holds_what_the_consumer_receives() -> None:
    assert default_dead_letter_max_request_size({}) == 2 * DEFAULT_MAX_MESSAGE_BYTES
    assert default_dead_letter_max_request_size({"max_partition_fetch_bytes": 1000}) == (
        2 * DEFAULT_MAX_MESSAGE_BYTES
    )
    assert (
        default_dead_letter_max_request_size(
            {"max_partition_fetch_bytes": 10 * DEFAULT_MAX_MESSAGE_BYTES}
        )
        == 20 * DEFAULT_MAX_MESSAGE_BYTES
    )


async def test_consumer_constructor_contract() -> None:
    with pytest.raises(ValueError, match="enable_auto_commit"):
        TrustedKafkaConsumer(TOPIC, verifier=VERIFIER, group_id=GROUP, enable_auto_commit=True)
    with pytest.raises(TypeError, match="value_deserializer"):
        TrustedKafkaConsumer(TOPIC, verifier=VERIFIER, group_id=GROUP, value_deserializer=bytes)
    with pytest.raises(ValueError, match="max_attempts"):
        TrustedKafkaConsumer(TOPIC, verifier=VERIFIER, group_id=GROUP, max_attempts=0)
    with pytest.raises(ValueError, match="topic"):
        TrustedKafkaConsumer(verifier=VERIFIER, group_id=GROUP)
    with pytest.raises(ValueError, match="group_id"):
        TrustedKafkaConsumer(TOPIC, verifier=VERIFIER, group_id="")
    consumer = TrustedKafkaConsumer(
        TOPIC,
        "payments",
        verifier=VERIFIER,
        group_id=GROUP,
        enable_auto_commit=False,
        bootstrap_servers="broker:9092",
    )
    assert consumer.client._enable_auto_commit is False
    assert consumer.dead_letter_producer.client._bootstrap_servers == "broker:9092"
    # The dead-letter producer takes a dead letter of a 1 MiB record (aiokafka: 1 MiB).
    assert consumer.dead_letter_producer._max_request_size == 2 * DEFAULT_MAX_MESSAGE_BYTES
    sized = TrustedKafkaConsumer(
        TOPIC, verifier=VERIFIER, group_id=GROUP, dead_letter_max_request_size=4096
    )
    assert sized.dead_letter_producer._max_request_size == 4096
    with pytest.raises(TypeError, match="not both"):
        TrustedKafkaConsumer(
            TOPIC,
            verifier=VERIFIER,
            group_id=GROUP,
            dead_letter_producer=object(),
            dead_letter_max_request_size=4096,
        )
    with pytest.raises(ValueError, match="positive"):
        TrustedKafkaConsumer(
            TOPIC, verifier=VERIFIER, group_id=GROUP, dead_letter_max_request_size=0
        )
    assert consumer.dead_letter_topic_for(TOPIC) == "orders.dlq" == default_dead_letter_topic(TOPIC)
    fixed = TrustedKafkaConsumer(
        TOPIC, verifier=VERIFIER, group_id=GROUP, dead_letter_topic="all-rejects"
    )
    assert fixed.dead_letter_topic_for("payments") == "all-rejects"
    derived = TrustedKafkaConsumer(
        TOPIC, verifier=VERIFIER, group_id=GROUP, dead_letter_topic=lambda t: f"dlq.{t}"
    )
    assert derived.dead_letter_topic_for("payments") == "dlq.payments"
    with pytest.raises(RuntimeError, match="start"):
        await consumer.__anext__()


# --------------------------------------------------------------------------- #
# offset bookkeeping against an in-memory AIOKafkaConsumer stand-in
# --------------------------------------------------------------------------- #


def record(
    offset: int,
    headers: Sequence[tuple[str, bytes | None]],
    value: bytes | None,
    *,
    key: bytes | None = None,
    partition: int = 0,
) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic=TOPIC,
        partition=partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=-1,
        serialized_value_size=-1,
        headers=tuple(headers),
    )


GOOD = [record(i, BINARY.headers, BINARY.value, key=b"good") for i in range(4)]
BAD = record(0, [("x", b"y")], b"not an event", key=b"bad")


class FakeConsumer:
    """One topic, partitions of fixed records; fetch positions, seek, commits."""

    def __init__(self, records: Iterable[ConsumerRecord[bytes, bytes]]) -> None:
        self.log: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        for r in records:
            self.log.setdefault(TopicPartition(r.topic, r.partition), []).append(r)
        self.position = dict.fromkeys(self.log, 0)
        self.commits: list[dict[TopicPartition, int]] = []
        self.refuse_commits = 0
        self.listener: Any = None
        self.started = self.stopped = False
        self.seeks: list[tuple[TopicPartition, int]] = []

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def getmany(self, timeout_ms: int = 0) -> dict[TopicPartition, list[Any]]:
        out = {}
        for tp, records in self.log.items():
            pending = records[self.position[tp] :]
            if pending:
                out[tp] = pending
                self.position[tp] = len(records)
        if not out:
            await asyncio.sleep(timeout_ms / 1000)
        return out

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))
        self.position[tp] = offset

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.refuse_commits:
            self.refuse_commits -= 1
            raise CommitFailedError("rebalanced")
        self.commits.append(dict(offsets))

    def committed_offset(self, partition: int = 0) -> int | None:
        done = [c[tp] for c in self.commits for tp in c if tp.partition == partition]
        return max(done) if done else None


class FakeBatch:
    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes | None, list[Any]]] = []

    def append(
        self, *, timestamp: Any, key: bytes | None, value: bytes | None, headers: list[Any]
    ) -> object:
        self.records.append((key, value, headers))
        return object()


class FakeProducer:
    """Dead-letter producer: ``fail`` times out the next N sends; ``errors`` are
    raised by the next sends, in order (``None``: that send succeeds)."""

    def __init__(self, max_request_size: int | None = None) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, list[Any]]] = []
        self.fail = 0
        self.errors: list[Exception | None] = []
        if max_request_size is not None:
            self._max_request_size = max_request_size

    def _maybe_fail(self) -> None:
        if self.errors:
            error = self.errors.pop(0)
            if error is not None:
                raise error
        if self.fail:
            self.fail -= 1
            raise KafkaTimeoutError("dead-letter topic unavailable")

    async def send_and_wait(
        self, topic: str, *, value: bytes | None, key: bytes | None, headers: list[Any]
    ) -> None:
        assert key is not None or value is not None  # as aiokafka requires
        self._maybe_fail()
        self.sent.append((topic, key, value, headers))

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def partitions_for(self, topic: str) -> set[int]:
        return {1, 0}

    async def send_batch(
        self, batch: FakeBatch, topic: str, *, partition: int
    ) -> asyncio.Future[None]:
        assert partition == 0
        self._maybe_fail()
        [(key, value, headers)] = batch.records
        self.sent.append((topic, key, value, headers))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


async def fake_consumer(
    records: Iterable[ConsumerRecord[bytes, bytes]],
    dlq_max_request_size: int | None = None,
    **kwargs: Any,
) -> tuple[TrustedKafkaConsumer, FakeConsumer, FakeProducer]:
    dlq = FakeProducer(dlq_max_request_size)
    # GOOD holds copies of one sealed event: these bookkeeping tests run
    # without replay detection and with in-process retries unless told.
    kwargs.setdefault("replay_store", None)
    kwargs.setdefault("retry_topics", False)
    consumer = TrustedKafkaConsumer(
        TOPIC,
        verifier=VERIFIER,
        group_id=GROUP,
        dead_letter_producer=dlq,
        poll_timeout_ms=10,
        retry_delay=0,
        **kwargs,
    )
    fake = FakeConsumer(records)
    consumer._consumer = fake  # the stand-in replaces the aiokafka client
    await consumer.start()
    return consumer, fake, dlq


async def test_a_failed_dead_letter_write_commits_nothing_and_retries_the_record() -> None:
    consumer, fake, dlq = await fake_consumer([BAD, GOOD[1]])
    dlq.fail = 1
    with pytest.raises(KafkaTimeoutError):
        await consumer.__anext__()
    assert fake.commits == []
    assert consumer.stats.dead_lettered_total == 0
    assert fake.seeks == [(TopicPartition(TOPIC, 0), 0)]
    delivery = await consumer.__anext__()  # the bad record again, dead-lettered this time
    assert delivery.offset == 1
    assert [(t, k) for t, k, _, _ in dlq.sent] == [("orders.dlq", b"bad")]
    assert fake.committed_offset() == 1
    assert consumer.stats.dead_lettered == {Reason.MALFORMED: 1}
    await consumer.stop()
    assert fake.stopped
    assert fake.committed_offset() == 1  # stop() never commits the open delivery


async def test_cancelling_run_mid_handler_leaves_the_record_uncommitted() -> None:
    consumer, fake, _ = await fake_consumer(GOOD[:2])
    started = asyncio.Event()

    async def slow(delivery: KafkaDelivery) -> None:
        started.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(consumer.run(slow))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.commits == []
    assert fake.seeks == [(TopicPartition(TOPIC, 0), 0)]
    seen: list[int] = []

    async def quick(delivery: KafkaDelivery) -> None:
        seen.append(delivery.offset)

    assert await consumer.run(quick, limit=2) == 2
    assert seen == [0, 1]
    assert fake.committed_offset() == 2


async def test_stop_inside_a_handler_finishes_the_record_then_shuts_down() -> None:
    consumer, fake, _ = await fake_consumer(GOOD[:3])

    async def stop_after_first(delivery: KafkaDelivery) -> None:
        await consumer.stop()

    assert await asyncio.wait_for(consumer.run(stop_after_first), 5) == 1
    assert fake.stopped
    assert fake.committed_offset() == 1
    assert consumer.stats.handled == 1


async def test_handler_failure_dead_letters_after_max_attempts() -> None:
    consumer, fake, dlq = await fake_consumer(GOOD[:1], max_attempts=2)
    attempts: list[int] = []

    @consumer.handler
    async def failing(delivery: KafkaDelivery) -> None:
        attempts.append(delivery.attempt)
        raise ValueError("no stock")

    assert await consumer.run(limit=1) == 1
    assert attempts == [1, 2]
    [(topic, key, value, headers)] = dlq.sent
    assert (topic, key, value) == ("orders.dlq", b"good", BINARY.value)
    verdict = dict(headers)
    assert verdict[H_REASON] == b"handler_failed"
    assert verdict[H_ATTEMPTS] == b"2"
    assert verdict[H_DETAIL] == b"ValueError: no stock"
    assert fake.committed_offset() == 1
    assert consumer.stats.as_dict() == {
        "delivered": 1,
        "handled": 0,
        "retried": 1,
        "commit_failures": 0,
        "dead_letter_stubs": 0,
        "foreign_retries": 0,
        "dead_lettered": {"handler_failed": 1},
    }


async def test_revoked_partitions_are_dropped_from_the_buffer() -> None:
    other = [record(i, BINARY.headers, BINARY.value, partition=1) for i in range(2)]
    consumer, fake, _ = await fake_consumer([*GOOD[:2], *other])
    first = await consumer.__anext__()
    assert (first.partition, first.offset) == (0, 0)
    await fake.listener.on_partitions_revoked({TopicPartition(TOPIC, 0)})
    fake.log.pop(TopicPartition(TOPIC, 0))
    rest = [(d.partition, d.offset) for d in [await consumer.__anext__() for _ in range(2)]]
    assert rest == [(1, 0), (1, 1)]


async def test_a_refused_commit_is_counted_not_raised() -> None:
    consumer, fake, _ = await fake_consumer(GOOD[:2])
    fake.refuse_commits = 1
    seen = []

    async def handle(delivery: KafkaDelivery) -> None:
        seen.append(delivery.offset)

    assert await consumer.run(handle, limit=2) == 2
    assert seen == [0, 1]
    assert consumer.stats.commit_failures == 1
    assert fake.commits == [{TopicPartition(TOPIC, 0): 2}]


async def test_run_and_iteration_exclude_each_other() -> None:
    consumer, _, _ = await fake_consumer(GOOD[:2])
    gate = asyncio.Event()

    async def wait(delivery: KafkaDelivery) -> None:
        await gate.wait()

    task = asyncio.create_task(consumer.run(wait, limit=1))
    await asyncio.sleep(0.05)
    with pytest.raises(RuntimeError, match="run"):
        await consumer.__anext__()
    with pytest.raises(RuntimeError, match="already"):
        await consumer.run(wait)
    gate.set()
    assert await task == 1
    with pytest.raises(TypeError, match="handler"):
        await consumer.run()


async def test_an_open_delivery_belongs_to_the_task_that_got_it() -> None:
    consumer, fake, _ = await fake_consumer(GOOD[:3])
    first = await consumer.__anext__()
    assert first.offset == 0

    async def other_loop() -> None:
        async for _ in consumer:
            pass

    with pytest.raises(RuntimeError, match="one task at a time"):
        await asyncio.create_task(other_loop())
    with pytest.raises(RuntimeError, match="one task at a time"):
        await asyncio.create_task(consumer.commit())
    assert fake.commits == []  # the other task could neither commit nor rewind it
    await consumer.commit()
    assert fake.committed_offset() == 1


# --------------------------------------------------------------------------- #
# no record can stop or stall the consumer
# --------------------------------------------------------------------------- #


def bug_on_poison(monkeypatch: pytest.MonkeyPatch, target: str, error: Exception) -> None:
    """Make ``target`` (the decoder or the verifier) raise ``error`` on POISON's bytes.

    The poison record carries a valid chain: only the injected bug rejects it.
    """
    module, _, name = target.rpartition(".")
    if module == "verifier":
        real = VERIFIER.prepare  # what admission runs first on every delivery

        def prepare(wire: Any) -> Any:
            if wire.attributes.get("id") == "poison":
                raise error
            return real(wire)

        monkeypatch.setattr(VERIFIER, "prepare", prepare)
        return
    import importlib

    owner = importlib.import_module(module)
    real_decode = getattr(owner, name)

    def decode(headers: Any, value: Any) -> Any:
        wire = real_decode(headers, value)
        if wire.attributes.get("id") == "poison":
            raise error
        return wire

    monkeypatch.setattr(owner, name, decode)


POISONED = sealer().seal(TOPIC, event("poison"), origin=ORIGIN)
POISON = record(0, POISONED.headers, POISONED.value, key=b"poison")
BUGS = [
    (
        "trusthop.kafka.records.decode_kafka",
        UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
    ),
    ("verifier.prepare", RecursionError("maximum recursion depth exceeded")),
    ("verifier.prepare", KeyError("trustchain")),
]


@pytest.mark.parametrize(("target", "error"), BUGS, ids=["decoder", "verifier", "keyerror"])
async def test_a_verification_bug_dead_letters_the_record_as_malformed_in_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, target: str, error: Exception
) -> None:
    consumer, fake, dlq = await fake_consumer([POISON, GOOD[1]])
    bug_on_poison(monkeypatch, target, error)
    seen: list[int] = []

    async def handle(delivery: KafkaDelivery) -> None:
        seen.append(delivery.offset)

    with caplog.at_level(logging.ERROR, logger="trusthop.kafka.consumer"):
        assert await asyncio.wait_for(consumer.run(handle, limit=2), 5) == 2
    assert seen == [1]  # the record behind the poison is delivered
    [(topic, key, value, headers)] = dlq.sent
    assert (topic, key, value) == ("orders.dlq", b"poison", POISONED.value)
    assert headers[: len(POISONED.headers)] == POISONED.headers
    verdict = dict(headers)
    assert verdict[H_REASON] == b"malformed"
    assert verdict[H_DETAIL] == f"undecodable record ({type(error).__name__})".encode()
    assert verdict[H_SOURCE] == b"kafka:orders"
    assert fake.committed_offset() == 2
    assert consumer.stats.dead_lettered == {Reason.MALFORMED: 1}
    assert consumer.stats.handled == 1
    # Logged as a bug, with its traceback.
    [logged] = [
        r
        for r in caplog.records
        if r.levelno == logging.ERROR and r.name == "trusthop.kafka.consumer"
    ]
    assert logged.exc_info is not None and logged.exc_info[1] is error
    assert "orders:0@0" in logged.getMessage()


async def test_a_verification_bug_does_not_end_async_for(monkeypatch: pytest.MonkeyPatch) -> None:
    consumer, fake, dlq = await fake_consumer([POISON, GOOD[1], GOOD[2]])
    bug_on_poison(monkeypatch, *BUGS[0])
    first = await consumer.__anext__()
    assert first.offset == 1
    assert fake.committed_offset() == 1  # the poison, dead-lettered on the way
    second = await consumer.__anext__()
    assert second.offset == 2
    assert fake.committed_offset() == 2
    assert [dict(h)[H_REASON] for _, _, _, h in dlq.sent] == [b"malformed"]


async def test_a_trust_error_is_still_its_own_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    # The net catches only what is not a TrustError.
    consumer, _, dlq = await fake_consumer([POISON])
    bug_on_poison(monkeypatch, "verifier.prepare", TrustError(Reason.EXPIRED, "too late"))
    assert await consumer.run(lambda d: asyncio.sleep(0), limit=1) == 1
    [(_, _, _, headers)] = dlq.sent
    assert dict(headers)[H_REASON] == b"expired"
    assert dict(headers)[H_DETAIL] == b"too late"


BIG = record(
    0, [("x-big", b"h" * 600), ("trusthop-reason", b"handler_failed")], b"v" * 2000, key=b"big"
)


@pytest.mark.parametrize(
    "error",
    [
        MessageSizeTooLargeError("client-side: over max_request_size"),
        MessageSizeTooLargeError(),  # as the broker's MESSAGE_TOO_LARGE (10) arrives
        RecordListTooLargeError(),  # the broker's RECORD_LIST_TOO_LARGE (18)
    ],
    ids=["client", "broker-10", "broker-18"],
)
async def test_a_dead_letter_too_large_is_replaced_by_a_stub(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    consumer, fake, dlq = await fake_consumer([BIG, GOOD[1]])
    dlq.errors = [error]
    seen: list[int] = []

    async def handle(delivery: KafkaDelivery) -> None:
        seen.append(delivery.offset)

    with caplog.at_level(logging.ERROR, logger="trusthop.kafka.consumer"):
        assert await asyncio.wait_for(consumer.run(handle, limit=2), 5) == 2
    assert seen == [1]
    [(topic, key, value, headers)] = dlq.sent
    assert (topic, key, value) == ("orders.dlq", None, None)
    size = record_size(BIG.key, BIG.value, BIG.headers)
    rejection = Rejection(Reason.MALFORMED, "", "kafka:orders", GROUP)
    names = [name for name, _ in headers]
    assert names == [*dict(rejection.headers()), H_ORIGINAL, H_ORIGINAL_BYTES]
    verdict = dict(headers)
    assert verdict[H_REASON] == b"malformed"  # not the sender's forged handler_failed
    assert verdict[H_ORIGINAL] == b"orders/0/0"
    assert verdict[H_ORIGINAL_BYTES] == str(size).encode()
    assert fake.committed_offset() == 2
    assert consumer.stats.dead_letter_stubs == 1
    assert consumer.stats.dead_lettered == {Reason.MALFORMED: 1}
    assert any("stub" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


async def test_a_handler_failure_too_large_to_dead_letter_is_stubbed_too() -> None:
    consumer, fake, dlq = await fake_consumer(GOOD[:2], max_attempts=1)
    dlq.errors = [MessageSizeTooLargeError()]

    async def fail_first(delivery: KafkaDelivery) -> None:
        if delivery.offset == 0:
            raise RuntimeError("no stock")

    assert await consumer.run(fail_first, limit=2) == 2
    [(_, key, value, headers)] = dlq.sent
    assert (key, value) == (None, None)
    verdict = dict(headers)
    assert verdict[H_REASON] == b"handler_failed"
    assert verdict[H_DETAIL] == b"RuntimeError: no stock"
    assert verdict[H_ORIGINAL] == b"orders/0/0"
    assert fake.committed_offset() == 2


async def test_a_batch_dead_letter_over_the_request_size_is_stubbed() -> None:
    # Null key and value: written as a batch, whose first record aiokafka never
    # checks against max_request_size; the consumer does.
    huge = record(0, [("x-pad", b"p" * 5000)], None)
    consumer, fake, dlq = await fake_consumer([huge, GOOD[1]], dlq_max_request_size=4096)
    assert await consumer.run(lambda d: asyncio.sleep(0), limit=2) == 2
    [(_, key, value, headers)] = dlq.sent
    assert (key, value) == (None, None)
    assert "x-pad" not in dict(headers)
    assert dict(headers)[H_ORIGINAL_BYTES] == b"5005"
    assert fake.committed_offset() == 2
    assert consumer.stats.dead_letter_stubs == 1


async def test_a_small_null_null_dead_letter_is_written_in_full() -> None:
    empty = record(0, [("x-pad", b"p")], None)
    consumer, _, dlq = await fake_consumer([empty], dlq_max_request_size=4096)
    assert await consumer.run(lambda d: asyncio.sleep(0), limit=1) == 1
    [(_, key, value, headers)] = dlq.sent
    assert (key, value) == (None, None)
    assert headers[0] == ("x-pad", b"p")
    assert H_ORIGINAL not in dict(headers)
    assert consumer.stats.dead_letter_stubs == 0


@pytest.mark.parametrize(
    "errors",
    [
        [KafkaTimeoutError("broker down")],
        [MessageSizeTooLargeError(), KafkaTimeoutError("broker down while writing the stub")],
    ],
    ids=["full", "stub"],
)
async def test_other_dead_letter_failures_commit_nothing(errors: list[Exception]) -> None:
    consumer, fake, dlq = await fake_consumer([BIG, GOOD[1]])
    dlq.errors = list(errors)
    with pytest.raises(KafkaTimeoutError):
        await consumer.run(lambda d: asyncio.sleep(0), limit=2)
    assert fake.commits == [] and dlq.sent == []
    assert consumer.stats.dead_lettered_total == 0 and consumer.stats.dead_letter_stubs == 0
    # It comes again, and is dead-lettered once the broker is back.
    assert await consumer.run(lambda d: asyncio.sleep(0), limit=2) == 2
    assert [(k, dict(h)[H_REASON]) for _, k, _, h in dlq.sent] == [(b"big", b"malformed")]
    assert fake.committed_offset() == 2


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


@pytest.mark.parametrize(
    ("error", "detail"),
    [
        (ValueError("bad name \ud800"), b"ValueError: bad name \\ud800"),
        (Unprintable(), b"Unprintable: <message not printable>"),
    ],
    ids=["surrogate", "unprintable"],
)
async def test_a_handler_message_that_cannot_be_encoded_is_still_dead_lettered(
    error: Exception, detail: bytes
) -> None:
    consumer, fake, dlq = await fake_consumer(GOOD[:2], max_attempts=1)

    async def fail_first(delivery: KafkaDelivery) -> None:
        if delivery.offset == 0:
            raise error

    assert await consumer.run(fail_first, limit=2) == 2
    [(_, _, _, headers)] = dlq.sent
    assert dict(headers)[H_DETAIL] == detail
    assert fake.committed_offset() == 2


# --------------------------------------------------------------------------- #
# a record aiokafka cannot parse (a header name that is not UTF-8)
# --------------------------------------------------------------------------- #


class UndecodableFake(FakeConsumer):
    """Like aiokafka: ``getmany`` raises UnicodeDecodeError on reaching an undecodable
    record, losing what it drained from earlier partitions in the same call."""

    def __init__(
        self, records: Iterable[ConsumerRecord[bytes, bytes]], undecodable: set[tuple[int, int]]
    ) -> None:
        super().__init__(records)
        self.undecodable = undecodable
        # aiokafka's position() is a method: the positions move to ``offsets``.
        self.offsets: dict[TopicPartition, int] = self.__dict__.pop("position")

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))
        self.offsets[tp] = offset

    def assignment(self) -> set[TopicPartition]:
        return set(self.log)

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.committed_offset(tp.partition)

    async def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        for tp in partitions:
            self.seek(tp, 0)

    async def position(self, tp: TopicPartition) -> int:  # type: ignore[override]
        return self.offsets[tp]

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Any]]:
        out = {}
        for tp, records in self.log.items():
            if partitions and tp not in partitions:
                continue
            pending = records[self.offsets[tp] :][:max_records]
            if any((tp.partition, r.offset) in self.undecodable for r in pending):
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
            if pending:
                out[tp] = pending
                self.offsets[tp] = pending[-1].offset + 1
        if not out:
            await asyncio.sleep(timeout_ms / 1000)
        return out


async def undecodable_consumer(
    records: Iterable[ConsumerRecord[bytes, bytes]], undecodable: set[tuple[int, int]]
) -> tuple[TrustedKafkaConsumer, UndecodableFake, FakeProducer]:
    consumer, _, dlq = await fake_consumer([])
    fake = UndecodableFake(records, undecodable)
    consumer._consumer = fake
    return consumer, fake, dlq


def good(offset: int, partition: int) -> ConsumerRecord[bytes, bytes]:
    return record(offset, BINARY.headers, BINARY.value, key=b"good", partition=partition)


async def test_an_undecodable_record_is_dead_lettered_as_a_stub_and_skipped() -> None:
    # Partition 0 drained first, then partition 1 raises: its records were
    # lost by that getmany, and must come again, in order, none skipped.
    records = [good(0, 0), good(1, 0), good(0, 1), good(1, 1), good(2, 1)]
    consumer, fake, dlq = await undecodable_consumer(records, {(1, 1)})
    seen: list[tuple[int, int]] = []

    async def handle(delivery: KafkaDelivery) -> None:
        seen.append((delivery.partition, delivery.offset))

    assert await consumer.run(handle, limit=5) == 5
    assert sorted(seen) == [(0, 0), (0, 1), (1, 0), (1, 2)]
    assert [o for p, o in seen if p == 1] == [0, 2]
    assert consumer.stats.dead_lettered == {Reason.MALFORMED: 1}
    assert consumer.stats.dead_letter_stubs == 1
    assert consumer.stats.handled == 4
    [(topic, key, value, headers)] = dlq.sent
    assert (topic, key, value) == (f"{TOPIC}.dlq", None, None)
    verdict = dict(headers)
    assert verdict[H_REASON] == b"malformed"
    assert verdict[H_DETAIL] == UNDECODABLE_DETAIL.encode()
    assert verdict[H_ORIGINAL] == f"{TOPIC}/1/1".encode()
    assert H_ORIGINAL_BYTES not in verdict  # unknown: aiokafka could not read it
    assert fake.committed_offset(0) == 2
    assert fake.committed_offset(1) == 3
    # The stub's commit (offset 2) came after the record before it (offset 1).
    assert [c[tp] for c in fake.commits for tp in c if tp.partition == 1] == [1, 2, 3]
    await consumer.stop()


async def test_an_undecodable_record_whose_stub_fails_is_not_committed() -> None:
    consumer, fake, dlq = await undecodable_consumer([good(0, 0), good(1, 0), good(2, 0)], {(0, 1)})
    iterator = consumer.__aiter__()
    first = await iterator.__anext__()
    assert first.offset == 0
    dlq.fail = 1
    with pytest.raises(KafkaTimeoutError):
        await iterator.__anext__()
    assert fake.committed_offset() == 1  # the first delivery; not past the poison
    assert dlq.sent == []
    second = await iterator.__anext__()  # the poison is found again, then dead-lettered
    assert second.offset == 2
    [(_, _, _, headers)] = dlq.sent
    assert dict(headers)[H_ORIGINAL] == f"{TOPIC}/0/1".encode()
    assert fake.committed_offset() == 2
    await consumer.commit()
    assert fake.committed_offset() == 3
    await consumer.stop()


def test_a_stub_of_unknown_size_has_no_original_bytes() -> None:
    rejection = Rejection(Reason.MALFORMED, "x", "kafka:t", GROUP)
    headers = stub_dead_letter_headers(rejection, topic="t", partition=2, offset=7, size=None)
    assert headers[-1] == (H_ORIGINAL, b"t/2/7")
    assert H_ORIGINAL_BYTES not in dict(headers)
