"""Quarantine ("breaking the chain") on a real Kafka-protocol broker and a real RabbitMQ.

A workload publishes valid events; they wait in the topic or queue; the
operator swaps the consumer's policy for one that quarantines the workload's
namespace; the consumer then dead-letters every waiting event with
``segment_quarantined`` (read back from the real dead-letter topic or queue).
Lifting the quarantine lets new events through again. No key or token changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aio_pika
from aiokafka import AIOKafkaConsumer, TopicPartition
from cloudevents.core.v1.event import CloudEvent

from trusthop.amqp import Delivery, TrustedPublisher, TrustedWorker, dead_letter_queue_name
from trusthop.amqp.messages import retry_queue_name
from trusthop.bundle import TrustBundle
from trusthop.kafka import KafkaDelivery, TrustedKafkaConsumer, TrustedKafkaProducer
from trusthop.keys import SigningKey
from trusthop.pipeline import H_REASON, ChainSigner, ChainVerifier
from trusthop.policy import Policy, loads_policy
from trusthop.sign import Identity, mint_origin
from trusthop.verify import VerifiedContext

TIMEOUT = 60.0
QUEUED = 3
DOMAIN = "prod.example.com"
EDGE = Identity.create(f"spiffe://{DOMAIN}/ns/edge/sa/gateway", SigningKey.generate())
SHOP = Identity.create(f"spiffe://{DOMAIN}/ns/shop/sa/orders", SigningKey.generate())
BUNDLE = TrustBundle.of([EDGE.bundle_key, SHOP.bundle_key])

POLICY = f"""
default = "allow"
trust_domain = "{DOMAIN}"
levels = ["untrusted", "internal"]

[[members]]
namespace = "edge"
level = "internal"

[[members]]
namespace = "shop"
level = "internal"

