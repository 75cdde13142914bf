"""Kafka consumer wrapper: verify every record, dead-letter rejects, commit after handling.

:class:`TrustedKafkaConsumer`: auto-commit is always off. Every record is
decoded and verified against ``kafka:<record.topic>`` before user code sees
it. A record that fails (any :class:`~trusthop.errors.TrustError`) is written
to the dead-letter topic with its original key, value and headers (minus any
``trusthop-*`` ones: a sender cannot forge a verdict) plus the ``trusthop-*``
headers of :class:`~trusthop.pipeline.Rejection`, awaited, and only then
committed. A verified record becomes a :class:`KafkaDelivery`, consumed
either with ``async for`` or by :meth:`TrustedKafkaConsumer.run`.
At-least-once throughout: when in doubt an offset stays uncommitted and the
record is delivered again, never dropped.

No record stops or stalls the consumer:

* any other exception while decoding or verifying a record is a trusthop bug:
  it is logged with its traceback and the record is dead-lettered as
  ``malformed`` (the detail names the exception type), then committed;
* a dead letter too large for the dead-letter producer or the broker (it is
  always larger than its original) is replaced by a stub: no key, no value,
  none of the original headers, the verdict plus ``trusthop-original``
  (``<topic>/<partition>/<offset>``) and ``trusthop-original-bytes``; then
  the record is committed;
* a record aiokafka cannot parse (a header name that is not UTF-8 makes
  aiokafka's ``getmany`` raise ``UnicodeDecodeError`` before trusthop sees
  the record, on every attempt) is found by fetching one partition, then one
  record, at a time (:meth:`TrustedKafkaConsumer._isolate_undecodable`); the
  records before it are delivered as usual, it is dead-lettered as a stub
  (``malformed``, ``trusthop-original``, no ``trusthop-original-bytes``:
  its size is unknown) and committed, and consuming goes on after it.

Only a dead-letter write that fails otherwise (broker down, timeout, missing
authorisation) propagates, leaving the record uncommitted: it comes again.
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
from aiokafka.errors import (
    CommitFailedError,
    ConsumerStoppedError,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from trusthop.destination import kafka_destination
from trusthop.errors import Reason, TrustError
from trusthop.kafka.records import (
    dead_letter_headers,
    default_dead_letter_max_request_size,
    default_dead_letter_topic,
    record_size,
    stub_dead_letter_headers,
    verify_record_async,
)
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

# Produce errors meaning "this record is too large": aiokafka's client-side
# check (MessageSizeTooLargeError) and the broker's MESSAGE_TOO_LARGE (10) and
# RECORD_LIST_TOO_LARGE (18) error codes, which aiokafka raises as these classes.
_SIZE_ERRNOS = frozenset({MessageSizeTooLargeError.errno, RecordListTooLargeError.errno})


def _describe(error: BaseException) -> str:
    """``<type>: <message>`` of a handler's exception; never raises (even if ``str`` does)."""
    try:
        return f"{type(error).__name__}: {error}"
    except Exception:
        return f"{type(error).__name__}: <message not printable>"


UNDECODABLE_DETAIL = "aiokafka cannot decode the record at this offset (UnicodeDecodeError)"
"""``trusthop-detail`` of the stub dead letter of a record aiokafka cannot parse."""


@dataclass(frozen=True, slots=True)
class _Undecodable:
    """Stands in the buffer for a record aiokafka cannot parse, at its offset.

    Has the attributes of a ``ConsumerRecord`` the shell reads (no key,
    value or headers: aiokafka could not read them), so that it is
    dead-lettered, committed, rewound and dropped on revocation in order,
    like any record.
    """

    topic: str
    partition: int
    offset: int
    key: None = None
    value: None = None
    headers: tuple[()] = ()


