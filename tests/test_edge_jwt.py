"""Attacks on trusthop.edge.jwt and the key-set parser: for every check, the
token (or key set) that tries to get around it."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from test_edge_kit import (
    ALGS,
    ATTACKER_EC,
    ATTACKER_RSA,
    AUDIENCE,
    EC_KEY,
    ED_KEY,
    ISSUER,
    KEYS,
    KEYSET,
    KIDS,
    NOW,
    RSA_KEY,
    SUBJECT,
    b64,
    claims,
    expect_rejected,
    jwk_of,
    jwks_document,
    make_token,
    pyjwt_token,
    sign,
)

from trusthop.canonical import b64url_decode
from trusthop.edge import (
    MAX_LEEWAY,
    MAX_TOKEN_BYTES,
    JwksError,
    JwksKeySet,
    JwtKey,
    VerifiedToken,
    key_from_jwk,
    verify_jwt,
)
from trusthop.edge.jwt import parse_jws
from trusthop.errors import Reason
from trusthop.sign import hash_credential

R = Reason


def verify(
    token: str,
    *,
    keys: JwksKeySet = KEYSET,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    now: float = NOW,
    leeway: float = 60,
) -> VerifiedToken:
    return verify_jwt(token, keys.key, issuer=issuer, audience=audience, now=now, leeway=leeway)


def rejected(token: str, reason: Reason = R.INVALID_TOKEN, **kw: Any) -> str:
    """Require rejection with ``reason``; return the message (token-free)."""
    return expect_rejected(lambda: verify(token, **kw), token, reason).message


# -- what must verify ---------------------------------------------------------


@pytest.mark.parametrize("alg", ALGS)
def test_own_signer_tokens_verify(alg: str) -> None:
    token = make_token(claims(acr="urn:mace:incommon:iap:silver", amr=["pwd", "otp"]), alg=alg)
    verified = verify(token)
    assert verified.subject == SUBJECT
    assert verified.issuer == ISSUER
    assert verified.audience == (AUDIENCE,)
    assert verified.expires_at == NOW + 600
    assert verified.not_before == NOW - 10
    assert verified.issued_at == NOW - 10
    assert verified.acr == "urn:mace:incommon:iap:silver"
    assert verified.amr == ("pwd", "otp")
    assert verified.scope == frozenset({"orders:read", "orders:write"})
    assert verified.alg == alg
    assert verified.kid == KIDS[alg]
    assert verified.token_hash == hashlib.sha256(token.encode()).digest() == hash_credential(token)
    assert verified.claims["sub"] == SUBJECT
    with pytest.raises(TypeError):
        verified.claims["sub"] = "user:mallory"  # type: ignore[index]


@pytest.mark.parametrize("alg", ALGS)
def test_pyjwt_tokens_verify(alg: str) -> None:
    token = pyjwt_token(
        claims(aud=["other", AUDIENCE], scp=["orders:read", "orders:write"]), alg=alg
    )
    verified = verify(token)
    assert verified.subject == SUBJECT
    assert verified.alg == alg
    assert verified.audience == ("other", AUDIENCE)
    assert verified.scope == frozenset({"orders:read", "orders:write"})


@pytest.mark.parametrize("alg", ALGS)
def test_key_set_from_pyjwt_jwks(alg: str) -> None:
    """JWKs written by PyJWT parse, with the algorithm pinned from the key."""
    algorithm = pyjwt.get_algorithm_by_name(alg)
    jwk = json.loads(algorithm.to_jwk(KEYS[alg].public_key())) | {"kid": KIDS[alg]}
    keys = JwksKeySet.parse({"keys": [jwk]})
    assert keys.key(KIDS[alg]).alg == alg
    assert verify(pyjwt_token(alg=alg), keys=keys).subject == SUBJECT


def test_verified_token_repr_hides_claims() -> None:
    token = make_token(claims(email="alice@example.com"))
    text = repr(verify(token))
    assert "alice@example.com" not in text
    assert token not in text


def test_parse_keeps_no_copy_of_the_token() -> None:
    token = make_token()
    parts = parse_jws(token)
    assert token not in repr(parts)
    assert token.split(".")[2] not in repr(parts)
    assert parts.token_hash == hash_credential(token)


# -- the algorithm belongs to the key ------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", [b"", b"x"])
def test_alg_none(alg: str, signature: bytes) -> None:
    header = json.dumps({"alg": alg, "kid": "rsa-1", "typ": "JWT"})
    if signature:
        token = make_token(header_json=header, signature=signature)
    else:
        token = f"{b64(header)}.{b64(json.dumps(claims()))}."
    rejected(token)


def _pem(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _der(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize(
    "secret",
    [
        _pem,
        _der,
        lambda key: _pem(key).strip(),
        lambda key: json.dumps(jwk_of(key, "k")).encode(),
    ],
    ids=["pem", "der", "pem-stripped", "jwk-json"],
)
def test_hs256_with_the_public_key_as_secret(alg: str, secret: Callable[[Any], bytes]) -> None:
    """The classic confusion: HMAC keyed with the public key, kid of the real key."""
    token = make_token(alg="HS256", kid=KIDS[alg], key=secret(KEYS[alg]))
    rejected(token)


@pytest.mark.parametrize(
    "alg",
    [
        "HS256",
        "HS384",
        "HS512",
        "RS384",
        "RS512",
        "PS256",
        "ES384",
        "ES512",
        "Ed25519",
        "ES256K",
        "rs256",
        "eddsa",
        "",
    ],
)
def test_algorithms_outside_the_allowlist(alg: str) -> None:
    rejected(make_token(header={"alg": alg, "kid": "rsa-1"}, sign_as="RS256"))


@pytest.mark.parametrize(
    ("header_alg", "kid", "sign_as", "key"),
    [
        ("RS256", "ec-1", "RS256", ATTACKER_RSA),  # RSA header, EC key
        ("RS256", "ed-1", "RS256", ATTACKER_RSA),
        ("ES256", "rsa-1", "ES256", ATTACKER_EC),  # EC header, RSA key
        ("ES256", "ed-1", "ES256", ATTACKER_EC),
        ("EdDSA", "rsa-1", "EdDSA", ED_KEY),  # a genuine Ed25519 signature, RSA key
        ("EdDSA", "ec-1", "EdDSA", ED_KEY),
        ("RS256", "ec-1", "ES256", EC_KEY),  # genuine ES256 signature, RS256 label
        ("ES256", "rsa-1", "RS256", RSA_KEY),  # genuine RS256 signature, ES256 label
    ],
)
def test_header_alg_must_be_the_keys(header_alg: str, kid: str, sign_as: str, key: Any) -> None:
    token = make_token(alg=header_alg, kid=kid, sign_as=sign_as, key=key)
    assert "does not match" in rejected(token)


def test_alg_member_in_the_jwk_cannot_widen_a_key() -> None:
    """A JWK that says HS256 (or another key type's algorithm) is skipped."""
    for alg in ("HS256", "ES256", "none", "PS256"):
        keys = JwksKeySet.parse(jwks_document(jwk_of(RSA_KEY, "rsa-x", alg=alg)))
        assert "rsa-x" not in keys
        rejected(make_token(kid="rsa-x"), keys=keys)


def test_oct_key_in_the_jwks_never_verifies() -> None:
    secret = b"public knowledge"
    oct_key = {"kty": "oct", "kid": "hmac-1", "k": b64(secret), "alg": "HS256"}
    keys = JwksKeySet.parse(jwks_document(oct_key))
    assert "hmac-1" not in keys
    assert any("hmac-1" in why for why in keys.skipped)
    rejected(make_token(alg="HS256", kid="hmac-1", key=secret), keys=keys)


# -- signatures -------------------------------------------------------------------


def test_es256_signature_in_der_form() -> None:
    data_token = make_token(alg="ES256")
    signing_input = data_token.rsplit(".", 1)[0].encode()
    der = EC_KEY.sign(signing_input, ec.ECDSA(hashes.SHA256()))
    token = make_token(alg="ES256", signature=der)
    assert len(der) != 64
    rejected(token)


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize(
    "change",
    [
        lambda s: s[:-1],
        lambda s: s + b"\x00",
        lambda s: b"\x00" + s,
        lambda s: s[: len(s) // 2],
        lambda s: s[:-1] + bytes([s[-1] ^ 1]),
        lambda s: bytes([s[0] ^ 0x80]) + s[1:],
        lambda s: b"\x00" * len(s),
        lambda s: b"\xff" * len(s),
        lambda s: s + s,
    ],
    ids=[
        "truncated",
        "extended",
        "prefixed",
        "half",
        "last-bit",
        "first-bit",
        "zeros",
        "ones",
        "doubled",
    ],
)
def test_altered_signature(alg: str, change: Callable[[bytes], bytes]) -> None:
    token = make_token(alg=alg)
    head, payload, signature = token.split(".")
    altered = change(b64url_decode(signature))
    rejected(f"{head}.{payload}.{b64(altered)}")


@pytest.mark.parametrize("alg", ALGS)
def test_payload_changed_after_signing(alg: str) -> None:
    token = make_token(alg=alg)
    head, _, signature = token.split(".")
    forged = b64(json.dumps(claims(sub="user:mallory")))
    rejected(f"{head}.{forged}.{signature}")


@pytest.mark.parametrize("alg", ALGS)
def test_header_changed_after_signing(alg: str) -> None:
    token = make_token(alg=alg)
    _, payload, signature = token.split(".")
    head = b64(json.dumps({"alg": alg, "kid": KIDS[alg]}))  # same meaning, other bytes
    rejected(f"{head}.{payload}.{signature}")


def test_signed_by_an_attacker_key_with_a_real_kid() -> None:
    rejected(make_token(key=ATTACKER_RSA))
    rejected(make_token(alg="ES256", key=ATTACKER_EC))


def test_es256_zero_and_out_of_range_scalars() -> None:
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    token = make_token(alg="ES256")
    r_s = b64url_decode(token.split(".")[2])
    r, s = int.from_bytes(r_s[:32], "big"), int.from_bytes(r_s[32:], "big")
    for bad in [(0, s), (r, 0), (r + order, s), (r, s + order)]:
        if max(bad) >= 2**256:
            continue
        sig = bad[0].to_bytes(32, "big") + bad[1].to_bytes(32, "big")
        rejected(make_token(alg="ES256", signature=sig))


def test_ecdsa_malleated_signature_is_a_different_credential() -> None:
    """ECDSA (r, n - s) is valid too; it is accepted (identity providers do
    not normalise s), but it is another string, so another credential hash."""
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    token = make_token(alg="ES256")
    head, payload, signature = token.split(".")
    raw = b64url_decode(signature)
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    twin = f"{head}.{payload}.{b64(r.to_bytes(32, 'big') + (order - s).to_bytes(32, 'big'))}"
    assert verify(twin).token_hash != verify(token).token_hash


# -- key ids and header members -------------------------------------------------


def test_unknown_kid() -> None:
    assert "not in the provider's key set" in rejected(make_token(kid="rsa-2"))


@pytest.mark.parametrize("kid", [None, "", 7, ["rsa-1"], {"kid": "rsa-1"}, True, "k" * 257])
def test_kid_missing_or_not_a_string(kid: Any) -> None:
    header: dict[str, Any] = {"alg": "RS256"}
    if kid is not None:
        header["kid"] = kid
    rejected(make_token(header=header))


@pytest.mark.parametrize(
    "member",
    [
        {"jwk": "attacker"},
        {"jku": "https://attacker.example/jwks.json"},
        {"x5u": "https://attacker.example/cert.pem"},
        {"x5c": ["MIIB..."]},
        {"crit": ["exp"]},
        {"crit": []},
        {"b64": False},
        {"enc": "A256GCM"},
        {"zip": "DEF"},
    ],
    ids=lambda m: next(iter(m)),
)
def test_forbidden_header_members_even_with_a_genuine_signature(member: dict[str, Any]) -> None:
    if "jwk" in member:
        member = {"jwk": jwk_of(RSA_KEY, "rsa-1")}
    token = make_token(header={"alg": "RS256", "kid": "rsa-1", **member})
    assert "not accepted" in rejected(token)


def test_embedded_attacker_jwk_signed_by_the_attacker() -> None:
    header = {"alg": "RS256", "kid": "attacker", "jwk": jwk_of(ATTACKER_RSA, "attacker")}
    rejected(make_token(header=header, key=ATTACKER_RSA))
    header["kid"] = "rsa-1"
    rejected(make_token(header=header, key=ATTACKER_RSA))


def test_unknown_harmless_header_members_are_ignored() -> None:
    header = {"alg": "RS256", "kid": "rsa-1", "typ": "at+jwt", "x5t": "abc", "cty": "JSON"}
    assert verify(make_token(header=header)).subject == SUBJECT


# -- strict JSON ----------------------------------------------------------------


def test_duplicate_sub_in_the_payload() -> None:
    payload = json.dumps(claims())[:-1] + ', "sub": "user:mallory"}'
    assert "duplicate member" in rejected(make_token(payload_json=payload))


def test_duplicate_with_equal_values_is_still_a_duplicate() -> None:
    payload = json.dumps(claims())[:-1] + f', "sub": "{SUBJECT}"}}'
    rejected(make_token(payload_json=payload))


@pytest.mark.parametrize(
    "header",
    [
        '{"alg":"none","alg":"RS256","kid":"rsa-1"}',
        '{"alg":"RS256","alg":"none","kid":"rsa-1"}',
        '{"alg":"RS256","kid":"ec-1","kid":"rsa-1"}',
    ],
)
def test_duplicate_alg_or_kid_in_the_header(header: str) -> None:
    assert "duplicate member" in rejected(make_token(header_json=header))


def test_duplicate_member_in_a_nested_object() -> None:
    payload = json.dumps(claims())[:-1] + ', "cnf": {"jkt": "a", "jkt": "b"}}'
    rejected(make_token(payload_json=payload))


@pytest.mark.parametrize(
    "payload",
    [
        '["sub"]',
        '"user:alice"',
        "42",
        "null",
        "true",
        '""',
        "",
        " ",
        "{",
        '{"sub":"a"} {}',
        "eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
    ],
)
def test_payload_not_a_json_object(payload: str) -> None:
    rejected(make_token(payload_json=payload))


@pytest.mark.parametrize("header", ['["RS256"]', '"RS256"', "null", "{", "", '{"alg":"RS256"'])
def test_header_not_a_json_object(header: str) -> None:
    rejected(make_token(header_json=header))


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe{}",
        b'{"sub":"\xc3"}',
        b"\xef\xbb\xbf" + json.dumps(claims()).encode(),  # UTF-8 BOM
        json.dumps(claims()).encode("utf-16"),
    ],
    ids=["garbage", "truncated-utf8", "bom", "utf16"],
)
def test_payload_not_utf8_json(raw: bytes) -> None:
    rejected(make_token(payload_bytes=raw))


