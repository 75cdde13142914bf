"""Signing rings: the producer side of the core (no I/O).

An :class:`Identity` is one workload's signing identity (SPIFFE ID, key id,
private key). :func:`mint_origin` turns an authenticated request into an
origin ring; :func:`append_hop` extends a chain for a published event. Both
refuse, with the same reason codes a verifier would give, to sign something
a verifier would reject (wider scope, longer window, foreign trust domain).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace

from trusthop.bundle import BundleKey
from trusthop.chain import MAX_SCOPE_ENTRIES, Chain, HopRing, OriginRing, check_ring_fields
from trusthop.errors import Reason, TrustError
from trusthop.keys import SigningKey
from trusthop.spiffe import SpiffeId, trust_domain_of, validate_spiffe_id
from trusthop.verify import check_narrowing

DEFAULT_ORIGIN_TTL = 24 * 3600
DEFAULT_HOP_TTL = 24 * 3600


@dataclass(frozen=True, slots=True)
class Identity:
    """A workload's signing identity: its SPIFFE ID, key id and private key."""

    actor: str
    key: SigningKey
    kid: str

    def __post_init__(self) -> None:
        validate_spiffe_id(self.actor)

    @classmethod
    def create(cls, actor: str, key: SigningKey, *, kid: str | None = None) -> Identity:
        """``kid`` defaults to the key's RFC 7638 thumbprint."""
        return cls(actor, key, kid or key.public_key.thumbprint)

    @property
    def bundle_key(self) -> BundleKey:
        """The bundle entry that binds this identity's public key to its actor."""
        return BundleKey(self.kid, self.actor, self.key.public_key)


def hash_credential(credential: str | bytes) -> bytes:
    """SHA-256 of the original credential; the only trace of it in a ring."""
    raw = credential.encode("utf-8") if isinstance(credential, str) else credential
    return hashlib.sha256(raw).digest()


def _scope(scope: Iterable[str]) -> frozenset[str]:
    if isinstance(scope, str):
        raise TypeError("scope is a collection of strings, not one string")
    out = frozenset(scope)
    if len(out) > MAX_SCOPE_ENTRIES or not all(isinstance(s, str) and s for s in out):
        raise ValueError(f"scope must hold at most {MAX_SCOPE_ENTRIES} non-empty strings")
    return out


def mint_origin(
    identity: Identity,
    *,
    subject: str,
    issuer: str,
    credential: str | bytes,
    scope: Iterable[str],
    now: float,
    ttl: int = DEFAULT_ORIGIN_TTL,
    transaction_id: str | None = None,
    acr: str | None = None,
    amr: Iterable[str] | None = None,
) -> OriginRing:
    """Sign an origin ring for ``subject`` after the edge verified ``credential``.

    The caller must have verified the credential; only its hash is kept. The
    trust domain is the edge actor's own.
    """
    if not subject or not issuer:
        raise ValueError("subject and issuer must be non-empty")
    if ttl < 0:
        raise ValueError("ttl must not be negative")
    iat = int(now)
    ring = OriginRing(
        actor=identity.actor,
        kid=identity.kid,
        iat=iat,
        exp=iat + ttl,
        scope=_scope(scope),
        subject=subject,
        issuer=issuer,
        credential_hash=hash_credential(credential),
        transaction_id=transaction_id or str(uuid.uuid4()),
        trust_domain=SpiffeId.parse(identity.actor).trust_domain,
        acr=acr,
        amr=tuple(amr) if amr is not None else None,
    )
    check_ring_fields(ring, 0)
    return replace(ring, signature=identity.key.sign(ring.signing_input()))


def append_hop(
    identity: Identity,
    chain: Chain,
    *,
    event_digest: bytes,
    destination: str,
    now: float,
    scope: Iterable[str] | None = None,
    ttl: int = DEFAULT_HOP_TTL,
    consumed_event_id: str | None = None,
    peer: str | None = None,
) -> Chain:
    """Sign a hop ring for an event published to ``destination``.

    ``scope`` defaults to the previous ring's scope; the window starts now and
    ends at ``now + ttl`` or the previous ring's end, whichever is first.

    Raises:
        TrustError: ``scope_escalation`` for a scope wider than the previous
            ring's, ``expired`` when the previous ring's window is over,
            ``unauthorized_actor`` for an identity outside the chain's trust
            domain — what a consumer would answer.
    """
    prev = chain.newest
    if trust_domain_of(identity.actor) != chain.origin.trust_domain:
        raise TrustError(
            Reason.UNAUTHORIZED_ACTOR,
            f"{identity.actor} is outside trust domain {chain.origin.trust_domain}",
        )
    iat = max(int(now), prev.iat)
    exp = min(iat + ttl, prev.exp)
    if exp < iat:
        raise TrustError(Reason.EXPIRED, f"the parent chain expired at {prev.exp}")
    hop = HopRing(
        actor=identity.actor,
        kid=identity.kid,
        iat=iat,
        exp=exp,
        scope=prev.scope if scope is None else _scope(scope),
        prev_hash=chain.hashes()[-1],
        event_digest=event_digest,
        destination=destination,
        consumed_event_id=consumed_event_id,
        peer=peer,
    )
    check_ring_fields(hop, len(chain.hops) + 1)
    check_narrowing(prev, hop, len(chain.hops) + 1)
    return chain.appended(replace(hop, signature=identity.key.sign(hop.signing_input())))
