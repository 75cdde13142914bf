"""The one exception type of trusthop and its stable reason codes.

Every rejection, whether it comes from decoding, verification or the
producer-side checks, is a :class:`TrustError` carrying a :class:`Reason`.
The reason code is the machine-readable contract (it is written into
dead-letter headers and JSON verdicts and never changes meaning); the
message is a human sentence for operators.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Stable, machine-readable rejection reasons.

    The string values are part of the public contract: they travel in
    dead-letter headers and CLI output, and are never renamed.
    """

    MISSING_CHAIN = "missing_chain"
    """The event carries no ``trustchain`` attribute."""
    MALFORMED = "malformed"
    """Bytes, encoding or structure do not follow the wire format."""
    TOO_LARGE = "too_large"
    """The encoded chain exceeds the configured byte budget."""
    DEPTH_EXCEEDED = "depth_exceeded"
    """The chain holds more rings than the configured maximum."""
    UNKNOWN_KEY = "unknown_key"
    """A ring names a key id that the trust bundle does not hold."""
    REVOKED = "revoked"
    """A ring was signed by a revoked key or a revoked actor."""
    BAD_SIGNATURE = "bad_signature"
    """A ring's signature does not verify under its bundled key."""
    BROKEN_LINK = "broken_link"
    """A ring does not name the hash of the ring before it."""
    EVENT_MISMATCH = "event_mismatch"
    """The newest ring's event digest does not match the delivered event."""
    WRONG_DESTINATION = "wrong_destination"
    """The newest ring names another destination than the one consumed from."""
    SCOPE_ESCALATION = "scope_escalation"
    """A ring's scope is not a subset of the previous ring's scope."""
    WINDOW_ESCALATION = "window_escalation"
    """A ring's time window is not inside the previous ring's window."""
    EXPIRED = "expired"
    """The chain's validity window ended before the time of verification."""
    NOT_YET_VALID = "not_yet_valid"
    """The chain's validity window starts after the time of verification."""
    UNAUTHORIZED_ACTOR = "unauthorized_actor"
    """An actor is not entitled to sign this ring (key bound to another
    actor, or an actor outside the chain's trust domain), or policy does not
    allow it to publish to this destination (also: no policy requirement
    covers the destination and the policy's default is deny)."""
    INSUFFICIENT_TRUST_LEVEL = "insufficient_trust_level"
    """Policy: an actor on the path holds a lower trust level than required."""
    INSUFFICIENT_SCOPE = "insufficient_scope"
    """Policy: the effective scope lacks a scope the destination requires."""
    PATH_VIOLATION = "path_violation"
    """Policy: the path does not follow the required origin and steps."""
    SEGMENT_QUARANTINED = "segment_quarantined"
    """Policy: an actor of a quarantined segment is on the path."""
    SUBJECT_DENIED = "subject_denied"
    """Policy: the destination does not accept this subject."""
    PDP_UNAVAILABLE = "pdp_unavailable"
    """Policy: the external decision point failed or timed out (fail closed)."""
    HANDLER_FAILED = "handler_failed"
    """The handler raised on every allowed attempt (not a trust failure)."""
    REPLAYED = "replayed"
    """The same signed ring arrived as another message after its allowed uses
    in this consumer group or queue (a re-published copy)."""
    BAD_CERTIFICATE = "bad_certificate"
    """A ring's X.509-SVID does not validate to its trust domain's X.509
    authorities at the ring's signing time, or is not a valid SVID."""
    INVALID_TOKEN = "invalid_token"  # noqa: S105 (a reason code, not a secret)
    """At the edge: the user's token is not a valid token of the identity
    provider (format, algorithm, key, signature, issuer or audience)."""
    STORE_UNAVAILABLE = "store_unavailable"
    """The replay store failed, or is full and refuses to forget an entry
    early (fail closed)."""


class TrustError(Exception):
    """A message or chain was rejected.

    Attributes:
        reason: the stable :class:`Reason` code.
        message: a human sentence saying what failed.
        ring: index of the offending ring, when one ring is to blame.
    """

    def __init__(self, reason: Reason, message: str, *, ring: int | None = None) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message
        self.ring = ring

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (self.reason, self.message, self.ring))


def _rebuild(reason: Reason, message: str, ring: int | None) -> TrustError:
    return TrustError(reason, message, ring=ring)
