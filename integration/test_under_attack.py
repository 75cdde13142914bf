"""Consumers under attack: a mixed stream of valid and hostile messages on real brokers.

For Kafka and for RabbitMQ, 20 valid messages and 30 or more hostile ones are
published interleaved, with plain aiokafka / aio-pika clients, as anyone
with write access to the broker could (forged headers, truncated and
tampered chains, tampered data, replays, wrong destinations, oversized
chains, non-UTF-8 header values and names, repeated ``trustchain`` headers,
forged ``trusthop-*`` verdict and retry headers). The trusted consumer then
runs over the stream. The assertions:

* every valid message is handled exactly once;
* every hostile message is in the dead-letter queue with its expected
  reason (compared as a multiset of (label, reason));
* the counts balance: published == handled + dead-lettered;
* the consumer is still running at the end: it handles one more valid
  message published afterwards.

Kafka: records go to every partition of the topic (no order across
partitions is assumed); a replayed copy goes to the partition of its
original, after it. RabbitMQ: one queue, ``prefetch_count=1``, so a copy is
judged after its original.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from cloudevents.core.v1.event import CloudEvent
from pamqp.commands import Basic

from trusthop.amqp import Delivery, TrustedWorker, dead_letter_queue_name, retry_queue_name
from trusthop.bindings import encode_amqp, encode_kafka
from trusthop.bundle import BundleKey, TrustBundle
from trusthop.canonical import b64url_encode
from trusthop.chain import HopRing, OriginRing, decode_chain
from trusthop.errors import Reason
from trusthop.event import WireEvent
from trusthop.kafka import UNDECODABLE_DETAIL, KafkaDelivery, TrustedKafkaConsumer
from trusthop.keys import SigningKey
from trusthop.pipeline import H_DETAIL, H_REASON, H_SOURCE, ChainSigner, ChainVerifier
from trusthop.sign import Identity, mint_origin

R = Reason
DOMAIN = "prod.example.com"
EDGE = Identity.create(f"spiffe://{DOMAIN}/ns/edge/sa/gateway", SigningKey.from_seed(b"\x31" * 32))
ORDERS = Identity.create(f"spiffe://{DOMAIN}/ns/shop/sa/orders", SigningKey.from_seed(b"\x32" * 32))
ROGUE = Identity.create(ORDERS.actor, SigningKey.from_seed(b"\x33" * 32))  # in no bundle
FIRED = Identity.create(f"spiffe://{DOMAIN}/ns/shop/sa/fired", SigningKey.from_seed(b"\x34" * 32))
BUNDLE = TrustBundle.of(
    [
        EDGE.bundle_key,
        ORDERS.bundle_key,
        BundleKey(FIRED.kid, FIRED.actor, FIRED.key.public_key, revoked=True),
    ]
)
SCOPE = frozenset({"orders:read", "orders:write", "payments:charge"})
VALID = 20
WAIT = 60.0


def verifier() -> ChainVerifier:
    return ChainVerifier(BUNDLE, origin_actors=[EDGE.actor])


def origin(*, at: float | None = None, by: Identity = EDGE, ttl: int = 3600) -> OriginRing:
    return mint_origin(
        by,
        subject="user:alice",
        issuer="https://idp.example.com",
        credential="alice-token",
        scope=SCOPE,
        now=time.time() if at is None else at,
        ttl=ttl,
    )


def event(label: str, **extra: Any) -> CloudEvent:
    return CloudEvent(
        {
            "id": f"{label}-{uuid.uuid4().hex[:8]}",
            "source": "/shop/orders",
            "type": "com.example.order.placed",
            "specversion": "1.0",
            "datacontenttype": "application/json",
            "subject": label,
            **extra,
        },
        {"order": label, "total": "9.99"},
    )


def seal(label: str, destination: str, *, signer: Identity = EDGE, **kwargs: Any) -> WireEvent:
    at = kwargs.pop("at", None)
    clock = (lambda: at) if at is not None else time.time
    root = kwargs.pop("origin", None) or origin(at=at)
    return ChainSigner(signer, clock=clock).seal(
        event(label), destination=destination, origin=root, **kwargs
    )


def hand_built_hop(base: WireEvent, destination: str, **changes: Any) -> WireEvent:
    """``base``'s event re-sealed with a hop ring ORDERS signs as given (no producer checks)."""
    assert base.chain is not None
    chain = decode_chain(base.chain, max_bytes=1 << 20, max_rings=32)
    newest = chain.newest
    hop = HopRing(
        actor=ORDERS.actor,
        key_tag=ORDERS.key_tag,
        iat=newest.iat,
        exp=newest.exp,
        scope=newest.scope,
        event_digest=base.digest(),
        destination=destination,
    )
    hop = dataclasses.replace(hop, **changes)
    # v2: a hop signs the previous ring's hash and its own body.
    hop = dataclasses.replace(hop, signature=ORDERS.key.sign(chain.next_signing_input(hop)))
    return dataclasses.replace(base, chain=chain.appended(hop).encode())


