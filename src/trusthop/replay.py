"""Replay and redelivery rules: what a consumer remembers about a signed ring (no I/O).

Async brokers deliver at least once. A consumer group (Kafka) or a queue
(RabbitMQ) therefore sees the same message again, and an attacker with write
access to the broker can re-publish a copy of a valid message. Both carry
the same newest ring; only the *delivery* tells them apart. For every ring
it accepted, a consumer scope keeps one :class:`Sighting` in a replay store
(see :mod:`trusthop.stores`), keyed by :func:`sighting_key`, and
:func:`classify` decides what a new delivery of that ring is:

* ``first``: never seen in this scope (or, with ``max_uses > 1``, another of
  its allowed uses). Verified in full, judged at the current time.
* ``redelivery``: the broker says it is the same message: Kafka gives the
  same topic-partition-offset (:attr:`DeliveryInfo.id`), RabbitMQ sets its
  ``redelivered`` flag. A publisher cannot set that flag, but anyone allowed
  to consume from the queue can (consume a copy, ``nack`` it), so the flag
  is believed only while an accepted delivery of the ring is still *open*:
  accepted and not yet settled (:func:`settled`, recorded by the consumer
  once it acked the message). A delivery that died before its ack stays
  open, so its redelivery is accepted; a flagged copy after the ack is a
  replay. A redelivery is accepted again without checking signatures (the
  ring's hash, which covers them, equals the
  remembered one, and every link is re-checked), judged at the *first*
  delivery's time so waiting never expires it; revocation, bindings, digest,
  destination and policy are checked again.
* ``retry``: the consumer itself re-published it for a handler retry and
  remembered the attempt number (:func:`with_retry`); the copy carries that
  number (:attr:`DeliveryInfo.retry`). Judged like a redelivery, against the
  remembered destination. A second copy of the same retry is a replay.
* ``replay``: any other copy. Rejected with ``replayed``, or skipped as a
  duplicate, by the consumer's configuration.

A sighting lives at least until the ring could no longer be accepted as a
first delivery (:func:`expires_at`), and at least ``remember`` seconds after
it was first seen, so a late redelivery still finds it. Stores never forget
an entry early; a full store refuses (``store_unavailable``).

Only accepted deliveries are remembered: a rejected message's ring is never
stored, so forged or broken chains cannot fill a store or shadow a real one.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import msgpack

from trusthop.chain import Chain
from trusthop.verify import Limits

DEFAULT_REMEMBER = 24 * 3600
"""Seconds a sighting is kept after its first delivery at least (a day)."""

MAX_REMEMBERED_DELIVERIES = 64
"""Delivery ids kept per sighting; the oldest are forgotten beyond it (a
forgotten id's late redelivery is then rejected as ``replayed``: dead-lettered,
never handled twice)."""

_KEY_DOMAIN = b"trusthop-sighting-v1\x00"


class DeliveryKind(StrEnum):
    """What a delivery is to the consumer scope that received it."""

    FIRST = "first"
    REDELIVERY = "redelivery"
    RETRY = "retry"
    REPLAY = "replay"


class OnReplay(StrEnum):
    """What a consumer does with a ``replay``."""

    REJECT = "reject"
    """Dead-letter it with reason ``replayed`` (the default)."""
    SKIP = "skip"
    """Acknowledge it without running the handler, counted as a duplicate."""


@dataclass(frozen=True, slots=True)
class DeliveryInfo:
    """What the transport knows about one delivery.

    ``id``: a broker-assigned identity that is the same on every redelivery
    and different for every copy (Kafka: ``topic/partition@offset``); ``None``
    when the broker has none (RabbitMQ). ``redelivered``: the broker's own
    redelivery flag (RabbitMQ). ``retry``: the attempt number stamped by the
    consumer's retry path (0 when the message did not come through it).
    """

    id: str | None = None
    redelivered: bool = False
    retry: int = 0


@dataclass(frozen=True, slots=True)
class Sighting:
    """What a consumer scope remembers about one accepted ring.

    ``first_seen`` is the verifier's time at the first accepted delivery;
    ``destination`` the destination it was accepted for; ``uses`` how many
    distinct deliveries were accepted as ``first``; ``deliveries`` their ids
    (and those of retries); ``retry_pending`` the attempt number of a retry
    the consumer published and has not seen back yet (0: none);
    ``expires_at`` when the store may drop it (verifier clock); ``open`` how
    many accepted deliveries (first ones and retries) were not settled yet
    (:func:`settled`): while one is, a delivery flagged ``redelivered`` may
    be its redelivery.
    """

    first_seen: float
    destination: str
    uses: int = 1
    deliveries: tuple[str, ...] = ()
    retry_pending: int = 0
    expires_at: float = 0.0
    open: int = 1

    def encode(self) -> bytes:
        """Compact msgpack form, as stored (format 2)."""
        return msgpack.packb(
            [
                2,
                self.first_seen,
                self.destination,
                self.uses,
                list(self.deliveries),
                self.retry_pending,
                self.expires_at,
                self.open,
            ],
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> Sighting:
        """Parse :meth:`encode`'s output.

        Format 1 (written before ``open`` existed) reads with ``open=1``: a
        redelivery of it is believed, as it was when it was written.

        Raises:
            ValueError: anything else (a store holding foreign or corrupt
                data under a trusthop key).
        """
        try:
            item: Any = msgpack.unpackb(data, raw=False, strict_map_key=True)
            if isinstance(item, list) and len(item) == 7 and type(item[0]) is int:
                item = [2 if item[0] == 1 else None, *item[1:], 1]
            version, first_seen, destination, uses, deliveries, retry, expires, open_ = item
        except Exception as exc:  # any decode or unpacking failure
            raise ValueError(f"not a trusthop sighting: {type(exc).__name__}") from None
        valid = (
            type(version) is int
            and version == 2
            and isinstance(first_seen, (int, float))
            and not isinstance(first_seen, bool)
            and math.isfinite(first_seen)
            and isinstance(destination, str)
            and isinstance(uses, int)
            and uses >= 1
            and isinstance(deliveries, list)
            and all(isinstance(d, str) for d in deliveries)
            and isinstance(retry, int)
            and retry >= 0
            and isinstance(expires, (int, float))
            and isinstance(open_, int)
            and open_ >= 0
        )
        if not valid:
            raise ValueError("not a trusthop sighting: unexpected field types")
        return cls(
            float(first_seen), destination, uses, tuple(deliveries), retry, float(expires), open_
        )


def sighting_key(scope: str, chain: Chain) -> str:
    """The store key for ``chain``'s newest ring in consumer ``scope``.

    The newest ring's hash covers its signature and the hash of every ring
    before it, so one key stands for the whole chain. ``scope`` names the consumer group
    or queue (``kafka/<group>``, ``amqp/<queue>``); it is hashed in, so any
    text is safe.
    """
    digest = hashlib.sha256(_KEY_DOMAIN + scope.encode("utf-8", "surrogatepass") + b"\x00")
    digest.update(chain.hash_at(-1))
    return digest.hexdigest()


def classify(
    sighting: Sighting | None, delivery: DeliveryInfo, *, max_uses: int = 1
) -> DeliveryKind:
    """The kind of ``delivery`` given what the scope remembers (module docstring).

    Order matters: a delivery id already seen is a redelivery even when it
    carries a retry number (a retry redelivered after a crash), and
    RabbitMQ's flag wins over the retry number for the same reason, but only
    while a delivery is open (``sighting.open``): a flagged copy after every
    accepted delivery was settled is judged on its other facts (a retry
    number the scope expects, another allowed use, or a replay).
    """
    if max_uses < 1:
        raise ValueError("max_uses must be at least 1")
    if sighting is None:
        return DeliveryKind.FIRST
    if delivery.id is not None and delivery.id in sighting.deliveries:
        return DeliveryKind.REDELIVERY
    if delivery.redelivered and sighting.open > 0:
        return DeliveryKind.REDELIVERY
    if delivery.retry:
        if delivery.retry == sighting.retry_pending:
            return DeliveryKind.RETRY
        return DeliveryKind.REPLAY
    if sighting.uses < max_uses:
        return DeliveryKind.FIRST
    return DeliveryKind.REPLAY


def expires_at(chain: Chain, *, limits: Limits, now: float, remember: float) -> float:
    """When a sighting of ``chain`` accepted at ``now`` may be forgotten.

    Not before the newest ring stops being acceptable as a first delivery
    (its window or ``max_age``, plus leeway), and not before ``remember``
    seconds after ``now``.
    """
    return float(max(limits.accept_until(chain.newest), now + remember))


def _with_id(ids: tuple[str, ...], delivery_id: str | None) -> tuple[str, ...]:
    if delivery_id is None or delivery_id in ids:
        return ids
    return (*ids, delivery_id)[-MAX_REMEMBERED_DELIVERIES:]


def accepted(
    sighting: Sighting | None,
    delivery: DeliveryInfo,
    kind: DeliveryKind,
    *,
    destination: str,
    now: float,
    expires: float,
) -> Sighting | None:
    """The sighting to store once ``delivery`` of kind ``kind`` was accepted.

    ``None`` means "store nothing" (a replay changes nothing). ``expires``
    only ever extends the stored lifetime.
    """
    if kind is DeliveryKind.REPLAY:
        return None
    if sighting is None:
        return Sighting(now, destination, 1, _with_id((), delivery.id), 0, expires, 1)
    lifetime = max(sighting.expires_at, expires)
    if kind is DeliveryKind.FIRST:
        return replace(
            sighting,
            uses=sighting.uses + 1,
            deliveries=_with_id(sighting.deliveries, delivery.id),
            expires_at=lifetime,
            open=sighting.open + 1,
        )
    if kind is DeliveryKind.RETRY:
        return replace(
            sighting,
            deliveries=_with_id(sighting.deliveries, delivery.id),
            retry_pending=0,
            expires_at=lifetime,
            open=sighting.open + 1,
        )
    # A redelivery continues a delivery that was accepted and never settled
    # (it is still counted in ``open``): nothing new is open.
    return replace(
        sighting, deliveries=_with_id(sighting.deliveries, delivery.id), expires_at=lifetime
    )


def settled(sighting: Sighting) -> Sighting:
    """``sighting`` once one accepted delivery of it was settled (acked after
    its handler returned, its retry copy was confirmed, or it was
    dead-lettered): one fewer is open, never fewer than none."""
    return replace(sighting, open=max(sighting.open - 1, 0))


def with_retry(sighting: Sighting, attempt: int) -> Sighting:
    """``sighting`` with a retry of handler attempt ``attempt`` pending.

    Raises:
        ValueError: ``attempt < 2`` (the first attempt is the delivery itself).
    """
    if attempt < 2:
        raise ValueError("a retry is handler attempt 2 or later")
    return replace(sighting, retry_pending=attempt)