def test_deeply_nested_payload() -> None:
    payload = json.dumps(claims())[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}"
    rejected(make_token(payload_json=payload))


# -- the compact form -------------------------------------------------------------


@pytest.mark.parametrize("segment", [0, 1, 2])
@pytest.mark.parametrize("pad", ["=", "==", "%3D"])
def test_padding_in_a_segment(segment: int, pad: str) -> None:
    parts = make_token().split(".")
    parts[segment] += pad
    rejected(".".join(parts))


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t + ".",
        lambda t: t + ".e30",
        lambda t: t + ".." + t,
        lambda t: t.rsplit(".", 1)[0],
        lambda t: t.replace(".", "", 1),
        lambda t: "." + t,
        lambda t: "..",
        lambda t: "",
        lambda t: t + "\n",
        lambda t: " " + t,
        lambda t: "Bearer " + t,
        lambda t: t.replace("-", "+").replace("_", "/") if ("-" in t or "_" in t) else t + "+",
        lambda t: t[:10] + "\u0430" + t[11:],
        lambda t: t[:10] + "\x00" + t[10:],
    ],
    ids=[
        "4-segments",
        "4-segments-e30",
        "6-segments",
        "2-segments",
        "merged",
        "leading-dot",
        "dots",
        "empty",
        "newline",
        "space",
        "bearer",
        "std-alphabet",
        "non-ascii",
        "nul",
    ],
)
def test_not_three_canonical_segments(change: Callable[[str], str]) -> None:
    rejected(change(make_token()))


