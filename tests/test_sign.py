"""Attacks on trusthop.sign: the producer refuses what a consumer would reject,
with the consumer's reason code."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from typing import Any

import pytest
from chainkit import (
    DEST2,
    EDGE,
    FOREIGN,
    ORDERS,
    PAYMENTS,
    S0,
    S1,
    S2,
    T0,
    Story,
    body_map,
    make_bundle,
    rejected,
    sign_ring,
    verify,
    wire_hashes,
)

from trusthop.chain import Chain
from trusthop.errors import Reason, TrustError
from trusthop.keys import SigningKey
from trusthop.rings import (
    K_CONSUMED,
    K_KEY,
    K_SCOPE,
    K_TTL,
    K_TXN,
    ORIGIN_DOMAIN,
    link_tag,
    origin_body,
)
from trusthop.sign import (
    DEFAULT_HOP_TTL,
    DEFAULT_ORIGIN_TTL,
    Identity,
    append_hop,
    hash_credential,
    mint_origin,
)

R = Reason
DIGEST = hashlib.sha256(b"event").digest()


def origin(**overrides: Any) -> Any:
    args: dict[str, Any] = {
        "subject": "user:alice",
        "issuer": "https://idp.example.com",
        "credential": "token",
        "scope": S0,
        "now": T0,
    }
    args.update(overrides)
    return mint_origin(EDGE, **args)


def test_mint_origin_fields() -> None:
    ring = origin(now=T0 + 0.9, ttl=600, transaction_id="txn-7", acr="mfa", amr=["pwd"])
    assert ring.actor == EDGE.actor
    assert ring.key_tag == EDGE.key_tag == EDGE.key.public_key.key_tag
    assert ring.x5c is None
    assert (ring.iat, ring.exp) == (T0, T0 + 600)
    assert ring.scope == S0
    assert ring.credential_hash == hashlib.sha256(b"token").digest()
    assert ring.transaction_id == "txn-7"
    assert ring.trust_domain == "prod.example.com"
    assert (ring.acr, ring.amr) == ("mfa", ("pwd",))
    assert EDGE.key.public_key.verify(ring.signature, ORIGIN_DOMAIN + origin_body(ring))
    assert EDGE.key.public_key.verify(ring.signature, Chain(ring).signing_input(0))


def test_mint_origin_defaults() -> None:
    a, b = origin(), origin()
    assert a.exp - a.iat == DEFAULT_ORIGIN_TTL
    assert uuid.UUID(a.transaction_id) != uuid.UUID(b.transaction_id)
    assert str(uuid.UUID(a.transaction_id)) == a.transaction_id  # canonical text
    # ...which travels as its 16 bytes.
    assert body_map(Chain(a).ring_bytes[0])[K_TXN] == uuid.UUID(a.transaction_id).bytes
    assert a.acr is None and a.amr is None


def test_the_credential_is_only_hashed() -> None:
    assert (
        hash_credential("t\u00e9")
        == hash_credential("t\u00e9".encode())
        == hashlib.sha256("t\u00e9".encode()).digest()
    )
    ring = origin(credential="secret-bearer-token")
    assert b"secret-bearer-token" not in Chain(ring).encode().encode()
    assert "secret-bearer-token" not in repr(ring)


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"subject": ""}, ValueError),
        ({"issuer": ""}, ValueError),
        ({"scope": "orders:read"}, TypeError),
        ({"scope": ["a", ""]}, ValueError),
        ({"scope": [f"s{i}" for i in range(65)]}, ValueError),
        ({"scope": [1]}, ValueError),
    ],
)
def test_mint_origin_refuses(overrides: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        origin(**overrides)


def test_identity_validates_its_actor() -> None:
    with pytest.raises(ValueError):
        Identity("spiffe://prod.example.com/x/", EDGE.key, "k")
    identity = Identity.create("spiffe://prod.example.com/x", EDGE.key)
    assert identity.kid == EDGE.key.public_key.thumbprint
    assert identity.key_tag == EDGE.key.public_key.key_tag
    assert identity.trust_domain == "prod.example.com"
    assert identity.bundle_key.actor == "spiffe://prod.example.com/x"
    assert identity.bundle_key.key == EDGE.key.public_key


# -- append_hop ---------------------------------------------------------------------


def test_append_hop_defaults_inherit_and_cap(story: Story) -> None:
    prev = story.chain.hops[-1]
    chain = append_hop(
        PAYMENTS, story.chain, event_digest=DIGEST, destination="kafka:x", now=T0 + 25
    )
    hop = chain.hops[-1]
    assert hop.scope == prev.scope == S2
    assert hop.iat == T0 + 25
    assert hop.exp == min(T0 + 25 + DEFAULT_HOP_TTL, prev.exp) == prev.exp
    assert hop.key_tag == PAYMENTS.key_tag and hop.actor == PAYMENTS.actor
    assert chain.link_tags[-1] == link_tag(story.chain.hashes()[-1])
    assert chain.rings[:-1] == story.chain.rings
    assert chain.ring_bytes[:-1] == story.chain.ring_bytes
    assert chain.hashes() == wire_hashes(chain.ring_bytes)
    assert len(story.chain.hops) == 2  # the parent chain is not changed
    # Inherited scope and end are not written: the differences are empty.
    body = body_map(chain.ring_bytes[-1])
    assert K_SCOPE not in body and K_TTL not in body and K_CONSUMED not in body
    assert hop.consumed_event_id is None  # never filled in from the parent
    assert PAYMENTS.key.public_key.verify(hop.signature, chain.signing_input(3))


def test_append_hop_with_a_short_ttl_and_narrower_scope(story: Story) -> None:
    chain = append_hop(
        PAYMENTS,
        story.chain,
        event_digest=DIGEST,
        destination="kafka:x",
        now=T0 + 25,
        ttl=5,
        scope=[],
    )
    assert (chain.hops[-1].iat, chain.hops[-1].exp) == (T0 + 25, T0 + 30)
    assert chain.hops[-1].scope == frozenset()
    assert verify(chain.encode(), digest=DIGEST, destination="kafka:x").scope == frozenset()


def test_clock_behind_the_parent_starts_at_the_parent(story: Story) -> None:
    chain = append_hop(
        PAYMENTS, story.chain, event_digest=DIGEST, destination="kafka:x", now=T0 - 1000
    )
    assert chain.hops[-1].iat == story.chain.hops[-1].iat


@pytest.mark.parametrize(
    ("now", "ok"), [(T0 + 920, True), (T0 + 920.9, True), (T0 + 921, False), (T0 + 10**6, False)]
)
def test_expired_parent_boundary(story: Story, now: float, ok: bool) -> None:
    def extend() -> Chain:
        return append_hop(
            PAYMENTS, story.chain, event_digest=DIGEST, destination="kafka:x", now=now
        )

    if ok:
        hop = extend().hops[-1]
        assert hop.iat == hop.exp == T0 + 920
    else:
        rejected(extend, R.EXPIRED)


def test_negative_ttl_is_refused(story: Story) -> None:
    rejected(
        lambda: append_hop(
            PAYMENTS, story.chain, event_digest=DIGEST, destination="kafka:x", now=T0 + 25, ttl=-1
        ),
        R.EXPIRED,
    )


@pytest.mark.parametrize("scope", [S1, S0, S2 | {"admin"}, {"orders:read"}])
def test_wider_scope_is_refused_with_the_consumer_reason(story: Story, scope: Any) -> None:
    producer = rejected(
        lambda: append_hop(
            PAYMENTS,
            story.chain,
            event_digest=DIGEST,
            destination="kafka:x",
            now=T0 + 25,
            scope=scope,
        ),
        R.SCOPE_ESCALATION,
        3,
    )
    # Build the same ring the producer refused, sign it anyway, and ask a consumer.
    hop = append_hop(
        PAYMENTS, story.chain, event_digest=DIGEST, destination="kafka:x", now=T0 + 25
    ).hops[-1]
    wide = sign_ring(dataclasses.replace(hop, scope=frozenset(scope)), PAYMENTS, story.chain)
    consumer = rejected(
        lambda: verify(story.chain.appended(wide).encode(), digest=DIGEST, destination="kafka:x"),
        R.SCOPE_ESCALATION,
        3,
    )
    assert (producer.reason, producer.ring) == (consumer.reason, consumer.ring)


def test_foreign_identity_is_refused_with_the_consumer_reason(story: Story) -> None:
    rejected(
        lambda: append_hop(
            FOREIGN, story.chain, event_digest=DIGEST, destination="kafka:x", now=T0 + 25
        ),
        R.UNAUTHORIZED_ACTOR,
    )


def test_append_hop_output_verifies_and_is_deterministic(story: Story) -> None:
    def extend() -> Chain:
        return append_hop(
            ORDERS,
            story.chain,
            event_digest=DIGEST,
            destination="kafka:x",
            now=T0 + 25,
            consumed_event_id="txn-1-e2",
            peer=PAYMENTS.actor,
        )

    a, b = extend(), extend()
    assert a.encode() == b.encode()
    assert a.encode().startswith(story.encoded + ".")  # a derived chain extends its parent
    ctx = verify(a.encode(), digest=DIGEST, destination="kafka:x")
    assert ctx.actors[-1] == ORDERS.actor
    assert a.hops[-1].consumed_event_id == "txn-1-e2"
    assert a.hops[-1].peer == PAYMENTS.actor


def test_signing_with_an_unbundled_key_is_caught(story: Story) -> None:
    impostor = Identity(ORDERS.actor, SigningKey.from_seed(b"\x77" * 32), ORDERS.kid)
    chain = append_hop(impostor, story.chain, event_digest=DIGEST, destination=DEST2, now=T0 + 25)
    # Rings name their key by its tag, not by the kid: this key's tag is unknown.
    assert chain.hops[-1].key_tag == impostor.key.public_key.key_tag != ORDERS.key_tag
    rejected(lambda: verify(chain.encode(), digest=DIGEST), R.UNKNOWN_KEY, 3)
    # Claiming the bundled key's tag does not make the signature verify.
    forged = sign_ring(dataclasses.replace(chain.hops[-1], key_tag=ORDERS.key_tag), impostor,
                       story.chain)
    text = story.chain.appended(forged).encode()  # type: ignore[arg-type]
    rejected(lambda: verify(text, digest=DIGEST), R.BAD_SIGNATURE, 3)


def test_origin_only_chain_can_be_extended(story: Story) -> None:
    chain = append_hop(
        EDGE, Chain(story.origin), event_digest=DIGEST, destination="kafka:x", now=T0 + 1
    )
    assert chain.hops[0].scope == S0
    assert chain.hops[0].exp == story.origin.exp
    assert (
        verify(chain.encode(), digest=DIGEST, destination="kafka:x", bundle=make_bundle()).scope
        == S0
    )


def test_signers_refuse_rings_every_verifier_would_refuse() -> None:
    from trusthop import Chain, Identity, Reason, SigningKey, TrustError, append_hop, mint_origin

    edge = Identity.create("spiffe://prod.example.com/edge", SigningKey.from_seed(b"e" * 32))
    now = T0
    with pytest.raises(TrustError) as long_subject:
        mint_origin(edge, subject="u" * 2000, issuer="i", credential="t", scope=["s"], now=now)
    assert long_subject.value.reason is Reason.MALFORMED
    with pytest.raises(TrustError) as long_scope:
        mint_origin(edge, subject="u", issuer="i", credential="t", scope=["s" * 300], now=now)
    assert long_scope.value.reason is Reason.MALFORMED
    with pytest.raises(ValueError, match="ttl"):
        mint_origin(edge, subject="u", issuer="i", credential="t", scope=["s"], now=now, ttl=-1)
    origin = mint_origin(edge, subject="u", issuer="i", credential="t", scope=["s"], now=now)
    with pytest.raises(TrustError) as empty_destination:
        append_hop(edge, Chain(origin), event_digest=b"\0" * 32, destination="", now=now)
    assert empty_destination.value.reason is Reason.MALFORMED


def test_signers_refuse_times_the_wire_cannot_carry() -> None:
    """iat and ttl travel as integers in [0, 2**40): an origin signed outside
    that range is refused by every verifier (malformed), so the signer must
    refuse it too (ValueError or TrustError(malformed), as for its other rules)."""
    for now, ttl in ((-1, 60), (2**40, 60), (T0, 2**40), (2**40 - 1, 2**40)):
        with pytest.raises((ValueError, TrustError)) as caught:
            origin(now=now, ttl=ttl)
        if isinstance(caught.value, TrustError):
            assert caught.value.reason is R.MALFORMED
    assert origin(now=2**40 - 1, ttl=2**40 - 1).exp == 2 * (2**40 - 1)


def test_a_uuid_consumed_event_id_is_signed_as_its_16_bytes(story: Story) -> None:
    event_id = str(uuid.UUID(int=42))
    chain = append_hop(PAYMENTS, story.chain, event_digest=DIGEST, destination="kafka:x",
                       now=T0 + 25, consumed_event_id=event_id)
    assert body_map(chain.ring_bytes[-1])[K_CONSUMED] == uuid.UUID(event_id).bytes
    ctx = verify(chain.encode(), digest=DIGEST, destination="kafka:x")
    assert ctx.chain.hops[-1].consumed_event_id == event_id


def test_an_svid_identity_names_no_key_tag() -> None:
    assert EDGE.x5c is None and EDGE.key_tag is not None
    ring = origin()
    assert body_map(Chain(ring).ring_bytes[0])[K_KEY] == EDGE.key_tag


def test_the_signer_and_the_chain_agree_on_the_signing_input(story: Story) -> None:
    chain = append_hop(ORDERS, story.chain, event_digest=DIGEST, destination="kafka:x",
                       now=T0 + 25, scope=[], ttl=5, peer="p")
    hop = chain.hops[-1]
    assert story.chain.next_signing_input(hop) == chain.signing_input(3)
    assert ORDERS.key.sign(chain.signing_input(3)) == hop.signature  # Ed25519 is deterministic
    rebuilt = Chain(chain.origin, chain.hops)
    assert rebuilt == chain and rebuilt.encode() == chain.encode()
