"""Delivery semantics of the in-memory transport (the demo's default)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from chainkit import count_signature_checks
from cloudevents.core.v1.event import CloudEvent

from trusthop import (
    ChainSigner,
    ChainVerifier,
    Identity,
    MemoryBroker,
    MemoryConsumer,
    MemoryProducer,
    SigningKey,
    TrustBundle,
    TrustedEvent,
    mint_origin,
)
from trusthop.memory import (
    H_NOT_BEFORE,
    H_RETRY,
    ConsumerCrash,
    MemoryDelivery,
)
from trusthop.pipeline import H_ATTEMPTS, H_CONSUMER, H_DESTINATION, H_REASON, H_SOURCE
from trusthop.replay import DeliveryKind
from trusthop.stores import MemoryReplayStore
from trusthop.verify import Limits

GW = Identity.create(
    "spiffe://prod.example.com/ns/edge/sa/gateway", SigningKey.from_seed(b"g" * 32)
)
BUNDLE = TrustBundle.of([GW.bundle_key])


async def _publish(broker: MemoryBroker, n: int, destination: str = "kafka:orders") -> None:
    producer = MemoryProducer(broker, signer=ChainSigner(GW))
    for i in range(n):
        origin = mint_origin(
            GW, subject="user:a", issuer="idp", credential="t", scope=["s"], now=time.time()
        )
        event = CloudEvent({"type": "t", "source": "/s", "id": f"e{i}"}, {"i": i})
        await producer.send_and_wait(destination, event, origin=origin)


def _consumer(broker: MemoryBroker, group: str = "g", attempts: int = 3) -> MemoryConsumer:
    return MemoryConsumer(
        broker,
        "kafka:orders",
        verifier=ChainVerifier(BUNDLE),
        group_id=group,
        max_attempts=attempts,
    )


def test_each_group_gets_every_message_and_commits_after_handling() -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 3))
    seen: dict[str, list[str]] = {"a": [], "b": []}

    def handler_for(group: str):  # type: ignore[no-untyped-def]
        async def handle(trusted: TrustedEvent) -> None:
            assert broker.committed.get((group, "kafka:orders"), 0) == len(seen[group])
            seen[group].append(trusted.event.get_id())

        return handle

    for group in ("a", "b"):
        assert asyncio.run(_consumer(broker, group).drain(handler_for(group))) == 3
    assert seen == {"a": ["e0", "e1", "e2"], "b": ["e0", "e1", "e2"]}
    assert asyncio.run(_consumer(broker, "a").drain(handler_for("a"))) == 0


def test_a_crash_inside_the_handler_leaves_the_message_uncommitted() -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 2))
    calls: list[str] = []

    async def crash(trusted: TrustedEvent) -> None:
        calls.append(trusted.event.get_id())
        raise asyncio.CancelledError  # the process dies mid-handler

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(_consumer(broker).drain(crash))
    assert broker.committed.get(("g", "kafka:orders"), 0) == 0

    async def ok(trusted: TrustedEvent) -> None:
        calls.append(trusted.event.get_id())

    assert asyncio.run(_consumer(broker).drain(ok)) == 2
    assert calls == ["e0", "e0", "e1"]


def test_a_failing_handler_is_retried_then_dead_lettered() -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 1))
    attempts: list[int] = []

    async def fail(trusted: TrustedEvent) -> None:
        attempts.append(1)
        raise RuntimeError("database down")

    consumer = _consumer(broker, attempts=3)
    assert asyncio.run(consumer.drain(fail)) == 1
    assert len(attempts) == 3
    (letter,) = broker.messages("kafka:orders.dlq")
    assert letter.header(H_REASON) == "handler_failed"
    assert letter.header(H_ATTEMPTS) == "3"
    assert letter.value == broker.messages("kafka:orders")[0].value
    assert consumer.stats["dead_lettered:handler_failed"] == 1


def test_poison_messages_are_dead_lettered_once_with_their_reason() -> None:
    broker = MemoryBroker()
    broker.append("kafka:orders", [("ce_id", None), ("junk", b"\xff")], b"\x00")
    broker.append("kafka:orders", [], None)
    asyncio.run(_publish(broker, 1))
    handled: list[str] = []

    async def ok(trusted: TrustedEvent) -> None:
        handled.append(trusted.event.get_id())

    consumer = _consumer(broker)
    assert asyncio.run(consumer.drain(ok)) == 3
    assert handled == ["e0"]
    letters = broker.messages("kafka:orders.dlq")
    assert [m.header(H_REASON) for m in letters] == ["malformed", "malformed"]
    assert {m.header(H_SOURCE) for m in letters} == {"kafka:orders"}
    assert {m.header(H_CONSUMER) for m in letters} == {"g"}
    assert consumer.stats["delivered"] == 1


def test_a_message_published_to_one_destination_is_rejected_on_another() -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 1, destination="kafka:other"))
    message = broker.messages("kafka:other")[0]
    broker.append("kafka:orders", message.headers, message.value)

    async def never(trusted: TrustedEvent) -> None:
        raise AssertionError("must not run")

    assert asyncio.run(_consumer(broker).drain(never)) == 1
    assert broker.messages("kafka:orders.dlq")[0].header(H_REASON) == "wrong_destination"


# --------------------------------------------------------------------------- #
# replay, redelivery and retry (issue 4): the semantics of the broker wrappers
# --------------------------------------------------------------------------- #


class FakeTime:
    """A clock for verifier, signer and consumer, moved only by ``sleep``."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += max(seconds, 0.0)


