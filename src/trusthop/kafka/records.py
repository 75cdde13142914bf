"""Kafka records without I/O: the outgoing record, its size, dead letters, retries, verification.

Pure helpers shared by :class:`~trusthop.kafka.producer.TrustedKafkaProducer`
and :class:`~trusthop.kafka.consumer.TrustedKafkaConsumer`: the record as
handed to aiokafka, the byte budget's measure, the dead-letter topic, the
headers of a dead letter (and of the stub written when a dead letter is too
large to send), the headers of a retry copy and their strict parsers, and the
decode-then-verify step (:func:`decode_record`; :func:`verify_record`, or
:func:`verify_record_async` to consult the verifier's external decision
point, for tools that verify one record without a consumer).

Retry copies (see :class:`~trusthop.kafka.consumer.TrustedKafkaConsumer`)
carry the original key, value and headers (minus ``trusthop-*`` ones) plus
five headers only the consumer writes: :data:`H_RETRY` (the handler attempt
the copy is for), :data:`H_NOT_BEFORE` (epoch milliseconds when it is due),
:data:`H_ORIGINAL` (``<topic>/<partition>/<offset>`` of the first record),
``trusthop-attempts`` (handler attempts so far) and ``trusthop-consumer``
(the consumer group that wrote it: ``<topic>.retry`` is shared by every group
of ``<topic>``, and each one skips the copies of the others). Anyone who can
write to the retry topic can write these headers too: the parsers accept
only the exact form the consumer writes, and the replay store, not the
header, decides whether a retry is genuine (a forged number is
``replayed``; a copy naming another group is only skipped by this one).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from trusthop.bindings.kafka import decode_kafka
from trusthop.chain import HopRing, decode_chain
from trusthop.destination import kafka_destination
from trusthop.event import WireEvent
from trusthop.pipeline import H_ATTEMPTS, H_CONSUMER, ChainVerifier, Rejection, TrustedEvent
from trusthop.verify import Limits

DEFAULT_MAX_MESSAGE_BYTES = 1_048_576
"""Kafka's default ``max.message.bytes`` (1 MiB), the default record budget."""

OWN_HEADER_PREFIX = "trusthop-"
"""Prefix of the headers only a consumer writes (compared case-insensitively)."""

H_ORIGINAL = "trusthop-original"
"""``<topic>/<partition>/<offset>``: in a stub dead letter, of the rejected
record; in a retry copy and in the dead letter of one, of the first record
(on the subscribed topic) the copy was made from."""

H_RETRY = "trusthop-retry"
"""Retry copies: the handler attempt the copy is for (2 or more)."""

H_NOT_BEFORE = "trusthop-not-before"
"""Retry copies: epoch milliseconds before which the copy is not handled."""

MAX_RETRY_ATTEMPT = 1000
"""The largest :data:`H_RETRY` value :func:`parse_retry_attempt` accepts."""

_RETRY_VALUE = re.compile(rb"[1-9][0-9]{0,3}")
_EPOCH_MS_VALUE = re.compile(rb"[0-9]{1,16}")
# Kafka topic names: at most 249 of [a-zA-Z0-9._-]; partitions and offsets are non-negative.
_ORIGINAL_VALUE = re.compile(rb"[A-Za-z0-9._-]{1,249}/[0-9]{1,10}/[0-9]{1,19}")

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
    original: Sequence[tuple[str, bytes | None]] | None,
    rejection: Rejection,
    *,
    first: str | None = None,
) -> list[tuple[str, bytes | None]]:
    """The original headers minus any ``trusthop-*`` ones, then the rejection's headers.

    Only the consumer writes ``trusthop-*`` headers: every incoming header
    whose name starts with ``trusthop-`` in any letter case
    (:func:`is_own_header`) is dropped, so a sender cannot plant a verdict
    (``trusthop-reason: handler_failed``) that a reader of the dead letter
    would take for the consumer's. The other headers are kept byte for byte
    and in order (``None`` values and repeated keys included); the
    ``trusthop-*`` headers of ``rejection`` come last, each exactly once,
    then ``trusthop-original: <first>`` when ``first`` is given (the dead
    letter of a retry copy names the first record it was made from).

    Pure; never raises (text is encoded as UTF-8, lone surrogates escaped).
    """
    headers: list[tuple[str, bytes | None]] = [
        (name, value) for name, value in original or () if not is_own_header(name)
    ]
    headers.extend(_verdict(rejection))
    if first is not None:
        headers.append((H_ORIGINAL, first.encode("utf-8", "backslashreplace")))
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


def coordinates(topic: str, partition: int, offset: int) -> str:
    """``<topic>/<partition>/<offset>``, the form of :data:`H_ORIGINAL` (Kafka
    topic names hold no ``/``)."""
    return f"{topic}/{partition}/{offset}"


def _own_value(headers: Sequence[tuple[str, bytes | None]] | None, name: str) -> bytes | None:
    """The value of the one header named exactly ``name``; ``None`` when it is
    absent, repeated, or has no value (the consumer writes each exactly once)."""
    found: list[bytes | None] = [v for k, v in headers or () if k == name]
    if len(found) != 1 or found[0] is None:
        return None
    return bytes(found[0])


