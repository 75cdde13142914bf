"""X.509-SVIDs as ring keys: the ``x5c`` ring field, trusthop.x509svid and the
verifier's use of it.

Every test makes its own CA and SVIDs (certkit). Attacks are built by hand
where the producer would refuse them (a ring signed outside its
certificate's validity, an SVID of another workload), and each asserts the
exact reason code and, where one ring is to blame, its index.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import pytest
from certkit import EPOCH, LeafKey, der, key_pem, make_ca, make_svid, pem
from chainkit import (
    DEST1,
    DEST2,
    DOMAIN,
    EDGE,
    EDGE_ID,
    NOW,
    ORDERS,
    ORDERS_ID,
    PAYMENTS_ID,
    S0,
    S1,
    S2,
    T0,
    body_map,
    edit_ring,
    make_event,
    rejected,
    sign_ring,
    signed_ring,
    wire_hashes,
    wire_rings,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from trusthop.bundle import BundleKey, TrustBundle
from trusthop.canonical import b64url_encode
from trusthop.chain import Chain, HopRing, OriginRing, decode_chain
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.keys import ES256, PublicKey, SigningKey
from trusthop.rings import K_KEY, K_X5C
from trusthop.sign import Identity, append_hop, mint_origin
from trusthop.verify import Limits, VerifiedContext, verify_chain
from trusthop.x509svid import SvidCache, check_leaf, validate_svid

R = Reason
PARTNER = "partner.example.org"
DAY = 86_400

# One trust domain's PKI: a root and an intermediate under it; a partner's root.
ROOT = make_ca(DOMAIN)
INTER = make_ca(DOMAIN, issuer=ROOT)
PARTNER_ROOT = make_ca(PARTNER)
ROOT_CERT, INTER_CERT = ROOT[0], INTER[0]

CA_BUNDLE = TrustBundle.of([], authorities={DOMAIN: [ROOT_CERT], PARTNER: [PARTNER_ROOT[0]]})
"""Only X.509 authorities: no ring key at all."""


def svid(
    actor: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] = ROOT,
    *,
    chain: Sequence[x509.Certificate] = (),
    **kw: object,
) -> tuple[list[bytes], LeafKey]:
    """An SVID of ``actor``: (x5c DER list, private key). ``chain`` appends intermediates."""
    leaf, key = make_svid([actor], issuer, **kw)  # type: ignore[arg-type]
    return [der(leaf), *(der(c) for c in chain)], key


def identity_of(
    actor: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] = ROOT,
    *,
    chain: Sequence[x509.Certificate] = (),
    **kw: object,
) -> Identity:
    x5c, key = svid(actor, issuer, chain=chain, **kw)
    signing = SigningKey(key)
    return Identity(actor, signing, signing.public_key.thumbprint, tuple(x5c))


EDGE_SVID = identity_of(EDGE_ID)
ORDERS_SVID = identity_of(ORDERS_ID, INTER, chain=[INTER_CERT])


@dataclasses.dataclass
class Signed:
    chain: Chain
    event: WireEvent

    @property
    def encoded(self) -> str:
        return self.chain.encode()

    def verify(
        self,
        *,
        bundle: TrustBundle = CA_BUNDLE,
        now: float = NOW,
        destination: str = DEST2,
        limits: Limits = Limits(),
    ) -> VerifiedContext:
        return verify_chain(
            self.encoded,
            bundle=bundle,
            event_digest=self.event.digest(),
            destination=destination,
            now=now,
            limits=limits,
        )


def signed_story(
    edge: Identity = EDGE_SVID, orders: Identity = ORDERS_SVID, *, ttl: int = 3600, start: int = T0
) -> Signed:
    """The chainkit story (origin, edge hop, orders hop) with the given signers."""
    origin = mint_origin(
        edge,
        subject="user:alice",
        issuer="https://idp.example.com",
        credential="token",
        scope=S0,
        now=start,
        ttl=ttl,
        transaction_id="txn-x5c",
    )
    e1 = make_event("x5c-e1")
    c1 = append_hop(
        edge,
        Chain(origin),
        event_digest=e1.digest(),
        destination=DEST1,
        now=start + 10,
        scope=S1,
        ttl=ttl,
    )
    e2 = make_event("x5c-e2", type_="payment.requested")
    c2 = append_hop(
        orders,
        c1,
        event_digest=e2.digest(),
        destination=DEST2,
        now=start + 20,
        scope=S2,
        ttl=ttl,
        consumed_event_id=e1.id,
    )
    return Signed(c2, e2)


def forged_hop(
    chain: Chain,
    key: SigningKey,
    *,
    actor: str,
    x5c: Sequence[bytes] | None,
    key_tag: int | None = None,
    iat: int = T0 + 20,
) -> Signed:
    """A hop ring built and signed by hand: what the producer would refuse to
    sign. With ``x5c`` the ring names no key tag (the key is the leaf's)."""
    event = make_event("forged", type_="payment.requested")
    prev = chain.newest
    hop = HopRing(
        actor=actor,
        key_tag=None if x5c is not None else key_tag or key.public_key.key_tag,
        iat=iat,
        exp=min(iat + 600, prev.exp),
        scope=S2,
        event_digest=event.digest(),
        destination=DEST2,
        x5c=tuple(x5c) if x5c is not None else None,
    )
    return Signed(chain.appended(sign_ring(hop, key, chain)), event)  # type: ignore[arg-type]


def edge_prefix(ttl: int = 3600) -> Chain:
    """Origin and first hop by the SVID-signed edge."""
    chain = signed_story(ttl=ttl).chain
    return Chain(chain.origin, chain.hops[:1])


def x5c_rejected(
    x5c: Sequence[bytes],
    reason: Reason,
    key: LeafKey | SigningKey | None = None,
    *,
    actor: str = ORDERS_ID,
    bundle: TrustBundle = CA_BUNDLE,
    contains: str = "",
) -> TrustError:
    """A hop ring (ring 2) carrying ``x5c``, signed by ``key``, is rejected with ``reason``."""
    signing = (
        key
        if isinstance(key, SigningKey)
        else SigningKey(key or ec.generate_private_key(ec.SECP256R1()))
    )
    forged = forged_hop(edge_prefix(), signing, actor=actor, x5c=x5c)
    err = rejected(lambda: forged.verify(bundle=bundle), reason, ring=2)
    assert contains in err.message, err.message
    return err


def validated(
    x5c: Sequence[bytes],
    *,
    authorities: Sequence[x509.Certificate] = (ROOT_CERT,),
    at: int = T0,
    cache: SvidCache | None = None,
) -> tuple[str, PublicKey]:
    return validate_svid(x5c, authorities=authorities, at=at, cache=cache)


def bad(x5c: Sequence[bytes], contains: str = "", **kw: object) -> TrustError:
    err = rejected(lambda: validated(x5c, **kw), R.BAD_CERTIFICATE)  # type: ignore[arg-type]
    assert contains in err.message, err.message
    return err


# -- valid SVIDs ----------------------------------------------------------------


def test_a_leaf_directly_under_the_root() -> None:
    x5c, key = svid(ORDERS_ID)
    spiffe_id, public = validated(x5c)
    assert spiffe_id == ORDERS_ID
    assert public == PublicKey.of(key.public_key())
    assert public.alg == ES256


def test_leaf_intermediate_root() -> None:
    x5c, _ = svid(ORDERS_ID, INTER, chain=[INTER_CERT])
    assert validated(x5c)[0] == ORDERS_ID
    # The intermediate is required: the leaf alone does not reach the root.
    bad(x5c[:1], "does not validate")


def test_three_intermediates_is_the_longest_path() -> None:
    a = make_ca(DOMAIN, issuer=ROOT)
    b = make_ca(DOMAIN, issuer=a)
    c = make_ca(DOMAIN, issuer=b)
    x5c, _ = svid(ORDERS_ID, c, chain=[c[0], b[0], a[0]])
    assert validated(x5c)[0] == ORDERS_ID


@pytest.mark.parametrize("kind", ["ES256", "Ed25519"])
def test_es256_and_ed25519_leaf_keys_sign_and_verify(kind: str) -> None:
    leaf_key: LeafKey = (
        ec.generate_private_key(ec.SECP256R1())
        if kind == "ES256"
        else ed25519.Ed25519PrivateKey.generate()
    )
    orders = identity_of(ORDERS_ID, key=leaf_key)
    assert orders.key.alg == ("ES256" if kind == "ES256" else "EdDSA")
    context = signed_story(orders=orders).verify()
    assert context.actors == (EDGE_ID, EDGE_ID, ORDERS_ID)
    assert context.scope == S2


def test_a_bundle_with_only_the_ca_verifies_svid_signed_chains() -> None:
    signed = signed_story()
    for ring, raw in zip(signed.chain.rings, signed.chain.ring_bytes, strict=True):
        assert ring.x5c is not None and ring.key_tag is None
        assert K_KEY not in body_map(raw)  # no key tag: the key is the leaf's
        assert not CA_BUNDLE.keys  # and no ring key anywhere
    context = signed.verify()
    assert context.subject == "user:alice"
    assert context.actors == (EDGE_ID, EDGE_ID, ORDERS_ID)
    # Without the trust domain's authority nothing verifies.
    no_ca = TrustBundle.of([], authorities={PARTNER: [PARTNER_ROOT[0]]})
    err = rejected(lambda: signed.verify(bundle=no_ca), R.BAD_CERTIFICATE, ring=0)
    assert "no X.509 authorities" in err.message


def test_an_x5c_ring_after_bundle_key_rings() -> None:
    bundle = TrustBundle.of([EDGE.bundle_key], authorities={DOMAIN: [ROOT_CERT]})
    signed = signed_story(edge=EDGE, orders=ORDERS_SVID)
    assert [r.x5c is not None for r in signed.chain.rings] == [False, False, True]
    assert signed.verify(bundle=bundle).actors == (EDGE_ID, EDGE_ID, ORDERS_ID)
    # ...and the bundle-key rings still need their bundle key.
    rejected(lambda: signed.verify(bundle=CA_BUNDLE), R.UNKNOWN_KEY, ring=0)
    # A bundle-key ring after x5c rings works the same way.
    mixed = signed_story(edge=EDGE_SVID, orders=ORDERS)
    with_orders = TrustBundle.of([ORDERS.bundle_key], authorities={DOMAIN: [ROOT_CERT]})
    assert mixed.verify(bundle=with_orders).actors == (EDGE_ID, EDGE_ID, ORDERS_ID)


def test_an_authority_that_is_an_intermediate() -> None:
    # A bundle may list an intermediate; x5c may then stop at it or include it.
    x5c, _ = svid(ORDERS_ID, INTER, chain=[INTER_CERT])
    assert validated(x5c, authorities=[INTER_CERT])[0] == ORDERS_ID
    assert validated(x5c[:1], authorities=[INTER_CERT])[0] == ORDERS_ID


def test_extended_key_usage_is_optional_but_must_allow_client_auth() -> None:
    assert validated(svid(ORDERS_ID, eku=None)[0])[0] == ORDERS_ID
    assert validated(svid(ORDERS_ID, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])[0])
    bad(svid(ORDERS_ID, eku=[ExtendedKeyUsageOID.SERVER_AUTH])[0], "id-kp-clientAuth")
    bad(svid(ORDERS_ID, eku=[ExtendedKeyUsageOID.CODE_SIGNING])[0], "id-kp-clientAuth")