def _consumer_with(
    broker: MemoryBroker, group: str = "g", *, verifier: ChainVerifier | None = None, **kwargs: Any
) -> MemoryConsumer:
    kwargs.setdefault("retry_delay", 0.0)
    return MemoryConsumer(
        broker,
        "kafka:orders",
        verifier=verifier or ChainVerifier(BUNDLE),
        group_id=group,
        **kwargs,
    )


class Recorder:
    """A handler that records what it saw; ``plan`` maps an event id to what
    its successive calls do ("crash", "fail" or "ok"; "ok" once exhausted)."""

    def __init__(self, **plan: list[str]) -> None:
        self.plan = {k: list(v) for k, v in plan.items()}
        self.calls: list[tuple[str, str, int, bool]] = []
        self.handled: list[str] = []

    async def __call__(self, delivery: MemoryDelivery) -> None:
        event_id = delivery.event.get_id()
        self.calls.append((event_id, str(delivery.kind), delivery.attempt, delivery.redelivered))
        steps = self.plan.get(event_id, [])
        step = steps.pop(0) if steps else "ok"
        if step == "crash":
            raise ConsumerCrash
        if step == "fail":
            raise RuntimeError(f"{event_id} failed")
        self.handled.append(event_id)


def _reasons(broker: MemoryBroker) -> list[str | None]:
    return [m.header(H_REASON) for m in broker.messages("kafka:orders.dlq")]


def test_a_crash_before_commit_is_redelivered_accepted_and_handled_once() -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 2))
    store = MemoryReplayStore()  # shared by the group, as Redis would be
    handler = Recorder(e0=["crash"])
    first = _consumer_with(broker, replay_store=store)
    with pytest.raises(ConsumerCrash):
        asyncio.run(first.drain(handler))
    assert broker.committed.get(("g", "kafka:orders"), 0) == 0
    restarted = _consumer_with(broker, replay_store=store)
    assert asyncio.run(restarted.drain(handler)) == 2
    assert handler.calls == [
        ("e0", "first", 1, False),
        ("e0", "redelivery", 1, True),
        ("e1", "first", 1, False),
    ]
    assert handler.handled == ["e0", "e1"]
    assert restarted.counters["redelivered"] == 1 and restarted.stats["redelivered"] == 1
    assert restarted.counters["verified"] == 2
    assert broker.messages("kafka:orders.dlq") == []


