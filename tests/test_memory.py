"""Delivery semantics of the in-memory transport (the demo's default)."""

from __future__ import annotations

import asyncio
import time

import pytest
from cloudevents.core.v1.event import CloudEvent

from trusthop import (
    ChainSigner,
    ChainVerifier,
    Identity,
    MemoryBroker,
    MemoryConsumer,
    MemoryProducer,
    SigningKey,
    TrustBundle,
    TrustedEvent,
    mint_origin,
)
from trusthop.pipeline import H_ATTEMPTS, H_CONSUMER, H_REASON, H_SOURCE

GW = Identity.create(
    "spiffe://prod.example.com/ns/edge/sa/gateway", SigningKey.from_seed(b"g" * 32)
)
BUNDLE = TrustBundle.of([GW.bundle_key])


async def _publish(broker: MemoryBroker, n: int, destination: str = "kafka:orders") -> None:
    producer = MemoryProducer(broker, signer=ChainSigner(GW))
    for i in range(n):
        origin = mint_origin(
            GW, subject="user:a", issuer="idp", credential="t", scope=["s"], now=time.time()
        )
        event = CloudEvent({"type": "t", "source": "/s", "id": f"e{i}"}, {"i": i})
        await producer.send_and_wait(destination, event, origin=origin)


def _consumer(broker: MemoryBroker, group: str = "g", attempts: int = 3) -> MemoryConsumer:
    return MemoryConsumer(
        broker,
        "kafka:orders",
        verifier=ChainVerifier(BUNDLE),
        group_id=group,
        max_attempts=attempts,
    )


def test_each_group_gets_every_message_and_commits_after_handling() -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 3))
    seen: dict[str, list[str]] = {"a": [], "b": []}

    def handler_for(group: str):  # type: ignore[no-untyped-def]
        async def handle(trusted: TrustedEvent) -> None:
            assert broker.committed.get((group, "kafka:orders"), 0) == len(seen[group])
            seen[group].append(trusted.event.get_id())

        return handle

    for group in ("a", "b"):
        assert asyncio.run(_consumer(broker, group).drain(handler_for(group))) == 3
    assert seen == {"a": ["e0", "e1", "e2"], "b": ["e0", "e1", "e2"]}
    assert asyncio.run(_consumer(broker, "a").drain(handler_for("a"))) == 0


def test_a_crash_inside_the_handler_leaves_the_message_uncommitted() -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 2))
    calls: list[str] = []

    async def crash(trusted: TrustedEvent) -> None:
        calls.append(trusted.event.get_id())
        raise asyncio.CancelledError  # the process dies mid-handler

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(_consumer(broker).drain(crash))
    assert broker.committed.get(("g", "kafka:orders"), 0) == 0

    async def ok(trusted: TrustedEvent) -> None:
        calls.append(trusted.event.get_id())

    assert asyncio.run(_consumer(broker).drain(ok)) == 2
    assert calls == ["e0", "e0", "e1"]


def test_a_failing_handler_is_retried_then_dead_lettered() -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 1))
    attempts: list[int] = []

    async def fail(trusted: TrustedEvent) -> None:
        attempts.append(1)
        raise RuntimeError("database down")

    consumer = _consumer(broker, attempts=3)
    assert asyncio.run(consumer.drain(fail)) == 1
    assert len(attempts) == 3
    (letter,) = broker.messages("kafka:orders.dlq")
    assert letter.header(H_REASON) == "handler_failed"
    assert letter.header(H_ATTEMPTS) == "3"
    assert letter.value == broker.messages("kafka:orders")[0].value
    assert consumer.stats["dead_lettered:handler_failed"] == 1


def test_poison_messages_are_dead_lettered_once_with_their_reason() -> None:
    broker = MemoryBroker()
    broker.append("kafka:orders", [("ce_id", None), ("junk", b"\xff")], b"\x00")
    broker.append("kafka:orders", [], None)
    asyncio.run(_publish(broker, 1))
    handled: list[str] = []

    async def ok(trusted: TrustedEvent) -> None:
        handled.append(trusted.event.get_id())

    consumer = _consumer(broker)
    assert asyncio.run(consumer.drain(ok)) == 3
    assert handled == ["e0"]
    letters = broker.messages("kafka:orders.dlq")
    assert [m.header(H_REASON) for m in letters] == ["malformed", "malformed"]
    assert {m.header(H_SOURCE) for m in letters} == {"kafka:orders"}
    assert {m.header(H_CONSUMER) for m in letters} == {"g"}
    assert consumer.stats["delivered"] == 1


def test_a_message_published_to_one_destination_is_rejected_on_another() -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 1, destination="kafka:other"))
    message = broker.messages("kafka:other")[0]
    broker.append("kafka:orders", message.headers, message.value)

    async def never(trusted: TrustedEvent) -> None:
        raise AssertionError("must not run")

    assert asyncio.run(_consumer(broker).drain(never)) == 1
    assert broker.messages("kafka:orders.dlq")[0].header(H_REASON) == "wrong_destination"
