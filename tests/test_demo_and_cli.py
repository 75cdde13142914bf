"""The demo on the in-memory transport and the CLI, end to end in-process."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from trusthop.bindings.structured import decode_structured
from trusthop.canonical import b64url_encode
from trusthop.cli import EXIT_OK, EXIT_REJECTED, EXIT_USAGE, main
from trusthop.demo import run_demo
from trusthop.demo.bus import MemoryBus
from trusthop.demo.flow import (
    BROADCAST_GROUPS,
    CRASHED_ORDER,
    DELIVERY_SCENARIOS,
    EXPECTED,
    FAILING_ORDER,
    GATEWAY,
    INVENTORY,
    ORDERS,
    QUARANTINED,
    REPUBLISHED_ORDER,
    SHIPPING,
    DemoReport,
    demo_policy,
    demo_policy_data,
    expected_counts,
)
from trusthop.policy import load_policy

# What each consumer reads: inventory 3 orders (one of them twice: its
# consumer crashed) and the re-published copy; shipping 2 reservations (one
# of them twice: retried), 2 attacks, then the quarantined reservations; the
# auditor 2 reports, 5 attacks and policy refusals, then the report of the
# demoted shipping; each broadcast group the 2 tracking events.
CONSUMED = {
    "inventory": ORDERS + 1,
    "shipping": 4 + QUARANTINED,
    "auditor": 7 + 1,
    **{group: ORDERS - 1 for group in BROADCAST_GROUPS},
}
CRASHES = [name for name in DELIVERY_SCENARIOS if name == "crash-before-commit"]
FAILURES = [name for name in DELIVERY_SCENARIOS if name == "retried-handler"]
COPIES = [name for name in EXPECTED if EXPECTED[name] == "replayed"]


def _cache_hits_at_least(delivered: Iterable[Mapping[str, Any]]) -> int:
    """Signature cache hits the legitimate traffic alone must produce.

    One verifier serves every consumer of the run, and the cache counts one
    lookup per chain (not per ring). A chain accepted as a first delivery
    anywhere but at inventory (whose chains start at the gateway, verified
    by no one before) extends a prefix that the upstream consumer verified
    in this process: one hit. The second broadcast group finds the whole
    chain verified: one hit too.
    """
    return sum(1 for d in delivered if d["kind"] == "first" and d["consumer"] != "inventory")


def test_memory_demo_delivers_the_orders_and_rejects_every_attack() -> None:
    report = asyncio.run(run_demo(MemoryBus()))
    assert report.ok, report.problems
    reasons = {r.scenario: r.reason for r in report.rejected}
    assert reasons == EXPECTED
    audited = [d for d in report.delivered if d.consumer == "auditor"]
    assert len(audited) == 2
    for delivery in audited:
        assert delivery.actors == [GATEWAY, GATEWAY, INVENTORY, SHIPPING]
        assert delivery.scope == ["audit:write"]
        assert delivery.weakest_level == "internal"
    assert {d.weakest_level for d in report.delivered if d.consumer == "inventory"} == {"payments"}
    # every message that entered a consumer came out handled or dead-lettered, once
    for consumer, count in CONSUMED.items():
        handled = [d for d in report.delivered if d.consumer == consumer]
        dead = [r for r in report.rejected if r.consumer == consumer]
        assert len(handled) + len(dead) == count, consumer
        assert len({d.event_id for d in handled}) == len(handled), consumer


def _scenarios(report: DemoReport) -> dict[str, tuple[list[str], list[str], bool]]:
    return {s.scenario: (s.consumers, s.event_ids, s.ok) for s in report.scenarios}


def test_memory_demo_delivery_scenarios() -> None:
    report = asyncio.run(run_demo(MemoryBus()))
    assert report.ok, report.problems
    scenarios = _scenarios(report)
    assert list(scenarios) == list(DELIVERY_SCENARIOS)
    assert all(ok for _, _, ok in scenarios.values())
    # crash before commit: redelivered to the restarted group, handled once
    assert scenarios["crash-before-commit"][:2] == (["inventory"], [f"order-{CRASHED_ORDER}"])
    crashed = [d for d in report.delivered if d.event_id == f"order-{CRASHED_ORDER}"]
    assert [(d.consumer, d.kind, d.attempt) for d in crashed] == [("inventory", "redelivery", 1)]
    # the re-published copy: dead-lettered as replayed, the original handled once
    copy_id = f"order-{REPUBLISHED_ORDER}"
    replayed = [(r.consumer, r.event_id) for r in report.rejected if r.reason == "replayed"]
    assert replayed == [("inventory", copy_id)]
    assert len([d for d in report.delivered if d.event_id == copy_id]) == 1
    # the failed handler: retried, handled once on attempt 2, nothing dead-lettered for it
    (failed_id,) = scenarios["retried-handler"][1]
    retried = [d for d in report.delivered if d.event_id == failed_id]
    assert [(d.consumer, d.kind, d.attempt) for d in retried] == [("shipping", "retry", 2)]
    assert all(r.event_id != failed_id for r in report.rejected)
    others = [d for d in report.delivered if d.consumer == "shipping" and d.event_id != failed_id]
    assert [d.kind for d in others] == ["first"] * (ORDERS - 2)
    # the broadcast: each group handled each tracking event once, as a first delivery
    consumers, events, _ = scenarios["broadcast"]
    assert consumers == list(BROADCAST_GROUPS) and len(events) == ORDERS - 1
    for group in BROADCAST_GROUPS:
        mine = [d for d in report.delivered if d.consumer == group]
        assert sorted(d.event_id for d in mine) == events
        assert {d.kind for d in mine} == {"first"}
        assert {d.type for d in mine} == {"com.example.shipping.dispatched"}
    # exactly one derived tracking event per order the shipping handler finished
    assert len(events) == len([d for d in report.delivered if d.consumer == "shipping"])
    assert _order_numbers(report, failed_id) == [FAILING_ORDER]


def _order_numbers(report: DemoReport, event_id: str) -> list[int]:
    """The order number in the subject of a handled event (customer-<n>)."""
    return [
        int(d.subject.rsplit("-", 1)[1])
        for d in report.delivered
        if d.event_id == event_id and d.consumer == "shipping"
    ]


def test_memory_demo_counts_follow_from_the_scenarios() -> None:
    report = asyncio.run(run_demo(MemoryBus()))
    counts = report.counts
    assert expected_counts() == {
        "redeliveries": len(CRASHES),
        "retries": len(FAILURES),
        "replays": len(COPIES),
    }
    for name, want in expected_counts().items():
        assert counts[name] == want, name
    assert counts["dead_lettered"] == len(report.rejected)
    # accepted admissions: every handled delivery, plus the first delivery
    # whose handler crashed and the attempt whose handler failed
    assert counts["verified"] == len(report.delivered) + len(CRASHES) + len(FAILURES)
    delivered = [dataclasses.asdict(d) for d in report.delivered]
    assert counts["cache_hits"] >= _cache_hits_at_least(delivered) > 0


def test_memory_demo_policy_scenarios() -> None:
    report = asyncio.run(run_demo(MemoryBus()))
    quarantined = [r for r in report.rejected if r.scenario == "quarantine"]
    assert [(r.consumer, r.reason) for r in quarantined] == [
        ("shipping", "segment_quarantined")
    ] * QUARANTINED
    assert {r.event_id for r in quarantined} == {f"quarantine-{n + 1}" for n in range(QUARANTINED)}
    (demoted,) = [r for r in report.rejected if r.scenario == "demoted"]
    assert (demoted.consumer, demoted.reason) == ("auditor", "insufficient_trust_level")
    by_scenario = {r.scenario: r.reason for r in report.rejected}
    assert by_scenario["unauthorized-publisher"] == "unauthorized_actor"
    assert by_scenario["narrowed-scope"] == "insufficient_scope"
    changes = [(c.change, c.waiting) for c in report.policy_changes]
    assert changes == [
        ("quarantine namespace shop", QUARANTINED),
        ("lift the quarantine of shop", 0),
        ("demote shipping to untrusted", 1),
        ("restore shipping to internal", 0),
    ]


def test_demo_policy_file_is_shipped_and_valid() -> None:
    import trusthop.demo

    path = Path(trusthop.demo.__file__).parent / "policy.toml"
    policy = load_policy(path)
    assert policy.levels == ("untrusted", "internal", "payments")
    assert policy.segments == ()
    assert demo_policy_data()["default"] == "deny"
    quarantined = demo_policy(segments=[{"name": "q", "namespace": "shop"}])
    assert [s.name for s in quarantined.segments] == ["q"]
    assert main(["policy", "check", str(path)]) == EXIT_OK


def test_demo_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--json"]) == EXIT_OK
    document = json.loads(capsys.readouterr().out)
    assert document["transport"] == "memory"
    assert {"consumer", "event_id", "type", "subject", "actors"} <= set(document["delivered"][0])
    assert {(r["scenario"], r["reason"]) for r in document["rejected"]} == set(EXPECTED.items())
    assert all(d["weakest_level"] in {"internal", "payments"} for d in document["delivered"])
    assert len(document["policy_changes"]) == 4
    # the delivery scenarios, with their outcome
    assert [(s["scenario"], s["ok"]) for s in document["scenarios"]] == [
        (name, True) for name in DELIVERY_SCENARIOS
    ]
    assert [s["expected"] for s in document["scenarios"]] == list(DELIVERY_SCENARIOS.values())
    kinds = sorted((d["consumer"], d["kind"], d["attempt"]) for d in document["delivered"])
    assert ("inventory", "redelivery", 1) in kinds and ("shipping", "retry", 2) in kinds
    # the counts, derived from the scenario list
    counts = document["counts"]
    assert {"redeliveries", "retries", "replays", "cache_hits"} <= set(counts)
    assert counts["redeliveries"] == len(CRASHES)
    assert counts["retries"] == len(FAILURES)
    assert counts["replays"] == len(COPIES)
    assert counts["cache_hits"] >= _cache_hits_at_least(document["delivered"]) > 0
    assert counts["dead_lettered"] == len(document["rejected"])


def test_demo_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "gateway[origin user:customer-1] → gateway ⇒ kafka:orders → inventory" in out
    for reason in EXPECTED.values():
        assert reason in out
    assert "weakest: internal" in out and "weakest: payments" in out
    assert "policy: quarantine namespace shop" in out
    assert "2 message(s) waiting in amqp:shipping/order.reserved" in out
    assert "policy: demote shipping to untrusted" in out
    assert "Delivery semantics" in out
    for name, expected in DELIVERY_SCENARIOS.items():
        assert f"{name}" in out and expected in out
    assert "FAILED" not in out
    assert "[redelivery]" in out and "[retry, attempt 2]" in out
    counts = expected_counts()
    assert (
        f"{counts['redeliveries']} redelivery(ies), {counts['retries']} retry(ies), "
        f"{counts['replays']} replay(s) caught"
    ) in out
    assert "verified-prefix cache" in out


def test_demo_refuses_half_a_broker_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--kafka", "127.0.0.1:1"]) == EXIT_USAGE
    assert "--kafka and --amqp go together" in capsys.readouterr().err


GW = "spiffe://prod.example.com/ns/edge/sa/gateway"
INV = "spiffe://prod.example.com/ns/shop/sa/inventory"
EVENT = (
    '{"specversion":"1.0","type":"com.example.order.created","source":"/gw","id":"o-1",'
    '"datacontenttype":"application/json","data":{"order":1}}'
)


def _digest_of(path: Path) -> str:
    """The event digest (base64url) of a structured-mode event file."""
    return b64url_encode(decode_structured(path.read_bytes()).digest())


def _keys(tmp_path: Path) -> Path:
    out = tmp_path / "keys"
    assert main(["keygen", "--actor", GW, "--out", str(out)]) == EXIT_OK
    assert main(["keygen", "--actor", INV, "--out", str(out)]) == EXIT_OK
    return out


def test_cli_keygen_emit_inspect_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = _keys(tmp_path)
    bundle = json.loads((keys / "bundle.jwks.json").read_text())
    assert {k["spiffe_id"] for k in bundle["keys"]} == {GW, INV}
    assert all("d" not in k for k in bundle["keys"])
    capsys.readouterr()
    (tmp_path / "ev.json").write_text(EVENT)
    token = "eyJhbGciOiJFUzI1NiJ9.secret-user-token.c2ln"
    (tmp_path / "token").write_text(token + "\n")
    code = main(
        [
            "emit",
            "--key",
            str(keys / "gateway.key.pem"),
            "--actor",
            GW,
            "--dest",
            "kafka:orders",
            "--scope",
            "orders:write",
            "--scope",
            "ship",
            "--subject",
            "user:alice",
            "--credential-file",
            str(tmp_path / "token"),
            str(tmp_path / "ev.json"),
        ]
    )
    assert code == EXIT_OK
    origin_event = capsys.readouterr().out
    assert token not in origin_event and "secret-user-token" not in origin_event
    (tmp_path / "o.json").write_text(origin_event)
    (tmp_path / "ev2.json").write_text(EVENT.replace('"o-1"', '"r-1"'))
    code = main(
        [
            "emit",
            "--key",
            str(keys / "inventory.key.pem"),
            "--actor",
            INV,
            "--dest",
            "amqp:shipping/x",
            "--scope",
            "ship",
            "--parent",
            str(tmp_path / "o.json"),
            "--bundle",
            str(keys / "bundle.jwks.json"),
            str(tmp_path / "ev2.json"),
        ]
    )
    assert code == EXIT_OK
    derived = capsys.readouterr().out
    (tmp_path / "d.json").write_text(derived)

    assert main(["inspect", "--json", str(tmp_path / "d.json")]) == EXIT_OK
    inspected = json.loads(capsys.readouterr().out)
    assert [r["actor"] for r in inspected["rings"]] == [GW, GW, INV]
    # v2 names the consumed event by the parent ring's event digest (the
    # signature binds the parent's hash); the id is opt-in.
    assert inspected["rings"][1]["event_digest"] == _digest_of(tmp_path / "o.json")
    assert all(len(r["key_tag"]) == 4 for r in inspected["rings"])

    bundle_arg = ["--bundle", str(keys / "bundle.jwks.json")]
    assert (
        main(["verify", *bundle_arg, "--dest", "amqp:shipping/x", str(tmp_path / "d.json")])
        == EXIT_OK
    )
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["valid"] and verdict["scope"] == ["ship"] and verdict["subject"] == "user:alice"

    assert (
        main(["verify", *bundle_arg, "--dest", "kafka:orders", str(tmp_path / "d.json")])
        == EXIT_REJECTED
    )
    assert json.loads(capsys.readouterr().out)["reason"] == "wrong_destination"

    (tmp_path / "all.jsonl").write_text(origin_event + derived + "not json\n")
    assert (
        main(
            [
                "verify",
                "--jsonl",
                *bundle_arg,
                "--dest",
                "kafka:orders",
                str(tmp_path / "all.jsonl"),
            ]
        )
        == EXIT_REJECTED
    )
    verdicts = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [v.get("reason") for v in verdicts] == [None, "wrong_destination", "malformed"]

    # Producer-side check: a wider scope than the parent's is refused at emit time.
    code = main(
        [
            "emit",
            "--key",
            str(keys / "inventory.key.pem"),
            "--actor",
            INV,
            "--dest",
            "amqp:shipping/x",
            "--scope",
            "payments:refund",
            "--parent",
            str(tmp_path / "o.json"),
            str(tmp_path / "ev2.json"),
        ]
    )
    assert code == EXIT_REJECTED
    assert "scope_escalation" in capsys.readouterr().err


def test_cli_emit_derives_the_same_ring_with_and_without_a_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``emit --parent`` writes one kind of hop ring whether or not it
    verified the parent first (``--bundle``): what the ring names must not
    depend on an option that only decides whether to check the parent."""
    keys = _keys(tmp_path)
    capsys.readouterr()
    (tmp_path / "ev.json").write_text(EVENT)
    base = ["emit", "--key", str(keys / "gateway.key.pem"), "--actor", GW]
    assert (
        main([*base, "--dest", "kafka:orders", "--subject", "user:a", str(tmp_path / "ev.json")])
        == EXIT_OK
    )
    (tmp_path / "o.json").write_text(capsys.readouterr().out)
    (tmp_path / "ev2.json").write_text(EVENT.replace('"o-1"', '"r-1"'))
    derive = [
        "emit",
        "--key",
        str(keys / "inventory.key.pem"),
        "--actor",
        INV,
        "--dest",
        "amqp:shipping/x",
        "--parent",
        str(tmp_path / "o.json"),
    ]
    newest = []
    for extra in ([], ["--bundle", str(keys / "bundle.jwks.json")]):
        assert main([*derive, *extra, str(tmp_path / "ev2.json")]) == EXIT_OK
        (tmp_path / "d.json").write_text(capsys.readouterr().out)
        assert main(["inspect", "--json", str(tmp_path / "d.json")]) == EXIT_OK
        ring = json.loads(capsys.readouterr().out)["rings"][-1]
        newest.append({k: v for k, v in ring.items() if k not in ("hash", "signature", "iat")})
    assert newest[0] == newest[1]