def test_jwe_shaped_token() -> None:
    parts = make_token().split(".")
    rejected(".".join([parts[0], "", parts[1], parts[1], parts[2]]))


def test_non_zero_trailing_bits_in_a_segment() -> None:
    """Two encodings of one signature would make two credential hashes."""
    head, payload, signature = make_token().split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    assert len(signature) % 4 != 0  # a 256-byte RSA signature ends mid-quantum
    twin = signature[:-1] + alphabet[alphabet.index(signature[-1]) ^ 1]
    rejected(f"{head}.{payload}.{twin}")


def test_huge_token_is_refused_before_any_key_lookup() -> None:
    token = make_token(claims(padding="x" * MAX_TOKEN_BYTES))
    assert len(token) > MAX_TOKEN_BYTES
    lookups: list[str] = []

    def key_for(kid: str) -> JwtKey:
        lookups.append(kid)
        return KEYSET.key(kid)

    expect_rejected(
        lambda: verify_jwt(token, key_for, issuer=ISSUER, audience=AUDIENCE, now=NOW),
        token,
    )
    assert lookups == []


def test_token_just_under_the_size_limit_verifies() -> None:
    base = len(make_token(claims(padding="")))
    # base64 grows 4/3: fill until the token is within a few characters of the limit.
    fill = (MAX_TOKEN_BYTES - base) * 3 // 4 - 3
    token = make_token(claims(padding="x" * fill))
    assert MAX_TOKEN_BYTES - 8 <= len(token) <= MAX_TOKEN_BYTES
    assert verify(token).subject == SUBJECT


