"""Attacks on trusthop.verify: every invariant of the brief, every reason code.

Each test builds the attack by hand (re-encoding canonically, re-signing with
legitimate keys where an attacker could) and asserts the exact reason and,
where one ring is to blame, its index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any

import pytest
from chainkit import (
    BROKER_PEER,
    BUNDLE,
    DEST1,
    DEST2,
    EDGE,
    FOREIGN,
    FOREIGN_ID,
    MALLORY_KEY,
    NOW,
    ORDERS,
    ORDERS_2,
    ORDERS_ID,
    PAYMENTS,
    PAYMENTS_ID,
    S0,
    S1,
    S2,
    T0,
    Story,
    build_story,
    encode_bytes,
    encode_raw,
    encode_rings,
    flip,
    make_bundle,
    make_event,
    raw_maps,
    rejected,
    relink,
    sign_ring,
    verify,
)

from trusthop.bundle import BundleKey, TrustBundle
from trusthop.canonical import b64url_decode, pack
from trusthop.chain import (
    HOP_DOMAIN,
    K_ACR,
    K_ACTOR,
    K_AMR,
    K_CONSUMED,
    K_CRED_HASH,
    K_DEST,
    K_EVENT,
    K_EXP,
    K_IAT,
    K_ISSUER,
    K_KID,
    K_PEER,
    K_PREV,
    K_SCOPE,
    K_SIG,
    K_SUBJECT,
    K_TRUST_DOMAIN,
    K_TXN,
    K_X5C,
    ORIGIN_DOMAIN,
    Chain,
    HopRing,
    Ring,
    ring_hash,
    ring_map,
)
from trusthop.destination import amqp_destination, kafka_destination
from trusthop.errors import Reason, TrustError
from trusthop.keys import PublicKey
from trusthop.sign import append_hop, mint_origin
from trusthop.verify import Limits, VerifiedContext, verify_chain, verify_decoded

R = Reason
ED25519_L = 2**252 + 27742317777372353535851937790883648493


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
    assert ctx.chain_digest == ring_hash(story.chain.hops[-1])
    assert ctx.chain == story.chain


def test_redelivery_of_the_same_bytes_verifies_again(story: Story) -> None:
    first = verify(story.encoded, story=story)
    second = verify(story.encoded, story=story)
    assert first.chain_digest == second.chain_digest


def test_missing_chain() -> None:
    rejected(lambda: verify(None), R.MISSING_CHAIN)


# -- invariant 1: keys, binding, revocation, signatures ---------------------


def test_unknown_kid(story: Story) -> None:
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
    rings[2] = sign_ring(dataclasses.replace(rings[2], kid=ORDERS_2.kid), ORDERS_2)
    assert verify(encode_rings(rings), story=story).actors[-1] == ORDERS_ID
    rejected(lambda: verify(encode_rings(rings), bundle=bundle, story=story), R.REVOKED, 2)


def test_revocation_applies_on_retry(story: Story) -> None:
    verify(story.encoded, story=story)
    later = make_bundle(revoked_kids=["edge-1"])
    rejected(lambda: verify(story.encoded, bundle=later, story=story), R.REVOKED, 0)


def test_key_of_actor_a_in_a_ring_naming_actor_b(story: Story) -> None:
    # The orders service signs, with its own key and kid, a ring claiming to be payments.
    rings = story.rings
    rings[2] = sign_ring(dataclasses.replace(rings[2], actor=PAYMENTS_ID), ORDERS)
    rejected(lambda: verify(encode_rings(rings), story=story), R.UNAUTHORIZED_ACTOR, 2)


def test_key_of_actor_a_in_an_origin_naming_actor_b(story: Story) -> None:
    rings = relink(
        [sign_ring(dataclasses.replace(story.origin, actor=ORDERS_ID), EDGE), *story.rings[1:]], 1
    )
    rejected(lambda: verify(encode_rings(rings), story=story), R.UNAUTHORIZED_ACTOR, 0)


def test_hop_actor_outside_the_origin_trust_domain(story: Story) -> None:
    # The foreign key is in the bundle and bound to its actor: only the domain is wrong.
    hop = HopRing(
        actor=FOREIGN_ID,
        kid=FOREIGN.kid,
        iat=T0 + 25,
        exp=T0 + 900,
        scope=S2,
        prev_hash=story.chain.hashes()[-1],
        event_digest=story.digest,
        destination=DEST2,
    )
    chain = story.chain.appended(sign_ring(hop, FOREIGN))  # type: ignore[arg-type]
    rejected(lambda: verify(chain.encode(), story=story), R.UNAUTHORIZED_ACTOR, 3)
    # The producer side refuses with the same reason.
    rejected(
        lambda: append_hop(
            FOREIGN, story.chain, event_digest=story.digest, destination=DEST2, now=T0 + 25
        ),
        R.UNAUTHORIZED_ACTOR,
    )


def test_foreign_origin_cannot_carry_hops_of_our_domain(story: Story) -> None:
    origin = mint_origin(
        FOREIGN,
        subject="user:alice",
        issuer="https://idp.partner.example",
        credential="t",
        scope=S0,
        now=T0,
        transaction_id="txn-1",
    )
    rings = relink([origin, *story.rings[1:]], 1)
    rejected(lambda: verify(encode_rings(rings), story=story), R.UNAUTHORIZED_ACTOR, 1)


def test_origin_naming_another_trust_domain_than_its_actor(story: Story) -> None:
    origin = sign_ring(dataclasses.replace(story.origin, trust_domain="partner.example.org"), EDGE)
    rings = relink([origin, *story.rings[1:]], 1)
    rejected(lambda: verify(encode_rings(rings), story=story), R.UNAUTHORIZED_ACTOR, 0)


@pytest.mark.parametrize(
    "signer",
    [MALLORY_KEY, ORDERS_2.key, PAYMENTS.key, EDGE.key],
    ids=["unbundled", "same-actor-other-key", "other-actor", "edge"],
)
def test_signature_by_another_key_under_the_right_kid(story: Story, signer: Any) -> None:
    rings = story.rings
    rings[2] = sign_ring(rings[2], signer)
    rejected(lambda: verify(encode_rings(rings), story=story), R.BAD_SIGNATURE, 2)


def test_origin_signed_by_another_key_under_the_right_kid(story: Story) -> None:
    rings = relink([sign_ring(story.origin, MALLORY_KEY), *story.rings[1:]], 1)
    rejected(lambda: verify(encode_rings(rings), story=story), R.BAD_SIGNATURE, 0)


@pytest.mark.parametrize("position", [0, 31, 32, 63])
def test_flipped_signature_bit_of_newest_ring(story: Story, position: int) -> None:
    rings = story.rings
    rings[2] = dataclasses.replace(rings[2], signature=flip(rings[2].signature, position))
    rejected(lambda: verify(encode_rings(rings), story=story), R.BAD_SIGNATURE, 2)


@pytest.mark.parametrize("index", [0, 1])
def test_flipped_signature_of_older_ring_after_relinking(story: Story, index: int) -> None:
    rings = story.rings
    rings[index] = dataclasses.replace(rings[index], signature=flip(rings[index].signature, 5))
    rings = relink(rings, index + 1)
    rejected(lambda: verify(encode_rings(rings), story=story), R.BAD_SIGNATURE, index)


def test_all_zero_signature(story: Story) -> None:
    rings = story.rings
    rings[2] = dataclasses.replace(rings[2], signature=bytes(64))
    rejected(lambda: verify(encode_rings(rings), story=story), R.BAD_SIGNATURE, 2)


def test_malleated_signature_s_plus_l_is_rejected(story: Story) -> None:
    # Ed25519 malleability would give the same ring a second hash (chain_digest).
    rings = story.rings
    sig = rings[2].signature
    s = int.from_bytes(sig[32:], "little") + ED25519_L
    assert s < 2**256
    rings[2] = dataclasses.replace(rings[2], signature=sig[:32] + s.to_bytes(32, "little"))
    rejected(lambda: verify(encode_rings(rings), story=story), R.BAD_SIGNATURE, 2)


def test_signature_of_another_ring_is_not_transferable(story: Story, other_story: Story) -> None:
    rings = story.rings
    rings[2] = dataclasses.replace(rings[2], signature=other_story.rings[2].signature)
    rejected(lambda: verify(encode_rings(rings), story=story), R.BAD_SIGNATURE, 2)


@pytest.mark.parametrize("prefix", [ORIGIN_DOMAIN, b"", b"trusthop/v2/hop\x00"])
def test_hop_signature_is_domain_separated(story: Story, prefix: bytes) -> None:
    rings = story.rings
    hop = rings[2]
    assert isinstance(hop, HopRing)
    assert hop.signing_input().startswith(HOP_DOMAIN)
    forged = ORDERS.key.sign(prefix + pack(hop.fields()))
    rings[2] = dataclasses.replace(hop, signature=forged)
    rejected(lambda: verify(encode_rings(rings), story=story), R.BAD_SIGNATURE, 2)


# -- every signed field of every ring, one at a time ------------------------

FIELD_KEYS = {
    "actor": K_ACTOR,
    "kid": K_KID,
    "iat": K_IAT,
    "exp": K_EXP,
    "scope": K_SCOPE,
    "subject": K_SUBJECT,
    "issuer": K_ISSUER,
    "credential_hash": K_CRED_HASH,
    "transaction_id": K_TXN,
    "trust_domain": K_TRUST_DOMAIN,
    "acr": K_ACR,
    "amr": K_AMR,
    "prev_hash": K_PREV,
    "event_digest": K_EVENT,
    "destination": K_DEST,
    "consumed_event_id": K_CONSUMED,
    "peer": K_PEER,
    "signature": K_SIG,
    "x5c": K_X5C,
}
NOT_A_CERTIFICATE = (b"\x30\x00",)
OTHER_HASH = hashlib.sha256(b"something else").digest()

# (ring, field, new value, reason without relinking, reason after relinking)
MUTATIONS: list[tuple[int, str, Any, tuple[Reason, int], tuple[Reason, int]]] = [
    (0, "actor", ORDERS_ID, (R.UNAUTHORIZED_ACTOR, 0), (R.UNAUTHORIZED_ACTOR, 0)),
    (0, "kid", "no-such-kid", (R.UNKNOWN_KEY, 0), (R.UNKNOWN_KEY, 0)),
    (0, "kid", "orders-1", (R.UNAUTHORIZED_ACTOR, 0), (R.UNAUTHORIZED_ACTOR, 0)),
    (0, "iat", T0 + 1, (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "iat", T0 + 3601, (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "exp", T0 + 3599, (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "exp", T0 + 99999, (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "scope", S0 - {"orders:read"}, (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "scope", S0 | {"admin"}, (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "subject", "user:mallory", (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "issuer", "https://evil.example", (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "credential_hash", OTHER_HASH, (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "transaction_id", "txn-9", (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (
        0,
        "trust_domain",
        "partner.example.org",
        (R.UNAUTHORIZED_ACTOR, 0),
        (R.UNAUTHORIZED_ACTOR, 0),
    ),
    (0, "acr", "none", (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "acr", None, (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "amr", ("pwd",), (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "amr", None, (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    (0, "signature", "flip", (R.BAD_SIGNATURE, 0), (R.BAD_SIGNATURE, 0)),
    # x5c makes the ring's key the certificate's (tests/test_x509svid.py has the rest).
    (0, "x5c", NOT_A_CERTIFICATE, (R.BAD_CERTIFICATE, 0), (R.BAD_CERTIFICATE, 0)),
    (1, "actor", ORDERS_ID, (R.UNAUTHORIZED_ACTOR, 1), (R.UNAUTHORIZED_ACTOR, 1)),
    (1, "kid", "no-such-kid", (R.UNKNOWN_KEY, 1), (R.UNKNOWN_KEY, 1)),
    (1, "kid", "orders-1", (R.UNAUTHORIZED_ACTOR, 1), (R.UNAUTHORIZED_ACTOR, 1)),
    (1, "iat", T0 + 11, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "iat", T0 - 1, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "iat", T0 + 1811, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "exp", T0 + 1809, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "exp", T0 + 3601, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "scope", S2, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "scope", S1 | {"orders:read"}, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "scope", S1 | {"admin"}, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "prev_hash", OTHER_HASH, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "event_digest", OTHER_HASH, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "destination", "kafka:other", (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "consumed_event_id", "evt-0", (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "peer", BROKER_PEER, (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "signature", "flip", (R.BAD_SIGNATURE, 1), (R.BAD_SIGNATURE, 1)),
    (1, "x5c", NOT_A_CERTIFICATE, (R.BAD_CERTIFICATE, 1), (R.BAD_CERTIFICATE, 1)),
]
# The newest ring has nothing after it to relink: (ring, field, value, reason,
# delivered digest override, delivered destination override).
NEWEST: list[tuple[str, Any, tuple[Reason, int], bytes | None, str | None]] = [
    ("actor", PAYMENTS_ID, (R.UNAUTHORIZED_ACTOR, 2), None, None),
    ("kid", "no-such-kid", (R.UNKNOWN_KEY, 2), None, None),
    ("kid", "payments-1", (R.UNAUTHORIZED_ACTOR, 2), None, None),
    ("kid", "orders-2", (R.BAD_SIGNATURE, 2), None, None),
    ("iat", T0 + 21, (R.BAD_SIGNATURE, 2), None, None),
    ("iat", T0 + 9, (R.BAD_SIGNATURE, 2), None, None),
    ("exp", T0 + 919, (R.BAD_SIGNATURE, 2), None, None),
    ("exp", T0 + 1811, (R.BAD_SIGNATURE, 2), None, None),
    ("scope", frozenset(), (R.BAD_SIGNATURE, 2), None, None),
    ("scope", S1, (R.BAD_SIGNATURE, 2), None, None),
    ("scope", S2 | {"admin"}, (R.BAD_SIGNATURE, 2), None, None),
    ("prev_hash", OTHER_HASH, (R.BAD_SIGNATURE, 2), None, None),
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


def test_mutation_tables_cover_every_wire_field(story: Story) -> None:
    """A field added to a ring later must be added to the tables above."""
    for index, ring in enumerate(story.rings):
        fields = {m[1] for m in MUTATIONS if m[0] == index} if index < 2 else {m[0] for m in NEWEST}
        covered = {FIELD_KEYS[f] for f in fields}
        assert set(ring_map(ring)) <= covered, (index, set(ring_map(ring)) - covered)
        assert {f.name for f in dataclasses.fields(ring)} == fields  # type: ignore[arg-type]


def _raw_variants(value: Any) -> list[Any]:
    """Type-preserving changes of one wire value."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1]
    if isinstance(value, bytes):
        return [flip(value), flip(value, len(value) - 1)]
    if isinstance(value, str):
        return [value + "x", value[:-1] + "Z"]
    if isinstance(value, list):
        return [value[:-1], [*value, "zzz"]]
    raise AssertionError(f"unexpected wire type {type(value)}")


