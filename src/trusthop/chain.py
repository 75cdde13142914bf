"""The trust chain model and its wire encoding (no I/O, no verification).

A chain is an origin ring followed by hop rings. On the wire it is the
CloudEvents extension attribute ``trustchain``: unpadded base64url of the
canonical msgpack array ``[1, ring0, ring1, ...]``, each ring a map with small
integer keys. ``docs/wire-format.md`` is the normative description; the key
numbers below are part of it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from typing import Any

from trusthop.canonical import EncodingError, b64url_decode, b64url_encode, pack, unpack_canonical
from trusthop.errors import Reason, TrustError
from trusthop.spiffe import validate_spiffe_id, validate_trust_domain

WIRE_VERSION = 1

# Map keys shared by both ring kinds.
K_SIG, K_ACTOR, K_KID, K_IAT, K_EXP, K_SCOPE = 0, 1, 2, 3, 4, 5
K_X5C = 6  # optional: the signer's X.509-SVID chain (DER, leaf first)
# Origin ring keys.
K_SUBJECT, K_ISSUER, K_CRED_HASH, K_TXN, K_TRUST_DOMAIN, K_ACR, K_AMR = 10, 11, 12, 13, 14, 15, 16
# Hop ring keys.
K_PREV, K_EVENT, K_DEST, K_CONSUMED, K_PEER = 20, 21, 22, 23, 24

_COMMON_KEYS = frozenset({K_SIG, K_ACTOR, K_KID, K_IAT, K_EXP, K_SCOPE})
_ORIGIN_REQUIRED = _COMMON_KEYS | {K_SUBJECT, K_ISSUER, K_CRED_HASH, K_TXN, K_TRUST_DOMAIN}
_ORIGIN_ALLOWED = _ORIGIN_REQUIRED | {K_ACR, K_AMR, K_X5C}
_HOP_REQUIRED = _COMMON_KEYS | {K_PREV, K_EVENT, K_DEST}
_HOP_ALLOWED = _HOP_REQUIRED | {K_CONSUMED, K_PEER, K_X5C}

ORIGIN_DOMAIN = b"trusthop/v1/origin\x00"
HOP_DOMAIN = b"trusthop/v1/hop\x00"
RING_HASH_DOMAIN = b"trusthop/v1/ring\x00"

MAX_SCOPE_ENTRIES = 64
MAX_TEXT = 1024
MAX_X5C_CERTS = 4
MAX_X5C_CERT_BYTES = 4096
_MAX_TIME = 2**40  # seconds since the epoch; far beyond any real window


@dataclass(frozen=True, slots=True)
class OriginRing:
    """Ring 0: who the work is for, minted by the edge actor.

    ``credential_hash`` is the SHA-256 of the original credential (the user's
    token); the credential itself is never part of a ring. ``x5c``, when
    set, is the signer's X.509-SVID chain (DER certificates, leaf first,
    no root): the ring's key is then the leaf's, not a bundle key.
    """

    actor: str
    kid: str
    iat: int
    exp: int
    scope: frozenset[str]
    subject: str
    issuer: str
    credential_hash: bytes
    transaction_id: str
    trust_domain: str
    acr: str | None = None
    amr: tuple[str, ...] | None = None
    signature: bytes = b""
    x5c: tuple[bytes, ...] | None = None

    def fields(self) -> dict[int, Any]:
        """The signed map (everything but the signature)."""
        out: dict[int, Any] = {
            K_ACTOR: self.actor,
            K_KID: self.kid,
            K_IAT: self.iat,
            K_EXP: self.exp,
            K_SCOPE: sorted(self.scope),
            K_SUBJECT: self.subject,
            K_ISSUER: self.issuer,
            K_CRED_HASH: self.credential_hash,
            K_TXN: self.transaction_id,
            K_TRUST_DOMAIN: self.trust_domain,
        }
        if self.acr is not None:
            out[K_ACR] = self.acr
        if self.amr is not None:
            out[K_AMR] = list(self.amr)
        if self.x5c is not None:
            out[K_X5C] = list(self.x5c)
        return out

    def signing_input(self) -> bytes:
        return ORIGIN_DOMAIN + pack(self.fields())


@dataclass(frozen=True, slots=True)
class HopRing:
    """Ring i>0: an actor published ``event_digest`` to ``destination``.

    ``x5c`` as for :class:`OriginRing`.
    """

    actor: str
    kid: str
    iat: int
    exp: int
    scope: frozenset[str]
    prev_hash: bytes
    event_digest: bytes
    destination: str
    consumed_event_id: str | None = None
    peer: str | None = None
    signature: bytes = b""
    x5c: tuple[bytes, ...] | None = None

    def fields(self) -> dict[int, Any]:
        out: dict[int, Any] = {
            K_ACTOR: self.actor,
            K_KID: self.kid,
            K_IAT: self.iat,
            K_EXP: self.exp,
            K_SCOPE: sorted(self.scope),
            K_PREV: self.prev_hash,
            K_EVENT: self.event_digest,
            K_DEST: self.destination,
        }
        if self.consumed_event_id is not None:
            out[K_CONSUMED] = self.consumed_event_id
        if self.peer is not None:
            out[K_PEER] = self.peer
        if self.x5c is not None:
            out[K_X5C] = list(self.x5c)
        return out

    def signing_input(self) -> bytes:
        return HOP_DOMAIN + pack(self.fields())


Ring = OriginRing | HopRing


def ring_map(ring: Ring) -> dict[int, Any]:
    """The ring as it is encoded on the wire (signed fields plus signature)."""
    return ring.fields() | {K_SIG: ring.signature}


def ring_hash(ring: Ring) -> bytes:
    """SHA-256 of the ring's canonical encoding, signature included."""
    return hashlib.sha256(RING_HASH_DOMAIN + pack(ring_map(ring))).digest()


