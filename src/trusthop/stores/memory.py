"""An in-process replay store, bounded, that refuses rather than forgets."""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable

from trusthop.stores.base import Change, StoreFull

DEFAULT_MAX_ENTRIES = 1_000_000
log = logging.getLogger("trusthop.stores")

_HEAP_SLACK = 64


class MemoryReplayStore:
    """A :class:`~trusthop.stores.base.ReplayStore` in a dict.

    Args:
        max_entries: unexpired entries it holds at most. A new entry beyond
            it raises :class:`~trusthop.stores.base.StoreFull`: an entry is
            never dropped before its time to make room (the consumer then
            dead-letters with ``store_unavailable`` and says why).
        clock: a monotonic clock in seconds; entries expire by it.

    Memory stays proportional to the entries held (about 900 bytes per
    entry, so the default bound is close to 1 GB): deadlines of entries
    extended many times are compacted. An entry lives as long as its chain
    can be accepted (24 h with the default hop lifetime), so a sustained rate
    times that lifetime must fit under ``max_entries``; a WARNING is logged
    on ``trusthop.stores`` when the store passes 80 % of it, before it starts
    refusing. Production consumers at any real rate want a shared store.

    Atomic within one event loop (``update`` never awaits between reading
    and writing). It does not survive the process nor see other replicas:
    replicas that share a group or queue need a shared store such as
    :class:`~trusthop.stores.redis.RedisReplayStore`.
    """

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._warn_at = max(1, max_entries * 4 // 5)
        self._warned = False
        self._clock = clock
        self._values: dict[str, tuple[bytes, float]] = {}
        self._deadlines: list[tuple[float, str]] = []

    def __len__(self) -> int:
        self._expire(self._clock())
        return len(self._values)

    def _expire(self, now: float) -> None:
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            held = self._values.get(key)
            if held is not None and held[1] <= now:
                del self._values[key]

    async def get(self, key: str) -> bytes | None:
        held = self._values.get(key)
        if held is None or held[1] <= self._clock():
            return None
        return held[0]

    async def update(self, key: str, change: Change) -> bytes | None:
        now = self._clock()
        held = self._values.get(key)
        current = held[0] if held is not None and held[1] > now else None
        value, ttl = change(current)
        if value is None:
            return current
        if current is None:
            self._expire(now)
            held_count = len(self._values)
            if held_count >= self._warn_at and not self._warned:
                self._warned = True
                log.warning(
                    "in-memory replay store at %d of %d entries: it refuses new events "
                    "(store_unavailable) when full; use a shared store or raise max_entries",
                    held_count,
                    self.max_entries,
                )
            elif held_count < self._warn_at // 2:
                self._warned = False
            if held_count >= self.max_entries:
                raise StoreFull(
                    f"the in-memory replay store holds {self.max_entries} unexpired entries "
                    "and never forgets one early; raise max_entries or use a shared store"
                )
        deadline = now + max(ttl, 0.0)
        if current is not None and held is not None and held[1] >= deadline:
            self._values[key] = (value, held[1])  # already kept long enough
            return current
        self._values[key] = (value, deadline)
        heapq.heappush(self._deadlines, (deadline, key))
        if len(self._deadlines) > 2 * len(self._values) + _HEAP_SLACK:
            # An entry extended again and again leaves one stale deadline per
            # extension behind; rebuild from the live ones (amortised O(1)).
            self._deadlines = [(held_until, k) for k, (_, held_until) in self._values.items()]
            heapq.heapify(self._deadlines)
        return current