def test_every_raw_field_mutation_of_every_ring_is_rejected(story: Story) -> None:
    """Generic sweep at the msgpack level, re-encoded canonically."""
    maps = raw_maps(story.encoded)
    tried = 0
    for index in range(1, len(maps)):
        for key in maps[index]:
            for new in _raw_variants(maps[index][key]):
                mutated = [dict(m) if isinstance(m, dict) else m for m in maps]
                mutated[index][key] = new
                with pytest.raises(TrustError) as info:
                    verify(encode_raw(mutated), story=story)
                assert info.value.reason is not R.MISSING_CHAIN
                tried += 1
    assert tried >= 2 * (12 + 9 + 10)


# -- invariant 2: links -------------------------------------------------------


def test_ring_removed_in_the_middle(story: Story) -> None:
    o, _h1, h2 = story.rings
    rejected(lambda: verify(encode_rings([o, h2]), story=story), R.BROKEN_LINK, 1)


def test_origin_removed(story: Story) -> None:
    _o, h1, h2 = story.rings
    rejected(lambda: verify(encode_rings([h1, h2]), story=story), R.MALFORMED, 0)


def test_newest_ring_removed(story: Story) -> None:
    o, h1, _h2 = story.rings
    encoded = encode_rings([o, h1])
    rejected(lambda: verify(encoded, story=story), R.EVENT_MISMATCH, 1)
    # With the older event it is that older, legitimate delivery, for its own topic only.
    rejected(lambda: verify(encoded, digest=story.e1.digest()), R.WRONG_DESTINATION, 1)
    assert verify(encoded, digest=story.e1.digest(), destination=DEST1).scope == S1


