"""Red team: redelivery, replay and retry attacks on real brokers (and Redis).

The attacker has write access to the broker: it publishes any bytes and
headers to any topic, exchange or queue, ``<topic>.retry`` and
``<queue>.retry`` included, and, on RabbitMQ, consumes from a queue and
``nack``\\s what it took, so that the broker itself sets ``redelivered``.
Every test asserts the safe outcome: each event is handled to completion
at most once per consumer scope, every record is handled or dead-lettered
with its reason, and no consumer stalls. Unit versions of the same attacks
are in ``tests/test_redteam_replay.py`` (this file has another name: two test
modules with one basename cannot be collected in one run).

Queues and exchanges are named from ``unique_name`` and deleted at the end
(the ``rabbit`` fixture); Redis keys use a unique prefix and are deleted;
Kafka topics get unique names, as in ``test_kafka_replay.py``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import redis.asyncio
from aiokafka import AIOKafkaConsumer
from aiokafka.partitioner import DefaultPartitioner
from test_amqp_replay import CASE, KEY, Rabbit, publish, rabbit, seal
from test_amqp_replay import eventually as rabbit_eventually
from test_kafka_replay import (
    Ledger,
    make_consumer,
    running,
    wait_until,
)
from test_kafka_replay import publish as kafka_publish
from test_kafka_replay import seal as kafka_seal

from trusthop.amqp import H_RETRY as AMQP_RETRY
from trusthop.amqp import Delivery, dead_letter_queue_name
from trusthop.errors import Reason
from trusthop.kafka import H_NOT_BEFORE, H_RETRY, KafkaDelivery, KafkaRecord
from trusthop.pipeline import H_CONSUMER, H_REASON
from trusthop.replay import DeliveryKind
from trusthop.stores import Change, MemoryReplayStore
from trusthop.stores.redis import RedisReplayStore

__all__ = ["rabbit"]  # the fixture, re-exported for the tests below

TIMEOUT = 20.0


def dead_port() -> int:
    """A loopback port nothing listens on (connection refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def read_all(bootstrap: str, topic: str, *, settle: float = 1.0) -> list[Any]:
    """Every record of ``topic`` (all partitions) that arrives within ``settle`` s of quiet."""
    client = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await client.start()
    records: list[Any] = []
    try:
        quiet_until = time.monotonic() + settle
        while time.monotonic() < quiet_until:
            batches = await client.getmany(timeout_ms=200)
            for batch in batches.values():
                records.extend(batch)
                quiet_until = time.monotonic() + settle
    finally:
        await client.stop()
    return records


# --------------------------------------------------------------------------- #
# RabbitMQ: the redelivered flag set by an attacker who consumes and nacks
# --------------------------------------------------------------------------- #


async def test_amqp_a_copy_nacked_by_another_consumer_is_not_handled_again(
    rabbit: Rabbit,
) -> None:
    """The event was handled and acked. The attacker publishes a copy, takes
    it with ``basic.get`` and nacks it: RabbitMQ delivers it flagged
    ``redelivered``. Also through the default exchange with a forged retry
    number. Neither is handled: both are dead-lettered ``replayed``."""
    admin = await rabbit.channel()
    orders = await rabbit.exchange(admin, "orders")
    queue_name = rabbit.queue("nacked")
    store = MemoryReplayStore()  # one store for both lives of the worker
    handled: list[Delivery] = []

    def worker() -> Any:
        w = rabbit.worker(admin, replay_store=store)

        @w.handler(queue_name, bind=[(orders.name, KEY)])
        async def on_order(delivery: Delivery) -> None:
            handled.append(delivery)

        return w

    sent = seal("nack-1", orders.name)
    first = worker()
    async with first:
        await publish(orders, KEY, sent, case="original")
        await rabbit_eventually(lambda: len(handled) == 1, "the original")
    # The attacker, with its own connection and channel.
    attacker = await rabbit.channel(await rabbit.connect())
    queue = await attacker.get_queue(queue_name)
    await publish(orders, KEY, sent, case="nacked-copy")
    await publish(
        attacker.default_exchange, queue_name, sent, case="nacked-retry", extra={AMQP_RETRY: "2"}
    )
    taken = [await queue.get(timeout=TIMEOUT) for _ in range(2)]  # both, then nack both
    for message in taken:
        await message.nack(requeue=True)
    second = worker()
    async with second:
        await rabbit_eventually(lambda: second.stats.total_dead_lettered == 2, "the two copies")
        await asyncio.sleep(0.3)  # room for a wrong handling
    assert [d.message.headers[CASE] for d in handled] == ["original"]
    letters = await rabbit.letters(queue_name)
    assert set(letters) == {"nacked-copy", "nacked-retry"}
    assert all(letter.headers[H_REASON] == "replayed" for letter in letters.values())
    assert second.counters["redelivered"] == 0 and second.counters["verified"] == 0
    assert second.counters.rejected == {"replayed": 2}


async def test_amqp_a_stolen_retry_copy_and_a_forged_twin_are_handled_once(
    rabbit: Rabbit,
) -> None:
    """Attempt 1 fails; the retry copy comes back into the queue while no
    worker consumes. The attacker takes it and nacks it (flag set) and
    publishes a twin with the same retry number. Attempt 2 runs once."""
    admin = await rabbit.channel()
    orders = await rabbit.exchange(admin, "orders")
    queue_name = rabbit.queue("stolen")
    store = MemoryReplayStore()
    calls: list[tuple[str, DeliveryKind, int]] = []

    def worker() -> Any:
        w = rabbit.worker(admin, replay_store=store)

        @w.handler(queue_name, bind=[(orders.name, KEY)])
        async def on_order(delivery: Delivery) -> None:
            calls.append((str(delivery.message.headers[CASE]), delivery.kind, delivery.attempt))
            if delivery.attempt == 1:
                raise RuntimeError("first attempt fails")

        return w

    sent = seal("stolen-1", orders.name)
    first = worker()
    async with first:
        await publish(orders, KEY, sent, case="original")
        await rabbit_eventually(lambda: first.stats.retried == 1, "the retry copy")
    deadline = time.monotonic() + TIMEOUT
    while await rabbit.counts(queue_name) == 0:  # the copy leaves <queue>.retry after its TTL
        assert time.monotonic() < deadline, "the retry copy never came back"
        await asyncio.sleep(0.05)
    attacker = await rabbit.channel(await rabbit.connect())
    queue = await attacker.get_queue(queue_name)
    stolen = await queue.get(timeout=TIMEOUT)
    assert stolen.headers[AMQP_RETRY] == "2"
    await stolen.nack(requeue=True)
    await publish(attacker.default_exchange, queue_name, sent, case="twin", extra={AMQP_RETRY: "2"})
    second = worker()
    async with second:
        await rabbit_eventually(
            lambda: second.stats.delivered + second.stats.total_dead_lettered == 2, "both copies"
        )
        await asyncio.sleep(0.3)
    assert [c[1:] for c in calls] == [(DeliveryKind.FIRST, 1), (DeliveryKind.RETRY, 2)]
    letters = await rabbit.letters(queue_name)
    assert [letter.headers[H_REASON] for letter in letters.values()] == ["replayed"]


class Switchable:
    """A replay store that delegates to a working store or to a dead one."""

    def __init__(self, good: Any, dead: Any) -> None:
        self.good, self.dead, self.down = good, dead, False

    @property
    def current(self) -> Any:
        return self.dead if self.down else self.good

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self.current.get(key)
        return value

    async def update(self, key: str, change: Change) -> bytes | None:
        value: bytes | None = await self.current.update(key, change)
        return value


async def test_amqp_redis_down_mid_stream_dead_letters_and_recovers(
    rabbit: Rabbit, redis_url: str, unique_name: str
) -> None:
    prefix = f"trusthop-redteam:{unique_name}:"
    good = RedisReplayStore.from_url(redis_url, prefix=prefix)
    dead = RedisReplayStore.from_url(
        f"redis://127.0.0.1:{dead_port()}/0", socket_connect_timeout=0.5, socket_timeout=0.5
    )
    store = Switchable(good, dead)
    admin = await rabbit.channel()
    orders = await rabbit.exchange(admin, "orders")
    queue_name = rabbit.queue("redis-down")
    worker = rabbit.worker(admin, replay_store=store)
    handled: list[str] = []

    @worker.handler(queue_name, bind=[(orders.name, KEY)])
    async def on_order(delivery: Delivery) -> None:
        handled.append(str(delivery.message.headers[CASE]))

    try:
        async with worker:
            await publish(orders, KEY, seal("r-1", orders.name), case="before")
            await rabbit_eventually(lambda: handled == ["before"], "before")
            store.down = True
            for n in range(3):
                await publish(orders, KEY, seal(f"r-d{n}", orders.name), case=f"down-{n}")
            await rabbit_eventually(lambda: worker.stats.total_dead_lettered == 3, "dead letters")
            store.down = False
            await publish(orders, KEY, seal("r-2", orders.name), case="after")
            await rabbit_eventually(lambda: handled == ["before", "after"], "after")
            await rabbit.settled(queue_name)
    finally:
        client = redis.asyncio.Redis.from_url(redis_url)
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
        await good.aclose()
        await dead.aclose()
    letters = await rabbit.letters(queue_name)
    assert {c: str(m.headers[H_REASON]) for c, m in letters.items()} == {
        f"down-{n}": "store_unavailable" for n in range(3)
    }
    assert worker.stats.requeued == 0 and worker.stats.abandoned == 0
    assert await rabbit.counts(queue_name) == 0
    assert await rabbit.counts(dead_letter_queue_name(queue_name)) == 0  # drained above


# --------------------------------------------------------------------------- #
# Kafka: shared retry topics, floods, forged headers, Redis outage
# --------------------------------------------------------------------------- #


async def test_kafka_two_groups_share_the_retry_topic_without_crosstalk(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, int], unique_name: str
) -> None:
    topic = f"{unique_name}-orders"
    flaky_group, steady_group = f"{unique_name}-flaky", f"{unique_name}-steady"
    flaky = make_consumer(kafka_bootstrap, kafka_consumer_options, topic, flaky_group)
    steady = make_consumer(kafka_bootstrap, kafka_consumer_options, topic, steady_group, max_uses=2)
    flaky_ledger, steady_ledger = Ledger(), Ledger()

    async def fails_once(delivery: KafkaDelivery) -> None:
        key = flaky_ledger.saw(delivery)
        if delivery.attempt == 1:
            raise RuntimeError("flaky")
        flaky_ledger.done[key] += 1

    async def steady_handler(delivery: KafkaDelivery) -> None:
        steady_ledger.done[steady_ledger.saw(delivery)] += 1

    sent = await kafka_publish(kafka_bootstrap, topic, [(b"e", kafka_seal(topic, "e"), 0)])
    flaky_ledger.sent, steady_ledger.sent = dict(sent), dict(sent)
    async with running(flaky, fails_once), running(steady, steady_handler):
        await wait_until(lambda: flaky.stats.handled == 1 and steady.stats.foreign_retries == 1)
        await asyncio.sleep(0.3)
    assert flaky_ledger.calls(b"e") == [(DeliveryKind.FIRST, 1), (DeliveryKind.RETRY, 2)]
    # The steady group handled the event once, from its topic; the flaky
    # group's copy was neither handled (max_uses=2 would have let it) nor
    # dead-lettered as a replay of the steady group.
    assert steady_ledger.calls(b"e") == [(DeliveryKind.FIRST, 1)]
    assert steady.stats.dead_lettered_total == 0 and steady.counters.rejected == {}
    [copy] = await read_all(kafka_bootstrap, f"{topic}.retry")
    assert dict(copy.headers)[H_CONSUMER] == flaky_group.encode()
    assert await read_all(kafka_bootstrap, f"{topic}.dlq", settle=0.5) == []


