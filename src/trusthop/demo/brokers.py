"""The demo on real brokers: Kafka through aiokafka, RabbitMQ through aio-pika.

Every name gets a per-run suffix (``trusthop-demo-orders-<run>``) so runs never
see each other's messages on long-lived brokers. Verified traffic goes through
the real wrappers (:class:`~trusthop.kafka.TrustedKafkaProducer`,
:class:`~trusthop.kafka.TrustedKafkaConsumer`,
:class:`~trusthop.amqp.TrustedPublisher`, :class:`~trusthop.amqp.TrustedWorker`);
attacks are written with the plain clients, as an attacker with broker access
would; rejections are read back from the dead-letter topic or queue.

Every consumer name (a Kafka group, the worker of an AMQP queue) keeps one
replay store for the run and reports to one :class:`~trusthop.metrics.Counters`,
so the delivery scenarios run here as in memory: inventory's consumer dies
mid-handler (the handler raises :class:`~trusthop.memory.ConsumerCrash`, which
leaves the record uncommitted) and a new consumer of the group gets the
record again; the attacker's copy lands at a new offset (``replayed``);
shipping's failed handler goes through RabbitMQ's ``<queue>.retry``; two
groups read the tracking topic.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from typing import Any

import aio_pika
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from cloudevents.core.v1.event import CloudEvent

from trusthop.amqp import (
    DEFAULT_DEAD_LETTER_EXCHANGE,
    Delivery,
    TrustedPublisher,
    TrustedWorker,
    dead_letter_queue_name,
    retry_queue_name,
)
from trusthop.bindings.amqp import encode_amqp
from trusthop.bindings.kafka import encode_kafka
from trusthop.chain import OriginRing
from trusthop.demo.bus import RETRY_DELAY, DeadLetter, Handler, Received, _event_id
from trusthop.event import WireEvent
from trusthop.kafka import KafkaDelivery, TrustedKafkaConsumer, TrustedKafkaProducer
from trusthop.metrics import Counters
from trusthop.pipeline import H_CONSUMER, H_REASON, ChainSigner, ChainVerifier
from trusthop.stores import MemoryReplayStore
from trusthop.verify import VerifiedContext

_TIMEOUT = 60.0


class BrokerBus:
    """Kafka topics for ``kafka:`` destinations, RabbitMQ for ``amqp:`` ones."""

    name = "kafka+rabbitmq"

    def __init__(
        self, *, kafka: str, amqp: str, consumer_options: dict[str, Any] | None = None
    ) -> None:
        self.bootstrap = kafka
        self.consumer_options = dict(consumer_options or {})
        self.amqp_url = amqp
        self.run = uuid.uuid4().hex[:8]
        self._producers: dict[str, TrustedKafkaProducer] = {}
        self._publishers: dict[str, TrustedPublisher] = {}
        self._raw: AIOKafkaProducer | None = None
        self._connection: Any = None
        self._channel: Any = None
        self._queues: dict[str, str] = {}
        self.counters = Counters()
        self._stores: dict[str, MemoryReplayStore] = {}
        # Handlers run concurrently (RabbitMQ prefetch): create clients once.
        self._lock = asyncio.Lock()

    # names ---------------------------------------------------------------

    def kafka(self, topic: str) -> str:
        return f"kafka:trusthop-demo-{topic}-{self.run}"

    def _group(self, consumer: str) -> str:
        return f"{consumer}-{self.run}"

    def amqp(self, exchange: str, routing_key: str) -> str:
        return f"amqp:trusthop-demo-{exchange}-{self.run}/{routing_key}"

    @staticmethod
    def _split(destination: str) -> tuple[str, str, str]:
        kind, _, rest = destination.partition(":")
        if kind == "kafka":
            return kind, rest, ""
        exchange, _, routing_key = rest.partition("/")
        return kind, exchange, routing_key

    # connections ---------------------------------------------------------

    async def _amqp_channel(self) -> Any:
        if self._channel is None:
            self._connection = await aio_pika.connect_robust(self.amqp_url)
            self._channel = await self._connection.channel(publisher_confirms=True)
        return self._channel

    async def _queue_for(self, destination: str) -> str:
        """Declare exchange, queue and binding for an AMQP destination once."""
        queue = self._queues.get(destination)
        if queue is None:
            _, exchange, routing_key = self._split(destination)
            channel = await self._amqp_channel()
            declared = await channel.declare_exchange(
                exchange, aio_pika.ExchangeType.DIRECT, auto_delete=False
            )
            queue = f"{exchange}.{routing_key}"
            q = await channel.declare_queue(
                queue,
                durable=True,
                arguments={
                    "x-dead-letter-exchange": DEFAULT_DEAD_LETTER_EXCHANGE,
                    "x-dead-letter-routing-key": queue,
                },
            )
            await q.bind(declared, routing_key=routing_key)
            self._queues[destination] = queue
        return queue

    async def _raw_producer(self) -> AIOKafkaProducer:
        if self._raw is None:
            self._raw = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
            await self._raw.start()
        return self._raw

    # the Bus protocol ----------------------------------------------------

    async def publish(
        self,
        signer: ChainSigner,
        destination: str,
        event: CloudEvent,
        *,
        origin: OriginRing | None = None,
        parent: VerifiedContext | None = None,
        scope: Iterable[str] | None = None,
    ) -> None:
        kind, name, routing_key = self._split(destination)
        actor = signer.identity.actor
        if kind == "kafka":
            async with self._lock:
                producer = self._producers.get(actor)
                if producer is None:
                    producer = TrustedKafkaProducer(signer=signer, bootstrap_servers=self.bootstrap)
                    await producer.start()
                    self._producers[actor] = producer
            await producer.send_and_wait(name, event, origin=origin, parent=parent, scope=scope)
            return
        async with self._lock:
            await self._queue_for(destination)
            publisher = self._publishers.get(actor)
            if publisher is None:
                publisher = TrustedPublisher(await self._amqp_channel(), signer=signer)
                self._publishers[actor] = publisher
        await publisher.publish(
            event,
            exchange=name,
            routing_key=routing_key,
            origin=origin,
            parent=parent,
            scope=scope,
        )

    async def inject(self, destination: str, wire: WireEvent) -> None:
        kind, name, routing_key = self._split(destination)
        if kind == "kafka":
            headers, value = encode_kafka(wire)
            await (await self._raw_producer()).send_and_wait(name, value, headers=headers)
            return
        await self._queue_for(destination)
        channel = await self._amqp_channel()
        headers_, body, content_type = encode_amqp(wire)
        exchange = await channel.get_exchange(name, ensure=False)
        await exchange.publish(
            aio_pika.Message(body, headers=dict(headers_), content_type=content_type),
            routing_key=routing_key,
            mandatory=True,
        )

    async def consume(
        self,
        destination: str,
        *,
        consumer: str,
        verifier: ChainVerifier,
        handler: Handler,
        count: int,
    ) -> None:
        kind, name, _ = self._split(destination)
        # One store per consumer name for the whole run: what replicas (and a
        # consumer restarted after a crash) sharing a Redis store would see.
        store = self._stores.setdefault(consumer, MemoryReplayStore())
        if kind == "kafka":
            kafka = TrustedKafkaConsumer(
                name,
                verifier=verifier,
                group_id=self._group(consumer),
                bootstrap_servers=self.bootstrap,
                auto_offset_reset="earliest",
                replay_store=store,
                metrics=self.counters,
                retry_delay=RETRY_DELAY,
                **self.consumer_options,
            )

            async def on_record(delivery: KafkaDelivery) -> None:
                await handler(Received(delivery.trusted, str(delivery.kind), delivery.attempt))

            # A ConsumerCrash from the handler leaves its record uncommitted
            # and stops this consumer (the context exit), as a dying process would.
            async with kafka:
                await asyncio.wait_for(kafka.run(on_record, limit=count), _TIMEOUT)
            return
        queue = await self._queue_for(destination)
        worker = TrustedWorker(
            await self._amqp_channel(),
            verifier=verifier,
            replay_store=store,
            metrics=self.counters,
            retry_delay=RETRY_DELAY,
        )

        _, exchange, routing_key = self._split(destination)

        @worker.handler(queue, declare=False, accept_bindings=[(exchange, routing_key)])
        async def on_message(delivery: Delivery) -> None:
            await handler(Received(delivery.trusted, str(delivery.kind), delivery.attempt))

        def settled() -> int:
            # Retried messages count once, when handled or dead-lettered at last.
            stats = worker.stats
            return stats.delivered + stats.total_dead_lettered + stats.skipped

        async with worker:
            async with asyncio.timeout(_TIMEOUT):
                # The worker's counters are the only signal that covers dead letters too.
                while settled() < count:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)

    async def dead_letters(self, destination: str, *, consumer: str) -> list[DeadLetter]:
        kind, name, _ = self._split(destination)
        if kind == "kafka":
            written = await self._kafka_dead_letters(f"{name}.dlq")
            return [letter for group, letter in written if group == self._group(consumer)]
        queue = await self._queue_for(destination)
        channel = await self._amqp_channel()
        dlq = await channel.declare_queue(dead_letter_queue_name(queue), durable=True)
        letters = []
        while (message := await dlq.get(no_ack=True, fail=False)) is not None:
            headers = message.headers or {}
            letters.append(
                DeadLetter(
                    str(headers.get("cloudEvents_id")) if "cloudEvents_id" in headers else None,
                    str(headers.get(H_REASON, "?")),
                )
            )
        return letters

    async def _kafka_dead_letters(self, topic: str) -> list[tuple[str | None, DeadLetter]]:
        """Every dead letter of ``topic`` with the group that wrote it."""
        reader = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await reader.start()
        try:
            partitions = reader.partitions_for_topic(topic) or {0}
            tps = [TopicPartition(topic, p) for p in partitions]
            reader.assign(tps)
            await reader.seek_to_beginning(*tps)
            end = await reader.end_offsets(tps)
            letters = []
            async with asyncio.timeout(_TIMEOUT):
                while [tp for tp in tps if await reader.position(tp) < end[tp]]:
                    batch = await reader.getmany(timeout_ms=500)
                    for records in batch.values():
                        for record in records:
                            headers = list(record.headers or ())
                            own = {k: v.decode() for k, v in headers if v is not None}
                            letters.append(
                                (
                                    own.get(H_CONSUMER),
                                    DeadLetter(_event_id(headers), own.get(H_REASON, "?")),
                                )
                            )
            return letters
        finally:
            await reader.stop()

    async def close(self) -> None:
        for producer in self._producers.values():
            await producer.stop()
        if self._raw is not None:
            await self._raw.stop()
        if self._connection is not None:
            # The run's names are unique: leave nothing behind on the broker.
            channel = await self._amqp_channel()
            for destination, queue in self._queues.items():
                await channel.queue_delete(queue)
                await channel.queue_delete(dead_letter_queue_name(queue))
                await channel.queue_delete(retry_queue_name(queue))
                await channel.exchange_delete(self._split(destination)[1])
            await self._connection.close()
