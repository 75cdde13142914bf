"""X.509-SVIDs as ring-signing identities: validation to a trust domain (no I/O).

A workload may sign its rings with the private key of its X.509-SVID and put
the SVID's certificate chain in the ring (field ``x5c``, see
``docs/wire-format.md``). :func:`validate_svid` decides whether such a chain
identifies a workload of a trust domain, to the X.509-SVID specification:

* the **leaf** has ``basicConstraints`` with ``cA`` false; ``keyUsage`` with
  ``digitalSignature`` and neither ``keyCertSign`` nor ``cRLSign``; exactly
  one URI SAN (other SAN types may be present), which is a valid SPIFFE ID
  with a non-empty path; an ``extendedKeyUsage``, when present, that includes
  ``id-kp-clientAuth`` (SVIDs carry ``serverAuth`` and ``clientAuth``); an
  Ed25519 or P-256 public key (the ring-signing algorithms);
* the **path** leaf → intermediates → one of the trust domain's X.509
  authorities verifies under RFC 5280 and the CA/Browser Forum profile of
  ``cryptography.x509.verification``: every signature, issuer/subject
  chaining, ``cA`` and ``keyCertSign`` on every issuer, path length
  constraints, at most three intermediates, no unknown critical extension
  on any certificate, CA keys RSA (≥ 2048 bits) or ECDSA P-256/384/521 (not
  Ed25519), and no URI name constraints (the library does not evaluate them,
  so such a path is refused rather than half-checked);
* **every certificate of the path, the authority included, is valid at the
  ring's signing time** ``at`` (its ``iat``), not at the time of
  verification: a ring signed while its SVID was valid stays verifiable
  after the (short-lived) SVID expired, like a ring signed with a since
  retired bundle key. ``at`` is the signer's own claim; what bounds how
  long an expired SVID's key can be used to sign with a back-dated ``iat``
  is the verifier's ``Limits.max_age`` (see docs/wire-format.md);
* ``x5c`` is exactly that path without the authority (leaf first, then each
  issuer), at most :data:`MAX_CERTS` certificates of at most
  :data:`MAX_CERT_BYTES` bytes; it never holds a self-signed root. It may
  end with an authority only when that authority is itself an intermediate.

The leaf's own rules are checked by hand here (clear messages, and the same
checks serve signers, see :func:`check_leaf`); the path is validated by
``cryptography``'s verifier with a client policy whose end-entity rules are
replaced by those above (it would otherwise also demand an authority key
identifier and refuse SAN layouts the SVID specification allows).

Successful path validations are kept in a small LRU (:class:`SvidCache`)
keyed by the chain's bytes and the authorities' fingerprints, with the
path's combined validity interval, so a chain seen again costs a hash; the
time check still runs on every call (outside the cached interval the path
is validated again in full).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from trusthop.errors import Reason, TrustError
from trusthop.keys import PublicKey
from trusthop.rings import MAX_X5C_CERT_BYTES, MAX_X5C_CERTS
from trusthop.spiffe import SpiffeId

MAX_CERTS = MAX_X5C_CERTS
"""Leaf plus at most three intermediates."""
MAX_CERT_BYTES = MAX_X5C_CERT_BYTES
"""Upper bound of one DER certificate in ``x5c``."""
DEFAULT_CACHE_SIZE = 1024

_DER = serialization.Encoding.DER

_EE_POLICY = (
    verification.ExtensionPolicy.permit_all()
    .require_present(x509.BasicConstraints, verification.Criticality.AGNOSTIC, None)
    .require_present(x509.KeyUsage, verification.Criticality.AGNOSTIC, None)
    .require_present(x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None)
)
_CA_POLICY = verification.ExtensionPolicy.webpki_defaults_ca()


def _bad(message: str) -> TrustError:
    return TrustError(Reason.BAD_CERTIFICATE, message)


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _check_shape(chain: Sequence[bytes]) -> None:
    if not 1 <= len(chain) <= MAX_CERTS:
        raise _bad(f"x5c must hold 1 to {MAX_CERTS} certificates, not {len(chain)}")
    for index, der in enumerate(chain):
        if not isinstance(der, bytes) or not 0 < len(der) <= MAX_CERT_BYTES:
            raise _bad(f"x5c certificate {index} must be 1 to {MAX_CERT_BYTES} bytes")


def load_chain(chain: Sequence[bytes]) -> list[x509.Certificate]:
    """Parse ``x5c``: 1 to :data:`MAX_CERTS` DER certificates, leaf first.

    Raises:
        TrustError(bad_certificate): a wrong count or size, or bytes that are
            not one DER X.509 certificate (with nothing after it).
    """
    _check_shape(chain)
    certs = []
    for index, der in enumerate(chain):
        try:
            cert = x509.load_der_x509_certificate(der)
            # Parsed lazily by cryptography: read now, so a malformed name or
            # time is this error and not an exception somewhere later.
            _ = (cert.subject, cert.issuer, cert.not_valid_before_utc, cert.not_valid_after_utc)
            certs.append(cert)
        except Exception as exc:  # hostile bytes: whatever the parser raises
            raise _bad(f"x5c certificate {index} is not a DER X.509 certificate ({exc})") from None
    return certs


def check_leaf(cert: x509.Certificate) -> tuple[str, PublicKey]:
    """The leaf rules of the X.509-SVID specification (no path, no time).

    Returns:
        The SPIFFE ID of the single URI SAN and the leaf's public key.

    Raises:
        TrustError(bad_certificate): naming the rule the leaf breaks.
    """
    try:
        constraints = _extension(cert, x509.BasicConstraints)
        usage = _extension(cert, x509.KeyUsage)
        names = _extension(cert, x509.SubjectAlternativeName)
        purposes = _extension(cert, x509.ExtendedKeyUsage)
    except Exception as exc:  # hostile bytes: whatever the parser raises
        raise _bad(f"leaf certificate: unreadable extensions ({exc})") from None
    if not isinstance(constraints, x509.BasicConstraints):
        raise _bad("leaf certificate has no basicConstraints (an SVID sets cA false)")
    if constraints.ca:
        raise _bad("leaf certificate is a CA certificate (basicConstraints cA is true)")
    if not isinstance(usage, x509.KeyUsage):
        raise _bad("leaf certificate has no keyUsage (an SVID sets digitalSignature)")
    if not usage.digital_signature:
        raise _bad("leaf certificate's keyUsage lacks digitalSignature")
    if usage.key_cert_sign or usage.crl_sign:
        raise _bad("leaf certificate's keyUsage allows keyCertSign or cRLSign")
    if not isinstance(names, x509.SubjectAlternativeName):
        raise _bad("leaf certificate has no subjectAltName (an SVID has one URI SAN)")
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise _bad(f"leaf certificate must have exactly one URI SAN, it has {len(uris)}")
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except ValueError as exc:
        raise _bad(
            f"leaf certificate's URI SAN {uris[0][:200]!r} is not a SPIFFE ID ({exc})"
        ) from None
    if not spiffe_id.path:
        raise _bad(f"leaf certificate's SPIFFE ID {spiffe_id} has no path (a workload's has)")
    if purposes is not None:
        assert isinstance(purposes, x509.ExtendedKeyUsage)
        if ExtendedKeyUsageOID.CLIENT_AUTH not in purposes:
            raise _bad("leaf certificate's extendedKeyUsage lacks id-kp-clientAuth")
    try:
        key = PublicKey.of(cert.public_key())
    except Exception as exc:  # ValueError, UnsupportedAlgorithm, or a malformed key
        raise _bad(f"leaf certificate's key cannot sign rings ({exc})") from None
    return str(spiffe_id), key


def _timestamp(value: dt.datetime) -> int:
    return int(value.timestamp())


@dataclass(frozen=True, slots=True)
class _Validated:
    spiffe_id: str
    key: PublicKey
    not_before: int
    not_after: int


class SvidCache:
    """A bounded LRU of successful path validations.

    An entry is keyed by the SHA-256 of the chain's bytes and the SHA-256
    fingerprints of the authorities it was validated against, and holds the
    SPIFFE ID, the leaf key and the interval in which every certificate of
    the path is valid. A hit therefore means "this exact chain validated to
    this exact set of authorities"; only successes are stored. Thread-safe.
    """

    def __init__(self, max_entries: int = DEFAULT_CACHE_SIZE) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[bytes, bytes], _Validated] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _get(self, key: tuple[bytes, bytes]) -> _Validated | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
            else:
                self._entries.move_to_end(key)
                self.hits += 1
            return found

    def _put(self, key: tuple[bytes, bytes], value: _Validated) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry (counters are kept)."""
        with self._lock:
            self._entries.clear()


