"""Redelivery, replay, retry topics and rebalances of TrustedKafkaConsumer on a real broker.

Issue 4 on the ``kafka_bootstrap`` broker (Tansu in CI) and, for replicas,
the ``redis_url`` server:

* a crash mid-handler: the next member of the group gets the record again,
  classified ``redelivery``, and handles it once to completion;
* a re-published copy of a sealed record: ``replayed`` (dead-lettered), or
  skipped under ``on_replay="skip"``;
* handler retries go through ``<topic>.retry`` with a delay that stalls
  neither the main topic nor other partitions; ``handler_failed`` after
  ``max_attempts``;
* a retry that waits past the chain's ``max_age`` is still handled, a fresh
  event that old is ``expired``;
* a revocation between the first delivery and a retry or a redelivery is
  caught (``revoked``);
* two replicas of a group sharing a Redis replay store accept one of two
  copies that land on partitions owned by different replicas;
* fan-out to two groups, and ``max_uses=2``;
* a consumer killed mid-batch and restarted loses nothing;
* a rebalance while a record is being handled: the revoke listener lets it
  commit first, so nobody delivers it again.

Every test accounts for every record it publishes (:class:`Ledger`): each
is handled to completion exactly once or dead-lettered exactly once (or,
under ``on_replay="skip"``, skipped). Records get unique Kafka keys (the key
is not signed), so copies of one sealed event are still told apart.
Dead-letter and retry topics are read back with plain aiokafka.

Tansu auto-creates topics with 4 partitions: nothing here relies on order
across partitions (records are pinned to one partition where order matters).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from cloudevents.core.v1.event import CloudEvent

from trusthop.bundle import TrustBundle
from trusthop.destination import kafka_destination
from trusthop.errors import Reason, TrustError
from trusthop.kafka import (
    H_NOT_BEFORE,
    H_ORIGINAL,
    H_RETRY,
    KafkaDelivery,
    KafkaRecord,
    TrustedKafkaConsumer,
    TrustedKafkaProducer,
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
from trusthop.replay import DeliveryKind
from trusthop.sign import Identity, mint_origin
from trusthop.stores.memory import MemoryReplayStore
from trusthop.verify import Limits

DOMAIN = "prod.example.com"
EDGE = Identity.create(f"spiffe://{DOMAIN}/ns/edge/sa/gateway", SigningKey.from_seed(b"\x21" * 32))
BUNDLE = TrustBundle.of([EDGE.bundle_key])
REVOKED = TrustBundle.of([EDGE.bundle_key], revoked_actors=[EDGE.actor])
SCOPE = frozenset({"orders:read", "orders:write"})

TIMEOUT = 30.0
RETRY_DELAY = 0.3


class Crash(BaseException):
    """Stands for the process dying inside a handler: ``run()`` does not catch it."""


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def seal(topic: str, label: str, *, age: float = 0.0) -> KafkaRecord:
    """A record for ``topic`` sealed by EDGE ``age`` seconds ago (nothing is sent)."""
    now = time.time() - age
    origin = mint_origin(
        EDGE,
        subject="user:alice",
        issuer="https://idp.example.com",
        credential="alice-access-token",
        scope=SCOPE,
        now=now,
        ttl=3600,
    )
    event = CloudEvent(
        {
            "id": f"{label}-{uuid.uuid4().hex[:8]}",
            "source": "/shop/edge",
            "type": "com.example.order.placed",
            "specversion": "1.0",
            "datacontenttype": "application/json",
            "subject": label,
        },
        {"order": label},
    )
    signer = ChainSigner(EDGE, clock=lambda: now)
    return TrustedKafkaProducer(signer=signer, producer=object()).seal(topic, event, origin=origin)


@dataclass
class Ledger:
    """Every record in, and what became of it.

    ``sent`` maps each published record's unique key to its coordinates;
    ``done`` counts handler runs that returned (completions) per key;
    ``seen`` lists ``(key, kind, attempt)`` of every handler call.
    """

    sent: dict[bytes, tuple[str, int, int]] = field(default_factory=dict)
    done: Counter[bytes] = field(default_factory=Counter)
    seen: list[tuple[bytes, DeliveryKind, int]] = field(default_factory=list)

    def saw(self, delivery: KafkaDelivery) -> bytes:
        key = bytes(delivery.record.key)
        self.seen.append((key, delivery.kind, delivery.attempt))
        return key

    def calls(self, key: bytes) -> list[tuple[DeliveryKind, int]]:
        return [(kind, attempt) for k, kind, attempt in self.seen if k == key]

    def account(self, dead: Sequence[Any], skipped: Sequence[bytes] = ()) -> None:
        """Each record sent was handled once, dead-lettered once, or skipped once."""
        dead_keys = Counter(bytes(r.key) for r in dead)
        settled = self.done + dead_keys + Counter(skipped)
        assert set(settled) == set(self.sent), (sorted(settled), sorted(self.sent))
        assert all(n == 1 for n in settled.values()), settled
        assert len(self.sent) == sum(self.done.values()) + len(dead) + len(skipped)


async def publish(
    bootstrap: str, topic: str, records: Sequence[tuple[bytes, KafkaRecord, int | None]]
) -> dict[bytes, tuple[str, int, int]]:
    """Publish exactly these bytes under these keys, in order; return their coordinates."""
    client = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await client.start()
    placed: dict[bytes, tuple[str, int, int]] = {}
    try:
        for key, record, partition in records:
            meta = await client.send_and_wait(
                topic, value=record.value, key=key, headers=record.headers, partition=partition
            )
            placed[key] = (topic, meta.partition, meta.offset)
    finally:
        await client.stop()
    return placed


async def read_topic(bootstrap: str, topic: str, count: int) -> list[Any]:
    """Exactly ``count`` records of every partition of ``topic`` (no group), oldest first."""
    client = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await client.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + TIMEOUT
        while len(records) < count and time.monotonic() < deadline:
            for batch in (await client.getmany(timeout_ms=300)).values():
                records.extend(batch)
        for batch in (await client.getmany(timeout_ms=500)).values():  # nothing more
            records.extend(batch)
    finally:
        await client.stop()
    assert len(records) == count, f"{topic}: expected {count} records, got {len(records)}"
    return sorted(records, key=lambda r: (r.timestamp, r.partition, r.offset))


async def committed(bootstrap: str, group: str, topic: str, partition: int = 0) -> int | None:
    client = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await client.start()
    try:
        return await client.committed(TopicPartition(topic, partition))
    finally:
        await client.stop()


async def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def headers_of(record: Any) -> dict[str, bytes | None]:
    return dict(record.headers)


def make_consumer(
    bootstrap: str, options: dict[str, int], topic: str, group: str, **kwargs: Any
) -> TrustedKafkaConsumer:
    kwargs.setdefault("verifier", ChainVerifier(BUNDLE))
    kwargs.setdefault("retry_delay", RETRY_DELAY)
    return TrustedKafkaConsumer(
        topic,
        group_id=group,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        poll_timeout_ms=100,
        **options,
        **kwargs,
    )


Handler = Callable[[KafkaDelivery], Awaitable[None]]


@asynccontextmanager
async def running(consumer: TrustedKafkaConsumer, handler: Handler) -> AsyncIterator[None]:
    """``consumer.run(handler)`` in a task; stopped (and its errors raised) on exit."""
    await consumer.start()
    task = asyncio.create_task(consumer.run(handler))
    try:
        yield
    finally:
        await asyncio.wait_for(consumer.stop(), 15)
        await asyncio.wait_for(task, 15)


async def assigned(*consumers: TrustedKafkaConsumer, topic: str) -> list[set[int]]:
    """Wait until every consumer owns partitions of ``topic`` and together they own
    all 4, none twice (the group is settled); return each one's partitions."""

    def owned() -> list[set[int]]:
        return [
            {tp.partition for tp in c.client.assignment() if tp.topic == topic} for c in consumers
        ]

    def settled() -> bool:
        parts = owned()
        together = [p for ps in parts for p in ps]
        return all(parts) and sorted(together) == [0, 1, 2, 3]

    await wait_until(settled)
    return owned()


