"""The verified-prefix cache (trusthop.sigcache) attacked.

The cache keys verified chains by their text; a derived chain's text begins
with its parent's, so a hit on a prefix skips that prefix's signatures,
links and narrowing. It is new attack surface: every test here asserts that
a chain judged with a warm cache gets exactly the verdict it gets cold
(same reason, same ring; the same context when accepted), whatever was
cached before, and that the saving is real where it should be (signature
checks are counted by wrapping ``PublicKey.verify``; nothing is timed).

"Cold" is :func:`trusthop.verify.verify_chain` with no cache at all;
"cached" is what :class:`~trusthop.pipeline.ChainVerifier` does with one:
``check_chain_text``, ``SignatureCache.decode``, ``SignatureCache.verify``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from certkit import der, make_ca, make_svid
from chainkit import (
    BUNDLE,
    DEST1,
    DEST2,
    DOMAIN,
    EDGE,
    EDGE_ID,
    EDGE_TAG_TWIN,
    MALLORY_KEY,
    NOW,
    ORDERS,
    ORDERS_ID,
    ORDERS_TAG_TWIN,
    PAYMENTS,
    S0,
    S2,
    T0,
    TAG_TWIN_TXN,
    FixedClock,
    Story,
    build_story,
    encode_segments,
    flip,
    make_bundle,
    make_event,
    ring_parts,
    seeded_key,
    sign_ring,
    signed_ring,
)
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from trusthop.bundle import BundleKey, BundleSource, TrustBundle
from trusthop.chain import Chain, check_chain_text, decode_chain
from trusthop.errors import Reason, TrustError
from trusthop.keys import PublicKey, SigningKey
from trusthop.pipeline import ChainVerifier
from trusthop.policy.source import PolicySource
from trusthop.rings import K_IAT, K_LINK, K_TTL
from trusthop.sigcache import SignatureCache
from trusthop.sign import Identity, append_hop, mint_origin
from trusthop.verify import Limits, verify_chain

R = Reason
STORY = build_story()
OTHER = build_story("txn-2", subject="user:bob")
R0, R1, R2 = STORY.chain.ring_bytes
B0, B1, B2 = OTHER.chain.ring_bytes
A0 = STORY.chain.origin
A1, A2 = STORY.chain.hops
PREFIX = Chain(A0, (A1,))  # what the orders service consumed
PARENT_TEXT = PREFIX.encode()
E1_DIGEST = STORY.e1.digest()


# --------------------------------------------------------------------------- #
# judging a text cold and cached
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Signatures:
    """``PublicKey.verify`` calls, counted."""

    calls: int = 0

    def since(self, mark: int) -> int:
        return self.calls - mark


@pytest.fixture
def signatures(monkeypatch: pytest.MonkeyPatch) -> Signatures:
    counted = Signatures()
    original = PublicKey.verify

    def counting(self: PublicKey, signature: bytes, message: bytes) -> bool:
        counted.calls += 1
        return original(self, signature, message)

    monkeypatch.setattr(PublicKey, "verify", counting)
    return counted


Verdict = tuple[Any, ...]


def _verdict(run: Callable[[], Any]) -> Verdict:
    try:
        context = run()
    except TrustError as error:
        return ("rejected", error.reason, error.ring)
    return (
        "accepted",
        context.subject,
        context.transaction_id,
        context.trust_domain,
        context.scope,
        context.actors,
        context.destination,
        context.expires_at,
        context.chain.ring_bytes,
        tuple(context.chain.hashes()),
        context.chain.rings,
    )


@dataclasses.dataclass(frozen=True)
class Judge:
    """Where and when a text is judged (the same for cold and cached)."""

    bundle: TrustBundle = BUNDLE
    digest: bytes = STORY.digest
    destination: str = DEST2
    now: float = NOW
    limits: Limits = Limits()
    origin_actors: frozenset[str] | None = None
    trust_domain: str | None = None

    def cold(self, text: str) -> Verdict:
        return _verdict(
            lambda: verify_chain(
                text,
                bundle=self.bundle,
                event_digest=self.digest,
                destination=self.destination,
                now=self.now,
                limits=self.limits,
                origin_actors=self.origin_actors,
                trust_domain=self.trust_domain,
            )
        )

    def cached(self, cache: SignatureCache, text: str) -> Verdict:
        def run() -> Any:
            check_chain_text(text, max_bytes=self.limits.max_bytes, max_rings=self.limits.max_rings)
            return cache.verify(
                cache.decode(text),
                bundle=self.bundle,
                event_digest=self.digest,
                destination=self.destination,
                now=self.now,
                limits=self.limits,
                origin_actors=self.origin_actors,
                trust_domain=self.trust_domain,
            )

        return _verdict(run)

    def both(self, cache: SignatureCache, text: str) -> Verdict:
        """The verdict, after asserting that cold and cached agree."""
        cold, cached = self.cold(text), self.cached(cache, text)
        assert cached == cold, (cold[:3], cached[:3])
        return cold


STORY_JUDGE = Judge()
PARENT_JUDGE = Judge(digest=E1_DIGEST, destination=DEST1)


def warm(*texts: tuple[Judge, str], size: int = 64) -> SignatureCache:
    """A cache that verified each (judge, text), all accepted."""
    cache = SignatureCache(size)
    for judge, text in texts:
        assert judge.cached(cache, text)[0] == "accepted"
    return cache


def reason(verdict: Verdict) -> Reason | None:
    return verdict[1] if verdict[0] == "rejected" else None


# --------------------------------------------------------------------------- #
# rings forged after a cached prefix
# --------------------------------------------------------------------------- #


def _ring2_body() -> dict[int, Any]:
    return dict(ring_parts(STORY.encoded)[2][1])


def _hop(**changes: Any) -> bytes:
    """Ring 2 changed as the dataclass says, really signed by ORDERS after ring 1."""
    ring = sign_ring(dataclasses.replace(A2, **changes), ORDERS, PREFIX)
    return PREFIX.appended(ring).ring_bytes[-1]  # type: ignore[arg-type]


def _body2(change: Callable[[dict[int, Any]], None], signer: Any = ORDERS) -> bytes:
    """Ring 2's body changed by hand (what the encoder would not write), signed after ring 1."""
    body = _ring2_body()
    change(body)
    return signed_ring(body, signer, PREFIX.hashes()[-1])


