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
4. if the dead letter cannot be published the worker climbs a short ladder
   instead of looping: a dead letter refused while the channel still works
   (returned, nacked, unencodable) is retried at once as a *stub* (the
   rejection's headers and the body, no original header); if that fails too,
   or the channel was lost, the original is requeued. Each publish attempt is
   counted per message (a fingerprint of its content, kept in memory by this
   worker), so the next delivery of the same message sends the stub, and a
   *redelivered* message with two failed attempts, failing for at least
   ``abandon_after`` seconds (30 by default; requeues pause in between), is
   abandoned: rejected
   without requeue, logged and counted in :attr:`WorkerStats.abandoned`.
   Queues the worker declares dead-letter natively into ``<queue>.dlq``
   (:meth:`TrustedWorker.queue_arguments`), so even then nothing is lost;
   a queue declared elsewhere needs its own ``x-dead-letter-exchange``.

Routing checks (see :func:`~trusthop.amqp.messages.verify_delivery`): a
delivery carrying a ``CC`` or ``BCC`` header is dead-lettered with
``wrong_destination``; when the handler was registered with ``bind=`` or
``accept_bindings=``, so is a delivery whose exchange and routing key match
none of those bindings (nor the default exchange with the queue's name).

Dead letters carry the original headers unless they would not fit in one
content-header frame (``frame_max`` of the connection minus
:data:`~trusthop.amqp.messages.HEADER_FRAME_RESERVE`): RabbitMQ would close
the whole connection (``FRAME_ERROR``), requeueing the poison and every
unacked message behind it. Such a dead letter carries only the ``trusthop-*``
headers, with ``trusthop-headers-dropped`` and ``trusthop-headers-bytes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractQueue
from pamqp.common import FieldTable

from trusthop.amqp.messages import (
    DEFAULT_DEAD_LETTER_EXCHANGE,
    Binding,
    _source,
    dead_letter_headers,
    dead_letter_queue_name,
    header_budget,
    minimal_dead_letter_headers,
    verify_delivery_async,
)
from trusthop.amqp.publisher import PublishRefused, _publish_confirmed, _require_confirms
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
        abandoned: messages rejected without requeue because their dead
            letter could not be published, even as a stub (see the module
            docstring); RabbitMQ drops them unless the queue has its own
            ``x-dead-letter-exchange``.
    """

    delivered: int = 0
    dead_lettered: Counter[Reason] = field(default_factory=Counter)
    handler_errors: int = 0
    requeued: int = 0
    abandoned: int = 0

    @property
    def total_dead_lettered(self) -> int:
        return sum(self.dead_lettered.values())


@dataclass(frozen=True, slots=True)
class _Route:
    queue: str
    handler: Handler
    declare: bool
    bind: tuple[tuple[str | AbstractExchange, str], ...]
    # What a delivery must match (bind + accept_bindings), or None: no check.
    bindings: tuple[Binding, ...] | None


def _pairs(name: str, items: Sequence[tuple[Any, Any]], *, exchange_objects: bool) -> None:
    # A bare ("exchange", "key") instead of [("exchange", "key")] would unpack
    # each string into characters; refuse anything but pairs.
    for item in items:
        ok = isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[1], str)
        if ok and not exchange_objects:
            ok = isinstance(item[0], str)
        if not ok:
            raise ValueError(f"{name} takes a sequence of (exchange, routing_key) pairs")


# Dead-letter publish attempts remembered per message fingerprint.
_ATTEMPTS_REMEMBERED = 4096
# Failures after which a dead letter is retried as a stub right away: the
# broker answered (return, nack) or the encoder refused, so the channel works.
_REFUSED = (PublishRefused, TypeError, ValueError, OverflowError, struct.error)


def _fingerprint(message: AbstractIncomingMessage, consumer: str) -> str:
    """What identifies one message across its redeliveries (not its delivery tag)."""
    digest = hashlib.sha256()
    facts = (
        consumer,
        message.exchange,
        message.routing_key,
        message.message_id,
        message.correlation_id,
        message.content_type,
        message.headers,
    )
    digest.update(repr(facts).encode("utf-8", "backslashreplace"))
    digest.update(b"\x00")
    digest.update(message.body)
    return digest.hexdigest()


def _text(value: object) -> str | None:
    """A short-string property worth keeping in a stub dead letter."""
    if isinstance(value, str) and len(value.encode("utf-8", "replace")) <= 255:
        return value
    return None


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
        abandon_after: a message whose dead letter keeps failing is abandoned
            only after failing for this many seconds (and at least twice);
            until then it is requeued after a growing pause.

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
        abandon_after: float = 30.0,
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
        self.abandon_after = abandon_after
        self.stats = WorkerStats()
        self._routes: dict[str, _Route] = {}
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._dlx: AbstractExchange | None = None
        self._inflight: set[asyncio.Future[Any]] = set()
        self._running = False
        # fingerprint -> dead-letter publishes started and not confirmed.
        self._letter_attempts: OrderedDict[str, int] = OrderedDict()
        # When each message's dead letter first failed (same keys, same bound).
        self._first_failure: dict[str, float] = {}

    def handler(
        self,
        queue: str,
        *,
        declare: bool = True,
        bind: Sequence[tuple[str | AbstractExchange, str]] = (),
        accept_bindings: Sequence[tuple[str, str]] | None = None,
    ) -> Callable[[Handler], Handler]:
        """Register ``async def handler(delivery)`` for ``queue``.

        ``declare`` declares the queue durable at :meth:`start`; ``bind``
        binds it to each ``(exchange, routing_key)`` (the exchanges must
        exist). ``accept_bindings`` states bindings the queue has without the
        worker making them (a queue bound elsewhere, ``declare=False``).

        When ``bind`` or ``accept_bindings`` is given, a delivery whose
        exchange and routing key match none of them is dead-lettered with
        ``wrong_destination`` (topic wildcards ``*`` and ``#`` are honoured;
        the default exchange with the queue's name as routing key is always
        accepted; see :func:`~trusthop.amqp.messages.routing_key_matches`).
        With neither, only the chain's destination is checked, so a copy
        RabbitMQ routed by a ``BCC`` header (which it strips before delivery)
        cannot be told apart. A ``CC``/``BCC`` header is refused either way.
        ``accept_bindings=[]`` accepts only the default exchange. Bindings to
        a fanout or headers exchange, exchange-to-exchange bindings and
        alternate exchanges must be stated with the exchange the message was
        *published* to and the key ``#`` where the routing key is not used.

        Returns the handler unchanged.

        Raises:
            ValueError: the queue already has a handler, its name is empty, or
                ``bind``/``accept_bindings`` is not a sequence of pairs.
            RuntimeError: the worker is already running.
        """
        if self._running:
            raise RuntimeError("register handlers before start()")
        if not queue:
            raise ValueError("a handled queue needs a name")
        if queue in self._routes:
            raise ValueError(f"queue {queue!r} already has a handler")
        _pairs("bind", bind, exchange_objects=True)
        if accept_bindings is not None:
            _pairs("accept_bindings", accept_bindings, exchange_objects=False)
        bound = tuple(bind)
        bindings: tuple[Binding, ...] | None = None
        if bound or accept_bindings is not None:
            bindings = tuple(
                (exchange if isinstance(exchange, str) else exchange.name, key)
                for exchange, key in (*bound, *(accept_bindings or ()))
            )

        def register(func: Handler) -> Handler:
            self._routes[queue] = _Route(queue, func, declare, bound, bindings)
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
                    queue = await self.channel.declare_queue(
                        route.queue, durable=True, arguments=self.queue_arguments(route.queue)
                    )
                else:
                    queue = await self.channel.get_queue(route.queue, ensure=True)
                for exchange, routing_key in route.bind:
                    await queue.bind(exchange, routing_key=routing_key)
                tag = await queue.consume(self._consumer(route), no_ack=False)
                self._consumers.append((queue, tag))
        except BaseException:
            await self.stop()
            raise

    def queue_arguments(self, queue: str) -> FieldTable:
        """Arguments the worker declares ``queue`` with (``declare=True``).

        The queue dead-letters natively into this worker's dead-letter queue,
        so a message the worker must abandon (its dead letter could not be
        published twice) still lands in ``<queue>.dlq`` instead of being
        dropped. Declare a queue yourself with these arguments to get the same.
        """
        return {
            "x-dead-letter-exchange": self.dead_letter_exchange,
            "x-dead-letter-routing-key": queue,
        }

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
                trusted = await verify_delivery_async(
                    self.verifier,
                    headers=message.headers,
                    body=message.body,
                    content_type=message.content_type,
                    exchange=message.exchange,
                    routing_key=message.routing_key,
                    queue=route.queue,
                    bindings=route.bindings,
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

        The ladder (counted per message fingerprint, see the module docstring):

        * no earlier attempt: the full dead letter, which keeps body and
          properties except ``expiration`` (a dead letter must not vanish)
          and ``user_id`` (RabbitMQ refuses a user_id other than the
          publishing connection's), and the original headers unless they
          exceed the header budget of the connection's ``frame_max``;
        * an earlier attempt, or the full letter refused while the channel
          works: the stub (rejection headers, body, short-string properties);
        * two earlier attempts and the message is ``redelivered``: abandoned
          (rejected without requeue, :attr:`WorkerStats.abandoned`).

        Raises:
            PublishRefused, aio_pika.exceptions.AMQPError, ...: not confirmed;
                the original is then requeued by the caller's ``process()``
                (or by the broker when the channel is gone).
        """
        if self._dlx is None:
            raise RuntimeError("worker not started")
        key = _fingerprint(message, rejection.consumer)
        tried = self._letter_attempts.get(key, 0)
        if self._may_abandon(key, message):
            await self._abandon(message, rejection, key, tried)
            return
        log.warning(
            "trusthop: dead-lettering message from %s on %r: %s (%s)",
            rejection.source,
            rejection.consumer,
            rejection.reason.value,
            rejection.detail,
        )
        budget = header_budget(await self._frame_max())
        refused: Exception | None = None
        for stub in (False, True) if tried == 0 else (True,):
            # Counted before publishing: an attempt that kills the connection
            # (so nothing below runs) is remembered for the redelivery.
            self._note_attempt(key)
            try:
                letter = self._letter(message, rejection, stub=stub, budget=budget)
                await _publish_confirmed(
                    self._dlx, letter, routing_key=rejection.consumer, mandatory=True
                )
            except _REFUSED as exc:
                refused = exc
                log.warning(
                    "trusthop: %s dead letter for %r not published: %r",
                    "stub" if stub else "full",
                    rejection.consumer,
                    exc,
                )
                continue
            self._forget(key)
            await message.ack()
            self.stats.dead_lettered[rejection.reason] += 1
            return
        assert refused is not None
        if self._may_abandon(key, message):
            await self._abandon(message, rejection, key, self._letter_attempts[key])
            return
        # Requeued: wait first, so a short dead-letter outage is ridden out
        # instead of burning the attempts in milliseconds.
        await asyncio.sleep(min(self.retry_backoff * 2 ** self._letter_attempts.get(key, 1), 5.0))
        raise refused

    def _may_abandon(self, key: str, message: AbstractIncomingMessage) -> bool:
        """Two failed attempts, a redelivery, and failing for ``abandon_after`` seconds."""
        first = self._first_failure.get(key)
        return (
            bool(message.redelivered)
            and self._letter_attempts.get(key, 0) >= 2
            and first is not None
            and time.monotonic() - first >= self.abandon_after
        )

    def _forget(self, key: str) -> None:
        self._letter_attempts.pop(key, None)
        self._first_failure.pop(key, None)

    def _note_attempt(self, key: str) -> None:
        self._letter_attempts[key] = self._letter_attempts.get(key, 0) + 1
        self._letter_attempts.move_to_end(key)
        self._first_failure.setdefault(key, time.monotonic())
        while len(self._letter_attempts) > _ATTEMPTS_REMEMBERED:
            oldest, _ = self._letter_attempts.popitem(last=False)
            self._first_failure.pop(oldest, None)

    async def _abandon(
        self, message: AbstractIncomingMessage, rejection: Rejection, key: str, tried: int
    ) -> None:
        """Reject without requeue a message whose dead letter cannot be published."""
        log.error(
            "trusthop: abandoning message from %s on %r (%s: %s): its dead letter failed "
            "%d times; rejected without requeue (lost unless the queue has its own "
            "x-dead-letter-exchange)",
            rejection.source,
            rejection.consumer,
            rejection.reason.value,
            rejection.detail,
            tried,
        )
        await message.reject(requeue=False)
        self._forget(key)
        self.stats.abandoned += 1

    async def _frame_max(self) -> int | None:
        """The connection's negotiated ``frame_max``, or ``None`` when unknown."""
        try:
            underlay = await self.channel.get_underlay_channel()
            frame_max = underlay.connection.connection_tune.frame_max
        except Exception:  # a stand-in channel, or a connection being replaced
            return None
        return frame_max if isinstance(frame_max, int) else None

    @staticmethod
    def _letter(
        message: AbstractIncomingMessage, rejection: Rejection, *, stub: bool, budget: int
    ) -> aio_pika.Message:
        if stub:
            return aio_pika.Message(
                message.body,
                headers=minimal_dead_letter_headers(message.headers, rejection),
                content_type=_text(message.content_type),
                content_encoding=_text(message.content_encoding),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                correlation_id=_text(message.correlation_id),
                message_id=_text(message.message_id),
                type=_text(message.type),
                app_id=_text(message.app_id),
            )
        return aio_pika.Message(
            message.body,
            headers=dead_letter_headers(message.headers, rejection, max_bytes=budget),
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