# --------------------------------------------------------------------------- #
# (a) a crash mid-handler: redelivered to the next member, handled once
# --------------------------------------------------------------------------- #


async def test_a_crash_mid_handler_is_redelivered_to_the_next_member_as_a_redelivery(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, int], unique_name: str
) -> None:
    topic, group = f"{unique_name}-orders", f"{unique_name}-svc"
    ledger = Ledger()
    ledger.sent = await publish(kafka_bootstrap, topic, [(b"r", seal(topic, "r"), 0)])
    store = MemoryReplayStore()

    first = make_consumer(kafka_bootstrap, kafka_consumer_options, topic, group, replay_store=store)
    await first.start()

    async def crash(delivery: KafkaDelivery) -> None:
        ledger.saw(delivery)
        assert not delivery.redelivered
        raise Crash

    with pytest.raises(Crash):
        await asyncio.wait_for(first.run(crash), TIMEOUT)
    await first.stop()
    assert await committed(kafka_bootstrap, group, topic) is None

    second = make_consumer(
        kafka_bootstrap, kafka_consumer_options, topic, group, replay_store=store
    )

    async def finish(delivery: KafkaDelivery) -> None:
        key = ledger.saw(delivery)
        assert delivery.redelivered
        ledger.done[key] += 1

    async with running(second, finish):
        await wait_until(lambda: second.stats.handled == 1)
        await asyncio.sleep(0.3)  # nothing else comes
    assert ledger.calls(b"r") == [(DeliveryKind.FIRST, 1), (DeliveryKind.REDELIVERY, 1)]
    assert second.counters["redelivered"] == 1
    assert second.counters["verified"] == 1
    assert second.counters.rejected == {}
    assert first.counters["verified"] == 1 and first.counters["redelivered"] == 0
    assert await committed(kafka_bootstrap, group, topic) == 1
    ledger.account(dead=[])


