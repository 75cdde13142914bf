"""Ring-signing keys: Ed25519 (default) and ECDSA P-256 (ES256).

Generation, PEM files, JWK form and RFC 7638 key ids. The algorithm belongs
to the key, never to a message: a :class:`PublicKey` knows its algorithm and
verification never reads an algorithm from the wire.

ES256 signatures are the 64-byte ``r || s`` of JWS (RFC 7518 section 3.4),
and only the low-``s`` form is accepted or produced: ECDSA lets anyone turn
a valid ``(r, s)`` into a second valid ``(r, n - s)``, which would give one
ring two hashes and let a copy slip past replay detection.

Ed25519 has two backends with identical results: ``cryptography``
(OpenSSL, always installed) and ``nacl`` (libsodium through PyNaCl,
``pip install 'trusthop[nacl]'``), about twice as fast to verify and 1.5
times as fast to sign. The faster one is chosen automatically when it is
installed; the environment variable ``TRUSTHOP_ED25519_BACKEND``
(``nacl``, ``cryptography`` or ``auto``) read at import, or
:func:`set_ed25519_backend`, overrides the choice. Ed25519 signing is
deterministic (RFC 8032), so both backends produce the same bytes. Both
accept exactly the same signatures: OpenSSL's rules (``S < L``, the
recomputed ``R`` compared byte for byte) are the reference, and the few
inputs libsodium refuses although OpenSSL accepts them (a small-order ``R``,
which only the key's holder can make valid; a non-canonical public key
encoding) are handed to OpenSSL instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from trusthop.canonical import EncodingError, b64url_decode, b64url_encode

try:  # the optional libsodium backend (extra "nacl")
    from nacl.bindings import crypto_sign as _sodium_sign
    from nacl.bindings import crypto_sign_open as _sodium_open
    from nacl.exceptions import BadSignatureError as _SodiumBadSignature
except ImportError:  # pragma: no cover - depends on the installation
    _sodium_sign = None  # type: ignore[assignment]
    _sodium_open = None  # type: ignore[assignment]
    _SodiumBadSignature = Exception  # type: ignore[assignment,misc]

ED25519 = "EdDSA"
ES256 = "ES256"
ALGORITHMS = (ED25519, ES256)

# Order of the P-256 group.
_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_ECDSA = ec.ECDSA(hashes.SHA256())

# Encodings of the eight points of small order (the sign bit, the high bit of
# the last byte, is ignored). A constant signature "verifies" many or all
# messages under such a key, so it can never be a bundle key.
_SMALL_ORDER = frozenset(
    bytes.fromhex(h)
    for h in (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    )
)
# The same encodings with the sign bit set too: libsodium refuses a signature
# whose R is any of these 14 (OpenSSL does not; see _sodium_agrees).
_SMALL_ORDER_ANY_SIGN = _SMALL_ORDER | frozenset(
    e[:31] + bytes([e[31] | 0x80]) for e in _SMALL_ORDER
)

# --------------------------------------------------------------------------- #
# Ed25519 backends
# --------------------------------------------------------------------------- #

NACL = "nacl"
CRYPTOGRAPHY = "cryptography"
ED25519_BACKENDS = (NACL, CRYPTOGRAPHY)
"""Ed25519 backends, fastest first."""
BACKEND_ENV = "TRUSTHOP_ED25519_BACKEND"
"""Environment variable read at import: ``nacl``, ``cryptography`` or ``auto``."""

_use_sodium = False


def available_ed25519_backends() -> tuple[str, ...]:
    """The Ed25519 backends installed here, fastest first."""
    return ED25519_BACKENDS if _sodium_open is not None else (CRYPTOGRAPHY,)


def ed25519_backend() -> str:
    """The Ed25519 backend in use: ``"nacl"`` or ``"cryptography"``."""
    return NACL if _use_sodium else CRYPTOGRAPHY


def set_ed25519_backend(name: str | None = None) -> str:
    """Choose the Ed25519 backend for every key of this process.

    ``None`` or ``"auto"``: the fastest installed (``nacl`` when PyNaCl is
    installed). Results never depend on the choice, only speed does.

    Returns:
        The backend now in use.

    Raises:
        ValueError: an unknown backend, or ``nacl`` without PyNaCl.
    """
    global _use_sodium
    if name is None or name == "auto":
        name = available_ed25519_backends()[0]
    if name not in ED25519_BACKENDS:
        raise ValueError(
            f"unknown Ed25519 backend {name!r} (use {', '.join(ED25519_BACKENDS)} or auto)"
        )
    if name not in available_ed25519_backends():
        raise ValueError("the nacl backend needs PyNaCl: pip install 'trusthop[nacl]'")
    _use_sodium = name == NACL
    return name


def _noncanonical_key(raw: bytes) -> bool:
    """An Ed25519 key encoding whose y coordinate is not below p = 2**255 - 19."""
    return raw[31] & 0x7F == 0x7F and raw[0] >= 0xED and raw[1:31] == b"\xff" * 30


def _sodium_agrees(raw: bytes, signature: bytes) -> bool:
    """Whether libsodium's verdict on ``signature`` under ``raw`` is OpenSSL's.

    libsodium (crypto_sign_open, not built in compat mode) also refuses a
    small-order R and a non-canonical public key, which OpenSSL verifies as
    usual; those inputs go to OpenSSL. Both refuse ``S >= L`` and compare
    the recomputed R byte for byte, so every other input gets one answer.
    """
    return (
        len(signature) == 64
        and signature[:32] not in _SMALL_ORDER_ANY_SIGN
        and not _noncanonical_key(raw)
    )


def _initial_backend() -> None:
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    try:
        set_ed25519_backend(choice)
    except ValueError:  # an unusable choice must not break imports: use the default
        set_ed25519_backend(None)


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A verification key with its pinned algorithm.

    ``raw`` is the 32-byte Ed25519 key, or for ES256 the 65-byte
    uncompressed P-256 point (``04 || x || y``).

    Raises:
        ValueError: an unknown algorithm, a wrong length, a small-order
            Ed25519 key, or a point that is not on P-256.
    """

    raw: bytes
    alg: str = ED25519
    key_tag: int = field(init=False, repr=False, compare=False)
    """The first two bytes of the RFC 7638 thumbprint as an integer: what a
    ring names to say which of its actor's keys signed it."""

    def __post_init__(self) -> None:
        self._check()
        digest = hashlib.sha256(self._canonical_jwk()).digest()
        object.__setattr__(self, "key_tag", int.from_bytes(digest[:2], "big"))

    def _check(self) -> None:
        if self.alg == ED25519:
            if len(self.raw) != 32:
                raise ValueError("an Ed25519 public key is 32 bytes")
            if self.raw[:31] + bytes([self.raw[31] & 0x7F]) in _SMALL_ORDER:
                raise ValueError("an Ed25519 public key of small order is not a key")
        elif self.alg == ES256:
            if len(self.raw) != 65 or self.raw[0] != 4:
                raise ValueError("an ES256 public key is a 65-byte uncompressed P-256 point")
            _load_public(self.raw, self.alg)  # raises ValueError off the curve
        else:
            raise ValueError(f"unsupported algorithm {self.alg!r}")

    @classmethod
    def of(cls, key: object) -> PublicKey:
        """The :class:`PublicKey` of a ``cryptography`` public key object.

        Raises:
            ValueError: neither Ed25519 nor an EC key on P-256.
        """
        if isinstance(key, Ed25519PublicKey):
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return cls(raw)
        if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            point = key.public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
            return cls(point, ES256)
        raise ValueError("only Ed25519 and P-256 (ES256) keys are supported")

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when ``signature`` is valid for ``message`` under this key."""
        if self.alg == ED25519 and _use_sodium and _sodium_agrees(self.raw, signature):
            try:
                _sodium_open(signature + message, self.raw)
            except _SodiumBadSignature:
                return False
            return True
        try:
            if self.alg == ED25519:
                key = _load_public(self.raw, self.alg)
                assert isinstance(key, Ed25519PublicKey)
                key.verify(signature, message)
                return True
            if len(signature) != 64:
                return False
            r = int.from_bytes(signature[:32], "big")
            s = int.from_bytes(signature[32:], "big")
            if not (0 < r < _P256_N and 0 < s <= _P256_N // 2):
                return False
            key = _load_public(self.raw, self.alg)
            assert isinstance(key, ec.EllipticCurvePublicKey)
            key.verify(encode_dss_signature(r, s), message, _ECDSA)
        except InvalidSignature:
            return False
        return True

    def _jwk_members(self) -> dict[str, str]:
        if self.alg == ED25519:
            return {"crv": "Ed25519", "kty": "OKP", "x": b64url_encode(self.raw)}
        return {
            "crv": "P-256",
            "kty": "EC",
            "x": b64url_encode(self.raw[1:33]),
            "y": b64url_encode(self.raw[33:]),
        }

    def _canonical_jwk(self) -> bytes:
        return json.dumps(self._jwk_members(), separators=(",", ":"), sort_keys=True).encode()

    @property
    def thumbprint(self) -> str:
        """RFC 7638 JWK thumbprint (SHA-256, base64url), the default key id."""
        return b64url_encode(hashlib.sha256(self._canonical_jwk()).digest())

    def to_jwk(self) -> dict[str, Any]:
        """The public JWK members (``kty``, ``crv``, ``x``, [``y``], ``alg``)."""
        return self._jwk_members() | {"alg": self.alg}

    @classmethod
    def from_jwk(cls, jwk: dict[str, Any]) -> PublicKey:
        """Read an Ed25519 (OKP) or P-256 (EC) public JWK.

        Raises:
            ValueError: another key type or curve, a private key, an ``alg``
                that does not match the key, or bad coordinates.
        """
        if "d" in jwk:
            raise ValueError("a bundle must not hold private keys")
        kty, crv = jwk.get("kty"), jwk.get("crv")
        if kty == "OKP" and crv == "Ed25519":
            alg, raw = ED25519, _coordinate(jwk, "x", 32)
        elif kty == "EC" and crv == "P-256":
            alg = ES256
            raw = b"\x04" + _coordinate(jwk, "x", 32) + _coordinate(jwk, "y", 32)
        else:
            raise ValueError("only OKP keys on Ed25519 and EC keys on P-256 are supported")
        claimed = jwk.get("alg", alg)
        if claimed != alg:
            raise ValueError(f"alg {claimed!r} does not match a {crv} key (the key's is {alg})")
        return cls(raw, alg)


def _coordinate(jwk: dict[str, Any], name: str, size: int) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise ValueError(f"missing {name!r}")
    try:
        raw = b64url_decode(value)
    except EncodingError as exc:
        raise ValueError(f"{name!r} is not base64url") from exc
    if len(raw) != size:
        raise ValueError(f"{name!r} must be {size} bytes")
    return raw


_PUBLIC_CACHE: dict[tuple[str, bytes], Ed25519PublicKey | ec.EllipticCurvePublicKey] = {}


def _load_public(raw: bytes, alg: str) -> Ed25519PublicKey | ec.EllipticCurvePublicKey:
    # Loading a key costs about as much as a verify; bundles are small, so the
    # loaded objects are kept (bounded by the number of distinct keys seen).
    key = _PUBLIC_CACHE.get((alg, raw))
    if key is None:
        if alg == ED25519:
            key = Ed25519PublicKey.from_public_bytes(raw)
        else:
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
        if len(_PUBLIC_CACHE) < 4096:
            _PUBLIC_CACHE[(alg, raw)] = key
    return key


class SigningKey:
    """A private key that signs rings: Ed25519 (default) or P-256 (ES256)."""

    __slots__ = ("_key", "_sodium_secret", "public_key")

    def __init__(self, key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> None:
        if isinstance(key, ec.EllipticCurvePrivateKey) and not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("an ECDSA ring-signing key must be on P-256")
        self._key = key
        self.public_key = PublicKey.of(key.public_key())
        # libsodium's 64-byte secret key (seed || public key), for the nacl backend.
        self._sodium_secret: bytes | None = None
        if isinstance(key, Ed25519PrivateKey):
            seed = key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            self._sodium_secret = seed + self.public_key.raw

    @property
    def alg(self) -> str:
        return self.public_key.alg

    @classmethod
    def generate(cls, alg: str = ED25519) -> SigningKey:
        """A new key for ``alg`` (``EdDSA`` or ``ES256``).

        Raises:
            ValueError: another algorithm.
        """
        if alg == ED25519:
            return cls(Ed25519PrivateKey.generate())
        if alg == ES256:
            return cls(ec.generate_private_key(ec.SECP256R1()))
        raise ValueError(f"unsupported algorithm {alg!r} (use {' or '.join(ALGORITHMS)})")

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        """Deterministic Ed25519 key from a 32-byte seed (tests and worked examples)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_pem(cls, data: bytes) -> SigningKey:
        """Read an unencrypted PEM private key (PKCS#8, or SEC1 for EC).

        Raises:
            ValueError: not PEM, encrypted, or neither Ed25519 nor P-256.
        """
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, (Ed25519PrivateKey, ec.EllipticCurvePrivateKey)):
            raise ValueError("the PEM file holds neither an Ed25519 nor a P-256 private key")
        return cls(key)

    @classmethod
    def load(cls, path: str | Path) -> SigningKey:
        return cls.from_pem(Path(path).read_bytes())

    def to_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(self, message: bytes) -> bytes:
        """Sign ``message``: 64 bytes for either algorithm (ES256 as low-``s`` ``r || s``)."""
        secret = self._sodium_secret
        if secret is not None and _use_sodium:
            return _sodium_sign(message, secret)[:64]
        key = self._key
        if isinstance(key, Ed25519PrivateKey):
            return key.sign(message)
        r, s = decode_dss_signature(key.sign(message, _ECDSA))
        if s > _P256_N // 2:
            s = _P256_N - s
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def __repr__(self) -> str:
        return f"SigningKey(alg={self.alg!r}, kid={self.public_key.thumbprint!r})"


_initial_backend()
