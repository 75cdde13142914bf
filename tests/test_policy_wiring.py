"""Policy wired into ChainVerifier / ChainSigner, a transport, and the CLI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from chainkit import NOW, T0, FixedClock
from cloudevents.core.v1.event import CloudEvent
from policykit import BUNDLE, GW, INV, INV_DEBUG, PROBE, SHIP, P, policy

import trusthop.pipeline
from trusthop.bindings.structured import encode_structured
from trusthop.chain import Chain
from trusthop.cli import EXIT_OK, EXIT_REJECTED, EXIT_USAGE, main
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.memory import MemoryBroker, MemoryConsumer, MemoryProducer
from trusthop.pipeline import H_REASON, ChainSigner, ChainVerifier, TrustedEvent
from trusthop.policy import Policy, check_publish
from trusthop.sign import Identity, mint_origin
from trusthop.verify import VerifiedContext

R = Reason
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "policy.toml"

POLICY_TEXT = f"""
levels = ["untrusted", "internal", "payments"]
trust_domain = "prod.example.com"
[[members]]
id = "{GW.actor}"
level = "payments"
[[members]]
namespace = "shop"
level = "internal"
[[members]]
namespace = "logistics"
level = "internal"
[[members]]
id = "{INV_DEBUG.actor}"
level = "untrusted"
[[segments]]
name = "lab"
namespace = "lab"
[[requirements]]
destination = "kafka:orders"
publishers = ["{GW.actor}"]
scope = ["orders:write"]
subjects = ["user:*"]
[[requirements]]
destination = "kafka:shipping"
min_level = "internal"
[requirements.path]
origin = ["{GW.actor}"]
[[requirements.path.steps]]
actors = ["{P}/ns/shop/*"]
[[requirements]]
destination = "kafka:payments"
min_level = "payments"
"""
POLICY = policy(POLICY_TEXT)
QUARANTINE_SHOP = policy(POLICY_TEXT.replace('namespace = "lab"', 'namespace = "shop"'))


def event(event_id: str = "e-1", type_: str = "com.example.order.created") -> CloudEvent:
    return CloudEvent({"id": event_id, "source": "/test", "type": type_}, {"n": 1})


def origin(subject: str = "user:alice", scope: tuple[str, ...] = ("orders:write", "ship")) -> Any:
    return mint_origin(
        GW, subject=subject, issuer="idp", credential="t", scope=scope, now=T0, ttl=3600
    )


def verifier(pol: Policy | None = POLICY) -> ChainVerifier:
    return ChainVerifier(BUNDLE, clock=FixedClock(NOW), policy=pol)


def signer(identity: Identity, pol: Policy | None = None) -> ChainSigner:
    return ChainSigner(identity, clock=FixedClock(NOW), policy=pol)


def first_order() -> VerifiedContext:
    wire = signer(GW).seal(event(), destination="kafka:orders", origin=origin())
    return verifier(None).verify(wire, "kafka:orders").context


# -- ChainVerifier --------------------------------------------------------------------


def test_without_policy_there_is_no_decision() -> None:
    wire = signer(GW).seal(event(), destination="kafka:anything", origin=origin())
    trusted = verifier(None).verify(wire, "kafka:anything")
    assert trusted.decision is None


def test_verifier_hands_the_decision_to_the_handler() -> None:
    wire = signer(GW).seal(event(), destination="kafka:orders", origin=origin())
    trusted = verifier().verify(wire, "kafka:orders")
    assert trusted.decision is not None and trusted.decision.allowed
    assert trusted.decision.weakest_level == "payments"
    assert [r.rule for r in trusted.decision.matched_rules] == [
        "segments[0] (lab)",
        "requirements[0].publishers",
        "requirements[0].scope",
        "requirements[0].subjects",
    ]


@pytest.mark.parametrize(
    ("subject", "scope", "dest", "reason"),
    [
        ("admin", ("orders:write",), "kafka:orders", R.SUBJECT_DENIED),
        ("user:a", ("ship",), "kafka:orders", R.INSUFFICIENT_SCOPE),
        ("user:a", ("orders:write",), "kafka:nowhere", R.UNAUTHORIZED_ACTOR),
    ],
)
def test_verifier_rejects_with_the_policy_reason(
    subject: str, scope: tuple[str, ...], dest: str, reason: Reason
) -> None:
    wire = signer(GW).seal(event(), destination=dest, origin=origin(subject, scope))
    with pytest.raises(TrustError) as info:
        verifier().verify(wire, dest)
    assert info.value.reason is reason


def test_cryptographic_failures_come_before_policy() -> None:
    wire = signer(GW).seal(event(), destination="kafka:nowhere", origin=origin())
    tampered = WireEvent(dict(wire.attributes), b'{"n":2}', wire.chain)
    with pytest.raises(TrustError) as info:
        verifier().verify(tampered, "kafka:nowhere")
    assert info.value.reason is R.EVENT_MISMATCH


def test_queued_messages_are_judged_by_the_policy_in_force_when_consumed() -> None:
    broker = MemoryBroker()
    parent = first_order()
    producer = MemoryProducer(broker, signer=signer(INV))
    for n in range(3):
        asyncio.run(
            producer.send_and_wait("kafka:shipping", event(f"s-{n}", "shipped"), parent=parent)
        )
    live = verifier(POLICY)
    consumer = MemoryConsumer(broker, "kafka:shipping", verifier=live, group_id="ship")
    handled: list[TrustedEvent] = []

    async def handle(trusted: TrustedEvent) -> None:
        handled.append(trusted)
        live.policy = QUARANTINE_SHOP  # the operator quarantines the shop mid-stream

    asyncio.run(consumer.drain(handle))
    assert [t.event.get_id() for t in handled] == ["s-0"]
    assert handled[0].decision is not None and handled[0].decision.weakest_level == "internal"
    dead = broker.messages("kafka:shipping.dlq")
    assert [m.header(H_REASON) for m in dead] == ["segment_quarantined"] * 2


# -- ChainSigner ----------------------------------------------------------------------


def test_signer_refuses_before_signing(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: object, **kwargs: object) -> Chain:
        raise AssertionError("append_hop must not run when policy denies")

    parent = first_order()
    monkeypatch.setattr(trusthop.pipeline, "append_hop", never)
    with pytest.raises(TrustError) as info:
        signer(GW, POLICY).seal(event(), destination="kafka:nowhere", origin=origin())
    assert info.value.reason is R.UNAUTHORIZED_ACTOR
    # the policy's reason wins over what append_hop would have said (wider scope)
    with pytest.raises(TrustError) as info:
        signer(PROBE, POLICY).seal(
            event(), destination="kafka:shipping", parent=parent, scope=["x"]
        )
    assert info.value.reason is R.SEGMENT_QUARANTINED


def test_memory_producer_publishes_nothing_the_policy_denies() -> None:
    broker = MemoryBroker()
    producer = MemoryProducer(broker, signer=signer(INV_DEBUG, POLICY))
    with pytest.raises(TrustError) as info:
        asyncio.run(producer.send_and_wait("kafka:shipping", event(), parent=first_order()))
    assert info.value.reason is R.INSUFFICIENT_TRUST_LEVEL
    assert broker.messages("kafka:shipping") == []


CASES = [
    (GW, "kafka:orders", "com.example.order.created", None),
    (GW, "kafka:orders", "com.example.order.created", ["ship"]),
    (INV, "kafka:orders", "com.example.order.created", None),
    (INV, "kafka:shipping", "shipped", None),
    (INV_DEBUG, "kafka:shipping", "shipped", None),
    (SHIP, "kafka:shipping", "shipped", None),
    (PROBE, "kafka:shipping", "shipped", None),
    (INV, "kafka:payments", "charge", None),
    (INV, "kafka:nowhere", "x", None),
]


@pytest.mark.parametrize(("who", "dest", "type_", "scope"), CASES)
@pytest.mark.parametrize("pol", [POLICY, QUARANTINE_SHOP], ids=["policy", "quarantine"])
def test_producer_gives_the_reason_the_consumer_would(
    who: Identity, dest: str, type_: str, scope: list[str] | None, pol: Policy
) -> None:
    parent = first_order()
    unchecked = signer(who).seal(event("d", type_), destination=dest, parent=parent, scope=scope)
    try:
        verifier(pol).verify(unchecked, dest)
        consumer_reason = None
    except TrustError as error:
        consumer_reason = error.reason
    try:
        signer(who, pol).seal(event("d", type_), destination=dest, parent=parent, scope=scope)
        producer_reason = None
    except TrustError as error:
        producer_reason = error.reason
    assert producer_reason == consumer_reason
    decision = check_publish(
        pol, parent, actor=who.actor, destination=dest, event_type=type_, scope=scope
    )
    assert decision.reason == consumer_reason
    assert (
        check_publish(
            pol, parent.chain, actor=who.actor, destination=dest, event_type=type_, scope=scope
        )
        == decision
    )


def test_signer_reads_a_one_shot_scope_iterable_once_for_policy_and_signature() -> None:
    parent = first_order()
    scope = (s for s in ["orders:write"])
    wire = signer(GW, POLICY).seal(event(), destination="kafka:orders", parent=parent, scope=scope)
    assert verifier().verify(wire, "kafka:orders").context.scope == {"orders:write"}


def test_check_publish_rejects_a_bare_string_scope() -> None:
    with pytest.raises(TypeError):
        check_publish(
            POLICY, first_order(), actor=GW.actor, destination="d", event_type="t", scope="x"
        )


# -- CLI --------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "bundle.jwks.json").write_text(json.dumps(BUNDLE.to_jwks()))
    (tmp_path / "policy.toml").write_text(POLICY_TEXT)
    parent = first_order()
    ok = signer(INV).seal(event("ok", "shipped"), destination="kafka:shipping", parent=parent)
    bad = signer(INV_DEBUG).seal(
        event("bad", "shipped"), destination="kafka:shipping", parent=parent
    )
    (tmp_path / "ok.json").write_bytes(encode_structured(ok))
    (tmp_path / "bad.json").write_bytes(encode_structured(bad))
    tampered = json.loads(encode_structured(ok))
    tampered["data"] = {"n": 2}
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    return {
        name: str(tmp_path / name)
        for name in ("bundle.jwks.json", "policy.toml", "ok.json", "bad.json", "tampered.json")
    } | {"dir": str(tmp_path)}


def test_cli_policy_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(EXAMPLE)]) == EXIT_OK
    out = capsys.readouterr().out
    assert out == f"{EXAMPLE}: ok: 3 levels, 5 members, 1 segments, 4 requirements, default deny\n"


def test_cli_policy_check_lists_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'levels = ["untrusted"]\n[[requirements]]\ndestination = "k"\nmin_level = "gold"\n'
        '[[members]]\nlevel = "untrusted"\n'
    )
    assert main(["policy", "check", str(bad)]) == EXIT_REJECTED
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{bad}: invalid policy (2 errors)"
    assert "  members[0]: give exactly one of id, prefix or namespace (found: none)" in err
    assert main(["policy", "check", str(tmp_path / "missing.toml")]) == EXIT_USAGE


def test_cli_verify_with_policy(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    common = ["verify", "--bundle", files["bundle.jwks.json"], "--now", str(NOW)]
    args = [*common, "--policy", files["policy.toml"], "--dest", "kafka:shipping"]
    assert main([*args, files["ok.json"]]) == EXIT_OK
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["valid"] and verdict["decision"]["allowed"]
    assert verdict["decision"]["weakest_level"] == "internal"
    assert main([*args, files["bad.json"]]) == EXIT_REJECTED
    captured = capsys.readouterr()
    assert json.loads(captured.out)["reason"] == "insufficient_trust_level"
    assert "rejected: insufficient_trust_level" in captured.err
    # without --policy nothing changes
    assert main([*common, "--dest", "kafka:shipping", files["bad.json"]]) == EXIT_OK
    assert "decision" not in json.loads(capsys.readouterr().out)
    broken = Path(files["dir"]) / "broken.toml"
    broken.write_text("levels = 3")
    bad_policy = [*common, "--policy", str(broken), "--dest", "kafka:shipping", files["ok.json"]]
    assert main(bad_policy, stderr=None) == EXIT_USAGE


def test_cli_policy_explain(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "policy",
        "explain",
        "--policy",
        files["policy.toml"],
        "--bundle",
        files["bundle.jwks.json"],
        "--dest",
        "kafka:shipping",
        "--now",
        str(NOW),
    ]
    assert main([*args, files["ok.json"]]) == EXIT_OK
    out = capsys.readouterr().out
    assert "ALLOWED: allowed by requirements[1]; weakest level internal" in out
    assert f"ring 2  internal  {INV.actor}  (members[1])" in out
    assert "allow  requirements[1].path: the path follows" in out

    assert main([*args, files["bad.json"]]) == EXIT_REJECTED
    out = capsys.readouterr().out
    assert "DENIED insufficient_trust_level" in out
    assert f"ring 2  untrusted  {INV_DEBUG.actor}  (members[3])" in out
    assert "deny   requirements[1].min_level: needs internal" in out
    assert "[insufficient_trust_level]" in out

    assert main([*args, "--json", files["bad.json"]]) == EXIT_REJECTED
    document = json.loads(capsys.readouterr().out)
    assert document["valid"] is True and document["allowed"] is False
    assert document["reason"] == "insufficient_trust_level"
    assert document["context"]["actors"][2] == INV_DEBUG.actor

    assert main([*args, "--json", files["tampered.json"]]) == EXIT_REJECTED
    assert json.loads(capsys.readouterr().out) == {
        "valid": False,
        "reason": "event_mismatch",
        "detail": "the event does not match the digest signed by the newest ring",
    }
    assert main([*args, files["tampered.json"]]) == EXIT_REJECTED
    assert "rejected: event_mismatch" in capsys.readouterr().err


def test_cli_policy_explain_in_the_issues_short_form(
    files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    # `trusthop policy explain --policy POLICY EVENT.json`: no bundle, no destination.
    args = ["policy", "explain", "--policy", files["policy.toml"]]
    assert main([*args, files["bad.json"]]) == EXIT_REJECTED
    captured = capsys.readouterr()
    assert "DENIED insufficient_trust_level" in captured.out
    assert "chain NOT verified" in captured.err
    assert main([*args, "--json", files["ok.json"]]) == EXIT_OK
    document = json.loads(capsys.readouterr().out)
    assert document["valid"] is None and document["allowed"] is True
    assert document["context"]["destination"] == "kafka:shipping"  # the newest ring's
