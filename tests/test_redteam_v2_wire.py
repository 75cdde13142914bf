"""Red-team review of wire format v2: per-message cost bounds before the
size and depth checks, and the 16-bit key tags that select an actor's key.

All of these held; they stay as regression tests.
"""

from __future__ import annotations

import pytest
from chainkit import (
    BUNDLE,
    DEST2,
    DOMAIN,
    EDGE,
    NOW,
    T0,
    append_hop,
    build_story,
    count_signature_checks,
    make_event,
    mint_origin,
)

import trusthop.chain as chain_module
from trusthop.bundle import BundleError, BundleKey, TrustBundle, merge
from trusthop.canonical import b64url_encode
from trusthop.chain import Chain, decode_chain
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.keys import SigningKey
from trusthop.pipeline import ChainVerifier
from trusthop.sign import Identity
from trusthop.verify import Limits, verify_chain

# --------------------------------------------------------------------------- #
# Cost before the bounds
# --------------------------------------------------------------------------- #


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts ring decodes (base64url of one segment)."""
    calls: list[int] = []
    real = chain_module.b64url_decode

    def counting(text: str) -> bytes:
        calls.append(len(text))
        return real(text)

    monkeypatch.setattr(chain_module, "b64url_decode", counting)
    return calls


@pytest.fixture
def signatures(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    return count_signature_checks(monkeypatch)


def _verify(text: str, limits: Limits = Limits(), verifier: ChainVerifier | None = None,
            event: WireEvent | None = None) -> Reason | None:
    story = build_story()
    event = story.e2 if event is None else event
    try:
        if verifier is None:
            verify_chain(text, bundle=BUNDLE, event_digest=event.digest(), destination=DEST2,
                         now=NOW, limits=limits)
        else:
            verifier.verify(WireEvent(dict(event.attributes), event.data, text), DEST2)
    except TrustError as error:
        return error.reason
    return None


@pytest.mark.parametrize(
    ("text", "limits", "reason"),
    [
        ("2." + "." * 1_000_000, Limits(), Reason.TOO_LARGE),
        ("2." + "." * 1_000_000, Limits(max_bytes=10**7), Reason.DEPTH_EXCEEDED),
        ("2." + "A" * 10**6 + ".A", Limits(max_bytes=10**7), Reason.MALFORMED),
        ("2." + "." * 31, Limits(), Reason.MALFORMED),
        ("2." + "A" * 86 + "." * 31, Limits(), Reason.MALFORMED),
        ("2" + "A" * 100 + ".A", Limits(), Reason.MALFORMED),
        ("\u0662." + "A" * 100 + ".A", Limits(), Reason.MALFORMED),
    ],
    ids=["dots-too-large", "dots-too-deep", "one-huge-segment", "empty-rings",
         "junk-then-empty", "no-version-dot", "arabic-two"],
)
def test_pathological_texts_cost_at_most_one_bounded_ring_decode(
    text: str, limits: Limits, reason: Reason, decodes: list[int]
) -> None:
    assert _verify(text, limits) is reason
    assert len(decodes) <= 1 and all(n <= chain_module.MAX_RING_BYTES * 4 // 3 + 2
                                     for n in decodes)
    warm = ChainVerifier(BUNDLE, clock=lambda: NOW, limits=limits)
    assert _verify(text, verifier=warm) is reason


def test_a_cached_prefix_followed_by_forged_rings_costs_one_signature(
    signatures: list[int]
) -> None:
    """A verified chain, then as many well-formed forged hop rings as the
    limits allow: the cache skips the known rings, and verification stops at
    the first forged signature."""
    story = build_story()
    warm = ChainVerifier(BUNDLE, clock=lambda: NOW)
    assert _verify(story.encoded, verifier=warm) is None
    signatures.clear()
    forged = story.chain
    rings = []
    for n in range(28):
        hop = append_hop(EDGE, forged, event_digest=story.e2.digest(), destination=DEST2,
                         now=T0 + 20)
        raw = bytearray(hop.ring_bytes[-1])
        raw[0] ^= 0xFF  # a signature nobody made
        rings.append(b64url_encode(bytes(raw)))
        forged = hop
        del n
    text = story.encoded + "." + ".".join(rings)
    assert _verify(text, verifier=warm) is Reason.BAD_SIGNATURE
    assert len(signatures) == 1


# --------------------------------------------------------------------------- #
# Key tags
# --------------------------------------------------------------------------- #

# Two Ed25519 keys whose RFC 7638 thumbprints begin with the same two bytes.
KEY_A = SigningKey.from_seed((204).to_bytes(2, "big") * 16)
KEY_B = SigningKey.from_seed((614).to_bytes(2, "big") * 16)
ACTOR_A = f"spiffe://{DOMAIN}/ns/a/sa/alpha"
ACTOR_B = f"spiffe://{DOMAIN}/ns/b/sa/beta"


def test_the_two_keys_share_a_key_tag() -> None:
    assert KEY_A.public_key.key_tag == KEY_B.public_key.key_tag
    assert KEY_A.public_key != KEY_B.public_key


def _chain_with_hop(identity: Identity) -> tuple[str, WireEvent]:
    origin = mint_origin(EDGE, subject="user:alice", issuer="https://idp.example.com",
                         credential="t", scope={"s"}, now=T0, ttl=3600, transaction_id="txn")
    event = make_event("tag-evt")
    chain = append_hop(identity, Chain(origin), event_digest=event.digest(),
                       destination=DEST2, now=T0 + 1)
    return chain.encode(), event


def _bundle(*entries: BundleKey, revoked_actors: tuple[str, ...] = ()) -> TrustBundle:
    return TrustBundle.of([EDGE.bundle_key, *entries], revoked_actors=revoked_actors)


def test_keys_of_different_actors_sharing_a_tag_never_sign_for_each_other() -> None:
    bundle = _bundle(BundleKey("a", ACTOR_A, KEY_A.public_key),
                     BundleKey("b", ACTOR_B, KEY_B.public_key))
    honest_a = Identity.create(ACTOR_A, KEY_A, kid="a")
    honest_b = Identity.create(ACTOR_B, KEY_B, kid="b")
    b_as_a = Identity.create(ACTOR_A, KEY_B, kid="b")  # B's key, A's name, the shared tag
    a_as_b = Identity.create(ACTOR_B, KEY_A, kid="a")
    for identity, expected in ((honest_a, None), (honest_b, None),
                               (b_as_a, Reason.BAD_SIGNATURE), (a_as_b, Reason.BAD_SIGNATURE)):
        text, event = _chain_with_hop(identity)
        cold = ChainVerifier(bundle, clock=lambda: NOW, cache_size=0)
        warm = ChainVerifier(bundle, clock=lambda: NOW)
        for verifier in (cold, warm, warm):
            assert _verify(text, verifier=verifier, event=event) is expected


@pytest.mark.parametrize("order", ["a-first", "b-first"])
def test_two_keys_of_one_actor_with_one_tag_are_refused_however_the_bundle_is_built(
    order: str
) -> None:
    first, second = (BundleKey("a", ACTOR_A, KEY_A.public_key),
                     BundleKey("b", ACTOR_A, KEY_B.public_key, revoked=True))
    if order == "b-first":
        first, second = second, first
    with pytest.raises(BundleError, match="key tag"):
        TrustBundle.of([first, second])
    with pytest.raises(BundleError, match="key tag"):
        TrustBundle({"a": first, "b": second})
    with pytest.raises(BundleError, match="key tag"):
        TrustBundle.of([first]).with_key(second)
    with pytest.raises(BundleError, match="key tag"):
        merge([TrustBundle.of([first]), TrustBundle.of([second])])
    with pytest.raises(BundleError, match="key tag"):
        TrustBundle.from_jwks(TrustBundle.of([first]).to_jwks()
                              | {"keys": TrustBundle.of([first]).to_jwks()["keys"]
                                 + TrustBundle.of([second]).to_jwks()["keys"]})


@pytest.mark.parametrize("revoked_first", [True, False])
def test_a_revoked_twin_revokes_the_key_under_either_kid(revoked_first: bool) -> None:
    live = BundleKey("a-new", ACTOR_A, KEY_A.public_key)
    dead = BundleKey("a-old", ACTOR_A, KEY_A.public_key, revoked=True)
    retired = BundleKey("a-ret", ACTOR_A, KEY_A.public_key, retired_at=T0)
    entries = [dead, live] if revoked_first else [live, dead]
    text, event = _chain_with_hop(Identity.create(ACTOR_A, KEY_A, kid="a-new"))
    for bundle in (_bundle(*entries), _bundle(live, retired)):
        expected = Reason.REVOKED
        for verifier in (ChainVerifier(bundle, clock=lambda: NOW, cache_size=0),
                         ChainVerifier(bundle, clock=lambda: NOW)):
            assert _verify(text, verifier=verifier, event=event) is expected


def test_a_hop_path_never_resolves_to_a_key_of_another_trust_domain() -> None:
    """The same path bound in another trust domain: a hop names only a path,
    and the lookup is by the full SPIFFE ID in the origin's trust domain."""
    other = "spiffe://partner.example.org/ns/a/sa/alpha"
    bundle = _bundle(BundleKey("a", other, KEY_A.public_key))
    text, event = _chain_with_hop(Identity.create(ACTOR_A, KEY_A, kid="a"))
    assert _verify(text, verifier=ChainVerifier(bundle, clock=lambda: NOW),
                   event=event) is Reason.UNKNOWN_KEY


def test_a_decoded_chain_re_encodes_to_its_text() -> None:
    story = build_story()
    decoded = decode_chain(story.encoded, max_bytes=10**6, max_rings=99)
    assert decoded.encode() == story.encoded
    assert Chain(decoded.origin, decoded.hops).ring_bytes == decoded.ring_bytes
