"""RabbitMQ (AMQP 0-9-1) shell: aio-pika wrappers that seal and verify trust chains.

Two small objects wrap an aio-pika channel by composition; the channel stays
the user's, opened the usual way::

    connection = await aio_pika.connect_robust(url)
    channel = await connection.channel(publisher_confirms=True)

    publisher = TrustedPublisher(channel, signer=signer)
    await publisher.publish(event, exchange="orders", routing_key="order.created",
                            origin=origin)

    worker = TrustedWorker(channel, verifier=verifier)
    # replicas of one queue share a replay store instead of the default in-memory one:
    # TrustedWorker(channel, verifier=verifier,
    #               replay_store=RedisReplayStore.from_url("redis://..."))

    @worker.handler("billing", bind=[("orders", "order.created")])
    async def on_order(delivery: Delivery) -> None:
        ...  # runs only for verified events; the message is acked after it returns

    async with worker:
        ...

Every rule (sealing, decoding, verification, replay and redelivery,
dead-letter headers) is the core's: :class:`~trusthop.pipeline.ChainSigner`,
:func:`~trusthop.bindings.amqp.encode_amqp` /
:func:`~trusthop.bindings.amqp.decode_amqp`,
:class:`~trusthop.pipeline.ChainVerifier`,
:class:`~trusthop.admission.Admission` and
:class:`~trusthop.pipeline.Rejection`. This module only moves messages.

Delivery contract of :class:`TrustedWorker`, per message (details in
:mod:`trusthop.amqp.worker`):

1. routing checks, decoding, then admission
   (:class:`~trusthop.admission.Admission`, one per queue, scope
   ``amqp/<queue>``, with the worker's replay store) before any handler code
   runs: a first delivery is verified in full; a redelivery (RabbitMQ's
   ``redelivered`` flag) or a retry of an accepted message is accepted
   again without the signature checks and without expiring for the time it
   waited, revocation and policy checked again; another copy is a replay
   (``replayed``, or acked unhandled with ``on_replay="skip"``);
2. a :class:`~trusthop.errors.TrustError` dead-letters the message at once
   (publisher confirm, then ack; never requeued), with its reason, source,
   signed destination and delivery attempt in ``trusthop-*`` headers;
3. an admitted message goes to the handler (:class:`Delivery` says its
   kind, attempt and whether it may have been handled before) and is acked
   after the handler returns;
4. a handler that raises is retried through ``<queue>.retry`` (a queue with
   a message TTL that dead-letters back into ``<queue>``), with the attempt
   kept in the worker's own ``trusthop-retry`` header and replay store, up
   to ``max_attempts``, then dead-lettered with ``handler_failed``
   (``retry_queue=False``: in-process retries instead);
5. if the dead letter cannot be published (no confirm, returned, channel
   lost) the original is requeued; a message whose dead letter failed twice
   (the second time as a stub without the original headers) and that comes
   back redelivered is rejected without requeue and counted as abandoned,
   so a poison message cannot loop.

A delivery carrying a ``CC`` or ``BCC`` header, or (with ``bind=`` or
``accept_bindings=``) one that none of the queue's bindings can have routed,
is dead-lettered with ``wrong_destination``.
"""

from trusthop.amqp.frames import H_UNDECODABLE, UndecodableProperties, install_frame_guard
from trusthop.amqp.messages import (
    DEFAULT_DEAD_LETTER_EXCHANGE,
    DLQ_SUFFIX,
    H_HEADERS_BYTES,
    H_HEADERS_DROPPED,
    H_RETRY,
    RETRY_SUFFIX,
    check_delivery,
    dead_letter_headers,
    dead_letter_queue_name,
    delivery_matches_bindings,
    minimal_dead_letter_headers,
    parse_retry,
    retry_attempt,
    retry_headers,
    retry_queue_arguments,
    retry_queue_name,
    routing_key_matches,
    signed_destination,
    verify_delivery,
    verify_delivery_async,
)
from trusthop.amqp.publisher import PublishRefused, TrustedPublisher
from trusthop.amqp.worker import FRESH_STORE, Delivery, Handler, TrustedWorker, WorkerStats

__all__ = [
    "DEFAULT_DEAD_LETTER_EXCHANGE",
    "DLQ_SUFFIX",
    "FRESH_STORE",
    "H_HEADERS_BYTES",
    "H_HEADERS_DROPPED",
    "H_RETRY",
    "H_UNDECODABLE",
    "RETRY_SUFFIX",
    "Delivery",
    "Handler",
    "PublishRefused",
    "TrustedPublisher",
    "TrustedWorker",
    "UndecodableProperties",
    "WorkerStats",
    "check_delivery",
    "dead_letter_headers",
    "dead_letter_queue_name",
    "delivery_matches_bindings",
    "install_frame_guard",
    "minimal_dead_letter_headers",
    "parse_retry",
    "retry_attempt",
    "retry_headers",
    "retry_queue_arguments",
    "retry_queue_name",
    "routing_key_matches",
    "signed_destination",
    "verify_delivery",
    "verify_delivery_async",
]
