"""RSS growth over many verified events, measured in a fresh process.

``python -m trusthop.bench.rss EVENTS [verifier|admission]`` signs and
verifies ``EVENTS`` distinct depth-3 events (each a new hop on one verified
prefix, so every event puts a new entry in the verified-prefix cache, the worst
case for memory) and prints one JSON object: RSS after a warm-up of 1,000
events, at the end, the growth between them, and the peak.

``verifier``: :class:`~trusthop.pipeline.ChainVerifier` with its default
verified-prefix cache bound. ``admission``: the consumer path, an
:class:`~trusthop.admission.Admission` with the wrappers' default
:class:`~trusthop.stores.memory.MemoryReplayStore`, which keeps a sighting
of every accepted event for at least ``remember`` seconds (a day) by design.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time

from trusthop.admission import Admission
from trusthop.bench.measure import peak_rss_bytes, rss_bytes
from trusthop.bench.workload import Workload
from trusthop.destination import kafka_destination
from trusthop.replay import DeliveryInfo
from trusthop.stores.memory import MemoryReplayStore

WARMUP = 1_000


async def _run(events: int, mode: str) -> dict[str, object]:
    workload = Workload()
    verifier = workload.verifier()
    admission = Admission(verifier, scope="bench", store=MemoryReplayStore())
    parent = workload.chain(2)
    destination = kafka_destination("rss")
    baseline = 0
    start = time.perf_counter()
    for index in range(events + WARMUP):
        if index == WARMUP:
            gc.collect()
            baseline = rss_bytes()
        sealed = workload.extend(parent.chain, destination=destination)
        if mode == "admission":
            await admission.admit(sealed.wire, destination, DeliveryInfo(id=f"d{index}"))
        else:
            verifier.verify(sealed.wire, destination)
    gc.collect()
    end = rss_bytes()
    cache = verifier.signature_cache
    return {
        "mode": mode,
        "events": events,
        "rss_start_mb": round(baseline / 2**20, 1),
        "rss_end_mb": round(end / 2**20, 1),
        "growth_mb": round((end - baseline) / 2**20, 1),
        "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
        "signature_cache_entries": len(cache) if cache is not None else 0,
        "signature_cache_bound": cache.max_entries if cache is not None else 0,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str]) -> int:
    """Entry point: ``EVENTS [verifier|admission]``; prints JSON."""
    events = int(argv[0]) if argv else 200_000
    mode = argv[1] if len(argv) > 1 else "verifier"
    if mode not in ("verifier", "admission"):
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(asyncio.run(_run(events, mode))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
