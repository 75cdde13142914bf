"""The two Ed25519 backends (OpenSSL through ``cryptography``, libsodium through
PyNaCl) sign the same bytes and accept exactly the same signatures.

Edge cases follow "Taming the many EdDSAs" (Chalkias et al., 2020): ``S >= L``,
small-order and non-canonical ``R``, non-canonical and small-order keys. The
reference is OpenSSL's verdict; libsodium is stricter on a few inputs, which
:mod:`trusthop.keys` hands to OpenSSL, so the verdict never depends on the
backend.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest

from trusthop import keys
from trusthop.keys import CRYPTOGRAPHY, NACL, PublicKey, SigningKey

nacl_bindings = pytest.importorskip("nacl.bindings")
nacl_exceptions = pytest.importorskip("nacl.exceptions")

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = (-121665 * pow(121666, -1, P)) % P
IDENTITY = bytes([1]) + bytes(31)


@pytest.fixture
def restore_backend() -> Iterator[None]:
    before = keys.ed25519_backend()
    yield
    keys.set_ed25519_backend(before)


def verdicts(public: PublicKey, signature: bytes, message: bytes) -> dict[str, bool]:
    out = {}
    before = keys.ed25519_backend()
    try:
        for backend in (CRYPTOGRAPHY, NACL):
            keys.set_ed25519_backend(backend)
            out[backend] = public.verify(signature, message)
    finally:
        keys.set_ed25519_backend(before)
    return out


def sign_with(backend: str, key: SigningKey, message: bytes) -> bytes:
    before = keys.ed25519_backend()
    keys.set_ed25519_backend(backend)
    try:
        return key.sign(message)
    finally:
        keys.set_ed25519_backend(before)


def scalar(seed: bytes) -> int:
    """The secret scalar of an RFC 8032 seed (clamped)."""
    a = int.from_bytes(hashlib.sha512(seed).digest()[:32], "little")
    return (a & ((1 << 254) - 8)) | (1 << 254)


def challenge(r: bytes, public: bytes, message: bytes) -> int:
    return int.from_bytes(hashlib.sha512(r + public + message).digest(), "little") % L


def test_both_backends_are_available_here() -> None:
    assert keys.available_ed25519_backends() == (NACL, CRYPTOGRAPHY)


def test_auto_picks_libsodium(restore_backend: None) -> None:
    assert keys.set_ed25519_backend(None) == NACL
    assert keys.set_ed25519_backend("auto") == NACL
    assert keys.ed25519_backend() == NACL


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown Ed25519 backend"):
        keys.set_ed25519_backend("openssl")


@pytest.mark.parametrize("seed", [bytes([i]) * 32 for i in (1, 2, 0x42, 0xFF)])
def test_sign_with_one_verify_with_the_other(seed: bytes) -> None:
    key = SigningKey.from_seed(seed)
    for size in (0, 1, 64, 300, 4096):
        message = os.urandom(size)
        by_openssl = sign_with(CRYPTOGRAPHY, key, message)
        by_sodium = sign_with(NACL, key, message)
        assert by_openssl == by_sodium  # RFC 8032 signing is deterministic
        assert verdicts(key.public_key, by_openssl, message) == {CRYPTOGRAPHY: True, NACL: True}
        assert verdicts(key.public_key, by_sodium, message + b"x") == {
            CRYPTOGRAPHY: False,
            NACL: False,
        }


def test_generated_keys_sign_alike() -> None:
    key = SigningKey.generate()
    message = b"trusthop/v1/hop\x00ring"
    assert sign_with(NACL, key, message) == sign_with(CRYPTOGRAPHY, key, message)


def test_non_canonical_s_is_refused_by_both() -> None:
    key = SigningKey.from_seed(b"\x07" * 32)
    message = b"malleable?"
    signature = key.sign(message)
    s = int.from_bytes(signature[32:], "little")
    k = 1
    while s + k * L < 2**256:
        forged = signature[:32] + (s + k * L).to_bytes(32, "little")
        assert verdicts(key.public_key, forged, message) == {CRYPTOGRAPHY: False, NACL: False}
        k += 1
    assert k > 2  # S + L and S + 2L at least were tried


@pytest.mark.parametrize("encoding", sorted(keys._SMALL_ORDER_ANY_SIGN))
def test_small_order_r_gets_the_openssl_verdict(encoding: bytes) -> None:
    """Only the key's holder can make such a signature valid: R = identity,
    S = H(R || A || M) * a. OpenSSL accepts it, libsodium alone would not:
    trusthop gives OpenSSL's verdict with either backend."""
    seed = b"\x09" * 32
    key = SigningKey.from_seed(seed)
    public = key.public_key.raw
    message = b"small-order R"
    s = challenge(encoding, public, message) * scalar(seed) % L
    forged = encoding + s.to_bytes(32, "little")
    expected = encoding == IDENTITY  # sB - hA is the identity: only its canonical encoding
    assert verdicts(key.public_key, forged, message) == {CRYPTOGRAPHY: expected, NACL: expected}
    with pytest.raises(nacl_exceptions.BadSignatureError):  # libsodium on its own refuses
        nacl_bindings.crypto_sign_open(forged + message, public)


