"""Timing: batches, interleaved rounds, medians, CPU time and memory.

Every comparison runs its two sides (A, the baseline, and B, trusthop)
alternately in the same process: round ``r`` runs A then B when ``r`` is even
and B then A when it is odd, so drift of a noisy machine (another tenant, CPU
frequency, the broker's background work) hits both sides alike. The figure
is the median of the per-round ratios ``B / A``; the medians of A and B are
reported beside it.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Batch = Callable[[], float]
"""Runs one batch of the measured operation; returns seconds per operation
(or, for throughput figures, operations per second)."""


def per_op(operation: Callable[[], object], count: int) -> float:
    """Seconds per call of ``operation`` over ``count`` calls (after a collection)."""
    gc.collect()
    clock = time.perf_counter
    start = clock()
    for _ in range(count):
        operation()
    return (clock() - start) / count


def calibrate(operation: Callable[[], object], seconds: float, *, cap: int = 200_000) -> int:
    """How many calls of ``operation`` take about ``seconds`` (at least 3)."""
    operation()  # warm: imports, caches of loaded keys
    count, elapsed = 1, 0.0
    while count < cap:
        start = time.perf_counter()
        for _ in range(count):
            operation()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / 8:
            break
        count *= 4
    per = max(elapsed / count, 1e-9)
    return max(3, min(cap, int(seconds / per)))


@dataclass(frozen=True)
class Pair:
    """The outcome of an interleaved A/B comparison."""

    a: float
    """Median of A over the rounds."""
    b: float
    """Median of B over the rounds."""
    ratio: float
    """Median of the per-round ratios B / A."""
    ratios: tuple[float, ...]
    a_values: tuple[float, ...]
    b_values: tuple[float, ...]

    def spread(self) -> tuple[float, float]:
        """The smallest and largest per-round ratio."""
        return min(self.ratios), max(self.ratios)


def interleave(rounds: int, a: Batch, b: Batch) -> Pair:
    """Run ``rounds`` rounds of A and B, alternating which goes first."""
    a_values: list[float] = []
    b_values: list[float] = []
    for index in range(rounds):
        if index % 2 == 0:
            a_values.append(a())
            b_values.append(b())
        else:
            b_values.append(b())
            a_values.append(a())
    ratios = [y / x for x, y in zip(a_values, b_values, strict=True)]
    return Pair(
        statistics.median(a_values),
        statistics.median(b_values),
        statistics.median(ratios),
        tuple(ratios),
        tuple(a_values),
        tuple(b_values),
    )


def interleave_many(rounds: int, batches: Sequence[Batch]) -> list[list[float]]:
    """Like :func:`interleave` for any number of sides: the order rotates
    each round. Returns each side's values, one per round."""
    values: list[list[float]] = [[] for _ in batches]
    count = len(batches)
    for index in range(rounds):
        order = list(range(count))
        shift = index % count
        order = order[shift:] + order[:shift]
        if index % 2 == 1:
            order.reverse()
        for side in order:
            values[side].append(batches[side]())
    return values


def median(values: Sequence[float]) -> float:
    """The median (``nan`` for no values)."""
    return statistics.median(values) if values else float("nan")


def rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc``; else the peak)."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * 1024  # kilobytes on Linux


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, all threads."""
    return time.process_time()


def micros(seconds: float) -> float:
    """Seconds as microseconds, rounded to 0.1."""
    return round(seconds * 1e6, 1)


def rounded(value: float, digits: int = 3) -> float:
    """``value`` rounded for the report."""
    return round(value, digits)


def describe_pair(pair: Pair, unit: Callable[[float], Any] = micros) -> dict[str, Any]:
    """The JSON form of a pair: medians, ratio, spread and rounds."""
    low, high = pair.spread()
    return {
        "a": unit(pair.a),
        "b": unit(pair.b),
        "ratio": rounded(pair.ratio),
        "ratio_min": rounded(low),
        "ratio_max": rounded(high),
        "rounds": len(pair.ratios),
    }
