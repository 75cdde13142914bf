"""ES256 (ECDSA P-256) ring keys, attacked: the algorithm stays the key's."""

from __future__ import annotations

import hashlib
import json

import pytest
from chainkit import (
    DEST1,
    EDGE,
    EDGE_ID,
    ORDERS_ID,
    S0,
    S1,
    T0,
    counter_key,
    encode_segments,
    make_event,
    wire_rings,
)
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from trusthop.bundle import BundleKey, TrustBundle
from trusthop.canonical import b64url_encode
from trusthop.chain import Chain
from trusthop.errors import Reason, TrustError
from trusthop.keys import ED25519, ES256, PublicKey, SigningKey
from trusthop.sign import Identity, append_hop, mint_origin
from trusthop.verify import verify_chain

N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


P256_SCALAR = 0x7472757374686F70  # a fixed private scalar: the same key on every run
P256_TAG_TWIN_SEED = 16184
"""``counter_key(16184)``: an Ed25519 key with the key tag of the P-256 key (found by search)."""


def p256(scalar: int = P256_SCALAR) -> SigningKey:
    return SigningKey(ec.derive_private_key(scalar, ec.SECP256R1()))


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return p256()


def test_sign_and_verify_roundtrip(key: SigningKey) -> None:
    assert key.alg == ES256 and key.public_key.alg == ES256
    signature = key.sign(b"ring")
    assert len(signature) == 64
    assert key.public_key.verify(signature, b"ring")
    assert not key.public_key.verify(signature, b"rinG")
    other = p256(P256_SCALAR + 1)
    assert not other.public_key.verify(signature, b"ring")


def test_signatures_are_low_s_and_the_high_s_twin_is_refused(key: SigningKey) -> None:
    """(r, n - s) verifies for plain ECDSA: accepting it would give one ring
    two hashes, so a copy could dodge replay detection."""
    for n in range(20):
        message = f"m{n}".encode()
        signature = key.sign(message)
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        assert s <= N // 2
        twin = r.to_bytes(32, "big") + (N - s).to_bytes(32, "big")
        assert not key.public_key.verify(twin, message)