def wire_attacks(dest: str, elsewhere: str) -> list[tuple[str, Reason, WireEvent]]:
    """Transport-independent forgeries, each as the wire event a consumer of ``dest`` gets."""
    now = time.time()
    good = seal("good", dest)
    assert good.chain is not None
    tampered = dataclasses.replace(good, data=(good.data or b"").replace(b"9.99", b"0.01"))
    retyped = dataclasses.replace(good, attributes={**good.attributes, "type": "refund"})
    # A two-hop chain (edge to elsewhere, then orders to dest) with the middle ring removed.
    parent = seal("parent", elsewhere)
    derived = hand_built_hop(parent, dest)
    assert derived.chain is not None and parent.chain is not None
    full = decode_chain(derived.chain, max_bytes=1 << 20, max_rings=32)
    # Removed on the wire: Chain(...) would re-encode the kept ring after the origin.
    kept = (full.ring_bytes[0], full.ring_bytes[2])
    broken = dataclasses.replace(derived, chain="2." + ".".join(b64url_encode(r) for r in kept))
    narrow = ChainSigner(EDGE).seal(
        event("narrow"), destination=elsewhere, origin=origin(), scope={"orders:read"}
    )
    widened = hand_built_hop(narrow, dest, scope=frozenset({"orders:read", "orders:write"}))
    parent_exp = decode_chain(parent.chain, max_bytes=1 << 20, max_rings=32).newest.exp
    longer = hand_built_hop(parent, dest, exp=parent_exp + 60)
    return [
        ("tampered-data", R.EVENT_MISMATCH, tampered),
        ("tampered-type", R.EVENT_MISMATCH, retyped),
        ("truncated-chain", R.MALFORMED, dataclasses.replace(good, chain=good.chain[:-40])),
        ("unknown-key", R.UNKNOWN_KEY, seal("rogue", dest, signer=ROGUE)),
        ("revoked-key", R.REVOKED, seal("fired", dest, signer=FIRED)),
        ("signed-elsewhere", R.WRONG_DESTINATION, seal("elsewhere", elsewhere)),
        ("broken-link", R.BROKEN_LINK, broken),
        ("scope-escalation", R.SCOPE_ESCALATION, widened),
        ("window-escalation", R.WINDOW_ESCALATION, longer),
        ("expired", R.EXPIRED, seal("old", dest, at=now - 7200)),
        ("not-yet-valid", R.NOT_YET_VALID, seal("future", dest, at=now + 3600)),
        (
            "origin-by-a-workload",
            R.UNAUTHORIZED_ACTOR,
            seal("self-minted", dest, signer=ORDERS, origin=origin(by=ORDERS)),
        ),
        ("chain-over-budget", R.TOO_LARGE, dataclasses.replace(good, chain="A" * 20_000)),
        (
            "chain-over-depth",
            R.DEPTH_EXCEEDED,
            dataclasses.replace(good, chain=good.chain + ".AAAA" * 40),  # 42 rings by their dots
        ),
        ("no-chain", R.MISSING_CHAIN, dataclasses.replace(good, chain=None)),
    ]


