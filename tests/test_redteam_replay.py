"""Red team: redelivery, replay and retry paths attacked without a broker.

The attacker can publish any bytes and headers to any topic, exchange or
queue (``<topic>.retry``, ``<queue>.retry`` and ``.dlq`` included) and, on
RabbitMQ, consume and ``nack`` a message so that the broker sets its
``redelivered`` flag. At-least-once reality adds crashes at every await
point, store outages and clock skew. Every test asserts the *safe*
behaviour: an event is handled at most once per scope unless its own
delivery crashed, every consumed record is handled or dead-lettered with its
reason (never lost, never requeued forever), and nothing stops or stalls a
consumer. Broker versions of the same attacks are in
``integration/test_redteam_replay_brokers.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import decimal
import functools
import time
from collections.abc import Sequence
from typing import Any

import pytest
from aiokafka import TopicPartition
from chainkit import (
    BUNDLE,
    DEST2,
    EDGE,
    EDGE_TAG_TWIN,
    MALLORY_KEY,
    NOW,
    ORDERS,
    PAYMENTS,
    FixedClock,
    Story,
    build_story,
    encode_segments,
    make_bundle,
    sign_ring,
)
from test_amqp_shell import (
    BODY,
    CONTENT_TYPE,
    HEADERS,
    FakeIncoming,
    LadderChannel,
    came_back,
    failing_worker,
    valid,
)
from test_kafka_retry import RETRY, TOPIC, Broker, Producer, on_broker, record
from test_kafka_retry import sealed as seal_anew

from trusthop.admission import Admission
from trusthop.amqp.messages import H_RETRY as AMQP_RETRY
from trusthop.amqp.messages import parse_retry, retry_attempt
from trusthop.chain import Chain, HopRing
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.kafka import H_NOT_BEFORE, H_RETRY, KafkaDelivery, parse_not_before
from trusthop.kafka import parse_retry_attempt as kafka_retry
from trusthop.pipeline import H_REASON, ChainVerifier
from trusthop.replay import DeliveryInfo, DeliveryKind, Sighting, sighting_key
from trusthop.stores import Change, MemoryReplayStore

K = DeliveryKind


def wire_of(story: Story) -> WireEvent:
    wire = dataclasses.replace(story.e2)
    wire.chain = story.encoded
    return wire


def admission(clock: FixedClock, store: Any = None, **kwargs: Any) -> Admission:
    verifier = ChainVerifier(BUNDLE, clock=clock)
    chosen = MemoryReplayStore() if store is None else store
    return Admission(verifier, scope="amqp/billing", store=chosen, **kwargs)


async def reason_of(coro: Any) -> Reason:
    with pytest.raises(TrustError) as caught:
        await coro
    return caught.value.reason


# --------------------------------------------------------------------------- #
# 1. forged retry numbers: only the exact form the consumer writes counts
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "value",
    [
        "\uff12".encode(),  # full-width digit
        b"2\x00",
        b"\x002",
        b" 2",
        b"2 ",
        b"2\r\n",
        "²".encode(),  # superscript two: str.isdigit() says yes
        b"0x2",
        b"2_0",
        b"+2",
        str(10**30).encode(),
        b"1001",
    ],
)
def test_kafka_forged_retry_numbers_read_as_no_retry(value: bytes) -> None:
    assert kafka_retry([(H_RETRY, value)]) == 0
    assert kafka_retry([(H_RETRY, b"2"), (H_RETRY, value)]) == 0  # repeated: none believed
    assert kafka_retry([(H_RETRY, b"2"), ("Trusthop-Retry", b"3")]) == 2  # other names ignored


@pytest.mark.parametrize(
    "value",
    [
        "\uff12",  # full-width digit
        "2\x00",
        " 2",
        "2 ",
        "²",
        "٢",
        "0x2",
        "2_0",
        b"2",
        bytearray(b"2"),
        True,
        2.0,
        decimal.Decimal(2),
        -2,
        0,
        10**30,
        1001,
        None,
        ["2"],
        {"n": 2},
    ],
)
def test_amqp_forged_retry_numbers_read_as_no_retry(value: object) -> None:
    assert parse_retry(value) == 0
    headers = {AMQP_RETRY: value}
    assert retry_attempt(headers, exchange="", routing_key="billing", queue="billing") == 0


def test_amqp_a_retry_number_counts_only_through_the_default_exchange() -> None:
    headers = {AMQP_RETRY: "2"}
    assert retry_attempt(headers, exchange="", routing_key="billing", queue="billing") == 2
    assert retry_attempt(headers, exchange="orders", routing_key="billing", queue="billing") == 0
    assert retry_attempt(headers, exchange="", routing_key="billing.retry", queue="billing") == 0
    assert retry_attempt(headers, exchange="", routing_key="other", queue="billing") == 0


@pytest.mark.parametrize(
    "value", [b"nan", b"NaN", b"inf", b"-1", b"1e30", b"12345678901234567", "\uff11".encode(), b""]
)
def test_a_forged_not_before_means_due_now(value: bytes) -> None:
    assert parse_not_before([(H_NOT_BEFORE, value)]) is None


# --------------------------------------------------------------------------- #
# 2. forged flags and numbers on copies of an accepted event (admission)
# --------------------------------------------------------------------------- #


async def test_no_forged_delivery_fact_turns_a_copy_into_an_accepted_delivery(
    story: Story, clock: FixedClock
) -> None:
    adm = admission(clock)
    first = await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="payments/0@1"))
    assert first is not None
    await adm.settle(first)  # handled and acked: no delivery of it is open
    for forged in (
        DeliveryInfo(id="payments/0@2"),
        DeliveryInfo(retry=1),
        DeliveryInfo(retry=2),
        DeliveryInfo(retry=1000),
        DeliveryInfo(id="payments.retry/0@0", retry=2),
        # RabbitMQ sets the flag on a copy the attacker consumed and nacked.
        DeliveryInfo(redelivered=True),
        DeliveryInfo(redelivered=True, retry=2),
    ):
        assert await reason_of(adm.admit(wire_of(story), DEST2, forged)) is Reason.REPLAYED
    assert adm.counters["verified"] == 1 and adm.counters["replayed"] == 7


async def test_a_redelivered_flag_is_believed_only_while_a_delivery_is_open(
    story: Story, clock: FixedClock
) -> None:
    """The legitimate case still works: the worker died before its ack."""
    adm = admission(clock)
    first = await adm.admit(wire_of(story), DEST2, DeliveryInfo())
    assert first is not None  # ... and the process dies here: never settled
    again = await adm.admit(wire_of(story), DEST2, DeliveryInfo(redelivered=True))
    assert again is not None and again.kind is K.REDELIVERY
    again_twice = await adm.admit(wire_of(story), DEST2, DeliveryInfo(redelivered=True))
    assert again_twice is not None and again_twice.kind is K.REDELIVERY  # died again
    await adm.settle(again_twice)
    assert await reason_of(adm.admit(wire_of(story), DEST2, DeliveryInfo(redelivered=True))) is (
        Reason.REPLAYED
    )


async def test_a_stolen_and_nacked_retry_copy_is_still_a_retry_used_once(
    story: Story, clock: FixedClock
) -> None:
    """The attacker consumes the genuine retry copy and nacks it (flag set),
    and also publishes a second copy with the same retry number: the event
    is handled once for that attempt."""
    adm = admission(clock)
    first = await adm.admit(wire_of(story), DEST2, DeliveryInfo())
    assert first is not None
    await adm.schedule_retry(first, 2)
    await adm.settle(first)  # the original was acked once its copy was confirmed
    stolen = await adm.admit(
        wire_of(story), "amqp:/billing", DeliveryInfo(redelivered=True, retry=2)
    )
    assert stolen is not None and stolen.kind is K.RETRY
    assert stolen.trusted.context.destination == DEST2
    await adm.settle(stolen)
    assert await reason_of(adm.admit(wire_of(story), "amqp:/billing", DeliveryInfo(retry=2))) is (
        Reason.REPLAYED
    )


async def test_multi_use_counts_open_deliveries_per_copy(story: Story, clock: FixedClock) -> None:
    adm = admission(clock, max_uses=2)
    one = await adm.admit(wire_of(story), DEST2, DeliveryInfo())
    two = await adm.admit(wire_of(story), DEST2, DeliveryInfo())
    assert one is not None and two is not None and two.kind is K.FIRST
    await adm.settle(one)
    # The second is still open: a redelivery of it is believed.
    back = await adm.admit(wire_of(story), DEST2, DeliveryInfo(redelivered=True))
    assert back is not None and back.kind is K.REDELIVERY
    await adm.settle(back)
    assert await reason_of(adm.admit(wire_of(story), DEST2, DeliveryInfo(redelivered=True))) is (
        Reason.REPLAYED
    )
    assert await reason_of(adm.admit(wire_of(story), DEST2, DeliveryInfo())) is Reason.REPLAYED


async def test_settle_is_harmless_without_a_store_or_a_sighting(
    story: Story, clock: FixedClock
) -> None:
    off = Admission(ChainVerifier(BUNDLE, clock=clock), scope="s", store=None)
    admitted = await off.admit(wire_of(story), DEST2)
    assert admitted is not None
    await off.settle(admitted)  # nothing to do
    store = MemoryReplayStore()
    adm = admission(clock, store)
    admitted = await adm.admit(wire_of(story), DEST2)
    assert admitted is not None
    store._values.clear()  # the sighting is gone (expired)
    await adm.settle(admitted)
    assert len(store) == 0  # settling never writes a sighting back


def test_a_sighting_of_the_previous_format_keeps_redeliveries_open() -> None:
    import msgpack

    old = msgpack.packb([1, 10.0, "kafka:orders", 1, ["orders/0@1"], 0, 99.0], use_bin_type=True)
    sighting = Sighting.decode(old)
    assert sighting.open == 1 and sighting.deliveries == ("orders/0@1",)
    assert Sighting.decode(sighting.encode()) == sighting


# --------------------------------------------------------------------------- #
# 3. the skip-signature path: only the byte-identical chain gets in
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "delivery",
    [DeliveryInfo(id="payments/0@1"), DeliveryInfo(redelivered=True), DeliveryInfo(retry=2)],
    ids=["same-offset", "redelivered-flag", "pending-retry"],
)
async def test_the_skip_signature_path_accepts_only_the_accepted_chain(
    story: Story, clock: FixedClock, delivery: DeliveryInfo
) -> None:
    adm = admission(clock)
    first = await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="payments/0@1"))
    assert first is not None
    if delivery.retry:
        await adm.schedule_retry(first, delivery.retry)
    origin, hop2 = story.chain.origin, story.chain.hops[1]

    def attempt(chain_text: str, *, data: bytes | None = None) -> Any:
        wire = wire_of(story)
        wire.chain = chain_text
        if data is not None:
            wire.data = data
        return adm.admit(wire, DEST2, delivery)

    # An extra trailing ring with a forged signature: another newest ring,
    # hence another key, so a first delivery verified in full.
    trailing = HopRing(
        actor=PAYMENTS.actor,
        key_tag=PAYMENTS.key_tag,
        iat=hop2.iat,
        exp=hop2.exp,
        scope=hop2.scope,
        event_digest=hop2.event_digest,
        destination=hop2.destination,
        signature=bytes(64),
    )
    assert await reason_of(attempt(story.chain.appended(trailing).encode())) is (
        Reason.BAD_SIGNATURE
    )
    # Structural edits are made on the ring bytes (Chain(...) would re-encode
    # the rings and recompute their link tags).
    r0, r1, r2 = story.chain.ring_bytes
    # A middle ring left out, the newest one kept.
    assert await reason_of(attempt(encode_segments([r0, r2]))) is Reason.BROKEN_LINK
    # The middle ring repeated.
    assert await reason_of(attempt(encode_segments([r0, r1, r1, r2]))) is Reason.BROKEN_LINK
    # The origin re-minted with another subject by the real edge key.
    reminted = sign_ring(dataclasses.replace(origin, subject="user:mallory"), EDGE)
    new_origin = Chain(reminted).ring_bytes[0]  # type: ignore[arg-type]
    assert await reason_of(attempt(encode_segments([new_origin, r1, r2]))) is Reason.BROKEN_LINK
    # The middle ring re-signed by a key outside the bundle: v2 checks every
    # signature (oldest first) before any link, and ring 1 still names ring 0.
    mallory = MALLORY_KEY.sign(story.chain.signing_input(1)) + r1[64:]
    assert await reason_of(attempt(encode_segments([r0, mallory, r2]))) is Reason.BAD_SIGNATURE
    # Other data under the accepted chain.
    assert await reason_of(attempt(story.encoded, data=b'{"order":43}')) is Reason.EVENT_MISMATCH
    # The real chain still goes through the same path.
    assert await adm.admit(wire_of(story), DEST2, delivery) is not None


async def test_the_skip_signature_path_still_checks_revocation_of_every_ring(
    story: Story, clock: FixedClock
) -> None:
    adm = admission(clock)
    first = await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="p/0@0"))
    assert first is not None
    for revoked in (
        make_bundle(revoked_actors=[EDGE.actor]),
        make_bundle(revoked_actors=[ORDERS.actor]),
        make_bundle(revoked_kids=[ORDERS.kid]),
    ):
        adm.verifier.bundle = revoked
        assert await reason_of(adm.admit(wire_of(story), DEST2, DeliveryInfo(id="p/0@0"))) is (
            Reason.REVOKED
        )
    adm.verifier.bundle = BUNDLE
    assert await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="p/0@0")) is not None


def test_sighting_keys_are_distinct_across_scopes_with_separators(story: Story) -> None:
    scopes = [
        "kafka/g",
        "kafka/g\x00",
        "kafka/g/",
        "amqp/g",
        "kafka/g\x00" + "0" * 64,
        "kafka/g\ud800",
        "kafka/g\ufffd",
        "",
    ]
    other = build_story("txn-other")
    keys = {sighting_key(s, c) for s in scopes for c in (story.chain, other.chain)}
    assert len(keys) == 2 * len(scopes)


# --------------------------------------------------------------------------- #
# 4. a store that fails outside its contract fails closed, everywhere
# --------------------------------------------------------------------------- #


class OddStore(MemoryReplayStore):
    """Raises something else than StoreError from the chosen methods
    (``fail_updates``: that many next updates fail, -1 for all)."""

    def __init__(self, *, get: bool = False, update: bool = False) -> None:
        super().__init__()
        self.fail_get = get
        self.fail_updates = -1 if update else 0

    @property
    def fail_update(self) -> bool:
        return self.fail_updates != 0

    @fail_update.setter
    def fail_update(self, on: bool) -> None:
        self.fail_updates = -1 if on else 0

    async def get(self, key: str) -> bytes | None:
        if self.fail_get:
            raise OSError("socket closed")
        return await super().get(key)

    async def update(self, key: str, change: Change) -> bytes | None:
        if self.fail_updates:
            self.fail_updates -= self.fail_updates > 0
            raise ConnectionResetError("peer reset")
        return await super().update(key, change)


async def test_admission_turns_any_store_exception_into_store_unavailable(
    story: Story, clock: FixedClock
) -> None:
    assert await reason_of(admission(clock, OddStore(get=True)).admit(wire_of(story), DEST2)) is (
        Reason.STORE_UNAVAILABLE
    )
    assert (
        await reason_of(admission(clock, OddStore(update=True)).admit(wire_of(story), DEST2))
        is Reason.STORE_UNAVAILABLE
    )
    store = OddStore()
    adm = admission(clock, store)
    admitted = await adm.admit(wire_of(story), DEST2)
    assert admitted is not None
    store.fail_update = True
    assert await reason_of(adm.schedule_retry(admitted, 2)) is Reason.STORE_UNAVAILABLE


async def test_a_change_function_bug_is_not_swallowed_as_an_outage(
    story: Story, clock: FixedClock
) -> None:
    """A TrustError raised inside change() (a corrupt entry) keeps its reason."""
    store = MemoryReplayStore()
    adm = admission(clock, store)
    admitted = await adm.admit(wire_of(story), DEST2)
    assert admitted is not None
    # Corrupt the entry through the store's own interface (its layout is private).
    await store.update(admitted.key, lambda current: (b"\xc1 not msgpack", 3600.0))
    with pytest.raises(TrustError) as caught:
        await adm.schedule_retry(admitted, 2)
    assert caught.value.reason is Reason.STORE_UNAVAILABLE
    assert "corrupt" in caught.value.message


# --------------------------------------------------------------------------- #
# 5. memory: the in-memory store stays bounded under hostile churn
# --------------------------------------------------------------------------- #


async def test_memory_store_deadline_heap_stays_bounded_when_entries_are_extended() -> None:
    now = [0.0]
    store = MemoryReplayStore(10, clock=lambda: now[0])

    def extend(current: bytes | None) -> tuple[bytes | None, float]:
        return b"v", 3600.0

    for step in range(20_000):
        now[0] = float(step)
        await store.update("k", extend)
    assert len(store) == 1
    assert len(store._deadlines) <= 2 * len(store) + 64 + 1


async def test_memory_store_full_refuses_but_keeps_every_entry(clock: FixedClock) -> None:
    store = MemoryReplayStore(3)
    adm = admission(clock, store)
    stories = [build_story(f"txn-{n}") for n in range(5)]
    results = []
    for s in stories:
        try:
            results.append(await adm.admit(wire_of(s), DEST2))
        except TrustError as error:
            results.append(error.reason)  # type: ignore[arg-type]
    assert results[3:] == [Reason.STORE_UNAVAILABLE] * 2
    assert len(store) == 3
    # The three accepted ones are still remembered: their copies are replays.
    for s in stories[:3]:
        assert await reason_of(adm.admit(wire_of(s), DEST2, DeliveryInfo(id="x"))) is (
            Reason.REPLAYED
        )


# --------------------------------------------------------------------------- #
# 6. Kafka: retry topics shared between groups, floods, crashes
# --------------------------------------------------------------------------- #


@functools.cache
def sealed(event_id: str) -> Any:
    """One sealed record per event id: every copy carries the very same bytes
    (sealing again would sign another newest ring)."""
    return seal_anew(event_id)


def main(offset: int, event_id: str, partition: int = 0) -> Any:
    r = sealed(event_id)
    return record(TOPIC, partition, offset, r.headers, r.value, event_id.encode())


def copy_of(
    topic: str,
    offset: int,
    event_id: str,
    extra: Sequence[tuple[str, bytes | None]] = (),
    *,
    key: bytes | None = None,
    value: bytes | None = None,
) -> Any:
    r = sealed(event_id)
    headers = [*r.headers, *extra]
    return record(topic, 0, offset, headers, r.value if value is None else value, key)


class Ledger:
    def __init__(self) -> None:
        self.calls: list[tuple[bytes, DeliveryKind, int]] = []

    def __call__(self, delivery: KafkaDelivery) -> bytes:
        key = bytes(delivery.record.key or b"")
        self.calls.append((key, delivery.kind, delivery.attempt))
        return key


async def test_a_retry_copy_of_another_group_is_neither_handled_nor_dead_lettered() -> None:
    """Groups A and B both consume ``orders``, so both subscribe to
    ``orders.retry``. A's handler fails and A writes its retry copy there:
    B must ignore it (not a replay of B's, not B's to handle)."""
    a_consumer, _a_broker, a_producer = await on_broker([main(0, "e")], retry_delay=0)
    b_consumer, b_broker, b_producer = await on_broker([main(0, "e")], retry_delay=0)
    b_consumer.group_id = "billing"  # a second group (its scope differs too)
    b_consumer.admission.scope = "kafka/billing"

    async def a_fails_once(delivery: KafkaDelivery) -> None:
        if delivery.attempt == 1:
            raise RuntimeError("flaky")

    b_seen = Ledger()

    async def b_handles(delivery: KafkaDelivery) -> None:
        b_seen(delivery)

    assert await asyncio.wait_for(a_consumer.run(a_fails_once, limit=1), 5) == 1
    assert await asyncio.wait_for(b_consumer.run(b_handles, limit=1), 5) == 1
    [(_topic, key, value, headers)] = [s for s in a_producer.sent if s[0] == RETRY]
    b_broker.append(RETRY, value, key, headers)  # the shared retry topic
    assert await asyncio.wait_for(b_consumer.run(b_handles, limit=1), 5) == 1
    assert [k for k, *_ in b_seen.calls] == [b"e"]
    assert b_producer.to("orders.dlq") == []
    assert b_broker.committed(RETRY) == 1  # settled (skipped), not left behind
    assert b_consumer.counters.rejected == {}
    # A still gets its own copy.
    assert await asyncio.wait_for(a_consumer.run(a_fails_once, limit=1), 5) == 1
    assert a_consumer.counters["verified"] == 2


async def test_a_group_that_has_not_seen_the_event_does_not_take_it_from_another_retry() -> None:
    """With ``max_uses=2`` B would otherwise handle the event twice: once
    from A's retry copy, once from the topic."""
    a_consumer, _, a_producer = await on_broker([main(0, "e")], retry_delay=0)

    async def a_fails(delivery: KafkaDelivery) -> None:
        raise RuntimeError("flaky")

    assert await asyncio.wait_for(a_consumer.run(a_fails, limit=1), 5) == 1
    [(_, key, value, headers)] = [s for s in a_producer.sent if s[0] == RETRY]
    foreign = record(RETRY, 0, 0, headers, value, key)
    b_consumer, _b_broker, b_producer = await on_broker([foreign, main(0, "e")], max_uses=2)
    b_consumer.group_id = "billing"
    b_consumer.admission.scope = "kafka/billing"
    b_seen = Ledger()

    async def b_handles(delivery: KafkaDelivery) -> None:
        b_seen(delivery)

    assert await asyncio.wait_for(b_consumer.run(b_handles, limit=2), 5) == 2
    assert len(b_seen.calls) == 1
    assert b_producer.to("orders.dlq") == []