def test_other_san_types_beside_the_one_uri_are_allowed() -> None:
    names = [x509.DNSName("orders.shop.svc"), x509.UniformResourceIdentifier(ORDERS_ID)]
    assert validated(svid(ORDERS_ID, names=names)[0])[0] == ORDERS_ID


# -- time -------------------------------------------------------------------------


def test_expired_now_but_valid_at_the_signing_time_is_accepted() -> None:
    short = identity_of(ORDERS_ID, days=1)  # valid T0 .. T0 + 1 day
    signed = signed_story(orders=short, ttl=3 * DAY)
    later = T0 + 2 * DAY  # the SVID expired a day ago; the rings are still valid
    assert signed.verify(now=later).actors[-1] == ORDERS_ID
    # The rule is "valid at iat", not "valid now": a max_age still bounds it.
    rejected(lambda: signed.verify(now=later, limits=Limits(max_age=DAY)), R.EXPIRED)


def test_expired_at_the_signing_time_is_bad_certificate() -> None:
    x5c, key = svid(ORDERS_ID, days=1)
    forged = forged_hop(edge_prefix(3 * DAY), SigningKey(key), actor=ORDERS_ID, x5c=x5c,
                        iat=T0 + DAY + 1)
    err = rejected(lambda: forged.verify(now=T0 + DAY + 10), R.BAD_CERTIFICATE, ring=2)
    assert "not valid at validation time" in err.message


