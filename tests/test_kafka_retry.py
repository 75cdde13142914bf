"""Replay rules, retry topics and rebalances of the Kafka consumer, without a broker.

* the retry headers: written by :func:`trusthop.kafka.retry_headers`, parsed
  strictly (anything but the exact form is "no retry"), hypothesis included;
* the consumer against an in-memory broker stand-in (topics, partitions,
  pause/resume, seeks, commits; retry copies written by the dead-letter
  producer come back on the retry topic):
  a retry copy not due pauses only its partition; a forged retry number is
  ``replayed``; a replay store failure while scheduling a retry dead-letters
  ``store_unavailable``; ``async for`` sees a rewound record as a
  redelivery; the revoke listener drops held partitions and lets the record
  in flight commit first (bounded);
* the constructor: defaults, refusals, the store check on start.

The same behaviour on a real broker is in ``integration/test_kafka_replay.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from chainkit import BUNDLE, EDGE, NOW, S0, T0
from cloudevents.core.v1.event import CloudEvent
from hypothesis import given
from hypothesis import strategies as st

import trusthop.kafka.consumer as consumer_module
from trusthop.errors import Reason
from trusthop.kafka import (
    DEFAULT_IN_PROCESS_RETRY_DELAY,
    DEFAULT_RETRY_DELAY,
    H_NOT_BEFORE,
    H_ORIGINAL,
    H_RETRY,
    MAX_RETRY_ATTEMPT,
    KafkaDelivery,
    TrustedKafkaConsumer,
    TrustedKafkaProducer,
    dead_letter_headers,
    parse_not_before,
    parse_original,
    parse_retry_attempt,
    retry_headers,
    signed_destination,
)
from trusthop.pipeline import (
    H_ATTEMPTS,
    H_DESTINATION,
    H_DETAIL,
    H_REASON,
    H_SOURCE,
    ChainSigner,
    ChainVerifier,
    Rejection,
)
from trusthop.replay import DeliveryKind
from trusthop.sign import mint_origin
from trusthop.stores.base import Change, StoreError
from trusthop.stores.memory import MemoryReplayStore
from trusthop.verify import Limits

TOPIC = "orders"
RETRY = "orders.retry"
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
SEALER = TrustedKafkaProducer(signer=ChainSigner(EDGE, clock=clock), producer=object())


def sealed(event_id: str) -> Any:
    event = CloudEvent(
        {
            "id": event_id,
            "source": "/shop/orders",
            "type": "order.placed",
            "specversion": "1.0",
            "datacontenttype": "application/json",
        },
        {"order": event_id},
    )
    return SEALER.seal(TOPIC, event, origin=ORIGIN)


def record(
    topic: str,
    partition: int,
    offset: int,
    headers: Sequence[tuple[str, bytes | None]],
    value: bytes | None,
    key: bytes | None = None,
) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp=int(time.time() * 1000),
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=-1,
        serialized_value_size=-1,
        headers=tuple(headers),
    )


# --------------------------------------------------------------------------- #
# retry headers
# --------------------------------------------------------------------------- #


def test_retry_headers_keep_the_event_and_add_the_retry_fields() -> None:
    original = [("ce_id", b"e1"), ("trusthop-reason", b"forged"), ("x", None), ("x", b"2")]
    headers = retry_headers(original, attempt=3, not_before_ms=1234, first="orders/2/7", attempts=2)
    assert headers == [
        ("ce_id", b"e1"),
        ("x", None),
        ("x", b"2"),
        (H_RETRY, b"3"),
        (H_NOT_BEFORE, b"1234"),
        (H_ORIGINAL, b"orders/2/7"),
        (H_ATTEMPTS, b"2"),
    ]
    assert parse_retry_attempt(headers) == 3
    assert parse_not_before(headers) == 1.234
    assert parse_original(headers) == "orders/2/7"
    for attempt in (0, 1, MAX_RETRY_ATTEMPT + 1):
        with pytest.raises(ValueError, match="attempt"):
            retry_headers([], attempt=attempt, not_before_ms=0, first="t/0/0", attempts=1)
    with pytest.raises(ValueError, match="negative"):
        retry_headers([], attempt=2, not_before_ms=-1, first="t/0/0", attempts=1)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(H_RETRY, b"2")], 2),
        ([(H_RETRY, b"1000")], 1000),
        ([(H_RETRY, b"1")], 1),  # parsed; admission rejects it (no retry 1 is ever pending)
        ([], 0),
        ([(H_RETRY, None)], 0),
        ([(H_RETRY, b"")], 0),
        ([(H_RETRY, b"1001")], 0),
        ([(H_RETRY, b"99999999999999999999")], 0),
        ([(H_RETRY, b"0")], 0),
        ([(H_RETRY, b"02")], 0),
        ([(H_RETRY, b"+2")], 0),
        ([(H_RETRY, b"-2")], 0),
        ([(H_RETRY, b" 2")], 0),
        ([(H_RETRY, b"2\n")], 0),
        ([(H_RETRY, b"1e3")], 0),
        ([(H_RETRY, "٢".encode())], 0),  # a non-ASCII digit int() would take
        ([(H_RETRY, b"2"), (H_RETRY, b"2")], 0),  # repeated
        ([("TRUSTHOP-RETRY", b"2")], 0),  # the consumer writes it in lower case only
    ],
)
def test_the_retry_number_is_parsed_strictly(
    headers: list[tuple[str, bytes | None]], expected: int
) -> None:
    assert parse_retry_attempt(headers) == expected


@given(
    st.lists(
        st.tuples(
            st.sampled_from([H_RETRY, H_NOT_BEFORE, H_ORIGINAL, "x"]),
            st.one_of(st.none(), st.binary(max_size=24)),
        )
    )
)
def test_the_retry_parsers_never_raise(headers: list[tuple[str, bytes | None]]) -> None:
    attempt = parse_retry_attempt(headers)
    assert 0 <= attempt <= MAX_RETRY_ATTEMPT
    due = parse_not_before(headers)
    assert due is None or 0 <= due < 10**14
    original = parse_original(headers)
    assert original is None or original.count("/") == 2


@pytest.mark.parametrize(
    "value", [b"", b"-1", b"1.5", b"12345678901234567", b" 1", b"\xff", b"1e3"]
)
def test_a_malformed_not_before_means_due_now(value: bytes) -> None:
    assert parse_not_before([(H_NOT_BEFORE, value)]) is None
    assert parse_not_before([(H_NOT_BEFORE, b"5"), (H_NOT_BEFORE, b"5")]) is None


@pytest.mark.parametrize(
    "value", [b"orders/0", b"orders/a/1", b"or ders/0/1", b"o/0/1/2", b"/0/1", "ü/0/1".encode()]
)
def test_a_malformed_original_is_ignored(value: bytes) -> None:
    assert parse_original([(H_ORIGINAL, value)]) is None


def test_signed_destination_names_the_newest_ring_or_nothing() -> None:
    record_ = sealed("evt-dest")
    wire = consumer_module.decode_record(record_.headers, record_.value)
    assert signed_destination(wire, Limits()) == "kafka:orders"
    assert signed_destination(None, Limits()) is None
    wire.chain = "not a chain"
    assert signed_destination(wire, Limits()) is None
    wire.chain = None
    assert signed_destination(wire, Limits()) is None


def test_a_dead_letter_of_a_retry_copy_names_the_first_record() -> None:
    rejection = Rejection(Reason.REVOKED, "r", "kafka:orders.retry", GROUP, 2, "kafka:orders")
    headers = dead_letter_headers([(H_ORIGINAL, b"forged/0/0")], rejection, first="orders/1/5")
    assert headers[-1] == (H_ORIGINAL, b"orders/1/5")
    assert [v for k, v in headers if k == H_ORIGINAL] == [b"orders/1/5"]
    assert dict(headers)[H_DESTINATION] == b"kafka:orders"


# --------------------------------------------------------------------------- #
# an in-memory broker
# --------------------------------------------------------------------------- #


class Broker:
    """``AIOKafkaConsumer`` stand-in over several topic-partitions: fetch
    positions, pause/resume, seeks, commits, and records appended later."""

    def __init__(self, records: Iterable[ConsumerRecord[bytes, bytes]] = ()) -> None:
        self.log: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        self.position: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()
        self.commits: list[dict[TopicPartition, int]] = []
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.listener: Any = None
        self.subscribed: list[str] = []
        self.started = self.stopped = False
        for r in records:
            self.add(r)

    def add(self, r: ConsumerRecord[bytes, bytes]) -> None:
        tp = TopicPartition(r.topic, r.partition)
        self.log.setdefault(tp, []).append(r)
        self.position.setdefault(tp, 0)

    def append(
        self, topic: str, value: bytes | None, key: bytes | None, headers: list[Any]
    ) -> ConsumerRecord[bytes, bytes]:
        tp = TopicPartition(topic, 0)
        r = record(topic, 0, len(self.log.get(tp, [])), headers, value, key)
        self.add(r)
        return r

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.subscribed = list(topics)
        self.listener = listener

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    def assignment(self) -> set[TopicPartition]:
        return set(self.log)

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused.difference_update(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))
        self.position[tp] = offset

    async def getmany(self, timeout_ms: int = 0) -> dict[TopicPartition, list[Any]]:
        out = {}
        for tp, records in self.log.items():
            if tp in self.paused:
                continue
            pending = records[self.position[tp] :]
            if pending:
                out[tp] = pending
                self.position[tp] = len(records)
        if not out:
            await asyncio.sleep(timeout_ms / 1000)
        return out

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))

    def committed(self, topic: str, partition: int = 0) -> int | None:
        done = [c[tp] for c in self.commits for tp in c if tp == TopicPartition(topic, partition)]
        return max(done) if done else None


class Producer:
    """Dead-letter producer stand-in: what it sends to a retry topic comes
    back on the broker."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.sent: list[tuple[str, bytes | None, bytes | None, list[Any]]] = []

    async def send_and_wait(
        self, topic: str, *, value: bytes | None, key: bytes | None, headers: list[Any]
    ) -> None:
        self.sent.append((topic, key, value, headers))
        if topic.endswith(".retry"):
            self.broker.append(topic, value, key, headers)

    def to(self, topic: str) -> list[tuple[bytes | None, dict[str, bytes | None]]]:
        return [(key, dict(headers)) for t, key, _, headers in self.sent if t == topic]