def _starts_after_parent_expired(body: dict[int, Any]) -> None:
    body.pop(K_TTL)  # exp = the parent's
    body[K_IAT] = A1.exp - A1.iat + 1


NEWEST_FORGERIES: dict[str, tuple[bytes, Reason]] = {
    "signature flipped": (flip(R2, 5), R.BAD_SIGNATURE),
    "body byte flipped": (flip(R2, len(R2) - 3), R.BAD_SIGNATURE),
    "signed by a key in no bundle": (
        MALLORY_KEY.sign(STORY.chain.signing_input(2)) + R2[64:],
        R.BAD_SIGNATURE,
    ),
    "spliced from another chain": (B2, R.BROKEN_LINK),
    "scope widened, really signed": (_hop(scope=S0 | {"admin"}), R.SCOPE_ESCALATION),
    "window extended, really signed": (_hop(exp=A1.exp + 60), R.WINDOW_ESCALATION),
    "starts after its parent expired, really signed": (
        _body2(_starts_after_parent_expired),
        R.WINDOW_ESCALATION,
    ),
    "a wrong link tag, really signed": (
        _body2(lambda b: b.__setitem__(K_LINK, b[K_LINK] ^ 1)),
        R.BROKEN_LINK,
    ),
    "a key tag naming no key": (_hop(key_tag=ORDERS.key_tag ^ 1), R.UNKNOWN_KEY),
    "another event, really signed": (_hop(event_digest=bytes(32)), R.EVENT_MISMATCH),
    "another destination, really signed": (_hop(destination="kafka:refunds"), R.WRONG_DESTINATION),
    "valid ring (control)": (R2, None),
}


@pytest.mark.parametrize("name", list(NEWEST_FORGERIES))
def test_a_cached_prefix_never_vouches_for_a_forged_newest_ring(
    name: str, signatures: Signatures
) -> None:
    segment, expected = NEWEST_FORGERIES[name]
    text = encode_segments([R0, R1, segment])
    assert text.startswith(PARENT_TEXT + ".")
    cache = warm((STORY_JUDGE, STORY.encoded))  # the parent prefix is cached with it
    assert cache.lookup(PARENT_TEXT, count=False) is not None
    verdict = STORY_JUDGE.cold(text)
    mark = signatures.calls
    assert STORY_JUDGE.cached(cache, text) == verdict
    assert reason(verdict) is expected
    # The prefix is skipped, the new ring never: one signature (none when
    # its key is unknown, which is found before any signature, or for the
    # cached chain itself).
    assert signatures.since(mark) == (0 if expected is R.UNKNOWN_KEY or segment == R2 else 1)


ORIGIN_JUDGE = PARENT_JUDGE


@pytest.mark.parametrize(
    ("name", "segments", "expected"),
    [
        ("ring 1 signature flipped", [R0, flip(R1, 3)], R.BAD_SIGNATURE),
        ("ring 1 of another chain", [R0, B1], R.BROKEN_LINK),
        ("ring 1 re-signed wider by its real key", "wider", R.SCOPE_ESCALATION),
        ("ring 1 and the story's ring 2 after it", [R0, flip(R1, 3), R2], R.BAD_SIGNATURE),
        ("the origin of another chain", [B0, R1], R.BROKEN_LINK),
        ("control", [R0, R1], None),
    ],
)
def test_a_cached_origin_never_vouches_for_the_rings_after_it(
    name: str, segments: Any, expected: Reason | None
) -> None:
    if segments == "wider":
        wider = sign_ring(dataclasses.replace(A1, scope=S0 | {"admin"}), EDGE, Chain(A0))
        segments = list(Chain(A0, (wider,)).ring_bytes)  # type: ignore[arg-type]
    text = encode_segments(segments)
    cache = warm((ORIGIN_JUDGE, PARENT_TEXT))  # caches "2.<ring 0>" too
    assert cache.lookup(encode_segments([R0]), count=False) is not None
    judge = ORIGIN_JUDGE if len(segments) == 2 else STORY_JUDGE
    assert reason(judge.both(cache, text)) is expected


