"""From a user's token to an origin ring: the edge's one trust decision.

:func:`origin_from_token` verifies the token against the identity
provider's key set (:mod:`trusthop.edge.jwt`, :mod:`trusthop.edge.jwks`) and
mints the origin ring with :func:`trusthop.sign.mint_origin`:

* ``subject`` and ``issuer`` are the token's ``sub`` and ``iss``;
* ``credential_hash`` is the SHA-256 of the token
  (:func:`trusthop.sign.hash_credential`); the token itself is never put in
  the ring, so it never crosses a broker;
* ``acr`` and ``amr`` are carried when the token has them;
* ``transaction_id`` is the caller's, or a fresh UUID4;
* the granted scope is the token's scope intersected with
  ``requested_scope`` (the token's whole scope when ``None``). An empty
  grant is refused with ``insufficient_scope`` (the RFC 6750 error code for
  the same situation) unless ``allow_empty_scope=True``: a ring that grants
  nothing is almost always a misconfigured edge or a token meant for
  another API, better refused at the door than deep in a pipeline;
* the ring's window starts now and ends ``ttl`` seconds later or at the
  token's ``exp`` (rounded down), whichever comes first: an origin never
  outlives its token. A token accepted only thanks to the clock-skew leeway
  (less than one second left) therefore gives ``expired``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from trusthop.chain import OriginRing
from trusthop.edge.jwks import JwksClient, JwksKeySet
from trusthop.edge.jwt import (
    DEFAULT_LEEWAY,
    VerifiedToken,
    check_expectations,
    parse_jws,
    verify_parts,
)
from trusthop.errors import Reason, TrustError
from trusthop.rings import MAX_SCOPE_ENTRIES
from trusthop.sign import DEFAULT_ORIGIN_TTL, Identity, hash_credential, mint_origin


def _requested(requested_scope: Iterable[str] | None) -> frozenset[str] | None:
    if requested_scope is None:
        return None
    if isinstance(requested_scope, str):
        raise TypeError("requested_scope is a collection of strings, not one string")
    out = frozenset(requested_scope)
    if not all(isinstance(s, str) and s for s in out):
        raise ValueError("requested_scope must hold non-empty strings")
    return out


def _check_args(
    issuer: str,
    audience: str,
    now: float,
    leeway: float,
    ttl: int,
    requested_scope: Iterable[str] | None,
) -> frozenset[str] | None:
    check_expectations(issuer, audience, now, leeway)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
        raise ValueError("ttl must be a positive number of seconds (an int)")
    return _requested(requested_scope)


def origin_from_verified(
    verified: VerifiedToken,
    token: str,
    *,
    identity: Identity,
    now: float,
    requested_scope: Iterable[str] | None = None,
    transaction_id: str | None = None,
    ttl: int = DEFAULT_ORIGIN_TTL,
    allow_empty_scope: bool = False,
) -> OriginRing:
    """Mint the origin ring for a token :mod:`~trusthop.edge.jwt` verified.

    ``token`` must be the string ``verified`` came from (it is hashed, not
    kept). Callers normally use :func:`origin_from_token`.

    Raises:
        ValueError: ``token`` is not the verified token; the grant holds more
            than 64 scopes (pass ``requested_scope``).
        TrustError: ``insufficient_scope`` for an empty grant (unless
            allowed), ``expired`` when the token has less than a second left,
            ``malformed`` when a value cannot be put in a ring (see
            :func:`trusthop.chain.check_ring_fields`).
    """
    if hash_credential(token) != verified.token_hash:
        raise ValueError("token is not the token that was verified")
    requested_scope = _requested(requested_scope)
    granted = verified.scope if requested_scope is None else verified.scope & requested_scope
    if not granted and not allow_empty_scope:
        wanted = "any scope" if requested_scope is None else f"any of {sorted(requested_scope)}"
        raise TrustError(Reason.INSUFFICIENT_SCOPE, f"the token does not grant {wanted}")
    if len(granted) > MAX_SCOPE_ENTRIES:
        raise ValueError(
            f"the token grants {len(granted)} scopes, a ring holds at most"
            f" {MAX_SCOPE_ENTRIES}: pass requested_scope"
        )
    iat = int(now)
    exp = min(iat + ttl, math.floor(verified.expires_at))
    if exp <= iat:
        raise TrustError(
            Reason.EXPIRED,
            f"the token expires at {verified.expires_at:.0f}: nothing is left to grant",
        )
    return mint_origin(
        identity,
        subject=verified.subject,
        issuer=verified.issuer,
        credential=token,
        scope=granted,
        now=now,
        ttl=exp - iat,
        transaction_id=transaction_id,
        acr=verified.acr,
        amr=verified.amr,
    )


async def origin_from_token(
    token: str,
    *,
    jwks: JwksClient,
    identity: Identity,
    issuer: str,
    audience: str,
    requested_scope: Iterable[str] | None = None,
    transaction_id: str | None = None,
    ttl: int = DEFAULT_ORIGIN_TTL,
    leeway: float = DEFAULT_LEEWAY,
    now: float | None = None,
    allow_empty_scope: bool = False,
) -> OriginRing:
    """Verify the user's ``token`` and mint the origin ring for it.

    ``token`` is the compact JWT alone (strip ``Bearer``). The key comes
    from ``jwks`` (which may fetch the provider's key set, rate-limited);
    ``now`` defaults to ``time.time()``. See the module docstring for what
    the ring holds.

    Raises:
        ValueError, TypeError: bad arguments (empty issuer or audience,
            leeway outside 0 to 300, ttl not a positive int, a string as
            ``requested_scope``), before the token is looked at.
        TrustError: ``invalid_token`` (format, algorithm, unknown key,
            signature, issuer, audience, claims; also when the provider's key
            set cannot be fetched at all), ``expired``, ``not_yet_valid``,
            ``insufficient_scope``; see :func:`origin_from_verified`.
    """
    now = time.time() if now is None else now
    requested = _check_args(issuer, audience, now, leeway, ttl, requested_scope)
    parts = parse_jws(token)
    key = await jwks.key(parts.kid)
    verified = verify_parts(parts, key, issuer=issuer, audience=audience, now=now, leeway=leeway)
    return origin_from_verified(
        verified,
        token,
        identity=identity,
        now=now,
        requested_scope=requested,
        transaction_id=transaction_id,
        ttl=ttl,
        allow_empty_scope=allow_empty_scope,
    )


def origin_from_token_sync(
    token: str,
    *,
    keys: JwksKeySet,
    identity: Identity,
    issuer: str,
    audience: str,
    requested_scope: Iterable[str] | None = None,
    transaction_id: str | None = None,
    ttl: int = DEFAULT_ORIGIN_TTL,
    leeway: float = DEFAULT_LEEWAY,
    now: float | None = None,
    allow_empty_scope: bool = False,
) -> OriginRing:
    """:func:`origin_from_token` against a key set in hand (no fetching).

    Raises:
        The same as :func:`origin_from_token`; an unknown key id is
        ``invalid_token`` at once.
    """
    now = time.time() if now is None else now
    requested = _check_args(issuer, audience, now, leeway, ttl, requested_scope)
    parts = parse_jws(token)
    verified = verify_parts(
        parts, keys.key(parts.kid), issuer=issuer, audience=audience, now=now, leeway=leeway
    )
    return origin_from_verified(
        verified,
        token,
        identity=identity,
        now=now,
        requested_scope=requested,
        transaction_id=transaction_id,
        ttl=ttl,
        allow_empty_scope=allow_empty_scope,
    )
