"""Attacks on trusthop.keys: the algorithm is the key's, never the message's."""

from __future__ import annotations

from typing import Any

import pytest
from chainkit import seeded_key
from cryptography.hazmat.primitives.asymmetric import ec

from trusthop.canonical import b64url_encode
from trusthop.keys import ED25519, PublicKey, SigningKey

# RFC 8032 section 7.1, test 1 (also the key of RFC 8037 appendix A).
RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_SIG_EMPTY = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e3970"
    "1cf9b46bd25bf5f0595bbe24655141438e7a100b"
)
RFC8037_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC8037_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"

SMALL_ORDER = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]


def test_rfc8032_vector() -> None:
    key = SigningKey.from_seed(RFC8032_SECRET)
    assert key.public_key.raw == RFC8032_PUBLIC
    assert key.sign(b"") == RFC8032_SIG_EMPTY
    assert key.public_key.verify(RFC8032_SIG_EMPTY, b"")
    assert not key.public_key.verify(RFC8032_SIG_EMPTY, b"\x00")


def test_rfc8037_jwk_and_thumbprint() -> None:
    key = PublicKey.from_jwk({"kty": "OKP", "crv": "Ed25519", "x": RFC8037_X})
    assert key.raw == RFC8032_PUBLIC
    assert key.thumbprint == RFC8037_THUMBPRINT
    assert key.to_jwk() == {"kty": "OKP", "crv": "Ed25519", "x": RFC8037_X, "alg": "EdDSA"}
    assert PublicKey.from_jwk(key.to_jwk()) == key


def test_seeded_keys_are_deterministic_and_distinct() -> None:
    assert seeded_key(1).public_key == seeded_key(1).public_key
    assert seeded_key(1).public_key != seeded_key(2).public_key
    assert seeded_key(1).sign(b"m") == seeded_key(1).sign(b"m")


@pytest.mark.parametrize("signature", [b"", b"\x00" * 63, b"\x00" * 65, b"\x00" * 64,
                                       b"\xff" * 64])
def test_verify_returns_false_never_raises(signature: bytes) -> None:
    assert seeded_key(1).public_key.verify(signature, b"m") is False