def test_not_yet_valid_at_the_signing_time_is_bad_certificate() -> None:
    x5c, key = svid(ORDERS_ID, not_before=EPOCH + dt.timedelta(hours=1))
    err = x5c_rejected(x5c, R.BAD_CERTIFICATE, key)
    assert "not valid at validation time" in err.message
    # Exactly at notBefore it is valid; one second earlier it is not.
    start = T0 + 3600
    assert validated(x5c, at=start)[0] == ORDERS_ID
    bad(x5c, at=start - 1)


def test_an_intermediate_or_root_outside_its_validity_fails_the_path() -> None:
    young = make_ca(DOMAIN, issuer=ROOT, not_before=EPOCH + dt.timedelta(days=2))
    x5c, _ = svid(ORDERS_ID, young, chain=[young[0]])
    bad(x5c, "not valid", at=T0 + DAY)
    old_root = make_ca(DOMAIN, days=1)  # valid T0 - 1 day .. T0
    x5c, _ = svid(ORDERS_ID, old_root)
    assert validated(x5c, authorities=[old_root[0]], at=T0)[0] == ORDERS_ID
    bad(x5c, "not valid", authorities=[old_root[0]], at=T0 + 1)


def test_a_signing_time_no_certificate_can_reach() -> None:
    x5c, _ = svid(ORDERS_ID)
    bad(x5c, "no certificate can be valid", at=2**40 - 1)


# -- the SVID's identity ---------------------------------------------------------


def test_the_svid_of_another_workload_is_unauthorized_actor() -> None:
    x5c, key = svid(PAYMENTS_ID)
    err = x5c_rejected(x5c, R.UNAUTHORIZED_ACTOR, key, actor=ORDERS_ID)
    assert PAYMENTS_ID in err.message


@pytest.mark.parametrize(
    ("names", "contains"),
    [
        (
            [
                x509.UniformResourceIdentifier(ORDERS_ID),
                x509.UniformResourceIdentifier(PAYMENTS_ID),
            ],
            "exactly one URI SAN, it has 2",
        ),
        ([x509.UniformResourceIdentifier(ORDERS_ID)] * 2, "exactly one URI SAN, it has 2"),
        ([], "no subjectAltName"),
        ([x509.DNSName("orders.shop.svc")], "exactly one URI SAN, it has 0"),
        (
            [x509.UniformResourceIdentifier("https://prod.example.com/ns/shop/sa/orders")],
            "not a SPIFFE ID",
        ),
        (
            [x509.UniformResourceIdentifier("spiffe://PROD.example.com/ns/shop/sa/orders")],
            "not a SPIFFE ID",
        ),
        (
            [x509.UniformResourceIdentifier("SPIFFE://prod.example.com/ns/shop/sa/orders")],
            "not a SPIFFE ID",
        ),
        ([x509.UniformResourceIdentifier("spiffe://prod.example.com")], "has no path"),
        (
            [x509.UniformResourceIdentifier("spiffe://prod.example.com/ns/shop/sa/orders/")],
            "not a SPIFFE ID",
        ),
    ],
)
def test_san_rules(names: list[x509.GeneralName], contains: str) -> None:
    x5c, key = svid(ORDERS_ID, names=names)
    bad(x5c, contains)
    x5c_rejected(x5c, R.BAD_CERTIFICATE, key, contains=contains)


