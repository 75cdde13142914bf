"""trusthop.admission: verification plus replay rules, attacked.

The store here is the in-memory one (real code, no mock); the Redis store
runs the same rules against a real Redis in integration/test_redis_store.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import pytest
from chainkit import (
    BUNDLE,
    DEST1,
    DEST2,
    EDGE,
    NOW,
    ORDERS_ID,
    FixedClock,
    Story,
    build_story,
    count_signature_checks,
    encode_segments,
    make_bundle,
    sign_ring,
)
from policykit import policy

from trusthop.admission import Admission
from trusthop.chain import Chain
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.pipeline import ChainVerifier
from trusthop.replay import DeliveryInfo, DeliveryKind, Sighting, sighting_key
from trusthop.stores import Change, MemoryReplayStore, StoreError
from trusthop.verify import Limits

K = DeliveryKind


def wire_of(story: Story) -> WireEvent:
    wire = dataclasses.replace(story.e2)
    wire.chain = story.encoded
    return wire


def make(clock: FixedClock, *, store: object = "memory", limits: Limits = Limits(),
         **kwargs: object) -> Admission:
    verifier = ChainVerifier(BUNDLE, clock=clock, limits=limits)
    chosen = MemoryReplayStore() if store == "memory" else store
    return Admission(verifier, scope="kafka/g1", store=chosen, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def signatures(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per ``PublicKey.verify`` call (signature checks, counted)."""
    return count_signature_checks(monkeypatch)


async def reason_of(coro: object) -> Reason:
    with pytest.raises(TrustError) as caught:
        await coro  # type: ignore[misc]
    return caught.value.reason


async def test_first_then_redelivery_then_replay(story: Story, clock: FixedClock) -> None:
    adm = make(clock)
    wire = wire_of(story)
    first = await adm.admit(wire, DEST2, DeliveryInfo(id="payments/0@1"))
    assert first is not None and first.kind is K.FIRST and not first.redelivered
    again = await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="payments/0@1"))
    assert again is not None and again.kind is K.REDELIVERY and again.redelivered
    assert await reason_of(adm.admit(wire_of(story), DEST2,
                                     DeliveryInfo(id="payments/3@1"))) is Reason.REPLAYED
    c = adm.counters.as_dict()
    assert (c["verified"], c["redelivered"], c["rejected"]) == (2, 1, {"replayed": 1})
    assert c["replayed"] == 1 and c["duplicates"] == 0


async def test_replay_skip_mode_returns_none(story: Story, clock: FixedClock) -> None:
    adm = make(clock, on_replay="skip")
    assert await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="a")) is not None
    assert await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="b")) is None
    c = adm.counters.as_dict()
    assert (c["duplicates"], c["replayed"], c["rejected"]) == (1, 1, {})


async def test_redelivery_skips_signatures_but_not_time_waited(
    story: Story, clock: FixedClock, signatures: list[int]
) -> None:
    adm = make(clock, limits=Limits(max_age=30, leeway=0))
    cache = adm.verifier.signature_cache
    assert cache is not None
    await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="x"))
    signatures.clear()
    misses = cache.misses
    clock.now = NOW + 10 * 24 * 3600  # ten days later, long past every window
    again = await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="x"))
    assert again is not None and again.kind is K.REDELIVERY
    assert cache.misses == misses and cache.hits == 0  # the cache is not even asked
    assert signatures == []  # no signature checked at all
    # The same event as a new delivery is judged now: expired.
    fresh = make(clock, limits=Limits(max_age=30, leeway=0))
    assert await reason_of(fresh.admit(wire_of(story), DEST2, DeliveryInfo(id="y"))) is (
        Reason.EXPIRED)


async def test_max_age_limits_first_deliveries(story: Story, clock: FixedClock) -> None:
    newest = story.chain.newest
    clock.now = newest.iat + 5 + 2
    assert await reason_of(make(clock, limits=Limits(max_age=5, leeway=1)).admit(
        wire_of(story), DEST2)) is Reason.EXPIRED
    clock.now = newest.iat + 5 + 1
    assert await make(clock, limits=Limits(max_age=5, leeway=1)).admit(
        wire_of(story), DEST2) is not None