async def on_broker(
    records: Iterable[ConsumerRecord[bytes, bytes]], **kwargs: Any
) -> tuple[TrustedKafkaConsumer, Broker, Producer]:
    broker = Broker(records)
    producer = Producer(broker)
    kwargs.setdefault("verifier", VERIFIER)
    consumer = TrustedKafkaConsumer(
        TOPIC, group_id=GROUP, dead_letter_producer=producer, poll_timeout_ms=10, **kwargs
    )
    consumer._consumer = broker  # the stand-in replaces the aiokafka client
    await consumer.start()
    return consumer, broker, producer


def main(offset: int, event_id: str, partition: int = 0) -> ConsumerRecord[bytes, bytes]:
    r = sealed(event_id)
    return record(TOPIC, partition, offset, r.headers, r.value, event_id.encode())


# --------------------------------------------------------------------------- #
# retry topics
# --------------------------------------------------------------------------- #


async def test_a_retry_not_due_pauses_only_its_partition() -> None:
    consumer, broker, producer = await on_broker([main(0, "a")], retry_delay=0.3)
    assert broker.subscribed == [TOPIC, RETRY]
    calls: list[tuple[bytes, DeliveryKind, int, float]] = []

    async def handle(delivery: KafkaDelivery) -> None:
        key = bytes(delivery.record.key)
        calls.append((key, delivery.kind, delivery.attempt, time.monotonic()))
        if key == b"a" and delivery.attempt == 1:
            broker.add(main(1, "b"))  # arrives while the retry waits
            raise RuntimeError("not yet")
        assert delivery.topic_base == TOPIC
        assert delivery.redelivered is (delivery.kind is DeliveryKind.RETRY)

    assert await asyncio.wait_for(consumer.run(handle, limit=3), 5) == 3
    assert [c[:3] for c in calls] == [
        (b"a", DeliveryKind.FIRST, 1),
        (b"b", DeliveryKind.FIRST, 1),
        (b"a", DeliveryKind.RETRY, 2),
    ]
    assert calls[2][3] - calls[0][3] >= 0.25  # the retry waited...
    assert calls[1][3] - calls[0][3] < 0.2  # ...the main topic did not
    retry_tp = TopicPartition(RETRY, 0)
    assert (retry_tp, 0) in broker.seeks  # rewound to the held copy, paused, resumed
    assert broker.paused == set()
    [(key, headers)] = producer.to(RETRY)
    assert key == b"a"
    assert headers[H_RETRY] == b"2" and headers[H_ATTEMPTS] == b"1"
    assert headers[H_ORIGINAL] == b"orders/0/0"
    assert broker.committed(TOPIC) == 2 and broker.committed(RETRY) == 1
    # The copy was committed only after it had been written.
    assert consumer.stats.retried == 1 == consumer.counters["retried"]
    assert consumer.counters["verified"] == 3
    assert consumer.stats.handled == 2