def test_rings_reordered(story: Story) -> None:
    o, h1, h2 = story.rings
    rejected(lambda: verify(encode_rings([o, h2, h1]), story=story), R.BROKEN_LINK, 1)


@pytest.mark.parametrize(
    ("layout", "reason", "ring"),
    [
        ((0, 1, 1, 2), R.BROKEN_LINK, 2),
        ((0, 1, 2, 2), R.BROKEN_LINK, 3),
        ((0, 0, 1, 2), R.MALFORMED, 1),
    ],
)
def test_ring_duplicated(story: Story, layout: tuple[int, ...], reason: Reason, ring: int) -> None:
    rings = [story.rings[i] for i in layout]
    rejected(lambda: verify(encode_rings(rings), story=story), reason, ring)


def test_ring_replaced_by_a_sibling_of_the_same_transaction(story: Story) -> None:
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
    ).hops[0]
    o, _h1, h2 = story.rings
    rejected(lambda: verify(encode_rings([o, sibling, h2]), story=story), R.BROKEN_LINK, 2)


@pytest.mark.parametrize(
    ("layout", "reason", "ring"),
    [
        (("a0", "b1", "a2"), R.BROKEN_LINK, 1),  # middle ring replaced
        (("a0", "a1", "b2"), R.BROKEN_LINK, 2),  # newest ring spliced in
        (("b0", "a1", "a2"), R.BROKEN_LINK, 1),  # origin swapped (new subject!)
        (("a0", "a1", "a2", "b0", "b1", "b2"), R.MALFORMED, 3),  # two chains concatenated
        (("a0", "a1", "a2", "b1", "b2"), R.BROKEN_LINK, 3),
        (("b0", "b1", "a2"), R.BROKEN_LINK, 2),
    ],
)
def test_rings_spliced_from_another_transaction(
    story: Story, other_story: Story, layout: tuple[str, ...], reason: Reason, ring: int
) -> None:
    source = {"a": story.rings, "b": other_story.rings}
    rings = [source[name[0]][int(name[1])] for name in layout]
    rejected(lambda: verify(encode_rings(rings), story=story), reason, ring)