def test_not_a_string() -> None:
    token = make_token()
    with pytest.raises(Exception) as info:
        verify(token.encode())  # type: ignore[arg-type]
    assert getattr(info.value, "reason", None) is R.INVALID_TOKEN


# -- time claims --------------------------------------------------------------------


@pytest.mark.parametrize(
    "exp_json",
    [
        '"1767226200"',
        "true",
        "false",
        "null",
        "NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        "-1",
        "[1767226200]",
        '{"t":1767226200}',
        str(2**40),
        "1" + "0" * 400,
    ],
)
def test_exp_of_the_wrong_type_or_range(exp_json: str) -> None:
    base = json.dumps(claims(exp=None))
    payload = base[:-1] + f', "exp": {exp_json}}}'
    token = make_token(payload_json=payload)
    rejected(token)


def test_exp_missing() -> None:
    assert "'exp'" in rejected(make_token(claims(exp=None)))


@pytest.mark.parametrize("name", ["nbf", "iat"])
@pytest.mark.parametrize("value_json", ['"0"', "true", "NaN", "1e400", "null", "-5"])
def test_nbf_and_iat_of_the_wrong_type(name: str, value_json: str) -> None:
    payload = json.dumps(claims(**{name: None}))[:-1] + f', "{name}": {value_json}}}'
    rejected(make_token(payload_json=payload))