def test_without_a_shared_store_a_redelivery_is_verified_as_a_first_delivery() -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 1))
    handler = Recorder(e0=["crash"])
    with pytest.raises(ConsumerCrash):
        asyncio.run(_consumer_with(broker).drain(handler))
    assert asyncio.run(_consumer_with(broker).drain(handler)) == 1
    assert [c[1] for c in handler.calls] == ["first", "first"]  # at-least-once


def test_a_republished_copy_is_rejected_as_replayed_and_dead_lettered() -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 1))
    consumer = _consumer_with(broker)
    handler = Recorder()
    assert asyncio.run(consumer.drain(handler)) == 1
    original = broker.messages("kafka:orders")[0]
    broker.append("kafka:orders", original.headers, original.value)  # the attacker's copy
    # a copy claiming to be a retry, outside the retry log, is a copy all the same
    broker.append("kafka:orders", [*original.headers, (H_RETRY, b"2")], original.value)
    assert asyncio.run(consumer.drain(handler)) == 2
    assert handler.handled == ["e0"]
    assert _reasons(broker) == ["replayed", "replayed"]
    letter = broker.messages("kafka:orders.dlq")[1]
    assert letter.header(H_RETRY) is None  # sender-set trusthop-* headers are dropped
    assert letter.header(H_DESTINATION) == "kafka:orders"
    assert consumer.counters["replayed"] == 2
    assert consumer.counters.as_dict()["rejected"] == {"replayed": 2}


def test_a_republished_copy_is_skipped_when_so_configured() -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 1))
    original = broker.messages("kafka:orders")[0]
    broker.append("kafka:orders", original.headers, original.value)
    consumer = _consumer_with(broker, on_replay="skip")
    handler = Recorder()
    assert asyncio.run(consumer.drain(handler)) == 2
    assert handler.handled == ["e0"]
    assert broker.messages("kafka:orders.dlq") == []
    assert consumer.stats["duplicates"] == 1
    assert (consumer.counters["duplicates"], consumer.counters["replayed"]) == (1, 1)


def test_without_a_store_a_copy_is_handled_again() -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 1))
    original = broker.messages("kafka:orders")[0]
    broker.append("kafka:orders", original.headers, original.value)
    handler = Recorder()
    assert asyncio.run(_consumer_with(broker, replay_store=None).drain(handler)) == 2
    assert handler.handled == ["e0", "e0"]


def test_a_failed_handler_is_retried_through_the_retry_log_then_succeeds() -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 2))
    clock = FakeTime()
    consumer = _consumer_with(
        broker, retry_delay=2.0, clock=clock, sleep=clock.sleep, max_attempts=3
    )
    handler = Recorder(e0=["fail"])
    assert asyncio.run(consumer.drain(handler)) == 2
    assert handler.calls == [
        ("e0", "first", 1, False),
        ("e1", "first", 1, False),  # the retry waits; the log goes on
        ("e0", "retry", 2, True),
    ]
    assert handler.handled == ["e1", "e0"]
    assert clock.slept == [pytest.approx(2.0, abs=0.01)]
    (copy,) = broker.messages("kafka:orders.retry")
    assert (copy.header(H_RETRY), copy.header(H_ATTEMPTS)) == ("2", "1")
    assert copy.value == broker.messages("kafka:orders")[0].value
    assert copy.header(H_NOT_BEFORE) is not None
    assert broker.messages("kafka:orders.dlq") == []
    assert consumer.counters["retried"] == 1 and consumer.stats["retried"] == 1
    assert consumer.stats["delivered"] == 2


