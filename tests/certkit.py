"""Test X.509 authorities and SVIDs, made here (no I/O, no clock)."""

from __future__ import annotations

import base64
import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def make_ca(trust_domain: str, *, key: ec.EllipticCurvePrivateKey | None = None,
            issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
            days: int = 365, ca: bool = True,
            ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA (root, or intermediate when ``issuer`` is given) of ``trust_domain``."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    tag = key.public_key().public_numbers().x % 10**6
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"CA {tag}")])
    signer_cert, signer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(signer_cert.subject if signer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(EPOCH - dt.timedelta(days=1))
        .not_valid_after(EPOCH + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=not ca, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if signer_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False)
    return builder.sign(signer_key, hashes.SHA256()), key


def make_svid(spiffe_ids: list[str], issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
              *, key: ec.EllipticCurvePrivateKey | None = None,
              not_before: dt.datetime = EPOCH, days: int = 30, ca: bool = False,
              ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An X.509-SVID leaf for ``spiffe_ids`` (normally exactly one) signed by ``issuer``."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    issuer_cert, issuer_key = issuer
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")]))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(i) for i in spiffe_ids]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    return cert, key


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def authority_jwk(cert: x509.Certificate) -> dict[str, object]:
    """A SPIFFE bundle entry for an X.509 authority."""
    return {"use": "x509-svid", "kty": "EC", "x5c": [base64.b64encode(der(cert)).decode()]}


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
