"""Kafka records without I/O: the outgoing record, its size, dead letters, verification.

Pure helpers shared by :class:`~trusthop.kafka.producer.TrustedKafkaProducer`
and :class:`~trusthop.kafka.consumer.TrustedKafkaConsumer`: the record as
handed to aiokafka, the byte budget's measure, the dead-letter topic, the
headers of a dead letter (and of the stub written when a dead letter is too
large to send), and the decode-then-verify step a consumer runs on every
record (:func:`verify_record`, or :func:`verify_record_async` to consult the
verifier's external decision point).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from trusthop.bindings.kafka import decode_kafka
from trusthop.destination import kafka_destination
from trusthop.pipeline import ChainVerifier, Rejection, TrustedEvent

DEFAULT_MAX_MESSAGE_BYTES = 1_048_576
"""Kafka's default ``max.message.bytes`` (1 MiB), the default record budget."""

OWN_HEADER_PREFIX = "trusthop-"
"""Prefix of the headers only a consumer writes (compared case-insensitively)."""

H_ORIGINAL = "trusthop-original"
"""Stub dead letters: ``<topic>/<partition>/<offset>`` of the rejected record."""

H_ORIGINAL_BYTES = "trusthop-original-bytes"
"""Stub dead letters: :func:`record_size` of the rejected record."""

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


def default_dead_letter_max_request_size(consumer_kwargs: Mapping[str, Any]) -> int:
    """``max_request_size`` of the dead-letter producer a consumer builds.

    Twice the larger of Kafka's default ``max.message.bytes`` (1 MiB) and the
    consumer's ``max_partition_fetch_bytes``: a dead letter is its original
    plus a few hundred bytes of ``trusthop-*`` headers, and the original is
    at most what the broker accepted and the consumer fetched (aiokafka's
    default producer limit, 1 MiB, is below that for a 1 MiB record).

    Raises:
        ValueError, TypeError: ``max_partition_fetch_bytes`` is not an integer.
    """
    fetch = int(consumer_kwargs.get("max_partition_fetch_bytes", DEFAULT_MAX_MESSAGE_BYTES))
    return 2 * max(DEFAULT_MAX_MESSAGE_BYTES, fetch)


def is_own_header(name: str) -> bool:
    """Whether ``name`` is a ``trusthop-*`` header, in any letter case.

    ``casefold`` rather than ``lower``: a name that folds to ``trusthop-...``
    (``TRU\u017fTHOP-reason``, with a long s) would match a lenient reader too.
    """
    return name.casefold().startswith(OWN_HEADER_PREFIX)


def _verdict(rejection: Rejection) -> list[tuple[str, bytes | None]]:
    # Never raises: a detail quoting a handler's message may hold lone
    # surrogates, which strict UTF-8 refuses (and a dead letter must be written).
    return [
        (name, value.encode("utf-8", "backslashreplace"))
        for name, value in rejection.headers().items()
    ]


def dead_letter_headers(
    original: Sequence[tuple[str, bytes | None]] | None, rejection: Rejection
) -> list[tuple[str, bytes | None]]:
    """The original headers minus any ``trusthop-*`` ones, then the rejection's headers.

    Only the consumer writes ``trusthop-*`` headers: every incoming header
    whose name starts with ``trusthop-`` in any letter case
    (:func:`is_own_header`) is dropped, so a sender cannot plant a verdict
    (``trusthop-reason: handler_failed``) that a reader of the dead letter
    would take for the consumer's. The other headers are kept byte for byte
    and in order (``None`` values and repeated keys included); the
    ``trusthop-*`` headers of ``rejection`` come last, each exactly once.

    Pure; never raises (text is encoded as UTF-8, lone surrogates escaped).
    """
    headers: list[tuple[str, bytes | None]] = [
        (name, value) for name, value in original or () if not is_own_header(name)
    ]
    headers.extend(_verdict(rejection))
    return headers


def stub_dead_letter_headers(
    rejection: Rejection, *, topic: str, partition: int, offset: int, size: int | None
) -> list[tuple[str, bytes | None]]:
    """Headers of a stub dead letter: the verdict, and where the original is.

    Written instead of the full dead letter when that is too large to send
    (see :class:`~trusthop.kafka.consumer.TrustedKafkaConsumer`). None of the
    original's headers are kept; after the rejection's ``trusthop-*``
    headers come ``trusthop-original: <topic>/<partition>/<offset>`` (Kafka
    topic names hold no ``/``) and ``trusthop-original-bytes: <size>``, so an
    operator can fetch the original from its source topic while its
    retention lasts. ``size=None`` (the record could not be read, so its
    size is unknown) leaves out ``trusthop-original-bytes``.

    Pure; never raises.
    """
    headers = [*_verdict(rejection), (H_ORIGINAL, f"{topic}/{partition}/{offset}".encode())]
    if size is not None:
        headers.append((H_ORIGINAL_BYTES, str(size).encode()))
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
        RuntimeError: the verifier has a PDP (use :func:`verify_record_async`).
    """
    wire = decode_kafka(headers, value)
    return verifier.verify(wire, kafka_destination(topic))


async def verify_record_async(
    verifier: ChainVerifier,
    *,
    topic: str,
    headers: Sequence[tuple[str, bytes | None]] | None,
    value: bytes | None,
) -> TrustedEvent:
    """:func:`verify_record`, with the verifier's external decision point.

    No transport I/O: :func:`~trusthop.bindings.kafka.decode_kafka` then
    :meth:`ChainVerifier.verify_async` against ``kafka:<topic>`` (which
    awaits the PDP, if one is configured). What the consumer runs.

    Raises:
        TrustError: whatever the record holds, or ``pdp_unavailable`` /
            the PDP's deny reason; any other exception is a bug.
    """
    wire = decode_kafka(headers, value)
    return await verifier.verify_async(wire, kafka_destination(topic))