def on_verified_prefixes(
    first: WireEvent, second: WireEvent, dest: str
) -> list[tuple[str, Reason, WireEvent]]:
    """Forgeries that share a prefix with valid messages of the stream (the
    consumer's verified-prefix cache holds it once they are verified; placed
    after them): the verdict must be the one a cold verifier gives."""
    assert first.chain is not None and second.chain is not None
    chain = decode_chain(first.chain, max_bytes=1 << 20, max_rings=32)
    newest = chain.newest
    forged = HopRing(
        actor=ORDERS.actor,
        key_tag=ORDERS.key_tag,
        iat=newest.iat,
        exp=newest.exp,
        scope=newest.scope,
        event_digest=first.digest(),
        destination=dest,
        signature=bytes(64),
    )
    extended = dataclasses.replace(first, chain=chain.appended(forged).encode())
    origin = first.chain.split(".")[1]
    hop = second.chain.split(".")[2]
    spliced = dataclasses.replace(second, chain=f"2.{origin}.{hop}")
    return [
        ("forged-ring-after-a-verified-chain", R.BAD_SIGNATURE, extended),
        ("hop-of-another-chain-after-a-verified-origin", R.BROKEN_LINK, spliced),
    ]


def interleave(valid: list[Any], hostile: list[Any], seed: int) -> list[Any]:
    """Both lists merged in a fixed pseudo-random order, each keeping its own order."""
    rng = random.Random(seed)
    out, v, h = [], list(valid), list(hostile)
    while v or h:
        take_valid = bool(v) and (not h or rng.random() < len(v) / (len(v) + len(h)))
        out.append((v if take_valid else h).pop(0))
    return out


# --------------------------------------------------------------------------- #
# Kafka
# --------------------------------------------------------------------------- #

KafkaHeaders = list[tuple[str, bytes | None]]


@dataclass
class Record:
    label: str
    expect: Reason | None  # None: valid, must be handled
    key: bytes | None
    value: bytes | None
    headers: KafkaHeaders
    slot: int  # partition = slot % partitions (a copy shares its original's)
    undecodable: bool = False  # a header name aiokafka cannot decode


