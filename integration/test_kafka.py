"""trusthop.kafka against a real Kafka-protocol broker (the ``kafka_bootstrap`` fixture).

Every test uses fresh topics and groups (``unique_name``). Records are
produced with plain aiokafka wherever a test needs bytes the wrappers would
never write (attacks, hostile headers), and dead-letter topics are read back
with plain aiokafka, so the assertions do not trust the code under test.

Group joins are slow on Tansu (about half the session timeout for a fresh
group, plus the old member's session timeout when a new member replaces one
that left), so each test keeps the number of joins small.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from cloudevents.core.v1.event import CloudEvent

from trusthop.bundle import TrustBundle
from trusthop.canonical import b64url_encode
from trusthop.chain import HopRing, OriginRing, decode_chain
from trusthop.destination import kafka_destination
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.kafka import (
    H_ORIGINAL,
    H_ORIGINAL_BYTES,
    UNDECODABLE_DETAIL,
    KafkaDelivery,
    KafkaRecord,
    TrustedKafkaConsumer,
    TrustedKafkaProducer,
    record_size,
    verify_record,
)
from trusthop.keys import SigningKey
from trusthop.pipeline import (
    H_ATTEMPTS,
    H_CONSUMER,
    H_DESTINATION,
    H_DETAIL,
    H_REASON,
    H_SOURCE,
    ChainSigner,
    ChainVerifier,
)
from trusthop.sign import Identity, mint_origin
from trusthop.verify import VerifiedContext

DOMAIN = "prod.example.com"
EDGE = Identity.create(f"spiffe://{DOMAIN}/ns/edge/sa/gateway", SigningKey.from_seed(b"\x11" * 32))
ORDERS = Identity.create(f"spiffe://{DOMAIN}/ns/shop/sa/orders", SigningKey.from_seed(b"\x12" * 32))
# Same actor name as ORDERS, but a key the bundle has never seen.
ROGUE = Identity.create(ORDERS.actor, SigningKey.from_seed(b"\x66" * 32))
BUNDLE = TrustBundle.of([EDGE.bundle_key, ORDERS.bundle_key])

SCOPE = frozenset({"orders:read", "orders:write", "payments:charge"})
RECEIVE_TIMEOUT = 60.0
TRUSTHOP_HEADERS = (H_REASON, H_DETAIL, H_SOURCE, H_CONSUMER, H_ATTEMPTS)

# 6 s is the smallest session timeout Apache Kafka accepts by default; Tansu
# waits about half of it before completing a fresh group's first join.
GROUP_KWARGS: dict[str, Any] = {
    "auto_offset_reset": "earliest",
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 500,
}


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def origin_ring(scope: frozenset[str] = SCOPE) -> OriginRing:
    return mint_origin(
        EDGE,
        subject="user:alice",
        issuer="https://idp.example.com",
        credential="alice-access-token",
        scope=scope,
        now=time.time(),
        ttl=3600,
    )


def order_event(label: str, **extra: Any) -> CloudEvent:
    attributes: dict[str, Any] = {
        "id": f"{label}-{uuid.uuid4().hex[:8]}",
        "source": "/shop/edge",
        "type": "com.example.order.placed",
        "specversion": "1.0",
        "datacontenttype": "application/json",
        "subject": label,
    }
    attributes.update(extra)
    return CloudEvent(attributes, {"order": label, "total": "9.99"})


def verifier() -> ChainVerifier:
    return ChainVerifier(BUNDLE)


def producer(bootstrap: str, identity: Identity = EDGE, **kwargs: Any) -> TrustedKafkaProducer:
    return TrustedKafkaProducer(
        signer=ChainSigner(identity), bootstrap_servers=bootstrap, acks="all", **kwargs
    )


def consumer(bootstrap: str, *topics: str, group: str, **kwargs: Any) -> TrustedKafkaConsumer:
    return TrustedKafkaConsumer(
        *topics,
        verifier=verifier(),
        group_id=group,
        bootstrap_servers=bootstrap,
        **(GROUP_KWARGS | kwargs),
    )


def header_map(headers: Sequence[tuple[str, bytes | None]]) -> dict[str, bytes | None]:
    return dict(headers)


RawRecord = tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]


@asynccontextmanager
async def raw_producer(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    client = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await client.start()
    try:
        yield client
    finally:
        await client.stop()


async def publish_raw(bootstrap: str, topic: str, records: Sequence[RawRecord]) -> None:
    """Publish exactly these bytes, in order, to partition 0 (null/null via a batch)."""
    async with raw_producer(bootstrap) as client:
        for key, value, headers in records:
            if key is None and value is None:
                batch = client.create_batch()
                batch.append(timestamp=None, key=None, value=None, headers=headers)
                await (await client.send_batch(batch, topic, partition=0))
            else:
                await client.send_and_wait(
                    topic, value=value, key=key, headers=headers, partition=0
                )


async def read_topic(bootstrap: str, topic: str, count: int) -> list[Any]:
    """Read ``count`` records from every partition of ``topic`` (no group)."""
    client = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await client.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + RECEIVE_TIMEOUT
        while len(records) < count and time.monotonic() < deadline:
            batches = await client.getmany(timeout_ms=500)
            for batch in batches.values():
                records.extend(batch)
        # Nothing beyond what we expected.
        batches = await client.getmany(timeout_ms=1000)
        for batch in batches.values():
            records.extend(batch)
    finally:
        await client.stop()
    assert len(records) == count, f"{topic}: expected {count} records, got {len(records)}"
    return records


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    """The group's committed offsets for every partition of ``topic``."""
    client = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await client.start()
    try:
        await client.topics()  # fetches cluster metadata
        partitions = sorted(client.partitions_for_topic(topic) or ())
        assert partitions, f"{topic} has no partitions"
        return {p: await client.committed(TopicPartition(topic, p)) for p in partitions}
    finally:
        await client.stop()


