"""Shared, deterministic building blocks for the unit tests (no I/O, no clock).

Every identity comes from a fixed seed, every time from ``T0``, so a failing
test prints the same bytes on every run. The "story" is the chain most tests
attack:

* ring 0, origin, signed by the edge gateway at ``T0`` (one hour, scope S0);
* ring 1, hop, the edge gateway publishes ``order.placed`` to ``kafka:orders``
  at ``T0 + 10`` (30 minutes, scope S1 < S0);
* ring 2, hop, the orders service consumes it and publishes
  ``payment.requested`` to ``kafka:payments`` at ``T0 + 20`` (15 minutes,
  scope S2 < S1), naming the consumed event and the broker peer.

The consumer verifies at ``NOW = T0 + 30``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest

from trusthop.bundle import BundleKey, TrustBundle
from trusthop.canonical import b64url_decode, b64url_encode, pack
from trusthop.chain import Chain, HopRing, OriginRing, Ring
from trusthop.digest import canonical_json
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.keys import PublicKey, SigningKey
from trusthop.rings import (
    HOP_DOMAIN,
    K_ACTOR,
    K_KEY,
    K_LINK,
    ORIGIN_DOMAIN,
    SIGNATURE_BYTES,
    next_hash,
)
from trusthop.sign import Identity, append_hop, mint_origin
from trusthop.spiffe import SCHEME
from trusthop.verify import Limits, VerifiedContext, verify_chain

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z
NOW = T0 + 30

DOMAIN = "prod.example.com"
EDGE_ID = f"spiffe://{DOMAIN}/ns/edge/sa/gateway"
ORDERS_ID = f"spiffe://{DOMAIN}/ns/shop/sa/orders"
PAYMENTS_ID = f"spiffe://{DOMAIN}/ns/pay/sa/payments"
FOREIGN_ID = "spiffe://partner.example.org/ns/shop/sa/orders"
BROKER_PEER = f"spiffe://{DOMAIN}/ns/kafka/sa/broker"

S0 = frozenset({"orders:read", "orders:write", "payments:charge"})
S1 = frozenset({"orders:write", "payments:charge"})
S2 = frozenset({"payments:charge"})

DEST1 = "kafka:orders"
DEST2 = "kafka:payments"


@dataclass
class FixedClock:
    """A clock that only moves when a test moves it."""

    now: float = NOW

    def __call__(self) -> float:
        return self.now


def seeded_key(seed: int) -> SigningKey:
    return SigningKey.from_seed(bytes([seed]) * 32)


def identity(actor: str, seed: int, kid: str) -> Identity:
    return Identity.create(actor, seeded_key(seed), kid=kid)


EDGE = identity(EDGE_ID, 1, "edge-1")
ORDERS = identity(ORDERS_ID, 2, "orders-1")
ORDERS_2 = identity(ORDERS_ID, 3, "orders-2")  # a second (rotated) key of the same actor
PAYMENTS = identity(PAYMENTS_ID, 4, "payments-1")
FOREIGN = identity(FOREIGN_ID, 5, "foreign-1")  # bundled, but in another trust domain
MALLORY_KEY = seeded_key(0x66)  # in no bundle

SIGNERS = {i.kid: i for i in (EDGE, ORDERS, ORDERS_2, PAYMENTS, FOREIGN)}
# Rings name their key by (actor, key tag).
SIGNER_OF = {(i.actor, i.key_tag): i for i in SIGNERS.values()}


def make_bundle(*, revoked_kids: Iterable[str] = (), revoked_actors: Iterable[str] = (),
                drop: Iterable[str] = ()) -> TrustBundle:
    revoked = set(revoked_kids)
    dropped = set(drop)
    return TrustBundle.of(
        [
            BundleKey(i.kid, i.actor, i.key.public_key, i.kid in revoked)
            for i in SIGNERS.values()
            if i.kid not in dropped
        ],
        revoked_actors=revoked_actors,
    )


BUNDLE = make_bundle()


def make_event(event_id: str = "evt-1", *, type_: str = "order.placed",
               data: Any = None, **attributes: Any) -> WireEvent:
    """A binary-mode style wire event (string attributes, JSON data bytes)."""
    attrs: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id,
        "source": "/shop/orders",
        "type": type_,
        "time": "2026-01-01T00:00:10Z",
        "subject": "order-42",
        "datacontenttype": "application/json",
    }
    attrs.update(attributes)
    payload = canonical_json({"order": 42, "total": "9.99"} if data is None else data)
    return WireEvent({k: v for k, v in attrs.items() if v is not None}, payload)


@dataclass
class Story:
    origin: OriginRing
    chain: Chain
    e1: WireEvent
    e2: WireEvent

    @property
    def encoded(self) -> str:
        return self.chain.encode()

    @property
    def rings(self) -> list[Ring]:
        return list(self.chain.rings)

    @property
    def digest(self) -> bytes:
        return self.e2.digest()


def build_story(txn: str = "txn-1", *, subject: str = "user:alice") -> Story:
    origin = mint_origin(
        EDGE,
        subject=subject,
        issuer="https://idp.example.com",
        credential="token-of-" + subject,
        scope=S0,
        now=T0,
        ttl=3600,
        transaction_id=txn,
        acr="mfa",
        amr=["pwd", "otp"],
    )
    e1 = make_event(f"{txn}-e1")
    c1 = append_hop(EDGE, Chain(origin), event_digest=e1.digest(), destination=DEST1,
                    now=T0 + 10, scope=S1, ttl=1800)
    e2 = make_event(f"{txn}-e2", type_="payment.requested", data={"amount": 999, "order": 42})
    c2 = append_hop(ORDERS, c1, event_digest=e2.digest(), destination=DEST2, now=T0 + 20,
                    scope=S2, ttl=900, consumed_event_id=e1.id, peer=BROKER_PEER)
    return Story(origin, c2, e1, e2)


def verify(encoded: str | None, *, bundle: TrustBundle = BUNDLE, digest: bytes | None = None,
           destination: str = DEST2, now: float = NOW, limits: Limits = Limits(),
           story: Story | None = None) -> VerifiedContext:
    if digest is None:
        digest = (story or build_story()).digest
    return verify_chain(encoded, bundle=bundle, event_digest=digest, destination=destination,
                        now=now, limits=limits)


ANY_RING = object()


def rejected(fn: Callable[[], Any], reason: Reason, ring: object = ANY_RING) -> TrustError:
    """Run ``fn``, require a TrustError with exactly ``reason`` (and ring index)."""
    with pytest.raises(TrustError) as info:
        fn()
    err = info.value
    assert err.reason is reason, f"expected {reason.value}, got {err.reason.value}: {err.message}"
    if ring is not ANY_RING:
        assert err.ring == ring, f"expected ring {ring}, got {err.ring}: {err.message}"
    assert err.message
    return err


# -- building and re-encoding chains by hand ---------------------------------


def sign_ring(ring: Ring, signer: Identity | SigningKey, after: Chain | None = None) -> Ring:
    """``ring`` signed by ``signer``: an origin alone, a hop as the ring after ``after``."""
    key = signer.key if isinstance(signer, Identity) else signer
    if isinstance(ring, OriginRing):
        message = Chain(ring).signing_input(0)
    else:
        assert after is not None, "a hop ring is signed after a chain"
        message = after.next_signing_input(ring)
    return dataclasses.replace(ring, signature=key.sign(message))


def encode_rings(rings: Sequence[Ring]) -> str:
    """Canonical wire form of any ring sequence (signatures as they are; each
    hop's link tag names the ring before it in this sequence)."""
    return Chain(rings[0], tuple(rings[1:])).encode()  # type: ignore[arg-type]


def relink(rings: Sequence[Ring], start: int) -> list[Ring]:
    """Re-sign rings ``start..`` after the rings now before them, with their
    legitimate keys.

    This is what an attacker holding every later key could do; the rings before
    ``start`` keep their (possibly broken) signatures.
    """
    out = list(rings)
    for index in range(max(start, 1), len(out)):
        ring = out[index]
        assert isinstance(ring, HopRing)
        before = Chain(out[0], tuple(out[1:index]))  # type: ignore[arg-type]
        out[index] = sign_ring(ring, SIGNER_OF[(ring.actor, ring.key_tag)], before)
    return out


def ring_parts(encoded: str) -> list[tuple[bytes, dict[int, Any]]]:
    """Each ring of a chain as (signature, body map with int keys); no checks."""
    parts = []
    for segment in encoded.split(".")[1:]:
        data = b64url_decode(segment)
        body = msgpack.unpackb(data[SIGNATURE_BYTES:], raw=False, strict_map_key=False)
        parts.append((data[:SIGNATURE_BYTES], body))
    return parts


def encode_parts(parts: Sequence[tuple[bytes, Any]], version: str = "2") -> str:
    """The wire text of (signature, body) pairs: a body is packed canonically
    (maps sorted) unless it is ``bytes`` already; signatures are not redone."""
    segments = [
        b64url_encode(sig + (body if isinstance(body, bytes) else pack(body)))
        for sig, body in parts
    ]
    return ".".join([version, *segments])


def encode_segments(segments: Sequence[bytes], version: str = "2") -> str:
    """The wire text of raw ring byte strings."""
    return ".".join([version, *(b64url_encode(s) for s in segments)])


def flip(data: bytes, index: int = 0) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# -- wire-level building blocks (v2): ring bytes, bodies, hashes -------------
#
# Structural attacks (removing, reordering, duplicating, splicing rings) must
# be made on the wire text or the ring bytes: Chain(...) re-encodes every ring
# and recomputes each link tag for the sequence it is given.


def counter_key(n: int) -> SigningKey:
    """The Ed25519 key whose seed is ``n`` as 32 big-endian bytes."""
    return SigningKey.from_seed(n.to_bytes(32, "big"))


# Key tags are 16 bits: these keys were found by search (each use asserts it).
TAG_TWIN_SEEDS = (54, 216)
"""Two different keys (``counter_key``) with one key tag (0x3232)."""
ORDERS_TAG_TWIN = counter_key(56971)
"""Not the orders service's key, but with the key tag of ``ORDERS``'s key."""
EDGE_TAG_TWIN = counter_key(177828)
"""Not the edge's key, but with the key tag of ``EDGE``'s key."""


def wire_rings(encoded: str) -> list[bytes]:
    """The bytes of each ring of a chain text (signature then body); no checks."""
    return [b64url_decode(segment) for segment in encoded.split(".")[1:]]


def wire_hashes(rings: Sequence[bytes]) -> list[bytes]:
    """The ring hashes of a sequence of ring bytes, oldest first."""
    out: list[bytes] = []
    for data in rings:
        out.append(next_hash(out[-1] if out else None, data))
    return out


def body_map(ring: bytes) -> dict[int, Any]:
    """The body of ring bytes as a map (no checks)."""
    return msgpack.unpackb(ring[SIGNATURE_BYTES:], raw=False, strict_map_key=False)


def signed_ring(body: bytes | dict[int, Any], key: Identity | SigningKey,
                prev_hash: bytes | None = None) -> bytes:
    """Ring bytes: ``body`` (packed canonically unless already bytes) signed by
    ``key`` as an origin (``prev_hash`` None) or as the ring after the ring
    whose hash is ``prev_hash``. The body is signed as given: a wrong link tag
    in it stays wrong."""
    raw = body if isinstance(body, bytes) else pack(body)
    signer = key.key if isinstance(key, Identity) else key
    message = ORIGIN_DOMAIN + raw if prev_hash is None else HOP_DOMAIN + prev_hash + raw
    return signer.sign(message) + raw


def actor_of(body: dict[int, Any], origin_body: dict[int, Any]) -> str:
    """The full SPIFFE ID a body names (a hop names a path in the origin's domain)."""
    actor = body[K_ACTOR]
    if actor.startswith(SCHEME):
        return str(actor)
    domain = origin_body[K_ACTOR][len(SCHEME):].partition("/")[0]
    return f"{SCHEME}{domain}{actor}"


def resign_wire(rings: Sequence[bytes], start: int, *, fix_links: bool = True) -> list[bytes]:
    """Ring bytes with rings ``start..`` re-signed, by their legitimate keys
    (``SIGNER_OF`` by actor and key tag), after the rings now before them;
    ``fix_links`` also rewrites each re-signed hop's link tag to name the ring
    now before it. What an attacker holding every later key could do."""
    out = list(rings)
    origin = body_map(out[0])
    for index in range(start, len(out)):
        body = body_map(out[index])
        hashes = wire_hashes(out[:index])
        if index and fix_links:
            body[K_LINK] = int.from_bytes(hashes[-1][:2], "big")
        signer = SIGNER_OF[(actor_of(body, origin if index else body), body[K_KEY])]
        out[index] = signed_ring(body, signer, hashes[-1] if index else None)
        if index == 0:
            origin = body
    return out


def edit_ring(encoded: str, index: int, change: Callable[[dict[int, Any]], Any]) -> str:
    """The chain text with ring ``index``'s body changed by ``change`` (called
    on the body map) and packed canonically again; its signature is kept."""
    rings = wire_rings(encoded)
    body = body_map(rings[index])
    change(body)
    rings[index] = rings[index][:SIGNATURE_BYTES] + pack(body)
    return encode_segments(rings)


# -- a link-tag twin ----------------------------------------------------------

# The transaction id whose origin (minted as in ``build_story(TAG_TWIN_TXN,
# subject="user:bob")``) has a ring hash with the same 16-bit link tag as
# ``build_story()``'s origin, found once by search (each use asserts it).
TAG_TWIN_TXN = "txn-collide-30925"


def count_signature_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap ``PublicKey.verify`` for one test: one entry per signature check
    (counted, never timed)."""
    calls: list[int] = []
    original = PublicKey.verify

    def counting(self: PublicKey, signature: bytes, message: bytes) -> bool:
        calls.append(1)
        return original(self, signature, message)

    monkeypatch.setattr(PublicKey, "verify", counting)
    return calls
