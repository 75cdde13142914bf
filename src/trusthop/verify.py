"""Chain verification: every invariant of the design brief, no I/O.

:func:`verify_chain` takes the ``trustchain`` attribute value, the digest of
the delivered event, where it was consumed from and the current time, and
either returns a :class:`VerifiedContext` or raises :class:`TrustError`.

Checks stop at the first failure, so the reason code names the first broken
rule in this order:

1. size (``too_large``) and ring count (``depth_exceeded``), before decoding;
2. encoding and structure (``malformed``);
3. keys, oldest ring first: the expected trust domain and origin actors
   (``unauthorized_actor``, when the verifier was given them); then per ring

   * without ``x5c``: key lookup (``unknown_key``), revocation of the key,
     the actor or its segment, or a ring signed after its key was retired
     (``revoked``), key-to-actor binding and trust domain
     (``unauthorized_actor``);
   * with ``x5c`` (an X.509-SVID, :mod:`trusthop.x509svid`): the chain
     validates to the X.509 authorities of the origin's trust domain at the
     ring's ``iat`` (``bad_certificate``), its SPIFFE ID is the ring's actor
     (``unauthorized_actor``), ``kid`` is the leaf key's RFC 7638 thumbprint
     (``bad_certificate``), no bundle entry of that ``kid`` is revoked or
     retired before ``iat`` and the actor and its segment are not revoked
     (``revoked``), a bundle entry of that ``kid`` binds no other actor and
     the actor is in the trust domain (``unauthorized_actor``);
4. every signature (``bad_signature``);
5. links and narrowing, oldest first: ``broken_link``, ``scope_escalation``,
   ``window_escalation``;
6. the newest ring against the delivery: event digest (``event_mismatch``),
   destination (``wrong_destination``), time (``expired``,
   ``not_yet_valid``).

Signatures come before every rule about what the rings say, so a content
reason (``scope_escalation``, ``broken_link``...) always describes what real
keys signed; an unsigned edit is ``bad_signature``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from trusthop.bundle import BundleKey, TrustBundle
from trusthop.chain import Chain, HopRing, OriginRing, Ring, decode_chain
from trusthop.errors import Reason, TrustError
from trusthop.spiffe import trust_domain_of
from trusthop.x509svid import validate_svid


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds enforced before any signature is checked.

    ``max_bytes`` counts characters of the encoded attribute; ``leeway`` is
    the clock skew in seconds tolerated on both ends of the time window;
    ``max_age``, when set, is how many seconds after the newest ring was
    signed a first delivery is still accepted (``expired`` beyond it, plus
    ``leeway``), however long the ring's own window is. A redelivery or a
    retry of an accepted message is judged at its first delivery's time (see
    :mod:`trusthop.replay`), so waiting in a queue never expires it.
    """

    max_bytes: int = 16 * 1024
    max_rings: int = 32
    leeway: int = 60
    max_age: int | None = None

    def __post_init__(self) -> None:
        if self.max_age is not None and self.max_age <= 0:
            raise ValueError("max_age must be a positive number of seconds (or None)")
        if self.leeway < 0:
            raise ValueError("leeway must not be negative")

    def accept_until(self, ring: Ring) -> int:
        """The last second a first delivery of ``ring`` is accepted (leeway included)."""
        end = ring.exp
        if self.max_age is not None:
            end = min(end, ring.iat + self.max_age)
        return end + self.leeway


@dataclass(frozen=True, slots=True)
class VerifiedContext:
    """What a handler may rely on after verification.

    ``scope`` is the effective (newest, narrowest) scope; ``actors`` is the
    path oldest first, the origin's edge actor included; ``chain`` is the
    decoded chain, which a derived event extends.
    """

    subject: str
    issuer: str
    transaction_id: str
    trust_domain: str
    scope: frozenset[str]
    actors: tuple[str, ...]
    destination: str
    expires_at: int
    chain: Chain
    event_id: str | None = None

    @property
    def chain_digest(self) -> bytes:
        """Hash of the newest ring: identifies this exact chain."""
        return self.chain.hashes()[-1]


