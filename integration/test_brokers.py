"""Each broker fixture yields a broker that really works, with the features trusthop needs."""

from __future__ import annotations

import asyncio

import aio_pika
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

RECEIVE_TIMEOUT = 30.0

# Header values exactly as trusthop puts them on the wire: a null value and
# bytes that are not UTF-8 must both survive the round trip unchanged.
KAFKA_HEADERS: list[tuple[str, bytes | None]] = [
    ("ce_specversion", b"1.0"),
    ("th-null", None),
    ("th-binary", b"\xff\xfe\x00\x80\xc3\x28"),
    ("th-empty", b""),
    ("th-binary", b"repeated key, second value"),
]


async def test_kafka_roundtrip_headers_group_commit(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, int], unique_name: str
) -> None:
    topic, group = f"{unique_name}-topic", f"{unique_name}-group"

    # The topic does not exist yet: it is auto-created on first produce.
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        first = await producer.send_and_wait(
            topic, value=b"first", key=b"k1", headers=KAFKA_HEADERS
        )
        second = await producer.send_and_wait(
            topic, value=b"second", key=b"k1", partition=first.partition
        )
    finally:
        await producer.stop()
    assert second.offset == first.offset + 1

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **kafka_consumer_options,
    )
    await consumer.start()
    try:
        msg = await asyncio.wait_for(consumer.getone(), RECEIVE_TIMEOUT)
        assert (msg.topic, msg.partition, msg.offset) == (topic, first.partition, first.offset)
        assert msg.key == b"k1"
        assert msg.value == b"first"
        assert list(msg.headers) == KAFKA_HEADERS
        tp = TopicPartition(topic, msg.partition)
        await consumer.commit({tp: msg.offset + 1})
        assert await consumer.committed(tp) == msg.offset + 1
    finally:
        await consumer.stop()

    # The committed offset is what the group resumes from. A manually assigned
    # consumer of the same group reads it without waiting for a rebalance.
    resumed = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await resumed.start()
    try:
        resumed.assign([tp])
        again = await asyncio.wait_for(resumed.getone(), RECEIVE_TIMEOUT)
        assert (again.offset, again.value) == (second.offset, b"second")
        assert list(again.headers) == []
    finally:
        await resumed.stop()


async def test_rabbitmq_confirmed_publish_and_get(amqp_url: str, unique_name: str) -> None:
    # pamqp encodes bytearray (AMQP field type 'x') but refuses bytes, and
    # decodes 'x' back to bytearray; None travels as void ('V').
    headers: dict[str, aio_pika.abc.FieldValue] = {
        "ce-specversion": "1.0",
        "th-count": 3,
        "th-flag": True,
        "th-null": None,
        "th-binary": bytearray(b"\xff\xfe\x00\x80"),
    }
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(unique_name, durable=False, auto_delete=False)
        try:
            confirmation = await channel.default_exchange.publish(
                aio_pika.Message(
                    body=b"hello",
                    headers=headers,
                    content_type="application/cloudevents+json",
                    message_id=unique_name,
                ),
                routing_key=queue.name,
            )
            assert confirmation is not None  # broker acked the publish

            incoming = await queue.get(timeout=RECEIVE_TIMEOUT, fail=True)
            assert incoming is not None
            await incoming.ack()
            assert incoming.body == b"hello"
            assert incoming.message_id == unique_name
            assert incoming.content_type == "application/cloudevents+json"
            assert incoming.headers == headers
        finally:
            await queue.delete(if_unused=False, if_empty=False)


async def test_redis_set_get(redis_url: str, unique_name: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.set(unique_name, b"\x00\xffvalue", ex=60, nx=True)
        assert await client.get(unique_name) == b"\x00\xffvalue"
        # nx: a second writer of the same key loses (replay-guard primitive).
        assert not await client.set(unique_name, b"other", ex=60, nx=True)
    finally:
        await client.delete(unique_name)
        await client.aclose()
