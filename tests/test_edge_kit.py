"""Building blocks for the edge tests (keys, a JWKS, two token signers) and
the tests of those blocks themselves.

Tokens are made two ways: :func:`make_token`, a minimal signer written here
(so a test can put any bytes in any segment), and :func:`pyjwt_token`, PyJWT
(interoperability: what a real library produces must verify). The tests at
the bottom prove the minimal signer is a faithful JWS signer (PyJWT accepts
its tokens), so an attack built with it fails for the reason the test names
and not because the signer is broken.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from trusthop.canonical import b64url_decode, b64url_encode
from trusthop.edge import JwksKeySet
from trusthop.errors import Reason, TrustError

ISSUER = "https://idp.example.com"
AUDIENCE = "https://api.example.com"
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
SUBJECT = "user:alice"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = Ed25519PrivateKey.generate()
ATTACKER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER_EC = ec.generate_private_key(ec.SECP256R1())

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | Ed25519PrivateKey

KEYS: dict[str, PrivateKey] = {"RS256": RSA_KEY, "ES256": EC_KEY, "EdDSA": ED_KEY}
KIDS = {"RS256": "rsa-1", "ES256": "ec-1", "EdDSA": "ed-1"}
ALGS = ("RS256", "ES256", "EdDSA")


def b64(data: bytes | str) -> str:
    return b64url_encode(data.encode() if isinstance(data, str) else data)


def _int(value: int, length: int | None = None) -> str:
    size = length or (value.bit_length() + 7) // 8
    return b64(value.to_bytes(size, "big"))


def jwk_of(key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    """The public JWK of a private or public key, written by hand."""
    public = key.public_key() if hasattr(key, "public_key") else key
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        out = {"kty": "RSA", "n": _int(numbers.n), "e": _int(numbers.e)}
    elif isinstance(public, ec.EllipticCurvePublicKey):
        numbers_ec = public.public_numbers()
        size = (public.curve.key_size + 7) // 8
        out = {
            "kty": "EC",
            "crv": "P-256",
            "x": _int(numbers_ec.x, size),
            "y": _int(numbers_ec.y, size),
        }
    else:
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        out = {"kty": "OKP", "crv": "Ed25519", "x": b64(raw)}
    return out | {"kid": kid, "use": "sig"} | extra


def jwks_document(*extra: dict[str, Any]) -> dict[str, Any]:
    return {"keys": [jwk_of(KEYS[alg], KIDS[alg], alg=alg) for alg in ALGS] + list(extra)}


KEYSET = JwksKeySet.parse(jwks_document())


def sign(alg: str, key: Any, data: bytes) -> bytes:
    """A JWS signature: PKCS#1 v1.5 for RS256, raw r||s for ES256, Ed25519."""
    if alg == "RS256":
        return bytes(key.sign(data, padding.PKCS1v15(), hashes.SHA256()))
    if alg == "ES256":
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    if alg == "EdDSA":
        return bytes(key.sign(data))
    if alg == "HS256":
        return hmac.new(key, data, hashlib.sha256).digest()
    raise AssertionError(alg)


def claims(**changes: Any) -> dict[str, Any]:
    """Good claims; ``name=None`` removes a claim, ``name=value`` sets it."""
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": SUBJECT,
        "exp": NOW + 600,
        "nbf": NOW - 10,
        "iat": NOW - 10,
        "scope": "orders:read orders:write",
    }
    for name, value in changes.items():
        if value is None:
            base.pop(name, None)
        else:
            base[name] = value
    return base


