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

   * without ``x5c``: the actor's key with the ring's key tag
     (``unknown_key``), revocation of the key, the actor or its segment, or
     a ring signed after its key was retired (``revoked``);
   * with ``x5c`` (an X.509-SVID, :mod:`trusthop.x509svid`): the chain
     validates to the X.509 authorities of the origin's trust domain at the
     ring's ``iat`` (``bad_certificate``), its SPIFFE ID is the ring's actor
     (``unauthorized_actor``), no bundle entry of its key is revoked or
     retired before ``iat`` and the actor and its segment are not revoked
     (``revoked``), a bundle entry of its key binds no other actor
     (``unauthorized_actor``);
4. every signature, oldest first (``bad_signature``; ``broken_link`` when
   the ring's link tag shows it was signed after another ring than the one
   before it: a ring removed, reordered, replaced or spliced);
5. links and narrowing, oldest first: a signed link tag that is not the
   previous ring's (``broken_link``), ``scope_escalation``,
   ``window_escalation``;
6. the newest ring against the delivery: event digest (``event_mismatch``),
   destination (``wrong_destination``), time (``expired``,
   ``not_yet_valid``).

Signatures come before every rule about what the rings say, so a content
reason (``scope_escalation``, ``window_escalation``...) always describes what
real keys signed; an unsigned edit is ``bad_signature`` (or ``broken_link``
when it changed a link tag).

A :class:`VerifiedPrefix` lets a caller that verified the leading rings of
a chain before (:class:`~trusthop.sigcache.SignatureCache`) skip their
signatures, links and narrowing: they are bound to the new chain by its
ring bytes. Their keys are judged again unless the bundle is the very one
they were judged against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trusthop.bundle import BundleKey, TrustBundle
from trusthop.chain import Chain, HopRing, OriginRing, Ring, decode_chain
from trusthop.errors import Reason, TrustError
from trusthop.rings import link_tag, positional_constructor
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
        return self.chain.hash_at(-1)


_verified_context = positional_constructor(VerifiedContext)


@dataclass(frozen=True, slots=True)
class VerifiedPrefix:
    """The first ``len(keys)`` rings of a chain verified before: their
    signatures under ``keys``, their links and narrowing; ``bundle`` is the
    bundle their keys were last judged against."""

    keys: tuple[BundleKey, ...]
    bundle: TrustBundle


def _key_name(ring: Ring) -> str:
    return f"key tag {ring.key_tag:#06x} of {ring.actor}"


