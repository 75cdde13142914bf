"""Kafka records without I/O: the outgoing record, its size, dead letters, verification.

Pure helpers shared by :class:`~trusthop.kafka.producer.TrustedKafkaProducer`
and :class:`~trusthop.kafka.consumer.TrustedKafkaConsumer`: the record as
handed to aiokafka, the byte budget's measure, the dead-letter topic and
headers, and the decode-then-verify step a consumer runs on every record.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from trusthop.bindings.kafka import decode_kafka
from trusthop.destination import kafka_destination
from trusthop.pipeline import ChainVerifier, Rejection, TrustedEvent

DEFAULT_MAX_MESSAGE_BYTES = 1_048_576
"""Kafka's default ``max.message.bytes`` (1 MiB), the default record budget."""

PARTITION_KEY_ATTRIBUTE = "partitionkey"
"""CloudEvents Partitioning extension: used as the Kafka key when none is given."""


class KafkaRecord(NamedTuple):
    """An outgoing record, exactly as it will be handed to aiokafka."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def record_size(
    key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes | None]]
) -> int:
    """Bytes a record carries: key + value + every header name (UTF-8) and value.

    This is the measure of the producer's budget. It ignores Kafka's framing
    (varints, batch header: a few dozen bytes), so keep the budget a little
    under the broker's ``max.message.bytes``.
    """
    size = len(key or b"") + len(value or b"")
    for name, header_value in headers:
        size += len(name.encode("utf-8")) + len(header_value or b"")
    return size


def default_dead_letter_topic(topic: str) -> str:
    """``<topic>.dlq``, the default dead-letter topic of ``topic``."""
    return f"{topic}.dlq"


def dead_letter_headers(
    original: Sequence[tuple[str, bytes | None]] | None, rejection: Rejection
) -> list[tuple[str, bytes | None]]:
    """The original headers, unchanged and in order, then the rejection's headers.

    Original headers are kept byte for byte (``None`` values and repeated keys
    included). The ``trusthop-*`` headers come last, so a reader that keeps the
    last value of a repeated key (``dict(headers)``) reads the consumer's
    verdict even if the original record already carried such a header.
    """
    headers: list[tuple[str, bytes | None]] = list(original or ())
    headers.extend((name, value.encode("utf-8")) for name, value in rejection.headers().items())
    return headers


def verify_record(
    verifier: ChainVerifier,
    *,
    topic: str,
    headers: Sequence[tuple[str, bytes | None]] | None,
    value: bytes | None,
) -> TrustedEvent:
    """Decode a consumed record and verify it as read from ``topic``.

    Pure (no I/O): :func:`~trusthop.bindings.kafka.decode_kafka` then
    :meth:`ChainVerifier.verify` against ``kafka:<topic>``.

    Raises:
        TrustError: whatever the record holds; any other exception is a bug.
    """
    wire = decode_kafka(headers, value)
    return verifier.verify(wire, kafka_destination(topic))
