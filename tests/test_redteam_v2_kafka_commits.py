"""Red-team review of the coalesced Kafka commits: rebalances at random
moments (while a record is being admitted or handled, while a commit is in
flight, between records), with the partition handed back to this member
from its committed offset, over random mixes of handled, flaky, poison and
tampered records in small fetched batches.

The stand-in broker (``test_kafka_commits.CheckedBroker``) checks every
commit against what was settled. What must hold: no offset committed before
its record was settled, nothing lost (every record settled in the end), and
a record handled a second time is always flagged as a redelivery or a retry.
This held; it stays as a regression test.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from aiokafka import TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_kafka_commits import DLQ, MAIN0, MAIN1, checked, good, tampered
from test_kafka_retry import TOPIC

from trusthop.kafka import KafkaDelivery

KINDS = st.sampled_from(["ok", "ok", "ok", "flaky", "poison", "tampered"])


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(st.tuples(KINDS, st.integers(0, 1)), min_size=1, max_size=16),
    batch=st.integers(1, 5),
    interval=st.sampled_from([0.0, 60.0]),
    seed=st.integers(0, 2**16),
)
def test_rebalances_at_any_moment_lose_nothing_and_commit_nothing_early(
    kinds: list[tuple[str, int]], batch: int, interval: float, seed: int
) -> None:
    asyncio.run(_scenario(kinds, batch, interval, seed))


async def _scenario(kinds: list[tuple[str, int]], batch: int, interval: float,
                    seed: int) -> None:
    rng = random.Random(seed)
    records: list[Any] = []
    offsets = [0, 0]
    for index, (kind, partition) in enumerate(kinds):
        key, offset = f"{kind}-{index}", offsets[partition]
        offsets[partition] += 1
        make = tampered if kind == "tampered" else good
        records.append(make(offset, key, partition))
    consumer, broker, producer = await checked(
        records, batch=batch, commit_interval=interval, max_attempts=2
    )
    calls: dict[bytes, int] = {}
    unflagged_repeats: list[str] = []
    revocations: list[asyncio.Task[None]] = []

    rebalancing: set[TopicPartition] = set()

    async def revoke(tp: TopicPartition) -> None:
        if tp in rebalancing:
            return
        # As aiokafka: from the start of a rebalance until the partition is
        # assigned again, no fetch returns its records.
        rebalancing.add(tp)
        try:
            await broker.listener.on_partitions_revoked({tp})
            # Assigned again to this member: it resumes from the committed offset.
            done = broker.committed(tp.topic, tp.partition)
            broker.position[tp] = 0 if done is None else done
        finally:
            rebalancing.discard(tp)

    real_getmany = broker.getmany

    async def getmany(timeout_ms: int = 0) -> dict[TopicPartition, list[Any]]:
        held = rebalancing & set(broker.log)
        broker.paused |= held
        try:
            return await real_getmany(timeout_ms)
        finally:
            broker.paused -= held

    broker.getmany = getmany  # type: ignore[method-assign]

    def maybe_revoke() -> None:
        if rng.random() < 0.25:
            revocations.append(asyncio.create_task(revoke(rng.choice([MAIN0, MAIN1]))))

    real_commit = broker.commit

    async def commit(offsets: dict[TopicPartition, int]) -> None:
        maybe_revoke()  # a rebalance while the commit is in flight
        await real_commit(offsets)

    broker.commit = commit  # type: ignore[method-assign]

    async def handle(delivery: KafkaDelivery) -> None:
        key = bytes(delivery.record.key)
        if calls.get(key) and not delivery.redelivered:
            unflagged_repeats.append(f"{key!r} attempt {delivery.attempt}")
        calls[key] = calls.get(key, 0) + 1
        maybe_revoke()
        for _ in range(rng.randrange(3)):
            await asyncio.sleep(0)
        if key.startswith(b"poison") or (key.startswith(b"flaky") and delivery.attempt == 1):
            raise RuntimeError("not now")
        broker.handled.add((delivery.topic, delivery.record.key))

    def all_settled() -> bool:
        return all(broker.settled(r) for r in records)

    runner = asyncio.create_task(consumer.run(handle))
    for _ in range(2000):
        if all_settled() and all(t.done() for t in revocations):
            break
        await asyncio.sleep(0.001)
    await consumer.stop()
    await asyncio.wait_for(runner, 10)
    await asyncio.gather(*revocations)

    assert all_settled(), "a record was never settled"
    assert broker.violations == []
    assert unflagged_repeats == []
    assert all(topic in (DLQ, f"{TOPIC}.retry") for topic, *_ in producer.sent)