def test_a_tag_collision_on_a_cached_prefix_is_still_a_bad_signature() -> None:
    """Ring 1 names its parent by 16 bits of its hash. Another origin whose
    hash has the same 16 bits (found by search) passes that diagnosis, but
    the signature covers the whole hash: ``bad_signature``, cold and cached."""
    twin = build_story(TAG_TWIN_TXN, subject="user:bob")
    text = encode_segments([twin.chain.ring_bytes[0], R1, R2])
    assert twin.chain.link_tags[1] == STORY.chain.link_tags[1]
    assert twin.chain.hashes()[0] != STORY.chain.hashes()[0]
    cache = warm((STORY_JUDGE, STORY.encoded), (Judge(digest=twin.digest), twin.encoded))
    assert STORY_JUDGE.both(cache, text) == ("rejected", R.BAD_SIGNATURE, 1)


# --------------------------------------------------------------------------- #
# texts that extend a cached text at another boundary
# --------------------------------------------------------------------------- #


def _boundary_texts() -> Iterator[tuple[str, str]]:
    full = STORY.encoded
    seg2 = full.rsplit(".", 1)[1]
    yield "a character appended to the newest ring", full + "A"
    yield "the newest ring's last character dropped", full[:-1]
    yield "an empty ring after it", full + "."
    yield "two dots after it", full + ".."
    yield "the last dot moved forward", f"{PARENT_TEXT[:-4]}.{PARENT_TEXT[-4:]}{seg2}"
    yield "the last dot moved back", f"{PARENT_TEXT}{seg2[:4]}.{seg2[4:]}"
    yield "the last two rings joined", f"{PARENT_TEXT}{seg2}"
    yield "ring 2 split in two", f"{PARENT_TEXT}.{seg2[:40]}.{seg2[40:]}"
    yield "another chain's text appended", full + OTHER.encoded[1:]
    yield "another chain's text appended after a dot", full + "." + OTHER.encoded
    yield "the chain repeated", full + full[1:]
    yield "the version doubled", "2." + full
    yield "whitespace at a dot", full.replace(".", ". ", 1)


@pytest.mark.parametrize(("name", "text"), list(_boundary_texts()))
def test_a_text_extending_a_cached_one_at_another_boundary(name: str, text: str) -> None:
    cache = warm((STORY_JUDGE, STORY.encoded), (PARENT_JUDGE, PARENT_TEXT))
    verdict = STORY_JUDGE.both(cache, text)
    assert verdict[0] == "rejected", name
    # Whatever the cache returns for such a text is a prefix ending exactly
    # before one of its dots (never a cached text that only shares characters).
    found = cache.lookup(text, count=False)
    if found is not None:
        prefix = found[0].encode()
        assert text == prefix or text.startswith(prefix + ".")


def test_lookup_only_matches_whole_rings() -> None:
    cache = warm((STORY_JUDGE, STORY.encoded))
    full = STORY.encoded
    hit = cache.lookup(full + "A", count=False)  # the newest ring changed: the parent only
    assert hit is not None and hit[0].ring_bytes == (R0, R1)
    assert cache.lookup(full[:-1], count=False)[0].ring_bytes == (R0, R1)  # type: ignore[index]
    whole = cache.lookup(full + ".x", count=False)
    assert whole is not None and whole[0].ring_bytes == (R0, R1, R2)
    assert cache.lookup(PARENT_TEXT[:-1] + "." + R2.hex(), count=False) is None
    assert cache.lookup(OTHER.encoded, count=False) is None


# --------------------------------------------------------------------------- #
# the bundle changed after the prefix was cached
# --------------------------------------------------------------------------- #


def _with(*replaced: BundleKey, **kwargs: Any) -> TrustBundle:
    """BUNDLE with entries replaced by kid (and revocations)."""
    by_kid = {k.kid: k for k in BUNDLE.keys.values()}
    by_kid.update({k.kid: k for k in replaced})
    return TrustBundle.of(by_kid.values(), **kwargs)


def _entry(kid: str, **changes: Any) -> BundleKey:
    return dataclasses.replace(BUNDLE.keys[kid], **changes)


