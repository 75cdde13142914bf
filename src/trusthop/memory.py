"""An in-memory transport with the semantics of the broker wrappers.

It exists for the demo and for tests that need delivery semantics without a
broker. Messages are stored in their Kafka binary-mode (or structured-mode)
encoding and decoded on delivery, so the bindings run exactly as they do on a
broker. Like the Kafka and AMQP wrappers:

* each destination is an append-only log; each consumer group has its own
  committed offset, advanced only after the handler finished or the message
  was dead-lettered;
* a message that fails decoding or verification is dead-lettered at once to
  ``<destination>.dlq`` with the ``trusthop-*`` headers of :class:`Rejection`;
* a handler that raises is retried up to ``max_attempts`` times, then the
  message is dead-lettered with reason ``handler_failed``.

Destinations are the same strings the real transports use (``kafka:orders``,
``amqp:shipping/order.reserved``), so chains produced in memory name the
destinations they would have on real brokers.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from cloudevents.core.v1.event import CloudEvent

from trusthop.bindings.kafka import KafkaHeaders, decode_kafka, encode_kafka
from trusthop.chain import OriginRing
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.pipeline import ChainSigner, ChainVerifier, Rejection, TrustedEvent
from trusthop.verify import VerifiedContext


@dataclass(frozen=True, slots=True)
class MemoryMessage:
    """One stored message: its headers and value, as a Kafka record would hold them."""

    destination: str
    offset: int
    headers: tuple[tuple[str, bytes | None], ...]
    value: bytes | None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` decoded as UTF-8, if present."""
        for key, value in self.headers:
            if key == name and value is not None:
                return value.decode("utf-8", "replace")
        return None


@dataclass
class MemoryBroker:
    """Append-only logs per destination and committed offsets per group."""

    logs: dict[str, list[MemoryMessage]] = field(default_factory=dict)
    committed: dict[tuple[str, str], int] = field(default_factory=dict)

    def append(
        self, destination: str, headers: Iterable[tuple[str, bytes | None]], value: bytes | None
    ) -> MemoryMessage:
        """Store raw headers and value (anything: attacks use this directly)."""
        log = self.logs.setdefault(destination, [])
        message = MemoryMessage(destination, len(log), tuple(headers), value)
        log.append(message)
        return message

    def publish_wire(
        self, destination: str, wire: WireEvent, *, structured: bool = False
    ) -> MemoryMessage:
        """Store an already sealed (or deliberately tampered) event."""
        headers, value = encode_kafka(wire, structured=structured)
        return self.append(destination, headers, value)

    def messages(self, destination: str) -> list[MemoryMessage]:
        return list(self.logs.get(destination, ()))


class MemoryProducer:
    """Seals and publishes events into a :class:`MemoryBroker`."""

    def __init__(
        self, broker: MemoryBroker, *, signer: ChainSigner, structured: bool = False
    ) -> None:
        self.broker = broker
        self.signer = signer
        self.structured = structured

    async def send_and_wait(
        self,
        destination: str,
        event: CloudEvent,
        *,
        origin: OriginRing | None = None,
        parent: VerifiedContext | None = None,
        scope: Iterable[str] | None = None,
    ) -> MemoryMessage:
        """Seal ``event`` for ``destination`` and append it.

        Raises:
            TrustError: what :meth:`ChainSigner.seal` raises (same codes a
                consumer would give).
        """
        wire = self.signer.seal(
            event, destination=destination, origin=origin, parent=parent, scope=scope
        )
        return self.broker.publish_wire(destination, wire, structured=self.structured)


Handler = Callable[[TrustedEvent], Awaitable[None]]


class MemoryConsumer:
    """Consumes one destination for one consumer group, verifying first."""

    def __init__(
        self,
        broker: MemoryBroker,
        destination: str,
        *,
        verifier: ChainVerifier,
        group_id: str,
        max_attempts: int = 3,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.broker = broker
        self.destination = destination
        self.verifier = verifier
        self.group_id = group_id
        self.max_attempts = max_attempts
        self.stats: Counter[str] = Counter()

    @property
    def dead_letter_destination(self) -> str:
        return f"{self.destination}.dlq"

    def _dead_letter(self, message: MemoryMessage, rejection: Rejection) -> None:
        headers: KafkaHeaders = [(k, v) for k, v in message.headers if v is not None]
        headers += [(k, v.encode("utf-8")) for k, v in rejection.headers().items()]
        self.broker.append(self.dead_letter_destination, headers, message.value)
        self.stats[f"dead_lettered:{rejection.reason.value}"] += 1

    async def _process(self, message: MemoryMessage, handler: Handler) -> None:
        try:
            wire = decode_kafka(message.headers, message.value)
            trusted = await self.verifier.verify_async(wire, self.destination)
        except TrustError as error:
            self._dead_letter(
                message, Rejection.of(error, source=self.destination, consumer=self.group_id)
            )
            return
        for attempt in range(1, self.max_attempts + 1):
            try:
                await handler(trusted)
            except Exception as exc:  # a handler failure of any kind is retried
                if attempt == self.max_attempts:
                    failure = TrustError(Reason.HANDLER_FAILED, f"{type(exc).__name__}: {exc}")
                    self._dead_letter(
                        message,
                        Rejection.of(
                            failure,
                            source=self.destination,
                            consumer=self.group_id,
                            attempts=attempt,
                        ),
                    )
                    return
                await asyncio.sleep(0)
            else:
                self.stats["delivered"] += 1
                return

    async def drain(self, handler: Handler) -> int:
        """Process every message not yet committed for this group; return how many.

        Each offset is committed only after its message was handled or
        dead-lettered, so an exception escaping here (a cancelled task) leaves
        the message to be delivered again.
        """
        key = (self.group_id, self.destination)
        processed = 0
        while True:
            position = self.broker.committed.get(key, 0)
            log = self.broker.logs.get(self.destination, [])
            if position >= len(log):
                return processed
            await self._process(log[position], handler)
            self.broker.committed[key] = position + 1
            processed += 1