class _NotUtf8Name(str):
    """A header name aiokafka's pure-Python batch builder writes as non-UTF-8 bytes."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff\xfe-name"


def _kafka(wire: WireEvent, *, structured: bool = False) -> tuple[KafkaHeaders, bytes | None]:
    headers, value = encode_kafka(wire, structured=structured)
    return list(headers), value


def kafka_stream(topic: str) -> tuple[list[Record], Record]:
    dest, elsewhere = f"kafka:{topic}", f"kafka:{topic}-elsewhere"
    valid: list[Record] = []
    wires: list[WireEvent] = []
    for n in range(VALID):
        label = f"valid-{n:02d}"
        wires.append(seal(label, dest))
        headers, value = _kafka(wires[-1], structured=n % 4 == 3)
        if n == 5:  # foreign headers of every odd shape are ignored, never signed
            headers = [("x-null", None), *headers, ("x-bin", b"\xff\x00"), ("x-bin", b"2")]
        valid.append(Record(label, None, label.encode(), value, headers, n))
    hostile: list[Record] = []

    def add(
        label: str, reason: Reason, headers: KafkaHeaders, value: bytes | None, **kw: Any
    ) -> None:
        hostile.append(
            Record(
                label,
                reason,
                kw.pop("key", label.encode()),
                value,
                headers,
                kw.pop("slot", 100 + len(hostile)),
                **kw,
            )
        )

    for label, reason, wire in wire_attacks(dest, elsewhere):
        add(label, reason, *_kafka(wire, structured=label == "tampered-type"))
    base_headers, base_value = _kafka(seal("base", dest))
    chain = dict(base_headers)["ce_trustchain"]

    def edited(name: str, value: bytes | None) -> KafkaHeaders:
        return [(k, value if k == name else v) for k, v in base_headers]

    add("non-utf8-value", R.MALFORMED, edited("ce_subject", b"\xff\xfe\x80"), base_value)
    add("none-value", R.MALFORMED, edited("ce_id", None), base_value)
    add("two-trustchains", R.MALFORMED, [*base_headers, ("ce_trustchain", chain)], base_value)
    add(
        "mixed-case-name",
        R.MALFORMED,
        [("CE_trustchain" if k == "ce_trustchain" else k, v) for k, v in base_headers],
        base_value,
    )
    s_headers, s_value = _kafka(seal("structured", dest), structured=True)
    add("structured-with-ce-headers", R.MALFORMED, [*s_headers, ("ce_id", b"x")], s_value)
    add("control-characters", R.MALFORMED, edited("ce_subject", b"line\nbreak\x1b[2J"), base_value)
    other_chain = dict(_kafka(seal("other", dest))[0])["ce_trustchain"]
    add(
        "chain-of-another-event", R.EVENT_MISMATCH, edited("ce_trustchain", other_chain), base_value
    )
    add(
        "two-content-types",
        R.MALFORMED,
        [*base_headers, ("content-type", b"text/plain")],
        base_value,
    )
    add("structured-truncated", R.MALFORMED, s_headers, (s_value or b"")[:-20])
    add("garbage", R.MALFORMED, [("x-trace", None)], b"hello, world")
    add("null-record", R.MALFORMED, [], None, key=None)
    add(
        "header-name-not-utf8",
        R.MALFORMED,
        [(_NotUtf8Name("x"), b"1")],
        b"poison",
        key=None,
        undecodable=True,
    )
    f_headers, f_value = _kafka(seal("forged-verdict", elsewhere))
    add(
        "forged-verdict",
        R.WRONG_DESTINATION,
        [
            ("trusthop-reason", b"handler_failed"),
            ("TrustHop-Detail", b"forged"),
            *f_headers,
            ("trusthop-attempts", b"99"),
        ],
        f_value,
    )
    # Replays: exact copies of valid records, and copies with forged retry headers.
    replays: list[Record] = []
    for n, extra in (
        (2, []),
        (9, [("trusthop-retry", b"2"), ("trusthop-not-before", b"9" * 13)]),
        (14, [("trusthop-reason", b"spoofed")]),
    ):
        original = valid[n]
        replays.append(
            dataclasses.replace(
                original,
                label=f"replay-of-{original.label}",
                expect=R.REPLAYED,
                headers=[*original.headers, *extra],
            )
        )
    # Forgeries on prefixes the consumer verified: same partition, after the original.
    for label, reason, wire in on_verified_prefixes(wires[4], wires[6], dest):
        headers, value = _kafka(wire)
        slot = 4 if label.startswith("forged") else 6
        replays.append(Record(label, reason, label.encode(), value, headers, slot))
    stream = interleave(valid, hostile, seed=7)
    for copy in replays:  # somewhere after its original (the valid record of its slot)
        start = next(i for i, r in enumerate(stream) if r.key == valid[copy.slot].key) + 1
        stream.insert(random.Random(copy.label).randint(start, len(stream)), copy)
    last_headers, last_value = _kafka(seal("valid-last", dest))
    last = Record("valid-last", None, b"valid-last", last_value, last_headers, 0)
    return stream, last


@contextlib.asynccontextmanager
async def raw_producer(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    client = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await client.start()
    try:
        yield client
    finally:
        await client.stop()


async def publish(bootstrap: str, topic: str, records: Sequence[Record]) -> int:
    """Publish in order; returns the topic's partition count."""
    async with raw_producer(bootstrap) as client:
        partitions = sorted(await client.partitions_for(topic))
        for record in records:
            partition = partitions[record.slot % len(partitions)]
            if record.undecodable or (record.key is None and record.value is None):
                batch = client.create_batch()
                if record.undecodable:
                    # magic 2, no compression, not transactional, no producer id/epoch/seq
                    batch._builder = _DefaultRecordBatchBuilderPy(2, 0, False, -1, -1, -1, 16384)
                assert batch.append(
                    timestamp=None, key=record.key, value=record.value, headers=record.headers
                )
                await (await client.send_batch(batch, topic, partition=partition))
            else:
                await client.send_and_wait(
                    topic,
                    value=record.value,
                    key=record.key,
                    headers=record.headers,
                    partition=partition,
                )
    return len(partitions)