def test_expiry_with_leeway_boundaries() -> None:
    token = make_token(claims(exp=NOW - 30))
    assert verify(token, leeway=60).subject == SUBJECT  # inside the leeway
    rejected(token, R.EXPIRED, leeway=0)
    rejected(token, R.EXPIRED, leeway=30)  # now == exp + leeway: expired
    assert verify(token, leeway=31).subject == SUBJECT
    rejected(make_token(claims(exp=NOW - 3600, nbf=NOW - 7200, iat=NOW - 7200)), R.EXPIRED)


def test_float_exp_accepted() -> None:
    assert verify(make_token(claims(exp=NOW + 600.5))).expires_at == NOW + 600.5


def test_nbf_in_the_future() -> None:
    token = make_token(claims(nbf=NOW + 61))
    rejected(token, R.NOT_YET_VALID)
    assert verify(token, leeway=61).subject == SUBJECT
    assert verify(make_token(claims(nbf=NOW + 59))).subject == SUBJECT
    rejected(make_token(claims(nbf=NOW + 1, iat=None)), R.NOT_YET_VALID, leeway=0)


def test_iat_in_the_future() -> None:
    rejected(make_token(claims(iat=NOW + 3600, nbf=None)), R.NOT_YET_VALID)
    assert verify(make_token(claims(iat=NOW + 30, nbf=None))).subject == SUBJECT


def test_time_reason_only_for_a_well_formed_token() -> None:
    """An expired token with a bad audience is invalid_token, not expired."""
    rejected(make_token(claims(exp=NOW - 3600, aud="other")), R.INVALID_TOKEN)
    rejected(make_token(claims(exp=NOW - 3600), key=ATTACKER_RSA), R.INVALID_TOKEN)


@pytest.mark.parametrize(
    "leeway", [MAX_LEEWAY + 1, 301.0, 10**9, -1, -0.5, math.nan, math.inf, True, "60", None]
)
def test_leeway_out_of_bounds_is_a_configuration_error(leeway: Any) -> None:
    """Refused before the token is even looked at (a garbage token is used)."""
    with pytest.raises(ValueError, match="leeway"):
        verify("garbage", leeway=leeway)


def test_leeway_at_the_bounds() -> None:
    token = make_token(claims(exp=NOW - MAX_LEEWAY + 1))
    assert verify(token, leeway=MAX_LEEWAY).subject == SUBJECT
    assert verify(make_token(), leeway=0).subject == SUBJECT