def only_partition_zero(committed: dict[int, int | None]) -> int | None:
    """The committed offset of partition 0, requiring no commit on any other."""
    assert all(offset is None for p, offset in committed.items() if p != 0), committed
    return committed[0]


def with_header(
    record: KafkaRecord, name: str, value: bytes | None
) -> list[tuple[str, bytes | None]]:
    """The record's headers with ``name`` replaced (removed when ``value`` is None)."""
    out: list[tuple[str, bytes | None]] = [(k, v) for k, v in record.headers if k != name]
    if value is not None:
        out.append((name, value))
    return out


# --------------------------------------------------------------------------- #
# happy path: origin, then a derived event on another topic
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("first_structured", "second_structured"),
    [(False, False), (True, True), (True, False)],
    ids=["binary", "structured", "structured-then-binary"],
)
async def test_origin_then_derived_event_verifies_the_full_chain(
    kafka_bootstrap: str, unique_name: str, first_structured: bool, second_structured: bool
) -> None:
    orders_topic, payments_topic = f"{unique_name}-orders", f"{unique_name}-payments"
    origin = origin_ring()
    placed = order_event("o-1", partitionkey="customer-42")

    async with producer(kafka_bootstrap, structured=first_structured) as edge:
        sent = await edge.send_and_wait(orders_topic, placed, origin=origin)
    assert sent.topic == orders_topic

    # The orders service: verify, then publish a derived event with narrower scope.
    received: list[KafkaDelivery] = []
    async with (
        consumer(kafka_bootstrap, orders_topic, group=f"{unique_name}-orders-svc") as orders_in,
        producer(kafka_bootstrap, ORDERS, structured=second_structured) as orders_out,
    ):
        async for delivery in orders_in:
            received.append(delivery)
            data = delivery.event.get_data()
            assert isinstance(data, dict)
            derived = CloudEvent(
                {
                    "id": f"pay-{uuid.uuid4().hex[:8]}",
                    "source": "/shop/orders",
                    "type": "com.example.payment.requested",
                    "specversion": "1.0",
                    "datacontenttype": "application/json",
                },
                {"amount": 999, "order": data["order"]},
            )
            await orders_out.send_and_wait(
                payments_topic, derived, parent=delivery.context, scope={"payments:charge"}
            )
            await orders_in.commit()
            break
        assert orders_in.stats.delivered == 1
        assert orders_in.stats.handled == 1
        assert orders_in.stats.dead_lettered_total == 0

    [first] = received
    assert first.offset == sent.offset and first.partition == sent.partition
    assert first.record.key == b"customer-42"  # the partitionkey extension became the key
    assert first.event.get_id() == placed.get_id()
    assert first.event.get_data() == {"order": "o-1", "total": "9.99"}
    assert first.context.subject == "user:alice"
    assert first.context.actors == (EDGE.actor, EDGE.actor)
    assert first.context.scope == SCOPE
    assert first.context.destination == kafka_destination(orders_topic)
    names = [k for k, _ in first.record.headers]
    if first_structured:
        assert names == ["content-type"]
        assert json.loads(first.record.value)["trustchain"]
    else:
        assert "ce_trustchain" in names

    # The payments service verifies the whole chain: origin, edge hop, orders hop.
    contexts: list[VerifiedContext] = []
    records: list[Any] = []

    async def handle(delivery: KafkaDelivery) -> None:
        contexts.append(delivery.context)
        records.append(delivery.record)

    async with consumer(
        kafka_bootstrap, payments_topic, group=f"{unique_name}-payments-svc"
    ) as payments_in:
        settled = await asyncio.wait_for(payments_in.run(handle, limit=1), RECEIVE_TIMEOUT)
        assert settled == 1
        assert payments_in.stats.handled == 1

    [context] = contexts
    assert context.actors == (EDGE.actor, EDGE.actor, ORDERS.actor)
    assert context.subject == "user:alice"
    assert context.transaction_id == origin.transaction_id
    assert context.scope == {"payments:charge"}
    assert context.destination == kafka_destination(payments_topic)
    newest = context.chain.hops[-1]
    # v2: the orders hop names the event it consumed through the edge hop's
    # event digest (and the hash its signature covers); the id is opt-in.
    assert newest.consumed_event_id is None
    assert context.chain.hops[0].event_digest == first.wire.digest()
    assert context.chain.hashes()[:2] == first.context.chain.hashes()
    assert newest.destination == kafka_destination(payments_topic)
    assert context.chain.hops[0].destination == kafka_destination(orders_topic)
    # The exact bytes on the broker verify for the payments topic and no other.
    [record] = records
    verify_record(verifier(), topic=payments_topic, headers=record.headers, value=record.value)
    with pytest.raises(TrustError) as info:
        verify_record(verifier(), topic=orders_topic, headers=record.headers, value=record.value)
    assert info.value.reason is Reason.WRONG_DESTINATION