async def read_all(bootstrap: str, topic: str, count: int) -> list[Any]:
    client = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await client.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + WAIT
        while len(records) < count and time.monotonic() < deadline:
            for batch in (await client.getmany(timeout_ms=500)).values():
                records.extend(batch)
        for batch in (await client.getmany(timeout_ms=1000)).values():
            records.extend(batch)  # nothing more than expected
    finally:
        await client.stop()
    return records


async def committed_total(bootstrap: str, group: str, topic: str) -> int:
    client = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await client.start()
    try:
        await client.topics()
        from aiokafka import TopicPartition

        partitions = client.partitions_for_topic(topic) or set()
        offsets = [await client.committed(TopicPartition(topic, p)) for p in partitions]
        return sum(offset or 0 for offset in offsets)
    finally:
        await client.stop()


async def test_kafka_consumer_under_attack(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, int], unique_name: str
) -> None:
    topic, group = f"{unique_name}-orders", f"{unique_name}-svc"
    stream, last = kafka_stream(topic)
    hostile = [r for r in stream if r.expect is not None]
    assert len(hostile) >= 30 and sum(r.expect is None for r in stream) == VALID
    partitions = await publish(kafka_bootstrap, topic, stream)

    handled: list[bytes | None] = []

    async def handle(delivery: KafkaDelivery) -> None:
        handled.append(delivery.record.key)

    consumer = TrustedKafkaConsumer(
        topic,
        verifier=verifier(),
        group_id=group,
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        **kafka_consumer_options,
    )
    started = time.monotonic()
    async with consumer:
        settled = await asyncio.wait_for(consumer.run(handle, limit=len(stream)), WAIT)
        elapsed = time.monotonic() - started
        stats = consumer.stats
        # Every valid record handled exactly once; the counts balance.
        assert settled == len(stream)
        assert Counter(handled) == Counter(r.key for r in stream if r.expect is None)
        assert stats.handled == VALID
        assert stats.dead_lettered == Counter(r.expect for r in hostile)
        assert stats.handled + stats.dead_lettered_total == len(stream)
        # Still running: one more valid record, published now, is handled.
        await publish(kafka_bootstrap, topic, [last])
        assert await asyncio.wait_for(consumer.run(handle, limit=1), WAIT) == 1
        assert handled[-1] == b"valid-last"
    print(f"kafka: {len(stream)} records over {partitions} partitions in {elapsed:.1f} s")

    # Every hostile record is in the dead-letter topic with its reason, and
    # only the consumer's verdict (forged trusthop-* headers are dropped).
    dead = await read_all(kafka_bootstrap, f"{topic}.dlq", len(hostile))
    got = Counter((r.key, dict(r.headers)[H_REASON].decode()) for r in dead)
    assert got == Counter((r.key, r.expect.value) for r in hostile if r.expect is not None)
    for record in dead:
        names = [k.lower() for k, _ in record.headers]
        assert names.count(H_REASON) == 1 and names.count(H_DETAIL) == 1
        assert dict(record.headers)[H_SOURCE] == f"kafka:{topic}".encode()
    stub = [r for r in dead if dict(r.headers)[H_DETAIL] == UNDECODABLE_DETAIL.encode()]
    assert len(stub) == 1
    assert await committed_total(kafka_bootstrap, group, topic) == len(stream) + 1


