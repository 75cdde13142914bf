"""Coalesced acknowledgements: many ``basic.ack`` in one, when AMQP makes it safe.

AMQP 0-9-1 numbers deliveries per channel (``delivery_tag`` 1, 2, 3, ...,
shared by every consumer and ``basic.get`` on that channel) and lets one
``basic.ack`` with ``multiple=True`` settle every outstanding delivery up to
a tag. One frame (and one socket write) then stands for a run of messages.
:class:`AckBatcher` does that for the worker without changing what an ack
means: a message is acked only after its handler returned, and only the
messages handed to :meth:`AckBatcher.ack` are ever acked by it.

A multiple ack up to tag ``T`` is sent only when it is safe:

* every delivery of the channel so far was tracked here, in order (tags 1,
  2, 3, ... without a gap). A gap means another consumer (or ``basic.get``)
  on the same channel owns a tag, which a multiple ack would settle for it:
  from then on that channel gets one ack per message, sent at once;
* no tracked delivery below ``T`` is still in progress (its handler runs,
  or it will be rejected, requeued or acked on its own), and ``T`` itself
  waits for its ack (acking a tag twice closes the channel).

Pending acks are sent by one background task, so sends of a channel never
overtake each other and message tasks never wait for them: when ``limit``
of them wait, and ``delay`` seconds after the first one at most. When a
delivery in progress blocks the run (a slow handler), the acks above it are
sent one by one on the timer (or at once when ``limit`` of them wait), so a
slow handler never holds the prefetch window. :meth:`AckBatcher.close`
sends everything still pending.

Failure modes: an ack that cannot be sent (channel or connection lost)
settles nothing; its messages are redelivered by the broker, flagged
``redelivered``. ``on_acked`` is told (after the frame was written) which
messages an ack covered, ``on_lost`` which ones it could not. A crash loses
at most the pending acks: those messages are redelivered, which is the
at-least-once contract of an ack after the handler.

Messages that are not aio-pika deliveries (no integer ``delivery_tag``, no
channel) are not tracked: :meth:`AckBatcher.track` returns ``None`` and the
caller acks them itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aio_pika.abc import AbstractIncomingMessage

T = TypeVar("T")

log = logging.getLogger(__name__)

DEFAULT_ACK_DELAY = 0.005
"""Seconds a pending ack waits at most."""


class ChannelLost(Exception):
    """The channel of pending acks is gone; the broker redelivers their messages."""


@dataclass(eq=False)
class _Window(Generic[T]):
    """The tracked deliveries of one AMQP channel."""

    channel: Any
    exclusive: bool = True  # every tag of the channel so far was ours, in order
    last: int = 0
    inflight: set[int] = field(default_factory=set)
    # tag -> (message, token), in the order the acks were handed over.
    pending: dict[int, tuple[AbstractIncomingMessage, T]] = field(default_factory=dict)
    dead: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class Slot(Generic[T]):
    """One tracked delivery (see :meth:`AckBatcher.track`)."""

    window: _Window[T]
    tag: int
    message: AbstractIncomingMessage

    @property
    def handed_over(self) -> bool:
        """Its ack was handed to the batcher (pending or sent), or it was released."""
        return self.tag not in self.window.inflight


class AckBatcher(Generic[T]):
    """Acks tracked deliveries many at a time (see the module docstring).

    Args:
        on_acked: awaited with the tokens of the messages an ack covered,
            after it was written to the connection; exceptions are logged.
        on_lost: called with the tokens of the messages whose ack could not
            be sent, and the error; the broker redelivers those messages.
        limit: pending acks of a channel that trigger a send at once.
        delay: seconds a pending ack waits at most.

    Raises:
        ValueError: ``limit`` below 1 or a negative ``delay``.
    """

    def __init__(
        self,
        *,
        on_acked: Callable[[list[T]], Awaitable[None]],
        on_lost: Callable[[list[T], BaseException], None],
        limit: int = 32,
        delay: float = DEFAULT_ACK_DELAY,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if delay < 0:
            raise ValueError("delay must not be negative")
        self.limit = limit
        self.delay = delay
        self._on_acked = on_acked
        self._on_lost = on_lost
        self._windows: dict[int, _Window[T]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._wake: asyncio.Event | None = None
        self._force = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.frames = 0
        """``basic.ack`` frames sent (for measurements)."""
        self.acked = 0
        """Messages acked through this batcher."""

    def track(self, message: AbstractIncomingMessage) -> Slot[T] | None:
        """Start tracking ``message`` (call first thing, in delivery order).

        Returns ``None`` for a message that cannot be batched (no integer
        delivery tag, or its channel is gone): ack it yourself. Every slot
        returned must end in :meth:`ack` or :meth:`release`. Never raises.
        """
        tag = getattr(message, "delivery_tag", None)
        if type(tag) is not int or tag < 1:
            return None
        try:
            channel = message.channel
        except Exception:  # closed channel, or a stand-in message without one
            return None
        window = self._windows.get(id(channel))
        if window is None or window.channel is not channel or window.dead:
            self._prune()
            window = _Window(channel)
            self._windows[id(channel)] = window
        if tag != window.last + 1:
            # Another consumer or basic.get on this channel owns the tags in
            # between (or they came out of order): a multiple ack could settle
            # a message that is not ours. One ack per message from now on.
            window.exclusive = False
        window.last = max(window.last, tag)
        window.inflight.add(tag)
        return Slot(window, tag, message)

    def release(self, slot: Slot[T]) -> None:
        """``slot``'s delivery was settled another way (acked, rejected or
        requeued by itself, its handler, or the broker): stop tracking it.
        Call only once that settlement was sent. Idempotent; never raises."""
        slot.window.inflight.discard(slot.tag)

    def ack(self, slot: Slot[T], token: T) -> None:
        """Ack ``slot``'s delivery with the next batch; ``token`` goes to
        ``on_acked`` (or ``on_lost``) once that is known. Does not wait.

        Raises:
            RuntimeError: the slot was already acked or released (a bug).
        """
        window = slot.window
        if slot.tag not in window.inflight:
            raise RuntimeError("ack of a delivery that is not in progress")
        window.inflight.discard(slot.tag)
        window.pending[slot.tag] = (slot.message, token)
        if window.dead:
            self._lose(window, ChannelLost("the channel of this delivery was closed"))
        elif not window.exclusive:
            self._kick(force=True)  # one ack per message, sent at once
        elif len(window.pending) >= self.limit:
            self._kick(force=False)
        else:
            self._arm()

    async def close(self) -> None:
        """Send every pending ack and wait for it (call once no delivery is
        in progress any more). The batcher may be used again afterwards."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._task
        if task is None and any(w.pending for w in self._windows.values()):
            self._kick(force=True)
            task = self._task
        if task is not None:
            self._closing = True
            self._kick(force=True)
            try:
                await asyncio.shield(task)
            finally:
                self._closing = False
        self._prune()

    @property
    def pending(self) -> int:
        """Acks waiting to be sent."""
        return sum(len(w.pending) for w in self._windows.values())

    def _arm(self) -> None:
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._kick(force=True)

    def _kick(self, *, force: bool) -> None:
        self._force = self._force or force
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """The one task that sends acks: wakes on a kick, sends what is
        safe, goes back to sleep (or ends, when closing and nothing is left)."""
        assert self._wake is not None
        wake = self._wake
        while True:
            await wake.wait()
            wake.clear()
            force, self._force = self._force, False
            for window in list(self._windows.values()):
                await self._flush(window, force=force or self._closing)
            if self._closing and not self.pending:
                return
            if self.pending:
                self._arm()

    async def _flush(self, window: _Window[T], *, force: bool) -> None:
        """Send the pending acks of ``window`` that are safe to send now.

        The run below the lowest delivery in progress goes as one multiple
        ack; with ``force``, the acks above it go one by one. Acks handed
        over while this sends wait for the next kick (``limit`` or timer),
        so they are batched too.
        """
        waiting = list(window.pending)
        if waiting and not window.dead and window.exclusive:
            low = min(window.inflight) if window.inflight else None
            below = [t for t in waiting if low is None or t < low]
            if below:
                await self._send(window, below)
        # Blocked by a delivery in progress (a slow handler): one by one, on
        # the timer, or at once when ``limit`` of them wait, so that a slow
        # handler never holds the prefetch window until the timer.
        if force or not window.exclusive or len(window.pending) >= self.limit:
            for tag in waiting:  # blocked by a delivery in progress: one by one
                if window.dead:
                    break
                if tag in window.pending:
                    await self._send(window, [tag])
        if window.dead:
            self._lose(window, ChannelLost("the channel of these deliveries was closed"))

    async def _send(self, window: _Window[T], tags: list[int]) -> None:
        """Ack ``tags`` (taken from ``window.pending``) with one frame: the
        highest of them, with ``multiple`` when there are several."""
        entries = {tag: window.pending.pop(tag) for tag in tags}
        message = entries[max(tags)][0]
        tokens = [token for _, token in entries.values()]
        try:
            await message.ack(multiple=len(tags) > 1)
        except BaseException as exc:  # channel or connection lost: nothing acked
            window.dead = True
            self._on_lost(tokens, exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.frames += 1
        self.acked += len(tokens)
        try:
            await self._on_acked(tokens)
        except Exception:
            log.exception("trusthop: recording acked deliveries failed")

    def _lose(self, window: _Window[T], error: BaseException) -> None:
        if window.pending:
            tokens = [token for _, token in window.pending.values()]
            window.pending.clear()
            self._on_lost(tokens, error)

    def _prune(self) -> None:
        """Forget windows of dead or closed channels once nothing is left in them."""
        for key, window in list(self._windows.items()):
            closed = window.dead or bool(getattr(window.channel, "is_closed", False))
            if closed:
                self._lose(window, ChannelLost("the channel of these deliveries was closed"))
                if not window.inflight:
                    del self._windows[key]


__all__ = ["DEFAULT_ACK_DELAY", "AckBatcher", "ChannelLost", "Slot"]