async def test_a_garbage_flood_on_the_retry_topic_does_not_delay_real_retries() -> None:
    """Records with a far-future ``trusthop-not-before`` that are not
    retries this group scheduled (junk, forged copies) are not held: they are
    dead-lettered at once, and the real retry behind them is on time."""
    delay = 0.4
    junk = [
        record(RETRY, 0, n, [(H_NOT_BEFORE, b"9999999999999999"), (H_RETRY, b"2")], b"junk")
        for n in range(10)
    ]
    consumer, broker, producer = await on_broker([main(0, "e"), *junk], retry_delay=delay)
    times: list[float] = []

    async def handle(delivery: KafkaDelivery) -> None:
        times.append(time.monotonic())
        if delivery.attempt == 1:
            raise RuntimeError("flaky")

    started = time.monotonic()
    assert await asyncio.wait_for(consumer.run(handle, limit=12), 10) == 12
    assert len(times) == 2
    assert times[1] - started < 3 * delay  # not 10 x delay
    reasons = [v[H_REASON] for _, v in producer.to("orders.dlq")]
    assert reasons == [b"malformed"] * 10
    assert broker.committed(RETRY) == 11


async def test_forged_copies_of_a_handled_event_on_the_retry_topic_are_not_held() -> None:
    delay = 0.5
    far = [(H_NOT_BEFORE, b"9999999999999999"), (H_RETRY, b"2")]
    forged = [copy_of(RETRY, n, "e", far, key=b"forged") for n in range(6)]
    consumer, _broker, producer = await on_broker([main(0, "e"), *forged], retry_delay=delay)
    seen = Ledger()

    async def handle(delivery: KafkaDelivery) -> None:
        seen(delivery)

    started = time.monotonic()
    assert await asyncio.wait_for(consumer.run(handle, limit=7), 10) == 7
    assert time.monotonic() - started < 2 * delay
    assert [c[1] for c in seen.calls] == [K.FIRST]
    assert [v[H_REASON] for _, v in producer.to("orders.dlq")] == [b"replayed"] * 6