@pytest.mark.parametrize(
    ("kw", "contains"),
    [
        ({"ca": True}, "is a CA certificate"),
        ({"digital_signature": False}, "lacks digitalSignature"),
        ({"key_cert_sign": True}, "keyCertSign or cRLSign"),
        ({"crl_sign": True}, "keyCertSign or cRLSign"),
        ({"key_usage": False}, "no keyUsage"),
        ({"basic_constraints": False}, "no basicConstraints"),
    ],
)
def test_leaf_constraint_and_usage_rules(kw: dict[str, object], contains: str) -> None:
    x5c, key = svid(ORDERS_ID, ROOT, **kw)  # type: ignore[arg-type]
    bad(x5c, contains)
    x5c_rejected(x5c, R.BAD_CERTIFICATE, key, contains=contains)


def test_a_leaf_key_that_cannot_sign_rings() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    bad(svid(ORDERS_ID, key=p384)[0], "cannot sign rings")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf, _ = make_svid([ORDERS_ID], ROOT, key=rsa_key)  # type: ignore[arg-type]
    bad([der(leaf)], "cannot sign rings")


# -- the path -----------------------------------------------------------------------


def test_a_ca_of_another_trust_domain() -> None:
    # A leaf for a prod.example.com workload, issued by the partner's CA: the
    # ring is in prod.example.com, so only prod's authorities count.
    x5c, key = svid(ORDERS_ID, PARTNER_ROOT)
    x5c_rejected(x5c, R.BAD_CERTIFICATE, key, contains="does not validate")
    assert validated(x5c, authorities=[PARTNER_ROOT[0]])[0] == ORDERS_ID  # the control


def test_a_trust_domains_ca_cannot_vouch_for_another_trust_domain() -> None:
    # prod's CA issues an SVID for a partner workload. A hop of a prod chain
    # can only name a prod actor (its path): the SVID is another workload's.
    foreign = f"spiffe://{PARTNER}/ns/shop/sa/orders"
    x5c, key = svid(foreign)
    err = x5c_rejected(x5c, R.UNAUTHORIZED_ACTOR, key, actor=ORDERS_ID)
    assert foreign in err.message
    # As the origin of a partner chain, it is judged by the partner's authorities.
    signing = SigningKey(key)
    partner_edge = Identity(foreign, signing, signing.public_key.thumbprint, tuple(x5c))
    origin = mint_origin(partner_edge, subject="u", issuer="i", credential="c", scope=S0, now=T0)
    chain = append_hop(partner_edge, Chain(origin), event_digest=b"\0" * 32, destination=DEST2,
                       now=T0 + 1)
    err = rejected(
        lambda: verify_chain(chain.encode(), bundle=CA_BUNDLE, event_digest=b"\0" * 32,
                             destination=DEST2, now=T0 + 2),
        R.BAD_CERTIFICATE,
        ring=0,
    )
    assert "does not validate" in err.message


def test_a_self_signed_leaf() -> None:
    x5c, key = svid(ORDERS_ID, self_signed=True)
    x5c_rejected(x5c, R.BAD_CERTIFICATE, key, contains="does not validate")


def test_an_intermediate_without_the_ca_flag() -> None:
    not_ca = make_ca(DOMAIN, issuer=ROOT, ca=False)
    x5c, key = svid(ORDERS_ID, not_ca, chain=[not_ca[0]])
    x5c_rejected(x5c, R.BAD_CERTIFICATE, key, contains="does not validate")


def test_an_intermediate_without_key_cert_sign() -> None:
    no_sign = make_ca(DOMAIN, issuer=ROOT, key_cert_sign=False)
    x5c, _ = svid(ORDERS_ID, no_sign, chain=[no_sign[0]])
    bad(x5c, "does not validate")


def test_a_path_length_constraint() -> None:
    short = make_ca(DOMAIN, path_length=0)
    below = make_ca(DOMAIN, issuer=short)
    x5c, _ = svid(ORDERS_ID, below, chain=[below[0]])
    bad(x5c, "path length", authorities=[short[0]])


def test_uri_name_constraints_are_refused_not_ignored() -> None:
    constraint = x509.NameConstraints(
        permitted_subtrees=[x509.UniformResourceIdentifier(DOMAIN)], excluded_subtrees=None
    )
    constrained = make_ca(DOMAIN, issuer=ROOT, extra=[(constraint, True)])
    x5c, _ = svid(ORDERS_ID, constrained, chain=[constrained[0]])
    bad(x5c, "name constraint")


@pytest.mark.parametrize("kind", ["Ed25519", "RSA-1024"])
def test_issuer_keys_outside_the_profile_are_refused(kind: str) -> None:
    key = (
        ed25519.Ed25519PrivateKey.generate()
        if kind == "Ed25519"
        else rsa.generate_private_key(public_exponent=65537, key_size=1024)
    )
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, f"{kind} root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(EPOCH - dt.timedelta(days=1))
        .not_valid_after(EPOCH + dt.timedelta(days=9))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, None if kind == "Ed25519" else hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(name)
        .public_key(leaf_key.public_key())
        .serial_number(2)
        .not_valid_before(EPOCH)
        .not_valid_after(EPOCH + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ORDERS_ID)]),
            critical=False,
        )
        .sign(key, None if kind == "Ed25519" else hashes.SHA256())
    )
    bad([der(leaf)], "does not validate", authorities=[root])


def test_the_chain_must_not_include_the_root() -> None:
    x5c, key = svid(ORDERS_ID, INTER, chain=[INTER_CERT, ROOT_CERT])
    x5c_rejected(x5c, R.BAD_CERTIFICATE, key, contains="root")
    direct, _ = svid(ORDERS_ID)
    bad([*direct, der(ROOT_CERT)], "root")