NEW_BUNDLES: dict[str, tuple[Callable[[], TrustBundle], Verdict | None]] = {
    "the same keys in a new bundle object": (lambda: _with(), None),
    "the orders key renamed": (
        lambda: TrustBundle.of(
            [k for k in BUNDLE.keys.values() if k.kid != "orders-1"]
            + [BundleKey("orders-renamed", ORDERS_ID, ORDERS.key.public_key)]
        ),
        None,
    ),
    "the newest ring's key revoked": (
        lambda: make_bundle(revoked_kids=["orders-1"]),
        ("rejected", R.REVOKED, 2),
    ),
    "the origin's key revoked": (
        lambda: make_bundle(revoked_kids=["edge-1"]),
        ("rejected", R.REVOKED, 0),
    ),
    "the edge actor revoked": (
        lambda: make_bundle(revoked_actors=[EDGE_ID]),
        ("rejected", R.REVOKED, 0),
    ),
    "the shop segment revoked": (
        lambda: _with(revoked_segments=[f"spiffe://{DOMAIN}/ns/shop"]),
        ("rejected", R.REVOKED, 2),
    ),
    "the edge segment revoked": (
        lambda: _with(revoked_segments=[f"spiffe://{DOMAIN}/ns/edge"]),
        ("rejected", R.REVOKED, 0),
    ),
    "the edge key retired before ring 1 was signed": (
        lambda: _with(_entry("edge-1", retired_at=T0 + 5)),
        ("rejected", R.REVOKED, 1),
    ),
    "the edge key retired after every ring was signed": (
        lambda: _with(_entry("edge-1", retired_at=T0 + 15)),
        None,
    ),
    "the edge key listed again under a revoked id": (
        lambda: _with(BundleKey("edge-old", EDGE_ID, EDGE.key.public_key, revoked=True)),
        ("rejected", R.REVOKED, 0),
    ),
    "the edge key dropped": (lambda: make_bundle(drop=["edge-1"]), ("rejected", R.UNKNOWN_KEY, 0)),
    "the edge key replaced by a key with another tag": (
        lambda: _with(BundleKey("edge-1", EDGE_ID, seeded_key(0x70).public_key)),
        ("rejected", R.UNKNOWN_KEY, 0),
    ),
    "the edge key replaced by a key with the same tag": (
        lambda: _with(BundleKey("edge-1", EDGE_ID, EDGE_TAG_TWIN.public_key)),
        ("rejected", R.BAD_SIGNATURE, 0),
    ),
    "the orders key replaced by a key with the same tag": (
        lambda: _with(BundleKey("orders-1", ORDERS_ID, ORDERS_TAG_TWIN.public_key)),
        ("rejected", R.BAD_SIGNATURE, 2),
    ),
}


def test_the_twin_keys_really_share_the_tags() -> None:
    assert EDGE_TAG_TWIN.public_key.key_tag == EDGE.key_tag
    assert ORDERS_TAG_TWIN.public_key.key_tag == ORDERS.key_tag
    assert EDGE_TAG_TWIN.public_key != EDGE.key.public_key


@pytest.mark.parametrize("name", list(NEW_BUNDLES))
def test_a_cached_prefix_is_judged_against_the_current_bundle(
    name: str, signatures: Signatures
) -> None:
    build, expected = NEW_BUNDLES[name]
    new = build()
    assert new is not BUNDLE
    cache = warm((STORY_JUDGE, STORY.encoded))
    judge = dataclasses.replace(STORY_JUDGE, bundle=new)
    for text in (
        STORY.encoded,
        encode_segments([R0, R1, _hop(event_digest=STORY.digest, iat=A2.iat + 1)]),
    ):
        verdict = judge.cold(text)
        mark = signatures.calls
        assert judge.cached(cache, text) == verdict
        if expected is None:
            assert verdict[0] == "accepted"
            # Equal keys in a new bundle: what verified under them still counts.
            assert signatures.since(mark) == (0 if text == STORY.encoded else 1)
        else:
            assert verdict == expected
    # And back under the first bundle, nothing was forgotten or learnt wrong.
    assert STORY_JUDGE.both(cache, STORY.encoded)[0] == "accepted"


def test_a_bundle_file_reload_reaches_a_cached_chain(tmp_path: Path) -> None:
    """A BundleSource reload does not clear the verifier's cache (only
    assigning ``verifier.bundle`` does): the cache itself must judge the
    cached rings' keys against the reloaded bundle."""
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(BUNDLE.to_jwks()))
    source = BundleSource(path)
    verifier = ChainVerifier(source, clock=FixedClock())
    wire = dataclasses.replace(STORY.e2, chain=STORY.encoded)
    assert verifier.verify(wire, DEST2).context.subject == "user:alice"
    cache = verifier.signature_cache
    assert cache is not None and len(cache) == 2
    for revoked, ring in (
        (make_bundle(revoked_kids=["edge-1"]), 0),
        (make_bundle(revoked_actors=[ORDERS_ID]), 2),
        (_with(revoked_segments=[f"spiffe://{DOMAIN}/ns/edge"]), 0),
    ):
        path.write_text(json.dumps(revoked.to_jwks()))
        assert source.reload() is True
        assert len(cache) == 2  # still there: the verdict below is the cache's own
        with pytest.raises(TrustError) as info:
            verifier.verify(dataclasses.replace(wire), DEST2)
        assert (info.value.reason, info.value.ring) == (R.REVOKED, ring)
    path.write_text(json.dumps(BUNDLE.to_jwks()))
    assert source.reload() is True
    assert verifier.verify(dataclasses.replace(wire), DEST2).context.subject == "user:alice"


# -- rings carrying X.509-SVIDs ------------------------------------------------