async def test_a_forged_copy_of_a_pending_retry_is_held_at_most_retry_delay() -> None:
    """The copy looks exactly like the real one (same retry number): it may
    be held, but never longer than ``retry_delay``, and the event is handled
    once for that attempt."""
    delay = 0.3
    consumer, broker, producer = await on_broker([main(0, "e")], retry_delay=delay)
    seen = Ledger()

    async def handle(delivery: KafkaDelivery) -> None:
        seen(delivery)
        if delivery.attempt == 1:
            # The attacker races the real copy with a far-future one of its own.
            broker.add(
                copy_of(
                    RETRY,
                    0,
                    "e",
                    [(H_NOT_BEFORE, b"9999999999999999"), (H_RETRY, b"2")],
                    key=b"forged",
                )
            )
            raise RuntimeError("flaky")

    started = time.monotonic()
    assert await asyncio.wait_for(consumer.run(handle, limit=3), 10) == 3
    assert time.monotonic() - started < 4 * delay
    assert [(c[1], c[2]) for c in seen.calls] == [(K.FIRST, 1), (K.RETRY, 2)]
    assert [v[H_REASON] for _, v in producer.to("orders.dlq")] == [b"replayed"]


async def test_a_copy_published_before_the_original_is_handled_once() -> None:
    copy = copy_of(RETRY, 0, "e", [(H_RETRY, b"2")], key=b"copy")
    consumer, broker, producer = await on_broker([copy])
    seen = Ledger()

    async def handle(delivery: KafkaDelivery) -> None:
        seen(delivery)

    assert await asyncio.wait_for(consumer.run(handle, limit=1), 5) == 1
    broker.add(main(0, "e"))
    assert await asyncio.wait_for(consumer.run(handle, limit=1), 5) == 1
    assert [c[:2] for c in seen.calls] == [(b"copy", K.FIRST)]
    assert [v[H_REASON] for _, v in producer.to("orders.dlq")] == [b"replayed"]


