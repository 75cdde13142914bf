"""Test X.509 authorities and SVIDs, made here (no I/O, no clock).

``make_ca`` and ``make_svid`` build what SPIRE would issue; their keyword
arguments bend one rule at a time for the adversarial tests (a leaf that is
a CA, without digitalSignature, with two URI SANs, an unknown critical
extension...).
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

LeafKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
Issuer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def make_ca(
    trust_domain: str,
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    issuer: Issuer | None = None,
    days: int = 365,
    ca: bool = True,
    not_before: dt.datetime | None = None,
    path_length: int | None = None,
    key_cert_sign: bool | None = None,
    extra: Sequence[tuple[x509.ExtensionType, bool]] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA (root, or intermediate when ``issuer`` is given) of ``trust_domain``."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    tag = key.public_key().public_numbers().x % 10**6
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"CA {tag}"),
        ]
    )
    signer_cert, signer_key = issuer if issuer else (None, key)
    start = EPOCH - dt.timedelta(days=1) if not_before is None else not_before
    cert_sign = ca if key_cert_sign is None else key_cert_sign
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(signer_cert.subject if signer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=cert_sign,
                crl_sign=cert_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if signer_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False,
        )
    for extension, critical in extra:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer_key, hashes.SHA256()), key


def make_svid(
    spiffe_ids: list[str],
    issuer: Issuer,
    *,
    key: LeafKey | None = None,
    not_before: dt.datetime = EPOCH,
    days: int = 30,
    ca: bool = False,
    names: Sequence[x509.GeneralName] | None = None,
    digital_signature: bool = True,
    key_cert_sign: bool | None = None,
    crl_sign: bool = False,
    key_usage: bool = True,
    basic_constraints: bool = True,
    eku: Sequence[x509.ObjectIdentifier] | None = (
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ),
    extra: Sequence[tuple[x509.ExtensionType, bool]] = (),
    self_signed: bool = False,
) -> tuple[x509.Certificate, LeafKey]:
    """An X.509-SVID leaf for ``spiffe_ids`` (normally exactly one) signed by ``issuer``.

    ``names`` replaces the SAN entries (``[]``: no SAN extension at all);
    ``eku=None`` leaves the extended key usage out; ``self_signed`` signs
    the leaf with its own key (``key`` must then be a P-256 key).
    """
    key = key or ec.generate_private_key(ec.SECP256R1())
    issuer_cert, issuer_key = issuer
    signer_key: ec.EllipticCurvePrivateKey = issuer_key
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"leaf {id(key) % 10**6}"),
        ]
    )
    issuer_name = issuer_cert.subject
    if self_signed:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        signer_key, issuer_name = key, subject
    san = [x509.UniformResourceIdentifier(i) for i in spiffe_ids] if names is None else names
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + dt.timedelta(days=days))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False,
        )
    )
    if basic_constraints:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=None), critical=True
        )
    if key_usage:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=digital_signature,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca if key_cert_sign is None else key_cert_sign,
                crl_sign=crl_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    for extension, critical in extra:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer_key, hashes.SHA256()), key


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def authority_jwk(cert: x509.Certificate) -> dict[str, object]:
    """A SPIFFE bundle entry for an X.509 authority."""
    return {"use": "x509-svid", "kty": "EC", "x5c": [base64.b64encode(der(cert)).decode()]}


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: LeafKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
