"""Workload identity on real brokers: an X.509-SVID edge and an ES256 workload,
verified from a SPIFFE bundle map file that is reloaded while messages wait.

The edge signs with its SVID (the ring carries its certificate; the bundle
holds only the trust domain's CA), the shop workload with an ES256 key. The
consumer reads its trust from a :class:`BundleSource`. Events wait in the
topic or queue; the operator revokes the shop namespace in the bundle file;
the consumer, never restarted, dead-letters every waiting event with
``revoked``; lifting the revocation lets new events through.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import aio_pika
from certkit import key_pem, make_ca, make_svid, pem
from cloudevents.core.v1.event import CloudEvent
from cryptography.hazmat.primitives.asymmetric import ec

from trusthop.amqp import Delivery, TrustedPublisher, TrustedWorker
from trusthop.amqp.messages import dead_letter_queue_name, retry_queue_name
from trusthop.bundle import BundleKey, BundleSource, TrustBundle
from trusthop.kafka import KafkaDelivery, TrustedKafkaConsumer, TrustedKafkaProducer
from trusthop.keys import ES256, SigningKey
from trusthop.pipeline import H_REASON, ChainSigner, ChainVerifier
from trusthop.sign import Identity, mint_origin
from trusthop.verify import VerifiedContext

TIMEOUT = 60.0
QUEUED = 3
TD = "prod.example.com"
GATEWAY = f"spiffe://{TD}/ns/edge/sa/gateway"
SHOP = Identity.create(
    f"spiffe://{TD}/ns/shop/sa/orders",
    SigningKey(ec.derive_private_key(0x5409, ec.SECP256R1())),  # ES256, deterministic
)
assert SHOP.key.alg == ES256


class Trust:
    """The CA, the edge's SVID identity and a bundle map file."""

    def __init__(self, directory: Path) -> None:
        self.root = make_ca(TD, key=ec.derive_private_key(0xCA, ec.SECP256R1()), days=3650)
        leaf, leaf_key = make_svid(
            [GATEWAY], self.root, key=ec.derive_private_key(0x6A7E, ec.SECP256R1()), days=3650
        )
        (directory / "svid.pem").write_bytes(pem(leaf))
        (directory / "svid_key.pem").write_bytes(key_pem(leaf_key))
        self.edge = Identity.from_svid_files(directory / "svid.pem", directory / "svid_key.pem")
        self.path = directory / "bundle.json"
        self.write(revoked=False)
        self.source = BundleSource(self.path)

    def bundle(self, *, revoked: bool, segment: str = "shop") -> TrustBundle:
        segments = [f"spiffe://{TD}/ns/{segment}"] if revoked else []
        return TrustBundle.of(
            [BundleKey(SHOP.kid, SHOP.actor, SHOP.key.public_key)],
            revoked_segments=segments,
            authorities={TD: [self.root[0]]},
        )

    def write(self, *, revoked: bool, segment: str = "shop") -> None:
        self.path.write_text(json.dumps(self.bundle(revoked=revoked, segment=segment).to_map()))

    def revoke(self, revoked: bool, segment: str = "shop") -> None:
        """Revoke (or restore) a namespace; ``edge`` revokes the rings every
        event shares, which the consumer's verified-prefix cache holds."""
        self.write(revoked=revoked, segment=segment)
        assert self.source.reload() is True

    def parent(self) -> VerifiedContext:
        """A verified edge delivery (SVID-signed) the shop workload derives from."""
        origin = mint_origin(
            self.edge, subject="user:alice", issuer="https://idp.example.com",
            credential="token-of-alice", scope=["orders:write"], now=time.time(),
        )
        assert origin.x5c, "the edge's rings carry its certificate"
        wire = ChainSigner(self.edge).seal(event("intake"), destination="kafka:intake",
                                           origin=origin)
        return ChainVerifier(self.source).verify(wire, "kafka:intake").context


def event(event_id: str) -> CloudEvent:
    return CloudEvent({"id": event_id, "source": "/shop", "type": "com.example.order.placed"},
                      {"order": event_id})


