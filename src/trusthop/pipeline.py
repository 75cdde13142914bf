"""What every transport wrapper does per message, in one place.

:class:`ChainSigner` seals an outgoing CloudEvent (origin or derived) into a
:class:`WireEvent` carrying its chain; :class:`ChainVerifier` turns a decoded
incoming event into a :class:`TrustedEvent` or raises :class:`TrustError`.
:class:`Rejection` is the dead-letter record. The Kafka, AMQP and in-memory
transports call these and nothing else, so they cannot disagree on a rule.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

from cloudevents.core.v1.event import CloudEvent

from trusthop.bundle import BundleSource, TrustBundle, current_bundle
from trusthop.chain import Chain, OriginRing, check_chain_text, decode_rings
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.policy import Decision, Policy, check_publish, evaluate
from trusthop.policy.decisions import PdpOutcome, decision_record, log_decision
from trusthop.policy.pdp import (
    DEFAULT_PDP_TIMEOUT,
    PolicyDecisionPoint,
    authzen_request,
    consult,
)
from trusthop.policy.source import PolicySource, current_policy
from trusthop.sigcache import DEFAULT_CACHE_SIZE, SignatureCache
from trusthop.sign import DEFAULT_HOP_TTL, Identity, append_hop
from trusthop.verify import Limits, VerifiedContext, verify_decoded

Clock = Callable[[], float]


# Dead-letter header names (Kafka headers and AMQP headers alike).
H_REASON = "trusthop-reason"
H_DETAIL = "trusthop-detail"
H_SOURCE = "trusthop-source"
H_CONSUMER = "trusthop-consumer"
H_ATTEMPTS = "trusthop-attempts"
H_DESTINATION = "trusthop-destination"


@dataclass(frozen=True, slots=True)
class TrustedEvent:
    """A verified delivery: the SDK event, its verified context, its wire form,
    and the policy decision that allowed it (``None`` when the verifier has
    no policy): weakest trust level on the path, each actor's level, the
    rules that matched."""

    event: CloudEvent
    context: VerifiedContext
    wire: WireEvent
    decision: Decision | None = None
    policy: Policy | None = None
    """The policy that took ``decision`` (``None`` without policy)."""


class DeliveryViews:
    """Shortcuts shared by the transports' delivery objects, which hold ``trusted``."""

    __slots__ = ()
    trusted: TrustedEvent

    @property
    def event(self) -> CloudEvent:
        """The verified CloudEvent (JSON data parsed, other data as bytes)."""
        return self.trusted.event

    @property
    def context(self) -> VerifiedContext:
        """Subject, scope, actors and chain; pass as ``parent=`` to derive events."""
        return self.trusted.context

    @property
    def wire(self) -> WireEvent:
        """The decoded wire form the digest was computed over."""
        return self.trusted.wire

    @property
    def decision(self) -> Decision | None:
        """The policy decision (weakest level, matched rules); ``None`` without policy."""
        return self.trusted.decision


# Control characters, line/paragraph separators, bidirectional controls and
# lone surrogates: a rejection's text goes into log lines and dead-letter headers.
_UNPRINTABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)


