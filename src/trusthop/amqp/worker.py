"""AMQP worker wrapper: consume queues, verify every message, then run its handler.

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
   lost) the original is requeued, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractQueue

from trusthop.amqp.messages import (
    DEFAULT_DEAD_LETTER_EXCHANGE,
    _source,
    dead_letter_headers,
    dead_letter_queue_name,
    verify_delivery,
)
from trusthop.amqp.publisher import _publish_confirmed, _require_confirms
from trusthop.errors import Reason, TrustError
from trusthop.pipeline import ChainVerifier, DeliveryViews, Rejection, TrustedEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Delivery(DeliveryViews):
    """What a handler receives: a verified event and the message it came in.

    Attributes:
        trusted: the core's :class:`~trusthop.pipeline.TrustedEvent`.
        message: the aio-pika message. The worker acks it after the handler
            returns; a handler must not ack, nack or reject it itself.
        queue: the queue it was consumed from.
        attempt: 1 for the first call, 2.. for in-process retries.
    """

    trusted: TrustedEvent
    message: AbstractIncomingMessage
    queue: str
    attempt: int = 1


Handler = Callable[[Delivery], Awaitable[None]]


@dataclass
class WorkerStats:
    """Counters of a :class:`TrustedWorker` (since it was created).

    Attributes:
        delivered: messages whose handler returned (then acked).
        dead_lettered: messages dead-lettered, by reason.
        handler_errors: handler calls that raised (each attempt counts).
        requeued: messages handed back to the broker because the dead letter
            was not confirmed, the ack failed, or the worker was stopping. (A
            handler cancelled by a channel close is not counted: the broker
            requeues its message by itself.)
    """

    delivered: int = 0
    dead_lettered: Counter[Reason] = field(default_factory=Counter)
    handler_errors: int = 0
    requeued: int = 0

    @property
    def total_dead_lettered(self) -> int:
        return sum(self.dead_lettered.values())


@dataclass(frozen=True, slots=True)
class _Route:
    queue: str
    handler: Handler
    declare: bool
    bind: tuple[tuple[str | AbstractExchange, str], ...]


class TrustedWorker:
    """Consumes queues, verifies every message, then runs the queue's handler.

    Args:
        channel: an aio-pika channel opened with ``publisher_confirms=True``
            (dead letters are published with confirms on it).
        verifier: the :class:`~trusthop.pipeline.ChainVerifier`; replacing its
            bundle takes effect for the next message.
        dead_letter_exchange: durable direct exchange the worker declares;
            each handled queue ``q`` gets a durable ``q.dlq`` bound with
            routing key ``q``.
        max_attempts: handler calls per message before ``handler_failed``.
        prefetch_count: unacked messages in flight (``basic.qos``).
        retry_backoff: seconds before the first retry, doubled per retry.

    The handler contract and failure modes are in the module docstring.

    Raises:
        ValueError: the channel does not use publisher confirms, or
            ``max_attempts``/``prefetch_count`` are below 1.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        *,
        verifier: ChainVerifier,
        dead_letter_exchange: str = DEFAULT_DEAD_LETTER_EXCHANGE,
        max_attempts: int = 3,
        prefetch_count: int = 16,
        retry_backoff: float = 0.05,
    ) -> None:
        _require_confirms(channel, "TrustedWorker")
        if max_attempts < 1 or prefetch_count < 1:
            raise ValueError("max_attempts and prefetch_count must be at least 1")
        self.channel = channel
        self.verifier = verifier
        self.dead_letter_exchange = dead_letter_exchange
        self.max_attempts = max_attempts
        self.prefetch_count = prefetch_count
        self.retry_backoff = retry_backoff
        self.stats = WorkerStats()
        self._routes: dict[str, _Route] = {}
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._dlx: AbstractExchange | None = None
        self._inflight: set[asyncio.Future[Any]] = set()
        self._running = False

    def handler(
        self,
        queue: str,
        *,
        declare: bool = True,
        bind: Sequence[tuple[str | AbstractExchange, str]] = (),
    ) -> Callable[[Handler], Handler]:
        """Register ``async def handler(delivery)`` for ``queue``.

        ``declare`` declares the queue durable at :meth:`start`; ``bind``
        binds it to each ``(exchange, routing_key)`` (the exchanges must
        exist). Returns the handler unchanged.

        Raises:
            ValueError: the queue already has a handler, or its name is empty.
            RuntimeError: the worker is already running.
        """
        if self._running:
            raise RuntimeError("register handlers before start()")
        if not queue:
            raise ValueError("a handled queue needs a name")
        if queue in self._routes:
            raise ValueError(f"queue {queue!r} already has a handler")

        def register(func: Handler) -> Handler:
            self._routes[queue] = _Route(queue, func, declare, tuple(bind))
            return func

        return register

    async def start(self) -> None:
        """Declare the topology and start consuming every registered queue.

        Raises:
            RuntimeError: already running, or no handler registered.
            aio_pika.exceptions.AMQPError: declaring or binding failed (for
                example a bound exchange does not exist).
        """
        if self._running:
            raise RuntimeError("worker already started")
        if not self._routes:
            raise RuntimeError("no handler registered")
        self._running = True
        try:
            await self.channel.set_qos(prefetch_count=self.prefetch_count)
            self._dlx = await self.channel.declare_exchange(
                self.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
            )
            for route in self._routes.values():
                dlq = await self.channel.declare_queue(
                    dead_letter_queue_name(route.queue), durable=True
                )
                await dlq.bind(self._dlx, routing_key=route.queue)
                if route.declare:
                    queue = await self.channel.declare_queue(route.queue, durable=True)
                else:
                    queue = await self.channel.get_queue(route.queue, ensure=True)
                for exchange, routing_key in route.bind:
                    await queue.bind(exchange, routing_key=routing_key)
                tag = await queue.consume(self._consumer(route), no_ack=False)
                self._consumers.append((queue, tag))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Cancel the consumers and wait for messages being processed.

        Messages delivered after this point are requeued. Idempotent.
        """
        self._running = False
        consumers, self._consumers = self._consumers, []
        for queue, tag in consumers:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        await asyncio.sleep(0)  # let callbacks scheduled before cancel-ok register
        current = asyncio.current_task()
        while pending := [t for t in self._inflight if t is not current]:
            await asyncio.gather(*pending, return_exceptions=True)

    async def __aenter__(self) -> TrustedWorker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _consumer(self, route: _Route) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def on_message(message: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._inflight.add(task)
            try:
                await self._process(route, message)
            except Exception:
                self.stats.requeued += 1
                log.exception("trusthop: message on %r requeued", route.queue)
            finally:
                if task is not None:
                    self._inflight.discard(task)

        return on_message

    async def _process(self, route: _Route, message: AbstractIncomingMessage) -> None:
        # Everything below acks explicitly once the message is settled (handled,
        # or its dead letter confirmed). If anything escapes (dead letter not
        # confirmed, channel lost) ``process()`` requeues it: never lost, never
        # acked early.
        async with message.process(requeue=True, ignore_processed=True):
            if not self._running:
                self.stats.requeued += 1
                await message.nack(requeue=True)
                return
            try:
                trusted = verify_delivery(
                    self.verifier,
                    headers=message.headers,
                    body=message.body,
                    content_type=message.content_type,
                    exchange=message.exchange,
                    routing_key=message.routing_key,
                )
            except TrustError as error:
                source, _ = _source(message.exchange, message.routing_key)
                await self._dead_letter(
                    message, Rejection.of(error, source=source, consumer=route.queue)
                )
                return
            except Exception as exc:  # a decoder bug must not kill the consumer
                log.exception("trusthop: unexpected error decoding a message on %r", route.queue)
                source, _ = _source(message.exchange, message.routing_key)
                detail = f"undecodable message ({type(exc).__name__})"
                await self._dead_letter(
                    message, Rejection(Reason.MALFORMED, detail, source, route.queue)
                )
                return
            await self._handle(route, message, trusted)

    async def _handle(
        self, route: _Route, message: AbstractIncomingMessage, trusted: TrustedEvent
    ) -> None:
        last: Exception | None = None
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1:
                await asyncio.sleep(self.retry_backoff * 2 ** (attempt - 2))
            try:
                await route.handler(Delivery(trusted, message, route.queue, attempt))
            except Exception as exc:
                last = exc
                self.stats.handler_errors += 1
                log.warning(
                    "trusthop: handler for %r failed (attempt %d/%d): %r",
                    route.queue,
                    attempt,
                    self.max_attempts,
                    exc,
                )
                if message.processed:  # the handler settled the message itself
                    return
                continue
            if not message.processed:
                await message.ack()
            self.stats.delivered += 1
            return
        rejection = Rejection(
            Reason.HANDLER_FAILED,
            f"handler raised {type(last).__name__}: {last}",
            trusted.context.destination,
            route.queue,
            attempts=self.max_attempts,
        )
        await self._dead_letter(message, rejection)

    async def _dead_letter(self, message: AbstractIncomingMessage, rejection: Rejection) -> None:
        """Publish the dead letter with confirm, then ack the original.

        The dead letter keeps body and properties except ``expiration`` (a
        dead letter must not vanish) and ``user_id`` (RabbitMQ refuses a
        user_id other than the publishing connection's).

        Raises:
            PublishRefused, aio_pika.exceptions.AMQPError: not confirmed; the
                original is then requeued by the caller's ``process()``.
        """
        if self._dlx is None:
            raise RuntimeError("worker not started")
        log.warning(
            "trusthop: dead-lettering message from %s on %r: %s (%s)",
            rejection.source,
            rejection.consumer,
            rejection.reason.value,
            rejection.detail,
        )
        letter = aio_pika.Message(
            message.body,
            headers=dead_letter_headers(message.headers, rejection),
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            delivery_mode=message.delivery_mode,
            priority=message.priority,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            message_id=message.message_id,
            timestamp=message.timestamp,
            type=message.type,
            app_id=message.app_id,
        )
        await _publish_confirmed(self._dlx, letter, routing_key=rejection.consumer, mandatory=True)
        await message.ack()
        self.stats.dead_lettered[rejection.reason] += 1
