"""Kafka consumer wrapper: admit every record, retry through retry topics, commit after.

:class:`TrustedKafkaConsumer`: auto-commit is always off. Every record is
decoded and handed to :meth:`trusthop.admission.Admission.admit` (scope
``kafka/<group_id>``) for the destination it must have been signed for
(:func:`~trusthop.destination.signed_kafka_destination`: ``kafka:<t>`` for a
record of a subscribed topic ``t`` and of ``t.retry``), with its delivery
identity ``<topic>/<partition>@<offset>``. Admission verifies the chain and
applies the replay rules of :mod:`trusthop.replay` against the consumer's
replay store:

* a first delivery is verified in full, at the current time;
* a redelivery of the same record (same topic, partition and offset: after
  a crash, a rebalance, a rewind) is accepted again without the signature
  checks, judged at the first delivery's time, with revocation, bindings,
  destination and policy checked again; the handler sees
  ``delivery.redelivered``;
* another copy of an accepted ring (re-published by anyone) is rejected
  ``replayed`` (or, with ``on_replay="skip"``, committed without the
  handler), beyond ``max_uses`` accepted copies per group.

A record that fails (any :class:`~trusthop.errors.TrustError`) is written to
the dead-letter topic with its original key, value and headers (minus any
``trusthop-*`` ones: a sender cannot forge a verdict) plus the ``trusthop-*``
headers of :class:`~trusthop.pipeline.Rejection` (reason, detail, source,
consumer, delivery attempts and, when the chain decodes, the destination its
newest ring was signed for), awaited, and only then committed. A verified
record becomes a :class:`KafkaDelivery`, consumed either with ``async for``
or by :meth:`TrustedKafkaConsumer.run`.

Handler retries (:meth:`TrustedKafkaConsumer.run`, ``retry_topics=True``,
the default): a failed handler attempt ``n < max_attempts`` is remembered in
the replay store (:meth:`~trusthop.admission.Admission.schedule_retry`),
then a copy of the record (same key, value and headers, chain unchanged,
plus ``trusthop-retry: n+1``, ``trusthop-not-before``, ``trusthop-original``,
``trusthop-attempts`` and ``trusthop-consumer: <group>``) is written to
``<t>.retry`` and acknowledged, and only then is the record committed. The
consumer subscribes to the retry topic of each of its topics. That topic is
shared by every group consuming ``t``: a copy naming another group is
committed without being admitted (:attr:`ConsumerStats.foreign_retries`). A
retry copy is admitted as a retry (judged at the first delivery's time, so
waiting never expires it; revocation and policy are checked again); a copy
whose retry number the store does not expect is ``replayed``. A copy that is
not due yet, and that the store expects (anything else is judged at once, so
forged "not before" headers cannot hold a partition), pauses its own
partition for at most ``retry_delay`` (seek back, ``pause``, ``resume`` when
due): the main topic and the other partitions keep flowing. After
``max_attempts`` handler attempts the record is dead-lettered
``handler_failed`` to ``<t>.dlq``. The consumer counts
attempts itself (the ``trusthop-retry`` number checked against the store),
never trusting broker counters.

Offsets: a record is *settled* once its handler returned (the loop body
finished, for ``async for``), its retry copy was acknowledged, it was skipped
(a foreign retry copy, a replay under ``on_replay="skip"``), or its dead
letter was acknowledged; "committed" below means "its offset may be
committed from then on". Commits are coalesced: each sends, for every
partition, the offset after its last settled record (records of a partition
are settled one at a time, in order, so that is the highest contiguous
settled offset), in one request, awaited. One is sent at most every
``commit_interval`` seconds while records flow (the first record settled
after a quiet spell is committed at once), before the last record of a
fetched batch of several is handed out (so a slow last record holds back
nothing else), before fetching after a dead letter or a retry copy was
written (their repeat is worth a commit), once the consumer is idle (a
``getmany`` that waits wakes up when the settled records are due), on
revocation (for the revoked partitions), when
:meth:`TrustedKafkaConsumer.run` returns, on
:meth:`TrustedKafkaConsumer.stop` and on
:meth:`TrustedKafkaConsumer.commit` (immediately). A consumer that keeps up
with one record per fetch therefore commits about once per
``commit_interval``, one that works through a backlog about once per
fetched batch. A crash can redeliver the records settled since the last
commit (at most the rest of the fetched batch or ``commit_interval``
seconds' worth): they come again as redeliveries
(``delivery.redelivered``, judged at their first delivery's time, without
the signature checks) when the replay store survives the crash (a shared
store); a handler that must not repeat a side effect checks
``delivery.redelivered``. ``commit_interval=0`` commits after every
settled record, at the cost of a broker round trip each.

Rebalances: the revoke listener drops what was fetched but not handled,
the partitions paused for a retry not yet due, and their timers; it lets a
record being handled on a revoked partition finish, then commits what was
settled on the revoked partitions (both within :data:`REVOKE_GRACE`
seconds) before the partitions move, so nothing finished is left
uncommitted; a record that fails mid-way (a dead-letter or retry write that
fails) is rewound: its partition seeks back to it.

At-least-once throughout: when in doubt an offset stays uncommitted and the
record is delivered again (as a redelivery), never dropped.

No record stops or stalls the consumer:

* any other exception while decoding or verifying a record is a trusthop bug:
  it is logged with its traceback and the record is dead-lettered as
  ``malformed`` (the detail names the exception type), then committed;
* a dead letter too large for the dead-letter producer or the broker (it is
  always larger than its original) is replaced by a stub: no key, no value,
  none of the original headers, the verdict plus ``trusthop-original``
  (``<topic>/<partition>/<offset>``) and ``trusthop-original-bytes``; then
  the record is committed (a retry copy refused as too large dead-letters
  the record ``handler_failed`` at once);
* a record aiokafka cannot parse (a header name that is not UTF-8 makes
  aiokafka's ``getmany`` raise ``UnicodeDecodeError`` before trusthop sees
  the record, on every attempt) is found by fetching one partition, then one
  record, at a time (:meth:`TrustedKafkaConsumer._isolate_undecodable`); the
  records before it are delivered as usual, it is dead-lettered as a stub
  (``malformed``, ``trusthop-original``, no ``trusthop-original-bytes``:
  its size is unknown) and committed, and consuming goes on after it.

Only a dead-letter or retry write that fails otherwise (broker down,
timeout, missing authorisation) propagates, leaving the record uncommitted:
it comes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Literal, Self

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

from trusthop.admission import Admission, Admitted
from trusthop.destination import kafka_destination, retry_topic, signed_kafka_destination
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.kafka.records import (
    MAX_RETRY_ATTEMPT,
    coordinates,
    dead_letter_headers,
    decode_record,
    default_dead_letter_max_request_size,
    default_dead_letter_topic,
    parse_not_before,
    parse_original,
    parse_retry_attempt,
    parse_retry_group,
    record_size,
    retry_headers,
    signed_destination,
    stub_dead_letter_headers,
)
from trusthop.metrics import Counters, Metrics
from trusthop.pipeline import ChainVerifier, DeliveryViews, Rejection, TrustedEvent
from trusthop.replay import DEFAULT_REMEMBER, DeliveryInfo, DeliveryKind, OnReplay
from trusthop.stores.base import ReplayStore
from trusthop.stores.memory import MemoryReplayStore

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

DEFAULT_RETRY_DELAY = 1.0
"""Seconds a retry copy waits on the retry topic by default."""

DEFAULT_IN_PROCESS_RETRY_DELAY = 0.05
"""Seconds before the second in-process attempt by default (``retry_topics=False``)."""

REVOKE_GRACE = 10.0
"""Seconds the revoke listener waits for a record being handled on a revoked
partition to be settled, and for the commit of that partition's settled
offsets, before it lets the rebalance go on (past it, the commit fails and
the new owner redelivers what was not committed)."""

DEFAULT_COMMIT_INTERVAL = 0.1
"""Seconds between two coalesced commits while records flow, by default (see
:class:`TrustedKafkaConsumer`, ``commit_interval``)."""


class _Fresh(enum.Enum):
    """Sentinel: "a fresh :class:`MemoryReplayStore` per consumer" (``None`` disables)."""

    STORE = "a fresh MemoryReplayStore"


FRESH_STORE: Literal[_Fresh.STORE] = _Fresh.STORE
"""Default of ``replay_store``: each consumer gets its own in-process store."""

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
    topic, partition, offset): for a retry, the copy on the retry topic.
    ``attempt`` is the handler attempt this delivery is (1 for a record of a
    subscribed topic; the ``trusthop-retry`` number for a retry copy; with
    ``retry_topics=False``, it counts the in-process attempts of
    :meth:`TrustedKafkaConsumer.run`). ``kind`` is what admission found:
    ``first``, ``redelivery`` (the same record again: the handler may have
    run on it before) or ``retry``. Derive events with ``parent=delivery.context``.
    """

    trusted: TrustedEvent
    record: Any
    attempt: int = 1
    kind: DeliveryKind = DeliveryKind.FIRST

    @property
    def topic(self) -> str:
        return str(self.record.topic)

    @property
    def partition(self) -> int:
        return int(self.record.partition)

    @property
    def offset(self) -> int:
        return int(self.record.offset)

    @property
    def redelivered(self) -> bool:
        """True for a redelivery or a retry: the handler may have seen this event before."""
        return self.kind in (DeliveryKind.REDELIVERY, DeliveryKind.RETRY)

    @property
    def topic_base(self) -> str:
        """The topic the event was published to: :attr:`topic`, or ``t`` for a
        record of ``t.retry`` (the topic of the verified destination)."""
        destination = self.trusted.context.destination
        prefix = "kafka:"
        return destination[len(prefix) :] if destination.startswith(prefix) else self.topic


