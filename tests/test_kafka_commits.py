"""Coalesced commits of the Kafka consumer, without a broker: attempts to break them.

The consumer commits the offset after the last settled record of each
partition, once per fetched batch, before fetching, at most every
``commit_interval`` while records flow, on revocation, on ``stop()`` and on
``commit()`` (see :mod:`trusthop.kafka.consumer`). The stand-in broker here
checks, at every commit, that every record below each committed offset was
settled: handled (the handler returned), its retry copy written, or its dead
letter written. What is tried:

* random mixes of handled, flaky (retried through the retry topic), poison
  (``handler_failed``), tampered (``event_mismatch``) and replayed records
  over two partitions, fetched in small batches, for several intervals;
* a crash (a handler that never returns, then the task cancelled, no
  ``stop()``) between handling and the coalesced commit: a new member
  restarting from the committed offsets sees only the uncommitted tail, as
  redeliveries, and nothing settled before the last commit again;
* a rebalance with settled-but-uncommitted offsets: the revoke listener
  commits them (only for the revoked partitions) and forgets them;
* a commit naming a partition that moved, a commit that fails outright
  (sent again), a hostile record in the middle of a batch, ``stop()`` and
  ``commit()`` with settled records before an open delivery.

The same on a real broker: ``integration/test_kafka_coalesced_commits.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import IllegalStateError, KafkaTimeoutError
from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_kafka_retry import GROUP, RETRY, TOPIC, VERIFIER, Broker, Producer, record, sealed

from trusthop.errors import Reason
from trusthop.kafka import KafkaDelivery, TrustedKafkaConsumer
from trusthop.kafka.consumer import DEFAULT_COMMIT_INTERVAL
from trusthop.pipeline import H_REASON, H_SOURCE
from trusthop.replay import DeliveryKind
from trusthop.stores.memory import MemoryReplayStore

DLQ = f"{TOPIC}.dlq"
MAIN0, MAIN1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


class CheckedBroker(Broker):
    """The in-memory broker, fetching at most ``batch`` records per partition,
    that checks every commit against what the outside world has seen settled.

    ``owned`` (when set) are the partitions this member holds: a commit
    naming another raises ``IllegalStateError``, as aiokafka does.
    ``fail_commits`` commits fail with a timeout (nothing committed).
    """

    def __init__(self, records: Iterable[ConsumerRecord[bytes, bytes]], batch: int) -> None:
        super().__init__(records)
        self.batch = batch
        self.handled: set[tuple[str, bytes | None]] = set()
        self.producer: Producer | None = None
        self.violations: list[str] = []
        self.owned: set[TopicPartition] | None = None
        self.fail_commits = 0

    async def getmany(self, timeout_ms: int = 0) -> dict[TopicPartition, list[Any]]:
        out = {}
        for tp, records in self.log.items():
            if tp in self.paused:
                continue
            pending = records[self.position[tp] :][: self.batch]
            if pending:
                out[tp] = pending
                self.position[tp] = pending[-1].offset + 1
        if not out:
            await asyncio.sleep(timeout_ms / 1000)
        return out

    def settled(self, r: ConsumerRecord[bytes, bytes]) -> bool:
        """Handled, or its retry copy or dead letter was written."""
        if (r.topic, r.key) in self.handled:
            return True
        assert self.producer is not None
        for topic, key, _, headers in self.producer.sent:
            if key != r.key:
                continue
            if topic == RETRY and r.topic == TOPIC:
                return True
            if topic == DLQ and dict(headers)[H_SOURCE] == f"kafka:{r.topic}".encode():
                return True
        return False

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        await asyncio.sleep(0)  # a round trip: other tasks run meanwhile
        if self.fail_commits:
            self.fail_commits -= 1
            raise KafkaTimeoutError("coordinator unreachable")
        if self.owned is not None and any(tp not in self.owned for tp in offsets):
            raise IllegalStateError("partition not assigned")
        for tp, offset in offsets.items():
            for r in self.log[tp][:offset]:
                if not self.settled(r):
                    self.violations.append(f"{tp.topic}:{tp.partition}@{offset} before {r.offset}")
        await super().commit(offsets)


async def checked(
    records: Iterable[ConsumerRecord[bytes, bytes]], *, batch: int = 1000, **kwargs: Any
) -> tuple[TrustedKafkaConsumer, CheckedBroker, Producer]:
    broker = CheckedBroker(records, batch)
    producer = Producer(broker)
    broker.producer = producer
    kwargs.setdefault("retry_delay", 0)
    consumer = TrustedKafkaConsumer(
        TOPIC,
        verifier=VERIFIER,
        group_id=GROUP,
        dead_letter_producer=producer,
        poll_timeout_ms=10,
        **kwargs,
    )
    consumer._consumer = broker
    await consumer.start()
    return consumer, broker, producer


def good(offset: int, key: str, partition: int = 0) -> ConsumerRecord[bytes, bytes]:
    r = sealed(key)
    return record(TOPIC, partition, offset, r.headers, r.value, key.encode())


def tampered(offset: int, key: str, partition: int = 0) -> ConsumerRecord[bytes, bytes]:
    r = sealed(key)
    value = r.value.replace(b"}", b', "x": 1}')
    return record(TOPIC, partition, offset, r.headers, value, key.encode())


async def take(consumer: TrustedKafkaConsumer, broker: CheckedBroker, count: int) -> None:
    """``count`` deliveries of ``async for``, each body finished (handled)."""
    for _ in range(count):
        delivery = await consumer.__anext__()
        broker.handled.add((delivery.topic, delivery.record.key))


def committed(broker: Broker, tp: TopicPartition) -> int | None:
    return broker.committed(tp.topic, tp.partition)


# --------------------------------------------------------------------------- #
# never committed before settled, whatever the mix
# --------------------------------------------------------------------------- #

KINDS = st.sampled_from(["ok", "ok", "ok", "flaky", "poison", "tampered", "replay"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(st.tuples(KINDS, st.integers(0, 1)), min_size=1, max_size=24),
    batch=st.integers(1, 7),
    interval=st.sampled_from([0.0, 1e-4, DEFAULT_COMMIT_INTERVAL, 60.0]),
)
def test_no_offset_is_committed_before_its_record_is_settled(
    kinds: list[tuple[str, int]], batch: int, interval: float
) -> None:
    records: list[ConsumerRecord[bytes, bytes]] = []
    offsets = [0, 0]
    sealed_ok: list[Any] = []
    for index, (kind, partition) in enumerate(kinds):
        key, offset = f"{kind}-{index}", offsets[partition]
        offsets[partition] += 1
        if kind == "tampered":
            records.append(tampered(offset, key, partition))
            continue
        if kind == "replay" and sealed_ok:
            r = sealed_ok[0]  # a copy of an accepted event under another key
            records.append(record(TOPIC, partition, offset, r.headers, r.value, key.encode()))
            continue
        r = sealed(key)
        if kind in ("ok", "replay"):
            sealed_ok.append(r)
        records.append(record(TOPIC, partition, offset, r.headers, r.value, key.encode()))
    retried = sum(kind in ("flaky", "poison") for kind, _ in kinds)

    async def scenario() -> None:
        consumer, broker, producer = await checked(
            records, batch=batch, commit_interval=interval, max_attempts=2
        )

        async def handle(delivery: KafkaDelivery) -> None:
            key = bytes(delivery.record.key)
            if key.startswith(b"poison") or (key.startswith(b"flaky") and delivery.attempt == 1):
                raise RuntimeError("not now")
            await asyncio.sleep(0)
            broker.handled.add((delivery.topic, delivery.record.key))

        settled = await asyncio.wait_for(consumer.run(handle, limit=len(records) + retried), 10)
        assert settled == len(records) + retried
        assert broker.violations == []
        # Everything was committed when run() returned, and the counts balance.
        for tp, log in broker.log.items():
            assert committed(broker, tp) == len(log)
        dead = len(producer.to(DLQ))
        assert consumer.stats.handled + dead == len(records)
        await consumer.stop()

    asyncio.run(scenario())


# --------------------------------------------------------------------------- #
# the crash between handling and the coalesced commit
# --------------------------------------------------------------------------- #


async def test_a_crash_before_the_coalesced_commit_redelivers_only_the_tail() -> None:
    records = [good(i, f"e{i}") for i in range(10)]
    store = MemoryReplayStore()  # survives the "crash", as a shared store would
    first, broker, _ = await checked(records, batch=10, commit_interval=60, replay_store=store)
    seen: list[tuple[int, DeliveryKind]] = []
    stuck = asyncio.Event()

    async def handle_then_hang(delivery: KafkaDelivery) -> None:
        seen.append((delivery.offset, delivery.kind))
        if delivery.offset == 6:
            stuck.set()
            await asyncio.Event().wait()  # the process dies here
        broker.handled.add((delivery.topic, delivery.record.key))

    runner = asyncio.create_task(first.run(handle_then_hang))
    await asyncio.wait_for(stuck.wait(), 5)
    runner.cancel()  # no stop(), no final commit
    with pytest.raises(asyncio.CancelledError):
        await runner
    # Offsets 0..5 were handled; the first was committed at once (after a quiet
    # spell), the rest waited for the end of the batch: a crash tail.
    done = committed(broker, MAIN0)
    assert done is not None and 1 <= done <= 6
    assert broker.violations == []

    # A new member of the group resumes from the committed offset.
    broker.position[MAIN0] = done
    second, _, _ = await checked([], replay_store=store)
    second._consumer = broker
    again: list[tuple[int, DeliveryKind]] = []

    async def handle(delivery: KafkaDelivery) -> None:
        again.append((delivery.offset, delivery.kind))
        broker.handled.add((delivery.topic, delivery.record.key))

    assert await asyncio.wait_for(second.run(handle, limit=10 - done), 5) == 10 - done
    assert [o for o, _ in again] == list(range(done, 10))
    # The uncommitted tail (handled or in flight) comes as redeliveries, the rest is new.
    assert all(kind is DeliveryKind.REDELIVERY for o, kind in again if o <= 6)
    assert all(kind is DeliveryKind.FIRST for o, kind in again if o > 6)
    assert committed(broker, MAIN0) == 10
    # Every record handled to completion once, or twice only if in the tail.
    assert {o for o, _ in seen} | {o for o, _ in again} == set(range(10))
    assert second.counters["redelivered"] == 7 - done
    assert broker.violations == []
    await second.stop()


# --------------------------------------------------------------------------- #
# rebalances with settled-but-uncommitted offsets
# --------------------------------------------------------------------------- #


async def test_revocation_commits_the_settled_offsets_of_the_revoked_partitions() -> None:
    records = [good(i, f"a{i}") for i in range(4)] + [good(i, f"b{i}", 1) for i in range(4)]
    consumer, broker, _ = await checked(records, batch=10, commit_interval=60)
    taken = []
    for _ in range(6):  # all of partition 0, two of partition 1: settled, not committed
        delivery = await consumer.__anext__()
        taken.append((delivery.partition, delivery.offset))
        broker.handled.add((delivery.topic, delivery.record.key))
    assert taken == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    before = list(broker.commits)
    await broker.listener.on_partitions_revoked({MAIN0})
    # Only the revoked partition was committed, up to what was settled.
    assert broker.commits[len(before) :] == [{MAIN0: 4}]
    assert MAIN0 not in consumer._settled_up_to and MAIN0 not in consumer._sent
    await consumer.commit()  # the open delivery (1@1) and everything before it
    assert committed(broker, MAIN1) == 2
    assert broker.violations == []
    await consumer.stop()


async def test_revocation_waits_for_the_record_in_flight_then_commits_it() -> None:
    records = [good(i, f"a{i}") for i in range(3)]
    consumer, broker, _ = await checked(records, batch=10, commit_interval=60)
    gate, started = asyncio.Event(), asyncio.Event()

    async def handle(delivery: KafkaDelivery) -> None:
        if delivery.offset == 2:
            started.set()
            await gate.wait()
        broker.handled.add((delivery.topic, delivery.record.key))

    runner = asyncio.create_task(consumer.run(handle))
    await asyncio.wait_for(started.wait(), 5)
    revoking = asyncio.create_task(broker.listener.on_partitions_revoked({MAIN0}))
    await asyncio.sleep(0.05)
    assert not revoking.done()
    gate.set()
    await asyncio.wait_for(revoking, 5)
    assert committed(broker, MAIN0) == 3  # the record in flight included
    assert broker.violations == []
    await consumer.stop()
    await asyncio.wait_for(runner, 5)


async def test_a_commit_naming_a_lost_partition_still_commits_the_others() -> None:
    records = [good(0, "a"), good(0, "b", 1), good(1, "c")]
    consumer, broker, _ = await checked(records, batch=10, commit_interval=60)
    await take(consumer, broker, 3)
    broker.owned = {MAIN0}  # partition 1 moved without this member hearing of it yet
    await consumer.commit()
    assert committed(broker, MAIN0) == 2
    assert committed(broker, MAIN1) is None
    assert consumer.stats.commit_failures == 1
    await consumer.commit()  # a refused partition is not sent again and again
    assert consumer.stats.commit_failures == 1
    await consumer.stop()


async def test_a_failed_commit_is_sent_again_and_raises() -> None:
    records = [good(i, f"a{i}") for i in range(3)]
    consumer, broker, _ = await checked(records, batch=10, commit_interval=60)
    await take(consumer, broker, 3)
    broker.fail_commits = 1
    with pytest.raises(KafkaTimeoutError):
        await consumer.commit()
    assert committed(broker, MAIN0) is not None and committed(broker, MAIN0) < 3
    await consumer.commit()
    assert committed(broker, MAIN0) == 3
    assert consumer.stats.commit_failures == 0
    await consumer.stop()


async def test_stop_after_a_cancelled_run_commits_what_was_handled_not_the_record_in_flight() -> (
    None
):
    records = [good(i, f"a{i}") for i in range(8)]
    consumer, broker, _ = await checked(records, batch=8, commit_interval=60)
    stuck = asyncio.Event()

    async def handle(delivery: KafkaDelivery) -> None:
        if delivery.offset == 4:
            stuck.set()
            await asyncio.Event().wait()
        broker.handled.add((delivery.topic, delivery.record.key))

    runner = asyncio.create_task(consumer.run(handle))
    await asyncio.wait_for(stuck.wait(), 5)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    await consumer.commit()  # and stop(): the same flush
    await consumer.stop()
    assert committed(broker, MAIN0) == 4
    assert broker.violations == []


async def test_stop_commits_what_was_settled_but_never_the_open_delivery() -> None:
    records = [good(i, f"a{i}") for i in range(5)]
    consumer, broker, _ = await checked(records, batch=10, commit_interval=60)
    await take(consumer, broker, 3)
    await consumer.stop()
    assert committed(broker, MAIN0) == 2  # offsets 0 and 1; 2 is the open delivery
    assert broker.violations == []


# --------------------------------------------------------------------------- #
# hostile records in the middle of a batch; the interval itself
# --------------------------------------------------------------------------- #


async def test_a_hostile_record_mid_batch_is_dead_lettered_before_its_offset_is_committed() -> None:
    records = [good(i, f"g{i}") for i in range(5)]
    records += [tampered(5, "bad")]
    records += [record(TOPIC, 0, 6, [("ce_id", b"\xff")], b"junk", b"junk")]
    records += [good(i, f"g{i}") for i in range(7, 12)]
    consumer, broker, producer = await checked(records, batch=12, commit_interval=60)

    async def handle(delivery: KafkaDelivery) -> None:
        broker.handled.add((delivery.topic, delivery.record.key))

    assert await asyncio.wait_for(consumer.run(handle, limit=12), 5) == 12
    assert broker.violations == []
    assert [(k, v[H_REASON]) for k, v in producer.to(DLQ)] == [
        (b"bad", b"event_mismatch"),
        (b"junk", b"malformed"),
    ]
    assert consumer.stats.handled == 10
    assert consumer.stats.dead_lettered == {Reason.EVENT_MISMATCH: 1, Reason.MALFORMED: 1}
    assert committed(broker, MAIN0) == 12
    assert len(broker.commits) <= 4  # one batch: coalesced, not one per record
    await consumer.stop()


async def test_commits_are_coalesced_and_zero_interval_commits_every_record() -> None:
    records = [good(i, f"a{i}") for i in range(20)]

    async def commits_for(interval: float) -> list[dict[TopicPartition, int]]:
        consumer, broker, _ = await checked(records, batch=20, commit_interval=interval)

        async def handle(delivery: KafkaDelivery) -> None:
            broker.handled.add((delivery.topic, delivery.record.key))

        assert await asyncio.wait_for(consumer.run(handle, limit=20), 5) == 20
        assert broker.violations == []
        await consumer.stop()
        return broker.commits

    assert [c[MAIN0] for c in await commits_for(0)] == list(range(1, 21))
    coalesced = [c[MAIN0] for c in await commits_for(60)]
    # At once after a quiet spell, before the last record of the batch, at the end.
    assert coalesced == [1, 19, 20]


async def test_the_interval_bounds_how_long_settled_records_wait() -> None:
    records = [good(i, f"a{i}") for i in range(6)]
    consumer, broker, _ = await checked(records, batch=6, commit_interval=0.05)

    async def slow(delivery: KafkaDelivery) -> None:
        await asyncio.sleep(0.03)
        broker.handled.add((delivery.topic, delivery.record.key))

    assert await asyncio.wait_for(consumer.run(slow, limit=6), 5) == 6
    offsets = [c[MAIN0] for c in broker.commits]
    assert offsets[0] == 1 and offsets[-1] == 6
    assert len(offsets) >= 3  # the interval elapsed within the batch
    assert offsets == sorted(set(offsets))
    assert broker.violations == []
    await consumer.stop()


async def test_one_record_batches_commit_by_the_interval_and_once_idle() -> None:
    # A consumer that keeps up gets a record per fetch: it must not pay a
    # commit per record, and what it settled is committed once it goes idle.
    records = [good(i, f"a{i}") for i in range(10)]
    consumer, broker, _ = await checked(records, batch=1, commit_interval=0.2)

    async def handle(delivery: KafkaDelivery) -> None:
        broker.handled.add((delivery.topic, delivery.record.key))

    runner = asyncio.create_task(consumer.run(handle))
    await asyncio.wait_for(_until(lambda: consumer.stats.handled == 10), 5)
    assert len(broker.commits) <= 2  # the first record at once, then the interval
    await asyncio.wait_for(_until(lambda: committed(broker, MAIN0) == 10), 1)  # idle
    assert broker.violations == []
    await consumer.stop()
    await asyncio.wait_for(runner, 5)


async def test_a_dead_letter_is_committed_before_the_next_fetch() -> None:
    records = [good(0, "a0"), tampered(1, "bad"), good(2, "a2")]
    consumer, broker, producer = await checked(records, batch=1, commit_interval=60)
    first = await consumer.__anext__()  # committed at once: nothing was committed before
    broker.handled.add((first.topic, first.record.key))
    second = await consumer.__anext__()  # the tampered one was dead-lettered on the way
    assert second.offset == 2
    assert committed(broker, MAIN0) == 2  # a repeat of a dead letter is worth a commit
    assert [k for k, _ in producer.to(DLQ)] == [b"bad"]
    assert broker.violations == []
    await consumer.stop()


async def _until(condition: Any) -> None:
    """Poll ``condition`` (the callers bound the wait with a timeout)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_a_nonsense_commit_interval_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="commit_interval"):
        TrustedKafkaConsumer(TOPIC, verifier=VERIFIER, group_id=GROUP, commit_interval=bad)