# --------------------------------------------------------------------------- #
# (b) a re-published copy: replayed, or skipped
# --------------------------------------------------------------------------- #


async def test_a_republished_copy_is_replayed_or_skipped_as_configured(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, int], unique_name: str
) -> None:
    topic = f"{unique_name}-orders"
    sealed = seal(topic, "once")
    ledger = Ledger()
    # The very same bytes twice (the attacker's copy), in order on one partition.
    ledger.sent = await publish(
        kafka_bootstrap, topic, [(b"original", sealed, 0), (b"copy", sealed, 0)]
    )
    rejecting = make_consumer(kafka_bootstrap, kafka_consumer_options, topic, f"{unique_name}-r")
    skipping = make_consumer(
        kafka_bootstrap, kafka_consumer_options, topic, f"{unique_name}-s", on_replay="skip"
    )
    skip_ledger = Ledger(sent=dict(ledger.sent))

    async def handle(delivery: KafkaDelivery) -> None:
        ledger.done[ledger.saw(delivery)] += 1

    async def handle_skipping(delivery: KafkaDelivery) -> None:
        skip_ledger.done[skip_ledger.saw(delivery)] += 1

    async with running(rejecting, handle), running(skipping, handle_skipping):
        await wait_until(
            lambda: (
                rejecting.stats.handled + rejecting.stats.dead_lettered_total == 2
                and skipping.stats.handled + skipping.counters["duplicates"] == 2
            )
        )
    assert ledger.done == {b"original": 1}
    assert rejecting.stats.dead_lettered == {Reason.REPLAYED: 1}
    assert rejecting.counters.rejected == {"replayed": 1}
    assert rejecting.counters["verified"] == 1

    assert skip_ledger.done == {b"original": 1}
    assert skipping.stats.dead_lettered_total == 0
    assert skipping.counters["duplicates"] == 1 and skipping.counters["replayed"] == 1
    assert skipping.counters.rejected == {}

    [dead] = await read_topic(kafka_bootstrap, f"{topic}.dlq", 1)
    verdict = headers_of(dead)
    assert dead.key == b"copy" and dead.value == sealed.value
    assert verdict[H_REASON] == b"replayed"
    assert verdict[H_DESTINATION] == kafka_destination(topic).encode()
    assert verdict[H_ATTEMPTS] == b"1"
    assert verdict[H_SOURCE] == kafka_destination(topic).encode()
    assert verdict[H_CONSUMER] == f"{unique_name}-r".encode()
    ledger.account(dead=[dead])
    skip_ledger.account(dead=[], skipped=[b"copy"])
    # Both groups committed both records.
    assert await committed(kafka_bootstrap, f"{unique_name}-r", topic) == 2
    assert await committed(kafka_bootstrap, f"{unique_name}-s", topic) == 2


