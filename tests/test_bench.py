"""``trusthop bench`` without brokers: the pieces, not the numbers.

The benchmark is not a timed test: nothing here asserts a speed. The smoke
test that runs ``trusthop bench --quick`` against real brokers and checks
that every figure is printed is ``integration/test_bench_smoke.py``.
"""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest

from trusthop import keys
from trusthop.bench import rss
from trusthop.bench.measure import interleave, interleave_many, per_op
from trusthop.bench.micro import Micro, Settings
from trusthop.bench.report import Figure, Report, Target, not_measured, render_table
from trusthop.bench.runner import FIGURE_ORDER, _redact
from trusthop.bench.workload import DATA_BYTES, Workload, event_data
from trusthop.canonical import b64url_encode
from trusthop.cli import build_parser
from trusthop.digest import canonical_json

TINY = Settings(rounds=1, batch_seconds=0.002, quick=True)


@pytest.fixture(scope="module")
def micro() -> Micro:
    return Micro(Workload(), TINY)


def test_interleave_alternates_and_takes_medians() -> None:
    calls: list[str] = []
    a_values = iter([1.0, 2.0, 3.0])
    b_values = iter([2.0, 6.0, 3.0])

    def a() -> float:
        calls.append("a")
        return next(a_values)

    def b() -> float:
        calls.append("b")
        return next(b_values)

    pair = interleave(3, a, b)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert pair.ratios == (2.0, 3.0, 1.0)
    assert (pair.a, pair.b, pair.ratio) == (2.0, 3.0, 2.0)
    assert pair.spread() == (1.0, 3.0)


def test_interleave_many_rotates_the_order() -> None:
    calls: list[int] = []

    def side(index: int) -> float:
        calls.append(index)
        return float(index)

    values = interleave_many(3, [lambda: side(0), lambda: side(1), lambda: side(2)])
    assert values == [[0.0] * 3, [1.0] * 3, [2.0] * 3]
    assert calls[:3] == [0, 1, 2]
    assert calls[3:6] == [0, 2, 1]  # rotated by one, then reversed
    assert calls[6:] == [2, 0, 1]


def test_per_op_counts_calls() -> None:
    seen = []
    assert per_op(lambda: seen.append(1), 5) >= 0
    assert len(seen) == 5


def test_targets_and_status() -> None:
    assert Target("<=", 1.25).met(1.25)
    assert not Target("<=", 1.25).met(1.26)
    assert Target(">=", 0.7).met(0.7)
    assert Figure("f", 1.0, "ratio", Target("<=", 1.25)).status == "met"
    assert Figure("f", 2.0, "ratio", Target("<=", 1.25)).status == "MISSED"
    assert Figure("f", 2.0, "ratio").status == "-"
    missing = not_measured("kafka_consume", "ratio", Target(">=", 0.7), "broker down")
    assert missing.status == "n/a"
    assert missing.to_json()["met"] is None
    assert missing.note == "n/a: broker down"


def test_report_json_and_table_name_every_figure() -> None:
    figures = [
        Figure("verify_cold[1]", 1.1, "ratio", Target("<=", 1.25), summary="2 rings"),
        Figure("ring_bytes_hop", 431.0, "bytes", Target("<=", 200)),
        not_measured("amqp_publish", "ratio", Target(">=", 0.8), "RabbitMQ refused: no login"),
    ]
    report = Report({"mode": "quick", "notes": ["a note"]}, figures)
    document = report.to_json()
    assert [f["name"] for f in document["figures"]] == [f.name for f in figures]
    assert document["summary"]["targets_met"] == ["verify_cold[1]"]
    assert document["summary"]["targets_missed"] == ["ring_bytes_hop"]
    assert document["summary"]["not_measured"] == ["amqp_publish"]
    json.dumps(document)  # serialisable
    out = io.StringIO()
    render_table(report, out)
    text = out.getvalue()
    for name in ("verify_cold[1]", "ring_bytes_hop", "amqp_publish", "431 B", "MISSED", "n/a"):
        assert name in text
    assert "RabbitMQ refused: no login" in text
    assert "note: a note" in text


def test_event_data_is_exactly_one_kibibyte() -> None:
    assert len(canonical_json(event_data())) == DATA_BYTES == 1024


def test_workload_chains_verify(micro: Micro) -> None:
    sealed = micro.w.chain(4)
    assert len(sealed.chain.rings) == 5
    context = micro.w.context(sealed)
    assert context.actors[0] == micro.w.edge.actor
    assert len(context.actors) == 5


