"""Readable and JSON renderings of chains and verified contexts (no I/O)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from trusthop.canonical import b64url_encode
from trusthop.chain import Chain, HopRing, OriginRing
from trusthop.policy import Decision
from trusthop.verify import VerifiedContext


def short_name(actor: str) -> str:
    """The last path segment of a SPIFFE ID (``.../sa/inventory`` → ``inventory``)."""
    return actor.rstrip("/").rsplit("/", 1)[-1]


def _when(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ring_json(ring: OriginRing | HopRing, index: int, ring_hash: bytes) -> dict[str, Any]:
    """One ring as JSON-friendly data (hashes and signature in base64url)."""
    out: dict[str, Any] = {
        "index": index,
        "kind": "origin" if isinstance(ring, OriginRing) else "hop",
        "actor": ring.actor,
        "key_tag": None if ring.key_tag is None else f"{ring.key_tag:04x}",
        "scope": sorted(ring.scope),
        "iat": ring.iat,
        "exp": ring.exp,
        "hash": b64url_encode(ring_hash),
        "signature": b64url_encode(ring.signature),
    }
    if isinstance(ring, OriginRing):
        out |= {
            "subject": ring.subject,
            "issuer": ring.issuer,
            "credential_hash": b64url_encode(ring.credential_hash),
            "transaction_id": ring.transaction_id,
            "trust_domain": ring.trust_domain,
        }
        if ring.acr is not None:
            out["acr"] = ring.acr
        if ring.amr is not None:
            out["amr"] = list(ring.amr)
    else:
        out |= {
            "event_digest": b64url_encode(ring.event_digest),
            "destination": ring.destination,
        }
        if ring.consumed_event_id is not None:
            out["consumed_event_id"] = ring.consumed_event_id
        if ring.peer is not None:
            out["peer"] = ring.peer
    if ring.x5c is not None:
        out["x5c"] = [_certificate_json(der) for der in ring.x5c]
    return out


def _certificate_json(der: bytes) -> dict[str, Any]:
    """What ``inspect`` shows of one certificate (unverified: it may not parse)."""
    out: dict[str, Any] = {"sha256": hashlib.sha256(der).hexdigest(), "bytes": len(der)}
    try:
        cert = x509.load_der_x509_certificate(der)
        uris = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier)
        out |= {
            "uri_san": [_safe(u) for u in uris],
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
        }
    except Exception:
        out["unparsable"] = True
    return out


def _safe(text: str) -> str:
    """Printable ASCII only: a certificate's text must not forge output lines."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:300]


def chain_json(chain: Chain) -> list[dict[str, Any]]:
    return [
        ring_json(r, i, h) for i, (r, h) in enumerate(zip(chain.rings, chain.hashes(), strict=True))
    ]


def chain_path(chain: Chain) -> str:
    """``gateway[origin user:alice] → gateway ⇒ kafka:orders → inventory ⇒ ...``."""
    origin = chain.origin
    parts = [f"{short_name(origin.actor)}[origin {origin.subject}]"]
    parts += [f"{short_name(h.actor)} ⇒ {h.destination}" for h in chain.hops]
    return " → ".join(parts)


def chain_text(chain: Chain) -> str:
    """A multi-line human description of every ring."""
    lines = []
    for ring in chain_json(chain):
        head = f"ring {ring['index']} {ring['kind']:6} {ring['actor']}"
        window = f"{_when(ring['iat'])} .. {_when(ring['exp'])}"
        lines.append(head)
        if ring["kind"] == "origin":
            lines.append(f"    subject {ring['subject']}  issuer {ring['issuer']}")
            lines.append(f"    transaction {ring['transaction_id']}")
        else:
            lines.append(f"    published to {ring['destination']}")
            if "consumed_event_id" in ring:
                lines.append(f"    derived from event {ring['consumed_event_id']}")
        lines.append(f"    scope {' '.join(ring['scope']) or '(none)'}")
        key = f"key tag {ring['key_tag']}" if ring["key_tag"] is not None else "x5c key"
        lines.append(f"    valid {window}  {key}")
        for cert in ring.get("x5c", ()):
            san = ", ".join(cert.get("uri_san", [])) or "(unparsable)"
            lines.append(f"    x5c {san}  sha256 {cert['sha256'][:16]}…")
    return "\n".join(lines)


def context_json(context: VerifiedContext) -> dict[str, Any]:
    """The verified context as JSON-friendly data."""
    return {
        "subject": context.subject,
        "issuer": context.issuer,
        "transaction_id": context.transaction_id,
        "trust_domain": context.trust_domain,
        "scope": sorted(context.scope),
        "actors": list(context.actors),
        "destination": context.destination,
        "expires_at": context.expires_at,
        "event_id": context.event_id,
        "chain_digest": b64url_encode(context.chain_digest),
    }


def decision_text(decision: Decision) -> str:
    """A multi-line human explanation of a policy decision, rule by rule."""
    verdict = "ALLOWED" if decision.allowed else f"DENIED {decision.reason}"
    lines = [f"{verdict}: {decision.message}", "actors:"]
    width = max(len(a.level) for a in decision.actor_levels)
    for actor in decision.actor_levels:
        rule = actor.rule or "no member rule matches"
        lines.append(f"  ring {actor.ring}  {actor.level:{width}}  {actor.actor}  ({rule})")
    lines.append(f"weakest level: {decision.weakest_level}")
    lines.append("rules:")
    for result in decision.matched_rules:
        tag = "allow" if result.allowed else "deny "
        why = "" if result.allowed else f"  [{result.reason}]"
        lines.append(f"  {tag}  {result.rule}: {result.detail}{why}")
    return "\n".join(lines)