def check_binding(
    ring: Ring, index: int, entry: BundleKey | None, bundle: TrustBundle, trust_domain: str
) -> BundleKey:
    """Key lookup, revocation and actor binding for one ring."""
    if entry is None:
        raise TrustError(
            Reason.UNKNOWN_KEY,
            f"ring {index}: key id {ring.kid!r} is not in the trust bundle",
            ring=index,
        )
    if entry.revoked:
        raise TrustError(Reason.REVOKED, f"ring {index}: key {ring.kid!r} is revoked", ring=index)
    if bundle.is_revoked_actor(ring.actor):
        raise TrustError(Reason.REVOKED, f"ring {index}: actor {ring.actor} is revoked", ring=index)
    if entry.retired_at is not None and ring.iat > entry.retired_at:
        raise TrustError(
            Reason.REVOKED,
            f"ring {index}: key {ring.kid!r} was retired at {entry.retired_at}, "
            f"the ring was signed later ({ring.iat})",
            ring=index,
        )
    if entry.actor != ring.actor:
        raise TrustError(
            Reason.UNAUTHORIZED_ACTOR,
            f"ring {index}: key {ring.kid!r} belongs to {entry.actor}, not {ring.actor}",
            ring=index,
        )
    if trust_domain_of(ring.actor) != trust_domain:
        raise TrustError(
            Reason.UNAUTHORIZED_ACTOR,
            f"ring {index}: actor {ring.actor} is outside trust domain {trust_domain}",
            ring=index,
        )
    return entry


def check_svid(ring: Ring, index: int, bundle: TrustBundle, trust_domain: str) -> BundleKey:
    """Key resolution for a ring carrying ``x5c``: the SVID's leaf key.

    Returns the bundle entry the signature step uses (the leaf key bound to
    the ring's actor); raises as listed in step 3 of the module docstring.
    """
    assert ring.x5c is not None
    try:
        spiffe_id, key = validate_svid(
            ring.x5c, authorities=bundle.x509_authorities(trust_domain), at=ring.iat
        )
    except TrustError as exc:
        raise TrustError(exc.reason, f"ring {index}: {exc.message}", ring=index) from None
    if spiffe_id != ring.actor:
        raise TrustError(
            Reason.UNAUTHORIZED_ACTOR,
            f"ring {index}: the certificate is an SVID of {spiffe_id}, not of {ring.actor}",
            ring=index,
        )
    if key.thumbprint != ring.kid:
        raise TrustError(
            Reason.BAD_CERTIFICATE,
            f"ring {index}: key id {ring.kid!r} is not the thumbprint of the certificate's key",
            ring=index,
        )
    entry = bundle.get(ring.kid)
    if entry is not None and entry.revoked:
        raise TrustError(Reason.REVOKED, f"ring {index}: key {ring.kid!r} is revoked", ring=index)
    if bundle.is_revoked_actor(ring.actor):
        raise TrustError(Reason.REVOKED, f"ring {index}: actor {ring.actor} is revoked", ring=index)
    if entry is not None and entry.retired_at is not None and ring.iat > entry.retired_at:
        raise TrustError(
            Reason.REVOKED,
            f"ring {index}: key {ring.kid!r} was retired at {entry.retired_at}, "
            f"the ring was signed later ({ring.iat})",
            ring=index,
        )
    if entry is not None and entry.actor != ring.actor:
        raise TrustError(
            Reason.UNAUTHORIZED_ACTOR,
            f"ring {index}: the bundle binds key {ring.kid!r} to {entry.actor}, not {ring.actor}",
            ring=index,
        )
    if trust_domain_of(ring.actor) != trust_domain:
        raise TrustError(
            Reason.UNAUTHORIZED_ACTOR,
            f"ring {index}: actor {ring.actor} is outside trust domain {trust_domain}",
            ring=index,
        )
    return BundleKey(ring.kid, ring.actor, key)


