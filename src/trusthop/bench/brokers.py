"""Broker figures: the wrappers against the raw clients on the same broker.

Kafka (aiokafka) and RabbitMQ (aio-pika). Each round preloads a backlog of
``count`` messages with the consumer paused (Kafka) or detached (RabbitMQ),
then times its consumption from the first delivery to the last; producers
time ``count`` sends from the first to the last acknowledgement. The raw and
the trusthop sides alternate, round by round, on the same broker and
connection settings, with the same records (signed depth-3 events with 1 KiB
of data; the raw consumer just does not verify them).

Throughput ratios divide trusthop's rate by ``min(raw rate, crypto bound)``:
the crypto bound is the rate at which the fastest backend can verify (or
sign) the one new signature each event carries, so neither a fast broker nor
fast crypto alone sets an unreachable bar.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from trusthop.bench.measure import cpu_seconds, median, rounded
from trusthop.bench.report import Figure, Target, not_measured
from trusthop.bench.workload import Workload, new_event
from trusthop.bindings.amqp import encode_amqp
from trusthop.bindings.kafka import encode_kafka
from trusthop.destination import amqp_destination
from trusthop.event import WireEvent
from trusthop.pipeline import ChainSigner

log = logging.getLogger(__name__)

CONSUMER_PARENT_HOPS = 2
"""The parent chain of every broker event: the origin and two hops, so the
published event carries depth 3 (four signatures, three of them on the
verified prefix, one new)."""

JOIN_TIMEOUT = 60.0
WINDOW = 64
"""In-flight publishes (RabbitMQ confirms) and consumer prefetch, both sides."""


@dataclass(frozen=True)
class BrokerSettings:
    """How much each broker figure measures."""

    rounds: int
    count: int
    raw_verify_s: float
    raw_sign_s: float


@dataclass
class Rate:
    """One timed side of one round."""

    per_second: float
    cpu_per_message_us: float


def _ratio_figure(
    name: str,
    target: Target,
    trusthop: list[Rate],
    raw: list[Rate],
    bound_per_s: float,
    bound_what: str,
    extra: dict[str, Any] | None = None,
    raw_label: str = "raw",
) -> Figure:
    ratios = [
        t.per_second / min(r.per_second, bound_per_s) for t, r in zip(trusthop, raw, strict=True)
    ]
    th_rate = median([t.per_second for t in trusthop])
    raw_rate = median([r.per_second for r in raw])
    detail: dict[str, Any] = {
        "trusthop_per_s": round(th_rate),
        f"{raw_label}_per_s": round(raw_rate),
        "bound_per_s": round(bound_per_s),
        "bound": bound_what,
        "ratio_min": rounded(min(ratios)),
        "ratio_max": rounded(max(ratios)),
        "rounds": len(ratios),
        "trusthop_cpu_us_per_msg": round(median([t.cpu_per_message_us for t in trusthop]), 1),
        f"{raw_label}_cpu_us_per_msg": round(median([r.cpu_per_message_us for r in raw]), 1),
        "vs_raw_alone": rounded(
            median([t.per_second / r.per_second for t, r in zip(trusthop, raw, strict=True)])
        ),
    }
    detail.update(extra or {})
    return Figure(
        name,
        rounded(median(ratios)),
        "ratio",
        target,
        detail=detail,
        summary=f"trusthop {round(th_rate)}/s vs min({raw_label} {round(raw_rate)}/s, "
        f"{bound_what} {round(bound_per_s)}/s); CPU {detail['trusthop_cpu_us_per_msg']} vs "
        f"{detail[f'{raw_label}_cpu_us_per_msg']} us/msg",
    )


class _Clock:
    """First-to-last timing of a consumer loop, with process CPU time.

    ``started()`` starts it at once instead (Kafka: when the paused
    partitions resume, so the first fetch is timed too); the rate then
    counts every message, not the ``count - 1`` gaps after the first.
    """

    def __init__(self) -> None:
        self.first: float | None = None
        self.cpu_first = 0.0
        self.gaps = -1

    def started(self) -> _Clock:
        self.tick()
        self.gaps = 0
        return self

    def tick(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            self.cpu_first = cpu_seconds()

    def rate(self, count: int) -> Rate:
        assert self.first is not None
        elapsed = max(time.perf_counter() - self.first, 1e-9)
        cpu = cpu_seconds() - self.cpu_first
        messages = count + self.gaps
        return Rate(messages / elapsed, cpu / max(messages, 1) * 1e6)


async def _pump(count: int, make: Callable[[int], Awaitable[object]], window: int) -> None:
    """Run ``make(i)`` for ``i < count``, at most ``window`` at a time."""
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            index = next_index
            next_index += 1
            await make(index)

    await asyncio.gather(*(worker() for _ in range(min(window, count))))


# --------------------------------------------------------------------------- #
# Kafka
# --------------------------------------------------------------------------- #


async def _wait_assigned(consumer: Any) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT
    while not consumer.assignment():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no partition assigned within {JOIN_TIMEOUT:g} s")
        await asyncio.sleep(0.05)


async def kafka_figures(
    bootstrap: str,
    workload: Workload,
    settings: BrokerSettings,
    consumer_options: dict[str, Any],
) -> list[Figure]:
    """``kafka_consume`` and ``kafka_produce`` against ``bootstrap``."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from trusthop.kafka import TrustedKafkaConsumer, TrustedKafkaProducer

    run = uuid.uuid4().hex[:8]
    th_topic, raw_topic = f"bench-{run}-th", f"bench-{run}-raw"
    pth_topic, praw_topic = f"bench-{run}-produce-th", f"bench-{run}-produce-raw"
    parent = workload.chain(CONSUMER_PARENT_HOPS)
    context = workload.context(parent)
    signer = ChainSigner(workload.signer_of(CONSUMER_PARENT_HOPS + 1))
    count, rounds = settings.count, settings.rounds

    # Both consumers poll with a short wait: a round starts when its paused
    # partitions resume, and a fetch already waiting out the default 500 ms
    # on the empty partitions would delay that round's first record by as much.
    consumer_options = {**consumer_options, "fetch_max_wait_ms": 10}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    trusted_producer = TrustedKafkaProducer(signer=signer, producer=producer)
    verifier = workload.verifier()
    consumer = TrustedKafkaConsumer(
        th_topic,
        verifier=verifier,
        group_id=f"bench-{run}-th",
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        **consumer_options,
    )
    raw = AIOKafkaConsumer(
        raw_topic,
        group_id=f"bench-{run}-raw",
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **consumer_options,
    )
    try:
        # Create the topics (auto-created on first produce) before anyone joins.
        for topic in (th_topic, raw_topic, pth_topic, praw_topic):
            await producer.send_and_wait(topic, b"", headers=[])
        await consumer.start()
        await raw.start()
        await asyncio.gather(_wait_assigned(consumer.client), _wait_assigned(raw))
        # Skip the topic-creating records (not CloudEvents): consume from the end.
        for client in (consumer.client, raw):
            for tp in client.assignment():
                await client.seek_to_end(tp)
                await client.position(tp)

        def records(round_index: int) -> list[tuple[list[tuple[str, bytes]], bytes]]:
            out = []
            for _ in range(count):
                record = trusted_producer.seal(th_topic, new_event(), parent=context)
                out.append((record.headers, record.value))
            return out

        backlog = [records(r) for r in range(rounds)]
        state = {"th": 0, "raw": 0, "raw_each": 0}

        async def preload(
            client: Any, topic: str, batch: list[tuple[list[tuple[str, bytes]], bytes]]
        ) -> None:
            assigned = list(client.assignment())
            client.pause(*assigned)
            futures = [
                await producer.send(topic, value=value, headers=headers) for headers, value in batch
            ]
            await asyncio.gather(*futures)
            client.resume(*assigned)

        async def consume_trusthop() -> Rate:
            batch = backlog[state["th"] % rounds]
            state["th"] += 1
            await preload(consumer.client, th_topic, batch)
            clock = _Clock().started()
            iterator = consumer.__aiter__()
            for _ in range(count):
                delivery = await iterator.__anext__()
                clock.tick()
                _ = delivery.event
            await consumer.commit()
            return clock.rate(count)

        async def consume_raw(each: bool) -> Rate:
            key = "raw_each" if each else "raw"
            batch = backlog[state[key] % rounds]
            state[key] += 1
            await preload(raw, raw_topic, batch)
            clock = _Clock().started()
            got = 0
            while got < count:
                batches = await raw.getmany(timeout_ms=1000)
                for tp, messages in batches.items():
                    for message in messages:
                        clock.tick()
                        _ = len(message.value or b"")
                        got += 1
                        if each:
                            await raw.commit({tp: message.offset + 1})
                if not each:
                    await raw.commit()
            return clock.rate(count)

        async def consume_raw_fast() -> Rate:
            return await consume_raw(False)

        async def consume_raw_each() -> Rate:
            return await consume_raw(True)

        raw_fast, raw_each, trusthop = await _interleave_async(
            rounds, [consume_raw_fast, consume_raw_each, consume_trusthop]
        )
        bound = 1 / settings.raw_verify_s
        consume = _ratio_figure(
            "kafka_consume",
            Target(">=", 0.7),
            trusthop,
            raw_fast,
            bound,
            "crypto bound (1 new signature per event)",
            {
                "raw_commit_each_per_s": round(median([r.per_second for r in raw_each])),
                "vs_raw_commit_each": rounded(
                    median(
                        [
                            t.per_second / r.per_second
                            for t, r in zip(trusthop, raw_each, strict=True)
                        ]
                    )
                ),
                "count": count,
                "depth": CONSUMER_PARENT_HOPS + 1,
                "raw": "aiokafka getmany, commit per batch",
                "raw_commit_each": "aiokafka getmany, commit after every record "
                "(what the wrapper did before coalesced commits)",
                "trusthop": "TrustedKafkaConsumer async for (admission, memory replay store, "
                "coalesced commits of settled records)",
                # Per-round rates: the raw side reads a round in a few ms.
                "trusthop_rounds_per_s": [round(t.per_second) for t in trusthop],
                "raw_rounds_per_s": [round(r.per_second) for r in raw_fast],
            },
        )

        async def produce_trusthop() -> Rate:
            events = [new_event() for _ in range(count)]
            start, cpu = time.perf_counter(), cpu_seconds()
            futures = [await trusted_producer.send(pth_topic, e, parent=context) for e in events]
            await asyncio.gather(*futures)
            return _rate(start, cpu, count)

        async def produce_raw() -> Rate:
            events = [new_event() for _ in range(count)]
            start, cpu = time.perf_counter(), cpu_seconds()
            futures = []
            for event in events:
                headers, value = encode_kafka(WireEvent.from_cloudevent(event))
                futures.append(await producer.send(praw_topic, value=value or b"", headers=headers))
            await asyncio.gather(*futures)
            return _rate(start, cpu, count)

        raw_produce, th_produce = await _interleave_async(rounds, [produce_raw, produce_trusthop])
        produce = _ratio_figure(
            "kafka_produce",
            Target(">=", 0.7),
            th_produce,
            raw_produce,
            1 / settings.raw_sign_s,
            "signing bound (1 signature per event)",
            {
                "count": count,
                "raw": "AIOKafkaProducer.send of the CloudEvent in binary mode (no chain)",
                "trusthop": "TrustedKafkaProducer.send (seal, encode, budget check)",
            },
        )
        return [consume, produce]
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
        with contextlib.suppress(Exception):
            await raw.stop()
        with contextlib.suppress(Exception):
            await producer.stop()


