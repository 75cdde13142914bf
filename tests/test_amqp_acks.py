"""Coalesced acks of the AMQP worker (trusthop.amqp.acks), against a model of
how RabbitMQ settles delivery tags: each test tries to make a multiple ack
settle something it must not (another consumer's message, a message still
being handled, a dead-lettered one, a tag twice), or a crash lose a message."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiormq.exceptions import ChannelInvalidStateError
from test_amqp_shell import (
    VERIFIER,
    Delivery,
    FakeIncoming,
    LadderChannel,
    encode_amqp,
    sealed,
)

from trusthop.amqp import TrustedWorker
from trusthop.amqp.acks import AckBatcher
from trusthop.pipeline import H_REASON
from trusthop.replay import DeliveryKind
from trusthop.stores import MemoryReplayStore


class PreconditionFailed(Exception):
    """RabbitMQ closes the channel: ``PRECONDITION_FAILED - unknown delivery tag``."""


class WireChannel:
    """RabbitMQ's side of one channel: the outstanding delivery tags (every
    consumer's), and what settled each of them."""

    def __init__(self) -> None:
        self.next_tag = 1
        self.outstanding: list[int] = []
        self.settled: dict[int, str] = {}
        self.frames: list[tuple[str, int, bool]] = []
        self.is_closed = False

    def deliver(self) -> int:
        tag = self.next_tag
        self.next_tag += 1
        self.outstanding.append(tag)
        return tag

    def settle(self, how: str, tag: int, multiple: bool) -> None:
        if self.is_closed:
            raise ChannelInvalidStateError("channel closed")
        if tag not in self.outstanding:
            self.is_closed = True
            raise PreconditionFailed(f"unknown delivery tag {tag}")
        covered = [t for t in self.outstanding if t <= tag] if multiple else [tag]
        for t in covered:
            self.outstanding.remove(t)
            self.settled[t] = how
        self.frames.append((how, tag, multiple))

    def acked(self) -> list[int]:
        return sorted(t for t, how in self.settled.items() if how == "ack")


class Tagged(FakeIncoming):
    """A delivery with a tag on a :class:`WireChannel`, settled the way aio-pika does."""

    def __init__(self, wire: WireChannel, body: bytes, headers: dict[str, Any], **kw: Any) -> None:
        super().__init__(body, headers, **kw)
        self.wire = wire
        self.delivery_tag = wire.deliver()

    @property
    def channel(self) -> WireChannel:
        if self.wire.is_closed:
            raise ChannelInvalidStateError("channel closed")
        return self.wire

    async def ack(self, multiple: bool = False) -> None:  # type: ignore[override]
        self.wire.settle("ack", self.delivery_tag, multiple)
        self.settled.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.wire.settle("requeue" if requeue else "drop", self.delivery_tag, False)
        self.settled.append("requeue" if requeue else "drop")

    async def reject(self, requeue: bool = False) -> None:
        await self.nack(requeue=requeue)

    def again_on(self, wire: WireChannel) -> Tagged:
        """The same message as the broker redelivers it on ``wire``."""
        return Tagged(
            wire,
            self.body,
            dict(self.headers),
            redelivered=True,
            exchange=self.exchange,
            routing_key=self.routing_key,
            content_type=self.content_type,
        )


SEALED = [sealed(event_id=f"evt-{n}") for n in range(6)]


def event(wire: WireChannel, n: int, **kw: Any) -> Tagged:
    headers, body, content_type = encode_amqp(SEALED[n])
    return Tagged(wire, body, dict(headers), content_type=content_type, **kw)


def junk(wire: WireChannel) -> Tagged:
    return Tagged(wire, b"not a cloudevent", {"app": "x"})


async def make_worker(
    *, store: MemoryReplayStore | None = None, fail: set[str] | None = None, **options: Any
) -> tuple[TrustedWorker, LadderChannel, list[Delivery]]:
    channel = LadderChannel([])
    fake: Any = channel
    replay_store = MemoryReplayStore() if store is None else store
    worker = TrustedWorker(fake, verifier=VERIFIER, replay_store=replay_store, **options)
    calls: list[Delivery] = []

    @worker.handler("billing")
    async def handle(delivery: Delivery) -> None:
        calls.append(delivery)
        if str(delivery.event.get_id()) in (fail or set()) and delivery.attempt == 1:
            raise RuntimeError("boom")

    await worker.start()
    return worker, channel, calls


async def open_count(worker: TrustedWorker, n: int) -> int:
    """How many accepted deliveries of event ``n`` the store counts as open."""
    from trusthop.replay import Sighting, sighting_key

    chain = VERIFIER.prepare(SEALED[n])[1]
    store = worker.replay_store
    assert store is not None
    value = await store.get(sighting_key("amqp/billing", chain))
    assert value is not None
    return Sighting.decode(value).open