DEFAULT_CACHE = SvidCache()
"""The process-wide cache :func:`validate_svid` uses unless given another."""


def _cache_key(
    chain: Sequence[bytes], authorities: Sequence[x509.Certificate]
) -> tuple[bytes, bytes]:
    chain_hash = hashlib.sha256()
    for der in chain:
        chain_hash.update(len(der).to_bytes(4, "big") + der)
    prints = sorted(cert.fingerprint(hashes.SHA256()) for cert in authorities)
    return chain_hash.digest(), hashlib.sha256(b"".join(prints)).digest()


def _validate_path(
    certs: list[x509.Certificate],
    chain: Sequence[bytes],
    authorities: Sequence[x509.Certificate],
    when: dt.datetime,
) -> tuple[int, int]:
    """Path validation by ``cryptography``; the path's validity interval."""
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(list(authorities)))
        .time(when)
        .max_chain_depth(MAX_CERTS - 1)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        .build_client_verifier()
    )
    try:
        path = verifier.verify(certs[0], certs[1:]).chain
    except Exception as exc:  # VerificationError, or a parser error of a hostile certificate
        raise _bad(f"the certificate chain does not validate: {str(exc)[:300]}") from None
    if len(path) < 2:
        raise _bad("the leaf certificate is itself one of the authorities")
    ders = [cert.public_bytes(_DER) for cert in path]
    if list(chain) == ders:
        anchor = path[-1]
        if anchor.subject == anchor.issuer:
            raise _bad("x5c must not include the root certificate")
    elif list(chain) != ders[:-1]:
        raise _bad(
            "x5c must be exactly the validated path, leaf first, without the root "
            "(no unused, repeated or reordered certificates)"
        )
    not_before = max(_timestamp(cert.not_valid_before_utc) for cert in path)
    not_after = min(_timestamp(cert.not_valid_after_utc) for cert in path)
    return not_before, not_after


