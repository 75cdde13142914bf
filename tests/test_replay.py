"""trusthop.replay, trusthop.stores.memory, trusthop.sigcache, trusthop.metrics."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from chainkit import (
    BUNDLE,
    DEST2,
    NOW,
    ORDERS_ID,
    ORDERS_TAG_TWIN,
    T0,
    Story,
    build_story,
    encode_segments,
)
from hypothesis import given
from hypothesis import strategies as st

from trusthop.bundle import BundleKey, TrustBundle
from trusthop.chain import decode_chain
from trusthop.errors import Reason, TrustError
from trusthop.metrics import COUNTERS, Counters, Fanout
from trusthop.replay import (
    MAX_REMEMBERED_DELIVERIES,
    DeliveryInfo,
    DeliveryKind,
    Sighting,
    accepted,
    classify,
    expires_at,
    sighting_key,
    with_retry,
)
from trusthop.sigcache import SignatureCache
from trusthop.stores import MemoryReplayStore, StoreFull
from trusthop.verify import Limits

K = DeliveryKind
SEEN = Sighting(first_seen=100.0, destination="kafka:orders", uses=1,
                deliveries=("orders/0@7",), retry_pending=0, expires_at=5000.0)


# -- classify ------------------------------------------------------------------

@pytest.mark.parametrize(("sighting", "delivery", "max_uses", "kind"), [
    (None, DeliveryInfo(), 1, K.FIRST),
    (None, DeliveryInfo(id="orders/0@7", redelivered=True, retry=3), 1, K.FIRST),
    (SEEN, DeliveryInfo(id="orders/0@7"), 1, K.REDELIVERY),
    (SEEN, DeliveryInfo(id="orders/0@7", retry=2), 1, K.REDELIVERY),
    (SEEN, DeliveryInfo(redelivered=True), 1, K.REDELIVERY),
    (SEEN, DeliveryInfo(id="orders/1@7"), 1, K.REPLAY),
    (SEEN, DeliveryInfo(), 1, K.REPLAY),
    (SEEN, DeliveryInfo(retry=2), 1, K.REPLAY),  # forged retry: none pending
    (dataclasses.replace(SEEN, retry_pending=2), DeliveryInfo(retry=2), 1, K.RETRY),
    (dataclasses.replace(SEEN, retry_pending=3), DeliveryInfo(retry=2), 1, K.REPLAY),
    (SEEN, DeliveryInfo(id="orders/1@9"), 2, K.FIRST),
    (dataclasses.replace(SEEN, uses=2), DeliveryInfo(id="orders/1@9"), 2, K.REPLAY),
])
def test_classify_table(sighting: Sighting | None, delivery: DeliveryInfo, max_uses: int,
                        kind: DeliveryKind) -> None:
    assert classify(sighting, delivery, max_uses=max_uses) is kind


def test_classify_refuses_zero_uses() -> None:
    with pytest.raises(ValueError, match="max_uses"):
        classify(None, DeliveryInfo(), max_uses=0)


def test_a_retry_is_consumed_once() -> None:
    pending = with_retry(SEEN, 2)
    retry = DeliveryInfo(id="orders.retry/0@1", retry=2)
    assert classify(pending, retry) is K.RETRY
    after = accepted(pending, retry, K.RETRY, destination="kafka:orders", now=200, expires=10)
    assert after is not None and after.retry_pending == 0
    # A second copy of the same retry is a replay; the same retry record
    # redelivered (same id) is a redelivery.
    assert classify(after, DeliveryInfo(id="orders.retry/1@4", retry=2)) is K.REPLAY
    assert classify(after, retry) is K.REDELIVERY


def test_with_retry_refuses_first_attempt() -> None:
    with pytest.raises(ValueError):
        with_retry(SEEN, 1)


# -- accepted -----------------------------------------------------------------

def test_accepted_first_creates_and_never_shortens() -> None:
    first = accepted(None, DeliveryInfo(id="a"), K.FIRST, destination="d", now=10, expires=99)
    assert first == Sighting(10, "d", 1, ("a",), 0, 99)
    again = accepted(first, DeliveryInfo(id="b"), K.FIRST, destination="d", now=20, expires=50)
    assert again is not None
    assert (again.uses, again.deliveries, again.expires_at, again.first_seen) == (
        2, ("a", "b"), 99, 10)
    longer = accepted(again, DeliveryInfo(id="b"), K.REDELIVERY, destination="d", now=30,
                      expires=500)
    assert longer is not None and longer.expires_at == 500 and longer.uses == 2


def test_accepted_replay_stores_nothing() -> None:
    assert accepted(SEEN, DeliveryInfo(), K.REPLAY, destination="d", now=1, expires=2) is None


def test_delivery_ids_are_bounded() -> None:
    s: Sighting | None = None
    for n in range(MAX_REMEMBERED_DELIVERIES + 10):
        s = accepted(s, DeliveryInfo(id=f"t/0@{n}"), K.FIRST, destination="d", now=1,
                     expires=2)
    assert s is not None and len(s.deliveries) == MAX_REMEMBERED_DELIVERIES
    assert s.deliveries[-1] == f"t/0@{MAX_REMEMBERED_DELIVERIES + 9}"


# -- encoding -----------------------------------------------------------------

@given(st.builds(
    Sighting,
    first_seen=st.floats(allow_nan=False, allow_infinity=False),
    destination=st.text(max_size=40),
    uses=st.integers(1, 10**6),
    deliveries=st.lists(st.text(max_size=20), max_size=5).map(tuple),
    retry_pending=st.integers(0, 1000),
    expires_at=st.floats(allow_nan=False, allow_infinity=False),
))
def test_sighting_roundtrip(s: Sighting) -> None:
    assert Sighting.decode(s.encode()) == s


@pytest.mark.parametrize("raw", [
    b"", b"\xc1", msgpack.packb([2, 1.0, "d", 1, [], 0, 2.0]),
    msgpack.packb([1, 1.0, "d", 0, [], 0, 2.0]), msgpack.packb([1, True, "d", 1, [], 0, 2.0]),
    msgpack.packb([1, 1.0, "d", 1, [1], 0, 2.0]), msgpack.packb([1, 1.0, "d", 1, [], -1, 2.0]),
    msgpack.packb([1, float("nan"), "d", 1, [], 0, 2.0]), msgpack.packb({"a": 1}),
    msgpack.packb([1, 1.0, "d", 1, [], 0]),
])
def test_foreign_bytes_are_not_a_sighting(raw: bytes) -> None:
    with pytest.raises(ValueError, match="not a trusthop sighting"):
        Sighting.decode(raw)


# -- keys and lifetime --------------------------------------------------------

def test_sighting_key_depends_on_scope_and_newest_ring(story: Story) -> None:
    other = build_story("txn-2")
    a = sighting_key("kafka/g1", story.chain)
    assert a == sighting_key("kafka/g1", dataclasses.replace(story.chain))
    assert a != sighting_key("kafka/g2", story.chain)
    assert a != sighting_key("kafka/g1", other.chain)
    # A scope cannot be crafted to collide with another scope plus a hash.
    assert sighting_key("a", story.chain) != sighting_key("a\x00", story.chain)
    assert len(a) == 64 and int(a, 16) >= 0


def test_expires_at_covers_window_max_age_and_remember(story: Story) -> None:
    newest = story.chain.newest
    assert expires_at(story.chain, limits=Limits(), now=T0, remember=0) == newest.exp + 60
    short = Limits(max_age=5, leeway=1)
    assert expires_at(story.chain, limits=short, now=T0, remember=0) == newest.iat + 6
    assert expires_at(story.chain, limits=short, now=T0, remember=10**6) == T0 + 10**6


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        Limits(max_age=0)
    with pytest.raises(ValueError):
        Limits(leeway=-1)


# -- memory store -------------------------------------------------------------

class Tick:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_memory_store_keeps_entries_for_their_time() -> None:
    tick = Tick()
    store = MemoryReplayStore(clock=tick)
    assert await store.update("k", lambda cur: (b"v1", 10)) is None
    assert await store.get("k") == b"v1"
    # A shorter lifetime never shortens the entry.
    assert await store.update("k", lambda cur: (b"v2", 1)) == b"v1"
    tick.now = 5
    assert await store.get("k") == b"v2"
    tick.now = 10
    assert await store.get("k") is None
    assert len(store) == 0


async def test_memory_store_change_none_writes_nothing() -> None:
    store = MemoryReplayStore()
    assert await store.update("k", lambda cur: (None, 100)) is None
    assert await store.get("k") is None


async def test_memory_store_refuses_rather_than_forgets() -> None:
    tick = Tick()
    store = MemoryReplayStore(2, clock=tick)
    await store.update("a", lambda cur: (b"1", 100))
    await store.update("b", lambda cur: (b"2", 10))
    with pytest.raises(StoreFull, match="never forgets"):
        await store.update("c", lambda cur: (b"3", 100))
    assert await store.get("a") == b"1" and await store.get("b") == b"2"
    # Updating an existing entry is fine at capacity.
    await store.update("a", lambda cur: (b"1b", 100))
    tick.now = 11  # "b" expired: room again
    await store.update("c", lambda cur: (b"3", 100))
    assert await store.get("c") == b"3" and await store.get("b") is None


def test_memory_store_needs_room() -> None:
    with pytest.raises(ValueError):
        MemoryReplayStore(0)


# -- verified-prefix cache -----------------------------------------------------------

def _cached(cache: SignatureCache, story: Story, bundle: TrustBundle = BUNDLE) -> Reason | None:
    """Verify ``story``'s chain through ``cache``: ``None`` or the rejection's reason."""
    try:
        cache.verify(cache.decode(story.encoded), bundle=bundle, event_digest=story.digest,
                     destination=DEST2, now=NOW, limits=Limits())
    except TrustError as error:
        return error.reason
    return None


def test_signature_cache_hits_only_verified_chains(story: Story) -> None:
    """v2 caches verified chains by their text (trusthop.sigcache); the
    adversarial tests of the prefix cache are in test_prefix_cache.py."""
    cache = SignatureCache(8)
    assert _cached(cache, story) is None
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 2)  # the chain and its parent
    assert _cached(cache, story) is None
    assert cache.hits == 1
    # The same rings under another key with the same key tag: a hit on the
    # text, but the keys are judged again and the signature fails, twice.
    impostor = BundleKey("orders-1", ORDERS_ID, ORDERS_TAG_TWIN.public_key)
    swapped = TrustBundle.of([*(k for k in BUNDLE.keys.values() if k.kid != "orders-1"), impostor])
    assert ORDERS_TAG_TWIN.public_key.key_tag == BUNDLE.keys["orders-1"].key.key_tag
    assert _cached(cache, story, swapped) is Reason.BAD_SIGNATURE
    assert _cached(cache, story, swapped) is Reason.BAD_SIGNATURE
    assert cache.hits == 3
    # A forged signature is never cached, even on a cached prefix.
    rings = list(story.chain.ring_bytes)
    forged = dataclasses.replace(story, chain=decode_chain(
        encode_segments([*rings[:2], bytes(64) + rings[2][64:]]), max_bytes=1 << 16, max_rings=8))
    assert _cached(cache, forged) is Reason.BAD_SIGNATURE
    assert len(cache) == 2 and cache.hits == 4  # a hit on the parent, then a rejection
    cache.clear()
    assert len(cache) == 0 and _cached(cache, story) is None
    assert (cache.hits, cache.misses) == (4, 2)  # counters survive clear()


def test_signature_cache_is_bounded() -> None:
    cache = SignatureCache(2)
    stories = [build_story(f"txn-lru-{n}") for n in range(3)]
    for s in stories:
        assert _cached(cache, s) is None
        assert len(cache) <= 2
    assert cache.lookup(stories[0].encoded, count=False) is None  # the oldest was evicted
    assert cache.lookup(stories[-1].encoded, count=False) is not None
    with pytest.raises(ValueError):
        SignatureCache(0)


# -- metrics ------------------------------------------------------------------

def test_counters_report_every_name() -> None:
    counters = Counters()
    counters.inc("verified", 2)
    counters.inc("rejected", reason="expired")
    counters.inc("rejected", reason="expired")
    fan = Fanout(counters, Counters())
    fan.inc("retried")
    out = counters.as_dict()
    assert set(out) == set(COUNTERS)
    assert out["verified"] == 2 and out["retried"] == 1 and out["rejected"] == {"expired": 2}
    assert counters["rejected"] == 2


def test_prometheus_exporter_counts_with_labels() -> None:
    import prometheus_client

    from trusthop.metrics import PrometheusMetrics

    registry = prometheus_client.CollectorRegistry()
    metrics = PrometheusMetrics("kafka/g1", registry=registry)
    metrics.inc("verified", 3)
    metrics.inc("rejected", reason="replayed")
    PrometheusMetrics("kafka/g2", registry=registry).inc("verified")
    value = registry.get_sample_value
    assert value("trusthop_verified_total", {"consumer": "kafka/g1"}) == 3
    assert value("trusthop_verified_total", {"consumer": "kafka/g2"}) == 1
    assert value("trusthop_rejected_total", {"consumer": "kafka/g1", "reason": "replayed"}) == 1


async def test_memory_store_warns_before_it_refuses(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    store = MemoryReplayStore(10)
    with caplog.at_level(logging.WARNING, logger="trusthop.stores"):
        for n in range(9):
            await store.update(f"k{n}", lambda cur: (b"v", 100))
    warnings = [r for r in caplog.records if "replay store at" in r.getMessage()]
    assert len(warnings) == 1 and "8 of 10" in warnings[0].getMessage()