def check_narrowing(prev: Ring, ring: HopRing, index: int) -> None:
    """Monotonic narrowing: scope subset and window inside the previous ring's."""
    if not ring.scope <= prev.scope:
        extra = ", ".join(sorted(ring.scope - prev.scope))
        raise TrustError(
            Reason.SCOPE_ESCALATION,
            f"ring {index} adds scope not granted before it: {extra}",
            ring=index,
        )
    if ring.iat < prev.iat or ring.exp > prev.exp or ring.iat > ring.exp:
        raise TrustError(
            Reason.WINDOW_ESCALATION,
            f"ring {index} window [{ring.iat}, {ring.exp}] is not inside [{prev.iat}, {prev.exp}]",
            ring=index,
        )


def check_window(ring: Ring, now: float, leeway: int, max_age: int | None = None) -> None:
    """The newest ring's window, which nests inside all earlier windows, and
    the optional maximum age since it was signed.

    A clock that is not a finite number fails closed (``expired``).
    """
    if not math.isfinite(now):
        raise TrustError(Reason.EXPIRED, "the verifier's clock is not a finite time")
    if now > ring.exp + leeway:
        raise TrustError(Reason.EXPIRED, f"chain expired at {ring.exp} (now {int(now)})")
    if max_age is not None and now > ring.iat + max_age + leeway:
        raise TrustError(
            Reason.EXPIRED,
            f"event signed at {ring.iat} is older than the maximum age of {max_age}s "
            f"(now {int(now)})",
        )
    if now + leeway < ring.iat:
        raise TrustError(Reason.NOT_YET_VALID, f"chain is valid from {ring.iat} (now {int(now)})")


def check_keys(
    chain: Chain,
    bundle: TrustBundle,
    *,
    origin_actors: frozenset[str] | None = None,
    trust_domain: str | None = None,
) -> list[BundleKey]:
    """Step 3 of the module contract: every ring's key, oldest first."""
    origin = chain.origin
    if trust_domain is not None and origin.trust_domain != trust_domain:
        raise TrustError(
            Reason.UNAUTHORIZED_ACTOR,
            f"chain belongs to trust domain {origin.trust_domain}, expected {trust_domain}",
            ring=0,
        )
    if origin_actors is not None and origin.actor not in origin_actors:
        raise TrustError(
            Reason.UNAUTHORIZED_ACTOR,
            f"ring 0: {origin.actor} is not allowed to mint origin rings",
            ring=0,
        )
    domain = origin.trust_domain
    return [
        check_svid(ring, index, bundle, domain)
        if ring.x5c is not None
        else check_binding(ring, index, bundle.get(ring.kid), bundle, domain)
        for index, ring in enumerate(chain.rings)
    ]


def check_links(chain: Chain) -> None:
    """Step 5: every ring names its predecessor's hash and only narrows."""
    origin = chain.origin
    if origin.iat > origin.exp:
        raise TrustError(Reason.WINDOW_ESCALATION, "ring 0 window ends before it starts", ring=0)
    hashes = chain.hashes()
    prev: Ring = origin
    for index, hop in enumerate(chain.hops, start=1):
        if hop.prev_hash != hashes[index - 1]:
            raise TrustError(
                Reason.BROKEN_LINK,
                f"ring {index} does not name the hash of ring {index - 1}",
                ring=index,
            )
        check_narrowing(prev, hop, index)
        prev = hop


SignatureCheck = Callable[[Ring, bytes, BundleKey], bool]
"""``(ring, ring hash, bundle entry) -> verifies``; see :func:`verify_decoded`."""


def check_signature(ring: Ring, digest: bytes, entry: BundleKey) -> bool:
    """Verify ``ring``'s signature under ``entry``'s key (``digest`` unused)."""
    return entry.key.verify(ring.signature, ring.signing_input())


