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
