"""Admission: verification plus the replay rules, for one consumer scope.

Every transport (Kafka, RabbitMQ, in-memory) hands each decoded delivery to
:meth:`Admission.admit` and nothing else decides whether a handler runs. It

1. computes the event digest and decodes the chain once
   (:meth:`~trusthop.pipeline.ChainVerifier.prepare`);
2. reads what the scope remembers about the newest ring and classifies the
   delivery (:func:`trusthop.replay.classify`);
3. verifies: in full at the current time for a first delivery; for a
   redelivery or retry without the signature checks (the ring hash equals
   one accepted before) and at the first delivery's time, with revocation,
   bindings, links, digest, destination and policy checked again;
4. records the acceptance atomically, re-classifying against what the store
   holds at that moment, so two replicas racing on two copies accept one.

A replay raises ``replayed`` or, with ``on_replay="skip"``, returns ``None``.
Store failures (a :class:`~trusthop.stores.base.StoreError`, any other
exception a store raises, or no answer within ``store_timeout``) fail closed
with ``store_unavailable``. A transport whose redeliveries are told only by a
flag (RabbitMQ) calls :meth:`Admission.settle` once a delivery is acked, so
that a flagged copy after it is a replay. Counters go to
:attr:`Admission.counters` and to an optional :class:`~trusthop.metrics.Metrics`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from trusthop.chain import Chain
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.metrics import Counters, Metrics
from trusthop.pipeline import ChainVerifier, TrustedEvent
from trusthop.replay import (
    DEFAULT_REMEMBER,
    DeliveryInfo,
    DeliveryKind,
    OnReplay,
    Sighting,
    accepted,
    classify,
    expires_at,
    settled,
    sighting_key,
    with_retry,
)
from trusthop.stores.base import ReplayStore, StoreError, StoreFull
from trusthop.stores.memory import never_waits

T = TypeVar("T")

DEFAULT_STORE_TIMEOUT = 30.0
"""Seconds one replay store call may take before it fails closed
(``store_unavailable``): a store that hangs must not stall a consumer."""

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Admitted:
    """An accepted delivery: the verified event, what kind of delivery it
    was, and the store key and sighting it was recorded under (empty and
    ``None`` without a store)."""

    trusted: TrustedEvent
    kind: DeliveryKind
    key: str = ""
    sighting: Sighting | None = None

    @property
    def redelivered(self) -> bool:
        """True for a redelivery or a retry (the handler may have run before)."""
        return self.kind in (DeliveryKind.REDELIVERY, DeliveryKind.RETRY)


class Admission:
    """Verification and replay rules for one consumer group or queue.

    Args:
        verifier: the chain verifier (its verified-prefix cache is shared by every
            admission that uses it).
        scope: names the consumer group or queue (``kafka/<group>``,
            ``amqp/<queue>``); sightings are kept per scope.
        store: where sightings live; ``None`` turns replay detection off
            (every delivery is then verified in full as a first delivery).
        max_uses: distinct deliveries of one ring accepted in this scope
            (1: single use; N: a broadcast consumed up to N times).
        on_replay: ``"reject"`` (dead-letter with ``replayed``) or
            ``"skip"`` (acknowledge without the handler).
        remember: seconds a sighting is kept after its first delivery at
            least, beyond the chain's own validity.
        metrics: an extra sink for the counters.
        store_timeout: seconds one store call may take (``None``: no limit);
            past it the delivery fails closed with ``store_unavailable``, so a
            store that hangs (a client without socket timeouts, a black-holed
            network) cannot stall the consumer.

    Raises:
        ValueError: ``max_uses < 1``, negative ``remember``, unknown ``on_replay``,
            a ``store_timeout`` that is not a positive number of seconds.
    """

    def __init__(
        self,
        verifier: ChainVerifier,
        *,
        scope: str,
        store: ReplayStore | None,
        max_uses: int = 1,
        on_replay: OnReplay | str = OnReplay.REJECT,
        remember: float = DEFAULT_REMEMBER,
        metrics: Metrics | None = None,
        store_timeout: float | None = DEFAULT_STORE_TIMEOUT,
    ) -> None:
        if max_uses < 1:
            raise ValueError("max_uses must be at least 1")
        if remember < 0:
            raise ValueError("remember must not be negative")
        if store_timeout is not None and not (math.isfinite(store_timeout) and store_timeout > 0):
            raise ValueError("store_timeout must be a positive number of seconds (or None)")
        self.verifier = verifier
        self.scope = scope
        self.store = store
        self.max_uses = max_uses
        self.on_replay = OnReplay(on_replay)
        self.remember = remember
        self.counters = Counters()
        self.metrics = metrics
        self.store_timeout = store_timeout

    def count(self, name: str, amount: int = 1, *, reason: str | None = None) -> None:
        """Add to a counter here and in the extra sink (wrappers count
        ``retried`` and ``rejected`` for ``handler_failed`` through it)."""
        self.counters.inc(name, amount, reason=reason)
        if self.metrics is not None:
            self.metrics.inc(name, amount, reason=reason)

    async def admit(
        self, wire: WireEvent, destination: str, delivery: DeliveryInfo | None = None
    ) -> Admitted | None:
        """Verify and classify one delivery consumed from ``destination``.

        Returns the accepted delivery, or ``None`` for a replay skipped under
        ``on_replay="skip"`` (acknowledge it, do not run the handler).

        Raises:
            TrustError: every reason of
                :meth:`~trusthop.pipeline.ChainVerifier.verify_async`;
                ``replayed``; ``store_unavailable`` when the store fails or
                is full. Each is counted under ``rejected``.
        """
        cache = self.verifier.signature_cache
        hits, misses = (cache.hits, cache.misses) if cache is not None else (0, 0)
        try:
            admitted = await self._admit(wire, destination, delivery or DeliveryInfo())
        except TrustError as error:
            self.count("rejected", reason=error.reason.value)
            if error.reason is Reason.REPLAYED:
                self.count("replayed")
            raise
        finally:
            if cache is not None:
                if cache.hits > hits:
                    self.count("cache_hits", cache.hits - hits)
                if cache.misses > misses:
                    self.count("cache_misses", cache.misses - misses)
        if admitted is None:
            self.count("replayed")
            self.count("duplicates")
            return None
        self.count("verified")
        if admitted.kind is DeliveryKind.REDELIVERY:
            self.count("redelivered")
        return admitted

    async def _admit(
        self, wire: WireEvent, destination: str, delivery: DeliveryInfo
    ) -> Admitted | None:
        verifier = self.verifier
        prepared = verifier.prepare(wire)
        chain = prepared[1]
        store = self.store
        if store is None:
            trusted = await verifier._verify_with(wire, destination, prepared=prepared)
            return Admitted(trusted, DeliveryKind.FIRST)
        key = sighting_key(self.scope, chain)
        sighting = _parse(await self._call(store.get(key)))
        kind = classify(sighting, delivery, max_uses=self.max_uses)
        for _ in range(2):
            if kind is DeliveryKind.REPLAY:
                self._replayed()
                return None
            result, kind, recorded = await self._verify_and_record(
                store, key, wire, destination, delivery, prepared, kind, sighting
            )
            if result is None:
                # The sighting expired between the read and the write: judge
                # the delivery again as a first one, signatures and time included.
                kind, sighting = DeliveryKind.FIRST, None
                continue
            if kind is DeliveryKind.REPLAY:
                self._replayed()
                return None
            return Admitted(result, kind, key, recorded)
        raise TrustError(
            Reason.STORE_UNAVAILABLE, "the replay store changed under a delivery twice"
        )

    async def _verify_and_record(
        self,
        store: ReplayStore,
        key: str,
        wire: WireEvent,
        destination: str,
        delivery: DeliveryInfo,
        prepared: tuple[bytes, Chain],
        kind: DeliveryKind,
        sighting: Sighting | None,
    ) -> tuple[TrustedEvent | None, DeliveryKind, Sighting | None]:
        """Verify as ``kind`` says, then record atomically; the kind found at
        write time wins. ``None`` as the event: verified as a redelivery but
        the sighting is gone (re-verify as a first delivery)."""
        verifier = self.verifier
        if kind is DeliveryKind.FIRST:
            trusted = await verifier._verify_with(wire, destination, prepared=prepared)
        else:
            assert sighting is not None
            # A retry copy (or its redelivery after a crash) arrives from the
            # consumer's own retry topic or queue: it is judged against the
            # destination remembered when the original was accepted.
            retried = kind is DeliveryKind.RETRY or delivery.retry > 0
            target = sighting.destination if retried else destination
            trusted = await verifier._verify_with(
                wire, target, prepared=prepared, at=sighting.first_seen, known=True
            )
        now = verifier.now()
        expires = expires_at(prepared[1], limits=verifier.limits, now=now, remember=self.remember)
        final: list[tuple[DeliveryKind, Sighting | None]] = []

        def change(current: bytes | None) -> tuple[bytes | None, float]:
            held = _parse(current)
            found = classify(held, delivery, max_uses=self.max_uses)
            final[:] = [(found, held)]
            if found is DeliveryKind.REPLAY or (
                found is DeliveryKind.FIRST and kind is not DeliveryKind.FIRST
            ):
                return None, 0.0
            new = accepted(
                held,
                delivery,
                found,
                destination=trusted.context.destination,
                now=now,
                expires=expires,
            )
            assert new is not None
            final[:] = [(found, new)]
            return new.encode(), new.expires_at - now

        await self._call(store.update(key, change))
        found, recorded = final[0]
        if found is DeliveryKind.FIRST and kind is not DeliveryKind.FIRST:
            return None, found, recorded
        return trusted, found, recorded

    def _replayed(self) -> None:
        """Raise ``replayed`` unless replays are skipped."""
        if self.on_replay is OnReplay.SKIP:
            return
        raise TrustError(
            Reason.REPLAYED,
            f"this signed event was already accepted in {self.scope[:200]} "
            f"(allowed uses: {self.max_uses}); this is another copy",
        )

    async def schedule_retry(self, admitted: Admitted, attempt: int) -> None:
        """Remember that handler attempt ``attempt`` of ``admitted`` will arrive
        as a retry copy (call before publishing the copy), and count it.

        Raises:
            TrustError: ``store_unavailable`` (do not publish the copy then).
            ValueError: ``attempt < 2``.
        """
        if attempt < 2:
            raise ValueError("a retry is handler attempt 2 or later")
        store = self.store
        if store is not None and admitted.sighting is not None:
            fallback = admitted.sighting
            now = self.verifier.now()

            def change(current: bytes | None) -> tuple[bytes | None, float]:
                held = _parse(current) or fallback
                new = with_retry(held, attempt)
                return new.encode(), new.expires_at - now

            await self._call(store.update(admitted.key, change))
        self.count("retried")

    async def peek(self, wire: WireEvent, delivery: DeliveryInfo) -> DeliveryKind | None:
        """What ``delivery`` would be to this scope, from what the store holds
        now, without verifying or recording anything; ``None`` without a store.

        A hint, not a verdict (the kind :meth:`admit` finds is the one that
        counts): the Kafka consumer asks it before it waits for a retry copy
        that is not due, and waits only for a retry this scope expects.

        Raises:
            TrustError: the event or its chain does not decode (``malformed``,
                ``missing_chain``, ``too_large``, ``depth_exceeded``), or
                ``store_unavailable``.
        """
        chain = self.verifier.prepare(wire)[1]
        store = self.store
        if store is None:
            return None
        sighting = _parse(await self._call(store.get(sighting_key(self.scope, chain))))
        return classify(sighting, delivery, max_uses=self.max_uses)

    async def settle(self, admitted: Admitted) -> None:
        """Record that ``admitted`` is settled: acked after its handler
        returned, after its retry copy was confirmed, or after it was
        dead-lettered (call after the ack).

        A broker that tells redeliveries only by a flag anyone allowed to
        consume can cause (RabbitMQ: consume a copy, ``nack`` it) needs it:
        once no accepted delivery of a ring is open, a copy flagged
        ``redelivered`` is judged a replay, not a redelivery. Transports
        whose deliveries have a broker identity (Kafka offsets) need not
        call it. Nothing is written when replay detection is off or the
        sighting is gone.

        Raises:
            TrustError: ``store_unavailable`` (the delivery then stays open:
                a flagged copy of it is still taken for a redelivery).
        """
        store = self.store
        if store is None or admitted.sighting is None:
            return
        now = self.verifier.now()

        def change(current: bytes | None) -> tuple[bytes | None, float]:
            held = _parse(current)
            if held is None or held.open == 0:
                return None, 0.0
            new = settled(held)
            return new.encode(), new.expires_at - now

        await self._call(store.update(admitted.key, change))

    async def _call(self, pending: Awaitable[T]) -> T:
        """Await a store call, failing closed with ``store_unavailable``.

        A store that raises anything else than a
        :class:`~trusthop.stores.base.StoreError` (a client library's own
        error, a bug), or does not answer within ``store_timeout`` seconds,
        fails closed the same way (logged); a :class:`TrustError` raised by
        the ``change`` function (a corrupt entry) keeps its own message.

        No timer is armed for a store that cannot wait
        (:func:`~trusthop.stores.memory.never_waits`: the in-memory store's
        own methods answer without awaiting anything); arming and cancelling
        one costs more than such a call.
        """
        scope = None if never_waits(self.store) else asyncio.timeout(self.store_timeout)
        try:
            if scope is None:
                return await pending
            async with scope:
                return await pending
        except TrustError:
            raise
        except StoreFull as exc:
            raise TrustError(Reason.STORE_UNAVAILABLE, f"replay store full: {exc}") from None
        except StoreError as exc:
            raise TrustError(Reason.STORE_UNAVAILABLE, f"replay store failed: {exc}") from None
        except Exception as exc:
            if isinstance(exc, TimeoutError) and scope is not None and scope.expired():
                log.warning("the replay store did not answer within %g s", self.store_timeout)
                raise TrustError(
                    Reason.STORE_UNAVAILABLE,
                    f"the replay store did not answer within {self.store_timeout:g} s",
                ) from None
            log.exception("the replay store raised %s outside its contract", type(exc).__name__)
            raise TrustError(
                Reason.STORE_UNAVAILABLE,
                f"replay store failed unexpectedly: {type(exc).__name__}",
            ) from None


def _parse(value: bytes | None) -> Sighting | None:
    if value is None:
        return None
    try:
        return Sighting.decode(value)
    except ValueError as exc:
        raise TrustError(
            Reason.STORE_UNAVAILABLE, f"the replay store holds a corrupt entry: {exc}"
        ) from None
