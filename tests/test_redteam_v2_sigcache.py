"""Red-team review of the verified-prefix cache (``trusthop.sigcache``) and
its one-slot memo between ``decode()`` and ``verify()``: attempts to make a
chain verify warm that is refused cold, or the reverse.

Every attempt is judged by two verifiers over the same bundle: one with a
cache that has seen every legitimate chain of a fan-out (and every earlier
attempt), one without a cache. They must agree on the verdict, the ring it
names, and on every field of the verified context. These held; they stay as
regression tests.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

from chainkit import (
    BUNDLE,
    DEST2,
    EDGE,
    NOW,
    ORDERS,
    PAYMENTS,
    S2,
    T0,
    append_hop,
    build_story,
    make_bundle,
    make_event,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trusthop.bundle import BundleSource, TrustBundle
from trusthop.canonical import b64url_decode, b64url_encode
from trusthop.chain import Chain, decode_chain
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.pipeline import ChainVerifier
from trusthop.sigcache import SignatureCache
from trusthop.verify import Limits

DEST3 = "kafka:shipping"


def _fan_out() -> list[tuple[str, WireEvent, str]]:
    """(chain text, event, destination) of a story, another story, and a
    fan-out: three children of the story's two-ring prefix, each with a
    grandchild."""
    one, two = build_story(), build_story("txn-2", subject="user:bob")
    prefix = decode_chain(one.encoded.rsplit(".", 1)[0], max_bytes=10**6, max_rings=99)
    pool = [(one.encoded, one.e2, DEST2), (two.encoded, two.e2, DEST2)]
    for n in range(3):
        child_event = make_event(f"child-{n}", type_="payment.requested")
        child = append_hop(ORDERS, prefix, event_digest=child_event.digest(),
                           destination=DEST2, now=T0 + 20 + n, scope=S2, ttl=900)
        pool.append((child.encode(), child_event, DEST2))
        grand_event = make_event(f"grand-{n}", type_="shipment.requested")
        grand = append_hop(PAYMENTS, child, event_digest=grand_event.digest(),
                           destination=DEST3, now=T0 + 25, ttl=100)
        pool.append((grand.encode(), grand_event, DEST3))
    return pool


POOL = _fan_out()
SEGMENTS = sorted({s for text, _, _ in POOL for s in text.split(".")[1:]})
BUNDLES: list[TrustBundle] = [
    BUNDLE,
    make_bundle(revoked_kids=["orders-1"]),
    make_bundle(revoked_actors=[PAYMENTS.actor]),
    make_bundle(drop=["payments-1"]),
    make_bundle(revoked_kids=["edge-1"]),
]
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def outcome(verifier: ChainVerifier, wire: WireEvent, destination: str) -> tuple[Any, ...]:
    try:
        trusted = verifier.verify(wire, destination)
    except TrustError as error:
        return (error.reason, error.ring)
    c = trusted.context
    return ("ok", c.subject, c.issuer, c.transaction_id, c.trust_domain, c.scope, c.actors,
            c.destination, c.expires_at, c.chain_digest, c.chain.encode())


def mutate(text: str, rng: random.Random) -> str:
    """A structural attack on a chain text made only of cached rings and
    small edits: drop, swap, splice from another chain, duplicate, flip a
    character or a bit, insert a ring."""
    segs = text.split(".")
    op = rng.randrange(8)
    if op == 0 and len(segs) > 3:
        del segs[rng.randrange(1, len(segs))]
    elif op == 1:
        i, j = rng.randrange(1, len(segs)), rng.randrange(1, len(segs))
        segs[i], segs[j] = segs[j], segs[i]
    elif op == 2:
        segs[rng.randrange(1, len(segs))] = rng.choice(SEGMENTS)
    elif op == 3:
        segs.append(rng.choice(SEGMENTS))
    elif op == 4:
        i = rng.randrange(1, len(segs))
        chars = list(segs[i])
        chars[rng.randrange(len(chars))] = rng.choice(ALPHABET)
        segs[i] = "".join(chars)
    elif op == 5:
        i = rng.randrange(1, len(segs))
        raw = bytearray(b64url_decode(segs[i]))
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        segs[i] = b64url_encode(bytes(raw))
    elif op == 6:
        segs.insert(rng.randrange(1, len(segs) + 1), rng.choice(SEGMENTS))
    else:
        segs = segs[: rng.randrange(2, len(segs) + 1)]
    return ".".join(segs)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    cache_size=st.sampled_from([1, 2, 3, 64]),
    steps=st.integers(5, 60),
)
def test_warm_and_cold_verifiers_agree_on_every_attack(seed: int, cache_size: int,
                                                      steps: int) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bundle.json"
        path.write_text(json.dumps(BUNDLE.to_jwks()))
        # A BundleSource reload does not clear the cache: revocations must
        # still apply to cached rings at once.
        source = BundleSource(path)
        warm = ChainVerifier(source, clock=lambda: NOW, cache_size=cache_size)
        cold = ChainVerifier(source, clock=lambda: NOW, cache_size=0)
        for _ in range(steps):
            if rng.random() < 0.08:
                path.write_text(json.dumps(rng.choice(BUNDLES).to_jwks()))
                source.reload()
            _attack(warm, cold, rng)


def _attack(warm: ChainVerifier, cold: ChainVerifier, rng: random.Random) -> None:
    text, event, destination = rng.choice(POOL)
    if rng.random() < 0.6:
        text = mutate(text, rng)
    if rng.random() < 0.1:
        destination, event = rng.choice(POOL)[2], rng.choice(POOL)[1]
    wire = WireEvent(dict(event.attributes), event.data, text)
    assert outcome(warm, wire, destination) == outcome(cold, wire, destination), text


def test_the_memo_does_not_carry_a_verdict_to_another_chain_or_bundle() -> None:
    """decode() of one chain, then verify() of another chain object of the
    same text, after a bundle change in between: the memo (keyed by the
    chain object) must not apply the stale prefix."""
    text, event, destination = POOL[3]  # a grandchild: 4 rings, 3 shared with a child
    cache = SignatureCache(16)
    limits = Limits()
    digest = event.digest()
    chain = cache.decode(text)
    cache.verify(chain, bundle=BUNDLE, event_digest=digest, destination=destination,
                 now=NOW, limits=limits)
    # Now PAYMENTS is revoked: the next decode finds the whole chain cached.
    revoked = make_bundle(revoked_actors=[PAYMENTS.actor])
    again = cache.decode(text)
    try:
        cache.verify(again, bundle=revoked, event_digest=digest, destination=destination,
                     now=NOW, limits=limits)
    except TrustError as error:
        assert error.reason is Reason.REVOKED
    else:  # pragma: no cover - the break
        raise AssertionError("a cached chain survived the revocation of its actor")
    # The other chain object of the same text, after a decode of another chain.
    other_text = POOL[2][0]
    cache.decode(other_text)
    fresh = decode_chain(text, max_bytes=limits.max_bytes, max_rings=limits.max_rings)
    try:
        cache.verify(fresh, bundle=revoked, event_digest=digest, destination=destination,
                     now=NOW, limits=limits)
    except TrustError as error:
        assert error.reason is Reason.REVOKED
    else:  # pragma: no cover - the break
        raise AssertionError("a chain verified through a stale memo")


def test_origin_actors_and_trust_domain_are_judged_on_every_hit() -> None:
    """One cache, two sets of requirements: a hit made under permissive
    requirements is no hit under strict ones."""
    text, event, destination = POOL[0]
    cache = SignatureCache(16)
    chain = cache.decode(text)
    cache.verify(chain, bundle=BUNDLE, event_digest=event.digest(), destination=destination,
                 now=NOW, limits=Limits())
    for strict in ({"origin_actors": frozenset({ORDERS.actor})},
                   {"trust_domain": "partner.example.org"}):
        try:
            cache.verify(cache.decode(text), bundle=BUNDLE, event_digest=event.digest(),
                         destination=destination, now=NOW, limits=Limits(), **strict)
        except TrustError as error:
            assert error.reason is Reason.UNAUTHORIZED_ACTOR
        else:  # pragma: no cover - the break
            raise AssertionError(f"cached chain accepted despite {strict}")
    assert EDGE.actor  # the origin actor the permissive call accepted


def test_a_chain_built_from_ring_objects_is_no_key_to_another_text() -> None:
    """Re-encoding a decoded chain from its ring objects (what Chain(origin,
    hops) does) drops a repeated ttl, so its text and hashes differ: the
    cache must not confuse the two."""
    text, event, destination = POOL[0]
    decoded = decode_chain(text, max_bytes=10**6, max_rings=99)
    rebuilt = Chain(decoded.origin, decoded.hops)
    assert rebuilt.encode() == text  # signer output has no repeated field
    warm = ChainVerifier(BUNDLE, clock=lambda: NOW)
    for _ in range(2):
        assert warm.verify(WireEvent(dict(event.attributes), event.data, text),
                           destination).context.chain.encode() == text


# ---- shared state: the chain a handler receives is the cache's own ------------


async def test_a_handler_extending_its_chains_hashes_does_not_open_a_replay() -> None:
    """BREAK (before the fix): ``Chain.hashes()`` returned the chain's own
    list, and through the cache the chain object a handler receives
    (``context.chain``) is the one the cache hands to every later message
    with the same text, in every consumer sharing the verifier. A handler
    that computes "the hash after my next ring" by appending to that list
    changes the newest hash every later copy is keyed by: a re-published
    copy is then accepted as a first delivery (and events derived from the
    chain stop verifying). Cold (no cache) the copy is ``replayed``."""
    from trusthop.admission import Admission
    from trusthop.replay import DeliveryInfo
    from trusthop.rings import next_hash
    from trusthop.stores import MemoryReplayStore

    text, event, destination = POOL[0]
    for cache_size in (0, 64):
        verifier = ChainVerifier(BUNDLE, clock=lambda: NOW, cache_size=cache_size)
        admission = Admission(verifier, scope="kafka/billing", store=MemoryReplayStore())
        first = await admission.admit(WireEvent(dict(event.attributes), event.data, text),
                                      destination, DeliveryInfo(id="orders/0@0"))
        assert first is not None
        hashes = first.trusted.context.chain.hashes()
        hashes.append(next_hash(hashes[-1], b"\x00" * 80))  # a handler's own bookkeeping
        copy = WireEvent(dict(event.attributes), event.data, text)
        try:
            again = await admission.admit(copy, destination, DeliveryInfo(id="orders/0@1"))
        except TrustError as error:
            assert error.reason is Reason.REPLAYED
        else:
            raise AssertionError(
                f"cache_size={cache_size}: a re-published copy was accepted as {again}"
            )
        # And the chain still verifies for the next consumer of the same verifier.
        other = Admission(verifier, scope="kafka/shipping", store=MemoryReplayStore())
        assert await other.admit(WireEvent(dict(event.attributes), event.data, text),
                                 destination, DeliveryInfo(id="orders/0@0")) is not None