# --------------------------------------------------------------------------- #
# (c) retries through the retry topic, without stalling the main topic
# --------------------------------------------------------------------------- #


async def test_a_flaky_handler_is_retried_through_the_retry_topic_without_stalling(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, int], unique_name: str
) -> None:
    topic, group = f"{unique_name}-orders", f"{unique_name}-svc"
    delay = 0.6  # long enough to tell "waited" from "not blocked"
    flaky = seal(topic, "flaky")
    later = seal(topic, "later")
    ledger = Ledger()
    ledger.sent = await publish(kafka_bootstrap, topic, [(b"flaky", flaky, 0)])
    times: dict[tuple[bytes, int], float] = {}
    consumer = make_consumer(
        kafka_bootstrap, kafka_consumer_options, topic, group, retry_delay=delay
    )

    async def handle(delivery: KafkaDelivery) -> None:
        key = ledger.saw(delivery)
        times[key, delivery.attempt] = time.monotonic()
        if key == b"flaky" and delivery.attempt == 1:
            # Published after the failure, on the same partition: not held up.
            ledger.sent |= await publish(kafka_bootstrap, topic, [(b"later", later, 0)])
        if key == b"flaky" and delivery.attempt < 3:
            raise RuntimeError(f"attempt {delivery.attempt} fails")
        ledger.done[key] += 1

    async with running(consumer, handle):
        await wait_until(lambda: consumer.stats.handled == 2)
        await asyncio.sleep(0.3)
    assert ledger.calls(b"flaky") == [
        (DeliveryKind.FIRST, 1),
        (DeliveryKind.RETRY, 2),
        (DeliveryKind.RETRY, 3),
    ]
    assert ledger.calls(b"later") == [(DeliveryKind.FIRST, 1)]
    assert ledger.done == {b"flaky": 1, b"later": 1}
    # The retry waited its delay; the later record did not wait for it.
    assert times[b"flaky", 2] - times[b"flaky", 1] >= delay * 0.9
    assert times[b"flaky", 3] - times[b"flaky", 2] >= delay * 0.9
    assert times[b"later", 1] < times[b"flaky", 2]
    assert times[b"later", 1] - times[b"flaky", 1] < delay
    assert consumer.counters["retried"] == 2 == consumer.stats.retried
    assert consumer.counters["verified"] == 4  # flaky x3 (first + 2 retries), later
    assert consumer.counters.rejected == {}
    assert consumer.stats.dead_lettered_total == 0

    copies = await read_topic(kafka_bootstrap, f"{topic}.retry", 2)
    original = f"{topic}/0/{ledger.sent[b'flaky'][2]}".encode()
    for number, copy in enumerate(copies, start=2):
        assert copy.key == b"flaky" and copy.value == flaky.value
        assert [h for h in copy.headers if not h[0].startswith("trusthop-")] == flaky.headers
        meta = headers_of(copy)
        assert meta[H_RETRY] == str(number).encode()
        assert meta[H_ORIGINAL] == original
        assert meta[H_ATTEMPTS] == str(number - 1).encode()
        assert meta[H_NOT_BEFORE] is not None and int(meta[H_NOT_BEFORE]) > copy.timestamp
    ledger.account(dead=[])
    assert await committed(kafka_bootstrap, group, topic) == 2


# --------------------------------------------------------------------------- #
# (d) a handler that always fails: handler_failed after max_attempts
# --------------------------------------------------------------------------- #