async def test_a_store_exception_while_scheduling_a_retry_does_not_kill_run() -> None:
    store = OddStore()
    consumer, broker, producer = await on_broker([main(0, "a"), main(1, "b")], replay_store=store)
    done: list[str] = []

    async def handle(delivery: KafkaDelivery) -> None:
        if delivery.event.get_id() == "a":
            store.fail_updates = 1  # the retry's store write fails, once
            raise RuntimeError("flaky")
        done.append(str(delivery.event.get_id()))

    assert await asyncio.wait_for(consumer.run(handle, limit=2), 5) == 2
    [(_, verdict)] = producer.to("orders.dlq")
    assert verdict[H_REASON] == b"store_unavailable"
    assert b"ConnectionResetError" in (verdict["trusthop-detail"] or b"")
    assert broker.committed(TOPIC) == 2
    assert done == ["b"]


async def test_a_store_exception_while_admitting_is_store_unavailable_not_malformed() -> None:
    consumer, _broker, producer = await on_broker([main(0, "a")], replay_store=OddStore(get=True))

    async def handle(delivery: KafkaDelivery) -> None:
        raise AssertionError("never")

    assert await asyncio.wait_for(consumer.run(handle, limit=1), 5) == 1
    [(_, verdict)] = producer.to("orders.dlq")
    assert verdict[H_REASON] == b"store_unavailable"
    assert consumer.counters.rejected == {"store_unavailable": 1}


