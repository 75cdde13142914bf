"""The edge: verify a user's JWT once and replace it with a signed origin ring.

``origin_from_token`` (async, with a :class:`JwksClient` that fetches the
identity provider's key set) and ``origin_from_token_sync`` (with a
:class:`JwksKeySet` in hand) verify the token strictly (RS256, ES256 or
EdDSA, the algorithm pinned to the provider's key; issuer, audience and time
window with bounded leeway) and mint an origin ring holding the subject,
issuer, acr/amr, the token's SHA-256, a transaction id and the granted
scope. The token never leaves the edge. Every rejection is a
:class:`~trusthop.errors.TrustError`: ``invalid_token``, ``expired``,
``not_yet_valid`` or ``insufficient_scope``.

.. code-block:: python

    jwks = JwksClient("https://idp.example.com/.well-known/jwks.json")
    origin = await origin_from_token(
        token, jwks=jwks, identity=gateway, issuer="https://idp.example.com",
        audience="https://api.example.com", requested_scope=["orders:write"],
    )
"""

from trusthop.edge.jwks import JwksClient, JwksError, JwksKeySet, key_from_jwk
from trusthop.edge.jwt import (
    ALGORITHMS,
    DEFAULT_LEEWAY,
    MAX_LEEWAY,
    MAX_TOKEN_BYTES,
    JwtKey,
    VerifiedToken,
    verify_jwt,
)
from trusthop.edge.origin import origin_from_token, origin_from_token_sync, origin_from_verified

__all__ = [
    "ALGORITHMS",
    "DEFAULT_LEEWAY",
    "MAX_LEEWAY",
    "MAX_TOKEN_BYTES",
    "JwksClient",
    "JwksError",
    "JwksKeySet",
    "JwtKey",
    "VerifiedToken",
    "key_from_jwk",
    "origin_from_token",
    "origin_from_token_sync",
    "origin_from_verified",
    "verify_jwt",
]