async def test_a_handler_that_always_fails_is_dead_lettered_after_max_attempts(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, int], unique_name: str
) -> None:
    topic, group = f"{unique_name}-orders", f"{unique_name}-svc"
    poison = seal(topic, "poison")
    ledger = Ledger()
    ledger.sent = await publish(kafka_bootstrap, topic, [(b"poison", poison, None)])
    consumer = make_consumer(kafka_bootstrap, kafka_consumer_options, topic, group, max_attempts=3)

    async def handle(delivery: KafkaDelivery) -> None:
        ledger.saw(delivery)
        raise RuntimeError("no stock")

    async with running(consumer, handle):
        await wait_until(lambda: consumer.stats.dead_lettered_total == 1)
    assert [attempt for _, attempt in ledger.calls(b"poison")] == [1, 2, 3]
    assert consumer.stats.dead_lettered == {Reason.HANDLER_FAILED: 1}
    assert consumer.counters.rejected == {"handler_failed": 1}
    assert consumer.counters["retried"] == 2

    # The dead letter goes to <topic>.dlq (not <topic>.retry.dlq).
    [dead] = await read_topic(kafka_bootstrap, f"{topic}.dlq", 1)
    verdict = headers_of(dead)
    assert dead.key == b"poison" and dead.value == poison.value
    assert verdict[H_REASON] == b"handler_failed"
    assert verdict[H_ATTEMPTS] == b"3"
    assert verdict[H_DETAIL] == b"RuntimeError: no stock"
    assert verdict[H_DESTINATION] == kafka_destination(topic).encode()
    assert verdict[H_SOURCE] == kafka_destination(f"{topic}.retry").encode()
    _, partition, offset = ledger.sent[b"poison"]
    assert verdict[H_ORIGINAL] == f"{topic}/{partition}/{offset}".encode()
    # Its chain is unchanged: it still verifies for the topic it was sent to.
    clean = [h for h in dead.headers if not h[0].startswith("trusthop-")]
    verify_record(ChainVerifier(BUNDLE), topic=topic, headers=clean, value=dead.value)
    ledger.account(dead=[dead])


# --------------------------------------------------------------------------- #
# (e) a retry that waits past max_age is still handled; a fresh old event is not
# --------------------------------------------------------------------------- #


async def test_a_retry_waiting_past_max_age_is_handled_an_old_first_delivery_expires(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, int], unique_name: str
) -> None:
    topic, group = f"{unique_name}-orders", f"{unique_name}-svc"
    limits = Limits(max_age=1, leeway=1)  # a first delivery is accepted 1 to 2 s after signing
    verifier = ChainVerifier(BUNDLE, limits=limits)
    consumer = make_consumer(
        kafka_bootstrap, kafka_consumer_options, topic, group, verifier=verifier, retry_delay=2.5
    )
    ledger = Ledger()
    fresh_checks: list[Reason] = []

    async def handle(delivery: KafkaDelivery) -> None:
        key = ledger.saw(delivery)
        if delivery.attempt == 1:
            raise RuntimeError("try again later")
        # Judged now, as a first delivery, it would be too old.
        try:
            ChainVerifier(BUNDLE, limits=limits).verify(delivery.wire, kafka_destination(topic))
        except TrustError as error:
            fresh_checks.append(error.reason)
        ledger.done[key] += 1

    async with running(consumer, handle):
        await assigned(consumer, topic=topic)  # so that the fresh event is consumed at once
        ledger.sent = await publish(
            kafka_bootstrap,
            topic,
            [(b"fresh", seal(topic, "fresh"), 0), (b"old", seal(topic, "old", age=10), 0)],
        )
        await wait_until(lambda: consumer.stats.handled + consumer.stats.dead_lettered_total == 2)
    assert ledger.calls(b"fresh") == [(DeliveryKind.FIRST, 1), (DeliveryKind.RETRY, 2)]
    assert fresh_checks == [Reason.EXPIRED]
    assert ledger.calls(b"old") == []
    assert consumer.stats.dead_lettered == {Reason.EXPIRED: 1}
    [dead] = await read_topic(kafka_bootstrap, f"{topic}.dlq", 1)
    assert dead.key == b"old"
    assert headers_of(dead)[H_REASON] == b"expired"
    ledger.account(dead=[dead])


# --------------------------------------------------------------------------- #
# (f) a revocation between deliveries: caught on the retry and on the redelivery
# --------------------------------------------------------------------------- #