async def test_a_forged_or_malformed_retry_number_is_replayed() -> None:
    a = sealed("a")
    forged = record(RETRY, 0, 0, [*a.headers, (H_RETRY, b"2")], a.value, b"forged")
    malformed = record(RETRY, 0, 1, [*a.headers, (H_RETRY, b"02")], a.value, b"malformed")
    first = record(TOPIC, 0, 0, a.headers, a.value, b"a")
    consumer, broker, producer = await on_broker([first, forged, malformed])
    handled: list[bytes] = []

    async def handle(delivery: KafkaDelivery) -> None:
        handled.append(bytes(delivery.record.key))

    assert await asyncio.wait_for(consumer.run(handle, limit=3), 5) == 3
    assert handled == [b"a"]
    letters = producer.to("orders.dlq")
    assert [key for key, _ in letters] == [b"forged", b"malformed"]
    expected = [(b"2", b"orders.retry/0/0"), (b"1", b"orders.retry/0/1")]
    for (_, verdict), (attempts, original) in zip(letters, expected, strict=True):
        assert verdict[H_REASON] == b"replayed"
        assert verdict[H_SOURCE] == b"kafka:orders.retry"
        assert verdict[H_DESTINATION] == b"kafka:orders"
        assert verdict[H_ATTEMPTS] == attempts
        assert verdict[H_ORIGINAL] == original  # no trusthop-original of its own: itself
    assert consumer.counters.rejected == {"replayed": 2}
    assert broker.committed(RETRY) == 2


