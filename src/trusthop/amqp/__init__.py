"""RabbitMQ (AMQP 0-9-1) shell: aio-pika wrappers that seal and verify trust chains.

Two small objects wrap an aio-pika channel by composition; the channel stays
the user's, opened the usual way::

    connection = await aio_pika.connect_robust(url)
    channel = await connection.channel(publisher_confirms=True)

    publisher = TrustedPublisher(channel, signer=signer)
    await publisher.publish(event, exchange="orders", routing_key="order.created",
                            origin=origin)

    worker = TrustedWorker(channel, verifier=verifier)

    @worker.handler("billing", bind=[("orders", "order.created")])
    async def on_order(delivery: Delivery) -> None:
        ...  # runs only for verified events; the message is acked after it returns

    async with worker:
        ...

Every rule (sealing, decoding, verification, dead-letter headers) is the
core's: :class:`~trusthop.pipeline.ChainSigner`,
:func:`~trusthop.bindings.amqp.encode_amqp` /
:func:`~trusthop.bindings.amqp.decode_amqp`,
:class:`~trusthop.pipeline.ChainVerifier` and
:class:`~trusthop.pipeline.Rejection`. This module only moves messages.

Delivery contract of :class:`TrustedWorker`, per message:

1. decode and verify (against ``amqp:<exchange>/<routing key>`` of the
   delivery) before any handler code runs;
2. a :class:`~trusthop.errors.TrustError` dead-letters the message at once:
   it is re-published, with publisher confirm, to the dead-letter exchange,
   and only then acked (never requeued);
3. a verified message goes to the handler; the message is acked after the
   handler returns. A handler that raises is retried in-process up to
   ``max_attempts`` times, then the message is dead-lettered with reason
   ``handler_failed``;
4. if the dead letter cannot be published (no confirm, returned, channel
   lost) the original is requeued; a message whose dead letter failed twice
   (the second time as a stub without the original headers) and that comes
   back redelivered is rejected without requeue and counted as abandoned
   (see :mod:`trusthop.amqp.worker`), so a poison message cannot loop.

A delivery carrying a ``CC`` or ``BCC`` header, or (with ``bind=`` or
``accept_bindings=``) one that none of the queue's bindings can have routed,
is dead-lettered with ``wrong_destination``.
"""

from trusthop.amqp.messages import (
    DEFAULT_DEAD_LETTER_EXCHANGE,
    DLQ_SUFFIX,
    H_HEADERS_BYTES,
    H_HEADERS_DROPPED,
    dead_letter_headers,
    dead_letter_queue_name,
    delivery_matches_bindings,
    minimal_dead_letter_headers,
    routing_key_matches,
    verify_delivery,
    verify_delivery_async,
)
from trusthop.amqp.publisher import PublishRefused, TrustedPublisher
from trusthop.amqp.worker import Delivery, Handler, TrustedWorker, WorkerStats

__all__ = [
    "DEFAULT_DEAD_LETTER_EXCHANGE",
    "DLQ_SUFFIX",
    "H_HEADERS_BYTES",
    "H_HEADERS_DROPPED",
    "Delivery",
    "Handler",
    "PublishRefused",
    "TrustedPublisher",
    "TrustedWorker",
    "WorkerStats",
    "dead_letter_headers",
    "dead_letter_queue_name",
    "delivery_matches_bindings",
    "minimal_dead_letter_headers",
    "routing_key_matches",
    "verify_delivery",
    "verify_delivery_async",
]