def verify_decoded(
    chain: Chain,
    *,
    bundle: TrustBundle,
    event_digest: bytes,
    destination: str,
    now: float,
    limits: Limits = Limits(),
    event_id: str | None = None,
    origin_actors: frozenset[str] | None = None,
    trust_domain: str | None = None,
    signature_check: SignatureCheck = check_signature,
) -> VerifiedContext:
    """Verify an already decoded chain (see :func:`verify_chain`).

    ``signature_check`` lets a caller skip signatures it has already verified
    (:class:`~trusthop.sigcache.SignatureCache`); it gets each ring, its hash
    (which covers the signature) and its bundle entry, and must return the
    same answer as :func:`check_signature` for every ring it is asked about.
    """
    newest = chain.newest
    if not isinstance(newest, HopRing):
        # Structure (step 2) comes before any key lookup (step 3).
        raise TrustError(Reason.MALFORMED, "chain has an origin ring but no hop ring")
    entries = check_keys(chain, bundle, origin_actors=origin_actors, trust_domain=trust_domain)
    # Signatures before any rule about the rings' contents: a reason such as
    # scope_escalation then always names what a real key really signed.
    hashes = chain.hashes()
    for index, (ring, entry) in enumerate(zip(chain.rings, entries, strict=True)):
        if not signature_check(ring, hashes[index], entry):
            raise TrustError(
                Reason.BAD_SIGNATURE, f"ring {index}: signature does not verify", ring=index
            )
    check_links(chain)
    if newest.event_digest != event_digest:
        raise TrustError(
            Reason.EVENT_MISMATCH,
            "the event does not match the digest signed by the newest ring",
            ring=len(chain.hops),
        )
    if newest.destination != destination:
        raise TrustError(
            Reason.WRONG_DESTINATION,
            f"signed for {newest.destination!r} but consumed from {destination!r}",
            ring=len(chain.hops),
        )
    check_window(newest, now, limits.leeway, limits.max_age)
    origin: OriginRing = chain.origin
    return VerifiedContext(
        subject=origin.subject,
        issuer=origin.issuer,
        transaction_id=origin.transaction_id,
        trust_domain=origin.trust_domain,
        scope=newest.scope,
        actors=tuple(r.actor for r in chain.rings),
        destination=destination,
        expires_at=newest.exp,
        chain=chain,
        event_id=event_id,
    )


def unverified_context(
    chain: Chain, *, destination: str, event_id: str | None = None
) -> VerifiedContext:
    """The context a chain *would* give if it verified — for explaining only.

    Nothing is checked: no key, signature, link, digest or time. Tools such as
    ``trusthop policy explain`` without a bundle use it to show what a policy
    would decide; never hand it to a handler.
    """
    newest = chain.newest
    return VerifiedContext(
        subject=chain.origin.subject,
        issuer=chain.origin.issuer,
        transaction_id=chain.origin.transaction_id,
        trust_domain=chain.origin.trust_domain,
        scope=newest.scope,
        actors=tuple(r.actor for r in chain.rings),
        destination=destination,
        expires_at=newest.exp,
        chain=chain,
        event_id=event_id,
    )


def verify_chain(
    encoded: str | None,
    *,
    bundle: TrustBundle,
    event_digest: bytes,
    destination: str,
    now: float,
    limits: Limits = Limits(),
    event_id: str | None = None,
    origin_actors: frozenset[str] | None = None,
    trust_domain: str | None = None,
) -> VerifiedContext:
    """Verify a ``trustchain`` attribute against the event it arrived with.

    ``origin_actors``, when given, is the set of edge workloads allowed to
    mint origin rings; ``trust_domain``, when given, the only trust domain
    accepted. Without them any bundled actor of any bundled trust domain may
    start a chain.

    Raises:
        TrustError: with the reason of the first failed check (module docstring
            gives the order); ``missing_chain`` when ``encoded`` is ``None``.
    """
    if encoded is None:
        raise TrustError(Reason.MISSING_CHAIN, "the event carries no trustchain attribute")
    chain = decode_chain(encoded, max_bytes=limits.max_bytes, max_rings=limits.max_rings)
    return verify_decoded(
        chain,
        bundle=bundle,
        event_digest=event_digest,
        destination=destination,
        now=now,
        limits=limits,
        event_id=event_id,
        origin_actors=origin_actors,
        trust_domain=trust_domain,
    )
