"""Attacks on trusthop.bundle: a bad entry is refused, and the error names it."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
from chainkit import (
    BUNDLE,
    EDGE,
    ORDERS,
    ORDERS_2,
    ORDERS_ID,
    PAYMENTS_ID,
    T0,
    TAG_TWIN_SEEDS,
    counter_key,
    make_bundle,
    rejected,
    verify,
)

from trusthop.bundle import BundleError, BundleKey, TrustBundle, merge
from trusthop.canonical import b64url_encode
from trusthop.errors import Reason


def entry(identity: Any = EDGE, **overrides: Any) -> dict[str, Any]:
    jwk = identity.key.public_key.to_jwk() | {
        "kid": identity.kid,
        "use": "sig",
        "spiffe_id": identity.actor,
    }
    jwk.update(overrides)
    return {k: v for k, v in jwk.items() if v is not None}


def document(*entries: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"keys": list(entries), **extra}


def test_jwks_round_trip() -> None:
    bundle = make_bundle(revoked_kids=["orders-2"], revoked_actors=[ORDERS_ID])
    again = TrustBundle.from_jwks(bundle.to_jwks())
    assert again == bundle
    assert again.get("orders-2") is not None and again.get("orders-2").revoked  # type: ignore[union-attr]
    assert again.revoked_actors == {ORDERS_ID}
    assert again.get("edge-1") == EDGE.bundle_key


def test_from_jwks_does_not_depend_on_entry_order() -> None:
    jwks = BUNDLE.to_jwks()
    reversed_doc = {"keys": list(reversed(jwks["keys"]))}
    assert TrustBundle.from_jwks(reversed_doc) == BUNDLE


def test_duplicate_kid_is_refused_and_named() -> None:
    doc = document(entry(EDGE), entry(ORDERS, kid="edge-1"))
    with pytest.raises(BundleError, match="edge-1"):
        TrustBundle.from_jwks(doc)
    with pytest.raises(BundleError, match="duplicate"):
        TrustBundle.of([EDGE.bundle_key, BundleKey("edge-1", ORDERS_ID, ORDERS.key.public_key)])


def test_duplicate_kid_with_the_same_key_is_still_refused() -> None:
    with pytest.raises(BundleError, match="duplicate key id 'edge-1'"):
        TrustBundle.from_jwks(document(entry(EDGE), entry(EDGE)))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"d": "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"}, "private"),
        ({"kty": "RSA"}, "OKP"),
        ({"kty": "EC"}, "OKP"),
        ({"crv": "X25519"}, "Ed25519"),
        ({"crv": "P-256"}, "Ed25519"),
        ({"alg": "ES256"}, "alg"),
        ({"alg": "none"}, "alg"),
        ({"x": "AAAA"}, "32 bytes"),
        ({"x": b64url_encode(bytes(32))}, "small order"),
        ({"x": None}, "'x'"),
        ({"spiffe_id": "spiffe://Prod.example.com/ns/edge/sa/gateway"}, "trust domain"),
        ({"spiffe_id": "spiffe://prod.example.com/ns/edge/sa/gateway/"}, "segment"),
        ({"spiffe_id": "spiffe://prod.example.com/ns/../sa/gateway"}, "segment"),
        ({"spiffe_id": "https://prod.example.com/gateway"}, "spiffe://"),
        ({"spiffe_id": "spiffe://prod.example.com:443/x"}, "port"),
        ({"spiffe_id": None}, "spiffe_id"),
        ({"spiffe_id": 5}, "spiffe_id"),
        ({"revoked": "false"}, "revoked"),
        ({"revoked": 0}, "revoked"),
    ],
)
def test_bad_entry_is_refused_naming_index_and_kid(overrides: dict[str, Any], match: str) -> None:
    doc = document(entry(ORDERS), entry(EDGE, **overrides))
    with pytest.raises(BundleError, match=match) as info:
        TrustBundle.from_jwks(doc)
    assert "keys[1]" in str(info.value)
    assert "'edge-1'" in str(info.value)


@pytest.mark.parametrize("kid", [None, "", 5, ["edge-1"]])
def test_entry_without_a_usable_kid_is_named_by_index(kid: Any) -> None:
    doc = document(
        entry(ORDERS),
        entry(EDGE, kid=kid)
        if kid is not None
        else {k: v for k, v in entry(EDGE).items() if k != "kid"},
    )
    with pytest.raises(BundleError, match=r"keys\[1\].*kid"):
        TrustBundle.from_jwks(doc)


@pytest.mark.parametrize("item", ["not a map", 5, None, ["kty", "OKP"]])
def test_entry_that_is_not_an_object(item: Any) -> None:
    with pytest.raises(BundleError, match=r"keys\[0\]"):
        TrustBundle.from_jwks(document(item))


@pytest.mark.parametrize("doc", [{}, {"keys": None}, {"keys": {}}, {"keys": "x"}])
def test_document_without_a_keys_array(doc: dict[str, Any]) -> None:
    with pytest.raises(BundleError, match="keys"):
        TrustBundle.from_jwks(doc)


@pytest.mark.parametrize(
    "revoked",
    [
        "spiffe://prod.example.com/x",
        [5],
        [None],
        ["spiffe://prod.example.com/x/"],
        ["spiffe://PROD.example.com/x"],
    ],
)
def test_malformed_revoked_actors(revoked: Any) -> None:
    with pytest.raises(BundleError):
        TrustBundle.from_jwks(document(entry(EDGE), revoked_actors=revoked))


def test_bundle_is_not_changed_by_later_edits_of_its_document() -> None:
    doc = BUNDLE.to_jwks()
    bundle = TrustBundle.from_jwks(doc)
    before = copy.deepcopy(bundle.to_jwks())
    doc["keys"][0]["spiffe_id"] = "spiffe://prod.example.com/evil"
    doc["keys"].clear()
    assert bundle.to_jwks() == before


def test_of_validates_actors() -> None:
    with pytest.raises(ValueError):
        TrustBundle.of([BundleKey("k", "spiffe://prod.example.com/a/", EDGE.key.public_key)])
    with pytest.raises(ValueError):
        TrustBundle.of([], revoked_actors=["not-a-spiffe-id"])


def test_with_key_replaces_and_does_not_mutate() -> None:
    revoked = BundleKey("edge-1", EDGE.actor, EDGE.key.public_key, revoked=True)
    newer = BUNDLE.with_key(revoked)
    assert newer.get("edge-1") == revoked
    assert BUNDLE.get("edge-1") == EDGE.bundle_key
    assert newer.get("unknown") is None


def test_unknown_members_do_not_change_the_binding() -> None:
    # 'x5c', 'spiffe_sequence' and friends do not change which key serves which actor.
    doc = document(entry(EDGE, spiffe_sequence=7, x5c=["MIIB"], sub=ORDERS_ID))
    bundle = TrustBundle.from_jwks(doc)
    assert bundle.get("edge-1") == EDGE.bundle_key


def test_a_key_published_for_another_use_is_ignored() -> None:
    """The SPIFFE bundle format: entries of an unknown use are ignored, so a
    key published for encryption never becomes a ring-signing key."""

    from trusthop.bundle import TrustBundle
    from trusthop.keys import SigningKey

    jwk = SigningKey.from_seed(b"u" * 32).public_key.to_jwk() | {
        "kid": "k1",
        "spiffe_id": "spiffe://prod.example.com/a",
        "use": "enc",
    }
    assert TrustBundle.from_jwks({"keys": [jwk]}).get("k1") is None
    assert TrustBundle.from_jwks({"keys": [jwk | {"use": "sig"}]}).get("k1") is not None


# -- key tags: rings name a key by (actor, key tag) --------------------------------

TWIN_A, TWIN_B = (counter_key(n) for n in TAG_TWIN_SEEDS)


def test_key_for_finds_an_actors_key_by_its_tag() -> None:
    for identity in (EDGE, ORDERS, ORDERS_2):
        entry = BUNDLE.key_for(identity.actor, identity.key_tag)  # type: ignore[arg-type]
        assert entry == identity.bundle_key
    assert BUNDLE.key_for(ORDERS_ID, EDGE.key_tag) is None  # type: ignore[arg-type]
    assert BUNDLE.key_for(EDGE.actor, (EDGE.key_tag + 1) & 0xFFFF) is None  # type: ignore[operator]
    assert BUNDLE.entry_of(ORDERS.key.public_key) == ORDERS.bundle_key
    assert BUNDLE.entry_of(TWIN_A.public_key) is None


def test_two_keys_of_one_actor_sharing_a_tag_are_refused() -> None:
    assert TWIN_A.public_key.key_tag == TWIN_B.public_key.key_tag
    a = BundleKey("twin-a", ORDERS_ID, TWIN_A.public_key)
    b = BundleKey("twin-b", ORDERS_ID, TWIN_B.public_key)
    with pytest.raises(BundleError, match="share the key tag") as info:
        TrustBundle.of([a, b])
    assert "'twin-a'" in str(info.value) and "'twin-b'" in str(info.value)
    with pytest.raises(BundleError, match="share the key tag"):
        TrustBundle.of([a]).with_key(b)
    with pytest.raises(BundleError, match="share the key tag"):
        merge([TrustBundle.of([a]), TrustBundle.of([b])])
    with pytest.raises(BundleError, match="share the key tag"):
        TrustBundle({"twin-a": a, "twin-b": b})  # even built directly
    with pytest.raises(BundleError, match="share the key tag"):
        TrustBundle.from_jwks(document(entry(EDGE), entry(_Signer(TWIN_A, "twin-a")),
                                       entry(_Signer(TWIN_B, "twin-b"))))
    # A revoked or retired key still occupies its tag: it could sign old rings.
    with pytest.raises(BundleError, match="share the key tag"):
        TrustBundle.of([dataclasses.replace(a, revoked=True), b])


def test_keys_sharing_a_tag_may_belong_to_two_actors() -> None:
    bundle = BUNDLE.with_key(BundleKey("twin-a", PAYMENTS_ID, TWIN_A.public_key)).with_key(
        BundleKey("twin-b", ORDERS_ID, TWIN_B.public_key))
    tag = TWIN_A.public_key.key_tag
    assert bundle.key_for(PAYMENTS_ID, tag).key == TWIN_A.public_key  # type: ignore[union-attr]
    assert bundle.key_for(ORDERS_ID, tag).key == TWIN_B.public_key  # type: ignore[union-attr]


def test_one_key_under_two_ids_of_one_actor_counts_as_its_stricter_entry() -> None:
    key = ORDERS.key.public_key
    plain = BundleKey("orders-old", ORDERS_ID, key)
    for other, revoked, retired in (
        (BundleKey("orders-new", ORDERS_ID, key, revoked=True), True, None),
        (BundleKey("orders-new", ORDERS_ID, key, retired_at=T0), False, T0),
        (BundleKey("orders-new", ORDERS_ID, key, retired_at=T0, revoked=True), True, T0),
    ):
        for order in ([plain, other], [other, plain]):
            bundle = TrustBundle.of(order)
            found = bundle.key_for(ORDERS_ID, key.key_tag)
            assert found is not None and found.key == key
            assert (found.revoked, found.retired_at) == (revoked, retired)
            assert bundle.entry_of(key) == found
    early = BundleKey("a", ORDERS_ID, key, retired_at=T0 + 5)
    late = BundleKey("b", ORDERS_ID, key, retired_at=T0 + 50)
    for order in ([early, late], [late, early]):
        assert TrustBundle.of(order).key_for(ORDERS_ID, key.key_tag).retired_at == T0 + 5  # type: ignore[union-attr]


def test_the_stricter_entry_decides_verification(story: Any) -> None:
    revoked_alias = BUNDLE.with_key(BundleKey("orders-alias", ORDERS_ID, ORDERS.key.public_key,
                                              revoked=True))
    rejected(lambda: verify(story.encoded, bundle=revoked_alias), Reason.REVOKED, 2)
    retired_alias = BUNDLE.with_key(BundleKey("orders-alias", ORDERS_ID, ORDERS.key.public_key,
                                              retired_at=T0 + 19))
    rejected(lambda: verify(story.encoded, bundle=retired_alias), Reason.REVOKED, 2)


class _Signer:
    """What ``entry`` needs of an identity: a key, a kid, an actor."""

    def __init__(self, key: Any, kid: str, actor: str = ORDERS_ID) -> None:
        self.key, self.kid, self.actor = key, kid, actor


def test_a_bundle_cannot_be_changed_in_place() -> None:
    # Verifiers cache what a bundle object said (the verified-prefix cache
    # skips key checks for the very bundle object an entry was judged
    # against), so none of its maps may change under them.
    from chainkit import BUNDLE

    bundle = dataclasses.replace(BUNDLE, authorities={"prod.example.com": ()})
    for name in ("keys", "authorities", "jwt_authorities", "sequence", "refresh_hint"):
        mapping = getattr(bundle, name)
        with pytest.raises(TypeError):
            mapping["x"] = None  # type: ignore[index]
    source = {"prod.example.com": ()}
    copied = dataclasses.replace(BUNDLE, authorities=source)
    source["other.example.org"] = ()
    assert "other.example.org" not in copied.authorities