@pytest.mark.parametrize("encoding", SMALL_ORDER)
@pytest.mark.parametrize("sign_bit", [False, True])
def test_small_order_public_keys_are_refused(encoding: str, sign_bit: bool) -> None:
    """Under these keys a constant signature verifies many messages: no such bundle key."""
    raw = bytes.fromhex(encoding)
    if sign_bit:
        raw = raw[:31] + bytes([raw[31] | 0x80])
    with pytest.raises(ValueError, match="small order"):
        PublicKey(raw)
    with pytest.raises(ValueError, match="small order"):
        PublicKey.from_jwk({"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)})


def test_unusual_but_valid_points_are_still_keys() -> None:
    # A 32-byte string that is not on the curve loads, and verifies nothing.
    key = PublicKey(b"\xff" * 31 + b"\x0f")
    assert key.verify(seeded_key(1).sign(b"m"), b"m") is False


@pytest.mark.parametrize("alg", ["none", "HS256", "ES256", "EdDSA ", "eddsa", "Ed25519", ""])
def test_algorithm_is_pinned(alg: str) -> None:
    with pytest.raises(ValueError):
        PublicKey(RFC8032_PUBLIC, alg)
    with pytest.raises(ValueError):
        PublicKey.from_jwk({"kty": "OKP", "crv": "Ed25519", "x": RFC8037_X, "alg": alg})


@pytest.mark.parametrize("raw", [b"", b"\x01" * 31, b"\x01" * 33, b"\x01" * 64])
def test_public_key_length(raw: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        PublicKey(raw)


@pytest.mark.parametrize(("jwk", "match"), [
    ({"kty": "EC", "crv": "Ed25519", "x": RFC8037_X}, "OKP"),
    ({"kty": "OKP", "crv": "X25519", "x": RFC8037_X}, "Ed25519"),
    ({"kty": "OKP", "crv": "Ed448", "x": RFC8037_X}, "Ed25519"),
    ({"crv": "Ed25519", "x": RFC8037_X}, "OKP"),
    ({"kty": "OKP", "crv": "Ed25519"}, "'x'"),
    ({"kty": "OKP", "crv": "Ed25519", "x": 5}, "'x'"),
    ({"kty": "OKP", "crv": "Ed25519", "x": RFC8037_X + "="}, "base64url"),
    ({"kty": "OKP", "crv": "Ed25519", "x": RFC8037_X.replace("_", "/")}, "base64url"),
    ({"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(RFC8032_PUBLIC[:31])}, "32 bytes"),
    ({"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(RFC8032_PUBLIC + b"\x00")}, "32 bytes"),
    ({"kty": "OKP", "crv": "Ed25519", "x": RFC8037_X,
      "d": "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"}, "private"),
    ({"kty": "OKP", "crv": "Ed25519", "x": RFC8037_X, "d": ""}, "private"),
])
def test_from_jwk_refuses(jwk: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PublicKey.from_jwk(jwk)


def test_pem_round_trip_in_memory() -> None:
    key = seeded_key(7)
    pem = key.to_pem()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    again = SigningKey.from_pem(pem)
    assert again.public_key == key.public_key
    assert again.sign(b"m") == key.sign(b"m")


def test_pem_of_another_key_type_is_refused() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    for private in (ec.generate_private_key(ec.SECP384R1()),
                    rsa.generate_private_key(public_exponent=65537, key_size=2048)):
        other = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        with pytest.raises(ValueError, match=r"Ed25519|P-256"):
            SigningKey.from_pem(other)
    with pytest.raises(ValueError):
        SigningKey.from_pem(b"not a pem")


def test_repr_never_shows_the_private_key() -> None:
    key = seeded_key(9)
    text = repr(key)
    assert key.public_key.thumbprint in text
    assert bytes([9]).hex() * 4 not in text
    assert "PRIVATE" not in text
    assert ED25519 == "EdDSA"


def test_rfc8037_a4_signature_through_our_signing_code() -> None:
    """RFC 8037 appendix A.4: the JWS signing input and its Ed25519 signature."""
    from trusthop.canonical import b64url_decode

    signing_input = b"eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc"
    expected = ("hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sV"
                "vpAr_MuM0KAg")
    key = SigningKey.from_seed(RFC8032_SECRET)
    assert key.public_key.thumbprint == RFC8037_THUMBPRINT
    assert b64url_encode(key.sign(signing_input)) == expected
    assert key.public_key.verify(b64url_decode(expected), signing_input)


# -- key tags: what a ring names its key by ------------------------------------


def test_key_tag_is_the_first_two_bytes_of_the_rfc7638_thumbprint() -> None:
    from trusthop.canonical import b64url_decode

    key = PublicKey.from_jwk({"kty": "OKP", "crv": "Ed25519", "x": RFC8037_X})
    assert key.key_tag == int.from_bytes(b64url_decode(RFC8037_THUMBPRINT)[:2], "big") == 0x90FA
    for seed in range(1, 6):
        public = seeded_key(seed).public_key
        assert public.key_tag == int.from_bytes(b64url_decode(public.thumbprint)[:2], "big")
        assert 0 <= public.key_tag <= 0xFFFF


def test_key_tag_is_not_part_of_key_equality_and_follows_the_key() -> None:
    a = PublicKey(RFC8032_PUBLIC)
    b = PublicKey.from_jwk(a.to_jwk() | {"alg": "EdDSA", "kid": "whatever", "use": "sig"})
    assert a == b and a.key_tag == b.key_tag  # kid, use and alg are no part of the thumbprint


def test_two_keys_may_share_a_key_tag() -> None:
    """16 bits: collisions exist (these two seeds were found by search), so a
    tag never identifies a key on its own."""
    from chainkit import TAG_TWIN_SEEDS, counter_key

    first, second = (counter_key(n).public_key for n in TAG_TWIN_SEEDS)
    assert first != second and first.key_tag == second.key_tag == 0x3232
    assert not first.verify(counter_key(TAG_TWIN_SEEDS[1]).sign(b"m"), b"m")