@dataclass(frozen=True, slots=True)
class Chain:
    """An origin ring and the hop rings after it, oldest first."""

    origin: OriginRing
    hops: tuple[HopRing, ...] = ()
    # Not an __init__ argument, so dataclasses.replace() never carries the
    # cache of one chain over to another chain with as many rings.
    _hashes: list[bytes] = field(default_factory=list, init=False, compare=False, repr=False)

    @property
    def rings(self) -> tuple[Ring, ...]:
        return (self.origin, *self.hops)

    @property
    def newest(self) -> Ring:
        return self.hops[-1] if self.hops else self.origin

    def hashes(self) -> list[bytes]:
        """Ring hashes, oldest first (computed once per chain object)."""
        if len(self._hashes) != len(self.hops) + 1:
            self._hashes[:] = [ring_hash(r) for r in self.rings]
        return self._hashes

    def appended(self, hop: HopRing) -> Chain:
        return Chain(self.origin, (*self.hops, hop))

    def encode(self) -> str:
        """The ``trustchain`` attribute value."""
        return b64url_encode(pack([WIRE_VERSION, *(ring_map(r) for r in self.rings)]))


def _fail(message: str, ring: int | None = None) -> TrustError:
    return TrustError(Reason.MALFORMED, message, ring=ring)


# Control characters and line/paragraph separators: ring text ends up in logs,
# terminals and decision records, where they could forge lines.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _text(m: dict[Any, Any], key: int, index: int, what: str) -> str:
    value = m[key]
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        raise _fail(f"ring {index}: {what} must be a non-empty string", index)
    if _UNPRINTABLE.search(value):
        raise _fail(f"ring {index}: {what} contains control or line-separator characters", index)
    return value


def _hash(m: dict[Any, Any], key: int, index: int, what: str) -> bytes:
    value = m[key]
    if not isinstance(value, bytes) or len(value) != 32:
        raise _fail(f"ring {index}: {what} must be 32 bytes", index)
    return value