async def test_a_run_of_handled_messages_is_acked_by_one_multiple_ack_then_settled() -> None:
    worker, channel, calls = await make_worker(ack_delay=60)
    wire = WireChannel()
    for n in range(5):
        await channel.deliver("billing", event(wire, n))
    assert len(calls) == 5 and wire.frames == []  # handled; acks wait for the batch
    assert worker.stats.delivered == 0 and await open_count(worker, 0) == 1
    await worker.stop()
    assert wire.frames == [("ack", 5, True)] and wire.acked() == [1, 2, 3, 4, 5]
    assert worker.stats.delivered == 5
    assert [await open_count(worker, n) for n in range(5)] == [0] * 5  # settled after the ack


async def test_half_the_prefetch_window_is_acked_without_waiting_for_the_timer() -> None:
    worker, channel, _ = await make_worker(ack_delay=60, prefetch_count=8)
    wire = WireChannel()
    for n in range(4):
        await channel.deliver("billing", event(wire, n))
    await asyncio.sleep(0.01)
    assert wire.frames == [("ack", 4, True)]
    await worker.stop()


async def test_the_timer_sends_acks_that_wait() -> None:
    worker, channel, _ = await make_worker(ack_delay=0.01)
    wire = WireChannel()
    await channel.deliver("billing", event(wire, 0))
    await asyncio.sleep(0.05)
    assert wire.frames == [("ack", 1, False)] and worker.stats.delivered == 1
    await worker.stop()


async def test_a_hostile_message_between_valid_ones_is_dead_lettered_and_acked_once() -> None:
    worker, channel, calls = await make_worker(ack_delay=60)
    wire = WireChannel()
    for message in (event(wire, 0), event(wire, 1), junk(wire), event(wire, 2), event(wire, 3)):
        await channel.deliver("billing", message)
    await worker.stop()
    assert len(calls) == 4 and wire.outstanding == []
    assert wire.settled == {1: "ack", 2: "ack", 3: "ack", 4: "ack", 5: "ack"}
    # The dead letter's ack went on its own, at once; the handled ones in one frame.
    assert wire.frames == [("ack", 3, False), ("ack", 5, True)]
    (letter,) = channel.dlx.published
    assert letter.headers[H_REASON] == "malformed"


async def test_another_consumers_tag_on_the_channel_is_never_acked() -> None:
    worker, channel, _ = await make_worker(ack_delay=60)
    wire = WireChannel()
    await channel.deliver("billing", event(wire, 0))
    foreign = wire.deliver()  # the user's own consumer on the same channel
    for n in (1, 2):
        await channel.deliver("billing", event(wire, n))
    await worker.stop()
    assert wire.outstanding == [foreign]  # only the other consumer can settle it
    assert wire.frames == [("ack", 1, False), ("ack", 3, False), ("ack", 4, False)]


async def test_a_channel_that_did_not_start_at_tag_1_gets_one_ack_per_message() -> None:
    worker, channel, _ = await make_worker(ack_delay=60)
    wire = WireChannel()
    earlier = wire.deliver()  # a basic.get before the worker started, never acked
    for n in range(3):
        await channel.deliver("billing", event(wire, n))
    await worker.stop()
    assert wire.outstanding == [earlier] and wire.acked() == [2, 3, 4]
    assert [multiple for _, _, multiple in wire.frames] == [False, False, False]


async def test_a_message_still_being_handled_is_not_covered_by_a_multiple_ack() -> None:
    worker, channel, _ = await make_worker(ack_delay=0.01)
    release = asyncio.Event()
    slow_wire = WireChannel()
    slow = event(slow_wire, 0)

    original = worker._routes["billing"].handler

    async def handler(delivery: Delivery) -> None:
        if delivery.message is slow:
            await release.wait()
        await original(delivery)

    object.__setattr__(worker._routes["billing"], "handler", handler)
    first = asyncio.create_task(channel.deliver("billing", slow))
    await asyncio.sleep(0)
    for n in range(1, 4):
        await channel.deliver("billing", event(slow_wire, n))
    await asyncio.sleep(0.05)  # the timer: the acks above the slow one go one by one
    assert slow_wire.outstanding == [1]
    assert sorted(tag for _, tag, _ in slow_wire.frames) == [2, 3, 4]
    assert all(not multiple for _, _, multiple in slow_wire.frames)
    release.set()
    await first
    await worker.stop()
    assert slow_wire.outstanding == [] and slow_wire.acked() == [1, 2, 3, 4]