async def test_max_attempts_dead_letters_handler_failed_on_the_subscribed_topic() -> None:
    consumer, broker, producer = await on_broker([main(0, "p")], retry_delay=0, max_attempts=2)
    attempts: list[int] = []

    async def handle(delivery: KafkaDelivery) -> None:
        attempts.append(delivery.attempt)
        raise ValueError("no stock")

    assert await asyncio.wait_for(consumer.run(handle, limit=2), 5) == 2
    assert attempts == [1, 2]
    [(key, verdict)] = producer.to("orders.dlq")
    assert key == b"p"
    assert verdict[H_REASON] == b"handler_failed"
    assert verdict[H_ATTEMPTS] == b"2"
    assert verdict[H_DETAIL] == b"ValueError: no stock"
    assert verdict[H_SOURCE] == b"kafka:orders.retry"
    assert verdict[H_DESTINATION] == b"kafka:orders"
    assert verdict[H_ORIGINAL] == b"orders/0/0"
    assert producer.to("orders.retry.dlq") == []
    assert consumer.counters.rejected == {"handler_failed": 1}
    assert broker.committed(TOPIC) == 1 and broker.committed(RETRY) == 1


class FailingStore(MemoryReplayStore):
    """A memory store whose writes fail once ``broken`` is set."""

    broken = False

    async def update(self, key: str, change: Change) -> bytes | None:
        if self.broken:
            raise StoreError("connection reset")
        return await super().update(key, change)


async def test_a_store_failure_while_scheduling_a_retry_dead_letters_store_unavailable() -> None:
    store = FailingStore()
    consumer, broker, producer = await on_broker([main(0, "a")], replay_store=store)

    async def handle(delivery: KafkaDelivery) -> None:
        store.broken = True
        raise RuntimeError("flaky")

    assert await asyncio.wait_for(consumer.run(handle, limit=1), 5) == 1
    assert producer.to(RETRY) == []  # no copy the store does not know of
    [(_, verdict)] = producer.to("orders.dlq")
    assert verdict[H_REASON] == b"store_unavailable"
    assert verdict[H_ATTEMPTS] == b"1"
    assert b"the handler failed with RuntimeError: flaky" in (verdict[H_DETAIL] or b"")
    assert broker.committed(TOPIC) == 1
    assert consumer.counters.rejected == {"store_unavailable": 1}