@pytest.mark.parametrize(
    "kw", [{"issuer": ""}, {"audience": ""}, {"now": math.nan}, {"now": math.inf}]
)
def test_bad_expectations_are_configuration_errors(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        verify(make_token(), **kw)


# -- issuer, audience, subject --------------------------------------------------------


@pytest.mark.parametrize(
    "iss",
    [
        "https://idp.example.org",
        "https://idp.example.com/",
        "HTTPS://IDP.EXAMPLE.COM",
        "https://idp.example.com.attacker.example",
        "https://idp.ex\u0430mple.com",  # Cyrillic a
        "https://idp.example.com\u200b",  # zero-width space
        "https://idp.example.com\u0000",
        "\ufeffhttps://idp.example.com",
        "https://\uff49dp.example.com",  # fullwidth i (NFKC folds it to i)
        "https://idp.example.com ",
        " https://idp.example.com",
    ],
)
def test_issuer_mismatch_and_unicode_tricks(iss: str) -> None:
    assert "issued by" in rejected(make_token(claims(iss=iss)))


def test_issuer_compared_without_normalisation() -> None:
    composed = "https://idp.caf\u00e9.example"
    decomposed = "https://idp.cafe\u0301.example"
    token = make_token(claims(iss=decomposed))
    rejected(token, issuer=composed)
    assert verify(make_token(claims(iss=composed)), issuer=composed).issuer == composed


def test_issuer_json_escapes_decode_to_the_same_issuer() -> None:
    payload = json.dumps(claims(), ensure_ascii=True).replace("https", "\\u0068ttps", 1)
    assert verify(make_token(payload_json=payload)).issuer == ISSUER


@pytest.mark.parametrize("iss", [None, ["https://idp.example.com"], 1, {"iss": ISSUER}])
def test_issuer_missing_or_not_a_string(iss: Any) -> None:
    if iss is None:
        rejected(make_token(claims(iss=None)))
    else:
        rejected(make_token(claims(iss=iss)))


@pytest.mark.parametrize(
    "aud",
    [
        "https://api.example.org",
        "https://api.example.com/",
        "https://api.example.com.attacker.example",
        "https://api.example",
        ["https://other.example", "https://api.example.com/"],
        [],
        [AUDIENCE, 7],
        [[AUDIENCE]],
        {"aud": AUDIENCE},
        7,
        "",
    ],
)
def test_audience_mismatch(aud: Any) -> None:
    rejected(make_token(claims(aud=aud)))


def test_audience_missing() -> None:
    rejected(make_token(claims(aud=None)))


def test_audience_list_with_ours() -> None:
    verified = verify(make_token(claims(aud=["https://other.example", AUDIENCE])))
    assert verified.audience == ("https://other.example", AUDIENCE)


@pytest.mark.parametrize(
    "sub", ["", 7, ["user:alice"], "user:\nalice", "user:\u2028x", "a" * 1025, True]
)
def test_subject_empty_or_malformed(sub: Any) -> None:
    rejected(make_token(claims(sub=sub)))


def test_subject_missing() -> None:
    rejected(make_token(claims(sub=None)))


def test_lone_surrogate_in_subject() -> None:
    payload = json.dumps(claims(sub="user:\ud800"))
    assert "\\ud800" in payload
    rejected(make_token(payload_json=payload))


# -- acr, amr, scope ------------------------------------------------------------------


def test_acr_and_amr_absent() -> None:
    verified = verify(make_token())
    assert verified.acr is None
    assert verified.amr is None


@pytest.mark.parametrize(
    "change",
    [
        {"acr": 1},
        {"acr": ""},
        {"acr": ["a"]},
        {"amr": "pwd"},
        {"amr": ["pwd", 1]},
        {"amr": [""]},
        {"amr": ["x" * 65]},
        {"amr": ["pwd"] * 17},
        {"amr": ["pw\nd"]},
    ],
)
def test_acr_amr_malformed(change: dict[str, Any]) -> None:
    rejected(make_token(claims(**change)))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"scope": "a b  c"}, {"a", "b", "c"}),
        ({"scope": None, "scp": ["a", "b"]}, {"a", "b"}),
        ({"scope": None, "scp": "a b"}, {"a", "b"}),
        ({"scope": "a b", "scp": ["b", "a"]}, {"a", "b"}),
        ({"scope": None}, set()),
        ({"scope": ""}, set()),
    ],
)
def test_scope_forms(change: dict[str, Any], expected: set[str]) -> None:
    assert verify(make_token(claims(**change))).scope == frozenset(expected)