@dataclass(slots=True)
class ConsumerStats:
    """Counters of one :class:`TrustedKafkaConsumer` (since it was built).

    ``delivered`` counts verified records handed to user code (once per
    delivery, not per handler attempt); ``handled`` those whose loop body or
    handler finished (settled: their offsets go out with the next coalesced
    commit); ``dead_lettered`` counts by reason
    code (``Reason`` values; plain strings work as keys); ``retried`` counts
    handler re-attempts scheduled (retry copies acknowledged by the broker,
    or in-process attempts); ``commit_failures`` counts commit requests (one
    per partition when aiokafka refused a request naming a partition this
    member no longer owns) refused because a rebalance moved the partition
    (the new owner redelivers what was not committed);
    ``dead_letter_stubs`` counts the dead letters (already in
    ``dead_lettered``) written as a stub because the full one was too large;
    ``foreign_retries`` counts the retry copies of other consumer groups
    (read from a shared ``<topic>.retry``) committed without being admitted.
    """

    delivered: int = 0
    handled: int = 0
    retried: int = 0
    commit_failures: int = 0
    dead_letter_stubs: int = 0
    foreign_retries: int = 0
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
            "foreign_retries": self.foreign_retries,
            "dead_lettered": {str(k): v for k, v in sorted(self.dead_lettered.items())},
        }


Handler = Callable[[KafkaDelivery], Awaitable[object]]
"""An async callable run once per verified delivery by :meth:`TrustedKafkaConsumer.run`."""