async def test_kafka_revocation_by_bundle_reload_reaches_waiting_records(
    kafka_bootstrap: str, kafka_consumer_options: dict[str, int], unique_name: str,
    tmp_path: Path,
) -> None:
    trust = Trust(tmp_path)
    parent = trust.parent()
    verifier = ChainVerifier(trust.source, origin_actors=[GATEWAY])
    producer = TrustedKafkaProducer(signer=ChainSigner(SHOP), bootstrap_servers=kafka_bootstrap)
    options: dict[str, Any] = dict(kafka_consumer_options)
    consumer = TrustedKafkaConsumer(
        unique_name, verifier=verifier, group_id=f"{unique_name}-g",
        bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest", **options,
    )
    handled: list[KafkaDelivery] = []

    async def handle(delivery: KafkaDelivery) -> None:
        handled.append(delivery)

    await producer.start()
    try:
        for n in range(QUEUED):
            await producer.send_and_wait(unique_name, event(f"queued-{n}"), parent=parent)
        trust.revoke(True)  # while the records wait in the topic
        async with consumer:
            settled = await asyncio.wait_for(consumer.run(handle, limit=QUEUED), TIMEOUT)
            assert settled == QUEUED and handled == []
            assert consumer.stats.dead_lettered == {"revoked": QUEUED}
            trust.revoke(False)
            await producer.send_and_wait(unique_name, event("after"), parent=parent)
            assert await asyncio.wait_for(consumer.run(handle, limit=1), TIMEOUT) == 1
            # The edge's rings are now a verified prefix in the consumer's
            # cache; revoking the edge reaches a new event on that prefix.
            cache = verifier.signature_cache
            assert cache is not None and len(cache) > 0
            trust.revoke(True, "edge")
            await producer.send_and_wait(unique_name, event("again"), parent=parent)
            assert await asyncio.wait_for(consumer.run(handle, limit=1), TIMEOUT) == 1
            assert consumer.stats.dead_lettered == {"revoked": QUEUED + 1}
    finally:
        await producer.stop()
    (delivery,) = handled
    assert delivery.context.actors == (GATEWAY, GATEWAY, SHOP.actor)
    assert delivery.context.chain.origin.x5c  # verified through the CA, not a bundled key


async def test_amqp_revocation_by_bundle_reload_reaches_waiting_messages(
    amqp_url: str, unique_name: str, tmp_path: Path
) -> None:
    trust = Trust(tmp_path)
    parent = trust.parent()
    verifier = ChainVerifier(trust.source, origin_actors=[GATEWAY])
    exchange_name, routing_key, queue_name = f"{unique_name}-x", "order.placed", f"{unique_name}-q"
    connection = await aio_pika.connect_robust(amqp_url)
    worker: TrustedWorker | None = None
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.DIRECT,
                                                  auto_delete=True)
        worker = TrustedWorker(await connection.channel(publisher_confirms=True),
                               verifier=verifier)
        handled: list[str] = []

        @worker.handler(queue_name, bind=[(exchange_name, routing_key)])
        async def on_message(delivery: Delivery) -> None:
            handled.append(delivery.event.get_id())

        await worker.start()
        await worker.stop()  # queue declared and bound; nothing consumed yet
        publisher = TrustedPublisher(channel, signer=ChainSigner(SHOP))
        for n in range(QUEUED):
            await publisher.publish(event(f"queued-{n}"), exchange=exchange,
                                    routing_key=routing_key, parent=parent)
        trust.revoke(True)
        async with worker:
            async with asyncio.timeout(TIMEOUT):
                while worker.stats.total_dead_lettered < QUEUED:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            assert handled == []
            trust.revoke(False)
            await publisher.publish(event("after"), exchange=exchange, routing_key=routing_key,
                                    parent=parent)
            async with asyncio.timeout(TIMEOUT):
                while not handled:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            # The edge's rings are cached as a verified prefix now: revoking
            # the edge reaches the next event on that prefix.
            trust.revoke(True, "edge")
            await publisher.publish(event("again"), exchange=exchange, routing_key=routing_key,
                                    parent=parent)
            async with asyncio.timeout(TIMEOUT):
                while worker.stats.total_dead_lettered < QUEUED + 1:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        assert handled == ["after"]
        dlq = await channel.declare_queue(dead_letter_queue_name(queue_name), durable=True)
        reasons = []
        while (message := await dlq.get(no_ack=True, fail=False, timeout=5)) is not None:
            reasons.append(str((message.headers or {}).get(H_REASON)))
        assert reasons == ["revoked"] * (QUEUED + 1)
    finally:
        with contextlib.suppress(Exception):
            cleanup = await connection.channel()
            for name in (queue_name, dead_letter_queue_name(queue_name),
                         retry_queue_name(queue_name)):
                await cleanup.queue_delete(name)
            await cleanup.exchange_delete(exchange_name)
        await connection.close()
