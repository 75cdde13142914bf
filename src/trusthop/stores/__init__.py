"""Replay stores: where consumer scopes remember the rings they accepted.

See :mod:`trusthop.replay` for the rules and :mod:`trusthop.stores.base` for
the interface. The Redis store needs the ``redis`` extra
(``pip install 'trusthop[redis]'``) and is imported from
:mod:`trusthop.stores.redis`.
"""

from trusthop.stores.base import Change, ReplayStore, StoreError, StoreFull
from trusthop.stores.memory import MemoryReplayStore

__all__ = ["Change", "MemoryReplayStore", "ReplayStore", "StoreError", "StoreFull"]
