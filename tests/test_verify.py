"""Attacks on trusthop.verify (wire format 2): every invariant of the brief,
every reason code.

Each test builds the attack by hand and asserts the exact reason and, where
one ring is to blame, its index. Field edits are made on ring objects
(``Chain`` re-encodes them, recomputing each link tag for the sequence it is
given) or on the ring bodies; structural attacks (removing, reordering,
duplicating, splicing rings) are made on the wire text itself, which is what
an attacker holds. "Relinked" means the rings after an edit were re-signed by
their legitimate keys: what an attacker holding every later key could do.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from chainkit import (
    BROKER_PEER,
    BUNDLE,
    DEST1,
    DEST2,
    EDGE,
    EDGE_ID,
    EDGE_TAG_TWIN,
    FOREIGN,
    FOREIGN_ID,
    MALLORY_KEY,
    NOW,
    ORDERS,
    ORDERS_2,
    ORDERS_ID,
    ORDERS_TAG_TWIN,
    PAYMENTS,
    PAYMENTS_ID,
    S0,
    S1,
    S2,
    T0,
    Story,
    body_map,
    build_story,
    count_signature_checks,
    edit_ring,
    encode_rings,
    encode_segments,
    flip,
    make_bundle,
    make_event,
    rejected,
    relink,
    resign_wire,
    sign_ring,
    signed_ring,
    verify,
    wire_hashes,
    wire_rings,
)

from trusthop import chain as chain_module
from trusthop.bundle import BundleKey, TrustBundle
from trusthop.canonical import pack
from trusthop.chain import Chain, HopRing, Ring, decode_chain
from trusthop.destination import amqp_destination, kafka_destination
from trusthop.errors import Reason, TrustError
from trusthop.rings import (
    HOP_DOMAIN,
    K_ACTOR,
    K_IAT,
    K_KEY,
    K_LINK,
    K_SCOPE,
    K_TTL,
    ORIGIN_DOMAIN,
    SIGNATURE_BYTES,
    hop_body,
    link_tag,
)
from trusthop.sigcache import SignatureCache
from trusthop.sign import append_hop, mint_origin
from trusthop.verify import (
    Limits,
    VerifiedContext,
    VerifiedPrefix,
    check_window,
    verify_chain,
    verify_decoded,
    verify_with_keys,
)

R = Reason
ED25519_L = 2**252 + 27742317777372353535851937790883648493
OTHER_HASH = hashlib.sha256(b"something else").digest()
NOT_A_CERTIFICATE = (b"\x30\x00",)


def text_of(rings: list[bytes]) -> str:
    return encode_segments(rings)


def newest_signed(story: Story, change: Callable[[dict[int, Any]], Any]) -> str:
    """Ring 2's body changed by ``change`` and signed by its legitimate key
    after ring 1, exactly as changed (a wrong link tag stays wrong)."""
    rings = wire_rings(story.encoded)
    body = body_map(rings[2])
    change(body)
    rings[2] = signed_ring(body, ORDERS, wire_hashes(rings[:2])[-1])
    return text_of(rings)


def test_valid_chain_yields_the_verified_context(story: Story) -> None:
    ctx = verify(story.encoded, story=story)
    assert ctx.subject == "user:alice"
    assert ctx.issuer == "https://idp.example.com"
    assert ctx.transaction_id == "txn-1"
    assert ctx.trust_domain == "prod.example.com"
    assert ctx.scope == S2
    assert ctx.actors == (EDGE.actor, EDGE.actor, ORDERS.actor)
    assert ctx.destination == DEST2
    assert ctx.expires_at == T0 + 920
    assert ctx.chain_digest == story.chain.hashes()[-1]
    assert ctx.chain_digest == wire_hashes(wire_rings(story.encoded))[-1]
    assert ctx.chain == story.chain


def test_redelivery_of_the_same_bytes_verifies_again(story: Story) -> None:
    first = verify(story.encoded, story=story)
    second = verify(story.encoded, story=story)
    assert first.chain_digest == second.chain_digest


def test_missing_chain() -> None:
    rejected(lambda: verify(None), R.MISSING_CHAIN)


# -- invariant 1: keys, binding, revocation, signatures ---------------------


def test_unknown_key(story: Story) -> None:
    bundle = make_bundle(drop=["orders-1"])
    rejected(lambda: verify(story.encoded, bundle=bundle, story=story), R.UNKNOWN_KEY, 2)


def test_empty_bundle_knows_no_key(story: Story) -> None:
    rejected(lambda: verify(story.encoded, bundle=TrustBundle(), story=story), R.UNKNOWN_KEY, 0)


@pytest.mark.parametrize(("kid", "ring"), [("edge-1", 0), ("orders-1", 2)])
def test_revoked_key(story: Story, kid: str, ring: int) -> None:
    bundle = make_bundle(revoked_kids=[kid])
    rejected(lambda: verify(story.encoded, bundle=bundle, story=story), R.REVOKED, ring)


def test_revoked_actor_is_rejected_whatever_key_it_uses(story: Story) -> None:
    bundle = make_bundle(revoked_actors=[ORDERS_ID])
    rejected(lambda: verify(story.encoded, bundle=bundle, story=story), R.REVOKED, 2)
    # Re-signing the ring with the actor's other, unrevoked key does not help.
    rings = story.rings
    rings[2] = sign_ring(dataclasses.replace(rings[2], key_tag=ORDERS_2.key_tag), ORDERS_2,
                         _after(rings, 2))
    assert verify(encode_rings(rings), story=story).actors[-1] == ORDERS_ID
    rejected(lambda: verify(encode_rings(rings), bundle=bundle, story=story), R.REVOKED, 2)


def test_revocation_applies_on_retry(story: Story) -> None:
    verify(story.encoded, story=story)
    later = make_bundle(revoked_kids=["edge-1"])
    rejected(lambda: verify(story.encoded, bundle=later, story=story), R.REVOKED, 0)


def _after(rings: list[Ring], index: int) -> Chain:
    return Chain(rings[0], tuple(rings[1:index]))  # type: ignore[arg-type]


def test_a_hop_naming_another_workload_with_a_key_of_its_own(story: Story) -> None:
    """The orders service signs, with its own key and key tag, a ring whose
    actor path names payments: no key of payments has that tag."""
    rings = story.rings
    rings[2] = sign_ring(dataclasses.replace(rings[2], actor=PAYMENTS_ID), ORDERS, _after(rings, 2))
    err = rejected(lambda: verify(encode_rings(rings), story=story), R.UNKNOWN_KEY, 2)
    assert PAYMENTS_ID in err.message
    # Naming payments' key tag too: payments' key is found, orders' signature fails.
    rings[2] = sign_ring(
        dataclasses.replace(rings[2], actor=PAYMENTS_ID, key_tag=PAYMENTS.key_tag), ORDERS,
        _after(rings, 2))
    rejected(lambda: verify(encode_rings(rings), story=story), R.BAD_SIGNATURE, 2)
    # The same, made on the wire: the body names the payments path.
    forged = newest_signed(story, lambda b: b.__setitem__(K_ACTOR, "/ns/pay/sa/payments"))
    rejected(lambda: verify(forged, story=story), R.UNKNOWN_KEY, 2)


def test_an_origin_naming_another_workload_with_a_key_of_its_own(story: Story) -> None:
    rings = relink(
        [sign_ring(dataclasses.replace(story.origin, actor=ORDERS_ID), EDGE), *story.rings[1:]], 1
    )
    rejected(lambda: verify(encode_rings(rings), story=story), R.UNKNOWN_KEY, 0)
    rings = relink([sign_ring(dataclasses.replace(story.origin, actor=ORDERS_ID,
                                                  key_tag=ORDERS.key_tag), EDGE),
                    *story.rings[1:]], 1)
    rejected(lambda: verify(encode_rings(rings), story=story), R.BAD_SIGNATURE, 0)


def test_a_key_sharing_the_key_tag_is_not_the_key(story: Story) -> None:
    """A tag only selects a key: a key with the same 16-bit tag (found by
    search) signs nothing in the tag owner's name."""
    assert ORDERS_TAG_TWIN.public_key.key_tag == ORDERS.key_tag
    assert ORDERS_TAG_TWIN.public_key != ORDERS.key.public_key
    rings = story.rings
    rings[2] = sign_ring(rings[2], ORDERS_TAG_TWIN, _after(rings, 2))
    rejected(lambda: verify(encode_rings(rings), story=story), R.BAD_SIGNATURE, 2)
    assert EDGE_TAG_TWIN.public_key.key_tag == EDGE.key_tag
    rings = relink([sign_ring(story.origin, EDGE_TAG_TWIN), *story.rings[1:]], 1)
    rejected(lambda: verify(encode_rings(rings), story=story), R.BAD_SIGNATURE, 0)