async def test_revocation_applies_to_redeliveries_and_retries(
    story: Story, clock: FixedClock
) -> None:
    adm = make(clock)
    first = await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="x"))
    assert first is not None
    await adm.schedule_retry(first, 2)
    adm.verifier.bundle = make_bundle(revoked_actors=[ORDERS_ID])
    assert await reason_of(adm.admit(wire_of(story), DEST2, DeliveryInfo(id="x"))) is (
        Reason.REVOKED)
    assert await reason_of(adm.admit(wire_of(story), DEST2, DeliveryInfo(id="r", retry=2))) is (
        Reason.REVOKED)


async def test_policy_is_rechecked_on_redelivery(story: Story, clock: FixedClock) -> None:
    adm = make(clock)
    await adm.admit(wire_of(story), DEST2, DeliveryInfo(redelivered=False))
    adm.verifier.policy = policy(
        'version = 1\ndefault = "allow"\ntrust_domain = "prod.example.com"\n'
        'levels = ["untrusted", "internal"]\n'
        '[[segments]]\nname = "shop"\nnamespace = "shop"\ndeny = ["*"]\n'
    )
    assert await reason_of(adm.admit(wire_of(story), DEST2, DeliveryInfo(redelivered=True))) is (
        Reason.SEGMENT_QUARANTINED)


async def test_tampered_redelivery_is_still_caught(story: Story, clock: FixedClock) -> None:
    """Skipping signatures on a redelivery must not let a copy with the same
    newest ring but other data, another destination, or an altered earlier
    ring through."""
    adm = make(clock)
    await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="x"))
    tampered = wire_of(story)
    tampered.data = b'{"amount":1,"order":42}'
    assert await reason_of(adm.admit(tampered, DEST2, DeliveryInfo(id="x"))) is (
        Reason.EVENT_MISMATCH)
    assert await reason_of(adm.admit(wire_of(story), DEST1, DeliveryInfo(id="x"))) is (
        Reason.WRONG_DESTINATION)
    # Ring 1 re-signed with wider scope by its real key; ring 2's bytes kept
    # as they are (Chain(...) would re-encode it after the new ring 1).
    wider = sign_ring(dataclasses.replace(story.chain.hops[0], scope=story.origin.scope), EDGE,
                      Chain(story.origin))
    r0, _, r2 = story.chain.ring_bytes
    swapped = wire_of(story)
    swapped.chain = encode_segments([r0, Chain(story.origin, (wider,)).ring_bytes[1], r2])  # type: ignore[arg-type]
    assert await reason_of(adm.admit(swapped, DEST2, DeliveryInfo(id="x"))) is (
        Reason.BROKEN_LINK)


async def test_forged_retry_and_redelivered_flags_do_not_skip_verification(
    other_story: Story, clock: FixedClock
) -> None:
    """Flags on a message never seen in this scope lead to a full first
    verification: a forged signature is caught."""
    adm = make(clock)
    wire = wire_of(other_story)
    rings = list(other_story.chain.rings)
    rings[2] = dataclasses.replace(rings[2], signature=bytes(64))
    wire.chain = Chain(other_story.chain.origin, (rings[1], rings[2])).encode()  # type: ignore[arg-type]
    for delivery in (DeliveryInfo(redelivered=True), DeliveryInfo(retry=2),
                     DeliveryInfo(id="x", redelivered=True, retry=5)):
        assert await reason_of(adm.admit(wire, DEST2, delivery)) is Reason.BAD_SIGNATURE


async def test_retry_verifies_against_the_remembered_destination(
    story: Story, clock: FixedClock
) -> None:
    adm = make(clock)
    first = await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="payments/0@1"))
    assert first is not None
    await adm.schedule_retry(first, 2)
    retry = await adm.admit(wire_of(story), "amqp:/payments-queue",
                            DeliveryInfo(id="payments.retry/0@0", retry=2))
    assert retry is not None and retry.kind is K.RETRY and retry.redelivered
    assert retry.trusted.context.destination == DEST2
    # The retry cannot be used twice; a retry number never scheduled neither.
    assert await reason_of(adm.admit(wire_of(story), DEST2,
                                     DeliveryInfo(id="payments.retry/1@0", retry=2))) is (
        Reason.REPLAYED)
    assert await reason_of(adm.admit(wire_of(story), DEST2, DeliveryInfo(retry=3))) is (
        Reason.REPLAYED)
    assert adm.counters["retried"] == 1


