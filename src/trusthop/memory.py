"""An in-memory transport with the semantics of the broker wrappers.

It exists for the demo and for tests that need delivery semantics without a
broker. Messages are stored in their Kafka binary-mode (or structured-mode)
encoding and decoded on delivery, so the bindings run exactly as they do on a
broker. Like the Kafka and AMQP wrappers:

* each destination is an append-only log; each consumer group has its own
  committed offset per log, advanced only after the message was handled,
  dead-lettered, skipped as a duplicate, or handed to the retry log;
* every message goes through :class:`~trusthop.admission.Admission` in the
  scope ``memory/<group_id>`` before any handler runs, with a replay store
  (a fresh :class:`~trusthop.stores.MemoryReplayStore` per consumer unless
  one is given; ``replay_store=None`` turns replay detection off);
* a delivery's id is ``<log>@<offset>`` (the log it was read from), so a
  group re-reading an offset it never committed (its consumer crashed, see
  :class:`ConsumerCrash`) gets a ``redelivery``: accepted, judged at its
  first delivery's time, handler told ``redelivered``. A copy of a message
  appended again (a re-published copy) has a new id: ``replayed``, or
  skipped with ``on_replay="skip"``;
* a message that fails decoding or admission is dead-lettered at once to
  ``<destination>.dlq`` with its original headers minus any ``trusthop-*``
  ones (a sender cannot forge a verdict) plus those of :class:`Rejection`;
* a handler that raises an :class:`Exception` is retried through the retry
  log ``<destination>.retry``: the consumer remembers the attempt
  (:meth:`~trusthop.admission.Admission.schedule_retry`), commits the
  message and appends a copy with ``trusthop-consumer`` (the group: the
  retry log is shared, and a group handles only the copies naming it),
  ``trusthop-retry`` (the
  attempt number the copy is for), ``trusthop-attempts`` (attempts made) and
  ``trusthop-not-before`` (epoch milliseconds, ``retry_delay`` seconds
  later, the same for every attempt). The copy is consumed once due, as a
  ``retry`` (judged at the first delivery's time and against the original
  destination, so waiting never expires it). After ``max_attempts``
  attempts the message is dead-lettered with ``handler_failed`` and the
  attempts made. ``trusthop-retry`` is honoured only on the retry log.

Handlers get a :class:`MemoryDelivery`: the
:class:`~trusthop.pipeline.TrustedEvent` plus its ``kind``, ``attempt`` and
``redelivered``. :meth:`MemoryConsumer.drain` returns how many messages were
settled; a :class:`ConsumerCrash` raised by a handler escapes it, leaving the
message uncommitted.

With a shared store (``replay_store=``), the group's consumers see each
other's sightings, as replicas sharing a Redis store do; a consumer
restarted with a fresh store verifies a redelivery in full as a first
delivery (at-least-once: the handler may run again).

Destinations are the same strings the real transports use (``kafka:orders``,
``amqp:shipping/order.reserved``), so chains produced in memory name the
destinations they would have on real brokers.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from cloudevents.core.v1.event import CloudEvent

from trusthop.admission import Admission, Admitted
from trusthop.bindings.kafka import KafkaHeaders, decode_kafka, encode_kafka
from trusthop.chain import HopRing, OriginRing, decode_chain
from trusthop.destination import dead_letter_topic, retry_topic
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.metrics import Counters, Metrics
from trusthop.pipeline import (
    H_ATTEMPTS,
    H_CONSUMER,
    ChainSigner,
    ChainVerifier,
    Rejection,
    TrustedEvent,
)
from trusthop.replay import DEFAULT_REMEMBER, DeliveryInfo, DeliveryKind, OnReplay
from trusthop.stores import MemoryReplayStore, ReplayStore
from trusthop.verify import VerifiedContext

H_RETRY = "trusthop-retry"
"""Header of a retry copy: the handler attempt number the copy is for (2 or more)."""
H_NOT_BEFORE = "trusthop-not-before"
"""Header of a retry copy: when it is due, in epoch milliseconds."""

MAX_ATTEMPTS = 1000
"""The largest ``max_attempts`` (a ``trusthop-retry`` number has at most four digits)."""

_HEADER_PREFIX = "trusthop-"


class ConsumerCrash(BaseException):
    """Raise from a handler to simulate the consumer process dying mid-message.

    Not an :class:`Exception`, so it is no handler failure: nothing is
    retried, dead-lettered or committed; :meth:`MemoryConsumer.drain`
    propagates it. The message stays uncommitted and the group's next
    consumer (or this one, draining again) receives it again as a
    ``redelivery``.
    """


@dataclass(frozen=True, slots=True)
class MemoryMessage:
    """One stored message: its headers and value, as a Kafka record would hold them."""

    destination: str
    offset: int
    headers: tuple[tuple[str, bytes | None], ...]
    value: bytes | None

    @property
    def id(self) -> str:
        """``<destination>@<offset>``: the same on every redelivery, new for every copy."""
        return f"{self.destination}@{self.offset}"

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` decoded as UTF-8, if present."""
        for key, value in self.headers:
            if key == name and value is not None:
                return value.decode("utf-8", "replace")
        return None