def forged_copy(original: KafkaRecord, extra: list[tuple[str, bytes | None]]) -> KafkaRecord:
    return KafkaRecord(original.topic, original.key, original.value, [*original.headers, *extra])


FAR = b"9999999999999999"


async def test_kafka_forged_retry_copies_and_a_garbage_flood_neither_pass_nor_stall(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, int], unique_name: str
) -> None:
    """On one partition of ``<topic>.retry``: forged copies of a handled
    event with every odd retry number and a far-future due time, and junk,
    all before the real retry copy of another event. Nothing forged is
    handled, nothing waits ``retry_delay`` per record, everything is
    dead-lettered with its reason."""
    topic = f"{unique_name}-orders"
    retry = f"{topic}.retry"
    group = f"{unique_name}-svc"
    delay = 0.5
    consumer = make_consumer(
        kafka_bootstrap, kafka_consumer_options, topic, group, retry_delay=delay
    )
    ledger = Ledger()
    times: dict[tuple[bytes, int], float] = {}

    async def handle(delivery: KafkaDelivery) -> None:
        key = ledger.saw(delivery)
        times[(key, delivery.attempt)] = time.monotonic()
        if key == b"flaky" and delivery.attempt == 1:
            raise RuntimeError("flaky")
        ledger.done[key] += 1

    handled = kafka_seal(topic, "handled")
    numbers = [b"2", b" 2", "\uff12".encode(), b"2\x00", b"02", b"1", b"1000", b"9" * 30]
    forged = [
        (f"forged-{n}".encode(), forged_copy(handled, [(H_RETRY, v), (H_NOT_BEFORE, FAR)]), 0)
        for n, v in enumerate(numbers)
    ]
    forged.append((b"forged-dup", forged_copy(handled, [(H_RETRY, b"2"), (H_RETRY, b"2")]), 0))
    junk_record = KafkaRecord(retry, b"x", b"junk", [(H_RETRY, b"2"), (H_NOT_BEFORE, FAR)])
    # The flood goes to the partition of <topic>.retry the real copy will
    # take (the dead-letter producer partitions by key, 4 partitions).
    lane = DefaultPartitioner()(b"flaky", [0, 1, 2, 3], [0, 1, 2, 3])
    forged = [(key, record, lane) for key, record, _ in forged]
    junk = [(f"junk-{n}".encode(), junk_record, lane) for n in range(10)]
    async with running(consumer, handle):
        sent = await kafka_publish(kafka_bootstrap, topic, [(b"handled", handled, 0)])
        await wait_until(lambda: consumer.stats.handled == 1)
        sent |= await kafka_publish(kafka_bootstrap, retry, [*forged, *junk])
        sent |= await kafka_publish(kafka_bootstrap, topic, [(b"flaky", kafka_seal(topic, "f"), 0)])
        await wait_until(lambda: ledger.done[b"flaky"] == 1)
        await wait_until(lambda: consumer.stats.dead_lettered_total == len(forged) + len(junk))
    ledger.sent = sent
    assert ledger.calls(b"handled") == [(DeliveryKind.FIRST, 1)]
    assert ledger.calls(b"flaky") == [(DeliveryKind.FIRST, 1), (DeliveryKind.RETRY, 2)]
    waited = times[(b"flaky", 2)] - times[(b"flaky", 1)]
    assert waited < delay + 3.0, f"the real retry waited {waited:.1f} s"
    assert consumer.stats.dead_lettered == {
        Reason.REPLAYED: len(forged),
        Reason.MALFORMED: len(junk),
    }
    dead = await read_all(kafka_bootstrap, f"{topic}.dlq")
    assert len(dead) == len(forged) + len(junk)
    ledger.account(dead=dead)