async def test_a_rejection_is_not_remembered(story: Story, clock: FixedClock) -> None:
    """A copy with tampered data must not claim the ring before the real one."""
    adm = make(clock)
    tampered = wire_of(story)
    tampered.data = b'{"amount":1,"order":42}'
    assert await reason_of(adm.admit(tampered, DEST2, DeliveryInfo(id="a"))) is (
        Reason.EVENT_MISMATCH)
    real = await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="b"))
    assert real is not None and real.kind is K.FIRST


async def test_scopes_are_independent(
    story: Story, clock: FixedClock, signatures: list[int]
) -> None:
    store = MemoryReplayStore()
    verifier = ChainVerifier(BUNDLE, clock=clock)
    groups = [Admission(verifier, scope=f"kafka/g{n}", store=store) for n in (1, 2)]
    paid = []
    for adm in groups:
        before = len(signatures)
        admitted = await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="p/0@0"))
        assert admitted is not None and admitted.kind is K.FIRST
        paid.append(len(signatures) - before)
    assert paid == [3, 0]  # the second group paid no signature
    cache = verifier.signature_cache
    assert cache is not None and (cache.hits, cache.misses) == (1, 1)  # one lookup per chain
    assert groups[1].counters["cache_hits"] == 1


async def test_bounded_multi_use(story: Story, clock: FixedClock) -> None:
    adm = make(clock, max_uses=2)
    for n in range(2):
        admitted = await adm.admit(wire_of(story), DEST2, DeliveryInfo(id=f"p/{n}@0"))
        assert admitted is not None and admitted.kind is K.FIRST
    assert await reason_of(adm.admit(wire_of(story), DEST2, DeliveryInfo(id="p/2@0"))) is (
        Reason.REPLAYED)


async def test_two_replicas_racing_on_copies_accept_one(clock: FixedClock) -> None:
    """Many copies admitted concurrently through one shared store: exactly
    one is accepted; the store's atomic update decides, not the pre-read."""
    story = build_story("txn-race")
    store = SlowStore()
    verifier = ChainVerifier(BUNDLE, clock=clock)
    replicas = [Admission(verifier, scope="kafka/g", store=store) for _ in range(2)]
    results = await asyncio.gather(
        *(replicas[n % 2].admit(wire_of(story), DEST2, DeliveryInfo(id=f"p/{n}@0"))
          for n in range(20)),
        return_exceptions=True,
    )
    accepted = [r for r in results if not isinstance(r, BaseException)]
    rejected = [r for r in results if isinstance(r, TrustError)]
    assert len(accepted) == 1 and len(rejected) == 19
    assert {r.reason for r in rejected} == {Reason.REPLAYED}


class SlowStore(MemoryReplayStore):
    """Every read yields to the loop first, so all copies pre-read "absent"."""

    async def get(self, key: str) -> bytes | None:
        await asyncio.sleep(0)
        return await super().get(key)


class BrokenStore:
    def __init__(self, value: bytes | None = None, fail: bool = True) -> None:
        self.value, self.fail = value, fail

    async def get(self, key: str) -> bytes | None:
        if self.fail:
            raise StoreError("connection refused")
        return self.value

    async def update(self, key: str, change: Change) -> bytes | None:
        raise StoreError("connection refused")


async def test_store_failures_fail_closed(story: Story, clock: FixedClock) -> None:
    assert await reason_of(make(clock, store=BrokenStore()).admit(
        wire_of(story), DEST2)) is Reason.STORE_UNAVAILABLE
    assert await reason_of(make(clock, store=BrokenStore(fail=False)).admit(
        wire_of(story), DEST2)) is Reason.STORE_UNAVAILABLE
    assert await reason_of(make(clock, store=BrokenStore(b"garbage", fail=False)).admit(
        wire_of(story), DEST2)) is Reason.STORE_UNAVAILABLE


