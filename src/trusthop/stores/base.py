"""The replay store interface: an atomic read-modify-write of one small value.

The rules of what to store live in :mod:`trusthop.replay` (no I/O); a store
only keeps bytes under a key for a time and applies a pure ``change``
function atomically, so every implementation enforces the same rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

Change = Callable[[bytes | None], tuple[bytes | None, float]]
"""``change(current) -> (new value or None to leave it, seconds to keep it)``.

Pure and deterministic: a store may call it more than once (optimistic
transactions retry after a concurrent write)."""


class StoreError(Exception):
    """The store could not read or write (unreachable, timed out, corrupt data)."""


class StoreFull(StoreError):
    """The store holds its maximum of unexpired entries and will not forget
    one early; the entry was not written."""


class ReplayStore(Protocol):
    """Where consumer scopes keep their sightings (see :mod:`trusthop.replay`).

    Implementations: :class:`~trusthop.stores.memory.MemoryReplayStore` (one
    process) and :class:`~trusthop.stores.redis.RedisReplayStore` (shared by
    replicas). Keys are opaque hex strings; values are small bytes.
    """

    async def get(self, key: str) -> bytes | None:
        """The value under ``key`` (``None`` when absent or expired).

        Raises:
            StoreError: the store failed.
        """
        ...

    async def update(self, key: str, change: Change) -> bytes | None:
        """Apply ``change`` atomically to the value under ``key``.

        Returns the value ``change`` was finally applied to (``None`` when
        absent). A written value is kept at least the seconds ``change``
        returned, and never less than it was already kept.

        Raises:
            StoreFull: a new entry does not fit (nothing was written).
            StoreError: the store failed (nothing or everything was written).
        """
        ...
