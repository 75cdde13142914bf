"""Strict verification of a user's JWT (compact JWS) at the edge: no I/O.

Only what an edge needs, on top of ``cryptography``:

* **Format.** Exactly three non-empty segments of unpadded base64url
  (canonical: no padding, whitespace, other alphabet or non-zero trailing
  bits), at most :data:`MAX_TOKEN_BYTES` characters, checked before anything
  is decoded. Header and payload are UTF-8 JSON objects; a duplicate member
  name anywhere (``{"sub":"a","sub":"b"}``), ``NaN``/``Infinity`` and nesting
  that hits the recursion limit are rejected.
* **Algorithm.** The header's ``alg`` must be one of :data:`ALGORITHMS`
  (``RS256``, ``ES256``, ``EdDSA``) *and* equal the algorithm pinned to the
  key (:class:`JwtKey`), which comes from the identity provider's key set,
  never from the token: ``none``, ``HS256`` with a public key as the HMAC
  secret, or an ``RS256`` header against an EC key all fail.
* **Header.** ``kid`` is required. ``crit`` (no extension is understood),
  embedded or remote keys (``jwk``, ``jku``, ``x5u``, ``x5c``), ``b64``
  (RFC 7797) and JWE members (``enc``, ``zip``) are rejected. Other members
  (``typ``, ``cty``, ``x5t``...) are ignored.
* **Signature.** RS256 is RSASSA-PKCS1-v1_5/SHA-256 with a 2048 to 8192-bit
  key and a signature exactly as long as the modulus; ES256 is P-256/SHA-256
  with the JWS form ``r || s`` (64 bytes; DER is rejected); EdDSA is Ed25519
  only (64 bytes). The payload is decoded only after the signature verified.
* **Claims.** ``iss`` equal (code point for code point, no normalisation)
  to the expected issuer; ``aud`` a string or a non-empty list of strings
  containing the expected audience; ``sub`` a non-empty printable string;
  ``exp`` required, ``nbf`` and ``iat`` optional, each a JSON number (not a
  boolean), finite and in ``[0, 2**40)``; ``acr`` a string and ``amr`` a list
  of strings when present; scope from ``scope`` (a space-separated string,
  RFC 9068) and/or ``scp`` (a list or a space-separated string, as some
  providers issue it); when both are present they must name the same set.
* **Time.** With ``leeway`` seconds of clock skew (``0`` to
  :data:`MAX_LEEWAY`): ``expired`` once ``now >= exp + leeway``,
  ``not_yet_valid`` while ``now + leeway < nbf`` or ``now + leeway < iat``.

Every failure is a :class:`~trusthop.errors.TrustError`: ``invalid_token``
(format, algorithm, key, signature, issuer, audience, claim types),
``expired`` or ``not_yet_valid`` (only for a token whose signature and claim
types are valid). Messages never contain the token or any of its segments;
attacker-controlled values they quote are truncated and ``repr``-escaped.
Invalid arguments (an empty issuer, a leeway out of range) raise
:class:`ValueError` before the token is looked at.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from trusthop.canonical import EncodingError, b64url_decode
from trusthop.errors import Reason, TrustError
from trusthop.rings import MAX_TEXT

RS256: Final = "RS256"
ES256: Final = "ES256"
EDDSA: Final = "EdDSA"
ALGORITHMS: Final = frozenset({RS256, ES256, EDDSA})
"""The only accepted ``alg`` values; each is pinned to one key type."""

MAX_TOKEN_BYTES: Final = 16 * 1024
"""Longest accepted token, in characters (checked before decoding)."""
DEFAULT_LEEWAY: Final = 60
MAX_LEEWAY: Final = 300
"""Largest clock-skew leeway, in seconds, a caller may configure."""
MIN_RSA_BITS: Final = 2048
MAX_RSA_BITS: Final = 8192
MAX_KID = 256
MAX_SCOPE_TOKEN = 256
MAX_SCOPE_TOKENS = 1024
MAX_AUDIENCES = 64
MAX_AMR = 16
MAX_AMR_ENTRY = 64
_MAX_TIME = 2**40

FORBIDDEN_HEADER_MEMBERS: Final = frozenset(
    {"crit", "jwk", "jku", "x5u", "x5c", "b64", "enc", "zip"}
)
"""Header members that make a token invalid whatever their value."""

_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# Control characters, line/paragraph separators and lone surrogates: claim
# text ends up in rings, logs and terminals.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")

PublicKeyType = RSAPublicKey | ec.EllipticCurvePublicKey | Ed25519PublicKey


def _invalid(message: str) -> TrustError:
    return TrustError(Reason.INVALID_TOKEN, message)


def _show(value: object) -> str:
    """An attacker-controlled value, safe to put into a message."""
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


@dataclass(frozen=True, slots=True)
class JwtKey:
    """A verification key of the identity provider with its pinned algorithm.

    The algorithm follows from the key: RSA → ``RS256``, EC P-256 →
    ``ES256``, Ed25519 → ``EdDSA``. A token is verified only when its
    header's ``alg`` equals :attr:`alg`.

    Raises:
        ValueError: (construction) an empty or over-long ``kid``, an
            algorithm outside :data:`ALGORITHMS`, a key of another type or
            curve than the algorithm needs, or an RSA modulus outside
            2048 to 8192 bits.
    """

    kid: str
    alg: str
    public_key: PublicKeyType = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.kid, str) or not self.kid or len(self.kid) > MAX_KID:
            raise ValueError(f"a key id is a string of 1 to {MAX_KID} characters")
        if self.alg == RS256:
            if not isinstance(self.public_key, RSAPublicKey):
                raise ValueError("RS256 needs an RSA public key")
            bits = self.public_key.key_size
            if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
                raise ValueError(
                    f"an RSA key of {bits} bits is outside {MIN_RSA_BITS} to {MAX_RSA_BITS}"
                )
        elif self.alg == ES256:
            if not isinstance(self.public_key, ec.EllipticCurvePublicKey) or not isinstance(
                self.public_key.curve, ec.SECP256R1
            ):
                raise ValueError("ES256 needs an EC public key on P-256")
        elif self.alg == EDDSA:
            if not isinstance(self.public_key, Ed25519PublicKey):
                raise ValueError("EdDSA is accepted with Ed25519 keys only")
        else:
            raise ValueError(f"unsupported algorithm {_show(self.alg)}")

    @classmethod
    def of(cls, kid: str, public_key: PublicKeyType) -> JwtKey:
        """A key with the algorithm its type implies (see the class)."""
        if isinstance(public_key, RSAPublicKey):
            return cls(kid, RS256, public_key)
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            return cls(kid, ES256, public_key)
        return cls(kid, EDDSA, public_key)

    def verify(self, signature: bytes, signing_input: bytes) -> bool:
        """True when ``signature`` (JWS form) is valid for ``signing_input``.

        Never raises for a bad signature: wrong lengths, DER-encoded ECDSA
        signatures and out-of-range values are simply ``False``.
        """
        key = self.public_key
        try:
            if isinstance(key, RSAPublicKey):
                if len(signature) != (key.key_size + 7) // 8:
                    return False
                key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
            elif isinstance(key, ec.EllipticCurvePublicKey):
                if len(signature) != 64:
                    return False
                r = int.from_bytes(signature[:32], "big")
                s = int.from_bytes(signature[32:], "big")
                if not (0 < r < _P256_ORDER and 0 < s < _P256_ORDER):
                    return False
                der = encode_dss_signature(r, s)
                key.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
            else:
                if len(signature) != 64:
                    return False
                key.verify(signature, signing_input)
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True, slots=True)
class JwsParts:
    """A compact JWS split and decoded, signature not yet checked.

    Holds what verification needs and no copy of the token: the token's
    SHA-256 (:attr:`token_hash`), the header, and the signing input, payload
    and signature bytes (left out of ``repr``).
    """

    header: Mapping[str, Any]
    alg: str
    kid: str
    token_hash: bytes
    signing_input: bytes = field(repr=False)
    payload: bytes = field(repr=False)
    signature: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token whose signature, issuer, audience and time window checked out.

    ``audience`` is the token's full ``aud`` (as a tuple), ``scope`` the
    token's whole scope (empty when it has none), ``amr``/``acr`` ``None``
    when absent. ``claims`` is a read-only view of the whole payload (which
    may hold personal data: do not log it wholesale). The token itself is
    not kept, only :attr:`token_hash`, its SHA-256 (what
    :func:`trusthop.sign.hash_credential` computes).
    """

    subject: str
    issuer: str
    audience: tuple[str, ...]
    expires_at: float
    not_before: float | None
    issued_at: float | None
    acr: str | None
    amr: tuple[str, ...] | None
    scope: frozenset[str]
    kid: str
    alg: str
    token_hash: bytes
    claims: Mapping[str, Any] = field(repr=False)