def test_hop_actors_outside_the_origin_trust_domain_cannot_be_written(story: Story) -> None:
    """A hop names a path in the origin's trust domain: a foreign actor is not
    expressible, and the producer refuses with the consumer's reason."""
    hop = HopRing(
        actor=FOREIGN_ID,
        key_tag=FOREIGN.key_tag,
        iat=T0 + 25,
        exp=T0 + 900,
        scope=S2,
        event_digest=story.digest,
        destination=DEST2,
    )
    with pytest.raises(ValueError, match="trust domain"):
        story.chain.next_signing_input(hop)
    rejected(
        lambda: append_hop(
            FOREIGN, story.chain, event_digest=story.digest, destination=DEST2, now=T0 + 25
        ),
        R.UNAUTHORIZED_ACTOR,
    )
    # The foreign actor's own path in our chain is our actor of that path.
    forged = newest_signed(story, lambda b: b.__setitem__(K_ACTOR, "/ns/shop/sa/orders"))
    assert verify(forged, story=story).actors[-1] == ORDERS_ID


def test_a_foreign_origin_moves_every_hop_into_its_trust_domain(story: Story) -> None:
    origin = mint_origin(
        FOREIGN,
        subject="user:alice",
        issuer="https://idp.partner.example",
        credential="t",
        scope=S0,
        now=T0,
        transaction_id="txn-1",
    )
    rings = wire_rings(story.encoded)
    rings[0] = Chain(origin).ring_bytes[0]
    # Ring 1's path now names spiffe://partner.example.org/ns/edge/sa/gateway.
    err = rejected(lambda: verify(text_of(rings), story=story), R.UNKNOWN_KEY, 1)
    assert "partner.example.org" in err.message
    rejected(
        lambda: verify_chain(text_of(rings), bundle=BUNDLE, event_digest=story.digest,
                             destination=DEST2, now=NOW, trust_domain="prod.example.com"),
        R.UNAUTHORIZED_ACTOR,
        0,
    )


@pytest.mark.parametrize(
    "signer",
    [MALLORY_KEY, ORDERS_2.key, PAYMENTS.key, EDGE.key, ORDERS_TAG_TWIN],
    ids=["unbundled", "same-actor-other-key", "other-actor", "edge", "same-tag"],
)
def test_signature_by_another_key_under_the_right_key_tag(story: Story, signer: Any) -> None:
    rings = story.rings
    rings[2] = sign_ring(rings[2], signer, _after(rings, 2))
    rejected(lambda: verify(encode_rings(rings), story=story), R.BAD_SIGNATURE, 2)


def test_origin_signed_by_another_key_under_the_right_key_tag(story: Story) -> None:
    rings = relink([sign_ring(story.origin, MALLORY_KEY), *story.rings[1:]], 1)
    rejected(lambda: verify(encode_rings(rings), story=story), R.BAD_SIGNATURE, 0)


@pytest.mark.parametrize("position", [0, 31, 32, 63])
def test_flipped_signature_bit_of_newest_ring(story: Story, position: int) -> None:
    rings = wire_rings(story.encoded)
    rings[2] = flip(rings[2], position)
    rejected(lambda: verify(text_of(rings), story=story), R.BAD_SIGNATURE, 2)


@pytest.mark.parametrize("index", [0, 1])
def test_flipped_signature_of_older_ring_after_relinking(story: Story, index: int) -> None:
    rings = wire_rings(story.encoded)
    rings[index] = flip(rings[index], 5)
    rejected(lambda: verify(text_of(rings), story=story), R.BAD_SIGNATURE, index)
    rings = resign_wire(rings, index + 1)
    rejected(lambda: verify(text_of(rings), story=story), R.BAD_SIGNATURE, index)


def test_a_changed_signature_breaks_the_next_ring(story: Story) -> None:
    """Ring i's hash covers its signature, and ring i+1 signs that hash."""
    rings = wire_rings(story.encoded)
    rings[1] = flip(rings[1], 7)
    assert wire_hashes(rings)[1] != story.chain.hashes()[1]
    hop = story.chain.hops[-1]
    chain = decode_chain(text_of(rings), max_bytes=99_999, max_rings=32)
    assert not ORDERS.key.public_key.verify(hop.signature, chain.signing_input(2))


def test_all_zero_signature(story: Story) -> None:
    rings = wire_rings(story.encoded)
    rings[2] = bytes(SIGNATURE_BYTES) + rings[2][SIGNATURE_BYTES:]
    rejected(lambda: verify(text_of(rings), story=story), R.BAD_SIGNATURE, 2)


def test_malleated_signature_s_plus_l_is_rejected(story: Story) -> None:
    # Ed25519 malleability would give the same ring a second hash (chain_digest).
    rings = wire_rings(story.encoded)
    sig = rings[2][:SIGNATURE_BYTES]
    s = int.from_bytes(sig[32:], "little") + ED25519_L
    assert s < 2**256
    rings[2] = sig[:32] + s.to_bytes(32, "little") + rings[2][SIGNATURE_BYTES:]
    rejected(lambda: verify(text_of(rings), story=story), R.BAD_SIGNATURE, 2)


def test_signature_of_another_ring_is_not_transferable(story: Story, other_story: Story) -> None:
    rings = wire_rings(story.encoded)
    other = wire_rings(other_story.encoded)
    rings[2] = other[2][:SIGNATURE_BYTES] + rings[2][SIGNATURE_BYTES:]
    rejected(lambda: verify(text_of(rings), story=story), R.BAD_SIGNATURE, 2)


@pytest.mark.parametrize(
    "message",
    [
        lambda h, body: ORIGIN_DOMAIN + body,  # an origin's signing input
        lambda h, body: body,
        lambda h, body: HOP_DOMAIN + body,  # without the previous ring's hash
        lambda h, body: b"trusthop/v1/hop\x00" + h + body,
        lambda h, body: b"trusthop/v2/ring\x00" + h + body,
        lambda h, body: HOP_DOMAIN + h[:16] + body,
        lambda h, body: HOP_DOMAIN + body + h,
    ],
    ids=["origin-domain", "bare", "no-hash", "v1-domain", "ring-domain", "half-hash", "hash-last"],
)
def test_hop_signature_is_domain_separated_and_covers_the_previous_hash(
    story: Story, message: Callable[[bytes, bytes], bytes]
) -> None:
    rings = wire_rings(story.encoded)
    body = rings[2][SIGNATURE_BYTES:]
    prev = wire_hashes(rings)[1]
    assert story.chain.signing_input(2) == HOP_DOMAIN + prev + body
    rings[2] = ORDERS.key.sign(message(prev, body)) + body
    rejected(lambda: verify(text_of(rings), story=story), R.BAD_SIGNATURE, 2)


def test_origin_signature_is_domain_separated(story: Story) -> None:
    rings = wire_rings(story.encoded)
    body = rings[0][SIGNATURE_BYTES:]
    assert story.chain.signing_input(0) == ORIGIN_DOMAIN + body
    for message in (HOP_DOMAIN + body, body, b"trusthop/v1/origin\x00" + body):
        rings[0] = EDGE.key.sign(message) + body
        relinked = resign_wire(rings, 1)
        rejected(lambda relinked=relinked: verify(text_of(relinked), story=story),
                 R.BAD_SIGNATURE, 0)


