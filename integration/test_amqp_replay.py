"""Redelivery, replay, retries and fan-out of TrustedWorker on a real RabbitMQ (and Redis).

Issue 4: a redelivered message is accepted, a copy re-published by an
attacker is caught, a message that waited in the retry queue is not failed
for waiting, a revoked actor is caught even on retry, and nothing is lost
when a consumer dies mid batch. Every test names its queues and exchanges
from ``unique_name`` and deletes them (and its Redis keys) at the end.
Copies are published with plain aio-pika, as an attacker with write access
to the broker would.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest
import redis.asyncio
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    HeadersType,
)
from cloudevents.core.v1.event import CloudEvent

from trusthop.amqp import (
    H_RETRY,
    Delivery,
    TrustedWorker,
    dead_letter_queue_name,
    retry_queue_name,
)
from trusthop.bindings.amqp import encode_amqp
from trusthop.bundle import TrustBundle
from trusthop.destination import amqp_destination
from trusthop.keys import SigningKey
from trusthop.pipeline import (
    H_ATTEMPTS,
    H_DESTINATION,
    H_REASON,
    H_SOURCE,
    ChainSigner,
    ChainVerifier,
)
from trusthop.replay import DeliveryKind
from trusthop.sign import Identity, mint_origin
from trusthop.stores import MemoryReplayStore
from trusthop.stores.redis import RedisReplayStore
from trusthop.verify import Limits

WAIT = 15.0
RETRY_DELAY = 0.3

DOMAIN = "prod.example.com"
EDGE = Identity.create(f"spiffe://{DOMAIN}/ns/edge/sa/gateway", SigningKey.generate())
BUNDLE = TrustBundle.of([EDGE.bundle_key])
REVOKED = TrustBundle.of([EDGE.bundle_key], revoked_actors=[EDGE.actor])
SCOPE = frozenset({"orders:read", "orders:write"})
CASE = "th-case"  # test bookkeeping header: not a CloudEvents header, so not signed
KEY = "order.placed"

Sent = tuple[HeadersType, bytes, str | None]


def order_event(event_id: str) -> CloudEvent:
    return CloudEvent(
        {
            "id": event_id,
            "source": "/shop/orders",
            "type": "order.placed",
            "specversion": "1.0",
            "datacontenttype": "application/json",
        },
        {"order": 42},
    )


def seal(event_id: str, exchange: str, routing_key: str = KEY) -> Sent:
    """A sealed event as it travels (headers, body, content type)."""
    origin = mint_origin(
        EDGE,
        subject="user:alice",
        issuer="https://idp.example.com",
        credential="token-of-alice",
        scope=SCOPE,
        now=time.time(),
        ttl=600,
    )
    wire = ChainSigner(EDGE).seal(
        order_event(event_id),
        destination=amqp_destination(exchange, routing_key),
        origin=origin,
    )
    headers, body, content_type = encode_amqp(wire)
    return dict(headers), body, content_type


async def publish(
    exchange: AbstractExchange,
    routing_key: str,
    sent: Sent,
    *,
    case: str,
    extra: HeadersType | None = None,
) -> None:
    """Publish (a copy of) a sealed message as it is, plus the test's headers."""
    headers, body, content_type = sent
    message = aio_pika.Message(
        body,
        headers={**headers, CASE: case, **(extra or {})},
        content_type=content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    await exchange.publish(message, routing_key=routing_key, mandatory=True)


async def eventually(predicate: Callable[[], bool], what: str, *, within: float = WAIT) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Rabbit:
    """One test's connections and topology; deletes everything it named."""

    def __init__(self, url: str, prefix: str, connection: AbstractConnection) -> None:
        self.url = url
        self.prefix = prefix
        self.connection = connection
        self.connections: list[AbstractConnection] = [connection]
        self.queues: list[str] = []
        self.exchanges: list[str] = []
        self.dlx = self.name("dlx")
        self.exchanges.append(self.dlx)

    def name(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    def queue(self, suffix: str) -> str:
        name = self.name(suffix)
        self.queues += [name, dead_letter_queue_name(name), retry_queue_name(name)]
        return name

    async def connect(self) -> AbstractConnection:
        """A connection of its own (not robust: closing it is a consumer's death)."""
        connection = await aio_pika.connect(self.url)
        self.connections.append(connection)
        return connection

    async def channel(self, connection: AbstractConnection | None = None) -> AbstractChannel:
        return await (connection or self.connection).channel(publisher_confirms=True)

    async def exchange(
        self,
        channel: AbstractChannel,
        suffix: str,
        kind: aio_pika.ExchangeType = aio_pika.ExchangeType.TOPIC,
    ) -> AbstractExchange:
        name = self.name(suffix)
        self.exchanges.append(name)
        return await channel.declare_exchange(name, kind)

    def worker(
        self, channel: AbstractChannel, verifier: ChainVerifier | None = None, **options: Any
    ) -> TrustedWorker:
        options.setdefault("retry_delay", RETRY_DELAY)
        return TrustedWorker(
            channel,
            verifier=verifier or ChainVerifier(BUNDLE),
            dead_letter_exchange=self.dlx,
            **options,
        )

    async def counts(self, queue: str) -> int:
        """Ready messages in ``queue`` (unacked ones are not counted)."""
        channel = await self.connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            assert declared.declaration_result.message_count is not None
            return declared.declaration_result.message_count
        finally:
            await channel.close()

    async def drain(self, queue: str) -> list[AbstractIncomingMessage]:
        """Every message in ``queue``, acked."""
        channel = await self.connection.channel()
        out: list[AbstractIncomingMessage] = []
        try:
            declared = await channel.declare_queue(queue, passive=True)
            while (message := await declared.get(fail=False, timeout=WAIT)) is not None:
                await message.ack()
                out.append(message)
        finally:
            await channel.close()
        return out

    async def letters(self, queue: str) -> dict[str, AbstractIncomingMessage]:
        """The dead letters of ``queue`` by their test case header."""
        out: dict[str, AbstractIncomingMessage] = {}
        for letter in await self.drain(dead_letter_queue_name(queue)):
            case = str(letter.headers[CASE])
            assert case not in out, f"two dead letters for {case}"
            out[case] = letter
        return out

    async def settled(self, *queues: str) -> None:
        """Wait until ``queues`` and their retry queues hold nothing ready."""
        names = [name for q in queues for name in (q, retry_queue_name(q))]

        async def empty() -> bool:
            return all([await self.counts(name) == 0 for name in names])

        deadline = asyncio.get_running_loop().time() + WAIT
        while not await empty():
            assert asyncio.get_running_loop().time() < deadline, f"{names} never drained"
            await asyncio.sleep(0.05)

    async def cleanup(self) -> None:
        connection = await aio_pika.connect(self.url)
        try:
            for kind, names in (("queue", self.queues), ("exchange", self.exchanges)):
                for name in names:
                    channel = await connection.channel()
                    with contextlib.suppress(Exception):
                        if kind == "queue":
                            await channel.queue_delete(name)
                        else:
                            await channel.exchange_delete(name)
                    with contextlib.suppress(Exception):
                        await channel.close()
        finally:
            await connection.close()
        for opened in self.connections:
            with contextlib.suppress(Exception):
                await opened.close()


@pytest.fixture
async def rabbit(amqp_url: str, unique_name: str) -> AsyncIterator[Rabbit]:
    helper = Rabbit(amqp_url, unique_name, await aio_pika.connect(amqp_url))
    try:
        yield helper
    finally:
        await helper.cleanup()


async def stop(worker: TrustedWorker) -> None:
    """Stop a worker whose connection may be gone (bounded)."""
    await asyncio.wait_for(worker.stop(), WAIT)


# --------------------------------------------------------------------------- #
# (a) redelivery after a consumer crash
# --------------------------------------------------------------------------- #


async def test_a_message_redelivered_after_a_crash_is_a_redelivery_handled_once(
    rabbit: Rabbit,
) -> None:
    admin = await rabbit.channel()
    orders = await rabbit.exchange(admin, "orders")
    queue = rabbit.queue("crash")
    store = MemoryReplayStore()
    doomed = await rabbit.connect()
    first = rabbit.worker(await rabbit.channel(doomed), replay_store=store)
    started = asyncio.Event()

    @first.handler(queue, bind=[(orders.name, KEY)])
    async def hang(delivery: Delivery) -> None:
        started.set()
        await asyncio.Event().wait()  # "crashes" before returning

    second = rabbit.worker(await rabbit.channel(), replay_store=store)
    handled: list[Delivery] = []

    @second.handler(queue, bind=[(orders.name, KEY)])
    async def done(delivery: Delivery) -> None:
        handled.append(delivery)

    await first.start()
    await publish(orders, KEY, seal("crash-1", orders.name), case="crash-1")
    await asyncio.wait_for(started.wait(), WAIT)
    await doomed.close()  # the consumer dies mid-handler: no ack was sent
    await stop(first)
    async with second:
        await eventually(lambda: len(handled) == 1, "the redelivery")
        await asyncio.sleep(0.3)  # room for a second (wrong) handling
    (delivery,) = handled
    assert delivery.message.redelivered is True
    assert delivery.kind is DeliveryKind.REDELIVERY and delivery.redelivered is True
    assert delivery.attempt == 1 and delivery.event.get_id() == "crash-1"
    assert first.counters["verified"] == 1 and first.stats.delivered == 0
    assert second.counters["redelivered"] == 1 and second.counters["verified"] == 1
    # Accepted without the signature checks: the second verifier's (empty)
    # verified-prefix cache was never consulted.
    assert second.counters["cache_misses"] == 0 and second.counters["cache_hits"] == 0
    assert second.stats.delivered == 1 and second.stats.total_dead_lettered == 0
    assert await rabbit.counts(queue) == 0
    assert await rabbit.counts(dead_letter_queue_name(queue)) == 0


# --------------------------------------------------------------------------- #
# (b) a re-published copy: replayed, or skipped
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("on_replay", ["reject", "skip"])
async def test_a_republished_copy_is_replayed_or_skipped(rabbit: Rabbit, on_replay: str) -> None:
    admin = await rabbit.channel()
    orders = await rabbit.exchange(admin, "orders")
    queue = rabbit.queue("copies")
    worker = rabbit.worker(await rabbit.channel(), on_replay=on_replay)
    handled: list[str] = []

    @worker.handler(queue, bind=[(orders.name, KEY)])
    async def on_order(delivery: Delivery) -> None:
        handled.append(str(delivery.message.headers[CASE]))

    sent = seal("o-1", orders.name)
    async with worker:
        await publish(orders, KEY, sent, case="original")
        await eventually(lambda: handled == ["original"], "the original")
        await publish(orders, KEY, sent, case="copy")
        await eventually(
            lambda: worker.stats.total_dead_lettered + worker.stats.skipped == 1, "the copy"
        )
    assert handled == ["original"] and worker.counters["verified"] == 1
    assert await rabbit.counts(queue) == 0
    letters = await rabbit.letters(queue)
    if on_replay == "skip":
        assert worker.stats.skipped == 1 and worker.counters["duplicates"] == 1
        assert worker.counters["replayed"] == 1
        assert letters == {} and worker.counters.rejected == Counter()
        return
    assert worker.counters.rejected == Counter({"replayed": 1})
    assert set(letters) == {"copy"}
    letter = letters["copy"].headers
    assert letter[H_REASON] == "replayed"
    assert letter[H_DESTINATION] == amqp_destination(orders.name, KEY)
    assert letter[H_SOURCE] == amqp_destination(orders.name, KEY)
    assert letter[H_ATTEMPTS] == "1"


# --------------------------------------------------------------------------- #
# (c, d) handler retries through <queue>.retry
# --------------------------------------------------------------------------- #


async def test_a_failing_handler_is_retried_through_the_retry_queue_without_blocking(
    rabbit: Rabbit,
) -> None:
    admin = await rabbit.channel()
    orders = await rabbit.exchange(admin, "orders")
    queue = rabbit.queue("flaky")
    worker = rabbit.worker(await rabbit.channel(), max_attempts=3, retry_delay=0.6)
    calls: list[tuple[str, int]] = []
    retries: list[Delivery] = []

    @worker.handler(queue, bind=[(orders.name, KEY)])
    async def on_order(delivery: Delivery) -> None:
        case = str(delivery.message.headers[CASE])
        calls.append((case, delivery.attempt))
        if case == "flaky":
            if delivery.attempt > 1:
                retries.append(delivery)
            if delivery.attempt < 3:
                raise RuntimeError(f"boom {delivery.attempt}")

    async with worker:
        await publish(orders, KEY, seal("f-1", orders.name), case="flaky")
        await eventually(lambda: calls == [("flaky", 1)], "the first failure")
        await publish(orders, KEY, seal("f-2", orders.name), case="meanwhile")
        await eventually(lambda: len(calls) == 4, "both settled")
        await rabbit.settled(queue)

    # The other message did not wait for the failing one's retries.
    assert calls == [("flaky", 1), ("meanwhile", 1), ("flaky", 2), ("flaky", 3)]
    for attempt, delivery in enumerate(retries, start=2):
        message = delivery.message
        assert delivery.kind is DeliveryKind.RETRY and delivery.redelivered is True
        assert (message.exchange, message.routing_key) == ("", queue)
        assert message.headers[H_RETRY] == str(attempt)
        assert message.headers[H_ATTEMPTS] == str(attempt - 1)
        assert message.redelivered is False  # a new message, not the broker's redelivery
        assert delivery.context.destination == amqp_destination(orders.name, KEY)
    assert worker.stats.retried == 2 and worker.counters["retried"] == 2
    assert worker.stats.delivered == 2 and worker.stats.handler_errors == 2
    assert worker.counters["verified"] == 4 and worker.counters.rejected == Counter()
    assert await rabbit.counts(dead_letter_queue_name(queue)) == 0


async def test_a_handler_failing_every_attempt_is_dead_lettered_with_its_attempts(
    rabbit: Rabbit,
) -> None:
    admin = await rabbit.channel()
    orders = await rabbit.exchange(admin, "orders")
    queue = rabbit.queue("broken")
    worker = rabbit.worker(await rabbit.channel(), max_attempts=3)
    attempts: list[int] = []

    @worker.handler(queue, bind=[(orders.name, KEY)])
    async def on_order(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        raise RuntimeError("always broken")

    sent = seal("b-1", orders.name)
    async with worker:
        await publish(orders, KEY, sent, case="broken", extra={"app-header": "kept"})
        await eventually(lambda: worker.stats.total_dead_lettered == 1, "the dead letter")
    assert attempts == [1, 2, 3]
    assert worker.stats.retried == 2 and worker.counters["retried"] == 2
    assert worker.counters.rejected == Counter({"handler_failed": 1})
    assert await rabbit.counts(queue) == 0
    assert await rabbit.counts(retry_queue_name(queue)) == 0
    letter = (await rabbit.letters(queue))["broken"]
    assert letter.headers[H_REASON] == "handler_failed"
    assert letter.headers[H_ATTEMPTS] == "3"
    assert letter.headers[H_DESTINATION] == amqp_destination(orders.name, KEY)
    assert letter.headers[H_SOURCE] == amqp_destination("", queue)  # the last retry's path
    assert H_RETRY not in letter.headers and "x-death" in letter.headers
    assert letter.headers["app-header"] == "kept" and letter.body == sent[1]


# --------------------------------------------------------------------------- #
# (e, f) time and revocation across a retry
# --------------------------------------------------------------------------- #


async def test_a_retry_waiting_past_the_age_limit_is_handled_a_fresh_copy_expires(
    rabbit: Rabbit,
) -> None:
    admin = await rabbit.channel()
    orders = await rabbit.exchange(admin, "orders")
    queue = rabbit.queue("slow-retry")
    limits = Limits(max_age=1, leeway=1)  # a first delivery is accepted up to iat + 2 s
    worker = rabbit.worker(
        await rabbit.channel(), ChainVerifier(BUNDLE, limits=limits), retry_delay=2.5
    )
    handled: list[tuple[int, float, int]] = []  # (attempt, when, newest ring's iat)

    @worker.handler(queue, bind=[(orders.name, KEY)])
    async def on_order(delivery: Delivery) -> None:
        if delivery.attempt == 1:
            raise RuntimeError("try again later")
        handled.append((delivery.attempt, time.time(), delivery.context.chain.newest.iat))

    waiting = seal("late-1", orders.name)
    held = seal("late-2", orders.name)  # signed now, published too late
    held_iat = int(time.time())
    async with worker:
        await publish(orders, KEY, waiting, case="retried")
        await eventually(lambda: worker.stats.retried == 1, "the retry to be scheduled")
        # Past max_age + leeway of the held event for sure.
        await asyncio.sleep(max(0.0, held_iat + 2.1 - time.time()))
        await publish(orders, KEY, held, case="fresh-but-old")
        await eventually(
            lambda: len(handled) == 1 and worker.stats.total_dead_lettered == 1,
            "the retry handled and the old copy dead-lettered",
        )
    ((attempt, when, iat),) = handled
    assert attempt == 2
    # Judged now, the retried message would have been expired too.
    assert when > iat + 1 + 1  # max_age + leeway
    letter = (await rabbit.letters(queue))["fresh-but-old"]
    assert letter.headers[H_REASON] == "expired" and letter.headers[H_ATTEMPTS] == "1"
    assert worker.counters.rejected == Counter({"expired": 1})


async def test_an_actor_revoked_while_a_retry_waits_is_caught_on_the_retry(
    rabbit: Rabbit,
) -> None:
    admin = await rabbit.channel()
    orders = await rabbit.exchange(admin, "orders")
    queue = rabbit.queue("revoked")
    worker = rabbit.worker(await rabbit.channel())
    attempts: list[int] = []

    @worker.handler(queue, bind=[(orders.name, KEY)])
    async def on_order(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        worker.verifier.bundle = REVOKED  # revoked between the first delivery and the retry
        raise RuntimeError("fails once")

    async with worker:
        await publish(orders, KEY, seal("r-1", orders.name), case="revoked")
        await eventually(lambda: worker.stats.total_dead_lettered == 1, "the dead letter")
    assert attempts == [1] and worker.stats.retried == 1
    letter = (await rabbit.letters(queue))["revoked"]
    assert letter.headers[H_REASON] == "revoked"
    assert letter.headers[H_ATTEMPTS] == "2"
    assert letter.headers[H_DESTINATION] == amqp_destination(orders.name, KEY)
    assert letter.headers[H_SOURCE] == amqp_destination("", queue)
    assert worker.counters.rejected == Counter({"revoked": 1})
    assert await rabbit.counts(queue) == 0 and await rabbit.counts(retry_queue_name(queue)) == 0


# --------------------------------------------------------------------------- #
# (g) two replicas sharing Redis
# --------------------------------------------------------------------------- #


async def test_two_replicas_sharing_redis_accept_each_event_once(
    rabbit: Rabbit, redis_url: str, unique_name: str
) -> None:
    admin = await rabbit.channel()
    orders = await rabbit.exchange(admin, "orders")
    queue = rabbit.queue("replicas")
    prefix = f"trusthop-test:{unique_name}:"
    stores = [RedisReplayStore.from_url(redis_url, prefix=prefix) for _ in range(2)]
    handled: list[tuple[int, str]] = []
    workers: list[TrustedWorker] = []
    for index, store in enumerate(stores):
        worker = rabbit.worker(
            await rabbit.channel(await rabbit.connect()), replay_store=store, prefetch_count=1
        )

        def record(replica: int) -> Callable[[Delivery], Any]:
            async def on_order(delivery: Delivery) -> None:
                handled.append((replica, delivery.event.get_id()))
                await asyncio.sleep(0.01)

            return on_order

        worker.handler(queue, bind=[(orders.name, KEY)])(record(index))
        workers.append(worker)
    events = [f"rep-{n}" for n in range(6)]
    try:
        for worker in workers:
            await worker.start()
        for event_id in events:  # each event, then a copy of it right behind
            sent = seal(event_id, orders.name)
            await publish(orders, KEY, sent, case=event_id)
            await publish(orders, KEY, sent, case=f"{event_id}-copy")
        await eventually(
            lambda: sum(w.stats.delivered + w.stats.total_dead_lettered for w in workers) == 12,
            "every message settled",
        )
    finally:
        for worker in workers:
            await stop(worker)
        cleaner = redis.asyncio.Redis.from_url(redis_url)
        try:
            keys = [key async for key in cleaner.scan_iter(match=f"{prefix}*")]
            if keys:
                await cleaner.delete(*keys)
        finally:
            await cleaner.aclose()
            for store in stores:
                await store.aclose()
    assert len(keys) == len(events), "one shared sighting per event in Redis"
    assert sorted(event_id for _, event_id in handled) == events  # each once
    assert {replica for replica, _ in handled} == {0, 1}, "both replicas consumed"
    assert all(w.counters["verified"] + w.counters["replayed"] >= 1 for w in workers)
    letters = await rabbit.letters(queue)
    assert len(letters) == 6
    assert {str(m.headers["cloudEvents_id"]) for m in letters.values()} == set(events)
    assert {m.headers[H_REASON] for m in letters.values()} == {"replayed"}
    assert await rabbit.counts(queue) == 0


# --------------------------------------------------------------------------- #
# (h) fan-out
# --------------------------------------------------------------------------- #


async def test_each_queue_of_a_fanout_exchange_verifies_and_handles_once(rabbit: Rabbit) -> None:
    admin = await rabbit.channel()
    fanout = await rabbit.exchange(admin, "fan", aio_pika.ExchangeType.FANOUT)
    queues = [rabbit.queue("fan-a"), rabbit.queue("fan-b")]
    worker = rabbit.worker(await rabbit.channel())  # one store, one scope per queue
    handled: list[tuple[str, DeliveryKind]] = []
    for name in queues:

        async def on_event(delivery: Delivery) -> None:
            handled.append((delivery.queue, delivery.kind))

        worker.handler(name, bind=[(fanout.name, "#")])(on_event)
    sent = seal("fan-1", fanout.name)
    async with worker:
        await publish(fanout, KEY, sent, case="event")
        await eventually(lambda: len(handled) == 2, "one delivery per queue")
        await publish(fanout, KEY, sent, case="copy")  # a copy reaches both queues too
        await eventually(lambda: worker.stats.total_dead_lettered == 2, "both copies")
    assert sorted(handled) == sorted((name, DeliveryKind.FIRST) for name in queues)
    for name in queues:
        counters = worker.admissions[name].counters
        assert counters["verified"] == 1 and counters.rejected == Counter({"replayed": 1})
        letter = (await rabbit.letters(name))["copy"]
        assert letter.headers[H_REASON] == "replayed"
        assert letter.headers[H_DESTINATION] == amqp_destination(fanout.name, KEY)
    assert worker.counters["verified"] == 2
    assert worker.counters["cache_hits"] >= 1  # the second queue reused verified signatures


# --------------------------------------------------------------------------- #
# (i) a forged retry header
# --------------------------------------------------------------------------- #


async def test_a_forged_retry_header_never_gets_a_message_handled_twice(rabbit: Rabbit) -> None:
    admin = await rabbit.channel()
    orders = await rabbit.exchange(admin, "orders")
    queue = rabbit.queue("forged")
    worker = rabbit.worker(await rabbit.channel(), retry_delay=1.0)
    done: list[tuple[str, int]] = []
    failures: list[str] = []

    @worker.handler(queue, bind=[(orders.name, KEY)])
    async def on_order(delivery: Delivery) -> None:
        event_id = delivery.event.get_id()
        if event_id == "c" and delivery.attempt == 1:
            failures.append(event_id)
            raise RuntimeError("fails once")
        done.append((event_id, delivery.attempt))

    direct = admin.default_exchange  # straight into the queue, as the retry queue does
    a, b, c = (seal(event_id, orders.name) for event_id in "abc")
    async with worker:
        await publish(orders, KEY, a, case="a")
        await eventually(lambda: done == [("a", 1)], "a handled")
        await publish(direct, queue, a, case="a-forged-2", extra={H_RETRY: "2"})
        await publish(direct, queue, a, case="a-forged-junk", extra={H_RETRY: "02"})
        # Never delivered before: judged as a first delivery through the
        # default exchange, which it was not signed for.
        await publish(direct, queue, b, case="b-forged", extra={H_RETRY: "2"})
        # A retry of c is pending: a forged copy claiming it takes its place,
        # and the real retry copy is then the replay.
        await publish(orders, KEY, c, case="c")
        await eventually(lambda: worker.stats.retried == 1, "c's retry to be scheduled")
        await publish(direct, queue, c, case="c-forged", extra={H_RETRY: "2"})
        await eventually(lambda: worker.stats.total_dead_lettered == 4, "four dead letters")
        await rabbit.settled(queue)
    assert sorted(done) == [("a", 1), ("c", 2)]  # each handled to completion once
    letters = await rabbit.letters(queue)
    reasons = {case: letter.headers[H_REASON] for case, letter in letters.items()}
    assert reasons == {
        "a-forged-2": "replayed",
        "a-forged-junk": "replayed",
        "b-forged": "wrong_destination",
        "c": "replayed",  # the real retry copy, after the forged one was accepted
    }
    assert letters["c"].headers[H_ATTEMPTS] == "2"
    assert letters["b-forged"].headers[H_DESTINATION] == amqp_destination(orders.name, KEY)


# --------------------------------------------------------------------------- #
# (j) a consumer killed mid batch; prefetch
# --------------------------------------------------------------------------- #


async def test_a_consumer_killed_mid_batch_loses_nothing(rabbit: Rabbit) -> None:
    admin = await rabbit.channel()
    orders = await rabbit.exchange(admin, "orders")
    queue = rabbit.queue("batch")
    store = MemoryReplayStore()
    total = 40
    doomed = await rabbit.connect()
    handled: list[tuple[int, str, Delivery]] = []  # (replica, event id, delivery)

    def flaky(replica: int) -> Callable[[Delivery], Any]:
        async def on_order(delivery: Delivery) -> None:
            await asyncio.sleep(0.03)
            event_id = delivery.event.get_id()
            if int(event_id.split("-")[1]) % 7 == 0 and delivery.attempt == 1:
                raise RuntimeError("fails on its first attempt")
            handled.append((replica, event_id, delivery))

        return on_order

    first = rabbit.worker(await rabbit.channel(doomed), replay_store=store, prefetch_count=8)
    first.handler(queue, bind=[(orders.name, KEY)])(flaky(1))
    second = rabbit.worker(await rabbit.channel(), replay_store=store, prefetch_count=8)
    second.handler(queue, bind=[(orders.name, KEY)])(flaky(2))
    events = [f"batch-{n}" for n in range(total)]
    await first.start()
    for event_id in events:
        await publish(orders, KEY, seal(event_id, orders.name), case=event_id)
    await eventually(lambda: len(handled) >= 12, "a part of the batch")
    await doomed.close()  # killed mid batch: its unacked messages go back to the queue
    await stop(first)
    by_first = len(handled)
    assert by_first < total, "the first consumer was killed mid batch"
    async with second:
        await eventually(
            lambda: len({e for _, e, _ in handled}) + second.stats.total_dead_lettered >= total,
            "every message handled or dead-lettered",
        )
        await rabbit.settled(queue)
        await asyncio.sleep(0.3)  # room for stragglers
    letters = await rabbit.letters(queue)
    dead = {str(letter.headers["cloudEvents_id"]) for letter in letters.values()}
    done = {event_id for _, event_id, _ in handled}
    assert done | dead == set(events), f"lost: {set(events) - done - dead}"
    seen: set[str] = set()
    for _, event_id, delivery in handled:  # handled again only as a possible redelivery
        assert event_id not in seen or delivery.redelivered, event_id
        seen.add(event_id)
    second_deliveries = [d for replica, _, d in handled if replica == 2]
    assert any(d.message.redelivered for d in second_deliveries), "unacked ones came back"
    # Anything dead-lettered is a trust verdict on a duplicate or an interrupted
    # retry, never a handler failure (each fails once, max_attempts is 3).
    assert all(letter.headers[H_REASON] != "handler_failed" for letter in letters.values())
    assert await rabbit.counts(queue) == 0


async def test_prefetch_bounds_the_messages_in_flight(rabbit: Rabbit) -> None:
    admin = await rabbit.channel()
    orders = await rabbit.exchange(admin, "orders")
    queue = rabbit.queue("prefetch")
    worker = rabbit.worker(await rabbit.channel(), prefetch_count=3)
    release = asyncio.Event()
    in_flight: list[str] = []
    done: list[str] = []

    @worker.handler(queue, bind=[(orders.name, KEY)])
    async def on_order(delivery: Delivery) -> None:
        in_flight.append(delivery.event.get_id())
        await release.wait()
        done.append(delivery.event.get_id())

    async with worker:
        for n in range(6):
            await publish(orders, KEY, seal(f"p-{n}", orders.name), case=f"p-{n}")
        await eventually(lambda: len(in_flight) == 3, "three in flight")
        await asyncio.sleep(0.3)
        assert len(in_flight) == 3, "no more than prefetch_count unacked at once"
        release.set()
        await eventually(lambda: len(done) == 6, "all six handled")
    assert sorted(done) == [f"p-{n}" for n in range(6)]


async def test_a_retry_copy_redelivered_after_a_crash_is_not_lost(rabbit: Rabbit) -> None:
    """The consumer dies while it handles a retry copy: RabbitMQ redelivers
    the copy (flagged redelivered, through the default exchange)."""
    admin = await rabbit.channel()
    orders = await rabbit.exchange(admin, "orders")
    queue = rabbit.queue("retry-crash")
    store = MemoryReplayStore()
    doomed = await rabbit.connect()
    first = rabbit.worker(await rabbit.channel(doomed), replay_store=store)
    hanging = asyncio.Event()

    @first.handler(queue, bind=[(orders.name, KEY)])
    async def fail_then_hang(delivery: Delivery) -> None:
        if delivery.attempt == 1:
            raise RuntimeError("first attempt fails")
        hanging.set()
        await asyncio.Event().wait()

    second = rabbit.worker(await rabbit.channel(), replay_store=store)
    handled: list[Delivery] = []

    @second.handler(queue, bind=[(orders.name, KEY)])
    async def done(delivery: Delivery) -> None:
        handled.append(delivery)

    await first.start()
    await publish(orders, KEY, seal("rc-1", orders.name), case="rc-1")
    await asyncio.wait_for(hanging.wait(), WAIT)
    await doomed.close()
    await stop(first)
    async with second:
        await eventually(
            lambda: len(handled) + second.stats.total_dead_lettered == 1, "the retry copy"
        )
        await rabbit.settled(queue)
    letters = await rabbit.letters(queue)
    assert len(handled) == 1 and not letters, "the redelivered retry copy is handled"
    (delivery,) = handled
    assert delivery.kind is DeliveryKind.REDELIVERY and delivery.attempt == 2
    assert delivery.redelivered and delivery.message.redelivered


# --------------------------------------------------------------------------- #
# (i) coalesced acks (trusthop.amqp.acks)
# --------------------------------------------------------------------------- #


async def test_handled_messages_are_acked_in_batches_and_nothing_is_left(rabbit: Rabbit) -> None:
    admin = await rabbit.channel()
    orders = await rabbit.exchange(admin, "orders")
    queue = rabbit.queue("batched")
    worker = rabbit.worker(await rabbit.channel(), prefetch_count=16)
    handled: list[str] = []

    @worker.handler(queue, bind=[(orders.name, KEY)])
    async def on_order(delivery: Delivery) -> None:
        handled.append(str(delivery.event.get_id()))

    await worker.start()
    total = 60
    for n in range(total):
        await publish(orders, KEY, seal(f"b-{n}", orders.name), case=f"b-{n}")
    await eventually(lambda: len(handled) == total, "every message handled")
    await worker.stop()
    assert sorted(handled) == sorted(f"b-{n}" for n in range(total))
    assert worker.stats.delivered == total and worker.stats.total_dead_lettered == 0
    assert worker._acks.acked == total and worker._acks.frames <= total
    assert await rabbit.counts(queue) == 0


async def test_a_crash_with_coalesced_acks_outstanding_redelivers_and_loses_nothing(
    rabbit: Rabbit,
) -> None:
    """The worker handled ten messages; their coalesced ack has not been sent
    when its connection dies. RabbitMQ redelivers the ten, flagged: the next
    worker sharing the store accepts each as a redelivery (the store still
    counts them open), handles it again, and acks it. Then a copy flagged
    redelivered is a replay."""
    admin = await rabbit.channel()
    orders = await rabbit.exchange(admin, "orders")
    queue = rabbit.queue("pending-acks")
    store = MemoryReplayStore()
    doomed = await rabbit.connect()
    first = rabbit.worker(
        await rabbit.channel(doomed), replay_store=store, prefetch_count=64, ack_delay=60
    )
    seen: list[tuple[int, Delivery]] = []

    def record(replica: int) -> Callable[[Delivery], Any]:
        async def on_order(delivery: Delivery) -> None:
            seen.append((replica, delivery))

        return on_order

    first.handler(queue, bind=[(orders.name, KEY)])(record(1))
    second = rabbit.worker(await rabbit.channel(), replay_store=store)
    second.handler(queue, bind=[(orders.name, KEY)])(record(2))
    sent = [seal(f"p-{n}", orders.name) for n in range(10)]
    await first.start()
    for n, message in enumerate(sent):
        await publish(orders, KEY, message, case=f"p-{n}")
    await eventually(lambda: len(seen) == 10, "ten handled by the first worker")
    assert first._acks.frames == 0 and first._acks.pending == 10
    await doomed.close()  # dies with its acks outstanding
    await stop(first)
    assert first.stats.delivered == 0
    async with second:
        await eventually(lambda: len(seen) == 20, "the ten redelivered")
        await rabbit.settled(queue)
    # A copy of one of them, consumed and nacked by an attacker: a replay.
    attacker = await rabbit.channel(await rabbit.connect())
    await publish(orders, KEY, sent[3], case="nacked-copy")
    taken = await (await attacker.get_queue(queue)).get(timeout=WAIT)
    await taken.nack(requeue=True)
    third = rabbit.worker(await rabbit.channel(), replay_store=store)
    third.handler(queue, bind=[(orders.name, KEY)])(record(3))
    async with third:
        await eventually(lambda: third.stats.total_dead_lettered == 1, "the copy")
    again = [d for replica, d in seen if replica == 2]
    assert sorted(str(d.event.get_id()) for d in again) == sorted(f"p-{n}" for n in range(10))
    assert all(d.kind is DeliveryKind.REDELIVERY and d.redelivered for d in again)
    assert second.stats.delivered == 10 and second.counters["redelivered"] == 10
    assert len(seen) == 20 and third.counters.rejected == {"replayed": 1}
    assert set(await rabbit.letters(queue)) == {"nacked-copy"}
    assert await rabbit.counts(queue) == 0


async def test_another_consumer_on_the_workers_channel_keeps_its_unacked_message(
    rabbit: Rabbit,
) -> None:
    """A user consumes another queue on the worker's channel and never acks:
    the delivery tags of the channel are shared, so the worker must never send
    a multiple ack over that message's tag."""
    admin = await rabbit.channel()
    orders = await rabbit.exchange(admin, "orders")
    queue, other = rabbit.queue("shared-ch"), rabbit.queue("users-own")
    shared = await rabbit.channel()
    own = await shared.declare_queue(other, durable=True)
    held: list[AbstractIncomingMessage] = []

    async def keep(message: AbstractIncomingMessage) -> None:
        held.append(message)  # never acked

    worker = rabbit.worker(shared, prefetch_count=32)
    handled: list[str] = []

    @worker.handler(queue, bind=[(orders.name, KEY)])
    async def on_order(delivery: Delivery) -> None:
        handled.append(str(delivery.event.get_id()))

    await worker.start()
    await own.consume(keep)
    for n in range(3):
        await publish(orders, KEY, seal(f"s-{n}", orders.name), case=f"s-{n}")
    await admin.default_exchange.publish(aio_pika.Message(b"mine"), routing_key=other)
    for n in range(3, 6):
        await publish(orders, KEY, seal(f"s-{n}", orders.name), case=f"s-{n}")
    await eventually(lambda: len(handled) == 6 and len(held) == 1, "both consumers")
    await worker.stop()
    await rabbit.settled(queue)
    assert await rabbit.counts(other) == 0  # still unacked, held by the user's consumer
    await shared.close()
    await eventually_async(lambda: rabbit.counts(other), 1, "the user's message requeued")
    assert await rabbit.counts(queue) == 0


async def eventually_async(
    probe: Callable[[], Any], expected: Any, what: str, *, within: float = WAIT
) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while await probe() != expected:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
