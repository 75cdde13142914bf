"""SPIFFE trust bundles, bundle maps, revocation of segments, retired keys,
and reloading a bundle file without losing the last good one."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from certkit import authority_jwk, der, make_ca, make_svid
from chainkit import (
    BUNDLE,
    DEST2,
    EDGE,
    NOW,
    ORDERS,
    ORDERS_ID,
    TAG_TWIN_SEEDS,
    Story,
    build_story,
    counter_key,
    make_bundle,
    rejected,
    verify,
)
from cryptography.hazmat.primitives.asymmetric import ec

from trusthop.bundle import BundleError, BundleKey, BundleSource, TrustBundle, merge
from trusthop.errors import Reason
from trusthop.keys import ES256, SigningKey

TD = "prod.example.com"
PARTNER = "partner.example.org"


def ring_key(identity: Any = EDGE, **extra: Any) -> dict[str, Any]:
    return identity.key.public_key.to_jwk() | {
        "kid": identity.kid, "use": "sig", "spiffe_id": identity.actor} | extra


def test_a_spiffe_bundle_with_every_kind_of_entry() -> None:
    ca, _ = make_ca(TD)
    doc = {
        "spiffe_sequence": 12,
        "spiffe_refresh_hint": 300,
        "keys": [
            ring_key(EDGE),
            authority_jwk(ca),
            {"use": "jwt-svid", "kty": "EC", "kid": "jwt-1", "crv": "P-256", "x": "a", "y": "b"},
            {"use": "wit-svid", "kty": "EC", "kid": "future"},  # unknown use: ignored
            ring_key(ORDERS) | {"use": "enc"},  # ignored, never a ring key
        ],
    }
    bundle = TrustBundle.from_jwks(doc, trust_domain=TD)
    assert set(bundle.keys) == {EDGE.kid}
    assert bundle.x509_authorities(TD) == (ca,)
    assert bundle.x509_authorities(PARTNER) == ()
    assert [j["kid"] for j in bundle.jwt_authorities[TD]] == ["jwt-1"]
    assert (bundle.sequence, bundle.refresh_hint) == ({TD: 12}, {TD: 300})


def test_authorities_need_a_trust_domain() -> None:
    ca, _ = make_ca(TD)
    with pytest.raises(BundleError, match="trust domain"):
        TrustBundle.from_jwks({"keys": [authority_jwk(ca)]})
    declared = TrustBundle.from_jwks({"trust_domain": TD, "keys": [authority_jwk(ca)]})
    assert declared.x509_authorities(TD) == (ca,)
    with pytest.raises(BundleError, match="expected"):
        TrustBundle.from_jwks({"trust_domain": PARTNER, "keys": []}, trust_domain=TD)


@pytest.mark.parametrize(("change", "match"), [
    ({"x5c": []}, "exactly one"),
    ({"x5c": "MIIB"}, "exactly one"),
    ({"x5c": ["not base64!"]}, "base64"),
    ({"x5c": [base64.b64encode(b"\x30\x03\x02\x01\x01").decode()]}, "certificate"),
])
def test_malformed_authorities_are_refused(change: dict[str, Any], match: str) -> None:
    ca, _ = make_ca(TD)
    with pytest.raises(BundleError, match=match):
        TrustBundle.from_jwks({"keys": [authority_jwk(ca) | change]}, trust_domain=TD)


def test_a_leaf_certificate_is_not_an_authority() -> None:
    root = make_ca(TD)
    leaf, _ = make_svid([f"spiffe://{TD}/ns/shop/sa/orders"], root)
    jwk = {"use": "x509-svid", "kty": "EC", "x5c": [base64.b64encode(der(leaf)).decode()]}
    with pytest.raises(BundleError, match="CA certificate"):
        TrustBundle.from_jwks({"keys": [jwk]}, trust_domain=TD)


def test_duplicate_entries_are_refused() -> None:
    ca, _ = make_ca(TD)
    with pytest.raises(BundleError, match=r"duplicate X\.509"):
        TrustBundle.from_jwks({"keys": [authority_jwk(ca), authority_jwk(ca)]}, trust_domain=TD)
    jwt = {"use": "jwt-svid", "kty": "EC", "kid": "j"}
    with pytest.raises(BundleError, match="duplicate jwt-svid"):
        TrustBundle.from_jwks({"keys": [jwt, jwt]}, trust_domain=TD)
    with pytest.raises(BundleError, match="duplicate key id"):
        TrustBundle.from_jwks({"keys": [ring_key(EDGE), ring_key(EDGE)]})


@pytest.mark.parametrize("value", [-1, True, "3", 1.5])
def test_spiffe_metadata_must_be_non_negative_integers(value: Any) -> None:
    for name in ("spiffe_sequence", "spiffe_refresh_hint"):
        with pytest.raises(BundleError, match=name):
            TrustBundle.from_jwks({"keys": [], name: value}, trust_domain=TD)


def test_a_bundle_cannot_bind_keys_of_another_trust_domain() -> None:
    foreign = ring_key(EDGE) | {"spiffe_id": f"spiffe://{PARTNER}/ns/x"}
    with pytest.raises(BundleError, match="outside trust domain"):
        TrustBundle.from_jwks({"keys": [foreign]}, trust_domain=TD)
    with pytest.raises(BundleError, match="outside trust domain"):
        TrustBundle.from_jwks({"keys": [], "revoked_actors": [f"spiffe://{PARTNER}/x"]},
                              trust_domain=TD)


def test_a_bundle_map_of_two_trust_domains() -> None:
    ca1, _ = make_ca(TD)
    ca2, _ = make_ca(PARTNER)
    partner_key = SigningKey(ec.derive_private_key(0x5EED, ec.SECP256R1())).public_key
    assert partner_key.alg == ES256
    doc = {
        f"spiffe://{TD}": {"keys": [ring_key(EDGE), authority_jwk(ca1)], "spiffe_sequence": 3},
        PARTNER: {"keys": [authority_jwk(ca2), partner_key.to_jwk() | {
            "kid": "p1", "use": "sig", "spiffe_id": f"spiffe://{PARTNER}/ns/a"}],
            "revoked_segments": [f"spiffe://{PARTNER}/ns/lab"]},
    }
    bundle = TrustBundle.from_document(doc)
    assert set(bundle.keys) == {EDGE.kid, "p1"}
    assert bundle.x509_authorities(TD) == (ca1,) and bundle.x509_authorities(PARTNER) == (ca2,)
    assert bundle.sequence == {TD: 3}
    assert bundle.is_revoked_actor(f"spiffe://{PARTNER}/ns/lab/sa/x")
    again = TrustBundle.from_document(json.loads(json.dumps(bundle.to_map())))
    assert again == bundle


@pytest.mark.parametrize(("doc", "match"), [
    ({}, "at least one"),
    ({"spiffe://Prod.example.com": {"keys": []}}, "trust domain"),
    ({"spiffe://prod.example.com/ns": {"keys": []}}, "no path"),
    ({"prod.example.com:443": {"keys": []}}, "trust domain"),
    ({TD: []}, "JSON object"),
    ([], "JSON object"),
])
def test_malformed_bundle_maps(doc: Any, match: str) -> None:
    with pytest.raises(BundleError, match=match):
        TrustBundle.from_document(doc)


def test_the_same_kid_in_two_trust_domains_is_refused() -> None:
    partner = ring_key(EDGE) | {"spiffe_id": f"spiffe://{PARTNER}/ns/edge/sa/gateway"}
    with pytest.raises(BundleError, match="duplicate key id"):
        TrustBundle.from_document({TD: {"keys": [ring_key(EDGE)]}, PARTNER: {"keys": [partner]}})
    with pytest.raises(BundleError, match="two bundles"):
        ca, _ = make_ca(TD)
        one = TrustBundle.from_jwks({"keys": [authority_jwk(ca)]}, trust_domain=TD)
        merge([one, one])


def test_duplicate_json_members_in_a_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text('{"keys": [], "keys": []}')
    with pytest.raises(BundleError, match="duplicate JSON member"):
        TrustBundle.load(path)


# -- revocation of segments, retired keys ---------------------------------------

def test_a_revoked_segment_revokes_its_subtree_only(story: Story) -> None:
    shop = f"spiffe://{TD}/ns/shop"
    rejected(lambda: verify(story.encoded, bundle=make_bundle_with(revoked_segments=[shop])),
             Reason.REVOKED, 2)
    # A look-alike prefix is not the segment.
    verify(story.encoded, bundle=make_bundle_with(revoked_segments=[f"spiffe://{TD}/ns/sho"]))
    verify(story.encoded, bundle=make_bundle_with(
        revoked_segments=[f"spiffe://{TD}/ns/shop/sa/orders/x"]))
    rejected(lambda: verify(story.encoded, bundle=make_bundle_with(revoked_segments=[ORDERS_ID])),
             Reason.REVOKED, 2)


def make_bundle_with(**kwargs: Any) -> TrustBundle:
    return TrustBundle.of(BUNDLE.keys.values(), **kwargs)


def test_a_retired_key_keeps_old_rings_valid_and_refuses_new_ones(story: Story) -> None:
    signed_at = story.chain.newest.iat
    retired_later = BUNDLE.with_key(
        BundleKey(ORDERS.kid, ORDERS_ID, ORDERS.key.public_key, retired_at=signed_at))
    context = verify(story.encoded, bundle=retired_later)
    assert context.actors[-1] == ORDERS_ID
    retired_before = BUNDLE.with_key(
        BundleKey(ORDERS.kid, ORDERS_ID, ORDERS.key.public_key, retired_at=signed_at - 1))
    error = rejected(lambda: verify(story.encoded, bundle=retired_before), Reason.REVOKED, 2)
    assert "retired" in error.message
    # It survives the JWK Set round trip.
    assert TrustBundle.from_jwks(retired_before.to_jwks()) == retired_before


# -- BundleSource ----------------------------------------------------------------

def write(path: Path, bundle: TrustBundle) -> None:
    path.write_text(json.dumps(bundle.to_jwks()))


def test_bundle_source_reload_applies_revocation_at_once(tmp_path: Path) -> None:
    from trusthop.pipeline import ChainVerifier

    path = tmp_path / "bundle.json"
    write(path, BUNDLE)
    source = BundleSource(path)
    story = build_story()
    wire = story.e2
    wire.chain = story.encoded
    verifier = ChainVerifier(source, clock=lambda: NOW)
    assert verifier.verify(wire, DEST2).context.actors[-1] == ORDERS_ID
    write(path, make_bundle(revoked_actors=[ORDERS_ID]))
    assert source.reload() is True
    with pytest.raises(Exception) as caught:
        verifier.verify(wire, DEST2)
    assert getattr(caught.value, "reason", None) is Reason.REVOKED


@pytest.mark.parametrize("content", [
    "", "not json", '{"keys": "x"}', '{"keys": []}', '{"keys": [{"kid": 1}]}', "[]",
    '{"keys": [], "keys": []}',
])
def test_a_bad_reload_keeps_the_last_good_bundle(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "bundle.json"
    write(path, BUNDLE)
    source = BundleSource(path)
    path.write_text(content)
    with caplog.at_level(logging.ERROR, logger="trusthop.bundle"):
        assert source.reload() is False
    assert source.bundle == BUNDLE and source.bundle.keys  # never an empty bundle
    assert source.last_error is not None
    assert "keeping the last good trust bundle" in caplog.text
    write(path, make_bundle(revoked_kids=[EDGE.kid]))
    assert source.poll() is True and source.last_error is None
    assert source.bundle.keys[EDGE.kid].revoked


def test_a_missing_file_keeps_the_last_good_bundle(tmp_path: Path) -> None:
    path = tmp_path / "bundle.json"
    write(path, BUNDLE)
    source = BundleSource(path)
    path.unlink()
    assert source.reload() is False and source.bundle == BUNDLE
    assert isinstance(source.last_error, OSError)


def test_a_bad_first_load_raises(tmp_path: Path) -> None:
    path = tmp_path / "bundle.json"
    path.write_text('{"keys": []}')
    with pytest.raises(BundleError, match="no key"):
        BundleSource(path)


# -- key tags across bundle documents ---------------------------------------------


def _twin_jwk(n: int, kid: str, actor: str = ORDERS_ID) -> dict[str, Any]:
    return counter_key(n).public_key.to_jwk() | {"kid": kid, "use": "sig", "spiffe_id": actor}


def test_a_bundle_map_refuses_two_keys_of_one_actor_sharing_a_tag() -> None:
    a, b = TAG_TWIN_SEEDS
    with pytest.raises(BundleError, match="share the key tag"):
        TrustBundle.from_document({TD: {"keys": [_twin_jwk(a, "a"), _twin_jwk(b, "b")]}})
    # One tag, two actors of two trust domains: two distinct keys, both usable.
    partner = f"spiffe://{PARTNER}/ns/shop/sa/orders"
    bundle = TrustBundle.from_document({TD: {"keys": [_twin_jwk(a, "a")]},
                                        PARTNER: {"keys": [_twin_jwk(b, "b", partner)]}})
    tag = counter_key(a).public_key.key_tag
    assert bundle.key_for(ORDERS_ID, tag).kid == "a"  # type: ignore[union-attr]
    assert bundle.key_for(partner, tag).kid == "b"  # type: ignore[union-attr]


def test_a_reload_introducing_a_key_tag_collision_keeps_the_last_good_bundle(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = TAG_TWIN_SEEDS
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps({"keys": [_twin_jwk(a, "a")]}))
    source = BundleSource(path)
    good = source.bundle
    path.write_text(json.dumps({"keys": [_twin_jwk(a, "a"), _twin_jwk(b, "b")]}))
    with caplog.at_level(logging.ERROR, logger="trusthop.bundle"):
        assert source.reload() is False
    assert source.bundle is good
    assert "share the key tag" in str(source.last_error)
