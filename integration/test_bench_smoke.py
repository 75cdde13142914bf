"""Smoke test of ``trusthop bench --quick`` against real brokers.

Not a timed test: it checks that the run completes and prints every figure
of docs/performance.md, each measured (no ``n/a``), in both outputs. The
numbers themselves are whatever this machine gives.
"""

from __future__ import annotations

import json
import subprocess
import sys

SPEC_FIGURES = [
    *(f"verify_cold[{d}]" for d in (1, 2, 4, 8, 16)),
    *(f"verify_warm[{d}]" for d in (1, 2, 4, 8, 16)),
    "sign_hop",
    "kafka_consume",
    "kafka_produce",
    "amqp_consume",
    "amqp_publish",
    "ring_bytes_hop",
    "ring_bytes_origin",
    "rss_growth",
    "jwt_hop[RS256]",
    "raw_verify",
    "raw_sign",
]


def _bench(*extra: str, kafka: str, amqp: str) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "trusthop.cli",
            "bench",
            "--quick",
            "--kafka",
            kafka,
            "--amqp",
            amqp,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quick_bench_measures_every_figure(kafka_bootstrap: str, amqp_url: str) -> None:
    document = json.loads(_bench("--json", kafka=kafka_bootstrap, amqp=amqp_url))
    figures = {f["name"]: f for f in document["figures"]}
    missing = [name for name in SPEC_FIGURES if name not in figures]
    assert not missing, missing
    unmeasured = {n: f.get("note") for n, f in figures.items() if f["status"] == "n/a"}
    assert not unmeasured, unmeasured
    for name in SPEC_FIGURES:
        assert isinstance(figures[name]["value"], int | float), name
    for name in ("kafka_consume", "amqp_consume"):
        detail = figures[name]["detail"]
        assert detail["trusthop_per_s"] > 0 and detail["raw_per_s"] > 0
        assert detail["trusthop_cpu_us_per_msg"] > 0
    assert document["meta"]["peak_rss_mb"] > 0
    assert document["meta"]["mode"] == "quick"