def check_leeway(leeway: float) -> float:
    """``leeway`` as a float when it is a number of seconds in ``[0, MAX_LEEWAY]``.

    Raises:
        ValueError: a boolean, non-number, NaN, negative or over the maximum.
    """
    if isinstance(leeway, bool) or not isinstance(leeway, int | float):
        raise ValueError("leeway must be a number of seconds")
    if not 0 <= leeway <= MAX_LEEWAY:  # NaN fails too
        raise ValueError(f"leeway must be between 0 and {MAX_LEEWAY} seconds")
    return float(leeway)


def check_expectations(issuer: str, audience: str, now: float, leeway: float) -> float:
    """Validate the caller's side of a verification; returns the leeway.

    Raises:
        ValueError: an empty issuer or audience, a non-finite ``now``, or a
            bad leeway (:func:`check_leeway`).
    """
    if not isinstance(issuer, str) or not issuer:
        raise ValueError("the expected issuer must be a non-empty string")
    if not isinstance(audience, str) or not audience:
        raise ValueError("the expected audience must be a non-empty string")
    if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
        raise ValueError("now must be a finite number of seconds since the epoch")
    return check_leeway(leeway)


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise ValueError(f"duplicate member {_show(name)}")
        out[name] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_unique_members,
            parse_constant=_reject_constant,
        )
    except UnicodeDecodeError as exc:
        raise _invalid(f"the {what} is not UTF-8") from exc
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError messages quote positions, never content.
        detail = str(exc) if "duplicate member" in str(exc) else type(exc).__name__
        raise _invalid(f"the {what} is not strict JSON ({detail})") from exc
    if not isinstance(value, dict):
        raise _invalid(f"the {what} is not a JSON object")
    return value