def parse_retry_attempt(headers: Sequence[tuple[str, bytes | None]] | None) -> int:
    """The handler attempt a retry copy is for, from its :data:`H_RETRY` header.

    Strict: exactly one header with exactly that name whose value is the
    ASCII decimal form of an integer from 1 to :data:`MAX_RETRY_ATTEMPT`, no
    sign, no leading zero, no blank. Anything else (absent, repeated, empty,
    ``"02"``, ``"+2"``, ``" 2"``, ``"1e3"``, a huge number) gives ``0``: "not a
    retry of this consumer". Rejecting such a record outright would add
    nothing: with ``0`` the replay store classifies it as any other copy of
    the event (``replayed`` when the group accepted it before, a first
    delivery verified in full otherwise, exactly as if it had been copied
    into the subscribed topic itself, which the derived-destination rule
    already allows).

    Pure; never raises.
    """
    value = _own_value(headers, H_RETRY)
    if value is None or _RETRY_VALUE.fullmatch(value) is None:
        return 0
    attempt = int(value)
    return attempt if attempt <= MAX_RETRY_ATTEMPT else 0


def parse_not_before(headers: Sequence[tuple[str, bytes | None]] | None) -> float | None:
    """When a retry copy is due (epoch seconds), from its :data:`H_NOT_BEFORE`
    header; ``None`` (due now) unless exactly one such header holds 1 to 16
    ASCII digits. The consumer also caps the wait at its own ``retry_delay``,
    so a forged far-future value cannot hold a partition.

    Pure; never raises.
    """
    value = _own_value(headers, H_NOT_BEFORE)
    if value is None or _EPOCH_MS_VALUE.fullmatch(value) is None:
        return None
    return int(value) / 1000


def parse_original(headers: Sequence[tuple[str, bytes | None]] | None) -> str | None:
    """The :data:`H_ORIGINAL` coordinates of a retry copy, when exactly one
    such header holds ``<topic>/<partition>/<offset>`` in Kafka's alphabet.

    Pure; never raises.
    """
    value = _own_value(headers, H_ORIGINAL)
    if value is None or _ORIGINAL_VALUE.fullmatch(value) is None:
        return None
    return value.decode("ascii")


def parse_retry_group(headers: Sequence[tuple[str, bytes | None]] | None) -> str | None:
    """The consumer group that wrote a retry copy (its ``trusthop-consumer``
    header), when exactly one such header holds UTF-8 text; else ``None``
    (no claim: the copy is judged by the replay store like any other).

    Pure; never raises.
    """
    value = _own_value(headers, H_CONSUMER)
    if not value:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def retry_headers(
    original: Sequence[tuple[str, bytes | None]] | None,
    *,
    attempt: int,
    not_before_ms: int,
    first: str,
    attempts: int,
    group: str | None = None,
) -> list[tuple[str, bytes | None]]:
    """Headers of the retry copy for handler attempt ``attempt``.

    The original headers minus any ``trusthop-*`` ones (byte for byte, in
    order: the CloudEvent and its chain are unchanged), then
    :data:`H_RETRY`, :data:`H_NOT_BEFORE`, :data:`H_ORIGINAL` (``first``),
    ``trusthop-attempts`` (``attempts``, the handler attempts so far) and,
    when ``group`` is given, ``trusthop-consumer`` (the group writing it).

    Raises:
        ValueError: ``attempt`` outside 2 to :data:`MAX_RETRY_ATTEMPT`, a
            negative ``not_before_ms`` or ``attempts``.
    """
    if not 2 <= attempt <= MAX_RETRY_ATTEMPT:
        raise ValueError(f"a retry is handler attempt 2 to {MAX_RETRY_ATTEMPT}")
    if not_before_ms < 0 or attempts < 0:
        raise ValueError("not_before_ms and attempts must not be negative")
    headers: list[tuple[str, bytes | None]] = [
        (name, value) for name, value in original or () if not is_own_header(name)
    ]
    headers.extend(
        [
            (H_RETRY, str(attempt).encode()),
            (H_NOT_BEFORE, str(not_before_ms).encode()),
            (H_ORIGINAL, first.encode("utf-8", "backslashreplace")),
            (H_ATTEMPTS, str(attempts).encode()),
        ]
    )
    if group is not None:
        headers.append((H_CONSUMER, group.encode("utf-8", "backslashreplace")))
    return headers


def signed_destination(wire: WireEvent | None, limits: Limits) -> str | None:
    """The destination ``wire``'s newest ring was signed for, for a dead
    letter's ``trusthop-destination``; ``None`` when there is no wire, no
    chain, a chain that does not decode within ``limits``, or only an origin
    ring. Decodes the chain only (no digest, no signature).

    Never raises: it runs on the way to a dead letter.
    """
    if wire is None or wire.chain is None:
        return None
    try:
        newest = decode_chain(
            wire.chain, max_bytes=limits.max_bytes, max_rings=limits.max_rings
        ).newest
    except Exception:  # any decode failure: the dead letter goes out without it
        return None
    return newest.destination if isinstance(newest, HopRing) else None


def decode_record(
    headers: Sequence[tuple[str, bytes | None]] | None, value: bytes | None
) -> WireEvent:
    """Decode a consumed record's headers and value into a :class:`WireEvent`.

    Pure: :func:`~trusthop.bindings.kafka.decode_kafka`.

    Raises:
        TrustError: ``malformed``; any other exception is a bug.
    """
    return decode_kafka(headers, value)


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
    wire = decode_record(headers, value)
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
    awaits the PDP, if one is configured). A one-off check without replay
    rules: the consumer runs :func:`decode_record` then
    :meth:`trusthop.admission.Admission.admit` instead.

    Raises:
        TrustError: whatever the record holds, or ``pdp_unavailable`` /
            the PDP's deny reason; any other exception is a bug.
    """
    wire = decode_record(headers, value)
    return await verifier.verify_async(wire, kafka_destination(topic))
