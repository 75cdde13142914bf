"""AMQP worker wrapper: consume queues, admit every message, then run its handler.

Delivery contract of :class:`TrustedWorker`, per message:

1. routing checks and decoding (see below), then admission
   (:meth:`trusthop.admission.Admission.admit`, one admission per handled
   queue, scope ``amqp/<queue>``), before any handler code runs. Admission
   verifies the chain against ``amqp:<exchange>/<routing key>`` of the
   delivery and applies the replay rules of :mod:`trusthop.replay` with the
   worker's replay store:

   * a first delivery is verified in full and remembered;
   * a *redelivery* (RabbitMQ's ``redelivered`` flag) of a remembered
     message is accepted again without the signature checks, judged at its
     first delivery's time (waiting never expires it), with revocation,
     bindings, destination and policy checked again. No publisher can set
     the flag, but anyone who may consume from the queue can (take a copy,
     ``nack`` it), so it is believed only while an accepted delivery of the
     event is still open: the worker records each ack in the replay store
     (:meth:`~trusthop.admission.Admission.settle`), and a flagged copy
     after it is a replay (or the retry the store expects);
   * a *retry* (see 4.) is judged like a redelivery, against the destination
     remembered at its first delivery;
   * any other copy of a remembered message is a *replay*: dead-lettered
     with ``replayed`` (``on_replay="reject"``, the default) or acked
     without the handler and counted as a duplicate (``on_replay="skip"``);
     ``max_uses=N`` accepts N distinct copies (a broadcast).

2. a :class:`~trusthop.errors.TrustError` (any verification reason,
   ``replayed``, ``store_unavailable``, a routing check) dead-letters the
   message at once: it is re-published, with publisher confirm, to the
   dead-letter exchange, and only then acked (never requeued). The dead
   letter says why (``trusthop-reason``), where the message was consumed
   from (``trusthop-source``), what its newest ring was signed for
   (``trusthop-destination``, when the chain decodes) and the delivery
   attempt (``trusthop-attempts``: 1, or ``n`` for the ``n``-th retry copy).
   An unexpected exception is dead-lettered the same way: ``malformed``
   while decoding, ``store_unavailable`` while admitting (a replay store
   that raised something else than :class:`~trusthop.stores.StoreError`);

3. an admitted message goes to the handler as a :class:`Delivery` (which
   says its :class:`~trusthop.replay.DeliveryKind`, whether the handler may
   have run for it before, and its attempt); it is acked after the handler
   returns, then recorded as settled in the replay store (a failure there is
   logged: the delivery then stays open, see 1.). Acks of handled messages
   are coalesced (:mod:`trusthop.amqp.acks`): one ``basic.ack`` with
   ``multiple=True`` covers a run of handled messages when every lower
   delivery tag of the channel is this worker's and settled, sent when half
   the prefetch window waits, within ``ack_delay`` (5 ms), and at
   :meth:`TrustedWorker.stop` (``ack_delay=0``: one ack per message).
   A crash (or a lost channel) before that ack redelivers those messages
   flagged ``redelivered``; their deliveries are still open, so each is
   accepted as a redelivery. Dead letters, retries and skipped replays are
   acked at once, one by one;

4. a handler that raises on attempt ``n < max_attempts`` is retried
   (``retry_queue=True``, the default) through ``<queue>.retry``: the
   attempt is remembered in the replay store
   (:meth:`~trusthop.admission.Admission.schedule_retry`), a copy (same body
   and properties, ``trusthop-*`` and broker ``x-death`` headers dropped,
   ``trusthop-retry: n+1`` and ``trusthop-attempts: n`` added) is published
   with publisher confirm and ``mandatory`` to ``<queue>.retry`` through the
   default exchange, and only then the original is acked. The retry queue
   holds it ``retry_delay`` seconds, then RabbitMQ dead-letters it back
   into ``<queue>`` through the default exchange, where it is admitted as a
   retry. The handler never blocks the queue meanwhile: other messages (up
   to ``prefetch_count`` in flight) keep flowing. Attempt numbers travel in
   the worker's own headers and store; ``x-death`` is never read (RabbitMQ
   3.13 changed how it counts). At attempt ``max_attempts`` the message is
   dead-lettered with ``handler_failed``. If the retry cannot be scheduled
   or its copy is not confirmed (store down, retry queue gone, nack), the
   message is dead-lettered at once with ``handler_failed`` and a detail
   saying why (not requeued: a requeue would run the failing handler again
   at once, in a loop, while the retry path is down). With
   ``retry_queue=False`` the worker retries in-process instead, up to
   ``max_attempts`` calls ``retry_backoff`` seconds apart (doubling),
   holding the message (and one prefetch slot) meanwhile;

5. if the dead letter cannot be published the worker climbs a short ladder
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

A consumer that dies (connection lost, process killed) before acking leaves
its unacked messages to RabbitMQ, which redelivers them flagged
``redelivered``: a message admitted before is then a redelivery, one never
admitted a first delivery. Replicas of one queue must share a replay store
(:class:`~trusthop.stores.redis.RedisReplayStore`); the default
:class:`~trusthop.stores.memory.MemoryReplayStore` is this worker's alone and
forgets everything when the process ends (a redelivery is then judged as a
first delivery, a pending retry copy as a delivery through the default
exchange: ``wrong_destination`` unless signed for it).

Routing checks (see :func:`~trusthop.amqp.messages.check_delivery`): a
delivery carrying a ``CC`` or ``BCC`` header is dead-lettered with
``wrong_destination``; when the handler was registered with ``bind=`` or
``accept_bindings=``, so is a delivery whose exchange and routing key match
none of those bindings (nor the default exchange with the queue's name, the
way retry copies come back).

Counters: :attr:`TrustedWorker.stats` (what happened to messages) and
:attr:`TrustedWorker.counters` (the :mod:`trusthop.metrics` names summed over
the worker's queues; per queue in ``worker.admissions[queue].counters``; also
reported to ``metrics=``).

Messages the AMQP client cannot decode: a header name or short-string
property that is not UTF-8, a header value of an unknown type or a
timestamp out of range would make aiormq close the whole connection on every
delivery (a stalled queue), and pamqp keeps only the last of two headers of
the same name. The worker installs :func:`~trusthop.amqp.frames.install_frame_guard`
(process-wide), so such a message is delivered with a marker instead and
dead-lettered as ``malformed`` (its body kept, its undecodable properties
not); a header named twice is ``malformed`` too.

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
import enum
import hashlib
import inspect
import logging
import math
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractQueue
from aiormq.exceptions import ChannelInvalidStateError
from pamqp.common import FieldTable

from trusthop.admission import Admission, Admitted
from trusthop.amqp.acks import DEFAULT_ACK_DELAY, AckBatcher, Slot
from trusthop.amqp.frames import install_frame_guard
from trusthop.amqp.messages import (
    DEFAULT_DEAD_LETTER_EXCHANGE,
    Binding,
    _source,
    check_delivery,
    dead_letter_headers,
    dead_letter_queue_name,
    encoded_headers_size,
    header_budget,
    minimal_dead_letter_headers,
    retry_attempt,
    retry_delay_ms,
    retry_headers,
    retry_queue_arguments,
    retry_queue_name,
    signed_destination,
)
from trusthop.amqp.publisher import PublishRefused, _publish_confirmed, _require_confirms
from trusthop.errors import Reason, TrustError
from trusthop.metrics import Counters, Fanout, Metrics
from trusthop.pipeline import (
    ChainVerifier,
    DeliveryViews,
    Rejection,
    TrustedEvent,
    printable,
)
from trusthop.replay import DEFAULT_REMEMBER, DeliveryInfo, DeliveryKind, OnReplay
from trusthop.stores.base import ReplayStore
from trusthop.stores.memory import MemoryReplayStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Delivery(DeliveryViews):
    """What a handler receives: a verified event and the message it came in.

    Attributes:
        trusted: the core's :class:`~trusthop.pipeline.TrustedEvent`.
        message: the aio-pika message. The worker acks it after the handler
            returns (possibly with the next ones, in one ``multiple`` ack);
            a handler must not ack, nack or reject it itself.
        queue: the queue it was consumed from.
        attempt: the handler attempt: 1 for a first delivery (and a
            redelivery of it), ``n`` for the ``n``-th call, whether it came
            back through ``<queue>.retry`` or was retried in-process
            (``retry_queue=False``).
        kind: what the delivery was to the queue's replay rules
            (:class:`~trusthop.replay.DeliveryKind`: ``first``,
            ``redelivery`` or ``retry``; a skipped replay never reaches a
            handler).
        redelivered: the handler may have run for this message before: a
            redelivery or a retry, or RabbitMQ flagged it ``redelivered``
            (a message whose first delivery this worker's store never
            recorded, e.g. after a restart with an in-memory store).
            Idempotent handlers can ignore it; others check it.
    """

    trusted: TrustedEvent
    message: AbstractIncomingMessage
    queue: str
    attempt: int = 1
    kind: DeliveryKind = DeliveryKind.FIRST
    redelivered: bool = False


Handler = Callable[[Delivery], Awaitable[None]]


@dataclass
class WorkerStats:
    """Counters of a :class:`TrustedWorker` (since it was created).

    Attributes:
        delivered: messages whose handler returned (then acked).
        dead_lettered: messages dead-lettered, by reason.
        handler_errors: handler calls that raised (each attempt counts).
        retried: retry copies published to ``<queue>.retry`` (and confirmed),
            after which the original was acked.
        skipped: replays acked without the handler (``on_replay="skip"``).
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
    retried: int = 0
    skipped: int = 0
    requeued: int = 0
    abandoned: int = 0

    @property
    def total_dead_lettered(self) -> int:
        return sum(self.dead_lettered.values())