async def test_a_full_memory_store_dead_letters_and_keeps_consuming() -> None:
    consumer, broker, producer = await on_broker(
        [main(n, f"e{n}") for n in range(4)], replay_store=MemoryReplayStore(2)
    )
    handled: list[str] = []

    async def handle(delivery: KafkaDelivery) -> None:
        handled.append(str(delivery.event.get_id()))

    assert await asyncio.wait_for(consumer.run(handle, limit=4), 5) == 4
    assert handled == ["e0", "e1"]
    verdicts = [v for _, v in producer.to("orders.dlq")]
    assert [v[H_REASON] for v in verdicts] == [b"store_unavailable"] * 2
    assert all(b"full" in (v["trusthop-detail"] or b"") for v in verdicts)
    assert broker.committed(TOPIC) == 4


class Crash(BaseException):
    """The process dies here."""


class CrashingProducer(Producer):
    """Dies on the n-th send to ``topic`` (before or after the broker has it)."""

    def __init__(self, broker: Broker, *, topic: str, after: bool) -> None:
        super().__init__(broker)
        self.topic, self.after, self.armed = topic, after, True

    async def send_and_wait(
        self, topic: str, *, value: bytes | None, key: bytes | None, headers: list[Any]
    ) -> None:
        if topic == self.topic and self.armed:
            self.armed = False
            if self.after:
                await super().send_and_wait(topic, value=value, key=key, headers=headers)
            raise Crash
        await super().send_and_wait(topic, value=value, key=key, headers=headers)


async def crashing_consumer(after: bool) -> tuple[Any, Broker, CrashingProducer]:
    consumer, broker, _ = await on_broker([main(0, "e")], retry_delay=0)
    producer = CrashingProducer(broker, topic=RETRY, after=after)
    consumer._dlq = producer
    return consumer, broker, producer


