"""Kafka consumer wrapper: verify every record, dead-letter rejects, commit after handling.

:class:`TrustedKafkaConsumer`: auto-commit is always off. Every record is
decoded and verified against ``kafka:<record.topic>`` before user code sees
it. A record that fails (any :class:`~trusthop.errors.TrustError`) is written
to the dead-letter topic with its original key, value and headers plus the
``trusthop-*`` headers of :class:`~trusthop.pipeline.Rejection`, awaited, and
only then committed. A verified record becomes a :class:`KafkaDelivery`,
consumed either with ``async for`` or by :meth:`TrustedKafkaConsumer.run`.
At-least-once throughout: when in doubt an offset stays uncommitted and the
record is delivered again, never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, ConsumerStoppedError, IllegalStateError

from trusthop.destination import kafka_destination
from trusthop.errors import Reason, TrustError
from trusthop.kafka.records import dead_letter_headers, default_dead_letter_topic, verify_record
from trusthop.pipeline import ChainVerifier, DeliveryViews, Rejection, TrustedEvent

log = logging.getLogger(__name__)

# Connection settings the dead-letter producer copies from the consumer's kwargs.
_CONNECTION_KWARGS = (
    "bootstrap_servers",
    "client_id",
    "security_protocol",
    "ssl_context",
    "sasl_mechanism",
    "sasl_plain_username",
    "sasl_plain_password",
    "sasl_kerberos_service_name",
    "sasl_kerberos_domain_name",
    "sasl_oauth_token_provider",
    "api_version",
    "connections_max_idle_ms",
    "request_timeout_ms",
    "retry_backoff_ms",
    "metadata_max_age_ms",
)

_MAX_RETRY_DELAY = 5.0


@dataclass(frozen=True, slots=True)
class KafkaDelivery(DeliveryViews):
    """A verified record handed to user code.

    ``record`` is aiokafka's ``ConsumerRecord`` (raw key, value, headers,
    topic, partition, offset). ``attempt`` counts handler attempts in
    :meth:`TrustedKafkaConsumer.run` (1 for the first, always 1 in
    ``async for``). Derive events with ``parent=delivery.context``.
    """

    trusted: TrustedEvent
    record: Any
    attempt: int = 1

    @property
    def topic(self) -> str:
        return str(self.record.topic)

    @property
    def partition(self) -> int:
        return int(self.record.partition)

    @property
    def offset(self) -> int:
        return int(self.record.offset)


@dataclass(slots=True)
class ConsumerStats:
    """Counters of one :class:`TrustedKafkaConsumer` (since it was built).

    ``delivered`` counts verified records handed to user code (once per
    delivery, not per handler attempt); ``handled`` those whose loop body or
    handler finished and were committed; ``dead_lettered`` counts by reason
    code (``Reason`` values; plain strings work as keys); ``retried`` counts
    handler re-attempts; ``commit_failures`` counts commits refused because a
    rebalance moved the partition (the new owner redelivers the record).
    """

    delivered: int = 0
    handled: int = 0
    retried: int = 0
    commit_failures: int = 0
    dead_lettered: Counter[Reason] = field(default_factory=Counter)

    @property
    def dead_lettered_total(self) -> int:
        return sum(self.dead_lettered.values())

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, e.g. for logs and demo output."""
        return {
            "delivered": self.delivered,
            "handled": self.handled,
            "retried": self.retried,
            "commit_failures": self.commit_failures,
            "dead_lettered": {str(k): v for k, v in sorted(self.dead_lettered.items())},
        }


Handler = Callable[[KafkaDelivery], Awaitable[object]]
"""An async callable run once per verified delivery by :meth:`TrustedKafkaConsumer.run`."""