# -- every signed field of every ring, one at a time ------------------------

FIELD_KEYS: dict[str, int | None] = {
    "actor": K_ACTOR,
    "key_tag": K_KEY,
    "iat": K_IAT,
    "exp": K_TTL,
    "scope": K_SCOPE,
    "subject": 10,
    "issuer": 11,
    "credential_hash": 12,
    "transaction_id": 13,
    "acr": 15,
    "amr": 16,
    "event_digest": 21,
    "destination": 22,
    "consumed_event_id": 23,
    "peer": 24,
    "x5c": 6,
    "signature": None,  # not in the body: the ring's first 64 bytes
}
A_UUID = "0b9a4c7e-5f1d-4e2a-9c3b-7d6e5f4a3b2c"

# (ring, field, new value, reason without relinking, reason after relinking)
MUTATIONS: list[tuple[int, str, Any, tuple[Reason, int], tuple[Reason, int]]] = [
    (0, "actor", ORDERS_ID, (R.UNKNOWN_KEY, 0), (R.UNKNOWN_KEY, 0)),
    (0, "actor", EDGE_ID + "x", (R.UNKNOWN_KEY, 0), (R.UNKNOWN_KEY, 0)),
    (0, "key_tag", ORDERS.key_tag, (R.UNKNOWN_KEY, 0), (R.UNKNOWN_KEY, 0)),
    (0, "key_tag", 0, (R.UNKNOWN_KEY, 0), (R.UNKNOWN_KEY, 0)),
    (0, "iat", T0 + 1, (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "iat", T0 - 5, (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "exp", T0 + 3599, (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "exp", T0 + 99999, (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "scope", S0 - {"orders:read"}, (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "scope", S0 | {"admin"}, (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "subject", "user:mallory", (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "issuer", "https://evil.example", (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "credential_hash", OTHER_HASH, (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "transaction_id", "txn-9", (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "transaction_id", A_UUID, (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "acr", "none", (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "acr", None, (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "amr", ("pwd",), (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "amr", ("otp", "pwd"), (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "amr", None, (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "signature", "flip", (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    # x5c makes the ring's key the certificate's (tests/test_x509svid.py has the rest).
    (0, "x5c", NOT_A_CERTIFICATE, (R.BAD_CERTIFICATE, 0), (R.BAD_CERTIFICATE, 0)),
    (1, "actor", ORDERS_ID, (R.UNKNOWN_KEY, 1), (R.UNKNOWN_KEY, 1)),
    (1, "actor", PAYMENTS_ID, (R.UNKNOWN_KEY, 1), (R.UNKNOWN_KEY, 1)),
    (1, "key_tag", ORDERS.key_tag, (R.UNKNOWN_KEY, 1), (R.UNKNOWN_KEY, 1)),
    (1, "key_tag", 0xFFFF, (R.UNKNOWN_KEY, 1), (R.UNKNOWN_KEY, 1)),
    (1, "iat", T0 + 11, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "iat", T0 + 20, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "exp", T0 + 1809, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "exp", T0 + 3600, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),  # ttl dropped
    (1, "exp", T0 + 3601, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "scope", S2, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "scope", S0, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),  # scope dropped
    (1, "scope", S1 | {"admin"}, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "event_digest", OTHER_HASH, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "destination", "kafka:other", (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "consumed_event_id", "evt-0", (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "consumed_event_id", A_UUID, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "peer", BROKER_PEER, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "signature", "flip", (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "x5c", NOT_A_CERTIFICATE, (R.BAD_CERTIFICATE, 1), (R.BAD_CERTIFICATE, 1)),
]
# The newest ring has nothing after it to relink: (field, value, reason,
# delivered digest override, delivered destination override).
NEWEST: list[tuple[str, Any, tuple[Reason, int], bytes | None, str | None]] = [
    ("actor", PAYMENTS_ID, (R.UNKNOWN_KEY, 2), None, None),
    ("actor", EDGE_ID, (R.UNKNOWN_KEY, 2), None, None),
    ("key_tag", PAYMENTS.key_tag, (R.UNKNOWN_KEY, 2), None, None),
    ("key_tag", ORDERS_2.key_tag, (R.BAD_SIGNATURE, 2), None, None),
    ("iat", T0 + 21, (R.BAD_SIGNATURE, 2), None, None),
    ("iat", T0 + 10, (R.BAD_SIGNATURE, 2), None, None),
    ("exp", T0 + 919, (R.BAD_SIGNATURE, 2), None, None),
    ("exp", T0 + 1810, (R.BAD_SIGNATURE, 2), None, None),  # ttl dropped
    ("exp", T0 + 1811, (R.BAD_SIGNATURE, 2), None, None),
    ("scope", frozenset(), (R.BAD_SIGNATURE, 2), None, None),
    ("scope", S1, (R.BAD_SIGNATURE, 2), None, None),  # scope dropped
    ("scope", S2 | {"admin"}, (R.BAD_SIGNATURE, 2), None, None),
    ("event_digest", OTHER_HASH, (R.BAD_SIGNATURE, 2), None, None),
    ("event_digest", OTHER_HASH, (R.BAD_SIGNATURE, 2), OTHER_HASH, None),
    ("destination", "kafka:audit", (R.BAD_SIGNATURE, 2), None, None),
    ("destination", "kafka:audit", (R.BAD_SIGNATURE, 2), None, "kafka:audit"),
    ("consumed_event_id", "evt-x", (R.BAD_SIGNATURE, 2), None, None),
    ("consumed_event_id", None, (R.BAD_SIGNATURE, 2), None, None),
    ("peer", "spiffe://prod.example.com/ns/evil/sa/proxy", (R.BAD_SIGNATURE, 2), None, None),
    ("peer", None, (R.BAD_SIGNATURE, 2), None, None),
    ("signature", "flip", (R.BAD_SIGNATURE, 2), None, None),
    ("x5c", NOT_A_CERTIFICATE, (R.BAD_CERTIFICATE, 2), None, None),
]


def _mutate(ring: Ring, name: str, value: Any) -> Ring:
    if value == "flip":
        value = flip(ring.signature, 10)
    return dataclasses.replace(ring, **{name: value})


def _ids(rows: list[Any], with_ring: bool) -> list[str]:
    return [
        f"r{r[0]}-{r[1]}-{r[3][0].value}" if with_ring else f"{r[0]}-{r[2][0].value}" for r in rows
    ]


@pytest.mark.parametrize(
    ("index", "name", "value", "plain", "relinked"), MUTATIONS, ids=_ids(MUTATIONS, True)
)
def test_mutated_older_ring(
    story: Story,
    index: int,
    name: str,
    value: Any,
    plain: tuple[Reason, int],
    relinked: tuple[Reason, int],
) -> None:
    rings = story.rings
    rings[index] = _mutate(rings[index], name, value)
    assert rings[index] != story.rings[index]
    assert encode_rings(rings) != story.encoded
    rejected(lambda: verify(encode_rings(rings), story=story), *plain)
    rings = relink(rings, index + 1)
    rejected(lambda: verify(encode_rings(rings), story=story), *relinked)


@pytest.mark.parametrize(
    ("name", "value", "expected", "digest", "destination"), NEWEST, ids=_ids(NEWEST, False)
)
def test_mutated_newest_ring(
    story: Story,
    name: str,
    value: Any,
    expected: tuple[Reason, int],
    digest: bytes | None,
    destination: str | None,
) -> None:
    rings = story.rings
    rings[2] = _mutate(rings[2], name, value)
    assert rings[2] != story.rings[2]
    rejected(
        lambda: verify(
            encode_rings(rings), digest=digest or story.digest, destination=destination or DEST2
        ),
        *expected,
    )


def test_mutation_tables_cover_every_field_and_every_wire_key(story: Story) -> None:
    """A field added to a ring later must be added to the tables above."""
    rings = wire_rings(story.encoded)
    for index, ring in enumerate(story.rings):
        fields = {m[1] for m in MUTATIONS if m[0] == index} if index < 2 else {m[0] for m in NEWEST}
        assert {f.name for f in dataclasses.fields(ring)} == fields  # type: ignore[arg-type]
        covered = {FIELD_KEYS[f] for f in fields} - {None}
        # The link tag is no field: the link tests below attack it.
        assert set(body_map(rings[index])) - {K_LINK} <= covered


def _raw_variants(value: Any) -> list[Any]:
    """Type-preserving changes of one wire value."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, value ^ 0x100]
    if isinstance(value, bytes):
        return [flip(value), flip(value, len(value) - 1)]
    if isinstance(value, str):
        return [value + "x", value[:-1] + "Z"]
    if isinstance(value, list):
        return [value[:-1], [*value, "zzz"]]
    raise AssertionError(f"unexpected wire type {type(value)}")


UNSIGNED_EDIT_REASONS = {R.MALFORMED, R.UNKNOWN_KEY, R.BAD_SIGNATURE, R.BROKEN_LINK}


def test_every_unsigned_edit_of_every_body_value_is_rejected_and_blames_its_ring(
    story: Story,
) -> None:
    """Generic sweep on the wire: each edit is refused at the edited ring, with
    a reason an edit without the key can cause (never a content reason), and
    ``broken_link`` exactly when the link tag was edited."""
    rings = wire_rings(story.encoded)
    tried = 0
    for index in range(len(rings)):
        for key, value in body_map(rings[index]).items():
            for new in _raw_variants(value):
                text = edit_ring(story.encoded, index, lambda b, k=key, n=new: b.__setitem__(k, n))
                with pytest.raises(TrustError) as info:
                    verify(text, story=story)
                err = info.value
                assert err.ring == index, (index, key, new, err)
                assert err.reason in UNSIGNED_EDIT_REASONS, (index, key, new, err)
                assert (err.reason is R.BROKEN_LINK) == (key == K_LINK), (index, key, new, err)
                if key in (K_ACTOR, K_KEY) and err.reason is not R.MALFORMED:
                    assert err.reason in (R.UNKNOWN_KEY, R.BAD_SIGNATURE)
                tried += 1
    assert tried >= 2 * (11 + 8 + 10)


def test_stripping_or_adding_a_difference_is_an_unsigned_edit(story: Story) -> None:
    """Without its scope (or ttl) a hop inherits the previous ring's, which is
    wider (or later): the signature covers the body, so it is refused."""
    for key in (K_SCOPE, K_TTL):
        text = edit_ring(story.encoded, 2, lambda b, key=key: b.pop(key))
        rejected(lambda text=text: verify(text, story=story), R.BAD_SIGNATURE, 2)
    text = edit_ring(story.encoded, 2, lambda b: b.__setitem__(K_SCOPE, sorted(S2)))
    assert text == story.encoded  # already there: the control
    text = edit_ring(story.encoded, 1, lambda b: b.__setitem__(K_TTL, 3600 - 10))
    rejected(lambda: verify(text, story=story), R.BAD_SIGNATURE, 1)


def test_a_signed_repetition_of_the_previous_scope_or_end_still_verifies(story: Story) -> None:
    """The signer omits an unchanged scope or end; written anyway it is what
    the key signed, and means the same."""
    chain = append_hop(PAYMENTS, story.chain, event_digest=OTHER_HASH, destination="kafka:x",
                       now=T0 + 25)
    rings = list(chain.ring_bytes)
    body = body_map(rings[3])
    assert K_SCOPE not in body and K_TTL not in body
    body[K_SCOPE] = sorted(S2)
    body[K_TTL] = T0 + 920 - (T0 + 25)
    rings[3] = signed_ring(body, PAYMENTS, chain.hashes()[2])
    ctx = verify(text_of(rings), digest=OTHER_HASH, destination="kafka:x")
    assert (ctx.scope, ctx.expires_at) == (S2, T0 + 920)


# -- invariant 2: links ---------------------------------------------------------


@pytest.fixture
def r(story: Story) -> list[bytes]:
    """The story's ring bytes: r[0] origin, r[1], r[2] hops."""
    return wire_rings(story.encoded)


def test_ring_removed_in_the_middle(story: Story, r: list[bytes]) -> None:
    rejected(lambda: verify(text_of([r[0], r[2]]), story=story), R.BROKEN_LINK, 1)


def test_ring_removed_and_the_link_tag_patched_is_a_bad_signature(
    story: Story, r: list[bytes]
) -> None:
    """The tag only diagnoses: making it name the new predecessor does not
    make the signature, which covers that predecessor's whole hash, verify."""
    text = text_of([r[0], r[2]])
    patched = edit_ring(text, 1, lambda b: b.__setitem__(K_LINK, link_tag(wire_hashes(r)[0])))
    rejected(lambda: verify(patched, story=story), R.BAD_SIGNATURE, 1)
    reordered = edit_ring(text_of([r[0], r[2], r[1]]), 1,
                          lambda b: b.__setitem__(K_LINK, link_tag(wire_hashes(r)[0])))
    rejected(lambda: verify(reordered, story=story), R.BAD_SIGNATURE, 1)


def test_origin_removed(story: Story, r: list[bytes]) -> None:
    rejected(lambda: verify(text_of([r[1], r[2]]), story=story), R.MALFORMED, 0)
    rejected(lambda: verify(text_of([r[2]]), story=story), R.MALFORMED)


def test_newest_ring_removed(story: Story, r: list[bytes]) -> None:
    encoded = text_of([r[0], r[1]])
    assert story.encoded.startswith(encoded + ".")
    rejected(lambda: verify(encoded, story=story), R.EVENT_MISMATCH, 1)
    # With the older event it is that older, legitimate delivery, for its own topic only.
    rejected(lambda: verify(encoded, digest=story.e1.digest()), R.WRONG_DESTINATION, 1)
    assert verify(encoded, digest=story.e1.digest(), destination=DEST1).scope == S1


def test_rings_reordered(story: Story, r: list[bytes]) -> None:
    rejected(lambda: verify(text_of([r[0], r[2], r[1]]), story=story), R.BROKEN_LINK, 1)


@pytest.mark.parametrize(
    ("layout", "reason", "ring"),
    [
        ((0, 1, 1, 2), R.BROKEN_LINK, 2),
        ((0, 1, 2, 2), R.BROKEN_LINK, 3),
        ((0, 2, 2), R.BROKEN_LINK, 1),
        ((0, 1, 2, 1), R.BROKEN_LINK, 3),
        ((0, 0, 1, 2), R.MALFORMED, 1),
        ((0, 1, 2, 0), R.MALFORMED, 3),
    ],
)
def test_ring_duplicated(
    story: Story, r: list[bytes], layout: tuple[int, ...], reason: Reason, ring: int
) -> None:
    rejected(lambda: verify(text_of([r[i] for i in layout]), story=story), reason, ring)


def test_ring_replaced_by_a_sibling_of_the_same_transaction(story: Story, r: list[bytes]) -> None:
    # Same origin, same edge actor, another event: a valid ring, but not this chain's.
    other = make_event("txn-1-other")
    sibling = append_hop(
        EDGE,
        Chain(story.origin),
        event_digest=other.digest(),
        destination=DEST1,
        now=T0 + 10,
        scope=S1,
        ttl=1800,
    )
    assert sibling.link_tags[1] == story.chain.link_tags[1]  # same parent, same tag
    text = text_of([r[0], sibling.ring_bytes[1], r[2]])
    rejected(lambda: verify(text, story=story), R.BROKEN_LINK, 2)


@pytest.mark.parametrize(
    ("layout", "reason", "ring"),
    [
        (("a0", "b1", "a2"), R.BROKEN_LINK, 1),  # middle ring replaced
        (("a0", "a1", "b2"), R.BROKEN_LINK, 2),  # newest ring spliced in
        (("b0", "a1", "a2"), R.BROKEN_LINK, 1),  # origin swapped (new subject!)
        (("a0", "a1", "a2", "b0", "b1", "b2"), R.MALFORMED, 3),  # two chains concatenated
        (("a0", "a1", "a2", "b1", "b2"), R.BROKEN_LINK, 3),
        (("b0", "b1", "a2"), R.BROKEN_LINK, 2),
        (("a0", "b2"), R.BROKEN_LINK, 1),
    ],
)
def test_rings_spliced_from_another_transaction(
    story: Story, other_story: Story, layout: tuple[str, ...], reason: Reason, ring: int
) -> None:
    source = {"a": wire_rings(story.encoded), "b": wire_rings(other_story.encoded)}
    rings = [source[name[0]][int(name[1])] for name in layout]
    rejected(lambda: verify(text_of(rings), story=story), reason, ring)


def test_two_encoded_chains_concatenated(story: Story, other_story: Story) -> None:
    for text in (story.encoded + other_story.encoded, story.encoded + "." + other_story.encoded,
                 story.encoded + other_story.encoded[1:]):
        rejected(lambda text=text: verify(text, story=story), R.MALFORMED)


def test_a_signed_link_tag_that_names_another_ring_is_a_broken_link(
    story: Story, count_signatures: list[int]
) -> None:
    """Ring 2 signed by its legitimate key after ring 1, but with a link tag
    that is not ring 1's: every signature holds, the link rule refuses it."""
    right = link_tag(story.chain.hashes()[1])
    for wrong in (right ^ 1, right ^ 0x8000, 0, 0xFFFF):
        text = newest_signed(story, lambda b, wrong=wrong: b.__setitem__(K_LINK, wrong))
        count_signatures.clear()
        err = rejected(lambda text=text: verify(text, story=story), R.BROKEN_LINK, 2)
        assert len(count_signatures) == 3  # found after every signature verified
        assert "names another previous ring" in err.message


def test_an_unsigned_link_tag_edit_is_a_broken_link(story: Story) -> None:
    for index in (1, 2):
        text = edit_ring(story.encoded, index, lambda b: b.__setitem__(K_LINK, b[K_LINK] ^ 1))
        err = rejected(lambda text=text: verify(text, story=story), R.BROKEN_LINK, index)
        assert "signed after another ring" in err.message


def test_relinking_after_a_removal_needs_every_later_key(story: Story, r: list[bytes]) -> None:
    """Only the holder of ring 2's key can re-sign it after the origin; the
    result is then a new ring that key signed, judged on its own."""
    resigned = resign_wire([r[0], r[2]], 1)
    ctx = verify(text_of(resigned), story=story)
    assert ctx.actors == (EDGE_ID, ORDERS_ID)
    assert ctx.chain.hops[0].iat == T0 + 10  # its delta is now after the origin
    # ...and without that key, patching the link tag is a bad signature (above).


# -- invariant 3 (the verifier's part; bindings are in test_bindings) --------


def test_tampered_event_data(story: Story) -> None:
    tampered = make_event("txn-1-e2", type_="payment.requested", data={"amount": 1, "order": 42})
    rejected(lambda: verify(story.encoded, digest=tampered.digest()), R.EVENT_MISMATCH, 2)


@pytest.mark.parametrize(
    "change",
    [
        {"type": "payment.refunded"},
        {"source": "/evil"},
        {"subject": "order-43"},
        {"id": "txn-1-e3"},
        {"time": "2026-01-01T00:00:11Z"},
        {"datacontenttype": "text/json"},
        {"subject": None},
        {"added": "1"},
    ],
)
def test_tampered_event_attribute(story: Story, change: dict[str, Any]) -> None:
    attrs = dict(story.e2.attributes) | change
    tampered = dataclasses.replace(
        story.e2, attributes={k: v for k, v in attrs.items() if v is not None}
    )
    assert tampered.digest() != story.digest
    rejected(lambda: verify(story.encoded, digest=tampered.digest()), R.EVENT_MISMATCH, 2)


@pytest.mark.parametrize(
    "change",
    [
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        {"tracestate": "vendor=opaque"},
    ],
)
def test_trace_context_is_unsigned(story: Story, change: dict[str, str]) -> None:
    rewritten = dataclasses.replace(story.e2, attributes=story.e2.attributes | change)
    assert verify(story.encoded, digest=rewritten.digest()).subject == "user:alice"


# -- invariant 4: narrowing (what real keys signed) ------------------------------


def _forge_newest(story: Story, **changes: Any) -> str:
    """Re-sign ring 2 with its legitimate key after ``changes``."""
    rings = story.rings
    rings[2] = sign_ring(dataclasses.replace(rings[2], **changes), ORDERS, _after(rings, 2))
    return encode_rings(rings)


@pytest.mark.parametrize("scope", [S2 | {"orders:read"}, S2 | {"admin"}, S0])
def test_widened_scope_signed_by_a_legitimate_key(story: Story, scope: frozenset[str]) -> None:
    # "orders:read" is in the origin's scope but was dropped by ring 1: still an escalation.
    rejected(lambda: verify(_forge_newest(story, scope=scope), story=story), R.SCOPE_ESCALATION, 2)


@pytest.mark.parametrize(
    "changes",
    [
        {"exp": T0 + 1811},
        {"iat": T0 + 100, "exp": T0 + 1811},
        {"iat": T0 + 1900, "exp": T0 + 2000},  # starts after the parent's end
        {"exp": T0 + 10**9},
    ],
)
def test_widened_window_signed_by_a_legitimate_key(story: Story, changes: dict[str, int]) -> None:
    rejected(lambda: verify(_forge_newest(story, **changes), story=story), R.WINDOW_ESCALATION, 2)


def test_a_hop_without_ttl_starting_after_its_parent_ended(story: Story) -> None:
    """No ttl: the hop ends when its parent does; a start after that (a big
    iat delta, signed) is a window that ends before it starts."""
    def change(body: dict[int, Any]) -> None:
        body.pop(K_TTL)
        body[K_IAT] = 1810 - 10 + 1  # one second after ring 1's end

    text = newest_signed(story, change)
    chain = decode_chain(text, max_bytes=99_999, max_rings=32)
    assert chain.newest.iat == chain.newest.exp + 1
    rejected(lambda: verify(text, story=story), R.WINDOW_ESCALATION, 2)
    # At exactly the parent's end it is a valid (zero-length) window.
    at_end = newest_signed(story, lambda b: (b.pop(K_TTL), b.__setitem__(K_IAT, 1800)))
    assert verify(at_end, story=story, now=T0 + 1810).expires_at == T0 + 1810


def test_a_hop_with_a_ttl_past_its_parent(story: Story) -> None:
    text = newest_signed(story, lambda b: b.__setitem__(K_TTL, 1800 - 10 + 1))
    rejected(lambda: verify(text, story=story), R.WINDOW_ESCALATION, 2)
    text = newest_signed(story, lambda b: b.__setitem__(K_TTL, 1800 - 10))
    assert verify(text, story=story).expires_at == T0 + 1810


def test_what_v2_cannot_express_is_refused_when_encoding(story: Story) -> None:
    """A hop before its parent, an origin ending before it starts: no bytes
    say so (iat is a delta, ttl unsigned), so no verifier rule is needed."""
    before = dataclasses.replace(story.chain.hops[1], iat=T0 + 9)
    with pytest.raises(ValueError):
        hop_body(before, story.chain.hops[0], "prod.example.com", story.chain.hashes()[1])
    with pytest.raises(ValueError):
        Chain(dataclasses.replace(story.origin, exp=T0 - 1))
    for key, index in ((K_IAT, 2), (K_TTL, 2), (K_TTL, 0)):
        text = edit_ring(story.encoded, index, lambda b, key=key: b.__setitem__(key, -1))
        rejected(lambda text=text: verify(text, story=story), R.MALFORMED, index)


def test_append_hop_refuses_a_wider_scope_with_the_consumer_reason(story: Story) -> None:
    producer = rejected(
        lambda: append_hop(
            PAYMENTS,
            story.chain,
            event_digest=OTHER_HASH,
            destination="kafka:ledger",
            now=T0 + 25,
            scope=S2 | {"orders:read"},
        ),
        R.SCOPE_ESCALATION,
        3,
    )
    hop = HopRing(
        actor=PAYMENTS_ID,
        key_tag=PAYMENTS.key_tag,
        iat=T0 + 25,
        exp=T0 + 900,
        scope=S2 | {"orders:read"},
        event_digest=OTHER_HASH,
        destination="kafka:ledger",
    )
    forged = story.chain.appended(sign_ring(hop, PAYMENTS, story.chain))  # type: ignore[arg-type]
    consumer = rejected(
        lambda: verify(forged.encode(), digest=OTHER_HASH, destination="kafka:ledger"),
        R.SCOPE_ESCALATION,
        3,
    )
    assert producer.reason is consumer.reason and producer.ring == consumer.ring


def test_append_hop_never_signs_a_window_longer_than_its_parent(story: Story) -> None:
    chain = append_hop(
        PAYMENTS,
        story.chain,
        event_digest=OTHER_HASH,
        destination="kafka:x",
        now=T0 + 25,
        ttl=10**6,
    )
    assert chain.hops[-1].exp == story.chain.hops[-1].exp
    assert K_TTL not in body_map(chain.ring_bytes[-1])
    assert verify(chain.encode(), digest=OTHER_HASH, destination="kafka:x").scope == S2


# -- invariant 5: destination ----------------------------------------------


@pytest.mark.parametrize(
    "consumed_from",
    [
        DEST1,
        "kafka:payments.dlq",
        "kafka:Payments",
        "kafka:payments ",
        "amqp:/payments",
        "amqp:payments/",
        kafka_destination("payments-replay"),
    ],
)
def test_event_consumed_from_another_destination(story: Story, consumed_from: str) -> None:
    rejected(
        lambda: verify(story.encoded, destination=consumed_from, story=story),
        R.WRONG_DESTINATION,
        2,
    )


def test_amqp_destination_includes_the_routing_key(story: Story) -> None:
    signed_for = amqp_destination("shop", "order.placed")
    chain = append_hop(
        PAYMENTS, story.chain, event_digest=OTHER_HASH, destination=signed_for, now=T0 + 25
    )
    assert (
        verify(chain.encode(), digest=OTHER_HASH, destination=signed_for).actors[-1] == PAYMENTS_ID
    )
    for other in (
        amqp_destination("shop", "order.cancelled"),
        amqp_destination("", "shop"),
        amqp_destination("audit", "order.placed"),
    ):
        rejected(
            lambda other=other: verify(chain.encode(), digest=OTHER_HASH, destination=other),
            R.WRONG_DESTINATION,
            3,
        )


def test_destination_names_cannot_be_made_ambiguous() -> None:
    with pytest.raises(ValueError, match="'/'"):
        amqp_destination("shop/order", "placed")
    with pytest.raises(ValueError, match="empty"):
        kafka_destination("")
    assert amqp_destination("", "q") == "amqp:/q"


# -- invariant 6: bounds come first (counted, never timed) -----------------------


@pytest.fixture
def key_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every question any trust bundle is asked about a key, an actor or an authority."""
    asked: list[str] = []
    for name in ("key_for", "entry_of", "get", "x509_authorities", "is_revoked_actor"):
        original = getattr(TrustBundle, name)

        def recording(self: TrustBundle, *args: Any, _name: str = name,
                      _original: Any = original) -> Any:
            asked.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(TrustBundle, name, recording)
    return asked


@pytest.fixture
def count_signatures(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per signature verification."""
    return count_signature_checks(monkeypatch)


@pytest.fixture
def ring_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ring segment the decoder base64-decodes."""
    calls: list[str] = []
    original = chain_module.b64url_decode
    monkeypatch.setattr(chain_module, "b64url_decode", lambda s: calls.append(s) or original(s))
    return calls


@pytest.fixture
def before_anything(
    key_lookups: list[str], count_signatures: list[int], ring_decodes: list[str]
) -> Iterator[None]:
    yield
    assert key_lookups == [] and count_signatures == [] and ring_decodes == []


def _long_chain(rings: int) -> Chain:
    chain = build_story().chain
    signers = [PAYMENTS, ORDERS]
    for n in range(rings - 3):
        chain = append_hop(
            signers[n % 2], chain, event_digest=OTHER_HASH, destination="kafka:loop", now=T0 + 25
        )
    assert len(chain.rings) == rings
    return chain


@pytest.mark.usefixtures("before_anything")
@pytest.mark.parametrize("size", [16 * 1024 + 1, 10 * 1024 * 1024])
def test_too_large_before_any_decoding_key_lookup_or_signature(size: int) -> None:
    for text in ("A" * size, "2." + "A" * (size - 2), "2." + "." * (size - 2)):
        rejected(lambda text=text: verify(text), R.TOO_LARGE)


@pytest.mark.usefixtures("before_anything")
def test_too_large_for_a_validly_signed_chain() -> None:
    chain = _long_chain(8)
    limits = Limits(max_bytes=len(chain.encode()) - 1)
    rejected(lambda: verify(chain.encode(), digest=OTHER_HASH, destination="kafka:loop",
                            limits=limits), R.TOO_LARGE)


def test_size_limit_boundary(story: Story) -> None:
    size = len(story.encoded)
    assert verify(story.encoded, story=story, limits=Limits(max_bytes=size)).scope == S2
    rejected(
        lambda: verify(story.encoded, story=story, limits=Limits(max_bytes=size - 1)), R.TOO_LARGE
    )


@pytest.mark.usefixtures("before_anything")
@pytest.mark.parametrize("rings", [33, 34, 1000])
def test_depth_from_the_dots_before_anything_else(rings: int) -> None:
    for body in ("A" * 88, "", "!"):
        text = "2." + ".".join([body] * rings)
        rejected(lambda text=text: verify(text, limits=Limits(max_bytes=10**6)),
                 R.DEPTH_EXCEEDED)


@pytest.mark.usefixtures("before_anything")
def test_depth_of_a_validly_signed_long_chain_before_any_signature() -> None:
    chain = _long_chain(6)
    rejected(
        lambda: verify(
            chain.encode(),
            digest=OTHER_HASH,
            destination="kafka:loop",
            limits=Limits(max_rings=5),
        ),
        R.DEPTH_EXCEEDED,
    )


def test_ring_count_boundary(count_signatures: list[int]) -> None:
    chain = _long_chain(6)
    ctx = verify(
        chain.encode(), digest=OTHER_HASH, destination="kafka:loop", limits=Limits(max_rings=6)
    )
    assert len(ctx.actors) == 6 and len(count_signatures) == 6
    rejected(
        lambda: verify(
            chain.encode(), digest=OTHER_HASH, destination="kafka:loop", limits=Limits(max_rings=5)
        ),
        R.DEPTH_EXCEEDED,
    )
    assert len(count_signatures) == 6


def test_default_limits_refuse_33_rings(story: Story, ring_decodes: list[str]) -> None:
    ring = story.encoded.split(".")[-1]
    rejected(lambda: verify("2." + ".".join([ring] * 33)), R.DEPTH_EXCEEDED)
    assert ring_decodes == []
    # 32 rings pass the count and fail later, as malformed (ring 0 is a hop ring).
    rejected(lambda: verify("2." + ".".join([ring] * 32)), R.MALFORMED, 0)


@pytest.mark.usefixtures("key_lookups", "count_signatures")
@pytest.mark.parametrize(
    "encoded", ["", "!!!", "2", "2.", "2..", "1.AAAA.AAAA", "2.AAAA", "2.AAAA.AAAA", "kQE"]
)
def test_malformed_before_any_key_lookup(
    encoded: str, key_lookups: list[str], count_signatures: list[int]
) -> None:
    rejected(lambda: verify(encoded), R.MALFORMED)
    assert key_lookups == [] and count_signatures == []


def test_key_checks_come_before_signatures_and_content_checks_after(
    story: Story, count_signatures: list[int]
) -> None:
    before = [
        (
            lambda: verify(story.encoded, story=story, bundle=make_bundle(drop=["orders-1"])),
            R.UNKNOWN_KEY,
        ),
        (
            lambda: verify(story.encoded, story=story, bundle=make_bundle(revoked_kids=["edge-1"])),
            R.REVOKED,
        ),
    ]
    for fn, reason in before:
        rejected(fn, reason)
    assert count_signatures == []
    after = [
        (lambda: verify(story.encoded, digest=OTHER_HASH), R.EVENT_MISMATCH),
        (lambda: verify(story.encoded, story=story, destination=DEST1), R.WRONG_DESTINATION),
        (lambda: verify(story.encoded, story=story, now=T0 + 5000), R.EXPIRED),
        (lambda: verify(story.encoded, story=story, now=T0 - 5000), R.NOT_YET_VALID),
        (
            lambda: verify(_forge_newest(story, scope=S1 | {"admin"}), story=story),
            R.SCOPE_ESCALATION,
        ),
        (
            lambda: verify(newest_signed(story, lambda b: b.__setitem__(K_LINK, 7)), story=story),
            R.BROKEN_LINK,
        ),
    ]
    for fn, reason in after:
        count_signatures.clear()
        rejected(fn, reason)
        assert len(count_signatures) == 3  # every signature held before the content rule


# -- time --------------------------------------------------------------------

NEWEST_IAT, NEWEST_EXP = T0 + 20, T0 + 920


@pytest.mark.parametrize(
    ("now", "leeway", "reason"),
    [
        (NEWEST_EXP, 0, None),
        (NEWEST_EXP + 1, 0, R.EXPIRED),
        (NEWEST_EXP + 0.001, 0, R.EXPIRED),
        (NEWEST_EXP + 60, 60, None),
        (NEWEST_EXP + 60.5, 60, R.EXPIRED),
        (NEWEST_EXP + 61, 60, R.EXPIRED),
        (NEWEST_IAT, 0, None),
        (NEWEST_IAT - 1, 0, R.NOT_YET_VALID),
        (NEWEST_IAT - 0.001, 0, R.NOT_YET_VALID),
        (NEWEST_IAT - 60, 60, None),
        (NEWEST_IAT - 61, 60, R.NOT_YET_VALID),
        (T0 + 3000, 60, R.EXPIRED),  # the origin is still valid: the newest ring rules
    ],
)
def test_time_window_edges(story: Story, now: float, leeway: int, reason: Reason | None) -> None:
    limits = Limits(leeway=leeway)
    if reason is None:
        assert verify(story.encoded, story=story, now=now, limits=limits).expires_at == NEWEST_EXP
    else:
        rejected(lambda: verify(story.encoded, story=story, now=now, limits=limits), reason)


def test_newest_times_are_the_sum_of_the_deltas(story: Story) -> None:
    chain = decode_chain(story.encoded, max_bytes=99_999, max_rings=32)
    assert [r.iat for r in chain.rings] == [T0, T0 + 10, T0 + 20]
    assert [r.exp for r in chain.rings] == [T0 + 3600, T0 + 1810, T0 + 920]


def test_max_age_counts_from_the_newest_ring(story: Story) -> None:
    limits = Limits(max_age=30, leeway=0)
    assert verify(story.encoded, story=story, now=NEWEST_IAT + 30, limits=limits)
    rejected(lambda: verify(story.encoded, story=story, now=NEWEST_IAT + 31, limits=limits),
             R.EXPIRED)


def test_a_clock_that_is_not_a_number_fails_closed() -> None:
    ring = HopRing(
        actor="spiffe://d/a",
        key_tag=1,
        iat=0,
        exp=10,
        scope=frozenset(),
        event_digest=b"\0" * 32,
        destination="kafka:t",
    )
    for now in (float("nan"), float("inf"), float("-inf")):
        rejected(lambda now=now: check_window(ring, now, 60), R.EXPIRED)


# -- order of checks (the module docstring is the contract) -------------------


def test_key_checks_of_every_ring_come_before_any_signature(story: Story) -> None:
    text = edit_ring(story.encoded, 1, lambda b: b.__setitem__(K_LINK, 0))  # unsigned edit
    text = edit_ring(text, 2, lambda b: b.__setitem__(K_KEY, 0))
    rejected(lambda: verify(text, story=story), R.UNKNOWN_KEY, 2)


def test_an_unsigned_edit_cannot_choose_its_reason(story: Story) -> None:
    # Widening a scope or moving a window without the actor's key is a bad
    # signature, never a content reason blaming the actor; a link tag edited
    # without the key is a broken link (the tag no longer names ring 0).
    edits: list[tuple[int, Any, Reason]] = [
        (K_SCOPE, sorted(S1 | {"admin"}), R.BAD_SIGNATURE),
        (K_TTL, 10**6, R.BAD_SIGNATURE),
        (K_IAT, 5000, R.BAD_SIGNATURE),
        (K_LINK, 0, R.BROKEN_LINK),
    ]
    for key, value, reason in edits:
        rings = wire_rings(edit_ring(story.encoded, 1,
                                     lambda b, k=key, v=value: b.__setitem__(k, v)))
        text = text_of(resign_wire(rings, 2))
        rejected(lambda text=text: verify(text, story=story), reason, 1)


def test_binding_before_link_within_a_ring(story: Story) -> None:
    text = edit_ring(story.encoded, 2, lambda b: (b.__setitem__(K_KEY, 0),
                                                  b.__setitem__(K_LINK, 0)))
    rejected(lambda: verify(text, story=story), R.UNKNOWN_KEY, 2)


def test_structure_before_delivery_before_time(story: Story) -> None:
    forged = _forge_newest(story, scope=S2 | {"admin"})
    rejected(
        lambda: verify(forged, digest=OTHER_HASH, destination="x", now=0), R.SCOPE_ESCALATION, 2
    )
    rejected(
        lambda: verify(story.encoded, digest=OTHER_HASH, destination="x", now=0),
        R.EVENT_MISMATCH,
        2,
    )
    rejected(
        lambda: verify(story.encoded, story=story, destination="x", now=0), R.WRONG_DESTINATION, 2
    )


def test_signatures_before_time(story: Story) -> None:
    rings = wire_rings(story.encoded)
    rings[2] = bytes(SIGNATURE_BYTES) + rings[2][SIGNATURE_BYTES:]
    rejected(lambda: verify(text_of(rings), story=story, now=T0 + 5000), R.BAD_SIGNATURE, 2)


def test_origin_only_chain_is_malformed_before_any_key_lookup(
    story: Story, key_lookups: list[str]
) -> None:
    only = Chain(story.origin).encode()
    rejected(lambda: verify(only, story=story), R.MALFORMED)
    assert key_lookups == []
    rejected(
        lambda: verify_decoded(Chain(story.origin), bundle=BUNDLE, event_digest=story.digest,
                               destination=DEST2, now=NOW),
        R.MALFORMED,
    )
    assert key_lookups == []


def test_verify_chain_result_matches_verify_decoded(story: Story) -> None:
    a = verify_chain(
        story.encoded,
        bundle=BUNDLE,
        event_digest=story.digest,
        destination=DEST2,
        now=NOW,
        event_id="txn-1-e2",
    )
    b = verify_decoded(
        story.chain,
        bundle=BUNDLE,
        event_digest=story.digest,
        destination=DEST2,
        now=NOW,
        event_id="txn-1-e2",
    )
    assert a == b
    assert a.event_id == "txn-1-e2"


@pytest.mark.parametrize("swap", ["origin", "hops"])
def test_rebuilding_a_chain_from_rings_of_two_chains_never_verifies(
    story: Story, other_story: Story, swap: str
) -> None:
    """Chain(...) re-encodes the rings it is given (new link tags, new hashes):
    rings of two transactions put together still fail at their signatures."""
    story.chain.hashes()
    spliced = dataclasses.replace(story.chain, **{swap: getattr(other_story.chain, swap)})
    assert spliced.hashes() == wire_hashes(spliced.ring_bytes)
    rejected(
        lambda: verify_decoded(
            spliced, bundle=BUNDLE, event_digest=story.digest, destination=DEST2, now=NOW
        ),
        R.BAD_SIGNATURE,
        1,
    )


# -- verified prefixes (what SignatureCache hands verify_with_keys) ---------------


def _child(story: Story) -> Chain:
    return append_hop(PAYMENTS, story.chain, event_digest=OTHER_HASH, destination="kafka:x",
                      now=T0 + 25)


def _verify_child(child: Chain, *, verified: VerifiedPrefix | None,
                  bundle: TrustBundle = BUNDLE, check_signatures: bool = True) -> VerifiedContext:
    return verify_with_keys(child, bundle=bundle, event_digest=OTHER_HASH, destination="kafka:x",
                            now=NOW, verified=verified, check_signatures=check_signatures)[0]


def _parent_prefix(story: Story, bundle: TrustBundle = BUNDLE) -> VerifiedPrefix:
    _, keys = verify_with_keys(story.chain, bundle=bundle, event_digest=story.digest,
                               destination=DEST2, now=NOW)
    assert [k.kid for k in keys] == ["edge-1", "edge-1", "orders-1"]
    return VerifiedPrefix(tuple(keys), bundle)


def test_a_verified_prefix_skips_only_its_own_signatures(
    story: Story, count_signatures: list[int]
) -> None:
    prefix = _parent_prefix(story)
    child = _child(story)
    count_signatures.clear()
    assert _verify_child(child, verified=prefix).actors[-1] == PAYMENTS_ID
    assert len(count_signatures) == 1
    # A forged ring after the verified prefix is still checked.
    forged = child.ring_bytes[-1][:SIGNATURE_BYTES - 1] + b"\x00" + child.ring_bytes[-1][64:]
    bad = decode_chain(text_of([*child.ring_bytes[:3], forged]), max_bytes=99_999, max_rings=32)
    rejected(lambda: _verify_child(bad, verified=prefix), R.BAD_SIGNATURE, 3)


def test_a_verified_prefix_is_judged_again_against_another_bundle(
    story: Story, count_signatures: list[int]
) -> None:
    prefix = _parent_prefix(story)
    child = _child(story)
    same_content = make_bundle()
    count_signatures.clear()
    assert _verify_child(child, verified=prefix, bundle=same_content)
    assert len(count_signatures) == 1
    rejected(lambda: _verify_child(child, verified=prefix,
                                   bundle=make_bundle(revoked_kids=["orders-1"])), R.REVOKED, 2)
    rejected(lambda: _verify_child(child, verified=prefix,
                                   bundle=make_bundle(revoked_actors=[EDGE_ID])), R.REVOKED, 0)


def test_a_prefix_verified_under_a_key_now_replaced_is_verified_again(
    story: Story, count_signatures: list[int]
) -> None:
    """The edge's key tag now selects another key (a tag twin): the cached
    verdict on ring 0 was about the old key and no longer counts."""
    prefix = _parent_prefix(story)
    child = _child(story)
    twin = BundleKey("edge-twin", EDGE_ID, EDGE_TAG_TWIN.public_key)
    bundle = TrustBundle.of([twin, *(k for k in BUNDLE.keys.values() if k.kid != "edge-1")])
    assert bundle.key_for(EDGE_ID, EDGE.key_tag) == twin
    count_signatures.clear()
    rejected(lambda: _verify_child(child, verified=prefix, bundle=bundle), R.BAD_SIGNATURE, 0)


def test_without_signatures_keys_links_and_narrowing_are_still_checked(story: Story) -> None:
    child = _child(story)
    assert _verify_child(child, verified=None, check_signatures=False)
    rejected(lambda: _verify_child(child, verified=None, check_signatures=False,
                                   bundle=make_bundle(drop=["payments-1"])), R.UNKNOWN_KEY, 3)
    text = edit_ring(child.encode(), 3, lambda b: b.__setitem__(K_LINK, b[K_LINK] ^ 1))
    bad_link = decode_chain(text, max_bytes=99_999, max_rings=32)
    rejected(lambda: _verify_child(bad_link, verified=None, check_signatures=False),
             R.BROKEN_LINK, 3)
    wide = edit_ring(child.encode(), 3, lambda b: b.__setitem__(K_SCOPE, sorted(S1)))
    rejected(lambda: _verify_child(decode_chain(wide, max_bytes=99_999, max_rings=32),
                                   verified=None, check_signatures=False),
             R.SCOPE_ESCALATION, 3)


def test_the_signature_cache_recognises_a_parent_by_its_text_and_checks_the_rest(
    story: Story, count_signatures: list[int]
) -> None:
    cache = SignatureCache(16)
    parent = cache.decode(story.encoded)
    cache.verify(parent, bundle=BUNDLE, event_digest=story.digest, destination=DEST2, now=NOW,
                 limits=Limits())
    child = _child(story)
    count_signatures.clear()
    decoded = cache.decode(child.encode())
    assert decoded == child
    cache.verify(decoded, bundle=BUNDLE, event_digest=OTHER_HASH, destination="kafka:x", now=NOW,
                 limits=Limits())
    assert len(count_signatures) == 1
    # A ring signed after another parent, appended to the cached parent's text.
    other = append_hop(PAYMENTS, build_story("txn-2").chain, event_digest=OTHER_HASH,
                       destination="kafka:x", now=T0 + 25)
    spliced = story.encoded + "." + other.encode().rsplit(".", 1)[1]
    rejected(lambda: cache.verify(cache.decode(spliced), bundle=BUNDLE, event_digest=OTHER_HASH,
                                  destination="kafka:x", now=NOW, limits=Limits()),
             R.BROKEN_LINK, 3)
    # A text sharing the parent's characters but not ending at a ring boundary.
    longer = story.encoded + "A." + child.encode().rsplit(".", 1)[1]
    rejected(lambda: cache.decode(longer), R.MALFORMED, 2)


# -- who may start a chain ---------------------------------------------------


def test_only_listed_edge_actors_may_mint_origins(story: Story) -> None:
    def check(**expect: Any) -> VerifiedContext:
        return verify_chain(
            story.encoded,
            bundle=BUNDLE,
            event_digest=story.digest,
            destination=DEST2,
            now=NOW,
            **expect,
        )

    assert check(origin_actors=frozenset({EDGE.actor})).subject == story.chain.origin.subject
    # A workload with a perfectly valid key that is not an edge cannot start a chain.
    rejected(lambda: check(origin_actors=frozenset({ORDERS_ID})), R.UNAUTHORIZED_ACTOR, 0)
    rejected(lambda: check(origin_actors=frozenset()), R.UNAUTHORIZED_ACTOR, 0)
    assert check(trust_domain="prod.example.com").trust_domain == "prod.example.com"
    rejected(lambda: check(trust_domain="prod.example.co"), R.UNAUTHORIZED_ACTOR, 0)


def test_pack_is_the_body_encoding(story: Story) -> None:
    """The bodies are canonical msgpack: pack() of the decoded map gives them back."""
    for ring in wire_rings(story.encoded):
        assert pack(body_map(ring)) == ring[SIGNATURE_BYTES:]


def test_bounds_come_first_for_a_consumer_whose_cache_knows_the_prefix(
    story: Story, key_lookups: list[str], count_signatures: list[int], ring_decodes: list[str]
) -> None:
    """A verifier that cached the story still reads size and depth first, off
    the text, when a chain extending the cached text arrives."""
    from trusthop.pipeline import ChainVerifier

    verifier = ChainVerifier(BUNDLE, clock=lambda: NOW)
    wire = dataclasses.replace(story.e2, chain=story.encoded)
    assert verifier.verify(wire, DEST2).context.actors[-1] == ORDERS_ID
    key_lookups.clear()
    count_signatures.clear()
    ring_decodes.clear()
    ring = story.encoded.rsplit(".", 1)[1]
    for text, reason in ((story.encoded + ("." + ring) * 30, R.DEPTH_EXCEEDED),
                         (story.encoded + "." + "A" * Limits().max_bytes, R.TOO_LARGE)):
        rejected(lambda text=text: verifier.verify(dataclasses.replace(wire, chain=text), DEST2),
                 reason)
    assert key_lookups == [] and count_signatures == [] and ring_decodes == []