@pytest.mark.parametrize("shape", ["reordered", "unused", "repeated"])
def test_the_chain_is_exactly_the_path(shape: str) -> None:
    a = make_ca(DOMAIN, issuer=ROOT)
    b = make_ca(DOMAIN, issuer=a)
    leaf = svid(ORDERS_ID, b)[0][0]
    x5c = {
        "reordered": [leaf, der(a[0]), der(b[0])],
        "unused": [leaf, der(b[0]), der(a[0]), der(INTER_CERT)],
        "repeated": [leaf, der(b[0]), der(b[0]), der(a[0])],
    }[shape]
    bad(x5c, "exactly the validated path")


def test_five_certificates() -> None:
    x5c, key = svid(ORDERS_ID, INTER, chain=[INTER_CERT])
    five = [*x5c, *[der(INTER_CERT)] * 3]
    bad(five, "1 to 4 certificates")
    forged = forged_hop(edge_prefix(), SigningKey(key), actor=ORDERS_ID, x5c=x5c)
    text = edit_ring(forged.encoded, 2, lambda b: b.__setitem__(K_X5C, five))
    err = rejected(lambda: decode_chain(text, max_bytes=99_999, max_rings=32), R.MALFORMED, ring=2)
    assert "x5c" in err.message


@pytest.mark.parametrize(
    "value",
    [
        [],
        "MIIB",
        [b""],
        [b"\x30" * 4097],
        [b"\x30\x00", "text"],
        {0: b"\x30"},
        None,
    ],
)
def test_x5c_wire_shape_is_malformed(value: object) -> None:
    x5c, key = svid(ORDERS_ID)
    forged = forged_hop(edge_prefix(), SigningKey(key), actor=ORDERS_ID, x5c=x5c)
    for ring in (0, 2):  # an origin ring and a hop ring
        text = edit_ring(forged.encoded, ring, lambda b: b.__setitem__(K_X5C, value))

        def decode(text: str = text) -> Chain:
            return decode_chain(text, max_bytes=99_999, max_rings=32)

        err = rejected(decode, R.MALFORMED, ring=ring)
        assert "x5c" in err.message, err.message


def test_garbage_der() -> None:
    x5c, key = svid(ORDERS_ID)
    for garbage in (b"\x00", b"\x30\x03\x02\x01\x01", x5c[0] + b"\x00", x5c[0][:-1]):
        x5c_rejected([garbage], R.BAD_CERTIFICATE, key, contains="not a DER X.509")
    x5c_rejected([x5c[0], b"\x30\x00"], R.BAD_CERTIFICATE, key, contains="certificate 1")


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
def test_every_bit_flip_is_bad_certificate_or_changes_nothing() -> None:
    """Hostile DER never escapes as another exception, and whatever still
    validates (DER leniency outside the signed part) names the same SVID."""
    x5c, key = svid(ORDERS_ID, INTER, chain=[INTER_CERT])
    expected = (ORDERS_ID, PublicKey.of(key.public_key()))
    accepted = 0
    for index, cert in enumerate(x5c):
        for position in range(0, len(cert), 2):
            for bit in range(8):
                changed = bytearray(cert)
                changed[position] ^= 1 << bit
                chain = [*x5c[:index], bytes(changed), *x5c[index + 1 :]]
                try:
                    found = validated(chain)
                except TrustError as err:
                    assert err.reason is R.BAD_CERTIFICATE
                    continue
                assert found == expected
                accepted += 1
    assert accepted < 8  # at most a handful of encoding leniencies


def test_a_tampered_certificate_is_bad_certificate() -> None:
    x5c, key = svid(ORDERS_ID)
    leaf = bytearray(x5c[0])
    leaf[-5] ^= 0x01  # inside the CA's signature
    x5c_rejected([bytes(leaf)], R.BAD_CERTIFICATE, key)


@pytest.mark.parametrize("where", ["leaf", "intermediate"])
def test_an_unknown_critical_extension(where: str) -> None:
    unknown = (
        x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"),
        True,
    )
    if where == "leaf":
        x5c, key = svid(ORDERS_ID, extra=[unknown])
    else:
        odd = make_ca(DOMAIN, issuer=ROOT, extra=[unknown])
        x5c, key = svid(ORDERS_ID, odd, chain=[odd[0]])
    x5c_rejected(x5c, R.BAD_CERTIFICATE, key, contains="critical")
    # The same extension, not critical, is fine.
    harmless = [(unknown[0], False)]
    assert validated(svid(ORDERS_ID, extra=harmless)[0])[0] == ORDERS_ID


def test_no_authorities() -> None:
    bad(svid(ORDERS_ID)[0], "no X.509 authorities", authorities=[])


def test_a_leaf_listed_as_an_authority_is_still_a_leaf() -> None:
    for kw in ({}, {"self_signed": True}):
        x5c, _ = svid(ORDERS_ID, ROOT, **kw)  # type: ignore[arg-type]
        leaf = x509.load_der_x509_certificate(x5c[0])
        bad(x5c, authorities=[leaf])
    x5c, _ = svid(ORDERS_ID)
    bad(
        x5c,
        "itself one of the authorities",
        authorities=[x509.load_der_x509_certificate(x5c[0]), ROOT_CERT],
    )


# -- binding the SVID to the ring -------------------------------------------------