async def test_kafka_a_copy_before_its_original_is_handled_once(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, int], unique_name: str
) -> None:
    topic = f"{unique_name}-orders"
    group = f"{unique_name}-svc"
    consumer = make_consumer(kafka_bootstrap, kafka_consumer_options, topic, group)
    ledger = Ledger()

    async def handle(delivery: KafkaDelivery) -> None:
        ledger.done[ledger.saw(delivery)] += 1

    sealed = kafka_seal(topic, "early")
    early = forged_copy(sealed, [(H_RETRY, b"2")])
    ledger.sent = await kafka_publish(kafka_bootstrap, f"{topic}.retry", [(b"copy", early, 0)])
    ledger.sent |= await kafka_publish(kafka_bootstrap, topic, [(b"original", sealed, 0)])
    async with running(consumer, handle):
        await wait_until(lambda: consumer.stats.handled + consumer.stats.dead_lettered_total == 2)
        await asyncio.sleep(0.3)
    assert sum(ledger.done.values()) == 1  # whichever came first
    assert consumer.stats.dead_lettered == {Reason.REPLAYED: 1}
    dead = await read_all(kafka_bootstrap, f"{topic}.dlq")
    ledger.account(dead=dead)


async def test_kafka_redis_down_mid_stream_dead_letters_and_recovers(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, int], redis_url: str, unique_name: str
) -> None:
    topic = f"{unique_name}-orders"
    group = f"{unique_name}-svc"
    prefix = f"trusthop-redteam:{unique_name}:"
    good = RedisReplayStore.from_url(redis_url, prefix=prefix)
    dead = RedisReplayStore.from_url(
        f"redis://127.0.0.1:{dead_port()}/0", socket_connect_timeout=0.5, socket_timeout=0.5
    )
    store = Switchable(good, dead)
    consumer = make_consumer(
        kafka_bootstrap, kafka_consumer_options, topic, group, replay_store=store
    )
    ledger = Ledger()

    async def handle(delivery: KafkaDelivery) -> None:
        key = ledger.saw(delivery)
        if key == b"fails-while-down":
            store.down = True  # Redis dies while the handler runs
            raise RuntimeError("and the handler fails too")
        ledger.done[key] += 1

    try:
        async with running(consumer, handle):
            ledger.sent = await kafka_publish(
                kafka_bootstrap, topic, [(b"before", kafka_seal(topic, "b"), 0)]
            )
            await wait_until(lambda: ledger.done[b"before"] == 1)
            store.down = True
            ledger.sent |= await kafka_publish(
                kafka_bootstrap,
                topic,
                [(b"down-1", kafka_seal(topic, "d1"), 0), (b"down-2", kafka_seal(topic, "d2"), 1)],
            )
            await wait_until(lambda: consumer.stats.dead_lettered_total == 2)
            store.down = False
            ledger.sent |= await kafka_publish(
                kafka_bootstrap, topic, [(b"fails-while-down", kafka_seal(topic, "f"), 0)]
            )
            await wait_until(lambda: consumer.stats.dead_lettered_total == 3)
            store.down = False
            ledger.sent |= await kafka_publish(
                kafka_bootstrap, topic, [(b"after", kafka_seal(topic, "a"), 2)]
            )
            await wait_until(lambda: ledger.done[b"after"] == 1)
    finally:
        client = redis.asyncio.Redis.from_url(redis_url)
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
        await good.aclose()
        await dead.aclose()
    assert consumer.stats.dead_lettered == {Reason.STORE_UNAVAILABLE: 3}
    dead_letters = await read_all(kafka_bootstrap, f"{topic}.dlq")
    reasons = {bytes(r.key): dict(r.headers)[H_REASON] for r in dead_letters}
    assert reasons == {
        b"down-1": b"store_unavailable",
        b"down-2": b"store_unavailable",
        b"fails-while-down": b"store_unavailable",
    }
    assert await read_all(kafka_bootstrap, f"{topic}.retry", settle=0.5) == []
    ledger.account(dead=dead_letters)
    counters = consumer.counters.as_dict()
    # Four records verified or rejected once each; the retry that could not be
    # scheduled is a second verdict on a verified record.
    assert counters["verified"] + sum(counters["rejected"].values()) == 5 + 1