@pytest.mark.parametrize(
    "change",
    [
        {"scope": 7},
        {"scope": ["a"]},  # scope is a string (RFC 9068); only scp may be a list
        {"scope": None, "scp": {"a": 1}},
        {"scope": "a b", "scp": ["a"]},  # both present, different
        {"scope": None, "scp": ["a", ""]},
        {"scope": None, "scp": ["a b"]},
        {"scope": None, "scp": [1]},
        {"scope": "a\tb"},
        {"scope": "x" * 257},
        {"scope": " ".join(f"s{i}" for i in range(1025))},
    ],
)
def test_scope_malformed(change: dict[str, Any]) -> None:
    rejected(make_token(claims(**change)))


# The edge puts these claims in an origin ring: the verifier's limits must be
# the wire format's (version 2), or the edge would mint rings that every
# consumer refuses as malformed (or refuse tokens a ring can carry). The
# issuer is not here: it must equal the operator's configured value.
CLAIM_LIMITS = [
    ("sub", "s" * 1024, True),
    ("sub", "s" * 1025, False),
    ("acr", "a" * 1024, True),
    ("acr", "a" * 1025, False),
    ("amr", ["m" * 64] * 16, True),
    ("amr", ["m" * 65], False),
    ("amr", ["m"] * 17, False),
    ("scope", "x" * 256, True),
    ("scope", "x" * 257, False),
]


@pytest.mark.parametrize(("claim", "value", "fits"), CLAIM_LIMITS)
def test_claim_limits_are_the_origin_ring_limits(claim: str, value: Any, fits: bool) -> None:
    from chainkit import build_story, ring_parts

    from trusthop.canonical import pack
    from trusthop.errors import TrustError
    from trusthop.rings import K_ACR, K_AMR, K_SCOPE, K_SUBJECT, decode_origin

    payload = claims(**{claim: value})
    try:
        verify(make_token(payload))
        accepted = True
    except TrustError:
        accepted = False
    assert accepted is fits
    ring_key = {"sub": K_SUBJECT, "acr": K_ACR, "amr": K_AMR, "scope": K_SCOPE}
    signature, body = ring_parts(build_story().encoded)[0]
    body[ring_key[claim]] = [value] if claim == "scope" else value
    try:
        decode_origin(signature + pack(body))
        decoded = True
    except TrustError as error:
        assert error.reason is R.MALFORMED
        decoded = False
    assert decoded is fits


# -- the key set ---------------------------------------------------------------------


def test_rsa_1024_key_is_not_a_key() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    keys = JwksKeySet.parse(jwks_document(jwk_of(weak, "weak-1", alg="RS256")))
    assert "weak-1" not in keys
    assert any("weak-1" in why and "1024" in why for why in keys.skipped)
    rejected(make_token(kid="weak-1", key=weak), keys=keys)
    with pytest.raises(ValueError, match="1024"):
        JwtKey("weak-1", "RS256", weak.public_key())