@pytest.mark.parametrize("tag", ["leaf", "orders"])
def test_an_x5c_ring_names_no_key_tag(tag: str) -> None:
    """x5c and a key tag together are no valid ring, even signed by the leaf
    key: a verifier never has to choose which of the two names the key."""
    x5c, key = svid(ORDERS_ID)
    signing = SigningKey(key)
    forged = forged_hop(edge_prefix(), signing, actor=ORDERS_ID, x5c=x5c)
    value = signing.public_key.key_tag if tag == "leaf" else ORDERS.key_tag
    rings = wire_rings(forged.encoded)
    body = body_map(rings[2])
    body[K_KEY] = value
    rings[2] = signed_ring(body, signing, wire_hashes(rings[:2])[-1])
    text = "2." + ".".join(b64url_encode(r) for r in rings)
    bundle = TrustBundle.of([ORDERS.bundle_key], authorities={DOMAIN: [ROOT_CERT]})
    err = rejected(lambda: verify_chain(text, bundle=bundle, event_digest=forged.event.digest(),
                                        destination=DEST2, now=NOW), R.MALFORMED, ring=2)
    assert "exactly one" in err.message


def test_x5c_swapped_for_another_svid_of_the_same_actor() -> None:
    signed = signed_story()
    other_x5c, other_key = svid(ORDERS_ID, INTER, chain=[INTER_CERT])
    newest = signed.chain.newest
    assert isinstance(newest, HopRing)
    # x5c swapped: the key is the new leaf's, which did not sign.
    assert PublicKey.of(other_key.public_key()) != ORDERS_SVID.key.public_key
    swapped = dataclasses.replace(newest, x5c=tuple(other_x5c))
    attack = Signed(Chain(signed.chain.origin, (*signed.chain.hops[:-1], swapped)), signed.event)
    rejected(lambda: attack.verify(), R.BAD_SIGNATURE, ring=2)
    # A certificate re-issued for the very same key: x5c is signed too.
    reissued, _ = svid(ORDERS_ID, INTER, chain=[INTER_CERT], key=ORDERS_SVID.key._key)
    assert reissued != list(ORDERS_SVID.certificates)
    swapped = dataclasses.replace(newest, x5c=tuple(reissued))
    attack = Signed(Chain(signed.chain.origin, (*signed.chain.hops[:-1], swapped)), signed.event)
    rejected(lambda: attack.verify(), R.BAD_SIGNATURE, ring=2)


def test_x5c_is_signed_and_hashed() -> None:
    signed = signed_story()
    newest = signed.chain.newest
    leaf_tag = ORDERS_SVID.key.public_key.key_tag
    # Dropping x5c leaves a ring that names no key at all.
    text = edit_ring(signed.encoded, 2, lambda b: b.pop(K_X5C))
    rejected(lambda: decode_chain(text, max_bytes=99_999, max_rings=32), R.MALFORMED, ring=2)
    # Replacing it by the leaf key's tag: a bundle-key ring no bundle knows...
    without = dataclasses.replace(newest, x5c=None, key_tag=leaf_tag)
    attack = Signed(Chain(signed.chain.origin, (*signed.chain.hops[:-1], without)), signed.event)  # type: ignore[arg-type]
    assert attack.chain.signing_input(2) != signed.chain.signing_input(2)
    assert attack.chain.hashes()[2] != signed.chain.hashes()[2]
    rejected(lambda: attack.verify(), R.UNKNOWN_KEY, ring=2)
    # ...and with that very key bundled for that actor, the signature still fails.
    bundle = TrustBundle.of(
        [BundleKey(ORDERS_SVID.kid, ORDERS_ID, ORDERS_SVID.key.public_key)],
        authorities={DOMAIN: [ROOT_CERT]},
    )
    rejected(lambda: attack.verify(bundle=bundle), R.BAD_SIGNATURE, ring=2)


def test_x5c_round_trips_through_the_wire() -> None:
    signed = signed_story()
    again = decode_chain(signed.encoded, max_bytes=16_384, max_rings=32)
    assert again == signed.chain
    assert again.hops[-1].x5c == ORDERS_SVID.certificates


def test_a_key_bound_to_an_actor_in_the_bundle_does_not_help_another_svid() -> None:
    # Adding x5c to a ring signed by a bundle key: the key is then the leaf's,
    # and only the leaf's key can have signed.
    x5c, _ = svid(ORDERS_ID)
    forged = forged_hop(edge_prefix(), ORDERS.key, actor=ORDERS_ID, x5c=x5c)
    bundle = TrustBundle.of([ORDERS.bundle_key], authorities={DOMAIN: [ROOT_CERT]})
    rejected(lambda: forged.verify(bundle=bundle), R.BAD_SIGNATURE, ring=2)
    # An SVID whose leaf key *is* the bundled key: the same key, both ways.
    leaf, _ = make_svid([ORDERS_ID], ROOT, key=ORDERS.key._key)
    forged = forged_hop(edge_prefix(), ORDERS.key, actor=ORDERS_ID, x5c=[der(leaf)])
    assert forged.verify(bundle=bundle).actors[-1] == ORDERS_ID
    revoked = TrustBundle.of([BundleKey(ORDERS.kid, ORDERS_ID, ORDERS.key.public_key,
                                        revoked=True)], authorities={DOMAIN: [ROOT_CERT]})
    rejected(lambda: forged.verify(bundle=revoked), R.REVOKED, ring=2)


# -- revocation ---------------------------------------------------------------------


def _with_revocations(**kw: object) -> TrustBundle:
    return TrustBundle.of([], authorities={DOMAIN: [ROOT_CERT]}, **kw)  # type: ignore[arg-type]


