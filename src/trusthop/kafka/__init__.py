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
Every record is decoded and verified against ``kafka:<record.topic>`` before
user code sees it. A record that fails (any :class:`TrustError`) is written to
the dead-letter topic with its original key, value and headers (minus any
incoming ``trusthop-*`` ones) plus the ``trusthop-*`` headers of
:class:`~trusthop.pipeline.Rejection`, awaited, and only then committed. A
decoder bug (any other exception) dead-letters the record as ``malformed``;
a dead letter too large to send is replaced by a stub naming the original's
topic, partition and offset. No record that aiokafka can parse stops or
stalls it. A verified record becomes a :class:`KafkaDelivery`, consumed either with
``async for`` or by :meth:`TrustedKafkaConsumer.run`.
At-least-once throughout: when in doubt an offset stays uncommitted and the
record is delivered again, never dropped.
"""

from trusthop.kafka.consumer import (
    UNDECODABLE_DETAIL,
    ConsumerStats,
    Handler,
    KafkaDelivery,
    TrustedKafkaConsumer,
)
from trusthop.kafka.producer import TrustedKafkaProducer
from trusthop.kafka.records import (
    DEFAULT_MAX_MESSAGE_BYTES,
    H_ORIGINAL,
    H_ORIGINAL_BYTES,
    KafkaRecord,
    dead_letter_headers,
    default_dead_letter_max_request_size,
    default_dead_letter_topic,
    is_own_header,
    record_size,
    stub_dead_letter_headers,
    verify_record,
    verify_record_async,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "H_ORIGINAL",
    "H_ORIGINAL_BYTES",
    "UNDECODABLE_DETAIL",
    "ConsumerStats",
    "Handler",
    "KafkaDelivery",
    "KafkaRecord",
    "TrustedKafkaConsumer",
    "TrustedKafkaProducer",
    "dead_letter_headers",
    "default_dead_letter_max_request_size",
    "default_dead_letter_topic",
    "is_own_header",
    "record_size",
    "stub_dead_letter_headers",
    "verify_record",
    "verify_record_async",
]
