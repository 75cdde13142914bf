"""Signing rings: the producer side of the core (no I/O).

An :class:`Identity` is one workload's signing identity (SPIFFE ID, key id,
private key, and optionally its X.509-SVID certificate chain).
:func:`mint_origin` turns an authenticated request into an origin ring;
:func:`append_hop` extends a chain for a published event. Both refuse, with
the same reason codes a verifier would give, to sign something a verifier
would reject (wider scope, longer window, foreign trust domain, a
certificate not valid at the ring's signing time).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trusthop.bundle import BundleKey
from trusthop.chain import Chain, OriginRing
from trusthop.errors import Reason, TrustError
from trusthop.keys import SigningKey
from trusthop.rings import (
    HOP_DOMAIN,
    MAX_SCOPE_ENTRIES,
    MAX_TIME,
    ORIGIN_DOMAIN,
    hop_body_of,
    new_hop_ring,
    origin_body,
    scope_problem,
    text_problem,
)
from trusthop.spiffe import trust_domain_of, validate_spiffe_id
from trusthop.verify import check_scope
from trusthop.x509svid import certificate_window, check_leaf, load_chain

DEFAULT_ORIGIN_TTL = 24 * 3600
DEFAULT_HOP_TTL = 24 * 3600


@dataclass(frozen=True, slots=True)
class Identity:
    """A workload's signing identity: its SPIFFE ID, key id and private key.

    With ``certificates`` (its X.509-SVID chain: DER, leaf first, then the
    intermediates, never the root) every ring it signs carries the chain
    (field ``x5c``) and verifiers take the key from the certificate, checked
    against the trust domain's X.509 authorities, instead of from a bundle
    key. The leaf must then be an SVID of ``actor`` for ``key``, and ``kid``
    the key's RFC 7638 thumbprint (see :meth:`from_svid`).

    Raises:
        ValueError: an invalid SPIFFE ID; with ``certificates``, a chain that
            is not an X.509-SVID of ``actor`` for ``key`` (see above), holds
            more than four certificates or a self-signed root.
    """

    actor: str
    key: SigningKey
    kid: str
    certificates: tuple[bytes, ...] = ()
    _window: tuple[int, int] | None = field(default=None, init=False, repr=False, compare=False)
    _domain: str = field(default="", init=False, repr=False, compare=False)
    _prefix: str = field(default="", init=False, repr=False, compare=False)
    _key_tag: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        validate_spiffe_id(self.actor)
        domain = trust_domain_of(self.actor)
        object.__setattr__(self, "_domain", domain)
        object.__setattr__(self, "_prefix", f"spiffe://{domain}/")
        key_tag = None if self.certificates else self.key.public_key.key_tag
        object.__setattr__(self, "_key_tag", key_tag)
        if self.certificates:
            object.__setattr__(self, "_window", _check_svid_identity(self))

    @classmethod
    def create(
        cls,
        actor: str,
        key: SigningKey,
        *,
        kid: str | None = None,
        certificates: Iterable[bytes] = (),
    ) -> Identity:
        """``kid`` defaults to the key's RFC 7638 thumbprint."""
        return cls(actor, key, kid or key.public_key.thumbprint, tuple(certificates))

    @classmethod
    def from_svid(cls, cert_chain_pem: bytes, key_pem: bytes) -> Identity:
        """The identity of an X.509-SVID: PEM certificates (leaf first, then
        intermediates) and the PEM private key of the leaf.

        The actor is the leaf's SPIFFE ID, the key id the key's thumbprint.

        Raises:
            ValueError: no certificate, a key that is not Ed25519 or P-256 or
                not the leaf's, or a leaf that is not an X.509-SVID.
        """
        certs = x509.load_pem_x509_certificates(cert_chain_pem)
        key = SigningKey.from_pem(key_pem)
        try:
            actor, _ = check_leaf(certs[0])
        except TrustError as exc:
            raise ValueError(exc.message) from None
        ders = tuple(c.public_bytes(serialization.Encoding.DER) for c in certs)
        return cls(actor, key, key.public_key.thumbprint, ders)

    @classmethod
    def from_svid_files(cls, cert_path: str | Path, key_path: str | Path) -> Identity:
        """:meth:`from_svid` of the files an SVID helper writes (spiffe-helper:
        ``svid.pem`` with the leaf and intermediates, ``svid_key.pem``).

        Read once: build a new identity when the helper rotates the SVID.

        Raises:
            OSError: a file cannot be read.
            ValueError: as :meth:`from_svid`.
        """
        return cls.from_svid(Path(cert_path).read_bytes(), Path(key_path).read_bytes())

    @property
    def x5c(self) -> tuple[bytes, ...] | None:
        """What rings signed by this identity carry as ``x5c``."""
        return self.certificates or None

    @property
    def trust_domain(self) -> str:
        """The trust domain of :attr:`actor`."""
        return self._domain

    @property
    def key_tag(self) -> int | None:
        """What rings signed by this identity name their key by (``None``
        with certificates: the key is the leaf's)."""
        return self._key_tag

    def check_certificates(self, at: int) -> None:
        """Refuse to sign at ``at`` outside the validity of every certificate.

        Raises:
            TrustError(bad_certificate): as a verifier would (the SVID rotated
                or expired: build a new identity from the new files).
        """
        if self._window is None:
            return
        not_before, not_after = self._window
        if not not_before <= at <= not_after:
            raise TrustError(
                Reason.BAD_CERTIFICATE,
                f"the certificate chain of {self.actor} is valid from {not_before} "
                f"to {not_after}, not at {at}",
            )

    @property
    def bundle_key(self) -> BundleKey:
        """The bundle entry that binds this identity's public key to its actor."""
        return BundleKey(self.kid, self.actor, self.key.public_key)