def make_token(
    payload: dict[str, Any] | None = None,
    *,
    alg: str = "RS256",
    kid: str | None = "",
    key: Any = None,
    header: dict[str, Any] | None = None,
    header_json: str | None = None,
    payload_json: str | None = None,
    payload_bytes: bytes | None = None,
    signature: bytes | None = None,
    sign_as: str | None = None,
) -> str:
    """A compact JWS signed by the minimal signer.

    ``header``/``header_json`` and ``payload_json``/``payload_bytes`` replace
    the generated parts verbatim (duplicate members, ``NaN``, bad UTF-8);
    ``sign_as`` signs with another algorithm than the header names;
    ``signature`` replaces the signature.
    """
    if header_json is None:
        head: dict[str, Any] = {"alg": alg, "typ": "JWT"}
        if kid == "":
            kid = KIDS.get(alg, "rsa-1")
        if kid is not None:
            head["kid"] = kid
        if header is not None:
            head = header
        header_json = json.dumps(head)
    if payload_bytes is None:
        payload_bytes = (
            payload_json if payload_json is not None else json.dumps(payload or claims())
        ).encode()
    signing_input = f"{b64(header_json)}.{b64(payload_bytes)}"
    if signature is None:
        how = sign_as or alg
        signature = sign(
            how, key if key is not None else KEYS.get(how, RSA_KEY), signing_input.encode()
        )
    return f"{signing_input}.{b64(signature)}"


def pyjwt_token(
    payload: dict[str, Any] | None = None, *, alg: str = "RS256", **headers: Any
) -> str:
    """A token made by PyJWT with our private key for ``alg``."""
    return pyjwt.encode(
        payload or claims(), KEYS[alg], algorithm=alg, headers={"kid": KIDS[alg], **headers}
    )


def secret_leaks(token: str, error: BaseException) -> list[str]:
    """Parts of ``token`` (whole, or a segment of 16+ characters) that occur
    in ``error``'s message or in any exception it was raised from."""
    texts = []
    seen: BaseException | None = error
    while seen is not None:
        texts.append(str(seen))
        texts.append(repr(seen))
        seen = seen.__cause__ or seen.__context__
    needles = [n for n in (token, *token.split(".")) if len(n) >= 16]
    return [n[:20] for n in needles if any(n in t for t in texts)]


def expect_rejected(call: Any, token: str, reason: Reason = Reason.INVALID_TOKEN) -> TrustError:
    """Run ``call()``, require ``TrustError(reason)`` whose messages do not leak ``token``."""
    with pytest.raises(TrustError) as info:
        call()
    assert info.value.reason is reason, info.value
    assert secret_leaks(token, info.value) == []
    return info.value


# -- the building blocks are what they claim to be ---------------------------


@pytest.mark.parametrize("alg", ALGS)
def test_minimal_signer_tokens_verify_with_pyjwt(alg: str) -> None:
    token = make_token(alg=alg)
    decoded = pyjwt.decode(
        token,
        KEYS[alg].public_key(),
        algorithms=[alg],
        audience=AUDIENCE,
        issuer=ISSUER,
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )
    assert decoded["sub"] == SUBJECT


@pytest.mark.parametrize("alg", ALGS)
def test_handwritten_jwks_matches_pyjwt_jwk(alg: str) -> None:
    ours = jwk_of(KEYS[alg], KIDS[alg])
    theirs = json.loads(pyjwt.PyJWK.from_dict(ours).Algorithm.to_jwk(KEYS[alg].public_key()))
    assert {k: v for k, v in theirs.items() if k in ours} == {
        k: v for k, v in ours.items() if k in theirs
    }


def test_b64_helper_is_unpadded_base64url() -> None:
    assert b64(b"\xfb\xff") == "-_8"
    assert b64url_decode(b64(b"abc")) == b"abc"
    assert base64.urlsafe_b64decode(b64(b"ab") + "==") == b"ab"


def test_secret_leaks_finds_a_leak() -> None:
    token = make_token()
    assert secret_leaks(token, ValueError(f"bad {token}")) != []
    signature = token.split(".")[2]
    assert secret_leaks(token, ValueError(f"sig {signature}")) != []
    assert secret_leaks(token, ValueError("nothing here")) == []