async def test_a_full_store_refuses_and_says_so(clock: FixedClock) -> None:
    adm = make(clock, store=MemoryReplayStore(1))
    assert await adm.admit(wire_of(build_story("a")), DEST2) is not None
    with pytest.raises(TrustError) as caught:
        await adm.admit(wire_of(build_story("b")), DEST2)
    assert caught.value.reason is Reason.STORE_UNAVAILABLE
    assert "full" in caught.value.message


async def test_a_sighting_that_expired_mid_flight_is_judged_again(
    story: Story, clock: FixedClock
) -> None:
    """The pre-read saw a sighting (redelivery), the write finds none: the
    delivery is verified again in full, at the current time."""
    store = VanishingStore()
    adm = make(clock, store=store, limits=Limits(max_age=30, leeway=0), remember=0)
    await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="x"))
    clock.now = NOW + 3600
    store.vanish = True
    assert await reason_of(adm.admit(wire_of(story), DEST2, DeliveryInfo(id="x"))) is (
        Reason.EXPIRED)


class VanishingStore(MemoryReplayStore):
    vanish = False

    async def update(self, key: str, change: Change) -> bytes | None:
        if self.vanish:
            self._values.clear()
        return await super().update(key, change)


async def test_without_a_store_every_delivery_is_a_first(story: Story, clock: FixedClock) -> None:
    adm = make(clock, store=None)
    for _ in range(2):
        admitted = await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="x"))
        assert admitted is not None and admitted.kind is K.FIRST and admitted.key == ""


async def test_the_stored_sighting(story: Story, clock: FixedClock) -> None:
    store = MemoryReplayStore()
    adm = make(clock, store=store)
    admitted = await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="p/0@4"))
    assert admitted is not None
    assert admitted.key == sighting_key("kafka/g1", story.chain)
    raw = await store.get(admitted.key)
    assert raw is not None
    sighting = Sighting.decode(raw)
    assert sighting == admitted.sighting
    assert (sighting.first_seen, sighting.destination, sighting.deliveries) == (
        NOW, DEST2, ("p/0@4",))
    assert sighting.expires_at >= NOW + 24 * 3600


@pytest.mark.parametrize("bad", [
    lambda v: Admission(v, scope="s", store=None, max_uses=0),
    lambda v: Admission(v, scope="s", store=None, remember=-1),
    lambda v: Admission(v, scope="s", store=None, on_replay="drop"),
])
def test_admission_refuses_nonsense(bad: Callable[[ChainVerifier], object]) -> None:
    with pytest.raises(ValueError):
        bad(ChainVerifier(BUNDLE))


async def test_schedule_retry_refuses_attempt_one(story: Story, clock: FixedClock) -> None:
    adm = make(clock)
    admitted = await adm.admit(wire_of(story), DEST2)
    assert admitted is not None
    with pytest.raises(ValueError):
        await adm.schedule_retry(admitted, 1)


async def test_fan_out_pays_each_prefix_signature_once(
    story: Story, clock: FixedClock, signatures: list[int]
) -> None:
    """One verified parent, many derived events: the shared prefix is
    verified once per process, each new hop once (signature checks counted;
    cache hits and misses count chains, not rings)."""
    from chainkit import PAYMENTS, make_event

    from trusthop.sign import append_hop

    adm = make(clock)
    n = 25
    for i in range(n):
        wire = make_event(f"derived-{i}", type_="payment.charged", data={"i": i})
        wire.chain = append_hop(PAYMENTS, story.chain, event_digest=wire.digest(),
                                destination="kafka:charges", now=NOW, ttl=60).encode()
        admitted = await adm.admit(wire, "kafka:charges", DeliveryInfo(id=f"charges/0@{i}"))
        assert admitted is not None and admitted.kind is K.FIRST
    prefix = len(story.chain.rings)
    assert len(signatures) == prefix + n  # not n * (prefix + 1)
    c = adm.counters.as_dict()
    assert c["cache_misses"] == 1  # the first derived event: nothing of it known
    assert c["cache_hits"] == n - 1  # the others: their parent, verified with the first


