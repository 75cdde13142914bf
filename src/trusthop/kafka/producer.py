"""Kafka producer wrapper: seal, encode, check the byte budget, send.

:class:`TrustedKafkaProducer` seals the event for ``kafka:<topic>``, encodes
it (binary or structured mode), checks the record against a byte budget that
counts headers, key and value, then sends. A problem raises
:class:`~trusthop.errors.TrustError` before anything is sent, with the reason
code a consumer would give.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaProducer
from cloudevents.core.v1.event import CloudEvent

from trusthop.bindings.kafka import encode_kafka
from trusthop.chain import OriginRing, check_chain_text
from trusthop.destination import kafka_destination
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent, wire_value
from trusthop.kafka.records import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PARTITION_KEY_ATTRIBUTE,
    KafkaRecord,
    record_size,
)
from trusthop.pipeline import ChainSigner
from trusthop.verify import Limits, VerifiedContext


class TrustedKafkaProducer:
    """Seal, encode and publish CloudEvents to Kafka with a trust chain.

    Args:
        signer: the workload's :class:`ChainSigner`.
        structured: structured content mode (``application/cloudevents+json``)
            instead of binary mode (``ce_*`` headers).
        max_message_bytes: budget for headers + key + value (see
            :func:`record_size`); aiokafka's own check only guards its
            ``max_request_size``, not what the broker will accept.
        limits: the chain bounds consumers enforce; a chain the producer
            would seal beyond them is refused at send time.
        producer: an existing ``AIOKafkaProducer`` to use instead of building
            one. It stays the caller's: :meth:`start` and :meth:`stop` leave
            it alone.
        **producer_kwargs: forwarded to ``AIOKafkaProducer`` (e.g.
            ``bootstrap_servers``, ``acks``, ``client_id``).

    Raises:
        TypeError: ``producer=`` together with aiokafka kwargs, or a
            ``key_serializer``/``value_serializer`` (records are bytes already).
        ValueError: a non-positive ``max_message_bytes``.
    """

    def __init__(
        self,
        *,
        signer: ChainSigner,
        structured: bool = False,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        limits: Limits | None = None,
        producer: Any = None,
        **producer_kwargs: Any,
    ) -> None:
        for name in ("key_serializer", "value_serializer"):
            if name in producer_kwargs:
                raise TypeError(f"{name} is not supported: trusthop sends encoded bytes")
        if max_message_bytes <= 0:
            raise ValueError("max_message_bytes must be positive")
        if producer is not None and producer_kwargs:
            raise TypeError("give either producer= or aiokafka keyword arguments, not both")
        self.signer = signer
        self.structured = structured
        self.max_message_bytes = max_message_bytes
        self.limits = limits if limits is not None else Limits()
        self._owned = producer is None
        self._producer: Any = AIOKafkaProducer(**producer_kwargs) if producer is None else producer

    @property
    def client(self) -> Any:
        """The wrapped ``AIOKafkaProducer`` (for what this wrapper does not cover)."""
        return self._producer

    async def start(self) -> None:
        """Start the owned aiokafka producer (connects, fetches metadata).

        Raises:
            aiokafka.errors.KafkaError: from aiokafka (the owned producer is
                stopped again first, so nothing is left open).
        """
        if self._owned:
            try:
                await self._producer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await self._producer.stop()
                raise

    async def stop(self) -> None:
        """Flush and stop the owned aiokafka producer."""
        if self._owned:
            await self._producer.stop()

    async def flush(self) -> None:
        """Wait until every record sent so far is acknowledged (aiokafka ``flush``)."""
        await self._producer.flush()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def seal(
        self,
        topic: str,
        event: CloudEvent,
        *,
        origin: OriginRing | None = None,
        parent: VerifiedContext | None = None,
        scope: Iterable[str] | None = None,
        peer: str | None = None,
        key: bytes | str | None = None,
        consumed_event_id: str | None = None,
    ) -> KafkaRecord:
        """The record :meth:`send` would publish (no I/O).

        The hop ring names ``kafka:<topic>``. ``key`` defaults to the event's
        ``partitionkey`` extension when it has one. ``consumed_event_id``
        also records the parent event's id in the new ring (see
        :meth:`~trusthop.pipeline.ChainSigner.seal`).

        Raises:
            TrustError: ``scope_escalation``, ``expired``,
                ``unauthorized_actor`` (refused by the signer),
                ``too_large``/``depth_exceeded`` (the chain is beyond
                ``limits``), ``too_large`` (the record is over
                ``max_message_bytes``), ``malformed`` (the event cannot be
                encoded).
            ValueError: neither or both of ``origin`` and ``parent``.
        """
        wire = self.signer.seal(
            event,
            destination=kafka_destination(topic),
            origin=origin,
            parent=parent,
            scope=scope,
            peer=peer,
            consumed_event_id=consumed_event_id,
        )
        self._check_limits(wire.chain)
        headers, value = encode_kafka(wire, structured=self.structured)
        key_bytes = _key_bytes(key, wire)
        # Kafka has no "CloudEvent without data": an empty value decodes to no data.
        body = value if value is not None else b""
        size = record_size(key_bytes, body, headers)
        if size > self.max_message_bytes:
            raise TrustError(
                Reason.TOO_LARGE,
                f"record for {topic!r} is {size} bytes (headers, key and value), "
                f"the budget is {self.max_message_bytes}",
            )
        return KafkaRecord(topic, key_bytes, body, headers)

    def _check_limits(self, chain: str | None) -> None:
        """Refuse a sealed chain that consumers with :attr:`limits` reject
        before decoding it, with the core's own check of the encoded text
        (its length and ring count; nothing is decoded).

        Raises:
            TrustError: ``too_large`` or ``depth_exceeded``.
        """
        if chain is not None:
            limits = self.limits
            check_chain_text(chain, max_bytes=limits.max_bytes, max_rings=limits.max_rings)

    async def send(
        self,
        topic: str,
        event: CloudEvent,
        *,
        origin: OriginRing | None = None,
        parent: VerifiedContext | None = None,
        scope: Iterable[str] | None = None,
        peer: str | None = None,
        key: bytes | str | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        consumed_event_id: str | None = None,
    ) -> asyncio.Future[Any]:
        """Seal and enqueue ``event``; returns aiokafka's future of ``RecordMetadata``.

        Exactly one of ``origin`` (first event of a request, at the edge) or
        ``parent`` (the verified context of the delivery this event derives
        from) is given; ``scope`` narrows the scope (default: unchanged).

        Raises:
            TrustError: see :meth:`seal`; raised before anything is enqueued.
            ValueError: neither or both of ``origin`` and ``parent``.
            aiokafka.errors.KafkaError: from aiokafka (e.g. a timeout).
        """
        record = self.seal(
            topic,
            event,
            origin=origin,
            parent=parent,
            scope=scope,
            peer=peer,
            key=key,
            consumed_event_id=consumed_event_id,
        )
        future: asyncio.Future[Any] = await self._producer.send(
            record.topic,
            value=record.value,
            key=record.key,
            partition=partition,
            timestamp_ms=timestamp_ms,
            headers=record.headers,
        )
        return future

    async def send_and_wait(
        self,
        topic: str,
        event: CloudEvent,
        *,
        origin: OriginRing | None = None,
        parent: VerifiedContext | None = None,
        scope: Iterable[str] | None = None,
        peer: str | None = None,
        key: bytes | str | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        consumed_event_id: str | None = None,
    ) -> Any:
        """:meth:`send`, then wait for the broker: returns aiokafka's ``RecordMetadata``.

        Raises:
            TrustError, ValueError: as :meth:`send`.
            aiokafka.errors.KafkaError: the broker did not accept the record.
        """
        future = await self.send(
            topic,
            event,
            origin=origin,
            parent=parent,
            scope=scope,
            peer=peer,
            key=key,
            partition=partition,
            timestamp_ms=timestamp_ms,
            consumed_event_id=consumed_event_id,
        )
        return await future


def _key_bytes(key: bytes | str | None, wire: WireEvent) -> bytes | None:
    if key is None:
        partition_key = wire.attributes.get(PARTITION_KEY_ATTRIBUTE)
        if partition_key is None:
            return None
        return wire_value(partition_key).encode("utf-8")
    if isinstance(key, str):
        return key.encode("utf-8")
    return bytes(key)