@pytest.mark.parametrize("after", [False, True], ids=["before-copy", "after-copy-before-commit"])
async def test_a_crash_around_the_retry_copy_loses_nothing(after: bool) -> None:
    consumer, broker, producer = await crashing_consumer(after)
    seen = Ledger()
    outcome: list[str] = []

    async def handle(delivery: KafkaDelivery) -> None:
        seen(delivery)
        if len(seen.calls) <= 2:
            raise RuntimeError("flaky")
        outcome.append("done")

    with pytest.raises(Crash):
        await asyncio.wait_for(consumer.run(handle), 5)
    # The same process restarts (same store): the record comes again.
    assert broker.committed(TOPIC) is None
    settled = 2 if after else 1
    await asyncio.wait_for(consumer.run(handle, limit=settled + 1), 5)
    assert outcome == ["done"]
    kinds = [c[1] for c in seen.calls]
    assert kinds[:2] == [K.FIRST, K.REDELIVERY]
    assert kinds[2] is K.RETRY
    assert broker.committed(TOPIC) == 1
    # With the copy already written before the crash, two copies of retry 2
    # exist; the second one is dead-lettered (never handled twice).
    letters = [v[H_REASON] for _, v in producer.to("orders.dlq")]
    assert letters == ([b"replayed"] if after else [])


# --------------------------------------------------------------------------- #
# 7. RabbitMQ: the redelivered flag, crashes around the retry copy
# --------------------------------------------------------------------------- #


async def test_amqp_a_copy_nacked_by_the_attacker_after_the_ack_is_a_replay() -> None:
    channel = LadderChannel([])
    worker, calls = await failing_worker(channel, fail=0)
    original = valid()
    await channel.deliver("billing", original)
    assert original.settled == ["ack"]
    # The attacker publishes a copy, consumes it as another consumer on the
    # queue and nacks it: RabbitMQ now delivers it flagged redelivered.
    copy = valid(redelivered=True)
    await channel.deliver("billing", copy)
    assert len(calls) == 1 and copy.settled == ["ack"]
    (letter,) = channel.dlx.published
    assert letter.headers[H_REASON] == "replayed"
    # Same with a forged retry number through the default exchange.
    forged = FakeIncoming(
        BODY,
        {**HEADERS, AMQP_RETRY: "2"},
        redelivered=True,
        exchange="",
        routing_key="billing",
        content_type=CONTENT_TYPE,
    )
    await channel.deliver("billing", forged)
    assert len(calls) == 1
    assert [m.headers[H_REASON] for m in channel.dlx.published] == ["replayed", "replayed"]
    assert worker.counters["verified"] == 1 and worker.counters["redelivered"] == 0


async def test_amqp_a_crash_mid_handler_is_still_redelivered_and_handled() -> None:
    channel = LadderChannel([])
    worker = TrustedWorkerFactory(channel)
    first = valid()
    with pytest.raises(Crash):
        await worker.deliver_crashing(first)
    again = first.again()
    await channel.deliver("billing", again)
    assert again.settled == ["ack"]
    assert [(d.kind, d.redelivered) for d in worker.calls] == [
        (K.FIRST, False),
        (K.REDELIVERY, True),
    ]
    # Now settled: one more flagged copy is a replay.
    late = first.again()
    await channel.deliver("billing", late)
    assert len(worker.calls) == 2
    assert channel.dlx.published[-1].headers[H_REASON] == "replayed"


class TrustedWorkerFactory:
    """A worker on ``billing`` whose handler can be made to kill the process."""

    def __init__(self, channel: LadderChannel) -> None:
        from trusthop.amqp import TrustedWorker

        self.channel = channel
        self.calls: list[Any] = []
        self.crash_next = False
        worker = TrustedWorker(channel, verifier=_amqp_verifier())  # type: ignore[arg-type]
        self.worker = worker

        @worker.handler("billing", bind=[("orders", "order.placed")])
        async def handle(delivery: Any) -> None:
            self.calls.append(delivery)
            if self.crash_next:
                self.crash_next = False
                raise Crash

    async def deliver_crashing(self, message: FakeIncoming) -> None:
        if not self.worker._running:
            await self.worker.start()
        self.crash_next = True
        await self.channel.deliver("billing", message)


def _amqp_verifier() -> ChainVerifier:
    from test_amqp_shell import VERIFIER

    return VERIFIER


async def test_amqp_a_crash_between_the_retry_copy_and_the_ack_loses_nothing() -> None:
    """Attempt 1 fails, its retry copy is confirmed, the worker dies before
    acking the original. RabbitMQ redelivers the original (its attempt 1
    fails again: a second copy for attempt 2). Attempt 2 runs once; the
    spare copy is dead-lettered ``replayed``; nothing is lost."""
    channel = LadderChannel([])
    _worker, calls = await failing_worker(channel, fail=1)
    first = valid()

    async def die_on_ack() -> None:
        raise Crash

    first.ack = die_on_ack  # type: ignore[method-assign]
    with pytest.raises(Crash):
        await channel.deliver("billing", first)
    assert len(channel.default_exchange.published) == 1  # the copy was confirmed
    again = first.again()  # RabbitMQ redelivers the unacked original
    await channel.deliver("billing", again)
    assert again.settled == ["ack"]
    copies = [came_back(copy) for copy in channel.default_exchange.published]
    assert len(copies) == 2
    for copy in copies:
        await channel.deliver("billing", copy)
        assert copy.settled == ["ack"]
    assert [(d.kind, d.attempt) for d in calls] == [
        (K.FIRST, 1),
        (K.REDELIVERY, 1),
        (K.RETRY, 2),
    ]
    assert all(d.redelivered for d in calls[1:])
    assert [m.headers[H_REASON] for m in channel.dlx.published] == ["replayed"]


async def test_amqp_a_settle_failure_after_the_ack_is_not_fatal() -> None:
    store = OddStore()
    channel = LadderChannel([])
    worker, calls = await failing_worker(channel, fail=0, replay_store=store)
    original = valid()

    async def ack_then_break() -> None:
        original.settled.append("ack")
        store.fail_update = True

    original.ack = ack_then_break  # type: ignore[method-assign]
    await channel.deliver("billing", original)
    assert original.settled == ["ack"] and len(calls) == 1
    assert channel.dlx.published == [] and worker.stats.requeued == 0
    assert worker.stats.delivered == 1