def _rate(start: float, cpu: float, count: int) -> Rate:
    elapsed = max(time.perf_counter() - start, 1e-9)
    return Rate(count / elapsed, (cpu_seconds() - cpu) / count * 1e6)


async def _interleave_async(
    rounds: int, sides: list[Callable[[], Awaitable[Rate]]]
) -> list[list[Rate]]:
    values: list[list[Rate]] = [[] for _ in sides]
    count = len(sides)
    for index in range(rounds):
        order = list(range(count))
        shift = index % count
        order = order[shift:] + order[:shift]
        if index % 2 == 1:
            order.reverse()
        for side in order:
            values[side].append(await sides[side]())
    return values


# --------------------------------------------------------------------------- #
# RabbitMQ
# --------------------------------------------------------------------------- #


async def amqp_figures(url: str, workload: Workload, settings: BrokerSettings) -> list[Figure]:
    """``amqp_consume`` and ``amqp_publish`` against ``url``."""
    import aio_pika

    from trusthop.amqp import TrustedPublisher, TrustedWorker
    from trusthop.amqp.worker import Delivery

    run = uuid.uuid4().hex[:8]
    th_queue, raw_queue = f"bench-{run}-th", f"bench-{run}-raw"
    pub_queue = f"bench-{run}-publish"
    parent = workload.chain(CONSUMER_PARENT_HOPS)
    context = workload.context(parent)
    signer = ChainSigner(workload.signer_of(CONSUMER_PARENT_HOPS + 1))
    verifier = workload.verifier()
    count, rounds = settings.count, settings.rounds

    connection = await aio_pika.connect(url)
    declared: list[str] = []
    try:
        channel = await connection.channel(publisher_confirms=True)
        raw_q = await channel.declare_queue(raw_queue, durable=True)
        pub_q = await channel.declare_queue(pub_queue, durable=True)
        declared += [raw_queue, pub_queue]
        # The worker declares its own queue (with its dead-letter arguments) at start.
        probe = TrustedWorker(await connection.channel(publisher_confirms=True), verifier=verifier)
        th_arguments = probe.queue_arguments(th_queue)
        await channel.declare_queue(th_queue, durable=True, arguments=th_arguments)
        declared += [th_queue, f"{th_queue}.dlq", f"{th_queue}.retry"]

        def messages() -> list[aio_pika.Message]:
            out = []
            for _ in range(count):
                wire = signer.seal(
                    new_event(), destination=amqp_destination("", th_queue), parent=context
                )
                headers, body, content_type = encode_amqp(wire)
                out.append(
                    aio_pika.Message(
                        body,
                        headers=dict(headers),
                        content_type=content_type,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        message_id=uuid.uuid4().hex,
                    )
                )
            return out

        backlog = [messages() for _ in range(rounds)]
        state = {"th": 0, "raw": 0}

        async def preload(queue: str, batch: list[aio_pika.Message]) -> None:
            exchange = channel.default_exchange
            await _pump(len(batch), lambda i: exchange.publish(batch[i], routing_key=queue), WINDOW)

        async def consume_raw() -> Rate:
            batch = backlog[state["raw"] % rounds]
            state["raw"] += 1
            await preload(raw_queue, batch)
            consumer_channel = await connection.channel()
            await consumer_channel.set_qos(prefetch_count=WINDOW)
            queue = await consumer_channel.get_queue(raw_queue, ensure=False)
            clock, done, seen = _Clock(), asyncio.Event(), [0]

            async def on_message(message: Any) -> None:
                clock.tick()
                _ = len(message.body)
                await message.ack()
                seen[0] += 1
                if seen[0] >= count:
                    done.set()

            tag = await queue.consume(on_message)
            await asyncio.wait_for(done.wait(), 300)
            rate = clock.rate(count)
            await queue.cancel(tag)
            await consumer_channel.close()
            return rate

        async def consume_trusthop() -> Rate:
            batch = backlog[state["th"] % rounds]
            state["th"] += 1
            await preload(th_queue, batch)
            worker_channel = await connection.channel(publisher_confirms=True)
            worker = TrustedWorker(worker_channel, verifier=verifier, prefetch_count=WINDOW)
            clock, done, seen = _Clock(), asyncio.Event(), [0]

            @worker.handler(th_queue)
            async def on_delivery(delivery: Delivery) -> None:
                clock.tick()
                _ = delivery.event
                seen[0] += 1
                if seen[0] >= count:
                    done.set()

            await worker.start()
            await asyncio.wait_for(done.wait(), 300)
            rate = clock.rate(count)
            await worker.stop()
            await worker_channel.close()
            if worker.stats.total_dead_lettered:
                raise RuntimeError(f"the worker dead-lettered: {dict(worker.stats.dead_lettered)}")
            return rate

        raw_rates, th_rates = await _interleave_async(rounds, [consume_raw, consume_trusthop])
        consume = _ratio_figure(
            "amqp_consume",
            Target(">=", 0.8),
            th_rates,
            raw_rates,
            1 / settings.raw_verify_s,
            "crypto bound (1 new signature per event)",
            {
                "count": count,
                "prefetch": WINDOW,
                "raw": "aio-pika queue.consume, ack per message",
                "trusthop": "TrustedWorker handler (admission, memory replay store, ack, settle)",
            },
        )

        publisher = TrustedPublisher(channel, signer=signer)
        exchange = channel.default_exchange

        async def publish_raw() -> Rate:
            events = [new_event() for _ in range(count)]
            start, cpu = time.perf_counter(), cpu_seconds()

            async def one(index: int) -> None:
                headers, body, content_type = encode_amqp(WireEvent.from_cloudevent(events[index]))
                message = aio_pika.Message(
                    body,
                    headers=dict(headers),
                    content_type=content_type,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=uuid.uuid4().hex,
                )
                await exchange.publish(message, routing_key=pub_queue, mandatory=True)

            await _pump(count, one, WINDOW)
            rate = _rate(start, cpu, count)
            await pub_q.purge()
            return rate

        async def publish_trusthop() -> Rate:
            events = [new_event() for _ in range(count)]
            start, cpu = time.perf_counter(), cpu_seconds()

            async def one(index: int) -> None:
                await publisher.publish(events[index], routing_key=pub_queue, parent=context)

            await _pump(count, one, WINDOW)
            rate = _rate(start, cpu, count)
            await pub_q.purge()
            return rate

        raw_pub, th_pub = await _interleave_async(rounds, [publish_raw, publish_trusthop])
        publish = _ratio_figure(
            "amqp_publish",
            Target(">=", 0.8),
            th_pub,
            raw_pub,
            1 / settings.raw_sign_s,
            "signing bound (1 signature per event)",
            {
                "count": count,
                "in_flight": WINDOW,
                "raw": "aio-pika publish with confirms, mandatory, persistent",
                "trusthop": "TrustedPublisher.publish (seal, encode, confirm)",
            },
        )
        _ = raw_q
        return [consume, publish]
    finally:
        with contextlib.suppress(Exception):
            cleanup = await connection.channel()
            for name in declared:
                with contextlib.suppress(Exception):
                    await cleanup.queue_delete(name)
        with contextlib.suppress(Exception):
            await connection.close()


def broker_not_measured(kind: str, why: str) -> list[Figure]:
    """The two figures of ``kind`` (``kafka`` or ``amqp``) as not measured."""
    if kind == "kafka":
        return [
            not_measured("kafka_consume", "ratio", Target(">=", 0.7), why),
            not_measured("kafka_produce", "ratio", Target(">=", 0.7), why),
        ]
    return [
        not_measured("amqp_consume", "ratio", Target(">=", 0.8), why),
        not_measured("amqp_publish", "ratio", Target(">=", 0.8), why),
    ]


__all__ = ["BrokerSettings", "amqp_figures", "broker_not_measured", "kafka_figures"]