async def test_without_retry_topics_the_handler_is_retried_in_process() -> None:
    consumer, broker, producer = await on_broker([main(0, "a")], retry_topics=False, retry_delay=0)
    assert broker.subscribed == [TOPIC]
    attempts: list[int] = []

    async def handle(delivery: KafkaDelivery) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt < 3:
            raise RuntimeError("flaky")

    assert await asyncio.wait_for(consumer.run(handle, limit=1), 5) == 1
    assert attempts == [1, 2, 3]
    assert producer.sent == []
    assert consumer.counters["retried"] == 2 == consumer.stats.retried
    assert broker.committed(TOPIC) == 1


# --------------------------------------------------------------------------- #
# redelivery and replays
# --------------------------------------------------------------------------- #


async def test_async_for_sees_a_rewound_record_as_a_redelivery() -> None:
    consumer, broker, _ = await on_broker([main(0, "a")])
    with pytest.raises(RuntimeError, match="body failed"):
        async for delivery in consumer:
            assert delivery.kind is DeliveryKind.FIRST and not delivery.redelivered
            raise RuntimeError("body failed")
    async with asyncio.timeout(5):
        again = await consumer.__aiter__().__anext__()  # a new loop
    assert again.kind is DeliveryKind.REDELIVERY and again.redelivered
    assert again.offset == 0
    await consumer.commit()
    assert broker.committed(TOPIC) == 1
    assert consumer.counters["redelivered"] == 1
    assert consumer.counters["verified"] == 2


async def test_copies_are_replayed_skipped_or_accepted_up_to_max_uses() -> None:
    a = sealed("a")
    copies = [record(TOPIC, 0, i, a.headers, a.value, f"c{i}".encode()) for i in range(3)]

    async def outcome(**kwargs: Any) -> tuple[int, list[bytes | None], dict[str, Any]]:
        consumer, _, producer = await on_broker(copies, **kwargs)
        handled = 0

        async def handle(delivery: KafkaDelivery) -> None:
            nonlocal handled
            handled += 1

        assert await asyncio.wait_for(consumer.run(handle, limit=3), 5) == 3
        letters = [v[H_REASON] for _, v in producer.to("orders.dlq")]
        return handled, letters, consumer.counters.as_dict()

    handled, letters, counters = await outcome()
    assert (handled, letters) == (1, [b"replayed", b"replayed"])
    handled, letters, counters = await outcome(on_replay="skip")
    assert (handled, letters, counters["duplicates"]) == (1, [], 2)
    handled, letters, counters = await outcome(max_uses=2)
    assert (handled, letters) == (2, [b"replayed"])
    handled, letters, counters = await outcome(replay_store=None)
    assert (handled, letters, counters["replayed"]) == (3, [], 0)


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str | None]] = []

    def inc(self, name: str, amount: int = 1, *, reason: str | None = None) -> None:
        self.calls.append((name, amount, reason))


async def test_counters_also_go_to_the_metrics_sink() -> None:
    a = sealed("a")
    copies = [record(TOPIC, 0, i, a.headers, a.value, f"c{i}".encode()) for i in range(2)]
    sink = Sink()
    consumer, _, _ = await on_broker([*copies, main(2, "b")], metrics=sink)

    async def handle(delivery: KafkaDelivery) -> None:
        if delivery.event.get_id() == "b":
            raise RuntimeError("retry")

    assert await asyncio.wait_for(consumer.run(handle, limit=3), 5) == 3
    names = [(name, reason) for name, _, reason in sink.calls if not name.startswith("cache_")]
    assert names == [
        ("verified", None),
        ("rejected", "replayed"),
        ("replayed", None),
        ("verified", None),
        ("retried", None),
    ]
    assert consumer.counters["verified"] == 2


# --------------------------------------------------------------------------- #
# rebalances
# --------------------------------------------------------------------------- #