@pytest.mark.parametrize(
    "entry",
    [
        jwk_of(RSA_KEY, "x", use="enc"),
        jwk_of(RSA_KEY, "x", key_ops=["encrypt"]),
        jwk_of(RSA_KEY, "x", key_ops="verify"),
        jwk_of(RSA_KEY, "x", d="AQAB"),
        jwk_of(EC_KEY, "x", d="AQAB"),
        jwk_of(ec.generate_private_key(ec.SECP384R1()), "x") | {"crv": "P-384"},
        jwk_of(EC_KEY, "x", crv="secp256k1"),
        {
            "kty": "OKP",
            "crv": "Ed448",
            "kid": "x",
            "x": b64(
                Ed448PrivateKey.generate()
                .public_key()
                .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            ),
        },
        {"kty": "OKP", "crv": "Ed25519", "kid": "x", "x": b64(b"\x00" * 32)},  # small order
        {"kty": "OKP", "crv": "Ed25519", "kid": "x", "x": b64(b"\x01" + b"\x00" * 31)},
        jwk_of(EC_KEY, "x") | {"y": b64(b"\x01" * 32)},  # not on the curve
        jwk_of(EC_KEY, "x") | {"x": b64(b"\x01" * 31)},
        jwk_of(RSA_KEY, "x") | {"e": b64(b"\x01\x00\x00")},  # even exponent
        jwk_of(RSA_KEY, "x") | {"e": b64(b"\x01")},
        jwk_of(RSA_KEY, "x") | {"e": b64(b"\xff" * 9)},
        jwk_of(RSA_KEY, "x") | {"n": jwk_of(RSA_KEY, "x")["n"] + "=="},
        jwk_of(RSA_KEY, "x") | {"n": 7},
        {k: v for k, v in jwk_of(RSA_KEY, "x").items() if k != "n"},
        {"kty": "RSA", "kid": "x", "x5c": ["MIIB"]},
        jwk_of(RSA_KEY, "x") | {"kty": "rsa"},
        {"kty": "oct", "kid": "x", "k": b64(b"secret")},
        jwk_of(RSA_KEY, "x") | {"kid": ""},
        jwk_of(RSA_KEY, "x") | {"kid": 5},
    ],
)
def test_unusable_jwks_entries_are_skipped(entry: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        key_from_jwk(entry)
    keys = JwksKeySet.parse(jwks_document(entry))
    assert set(keys.keys) == set(KIDS.values())
    assert len(keys.skipped) == 1


@pytest.mark.parametrize(
    "document",
    [
        [],
        "keys",
        {},
        {"keys": {}},
        {"keys": "x"},
        {"keys": []},
        {"keys": [jwk_of(RSA_KEY, "x"), 1]},
        {"keys": [jwk_of(RSA_KEY, "dup"), jwk_of(EC_KEY, "dup")]},
        {"keys": [jwk_of(RSA_KEY, "dup"), {"kty": "oct", "kid": "dup", "k": "c2VjcmV0"}]},
        {"keys": [{"kty": "oct", "kid": "x", "k": "c2VjcmV0"}]},
        {"keys": [jwk_of(RSA_KEY, f"k{i}") for i in range(257)]},
    ],
    ids=[
        "list",
        "str",
        "empty",
        "keys-object",
        "keys-str",
        "no-keys",
        "non-object-entry",
        "dup-kid",
        "dup-kid-one-unusable",
        "nothing-usable",
        "too-many",
    ],
)
def test_unusable_jwks_documents(document: Any) -> None:
    with pytest.raises(JwksError):
        JwksKeySet.parse(document)


def test_duplicate_kids_via_of() -> None:
    key = JwtKey.of("a", RSA_KEY.public_key())
    with pytest.raises(JwksError):
        JwksKeySet.of([key, key])
    assert JwksKeySet.of([key]).key("a") is key


def test_jwt_key_refuses_wrong_pairings() -> None:
    with pytest.raises(ValueError):
        JwtKey("a", "RS256", EC_KEY.public_key())
    with pytest.raises(ValueError):
        JwtKey("a", "ES256", ec.generate_private_key(ec.SECP384R1()).public_key())
    with pytest.raises(ValueError):
        JwtKey("a", "EdDSA", RSA_KEY.public_key())
    with pytest.raises(ValueError):
        JwtKey("a", "HS256", RSA_KEY.public_key())
    with pytest.raises(ValueError):
        JwtKey("", "RS256", RSA_KEY.public_key())
    assert JwtKey.of("e", ED_KEY.public_key()).alg == "EdDSA"
    assert JwtKey.of("c", EC_KEY.public_key()).alg == "ES256"


def test_jwt_key_verify_never_raises() -> None:
    key = KEYSET.key("ec-1")
    r, s = decode_dss_signature(EC_KEY.sign(b"m", ec.ECDSA(hashes.SHA256())))
    good = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert key.verify(good, b"m")
    for bad in (b"", good[:63], good + b"\0", b"\xff" * 64, b"\0" * 64):
        assert key.verify(bad, b"m") is False
    assert KEYSET.key("rsa-1").verify(sign("RS256", RSA_KEY, b"m"), b"m")
    assert KEYSET.key("rsa-1").verify(b"\xff" * 256, b"m") is False


def test_es256_zero_byte_inserted_into_s_is_rejected() -> None:
    """``r || 0x00 || s`` has the same integer value for s: only the exact
    64-byte length stops this second encoding of one signature."""
    token = make_token(alg="ES256")
    head, payload, signature = token.split(".")
    raw = b64url_decode(signature)
    zero = bytes(1)
    for variant in (raw[:32] + zero + raw[32:], zero + raw, raw + zero):
        rejected(f"{head}.{payload}.{b64(variant)}")