class _Default(enum.Enum):
    STORE = "a fresh MemoryReplayStore"


FRESH_STORE: Final = _Default.STORE
"""Default of ``replay_store=``: a new :class:`MemoryReplayStore` per worker."""


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
    """Consumes queues, admits every message, then runs the queue's handler.

    Args:
        channel: an aio-pika channel opened with ``publisher_confirms=True``
            (dead letters and retry copies are published with confirms on it).
        verifier: the :class:`~trusthop.pipeline.ChainVerifier`; replacing its
            bundle or policy takes effect for the next message (redeliveries
            and retries included: a revoked actor is caught on retry).
        dead_letter_exchange: durable direct exchange the worker declares;
            each handled queue ``q`` gets a durable ``q.dlq`` bound with
            routing key ``q``.
        max_attempts: handler calls per message before ``handler_failed``.
        prefetch_count: unacked messages in flight (``basic.qos``, applied to
            the channel at :meth:`start`; a robust channel re-applies it
            after a reconnect).
        retry_queue: retry a failed handler through ``<queue>.retry`` (the
            default), or in-process (``False``; see the module docstring).
        retry_delay: seconds a retry copy waits in ``<queue>.retry``
            (its ``x-message-ttl``); every retry of the queue waits the same.
        retry_backoff: ``retry_queue=False`` only: seconds before the first
            in-process retry, doubled per retry. (Also the pause before
            requeueing a message whose dead letter failed.)
        abandon_after: a message whose dead letter keeps failing is abandoned
            only after failing for this many seconds (and at least twice);
            until then it is requeued after a growing pause.
        replay_store: where each queue's admission remembers accepted rings.
            Default: a fresh :class:`~trusthop.stores.memory.MemoryReplayStore`
            for this worker. Replicas of one queue must share one
            (:class:`~trusthop.stores.redis.RedisReplayStore`). ``None``
            turns replay detection off (every delivery is a first delivery;
            needs ``retry_queue=False``). A store with an async ``check()``
            is checked at :meth:`start`.
        max_uses: distinct copies of one signed event each queue accepts
            (1: single use; N: a broadcast).
        on_replay: ``"reject"`` (dead-letter ``replayed``) or ``"skip"``
            (ack without the handler, counted as a duplicate).
        remember: seconds a queue remembers an accepted ring at least,
            beyond the chain's own validity (a redelivery after that is
            judged as a first delivery).
        metrics: an extra sink for the counters (e.g.
            :class:`~trusthop.metrics.PrometheusMetrics`).
        ack_delay: seconds the ack of a handled message may wait to be
            coalesced with the next ones into one ``basic.ack`` with
            ``multiple=True`` (:mod:`trusthop.amqp.acks`; sent earlier when
            half of ``prefetch_count`` wait, and at :meth:`stop`). ``0``
            acks every message on its own, at once.

    Attributes:
        stats: :class:`WorkerStats`.
        counters: :class:`~trusthop.metrics.Counters` summed over every
            queue of this worker (``verified``, ``rejected`` by reason,
            ``redelivered``, ``retried``, ``replayed``, ``duplicates``,
            ``cache_hits``, ``cache_misses``).
        admissions: the :class:`~trusthop.admission.Admission` of each
            handled queue (created by :meth:`handler`); its ``counters``
            are that queue's alone.

    The handler contract and failure modes are in the module docstring.

    Raises:
        ValueError: the channel does not use publisher confirms;
            ``max_attempts``/``prefetch_count``/``max_uses`` below 1;
            ``retry_delay`` not a positive number of seconds; a negative or
            infinite ``ack_delay``; an unknown
            ``on_replay``; a negative ``remember``; ``retry_queue=True``
            without a replay store (a retry copy comes back through the
            default exchange and can only be verified against the
            destination the store remembered).
    """

    def __init__(
        self,
        channel: AbstractChannel,
        *,
        verifier: ChainVerifier,
        dead_letter_exchange: str = DEFAULT_DEAD_LETTER_EXCHANGE,
        max_attempts: int = 3,
        prefetch_count: int = 16,
        retry_queue: bool = True,
        retry_delay: float = 1.0,
        retry_backoff: float = 0.05,
        abandon_after: float = 30.0,
        replay_store: ReplayStore | _Default | None = FRESH_STORE,
        max_uses: int = 1,
        on_replay: OnReplay | str = OnReplay.REJECT,
        remember: float = DEFAULT_REMEMBER,
        metrics: Metrics | None = None,
        ack_delay: float = DEFAULT_ACK_DELAY,
    ) -> None:
        _require_confirms(channel, "TrustedWorker")
        # A message whose properties pamqp cannot decode would otherwise close
        # the connection on every delivery: a stalled queue (trusthop.amqp.frames).
        install_frame_guard()
        if max_attempts < 1 or prefetch_count < 1:
            raise ValueError("max_attempts and prefetch_count must be at least 1")
        if max_uses < 1:
            raise ValueError("max_uses must be at least 1")
        if remember < 0:
            raise ValueError("remember must not be negative")
        if not (isinstance(ack_delay, int | float) and 0 <= ack_delay < math.inf):
            raise ValueError("ack_delay must be a finite number of seconds, 0 or more")
        retry_delay_ms(retry_delay)  # validates
        store = MemoryReplayStore() if replay_store is FRESH_STORE else replay_store
        assert not isinstance(store, _Default)
        if retry_queue and store is None:
            raise ValueError(
                "retry_queue=True needs a replay store: a retry copy comes back through the "
                "default exchange and is verified against the destination remembered at its "
                "first delivery; pass retry_queue=False with replay_store=None"
            )
        self.channel = channel
        self.verifier = verifier
        self.dead_letter_exchange = dead_letter_exchange
        self.max_attempts = max_attempts
        self.prefetch_count = prefetch_count
        self.retry_queue = retry_queue
        self.retry_delay = retry_delay
        self.retry_backoff = retry_backoff
        self.abandon_after = abandon_after
        self.replay_store: ReplayStore | None = store
        self.max_uses = max_uses
        self.on_replay = OnReplay(on_replay)
        self.remember = remember
        self.metrics = metrics
        self.stats = WorkerStats()
        self.counters = Counters()
        self.admissions: dict[str, Admission] = {}
        self._sink: Metrics = self.counters if metrics is None else Fanout(self.counters, metrics)
        self._routes: dict[str, _Route] = {}
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._dlx: AbstractExchange | None = None
        self._inflight: set[asyncio.Future[Any]] = set()
        self._running = False
        # fingerprint -> dead-letter publishes started and not confirmed.
        self._letter_attempts: OrderedDict[str, int] = OrderedDict()
        # When each message's dead letter first failed (same keys, same bound).
        self._first_failure: dict[str, float] = {}
        # Acks of handled messages, coalesced (trusthop.amqp.acks); each token
        # is settled in the replay store once its ack was written.
        self.ack_delay = ack_delay
        self._acks: AckBatcher[tuple[str, Admitted]] = AckBatcher(
            on_acked=self._acked,
            on_lost=self._ack_lost,
            limit=max(1, prefetch_count // 2),
            delay=ack_delay,
        )

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
        Either way the worker declares ``<queue>.dlq`` and, with
        ``retry_queue=True``, ``<queue>.retry``.

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

        Creates the queue's admission (``worker.admissions[queue]``, scope
        ``amqp/<queue>``). Returns the handler unchanged.

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
            self.admissions[queue] = Admission(
                self.verifier,
                scope=f"amqp/{queue}",
                store=self.replay_store,
                max_uses=self.max_uses,
                on_replay=self.on_replay,
                remember=self.remember,
                metrics=self._sink,
            )
            return func

        return register

    async def start(self) -> None:
        """Check the replay store, declare the topology and start consuming
        every registered queue.

        Raises:
            RuntimeError: already running, or no handler registered.
            trusthop.stores.StoreError: the replay store's ``check()`` failed
                (e.g. a Redis that may evict entries early); nothing declared.
            aio_pika.exceptions.AMQPError: declaring or binding failed (for
                example a bound exchange does not exist, or ``<queue>.retry``
                exists with another ``retry_delay``: ``PRECONDITION_FAILED``).
        """
        if self._running:
            raise RuntimeError("worker already started")
        if not self._routes:
            raise RuntimeError("no handler registered")
        self._running = True
        try:
            await self._check_store()
            await self.channel.set_qos(prefetch_count=self.prefetch_count)
            self._dlx = await self.channel.declare_exchange(
                self.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
            )
            for route in self._routes.values():
                dlq = await self.channel.declare_queue(
                    dead_letter_queue_name(route.queue), durable=True
                )
                await dlq.bind(self._dlx, routing_key=route.queue)
                if self.retry_queue:
                    await self.channel.declare_queue(
                        retry_queue_name(route.queue),
                        durable=True,
                        arguments=retry_queue_arguments(route.queue, self.retry_delay),
                    )
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

    async def _check_store(self) -> None:
        """Await the replay store's ``check()``, when it has one."""
        check = getattr(self.replay_store, "check", None)
        if callable(check):
            result = check()
            if inspect.isawaitable(result):
                await result

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

    def retry_queue_arguments(self, queue: str) -> FieldTable:
        """Arguments the worker declares ``<queue>.retry`` with
        (:func:`~trusthop.amqp.messages.retry_queue_arguments` with this
        worker's ``retry_delay``)."""
        return retry_queue_arguments(queue, self.retry_delay)

    async def stop(self) -> None:
        """Cancel the consumers and wait for messages being processed.

        Messages delivered after this point are requeued. Idempotent. The
        replay store is not closed (it may be shared; its owner closes it).
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
        await self._acks.close()  # the acks of handled messages, then their settling

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
            # First thing, in delivery order (see trusthop.amqp.acks).
            slot = self._acks.track(message) if self.ack_delay > 0 else None
            try:
                await self._settled_or_requeued(route, message, slot)
            except Exception:
                self.stats.requeued += 1
                log.exception("trusthop: message on %r requeued", route.queue)
            finally:
                if slot is not None:
                    self._acks.release(slot)
                if task is not None:
                    self._inflight.discard(task)

        return on_message

    async def _settled_or_requeued(
        self, route: _Route, message: AbstractIncomingMessage, slot: Slot[Any] | None
    ) -> None:
        """:meth:`_process`, with ``message.process(requeue=True,
        ignore_processed=True)``'s semantics: if anything escapes (dead letter
        not confirmed, channel lost) before the message was settled, it is
        requeued, never lost, never acked early. A message whose ack was
        handed to the batcher counts as settled."""
        try:
            await self._process(route, message, slot)
        except BaseException:
            if not message.processed and not (slot is not None and slot.handed_over):
                try:
                    await message.reject(requeue=True)
                except ChannelInvalidStateError:
                    log.warning("trusthop: reject not sent, the channel is closed")
            raise

    async def _process(
        self, route: _Route, message: AbstractIncomingMessage, slot: Slot[Any] | None
    ) -> None:
        # Everything below settles the message explicitly (handled: acked
        # through the batcher; retried, skipped, or its dead letter confirmed:
        # acked at once). If anything escapes, the caller requeues it.
        if not self._running:
            self.stats.requeued += 1
            await message.nack(requeue=True)
            return
        admission = self.admissions[route.queue]
        source, _ = _source(message.exchange, message.routing_key)
        retry = retry_attempt(
            message.headers,
            exchange=message.exchange,
            routing_key=message.routing_key,
            queue=route.queue,
        )
        attempt = retry or 1
        admitting = False
        try:
            wire, destination = check_delivery(
                headers=message.headers,
                body=message.body,
                content_type=message.content_type,
                exchange=message.exchange,
                routing_key=message.routing_key,
                queue=route.queue,
                bindings=route.bindings,
            )
            admitting = True  # admit() counts its own rejections
            admitted = await admission.admit(
                wire,
                destination,
                DeliveryInfo(redelivered=bool(message.redelivered), retry=retry),
            )
        except TrustError as error:
            if not admitting:
                admission.count("rejected", reason=error.reason.value)
            await self._dead_letter(
                message,
                Rejection.of(
                    error,
                    source=source,
                    consumer=route.queue,
                    attempts=attempt,
                    destination=self._signed_destination(message),
                ),
            )
            return
        except Exception as exc:  # a decoder or store bug must not kill the consumer
            # Fail closed, at once: before admission a decoder bug
            # (``malformed``); during it most likely a replay store that
            # raised something else than StoreError (``store_unavailable``).
            stage = "admitting" if admitting else "decoding"
            log.exception("trusthop: unexpected error %s a message on %r", stage, route.queue)
            reason = Reason.STORE_UNAVAILABLE if admitting else Reason.MALFORMED
            admission.count("rejected", reason=reason.value)
            detail = (
                f"admission failed unexpectedly ({type(exc).__name__})"
                if admitting
                else f"undecodable message ({type(exc).__name__})"
            )
            await self._dead_letter(
                message, Rejection(reason, detail, source, route.queue, attempts=attempt)
            )
            return
        if admitted is None:  # a replay, skipped (on_replay="skip")
            log.info(
                "trusthop: duplicate of an accepted message on %r from %s acked unhandled",
                route.queue,
                printable(source),  # the routing key is the publisher's choice
            )
            await message.ack()
            self.stats.skipped += 1
            return
        delivery = Delivery(
            admitted.trusted,
            message,
            route.queue,
            attempt,
            admitted.kind,
            admitted.redelivered or bool(message.redelivered),
        )
        if self.retry_queue:
            await self._handle_once(route, delivery, admitted, source, slot)
        else:
            await self._handle_in_process(route, delivery, admitted, source, slot)

    def _signed_destination(self, message: AbstractIncomingMessage) -> str | None:
        return signed_destination(
            message.headers, message.body, message.content_type, limits=self.verifier.limits
        )

    async def _handle_once(
        self,
        route: _Route,
        delivery: Delivery,
        admitted: Admitted,
        source: str,
        slot: Slot[Any] | None,
    ) -> None:
        """One handler call; on failure a retry copy or ``handler_failed``."""
        message = delivery.message
        try:
            await route.handler(delivery)
        except Exception as exc:
            self._handler_failed(route.queue, delivery.attempt, exc)
            if message.processed:  # the handler settled the message itself
                await self._settle(route.queue, admitted)
                return
            if delivery.attempt < self.max_attempts:
                problem = await self._retry(route.queue, delivery, admitted)
                if problem is None:
                    await self._settle(route.queue, admitted)
                    return
                detail = (
                    f"handler raised {type(exc).__name__}: {exc}; "
                    f"retry {delivery.attempt + 1} not scheduled: {problem}"
                )
            else:
                detail = f"handler raised {type(exc).__name__}: {exc}"
            await self._give_up(route.queue, delivery, source, detail)
            await self._settle(route.queue, admitted)
            return
        await self._handled(route.queue, message, admitted, slot)

    async def _handled(
        self,
        queue: str,
        message: AbstractIncomingMessage,
        admitted: Admitted,
        slot: Slot[Any] | None,
    ) -> None:
        """The handler returned: ack (coalesced through the batcher when the
        message is tracked), count it delivered and settle it in the replay
        store once the ack was written (:meth:`_acked`)."""
        if slot is not None and not message.processed:
            self._acks.ack(slot, (queue, admitted))
            return
        if not message.processed:
            await message.ack()
        self.stats.delivered += 1
        await self._settle(queue, admitted)

    async def _acked(self, tokens: list[tuple[str, Admitted]]) -> None:
        """The batcher wrote the ack of these handled messages: count them and
        settle them in the replay store (see :meth:`_settle`)."""
        self.stats.delivered += len(tokens)
        for queue, admitted in tokens:
            await self._settle(queue, admitted)

    def _ack_lost(self, tokens: list[tuple[str, Admitted]], error: BaseException) -> None:
        """The ack of these handled messages could not be sent (channel lost):
        RabbitMQ redelivers them, flagged ``redelivered``, and their replay
        store entries stay open, so the redelivery is accepted."""
        self.stats.requeued += len(tokens)
        log.warning(
            "trusthop: ack of %d handled message(s) not sent (%r); RabbitMQ redelivers them",
            len(tokens),
            error,
        )

    async def _settle(self, queue: str, admitted: Admitted) -> None:
        """Tell the queue's replay store that ``admitted`` is settled (acked,
        or rejected without requeue), so that a copy flagged ``redelivered``
        after it is a replay (see :meth:`~trusthop.admission.Admission.settle`).

        Runs after the ack: a failure here only leaves the delivery open (a
        flagged copy is then still taken for a redelivery, as without this
        step); it is logged, never raised.
        """
        try:
            await self.admissions[queue].settle(admitted)
        except TrustError as error:
            log.warning(
                "trusthop: could not record a settled message on %r: %s", queue, error.message
            )

    async def _retry(self, queue: str, delivery: Delivery, admitted: Admitted) -> str | None:
        """Schedule the next attempt and publish its copy to ``<queue>.retry``,
        then ack the original. Returns ``None`` when done, else why not (the
        caller dead-letters the message; nothing was acked).

        A copy whose headers would not fit in a content-header frame is not
        published (RabbitMQ would close the connection). Publishing waits
        for the broker's confirm; a return (no ``<queue>.retry``), a nack
        or a lost channel is a failure. If the channel was lost, the dead
        letter fails too and RabbitMQ redelivers the original.
        """
        message = delivery.message
        attempt = delivery.attempt
        headers = retry_headers(message.headers, attempts=attempt, retry=attempt + 1)
        size = encoded_headers_size(headers)
        budget = header_budget(await self._frame_max())
        if size is None or size > budget:
            return f"its headers would not fit in a frame ({size or 'unencodable'} bytes)"
        copy = aio_pika.Message(
            message.body,
            headers=headers,
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
        target = retry_queue_name(queue)
        try:
            await self.admissions[queue].schedule_retry(admitted, attempt + 1)
            await _publish_confirmed(
                self.channel.default_exchange, copy, routing_key=target, mandatory=True
            )
        except Exception as exc:  # store down, returned, nacked, channel lost
            log.warning("trusthop: retry copy for %r not published: %r", queue, exc)
            return f"{type(exc).__name__}: {exc}"
        await message.ack()
        self.stats.retried += 1
        log.info(
            "trusthop: handler attempt %d on %r failed; attempt %d in %.3gs through %r",
            attempt,
            queue,
            attempt + 1,
            self.retry_delay,
            target,
        )
        return None

    async def _handle_in_process(
        self,
        route: _Route,
        first: Delivery,
        admitted: Admitted,
        source: str,
        slot: Slot[Any] | None,
    ) -> None:
        """``retry_queue=False``: up to ``max_attempts`` calls, backing off."""
        message = first.message
        last: Exception | None = None
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1:
                await asyncio.sleep(self.retry_backoff * 2 ** (attempt - 2))
            delivery = Delivery(
                first.trusted,
                message,
                route.queue,
                attempt,
                first.kind,
                first.redelivered or attempt > 1,
            )
            try:
                await route.handler(delivery)
            except Exception as exc:
                last = exc
                self._handler_failed(route.queue, attempt, exc)
                if message.processed:  # the handler settled the message itself
                    await self._settle(route.queue, admitted)
                    return
                continue
            await self._handled(route.queue, message, admitted, slot)
            return
        last_delivery = Delivery(first.trusted, message, route.queue, self.max_attempts)
        await self._give_up(
            route.queue, last_delivery, source, f"handler raised {type(last).__name__}: {last}"
        )
        await self._settle(route.queue, admitted)

    def _handler_failed(self, queue: str, attempt: int, exc: Exception) -> None:
        self.stats.handler_errors += 1
        log.warning(
            "trusthop: handler for %r failed (attempt %d/%d): %r",
            queue,
            attempt,
            self.max_attempts,
            exc,
        )

    async def _give_up(self, queue: str, delivery: Delivery, source: str, detail: str) -> None:
        """Dead-letter a verified message whose handler failed: ``handler_failed``."""
        self.admissions[queue].count("rejected", reason=Reason.HANDLER_FAILED.value)
        rejection = Rejection(
            Reason.HANDLER_FAILED,
            detail,
            source,
            queue,
            attempts=delivery.attempt,
            destination=delivery.trusted.context.destination,
        )
        await self._dead_letter(delivery.message, rejection)

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