def validate_svid(
    chain: Sequence[bytes],
    *,
    authorities: Sequence[x509.Certificate],
    at: int,
    cache: SvidCache | None = DEFAULT_CACHE,
) -> tuple[str, PublicKey]:
    """Validate an X.509-SVID chain (``x5c``) to ``authorities`` as of ``at``.

    Args:
        chain: DER certificates, leaf first, then intermediates (no root).
        authorities: the trust domain's X.509 authorities
            (:meth:`~trusthop.bundle.TrustBundle.x509_authorities`).
        at: seconds since the epoch at which every certificate of the path
            must be valid (the ring's ``iat``).
        cache: where successful validations are remembered (``None``: not at all).

    Returns:
        The leaf's SPIFFE ID and public key.

    Raises:
        TrustError(bad_certificate): the chain is not a valid X.509-SVID of
            these authorities at ``at`` (the message names the rule).
    """
    _check_shape(chain)
    try:
        when = dt.datetime.fromtimestamp(at, dt.UTC)
    except (OverflowError, ValueError, OSError):
        raise _bad(f"no certificate can be valid at {at}") from None
    key = None
    if cache is not None:
        key = _cache_key(chain, authorities)
        found = cache._get(key)
        if found is not None and found.not_before <= at <= found.not_after:
            return found.spiffe_id, found.key
    certs = load_chain(chain)
    spiffe_id, leaf_key = check_leaf(certs[0])
    if not authorities:
        raise _bad("the trust domain has no X.509 authorities in the trust bundle")
    not_before, not_after = _validate_path(certs, chain, authorities, when)
    if cache is not None and key is not None:
        cache._put(key, _Validated(spiffe_id, leaf_key, not_before, not_after))
    return spiffe_id, leaf_key


def certificate_window(chain: Sequence[bytes]) -> tuple[int, int]:
    """The interval (epoch seconds, inclusive) in which every certificate of
    ``chain`` is valid, for signers to refuse a ring their chain cannot cover.

    Raises:
        TrustError(bad_certificate): as :func:`load_chain`.
    """
    certs = load_chain(chain)
    return (
        max(_timestamp(cert.not_valid_before_utc) for cert in certs),
        min(_timestamp(cert.not_valid_after_utc) for cert in certs),
    )