def test_two_encoded_chains_concatenated(story: Story, other_story: Story) -> None:
    rejected(lambda: verify(story.encoded + other_story.encoded, story=story), R.MALFORMED)
    raw = b64url_decode(story.encoded) + b64url_decode(other_story.encoded)
    rejected(lambda: verify(encode_bytes(raw), story=story), R.MALFORMED)


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


# -- invariant 4: narrowing ---------------------------------------------------


def _forge_newest(story: Story, **changes: Any) -> str:
    """Re-sign ring 2 with its legitimate key after ``changes``."""
    rings = story.rings
    rings[2] = sign_ring(dataclasses.replace(rings[2], **changes), ORDERS)
    return encode_rings(rings)


@pytest.mark.parametrize("scope", [S2 | {"orders:read"}, S2 | {"admin"}, S0])
def test_widened_scope_signed_by_a_legitimate_key(story: Story, scope: frozenset[str]) -> None:
    # "orders:read" is in the origin's scope but was dropped by ring 1: still an escalation.
    rejected(lambda: verify(_forge_newest(story, scope=scope), story=story), R.SCOPE_ESCALATION, 2)


@pytest.mark.parametrize(
    "changes",
    [
        {"exp": T0 + 1811},
        {"iat": T0 + 9},
        {"iat": T0 + 100, "exp": T0 + 99},
        {"iat": T0 + 9, "exp": T0 + 1811},
    ],
)
def test_widened_window_signed_by_a_legitimate_key(story: Story, changes: dict[str, int]) -> None:
    rejected(lambda: verify(_forge_newest(story, **changes), story=story), R.WINDOW_ESCALATION, 2)


