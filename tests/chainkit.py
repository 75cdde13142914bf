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
from trusthop.chain import SIGNATURE_BYTES, Chain, HopRing, OriginRing, Ring
from trusthop.digest import canonical_json
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.keys import SigningKey
from trusthop.sign import Identity, append_hop, mint_origin
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