def test_a_revoked_actor_or_segment_is_revoked_whatever_its_certificate() -> None:
    signed = signed_story()
    rejected(
        lambda: signed.verify(bundle=_with_revocations(revoked_actors=[ORDERS_ID])),
        R.REVOKED,
        ring=2,
    )
    segment = f"spiffe://{DOMAIN}/ns/shop"
    rejected(
        lambda: signed.verify(bundle=_with_revocations(revoked_segments=[segment])),
        R.REVOKED,
        ring=2,
    )
    rejected(
        lambda: signed.verify(bundle=_with_revocations(revoked_actors=[EDGE_ID])), R.REVOKED, ring=0
    )


def test_a_revoked_or_retired_bundle_entry_of_the_same_key() -> None:
    signed = signed_story()
    kid = ORDERS_SVID.kid
    public = ORDERS_SVID.key.public_key
    revoked = TrustBundle.of(
        [BundleKey(kid, ORDERS_ID, public, revoked=True)], authorities={DOMAIN: [ROOT_CERT]}
    )
    rejected(lambda: signed.verify(bundle=revoked), R.REVOKED, ring=2)
    retired = TrustBundle.of(
        [BundleKey(kid, ORDERS_ID, public, retired_at=T0 + 19)], authorities={DOMAIN: [ROOT_CERT]}
    )
    rejected(lambda: signed.verify(bundle=retired), R.REVOKED, ring=2)
    in_time = TrustBundle.of(
        [BundleKey(kid, ORDERS_ID, public, retired_at=T0 + 20)], authorities={DOMAIN: [ROOT_CERT]}
    )
    assert signed.verify(bundle=in_time).actors[-1] == ORDERS_ID
    elsewhere = TrustBundle.of(
        [BundleKey(kid, PAYMENTS_ID, public)], authorities={DOMAIN: [ROOT_CERT]}
    )
    rejected(lambda: signed.verify(bundle=elsewhere), R.UNAUTHORIZED_ACTOR, ring=2)


# -- the cache ------------------------------------------------------------------------


def test_the_cache_gives_the_same_answers() -> None:
    cache = SvidCache(max_entries=2)
    x5c, _ = svid(ORDERS_ID, INTER, chain=[INTER_CERT], days=1)
    first = validated(x5c, cache=cache)
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
    assert validated(x5c, cache=cache, at=T0 + 60) == first
    assert (cache.hits, cache.misses) == (1, 1)
    # The time check runs on every call: a hit outside the validity is refused.
    bad(x5c, "not valid", cache=cache, at=T0 + DAY + 1)
    bad(x5c, "not valid", cache=cache, at=T0 - 1)
    assert cache.hits == 3
    # Another set of authorities is another entry, validated in full.
    bad(x5c, "does not validate", cache=cache, authorities=[PARTNER_ROOT[0]])
    assert cache.misses == 2
    both = [PARTNER_ROOT[0], ROOT_CERT]
    assert validated(x5c, cache=cache, authorities=both) == first
    assert cache.misses == 3
    assert validated(x5c, cache=cache, authorities=both[::-1]) == first  # order is no key
    assert cache.misses == 3
    # Failures are not stored, and the bound holds.
    assert len(cache) == 2
    other, _ = svid(PAYMENTS_ID)
    validated(other, cache=cache)
    assert len(cache) == 2
    assert validated(x5c, cache=cache, authorities=both) == first


def test_a_cache_hit_is_bounded_by_every_certificate_of_the_path() -> None:
    # The intermediate's validity is narrower than the leaf's on both ends.
    narrow = make_ca(DOMAIN, issuer=ROOT, not_before=EPOCH + dt.timedelta(hours=1), days=1)
    x5c, _ = svid(ORDERS_ID, narrow, chain=[narrow[0]], days=30)
    cache = SvidCache()
    middle = T0 + 2 * 3600
    assert validated(x5c, cache=cache, at=middle)[0] == ORDERS_ID
    assert validated(x5c, cache=cache, at=middle + 60)[0] == ORDERS_ID
    assert cache.hits == 1
    bad(x5c, "not valid", cache=cache, at=T0 + 1800)  # leaf valid, intermediate not yet
    bad(x5c, "not valid", cache=cache, at=T0 + DAY + 3601)  # leaf valid, intermediate expired
    assert cache.hits == 3


def test_the_cache_never_turns_a_failure_into_success() -> None:
    cache = SvidCache()
    x5c, _ = svid(ORDERS_ID)
    for _ in range(2):
        bad(x5c, authorities=[PARTNER_ROOT[0]], cache=cache)
    assert len(cache) == 0
    assert validated(x5c, cache=cache)[0] == ORDERS_ID
    bad(x5c, authorities=[PARTNER_ROOT[0]], cache=cache)
    tampered = [x5c[0][:-5] + bytes([x5c[0][-5] ^ 1]) + x5c[0][-4:]]
    bad(tampered, cache=cache)


def test_verification_uses_the_default_cache_consistently() -> None:
    signed = signed_story()
    assert signed.verify().actors[-1] == ORDERS_ID
    assert signed.verify().actors[-1] == ORDERS_ID  # answered from the cache
    rejected(
        lambda: signed.verify(bundle=TrustBundle.of([], authorities={DOMAIN: [PARTNER_ROOT[0]]})),
        R.BAD_CERTIFICATE,
        ring=0,
    )


# -- the producer ----------------------------------------------------------------------


