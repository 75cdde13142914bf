"""A bounded cache of verified chain prefixes (no I/O).

Fan-out makes the same rings arrive again and again: one parent with many
derived events shares its prefix, and several consumers of one event in one
process verify the same chain. :class:`SignatureCache` remembers chains that
verified, keyed by their ring bytes, so a new event on a known prefix costs
one ring's decoding and one signature, and a known chain none.

Soundness: an entry is found only by the exact bytes of every ring of the
prefix, and ring i's signature covers the hash of every ring before it, so
a hit means "these exact rings, in this order, verified: signatures under
these exact keys, links and narrowing". What depends on the moment is not
cached: keys are judged again against the current bundle (revocation,
retirement, bindings) unless it is the very bundle object they were judged
against (bundles are immutable), a ring whose key changed is verified again,
and the delivery (event digest, destination, time) and policy are always
checked. Only successes are stored, so an attacker cannot poison it; every
lookup is keyed by bytes an attacker would have to reproduce exactly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from trusthop.bundle import BundleKey, TrustBundle
from trusthop.chain import CHAIN_PREFIX, Chain, decode_rings
from trusthop.verify import Limits, VerifiedContext, VerifiedPrefix, verify_with_keys

DEFAULT_CACHE_SIZE = 4096


class _Entry:
    """The first ``length`` rings of ``chain`` (whose text is ``text``)
    verified under ``keys`` against ``bundle``; the prefix chain and its
    :class:`VerifiedPrefix` are built when first looked up."""

    __slots__ = ("bundle", "chain", "keys", "length", "text", "view")

    def __init__(
        self,
        chain: Chain,
        keys: tuple[BundleKey, ...],
        bundle: TrustBundle,
        length: int,
        text: str,
    ) -> None:
        self.chain = chain
        self.keys = keys
        self.bundle = bundle
        self.length = length
        self.text = text
        self.view: tuple[Chain, VerifiedPrefix] | None = None

    def found(self) -> tuple[Chain, VerifiedPrefix]:
        view = self.view
        if view is None:
            chain, length = self.chain, self.length
            if length < len(chain.ring_bytes):
                chain = Chain._of(
                    chain.origin,
                    chain.hops[: length - 1],
                    chain.ring_bytes[:length],
                    chain.hashes()[:length],
                    chain.link_tags[:length],
                    self.text,
                )
            view = self.view = (chain, VerifiedPrefix(self.keys[:length], self.bundle))
        return view


class SignatureCache:
    """LRU map from verified chain prefixes (by their text) to what verified.

    Args:
        max_entries: the bound; the least recently used entry is evicted
            beyond it (eviction only costs signature checks again). An entry
            holds its chain (text, ring bytes and decoded rings: about 2 KB
            for a four-ring chain; a chain and its parent share one).

    ``hits`` and ``misses`` count lookups since creation (not reset by
    :meth:`clear`); a hit may cover the whole chain or a prefix of it. Not
    thread-safe; one cache per event loop.
    """

    def __init__(self, max_entries: int = DEFAULT_CACHE_SIZE) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self._last: tuple[Chain, tuple[Chain, VerifiedPrefix] | None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, text: str, *, count: bool = True) -> tuple[Chain, VerifiedPrefix] | None:
        """The longest verified prefix of the chain encoded as ``text`` (the
        whole chain included): its decoded chain and what verified, or
        ``None``. ``count=False`` leaves :attr:`hits` and :attr:`misses`
        alone (a second look at the same chain)."""
        # Entries are keyed by the text of their newest ring (short to hash,
        # and it carries a signature over every ring before it), then the
        # whole prefix is compared: a copied ring after other rings is no hit.
        entries = self._entries
        end = len(text)
        while True:
            start = text.rfind(".", 0, end) + 1
            if start < len(CHAIN_PREFIX):  # only the version is left
                self.misses += count
                return None
            key = text[start:end]
            entry = entries.get(key)
            if entry is not None and len(entry.text) == end and text.startswith(entry.text):
                entries.move_to_end(key)
                self.hits += count
                return entry.found()
            end = start - 1

    def remember(
        self,
        chain: Chain,
        keys: Sequence[BundleKey],
        bundle: TrustBundle,
        *,
        parent_known: bool = False,
    ) -> None:
        """Record that ``chain`` verified with ``keys`` (one per ring) against
        ``bundle``; so does the chain without its newest ring, which the next
        event derived from the same parent shares (``parent_known``: the
        caller just found that one, verified against ``bundle``)."""
        entries = self._entries
        full = chain.encode()
        frozen = tuple(keys)
        length = len(frozen)
        cut = full.rfind(".")
        key = full[cut + 1 :]
        entries[key] = _Entry(chain, frozen, bundle, length, full)
        entries.move_to_end(key)
        if not parent_known:
            parent = full[:cut]
            key = parent[parent.rfind(".") + 1 :]
            known = entries.get(key)
            if known is None or known.bundle is not bundle or known.text != parent:
                entries[key] = _Entry(chain, frozen, bundle, length - 1, parent)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def decode(self, text: str) -> Chain:
        """:func:`~trusthop.chain.decode_rings` of an already checked chain
        text (:func:`~trusthop.chain.check_chain_text`), reusing the rings of
        the longest verified prefix instead of decoding them again.

        Raises:
            TrustError(malformed): as :func:`~trusthop.chain.decode_rings`.
        """
        known = self.lookup(text, count=False)
        chain = decode_rings(text, known[0] if known is not None else None)
        # verify() usually follows for this very chain: it need not look again.
        self._last = (chain, known)
        return chain

    def verify(
        self,
        chain: Chain,
        *,
        bundle: TrustBundle,
        event_digest: bytes,
        destination: str,
        now: float,
        limits: Limits,
        event_id: str | None = None,
        origin_actors: frozenset[str] | None = None,
        trust_domain: str | None = None,
    ) -> VerifiedContext:
        """:func:`~trusthop.verify.verify_decoded`, skipping what this cache
        knows verified; a chain that verifies is remembered.

        Raises:
            TrustError: as :func:`~trusthop.verify.verify_decoded`.
        """
        last = self._last
        if last is not None and last[0] is chain:
            known = last[1]
            self.hits += known is not None
            self.misses += known is None
        else:
            known = self.lookup(chain.encode())
        parent_known = (
            known is not None
            and len(known[1].keys) == len(chain.ring_bytes) - 1
            and known[1].bundle is bundle
        )
        context, keys = verify_with_keys(
            chain,
            bundle=bundle,
            event_digest=event_digest,
            destination=destination,
            now=now,
            limits=limits,
            event_id=event_id,
            origin_actors=origin_actors,
            trust_domain=trust_domain,
            verified=known[1] if known is not None else None,
        )
        self.remember(chain, keys, bundle, parent_known=parent_known)
        return context

    def clear(self) -> None:
        """Forget every entry (counters are kept)."""
        self._entries.clear()
        self._last = None