async def test_a_revocation_before_a_retry_or_a_redelivery_is_caught(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, int], unique_name: str
) -> None:
    topic, group = f"{unique_name}-orders", f"{unique_name}-svc"
    ledger = Ledger()
    ledger.sent = await publish(
        kafka_bootstrap,
        topic,
        [(b"retried", seal(topic, "retried"), 0), (b"redelivered", seal(topic, "redelivered"), 0)],
    )
    verifier = ChainVerifier(BUNDLE)
    consumer = make_consumer(
        kafka_bootstrap, kafka_consumer_options, topic, group, verifier=verifier
    )
    await consumer.start()

    async def first_pass(delivery: KafkaDelivery) -> None:
        key = ledger.saw(delivery)
        if key == b"retried":
            raise RuntimeError("retry me")  # a retry is now pending
        verifier.bundle = REVOKED  # the actor is revoked after its first delivery...
        raise Crash  # ...and this record is left uncommitted

    with pytest.raises(Crash):
        await asyncio.wait_for(consumer.run(first_pass), TIMEOUT)

    async def second_pass(delivery: KafkaDelivery) -> None:
        ledger.saw(delivery)
        ledger.done[bytes(delivery.record.key)] += 1

    runner = asyncio.create_task(consumer.run(second_pass))
    try:
        await wait_until(lambda: consumer.stats.dead_lettered_total == 2)
    finally:
        await consumer.stop()
        await asyncio.wait_for(runner, 15)
    assert ledger.seen == [
        (b"retried", DeliveryKind.FIRST, 1),
        (b"redelivered", DeliveryKind.FIRST, 1),
    ]  # neither reached a handler again
    assert consumer.stats.dead_lettered == {Reason.REVOKED: 2}
    assert consumer.counters.rejected == {"revoked": 2}
    dead = {r.key: r for r in await read_topic(kafka_bootstrap, f"{topic}.dlq", 2)}
    retried, redelivered = headers_of(dead[b"retried"]), headers_of(dead[b"redelivered"])
    assert retried[H_REASON] == redelivered[H_REASON] == b"revoked"
    assert retried[H_SOURCE] == kafka_destination(f"{topic}.retry").encode()
    assert retried[H_ATTEMPTS] == b"2"
    assert retried[H_ORIGINAL] == f"{topic}/0/{ledger.sent[b'retried'][2]}".encode()
    assert redelivered[H_SOURCE] == kafka_destination(topic).encode()
    assert redelivered[H_ATTEMPTS] == b"1"
    for verdict in (retried, redelivered):
        assert verdict[H_DESTINATION] == kafka_destination(topic).encode()
    ledger.account(dead=list(dead.values()))


# --------------------------------------------------------------------------- #
# (g) two replicas sharing Redis: one of two copies on their partitions
# --------------------------------------------------------------------------- #


async def test_two_replicas_sharing_redis_accept_one_of_two_copies(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, int], redis_url: str, unique_name: str
) -> None:
    from trusthop.stores.redis import RedisReplayStore

    topic, group = f"{unique_name}-orders", f"{unique_name}-svc"
    prefix = f"trusthop-test:{unique_name}:"
    stores = [RedisReplayStore.from_url(redis_url, prefix=prefix) for _ in range(2)]
    replicas = [
        make_consumer(kafka_bootstrap, kafka_consumer_options, topic, group, replay_store=store)
        for store in stores
    ]
    ledger = Ledger()
    handled_by: list[int] = []

    def handler(index: int) -> Handler:
        async def handle(delivery: KafkaDelivery) -> None:
            ledger.done[ledger.saw(delivery)] += 1
            handled_by.append(index)

        return handle

    sealed = seal(topic, "shared")
    try:
        async with running(replicas[0], handler(0)), running(replicas[1], handler(1)):
            owned = await assigned(*replicas, topic=topic)
            # One copy on a partition of each replica.
            ledger.sent = await publish(
                kafka_bootstrap,
                topic,
                [(b"one", sealed, min(owned[0])), (b"two", sealed, min(owned[1]))],
            )
            await wait_until(
                lambda: sum(r.stats.handled + r.stats.dead_lettered_total for r in replicas) == 2
            )
            await asyncio.sleep(0.3)
    finally:
        for store in stores:
            await store.aclose()
    assert sum(ledger.done.values()) == 1 and len(handled_by) == 1
    # Each replica settled the copy on its own partition.
    assert [r.stats.handled + r.stats.dead_lettered_total for r in replicas] == [1, 1]
    assert sum(r.stats.dead_lettered[Reason.REPLAYED] for r in replicas) == 1
    [dead] = await read_topic(kafka_bootstrap, f"{topic}.dlq", 1)
    assert headers_of(dead)[H_REASON] == b"replayed"
    assert dead.key != ledger.seen[0][0]
    ledger.account(dead=[dead])