CA = make_ca(DOMAIN, key=ec.derive_private_key(0xCA11, ec.SECP256R1()), days=3650)
OTHER_CA = make_ca(DOMAIN, key=ec.derive_private_key(0xCA12, ec.SECP256R1()), days=3650)
_LEAF_KEY = ec.derive_private_key(0x5111D, ec.SECP256R1())
_LEAF, _ = make_svid([EDGE_ID], CA, key=_LEAF_KEY, days=3650)
SVID_EDGE = Identity.create(
    EDGE_ID,
    SigningKey(_LEAF_KEY),
    kid=SigningKey(_LEAF_KEY).public_key.thumbprint,
    certificates=[der(_LEAF)],
)


def _svid_story() -> str:
    origin = mint_origin(
        SVID_EDGE,
        subject="user:alice",
        issuer="https://idp.example.com",
        credential="t",
        scope=S0,
        now=T0,
        ttl=3600,
        transaction_id="txn-svid",
    )
    c1 = append_hop(
        SVID_EDGE, Chain(origin), event_digest=STORY.e1.digest(), destination=DEST1, now=T0 + 10
    )
    return append_hop(
        ORDERS, c1, event_digest=STORY.digest, destination=DEST2, now=T0 + 20, scope=S2
    ).encode()


SVID_TEXT = _svid_story()
SVID_BUNDLE = TrustBundle.of([ORDERS.bundle_key], authorities={DOMAIN: [CA[0]]})
SVID_KEY = SVID_EDGE.key.public_key


@pytest.mark.parametrize(
    ("name", "bundle", "expected"),
    [
        (
            "the same trust, new bundle",
            TrustBundle.of([ORDERS.bundle_key], authorities={DOMAIN: [CA[0]]}),
            None,
        ),
        ("the CA removed", TrustBundle.of([ORDERS.bundle_key]), R.BAD_CERTIFICATE),
        (
            "another CA",
            TrustBundle.of([ORDERS.bundle_key], authorities={DOMAIN: [OTHER_CA[0]]}),
            R.BAD_CERTIFICATE,
        ),
        (
            "the leaf key revoked in the bundle",
            TrustBundle.of(
                [ORDERS.bundle_key, BundleKey("leaf", EDGE_ID, SVID_KEY, revoked=True)],
                authorities={DOMAIN: [CA[0]]},
            ),
            R.REVOKED,
        ),
        (
            "the leaf key retired before the rings",
            TrustBundle.of(
                [ORDERS.bundle_key, BundleKey("leaf", EDGE_ID, SVID_KEY, retired_at=T0 - 1)],
                authorities={DOMAIN: [CA[0]]},
            ),
            R.REVOKED,
        ),
        (
            "the leaf key bound to another actor",
            TrustBundle.of(
                [ORDERS.bundle_key, BundleKey("leaf", PAYMENTS.actor, SVID_KEY)],
                authorities={DOMAIN: [CA[0]]},
            ),
            R.UNAUTHORIZED_ACTOR,
        ),
    ],
)
def test_a_cached_svid_prefix_is_judged_against_the_current_authorities(
    name: str, bundle: TrustBundle, expected: Reason | None
) -> None:
    cache = warm((dataclasses.replace(STORY_JUDGE, bundle=SVID_BUNDLE), SVID_TEXT))
    verdict = dataclasses.replace(STORY_JUDGE, bundle=bundle).both(cache, SVID_TEXT)
    assert reason(verdict) is expected
    if expected is not None:
        assert verdict[2] == 0


# --------------------------------------------------------------------------- #
# what the verifier requires, and the policy, after caching
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"origin_actors": frozenset({ORDERS_ID})}, ("rejected", R.UNAUTHORIZED_ACTOR, 0)),
        ({"origin_actors": frozenset()}, ("rejected", R.UNAUTHORIZED_ACTOR, 0)),
        ({"trust_domain": "partner.example.org"}, ("rejected", R.UNAUTHORIZED_ACTOR, 0)),
        ({"origin_actors": frozenset({EDGE_ID}), "trust_domain": DOMAIN}, None),
        ({"limits": Limits(max_rings=2)}, ("rejected", R.DEPTH_EXCEEDED, None)),
        ({"limits": Limits(max_bytes=len(STORY.encoded) - 1)}, ("rejected", R.TOO_LARGE, None)),
        ({"limits": Limits(max_age=5, leeway=0)}, ("rejected", R.EXPIRED, None)),
        ({"now": A2.exp + 61}, ("rejected", R.EXPIRED, None)),
        ({"now": A2.iat - 61}, ("rejected", R.NOT_YET_VALID, None)),
        ({"digest": STORY.e1.digest()}, ("rejected", R.EVENT_MISMATCH, 2)),
        ({"destination": DEST1}, ("rejected", R.WRONG_DESTINATION, 2)),
    ],
)
def test_requirements_and_the_delivery_are_checked_on_every_hit(
    changes: dict[str, Any], expected: Verdict | None, signatures: Signatures
) -> None:
    cache = warm((STORY_JUDGE, STORY.encoded))  # no origin actors, no trust domain
    judge = dataclasses.replace(STORY_JUDGE, **changes)
    verdict = judge.cold(STORY.encoded)
    mark = signatures.calls
    assert judge.cached(cache, STORY.encoded) == verdict
    assert signatures.since(mark) == 0  # a full hit: no signature, every other rule
    if expected is None:
        assert verdict[0] == "accepted"
    else:
        assert verdict == expected


