"""Destination names, the ``destination`` field of a hop ring.

A destination says where an event was published, in a form the consumer can
rebuild from what the broker tells it on delivery:

* Kafka: ``kafka:<topic>``
* AMQP 0-9-1: ``amqp:<exchange>/<routing key>`` (the default exchange is
  the empty string, so a message published to queue ``q`` through it is
  ``amqp:/q``)
"""

from __future__ import annotations


def kafka_destination(topic: str) -> str:
    """The destination of a Kafka topic."""
    if not topic:
        raise ValueError("a Kafka topic name is not empty")
    return f"kafka:{topic}"


def amqp_destination(exchange: str, routing_key: str) -> str:
    """The destination of an AMQP exchange and routing key."""
    if "/" in exchange:
        raise ValueError("an exchange name used with trusthop must not contain '/'")
    return f"amqp:{exchange}/{routing_key}"


RETRY_SUFFIX = ".retry"
DEAD_LETTER_SUFFIX = ".dlq"


def retry_topic(topic: str) -> str:
    """``<topic>.retry``: where a consumer re-publishes records of ``topic``
    for a delayed handler retry."""
    return f"{topic}{RETRY_SUFFIX}"


def dead_letter_topic(topic: str) -> str:
    """``<topic>.dlq``: where a consumer dead-letters records of ``topic``."""
    return f"{topic}{DEAD_LETTER_SUFFIX}"


def signed_kafka_destination(consumed_topic: str, subscribed: frozenset[str]) -> str:
    """The destination a record consumed from ``consumed_topic`` must have been
    signed for.

    A record of a subscribed topic ``t`` was signed for ``kafka:t``. A record
    of ``t.retry`` or ``t.dlq``, when ``t`` itself is subscribed, was signed
    for ``kafka:t`` (the retried or dead-lettered event keeps its chain
    unchanged). Any other topic must be named by the chain as it is, so an
    event signed for ``t`` copied into an unrelated topic stays
    ``wrong_destination``.
    """
    for suffix in (RETRY_SUFFIX, DEAD_LETTER_SUFFIX):
        if consumed_topic.endswith(suffix):
            base = consumed_topic[: -len(suffix)]
            if base and base in subscribed:
                return kafka_destination(base)
    return kafka_destination(consumed_topic)
