"""An in-process replay store, bounded, that refuses rather than forgets."""

from __future__ import annotations

import heapq
import logging
import math
import struct
import time
from collections.abc import Callable

from trusthop.stores.base import Change, StoreFull

DEFAULT_MAX_ENTRIES = 1_000_000
log = logging.getLogger("trusthop.stores")

_HEAP_SLACK = 64
# Each entry is one bytes object: its deadline (8 bytes) then the value.
_DEADLINE = struct.Struct("<d")
_KEY_HEX = 64  # sighting keys are SHA-256 hex digests

Key = bytes | str


def _compact(key: str) -> Key:
    """A 64-character lowercase hex key as its 32 bytes (half the memory);
    any other key as it is (a str never equals a bytes, so they cannot clash)."""
    if len(key) == _KEY_HEX:
        try:
            raw = bytes.fromhex(key)
        except ValueError:
            return key
        if raw.hex() == key:
            return raw
    return key


def _deadline(entry: bytes) -> float:
    deadline: float = _DEADLINE.unpack_from(entry)[0]
    return deadline


class _Deadlines:
    """Which keys may expire when: keys listed under the whole second their
    deadline falls in (rounded up), and a heap of those seconds.

    A key extended later is listed again under its new second; the old
    listing is stale and skipped when its second comes. ``len()`` counts the
    listings, stale ones included.
    """

    __slots__ = ("_by_second", "_count", "_seconds")

    def __init__(self) -> None:
        self._by_second: dict[int, list[Key]] = {}
        self._seconds: list[int] = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, deadline: float, key: Key) -> None:
        if math.isinf(deadline):
            return  # never expires: nothing to list
        second = math.ceil(deadline)
        keys = self._by_second.get(second)
        if keys is None:
            keys = self._by_second[second] = []
            heapq.heappush(self._seconds, second)
        keys.append(key)
        self._count += 1

    def due(self, now: float) -> list[Key]:
        """The keys listed under every second up to ``now``, taken out."""
        out: list[Key] = []
        seconds = self._seconds
        while seconds and seconds[0] <= now:
            out += self._by_second.pop(heapq.heappop(seconds))
        self._count -= len(out)
        return out


class MemoryReplayStore:
    """A :class:`~trusthop.stores.base.ReplayStore` in a dict.

    Args:
        max_entries: unexpired entries it holds at most. A new entry beyond
            it raises :class:`~trusthop.stores.base.StoreFull`: an entry is
            never dropped before its time to make room (the consumer then
            dead-letters with ``store_unavailable`` and says why).
        clock: a monotonic clock in seconds; entries expire by it.

    Memory stays proportional to the entries held, about 275 bytes per
    sighting (the key as 32 bytes, one bytes object holding the deadline and
    the sighting, one reference in a per-second expiry list; ``trusthop
    bench`` measures it as ``rss_growth[admission]``), so the default bound
    is about 260 MB. Expiry lists of entries extended many times are
    compacted. An entry lives as long as its chain can be accepted (24 h
    with the default hop lifetime), so a sustained rate times that lifetime
    must fit under ``max_entries``; a WARNING is logged on
    ``trusthop.stores`` when the store passes 80 % of it, before it starts
    refusing. Production consumers at any real rate want a shared store.

    Atomic within one event loop (``update`` never awaits between reading
    and writing; in fact it never awaits, see :func:`never_waits`). It does
    not survive the process nor see other replicas: replicas that share a
    group or queue need a shared store such as
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
        # key -> deadline (8 bytes) + value
        self._values: dict[Key, bytes] = {}
        self._deadlines = _Deadlines()

    def __len__(self) -> int:
        self._expire(self._clock())
        return len(self._values)

    def _expire(self, now: float) -> None:
        values = self._values
        for key in self._deadlines.due(now):
            entry = values.get(key)
            if entry is not None and _deadline(entry) <= now:
                del values[key]

    async def get(self, key: str) -> bytes | None:
        entry = self._values.get(_compact(key))
        if entry is None or _deadline(entry) <= self._clock():
            return None
        return entry[_DEADLINE.size :]

    async def update(self, key: str, change: Change) -> bytes | None:
        """See :meth:`~trusthop.stores.base.ReplayStore.update`.

        Raises:
            StoreFull: a new entry beyond ``max_entries``.
            ValueError: ``change`` returned a NaN lifetime for a new entry;
                nothing was written (an existing entry keeps its lifetime).
        """
        now = self._clock()
        compact = _compact(key)
        entry = self._values.get(compact)
        held = _deadline(entry) if entry is not None else -math.inf
        current = entry[_DEADLINE.size :] if entry is not None and held > now else None
        value, ttl = change(current)
        if value is None:
            return current
        if math.isnan(ttl):
            # No lifetime at all (a verifier clock gone NaN): an entry keeps
            # the one it has; a new entry is refused rather than kept 0 s.
            if current is None:
                raise ValueError("change returned a NaN ttl for a new entry")
            ttl = 0.0
        if current is None:
            self._admit_new(now)
        deadline = now + max(ttl, 0.0)
        if entry is not None and current is not None and held >= deadline:
            self._values[compact] = entry[: _DEADLINE.size] + value  # already kept long enough
            return current
        self._values[compact] = _DEADLINE.pack(deadline) + value
        self._deadlines.add(deadline, compact)
        if len(self._deadlines) > 2 * len(self._values) + _HEAP_SLACK:
            # An entry extended again and again leaves one stale listing per
            # extension behind; rebuild from the live ones (amortised O(1)).
            self._deadlines = _Deadlines()
            for live, held_entry in self._values.items():
                self._deadlines.add(_deadline(held_entry), live)
        return current

    def _admit_new(self, now: float) -> None:
        """Room for one more entry, or :class:`StoreFull` (warns at 80 %)."""
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


def never_waits(store: object) -> bool:
    """Whether ``store`` answers every call without awaiting anything: a
    :class:`MemoryReplayStore` whose ``get`` and ``update`` are this
    module's own (a subclass that overrides either may wait, and does not
    count). Callers need no timeout around such a store. Never raises."""
    cls = type(store)
    return (
        issubclass(cls, MemoryReplayStore)
        and cls.get is MemoryReplayStore.get
        and cls.update is MemoryReplayStore.update
    )