def test_a_der_signature_and_wrong_lengths_are_refused(key: SigningKey) -> None:
    private = serialization.load_pem_private_key(key.to_pem(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    der = private.sign(b"m", ec.ECDSA(hashes.SHA256()))
    assert not key.public_key.verify(der, b"m")
    r, s = decode_dss_signature(der)
    assert not key.public_key.verify(bytes(64), b"m")
    assert not key.public_key.verify(b"\xff" * 64, b"m")
    assert not key.public_key.verify(key.sign(b"m") + b"\x00", b"m")
    assert not key.public_key.verify(key.sign(b"m")[:63], b"m")
    assert r > 0 and s > 0


def test_jwk_roundtrip_and_rfc7638_thumbprint(key: SigningKey) -> None:
    jwk = key.public_key.to_jwk()
    assert set(jwk) == {"kty", "crv", "x", "y", "alg"} and jwk["alg"] == ES256
    assert PublicKey.from_jwk(jwk) == key.public_key
    members = {"crv": "P-256", "kty": "EC", "x": jwk["x"], "y": jwk["y"]}
    expected = b64url_encode(hashlib.sha256(
        json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest())
    assert key.public_key.thumbprint == expected


@pytest.mark.parametrize("change", [
    {"alg": "EdDSA"}, {"alg": "ES384"}, {"alg": "RS256"}, {"alg": "none"}, {"crv": "P-384"},
    {"kty": "OKP"}, {"y": "AAAA"}, {"x": 5}, {"d": "secret"},
])
def test_hostile_ec_jwks_are_refused(key: SigningKey, change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PublicKey.from_jwk(key.public_key.to_jwk() | change)


def test_a_point_off_the_curve_is_refused(key: SigningKey) -> None:
    raw = bytearray(key.public_key.raw)
    raw[-1] ^= 1
    with pytest.raises(ValueError):
        PublicKey(bytes(raw), ES256)
    with pytest.raises(ValueError):
        PublicKey(b"\x02" + key.public_key.raw[1:33], ES256)  # compressed form
    with pytest.raises(ValueError):
        PublicKey(key.public_key.raw, "ES512")


def test_the_key_decides_the_algorithm_not_the_claim(key: SigningKey) -> None:
    """An Ed25519 key's bytes read as ES256 (or the reverse) are not a key,
    and a signature under one never verifies under the other."""
    ed = counter_key(1)
    assert ed.alg == ED25519
    with pytest.raises(ValueError):
        PublicKey(ed.public_key.raw, ES256)
    with pytest.raises(ValueError):
        PublicKey(key.public_key.raw, ED25519)
    assert not ed.public_key.verify(key.sign(b"m"), b"m")
    assert not key.public_key.verify(ed.sign(b"m"), b"m")


def test_pem_roundtrip_and_other_curves(key: SigningKey) -> None:
    again = SigningKey.from_pem(key.to_pem())
    assert again.public_key == key.public_key
    with pytest.raises(ValueError):
        SigningKey(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(ValueError):
        SigningKey.generate("RS256")


def test_key_tags_are_the_thumbprints_first_two_bytes_whatever_the_algorithm(
    key: SigningKey,
) -> None:
    from trusthop.canonical import b64url_decode

    for public in (key.public_key, counter_key(1).public_key):
        assert public.key_tag == int.from_bytes(b64url_decode(public.thumbprint)[:2], "big")
    twin = counter_key(P256_TAG_TWIN_SEED).public_key
    assert twin.key_tag == key.public_key.key_tag and twin.alg == ED25519
    assert twin != key.public_key


def test_a_chain_mixing_ed25519_and_es256_verifies_and_is_bound(key: SigningKey) -> None:
    orders = Identity.create(ORDERS_ID, key)
    bundle = TrustBundle.of([
        BundleKey(EDGE.kid, EDGE_ID, EDGE.key.public_key),
        BundleKey(orders.kid, ORDERS_ID, key.public_key),
    ])
    origin = mint_origin(EDGE, subject="user:alice", issuer="https://idp", credential="t",
                         scope=S0, now=T0, ttl=600)
    e1 = make_event("e1")
    c1 = append_hop(EDGE, Chain(origin), event_digest=e1.digest(), destination=DEST1,
                    now=T0, scope=S1, ttl=300)
    e2 = make_event("e2")
    c2 = append_hop(orders, c1, event_digest=e2.digest(), destination="kafka:next", now=T0,
                    scope=S1, ttl=300)
    context = verify_chain(c2.encode(), bundle=bundle, event_digest=e2.digest(),
                           destination="kafka:next", now=T0 + 1)
    assert context.actors == (EDGE_ID, EDGE_ID, ORDERS_ID)
    assert c2.hops[-1].key_tag == key.public_key.key_tag
    # The ring's key tag now selects an Ed25519 key (a tag twin): the key is
    # found, its algorithm is Ed25519, and the ES256 signature does not verify.
    twin = counter_key(P256_TAG_TWIN_SEED).public_key
    swapped = TrustBundle.of([
        BundleKey(EDGE.kid, EDGE_ID, EDGE.key.public_key),
        BundleKey(orders.kid, ORDERS_ID, twin),
    ])
    assert swapped.key_for(ORDERS_ID, c2.hops[-1].key_tag) is not None
    with pytest.raises(TrustError) as caught:
        verify_chain(c2.encode(), bundle=swapped, event_digest=e2.digest(),
                     destination="kafka:next", now=T0 + 1)
    assert (caught.value.reason, caught.value.ring) == (Reason.BAD_SIGNATURE, 2)
    # Any other Ed25519 key has another tag: no key of that actor is named.
    other = TrustBundle.of([
        BundleKey(EDGE.kid, EDGE_ID, EDGE.key.public_key),
        BundleKey(orders.kid, ORDERS_ID, counter_key(1).public_key),
    ])
    with pytest.raises(TrustError) as caught:
        verify_chain(c2.encode(), bundle=other, event_digest=e2.digest(),
                     destination="kafka:next", now=T0 + 1)
    assert (caught.value.reason, caught.value.ring) == (Reason.UNKNOWN_KEY, 2)


def test_a_second_ecdsa_signature_of_a_ring_breaks_the_next_ring(key: SigningKey) -> None:
    """ECDSA signatures are randomised: the holder of an ES256 key can sign one
    body twice. The hash of a ring covers its signature and the next ring signs
    that hash, so swapping in the second signature breaks the chain after it."""
    orders = Identity.create(ORDERS_ID, key)
    bundle = TrustBundle.of([EDGE.bundle_key, orders.bundle_key])
    origin = mint_origin(EDGE, subject="u", issuer="i", credential="t", scope=S0, now=T0,
                         ttl=600)
    c1 = append_hop(orders, Chain(origin), event_digest=bytes(32), destination=DEST1, now=T0)
    c2 = append_hop(EDGE, c1, event_digest=b"\1" * 32, destination="kafka:next", now=T0)
    rings = wire_rings(c2.encode())
    second = key.sign(c1.signing_input(1))
    assert second != rings[1][:64] and key.public_key.verify(second, c1.signing_input(1))
    rings[1] = second + rings[1][64:]
    with pytest.raises(TrustError) as caught:
        verify_chain(encode_segments(rings), bundle=bundle, event_digest=b"\1" * 32,
                     destination="kafka:next", now=T0 + 1)
    # broken_link, unless the new hash happens to share the old one's 16-bit tag.
    assert caught.value.reason in (Reason.BROKEN_LINK, Reason.BAD_SIGNATURE)
    assert caught.value.ring == 2


def test_an_ed25519_and_a_p256_key_sharing_a_tag_may_serve_two_actors(key: SigningKey) -> None:
    twin = counter_key(P256_TAG_TWIN_SEED).public_key
    bundle = TrustBundle.of([BundleKey("a", ORDERS_ID, key.public_key),
                             BundleKey("b", EDGE_ID, twin)])
    tag = key.public_key.key_tag
    assert bundle.key_for(ORDERS_ID, tag).key == key.public_key  # type: ignore[union-attr]
    assert bundle.key_for(EDGE_ID, tag).key == twin  # type: ignore[union-attr]
    from trusthop.bundle import BundleError

    with pytest.raises(BundleError, match="share the key tag"):
        TrustBundle.of([BundleKey("a", ORDERS_ID, key.public_key),
                        BundleKey("b", ORDERS_ID, twin)])


def test_es256_bundle_roundtrip(key: SigningKey) -> None:
    bundle = TrustBundle.of([BundleKey(key.public_key.thumbprint, ORDERS_ID, key.public_key)])
    again = TrustBundle.from_jwks(bundle.to_jwks())
    entry = again.get(key.public_key.thumbprint)
    assert entry is not None and entry.key == key.public_key