async def test_a_crash_with_acks_outstanding_redelivers_them_as_redeliveries() -> None:
    store = MemoryReplayStore()
    worker, channel, calls = await make_worker(store=store, ack_delay=60)
    wire = WireChannel()
    sent = [event(wire, n) for n in range(4)]
    for message in sent:
        await channel.deliver("billing", message)
    assert wire.frames == [] and len(calls) == 4
    wire.is_closed = True  # the connection dies before the coalesced ack is sent
    await worker.stop()
    assert worker.stats.delivered == 0 and worker.stats.requeued == 4

    # RabbitMQ redelivers the four, flagged, to the next worker sharing the store.
    second, channel2, again = await make_worker(store=store, ack_delay=60)
    wire2 = WireChannel()
    for message in sent:
        await channel2.deliver("billing", message.again_on(wire2))
    await second.stop()
    assert [(d.kind, d.redelivered) for d in again] == [(DeliveryKind.REDELIVERY, True)] * 4
    assert wire2.acked() == [1, 2, 3, 4] and second.stats.total_dead_lettered == 0
    # Now settled: a copy flagged redelivered (consumed and nacked by someone
    # else on the queue) is a replay, not another redelivery.
    wire3 = WireChannel()
    third, channel3, late = await make_worker(store=store, ack_delay=60)
    await channel3.deliver("billing", sent[0].again_on(wire3))
    await third.stop()
    assert late == [] and channel3.dlx.published[-1].headers[H_REASON] == "replayed"


async def test_a_redelivered_copy_of_a_message_acked_by_a_multiple_ack_is_a_replay() -> None:
    store = MemoryReplayStore()
    worker, channel, _ = await make_worker(store=store, ack_delay=60)
    wire = WireChannel()
    sent = [event(wire, n) for n in range(3)]
    for message in sent:
        await channel.deliver("billing", message)
    await asyncio.sleep(0)
    await worker.stop()
    assert wire.frames == [("ack", 3, True)]
    second, channel2, again = await make_worker(store=store, ack_delay=60)
    wire2 = WireChannel()
    await channel2.deliver("billing", sent[1].again_on(wire2))
    await second.stop()
    assert again == [] and channel2.dlx.published[-1].headers[H_REASON] == "replayed"
    assert wire2.acked() == [1]


async def test_retries_and_handler_acks_are_never_acked_twice() -> None:
    worker, channel, _ = await make_worker(ack_delay=60, fail={"evt-1"})
    wire = WireChannel()
    for n in range(3):
        await channel.deliver("billing", event(wire, n))
    await worker.stop()
    # evt-1 failed: its retry copy was confirmed and it was acked on its own.
    assert wire.outstanding == [] and len(channel.default_exchange.published) == 1
    assert sorted(wire.settled) == [1, 2, 3] and set(wire.settled.values()) == {"ack"}
    assert ("ack", 2, False) in wire.frames
    assert worker.stats.delivered == 2 and worker.stats.retried == 1


async def test_a_handler_that_acks_itself_is_not_acked_again() -> None:
    channel = LadderChannel([])
    fake: Any = channel
    worker = TrustedWorker(fake, verifier=VERIFIER, ack_delay=60)

    @worker.handler("billing")
    async def handle(delivery: Delivery) -> None:
        await delivery.message.ack()

    await worker.start()
    wire = WireChannel()
    for n in range(3):
        await channel.deliver("billing", event(wire, n))
    await worker.stop()
    assert wire.frames == [("ack", 1, False), ("ack", 2, False), ("ack", 3, False)]
    assert worker.stats.delivered == 3


async def test_ack_delay_zero_acks_every_message_at_once() -> None:
    worker, channel, _ = await make_worker(ack_delay=0)
    wire = WireChannel()
    for n in range(3):
        await channel.deliver("billing", event(wire, n))
        assert wire.frames[-1] == ("ack", n + 1, False)
    await worker.stop()


@pytest.mark.parametrize("bad", [-1, float("inf"), float("nan")])
def test_a_nonsense_ack_delay_is_refused(bad: float) -> None:
    fake: Any = LadderChannel([])
    with pytest.raises(ValueError, match="ack_delay"):
        TrustedWorker(fake, verifier=VERIFIER, ack_delay=bad)


async def test_the_batcher_refuses_a_double_ack_and_out_of_order_tags_turn_multiple_off() -> None:
    acked: list[list[int]] = []

    async def on_acked(tokens: list[int]) -> None:
        acked.append(tokens)

    batcher: AckBatcher[int] = AckBatcher(on_acked=on_acked, on_lost=lambda t, e: None, limit=99)
    wire = WireChannel()
    messages = [Tagged(wire, b"", {}) for _ in range(3)]
    slots = [batcher.track(m) for m in (messages[1], messages[0], messages[2])]
    assert all(slot is not None for slot in slots)
    for n, slot in enumerate(slots):
        assert slot is not None
        batcher.ack(slot, n)
        with pytest.raises(RuntimeError):
            batcher.ack(slot, n)
    await batcher.close()
    assert [multiple for _, _, multiple in wire.frames] == [False, False, False]
    assert wire.acked() == [1, 2, 3] and sorted(t for ts in acked for t in ts) == [0, 1, 2]
    assert batcher.track(FakeIncoming(b"", {})) is None  # no delivery tag: not batched