def test_cli_verify_with_a_broken_bundle_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "b.json").write_text('{"keys": [{"kid": "x"}]}')
    (tmp_path / "e.json").write_text(EVENT)
    code = main(
        [
            "verify",
            "--bundle",
            str(tmp_path / "b.json"),
            "--dest",
            "kafka:o",
            str(tmp_path / "e.json"),
        ]
    )
    assert code == EXIT_USAGE
    assert "spiffe_id" in capsys.readouterr().err


def test_cli_keygen_rejects_a_malformed_spiffe_id(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["keygen", "--actor", "spiffe://Prod.example.com/x", "--out", str(tmp_path)])
    assert exc.value.code == 2


def test_cli_unreadable_inputs_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = _keys(tmp_path)
    (tmp_path / "junk.json").write_text("garbage")
    (tmp_path / "ev.json").write_text(EVENT)
    assert main(["inspect", str(tmp_path / "junk.json")]) == EXIT_USAGE
    assert "not a structured-mode CloudEvent" in capsys.readouterr().err
    emit = [
        "emit",
        "--key",
        str(keys / "gateway.key.pem"),
        "--actor",
        GW,
        "--dest",
        "kafka:o",
        "--subject",
        "user:a",
    ]
    assert main([*emit, str(tmp_path / "junk.json")]) == EXIT_USAGE
    assert main(["keygen", "--actor", GW, "--out", str(tmp_path / "ev.json")]) == EXIT_USAGE
    with pytest.raises(SystemExit) as negative_ttl:
        main([*emit, "--ttl", "-5", str(tmp_path / "ev.json")])
    assert negative_ttl.value.code == 2
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    encrypted = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (tmp_path / "enc.pem").write_bytes(encrypted)
    emit[2] = str(tmp_path / "enc.pem")
    assert main([*emit, str(tmp_path / "ev.json")]) == EXIT_USAGE
    assert "cannot load key" in capsys.readouterr().err


def test_the_producer_refuses_before_signing_with_the_consumers_reason() -> None:
    report = asyncio.run(run_demo(MemoryBus()))
    refused = [(r.producer, r.scenario, r.reason) for r in report.refused_at_send]
    assert refused == [("inventory", "unauthorized-publisher", "unauthorized_actor")]
    consumer_side = {r.scenario: r.reason for r in report.rejected}
    assert consumer_side["unauthorized-publisher"] == refused[0][2]