def test_retries_exhausted_dead_letter_with_handler_failed_and_the_attempts() -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 1))
    consumer = _consumer_with(broker, max_attempts=3)
    handler = Recorder(e0=["fail"] * 3)
    assert asyncio.run(consumer.drain(handler)) == 1
    assert [(c[1], c[2]) for c in handler.calls] == [("first", 1), ("retry", 2), ("retry", 3)]
    assert [m.header(H_RETRY) for m in broker.messages("kafka:orders.retry")] == ["2", "3"]
    (letter,) = broker.messages("kafka:orders.dlq")
    assert letter.header(H_REASON) == "handler_failed"
    assert letter.header(H_ATTEMPTS) == "3"
    assert letter.header(H_SOURCE) == "kafka:orders.retry"
    assert letter.header(H_DESTINATION) == "kafka:orders"
    assert letter.header(H_RETRY) is None and letter.header(H_NOT_BEFORE) is None
    assert "RuntimeError: e0 failed" in (letter.header("trusthop-detail") or "")
    assert consumer.counters["retried"] == 2
    assert consumer.counters.as_dict()["rejected"] == {"handler_failed": 1}


def test_a_second_copy_of_a_retry_is_a_replay() -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 1))
    handler = Recorder(e0=["fail"])
    consumer = _consumer_with(broker)
    assert asyncio.run(consumer.drain(handler)) == 1
    (copy,) = broker.messages("kafka:orders.retry")
    broker.append("kafka:orders.retry", copy.headers, copy.value)  # copied by an attacker
    assert asyncio.run(consumer.drain(handler)) == 1
    assert handler.handled == ["e0"]
    assert _reasons(broker) == ["replayed"]


def test_max_uses_accepts_a_broadcast_that_many_times_per_group() -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 1))
    original = broker.messages("kafka:orders")[0]
    for _ in range(2):
        broker.append("kafka:orders", original.headers, original.value)
    twice = Recorder()
    assert asyncio.run(_consumer_with(broker, "twice", max_uses=2).drain(twice)) == 3
    assert [c[1] for c in twice.calls] == ["first", "first"]
    assert _reasons(broker) == ["replayed"]
    # every other group has its own scope: one use each
    once = Recorder()
    assert asyncio.run(_consumer_with(broker, "once").drain(once)) == 3
    assert once.handled == ["e0"]
    assert _reasons(broker) == ["replayed"] * 3


def test_each_group_verifies_a_broadcast_once_with_one_signature_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 1))
    verifier = ChainVerifier(BUNDLE)  # one process: one verified-prefix cache
    checks = count_signature_checks(monkeypatch)
    seen: dict[str, list[str]] = {}
    for group in ("mailer", "tracker"):
        handler = Recorder()
        consumer = _consumer_with(broker, group, verifier=verifier)
        before = len(checks)
        assert asyncio.run(consumer.drain(handler)) == 1
        seen[group] = handler.handled
        rings = 2  # origin ring and the gateway's hop
        # One cache lookup per chain: a miss for the first group, a hit for the second.
        want = (0, 1) if group == "mailer" else (1, 0)
        assert (consumer.counters["cache_hits"], consumer.counters["cache_misses"]) == want
        assert len(checks) - before == (rings if group == "mailer" else 0)
    assert seen == {"mailer": ["e0"], "tracker": ["e0"]}


def test_a_retry_waiting_past_max_age_is_still_handled() -> None:
    clock = FakeTime()
    verifier = ChainVerifier(BUNDLE, limits=Limits(max_age=60, leeway=0), clock=clock)
    broker = MemoryBroker()
    producer = MemoryProducer(broker, signer=ChainSigner(GW, clock=clock))
    origin = mint_origin(
        GW, subject="user:a", issuer="idp", credential="t", scope=["s"], now=clock()
    )
    event = CloudEvent({"type": "t", "source": "/s", "id": "e0"}, {"i": 0})
    asyncio.run(producer.send_and_wait("kafka:orders", event, origin=origin))
    consumer = _consumer_with(
        broker, verifier=verifier, retry_delay=30.0, clock=clock, sleep=clock.sleep
    )

    async def slow_then_ok(delivery: MemoryDelivery) -> None:
        if delivery.attempt == 1:
            clock.now += 120  # the first attempt times out after two minutes
            raise TimeoutError("downstream too slow")
        handled.append((delivery.kind, clock() - delivery.context.chain.newest.iat))

    handled: list[tuple[DeliveryKind, float]] = []
    assert asyncio.run(consumer.drain(slow_then_ok)) == 1
    assert clock.slept == [pytest.approx(30.0, abs=0.01)]
    ((kind, age),) = handled
    assert kind is DeliveryKind.RETRY and age > 60  # past max_age, still accepted
    # the same message as a first delivery at that time is too old
    late = _consumer_with(broker, "late", verifier=verifier)
    assert asyncio.run(late.drain(Recorder())) == 1
    assert _reasons(broker) == ["expired"]