@dataclass(frozen=True, slots=True)
class MemoryDelivery(TrustedEvent):
    """A verified message handed to a :class:`MemoryConsumer` handler.

    It is the :class:`~trusthop.pipeline.TrustedEvent` (so handlers written
    for one keep working) plus how it arrived: ``kind`` (``first``,
    ``redelivery`` or ``retry``), ``attempt`` (the handler attempt, 1 for the
    first) and the stored ``message`` it was read from.
    """

    kind: DeliveryKind = DeliveryKind.FIRST
    attempt: int = 1
    message: MemoryMessage | None = None

    @property
    def redelivered(self) -> bool:
        """True for a redelivery or a retry: the handler may have run before
        for this message (make its effects idempotent)."""
        return self.kind in (DeliveryKind.REDELIVERY, DeliveryKind.RETRY)

    @property
    def trusted(self) -> TrustedEvent:
        """This delivery as a plain verified event (as the broker deliveries have)."""
        return TrustedEvent(self.event, self.context, self.wire, self.decision, self.policy)


@dataclass
class MemoryBroker:
    """Append-only logs per destination and committed offsets per group."""

    logs: dict[str, list[MemoryMessage]] = field(default_factory=dict)
    committed: dict[tuple[str, str], int] = field(default_factory=dict)

    def append(
        self, destination: str, headers: Iterable[tuple[str, bytes | None]], value: bytes | None
    ) -> MemoryMessage:
        """Store raw headers and value (anything: attacks use this directly)."""
        log = self.logs.setdefault(destination, [])
        message = MemoryMessage(destination, len(log), tuple(headers), value)
        log.append(message)
        return message

    def publish_wire(
        self, destination: str, wire: WireEvent, *, structured: bool = False
    ) -> MemoryMessage:
        """Store an already sealed (or deliberately tampered) event."""
        headers, value = encode_kafka(wire, structured=structured)
        return self.append(destination, headers, value)

    def messages(self, destination: str) -> list[MemoryMessage]:
        """A snapshot of the log of ``destination`` (empty when none)."""
        return list(self.logs.get(destination, ()))


class MemoryProducer:
    """Seals and publishes events into a :class:`MemoryBroker`."""

    def __init__(
        self, broker: MemoryBroker, *, signer: ChainSigner, structured: bool = False
    ) -> None:
        self.broker = broker
        self.signer = signer
        self.structured = structured

    async def send_and_wait(
        self,
        destination: str,
        event: CloudEvent,
        *,
        origin: OriginRing | None = None,
        parent: VerifiedContext | None = None,
        scope: Iterable[str] | None = None,
    ) -> MemoryMessage:
        """Seal ``event`` for ``destination`` and append it.

        Raises:
            TrustError: what :meth:`ChainSigner.seal` raises (same codes a
                consumer would give).
        """
        wire = self.signer.seal(
            event, destination=destination, origin=origin, parent=parent, scope=scope
        )
        return self.broker.publish_wire(destination, wire, structured=self.structured)


Handler = Callable[[MemoryDelivery], Awaitable[object]]
"""An async callable run once per accepted delivery (a handler taking a
:class:`~trusthop.pipeline.TrustedEvent` fits too)."""

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]


class _Fresh(Enum):
    STORE = "a fresh MemoryReplayStore"

    def __repr__(self) -> str:
        return self.value


FRESH_STORE = _Fresh.STORE
"""Default of ``replay_store=``: each consumer gets its own new store."""


def _without_trusthop_headers(
    headers: Iterable[tuple[str, bytes | None]],
) -> list[tuple[str, bytes | None]]:
    return [(k, v) for k, v in headers if not k.lower().startswith(_HEADER_PREFIX)]


_RETRY_VALUE = re.compile(r"[1-9][0-9]{0,3}")  # up to MAX_ATTEMPTS
_EPOCH_MS_VALUE = re.compile(r"[0-9]{1,16}")


def _own_header(message: MemoryMessage, name: str, pattern: re.Pattern[str]) -> int | None:
    """The integer value of the one header named exactly ``name``, in exactly
    the form the consumer writes; ``None`` when absent, repeated or not so.
    (Anyone can write the retry log: the replay store, not the header,
    decides whether a retry is genuine.)"""
    found = [value for key, value in message.headers if key == name]
    if len(found) != 1 or found[0] is None:
        return None
    text = found[0].decode("ascii", "replace")
    return int(text) if pattern.fullmatch(text) else None