def test_identity_from_svid_pem() -> None:
    leaf, key = make_svid([ORDERS_ID], INTER)
    identity = Identity.from_svid(pem(leaf) + pem(INTER_CERT), key_pem(key))
    assert identity.actor == ORDERS_ID
    assert identity.key_tag is None  # rings it signs carry x5c instead
    assert identity.kid == PublicKey.of(key.public_key()).thumbprint
    assert identity.certificates == (der(leaf), der(INTER_CERT))
    assert identity.x5c == identity.certificates
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ValueError, match="not the key of the leaf"):
        Identity.from_svid(pem(leaf), key_pem(other))
    with pytest.raises(ValueError):
        Identity.from_svid(b"", key_pem(key))
    not_svid, not_svid_key = make_svid([ORDERS_ID, PAYMENTS_ID], ROOT)
    with pytest.raises(ValueError, match="exactly one URI SAN"):
        Identity.from_svid(pem(not_svid), key_pem(not_svid_key))


def test_identity_from_spiffe_helper_files(tmp_path: Path) -> None:
    leaf, key = make_svid([ORDERS_ID], INTER)
    (tmp_path / "svid.pem").write_bytes(pem(leaf) + pem(INTER_CERT))
    (tmp_path / "svid_key.pem").write_bytes(key_pem(key))
    (tmp_path / "svid_bundle.pem").write_bytes(pem(ROOT_CERT))
    orders = Identity.from_svid_files(tmp_path / "svid.pem", tmp_path / "svid_key.pem")
    authorities = x509.load_pem_x509_certificates((tmp_path / "svid_bundle.pem").read_bytes())
    bundle = TrustBundle.of([], authorities={DOMAIN: authorities})
    assert signed_story(orders=orders).verify(bundle=bundle).actors[-1] == ORDERS_ID
    with pytest.raises(OSError):
        Identity.from_svid_files(tmp_path / "missing.pem", tmp_path / "svid_key.pem")


def test_the_producer_refuses_an_identity_that_is_not_an_svid_of_its_actor() -> None:
    x5c, key = svid(PAYMENTS_ID)
    signing = SigningKey(key)
    with pytest.raises(ValueError, match="SVID of"):
        Identity(ORDERS_ID, signing, signing.public_key.thumbprint, tuple(x5c))
    with pytest.raises(ValueError, match="thumbprint"):
        Identity(PAYMENTS_ID, signing, "payments-1", tuple(x5c))
    with pytest.raises(ValueError, match="not the key of the leaf"):
        Identity(PAYMENTS_ID, ORDERS.key, ORDERS.key.public_key.thumbprint, tuple(x5c))
    ca_leaf, ca_key = svid(ORDERS_ID, ca=True)
    with pytest.raises(ValueError, match="CA certificate"):
        Identity.create(ORDERS_ID, SigningKey(ca_key), certificates=ca_leaf)
    with_root, root_key = svid(ORDERS_ID, INTER, chain=[INTER_CERT, ROOT_CERT])
    with pytest.raises(ValueError, match="root"):
        Identity.create(ORDERS_ID, SigningKey(root_key), certificates=with_root)
    with pytest.raises(ValueError, match="1 to 4"):
        Identity.create(
            ORDERS_ID, SigningKey(root_key), certificates=[with_root[0], *[der(INTER_CERT)] * 4]
        )


def test_the_producer_refuses_to_sign_outside_the_certificates_validity() -> None:
    short = identity_of(ORDERS_ID, days=1)
    late = T0 + DAY + 1
    rejected(
        lambda: mint_origin(short, subject="u", issuer="i", credential="c", scope=S0, now=late),
        R.BAD_CERTIFICATE,
    )
    prefix = Chain(
        mint_origin(
            EDGE_SVID, subject="u", issuer="i", credential="c", scope=S0, now=T0, ttl=3 * DAY
        )
    )
    rejected(
        lambda: append_hop(short, prefix, event_digest=b"\0" * 32, destination=DEST1, now=late),
        R.BAD_CERTIFICATE,
    )
    early = identity_of(ORDERS_ID, not_before=EPOCH + dt.timedelta(hours=1))
    rejected(
        lambda: append_hop(early, prefix, event_digest=b"\0" * 32, destination=DEST1, now=T0),
        R.BAD_CERTIFICATE,
    )
    # Inside the validity it signs; a ring without x5c is untouched.
    assert (
        append_hop(short, prefix, event_digest=b"\0" * 32, destination=DEST1, now=T0 + 5).newest.x5c
        == short.certificates
    )
    assert mint_origin(EDGE, subject="u", issuer="i", credential="c", scope=S0, now=T0).x5c is None


def test_check_leaf_is_what_the_producer_and_the_verifier_share() -> None:
    leaf, key = make_svid([ORDERS_ID], ROOT)
    assert check_leaf(leaf) == (ORDERS_ID, PublicKey.of(key.public_key()))


# -- size -------------------------------------------------------------------------------


def test_a_three_ring_chain_of_svids_fits_the_default_budget() -> None:
    bundle_keys = signed_story(edge=EDGE, orders=ORDERS)
    leaf_only = signed_story(edge=EDGE_SVID, orders=identity_of(ORDERS_ID))
    with_inter = signed_story(
        edge=identity_of(EDGE_ID, INTER, chain=[INTER_CERT]), orders=ORDERS_SVID
    )
    sizes = [len(s.encoded) for s in (bundle_keys, leaf_only, with_inter)]
    leaf_der = len(ORDERS_SVID.certificates[0])
    assert 400 < leaf_der < 700, leaf_der
    # Each x5c ring adds its certificates' base64url (4/3 of the DER) and a few bytes.
    assert sizes[0] < sizes[1] < sizes[2] <= Limits().max_bytes, sizes
    assert all(isinstance(r, OriginRing | HopRing) for r in with_inter.chain.rings)
    assert with_inter.verify().actors[-1] == ORDERS_ID
