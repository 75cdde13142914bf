"""trusthop.errors: reason codes are a public contract."""

from __future__ import annotations

import pickle

import pytest

from trusthop.errors import Reason, TrustError

CONTRACT = {
    "MISSING_CHAIN": "missing_chain", "MALFORMED": "malformed", "TOO_LARGE": "too_large",
    "DEPTH_EXCEEDED": "depth_exceeded", "UNKNOWN_KEY": "unknown_key", "REVOKED": "revoked",
    "BAD_SIGNATURE": "bad_signature", "BROKEN_LINK": "broken_link",
    "EVENT_MISMATCH": "event_mismatch", "WRONG_DESTINATION": "wrong_destination",
    "SCOPE_ESCALATION": "scope_escalation", "WINDOW_ESCALATION": "window_escalation",
    "EXPIRED": "expired", "NOT_YET_VALID": "not_yet_valid",
    "UNAUTHORIZED_ACTOR": "unauthorized_actor", "HANDLER_FAILED": "handler_failed",
    "INSUFFICIENT_TRUST_LEVEL": "insufficient_trust_level",
    "INSUFFICIENT_SCOPE": "insufficient_scope", "PATH_VIOLATION": "path_violation",
    "SEGMENT_QUARANTINED": "segment_quarantined", "SUBJECT_DENIED": "subject_denied",
    "PDP_UNAVAILABLE": "pdp_unavailable", "REPLAYED": "replayed",
    "STORE_UNAVAILABLE": "store_unavailable", "INVALID_TOKEN": "invalid_token",
    "BAD_CERTIFICATE": "bad_certificate",
}


def test_reason_codes_never_change() -> None:
    assert {r.name: r.value for r in Reason} == CONTRACT
    assert Reason("broken_link") is Reason.BROKEN_LINK
    assert f"{Reason.EXPIRED}" == "expired"


@pytest.mark.parametrize("ring", [None, 0, 3])
def test_trust_error_carries_reason_message_and_ring(ring: int | None) -> None:
    error = TrustError(Reason.BROKEN_LINK, "ring 3 does not link", ring=ring)
    assert (error.reason, error.message, error.ring) == (Reason.BROKEN_LINK,
                                                         "ring 3 does not link", ring)
    assert str(error) == "broken_link: ring 3 does not link"
    again = pickle.loads(pickle.dumps(error))
    assert (again.reason, again.message, again.ring) == (error.reason, error.message, ring)
    assert isinstance(again, TrustError)