def printable(text: str) -> str:
    """``text`` with every control character, line or paragraph separator,
    bidirectional control (which reorders how a line is displayed) and lone
    surrogate written as a Python escape (``\\n``, ``\\x1b``, ``\\u202e``).

    Text an attacker chose (a RabbitMQ routing key, a handler's error
    message) then cannot forge a log line or smuggle terminal escapes into
    a dead letter's headers. Other text is returned unchanged.
    """
    return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], text)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message was dead-lettered, as written into its headers.

    ``detail``, ``source`` and ``destination`` are made :func:`printable` on
    construction: they end up in log lines and headers, and may quote what a
    publisher chose (an AMQP routing key, a handler's error message).
    ``consumer`` (the group or queue, the operator's choice) is kept as is:
    the RabbitMQ worker routes its dead letters by it.
    """

    reason: Reason
    detail: str
    source: str
    consumer: str
    attempts: int = 1
    destination: str | None = None
    """The destination the newest ring was signed for, when the chain could
    be decoded (``source`` is where the message was consumed from)."""

    def __post_init__(self) -> None:
        for name in ("detail", "source", "destination"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, printable(value))

    @classmethod
    def of(
        cls,
        error: TrustError,
        *,
        source: str,
        consumer: str,
        attempts: int = 1,
        destination: str | None = None,
    ) -> Rejection:
        return cls(error.reason, error.message, source, consumer, attempts, destination)

    def headers(self) -> dict[str, str]:
        out = {
            H_REASON: self.reason.value,
            H_DETAIL: self.detail[:512],
            H_SOURCE: self.source,
            H_CONSUMER: self.consumer,
            H_ATTEMPTS: str(self.attempts),
        }
        if self.destination is not None:
            out[H_DESTINATION] = self.destination[:512]
        return out


class ChainSigner:
    """Seals outgoing events for one workload identity.

    Args:
        identity: the workload's SPIFFE ID, key id and private key.
        hop_ttl: how long a hop ring stays valid (capped by the parent).
        clock: seconds since the epoch; injectable for tests.
        policy: when given, :meth:`seal` refuses, before signing, an event
            that a consumer under this policy would reject. A
            :class:`~trusthop.policy.source.PolicySource` is read at every
            seal (reloads apply at once); either can be replaced at any time
            (``signer.policy = new``).
    """

    def __init__(
        self,
        identity: Identity,
        *,
        hop_ttl: int = DEFAULT_HOP_TTL,
        clock: Clock = time.time,
        policy: Policy | PolicySource | None = None,
    ) -> None:
        self.identity = identity
        self.hop_ttl = hop_ttl
        self._clock = clock
        self.policy = policy

    def seal(
        self,
        event: CloudEvent,
        *,
        destination: str,
        origin: OriginRing | None = None,
        parent: VerifiedContext | Chain | None = None,
        scope: Iterable[str] | None = None,
        peer: str | None = None,
        consumed_event_id: str | None = None,
    ) -> WireEvent:
        """Append a hop ring for ``event`` published to ``destination``.

        Exactly one of ``origin`` (the first event of a request, at the edge)
        or ``parent`` (a derived event of a verified delivery) is given. A bare
        :class:`Chain` as ``parent`` is for tools that extend a chain they did
        not consume. The parent ring's event digest already names, exactly,
        the event a derived one came from; ``consumed_event_id`` also records
        that event's id in the new ring (19 bytes more for a UUID), for logs
        that look events up by id.

        Raises:
            TrustError: the policy's reason (``segment_quarantined``,
                ``insufficient_trust_level``, ``unauthorized_actor``...,
                see :mod:`trusthop.policy.evaluate`) when a policy is set and
                denies, checked before anything is signed; then the
                producer-side checks of :func:`append_hop`.
            ValueError: neither or both of ``origin`` and ``parent``.
        """
        if (origin is None) == (parent is None):
            raise ValueError("give exactly one of origin= or parent=")
        wire = WireEvent.from_cloudevent(event)
        if origin is not None:
            chain = Chain(origin)
        elif isinstance(parent, VerifiedContext):
            chain = parent.chain
        else:
            assert parent is not None
            chain = parent
        if scope is not None and not isinstance(scope, str):
            scope = tuple(scope)  # read by the policy check and by append_hop
        policy = current_policy(self.policy)
        if policy is not None:
            event_type = wire.attributes.get("type")
            check_publish(
                policy,
                chain,
                actor=self.identity.actor,
                destination=destination,
                event_type=event_type if isinstance(event_type, str) else "",
                scope=scope,
            ).raise_if_denied()
        sealed = append_hop(
            self.identity,
            chain,
            event_digest=wire.digest(),
            destination=destination,
            now=self._clock(),
            scope=scope,
            ttl=self.hop_ttl,
            consumed_event_id=consumed_event_id,
            peer=peer,
        )
        wire.chain = sealed.encode()
        return wire


class ChainVerifier:
    """Verifies incoming events against a trust bundle.

    Args:
        bundle: the keys and the actors they belong to, or a
            :class:`~trusthop.bundle.BundleSource` read at every message (a
            reload applies at once). Either can be replaced at any time
            (``verifier.bundle = new``); the next message, however long it
            waited, is judged by the new one.
        origin_actors: the edge workloads allowed to mint origin rings. Give
            it: without it any workload with a bundled key can start a chain
            for any subject.
        trust_domain: the only trust domain accepted (default: any bundled one).
        limits: size, depth and clock-skew bounds.
        clock: seconds since the epoch; injectable for tests.
        policy: when given, evaluated after cryptographic verification; a
            deny raises :class:`TrustError` with the policy's reason. A
            :class:`~trusthop.policy.source.PolicySource` is read at every
            message, so a reload applies at once; either can be replaced at
            any time (``verifier.policy = new``); the next message, however
            long it waited in a queue, is judged by the new one.
        pdp: an external decision point (see :mod:`trusthop.policy.pdp`),
            asked after the local policy allowed (or after cryptographic
            verification, without a policy). Only :meth:`verify_async`
            consults it; :meth:`verify` refuses to run when one is set.
        pdp_timeout: seconds the PDP may take; longer fails closed with
            ``pdp_unavailable``.
        cache_size: verified chains remembered, each with its prefix
            (:class:`~trusthop.sigcache.SignatureCache`), so fan-out and
            shared chain prefixes pay for each signature once and are not
            decoded again; ``0`` turns the cache off. Replacing ``bundle``
            or ``policy`` clears it.

    Every decision taken with a policy or a PDP (allow and deny) is logged
    as one JSON line on ``trusthop.decisions``
    (:mod:`trusthop.policy.decisions`).
    """

    def __init__(
        self,
        bundle: TrustBundle | BundleSource,
        *,
        origin_actors: Iterable[str] | None = None,
        trust_domain: str | None = None,
        limits: Limits = Limits(),
        clock: Clock = time.time,
        policy: Policy | PolicySource | None = None,
        pdp: PolicyDecisionPoint | None = None,
        pdp_timeout: float = DEFAULT_PDP_TIMEOUT,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if pdp_timeout <= 0:
            raise ValueError("pdp_timeout must be positive")
        if cache_size < 0:
            raise ValueError("cache_size must not be negative")
        self.signature_cache = SignatureCache(cache_size) if cache_size else None
        self._bundle = bundle
        self._policy: Policy | PolicySource | None = None
        if isinstance(origin_actors, str):
            raise TypeError("origin_actors is a collection of SPIFFE IDs, not one string")
        self.origin_actors = None if origin_actors is None else frozenset(origin_actors)
        self.trust_domain = trust_domain
        self.limits = limits
        self._clock = clock
        self.policy = policy
        self.pdp = pdp
        self.pdp_timeout = pdp_timeout

    @property
    def bundle(self) -> TrustBundle | BundleSource:
        """The trust bundle (or its source); assigning clears the verified-prefix cache."""
        return self._bundle

    @bundle.setter
    def bundle(self, bundle: TrustBundle | BundleSource) -> None:
        self._bundle = bundle
        if self.signature_cache is not None:
            self.signature_cache.clear()

    @property
    def policy(self) -> Policy | PolicySource | None:
        """The policy (or its source); assigning clears the verified-prefix cache."""
        return self._policy

    @policy.setter
    def policy(self, policy: Policy | PolicySource | None) -> None:
        self._policy = policy
        if self.signature_cache is not None:
            self.signature_cache.clear()

    def now(self) -> float:
        """The verifier's clock."""
        return self._clock()

    def prepare(self, wire: WireEvent) -> tuple[bytes, Chain]:
        """The event digest of ``wire``, then its chain decoded within this
        verifier's limits (the event is checked before its chain, as in
        :meth:`verify`). Each is computed once per message.

        Raises:
            TrustError: ``malformed`` (event or chain), ``missing_chain``,
                ``too_large`` or ``depth_exceeded``.
        """
        digest = wire.digest()
        if wire.chain is None:
            raise TrustError(Reason.MISSING_CHAIN, "the event carries no trustchain attribute")
        text = wire.chain
        check_chain_text(text, max_bytes=self.limits.max_bytes, max_rings=self.limits.max_rings)
        cache = self.signature_cache
        # Rings of a prefix verified before are not decoded again.
        return digest, cache.decode(text) if cache is not None else decode_rings(text)

    def verify(self, wire: WireEvent, destination: str) -> TrustedEvent:
        """Verify ``wire`` as consumed from ``destination`` (no PDP).

        Raises:
            TrustError: any rejection (see :mod:`trusthop.verify`), then, with
                a policy, its deny reason (see :mod:`trusthop.policy.evaluate`).
            RuntimeError: a PDP is configured (it is async: use
                :meth:`verify_async`); raised before anything is verified.
        """
        if self.pdp is not None:
            raise RuntimeError("this verifier has a PDP: use 'await verifier.verify_async(...)'")
        return self._verify_local(wire, destination, log=True)

    async def verify_async(self, wire: WireEvent, destination: str) -> TrustedEvent:
        """Verify ``wire`` as consumed from ``destination``, then ask the PDP.

        The same checks as :meth:`verify`; when the local policy (if any)
        allows and a PDP is set, the PDP gets the AuthZEN-shaped request of
        :func:`~trusthop.policy.pdp.authzen_request` (action ``consume``).
        Without a PDP this is :meth:`verify`.

        Raises:
            TrustError: what :meth:`verify` raises; then ``pdp_unavailable``
                on a PDP timeout, exception or malformed answer (fail
                closed), or the PDP's deny reason (see
                :func:`~trusthop.policy.pdp.consult`).
        """
        return await self._verify_with(wire, destination)

    async def _verify_with(
        self,
        wire: WireEvent,
        destination: str,
        *,
        prepared: tuple[bytes, Chain] | None = None,
        at: float | None = None,
        known: bool = False,
    ) -> TrustedEvent:
        """:meth:`verify_async` on the output of :meth:`prepare`, judged at time
        ``at`` (default: now). ``known=True`` skips the signature checks; only
        :mod:`trusthop.admission` passes it, for a chain whose newest ring's
        hash equals one it accepted before (links are still checked, so every
        earlier ring is bound to that hash)."""
        pdp = self.pdp
        trusted = self._verify_local(
            wire, destination, log=pdp is None, prepared=prepared, at=at, known=known
        )
        if pdp is None:
            return trusted
        request = authzen_request(
            trusted.context,
            action="consume",
            destination=destination,
            event_type=str(trusted.event.get_type()),
            decision=trusted.decision,
        )
        try:
            await consult(pdp, request, seconds=self.pdp_timeout)
        except TrustError as error:
            outcome: PdpOutcome = (
                "unavailable" if error.reason is Reason.PDP_UNAVAILABLE else "deny"
            )
            self._log(trusted, destination, error.reason, error.message, outcome)
            raise
        message = "allowed by the external decision point"
        if trusted.decision is not None:
            message = f"{trusted.decision.message}; {message}"
        self._log(trusted, destination, None, message, "allow")
        return trusted

    def _verify_local(
        self,
        wire: WireEvent,
        destination: str,
        *,
        log: bool,
        prepared: tuple[bytes, Chain] | None = None,
        at: float | None = None,
        known: bool = False,
    ) -> TrustedEvent:
        digest, chain = self.prepare(wire) if prepared is None else prepared
        cache = self.signature_cache
        bundle = current_bundle(self._bundle)
        now = self._clock() if at is None else at
        # A known chain skips its signatures and is not remembered again.
        check: Callable[..., VerifiedContext] = (
            cache.verify
            if cache is not None and not known
            else partial(verify_decoded, check_signatures=not known)
        )
        context = check(
            chain,
            bundle=bundle,
            event_digest=digest,
            destination=destination,
            now=now,
            limits=self.limits,
            event_id=wire.id,
            origin_actors=self.origin_actors,
            trust_domain=self.trust_domain,
        )
        event = wire.to_cloudevent()
        source = self.policy  # read once: a concurrent swap cannot split a decision
        policy = current_policy(source)
        if policy is None:
            return TrustedEvent(event, context, wire)
        decision = evaluate(
            policy, context, destination=destination, event_type=str(event.get_type())
        )
        trusted = TrustedEvent(event, context, wire, decision, policy)
        if log or not decision.allowed:
            self._log(trusted, destination, decision.reason, decision.message, None)
        decision.raise_if_denied()
        return trusted

    def _log(
        self,
        trusted: TrustedEvent,
        destination: str,
        reason: Reason | None,
        message: str,
        pdp: PdpOutcome | None,
    ) -> None:
        source = self.policy
        log_decision(
            decision_record(
                trusted.context,
                destination=destination,
                event_type=str(trusted.event.get_type()),
                decision=trusted.decision,
                policy=trusted.policy,
                policy_source=str(source.path) if isinstance(source, PolicySource) else None,
                allowed=reason is None,
                reason=reason,
                message=message,
                pdp=pdp,
            )
        )