def _check_svid_identity(identity: Identity) -> tuple[int, int]:
    """Producer-side SVID rules; the chain's validity interval."""
    chain = identity.certificates
    if not isinstance(chain, tuple) or not all(isinstance(c, bytes) for c in chain):
        raise ValueError("certificates must be a tuple of DER certificates (bytes)")
    try:
        certs = load_chain(chain)
        spiffe_id, key = check_leaf(certs[0])
        window = certificate_window(chain)
    except TrustError as exc:
        raise ValueError(exc.message) from None
    if spiffe_id != identity.actor:
        raise ValueError(f"the certificate is an SVID of {spiffe_id}, not of {identity.actor}")
    if key != identity.key.public_key:
        raise ValueError("the private key is not the key of the leaf certificate")
    if identity.kid != key.thumbprint:
        raise ValueError(
            f"key id {identity.kid!r} must be the leaf key's thumbprint {key.thumbprint!r}"
        )
    for cert in certs[1:]:
        if cert.subject == cert.issuer:
            raise ValueError(
                "the certificate chain must not include a self-signed root "
                "(leaf and intermediates only)"
            )
    return window


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
    problem = scope_problem(sorted(out))
    if problem is not None:
        raise TrustError(Reason.MALFORMED, f"scope {problem}")
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
    iat = int(now)
    if not 0 <= iat < MAX_TIME or not 0 <= ttl < MAX_TIME:
        raise ValueError(f"now and ttl must be seconds in [0, 2**40), not {now!r} and {ttl!r}")
    identity.check_certificates(iat)
    ring = OriginRing(
        actor=identity.actor,
        key_tag=identity.key_tag,
        iat=iat,
        exp=iat + ttl,
        scope=_scope(scope),
        subject=subject,
        issuer=issuer,
        credential_hash=hash_credential(credential),
        transaction_id=transaction_id or str(uuid.uuid4()),
        acr=acr,
        amr=tuple(amr) if amr is not None else None,
        x5c=identity.x5c,
    )
    for what, value in (
        ("subject", subject),
        ("issuer", issuer),
        ("transaction id", ring.transaction_id),
        ("acr", acr),
        *(("amr entry", m) for m in ring.amr or ()),
    ):
        if value is not None:
            _require_text(what, value, 0)
    body = origin_body(ring)
    return replace(ring, signature=identity.key.sign(ORIGIN_DOMAIN + body))


def _require_text(what: str, value: str, index: int) -> None:
    """The decoder's text rule, applied before signing.

    Raises:
        TrustError(malformed): naming the field.
    """
    problem = text_problem(value)
    if problem is not None:
        raise TrustError(Reason.MALFORMED, f"ring {index}: {what} {problem}", ring=index)


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
    hops = chain.hops
    prev = hops[-1] if hops else chain.origin
    domain = identity._domain
    if not chain.origin.actor.startswith(identity._prefix):
        raise TrustError(
            Reason.UNAUTHORIZED_ACTOR,
            f"{identity.actor} is outside trust domain {chain.origin.trust_domain}",
        )
    iat = int(now)
    if iat < prev.iat:
        iat = prev.iat
    exp = iat + ttl
    if exp > prev.exp:
        exp = prev.exp
    if exp < iat:
        raise TrustError(Reason.EXPIRED, f"the parent chain expired at {prev.exp}")
    if identity.certificates:
        identity.check_certificates(iat)
    index = len(hops) + 1
    if text_problem(destination) is not None:
        _require_text("destination", destination, index)
    if consumed_event_id is not None:
        _require_text("consumed event id", consumed_event_id, index)
    if peer is not None:
        _require_text("peer", peer, index)
    if type(event_digest) is not bytes or len(event_digest) != 32:
        raise TrustError(Reason.MALFORMED, f"ring {index}: event digest must be 32 bytes")
    new_scope = prev.scope if scope is None else _scope(scope)
    check_scope(prev, new_scope, index)  # the window narrows by construction
    prev_hash = chain.hash_at(-1)
    actor, key_tag, x5c = identity.actor, identity._key_tag, identity.x5c
    body = hop_body_of(
        actor,
        key_tag,
        iat,
        exp,
        new_scope,
        event_digest,
        destination,
        consumed_event_id,
        peer,
        x5c,
        prev=prev,
        trust_domain=domain,
        prev_hash=prev_hash,
    )
    signature = identity.key.sign(HOP_DOMAIN + prev_hash + body)
    hop = new_hop_ring(
        actor,
        key_tag,
        iat,
        exp,
        new_scope,
        event_digest,
        destination,
        consumed_event_id,
        peer,
        signature,
        x5c,
    )
    return chain.appended(hop, body)