POLICY = """
levels = ["untrusted", "internal"]
trust_domain = "prod.example.com"
[[members]]
id = "{edge}"
level = "internal"
[[members]]
namespace = "shop"
level = "internal"
[[requirements]]
destination = "kafka:payments"
min_level = "internal"
"""


def test_a_policy_reload_reaches_a_cached_chain(tmp_path: Path) -> None:
    """A PolicySource reload does not clear the cache either: the policy is
    evaluated on every message after the (cached) cryptography."""
    path = tmp_path / "policy.toml"
    path.write_text(POLICY.format(edge=EDGE_ID))
    verifier = ChainVerifier(BUNDLE, clock=FixedClock(), policy=PolicySource(path))
    cold = ChainVerifier(BUNDLE, clock=FixedClock(), policy=PolicySource(path), cache_size=0)
    wire = dataclasses.replace(STORY.e2, chain=STORY.encoded)
    assert verifier.verify(dataclasses.replace(wire), DEST2).decision is not None
    cache = verifier.signature_cache
    assert cache is not None and len(cache) == 2
    for text, want in (
        (
            POLICY.format(edge=EDGE_ID) + '[[segments]]\nname = "q"\nnamespace = "shop"\n',
            R.SEGMENT_QUARANTINED,
        ),
        (
            POLICY.format(edge=EDGE_ID).replace(
                'namespace = "shop"\nlevel = "internal"', 'namespace = "shop"\nlevel = "untrusted"'
            ),
            R.INSUFFICIENT_TRUST_LEVEL,
        ),
    ):
        path.write_text(text)
        for v in (verifier, cold):
            assert isinstance(v.policy, PolicySource) and v.policy.reload() is True
        reasons = []
        for v in (verifier, cold):
            with pytest.raises(TrustError) as info:
                v.verify(dataclasses.replace(wire), DEST2)
            reasons.append(info.value.reason)
        assert reasons == [want, want]
        assert len(cache) == 2


# --------------------------------------------------------------------------- #
# only successes, bounded, counted per chain
# --------------------------------------------------------------------------- #

FAILURES: dict[str, tuple[Judge, str]] = {
    "malformed newest ring": (STORY_JUDGE, STORY.encoded[:-1]),
    "unknown key": (
        dataclasses.replace(STORY_JUDGE, bundle=make_bundle(drop=["orders-1"])),
        STORY.encoded,
    ),
    "bad signature": (STORY_JUDGE, encode_segments([R0, R1, flip(R2, 5)])),
    "broken link": (STORY_JUDGE, encode_segments([R0, R2])),
    "scope escalation": (STORY_JUDGE, encode_segments([R0, R1, _hop(scope=S0 | {"admin"})])),
    "event mismatch": (dataclasses.replace(STORY_JUDGE, digest=bytes(32)), STORY.encoded),
    "wrong destination": (dataclasses.replace(STORY_JUDGE, destination=DEST1), STORY.encoded),
    "expired": (dataclasses.replace(STORY_JUDGE, now=A2.exp + 3600), STORY.encoded),
    "unauthorized origin": (
        dataclasses.replace(STORY_JUDGE, origin_actors=frozenset({ORDERS_ID})),
        STORY.encoded,
    ),
}


def test_only_successes_are_stored(signatures: Signatures) -> None:
    cache = SignatureCache(64)
    for name, (judge, text) in FAILURES.items():
        first = signatures.calls
        assert judge.both(cache, text)[0] == "rejected", name
        cost = signatures.since(first)
        mark = signatures.calls
        judge.cached(cache, text)
        assert signatures.since(mark) * 2 == cost, name  # nothing learnt (cold + cached)
        assert len(cache) == 0, name
    # A rejection after every signature verified (the delivery) stores nothing
    # either: the same chain, now delivered right, pays for every signature.
    mark = signatures.calls
    assert STORY_JUDGE.cached(cache, STORY.encoded)[0] == "accepted"
    assert signatures.since(mark) == 3
    assert len(cache) == 2  # the chain and its parent
    # A failure on a cached prefix leaves the prefix as it was.
    bad = encode_segments([R0, R1, flip(R2, 5)])
    assert STORY_JUDGE.both(cache, bad)[1] is R.BAD_SIGNATURE
    assert len(cache) == 2
    assert cache.lookup(bad, count=False)[0].ring_bytes == (R0, R1)  # type: ignore[index]


def _stories(n: int, name: str = "bound") -> list[Story]:
    return [build_story(f"txn-{name}-{i}") for i in range(n)]


