"""The demo on the in-memory transport and the CLI, end to end in-process."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from trusthop.cli import EXIT_OK, EXIT_REJECTED, EXIT_USAGE, main
from trusthop.demo import run_demo
from trusthop.demo.bus import MemoryBus
from trusthop.demo.flow import (
    EXPECTED,
    GATEWAY,
    INVENTORY,
    QUARANTINED,
    SHIPPING,
    demo_policy,
    demo_policy_data,
)
from trusthop.policy import load_policy

# What each consumer reads: inventory 3 orders; shipping 2 reservations, 2
# attacks, then the quarantined reservations; the auditor 2 reports, 5
# attacks and policy refusals, then the report of the demoted shipping.
CONSUMED = {"inventory": 3, "shipping": 4 + QUARANTINED, "auditor": 7 + 1}


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
    # every message that entered a consumer came out handled or dead-lettered
    for consumer, count in CONSUMED.items():
        handled = [d for d in report.delivered if d.consumer == consumer]
        dead = [r for r in report.rejected if r.consumer == consumer]
        assert len(handled) + len(dead) == count, consumer


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


def test_demo_refuses_half_a_broker_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--kafka", "127.0.0.1:1"]) == EXIT_USAGE
    assert "--kafka and --amqp go together" in capsys.readouterr().err


GW = "spiffe://prod.example.com/ns/edge/sa/gateway"
INV = "spiffe://prod.example.com/ns/shop/sa/inventory"
EVENT = (
    '{"specversion":"1.0","type":"com.example.order.created","source":"/gw","id":"o-1",'
    '"datacontenttype":"application/json","data":{"order":1}}'
)


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
    assert inspected["rings"][2]["consumed_event_id"] == "o-1"

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