class _DropOnRevoke:
    """Rebalance listener: forget what belongs to partitions taken away, and let
    a record being handled on one of them finish and commit first."""

    def __init__(self, owner: TrustedKafkaConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
        partitions = set(revoked)
        self._owner._forget(partitions)
        await self._owner._settle(partitions)

    async def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
        return None


# A virtual subclass: aiokafka checks isinstance(), no inheritance needed.
ConsumerRebalanceListener.register(_DropOnRevoke)


class TrustedKafkaConsumer:
    """Consume CloudEvents from Kafka, admitting every record before user code runs.

    Args:
        *topics: topics to subscribe to (group-managed assignment); with
            ``retry_topics``, their ``<topic>.retry`` topics too.
        verifier: the :class:`ChainVerifier` (its bundle and policy may be
            swapped live: a redelivery or retry is judged by the new one).
        group_id: the consumer group; also written as ``trusthop-consumer``
            in dead letters, and the replay scope ``kafka/<group_id>``.
        dead_letter_topic: a topic name, or a function of the subscribed
            topic (a retry copy's dead letter goes to that of its subscribed
            topic, not of the retry topic); default ``<topic>.dlq``.
        max_attempts: handler attempts per record in :meth:`run`, the first
            included, before it is dead-lettered with ``handler_failed``
            (at most :data:`~trusthop.kafka.records.MAX_RETRY_ATTEMPT` with
            retry topics).
        retry_delay: with retry topics, seconds a retry copy waits on the
            retry topic before it is handled (default
            :data:`DEFAULT_RETRY_DELAY`, 1 s; the same for every attempt);
            with ``retry_topics=False``, seconds before the second
            in-process attempt, doubling per attempt, capped at 5 s (default
            :data:`DEFAULT_IN_PROCESS_RETRY_DELAY`).
        retry_topics: retry a failed handler through ``<topic>.retry``
            (default): the record is committed once its retry copy is
            acknowledged, and nothing blocks while the copy waits. ``False``:
            retry in process, sleeping between attempts and holding the
            record (and its partition) until it is settled.
        replay_store: where the group's sightings live (see
            :mod:`trusthop.replay`); default a fresh
            :class:`~trusthop.stores.memory.MemoryReplayStore` per consumer
            (replicas of one group need a shared one, e.g.
            :class:`~trusthop.stores.redis.RedisReplayStore`); ``None``
            turns replay detection off (every delivery, retries included,
            is then verified in full at the current time). A store passed
            in stays the caller's to close.
        max_uses: distinct copies of one signed event the group accepts (1:
            single use; N: a broadcast consumed up to N times).
        on_replay: ``"reject"`` (dead-letter a replay with ``replayed``) or
            ``"skip"`` (commit it without the handler, counted under
            ``duplicates``).
        remember: seconds a sighting is kept after its first delivery at
            least, beyond the chain's own validity.
        metrics: an extra sink for the counters (e.g.
            :class:`~trusthop.metrics.PrometheusMetrics`); they are always
            kept in :attr:`counters` too.
        poll_timeout_ms: how long one ``getmany`` waits; bounds how late a
            concurrent :meth:`stop` is noticed.
        dead_letter_producer: an existing started ``AIOKafkaProducer`` for dead
            letters and retry copies (the caller's to start and stop); by
            default one is built on the consumer's connection settings with
            ``acks="all"``. Give it a ``max_request_size`` above the largest
            record the consumer can receive, or large rejects are
            dead-lettered as stubs.
        commit_interval: seconds between two coalesced commits while records
            flow, and at most until what was settled is committed once idle
            (default :data:`DEFAULT_COMMIT_INTERVAL`, 0.1 s; see the module
            docstring for every point at which a commit is sent). It bounds
            what a crash redelivers, not when a record is settled; ``0``
            commits after every settled record.
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
            ``group_id``, ``max_attempts < 1`` (or over
            :data:`~trusthop.kafka.records.MAX_RETRY_ATTEMPT` with retry
            topics), a negative or non-finite ``retry_delay``, a
            non-positive ``dead_letter_max_request_size``, a negative or
            non-finite ``commit_interval``, ``max_uses < 1``, a negative
            ``remember``, an unknown ``on_replay``.
        TypeError: a ``key_deserializer``/``value_deserializer`` (the
            verifier needs the raw bytes), or both ``dead_letter_producer``
            and ``dead_letter_max_request_size``.

    Offsets: a delivery of ``async for`` is settled when the loop asks for
    the next one (its body finished), and committed with the next coalesced
    commit (see the module docstring), or at once when :meth:`commit` is
    awaited. Leaving the loop (an exception, ``break``, ``return``) leaves the last
    delivery uncommitted, whether the loop is left for good (:meth:`stop`,
    ``async with`` exit) or not: it is delivered again (a redelivery), to
    this consumer when it loops again, or to the group after a restart.
    Python's ``async for`` cannot tell ``break`` from an exception (and an
    exception caught inside the ``async with`` block looks like a clean
    exit), so the shell errs on the side of redelivery, never of loss: call
    :meth:`commit` before ``break`` to avoid the duplicate. :meth:`run`
    settles each record as soon as its handler returned, its retry copy was
    acknowledged, or it was dead-lettered. Records settled before the open
    delivery are committed by :meth:`stop` (and on revocation) whether the
    loop was left or not. Iterate from one task at a time,
    and not while :meth:`run` is consuming. ``async for`` has no handler
    retries: it yields retry copies (written by :meth:`run`) like any record.
    """

    def __init__(
        self,
        *topics: str,
        verifier: ChainVerifier,
        group_id: str,
        dead_letter_topic: str | Callable[[str], str] = default_dead_letter_topic,
        max_attempts: int = 3,
        retry_delay: float | None = None,
        retry_topics: bool = True,
        replay_store: ReplayStore | Literal[_Fresh.STORE] | None = FRESH_STORE,
        max_uses: int = 1,
        on_replay: OnReplay | str = OnReplay.REJECT,
        remember: float = DEFAULT_REMEMBER,
        metrics: Metrics | None = None,
        poll_timeout_ms: int = 250,
        dead_letter_producer: Any = None,
        dead_letter_max_request_size: int | None = None,
        commit_interval: float = DEFAULT_COMMIT_INTERVAL,
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
        if retry_topics and max_attempts > MAX_RETRY_ATTEMPT:
            raise ValueError(f"max_attempts is at most {MAX_RETRY_ATTEMPT} with retry topics")
        if retry_delay is None:
            retry_delay = DEFAULT_RETRY_DELAY if retry_topics else DEFAULT_IN_PROCESS_RETRY_DELAY
        if not (math.isfinite(retry_delay) and retry_delay >= 0):
            raise ValueError("retry_delay must be a finite number of seconds, at least 0")
        if not (math.isfinite(commit_interval) and commit_interval >= 0):
            raise ValueError("commit_interval must be a finite number of seconds, at least 0")
        if dead_letter_max_request_size is not None:
            if dead_letter_producer is not None:
                raise TypeError(
                    "give either dead_letter_producer= or dead_letter_max_request_size=, not both"
                )
            if dead_letter_max_request_size <= 0:
                raise ValueError("dead_letter_max_request_size must be positive")
        store = MemoryReplayStore() if replay_store is FRESH_STORE else replay_store
        self.admission = Admission(
            verifier,
            scope=f"kafka/{group_id}",
            store=store,
            max_uses=max_uses,
            on_replay=on_replay,
            remember=remember,
            metrics=metrics,
        )
        consumer_kwargs["enable_auto_commit"] = False
        self.topics = tuple(topics)
        self.retry_topics = retry_topics
        retries = tuple(retry_topic(t) for t in topics) if retry_topics else ()
        # Every topic subscribed to: the topics, then their retry topics.
        self.subscribed = tuple(dict.fromkeys((*topics, *retries)))
        self._bases = frozenset(topics)
        self._retry_sources = frozenset(retries) - self._bases
        self._routes: dict[str, tuple[str, str]] = {}
        self.verifier = verifier
        self.group_id = group_id
        self.max_attempts = max_attempts
        self.retry_delay = float(retry_delay)
        self.poll_timeout_ms = poll_timeout_ms
        self.commit_interval = float(commit_interval)
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
        # Retry partitions paused until their next copy is due: (offset, due
        # epoch seconds); and the offset each resumed partition may deliver
        # at once (its wait is over, whatever its header says).
        self._holds: dict[TopicPartition, tuple[int, float]] = {}
        self._released: dict[TopicPartition, int] = {}
        # The partition of the record run() is settling (for the revoke listener).
        self._settling: TopicPartition | None = None
        self._settled = asyncio.Event()
        self._settled.set()
        # Partitions revoked so far (the revoke listener adds to it): a record
        # taken from the buffer before an await is dropped if its partition
        # was revoked meanwhile.
        self._revocations = 0
        # Coalesced commits: per partition, the offset after its last settled
        # record and the offset last sent in a commit; whether they differ
        # anywhere; when the last commit was sent (monotonic seconds).
        self._settled_up_to: dict[TopicPartition, int] = {}
        self._sent: dict[TopicPartition, int] = {}
        self._dirty = False
        self._last_commit = -math.inf
        # Whether the last fetch returned more than one record; whether a dead
        # letter or retry copy was written since the last commit.
        self._batch_of_many = False
        self._wrote = False
        self._commit_lock = asyncio.Lock()

    # ------------------------------------------------------------- lifecycle

    @property
    def client(self) -> Any:
        """The wrapped ``AIOKafkaConsumer`` (``committed()``, ``assignment()``...)."""
        return self._consumer

    @property
    def dead_letter_producer(self) -> Any:
        """The ``AIOKafkaProducer`` that writes dead letters and retry copies."""
        return self._dlq

    @property
    def counters(self) -> Counters:
        """The admission's counters (:mod:`trusthop.metrics` names: ``verified``,
        ``rejected`` by reason, ``redelivered``, ``retried``, ``replayed``,
        ``duplicates``, ``cache_hits``...), beside the transport's :attr:`stats`."""
        return self.admission.counters

    @property
    def replay_store(self) -> ReplayStore | None:
        """The group's replay store (``None``: replay detection is off)."""
        return self.admission.store

    def dead_letter_topic_for(self, topic: str) -> str:
        """The dead-letter topic of records consumed from ``topic``."""
        target = self._dead_letter_topic
        return target(topic) if callable(target) else target

    async def start(self) -> None:
        """Check the replay store, start the dead-letter producer, then subscribe
        and start the consumer.

        A store with an async ``check()`` method (such as
        :meth:`~trusthop.stores.redis.RedisReplayStore.check`, which refuses a
        Redis that may evict entries early) is checked first. The group join
        happens on the first fetch (it can take seconds).

        Raises:
            trusthop.stores.base.StoreError: the store's check failed; nothing
                was started.
            aiokafka.errors.KafkaError: from aiokafka.
        """
        if self._started:
            return
        check = getattr(self.admission.store, "check", None)
        if check is not None and inspect.iscoroutinefunction(check):
            await check()
        if self._owns_dlq:
            await self._dlq.start()
        try:
            self._consumer.subscribe(list(self.subscribed), listener=_DropOnRevoke(self))
            await self._consumer.start()
        except BaseException:
            if self._owns_dlq:
                await self._dlq.stop()
            raise
        self._started = True

    async def stop(self) -> None:
        """Stop consuming; the group rebalances the partitions to others.

        Waits for a record being settled (verified, handled by :meth:`run`,
        dead-lettered) to finish first, then commits every settled offset not
        committed yet (a failure of that commit is logged: those records are
        delivered again). Never commits the last ``async for`` delivery (see
        the class docstring). Called from inside a
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
        try:
            await self._flush()
        except KafkaError as exc:
            log.warning(
                "the last commit before stopping failed (%s); the records settled since "
                "the previous commit will be delivered again",
                exc,
            )
        finally:
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
        """Settle the previous delivery (its body finished), return the next one.

        Records that fail admission are dead-lettered (as in :meth:`run`,
        stubs included) and committed on the way and never returned; so are
        replays skipped under ``on_replay="skip"`` (committed only). Ends
        (``StopAsyncIteration``) once :meth:`stop` was called.

        Raises:
            RuntimeError: the consumer was never started, or :meth:`run` is
                consuming at the same time.
            aiokafka.errors.KafkaError: dead-lettering failed other than by
                size (the record is not committed and comes again), or a
                coalesced commit failed other than by a rebalance (what it
                carried is sent again with the next commit).
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
                    self._done_handled(pending.record)
                record = await self._next_record()
                if record is None:
                    raise StopAsyncIteration
                try:
                    admitted = await self._admit(record)
                    if admitted is None:
                        self._done(record)
                        continue
                except BaseException:
                    self._rewind(record)
                    raise
                delivery = admitted[0]
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
        """Commit now: the last ``async for`` delivery (its processing is done)
        and every record settled before it whose offset the coalesced commits
        have not sent yet; returns once the broker answered.

        A no-op when the consumer is stopping (:meth:`stop` commits what was
        settled, never the open delivery). A commit the group refuses because
        a rebalance moved the partition is counted in
        :attr:`ConsumerStats.commit_failures`, not raised.

        Raises:
            RuntimeError: another task holds the open delivery.
            aiokafka.errors.KafkaError: the commit failed otherwise; the
                offsets are sent again by the next commit.
        """
        if self._stopping:
            return
        self._check_owner()
        if self._pending is not None:
            async with self._lock:
                if self._pending is not None:
                    pending, self._pending = self._pending, None
                    self._done_handled(pending.record)
        await self._flush()

    # ------------------------------------------------------------- handler

    def handler(self, func: Handler) -> Handler:
        """Decorator registering the handler :meth:`run` uses by default."""
        self._handler = func
        return func

    async def run(self, handler: Handler | None = None, *, limit: int | None = None) -> int:
        """Consume until :meth:`stop` (or ``limit`` records), awaiting ``handler`` per delivery.

        A handler exception is retried up to ``max_attempts`` handler attempts
        in all (``delivery.attempt`` says which), then the record is
        dead-lettered with ``handler_failed`` and the attempts made. With
        retry topics (the default), attempt ``n`` failing is remembered in
        the replay store, a copy of the record for attempt ``n+1`` is written
        to ``<topic>.retry`` and acknowledged, and the record is committed;
        the copy comes back ``retry_delay`` seconds later (its partition
        paused meanwhile, nothing else waits). Without (``retry_topics=False``),
        the attempts run in process with a growing sleep between them.
        Each record is settled once handled, handed to the retry topic,
        skipped as a duplicate, or dead-lettered, and committed with the
        next coalesced commit (the last ones when ``run`` returns).
        Cancelling ``run`` (or a ``BaseException`` from the handler) leaves
        the current record uncommitted; it comes again, as a redelivery (the
        records settled before it are committed by :meth:`stop` or the next
        commit).

        Dead letters: the original key, value and headers (minus incoming
        ``trusthop-*`` headers) plus the verdict (with the destination its
        newest ring was signed for and the delivery attempts; the dead letter
        of a retry copy also names the first record in ``trusthop-original``
        and goes to the dead-letter topic of the subscribed topic). One that
        is too large to send (aiokafka's ``MessageSizeTooLargeError``, or the
        broker's MESSAGE_TOO_LARGE / RECORD_LIST_TOO_LARGE) is replaced by a
        stub without key, value or original headers, carrying the verdict,
        ``trusthop-original: <topic>/<partition>/<offset>`` and
        ``trusthop-original-bytes``; the record is then committed. A decoder
        or verifier exception other than ``TrustError`` (a bug) is logged
        and dead-lettered as ``malformed``.

        Returns:
            The number of records settled (handled, handed to the retry
            topic, skipped or dead-lettered).

        Raises:
            TypeError: no handler given or registered.
            RuntimeError: not started, already consuming, or another task
                is inside an ``async for`` loop over this consumer.
            aiokafka.errors.KafkaError: a dead letter or retry copy could not
                be written other than by size, stub included (the record is
                not committed and comes again), or a coalesced commit failed
                other than by a rebalance (what it carried is sent again with
                the next commit).
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
                    self._settling = TopicPartition(record.topic, record.partition)
                    self._settled.clear()
                    try:
                        admitted = await self._admit(record)
                        if admitted is None:
                            self._done(record)
                        else:
                            self.stats.delivered += 1
                            await self._handle(func, *admitted)
                    except BaseException:
                        self._rewind(record)
                        raise
                    finally:
                        self._settling = None
                        self._settled.set()
                settled += 1
            if not (self._stopping or self._stopped):
                await self._flush()
        finally:
            self._run_task = None
            if self._stop_from_handler:
                async with self._lock:
                    await self._shutdown()
        return settled

    async def _handle(self, func: Handler, delivery: KafkaDelivery, admitted: Admitted) -> None:
        if not self.retry_topics:
            await self._handle_in_process(func, delivery)
            return
        attempt = delivery.attempt
        try:
            await func(delivery)
        except Exception as exc:
            log.debug(
                "handler attempt %d/%d failed for %s:%d@%d",
                attempt,
                self.max_attempts,
                delivery.topic,
                delivery.partition,
                delivery.offset,
                exc_info=True,
            )
            if attempt < self.max_attempts:
                await self._retry(delivery, admitted, exc)
            else:
                await self._handler_failed(delivery, exc, attempt)
            return
        self._done_handled(delivery.record)

    async def _handle_in_process(self, func: Handler, delivery: KafkaDelivery) -> None:
        error: Exception | None = None
        first = delivery.attempt
        for attempt in range(first, self.max_attempts + 1):
            if attempt > first:
                self.stats.retried += 1
                self.admission.count("retried")
                delay = self.retry_delay * 2 ** (attempt - first - 1)
                await asyncio.sleep(min(delay, _MAX_RETRY_DELAY))
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
            self._done_handled(delivery.record)
            return
        assert error is not None
        await self._handler_failed(delivery, error, max(first, self.max_attempts))

    async def _retry(self, delivery: KafkaDelivery, admitted: Admitted, error: Exception) -> None:
        """Hand ``delivery`` to its retry topic for the next handler attempt, then commit.

        The store learns of the retry first (a copy it does not expect is a
        replay), then the copy is written and acknowledged, then the record
        is committed. A store failure dead-letters the record
        ``store_unavailable`` (no copy is written: it could not be told from
        a forged one); a copy too large for the producer or the broker
        dead-letters it ``handler_failed`` at once.

        Raises:
            aiokafka.errors.KafkaError: the copy (or that dead letter) was not
                acknowledged; nothing is committed, the record comes again.
        """
        record = delivery.record
        attempt = delivery.attempt
        following = attempt + 1
        try:
            await self.admission.schedule_retry(admitted, following)
        except TrustError as failure:
            log.warning(
                "cannot schedule retry %d of %s:%d@%d: %s",
                following,
                record.topic,
                record.partition,
                record.offset,
                failure,
            )
            rejection = Rejection(
                failure.reason,
                f"{failure.message}; the handler failed with {_describe(error)}",
                kafka_destination(record.topic),
                self.group_id,
                attempt,
                delivery.context.destination,
            )
            self.admission.count("rejected", reason=failure.reason.value)
            await self._dead_letter(record, rejection)
            self._done(record)
            return
        base = delivery.topic_base
        first = self._first_of(record)
        due_ms = math.ceil((time.time() + self.retry_delay) * 1000)
        headers = retry_headers(
            record.headers,
            attempt=following,
            not_before_ms=due_ms,
            first=first,
            attempts=attempt,
            group=self.group_id,
        )
        target = retry_topic(base)
        try:
            await self._send(target, record.key, record.value, headers)
        except KafkaError as exc:
            if not _is_size_error(exc):
                raise
            log.error(
                "retry copy of %s:%d@%d is too large for %s (%s); dead-lettering it now",
                record.topic,
                record.partition,
                record.offset,
                target,
                type(exc).__name__,
            )
            detail = f"{_describe(error)} (the retry copy was refused as too large)"
            await self._handler_failed(delivery, error, attempt, detail=detail)
            return
        self.stats.retried += 1
        log.info(
            "handler attempt %d/%d failed for %s:%d@%d; retry %d in %s in %.3g s",
            attempt,
            self.max_attempts,
            record.topic,
            record.partition,
            record.offset,
            following,
            target,
            self.retry_delay,
        )
        self._done(record)

    async def _handler_failed(
        self, delivery: KafkaDelivery, error: Exception, attempts: int, *, detail: str | None = None
    ) -> None:
        """Dead-letter ``delivery`` with ``handler_failed`` after ``attempts``, then commit."""
        log.warning(
            "handler failed %d times for %s:%d@%d: %r",
            attempts,
            delivery.topic,
            delivery.partition,
            delivery.offset,
            error,
        )
        rejection = Rejection(
            Reason.HANDLER_FAILED,
            detail if detail is not None else _describe(error),
            kafka_destination(delivery.topic),
            self.group_id,
            attempts,
            delivery.context.destination,
        )
        self.admission.count("rejected", reason=Reason.HANDLER_FAILED.value)
        await self._dead_letter(delivery.record, rejection)
        self._done(delivery.record)

    # ------------------------------------------------------------- internals

    async def _next_record(self) -> Any:
        """The next buffered record that is due, fetching with ``getmany``;
        ``None`` once stopping.

        A retry copy that is not due yet is not returned: its partition is
        paused and rewound to it (:meth:`_hold`), and resumed by a later call
        once it is due; records of other partitions are returned meanwhile.
        """
        while True:
            buffered = len(self._buffer)
            if not buffered and self._stopping:
                return None
            due_in: float | None = None
            if self._dirty:
                due_in = self._last_commit + self.commit_interval - time.monotonic()
                if (
                    due_in <= 0
                    or (buffered == 1 and self._batch_of_many)
                    or (not buffered and self._wrote)
                ):
                    # Every commit_interval, before the last record of a batch,
                    # and before fetching after a dead letter or a retry copy.
                    # The buffer may change while the commit is awaited (a
                    # revocation): look again.
                    await self._flush()
                    continue
            if not buffered:
                timeout_ms = self._release_due()
                if due_in is not None:  # come back when the settled records are due
                    timeout_ms = min(timeout_ms, math.ceil(due_in * 1000))
                try:
                    batches = await self._consumer.getmany(timeout_ms=timeout_ms)
                except ConsumerStoppedError:
                    return None
                except UnicodeDecodeError:
                    log.warning("aiokafka cannot decode a fetched record; looking for it")
                    try:
                        await self._isolate_undecodable()
                    except ConsumerStoppedError:
                        return None
                    self._batch_of_many = len(self._buffer) > 1
                    continue
                for records in batches.values():
                    self._buffer.extend(records)
                self._batch_of_many = len(self._buffer) > 1
                continue
            record = self._buffer.popleft()
            if not await self._hold(record):
                return record

    def _is_foreign(self, record: Any) -> bool:
        """Whether ``record`` is a retry copy written by another consumer group."""
        if record.topic not in self._retry_sources:
            return False
        group = parse_retry_group(record.headers)
        return group is not None and group != self.group_id

    async def _expected(self, record: Any) -> bool:
        """Whether ``record`` (a retry copy not due yet) is a retry this group
        scheduled and still waits for (:meth:`~trusthop.admission.Admission.peek`).

        Anything else (junk, a copy of another group, a forged copy of an
        event with no such retry pending, a store that fails) is not waited
        for: it is admitted at once and settled by its verdict, so a flood
        of forged "not before" headers cannot hold the partition. Never raises.
        """
        retry = parse_retry_attempt(record.headers)
        if retry == 0 or self._is_foreign(record):
            return False
        delivery = DeliveryInfo(
            id=f"{record.topic}/{record.partition}@{record.offset}", retry=retry
        )
        try:
            wire = decode_record(record.headers, record.value)
            kind = await self.admission.peek(wire, delivery)
        except Exception:  # malformed, store down: admission gives the verdict
            return False
        return kind is None or kind is DeliveryKind.RETRY

    async def _hold(self, record: Any) -> bool:
        """Whether ``record`` is a retry copy not due yet; if so, pause its
        partition at it (rewind it there, drop what was buffered after it).

        The wait is the copy's ``trusthop-not-before`` minus now, capped at
        ``retry_delay`` (a forged far-future header cannot hold a partition
        longer); only a retry the replay store expects is waited for
        (:meth:`_expected`); once a partition's wait is over, the record it
        was held at is delivered whatever its header says.
        """
        if record.topic not in self._retry_sources or isinstance(record, _Undecodable):
            return False
        tp = TopicPartition(record.topic, record.partition)
        if self._released.get(tp) == record.offset:
            del self._released[tp]
            return False
        due = parse_not_before(record.headers)
        if due is None:
            return False
        wait = min(due - time.time(), self.retry_delay)
        if wait <= 0:
            return False
        revocations = self._revocations
        expected = await self._expected(record)
        if self._revocations != revocations:
            # A rebalance ran while the store was asked: the partition may be
            # another member's now, or ours again from its committed offset
            # (the record is fetched again). Never deliver it from here.
            with contextlib.suppress(IllegalStateError):
                if tp in self._consumer.assignment():
                    self._drop_buffered({tp})
                    self._consumer.seek(tp, record.offset)
            return True
        if not expected:
            return False
        now = time.time()
        wait = min(due - now, self.retry_delay)
        if wait <= 0:
            return False
        self._drop_buffered({tp})
        try:
            self._consumer.seek(tp, record.offset)
            self._consumer.pause(tp)
        except IllegalStateError:  # revoked meanwhile: its new owner fetches it
            return True
        self._holds[tp] = (record.offset, now + wait)
        log.debug("retry %s:%d@%d is due in %.3f s", *tp, record.offset, wait)
        return True

    def _release_due(self) -> int:
        """Resume the held partitions whose record is due; return how long the
        next ``getmany`` may wait (milliseconds): ``poll_timeout_ms``, or less
        when a held partition falls due sooner."""
        timeout_ms = self.poll_timeout_ms
        if not self._holds:
            return timeout_ms
        now = time.time()
        for tp, (offset, due) in list(self._holds.items()):
            if due <= now:
                del self._holds[tp]
                self._released[tp] = offset
                with contextlib.suppress(IllegalStateError):
                    self._consumer.resume(tp)
            else:
                timeout_ms = min(timeout_ms, math.ceil((due - now) * 1000))
        return max(timeout_ms, 0)

    async def _isolate_undecodable(self) -> None:
        """After ``getmany`` raised ``UnicodeDecodeError``: find the record, buffer a stand-in.

        aiokafka decodes header names as strict UTF-8 while it iterates a
        fetched batch, so a name that is not UTF-8 makes every ``getmany``
        that reaches the record raise, before the record can be returned.
        Called with an empty buffer, i.e. every record returned so far is
        settled:

        1. Every assigned partition is moved back to the offset after its last
           settled record, or when none was settled since it was assigned, to
           its committed offset (to its beginning when nothing is
           committed): the failed ``getmany``
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
            committed = self._settled_up_to.get(tp)
            if committed is None:
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

    def _route(self, topic: str) -> tuple[str, str]:
        """Where records of ``topic`` are consumed from (``kafka:<topic>``)
        and the destination they must have been signed for
        (:func:`signed_kafka_destination`); computed once per topic."""
        route = self._routes.get(topic)
        if route is None:
            route = (kafka_destination(topic), signed_kafka_destination(topic, self._bases))
            self._routes[topic] = route
        return route

    def _base_topic(self, topic: str) -> str:
        """The subscribed topic a record of ``topic`` belongs to: ``t`` for
        ``t.retry`` (and ``t.dlq``) when ``t`` is subscribed, else ``topic``
        itself (the topic of :func:`signed_kafka_destination`)."""
        return self._route(topic)[1][len("kafka:") :]

    def _first_of(self, record: Any) -> str:
        """``<topic>/<partition>/<offset>`` of the first record ``record`` was
        copied from: itself, or the ``trusthop-original`` of a retry copy."""
        if record.topic in self._retry_sources:
            first = parse_original(record.headers)
            if first is not None:
                return first
        return coordinates(record.topic, record.partition, record.offset)

    async def _admit(self, record: Any) -> tuple[KafkaDelivery, Admitted] | None:
        """Admit ``record``; dead-letter it (not commit) and return ``None`` if
        rejected, or return ``None`` for a replay skipped under
        ``on_replay="skip"`` (commit it without the handler).

        A :class:`TrustError` is the record's verdict. Any other exception from
        decoding or admitting is a trusthop bug: logged with its traceback and
        dead-lettered as ``malformed`` all the same, so that no record can
        stop the consumer, nor stall it by coming back after every restart.
        Every rejection is counted under ``rejected`` (admission counts its
        own).

        Raises:
            aiokafka.errors.KafkaError: the dead letter could not be written
                (see :meth:`_dead_letter`).
        """
        source, destination = self._route(record.topic)
        if isinstance(record, _Undecodable):
            rejection = Rejection(Reason.MALFORMED, UNDECODABLE_DETAIL, source, self.group_id)
            await self._send_stub(record, rejection, None)
            self.stats.dead_lettered[rejection.reason] += 1
            self.admission.count("rejected", reason=rejection.reason.value)
            return None
        if self._is_foreign(record):
            # <topic>.retry is shared by every group consuming <topic>: this
            # copy is another group's retry, neither ours to handle nor a replay.
            self.stats.foreign_retries += 1
            log.debug(
                "skipped %s:%d@%d: a retry copy of another consumer group",
                record.topic,
                record.partition,
                record.offset,
            )
            return None
        retry = parse_retry_attempt(record.headers) if record.topic in self._retry_sources else 0
        attempt = max(retry, 1)
        delivery = DeliveryInfo(
            id=f"{record.topic}/{record.partition}@{record.offset}", retry=retry
        )
        wire: WireEvent | None = None
        try:
            wire = decode_record(record.headers, record.value)
            admitted = await self.admission.admit(wire, destination, delivery)
        except TrustError as error:
            if wire is None:  # refused before admission saw it
                self.admission.count("rejected", reason=error.reason.value)
            rejection = Rejection.of(
                error,
                source=source,
                consumer=self.group_id,
                attempts=attempt,
                destination=signed_destination(wire, self.verifier.limits),
            )
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
            rejection = Rejection(
                Reason.MALFORMED,
                detail,
                source,
                self.group_id,
                attempt,
                signed_destination(wire, self.verifier.limits),
            )
            self.admission.count("rejected", reason=rejection.reason.value)
            await self._dead_letter(record, rejection)
            return None
        if admitted is None:
            log.info(
                "skipped %s:%d@%d: a copy of an event this group accepted before",
                record.topic,
                record.partition,
                record.offset,
            )
            return None
        return KafkaDelivery(admitted.trusted, record, attempt, admitted.kind), admitted

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
        topic = self.dead_letter_topic_for(self._base_topic(record.topic))
        first = self._first_of(record) if record.topic in self._retry_sources else None
        headers = dead_letter_headers(record.headers, rejection, first=first)
        try:
            await self._send(topic, record.key, record.value, headers)
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
        topic = self.dead_letter_topic_for(self._base_topic(record.topic))
        await self._send(topic, None, None, stub)
        self.stats.dead_letter_stubs += 1

    async def _send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | None]],
    ) -> None:
        """Send one record (a dead letter or a retry copy) to ``topic`` through
        the dead-letter producer and wait for the ack.

        Raises:
            aiokafka.errors.KafkaError: not acknowledged;
                ``MessageSizeTooLargeError`` when over the producer's
                ``max_request_size`` (checked here for batches, which
                aiokafka does not check) or refused by the broker as too large.
        """
        if key is not None or value is not None:
            await self._dlq.send_and_wait(topic, value=value, key=key, headers=headers)
            self._wrote = True
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
        self._wrote = True

    def _done_handled(self, record: Any) -> None:
        self._done(record)
        self.stats.handled += 1

    def _done(self, record: Any) -> None:
        """``record`` is settled (handled, its retry copy acknowledged, skipped
        or dead-lettered): the next coalesced commit (:meth:`_flush`) covers it.

        Records of a partition are settled in offset order, one at a time, so
        the offset after the last settled one is the highest contiguous one.
        """
        self._settled_up_to[TopicPartition(record.topic, record.partition)] = record.offset + 1
        self._dirty = True

    async def _flush(self, partitions: set[Any] | None = None) -> None:
        """Commit the settled offsets not sent yet (of ``partitions`` only, when
        given), in one request, and wait for the broker's answer.

        Commits are serialised, so they reach the broker in order. A commit
        refused because a rebalance moved a partition (``CommitFailedError``,
        ``IllegalStateError``) is counted and logged, not raised: the new owner
        delivers again what was not committed (see :meth:`_send_commit`).

        Raises:
            aiokafka.errors.KafkaError: any other failure; the offsets are
                not taken as sent, the next flush sends them again.
        """
        async with self._commit_lock:
            offsets = {
                tp: offset
                for tp, offset in self._settled_up_to.items()
                if self._sent.get(tp) != offset and (partitions is None or tp in partitions)
            }
            if not offsets:
                self._dirty = partitions is not None and self._has_unsent()
                return
            before = {tp: self._sent.get(tp) for tp in offsets}
            self._sent.update(offsets)
            self._dirty = self._has_unsent()
            self._wrote = False
            self._last_commit = time.monotonic()
            try:
                await self._send_commit(offsets)
            except BaseException:
                for tp, offset in before.items():
                    if offset is None:
                        self._sent.pop(tp, None)
                    else:
                        self._sent[tp] = offset
                self._dirty = True
                raise

    def _has_unsent(self) -> bool:
        sent = self._sent
        return any(sent.get(tp) != offset for tp, offset in self._settled_up_to.items())

    async def _send_commit(self, offsets: dict[TopicPartition, int]) -> None:
        """One commit request; a partition this member no longer owns only means redelivery.

        aiokafka refuses the whole request (``IllegalStateError``) when one of
        its partitions is not assigned any more: the partitions are then
        committed one by one, so the others still are.
        """
        try:
            await self._consumer.commit(offsets)
        except IllegalStateError as exc:
            if len(offsets) > 1:
                for tp, offset in offsets.items():
                    await self._send_commit({tp: offset})
                return
            self._refused(offsets, exc)
        except CommitFailedError as exc:
            self._refused(offsets, exc)

    def _refused(self, offsets: dict[TopicPartition, int], exc: BaseException) -> None:
        # The partition moved to another member: it resumes from the last
        # committed offset and delivers these records again (not lost).
        self.stats.commit_failures += 1
        log.warning(
            "commit of %s refused (%s); the records after the last committed offset "
            "will be redelivered",
            ", ".join(f"{tp.topic}:{tp.partition}@{offset}" for tp, offset in offsets.items()),
            exc,
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

    def _forget(self, partitions: set[Any]) -> None:
        """Partitions were revoked: drop their buffered records, their holds
        and release marks. aiokafka itself forgets their pause state and
        positions: a partition assigned again starts from its committed offset
        (a held retry copy is fetched and held again)."""
        self._drop_buffered(partitions)
        self._revocations += 1
        for tp in partitions:
            self._holds.pop(tp, None)
            self._released.pop(tp, None)

    async def _settle(self, partitions: set[Any]) -> None:
        """Before revoked partitions move: wait for the record :meth:`run` is
        settling, if it is on one of them, then commit their settled offsets
        (both within :data:`REVOKE_GRACE` seconds), then forget those offsets.
        Past the grace, or if the commit fails, the new owner delivers again
        what was not committed. Never raises."""
        try:
            async with asyncio.timeout(REVOKE_GRACE):
                if self._settling is not None and self._settling in partitions:
                    await self._settled.wait()
                if not self._stopped:
                    await self._flush(partitions)
        except TimeoutError:
            log.warning(
                "%s was revoked while a record was still being handled or committed; the "
                "new owner will deliver again what was not committed",
                ", ".join(sorted(f"{tp.topic}:{tp.partition}" for tp in partitions)),
            )
        except KafkaError as exc:
            log.warning(
                "commit on revocation failed (%s); the new owner will deliver again what "
                "was not committed",
                exc,
            )
        finally:
            for tp in partitions:
                self._settled_up_to.pop(tp, None)
                self._sent.pop(tp, None)
            self._dirty = self._has_unsent()