# --------------------------------------------------------------------------- #
# attacks: every one dead-lettered with its reason, original bytes preserved
# --------------------------------------------------------------------------- #


async def test_attacks_are_dead_lettered_with_reason_and_original_bytes(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topic, group = f"{unique_name}-orders", f"{unique_name}-svc"
    elsewhere = f"{unique_name}-elsewhere"
    signer = ChainSigner(EDGE)
    edge = TrustedKafkaProducer(signer=signer, producer=object())  # seal() only, no I/O
    edge_structured = TrustedKafkaProducer(signer=signer, structured=True, producer=object())
    rogue = TrustedKafkaProducer(signer=ChainSigner(ROGUE), producer=object())
    orders = TrustedKafkaProducer(signer=ChainSigner(ORDERS), producer=object())
    origin = origin_ring()

    def sealed(label: str, **kwargs: Any) -> KafkaRecord:
        return edge.seal(topic, order_event(label), origin=origin, key=label, **kwargs)

    # A legitimate first hop to "elsewhere", verified, to derive two-hop chains from.
    first = edge.seal(elsewhere, order_event("parent"), origin=origin)
    parent = verify_record(
        verifier(), topic=elsewhere, headers=first.headers, value=first.value
    ).context

    # tampered data: same headers, other JSON
    tampered = sealed("tampered")
    tampered_value = tampered.value.replace(b"9.99", b"0.01")
    assert tampered_value != tampered.value

    # tampered structured-mode document
    tampered_s = edge_structured.seal(
        topic, order_event("tampered-s"), origin=origin, key="tampered-s"
    )
    tampered_s_value = tampered_s.value.replace(b"9.99", b"0.01")
    assert tampered_s_value != tampered_s.value

    # a ring removed: orders' hop names the hash of the edge's hop, which is gone
    derived = orders.seal(topic, order_event("broken"), parent=parent, key="broken")
    raw_chain = header_map(derived.headers)["ce_trustchain"]
    assert raw_chain is not None
    chain = decode_chain(raw_chain.decode(), max_bytes=1 << 20, max_rings=32)
    assert len(chain.hops) == 2
    # Removed on the wire (Chain(...) would re-encode the kept ring after the origin).
    kept = (chain.ring_bytes[0], chain.ring_bytes[2])
    spliced = ("2." + ".".join(b64url_encode(r) for r in kept)).encode()

    # scope widened by a legitimate key: built by hand (append_hop refuses it)
    narrow = TrustedKafkaProducer(signer=ChainSigner(EDGE), producer=object())
    narrow_first = narrow.seal(
        elsewhere, order_event("narrow"), origin=origin, scope={"orders:read"}
    )
    narrow_parent = verify_record(
        verifier(), topic=elsewhere, headers=narrow_first.headers, value=narrow_first.value
    ).context
    widened_event = order_event("widened")
    base = narrow_parent.chain
    hop = HopRing(
        actor=ORDERS.actor,
        key_tag=ORDERS.key_tag,
        iat=base.newest.iat,
        exp=base.newest.exp,
        scope=frozenset({"orders:read", "orders:write"}),
        event_digest=WireEvent.from_cloudevent(widened_event).digest(),
        destination=kafka_destination(topic),
    )
    hop = dataclasses.replace(hop, signature=ORDERS.key.sign(base.next_signing_input(hop)))
    widened = orders.seal(topic, widened_event, parent=narrow_parent, key="widened")
    widened_chain = base.appended(hop).encode().encode()

    no_chain = sealed("no-chain")
    garbage = sealed("garbage")
    valid_hostile = sealed("valid-hostile")
    # A verdict planted by the sender: every trusthop-* header, any case, is dropped.
    forged = edge.seal(elsewhere, order_event("forged"), origin=origin)
    forged_headers: list[tuple[str, bytes | None]] = [
        ("trusthop-reason", b"handler_failed"),
        ("TrustHop-Detail", b"forged by the sender"),
        ("trusthop-source", b"kafka:" + topic.encode()),
        ("trusthop-original", b"other/0/0"),
        *forged.headers,
        ("trusthop-attempts", b"99"),
    ]

    cases: list[tuple[str, Reason | None, RawRecord]] = [
        ("valid-1", None, (b"valid-1", *_kv(sealed("valid-1")))),
        ("tampered", Reason.EVENT_MISMATCH, (b"tampered", tampered_value, list(tampered.headers))),
        (
            "tampered-s",
            Reason.EVENT_MISMATCH,
            (b"tampered-s", tampered_s_value, list(tampered_s.headers)),
        ),
        (
            "unknown-key",
            Reason.UNKNOWN_KEY,
            (b"unknown-key", *_kv(rogue.seal(topic, order_event("rogue"), origin=origin))),
        ),
        (
            "wrong-destination",
            Reason.WRONG_DESTINATION,
            (
                b"wrong-destination",
                *_kv(edge.seal(elsewhere, order_event("replay"), origin=origin)),
            ),
        ),
        (
            "broken-link",
            Reason.BROKEN_LINK,
            (b"broken-link", derived.value, with_header(derived, "ce_trustchain", spliced)),
        ),
        (
            "scope-escalation",
            Reason.SCOPE_ESCALATION,
            (
                b"scope-escalation",
                widened.value,
                with_header(widened, "ce_trustchain", widened_chain),
            ),
        ),
        (
            "missing-chain",
            Reason.MISSING_CHAIN,
            (b"missing-chain", no_chain.value, with_header(no_chain, "ce_trustchain", None)),
        ),
        (
            "garbage-chain",
            Reason.MALFORMED,
            (
                b"garbage-chain",
                garbage.value,
                with_header(garbage, "ce_trustchain", b"!!not base64url!!"),
            ),
        ),
        (
            "null-ce-header",
            Reason.MALFORMED,
            (b"null-ce-header", garbage.value, [*garbage.headers[:1], ("ce_id", None)]),
        ),
        (
            "non-utf8",
            Reason.MALFORMED,
            (b"non-utf8", garbage.value, [*with_header(garbage, "ce_source", b"\xff\xfe\x80")]),
        ),
        (
            "repeated-key",
            Reason.MALFORMED,
            (b"repeated-key", garbage.value, [*garbage.headers, ("ce_id", b"second-id")]),
        ),
        (
            "not-a-cloudevent",
            Reason.MALFORMED,
            (b"not-a-cloudevent", b"hello, world", [("x-trace", None), ("x-bin", b"\x00\xff")]),
        ),
        ("null-null", Reason.MALFORMED, (None, None, [])),
        (
            "forged-verdict",
            Reason.WRONG_DESTINATION,
            (b"forged-verdict", forged.value, forged_headers),
        ),
        # Foreign headers with None, non-UTF-8 and repeated keys are ignored.
        (
            "valid-hostile",
            None,
            (
                b"valid-hostile",
                valid_hostile.value,
                [
                    ("x-null", None),
                    *valid_hostile.headers,
                    ("x-bin", b"\xff\x00"),
                    ("x-bin", b"again"),
                    ("trusthop-reason", b"spoofed"),
                ],
            ),
        ),
        ("valid-2", None, (b"valid-2", *_kv(sealed("valid-2")))),
    ]
    await publish_raw(kafka_bootstrap, topic, [raw for _, _, raw in cases])
    expected_dead = Counter(reason for _, reason, _ in cases if reason is not None)
    expected_ok = [label for label, reason, _ in cases if reason is None]

    handled: list[bytes] = []

    async def handle(delivery: KafkaDelivery) -> None:
        handled.append(delivery.record.key)

    async with consumer(kafka_bootstrap, topic, group=group) as trusted:
        settled = await asyncio.wait_for(trusted.run(handle, limit=len(cases)), RECEIVE_TIMEOUT)
        stats = trusted.stats
    assert settled == len(cases)
    assert [k.decode() for k in handled] == expected_ok
    assert stats.delivered == stats.handled == len(expected_ok)
    assert stats.dead_lettered == expected_dead
    assert stats.handled + stats.dead_lettered_total == len(cases)  # nothing lost

    # Every dead letter: original key, value and headers byte for byte (minus
    # any trusthop-* header the sender put there), then the verdict, once.
    dead = await read_topic(kafka_bootstrap, f"{topic}.dlq", sum(expected_dead.values()))
    by_key = {record.key: record for record in dead}
    assert len(by_key) == len(dead)
    for label, reason, (key, value, headers) in cases:
        if reason is None:
            assert key not in by_key
            continue
        record = by_key[key]
        assert record.value == value, label
        got = list(record.headers)
        kept = [(k, v) for k, v in headers if not k.lower().startswith("trusthop-")]
        assert got[: len(kept)] == kept, label
        names = [k for k, _ in got[len(kept) :]]
        # The destination the newest ring names comes last, when the chain decodes.
        assert names in (list(TRUSTHOP_HEADERS), [*TRUSTHOP_HEADERS, H_DESTINATION]), label
        verdict = dict(got[len(kept) :])
        assert verdict[H_REASON] == reason.value.encode(), (label, verdict[H_DETAIL])
        assert verdict[H_SOURCE] == kafka_destination(topic).encode()
        assert verdict[H_CONSUMER] == group.encode()
        assert verdict[H_ATTEMPTS] == b"1"
        assert verdict[H_DETAIL]
    # A reader taking the first trusthop-reason reads the consumer's verdict.
    forged_letter = by_key[b"forged-verdict"].headers
    assert next(v for k, v in forged_letter if k == H_REASON) == b"wrong_destination"
    assert [k for k, _ in forged_letter if k.lower().startswith("trusthop-")] == [
        *TRUSTHOP_HEADERS,
        H_DESTINATION,
    ]
    destinations = {key: dict(record.headers).get(H_DESTINATION) for key, record in by_key.items()}
    assert destinations[b"tampered"] == kafka_destination(topic).encode()
    assert destinations[b"wrong-destination"] == kafka_destination(elsewhere).encode()
    assert destinations[b"forged-verdict"] == kafka_destination(elsewhere).encode()
    for undecodable in (b"missing-chain", b"garbage-chain", b"not-a-cloudevent", b"non-utf8"):
        assert destinations[undecodable] is None, undecodable

    # Every offset of the topic is committed: handled and dead-lettered alike.
    committed = await committed_offsets(kafka_bootstrap, group, topic)
    assert only_partition_zero(committed) == len(cases)


def _kv(record: KafkaRecord) -> tuple[bytes, list[tuple[str, bytes | None]]]:
    return record.value, list(record.headers)


# --------------------------------------------------------------------------- #
# no record stops or stalls the consumer
# --------------------------------------------------------------------------- #


SURROGATE_DOC = b'{"specversion":"1.0","id":"\\ud800","source":"/x","type":"t","trustchain":"AAAA"}'
STRUCTURED_HEADERS: list[tuple[str, bytes | None]] = [
    ("content-type", b"application/cloudevents+json")
]


async def test_poison_records_are_dead_lettered_and_the_consumer_moves_on(
    kafka_bootstrap: str, unique_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic, group = f"{unique_name}-orders", f"{unique_name}-svc"
    edge = TrustedKafkaProducer(signer=ChainSigner(EDGE), producer=object())
    origin = origin_ring()
    bug_event = order_event("bug")
    bug_id = bug_event.get_id()
    bug = edge.seal(topic, bug_event, origin=origin, key="bug")
    valid = edge.seal(topic, order_event("valid"), origin=origin, key="valid")

    # A verification bug on one record (a perfectly valid one): whatever the
    # core raises besides TrustError must not stop or stall the consumer.
    trusted = consumer(kafka_bootstrap, topic, group=group)
    real_prepare = trusted.verifier.prepare  # what admission runs first

    def buggy_prepare(wire: WireEvent) -> Any:
        if wire.attributes.get("id") == bug_id:
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        return real_prepare(wire)

    monkeypatch.setattr(trusted.verifier, "prepare", buggy_prepare)

    cases: list[RawRecord] = [
        # A lone surrogate in structured mode (a TrustError or a decoder bug,
        # depending on the core: malformed either way).
        (b"surrogate", SURROGATE_DOC, STRUCTURED_HEADERS),
        (b"bug", bug.value, list(bug.headers)),
        (b"valid", valid.value, list(valid.headers)),
    ]
    await publish_raw(kafka_bootstrap, topic, cases)
    handled: list[bytes] = []

    async def handle(delivery: KafkaDelivery) -> None:
        handled.append(delivery.record.key)

    async with trusted:
        settled = await asyncio.wait_for(trusted.run(handle, limit=3), RECEIVE_TIMEOUT)
    assert settled == 3
    assert handled == [b"valid"]
    assert trusted.stats.dead_lettered == {Reason.MALFORMED: 2}

    dead = {r.key: r for r in await read_topic(kafka_bootstrap, f"{topic}.dlq", 2)}
    assert set(dead) == {b"surrogate", b"bug"}
    assert dead[b"surrogate"].value == SURROGATE_DOC
    assert header_map(dead[b"surrogate"].headers)[H_REASON] == b"malformed"
    bug_letter = header_map(dead[b"bug"].headers)
    assert bug_letter[H_REASON] == b"malformed"
    assert bug_letter[H_DETAIL] == b"undecodable record (UnicodeEncodeError)"
    assert dead[b"bug"].value == bug.value
    # Every offset committed: a restart does not meet the poison again.
    assert only_partition_zero(await committed_offsets(kafka_bootstrap, group, topic)) == 3


class _NotUtf8Name(str):
    """A header name aiokafka's pure-Python batch builder writes as non-UTF-8 bytes."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff\xfe-bad"


async def publish_undecodable(bootstrap: str, topic: str, value: bytes) -> None:
    """One record (partition 0) whose header name is not UTF-8, as a raw client can write."""
    from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

    async with raw_producer(bootstrap) as client:
        batch = client.create_batch()
        # magic 2, no compression, not transactional, no producer id/epoch/seq.
        batch._builder = _DefaultRecordBatchBuilderPy(2, 0, False, -1, -1, -1, 16384)
        headers: list[tuple[str, bytes | None]] = [(_NotUtf8Name("x"), b"1")]
        assert batch.append(timestamp=None, key=b"poison", value=value, headers=headers)
        await (await client.send_batch(batch, topic, partition=0))


async def test_a_header_name_that_is_not_utf8_is_dead_lettered_not_a_stall(
    kafka_bootstrap: str, unique_name: str
) -> None:
    # aiokafka's getmany raises UnicodeDecodeError on such a record, every
    # time: the shell must find it, dead-letter a stub and go on after it.
    topic, group = f"{unique_name}-orders", f"{unique_name}-svc"
    edge = TrustedKafkaProducer(signer=ChainSigner(EDGE), producer=object())
    origin = origin_ring()
    before = edge.seal(topic, order_event("before"), origin=origin, key="before")
    after = edge.seal(topic, order_event("after"), origin=origin, key="after")
    await publish_raw(kafka_bootstrap, topic, [(b"before", before.value, list(before.headers))])
    await publish_undecodable(kafka_bootstrap, topic, b"poison value")
    await publish_raw(kafka_bootstrap, topic, [(b"after", after.value, list(after.headers))])

    # The premise: plain aiokafka cannot read past it.
    plain = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await plain.start()
    try:
        with pytest.raises(UnicodeDecodeError):
            deadline = time.monotonic() + RECEIVE_TIMEOUT
            while time.monotonic() < deadline:
                await plain.getmany(timeout_ms=500)
    finally:
        await plain.stop()

    handled: list[bytes] = []

    async def handle(delivery: KafkaDelivery) -> None:
        handled.append(delivery.record.key)

    async with consumer(kafka_bootstrap, topic, group=group) as trusted:
        settled = await asyncio.wait_for(trusted.run(handle, limit=3), RECEIVE_TIMEOUT)
    assert settled == 3
    assert handled == [b"before", b"after"]
    assert trusted.stats.dead_lettered == {Reason.MALFORMED: 1}
    assert trusted.stats.dead_letter_stubs == 1

    [stub] = await read_topic(kafka_bootstrap, f"{topic}.dlq", 1)
    assert (stub.key, stub.value) == (None, None)
    assert [k for k, _ in stub.headers] == [*TRUSTHOP_HEADERS, H_ORIGINAL]
    verdict = header_map(stub.headers)
    assert verdict[H_REASON] == b"malformed"
    assert verdict[H_DETAIL] == UNDECODABLE_DETAIL.encode()
    assert verdict[H_SOURCE] == kafka_destination(topic).encode()
    assert verdict[H_CONSUMER] == group.encode()
    assert verdict[H_ORIGINAL] == f"{topic}/0/1".encode()
    # Every offset committed: a restart does not meet the poison again.
    assert only_partition_zero(await committed_offsets(kafka_bootstrap, group, topic)) == 3


async def test_a_dead_letter_over_the_request_size_is_written_as_a_stub(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topic, group = f"{unique_name}-orders", f"{unique_name}-svc"
    edge = TrustedKafkaProducer(signer=ChainSigner(EDGE), producer=object())
    valid = edge.seal(topic, order_event("valid"), origin=origin_ring(), key="valid")
    cases: list[RawRecord] = [
        # Over the dead-letter producer's 4 KiB limit, by value or by headers
        # (null key and value: written as a batch).
        (b"big", b"x" * 8000, [("x-h", b"1"), ("trusthop-reason", b"handler_failed")]),
        (None, None, [("x-pad", b"p" * 8000)]),
        # Under it: a full dead letter as usual.
        (b"small", b"not an event", [("x-h", b"2")]),
        (b"valid", valid.value, list(valid.headers)),
    ]
    await publish_raw(kafka_bootstrap, topic, cases)
    handled: list[bytes] = []

    async def handle(delivery: KafkaDelivery) -> None:
        handled.append(delivery.record.key)

    trusted = consumer(kafka_bootstrap, topic, group=group, dead_letter_max_request_size=4096)
    async with trusted:
        settled = await asyncio.wait_for(trusted.run(handle, limit=4), RECEIVE_TIMEOUT)
    assert settled == 4
    assert handled == [b"valid"]
    assert trusted.stats.dead_lettered == {Reason.MALFORMED: 3}
    assert trusted.stats.dead_letter_stubs == 2

    dead = await read_topic(kafka_bootstrap, f"{topic}.dlq", 3)
    [full] = [r for r in dead if r.key is not None]
    assert (full.key, full.value) == (b"small", b"not an event")
    assert full.headers[0] == ("x-h", b"2")
    stubs = sorted(
        (r for r in dead if r.key is None), key=lambda r: header_map(r.headers)[H_ORIGINAL]
    )
    assert len(stubs) == 2
    for offset, stub in enumerate(stubs):
        key, value, headers = cases[offset]
        assert stub.value is None
        assert [k for k, _ in stub.headers] == [*TRUSTHOP_HEADERS, H_ORIGINAL, H_ORIGINAL_BYTES]
        verdict = header_map(stub.headers)
        assert verdict[H_REASON] == b"malformed"
        assert verdict[H_SOURCE] == kafka_destination(topic).encode()
        assert verdict[H_CONSUMER] == group.encode()
        assert verdict[H_ORIGINAL] == f"{topic}/0/{offset}".encode()
        assert verdict[H_ORIGINAL_BYTES] == str(record_size(key, value, headers)).encode()
    assert only_partition_zero(await committed_offsets(kafka_bootstrap, group, topic)) == 4


async def test_a_rejected_record_over_one_mebibyte_is_dead_lettered_in_full(
    kafka_bootstrap: str, unique_name: str
) -> None:
    # aiokafka's producer refuses 1 MiB by default; the dead-letter producer
    # takes twice that, so a large reject is not cut down to a stub.
    topic, group = f"{unique_name}-orders", f"{unique_name}-svc"
    big = b"A" * 1_100_000
    edge = TrustedKafkaProducer(signer=ChainSigner(EDGE), producer=object())
    valid = edge.seal(topic, order_event("valid"), origin=origin_ring(), key="valid")
    client = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, acks="all", max_request_size=4_000_000
    )
    await client.start()
    try:
        await client.send_and_wait(topic, big, key=b"big", headers=[("ce_id", b"a")], partition=0)
        await client.send_and_wait(
            topic, valid.value, key=b"valid", headers=valid.headers, partition=0
        )
    finally:
        await client.stop()
    handled: list[bytes] = []

    async def handle(delivery: KafkaDelivery) -> None:
        handled.append(delivery.record.key)

    async with consumer(kafka_bootstrap, topic, group=group) as trusted:
        settled = await asyncio.wait_for(trusted.run(handle, limit=2), RECEIVE_TIMEOUT)
    assert settled == 2
    assert handled == [b"valid"]
    assert trusted.stats.dead_letter_stubs == 0
    [dead] = await read_topic(kafka_bootstrap, f"{topic}.dlq", 1)
    assert (dead.key, dead.value) == (b"big", big)
    assert header_map(dead.headers)[H_REASON] == b"malformed"
    assert only_partition_zero(await committed_offsets(kafka_bootstrap, group, topic)) == 2


# --------------------------------------------------------------------------- #
# offsets: committed only after the loop body finished
# --------------------------------------------------------------------------- #


class Boom(Exception):
    pass


async def test_async_for_commits_only_after_the_body_finished(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topic, group = f"{unique_name}-orders", f"{unique_name}-svc"
    origin = origin_ring()
    async with producer(kafka_bootstrap) as edge:
        first = await edge.send_and_wait(topic, order_event("first"), origin=origin, partition=0)
        second = await edge.send_and_wait(topic, order_event("second"), origin=origin, partition=0)
    tp = TopicPartition(topic, 0)

    # A body that raises: nothing is committed, even though 'async with' exits.
    with pytest.raises(Boom):
        async with consumer(kafka_bootstrap, topic, group=group) as c1:
            async for delivery in c1:
                assert delivery.offset == first.offset
                raise Boom
    assert c1.stats.delivered == 1 and c1.stats.handled == 0

    # A new member of the same group gets the same record again.
    offsets: list[int] = []
    async with consumer(kafka_bootstrap, topic, group=group) as c2:
        with pytest.raises(Boom):
            async for delivery in c2:
                offsets.append(delivery.offset)
                raise Boom
        assert await c2.client.committed(tp) is None
        # Looping again on the same consumer: the unfinished delivery comes back.
        async for delivery in c2:
            offsets.append(delivery.offset)
            if delivery.offset == second.offset:
                # Asking for this one committed the previous, finished body.
                assert await c2.client.committed(tp) == first.offset + 1
                await c2.commit()
                break
        assert await c2.client.committed(tp) == second.offset + 1
        assert c2.stats.handled == 2
    assert offsets == [first.offset, first.offset, second.offset]
    assert only_partition_zero(await committed_offsets(kafka_bootstrap, group, topic)) == (
        second.offset + 1
    )


async def test_break_without_commit_redelivers_the_last_record(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topic, group = f"{unique_name}-orders", f"{unique_name}-svc"
    async with producer(kafka_bootstrap) as edge:
        sent = [
            await edge.send_and_wait(topic, order_event(f"e{i}"), origin=origin_ring(), partition=0)
            for i in range(3)
        ]
    async with consumer(kafka_bootstrap, topic, group=group) as c:
        seen = []
        async for delivery in c:
            seen.append(delivery.offset)
            if len(seen) == 2:
                break
        # Only the first body is known to have finished.
        assert await c.client.committed(TopicPartition(topic, 0)) == sent[0].offset + 1
        async for delivery in c:
            seen.append(delivery.offset)
            if delivery.offset == sent[2].offset:
                break
    assert seen == [sent[0].offset, sent[1].offset, sent[1].offset, sent[2].offset]


# --------------------------------------------------------------------------- #
# handler retries and handler_failed
# --------------------------------------------------------------------------- #


async def test_run_retries_the_handler_then_dead_letters_handler_failed(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topic, group = f"{unique_name}-orders", f"{unique_name}-svc"
    async with producer(kafka_bootstrap, structured=True) as edge:
        for label in ("ok", "flaky", "poison"):
            await edge.send_and_wait(
                topic, order_event(label), origin=origin_ring(), key=label, partition=0
            )

    attempts: dict[str, list[int]] = {}
    done: list[str] = []
    # In-process retries (retry topics: integration/test_kafka_replay.py).
    trusted = consumer(
        kafka_bootstrap, topic, group=group, max_attempts=3, retry_delay=0.01, retry_topics=False
    )

    @trusted.handler
    async def handle(delivery: KafkaDelivery) -> None:
        label = delivery.event.get_subject()
        assert label is not None
        attempts.setdefault(label, []).append(delivery.attempt)
        if label == "poison" or (label == "flaky" and delivery.attempt < 3):
            raise RuntimeError(f"cannot process {label}")
        done.append(label)

    async with trusted:
        assert await asyncio.wait_for(trusted.run(limit=3), RECEIVE_TIMEOUT) == 3
        committed = await trusted.client.committed(TopicPartition(topic, 0))

    assert attempts == {"ok": [1], "flaky": [1, 2, 3], "poison": [1, 2, 3]}
    assert done == ["ok", "flaky"]
    assert trusted.stats.handled == 2
    assert trusted.stats.retried == 4
    assert trusted.stats.dead_lettered == {Reason.HANDLER_FAILED: 1}
    assert committed == 3

    [dead] = await read_topic(kafka_bootstrap, f"{topic}.dlq", 1)
    verdict = header_map(dead.headers)
    assert dead.key == b"poison"
    assert verdict[H_REASON] == b"handler_failed"
    assert verdict[H_ATTEMPTS] == b"3"
    assert verdict[H_DETAIL] == b"RuntimeError: cannot process poison"
    assert verdict["content-type"] == b"application/cloudevents+json"
    # The dead letter still verifies as the record it was on its source topic.
    trusted_again = verify_record(
        verifier(),
        topic=topic,
        headers=[h for h in dead.headers if not h[0].startswith("trusthop-")],
        value=dead.value,
    )
    assert trusted_again.event.get_subject() == "poison"


# --------------------------------------------------------------------------- #
# producer-side refusals: nothing reaches the broker
# --------------------------------------------------------------------------- #


async def test_producer_size_budget_counts_headers(kafka_bootstrap: str, unique_name: str) -> None:
    topic = f"{unique_name}-orders"
    async with producer(kafka_bootstrap, max_message_bytes=4096) as edge:
        # Small value, big header: aiokafka's max_request_size would not object.
        big_header = order_event("big-header", note="x" * 5000)
        with pytest.raises(TrustError) as info:
            await edge.send_and_wait(topic, big_header, origin=origin_ring())
        assert info.value.reason is Reason.TOO_LARGE
        big_value = CloudEvent(
            {
                "id": "big",
                "source": "/shop",
                "type": "t",
                "specversion": "1.0",
                "datacontenttype": "application/octet-stream",
            },
            b"\x00" * 5000,
        )
        with pytest.raises(TrustError) as info:
            await edge.send(topic, big_value, origin=origin_ring())
        assert info.value.reason is Reason.TOO_LARGE
        # A record under the budget goes through, and it is the topic's first.
        small = await edge.send_and_wait(
            topic, order_event("small"), origin=origin_ring(), partition=0
        )
    assert small.offset == 0
    [record] = await read_topic(kafka_bootstrap, topic, 1)
    assert (
        record.value
        == json.dumps(
            {"order": "small", "total": "9.99"}, sort_keys=True, separators=(",", ":")
        ).encode()
    )


async def test_producer_refuses_scope_escalation_at_send_time(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topic, upstream = f"{unique_name}-payments", f"{unique_name}-orders"
    edge = TrustedKafkaProducer(signer=ChainSigner(EDGE), producer=object())
    first = edge.seal(upstream, order_event("parent"), origin=origin_ring(), scope={"orders:read"})
    parent = verify_record(
        verifier(), topic=upstream, headers=first.headers, value=first.value
    ).context

    async with producer(kafka_bootstrap, ORDERS) as orders:
        with pytest.raises(TrustError) as info:
            await orders.send_and_wait(
                topic, order_event("derived"), parent=parent, scope={"orders:read", "admin"}
            )
        assert info.value.reason is Reason.SCOPE_ESCALATION
        with pytest.raises(ValueError, match="exactly one"):
            await orders.send_and_wait(topic, order_event("derived"))
        ok = await orders.send_and_wait(topic, order_event("derived"), parent=parent, partition=0)
    assert ok.offset == 0  # the refused sends never reached the broker
    [record] = await read_topic(kafka_bootstrap, topic, 1)
    context = verify_record(
        verifier(), topic=topic, headers=record.headers, value=record.value
    ).context
    assert context.scope == {"orders:read"}
    assert context.actors == (EDGE.actor, EDGE.actor, ORDERS.actor)


async def test_stop_from_another_task_ends_run_and_iteration(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topic, group = f"{unique_name}-orders", f"{unique_name}-svc"
    async with producer(kafka_bootstrap) as edge:
        await edge.send_and_wait(topic, order_event("only"), origin=origin_ring(), partition=0)
    seen: list[int] = []
    first_handled = asyncio.Event()
    trusted = consumer(kafka_bootstrap, topic, group=group)
    await trusted.start()

    async def handle(delivery: KafkaDelivery) -> None:
        seen.append(delivery.offset)
        first_handled.set()

    runner = asyncio.create_task(trusted.run(handle))
    await asyncio.wait_for(first_handled.wait(), RECEIVE_TIMEOUT)
    await asyncio.sleep(0.3)  # run() is polling for more when stop() arrives
    await asyncio.wait_for(trusted.stop(), 10)
    assert await asyncio.wait_for(runner, 10) == 1
    assert seen == [0]
    assert [d async for d in trusted] == []  # a stopped consumer yields nothing
    assert only_partition_zero(await committed_offsets(kafka_bootstrap, group, topic)) == 1