# --------------------------------------------------------------------------- #
# (h) fan-out to two groups; bounded multi-use
# --------------------------------------------------------------------------- #


async def test_each_group_verifies_on_its_own_and_max_uses_bounds_copies(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, int], unique_name: str
) -> None:
    topic = f"{unique_name}-orders"
    sealed = seal(topic, "broadcast")
    sent = await publish(
        kafka_bootstrap, topic, [(b"c1", sealed, 0), (b"c2", sealed, 0), (b"c3", sealed, 0)]
    )
    store = MemoryReplayStore()  # one store for both groups: scopes keep them apart
    single_group, multi_group = f"{unique_name}-single", f"{unique_name}-multi"
    single = make_consumer(
        kafka_bootstrap, kafka_consumer_options, topic, single_group, replay_store=store
    )
    multi = make_consumer(
        kafka_bootstrap,
        kafka_consumer_options,
        topic,
        multi_group,
        replay_store=store,
        max_uses=2,
    )
    ledgers = {single_group: Ledger(sent=dict(sent)), multi_group: Ledger(sent=dict(sent))}

    def handler(group: str) -> Handler:
        async def handle(delivery: KafkaDelivery) -> None:
            ledger = ledgers[group]
            ledger.done[ledger.saw(delivery)] += 1

        return handle

    async with running(single, handler(single_group)), running(multi, handler(multi_group)):
        await wait_until(
            lambda: all(c.stats.handled + c.stats.dead_lettered_total == 3 for c in (single, multi))
        )
    assert ledgers[single_group].done == {b"c1": 1}
    assert ledgers[multi_group].done == {b"c1": 1, b"c2": 1}
    assert single.counters["verified"] == 1 and single.counters.rejected == {"replayed": 2}
    assert multi.counters["verified"] == 2 and multi.counters.rejected == {"replayed": 1}
    dead = await read_topic(kafka_bootstrap, f"{topic}.dlq", 3)
    by_group: dict[bytes | None, list[Any]] = defaultdict(list)
    for record in dead:
        assert headers_of(record)[H_REASON] == b"replayed"
        by_group[headers_of(record)[H_CONSUMER]].append(record)
    assert sorted(r.key for r in by_group[single_group.encode()]) == [b"c2", b"c3"]
    assert [r.key for r in by_group[multi_group.encode()]] == [b"c3"]
    ledgers[single_group].account(dead=by_group[single_group.encode()])
    ledgers[multi_group].account(dead=by_group[multi_group.encode()])


# --------------------------------------------------------------------------- #
# (i) killed mid-batch, restarted: nothing lost, nothing handled twice
# --------------------------------------------------------------------------- #