def _time(m: dict[Any, Any], key: int, index: int, what: str) -> int:
    value = m[key]
    if type(value) is not int or not 0 <= value < _MAX_TIME:
        raise _fail(f"ring {index}: {what} must be an integer in [0, 2**40)", index)
    return value


def _actor(m: dict[Any, Any], index: int) -> str:
    actor = _text(m, K_ACTOR, index, "actor")
    try:
        validate_spiffe_id(actor)
    except ValueError as exc:
        raise _fail(f"ring {index}: actor is not a SPIFFE ID ({exc})", index) from exc
    return actor


def _scope(m: dict[Any, Any], index: int) -> frozenset[str]:
    value = m[K_SCOPE]
    if not isinstance(value, list) or len(value) > MAX_SCOPE_ENTRIES:
        raise _fail(f"ring {index}: scope must be a list of at most {MAX_SCOPE_ENTRIES}", index)
    for item in value:
        if not isinstance(item, str) or not item or len(item) > 256:
            raise _fail(
                f"ring {index}: scope entries must be strings of 1 to 256 characters", index
            )
    if value != sorted(set(value)):
        raise _fail(f"ring {index}: scope must be sorted and without duplicates", index)
    return frozenset(value)


def _signature(m: dict[Any, Any], index: int) -> bytes:
    value = m[K_SIG]
    if not isinstance(value, bytes) or len(value) != 64:
        raise _fail(f"ring {index}: signature must be 64 bytes", index)
    return value


def _x5c(m: dict[Any, Any], index: int) -> tuple[bytes, ...] | None:
    """Shape only; the certificates themselves are judged with the keys."""
    if K_X5C not in m:
        return None
    value = m[K_X5C]
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= MAX_X5C_CERTS
        or not all(isinstance(c, bytes) and 0 < len(c) <= MAX_X5C_CERT_BYTES for c in value)
    ):
        raise _fail(
            f"ring {index}: x5c must be a list of 1 to {MAX_X5C_CERTS} certificates "
            f"of 1 to {MAX_X5C_CERT_BYTES} bytes",
            index,
        )
    return tuple(value)


def _keys(m: Any, index: int, required: frozenset[int], allowed: frozenset[int]) -> dict[Any, Any]:
    if not isinstance(m, dict):
        raise _fail(f"ring {index}: not a map", index)
    if not all(type(k) is int for k in m):
        # True (and 1.0) compare and hash equal to 1: only real integers are field keys.
        raise _fail(f"ring {index}: field keys must be integers", index)
    keys = set(m)
    if not keys <= allowed:
        raise _fail(f"ring {index}: unknown field(s) {sorted(map(repr, keys - allowed))}", index)
    if not required <= keys:
        raise _fail(f"ring {index}: missing field(s) {sorted(required - keys)}", index)
    return m


def _origin(m: Any) -> OriginRing:
    m = _keys(m, 0, _ORIGIN_REQUIRED, _ORIGIN_ALLOWED)
    domain = _text(m, K_TRUST_DOMAIN, 0, "trust domain")
    try:
        validate_trust_domain(domain)
    except ValueError as exc:
        # Every actor's trust domain is compared with it: anything else could
        # never verify, and would only reach rejection messages and logs.
        raise _fail(f"ring 0: trust domain is not a trust domain name ({exc})", 0) from exc
    acr = _text(m, K_ACR, 0, "acr") if K_ACR in m else None
    amr = None
    if K_AMR in m:
        raw = m[K_AMR]
        if (
            not isinstance(raw, list)
            or len(raw) > 16
            or not all(isinstance(x, str) and 0 < len(x) <= 64 for x in raw)
        ):
            raise _fail("ring 0: amr must be a short list of strings", 0)
        amr = tuple(raw)
    return OriginRing(
        actor=_actor(m, 0),
        kid=_text(m, K_KID, 0, "key id"),
        iat=_time(m, K_IAT, 0, "iat"),
        exp=_time(m, K_EXP, 0, "exp"),
        scope=_scope(m, 0),
        subject=_text(m, K_SUBJECT, 0, "subject"),
        issuer=_text(m, K_ISSUER, 0, "issuer"),
        credential_hash=_hash(m, K_CRED_HASH, 0, "credential hash"),
        transaction_id=_text(m, K_TXN, 0, "transaction id"),
        trust_domain=domain,
        acr=acr,
        amr=amr,
        signature=_signature(m, 0),
        x5c=_x5c(m, 0),
    )