def _on_curve_y(y: int) -> bool:
    """Whether some x satisfies -x^2 + y^2 = 1 + d x^2 y^2 (mod p)."""
    x2 = (y * y - 1) * pow(D * y * y + 1, -1, P) % P
    return x2 == 0 or pow(x2, (P - 1) // 2, P) == 1


def test_non_canonical_keys_get_the_openssl_verdict() -> None:
    found = 0
    for k in range(2, 19):
        if not _on_curve_y(k):
            continue
        for sign in (0, 0x80):
            raw = bytearray((P + k).to_bytes(32, "little"))
            raw[31] |= sign
            public = PublicKey(bytes(raw))  # not small order: accepted as a key
            assert keys._noncanonical_key(public.raw)
            for signature in (os.urandom(64), IDENTITY + bytes(32), bytes(64)):
                assert verdicts(public, signature, b"m") == {CRYPTOGRAPHY: False, NACL: False}
            found += 1
    assert found


def test_non_canonical_and_off_curve_r_is_refused_by_both() -> None:
    key = SigningKey.from_seed(b"\x0b" * 32)
    message = b"non-canonical R"
    signature = key.sign(message)
    r = signature[:32]
    flipped = r[:31] + bytes([r[31] ^ 0x80])  # the other x: -R, or nothing
    assert verdicts(key.public_key, flipped + signature[32:], message) == {
        CRYPTOGRAPHY: False,
        NACL: False,
    }
    for k in range(19):  # every encoding of y >= p
        bad_r = (P + k).to_bytes(32, "little")
        assert verdicts(key.public_key, bad_r + signature[32:], message) == {
            CRYPTOGRAPHY: False,
            NACL: False,
        }


def test_every_single_bit_flip_is_refused_by_both() -> None:
    key = SigningKey.from_seed(b"\x0c" * 32)
    message = b"flip"
    signature = key.sign(message)
    for index in range(64):
        for bit in (0x01, 0x80):
            forged = bytearray(signature)
            forged[index] ^= bit
            assert verdicts(key.public_key, bytes(forged), message) == {
                CRYPTOGRAPHY: False,
                NACL: False,
            }


@pytest.mark.parametrize("length", [0, 32, 63, 65, 128])
def test_wrong_signature_lengths_are_refused_by_both(length: int) -> None:
    key = SigningKey.from_seed(b"\x0d" * 32)
    message = b"length"
    signature = (key.sign(message) * 2)[:length]
    assert verdicts(key.public_key, signature, message) == {CRYPTOGRAPHY: False, NACL: False}


def test_a_shifted_signature_cannot_pass_as_a_shorter_one() -> None:
    """libsodium takes ``signature || message``: a 63-byte signature must not
    borrow the message's first byte."""
    key = SigningKey.from_seed(b"\x0e" * 32)
    tail = b"rest of the message"
    full = key.sign(tail)
    message = full[63:] + tail
    assert verdicts(key.public_key, full[:63], message) == {CRYPTOGRAPHY: False, NACL: False}


def test_small_order_keys_are_still_refused() -> None:
    for encoding in sorted(keys._SMALL_ORDER_ANY_SIGN):
        with pytest.raises(ValueError, match="small order"):
            PublicKey(encoding)


def test_es256_is_untouched_by_the_backend(restore_backend: None) -> None:
    key = SigningKey.generate(keys.ES256)
    for backend in (CRYPTOGRAPHY, NACL):
        keys.set_ed25519_backend(backend)
        signature = key.sign(b"m")
        assert key.public_key.verify(signature, b"m")
