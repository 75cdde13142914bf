"""Rings: the two ring kinds, their field rules and their bodies (no I/O).

A ring's bytes are its 64-byte signature followed by its *body*, a
canonical msgpack map with small integer keys (the key numbers below are
part of ``docs/wire-format.md``). This module encodes a ring's body for a
signer and decodes one for a verifier, with the same field rules on both
sides; :mod:`trusthop.chain` strings rings together into a chain. A hop
ring stores what it can derive from the ring before it as a difference:
its actor as a path in the origin's trust domain, its ``iat`` as seconds
after the previous ``iat``, its end of validity (``ttl``) and its scope only
when they narrow.

Rings link through their hashes, never through a field::

    h0 = SHA-256("trusthop/v2/ring" 0x00 || ring0)
    hi = SHA-256("trusthop/v2/ring" 0x00 || h(i-1) || ringi)

and ring i signs ``"trusthop/v2/hop" 0x00 || h(i-1) || body``, so removing,
reordering or splicing a ring breaks a signature.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import msgpack

from trusthop.canonical import MSGPACK_ERRORS as _MSGPACK_ERRORS
from trusthop.errors import Reason, TrustError
from trusthop.spiffe import SCHEME, is_spiffe_id, is_spiffe_path, validate_spiffe_id

T = TypeVar("T")

# Body keys shared by both ring kinds.
K_ACTOR, K_KEY, K_IAT, K_TTL, K_SCOPE, K_X5C = 1, 2, 3, 4, 5, 6
# Origin ring keys.
K_SUBJECT, K_ISSUER, K_CRED_HASH, K_TXN, K_ACR, K_AMR = 10, 11, 12, 13, 15, 16
# Hop ring keys.
K_LINK, K_EVENT, K_DEST, K_CONSUMED, K_PEER = 20, 21, 22, 23, 24

_ORIGIN_REQUIRED = frozenset(
    {K_ACTOR, K_IAT, K_TTL, K_SCOPE, K_SUBJECT, K_ISSUER, K_CRED_HASH, K_TXN}
)
_ORIGIN_ALLOWED = _ORIGIN_REQUIRED | {K_KEY, K_X5C, K_ACR, K_AMR}
_HOP_REQUIRED = frozenset({K_ACTOR, K_IAT, K_LINK, K_EVENT, K_DEST})
_HOP_ALLOWED = _HOP_REQUIRED | {K_KEY, K_TTL, K_SCOPE, K_X5C, K_CONSUMED, K_PEER}

ORIGIN_DOMAIN = b"trusthop/v2/origin\x00"
HOP_DOMAIN = b"trusthop/v2/hop\x00"
RING_HASH_DOMAIN = b"trusthop/v2/ring\x00"

SIGNATURE_BYTES = 64
MAX_SCOPE_ENTRIES = 64
MAX_SCOPE_ENTRY = 256
MAX_TEXT = 1024
MAX_X5C_CERTS = 4
MAX_X5C_CERT_BYTES = 4096
MAX_RING_BYTES = 20_000  # four maximal certificates and every text field at its limit
MAX_TIME = 2**40  # seconds since the epoch (or a duration); far beyond any real window
_MAX_KEY_TAG = 0xFFFF
_MAX_ID = 2048  # bytes of a whole SPIFFE ID (ASCII)


@dataclass(frozen=True, slots=True)
class OriginRing:
    """Ring 0: who the work is for, minted by the edge actor.

    ``credential_hash`` is the SHA-256 of the original credential (the user's
    token); the credential itself is never part of a ring. ``key_tag``
    selects which of the actor's bundled keys signed (see
    :attr:`trusthop.keys.PublicKey.key_tag`); ``x5c``, when set instead, is the
    signer's X.509-SVID chain (DER certificates, leaf first, no root) and
    the ring's key is the leaf's. The trust domain of the whole chain is the
    actor's.
    """

    actor: str
    key_tag: int | None
    iat: int
    exp: int
    scope: frozenset[str]
    subject: str
    issuer: str
    credential_hash: bytes
    transaction_id: str
    acr: str | None = None
    amr: tuple[str, ...] | None = None
    signature: bytes = b""
    x5c: tuple[bytes, ...] | None = None

    @property
    def trust_domain(self) -> str:
        """The trust domain every actor of the chain belongs to."""
        return self.actor[len(SCHEME) :].partition("/")[0]


@dataclass(frozen=True, slots=True)
class HopRing:
    """Ring i>0: ``actor`` published ``event_digest`` to ``destination``.

    ``actor`` is a full SPIFFE ID in memory; on the wire only its path
    travels (it is always in the origin's trust domain). ``key_tag`` and
    ``x5c`` as for :class:`OriginRing`.
    """

    actor: str
    key_tag: int | None
    iat: int
    exp: int
    scope: frozenset[str]
    event_digest: bytes
    destination: str
    consumed_event_id: str | None = None
    peer: str | None = None
    signature: bytes = b""
    x5c: tuple[bytes, ...] | None = None


Ring = OriginRing | HopRing


def positional_constructor(cls: type[T]) -> Callable[..., T]:
    """A function building a frozen, slotted dataclass from all its fields in
    order, without its ``__init__`` (which sets each field through
    ``object.__setattr__``: half the cost of decoding a small ring). Only for
    values already validated: no ``__post_init__``, no defaults."""
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    setters = {f"_set_{n}": getattr(cls, n).__set__ for n in names}
    source = (
        f"def build({', '.join(names)}):\n"
        "    obj = _new(_cls)\n"
        + "".join(f"    _set_{n}(obj, {n})\n" for n in names)
        + "    return obj\n"
    )
    scope: dict[str, Any] = {"_new": object.__new__, "_cls": cls, **setters}
    exec(source, scope)  # noqa: S102 - source built from the class's own field names
    return scope["build"]  # type: ignore[no-any-return]


_origin_ring = positional_constructor(OriginRing)
_hop_ring = positional_constructor(HopRing)

_packb = msgpack.packb
_unpackb = msgpack.unpackb


def _fail(message: str, ring: int | None = None) -> TrustError:
    return TrustError(Reason.MALFORMED, message, ring=ring)


# --------------------------------------------------------------------------- #
# Field rules, shared by the decoder and the signer
# --------------------------------------------------------------------------- #

# Control characters and line/paragraph separators: ring text ends up in logs,
# terminals and decision records, where they could forge lines.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def text_problem(value: object) -> str | None:
    """Why ``value`` is not a valid ring string (``None`` when it is)."""
    if type(value) is not str or not value or len(value) > MAX_TEXT:
        return f"must be a string of 1 to {MAX_TEXT} characters"
    if _UNPRINTABLE.search(value):
        return "contains control or line-separator characters"
    return None


def scope_problem(value: Collection[object]) -> str | None:
    """Why ``value`` (sorted entries) is not a valid scope (``None`` when it is)."""
    if len(value) > MAX_SCOPE_ENTRIES:
        return f"must hold at most {MAX_SCOPE_ENTRIES} entries"
    for item in value:
        if type(item) is not str or not item or len(item) > MAX_SCOPE_ENTRY:
            return f"entries must be strings of 1 to {MAX_SCOPE_ENTRY} characters"
        if _UNPRINTABLE.search(item):
            return "entries contain control or line-separator characters"
    return None


def _uuid_bytes(text: str) -> bytes | None:
    """16 bytes for a canonical (lowercase, hyphenated) UUID string, else ``None``."""
    return uuid.UUID(text).bytes if _UUID.match(text) else None


def _id_value(text: str) -> str | bytes:
    """How an id travels: 16 bytes when it is a canonical UUID, else its text."""
    packed = _uuid_bytes(text)
    return text if packed is None else packed


def _read_id(m: dict[Any, Any], key: int, index: int, what: str) -> str:
    value = m[key]
    if type(value) is bytes:
        return _uuid_text(value, index, what)
    problem = text_problem(value)
    if problem is not None:
        raise _fail(f"ring {index}: {what} {problem}", index)
    if _UUID.match(value):
        raise _fail(f"ring {index}: {what} is a UUID and must travel as 16 bytes", index)
    return value  # type: ignore[no-any-return]


def _read_text(m: dict[Any, Any], key: int, index: int, what: str) -> str:
    value = m[key]
    problem = text_problem(value)
    if problem is not None:
        raise _fail(f"ring {index}: {what} {problem}", index)
    return value  # type: ignore[no-any-return]


def _read_hash(m: dict[Any, Any], key: int, index: int, what: str) -> bytes:
    value = m[key]
    if type(value) is not bytes or len(value) != 32:
        raise _fail(f"ring {index}: {what} must be 32 bytes", index)
    return value


def _read_uint(m: dict[Any, Any], key: int, index: int, what: str) -> int:
    value = m[key]
    if type(value) is not int or not 0 <= value < MAX_TIME:
        raise _fail(f"ring {index}: {what} must be an integer in [0, 2**40)", index)
    return value


def _read_scope(m: dict[Any, Any], index: int) -> frozenset[str]:
    value = m[K_SCOPE]
    if type(value) is not list:
        raise _fail(f"ring {index}: scope must be a list", index)
    if len(value) == 2:  # the common case, checked at once
        a, b = value
        if (
            type(a) is str
            and type(b) is str
            and "" < a < b
            and len(a) <= MAX_SCOPE_ENTRY
            and len(b) <= MAX_SCOPE_ENTRY
            and not _UNPRINTABLE.search(a + b)
        ):
            return frozenset(value)
    problem = scope_problem(value)
    if problem is not None:
        raise _fail(f"ring {index}: scope {problem}", index)
    scope = frozenset(value)
    if len(scope) != len(value) or value != sorted(value):
        raise _fail(f"ring {index}: scope must be sorted and without duplicates", index)
    return scope


def _read_key(m: dict[Any, Any], index: int) -> tuple[int | None, tuple[bytes, ...] | None]:
    """The key tag, or the X.509-SVID chain: exactly one of them."""
    if K_X5C in m:
        if K_KEY in m:
            raise _fail(f"ring {index}: a ring with x5c carries no key tag", index)
        value = m[K_X5C]
        if (
            type(value) is not list
            or not 1 <= len(value) <= MAX_X5C_CERTS
            or not all(type(c) is bytes and 0 < len(c) <= MAX_X5C_CERT_BYTES for c in value)
        ):
            raise _fail(
                f"ring {index}: x5c must be a list of 1 to {MAX_X5C_CERTS} certificates "
                f"of 1 to {MAX_X5C_CERT_BYTES} bytes",
                index,
            )
        return None, tuple(value)
    if K_KEY not in m:
        raise _fail(f"ring {index}: missing key tag (field {K_KEY}) or x5c", index)
    tag = m[K_KEY]
    if type(tag) is not int or not 0 <= tag <= _MAX_KEY_TAG:
        raise _fail(f"ring {index}: key tag must be an integer in [0, 65535]", index)
    return tag, None


def _check_keys(
    m: dict[Any, Any], index: int, required: frozenset[int], allowed: frozenset[int]
) -> None:
    keys = m.keys()
    if not keys <= allowed:
        unknown = sorted(map(repr, keys - allowed))
        raise _fail(f"ring {index}: unknown field(s) {unknown}", index)
    if not required <= keys:
        raise _fail(f"ring {index}: missing field(s) {sorted(required - keys)}", index)


# --------------------------------------------------------------------------- #
# Bodies: encoding
# --------------------------------------------------------------------------- #


def origin_body(ring: OriginRing) -> bytes:
    """The signed body of an origin ring (canonical msgpack, keys ascending).

    Raises:
        ValueError: the ring cannot be written (a window that ends before it
            starts, neither key tag nor x5c).
    """
    if ring.exp < ring.iat:
        raise ValueError("an origin ring's window cannot end before it starts")
    if ring.key_tag is None and ring.x5c is None:
        raise ValueError("a ring needs a key tag or an x5c chain")
    out: dict[int, Any] = {K_ACTOR: ring.actor}
    if ring.x5c is None:
        out[K_KEY] = ring.key_tag
    out[K_IAT] = ring.iat
    out[K_TTL] = ring.exp - ring.iat
    out[K_SCOPE] = sorted(ring.scope)
    if ring.x5c is not None:
        out[K_X5C] = list(ring.x5c)
    out[K_SUBJECT] = ring.subject
    out[K_ISSUER] = ring.issuer
    out[K_CRED_HASH] = ring.credential_hash
    out[K_TXN] = _id_value(ring.transaction_id)
    if ring.acr is not None:
        out[K_ACR] = ring.acr
    if ring.amr is not None:
        out[K_AMR] = list(ring.amr)
    return _packb(out)


def link_tag(prev_hash: bytes) -> int:
    """The link tag a hop ring carries: the first two bytes of the previous
    ring's hash. The signature binds the whole hash; the tag only tells a
    ring signed after another ring (``broken_link``) from an edited one."""
    return int.from_bytes(prev_hash[:2], "big")


def hop_body(ring: HopRing, prev: Ring, trust_domain: str, prev_hash: bytes) -> bytes:
    """The signed body of a hop ring written after ``prev`` (whose ring hash
    is ``prev_hash``).

    The actor travels as its path, ``iat`` as seconds after ``prev.iat``,
    the end of validity as ``ttl`` (seconds after ``iat``) only when it
    differs from ``prev``'s, the scope only when it differs from ``prev``'s
    (a wider one is written as is: verifiers answer ``scope_escalation``).

    Raises:
        ValueError: what the format cannot express: an actor outside
            ``trust_domain``, an ``iat`` before ``prev.iat``, a window that
            ends before it starts, neither key tag nor x5c.
    """
    return hop_body_of(
        ring.actor,
        ring.key_tag,
        ring.iat,
        ring.exp,
        ring.scope,
        ring.event_digest,
        ring.destination,
        ring.consumed_event_id,
        ring.peer,
        ring.x5c,
        prev=prev,
        trust_domain=trust_domain,
        prev_hash=prev_hash,
    )


def hop_body_of(
    actor: str,
    key_tag: int | None,
    iat: int,
    exp: int,
    scope: frozenset[str],
    event_digest: bytes,
    destination: str,
    consumed_event_id: str | None,
    peer: str | None,
    x5c: tuple[bytes, ...] | None,
    *,
    prev: Ring,
    trust_domain: str,
    prev_hash: bytes,
) -> bytes:
    """:func:`hop_body` of the ring these fields (in :class:`HopRing` order)
    would make, before it exists (a signer signs the body first)."""
    prefix = f"{SCHEME}{trust_domain}/"
    if not actor.startswith(prefix):
        raise ValueError(f"{actor} is not in trust domain {trust_domain}")
    if iat < prev.iat:
        raise ValueError("a hop ring cannot start before the ring it follows")
    if exp < iat:
        raise ValueError("a hop ring's window cannot end before it starts")
    out: dict[int, Any] = {K_ACTOR: actor[len(prefix) - 1 :]}
    if x5c is None:
        if key_tag is None:
            raise ValueError("a ring needs a key tag or an x5c chain")
        out[K_KEY] = key_tag
    out[K_IAT] = iat - prev.iat
    if exp != prev.exp:
        out[K_TTL] = exp - iat
    if scope is not prev.scope and scope != prev.scope:
        out[K_SCOPE] = sorted(scope)
    if x5c is not None:
        out[K_X5C] = list(x5c)
    out[K_LINK] = link_tag(prev_hash)
    out[K_EVENT] = event_digest
    out[K_DEST] = destination
    if consumed_event_id is not None:
        out[K_CONSUMED] = _id_value(consumed_event_id)
    if peer is not None:
        out[K_PEER] = peer
    return _packb(out)


def new_hop_ring(
    actor: str,
    key_tag: int | None,
    iat: int,
    exp: int,
    scope: frozenset[str],
    event_digest: bytes,
    destination: str,
    consumed_event_id: str | None,
    peer: str | None,
    signature: bytes,
    x5c: tuple[bytes, ...] | None,
) -> HopRing:
    """``HopRing(...)`` for fields a signer already checked, without the
    dataclass ``__init__``."""
    return _hop_ring(
        actor,
        key_tag,
        iat,
        exp,
        scope,
        event_digest,
        destination,
        consumed_event_id,
        peer,
        signature,
        x5c,
    )


def next_hash(prev_hash: bytes | None, ring_bytes: bytes) -> bytes:
    """The hash of a ring (signature and body) that follows ``prev_hash``."""
    if prev_hash is None:
        return hashlib.sha256(RING_HASH_DOMAIN + ring_bytes).digest()
    return hashlib.sha256(RING_HASH_DOMAIN + prev_hash + ring_bytes).digest()


# --------------------------------------------------------------------------- #
# Bodies: decoding
# --------------------------------------------------------------------------- #


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError("msgpack extension types are not allowed")


def _shapes(required: frozenset[int], optional: frozenset[int]) -> frozenset[tuple[int, ...]]:
    """Every ascending key tuple a body may have: the required keys, exactly
    one of key tag and x5c, any of the optional ones."""
    out = set()
    extras = sorted(optional)
    for key in (K_KEY, K_X5C):
        for mask in range(1 << len(extras)):
            chosen = {extras[i] for i in range(len(extras)) if mask >> i & 1}
            out.add(tuple(sorted(required | {key} | chosen)))
    return frozenset(out)


_ORIGIN_SHAPES = _shapes(_ORIGIN_REQUIRED, frozenset({K_ACR, K_AMR}))
_HOP_SHAPES = _shapes(_HOP_REQUIRED, frozenset({K_TTL, K_SCOPE, K_CONSUMED, K_PEER}))


def _unpack_body(
    body: bytes,
    index: int,
    shapes: frozenset[tuple[int, ...]],
    required: frozenset[int],
    allowed: frozenset[int],
) -> dict[Any, Any]:
    """Decode a ring body; require one of ``shapes`` and the canonical encoding.

    Lengths need no limits of their own: the body is at most
    ``MAX_RING_BYTES`` long, and nothing in it can announce more than that.
    """
    try:
        m = _unpackb(body, strict_map_key=False, ext_hook=_reject_ext)
    except _MSGPACK_ERRORS as exc:
        raise _fail(
            f"ring {index}: body is not valid msgpack ({type(exc).__name__})", index
        ) from exc
    if type(m) is not dict:
        raise _fail(f"ring {index}: body is not a map", index)
    keys = tuple(m)
    if keys not in shapes:
        _explain_keys(m, index, required, allowed)
    for k in keys:
        # True and 2.0 compare and hash equal to 1 and 2: only integers are keys.
        if type(k) is not int:
            raise _fail(f"ring {index}: field keys must be integers", index)
    # With integer keys in ascending order, re-encoding catches duplicate keys
    # (collapsed on decode), non-minimal integers and lengths, and str/bin
    # confusion; the field rules then refuse every other type.
    try:
        again = _packb(m)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _fail(f"ring {index}: body cannot be re-encoded", index) from exc
    if again != body:
        raise _fail(f"ring {index}: body is not in canonical msgpack", index)
    return m


def _explain_keys(
    m: dict[Any, Any], index: int, required: frozenset[int], allowed: frozenset[int]
) -> None:
    """Raise ``malformed`` saying why the keys of ``m`` are no valid shape."""
    if not all(type(k) is int for k in m):
        raise _fail(f"ring {index}: field keys must be integers", index)
    _check_keys(m, index, required, allowed)
    if list(m) != sorted(m):
        raise _fail(f"ring {index}: field keys must be in ascending order", index)
    if (K_KEY in m) == (K_X5C in m):
        raise _fail(f"ring {index}: a ring carries a key tag or x5c, exactly one", index)
    raise _fail(f"ring {index}: unexpected fields {sorted(m)}", index)


def _uuid_text(value: object, index: int, what: str) -> str:
    """The canonical UUID text of 16 bytes."""
    if len(value) != 16:  # type: ignore[arg-type]
        raise _fail(f"ring {index}: {what} as bytes must be a 16-byte UUID", index)
    h = value.hex()  # type: ignore[attr-defined]
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def decode_origin(data: bytes) -> OriginRing:
    """Ring 0 from its bytes (signature and body).

    Raises:
        TrustError(malformed): naming the field.
    """
    if len(data) <= SIGNATURE_BYTES:
        raise _fail("ring 0: too short", 0)
    m = _unpack_body(data[SIGNATURE_BYTES:], 0, _ORIGIN_SHAPES, _ORIGIN_REQUIRED, _ORIGIN_ALLOWED)
    actor = m[K_ACTOR]
    if not is_spiffe_id(actor, path=True):
        raise _fail(f"ring 0: actor is not a SPIFFE ID ({_spiffe_problem(actor)})", 0)
    key_tag = m.get(K_KEY)
    if type(key_tag) is int and 0 <= key_tag <= _MAX_KEY_TAG:
        x5c = None
    else:
        key_tag, x5c = _read_key(m, 0)
    iat, ttl = m[K_IAT], m[K_TTL]
    if not (type(iat) is int and type(ttl) is int and 0 <= iat < MAX_TIME and 0 <= ttl < MAX_TIME):
        _read_uint(m, K_IAT, 0, "iat")
        _read_uint(m, K_TTL, 0, "ttl")
    subject, issuer = m[K_SUBJECT], m[K_ISSUER]
    # The common case in one test; the field readers name what is wrong.
    if not (
        type(subject) is str
        and type(issuer) is str
        and 0 < len(subject) <= MAX_TEXT
        and 0 < len(issuer) <= MAX_TEXT
        and not _UNPRINTABLE.search(subject + issuer)
    ):
        _read_text(m, K_SUBJECT, 0, "subject")
        _read_text(m, K_ISSUER, 0, "issuer")
    credential_hash = m[K_CRED_HASH]
    if type(credential_hash) is not bytes or len(credential_hash) != 32:
        _read_hash(m, K_CRED_HASH, 0, "credential hash")
    txn = m[K_TXN]
    txn = (
        _uuid_text(txn, 0, "transaction id")
        if type(txn) is bytes
        else _read_id(m, K_TXN, 0, "transaction id")
    )
    acr = _read_text(m, K_ACR, 0, "acr") if K_ACR in m else None
    amr = None
    if K_AMR in m:
        raw = m[K_AMR]
        if (
            type(raw) is not list
            or len(raw) > 16
            or not all(
                type(x) is str and 0 < len(x) <= 64 and not _UNPRINTABLE.search(x) for x in raw
            )
        ):
            raise _fail("ring 0: amr must be a short list of strings", 0)
        amr = tuple(raw)
    ring: OriginRing = _origin_ring(
        actor,
        key_tag,
        iat,
        iat + ttl,
        _read_scope(m, 0),
        subject,
        issuer,
        credential_hash,
        txn,
        acr,
        amr,
        data[:SIGNATURE_BYTES],
        x5c,
    )
    return ring


def decode_hop(data: bytes, index: int, prev: Ring, trust_domain: str) -> tuple[HopRing, int]:
    """Ring ``index`` (> 0) from its bytes, read against the ring before it,
    and the link tag it carries.

    Raises:
        TrustError(malformed): naming the field.
    """
    if len(data) <= SIGNATURE_BYTES:
        raise _fail(f"ring {index}: too short", index)
    m = _unpack_body(data[SIGNATURE_BYTES:], index, _HOP_SHAPES, _HOP_REQUIRED, _HOP_ALLOWED)
    path = m[K_ACTOR]
    if not is_spiffe_path(path) or len(path) + len(trust_domain) > _MAX_ID - len(SCHEME):
        raise _fail(
            f"ring {index}: actor must be a SPIFFE ID path such as /ns/x/sa/y "
            "(the whole ID at most 2048 bytes)",
            index,
        )
    if K_KEY in m:
        key_tag = m[K_KEY]
        if type(key_tag) is not int or not 0 <= key_tag <= _MAX_KEY_TAG:
            raise _fail(f"ring {index}: key tag must be an integer in [0, 65535]", index)
        x5c = None
    else:
        key_tag, x5c = _read_key(m, index)
    delta = m[K_IAT]
    if type(delta) is not int or not 0 <= delta < MAX_TIME:
        raise _fail(f"ring {index}: iat must be an integer in [0, 2**40)", index)
    iat = prev.iat + delta
    exp = iat + _read_uint(m, K_TTL, index, "ttl") if K_TTL in m else prev.exp
    tag = m[K_LINK]
    if type(tag) is not int or not 0 <= tag <= _MAX_KEY_TAG:
        raise _fail(f"ring {index}: link tag must be an integer in [0, 65535]", index)
    digest = m[K_EVENT]
    if type(digest) is not bytes or len(digest) != 32:
        raise _fail(f"ring {index}: event digest must be 32 bytes", index)
    destination = m[K_DEST]
    if text_problem(destination) is not None:
        _read_text(m, K_DEST, index, "destination")
    consumed = _read_id(m, K_CONSUMED, index, "consumed event id") if K_CONSUMED in m else None
    ring: HopRing = _hop_ring(
        f"{SCHEME}{trust_domain}{path}",
        key_tag,
        iat,
        exp,
        _read_scope(m, index) if K_SCOPE in m else prev.scope,
        digest,
        destination,
        consumed,
        _read_text(m, K_PEER, index, "peer") if K_PEER in m else None,
        data[:SIGNATURE_BYTES],
        x5c,
    )
    return ring, tag


def _spiffe_problem(value: str) -> str:
    try:
        validate_spiffe_id(value)
    except ValueError as exc:
        return str(exc)
    return "it has no path"