def _hop(m: Any, index: int) -> HopRing:
    m = _keys(m, index, _HOP_REQUIRED, _HOP_ALLOWED)
    peer = None
    if K_PEER in m:
        peer = _text(m, K_PEER, index, "peer")
    return HopRing(
        actor=_actor(m, index),
        kid=_text(m, K_KID, index, "key id"),
        iat=_time(m, K_IAT, index, "iat"),
        exp=_time(m, K_EXP, index, "exp"),
        scope=_scope(m, index),
        prev_hash=_hash(m, K_PREV, index, "previous ring hash"),
        event_digest=_hash(m, K_EVENT, index, "event digest"),
        destination=_text(m, K_DEST, index, "destination"),
        consumed_event_id=_text(m, K_CONSUMED, index, "consumed event id")
        if K_CONSUMED in m
        else None,
        peer=peer,
        signature=_signature(m, index),
        x5c=_x5c(m, index),
    )


def check_ring_fields(ring: Ring, index: int) -> None:
    """Apply the decoder's field rules to a ring about to be signed.

    Signers call this so they never produce a ring every verifier would
    refuse (over-long strings, too many scope entries, bad SPIFFE IDs).

    Raises:
        TrustError(malformed): naming the field.
    """
    fields = ring_map(replace(ring, signature=b"\0" * 64))
    if isinstance(ring, OriginRing):
        _origin(fields)
    else:
        _hop(fields, index)


def _array_length(data: bytes) -> int:
    """Number of elements announced by the msgpack array header at ``data[0]``."""
    if not data:
        raise _fail("empty chain")
    first = data[0]
    if 0x90 <= first <= 0x9F:
        return first & 0x0F
    if first == 0xDC and len(data) >= 3:
        return int.from_bytes(data[1:3], "big")
    if first == 0xDD and len(data) >= 5:
        return int.from_bytes(data[1:5], "big")
    raise _fail("a chain is a msgpack array")


def decode_chain(text: str, *, max_bytes: int, max_rings: int) -> Chain:
    """Parse a ``trustchain`` attribute value.

    Size and ring count are checked before anything else is decoded (and long
    before any signature is looked at).

    Raises:
        TrustError: ``too_large``, ``depth_exceeded`` or ``malformed``.
    """
    if len(text) > max_bytes:
        raise TrustError(Reason.TOO_LARGE, f"chain is {len(text)} bytes, the limit is {max_bytes}")
    try:
        raw = b64url_decode(text)
    except EncodingError as exc:
        raise _fail(f"chain is not unpadded base64url ({exc})") from exc
    count = _array_length(raw)
    if count - 1 > max_rings:
        raise TrustError(
            Reason.DEPTH_EXCEEDED, f"chain has {count - 1} rings, the limit is {max_rings}"
        )
    try:
        decoded = unpack_canonical(raw, max_array_len=max(max_rings + 1, MAX_SCOPE_ENTRIES + 1))
    except EncodingError as exc:
        raise _fail(f"chain encoding: {exc}") from exc
    if not isinstance(decoded, list) or len(decoded) < 2:
        raise _fail("a chain is [version, origin ring, hop rings...]")
    if decoded[0] != WIRE_VERSION or type(decoded[0]) is not int:
        raise _fail(f"unsupported chain version {decoded[0]!r}")
    origin = _origin(decoded[1])
    hops = tuple(_hop(m, i) for i, m in enumerate(decoded[2:], start=1))
    return Chain(origin, hops)