class MemoryConsumer:
    """Consumes one destination (and its retry log) for one consumer group.

    Args:
        broker: the in-memory broker.
        destination: the destination consumed (``kafka:orders``); its retry
            log is ``<destination>.retry``, its dead letters go to
            ``<destination>.dlq``.
        verifier: the chain verifier (share one between consumers of a
            process: its verified-prefix cache then checks each chain once).
        group_id: the consumer group: committed offsets and the replay scope
            ``memory/<group_id>`` are per group.
        max_attempts: handler attempts per message before it is dead-lettered
            with ``handler_failed``.
        replay_store: where sightings live; default a fresh
            :class:`~trusthop.stores.MemoryReplayStore`; ``None`` turns
            replay detection off. Give consumers of one group the same store
            to have them recognise each other's redeliveries.
        max_uses, on_replay, remember, metrics: as for
            :class:`~trusthop.admission.Admission`.
        retry_delay: seconds a retry copy waits in the retry log before it is
            due, the same for every attempt (as on the brokers; only the
            default is shorter than theirs).
        clock: epoch seconds for ``trusthop-not-before`` (default
            ``time.time``).
        sleep: awaited while the only messages left are retries not yet due
            (default ``asyncio.sleep``); tests inject one that moves a fake
            ``clock``.

    Raises:
        ValueError: ``max_attempts`` outside 1 to :data:`MAX_ATTEMPTS`, a
            negative or infinite ``retry_delay``, and what
            :class:`~trusthop.admission.Admission` refuses.

    ``stats`` counts ``delivered`` (handled), ``retried``, ``duplicates``,
    ``redelivered`` and ``dead_lettered:<reason>``; ``counters`` are the
    admission's (:class:`~trusthop.metrics.Counters`).
    """

    def __init__(
        self,
        broker: MemoryBroker,
        destination: str,
        *,
        verifier: ChainVerifier,
        group_id: str,
        max_attempts: int = 3,
        replay_store: ReplayStore | _Fresh | None = FRESH_STORE,
        max_uses: int = 1,
        on_replay: OnReplay | str = OnReplay.REJECT,
        remember: float = DEFAULT_REMEMBER,
        metrics: Metrics | None = None,
        retry_delay: float = 0.05,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if not 1 <= max_attempts <= MAX_ATTEMPTS:
            raise ValueError(f"max_attempts must be from 1 to {MAX_ATTEMPTS}")
        if not (math.isfinite(retry_delay) and retry_delay >= 0):
            raise ValueError("retry_delay must be a finite number of seconds, at least 0")
        self.broker = broker
        self.destination = destination
        self.verifier = verifier
        self.group_id = group_id
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self._clock = clock
        self._sleep = sleep
        store = MemoryReplayStore() if replay_store is FRESH_STORE else replay_store
        assert not isinstance(store, _Fresh)
        self.admission = Admission(
            verifier,
            scope=f"memory/{group_id}",
            store=store,
            max_uses=max_uses,
            on_replay=on_replay,
            remember=remember,
            metrics=metrics,
        )
        self.stats: Counter[str] = Counter()

    @property
    def counters(self) -> Counters:
        """The admission counters of this consumer (verified, rejected, ...)."""
        return self.admission.counters

    @property
    def dead_letter_destination(self) -> str:
        """``<destination>.dlq``."""
        return dead_letter_topic(self.destination)

    @property
    def retry_destination(self) -> str:
        """``<destination>.retry``: the retry log this consumer writes and reads."""
        return retry_topic(self.destination)

    # ---------------------------------------------------------------- consuming

    async def drain(self, handler: Handler) -> int:
        """Process every message not yet committed for this group, the retry
        log included, waiting for retries to come due; return how many
        messages were settled (handled, dead-lettered or skipped; a message
        handed to the retry log settles with its last copy).

        Due retries go first, then the destination in order. Each offset is
        committed only after its message was settled or handed to the retry
        log, so an exception escaping here (:class:`ConsumerCrash`, a
        cancelled task) leaves the message to be delivered again.
        """
        settled = 0
        while True:
            retry = self._head(self.retry_destination)
            if retry is not None and retry.header(H_CONSUMER) != self.group_id:
                self._commit(retry)  # another group's retry: not ours to handle
                continue
            due_in = self._due_in(retry) if retry is not None else 0.0
            if retry is not None and due_in <= 0:
                message = retry
            else:
                main = self._head(self.destination)
                if main is not None:
                    message = main
                elif retry is not None:
                    await self._sleep(due_in)
                    continue
                else:
                    return settled
            if await self._process(message, handler):
                settled += 1
            self._commit(message)

    def _commit(self, message: MemoryMessage) -> None:
        self.broker.committed[(self.group_id, message.destination)] = message.offset + 1

    def _head(self, log_name: str) -> MemoryMessage | None:
        position = self.broker.committed.get((self.group_id, log_name), 0)
        log = self.broker.logs.get(log_name, [])
        return log[position] if position < len(log) else None

    def _due_in(self, message: MemoryMessage) -> float:
        not_before = _own_header(message, H_NOT_BEFORE, _EPOCH_MS_VALUE)
        return 0.0 if not_before is None else not_before / 1000 - self._clock()

    async def _process(self, message: MemoryMessage, handler: Handler) -> bool:
        """Admit and handle one message; whether it is settled (``False``:
        handed to the retry log)."""
        from_retry_log = message.destination == self.retry_destination
        retry = (_own_header(message, H_RETRY, _RETRY_VALUE) or 0) if from_retry_log else 0
        wire: WireEvent | None = None
        try:
            wire = decode_kafka(message.headers, message.value)
            admitted = await self.admission.admit(
                wire, self.destination, DeliveryInfo(id=message.id, retry=retry)
            )
        except TrustError as error:
            self._dead_letter(
                message,
                Rejection.of(
                    error,
                    source=message.destination,
                    consumer=self.group_id,
                    destination=self._signed_destination(wire),
                ),
            )
            return True
        if admitted is None:
            self.stats["duplicates"] += 1
            return True
        if admitted.kind is DeliveryKind.REDELIVERY:
            self.stats["redelivered"] += 1
        attempt = max(retry, 1)
        trusted = admitted.trusted
        delivery = MemoryDelivery(
            trusted.event,
            trusted.context,
            trusted.wire,
            trusted.decision,
            trusted.policy,
            kind=admitted.kind,
            attempt=attempt,
            message=message,
        )
        try:
            await handler(delivery)
        except Exception as exc:  # a handler failure of any kind is retried
            return await self._failed(message, admitted, attempt, exc)
        self.stats["delivered"] += 1
        return True

    async def _failed(
        self, message: MemoryMessage, admitted: Admitted, attempt: int, exc: Exception
    ) -> bool:
        """Hand a failed message to the retry log, or dead-letter it after
        its last attempt; whether it is settled."""
        destination = admitted.trusted.context.destination
        detail = f"{type(exc).__name__}: {exc}"
        if attempt >= self.max_attempts:
            failure = TrustError(Reason.HANDLER_FAILED, detail)
            self.admission.count("rejected", reason=failure.reason.value)
            self._dead_letter(
                message,
                Rejection.of(
                    failure,
                    source=message.destination,
                    consumer=self.group_id,
                    attempts=attempt,
                    destination=destination,
                ),
            )
            return True
        following = attempt + 1
        try:
            await self.admission.schedule_retry(admitted, following)
        except TrustError as error:
            # Without the remembered attempt the copy would be a replay: keep
            # the message in the dead letters instead of losing it.
            self.admission.count("rejected", reason=error.reason.value)
            self._dead_letter(
                message,
                Rejection(
                    error.reason,
                    f"{error.message} (while scheduling a retry after {detail})",
                    message.destination,
                    self.group_id,
                    attempt,
                    destination,
                ),
            )
            return True
        not_before = self._clock() + self.retry_delay
        headers = _without_trusthop_headers(message.headers)
        headers += [
            (H_CONSUMER, self.group_id.encode()),
            (H_RETRY, str(following).encode()),
            (H_ATTEMPTS, str(attempt).encode()),
            (H_NOT_BEFORE, str(int(not_before * 1000)).encode()),
        ]
        self.broker.append(self.retry_destination, headers, message.value)
        self.stats["retried"] += 1
        return False

    def _signed_destination(self, wire: WireEvent | None) -> str | None:
        """The destination the newest ring names, when the chain decodes."""
        if wire is None or wire.chain is None:
            return None
        limits = self.verifier.limits
        try:
            chain = decode_chain(wire.chain, max_bytes=limits.max_bytes, max_rings=limits.max_rings)
        except TrustError:
            return None
        newest = chain.newest
        return newest.destination if isinstance(newest, HopRing) else None

    def _dead_letter(self, message: MemoryMessage, rejection: Rejection) -> None:
        headers: KafkaHeaders = [
            (k, v) for k, v in _without_trusthop_headers(message.headers) if v is not None
        ]
        headers += [(k, v.encode("utf-8")) for k, v in rejection.headers().items()]
        self.broker.append(self.dead_letter_destination, headers, message.value)
        self.stats[f"dead_lettered:{rejection.reason.value}"] += 1