# --------------------------------------------------------------------------- #
# RabbitMQ
# --------------------------------------------------------------------------- #

CASE = "th-case"  # bookkeeping header: not a CloudEvents header, never signed
ROUTING_KEY = "order.reserved"


class _Encoded(str):
    """A text aio-pika sends as exactly ``raw`` (pamqp encodes every name and
    string through ``str.encode``): how a raw AMQP client writes bytes that
    are not UTF-8, or one header name twice."""

    raw: bytes

    def __new__(cls, text: str, raw: bytes) -> _Encoded:
        value = super().__new__(cls, text)
        value.raw = raw
        return value

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


@dataclass
class Message:
    label: str | None  # None: the label header cannot survive (undecodable properties)
    expect: Reason | None
    body: bytes
    headers: dict[Any, Any]
    content_type: Any = None
    routing_key: str = ROUTING_KEY
    default_exchange: bool = False  # published straight to the queue


def _amqp(
    wire: WireEvent, label: str, expect: Reason | None, *, structured: bool = False, **kw: Any
) -> Message:
    headers, body, content_type = encode_amqp(wire, structured=structured)
    return Message(label, expect, body, {**headers, CASE: label}, content_type, **kw)


def amqp_stream(exchange: str, queue: str) -> tuple[list[Message], Message]:
    dest = f"amqp:{exchange}/{ROUTING_KEY}"
    elsewhere = f"amqp:{exchange}/order.cancelled"
    wires = [seal(f"valid-{n:02d}", dest) for n in range(VALID)]
    valid = [
        _amqp(wire, f"valid-{n:02d}", None, structured=n % 4 == 3) for n, wire in enumerate(wires)
    ]
    hostile = [
        _amqp(wire, label, reason, structured=label == "tampered-type")
        for label, reason, wire in wire_attacks(dest, elsewhere)
    ]
    base = _amqp(seal("base", dest), "base", None)
    chain = base.headers["cloudEvents_trustchain"]

    def variant(label: str, expect: Reason, **changes: Any) -> Message:
        headers = {**base.headers, CASE: label, **changes.pop("headers", {})}
        return dataclasses.replace(base, label=label, expect=expect, headers=headers, **changes)

    hostile += [
        variant("two-trustchain-prefixes", R.MALFORMED, headers={"cloudEvents:trustchain": chain}),
        variant(
            "trustchain-named-twice-on-the-wire",
            R.MALFORMED,
            headers={_Encoded("zz-a", b"cloudEvents_trustchain"): chain},
        ),
        variant(
            "header-value-not-utf8",
            R.MALFORMED,
            headers={"cloudEvents_subject": _Encoded("x", b"\xff\xfe")},
        ),
        variant(
            "header-value-byte-array",
            R.MALFORMED,
            headers={"cloudEvents_subject": bytearray(b"\xff")},
        ),
        variant("header-value-none", R.MALFORMED, headers={"cloudEvents_subject": None}),
        variant("mixed-case-prefix", R.MALFORMED, headers={"CloudEvents_subject": "x"}),
        variant("control-characters", R.MALFORMED, headers={"cloudEvents_subject": "a\r\nb"}),
        variant("cc-header", R.WRONG_DESTINATION, headers={"CC": ["order.cancelled"]}),
        variant("another-routing-key", R.WRONG_DESTINATION, routing_key="order.cancelled"),
        variant(
            "routing-key-with-a-line-break",
            R.WRONG_DESTINATION,
            routing_key="order.reserved\n2026-01-01 INFO forged",
        ),
        variant("straight-to-the-queue", R.WRONG_DESTINATION, default_exchange=True),
        variant(
            "forged-verdict",
            R.WRONG_DESTINATION,
            routing_key="order.cancelled",
            headers={"trusthop-reason": "handler_failed", "TrustHop-Detail": "forged"},
        ),
        Message("garbage", R.MALFORMED, b"hello, world", {CASE: "garbage", "x-trace": None}),
        # Properties pamqp cannot decode: without trusthop's frame guard, each
        # of these closes the worker's connection on every delivery.
        dataclasses.replace(
            base,
            label=None,
            expect=R.MALFORMED,
            headers={**base.headers, _Encoded("x", b"x-\xff\xfe"): "v"},
        ),
        dataclasses.replace(
            base,
            label=None,
            expect=R.MALFORMED,
            content_type=_Encoded("application/json", b"application/\xffjson"),
        ),
    ]
    structured = _amqp(
        seal("structured", dest), "structured-with-headers", R.MALFORMED, structured=True
    )
    structured.headers["cloudEvents_id"] = "x"
    hostile.append(structured)
    stream = interleave(valid, hostile, seed=11)
    for n, extra in ((2, {}), (9, {"trusthop-retry": "2", "trusthop-attempts": "1"})):
        original = valid[n]
        copy = dataclasses.replace(
            original,
            label=f"replay-of-{original.label}",
            expect=R.REPLAYED,
            headers={**original.headers, CASE: f"replay-of-{original.label}", **extra},
            # a forged retry claim only counts through the default exchange
            default_exchange=bool(extra),
        )
        start = stream.index(original) + 1
        stream.insert(random.Random(n).randint(start, len(stream)), copy)
    # Forgeries on prefixes the worker verified (one queue: judged after them).
    for n, (label, reason, wire) in zip(
        (4, 6), on_verified_prefixes(wires[4], wires[6], dest), strict=True
    ):
        start = stream.index(valid[n]) + 1
        stream.insert(random.Random(label).randint(start, len(stream)), _amqp(wire, label, reason))
    return stream, _amqp(seal("valid-last", dest), "valid-last", None)