def test_a_key_revoked_before_the_redelivery_rejects_it() -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 1))
    verifier = ChainVerifier(BUNDLE)
    store = MemoryReplayStore()
    handler = Recorder(e0=["crash"])
    with pytest.raises(ConsumerCrash):
        asyncio.run(_consumer_with(broker, verifier=verifier, replay_store=store).drain(handler))
    verifier.bundle = TrustBundle.of([GW.bundle_key], revoked_actors=[GW.actor])
    restarted = _consumer_with(broker, verifier=verifier, replay_store=store)
    assert asyncio.run(restarted.drain(handler)) == 1
    assert handler.handled == []
    assert _reasons(broker) == ["revoked"]


def test_every_message_in_is_handled_or_dead_lettered_exactly_once() -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 5))
    original = broker.messages("kafka:orders")[0]
    broker.append("kafka:orders", original.headers, original.value)  # replayed copy
    broker.append("kafka:orders", [], b"junk")  # malformed
    broker.append("kafka:orders", [("trusthop-reason", b"forged")], None)  # malformed too
    incoming = len(broker.messages("kafka:orders"))
    store = MemoryReplayStore()
    handler = Recorder(e1=["fail"], e2=["fail"] * 3, e3=["crash"], e4=["fail", "crash"])
    settled = 0
    for _ in range(3):  # the consumer crashes twice and restarts
        consumer = _consumer_with(broker, replay_store=store, max_attempts=3)
        try:
            settled += asyncio.run(consumer.drain(handler))
        except ConsumerCrash:
            continue
        break
    handled = handler.handled
    assert sorted(handled) == ["e0", "e1", "e3", "e4"]  # each exactly once
    assert sorted(_reasons(broker), key=str) == [
        "handler_failed",
        "malformed",
        "malformed",
        "replayed",
    ]
    assert len(handled) + len(_reasons(broker)) == incoming
    # nothing is left uncommitted on either log
    for log in ("kafka:orders", "kafka:orders.retry"):
        assert broker.committed.get(("g", log), 0) == len(broker.messages(log))
    # e4's retry crashed: it came back as a redelivery of the retry copy
    assert ("e4", "redelivery", 2, True) in handler.calls


def test_another_groups_retry_copies_are_not_its_business() -> None:
    broker = MemoryBroker()
    asyncio.run(_publish(broker, 1))
    verifier = ChainVerifier(BUNDLE)
    flaky = Recorder(e0=["fail"])
    assert asyncio.run(_consumer_with(broker, "flaky", verifier=verifier).drain(flaky)) == 1
    # the retry copy sits in the retry log all groups of the destination read
    (copy,) = broker.messages("kafka:orders.retry")
    assert copy.header(H_CONSUMER) == "flaky"
    steady = Recorder()
    assert asyncio.run(_consumer_with(broker, "steady", verifier=verifier).drain(steady)) == 1
    assert steady.calls == [("e0", "first", 1, False)]  # from the destination, not the copy
    assert flaky.handled == ["e0"] and steady.handled == ["e0"]
    assert broker.messages("kafka:orders.dlq") == []
    assert broker.committed[("steady", "kafka:orders.retry")] == 1