def test_origin_window_ending_before_it_starts(story: Story) -> None:
    origin = sign_ring(dataclasses.replace(story.origin, exp=story.origin.iat - 1), EDGE)
    rings = relink([origin, *story.rings[1:]], 1)
    rejected(lambda: verify(encode_rings(rings), story=story), R.WINDOW_ESCALATION, 0)


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
        kid=PAYMENTS.kid,
        iat=T0 + 25,
        exp=T0 + 900,
        scope=S2 | {"orders:read"},
        prev_hash=story.chain.hashes()[-1],
        event_digest=OTHER_HASH,
        destination="kafka:ledger",
    )
    forged = story.chain.appended(sign_ring(hop, PAYMENTS))  # type: ignore[arg-type]
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


# -- invariant 6: bounds come first ------------------------------------------


class ExplodingBundle(TrustBundle):
    """A bundle that fails the test if anyone looks a key up."""

    def get(self, kid: str) -> BundleKey | None:
        raise AssertionError(f"bundle consulted for {kid!r} before the bounds were checked")


@pytest.fixture
def no_signatures(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(self: PublicKey, signature: bytes, message: bytes) -> bool:
        raise AssertionError("a signature was checked")

    monkeypatch.setattr(PublicKey, "verify", explode)


def _timed(fn: Any, budget: float = 0.5) -> None:
    start = time.perf_counter()
    fn()
    assert time.perf_counter() - start < budget


def _long_story(rings: int) -> tuple[Chain, bytes]:
    story = build_story()
    chain = story.chain
    signers = [PAYMENTS, ORDERS]
    for n in range(rings - 3):
        chain = append_hop(
            signers[n % 2], chain, event_digest=OTHER_HASH, destination="kafka:loop", now=T0 + 25
        )
    assert len(chain.rings) == rings
    return chain, OTHER_HASH


@pytest.mark.usefixtures("no_signatures")
def test_too_large_before_any_key_lookup_or_signature() -> None:
    huge = "A" * (10 * 1024 * 1024)
    _timed(lambda: rejected(lambda: verify(huge, bundle=ExplodingBundle()), R.TOO_LARGE))
    big_limit = Limits(max_bytes=10 * 1024 * 1024 - 1)
    _timed(
        lambda: rejected(
            lambda: verify(huge, bundle=ExplodingBundle(), limits=big_limit), R.TOO_LARGE
        )
    )


def test_size_limit_boundary(story: Story) -> None:
    size = len(story.encoded)
    assert verify(story.encoded, story=story, limits=Limits(max_bytes=size)).scope == S2
    rejected(
        lambda: verify(story.encoded, story=story, limits=Limits(max_bytes=size - 1)), R.TOO_LARGE
    )


@pytest.mark.usefixtures("no_signatures")
@pytest.mark.parametrize(
    "header",
    [
        b"\xdd\xff\xff\xff\xff",  # array32 announcing 2**32 - 1 elements
        b"\xdd\x00\x01\x00\x00",
        b"\xdc\xff\xff",  # array16
        b"\xdc\x00\x22",  # 34 elements = 33 rings
    ],
)
def test_depth_from_the_array_header_before_anything_else(header: bytes) -> None:
    encoded = encode_bytes(header + b"\x01" + b"\xc0" * 8)
    _timed(lambda: rejected(lambda: verify(encoded, bundle=ExplodingBundle()), R.DEPTH_EXCEEDED))


@pytest.mark.usefixtures("no_signatures")
def test_depth_of_a_validly_signed_long_chain_before_any_signature() -> None:
    chain, digest = _long_story(6)
    rejected(
        lambda: verify(
            chain.encode(),
            bundle=ExplodingBundle(),
            digest=digest,
            destination="kafka:loop",
            limits=Limits(max_rings=5),
        ),
        R.DEPTH_EXCEEDED,
    )


def test_ring_count_boundary() -> None:
    chain, digest = _long_story(6)
    ctx = verify(
        chain.encode(), digest=digest, destination="kafka:loop", limits=Limits(max_rings=6)
    )
    assert len(ctx.actors) == 6
    rejected(
        lambda: verify(
            chain.encode(), digest=digest, destination="kafka:loop", limits=Limits(max_rings=5)
        ),
        R.DEPTH_EXCEEDED,
    )


def test_default_limits_refuse_33_rings() -> None:
    header = b"\xdc\x00\x22"  # [version + 33 rings]
    rejected(lambda: verify(encode_bytes(header + b"\x01" + b"\x80" * 33)), R.DEPTH_EXCEEDED)
    header = b"\xdc\x00\x21"  # 32 rings pass the count and fail later, as malformed
    rejected(lambda: verify(encode_bytes(header + b"\x01" + b"\x80" * 32)), R.MALFORMED)


@pytest.mark.usefixtures("no_signatures")
@pytest.mark.parametrize("encoded", ["", "!!!", "A", "kQE", encode_raw([1]), encode_raw({})])
def test_malformed_before_any_key_lookup(encoded: str) -> None:
    rejected(lambda: verify(encoded, bundle=ExplodingBundle()), R.MALFORMED)


class CountingKey:
    calls = 0


@pytest.fixture
def count_signatures(monkeypatch: pytest.MonkeyPatch) -> type[CountingKey]:
    original = PublicKey.verify

    def counting(self: PublicKey, signature: bytes, message: bytes) -> bool:
        CountingKey.calls += 1
        return original(self, signature, message)

    CountingKey.calls = 0
    monkeypatch.setattr(PublicKey, "verify", counting)
    return CountingKey


def test_key_checks_come_before_signatures_and_content_checks_after(
    story: Story, count_signatures: type[CountingKey]
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
    assert count_signatures.calls == 0
    after = [
        (lambda: verify(story.encoded, digest=OTHER_HASH), R.EVENT_MISMATCH),
        (lambda: verify(story.encoded, story=story, destination=DEST1), R.WRONG_DESTINATION),
        (lambda: verify(story.encoded, story=story, now=T0 + 5000), R.EXPIRED),
        (lambda: verify(story.encoded, story=story, now=T0 - 5000), R.NOT_YET_VALID),
        (
            lambda: verify(_forge_newest(story, scope=S1 | {"admin"}), story=story),
            R.SCOPE_ESCALATION,
        ),
    ]
    for fn, reason in after:
        count_signatures.calls = 0
        rejected(fn, reason)
        assert count_signatures.calls == 3  # every signature held before the content rule


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


# -- order of checks (the module docstring is the contract) -------------------


def test_key_checks_of_every_ring_come_before_any_signature(story: Story) -> None:
    rings = story.rings
    rings[1] = dataclasses.replace(rings[1], prev_hash=OTHER_HASH)  # unsigned edit
    rings[2] = dataclasses.replace(rings[2], kid="no-such-kid")
    rejected(lambda: verify(encode_rings(rings), story=story), R.UNKNOWN_KEY, 2)


def test_an_unsigned_edit_cannot_choose_its_reason(story: Story) -> None:
    # Widening a scope, re-pointing a link or shortening a window without the
    # actor's key is a bad signature, never a content reason blaming the actor.
    for field, value in (("scope", S1 | {"admin"}), ("prev_hash", OTHER_HASH), ("exp", T0 + 100)):
        rings = story.rings
        rings[1] = dataclasses.replace(rings[1], **{field: value})
        rejected(
            lambda rings=rings: verify(encode_rings(relink(rings, 2)), story=story),
            R.BAD_SIGNATURE,
            1,
        )


def test_binding_before_link_within_a_ring(story: Story) -> None:
    rings = story.rings
    rings[2] = dataclasses.replace(rings[2], kid="no-such-kid", prev_hash=OTHER_HASH)
    rejected(lambda: verify(encode_rings(rings), story=story), R.UNKNOWN_KEY, 2)


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
    rings = story.rings
    rings[2] = dataclasses.replace(rings[2], signature=bytes(64))
    rejected(lambda: verify(encode_rings(rings), story=story, now=T0 + 5000), R.BAD_SIGNATURE, 2)


def test_origin_only_chain_is_malformed_before_any_key_lookup(story: Story) -> None:
    only = Chain(story.origin).encode()
    rejected(lambda: verify(only, story=story), R.MALFORMED)
    rejected(lambda: verify(only, story=story, bundle=ExplodingBundle()), R.MALFORMED)


def test_verify_decoded_uses_the_signature_cache_hook(story: Story) -> None:
    asked: list[bytes] = []

    def cached(ring: Ring, digest: bytes, entry: BundleKey) -> bool:
        assert digest == ring_hash(ring)
        asked.append(digest)
        return ring is not story.chain.hops[-1]

    rejected(
        lambda: verify_decoded(
            story.chain,
            bundle=BUNDLE,
            event_digest=story.digest,
            destination=DEST2,
            now=NOW,
            signature_check=cached,
        ),
        R.BAD_SIGNATURE,
        2,
    )
    assert asked == story.chain.hashes()


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
def test_ring_hash_cache_never_outlives_a_replaced_ring(
    story: Story, other_story: Story, swap: str
) -> None:
    """verify_decoded trusts Chain.hashes(); a chain derived with dataclasses.replace
    from an already hashed chain must not inherit the old hashes."""
    story.chain.hashes()
    other = other_story.chain
    spliced = dataclasses.replace(story.chain, **{swap: getattr(other, swap)})
    assert spliced.hashes() == [ring_hash(r) for r in spliced.rings]
    rejected(
        lambda: verify_decoded(
            spliced, bundle=BUNDLE, event_digest=story.digest, destination=DEST2, now=NOW
        ),
        R.BROKEN_LINK,
        1,
    )


def test_a_clock_that_is_not_a_number_fails_closed() -> None:
    from trusthop.chain import HopRing
    from trusthop.errors import Reason, TrustError
    from trusthop.verify import check_window

    ring = HopRing(
        actor="spiffe://d/a",
        kid="k",
        iat=0,
        exp=10,
        scope=frozenset(),
        prev_hash=b"\0" * 32,
        event_digest=b"\0" * 32,
        destination="kafka:t",
    )
    for now in (float("nan"), float("inf"), float("-inf")):
        try:
            check_window(ring, now, 60)
        except TrustError as error:
            assert error.reason is Reason.EXPIRED
        else:
            raise AssertionError(f"{now} accepted")


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