@contextlib.asynccontextmanager
async def topology(url: str, prefix: str) -> AsyncIterator[tuple[Any, str, str, str]]:
    exchange, queue, dlx = f"{prefix}-shipping", f"{prefix}-q", f"{prefix}-dlx"
    connection = await aio_pika.connect_robust(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC)
        yield connection, exchange, queue, dlx
    finally:
        cleanup = await aio_pika.connect(url)
        try:
            for name in (queue, dead_letter_queue_name(queue), retry_queue_name(queue)):
                channel = await cleanup.channel()
                with contextlib.suppress(Exception):
                    await channel.queue_delete(name)
            for name in (exchange, dlx):
                channel = await cleanup.channel()
                with contextlib.suppress(Exception):
                    await channel.exchange_delete(name)
        finally:
            await cleanup.close()
            await connection.close()


async def publish_amqp(url: str, exchange: str, queue: str, messages: Sequence[Message]) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        topic = await channel.get_exchange(exchange)
        for message in messages:
            target = channel.default_exchange if message.default_exchange else topic
            routing_key = queue if message.default_exchange else message.routing_key
            result = await target.publish(
                aio_pika.Message(
                    message.body, headers=message.headers, content_type=message.content_type
                ),
                routing_key=routing_key,
                mandatory=True,
            )
            assert isinstance(result, Basic.Ack), f"{message.label} was not routed"
    finally:
        await connection.close()


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def drain(connection: Any, queue: str, count: int) -> list[AbstractIncomingMessage]:
    channel = await connection.channel()
    declared = await channel.declare_queue(queue, passive=True)
    out: list[AbstractIncomingMessage] = []
    deadline = time.monotonic() + WAIT
    while len(out) < count and time.monotonic() < deadline:
        message = await declared.get(fail=False, timeout=5)
        if message is None:
            await asyncio.sleep(0.1)
            continue
        await message.ack()
        out.append(message)
    assert await declared.get(fail=False, timeout=1) is None  # nothing more than expected
    await channel.close()
    return out