def test_ring_bytes_are_what_the_wire_carries(micro: Micro) -> None:
    hop, origin = micro.ring_bytes()
    assert hop.name == "ring_bytes_hop" and origin.name == "ring_bytes_origin"
    # v2: each ring is one dot-separated base64url segment of its bytes
    # (64-byte signature, then the body); a figure is that segment and its dot.
    sealed = micro.w.chain(5)
    rings = sealed.chain.ring_bytes
    wire = [len(b64url_encode(r)) + 1 for r in rings]
    assert sealed.encoded == "2." + ".".join(b64url_encode(r) for r in rings)
    assert hop.value == max(wire[2:]) == hop.detail["derived_hop"]
    assert hop.detail["ring_bytes"] == len(rings[-1])
    assert origin.value == wire[0] and origin.detail["ring_bytes"] == len(rings[0])
    # What a derived hop must hold: a signature, an event digest (and more).
    assert 64 + 32 < hop.detail["ring_bytes"] < len(rings[0])
    assert hop.detail["with_consumed_event_id"] > hop.value  # the id is opt-in: it costs
    assert hop.detail["narrowing_scope"] > hop.value  # inherited scope is not repeated
    assert hop.status == "met"  # the v2 hop fits the 200-character target


def test_core_figures_come_out_with_targets(micro: Micro) -> None:
    figures = {f.name: f for f in [*micro.backends_figures(), *micro.sign_hop()]}
    assert figures["raw_verify"].value is not None and figures["raw_verify"].value > 0
    assert set(figures["raw_verify"].detail["per_backend_us"]) == set(
        keys.available_ed25519_backends()
    )
    sign = figures["sign_hop"]
    assert sign.target == Target("<=", 1.3)
    assert sign.value is not None and sign.value > 0


def test_rss_worker_reports_growth(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rss, "WARMUP", 10)
    assert rss.main(["30", "verifier"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["events"] == 30
    assert result["signature_cache_entries"] > 0
    assert {"rss_start_mb", "rss_end_mb", "growth_mb", "peak_rss_mb"} <= set(result)


def test_cli_parses_bench() -> None:
    args = build_parser().parse_args(
        ["bench", "--quick", "--json", "--kafka", "127.0.0.1:9092", "--amqp", "amqp://x/"]
    )
    assert args.quick and args.json
    assert args.kafka == "127.0.0.1:9092"
    assert args.amqp == "amqp://x/"
    assert not args.no_brokers


def test_amqp_password_is_redacted() -> None:
    assert _redact("amqp://guest:secret@127.0.0.1:5672/") == "amqp://guest:***@127.0.0.1:5672/"
    assert _redact("amqp://127.0.0.1/") == "amqp://127.0.0.1/"


def test_every_spec_figure_has_a_place_in_the_report() -> None:
    for name in (
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
    ):
        assert name in FIGURE_ORDER


def test_no_brokers_reports_them_as_not_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    from pathlib import Path

    from trusthop.bench import runner

    notes: list[str] = []
    args = SimpleNamespace(no_brokers=True, kafka=None, amqp=None)
    raw = {"raw_verify": 60.0, "raw_sign": 20.0}
    figures = asyncio.run(
        runner._brokers(args, runner.QUICK, Workload(), raw, notes, Path("/nonexistent"))
    )
    assert [f.name for f in figures] == [
        "kafka_consume",
        "kafka_produce",
        "amqp_consume",
        "amqp_publish",
    ]
    assert all(f.status == "n/a" and "--no-brokers" in f.note for f in figures)


def test_unreachable_rabbitmq_is_reported_with_the_reason() -> None:
    import asyncio
    from pathlib import Path

    from trusthop.bench import runner
    from trusthop.bench.tansu import free_loopback_port

    port = free_loopback_port()  # nothing listens there
    notes: list[str] = []
    args = SimpleNamespace(
        no_brokers=False, kafka=f"127.0.0.1:{port}", amqp=f"amqp://guest:pw@127.0.0.1:{port}/"
    )
    raw = {"raw_verify": 60.0, "raw_sign": 20.0}
    figures = asyncio.run(
        runner._brokers(args, runner.QUICK, Workload(), raw, notes, Path("/nonexistent"))
    )
    amqp = [f for f in figures if f.name.startswith("amqp_")]
    assert [f.status for f in amqp] == ["n/a", "n/a"]
    assert all("RabbitMQ at amqp://guest:***@" in f.note for f in amqp)
    kafka = [f for f in figures if f.name.startswith("kafka_")]
    assert [f.status for f in kafka] == ["n/a", "n/a"]
    assert all(f"127.0.0.1:{port}" in f.note for f in kafka)
