"""Kafka transport: aiokafka 0.14 producer and consumer wrappers (imperative shell).

Both wrappers hold an aiokafka client (composition, never a subclass) and
keep its conventions: keyword arguments go to the aiokafka constructor,
``start()``/``stop()`` or ``async with``, ``send``/``send_and_wait`` on the
producer, ``getmany`` and explicit commits underneath the consumer. Every
trust rule lives in the core (:class:`~trusthop.pipeline.ChainSigner`,
:class:`~trusthop.pipeline.ChainVerifier`, the Kafka binding); this module only
moves bytes, commits offsets and writes dead letters.

Producer side (:class:`TrustedKafkaProducer`): seal the event for
``kafka:<topic>``, encode it (binary or structured mode), check the record
against a byte budget that counts headers, key and value, then send. A
problem raises :class:`~trusthop.errors.TrustError` before anything is sent,
with the reason code a consumer would give.

Consumer side (:class:`TrustedKafkaConsumer`): auto-commit is always off.
Every record is decoded and admitted
(:class:`~trusthop.admission.Admission`, scope ``kafka/<group_id>``) for the
destination it was signed for before user code sees it: verified in full on
a first delivery; a redelivery of the same record (same topic, partition,
offset) or a retry is accepted again without the signature checks, judged at
the first delivery's time, revocation and policy checked again; another copy
of an accepted event is ``replayed`` (or skipped). A record that fails (any
:class:`TrustError`) is written to the dead-letter topic with its original
key, value and headers (minus any incoming ``trusthop-*`` ones) plus the
``trusthop-*`` headers of :class:`~trusthop.pipeline.Rejection`, awaited, and
only then committed. A failed handler is retried through ``<topic>.retry``
(the chain unchanged, a delay that pauses only the retry partition), then
dead-lettered ``handler_failed``. A decoder bug (any other exception)
dead-letters the record as ``malformed``; a dead letter too large to send is
replaced by a stub naming the original's topic, partition and offset. No
record that aiokafka can parse stops or stalls it. A verified record becomes
a :class:`KafkaDelivery`, consumed either with ``async for`` or by
:meth:`TrustedKafkaConsumer.run`. At-least-once throughout: when in doubt an
offset stays uncommitted and the record is delivered again, never dropped.
"""

from trusthop.kafka.consumer import (
    DEFAULT_IN_PROCESS_RETRY_DELAY,
    DEFAULT_RETRY_DELAY,
    FRESH_STORE,
    REVOKE_GRACE,
    UNDECODABLE_DETAIL,
    ConsumerStats,
    Handler,
    KafkaDelivery,
    TrustedKafkaConsumer,
)
from trusthop.kafka.producer import TrustedKafkaProducer
from trusthop.kafka.records import (
    DEFAULT_MAX_MESSAGE_BYTES,
    H_NOT_BEFORE,
    H_ORIGINAL,
    H_ORIGINAL_BYTES,
    H_RETRY,
    MAX_RETRY_ATTEMPT,
    KafkaRecord,
    coordinates,
    dead_letter_headers,
    decode_record,
    default_dead_letter_max_request_size,
    default_dead_letter_topic,
    is_own_header,
    parse_not_before,
    parse_original,
    parse_retry_attempt,
    parse_retry_group,
    record_size,
    retry_headers,
    signed_destination,
    stub_dead_letter_headers,
    verify_record,
    verify_record_async,
)

__all__ = [
    "DEFAULT_IN_PROCESS_RETRY_DELAY",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_RETRY_DELAY",
    "FRESH_STORE",
    "H_NOT_BEFORE",
    "H_ORIGINAL",
    "H_ORIGINAL_BYTES",
    "H_RETRY",
    "MAX_RETRY_ATTEMPT",
    "REVOKE_GRACE",
    "UNDECODABLE_DETAIL",
    "ConsumerStats",
    "Handler",
    "KafkaDelivery",
    "KafkaRecord",
    "TrustedKafkaConsumer",
    "TrustedKafkaProducer",
    "coordinates",
    "dead_letter_headers",
    "decode_record",
    "default_dead_letter_max_request_size",
    "default_dead_letter_topic",
    "is_own_header",
    "parse_not_before",
    "parse_original",
    "parse_retry_attempt",
    "parse_retry_group",
    "record_size",
    "retry_headers",
    "signed_destination",
    "stub_dead_letter_headers",
    "verify_record",
    "verify_record_async",
]
