"""Human output of the demo."""

from __future__ import annotations

from typing import TextIO

from trusthop.demo.flow import Delivery, DemoReport
from trusthop.render import short_name


def _how(d: Delivery) -> str:
    """`` [redelivery]`` / `` [retry, attempt 2]`` for anything but a first delivery."""
    if d.kind == "first" and d.attempt == 1:
        return ""
    if d.kind == "retry":
        return f"  [retry, attempt {d.attempt}]"
    return f"  [{d.kind}]"


def print_report(report: DemoReport, out: TextIO) -> None:
    """Each delivery as a readable path, each rejection with its reason, the
    delivery-semantics scenarios with what they showed, the counters."""
    out.write(f"trusthop demo on the {report.transport} transport\n\n")
    out.write("Delivered (verified before the handler ran):\n")
    for d in report.delivered:
        path = " → ".join(short_name(a) for a in d.actors[1:])
        out.write(
            f"  {d.consumer:<9} {d.type:<32} for {d.subject:<16} "
            f"path: {short_name(d.actors[0])}[origin] → {path}  scope: {' '.join(d.scope)}"
            f"  weakest: {d.weakest_level or '-'}{_how(d)}\n"
        )
    if report.policy_changes:
        out.write(
            "\nPolicy changes (the operator swaps the policy; queued messages get the new one):\n"
        )
        for c in report.policy_changes:
            waiting = f"{c.waiting} message(s) waiting in" if c.waiting else "after consuming"
            out.write(f"  policy: {c.change:<34} ({waiting} {c.destination})\n")
    out.write("\nRejected (dead-lettered with their reason):\n")
    for r in report.rejected:
        out.write(f"  {r.consumer:<9} {r.scenario:<26} → {r.reason}  (event {r.event_id})\n")
    if report.refused_at_send:
        out.write("\nRefused before signing (the producer checks the same policy):\n")
        for refused in report.refused_at_send:
            out.write(f"  {refused.producer:<9} {refused.scenario:<26} → {refused.reason}\n")
    if report.scenarios:
        out.write("\nDelivery semantics (at least once on the wire, each message handled once):\n")
        for s in report.scenarios:
            mark = "ok" if s.ok else "FAILED"
            out.write(f"  {s.scenario:<20} {', '.join(s.consumers):<16} {s.expected}\n")
            out.write(f"  {'':<20} {'':<16} {mark}: {s.observed}\n")
    if report.counts:
        n = report.counts
        out.write(
            "\nCounters (all consumers): "
            f"{n.get('redeliveries', 0)} redelivery(ies), {n.get('retries', 0)} retry(ies), "
            f"{n.get('replays', 0)} replay(s) caught, "
            f"{n.get('verified', 0)} handler runs admitted (crashed and failed ones included); "
            f"verified-prefix cache {n.get('cache_hits', 0)} hits / "
            f"{n.get('cache_misses', 0)} misses "
            "(a chain prefix verified once is not checked again in this process)\n"
        )
    audited = [d for d in report.delivered if d.consumer == "auditor"]
    if audited:
        out.write("\nFull chains seen by the auditor:\n")
        for d in audited:
            out.write(f"  transaction {d.transaction_id} ({d.subject}):\n")
            out.write(f"    {d.path}\n")
    out.write("\n")
    if report.ok:
        out.write(
            f"OK: {len(report.delivered)} deliveries verified, "
            f"{len(report.rejected)} attacks and policy refusals dead-lettered, "
            f"{len(report.policy_changes)} policy changes, "
            f"{len(report.scenarios)} delivery scenarios held, nothing lost.\n"
        )
    else:
        out.write("PROBLEMS:\n")
        for problem in report.problems:
            out.write(f"  {problem}\n")
