"""Issue 3 runtime: the external decision point, policy reload, the decision log."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from chainkit import NOW, FixedClock
from policykit import BUNDLE, GW
from test_policy_wiring import POLICY, POLICY_TEXT, event, origin, signer

from trusthop.canonical import b64url_encode
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.memory import MemoryBroker, MemoryConsumer
from trusthop.pipeline import H_DETAIL, H_REASON, ChainVerifier, TrustedEvent
from trusthop.policy import Policy, PolicyError
from trusthop.policy.pdp import PdpResult
from trusthop.policy.source import PolicySource

R = Reason
DEST = "kafka:orders"


def sealed(dest: str = DEST, subject: str = "user:alice") -> WireEvent:
    return signer(GW).seal(event(), destination=dest, origin=origin(subject))


ALLOW = PdpResult(True)


class Pdp:
    """A recording PDP answering ``result`` (or raising it, or hanging)."""

    def __init__(self, result: PdpResult | BaseException | None = ALLOW) -> None:
        self.result = result
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, request: dict[str, Any]) -> PdpResult:
        self.requests.append(request)
        if self.result is None:
            await asyncio.sleep(3600)
        if isinstance(self.result, BaseException):
            raise self.result
        assert isinstance(self.result, PdpResult)
        return self.result


def verifier(
    policy: Policy | PolicySource | None = POLICY, pdp: Any = None, timeout: float = 1.0
) -> ChainVerifier:
    return ChainVerifier(BUNDLE, clock=FixedClock(NOW), policy=policy, pdp=pdp, pdp_timeout=timeout)


# -- external decision point -------------------------------------------------------------


async def test_pdp_allow_hands_over_the_local_decision() -> None:
    pdp = Pdp()
    trusted = await verifier(pdp=pdp).verify_async(sealed(), DEST)
    assert trusted.decision is not None and trusted.decision.allowed
    assert len(pdp.requests) == 1


async def test_pdp_request_has_the_authzen_shape_and_no_credential() -> None:
    pdp = Pdp()
    trusted = await verifier(pdp=pdp).verify_async(sealed(), DEST)
    [request] = pdp.requests
    assert set(request) == {"subject", "action", "resource", "context"}
    assert request["subject"] == {"type": "user", "id": "user:alice"}
    assert request["action"] == {"name": "consume"}
    assert request["resource"] == {
        "type": "destination",
        "id": DEST,
        "properties": {"event_type": "com.example.order.created"},
    }
    context = request["context"]
    assert context["transaction_id"] == trusted.context.transaction_id
    assert context["actors"] == list(trusted.context.actors)
    assert context["scope"] == sorted(trusted.context.scope)
    assert context["trust_domain"] == "prod.example.com"
    assert context["chain_digest"] == b64url_encode(trusted.context.chain_digest)
    assert trusted.decision is not None
    assert context["decision"] == trusted.decision.to_json()
    text = json.dumps(request)  # JSON-serialisable as is
    origin_ring = trusted.context.chain.origin
    assert "credential" not in text and "token" not in text
    assert b64url_encode(origin_ring.credential_hash) not in text
    assert origin_ring.credential_hash.hex() not in text


async def test_pdp_is_not_asked_when_the_local_policy_denies() -> None:
    pdp = Pdp()
    with pytest.raises(TrustError) as info:
        await verifier(pdp=pdp).verify_async(sealed(subject="admin"), DEST)
    assert info.value.reason is R.SUBJECT_DENIED
    assert pdp.requests == []


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (None, R.UNAUTHORIZED_ACTOR),
        ("not on Tuesdays", R.UNAUTHORIZED_ACTOR),
        ("segment_quarantined", R.SEGMENT_QUARANTINED),
        ("handler_failed", R.UNAUTHORIZED_ACTOR),  # not a policy code: not passed through
    ],
)
async def test_pdp_deny(reason: str | None, expected: Reason) -> None:
    with pytest.raises(TrustError) as info:
        await verifier(pdp=Pdp(PdpResult(False, reason))).verify_async(sealed(), DEST)
    assert info.value.reason is expected
    assert "external decision point denied" in info.value.message


@pytest.mark.parametrize(
    "failure",
    [None, RuntimeError("connection refused"), TimeoutError(), "not a PdpResult"],
    ids=["timeout", "exception", "own-timeout", "bad-answer"],
)
async def test_pdp_failure_fails_closed(failure: Any) -> None:
    pdp = Pdp()
    pdp.result = failure
    if isinstance(failure, str):

        async def bad(request: dict[str, Any]) -> Any:
            return {"decision": True}

        chosen: Any = bad
    else:
        chosen = pdp
    with pytest.raises(TrustError) as info:
        await verifier(pdp=chosen, timeout=0.05).verify_async(sealed(), DEST)
    assert info.value.reason is R.PDP_UNAVAILABLE


async def test_pdp_without_local_policy() -> None:
    pdp = Pdp(PdpResult(False, "insufficient_scope"))
    with pytest.raises(TrustError) as info:
        await verifier(None, pdp=pdp).verify_async(sealed("kafka:anything"), "kafka:anything")
    assert info.value.reason is R.INSUFFICIENT_SCOPE
    assert pdp.requests[0]["context"]["decision"] is None


def test_sync_verify_refuses_when_a_pdp_is_configured() -> None:
    with pytest.raises(RuntimeError, match="verify_async"):
        verifier(pdp=Pdp()).verify(sealed(), DEST)


def test_from_authzen() -> None:
    assert PdpResult.from_authzen({"decision": True}) == PdpResult(True)
    assert PdpResult.from_authzen(
        {"decision": False, "context": {"reason": "subject_denied"}}
    ) == PdpResult(False, "subject_denied")
    with pytest.raises(ValueError):
        PdpResult.from_authzen({"decision": "yes"})


async def test_memory_consumer_dead_letters_pdp_unavailable_on_timeout() -> None:
    broker = MemoryBroker()
    broker.publish_wire(DEST, sealed())
    consumer = MemoryConsumer(
        broker, DEST, verifier=verifier(pdp=Pdp(None), timeout=0.05), group_id="g"
    )
    handled: list[TrustedEvent] = []

    async def handle(trusted: TrustedEvent) -> None:
        handled.append(trusted)

    assert await consumer.drain(handle) == 1
    assert handled == []
    [dead] = broker.messages(f"{DEST}.dlq")
    assert dead.header(H_REASON) == "pdp_unavailable"
    assert "did not answer within 0.05s" in (dead.header(H_DETAIL) or "")


async def test_memory_consumer_delivers_when_the_pdp_allows() -> None:
    broker = MemoryBroker()
    broker.publish_wire(DEST, sealed())
    consumer = MemoryConsumer(broker, DEST, verifier=verifier(pdp=Pdp()), group_id="g")
    handled: list[TrustedEvent] = []

    async def handle(trusted: TrustedEvent) -> None:
        handled.append(trusted)

    assert await consumer.drain(handle) == 1
    assert len(handled) == 1 and broker.messages(f"{DEST}.dlq") == []


# -- policy reload ---------------------------------------------------------------------------

STRICT = POLICY_TEXT.replace('subjects = ["user:*"]', 'subjects = ["user:bob"]')


def write(path: Path, text: str, tick: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(tick * 10**9, tick * 10**9))  # a distinct mtime per write


def test_reload_keeps_the_last_good_policy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "policy.toml"
    write(file, POLICY_TEXT, 1)
    source = PolicySource(file, clock=FixedClock(NOW))
    live = verifier(source)
    assert live.verify(sealed(), DEST).decision is not None
    first = source.policy

    write(file, POLICY_TEXT + "\n[[bogus]]\n", 2)
    with caplog.at_level(logging.ERROR, logger="trusthop.policy"):
        assert source.reload() is False
    assert source.policy is first
    assert isinstance(source.last_error, PolicyError)
    [logged] = [r for r in caplog.records if r.name == "trusthop.policy"]
    assert logged.levelno == logging.ERROR
    message = logged.getMessage()
    assert message.startswith("policy reload failed, keeping the last good policy from ")
    assert "bogus" in message
    live.verify(sealed(), DEST)  # the last good policy still rules

    write(file, STRICT, 3)
    assert source.reload() is True
    assert source.last_error is None and source.policy is not first
    with pytest.raises(TrustError) as info:
        live.verify(sealed(), DEST)  # the new rule, for the next message
    assert info.value.reason is R.SUBJECT_DENIED
    assert source.reload() is False  # unchanged bytes: nothing to do


def test_signer_reads_the_source_at_every_seal(tmp_path: Path) -> None:
    file = tmp_path / "policy.toml"
    write(file, POLICY_TEXT, 1)
    source = PolicySource(file)
    gw = signer(GW)
    gw.policy = source
    gw.seal(event(), destination=DEST, origin=origin())
    write(file, STRICT, 2)
    source.reload()
    with pytest.raises(TrustError) as info:
        gw.seal(event(), destination=DEST, origin=origin())
    assert info.value.reason is R.SUBJECT_DENIED


def test_a_bad_initial_file_raises(tmp_path: Path) -> None:
    file = tmp_path / "policy.toml"
    file.write_text("levels = []\n")
    with pytest.raises(PolicyError):
        PolicySource(file)
    with pytest.raises(OSError):
        PolicySource(tmp_path / "missing.toml")


async def test_watch_picks_up_changes_and_reports_a_bad_file_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "policy.toml"
    write(file, POLICY_TEXT, 1)
    source = PolicySource(file)
    first = source.policy
    task = asyncio.create_task(source.watch(interval=0.01))
    try:
        with caplog.at_level(logging.ERROR, logger="trusthop.policy"):
            write(file, "not = [toml", 2)
            await asyncio.sleep(0.1)
            assert source.policy is first
            write(file, STRICT, 3)
            for _ in range(100):
                if source.policy is not first:
                    break
                await asyncio.sleep(0.01)
        assert source.policy is not first
        errors = [r for r in caplog.records if r.name == "trusthop.policy"]
        assert len(errors) == 1 and "not valid TOML" in errors[0].getMessage()
        with pytest.raises(TrustError):
            verifier(source).verify(sealed(), DEST)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_policy_digest_ignores_layout_but_not_rules(tmp_path: Path) -> None:
    from trusthop.policy import loads_policy

    same = loads_policy("# a comment\n" + POLICY_TEXT)
    assert same.digest == POLICY.digest and POLICY.digest.startswith("sha256:")
    assert loads_policy(STRICT).digest != POLICY.digest


# -- decision log ----------------------------------------------------------------------------

FIELDS = {
    "decision",
    "reason",
    "message",
    "transaction_id",
    "subject",
    "event_id",
    "chain_digest",
    "actors",
    "destination",
    "event_type",
    "weakest_level",
    "matched_rules",
    "policy",
    "policy_source",
    "pdp",
}


def decisions(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    lines = [r for r in caplog.records if r.name == "trusthop.decisions"]
    assert all(r.levelno == logging.INFO for r in lines)
    return [json.loads(r.getMessage()) for r in lines]


def test_every_decision_is_one_json_line(caplog: pytest.LogCaptureFixture) -> None:
    live = verifier()
    with caplog.at_level(logging.INFO, logger="trusthop.decisions"):
        allowed = live.verify(sealed(), DEST)
        with pytest.raises(TrustError):
            live.verify(sealed(subject="admin"), DEST)
    allow, deny = decisions(caplog)
    for line in (allow, deny):
        assert set(line) == FIELDS
        assert line["destination"] == DEST
        assert line["event_type"] == "com.example.order.created"
        assert line["policy"] == POLICY.digest
        assert line["actors"] == [GW.actor, GW.actor]
        assert line["weakest_level"] == "payments"
        assert line["pdp"] is None
        text = json.dumps(line)
        assert "credential" not in text
        assert allowed.context.chain.origin.credential_hash.hex() not in text
    assert allow["decision"] == "allow" and allow["reason"] is None
    assert allow["transaction_id"] == allowed.context.transaction_id
    assert allow["chain_digest"] == b64url_encode(allowed.context.chain_digest)
    assert allow["subject"] == "user:alice"
    assert allow["matched_rules"][0]["rule"] == "segments[0] (lab)"
    assert deny["decision"] == "deny" and deny["reason"] == "subject_denied"
    assert deny["subject"] == "admin"
    assert deny["message"].startswith("requirements[0].subjects")


async def test_pdp_outcomes_are_logged_once_per_message(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    file = tmp_path / "policy.toml"
    write(file, POLICY_TEXT, 1)
    source = PolicySource(file)
    with caplog.at_level(logging.INFO, logger="trusthop.decisions"):
        await verifier(source, pdp=Pdp()).verify_async(sealed(), DEST)
        with pytest.raises(TrustError):
            await verifier(source, pdp=Pdp(PdpResult(False))).verify_async(sealed(), DEST)
        with pytest.raises(TrustError):
            await verifier(source, pdp=Pdp(None), timeout=0.01).verify_async(sealed(), DEST)
    lines = decisions(caplog)
    assert [(x["decision"], x["pdp"], x["reason"]) for x in lines] == [
        ("allow", "allow", None),
        ("deny", "deny", "unauthorized_actor"),
        ("deny", "unavailable", "pdp_unavailable"),
    ]
    assert all(x["policy_source"] == str(file) for x in lines)
    assert all(x["policy"] == source.policy.digest for x in lines)


def test_no_policy_no_pdp_no_decision_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="trusthop.decisions"):
        verifier(None).verify(sealed("kafka:x"), "kafka:x")
    assert decisions(caplog) == []


async def test_a_pdp_cannot_fail_open() -> None:
    # Red-team findings: a PDP that swallows its timeout and answers late, or
    # answers with a truthy non-bool, was taken as an allow.
    import asyncio
    import contextlib

    import pytest

    from trusthop.errors import Reason, TrustError
    from trusthop.policy.pdp import PdpResult, consult

    async def late(request: dict[str, object]) -> PdpResult:
        # Swallowing the cancellation is the attack.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(5)
        return PdpResult(True)

    async def stringly(request: dict[str, object]) -> PdpResult:
        return PdpResult("false", "denied")  # type: ignore[arg-type]

    class Sub(PdpResult):
        pass

    async def subclass(request: dict[str, object]) -> PdpResult:
        return Sub(True)

    async def cancels_itself(request: dict[str, object]) -> PdpResult:
        raise asyncio.CancelledError

    for pdp in (late, stringly, subclass, cancels_itself):
        with pytest.raises(TrustError) as error:
            await consult(pdp, {}, seconds=0.05)
        assert error.value.reason is Reason.PDP_UNAVAILABLE, pdp.__name__
    assert (await consult(lambda r: _allow(), {}, seconds=1)).allowed is True


async def _allow() -> PdpResult:
    from trusthop.policy.pdp import PdpResult

    return PdpResult(True)
