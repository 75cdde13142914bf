"""Red-team review of the coalesced RabbitMQ acks (``trusthop.amqp.acks``,
``TrustedWorker``), against the model of a channel in ``test_amqp_acks``
(RabbitMQ's outstanding tags; a second ack of a tag closes the channel).

Held (regression): random mixes of handled, slow, hostile and retried
messages, another consumer's tags on the same channel, and a channel lost
mid-way: no tag is acked twice or on another consumer's behalf, no message
is acked before its handler returned, every handled message is settled in
the replay store only after the ack that covered it, nothing is left
outstanding on a live channel.

Broken: acks above a slow handler wait for the ``ack_delay`` timer even
when ``limit`` (half the prefetch window) of them wait, contrary to the
documented "sent one by one ... at once when ``limit`` of them wait, so a
slow handler never holds the prefetch window": with ``ack_delay=60`` and
one slow handler, the prefetch window fills and the queue stalls for up
to a minute.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_amqp_acks import PreconditionFailed, Tagged, WireChannel, junk, make_worker
from test_amqp_shell import encode_amqp, sealed

from trusthop.amqp import Delivery


class CheckedWire(WireChannel):
    """A channel that records every violation of RabbitMQ's rules and of the
    worker's contract at the moment a frame arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.finished: set[int] = set()  # handled messages whose handler returned
        self.handled_tags: set[int] = set()  # tags of messages that reach the handler
        self.violations: list[str] = []

    def settle(self, how: str, tag: int, multiple: bool) -> None:
        covered = [t for t in self.outstanding if t <= tag] if multiple else [tag]
        for t in covered:
            if how == "ack" and t in self.handled_tags and t not in self.finished:
                self.violations.append(f"tag {t} acked before its handler returned")
        try:
            super().settle(how, tag, multiple)
        except PreconditionFailed as exc:  # a tag settled twice, or never ours
            self.violations.append(f"{how} of tag {tag}: {exc}")
            raise


KINDS = st.sampled_from(["ok", "ok", "ok", "slow", "junk", "fail", "foreign"])


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(KINDS, min_size=1, max_size=14),
    seed=st.integers(0, 2**16),
    ack_delay=st.sampled_from([60.0, 0.001]),
    prefetch=st.sampled_from([1, 4, 16]),
    lose_channel=st.booleans(),
)
def test_coalesced_acks_never_break_the_delivery_contract(
    kinds: list[str], seed: int, ack_delay: float, prefetch: int, lose_channel: bool
) -> None:
    asyncio.run(_scenario(kinds, seed, ack_delay, prefetch, lose_channel))


async def _scenario(
    kinds: list[str], seed: int, ack_delay: float, prefetch: int, lose_channel: bool
) -> None:
    rng = random.Random(seed)
    failing = {f"rt-{n}" for n, kind in enumerate(kinds) if kind == "fail"}
    worker, channel, _ = await make_worker(
        ack_delay=ack_delay, prefetch_count=prefetch, fail=failing
    )
    wire = CheckedWire()
    original = worker._routes["billing"].handler
    gates: dict[int, asyncio.Event] = {}

    async def handler(delivery: Delivery) -> None:
        tag = delivery.message.delivery_tag  # type: ignore[attr-defined]
        gate = gates.get(tag)
        if gate is not None:
            await gate.wait()
        await original(delivery)  # raises for "fail" on its first attempt
        wire.finished.add(tag)

    object.__setattr__(worker._routes["billing"], "handler", handler)
    admission = worker.admissions["billing"]
    settle = admission.settle
    acked_then_settled: list[int] = []

    async def checked_settle(admitted: Any) -> None:
        # The admitted event's id names the message: its tag must be settled already.
        event_id = admitted.trusted.event.get_id()
        tag = ids[event_id]
        if tag not in wire.settled and not wire.is_closed:
            wire.violations.append(f"tag {tag} settled in the store before its ack")
        acked_then_settled.append(tag)
        await settle(admitted)

    admission.settle = checked_settle  # type: ignore[method-assign]
    ids: dict[str, int] = {}
    foreign: list[int] = []
    tasks = []
    lost_at = rng.randrange(len(kinds) + 1) if lose_channel else None
    for n, kind in enumerate(kinds):
        if n == lost_at:
            wire.is_closed = True
        if kind == "foreign":
            foreign.append(wire.deliver())
            continue
        if kind == "junk":
            message: Tagged = junk(wire)
            message.__class__ = Tagged
        else:
            headers, body, content_type = encode_amqp(sealed(event_id=f"rt-{n}"))
            message = Tagged(wire, body, dict(headers), content_type=content_type)
            ids[f"rt-{n}"] = message.delivery_tag
            if kind in ("ok", "slow"):
                wire.handled_tags.add(message.delivery_tag)
            if kind == "slow":
                gates[message.delivery_tag] = asyncio.Event()
        tasks.append(asyncio.create_task(channel.deliver("billing", message)))
        for _ in range(rng.randrange(3)):
            await asyncio.sleep(0)
    for tag in rng.sample(sorted(gates), len(gates)):
        for _ in range(rng.randrange(4)):
            await asyncio.sleep(0)
        if rng.random() < 0.3:
            await asyncio.sleep(0.002)  # let a short ack timer fire meanwhile
        gates[tag].set()
    await asyncio.gather(*tasks)
    await worker.stop()

    assert wire.violations == []
    assert not any(t in wire.settled for t in foreign), "another consumer's tag was settled"
    if lost_at is None:
        ours = sorted(set(range(1, wire.next_tag)) - set(foreign))
        assert sorted(wire.settled) == ours and set(wire.settled.values()) == {"ack"}
        assert wire.outstanding == foreign
        # Every admitted message (handled, or retried) was settled in the store.
        assert sorted(acked_then_settled) == sorted(ids.values())


async def test_a_slow_handler_does_not_hold_the_prefetch_window_until_the_timer() -> None:
    """prefetch 8 (limit 4), ack_delay 60: the first message's handler blocks;
    the next seven are handled. The acks of those seven must go out without
    waiting a minute for the timer: otherwise the channel has eight unacked
    deliveries, RabbitMQ sends no more, and the queue stalls."""
    worker, channel, _ = await make_worker(ack_delay=60, prefetch_count=8)
    wire = WireChannel()
    release = asyncio.Event()
    headers, body, content_type = encode_amqp(sealed(event_id="slow"))
    slow = Tagged(wire, body, dict(headers), content_type=content_type)
    original = worker._routes["billing"].handler

    async def handler(delivery: Delivery) -> None:
        if delivery.message is slow:
            await release.wait()
        await original(delivery)

    object.__setattr__(worker._routes["billing"], "handler", handler)
    first = asyncio.create_task(channel.deliver("billing", slow))
    await asyncio.sleep(0)
    for n in range(7):
        headers, body, content_type = encode_amqp(sealed(event_id=f"quick-{n}"))
        await channel.deliver(
            "billing", Tagged(wire, body, dict(headers), content_type=content_type)
        )
    for _ in range(10):  # the batcher's task runs; no timer can have fired (60 s)
        await asyncio.sleep(0)
    try:
        # At least the first `limit` (4) acks above the slow delivery are sent.
        assert len(wire.outstanding) <= 1 + 3, wire.outstanding
        assert 1 in wire.outstanding  # the slow one is never covered
    finally:
        release.set()
        await first
        await worker.stop()
    assert wire.outstanding == []