async def test_revoking_drops_held_partitions_and_lets_the_record_in_flight_commit() -> None:
    consumer, broker, _ = await on_broker([main(0, "a")], retry_delay=30)

    async def fail(delivery: KafkaDelivery) -> None:
        raise RuntimeError("retry later")  # a copy held for 30 s

    assert await asyncio.wait_for(consumer.run(fail, limit=1), 5) == 1
    broker.add(main(0, "b", partition=1))
    gate = asyncio.Event()
    started = asyncio.Event()

    async def handle(delivery: KafkaDelivery) -> None:
        started.set()
        await gate.wait()

    runner = asyncio.create_task(consumer.run(handle))
    await asyncio.wait_for(started.wait(), 5)
    retry_tp, main_tp = TopicPartition(RETRY, 0), TopicPartition(TOPIC, 1)
    assert retry_tp in broker.paused and retry_tp in consumer._holds
    revoking = asyncio.create_task(broker.listener.on_partitions_revoked({retry_tp, main_tp}))
    await asyncio.sleep(0.05)
    assert not revoking.done()  # waits for the record in flight...
    assert consumer._holds == {}  # ...having dropped the held partition already
    assert broker.committed(TOPIC, 1) is None
    gate.set()
    await asyncio.wait_for(revoking, 5)
    assert broker.committed(TOPIC, 1) == 1  # b's commit landed before the revocation ended
    await consumer.stop()
    await asyncio.wait_for(runner, 5)


async def test_the_revoke_listener_waits_a_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer_module, "REVOKE_GRACE", 0.05)
    consumer, broker, _ = await on_broker([main(0, "a")])
    started = asyncio.Event()

    async def hang(delivery: KafkaDelivery) -> None:
        started.set()
        await asyncio.Event().wait()

    runner = asyncio.create_task(consumer.run(hang))
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.wait_for(broker.listener.on_partitions_revoked({TopicPartition(TOPIC, 0)}), 1)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert broker.commits == []


# --------------------------------------------------------------------------- #
# constructor and start
# --------------------------------------------------------------------------- #


async def test_consumer_defaults_and_refusals() -> None:
    one = TrustedKafkaConsumer(TOPIC, "payments", verifier=VERIFIER, group_id=GROUP)
    two = TrustedKafkaConsumer(TOPIC, verifier=VERIFIER, group_id=GROUP)
    assert isinstance(one.replay_store, MemoryReplayStore)
    assert one.replay_store is not two.replay_store  # a fresh store per consumer
    assert one.admission.scope == f"kafka/{GROUP}"
    assert one.subscribed == (TOPIC, "payments", RETRY, "payments.retry")
    assert one.retry_delay == DEFAULT_RETRY_DELAY
    off = TrustedKafkaConsumer(
        TOPIC, verifier=VERIFIER, group_id=GROUP, replay_store=None, retry_topics=False
    )
    assert off.replay_store is None
    assert off.subscribed == (TOPIC,)
    assert off.retry_delay == DEFAULT_IN_PROCESS_RETRY_DELAY
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="retry_delay"):
            TrustedKafkaConsumer(TOPIC, verifier=VERIFIER, group_id=GROUP, retry_delay=bad)
    with pytest.raises(ValueError, match="max_attempts"):
        TrustedKafkaConsumer(
            TOPIC, verifier=VERIFIER, group_id=GROUP, max_attempts=MAX_RETRY_ATTEMPT + 1
        )
    TrustedKafkaConsumer(
        TOPIC,
        verifier=VERIFIER,
        group_id=GROUP,
        max_attempts=MAX_RETRY_ATTEMPT + 1,
        retry_topics=False,
    )
    with pytest.raises(ValueError, match="max_uses"):
        TrustedKafkaConsumer(TOPIC, verifier=VERIFIER, group_id=GROUP, max_uses=0)
    with pytest.raises(ValueError):
        TrustedKafkaConsumer(TOPIC, verifier=VERIFIER, group_id=GROUP, on_replay="ignore")


class CheckedStore(MemoryReplayStore):
    def __init__(self, error: Exception | None) -> None:
        super().__init__()
        self.error = error
        self.checked = 0

    async def check(self) -> None:
        self.checked += 1
        if self.error is not None:
            raise self.error


async def test_start_checks_the_store_first() -> None:
    bad = CheckedStore(StoreError("maxmemory-policy allkeys-lru"))
    broker = Broker()
    consumer = TrustedKafkaConsumer(
        TOPIC, verifier=VERIFIER, group_id=GROUP, replay_store=bad, dead_letter_producer=object()
    )
    consumer._consumer = broker
    with pytest.raises(StoreError, match="allkeys-lru"):
        await consumer.start()
    assert bad.checked == 1 and not broker.started
    good = CheckedStore(None)
    consumer, broker, _ = await on_broker([], replay_store=good)
    assert good.checked == 1 and broker.started