def check_bundle_key(ring: Ring, index: int, bundle: TrustBundle) -> BundleKey:
    """Key lookup and revocation for a ring without ``x5c``."""
    assert ring.key_tag is not None
    entry = bundle.key_for(ring.actor, ring.key_tag)
    if entry is None:
        raise TrustError(
            Reason.UNKNOWN_KEY,
            f"ring {index}: the trust bundle holds no {_key_name(ring)}",
            ring=index,
        )
    if entry.revoked:
        raise TrustError(
            Reason.REVOKED,
            f"ring {index}: {_key_name(ring)} ({entry.kid!r}) is revoked",
            ring=index,
        )
    if bundle.is_revoked_actor(ring.actor):
        raise TrustError(Reason.REVOKED, f"ring {index}: actor {ring.actor} is revoked", ring=index)
    if entry.retired_at is not None and ring.iat > entry.retired_at:
        raise TrustError(
            Reason.REVOKED,
            f"ring {index}: key {entry.kid!r} was retired at {entry.retired_at}, "
            f"the ring was signed later ({ring.iat})",
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
    entry = bundle.entry_of(key)
    kid = entry.kid if entry is not None else key.thumbprint
    if entry is not None and entry.revoked:
        raise TrustError(Reason.REVOKED, f"ring {index}: key {kid!r} is revoked", ring=index)
    if bundle.is_revoked_actor(ring.actor):
        raise TrustError(Reason.REVOKED, f"ring {index}: actor {ring.actor} is revoked", ring=index)
    if entry is not None and entry.retired_at is not None and ring.iat > entry.retired_at:
        raise TrustError(
            Reason.REVOKED,
            f"ring {index}: key {kid!r} was retired at {entry.retired_at}, "
            f"the ring was signed later ({ring.iat})",
            ring=index,
        )
    if entry is not None and entry.actor != ring.actor:
        raise TrustError(
            Reason.UNAUTHORIZED_ACTOR,
            f"ring {index}: the bundle binds key {kid!r} to {entry.actor}, not {ring.actor}",
            ring=index,
        )
    return BundleKey(kid, ring.actor, key)


def check_scope(prev: Ring, scope: frozenset[str], index: int) -> None:
    """Monotonic narrowing of scope: ring ``index``'s is a subset of ``prev``'s."""
    if scope is not prev.scope and not scope <= prev.scope:
        extra = ", ".join(sorted(scope - prev.scope))
        raise TrustError(
            Reason.SCOPE_ESCALATION,
            f"ring {index} adds scope not granted before it: {extra}",
            ring=index,
        )


def check_narrowing(prev: Ring, ring: HopRing, index: int) -> None:
    """Monotonic narrowing: scope subset and window inside the previous ring's."""
    check_scope(prev, ring.scope, index)
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


def check_origin(
    origin: OriginRing,
    *,
    origin_actors: frozenset[str] | None = None,
    trust_domain: str | None = None,
) -> None:
    """The verifier's own requirements on ring 0 (step 3, first part)."""
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


def _ring_keys(rings: tuple[Ring, ...], bundle: TrustBundle, start: int) -> list[BundleKey]:
    out = []
    for index in range(start, len(rings)):
        ring = rings[index]
        if ring.x5c is None:
            out.append(check_bundle_key(ring, index, bundle))
        else:
            out.append(check_svid(ring, index, bundle, rings[0].actor[9:].partition("/")[0]))
    return out


def check_signature(chain: Chain, index: int, entry: BundleKey) -> None:
    """Step 4 for ring ``index``: its signature under ``entry``'s key.

    Raises:
        TrustError: ``broken_link`` when the signature fails and the ring's
            link tag names another previous ring, else ``bad_signature``.
    """
    ring = chain.origin if index == 0 else chain.hops[index - 1]
    if entry.key.verify(ring.signature, chain.signing_input(index)):
        return
    if index and chain.link_tags[index] != link_tag(chain.hash_at(index - 1)):
        raise TrustError(
            Reason.BROKEN_LINK,
            f"ring {index} was signed after another ring than ring {index - 1}",
            ring=index,
        )
    raise TrustError(Reason.BAD_SIGNATURE, f"ring {index}: signature does not verify", ring=index)


def _check_links(chain: Chain, rings: tuple[Ring, ...], start: int) -> None:
    tags = chain.link_tags
    hashes = chain.hashes()
    for index in range(max(start, 1), len(rings)):
        hop = rings[index]
        assert isinstance(hop, HopRing)
        if tags[index] != link_tag(hashes[index - 1]):
            raise TrustError(
                Reason.BROKEN_LINK,
                f"ring {index} names another previous ring than ring {index - 1}",
                ring=index,
            )
        check_narrowing(rings[index - 1], hop, index)


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
    verified: VerifiedPrefix | None = None,
    check_signatures: bool = True,
) -> VerifiedContext:
    """Verify an already decoded chain (see :func:`verify_chain`).

    ``verified`` names leading rings verified before (module docstring);
    ``check_signatures=False`` skips every signature, for a chain whose
    newest ring's hash (which covers every ring's bytes) the caller accepted
    before (:mod:`trusthop.admission`): keys, links, narrowing and the
    delivery are still checked.
    """
    return verify_with_keys(
        chain,
        bundle=bundle,
        event_digest=event_digest,
        destination=destination,
        now=now,
        limits=limits,
        event_id=event_id,
        origin_actors=origin_actors,
        trust_domain=trust_domain,
        verified=verified,
        check_signatures=check_signatures,
    )[0]


def verify_with_keys(
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
    verified: VerifiedPrefix | None = None,
    check_signatures: bool = True,
) -> tuple[VerifiedContext, list[BundleKey]]:
    """:func:`verify_decoded`, also returning the bundle entry each ring's
    signature is checked under (what a cache of verified prefixes records)."""
    origin = chain.origin
    hops = chain.hops
    if not hops:
        # Structure (step 2) comes before any key lookup (step 3).
        raise TrustError(Reason.MALFORMED, "chain has an origin ring but no hop ring")
    rings: tuple[Ring, ...] = (origin, *hops)
    newest = hops[-1]
    if origin_actors is not None or trust_domain is not None:
        check_origin(origin, origin_actors=origin_actors, trust_domain=trust_domain)
    known = 0
    if verified is not None and len(verified.keys) <= len(rings):
        known = len(verified.keys)
        if verified.bundle is bundle:
            entries = list(verified.keys)
            entries += _ring_keys(rings, bundle, known)
        else:
            entries = _ring_keys(rings, bundle, 0)
            # A ring verified under another key than the one now bundled is not known.
            for index in range(known):
                if entries[index].key != verified.keys[index].key:
                    known = index
                    break
    else:
        entries = _ring_keys(rings, bundle, 0)
    # Signatures before any rule about the rings' contents: a reason such as
    # scope_escalation then always names what a real key really signed.
    if check_signatures:
        for index in range(known, len(rings)):
            check_signature(chain, index, entries[index])
    _check_links(chain, rings, known)
    if newest.event_digest != event_digest:
        raise TrustError(
            Reason.EVENT_MISMATCH,
            "the event does not match the digest signed by the newest ring",
            ring=len(rings) - 1,
        )
    if newest.destination != destination:
        raise TrustError(
            Reason.WRONG_DESTINATION,
            f"signed for {newest.destination!r} but consumed from {destination!r}",
            ring=len(rings) - 1,
        )
    check_window(newest, now, limits.leeway, limits.max_age)
    context: VerifiedContext = _verified_context(
        origin.subject,
        origin.issuer,
        origin.transaction_id,
        origin.trust_domain,
        newest.scope,
        tuple([r.actor for r in rings]),
        destination,
        newest.exp,
        chain,
        event_id,
    )
    return context, entries


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