def _is_size_error(exc: BaseException) -> bool:
    """Whether a failed produce means the record is too large (not a broker outage)."""
    return isinstance(exc, KafkaError) and getattr(exc, "errno", None) in _SIZE_ERRNOS


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
    rebalance moved the partition (the new owner redelivers the record);
    ``dead_letter_stubs`` counts the dead letters (already in
    ``dead_lettered``) written as a stub because the full one was too large.
    """

    delivered: int = 0
    handled: int = 0
    retried: int = 0
    commit_failures: int = 0
    dead_letter_stubs: int = 0
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
            "dead_letter_stubs": self.dead_letter_stubs,
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
            Give it a ``max_request_size`` above the largest record the
            consumer can receive, or large rejects are dead-lettered as stubs.
        dead_letter_max_request_size: ``max_request_size`` of the dead-letter
            producer the consumer builds; default
            :func:`default_dead_letter_max_request_size` (2 MiB unless
            ``max_partition_fetch_bytes`` is larger). A dead letter over it,
            or refused by the broker as too large, is written as a stub (see
            :meth:`run`).
        **consumer_kwargs: forwarded to ``AIOKafkaConsumer`` (e.g.
            ``bootstrap_servers``, ``auto_offset_reset``,
            ``session_timeout_ms``); ``enable_auto_commit`` is forced off.

    Raises:
        ValueError: ``enable_auto_commit=True``, no topic, an empty
            ``group_id``, ``max_attempts < 1``, a non-positive
            ``dead_letter_max_request_size``.
        TypeError: a ``key_deserializer``/``value_deserializer`` (the
            verifier needs the raw bytes), or both ``dead_letter_producer``
            and ``dead_letter_max_request_size``.

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
        dead_letter_max_request_size: int | None = None,
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
        if dead_letter_max_request_size is not None:
            if dead_letter_producer is not None:
                raise TypeError(
                    "give either dead_letter_producer= or dead_letter_max_request_size=, not both"
                )
            if dead_letter_max_request_size <= 0:
                raise ValueError("dead_letter_max_request_size must be positive")
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
            if dead_letter_max_request_size is None:
                dead_letter_max_request_size = default_dead_letter_max_request_size(consumer_kwargs)
            dead_letter_producer = AIOKafkaProducer(
                acks="all", max_request_size=dead_letter_max_request_size, **connection
            )
        self._dlq: Any = dead_letter_producer
        # The size a batch append must stay under (aiokafka checks send(), not batches).
        limit = getattr(dead_letter_producer, "_max_request_size", None)
        self._dlq_max_request_size: int | None = limit if isinstance(limit, int) else None
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

        Records that fail verification are dead-lettered (as in :meth:`run`,
        stubs included) and committed on the way and never returned. Ends
        (``StopAsyncIteration``) once :meth:`stop` was called.

        Raises:
            RuntimeError: the consumer was never started, or :meth:`run` is
                consuming at the same time.
            aiokafka.errors.KafkaError: dead-lettering failed other than by
                size (the record is not committed and comes again).
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

        Dead letters: the original key, value and headers (minus incoming
        ``trusthop-*`` headers) plus the verdict. One that is too large to
        send (aiokafka's ``MessageSizeTooLargeError``, or the broker's
        MESSAGE_TOO_LARGE / RECORD_LIST_TOO_LARGE) is replaced by a stub
        without key, value or original headers, carrying the verdict,
        ``trusthop-original: <topic>/<partition>/<offset>`` and
        ``trusthop-original-bytes``; the record is then committed. A decoder
        or verifier exception other than ``TrustError`` (a bug) is logged
        and dead-lettered as ``malformed``.

        Returns:
            The number of records settled (handled or dead-lettered).

        Raises:
            TypeError: no handler given or registered.
            RuntimeError: not started, already consuming, or another task
                is inside an ``async for`` loop over this consumer.
            aiokafka.errors.KafkaError: dead-lettering failed other than by
                size, stub included (the record is not committed and comes
                again).
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
            _describe(error),
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
            except UnicodeDecodeError:
                log.warning("aiokafka cannot decode a fetched record; looking for it")
                try:
                    await self._isolate_undecodable()
                except ConsumerStoppedError:
                    return None
                continue
            for records in batches.values():
                self._buffer.extend(records)
        return self._buffer.popleft()

    async def _isolate_undecodable(self) -> None:
        """After ``getmany`` raised ``UnicodeDecodeError``: find the record, buffer a stand-in.

        aiokafka decodes header names as strict UTF-8 while it iterates a
        fetched batch, so a name that is not UTF-8 makes every ``getmany``
        that reaches the record raise, before the record can be returned.
        Called with an empty buffer, i.e. every record returned so far is
        settled and committed:

        1. Every assigned partition is moved back to its committed offset (to
           its beginning when nothing is committed): the failed ``getmany``
           may have advanced partitions whose records it then lost with the
           exception. Records are delivered again rather than skipped.
        2. Each partition is fetched on its own; records are buffered as
           usual. One whose fetch raises is fetched again one record at a
           time: the records before the culprit are buffered, and when the
           fetch raises again the culprit is at the partition's position. An
           :class:`_Undecodable` for that offset is buffered after them (it
           is dead-lettered and committed in its turn, see :meth:`_admit`)
           and the partition seeks past it.

        The same offset is met again after a restart or a rewind until its
        stand-in is committed. (In a batch aiokafka cannot parse, the
        records after the culprit cannot be parsed either: each is
        dead-lettered the same way. An offset with no record, such as a
        transaction marker or a compacted-away record, just before the
        culprit can get a stub of its own.)
        """
        partitions = sorted(self._consumer.assignment())
        for tp in partitions:
            committed = await self._consumer.committed(tp)
            with contextlib.suppress(IllegalStateError):
                if committed is None:
                    await self._consumer.seek_to_beginning(tp)
                else:
                    self._consumer.seek(tp, committed)
        for tp in partitions:
            one_at_a_time = False
            while True:
                try:
                    batches = await self._consumer.getmany(
                        tp,
                        timeout_ms=self.poll_timeout_ms,
                        max_records=1 if one_at_a_time else None,
                    )
                except UnicodeDecodeError:
                    if not one_at_a_time:
                        one_at_a_time = True
                        continue
                    try:
                        offset = await self._consumer.position(tp)
                    except IllegalStateError:  # revoked meanwhile
                        break
                    log.error(
                        "aiokafka cannot decode %s:%d@%d (a header name that is not "
                        "UTF-8?); dead-lettering a stub and skipping it",
                        tp.topic,
                        tp.partition,
                        offset,
                    )
                    self._buffer.append(_Undecodable(tp.topic, tp.partition, offset))
                    self._consumer.seek(tp, offset + 1)
                    break
                records = batches.get(tp, [])
                self._buffer.extend(records)
                if not (one_at_a_time and records):
                    break

    async def _admit(self, record: Any) -> KafkaDelivery | None:
        """Verify ``record``; dead-letter it (not commit) and return ``None`` if rejected.

        A :class:`TrustError` is the record's verdict. Any other exception from
        decoding or verifying is a trusthop bug: logged with its traceback and
        dead-lettered as ``malformed`` all the same, so that no record can
        stop the consumer, nor stall it by coming back after every restart.

        Raises:
            aiokafka.errors.KafkaError: the dead letter could not be written
                (see :meth:`_dead_letter`).
        """
        source = kafka_destination(record.topic)
        if isinstance(record, _Undecodable):
            rejection = Rejection(Reason.MALFORMED, UNDECODABLE_DETAIL, source, self.group_id)
            await self._send_stub(record, rejection, None)
            self.stats.dead_lettered[rejection.reason] += 1
            return None
        try:
            trusted = await verify_record_async(
                self.verifier, topic=record.topic, headers=record.headers, value=record.value
            )
        except TrustError as error:
            rejection = Rejection.of(error, source=source, consumer=self.group_id)
            log.warning(
                "rejected %s:%d@%d: %s", record.topic, record.partition, record.offset, error
            )
            await self._dead_letter(record, rejection)
            return None
        except Exception as exc:  # a decoder bug must not stop or stall the consumer
            log.exception(
                "bug: %s while verifying %s:%d@%d; dead-lettered as malformed",
                type(exc).__name__,
                record.topic,
                record.partition,
                record.offset,
            )
            detail = f"undecodable record ({type(exc).__name__})"
            rejection = Rejection(Reason.MALFORMED, detail, source, self.group_id)
            await self._dead_letter(record, rejection)
            return None
        return KafkaDelivery(trusted, record)

    async def _dead_letter(self, record: Any, rejection: Rejection) -> None:
        """Write the dead letter of ``record`` and wait for the broker's ack.

        The full dead letter first: original key and value, original headers
        minus ``trusthop-*`` ones, then the verdict. If that fails because it
        is too large (:func:`_is_size_error`), a stub follows: no key, no
        value, the verdict plus where the original is
        (:func:`~trusthop.kafka.records.stub_dead_letter_headers`).

        Raises:
            aiokafka.errors.KafkaError: any other failure of the full dead
                letter, or any failure of the stub; nothing was acknowledged
                and the caller must not commit.
        """
        topic = self.dead_letter_topic_for(record.topic)
        headers = dead_letter_headers(record.headers, rejection)
        try:
            await self._send_dead_letter(topic, record.key, record.value, headers)
        except KafkaError as exc:
            if not _is_size_error(exc):
                raise
            size = record_size(record.key, record.value, record.headers)
            log.error(
                "dead letter of %s:%d@%d (%d bytes) is too large for %s (%s); writing a "
                "stub without key, value or original headers; the original stays in %s",
                record.topic,
                record.partition,
                record.offset,
                size,
                topic,
                type(exc).__name__,
                record.topic,
            )
            await self._send_stub(record, rejection, size)
        self.stats.dead_lettered[rejection.reason] += 1

    async def _send_stub(self, record: Any, rejection: Rejection, size: int | None) -> None:
        """Write the stub dead letter of ``record`` (``size=None``: unknown) and wait for the ack.

        Raises:
            aiokafka.errors.KafkaError: not acknowledged; the caller must not commit.
        """
        stub = stub_dead_letter_headers(
            rejection,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            size=size,
        )
        await self._send_dead_letter(self.dead_letter_topic_for(record.topic), None, None, stub)
        self.stats.dead_letter_stubs += 1

    async def _send_dead_letter(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | None]],
    ) -> None:
        """Send one record to ``topic`` and wait for the ack.

        Raises:
            aiokafka.errors.KafkaError: not acknowledged;
                ``MessageSizeTooLargeError`` when over the producer's
                ``max_request_size`` (checked here for batches, which
                aiokafka does not check) or refused by the broker as too large.
        """
        if key is not None or value is not None:
            await self._dlq.send_and_wait(topic, value=value, key=key, headers=headers)
            return
        # aiokafka's send() refuses a record with neither key nor value; a batch
        # carries it unchanged, but a batch's first record skips the size check.
        limit = self._dlq_max_request_size
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(None, None, headers)
        if limit is not None and size > limit:
            raise MessageSizeTooLargeError(
                f"the dead letter is {size} bytes, over max_request_size {limit}"
            )
        batch = self._dlq.create_batch()
        if batch.append(timestamp=None, key=None, value=None, headers=headers) is None:
            raise MessageSizeTooLargeError("the dead letter does not fit in a batch")
        partitions = sorted(await self._dlq.partitions_for(topic))
        future = await self._dlq.send_batch(batch, topic, partition=partitions[0])
        await future

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
