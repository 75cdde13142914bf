"""An external policy decision point (PDP), consulted after the local policy.

A :data:`PolicyDecisionPoint` is any async callable taking an AuthZEN-shaped
request (a plain ``dict``, see :func:`authzen_request`) and returning a
:class:`PdpResult`. An adapter for an AuthZEN HTTP endpoint posts the
request as is and converts the response with :meth:`PdpResult.from_authzen`.

:func:`consult` is what :class:`~trusthop.pipeline.ChainVerifier` runs: it
fails closed. A deny becomes a :class:`TrustError` with the PDP's reason when
that is one of the policy reason codes, else ``unauthorized_actor``; a
timeout, an exception, or a result that is not a :class:`PdpResult` becomes
``pdp_unavailable``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from trusthop.canonical import b64url_encode
from trusthop.errors import Reason, TrustError
from trusthop.policy.evaluate import Decision
from trusthop.verify import VerifiedContext

Action = Literal["consume", "publish"]

POLICY_REASONS = frozenset(
    {
        Reason.UNAUTHORIZED_ACTOR,
        Reason.INSUFFICIENT_TRUST_LEVEL,
        Reason.INSUFFICIENT_SCOPE,
        Reason.PATH_VIOLATION,
        Reason.SEGMENT_QUARANTINED,
        Reason.SUBJECT_DENIED,
    }
)
"""The reason codes a PDP deny may carry through; any other becomes ``unauthorized_actor``."""

DEFAULT_PDP_TIMEOUT = 1.0
"""Seconds a PDP may take before the message is refused with ``pdp_unavailable``."""


@dataclass(frozen=True, slots=True)
class PdpResult:
    """A PDP's answer: ``allowed``, and on a deny an optional ``reason``.

    ``reason`` is free text; when it is one of :data:`POLICY_REASONS`'
    values (``"segment_quarantined"``...) the rejection carries that code.
    """

    allowed: bool
    reason: str | None = None

    @classmethod
    def from_authzen(cls, response: Mapping[str, Any]) -> PdpResult:
        """Convert an AuthZEN evaluation response ``{"decision": bool,
        "context": {"reason": ...}}`` (``context`` and ``reason`` optional).

        Raises:
            ValueError: ``decision`` is missing or not a boolean (inside
                :func:`consult` this fails closed as ``pdp_unavailable``).
        """
        decision = response.get("decision")
        if not isinstance(decision, bool):
            raise ValueError("an AuthZEN response needs a boolean 'decision'")
        context = response.get("context")
        reason = context.get("reason") if isinstance(context, Mapping) else None
        return cls(decision, None if reason is None else str(reason))


PolicyDecisionPoint = Callable[[dict[str, Any]], Awaitable[PdpResult]]
"""An async callable: AuthZEN-shaped request in, :class:`PdpResult` out."""


def subject_type(subject: str) -> str:
    """The AuthZEN subject type: the part before the first ``:`` of the
    subject (``user:alice`` → ``user``), or ``subject`` when there is none."""
    head, sep, _ = subject.partition(":")
    return head if sep and head else "subject"


def authzen_request(
    context: VerifiedContext,
    *,
    action: Action,
    destination: str,
    event_type: str,
    decision: Decision | None,
) -> dict[str, Any]:
    """The request sent to the PDP (JSON-serialisable, fresh on every call).

    ``subject`` is the chain's subject, ``action.name`` ``consume`` or
    ``publish``, ``resource`` the destination with the event type as a
    property, and ``context`` the verified chain: transaction id, actors
    (oldest first), effective scope (sorted), trust domain, the digest of
    the newest ring (base64url) and the local decision's JSON (``None``
    without a local policy). No credential, credential hash or token is in
    it. Pure; never raises.
    """
    return {
        "subject": {"type": subject_type(context.subject), "id": context.subject},
        "action": {"name": action},
        "resource": {
            "type": "destination",
            "id": destination,
            "properties": {"event_type": event_type},
        },
        "context": {
            "transaction_id": context.transaction_id,
            "actors": list(context.actors),
            "scope": sorted(context.scope),
            "trust_domain": context.trust_domain,
            "chain_digest": b64url_encode(context.chain_digest),
            "decision": None if decision is None else decision.to_json(),
        },
    }


def _denial(result: PdpResult) -> TrustError:
    text = (result.reason or "no reason given")[:200]
    try:
        code = Reason(text)
    except ValueError:
        code = Reason.UNAUTHORIZED_ACTOR
    if code not in POLICY_REASONS:
        code = Reason.UNAUTHORIZED_ACTOR
    return TrustError(code, f"the external decision point denied: {text}")


async def consult(
    pdp: PolicyDecisionPoint, request: dict[str, Any], *, seconds: float
) -> PdpResult:
    """Ask ``pdp`` about ``request``; return its answer only if it allows.

    Raises:
        TrustError: ``pdp_unavailable`` when the PDP takes longer than
            ``seconds``, raises any :class:`Exception`, or returns
            something other than a :class:`PdpResult` (fail closed); on a
            deny, the PDP's reason when it is one of :data:`POLICY_REASONS`,
            else ``unauthorized_actor``.
        asyncio.CancelledError: the caller was cancelled (propagated).
    """
    unavailable = Reason.PDP_UNAVAILABLE
    task = asyncio.current_task()
    try:
        async with asyncio.timeout(seconds) as deadline:
            result = await pdp(request)
    except TimeoutError:
        raise TrustError(
            unavailable, f"the external decision point did not answer within {seconds:g}s"
        ) from None
    except asyncio.CancelledError:
        if task is not None and task.cancelling():
            raise  # we are being cancelled: not the PDP's business
        raise TrustError(unavailable, "the external decision point cancelled itself") from None
    except Exception as exc:
        raise TrustError(
            unavailable,
            f"the external decision point failed: {type(exc).__name__}: {str(exc)[:200]}",
        ) from exc
    if deadline.expired():
        # A PDP that swallowed the cancellation and answered late: fail closed.
        raise TrustError(
            unavailable, f"the external decision point did not answer within {seconds:g}s"
        )
    if type(result) is not PdpResult or type(result.allowed) is not bool:
        raise TrustError(
            unavailable,
            "the external decision point must return PdpResult(allowed=<bool>), "
            f"not {type(result).__name__}",
        )
    if not result.allowed:
        raise _denial(result)
    return result