def _segment(text: str, what: str) -> bytes:
    if not text:
        raise _invalid(f"the {what} segment is empty")
    try:
        return b64url_decode(text)
    except (EncodingError, UnicodeError) as exc:
        raise _invalid(f"the {what} segment is not unpadded base64url") from exc


def parse_jws(token: str, *, max_bytes: int = MAX_TOKEN_BYTES) -> JwsParts:
    """Split and decode a compact JWS and check its header; no key, no claims.

    Raises:
        TrustError(invalid_token): not a string, longer than ``max_bytes``,
            not three non-empty canonical base64url segments, a header that
            is not a strict JSON object, ``alg`` outside :data:`ALGORITHMS`,
            ``kid`` missing or not a string of 1 to 256 characters, or a
            member of :data:`FORBIDDEN_HEADER_MEMBERS`.
    """
    if not isinstance(token, str):
        raise _invalid("a token is a string")
    if len(token) > max_bytes:
        raise _invalid(f"the token is {len(token)} characters, the limit is {max_bytes}")
    parts = token.split(".")
    if len(parts) != 3:
        raise _invalid(f"a compact JWS has 3 segments, this token has {len(parts)}")
    header_b64, payload_b64, signature_b64 = parts
    header_raw = _segment(header_b64, "header")
    payload = _segment(payload_b64, "payload")
    signature = _segment(signature_b64, "signature")
    header = _json_object(header_raw, "header")
    forbidden = sorted(FORBIDDEN_HEADER_MEMBERS & header.keys())
    if forbidden:
        raise _invalid(f"header member(s) {forbidden} are not accepted")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        raise _invalid(f"algorithm {_show(alg)} is not one of {sorted(ALGORITHMS)}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > MAX_KID:
        raise _invalid(f"the header needs a 'kid' string of 1 to {MAX_KID} characters")
    return JwsParts(
        header=MappingProxyType(header),
        alg=alg,
        kid=kid,
        token_hash=hashlib.sha256(token.encode("ascii")).digest(),
        signing_input=f"{header_b64}.{payload_b64}".encode("ascii"),
        payload=payload,
        signature=signature,
    )


def _text(claims: Mapping[str, Any], name: str, limit: int = MAX_TEXT) -> str:
    value = claims[name]
    if not isinstance(value, str) or not value or len(value) > limit:
        raise _invalid(f"claim {name!r} must be a string of 1 to {limit} characters")
    if _UNPRINTABLE.search(value):
        raise _invalid(f"claim {name!r} contains control or line-separator characters")
    return value


def _time(claims: Mapping[str, Any], name: str) -> float | None:
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(f"claim {name!r} must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise _invalid(f"claim {name!r} must be finite")
    if not 0 <= value < _MAX_TIME:
        raise _invalid(f"claim {name!r} is out of range")
    return float(value)


def _audience(claims: Mapping[str, Any], expected: str) -> tuple[str, ...]:
    if "aud" not in claims:
        raise _invalid("the token has no 'aud' claim")
    value = claims["aud"]
    if isinstance(value, str):
        audience: tuple[str, ...] = (value,)
    elif (
        isinstance(value, list)
        and 0 < len(value) <= MAX_AUDIENCES
        and all(isinstance(a, str) for a in value)
    ):
        audience = tuple(value)
    else:
        raise _invalid(f"claim 'aud' must be a string or a list of 1 to {MAX_AUDIENCES} strings")
    if expected not in audience:
        raise _invalid(f"the token is not for audience {expected!r}")
    return audience


def _scope_tokens(value: Any, name: str) -> frozenset[str]:
    if isinstance(value, str):
        items = [s for s in value.split(" ") if s]
    elif name == "scp" and isinstance(value, list) and all(isinstance(s, str) and s for s in value):
        items = value
    else:
        form = "a space-separated string" + (" or a list of strings" if name == "scp" else "")
        raise _invalid(f"claim {name!r} must be {form}")
    if len(items) > MAX_SCOPE_TOKENS:
        raise _invalid(f"claim {name!r} has more than {MAX_SCOPE_TOKENS} entries")
    for item in items:
        if len(item) > MAX_SCOPE_TOKEN or _UNPRINTABLE.search(item) or " " in item:
            raise _invalid(
                f"claim {name!r}: entries are 1 to {MAX_SCOPE_TOKEN} printable characters"
                " without spaces"
            )
    return frozenset(items)


def _scope(claims: Mapping[str, Any]) -> frozenset[str]:
    scope = _scope_tokens(claims["scope"], "scope") if "scope" in claims else None
    scp = _scope_tokens(claims["scp"], "scp") if "scp" in claims else None
    if scope is not None and scp is not None and scope != scp:
        raise _invalid("claims 'scope' and 'scp' name different scopes")
    return scope if scope is not None else scp if scp is not None else frozenset()


def _amr(claims: Mapping[str, Any]) -> tuple[str, ...] | None:
    if "amr" not in claims:
        return None
    value = claims["amr"]
    if (
        not isinstance(value, list)
        or len(value) > MAX_AMR
        or not all(
            isinstance(m, str) and 0 < len(m) <= MAX_AMR_ENTRY and not _UNPRINTABLE.search(m)
            for m in value
        )
    ):
        raise _invalid(
            f"claim 'amr' must be a list of at most {MAX_AMR} printable strings"
            f" of 1 to {MAX_AMR_ENTRY} characters"
        )
    return tuple(value)


def check_claims(
    claims: Mapping[str, Any],
    *,
    issuer: str,
    audience: str,
    now: float,
    leeway: float,
) -> None:
    """The claim rules of the module docstring, for an authentic payload.

    Types and values first (``invalid_token``), the time window last
    (``expired``, ``not_yet_valid``), so a time reason always describes a
    well-formed token.
    """
    if "iss" not in claims:
        raise _invalid("the token has no 'iss' claim")
    if claims["iss"] != issuer:
        raise _invalid(f"the token was issued by {_show(claims['iss'])}, not {issuer!r}")
    _audience(claims, audience)
    if "sub" not in claims:
        raise _invalid("the token has no 'sub' claim")
    _text(claims, "sub")
    if "exp" not in claims:
        raise _invalid("the token has no 'exp' claim")
    exp = _time(claims, "exp")
    nbf = _time(claims, "nbf")
    iat = _time(claims, "iat")
    if "acr" in claims:
        _text(claims, "acr")
    _amr(claims)
    _scope(claims)
    assert exp is not None
    if now >= exp + leeway:
        raise TrustError(Reason.EXPIRED, f"the token expired at {exp:.0f} (now {now:.0f})")
    if nbf is not None and now + leeway < nbf:
        raise TrustError(
            Reason.NOT_YET_VALID, f"the token is not valid before {nbf:.0f} (now {now:.0f})"
        )
    if iat is not None and now + leeway < iat:
        raise TrustError(Reason.NOT_YET_VALID, f"the token was issued in the future, at {iat:.0f}")


def verify_parts(
    parts: JwsParts,
    key: JwtKey,
    *,
    issuer: str,
    audience: str,
    now: float,
    leeway: float = DEFAULT_LEEWAY,
) -> VerifiedToken:
    """Verify a parsed token under ``key`` (the provider's key for its ``kid``).

    Raises:
        ValueError: bad expectations (see :func:`check_expectations`).
        TrustError: ``invalid_token`` when ``key`` has another key id, the
            header's ``alg`` is not the key's, the signature does not verify,
            the payload is not a strict JSON object or a claim is missing,
            mistyped or does not match; ``expired`` or ``not_yet_valid`` for
            an authentic, well-formed token outside its window.
    """
    leeway = check_expectations(issuer, audience, now, leeway)
    if key.kid != parts.kid:
        raise _invalid(f"the key {_show(key.kid)} is not the token's key {_show(parts.kid)}")
    if parts.alg != key.alg:
        raise _invalid(
            f"algorithm {parts.alg} does not match key {_show(key.kid)}, which is {key.alg}"
        )
    if not key.verify(parts.signature, parts.signing_input):
        raise _invalid(f"the signature does not verify under key {_show(key.kid)}")
    claims = _json_object(parts.payload, "payload")
    check_claims(claims, issuer=issuer, audience=audience, now=now, leeway=leeway)
    exp = _time(claims, "exp")
    assert exp is not None
    return VerifiedToken(
        subject=claims["sub"],
        issuer=claims["iss"],
        audience=_audience(claims, audience),
        expires_at=exp,
        not_before=_time(claims, "nbf"),
        issued_at=_time(claims, "iat"),
        acr=claims.get("acr"),
        amr=_amr(claims),
        scope=_scope(claims),
        kid=parts.kid,
        alg=parts.alg,
        token_hash=parts.token_hash,
        claims=MappingProxyType(claims),
    )


def verify_jwt(
    token: str,
    key_for: Callable[[str], JwtKey],
    *,
    issuer: str,
    audience: str,
    now: float,
    leeway: float = DEFAULT_LEEWAY,
) -> VerifiedToken:
    """Parse and verify ``token``; ``key_for(kid)`` returns the provider's key.

    ``key_for`` is typically :meth:`trusthop.edge.jwks.JwksKeySet.key`; it
    must raise ``TrustError(invalid_token)`` for an unknown key id. It is
    called only for a token that passed :func:`parse_jws`.

    Raises:
        ValueError: bad expectations, before the token is looked at.
        TrustError: see :func:`parse_jws` and :func:`verify_parts`.
    """
    check_expectations(issuer, audience, now, leeway)
    parts = parse_jws(token)
    return verify_parts(
        parts, key_for(parts.kid), issuer=issuer, audience=audience, now=now, leeway=leeway
    )
