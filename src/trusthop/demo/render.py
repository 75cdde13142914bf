"""Human output of the demo."""

from __future__ import annotations

from typing import TextIO

from trusthop.demo.flow import DemoReport
from trusthop.render import short_name


def print_report(report: DemoReport, out: TextIO) -> None:
    """Each delivery as a readable path, each rejection with its reason."""
    out.write(f"trusthop demo on the {report.transport} transport\n\n")
    out.write("Delivered (verified before the handler ran):\n")
    for d in report.delivered:
        path = " → ".join(short_name(a) for a in d.actors[1:])
        out.write(
            f"  {d.consumer:<9} {d.type:<32} for {d.subject:<16} "
            f"path: {short_name(d.actors[0])}[origin] → {path}  scope: {' '.join(d.scope)}"
            f"  weakest: {d.weakest_level or '-'}\n"
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
            f"{len(report.policy_changes)} policy changes, nothing lost.\n"
        )
    else:
        out.write("PROBLEMS:\n")
        for problem in report.problems:
            out.write(f"  {problem}\n")
