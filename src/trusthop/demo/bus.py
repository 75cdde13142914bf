"""What the demo needs from a transport, and the in-memory implementation."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from cloudevents.core.v1.event import CloudEvent

from trusthop.chain import OriginRing
from trusthop.event import WireEvent
from trusthop.memory import MemoryBroker, MemoryConsumer, MemoryDelivery, MemoryProducer
from trusthop.metrics import Counters
from trusthop.pipeline import H_CONSUMER, H_REASON, ChainSigner, ChainVerifier, TrustedEvent
from trusthop.stores import MemoryReplayStore
from trusthop.verify import VerifiedContext

RETRY_DELAY = 0.05
"""Seconds before a handler's second attempt, on every transport of the demo."""


@dataclass(frozen=True, slots=True)
class Received:
    """One accepted delivery as the demo's handlers see it, whatever the
    transport: the verified event, the delivery kind (``first``,
    ``redelivery``, ``retry``) and the handler attempt (1 for the first)."""

    trusted: TrustedEvent
    kind: str = "first"
    attempt: int = 1

    @property
    def event_id(self) -> str:
        return str(self.trusted.event.get_id())


Handler = Callable[[Received], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A dead-lettered message as read back from the dead-letter destination."""

    event_id: str | None
    reason: str


class Bus(Protocol):
    """The transport operations the demo flow uses.

    Every consumer of one ``consumer`` name (a Kafka group, an AMQP queue's
    worker, an in-memory group) shares one replay store for the whole run,
    as replicas sharing a Redis store would, so a consumer started after a
    crash recognises the redelivery. Every consumer reports its counters to
    ``counters`` (the sum over all of them).
    """

    name: str
    counters: Counters

    def kafka(self, topic: str) -> str:
        """The destination of a Kafka topic (names may get a per-run suffix)."""

    def amqp(self, exchange: str, routing_key: str) -> str:
        """The destination of an AMQP exchange and routing key."""

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
        """Seal and publish through the transport's trusted producer."""

    async def inject(self, destination: str, wire: WireEvent) -> None:
        """Publish raw bytes as an attacker with broker write access would."""

    async def consume(
        self,
        destination: str,
        *,
        consumer: str,
        verifier: ChainVerifier,
        handler: Handler,
        count: int,
    ) -> None:
        """Settle ``count`` messages (handled, dead-lettered, or skipped; a
        message retried settles once, with its last attempt), then return.

        Raises:
            ConsumerCrash: raised by ``handler``: the consumer stops at once
                without committing the message (the next consumer of the
                same name gets it again as a redelivery).
        """

    async def dead_letters(self, destination: str, *, consumer: str) -> list[DeadLetter]:
        """What ``consumer`` dead-lettered, read back from its dead-letter destination."""

    async def close(self) -> None: ...


def _event_id(headers: Iterable[tuple[str, bytes | None]]) -> str | None:
    for key, value in headers:
        if key == "ce_id" and value is not None:
            return value.decode("utf-8", "replace")
    return None


class MemoryBus:
    """The demo's default transport: everything in this process."""

    name = "memory"

    def __init__(self) -> None:
        self.broker = MemoryBroker()
        self.counters = Counters()
        self._stores: dict[str, MemoryReplayStore] = {}

    def kafka(self, topic: str) -> str:
        return f"kafka:{topic}"

    def amqp(self, exchange: str, routing_key: str) -> str:
        return f"amqp:{exchange}/{routing_key}"

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
        producer = MemoryProducer(self.broker, signer=signer)
        await producer.send_and_wait(destination, event, origin=origin, parent=parent, scope=scope)

    async def inject(self, destination: str, wire: WireEvent) -> None:
        self.broker.publish_wire(destination, wire)

    async def consume(
        self,
        destination: str,
        *,
        consumer: str,
        verifier: ChainVerifier,
        handler: Handler,
        count: int,
    ) -> None:
        memory = MemoryConsumer(
            self.broker,
            destination,
            verifier=verifier,
            group_id=consumer,
            replay_store=self._stores.setdefault(consumer, MemoryReplayStore()),
            metrics=self.counters,
            retry_delay=RETRY_DELAY,
        )

        async def on_delivery(delivery: MemoryDelivery) -> None:
            await handler(Received(delivery.trusted, str(delivery.kind), delivery.attempt))

        done = 0
        while done < count:
            settled = await memory.drain(on_delivery)
            if settled == 0:
                raise RuntimeError(f"{consumer}: expected {count} messages, got {done}")
            done += settled

    async def dead_letters(self, destination: str, *, consumer: str) -> list[DeadLetter]:
        return [
            DeadLetter(_event_id(m.headers), m.header(H_REASON) or "?")
            for m in self.broker.messages(f"{destination}.dlq")
            if m.header(H_CONSUMER) == consumer
        ]

    async def close(self) -> None:
        return None