def test_the_cache_is_bounded_and_evicts_the_least_recently_used(
    signatures: Signatures,
) -> None:
    stories = _stories(6)
    cache = SignatureCache(4)
    for story in stories:
        assert Judge(digest=story.digest).both(cache, story.encoded)[0] == "accepted"
        assert len(cache) <= 4
    assert len(cache) == 4
    # The two newest stories are held (each with its parent); the oldest are gone.
    assert cache.lookup(stories[0].encoded, count=False) is None
    assert cache.lookup(stories[-1].encoded, count=False) is not None
    mark = signatures.calls
    assert Judge(digest=stories[0].digest).cached(cache, stories[0].encoded)[0] == "accepted"
    assert signatures.since(mark) == 3  # evicted: verified again in full, same verdict
    # A lookup refreshes an entry: it outlives newer ones.
    keep = stories[-1]
    for story in _stories(3, "newer"):
        assert cache.lookup(keep.encoded, count=False) is not None
        Judge(digest=story.digest).cached(cache, story.encoded)
    mark = signatures.calls
    assert Judge(digest=keep.digest).cached(cache, keep.encoded)[0] == "accepted"
    assert signatures.since(mark) == 0
    assert len(cache) <= 4
    with pytest.raises(ValueError):
        SignatureCache(0)


def test_a_one_entry_cache_is_still_sound(signatures: Signatures) -> None:
    cache = SignatureCache(1)
    for text, judge in (
        (STORY.encoded, STORY_JUDGE),
        (PARENT_TEXT, PARENT_JUDGE),
        (STORY.encoded, STORY_JUDGE),
        (OTHER.encoded, Judge(digest=OTHER.digest)),
    ):
        assert judge.both(cache, text)[0] == "accepted"
        assert len(cache) == 1


def test_clear_forgets_everything_but_the_counters(signatures: Signatures) -> None:
    cache = warm((STORY_JUDGE, STORY.encoded))
    STORY_JUDGE.cached(cache, STORY.encoded)
    counts = (cache.hits, cache.misses)
    cache.clear()
    assert len(cache) == 0 and (cache.hits, cache.misses) == counts
    mark = signatures.calls
    assert STORY_JUDGE.both(cache, STORY.encoded)[0] == "accepted"
    assert signatures.since(mark) == 3 + 3  # cold, then cached from nothing


def _child(parent: Chain, n: int, signer: Identity = PAYMENTS) -> tuple[str, bytes]:
    event = make_event(f"child-{n}", type_="payment.charged", data={"n": n})
    chain = append_hop(
        signer,
        parent,
        event_digest=event.digest(),
        destination="kafka:charges",
        now=T0 + 25,
        ttl=60,
    )
    return chain.encode(), event.digest()


def test_hits_and_misses_are_counted_per_chain() -> None:
    cache = SignatureCache(64)
    STORY_JUDGE.cached(cache, STORY.encoded)
    assert (cache.hits, cache.misses) == (0, 1)  # three rings, one lookup
    STORY_JUDGE.cached(cache, STORY.encoded)
    assert (cache.hits, cache.misses) == (1, 1)
    text, digest = _child(STORY.chain, 0)
    Judge(digest=digest, destination="kafka:charges").cached(cache, text)
    assert (cache.hits, cache.misses) == (2, 1)  # a prefix hit counts once
    Judge(digest=OTHER.digest).cached(cache, OTHER.encoded)
    assert (cache.hits, cache.misses) == (2, 2)
    STORY_JUDGE.cached(cache, encode_segments([R0, R1, flip(R2, 5)]))  # rejected: still one hit
    assert (cache.hits, cache.misses) == (3, 2)
    cache.decode(STORY.encoded)
    cache.lookup(STORY.encoded, count=False)
    assert (cache.hits, cache.misses) == (3, 2)
    # Through a ChainVerifier: one count per message, though it looks twice.
    verifier = ChainVerifier(BUNDLE, clock=FixedClock())
    wire = dataclasses.replace(STORY.e2, chain=STORY.encoded)
    verifier.verify(dataclasses.replace(wire), DEST2)
    verifier.verify(dataclasses.replace(wire), DEST2)
    vc = verifier.signature_cache
    assert vc is not None and (vc.hits, vc.misses) == (1, 1)


@pytest.mark.parametrize("parent_first", [True, False], ids=["parent-verified", "parent-unseen"])
def test_fan_out_verifies_one_signature_per_derived_event(
    parent_first: bool, signatures: Signatures
) -> None:
    n = 20
    children = [_child(STORY.chain, i) for i in range(n)]
    cache = SignatureCache(256)
    if parent_first:
        STORY_JUDGE.cached(cache, STORY.encoded)
    mark = signatures.calls
    for text, digest in children:
        judge = Judge(digest=digest, destination="kafka:charges")
        assert judge.cached(cache, text)[0] == "accepted"
    cached_cost = signatures.since(mark)
    mark = signatures.calls
    for text, digest in children:
        assert Judge(digest=digest, destination="kafka:charges").cold(text)[0] == "accepted"
    assert signatures.since(mark) == n * 4  # cold: every ring of every child
    assert cached_cost == (n if parent_first else n + 3)
    # And each verdict is the cold one.
    for text, digest in children[:3]:
        Judge(digest=digest, destination="kafka:charges").both(cache, text)