# --------------------------------------------------------------------------- #
# 8. counters add up under a hostile stream
# --------------------------------------------------------------------------- #


def balance(counters: dict[str, Any], consumed: int, post_admission: int = 0) -> None:
    """Every consumed record is verified, rejected or a duplicate, once;
    ``post_admission`` rejections (``handler_failed``, ``store_unavailable``
    while scheduling a retry) come on top of a ``verified``."""
    rejected = sum(counters["rejected"].values())
    assert counters["verified"] + rejected + counters["duplicates"] == consumed + post_admission


@pytest.mark.parametrize("on_replay", ["reject", "skip"])
async def test_kafka_counters_add_up_under_a_hostile_stream(on_replay: str) -> None:
    a = sealed("a")
    tampered = list(a.headers)
    hostile = [
        main(0, "a"),
        record(TOPIC, 0, 1, a.headers, a.value, b"copy"),
        record(TOPIC, 0, 2, tampered, b'{"order":"b"}', b"tampered"),
        record(TOPIC, 0, 3, [], b"junk", b"junk"),
        record(RETRY, 0, 0, [*a.headers, (H_RETRY, b"2")], a.value, b"forged-retry"),
        record(RETRY, 0, 1, [*a.headers, (H_RETRY, b"1")], a.value, b"forged-one"),
        main(4, "b"),
        main(5, "c"),
    ]
    consumer, broker, _producer = await on_broker(hostile, retry_delay=0, on_replay=on_replay)

    async def handle(delivery: KafkaDelivery) -> None:
        if delivery.event.get_id() == "c" and delivery.attempt == 1:
            raise RuntimeError("once")

    consumed = len(hostile) + 1  # plus the retry copy of c
    assert await asyncio.wait_for(consumer.run(handle, limit=consumed), 5) == consumed
    counters = consumer.counters.as_dict()
    balance(counters, consumed)
    assert counters["verified"] == 4  # a, b, c, c's retry
    # The tampered copy carries the accepted newest ring: a replay before
    # anything else is checked (skipped unhandled under "skip").
    duplicates = 4 if on_replay == "skip" else 0
    assert counters["duplicates"] == duplicates
    assert counters["replayed"] == 4
    assert broker.committed(TOPIC) == 6 and broker.committed(RETRY) == 3


async def test_amqp_counters_add_up_under_a_hostile_stream() -> None:
    channel = LadderChannel([])
    worker, _calls = await failing_worker(channel, fail=2, max_attempts=2)
    stream = [
        valid(),
        valid(),  # copy
        valid(redelivered=True),  # copy nacked by the attacker
        FakeIncoming(b"junk", {}),
        FakeIncoming(BODY, {**HEADERS, "CC": ["x"]}, content_type=CONTENT_TYPE),
    ]
    for message in stream:
        await channel.deliver("billing", message)
    (copy,) = channel.default_exchange.published
    await channel.deliver("billing", came_back(copy))  # attempt 2 fails too: handler_failed
    counters = worker.counters.as_dict()
    balance(counters, len(stream) + 1, post_admission=1)
    assert counters["rejected"] == {
        "replayed": 2,
        "malformed": 1,
        "wrong_destination": 1,
        "handler_failed": 1,
    }


# --------------------------------------------------------------------------- #
# 9. clock skew
# --------------------------------------------------------------------------- #


async def test_a_clock_that_jumps_backwards_does_not_reopen_a_ring(
    story: Story, clock: FixedClock
) -> None:
    adm = admission(clock)
    first = await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="p/0@0"))
    assert first is not None
    clock.now -= 3600 * 24 * 365  # NTP step backwards by a year
    assert await reason_of(adm.admit(wire_of(story), DEST2, DeliveryInfo(id="p/0@9"))) is (
        Reason.REPLAYED
    )


async def test_a_non_finite_clock_fails_closed_on_every_kind(
    story: Story, clock: FixedClock
) -> None:
    adm = admission(clock)
    first = await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="p/0@0"))
    assert first is not None
    clock.now = float("nan")
    assert await reason_of(adm.admit(wire_of(build_story("t2")), DEST2)) is Reason.EXPIRED
    # A redelivery is judged at its first delivery's (finite) time, and its
    # sighting is not rewritten with a NaN lifetime.
    again = await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="p/0@0"))
    assert again is not None and again.sighting is not None
    assert again.sighting.expires_at == first.sighting.expires_at  # type: ignore[union-attr]


# --------------------------------------------------------------------------- #
# 10. the verified-prefix cache cannot be poisoned, and stays bounded
# --------------------------------------------------------------------------- #


def test_the_signature_cache_stores_only_successes_per_key(story: Story) -> None:
    from trusthop.bundle import BundleKey, TrustBundle
    from trusthop.chain import decode_chain
    from trusthop.sigcache import SignatureCache
    from trusthop.verify import Limits

    cache = SignatureCache(4)

    def check(text: str, bundle: TrustBundle = BUNDLE, digest: bytes = story.digest) -> bool:
        chain = decode_chain(text, max_bytes=1 << 16, max_rings=32)
        try:
            cache.verify(
                chain,
                bundle=bundle,
                event_digest=digest,
                destination=DEST2,
                now=NOW,
                limits=Limits(),
            )
        except TrustError:
            return False
        return True

    r0, r1, r2 = story.chain.ring_bytes
    # A forged signature over the very bytes of the real ring (the verifier
    # hashes the ring itself; a caller cannot lie about it) is not cached,
    # and does not make the real one a hit.
    assert check(encode_segments([r0, bytes(64) + r1[64:], r2])) is False
    assert len(cache) == 0
    assert check(story.encoded) is True
    assert check(story.encoded) is True and cache.hits == 1
    # The same rings under another key with the same key tag are verified
    # again against that key, and fail.
    other = BundleKey(EDGE.kid, EDGE.actor, EDGE_TAG_TWIN.public_key)
    swapped = TrustBundle.of([other, *(k for k in BUNDLE.keys.values() if k.kid != EDGE.kid)])
    assert EDGE_TAG_TWIN.public_key.key_tag == EDGE.key_tag
    assert check(story.encoded, swapped) is False
    # Bounded, whatever is presented.
    for n in range(20):
        s = build_story(f"txn-cache-{n}")
        check(s.encoded, digest=s.digest)
        assert len(cache) <= 4
    assert len(cache) == 4