class _DropOnRevoke:
    """Rebalance listener: forget buffered records of partitions taken away."""

    def __init__(self, owner: TrustedKafkaConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
        self._owner._drop_buffered(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
        return None


# A virtual subclass: aiokafka checks isinstance(), no inheritance needed.
ConsumerRebalanceListener.register(_DropOnRevoke)


class TrustedKafkaConsumer:
    """Consume CloudEvents from Kafka, verifying every chain before user code runs.

    Args:
        *topics: topics to subscribe to (group-managed assignment).
        verifier: the :class:`ChainVerifier` (its bundle may be swapped live).
        group_id: the consumer group; also written as ``trusthop-consumer``
            in dead letters.
        dead_letter_topic: a topic name, or a function of the source topic;
            default ``<topic>.dlq``.
        max_attempts: handler attempts per delivery in :meth:`run` before it
            is dead-lettered with ``handler_failed``.
        retry_delay: seconds before the second attempt; doubles per attempt,
            capped at 5 s.
        poll_timeout_ms: how long one ``getmany`` waits; bounds how late a
            concurrent :meth:`stop` is noticed.
        dead_letter_producer: an existing started ``AIOKafkaProducer`` for dead
            letters (the caller's to start and stop); by default one is
            built on the consumer's connection settings with ``acks="all"``.
        **consumer_kwargs: forwarded to ``AIOKafkaConsumer`` (e.g.
            ``bootstrap_servers``, ``auto_offset_reset``,
            ``session_timeout_ms``); ``enable_auto_commit`` is forced off.

    Raises:
        ValueError: ``enable_auto_commit=True``, no topic, an empty
            ``group_id``, ``max_attempts < 1``.
        TypeError: a ``key_deserializer``/``value_deserializer`` (the
            verifier needs the raw bytes).

    Offsets: a delivery of ``async for`` is committed when the loop asks for
    the next one (its body finished), or when :meth:`commit` is awaited.
    Leaving the loop (an exception, ``break``, ``return``) leaves the last
    delivery uncommitted, whether the loop is left for good (:meth:`stop`,
    ``async with`` exit) or not: it is delivered again, to this consumer when
    it loops again, or to the group after a restart. Python's ``async for``
    cannot tell ``break`` from an exception (and an exception caught inside
    the ``async with`` block looks like a clean exit), so the shell errs on
    the side of redelivery, never of loss: call :meth:`commit` before
    ``break`` to avoid the duplicate. :meth:`run` commits each record as soon
    as its handler returned or it was dead-lettered. Iterate from one task
    at a time, and not while :meth:`run` is consuming.
    """

    def __init__(
        self,
        *topics: str,
        verifier: ChainVerifier,
        group_id: str,
        dead_letter_topic: str | Callable[[str], str] = default_dead_letter_topic,
        max_attempts: int = 3,
        retry_delay: float = 0.05,
        poll_timeout_ms: int = 250,
        dead_letter_producer: Any = None,
        **consumer_kwargs: Any,
    ) -> None:
        if not topics:
            raise ValueError("subscribe to at least one topic")
        if not group_id:
            raise ValueError("a group_id is required: offsets are committed to the group")
        if consumer_kwargs.get("enable_auto_commit", False):
            raise ValueError(
                "enable_auto_commit=True is refused: offsets are committed only after "
                "a record was handled or dead-lettered"
            )
        for name in ("key_deserializer", "value_deserializer"):
            if name in consumer_kwargs:
                raise TypeError(f"{name} is not supported: verification needs the raw bytes")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        consumer_kwargs["enable_auto_commit"] = False
        self.topics = tuple(topics)
        self.verifier = verifier
        self.group_id = group_id
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.poll_timeout_ms = poll_timeout_ms
        self.stats = ConsumerStats()
        self._dead_letter_topic = dead_letter_topic
        self._consumer: Any = AIOKafkaConsumer(group_id=group_id, **consumer_kwargs)
        self._owns_dlq = dead_letter_producer is None
        if dead_letter_producer is None:
            connection = {k: consumer_kwargs[k] for k in _CONNECTION_KWARGS if k in consumer_kwargs}
            dead_letter_producer = AIOKafkaProducer(acks="all", **connection)
        self._dlq: Any = dead_letter_producer
        self._handler: Handler | None = None
        self._buffer: deque[Any] = deque()
        self._pending: KafkaDelivery | None = None
        self._pending_task: asyncio.Task[Any] | None = None
        self._lock = asyncio.Lock()
        self._started = False
        self._stopping = False
        self._stopped = False
        self._run_task: asyncio.Task[Any] | None = None
        self._stop_from_handler = False

    # ------------------------------------------------------------- lifecycle

    @property
    def client(self) -> Any:
        """The wrapped ``AIOKafkaConsumer`` (``committed()``, ``assignment()``...)."""
        return self._consumer

    @property
    def dead_letter_producer(self) -> Any:
        """The ``AIOKafkaProducer`` that writes dead letters."""
        return self._dlq

    def dead_letter_topic_for(self, topic: str) -> str:
        """The dead-letter topic of records consumed from ``topic``."""
        target = self._dead_letter_topic
        return target(topic) if callable(target) else target

    async def start(self) -> None:
        """Start the dead-letter producer, then subscribe and start the consumer.

        The group join happens on the first fetch (it can take seconds).
        """
        if self._started:
            return
        if self._owns_dlq:
            await self._dlq.start()
        try:
            self._consumer.subscribe(list(self.topics), listener=_DropOnRevoke(self))
            await self._consumer.start()
        except BaseException:
            if self._owns_dlq:
                await self._dlq.stop()
            raise
        self._started = True

    async def stop(self) -> None:
        """Stop consuming; the group rebalances the partitions to others.

        Waits for a record being settled (verified, handled by :meth:`run`,
        dead-lettered, committed) to finish first. Never commits the last
        ``async for`` delivery (see the class docstring). Called from inside a
        :meth:`run` handler, it only asks :meth:`run` to return after the
        current record, and :meth:`run` then stops the clients.
        """
        if self._stopped or not self._started:
            return
        self._stopping = True
        task = asyncio.current_task()
        if self._run_task is not None and task is self._run_task:
            self._stop_from_handler = True
            return
        async with self._lock:
            await self._shutdown()

    async def _shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            await self._consumer.stop()
        finally:
            if self._owns_dlq:
                await self._dlq.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------- async for

    def __aiter__(self) -> Self:
        """Start a loop. A delivery a previous loop left unfinished comes again.

        Raises:
            RuntimeError: another task is inside a loop over this consumer.
        """
        self._check_owner()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._rewind(pending.record)
        return self

    async def __anext__(self) -> KafkaDelivery:
        """Commit the previous delivery (its body finished), return the next one.

        Records that fail verification are dead-lettered and committed on the
        way and never returned. Ends (``StopAsyncIteration``) once
        :meth:`stop` was called.

        Raises:
            RuntimeError: the consumer was never started, or :meth:`run` is
                consuming at the same time.
            aiokafka.errors.KafkaError: dead-lettering failed (the record is
                not committed and comes again).
        """
        if not self._started:
            raise RuntimeError("start() the consumer (or use 'async with') before iterating")
        if self._run_task is not None:
            raise RuntimeError("run() is consuming; do not iterate at the same time")
        self._check_owner()
        while True:
            if self._stopping:
                raise StopAsyncIteration
            async with self._lock:
                if self._pending is not None:
                    pending, self._pending = self._pending, None
                    await self._commit_handled(pending.record)
                record = await self._next_record()
                if record is None:
                    raise StopAsyncIteration
                try:
                    delivery = await self._admit(record)
                    if delivery is None:
                        await self._commit(record)
                        continue
                except BaseException:
                    self._rewind(record)
                    raise
                self._pending = delivery
                self._pending_task = asyncio.current_task()
                self.stats.delivered += 1
                return delivery

    def _check_owner(self) -> None:
        """One loop at a time: the open delivery belongs to the task that got it."""
        if self._pending is not None and self._pending_task is not asyncio.current_task():
            raise RuntimeError(
                "another task holds an uncommitted delivery of this consumer; "
                "iterate from one task at a time"
            )

    async def commit(self) -> None:
        """Commit the last ``async for`` delivery now (its processing is done).

        A no-op when there is none, or when the consumer is stopping.
        """
        if self._pending is None or self._stopping:
            return
        self._check_owner()
        async with self._lock:
            if self._pending is not None:
                pending, self._pending = self._pending, None
                await self._commit_handled(pending.record)

    # ------------------------------------------------------------- handler

    def handler(self, func: Handler) -> Handler:
        """Decorator registering the handler :meth:`run` uses by default."""
        self._handler = func
        return func

    async def run(self, handler: Handler | None = None, *, limit: int | None = None) -> int:
        """Consume until :meth:`stop` (or ``limit`` records), awaiting ``handler`` per delivery.

        A handler exception is retried up to ``max_attempts`` times in all
        (``delivery.attempt`` says which), then the record is dead-lettered
        with ``handler_failed``. Each record is committed once handled or
        dead-lettered. Cancelling ``run`` leaves the current record
        uncommitted; it comes again.

        Returns:
            The number of records settled (handled or dead-lettered).

        Raises:
            TypeError: no handler given or registered.
            RuntimeError: not started, already consuming, or another task
                is inside an ``async for`` loop over this consumer.
            aiokafka.errors.KafkaError: dead-lettering failed (the record is
                not committed and comes again).
        """
        func = handler if handler is not None else self._handler
        if func is None:
            raise TypeError("give run() a handler or register one with @consumer.handler")
        if not self._started:
            raise RuntimeError("start() the consumer (or use 'async with') before run()")
        if self._run_task is not None:
            raise RuntimeError("run() is already consuming")
        self._check_owner()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._rewind(pending.record)
        self._run_task = asyncio.current_task()
        settled = 0
        try:
            while (limit is None or settled < limit) and not self._stopping:
                async with self._lock:
                    record = await self._next_record()
                    if record is None:
                        break
                    try:
                        delivery = await self._admit(record)
                        if delivery is None:
                            await self._commit(record)
                        else:
                            self.stats.delivered += 1
                            await self._handle(func, delivery)
                    except BaseException:
                        self._rewind(record)
                        raise
                settled += 1
        finally:
            self._run_task = None
            if self._stop_from_handler:
                async with self._lock:
                    await self._shutdown()
        return settled

    async def _handle(self, func: Handler, delivery: KafkaDelivery) -> None:
        error: Exception | None = None
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1:
                self.stats.retried += 1
                await asyncio.sleep(min(self.retry_delay * 2 ** (attempt - 2), _MAX_RETRY_DELAY))
            try:
                await func(replace(delivery, attempt=attempt))
            except Exception as exc:
                error = exc
                log.debug(
                    "handler attempt %d/%d failed for %s:%d@%d",
                    attempt,
                    self.max_attempts,
                    delivery.topic,
                    delivery.partition,
                    delivery.offset,
                    exc_info=True,
                )
                continue
            await self._commit_handled(delivery.record)
            return
        assert error is not None
        log.warning(
            "handler failed %d times for %s:%d@%d: %r",
            self.max_attempts,
            delivery.topic,
            delivery.partition,
            delivery.offset,
            error,
        )
        rejection = Rejection(
            Reason.HANDLER_FAILED,
            f"{type(error).__name__}: {error}",
            kafka_destination(delivery.topic),
            self.group_id,
            self.max_attempts,
        )
        await self._dead_letter(delivery.record, rejection)
        await self._commit(delivery.record)

    # ------------------------------------------------------------- internals

    async def _next_record(self) -> Any:
        """The next buffered record, fetching with ``getmany``; ``None`` once stopping."""
        while not self._buffer:
            if self._stopping:
                return None
            try:
                batches = await self._consumer.getmany(timeout_ms=self.poll_timeout_ms)
            except ConsumerStoppedError:
                return None
            for records in batches.values():
                self._buffer.extend(records)
        return self._buffer.popleft()

    async def _admit(self, record: Any) -> KafkaDelivery | None:
        """Verify ``record``; dead-letter it (not commit) and return ``None`` if rejected."""
        try:
            trusted = verify_record(
                self.verifier, topic=record.topic, headers=record.headers, value=record.value
            )
        except TrustError as error:
            rejection = Rejection.of(
                error, source=kafka_destination(record.topic), consumer=self.group_id
            )
            log.warning(
                "rejected %s:%d@%d: %s", record.topic, record.partition, record.offset, error
            )
            await self._dead_letter(record, rejection)
            return None
        return KafkaDelivery(trusted, record)

    async def _dead_letter(self, record: Any, rejection: Rejection) -> None:
        """Write the original record plus the rejection headers; wait for the ack."""
        topic = self.dead_letter_topic_for(record.topic)
        headers = dead_letter_headers(record.headers, rejection)
        if record.key is None and record.value is None:
            # aiokafka's send() refuses a record with neither key nor value; a
            # batch carries it unchanged.
            batch = self._dlq.create_batch()
            batch.append(timestamp=None, key=None, value=None, headers=headers)
            partitions = sorted(await self._dlq.partitions_for(topic))
            future = await self._dlq.send_batch(batch, topic, partition=partitions[0])
            await future
        else:
            await self._dlq.send_and_wait(
                topic, value=record.value, key=record.key, headers=headers
            )
        self.stats.dead_lettered[rejection.reason] += 1

    async def _commit_handled(self, record: Any) -> None:
        await self._commit(record)
        self.stats.handled += 1

    async def _commit(self, record: Any) -> None:
        """Commit the offset after ``record``; a lost partition only means redelivery."""
        tp = TopicPartition(record.topic, record.partition)
        try:
            await self._consumer.commit({tp: record.offset + 1})
        except (CommitFailedError, IllegalStateError) as exc:
            # The partition moved to another member: it resumes from the last
            # committed offset and delivers this record again (not lost).
            self.stats.commit_failures += 1
            log.warning(
                "commit of %s@%d refused (%s); it will be redelivered", tp, record.offset, exc
            )

    def _rewind(self, record: Any) -> None:
        """Deliver ``record`` again: forget what was buffered after it, seek back."""
        tp = TopicPartition(record.topic, record.partition)
        self._drop_buffered({tp})
        with contextlib.suppress(IllegalStateError):
            if not self._stopped:
                self._consumer.seek(tp, record.offset)

    def _drop_buffered(self, partitions: set[Any]) -> None:
        if partitions and self._buffer:
            self._buffer = deque(
                r for r in self._buffer if TopicPartition(r.topic, r.partition) not in partitions
            )
