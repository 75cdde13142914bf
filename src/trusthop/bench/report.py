"""Figures, targets and the two outputs of ``trusthop bench``: a table and JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

Comparison = Literal["<=", ">="]


@dataclass(frozen=True)
class Target:
    """``value <= limit`` or ``value >= limit``."""

    op: Comparison
    limit: float

    def met(self, value: float) -> bool:
        """Whether ``value`` reaches the target."""
        return value <= self.limit if self.op == "<=" else value >= self.limit

    def __str__(self) -> str:
        return f"{self.op} {self.limit:g}"


@dataclass
class Figure:
    """One line of the report.

    ``value`` is ``None`` when the figure could not be measured; ``note``
    then says why (a broker that did not answer, a missing package).
    ``detail`` holds what the value was computed from (medians of both
    sides, per-operation times, rounds, CPU time per message...).
    """

    name: str
    value: float | None
    unit: str
    target: Target | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    summary: str = ""
    """One short human line: what A and B were."""

    @property
    def status(self) -> str:
        """``met``, ``MISSED``, ``n/a`` (not measured) or ``-`` (no target)."""
        if self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return "n/a"
        if self.target is None:
            return "-"
        return "met" if self.target.met(self.value) else "MISSED"

    def to_json(self) -> dict[str, Any]:
        """The JSON form (``target`` as text, ``met`` as a boolean or ``null``)."""
        out: dict[str, Any] = {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "target": str(self.target) if self.target else None,
            "met": None if self.status in ("n/a", "-") else self.status == "met",
            "status": self.status,
        }
        if self.summary:
            out["summary"] = self.summary
        if self.note:
            out["note"] = self.note
        out["detail"] = self.detail
        return out


def not_measured(name: str, unit: str, target: Target | None, why: str) -> Figure:
    """A figure that could not be measured, saying why."""
    return Figure(name, None, unit, target, note=f"n/a: {why}")


@dataclass
class Report:
    """Everything one run measured, plus how and where."""

    meta: dict[str, Any]
    figures: list[Figure]

    def to_json(self) -> dict[str, Any]:
        """One JSON object: ``meta``, ``figures`` (a list) and ``summary``."""
        measured = [f for f in self.figures if f.status != "n/a"]
        return {
            "meta": self.meta,
            "figures": [f.to_json() for f in self.figures],
            "summary": {
                "figures": len(self.figures),
                "measured": len(measured),
                "not_measured": [f.name for f in self.figures if f.status == "n/a"],
                "targets_met": [f.name for f in self.figures if f.status == "met"],
                "targets_missed": [f.name for f in self.figures if f.status == "MISSED"],
            },
        }


def _value(figure: Figure) -> str:
    if figure.value is None:
        return "n/a"
    if figure.unit in ("bytes", "B"):
        return f"{figure.value:.0f} B"
    if figure.unit == "MB":
        return f"{figure.value:.1f} MB"
    if figure.unit == "us":
        return f"{figure.value:.1f} us"
    if figure.unit == "x":
        return f"{figure.value:.2f}x"
    return f"{figure.value:.3f}"


def render_table(report: Report, out: TextIO) -> None:
    """The human output: a header, one row per figure, then the notes."""
    meta = report.meta
    out.write(
        f"trusthop bench ({meta.get('mode')}) — {meta.get('machine')}, "
        f"Python {meta.get('python')}, Ed25519 backend in use: {meta.get('backend')}\n"
    )
    out.write(
        "Every figure: median over interleaved rounds (A, B alternating) in this run; "
        "ratios are B / A.\n\n"
    )
    rows = [("figure", "value", "target", "status", "what")]
    for figure in report.figures:
        rows.append(
            (
                figure.name,
                _value(figure),
                str(figure.target) if figure.target else "",
                figure.status,
                figure.note if figure.value is None else figure.summary,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for index, row in enumerate(rows):
        line = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4]))
        out.write(f"{line}  {row[4]}".rstrip() + "\n")
        if index == 0:
            out.write("  ".join("-" * w for w in widths) + "  " + "-" * 20 + "\n")
    out.write("\n")
    for line in meta.get("notes", []):
        out.write(f"note: {line}\n")
    out.write(
        f"peak RSS {meta.get('peak_rss_mb')} MB, wall time {meta.get('wall_seconds')} s, "
        f"CPU time {meta.get('cpu_seconds')} s\n"
    )


def report_from_json(document: dict[str, Any]) -> Report:
    """The :class:`Report` of a ``trusthop bench --json`` document (to render
    the table of a saved run again)."""
    figures = []
    for item in document["figures"]:
        target = None
        if item.get("target"):
            op, limit = item["target"].split()
            target = Target(op, float(limit))
        figures.append(
            Figure(
                item["name"],
                item["value"],
                item["unit"],
                target,
                detail=item.get("detail", {}),
                note=item.get("note", ""),
                summary=item.get("summary", ""),
            )
        )
    return Report(document["meta"], figures)
