"""A bounded cache of verified ring signatures (no I/O).

Fan-out makes the same rings arrive again and again: one parent with many
derived events shares its prefix, and several consumers of one event in one
process verify the same chain. :class:`SignatureCache` remembers which
(ring, public key) pairs verified, so each signature is checked once.

Soundness: an entry is keyed by the ring's hash, which covers every signed
field *and* the signature, together with the raw public key the bundle gave
for the ring's key id. A hit therefore means "this exact signature over these
exact bytes verified under this exact key", which no bundle change can make
false. Only successes are stored, so an attacker cannot poison it with
failures. Revocation and key-to-actor binding are checked before signatures
on every message (see :mod:`trusthop.verify`), never cached. The verifier
still clears the cache whenever its bundle or policy is replaced, so memory
is not spent on keys that left.
"""

from __future__ import annotations

from collections import OrderedDict

from trusthop.bundle import BundleKey
from trusthop.chain import Ring

DEFAULT_CACHE_SIZE = 16_384


class SignatureCache:
    """LRU set of verified (ring hash, public key) pairs.

    Args:
        max_entries: the bound; the least recently used entry is evicted
            beyond it (eviction only costs a signature check again).

    ``hits`` and ``misses`` count lookups since creation (not reset by
    :meth:`clear`). Not thread-safe; one cache per event loop.
    """

    def __init__(self, max_entries: int = DEFAULT_CACHE_SIZE) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, ring: Ring, digest: bytes, entry: BundleKey) -> bool:
        """Whether ``ring`` (whose hash is ``digest``) verifies under ``entry``'s key.

        The same answer as verifying directly; verifies only on a miss.
        Matches :data:`trusthop.verify.SignatureCheck` (the verifier passes
        the hash it computed for the chain's links anyway).
        """
        key = (digest, entry.key.raw)
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return True
        self.misses += 1
        if not entry.key.verify(ring.signature, ring.signing_input()):
            return False
        self._entries[key] = None
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True

    def clear(self) -> None:
        """Forget every entry (counters are kept)."""
        self._entries.clear()