def test_fan_out_of_fan_out_pays_each_new_ring_once(signatures: Signatures) -> None:
    cache = warm((STORY_JUDGE, STORY.encoded))
    (text, digest), *_ = [_child(STORY.chain, 0)]
    child = decode_chain(text, max_bytes=1 << 16, max_rings=32)
    Judge(digest=digest, destination="kafka:charges").cached(cache, text)
    mark = signatures.calls
    for i in range(10):
        grand, grand_digest = _child(child, 100 + i, signer=ORDERS)
        assert Judge(digest=grand_digest, destination="kafka:charges").cached(cache, grand)[0] == (
            "accepted"
        )
    assert signatures.since(mark) == 10


# --------------------------------------------------------------------------- #
# decoding through the cache, and any text at all
# --------------------------------------------------------------------------- #


def _decoded(run: Callable[[], Chain]) -> tuple[Any, ...]:
    try:
        chain = run()
    except TrustError as error:
        return ("malformed", error.reason, error.ring)
    return (chain.rings, chain.ring_bytes, chain.link_tags, tuple(chain.hashes()), chain.encode())


@pytest.mark.parametrize(
    "text",
    [
        STORY.encoded,
        PARENT_TEXT,
        STORY.encoded + "." + STORY.encoded.rsplit(".", 1)[1],
        encode_segments([R0, R1, B2]),
        encode_segments([R0, R2]),
        encode_segments([R0, R1, R1]),
        STORY.encoded[:-1],
        STORY.encoded + "A",
        *(t for _, t in _boundary_texts()),
    ],
)
def test_decoding_through_the_cache_is_decoding(text: str) -> None:
    cache = warm((STORY_JUDGE, STORY.encoded), (PARENT_JUDGE, PARENT_TEXT))
    limits = Limits()

    def through_cache() -> Chain:
        check_chain_text(text, max_bytes=limits.max_bytes, max_rings=limits.max_rings)
        return cache.decode(text)

    cold = _decoded(
        lambda: decode_chain(text, max_bytes=limits.max_bytes, max_rings=limits.max_rings)
    )
    assert _decoded(through_cache) == cold


SEGMENTS = [
    R0,
    R1,
    R2,
    B0,
    B1,
    B2,
    _hop(scope=S0 | {"admin"}),
    _hop(event_digest=bytes(32)),
    flip(R2, 5),
    flip(R1, 3),
]


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(
    picks=st.lists(st.integers(0, len(SEGMENTS) - 1), min_size=1, max_size=5),
    cut=st.integers(-3, 0),
    suffix=st.sampled_from(["", ".", "A", ".AAAA"]),
    judge=st.sampled_from([STORY_JUDGE, PARENT_JUDGE, Judge(digest=OTHER.digest)]),
)
def test_any_text_gets_the_same_verdict_cold_and_cached(
    picks: list[int], cut: int, suffix: str, judge: Judge
) -> None:
    cache = WARM_FOR_FUZZ
    text = encode_segments([SEGMENTS[i] for i in picks])
    text = (text[:cut] if cut else text) + suffix
    judge.both(cache, text)


WARM_FOR_FUZZ = warm(
    (STORY_JUDGE, STORY.encoded),
    (PARENT_JUDGE, PARENT_TEXT),
    (Judge(digest=OTHER.digest), OTHER.encoded),
    size=8,  # small: eviction happens while fuzzing
)


@pytest.mark.parametrize("between", ["nothing", "clear", "another decode", "evicted"])
@pytest.mark.parametrize(
    ("bundle", "expected"),
    [
        (BUNDLE, None),
        (make_bundle(revoked_kids=["edge-1"]), ("rejected", R.REVOKED, 0)),
        (make_bundle(drop=["orders-1"]), ("rejected", R.UNKNOWN_KEY, 2)),
    ],
)
def test_what_happens_between_decode_and_verify_changes_no_verdict(
    between: str, bundle: TrustBundle, expected: Verdict | None
) -> None:
    """A consumer decodes a chain through the cache, then awaits its replay
    store, then verifies: the cache (or the bundle) may change in between."""
    cache = warm((STORY_JUDGE, STORY.encoded), (PARENT_JUDGE, PARENT_TEXT), size=4)
    text = encode_segments([R0, R1, _hop(event_digest=STORY.digest, iat=A2.iat + 2)])
    chain = cache.decode(text)
    if between == "clear":
        cache.clear()
    elif between == "another decode":
        cache.decode(OTHER.encoded)
    elif between == "evicted":
        for story in _stories(3, "evict"):
            Judge(digest=story.digest).cached(cache, story.encoded)
    judge = dataclasses.replace(STORY_JUDGE, bundle=bundle)
    got = _verdict(
        lambda: cache.verify(
            chain,
            bundle=bundle,
            event_digest=judge.digest,
            destination=judge.destination,
            now=judge.now,
            limits=judge.limits,
        )
    )
    assert got == judge.cold(text)
    if expected is None:
        assert got[0] == "accepted"
    else:
        assert got == expected