def test_amqp_dead_letter_bookkeeping_stays_bounded() -> None:
    from test_amqp_shell import VERIFIER

    from trusthop.amqp import TrustedWorker
    from trusthop.amqp.worker import _ATTEMPTS_REMEMBERED

    worker = TrustedWorker(LadderChannel([]), verifier=VERIFIER)  # type: ignore[arg-type]
    for n in range(3 * _ATTEMPTS_REMEMBERED):
        worker._note_attempt(f"fingerprint-{n}")
    assert len(worker._letter_attempts) == _ATTEMPTS_REMEMBERED
    assert len(worker._first_failure) == _ATTEMPTS_REMEMBERED


# --------------------------------------------------------------------------- #
# 11. a store that hangs cannot stall a consumer
# --------------------------------------------------------------------------- #


class HangingStore(MemoryReplayStore):
    """Answers nothing once ``hang`` is set (a black-holed Redis without
    socket timeouts)."""

    hang = False

    async def get(self, key: str) -> bytes | None:
        if self.hang:
            await asyncio.Event().wait()
        return await super().get(key)

    async def update(self, key: str, change: Change) -> bytes | None:
        if self.hang:
            await asyncio.Event().wait()
        return await super().update(key, change)


async def test_a_hanging_store_fails_closed_and_the_kafka_consumer_goes_on() -> None:
    store = HangingStore()
    consumer, broker, producer = await on_broker([main(0, "a"), main(1, "b")], replay_store=store)
    consumer.admission.store_timeout = 0.2
    handled: list[str] = []

    async def handle(delivery: KafkaDelivery) -> None:
        handled.append(str(delivery.event.get_id()))
        store.hang = True  # hangs from now on

    assert await asyncio.wait_for(consumer.run(handle, limit=2), 5) == 2
    assert handled == ["a"]
    [(_, verdict)] = producer.to("orders.dlq")
    assert verdict[H_REASON] == b"store_unavailable"
    assert b"did not answer within 0.2 s" in (verdict["trusthop-detail"] or b"")
    assert broker.committed(TOPIC) == 2


async def test_a_hanging_store_fails_closed_in_the_amqp_worker() -> None:
    store = HangingStore()
    channel = LadderChannel([])
    worker, calls = await failing_worker(channel, fail=0, replay_store=store)
    worker.admissions["billing"].store_timeout = 0.2
    store.hang = True
    message = valid()
    await asyncio.wait_for(channel.deliver("billing", message), 5)
    assert calls == [] and message.settled == ["ack"]
    (letter,) = channel.dlx.published
    assert letter.headers[H_REASON] == "store_unavailable"


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_admission_refuses_a_nonsense_store_timeout(bad: float) -> None:
    with pytest.raises(ValueError, match="store_timeout"):
        Admission(ChainVerifier(BUNDLE), scope="s", store=None, store_timeout=bad)
    Admission(ChainVerifier(BUNDLE), scope="s", store=None, store_timeout=None)


async def test_many_pending_retries_wait_one_delay_not_one_each() -> None:
    delay = 0.3
    events = [main(n, f"m{n}", partition=n % 4) for n in range(8)]
    consumer, broker, _ = await on_broker(events, retry_delay=delay)
    done: dict[str, float] = {}

    async def handle(delivery: KafkaDelivery) -> None:
        if delivery.attempt == 1:
            raise RuntimeError("later")
        done[str(delivery.event.get_id())] = time.monotonic()

    started = time.monotonic()
    assert await asyncio.wait_for(consumer.run(handle, limit=16), 10) == 16
    assert len(done) == 8
    assert max(done.values()) - started < 4 * delay  # not 8 x delay
    assert broker.paused == set() and consumer._holds == {}


class RevokingStore(MemoryReplayStore):
    """Runs the consumer's revoke listener inside its next ``get`` (a
    rebalance while the consumer asks the store about a held retry), and
    resets the partition's position to its committed offset as aiokafka
    does when the partition is assigned again."""

    def __init__(self) -> None:
        super().__init__()
        self.broker: Broker | None = None
        self.armed = False

    async def get(self, key: str) -> bytes | None:
        broker = self.broker
        if self.armed and broker is not None:
            self.armed = False
            tp = TopicPartition(RETRY, 0)
            await broker.listener.on_partitions_revoked({tp})
            broker.position[tp] = broker.committed(RETRY) or 0
        return await super().get(key)


async def test_a_rebalance_while_asking_about_a_held_retry_settles_it_once() -> None:
    store = RevokingStore()
    far = [(H_NOT_BEFORE, b"9999999999999999"), (H_RETRY, b"2")]
    forged = copy_of(RETRY, 0, "e", far, key=b"forged")
    consumer, broker, producer = await on_broker(
        [main(0, "e")], replay_store=store, retry_delay=0.2
    )
    store.broker = broker

    async def handle(delivery: KafkaDelivery) -> None:
        store.armed = True
        broker.add(forged)

    assert await asyncio.wait_for(consumer.run(handle, limit=2), 5) == 2
    with pytest.raises(TimeoutError):  # nothing is left to settle
        await asyncio.wait_for(consumer.run(handle, limit=1), 0.5)
    assert [v[H_REASON] for _, v in producer.to("orders.dlq")] == [b"replayed"]
    assert consumer.counters["replayed"] == 1
