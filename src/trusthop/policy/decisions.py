"""The decision log: one JSON line per policy decision on ``trusthop.decisions``.

:class:`~trusthop.pipeline.ChainVerifier` calls :func:`log_decision` once per
message it judges with a policy or an external decision point (allow and
deny alike), at INFO level. The line is a JSON object (see
:func:`decision_record`); route the logger to a file or a collector with the
standard :mod:`logging` configuration. It never holds a credential, a
credential hash or a signature: only what the verified chain says about the
path, and the decision.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from trusthop.canonical import b64url_encode
from trusthop.errors import Reason
from trusthop.policy.evaluate import Decision
from trusthop.policy.model import Policy
from trusthop.verify import VerifiedContext

decision_log = logging.getLogger("trusthop.decisions")

PdpOutcome = Literal["allow", "deny", "unavailable"]


def decision_record(
    context: VerifiedContext,
    *,
    destination: str,
    event_type: str,
    decision: Decision | None,
    policy: Policy | None,
    policy_source: str | None,
    allowed: bool,
    reason: Reason | None,
    message: str,
    pdp: PdpOutcome | None,
) -> dict[str, Any]:
    """The JSON object of one decision line.

    Keys: ``decision`` (``allow``/``deny``), ``reason`` (code or ``None``),
    ``message``, ``transaction_id``, ``subject``, ``event_id``,
    ``chain_digest`` (base64url of the newest ring's hash), ``actors``
    (oldest first), ``destination``, ``event_type``, ``weakest_level``,
    ``matched_rules`` (each rule's name, outcome, reason and detail),
    ``policy`` (:attr:`Policy.digest`), ``policy_source`` (the file of a
    :class:`~trusthop.policy.source.PolicySource`), ``pdp`` (``None`` when
    no PDP was asked, else ``allow``/``deny``/``unavailable``). The last
    four are ``None`` when they do not apply. Pure; never raises.
    """
    return {
        "decision": "allow" if allowed else "deny",
        "reason": None if reason is None else reason.value,
        "message": message,
        "transaction_id": context.transaction_id,
        "subject": context.subject,
        "event_id": context.event_id,
        "chain_digest": b64url_encode(context.chain_digest),
        "actors": list(context.actors),
        "destination": destination,
        "event_type": event_type,
        "weakest_level": None if decision is None else decision.weakest_level,
        "matched_rules": [] if decision is None else [r.to_json() for r in decision.matched_rules],
        "policy": None if policy is None else policy.digest,
        "policy_source": policy_source,
        "pdp": pdp,
    }


def log_decision(record: dict[str, Any]) -> None:
    """Emit ``record`` as one JSON line at INFO on ``trusthop.decisions``.
    Never raises (logging swallows handler errors)."""
    if decision_log.isEnabledFor(logging.INFO):
        decision_log.info("%s", json.dumps(record, ensure_ascii=True, separators=(",", ":")))
