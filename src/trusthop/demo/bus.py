"""What the demo needs from a transport, and the in-memory implementation."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from cloudevents.core.v1.event import CloudEvent

from trusthop.chain import OriginRing
from trusthop.event import WireEvent
from trusthop.memory import MemoryBroker, MemoryConsumer, MemoryProducer
from trusthop.pipeline import H_REASON, ChainSigner, ChainVerifier, TrustedEvent
from trusthop.verify import VerifiedContext

Handler = Callable[[TrustedEvent], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A dead-lettered message as read back from the dead-letter destination."""

    event_id: str | None
    reason: str


class Bus(Protocol):
    """The transport operations the demo flow uses."""

    name: str

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
        """Process ``count`` messages (handled or dead-lettered), then return."""

    async def dead_letters(self, destination: str, *, consumer: str) -> list[DeadLetter]:
        """What the consumer dead-lettered, read back from its dead-letter destination."""

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
        memory = MemoryConsumer(self.broker, destination, verifier=verifier, group_id=consumer)
        done = 0
        while done < count:
            processed = await memory.drain(handler)
            if processed == 0:
                raise RuntimeError(f"{consumer}: expected {count} messages, got {done}")
            done += processed

    async def dead_letters(self, destination: str, *, consumer: str) -> list[DeadLetter]:
        return [
            DeadLetter(_event_id(m.headers), m.header(H_REASON) or "?")
            for m in self.broker.messages(f"{destination}.dlq")
        ]

    async def close(self) -> None:
        return None
