"""Coalesced commits of TrustedKafkaConsumer on a real broker (Tansu in CI).

The consumer commits the highest settled offset of each partition once per
fetched batch (and every ``commit_interval``, on revocation, on ``stop()``),
not after every record. Two ways that could lose or double records, tried:

* a crash (no ``stop()``, no last commit) after records were handled but
  before their coalesced commit, with a hostile record among them: the next
  member receives exactly the uncommitted tail, each record classified
  ``redelivery`` by the shared replay store, so an idempotent handler does
  its side effect once overall; the committed part never comes again; every
  record is handled or dead-lettered;
* a rebalance while settled offsets are not committed yet: the revoke
  listener commits them before the partitions move, so the new owner handles
  none of them again.

Unit tests of the same rules, with a stand-in broker that checks every
commit against what was settled: ``tests/test_kafka_commits.py``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from test_kafka_replay import (
    Ledger,
    assigned,
    committed,
    make_consumer,
    publish,
    read_topic,
    running,
    seal,
    wait_until,
)

from trusthop.errors import Reason
from trusthop.kafka import KafkaDelivery, TrustedKafkaConsumer
from trusthop.kafka.consumer import _DropOnRevoke
from trusthop.replay import DeliveryKind
from trusthop.stores.memory import MemoryReplayStore

pytestmark = pytest.mark.integration

TIMEOUT = 30.0


def coalescing(
    bootstrap: str, options: dict[str, int], topic: str, group: str, store: MemoryReplayStore
) -> TrustedKafkaConsumer:
    """A member of ``group`` whose commits wait for the end of a batch (no
    commit_interval within a test), sharing ``store`` with the other members."""
    return make_consumer(bootstrap, options, topic, group, replay_store=store, commit_interval=60)


async def test_a_crash_before_the_coalesced_commit_redelivers_the_tail_once(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, int], unique_name: str
) -> None:
    topic, group = f"{unique_name}-orders", f"{unique_name}-svc"
    records = [(f"k{i:02d}".encode(), seal(topic, f"k{i:02d}"), 0) for i in range(20)]
    bad = seal(topic, "bad")
    # A hostile record in the middle of the batch (tampered data: event_mismatch).
    records.insert(8, (b"bad", bad._replace(value=bad.value.replace(b"bad", b"BAD")), 0))
    ledger = Ledger()
    ledger.sent = await publish(kafka_bootstrap, topic, records)
    offset_of = {key: coords[2] for key, coords in ledger.sent.items()}
    store = MemoryReplayStore()  # stands for a shared store (Redis): it outlives the crash
    effects: Counter[bytes] = Counter()  # the side effect an idempotent handler guards

    def idempotent(delivery: KafkaDelivery) -> bytes:
        key = ledger.saw(delivery)
        if not (delivery.redelivered and effects[key]):
            effects[key] += 1
        return key

    first = coalescing(kafka_bootstrap, kafka_consumer_options, topic, group, store)
    stuck = asyncio.Event()
    crash_at = b"k15"

    async def handle_then_die(delivery: KafkaDelivery) -> None:
        key = idempotent(delivery)
        if key == crash_at:
            stuck.set()
            await asyncio.Event().wait()  # the process dies here
        ledger.done[key] += 1

    await first.start()
    runner = asyncio.create_task(first.run(handle_then_die))
    await asyncio.wait_for(stuck.wait(), TIMEOUT)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    # The crash: the clients go away without stop(), so without the last commit.
    await first.client.stop()
    await first.dead_letter_producer.stop()
    tail_start = await committed(kafka_bootstrap, group, topic)
    assert tail_start is not None
    # Handled records were left uncommitted (the tail), the first one was not.
    assert 1 <= tail_start < offset_of[crash_at]
    assert first.stats.dead_lettered == {Reason.EVENT_MISMATCH: 1}

    second = coalescing(kafka_bootstrap, kafka_consumer_options, topic, group, store)

    async def handle(delivery: KafkaDelivery) -> None:
        ledger.done[idempotent(delivery)] += 1

    async with running(second, handle):
        await wait_until(
            lambda: (
                second.stats.handled + second.stats.dead_lettered_total == len(records) - tail_start
            )
        )
        await asyncio.sleep(0.5)  # nothing more comes
    # The second member received exactly the uncommitted tail and what followed.
    after: dict[bytes, DeliveryKind] = {}
    for key, kind, _ in ledger.seen[len(ledger.seen) - second.stats.delivered :]:
        after[key] = kind
    expected = {k for k, o in offset_of.items() if o >= tail_start and k != b"bad"}
    assert set(after) == expected
    for key, kind in after.items():
        in_tail = offset_of[key] <= offset_of[crash_at]
        assert kind is (DeliveryKind.REDELIVERY if in_tail else DeliveryKind.FIRST), key
    assert second.counters["redelivered"] == sum(
        1 for k in expected if offset_of[k] <= offset_of[crash_at]
    )
    # Every side effect happened once overall; nothing committed came again.
    assert effects == Counter({k: 1 for k in ledger.sent if k != b"bad"})
    assert all(offset_of[k] >= tail_start for k, _, _ in ledger.seen[-second.stats.delivered :])
    # Counts balance, per member and overall.
    assert second.stats.handled + second.stats.dead_lettered_total == len(records) - tail_start
    handled_keys = {k for k, n in ledger.done.items() if n}
    dead_keys = {bytes(r.key) for r in await read_topic(kafka_bootstrap, f"{topic}.dlq", 2)}
    assert len(handled_keys) + len(dead_keys) == len(ledger.sent)
    assert dead_keys == {b"bad"}  # dead-lettered again: it was in the tail
    assert await committed(kafka_bootstrap, group, topic) == len(records)


async def test_a_rebalance_commits_settled_offsets_before_the_partitions_move(
    kafka_bootstrap: str,
    kafka_consumer_options: dict[str, int],
    unique_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic, group = f"{unique_name}-orders", f"{unique_name}-svc"
    ledger = Ledger()
    keys = [(f"p{p}-{i:02d}", p) for p in range(4) for i in range(25)]
    ledger.sent = await publish(
        kafka_bootstrap, topic, [(k.encode(), seal(topic, k), p) for k, p in keys]
    )
    store = MemoryReplayStore()  # shared: a second delivery would show as a redelivery
    members = [
        coalescing(kafka_bootstrap, kafka_consumer_options, topic, group, store) for _ in range(2)
    ]
    commits: list[dict[Any, int]] = []
    landed: dict[Any, int] = {}  # what the broker acknowledged, per partition
    at_revocation: list[tuple[dict[Any, int], Counter[int]]] = []
    real_commit = members[0].client.commit

    async def spy(offsets: dict[Any, int]) -> None:
        commits.append(dict(offsets))
        await real_commit(offsets)
        landed.update(offsets)

    members[0].client.commit = spy
    real_revoked = _DropOnRevoke.on_partitions_revoked

    async def revoked(listener: _DropOnRevoke, partitions: Any) -> None:
        await real_revoked(listener, partitions)
        if listener._owner is members[0] and partitions:  # not the first join's
            handled = Counter(ledger.sent[k][1] for k, n in ledger.done.items() if n)
            at_revocation.append(({tp.partition: o for tp, o in landed.items()}, handled))

    # What the first member settled must be committed when its listener
    # returns, i.e. before the partitions move (a lenient broker such as Tansu
    # accepts a commit sent later; Kafka refuses it).
    monkeypatch.setattr(_DropOnRevoke, "on_partitions_revoked", revoked)

    async def slow(delivery: KafkaDelivery) -> None:
        key = ledger.saw(delivery)
        await asyncio.sleep(0.04)
        ledger.done[key] += 1

    async with running(members[0], slow):
        await wait_until(lambda: members[0].stats.handled >= 5)
        # Settled but not committed: the batch is far from over.
        committed_so_far = sum(max(c.values()) for c in commits)
        assert committed_so_far < members[0].stats.handled
        async with running(members[1], slow):
            await assigned(*members, topic=topic)  # the rebalance is over
            await wait_until(lambda: sum(m.stats.handled for m in members) == 100)
            await asyncio.sleep(0.5)  # a redelivery, if any, would come now
    # Nothing handled twice: the new owner started where the revoke listener committed.
    assert all(kind is DeliveryKind.FIRST for _, kind, _ in ledger.seen)
    assert sum(m.counters["redelivered"] for m in members) == 0
    assert members[0].stats.commit_failures == 0
    landed_then, handled_then = at_revocation[0]
    assert sum(handled_then.values()) > committed_so_far
    assert {p: landed_then.get(p) for p in handled_then} == dict(handled_then)
    ledger.account(dead=[])
    for partition in range(4):
        assert await committed(kafka_bootstrap, group, topic, partition) == 25
    # Coalesced: far fewer commit requests than records.
    assert len(commits) < members[0].stats.handled
