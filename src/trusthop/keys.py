"""Ed25519 keys: generation, PEM files, JWK form and RFC 7638 key ids.

The algorithm belongs to the key, never to a message: a :class:`PublicKey`
knows its algorithm and verification never reads an algorithm from the wire.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from trusthop.canonical import EncodingError, b64url_decode, b64url_encode

ED25519 = "EdDSA"

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


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A verification key with its pinned algorithm."""

    raw: bytes
    alg: str = ED25519

    def __post_init__(self) -> None:
        if self.alg != ED25519:
            raise ValueError(f"unsupported algorithm {self.alg!r}")
        if len(self.raw) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")
        if self.raw[:31] + bytes([self.raw[31] & 0x7F]) in _SMALL_ORDER:
            raise ValueError("an Ed25519 public key of small order is not a key")

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when ``signature`` is valid for ``message`` under this key."""
        try:
            _load_public(self.raw).verify(signature, message)
        except InvalidSignature:
            return False
        return True

    @property
    def thumbprint(self) -> str:
        """RFC 7638 JWK thumbprint (SHA-256, base64url), the default key id."""
        members = {"crv": "Ed25519", "kty": "OKP", "x": b64url_encode(self.raw)}
        canonical = json.dumps(members, separators=(",", ":"), sort_keys=True)
        return b64url_encode(hashlib.sha256(canonical.encode()).digest())

    def to_jwk(self) -> dict[str, Any]:
        """The public JWK members (``kty``, ``crv``, ``x``, ``alg``)."""
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(self.raw), "alg": self.alg}

    @classmethod
    def from_jwk(cls, jwk: dict[str, Any]) -> PublicKey:
        """Read an Ed25519 public JWK.

        Raises:
            ValueError: not an OKP/Ed25519 key, a private key, or an ``alg``
                other than ``EdDSA``.
        """
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            raise ValueError("only OKP keys on curve Ed25519 are supported")
        if "d" in jwk:
            raise ValueError("a bundle must not hold private keys")
        alg = jwk.get("alg", ED25519)
        if alg != ED25519:
            raise ValueError(f"alg {alg!r} does not match an Ed25519 key")
        x = jwk.get("x")
        if not isinstance(x, str):
            raise ValueError("missing 'x'")
        try:
            raw = b64url_decode(x)
        except EncodingError as exc:
            raise ValueError("'x' is not base64url") from exc
        return cls(raw)


_PUBLIC_CACHE: dict[bytes, Ed25519PublicKey] = {}


def _load_public(raw: bytes) -> Ed25519PublicKey:
    # Loading a key costs about as much as a verify; bundles are small, so the
    # loaded objects are kept (bounded by the number of distinct keys seen).
    key = _PUBLIC_CACHE.get(raw)
    if key is None:
        key = Ed25519PublicKey.from_public_bytes(raw)
        if len(_PUBLIC_CACHE) < 4096:
            _PUBLIC_CACHE[raw] = key
    return key


class SigningKey:
    """An Ed25519 private key that signs rings."""

    __slots__ = ("_key", "public_key")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_key = PublicKey(raw)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        """Deterministic key from a 32-byte seed (tests and worked examples)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_pem(cls, data: bytes) -> SigningKey:
        """Read an unencrypted PKCS#8 PEM Ed25519 private key.

        Raises:
            ValueError: not PEM, encrypted, or not an Ed25519 key.
        """
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the PEM file does not hold an Ed25519 private key")
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
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.public_key.thumbprint!r})"