[[requirements]]
destination = "*"
min_level = "internal"
"""

QUARANTINE = """
[[segments]]
name = "shop-quarantine"
namespace = "shop"
deny = ["*"]
"""


def policies() -> tuple[Policy, Policy]:
    """The normal policy and the same with the shop namespace quarantined."""
    return loads_policy(POLICY), loads_policy(POLICY + QUARANTINE)


def event(event_id: str) -> CloudEvent:
    return CloudEvent(
        {"id": event_id, "source": "/shop", "type": "com.example.order.placed"},
        {"order": event_id},
    )


def edge_context() -> VerifiedContext:
    """A verified delivery from the edge: the parent the shop workload derives from."""
    origin = mint_origin(
        EDGE,
        subject="user:alice",
        issuer="https://idp.example.com",
        credential="token-of-alice",
        scope=["orders:write"],
        now=time.time(),
    )
    wire = ChainSigner(EDGE).seal(event("intake-1"), destination="kafka:intake", origin=origin)
    return ChainVerifier(BUNDLE).verify(wire, "kafka:intake").context


async def kafka_reasons(bootstrap: str, topic: str) -> list[str]:
    """The ``trusthop-reason`` header of every record in ``topic``."""
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await reader.start()
    try:
        partitions = reader.partitions_for_topic(topic) or {0}
        tps = [TopicPartition(topic, p) for p in partitions]
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        end = await reader.end_offsets(tps)
        reasons: list[str] = []
        async with asyncio.timeout(TIMEOUT):
            while [tp for tp in tps if await reader.position(tp) < end[tp]]:
                for records in (await reader.getmany(timeout_ms=500)).values():
                    for record in records:
                        reasons += [
                            v.decode() for k, v in record.headers or () if k == H_REASON and v
                        ]
        return reasons
    finally:
        await reader.stop()


async def test_kafka_quarantine_dead_letters_records_already_in_the_topic(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, int], unique_name: str
) -> None:
    normal, quarantined = policies()
    parent = edge_context()
    verifier = ChainVerifier(BUNDLE, origin_actors=[EDGE.actor], policy=normal)
    producer = TrustedKafkaProducer(
        signer=ChainSigner(SHOP, policy=normal), bootstrap_servers=kafka_bootstrap
    )
    options: dict[str, Any] = dict(kafka_consumer_options)
    consumer = TrustedKafkaConsumer(
        unique_name,
        verifier=verifier,
        group_id=f"{unique_name}-shipping",
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        **options,
    )
    handled: list[str] = []

    async def handle(delivery: KafkaDelivery) -> None:
        handled.append(delivery.event.get_id())

    await producer.start()
    try:
        for n in range(QUEUED):
            await producer.send_and_wait(unique_name, event(f"queued-{n}"), parent=parent)
        verifier.policy = quarantined  # the records wait in the topic meanwhile
        async with consumer:
            settled = await asyncio.wait_for(consumer.run(handle, limit=QUEUED), TIMEOUT)
            assert settled == QUEUED and handled == []
            assert consumer.stats.dead_lettered == {"segment_quarantined": QUEUED}

            verifier.policy = normal  # lift the quarantine: new records pass
            for n in range(2):
                await producer.send_and_wait(unique_name, event(f"after-{n}"), parent=parent)
            settled = await asyncio.wait_for(consumer.run(handle, limit=2), TIMEOUT)
        # Auto-created topics have several partitions: no order across them.
        assert settled == 2 and sorted(handled) == ["after-0", "after-1"]
    finally:
        await producer.stop()
    dead = await kafka_reasons(kafka_bootstrap, consumer.dead_letter_topic_for(unique_name))
    assert dead == ["segment_quarantined"] * QUEUED


async def test_amqp_quarantine_dead_letters_messages_already_in_the_queue(
    amqp_url: str, unique_name: str
) -> None:
    normal, quarantined = policies()
    parent = edge_context()
    verifier = ChainVerifier(BUNDLE, origin_actors=[EDGE.actor], policy=normal)
    exchange_name, routing_key = f"{unique_name}-x", "order.placed"
    queue_name, dlx = f"{unique_name}-q", f"{unique_name}-dlx"
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.DIRECT)
        queue = await channel.declare_queue(
            queue_name,
            durable=True,
            arguments={"x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": queue_name},
        )
        await queue.bind(exchange, routing_key=routing_key)
        publisher = TrustedPublisher(channel, signer=ChainSigner(SHOP, policy=normal))
        for n in range(QUEUED):
            await publisher.publish(
                event(f"queued-{n}"), exchange=exchange, routing_key=routing_key, parent=parent
            )
        counter = await connection.channel()
        declared = await counter.declare_queue(queue_name, passive=True)
        assert declared.declaration_result.message_count == QUEUED  # really waiting
        await counter.close()

        verifier.policy = quarantined
        handled: list[str] = []
        worker = TrustedWorker(
            await connection.channel(publisher_confirms=True),
            verifier=verifier,
            dead_letter_exchange=dlx,
        )

        @worker.handler(queue_name, declare=False, accept_bindings=[(exchange_name, routing_key)])
        async def on_message(delivery: Delivery) -> None:
            handled.append(delivery.event.get_id())

        async with worker:
            async with asyncio.timeout(TIMEOUT):
                while worker.stats.total_dead_lettered < QUEUED:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            assert handled == []

            verifier.policy = normal  # lift the quarantine: new messages pass
            for n in range(2):
                await publisher.publish(
                    event(f"after-{n}"), exchange=exchange, routing_key=routing_key, parent=parent
                )
            async with asyncio.timeout(TIMEOUT):
                while len(handled) < 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        assert sorted(handled) == ["after-0", "after-1"]
        assert worker.stats.total_dead_lettered == QUEUED

        dlq = await channel.declare_queue(dead_letter_queue_name(queue_name), durable=True)
        reasons = []
        while (message := await dlq.get(no_ack=True, fail=False, timeout=5)) is not None:
            reasons.append(str((message.headers or {}).get(H_REASON)))
        assert reasons == ["segment_quarantined"] * QUEUED
    finally:
        with contextlib.suppress(Exception):
            cleanup = await connection.channel()
            for name in (
                queue_name,
                dead_letter_queue_name(queue_name),
                retry_queue_name(queue_name),
            ):
                await cleanup.queue_delete(name)
            for name in (exchange_name, dlx):
                await cleanup.exchange_delete(name)
        await connection.close()