async def test_a_retry_copy_redelivered_after_a_crash(story: Story, clock: FixedClock) -> None:
    """RabbitMQ: the retry copy comes back through the default exchange; the
    worker dies while handling it; the broker redelivers it (flag set). It is
    judged against the remembered destination, not the default exchange."""
    adm = make(clock)
    first = await adm.admit(wire_of(story), DEST2, DeliveryInfo())
    assert first is not None
    await adm.schedule_retry(first, 2)
    retry = await adm.admit(wire_of(story), "amqp:/q", DeliveryInfo(retry=2))
    assert retry is not None and retry.kind is K.RETRY
    again = await adm.admit(wire_of(story), "amqp:/q", DeliveryInfo(redelivered=True, retry=2))
    assert again is not None and again.kind is K.REDELIVERY
    # Without the retry number, the default exchange is not where it was signed for.
    assert await reason_of(adm.admit(wire_of(story), "amqp:/q",
                                     DeliveryInfo(redelivered=True))) is Reason.WRONG_DESTINATION


# --------------------------------------------------------------------------- #
# the store-call timer: armed only when a call waits
# --------------------------------------------------------------------------- #


class StagedStore(MemoryReplayStore):
    """Each call yields to the loop ``pauses`` times, then either answers,
    raises ``error``, or (``hang``) never answers."""

    def __init__(self, pauses: int, *, error: Exception | None = None, hang: bool = False) -> None:
        super().__init__()
        self.pauses, self.error, self.hang = pauses, error, hang
        self.cancelled = 0

    async def _wait(self) -> None:
        for _ in range(self.pauses):
            await asyncio.sleep(0)
        if self.error is not None:
            raise self.error
        if self.hang:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1  # the call itself was cancelled, not dropped
                raise

    async def get(self, key: str) -> bytes | None:
        await self._wait()
        return await super().get(key)

    async def update(self, key: str, change: Change) -> bytes | None:
        await self._wait()
        return await super().update(key, change)


@pytest.mark.parametrize("pauses", [0, 1, 3])
async def test_store_calls_answer_the_same_whether_or_not_they_wait(
    story: Story, clock: FixedClock, pauses: int
) -> None:
    adm = make(clock, store=StagedStore(pauses))
    first = await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="p/0@1"))
    assert first is not None and first.kind is K.FIRST
    again = await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="p/0@1"))
    assert again is not None and again.kind is K.REDELIVERY
    assert await reason_of(adm.admit(wire_of(story), DEST2, DeliveryInfo(id="p/0@2"))) is (
        Reason.REPLAYED
    )


@pytest.mark.parametrize("pauses", [0, 1, 2])
async def test_a_store_that_hangs_after_any_number_of_steps_times_out(
    story: Story, clock: FixedClock, pauses: int
) -> None:
    store = StagedStore(pauses, hang=True)
    adm = make(clock, store=store)
    adm.store_timeout = 0.05
    caught = await asyncio.wait_for(reason_of(adm.admit(wire_of(story), DEST2)), 2)
    assert caught is Reason.STORE_UNAVAILABLE
    assert store.cancelled == 1


@pytest.mark.parametrize("pauses", [0, 1])
async def test_a_store_error_before_or_after_waiting_fails_closed(
    story: Story, clock: FixedClock, pauses: int
) -> None:
    for error in (StoreError("reset"), RuntimeError("client bug")):
        adm = make(clock, store=StagedStore(pauses, error=error))
        assert await reason_of(adm.admit(wire_of(story), DEST2)) is Reason.STORE_UNAVAILABLE


async def test_cancelling_a_delivery_while_the_store_waits_cancels_the_store_call(
    story: Story, clock: FixedClock
) -> None:
    store = StagedStore(1, hang=True)
    adm = make(clock, store=store)
    task = asyncio.create_task(adm.admit(wire_of(story), DEST2))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):  # not turned into store_unavailable
        await task
    assert store.cancelled == 1
    store.hang = False  # the store works again: nothing was left half-done
    assert await adm.admit(wire_of(story), DEST2, DeliveryInfo(id="p/0@1")) is not None