def _text(value: Any) -> str | None:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode()
    return value if isinstance(value, str) else None


async def test_rabbitmq_worker_under_attack(amqp_url: str, unique_name: str) -> None:
    async with topology(amqp_url, unique_name) as (connection, exchange, queue, dlx):
        stream, last = amqp_stream(exchange, queue)
        hostile = [m for m in stream if m.expect is not None]
        assert len(hostile) >= 30 and sum(m.expect is None for m in stream) == VALID
        channel = await connection.channel(publisher_confirms=True)
        worker = TrustedWorker(
            channel,
            verifier=verifier(),
            dead_letter_exchange=dlx,
            prefetch_count=1,
            retry_delay=0.2,
        )
        handled: list[str | None] = []

        @worker.handler(queue, bind=[(exchange, "order.#")])
        async def handle(delivery: Delivery) -> None:
            handled.append(_text((delivery.message.headers or {}).get(CASE)))

        started = time.monotonic()
        async with worker:
            await publish_amqp(amqp_url, exchange, queue, stream)
            stats = worker.stats
            await eventually(
                lambda: stats.delivered + stats.total_dead_lettered == len(stream),
                "every message settled",
            )
            elapsed = time.monotonic() - started
            assert Counter(handled) == Counter(m.label for m in stream if m.expect is None)
            assert stats.delivered == VALID
            assert stats.dead_lettered == Counter(m.expect for m in hostile)
            assert (stats.requeued, stats.abandoned) == (0, 0)
            # Still running: one more valid message is handled.
            await publish_amqp(amqp_url, exchange, queue, [last])
            await eventually(lambda: stats.delivered == VALID + 1, "the last valid message")
            assert handled[-1] == "valid-last"
        print(f"rabbitmq: {len(stream)} messages in {elapsed:.1f} s")

        dead = await drain(connection, dead_letter_queue_name(queue), len(hostile))
        got = Counter(
            (_text((m.headers or {}).get(CASE)), _text((m.headers or {}).get(H_REASON)))
            for m in dead
        )
        assert got == Counter((m.label, m.expect.value) for m in hostile if m.expect is not None)
        for message in dead:
            headers = message.headers or {}
            assert [k.lower() for k in headers].count(H_REASON) == 1
            source = _text(headers.get(H_SOURCE)) or ""
            assert "\n" not in source and "\x1b" not in source  # printable, whatever the key
        line_break = next(
            m for m in dead if _text((m.headers or {}).get(CASE)) == "routing-key-with-a-line-break"
        )
        assert _text((line_break.headers or {}).get(H_SOURCE)) == (
            f"amqp:{exchange}/order.reserved\\n2026-01-01 INFO forged"
        )


def test_the_streams_cover_the_brief() -> None:
    """No broker needed: both streams hold what the brief lists."""
    kafka, _ = kafka_stream("t")
    rabbit, _ = amqp_stream("x", "q")
    for stream in (kafka, rabbit):
        labels = {m.label for m in stream}
        reasons = Counter(m.expect for m in stream)
        assert reasons[None] == VALID and sum(reasons.values()) - VALID >= 30
        for needed in (
            "tampered-data",
            "truncated-chain",
            "signed-elsewhere",
            "chain-over-budget",
            "header-value-not-utf8" if stream is rabbit else "non-utf8-value",
            "forged-verdict",
        ):
            assert needed in labels, needed
        assert reasons[R.REPLAYED] >= 2
    assert {"two-trustchains", "header-name-not-utf8"} <= {r.label for r in kafka}
    assert {"trustchain-named-twice-on-the-wire", "two-trustchain-prefixes"} <= {
        m.label for m in rabbit
    }