async def test_a_consumer_killed_mid_batch_and_restarted_loses_nothing(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, int], unique_name: str
) -> None:
    topic, group = f"{unique_name}-orders", f"{unique_name}-svc"
    good = {f"k{i:02d}".encode(): seal(topic, f"k{i:02d}") for i in range(12)}
    tampered = seal(topic, "tampered")
    tampered = tampered._replace(value=tampered.value.replace(b"tampered", b"tampereD"))
    batch: list[tuple[bytes, KafkaRecord, int | None]] = [(k, r, None) for k, r in good.items()]
    batch += [(b"tampered", tampered, None), (b"copy", good[b"k03"], None)]
    ledger = Ledger()
    ledger.sent = await publish(kafka_bootstrap, topic, batch)
    store = MemoryReplayStore()
    flaky = b"k07"  # fails once: goes through the retry topic, whoever consumes it

    first = make_consumer(kafka_bootstrap, kafka_consumer_options, topic, group, replay_store=store)
    in_flight: list[bytes] = []
    stuck = asyncio.Event()

    async def handle_then_hang(delivery: KafkaDelivery) -> None:
        key = ledger.saw(delivery)
        if sum(ledger.done.values()) == 5:
            in_flight.append(key)
            stuck.set()
            await asyncio.Event().wait()  # killed here
        if key == flaky and delivery.attempt == 1:
            raise RuntimeError("flaky")
        ledger.done[key] += 1

    await first.start()
    runner = asyncio.create_task(first.run(handle_then_hang))
    await asyncio.wait_for(stuck.wait(), TIMEOUT)
    runner.cancel()  # the kill: the record in flight is never committed
    with pytest.raises(asyncio.CancelledError):
        await runner
    await first.stop()

    second = make_consumer(
        kafka_bootstrap, kafka_consumer_options, topic, group, replay_store=store
    )
    after_restart: list[tuple[bytes, DeliveryKind]] = []

    async def handle(delivery: KafkaDelivery) -> None:
        key = ledger.saw(delivery)
        after_restart.append((key, delivery.kind))
        if key == flaky and delivery.attempt == 1:
            raise RuntimeError("flaky")
        ledger.done[key] += 1

    dead_total = 2  # the tampered record, and one of k03 and its copy (replayed)

    def settled() -> bool:
        dead = first.stats.dead_lettered_total + second.stats.dead_lettered_total
        return sum(ledger.done.values()) + dead == len(ledger.sent)

    async with running(second, handle):
        await wait_until(settled)
        await asyncio.sleep(0.5)  # nothing more comes
    dead = await read_topic(kafka_bootstrap, f"{topic}.dlq", dead_total)
    reasons = {r.key: headers_of(r)[H_REASON] for r in dead}
    assert reasons.pop(b"tampered") not in (None, b"replayed")
    assert list(reasons.values()) == [b"replayed"]
    assert set(reasons) < {b"k03", b"copy"}
    ledger.account(dead=dead)
    # The record in flight came again to the restarted consumer, as a redelivery.
    [key] = in_flight
    assert next(kind for k, kind in after_restart if k == key) is DeliveryKind.REDELIVERY
    assert [k for k, kind in after_restart if kind is DeliveryKind.REDELIVERY] == [key]
    assert second.counters["redelivered"] == 1
    assert first.counters["redelivered"] == 0
    assert (first.counters["retried"] + second.counters["retried"]) == 1


# --------------------------------------------------------------------------- #
# (j) a rebalance mid-handler: the record in flight commits before it moves
# --------------------------------------------------------------------------- #


async def test_a_rebalance_mid_handler_lets_the_record_commit_before_the_partitions_move(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, int], unique_name: str
) -> None:
    topic, group = f"{unique_name}-orders", f"{unique_name}-svc"
    store = MemoryReplayStore()  # shared: a second delivery would show as a redelivery
    members = [
        make_consumer(kafka_bootstrap, kafka_consumer_options, topic, group, replay_store=store)
        for _ in range(2)
    ]
    ledger = Ledger()
    started = asyncio.Event()

    async def slow(delivery: KafkaDelivery) -> None:
        key = ledger.saw(delivery)
        started.set()
        await asyncio.sleep(1.5)  # the second member joins meanwhile
        ledger.done[key] += 1

    async with running(members[0], slow):
        await assigned(members[0], topic=topic)
        ledger.sent = await publish(kafka_bootstrap, topic, [(b"slow", seal(topic, "slow"), 0)])
        await asyncio.wait_for(started.wait(), TIMEOUT)
        async with running(members[1], slow):
            await assigned(*members, topic=topic)  # the rebalance is over
            await wait_until(lambda: members[0].stats.handled == 1)
            await asyncio.sleep(0.5)  # a redelivery, if any, would come now
    assert ledger.calls(b"slow") == [(DeliveryKind.FIRST, 1)]
    assert members[0].stats.commit_failures == 0
    assert await committed(kafka_bootstrap, group, topic) == 1
    ledger.account(dead=[])
